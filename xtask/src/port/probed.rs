//! Decisions read from what Transformers computes when one config field changes: a
//! nullable epsilon that switches the norms' kind (`null_norm_probes`), how a block joins
//! its shared expert to the routed experts (`shared_expert_probes`), and which layers a
//! per-layer list besides `layer_types` gives RoPE (`layer_rope_probes`). Each takes the
//! recorded facts and says what the module computes, or a gap.

use serde_json::Value;

/// A nullable epsilon field whose null changes the norms (Cohere2-MoE's `rms_norm_eps`:
/// RMSNorm where set, LayerNorm of `layer_norm_eps` where null).
#[derive(Debug, Clone, PartialEq)]
pub struct NullNorm {
    /// The nullable field (the plan's epsilon field).
    pub field: String,
    /// The norms when it is null: `Some(bias)` LayerNorm, `None` RMSNorm.
    pub layer_norm: Option<bool>,
    /// The field their epsilon comes from then.
    pub eps_field: String,
}

/// The null probe of `eps_field`, where its null changes the norms the plan reads
/// (`layer_norm`: `Some(bias)` LayerNorm, `None` RMSNorm, where the field is set). A probe
/// of another field, a set side that is not the plan's norms, or a null side whose epsilon
/// no field gives is a gap.
pub fn null_norm(
    facts: &Value,
    eps_field: &str,
    layer_norm: Option<bool>,
    gaps: &mut Vec<String>,
) -> Option<NullNorm> {
    let probes = facts.get("null_norm_probes")?.as_array()?;
    let kind = |side: &Value| -> Option<Option<bool>> {
        let bias = side.get("bias").and_then(Value::as_bool).unwrap_or(false);
        match side.get("kind").and_then(Value::as_str)? {
            "layer" => Some(Some(bias)),
            "rms" if !bias => Some(None),
            _ => None,
        }
    };
    let mut found = None;
    for probe in probes {
        let field = probe.get("field").and_then(Value::as_str).unwrap_or("?");
        let (set, null) = (&probe["set"], &probe["null"]);
        if field != eps_field {
            gaps.push(format!(
                "a null `{field}` changes the norms, and the module reads its epsilon from `{eps_field}`"
            ));
            continue;
        }
        if kind(set) != Some(layer_norm) {
            gaps.push(format!(
                "with `{field}` set the norms are {set}, not the ones the plan reads"
            ));
            continue;
        }
        let (Some(null_kind), Some(null_eps)) =
            (kind(null), null.get("eps_field").and_then(Value::as_str))
        else {
            gaps.push(format!(
                "a null `{field}` makes the norms {null}: no block or no epsilon field for them"
            ));
            continue;
        };
        found = Some(NullNorm {
            field: field.to_owned(),
            layer_norm: null_kind,
            eps_field: null_eps.to_owned(),
        });
    }
    found
}

/// How a block joins its shared expert's output to the routed experts'
/// ([`mlx_models::moe::SharedJoin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    Sum,
    Average,
}

/// The shared expert's join: the same for every config, or per value of a string field
/// (Cohere2-MoE's `shared_expert_combination_strategy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedJoin {
    Fixed(Join),
    ByField {
        field: String,
        values: Vec<(String, Join)>,
    },
}

