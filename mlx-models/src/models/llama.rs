//! Llama, and the families that share its shape (`mistral`).
//!
//! Pre-norm decoder blocks: RMSNorm → grouped-query attention with RoPE → residual,
//! RMSNorm → SwiGLU MLP → residual; a final RMSNorm and the output layer (or the
//! embedding matrix when tied). Mistral adds a sliding window on every layer.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{DecoderConfig, DecoderFamily, LayerRule};
use crate::transformer::{DecoderSettings, MlpLayout};
use serde::Deserialize;

/// config.json fields, with Transformers' names; defaults in [`DecoderFamily::DEFAULTS`].
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    /// Rotate adjacent pairs instead of halves (mlx-lm's field; Transformers checkpoints
    /// never need it).
    pub rope_traditional: bool,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "attention_bias": false, "mlp_bias": false, "rope_traditional": false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let rope = d.rope(10_000.0, self.rope_traditional, config)?;
        // Mistral's `sliding_window` applies to every layer.
        let layers = d.layers(LayerRule::All, Some(&rope), None, false);
        let mlp = d.mlp(MlpLayout::Gated, d.activation(config)?);
        Ok(d.settings(d.attention(), mlp, layers))
    }
}
