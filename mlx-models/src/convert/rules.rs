//! Which tensors a conversion quantizes and how: the rules of Python mlx-lm's converter
//! (`mlx_lm.convert` → `mlx_lm.utils.quantize_model`, mlx-lm 0.32.2), so the same source
//! and settings give the same weights. Checked against mlx-lm's own output on committed
//! fixtures (`tests/fixtures/mlx-lm-convert/reference.json`, tests/convert_mlx_lm.rs).
//!
//! What mlx-lm does, read from its source:
//! - Layout: weights are brought to mlx-lm's module names first; per-expert tensors
//!   (`<prefix>.experts.<i>.<proj>`, Mixtral's `w1`/`w2`/`w3` included) are stacked into
//!   `<prefix>.switch_mlp.{gate,up,down}_proj` (`[experts, out, in]`), the tied output
//!   layer and `rotary_emb.inv_freq` are dropped.
//! - Cast: without `--dtype`, floating-point parameters are cast to config.json's
//!   `torch_dtype` (else `text_config.dtype`) when it names float16, bfloat16 or float32
//!   (Transformers 5's top-level `dtype` is not read). Some models keep parameters out of
//!   the cast (`cast_predicate`): the routers' `e_score_correction_bias` (DeepSeek-V3,
//!   Kimi K2, GLM-4 MoE, MiniMax, LongCat), `A_log` (Qwen 3.5).
//! - Quantized: the weight of every module that has a quantized form (linear layers,
//!   embeddings, stacked experts) whose last dimension divides into groups of the chosen
//!   size; not norms, convolutions, or routers stored as a bare parameter (the `MoEGate` of
//!   DeepSeek-V2/V3 and GLM-4 MoE). A linear layer's own bias stays floating point.
//! - Per model (`quant_predicate`): routers, and for Granite the output projections, are
//!   kept at 8 bits in groups of 64; config.json's `quantization` block then names each
//!   such module with its parameters.
//! - Affine mode; `scales` and `biases` take the weight's floating-point type.

use crate::error::{Error, Result};
use crate::moe::{split_fused_experts, stack_experts};
use crate::nn::Quantization;
use crate::transformer::drop_computed_weights;
use crate::weights::{is_float, Weights};
use mlx_rs::{Array, Dtype};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

/// The bits and group size mlx-lm's `quant_predicate`s give the modules they keep more
/// precise.
const KEPT_PRECISE: Quantization = Quantization {
    bits: 8,
    group_size: 64,
};

/// mlx-lm's name for a `model_type` (its `MODEL_REMAPPING`, for the types we load).
fn mlx_lm_model_type(model_type: &str) -> &str {
    match model_type {
        "mistral" => "llama",
        "falcon_mamba" => "mamba",
        "kimi_k2" => "deepseek_v3",
        "minimax_m2" => "minimax",
        "qwen3_5_text" => "qwen3_5",
        other => other,
    }
}

/// How a conversion quantizes the tensors of one model.
#[derive(Debug, Clone)]
pub struct QuantizationRules {
    model_type: String,
    /// `granitemoehybrid`'s `use_moe`, Qwen 3.5's `num_experts > 0`: whether the family's
    /// router rule applies.
    has_routers: bool,
    default: Quantization,
}

impl QuantizationRules {
    /// The rules for the model config.json `config` describes, quantizing to `default`.
    pub fn new(config: &Value, default: Quantization) -> Self {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let text = config.get("text_config").unwrap_or(config);
        let has_routers = match model_type {
            "granitemoehybrid" => config
                .get("num_local_experts")
                .and_then(Value::as_i64)
                .is_some_and(|n| n > 0),
            "qwen3_5" | "qwen3_5_text" => text
                .get("num_experts")
                .and_then(Value::as_i64)
                .is_some_and(|n| n > 0),
            _ => true,
        };
        QuantizationRules {
            model_type: mlx_lm_model_type(model_type).to_owned(),
            has_routers,
            default,
        }
    }

