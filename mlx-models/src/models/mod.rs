//! The model zoo: one module per architecture family, and the registry from
//! `model_type` to module.

pub mod afmoe;
pub mod apertus;
pub mod arcee;
pub mod bamba;
pub mod biogpt;
pub mod bitnet;
pub mod bloom;
pub mod codegen;
pub mod cohere;
pub mod cohere2;
pub mod cohere2_moe;
pub mod ctrl;
pub mod cwm;
pub mod deepseek_v2;
pub mod deepseek_v3;
pub mod diffllama;
pub mod dots1;
pub mod ernie4_5;
pub mod ernie4_5_moe;
pub mod exaone4;
pub mod exaone_moe;
pub mod falcon;
pub mod falcon_h1;
pub mod flex_olmo;
pub mod gemma;
pub mod gemma2;
pub mod gemma3;
pub mod gemma3_text;
pub mod glm;
pub mod glm4;
pub mod glm4_moe;
pub mod glm4_moe_lite;
pub mod gpt2;
pub mod gpt_bigcode;
pub mod gpt_neo;
pub mod gpt_neox;
pub mod gpt_neox_japanese;
pub mod gpt_oss;
pub mod gptj;
pub mod granite;
pub mod granite_swa;
pub mod granitemoe;
pub mod granitemoe_swa;
pub mod granitemoehybrid;
pub mod granitemoeshared;
pub mod helium;
pub mod hunyuan_v1_dense;
pub mod hunyuan_v1_moe;
pub mod hy_v3;
pub mod hyperclovax;
pub mod internlm3;
pub mod iquestcoder;
pub mod jais2;
pub mod jamba;
pub mod kolibri1;
pub mod lfm2;
pub mod lfm2_moe;
pub mod llama;
pub mod llama4_text;
pub mod longcat_flash;
pub mod mamba;
pub mod mamba2;
pub mod mellum;
pub mod minicpm3;
pub mod minimax_m2;
pub mod ministral;
pub mod ministral3;
pub mod mixtral;
pub mod modernbert_decoder;
pub mod mpt;
pub mod nanochat;
pub mod nemotron;
pub mod nemotron_h;
pub mod olmo;
pub mod olmo2;
pub mod olmo3;
pub mod olmoe;
pub mod openai_gpt;
pub mod opt;
pub mod persimmon;
pub mod phi;
pub mod phi3;
pub mod phimoe;
pub mod qwen2;
pub mod qwen2_moe;
pub mod qwen3;
pub mod qwen3_5_moe;
pub mod qwen3_5_text;
pub mod qwen3_moe;
pub mod qwen3_next;
pub mod recurrent_gemma;
pub mod seed_oss;
pub mod smollm3;
pub mod solar_open;
pub mod stablelm;
pub mod starcoder2;
pub mod vaultgemma;
pub mod xglm;
pub mod youtu;

use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::family;
use crate::weights::Weights;

pub use crate::model::{LanguageModel, ModelInfo};

/// Builds a model from its config and weights.
pub type Loader = fn(&ConfigFile, Weights) -> Result<Box<dyn LanguageModel>>;

