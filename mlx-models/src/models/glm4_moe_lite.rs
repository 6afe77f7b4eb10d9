//! GLM-4.7-Flash (`glm4_moe_lite`): DeepSeek-V3's latent attention and grouped sigmoid
//! routing, with its dense and sparse layers named by `mlp_layer_types`.
//!
//! - As [`crate::models::deepseek_v3`]; the layers `mlp_layer_types` marks `dense` (by
//!   default the first) keep a dense MLP of width `intermediate_size`.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{DecoderConfig, DecoderFamily, MlaConfig, MoeConfig};
use crate::models::deepseek_v3;
use crate::transformer::{DecoderSettings, FeedForwardKind};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `Glm4MoeLiteConfig`; Transformers' defaults are in
/// `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    #[serde(flatten)]
    pub mla: MlaConfig,
    /// `dense` or `sparse` per layer.
    #[serde(default)]
    pub mlp_layer_types: Option<Vec<String>>,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":154880,"hidden_size":2048,"intermediate_size":10240,"moe_intermediate_size":1536,"num_hidden_layers":47,"num_attention_heads":20,"num_key_value_heads":20,"n_shared_experts":1,"n_routed_experts":64,"routed_scaling_factor":1.8,"kv_lora_rank":512,"q_lora_rank":768,"qk_rope_head_dim":64,"v_head_dim":256,"qk_nope_head_dim":192,"n_group":1,"topk_group":1,"num_experts_per_tok":4,"norm_topk_prob":true,"hidden_act":"silu","max_position_embeddings":202752,"rms_norm_eps":1e-5,"tie_word_embeddings":false,"rope_interleave":true,"attention_bias":false}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let mut settings = deepseek_v3::settings(&self.decoder, &self.moe, &self.mla, config)?;
        let n = settings.layers.len();
        let types = match &self.mlp_layer_types {
            Some(types) => types.clone(),
            None => (0..n)
                .map(|i| if i == 0 { "dense" } else { "sparse" }.to_owned())
                .collect(),
        };
        config.ensure(types.len() == n, "mlp_layer_types", || {
            format!("has {} entries for {n} layers", types.len())
        })?;
        for (layer, kind) in settings.layers.iter_mut().zip(&types) {
            layer.feed_forward = match kind.as_str() {
                "dense" => FeedForwardKind::Dense,
                "sparse" => FeedForwardKind::Sparse,
                other => {
                    return Err(crate::error::Error::config(
                        &config.path,
                        "mlp_layer_types",
                        format!("`{other}` is neither `dense` nor `sparse`"),
                    ))
                }
            };
        }
        Ok(settings)
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        deepseek_v3::sanitize(weights, settings)
    }
}
