//! OLMo (`olmo`), ported from Transformers 5.23.0 (`OlmoForCausalLM`).
//!
//! Written on the shared blocks (the generator has no weightless norm to emit); verified
//! layer by layer against the Transformers fixtures in `tests/fixtures/olmo/`, see its
//! `PORT_REPORT.md`.
//!
//! - Pre-norm blocks whose LayerNorms have no weight or bias, with an epsilon of 1e-5 that
//!   Transformers fixes in its code (config.json names none).
//! - Attention: `q_proj`/`k_proj`/`v_proj`/`o_proj`, biased when `attention_bias`; q, k
//!   and v clamped to `[-clip_qkv, clip_qkv]` when the config sets it.
//! - MLP: `down_proj(act(gate_proj(x)) * up_proj(x))`.
//! - RoPE on the two halves of each head (all scaling types of
//!   `rope_parameters`/`rope_scaling`).

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{DecoderConfig, DecoderFamily, LayerRule};
use crate::transformer::{AttentionSettings, DecoderSettings, MlpLayout, NormKind};
use serde::Deserialize;

/// The epsilon of OLMo's LayerNorms, fixed in Transformers' `OlmoLayerNorm`.
const NORM_EPS: f64 = 1e-5;

/// config.json fields, with the names of `OlmoConfig`: the shared ones and the family's
/// own; Transformers' defaults are in `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    /// Clamps q, k and v to `[-clip_qkv, clip_qkv]`.
    #[serde(default)]
    pub clip_qkv: Option<f64>,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":50304,"hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,"max_position_embeddings":2048,"tie_word_embeddings":false,"hidden_act":"silu","attention_bias":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        if let Some(c) = self.clip_qkv {
            config.ensure(c > 0.0, "clip_qkv", || {
                format!("must be positive, found {c}")
            })?;
        }
        let attention = AttentionSettings {
            clip_qkv: self.clip_qkv.map(|c| c as f32),
            ..d.attention()
        };
        let mlp = d.mlp(MlpLayout::Gated, d.activation(config)?);
        let rope = d.rope(10000.0, false, config)?;
        let layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        Ok(DecoderSettings {
            norm: NormKind::LayerNoWeight,
            norm_eps: NORM_EPS,
            ..d.settings(attention, mlp, layers)
        })
    }
}
