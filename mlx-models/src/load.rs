//! Loading a model with its tokenizer and generation defaults, from a local Hugging
//! Face-format directory, a GGUF file, or the default model.

use crate::config::ConfigFile;
use crate::distributed::Group;
use crate::error::{Error, Result};
use crate::hub::{self, HubOptions};
use crate::models::{self, LanguageModel, ModelInfo};
use crate::sampling::{GenerationConfig, TokenIds};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use crate::{default_model, gguf};
use mlx_rs::Dtype;
use std::path::{Path, PathBuf};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The built-in default ([`crate::default_model`]).
    Default,
    /// A directory with config.json, safetensors weights and tokenizer files.
    Dir(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face model repo (`org/name`), from the local Hugging Face cache or
    /// downloaded into it; `revision` is a branch, tag or commit (default `main`).
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

impl ModelSource {
    /// Reads a `--model` argument: an existing directory or GGUF file, else a Hugging
    /// Face repo id.
    pub fn parse(spec: &str) -> Result<ModelSource> {
        let path = PathBuf::from(spec);
        if path.is_dir() {
            return Ok(ModelSource::Dir(path));
        }
        if path.is_file() {
            return Ok(ModelSource::Gguf(path));
        }
        let looks_like_path =
            spec.starts_with('.') || spec.starts_with('/') || spec.ends_with(".gguf");
        if !looks_like_path && hub::validate_repo_id(spec).is_ok() {
            return Ok(ModelSource::Hub {
                repo: spec.to_owned(),
                revision: None,
            });
        }
        Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such model directory or GGUF file, nor a Hugging Face repo id (org/name)",
            ),
        ))
    }
}

/// Options for [`load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    dtype: Option<Dtype>,
    dequantize: bool,
    group: Option<Group>,
}

impl LoadOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Casts floating-point weights to `dtype` (e.g. bf16 → f32).
    pub fn dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Expands quantized weights to floating point at load time (f32 unless `dtype`
    /// says otherwise). On CPUs, MLX's dense matmul through BLAS is much faster than its
    /// quantized kernels, at 4–8× the memory.
    pub fn dequantize(mut self, yes: bool) -> Self {
        self.dequantize = yes;
        self
    }

    /// Splits the model over the ranks of `group` (tensor parallelism): each rank loads
    /// only its share of the attention heads, MLP features, experts and vocabulary, reading
    /// just that from safetensors files, and the ranks compute each forward pass together.
    /// Every rank must load the same model with the same options. A group of one process
    /// changes nothing.
    pub fn tensor_parallel(mut self, group: Group) -> Self {
        self.group = Some(group);
        self
    }
}

/// A loaded model: the network, its tokenizer and its generation defaults.
pub struct Model {
    network: Box<dyn LanguageModel>,
    tokenizer: Tokenizer,
    generation_config: GenerationConfig,
    source: String,
}

impl Model {
    /// Assembles a model from parts.
    pub fn new(
        network: Box<dyn LanguageModel>,
        tokenizer: Tokenizer,
        generation_config: GenerationConfig,
        source: impl Into<String>,
    ) -> Self {
        Model {
            network,
            tokenizer,
            generation_config,
            source: source.into(),
        }
    }

    pub fn network(&self) -> &dyn LanguageModel {
        self.network.as_ref()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation_config
    }

    pub fn info(&self) -> &ModelInfo {
        self.network.info()
    }

