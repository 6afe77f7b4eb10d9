//! Decoders whose every layer is a norm and a recurrent mixer (Mamba, Mamba2): which mixer
//! a layer holds is read from the tiny model's module tree (the module with `A_log`: with
//! `x_proj`/`dt_proj` it is Mamba's selective scan, with `dt_bias` Mamba2's), the config
//! fields it reads are checked against the weight shapes Transformers built from them,
//! and the module emitted onto [`mlx_models::ssm`].

use super::plan::{Choice, Field, FieldType, Plan, Scalar};
use mlx_models::config::ConfigFile;
use mlx_models::delta::GatedDeltaNetSettings;
use mlx_models::family::{set_recurrent_layers, AttentionLayers, LayerRule};
use mlx_models::ssm::{Mamba2Gate, Mamba2Settings, MambaSettings};
use mlx_models::transformer::{
    DecoderSettings, LayerType, MixerKind, MlpLayout, NormPlacement, QkNorm,
};
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
    /// LFM2's gated short convolution (`in_proj`, a depthwise `conv`, `out_proj`): only in a
    /// hybrid (a recurrent-only plan holds Mamba or Mamba2, read from `A_log`).
    ShortConv,
    /// RecurrentGemma's recurrent block (`linear_x`, `linear_y`, `conv_1d`, `rg_lru`,
    /// `linear_out`): only in a hybrid.
    RgLru,
    /// The gated delta rule (Qwen3-Next, Qwen3.5: `A_log`, `dt_bias`, the q/k/v and gate
    /// projections `in_proj_qkvz` + `in_proj_ba` or `in_proj_qkv`, `in_proj_z`, `in_proj_b`,
    /// `in_proj_a`, a conv over q/k/v, a gated RMSNorm per value head, `out_proj`): only in
    /// a hybrid.
    GatedDeltaNet,
}

/// What a recurrent-only plan never holds (its mixer is read from `A_log`).
const NOT_RECURRENT_ONLY: &str =
    "a recurrent-only plan holds Mamba or Mamba2 (`plan` reads them from `A_log`)";

/// What the generator decided for a recurrent-only decoder.
#[derive(Debug, Clone)]
pub struct RecurrentPlan {
    pub kind: Kind,
    /// role → the config field that holds it.
    pub roles: BTreeMap<&'static str, String>,
    /// How the Mamba2 scan's output is gated before `out_proj`.
    pub gate: Option<Mamba2Gate>,
    /// Decoded tokens clamp `dt` to `time_step_limit` as the prompt's scan does (the
    /// `step_clamps` probe: Transformers' Bamba and Mamba2 steps do not).
    pub clamp_steps: bool,
}

/// Whether Transformers' decoding steps clamp `dt` (the `step_clamps` probe); where it
/// tells nothing (no probe, a mixer that ignores `time_step_limit`), they clamp.
fn step_clamps(facts: &Value) -> bool {
    facts
        .pointer("/step_clamps/clamps")
        .and_then(Value::as_bool)
        .unwrap_or(true)
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
    (
        "conv_kernel",
        &[
            "mamba_d_conv",
            "conv_kernel",
            "conv_L_cache",
            "linear_conv_kernel_dim",
        ],
    ),
    ("expand", &["mamba_expand", "expand"]),
    ("chunk_size", &["mamba_chunk_size", "chunk_size"]),
    ("time_step_rank", &["time_step_rank"]),
    ("time_step_limit", &["time_step_limit"]),
    ("bias", &["mamba_proj_bias", "use_bias"]),
    (
        "conv_bias",
        &["mamba_conv_bias", "use_conv_bias", "conv_bias"],
    ),
    ("act", &["hidden_act"]),
    ("eps", &["layer_norm_epsilon", "rms_norm_eps", "norm_eps"]),
    ("residual_in_fp32", &["residual_in_fp32"]),
    // RecurrentGemma's RG-LRU: its width (null: hidden_size), its gates' blocks (one per
    // attention head), the taps of its conv.
    ("lru_width", &["lru_width"]),
    ("lru_heads", &["num_attention_heads"]),
    ("lru_conv_kernel", &["conv1d_width"]),
    ("num_key_heads", &["linear_num_key_heads"]),
    ("num_value_heads", &["linear_num_value_heads"]),
    ("key_head_dim", &["linear_key_head_dim"]),
    ("value_head_dim", &["linear_value_head_dim"]),
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
        Kind::ShortConv => &["conv_kernel", "conv_bias"],
        Kind::RgLru => &["lru_width", "lru_heads", "lru_conv_kernel"],
        Kind::GatedDeltaNet => &[
            "num_key_heads",
            "num_value_heads",
            "key_head_dim",
            "value_head_dim",
            "conv_kernel",
            "act",
            "eps",
        ],
    }
}

/// The path of a RecurrentGemma recurrent block among one layer's parameter names: the
/// module with `rg_lru.recurrent_param`, `linear_x`, `linear_y`, `linear_out` and `conv_1d`.
pub fn rg_lru_block(names: &[&str]) -> Option<String> {
    let path = names
        .iter()
        .find_map(|n| n.strip_suffix(".rg_lru.recurrent_param"))?;
    let has = |leaf: &str| names.contains(&format!("{path}.{leaf}").as_str());
    [
        "linear_x.weight",
        "linear_y.weight",
        "linear_out.weight",
        "conv_1d.weight",
    ]
    .iter()
    .all(|leaf| has(leaf))
    .then(|| path.to_owned())
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
    } else if has("dt_bias") && (has("in_proj_qkvz.weight") || has("in_proj_qkv.weight")) {
        Some((path.to_owned(), Kind::GatedDeltaNet))
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
    if let Some(path) = rg_lru_block(&names) {
        return LayerMixer::Recurrent(path, Kind::RgLru);
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

/// The tiny model's parameters: full names and shapes.
fn parameters(facts: &Value) -> Vec<(String, Vec<i64>)> {
    facts
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let shape = p["shape"].as_array()?.iter().filter_map(Value::as_i64);
            Some((p["name"].as_str()?.to_owned(), shape.collect()))
        })
        .collect()
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
    let params = parameters(facts);
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
        "the layers mix their mixers ({}; the config's `layer_types` {}): the generator composes \
         attention layers (layer 0 among them) with one kind of Mamba, Mamba2 or short-conv \
         layer, not this mix (by hand: `LayerSettings::mixer`, `ssm::Mamba2Settings`, \
         `DecoderSettings::short_conv`; see `models/granitemoehybrid.rs`, `models/lfm2.rs`)",
        shown.join(", "),
        if types.len() == mixers.len() {
            "agrees"
        } else {
            "is absent"
        }
    ));
    gaps
}

/// How a hybrid's config says which layers attend (the introspection's `hybrid_layers`,
/// probed on the config class).
#[derive(Debug, Clone, PartialEq)]
pub enum AttentionRule {
    /// An index list of the attention layers (Bamba's `attn_layer_indices`); a null list
    /// makes every layer attend, or none.
    Indices { field: String, null_attends: bool },
    /// Attention at the layers `i % period == offset` (Jamba's).
    Period { period: String, offset: String },
    /// The last layer of every `field` attends: `(i + 1) % field == 0` (Qwen3-Next's
    /// `full_attention_interval`, read from the probes of the layer kinds it derives).
    Interval { field: String },
    /// Each layer's kind from the list `field` (LFM2's `layer_types`): the `attending` kinds
    /// attend, the `mixing` one runs the mixer (which kind holds which, read from the tiny
    /// model's layers); a config without the list follows `fallback` (LFM2's
    /// `full_attn_idxs`), or has no rule.
    LayerTypes {
        field: String,
        attending: Vec<String>,
        mixing: String,
        fallback: Option<Box<AttentionRule>>,
    },
    /// Each layer's kind from the repeating list `field` (RecurrentGemma's `block_types`:
    /// layer i is `field[i % len]`): the `attending` names attend, `mixing` runs the mixer.
    Cycle {
        field: String,
        attending: Vec<String>,
        mixing: String,
    },
}

impl AttentionRule {
    fn from_facts(facts: &Value) -> Option<AttentionRule> {
        let rule = Self::from_probe(facts.get("hybrid_layers")?, facts)?;
        Some(match rule {
            AttentionRule::LayerTypes {
                field,
                attending,
                mixing,
                fallback: None,
            } => {
                let fallback = Self::interval(facts, &attending, &mixing).map(Box::new);
                AttentionRule::LayerTypes {
                    field,
                    attending,
                    mixing,
                    fallback,
                }
            }
            rule => rule,
        })
    }

    /// A field whose every probed value `n` (the introspection's `legacy_layer_probes`: the
    /// layer kinds the config class derives from it) makes the last layer of every `n` one
    /// of the `attending` kinds and the others `mixing`.
    fn interval(facts: &Value, attending: &[String], mixing: &str) -> Option<AttentionRule> {
        let probes = facts.get("legacy_layer_probes")?.as_object()?;
        probes.iter().find_map(|(field, runs)| {
            let runs = runs.as_array().filter(|r| r.len() >= 2)?;
            let fits = runs.iter().all(|run| {
                let (Some(n), Some(kinds)) = (
                    run["value"].as_u64().filter(|n| *n > 0),
                    run["layer_types"].as_array(),
                ) else {
                    return false;
                };
                !kinds.is_empty()
                    && kinds.iter().enumerate().all(|(i, k)| {
                        let k = k.as_str().unwrap_or_default();
                        if (i as u64 + 1).is_multiple_of(n) {
                            attending.iter().any(|a| a == k)
                        } else {
                            k == mixing
                        }
                    })
            });
            fits.then(|| AttentionRule::Interval {
                field: field.clone(),
            })
        })
    }

    fn from_probe(h: &Value, facts: &Value) -> Option<AttentionRule> {
        let text = |key: &str| h.get(key).and_then(Value::as_str).map(str::to_owned);
        match h.get("rule")?.as_str()? {
            "layer_types" => {
                // Each kind the probe names, by the mixer its first tiny layer holds.
                let tiny: Vec<&str> = facts
                    .get("layer_types")?
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                let mixers = layer_mixers(facts);
                let (mut attending, mut mixing) = (Vec::new(), Vec::new());
                for kind in h.get("kinds")?.as_array()?.iter().filter_map(Value::as_str) {
                    let i = tiny.iter().position(|t| *t == kind)?;
                    match mixers.get(i)? {
                        LayerMixer::Attention(_) => attending.push(kind.to_owned()),
                        LayerMixer::Unknown => return None,
                        _ => mixing.push(kind.to_owned()),
                    }
                }
                let [mixing] = <[String; 1]>::try_from(mixing).ok()?;
                let fallback = match h.get("fallback") {
                    None | Some(Value::Null) => None,
                    Some(f) => Some(Box::new(Self::from_probe(f, facts)?)),
                };
                (!attending.is_empty()).then_some(AttentionRule::LayerTypes {
                    field: text("field")?,
                    attending,
                    mixing,
                    fallback,
                })
            }
            "indices" => Some(AttentionRule::Indices {
                field: text("field")?,
                null_attends: h.get("null_attends")?.as_bool()?,
            }),
            "cycle" => Some(AttentionRule::Cycle {
                field: text("field")?,
                attending: h
                    .get("attending")?
                    .as_array()?
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()?,
                mixing: text("mixing")?,
            }),
            "period" => Some(AttentionRule::Period {
                period: text("period")?,
                offset: text("offset")?,
            }),
            _ => None,
        }
    }