/// Every supported `model_type` and the module that implements it.
pub const REGISTRY: &[(&str, Loader)] = &[
    ("afmoe", family::load::<afmoe::Config>),
    ("apertus", family::load::<apertus::Config>),
    ("arcee", family::load::<arcee::Config>),
    ("bamba", family::load::<bamba::Config>),
    ("biogpt", family::load::<biogpt::Config>),
    ("bitnet", family::load::<bitnet::Config>),
    ("bloom", family::load::<bloom::Config>),
    ("codegen", family::load::<codegen::Config>),
    ("cohere", family::load::<cohere::Config>),
    ("cohere2", family::load::<cohere2::Config>),
    ("cohere2_moe", family::load::<cohere2_moe::Config>),
    ("ctrl", family::load::<ctrl::Config>),
    ("cwm", family::load::<cwm::Config>),
    ("deepseek_v2", family::load::<deepseek_v2::Config>),
    ("deepseek_v3", family::load::<deepseek_v3::Config>),
    ("diffllama", family::load::<diffllama::Config>),
    ("dots1", family::load::<dots1::Config>),
    ("ernie4_5", family::load::<ernie4_5::Config>),
    ("ernie4_5_moe", family::load::<ernie4_5_moe::Config>),
    ("exaone4", family::load::<exaone4::Config>),
    ("exaone_moe", family::load::<exaone_moe::Config>),
    ("falcon", family::load::<falcon::Config>),
    ("falcon_h1", falcon_h1::load),
    ("falcon_mamba", mamba::load),
    ("flex_olmo", family::load::<flex_olmo::Config>),
    ("gemma", family::load::<gemma::Config>),
    ("gemma2", family::load::<gemma2::Config>),
    ("gemma3", gemma3::load),
    ("gemma3_text", family::load::<gemma3_text::Config>),
    ("glm", family::load::<glm::Config>),
    ("glm4", family::load::<glm4::Config>),
    ("glm4_moe", family::load::<glm4_moe::Config>),
    ("glm4_moe_lite", family::load::<glm4_moe_lite::Config>),
    ("granitemoe_swa", family::load::<granitemoe_swa::Config>),
    (
        "modernbert-decoder",
        family::load::<modernbert_decoder::Config>,
    ),
    ("granitemoeshared", family::load::<granitemoeshared::Config>),
    ("kolibri1", family::load::<kolibri1::Config>),
    ("lfm2_moe", family::load::<lfm2_moe::Config>),
    ("hy_v3", family::load::<hy_v3::Config>),
    ("mpt", family::load::<mpt::Config>),
    // GPT-SW3 checkpoints are GPT-2 (Transformers maps `gpt-sw3` to `GPT2Config`).
    ("gpt-sw3", family::load::<gpt2::Config>),
    ("gpt2", family::load::<gpt2::Config>),
    ("gpt_bigcode", family::load::<gpt_bigcode::Config>),
    ("gpt_neo", family::load::<gpt_neo::Config>),
    ("gpt_neox", family::load::<gpt_neox::Config>),
    (
        "gpt_neox_japanese",
        family::load::<gpt_neox_japanese::Config>,
    ),
    ("gpt_oss", family::load::<gpt_oss::Config>),
    ("gptj", family::load::<gptj::Config>),
    ("granite", family::load::<granite::Config>),
    ("granite_swa", family::load::<granite_swa::Config>),
    ("granitemoe", family::load::<granitemoe::Config>),
    ("granitemoehybrid", family::load::<granitemoehybrid::Config>),
    ("helium", family::load::<helium::Config>),
    ("hunyuan_v1_dense", family::load::<hunyuan_v1_dense::Config>),
    ("hunyuan_v1_moe", family::load::<hunyuan_v1_moe::Config>),
    ("hyperclovax", family::load::<hyperclovax::Config>),
    ("internlm3", family::load::<internlm3::Config>),
    ("iquestcoder", family::load::<iquestcoder::Config>),
    ("jais2", family::load::<jais2::Config>),
    ("jamba", family::load::<jamba::Config>),
    ("kimi_k2", family::load::<deepseek_v3::Config>),
    ("lfm2", lfm2::load),
    ("llama", family::load::<llama::Config>),
    ("llama4", llama4_text::load_multimodal),
    ("llama4_text", family::load::<llama4_text::Config>),
    ("longcat_flash", longcat_flash::load),
    ("mamba", mamba::load),
    ("mamba2", mamba2::load),
    ("mellum", family::load::<mellum::Config>),
    ("minicpm3", family::load::<minicpm3::Config>),
    ("minimax_m2", family::load::<minimax_m2::Config>),
    ("ministral", family::load::<ministral::Config>),
    ("ministral3", family::load::<ministral3::Config>),
    ("mistral", family::load::<llama::Config>),
    ("mixtral", family::load::<mixtral::Config>),
    ("nanochat", family::load::<nanochat::Config>),
    ("nemotron", family::load::<nemotron::Config>),
    ("nemotron_h", nemotron_h::load),
    ("olmo", family::load::<olmo::Config>),
    ("olmo2", family::load::<olmo2::Config>),
    ("olmo3", family::load::<olmo3::Config>),
    ("olmoe", family::load::<olmoe::Config>),
    ("openai-gpt", family::load::<openai_gpt::Config>),
    ("opt", family::load::<opt::Config>),
    ("persimmon", family::load::<persimmon::Config>),
    ("phi", family::load::<phi::Config>),
    ("phi3", family::load::<phi3::Config>),
    ("phimoe", family::load::<phimoe::Config>),
    ("qwen2", family::load::<qwen2::Config>),
    ("qwen2_moe", family::load::<qwen2_moe::Config>),
    ("qwen3", family::load::<qwen3::Config>),
    ("qwen3_5", qwen3_5_text::load_multimodal),
    ("qwen3_5_moe", qwen3_5_moe::load_multimodal),
    ("qwen3_5_moe_text", family::load::<qwen3_5_moe::Config>),
    ("qwen3_5_text", family::load::<qwen3_5_text::Config>),
    ("qwen3_moe", family::load::<qwen3_moe::Config>),
    ("qwen3_next", family::load::<qwen3_next::Config>),
    ("recurrent_gemma", family::load::<recurrent_gemma::Config>),
    ("seed_oss", family::load::<seed_oss::Config>),
    ("smollm3", family::load::<smollm3::Config>),
    ("solar_open", family::load::<solar_open::Config>),
    ("stablelm", family::load::<stablelm::Config>),
    ("starcoder2", family::load::<starcoder2::Config>),
    ("vaultgemma", family::load::<vaultgemma::Config>),
    ("xglm", family::load::<xglm::Config>),
    ("youtu", family::load::<youtu::Config>),
];

/// The supported `model_type` values.
pub fn supported_model_types() -> Vec<&'static str> {
    REGISTRY.iter().map(|(name, _)| *name).collect()
}

/// Brings a checkpoint to the layout a loader reads ([`family::to_loaded_layout`]).
pub type Layout = fn(&ConfigFile, &mut Weights) -> Result<()>;

/// The families whose checkpoints the converter brings to the loaded layout before it
/// quantizes them: their `Conv1D` projections are stored `[in, out]`, and a quantized
/// projection must be a linear layer's `[out, in]` (mlx-lm sanitizes first too).
pub const CHECKPOINT_LAYOUTS: &[(&str, Layout)] =
    &[("openai-gpt", family::to_loaded_layout::<openai_gpt::Config>)];

/// The checkpoint layout step of `model_type`, for those in [`CHECKPOINT_LAYOUTS`].
pub fn checkpoint_layout(model_type: &str) -> Option<Layout> {
    CHECKPOINT_LAYOUTS
        .iter()
        .find(|(name, _)| *name == model_type)
        .map(|(_, layout)| *layout)
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
