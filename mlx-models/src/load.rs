//! Loading a model from a local Hugging Face-format directory.

use crate::config::ConfigFile;
use crate::error::{Error, Result};
use crate::models::{self, LanguageModel};
use crate::weights::Weights;
use mlx_rs::Dtype;
use std::path::Path;

/// Loads the model in `dir` (config.json plus safetensors weights), optionally casting
/// floating-point weights to `dtype`. Weights are evaluated before returning.
pub fn load_model_dir(dir: &Path, dtype: Option<Dtype>) -> Result<Box<dyn LanguageModel>> {
    if !dir.is_dir() {
        return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "no such model directory")));
    }
    let config = ConfigFile::read(&dir.join("config.json"))?;
    // Fail on an unknown model_type before reading any weights.
    let model_type = config.model_type()?;
    if !models::supported_model_types().contains(&model_type) {
        return models::build(&config, Weights::new(Default::default(), dir));
    }
    let weights = Weights::from_dir(dir)?.with_dtype(dtype);
    models::build(&config, weights)
}

/// Loads a model from an already-read config (e.g. patched in memory) and the weights
/// in `dir`.
pub fn load_model_with_config(
    config: &ConfigFile,
    dir: &Path,
    dtype: Option<Dtype>,
) -> Result<Box<dyn LanguageModel>> {
    let weights = Weights::from_dir(dir)?.with_dtype(dtype);
    models::build(config, weights)
}
