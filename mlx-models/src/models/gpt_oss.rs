//! gpt-oss (`gpt_oss`): attention sinks, alternating sliding-window layers and experts with
//! biases and a clamped SwiGLU, in every layer.
//!
//! - Pre-norm blocks, RMSNorm; attention with biases on q/k/v/o, a learned sink logit per
//!   head (`sinks`), YaRN RoPE on the two halves of each head; even layers slide
//!   (`layer_types`, window `sliding_window`).
//! - Feed-forward: the router (`router`, with a bias) keeps the top `num_experts_per_tok`
//!   logits and weighs them by their softmax; each expert computes
//!   `(clip(up, ±limit) + 1) · g · sigmoid(alpha · g)` with `g = min(gate, limit)`.
//! - Checkpoints: Transformers' fused `experts.gate_up_proj` (`[experts, hidden, 2·inter]`,
//!   gate and up interleaved column by column) with `gate_up_proj_bias`, `down_proj`
//!   (`[experts, inter, hidden]`) with `down_proj_bias`, and mlx-lm's split
//!   `experts.gate_proj`/`up_proj`/`down_proj` layout load.

use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::family::{
    sanitize_moe, stacked_experts_name, DecoderConfig, DecoderFamily, LayerRule, MoeConfig,
};
use crate::moe::{ExpertActivation, RouterSettings};
use crate::rope::RopeFields;
use crate::transformer::{AttentionSettings, DecoderSettings, MlpLayout};
use crate::weights::Weights;
use mlx_rs::Array;
use serde::Deserialize;
use serde_json::json;

/// config.json fields, with the names of `GptOssConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    pub swiglu_alpha: f64,
    pub swiglu_limit: f64,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"num_hidden_layers":36,"num_local_experts":128,"vocab_size":201088,"hidden_size":2880,"intermediate_size":2880,"head_dim":64,"num_attention_heads":64,"num_key_value_heads":8,"sliding_window":128,"tie_word_embeddings":false,"hidden_act":"silu","max_position_embeddings":131072,"rms_norm_eps":1e-5,"num_experts_per_tok":4,"swiglu_alpha":1.702,"swiglu_limit":7.0,"attention_bias":true}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let attention = AttentionSettings {
            sinks: true,
            ..d.attention()
        };
        // Without any RoPE fields, Transformers' default: YaRN ×32 over 4096 positions.
        let fields = if d.rope.rope_parameters.is_none() && d.rope.rope_scaling.is_none() {
            RopeFields {
                rope_parameters: Some(json!({
                    "rope_type": "yarn",
                    "rope_theta": d.rope.rope_theta.unwrap_or(150_000.0),
                    "factor": 32.0,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "truncate": false,
                    "original_max_position_embeddings": 4096,
                })),
                ..d.rope.clone()
            }
        } else {
            d.rope.clone()
        };
        let rope = d.rope_from(&fields, 150_000.0, false, config)?;
        let layers = d.layers(LayerRule::EveryNth(2), Some(&rope), None, false);
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
        let router = RouterSettings {
            normalize: true,
            bias: true,
            ..self.moe.router()
        };
        let activation = ExpertActivation::ClampedSwiglu {
            alpha: self.swiglu_alpha as f32,
            limit: self.swiglu_limit as f32,
        };
        let mut moe = self
            .moe
            .settings(router, d.intermediate_size, activation, false);
        moe.expert_bias = true;
        Ok(d.settings(attention, mlp, layers).with_moe(moe, |_| true))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        weights.rename(|name| Some(stacked_experts_name(name)));
        let fused: Vec<String> = weights
            .names()
            .filter(|n| {
                n.ends_with(".mlp.experts.gate_up_proj") || n.ends_with(".mlp.experts.down_proj")
            })
            .map(str::to_owned)
            .collect();
        for name in fused {
            let prefix = name[..name.rfind(".experts.").expect("filtered above")].to_owned();
            let part = |p: &str| format!("{prefix}.switch_mlp.{p}");
            let tensor = weights.remove(&name).expect("listed above");
            let bias = weights.remove(&format!("{name}_bias"));
            let bad = |t: &Array| Error::WeightShape {
                path: weights.source().to_path_buf(),
                name: name.clone(),
                expected: vec![-1, -1, -1],
                actual: t.shape().to_vec(),
            };
            if tensor.ndim() != 3 {
                return Err(bad(&tensor));
            }
            // `x @ W` layouts: transpose to `[experts, out, in]`.
            let weight = tensor.swap_axes(1, 2)?;
            if name.ends_with("down_proj") {
                weights.insert(part("down_proj.weight"), weight);
                if let Some(b) = bias {
                    weights.insert(part("down_proj.bias"), b);
                }
                continue;
            }
            let (e, rows, cols) = (weight.dim(0), weight.dim(1), weight.dim(2));
            if rows % 2 != 0 {
                return Err(bad(&tensor));
            }
            // Gate and up alternate row by row.
            let pairs = weight.reshape(&[e, rows / 2, 2, cols])?;
            let pick = |a: &Array, i: i32| a.take_axis(Array::from_int(i), 2);
            weights.insert(part("gate_proj.weight"), pick(&pairs, 0)?);
            weights.insert(part("up_proj.weight"), pick(&pairs, 1)?);
            if let Some(b) = bias {
                let pairs = b.reshape(&[e, rows / 2, 2])?;
                weights.insert(part("gate_proj.bias"), pick(&pairs, 0)?);
                weights.insert(part("up_proj.bias"), pick(&pairs, 1)?);
            }
        }
        sanitize_moe(weights, settings, None, &[])
    }
}
