//! Apertus (`apertus`), ported from Transformers 5.23.0 (`ApertusForCausalLM`).
//!
//! Written on the shared blocks: the generator's structure (found by `cargo xtask port
//! apertus`) plus the MLP's xIELU activation, whose learned parameters no generated block
//! loads ([`crate::xielu`]); verified layer by layer against the Transformers fixtures in
//! `tests/fixtures/apertus/`, see its `PORT_REPORT.md`.
//!
//! - Pre-norm blocks: `attention_layernorm` before attention, `feedforward_layernorm`
//!   before the MLP (loaded as `input_layernorm` / `post_attention_layernorm`).
//! - RMSNorm scaling by `weight`; per-head RMSNorm of queries and keys before RoPE.
//! - Attention: `q_proj`/`k_proj`/`v_proj`/`o_proj`, biased when `attention_bias`.
//! - MLP: `down_proj(xielu(up_proj(x)))`, xIELU's parameters under `mlp.act_fn`.
//! - RoPE on the two halves of each head; Llama 3 scaling (base 12e6, factor 8) when the
//!   config names no RoPE parameters, as Transformers' `ApertusConfig` fills them in.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{DecoderConfig, DecoderFamily, LayerRule};
use crate::rope::RopeFields;
use crate::transformer::{
    drop_computed_weights, AttentionSettings, DecoderSettings, MlpLayout, QkNorm,
};
use crate::weights::{rename_layer_module, Weights};
use serde::Deserialize;

/// config.json fields, with the names of `ApertusConfig`: the shared ones; Transformers'
/// defaults are in `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
}

/// The RoPE `ApertusConfig` gives a config without any (`rope_theta` kept if it has one).
fn default_rope(theta: f64) -> serde_json::Value {
    serde_json::json!({
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    })
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":131072,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"hidden_act":"xielu","max_position_embeddings":65536,"rms_norm_eps":1e-5,"tie_word_embeddings":false,"attention_bias":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let attention = AttentionSettings {
            qk_norm: QkNorm::PerHead,
            ..d.attention()
        };
        let mlp = d.mlp(MlpLayout::UpDown, d.activation(config)?);
        let fields = match (&d.rope.rope_parameters, &d.rope.rope_scaling) {
            (None, None) => RopeFields {
                rope_parameters: Some(default_rope(d.rope.rope_theta.unwrap_or(12_000_000.0))),
                ..d.rope.clone()
            },
            _ => d.rope.clone(),
        };
        let rope = d.rope_from(&fields, 12_000_000.0, false, config)?;
        let layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        Ok(d.settings(attention, mlp, layers))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        drop_computed_weights(weights, settings.tie_word_embeddings);
        weights.rename(|name| Some(rename_layer_module(name, &RENAMES)));
        Ok(())
    }
}

/// The checkpoint's names of the layer norms the shared blocks load under other names.
const RENAMES: [(&str, &str); 2] = [
    ("attention_layernorm", "input_layernorm"),
    ("feedforward_layernorm", "post_attention_layernorm"),
];
