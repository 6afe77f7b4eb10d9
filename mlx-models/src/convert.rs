//! Converting a model to a Hugging Face-format directory (config.json, model.safetensors,
//! tokenizer files), optionally cast or quantized with MLX's affine quantization, and
//! measuring what the conversion changed: the drift report.
//!
//! ```no_run
//! use mlx_models::convert::{convert, ConvertOptions};
//! use mlx_models::load::ModelSource;
//! let report = convert(
//!     &ModelSource::Default,
//!     std::path::Path::new("smollm2-q8"),
//!     &ConvertOptions::new().quantize(8, 64),
//! )?;
//! println!("{}", report.drift);
//! # Ok::<(), mlx_models::Error>(())
//! ```

use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::gguf;
use crate::load::{load, load_dir, LoadOptions, Model, ModelSource};
use crate::model::LanguageModel;
use crate::nn::Quantization;
use crate::tap::Tap;
use crate::weights::{is_float, Weights};
use crate::{default_model, hub, Message, Tokenizer};
use mlx_rs::{ops, Array, Dtype};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// What [`convert`] writes.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    dtype: Option<Dtype>,
    quantization: Option<Quantization>,
    drift_prompts: Option<Vec<String>>,
    drift_tokens: usize,
}

impl ConvertOptions {
    /// Floating-point tensors keep their dtype (quantized sources become float32); nothing
    /// is quantized.
    pub fn new() -> Self {
        ConvertOptions {
            drift_tokens: 16,
            ..Self::default()
        }
    }

    /// Casts floating-point tensors (and the scales of quantized ones) to `dtype`.
    pub fn dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Quantizes every 2-D `*.weight` matrix (linear layers, embeddings) whose rows divide
    /// into groups: MLX affine, `bits` ∈ {2, 3, 4, 5, 6, 8}, `group_size` ∈ {32, 64, 128}.
    pub fn quantize(mut self, bits: i32, group_size: i32) -> Self {
        self.quantization = Some(Quantization { bits, group_size });
        self
    }

    /// The prompts of the drift report (default: a few questions through the chat
    /// template, or as plain text without one).
    pub fn drift_prompts(mut self, prompts: Vec<String>) -> Self {
        self.drift_prompts = Some(prompts);
        self
    }

    /// How many greedy tokens the drift report compares per prompt (default 16).
    pub fn drift_tokens(mut self, n: usize) -> Self {
        self.drift_tokens = n;
        self
    }
}

/// What a conversion wrote and how far the converted model's outputs are from the source's.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    pub out: PathBuf,
    pub tensors: usize,
    pub quantized_tensors: usize,
    pub bytes: u64,
    pub drift: DriftReport,
}

/// How the converted model's outputs differ from the source model's on the same prompts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DriftReport {
    pub prompts: Vec<PromptDrift>,
    /// The largest first-step |Δlogit| over the prompts.
    pub max_abs_logit_diff: f32,
    /// The largest first-step KL(source ‖ converted) over the prompts, in nats.
    pub max_kl: f64,
    /// Greedy tokens equal to the source's, over all prompts.
    pub greedy_tokens_equal: usize,
    pub greedy_tokens: usize,
}

/// One prompt of a [`DriftReport`].
#[derive(Debug, Clone, Serialize)]
pub struct PromptDrift {
    pub prompt: String,
    pub max_abs_logit_diff: f32,
    pub mean_abs_logit_diff: f32,
    pub kl: f64,
    pub same_top1: bool,
    /// Greedy steps before the first differing token (all of them when none differs).
    pub greedy_steps_equal: usize,
    pub greedy_steps: usize,
    /// The source model's top-2 margin at the first differing step, if any.
    pub source_margin_at_divergence: Option<f32>,
}

impl fmt::Display for DriftReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<40} {:>12} {:>12} {:>10} {:>6} {:>8}",
            "prompt", "max |Δlogit|", "mean |Δ|", "KL", "top-1", "greedy"
        )?;
        for p in &self.prompts {
            let mut prompt: String = p.prompt.chars().take(38).collect();
            if prompt.len() < p.prompt.len() {
                prompt.push('…');
            }
            writeln!(
                f,
                "{:<40} {:>12.3e} {:>12.3e} {:>10.2e} {:>6} {:>4}/{:<3}",
                prompt.replace('\n', " "),
                p.max_abs_logit_diff,
                p.mean_abs_logit_diff,
                p.kl,
                if p.same_top1 { "same" } else { "DIFF" },
                p.greedy_steps_equal,
                p.greedy_steps
            )?;
        }
        write!(
            f,
            "max |Δlogit| {:.3e}, max KL {:.2e}, greedy tokens equal {}/{}",
            self.max_abs_logit_diff, self.max_kl, self.greedy_tokens_equal, self.greedy_tokens
        )
    }
}

