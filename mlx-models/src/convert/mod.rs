//! Converting a model to the mlx-community layout (config.json with MLX's `quantization`
//! block, safetensors shards with their index, tokenizer files), optionally cast or
//! quantized as Python mlx-lm's converter does ([`rules`]), and measuring what the
//! conversion changed: the drift report ([`drift`]).
//!
//! ```no_run
//! use mlx_models::convert::{convert, ConvertOptions};
//! use mlx_models::load::ModelSource;
//! let report = convert(
//!     &ModelSource::Default,
//!     std::path::Path::new("smollm2-q8"),
//!     &ConvertOptions::new().quantize(8, 64).report(true),
//! )?;
//! if let Some(drift) = &report.drift {
//!     println!("{drift}");
//! }
//! # Ok::<(), mlx_models::Error>(())
//! ```

pub mod drift;
pub mod rules;

pub use drift::{drift, DriftInputs, DriftReport, LayerDrift, PromptDrift, PERPLEXITY_TEXT};

use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::gguf;
use crate::load::{load, load_dir, LoadOptions, Model, ModelSource};
use crate::nn::Quantization;
use crate::weights::{is_float, Weights};
use crate::{default_model, hub, Message, Tokenizer};
use mlx_rs::{ops, Array, Dtype};
use rules::QuantizationRules;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a conversion is, for a progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConvertProgress {
    /// Reading the source.
    Reading,
    /// `done` of `total` tensors cast or quantized; `name` is the last one.
    Converting {
        done: usize,
        total: usize,
        name: String,
    },
    /// `done` of `total` bytes of safetensors written.
    Writing { done: u64, total: u64 },
    /// Comparing the models: `done` of `total` runs (the prompts, then the perplexity
    /// text).
    Drift { done: usize, total: usize },
}

/// A callback told of a conversion's progress.
#[derive(Clone)]
pub struct ProgressFn(Arc<dyn Fn(ConvertProgress) + Send + Sync>);

impl fmt::Debug for ProgressFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProgressFn")
    }
}

/// A quantizer bug to seed, so tests can show the drift bound catches it. Not for use
/// outside tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFault {
    /// Codes and scales computed for groups of half the size, written as groups of the
    /// size asked for (every other group's scale and bias): needs groups of 64 or 128.
    GroupSize,
    /// The affine offsets (`biases`) written as zeros.
    DroppedBiases,
    /// `scales` and `biases` in a narrower floating-point type than the weights had
    /// (bfloat16, or float16 for bfloat16 weights).
    ScalesDtype,
}

/// What [`convert`] writes.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    dtype: Option<Dtype>,
    quantization: Option<Quantization>,
    drift_prompts: Option<Vec<String>>,
    drift_tokens: usize,
    report: bool,
    progress: Option<ProgressFn>,
    fault: Option<QuantFault>,
}

impl ConvertOptions {
    /// Floating-point tensors cast as mlx-lm's converter does (to config.json's
    /// `torch_dtype` when it names one, else kept; quantized sources become float32);
    /// nothing quantized; no drift report.
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

    /// Quantizes what mlx-lm's converter quantizes (see [`rules`]): MLX affine, `bits` ∈
    /// {2, 3, 4, 5, 6, 8}, `group_size` ∈ {32, 64, 128}.
    pub fn quantize(mut self, bits: i32, group_size: i32) -> Self {
        self.quantization = Some(Quantization { bits, group_size });
        self
    }

    /// Loads the source and the result side by side and measures the drift (written to
    /// `drift.json` and returned in [`ConvertReport::drift`]).
    pub fn report(mut self, yes: bool) -> Self {
        self.report = yes;
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

    /// Calls `f` as the conversion progresses.
    pub fn progress(mut self, f: impl Fn(ConvertProgress) + Send + Sync + 'static) -> Self {
        self.progress = Some(ProgressFn(Arc::new(f)));
        self
    }

    /// Seeds a quantizer bug (tests of the drift bound only).
    #[doc(hidden)]
    pub fn inject_fault(mut self, fault: QuantFault) -> Self {
        self.fault = Some(fault);
        self
    }

    fn tell(&self, progress: ConvertProgress) {
        if let Some(ProgressFn(f)) = &self.progress {
            f(progress);
        }
    }
}

/// What a conversion wrote and, when asked, how far the converted model's outputs are from
/// the source's.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    pub out: PathBuf,
    pub tensors: usize,
    pub quantized_tensors: usize,
    pub bytes: u64,
    pub drift: Option<DriftReport>,
}

/// The questions of the default drift report.
const DRIFT_QUESTIONS: [&str; 4] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis in one sentence.",
];

