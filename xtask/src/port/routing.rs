//! How a mixture of experts routes, read from what Transformers' router computed.
//!
//! introspect.py records, for a few settings of the routing fields (`routed_scaling_factor`,
//! `n_group`/`topk_group`, each `norm_topk_prob`, each value a string field is compared
//! with), the router's logits, its extra vectors (a score-correction bias) and the experts
//! and weights it chose ([`RoutingProbe`]). [`decide`] finds the simplest rule, in terms of
//! [`mlx_models::moe::RouterSettings`], that reproduces every probe: the routing the block
//! computes is replayed here in f64, so a rule is taken only where the block would choose
//! the same experts with the same weights.

use serde_json::Value;
use std::collections::BTreeMap;

/// What one routing probe recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingProbe {
    /// The fields set for the probe (over the tiny config).
    pub config: BTreeMap<String, Value>,
    /// `[tokens][experts]`.
    pub logits: Vec<Vec<f64>>,
    /// The router's vectors beside its weight (`e_score_correction_bias`).
    pub vectors: BTreeMap<String, Vec<f64>>,
    /// `[tokens][top_k]`, in any order.
    pub indices: Vec<Vec<usize>>,
    pub weights: Vec<Vec<f64>>,
}

/// The probes of `facts["routing_probes"]` that ran (none for facts recorded before them).
pub fn probes(facts: &Value) -> Vec<RoutingProbe> {
    let floats =
        |v: &Value| -> Option<Vec<f64>> { v.as_array()?.iter().map(Value::as_f64).collect() };
    let rows = |v: Option<&Value>| -> Option<Vec<Vec<f64>>> {
        v?.as_array()?.iter().map(floats).collect()
    };
    facts
        .get("routing_probes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|p| p.get("error").is_none())
        .filter_map(|p| {
            Some(RoutingProbe {
                config: p.get("config")?.as_object()?.clone().into_iter().collect(),
                logits: rows(p.get("logits"))?,
                vectors: p
                    .get("vectors")?
                    .as_object()?
                    .iter()
                    .map(|(k, v)| Some((k.clone(), floats(v)?)))
                    .collect::<Option<_>>()?,
                indices: rows(p.get("indices"))?
                    .into_iter()
                    .map(|r| r.into_iter().map(|i| i as usize).collect())
                    .collect(),
                weights: rows(p.get("weights"))?,
            })
        })
        .collect()
}

/// How the experts' scores come from the logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scores {
    Softmax,
    Sigmoid,
    /// Sigmoid weights, the experts chosen by logit plus the bias (Kolibri-1).
    SigmoidBiasOnLogits,
}

/// How a group of experts is scored for the group-limited choice
/// ([`mlx_models::moe::GroupScore`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    Max,
    TopTwoSum,
}

/// Whether a rule holds always, never, or as a config field says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    Never,
    Always,
    Field(String),
}

/// Group-limited choice among `n_group` groups of experts (`topk_group` eligible).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Groups {
    /// The same for every config (`None`: no groups).
    Fixed(Option<GroupScore>),
    /// Chosen by a string field's value (DeepSeek-V2's `topk_method`).
    ByField {
        field: String,
        values: Vec<(String, Option<GroupScore>)>,
    },
}

/// The routing the probes show, as the block computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    pub scores: Scores,
    /// The router's vector added to the scores for choosing (`e_score_correction_bias`).
    pub correction_bias: Option<String>,
    pub groups: Groups,
    /// Renormalize the chosen weights.
    pub normalize: Rule,
    /// The field that multiplies the chosen weights (`routed_scaling_factor`).
    pub scaled_by: Option<String>,
    /// Scores and renormalization chosen by a string field's value instead (Cohere2-MoE's
    /// `expert_selection_fn`: softmax over the top-k logits, or sigmoid renormalized when
    /// `norm_topk_prob`); `scores` and `normalize` are then the first value's.
    pub scores_by: Option<ScoresByField>,
}

