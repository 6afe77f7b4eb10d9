//! A plan run directly on a config.json, without generating code: how the candidates are
//! tried against the fixtures. The generated module computes the same settings; the
//! verification of the generated module afterwards checks that it does.

use super::alibi::AlibiFactor;
use super::codegen::defaults_json;
use super::plan::{Choice, Flag, OnlyLayer, Plan, RopeRule, Scalar};
use super::probed::{Join, SharedJoin};
use super::routing::{GroupScore, Groups, Routing, Rule, Scores};
use mlx_models::config::ConfigFile;
use mlx_models::family::{DecoderConfig, LayerRule, MlaConfig, MoeConfig};
use mlx_models::moe::{
    ExpertActivation, ExpertGroups, RouterSettings, Scoring, SharedJoin as MoeJoin,
};
use mlx_models::rope::Rope;
use mlx_models::transformer::{
    Activation, AlibiSettings, AttentionSettings, DecoderSettings, MlpSettings, NormKind, QkvLayout,
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
            Scalar::SqrtHiddenBf16 => Some(mlx_models::nn::round_to_bf16(
                (f64::from(self.i32("hidden_size")?)).sqrt() as f32,
            )),
            Scalar::FieldOverSqrtLayers(f) => {
                let layers = f64::from(self.i32("num_hidden_layers")?);
                self.f64_opt(f).map(|v| (v / layers.sqrt()) as f32)
            }
            Scalar::FieldOverHidden(f) => {
                let hidden = f64::from(self.i32("hidden_size")?);
                self.f64_opt(f).map(|v| (v / hidden) as f32)
            }
            Scalar::One => Some(1.0),
            Scalar::OneUnless(f) => (!self.bool(f)).then_some(1.0),
            Scalar::SqrtHiddenWhen(f, when) => {
                let root = (f64::from(self.i32("hidden_size")?)).sqrt() as f32;
                (self.bool(f) == *when).then_some(root)
            }
        })
    }
}

