//! Jamba (`jamba`): Mamba (1) layers with an attention layer every `attn_layer_period`, and
//! a mixture of experts every `expert_layer_period` layers.
//!
//! - Pre-norm blocks (`input_layernorm`, `pre_ff_layernorm`), RMSNorm; a final
//!   `final_layernorm`.
//! - Layer `i` attends when `i % attn_layer_period == attn_layer_offset` (grouped-query
//!   attention without positional encoding), else runs the Mamba mixer (`mamba_*` fields)
//!   with weighted RMSNorms on its `dt`, `B` and `C`.
//! - Its feed-forward is a mixture of experts (softmax top-k, not renormalized) when
//!   `i % expert_layer_period == expert_layer_offset`, else a dense SwiGLU MLP.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{sanitize_moe, DecoderConfig, DecoderFamily, LayerRule, MoeConfig};
use crate::models::qwen3_moe::QWEN_EXPERTS;
use crate::moe::ExpertActivation;
use crate::ssm::MambaSettings;
use crate::transformer::{DecoderSettings, MixerKind, MlpLayout};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `JambaConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    pub attn_layer_period: usize,
    pub attn_layer_offset: usize,
    pub expert_layer_period: usize,
    pub expert_layer_offset: usize,
    pub mamba_d_state: i32,
    pub mamba_d_conv: i32,
    pub mamba_expand: i32,
    /// A number, or "auto" (`ceil(hidden / 16)`).
    pub mamba_dt_rank: serde_json::Value,
    pub mamba_conv_bias: bool,
    pub mamba_proj_bias: bool,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":65536,"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"hidden_act":"silu","max_position_embeddings":262144,"rms_norm_eps":1e-6,"tie_word_embeddings":false,"num_experts_per_tok":2,"num_experts":16,"expert_layer_period":2,"expert_layer_offset":1,"attn_layer_period":8,"attn_layer_offset":4,"mamba_d_state":16,"mamba_d_conv":4,"mamba_expand":2,"mamba_dt_rank":"auto","mamba_conv_bias":true,"mamba_proj_bias":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let rank = match &self.mamba_dt_rank {
            serde_json::Value::String(s) if s == "auto" => (d.hidden_size + 15) / 16,
            v => v.as_i64().map(|v| v as i32).ok_or_else(|| {
                crate::error::Error::config(
                    &config.path,
                    "mamba_dt_rank",
                    "must be a number or \"auto\"",
                )
            })?,
        };
        config.ensure(
            self.attn_layer_period > 0 && self.expert_layer_period > 0,
            "attn_layer_period",
            || "layer periods must be positive".to_owned(),
        )?;
        let mut layers = d.layers(LayerRule::NoSliding, None, None, false);
        for (i, layer) in layers.iter_mut().enumerate() {
            if i % self.attn_layer_period != self.attn_layer_offset {
                layer.mixer = MixerKind::Mamba;
            }
        }
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
        let moe = self.moe.settings(
            self.moe.router(),
            d.intermediate_size,
            ExpertActivation::Glu(act),
            false,
        );
        let (period, offset) = (self.expert_layer_period, self.expert_layer_offset);
        Ok(DecoderSettings {
            mamba: Some(MambaSettings {
                intermediate_size: self.mamba_expand * d.hidden_size,
                state_size: self.mamba_d_state,
                time_step_rank: rank,
                conv_kernel: self.mamba_d_conv,
                conv_bias: self.mamba_conv_bias,
                bias: self.mamba_proj_bias,
                bcdt_rms_eps: None,
                bcdt_norm_eps: Some(d.rms_norm_eps.unwrap_or(1e-6)),
            }),
            ..d.settings(d.attention(), mlp, layers)
        }
        .with_moe(moe, |i| i % period == offset))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        weights.rename(|name| {
            Some(
                name.replacen("model.final_layernorm.", "model.norm.", 1)
                    .replacen(".pre_ff_layernorm.", ".post_attention_layernorm.", 1)
                    .replacen(".mamba.", ".mixer.", 1)
                    .replacen(".feed_forward.router.", ".feed_forward.gate.", 1),
            )
        });
        sanitize_moe(weights, settings, Some("feed_forward"), &QWEN_EXPERTS)
    }
}
