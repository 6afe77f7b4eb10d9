//! GGUF files (llama.cpp's format): weights stay quantized (MLX reads Q4_0/Q4_1/Q8_0 as
//! its affine quantization), the config comes from the metadata, and so do the
//! tokenizer and chat template.

use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::tokenizer::VocabSpec;
use crate::weights::Weights;
use mlx_rs::io::{GgufFile, GgufMetadataValue};
use mlx_rs::{Array, Dtype};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;

/// What a GGUF file holds, mapped to the names our modules use.
pub struct GgufModel {
    pub config: ConfigFile,
    pub weights: Weights,
    /// The tokenizer and chat template from the metadata (`tokenizer.*`).
    pub vocab: VocabSpec,
}

/// Reads a GGUF model file.
pub fn read(path: &Path) -> Result<GgufModel> {
    let bad = |message: String| Error::Gguf {
        path: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such GGUF file"),
        ));
    }
    let file = GgufFile::load(path).map_err(|e| bad(e.to_string()))?;
    let meta = Metadata { file: &file, path };

    let arch = meta.string("general.architecture")?;
    if arch != "llama" {
        return Err(bad(format!(
            "architecture `{arch}` is not supported from GGUF (llama only)"
        )));
    }
    let heads = meta.int(&format!("{arch}.attention.head_count"))?;
    let kv_heads = meta
        .int_opt(&format!("{arch}.attention.head_count_kv"))?
        .unwrap_or(heads);
    let hidden = meta.int(&format!("{arch}.embedding_length"))?;
    let mut vocab = read_vocab(&meta)?;
    vocab.architecture = Some(arch.clone());
    let arrays = file.arrays().map_err(|e| bad(e.to_string()))?;
    let tied = !arrays.contains_key("output.weight");

    let mut config = Map::new();
    config.insert("model_type".into(), json!("llama"));
    config.insert("hidden_size".into(), json!(hidden));
    config.insert(
        "intermediate_size".into(),
        json!(meta.int(&format!("{arch}.feed_forward_length"))?),
    );
    config.insert(
        "num_hidden_layers".into(),
        json!(meta.int(&format!("{arch}.block_count"))?),
    );
    config.insert("num_attention_heads".into(), json!(heads));
    config.insert("num_key_value_heads".into(), json!(kv_heads));
    config.insert("vocab_size".into(), json!(vocab.tokens.len()));
    config.insert("tie_word_embeddings".into(), json!(tied));
    config.insert(
        "rms_norm_eps".into(),
        json!(meta.float(&format!("{arch}.attention.layer_norm_rms_epsilon"))?),
    );
    if let Some(theta) = meta.float_opt(&format!("{arch}.rope.freq_base"))? {
        config.insert("rope_theta".into(), json!(theta));
    }
    if let Some(context) = meta.int_opt(&format!("{arch}.context_length"))? {
        config.insert("max_position_embeddings".into(), json!(context));
    }
    if let Some(dims) = meta.int_opt(&format!("{arch}.rope.dimension_count"))? {
        config.insert("head_dim".into(), json!(dims));
    }
    let head_dim = meta
        .int_opt(&format!("{arch}.rope.dimension_count"))?
        .unwrap_or(hidden / heads);

    let mut tensors = HashMap::with_capacity(arrays.len());
    for (name, array) in arrays {
        let Some(mapped) = hf_name(&name) else {
            return Err(bad(format!("unexpected tensor `{name}`")));
        };
        // llama.cpp stores q/k rows interleaved for its pairwise RoPE; restore the halves
        // layout Transformers (and our RoPE) use.
        let array = if mapped.contains("self_attn.q_proj.") {
            unpermute_rows(&array, heads as i32, head_dim as i32)?
        } else if mapped.contains("self_attn.k_proj.") {
            unpermute_rows(&array, kv_heads as i32, head_dim as i32)?
        } else {
            array
        };
        tensors.insert(mapped, array);
    }
    Ok(GgufModel {
        config: ConfigFile {
            path: path.to_path_buf(),
            value: Value::Object(config),
        },
        weights: Weights::new(tensors, path),
        vocab,
    })
}

