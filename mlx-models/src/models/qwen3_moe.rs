//! Qwen3-MoE (`qwen3_moe`): Qwen3's attention with a sparse mixture of experts.
//!
//! - Pre-norm blocks, RMSNorm; attention with RMSNorm of each query/key head before RoPE
//!   (halves), `attention_bias`, explicit `head_dim`; every layer slides when
//!   `use_sliding_window`.
//! - Feed-forward: softmax top-k routing over `num_experts` SwiGLU experts of width
//!   `moe_intermediate_size` (renormalized when `norm_topk_prob`), on the layers not in
//!   `mlp_only_layers` that are multiples of `decoder_sparse_step`; the others keep a dense
//!   MLP of width `intermediate_size`.
//! - Checkpoints: the Hub's `mlp.experts.<i>.gate_proj/up_proj/down_proj`, Transformers 5's
//!   fused experts, and mlx-community's `switch_mlp` all load.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{sanitize_moe, DecoderConfig, DecoderFamily, LayerRule, MoeConfig};
use crate::moe::ExpertActivation;
use crate::transformer::{AttentionSettings, DecoderSettings, MlpLayout, QkNorm};
use crate::weights::Weights;
use serde::Deserialize;

/// The projection names of Qwen-style experts, as they are.
pub const QWEN_EXPERTS: [(&str, &str); 3] = [
    ("gate_proj", "gate_proj"),
    ("up_proj", "up_proj"),
    ("down_proj", "down_proj"),
];

/// config.json fields, with the names of `Qwen3MoeConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":151936,"hidden_size":2048,"intermediate_size":6144,"num_hidden_layers":24,"num_attention_heads":32,"num_key_value_heads":4,"hidden_act":"silu","max_position_embeddings":32768,"rms_norm_eps":1e-6,"tie_word_embeddings":false,"attention_bias":false,"use_sliding_window":false,"sliding_window":4096,"decoder_sparse_step":1,"moe_intermediate_size":768,"num_experts_per_tok":8,"num_experts":128,"norm_topk_prob":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let attention = AttentionSettings {
            qk_norm: QkNorm::PerHead,
            ..d.attention()
        };
        let rope = d.rope(10_000.0, false, config)?;
        let layers = d.layers(LayerRule::AllWhenEnabled, Some(&rope), None, false);
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
        let moe = self.moe.settings(
            self.moe.router(),
            d.intermediate_size,
            ExpertActivation::Glu(act),
            false,
        );
        Ok(d.settings(attention, mlp, layers)
            .with_moe(moe, |i| self.moe.is_sparse(i)))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        sanitize_moe(weights, settings, None, &QWEN_EXPERTS)
    }
}
