//! GGUF files (llama.cpp's format), read by our own validated reader ([`file`]): the config
//! comes from the metadata, and so do the tokenizer and chat template; tensors are decoded
//! by [`quants`] into MLX arrays.
//!
//! Quantized tensors stay quantized where MLX's affine format holds them exactly (Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K: groups of 32 with float32 scales and biases), and
//! are dequantized to float32 exactly as gguf-py does otherwise (Q2_K, Q3_K, Q6_K, IQ4_NL,
//! IQ4_XS, F16, BF16). Other types are an [`Error::UnsupportedGgufType`] naming the tensor.
//!
//! Architectures: `llama` (q/k rows restored from llama.cpp's interleaved order) and
//! `gemma3` (norm weights stored as `1 + w`, restored to `w`).

pub mod file;
pub mod quants;

pub use file::{GgufFile, TensorInfo, Value};
pub use quants::GgmlType;

use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::tokenizer::VocabSpec;
use crate::weights::Weights;
use mlx_rs::Array;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use std::path::Path;

/// What a GGUF file holds, mapped to the names our modules use.
pub struct GgufModel {
    pub config: ConfigFile,
    pub weights: Weights,
    /// The tokenizer and chat template from the metadata (`tokenizer.*`).
    pub vocab: VocabSpec,
}

/// The `general.architecture` values this crate maps onto its modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Gemma3,
}

impl Architecture {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Architecture::Llama),
            "gemma3" => Some(Architecture::Gemma3),
            _ => None,
        }
    }

    /// The Transformers name of a llama.cpp tensor name (`blk.3.attn_q.weight` →
    /// `model.layers.3.self_attn.q_proj.weight`); `.scales` and `.biases` map alike.
    pub fn hf_name(self, name: &str) -> Option<String> {
        let (stem, suffix) = name.rsplit_once('.')?;
        let mapped = match stem {
            "token_embd" => "model.embed_tokens".to_owned(),
            "output_norm" => "model.norm".to_owned(),
            "output" => "lm_head".to_owned(),
            _ => {
                let rest = stem.strip_prefix("blk.")?;
                let (layer, part) = rest.split_once('.')?;
                if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let module = match (self, part) {
                    (_, "attn_q") => "self_attn.q_proj",
                    (_, "attn_k") => "self_attn.k_proj",
                    (_, "attn_v") => "self_attn.v_proj",
                    (_, "attn_output") => "self_attn.o_proj",
                    (_, "ffn_gate") => "mlp.gate_proj",
                    (_, "ffn_up") => "mlp.up_proj",
                    (_, "ffn_down") => "mlp.down_proj",
                    (_, "attn_norm") => "input_layernorm",
                    (Architecture::Llama, "ffn_norm") => "post_attention_layernorm",
                    (Architecture::Gemma3, "ffn_norm") => "pre_feedforward_layernorm",
                    (Architecture::Gemma3, "post_attention_norm") => "post_attention_layernorm",
                    (Architecture::Gemma3, "post_ffw_norm") => "post_feedforward_layernorm",
                    (Architecture::Gemma3, "attn_q_norm") => "self_attn.q_norm",
                    (Architecture::Gemma3, "attn_k_norm") => "self_attn.k_norm",
                    _ => return None,
                };
                format!("model.layers.{layer}.{module}")
            }
        };
        Some(format!("{mapped}.{suffix}"))
    }
}

/// [`Architecture::hf_name`] for llama.
pub fn hf_name(name: &str) -> Option<String> {
    Architecture::Llama.hf_name(name)
}

/// Reads a GGUF model file.
pub fn read(path: &Path) -> Result<GgufModel> {
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such GGUF file"),
        ));
    }
    from_file(&GgufFile::open(path)?)
}

