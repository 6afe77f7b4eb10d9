//! Qwen3.5 (`qwen3_5_text`, and the language model of `qwen3_5` checkpoints): Qwen3-Next's
//! gated DeltaNet and gated full attention with a dense SwiGLU MLP.
//!
//! - As [`crate::models::qwen3_next`], without experts; the DeltaNet's projections are
//!   stored apart (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`).
//! - RoPE: text-only positions are the same on the three axes of its multimodal RoPE, which
//!   is then plain partial RoPE.
//! - `qwen3_5` checkpoints nest the settings in `text_config` and the weights under
//!   `model.language_model.`; the vision tower and multi-token-prediction weights are
//!   dropped.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{DecoderConfig, DecoderFamily};
use crate::models::qwen3_next::{unfold_mlx_lm_norms, LinearAttentionConfig};
use crate::transformer::{drop_computed_weights, DecoderSettings};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `Qwen3_5TextConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub linear: LinearAttentionConfig,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":248320,"hidden_size":4096,"intermediate_size":12288,"num_hidden_layers":32,"num_attention_heads":16,"num_key_value_heads":4,"hidden_act":"silu","max_position_embeddings":32768,"rms_norm_eps":1e-6,"tie_word_embeddings":false,"attention_bias":false,"head_dim":256,"linear_conv_kernel_dim":4,"linear_key_head_dim":128,"linear_value_head_dim":128,"linear_num_key_heads":16,"linear_num_value_heads":32}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        self.linear.settings(&self.decoder, config)
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        drop_vision_and_mtp(weights);
        drop_computed_weights(weights, settings.tie_word_embeddings);
        unfold_mlx_lm_norms(weights)
    }
}

/// Drops the vision tower and multi-token-prediction weights of a Qwen3.5 checkpoint and
/// takes the language model's out of `model.language_model.` (Hub) or `language_model.`
/// (mlx-lm's conversions: `language_model.model.*`, `language_model.lm_head.*`).
pub fn drop_vision_and_mtp(weights: &mut Weights) {
    weights.rename(|name| {
        let vision = ["model.visual.", "vision_tower.", "mtp.", "model.mtp."];
        if vision.iter().any(|p| name.starts_with(p)) {
            return None;
        }
        Some(match name.strip_prefix("language_model.") {
            Some(rest) => rest.to_owned(),
            None => name.replacen("model.language_model.", "model.", 1),
        })
    });
}

/// The registry's entry for multimodal `qwen3_5` checkpoints: the language model, whose
/// settings sit in `text_config`.
pub fn load_multimodal(
    config: &ConfigFile,
    weights: Weights,
) -> Result<Box<dyn crate::model::LanguageModel>> {
    crate::family::load_text_config::<Config>(config, weights, "qwen3_5_text")
}
