//! A plan run directly on a config.json, without generating code: how the candidates are
//! tried against the fixtures. The generated module computes the same settings; the
//! verification of the generated module afterwards checks that it does.

use super::plan::{Choice, Flag, Plan, RopeRule, Scalar};
use mlx_models::config::ConfigFile;
use mlx_models::family::{drop_rope, NoRopeConfig, SlidingWindowConfig};
use mlx_models::rope::{Rope, RopeConfig, RopeFields};
use mlx_models::transformer::{
    layers_by_type, Activation, AttentionSettings, DecoderSettings, LayerType, MlpSettings,
    NormKind, QkvLayout,
};
use mlx_models::Result;
use serde_json::Value;

struct Reader<'a> {
    plan: &'a Plan,
    config: &'a ConfigFile,
}

impl Reader<'_> {
    /// The config's value of `name`, else Transformers' default.
    fn value(&self, name: &str) -> Value {
        match self.config.value.get(name) {
            Some(v) => v.clone(),
            _ => self
                .plan
                .fields
                .iter()
                .find(|f| f.name == name)
                .map(|f| f.default.clone())
                .unwrap_or(Value::Null),
        }
    }

    fn f64_opt(&self, name: &str) -> Option<f64> {
        self.value(name).as_f64()
    }

    fn i32_opt(&self, name: &str) -> Option<i32> {
        self.value(name).as_i64().map(|v| v as i32)
    }

    fn i32(&self, name: &str) -> Result<i32> {
        self.config.require(name, self.i32_opt(name))
    }

    fn bool(&self, name: &str) -> bool {
        self.value(name).as_bool().unwrap_or(false)
    }

    fn flag(&self, flag: &Flag) -> bool {
        match flag {
            Flag::Never => false,
            Flag::Always => true,
            Flag::Field(f) => self.bool(f),
        }
    }

    fn scalar(&self, scalar: &Scalar) -> Result<Option<f32>> {
        Ok(match scalar {
            Scalar::None => None,
            Scalar::Field(f) => self.f64_opt(f).map(|v| v as f32),
            Scalar::InvSqrtField(f) => self.f64_opt(f).map(|v| v.powf(-0.5) as f32),
            Scalar::InvField(f) => self.f64_opt(f).map(|v| (1.0 / v) as f32),
            Scalar::SqrtHidden => Some((f64::from(self.i32("hidden_size")?)).sqrt() as f32),
        })
    }
}

/// The settings `plan` with `choice` gives for `config`.
pub fn settings(plan: &Plan, choice: &Choice, config: &ConfigFile) -> Result<DecoderSettings> {
    let r = Reader { plan, config };
    let hidden = r.i32("hidden_size")?;
    let heads = r.i32("num_attention_heads")?;
    let kv_heads = r.i32_opt("num_key_value_heads").unwrap_or(heads);
    let head_dim = r.i32_opt("head_dim").unwrap_or(hidden / heads);
    let layers = r.value("num_hidden_layers").as_u64().unwrap_or(0) as usize;
    let max_pos = r.value("max_position_embeddings").as_u64().unwrap_or(0) as usize;
    let eps = r.f64_opt(&plan.eps_field).unwrap_or(1e-6);
    let act_name = r.value(&plan.act_field);
    let mut activation =
        Activation::from_config(config, &plan.act_field, act_name.as_str().unwrap_or("silu"))?;
    if choice.gelu_as_tanh {
        activation = activation.gelu_as_tanh();
    }
    let norm = match &plan.layer_norm {
        Some(bias) => NormKind::Layer { bias: r.flag(bias) },
        None if choice.norm_plus_one => NormKind::RmsPlusOne,
        None => NormKind::Rms,
    };

    // Which layers slide, and which have RoPE: through the same shared fields as the
    // generated module.
    let window_fields = plan.sliding_window.is_some() || plan.layer_types_field;
    let windows = SlidingWindowConfig {
        sliding_window: plan.sliding_window.as_ref().and_then(|f| r.i32_opt(f)),
        layer_types: if plan.layer_types_field {
            serde_json::from_value(r.value("layer_types")).unwrap_or(None)
        } else {
            None
        },
        use_sliding_window: r.value("use_sliding_window").as_bool(),
        max_window_layers: r.i32_opt("max_window_layers"),
        sliding_window_pattern: r.i32_opt("sliding_window_pattern"),
    };
    let no_rope = NoRopeConfig {
        no_rope_layers: serde_json::from_value(r.value("no_rope_layers")).unwrap_or(None),
        no_rope_layer_interval: r.i32_opt("no_rope_layer_interval"),
    };
    let uses_rope = match &plan.no_rope {
        Some(_) => no_rope.uses_rope(layers),
        None => vec![true; layers],
    };
    let types = if window_fields {
        windows.layer_types(layers, plan.layer_rule.shared(), &uses_rope)
    } else {
        LayerType::all(layers, None)
    };
    let window = windows.sliding_window;

    // RoPE.
    let fields: RopeFields = config.parse()?;
    let make_rope = |fields: &RopeFields| -> Result<Rope> {
        Rope::new(RopeConfig {
            traditional: choice.rope_traditional,
            ..RopeConfig::from_fields(fields, head_dim, max_pos, 10_000.0, &config.path)?
        })
    };
    let (rope, local_rope) = match &plan.rope {
        None => (None, None),
        Some(RopeRule::Uniform) => (Some(make_rope(&fields)?), None),
        Some(RopeRule::PerLayerType { local_base }) => {
            let base = local_base.as_ref().and_then(|f| r.f64_opt(f));
            (
                Some(make_rope(&fields.for_layer_type("full_attention", base))?),
                Some(make_rope(
                    &fields.for_layer_type("sliding_attention", base),
                )?),
            )
        }
    };
    let mut layer_settings = layers_by_type(&types, rope.as_ref(), local_rope.as_ref(), window);
    drop_rope(&mut layer_settings, &uses_rope);

    let default_scale = (head_dim as f32).powf(-0.5);
    let attention = AttentionSettings {
        qkv_layout: if plan.qkv_fused {
            QkvLayout::Fused
        } else {
            QkvLayout::Separate
        },
        qkv_bias: r.flag(&plan.qkv_bias),
        o_bias: r.flag(&plan.o_bias),
        qk_norm: plan.qk_norm,
        qk_norm_kind: Some(norm),
        scale: r.scalar(&plan.attention_scale)?.unwrap_or(default_scale),
        logit_softcap: if choice.attention_softcap {
            r.scalar(&plan.attention_softcap)?
        } else {
            None
        },
        ..AttentionSettings::new(heads, kv_heads, head_dim)
    };
    let mlp = MlpSettings {
        intermediate_size: r.i32("intermediate_size")?,
        layout: plan.mlp_layout,
        activation,
        bias: r.flag(&plan.mlp_bias),
    };
    let model_type = plan.model_type.clone();
    Ok(DecoderSettings {
        norm,
        norm_eps: eps,
        norm_placement: choice.norm_placement,
        embedding_scale: r.scalar(&choice.embedding_scale)?,
        residual_scale: r.scalar(&plan.residual_scale)?,
        logits_scale: r.scalar(&plan.logits_scale)?,
        final_logit_softcap: r.scalar(&plan.final_softcap)?,
        tie_word_embeddings: r.bool("tie_word_embeddings"),
        ..DecoderSettings::new(
            &model_type,
            r.i32("vocab_size")?,
            hidden,
            max_pos,
            attention,
            mlp,
            layer_settings,
        )
    })
}