/// Maps an opened GGUF file onto a config, weights and vocabulary.
pub fn from_file(file: &GgufFile) -> Result<GgufModel> {
    let meta = Metadata { file };
    let arch_name = meta.string("general.architecture")?;
    let arch = Architecture::from_name(&arch_name).ok_or_else(|| Error::Gguf {
        path: file.path().to_path_buf(),
        message: format!("architecture `{arch_name}` is not supported from GGUF (llama, gemma3)"),
    })?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let heads = meta.positive(&key("attention.head_count"))?;
    let kv_heads = meta
        .positive_opt(&key("attention.head_count_kv"))?
        .unwrap_or(heads);
    let hidden = meta.positive(&key("embedding_length"))?;
    let mut vocab = read_vocab(&meta)?;
    vocab.architecture = Some(arch_name.clone());
    let tied = file.tensor("output.weight").is_none();

    let mut config = Map::new();
    let model_type = match arch {
        Architecture::Llama => "llama",
        Architecture::Gemma3 => "gemma3_text",
    };
    config.insert("model_type".into(), json!(model_type));
    config.insert("hidden_size".into(), json!(hidden));
    config.insert(
        "intermediate_size".into(),
        json!(meta.positive(&key("feed_forward_length"))?),
    );
    config.insert(
        "num_hidden_layers".into(),
        json!(meta.positive(&key("block_count"))?),
    );
    config.insert("num_attention_heads".into(), json!(heads));
    config.insert("num_key_value_heads".into(), json!(kv_heads));
    config.insert("vocab_size".into(), json!(vocab.tokens.len()));
    config.insert("tie_word_embeddings".into(), json!(tied));
    config.insert(
        "rms_norm_eps".into(),
        json!(meta.float(&key("attention.layer_norm_rms_epsilon"))?),
    );
    if let Some(theta) = meta.float_opt(&key("rope.freq_base"))? {
        config.insert("rope_theta".into(), json!(theta));
    }
    if let Some(context) = meta.positive_opt(&key("context_length"))? {
        config.insert("max_position_embeddings".into(), json!(context));
    }
    let head_dim = match arch {
        // llama.cpp writes the rotated dimensions, which is the head size for llama.
        Architecture::Llama => meta.positive_opt(&key("rope.dimension_count"))?,
        // Gemma 3's key length is its head size (Transformers reads it so).
        Architecture::Gemma3 => meta.positive_opt(&key("attention.key_length"))?,
    };
    if let Some(dims) = head_dim {
        config.insert("head_dim".into(), json!(dims));
    }
    if arch == Architecture::Gemma3 {
        if let Some(window) = meta.positive_opt(&key("attention.sliding_window"))? {
            config.insert("sliding_window".into(), json!(window));
        }
    }
    let head_dim = head_dim.unwrap_or(hidden / heads);
    if head_dim % 2 != 0
        || i64::from(head_dim) * i64::from(heads.max(kv_heads)) > i64::from(i32::MAX)
    {
        return Err(meta.error(
            &key("attention.head_count"),
            "heads × head size is not usable",
        ));
    }

    // Every name maps before any tensor is decoded.
    let mut mapped_names = HashMap::with_capacity(file.tensors.len());
    for info in &file.tensors {
        let Some(mapped) = arch.hf_name(&info.name) else {
            return Err(Error::GgufTensor {
                path: file.path().to_path_buf(),
                tensor: info.name.clone(),
                message: format!("unexpected tensor for architecture `{arch_name}`"),
            });
        };
        mapped_names.insert(info.name.as_str(), mapped);
    }
    let mut tensors = HashMap::with_capacity(file.tensors.len() * 2);
    decode_all(file, arch, |info, decoded, finite| {
        let mapped = &mapped_names[info.name.as_str()];
        if !finite {
            return Err(Error::NonFiniteWeight {
                path: file.path().to_path_buf(),
                name: mapped.clone(),
            });
        }
        let stem = mapped.strip_suffix(".weight").unwrap_or(mapped).to_owned();
        for (suffix, mut array) in to_arrays(info, decoded) {
            // llama.cpp stores llama's q/k rows interleaved for its pairwise RoPE; restore
            // the halves layout Transformers (and our RoPE) use. Whole rows move, so
            // packed weights, scales and biases stay valid.
            if arch == Architecture::Llama {
                let heads = if mapped.contains("self_attn.q_proj.") {
                    Some(heads)
                } else if mapped.contains("self_attn.k_proj.") {
                    Some(kv_heads)
                } else {
                    None
                };
                if let Some(heads) = heads {
                    if array.shape().first().map(|&r| i64::from(r))
                        != Some(i64::from(heads) * i64::from(head_dim))
                    {
                        return Err(Error::GgufTensor {
                            path: file.path().to_path_buf(),
                            tensor: info.name.clone(),
                            message: format!(
                                "shape {:?} does not hold {heads} heads of {head_dim} rows",
                                info.shape()
                            ),
                        });
                    }
                    array = unpermute_rows(&array, heads, head_dim)?;
                }
            }
            let name = match suffix {
                Some(suffix) => format!("{stem}.{suffix}"),
                None => mapped.clone(),
            };
            tensors.insert(name, array);
        }
        Ok(())
    })?;
    Ok(GgufModel {
        config: ConfigFile {
            path: file.path().to_path_buf(),
            value: Json::Object(config),
        },
        // Every float was checked as it was decoded.
        weights: Weights::new(tensors, file.path()).finite_checked(),
        vocab,
    })
}

