//! What every language model offers, whatever its layers are made of: the trait the
//! families implement and generation, chat and verification use.
//!
//! It sits below the model zoo (`models`) and the shared blocks (`transformer`, `family`),
//! so that both can name it without importing each other.

use crate::cache::LayerCache;
use crate::error::Result;
use crate::nn::Quantization;
use crate::rope::Rope;
use crate::tap::Tap;
use mlx_rs::{Array, Dtype};

/// A causal language model.
pub trait LanguageModel: Send {
    /// Logits `[batch, tokens, vocab]` for `tokens` (`[batch, tokens]`, int32) following
    /// what `cache` holds; each layer's cache is extended with the new tokens.
    fn forward(&self, tokens: &Array, cache: &mut [LayerCache], tap: &mut Tap) -> Result<Array>;

    /// An empty cache, one entry per layer, each of the kind its layer needs.
    fn new_cache(&self) -> Vec<LayerCache>;

    /// Facts about the model.
    fn info(&self) -> &ModelInfo;

    /// The RoPE of the full-attention layers (for verification).
    fn rope(&self) -> Option<&Rope>;

    /// The RoPE of the sliding-window layers where it differs from [`LanguageModel::rope`]
    /// (Gemma 3's local base).
    fn local_rope(&self) -> Option<&Rope> {
        None
    }

    /// Positions are ALiBi's alone (no RoPE, no position table): each score's bias follows
    /// the distance between its query and key slots, so the rows of a left-padded batch
    /// need no position of their own.
    fn alibi(&self) -> bool {
        false
    }
}

/// Facts about a loaded model, for `info` and for generation limits.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub model_type: String,
    pub vocab_size: i32,
    pub hidden_size: i32,
    pub num_layers: usize,
    /// The longest context the model was configured for.
    pub max_position_embeddings: usize,
    pub dtype: Dtype,
    pub quantization: Option<Quantization>,
    /// Parameters, quantized matrices counted by their logical size (every expert of a
    /// mixture-of-experts layer included).
    pub num_parameters: usize,
    /// Parameters one token goes through: [`ModelInfo::num_parameters`] less the experts a
    /// token is not routed to.
    pub num_active_parameters: usize,
}
