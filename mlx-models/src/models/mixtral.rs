//! Mixtral (`mixtral`): Mistral's decoder with a sparse mixture of experts in every layer.
//!
//! - Pre-norm blocks, RMSNorm, grouped-query attention with RoPE on the two halves of each
//!   head, `sliding_window` on every layer when set.
//! - Feed-forward: a softmax router (`gate`) picks `num_experts_per_tok` of
//!   `num_local_experts` SwiGLU experts; their weights are renormalized to sum to one.
//! - Checkpoints: the Hub's `block_sparse_moe.experts.<i>.w1/w2/w3`, Transformers 5's fused
//!   `mlp.experts.gate_up_proj`, and mlx-community's stacked `switch_mlp` all load.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{sanitize_moe, DecoderConfig, DecoderFamily, LayerRule, MoeConfig};
use crate::moe::{ExpertActivation, RouterSettings};
use crate::transformer::{DecoderSettings, MlpLayout};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `MixtralConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":32000,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"hidden_act":"silu","max_position_embeddings":131072,"rms_norm_eps":1e-5,"tie_word_embeddings":false,"num_experts_per_tok":2,"num_local_experts":8}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let rope = d.rope(1_000_000.0, false, config)?;
        let layers = d.layers(LayerRule::All, Some(&rope), None, false);
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
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
        Ok(d.settings(d.attention(), mlp, layers)
            .with_moe(moe, |_| true))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        let projections = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")];
        sanitize_moe(weights, settings, Some("block_sparse_moe"), &projections)
    }
}
