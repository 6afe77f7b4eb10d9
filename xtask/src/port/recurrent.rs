//! Decoders whose every layer is a norm and a recurrent mixer (Mamba, Mamba2): which mixer
//! a layer holds is read from the tiny model's module tree (the module with `A_log`: with
//! `x_proj`/`dt_proj` it is Mamba's selective scan, with `dt_bias` Mamba2's), the config
//! fields it reads are checked against the weight shapes Transformers built from them,
//! and the module emitted onto [`mlx_models::ssm`].

use super::plan::{Choice, Field, FieldType, Plan, Scalar};
use mlx_models::config::ConfigFile;
use mlx_models::family::LayerRule;
use mlx_models::ssm::{Mamba2Gate, Mamba2Settings, MambaSettings};
use mlx_models::transformer::{DecoderSettings, MixerKind, MlpLayout, NormPlacement, QkNorm};
use mlx_models::Result;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Which recurrent mixer every layer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Mamba's selective scan (`in_proj`, `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`).
    Mamba,
    /// Mamba2's state-space duality (`in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`, `norm`).
    Mamba2,
}

/// What the generator decided for a recurrent-only decoder.
#[derive(Debug, Clone)]
pub struct RecurrentPlan {
    pub kind: Kind,
    /// role → the config field that holds it.
    pub roles: BTreeMap<&'static str, String>,
    /// How the Mamba2 scan's output is gated before `out_proj`.
    pub gate: Option<Mamba2Gate>,
}

impl RecurrentPlan {
    fn field<'a>(&'a self, role: &'a str) -> &'a str {
        self.roles.get(role).map(String::as_str).unwrap_or(role)
    }
}

/// Each role's config field names, the first the class has wins (hybrids prefix theirs
/// with `mamba_`).
const ROLES: &[(&str, &[&str])] = &[
    ("num_heads", &["mamba_n_heads", "num_heads"]),
    ("head_dim", &["mamba_d_head", "head_dim"]),
    (
        "state_size",
        &["mamba_d_state", "state_size", "ssm_state_size"],
    ),
    ("n_groups", &["mamba_n_groups", "n_groups"]),
    ("conv_kernel", &["mamba_d_conv", "conv_kernel"]),
    ("expand", &["mamba_expand", "expand"]),
    ("chunk_size", &["mamba_chunk_size", "chunk_size"]),
    ("time_step_rank", &["time_step_rank"]),
    ("time_step_limit", &["time_step_limit"]),
    ("bias", &["mamba_proj_bias", "use_bias"]),
    ("conv_bias", &["mamba_conv_bias", "use_conv_bias"]),
    ("act", &["hidden_act"]),
    ("eps", &["layer_norm_epsilon", "rms_norm_eps", "norm_eps"]),
    ("residual_in_fp32", &["residual_in_fp32"]),
];

fn needed(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Mamba => &[
            "state_size",
            "conv_kernel",
            "expand",
            "time_step_rank",
            "bias",
            "conv_bias",
            "act",
            "eps",
        ],
        Kind::Mamba2 => &[
            "expand",
            "num_heads",
            "head_dim",
            "state_size",
            "n_groups",
            "conv_kernel",
            "chunk_size",
            "time_step_limit",
            "bias",
            "conv_bias",
            "act",
            "eps",
        ],
    }
}

/// The mixer of one layer from its parameter names (under the layer): its module path
/// and kind, or `None` where no module holds `A_log`.
pub fn layer_mixer(names: &[&str]) -> Option<(String, Kind)> {
    let path = names.iter().find_map(|n| n.strip_suffix(".A_log"))?;
    let has = |leaf: &str| names.contains(&format!("{path}.{leaf}").as_str());
    if has("x_proj.weight") && has("dt_proj.weight") {
        Some((path.to_owned(), Kind::Mamba))
    } else if has("dt_bias") && has("in_proj.weight") {
        Some((path.to_owned(), Kind::Mamba2))
    } else {
        None
    }
}

/// What mixes the tokens in one layer, read from its parameter names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerMixer {
    /// A module with q/k/v (or fused qkv) projections.
    Attention(String),
    /// A Mamba or Mamba2 mixer.
    Recurrent(String, Kind),
    /// A gated short convolution (LFM2's `conv`): `in_proj`, a depthwise `[C, 1, K]`
    /// conv, `out_proj`, no state-space parameters.
    ShortConv(String),
    /// None of these.
    Unknown,
}

impl LayerMixer {
    /// The layer kind a config's `layer_types` names this mixer by.
    fn matches(&self, layer_type: &str) -> bool {
        match self {
            LayerMixer::Attention(_) => {
                layer_type.ends_with("attention") && layer_type != "linear_attention"
            }
            LayerMixer::Recurrent(..) => {
                matches!(layer_type, "linear_attention" | "mamba" | "mamba2" | "ssm")
            }
            LayerMixer::ShortConv(_) => layer_type == "conv",
            LayerMixer::Unknown => false,
        }
    }
}

