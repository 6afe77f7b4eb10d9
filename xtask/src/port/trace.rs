//! What Transformers computes in decoder layer 0, read from the order of its module calls
//! and which output fed which input (`introspect.py`'s call trace, with a checksum of each
//! module's first input and its output): the role of every norm, whatever its name.
//!
//! - A norm of the layer called before attention normalizes the attention's input; one
//!   called between attention and MLP on the attention's output normalizes that output
//!   (sandwich and post-norm blocks), on anything else the MLP's input; one called after
//!   the MLP on its output normalizes that output.
//! - A norm inside attention fed `q_proj`'s output is the query norm, fed `k_proj`'s the
//!   key norm; fed the same values rotated (equal sum of squares, another sum) it runs
//!   after RoPE.
//!
//! Each role has the name the shared blocks load; the plan renames the checkpoint's norms
//! to them and the generated module's `sanitize` does the same.

use serde_json::Value;

/// One module call of the trace.
#[derive(Debug, Clone)]
pub struct Event {
    pub enter: bool,
    pub module: String,
    pub class: String,
    /// Sum and sum of squares of the input (enter) or output (exit).
    pub checksum: Option<[f64; 2]>,
}

/// The trace recorded in `facts`, empty when the facts predate it.
pub fn events(facts: &Value) -> Vec<Event> {
    let Some(list) = facts.get("call_trace").and_then(Value::as_array) else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| {
            let enter = e.get("event")?.as_str()? == "enter";
            let sum = e.get(if enter { "input" } else { "output" })?;
            let checksum = sum
                .as_array()
                .and_then(|a| Some([a.first()?.as_f64()?, a.get(1)?.as_f64()?]));
            Some(Event {
                enter,
                module: e.get("module")?.as_str()?.to_owned(),
                class: e.get("class")?.as_str()?.to_owned(),
                checksum,
            })
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1.0)
}

/// What the trace says about the layer's norms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NormRoles {
    /// Checkpoint name (under the layer) → the name the shared blocks load, for every norm
    /// whose name differs.
    pub renames: Vec<(String, String)>,
    /// The query/key norms run after RoPE.
    pub qk_after_rope: bool,
    /// The layer's output is its last norm's, which normalizes the MLP's residual sum
    /// (post-norm on the residual: OpenAI GPT's `ln_2(h + mlp(h))`).
    pub post_residual: bool,
}

/// The layer's attention block when it is not called `self_attn`: the first module
/// directly under the layer whose class is an attention (GPT-2's `attn`, GPT-NeoX's
/// `attention`); where that one only calls another attention (GPT-Neo's `attn` wraps
/// `attn.attention`, which holds the projections), the inner one.
pub fn attention_block(events: &[Event]) -> Option<String> {
    let mut block = events
        .iter()
        .find(|e| e.enter && !e.module.contains('.') && e.class.contains("Attention"))?
        .module
        .clone();
    loop {
        let prefix = format!("{block}.");
        let calls: Vec<&Event> = events
            .iter()
            .filter(|e| {
                e.enter
                    && e.module
                        .strip_prefix(&prefix)
                        .is_some_and(|tail| !tail.contains('.'))
            })
            .collect();
        match calls.as_slice() {
            [inner] if inner.class.contains("Attention") => block = inner.module.clone(),
            _ => break,
        }
    }
    Some(block).filter(|m| !m.is_empty() && m != "self_attn")
}

/// The layer's MLP block when it is not called `mlp` and the layer has none of that name:
/// the first module directly under the layer, called after attention returns, that is no
/// norm and either is an MLP by its class (MPT's `ffn`, an `MptMLP`) or calls exactly two
/// projections (CTRL's `ffn`, a `Sequential` of a linear layer, an activation and another).
pub fn mlp_block(events: &[Event]) -> Option<String> {
    if events.iter().any(|e| e.enter && e.module == "mlp") {
        return None;
    }
    let attention = attention_block(events).unwrap_or_else(|| "self_attn".to_owned());
    let after = events
        .iter()
        .position(|e| !e.enter && e.module == attention)?;
    events[after..]
        .iter()
        .filter(|e| {
            e.enter
                && !e.module.is_empty()
                && !e.module.contains('.')
                && !e.class.to_lowercase().contains("norm")
                && !e.class.contains("Dropout")
        })
        .find(|block| {
            let prefix = format!("{}.", block.module);
            block.class.to_uppercase().ends_with("MLP")
                || events
                    .iter()
                    .filter(|e| {
                        e.enter
                            && PROJECTIONS.contains(&e.class.as_str())
                            && e.module.starts_with(&prefix)
                    })
                    .count()
                    == 2
        })
        .map(|e| e.module.clone())
}