/// The questions of the default drift report.
const DRIFT_QUESTIONS: [&str; 4] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis in one sentence.",
];

/// A model's parts as read from its source, before any network is built.
struct Parts {
    config: ConfigFile,
    weights: Weights,
    /// Group size of the source's quantized tensors.
    group_size: Option<i32>,
    tokenizer: Tokenizer,
    tokenizer_files: Option<PathBuf>,
    generation: Value,
}

fn read_parts(source: &ModelSource) -> Result<Parts> {
    let from_gguf = |path: &Path| -> Result<Parts> {
        let model = gguf::read(path)?;
        let eos = model.vocab.eos_token_id;
        let bos = model.vocab.bos_token_id;
        let tokenizer = Tokenizer::from_vocab(model.vocab)?;
        let mut eos_ids: Vec<u32> = eos.into_iter().collect();
        for id in tokenizer.eos_token_ids() {
            if !eos_ids.contains(id) {
                eos_ids.push(*id);
            }
        }
        Ok(Parts {
            config: model.config,
            weights: model.weights,
            group_size: Some(gguf::quants::AFFINE_GROUP as i32),
            tokenizer,
            tokenizer_files: None,
            generation: json!({"bos_token_id": bos, "eos_token_id": eos_ids}),
        })
    };
    let from_dir = |dir: &Path| -> Result<Parts> {
        let config = ConfigFile::read(&dir.join("config.json"))?;
        let group_size = config
            .value
            .get("quantization")
            .or_else(|| config.value.get("quantization_config"))
            .and_then(|q| q.get("group_size"))
            .and_then(Value::as_i64)
            .map(|g| g as i32);
        let generation_path = dir.join("generation_config.json");
        let generation = if generation_path.is_file() {
            let bytes =
                std::fs::read(&generation_path).map_err(|e| Error::io(&generation_path, e))?;
            serde_json::from_slice(&bytes).map_err(|e| Error::Json {
                path: generation_path,
                source: e,
            })?
        } else {
            json!({})
        };
        Ok(Parts {
            weights: Weights::from_dir(dir)?,
            config,
            group_size,
            tokenizer: Tokenizer::from_dir(dir)?,
            tokenizer_files: Some(dir.to_path_buf()),
            generation,
        })
    };
    match source {
        ModelSource::Default => from_gguf(&default_model::path(|| {})?),
        ModelSource::Gguf(path) => from_gguf(path),
        ModelSource::Dir(dir) => from_dir(dir),
        ModelSource::Hub { repo, revision } => {
            let mut options = hub::HubOptions::new();
            if let Some(revision) = revision {
                options = options.with_revision(revision.clone());
            }
            from_dir(&hub::snapshot(repo, &options, None)?)
        }
    }
}

/// Converts `source` into a Hugging Face-format directory `out` (created; existing files
/// of the same names are replaced), then loads both and measures the drift.
pub fn convert(
    source: &ModelSource,
    out: &Path,
    options: &ConvertOptions,
) -> Result<ConvertReport> {
    if let Some(q) = options.quantization {
        if ![2, 3, 4, 5, 6, 8].contains(&q.bits) || ![32, 64, 128].contains(&q.group_size) {
            return Err(Error::Convert {
                message: format!(
                    "{}-bit groups of {} are not MLX affine quantization (bits 2, 3, 4, 5, 6, 8; \
                     groups 32, 64, 128)",
                    q.bits, q.group_size
                ),
            });
        }
    }
    let Parts {
        config: config_file,
        weights,
        group_size,
        tokenizer,
        tokenizer_files,
        generation,
    } = read_parts(source)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    let mut config = config_file.value.clone();
    let (tensors, quantized) = transform(
        weights.into_tensors(),
        group_size,
        options,
        &config_file.path,
    )?;
    if let Some(object) = config.as_object_mut() {
        object.remove("quantization");
        object.remove("quantization_config");
        if let Some(q) = options.quantization {
            object.insert(
                "quantization".into(),
                json!({"group_size": q.group_size, "bits": q.bits}),
            );
        }
        if let Some(dtype) = options.dtype {
            object.insert("torch_dtype".into(), json!(dtype_name(dtype)));
        }
    }
    write_json(&out.join("config.json"), &config)?;
    let weights_path = out.join("model.safetensors");
    let metadata = HashMap::from([("format".to_owned(), "mlx".to_owned())]);
    Array::save_safetensors(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        &metadata,
        &weights_path,
    )
    .map_err(|e| Error::Safetensors {
        path: weights_path.clone(),
        message: e.to_string(),
    })?;
    write_tokenizer(&tokenizer, tokenizer_files.as_deref(), &generation, out)?;

    let bytes = std::fs::metadata(&weights_path)
        .map_err(|e| Error::io(&weights_path, e))?
        .len();
    let source_model = load(source, &LoadOptions::new())?;
    let converted = load_dir(out, &LoadOptions::new())?;
    let drift = drift(&source_model, &converted, options)?;
    write_json(
        &out.join("drift.json"),
        &serde_json::to_value(&drift).unwrap_or_default(),
    )?;
    Ok(ConvertReport {
        out: out.to_path_buf(),
        tensors: tensors.len(),
        quantized_tensors: quantized,
        bytes,
        drift,
    })
}

fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Float16 => "float16",
        Dtype::Bfloat16 => "bfloat16",
        Dtype::Float64 => "float64",
        _ => "float32",
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Dequantizes quantized sources (exactly), casts, and quantizes as asked; returns the
/// tensors and how many are quantized.
fn transform(
    mut tensors: HashMap<String, Array>,
    group_size: Option<i32>,
    options: &ConvertOptions,
    config_path: &Path,
) -> Result<(HashMap<String, Array>, usize)> {
    // Quantized source matrices back to floating point: `w.weight` with `w.scales`.
    let stems: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".scales"))
        .map(str::to_owned)
        .collect();
    for stem in stems {
        let (Some(weight), Some(scales), Some(biases)) = (
            tensors.remove(&format!("{stem}.weight")),
            tensors.remove(&format!("{stem}.scales")),
            tensors.remove(&format!("{stem}.biases")),
        ) else {
            return Err(Error::UnsupportedQuantization {
                path: config_path.to_path_buf(),
                name: format!("{stem}.weight"),
                message: "quantized without `weight` or `biases`: only MLX's affine \
                          quantization is converted"
                    .into(),
            });
        };
        let group = group_size.ok_or_else(|| Error::Convert {
            message: format!("`{stem}` is quantized but the config names no group size"),
        })?;
        let (packed, groups) = (weight.shape().to_vec(), scales.shape().to_vec());
        let (Some(&words), Some(&count)) = (packed.last(), groups.last()) else {
            return Err(Error::Convert {
                message: format!("`{stem}` has scalar quantized tensors"),
            });
        };
        let bits = i64::from(words) * 32 / (i64::from(count) * i64::from(group)).max(1);
        let dense = ops::dequantize(&weight, &scales, &biases, group, bits as i32)?;
        tensors.insert(format!("{stem}.weight"), dense);
    }

    let mut out = HashMap::with_capacity(tensors.len());
    let mut quantized = 0;
    for (name, tensor) in tensors {
        let tensor = match options.dtype {
            Some(dtype) if is_float(tensor.dtype()) => tensor.as_dtype(dtype)?,
            _ => tensor,
        };
        let quantizable = options.quantization.filter(|q| {
            name.ends_with(".weight")
                && is_float(tensor.dtype())
                && tensor.ndim() == 2
                && tensor.dim(-1) % q.group_size == 0
        });
        match quantizable {
            Some(q) => {
                let (w, scales, biases) = ops::quantize(&tensor, q.group_size, q.bits)?;
                mlx_rs::transforms::eval([&w, &scales, &biases])?;
                let stem = name.strip_suffix(".weight").unwrap_or(&name);
                out.insert(format!("{stem}.scales"), scales);
                out.insert(format!("{stem}.biases"), biases);
                out.insert(name, w);
                quantized += 1;
            }
            None => {
                tensor.eval()?;
                out.insert(name, tensor);
            }
        }
    }
    Ok((out, quantized))
}

/// tokenizer.json with its companions: copied from a directory source, written from the
/// GGUF vocabulary otherwise.
fn write_tokenizer(
    tokenizer: &Tokenizer,
    tokenizer_files: Option<&Path>,
    generation: &Value,
    out: &Path,
) -> Result<()> {
    if let Some(dir) = tokenizer_files {
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
            "chat_template.json",
        ] {
            let from = dir.join(name);
            if from.is_file() {
                let to = out.join(name);
                std::fs::copy(&from, &to).map_err(|e| Error::io(&to, e))?;
            }
        }
    } else {
        let path = out.join("tokenizer.json");
        tokenizer
            .backend()
            .save(&path, false)
            .map_err(|e| Error::Tokenizer {
                path: Some(path.clone()),
                message: e.to_string(),
            })?;
        let mut config = serde_json::Map::new();
        for name in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(token) = tokenizer.special_token(name) {
                config.insert(name.into(), json!(token));
            }
        }
        if let Some(template) = tokenizer.chat_template() {
            config.insert("chat_template".into(), json!(template));
        }
        write_json(&out.join("tokenizer_config.json"), &Value::Object(config))?;
    }
    if !generation.as_object().is_some_and(|g| g.is_empty()) {
        write_json(&out.join("generation_config.json"), generation)?;
    }
    Ok(())
}

