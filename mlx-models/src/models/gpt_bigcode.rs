//! GPT-BigCode (`gpt_bigcode`: SantaCoder, StarCoder 1), ported from Transformers 5.23.0
//! (`GPTBigCodeForCausalLM`).
//!
//! Written by hand on GPT-2's composition ([`super::gpt2`]) and verified layer by layer
//! against the Transformers fixtures in `tests/fixtures/gpt_bigcode/`; see its
//! PORT_REPORT.md. It is GPT-2 with linear layers instead of `Conv1D`, and:
//!
//! - `multi_query` (the default): one key/value head shared by all query heads, `c_attn`'s
//!   rows being the queries, then the key, then the value;
//! - without it, a key/value head per query head, `c_attn` stored per head as
//!   `[q, k, v]` (reordered in `sanitize`).
//!
//! `attention_softmax_in_fp32` and `scale_attention_softmax_in_fp32` change where the
//! softmax rounds in half precision, not what it computes (MLX's attention takes its
//! softmax in f32); they are read and accepted.

use super::gpt2::{self, rename_gpt2_weights};
use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::DecoderFamily;
use crate::fused_qkv::per_head_to_blocks;
use crate::transformer::DecoderSettings;
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `GPTBigCodeConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// The fields GPT-2 has too (`n_embd`, `n_head`, `n_inner`, ...).
    #[serde(flatten)]
    pub gpt2: gpt2::Config,
    /// One key/value head for all query heads.
    pub multi_query: bool,
    /// Read and accepted (see the module's docs).
    pub attention_softmax_in_fp32: bool,
    /// Read and accepted (see the module's docs).
    pub scale_attention_softmax_in_fp32: bool,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":50257,"n_positions":1024,"n_embd":768,"n_layer":12,"n_head":12,"n_inner":null,"activation_function":"gelu_pytorch_tanh","layer_norm_epsilon":0.00001,"tie_word_embeddings":true,"scale_attn_weights":true,"scale_attn_by_inverse_layer_idx":false,"reorder_and_upcast_attn":false,"add_cross_attention":false,"multi_query":true,"attention_softmax_in_fp32":true,"scale_attention_softmax_in_fp32":true}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let g = &self.gpt2;
        g.check_options(config)?;
        let kv_heads = if self.multi_query { 1 } else { g.n_head };
        g.gpt2_settings(config, kv_heads)
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        rename_gpt2_weights(weights, settings.tie_word_embeddings);
        if !self.multi_query {
            let a = &settings.attention;
            for i in 0..settings.layers.len() {
                let qkv = format!("model.layers.{i}.self_attn.qkv_proj");
                per_head_to_blocks(weights, &qkv, a.num_heads, a.head_dim)?;
            }
        }
        Ok(())
    }
}
