//! GPT-NeoX (`gpt_neox`: Pythia, GPT-NeoX-20B), ported from Transformers 5.23.0
//! (`GPTNeoXForCausalLM`).
//!
//! Written by hand on the shared blocks (`cargo xtask port gpt_neox` finds the structure
//! but the generator does not emit a per-head fused projection) and verified layer by
//! layer against the Transformers fixtures in `tests/fixtures/gpt_neox/`; see its
//! PORT_REPORT.md.
//!
//! - Parallel residual (`use_parallel_residual`, the default): `x + attn(input_layernorm(x))
//!   + mlp(post_attention_layernorm(x))`; else sequential pre-norm blocks.
//! - LayerNorm with bias.
//! - Attention: one `query_key_value` stored per head as `[q, k, v]` (reordered in
//!   `sanitize`), `dense`; biases with `attention_bias`.
//! - RoPE on the two halves of the first `partial_rotary_factor` of each head (Hub configs:
//!   `rotary_pct`, 0.25 when absent; base `rotary_emb_base`), all scaling types.
//! - MLP: `dense_4h_to_h(act(dense_h_to_4h(x)))`, always with biases.
//! - The output layer is `embed_out` in Hub checkpoints.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{DecoderConfig, DecoderFamily, LayerRule};
use crate::fused_qkv::per_head_to_blocks;
use crate::transformer::{
    drop_computed_weights, AttentionSettings, DecoderSettings, MlpLayout, MlpSettings, NormKind,
    NormPlacement, QkvLayout,
};
use crate::weights::{rename_layer_module, Weights};
use serde::Deserialize;

/// Transformers' share of each head that rotates when a config names none.
const DEFAULT_ROTARY_PCT: f64 = 0.25;

/// config.json fields, with the names of `GPTNeoXConfig`: the shared ones and the family's
/// own; Transformers' defaults are in `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    pub layer_norm_eps: f64,
    /// Attention and MLP side by side, on a norm each.
    pub use_parallel_residual: bool,
    /// The Hub configs' name of `partial_rotary_factor`.
    #[serde(default)]
    pub rotary_pct: Option<f64>,
    /// The Hub configs' name of `rope_theta`.
    #[serde(default)]
    pub rotary_emb_base: Option<f64>,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":50432,"hidden_size":6144,"intermediate_size":24576,"num_hidden_layers":44,"num_attention_heads":64,"max_position_embeddings":2048,"tie_word_embeddings":false,"layer_norm_eps":0.00001,"hidden_act":"gelu","attention_bias":true,"use_parallel_residual":true}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let attention = AttentionSettings {
            qkv_layout: QkvLayout::Fused,
            ..d.attention()
        };
        let mlp = MlpSettings {
            bias: true,
            ..d.mlp(MlpLayout::UpDown, d.activation(config)?)
        };
        let mut fields = d.rope.clone();
        fields.partial_rotary_factor = fields
            .partial_rotary_factor
            .or(self.rotary_pct)
            .or(Some(DEFAULT_ROTARY_PCT));
        fields.rope_theta = fields.rope_theta.or(self.rotary_emb_base);
        let rope = d.rope_from(&fields, 10000.0, false, config)?;
        let layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        Ok(DecoderSettings {
            norm: NormKind::Layer { bias: true },
            norm_eps: self.layer_norm_eps,
            norm_placement: if self.use_parallel_residual {
                NormPlacement::ParallelTwoNorms
            } else {
                NormPlacement::Pre
            },
            ..d.settings(attention, mlp, layers)
        })
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        weights.rename(|name| {
            // Causal-mask buffers of older checkpoints.
            if name.ends_with(".attention.bias") || name.ends_with(".attention.masked_bias") {
                return None;
            }
            if let Some(rest) = name.strip_prefix("embed_out.") {
                return Some(format!("lm_head.{rest}"));
            }
            let name = match name.strip_prefix("gpt_neox.") {
                Some(rest) => format!("model.{rest}"),
                None => name.to_owned(),
            };
            let name = rename_layer_module(&name, &ROOT_RENAMES);
            Some(rename_layer_module(&name, &LAYER_RENAMES))
        });
        drop_computed_weights(weights, settings.tie_word_embeddings);
        let a = &settings.attention;
        for i in 0..settings.layers.len() {
            let qkv = format!("model.layers.{i}.self_attn.qkv_proj");
            per_head_to_blocks(weights, &qkv, a.num_heads, a.head_dim)?;
        }
        Ok(())
    }
}

/// The modules of the base model, by the names the shared blocks load.
const ROOT_RENAMES: [(&str, &str); 2] = [
    ("model.embed_in", "model.embed_tokens"),
    ("model.final_layer_norm", "model.norm"),
];

/// The modules of a layer, by the names the shared blocks load.
const LAYER_RENAMES: [(&str, &str); 4] = [
    ("attention.query_key_value", "self_attn.qkv_proj"),
    ("attention.dense", "self_attn.o_proj"),
    ("mlp.dense_h_to_4h", "mlp.up_proj"),
    ("mlp.dense_4h_to_h", "mlp.down_proj"),
];
