//! Phi-3.5-MoE (`phimoe`): LayerNorms with biases, sparsemixer routing in every layer.
//!
//! - Pre-norm blocks with LayerNorm (weight and bias, eps `rms_norm_eps`); attention with
//!   `attention_bias` on q/k/v/o, RoPE on the two halves of each head, `sliding_window` on
//!   every layer when set; an output layer with a bias when `lm_head_bias`.
//! - LongRoPE as Transformers computes it for this family: always the short factors, cos
//!   and sin scaled by `long_mscale` once the sequence outgrows
//!   `original_max_position_embeddings`, by `short_mscale` before.
//! - Feed-forward: the sparsemixer picks 2 of `num_local_experts` SwiGLU experts (width
//!   `intermediate_size`): each pick weighted by the softmax of the logits within
//!   `2 · router_jitter_noise` (relative) of it, the second chosen with the first masked.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{sanitize_moe, DecoderConfig, DecoderFamily, LayerRule, MoeConfig};
use crate::moe::{ExpertActivation, RouterSettings, Scoring};
use crate::rope::{Rope, RopeScaling};
use crate::transformer::{AttentionSettings, DecoderSettings, MlpLayout, NormKind};
use crate::weights::Weights;
use serde::Deserialize;
use serde_json::Value;

/// config.json fields, with the names of `PhimoeConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    /// The sparsemixer's threshold.
    pub router_jitter_noise: f64,
    pub lm_head_bias: bool,
}

impl Config {
    /// The RoPE of `rope_parameters` / `rope_scaling`, LongRoPE turned into the
    /// short-factor form this family's Transformers code applies.
    fn rope(&self, config: &ConfigFile) -> Result<Rope> {
        let d = &self.decoder;
        let rope = d.rope(1_000_000.0, false, config)?;
        let RopeScaling::LongRope {
            short_factor,
            original_max_position_embeddings,
            attention_factor,
            ..
        } = &rope.config().scaling
        else {
            return Ok(rope);
        };
        let params = d
            .rope
            .rope_parameters
            .as_ref()
            .or(d.rope.rope_scaling.as_ref());
        let mscale = |name: &str| {
            params
                .and_then(|p| p.get(name))
                .and_then(Value::as_f64)
                .unwrap_or(*attention_factor)
        };
        let mut rope_config = rope.config().clone();
        rope_config.scaling = RopeScaling::ShortFactorLongRope {
            short_factor: short_factor.clone(),
            original_max_position_embeddings: *original_max_position_embeddings,
            short_mscale: mscale("short_mscale"),
            long_mscale: mscale("long_mscale"),
        };
        Rope::new(rope_config)
    }
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":32064,"hidden_size":4096,"intermediate_size":6400,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"hidden_act":"silu","max_position_embeddings":131072,"rms_norm_eps":1e-5,"tie_word_embeddings":false,"num_experts_per_tok":2,"num_local_experts":16,"router_jitter_noise":0.01,"attention_bias":false,"lm_head_bias":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let rope = self.rope(config)?;
        let layers = d.layers(LayerRule::All, Some(&rope), None, false);
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
        let router = RouterSettings {
            scoring: Scoring::SparseMixer {
                jitter_eps: self.router_jitter_noise as f32,
            },
            ..self.moe.router()
        };
        let moe = self.moe.settings(
            router,
            d.intermediate_size,
            ExpertActivation::Glu(act),
            false,
        );
        let settings = DecoderSettings {
            norm: NormKind::Layer { bias: true },
            norm_eps: d.rms_norm_eps.unwrap_or(1e-5),
            lm_head_bias: self.lm_head_bias,
            ..d.settings(AttentionSettings { ..d.attention() }, mlp, layers)
        };
        Ok(settings.with_moe(moe, |_| true))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        weights.rename(|name| Some(name.replacen(".mlp.router.", ".mlp.gate.", 1)));
        let projections = [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")];
        sanitize_moe(weights, settings, Some("block_sparse_moe"), &projections)
    }
}