/// The join the shared-expert probes measured: each probe's fit `a · routed + b · shared`
/// read as a sum (1, 1) or an average (0.5, 0.5); a join that changes with one string field
/// is per value of it. Another fit, or joins that change with two fields, is a gap. None
/// where nothing was probed (the block's sum).
pub fn shared_join(facts: &Value, gaps: &mut Vec<String>) -> Option<SharedJoin> {
    let probes = facts.get("shared_expert_probes")?.as_array()?;
    let join = |p: &Value| {
        let coefficient = |k: &str| p.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let (routed, shared) = (coefficient("routed"), coefficient("shared"));
        let residual = coefficient("residual");
        let near = |x: f64, y: f64| (x - y).abs() < 1e-3;
        // A NaN residual (nothing recorded) is no fit either.
        if residual.is_nan() || residual >= 1e-4 {
            None
        } else if near(routed, 1.0) && near(shared, 1.0) {
            Some(Join::Sum)
        } else if near(routed, 0.5) && near(shared, 0.5) {
            Some(Join::Average)
        } else {
            None
        }
    };
    let mut default = None;
    let mut by_field: Vec<(String, Vec<(String, Join)>)> = Vec::new();
    for probe in probes {
        let Some(j) = join(probe) else {
            gaps.push(format!(
                "the shared expert joins the routed experts as {} routed + {} shared (residual {}): \
                 neither a sum nor an average",
                probe["routed"], probe["shared"], probe["residual"]
            ));
            return None;
        };
        let config = probe.get("config").and_then(Value::as_object);
        match config.and_then(|c| c.iter().next()) {
            None => default = Some(j),
            Some((field, value)) => {
                let value = value.as_str().unwrap_or_default().to_owned();
                match by_field.iter_mut().find(|(f, _)| f == field) {
                    Some((_, values)) => values.push((value, j)),
                    None => by_field.push((field.clone(), vec![(value, j)])),
                }
            }
        }
    }
    let default = default?;
    let changing: Vec<_> = by_field
        .into_iter()
        .filter(|(_, values)| values.iter().any(|(_, j)| *j != default))
        .collect();
    match changing.as_slice() {
        [] => Some(SharedJoin::Fixed(default)),
        [(field, values)] => Some(SharedJoin::ByField {
            field: field.clone(),
            values: values.clone(),
        }),
        more => {
            let names: Vec<&str> = more.iter().map(|(f, _)| f.as_str()).collect();
            gaps.push(format!(
                "the shared expert's join changes with several fields: {names:?}"
            ));
            None
        }
    }
}

/// Full-attention layers that rotate by a kind of another per-layer list (Cohere2-MoE's
/// dense layers, `mlp_layer_types`), while an int field keeps its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRope {
    pub list_field: String,
    /// The kind whose full-attention layers rotate too (`dense`).
    pub kind: String,
    /// `(field, value)`: only while this field has this value (its default); another
    /// value leaves them without RoPE.
    pub while_field: Option<(String, i64)>,
}

/// What the layer RoPE probe adds to "RoPE on the sliding-window layers only": None where
/// the probed layers rotate exactly where they slide (or nothing was probed); else the kind
/// of the list whose full-attention layers rotate, and the int field whose other value
/// takes that away. A rotation no such rule gives is a gap.
pub fn list_rope(facts: &Value, gaps: &mut Vec<String>) -> Option<ListRope> {
    let probe = facts.get("layer_rope_probes").filter(|p| !p.is_null())?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let bools = |v: &Value| -> Vec<bool> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_bool)
            .collect()
    };
    let list_field = probe.get("list_field")?.as_str()?.to_owned();
    let attention = strings(&probe["layer_types"]);
    let kinds = strings(&probe[list_field.as_str()]);
    let rotates = bools(&probe["rotates"]);
    let sliding: Vec<bool> = attention.iter().map(|a| a == "sliding_attention").collect();
    if rotates == sliding || rotates.len() != kinds.len() {
        return None;
    }
    let extra: Vec<&String> = (0..rotates.len())
        .filter(|&i| rotates[i] && !sliding[i])
        .map(|i| &kinds[i])
        .collect();
    let kind = extra.first().map(|k| (*k).clone());
    let rule = |with: bool| -> Vec<bool> {
        (0..kinds.len())
            .map(|i| sliding[i] || with && Some(&kinds[i]) == kind.as_ref())
            .collect()
    };
    if kind.is_none() || rule(true) != rotates {
        gaps.push(format!(
            "RoPE reaches layers {rotates:?} of layer_types {attention:?} and {list_field} {kinds:?}: \
             neither the sliding-window layers only nor those and one kind of `{list_field}`"
        ));
        return None;
    }
    let mut while_field = None;
    for entry in probe
        .get("fields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let field = entry.get("field").and_then(Value::as_str).unwrap_or("?");
        let default = facts
            .pointer(&format!("/config_fields/{field}/default"))
            .and_then(Value::as_i64);
        if bools(&entry["rotates"]) == rule(false) && while_field.is_none() && default.is_some() {
            while_field = default.map(|d| (field.to_owned(), d));
        } else {
            gaps.push(format!(
                "`{field}` {} changes which layers RoPE reaches to {}",
                entry["value"], entry["rotates"]
            ));
            return None;
        }
    }
    Some(ListRope {
        list_field,
        kind: kind.unwrap_or_default(),
        while_field,
    })
}