    /// Whether `module`'s `weight` is a module mlx-lm can quantize (a linear layer, an
    /// embedding or stacked experts), as opposed to a norm, a convolution or a bare
    /// parameter.
    fn is_quantizable_module(&self, module: &str, weight: &Array) -> bool {
        let bare_router = matches!(
            self.model_type.as_str(),
            "deepseek_v2" | "deepseek_v3" | "glm4_moe" | "glm4_moe_lite"
        ) && module.ends_with(".mlp.gate");
        is_float(weight.dtype())
            && match weight.ndim() {
                2 => !bare_router,
                // Stacked experts; latent attention's per-head projections.
                3 => {
                    module.contains(".switch_mlp.")
                        || module.ends_with(".embed_q")
                        || module.ends_with(".unembed_out")
                }
                _ => false,
            }
    }

    /// The family's `quant_predicate`: the parameters for `module` when it keeps it more
    /// precise than the default.
    fn kept_precise(&self, module: &str) -> bool {
        let ends = |suffix: &str| module.ends_with(suffix);
        match self.model_type.as_str() {
            "qwen3_moe" => ends("mlp.gate"),
            "qwen3_next" => ends("mlp.gate") || ends("shared_expert_gate"),
            "qwen3_5" => self.has_routers && (ends("mlp.gate") || ends("shared_expert_gate")),
            "gpt_oss" | "jamba" => ends("router"),
            "granite" => ends("self_attn.o_proj") || ends("mlp.down_proj") || module == "lm_head",
            "granitemoe" => {
                ends("block_sparse_moe.router.layer")
                    || ends("self_attn.o_proj")
                    || ends("mlp.down_proj")
                    || module == "lm_head"
            }
            "granitemoehybrid" => self.has_routers && ends("router.layer"),
            "minimax" => ends("block_sparse_moe.gate"),
            "longcat_flash" => ends("classifier"),
            _ => false,
        }
    }

    /// How `module.weight` (`weight`) is quantized, or `None` when it stays floating point.
    /// A module the family keeps at 8 bits whose rows do not divide into groups of 64 is
    /// an error, as in mlx-lm.
    pub fn quantization(&self, module: &str, weight: &Array) -> Result<Option<Quantization>> {
        if self.default.group_size <= 0
            || !self.is_quantizable_module(module, weight)
            || weight.dim(-1) % self.default.group_size != 0
        {
            return Ok(None);
        }
        if !self.kept_precise(module) {
            return Ok(Some(self.default));
        }
        if weight.dim(-1) % KEPT_PRECISE.group_size != 0 {
            return Err(Error::Convert {
                message: format!(
                    "`{module}` is kept at {} bits in groups of {} (as mlx-lm does), but its \
                     rows of {} do not divide into such groups",
                    KEPT_PRECISE.bits,
                    KEPT_PRECISE.group_size,
                    weight.dim(-1)
                ),
            });
        }
        Ok(Some(KEPT_PRECISE))
    }

    /// config.json's `quantization` block for a model whose modules were quantized as
    /// `quantized` lists them: the default, and each module that differs from it.
    pub fn config_block<'a>(
        &self,
        quantized: impl IntoIterator<Item = (&'a str, Quantization)>,
    ) -> Value {
        let mut block = Map::new();
        block.insert("group_size".into(), json!(self.default.group_size));
        block.insert("bits".into(), json!(self.default.bits));
        block.insert("mode".into(), json!("affine"));
        for (module, q) in quantized {
            if q != self.default {
                block.insert(
                    module.to_owned(),
                    json!({"group_size": q.group_size, "bits": q.bits}),
                );
            }
        }
        Value::Object(block)
    }
}

