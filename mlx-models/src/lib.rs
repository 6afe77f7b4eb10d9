//! Language models on MLX.

pub mod alibi;
pub mod attention;
pub mod cache;
pub mod chat;
pub mod chat_template;
pub mod config;
pub mod conv;
pub mod convert;
pub mod default_model;
pub mod delta;
pub mod differential;
pub mod distributed;
pub mod error;
pub mod family;
pub mod fused_qkv;
pub mod generate;
pub mod gguf;
pub mod head;
pub mod hub;
pub mod load;
pub mod mla;
pub mod mlp;
pub mod model;
pub mod models;
pub mod moe;
pub mod nn;
pub mod norm;
pub mod positions;
pub mod rglru;
pub mod rope;
pub mod runtime;
pub mod sampling;
#[cfg(feature = "serve")]
pub mod serve;
pub mod ssm;
pub mod tap;
pub mod ternary;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod transformer;
pub mod weights;
pub mod xielu;

pub use chat_template::{ChatTemplate, ChatTemplateOptions, Content, ContentPart, Message};
pub use error::{Error, Result};
pub use model::{LanguageModel, ModelInfo};
pub use sampling::{GenerationConfig, Sampler, SamplerBuilder};
pub use tokenizer::{StreamDecoder, Tokenizer, VocabSpec};