/// One layer's mixer from its parameter names (under the layer) and shapes.
pub fn classify_layer(params: &[(&str, &[i64])]) -> LayerMixer {
    let names: Vec<&str> = params.iter().map(|(n, _)| *n).collect();
    if let Some((path, kind)) = layer_mixer(&names) {
        return LayerMixer::Recurrent(path, kind);
    }
    let has = |n: &str| names.contains(&n);
    for name in &names {
        for leaf in [".q_proj.weight", ".qkv_proj.weight"] {
            if let Some(path) = name.strip_suffix(leaf) {
                return LayerMixer::Attention(path.to_owned());
            }
        }
    }
    for (name, shape) in params {
        let depthwise = shape.len() == 3 && shape[1] == 1;
        let Some((path, _)) = name
            .strip_suffix(".weight")
            .and_then(|n| n.rsplit_once('.'))
        else {
            continue;
        };
        if depthwise
            && has(&format!("{path}.in_proj.weight"))
            && has(&format!("{path}.out_proj.weight"))
        {
            return LayerMixer::ShortConv(path.to_owned());
        }
    }
    LayerMixer::Unknown
}

/// Every layer's mixer in the tiny model, from its module tree.
pub fn layer_mixers(facts: &Value) -> Vec<LayerMixer> {
    let Some(layers) = facts.pointer("/structure/layers").and_then(Value::as_str) else {
        return Vec::new();
    };
    let n = facts
        .pointer("/resolved_config/num_hidden_layers")
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize;
    let params: Vec<(String, Vec<i64>)> = facts
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let shape = p["shape"].as_array()?.iter().filter_map(Value::as_i64);
            Some((p["name"].as_str()?.to_owned(), shape.collect()))
        })
        .collect();
    (0..n)
        .map(|i| {
            let prefix = format!("{layers}.{i}.");
            let layer: Vec<(&str, &[i64])> = params
                .iter()
                .filter_map(|(name, shape)| {
                    name.strip_prefix(&prefix).map(|n| (n, shape.as_slice()))
                })
                .collect();
            classify_layer(&layer)
        })
        .collect()
}

/// Where layers mix attention with recurrent or convolutional mixers: what the module
/// tree shows per layer, checked against the kinds the config resolves (`layer_types`),
/// and the gap that the generator does not compose them yet. Nothing for a decoder whose
/// layers all hold the same kind of mixer.
pub fn hybrid_gaps(facts: &Value) -> Vec<String> {
    let mixers = layer_mixers(facts);
    // Attention comes in many shapes (GPT-2's `attn.c_attn`, latent attention): only a
    // layer that holds a recurrent or convolutional mixer makes a decoder hybrid.
    let special = mixers
        .iter()
        .filter(|m| matches!(m, LayerMixer::Recurrent(..) | LayerMixer::ShortConv(_)))
        .count();
    if special == 0 {
        return Vec::new();
    }
    let mut gaps = Vec::new();
    let types: Vec<&str> = facts
        .get("layer_types")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if types.len() == mixers.len() {
        for (i, (m, t)) in mixers.iter().zip(&types).enumerate() {
            if !m.matches(t) {
                gaps.push(format!(
                    "layer {i}: the module tree holds {m:?}, the config resolves it as `{t}`"
                ));
            }
        }
    }
    let shown: Vec<String> = mixers
        .iter()
        .map(|m| match m {
            LayerMixer::Attention(p) => format!("attention `{p}`"),
            LayerMixer::Recurrent(p, k) => format!("{k:?} `{p}`"),
            LayerMixer::ShortConv(p) => format!("short conv `{p}`"),
            LayerMixer::Unknown => "unknown".to_owned(),
        })
        .collect();
    gaps.push(format!(
        "the layers mix their mixers ({}; the config's `layer_types` {}): the generator does not \
         compose attention with recurrent or convolutional layers yet (by hand: \
         `LayerSettings::mixer`, `ssm::Mamba2Settings`, `DecoderSettings::short_conv`; see \
         `models/granitemoehybrid.rs`, `models/lfm2.rs`)",
        shown.join(", "),
        if types.len() == mixers.len() {
            "agrees"
        } else {
            "is absent"
        }
    ));
    gaps
}