/// Whether mlx-lm's cast to the conversion dtype applies to parameter `name` of a model of
/// `model_type` (its `cast_predicate`).
pub fn is_cast(model_type: &str, name: &str) -> bool {
    match mlx_lm_model_type(model_type) {
        "deepseek_v3" | "glm4_moe" | "glm4_moe_lite" | "minimax" | "longcat_flash" => {
            !name.contains("e_score_correction_bias")
        }
        "qwen3_5" => !name.ends_with("A_log"),
        _ => true,
    }
}

/// The dtype mlx-lm's converter casts floating-point parameters to when none is asked
/// for: config.json's `torch_dtype`, else `text_config.dtype`, if float16, bfloat16 or
/// float32.
pub fn default_dtype(config: &Value) -> Option<Dtype> {
    let named = config
        .get("torch_dtype")
        .filter(|v| !v.is_null())
        .or_else(|| config.get("text_config").and_then(|t| t.get("dtype")))
        .and_then(Value::as_str)?;
    match named {
        "float16" => Some(Dtype::Float16),
        "bfloat16" => Some(Dtype::Bfloat16),
        "float32" => Some(Dtype::Float32),
        _ => None,
    }
}

/// Brings Hugging Face weights to mlx-lm's layout where its models differ in a way that
/// decides what is written: per-expert tensors stacked into `switch_mlp` (Mixtral's
/// `w1`/`w2`/`w3` as `gate_proj`/`down_proj`/`up_proj`; Granite's fused `input_linear`
/// split), DeepSeek-V3's and GLM-4 MoE Lite's `kv_b_proj` split into `embed_q` and
/// `unembed_out`, depthwise convolutions
/// (`conv1d`, `conv_1d`) from PyTorch's `[channels, 1, kernel]` to MLX's `[channels,
/// kernel, 1]`, and what mlx-lm drops (the output layer of a model with tied embeddings,
/// `rotary_emb.inv_freq`).
pub fn to_mlx_lm_layout(weights: &mut Weights, config: &Value) -> Result<()> {
    let text = config.get("text_config").unwrap_or(config);
    let field = |name: &str| {
        [text, config]
            .iter()
            .find_map(|v| v.get(name).and_then(Value::as_i64))
    };
    let tie_word_embeddings = [text, config]
        .iter()
        .find_map(|v| v.get("tie_word_embeddings").and_then(Value::as_bool))
        .unwrap_or(false);
    drop_computed_weights(weights, tie_word_embeddings);
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if matches!(
        mlx_lm_model_type(model_type),
        "deepseek_v3" | "glm4_moe_lite"
    ) {
        if let (Some(heads), Some(nope), Some(v)) = (
            field("num_attention_heads"),
            field("qk_nope_head_dim"),
            field("v_head_dim"),
        ) {
            split_kv_b_proj(weights, heads as i32, nope as i32, v as i32)?;
        }
    }
    let convolutions: Vec<String> = weights
        .names()
        .filter(|n| n.ends_with("conv1d.weight") || n.ends_with("conv_1d.weight"))
        .map(str::to_owned)
        .collect();
    let mut transposed = false;
    for name in convolutions {
        let tensor = weights.remove(&name).expect("listed above");
        let tensor = if tensor.ndim() == 3 && tensor.dim(-1) != 1 {
            transposed = true;
            tensor.swap_axes(1, 2)?
        } else {
            tensor
        };
        weights.insert(name, tensor);
    }
    // What else mlx-lm's sanitize does along with the conv transposition, and what the
    // loaders expect of weights in that layout: Qwen3-Next's and Qwen3.5's `1 + w` norms
    // stored with the 1 added, Falcon-H1's multipliers folded into the weight matrices.
    if transposed {
        match model_type {
            t if crate::norm::MLX_LM_FOLDS_PLUS_ONE_NORMS.contains(&t) => {
                crate::norm::fold_mlx_lm_norms(t, weights)?
            }
            "falcon_h1" => {
                let file = crate::config::ConfigFile {
                    path: weights.source().join("config.json"),
                    value: config.clone(),
                };
                crate::models::falcon_h1::fold_as_mlx_lm(weights, &file)?
            }
            _ => {}
        }
    }
    if let Some(layout) = crate::models::checkpoint_layout(model_type) {
        let file = crate::config::ConfigFile {
            path: weights.source().join("config.json"),
            value: config.clone(),
        };
        layout(&file, weights)?;
    }
    if model_type == "gpt2" {
        // mlx-lm's GPT-2: linear layers where the checkpoint has Conv1D, names under `model.`.
        crate::models::gpt2::to_mlx_lm_layout(weights)?;
    }
    split_granite_experts(weights)?;
    // Transformers 5's fused experts (`experts.gate_up_proj`, `[experts, 2·inter,
    // hidden]`), which mlx-lm 0.32.2 does not read, stacked the same way so they are
    // quantized like per-expert checkpoints. gpt-oss and Llama 4 fuse theirs differently
    // (`[experts, hidden, 2·inter]`) and keep them.
    if !matches!(model_type, "gpt_oss" | "llama4" | "llama4_text") {
        split_fused_experts(weights)?;
    }
    let experts: BTreeSet<i32> = weights
        .names()
        .filter_map(|name| {
            let at = name.find(".experts.")?;
            name[at + ".experts.".len()..]
                .split('.')
                .next()?
                .parse::<i32>()
                .ok()
        })
        .collect();
    // Stacked when every expert has every projection (LongCat's zero-computation experts
    // have none: its own loader handles them).
    let complete = experts.last().is_some_and(|&last| {
        let count = |proj: &str| {
            weights
                .names()
                .filter(|n| n.contains(".experts.") && n.contains(&format!(".{proj}.")))
                .count()
        };
        let per_proj: BTreeSet<usize> = ["w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"]
            .into_iter()
            .map(count)
            .filter(|&c| c > 0)
            .collect();
        per_proj.len() == 1
            && per_proj
                .first()
                .is_some_and(|&c| c % (last as usize + 1) == 0)
    });
    if let (true, Some(&last)) = (complete, experts.last()) {
        stack_experts(
            weights,
            "experts",
            last + 1,
            &[
                ("w1", "gate_proj"),
                ("w2", "down_proj"),
                ("w3", "up_proj"),
                ("gate_proj", "gate_proj"),
                ("up_proj", "up_proj"),
                ("down_proj", "down_proj"),
            ],
        )?;
    }
    Ok(())
}

