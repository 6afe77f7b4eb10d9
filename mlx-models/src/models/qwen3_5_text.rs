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
use crate::delta::GatedDeltaNetSettings;
use crate::error::Result;
use crate::family::{DecoderConfig, DecoderFamily, LayerRule};
use crate::rope::RopeFields;
use crate::transformer::{
    drop_computed_weights, AttentionSettings, DecoderSettings, LayerType, MixerKind, MlpLayout,
    NormKind, QkNorm,
};
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
        Ok(())
    }
}

/// The gated-DeltaNet fields of Qwen3.5 configs (and Qwen3.5-MoE's).
#[derive(Debug, Clone, Deserialize)]
pub struct LinearAttentionConfig {
    pub linear_conv_kernel_dim: i32,
    pub linear_key_head_dim: i32,
    pub linear_value_head_dim: i32,
    pub linear_num_key_heads: i32,
    pub linear_num_value_heads: i32,
    /// Without `layer_types`: every n-th layer is full attention.
    #[serde(default)]
    pub full_attention_interval: Option<usize>,
}

impl LinearAttentionConfig {
    /// The decoder of Qwen3-Next-shaped configs without its feed-forward choice: gated
    /// DeltaNet layers, gated full attention every `full_attention_interval`, `1 + w` norms,
    /// a dense MLP of width `intermediate_size`.
    pub fn settings(&self, d: &DecoderConfig, config: &ConfigFile) -> Result<DecoderSettings> {
        let n = d.num_hidden_layers;
        config.ensure(
            self.linear_num_key_heads > 0
                && self.linear_num_value_heads % self.linear_num_key_heads == 0,
            "linear_num_value_heads",
            || {
                format!(
                    "{} value heads cannot be grouped over {} key heads",
                    self.linear_num_value_heads, self.linear_num_key_heads
                )
            },
        )?;
        // Transformers' default for configs that name no partial rotary factor.
        let fields = RopeFields {
            partial_rotary_factor: d.rope.partial_rotary_factor.or(Some(0.25)),
            ..d.rope.clone()
        };
        let rope = d.rope_from(&fields, 10_000.0, false, config)?;
        let attention = AttentionSettings {
            qk_norm: QkNorm::PerHead,
            output_gate: true,
            ..d.attention()
        };
        let mut layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        let interval = self.full_attention_interval.unwrap_or(4).max(1);
        for (i, layer) in layers.iter_mut().enumerate() {
            let linear = match &d.windows.layer_types {
                Some(types) => types.get(i) == Some(&LayerType::LinearAttention),
                None => (i + 1) % interval != 0,
            };
            if linear {
                layer.mixer = MixerKind::GatedDeltaNet;
                layer.rope = None;
            }
        }
        config.ensure(layers.len() == n, "layer_types", || {
            format!("has {} entries for {n} layers", layers.len())
        })?;
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
        let eps = d.rms_norm_eps.unwrap_or(1e-6);
        Ok(DecoderSettings {
            norm: NormKind::RmsPlusOne,
            gated_delta_net: Some(GatedDeltaNetSettings {
                num_key_heads: self.linear_num_key_heads,
                num_value_heads: self.linear_num_value_heads,
                key_head_dim: self.linear_key_head_dim,
                value_head_dim: self.linear_value_head_dim,
                conv_kernel: self.linear_conv_kernel_dim,
                norm_eps: eps,
                chunk_size: 64,
                chunked_prefill: true,
            }),
            ..d.settings(attention, mlp, layers)
        })
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