/// The settings `plan` with `choice` gives for `config`: the shared fields are read by
/// the same `DecoderConfig` a generated module flattens, with the same defaults.
pub fn settings(plan: &Plan, choice: &Choice, config: &ConfigFile) -> Result<DecoderSettings> {
    let aliases: Vec<(&str, &str)> = plan
        .aliases
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let per_hidden = config.width_multiple(
        plan.intermediate_multiple.as_deref(),
        plan.intermediate_per_hidden,
    )?;
    let divided: Vec<(&str, &str, i64)> = plan
        .divided_aliases
        .iter()
        .map(|(a, b, k)| (a.as_str(), b.as_str(), *k))
        .collect();
    let config = &config
        .with_aliases(&aliases, per_hidden)
        .with_divided_aliases(&divided)?;
    if let Some(recurrent) = &plan.recurrent {
        return super::recurrent::settings(plan, recurrent, config);
    }
    let r = Reader { plan, config };
    let d: DecoderConfig = config.parse_with_defaults(&defaults_json(plan))?;
    let switch = choice.placement_when.as_ref().map(|(field, _)| field);
    for (field, supported) in &plan.refused {
        if Some(field) != switch {
            config.ensure(r.bool(field) == *supported, field, || refusal(*supported))?;
        }
    }
    for (key, default, lists) in &plan.derived_list_keys {
        let lists: Vec<&str> = lists.iter().map(String::as_str).collect();
        config.ensure_lists_given(key, *default, &lists)?;
    }
    for (field, supported) in &plan.refused_values {
        let value = r.value(field).as_i64().unwrap_or(*supported);
        config.ensure(value == *supported, field, || value_refusal(*supported))?;
    }
    let act_value = r.value(&plan.act_field);
    let mut activation = Activation::from_config(
        config,
        &plan.act_field,
        match plan.activation_constant {
            Some(name) => name,
            None => act_value.as_str().unwrap_or("silu"),
        },
    )?;
    if choice.gelu_as_tanh {
        activation = activation.gelu_as_tanh();
    }
    let norm = match &plan.layer_norm {
        Some(_) if plan.weightless_norms => NormKind::LayerNoWeight,
        None if plan.weightless_norms => NormKind::RmsNoWeight,
        Some(bias) if choice.norm_plus_one => NormKind::LayerPlusOne { bias: r.flag(bias) },
        Some(bias) => NormKind::Layer { bias: r.flag(bias) },
        None if choice.norm_plus_one => NormKind::RmsPlusOne,
        None => NormKind::Rms,
    };

    // RoPE the config does not describe reads none of its RoPE keys.
    let none = mlx_models::rope::RopeFields::default();
    let (rope, local_rope) = match &plan.rope {
        None => (None, None),
        // Latent attention rotates its rope part only.
        Some(RopeRule::Uniform) if plan.mla.is_some() => (
            Some(mla_config(plan, config)?.rope(
                &d,
                plan.default_theta,
                choice.rope_traditional,
                config,
            )?),
            None,
        ),
        // A width in features (GPT-J's `rotary_dim`).
        Some(RopeRule::Uniform) if plan.rope_dims_field.is_some() => {
            let f = plan.rope_dims_field.as_deref().unwrap_or_default();
            (
                Some(d.rope_rotating(
                    if plan.rope_from_code { &none } else { &d.rope },
                    (f, r.i32(f)?),
                    plan.default_theta,
                    choice.rope_traditional,
                    config,
                )?),
                None,
            )
        }
        // A share of the head the config class sets where a config names none.
        Some(RopeRule::Uniform) if plan.default_partial_rotary.is_some() => {
            let mut fields = d.rope.clone();
            fields.partial_rotary_factor =
                fields.partial_rotary_factor.or(plan.default_partial_rotary);
            (
                Some(d.rope_from(&fields, plan.default_theta, choice.rope_traditional, config)?),
                None,
            )
        }
        Some(RopeRule::Uniform) if plan.rope_from_code => (
            Some(d.rope_from(&none, plan.default_theta, choice.rope_traditional, config)?),
            None,
        ),
        Some(RopeRule::Uniform) => (
            Some(d.rope(plan.default_theta, choice.rope_traditional, config)?),
            None,
        ),
        Some(RopeRule::PerLayerType { local_base }) => {
            let base = local_base.as_ref().and_then(|f| r.f64_opt(f));
            let rope = |layer_type: &str| -> Result<Rope> {
                let fields = d.rope.for_layer_type(layer_type, base);
                d.rope_from(&fields, plan.default_theta, choice.rope_traditional, config)
            };
            (
                Some(rope("full_attention")?),
                Some(rope("sliding_attention")?),
            )
        }
    };
    // Turning by -θ (measured).
    let (rope, local_rope) = if plan.rope_reversed {
        (rope.map(Rope::reversed), local_rope.map(Rope::reversed))
    } else {
        (rope, local_rope)
    };
    let windows = plan.sliding_window.is_some() || plan.layer_types_field;
    let rule = match (windows, &plan.layer_period) {
        (false, _) => LayerRule::NoSliding,
        (true, None) => plan.layer_rule,
        (true, Some(field)) => {
            let period = r.i32(field)?;
            config.ensure(period > 0, field, || {
                "must be positive: the period of the full-attention layers".to_owned()
            })?;
            match plan.layer_rule {
                LayerRule::EveryNth(_) => LayerRule::EveryNth(period),
                LayerRule::EveryNthFromFirst(_) => LayerRule::EveryNthFromFirst(period),
                other => other,
            }
        }
    };
    let mut layers = d.layers(
        rule,
        rope.as_ref(),
        local_rope.as_ref(),
        plan.no_rope.is_some(),
    );
    if let (true, Some(first)) = (plan.first_layer_no_input_norm, layers.first_mut()) {
        first.no_input_norm = true;
    }
    if choice.rope_sliding_only {
        // The full-attention layers of a kind that rotates too keep theirs.
        let keep = list_rope_layers(plan, &r, config, layers.len())?;
        for (i, layer) in layers.iter_mut().enumerate() {
            if layer.sliding_window.is_none() && !keep[i] {
                layer.rope = None;
            }
        }
    }
    let only = match plan.o_bias_only {
        Some(OnlyLayer::First) => layers.first_mut(),
        Some(OnlyLayer::Last) => layers.last_mut(),
        None => None,
    };
    if let Some(layer) = only {
        layer.o_bias = Some(true);
    }
    if let Some(field) = &plan.layer_rope_bases {
        if let Some(bases) = r.value(field).as_array() {
            let bases: Vec<f64> = bases.iter().filter_map(Value::as_f64).collect();
            config.ensure(
                bases.len() == r.value(field).as_array().map_or(0, Vec::len),
                field,
                || "holds something other than numbers".to_owned(),
            )?;
            d.set_layer_rope_bases(&mut layers, field, &bases, choice.rope_traditional, config)?;
        }
    }

    for (field, key, default) in &plan.nested_refused {
        config.ensure_nested(field, key, default)?;
    }
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
        scale: r
            .scalar(&plan.attention_scale)?
            .unwrap_or((d.head_dim() as f32).powf(-0.5)),
        clip_qkv: r.scalar(&plan.clip_qkv)?,
        sinks: plan.sinks,
        gate_proj: plan.gate_proj,
        output_gate: plan.output_gate,
        differential: plan.differential,
        alibi: plan.alibi.map(|a| AlibiSettings {
            max_bias: a.max_bias,
            factor: match a.factor {
                AlibiFactor::One => 1.0,
                AlibiFactor::AttentionScale => (d.head_dim() as f32).powf(-0.5),
            },
        }),
        logit_softcap: if choice.attention_softcap {
            r.scalar(&plan.attention_softcap)?
        } else {
            None
        },
        ..d.attention()
    };
    let mlp = MlpSettings {
        bias: r.flag(&plan.mlp_bias),
        intermediate_size: match plan.moe.as_ref().and_then(|m| m.dense_width_field.as_ref()) {
            Some(f) => r.i32_opt(f).unwrap_or(d.intermediate_size),
            None => d.intermediate_size,
        },
        ..d.mlp(plan.mlp_layout, activation)
    };
    let mlp = match plan.intermediate_divisor {
        Some(k) => MlpSettings {
            intermediate_size: mlp.intermediate_size / k,
            ..mlp
        },
        None => mlp,
    };
    // A null epsilon field that switches the norms (`plan.null_norm`).
    let null_norm = plan
        .null_norm
        .as_ref()
        .filter(|n| r.f64_opt(&n.field).is_none())
        .map(|n| {
            let kind = match n.layer_norm {
                Some(bias) => NormKind::Layer { bias },
                None => NormKind::Rms,
            };
            (kind, r.f64_opt(&n.eps_field).unwrap_or(1e-6))
        });
    let settings = DecoderSettings {
        norm: null_norm.map_or(norm, |(kind, _)| kind),
        // A null epsilon is Transformers' default, as in the generated module.
        norm_eps: null_norm.map(|(_, eps)| eps).unwrap_or_else(|| {
            plan.eps_constant.unwrap_or_else(|| {
                r.f64_opt(&plan.eps_field)
                    .or_else(|| {
                        let field = plan.fields.iter().find(|f| f.name == plan.eps_field);
                        field.and_then(|f| f.default.as_f64())
                    })
                    .unwrap_or(1e-6)
            })
        }),
        norm_placement: match &choice.placement_when {
            Some((field, placement)) if r.bool(field) => *placement,
            _ => choice.norm_placement,
        },
        lm_head_bias: match &plan.lm_head_bias_field {
            Some(f) => r.bool(f),
            None => plan.lm_head_bias,
        },
        prediction_head: match &plan.prediction_head {
            Some(head) => Some(mlx_models::head::HeadSettings {
                bias: r.flag(&head.bias),
                activation: Activation::from_config(
                    config,
                    &head.activation_field,
                    r.value(&head.activation_field).as_str().unwrap_or_default(),
                )?,
            }),
            None => None,
        },
        learned_positions: plan.learned_positions.is_some(),
        embedding_norm: plan.norm_on_embeddings,
        sub_norms: plan.sub_norms,
        embedding_layernorm: plan.embedding_layernorm,
        position_offset: plan.learned_positions.unwrap_or(0),
        sinusoidal_positions: plan.sinusoidal_positions,
        final_norm: plan.final_norm,
        embedding_scale: r.scalar(&choice.embedding_scale)?,
        residual_scale: r.scalar(&plan.residual_scale)?,
        logits_scale: r.scalar(&plan.logits_scale)?,
        final_logit_softcap: r.scalar(&plan.final_softcap)?,
        ..d.settings(attention, mlp, layers)
    };
    // Unweighted q/k norms at the model's epsilon (NanoChat's).
    let mut settings = settings;
    if plan.qk_norm == mlx_models::transformer::QkNorm::L2AfterRope {
        settings.attention.qk_norm_eps = settings.norm_eps as f32;
    }
    let settings = match &plan.mla {
        Some(_) => settings.with_latent_attention(mla_config(plan, config)?.settings(&d, config)?),
        None => settings,
    };
    let settings = match &plan.hybrid {
        Some(h) => super::recurrent::with_hybrid(plan, h, config, settings)?,
        None => settings,
    };
    let Some(moe) = &plan.moe else {
        return Ok(settings);
    };
    // The mixture of experts, read by the same `MoeConfig` a generated module flattens.
    let m: MoeConfig = config.parse_with_defaults(&defaults_json(plan))?;
    let router = RouterSettings {
        normalize: match &moe.normalize_field {
            Some(field) => r.bool(field),
            None => choice.moe_normalize,
        },
        ..m.router()
    };
    let router = match &moe.routing {
        Some(routing) => routed(&r, &m, routing, router)?,
        None => router,
    };
    let block = m
        .settings(
            router,
            d.intermediate_size,
            ExpertActivation::Glu(activation),
            moe.shared_expert.unwrap_or(false),
        )
        .with_shared_expert_bias(r.flag(&moe.shared_expert_bias))
        .with_shared_expert_join(shared_join(&r, config, moe.shared_join.as_ref())?);
    Ok(if let Some(k) = moe.layer_types_dense_prefix {
        let sparse = m.sparse_layers(config, d.num_hidden_layers, k)?;
        settings.with_moe(block, |i| sparse[i])
    } else if moe.dense_layers {
        settings.with_moe(block, |i| m.is_sparse(i))
    } else {
        settings.with_moe(block, |_| true)
    })
}

