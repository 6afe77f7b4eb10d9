//! The model module a plan and its chosen variant make: config, how it maps onto the shared
//! blocks, sanitize, load. Plain text here, formatted by rustfmt afterwards.

use super::plan::{
    Choice, Field, FieldType, Flag, LayerRule, Plan, RopeRule, Scalar, MLA_FIELDS, MOE_FIELDS,
};
use super::probed::{Join, SharedJoin};
use super::routing::{GroupScore, Groups, Routing, Rule, Scores};
use mlx_models::transformer::{MlpLayout, NormPlacement, QkNorm};
use serde_json::Value;
use std::fmt::Write;

/// A readable name for the family (`gemma3_text` → `Gemma3 Text`).
pub fn title(model_type: &str) -> String {
    model_type
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn rust_type(f: &Field) -> String {
    let base = match f.ty {
        FieldType::I32 => "i32",
        FieldType::Usize => "usize",
        FieldType::F64 => "f64",
        FieldType::Bool => "bool",
        FieldType::Str => "String",
        FieldType::LayerTypes => "Vec<LayerType>",
        FieldType::IntList => "Vec<i32>",
        FieldType::FloatList => "Vec<f64>",
        FieldType::StrList => "Vec<String>",
    };
    if f.optional() {
        format!("Option<{base}>")
    } else {
        base.to_owned()
    }
}

fn field_expr(plan: &Plan, name: &str) -> String {
    match plan.fields.iter().find(|f| f.name == name) {
        Some(f) if f.optional() && matches!(f.ty, FieldType::Str | FieldType::LayerTypes) => {
            format!("self.{name}.clone()")
        }
        _ => format!("self.{name}"),
    }
}

fn flag(plan: &Plan, f: &Flag) -> String {
    match f {
        Flag::Never => "false".to_owned(),
        Flag::Always => "true".to_owned(),
        // A flag `DecoderConfig` reads (`mlp_bias`), through `d`.
        Flag::Field(name) if CORE_FIELDS.contains(&name.as_str()) => {
            format!("d.{name}.unwrap_or(false)")
        }
        Flag::Field(name) => match plan.fields.iter().find(|x| &x.name == name) {
            Some(x) if x.optional() => format!("self.{name}.unwrap_or(false)"),
            _ => format!("self.{name}"),
        },
    }
}

/// An `Option<f32>` expression.
fn scalar(plan: &Plan, s: &Scalar) -> String {
    let optional = |name: &str| {
        plan.fields
            .iter()
            .find(|f| f.name == name)
            .is_some_and(Field::optional)
    };
    let wrap = |name: &str, expr: &str| {
        if optional(name) {
            format!("self.{name}.map(|v| {expr})")
        } else {
            format!("Some({})", expr.replace('v', &format!("self.{name}")))
        }
    };
    match s {
        Scalar::None => "None".to_owned(),
        Scalar::Field(n) => wrap(n, "v as f32"),
        Scalar::InvSqrtField(n) => wrap(n, "v.powf(-0.5) as f32"),
        Scalar::InvField(n) => wrap(n, "(1.0 / v) as f32"),
        Scalar::SqrtHidden => "Some(f64::from(d.hidden_size).sqrt() as f32)".to_owned(),
        Scalar::SqrtHiddenBf16 => {
            "Some(crate::nn::round_to_bf16(f64::from(d.hidden_size).sqrt() as f32))".to_owned()
        }
        Scalar::FieldOverSqrtLayers(n) => {
            wrap(n, "(v / (d.num_hidden_layers as f64).sqrt()) as f32")
        }
        Scalar::FieldOverHidden(n) => wrap(n, "(v / f64::from(d.hidden_size)) as f32"),
        Scalar::One => "Some(1.0)".to_owned(),
        Scalar::OneUnless(n) => format!("(!self.{n}).then_some(1.0)"),
        Scalar::SqrtHiddenWhen(n, when) => {
            let set = flag(plan, &Flag::Field(n.clone()));
            format!(
                "({}{set}).then(|| f64::from(d.hidden_size).sqrt() as f32)",
                if *when { "" } else { "!" }
            )
        }
    }
}

/// Fields every family shares ([`mlx_models::family::DecoderConfig`]).
pub const CORE_FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "hidden_act",
    "hidden_activation",
    "rms_norm_eps",
    "attention_bias",
    "mlp_bias",
    "final_logit_softcapping",
];
/// [`mlx_models::family::SlidingWindowConfig`].
pub const WINDOW_FIELDS: &[&str] = &[
    "sliding_window",
    "layer_types",
    "use_sliding_window",
    "max_window_layers",
    "sliding_window_pattern",
];
/// [`mlx_models::family::NoRopeConfig`].
pub const NO_ROPE_FIELDS: &[&str] = &["no_rope_layers", "no_rope_layer_interval"];

fn shared(plan: &Plan, name: &str) -> bool {
    CORE_FIELDS.contains(&name)
        || WINDOW_FIELDS.contains(&name)
        || NO_ROPE_FIELDS.contains(&name)
        || (plan.moe.is_some() && MOE_FIELDS.contains(&name))
        || (plan.mla.is_some() && MLA_FIELDS.contains(&name))
        || plan
            .hybrid
            .as_ref()
            .is_some_and(|h| super::recurrent::in_mamba2_config(h, name))
}

/// Merges mlx-lm's split `kv_b_proj` back, first thing in a latent attention module's
/// `sanitize`.
const MERGE_KV_B: &str = "// mlx-lm's split `kv_b_proj` (`embed_q`/`unembed_out`) merged back.\n\
    if let Some(mla) = &settings.latent_attention { merge_split_kv_b(weights, mla)?; }";

/// Transformers' defaults of the fields the module reads, as one line of JSON.
pub fn defaults_json(plan: &Plan) -> String {
    let mut map = serde_json::Map::new();
    for f in &plan.fields {
        if !f.default.is_null() {
            map.insert(f.name.clone(), f.default.clone());
        }
    }
    Value::Object(map).to_string()
}

/// The family's `LayerRule` variant.
pub fn layer_rule_expr(rule: &LayerRule) -> String {
    format!("LayerRule::{rule:?}")
}

/// The `LayerRule` the module passes to `d.layers`: none sliding where the config has no
/// window, the rule with the config's period where a field sets it
/// ([`Plan::layer_period`]), else the derived rule.
pub fn plan_layer_rule_expr(plan: &Plan) -> String {
    let windows = plan.sliding_window.is_some() || plan.layer_types_field;
    match (windows, &plan.layer_period) {
        (false, _) => "LayerRule::NoSliding".to_owned(),
        (true, Some(field)) => {
            // The rule's period is the config's.
            let variant = format!("{:?}", plan.layer_rule);
            let name = variant.split('(').next().unwrap_or_default();
            format!("LayerRule::{name}({})", layer_period_value(plan, field))
        }
        (true, None) => layer_rule_expr(&plan.layer_rule),
    }
}

/// The period field's value in the module: the field, or (a nullable one) the value the
/// module required of it first (`layer_period`).
fn layer_period_value(plan: &Plan, field: &str) -> String {
    match plan.fields.iter().find(|f| f.name == field) {
        Some(f) if f.optional() => "layer_period".to_owned(),
        _ => format!("self.{field}"),
    }
}

