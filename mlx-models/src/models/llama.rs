//! Llama, and the families that share its shape (`mistral`).
//!
//! Pre-norm decoder blocks: RMSNorm → grouped-query attention with RoPE → residual,
//! RMSNorm → SwiGLU MLP → residual; a final RMSNorm and the output layer (or the
//! embedding matrix when tied).

use super::LanguageModel;
use crate::config::ConfigFile;
use crate::error::Result;
use crate::rope::{Rope, RopeConfig, RopeFields};
use crate::transformer::{
    build, drop_computed_weights, Activation, AttentionSettings, DecoderSettings,
    LayerSettings, MlpLayout, MlpSettings,
};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with Transformers' names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub intermediate_size: i32,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i32,
    pub num_key_value_heads: Option<i32>,
    pub head_dim: Option<i32>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Rotate adjacent pairs instead of halves (mlx-lm's field; Transformers checkpoints
    /// never need it).
    #[serde(default)]
    pub rope_traditional: bool,
    /// Mistral: each token attends to at most this many tokens.
    pub sliding_window: Option<i32>,
    #[serde(flatten)]
    pub rope: RopeFields,
}

fn default_hidden_act() -> String {
    "silu".to_owned()
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

impl Config {
    fn num_kv_heads(&self) -> i32 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    fn head_dim(&self) -> i32 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The decoder this config describes: pre-norm blocks, SwiGLU MLP, RMSNorm.
    pub fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let rope = Rope::new(RopeConfig {
            traditional: self.rope_traditional,
            ..RopeConfig::from_fields(
                &self.rope,
                self.head_dim(),
                self.max_position_embeddings,
                10_000.0,
                &config.path,
            )?
        })?;
        let layers = (0..self.num_hidden_layers)
            .map(|_| LayerSettings {
                rope: Some(rope.clone()),
                sliding_window: self.sliding_window,
            })
            .collect();
        let attention = AttentionSettings {
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            ..AttentionSettings::new(self.num_attention_heads, self.num_kv_heads(), self.head_dim())
        };
        let mlp = MlpSettings {
            intermediate_size: self.intermediate_size,
            layout: MlpLayout::Gated,
            activation: Activation::from_config(config, "hidden_act", &self.hidden_act)?,
            bias: self.mlp_bias,
        };
        Ok(DecoderSettings {
            norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            ..DecoderSettings::new(
                &self.model_type,
                self.vocab_size,
                self.hidden_size,
                self.max_position_embeddings,
                attention,
                mlp,
                layers,
            )
        })
    }
}

/// Drops what the model computes itself (`rotary_emb.inv_freq`) and the output layer of
/// tied checkpoints that store it anyway.
pub fn sanitize(weights: &mut Weights, cfg: &Config) {
    drop_computed_weights(weights, cfg.tie_word_embeddings);
}

/// The registry's entry point.
pub fn load(config: &ConfigFile, mut weights: Weights) -> Result<Box<dyn LanguageModel>> {
    let cfg: Config = config.parse()?;
    sanitize(&mut weights, &cfg);
    build(config, cfg.settings(config)?, weights)
}