    /// The rule in words, for the report.
    pub fn describe(&self) -> String {
        match self {
            AttentionRule::Indices {
                field,
                null_attends,
            } => format!(
                "the layers `{field}` lists attend ({} when it is null)",
                if *null_attends { "all" } else { "none" }
            ),
            AttentionRule::Period { period, offset } => {
                format!("layer i attends when i % `{period}` == `{offset}`")
            }
            AttentionRule::Interval { field } => {
                format!("the last layer of every `{field}` attends (layer i when (i + 1) % `{field}` == 0)")
            }
            AttentionRule::LayerTypes {
                field,
                attending,
                mixing,
                fallback,
            } => format!(
                "`{field}` names each layer ({} {}, `{mixing}` runs the mixer); {}",
                attending
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if attending.len() == 1 {
                    "attends"
                } else {
                    "attend"
                },
                match fallback {
                    Some(rule) => format!("without it, {}", rule.describe()),
                    None => "a config must carry it".to_owned(),
                }
            ),
            AttentionRule::Cycle {
                field,
                attending,
                mixing,
            } => format!(
                "layer i is `{field}`[i % its length] ({} attend{}, `{mixing}` runs the mixer)",
                attending
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if attending.len() == 1 { "s" } else { "" }
            ),
        }
    }

    /// The config fields the rule reads.
    pub fn fields(&self) -> Vec<&str> {
        match self {
            AttentionRule::Indices { field, .. } => vec![field],
            AttentionRule::Period { period, offset } => vec![period, offset],
            AttentionRule::Cycle { field, .. } => vec![field],
            AttentionRule::Interval { field } => vec![field],
            AttentionRule::LayerTypes {
                field, fallback, ..
            } => {
                let mut fields = vec![field.as_str()];
                fields.extend(fallback.iter().flat_map(|rule| rule.fields()));
                fields
            }
        }
    }

    /// Which of `n` layers attend under `config` (a config.json or the resolved one).
    pub fn attends(&self, config: &Value, n: usize) -> Option<Vec<bool>> {
        match self {
            AttentionRule::Indices {
                field,
                null_attends,
            } => match config.get(field) {
                None | Some(Value::Null) => Some(vec![*null_attends; n]),
                Some(list) => {
                    let list: Vec<u64> =
                        list.as_array()?.iter().filter_map(Value::as_u64).collect();
                    Some((0..n).map(|i| list.contains(&(i as u64))).collect())
                }
            },
            AttentionRule::Period { period, offset } => {
                let period = config.get(period)?.as_u64()? as usize;
                let offset = config.get(offset)?.as_u64()? as usize;
                (period > 0).then(|| (0..n).map(|i| i % period == offset).collect())
            }
            AttentionRule::Interval { field } => {
                let every = config.get(field)?.as_u64()? as usize;
                (every > 0).then(|| (0..n).map(|i| (i + 1) % every == 0).collect())
            }
            AttentionRule::LayerTypes {
                field,
                attending,
                mixing,
                fallback,
            } => match config.get(field) {
                None | Some(Value::Null) => fallback.as_ref()?.attends(config, n),
                Some(list) => {
                    let kinds = list.as_array().filter(|l| l.len() == n)?;
                    kinds
                        .iter()
                        .map(|k| {
                            let k = k.as_str()?;
                            if attending.iter().any(|a| a == k) {
                                Some(true)
                            } else {
                                (k == mixing).then_some(false)
                            }
                        })
                        .collect()
                }
            },
            AttentionRule::Cycle {
                field,
                attending,
                mixing,
            } => {
                let pattern = config.get(field)?.as_array().filter(|p| !p.is_empty())?;
                (0..n)
                    .map(|i| {
                        let k = pattern[i % pattern.len()].as_str()?;
                        if attending.iter().any(|a| a == k) {
                            Some(true)
                        } else {
                            (k == mixing).then_some(false)
                        }
                    })
                    .collect()
            }
        }
    }
}

/// A decoder whose layers either attend or run one recurrent mixer, the rest of each layer
/// (norms, MLP) the same (Bamba).
#[derive(Debug, Clone)]
pub struct HybridPlan {
    /// The recurrent layers' mixer and the config fields of its roles.
    pub mixer: RecurrentPlan,
    /// The mixer's module under a layer in the checkpoint (`mamba`), loaded as `mixer`.
    pub path: String,
    pub rule: AttentionRule,
}

/// The hybrid part of a plan, where the tiny model's layer 0 attends (the attention plan
/// reads it) and its other layers attend or hold one kind of recurrent mixer: the mixer's
/// config fields checked against its weight shapes, the rest of a recurrent layer checked
/// to be named and shaped as layer 0's, and the config field that says which layers attend
/// checked against the module tree. `None` with nothing said for a decoder of attention
/// layers only; `None` with gaps for any other mix.
pub fn hybrid_plan(
    facts: &Value,
    decisions: &mut Vec<String>,
    gaps: &mut Vec<String>,
) -> Option<HybridPlan> {
    let mixers = layer_mixers(facts);
    if !mixers
        .iter()
        .any(|m| matches!(m, LayerMixer::Recurrent(..) | LayerMixer::ShortConv(_)))
    {
        return None;
    }
    let mut recurrent = mixers.iter().enumerate().filter_map(|(i, m)| match m {
        LayerMixer::Recurrent(path, kind) => Some((i, path.clone(), *kind)),
        LayerMixer::ShortConv(path) => Some((i, path.clone(), Kind::ShortConv)),
        _ => None,
    });
    let first = recurrent.next();
    let composable = matches!(mixers.first(), Some(LayerMixer::Attention(_)))
        && mixers.iter().all(|m| !matches!(m, LayerMixer::Unknown))
        && first
            .as_ref()
            .is_some_and(|(_, path, kind)| recurrent.all(|(_, p, k)| p == *path && k == *kind));
    let Some((index, path, kind)) = first.filter(|_| composable) else {
        gaps.extend(hybrid_gaps(facts));
        return None;
    };
    let Some(rule) = AttentionRule::from_facts(facts) else {
        gaps.extend(hybrid_gaps(facts));
        gaps.push(
            "no config field was found that says which layers attend (an index list or a \
             period of attention layers, probed on the config class)"
                .to_owned(),
        );
        return None;
    };
    if let AttentionRule::LayerTypes {
        attending, mixing, ..
    } = &rule
    {
        for kind in attending.iter().chain([mixing]) {
            if layer_type(kind).is_none() {
                gaps.push(format!(
                    "the layer kind `{kind}` is none the decoder's `LayerType` knows"
                ));
            }
        }
    }
    let resolved = &facts["resolved_config"];
    let tiny: Vec<bool> = mixers
        .iter()
        .map(|m| matches!(m, LayerMixer::Attention(_)))
        .collect();
    if rule.attends(resolved, mixers.len()).as_ref() != Some(&tiny) {
        gaps.push(format!(
            "{} does not give the tiny model's attention layers {tiny:?}",
            rule.describe()
        ));
    }
    let layers = facts
        .pointer("/structure/layers")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let params = parameters(facts);
    // The rest of a recurrent layer is the attention layer's, by name and shape.
    let LayerMixer::Attention(attention) = &mixers[0] else {
        return None;
    };
    let rest = |i: usize, mixer: &str| -> Vec<(String, Vec<i64>)> {
        let prefix = format!("{layers}.{i}.");
        params
            .iter()
            .filter_map(|(n, shape)| Some((n.strip_prefix(&prefix)?, shape)))
            .filter(|(n, _)| !n.starts_with(&format!("{mixer}.")))
            .map(|(n, shape)| (n.to_owned(), shape.clone()))
            .collect()
    };
    // A feed-forward block with experts in either layer is the MoE plan's to check (the
    // first layers of a family may keep a dense MLP): its name only is compared.
    let moe_blocks: Vec<String> = [rest(index, &path), rest(0, attention)]
        .iter()
        .flatten()
        .filter(|(n, _)| n.contains(".experts."))
        .filter_map(|(n, _)| n.split_once('.').map(|(block, _)| block.to_owned()))
        .collect();
    let outside_moe = |params: Vec<(String, Vec<i64>)>| -> Vec<(String, Vec<i64>)> {
        params
            .into_iter()
            .map(|(n, shape)| match n.split_once('.') {
                Some((block, _)) if moe_blocks.iter().any(|b| b == block) => {
                    (block.to_owned(), Vec::new())
                }
                _ => (n, shape),
            })
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect()
    };
    let (theirs, ours) = (
        outside_moe(rest(index, &path)),
        outside_moe(rest(0, attention)),
    );
    if theirs != ours {
        gaps.push(format!(
            "layer {index} holds {:?} besides its {kind:?} mixer, the attention layer 0 {:?}: \
             the layers differ in more than their mixer",
            theirs.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            ours.iter().map(|(n, _)| n).collect::<Vec<_>>()
        ));
    }
    let fields_of = facts
        .get("config_fields")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let roles = mixer_roles(kind, &fields_of, gaps);
    let gate = check_mixer(
        facts,
        &params,
        &format!("{layers}.{index}.{path}"),
        kind,
        &roles,
        decisions,
        gaps,
    );
    decisions.push(format!(
        "hybrid: {} (tiny model: {tiny:?}); the others hold the {kind:?} mixer `{path}` (read \
         from the module tree), loaded as `{}`, without RoPE; their norms and MLP are named \
         and shaped as the attention layers'",
        rule.describe(),
        loaded_as(kind)
    ));
    Some(HybridPlan {
        mixer: RecurrentPlan {
            kind,
            roles,
            gate,
            clamp_steps: step_clamps(facts),
        },
        path,
        rule,
    })
}

/// The name the decoder loads a hybrid's `kind` mixer under (in each layer).
pub fn loaded_as(kind: Kind) -> &'static str {
    match kind {
        Kind::Mamba | Kind::Mamba2 => "mixer",
        Kind::ShortConv => "conv",
        Kind::RgLru => "temporal_block",
        Kind::GatedDeltaNet => "linear_attn",
    }
}

