//! Qwen3-Next (`qwen3_next`): gated DeltaNet layers with a full-attention layer every
//! `full_attention_interval`, and a sparse mixture of experts with a gated shared expert.
//!
//! - Pre-norm blocks; every RMSNorm scales by `1 + weight` (weights stored as offsets).
//! - Linear-attention layers (`linear_attn`): the gated delta rule ([`crate::delta`]) over
//!   `linear_num_value_heads` heads, a causal conv of `linear_conv_kernel_dim` taps over
//!   q/k/v, a gated RMSNorm per value head. Their cache is a fixed-size state.
//! - Full-attention layers: `q_proj` also gives a sigmoid gate on the output, per-head q/k
//!   RMSNorm, RoPE on the first `partial_rotary_factor` (0.25 by default) of each head.
//! - Feed-forward: softmax top-k routing (`norm_topk_prob`) plus a shared expert scaled by
//!   `sigmoid(shared_expert_gate(x))`; dense on `mlp_only_layers`.

use crate::config::ConfigFile;
use crate::delta::GatedDeltaNetSettings;
use crate::error::Result;
use crate::family::{sanitize_moe, DecoderConfig, DecoderFamily, LayerRule, MoeConfig};
use crate::models::qwen3_moe::QWEN_EXPERTS;
use crate::moe::ExpertActivation;
use crate::rope::RopeFields;
use crate::transformer::{
    AttentionSettings, DecoderSettings, LayerType, MixerKind, MlpLayout, NormKind, QkNorm,
};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `Qwen3NextConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    #[serde(flatten)]
    pub linear: LinearAttentionConfig,
}

/// The gated-DeltaNet fields of Qwen3-Next and Qwen3.5 configs.
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

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":151936,"hidden_size":2048,"intermediate_size":5632,"num_hidden_layers":48,"num_attention_heads":16,"num_key_value_heads":2,"hidden_act":"silu","max_position_embeddings":32768,"rms_norm_eps":1e-6,"tie_word_embeddings":false,"attention_bias":false,"head_dim":256,"linear_conv_kernel_dim":4,"linear_key_head_dim":128,"linear_value_head_dim":128,"linear_num_key_heads":16,"linear_num_value_heads":32,"decoder_sparse_step":1,"moe_intermediate_size":512,"shared_expert_intermediate_size":512,"num_experts_per_tok":10,"num_experts":512,"norm_topk_prob":true}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let act = d.activation(config)?;
        let moe = self.moe.settings(
            self.moe.router(),
            d.intermediate_size,
            ExpertActivation::Glu(act),
            true,
        );
        Ok(self
            .linear
            .settings(d, config)?
            .with_moe(moe, |i| self.moe.is_sparse(i)))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        // Multi-token-prediction weights are not part of the causal model.
        weights.rename(|name| (!name.starts_with("mtp.")).then(|| name.to_owned()));
        unfold_mlx_lm_norms(weights)?;
        sanitize_moe(weights, settings, None, &QWEN_EXPERTS)
    }
}

/// The `1 + w` norms whose stored offsets mlx-lm's converter turns into the whole scale.
const PLUS_ONE_NORMS: [&str; 5] = [
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
];

/// Checkpoints mlx-lm converted (their conv weights `[channels, kernel, 1]`) store the
/// `1 + w` norms with the 1 added: takes it out again, exactly (a bf16 scale near 1 less 1
/// is a bf16 number). Qwen3-Next, Qwen3.5 and Qwen3.5-MoE.
pub fn unfold_mlx_lm_norms(weights: &mut Weights) -> Result<()> {
    shift_plus_one_norms(weights, -1.0)
}

/// What mlx-lm's converter does to these norms (the converse of
/// [`unfold_mlx_lm_norms`]): adds the 1.
pub fn fold_mlx_lm_norms(weights: &mut Weights) -> Result<()> {
    shift_plus_one_norms(weights, 1.0)
}

/// Adds `shift` to the `1 + w` norms of a checkpoint whose conv weights are in MLX's
/// layout (the conversions mlx-lm writes); nothing otherwise.
fn shift_plus_one_norms(weights: &mut Weights, shift: f32) -> Result<()> {
    if !weights.converted_by_mlx_lm() {
        return Ok(());
    }
    let norms: Vec<String> = weights
        .names()
        .filter(|n| PLUS_ONE_NORMS.iter().any(|s| n.ends_with(s)))
        .map(str::to_owned)
        .collect();
    for name in norms {
        let w = weights.remove(&name).expect("listed above");
        let shifted = w.add(mlx_rs::Array::from_f32(shift).as_dtype(w.dtype())?)?;
        weights.insert(name, shifted);
    }
    Ok(())
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