/// Multi-head latent attention's `kv_b_proj` (`[heads·(nope + v), kv_lora_rank]`) as
/// mlx-lm's DeepSeek-V3 and GLM-4 MoE Lite store it: per head, the key half transposed
/// (`embed_q`, `[heads, kv_lora_rank, nope]`) and the value half (`unembed_out`, `[heads,
/// v, kv_lora_rank]`).
fn split_kv_b_proj(weights: &mut Weights, heads: i32, nope: i32, v: i32) -> Result<()> {
    let names: Vec<String> = weights
        .names()
        .filter(|n| n.ends_with(".kv_b_proj.weight"))
        .map(str::to_owned)
        .collect();
    for name in names {
        let prefix = name.trim_end_matches(".kv_b_proj.weight").to_owned();
        let tensor = weights.remove(&name).expect("listed above");
        if tensor.ndim() != 2 || tensor.dim(0) != heads * (nope + v) {
            return Err(Error::WeightShape {
                path: weights.source().to_path_buf(),
                name,
                expected: vec![heads * (nope + v), -1],
                actual: tensor.shape().to_vec(),
            });
        }
        let per_head = tensor.reshape(&[heads, nope + v, -1])?;
        let parts = per_head.split_at_indices(&[nope], 1)?;
        weights.insert(
            format!("{prefix}.embed_q.weight"),
            parts[0].swap_axes(1, 2)?.contiguous()?,
        );
        weights.insert(
            format!("{prefix}.unembed_out.weight"),
            parts[1].contiguous()?,
        );
    }
    Ok(())
}

