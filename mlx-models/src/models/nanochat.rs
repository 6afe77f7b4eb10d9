//! NanoChat (`nanochat`), ported from Transformers 5.23.0 (`NanoChatForCausalLM`).
//!
//! Written on the shared blocks and verified layer by layer against the Transformers
//! fixtures in `tests/fixtures/nanochat/`, see its `PORT_REPORT.md`.
//!
//! - Pre-norm blocks; every norm is an RMSNorm without a weight, and the final one also
//!   normalizes the embeddings before the first layer (one module called twice).
//! - Attention: `q_proj`/`k_proj`/`v_proj`/`o_proj`, biased when `attention_bias`; RoPE
//!   on the two halves of each head turning the other way (`rotate_half` gives
//!   `(x₂, −x₁)`), then weightless RMSNorm of each query and key head.
//! - MLP: `fc2(relu(fc1(x))²)` (loaded as `c_fc`/`c_proj`).
//! - Logits soft-capped at `final_logit_softcapping`.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{DecoderConfig, DecoderFamily, LayerRule};
use crate::transformer::{
    drop_computed_weights, AttentionSettings, DecoderSettings, MlpLayout, NormKind, QkNorm,
};
use crate::weights::{rename_layer_module, Weights};
use serde::Deserialize;

/// config.json fields, with the names of `NanoChatConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":50304,"hidden_size":768,"intermediate_size":8192,"num_hidden_layers":12,"num_attention_heads":6,"max_position_embeddings":2048,"hidden_act":"relu2","rms_norm_eps":1e-6,"final_logit_softcapping":15.0,"attention_bias":false,"tie_word_embeddings":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let eps = d.rms_norm_eps.unwrap_or(1e-6);
        let attention = AttentionSettings {
            qk_norm: QkNorm::L2AfterRope,
            qk_norm_eps: eps as f32,
            ..d.attention()
        };
        let mlp = d.mlp(MlpLayout::Plain, d.activation(config)?);
        let rope = d.rope(10000.0, false, config)?.reversed();
        let layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        Ok(DecoderSettings {
            norm: NormKind::RmsNoWeight,
            embedding_norm: true,
            ..d.settings(attention, mlp, layers)
        })
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        drop_computed_weights(weights, settings.tie_word_embeddings);
        weights.rename(|name| Some(rename_layer_module(name, &RENAMES)));
        Ok(())
    }
}

/// The checkpoint's names of the MLP projections the shared blocks load under other names.
const RENAMES: [(&str, &str); 2] = [("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")];
