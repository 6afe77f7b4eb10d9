//! Hunyuan MoE (`hunyuan_v1_moe`, Hunyuan-A13B): softmax routing with a shared MLP in every
//! layer, and q/k RMSNorm after RoPE.
//!
//! - Pre-norm blocks, RMSNorm; attention with `attention_bias` on q/k/v/o, RoPE on the two
//!   halves of each head, then RMSNorm of each query/key head (`query_layernorm`,
//!   `key_layernorm`). A `dynamic` RoPE with an `alpha` is NTK-by-alpha: the base becomes
//!   `theta · alpha^(d / (d - 2))`, independent of the length.
//! - Feed-forward: softmax over `num_experts` (router `gate.wg`), the top `moe_topk` (one
//!   number, or one per layer), renormalized; SwiGLU experts of width `intermediate_size`; plus a shared MLP
//!   (`shared_mlp`) of the same width.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{sanitize_moe, DecoderConfig, DecoderFamily, LayerRule, MoeConfig, PerLayer};
use crate::models::qwen3_moe::QWEN_EXPERTS;
use crate::moe::{ExpertActivation, RouterSettings, SharedExpertSettings, SharedJoin};
use crate::rope::RopeFields;
use crate::transformer::{AttentionSettings, DecoderSettings, MlpLayout, QkNorm};
use crate::weights::Weights;
use serde::Deserialize;
use serde_json::{json, Value};

/// config.json fields, with the names of `HunYuanMoEV1Config`; Transformers' defaults are
/// in `DEFAULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
}

impl Config {
    /// The RoPE fields with a `dynamic` + `alpha` scaling turned into the plain RoPE of the
    /// stretched base it stands for.
    fn rope_fields(&self, config: &ConfigFile) -> Result<RopeFields> {
        let d = &self.decoder;
        let fields = &d.rope;
        let params = fields
            .rope_parameters
            .as_ref()
            .or(fields.rope_scaling.as_ref());
        let kind = |p: &Value| {
            p.get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let Some((p, alpha)) = params
            .filter(|p| kind(p).as_deref() == Some("dynamic"))
            .and_then(|p| Some((p, p.get("alpha")?.as_f64()?)))
        else {
            return Ok(fields.clone());
        };
        let theta = p
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or(fields.rope_theta)
            .unwrap_or(10_000.0);
        let dim = f64::from(d.head_dim());
        config.ensure(dim > 2.0, "head_dim", || {
            "NTK-alpha RoPE needs more than 2 features per head".to_owned()
        })?;
        Ok(RopeFields {
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: Some(json!({
                "rope_type": "default",
                "rope_theta": theta * alpha.powf(dim / (dim - 2.0)),
            })),
            ..fields.clone()
        })
    }
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":290943,"hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,"hidden_act":"silu","max_position_embeddings":2048,"rms_norm_eps":1e-5,"tie_word_embeddings":false,"attention_bias":false,"num_experts":1,"moe_topk":1}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        config.require("head_dim", d.head_dim)?;
        let attention = AttentionSettings {
            qk_norm: QkNorm::PerHeadAfterRope,
            ..d.attention()
        };
        let rope = d.rope_from(&self.rope_fields(config)?, 10_000.0, false, config)?;
        let mut layers = d.layers(LayerRule::NoSliding, Some(&rope), None, false);
        if let PerLayer::Each(top_k) = &self.moe.num_experts_per_tok {
            config.ensure(top_k.len() == layers.len(), "moe_topk", || {
                format!("has {} entries for {} layers", top_k.len(), layers.len())
            })?;
            for (layer, &k) in layers.iter_mut().zip(top_k) {
                layer.top_k = Some(k);
            }
        }
        let act = d.activation(config)?;
        let mlp = d.mlp(MlpLayout::Gated, act);
        let router = RouterSettings {
            normalize: true,
            ..self.moe.router()
        };
        let mut moe = self.moe.settings(
            router,
            d.intermediate_size,
            ExpertActivation::Glu(act),
            false,
        );
        moe.intermediate_size = d.intermediate_size;
        moe.shared_expert = Some(SharedExpertSettings {
            intermediate_size: d.intermediate_size,
            gated: false,
            bias: false,
            join: SharedJoin::Sum,
        });
        Ok(d.settings(attention, mlp, layers).with_moe(moe, |_| true))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        weights.rename(|name| {
            Some(
                name.replacen(".self_attn.query_layernorm.", ".self_attn.q_norm.", 1)
                    .replacen(".self_attn.key_layernorm.", ".self_attn.k_norm.", 1)
                    .replacen(".mlp.gate.wg.", ".mlp.gate.", 1)
                    .replacen(".mlp.shared_mlp.", ".mlp.shared_expert.", 1),
            )
        });
        sanitize_moe(weights, settings, None, &QWEN_EXPERTS)
    }
}