/// The norms' roles (and the projections' and the attention block's names), from the
/// calls of layer 0. An attention block under another name is read as `self_attn` (an MLP
/// block under another name as `mlp`) and renamed last, after the renames of the modules
/// inside it.
pub fn norm_roles(events: &[Event]) -> NormRoles {
    let Some(mlp) = mlp_block(events) else {
        return attention_roles(events);
    };
    let renamed: Vec<Event> = events
        .iter()
        .map(|e| Event {
            module: mlx_models::weights::rename_prefix(&e.module, &[(&mlp, "mlp")]),
            ..e.clone()
        })
        .collect();
    let mut roles = attention_roles(&renamed);
    for (from, _) in &mut roles.renames {
        if let Some(tail) = from.strip_prefix("mlp.") {
            *from = format!("{mlp}.{tail}");
        }
    }
    roles.renames.push((mlp, "mlp".to_owned()));
    roles
}

/// [`norm_roles`] of a layer whose MLP block is `mlp` (or none).
fn attention_roles(events: &[Event]) -> NormRoles {
    let Some(block) = attention_block(events) else {
        return block_roles(events);
    };
    let renamed: Vec<Event> = events
        .iter()
        .map(|e| Event {
            module: mlx_models::weights::rename_prefix(&e.module, &[(&block, "self_attn")]),
            ..e.clone()
        })
        .collect();
    let mut roles = block_roles(&renamed);
    for (from, _) in &mut roles.renames {
        if let Some(tail) = from.strip_prefix("self_attn.") {
            *from = format!("{block}.{tail}");
        }
    }
    roles.renames.push((block, "self_attn".to_owned()));
    roles
}

/// [`norm_roles`] of a layer whose attention block is `self_attn`.
fn block_roles(events: &[Event]) -> NormRoles {
    let position = |module: &str, enter: bool| {
        events
            .iter()
            .position(|e| e.module == module && e.enter == enter)
    };
    let output = |module: &str| {
        events
            .iter()
            .find(|e| e.module == module && !e.enter)
            .and_then(|e| e.checksum)
    };
    let is_norm = |e: &Event| e.class.to_lowercase().contains("norm");
    let mut roles = NormRoles::default();
    let (Some(attn_in), Some(attn_out)) =
        (position("self_attn", true), position("self_attn", false))
    else {
        return roles;
    };
    let mlp_in = position("mlp", true);
    let mlp_out = position("mlp", false);
    let attn_output = output("self_attn");
    let mlp_output = output("mlp");
    let layer_output = output("");
    let fed_by = |input: Option<[f64; 2]>, out: Option<[f64; 2]>| match (input, out) {
        (Some(i), Some(o)) => close(i[0], o[0]) && close(i[1], o[1]),
        _ => false,
    };
    // Layer-level norms, by where they run.
    let mut layer_norms: Vec<(String, &'static str)> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if !e.enter || !is_norm(e) || e.module.contains('.') || e.module.is_empty() {
            continue;
        }
        let role = if i < attn_in {
            "pre_attention"
        } else if i > attn_out && mlp_in.is_none_or(|m| i < m) {
            if fed_by(e.checksum, attn_output) {
                "post_attention"
            } else {
                "pre_mlp"
            }
        } else if mlp_out.is_some_and(|m| i > m) && fed_by(e.checksum, mlp_output) {
            "post_mlp"
        } else if mlp_out.is_some_and(|m| i > m) && fed_by(layer_output, output(&e.module)) {
            // Fed the residual sum, and what the layer returns.
            roles.post_residual = true;
            "post_mlp"
        } else {
            continue;
        };
        layer_norms.push((e.module.clone(), role));
    }
    let has = |role: &str| layer_norms.iter().any(|(_, r)| *r == role);
    let sandwich = has("post_attention") && has("pre_mlp");
    for (name, role) in &layer_norms {
        let canonical = match *role {
            "pre_attention" => "input_layernorm",
            "post_attention" => "post_attention_layernorm",
            "pre_mlp" if sandwich => "pre_feedforward_layernorm",
            "pre_mlp" => "post_attention_layernorm",
            _ => "post_feedforward_layernorm",
        };
        if name != canonical {
            roles.renames.push((name.clone(), canonical.to_owned()));
        }
    }
    // Query and key norms inside attention, by what fed them.
    let q = output("self_attn.q_proj");
    let k = output("self_attn.k_proj");
    for e in events.iter().filter(|e| e.enter && is_norm(e)) {
        let Some(local) = e.module.strip_prefix("self_attn.") else {
            continue;
        };
        let Some(input) = e.checksum else { continue };
        let target = [(q, "q_norm"), (k, "k_norm")]
            .into_iter()
            .find(|(out, _)| out.is_some_and(|o| close(o[1], input[1])));
        if let Some((out, canonical)) = target {
            if !close(out.expect("found above")[0], input[0]) {
                // The same values, rotated: RoPE ran first.
                roles.qk_after_rope = true;
            }
            if local != canonical {
                roles.renames.push((
                    format!("self_attn.{local}"),
                    format!("self_attn.{canonical}"),
                ));
            }
        }
    }
    linear_roles(events, &mut roles.renames);
    roles
}

