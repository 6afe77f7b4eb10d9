//! The one error type of this crate: every variant names the file, tensor or field.

use std::path::PathBuf;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config.json, tokenizer_config.json, …) is not valid JSON or does not
    /// match the expected shape; serde's message names the field, line and column.
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A config field has a value the model cannot use.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },

    /// config.json names a `model_type` no module implements.
    #[error("{path}: unknown model_type `{model_type}`; supported: {}", supported.join(", "))]
    UnknownModelType {
        path: PathBuf,
        model_type: String,
        supported: Vec<&'static str>,
    },

    /// A safetensors file is malformed.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    /// A quantized weight is stored in a format other than MLX's affine quantization.
    #[error("weight `{name}` in {path}: {message}")]
    UnsupportedQuantization {
        path: PathBuf,
        name: String,
        message: String,
    },

    /// The checkpoint lacks a weight the model needs.
    #[error("missing weight `{name}` in {path}")]
    MissingWeight { path: PathBuf, name: String },

    /// A weight has the wrong shape for the config.
    #[error("weight `{name}` in {path} has shape {actual:?}, expected {expected:?}")]
    WeightShape {
        path: PathBuf,
        name: String,
        expected: Vec<i32>,
        actual: Vec<i32>,
    },

    /// The checkpoint has weights the model does not use (a sign of a wrong config).
    #[error("unexpected weights in {path}: {}", names.join(", "))]
    UnexpectedWeights { path: PathBuf, names: Vec<String> },

    /// Generation was asked to continue an empty prompt.
    #[error("the prompt is empty: give at least one token")]
    EmptyPrompt,

    /// A tokenizer could not be built or failed on its input; `path` names the file it came from.
    #[error("tokenizer{}: {message}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Tokenizer {
        path: Option<PathBuf>,
        message: String,
    },

    /// A tokenizer kind (GGUF `tokenizer.ggml.model`, and `tokenizer.ggml.pre` for byte-level
    /// vocabularies) that this crate cannot build faithfully.
    #[error("unsupported tokenizer: model `{model}`{}", pre.as_ref().map(|p| format!(", pre-tokenizer `{p}`")).unwrap_or_default())]
    UnsupportedTokenizer { model: String, pre: Option<String> },

    /// A chat template failed to compile or render.
    #[error("chat template: {message}")]
    ChatTemplate { message: String },

    /// A chat template refused the conversation with `raise_exception(message)`.
    #[error("chat template raised: {message}")]
    ChatTemplateRaised { message: String },

    /// The tokenizer has no chat template, or none under the requested name.
    #[error("no chat template{}{}", requested.as_ref().map(|n| format!(" named `{n}`")).unwrap_or_default(), if available.is_empty() { String::new() } else { format!("; available: {}", available.join(", ")) })]
    NoChatTemplate {
        requested: Option<String>,
        available: Vec<String>,
    },

    /// Sampling parameters or logits that cannot be sampled from.
    #[error("sampling: {message}")]
    Sampling { message: String },

    /// The default model could not be fetched.
    #[error("default model: {message}")]
    DefaultModel { message: String },

    /// The prompt does not fit the model's context.
    #[error("the prompt has {prompt_tokens} tokens but the model's context holds {context} (max_position_embeddings)")]
    PromptTooLong {
        prompt_tokens: usize,
        context: usize,
    },

    /// A GGUF file is malformed or holds something unsupported.
    #[error("{path}: GGUF: {message}")]
    Gguf { path: PathBuf, message: String },

    /// Not a valid Hugging Face model repo id (`org/name`).
    #[error("invalid Hugging Face repo id `{repo_id}`: {reason}")]
    InvalidRepoId { repo_id: String, reason: String },

    /// The Hugging Face Hub could not be reached, refused the request, or answered
    /// something unusable; `message` says which and what to do about it.
    #[error("Hugging Face Hub, {repo} at revision `{revision}`: {message}")]
    Hub {
        repo: String,
        revision: String,
        message: String,
    },

    /// The revision has no snapshot in the local Hugging Face cache, and the Hub may not
    /// be asked (offline mode).
    #[error("{repo} at revision `{revision}` is not in the Hugging Face cache {}: {reason}", cache_dir.display())]
    HubNotCached {
        repo: String,
        revision: String,
        cache_dir: PathBuf,
        reason: String,
    },

    /// A file the model needs is neither in the local cache (offline mode) nor, when
    /// online, in the repository.
    #[error("{repo} at revision `{revision}`: missing `{file}`: {reason}")]
    HubFileMissing {
        repo: String,
        revision: String,
        file: String,
        reason: String,
    },

    /// A file of a cached snapshot (the weight index, a ref) is malformed.
    #[error("{repo} at revision `{revision}`: `{file}` ({}) is malformed: {message}", path.display())]
    HubInvalidFile {
        repo: String,
        revision: String,
        file: String,
        path: PathBuf,
        message: String,
    },

    /// An operation failed inside MLX.
    #[error("MLX: {0}")]
    Mlx(#[from] mlx_rs::error::Exception),

    /// A GGUF file's structure is invalid at byte `offset`: `field` names what was being
    /// read (the magic, a count, a metadata key, a tensor name).
    #[error("{path}: GGUF byte {offset}, `{field}`: {message}")]
    GgufInvalid {
        path: PathBuf,
        offset: u64,
        field: String,
        message: String,
    },

    /// A GGUF tensor's info or data is invalid (dimensions, type, offset, size).
    #[error("{path}: GGUF tensor `{tensor}`: {message}")]
    GgufTensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },

    /// A GGUF tensor is stored in a ggml type this crate cannot read.
    #[error("{path}: GGUF tensor `{tensor}` has type {ggml_type}, which is not supported")]
    UnsupportedGgufType {
        path: PathBuf,
        tensor: String,
        ggml_type: String,
    },

    /// A GGUF metadata value is missing or has the wrong type or value.
    #[error("{path}: GGUF metadata `{key}`: {message}")]
    GgufMetadata {
        path: PathBuf,
        key: String,
        message: String,
    },

    /// A weight holds NaN or infinity (a corrupt file).
    #[error("weight `{name}` in {path} holds NaN or infinite values")]
    NonFiniteWeight { path: PathBuf, name: String },

    /// The model's logits became NaN or infinite at generation step `step` (0: the prompt).
    #[error("the logits became NaN or infinite at generation step {step}")]
    NonFiniteLogits { step: usize },

    /// `model.safetensors.index.json` is malformed or names shards that cannot be used.
    #[error("{path}: {message}")]
    WeightIndex { path: PathBuf, message: String },

    /// A conversion cannot be done as asked.
    #[error("convert: {message}")]
    Convert { message: String },

    /// An environment variable of MLX's distributed setup (`MLX_RANK`, `MLX_HOSTFILE`, …)
    /// has a value that cannot be used.
    #[error("${variable}: {message}")]
    DistributedEnv { variable: String, message: String },

    /// An MLX hostfile (the ranks' addresses) is unreadable or malformed.
    #[error("hostfile {path}: {message}")]
    Hostfile { path: PathBuf, message: String },

    /// MLX's distributed layer failed (a backend that will not start, a peer that does not
    /// answer, an operation the backend lacks).
    #[error("distributed: {message}")]
    Distributed { message: String },

    /// The model cannot be split across `ranks` processes as asked (heads or widths that do
    /// not divide, a block without a tensor-parallel form); `what` names the culprit.
    #[error("tensor parallelism over {ranks} ranks: {what}: {message}")]
    TensorParallel {
        ranks: i32,
        what: String,
        message: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: &str,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.to_owned(),
            message: message.into(),
        }
    }
}
