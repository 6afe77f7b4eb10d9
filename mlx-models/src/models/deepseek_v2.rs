//! DeepSeek-V2 (`deepseek_v2`, also the Lite form without query LoRA): multi-head latent
//! attention and softmax routing with shared experts after `first_k_dense_replace` dense
//! layers.
//!
//! - Pre-norm blocks, RMSNorm; latent attention ([`crate::mla`]) as DeepSeek-V3's, RoPE on
//!   adjacent pairs of the rope part.
//! - Feed-forward: softmax router scores; `topk_method` `greedy` takes the top
//!   `num_experts_per_tok`, `group_limited_greedy` only among the `topk_group` groups of
//!   `n_group` whose best expert scores highest; weights are the chosen scores times
//!   `routed_scaling_factor`; plus `n_shared_experts` shared experts run as one MLP.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{DecoderConfig, DecoderFamily, LayerRule, MlaConfig, MoeConfig};
use crate::models::deepseek_v3;
use crate::moe::{ExpertActivation, ExpertGroups, GroupScore, RouterSettings};
use crate::transformer::{DecoderSettings, MlpLayout};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `DeepseekV2Config`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    #[serde(flatten)]
    pub mla: MlaConfig,
    /// `greedy` or `group_limited_greedy`.
    pub topk_method: String,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":102400,"hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,"hidden_act":"silu","max_position_embeddings":2048,"rms_norm_eps":1e-6,"tie_word_embeddings":false,"attention_bias":false,"mlp_bias":false,"first_k_dense_replace":0,"kv_lora_rank":512,"q_lora_rank":1536,"n_routed_experts":64,"n_shared_experts":2,"qk_nope_head_dim":128,"qk_rope_head_dim":64,"routed_scaling_factor":1.0,"topk_method":"greedy","norm_topk_prob":false,"v_head_dim":128,"moe_intermediate_size":1407}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let (d, m) = (&self.decoder, &self.moe);
        let rope = self.mla.rope(d, 10_000.0, true, config)?;
        let layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
        let groups = match self.topk_method.as_str() {
            "greedy" => None,
            "group_limited_greedy" => Some(ExpertGroups {
                groups: config.require("n_group", m.n_group)?,
                top_groups: config.require("topk_group", m.topk_group)?,
                score: GroupScore::Max,
            }),
            other => {
                return Err(crate::error::Error::config(
                    &config.path,
                    "topk_method",
                    format!("`{other}` is not supported (greedy, group_limited_greedy)"),
                ))
            }
        };
        // Transformers' DeepSeek-V2 router never renormalizes.
        let router = RouterSettings {
            groups,
            normalize: false,
            scaling_factor: m.routed_scaling_factor.map(|f| f as f32),
            ..m.router()
        };
        let moe = m.settings(
            router,
            d.intermediate_size,
            ExpertActivation::Glu(act),
            false,
        );
        Ok(d.settings(d.attention(), mlp, layers)
            .with_latent_attention(self.mla.settings(d, config)?)
            .with_moe(moe, |i| m.is_sparse(i)))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        deepseek_v3::sanitize(weights, settings)
    }
}
