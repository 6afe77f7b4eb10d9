//! Llama 4 text (`llama4_text`, and the language model of `llama4` checkpoints): chunked
//! local attention with RoPE, global layers without it, and a mixture of experts every
//! `interleave_moe_layer_step` layers.
//!
//! - Pre-norm blocks, RMSNorm; attention with `attention_bias` on q/k/v/o.
//! - RoPE layers (`no_rope_layers` 1, by default all but every `no_rope_layer_interval`-th):
//!   RoPE on adjacent pairs (interleaved, llama3 scaling), then an unweighted RMS norm of
//!   each query/key head (`use_qk_norm`), and chunked attention (`attention_chunk_size`).
//! - Layers without RoPE: full causal attention, queries scaled by
//!   `log(1 + floor((p + 1) / floor_scale)) · attn_scale + 1` (`attn_temperature_tuning`).
//! - Feed-forward (`feed_forward`): on `moe_layers` (by default every
//!   `interleave_moe_layer_step`-th), the top `num_experts_per_tok` router logits pick the
//!   experts and `sigmoid(logit)` scales each expert's *input*; SwiGLU experts of width
//!   `intermediate_size` plus an ungated shared expert of the same width. Other layers keep
//!   a dense MLP of width `intermediate_size_mlp`.
//! - Checkpoints: Transformers' fused `experts.gate_up_proj` (`[experts, hidden, 2·inter]`,
//!   gate columns first) and `down_proj` (`[experts, inter, hidden]`), mlx-lm's split
//!   `experts.gate_proj`/`up_proj`/`down_proj`, and multimodal checkpoints'
//!   `language_model.` prefix (vision weights are dropped) load.

use crate::attention::TemperatureTuning;
use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{
    sanitize_moe, stacked_experts_name, DecoderConfig, DecoderFamily, LayerRule, MoeConfig,
};
use crate::moe::{ExpertActivation, RouterSettings, Scoring, SharedExpertSettings, SharedJoin};
use crate::transformer::{
    rope_layers, AttentionSettings, DecoderSettings, LayerType, MlpLayout, QkNorm,
};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `Llama4TextConfig` (the `text_config` of `llama4`
/// checkpoints); Transformers' defaults are in `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    /// The dense MLP's width on layers without experts.
    pub intermediate_size_mlp: i32,
    #[serde(default)]
    pub moe_layers: Option<Vec<usize>>,
    pub interleave_moe_layer_step: usize,
    pub use_qk_norm: bool,
    #[serde(default)]
    pub attention_chunk_size: Option<i32>,
    pub attn_temperature_tuning: bool,
    pub floor_scale: f64,
    pub attn_scale: f64,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":202048,"hidden_size":5120,"intermediate_size":8192,"intermediate_size_mlp":16384,"num_hidden_layers":48,"num_attention_heads":40,"num_key_value_heads":8,"head_dim":128,"hidden_act":"silu","max_position_embeddings":131072,"rms_norm_eps":1e-5,"tie_word_embeddings":false,"num_experts_per_tok":1,"num_local_experts":16,"interleave_moe_layer_step":1,"use_qk_norm":true,"no_rope_layer_interval":4,"attention_chunk_size":8192,"attn_temperature_tuning":true,"floor_scale":8192,"attn_scale":0.1,"attention_bias":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let n = d.num_hidden_layers;
        let attention = AttentionSettings {
            qk_norm: if self.use_qk_norm {
                QkNorm::L2AfterRope
            } else {
                QkNorm::None
            },
            qk_norm_eps: d.rms_norm_eps.unwrap_or(1e-5) as f32,
            temperature_tuning: self.attn_temperature_tuning.then_some(TemperatureTuning {
                floor_scale: self.floor_scale as f32,
                attn_scale: self.attn_scale as f32,
                position_offset: 1.0,
                all_layers: false,
            }),
            ..d.attention()
        };
        let rope = d.rope(500_000.0, true, config)?;
        // An empty `no_rope_layers` means the default, as in Transformers.
        let flags = d
            .no_rope
            .no_rope_layers
            .as_deref()
            .filter(|f| !f.is_empty());
        let uses_rope = rope_layers(n, flags, d.no_rope.no_rope_layer_interval.unwrap_or(4));
        config.ensure(uses_rope.len() == n, "no_rope_layers", || {
            format!("has {} entries for {n} layers", uses_rope.len())
        })?;
        let mut layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        let types = d.windows.layer_types.clone();
        for (i, layer) in layers.iter_mut().enumerate() {
            if !uses_rope[i] {
                layer.rope = None;
            }
            let chunked = match &types {
                Some(t) => t.get(i) == Some(&LayerType::ChunkedAttention),
                None => uses_rope[i],
            };
            layer.attention_chunk = self.attention_chunk_size.filter(|_| chunked);
        }
        let act = d.activation(config)?;
        let mlp = crate::transformer::MlpSettings {
            intermediate_size: self.intermediate_size_mlp,
            ..d.mlp(MlpLayout::Gated, act)
        };
        let router = RouterSettings {
            scoring: Scoring::SigmoidOnInput,
            ..self.moe.router()
        };
        let mut moe = self.moe.settings(
            router,
            d.intermediate_size,
            ExpertActivation::Glu(act),
            false,
        );
        moe.shared_expert = Some(SharedExpertSettings {
            intermediate_size: moe.intermediate_size,
            gated: false,
            bias: false,
            join: SharedJoin::Sum,
        });
        let step = self.interleave_moe_layer_step.max(1);
        let moe_layers: Vec<usize> = match &self.moe_layers {
            Some(list) => list.clone(),
            None => (step - 1..n).step_by(step).collect(),
        };
        Ok(d.settings(attention, mlp, layers)
            .with_moe(moe, |i| moe_layers.contains(&i)))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        // Multimodal checkpoints: the language model only.
        weights.rename(|name| {
            if name.starts_with("vision_model.") || name.starts_with("multi_modal_projector.") {
                return None;
            }
            let name = name.strip_prefix("language_model.").unwrap_or(name);
            Some(stacked_experts_name(&name.replacen(
                ".feed_forward.",
                ".mlp.",
                1,
            )))
        });
        // `x @ W` layouts: transpose to `[experts, out, in]` for the shared split.
        let fused: Vec<String> = weights
            .names()
            .filter(|n| {
                n.ends_with(".mlp.experts.gate_up_proj") || n.ends_with(".mlp.experts.down_proj")
            })
            .map(str::to_owned)
            .collect();
        for name in fused {
            let tensor = weights.remove(&name).expect("listed above");
            weights.insert(name, tensor.swap_axes(-1, -2)?);
        }
        sanitize_moe(weights, settings, None, &[])
    }
}

/// The registry's entry for multimodal `llama4` checkpoints: the language model, whose
/// settings sit in `text_config` (the vision tower's weights are dropped by `sanitize`).
pub fn load_multimodal(
    config: &ConfigFile,
    weights: Weights,
) -> Result<Box<dyn crate::model::LanguageModel>> {
    crate::family::load_text_config::<Config>(config, weights, "llama4_text")
}
