//! Granite 4 hybrids (`granitemoehybrid`): Mamba2 and attention layers, each followed by a
//! mixture of experts plus a shared MLP, with Granite's multipliers.
//!
//! - Pre-norm blocks, RMSNorm; layers `layer_types` marks `mamba` run the Mamba2 mixer
//!   ([`crate::ssm`], `mamba_*` fields, `mamba_d_head` "auto" = `mamba_expand · hidden /
//!   mamba_n_heads`), the others grouped-query attention scaled by `attention_multiplier`,
//!   with RoPE only when `position_embedding_type` is `rope`.
//! - Feed-forward: Granite MoE routing (softmax over the top `num_experts_per_tok` logits)
//!   plus an ungated shared MLP of width `shared_intermediate_size` (fused `input_linear`,
//!   gate rows first); a dense MLP alone when `num_local_experts` is 0.
//! - Embeddings × `embedding_multiplier`, sub-block outputs × `residual_multiplier`,
//!   logits ÷ `logits_scaling`.

use crate::config::ConfigFile;
use crate::error::Result;
use crate::family::{
    sanitize_moe, DecoderConfig, DecoderFamily, LayerRule, Mamba2Config, MoeConfig,
};
use crate::moe::{ExpertActivation, RouterSettings, SharedExpertSettings, SharedJoin};
use crate::transformer::{
    AttentionSettings, DecoderSettings, LayerType, MixerKind, MlpLayout, MlpSettings,
};
use crate::weights::Weights;
use serde::Deserialize;

/// config.json fields, with the names of `GraniteMoeHybridConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    #[serde(flatten)]
    pub moe: MoeConfig,
    pub attention_multiplier: f64,
    pub residual_multiplier: f64,
    pub logits_scaling: f64,
    pub embedding_multiplier: f64,
    pub shared_intermediate_size: i32,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(flatten)]
    pub mamba: Mamba2Config,
}

impl DecoderFamily for Config {
    const DEFAULTS: &'static str = r#"{"vocab_size":32000,"hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,"num_attention_heads":32,"hidden_act":"silu","max_position_embeddings":2048,"rms_norm_eps":1e-6,"tie_word_embeddings":false,"attention_bias":false,"embedding_multiplier":1.0,"logits_scaling":1.0,"residual_multiplier":1.0,"attention_multiplier":1.0,"num_local_experts":8,"num_experts_per_tok":2,"shared_intermediate_size":1024,"mamba_n_heads":128,"mamba_n_groups":1,"mamba_d_state":256,"mamba_d_head":"auto","mamba_d_conv":4,"mamba_expand":2,"mamba_chunk_size":256,"mamba_conv_bias":true,"mamba_proj_bias":false,"time_step_limit":[0.0,{"__float__":"Infinity"}]}"#;

    fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {
        let d = &self.decoder;
        let rope = match self.position_embedding_type.as_deref() {
            Some("rope") => Some(d.rope(10_000.0, false, config)?),
            _ => None,
        };
        let mut layers = d.layers(LayerRule::NoSliding, rope.as_ref(), None, false);
        for (i, layer) in layers.iter_mut().enumerate() {
            let mamba = d.windows.layer_types.as_ref().is_some_and(|t| {
                // The Hub says `mamba`, Transformers 5 `linear_attention`.
                matches!(
                    t.get(i),
                    Some(LayerType::Mamba | LayerType::LinearAttention)
                )
            });
            if mamba {
                layer.mixer = MixerKind::Mamba2;
                layer.rope = None;
            }
        }
        let attention = AttentionSettings {
            scale: self.attention_multiplier as f32,
            ..d.attention()
        };
        let act = d.activation(config)?;
        let shared = MlpSettings {
            intermediate_size: self.shared_intermediate_size,
            layout: MlpLayout::Gated,
            activation: act,
            bias: false,
        };
        // Transformers' decoding steps leave `dt` unclamped (`mamba2_selective_state_update`).
        let mamba2 = self.mamba.settings(d, 1e-6, false, config)?;
        let settings = DecoderSettings {
            mamba2: Some(mamba2),
            embedding_scale: Some(self.embedding_multiplier as f32),
            residual_scale: Some(self.residual_multiplier as f32),
            logits_scale: Some((1.0 / self.logits_scaling) as f32),
            ..d.settings(attention, shared, layers)
        };
        if self.moe.num_experts == 0 {
            return Ok(settings);
        }
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
        moe.shared_expert = Some(SharedExpertSettings {
            intermediate_size: self.shared_intermediate_size,
            gated: false,
            bias: false,
            join: SharedJoin::Sum,
        });
        Ok(settings.with_moe(moe, |_| true))
    }

    fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {
        let sparse = settings.moe.is_some();
        let shared = if sparse {
            ".mlp.shared_expert."
        } else {
            ".mlp."
        };
        // The fused shared MLP (quantized ones too: scales and biases split like the
        // packed weight, by rows).
        let fused: Vec<(String, String, String)> = weights
            .names()
            .filter_map(|n| {
                let (prefix, part) = n.split_once(".shared_mlp.input_linear.")?;
                Some((n.to_owned(), prefix.to_owned(), part.to_owned()))
            })
            .collect();
        for (name, prefix, part) in fused {
            // Gate rows, then up rows.
            let t = weights.remove(&name).expect("listed above");
            let parts = t.split_equal(2, 0)?;
            weights.insert(
                format!("{prefix}{shared}gate_proj.{part}"),
                parts[0].clone(),
            );
            weights.insert(format!("{prefix}{shared}up_proj.{part}"), parts[1].clone());
        }
        weights.rename(|name| {
            Some(
                name.replacen(
                    ".shared_mlp.output_linear.",
                    &format!("{shared}down_proj."),
                    1,
                )
                .replacen(".mamba.", ".mixer.", 1)
                .replacen(
                    ".block_sparse_moe.input_linear.weight",
                    ".mlp.experts.gate_up_proj",
                    1,
                )
                .replacen(
                    ".block_sparse_moe.output_linear.weight",
                    ".mlp.experts.down_proj",
                    1,
                )
                .replacen(".block_sparse_moe.router.layer.", ".mlp.gate.", 1)
                .replacen(".block_sparse_moe.router.", ".mlp.gate.", 1),
            )
        });
        sanitize_moe(weights, settings, Some("block_sparse_moe"), &[])
    }
}