/// The classes of projections: `nn.Linear`, and GPT-2's `Conv1D` (the same with its weight
/// transposed).
pub const PROJECTIONS: [&str; 2] = ["Linear", "Conv1D"];

/// A linear projection: `Linear`, `Conv1D`, or a subclass of `Linear` named so (Falcon's
/// `FalconLinear`).
pub fn is_projection(class: &str) -> bool {
    PROJECTIONS.contains(&class) || class.ends_with("Linear")
}

/// The projections whose names the blocks do not know, by the order Transformers calls
/// them: the last linear layer of attention is its output projection, and when there is
/// one other, it is the fused q/k/v projection (GPT-2's `c_attn`, GPT-NeoX's
/// `query_key_value`); an MLP of two linear layers is up (first) and down (second).
fn linear_roles(events: &[Event], renames: &mut Vec<(String, String)>) {
    let linears = |block: &str| -> Vec<String> {
        let prefix = format!("{block}.");
        events
            .iter()
            .filter(|e| e.enter && is_projection(&e.class))
            .filter_map(|e| e.module.strip_prefix(&prefix).map(str::to_owned))
            .collect()
    };
    let attention = linears("self_attn");
    let known_attention = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"];
    if let [first, _] = attention.as_slice() {
        if !known_attention.contains(&first.as_str()) {
            renames.push((
                format!("self_attn.{first}"),
                "self_attn.qkv_proj".to_owned(),
            ));
        }
    }
    // Three projections of the attention's input, then the output projection (CTRL's
    // `Wq`, `Wk`, `Wv`, `dense`): query, key and value in the order they are called (the
    // fixtures tell a swap).
    if let [q, k, v, _] = attention.as_slice() {
        let input = |name: &str| {
            let module = format!("self_attn.{name}");
            events
                .iter()
                .find(|e| e.enter && e.module == module)
                .and_then(|e| e.checksum)
        };
        let same_input = input(q).is_some() && input(q) == input(k) && input(k) == input(v);
        if same_input
            && ![q, k, v]
                .iter()
                .any(|n| known_attention.contains(&n.as_str()))
        {
            for (from, to) in [(q, "q_proj"), (k, "k_proj"), (v, "v_proj")] {
                renames.push((format!("self_attn.{from}"), format!("self_attn.{to}")));
            }
        }
    }
    if let Some(last) = attention.last() {
        if !known_attention.contains(&last.as_str()) && attention.len() >= 2 {
            renames.push((format!("self_attn.{last}"), "self_attn.o_proj".to_owned()));
        }
    }
    let mlp = linears("mlp");
    // Names the MLP blocks read already (GLM-4's fused `gate_up_proj` is two linears too).
    let known_mlp = [
        "gate_proj",
        "up_proj",
        "down_proj",
        "gate_up_proj",
        "c_fc",
        "c_proj",
    ];
    if let [first, second] = mlp.as_slice() {
        if !mlp.iter().any(|n| known_mlp.contains(&n.as_str())) {
            renames.push((format!("mlp.{first}"), "mlp.up_proj".to_owned()));
            renames.push((format!("mlp.{second}"), "mlp.down_proj".to_owned()));
        }
    }
    // Three directly under the MLP, the first two on its input and the third on what they
    // make (LFM2's `w1`, `w3`, `w2`; not DeepSeek's `shared_experts.*` of an MoE block):
    // gate, up and down in the order they are called, as Llama's MLP calls them (the
    // fixtures tell a swap).
    if let [gate, up, down] = mlp.as_slice() {
        let input = |name: &str| {
            let module = format!("mlp.{name}");
            events
                .iter()
                .find(|e| e.enter && e.module == module)
                .and_then(|e| e.checksum)
        };
        if input(gate).is_some()
            && input(gate) == input(up)
            && input(up) != input(down)
            && !mlp
                .iter()
                .any(|n| known_mlp.contains(&n.as_str()) || n.contains('.'))
        {
            for (from, to) in [(gate, "gate_proj"), (up, "up_proj"), (down, "down_proj")] {
                renames.push((format!("mlp.{from}"), format!("mlp.{to}")));
            }
        }
    }
    // Two linear layers called by the layer itself, outside attention and with no MLP
    // module (BioGPT's and OPT's `fc1`, `fc2`): the MLP's up and down.
    let direct: Vec<&str> = events
        .iter()
        .filter(|e| e.enter && is_projection(&e.class))
        .map(|e| e.module.as_str())
        .filter(|m| !m.is_empty() && !m.contains('.'))
        .collect();
    if let ([first, second], true) = (direct.as_slice(), mlp.is_empty()) {
        renames.push(((*first).to_owned(), "mlp.up_proj".to_owned()));
        renames.push(((*second).to_owned(), "mlp.down_proj".to_owned()));
    }
}

