//! Ministral 3 (`ministral3`), ported from Transformers 5.23.0 (`Ministral3ForCausalLM`).
//!
//! Mistral's decoder with a query scale that grows with the position; written on the
//! shared blocks and verified layer by layer against the Transformers fixtures in
//! `tests/fixtures/ministral3/`, see its `PORT_REPORT.md`.
//!
//! - Pre-norm blocks, RMSNorm scaling by `weight`.
//! - Attention: `q_proj`/`k_proj`/`v_proj`/`o_proj`, explicit `head_dim`; after RoPE the
//!   queries at position `p` are scaled by `1 + β · log(1 + floor(p / n))`, with β the
//!   RoPE parameters' `llama_4_scaling_beta` and `n` their
//!   `original_max_position_embeddings`, on every layer.
//! - MLP: `down_proj(act(gate_proj(x)) * up_proj(x))`.
//! - RoPE on the two halves of each head; YaRN (factor 16 from 16384 positions, base 1e6,
//!   β 0.1) when the config names no RoPE parameters, as `Ministral3Config` fills them in.
//! - Sliding-window attention on every layer when `sliding_window` is set.

use crate::attention::TemperatureTuning;
use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{DecoderConfig, DecoderFamily, LayerRule};
use crate::rope::RopeFields;
use crate::transformer::{AttentionSettings, DecoderSettings, MlpLayout};
use serde::Deserialize;

/// config.json fields, with the names of `Ministral3Config`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
}

/// The RoPE `Ministral3Config` gives a config without any.
fn default_rope(max_position_embeddings: usize) -> serde_json::Value {
    serde_json::json!({
        "rope_type": "yarn",
        "rope_theta": 1_000_000.0,
        "factor": 16.0,
        "original_max_position_embeddings": 16384,
        "max_position_embeddings": max_position_embeddings,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale_all_dim": 1.0,
        "mscale": 1.0,
        "llama_4_scaling_beta": 0.1,
    })
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":131072,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":34,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,"hidden_act":"silu","max_position_embeddings":262144,"rms_norm_eps":1e-5,"tie_word_embeddings":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let fields = match (&d.rope.rope_parameters, &d.rope.rope_scaling) {
            (None, None) => RopeFields {
                rope_parameters: Some(default_rope(d.max_position_embeddings)),
                ..d.rope.clone()
            },
            _ => d.rope.clone(),
        };
        let params = fields
            .rope_parameters
            .as_ref()
            .or(fields.rope_scaling.as_ref());
        let number = |key: &str| {
            let value = params.and_then(|p| p.get(key)).and_then(|v| v.as_f64());
            config.require(&format!("rope_parameters.{key}"), value)
        };
        let beta = number("llama_4_scaling_beta")?;
        let floor_scale = number("original_max_position_embeddings")?;
        config.ensure(
            floor_scale > 0.0,
            "rope_parameters.original_max_position_embeddings",
            || format!("must be positive, found {floor_scale}"),
        )?;
        let attention = AttentionSettings {
            temperature_tuning: Some(TemperatureTuning {
                floor_scale: floor_scale as f32,
                attn_scale: beta as f32,
                position_offset: 0.0,
                all_layers: true,
            }),
            ..d.attention()
        };
        let mlp = d.mlp(MlpLayout::Gated, d.activation(config)?);
        let rope = d.rope_from(&fields, 1_000_000.0, false, config)?;
        let layers = d.layers(LayerRule::All, Some(&rope), None, false);
        Ok(d.settings(attention, mlp, layers))
    }
}