/// Per layer, whether it keeps RoPE on full attention by its kind in `mlp_layer_types`
/// (`MoePlan::list_rope`, as the generated module writes it); all false without.
fn list_rope_layers(
    plan: &Plan,
    r: &Reader<'_>,
    config: &ConfigFile,
    layers: usize,
) -> Result<Vec<bool>> {
    let Some((rope, k)) = plan
        .moe
        .as_ref()
        .and_then(|m| m.list_rope.as_ref().zip(m.layer_types_dense_prefix))
    else {
        return Ok(vec![false; layers]);
    };
    let m: MoeConfig = config.parse_with_defaults(&defaults_json(plan))?;
    let on = rope
        .while_field
        .as_ref()
        .is_none_or(|(field, value)| r.value(field).as_i64() == Some(*value));
    Ok(m.sparse_layers(config, layers, k)?
        .into_iter()
        .map(|sparse| on && sparse == (rope.kind == "sparse"))
        .collect())
}

/// The shared expert's join for `config` (as the generated module reads it).
fn shared_join(r: &Reader<'_>, config: &ConfigFile, join: Option<&SharedJoin>) -> Result<MoeJoin> {
    let of = |j: &Join| match j {
        Join::Sum => MoeJoin::Sum,
        Join::Average => MoeJoin::Average,
    };
    Ok(match join {
        None => MoeJoin::Sum,
        Some(SharedJoin::Fixed(j)) => of(j),
        Some(SharedJoin::ByField { field, values }) => {
            let value = r.value(field);
            let value = value.as_str().unwrap_or_default();
            let found = values.iter().find(|(v, _)| v == value);
            config.ensure(found.is_some(), field, || {
                format!("`{value}` is not one of the values probed")
            })?;
            found.map_or(MoeJoin::Sum, |(_, j)| of(j))
        }
    })
}

