//! Mamba (`mamba`) and FalconMamba (`falcon_mamba`): every layer is an RMSNorm and a Mamba
//! selective-scan mixer ([`crate::ssm::MambaMixer`]) with a residual; no attention, no MLP.
//!
//! - FalconMamba RMS-normalizes the mixer's `dt`, `B` and `C` (without weights,
//!   `mixer_rms_eps`).
//! - `time_step_rank` "auto" is `ceil(hidden_size / 16)`; `intermediate_size` is
//!   `expand · hidden_size`.
//! - Checkpoints name the model `backbone`, mapped as for Mamba2.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::model::LanguageModel;
use crate::models::mamba2::sanitize_backbone;
use crate::ssm::MambaSettings;
use crate::transformer::{build, DecoderSettings, MixerKind};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `MambaConfig` / `FalconMambaConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub num_hidden_layers: usize,
    pub state_size: i32,
    pub expand: i32,
    pub conv_kernel: i32,
    /// A number, or "auto".
    pub time_step_rank: serde_json::Value,
    pub use_bias: bool,
    pub use_conv_bias: bool,
    pub hidden_act: String,
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub residual_in_fp32: Option<bool>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// FalconMamba's epsilon of the `dt`/`B`/`C` norms.
    #[serde(default)]
    pub mixer_rms_eps: Option<f64>,
}

const DEFAULTS: &str = r#"{"vocab_size":50280,"hidden_size":768,"state_size":16,"num_hidden_layers":32,"layer_norm_epsilon":1e-5,"expand":2,"conv_kernel":4,"use_bias":false,"use_conv_bias":true,"hidden_act":"silu","time_step_rank":"auto","residual_in_fp32":true,"tie_word_embeddings":true}"#;

impl Config {
    pub fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let rank = match &self.time_step_rank {
            serde_json::Value::String(s) if s == "auto" => (self.hidden_size + 15) / 16,
            v => v.as_i64().map(|v| v as i32).ok_or_else(|| {
                crate::error::Error::config(
                    &config.path,
                    "time_step_rank",
                    "must be a number or \"auto\"",
                )
            })?,
        };
        config.ensure(self.hidden_act == "silu", "hidden_act", || {
            format!(
                "Mamba's activation `{}` is not supported (silu)",
                self.hidden_act
            )
        })?;
        config.ensure(self.expand > 0 && rank > 0, "expand", || {
            "must be positive".to_owned()
        })?;
        let falcon = self.model_type == "falcon_mamba";
        let mamba = MambaSettings {
            intermediate_size: self.expand * self.hidden_size,
            state_size: self.state_size,
            time_step_rank: rank,
            conv_kernel: self.conv_kernel,
            conv_bias: self.use_conv_bias,
            bias: self.use_bias,
            bcdt_rms_eps: falcon.then(|| self.mixer_rms_eps.unwrap_or(1e-6) as f32),
            bcdt_norm_eps: None,
        };
        Ok(DecoderSettings {
            mamba: Some(mamba),
            norm_eps: self.layer_norm_epsilon,
            tie_word_embeddings: self.tie_word_embeddings,
            residual_in_f32: self.residual_in_fp32.unwrap_or(true),
            ..DecoderSettings::recurrent_only(
                &self.model_type,
                self.vocab_size,
                self.hidden_size,
                self.num_hidden_layers,
                MixerKind::Mamba,
            )
        })
    }
}

/// The registry's entry point for `mamba` and `falcon_mamba`.
pub fn load(config: &ConfigFile, mut weights: Weights) -> Result<Box<dyn LanguageModel>> {
    let c: Config = config.parse_with_defaults(DEFAULTS)?;
    let settings = c.settings(config)?;
    sanitize_backbone(&mut weights, settings.tie_word_embeddings);
    build(config, settings, weights)
}