/// The prompts' token ids: through the chat template when there is one.
fn drift_prompts(model: &Model, options: &ConvertOptions) -> Result<Vec<(String, Vec<u32>)>> {
    let texts: Vec<String> = match &options.drift_prompts {
        Some(prompts) => prompts.clone(),
        None => DRIFT_QUESTIONS.iter().map(|q| q.to_string()).collect(),
    };
    texts
        .into_iter()
        .map(|text| {
            let ids = if model.tokenizer().chat_template().is_some() {
                model.chat_prompt(&[Message::user(text.clone())])?
            } else {
                model.tokenizer().encode(&text, true)?
            };
            Ok((text, ids))
        })
        .collect()
}

/// The logits after feeding `ids` to `network` on top of `cache`.
fn step_logits(
    network: &dyn LanguageModel,
    cache: &mut [crate::cache::LayerCache],
    ids: &[u32],
) -> Result<Vec<f32>> {
    let input: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let logits = network.forward(
        &Array::from_slice(&input, &[1, input.len() as i32]),
        cache,
        &mut Tap::off(),
    )?;
    let last = logits
        .take_axis(Array::from_int(input.len() as i32 - 1), 1)?
        .as_dtype(Dtype::Float32)?;
    Ok(last.as_slice::<f32>().to_vec())
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    x.iter().map(|&v| v as f64 - log_sum).collect()
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Measures how `converted`'s outputs differ from `source`'s: first-step logits and KL on
/// each prompt, and greedy decoding (both models fed the source's tokens) step by step.
pub fn drift(source: &Model, converted: &Model, options: &ConvertOptions) -> Result<DriftReport> {
    let mut report = DriftReport::default();
    for (prompt, ids) in drift_prompts(source, options)? {
        let (net_a, net_b) = (source.network(), converted.network());
        let (mut cache_a, mut cache_b) = (net_a.new_cache(), net_b.new_cache());
        let a = step_logits(net_a, &mut cache_a, &ids)?;
        let b = step_logits(net_b, &mut cache_b, &ids)?;
        if a.len() != b.len() {
            return Err(Error::Convert {
                message: format!("vocabularies differ: {} vs {} logits", a.len(), b.len()),
            });
        }
        let diffs: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).collect();
        let max =
            diffs.iter().copied().fold(
                0f32,
                |m, d| {
                    if d.is_nan() {
                        f32::INFINITY
                    } else {
                        m.max(d)
                    }
                },
            );
        let mean = diffs.iter().sum::<f32>() / diffs.len().max(1) as f32;
        let (la, lb) = (log_softmax(&a), log_softmax(&b));
        let kl: f64 = la.iter().zip(&lb).map(|(p, q)| p.exp() * (p - q)).sum();
        let same_top1 = argmax(&a) == argmax(&b);

        // Greedy on the source's path, both models fed the same tokens: where do the
        // picks first differ?
        let steps = options.drift_tokens;
        let (mut sa, mut sb) = (a, b);
        let mut equal = steps;
        let mut margin = None;
        for step in 0..steps {
            let (ta, tb) = (argmax(&sa), argmax(&sb));
            if ta != tb {
                equal = step;
                let mut sorted = sa.clone();
                sorted.sort_by(|x, y| y.total_cmp(x));
                margin = Some(sorted[0] - sorted.get(1).copied().unwrap_or(sorted[0]));
                break;
            }
            if step + 1 < steps {
                sa = step_logits(net_a, &mut cache_a, &[ta as u32])?;
                sb = step_logits(net_b, &mut cache_b, &[ta as u32])?;
            }
        }
        report.max_abs_logit_diff = report.max_abs_logit_diff.max(max);
        report.max_kl = report.max_kl.max(kl);
        report.greedy_tokens += steps;
        report.greedy_tokens_equal += equal;
        report.prompts.push(PromptDrift {
            prompt,
            max_abs_logit_diff: max,
            mean_abs_logit_diff: mean,
            kl,
            same_top1,
            greedy_steps_equal: equal,
            greedy_steps: steps,
            source_margin_at_divergence: margin,
        });
    }
    Ok(report)
}
