//! DeepSeek-V3 (`deepseek_v3`; Kimi K2's `kimi_k2` loads as this): multi-head latent
//! attention and grouped sigmoid routing with shared experts after
//! `first_k_dense_replace` dense layers.
//!
//! - Pre-norm blocks, RMSNorm; latent attention ([`crate::mla`]): low-rank queries (or
//!   `q_proj` when `q_lora_rank` is null), one compressed latent and RoPE key per token,
//!   cached as such; RoPE on adjacent pairs of the rope part (`rope_interleave`), scores
//!   scaled by `(qk_nope_head_dim + qk_rope_head_dim)^-0.5` times YaRN's `mscale²`.
//! - Feed-forward: from layer `first_k_dense_replace` on, `sigmoid` router scores; experts
//!   chosen by score plus `e_score_correction_bias` within the `topk_group` best of `n_group`
//!   groups (each scored by its two best), weighted by their scores (renormalized when
//!   `norm_topk_prob`) times `routed_scaling_factor`; plus `n_shared_experts` shared experts
//!   run as one MLP. The first layers keep a dense MLP of width `intermediate_size`.
//! - The multi-token-prediction layers checkpoints carry past `num_hidden_layers` are not
//!   part of the causal model and are dropped.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{sanitize_moe, DecoderConfig, DecoderFamily, LayerRule, MlaConfig, MoeConfig};
use crate::models::qwen3_moe::QWEN_EXPERTS;
use crate::moe::ExpertActivation;
use crate::transformer::{DecoderSettings, MlpLayout};
use crate::weights::{layer_index, Weights};
use serde::Deserialize;

/// config.json fields, with the names of `DeepseekV3Config`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    #[serde(flatten)]
    pub mla: MlaConfig,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":129280,"hidden_size":7168,"intermediate_size":18432,"moe_intermediate_size":2048,"num_hidden_layers":61,"num_attention_heads":128,"num_key_value_heads":128,"n_shared_experts":1,"n_routed_experts":256,"routed_scaling_factor":2.5,"kv_lora_rank":512,"q_lora_rank":1536,"qk_rope_head_dim":64,"v_head_dim":128,"qk_nope_head_dim":128,"n_group":8,"topk_group":4,"num_experts_per_tok":8,"first_k_dense_replace":3,"norm_topk_prob":true,"hidden_act":"silu","max_position_embeddings":4096,"rms_norm_eps":1e-6,"tie_word_embeddings":false,"rope_interleave":true,"attention_bias":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        settings(&self.decoder, &self.moe, &self.mla, config)
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        sanitize(weights, settings)
    }
}

/// The decoder of DeepSeek-V3-shaped configs (also GLM-4.7-Flash's).
pub fn settings(
    d: &DecoderConfig,
    m: &MoeConfig,
    mla: &MlaConfig,
    config: &ConfigFile,
) -> Result<DecoderSettings> {
    let rope = mla.rope(d, 10_000.0, true, config)?;
    let layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
    let act = d.activation(config)?;
    let mlp = d.mlp(MlpLayout::Gated, act);
    let moe = m.settings(
        m.grouped_sigmoid_router(config)?,
        d.intermediate_size,
        ExpertActivation::Glu(act),
        false,
    );
    Ok(d.settings(d.attention(), mlp, layers)
        .with_latent_attention(mla.settings(d, config)?)
        .with_moe(moe, |i| m.is_sparse(i)))
}

/// Drops the multi-token-prediction layers past the model's, names the shared experts as
/// the MoE block loads them, stacks the experts, and rebuilds a `kv_b_proj` that mlx-lm
/// split into `embed_q` / `unembed_out`.
pub fn sanitize(weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
    if let Some(mla) = &settings.latent_attention {
        crate::mla::merge_split_kv_b(weights, mla)?;
    }
    let layers = settings.layers.len();
    weights.rename(|name| {
        let extra = layer_index(name).is_some_and(|i| i >= layers);
        (!extra).then(|| name.replacen(".mlp.shared_experts.", ".mlp.shared_expert.", 1))
    });
    sanitize_moe(weights, settings, None, &QWEN_EXPERTS)
}