/// Where a hybrid's attention and its recurrent mixer share one checkpoint path
/// (RecurrentGemma's `temporal_block`) that the blocks load under two names (`self_attn`,
/// the mixer's), the rename of the attention's path in `renames` becomes one per module the
/// attention layer 0 holds there (`temporal_block.q_proj` → `self_attn.q_proj`), so the
/// mixer's modules keep theirs: the decision, or `None` where the paths differ.
pub fn split_shared_path(
    facts: &Value,
    h: &HybridPlan,
    renames: &mut Vec<(String, String)>,
) -> Option<String> {
    let loaded = loaded_as(h.mixer.kind);
    let at = renames
        .iter()
        .position(|(from, to)| *from == h.path && to != loaded)?;
    let layers = facts.pointer("/structure/layers")?.as_str()?;
    let prefix = format!("{layers}.0.{}.", h.path);
    let mut modules: Vec<String> = parameters(facts)
        .into_iter()
        .filter_map(|(name, _)| {
            let rest = name.strip_prefix(&prefix)?;
            Some(rest.split_once('.').map_or(rest, |(m, _)| m).to_owned())
        })
        .collect();
    modules.sort();
    modules.dedup();
    let (from, to) = renames.remove(at);
    let decision = format!(
        "the attention layers' `{from}` and the {:?} layers' share the checkpoint path: the \
         attention's modules ({}) are renamed one by one to `{to}`, the mixer's kept as `{loaded}`",
        h.mixer.kind,
        modules
            .iter()
            .map(|m| format!("`{m}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (i, m) in modules.into_iter().enumerate() {
        renames.insert(at + i, (format!("{from}.{m}"), format!("{to}.{m}")));
    }
    Some(decision)
}

/// What a mixer role's field is, for the module's doc comments.
fn role_text(role: &str) -> &'static str {
    role_text_of(Kind::Mamba2, role)
}

/// What a `kind` mixer's role field is, for the module's doc comments.
pub fn role_text_of(kind: Kind, role: &str) -> &'static str {
    match role {
        "conv_kernel" if kind == Kind::ShortConv => "short convolution: taps of its causal conv",
        "conv_bias" if kind == Kind::ShortConv => {
            "short convolution: biases of `in_proj`, the conv and `out_proj`"
        }
        "lru_width" => "recurrent block: channels of the RG-LRU (hidden_size when null)",
        "lru_heads" => "recurrent block: diagonal blocks of the RG-LRU gates",
        "lru_conv_kernel" => "recurrent block: taps of its causal conv",
        "conv_kernel" if kind == Kind::GatedDeltaNet => {
            "gated DeltaNet: taps of the causal conv over q, k and v"
        }
        "num_key_heads" => "gated DeltaNet: query/key heads",
        "num_value_heads" => "gated DeltaNet: value heads (a multiple of the key heads)",
        "key_head_dim" => "gated DeltaNet: width of a query/key head",
        "value_head_dim" => "gated DeltaNet: width of a value head",
        "num_heads" => "recurrent mixer: heads",
        "head_dim" => "recurrent mixer: width of a head",
        "state_size" => "recurrent mixer: state size",
        "n_groups" => "recurrent mixer: groups of heads sharing B and C",
        "conv_kernel" => "recurrent mixer: width of the causal convolution",
        "expand" => "recurrent mixer: inner width over hidden_size",
        "chunk_size" => "recurrent mixer: tokens per chunk of the prompt's scan",
        "time_step_rank" => "recurrent mixer: rank of the step projection",
        "time_step_limit" => "recurrent mixer: range of the steps",
        "bias" => "recurrent mixer: in/out projection biases",
        "conv_bias" => "recurrent mixer: convolution bias",
        _ => "recurrent mixer",
    }
}

/// The module's field for a hybrid's config field `name`: a mixer `role`, or (`None`) the
/// field that says which layers attend, nullable as a null list means something.
pub fn role_field(
    defaults: &BTreeMap<String, Value>,
    name: &str,
    role: Option<&str>,
    kind: Kind,
) -> Field {
    let mut default = defaults.get(name).cloned().unwrap_or(Value::Null);
    // A pattern field whose null means something (an index list) is nullable; a period or
    // interval is a number, a list of layer kinds never null.
    let number = default.is_number();
    // Python's infinity, as the config reader spells it.
    if let Value::Array(items) = &mut default {
        for item in items {
            if item.as_str() == Some("inf") {
                *item = serde_json::json!({"__float__": "Infinity"});
            }
        }
    }
    let ty = match &default {
        Value::Bool(_) => FieldType::Bool,
        Value::Number(n) if n.is_f64() => FieldType::F64,
        Value::Number(_) => FieldType::I32,
        Value::String(_) => FieldType::Str,
        Value::Array(items) if items.iter().all(Value::is_i64) && !items.is_empty() => {
            FieldType::IntList
        }
        Value::Array(items) if items.iter().all(Value::is_string) && !items.is_empty() => {
            FieldType::StrList
        }
        Value::Array(_) => FieldType::FloatList,
        // A null width or count (RecurrentGemma's `lru_width`: hidden_size when null).
        Value::Null if role.is_some() => FieldType::I32,
        _ => FieldType::IntList,
    };
    let nullable = role.is_none() && !number && ty != FieldType::StrList;
    Field {
        name: name.to_owned(),
        ty,
        default,
        nullable,
        role: match role {
            None if ty == FieldType::StrList => "each layer's kind, the list repeated",
            None => "which layers attend",
            Some(role) => role_text_of(kind, role),
        },
    }
}

/// A recurrent-only plan for `facts`, or `None` where some layer holds no recurrent mixer
/// (attention, hybrids: the attention plan, and its gaps, apply).
pub fn plan(facts: &Value, module: &str) -> Option<Plan> {
    let layers = facts.pointer("/structure/layers")?.as_str()?.to_owned();
    let params = parameters(facts);
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
    // Gated DeltaNet comes only with attention layers (the hybrid plan).
    if kind == Kind::GatedDeltaNet || mixers.iter().any(|((p, k), _)| *p != path || *k != kind) {
        return None;
    }
    let fields_of = facts.get("config_fields")?.as_object()?;
    let mut gaps = Vec::new();
    let mut decisions = vec![format!(
        "every layer's `{path}` holds `A_log` and {}: a {kind:?} mixer (read from the module tree of the tiny model)",
        match kind {
            Kind::Mamba => "`x_proj`/`dt_proj`",
            Kind::Mamba2 => "`dt_bias`",
            Kind::ShortConv | Kind::GatedDeltaNet | Kind::RgLru => unreachable!("{NOT_RECURRENT_ONLY}"),
        }
    )];
    let roles = mixer_roles(kind, fields_of, &mut gaps);
    let gate = check_mixer(
        facts,
        &params,
        &format!("{layers}.0.{path}"),
        kind,
        &roles,
        &mut decisions,
        &mut gaps,
    );
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

/// The config field of each role a `kind` mixer reads (the first of [`ROLES`]' names the
/// class has); a role no field holds is a gap.
fn mixer_roles(
    kind: Kind,
    fields_of: &serde_json::Map<String, Value>,
    gaps: &mut Vec<String>,
) -> BTreeMap<&'static str, String> {
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
    roles
}

