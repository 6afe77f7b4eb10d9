//! Gemma 3 (`gemma3`): the multimodal checkpoints (`Gemma3ForConditionalGeneration`, e.g.
//! google/gemma-3-4b-it) run as their language model, [Gemma 3 Text](super::gemma3_text).
//!
//! - The settings are config.json's `text_config`; tying comes from the top level when the
//!   text config does not say.
//! - The language model's weights sit under `language_model.model.` (checkpoints saved by
//!   Transformers 4 and mlx-lm's conversions) or `model.language_model.` (Transformers 5);
//!   the vision tower and the multimodal projector are dropped.

use super::gemma3_text;
use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::DecoderFamily;
use crate::model::LanguageModel;
use crate::transformer::{drop_computed_weights, DecoderSettings};
use crate::weights::Weights;
use serde::Deserialize;

/// The `text_config` of a `gemma3` config.json: Gemma 3 Text's.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct Config(pub gemma3_text::Config);

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = gemma3_text::Config::DEFAULTS;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        self.0.settings(config)
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        weights.rename(|name| {
            let towers = [
                "vision_tower.",
                "multi_modal_projector.",
                "model.vision_tower.",
                "model.multi_modal_projector.",
            ];
            if towers.iter().any(|t| name.starts_with(t)) {
                return None;
            }
            Some(match name.strip_prefix("language_model.") {
                Some(rest) => rest.to_owned(),
                None => name.replacen("model.language_model.", "model.", 1),
            })
        });
        drop_computed_weights(weights, settings.tie_word_embeddings);
        Ok(())
    }
}

/// The registry's entry for `gemma3` checkpoints: their language model.
pub fn load(config: &ConfigFile, weights: Weights) -> Result<Box<dyn LanguageModel>> {
    crate::family::load_text_config::<Config>(config, weights, "gemma3_text")
}
