//! Qwen3.5-MoE (`qwen3_5_moe_text`, and the language model of `qwen3_5_moe` checkpoints):
//! Qwen3.5's gated DeltaNet and gated full attention with Qwen3-Next's mixture of experts
//! in every layer.
//!
//! - As [`crate::models::qwen3_5_text`] for the mixers (separate DeltaNet projections,
//!   `1 + w` norms, partial RoPE) and the checkpoint layout (`qwen3_5_moe` checkpoints nest
//!   the settings in `text_config` and the weights under `model.language_model.`).
//! - Feed-forward: softmax top-k routing, always renormalized, plus a shared expert scaled
//!   by `sigmoid(shared_expert_gate(x))`, on every layer.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{sanitize_moe, DecoderConfig, DecoderFamily, MoeConfig};
use crate::models::qwen3_5_text::drop_vision_and_mtp;
use crate::models::qwen3_5_text::LinearAttentionConfig;
use crate::models::qwen3_moe::QWEN_EXPERTS;
use crate::moe::{ExpertActivation, RouterSettings};
use crate::transformer::DecoderSettings;
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `Qwen3_5MoeTextConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    #[serde(flatten)]
    pub linear: LinearAttentionConfig,
}

impl DecoderFamily for Config {
    // `intermediate_size` is not a field of this config (every layer is sparse); 0 stands
    // for the dense MLP no layer has.
    const DEFAULTS: &'static str = r#"{"vocab_size":248320,"hidden_size":2048,"intermediate_size":0,"num_hidden_layers":40,"num_attention_heads":16,"num_key_value_heads":2,"hidden_act":"silu","max_position_embeddings":32768,"rms_norm_eps":1e-6,"tie_word_embeddings":false,"attention_bias":false,"head_dim":256,"linear_conv_kernel_dim":4,"linear_key_head_dim":128,"linear_value_head_dim":128,"linear_num_key_heads":16,"linear_num_value_heads":32,"moe_intermediate_size":512,"shared_expert_intermediate_size":512,"num_experts_per_tok":8,"num_experts":256}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let act = d.activation(config)?;
        // Transformers' router renormalizes whatever `norm_topk_prob` says.
        let router = RouterSettings {
            normalize: true,
            ..self.moe.router()
        };
        let moe = self.moe.settings(
            router,
            d.intermediate_size,
            ExpertActivation::Glu(act),
            true,
        );
        Ok(self.linear.settings(d, config)?.with_moe(moe, |_| true))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        drop_vision_and_mtp(weights);
        sanitize_moe(weights, settings, None, &QWEN_EXPERTS)
    }
}

/// The registry's entry for multimodal `qwen3_5_moe` checkpoints: the language model,
/// whose settings sit in `text_config`.
pub fn load_multimodal(
    config: &ConfigFile,
    weights: Weights,
) -> Result<Box<dyn crate::model::LanguageModel>> {
    crate::family::load_text_config::<Config>(config, weights, "qwen3_5_moe_text")
}