/// The Transformers name of a llama.cpp tensor name (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`); quantized tensors come with `.scales` and
/// `.biases` siblings, mapped alike.
pub fn hf_name(name: &str) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    let mapped = match stem {
        "token_embd" => "model.embed_tokens".to_owned(),
        "output_norm" => "model.norm".to_owned(),
        "output" => "lm_head".to_owned(),
        _ => {
            let rest = stem.strip_prefix("blk.")?;
            let (layer, part) = rest.split_once('.')?;
            let module = match part {
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                _ => return None,
            };
            format!("model.layers.{layer}.{module}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
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
    let numbers = |key: &str, dtype: Dtype| -> Result<Option<Array>> {
        meta.array_opt(key)?
            .map(|a| Ok(a.as_dtype(dtype)?))
            .transpose()
    };
    let id = |key: &str| -> Result<Option<u32>> { Ok(meta.int_opt(key)?.map(|v| v as u32)) };
    let flag = |key: &str| -> Result<Option<bool>> { Ok(meta.int_opt(key)?.map(|v| v != 0)) };
    Ok(VocabSpec {
        model: meta.string("tokenizer.ggml.model")?,
        pre: meta.string_opt("tokenizer.ggml.pre")?,
        architecture: None,
        tokens: meta.strings("tokenizer.ggml.tokens")?,
        scores: numbers("tokenizer.ggml.scores", Dtype::Float32)?
            .map(|a| a.as_slice::<f32>().to_vec()),
        token_types: numbers("tokenizer.ggml.token_type", Dtype::Int32)?
            .map(|a| a.as_slice::<i32>().to_vec()),
        merges: meta.strings_opt("tokenizer.ggml.merges")?,
        bos_token_id: id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: id("tokenizer.ggml.eos_token_id")?,
        eot_token_id: id("tokenizer.ggml.eot_token_id")?,
        unk_token_id: id("tokenizer.ggml.unknown_token_id")?,
        pad_token_id: id("tokenizer.ggml.padding_token_id")?,
        add_bos_token: flag("tokenizer.ggml.add_bos_token")?,
        add_eos_token: flag("tokenizer.ggml.add_eos_token")?,
        chat_template: meta.string_opt("tokenizer.chat_template")?,
    })
}

struct Metadata<'a> {
    file: &'a GgufFile,
    path: &'a Path,
}

impl Metadata<'_> {
    fn error(&self, key: &str, message: &str) -> Error {
        Error::Gguf {
            path: self.path.to_path_buf(),
            message: format!("metadata `{key}`: {message}"),
        }
    }

    fn get(&self, key: &str) -> Result<Option<GgufMetadataValue>> {
        self.file
            .get_metadata(key)
            .map_err(|e| self.error(key, &e.to_string()))
    }

    fn string_opt(&self, key: &str) -> Result<Option<String>> {
        match self.get(key)? {
            None => Ok(None),
            Some(GgufMetadataValue::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.error(key, "expected a string")),
        }
    }

    fn string(&self, key: &str) -> Result<String> {
        self.string_opt(key)?
            .ok_or_else(|| self.error(key, "missing"))
    }

    fn strings_opt(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key)? {
            None => Ok(None),
            Some(GgufMetadataValue::Strings(s)) => Ok(Some(s)),
            Some(_) => Err(self.error(key, "expected a list of strings")),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.strings_opt(key)?
            .ok_or_else(|| self.error(key, "missing"))
    }

    fn array_opt(&self, key: &str) -> Result<Option<Array>> {
        match self.get(key)? {
            None => Ok(None),
            Some(GgufMetadataValue::Array(a)) => Ok(Some(a)),
            Some(_) => Err(self.error(key, "expected a number or numeric list")),
        }
    }

    fn float_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.array_opt(key)? {
            None => Ok(None),
            Some(a) if a.size() == 1 => Ok(Some(f64::from(
                a.as_dtype(Dtype::Float32)?.as_slice::<f32>()[0],
            ))),
            Some(_) => Err(self.error(key, "expected a single number")),
        }
    }

    fn float(&self, key: &str) -> Result<f64> {
        self.float_opt(key)?
            .ok_or_else(|| self.error(key, "missing"))
    }

    fn int_opt(&self, key: &str) -> Result<Option<i64>> {
        match self.array_opt(key)? {
            None => Ok(None),
            Some(a) if a.size() == 1 => Ok(Some(a.as_dtype(Dtype::Int64)?.as_slice::<i64>()[0])),
            Some(_) => Err(self.error(key, "expected a single integer")),
        }
    }

    fn int(&self, key: &str) -> Result<i64> {
        self.int_opt(key)?.ok_or_else(|| self.error(key, "missing"))
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
