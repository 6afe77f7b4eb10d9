//! Mamba2 (`mamba2`): every layer is an RMSNorm and a Mamba2 state-space mixer
//! ([`crate::ssm`]) with a residual; no attention, no MLP.
//!
//! - Prompts are scanned in chunks of `chunk_size` tokens (SSD), decoded tokens step the
//!   recurrence; each layer's cache is its conv state and SSM state, a fixed size.
//! - Checkpoints name the model `backbone` (`embeddings`, `layers.N.norm`, `layers.N.mixer`,
//!   `norm_f`), which `sanitize` maps to the shared decoder's names.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::model::LanguageModel;
use crate::ssm::{Mamba2Gate, Mamba2Settings};
use crate::transformer::{build, drop_computed_weights, DecoderSettings, MixerKind};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `Mamba2Config`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub num_hidden_layers: usize,
    pub num_heads: i32,
    pub head_dim: i32,
    pub state_size: i32,
    pub n_groups: i32,
    pub expand: i32,
    pub conv_kernel: i32,
    pub use_bias: bool,
    pub use_conv_bias: bool,
    pub hidden_act: String,
    pub layer_norm_epsilon: f64,
    pub chunk_size: i32,
    #[serde(deserialize_with = "crate::config::f64_pair_or_non_finite")]
    pub time_step_limit: (f64, f64),
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub residual_in_fp32: Option<bool>,
}

/// Transformers' defaults for the fields config.json may leave out.
pub const DEFAULTS: &str = r#"{"num_heads":128,"head_dim":64,"vocab_size":32768,"hidden_size":4096,"state_size":128,"num_hidden_layers":64,"layer_norm_epsilon":1e-5,"expand":2,"conv_kernel":4,"n_groups":8,"use_bias":false,"use_conv_bias":true,"hidden_act":"silu","chunk_size":256,"time_step_limit":[0.0,{"__float__":"Infinity"}],"tie_word_embeddings":false,"residual_in_fp32":true}"#;

impl Config {
    /// The decoder: `num_hidden_layers` Mamba2 layers.
    pub fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        config.ensure(
            self.hidden_size * self.expand == self.num_heads * self.head_dim,
            "num_heads",
            || {
                format!(
                    "hidden_size × expand ({}) must equal num_heads × head_dim ({})",
                    self.hidden_size * self.expand,
                    self.num_heads * self.head_dim
                )
            },
        )?;
        config.ensure(
            self.n_groups > 0 && self.num_heads % self.n_groups == 0,
            "n_groups",
            || {
                format!(
                    "{} heads cannot be split into {} groups",
                    self.num_heads, self.n_groups
                )
            },
        )?;
        config.ensure(self.conv_kernel >= 1, "conv_kernel", || {
            "must be at least 1".to_owned()
        })?;
        config.ensure(self.hidden_act == "silu", "hidden_act", || {
            format!(
                "Mamba2's conv activation `{}` is not supported (silu)",
                self.hidden_act
            )
        })?;
        let mamba2 = Mamba2Settings {
            num_heads: self.num_heads,
            head_dim: self.head_dim,
            state_size: self.state_size,
            n_groups: self.n_groups,
            conv_kernel: self.conv_kernel,
            conv_bias: self.use_conv_bias,
            bias: self.use_bias,
            out_bias: self.use_bias,
            chunk_size: self.chunk_size,
            time_step_limit: (
                self.time_step_limit.0 as f32,
                self.time_step_limit.1.min(f64::from(f32::MAX)) as f32,
            ),
            // Transformers' decoding steps (`mamba2_selective_state_update`) leave `dt`
            // unclamped; only the prompt's scan clamps it (the port tool's `step_clamps`).
            clamp_steps: false,
            norm_eps: self.layer_norm_epsilon,
            gate: Mamba2Gate::NormAfterGate,
            chunked_prefill: true,
        };
        Ok(DecoderSettings {
            mamba2: Some(mamba2),
            norm_eps: self.layer_norm_epsilon,
            tie_word_embeddings: self.tie_word_embeddings,
            residual_in_f32: self.residual_in_fp32.unwrap_or(true),
            ..DecoderSettings::recurrent_only(
                "mamba2",
                self.vocab_size,
                self.hidden_size,
                self.num_hidden_layers,
                MixerKind::Mamba2,
            )
        })
    }
}

/// The registry's entry point.
pub fn load(config: &ConfigFile, mut weights: Weights) -> Result<Box<dyn LanguageModel>> {
    let c: Config = config.parse_with_defaults(DEFAULTS)?;
    let settings = c.settings(config)?;
    sanitize_backbone(&mut weights, settings.tie_word_embeddings);
    build(config, settings, weights)
}

/// Maps the `backbone.*` names of Mamba checkpoints to the shared decoder's.
pub fn sanitize_backbone(weights: &mut Weights, tie_word_embeddings: bool) {
    drop_computed_weights(weights, tie_word_embeddings);
    weights.rename(|name| {
        let name = name
            .replacen("backbone.embeddings.", "model.embed_tokens.", 1)
            .replacen("backbone.embedding.", "model.embed_tokens.", 1)
            .replacen("backbone.norm_f.", "model.norm.", 1)
            .replacen("backbone.layers.", "model.layers.", 1);
        Some(match name.split_once(".norm.") {
            Some((layer, rest))
                if layer.starts_with("model.layers.") && !layer.contains("mixer") =>
            {
                format!("{layer}.input_layernorm.{rest}")
            }
            _ => name,
        })
    });
}
