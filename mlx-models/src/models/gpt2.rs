//! GPT-2 (`gpt2`), ported from Transformers 5.23.0 (`GPT2LMHeadModel`).
//!
//! Written by hand on the shared blocks (`cargo xtask port gpt2` finds the structure but
//! the generator does not emit Conv1D weights or learned positions) and verified layer by
//! layer against the Transformers fixtures in `tests/fixtures/gpt2/`; see its
//! PORT_REPORT.md.
//!
//! - Learned absolute positions (`wpe`) added to the token embeddings.
//! - Pre-norm blocks: `ln_1` before attention, `ln_2` before the MLP; LayerNorm with bias.
//! - Attention: one fused `c_attn` (rows q, k, v), `c_proj`, all with biases; scores scaled
//!   by `head_dim^-0.5` unless `scale_attn_weights` is false. No RoPE.
//! - MLP: `c_proj(act(c_fc(x)))`, width `n_inner` (4 × `n_embd` when null).
//! - Every projection is a `Conv1D` in the checkpoint (weight `[in, out]`), transposed in
//!   `sanitize`; checkpoints saved from `GPT2Model` (the Hub's `openai-community/gpt2`)
//!   have no `transformer.` prefix.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::DecoderFamily;
use crate::fused_qkv::conv1d_to_linear;
use crate::mlp::Activation;
use crate::transformer::{
    drop_computed_weights, AttentionSettings, DecoderSettings, LayerSettings, MlpLayout,
    MlpSettings, NormKind, QkvLayout,
};
use crate::weights::{rename_layer_module, Weights};
use serde::Deserialize;

/// config.json fields, with the names of `GPT2Config`;
/// Transformers' defaults are in `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: i32,
    pub n_embd: i32,
    pub n_layer: usize,
    pub n_head: i32,
    /// Rows of the position table, the longest sequence.
    pub n_positions: usize,
    /// The MLP width; 4 × `n_embd` when null.
    pub n_inner: Option<i32>,
    pub activation_function: String,
    pub layer_norm_epsilon: f64,
    pub tie_word_embeddings: bool,
    /// Scores scaled by `head_dim^-0.5` (else not at all).
    pub scale_attn_weights: bool,
    /// Checked: scores also divided by `layer + 1` is refused.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Softmax in f32 with the scaling moved before it: the same numbers in f32, and MLX's
    /// attention takes its softmax in f32 anyway; read and accepted.
    pub reorder_and_upcast_attn: bool,
    /// Checked: cross-attention layers are refused.
    pub add_cross_attention: bool,
}

impl Config {
    /// The settings of a GPT-2-style model with `kv_heads` key/value heads: learned
    /// positions, fused biased q/k/v, a plain biased MLP, LayerNorm, no RoPE (shared with
    /// GPT-BigCode).
    pub fn gpt2_settings(&self, config: &ConfigFile, kv_heads: i32) -> Result<DecoderSettings> {
        config.ensure(
            self.n_head > 0 && self.n_embd % self.n_head == 0,
            "n_head",
            || format!("{} heads do not divide n_embd {}", self.n_head, self.n_embd),
        )?;
        let head_dim = self.n_embd / self.n_head;
        let attention = AttentionSettings {
            qkv_layout: QkvLayout::Fused,
            qkv_bias: true,
            o_bias: true,
            scale: if self.scale_attn_weights {
                (head_dim as f32).powf(-0.5)
            } else {
                1.0
            },
            ..AttentionSettings::new(self.n_head, kv_heads, head_dim)
        };
        let mlp = MlpSettings {
            intermediate_size: self.n_inner.unwrap_or(4 * self.n_embd),
            layout: MlpLayout::Plain,
            activation: Activation::from_config(
                config,
                "activation_function",
                &self.activation_function,
            )?,
            bias: true,
        };
        let layers = vec![LayerSettings::default(); self.n_layer];
        Ok(DecoderSettings {
            norm: NormKind::Layer { bias: true },
            norm_eps: self.layer_norm_epsilon,
            learned_positions: true,
            tie_word_embeddings: self.tie_word_embeddings,
            ..DecoderSettings::new(
                &self.model_type,
                self.vocab_size,
                self.n_embd,
                self.n_positions,
                attention,
                mlp,
                layers,
            )
        })
    }

