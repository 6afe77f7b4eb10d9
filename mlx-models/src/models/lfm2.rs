//! LFM2 (`lfm2`): gated short-convolution layers and grouped-query attention layers, each
//! followed by a SwiGLU MLP.
//!
//! - Pre-norm blocks (`operator_norm`, `ffn_norm`), RMSNorm (`norm_eps`), a final
//!   `embedding_norm`.
//! - Layers `layer_types` (or `full_attn_idxs`) marks `conv`: `in_proj` gives `B`, `C` and
//!   `x`; a causal depthwise conv of `conv_L_cache` taps runs over `B · x`;
//!   `out_proj(C · conv)`. Their cache is the conv state alone.
//! - Attention layers: per-head RMSNorm of queries and keys (`q_layernorm`, `k_layernorm`)
//!   before RoPE on the two halves of each head; `out_proj`.
//! - MLP (`feed_forward.w1/w3/w2`): `intermediate_size`, when `block_auto_adjust_ff_dim`,
//!   becomes `2/3` of it times `block_ffn_dim_multiplier`, rounded up to
//!   `block_multiple_of`.

use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::model::LanguageModel;
use crate::rope::RopeFields;
use crate::transformer::{
    build, drop_computed_weights, Activation, AttentionSettings, DecoderSettings, LayerSettings,
    MixerKind, MlpLayout, MlpSettings, QkNorm,
};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `Lfm2Config` (and its Hub aliases).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: i32,
    pub hidden_size: i32,
    #[serde(alias = "block_ff_dim")]
    pub intermediate_size: i32,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i32,
    pub num_key_value_heads: i32,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    #[serde(alias = "tie_embedding")]
    pub tie_word_embeddings: bool,
    pub conv_bias: bool,
    #[serde(rename = "conv_L_cache")]
    pub conv_l_cache: i32,
    pub block_multiple_of: i32,
    pub block_ffn_dim_multiplier: Option<f64>,
    pub block_auto_adjust_ff_dim: bool,
    #[serde(default)]
    pub full_attn_idxs: Option<Vec<usize>>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(flatten)]
    pub rope: RopeFields,
}

const DEFAULTS: &str = r#"{"vocab_size":65536,"hidden_size":2560,"intermediate_size":12288,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"max_position_embeddings":128000,"norm_eps":1e-5,"tie_word_embeddings":true,"conv_bias":false,"conv_L_cache":3,"block_multiple_of":256,"block_ffn_dim_multiplier":1.0,"block_auto_adjust_ff_dim":true}"#;

impl Config {
    /// The MLP width after LFM2's adjustment.
    pub fn mlp_width(&self) -> i32 {
        let mut width = self.intermediate_size;
        if self.block_auto_adjust_ff_dim {
            width = (2 * width) / 3;
            if let Some(m) = self.block_ffn_dim_multiplier {
                width = (m * f64::from(width)) as i32;
            }
            let multiple = self.block_multiple_of.max(1);
            width = multiple * ((width + multiple - 1) / multiple);
        }
        width
    }

    pub fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let n = self.num_hidden_layers;
        let heads = self.num_attention_heads;
        config.ensure(
            heads > 0 && self.hidden_size % heads == 0,
            "num_attention_heads",
            || {
                format!(
                    "{heads} heads do not divide hidden_size {}",
                    self.hidden_size
                )
            },
        )?;
        let head_dim = self.hidden_size / heads;
        let rope = crate::rope::Rope::new(crate::rope::RopeConfig::from_fields(
            &self.rope,
            head_dim,
            self.max_position_embeddings,
            1_000_000.0,
            &config.path,
        )?)?;
        let types: Vec<String> = match (&self.layer_types, &self.full_attn_idxs) {
            (Some(t), _) => t.clone(),
            (None, Some(idxs)) => (0..n)
                .map(|i| {
                    if idxs.contains(&i) {
                        "full_attention"
                    } else {
                        "conv"
                    }
                    .to_owned()
                })
                .collect(),
            (None, None) => vec!["full_attention".to_owned(); n],
        };
        config.ensure(types.len() == n, "layer_types", || {
            format!("has {} entries for {n} layers", types.len())
        })?;
        let layers = types
            .iter()
            .map(|t| match t.as_str() {
                "conv" => Ok(LayerSettings {
                    mixer: MixerKind::ShortConv,
                    ..LayerSettings::default()
                }),
                "full_attention" => Ok(LayerSettings {
                    rope: Some(rope.clone()),
                    ..LayerSettings::default()
                }),
                other => Err(Error::config(
                    &config.path,
                    "layer_types",
                    format!("`{other}` is neither `conv` nor `full_attention`"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let attention = AttentionSettings {
            qk_norm: QkNorm::PerHead,
            ..AttentionSettings::new(heads, self.num_key_value_heads, head_dim)
        };
        let mlp = MlpSettings {
            intermediate_size: self.mlp_width(),
            layout: MlpLayout::Gated,
            activation: Activation::Silu,
            bias: false,
        };
        Ok(DecoderSettings {
            short_conv: Some((self.conv_l_cache, self.conv_bias)),
            norm_eps: self.norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            ..DecoderSettings::new(
                "lfm2",
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

/// The registry's entry point.
pub fn load(config: &ConfigFile, mut weights: Weights) -> Result<Box<dyn LanguageModel>> {
    let c: Config = config.parse_with_defaults(DEFAULTS)?;
    let settings = c.settings(config)?;
    drop_computed_weights(&mut weights, settings.tie_word_embeddings);
    weights.rename(|name| {
        Some(
            name.replacen("model.embedding_norm.", "model.norm.", 1)
                .replacen(".operator_norm.", ".input_layernorm.", 1)
                .replacen(".ffn_norm.", ".post_attention_layernorm.", 1)
                .replacen(".feed_forward.w1.", ".mlp.gate_proj.", 1)
                .replacen(".feed_forward.w3.", ".mlp.up_proj.", 1)
                .replacen(".feed_forward.w2.", ".mlp.down_proj.", 1)
                .replacen(".self_attn.out_proj.", ".self_attn.o_proj.", 1)
                .replacen(".self_attn.q_layernorm.", ".self_attn.q_norm.", 1)
                .replacen(".self_attn.k_layernorm.", ".self_attn.k_norm.", 1),
        )
    });
    build(config, settings, weights)
}
