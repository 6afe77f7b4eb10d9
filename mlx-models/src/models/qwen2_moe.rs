//! Qwen2-MoE (`qwen2_moe`, Qwen1.5-MoE): Qwen2's attention with a sparse mixture of
//! experts and a gated shared expert.
//!
//! - Pre-norm blocks, RMSNorm; attention with q/k/v biases (`qkv_bias`), RoPE on the two
//!   halves of each head; when `use_sliding_window`, every other layer from the first slides
//!   below `max_window_layers`.
//! - Feed-forward: softmax top-k routing over `num_experts` SwiGLU experts of width
//!   `moe_intermediate_size` (renormalized when `norm_topk_prob`), plus a shared expert of
//!   width `shared_expert_intermediate_size` scaled by `sigmoid(shared_expert_gate(x))`, on
//!   the layers not in `mlp_only_layers` that are multiples of `decoder_sparse_step`; the
//!   others keep a dense MLP of width `intermediate_size`.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{sanitize_moe, DecoderConfig, DecoderFamily, LayerRule, MoeConfig};
use crate::models::qwen3_moe::QWEN_EXPERTS;
use crate::moe::ExpertActivation;
use crate::transformer::{AttentionSettings, DecoderSettings, MlpLayout};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `Qwen2MoeConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    /// Bias on the q/k/v projections.
    pub qkv_bias: bool,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":151936,"hidden_size":2048,"intermediate_size":5632,"num_hidden_layers":24,"num_attention_heads":16,"num_key_value_heads":16,"hidden_act":"silu","max_position_embeddings":32768,"rms_norm_eps":1e-6,"tie_word_embeddings":false,"use_sliding_window":false,"sliding_window":4096,"max_window_layers":28,"decoder_sparse_step":1,"moe_intermediate_size":1408,"shared_expert_intermediate_size":5632,"num_experts_per_tok":4,"num_experts":60,"norm_topk_prob":false,"qkv_bias":true}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let attention = AttentionSettings {
            qkv_bias: self.qkv_bias,
            ..d.attention()
        };
        let rope = d.rope(10_000.0, false, config)?;
        let rule = LayerRule::AlternateBelowMaxWindowLayers;
        let layers = d.layers(rule, Some(&rope), None, false);
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
        let moe = self.moe.settings(
            self.moe.router(),
            d.intermediate_size,
            ExpertActivation::Glu(act),
            true,
        );
        Ok(d.settings(attention, mlp, layers)
            .with_moe(moe, |i| self.moe.is_sparse(i)))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        sanitize_moe(weights, settings, None, &QWEN_EXPERTS)
    }
}