/// The module source for `plan` with `choice`, before rustfmt.
pub fn module_source(plan: &Plan, choice: &Choice) -> String {
    if let Some(recurrent) = &plan.recurrent {
        return super::recurrent::module_source(plan, recurrent);
    }
    let mut s = String::new();
    let mt = &plan.model_type;
    let w = &mut s;
    let _ = writeln!(
        w,
        "//! {} (`{mt}`), ported from Transformers {} (`{}`).",
        title(mt),
        plan.transformers_version,
        plan.architecture
    );
    let _ = writeln!(w, "//!");
    doc(
        w,
        "//! ",
        &format!(
            "Generated by `cargo xtask port {mt}` and verified layer by layer against the \
             Transformers fixtures in `tests/fixtures/{mt}/`; decisions, weight names and \
             numbers are in `tests/fixtures/{mt}/PORT_REPORT.md`."
        ),
    );
    let _ = writeln!(w, "//!");
    for line in structure_summary(plan, choice) {
        doc(w, "//! ", &format!("- {line}"));
    }
    let _ = writeln!(w);

    let own: Vec<&Field> = plan
        .fields
        .iter()
        .filter(|f| !shared(plan, &f.name))
        .collect();

    // What differs from the defaults of the shared settings.
    let mut family = vec!["DecoderConfig", "DecoderFamily", "LayerRule"];
    if let Some(moe) = &plan.moe {
        family.extend(["MoeConfig", "sanitize_moe"]);
        if same_projections(moe) {
            family.push("EXPERT_PROJECTIONS");
        }
    }
    if plan.mla.is_some() {
        family.push("MlaConfig");
    }
    let mut transformer = vec!["DecoderSettings", "MlpLayout"];
    if let Some(h) = &plan.hybrid {
        family.extend(["AttentionLayers", "set_recurrent_layers"]);
        if super::recurrent::uses_mamba2_config(h) {
            family.push("Mamba2Config");
        }
        transformer.push("MixerKind");
        if matches!(h.rule, super::recurrent::AttentionRule::LayerTypes { .. })
            && !transformer.contains(&"LayerType")
        {
            transformer.push("LayerType");
        }
    }
    let renames =
        !plan.renames.is_empty() || !plan.prefix_renames.is_empty() || !plan.conv1d.is_empty();
    let sanitizes = renames || plan.mla.is_some() || plan.qkv_groups.is_some();
    if sanitizes && plan.moe.is_none() {
        transformer.push("drop_computed_weights");
    }
    let mut attn = Vec::new();
    if plan.qkv_fused {
        attn.push("qkv_layout: QkvLayout::Fused".to_owned());
        transformer.push("QkvLayout");
    }
    // `d.attention()` puts `attention_bias` on q/k/v/o; `d.mlp()` puts `mlp_bias` on the MLP.
    let by_default = |f: &Flag, field: &str| match f {
        Flag::Field(name) => name == field,
        Flag::Never => !plan.fields.iter().any(|x| x.name == field),
        Flag::Always => false,
    };
    if !by_default(&plan.qkv_bias, "attention_bias") {
        attn.push(format!("qkv_bias: {}", flag(plan, &plan.qkv_bias)));
    }
    if !by_default(&plan.o_bias, "attention_bias") {
        attn.push(format!("o_bias: {}", flag(plan, &plan.o_bias)));
    }
    let norm = match &plan.layer_norm {
        Some(_) if plan.weightless_norms => "NormKind::LayerNoWeight".to_owned(),
        None if plan.weightless_norms => "NormKind::RmsNoWeight".to_owned(),
        Some(bias) if choice.norm_plus_one => {
            format!("NormKind::LayerPlusOne {{ bias: {} }}", flag(plan, bias))
        }
        Some(bias) => format!("NormKind::Layer {{ bias: {} }}", flag(plan, bias)),
        None if choice.norm_plus_one => "NormKind::RmsPlusOne".to_owned(),
        None => "NormKind::Rms".to_owned(),
    };
    if plan.qk_norm != QkNorm::None {
        attn.push(format!("qk_norm: QkNorm::{:?}", plan.qk_norm));
        transformer.push("QkNorm");
    }
    if plan.qk_norm == QkNorm::L2AfterRope {
        // Unweighted q/k norms at the model's epsilon.
        let eps = match plan.eps_constant {
            Some(eps) => float(eps),
            None if plan.eps_field == "rms_norm_eps" => "d.rms_norm_eps.unwrap_or(1e-6)".to_owned(),
            None => field_expr(plan, &plan.eps_field),
        };
        attn.push(format!("qk_norm_eps: {eps} as f32"));
    }
    match &plan.attention_scale {
        Scalar::None => {}
        Scalar::OneUnless(f) => attn.push(format!(
            "scale: if self.{f} {{ (d.head_dim() as f32).powf(-0.5) }} else {{ 1.0 }}"
        )),
        sc => {
            let value = scalar(plan, sc);
            attn.push(match value.strip_prefix("Some(") {
                // A field that is always there: its value, not an Option.
                Some(inner) if !value.contains(".map(") => {
                    format!("scale: {}", &inner[..inner.len() - 1])
                }
                _ => format!("scale: {value}.unwrap_or((d.head_dim() as f32).powf(-0.5))"),
            })
        }
    }
    if plan.sinks {
        attn.push("sinks: true".to_owned());
    }
    if plan.gate_proj {
        attn.push("gate_proj: true".to_owned());
    }
    if plan.output_gate {
        attn.push("output_gate: true".to_owned());
    }
    if plan.differential {
        attn.push("differential: true".to_owned());
    }
    if plan.clip_qkv != Scalar::None {
        attn.push(format!("clip_qkv: {}", scalar(plan, &plan.clip_qkv)));
    }
    if plan.attention_softcap != Scalar::None {
        attn.push(format!(
            "logit_softcap: {}",
            scalar(plan, &plan.attention_softcap)
        ));
    }
    if let Some(a) = plan.alibi {
        let factor = match a.factor {
            super::alibi::AlibiFactor::One => "1.0".to_owned(),
            super::alibi::AlibiFactor::AttentionScale => {
                "(d.head_dim() as f32).powf(-0.5)".to_owned()
            }
        };
        attn.push(format!(
            "alibi: Some(AlibiSettings {{ max_bias: {}, factor: {factor} }})",
            float(a.max_bias as f64)
        ));
        transformer.push("AlibiSettings");
    }
    if !attn.is_empty() {
        transformer.push("AttentionSettings");
    }
    let mut model = Vec::new();
    let null_norm = null_norm_entries(plan, &norm);
    if let Some((norm, _)) = &null_norm {
        model.push(norm.clone());
    } else if norm != "NormKind::Rms" {
        model.push(format!("norm: {norm}"));
    }
    if norm != "NormKind::Rms" || null_norm.is_some() {
        transformer.push("NormKind");
    }
    if let Some(f) = &plan.lm_head_bias_field {
        model.push(format!(
            "lm_head_bias: {}",
            flag(plan, &Flag::Field(f.clone()))
        ));
    } else if plan.lm_head_bias {
        model.push("lm_head_bias: true".to_owned());
    }
    if plan.embedding_layernorm {
        model.push("embedding_layernorm: true".to_owned());
    }
    if let Some(head) = &plan.prediction_head {
        if !transformer.contains(&"Activation") {
            transformer.push("Activation");
        }
        let value = if optional(plan, &head.activation_field) {
            format!(
                "self.{}.as_deref().unwrap_or_default()",
                head.activation_field
            )
        } else {
            format!("&self.{}", head.activation_field)
        };
        model.push(format!(
            "prediction_head: Some(HeadSettings {{ bias: {}, activation: Activation::from_config(config, {:?}, {value})? }})",
            flag(plan, &head.bias),
            head.activation_field
        ));
    }
    if plan.norm_on_embeddings {
        model.push("embedding_norm: true".to_owned());
    }
    if plan.sub_norms {
        model.push("sub_norms: true".to_owned());
    }
    if let Some(offset) = plan.learned_positions {
        model.push("learned_positions: true".to_owned());
        if offset != 0 {
            model.push(format!("position_offset: {offset}"));
        }
    }
    if !plan.final_norm {
        model.push("final_norm: false".to_owned());
    }
    if let Some(s) = plan.sinusoidal_positions {
        let d = mlx_models::positions::Sinusoid::default();
        let mut parts = Vec::new();
        if s.base != d.base {
            parts.push(format!("base: {}", float(s.base)));
        }
        if s.shift != d.shift {
            parts.push(format!("shift: {}", s.shift));
        }
        if s.first_position != d.first_position {
            parts.push(format!("first_position: {}", s.first_position));
        }
        if s.interleaved != d.interleaved {
            parts.push(format!("interleaved: {}", s.interleaved));
        }
        model.push(if parts.is_empty() {
            "sinusoidal_positions: Some(Sinusoid::default())".to_owned()
        } else {
            format!(
                "sinusoidal_positions: Some(Sinusoid {{ {}, ..Sinusoid::default() }})",
                parts.join(", ")
            )
        });
    }
    if let Some((_, eps)) = null_norm {
        model.push(eps);
    } else if let Some(eps) = plan.eps_constant {
        model.push(format!("norm_eps: {}", float(eps)));
    } else if plan.eps_field != "rms_norm_eps" {
        let eps = match plan.fields.iter().find(|f| f.name == plan.eps_field) {
            // A nullable field: Transformers' default (the interpreter's too) when null.
            Some(f) if f.optional() => format!(
                "self.{}.unwrap_or({})",
                f.name,
                float(f.default.as_f64().unwrap_or(1e-6))
            ),
            _ => field_expr(plan, &plan.eps_field),
        };
        model.push(format!("norm_eps: {eps}"));
    }
    if let Some((field, placement)) = &choice.placement_when {
        let value = if optional(plan, field) {
            format!("self.{field}.unwrap_or(false)")
        } else {
            format!("self.{field}")
        };
        model.push(format!(
            "norm_placement: if {value} {{ NormPlacement::{placement:?} }} else {{ NormPlacement::{:?} }}",
            choice.norm_placement
        ));
        transformer.push("NormPlacement");
    } else if choice.norm_placement != NormPlacement::Pre {
        model.push(format!(
            "norm_placement: NormPlacement::{:?}",
            choice.norm_placement
        ));
        transformer.push("NormPlacement");
    }
    // `d.settings()` applies `final_logit_softcapping`.
    let final_cap = match &plan.final_softcap {
        Scalar::Field(name) if name == "final_logit_softcapping" => &Scalar::None,
        other => other,
    };
    for (name, value) in [
        ("embedding_scale", &choice.embedding_scale),
        ("residual_scale", &plan.residual_scale),
        ("logits_scale", &plan.logits_scale),
        ("final_logit_softcap", final_cap),
    ] {
        if *value != Scalar::None {
            model.push(format!("{name}: {}", scalar(plan, value)));
        }
    }
    let act = if let Some(name) = plan.activation_constant {
        if !transformer.contains(&"Activation") {
            transformer.push("Activation");
        }
        format!(
            "Activation::{}",
            match name {
                "relu" => "Relu",
                "relu2" => "Relu2",
                "gelu" => "Gelu",
                "gelu_pytorch_tanh" => "GeluTanh",
                _ => "Silu",
            }
        )
    } else if plan.act_field == "hidden_act" || plan.act_field == "hidden_activation" {
        "d.activation(config)?".to_owned()
    } else {
        if !transformer.contains(&"Activation") {
            transformer.push("Activation");
        }
        let value = if optional(plan, &plan.act_field) {
            format!("self.{}.as_deref().unwrap_or(\"silu\")", plan.act_field)
        } else {
            format!("&self.{}", plan.act_field)
        };
        format!(
            "Activation::from_config(config, {:?}, {value})?",
            plan.act_field
        )
    };
    let act = if choice.gelu_as_tanh {
        format!("{act}.gelu_as_tanh()")
    } else {
        act
    };
    if !by_default(&plan.mlp_bias, "mlp_bias")
        || plan.intermediate_divisor.is_some()
        || plan
            .moe
            .as_ref()
            .is_some_and(|m| m.dense_width_field.is_some())
    {
        transformer.push("MlpSettings");
    }
    family.sort_unstable_by_key(|n| n.to_lowercase());
    transformer.sort_unstable_by_key(|n| n.to_lowercase());
    let _ = writeln!(w, "use crate::config::ConfigFile;");
    let _ = writeln!(w, "use crate::error::Result;");
    let _ = writeln!(w, "use crate::family::{{{}}};", family.join(", "));
    let mut fused_qkv = Vec::new();
    if !plan.conv1d.is_empty() {
        fused_qkv.push("conv1d_to_linear");
    }
    if plan.qkv_groups.is_some() {
        fused_qkv.extend(["layers_grouped_to_blocks", "Part"]);
    }
    match fused_qkv.as_slice() {
        [] => {}
        [one] => {
            let _ = writeln!(w, "use crate::fused_qkv::{one};");
        }
        many => {
            let _ = writeln!(w, "use crate::fused_qkv::{{{}}};", many.join(", "));
        }
    }
    if plan.rope_from_code && plan.mla.is_none() {
        let _ = writeln!(w, "use crate::rope::RopeFields;");
    }
    if plan.sinusoidal_positions.is_some() {
        let _ = writeln!(w, "use crate::positions::Sinusoid;");
    }
    if let Some(line) = plan.hybrid.as_ref().and_then(super::recurrent::hybrid_uses) {
        let _ = writeln!(w, "{line}");
    }
    if plan.prediction_head.is_some() {
        let _ = writeln!(w, "use crate::head::HeadSettings;");
    }
    let _ = writeln!(w, "use crate::transformer::{{{}}};", transformer.join(", "));
    if let Some(moe) = &plan.moe {
        let _ = writeln!(
            w,
            "use crate::moe::{{{}}};",
            moe_uses(moe, choice).join(", ")
        );
    }
    if plan.mla.is_some() {
        let _ = writeln!(w, "use crate::mla::merge_split_kv_b;");
    }
    let mut weights_uses = Vec::new();
    if !plan.renames.is_empty() || (!plan.prefix_renames.is_empty() && plan.moe.is_none()) {
        weights_uses.push("rename_layer_module");
    }
    if !plan.prefix_renames.is_empty() {
        weights_uses.push("rename_prefix");
    }
    if plan
        .moe
        .as_ref()
        .is_some_and(|m| !m.checkpoint_renames.is_empty())
    {
        weights_uses.push("rename_substrings");
    }
    if sanitizes || plan.moe.is_some() {
        weights_uses.push("Weights");
    }
    if !weights_uses.is_empty() {
        let _ = writeln!(w, "use crate::weights::{{{}}};", weights_uses.join(", "));
    }
    let _ = writeln!(w, "use serde::Deserialize;");
    let _ = writeln!(w);

    // Config.
    doc(
        w,
        "/// ",
        &format!(
            "config.json fields, with the names of `{}`: the shared ones and the family's own; \
             Transformers' defaults are in `DEFAULTS`.",
            plan.config_class
        ),
    );
    let _ = writeln!(
        w,
        "#[derive(Debug, Clone, Deserialize)]\npub struct Config {{"
    );
    let _ = writeln!(w, "#[serde(flatten)]\npub decoder: DecoderConfig,");
    if plan.moe.is_some() {
        let _ = writeln!(w, "#[serde(flatten)]\npub moe: MoeConfig,");
    }
    if plan.mla.is_some() {
        let _ = writeln!(w, "#[serde(flatten)]\npub mla: MlaConfig,");
    }
    if plan
        .hybrid
        .as_ref()
        .is_some_and(super::recurrent::uses_mamba2_config)
    {
        let _ = writeln!(w, "#[serde(flatten)]\npub mamba: Mamba2Config,");
    }
    for f in &own {
        if let Some(line) = plan
            .hybrid
            .as_ref()
            .and_then(|h| super::recurrent::hybrid_field(h, f))
        {
            let _ = writeln!(w, "{line}");
            continue;
        }
        let _ = writeln!(
            w,
            "/// {}.\npub {}: {},",
            capitalize(f.role),
            f.name,
            rust_type(f)
        );
    }
    let _ = writeln!(w, "}}\n");

    // Settings.
    let _ = writeln!(w, "impl DecoderFamily for Config {{");
    let _ = writeln!(
        w,
        "const DEFAULTS: &'static str = r#\"{}\"#;\n",
        defaults_json(plan)
    );
    if !plan.aliases.is_empty() {
        let _ = writeln!(
            w,
            "const ALIASES: &'static [(&'static str, &'static str)] = &[{}];\n",
            plan.aliases
                .iter()
                .map(|(common, own)| format!("({common:?}, {own:?})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !plan.divided_aliases.is_empty() {
        let _ = writeln!(
            w,
            "const DIVIDED_ALIASES: &'static [(&'static str, &'static str, i64)] = &[{}];\n",
            plan.divided_aliases
                .iter()
                .map(|(common, own, divisor)| format!("({common:?}, {own:?}, {divisor})"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(k) = plan.intermediate_per_hidden {
        let _ = writeln!(
            w,
            "const INTERMEDIATE_PER_HIDDEN: Option<i32> = Some({k});\n"
        );
    }
    if let Some(field) = &plan.intermediate_multiple {
        let _ = writeln!(
            w,
            "const INTERMEDIATE_MULTIPLE: Option<&'static str> = Some({field:?});\n"
        );
    }
    for (name, list) in [
        ("UNUSED_PREFIXES", &plan.unused_prefixes),
        ("UNUSED_ANYWHERE", &plan.unused_anywhere),
    ] {
        if !list.is_empty() {
            let _ = writeln!(
                w,
                "const {name}: &'static [&'static str] = &[{}];\n",
                list.iter()
                    .map(|p| format!("{p:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let _ = writeln!(
        w,
        "fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {{"
    );
    let _ = writeln!(w, "let d = &self.decoder;");
    for (field, supported) in &plan.refused {
        if choice
            .placement_when
            .as_ref()
            .is_some_and(|(switch, _)| switch == field)
        {
            continue;
        }
        let value = if optional(plan, field) {
            format!("self.{field}.unwrap_or({supported})")
        } else {
            format!("self.{field}")
        };
        let _ = writeln!(
            w,
            "config.ensure({}{value}, {field:?}, || {:?}.to_owned())?;",
            if *supported { "" } else { "!" },
            super::interpret::refusal(*supported)
        );
    }
    for (key, default, lists) in &plan.derived_list_keys {
        let _ = writeln!(
            w,
            "// Transformers derives {} from a config's `{key}` where they are absent; this module does not.",
            lists.iter().map(|l| format!("`{l}`")).collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(
            w,
            "config.ensure_lists_given({key:?}, {default}, &{lists:?})?;"
        );
    }
    for (field, supported) in &plan.refused_values {
        let value = if optional(plan, field) {
            format!("self.{field}.unwrap_or({supported})")
        } else {
            format!("self.{field}")
        };
        let _ = writeln!(
            w,
            "config.ensure({value} == {supported}, {field:?}, || {:?}.to_owned())?;",
            super::interpret::value_refusal(*supported)
        );
    }
    if let Some(field) = &plan.layer_period {
        let value = layer_period_value(plan, field);
        if value == "layer_period" {
            let _ = writeln!(
                w,
                "let layer_period = config.require({field:?}, self.{field})?;"
            );
        }
        let _ = writeln!(
            w,
            "config.ensure({value} > 0, {field:?}, || \"must be positive: the period of the full-attention layers\".to_owned())?;"
        );
    }
    for (field, key, default) in &plan.nested_refused {
        let _ = writeln!(w, "config.ensure_nested({field:?}, {key:?}, {default:?})?;");
    }
    if attn.is_empty() {
        let _ = writeln!(w, "let attention = d.attention();");
    } else {
        let _ = writeln!(
            w,
            "let attention = AttentionSettings {{ {}, ..d.attention() }};",
            attn.join(", ")
        );
    }
    let layout = match plan.mlp_layout {
        MlpLayout::Gated => "MlpLayout::Gated",
        MlpLayout::FusedGated => "MlpLayout::FusedGated",
        MlpLayout::Plain => "MlpLayout::Plain",
        MlpLayout::UpDown => "MlpLayout::UpDown",
    };
    let act = if plan.moe.is_some() {
        // The dense MLP and the experts share it.
        let _ = writeln!(w, "let act = {act};");
        "act".to_owned()
    } else {
        act
    };
    let mut mlp_set = Vec::new();
    if let Some(f) = plan.moe.as_ref().and_then(|m| m.dense_width_field.as_ref()) {
        mlp_set.push(format!(
            "intermediate_size: self.{f}.unwrap_or(d.intermediate_size)"
        ));
    } else if let Some(k) = plan.intermediate_divisor {
        let _ = writeln!(w, "// The MLP is `intermediate_size` / {k} wide.");
        mlp_set.push(format!("intermediate_size: d.intermediate_size / {k}"));
    }
    if !by_default(&plan.mlp_bias, "mlp_bias") {
        mlp_set.push(format!("bias: {}", flag(plan, &plan.mlp_bias)));
    }
    if mlp_set.is_empty() {
        let _ = writeln!(w, "let mlp = d.mlp({layout}, {act});");
    } else {
        let _ = writeln!(
            w,
            "let mlp = MlpSettings {{ {}, ..d.mlp({layout}, {act}) }};",
            mlp_set.join(", ")
        );
    }
    let theta = float(plan.default_theta);
    let (rope, local_rope) = match &plan.rope {
        None => ("None", "None"),
        Some(RopeRule::Uniform) if plan.rope_dims_field.is_some() && plan.mla.is_none() => {
            let f = plan.rope_dims_field.as_deref().unwrap_or_default();
            let _ = writeln!(
                w,
                "let rope = d.rope_rotating({}, (\"{f}\", self.{f}), {theta}, {}, config)?;",
                if plan.rope_from_code {
                    "&RopeFields::default()"
                } else {
                    "&d.rope"
                },
                choice.rope_traditional
            );
            ("Some(&rope)", "None")
        }
        Some(RopeRule::Uniform) if plan.default_partial_rotary.is_some() && plan.mla.is_none() => {
            let share = float(plan.default_partial_rotary.unwrap_or(1.0));
            let _ = writeln!(
                w,
                "// The share of each head that rotates where a config names none."
            );
            let _ = writeln!(w, "let mut fields = d.rope.clone();");
            let _ = writeln!(
                w,
                "fields.partial_rotary_factor = fields.partial_rotary_factor.or(Some({share}));"
            );
            let _ = writeln!(
                w,
                "let rope = d.rope_from(&fields, {theta}, {}, config)?;",
                choice.rope_traditional
            );
            ("Some(&rope)", "None")
        }
        Some(RopeRule::Uniform) if plan.rope_from_code && plan.mla.is_none() => {
            let _ = writeln!(
                w,
                "let rope = d.rope_from(&RopeFields::default(), {theta}, {}, config)?;",
                choice.rope_traditional
            );
            ("Some(&rope)", "None")
        }
        Some(RopeRule::Uniform) => {
            let _ = writeln!(
                w,
                "let rope = {}{theta}, {}, config)?;",
                if plan.mla.is_some() {
                    "self.mla.rope(d, "
                } else {
                    "d.rope("
                },
                choice.rope_traditional
            );
            ("Some(&rope)", "None")
        }
        Some(RopeRule::PerLayerType { local_base }) => {
            let base = match local_base {
                Some(f) if optional(plan, f) => format!("self.{f}"),
                Some(f) => format!("Some(self.{f})"),
                None => "None".to_owned(),
            };
            for (var, ty) in [
                ("rope", "full_attention"),
                ("local_rope", "sliding_attention"),
            ] {
                let _ = writeln!(
                    w,
                    "let {var} = d.layer_type_rope(\"{ty}\", {base}, {theta}, config)?;"
                );
            }
            ("Some(&rope)", "Some(&local_rope)")
        }
    };
    if plan.rope_reversed && rope != "None" {
        let _ = writeln!(w, "// RoPE turns by -θ (measured on the queries).");
        let _ = writeln!(w, "let rope = rope.reversed();");
        if local_rope != "None" {
            let _ = writeln!(w, "let local_rope = local_rope.reversed();");
        }
    }
    let rule = plan_layer_rule_expr(plan);
    let _ = writeln!(
        w,
        "let {}layers = d.layers({rule}, {rope}, {local_rope}, {});",
        if choice.rope_sliding_only
            || plan.layer_rope_bases.is_some()
            || plan.o_bias_only.is_some()
            || plan.hybrid.is_some()
            || plan.first_layer_no_input_norm
        {
            "mut "
        } else {
            ""
        },
        plan.no_rope.is_some()
    );
    if let Some(only) = plan.o_bias_only {
        let (which, accessor) = match only {
            super::plan::OnlyLayer::First => ("first", "first_mut"),
            super::plan::OnlyLayer::Last => ("last", "last_mut"),
        };
        let _ = writeln!(
            w,
            "// Only the {which} layer's output projection has a bias (Transformers builds it there alone)."
        );
        let _ = writeln!(
            w,
            "if let Some(layer) = layers.{accessor}() {{ layer.o_bias = Some(true); }}"
        );
    }
    if let Some(field) = &plan.layer_rope_bases {
        let _ = writeln!(
            w,
            "if let Some(bases) = &self.{field} {{ d.set_layer_rope_bases(&mut layers, \"{field}\", bases, {}, config)?; }}",
            choice.rope_traditional
        );
    }
    if plan.first_layer_no_input_norm {
        let _ = writeln!(
            w,
            "// The first layer's input is the normalized embedding: no norm before its attention."
        );
        let _ = writeln!(
            w,
            "if let Some(first) = layers.first_mut() {{ first.no_input_norm = true; }}"
        );
    }
    let list_rope = plan.moe.as_ref().and_then(|m| {
        m.list_rope
            .as_ref()
            .zip(m.layer_types_dense_prefix)
            .filter(|_| choice.rope_sliding_only)
    });
    if let Some((rope, k)) = list_rope {
        write_list_rope(w, rope, k);
    } else if choice.rope_sliding_only {
        let _ = writeln!(w, "// RoPE on the sliding-window layers only.");
        let _ = writeln!(
            w,
            "for layer in layers.iter_mut().filter(|l| l.sliding_window.is_none()) {{ layer.rope = None; }}"
        );
    }
    if let Some(h) = &plan.hybrid {
        let (code, entry) = super::recurrent::hybrid_settings(h, plan, |name| shared(plan, name));
        let _ = write!(w, "{code}");
        model.push(entry);
    }
    let base = "d.settings(attention, mlp, layers)";
    let settings = if model.is_empty() {
        base.to_owned()
    } else {
        format!("DecoderSettings {{ {}, ..{base} }}", model.join(", "))
    };
    let settings = if plan.mla.is_some() {
        format!("{settings}.with_latent_attention(self.mla.settings(d, config)?)")
    } else {
        settings
    };
    match &plan.moe {
        None => {
            let _ = writeln!(w, "Ok({settings})");
        }
        Some(moe) => {
            let router = match &moe.routing {
                Some(r) => {
                    write_router(w, plan, r);
                    "router"
                }
                None if moe.normalize_field.is_none() && choice.moe_normalize => {
                    "RouterSettings { normalize: true, ..self.moe.router() }"
                }
                None => "self.moe.router()",
            };
            let shared_bias = match &moe.shared_expert_bias {
                Flag::Never => String::new(),
                f => format!(".with_shared_expert_bias({})", flag(plan, f)),
            };
            let shared_join = write_shared_join(w, plan, moe.shared_join.as_ref());
            let _ = writeln!(
                w,
                "let moe = self.moe.settings({router}, d.intermediate_size, ExpertActivation::Glu(act), {}){shared_bias}{shared_join};",
                moe.shared_expert.unwrap_or(false)
            );
            if let (Some(k), None) = (moe.layer_types_dense_prefix, list_rope) {
                let _ = writeln!(
                    w,
                    "let sparse = self.moe.sparse_layers(config, d.num_hidden_layers, {k})?;"
                );
            }
            let _ = writeln!(
                w,
                "Ok({settings}.with_moe(moe, {}))",
                if moe.layer_types_dense_prefix.is_some() {
                    "|i| sparse[i]"
                } else if moe.dense_layers {
                    "|i| self.moe.is_sparse(i)"
                } else {
                    "|_| true"
                }
            );
        }
    }
    let _ = writeln!(w, "}}");
    if let Some(moe) = &plan.moe {
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {{"
        );
        if !plan.prefix_renames.is_empty() {
            let _ = writeln!(
                w,
                "weights.rename(|name| Some(rename_prefix(name, &PREFIXES)));"
            );
        }
        if !moe.checkpoint_renames.is_empty() {
            let _ = writeln!(
                w,
                "// Hub checkpoints' names as Transformers converts them."
            );
            let _ = writeln!(
                w,
                "weights.rename(|name| Some(rename_substrings(name, &CHECKPOINT_NAMES)));"
            );
        }
        if !plan.renames.is_empty() {
            let _ = writeln!(
                w,
                "weights.rename(|name| Some(rename_layer_module(name, &RENAMES)));"
            );
        }
        if plan.mla.is_some() {
            let _ = writeln!(w, "{MERGE_KV_B}");
        }
        if same_projections(moe) {
            let _ = writeln!(
                w,
                "sanitize_moe(weights, settings, None, EXPERT_PROJECTIONS)"
            );
        } else {
            let _ = writeln!(w, "sanitize_moe(weights, settings, None, &EXPERTS)");
        }
        let _ = writeln!(w, "}}");
    } else if sanitizes {
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "fn sanitize(&self, weights: &mut Weights, settings: &DecoderSettings) -> Result<()> {{"
        );
        if plan.mla.is_some() {
            let _ = writeln!(w, "{MERGE_KV_B}");
        }
        // Transformers keeps no part of such a model under `model.`: a checkpoint that has
        // names there is in the loaded layout (the converter's), with linear layers.
        let conv1d_guard = !plan.conv1d.is_empty()
            && !plan.prefix_renames.is_empty()
            && plan
                .prefix_renames
                .iter()
                .all(|(from, _)| from != "model" && !from.starts_with("model."));
        if conv1d_guard {
            let _ = writeln!(
                w,
                "// The converter's checkpoints (names under `model.`) have linear layers already."
            );
            let _ = writeln!(
                w,
                "let conv1d = !weights.names().any(|n| n.starts_with(\"model.\"));"
            );
        }
        if !renames {
            let _ = writeln!(
                w,
                "drop_computed_weights(weights, settings.tie_word_embeddings);"
            );
        } else if plan.prefix_renames.is_empty() {
            let _ = writeln!(
                w,
                "drop_computed_weights(weights, settings.tie_word_embeddings);"
            );
            let _ = writeln!(
                w,
                "weights.rename(|name| Some(rename_layer_module(name, &RENAMES)));"
            );
        } else {
            // The root renames first: the tied output layer is only known as `lm_head` after.
            let _ = writeln!(
                w,
                "weights.rename(|name| Some(rename_layer_module(&rename_prefix(name, &PREFIXES), &RENAMES)));"
            );
            let _ = writeln!(
                w,
                "drop_computed_weights(weights, settings.tie_word_embeddings);"
            );
        }
        if conv1d_guard {
            let _ = writeln!(w, "if conv1d {{");
        }
        if !plan.conv1d.is_empty() {
            let _ = writeln!(w, "for i in 0..settings.layers.len() {{");
            let _ = writeln!(w, "for module in CONV1D {{");
            let _ = writeln!(
                w,
                "conv1d_to_linear(weights, &format!(\"model.layers.{{i}}.{{module}}\"))?;"
            );
            let _ = writeln!(w, "}}\n}}");
        }
        if conv1d_guard {
            let _ = writeln!(w, "}}");
        }
        if let Some(g) = &plan.qkv_groups {
            let order: Vec<String> = g.order.iter().map(|p| format!("Part::{p:?}")).collect();
            let _ = writeln!(
                w,
                "layers_grouped_to_blocks(weights, settings, {}, [{}])?;",
                match g.groups {
                    Some(n) => format!("Some({n})"),
                    None => "None".to_owned(),
                },
                order.join(", ")
            );
        }
        let _ = writeln!(w, "Ok(())\n}}");
    }
    let _ = writeln!(w, "}}");
    if !plan.prefix_renames.is_empty() {
        let _ = writeln!(w);
        doc(
            w,
            "/// ",
            "Where the checkpoint keeps the embedding, the decoder layers and the final norm, \
             and the names the shared blocks load them under (found by structure).",
        );
        let _ = writeln!(
            w,
            "const PREFIXES: [(&str, &str); {}] = [",
            plan.prefix_renames.len()
        );
        for (from, to) in &plan.prefix_renames {
            let _ = writeln!(w, "({from:?}, {to:?}),");
        }
        let _ = writeln!(w, "];");
    }
    if renames {
        let _ = writeln!(w);
        doc(
            w,
            "/// ",
            "The checkpoint's names of the layer modules the shared blocks load under other \
             names (found from what Transformers calls where).",
        );
        let _ = writeln!(
            w,
            "const RENAMES: [(&str, &str); {}] = [",
            plan.renames.len()
        );
        for (from, to) in &plan.renames {
            let _ = writeln!(w, "({from:?}, {to:?}),");
        }
        let _ = writeln!(w, "];");
    }
    if !plan.conv1d.is_empty() {
        let _ = writeln!(w);
        doc(
            w,
            "/// ",
            "The layer modules Transformers keeps as `Conv1D` (weights `[in, out]`), by the \
             names the blocks load: `sanitize` transposes them to linear layers'.",
        );
        let _ = writeln!(w, "const CONV1D: [&str; {}] = [", plan.conv1d.len());
        for name in &plan.conv1d {
            let _ = writeln!(w, "{name:?},");
        }
        let _ = writeln!(w, "];");
    }
    if let Some(moe) = &plan.moe {
        let _ = writeln!(w);
        if !moe.checkpoint_renames.is_empty() {
            doc(
                w,
                "/// ",
                "Hub checkpoints' names → Transformers' (substrings, in order), as its checkpoint \
                 conversion renames them on load.",
            );
            let _ = writeln!(
                w,
                "const CHECKPOINT_NAMES: [(&str, &str); {}] = [",
                moe.checkpoint_renames.len()
            );
            for (from, to) in &moe.checkpoint_renames {
                let _ = writeln!(w, "({from:?}, {to:?}),");
            }
            let _ = writeln!(w, "];\n");
        }
        if !same_projections(moe) {
            doc(
                w,
                "/// ",
                "The Hub checkpoints' names of the expert projections → the names the blocks \
                 load (per-expert tensors are stacked, Transformers 5's fused ones split).",
            );
            let _ = writeln!(w, "const EXPERTS: [(&str, &str); 3] = [");
            for (from, to) in &moe.projections {
                let _ = writeln!(w, "({from:?}, {to:?}),");
            }
            let _ = writeln!(w, "];");
        }
    }
    unused_config_named(s)
}

/// Whether the Hub names the expert projections as the blocks load them
/// ([`mlx_models::family::EXPERT_PROJECTIONS`]).
fn same_projections(moe: &super::plan::MoePlan) -> bool {
    moe.projections.iter().all(|(from, to)| from == to)
}

/// `source` with `settings`' `config` parameter named `_config` where its body never reads
/// it (a module whose every setting is fixed: CTRL's activation is no config field).
fn unused_config_named(source: String) -> String {
    let signature = "fn settings(&self, config: &ConfigFile)";
    let Some(start) = source.find(signature) else {
        return source;
    };
    let body_start = start + signature.len();
    let body_end = source[body_start..]
        .find("fn sanitize")
        .map_or(source.len(), |i| body_start + i);
    let body = &source[body_start..body_end];
    let reads = body.match_indices("config").any(|(i, _)| {
        let before = body[..i].chars().next_back();
        let after = body[i + "config".len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !ident(before) && !ident(after)
    });
    if reads {
        source
    } else {
        source.replacen(signature, "fn settings(&self, _config: &ConfigFile)", 1)
    }
}

fn optional(plan: &Plan, name: &str) -> bool {
    plan.fields
        .iter()
        .find(|f| f.name == name)
        .is_none_or(Field::optional)
}

/// Doc comment lines of at most 92 columns, each starting with `prefix` (`//! ` or `/// `).
fn doc(w: &mut String, prefix: &str, text: &str) {
    let indent = if text.starts_with("- ") { "  " } else { "" };
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.trim().is_empty() && prefix.len() + line.len() + 1 + word.len() > 92 {
            let _ = writeln!(w, "{prefix}{line}");
            line = indent.to_owned();
        }
        if !line.trim().is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    let _ = writeln!(w, "{prefix}{line}");
}

fn float(x: f64) -> String {
    let s = format!("{x:?}");
    if s.contains('.') || s.contains('e') {
        s
    } else {
        format!("{s}.0")
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// One line per structural fact, for the module doc and the report.
pub fn structure_summary(plan: &Plan, choice: &Choice) -> Vec<String> {
    if let Some(recurrent) = &plan.recurrent {
        return super::recurrent::summary(plan, recurrent);
    }
    let mut lines = Vec::new();
    let placement_text = |placement: NormPlacement| -> String {
        match placement {
            NormPlacement::Pre => "Pre-norm blocks: `input_layernorm` before attention, `post_attention_layernorm` before the MLP.".to_owned(),
            NormPlacement::PostResidual => format!(
                "Post-norm blocks on the residual: `h = post_attention_layernorm(x + attn(x))`, then `post_feedforward_layernorm(h + mlp(h))`{}.",
                if plan.final_norm { "" } else { "; no final norm" }
            ),
            NormPlacement::Post => "Post-norm blocks: `post_attention_layernorm` on the attention output, `post_feedforward_layernorm` on the MLP output, both before the residual add.".to_owned(),
            NormPlacement::Sandwich => "Sandwich norms: `input_layernorm`/`post_attention_layernorm` around attention, `pre_feedforward_layernorm`/`post_feedforward_layernorm` around the MLP.".to_owned(),
            NormPlacement::Parallel => "Parallel blocks: attention and MLP side by side on one `input_layernorm`, both added to the residual.".to_owned(),
            NormPlacement::ParallelTwoNorms => "Parallel blocks: attention on `input_layernorm(x)` and MLP on `post_attention_layernorm(x)`, both added to the residual.".to_owned(),
        }
    };
    lines.push(match &choice.placement_when {
        Some((field, placement)) => format!(
            "Where `{field}` is true: {} Where it is false: {}",
            placement_text(*placement),
            placement_text(choice.norm_placement)
        ),
        None => placement_text(choice.norm_placement),
    });
    if let Some(n) = &plan.null_norm {
        lines.push(format!(
            "Where `{}` is null, {} of `{}`, as Transformers builds them.",
            n.field,
            match n.layer_norm {
                Some(true) => "LayerNorms with bias",
                Some(false) => "LayerNorms without bias",
                None => "RMSNorms",
            },
            n.eps_field
        ));
    }
    lines.push(match (&plan.layer_norm, choice.norm_plus_one) {
        (Some(_), _) if plan.weightless_norms => {
            "LayerNorm (mean and variance) with no weight or bias.".to_owned()
        }
        (None, _) if plan.weightless_norms => "RMSNorm with no weight.".to_owned(),
        (Some(_), true) => {
            "LayerNorm scaling by `1 + weight` (weights stored as offsets from one), \
             with bias where the config says so."
                .to_owned()
        }
        (Some(_), false) => {
            "LayerNorm (mean and variance), with bias where the config says so.".to_owned()
        }
        (None, true) => {
            "RMSNorm scaling by `1 + weight` (weights stored as offsets from one).".to_owned()
        }
        (None, false) => "RMSNorm scaling by `weight`.".to_owned(),
    });
    if let Some(h) = &plan.hybrid {
        lines.push(super::recurrent::hybrid_summary(h));
    }
    if let Some(mla) = &plan.mla {
        lines.push(format!(
            "Multi-head latent attention ([`crate::mla`]): low-rank queries (`q_a_proj`, \
             `q_a_layernorm`, `q_b_proj`; `q_proj` when `q_lora_rank` is null), one compressed \
             latent and RoPE key per token (`kv_a_proj_with_mqa`, `kv_a_layernorm`) expanded by \
             `kv_b_proj`; RoPE on {} of the rope part; scores scaled by \
             `(qk_nope_head_dim + qk_rope_head_dim)^-0.5`.",
            match (mla.interleave_field, choice.rope_traditional) {
                (true, _) => "adjacent pairs (`rope_interleave`) or halves",
                (false, true) => "adjacent pairs",
                (false, false) => "the two halves",
            }
        ));
    } else {
        lines.push(
            format!(
                "Attention: {}{}{}{}.",
                match (&plan.qkv_groups, plan.qkv_fused) {
                    (Some(g), _) => format!(
                        "one fused `qkv_proj` whose rows are {}, each {} (reordered in `sanitize`)",
                        match g.groups {
                            Some(n) => format!("{n} groups of heads"),
                            None => "per head".to_owned(),
                        },
                        g.order
                            .iter()
                            .map(|p| format!("{p:?}").to_lowercase())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    (None, true) => "one fused `qkv_proj`".to_owned(),
                    (None, false) => "`q_proj`/`k_proj`/`v_proj`".to_owned(),
                },
                match plan.qk_norm {
                    QkNorm::None => "",
                    QkNorm::PerHead if plan.layer_norm.is_some() =>
                        ", LayerNorm of each query/key head before RoPE",
                    QkNorm::PerHead => ", RMSNorm of each query/key head before RoPE",
                    QkNorm::Projection => ", RMSNorm over the whole query/key projections",
                    QkNorm::PerHeadAfterRope => ", RMSNorm of each query/key head after RoPE",
                    QkNorm::L2AfterRope =>
                        ", unweighted RMS norm of each query/key head after RoPE",
                },
                match &plan.attention_scale {
                    Scalar::InvSqrtField(f) => format!(", scores scaled by `{f}^-0.5`"),
                    Scalar::Field(f) => format!(", scores scaled by `{f}`"),
                    _ => String::new(),
                },
                match &plan.attention_softcap {
                    Scalar::Field(f) => format!(", scores soft-capped by `{f}`"),
                    _ => String::new(),
                }
            ) + &match &plan.clip_qkv {
                Scalar::Field(f) => format!(" q, k and v clamped to `[-{f}, {f}]` when set."),
                _ => String::new(),
            },
        );
    }
    if choice.gelu_as_tanh {
        lines.push(format!(
            "A config's `{}: \"gelu\"` means the tanh approximation, as Transformers reads it.",
            plan.act_field
        ));
    }
    if let Some(moe) = &plan.moe {
        lines.push(format!(
            "Feed-forward: a {} router (`gate`) picks `num_experts_per_tok` gated experts{}{}{}.",
            match moe
                .routing
                .as_ref()
                .map(|r| (r.scores, r.scores_by.is_some()))
            {
                Some((_, true)) => "softmax or sigmoid",
                Some((Scores::Sigmoid | Scores::SigmoidBiasOnLogits, _)) => "sigmoid",
                _ => "softmax",
            },
            if moe.normalize_field.is_some() {
                ", renormalized when `norm_topk_prob`"
            } else if choice.moe_normalize {
                ", their weights renormalized to sum to one"
            } else {
                ""
            },
            match (moe.shared_expert, &moe.shared_join) {
                (Some(true), _) =>
                    ", plus a shared expert scaled by `sigmoid(shared_expert_gate(x))`".to_owned(),
                (Some(false), Some(SharedJoin::ByField { field, .. })) =>
                    format!(", plus a shared expert, the two summed or averaged as `{field}` says"),
                (Some(false), Some(SharedJoin::Fixed(Join::Average))) =>
                    ", plus a shared expert, the two averaged".to_owned(),
                (Some(false), _) => ", plus a shared expert".to_owned(),
                (None, _) => String::new(),
            },
            if moe.dense_layers || moe.layer_types_dense_prefix.is_some() {
                "; the layers the config keeps dense have the MLP below"
            } else {
                ""
            }
        ));
        if let Some(r) = &moe.routing {
            lines.push(format!(
                "Router (as Transformers computes it): {}.",
                r.describe()
            ));
        }
        if let Some(k) = moe.layer_types_dense_prefix {
            lines.push(format!(
                "`mlp_layer_types` names each layer `dense` or `sparse`; without it the first {k} are dense."
            ));
        }
        lines.push(format!(
            "Checkpoints: {}per-expert `experts.<i>.{}/{}/{}`, Transformers 5's fused experts and stacked `switch_mlp` all load.",
            if moe.checkpoint_renames.is_empty() { "" } else { "Hub names converted as Transformers does; " },
            moe.projections[0].0, moe.projections[1].0, moe.projections[2].0
        ));
    }
    if plan.first_layer_no_input_norm {
        lines.push(
            "No norm before the first layer's attention (its input is the normalized embedding)."
                .to_owned(),
        );
    }
    if let Some(head) = &plan.prediction_head {
        lines.push(format!(
            "A prediction head before the output layer: `head.norm(act(head.dense(h)))`, its activation `{}`.",
            head.activation_field
        ));
    }
    if plan.embedding_layernorm {
        lines.push(
            "A norm of its own (`model.embed_layernorm`) on the embeddings, before the first layer."
                .to_owned(),
        );
    }
    if plan.norm_on_embeddings {
        lines.push(
            "The final norm (`model.norm`) also runs on the embeddings, before the first layer."
                .to_owned(),
        );
    }
    if plan.rope_reversed {
        lines.push(
            "RoPE turns by -θ: `rotate_half` gives `(x₂, −x₁)`, the other way from Llama's."
                .to_owned(),
        );
    }
    lines.push(match plan.mlp_layout {
        MlpLayout::Gated => "MLP: `down_proj(act(gate_proj(x)) * up_proj(x))`.".to_owned(),
        MlpLayout::FusedGated => {
            "MLP: one `gate_up_proj` (gate rows first), `down_proj`.".to_owned()
        }
        MlpLayout::Plain => "MLP: `c_proj(act(c_fc(x)))`.".to_owned(),
        MlpLayout::UpDown => "MLP: `down_proj(act(up_proj(x)))`, no gate.".to_owned(),
    });
    match (&plan.rope, &plan.no_rope) {
        (None, _) if plan.alibi.is_some() => lines.push(
            "No RoPE: ALiBi, each head's scores biased by `slope · (k − q)` (`alibi.rs`).".to_owned(),
        ),
        (None, _) => lines.push("No RoPE.".to_owned()),
        (Some(RopeRule::Uniform), None) if plan.mla.is_some() => lines.push(
            "RoPE on the rope part of each head (all scaling types of `rope_parameters`/`rope_scaling`; YaRN's `mscale_all_dim` scales the scores)."
                .to_owned(),
        ),
        (Some(RopeRule::Uniform), None) => lines.push(format!(
            "RoPE on {} ({}).",
            match (choice.rope_traditional, &plan.rope_dims_field, plan.default_partial_rotary) {
                (true, None, None) => "interleaved pairs".to_owned(),
                (false, None, None) => "the two halves of each head".to_owned(),
                (pairs, dims_field, share) => format!(
                    "{} of the first {} of each head",
                    if pairs { "interleaved pairs" } else { "the two halves" },
                    match (dims_field, share) {
                        (Some(f), _) => format!("`{f}` features"),
                        (None, share) => format!(
                            "`partial_rotary_factor` ({} where a config names none)",
                            share.unwrap_or(1.0)
                        ),
                    }
                ),
            },
            if plan.rope_from_code {
                format!(
                    "base {}, as in Transformers' code: no config field describes this RoPE, and RoPE keys in a config.json are ignored",
                    plan.default_theta
                )
            } else {
                "all scaling types of `rope_parameters`/`rope_scaling`".to_owned()
            }
        )),
        (Some(RopeRule::PerLayerType { .. }), _) => lines.push(
            "RoPE per layer type: full-attention and sliding-window layers each have their own base and scaling.".to_owned(),
        ),
        (Some(_), Some(_)) => lines.push("RoPE, except on the layers `no_rope_layers` marks 0.".to_owned()),
    }
    if let Some(field) = &plan.layer_rope_bases {
        lines.push(format!(
            "Each layer's own RoPE base where `{field}` lists them (0: that layer has none)."
        ));
    }
    if plan.sub_norms {
        lines.push(
            "A norm on the attention output before `o_proj` (`attn_sub_norm`) and one on the \
             MLP's hidden features before `down_proj` (`ffn_sub_norm`)."
                .to_owned(),
        );
    }
    if plan.differential {
        lines.push("Differential attention: two softmaxes over the same scores, values in two halves, combined by a learned λ per layer (`lambda_q1/k1/q2/k2`).".to_owned());
    }
    if plan.sinks {
        lines.push(
            "A learned sink logit per head in each softmax's denominator (`sinks`).".to_owned(),
        );
    }
    if plan.gate_proj {
        lines.push(
            "The attention output, before `o_proj`, times `sigmoid(gate_proj(x))`.".to_owned(),
        );
    }
    if plan.output_gate {
        lines.push(
            "`q_proj` gives each head's queries and then a gate of their width; the attention \
             output, before `o_proj`, times the gate's sigmoid."
                .to_owned(),
        );
    }
    if let Some(s) = plan.sinusoidal_positions {
        lines.push(format!(
            "Fixed sinusoidal positions added to the embeddings ({}, position 0 at angle {} · f).",
            if s.interleaved {
                "sine and cosine side by side per frequency"
            } else {
                "all sines, then all cosines"
            },
            s.first_position
        ));
    }
    if plan.sliding_window.is_some() {
        lines.push("Sliding-window attention on the layers `layer_types` (or the family's rule) marks, with a rotating KV cache.".to_owned());
    }
    let list_rope = plan.moe.as_ref().and_then(|m| m.list_rope.as_ref());
    match list_rope {
        Some(r) if choice.rope_sliding_only => lines.push(format!(
            "RoPE on the sliding-window layers and the `{}` ones{}; the other full-attention layers have none.",
            r.kind,
            r.while_field
                .as_ref()
                .map(|(f, v)| format!(" (while `{f}` is {v})"))
                .unwrap_or_default()
        )),
        _ if choice.rope_sliding_only => lines.push(
            "RoPE on the sliding-window layers only; the full-attention layers have none."
                .to_owned(),
        ),
        _ => {}
    }
    for (what, s) in [
        ("Embeddings scaled by", &choice.embedding_scale),
        ("Sub-block outputs scaled by", &plan.residual_scale),
        ("Logits scaled by", &plan.logits_scale),
        ("Logits soft-capped by", &plan.final_softcap),
    ] {
        match s {
            Scalar::None => {}
            Scalar::SqrtHidden => lines.push(format!("{what} `√hidden_size`.")),
            Scalar::SqrtHiddenBf16 => lines.push(format!(
                "{what} `√hidden_size` rounded to bfloat16 (Transformers keeps it in a bfloat16 buffer)."
            )),
            Scalar::Field(f) => lines.push(format!("{what} `{f}`.")),
            Scalar::InvField(f) => lines.push(format!("{what} `1 / {f}`.")),
            Scalar::InvSqrtField(f) => lines.push(format!("{what} `{f}^-0.5`.")),
            Scalar::FieldOverSqrtLayers(f) => {
                lines.push(format!("{what} `{f} / √num_hidden_layers`."))
            }
            Scalar::FieldOverHidden(f) => lines.push(format!("{what} `{f} / hidden_size`.")),
            Scalar::One => {}
            Scalar::OneUnless(f) => lines.push(format!("{what} 1 unless `{f}`.")),
            Scalar::SqrtHiddenWhen(f, when) => {
                lines.push(format!("{what} `√hidden_size` where `{f}` is {when}."))
            }
        }
    }
    match &plan.attention_scale {
        Scalar::One => lines.push("Attention scores not scaled (no `head_dim^-0.5`).".to_owned()),
        Scalar::OneUnless(f) => lines.push(format!(
            "Attention scores scaled by `head_dim^-0.5`, not at all with `{f}` false."
        )),
        _ => {}
    }
    lines
}

/// `(norm, norm_eps)` entries of the settings where a null epsilon field switches the
/// norms (`plan.null_norm`): `set` where the field has a value.
fn null_norm_entries(plan: &Plan, set: &str) -> Option<(String, String)> {
    let n = plan.null_norm.as_ref()?;
    let field = if CORE_FIELDS.contains(&n.field.as_str()) {
        format!("d.{}", n.field)
    } else {
        format!("self.{}", n.field)
    };
    let null = match n.layer_norm {
        Some(bias) => format!("NormKind::Layer {{ bias: {bias} }}"),
        None => "NormKind::Rms".to_owned(),
    };
    Some((
        format!("norm: if {field}.is_some() {{ {set} }} else {{ {null} }}"),
        format!("norm_eps: {field}.unwrap_or(self.{})", n.eps_field),
    ))
}

/// The loop that takes RoPE from the full-attention layers but those of `rope.kind` (while
/// its field keeps its value): computes `sparse` (the layers' kinds, `k` dense by default).
fn write_list_rope(w: &mut String, rope: &super::probed::ListRope, k: usize) {
    let _ = writeln!(
        w,
        "let sparse = self.moe.sparse_layers(config, d.num_hidden_layers, {k})?;"
    );
    // Whether a layer is not of the kind that rotates.
    let other = if rope.kind == "dense" {
        "sparse"
    } else {
        "!sparse"
    };
    match &rope.while_field {
        Some((field, value)) => {
            let kind = &rope.kind;
            let _ = writeln!(
                w,
                "// RoPE on the sliding-window layers only, and on the {kind} ones while `{field}` is {value}."
            );
            let _ = writeln!(w, "let {kind}_rope = self.{field} == {value};");
            let _ = writeln!(
                w,
                "for (layer, &sparse) in layers.iter_mut().zip(&sparse) {{ \
                 if layer.sliding_window.is_none() && (!{kind}_rope || {other}) {{ layer.rope = None; }} }}"
            );
        }
        None => {
            let _ = writeln!(
                w,
                "// RoPE on the sliding-window layers only, and on the {} ones.",
                rope.kind
            );
            let _ = writeln!(
                w,
                "for (layer, &sparse) in layers.iter_mut().zip(&sparse) {{ \
                 if layer.sliding_window.is_none() && {other} {{ layer.rope = None; }} }}"
            );
        }
    }
}

/// The `.with_shared_expert_join(…)` call for the shared expert's join, after writing the
/// `let join = match …` that reads it from its field; empty for a sum.
fn write_shared_join(w: &mut String, plan: &Plan, join: Option<&SharedJoin>) -> String {
    match join {
        None | Some(SharedJoin::Fixed(Join::Sum)) => String::new(),
        Some(SharedJoin::Fixed(Join::Average)) => {
            ".with_shared_expert_join(SharedJoin::Average)".to_owned()
        }
        Some(SharedJoin::ByField { field, values }) => {
            let value = if optional(plan, field) {
                format!("self.{field}.as_deref().unwrap_or_default()")
            } else {
                format!("self.{field}.as_str()")
            };
            let names: Vec<&str> = values.iter().map(|(v, _)| v.as_str()).collect();
            let _ = writeln!(w, "let join = match {value} {{");
            for (v, j) in values {
                let _ = writeln!(w, "{v:?} => SharedJoin::{j:?},");
            }
            let _ = writeln!(
                w,
                "other => return Err(crate::error::Error::config(&config.path, {field:?}, \
                 format!(\"`{{other}}` is not one of {}\"))),",
                names.join(", ")
            );
            let _ = writeln!(w, "}};");
            ".with_shared_expert_join(join)".to_owned()
        }
    }
}

/// The names a mixture of experts' module takes from `crate::moe`.
fn moe_uses(moe: &super::plan::MoePlan, choice: &Choice) -> Vec<&'static str> {
    let mut uses = vec!["ExpertActivation"];
    if matches!(
        moe.shared_join,
        Some(SharedJoin::ByField { .. } | SharedJoin::Fixed(Join::Average))
    ) {
        uses.push("SharedJoin");
    }
    match &moe.routing {
        Some(r) if is_grouped_sigmoid(r) => {}
        Some(r) => {
            if r.groups != Groups::Fixed(None) {
                uses.extend(["ExpertGroups", "GroupScore"]);
            }
            if sets_router(r) {
                uses.push("RouterSettings");
            }
            if r.scores != Scores::Softmax || r.scores_by.is_some() {
                uses.push("Scoring");
            }
        }
        None if moe.normalize_field.is_none() && choice.moe_normalize => {
            uses.push("RouterSettings")
        }
        None => {}
    }
    uses
}

/// `let router = RouterSettings { … };`: the routing the probes decided, on
/// [`mlx_models::family::MoeConfig::router`] (softmax top-k, renormalized when
/// `norm_topk_prob`).
fn write_router(w: &mut String, plan: &Plan, r: &Routing) {
    if is_grouped_sigmoid(r) {
        let _ = writeln!(w, "let router = self.moe.grouped_sigmoid_router(config)?;");
        return;
    }
    let group = |score: GroupScore| {
        format!(
            "Some(ExpertGroups {{ groups: config.require(\"n_group\", self.moe.n_group)?, \
             top_groups: config.require(\"topk_group\", self.moe.topk_group)?, \
             score: GroupScore::{score:?} }})"
        )
    };
    let mut set = Vec::new();
    if let Some(by) = &r.scores_by {
        // Scores and renormalization per value of a string field.
        let field = &by.field;
        let value = if optional(plan, field) {
            format!("self.{field}.as_deref().unwrap_or_default()")
        } else {
            format!("self.{field}.as_str()")
        };
        let names: Vec<&str> = by.values.iter().map(|(v, ..)| v.as_str()).collect();
        let _ = writeln!(w, "let (scoring, normalize) = match {value} {{");
        for (v, scores, normalize) in &by.values {
            let normalize = match normalize {
                Rule::Never => "false".to_owned(),
                Rule::Always => "true".to_owned(),
                Rule::Field(_) => "self.moe.router().normalize".to_owned(),
            };
            let _ = writeln!(w, "{v:?} => (Scoring::{scores:?}, {normalize}),");
        }
        let _ = writeln!(
            w,
            "other => return Err(crate::error::Error::config(&config.path, {field:?}, \
             format!(\"`{{other}}` is not one of {}\"))),",
            names.join(", ")
        );
        let _ = writeln!(w, "}};");
        set.push("scoring".to_owned());
        set.push("normalize".to_owned());
    } else if r.scores != Scores::Softmax {
        set.push(format!("scoring: Scoring::{:?}", r.scores));
    }
    if r.correction_bias.is_some() {
        set.push("correction_bias: true".to_owned());
    }
    match &r.groups {
        Groups::Fixed(None) => {}
        Groups::Fixed(Some(score)) => set.push(format!("groups: {}", group(*score))),
        Groups::ByField { field, values } => {
            let value = if optional(plan, field) {
                format!("self.{field}.as_deref().unwrap_or_default()")
            } else {
                format!("self.{field}.as_str()")
            };
            let names: Vec<String> = values.iter().map(|(v, _)| v.clone()).collect();
            let _ = writeln!(w, "let groups = match {value} {{");
            for (v, score) in values {
                let _ = writeln!(
                    w,
                    "{v:?} => {},",
                    score.map_or_else(|| "None".to_owned(), group)
                );
            }
            let _ = writeln!(
                w,
                "other => return Err(crate::error::Error::config(&config.path, {field:?}, \
                 format!(\"`{{other}}` is not one of {}\"))),",
                names.join(", ")
            );
            let _ = writeln!(w, "}};");
            set.push("groups".to_owned());
        }
    }
    match r.normalize {
        _ if r.scores_by.is_some() => {}
        Rule::Never => set.push("normalize: false".to_owned()),
        Rule::Always => set.push("normalize: true".to_owned()),
        Rule::Field(_) => {}
    }
    if r.scaled_by.is_some() {
        // `MoeConfig` reads the factor under either name (`route_scale` an alias).
        set.push("scaling_factor: self.moe.routed_scaling_factor.map(|f| f as f32)".to_owned());
    }
    if set.is_empty() {
        let _ = writeln!(w, "let router = self.moe.router();");
    } else {
        let _ = writeln!(
            w,
            "let router = RouterSettings {{ {}, ..self.moe.router() }};",
            set.join(", ")
        );
    }
}

/// Whether the routing is [`mlx_models::family::MoeConfig::grouped_sigmoid_router`]'s
/// (DeepSeek-V3's `noaux_tc`).
fn is_grouped_sigmoid(r: &Routing) -> bool {
    r.scores == Scores::Sigmoid
        && r.scores_by.is_none()
        && r.correction_bias.as_deref() == Some("e_score_correction_bias")
        && r.groups == Groups::Fixed(Some(GroupScore::TopTwoSum))
        && r.normalize == Rule::Field("norm_topk_prob".to_owned())
        && r.scaled_by.as_deref() == Some("routed_scaling_factor")
}

/// Whether the routing differs from [`mlx_models::family::MoeConfig::router`].
fn sets_router(r: &Routing) -> bool {
    r.scores_by.is_some()
        || r.scores != Scores::Softmax
        || r.correction_bias.is_some()
        || r.groups != Groups::Fixed(None)
        || !matches!(r.normalize, Rule::Field(_))
        || r.scaled_by.is_some()
}
