//! OLMoE (`olmoe`): OLMo's decoder with a sparse mixture of experts in every layer.
//!
//! - Pre-norm blocks, RMSNorm; attention with RMSNorm of the whole query and key
//!   projections (before RoPE on the two halves of each head), optional `clip_qkv`.
//! - Feed-forward: softmax top-k routing over `num_experts` SwiGLU experts of width
//!   `intermediate_size` (renormalized when `norm_topk_prob`).

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{sanitize_moe, DecoderConfig, DecoderFamily, LayerRule, MoeConfig};
use crate::models::qwen3_moe::QWEN_EXPERTS;
use crate::moe::ExpertActivation;
use crate::transformer::{AttentionSettings, DecoderSettings, MlpLayout, QkNorm};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `OlmoeConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    /// Clamps q, k and v to `[-clip_qkv, clip_qkv]`.
    #[serde(default)]
    pub clip_qkv: Option<f64>,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":50304,"hidden_size":2048,"intermediate_size":2048,"num_hidden_layers":16,"num_attention_heads":16,"hidden_act":"silu","max_position_embeddings":4096,"rms_norm_eps":1e-5,"tie_word_embeddings":false,"attention_bias":false,"num_experts_per_tok":8,"num_experts":64,"norm_topk_prob":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let attention = AttentionSettings {
            qk_norm: QkNorm::Projection,
            clip_qkv: self.clip_qkv.map(|c| c as f32),
            ..d.attention()
        };
        let rope = d.rope(10_000.0, false, config)?;
        let layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
        let moe = self.moe.settings(
            self.moe.router(),
            d.intermediate_size,
            ExpertActivation::Glu(act),
            false,
        );
        Ok(d.settings(attention, mlp, layers).with_moe(moe, |_| true))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        sanitize_moe(weights, settings, None, &QWEN_EXPERTS)
    }
}
