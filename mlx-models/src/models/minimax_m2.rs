//! MiniMax-M2 (`minimax_m2`): sigmoid routing with a correction bias in every layer, and
//! q/k RMSNorm over the whole projections.
//!
//! - Pre-norm blocks, RMSNorm; attention without biases, RMSNorm of the whole query and key
//!   projections before RoPE, RoPE on the first `rotary_dim` (Hub) or
//!   `partial_rotary_factor` of each head's features (halves).
//! - Feed-forward (`block_sparse_moe` on the Hub): `sigmoid` router scores, the top
//!   `num_experts_per_tok` by score plus `e_score_correction_bias`, weighted by their
//!   scores renormalized to sum to one; SwiGLU experts of width `intermediate_size`.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{sanitize_moe, DecoderConfig, DecoderFamily, LayerRule, MoeConfig};
use crate::moe::{ExpertActivation, RouterSettings, Scoring};
use crate::rope::RopeFields;
use crate::transformer::{AttentionSettings, DecoderSettings, MlpLayout, QkNorm};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `MiniMaxM2Config`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    /// Rotated features per head (Hub configs; Transformers turns it into
    /// `partial_rotary_factor`).
    #[serde(default)]
    pub rotary_dim: Option<i32>,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":200064,"hidden_size":3072,"intermediate_size":1536,"num_hidden_layers":62,"num_attention_heads":48,"num_key_value_heads":8,"head_dim":128,"hidden_act":"silu","max_position_embeddings":196608,"rms_norm_eps":1e-6,"tie_word_embeddings":false,"num_experts_per_tok":8,"num_local_experts":256}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let attention = AttentionSettings {
            qk_norm: QkNorm::Projection,
            ..d.attention()
        };
        let fields = RopeFields {
            partial_rotary_factor: d.rope.partial_rotary_factor.or(self
                .rotary_dim
                .map(|r| f64::from(r) / f64::from(d.head_dim()))),
            ..d.rope.clone()
        };
        let rope = d.rope_from(&fields, 5_000_000.0, false, config)?;
        let layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
        let router = RouterSettings {
            scoring: Scoring::Sigmoid,
            correction_bias: true,
            normalize: true,
            ..self.moe.router()
        };
        let moe = self.moe.settings(
            router,
            d.intermediate_size,
            ExpertActivation::Glu(act),
            false,
        );
        Ok(d.settings(attention, mlp, layers).with_moe(moe, |_| true))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        weights.rename(|name| {
            Some(name.replacen(
                "_moe.e_score_correction_bias",
                "_moe.gate.e_score_correction_bias",
                1,
            ))
        });
        weights.rename(|name| {
            Some(name.replacen(
                ".mlp.e_score_correction_bias",
                ".mlp.gate.e_score_correction_bias",
                1,
            ))
        });
        let projections = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")];
        sanitize_moe(weights, settings, Some("block_sparse_moe"), &projections)
    }
}