/// Whether the shared blocks account for the module `name` (under a layer, after the
/// plan's renames) of class `class`: the norms, projections and q/k norms they load, the
/// activations they compute, and modules that compute nothing at inference (dropout).
pub fn covered(name: &str, class: &str) -> bool {
    const BLOCKS: [&str; 18] = [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "self_attn",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.qkv_proj",
        "self_attn.o_proj",
        "self_attn.q_norm",
        "self_attn.k_norm",
        "mlp",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "mlp.gate_up_proj",
        "mlp.c_fc",
    ];
    const ACTIVATIONS: [&str; 8] = [
        "SiLU",
        "SiLUActivation",
        "GELUActivation",
        "NewGELUActivation",
        "GELUTanh",
        "PytorchGELUTanh",
        "ReLU",
        "ReLUSquaredActivation",
    ];
    // A mixture of experts ([`mlx_models::moe::SparseMoe`]): router, experts, shared expert.
    const EXPERTS: [&str; 7] = [
        "mlp.gate",
        "mlp.experts",
        "mlp.shared_expert",
        "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.up_proj",
        "mlp.shared_expert.down_proj",
        "mlp.shared_expert_gate",
    ];
    // Multi-head latent attention ([`mlx_models::mla::LatentAttention`]).
    const LATENT: [&str; 6] = [
        "self_attn.q_a_proj",
        "self_attn.q_a_layernorm",
        "self_attn.q_b_proj",
        "self_attn.kv_a_proj_with_mqa",
        "self_attn.kv_a_layernorm",
        "self_attn.kv_b_proj",
    ];
    BLOCKS.contains(&name)
        || EXPERTS.contains(&name)
        || LATENT.contains(&name)
        || name == "mlp.c_proj"
        || class.contains("Dropout")
        || class.contains("Rotary")
        || (ACTIVATIONS.contains(&class)
            && (name.starts_with("mlp.") || name.starts_with("self_attn.")))
}