/// Checks the weight shapes of the recurrent mixer at `mixer` (its full parameter path)
/// against what the config fields of `roles` give, and reads a Mamba2 mixer's output gate
/// from its `norm` module; what disagrees goes to `gaps`.
fn check_mixer(
    facts: &Value,
    params: &[(String, Vec<i64>)],
    mixer: &str,
    kind: Kind,
    roles: &BTreeMap<&'static str, String>,
    decisions: &mut Vec<String>,
    gaps: &mut Vec<String>,
) -> Option<Mamba2Gate> {
    let resolved = &facts["resolved_config"];
    let shape = |leaf: &str| -> Vec<i64> {
        let name = format!("{mixer}.{leaf}");
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
                .find(|m| m["name"].as_str() == Some(&format!("{mixer}.norm")));
            Some(match norm {
                None => Mamba2Gate::Silu,
                Some(m) if m.pointer("/attrs/norm_before_gate") == Some(&Value::Bool(true)) => {
                    Mamba2Gate::NormBeforeGate
                }
                Some(_) => Mamba2Gate::NormAfterGate,
            })
        }
        Kind::ShortConv => {
            // `in_proj` gives B, C and x; a depthwise conv of `conv_kernel` taps; `out_proj`.
            checks.push((
                "conv.weight".into(),
                shape("conv.weight"),
                vec![hidden, 1, k],
            ));
            checks.push((
                "in_proj.weight".into(),
                shape("in_proj.weight"),
                vec![3 * hidden, hidden],
            ));
            checks.push((
                "out_proj.weight".into(),
                shape("out_proj.weight"),
                vec![hidden, hidden],
            ));
            None
        }
        Kind::RgLru => {
            rg_lru_checks(
                resolved,
                roles,
                hidden,
                &shape,
                &mut checks,
                decisions,
                gaps,
            );
            None
        }
        Kind::GatedDeltaNet => {
            check_delta_net(facts, mixer, &shape, &value, hidden, &mut checks, gaps);
            None
        }
    };
    for (leaf, got, want) in &checks {
        if got != want {
            gaps.push(format!(
                "`{mixer}.{leaf}` is {got:?} in the tiny model, but the config fields give {want:?}: \
                 the fields do not mean what the {kind:?} block reads"
            ));
        }
    }
    let biases: &[(&str, &str)] = match kind {
        Kind::Mamba | Kind::Mamba2 => &[("in_proj.bias", "bias"), ("conv1d.bias", "conv_bias")],
        // One switch for the three (LFM2's `conv_bias`).
        Kind::ShortConv => &[
            ("in_proj.bias", "conv_bias"),
            ("conv.bias", "conv_bias"),
            ("out_proj.bias", "conv_bias"),
        ],
        // Every projection and the conv has a bias, whatever the config says.
        Kind::RgLru => &[],
        // None (every parameter is checked above).
        Kind::GatedDeltaNet => &[],
    };
    for &(leaf, role) in biases {
        if present(leaf) != flag(role) {
            gaps.push(format!(
                "`{mixer}.{leaf}` {} while `{}` is {}",
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
    gate
}

/// The weight shapes of a RecurrentGemma recurrent block as its config fields give them:
/// `lru_width` channels (hidden_size where the field is null: what the config class
/// resolves it to is checked), gates of `num_attention_heads` diagonal blocks, a conv of
/// `conv1d_width` taps, biases everywhere.
#[allow(clippy::too_many_arguments)]
fn rg_lru_checks(
    resolved: &Value,
    roles: &BTreeMap<&'static str, String>,
    hidden: i64,
    shape: &dyn Fn(&str) -> Vec<i64>,
    checks: &mut Vec<(String, Vec<i64>, Vec<i64>)>,
    decisions: &mut Vec<String>,
    gaps: &mut Vec<String>,
) {
    let value = |role: &str| -> Option<i64> {
        roles
            .get(role)
            .and_then(|f| resolved.get(f.as_str()))
            .and_then(Value::as_i64)
    };
    let width = value("lru_width").unwrap_or(hidden);
    let heads = value("lru_heads").unwrap_or(-1);
    let k = value("lru_conv_kernel").unwrap_or(-1);
    if heads <= 0 || width % heads != 0 {
        gaps.push(format!(
            "the RG-LRU's {width} channels do not split into {heads} gate blocks"
        ));
        return;
    }
    let block = width / heads;
    for (leaf, want) in [
        ("linear_x.weight", vec![width, hidden]),
        ("linear_y.weight", vec![width, hidden]),
        ("linear_out.weight", vec![hidden, width]),
        ("conv_1d.weight", vec![width, 1, k]),
        ("rg_lru.recurrent_param", vec![width]),
        ("rg_lru.input_gate_weight", vec![heads, block, block]),
        ("rg_lru.recurrent_gate_weight", vec![heads, block, block]),
        ("rg_lru.input_gate_bias", vec![heads, block]),
        ("rg_lru.recurrent_gate_bias", vec![heads, block]),
        ("linear_x.bias", vec![width]),
        ("linear_y.bias", vec![width]),
        ("linear_out.bias", vec![hidden]),
        ("conv_1d.bias", vec![width]),
    ] {
        checks.push((leaf.to_owned(), shape(leaf), want));
    }
    decisions.push(format!(
        "RG-LRU: {width} channels in {heads} gate blocks of {block}, conv of {k} taps, biases \
         on every projection and the conv (read from the weight shapes)"
    ));
}

/// The weight shapes of a gated DeltaNet at `mixer` as its config fields give them (either
/// projection layout), every parameter under it one of those, and its gated norm's epsilon
/// the model's: what disagrees goes to `gaps`.
fn check_delta_net(
    facts: &Value,
    mixer: &str,
    shape: &dyn Fn(&str) -> Vec<i64>,
    value: &dyn Fn(&str) -> i64,
    hidden: i64,
    checks: &mut Vec<(String, Vec<i64>, Vec<i64>)>,
    gaps: &mut Vec<String>,
) {
    let (hk, hv) = (value("num_key_heads"), value("num_value_heads"));
    let (kd, vd) = (hk * value("key_head_dim"), hv * value("value_head_dim"));
    if hk <= 0 || hv % hk != 0 {
        gaps.push(format!(
            "the tiny model's {hv} value heads are no multiple of its {hk} key heads"
        ));
    }
    let mut want = vec![
        ("A_log", vec![hv]),
        ("dt_bias", vec![hv]),
        ("conv1d.weight", vec![2 * kd + vd, 1, value("conv_kernel")]),
        ("norm.weight", vec![value("value_head_dim")]),
        ("out_proj.weight", vec![hidden, vd]),
    ];
    if !shape("in_proj_qkvz.weight").is_empty() {
        // Per key head: q, k, its value heads' v and z; then their b and a.
        want.push(("in_proj_qkvz.weight", vec![2 * kd + 2 * vd, hidden]));
        want.push(("in_proj_ba.weight", vec![2 * hv, hidden]));
    } else {
        want.push(("in_proj_qkv.weight", vec![2 * kd + vd, hidden]));
        want.push(("in_proj_z.weight", vec![vd, hidden]));
        want.push(("in_proj_b.weight", vec![hv, hidden]));
        want.push(("in_proj_a.weight", vec![hv, hidden]));
    }
    let prefix = format!("{mixer}.");
    let others: Vec<String> = parameters(facts)
        .into_iter()
        .filter_map(|(n, _)| n.strip_prefix(&prefix).map(str::to_owned))
        .filter(|leaf| !want.iter().any(|(w, _)| w == leaf))
        .collect();
    if !others.is_empty() {
        gaps.push(format!(
            "`{mixer}` holds {others:?} besides what the gated DeltaNet block loads (no biases, \
             one of its two projection layouts)"
        ));
    }
    // Its gated RMSNorm runs at the model's epsilon.
    let eps = facts["resolved_config"]
        .get("rms_norm_eps")
        .and_then(Value::as_f64);
    let norm_eps = facts
        .get("modules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|m| m["name"].as_str() == Some(&format!("{mixer}.norm")))
        .and_then(|m| {
            let attrs = m.get("attrs")?;
            attrs
                .get("variance_epsilon")
                .or_else(|| attrs.get("eps"))?
                .as_f64()
        });
    if let (Some(eps), Some(norm_eps)) = (eps, norm_eps) {
        if (eps - norm_eps).abs() > eps * 1e-6 {
            gaps.push(format!(
                "`{mixer}.norm` runs at epsilon {norm_eps:e}, not the model's rms_norm_eps {eps:e}"
            ));
        }
    }
    for (leaf, w) in want {
        checks.push((leaf.to_owned(), shape(leaf), w));
    }
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
        placement_when: None,
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
        recurrent: Some(RecurrentPlan {
            kind,
            roles,
            gate,
            clamp_steps: step_clamps(facts),
        }),
        hybrid: None,
        layer_norm: None,
        weightless_norms: false,
        null_norm: None,
        derived_list_keys: Vec::new(),
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
        gate_proj: false,
        output_gate: false,
        differential: false,
        sub_norms: false,
        unused_prefixes: Vec::new(),
        unused_anywhere: Vec::new(),
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
        norm_on_embeddings: false,
        rope_reversed: false,
        alibi: None,
        embedding_layernorm: false,
        nested_refused: Vec::new(),
        conv1d: Vec::new(),
        sinusoidal_positions: None,
        final_norm: true,
        o_bias_only: None,
        intermediate_multiple: None,
        first_layer_no_input_norm: false,
        prediction_head: None,
        divided_aliases: Vec::new(),
        intermediate_divisor: None,
        layer_period: None,
    }
}

/// `name`'s value in `config`, else Transformers' default (the plan's field).
fn config_value(plan: &Plan, config: &ConfigFile, name: &str) -> Value {
    config.value.get(name).cloned().unwrap_or_else(|| {
        plan.fields
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.default.clone())
            .unwrap_or(Value::Null)
    })
}

/// A recurrent mixer's settings, read from `config` as the generated module reads them.
pub enum MixerSettings {
    Mamba(MambaSettings),
    Mamba2(Mamba2Settings),
    /// [`DecoderSettings::short_conv`]: the conv's taps and whether the block has biases.
    ShortConv(i32, bool),
    /// [`DecoderSettings::rg_lru`]: width, gate blocks, conv taps.
    RgLru(i32, i32, i32),
    GatedDeltaNet(GatedDeltaNetSettings),
}

/// The mixer's settings and its norm's epsilon, read from `config` directly (the fields of
/// `r`'s roles, Transformers' defaults where config.json leaves them out).
fn mixer_settings(
    plan: &Plan,
    r: &RecurrentPlan,
    config: &ConfigFile,
    hidden: i32,
) -> Result<(MixerSettings, f64)> {
    let value = |name: &str| config_value(plan, config, name);
    let int = |role: &str| -> Result<i32> {
        let name = r.field(role);
        config.require(name, value(name).as_i64().map(|v| v as i32))
    };
    let boolean = |role: &str| value(r.field(role)).as_bool().unwrap_or(false);
    if r.kind == Kind::ShortConv {
        let kernel = int("conv_kernel")?;
        config.ensure(kernel > 0, r.field("conv_kernel"), || {
            "must be positive".to_owned()
        })?;
        return Ok((MixerSettings::ShortConv(kernel, boolean("conv_bias")), 0.0));
    }
    if r.kind == Kind::RgLru {
        return Ok((rg_lru_settings(r, config, &value, hidden)?, 0.0));
    }
    let act = value(r.field("act"));
    config.ensure(act.as_str() == Some("silu"), r.field("act"), || {
        format!("the mixer's activation {act} is not supported (silu)")
    })?;
    let eps = value(r.field("eps")).as_f64();
    let eps = config.require(r.field("eps"), eps)?;
    let mixer = match r.kind {
        Kind::Mamba => {
            let rank = match value(r.field("time_step_rank")) {
                Value::String(s) if s == "auto" => (hidden + 15) / 16,
                v => config.require(r.field("time_step_rank"), v.as_i64().map(|v| v as i32))?,
            };
            let expand = int("expand")?;
            config.ensure(expand > 0 && rank > 0, r.field("expand"), || {
                "expand and time_step_rank must be positive".to_owned()
            })?;
            MixerSettings::Mamba(MambaSettings {
                intermediate_size: expand * hidden,
                state_size: int("state_size")?,
                time_step_rank: rank,
                conv_kernel: int("conv_kernel")?,
                conv_bias: boolean("conv_bias"),
                bias: boolean("bias"),
                bcdt_rms_eps: None,
                bcdt_norm_eps: None,
            })
        }
        Kind::Mamba2 => {
            let (heads, groups) = (int("num_heads")?, int("n_groups")?);
            let expand = int("expand")?;
            // "auto": the heads share the expanded width.
            let head_dim = match value(r.field("head_dim")) {
                Value::String(s) if s == "auto" => expand * hidden / heads.max(1),
                v => config.require(r.field("head_dim"), v.as_i64().map(|v| v as i32))?,
            };
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
            MixerSettings::Mamba2(Mamba2Settings {
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
                clamp_steps: r.clamp_steps,
                norm_eps: eps,
                gate: r.gate.unwrap_or(Mamba2Gate::NormAfterGate),
                chunked_prefill: true,
            })
        }
        Kind::GatedDeltaNet => {
            let (key_heads, value_heads) = (int("num_key_heads")?, int("num_value_heads")?);
            config.ensure(
                key_heads > 0 && value_heads % key_heads == 0,
                r.field("num_value_heads"),
                || {
                    format!(
                        "{value_heads} value heads cannot be grouped over {key_heads} key heads"
                    )
                },
            )?;
            MixerSettings::GatedDeltaNet(GatedDeltaNetSettings {
                num_key_heads: key_heads,
                num_value_heads: value_heads,
                key_head_dim: int("key_head_dim")?,
                value_head_dim: int("value_head_dim")?,
                conv_kernel: int("conv_kernel")?,
                norm_eps: eps,
                chunk_size: 64,
                chunked_prefill: true,
            })
        }
        Kind::ShortConv | Kind::RgLru => unreachable!("read above"),
    };
    Ok((mixer, eps))
}

/// An RG-LRU block's width (hidden_size when `lru_width` is null), gate blocks and conv
/// taps, checked as the generated module checks them.
fn rg_lru_settings(
    r: &RecurrentPlan,
    config: &ConfigFile,
    value: &dyn Fn(&str) -> Value,
    hidden: i32,
) -> Result<MixerSettings> {
    let int = |role: &str| -> Result<i32> {
        let name = r.field(role);
        config.require(name, value(name).as_i64().map(|v| v as i32))
    };
    let width = match value(r.field("lru_width")) {
        Value::Null => hidden,
        v => config.require(r.field("lru_width"), v.as_i64().map(|v| v as i32))?,
    };
    let (heads, kernel) = (int("lru_heads")?, int("lru_conv_kernel")?);
    config.ensure(
        width > 0 && heads > 0 && width % heads == 0,
        r.field("lru_width"),
        || format!("{width} channels cannot be split into {heads} heads"),
    )?;
    config.ensure(kernel > 0, r.field("lru_conv_kernel"), || {
        "must be positive".to_owned()
    })?;
    Ok(MixerSettings::RgLru(width, heads, kernel))
}

/// The settings the generated module computes, read from `config` directly.
pub fn settings(plan: &Plan, r: &RecurrentPlan, config: &ConfigFile) -> Result<DecoderSettings> {
    let value = |name: &str| config_value(plan, config, name);
    let int = |name: &str| config.require(name, value(name).as_i64());
    let hidden = int("hidden_size")? as i32;
    let vocab = int("vocab_size")? as i32;
    let layers = int("num_hidden_layers")? as usize;
    let (mixer, eps) = mixer_settings(plan, r, config, hidden)?;
    let mut settings = match mixer {
        MixerSettings::Mamba(mamba) => DecoderSettings {
            mamba: Some(mamba),
            ..DecoderSettings::recurrent_only(
                &plan.model_type,
                vocab,
                hidden,
                layers,
                MixerKind::Mamba,
            )
        },
        MixerSettings::Mamba2(mamba2) => DecoderSettings {
            mamba2: Some(mamba2),
            ..DecoderSettings::recurrent_only(
                &plan.model_type,
                vocab,
                hidden,
                layers,
                MixerKind::Mamba2,
            )
        },
        MixerSettings::ShortConv(..)
        | MixerSettings::GatedDeltaNet(_)
        | MixerSettings::RgLru(..) => {
            unreachable!("{NOT_RECURRENT_ONLY}")
        }
    };
    settings.norm_eps = eps;
    settings.tie_word_embeddings = value("tie_word_embeddings").as_bool().unwrap_or(false);
    if r.roles.contains_key("residual_in_fp32") {
        settings.residual_in_f32 = value(r.field("residual_in_fp32")).as_bool().unwrap_or(true);
    }
    Ok(settings)
}

/// `settings` of a hybrid's attention plan with the layers `h`'s rule does not make attend
/// running its recurrent mixer, read from `config` as the generated module reads it.
pub fn with_hybrid(
    plan: &Plan,
    h: &HybridPlan,
    config: &ConfigFile,
    settings: DecoderSettings,
) -> Result<DecoderSettings> {
    let value = |name: &str| config_value(plan, config, name);
    let n = settings.layers.len();
    let ints = |name: &str| -> Option<Vec<i32>> {
        value(name).as_array().map(|a| {
            a.iter()
                .filter_map(Value::as_i64)
                .map(|v| v as i32)
                .collect()
        })
    };
    let int = |name: &str| -> Result<i32> {
        config.require(name, value(name).as_i64().map(|v| v as i32))
    };
    let indices;
    let rule = match &h.rule {
        AttentionRule::Indices {
            field,
            null_attends,
        } => {
            indices = ints(field);
            AttentionLayers::Indices {
                field,
                indices: indices.as_deref(),
                null_attends: *null_attends,
            }
        }
        AttentionRule::Period { period, offset } => AttentionLayers::Period {
            period: (period, int(period)?),
            offset: (offset, int(offset)?),
        },
        AttentionRule::Interval { field } => AttentionLayers::Interval {
            interval: (field, int(field)?),
        },
        AttentionRule::LayerTypes { .. } => {
            let attends = layer_types_attend(&h.rule, config, &value, n)?;
            return with_mixer(plan, h, config, settings, &attends);
        }
        AttentionRule::Cycle {
            field,
            attending,
            mixing,
        } => {
            let pattern: Vec<String> = serde_json::from_value(value(field))
                .map_err(|e| config_error(config, field, e.to_string()))?;
            let attending: Vec<&str> = attending.iter().map(String::as_str).collect();
            let attends = AttentionLayers::Cycle {
                field,
                pattern: &pattern,
                attending: &attending,
                mixing,
            }
            .resolve(n, config)?;
            return with_mixer(plan, h, config, settings, &attends);
        }
    };
    let attends = rule.resolve(n, config)?;
    with_mixer(plan, h, config, settings, &attends)
}

/// A layer kind of Transformers' `layer_types` as the decoder's [`LayerType`] (a kind it
/// does not know is a gap of the plan).
pub fn layer_type(kind: &str) -> Option<LayerType> {
    serde_json::from_value(Value::from(kind)).ok()
}

/// Which of `n` layers attend under an [`AttentionRule::LayerTypes`] rule, through
/// [`AttentionLayers::Types`] as the generated module resolves it.
fn layer_types_attend(
    rule: &AttentionRule,
    config: &ConfigFile,
    value: &dyn Fn(&str) -> Value,
    n: usize,
) -> Result<Vec<bool>> {
    let AttentionRule::LayerTypes {
        field,
        attending,
        mixing,
        fallback,
    } = rule
    else {
        unreachable!("a layer_types rule")
    };
    let kinds = |names: &[String]| -> Result<Vec<LayerType>> {
        names
            .iter()
            .map(|k| {
                layer_type(k)
                    .ok_or_else(|| config_error(config, field, format!("unknown kind `{k}`")))
            })
            .collect()
    };
    let types: Option<Vec<LayerType>> = match value(field) {
        Value::Null => None,
        v => Some(
            serde_json::from_value(v).map_err(|e| config_error(config, field, e.to_string()))?,
        ),
    };
    let (attending, mixing) = (kinds(attending)?, kinds(std::slice::from_ref(mixing))?[0]);
    let indices;
    let fallback = match fallback.as_deref() {
        None => None,
        Some(AttentionRule::Indices {
            field,
            null_attends,
        }) => {
            indices = value(field).as_array().map(|a| {
                a.iter()
                    .filter_map(Value::as_i64)
                    .map(|v| v as i32)
                    .collect::<Vec<_>>()
            });
            Some(AttentionLayers::Indices {
                field,
                indices: indices.as_deref(),
                null_attends: *null_attends,
            })
        }
        Some(AttentionRule::Interval { field }) => Some(AttentionLayers::Interval {
            interval: (
                field,
                config.require(field, value(field).as_i64().map(|v| v as i32))?,
            ),
        }),
        Some(other) => {
            return Err(config_error(
                config,
                field,
                format!("without it, {} is not composed", other.describe()),
            ))
        }
    };
    AttentionLayers::Types {
        field,
        types: types.as_deref(),
        attending: &attending,
        mixing,
        fallback: fallback.as_ref(),
    }
    .resolve(n, config)
}

fn config_error(config: &ConfigFile, field: &str, message: String) -> mlx_models::Error {
    mlx_models::Error::Config {
        path: config.path.clone(),
        field: field.to_owned(),
        message,
    }
}

/// `settings` with the layers `attends` leaves out running `h`'s mixer.
fn with_mixer(
    plan: &Plan,
    h: &HybridPlan,
    config: &ConfigFile,
    mut settings: DecoderSettings,
    attends: &[bool],
) -> Result<DecoderSettings> {
    let attends = attends.to_vec();
    let (mixer, _) = mixer_settings(plan, &h.mixer, config, settings.hidden_size)?;
    match mixer {
        MixerSettings::Mamba(mamba) => {
            set_recurrent_layers(&mut settings.layers, &attends, MixerKind::Mamba);
            settings.mamba = Some(mamba);
        }
        MixerSettings::Mamba2(mamba2) => {
            set_recurrent_layers(&mut settings.layers, &attends, MixerKind::Mamba2);
            settings.mamba2 = Some(mamba2);
        }
        MixerSettings::ShortConv(kernel, bias) => {
            set_recurrent_layers(&mut settings.layers, &attends, MixerKind::ShortConv);
            settings.short_conv = Some((kernel, bias));
        }
        MixerSettings::RgLru(width, heads, kernel) => {
            set_recurrent_layers(&mut settings.layers, &attends, MixerKind::RgLru);
            settings.rg_lru = Some((width, heads, kernel));
        }
        MixerSettings::GatedDeltaNet(delta) => {
            set_recurrent_layers(&mut settings.layers, &attends, MixerKind::GatedDeltaNet);
            settings.gated_delta_net = Some(delta);
        }
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
        Kind::ShortConv | Kind::GatedDeltaNet | Kind::RgLru => unreachable!("{NOT_RECURRENT_ONLY}"),
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
        Kind::Mamba | Kind::ShortConv | Kind::GatedDeltaNet | Kind::RgLru => "",
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
                 clamp_steps: {clamp},\nnorm_eps: self.{eps},\ngate: Mamba2Gate::{gate:?},\nchunked_prefill: true,\n}};",
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
                clamp = r.clamp_steps,
            );
        }
        Kind::ShortConv | Kind::GatedDeltaNet | Kind::RgLru => unreachable!("{NOT_RECURRENT_ONLY}"),
    }
    let (field, var) = match r.kind {
        Kind::Mamba => ("mamba", "mamba"),
        Kind::Mamba2 => ("mamba2", "mamba2"),
        Kind::ShortConv | Kind::GatedDeltaNet | Kind::RgLru => unreachable!("{NOT_RECURRENT_ONLY}"),
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

/// A hybrid module's `Config` line for `f` where it is not the plain one: the step limit
/// as a pair (Python's infinity read), a head width or step rank that may say "auto".
pub fn hybrid_field(h: &HybridPlan, f: &Field) -> Option<String> {
    let role = h
        .mixer
        .roles
        .iter()
        .find(|(_, field)| **field == f.name)
        .map(|(role, _)| *role)?;
    match role {
        "time_step_limit" => Some(format!(
            "/// Recurrent mixer: the range its steps are clamped to.\n\
             #[serde(deserialize_with = \"crate::config::f64_pair_or_non_finite\")]\n\
             pub {}: (f64, f64),",
            f.name
        )),
        "head_dim" | "time_step_rank" if f.ty == FieldType::Str => Some(format!(
            "/// {}: a number, or \"auto\".\npub {}: serde_json::Value,",
            capitalize(role_text(role)),
            f.name
        )),
        // A name that is no Rust field name (LFM2's `conv_L_cache`).
        _ if ident(&f.name) != f.name => Some(format!(
            "/// {}.\n#[serde(rename = {:?})]\npub {}: {},",
            capitalize(role_text_of(h.mixer.kind, role)),
            f.name,
            ident(&f.name),
            match f.ty {
                FieldType::Bool => "bool",
                FieldType::F64 => "f64",
                _ => "i32",
            }
        )),
        _ => None,
    }
}

/// The Rust field name of config field `name`.
fn ident(name: &str) -> String {
    name.to_lowercase()
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The fields of [`mlx_models::family::Mamba2Config`], by the roles they hold.
const MAMBA2_CONFIG: &[(&str, &str)] = &[
    ("num_heads", "mamba_n_heads"),
    ("head_dim", "mamba_d_head"),
    ("n_groups", "mamba_n_groups"),
    ("state_size", "mamba_d_state"),
    ("conv_kernel", "mamba_d_conv"),
    ("expand", "mamba_expand"),
    ("chunk_size", "mamba_chunk_size"),
    ("conv_bias", "mamba_conv_bias"),
    ("bias", "mamba_proj_bias"),
    ("time_step_limit", "time_step_limit"),
];

/// Whether the hybrid's Mamba2 fields are [`mlx_models::family::Mamba2Config`]'s (the
/// `mamba_*` names, `rms_norm_eps`, the norm after the gate): the module flattens it.
pub fn uses_mamba2_config(h: &HybridPlan) -> bool {
    let r = &h.mixer;
    r.kind == Kind::Mamba2
        && r.gate.unwrap_or(Mamba2Gate::NormAfterGate) == Mamba2Gate::NormAfterGate
        && r.field("eps") == "rms_norm_eps"
        && MAMBA2_CONFIG
            .iter()
            .all(|(role, name)| r.field(role) == *name)
}

/// Whether `name` is read through [`mlx_models::family::Mamba2Config`].
pub fn in_mamba2_config(h: &HybridPlan, name: &str) -> bool {
    uses_mamba2_config(h) && MAMBA2_CONFIG.iter().any(|(_, n)| *n == name)
}

/// The `use` line a hybrid module adds: the mixer's settings (none where it flattens
/// `Mamba2Config`).
pub fn hybrid_uses(h: &HybridPlan) -> Option<&'static str> {
    match h.mixer.kind {
        _ if uses_mamba2_config(h) => None,
        Kind::Mamba => Some("use crate::ssm::MambaSettings;"),
        Kind::Mamba2 => Some("use crate::ssm::{Mamba2Gate, Mamba2Settings};"),
        Kind::ShortConv | Kind::RgLru => None,
        Kind::GatedDeltaNet => Some("use crate::delta::GatedDeltaNetSettings;"),
    }
}

/// The statements of a hybrid module's `settings` after `layers` is built (which layers
/// attend, the recurrent mixer on the others and its settings), and the `DecoderSettings`
/// entry that hands the mixer over. `shared(name)`: the field is read through the shared
/// `DecoderConfig` (`d`).
pub fn hybrid_settings(
    h: &HybridPlan,
    plan: &Plan,
    shared: impl Fn(&str) -> bool,
) -> (String, String) {
    let mut out = String::new();
    let w = &mut out;
    let r = &h.mixer;
    let default = |name: &str| {
        plan.fields
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.default.clone())
            .unwrap_or(Value::Null)
    };
    // A role's value as the module reads it.
    let expr = |role: &str| -> String {
        let name = r.field(role);
        match name {
            "hidden_size" | "num_hidden_layers" | "vocab_size" | "num_attention_heads" => {
                format!("d.{name}")
            }
            "hidden_act" | "hidden_activation" if shared(name) => format!(
                "d.{name}.as_deref().unwrap_or({:?})",
                default(name).as_str().unwrap_or("silu")
            ),
            _ if shared(name) => match default(name) {
                Value::Number(n) => format!("d.{name}.unwrap_or({:?})", n.as_f64().unwrap_or(0.0)),
                Value::Bool(b) => format!("d.{name}.unwrap_or({b})"),
                _ => format!("d.{name}"),
            },
            _ => format!("self.{}", ident(name)),
        }
    };
    let kind = match r.kind {
        Kind::Mamba => "Mamba",
        Kind::Mamba2 => "Mamba2",
        Kind::ShortConv => "ShortConv",
        Kind::RgLru => "RgLru",
        Kind::GatedDeltaNet => "GatedDeltaNet",
    };
    match &h.rule {
        AttentionRule::LayerTypes {
            field,
            attending,
            mixing,
            fallback,
        } => {
            let _ = writeln!(
                w,
                "// `{field}`: {} layers attend, `{mixing}` layers run the {}.",
                attending
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                match r.kind {
                    Kind::ShortConv => "short convolution".to_owned(),
                    Kind::GatedDeltaNet => "gated DeltaNet".to_owned(),
                    _ => format!("{kind} mixer"),
                }
            );
            if let Some(rule) = fallback {
                let _ = writeln!(w, "// Without it, {}.", rule.describe());
            }
            let variant = |k: &str| format!("LayerType::{}", camel(k));
            let list = if shared(field) {
                format!("d.windows.{field}.as_deref()")
            } else {
                format!("self.{field}.as_deref()")
            };
            let fallback = match fallback.as_deref() {
                Some(AttentionRule::Indices {
                    field,
                    null_attends,
                }) => {
                    let _ = writeln!(
                        w,
                        "let fallback = AttentionLayers::Indices {{ field: {field:?}, indices: \
                         self.{field}.as_deref(), null_attends: {null_attends} }};"
                    );
                    "Some(&fallback)"
                }
                Some(AttentionRule::Interval { field }) => {
                    let _ = writeln!(
                        w,
                        "let fallback = AttentionLayers::Interval {{ interval: ({field:?}, \
                         self.{field}) }};"
                    );
                    "Some(&fallback)"
                }
                _ => "None",
            };
            let _ = writeln!(
                w,
                "let attends = AttentionLayers::Types {{ field: {field:?}, types: {list}, \
                 attending: &[{}], mixing: {}, fallback: {fallback} }}\
                 .resolve(d.num_hidden_layers, config)?;",
                attending
                    .iter()
                    .map(|k| variant(k))
                    .collect::<Vec<_>>()
                    .join(", "),
                variant(mixing)
            );
        }
        AttentionRule::Indices {
            field,
            null_attends,
        } => {
            let _ = writeln!(
                w,
                "// `{field}`: the layers that attend ({} if null); the rest run {kind}.",
                if *null_attends { "all" } else { "none" }
            );
            let _ = writeln!(
                w,
                "let attends = AttentionLayers::Indices {{ field: {field:?}, indices: \
                 self.{field}.as_deref(), null_attends: {null_attends} }}\
                 .resolve(d.num_hidden_layers, config)?;"
            );
        }
        AttentionRule::Cycle {
            field,
            attending,
            mixing,
        } => {
            let _ = writeln!(
                w,
                "// Layer i is `{field}`[i % its length]: {} layers attend, `{mixing}` layers \
                 run the {kind} block.",
                attending
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let _ = writeln!(
                w,
                "let attends = AttentionLayers::Cycle {{ field: {field:?}, pattern: &self.{}, \
                 attending: &[{}], mixing: {mixing:?} }}.resolve(d.num_hidden_layers, config)?;",
                ident(field),
                attending
                    .iter()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        AttentionRule::Period { period, offset } => {
            let _ = writeln!(
                w,
                "// Layer i attends if i % `{period}` == `{offset}`; the rest run {kind}."
            );
            let _ = writeln!(
                w,
                "let attends = AttentionLayers::Period {{ period: ({period:?}, self.{period}), \
                 offset: ({offset:?}, self.{offset}) }}.resolve(d.num_hidden_layers, config)?;"
            );
        }
        AttentionRule::Interval { field } => {
            let _ = writeln!(
                w,
                "// The last layer of every `{field}` attends; the rest run {kind}."
            );
            let _ = writeln!(
                w,
                "let attends = AttentionLayers::Interval {{ interval: ({field:?}, self.{field}) }}\
                 .resolve(d.num_hidden_layers, config)?;"
            );
        }
    }
    let _ = writeln!(
        w,
        "set_recurrent_layers(&mut layers, &attends, MixerKind::{kind});"
    );
    if r.kind == Kind::RgLru {
        let width = r.field("lru_width");
        let (heads, kernel) = (expr("lru_heads"), expr("lru_conv_kernel"));
        let _ = writeln!(
            w,
            "let lru_width = self.{}.unwrap_or(d.hidden_size);\n\
             config.ensure(lru_width > 0 && {heads} > 0 && lru_width % {heads} == 0, {width:?}, \
             || format!(\"{{lru_width}} channels cannot be split into {{}} heads\", {heads}))?;\n\
             config.ensure({kernel} > 0, {kn:?}, || \"must be positive\".to_owned())?;",
            ident(width),
            kn = r.field("lru_conv_kernel"),
        );
        return (out, format!("rg_lru: Some((lru_width, {heads}, {kernel}))"));
    }
    if r.kind == Kind::ShortConv {
        return (
            out,
            format!(
                "short_conv: Some(({}, {}))",
                expr("conv_kernel"),
                expr("conv_bias")
            ),
        );
    }
    let act = r.field("act");
    let _ = writeln!(
        w,
        "let mixer_act = {};\nconfig.ensure(mixer_act == \"silu\", {act:?}, || format!(\"the {kind} \
         mixer's activation `{{mixer_act}}` is not supported (silu)\"))?;",
        expr("act")
    );
    if uses_mamba2_config(h) {
        let eps = default("rms_norm_eps").as_f64().unwrap_or(1e-6);
        let _ = writeln!(
            w,
            "let mamba2 = self.mamba.settings(d, {eps:?}, {}, config)?;",
            r.clamp_steps
        );
        return (out, "mamba2: Some(mamba2)".to_owned());
    }
    // A field that may say "auto" (Transformers derives the value), read into a variable.
    let auto = |w: &mut String, role: &str, value: &str| -> String {
        let name = r.field(role);
        if plan
            .fields
            .iter()
            .any(|f| f.name == name && f.ty == FieldType::Str)
        {
            let _ = writeln!(
                w,
                "let {role} = match &self.{name} {{\n\
                 serde_json::Value::String(s) if s == \"auto\" => {value},\n\
                 v => v.as_i64().map(|v| v as i32).ok_or_else(|| \
                 crate::error::Error::config(&config.path, {name:?}, \
                 \"must be a number or \\\"auto\\\"\"))?,\n}};"
            );
            role.to_owned()
        } else {
            expr(role)
        }
    };
    // `field: value`, or the shorthand where the value is a variable of the field's name.
    let field_init = |field: &str, value: String| -> String {
        if value == field {
            value
        } else {
            format!("{field}: {value}")
        }
    };
    let entry = match r.kind {
        Kind::ShortConv | Kind::RgLru => unreachable!("returned above"),
        Kind::GatedDeltaNet => {
            let (hk, hv) = (expr("num_key_heads"), expr("num_value_heads"));
            let _ = writeln!(
                w,
                "config.ensure({hk} > 0 && {hv} % {hk} == 0, {hv_name:?}, || \
                 format!(\"{{}} value heads cannot be grouped over {{}} key heads\", {hv}, {hk}))?;\n\
                 let gated_delta_net = GatedDeltaNetSettings {{\n\
                 num_key_heads: {hk},\nnum_value_heads: {hv},\nkey_head_dim: {dk},\n\
                 value_head_dim: {dv},\nconv_kernel: {conv},\nnorm_eps: {eps},\n\
                 chunk_size: 64,\nchunked_prefill: true,\n}};",
                hv_name = r.field("num_value_heads"),
                dk = expr("key_head_dim"),
                dv = expr("value_head_dim"),
                conv = expr("conv_kernel"),
                eps = expr("eps"),
            );
            "gated_delta_net: Some(gated_delta_net)".to_owned()
        }
        Kind::Mamba => {
            let rank = field_init(
                "time_step_rank",
                auto(w, "time_step_rank", "(d.hidden_size + 15) / 16"),
            );
            let _ = writeln!(
                w,
                "config.ensure({expand} > 0 && {rank} > 0, {expand_name:?}, || \
                 \"expand and time_step_rank must be positive\".to_owned())?;\n\
                 let mamba = MambaSettings {{\n\
                 intermediate_size: {expand} * d.hidden_size,\nstate_size: {state},\n\
                 {rank},\nconv_kernel: {conv},\nconv_bias: {conv_bias},\n\
                 bias: {bias},\nbcdt_rms_eps: None,\nbcdt_norm_eps: None,\n}};",
                expand = expr("expand"),
                expand_name = r.field("expand"),
                state = expr("state_size"),
                conv = expr("conv_kernel"),
                conv_bias = expr("conv_bias"),
                bias = expr("bias"),
            );
            "mamba: Some(mamba)".to_owned()
        }
        Kind::Mamba2 => {
            let (heads, e) = (expr("num_heads"), expr("expand"));
            let head_dim = auto(
                w,
                "head_dim",
                &format!("{e} * d.hidden_size / {heads}.max(1)"),
            );
            let g = expr("n_groups");
            let _ = writeln!(
                w,
                "config.ensure(d.hidden_size * {e} == {heads} * {head_dim}, {hn:?}, || \
                 format!(\"hidden_size × expand ({{}}) must equal the mixer's heads × head width \
                 ({{}})\", d.hidden_size * {e}, {heads} * {head_dim}))?;\n\
                 config.ensure({g} > 0 && {heads} % {g} == 0, {gn:?}, || \
                 format!(\"{{}} heads cannot be split into {{}} groups\", {heads}, {g}))?;\n\
                 let mamba2 = Mamba2Settings {{\n\
                 num_heads: {heads},\n{head_dim_init},\nstate_size: {state},\nn_groups: {g},\n\
                 conv_kernel: {conv},\nconv_bias: {conv_bias},\nbias: {bias},\nout_bias: {bias},\n\
                 chunk_size: {chunk},\n\
                 time_step_limit: ({limit}.0 as f32, {limit}.1.min(f64::from(f32::MAX)) as f32),\n\
                 clamp_steps: {clamp},\nnorm_eps: {eps},\ngate: Mamba2Gate::{gate:?},\n\
                 chunked_prefill: true,\n}};",
                head_dim_init = field_init("head_dim", head_dim.clone()),
                hn = r.field("num_heads"),
                gn = r.field("n_groups"),
                state = expr("state_size"),
                conv = expr("conv_kernel"),
                conv_bias = expr("conv_bias"),
                bias = expr("bias"),
                chunk = expr("chunk_size"),
                limit = expr("time_step_limit"),
                eps = expr("eps"),
                gate = r.gate.unwrap_or(Mamba2Gate::NormAfterGate),
                clamp = r.clamp_steps,
            );
            "mamba2: Some(mamba2)".to_owned()
        }
    };
    (out, entry)
}

/// `full_attention` as `FullAttention`.
fn camel(kind: &str) -> String {
    kind.split('_')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|c| c.to_uppercase().chain(chars).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

/// A hybrid's structure line, for the module's doc and the report.
pub fn hybrid_summary(h: &HybridPlan) -> String {
    let which = h.rule.describe();
    if h.mixer.kind == Kind::GatedDeltaNet {
        return format!(
            "Hybrid: {which}. The others replace attention by a gated DeltaNet \
             ([`crate::delta`], checkpoint `{}`: the gated delta rule over `{}` value heads \
             sharing `{}` query/key heads, a causal conv of `{}` taps over q, k and v, a gated \
             RMSNorm per value head) without RoPE, with the same norms and MLP. Its cache is the \
             conv and delta-rule state, a fixed size.",
            h.path,
            h.mixer.field("num_value_heads"),
            h.mixer.field("num_key_heads"),
            h.mixer.field("conv_kernel")
        );
    }
    if h.mixer.kind == Kind::ShortConv {
        return format!(
            "Hybrid: {which}. The others replace attention by a gated short convolution \
             ([`crate::conv::ShortConv`], checkpoint `{}`: `in_proj` gives B, C and x, a causal \
             depthwise conv of `{}` taps runs over B·x, `out_proj(C·conv)`; biases when `{}`) \
             without RoPE, with the same norms and MLP. Its cache is the conv state alone.",
            h.path,
            h.mixer.field("conv_kernel"),
            h.mixer.field("conv_bias")
        );
    }
    if h.mixer.kind == Kind::RgLru {
        return format!(
            "Hybrid: {which}. The others replace attention by RecurrentGemma's recurrent block \
             ([`crate::rglru`], checkpoint `{}`: `gelu_tanh(linear_y(x))` times `linear_x` → \
             causal depthwise conv of `{}` taps → RG-LRU of `{}` channels (hidden_size when \
             null) with gates in `{}` diagonal blocks, then `linear_out`) without RoPE, with the \
             same norms and MLP. Its cache is the conv state and one f32 state per channel.",
            h.path,
            h.mixer.field("lru_conv_kernel"),
            h.mixer.field("lru_width"),
            h.mixer.field("lru_heads")
        );
    }
    format!(
        "Hybrid: {which}; the others replace attention by a {:?} mixer ([`crate::ssm`], \
         checkpoint `{}`, loaded as `mixer`) without RoPE, with the same norms and MLP. Its \
         cache is the conv and SSM state, a fixed size.{}",
        h.mixer.kind,
        h.path,
        if h.mixer.clamp_steps {
            ""
        } else {
            " Decoded tokens leave `dt` unclamped by `time_step_limit`, as Transformers' steps do."
        }
    )
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

    /// Bamba's recorded facts: layer 0 attends, layer 1 holds Mamba2 `mamba`; the index
    /// list is the rule, the mixer's fields are read by role, and the plan verifies on the
    /// fixtures; a rule that does not give the tiny model's layers is a gap; a plan with
    /// the layers swapped wants a mixer at layer 0, and one with the wrong gate fails at
    /// layer 1.
    #[test]
    fn a_hybrid_is_planned_from_its_layers_and_the_field_that_says_which_attend() {
        let facts = facts("bamba");
        let plan = super::super::plan::plan(&facts, "bamba");
        assert!(plan.gaps.is_empty(), "{:?}", plan.gaps);
        let h = plan.hybrid.as_ref().expect("a hybrid plan");
        assert_eq!(
            h.rule,
            AttentionRule::Indices {
                field: "attn_layer_indices".to_owned(),
                null_attends: false
            }
        );
        assert_eq!((h.mixer.kind, h.path.as_str()), (Kind::Mamba2, "mamba"));
        // Transformers' Bamba decodes with `dt` unclamped (the recorded `step_clamps`).
        assert!(!h.mixer.clamp_steps);
        assert_eq!(h.mixer.field("num_heads"), "mamba_n_heads");
        assert_eq!(h.mixer.field("eps"), "rms_norm_eps");
        assert!(plan
            .renames
            .contains(&("mamba".to_owned(), "mixer".to_owned())));
        let search = super::super::search(&plan, &fixtures("bamba")).expect("search runs");
        assert!(search.chosen.is_some(), "{:?}", search.tried);

        // A rule that does not give the tiny model's layers is a gap.
        let mut other = facts.clone();
        other["resolved_config"]["attn_layer_indices"] = serde_json::json!([1]);
        let wrong = super::super::plan::plan(&other, "bamba");
        assert!(
            wrong
                .gaps
                .iter()
                .any(|g| g.contains("does not give the tiny model's attention layers")),
            "{:?}",
            wrong.gaps
        );

        // Seeded fault: the layers swapped (layer i attends when i % 2 == 1, from two fields
        // that hold 2 and 1 in the fixtures): the first layer already differs.
        let mut faulty = plan.clone();
        if let Some(h) = faulty.hybrid.as_mut() {
            h.rule = AttentionRule::Period {
                period: "num_hidden_layers".to_owned(),
                offset: "mamba_n_groups".to_owned(),
            };
        }
        let search = super::super::search(&faulty, &fixtures("bamba")).expect("search runs");
        assert!(search.chosen.is_none());
        let failure = &search.tried[0].1[0];
        assert!(
            failure.contains("missing weight `model.layers.0.mixer.A_log`"),
            "{failure}"
        );
        // Seeded fault: the mixer's gate the other way round: the first recurrent layer.
        let mut faulty = plan.clone();
        if let Some(h) = faulty.hybrid.as_mut() {
            h.mixer.gate = Some(Mamba2Gate::NormBeforeGate);
        }
        let search = super::super::search(&faulty, &fixtures("bamba")).expect("search runs");
        assert!(search.chosen.is_none());
        let failure = &search.tried[0].1[0];
        assert!(failure.contains("`layers.1`"), "{failure}");
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

    /// LFM2-MoE's recorded facts: layer 0 attends, layer 1 holds the short conv `conv`
    /// (experts after it, layer 0 dense); `layer_types` is the rule (`full_attention`
    /// attends, `conv` runs the conv: read from the tiny model's layers), the conv's fields
    /// (`conv_L_cache`, `conv_bias`) are checked against its weight shapes, the MLP's
    /// `w1`/`w3`/`w2` are gate/up/down by the order Transformers calls them, and the plan
    /// verifies on the fixtures. Seeded faults: the kinds swapped (the first layer wants a
    /// conv), the conv's biases dropped, `w1` and `w3` swapped, a kernel the weights do not
    /// have.
    #[test]
    fn a_short_conv_hybrid_is_planned_from_layer_types_and_verifies() {
        let facts = facts("lfm2_moe");
        let plan = super::super::plan::plan(&facts, "lfm2_moe");
        assert!(plan.gaps.is_empty(), "{:?}", plan.gaps);
        let h = plan.hybrid.as_ref().expect("a hybrid plan");
        assert_eq!(
            h.rule,
            AttentionRule::LayerTypes {
                field: "layer_types".to_owned(),
                attending: vec!["full_attention".to_owned()],
                mixing: "conv".to_owned(),
                fallback: None,
            }
        );
        assert_eq!((h.mixer.kind, h.path.as_str()), (Kind::ShortConv, "conv"));
        assert_eq!(
            (h.mixer.field("conv_kernel"), h.mixer.field("conv_bias")),
            ("conv_L_cache", "conv_bias")
        );
        // The block loads the conv under the checkpoint's own name.
        assert!(!plan.renames.iter().any(|(from, _)| from == "conv"));
        for (from, to) in [
            ("feed_forward.w1", "mlp.gate_proj"),
            ("feed_forward.w3", "mlp.up_proj"),
            ("feed_forward.w2", "mlp.down_proj"),
            (
                "feed_forward.expert_bias",
                "mlp.gate.e_score_correction_bias",
            ),
        ] {
            assert!(
                plan.renames.contains(&(from.to_owned(), to.to_owned())),
                "{:?}",
                plan.renames
            );
        }
        let fixtures = fixtures("lfm2_moe");
        let fails = passes_but_not_faulty(&plan, &fixtures);
        // The kinds swapped: layer 0 wants a conv.
        let mut faulty = plan.clone();
        if let Some(h) = faulty.hybrid.as_mut() {
            h.rule = AttentionRule::LayerTypes {
                field: "layer_types".to_owned(),
                attending: vec!["conv".to_owned()],
                mixing: "full_attention".to_owned(),
                fallback: None,
            };
        }
        let failure = fails(&faulty);
        assert!(failure.contains("model.layers.0.conv."), "{failure}");
        // The conv's biases dropped (the switch read from a field no config has): the
        // options fixture's `conv_bias` true leaves them unused.
        let mut faulty = plan.clone();
        if let Some(h) = faulty.hybrid.as_mut() {
            h.mixer
                .roles
                .insert("conv_bias", "no_such_field".to_owned());
        }
        let failure = fails(&faulty);
        assert!(
            failure.contains("lfm2_moe/options") && failure.contains("conv.bias"),
            "{failure}"
        );
        // Gate and up swapped: the dense MLP of layer 0 differs.
        let mut faulty = plan.clone();
        for (from, to) in faulty.renames.iter_mut() {
            match from.as_str() {
                "feed_forward.w1" => *to = "mlp.up_proj".to_owned(),
                "feed_forward.w3" => *to = "mlp.gate_proj".to_owned(),
                _ => {}
            }
        }
        let failure = fails(&faulty);
        assert!(failure.contains("`layers.0`"), "{failure}");

        // A kernel the weights do not have is a gap.
        let mut other = facts.clone();
        other["resolved_config"]["conv_L_cache"] = Value::from(4);
        let wrong = super::super::plan::plan(&other, "lfm2_moe");
        assert!(
            wrong.gaps.iter().any(|g| g.contains("conv.conv.weight")),
            "{:?}",
            wrong.gaps
        );
    }

    /// Asserts that `plan` passes `fixtures` and gives the check for a seeded fault: it
    /// fails them, with the first candidate's failures.
    fn passes_but_not_faulty<'a>(
        plan: &Plan,
        fixtures: &'a [super::super::Fixture],
    ) -> impl Fn(&Plan) -> String + 'a {
        let search = super::super::search(plan, fixtures).expect("search runs");
        assert!(search.chosen.is_some(), "{:?}", search.tried);
        move |faulty: &Plan| {
            let search = super::super::search(faulty, fixtures).expect("search runs");
            assert!(search.chosen.is_none(), "a seeded fault passes");
            search.tried[0].1.join("; ")
        }
    }

    /// Qwen3-Next's gated DeltaNet layers, read from the module tree (`A_log`, `dt_bias`,
    /// `in_proj_qkvz`), their fields checked against the weight shapes; `layer_types`, else
    /// the last layer of every `full_attention_interval` (from the probes of the kinds the
    /// class derives), attends; the attention's output gate read from `q_proj`'s rows. The
    /// plan passes both committed fixtures, and seeded faults fail.
    #[test]
    fn a_gated_delta_net_hybrid_is_planned_and_verifies() {
        let facts = facts("qwen3_next");
        let plan = super::super::plan::plan(&facts, "qwen3_next");
        assert!(plan.gaps.is_empty(), "{:?}", plan.gaps);
        let h = plan.hybrid.as_ref().expect("a hybrid plan");
        assert_eq!(
            h.rule,
            AttentionRule::LayerTypes {
                field: "layer_types".to_owned(),
                attending: vec!["full_attention".to_owned()],
                mixing: "linear_attention".to_owned(),
                fallback: Some(Box::new(AttentionRule::Interval {
                    field: "full_attention_interval".to_owned()
                })),
            }
        );
        assert_eq!(
            (h.mixer.kind, h.path.as_str()),
            (Kind::GatedDeltaNet, "linear_attn")
        );
        assert_eq!(
            (
                h.mixer.field("num_key_heads"),
                h.mixer.field("num_value_heads"),
                h.mixer.field("conv_kernel")
            ),
            (
                "linear_num_key_heads",
                "linear_num_value_heads",
                "linear_conv_kernel_dim"
            )
        );
        assert!(plan.output_gate);
        // `dt_bias` is the block's own, not a bias moved into `in_proj_ba`.
        assert!(
            !plan
                .renames
                .iter()
                .any(|(from, _)| from.contains("dt_bias")),
            "{:?}",
            plan.renames
        );
        let fixtures = fixtures("qwen3_next");
        let fails = passes_but_not_faulty(&plan, &fixtures);
        // The interval not read: the Hub config (interval 3, no `layer_types`) has its
        // attention at layer 2, where no layer would attend.
        let mut faulty = plan.clone();
        if let Some(h) = faulty.hybrid.as_mut() {
            if let AttentionRule::LayerTypes { fallback, .. } = &mut h.rule {
                *fallback = Some(Box::new(AttentionRule::Indices {
                    field: "no_such_field".to_owned(),
                    null_attends: false,
                }));
            }
        }
        let failure = fails(&faulty);
        assert!(failure.contains("qwen3_next/hub"), "{failure}");
        // No output gate: `q_proj` has twice the rows the attention loads.
        let mut faulty = plan.clone();
        faulty.output_gate = false;
        let failure = fails(&faulty);
        assert!(failure.contains("q_proj"), "{failure}");
        // Key and value heads read from each other's fields.
        let mut faulty = plan.clone();
        if let Some(h) = faulty.hybrid.as_mut() {
            h.mixer
                .roles
                .insert("num_key_heads", "linear_num_value_heads".to_owned());
            h.mixer
                .roles
                .insert("num_value_heads", "linear_num_key_heads".to_owned());
        }
        let failure = fails(&faulty);
        assert!(failure.contains("cannot be grouped"), "{failure}");

        // Value heads that do not give the weight shapes are a gap.
        let mut other = facts.clone();
        other["resolved_config"]["linear_num_value_heads"] = Value::from(4);
        let wrong = super::super::plan::plan(&other, "qwen3_next");
        assert!(
            wrong.gaps.iter().any(|g| g.contains("linear_attn.A_log")),
            "{:?}",
            wrong.gaps
        );
        // Qwen3.5's projections stored apart load too.
        let plan = super::super::plan::plan(&self::facts("qwen3_5_text"), "qwen3_5_text");
        assert!(plan.gaps.is_empty(), "{:?}", plan.gaps);
        let default: Vec<_> = super::super::generator_tests::fixtures("qwen3_5_text")
            .into_iter()
            .filter(|f| f.dir.ends_with("default"))
            .collect();
        let search = super::super::search(&plan, &default).expect("search runs");
        assert!(search.chosen.is_some(), "{:?}", search.tried);
    }

    /// LFM2's rule: `layer_types` where a config carries it, else `full_attn_idxs` (all
    /// layers attend when null), each kind by the mixer its tiny layer holds; a kind the
    /// rule does not know resolves to nothing.
    #[test]
    fn a_layer_types_rule_falls_back_to_an_index_list() {
        let facts = serde_json::json!({
            "structure": {"layers": "model.layers"},
            "resolved_config": {"num_hidden_layers": 2},
            "layer_types": ["full_attention", "conv"],
            "parameters": [
                {"name": "model.layers.0.self_attn.q_proj.weight", "shape": [64, 64]},
                {"name": "model.layers.1.conv.conv.weight", "shape": [64, 1, 3]},
                {"name": "model.layers.1.conv.in_proj.weight", "shape": [192, 64]},
                {"name": "model.layers.1.conv.out_proj.weight", "shape": [64, 64]},
            ],
            "hybrid_layers": {
                "rule": "layer_types", "field": "layer_types", "kinds": ["full_attention", "conv"],
                "fallback": {"rule": "indices", "field": "full_attn_idxs", "null_attends": true},
            },
        });
        let rule = AttentionRule::from_facts(&facts).expect("a rule");
        assert_eq!(rule.fields(), ["layer_types", "full_attn_idxs"]);
        let attends = |config: Value, n| rule.attends(&config, n);
        assert_eq!(
            attends(
                serde_json::json!({"layer_types": ["conv", "full_attention", "conv"]}),
                3
            ),
            Some(vec![false, true, false])
        );
        assert_eq!(
            attends(serde_json::json!({"full_attn_idxs": [2]}), 3),
            Some(vec![false, false, true])
        );
        assert_eq!(attends(serde_json::json!({}), 2), Some(vec![true, true]));
        assert_eq!(
            attends(
                serde_json::json!({"layer_types": ["conv", "sliding_attention"]}),
                2
            ),
            None
        );
        // A kind whose tiny layer holds nothing known is no rule.
        let mut unknown = facts.clone();
        unknown["parameters"] = serde_json::json!([
            {"name": "model.layers.0.self_attn.q_proj.weight", "shape": [64, 64]},
            {"name": "model.layers.1.other.weight", "shape": [64, 64]},
        ]);
        assert_eq!(AttentionRule::from_facts(&unknown), None);
    }

    /// RecurrentGemma (Griffin): the layers' kinds from the repeating `block_types`, the
    /// RG-LRU block read from its parameters and its width, gate blocks and conv taps
    /// checked against `lru_width`, `num_attention_heads` and `conv1d_width`; the shared
    /// `temporal_block` path split per attention module; the plan verifies on both
    /// fixtures, and seeded faults fail.
    #[test]
    fn an_rg_lru_hybrid_is_planned_from_its_block_pattern_and_verifies() {
        let facts = facts("recurrent_gemma");
        let plan = super::super::plan::plan(&facts, "recurrent_gemma");
        assert!(plan.gaps.is_empty(), "{:?}", plan.gaps);
        let h = plan.hybrid.as_ref().expect("a hybrid plan");
        assert_eq!(
            h.rule,
            AttentionRule::Cycle {
                field: "block_types".to_owned(),
                attending: vec!["attention".to_owned()],
                mixing: "recurrent".to_owned(),
            }
        );
        // recurrentgemma-2b's pattern over 5 layers.
        let hub = serde_json::json!({"block_types": ["recurrent", "recurrent", "attention"]});
        assert_eq!(
            h.rule.attends(&hub, 5),
            Some(vec![false, false, true, false, false])
        );
        assert_eq!(
            (h.mixer.kind, h.path.as_str()),
            (Kind::RgLru, "temporal_block")
        );
        assert_eq!(
            (
                h.mixer.field("lru_width"),
                h.mixer.field("lru_heads"),
                h.mixer.field("lru_conv_kernel")
            ),
            ("lru_width", "num_attention_heads", "conv1d_width")
        );
        // The attention's modules are renamed one by one; the block keeps its path.
        assert!(!plan
            .renames
            .iter()
            .any(|(from, _)| from == "temporal_block"));
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            let rename = (format!("temporal_block.{m}"), format!("self_attn.{m}"));
            assert!(plan.renames.contains(&rename), "{:?}", plan.renames);
        }
        assert_eq!(plan.intermediate_divisor, Some(2));
        let fixtures = fixtures("recurrent_gemma");
        let search = super::super::search(&plan, &fixtures).expect("search runs");
        let chosen = search.chosen.as_ref().expect("a candidate passes");
        assert_eq!(chosen.embedding_scale, Scalar::SqrtHiddenBf16);

        // The faults are seeded in the chosen candidate, the only one tried.
        let mut plan = plan.clone();
        plan.settle(chosen);
        plan.choices = vec![chosen.clone()];
        let fails = passes_but_not_faulty(&plan, &fixtures);
        // The kinds swapped: layer 0 (recurrent in both fixtures) wants attention.
        let mut faulty = plan.clone();
        if let Some(h) = faulty.hybrid.as_mut() {
            h.rule = AttentionRule::Cycle {
                field: "block_types".to_owned(),
                attending: vec!["recurrent".to_owned()],
                mixing: "attention".to_owned(),
            };
        }
        let failure = fails(&faulty);
        assert!(failure.contains("model.layers.0."), "{failure}");
        // The gate blocks read from the key/value heads (1): the gates' shapes disagree.
        let mut faulty = plan.clone();
        if let Some(h) = faulty.hybrid.as_mut() {
            h.mixer
                .roles
                .insert("lru_heads", "num_key_value_heads".to_owned());
        }
        let failure = fails(&faulty);
        assert!(failure.contains("input_gate_weight"), "{failure}");
        // √hidden not rounded to bfloat16: exact at hidden 64 (8), off at 48 (the hub
        // fixture's 6.928 against 6.9375).
        let mut faulty = plan.clone();
        faulty.choices[0].embedding_scale = Scalar::SqrtHidden;
        let failure = fails(&faulty);
        assert!(
            failure.contains("recurrent_gemma/hub") && failure.contains("embeddings"),
            "{failure}"
        );
        // `temporal_block` renamed whole: the recurrent layers' block becomes `self_attn`.
        let mut faulty = plan.clone();
        faulty
            .renames
            .retain(|(from, _)| !from.starts_with("temporal_block."));
        faulty
            .renames
            .push(("temporal_block".to_owned(), "self_attn".to_owned()));
        let failure = fails(&faulty);
        assert!(failure.contains("temporal_block"), "{failure}");
        // The MLP as wide as `intermediate_size`.
        let mut faulty = plan.clone();
        faulty.intermediate_divisor = None;
        let failure = fails(&faulty);
        assert!(failure.contains("mlp.gate_proj.weight"), "{failure}");

        // Config fields that do not give the weight shapes are gaps.
        for (field, value, culprit) in [
            ("lru_width", 32, "linear_x.weight"),
            ("conv1d_width", 3, "conv_1d.weight"),
            ("num_attention_heads", 3, "do not split"),
        ] {
            let mut other = facts.clone();
            other["resolved_config"][field] = Value::from(value);
            let wrong = super::super::plan::plan(&other, "recurrent_gemma");
            assert!(
                wrong.gaps.iter().any(|g| g.contains(culprit)),
                "{field} {value}: {:?}",
                wrong.gaps
            );
        }
    }
}
