//! GLM-4.5 / GLM-4.6 (`glm4_moe`): grouped sigmoid routing with a correction bias and
//! shared experts, after `first_k_dense_replace` dense layers.
//!
//! - Pre-norm blocks, RMSNorm; attention with q/k/v biases (`attention_bias`, none on
//!   `o_proj`), optional RMSNorm of each query/key head before RoPE (`use_qk_norm`), RoPE on
//!   the first `partial_rotary_factor` of each head's features (halves).
//! - Feed-forward: from layer `first_k_dense_replace` on, `sigmoid` router scores; experts
//!   chosen by score plus `e_score_correction_bias` within the `topk_group` best of `n_group`
//!   groups, weighted by their scores (renormalized when `norm_topk_prob`) times
//!   `routed_scaling_factor`; plus `n_shared_experts` shared experts run as one MLP. The
//!   first layers keep a dense MLP of width `intermediate_size`.
//! - The multi-token-prediction layers some checkpoints carry past `num_hidden_layers`
//!   are not part of the causal model and are dropped.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{DecoderConfig, DecoderFamily, LayerRule, MoeConfig};
use crate::models::deepseek_v3;
use crate::moe::ExpertActivation;
use crate::transformer::{AttentionSettings, DecoderSettings, MlpLayout, QkNorm};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `Glm4MoeConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    /// RMSNorm of each query/key head before RoPE.
    pub use_qk_norm: bool,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":151552,"hidden_size":4096,"intermediate_size":10944,"num_hidden_layers":46,"num_attention_heads":96,"num_key_value_heads":8,"hidden_act":"silu","max_position_embeddings":131072,"rms_norm_eps":1e-5,"tie_word_embeddings":false,"attention_bias":false,"partial_rotary_factor":0.5,"moe_intermediate_size":1408,"num_experts_per_tok":8,"n_shared_experts":1,"n_routed_experts":128,"routed_scaling_factor":1.0,"n_group":1,"topk_group":1,"first_k_dense_replace":1,"norm_topk_prob":true,"use_qk_norm":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let attention = AttentionSettings {
            qk_norm: if self.use_qk_norm {
                QkNorm::PerHead
            } else {
                QkNorm::None
            },
            o_bias: false,
            ..d.attention()
        };
        let rope = d.rope(10_000.0, false, config)?;
        let layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
        let m = &self.moe;
        let moe = m.settings(
            m.grouped_sigmoid_router(config)?,
            d.intermediate_size,
            ExpertActivation::Glu(act),
            false,
        );
        Ok(d.settings(attention, mlp, layers)
            .with_moe(moe, |i| m.is_sparse(i)))
    }

    /// Laid out as DeepSeek-V3's checkpoints: multi-token-prediction layers after the
    /// decoder's, `shared_experts`, per-expert or fused experts.
    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        deepseek_v3::sanitize(weights, settings)
    }
}