/// A tensor decoded in Rust, before it becomes MLX arrays.
enum Decoded {
    Affine(quants::Affine),
    Dense(Vec<f32>),
}

impl Decoded {
    /// Whether every float (scale, bias, value) is finite: checked here, where it costs one
    /// pass over data already in cache, instead of by MLX after loading.
    fn is_finite(&self) -> bool {
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        match self {
            Decoded::Affine(a) => finite(&a.scales) && finite(&a.biases),
            Decoded::Dense(v) => finite(v),
        }
    }
}

/// Decodes one tensor's validated bytes: affine where lossless, else float32.
fn decode_raw(file: &GgufFile, info: &TensorInfo, arch: Architecture) -> Result<Decoded> {
    let bytes = file.tensor_bytes(info)?;
    let kind = info.ggml_type;
    if info.dims.len() == 2 && info.name.ends_with(".weight") {
        let (rows, cols) = (info.dims[1] as usize, info.dims[0] as usize);
        if let Some(affine) = quants::to_affine(kind, &bytes, rows, cols) {
            return Ok(Decoded::Affine(affine));
        }
    }
    let mut values =
        quants::dequantize(kind, &bytes).ok_or_else(|| Error::UnsupportedGgufType {
            path: file.path().to_path_buf(),
            tensor: info.name.clone(),
            ggml_type: format!("{kind:?}"),
        })?;
    if arch == Architecture::Gemma3 && info.name.ends_with("norm.weight") {
        // llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w.
        for v in &mut values {
            *v -= 1.0;
        }
    }
    Ok(Decoded::Dense(values))
}

/// The arrays of one decoded tensor: `[(None, dense)]`, or the affine
/// `weight`/`scales`/`biases`.
fn to_arrays(info: &TensorInfo, decoded: Decoded) -> Vec<(Option<&'static str>, Array)> {
    let shape = info.shape();
    match decoded {
        Decoded::Affine(affine) => {
            let packed = [shape[0], shape[1] * affine.bits / 32];
            let groups = [shape[0], shape[1] / affine.group_size];
            vec![
                (Some("weight"), Array::from_slice(&affine.weight, &packed)),
                (Some("scales"), Array::from_slice(&affine.scales, &groups)),
                (Some("biases"), Array::from_slice(&affine.biases, &groups)),
            ]
        }
        Decoded::Dense(values) => vec![(None, Array::from_slice(&values, &shape))],
    }
}