/// Granite MoE's fused experts as mlx-lm stacks them: `block_sparse_moe.input_linear`
/// (`[experts, 2·inter, hidden]`, gate rows first) into `switch_mlp.gate_proj` and
/// `up_proj`, `output_linear` into `switch_mlp.down_proj`.
fn split_granite_experts(weights: &mut Weights) -> Result<()> {
    let fused: Vec<String> = weights
        .names()
        .filter(|n| n.ends_with(".block_sparse_moe.input_linear.weight"))
        .map(str::to_owned)
        .collect();
    for name in fused {
        let prefix = name.trim_end_matches(".input_linear.weight").to_owned();
        let tensor = weights.remove(&name).expect("listed above");
        if tensor.ndim() != 3 || tensor.dim(1) % 2 != 0 {
            return Err(Error::WeightShape {
                path: weights.source().to_path_buf(),
                name,
                expected: vec![-1, 2 * (tensor.dim(1) / 2), -1],
                actual: tensor.shape().to_vec(),
            });
        }
        let parts = tensor.split_equal(2, 1)?;
        weights.insert(
            format!("{prefix}.switch_mlp.gate_proj.weight"),
            parts[0].clone(),
        );
        weights.insert(
            format!("{prefix}.switch_mlp.up_proj.weight"),
            parts[1].clone(),
        );
        if let Some(down) = weights.remove(&format!("{prefix}.output_linear.weight")) {
            weights.insert(format!("{prefix}.switch_mlp.down_proj.weight"), down);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(config: Value) -> QuantizationRules {
        QuantizationRules::new(
            &config,
            Quantization {
                bits: 4,
                group_size: 32,
            },
        )
    }

    fn zeros(shape: &[i32]) -> Array {
        mlx_rs::ops::zeros::<f32>(shape).unwrap()
    }

    #[test]
    fn linear_and_embedding_weights_are_quantized_when_their_rows_divide_into_groups() {
        let r = rules(json!({"model_type": "llama"}));
        let q = |name: &str, shape: &[i32]| r.quantization(name, &zeros(shape)).unwrap();
        assert_eq!(q("model.embed_tokens", &[256, 64]).map(|q| q.bits), Some(4));
        assert_eq!(q("model.layers.0.mlp.down_proj", &[64, 48]), None);
        assert_eq!(q("model.layers.0.input_layernorm", &[64]), None);
        // A convolution is not a linear layer even with rows that divide.
        assert_eq!(q("model.layers.0.conv1d", &[64, 1, 64]), None);
        assert!(q("model.layers.0.mlp.switch_mlp.up_proj", &[4, 8, 64]).is_some());
    }

    #[test]
    fn routers_follow_each_family() {
        let router = zeros(&[4, 64]);
        let of = |model_type: &str, name: &str| {
            rules(json!({"model_type": model_type}))
                .quantization(name, &router)
                .unwrap()
                .map(|q| (q.bits, q.group_size))
        };
        assert_eq!(
            of("mixtral", "model.layers.0.block_sparse_moe.gate"),
            Some((4, 32))
        );
        assert_eq!(of("qwen3_moe", "model.layers.0.mlp.gate"), Some((8, 64)));
        assert_eq!(of("deepseek_v3", "model.layers.1.mlp.gate"), None);
        assert_eq!(of("kimi_k2", "model.layers.1.mlp.gate"), None);
        assert_eq!(
            of("minimax_m2", "model.layers.0.block_sparse_moe.gate"),
            Some((8, 64))
        );
        assert_eq!(of("granite", "lm_head"), Some((8, 64)));
        let narrow = rules(json!({"model_type": "qwen3_moe"}))
            .quantization("model.layers.0.mlp.gate", &zeros(&[4, 96]));
        assert!(matches!(narrow, Err(Error::Convert { .. })), "{narrow:?}");
    }

    fn layout(names: &[(&str, &[i32])], config: Value) -> Vec<(String, Vec<i32>)> {
        let tensors = names
            .iter()
            .map(|(n, shape)| (n.to_string(), zeros(shape)))
            .collect();
        let mut weights = Weights::new(tensors, "test");
        to_mlx_lm_layout(&mut weights, &config).unwrap();
        let mut out: Vec<(String, Vec<i32>)> = weights
            .into_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.shape().to_vec()))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn the_layout_is_mlx_lms() {
        let names = |v: Vec<(String, Vec<i32>)>| v.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        // Per-expert Mixtral tensors stacked, the tied head dropped.
        let mixtral = layout(
            &[
                ("m.layers.0.block_sparse_moe.experts.0.w1.weight", &[8, 64]),
                ("m.layers.0.block_sparse_moe.experts.1.w1.weight", &[8, 64]),
                ("lm_head.weight", &[256, 64]),
            ],
            json!({"model_type": "mixtral", "tie_word_embeddings": true}),
        );
        assert_eq!(
            mixtral,
            vec![(
                "m.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight".to_owned(),
                vec![2, 8, 64]
            )]
        );
        // Transformers 5's fused experts split and stacked.
        let fused = layout(
            &[
                ("m.layers.0.mlp.experts.gate_up_proj", &[4, 16, 64]),
                ("m.layers.0.mlp.experts.down_proj", &[4, 64, 8]),
            ],
            json!({"model_type": "mixtral"}),
        );
        assert_eq!(
            names(fused),
            [
                "m.layers.0.mlp.switch_mlp.down_proj.weight",
                "m.layers.0.mlp.switch_mlp.gate_proj.weight",
                "m.layers.0.mlp.switch_mlp.up_proj.weight"
            ]
        );
        // Experts without every projection are left to their family's loader.
        let partial = layout(
            &[
                ("m.layers.0.mlp.experts.0.up_proj.weight", &[8, 64]),
                ("m.layers.0.mlp.experts.1.up_proj.weight", &[8, 64]),
                ("m.layers.0.mlp.experts.0.down_proj.weight", &[64, 8]),
            ],
            json!({"model_type": "longcat_flash"}),
        );
        assert_eq!(partial.len(), 3);
        // Convolutions in MLX's layout; MLA's kv_b_proj split per head.
        let mla = layout(
            &[
                ("m.layers.0.mamba.conv1d.weight", &[32, 1, 4]),
                (
                    "m.layers.0.self_attn.kv_b_proj.weight",
                    &[2 * (16 + 12), 32],
                ),
            ],
            json!({"model_type": "deepseek_v3", "num_attention_heads": 2,
                   "qk_nope_head_dim": 16, "v_head_dim": 12}),
        );
        assert_eq!(
            mla,
            vec![
                ("m.layers.0.mamba.conv1d.weight".to_owned(), vec![32, 4, 1]),
                (
                    "m.layers.0.self_attn.embed_q.weight".to_owned(),
                    vec![2, 32, 16]
                ),
                (
                    "m.layers.0.self_attn.unembed_out.weight".to_owned(),
                    vec![2, 12, 32]
                ),
            ]
        );
    }

    #[test]
    fn the_cast_follows_torch_dtype_and_spares_what_mlx_lm_spares() {
        assert_eq!(
            default_dtype(&json!({"torch_dtype": "bfloat16"})),
            Some(Dtype::Bfloat16)
        );
        assert_eq!(default_dtype(&json!({"dtype": "bfloat16"})), None);
        assert_eq!(
            default_dtype(&json!({"text_config": {"dtype": "float16"}})),
            Some(Dtype::Float16)
        );
        assert!(!is_cast(
            "glm4_moe",
            "model.layers.1.mlp.gate.e_score_correction_bias"
        ));
        assert!(is_cast(
            "llama",
            "model.layers.1.mlp.gate.e_score_correction_bias"
        ));
        assert!(!is_cast("qwen3_5_text", "model.layers.0.linear_attn.A_log"));
    }
}
