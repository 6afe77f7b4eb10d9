//! BitNet (`bitnet`), ported from Transformers 5.23.0 (`BitNetForCausalLM`).
//!
//! Written on the shared blocks and verified layer by layer against the Transformers
//! fixtures in `tests/fixtures/bitnet/`, see its `PORT_REPORT.md`.
//!
//! - Pre-norm blocks, RMSNorm scaling by `weight`.
//! - Attention: `q_proj`/`k_proj`/`v_proj`/`o_proj`, biased when `attention_bias`; an
//!   RMSNorm (`attn_sub_norm`) on the attention output before `o_proj`.
//! - MLP: `down_proj(ffn_sub_norm(relu(gate_proj(x))² * up_proj(x)))`.
//! - RoPE on the two halves of each head.
//! - Checkpoints as the Hub ships them: ternary linear weights packed four to a byte with a
//!   `weight_scale` each ([`crate::ternary`]), unpacked to `ternary / weight_scale` at load;
//!   float checkpoints load as they are.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{DecoderConfig, DecoderFamily, LayerRule};
use crate::ternary::unpack_ternary;
use crate::transformer::{drop_computed_weights, DecoderSettings, MlpLayout};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `BitNetConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":128256,"hidden_size":2560,"intermediate_size":6912,"num_hidden_layers":30,"num_attention_heads":20,"num_key_value_heads":5,"hidden_act":"relu2","max_position_embeddings":2048,"rms_norm_eps":1e-5,"tie_word_embeddings":false,"attention_bias":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let mlp = d.mlp(MlpLayout::Gated, d.activation(config)?);
        let rope = d.rope(10000.0, false, config)?;
        let layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        Ok(DecoderSettings {
            sub_norms: true,
            ..d.settings(d.attention(), mlp, layers)
        })
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        drop_computed_weights(weights, settings.tie_word_embeddings);
        unpack_ternary(weights)
    }
}