/// Most bytes in one safetensors shard (mlx-lm's limit).
const MAX_SHARD_BYTES: u64 = 5 << 30;

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

/// A converted model in memory: what [`convert`] writes.
#[derive(Debug)]
pub struct Converted {
    /// config.json, with the `quantization` block when quantized.
    pub config: Value,
    pub tensors: HashMap<String, Array>,
    /// The quantized modules (names without `.weight`) and how.
    pub quantized: BTreeMap<String, Quantization>,
}

/// Converts a model's config and weights (`group_size`: that of quantized source tensors)
/// as [`convert`] does, without writing anything: quantized sources expanded exactly, names
/// brought to mlx-lm's layout, floating point cast, and what mlx-lm quantizes quantized.
pub fn convert_weights(
    config: &ConfigFile,
    weights: Weights,
    group_size: Option<i32>,
    options: &ConvertOptions,
) -> Result<Converted> {
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
    let source = weights.source().to_path_buf();
    let tensors = dequantize_source(weights.into_tensors(), group_size, &config.path)?;
    let mut weights = Weights::new(tensors, source);
    let value = &config.value;
    rules::to_mlx_lm_layout(&mut weights, value)?;
    let model_type = config.model_type()?.to_owned();
    let dtype = options.dtype.or_else(|| rules::default_dtype(value));
    let rules = options
        .quantization
        .map(|q| QuantizationRules::new(value, q));

    let tensors: BTreeMap<String, Array> = weights.into_tensors().into_iter().collect();
    let total = tensors.len();
    let mut out = HashMap::with_capacity(total);
    let mut quantized = BTreeMap::new();
    for (done, (name, tensor)) in tensors.into_iter().enumerate() {
        let tensor = match dtype {
            Some(dtype) if is_float(tensor.dtype()) && rules::is_cast(&model_type, &name) => {
                tensor.as_dtype(dtype)?
            }
            _ => tensor,
        };
        let module = name.strip_suffix(".weight");
        let how = match (&rules, module) {
            (Some(rules), Some(module)) => rules.quantization(module, &tensor)?,
            _ => None,
        };
        match (how, module) {
            (Some(q), Some(module)) => {
                let (w, scales, biases) = quantize(&tensor, q, options.fault)?;
                mlx_rs::transforms::eval([&w, &scales, &biases])?;
                out.insert(format!("{module}.scales"), scales);
                out.insert(format!("{module}.biases"), biases);
                out.insert(name.clone(), w);
                quantized.insert(module.to_owned(), q);
            }
            _ => {
                tensor.eval()?;
                out.insert(name.clone(), tensor);
            }
        }
        options.tell(ConvertProgress::Converting {
            done: done + 1,
            total,
            name,
        });
    }

    let mut config = value.clone();
    if let Some(object) = config.as_object_mut() {
        object.remove("quantization");
        object.remove("quantization_config");
        if let Some(rules) = &rules {
            let block =
                rules.config_block(quantized.iter().map(|(module, q)| (module.as_str(), *q)));
            object.insert("quantization".into(), block.clone());
            object.insert("quantization_config".into(), block);
        }
        if let Some(dtype) = options.dtype {
            object.insert("torch_dtype".into(), json!(dtype_name(dtype)));
        }
    }
    Ok(Converted {
        config,
        tensors: out,
        quantized,
    })
}

/// MLX's affine quantization of `w`, with `fault` seeded when a test asks for one.
fn quantize(
    w: &Array,
    q: Quantization,
    fault: Option<QuantFault>,
) -> Result<(Array, Array, Array)> {
    let Some(fault) = fault else {
        return Ok(ops::quantize(w, q.group_size, q.bits)?);
    };
    Ok(match fault {
        QuantFault::GroupSize => {
            if q.group_size < 64 {
                return Err(Error::Convert {
                    message: "the group-size fault needs groups of 64 or 128".into(),
                });
            }
            let (codes, scales, biases) = ops::quantize(w, q.group_size / 2, q.bits)?;
            let every_other: Vec<i32> = (0..scales.dim(-1)).step_by(2).collect();
            let every_other = Array::from_slice(&every_other, &[every_other.len() as i32]);
            (
                codes,
                scales.take_axis(&every_other, -1)?,
                biases.take_axis(&every_other, -1)?,
            )
        }
        QuantFault::DroppedBiases => {
            let (codes, scales, biases) = ops::quantize(w, q.group_size, q.bits)?;
            let zeros = ops::zeros_like(&biases)?;
            (codes, scales, zeros)
        }
        QuantFault::ScalesDtype => {
            let (codes, scales, biases) = ops::quantize(w, q.group_size, q.bits)?;
            let narrow = if w.dtype() == Dtype::Bfloat16 {
                Dtype::Float16
            } else {
                Dtype::Bfloat16
            };
            (codes, scales.as_dtype(narrow)?, biases.as_dtype(narrow)?)
        }
    })
}