    /// Where the model was loaded from.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// Loads a model with its tokenizer.
///
/// ```no_run
/// use mlx_models::load::{load, LoadOptions, ModelSource};
/// let model = load(&ModelSource::Default, &LoadOptions::new())?;
/// println!("{} layers", model.info().num_layers);
/// # Ok::<(), mlx_models::Error>(())
/// ```
pub fn load(source: &ModelSource, options: &LoadOptions) -> Result<Model> {
    match source {
        ModelSource::Default => {
            let path = default_model::path(|| {})?;
            load_gguf(&path, options)
        }
        ModelSource::Dir(dir) => load_dir(dir, options),
        ModelSource::Gguf(path) => load_gguf(path, options),
        ModelSource::Hub { repo, revision } => {
            let mut hub_options = HubOptions::new();
            if let Some(revision) = revision {
                hub_options = hub_options.with_revision(revision.clone());
            }
            let dir = hub::snapshot(repo, &hub_options, None)?;
            load_dir(&dir, options)
        }
    }
}

/// Loads a Hugging Face-format directory: config.json, safetensors weights (one file or
/// shards), tokenizer.json with tokenizer_config.json / chat_template.jinja, and
/// generation_config.json when present.
pub fn load_dir(dir: &Path, options: &LoadOptions) -> Result<Model> {
    let network = load_network(dir, options)?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let generation_path = dir.join("generation_config.json");
    let generation_config = if generation_path.is_file() {
        GenerationConfig::from_file(&generation_path)?
    } else {
        GenerationConfig::default()
    };
    Ok(Model::new(
        network,
        tokenizer,
        generation_config,
        dir.display().to_string(),
    ))
}

/// Loads a GGUF file: weights stay quantized unless `options` dequantize them; the
/// tokenizer and chat template come from its metadata.
pub fn load_gguf(path: &Path, options: &LoadOptions) -> Result<Model> {
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such GGUF file"),
        ));
    }
    load_gguf_file(&gguf::GgufFile::open(path)?, options)
}

/// Loads a GGUF already opened (and validated) by [`gguf::GgufFile`], e.g. one held in
/// memory.
pub fn load_gguf_file(file: &gguf::GgufFile, options: &LoadOptions) -> Result<Model> {
    let path = file.path();
    let gguf::GgufModel {
        config,
        weights,
        vocab,
    } = gguf::from_file(file)?;
    let eos = vocab.eos_token_id;
    let tokenizer = Tokenizer::from_vocab(vocab)?;
    check_layer_count(&config, &weights)?;
    let network = models::build(
        &config,
        weights
            .with_dtype(options.dtype)
            .dequantize(options.dequantize)
            .tensor_parallel(options.group.clone()),
    )?;
    let generation_config = GenerationConfig {
        eos_token_id: eos.map(TokenIds::One),
        ..Default::default()
    };
    Ok(Model::new(
        network,
        tokenizer,
        generation_config,
        path.display().to_string(),
    ))
}

/// Loads only the network of the model in `dir` (config.json plus safetensors weights).
pub fn load_network(dir: &Path, options: &LoadOptions) -> Result<Box<dyn LanguageModel>> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such model directory"),
        ));
    }
    let config = ConfigFile::read(&dir.join("config.json"))?;
    // An unknown model_type fails before any weight is read.
    models::loader(&config)?;
    let weights = Weights::from_dir(dir)?
        .with_dtype(options.dtype)
        .dequantize(options.dequantize)
        .tensor_parallel(options.group.clone());
    check_layer_count(&config, &weights)?;
    models::build(&config, weights)
}

/// Every layer owns at least one tensor: a config that asks for more layers than the
/// checkpoint has tensors is wrong, and is refused before anything is sized by it.
fn check_layer_count(config: &ConfigFile, weights: &Weights) -> Result<()> {
    let tensors = weights.names().count();
    let layers = |value: &serde_json::Value| value.get("num_hidden_layers")?.as_u64();
    let nested = config.value.get("text_config").and_then(layers);
    for (field, layers) in [
        ("num_hidden_layers", layers(&config.value)),
        ("text_config.num_hidden_layers", nested),
    ] {
        if let Some(n) = layers.filter(|&n| n > tensors as u64) {
            return Err(Error::config(
                &config.path,
                field,
                format!("{n} layers, but the checkpoint holds {tensors} tensors"),
            ));
        }
    }
    Ok(())
}

/// Loads the network in `dir`, optionally cast to `dtype`.
pub fn load_model_dir(dir: &Path, dtype: Option<Dtype>) -> Result<Box<dyn LanguageModel>> {
    let options = LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    load_network(dir, &options)
}

/// Loads a network from an already-read config (e.g. patched in memory) and the weights
/// in `dir`.
pub fn load_model_with_config(
    config: &ConfigFile,
    dir: &Path,
    dtype: Option<Dtype>,
) -> Result<Box<dyn LanguageModel>> {
    let weights = Weights::from_dir(dir)?.with_dtype(dtype);
    check_layer_count(config, &weights)?;
    models::build(config, weights)
}
