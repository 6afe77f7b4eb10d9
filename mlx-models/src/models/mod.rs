//! The model zoo: one module per architecture family, and the registry from
//! `model_type` to module.

pub mod gemma;
pub mod gemma2;
pub mod gemma3_text;
pub mod granite;
pub mod llama;
pub mod olmo2;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod smollm3;
pub mod starcoder2;

use crate::cache::KvCache;
use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::family;
use crate::nn::Quantization;
use crate::rope::Rope;
use crate::tap::Tap;
use crate::weights::Weights;
use mlx_rs::{Array, Dtype};

/// A causal language model.
pub trait LanguageModel: Send {
    /// Logits `[batch, tokens, vocab]` for `tokens` (`[batch, tokens]`, int32) following
    /// what `cache` holds; the cache is extended with the new tokens.
    fn forward(&self, tokens: &Array, cache: &mut [KvCache], tap: &mut Tap) -> Result<Array>;

    /// An empty cache, one entry per layer.
    fn new_cache(&self) -> Vec<KvCache>;

    /// Facts about the model.
    fn info(&self) -> &ModelInfo;

    /// The RoPE of the full-attention layers (for verification).
    fn rope(&self) -> Option<&Rope>;

    /// The RoPE of the sliding-window layers where it differs from [`LanguageModel::rope`]
    /// (Gemma 3's local base).
    fn local_rope(&self) -> Option<&Rope> {
        None
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
    /// Parameters, quantized matrices counted by their logical size.
    pub num_parameters: usize,
}

/// Builds a model from its config and weights.
pub type Loader = fn(&ConfigFile, Weights) -> Result<Box<dyn LanguageModel>>;

/// Every supported `model_type` and the module that implements it.
pub const REGISTRY: &[(&str, Loader)] = &[
    ("gemma", family::load::<gemma::Config>),
    ("gemma2", family::load::<gemma2::Config>),
    ("gemma3_text", family::load::<gemma3_text::Config>),
    ("granite", family::load::<granite::Config>),
    ("llama", family::load::<llama::Config>),
    ("mistral", family::load::<llama::Config>),
    ("olmo2", family::load::<olmo2::Config>),
    ("phi3", family::load::<phi3::Config>),
    ("qwen2", family::load::<qwen2::Config>),
    ("qwen3", family::load::<qwen3::Config>),
    ("smollm3", family::load::<smollm3::Config>),
    ("starcoder2", family::load::<starcoder2::Config>),
];

/// The supported `model_type` values.
pub fn supported_model_types() -> Vec<&'static str> {
    REGISTRY.iter().map(|(name, _)| *name).collect()
}

/// The loader of the `model_type` that `config` names.
pub fn loader(config: &ConfigFile) -> Result<Loader> {
    let model_type = config.model_type()?;
    REGISTRY
        .iter()
        .find(|(name, _)| *name == model_type)
        .map(|(_, loader)| *loader)
        .ok_or_else(|| Error::UnknownModelType {
            path: config.path.clone(),
            model_type: model_type.to_owned(),
            supported: supported_model_types(),
        })
}

/// Builds the model `config` names from `weights`.
pub fn build(config: &ConfigFile, weights: Weights) -> Result<Box<dyn LanguageModel>> {
    let loader = loader(config)?;
    // Nothing lazy may outlive loading: the model can be used from any thread.
    weights.eval()?;
    loader(config, weights)
}