/// Hub keys the config class reads from its keyword arguments and derives per-layer lists
/// from where a config leaves them out (the facts' `layer_list_kwargs`: Cohere2-MoE's
/// `first_k_dense_replace` sets `layer_types` and `mlp_layer_types`), which the module does
/// not read unless the tool read them as a layer rule (`legacy_fields`): `(key, default,
/// lists)`, each refused with another value unless its lists are given.
pub fn derived_list_keys(
    facts: &Value,
    decisions: &mut Vec<String>,
) -> Vec<(String, i64, Vec<String>)> {
    let Some(keys) = facts.get("layer_list_kwargs").and_then(Value::as_object) else {
        return Vec::new();
    };
    let read = facts.get("legacy_fields").and_then(Value::as_object);
    let mut refused = Vec::new();
    for (key, entry) in keys {
        if read.is_some_and(|r| r.contains_key(key)) {
            continue;
        }
        let (Some(default), Some(lists)) = (
            entry.get("default").and_then(Value::as_i64),
            entry.get("lists").and_then(Value::as_array),
        ) else {
            continue;
        };
        let lists: Vec<String> = lists
            .iter()
            .filter_map(|l| l.as_str().map(str::to_owned))
            .collect();
        decisions.push(format!(
            "`{key}` (Hub configs) makes the class derive {lists:?}: other values than {default} \
             refused unless those lists are given"
        ));
        refused.push((key.clone(), default, lists));
    }
    refused
}

/// The field that sets the width of the dense layers' MLP alone (the facts'
/// `kind_width_probes`: Cohere2-MoE's `prefix_dense_intermediate_size`, whose null is
/// `intermediate_size`): one whose probe widened exactly the `gate_proj`/`up_proj`/
/// `down_proj` of the layers of `kind` (`dense`). A field that widens other parameters of
/// those layers is a gap.
pub fn kind_width_field(facts: &Value, kind: &str, gaps: &mut Vec<String>) -> Option<String> {
    let probe = facts.get("kind_width_probes").filter(|p| !p.is_null())?;
    let kinds: Vec<&str> = probe
        .get("kinds")
        .and_then(Value::as_array)?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut found = None;
    for entry in probe
        .get("fields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let field = entry.get("field").and_then(Value::as_str).unwrap_or("?");
        let widened: Vec<&str> = entry
            .get("widened")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let mut projections: Vec<&str> = widened
            .iter()
            .filter_map(|n| in_layer_of_kind(n, &kinds, kind))
            .collect();
        projections.sort_unstable();
        if projections.len() == widened.len()
            && projections
                == [
                    "mlp.down_proj.weight",
                    "mlp.gate_proj.weight",
                    "mlp.up_proj.weight",
                ]
        {
            found = Some(field.to_owned());
        } else if !projections.is_empty() {
            gaps.push(format!(
                "`{field}` widens {widened:?} of the `{kind}` layers: not their MLP alone"
            ));
        }
    }
    found
}