    /// Refuses the options no block reads.
    pub fn check_options(&self, config: &ConfigFile) -> Result<()> {
        config.ensure(
            !self.scale_attn_by_inverse_layer_idx,
            "scale_attn_by_inverse_layer_idx",
            || {
                "only false is supported: scores divided by the layer number are not implemented"
                    .to_owned()
            },
        )?;
        config.ensure(!self.add_cross_attention, "add_cross_attention", || {
            "only false is supported: a decoder-only model has no cross-attention".to_owned()
        })
    }
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":50257,"n_positions":1024,"n_embd":768,"n_layer":12,"n_head":12,"n_inner":null,"activation_function":"gelu_new","layer_norm_epsilon":0.00001,"tie_word_embeddings":true,"scale_attn_weights":true,"scale_attn_by_inverse_layer_idx":false,"reorder_and_upcast_attn":false,"add_cross_attention":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        self.check_options(config)?;
        self.gpt2_settings(config, self.n_head)
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        // mlx-lm's layout (everything under `model.`) has linear layers already.
        let conv1d = !weights.names().any(|n| n.starts_with("model."));
        rename_gpt2_weights(weights, settings.tie_word_embeddings);
        if conv1d {
            for i in 0..settings.layers.len() {
                for module in CONV1D {
                    conv1d_to_linear(weights, &format!("model.layers.{i}.{module}"))?;
                }
            }
        }
        Ok(())
    }
}

/// The projections a GPT-2 checkpoint stores as `Conv1D`, by the names the blocks load.
const CONV1D: [&str; 4] = [
    "self_attn.qkv_proj",
    "self_attn.o_proj",
    "mlp.c_fc",
    "mlp.c_proj",
];

/// A Transformers GPT-2 checkpoint in mlx-lm's layout (what `mlx-models convert` writes):
/// every name but `lm_head`'s under `model.` without `transformer.`, the `Conv1D` weights of each layer
/// (`h.{i}.attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) transposed to linear
/// layers', the causal-mask buffers dropped.
pub fn to_mlx_lm_layout(weights: &mut Weights) -> Result<()> {
    if weights.names().any(|n| n.starts_with("model.")) {
        return Ok(()); // converted already
    }
    weights.rename(|name| {
        if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") {
            return None;
        }
        if name.starts_with("lm_head.") {
            return Some(name.to_owned()); // an untied output layer (mlx-lm ties it always)
        }
        let name = name.strip_prefix("transformer.").unwrap_or(name);
        Some(format!("model.{name}"))
    });
    let layers: std::collections::BTreeSet<String> = weights
        .names()
        .filter_map(|n| {
            let rest = n.strip_prefix("model.h.")?;
            Some(format!("model.h.{}", rest.split('.').next()?))
        })
        .collect();
    for layer in layers {
        for module in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] {
            conv1d_to_linear(weights, &format!("{layer}.{module}"))?;
        }
    }
    Ok(())
}

/// GPT-2's names (`transformer.h.{i}.attn.c_attn`, or under `model.` as mlx-lm writes
/// them, or without a prefix as the Hub's `openai-community/gpt2`) as the
/// shared blocks load them (`model.layers.{i}.self_attn.qkv_proj`); drops the causal-mask
/// buffers old checkpoints store (`attn.bias`, `attn.masked_bias`) and a tied checkpoint's
/// `lm_head` (shared with GPT-BigCode).
pub fn rename_gpt2_weights(weights: &mut Weights, tie_word_embeddings: bool) {
    weights.rename(|name| {
        if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") {
            return None;
        }
        if name.starts_with("lm_head.") {
            return Some(name.to_owned());
        }
        let local = ["transformer.", "model."]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(name);
        let name = format!("model.{local}");
        let name = rename_layer_module(&name, &ROOT_RENAMES);
        Some(rename_layer_module(&name, &LAYER_RENAMES))
    });
    drop_computed_weights(weights, tie_word_embeddings);
}

/// The modules of the base model, by the names the shared blocks load.
const ROOT_RENAMES: [(&str, &str); 4] = [
    ("model.wte", "model.embed_tokens"),
    ("model.wpe", "model.embed_positions"),
    ("model.h", "model.layers"),
    ("model.ln_f", "model.norm"),
];

/// The modules of a layer, by the names the shared blocks load.
const LAYER_RENAMES: [(&str, &str); 4] = [
    ("ln_1", "input_layernorm"),
    ("ln_2", "post_attention_layernorm"),
    ("attn.c_attn", "self_attn.qkv_proj"),
    ("attn.c_proj", "self_attn.o_proj"),
];