/// `router` with the routing the probes decided (as the generated module writes it).
fn routed(
    r: &Reader,
    m: &MoeConfig,
    routing: &Routing,
    router: RouterSettings,
) -> Result<RouterSettings> {
    let group = |score: GroupScore| -> Result<Option<ExpertGroups>> {
        Ok(Some(ExpertGroups {
            groups: r.config.require("n_group", m.n_group)?,
            top_groups: r.config.require("topk_group", m.topk_group)?,
            score: match score {
                GroupScore::Max => mlx_models::moe::GroupScore::Max,
                GroupScore::TopTwoSum => mlx_models::moe::GroupScore::TopTwoSum,
            },
        }))
    };
    let groups = match &routing.groups {
        Groups::Fixed(None) => None,
        Groups::Fixed(Some(score)) => group(*score)?,
        Groups::ByField { field, values } => {
            let value = r.value(field);
            let value = value.as_str().unwrap_or_default();
            match values.iter().find(|(v, _)| v == value) {
                Some((_, None)) => None,
                Some((_, Some(score))) => group(*score)?,
                None => {
                    r.config.ensure(false, field, || {
                        format!("`{value}` is not one of the probed values")
                    })?;
                    None
                }
            }
        }
    };
    // Scores and renormalization per value of a string field, where the probes say so.
    let (scores, normalize) = match &routing.scores_by {
        None => (routing.scores, &routing.normalize),
        Some(by) => {
            let value = r.value(&by.field);
            let value = value.as_str().unwrap_or_default();
            match by.values.iter().find(|(v, ..)| v == value) {
                Some((_, scores, normalize)) => (*scores, normalize),
                None => {
                    r.config.ensure(false, &by.field, || {
                        format!("`{value}` is not one of the probed values")
                    })?;
                    (routing.scores, &routing.normalize)
                }
            }
        }
    };
    Ok(RouterSettings {
        scoring: match scores {
            Scores::Softmax => Scoring::Softmax,
            Scores::Sigmoid => Scoring::Sigmoid,
            Scores::SigmoidBiasOnLogits => Scoring::SigmoidBiasOnLogits,
        },
        correction_bias: routing.correction_bias.is_some(),
        groups,
        normalize: match normalize {
            Rule::Never => false,
            Rule::Always => true,
            Rule::Field(_) => router.normalize,
        },
        scaling_factor: match &routing.scaled_by {
            Some(_) => m.routed_scaling_factor.map(|f| f as f32),
            None => None,
        },
        ..router
    })
}

/// The latent attention fields, read by the same `MlaConfig` a generated module flattens.
fn mla_config(plan: &Plan, config: &ConfigFile) -> Result<MlaConfig> {
    config.parse_with_defaults(&defaults_json(plan))
}

/// Why a module refuses an integer field's other values (the generated module says the same).
pub fn value_refusal(supported: i64) -> String {
    format!(
        "only {supported} is supported: other values add weights Transformers computes with, which this module does not implement"
    )
}

/// Why a module refuses a boolean field's other value (the generated module says the same).
pub fn refusal(supported: bool) -> String {
    format!(
        "only {supported} is supported: Transformers computes something else with {}, which this module does not implement",
        !supported
    )
}