/// Converts `source` into a directory `out` in the mlx-community layout (created; files of
/// the same names are replaced); with [`ConvertOptions::report`], then loads both and
/// measures the drift.
pub fn convert(
    source: &ModelSource,
    out: &Path,
    options: &ConvertOptions,
) -> Result<ConvertReport> {
    options.tell(ConvertProgress::Reading);
    let Parts {
        config,
        weights,
        group_size,
        tokenizer,
        tokenizer_files,
        generation,
    } = read_parts(source)?;
    let converted = convert_weights(&config, weights, group_size, options)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    write_json(&out.join("config.json"), &converted.config)?;
    let bytes = write_shards(&converted.tensors, out, options)?;
    write_tokenizer(&tokenizer, tokenizer_files.as_deref(), &generation, out)?;

    let drift = if options.report {
        let source_model = load(source, &LoadOptions::new())?;
        let converted_model = load_dir(out, &LoadOptions::new())?;
        let inputs = drift_inputs(&source_model, options)?;
        let report = drift(
            source_model.network(),
            converted_model.network(),
            &inputs,
            |done, total| options.tell(ConvertProgress::Drift { done, total }),
        )?;
        write_json(
            &out.join("drift.json"),
            &serde_json::to_value(&report).unwrap_or_default(),
        )?;
        Some(report)
    } else {
        None
    };
    Ok(ConvertReport {
        out: out.to_path_buf(),
        tensors: converted.tensors.len(),
        quantized_tensors: converted.quantized.len(),
        bytes,
        drift,
    })
}

/// Writes `tensors` as mlx-lm does: `model.safetensors`, or shards of at most 5 GiB
/// (`model-00001-of-00003.safetensors`, …), and `model.safetensors.index.json`; returns
/// the bytes of tensor data.
fn write_shards(
    tensors: &HashMap<String, Array>,
    out: &Path,
    options: &ConvertOptions,
) -> Result<u64> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut shards: Vec<Vec<&String>> = vec![Vec::new()];
    let mut shard_bytes = 0u64;
    for name in names {
        let bytes = tensors[name].nbytes() as u64;
        if shard_bytes + bytes > MAX_SHARD_BYTES && !shards[shards.len() - 1].is_empty() {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        shards.last_mut().expect("one shard at least").push(name);
    }
    let total: u64 = tensors.values().map(|t| t.nbytes() as u64).sum();
    let count = shards.len();
    let metadata = HashMap::from([("format".to_owned(), "mlx".to_owned())]);
    let mut weight_map = serde_json::Map::new();
    let mut written = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        let path = out.join(&file);
        Array::save_safetensors(
            shard.iter().map(|name| (name.as_str(), &tensors[*name])),
            &metadata,
            &path,
        )
        .map_err(|e| Error::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        for name in shard {
            weight_map.insert((*name).clone(), json!(file));
            written += tensors[*name].nbytes() as u64;
        }
        options.tell(ConvertProgress::Writing {
            done: written,
            total,
        });
    }
    write_json(
        &out.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )?;
    Ok(total)
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

/// Quantized source matrices (`w.weight` with `w.scales` and `w.biases`) back to floating
/// point, exactly.
fn dequantize_source(
    mut tensors: HashMap<String, Array>,
    group_size: Option<i32>,
    config_path: &Path,
) -> Result<HashMap<String, Array>> {
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
    Ok(tensors)
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

/// The drift report's inputs: the prompts' token ids (through the chat template when
/// there is one), the fixed text's for perplexity.
fn drift_inputs(model: &Model, options: &ConvertOptions) -> Result<DriftInputs> {
    let texts: Vec<String> = match &options.drift_prompts {
        Some(prompts) => prompts.clone(),
        None => DRIFT_QUESTIONS.iter().map(|q| q.to_string()).collect(),
    };
    let prompts = texts
        .into_iter()
        .map(|text| {
            let ids = if model.tokenizer().chat_template().is_some() {
                model.chat_prompt(&[Message::user(text.clone())])?
            } else {
                model.tokenizer().encode(&text, true)?
            };
            Ok((text, ids))
        })
        .collect::<Result<_>>()?;
    Ok(DriftInputs {
        prompts,
        greedy_steps: options.drift_tokens,
        perplexity_ids: model.tokenizer().encode(PERPLEXITY_TEXT, true)?,
    })
}