/// Scores and renormalization per value of a string field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoresByField {
    pub field: String,
    pub values: Vec<(String, Scores, Rule)>,
}

impl Routing {
    /// One line for the report.
    pub fn describe(&self) -> String {
        let groups = match &self.groups {
            Groups::Fixed(None) => "top-k over all experts".to_owned(),
            Groups::Fixed(Some(g)) => {
                format!("top-k within the `topk_group` best of `n_group` groups (scored by {g:?})")
            }
            Groups::ByField { field, values } => format!(
                "per `{field}`: {}",
                values
                    .iter()
                    .map(|(v, g)| match g {
                        None => format!("`{v}` top-k over all experts"),
                        Some(g) => format!("`{v}` group-limited (groups scored by {g:?})"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        if let Some(by) = &self.scores_by {
            let per: Vec<String> = by
                .values
                .iter()
                .map(|(v, scores, normalize)| {
                    format!(
                        "`{v}` {scores:?} scores renormalized {}",
                        rule_text(normalize)
                    )
                })
                .collect();
            return format!(
                "per `{}`: {}{}, {groups}, {}",
                by.field,
                per.join("; "),
                match &self.correction_bias {
                    Some(b) => format!(", chosen with `{b}` added"),
                    None => String::new(),
                },
                match &self.scaled_by {
                    Some(f) => format!("weights times `{f}`"),
                    None => "weights unscaled".to_owned(),
                }
            );
        }
        format!(
            "{} scores{}, {groups}, renormalized {}, {}",
            match self.scores {
                Scores::SigmoidBiasOnLogits => "Sigmoid",
                Scores::Softmax => "Softmax",
                Scores::Sigmoid => "Sigmoid",
            },
            match (&self.correction_bias, self.scores) {
                (Some(b), Scores::SigmoidBiasOnLogits) => {
                    format!(" chosen by logit with `{b}` added")
                }
                (Some(b), _) => format!(" chosen with `{b}` added"),
                (None, _) => String::new(),
            },
            rule_text(&self.normalize),
            match &self.scaled_by {
                Some(f) => format!("weights times `{f}`"),
                None => "weights unscaled".to_owned(),
            }
        )
    }
}

fn rule_text(rule: &Rule) -> String {
    match rule {
        Rule::Never => "never".to_owned(),
        Rule::Always => "always".to_owned(),
        Rule::Field(f) => format!("when `{f}`"),
    }
}

/// One probe's settings under a rule, as [`mlx_models::moe::Router::route`] reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Settings {
    scores: Scores,
    bias: bool,
    groups: Option<(GroupScore, usize, usize)>,
    normalize: bool,
    scale: f64,
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// The indices of the `k` largest, best first.
fn top_k(x: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
    order.truncate(k);
    order
}

/// `x` with the experts outside the `top` best of `groups` groups set to `masked`.
fn mask_groups(x: &[f64], score: GroupScore, groups: usize, top: usize, masked: f64) -> Vec<f64> {
    if groups <= 1 || top >= groups || !x.len().is_multiple_of(groups) {
        return x.to_vec();
    }
    let size = x.len() / groups;
    let scores: Vec<f64> = x
        .chunks(size)
        .map(|g| match score {
            GroupScore::Max => g.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            GroupScore::TopTwoSum => top_k(g, 2).iter().map(|&i| g[i]).sum(),
        })
        .collect();
    let kept = top_k(&scores, top);
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            if kept.contains(&(i / size)) {
                v
            } else {
                masked
            }
        })
        .collect()
}

/// The experts and weights the block chooses for one token.
fn route(logits: &[f64], bias: Option<&[f64]>, s: Settings, k: usize) -> Vec<(usize, f64)> {
    let with_bias = |x: &[f64]| -> Vec<f64> {
        match bias.filter(|_| s.bias) {
            Some(b) => x.iter().zip(b).map(|(v, b)| v + b).collect(),
            None => x.to_vec(),
        }
    };
    let chosen: Vec<(usize, f64)> = match s.scores {
        Scores::Softmax if s.normalize && !(s.bias && bias.is_some()) => {
            let indices = top_k(logits, k);
            let picked: Vec<f64> = indices.iter().map(|&i| logits[i]).collect();
            indices.into_iter().zip(softmax(&picked)).collect()
        }
        Scores::Softmax => {
            let mut probs = softmax(logits);
            if let Some((g, n, top)) = s.groups {
                probs = mask_groups(&probs, g, n, top, 0.0);
            }
            let picked: Vec<(usize, f64)> = top_k(&with_bias(&probs), k)
                .into_iter()
                .map(|i| (i, probs[i]))
                .collect();
            let sum: f64 = picked.iter().map(|p| p.1).sum();
            picked
                .into_iter()
                .map(|(i, w)| (i, if s.normalize { w / sum } else { w }))
                .collect()
        }
        Scores::Sigmoid | Scores::SigmoidBiasOnLogits => {
            let scores: Vec<f64> = logits.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
            // The bias joins the scores, or (Kolibri-1) the logits, for the choice alone.
            let mut choice = if s.scores == Scores::Sigmoid {
                with_bias(&scores)
            } else {
                with_bias(logits)
            };
            if let Some((g, n, top)) = s.groups {
                choice = mask_groups(&choice, g, n, top, f64::NEG_INFINITY);
            }
            let picked: Vec<(usize, f64)> = top_k(&choice, k)
                .into_iter()
                .map(|i| (i, scores[i]))
                .collect();
            let sum: f64 = picked.iter().map(|p| p.1).sum::<f64>() + 1e-20;
            picked
                .into_iter()
                .map(|(i, w)| (i, if s.normalize { w / sum } else { w }))
                .collect()
        }
    };
    chosen.into_iter().map(|(i, w)| (i, w * s.scale)).collect()
}

/// How far a probe's recorded weights may be from the replay: Transformers routes in f32.
const WEIGHT_TOLERANCE: f64 = 1e-5;

/// Whether the block, with `s`, chooses the probe's experts with its weights.
fn reproduces(p: &RoutingProbe, s: Settings) -> bool {
    let bias = p.vectors.values().next().map(Vec::as_slice);
    if s.bias && bias.is_none() {
        return false;
    }
    p.logits
        .iter()
        .zip(&p.indices)
        .zip(&p.weights)
        .all(|((l, idx), w)| {
            let mut got = route(l, bias, s, idx.len());
            let mut want: Vec<(usize, f64)> = idx.iter().copied().zip(w.iter().copied()).collect();
            got.sort_by_key(|p| p.0);
            want.sort_by_key(|p| p.0);
            got.len() == want.len()
                && got.iter().zip(&want).all(|(a, b)| {
                    a.0 == b.0 && (a.1 - b.1).abs() <= WEIGHT_TOLERANCE * b.1.abs().max(1.0)
                })
        })
}

fn value_f64(p: &RoutingProbe, facts: &Value, name: &str) -> Option<f64> {
    p.config
        .get(name)
        .or_else(|| facts.get("resolved_config")?.get(name))
        .and_then(Value::as_f64)
}

fn value_bool(p: &RoutingProbe, facts: &Value, name: &str) -> Option<bool> {
    p.config
        .get(name)
        .or_else(|| facts.get("resolved_config")?.get(name))
        .and_then(Value::as_bool)
}

/// The simplest routing that reproduces every probe (`Ok(None)` where there are none), or
/// why none does.
pub fn decide(facts: &Value) -> Result<Option<Routing>, String> {
    let probes = probes(facts);
    if probes.is_empty() {
        return Ok(None);
    }
    let bias_name = probes[0].vectors.keys().next().cloned();
    // The string fields the probes vary, with their values in probe order.
    let mut strings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in &probes {
        for (k, v) in &p.config {
            if let Some(v) = v.as_str() {
                let values = strings.entry(k.clone()).or_default();
                if !values.iter().any(|x| x == v) {
                    values.push(v.to_owned());
                }
            }
        }
    }
    let options = [None, Some(GroupScore::Max), Some(GroupScore::TopTwoSum)];
    let mut group_rules: Vec<Groups> = options.iter().map(|&g| Groups::Fixed(g)).collect();
    for (field, values) in &strings {
        // Every assignment of a group option to each value.
        let mut assignments: Vec<Vec<(String, Option<GroupScore>)>> = vec![Vec::new()];
        for v in values {
            assignments = assignments
                .into_iter()
                .flat_map(|a| {
                    options.iter().map(move |&g| {
                        let mut a = a.clone();
                        a.push((v.clone(), g));
                        a
                    })
                })
                .collect();
        }
        group_rules.extend(assignments.into_iter().map(|values| Groups::ByField {
            field: field.clone(),
            values,
        }));
    }
    let normalize_rules = [
        Rule::Never,
        Rule::Field("norm_topk_prob".to_owned()),
        Rule::Always,
    ];
    // The factor on the chosen weights, under the name the probes set (AFMoE's
    // `route_scale`).
    let scale_field = [
        "routed_scaling_factor",
        "route_scale",
        "router_scaling_factor",
    ]
    .into_iter()
    .find(|f| probes.iter().any(|p| p.config.contains_key(*f)))
    .unwrap_or("routed_scaling_factor");
    for scores in [
        Scores::Softmax,
        Scores::Sigmoid,
        Scores::SigmoidBiasOnLogits,
    ] {
        for bias in [None, bias_name.clone()] {
            if bias.is_some() && bias_name.is_none() {
                continue;
            }
            for groups in &group_rules {
                for normalize in &normalize_rules {
                    for scaled_by in [None, Some(scale_field.to_owned())] {
                        let fits = probes.iter().all(|p| {
                            let normalize = match normalize {
                                Rule::Never => Some(false),
                                Rule::Always => Some(true),
                                Rule::Field(f) => value_bool(p, facts, f),
                            };
                            let group = match groups {
                                Groups::Fixed(g) => Some(*g),
                                Groups::ByField { field, values } => {
                                    let v = p.config.get(field).and_then(Value::as_str);
                                    values
                                        .iter()
                                        .find(|(x, _)| Some(x.as_str()) == v)
                                        .map(|x| x.1)
                                }
                            };
                            let sizes = (
                                value_f64(p, facts, "n_group"),
                                value_f64(p, facts, "topk_group"),
                            );
                            let groups = match (group, sizes) {
                                (Some(None), _) => Some(None),
                                (Some(Some(g)), (Some(n), Some(t))) => {
                                    Some(Some((g, n as usize, t as usize)))
                                }
                                _ => None,
                            };
                            let scale = match &scaled_by {
                                None => Some(1.0),
                                Some(f) => value_f64(p, facts, f),
                            };
                            match (normalize, groups, scale) {
                                (Some(normalize), Some(groups), Some(scale)) => reproduces(
                                    p,
                                    Settings {
                                        scores,
                                        bias: bias.is_some(),
                                        groups,
                                        normalize,
                                        scale,
                                    },
                                ),
                                _ => false,
                            }
                        });
                        if fits {
                            return Ok(Some(Routing {
                                scores,
                                correction_bias: bias,
                                groups: groups.clone(),
                                normalize: normalize.clone(),
                                scaled_by,
                                scores_by: None,
                            }));
                        }
                    }
                }
            }
        }
    }
    // Scores and renormalization per value of a string field (over all experts).
    for (field, values) in &strings {
        for bias in [None, bias_name.clone()] {
            for scaled_by in [None, Some(scale_field.to_owned())] {
                let mut per = Vec::new();
                for v in values {
                    let of_value: Vec<&RoutingProbe> = probes
                        .iter()
                        .filter(|p| p.config.get(field).and_then(Value::as_str) == Some(v))
                        .collect();
                    let fit = [
                        Scores::Softmax,
                        Scores::Sigmoid,
                        Scores::SigmoidBiasOnLogits,
                    ]
                    .into_iter()
                    .flat_map(|s| normalize_rules.iter().map(move |n| (s, n.clone())))
                    .find(|(scores, normalize)| {
                        of_value.iter().all(|p| {
                            let normalize = match normalize {
                                Rule::Never => Some(false),
                                Rule::Always => Some(true),
                                Rule::Field(f) => value_bool(p, facts, f),
                            };
                            let scale = match &scaled_by {
                                None => Some(1.0),
                                Some(f) => value_f64(p, facts, f),
                            };
                            match (normalize, scale) {
                                (Some(normalize), Some(scale)) => reproduces(
                                    p,
                                    Settings {
                                        scores: *scores,
                                        bias: bias.is_some(),
                                        groups: None,
                                        normalize,
                                        scale,
                                    },
                                ),
                                _ => false,
                            }
                        })
                    });
                    match fit {
                        Some((scores, normalize)) => per.push((v.clone(), scores, normalize)),
                        None => break,
                    }
                }
                if per.len() == values.len() {
                    let (_, scores, normalize) = per[0].clone();
                    return Ok(Some(Routing {
                        scores,
                        correction_bias: bias,
                        groups: Groups::Fixed(None),
                        normalize,
                        scaled_by,
                        scores_by: Some(ScoresByField {
                            field: field.clone(),
                            values: per,
                        }),
                    }));
                }
            }
        }
    }
    Err(format!(
        "the router's choices in {} probes match no routing the block computes (softmax or \
         sigmoid scores, correction bias, group-limited top-k, renormalization, scaling, each \
         fixed or per value of a string field)",
        probes.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probes as a router records them: `pick` gives each token's experts and weights from
    /// its logits, for the probe's config.
    fn facts(configs: &[Value], pick: impl Fn(&Value, &[f64]) -> Vec<(usize, f64)>) -> Value {
        let probes: Vec<Value> = configs
            .iter()
            .enumerate()
            .map(|(n, config)| {
                // Distinct logits per token and probe, no ties.
                let logits: Vec<Vec<f64>> = (0..4)
                    .map(|t| {
                        (0..8)
                            .map(|e| (((e * 7 + t * 3 + n * 5) % 11) as f64 - 5.0) * 0.37 + 0.01 * e as f64)
                            .collect()
                    })
                    .collect();
                let picked: Vec<Vec<(usize, f64)>> =
                    logits.iter().map(|l| pick(config, l)).collect();
                serde_json::json!({
                    "config": config,
                    "logits": logits,
                    "vectors": {},
                    "indices": picked.iter().map(|p| p.iter().map(|x| x.0).collect::<Vec<_>>()).collect::<Vec<_>>(),
                    "weights": picked.iter().map(|p| p.iter().map(|x| x.1).collect::<Vec<_>>()).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({"routing_probes": probes, "resolved_config": {}})
    }

    /// Cohere2-MoE's router: softmax over the top-k logits, or sigmoid scores renormalized
    /// when `norm_topk_prob`, by `expert_selection_fn`.
    fn cohere2_moe(config: &Value, logits: &[f64]) -> Vec<(usize, f64)> {
        let top = top_k(logits, 2);
        let picked: Vec<f64> = top.iter().map(|&i| logits[i]).collect();
        let weights = if config["expert_selection_fn"] == "softmax" {
            softmax(&picked)
        } else {
            let s: Vec<f64> = picked.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
            let sum: f64 = s.iter().sum();
            if config["norm_topk_prob"] == true {
                s.iter().map(|v| v / sum).collect()
            } else {
                s
            }
        };
        top.into_iter().zip(weights).collect()
    }

    fn configs() -> Vec<Value> {
        let mut out = Vec::new();
        for f in ["softmax", "sigmoid"] {
            for norm in [false, true] {
                out.push(serde_json::json!({"expert_selection_fn": f, "norm_topk_prob": norm}));
            }
        }
        out
    }

    #[test]
    fn scores_that_a_string_field_chooses_are_read_per_value() {
        let routing = decide(&facts(&configs(), cohere2_moe))
            .expect("a routing fits")
            .expect("probes ran");
        assert_eq!(
            routing.scores_by,
            Some(ScoresByField {
                field: "expert_selection_fn".into(),
                values: vec![
                    ("softmax".into(), Scores::Softmax, Rule::Always),
                    (
                        "sigmoid".into(),
                        Scores::Sigmoid,
                        Rule::Field("norm_topk_prob".into())
                    ),
                ],
            })
        );
        assert_eq!(
            (routing.groups, routing.scaled_by, routing.correction_bias),
            (Groups::Fixed(None), None, None)
        );
        // One rule for all values: plain softmax top-k renormalized fits every probe.
        let softmax_only = decide(&facts(&configs(), |_, l| {
            cohere2_moe(&serde_json::json!({"expert_selection_fn": "softmax"}), l)
        }))
        .expect("a routing fits")
        .expect("probes ran");
        assert_eq!(
            (
                softmax_only.scores,
                softmax_only.normalize,
                softmax_only.scores_by
            ),
            (Scores::Softmax, Rule::Always, None)
        );
        // Seeded fault: sigmoid weights halved — no routing the block computes fits.
        let halved = facts(&configs(), |c, l| {
            let picked = cohere2_moe(c, l);
            if c["expert_selection_fn"] == "sigmoid" {
                picked.into_iter().map(|(i, w)| (i, w / 2.0)).collect()
            } else {
                picked
            }
        });
        assert!(decide(&halved).is_err());
    }

    /// ERNIE 4.5's router: softmax over every expert, the top-k of probability plus a
    /// routing bias chosen, their probabilities renormalized. A bias large enough to change
    /// the choice makes plain softmax top-k fail, so only the biased rule fits.
    #[test]
    fn a_softmax_router_with_a_routing_bias_renormalizes_the_chosen_probabilities() {
        let bias: Vec<f64> = (0..8)
            .map(|e| if e % 3 == 0 { 0.6 } else { -0.2 })
            .collect();
        let ernie = |logits: &[f64], renormalize: bool| -> Vec<(usize, f64)> {
            let probs = softmax(logits);
            let biased: Vec<f64> = probs.iter().zip(&bias).map(|(p, b)| p + b).collect();
            let top = top_k(&biased, 2);
            let sum: f64 = top.iter().map(|&i| probs[i]).sum();
            top.into_iter()
                .map(|i| {
                    (
                        i,
                        if renormalize {
                            probs[i] / sum
                        } else {
                            probs[i] + bias[i]
                        },
                    )
                })
                .collect()
        };
        let with_bias = |renormalize: bool| {
            let mut f = facts(&[serde_json::json!({})], |_, l| ernie(l, renormalize));
            f["routing_probes"][0]["vectors"] =
                serde_json::json!({"moe_statics.e_score_correction_bias": bias});
            f
        };
        let routing = decide(&with_bias(true))
            .expect("a routing fits")
            .expect("probes ran");
        assert_eq!(
            (routing.scores, routing.normalize, routing.correction_bias),
            (
                Scores::Softmax,
                Rule::Always,
                Some("moe_statics.e_score_correction_bias".to_owned())
            )
        );
        // Seeded fault: the bias added to the weights too — no routing fits.
        assert!(decide(&with_bias(false)).is_err());
    }
}