/// The rest of `name` (`mlp.up_proj.weight`) where it is a parameter of a layer whose
/// kind in `kinds` is `kind`.
fn in_layer_of_kind<'a>(name: &'a str, kinds: &[&str], kind: &str) -> Option<&'a str> {
    let (layer, rest) = name.strip_prefix("model.layers.")?.split_once('.')?;
    (*kinds.get(layer.parse::<usize>().ok()?)? == kind).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Cohere2-MoE's probes as `introspect.py` recorded them (Transformers 5.23).
    fn cohere2_moe() -> Value {
        json!({
            "config_fields": {"prefix_dense_sliding_window_pattern": {"default": 1}},
            "null_norm_probes": [{
                "field": "rms_norm_eps",
                "set": {"kind": "rms", "eps": 3e-05, "bias": false, "eps_field": "rms_norm_eps"},
                "null": {"kind": "layer", "eps": 2e-05, "bias": false, "eps_field": "layer_norm_eps"}
            }],
            "shared_expert_probes": [
                {"config": {}, "routed": 0.5, "shared": 0.5, "residual": 6.1e-08},
                {"config": {"expert_selection_fn": "sigmoid"}, "routed": 0.5, "shared": 0.5, "residual": 6.1e-08},
                {"config": {"shared_expert_combination_strategy": "sum"}, "routed": 1.0, "shared": 1.0, "residual": 1.2e-07},
                {"config": {"shared_expert_combination_strategy": "average"}, "routed": 0.5, "shared": 0.5, "residual": 6.1e-08}
            ],
            "layer_rope_probes": {
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
                "mlp_layer_types": ["sparse", "dense", "sparse", "dense"],
                "list_field": "mlp_layer_types",
                "rotates": [true, true, false, true],
                "fields": [{"field": "prefix_dense_sliding_window_pattern", "value": 2, "rotates": [true, true, false, false]}]
            }
        })
    }

    #[test]
    fn a_null_rms_norm_eps_is_layer_norm_of_layer_norm_eps() {
        let mut gaps = Vec::new();
        let found = null_norm(&cohere2_moe(), "rms_norm_eps", None, &mut gaps);
        assert_eq!(
            found,
            Some(NullNorm {
                field: "rms_norm_eps".into(),
                layer_norm: Some(false),
                eps_field: "layer_norm_eps".into()
            })
        );
        assert!(gaps.is_empty(), "{gaps:?}");
        // A plan that reads LayerNorms where the field is set disagrees with the probe.
        assert_eq!(
            null_norm(&cohere2_moe(), "rms_norm_eps", Some(false), &mut gaps),
            None
        );
        assert_eq!(gaps.len(), 1);
    }

    #[test]
    fn the_shared_join_follows_its_string_field() {
        let mut gaps = Vec::new();
        let found = shared_join(&cohere2_moe(), &mut gaps);
        assert_eq!(
            found,
            Some(SharedJoin::ByField {
                field: "shared_expert_combination_strategy".into(),
                values: vec![("sum".into(), Join::Sum), ("average".into(), Join::Average)],
            })
        );
        // A fit that is neither (a gated shared expert's) is a gap.
        let mut facts = cohere2_moe();
        facts["shared_expert_probes"][2]["shared"] = json!(0.73);
        assert_eq!(shared_join(&facts, &mut gaps), None);
        assert_eq!(gaps.len(), 1, "{gaps:?}");
    }

    #[test]
    fn the_dense_layers_width_is_their_own_field() {
        let mut facts = cohere2_moe();
        let widened = |layer: usize| {
            ["down_proj", "gate_proj", "up_proj"]
                .map(|p| format!("model.layers.{layer}.mlp.{p}.weight"))
                .to_vec()
        };
        facts["kind_width_probes"] = json!({
            "list_field": "mlp_layer_types",
            "kinds": ["sparse", "dense"],
            "fields": [{"field": "prefix_dense_intermediate_size", "widened": widened(1)}]
        });
        let mut gaps = Vec::new();
        assert_eq!(
            kind_width_field(&facts, "dense", &mut gaps).as_deref(),
            Some("prefix_dense_intermediate_size")
        );
        assert!(gaps.is_empty());
        // Widening the sparse layer's projections is no width of the dense ones.
        facts["kind_width_probes"]["fields"][0]["widened"] = json!(widened(0));
        assert_eq!(kind_width_field(&facts, "dense", &mut gaps), None);
    }

    #[test]
    fn a_hub_key_deriving_layer_lists_is_refused_unless_read() {
        let mut facts = cohere2_moe();
        facts["layer_list_kwargs"] = json!({
            "first_k_dense_replace": {"default": 0, "lists": ["layer_types", "mlp_layer_types"]}
        });
        let mut decisions = Vec::new();
        assert_eq!(
            derived_list_keys(&facts, &mut decisions),
            vec![(
                "first_k_dense_replace".to_owned(),
                0,
                vec!["layer_types".to_owned(), "mlp_layer_types".to_owned()]
            )]
        );
        // A key the tool reads as a layer rule (ModernBERT's period) is not refused.
        facts["legacy_fields"] = json!({"first_k_dense_replace": 0});
        assert!(derived_list_keys(&facts, &mut decisions).is_empty());
    }

    #[test]
    fn dense_layers_rotate_while_the_prefix_pattern_is_one() {
        let mut gaps = Vec::new();
        assert_eq!(
            list_rope(&cohere2_moe(), &mut gaps),
            Some(ListRope {
                list_field: "mlp_layer_types".into(),
                kind: "dense".into(),
                while_field: Some(("prefix_dense_sliding_window_pattern".into(), 1)),
            })
        );
        assert!(gaps.is_empty(), "{gaps:?}");
        // Rotating where they slide: nothing to add.
        let mut facts = cohere2_moe();
        facts["layer_rope_probes"]["rotates"] = json!([true, true, false, false]);
        assert_eq!(list_rope(&facts, &mut gaps), None);
        assert!(gaps.is_empty());
        // Every full-attention layer rotating too is no rule of one kind.
        facts["layer_rope_probes"]["rotates"] = json!([true, true, true, true]);
        assert_eq!(list_rope(&facts, &mut gaps), None);
        assert_eq!(gaps.len(), 1, "{gaps:?}");
    }
}