/// The config name of the activation a module of class `class` computes (the activation
/// modules [`covered`] accepts).
pub fn activation_of_class(class: &str) -> Option<&'static str> {
    Some(match class {
        "SiLU" | "SiLUActivation" => "silu",
        "GELUActivation" => "gelu",
        "NewGELUActivation" | "GELUTanh" | "PytorchGELUTanh" => "gelu_pytorch_tanh",
        "ReLU" => "relu",
        "ReLUSquaredActivation" => "relu2",
        _ => return None,
    })
}

/// The model's final norm when it is not named `model.norm`: the norm module directly
/// under `model.` (the facts' module list).
pub fn final_norm_rename(facts: &Value) -> Option<(String, String)> {
    let modules = facts.get("modules")?.as_array()?;
    modules.iter().find_map(|m| {
        let name = m.get("name")?.as_str()?;
        let class = m.get("class")?.as_str()?;
        let local = name.strip_prefix("model.")?;
        (!local.contains('.') && local != "norm" && class.to_lowercase().contains("norm"))
            .then(|| (name.to_owned(), "model.norm".to_owned()))
    })
}

/// `name` with the module paths under `model.layers.{i}.` renamed by `renames`: what the
/// generated module's `sanitize` does ([`mlx_models::weights::rename_layer_module`]).
pub fn rename(name: &str, renames: &[(String, String)]) -> String {
    let pairs: Vec<(&str, &str)> = renames
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    mlx_models::weights::rename_layer_module(name, &pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(enter: bool, module: &str, class: &str, sum: [f64; 2]) -> Event {
        Event {
            enter,
            module: module.to_owned(),
            class: class.to_owned(),
            checksum: Some(sum),
        }
    }

    /// OpenAI GPT's layer as Transformers runs it: each norm on a residual sum, the layer
    /// returning the last norm's output (post-residual); a pre-norm layer that ends in a
    /// norm on its MLP's output is no such thing.
    #[test]
    fn norms_on_the_residual_sums_are_post_residual() {
        let trace = [
            event(true, "", "Block", [1.0, 2.0]),
            event(true, "attn", "Attention", [1.0, 2.0]),
            event(true, "attn.c_attn", "Conv1D", [1.0, 2.0]),
            event(false, "attn.c_attn", "Conv1D", [3.0, 4.0]),
            event(true, "attn.c_proj", "Conv1D", [3.0, 4.0]),
            event(false, "attn.c_proj", "Conv1D", [5.0, 6.0]),
            event(false, "attn", "Attention", [5.0, 6.0]),
            event(true, "ln_1", "LayerNorm", [6.0, 8.0]),
            event(false, "ln_1", "LayerNorm", [0.0, 64.0]),
            event(true, "mlp", "MLP", [0.0, 64.0]),
            event(false, "mlp", "MLP", [7.0, 9.0]),
            event(true, "ln_2", "LayerNorm", [7.0, 73.0]),
            event(false, "ln_2", "LayerNorm", [0.1, 63.0]),
            event(false, "", "Block", [0.1, 63.0]),
        ];
        let roles = norm_roles(&trace);
        assert!(roles.post_residual);
        let renamed = |from: &str, to: &str| {
            roles
                .renames
                .iter()
                .any(|(a, b)| a.as_str() == from && b.as_str() == to)
        };
        assert!(renamed("ln_1", "post_attention_layernorm"));
        assert!(renamed("ln_2", "post_feedforward_layernorm"));
        // The layer returns the residual sum, not the norm's output: no role for `ln_2`.
        let mut pre = trace.to_vec();
        pre[13] = event(false, "", "Block", [7.0, 73.0]);
        let roles = norm_roles(&pre);
        assert!(!roles.post_residual);
        assert!(!roles.renames.iter().any(|(a, _)| a.as_str() == "ln_2"));
    }

    /// GLM-4's layer as Transformers runs it: a norm after attention on its output, one
    /// before the MLP on the residual sum, one after the MLP on its output.
    #[test]
    fn glm4_norms_are_a_sandwich_under_other_names() {
        let trace = [
            event(true, "input_layernorm", "Glm4RMSNorm", [1.0, 2.0]),
            event(false, "input_layernorm", "Glm4RMSNorm", [3.0, 4.0]),
            event(true, "self_attn", "Glm4Attention", [3.0, 4.0]),
            event(false, "self_attn", "Glm4Attention", [5.0, 6.0]),
            event(true, "post_self_attn_layernorm", "Glm4RMSNorm", [5.0, 6.0]),
            event(false, "post_self_attn_layernorm", "Glm4RMSNorm", [7.0, 8.0]),
            event(true, "post_attention_layernorm", "Glm4RMSNorm", [9.0, 10.0]),
            event(
                false,
                "post_attention_layernorm",
                "Glm4RMSNorm",
                [11.0, 12.0],
            ),
            event(true, "mlp", "Glm4MLP", [11.0, 12.0]),
            event(false, "mlp", "Glm4MLP", [13.0, 14.0]),
            event(true, "post_mlp_layernorm", "Glm4RMSNorm", [13.0, 14.0]),
            event(false, "post_mlp_layernorm", "Glm4RMSNorm", [15.0, 16.0]),
        ];
        let roles = norm_roles(&trace);
        let map: Vec<(&str, &str)> = roles
            .renames
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            map,
            [
                ("post_self_attn_layernorm", "post_attention_layernorm"),
                ("post_attention_layernorm", "pre_feedforward_layernorm"),
                ("post_mlp_layernorm", "post_feedforward_layernorm"),
            ]
        );
        // Renaming is simultaneous: one name's new name is another's old one.
        let r = &roles.renames;
        assert_eq!(
            rename("model.layers.3.post_attention_layernorm.weight", r),
            "model.layers.3.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            rename("model.layers.3.post_self_attn_layernorm.weight", r),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(
            rename("model.layers.3.input_layernorm.weight", r),
            "model.layers.3.input_layernorm.weight"
        );
    }

    /// Phi's projections: attention's last linear layer (`dense`) is its output, the MLP's
    /// two (`fc1`, `fc2`) are up and down; StarCoder 2's `c_fc`/`c_proj` stay.
    #[test]
    fn projections_are_named_by_the_order_transformers_calls_them() {
        let call = |m: &str, class: &str| event(true, m, class, [0.0, 0.0]);
        let trace = [
            call("input_layernorm", "LayerNorm"),
            call("self_attn", "PhiAttention"),
            call("self_attn.q_proj", "Linear"),
            call("self_attn.k_proj", "Linear"),
            call("self_attn.v_proj", "Linear"),
            call("self_attn.dense", "Linear"),
            event(false, "self_attn", "PhiAttention", [1.0, 1.0]),
            call("mlp", "PhiMLP"),
            call("mlp.fc1", "Linear"),
            call("mlp.fc2", "Linear"),
            event(false, "mlp", "PhiMLP", [2.0, 2.0]),
        ];
        let pairs = |r: &NormRoles| -> Vec<(String, String)> { r.renames.clone() };
        assert_eq!(
            pairs(&norm_roles(&trace)),
            [
                ("self_attn.dense".to_owned(), "self_attn.o_proj".to_owned()),
                ("mlp.fc1".to_owned(), "mlp.up_proj".to_owned()),
                ("mlp.fc2".to_owned(), "mlp.down_proj".to_owned()),
            ]
        );
        let mut starcoder = trace.clone();
        starcoder[5].module = "self_attn.o_proj".to_owned();
        starcoder[8].module = "mlp.c_fc".to_owned();
        starcoder[9].module = "mlp.c_proj".to_owned();
        assert!(norm_roles(&starcoder).renames.is_empty());
        // GLM-4's fused gated MLP is two linears under names the blocks know.
        let mut glm4 = starcoder.clone();
        glm4[8].module = "mlp.gate_up_proj".to_owned();
        glm4[9].module = "mlp.down_proj".to_owned();
        assert!(norm_roles(&glm4).renames.is_empty());
        assert_eq!(
            rename(
                "model.final_layernorm.bias",
                &[("model.final_layernorm".to_owned(), "model.norm".to_owned())]
            ),
            "model.norm.bias"
        );
    }

    #[test]
    fn what_the_blocks_account_for() {
        assert!(covered("mlp.act_fn", "SiLUActivation"));
        assert!(covered("resid_dropout", "Dropout"));
        assert!(covered("self_attn.q_norm", "Qwen3RMSNorm"));
        assert!(!covered("mlp.act_fn", "XIELUActivation"));
        assert!(!covered(
            "self_attn.q_layernorm",
            "StableLmLayerNormPerHead"
        ));
    }

    /// Hunyuan's query/key norms: fed q_proj's and k_proj's values after RoPE (the same
    /// sum of squares, another sum).
    #[test]
    fn query_and_key_norms_after_rope_are_found_by_what_fed_them() {
        let trace = [
            event(true, "input_layernorm", "RMSNorm", [1.0, 2.0]),
            event(false, "input_layernorm", "RMSNorm", [3.0, 4.0]),
            event(true, "self_attn", "Attention", [3.0, 4.0]),
            event(false, "self_attn.q_proj", "Linear", [2.14671, 694.474843]),
            event(false, "self_attn.k_proj", "Linear", [-6.893695, 216.566107]),
            event(
                true,
                "self_attn.query_layernorm",
                "RMSNorm",
                [-0.742732, 694.474843],
            ),
            event(
                true,
                "self_attn.key_layernorm",
                "RMSNorm",
                [8.835106, 216.566113],
            ),
            event(false, "self_attn", "Attention", [5.0, 6.0]),
            event(true, "post_attention_layernorm", "RMSNorm", [9.0, 10.0]),
            event(true, "mlp", "MLP", [11.0, 12.0]),
            event(false, "mlp", "MLP", [13.0, 14.0]),
        ];
        let roles = norm_roles(&trace);
        assert!(roles.qk_after_rope);
        assert_eq!(
            roles.renames,
            [
                (
                    "self_attn.query_layernorm".to_owned(),
                    "self_attn.q_norm".to_owned()
                ),
                (
                    "self_attn.key_layernorm".to_owned(),
                    "self_attn.k_norm".to_owned()
                ),
            ]
        );
        // Fed before RoPE: the same sums.
        let mut before = trace.clone();
        before[5].checksum = Some([2.14671, 694.474843]);
        before[6].checksum = Some([-6.893695, 216.566107]);
        assert!(!norm_roles(&before).qk_after_rope);
    }

    /// An attention that only wraps another (GPT-Neo's `attn` around `attn.attention`)
    /// stands for the inner one, which holds the projections.
    #[test]
    fn a_wrapping_attention_is_read_through() {
        let trace = [
            event(true, "ln_1", "LayerNorm", [1.0, 2.0]),
            event(false, "ln_1", "LayerNorm", [3.0, 4.0]),
            event(true, "attn", "GPTNeoAttention", [3.0, 4.0]),
            event(true, "attn.attention", "GPTNeoSelfAttention", [3.0, 4.0]),
            event(true, "attn.attention.q_proj", "Linear", [3.0, 4.0]),
            event(false, "attn.attention.q_proj", "Linear", [5.0, 6.0]),
            event(true, "attn.attention.out_proj", "Linear", [7.0, 8.0]),
            event(false, "attn.attention.out_proj", "Linear", [9.0, 10.0]),
            event(false, "attn.attention", "GPTNeoSelfAttention", [9.0, 10.0]),
            event(false, "attn", "GPTNeoAttention", [9.0, 10.0]),
        ];
        assert_eq!(attention_block(&trace).as_deref(), Some("attn.attention"));
        // An attention with projections of its own is the block itself (GPT-2's `attn`).
        let gpt2 = [
            event(true, "attn", "GPT2Attention", [3.0, 4.0]),
            event(true, "attn.c_attn", "Conv1D", [3.0, 4.0]),
            event(false, "attn.c_attn", "Conv1D", [5.0, 6.0]),
            event(true, "attn.c_proj", "Conv1D", [7.0, 8.0]),
            event(false, "attn.c_proj", "Conv1D", [9.0, 10.0]),
            event(false, "attn", "GPT2Attention", [9.0, 10.0]),
        ];
        assert_eq!(attention_block(&gpt2).as_deref(), Some("attn"));
        let roles = norm_roles(&trace);
        assert_eq!(
            roles.renames.last(),
            Some(&("attn.attention".to_owned(), "self_attn".to_owned()))
        );
    }
}