/// A recurrent-only plan for `facts`, or `None` where some layer holds no recurrent mixer
/// (attention, hybrids: the attention plan, and its gaps, apply).
pub fn plan(facts: &Value, module: &str) -> Option<Plan> {
    let layers = facts.pointer("/structure/layers")?.as_str()?.to_owned();
    let params: Vec<(String, Vec<i64>)> = facts
        .get("parameters")?
        .as_array()?
        .iter()
        .filter_map(|p| {
            let shape = p["shape"].as_array()?.iter().filter_map(Value::as_i64);
            Some((p["name"].as_str()?.to_owned(), shape.collect()))
        })
        .collect();
    let n = facts
        .pointer("/resolved_config/num_hidden_layers")?
        .as_u64()? as usize;
    // Every layer's mixer, from the module tree.
    let mut mixers = Vec::new();
    for i in 0..n {
        let prefix = format!("{layers}.{i}.");
        let names: Vec<&str> = params
            .iter()
            .filter_map(|(name, _)| name.strip_prefix(&prefix))
            .collect();
        mixers.push((layer_mixer(&names)?, names.len()));
    }
    let ((path, kind), _) = mixers.first()?.clone();
    if mixers.iter().any(|((p, k), _)| *p != path || *k != kind) {
        return None;
    }
    let fields_of = facts.get("config_fields")?.as_object()?;
    let resolved = facts.get("resolved_config")?;
    let mut gaps = Vec::new();
    let mut decisions = vec![format!(
        "every layer's `{path}` holds `A_log` and {}: a {kind:?} mixer (read from the module tree of the tiny model)",
        match kind {
            Kind::Mamba => "`x_proj`/`dt_proj`",
            Kind::Mamba2 => "`dt_bias`",
        }
    )];
    let mut roles = BTreeMap::new();
    for (role, names) in ROLES {
        let read = needed(kind).contains(role) || *role == "residual_in_fp32";
        if let Some(name) = names
            .iter()
            .find(|n| fields_of.contains_key(**n))
            .filter(|_| read)
        {
            roles.insert(*role, (*name).to_owned());
        } else if needed(kind).contains(role) {
            gaps.push(format!(
                "config class has no field for the {kind:?} mixer's `{role}` (tried {names:?})"
            ));
        }
    }
    let shape = |leaf: &str| -> Vec<i64> {
        let name = format!("{layers}.0.{path}.{leaf}");
        params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    let present = |leaf: &str| !shape(leaf).is_empty();
    let value = |role: &str| -> i64 {
        roles
            .get(role)
            .and_then(|f| resolved.get(f.as_str()))
            .and_then(Value::as_i64)
            .unwrap_or(-1)
    };
    let flag = |role: &str| -> bool {
        roles
            .get(role)
            .and_then(|f| resolved.get(f.as_str()))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    let hidden = resolved
        .get("hidden_size")
        .and_then(Value::as_i64)
        .unwrap_or(-1);
    // The weight shapes Transformers built from the fields, as the block computes them.
    let mut checks: Vec<(String, Vec<i64>, Vec<i64>)> = Vec::new();
    let (k, s) = (value("conv_kernel"), value("state_size"));
    let gate = match kind {
        Kind::Mamba => {
            let inter = value("expand") * hidden;
            let rank = value("time_step_rank");
            checks.push(("A_log".into(), shape("A_log"), vec![inter, s]));
            checks.push((
                "conv1d.weight".into(),
                shape("conv1d.weight"),
                vec![inter, 1, k],
            ));
            checks.push((
                "x_proj.weight".into(),
                shape("x_proj.weight"),
                vec![rank + 2 * s, inter],
            ));
            checks.push((
                "dt_proj.weight".into(),
                shape("dt_proj.weight"),
                vec![inter, rank],
            ));
            checks.push((
                "in_proj.weight".into(),
                shape("in_proj.weight"),
                vec![2 * inter, hidden],
            ));
            None
        }
        Kind::Mamba2 => {
            let (h, d, g) = (value("num_heads"), value("head_dim"), value("n_groups"));
            let inter = h * d;
            if value("expand") * hidden != inter {
                gaps.push(format!(
                    "the tiny model's expand × hidden_size ({}) is not num_heads × head_dim ({inter}): \
                     the Mamba2 block reads its width from the heads",
                    value("expand") * hidden
                ));
            }
            checks.push(("A_log".into(), shape("A_log"), vec![h]));
            checks.push((
                "conv1d.weight".into(),
                shape("conv1d.weight"),
                vec![inter + 2 * g * s, 1, k],
            ));
            checks.push((
                "in_proj.weight".into(),
                shape("in_proj.weight"),
                vec![2 * inter + 2 * g * s + h, hidden],
            ));
            checks.push((
                "out_proj.weight".into(),
                shape("out_proj.weight"),
                vec![hidden, inter],
            ));
            let norm = facts
                .get("modules")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|m| m["name"].as_str() == Some(&format!("{layers}.0.{path}.norm")));
            Some(match norm {
                None => Mamba2Gate::Silu,
                Some(m) if m.pointer("/attrs/norm_before_gate") == Some(&Value::Bool(true)) => {
                    Mamba2Gate::NormBeforeGate
                }
                Some(_) => Mamba2Gate::NormAfterGate,
            })
        }
    };
    for (leaf, got, want) in &checks {
        if got != want {
            gaps.push(format!(
                "`{path}.{leaf}` is {got:?} in the tiny model, but the config fields give {want:?}: \
                 the fields do not mean what the {kind:?} block reads"
            ));
        }
    }
    for (leaf, role) in [("in_proj.bias", "bias"), ("conv1d.bias", "conv_bias")] {
        if present(leaf) != flag(role) {
            gaps.push(format!(
                "`{path}.{leaf}` {} while `{}` is {}",
                if present(leaf) { "exists" } else { "is absent" },
                roles.get(role).map(String::as_str).unwrap_or(role),
                flag(role)
            ));
        }
    }
    decisions.push(format!(
        "{} weight shapes agree with the config fields ({})",
        checks.len(),
        roles
            .iter()
            .map(|(r, f)| format!("{r} = `{f}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if let Some(g) = gate {
        decisions.push(format!(
            "Mamba2 output gate: {g:?} (from the mixer's `norm` module)"
        ));
    }
    // Anything in a layer besides its norm and its mixer is a block this plan omits.
    let layer0: Vec<&str> = params
        .iter()
        .filter_map(|(name, _)| name.strip_prefix(&format!("{layers}.0.")))
        .filter(|n| !n.starts_with(&format!("{path}.")))
        .collect();
    let norm = match layer0.as_slice() {
        [one] => one.strip_suffix(".weight").map(str::to_owned),
        _ => None,
    };
    let Some(norm) = norm else {
        gaps.push(format!(
            "a layer holds {layer0:?} besides its mixer: more than the one norm a recurrent-only layer has"
        ));
        return Some(base_plan(
            facts,
            module,
            kind,
            roles,
            gate,
            Vec::new(),
            decisions,
            gaps,
        ));
    };
    let mut renames = vec![(norm.clone(), "input_layernorm".to_owned())];
    if path != "mixer" {
        renames.push((path.clone(), "mixer".to_owned()));
    }
    decisions.push(format!(
        "layer: `{norm}` (RMSNorm) before the mixer, with a residual; no attention, no MLP"
    ));
    Some(base_plan(
        facts, module, kind, roles, gate, renames, decisions, gaps,
    ))
}

#[allow(clippy::too_many_arguments)]
fn base_plan(
    facts: &Value,
    module: &str,
    kind: Kind,
    roles: BTreeMap<&'static str, String>,
    gate: Option<Mamba2Gate>,
    renames: Vec<(String, String)>,
    decisions: Vec<String>,
    gaps: Vec<String>,
) -> Plan {
    let text = |key: &str| facts[key].as_str().unwrap_or_default().to_owned();
    let fields_of = facts["config_fields"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut names: Vec<&str> = vec!["vocab_size", "hidden_size", "num_hidden_layers"];
    names.extend(roles.values().map(String::as_str));
    names.push("tie_word_embeddings");
    let fields = names
        .clone()
        .iter()
        .map(|name| {
            let f = fields_of.get(*name).cloned().unwrap_or(Value::Null);
            let mut default = f.get("default").cloned().unwrap_or(Value::Null);
            // Python's infinity, as the config reader spells it.
            if let Value::Array(items) = &mut default {
                for item in items {
                    if item.as_str() == Some("inf") {
                        *item = serde_json::json!({"__float__": "Infinity"});
                    }
                }
            }
            let ty = match f.get("kind").and_then(Value::as_str) {
                Some("bool") => FieldType::Bool,
                Some("float") => FieldType::F64,
                Some("str") => FieldType::Str,
                Some("list") => FieldType::IntList,
                _ if *name == "num_hidden_layers" => FieldType::Usize,
                _ => FieldType::I32,
            };
            Field {
                name: (*name).to_owned(),
                ty,
                default,
                nullable: false,
                role: "recurrent decoder",
            }
        })
        .collect();
    let ignored = fields_of
        .keys()
        .filter(|k| !names.contains(&k.as_str()))
        .map(|k| {
            (
                k.clone(),
                "not read by the shared block (initialisation, Transformers' kernel choice, token ids); \
                 the fixtures verify the forward pass without it"
                    .to_owned(),
            )
        })
        .collect();
    let choice = Choice {
        norm_plus_one: false,
        rope_sliding_only: false,
        embedding_scale: Scalar::None,
        rope_traditional: false,
        norm_placement: NormPlacement::Pre,
        gelu_as_tanh: false,
        attention_softcap: false,
        moe_normalize: false,
    };
    Plan {
        model_type: text("model_type"),
        default_theta: 10000.0,
        module: module.to_owned(),
        architecture: text("architecture"),
        config_class: text("config_class"),
        transformers_version: text("transformers_version"),
        fields,
        qkv_fused: false,
        qkv_bias: super::plan::Flag::Never,
        o_bias: super::plan::Flag::Never,
        qk_norm: QkNorm::None,
        mlp_layout: MlpLayout::Gated,
        mlp_bias: super::plan::Flag::Never,
        moe: None,
        mla: None,
        recurrent: Some(RecurrentPlan { kind, roles, gate }),
        layer_norm: None,
        eps_field: "layer_norm_epsilon".to_owned(),
        eps_constant: None,
        act_field: "hidden_act".to_owned(),
        activation_constant: None,
        attention_scale: Scalar::None,
        attention_softcap: Scalar::None,
        clip_qkv: Scalar::None,
        final_softcap: Scalar::None,
        residual_scale: Scalar::None,
        logits_scale: Scalar::None,
        sliding_window: None,
        layer_types_field: false,
        layer_rule: LayerRule::NoSliding,
        rope: None,
        no_rope: None,
        rope_dims_field: None,
        default_partial_rotary: None,
        rope_from_code: false,
        qkv_groups: None,
        layer_rope_bases: None,
        sinks: false,
        differential: false,
        unused_prefixes: Vec::new(),
        choices: vec![choice],
        decisions,
        gaps,
        ignored,
        refused: Vec::new(),
        refused_values: Vec::new(),
        lm_head_bias: false,
        lm_head_bias_field: None,
        layer_calls: Vec::new(),
        renames,
        weight_map: Vec::new(),
        prefix_renames: super::plan::structure_renames(facts),
        aliases: Vec::new(),
        intermediate_per_hidden: None,
        learned_positions: None,
        alibi: None,
        embedding_layernorm: false,
        nested_refused: Vec::new(),
        conv1d: Vec::new(),
        sinusoidal_positions: None,
        final_norm: true,
        first_layer_no_input_norm: false,
        prediction_head: None,
        divided_aliases: Vec::new(),
        layer_period: None,
    }
}

/// The settings the generated module computes, read from `config` directly.
pub fn settings(plan: &Plan, r: &RecurrentPlan, config: &ConfigFile) -> Result<DecoderSettings> {
    let value = |name: &str| -> Value {
        config.value.get(name).cloned().unwrap_or_else(|| {
            plan.fields
                .iter()
                .find(|f| f.name == name)
                .map(|f| f.default.clone())
                .unwrap_or(Value::Null)
        })
    };
    let int = |role: &str| -> Result<i32> {
        let name = r.field(role);
        config.require(name, value(name).as_i64().map(|v| v as i32))
    };
    let boolean = |role: &str| value(r.field(role)).as_bool().unwrap_or(false);
    let hidden = int("hidden_size")?;
    let act = value(r.field("act"));
    config.ensure(act.as_str() == Some("silu"), r.field("act"), || {
        format!("the mixer's activation {act} is not supported (silu)")
    })?;
    let eps = value(r.field("eps")).as_f64();
    let eps = config.require(r.field("eps"), eps)?;
    let mut settings = match r.kind {
        Kind::Mamba => {
            let rank = match value(r.field("time_step_rank")) {
                Value::String(s) if s == "auto" => (hidden + 15) / 16,
                v => config.require(r.field("time_step_rank"), v.as_i64().map(|v| v as i32))?,
            };
            let expand = int("expand")?;
            config.ensure(expand > 0 && rank > 0, r.field("expand"), || {
                "expand and time_step_rank must be positive".to_owned()
            })?;
            let mamba = MambaSettings {
                intermediate_size: expand * hidden,
                state_size: int("state_size")?,
                time_step_rank: rank,
                conv_kernel: int("conv_kernel")?,
                conv_bias: boolean("conv_bias"),
                bias: boolean("bias"),
                bcdt_rms_eps: None,
                bcdt_norm_eps: None,
            };
            DecoderSettings {
                mamba: Some(mamba),
                ..DecoderSettings::recurrent_only(
                    &plan.model_type,
                    int("vocab_size")?,
                    hidden,
                    int("num_hidden_layers")? as usize,
                    MixerKind::Mamba,
                )
            }
        }
        Kind::Mamba2 => {
            let (heads, head_dim, groups) = (int("num_heads")?, int("head_dim")?, int("n_groups")?);
            let expand = int("expand")?;
            config.ensure(
                hidden * expand == heads * head_dim,
                r.field("num_heads"),
                || {
                    format!(
                        "hidden_size × expand ({}) must equal num_heads × head_dim ({})",
                        hidden * expand,
                        heads * head_dim
                    )
                },
            )?;
            config.ensure(
                groups > 0 && heads % groups == 0,
                r.field("n_groups"),
                || format!("{heads} heads cannot be split into {groups} groups"),
            )?;
            let name = r.field("time_step_limit");
            let parsed = mlx_models::config::f64_pair_or_non_finite(value(name));
            config.ensure(parsed.is_ok(), name, || {
                "must be a pair of numbers".to_owned()
            })?;
            let limit = parsed.unwrap_or((0.0, f64::INFINITY));
            let mamba2 = Mamba2Settings {
                num_heads: heads,
                head_dim,
                state_size: int("state_size")?,
                n_groups: groups,
                conv_kernel: int("conv_kernel")?,
                conv_bias: boolean("conv_bias"),
                bias: boolean("bias"),
                out_bias: boolean("bias"),
                chunk_size: int("chunk_size")?,
                time_step_limit: (limit.0 as f32, limit.1.min(f64::from(f32::MAX)) as f32),
                clamp_steps: true,
                norm_eps: eps,
                gate: r.gate.unwrap_or(Mamba2Gate::NormAfterGate),
                chunked_prefill: true,
            };
            DecoderSettings {
                mamba2: Some(mamba2),
                ..DecoderSettings::recurrent_only(
                    &plan.model_type,
                    int("vocab_size")?,
                    hidden,
                    int("num_hidden_layers")? as usize,
                    MixerKind::Mamba2,
                )
            }
        }
    };
    settings.norm_eps = eps;
    settings.tie_word_embeddings = value("tie_word_embeddings").as_bool().unwrap_or(false);
    if r.roles.contains_key("residual_in_fp32") {
        settings.residual_in_f32 = value(r.field("residual_in_fp32")).as_bool().unwrap_or(true);
    }
    Ok(settings)
}

fn rust_type(f: &Field) -> &'static str {
    match f.ty {
        FieldType::Bool => "bool",
        FieldType::F64 => "f64",
        FieldType::Usize => "usize",
        FieldType::Str => "String",
        _ => "i32",
    }
}

/// The module source (before rustfmt) that computes what [`settings`] does.
pub fn module_source(plan: &Plan, r: &RecurrentPlan) -> String {
    let mut s = String::new();
    let w = &mut s;
    let mt = &plan.model_type;
    let (block, kind, settings_ty) = match r.kind {
        Kind::Mamba => ("selective-scan", "Mamba", "MambaSettings"),
        Kind::Mamba2 => ("state-space", "Mamba2", "Mamba2Settings"),
    };
    let _ = writeln!(
        w,
        "//! {} (`{mt}`), ported from Transformers {} (`{}`).\n//!\n\
         //! Generated by `cargo xtask port {mt}` and verified layer by layer against the\n\
         //! Transformers fixtures in `tests/fixtures/{mt}/`; decisions, weight names and numbers\n\
         //! are in `tests/fixtures/{mt}/PORT_REPORT.md`.\n//!\n\
         //! - Every layer is an RMSNorm and a {kind} {block} mixer ([`crate::ssm`]) with a\n\
         //!   residual; no attention, no MLP. Its cache is the conv and SSM state, a fixed size.",
        super::codegen::title(mt),
        plan.transformers_version,
        plan.architecture
    );
    for (from, to) in plan.prefix_renames.iter().chain(&plan.renames) {
        let _ = writeln!(w, "//! - Checkpoints' `{from}` is the decoder's `{to}`.");
    }
    let _ = writeln!(w);
    let gate = match r.kind {
        Kind::Mamba2 => "Mamba2Gate, ",
        Kind::Mamba => "",
    };
    let _ = writeln!(
        w,
        "use crate::config::ConfigFile;\nuse crate::error::Result;\nuse crate::model::LanguageModel;\n\
         use crate::ssm::{{{gate}{settings_ty}}};\n\
         use crate::transformer::{{build, drop_computed_weights, DecoderSettings, MixerKind}};\n\
         use crate::weights::{{rename_layer_module, rename_prefix, Weights}};\nuse serde::Deserialize;\n"
    );
    let _ = writeln!(
        w,
        "/// config.json fields, with the names of `{}`.\n#[derive(Debug, Clone, Deserialize)]\npub struct Config {{",
        plan.config_class
    );
    for f in &plan.fields {
        if r.roles.get("time_step_limit") == Some(&f.name) {
            let _ = writeln!(
                w,
                "#[serde(deserialize_with = \"crate::config::f64_pair_or_non_finite\")]\npub {}: (f64, f64),",
                f.name
            );
        } else if r.roles.get("time_step_rank") == Some(&f.name) {
            let _ = writeln!(
                w,
                "/// A number, or \"auto\".\npub {}: serde_json::Value,",
                f.name
            );
        } else {
            let _ = writeln!(w, "pub {}: {},", f.name, rust_type(f));
        }
    }
    let _ = writeln!(w, "}}\n");
    let _ = writeln!(
        w,
        "/// Transformers' defaults for the fields config.json may leave out.\n\
         const DEFAULTS: &str = r#\"{}\"#;\n",
        super::codegen::defaults_json(plan)
    );
    let pairs = |list: &[(String, String)]| {
        list.iter()
            .map(|(a, b)| format!("(\"{a}\", \"{b}\")"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        w,
        "/// The decoder's names of the checkpoint's modules, from the root.\n\
         const PREFIXES: [(&str, &str); {}] = [{}];\n\
         /// ... and under each layer.\nconst RENAMES: [(&str, &str); {}] = [{}];\n",
        plan.prefix_renames.len(),
        pairs(&plan.prefix_renames),
        plan.renames.len(),
        pairs(&plan.renames)
    );
    let f = |role: &str| r.field(role).to_owned();
    let _ = writeln!(
        w,
        "impl Config {{\n/// The decoder: `num_hidden_layers` {kind} layers.\n\
         pub fn settings(&self, config: &ConfigFile) -> Result<DecoderSettings> {{\n\
         config.ensure(self.{act} == \"silu\", \"{act}\", || format!(\"the mixer's activation `{{}}` is not supported (silu)\", self.{act}))?;",
        act = f("act")
    );
    match r.kind {
        Kind::Mamba => {
            let _ = writeln!(
                w,
                "let rank = match &self.{rank} {{\n\
                 serde_json::Value::String(s) if s == \"auto\" => (self.hidden_size + 15) / 16,\n\
                 v => v.as_i64().map(|v| v as i32).ok_or_else(|| crate::error::Error::config(&config.path, \"{rank}\", \"missing\"))?,\n}};\n\
                 config.ensure(self.{expand} > 0 && rank > 0, \"{expand}\", || \"expand and time_step_rank must be positive\".to_owned())?;\n\
                 let mamba = MambaSettings {{\n\
                 intermediate_size: self.{expand} * self.hidden_size,\n\
                 state_size: self.{state},\ntime_step_rank: rank,\nconv_kernel: self.{conv},\n\
                 conv_bias: self.{conv_bias},\nbias: self.{bias},\nbcdt_rms_eps: None,\nbcdt_norm_eps: None,\n}};",
                rank = f("time_step_rank"),
                expand = f("expand"),
                state = f("state_size"),
                conv = f("conv_kernel"),
                conv_bias = f("conv_bias"),
                bias = f("bias"),
            );
        }
        Kind::Mamba2 => {
            let _ = writeln!(
                w,
                "config.ensure(self.hidden_size * self.{e} == self.{h} * self.{d}, \"{h}\", || format!(\"hidden_size × expand ({{}}) must equal num_heads × head_dim ({{}})\", self.hidden_size * self.{e}, self.{h} * self.{d}))?;\n\
                 config.ensure(self.{g} > 0 && self.{h} % self.{g} == 0, \"{g}\", || format!(\"{{}} heads cannot be split into {{}} groups\", self.{h}, self.{g}))?;\n\
                 let mamba2 = Mamba2Settings {{\n\
                 num_heads: self.{h},\nhead_dim: self.{d},\nstate_size: self.{state},\nn_groups: self.{g},\n\
                 conv_kernel: self.{conv},\nconv_bias: self.{conv_bias},\nbias: self.{bias},\nout_bias: self.{bias},\n\
                 chunk_size: self.{chunk},\n\
                 time_step_limit: (self.{limit}.0 as f32, self.{limit}.1.min(f64::from(f32::MAX)) as f32),\n\
                 clamp_steps: true,\nnorm_eps: self.{eps},\ngate: Mamba2Gate::{gate:?},\nchunked_prefill: true,\n}};",
                g = f("n_groups"),
                e = f("expand"),
                h = f("num_heads"),
                d = f("head_dim"),
                state = f("state_size"),
                conv = f("conv_kernel"),
                conv_bias = f("conv_bias"),
                bias = f("bias"),
                chunk = f("chunk_size"),
                limit = f("time_step_limit"),
                eps = f("eps"),
                gate = r.gate.unwrap_or(Mamba2Gate::NormAfterGate),
            );
        }
    }
    let (field, var) = match r.kind {
        Kind::Mamba => ("mamba", "mamba"),
        Kind::Mamba2 => ("mamba2", "mamba2"),
    };
    let _ = writeln!(
        w,
        "Ok(DecoderSettings {{\n{field}: Some({var}),\nnorm_eps: self.{eps},\n\
         tie_word_embeddings: self.tie_word_embeddings,",
        eps = f("eps")
    );
    if r.roles.contains_key("residual_in_fp32") {
        let _ = writeln!(w, "residual_in_f32: self.{},", f("residual_in_fp32"));
    }
    let _ = writeln!(
        w,
        "..DecoderSettings::recurrent_only(\"{mt}\", self.vocab_size, self.hidden_size, self.num_hidden_layers, MixerKind::{kind})\n}})\n}}\n}}\n"
    );
    let _ = writeln!(
        w,
        "/// The registry's entry point.\n\
         pub fn load(config: &ConfigFile, mut weights: Weights) -> Result<Box<dyn LanguageModel>> {{\n\
         let c: Config = config.parse_with_defaults(DEFAULTS)?;\nlet settings = c.settings(config)?;\n\
         // The root renames first: the tied output layer is only known as `lm_head` after.\n\
         weights.rename(|name| Some(rename_layer_module(&rename_prefix(name, &PREFIXES), &RENAMES)));\n\
         drop_computed_weights(&mut weights, settings.tie_word_embeddings);\nbuild(config, settings, weights)\n}}"
    );
    s
}

/// The report's structure lines.
pub fn summary(plan: &Plan, r: &RecurrentPlan) -> Vec<String> {
    let mut lines = vec![format!(
        "Every layer: `input_layernorm` (RMSNorm), then a {:?} mixer, added to the residual; no attention, no MLP.",
        r.kind
    )];
    if let Some(gate) = r.gate {
        lines.push(format!("Mamba2 output gate: {gate:?}."));
    }
    lines.push(format!(
        "Config fields by role: {}.",
        r.roles
            .iter()
            .map(|(role, f)| format!("{role} `{f}`"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    lines.push("No RoPE, no positions: the recurrence orders the tokens.".to_owned());
    if !plan.prefix_renames.is_empty() {
        lines.push(format!(
            "Checkpoint names renamed from the root: {}.",
            plan.prefix_renames
                .iter()
                .map(|(from, to)| format!("`{from}` → `{to}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::super::generator_tests::{facts, fixtures};
    use super::*;

    #[test]
    fn the_mixer_is_read_from_the_parameter_names_of_a_layer() {
        let mamba = [
            "mixer.A_log",
            "mixer.D",
            "mixer.x_proj.weight",
            "mixer.dt_proj.weight",
            "mixer.in_proj.weight",
            "norm.weight",
        ];
        assert_eq!(layer_mixer(&mamba), Some(("mixer".to_owned(), Kind::Mamba)));
        let mamba2 = [
            "mamba.A_log",
            "mamba.dt_bias",
            "mamba.in_proj.weight",
            "input_layernorm.weight",
        ];
        assert_eq!(
            layer_mixer(&mamba2),
            Some(("mamba".to_owned(), Kind::Mamba2))
        );
        let attention = ["self_attn.q_proj.weight", "mlp.up_proj.weight"];
        assert_eq!(layer_mixer(&attention), None);
    }

    #[test]
    fn mamba_and_mamba2_are_planned_as_recurrent_and_verify_on_their_fixtures() {
        for (mt, kind, gate) in [
            ("mamba", Kind::Mamba, None),
            ("mamba2", Kind::Mamba2, Some(Mamba2Gate::NormAfterGate)),
        ] {
            let plan = super::super::plan::plan(&facts(mt), mt);
            assert!(plan.gaps.is_empty(), "{mt}: {:?}", plan.gaps);
            let r = plan.recurrent.as_ref().expect("a recurrent plan");
            assert_eq!((r.kind, r.gate), (kind, gate));
            assert_eq!(
                plan.renames,
                [("norm".to_owned(), "input_layernorm".to_owned())]
            );
            assert!(plan
                .prefix_renames
                .contains(&("backbone.layers".to_owned(), "model.layers".to_owned())));
            let search = super::super::search(&plan, &fixtures(mt)).expect("search runs");
            assert!(search.chosen.is_some(), "{mt}: {:?}", search.tried);
        }
    }

    #[test]
    fn a_wrong_gate_is_reported_at_the_first_layer() {
        let mut plan = super::super::plan::plan(&facts("mamba2"), "mamba2");
        plan.recurrent.as_mut().expect("recurrent").gate = Some(Mamba2Gate::NormBeforeGate);
        let search = super::super::search(&plan, &fixtures("mamba2")).expect("search runs");
        assert!(search.chosen.is_none());
        let failure = &search.tried[0].1[0];
        assert!(failure.contains("`layers.0`"), "{failure}");
    }

    #[test]
    fn fields_that_do_not_give_the_weight_shapes_are_a_gap() {
        let mut facts = facts("mamba2");
        facts["resolved_config"]["state_size"] = Value::from(3);
        let plan = super::super::plan::plan(&facts, "mamba2");
        assert!(
            plan.gaps.iter().any(|g| g.contains("conv1d.weight")),
            "{:?}",
            plan.gaps
        );
    }

    #[test]
    fn hybrid_layers_are_read_per_layer_and_checked_against_layer_types() {
        let conv = [
            ("conv.conv.weight", &[64i64, 1, 3][..]),
            ("conv.in_proj.weight", &[192, 64][..]),
            ("conv.out_proj.weight", &[64, 64][..]),
            ("feed_forward.w1.weight", &[16, 64][..]),
        ];
        assert_eq!(
            classify_layer(&conv),
            LayerMixer::ShortConv("conv".to_owned())
        );
        let attention = [("self_attn.q_proj.weight", &[64i64, 64][..])];
        assert_eq!(
            classify_layer(&attention),
            LayerMixer::Attention("self_attn".to_owned())
        );
        // Recorded: Bamba's tiny model with `attn_layer_indices` [1].
        let mut facts = serde_json::json!({
            "structure": {"layers": "model.layers"},
            "resolved_config": {"num_hidden_layers": 2},
            "layer_types": ["linear_attention", "full_attention"],
            "parameters": [
                {"name": "model.layers.0.mamba.A_log", "shape": [8]},
                {"name": "model.layers.0.mamba.dt_bias", "shape": [8]},
                {"name": "model.layers.0.mamba.in_proj.weight", "shape": [280, 64]},
                {"name": "model.layers.1.self_attn.q_proj.weight", "shape": [64, 64]},
            ],
        });
        let gaps = hybrid_gaps(&facts);
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert!(
            gaps[0].contains("Mamba2 `mamba`, attention `self_attn`") && gaps[0].contains("agrees")
        );
        // A config that says otherwise is named.
        facts["layer_types"] = serde_json::json!(["full_attention", "full_attention"]);
        let gaps = hybrid_gaps(&facts);
        assert!(
            gaps[0].starts_with("layer 0: the module tree holds Recurrent"),
            "{gaps:?}"
        );
    }
}
