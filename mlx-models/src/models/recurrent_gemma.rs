//! RecurrentGemma (`recurrent_gemma`, Griffin): recurrent blocks ([`crate::rglru`]) and
//! local attention in the repeating pattern `block_types`, each followed by a GeGLU MLP.
//!
//! - Pre-norm blocks (`temporal_pre_norm`, `channel_pre_norm`), RMSNorm scaling by
//!   `1 + weight`; a final `final_norm`.
//! - Embeddings × `√hidden_size` rounded to bfloat16 (Transformers keeps that factor as a
//!   bfloat16 buffer); logits soft-capped by `logits_soft_cap`.
//! - Attention layers: local attention over `attention_window_size` tokens, RoPE on the
//!   first `partial_rotary_factor` of each head, biases on q/k/v when `attention_bias` and
//!   always on `o_proj`.
//! - MLP (`mlp_block`): `down(gelu_tanh(gate(x)) · up(x))` of width `intermediate_size / 2`,
//!   with biases.

use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::family::{DecoderConfig, DecoderFamily, LayerRule};
use crate::transformer::{
    drop_computed_weights, Activation, AttentionSettings, DecoderSettings, MixerKind, MlpLayout,
    MlpSettings, NormKind,
};
use crate::weights::{layer_index, Weights};
use serde::Deserialize;

/// config.json fields, with the names of `RecurrentGemmaConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(default)]
    pub lru_width: Option<i32>,
    pub attention_window_size: i32,
    pub logits_soft_cap: f64,
    pub conv1d_width: i32,
    #[serde(alias = "_block_types")]
    pub block_types: Vec<String>,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"num_hidden_layers":26,"vocab_size":256000,"hidden_size":2560,"intermediate_size":7680,"num_attention_heads":10,"attention_window_size":2048,"logits_soft_cap":30.0,"rms_norm_eps":1e-6,"hidden_activation":"gelu_pytorch_tanh","block_types":["recurrent","recurrent","attention"],"attention_bias":false,"tie_word_embeddings":true,"conv1d_width":4,"partial_rotary_factor":0.5,"max_position_embeddings":8192}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        config.ensure(!self.block_types.is_empty(), "block_types", || {
            "is empty".to_owned()
        })?;
        let width = self.lru_width.unwrap_or(d.hidden_size);
        let heads = d.num_attention_heads;
        config.ensure(heads > 0 && width % heads == 0, "lru_width", || {
            format!("{width} channels cannot be split into {heads} heads")
        })?;
        let rope = d.rope(10_000.0, false, config)?;
        let mut layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        for (i, layer) in layers.iter_mut().enumerate() {
            match self.block_types[i % self.block_types.len()].as_str() {
                "recurrent" => {
                    layer.mixer = MixerKind::RgLru;
                    layer.rope = None;
                }
                "attention" => layer.sliding_window = Some(self.attention_window_size),
                other => {
                    return Err(Error::config(
                        &config.path,
                        "block_types",
                        format!("`{other}` is neither `recurrent` nor `attention`"),
                    ))
                }
            }
        }
        let attention = AttentionSettings {
            qkv_bias: d.attention_bias.unwrap_or(false),
            o_bias: true,
            ..d.attention()
        };
        let mlp = MlpSettings {
            intermediate_size: d.intermediate_size / 2,
            layout: MlpLayout::Gated,
            activation: Activation::GeluTanh,
            bias: true,
        };
        Ok(DecoderSettings {
            norm: NormKind::RmsPlusOne,
            rg_lru: Some((width, heads, self.conv1d_width)),
            embedding_scale: Some(bf16_round((d.hidden_size as f32).sqrt())),
            final_logit_softcap: Some(self.logits_soft_cap as f32),
            ..d.settings(attention, mlp, layers)
        })
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        drop_computed_weights(weights, settings.tie_word_embeddings);
        let attention: Vec<bool> = settings
            .layers
            .iter()
            .map(|l| l.mixer == MixerKind::Attention)
            .collect();
        weights.rename(|name| {
            let name = name
                .replacen("model.final_norm.", "model.norm.", 1)
                .replacen(".temporal_pre_norm.", ".input_layernorm.", 1)
                .replacen(".channel_pre_norm.", ".post_attention_layernorm.", 1)
                .replacen(".mlp_block.", ".mlp.", 1);
            Some(match layer_index(&name) {
                Some(i) if attention.get(i) == Some(&true) => {
                    name.replacen(".temporal_block.", ".self_attn.", 1)
                }
                _ => name,
            })
        });
        Ok(())
    }
}

/// `v` rounded to the nearest bfloat16 (ties to even).
fn bf16_round(v: f32) -> f32 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(rounded)
}