/// Decodes every tensor, on all cores, a batch of about 256 MB of file at a time (so the
/// decoded copies never hold much more than that beside the arrays); results in file order.
fn decode_all(
    file: &GgufFile,
    arch: Architecture,
    mut emit: impl FnMut(&TensorInfo, Decoded, bool) -> Result<()>,
) -> Result<()> {
    const BATCH_BYTES: u64 = 256 << 20;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rest = file.tensors.as_slice();
    while !rest.is_empty() {
        let mut bytes = 0;
        let take = rest
            .iter()
            .take_while(|t| {
                let fits = bytes == 0 || bytes + t.len <= BATCH_BYTES;
                bytes += t.len;
                fits
            })
            .count()
            .max(1);
        let (batch, next) = rest.split_at(take);
        rest = next;
        let mut results: Vec<Option<Result<(Decoded, bool)>>> =
            (0..batch.len()).map(|_| None).collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers.min(batch.len()))
                .map(|w| {
                    scope.spawn(move || {
                        (w..batch.len())
                            .step_by(workers)
                            .map(|i| {
                                let decoded = decode_raw(file, &batch[i], arch);
                                let finite = decoded.as_ref().is_ok_and(Decoded::is_finite);
                                (i, decoded.map(|d| (d, finite)))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for handle in handles {
                // A worker only panics on a bug; surface it as one.
                for (i, result) in handle.join().unwrap_or_default() {
                    results[i] = Some(result);
                }
            }
        });
        for (info, result) in batch.iter().zip(results) {
            let (decoded, finite) = result.ok_or_else(|| Error::GgufTensor {
                path: file.path().to_path_buf(),
                tensor: info.name.clone(),
                message: "its decoding thread failed".into(),
            })??;
            emit(info, decoded, finite)?;
        }
    }
    Ok(())
}

/// Undoes llama.cpp's q/k row order: per head, llama.cpp interleaves the two halves
/// (`[h, d/2, 2]` rows) where Transformers keeps them apart (`[h, 2, d/2]`). Rows are
/// permuted whole, so quantized weights, scales and biases stay valid.
pub fn unpermute_rows(w: &Array, heads: i32, head_dim: i32) -> Result<Array> {
    transpose_within_heads(w, heads, [head_dim / 2, 2])
}

/// The inverse of [`unpermute_rows`]: how llama.cpp's converter lays rows out.
pub fn permute_rows(w: &Array, heads: i32, head_dim: i32) -> Result<Array> {
    transpose_within_heads(w, heads, [2, head_dim / 2])
}

/// Views each head's rows as an `[a, b]` grid and transposes it to `[b, a]`.
fn transpose_within_heads(w: &Array, heads: i32, [a, b]: [i32; 2]) -> Result<Array> {
    let shape = w.shape().to_vec();
    let mut split = vec![heads, a, b];
    split.extend(&shape[1..]);
    Ok(w.reshape(&split)?.swap_axes(1, 2)?.reshape(&shape)?)
}

fn read_vocab(meta: &Metadata) -> Result<VocabSpec> {
    let id = |key: &str| -> Result<Option<u32>> { meta.u32_opt(key) };
    Ok(VocabSpec {
        model: meta.string("tokenizer.ggml.model")?,
        pre: meta.string_opt("tokenizer.ggml.pre")?,
        architecture: None,
        tokens: meta.strings("tokenizer.ggml.tokens")?,
        scores: meta.numbers_opt("tokenizer.ggml.scores", |v| v.as_f64().map(|x| x as f32))?,
        token_types: meta.numbers_opt("tokenizer.ggml.token_type", |v| {
            v.as_i128().and_then(|x| i32::try_from(x).ok())
        })?,
        merges: meta.strings_opt("tokenizer.ggml.merges")?,
        bos_token_id: id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: id("tokenizer.ggml.eos_token_id")?,
        eot_token_id: id("tokenizer.ggml.eot_token_id")?,
        unk_token_id: id("tokenizer.ggml.unknown_token_id")?,
        pad_token_id: id("tokenizer.ggml.padding_token_id")?,
        add_bos_token: meta.bool_opt("tokenizer.ggml.add_bos_token")?,
        add_eos_token: meta.bool_opt("tokenizer.ggml.add_eos_token")?,
        chat_template: meta.string_opt("tokenizer.chat_template")?,
    })
}

/// Typed access to the metadata, naming the key on error.
struct Metadata<'a> {
    file: &'a GgufFile,
}

impl Metadata<'_> {
    fn error(&self, key: &str, message: &str) -> Error {
        Error::GgufMetadata {
            path: self.file.path().to_path_buf(),
            key: key.to_owned(),
            message: message.to_owned(),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> Error {
        self.error(
            key,
            &format!("expected {expected}, found a {}", found.type_name()),
        )
    }

    fn string_opt(&self, key: &str) -> Result<Option<String>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    fn string(&self, key: &str) -> Result<String> {
        self.string_opt(key)?
            .ok_or_else(|| self.error(key, "missing"))
    }

    fn strings_opt(&self, key: &str) -> Result<Option<Vec<String>>> {
        self.numbers_opt(key, |v| match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        })
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.strings_opt(key)?
            .ok_or_else(|| self.error(key, "missing"))
    }

    /// An array whose every item `item` accepts.
    fn numbers_opt<T>(
        &self,
        key: &str,
        item: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(Value::Array(values)) => values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    item(v).ok_or_else(|| {
                        self.error(key, &format!("item {i} is an unexpected {}", v.type_name()))
                    })
                })
                .collect::<Result<Vec<T>>>()
                .map(Some),
            Some(other) => Err(self.wrong_type(key, "an array", other)),
        }
    }

    fn float_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                Some(x) => Err(self.error(key, &format!("{x} is not finite"))),
                None => Err(self.wrong_type(key, "a number", v)),
            },
        }
    }

    fn float(&self, key: &str) -> Result<f64> {
        self.float_opt(key)?
            .ok_or_else(|| self.error(key, "missing"))
    }

    fn integer_opt(&self, key: &str) -> Result<Option<i128>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i128()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "an integer", v)),
        }
    }

    fn u32_opt(&self, key: &str) -> Result<Option<u32>> {
        self.integer_opt(key)?
            .map(|v| {
                u32::try_from(v).map_err(|_| self.error(key, &format!("{v} is not a token id")))
            })
            .transpose()
    }

    /// A size: an integer from 1 to `i32::MAX`.
    fn positive_opt(&self, key: &str) -> Result<Option<i32>> {
        self.integer_opt(key)?
            .map(|v| {
                i32::try_from(v)
                    .ok()
                    .filter(|&v| v > 0)
                    .ok_or_else(|| self.error(key, &format!("{v} is not a positive size")))
            })
            .transpose()
    }

    fn positive(&self, key: &str) -> Result<i32> {
        self.positive_opt(key)?
            .ok_or_else(|| self.error(key, "missing"))
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.file.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => match v.as_i128() {
                Some(i) => Ok(Some(i != 0)),
                None => Err(self.wrong_type(key, "a bool", v)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::random;

    #[test]
    fn tensor_names_map_to_transformers_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.scales").as_deref(),
            Some("model.layers.0.mlp.down_proj.scales")
        );
        assert_eq!(
            hf_name("token_embd.biases").as_deref(),
            Some("model.embed_tokens.biases")
        );
        assert_eq!(
            hf_name("output_norm.weight").as_deref(),
            Some("model.norm.weight")
        );
        assert_eq!(hf_name("blk.0.unknown.weight"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        // Gemma 3's extra norms; llama has none of them.
        let gemma = Architecture::Gemma3;
        for (gguf, hf) in [
            (
                "blk.2.ffn_norm.weight",
                "model.layers.2.pre_feedforward_layernorm.weight",
            ),
            (
                "blk.2.post_ffw_norm.weight",
                "model.layers.2.post_feedforward_layernorm.weight",
            ),
            (
                "blk.2.post_attention_norm.weight",
                "model.layers.2.post_attention_layernorm.weight",
            ),
            (
                "blk.2.attn_q_norm.weight",
                "model.layers.2.self_attn.q_norm.weight",
            ),
            (
                "blk.2.attn_k_norm.weight",
                "model.layers.2.self_attn.k_norm.weight",
            ),
        ] {
            assert_eq!(gemma.hf_name(gguf).as_deref(), Some(hf));
        }
        assert_eq!(hf_name("blk.2.post_ffw_norm.weight"), None);
        assert_eq!(
            hf_name("blk.2.ffn_norm.weight").as_deref(),
            Some("model.layers.2.post_attention_layernorm.weight")
        );
    }

    /// llama.cpp permutes q/k rows so that its pairwise RoPE equals Transformers'
    /// halves RoPE; undoing the permutation must restore exactly that equivalence:
    /// unpermute(rope_pairwise(x Wᵍᵍᵘᶠᵀ)) == rope_halves(x Wᵀ).
    #[test]
    fn unpermuted_rows_give_transformers_rope() {
        let (heads, head_dim, hidden, len) = (3, 8, 12, 5);
        let key = random::key(3).unwrap();
        let w = random::normal::<f32>(&[heads * head_dim, hidden], None, None, Some(&key)).unwrap();
        let x = random::normal::<f32>(
            &[1, len, hidden],
            None,
            None,
            Some(&random::key(4).unwrap()),
        )
        .unwrap();
        let gguf_w = permute_rows(&w, heads, head_dim).unwrap();
        assert_eq!(
            unpermute_rows(&gguf_w, heads, head_dim)
                .unwrap()
                .as_slice::<f32>(),
            w.as_slice::<f32>()
        );

        let project = |w: &Array| -> Array {
            x.matmul(w.t())
                .unwrap()
                .reshape(&[1, len, heads, head_dim])
                .unwrap()
                .swap_axes(1, 2)
                .unwrap()
        };
        let halves =
            mlx_rs::fast::rope(project(&w), head_dim, false, 10_000.0, 1.0, 3, None).unwrap();
        let pairs =
            mlx_rs::fast::rope(project(&gguf_w), head_dim, true, 10_000.0, 1.0, 3, None).unwrap();
        // Back to rows: [len, heads*head_dim] with each head's features in llama.cpp order.
        let rows = |a: Array| {
            a.swap_axes(1, 2)
                .unwrap()
                .reshape(&[len, heads * head_dim])
                .unwrap()
        };
        let restored = unpermute_rows(&rows(pairs).t(), heads, head_dim)
            .unwrap()
            .t();
        let expected = rows(halves);
        let diff = restored
            .subtract(&expected)
            .unwrap()
            .abs()
            .unwrap()
            .max(None)
            .unwrap();
        assert!(
            diff.item_exact::<f32>() < 1e-5,
            "max difference {}",
            diff.item_exact::<f32>()
        );
        // Without undoing the permutation, the two layouts disagree.
        let wrong =
            mlx_rs::fast::rope(project(&gguf_w), head_dim, false, 10_000.0, 1.0, 3, None).unwrap();
        let wrong = rows(wrong)
            .subtract(&expected)
            .unwrap()
            .abs()
            .unwrap()
            .max(None)
            .unwrap();
        assert!(wrong.item_exact::<f32>() > 1e-2);
    }
}
