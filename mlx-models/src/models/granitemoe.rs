//! Granite MoE (`granitemoe`): Granite's multipliers on a decoder whose every layer is a
//! sparse mixture of experts.
//!
//! - Pre-norm blocks, RMSNorm; attention scores scaled by `attention_multiplier`, RoPE on
//!   the two halves of each head.
//! - Embeddings × `embedding_multiplier`, each sub-block's output × `residual_multiplier`,
//!   logits ÷ `logits_scaling`.
//! - Feed-forward (`block_sparse_moe`): the top `num_experts_per_tok` router logits, their
//!   softmax as weights, SwiGLU experts of width `intermediate_size`.
//! - Checkpoints: the Hub's fused `input_linear` (gate rows, then up) / `output_linear` and
//!   `router.layer`, Transformers 5's `experts.gate_up_proj` / `router`, and mlx-community's
//!   `switch_mlp` all load.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{sanitize_moe, DecoderConfig, DecoderFamily, LayerRule, MoeConfig};
use crate::moe::{ExpertActivation, RouterSettings};
use crate::transformer::{AttentionSettings, DecoderSettings, MlpLayout};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `GraniteMoeConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    /// Attention scores scale.
    pub attention_multiplier: f64,
    /// Sub-block outputs scale.
    pub residual_multiplier: f64,
    /// Logits divided by it.
    pub logits_scaling: f64,
    /// Embeddings scale.
    pub embedding_multiplier: f64,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":32000,"hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,"hidden_act":"silu","max_position_embeddings":2048,"rms_norm_eps":1e-6,"tie_word_embeddings":false,"attention_bias":false,"embedding_multiplier":1.0,"logits_scaling":1.0,"residual_multiplier":1.0,"attention_multiplier":1.0,"num_local_experts":8,"num_experts_per_tok":2}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let attention = AttentionSettings {
            scale: self.attention_multiplier as f32,
            ..d.attention()
        };
        let rope = d.rope(10_000.0, false, config)?;
        let layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
        // Softmax over the chosen logits: renormalized softmax top-k.
        let router = RouterSettings {
            normalize: true,
            ..self.moe.router()
        };
        let moe = self.moe.settings(
            router,
            d.intermediate_size,
            ExpertActivation::Glu(act),
            false,
        );
        let settings = DecoderSettings {
            embedding_scale: Some(self.embedding_multiplier as f32),
            residual_scale: Some(self.residual_multiplier as f32),
            logits_scale: Some((1.0 / self.logits_scaling) as f32),
            ..d.settings(attention, mlp, layers)
        };
        Ok(settings.with_moe(moe, |_| true))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        weights.rename(|name| {
            Some(
                name.replacen(
                    ".block_sparse_moe.input_linear.",
                    ".mlp.experts.gate_up_proj.",
                    1,
                )
                .replacen(
                    ".block_sparse_moe.output_linear.",
                    ".mlp.experts.down_proj.",
                    1,
                )
                .replacen(".block_sparse_moe.router.layer.", ".mlp.gate.", 1)
                .replacen(".block_sparse_moe.router.", ".mlp.gate.", 1)
                .replace(".experts.gate_up_proj.weight", ".experts.gate_up_proj")
                .replace(".experts.down_proj.weight", ".experts.down_proj"),
            )
        });
        sanitize_moe(weights, settings, Some("block_sparse_moe"), &[])
    }
}
