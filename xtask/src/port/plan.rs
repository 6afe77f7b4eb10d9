//! From what Transformers says about a model type (`introspect.py`'s facts) to a plan: which
//! shared blocks, which config fields drive them, what is still undecided (tried against
//! the fixtures) and what no known block can express (gaps).

pub use mlx_models::family::LayerRule;
use serde_json::Value;
use std::collections::BTreeMap;

/// A boolean setting: fixed, or read from a config field.
#[derive(Debug, Clone, PartialEq)]
pub enum Flag {
    Never,
    Always,
    Field(String),
}

/// An optional scalar setting (a scale or a cap).
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    None,
    /// The field's value.
    Field(String),
    /// `field^-0.5` (Gemma's `query_pre_attn_scalar`).
    InvSqrtField(String),
    /// `1 / field` (Granite's `logits_scaling`).
    InvField(String),
    /// `√hidden_size` (Gemma's embedding normalizer).
    SqrtHidden,
    /// `√hidden_size` rounded to bfloat16 (RecurrentGemma's normalizer, a bfloat16 buffer).
    SqrtHiddenBf16,
    /// `field / √num_hidden_layers` (MiniCPM's depth-scaled residual branches, `scale_depth`).
    FieldOverSqrtLayers(String),
    /// `field / hidden_size` (MiniCPM's width-scaled logits, `dim_model_base`).
    FieldOverHidden(String),
    /// 1: attention scores not scaled at all (GPT-Neo).
    One,
    /// 1 where the boolean field is false, else the default (GPT-2's `scale_attn_weights`).
    OneUnless(String),
    /// `√hidden_size` where the boolean field has the value, else none (AFMoE's
    /// `mup_enabled`).
    SqrtHiddenWhen(String, bool),
}

/// How many RoPE variants the layers use.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeRule {
    /// One RoPE for every layer (`traditional` chosen by the fixtures).
    Uniform,
    /// One per layer type; sliding layers' base from `local_base` in Hub configs.
    PerLayerType { local_base: Option<String> },
}

/// Layers without RoPE.
#[derive(Debug, Clone, PartialEq)]
pub struct NoRope {
    pub flags_field: String,
    pub interval_field: Option<String>,
}

/// The choices the structure leaves open; each is tried against the fixtures.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// RMSNorm weights stored as an offset from one.
    pub norm_plus_one: bool,
    /// RoPE on the sliding-window layers only (Cohere 2); the full ones have none.
    pub rope_sliding_only: bool,
    pub embedding_scale: Scalar,
    pub rope_traditional: bool,
    pub norm_placement: mlx_models::transformer::NormPlacement,
    /// Read a config's exact `gelu` as the tanh approximation (Gemma's legacy value).
    pub gelu_as_tanh: bool,
    /// Apply the attention soft cap the config names (some families declare it and
    /// never apply it).
    pub attention_softcap: bool,
    /// Renormalize the chosen experts' weights to sum to one, where no config field says
    /// (a mixture of experts without `norm_topk_prob`).
    pub moe_normalize: bool,
    /// Where the boolean field is true, this placement instead of `norm_placement`
    /// (GPT-NeoX's `use_parallel_residual`): a flag that changes the model, tried as the
    /// switch between two placements the structure allows.
    pub placement_when: Option<(String, mlx_models::transformer::NormPlacement)>,
}

impl Choice {
    pub fn describe(&self) -> String {
        format!(
            "norm {}, embedding scale {}, RoPE {}{}, norms {:?}{}{}",
            if self.norm_plus_one {
                "x·(1+w)"
            } else {
                "x·w"
            },
            match &self.embedding_scale {
                Scalar::None => "none".to_owned(),
                Scalar::SqrtHidden => "√hidden_size".to_owned(),
                Scalar::SqrtHiddenBf16 => "√hidden_size in bfloat16".to_owned(),
                other => format!("{other:?}"),
            },
            if self.rope_traditional {
                "interleaved pairs"
            } else {
                "halves"
            },
            if self.rope_sliding_only {
                " on sliding layers only"
            } else {
                ""
            },
            self.norm_placement,
            if self.gelu_as_tanh {
                ", `gelu` read as tanh GELU"
            } else {
                ""
            },
            if self.attention_softcap {
                ", attention soft cap applied"
            } else {
                ""
            }
        ) + if self.moe_normalize {
            ", experts' weights renormalized"
        } else {
            ""
        } + &match &self.placement_when {
            Some((field, placement)) => format!(", norms {placement:?} where `{field}`"),
            None => String::new(),
        }
    }
}

/// A sparse mixture-of-experts feed-forward ([`mlx_models::moe::SparseMoe`]): a router
/// linear layer `mlp.gate` over stacked experts (`mlp.experts.gate_up_proj`/`down_proj`, or
/// one module per expert), softmax top-k, maybe a shared expert.
#[derive(Debug, Clone, PartialEq)]
pub struct MoePlan {
    /// Hub checkpoints' names → Transformers' (substrings, in order), from Transformers'
    /// checkpoint conversion (Mixtral's `.block_sparse_moe.` → `.mlp.`, GraniteMoE's
    /// `block_sparse_moe.input_linear.weight` → `block_sparse_moe.experts.gate_up_proj`).
    pub checkpoint_renames: Vec<(String, String)>,
    /// The Hub checkpoints' name of each expert projection → the name the blocks load
    /// (`w1` → `gate_proj`), from Transformers' checkpoint conversion.
    pub projections: Vec<(String, String)>,
    /// A shared expert beside the routed ones: `Some(gated)`, gated when its output is
    /// scaled by `sigmoid(shared_expert_gate(x))`.
    pub shared_expert: Option<bool>,
    /// Biases on the shared expert's projections (ERNIE 4.5's `use_bias`, from the flag
    /// probes).
    pub shared_expert_bias: Flag,
    /// The config field that renormalizes the chosen experts' weights (`norm_topk_prob`);
    /// without one, the fixtures decide ([`Choice::moe_normalize`]).
    pub normalize_field: Option<String>,
    /// The config has fields that keep some layers dense (`decoder_sparse_step`,
    /// `mlp_only_layers`, `first_k_dense_replace`).
    pub dense_layers: bool,
    /// The routing Transformers' router computed (the routing probes), where they were
    /// recorded: softmax top-k, renormalized as `normalize_field` says, without them.
    pub routing: Option<super::routing::Routing>,
    /// The layers' kinds come from `mlp_layer_types`; without the list, the first `.0`
    /// layers are dense (the list Transformers derives).
    pub layer_types_dense_prefix: Option<usize>,
    /// How the shared expert joins the routed experts, where the probes measured it
    /// (None: their sum).
    pub shared_join: Option<super::probed::SharedJoin>,
    /// The full-attention layers of a kind of `mlp_layer_types` rotate too (Cohere2-MoE's
    /// dense layers), where the layer RoPE probe says so.
    pub list_rope: Option<super::probed::ListRope>,
    /// The field that sets the dense layers' MLP width, null meaning `intermediate_size`
    /// (Cohere2-MoE's `prefix_dense_intermediate_size`).
    pub dense_width_field: Option<String>,
}

/// The config fields [`mlx_models::family::MoeConfig`] reads (aliases included).
pub const MOE_FIELDS: &[&str] = &[
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_topk",
    "moe_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "moe_layer_interval",
    "mlp_only_layers",
    "first_k_dense_replace",
    "moe_layer_start_index",
    "moe_layer_end_index",
    "num_dense_layers",
    "shared_expert_intermediate_size",
    "shared_intermediate_size",
    "n_shared_experts",
    "num_shared_experts",
    "moe_num_shared_experts",
    "routed_scaling_factor",
    "route_scale",
    "router_scaling_factor",
    "n_group",
    "topk_group",
    "mlp_layer_types",
];

/// Multi-head latent attention ([`mlx_models::mla::LatentAttention`]): a low-rank query
/// (`q_a_proj`, `q_a_layernorm`, `q_b_proj`; or `q_proj`), one compressed latent and RoPE key
/// per token (`kv_a_proj_with_mqa`, `kv_a_layernorm`), expanded per head by `kv_b_proj`.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaPlan {
    /// The config names whether RoPE rotates adjacent pairs (`rope_interleave`); without
    /// it the fixtures decide ([`Choice::rope_traditional`]).
    pub interleave_field: bool,
}

/// The config fields [`mlx_models::family::MlaConfig`] reads.
pub const MLA_FIELDS: &[&str] = &[
    "kv_lora_rank",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "rope_interleave",
];

/// A config field the module reads, with its Rust type and Transformers' default.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: String,
    pub ty: FieldType,
    pub default: Value,
    /// Whether config.json may set it to null.
    pub nullable: bool,
    /// What the module does with it (for the report and the doc comment).
    pub role: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldType {
    I32,
    Usize,
    F64,
    Bool,
    Str,
    LayerTypes,
    IntList,
    FloatList,
    /// A list of names (RecurrentGemma's `block_types`).
    StrList,
}

impl Field {
    /// `Option<…>` when the field may be null (or is by default).
    pub fn optional(&self) -> bool {
        self.nullable || self.default.is_null()
    }
}

/// Everything the generator decided, and why.
#[derive(Debug, Clone)]
pub struct Plan {
    pub model_type: String,
    /// The RoPE base Transformers uses when a config gives none.
    pub default_theta: f64,
    pub module: String,
    pub architecture: String,
    pub config_class: String,
    pub transformers_version: String,
    pub fields: Vec<Field>,
    pub qkv_fused: bool,
    pub qkv_bias: Flag,
    pub o_bias: Flag,
    pub qk_norm: mlx_models::transformer::QkNorm,
    pub mlp_layout: mlx_models::transformer::MlpLayout,
    pub mlp_bias: Flag,
    /// The feed-forward of (the sparse) layers is a mixture of experts.
    pub moe: Option<MoePlan>,
    /// The attention is multi-head latent attention.
    pub mla: Option<MlaPlan>,
    /// Every layer is a norm and a recurrent mixer (Mamba, Mamba2), no attention.
    pub recurrent: Option<super::recurrent::RecurrentPlan>,
    /// Some layers attend, the others run a recurrent mixer (Bamba).
    pub hybrid: Option<super::recurrent::HybridPlan>,
    /// `Some(bias)` for LayerNorm, `None` for RMSNorm.
    pub layer_norm: Option<Flag>,
    /// The norms have no learned parameters (OLMo's LayerNorms).
    pub weightless_norms: bool,
    /// Other norms where the epsilon field is null (Cohere2-MoE's LayerNorms).
    pub null_norm: Option<super::probed::NullNorm>,
    /// Hub keys the config class derives per-layer lists from where a config leaves them
    /// out, which the module does not read: `(key, default, lists)`, refused unless the
    /// lists are given (Cohere2-MoE's `first_k_dense_replace`).
    pub derived_list_keys: Vec<(String, i64, Vec<String>)>,
    pub eps_field: String,
    /// The norms' epsilon where no config field sets it (their modules' `eps`).
    pub eps_constant: Option<f64>,
    pub act_field: String,
    /// The activation where no config field names one (its config name, `relu`): the one
    /// Transformers calls in the MLP.
    pub activation_constant: Option<&'static str>,
    pub attention_scale: Scalar,
    pub attention_softcap: Scalar,
    /// q, k and v clamped to `[-c, c]` (OLMo's `clip_qkv`).
    pub clip_qkv: Scalar,
    pub final_softcap: Scalar,
    pub residual_scale: Scalar,
    pub logits_scale: Scalar,
    pub sliding_window: Option<String>,
    pub layer_types_field: bool,
    /// Which layers slide when a config has no `layer_types` (Transformers derives them).
    pub layer_rule: LayerRule,
    pub rope: Option<RopeRule>,
    pub no_rope: Option<NoRope>,
    /// The config field that names the rotated width in features (GPT-J's `rotary_dim`),
    /// found by the RoPE probe.
    pub rope_dims_field: Option<String>,
    /// The share of each head that rotates when a config names none (Transformers' config
    /// class sets it: Persimmon's 0.5).
    pub default_partial_rotary: Option<f64>,
    /// RoPE no config field describes (measured; the base is in Transformers' code): the
    /// module reads no RoPE keys of config.json, as Transformers does not.
    pub rope_from_code: bool,
    /// How the fused q/k/v projection groups its rows, where not all queries, keys,
    /// values (the probe's `fused_qkv_layout`): `sanitize` reorders them.
    pub qkv_groups: Option<QkvGroups>,
    /// A config field giving each layer its own RoPE base, 0 for none (Granite SWA's
    /// `layer_rope_theta`).
    pub layer_rope_bases: Option<String>,
    /// A learned sink logit per head in the softmax's denominator (`self_attn.sinks`).
    pub sinks: bool,
    /// The attention output times `sigmoid(self_attn.gate_proj(x))` (AFMoE).
    pub gate_proj: bool,
    /// `q_proj` gives each head's queries and then an output gate of the same width; the
    /// attention output times its sigmoid (Qwen3-Next).
    pub output_gate: bool,
    /// Differential attention: `self_attn.lambda_q1/k1/q2/k2` of `[head_dim]` (DiffLlama).
    pub differential: bool,
    /// A norm on the attention output before `o_proj` and one on the MLP's hidden features
    /// before `down_proj` (`self_attn.attn_sub_norm`, `mlp.ffn_sub_norm`: BitNet).
    pub sub_norms: bool,
    /// Checkpoint weights the causal LM never uses, by name prefix (Transformers'
    /// `_keys_to_ignore_on_load_unexpected` that are plain prefixes: Mellum's `mtp.`).
    pub unused_prefixes: Vec<String>,
    /// Checkpoint weights the causal LM never uses, by a name part found anywhere
    /// (Transformers' unanchored ignored keys: GPT-NeoX's `attention.bias`).
    pub unused_anywhere: Vec<String>,
    /// Candidates, most likely first.
    pub choices: Vec<Choice>,
    /// What the facts decided, one line each, for the report.
    pub decisions: Vec<String>,
    /// What no known block expresses.
    pub gaps: Vec<String>,
    /// config fields the module does not read, with a reason.
    pub ignored: Vec<(String, String)>,
    /// Boolean fields the module reads only to refuse all but the value given here.
    pub refused: Vec<(String, bool)>,
    /// Integer fields the module reads only to refuse all but the value given here: other
    /// values add parameters no block of the plan loads (the width probes).
    pub refused_values: Vec<(String, i64)>,
    /// The output layer has a bias (Phi).
    pub lm_head_bias: bool,
    /// The boolean field that puts that bias there (the ModernBERT decoder's
    /// `decoder_bias`), where a flag probe shows one.
    pub lm_head_bias_field: Option<String>,
    /// Transformers' module calls in decoder layer 0, in order (name under the layer,
    /// class), from the call trace.
    pub layer_calls: Vec<(String, String)>,
    /// Module paths under a layer the checkpoint names otherwise than the blocks load
    /// (from the call trace): `sanitize` renames them.
    pub renames: Vec<(String, String)>,
    /// parameter name (layer 0 or top level) → the block that takes it.
    pub weight_map: Vec<(String, String)>,
    /// Module paths from the root that a model whose base is not `model` keeps the decoder
    /// under (GPT-2's `transformer.h` → `model.layers`): `sanitize` renames them first.
    pub prefix_renames: Vec<(String, String)>,
    /// The config class's own names of common fields, `(common, own)` (its
    /// `attribute_map`, or the field whose width probe widens the MLP): the module reads
    /// config.json through them.
    pub aliases: Vec<(String, String)>,
    /// A null or missing MLP width is this many times `hidden_size` (GPT-2's `n_inner`).
    pub intermediate_per_hidden: Option<i32>,
    /// The field that gives the MLP width in units of `hidden_size`
    /// (`intermediate_multiple_size`); `intermediate_per_hidden` is its default.
    pub intermediate_multiple: Option<String>,
    /// Learned absolute positions, and the row of position 0 in their table.
    pub learned_positions: Option<i32>,
    /// The final norm also normalizes the embeddings, before the first layer (the
    /// structure's `norm_on_embeddings`: NanoChat).
    pub norm_on_embeddings: bool,
    /// RoPE turns by -θ (the RoPE probe's negative angles: NanoChat).
    pub rope_reversed: bool,
    /// Linear position biases on the attention scores (ALiBi), measured.
    pub alibi: Option<super::alibi::AlibiPlan>,
    /// A norm of its own on the embeddings before the first layer (`model.embed_layernorm`).
    pub embedding_layernorm: bool,
    /// Entries of nested sub-configs that change the logits (the nested probes) but that no
    /// block reads, `(field, key, default as JSON)`: the module refuses other values.
    pub nested_refused: Vec<(String, String, String)>,
    /// Modules of a layer (by the names the blocks load) that Transformers keeps as
    /// `Conv1D`, weights `[in, out]`: `sanitize` transposes them.
    pub conv1d: Vec<String>,
    /// Fixed sinusoidal positions, fitted to what the model adds to its embeddings by
    /// position alone (the facts' `position_signal`).
    pub sinusoidal_positions: Option<mlx_models::positions::Sinusoid>,
    /// A norm after the last layer (`model.norm`); post-residual layers may end without.
    pub final_norm: bool,
    /// `o_proj` has a bias on this one layer only (`LayerSettings::o_bias`), measured at
    /// several layer counts (GPT-NeoX-Japanese: the last).
    pub o_bias_only: Option<OnlyLayer>,
    /// The first layer has no norm before its mixer (an `Identity` where the other layers
    /// have their pre-attention norm).
    pub first_layer_no_input_norm: bool,
    /// A prediction head (`head.dense`, activation, `head.norm`) before the output layer.
    pub prediction_head: Option<HeadPlan>,
    /// Common integer fields read as the family's own divided where config.json lacks
    /// them, `(common, own, divisor)` (`DecoderFamily::DIVIDED_ALIASES`).
    pub divided_aliases: Vec<(String, String, i64)>,
    /// The MLP is `intermediate_size` divided by this wide (RecurrentGemma's half).
    pub intermediate_divisor: Option<i32>,
    /// The field that sets the period of a periodic layer rule (the ModernBERT decoder's
    /// `global_attn_every_n_layers`), read in place of the rule's fixed period.
    pub layer_period: Option<String>,
}

/// The one layer that holds a parameter the others lack, by a rule that holds at every
/// layer count the model was built with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OnlyLayer {
    First,
    Last,
}

/// The norms of a decoder layer, by the blocks' names.
const LAYER_NORMS: [&str; 4] = [
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
];

/// Bare vectors that Transformers adds as a projection's bias (the facts' `bare_biases`,
/// measured: moved into the projection's bias they leave the logits as they are), as
/// renames under a layer onto that projection's bias by the blocks' names:
/// `attention.dense_bias` → `self_attn.o_proj.bias`. They go first: a whole name must
/// win over a rename of the module that holds it.
pub fn bare_bias_renames(facts: &Value, renames: &[(String, String)]) -> Vec<(String, String)> {
    let Some(layers) = facts.pointer("/structure/layers").and_then(Value::as_str) else {
        return Vec::new();
    };
    let local = |name: &str| -> Option<String> {
        let rest = name.strip_prefix(layers)?.strip_prefix('.')?;
        let (index, path) = rest.split_once('.')?;
        index.parse::<usize>().ok().map(|_| path.to_owned())
    };
    // A recurrent mixer (a module with `A_log`) loads its own vectors (gated DeltaNet's
    // `dt_bias`, added to `in_proj_a`'s output).
    let in_recurrent_mixer = |param: &str| {
        param.rsplit_once('.').is_some_and(|(module, _)| {
            facts
                .get("parameters")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|p| p["name"].as_str() == Some(&format!("{module}.A_log")))
        })
    };
    let mut found: Vec<(String, String)> = Vec::new();
    for (param, linear) in facts
        .get("bare_biases")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        if in_recurrent_mixer(param) {
            continue;
        }
        let (Some(param), Some(linear)) = (local(param), linear.as_str().and_then(local)) else {
            continue;
        };
        let blocks = super::trace::rename(&format!("model.layers.0.{linear}.bias"), renames);
        let blocks = blocks["model.layers.0.".len()..].to_owned();
        if !found.iter().any(|(from, _)| *from == param) {
            found.push((param, blocks));
        }
    }
    found
}

/// Which one layer holds `param` (a name under the layer, as the blocks load it) where not
/// every layer does: the tiny model's layers and the facts' `layer_presence_probes` (the
/// model built with other layer counts) must all say the first, or all the last.
/// `Ok(None)`: every layer or none holds it; `Err`: some other rule (a gap).
pub fn only_layer(
    facts: &Value,
    params: &BTreeMap<String, Vec<i64>>,
    renames: &[(String, String)],
    param: &str,
) -> Result<Option<OnlyLayer>, String> {
    let tiny_layers = params
        .keys()
        .filter_map(|n| n.strip_prefix("model.layers."))
        .filter_map(|rest| rest.split_once('.')?.0.parse::<usize>().ok())
        .max()
        .map_or(0, |last| last + 1);
    let held: Vec<usize> = (0..tiny_layers)
        .filter(|i| params.contains_key(&format!("model.layers.{i}.{param}")))
        .collect();
    if held.is_empty() || held.len() == tiny_layers {
        return Ok(None);
    }
    // A bias held by exactly the layers that hold its projection (a hybrid's attention
    // layers) follows the projection: the layers without one hold neither.
    if let Some(weight) = param.strip_suffix(".bias").map(|p| format!("{p}.weight")) {
        let with_weight: Vec<usize> = (0..tiny_layers)
            .filter(|i| params.contains_key(&format!("model.layers.{i}.{weight}")))
            .collect();
        if with_weight == held {
            return Ok(None);
        }
    }
    let mut counts = vec![(tiny_layers, held)];
    for probe in facts
        .get("layer_presence_probes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(n) = probe.get("num_hidden_layers").and_then(Value::as_u64) else {
            continue;
        };
        let Some(partial) = probe.get("partial").and_then(Value::as_object) else {
            continue;
        };
        let n = n as usize;
        // The probe names Transformers' parameters; `param` is the blocks' name.
        let indices = partial
            .iter()
            .find(|(name, _)| {
                let renamed = super::trace::rename(&format!("model.layers.0.{name}"), renames);
                renamed == format!("model.layers.0.{param}")
            })
            .map_or_else(
                || (0..n).collect(),
                |(_, v)| {
                    v.as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_u64)
                        .map(|i| i as usize)
                        .collect()
                },
            );
        counts.push((n, indices));
    }
    let all = |rule: fn(usize) -> usize| counts.iter().all(|(n, held)| held == &[rule(*n)]);
    let seen = counts
        .iter()
        .map(|(n, held)| format!("{held:?} of {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    if counts.len() < 2 {
        Err(format!(
            "only layers {seen} hold `{param}`, and no other layer count was probed to tell the rule"
        ))
    } else if all(|_| 0) {
        Ok(Some(OnlyLayer::First))
    } else if all(|n| n - 1) {
        Ok(Some(OnlyLayer::Last))
    } else {
        Err(format!(
            "`{param}` is held by layers {seen}: no per-layer rule the blocks know (first or last layer only)"
        ))
    }
}

/// The prediction head between the final norm and the output layer (introspect.py's
/// `prediction_head`): `norm(act(dense(h)))`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadPlan {
    /// Whether `dense` has a bias.
    pub bias: Flag,
    /// The string field naming its activation (not the MLP's).
    pub activation_field: String,
}

/// Layer-level modules that are an `Identity` in some layers and a norm in others (the
/// ModernBERT decoder's `attn_norm`, none on layer 0), from the module tree:
/// `(name under the layer, the norm's class, the layers where it is an Identity)`.
pub fn identity_norms(facts: &Value) -> Vec<(String, String, Vec<usize>)> {
    let Some(layers) = facts.pointer("/structure/layers").and_then(Value::as_str) else {
        return Vec::new();
    };
    let prefix = format!("{layers}.");
    let mut by_name: BTreeMap<String, (Option<String>, Vec<usize>)> = BTreeMap::new();
    for m in facts
        .get("modules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(rest) = str_of(m, "name").strip_prefix(&prefix) else {
            continue;
        };
        let Some((index, local)) = rest.split_once('.') else {
            continue;
        };
        let (Ok(index), false) = (index.parse::<usize>(), local.contains('.')) else {
            continue;
        };
        let class = str_of(m, "class");
        let entry = by_name.entry(local.to_owned()).or_default();
        if class == "Identity" {
            entry.1.push(index);
        } else if class.to_lowercase().contains("norm") {
            entry.0.get_or_insert_with(|| class.to_owned());
        }
    }
    by_name
        .into_iter()
        .filter_map(|(name, (norm, identity))| Some((name, norm?, identity)))
        .filter(|(_, _, identity)| !identity.is_empty())
        .collect()
}

/// Layer 0's call trace, its `Identity` norms ([`identity_norms`]) read as the norm the
/// other layers call there.
pub fn layer_events(facts: &Value) -> Vec<super::trace::Event> {
    let identity = identity_norms(facts);
    super::trace::events(facts)
        .into_iter()
        .map(|mut e| {
            if let Some((_, class, _)) = identity
                .iter()
                .find(|(name, _, layers)| *name == e.module && layers.contains(&0))
            {
                e.class = class.clone();
            }
            e
        })
        .collect()
}

/// The Hub key the config class reads from its keyword arguments that sets `effect` (a
/// layer type's RoPE base, or `layer_types`): introspect.py's `legacy_effects`.
pub fn legacy_effect(facts: &Value, effect: &str) -> Option<String> {
    facts
        .get("legacy_effects")?
        .as_object()?
        .iter()
        .find(|(_, v)| v.as_str() == Some(effect))
        .map(|(k, _)| k.clone())
}

/// Whether `key` is the period of `rule` (a periodic rule): for every value introspect.py
/// probed (`legacy_layer_probes`), Transformers derived the rule's layer types at that
/// period.
pub fn period_key_holds(facts: &Value, key: &str, rule: LayerRule) -> bool {
    use mlx_models::transformer::LayerType;
    let periodic: fn(usize, i32) -> Vec<LayerType> = match rule {
        LayerRule::EveryNth(_) => LayerType::periodic,
        LayerRule::EveryNthFromFirst(_) => LayerType::periodic_from_first,
        _ => return false,
    };
    let Some(probes) = facts
        .pointer(&format!("/legacy_layer_probes/{key}"))
        .or_else(|| facts.pointer(&format!("/field_layer_probes/{key}")))
        .and_then(Value::as_array)
        .filter(|p| !p.is_empty())
    else {
        return false;
    };
    probes.iter().all(|p| {
        let (Some(value), Some(types)) = (
            p.get("value").and_then(Value::as_i64),
            p.get("layer_types").and_then(Value::as_array),
        ) else {
            return false;
        };
        let expected = periodic(types.len(), value as i32);
        serde_json::to_value(expected).ok() == Some(Value::Array(types.clone()))
    })
}

/// Whether layer 0's MLP of an up and a down projection is a GLU in one projection (the
/// ModernBERT decoder's `Wi`, halves `act(a) * b`): the up projection has twice the
/// rows the down projection takes in. Read as the blocks' `mlp.gate_up_proj` (gate rows
/// first, as Phi-3's); the fixtures check the order.
pub fn fused_glu(params: &BTreeMap<String, Vec<i64>>) -> bool {
    let up = params.get("model.layers.0.mlp.up_proj.weight");
    let down = params.get("model.layers.0.mlp.down_proj.weight");
    match (up, down) {
        (Some(up), Some(down)) => up
            .first()
            .zip(down.get(1))
            .is_some_and(|(u, d)| *u == 2 * d),
        _ => false,
    }
}

/// The renames that make a dense MLP in a layer that also holds experts the block's shared
/// expert (`shared_mlp.output_linear` → `mlp.shared_expert.down_proj`): each of its
/// projections, by its checkpoint module path, where the plan's renames so far (`prefixes`,
/// then `renames`) take it to `mlp.<projection>` in a layer whose renamed parameters
/// include `mlp.experts`. Empty for layers of one feed-forward.
fn dense_mlp_beside_experts(
    facts: &Facts,
    renamed_params: &BTreeMap<String, Vec<i64>>,
    prefixes: &[(&str, &str)],
    renames: &[(String, String)],
) -> Vec<(String, String)> {
    let mut beside: Vec<(String, String)> = Vec::new();
    for name in facts.parameters().keys() {
        let old = mlx_models::weights::rename_prefix(name, prefixes);
        let Some((index, _)) = old
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
        else {
            continue;
        };
        let layer = format!("model.layers.{index}.");
        let new = super::trace::rename(&old, renames);
        let Some(projection) = new
            .strip_prefix(&layer)
            .and_then(|r| r.strip_prefix("mlp."))
            .and_then(|r| r.strip_suffix(".weight"))
            .filter(|p| ["gate_proj", "up_proj", "down_proj", "gate_up_proj"].contains(p))
        else {
            continue;
        };
        let experts = format!("{layer}mlp.experts");
        if !renamed_params.keys().any(|n| n.starts_with(&experts)) {
            continue;
        }
        let Some(module) = old
            .strip_prefix(&layer)
            .and_then(|r| r.strip_suffix(".weight"))
        else {
            continue;
        };
        let rename = (module.to_owned(), format!("mlp.shared_expert.{projection}"));
        if !beside.contains(&rename) {
            beside.push(rename);
        }
    }
    beside
}

/// The prefix renames of a prediction head (introspect.py's `prediction_head`): its
/// linear layer to `head.dense`, its norm to `head.norm`; `None` where it is not one
/// linear layer, an activation and a norm, called in that order.
pub fn head_renames(facts: &Value) -> Option<Vec<(String, String)>> {
    let head = facts.get("prediction_head")?;
    let name = head.get("name")?.as_str()?;
    let calls: Vec<(&str, &str)> = head
        .get("calls")?
        .as_array()?
        .iter()
        .filter_map(|c| Some((c.get(0)?.as_str()?, c.get(1)?.as_str()?)))
        .filter(|(_, class)| !class.contains("Dropout"))
        .collect();
    match calls.as_slice() {
        [(dense, linear), (_, act), (norm, norm_class)]
            if super::trace::is_projection(linear)
                && super::trace::activation_of_class(act).is_some()
                && norm_class.to_lowercase().contains("norm") =>
        {
            Some(vec![
                (format!("{name}.{dense}"), "head.dense".to_owned()),
                (format!("{name}.{norm}"), "head.norm".to_owned()),
            ])
        }
        _ => None,
    }
}

/// The name prefixes of the checkpoint keys Transformers ignores when it loads the causal LM
/// (`_keys_to_ignore_on_load_unexpected`, recorded by introspect.py): the patterns that are a
/// plain prefix (`^mtp\.`, maybe ending in `.*`); any other pattern is reported and left to
/// the unused-weights check.
pub fn unused_prefixes(facts: &Value, decisions: &mut Vec<String>) -> Vec<String> {
    ignored_literals(facts, decisions)
        .into_iter()
        .filter_map(|(literal, anchored)| anchored.then_some(literal))
        .collect()
}

/// The unanchored plain literals of Transformers' ignored checkpoint keys: it searches for
/// them anywhere in a name.
pub fn unused_anywhere(facts: &Value) -> Vec<String> {
    ignored_literals(facts, &mut Vec::new())
        .into_iter()
        .filter_map(|(literal, anchored)| (!anchored).then_some(literal))
        .collect()
}

/// Each plain literal of Transformers' ignored checkpoint keys and whether it is anchored
/// at the name's start (`^mtp\.`); a pattern that is no plain literal is reported.
fn ignored_literals(facts: &Value, decisions: &mut Vec<String>) -> Vec<(String, bool)> {
    let mut prefixes = Vec::new();
    for pattern in facts
        .get("ignored_checkpoint_keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        // Anchored (`^mtp\.`) or not (`mtp.*`, which Transformers searches anywhere in a
        // name): checkpoint weights starting with the literal are dropped.
        let literal = Some(pattern.strip_prefix('^').unwrap_or(pattern))
            .map(|p| p.strip_suffix(".*").unwrap_or(p))
            .map(|p| p.replace("\\.", "."))
            .filter(|p| !p.is_empty() && !p.contains(|c: char| "\\^$*+?()[]{}|".contains(c)));
        match literal {
            Some(prefix) => {
                let anchored = pattern.starts_with('^');
                decisions.push(if anchored {
                    format!(
                        "checkpoint weights under `{prefix}` are dropped: Transformers ignores `{pattern}`"
                    )
                } else {
                    format!(
                        "checkpoint weights with `{prefix}` in their name (at its start or after \
                         a `.`) are dropped: Transformers ignores `{pattern}` anywhere"
                    )
                });
                prefixes.push((prefix, anchored));
            }
            None => decisions.push(format!(
                "Transformers ignores checkpoint keys `{pattern}`, no plain prefix: such weights stay errors"
            )),
        }
    }
    prefixes
}

/// `name` under a decoder layer (`model.layers.3.mlp.x` → `mlp.x`), where it is in one.
fn in_layer<'a>(structure: &Value, name: &'a str) -> Option<&'a str> {
    let layers = structure.get("layers")?.as_str()?;
    let (index, rest) = name.strip_prefix(&format!("{layers}."))?.split_once('.')?;
    index.parse::<usize>().ok().map(|_| rest)
}

/// The names `save_pretrained` writes that differ from the model's (introspect.py's
/// `saved_names`): `(written, loaded)`.
fn saved_names(facts: &Value) -> impl Iterator<Item = (&str, &str)> {
    facts
        .get("saved_names")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(written, loaded)| Some((written.as_str(), loaded.as_str()?)))
}

/// Parameters `save_pretrained` writes elsewhere within a decoder layer (EXAONE-MoE's
/// router bias `mlp.e_score_correction_bias`, loaded as `mlp.gate.e_score_correction_bias`):
/// renames of the parameter under every layer, as the checkpoint names it → as the model
/// does.
pub fn saved_layer_renames(facts: &Value) -> Vec<(String, String)> {
    let Some(structure) = facts.get("structure") else {
        return Vec::new();
    };
    let mut renames = Vec::new();
    for (written, loaded) in saved_names(facts) {
        let (Some(from), Some(to)) = (in_layer(structure, written), in_layer(structure, loaded))
        else {
            continue;
        };
        let pair = (from.to_owned(), to.to_owned());
        if from != to && !renames.contains(&pair) {
            renames.push(pair);
        }
    }
    renames
}

/// The root renames that bring a model whose base model is not `model.` to the names the
/// blocks load, from the facts' `structure` (introspect.py finds the embedding, the
/// decoder layers and the final norm by structure): GPT-2's `transformer.wte`,
/// `transformer.h`, `transformer.ln_f`; GPT-NeoX's `gpt_neox.embed_in`, ... Nothing for a
/// model under `model.` (whose other names the call trace decides).
pub fn structure_renames(facts: &Value) -> Vec<(String, String)> {
    let Some(structure) = facts.get("structure") else {
        return Vec::new();
    };
    let mut renames = Vec::new();
    // Modules save_pretrained writes under their original names (GPT-NeoX's `embed_out`
    // for `lm_head`): the checkpoint's names are those.
    for (written, loaded) in saved_names(facts) {
        let (Some((from, leaf)), Some((to, same))) =
            (written.rsplit_once('.'), loaded.rsplit_once('.'))
        else {
            continue;
        };
        // A parameter saved elsewhere inside a decoder layer is a rename of that parameter
        // in every layer ([`saved_layer_renames`]), not of the module holding it.
        if in_layer(structure, from).is_some() {
            continue;
        }
        let pair = (from.to_owned(), to.to_owned());
        if leaf == same && from != to && !renames.contains(&pair) {
            renames.push(pair);
        }
    }
    for (part, canonical) in [
        ("embeddings", "model.embed_tokens"),
        ("positions", "model.embed_positions"),
        ("layers", "model.layers"),
        ("norm", "model.norm"),
        ("lm_head", "lm_head"),
        ("embedding_norm", "model.embed_layernorm"),
    ] {
        let Some(name) = structure.get(part).and_then(Value::as_str) else {
            continue;
        };
        // Under `model.` but deeper (OPT's `model.decoder.layers`): renamed as well.
        let nested = name.starts_with("model.") && name.matches('.').count() > 1;
        if (!name.starts_with("model.") || nested || part == "lm_head") && name != canonical {
            renames.push((name.to_owned(), canonical.to_owned()));
        }
    }
    // Checkpoints of the base model alone have no base-model prefix (the Hub's GPT-2:
    // `h.0.attn`, `wte`); Transformers adds it on load, and so does `sanitize`.
    let base = ["embeddings", "layers"].map(|part| {
        let name = structure.get(part).and_then(Value::as_str)?;
        name.split_once('.').map(|(base, _)| base)
    });
    if let [Some(base), Some(same)] = base {
        if base == same {
            let bare: Vec<(String, String)> = renames
                .iter()
                .filter(|(_, to)| to.starts_with("model."))
                .filter_map(|(from, to)| {
                    let local = from.strip_prefix(&format!("{base}."))?;
                    Some((local.to_owned(), to.clone()))
                })
                .collect();
            renames.extend(bare);
        }
    }
    renames
}

/// What the structure holds that no generated module reads: `Conv1D` projections
/// (weights `[in, out]`) outside the decoder layers, with the public piece a hand-written
/// module uses for them.
pub fn structure_gaps(facts: &Value) -> Vec<String> {
    let mut gaps = Vec::new();
    let layers = facts.pointer("/structure/layers").and_then(Value::as_str);
    let conv: Vec<&str> = conv1d_modules(facts)
        .into_iter()
        .filter(|name| layers.is_none_or(|l| !name.starts_with(&format!("{l}."))))
        .collect();
    if let Some(first) = conv.first() {
        gaps.push(format!(
            "{} `Conv1D` projections (`{first}`, ...) store their weights as [in, out]: the generator \
             does not emit the transpose (by hand: `fused_qkv::conv1d_to_linear` in `sanitize`)",
            conv.len()
        ));
    }
    gaps
}

/// The attention scale as Transformers computes it (introspect.py fits it from the
/// attention weights of layer 0, on the tiny model and on each flag-flipped one): none
/// at all (GPT-Neo), or none where a boolean field is false (GPT-2's
/// `scale_attn_weights`). `None` where the scale is the blocks' `head_dim^-0.5` whatever
/// the flags, or was not measured.
pub fn measured_attention_scale(facts: &Value, head_dim: i64) -> Option<(Scalar, String)> {
    let scale = |v: Option<&Value>| v?.get("scale")?.as_f64();
    let base = scale(facts.get("attention_scale"))?;
    let default = (head_dim as f64).powf(-0.5);
    let near = |a: f64, b: f64| (a - b).abs() < 1e-4 * b.abs().max(1.0);
    if near(base, 1.0) && !near(default, 1.0) {
        return Some((
            Scalar::One,
            format!("attention scores not scaled (measured factor {base} on q·k)"),
        ));
    }
    if !near(base, default) {
        return None;
    }
    let probes = facts.get("flag_probes")?.as_array()?;
    let flag = probes.iter().find(|p| {
        p.get("value").and_then(Value::as_bool) == Some(false)
            && scale(p.get("attention_scale")).is_some_and(|s| near(s, 1.0))
    })?;
    let field = flag.get("field")?.as_str()?.to_owned();
    let decision = format!(
        "attention scores scaled by head_dim^-0.5 ({base} measured), not at all with `{field}` false"
    );
    Some((Scalar::OneUnless(field), decision))
}

/// The `eps` of the first norm module of decoder layer 0, where the modules record it.
fn module_eps(facts: &Value) -> Option<f64> {
    let layers = facts.pointer("/structure/layers")?.as_str()?;
    let prefix = format!("{layers}.0.");
    facts.get("modules")?.as_array()?.iter().find_map(|m| {
        let name = m.get("name")?.as_str()?;
        let class = m.get("class")?.as_str()?;
        if !name.starts_with(&prefix) || !class.to_lowercase().contains("norm") {
            return None;
        }
        // Where the norm keeps none, the epsilon measured on it (OLMo's).
        m.pointer("/attrs/eps")
            .or_else(|| m.pointer("/attrs/measured_eps"))?
            .as_f64()
    })
}

/// The tiny model's `hidden_size` (under the class's own name where it has one).
/// ALiBi from the `position_bias` probe (the tiny model's per-head score slopes), fitted
/// to the block's slopes; a bias the block cannot compute, or one beside another position
/// encoding, is a gap.
fn alibi_plan(
    facts: &Facts,
    other_positions: bool,
    decisions: &mut Vec<String>,
    gaps: &mut Vec<String>,
) -> Option<super::alibi::AlibiPlan> {
    use super::alibi::AlibiFactor;
    let slopes = super::alibi::measured_slopes(facts.value)?;
    let head_dim = (hidden_of(facts) / slopes.len().max(1) as i64) as i32;
    match super::alibi::fit(&slopes, head_dim) {
        Ok(_) if other_positions => {
            gaps.push(
                "a linear position bias on the scores (ALiBi) beside RoPE or learned positions"
                    .to_owned(),
            );
            None
        }
        Ok(a) => {
            decisions.push(format!(
                "positions: ALiBi (no RoPE, no position table; one token repeated gives every \
                 head a constant score step between neighbouring keys), slopes of max bias {}{}",
                a.max_bias,
                match a.factor {
                    AlibiFactor::One => "",
                    AlibiFactor::AttentionScale => " times the attention scale",
                }
            ));
            Some(a)
        }
        Err(why) => {
            gaps.push(format!(
                "a linear position bias on the scores (ALiBi) the block does not compute: {why}"
            ));
            None
        }
    }
}

/// What a common field the config class lacks stands for, measured, and the line for
/// the report: the MLP width as a multiple of `hidden_size` (BLOOM's fixed 4, from the
/// tiny model's `up_proj`; `Value` the multiple), and no context limit where the only
/// positions are ALiBi's (no table, no RoPE: `i32::MAX`).
fn unnamed_field(
    facts: &Facts,
    name: &str,
    params: &BTreeMap<String, Vec<i64>>,
) -> Option<(Value, String)> {
    match name {
        "intermediate_size" => {
            let hidden = hidden_of(facts);
            let rows = *params.get("model.layers.0.mlp.up_proj.weight")?.first()?;
            (hidden > 0 && rows % hidden == 0).then(|| {
                let k = rows / hidden;
                (
                    Value::from(k),
                    format!(
                        "the MLP is {k} × hidden_size wide (the config class has no field for \
                         it; measured on the tiny model's up projection)"
                    ),
                )
            })
        }
        "num_key_value_heads" => {
            // A fused projection of `(heads + 2 · kv_heads) · head_dim` rows with fewer
            // key/value heads than query heads (Falcon's `multi_query`: one).
            let heads = facts
                .resolved("num_attention_heads")
                .or_else(|| {
                    let own = facts.value.pointer("/attribute_map/num_attention_heads")?;
                    facts.resolved(own.as_str()?)
                })
                .and_then(Value::as_i64)?;
            let hidden = hidden_of(facts);
            let rows = *params
                .get("model.layers.0.self_attn.qkv_proj.weight")?
                .first()?;
            let head_dim = (heads > 0 && hidden % heads == 0).then(|| hidden / heads)?;
            let kv = (rows / head_dim - heads) / 2;
            (rows % head_dim == 0 && kv > 0 && kv < heads && (heads + 2 * kv) * head_dim == rows)
                .then(|| {
                    (
                        Value::from(kv),
                        format!(
                            "{kv} key/value head(s) where config.json names none: the config \
                             class has no `num_key_value_heads`; measured on the fused q/k/v \
                             projection ({rows} rows of {heads} query heads of {head_dim})"
                        ),
                    )
                })
        }
        "max_position_embeddings" => {
            let positions = facts.value.pointer("/structure/positions");
            let rotary = facts.value.pointer("/structure/rotary");
            let alibi = super::alibi::measured_slopes(facts.value).is_some();
            let no_table = positions.is_none_or(Value::is_null);
            let rotary = !rotary.is_none_or(Value::is_null);
            // RoPE scalings that read the limit (dynamic NTK, YaRN) have no value to read.
            let scaled = facts
                .value
                .pointer("/resolved_config/rope_parameters/rope_type")
                .and_then(Value::as_str)
                .is_some_and(|t| t != "default" && t != "linear");
            if alibi && no_table && !rotary {
                Some((
                    Value::from(i32::MAX),
                    "no context limit where config.json names none: the class has no \
                     `max_position_embeddings` and the only positions are ALiBi's"
                        .to_owned(),
                ))
            } else if rotary && no_table && !scaled {
                Some((
                    Value::from(i32::MAX),
                    "no context limit where config.json names none: the class has no \
                     `max_position_embeddings`, no learned position table and an unscaled RoPE \
                     (which reads no limit)"
                        .to_owned(),
                ))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The nested probes' sub-config entries that move the logits (or that the model refuses
/// to run with another value): no block reads them, so the module accepts only their
/// default (MPT's `attn_config.clip_qkv`, `attn_config.softmax_scale`).
pub fn nested_refused(facts: &Value, decisions: &mut Vec<String>) -> Vec<(String, String, String)> {
    let mut refused = Vec::new();
    for p in facts
        .get("nested_probes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let moved = p.get("logits_max_abs").and_then(Value::as_f64);
        if moved.is_some_and(|d| d == 0.0) {
            continue;
        }
        let (field, key) = (str_of(p, "field"), str_of(p, "key"));
        let default = p.get("default").cloned().unwrap_or(Value::Null).to_string();
        decisions.push(format!(
            "`{field}.{key}` = {} changes the model ({}): only {default} accepted",
            p.get("value").cloned().unwrap_or(Value::Null),
            match moved {
                Some(d) => format!("logits move by {d:.3e}"),
                None => "the model does not run with it".to_owned(),
            }
        ));
        refused.push((field.to_owned(), key.to_owned(), default));
    }
    refused
}

/// The class of the module the blocks load as `name`, found under its checkpoint name
/// (MPT's `transformer.blocks.0.norm_1` is `model.layers.0.input_layernorm`).
fn renamed_module_class<'a>(
    facts: &Facts<'a>,
    name: &str,
    prefixes: &[(&str, &str)],
    renames: &[(String, String)],
) -> Option<&'a str> {
    facts
        .value
        .get("modules")?
        .as_array()?
        .iter()
        .find(|m| {
            let full = format!("{}.x", str_of(m, "name"));
            let full = mlx_models::weights::rename_prefix(&full, prefixes);
            super::trace::rename(&full, renames).strip_suffix(".x") == Some(name)
        })
        .map(|m| str_of(m, "class"))
}

/// The activation the MLP's activation module computes (the `mlp_activation` probe),
/// where the config class has no field to name it (BLOOM's `BloomGelu`).
fn measured_activation(facts: &Facts, act_field: &str) -> Option<String> {
    if facts.fields().contains_key(act_field) {
        return None;
    }
    facts
        .value
        .get("mlp_activation")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn hidden_of(facts: &Facts) -> i64 {
    facts
        .resolved("hidden_size")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// Every module Transformers keeps as a `Conv1D` (GPT-2's projections), full names.
fn conv1d_modules(facts: &Value) -> Vec<&str> {
    facts
        .get("modules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| m.get("class").and_then(Value::as_str) == Some("Conv1D"))
        .filter_map(|m| m.get("name").and_then(Value::as_str))
        .collect()
}

/// The `Conv1D` modules of a decoder layer, by the names the blocks load (after the root
/// and the layer renames): `sanitize` transposes their weights to a linear layer's.
pub fn layer_conv1d(facts: &Value, renames: &[(String, String)]) -> Vec<String> {
    let Some(layers) = facts.pointer("/structure/layers").and_then(Value::as_str) else {
        return Vec::new();
    };
    let prefix = format!("{layers}.0.");
    conv1d_modules(facts)
        .into_iter()
        .filter_map(|name| name.strip_prefix(&prefix))
        .map(|local| {
            let name = super::trace::rename(&format!("model.layers.0.{local}.weight"), renames);
            let name = name.trim_start_matches("model.layers.0.");
            name.trim_end_matches(".weight").to_owned()
        })
        .collect()
}

/// Learned absolute positions (the structure's `positions`): the row of position 0 in the
/// table, its rows beyond `max_position_embeddings` (OPT and BioGPT keep two before it).
pub fn learned_positions(facts: &Value, params: &BTreeMap<String, Vec<i64>>) -> Option<i32> {
    facts.pointer("/structure/positions")?.as_str()?;
    let rows = params
        .get("model.embed_positions.weight")?
        .first()
        .copied()?;
    let config = facts.get("resolved_config")?;
    let field = facts
        .pointer("/attribute_map/max_position_embeddings")
        .and_then(Value::as_str)
        .unwrap_or("max_position_embeddings");
    let max = config.get(field).and_then(Value::as_i64)?;
    i32::try_from(rows - max).ok().filter(|o| *o >= 0)
}

/// The tiny model's MLP width as a multiple of `hidden` where it is one: the width of a
/// layer-0 MLP weight (`mlp.up_proj`, `mlp.c_fc`) other than `hidden`.
fn fixed_mlp_width(hidden: i64, params: &BTreeMap<String, Vec<i64>>) -> Option<i32> {
    let width = params
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers.0.mlp.") && n.ends_with(".weight"))
        .flat_map(|(_, shape)| shape.iter().copied())
        .find(|d| *d != hidden && hidden > 0 && d % hidden == 0)?;
    i32::try_from(width / hidden).ok()
}

/// Config values [`mlx_models::mlp::Activation::from_config`] reads as an activation.
const ACTIVATION_NAMES: &[&str] = &[
    "silu",
    "swish",
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "relu",
    "relu2",
];

/// The sinusoidal table that reproduces the facts' `position_signal` (what layer 0
/// receives by position alone, the embedding zeroed), among the layouts
/// [`mlx_models::positions::Sinusoid`] expresses: `Ok(None)` without a signal, an error
/// (a gap) for a signal none of them reproduces.
pub fn sinusoidal_positions(
    facts: &Value,
) -> Result<Option<mlx_models::positions::Sinusoid>, String> {
    use mlx_models::positions::Sinusoid;
    let Some(rows) = facts.get("position_signal").and_then(Value::as_array) else {
        return Ok(None);
    };
    let rows: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| {
            r.as_array()
                .map(|r| r.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        })
        .collect();
    let dim = rows.first().map_or(0, Vec::len);
    let half = dim / 2;
    let mut best = f64::INFINITY;
    for base in [10000.0, 100000.0] {
        for shift in 0..=1 {
            for first_position in 0..=2 {
                for interleaved in [false, true] {
                    let s = Sinusoid {
                        base,
                        shift,
                        first_position,
                        interleaved,
                    };
                    if !dim.is_multiple_of(2) || half <= shift as usize {
                        continue;
                    }
                    let mut err = 0f64;
                    for (p, row) in rows.iter().enumerate() {
                        if row.len() != dim {
                            err = f64::INFINITY;
                            break;
                        }
                        let pos = (p as i32 + first_position) as f64;
                        for j in 0..half {
                            let f = base.powf(-(j as f64) / (half - shift as usize) as f64);
                            let (is, ic) = if interleaved {
                                (2 * j, 2 * j + 1)
                            } else {
                                (j, j + half)
                            };
                            err = err
                                .max((row[is] - (pos * f).sin()).abs())
                                .max((row[ic] - (pos * f).cos()).abs());
                        }
                    }
                    if err < 1e-4 {
                        return Ok(Some(s));
                    }
                    best = best.min(err);
                }
            }
        }
    }
    Err(format!(
        "the model adds a position-dependent signal to its embeddings (no parameter holds it) \
         that no sinusoidal table reproduces (closest max-abs {best:.3e} over {} positions)",
        rows.len()
    ))
}

/// The config field that sets the MLP's width where the class has no `intermediate_size`
/// (the width probes: the field whose value widens a parameter of the layer outside its
/// attention), and, where the tiny config leaves it null, the width it then stands for
/// as a multiple of `hidden_size`.
pub fn mlp_width_field(
    facts: &Value,
    attention: &str,
    hidden: i64,
    params: &BTreeMap<String, Vec<i64>>,
) -> Option<(String, Option<i32>)> {
    let layers = facts.pointer("/structure/layers")?.as_str()?;
    let prefix = format!("{layers}.0.");
    let probe = facts.get("width_probes")?.as_array()?.iter().find(|p| {
        p.get("widened")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|n| n.strip_prefix(&prefix))
            .any(|local| !local.starts_with(&format!("{attention}.")))
    })?;
    let field = probe.get("field")?.as_str()?.to_owned();
    let null = facts
        .pointer(&format!("/resolved_config/{field}"))
        .is_none_or(Value::is_null);
    if !null {
        return Some((field, None));
    }
    // The tiny model's MLP width: the width of a layer-0 MLP weight other than hidden's.
    let width = params
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers.0.") && !n.contains("attn"))
        .filter(|(n, _)| n.ends_with(".weight"))
        .flat_map(|(_, shape)| shape.iter().copied())
        .find(|d| *d != hidden && hidden > 0 && d % hidden == 0)?;
    Some((field, i32::try_from(width / hidden).ok()))
}

/// The width probes' value (introspect.py's `WIDTH_PROBE`).
const WIDTH_PROBE: i64 = 96;

/// The integer field whose width probe made a layer-0 parameter outside attention
/// `WIDTH_PROBE × hidden_size` wide (the facts' `widened_times_hidden`): the MLP width as a
/// multiple of hidden_size (GPT-NeoX-Japanese's `intermediate_multiple_size`).
pub fn mlp_width_multiple_field(facts: &Value, renames: &[(String, String)]) -> Option<String> {
    let layers = facts.pointer("/structure/layers")?.as_str()?;
    let prefix = format!("{layers}.0.");
    let probe = facts.get("width_probes")?.as_array()?.iter().find(|p| {
        p.get("widened_times_hidden")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|n| n.strip_prefix(&prefix))
            .any(|local| {
                let blocks = super::trace::rename(&format!("model.layers.0.{local}"), renames);
                blocks.starts_with("model.layers.0.mlp.")
            })
    })?;
    Some(probe.get("field")?.as_str()?.to_owned())
}

/// Fields that never change the forward pass of one sequence.
const INERT: &[&str] = &[
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "use_cache",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "architectures",
    "pretraining_tp",
    "embedding_dropout",
    "residual_dropout",
    "hidden_dropout",
    "mlp_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attention_probs_dropout_prob",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_jitter_noise",
    "cache_implementation",
    "tie_word_embeddings",
];

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// The facts a plan is made from.
pub struct Facts<'a> {
    pub value: &'a Value,
}

impl<'a> Facts<'a> {
    /// Declared fields and the legacy keys the class reads, with their defaults.
    fn fields(&self) -> BTreeMap<String, Value> {
        let mut fields: BTreeMap<String, Value> = self
            .value
            .get("config_fields")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.get("default").cloned().unwrap_or(Value::Null)))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(legacy) = self.value.get("legacy_fields").and_then(Value::as_object) {
            for (k, v) in legacy {
                fields.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        fields
    }

    fn nullable(&self, name: &str) -> bool {
        self.value
            .pointer(&format!("/config_fields/{name}/nullable"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    fn resolved(&self, key: &str) -> Option<&Value> {
        let config = self.value.get("resolved_config")?;
        config.get(key).filter(|v| !v.is_null()).or_else(|| {
            // The config class's own name of a common field (GPT-2's `n_embd`).
            let own = self
                .value
                .pointer(&format!("/attribute_map/{key}"))?
                .as_str()?;
            config.get(own).filter(|v| !v.is_null())
        })
    }

    /// Parameter name → shape.
    fn parameters(&self) -> BTreeMap<String, Vec<i64>> {
        self.value
            .get("parameters")
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        let shape = p
                            .get("shape")
                            .and_then(Value::as_array)
                            .map(|s| s.iter().filter_map(Value::as_i64).collect())
                            .unwrap_or_default();
                        (str_of(p, "name").to_owned(), shape)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn module_class(&self, name: &str) -> Option<&str> {
        self.value
            .get("modules")
            .and_then(Value::as_array)?
            .iter()
            .find(|m| str_of(m, "name") == name)
            .map(|m| str_of(m, "class"))
    }

    /// Transformers' derivation of `layer_types` for probe configs without it.
    fn layer_type_probes(&self) -> Vec<(Value, Vec<String>)> {
        probes(self.value.get("layer_type_probes"), "layer_types")
    }

    fn no_rope_probes(&self) -> Vec<(Value, Vec<String>)> {
        probes(self.value.get("no_rope_probes"), "no_rope_layers")
    }

    /// What doubling each float field did to the tiny model's logits (`scalar_probes`):
    /// the effect `multiplies` or `divides`, else how far they moved (as text).
    fn scalar_probes(&self) -> Vec<(String, Value)> {
        self.value
            .get("scalar_probes")
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| {
                        Some((
                            p.get("field")?.as_str()?.to_owned(),
                            p.get("effect")?.clone(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What flipping each boolean field did to the tiny model (empty for facts recorded
    /// before the probes existed).
    fn flag_probes(&self) -> Vec<FlagProbe> {
        let names = |p: &Value, key: &str| -> Vec<String> {
            p.get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        self.value
            .get("flag_probes")
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| {
                        Some(FlagProbe {
                            field: p.get("field")?.as_str()?.to_owned(),
                            value: p.get("value")?.as_bool()?,
                            added: names(p, "added"),
                            removed: names(p, "removed"),
                            logits_max_abs: p.get("logits_max_abs").and_then(Value::as_f64),
                            refused: p.get("error").is_some(),
                            embeddings_times_sqrt_hidden_when: p
                                .get("embeddings_times_sqrt_hidden_when")
                                .and_then(Value::as_bool),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// One boolean config field flipped on the tiny model (`introspect.py`'s flag probes).
#[derive(Debug, Clone)]
pub struct FlagProbe {
    pub field: String,
    /// The flipped value.
    pub value: bool,
    /// Parameters the flipped model has and the tiny one lacks, and the other way round.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// How far the logits moved, the shared weights copied over.
    pub logits_max_abs: Option<f64>,
    /// The config class or the model refused the flipped value.
    pub refused: bool,
    /// The flip's whole effect is the embeddings times `√hidden_size` where the field has
    /// this value (the probe scaled one model's embeddings and got the other's logits).
    pub embeddings_times_sqrt_hidden_when: Option<bool>,
}

impl FlagProbe {
    /// Whether the flip changes what the model computes.
    pub fn changes_the_model(&self) -> bool {
        !self.added.is_empty()
            || !self.removed.is_empty()
            || self.logits_max_abs.is_some_and(|d| d > 0.0)
    }

    /// The field turns `param` on: flipping it to true adds it, or to false removes it.
    fn switches(&self, param: &str) -> bool {
        (self.value && self.added.iter().any(|p| p == param))
            || (!self.value && self.removed.iter().any(|p| p == param))
    }
}

fn probes(list: Option<&Value>, key: &str) -> Vec<(Value, Vec<String>)> {
    list.and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let result = p
                        .get(key)
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .map(|x| match x {
                                    Value::String(s) => s.clone(),
                                    other => other.to_string(),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    (p.get("config").cloned().unwrap_or(Value::Null), result)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Builds the plan for `module` from `facts`.
pub fn plan(facts_value: &Value, module: &str) -> Plan {
    use mlx_models::transformer::{MlpLayout, NormPlacement, QkNorm};
    // Layers whose mixer the module tree shows recurrent: a plan of their own.
    if let Some(plan) = super::recurrent::plan(facts_value, module) {
        return plan;
    }
    let facts = Facts { value: facts_value };
    let defaults = facts.fields();
    // The norms' roles from what Transformers computes (the call trace): their names in
    // the checkpoint may be anything; the plan reads the names the blocks load.
    let mut roles = super::trace::norm_roles(&layer_events(facts.value));
    roles
        .renames
        .extend(super::trace::final_norm_rename(facts.value));
    roles.renames.extend(saved_layer_renames(facts.value));
    for rename in expert_block_renames(&facts) {
        // The call trace may have named the block already (LFM2-MoE's `feed_forward`).
        if !roles.renames.contains(&rename) {
            roles.renames.push(rename);
        }
    }
    roles.renames.splice(0..0, block_vector_rename(&facts));
    roles.renames.extend(fused_qk_norm_renames(&facts));
    let bare = bare_bias_renames(facts.value, &roles.renames);
    roles.renames.splice(0..0, bare.iter().cloned());
    let head_renames = head_renames(facts.value);
    let prefix_renames: Vec<(String, String)> = head_renames
        .iter()
        .flatten()
        .cloned()
        .chain(structure_renames(facts.value))
        .collect();
    let prefixes: Vec<(&str, &str)> = prefix_renames
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let rename_all = |roles: &super::trace::NormRoles| -> BTreeMap<String, Vec<i64>> {
        facts
            .parameters()
            .into_iter()
            .map(|(name, shape)| {
                let name = mlx_models::weights::rename_prefix(&name, &prefixes);
                (super::trace::rename(&name, &roles.renames), shape)
            })
            .collect()
    };
    let mut params = rename_all(&roles);
    if fused_glu(&params) {
        match roles.renames.iter_mut().find(|(_, to)| to == "mlp.up_proj") {
            Some((_, to)) => *to = "mlp.gate_up_proj".to_owned(),
            None => roles
                .renames
                .push(("mlp.up_proj".to_owned(), "mlp.gate_up_proj".to_owned())),
        }
        params = rename_all(&roles);
    }
    // A dense MLP beside the experts of one layer (Granite-MoE-Shared's `shared_mlp`) is the
    // block's shared expert: every token goes through it, its output added to the experts'.
    let beside = dense_mlp_beside_experts(&facts, &params, &prefixes, &roles.renames);
    let beside_modules: Vec<String> = beside
        .iter()
        .filter_map(|(from, _)| from.rsplit_once('.').map(|(m, _)| m.to_owned()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !beside.is_empty() {
        // The projections' renames replace theirs; the module's own rename (`shared_mlp` →
        // `mlp`) takes what else it holds to the shared expert.
        roles
            .renames
            .retain(|(from, _)| !beside.iter().any(|(f, _)| f == from));
        for (from, to) in roles.renames.iter_mut() {
            let parent = beside.iter().any(|(f, _)| {
                f.strip_prefix(from.as_str())
                    .is_some_and(|r| r.starts_with('.'))
            });
            if parent && to == "mlp" {
                *to = "mlp.shared_expert".to_owned();
            }
        }
        roles.renames.splice(0..0, beside);
        params = rename_all(&roles);
    }
    // How the experts' router routes, from the probes.
    let mut routing = super::routing::decide(facts.value);
    let mut nested_bias_note: Option<String> = None;
    // A routing bias under a module of the router (ERNIE 4.5's
    // `gate.moe_statics.e_score_correction_bias`) is the router's own.
    if let Ok(Some(r)) = &mut routing {
        let nested = r.correction_bias.clone().filter(|v| {
            let leaf = format!(".mlp.gate.{v}");
            v.ends_with(".e_score_correction_bias") && params.keys().any(|n| n.ends_with(&leaf))
        });
        if let Some(v) = nested {
            let from = format!("mlp.gate.{v}");
            nested_bias_note = Some(format!(
                "`{from}` is the router's score-correction bias (the routing probes add it to \
                 the scores): loaded as `mlp.gate.e_score_correction_bias`"
            ));
            roles
                .renames
                .insert(0, (from, "mlp.gate.e_score_correction_bias".to_owned()));
            params = rename_all(&roles);
            r.correction_bias = Some("e_score_correction_bias".to_owned());
        }
    }
    let has_field = |name: &str| defaults.contains_key(name);
    let mut decisions = Vec::new();
    for (from, to) in &prefix_renames {
        decisions.push(format!(
            "`{from}` is the model's `{to}` (found by structure: the embedding, the ModuleList of \
             decoder layers, the final norm): renamed"
        ));
    }
    for (from, to) in &roles.renames {
        decisions.push(if bare.contains(&(from.clone(), to.clone())) {
            format!(
                "`{from}` is `{to}` (a bare vector the model adds to that projection's output: \
                 moved into its bias, the logits stay the same): renamed"
            )
        } else {
            format!(
                "`{from}` does what the blocks' `{to}` does (where Transformers calls it, and on what): renamed"
            )
        });
    }
    for module in &beside_modules {
        decisions.push(format!(
            "`{module}` is a dense MLP beside the experts of the same layer: the block's shared \
             expert (every token goes through it, its output added to the experts')"
        ));
    }
    let mut gaps = Vec::new();
    let mut aliases: Vec<(String, String)> = Vec::new();
    let mut intermediate_per_hidden = None;
    let mut fields: Vec<Field> = Vec::new();
    let add = |fields: &mut Vec<Field>, name: &str, ty: FieldType, role: &'static str| {
        if !fields.iter().any(|f| f.name == name) {
            fields.push(Field {
                name: name.to_owned(),
                ty,
                default: defaults.get(name).cloned().unwrap_or(Value::Null),
                nullable: facts.nullable(name),
                role,
            });
        }
    };
    let model_type = str_of(facts.value, "model_type").to_owned();

    // The decoder skeleton every supported family shares.
    // A model without a final norm is one whose layers each end in a norm of their own.
    let final_norm = params.contains_key("model.norm.weight") || !roles.post_residual;
    // Norms without parameters (OLMo's LayerNorms): none of layer 0's norms has a weight,
    // and its modules of those names (and the final `model.norm`) are norms.
    let is_norm = |name: &str| facts.module_class(name).is_some_and(|c| c.contains("Norm"));
    let weightless_norms = LAYER_NORMS
        .iter()
        .all(|n| !params.contains_key(&format!("model.layers.0.{n}.weight")))
        && LAYER_NORMS
            .iter()
            .any(|n| is_norm(&format!("model.layers.0.{n}")))
        && is_norm("model.norm");
    if weightless_norms {
        decisions.push(
            "the norms have no parameters (their modules are norms with no weight)".to_owned(),
        );
    }
    if !final_norm {
        decisions
            .push("no final norm: each layer ends in a norm of its own (post-residual)".to_owned());
    }
    for required in ["model.embed_tokens.weight", "model.norm.weight"] {
        let weightless = weightless_norms && required == "model.norm.weight";
        if !params.contains_key(required)
            && !weightless
            && (final_norm || required != "model.norm.weight")
        {
            gaps.push(format!("no `{required}`: not a Llama-shaped decoder"));
        }
    }
    gaps.extend(structure_gaps(facts.value));
    let norm_on_embeddings =
        facts.value.pointer("/structure/norm_on_embeddings") == Some(&Value::Bool(true));
    let rope_reversed = facts.value.pointer("/rotary_probe/reversed") == Some(&Value::Bool(true));
    if rope_reversed {
        decisions.push(
            "RoPE turns the other way: the probe's angles are negative (rotation by -θ)".to_owned(),
        );
    }
    if norm_on_embeddings {
        decisions.push(
            "the final norm also runs on the embeddings, before the first layer (the module \
             tree's call order)"
                .to_owned(),
        );
    }
    let learned_positions = learned_positions(facts.value, &params);
    if let Some(offset) = learned_positions {
        decisions.push(format!(
            "learned absolute positions `model.embed_positions`, position 0 at row {offset}"
        ));
    }
    let sinusoidal_positions = if learned_positions.is_none() {
        match sinusoidal_positions(facts.value) {
            Ok(None) => None,
            Ok(Some(s)) => {
                decisions.push(format!(
                    "fixed sinusoidal positions added to the embeddings (fitted to what layer 0 \
                     receives with the embedding zeroed): base {}, frequencies base^(-j / (hidden/2 - {})), \
                     {}, position 0 at angle {} · f",
                    s.base,
                    s.shift,
                    if s.interleaved {
                        "sine and cosine side by side per frequency"
                    } else {
                        "all sines, then all cosines"
                    },
                    s.first_position
                ));
                Some(s)
            }
            Err(gap) => {
                gaps.push(gap);
                None
            }
        }
    } else {
        None
    };
    let hybrid = super::recurrent::hybrid_plan(facts.value, &mut decisions, &mut gaps);
    if let Some(h) = &hybrid {
        let loaded = super::recurrent::loaded_as(h.mixer.kind);
        if let Some(decision) =
            super::recurrent::split_shared_path(facts.value, h, &mut roles.renames)
        {
            decisions.push(decision);
        }
        if h.path != loaded {
            roles.renames.push((h.path.clone(), loaded.to_owned()));
        }
        let rule = h.rule.fields().into_iter().map(|f| (f, None));
        let mixer = h.mixer.roles.iter().map(|(r, f)| (f.as_str(), Some(*r)));
        for (name, role) in rule.chain(mixer) {
            if !fields.iter().any(|f| f.name == name) {
                fields.push(super::recurrent::role_field(
                    &defaults,
                    name,
                    role,
                    h.mixer.kind,
                ));
            }
        }
    }
    let mut layer0: BTreeMap<&str, &Vec<i64>> = params
        .iter()
        .filter_map(|(n, s)| n.strip_prefix("model.layers.0.").map(|n| (n, s)))
        .collect();
    // A norm that is an Identity on layer 0 has its weights in the other layers.
    let identity = identity_norms(facts.value);
    let mut first_layer_no_input_norm = false;
    let mut identity_canonical = Vec::new();
    for (name, _, layers) in &identity {
        let canonical = super::trace::rename(&format!("model.layers.0.{name}."), &roles.renames);
        let canonical = canonical
            .trim_start_matches("model.layers.0.")
            .trim_end_matches('.');
        identity_canonical.push(canonical.to_owned());
        let Some(other) = (0..).find(|i| !layers.contains(i)) else {
            continue;
        };
        for (n, shape) in &params {
            if let Some(rest) = n
                .strip_prefix(&format!("model.layers.{other}."))
                .filter(|r| r.starts_with(&format!("{canonical}.")))
            {
                layer0.insert(rest, shape);
            }
        }
        if canonical == "input_layernorm" && layers.as_slice() == [0] {
            first_layer_no_input_norm = true;
            decisions.push(format!(
                "`{name}` is an Identity on layer 0, the pre-attention norm on the others: the first layer has none"
            ));
        } else {
            gaps.push(format!(
                "`{name}` is an Identity on layers {layers:?} only: no block leaves out that norm there"
            ));
        }
    }
    let has = |n: &str| layer0.contains_key(n);

    for (name, ty, role) in [
        ("vocab_size", FieldType::I32, "embedding rows, logits"),
        ("hidden_size", FieldType::I32, "model width"),
        ("intermediate_size", FieldType::I32, "MLP width"),
        ("num_hidden_layers", FieldType::Usize, "decoder layers"),
        ("num_attention_heads", FieldType::I32, "query heads"),
        (
            "num_key_value_heads",
            FieldType::I32,
            "key/value heads (GQA)",
        ),
        ("head_dim", FieldType::I32, "features per head"),
        (
            "max_position_embeddings",
            FieldType::Usize,
            "context length, RoPE",
        ),
        (
            "tie_word_embeddings",
            FieldType::Bool,
            "logits from the embedding matrix",
        ),
    ] {
        // The class's own name of the field: its attribute_map (GPT-2's `n_embd`), or for
        // the MLP width the field whose width probe widens the MLP (OPT's `ffn_dim`).
        let own = facts
            .value
            .pointer(&format!("/attribute_map/{name}"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| {
                let width = name == "intermediate_size" && !has_field(name);
                let attention = roles
                    .renames
                    .iter()
                    .find(|(_, to)| to == "self_attn")
                    .map_or("self_attn", |(from, _)| from.as_str());
                let (field, per_hidden) =
                    mlp_width_field(facts.value, attention, hidden_of(&facts), &params)
                        .filter(|_| width)?;
                intermediate_per_hidden = per_hidden;
                Some(field)
            });
        if has_field(name) || name == "tie_word_embeddings" {
            add(&mut fields, name, ty, role);
        } else if name == "head_dim" && has("self_attn.kv_a_proj_with_mqa.weight") {
            // Latent attention reads its widths from `MlaConfig` (GLM-4.7-Flash maps
            // `head_dim` onto `qk_rope_head_dim`, which the latent block reads as such).
        } else if let Some(own) = own.filter(|own| has_field(own)) {
            fields.push(Field {
                name: name.to_owned(),
                ty,
                default: defaults.get(&own).cloned().unwrap_or(Value::Null),
                nullable: facts.nullable(&own),
                role,
            });
            decisions.push(format!(
                "`{name}` is the config class's `{own}`{}: read under both names",
                match intermediate_per_hidden.filter(|_| name == "intermediate_size") {
                    Some(k) => format!(" ({k} × hidden_size when null)"),
                    None => String::new(),
                }
            ));
            aliases.push((name.to_owned(), own));
        } else if let Some((default, why)) = unnamed_field(&facts, name, &params) {
            if name == "intermediate_size" {
                intermediate_per_hidden = default.as_i64().and_then(|k| i32::try_from(k).ok());
            } else {
                fields.push(Field {
                    name: name.to_owned(),
                    ty,
                    default,
                    nullable: false,
                    role,
                });
            }
            decisions.push(why);
        } else if let (Some(k), true) = (
            fixed_mlp_width(hidden_of(&facts), &params),
            name == "intermediate_size" && intermediate_per_hidden.is_none(),
        ) {
            // No field sets the MLP width: a fixed multiple of the width (OpenAI GPT's 4).
            intermediate_per_hidden = Some(k);
            decisions.push(format!(
                "no config field sets the MLP width: {k} × hidden_size (the tiny model's)"
            ));
        } else if !matches!(name, "head_dim" | "num_key_value_heads") {
            gaps.push(format!("config class has no `{name}`"));
        }
    }
    // A field that sets the MLP width as a multiple of hidden_size (GPT-NeoX-Japanese's
    // `intermediate_multiple_size`): its default where a config has none.
    let intermediate_multiple = (!has_field("intermediate_size"))
        .then(|| mlp_width_multiple_field(facts.value, &roles.renames))
        .flatten()
        .filter(|f| defaults.get(f).and_then(Value::as_i64).is_some());
    if let Some(field) = &intermediate_multiple {
        let k = defaults.get(field).and_then(Value::as_i64).unwrap_or(0);
        intermediate_per_hidden = i32::try_from(k).ok();
        // What the tiny model's width alone said, now that a field is known to set it.
        let measured_only = |d: &str| {
            d.starts_with("no config field sets the MLP width")
                || d.starts_with("the MLP is ") && d.contains("the config class has no field")
        };
        decisions.retain(|d| !measured_only(d));
        decisions.push(format!(
            "the MLP is `{field}` × hidden_size wide (probed: set to {WIDTH_PROBE}, the MLP \
             became {WIDTH_PROBE} × hidden_size); {k} where a config has none"
        ));
    }
    if intermediate_per_hidden.is_none() && has_field("intermediate_size") {
        // A null `intermediate_size` the model reads as k × hidden_size (GPT-Neo: 4).
        intermediate_per_hidden = facts
            .value
            .get("null_width_per_hidden")
            .and_then(Value::as_i64)
            .and_then(|k| i32::try_from(k).ok());
        if let Some(k) = intermediate_per_hidden {
            decisions.push(format!(
                "a null `intermediate_size` is {k} × hidden_size (measured on a model built so)"
            ));
        }
    }
    let intermediate_divisor =
        intermediate_divisor(&facts, &params, has_field("intermediate_size"));
    if let Some(k) = intermediate_divisor {
        decisions.push(format!(
            "the MLP is `intermediate_size` / {k} wide (the tiny model's down projection takes \
             in that many features; the width probe widened no MLP weight)"
        ));
    }
    if let Some(f) = fields.iter_mut().find(|f| f.name == "tie_word_embeddings") {
        if f.default.is_null() {
            f.default = facts
                .resolved("tie_word_embeddings")
                .cloned()
                .unwrap_or(Value::Bool(false));
        }
    }

    // Attention projections.
    let qkv_fused = has("self_attn.qkv_proj.weight");
    let qkv_groups = qkv_groups(&facts, qkv_fused, &mut decisions, &mut gaps);
    let mla = mla_plan(&facts, &layer0, &defaults, &mut gaps);
    if let Some(m) = &mla {
        for name in MLA_FIELDS {
            let ty = match *name {
                "rope_interleave" => FieldType::Bool,
                _ => FieldType::I32,
            };
            if has_field(name) {
                add(&mut fields, name, ty, "latent attention");
            }
        }
        decisions.push(format!(
            "attention: multi-head latent attention ({} query, `kv_a_proj_with_mqa` → `kv_a_layernorm` → \
             `kv_b_proj`), scores scaled by `(qk_nope_head_dim + qk_rope_head_dim)^-0.5`; RoPE pairs {}",
            if has("self_attn.q_a_proj.weight") {
                "low-rank `q_a_proj` → `q_a_layernorm` → `q_b_proj`"
            } else {
                "`q_proj`"
            },
            if m.interleave_field {
                "when `rope_interleave`"
            } else {
                "decided by the fixtures"
            }
        ));
    } else if !(qkv_fused || has("self_attn.q_proj.weight") && has("self_attn.k_proj.weight")) {
        gaps.push("attention has neither q/k/v_proj nor qkv_proj".to_owned());
    }
    let bias_field = ["attention_bias", "use_bias", "bias"]
        .into_iter()
        .find(|f| has_field(f));
    let field_value = |name: &str| -> bool {
        facts
            .resolved(name)
            .or(defaults.get(name))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    // The probes name Transformers' parameters; the plan reads the blocks' names.
    let flag_probes: Vec<FlagProbe> = facts
        .flag_probes()
        .into_iter()
        .map(|mut p| {
            for list in [&mut p.added, &mut p.removed] {
                for name in list.iter_mut() {
                    let renamed = mlx_models::weights::rename_prefix(name, &prefixes);
                    *name = super::trace::rename(&renamed, &roles.renames);
                }
            }
            p
        })
        .collect();
    // Which field switches `param` on, as Transformers computes it: the flag probes.
    let probed = |param: &str| -> Option<Flag> {
        let full = format!("model.layers.0.{param}");
        flag_probes
            .iter()
            .find(|p| p.switches(&full))
            .map(|p| Flag::Field(p.field.clone()))
    };
    let bias_flag = |param: &str| -> Flag {
        if let Some(flag) = probed(param) {
            return flag;
        }
        let present = has(param);
        // A bias field whose flip switched attention parameters but not `param` does not
        // control it (Helium: `attention_bias` puts biases on q/k/v, never on o_proj).
        let probed_field = |f: &str| {
            flag_probes.iter().any(|p| {
                p.field == f
                    && !p.refused
                    && p.added
                        .iter()
                        .chain(&p.removed)
                        .any(|n| n.starts_with("model.layers.0.self_attn."))
            })
        };
        match bias_field {
            // The field controls it unless the instance contradicts the field's value.
            Some(f) if !probed_field(f) && field_value(f) == present => Flag::Field(f.to_owned()),
            _ if present => Flag::Always,
            _ => Flag::Never,
        }
    };
    let (qkv_bias, o_bias) = if qkv_fused {
        (
            bias_flag("self_attn.qkv_proj.bias"),
            bias_flag("self_attn.o_proj.bias"),
        )
    } else if mla.is_some() {
        // Latent attention's input projections carry what the blocks call q/k/v biases.
        (
            bias_flag("self_attn.kv_a_proj_with_mqa.bias"),
            bias_flag("self_attn.o_proj.bias"),
        )
    } else {
        (
            bias_flag("self_attn.q_proj.bias"),
            bias_flag("self_attn.o_proj.bias"),
        )
    };
    // A bias some layers hold and others not (GPT-NeoX-Japanese: the last layer's o_proj).
    let o_bias_only = match only_layer(
        facts.value,
        &params,
        &roles.renames,
        "self_attn.o_proj.bias",
    ) {
        Ok(rule) => rule,
        Err(gap) => {
            gaps.push(gap);
            None
        }
    };
    let o_bias = if let Some(rule) = o_bias_only {
        decisions.push(format!(
            "`self_attn.o_proj.bias` on the {} layer only (the tiny model's layers and models \
             built with other layer counts)",
            match rule {
                OnlyLayer::First => "first",
                OnlyLayer::Last => "last",
            }
        ));
        Flag::Never
    } else {
        o_bias
    };
    for name in [
        "self_attn.qkv_proj.bias",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.bias",
    ] {
        match only_layer(facts.value, &params, &roles.renames, name) {
            Ok(None) => {}
            Ok(Some(_)) => gaps.push(format!(
                "`{name}` on one layer only: no block takes a per-layer q/k/v bias"
            )),
            Err(gap) => gaps.push(gap),
        }
    }
    decisions.push(format!(
        "attention: {} projections, q/k/v bias {:?}, o_proj bias {:?}",
        if qkv_fused {
            "fused qkv_proj"
        } else {
            "separate q/k/v"
        },
        qkv_bias,
        o_bias
    ));
    let hidden = facts
        .resolved("hidden_size")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let heads = facts
        .resolved("num_attention_heads")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let head_dim = facts
        .resolved("head_dim")
        .and_then(Value::as_i64)
        .unwrap_or(hidden / heads.max(1));
    // A sink logit per query head joins each softmax's denominator (gpt-oss, Granite SWA).
    let sinks = match layer0.get("self_attn.sinks") {
        None => false,
        Some(shape) if shape.as_slice() == [heads] => {
            decisions.push(format!(
                "`self_attn.sinks` of [{heads}]: a learned sink logit per head in the softmax"
            ));
            true
        }
        Some(shape) => {
            gaps.push(format!(
                "`self_attn.sinks` is {shape:?}, not one logit per each of the {heads} heads"
            ));
            false
        }
    };
    // An output gate from a projection of its own: `gate_proj` of one row per query
    // feature, called by the attention on its input (the call trace), the output before
    // `o_proj` times its sigmoid (the fixtures check the formula).
    let gate_proj = match layer0.get("self_attn.gate_proj.weight") {
        None => false,
        Some(shape) if shape.as_slice() == [heads * head_dim, hidden] => {
            decisions.push(format!(
                "`self_attn.gate_proj` of [{}, {hidden}]: the attention output times the sigmoid of \
                 this projection of the layer's input, per query feature",
                heads * head_dim
            ));
            true
        }
        Some(shape) => {
            gaps.push(format!(
                "`self_attn.gate_proj` is {shape:?}, not [heads · head_dim {}, hidden {hidden}]",
                heads * head_dim
            ));
            false
        }
    };
    // An output gate `q_proj` computes with the queries: twice the query rows, read per head
    // as its queries then its gate (the fixtures check the layout); the output before
    // `o_proj` times its sigmoid.
    let output_gate = match layer0.get("self_attn.q_proj.weight") {
        Some(shape) if shape.first() == Some(&(2 * heads * head_dim)) => {
            decisions.push(format!(
                "`self_attn.q_proj` of {shape:?}: twice heads · head_dim rows, each head's queries \
                 then a gate of its width; the attention output times the gate's sigmoid"
            ));
            true
        }
        _ => false,
    };
    // Differential attention: four learned vectors of one head's width give each layer's λ.
    let lambdas = ["lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"].map(|n| {
        layer0
            .get(format!("self_attn.{n}").as_str())
            .map(|s| s.as_slice())
    });
    let differential = match lambdas {
        [None, None, None, None] => false,
        l if l.iter().all(|s| *s == Some(&[head_dim][..])) => {
            decisions.push(format!(
                "`self_attn.lambda_q1/k1/q2/k2` of [{head_dim}]: differential attention \
                 (two softmaxes combined by a learned λ per layer)"
            ));
            true
        }
        l => {
            gaps.push(format!(
                "`self_attn.lambda_*` are {l:?}: not the four [{head_dim}] vectors of \
                 differential attention"
            ));
            false
        }
    };
    // Query/key norms with no weight (NanoChat's, after RoPE).
    let weightless_qk = facts
        .module_class("model.layers.0.self_attn.q_norm")
        .is_some_and(|c| c.contains("Norm"));
    let qk_norm = match layer0.get("self_attn.q_norm.weight") {
        None if weightless_qk && roles.qk_after_rope => QkNorm::L2AfterRope,
        None if weightless_qk => {
            gaps.push(
                "`self_attn.q_norm` has no weight and runs before RoPE: no block computes \
                 that (`QkNorm::L2AfterRope` runs after it)"
                    .to_owned(),
            );
            QkNorm::None
        }
        None => QkNorm::None,
        Some(shape) if shape.as_slice() == [head_dim] && roles.qk_after_rope => {
            QkNorm::PerHeadAfterRope
        }
        Some(shape) if shape.as_slice() == [head_dim] => QkNorm::PerHead,
        Some(_) => QkNorm::Projection,
    };
    if qk_norm != QkNorm::None {
        decisions.push(format!(
            "q_norm/k_norm of width {:?}: {qk_norm:?}",
            layer0.get("self_attn.q_norm.weight")
        ));
    }

    // Norms inside the attention and the MLP, before their output projections (BitNet's
    // sub-norms): of the attention output's width and the MLP's hidden width.
    let sub_norms = match (
        layer0.get("self_attn.attn_sub_norm.weight"),
        layer0.get("mlp.ffn_sub_norm.weight"),
    ) {
        (None, None) => false,
        (Some(attn), Some(ffn))
            if attn.as_slice() == [heads * head_dim]
                && layer0
                    .get("mlp.down_proj.weight")
                    .is_some_and(|down| down.get(1) == ffn.first()) =>
        {
            decisions.push(format!(
                "sub-norms: `self_attn.attn_sub_norm` of {attn:?} on the attention output \
                 before `o_proj`, `mlp.ffn_sub_norm` of {ffn:?} on the MLP's hidden features \
                 before `down_proj`"
            ));
            true
        }
        (attn, ffn) => {
            gaps.push(format!(
                "sub-norms `self_attn.attn_sub_norm` {attn:?} and `mlp.ffn_sub_norm` {ffn:?}: \
                 not the pair of the attention output's and the MLP's hidden width"
            ));
            false
        }
    };

    // A mixture of experts in place of the MLP: how its router routes, from the probes.
    // The bias note of the routing decided above.
    decisions.extend(nested_bias_note);
    let routing_vector = routing
        .as_ref()
        .ok()
        .and_then(|r| r.as_ref()?.correction_bias.clone());
    // The first layer with experts (DeepSeek-style families keep the first ones dense).
    let sparse_layer: BTreeMap<&str, &Vec<i64>> = params
        .keys()
        .filter_map(|n| {
            let (index, path) = n.strip_prefix("model.layers.")?.split_once('.')?;
            path.starts_with("mlp.experts").then_some(index)
        })
        .min_by_key(|i| i.parse::<usize>().unwrap_or(usize::MAX))
        .inspect(|&index| {
            // Layer 0's parameters are checked below; a later sparse layer's here.
            if index == "0" {
                return;
            }
            let prefix = format!("model.layers.{index}.mlp.");
            let taken = |rest: &str| {
                matches!(
                    rest,
                    "gate.weight"
                        | "experts.gate_up_proj"
                        | "experts.down_proj"
                        | "shared_expert.gate_proj.weight"
                        | "shared_expert.up_proj.weight"
                        | "shared_expert.gate_up_proj.weight"
                        | "shared_expert.down_proj.weight"
                        | "shared_expert_gate.weight"
                ) || routing_vector.as_ref().is_some_and(|v| {
                    // Where the block loads it, whatever the model calls it.
                    rest.strip_prefix("gate.") == Some(v.as_str())
                        || rest == "gate.e_score_correction_bias"
                }) || rest.strip_prefix("experts.").is_some_and(|r| {
                    r.split_once('.').is_some_and(|(i, p)| {
                        i.parse::<usize>().is_ok()
                            && ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
                                .contains(&p)
                    })
                })
            };
            for name in params.keys() {
                if name.strip_prefix(&prefix).is_some_and(|rest| !taken(rest)) {
                    gaps.push(format!("parameter `{name}` is taken by no known block"));
                }
            }
        })
        .map(|index| {
            let prefix = format!("model.layers.{index}.");
            params
                .iter()
                .filter_map(|(n, s)| n.strip_prefix(&prefix).map(|n| (n, s)))
                .collect()
        })
        .unwrap_or_default();
    let mut moe = moe_plan(&facts, &sparse_layer, &defaults, routing, &mut gaps);
    // The flag that switches the shared expert's biases (the flag probes see them appear).
    if let Some(m) = moe.as_mut().filter(|m| m.shared_expert.is_some()) {
        let shared_bias = |n: &String| n.contains(".shared_expert") && n.ends_with(".bias");
        if let Some(p) = flag_probes.iter().find(|p| {
            !p.refused
                && if p.value {
                    p.added.iter().any(shared_bias)
                } else {
                    p.removed.iter().any(shared_bias)
                }
        }) {
            m.shared_expert_bias = Flag::Field(p.field.clone());
        }
    }
    if let Some(m) = moe.as_mut() {
        for (name, ty, role) in moe_probed_decisions(&facts, m, &mut gaps, &mut decisions) {
            add(&mut fields, &name, ty, role);
        }
    }
    if let Some(m) = &moe {
        let width = |name: &str| defaults.contains_key(name) || facts.resolved(name).is_some();
        for (names, ty, role) in [
            (
                &["num_experts", "num_local_experts", "n_routed_experts"][..],
                FieldType::I32,
                "routed experts",
            ),
            (
                &["num_experts_per_tok", "moe_topk"],
                FieldType::I32,
                "experts per token",
            ),
            (
                &["moe_intermediate_size"],
                FieldType::I32,
                "width of each expert",
            ),
            (
                &[
                    "shared_expert_intermediate_size",
                    "shared_intermediate_size",
                    "n_shared_experts",
                    "num_shared_experts",
                    "moe_num_shared_experts",
                ],
                FieldType::I32,
                "shared expert width",
            ),
            (
                &["norm_topk_prob"],
                FieldType::Bool,
                "renormalize the chosen experts' weights",
            ),
            (
                &["decoder_sparse_step", "moe_layer_interval"],
                FieldType::I32,
                "every n-th layer sparse",
            ),
            (
                &["mlp_only_layers"],
                FieldType::IntList,
                "layers with a dense MLP",
            ),
            (
                &[
                    "first_k_dense_replace",
                    "moe_layer_start_index",
                    "num_dense_layers",
                ],
                FieldType::I32,
                "the first layers with a dense MLP",
            ),
            (
                &["moe_layer_end_index"],
                FieldType::I32,
                "the last layer with experts (-1: none)",
            ),
        ] {
            // A name the class has, else one its attribute_map gives.
            let Some(name) = names
                .iter()
                .find(|n| has_field(n))
                .or_else(|| names.iter().find(|n| width(n)))
            else {
                continue;
            };
            // The class's own name of it (ERNIE 4.5's `moe_num_experts`) that `MoeConfig`
            // does not read: read under both.
            let own = facts
                .value
                .pointer(&format!("/attribute_map/{name}"))
                .and_then(Value::as_str)
                .filter(|own| !has_field(name) && has_field(own) && !MOE_FIELDS.contains(own));
            match own {
                Some(own) => {
                    fields.push(Field {
                        name: (*name).to_owned(),
                        ty,
                        default: defaults.get(own).cloned().unwrap_or(Value::Null),
                        nullable: facts.nullable(own),
                        role,
                    });
                    decisions.push(format!(
                        "`{name}` is the config class's `{own}`: read under both names"
                    ));
                    aliases.push(((*name).to_owned(), own.to_owned()));
                }
                None => add(&mut fields, name, ty, role),
            }
        }
        if let Some(r) = &m.routing {
            if let Some(scale) = &r.scaled_by {
                add(
                    &mut fields,
                    scale,
                    FieldType::F64,
                    "multiplies the chosen experts' weights",
                );
            }
            if let Some(by) = &r.scores_by {
                add(
                    &mut fields,
                    &by.field,
                    FieldType::Str,
                    "how the router scores experts",
                );
            }
            if let super::routing::Groups::ByField { field, .. } = &r.groups {
                add(
                    &mut fields,
                    field,
                    FieldType::Str,
                    "how the router chooses experts",
                );
            }
            if r.groups != super::routing::Groups::Fixed(None) {
                add(&mut fields, "n_group", FieldType::I32, "groups of experts");
                add(
                    &mut fields,
                    "topk_group",
                    FieldType::I32,
                    "groups eligible per token",
                );
            }
        }
        if m.layer_types_dense_prefix.is_some() {
            add(
                &mut fields,
                "mlp_layer_types",
                FieldType::LayerTypes,
                "`dense` or `sparse` per layer",
            );
        }
        if let Some(r) = &m.routing {
            decisions.push(format!(
                "router (from the routing probes): {}",
                r.describe()
            ));
        }
        if let Some(k) = m.layer_types_dense_prefix {
            decisions.push(format!(
                "sparse layers: as `mlp_layer_types` lists them; without it the first {k} dense (as Transformers derives)"
            ));
        }
        decisions.push(format!(
            "feed-forward: a mixture of experts (router `mlp.gate`, {} experts{}{}), {}, {}{}",
            if sparse_layer.contains_key("mlp.experts.gate_up_proj") {
                "stacked"
            } else {
                "per-expert"
            },
            match m.shared_expert {
                Some(true) => ", a shared expert gated by `shared_expert_gate`",
                Some(false) => ", a shared expert",
                None => "",
            },
            if m.checkpoint_renames.is_empty() {
                String::new()
            } else {
                format!(
                    ", Hub checkpoints' names converted as Transformers does: {:?}",
                    m.checkpoint_renames
                )
            },
            if m.routing.is_some() {
                "routed as above"
            } else {
                "softmax top-k"
            },
            match &m.normalize_field {
                Some(f) => format!("renormalized when `{f}`"),
                None => "renormalization decided by the fixtures".to_owned(),
            },
            if m.dense_layers {
                "; the config's dense layers keep a gated MLP of `intermediate_size`"
            } else {
                ""
            }
        ));
    }

    // MLP.
    let mlp_layout = if moe.is_some() {
        // The dense layers of a mixture-of-experts family (the tiny model's layer 0 is
        // sparse): a gated MLP, as every such family in the zoo; the dense-layer fixtures
        // verify it.
        MlpLayout::Gated
    } else if has("mlp.gate_up_proj.weight") {
        MlpLayout::FusedGated
    } else if has("mlp.gate_proj.weight") {
        MlpLayout::Gated
    } else if has("mlp.c_fc.weight") {
        MlpLayout::Plain
    } else if has("mlp.up_proj.weight") && has("mlp.down_proj.weight") {
        MlpLayout::UpDown
    } else {
        gaps.push(
            "MLP has none of gate_proj/up_proj, gate_up_proj, c_fc/c_proj, up_proj/down_proj"
                .to_owned(),
        );
        MlpLayout::Gated
    };
    let mlp_bias_param = match mlp_layout {
        MlpLayout::Gated => "mlp.gate_proj.bias",
        MlpLayout::FusedGated => "mlp.gate_up_proj.bias",
        MlpLayout::Plain => "mlp.c_fc.bias",
        MlpLayout::UpDown => "mlp.up_proj.bias",
    };
    let mlp_bias = match ["mlp_bias", "use_bias"].into_iter().find(|f| has_field(f)) {
        _ if probed(mlp_bias_param).is_some() => probed(mlp_bias_param).expect("just found"),
        Some(f) if field_value(f) == has(mlp_bias_param) => Flag::Field(f.to_owned()),
        _ if has(mlp_bias_param) => Flag::Always,
        _ => Flag::Never,
    };
    decisions.push(format!("MLP: {mlp_layout:?}, bias {mlp_bias:?}"));

    // Norms: the names say which exist; their placement and offset are tried.
    let norm_param = "input_layernorm";
    let present: Vec<&str> = LAYER_NORMS
        .into_iter()
        .filter(|n| {
            has(&format!("{n}.weight"))
                || weightless_norms && is_norm(&format!("model.layers.0.{n}"))
        })
        .collect();
    let placements: Vec<NormPlacement> = match present.as_slice() {
        // Both norms before the residual stream's two sub-blocks: in sequence (Llama) or
        // side by side (GPT-NeoX); the fixtures tell.
        ["input_layernorm", "post_attention_layernorm"] => {
            vec![NormPlacement::Pre, NormPlacement::ParallelTwoNorms]
        }
        // One norm per layer: attention and MLP side by side on it (Cohere, Phi).
        ["input_layernorm"] => vec![NormPlacement::Parallel],
        ["post_attention_layernorm", "post_feedforward_layernorm"] if roles.post_residual => {
            decisions.push(
                "norms on the residual sums (the layer returns its last norm's output): post-residual"
                    .to_owned(),
            );
            vec![NormPlacement::PostResidual]
        }
        ["post_attention_layernorm", "post_feedforward_layernorm"] => vec![NormPlacement::Post],
        [_, _, _, _] => vec![NormPlacement::Sandwich],
        other => {
            gaps.push(format!("layer norms {other:?} match no known placement"));
            vec![NormPlacement::Pre]
        }
    };
    // The kind of norm read on layer 0, from a norm it has (not an Identity there).
    let norm_name = present
        .iter()
        .find(|n| !identity_canonical.iter().any(|c| c == *n))
        .or(present.first())
        .copied()
        .unwrap_or(norm_param);
    let norm_class = facts
        .module_class(&format!("model.layers.0.{norm_name}"))
        .or_else(|| {
            renamed_module_class(
                &facts,
                &format!("model.layers.0.{norm_name}"),
                &prefixes,
                &roles.renames,
            )
        })
        .unwrap_or_default()
        .to_owned();
    // A flag that switches the norms' bias alone (the ModernBERT decoder's `norm_bias`; not
    // OPT's `layer_norm_elementwise_affine`, which takes the weight too).
    let norm_bias_flag = {
        let (bias, weight) = (
            format!("model.layers.0.{norm_name}.bias"),
            format!("model.layers.0.{norm_name}.weight"),
        );
        flag_probes
            .iter()
            .find(|p| p.switches(&bias) && !p.added.iter().chain(&p.removed).any(|n| *n == weight))
            .map(|p| Flag::Field(p.field.clone()))
    };
    let layer_norm = if let Some(flag) = norm_bias_flag {
        Some(flag)
    } else if has(&format!("{norm_name}.bias")) {
        Some(Flag::Always)
    } else if norm_class.contains("LayerNorm") && !norm_class.contains("RMS") {
        Some(Flag::Never)
    } else {
        None
    };
    decisions.push(format!(
        "norms: {present:?} ({norm_class}), {}",
        if layer_norm.is_some() {
            "LayerNorm"
        } else {
            "RMSNorm"
        }
    ));
    // The epsilon field the tiny model's config has a value for (Nemotron declares a
    // `layer_norm_eps` it leaves null and reads `norm_eps`); the scalar probes say which
    // one moves the logits where both have values.
    let eps_names = [
        "rms_norm_eps",
        "layer_norm_eps",
        "norm_epsilon",
        "norm_eps",
        "layer_norm_epsilon",
    ];
    // A field moves the logits if doubling it scaled them or moved them at all.
    let probes: BTreeMap<String, bool> = facts
        .scalar_probes()
        .into_iter()
        .filter_map(|(field, effect)| {
            let moved = effect.is_string() || effect.as_f64()? > 0.0;
            Some((field, moved))
        })
        .collect();
    let eps_field = eps_names
        .into_iter()
        .filter(|f| has_field(f) && facts.resolved(f).is_some())
        .find(|f| probes.get(*f).is_none_or(|moved| *moved))
        .or_else(|| eps_names.into_iter().find(|f| has_field(f)))
        .unwrap_or("rms_norm_eps")
        .to_owned();
    // No epsilon field: the norms' own, as the model builds them (OPT's LayerNorm 1e-5).
    let eps_constant = (!has_field(&eps_field))
        .then(|| module_eps(facts.value))
        .flatten();
    if let Some(eps) = eps_constant {
        decisions.push(format!(
            "norm epsilon {eps}: no config field, the norms' own"
        ));
    } else {
        add(&mut fields, &eps_field, FieldType::F64, "norm epsilon");
    }
    let null_norm = null_norm_decision(&facts, &eps_field, &layer_norm, &mut gaps, &mut decisions);
    if let Some(n) = &null_norm {
        add(
            &mut fields,
            &n.eps_field,
            FieldType::F64,
            "norm epsilon where the other is null",
        );
    }
    // The activation's field: a usual name, else a string field whose default names an
    // activation (OpenAI GPT's `afn`); without one, the activation module Transformers
    // calls in the MLP (CTRL's `ReLU`) is the module's own, fixed.
    let own_act_field = ["hidden_activation", "hidden_act", "activation_function"]
        .into_iter()
        .find(|f| has_field(f))
        .map(str::to_owned)
        .or_else(|| {
            defaults
                .iter()
                .find(|(_, v)| v.as_str().is_some_and(|v| ACTIVATION_NAMES.contains(&v)))
                .map(|(name, _)| name.clone())
        });
    let activation_constant = match &own_act_field {
        Some(_) => None,
        None => super::trace::events(facts.value)
            .iter()
            .find_map(|e| super::trace::activation_of_class(&e.class)),
    };
    let act_field = own_act_field.unwrap_or_else(|| "hidden_act".to_owned());
    match activation_constant {
        Some(name) => decisions.push(format!(
            "activation `{name}`: no config field names one; the module Transformers calls in the MLP"
        )),
        None => {
            add(&mut fields, &act_field, FieldType::Str, "MLP activation");
            // No field and no activation module the blocks know (BLOOM's `BloomGelu`): the
            // activation measured on the MLP's module is the field's default.
            if let Some(act) = measured_activation(&facts, &act_field) {
                if let Some(f) = fields.iter_mut().find(|f| f.name == act_field) {
                    f.default = Value::String(act.clone());
                }
                decisions.push(format!(
                    "MLP activation `{act}` where config.json names none: the config class has \
                     no `{act_field}`; measured on the MLP's activation module"
                ));
            }
        }
    }

    // The bias switches read from the config.
    for f in [&qkv_bias, &o_bias, &mlp_bias]
        .into_iter()
        .chain(layer_norm.as_ref())
    {
        if let Flag::Field(name) = f {
            add(&mut fields, name, FieldType::Bool, "biases on");
        }
    }

    // Scales and caps named by config fields.
    let scalar = |fields: &mut Vec<Field>, names: &[&str], make: fn(String) -> Scalar, role| {
        for &name in names {
            if has_field(name) {
                add(fields, name, FieldType::F64, role);
                return make(name.to_owned());
            }
        }
        Scalar::None
    };
    let mut attention_scale = scalar(
        &mut fields,
        &["query_pre_attn_scalar"],
        Scalar::InvSqrtField,
        "attention scores scaled by its inverse square root",
    );
    if attention_scale == Scalar::None {
        attention_scale = scalar(
            &mut fields,
            &["attention_multiplier"],
            Scalar::Field,
            "attention scores scale",
        );
    }
    if attention_scale == Scalar::None {
        if let Some((scale, decision)) = measured_attention_scale(facts.value, head_dim) {
            if let Scalar::OneUnless(field) = &scale {
                add(
                    &mut fields,
                    field,
                    FieldType::Bool,
                    "attention scores scaled by head_dim^-0.5 (else not at all)",
                );
            }
            decisions.push(decision);
            attention_scale = scale;
        }
    }
    let attention_softcap = scalar(
        &mut fields,
        &["attn_logit_softcapping"],
        Scalar::Field,
        "attention scores soft cap",
    );
    let clip_qkv = scalar(
        &mut fields,
        &["clip_qkv"],
        Scalar::Field,
        "clamps q, k and v to plus or minus it",
    );
    let final_softcap = scalar(
        &mut fields,
        &["final_logit_softcapping", "logits_soft_cap"],
        Scalar::Field,
        "logits soft cap",
    );
    let mut residual_scale = scalar(
        &mut fields,
        &["residual_multiplier"],
        Scalar::Field,
        "sub-block outputs scale",
    );
    if residual_scale == Scalar::None {
        // Depth-scaled residual branches (muP): the fixtures verify the formula.
        residual_scale = scalar(
            &mut fields,
            &["scale_depth"],
            Scalar::FieldOverSqrtLayers,
            "sub-block outputs scaled by it over √num_hidden_layers",
        );
    }
    // Which field scales the logits, as Transformers computes it: doubling it doubles
    // (or halves) them on the tiny model (the scalar probes); else Granite's name.
    let probed_logits = facts
        .scalar_probes()
        .into_iter()
        .find_map(|(field, effect)| match effect.as_str()? {
            "multiplies" => Some((
                field,
                Scalar::Field as fn(String) -> Scalar,
                "logits times it",
            )),
            "divides" => Some((
                field,
                Scalar::InvField as fn(String) -> Scalar,
                "logits divided by it",
            )),
            _ => None,
        });
    let logits_scale = match probed_logits {
        Some((field, make, role)) => {
            add(&mut fields, &field, FieldType::F64, role);
            decisions.push(format!("`{field}` scales the logits ({role}): doubling it on the tiny model did the same to them"));
            make(field)
        }
        None => match scalar(
            &mut fields,
            &["logits_scaling"],
            Scalar::InvField,
            "logits divided by it",
        ) {
            // Width-scaled logits (muP): the fixtures verify the formula.
            Scalar::None => scalar(
                &mut fields,
                &["dim_model_base"],
                Scalar::FieldOverHidden,
                "logits scaled by it over hidden_size",
            ),
            found => found,
        },
    };
    let mut embedding_field = scalar(
        &mut fields,
        &["embedding_multiplier", "scale_emb"],
        Scalar::Field,
        "embeddings scale",
    );
    // A flag whose whole effect is the embeddings times √hidden_size (the flag probes).
    if embedding_field == Scalar::None {
        if let Some((field, when)) = flag_probes.iter().find_map(|p| {
            p.embeddings_times_sqrt_hidden_when
                .map(|when| (p.field.clone(), when))
        }) {
            add(
                &mut fields,
                &field,
                FieldType::Bool,
                "embeddings times √hidden_size",
            );
            decisions.push(format!(
                "`{field}` {when} scales the embeddings by √hidden_size (flipped, the other \
                 model with its embeddings so scaled gave its logits)"
            ));
            embedding_field = Scalar::SqrtHiddenWhen(field, when);
        }
    }

    // Sliding windows.
    let sliding_window = has_field("sliding_window").then(|| "sliding_window".to_owned());
    if sliding_window.is_some() {
        add(
            &mut fields,
            "sliding_window",
            FieldType::I32,
            "sliding-window width",
        );
    }
    let window_divisor = facts
        .value
        .get("window_divisor")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let mut divided_aliases = Vec::new();
    let sliding_window = sliding_window.or_else(|| {
        let own = window_field(facts.value).filter(|own| has_field(own))?;
        let default = defaults.get(&own).cloned().unwrap_or(Value::Null);
        fields.push(Field {
            name: "sliding_window".to_owned(),
            ty: FieldType::I32,
            default: match default.as_i64() {
                Some(v) => Value::from(v.div_euclid(window_divisor)),
                None => default,
            },
            nullable: facts.nullable(&own),
            role: "sliding-window width",
        });
        if window_divisor != 1 {
            decisions.push(format!(
                "`sliding_window` is the config class's `{own}` / {window_divisor} (set to a few tokens \
                 times {window_divisor}, the attention Transformers computes sees a {window_divisor}-th \
                 of them on some layers): read so where config.json has no `sliding_window`"
            ));
            divided_aliases.push(("sliding_window".to_owned(), own, window_divisor));
            return Some("sliding_window".to_owned());
        }
        decisions.push(format!(
            "`sliding_window` is the config class's `{own}` (set to a few tokens, the attention \
             Transformers computes sees only that many on some layers): read under both names"
        ));
        aliases.push(("sliding_window".to_owned(), own));
        Some("sliding_window".to_owned())
    });
    // Each layer's attention under the class's own name (GPT-Neo's `attention_layers`):
    // read as `layer_types` where config.json has none.
    let per_layer = (sliding_window.is_some() && !has_field("layer_types"))
        .then(|| facts.value.get("per_layer_field").and_then(Value::as_str))
        .flatten()
        .filter(|own| {
            facts.resolved(own).is_some_and(|v| {
                serde_json::from_value::<Vec<mlx_models::transformer::LayerType>>(v.clone()).is_ok()
            })
        });
    if let Some(own) = per_layer {
        decisions.push(format!(
            "`layer_types` is the config's `{own}` (one entry per layer, telling apart the layers \
             whose attention Transformers computes over a window): read under both names"
        ));
        aliases.push(("layer_types".to_owned(), own.to_owned()));
    }
    let layer_types_field = has_field("layer_types") || per_layer.is_some();
    if layer_types_field {
        add(
            &mut fields,
            "layer_types",
            FieldType::LayerTypes,
            "sliding or full attention per layer",
        );
    }
    let layer_rule = if sliding_window.is_none() {
        LayerRule::NoSliding
    } else {
        let rule = derive_layer_rule(&facts.layer_type_probes(), &defaults).or_else(|| {
            window_needs_enabling(&facts, &defaults).then(|| {
                decisions.push(
                    "the config class drops `sliding_window` unless `use_sliding_window` (the tiny \
                     config without it resolves to no window): every layer slides when enabled"
                        .to_owned(),
                );
                LayerRule::AllWhenEnabled
            })
        });
        for (name, meaning) in rule.map_or(&[][..], LayerRule::fields) {
            let kind = match *name {
                "use_sliding_window" => FieldType::Bool,
                _ => FieldType::I32,
            };
            add(&mut fields, name, kind, meaning);
        }
        rule.unwrap_or_else(|| {
            if layer_types_field {
                gaps.push(
                    "no rule reproduces how Transformers derives `layer_types` for configs without it"
                        .to_owned(),
                );
            }
            LayerRule::All
        })
    };
    if sliding_window.is_some() {
        decisions.push(format!("layers without `layer_types`: {layer_rule:?}"));
    }
    // A Hub key that changes which layers slide (the ModernBERT decoder's
    // `global_attn_every_n_layers`): the period of the rule where every value probed gives
    // the rule at that period; else its default is the rule's, other values are refused.
    // So is a field of the class that changes the layer types it derives (AFMoE's
    // `global_attn_every_n_layers`), probed at several values.
    let layer_key = legacy_effect(facts.value, "layer_types")
        .or_else(|| {
            let probed = facts.value.get("field_layer_probes")?.as_object()?;
            match probed.keys().collect::<Vec<_>>().as_slice() {
                [one] => Some((*one).clone()),
                _ => None,
            }
        })
        .filter(|key| !layer_rule.fields().iter().any(|(name, _)| name == key))
        // A key that says which layers attend in a hybrid (Qwen3-Next's
        // `full_attention_interval`) is the hybrid rule's.
        .filter(|key| {
            !hybrid
                .as_ref()
                .is_some_and(|h| h.rule.fields().contains(&key.as_str()))
        });
    let layer_period = layer_key
        .clone()
        .filter(|key| period_key_holds(facts.value, key, layer_rule));
    if let Some(key) = &layer_period {
        add(
            &mut fields,
            key,
            FieldType::I32,
            "the period of the full-attention layers",
        );
        decisions.push(format!(
            "`{key}` is the period of {layer_rule:?}: every value probed gives those layers"
        ));
    }
    let layer_key_refused = layer_key
        .filter(|_| layer_period.is_none())
        .and_then(|key| Some((defaults.get(&key)?.as_i64()?, key)));
    if let Some((default, key)) = &layer_key_refused {
        add(
            &mut fields,
            key,
            FieldType::I32,
            "checked: the value the fixtures verify, others refused",
        );
        decisions.push(format!(
            "`{key}` (Hub configs) sets which layers slide; {layer_rule:?} is its default {default}: other values refused"
        ));
    }

    // RoPE.
    let rope_per_type = facts
        .resolved("rope_parameters")
        .map(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some())
        .unwrap_or(false);
    let measured_rope = measured_rope(&facts, &has_field, &mut decisions, &mut gaps);
    if let Some(f) = &measured_rope.dims_field {
        add(
            &mut fields,
            f,
            FieldType::I32,
            "rotated features of each head",
        );
        if facts.nullable(f) || defaults.get(f).is_none_or(Value::is_null) {
            gaps.push(format!(
                "`{f}` may be null: what Transformers rotates then is not read"
            ));
        }
    }
    let rope = if !has_field("rope_parameters") && !has_field("rope_theta") {
        measured_rope.dims.map(|_| RopeRule::Uniform)
    } else if rope_per_type {
        let local_base = ["rope_local_base_freq"]
            .into_iter()
            .find(|f| has_field(f))
            .map(str::to_owned)
            .or_else(|| legacy_effect(facts.value, "sliding_attention"));
        // A Hub key that sets the full-attention layers' base (the ModernBERT decoder's
        // `global_rope_theta`) is read as `rope_theta` where config.json has none.
        if let Some(global) = legacy_effect(facts.value, "full_attention") {
            decisions.push(format!(
                "`{global}` sets the full-attention layers' RoPE base (Hub configs): read as `rope_theta`"
            ));
            aliases.push(("rope_theta".to_owned(), global));
        }
        if let Some(f) = &local_base {
            add(
                &mut fields,
                f,
                FieldType::F64,
                "RoPE base of sliding layers (Hub configs)",
            );
        }
        Some(RopeRule::PerLayerType { local_base })
    } else {
        Some(RopeRule::Uniform)
    };
    // Each layer's own RoPE base (0: none) overrides the shared one where the list is given;
    // the fixtures' `layer-rope-bases` variant (introspect.py) checks the reading.
    let layer_rope_bases = (rope.is_some() && has_field("layer_rope_theta")).then(|| {
        add(
            &mut fields,
            "layer_rope_theta",
            FieldType::FloatList,
            "each layer's RoPE base, 0 for none (the shared base when null)",
        );
        decisions.push(
            "RoPE base per layer from `layer_rope_theta` where given (0: the layer has no RoPE)"
                .to_owned(),
        );
        "layer_rope_theta".to_owned()
    });
    let alibi = alibi_plan(
        &facts,
        rope.is_some() || learned_positions.is_some(),
        &mut decisions,
        &mut gaps,
    );
    let no_rope = has_field("no_rope_layers").then(|| {
        add(
            &mut fields,
            "no_rope_layers",
            FieldType::IntList,
            "1: the layer uses RoPE",
        );
        let interval_field = has_field("no_rope_layer_interval").then(|| {
            add(
                &mut fields,
                "no_rope_layer_interval",
                FieldType::I32,
                "every n-th layer without RoPE (configs without no_rope_layers)",
            );
            "no_rope_layer_interval".to_owned()
        });
        let probes = facts.no_rope_probes();
        if !probes.is_empty() && !no_rope_rule_holds(&probes, interval_field.as_deref()) {
            gaps.push(
                "`no_rope_layers` is derived by a rule the generator does not know".to_owned(),
            );
        }
        NoRope {
            flags_field: "no_rope_layers".to_owned(),
            interval_field,
        }
    });
    decisions.push(format!(
        "RoPE: {}{}",
        match &rope {
            None => "none".to_owned(),
            Some(r) => format!("{r:?}"),
        },
        if no_rope.is_some() {
            ", some layers without (no_rope_layers)"
        } else {
            ""
        }
    ));

    if mla.is_some() && !matches!(rope, Some(RopeRule::Uniform)) {
        gaps.push(format!(
            "latent attention with RoPE {rope:?}: the latent block takes one RoPE for every layer"
        ));
    }

    // What the structure cannot decide, to be tried against the fixtures.
    let embedding_candidates = if embedding_field != Scalar::None {
        vec![embedding_field]
    } else if bf16_normalizer(facts.value) {
        decisions.push(
            "the embeddings' module keeps a bfloat16 scalar buffer: an embedding scale \
             √hidden_size is tried rounded to bfloat16"
                .to_owned(),
        );
        vec![Scalar::None, Scalar::SqrtHiddenBf16]
    } else {
        vec![Scalar::None, Scalar::SqrtHidden]
    };
    // The norm's formula as Transformers computes it (zero weights give zeros, or not),
    // where the facts have the probe; else guessed from the initial weights.
    let probed_offset = facts.value.get("norm_plus_one").and_then(Value::as_bool);
    let offset_candidates = if let Some(plus_one) = probed_offset {
        decisions.push(format!(
            "norms scale by {} (zeroed weights {} the output)",
            if plus_one { "1 + weight" } else { "weight" },
            if plus_one { "keep" } else { "zero" }
        ));
        vec![plus_one]
    } else if layer_norm.is_some() && !norm_init_is_zero(&facts) {
        vec![false]
    } else if norm_init_is_zero(&facts) {
        vec![true, false]
    } else {
        vec![false, true]
    };
    // A GELU-family default may hide a legacy reading of `gelu`; a declared soft cap may not
    // be applied. Both only where the config has them.
    let act_default = defaults
        .get(&act_field)
        .and_then(Value::as_str)
        .unwrap_or("");
    let gelu_candidates = if act_default.starts_with("gelu") {
        vec![false, true]
    } else {
        vec![false]
    };
    let normalize_candidates = match &moe {
        Some(m) if m.normalize_field.is_none() && m.routing.is_none() => vec![true, false],
        _ => vec![false],
    };
    let softcap_candidates = if attention_softcap == Scalar::None {
        vec![false]
    } else {
        vec![true, false]
    };
    // Halves or adjacent pairs, as measured; both where nothing was.
    let traditional_candidates = match measured_rope.pairs {
        Some(pairs) => vec![pairs],
        None => vec![false, true],
    };
    // Where some layers slide, RoPE may be theirs alone.
    let sliding_rope_candidates = if sliding_window.is_some() {
        vec![false, true]
    } else {
        vec![false]
    };
    let mut choices = Vec::new();
    for &placement in &placements {
        for embedding in &embedding_candidates {
            for &plus_one in &offset_candidates {
                for &softcap in &softcap_candidates {
                    for &gelu_as_tanh in &gelu_candidates {
                        for (traditional, sliding_only) in traditional_candidates
                            .iter()
                            .copied()
                            .flat_map(|t| sliding_rope_candidates.iter().map(move |&s| (t, s)))
                        {
                            for &moe_normalize in &normalize_candidates {
                                choices.push(Choice {
                                    norm_plus_one: plus_one,
                                    rope_sliding_only: sliding_only,
                                    embedding_scale: embedding.clone(),
                                    rope_traditional: traditional,
                                    norm_placement: placement,
                                    gelu_as_tanh,
                                    attention_softcap: softcap,
                                    moe_normalize,
                                    placement_when: None,
                                });
                            }
                        }
                    }
                }
            }
        }
    }

    // Parameters no block takes.
    let known = [
        "self_attn.q_proj.",
        "self_attn.k_proj.",
        "self_attn.v_proj.",
        "self_attn.qkv_proj.",
        "self_attn.o_proj.",
        "self_attn.q_norm.",
        "self_attn.k_norm.",
        "self_attn.sinks",
        "self_attn.gate_proj.",
        "self_attn.lambda_q1",
        "self_attn.lambda_k1",
        "self_attn.lambda_q2",
        "self_attn.lambda_k2",
        "mlp.gate_proj.",
        "mlp.up_proj.",
        "mlp.down_proj.",
        "mlp.gate_up_proj.",
        "mlp.c_fc.",
        "mlp.c_proj.",
        "input_layernorm.",
        "post_attention_layernorm.",
        "pre_feedforward_layernorm.",
        "post_feedforward_layernorm.",
    ];
    let moe_known = [
        "mlp.gate.",
        "mlp.experts.",
        "mlp.shared_expert.",
        "mlp.shared_expert_gate.",
    ];
    let mla_known = [
        "self_attn.q_a_proj.",
        "self_attn.q_a_layernorm.",
        "self_attn.q_b_proj.",
        "self_attn.kv_a_proj_with_mqa.",
        "self_attn.kv_a_layernorm.",
        "self_attn.kv_b_proj.",
    ];
    let mut known: Vec<&str> = if moe.is_some() {
        known.iter().chain(&moe_known).copied().collect()
    } else {
        known.to_vec()
    };
    if sub_norms {
        known.extend(["self_attn.attn_sub_norm.", "mlp.ffn_sub_norm."]);
    }
    // xIELU's learned parameters, which the MLP block loads under its `act_fn` (Apertus).
    let xielu = defaults.get(&act_field).and_then(Value::as_str) == Some("xielu")
        && params
            .keys()
            .any(|n| n.starts_with("model.layers.0.mlp.act_fn."));
    if xielu {
        known.push("mlp.act_fn.");
        decisions.push(
            "the MLP's activation is xIELU: its learned parameters (`mlp.act_fn.alpha_p`, \
             `alpha_n`, `beta`, `eps`) load with the block"
                .to_owned(),
        );
    }
    if mla.is_some() {
        known.extend(mla_known);
    }
    let mut weight_map = Vec::new();
    for name in params.keys() {
        let block = if let Some(rest) = name.strip_prefix("model.layers.0.") {
            known
                .iter()
                .find(|k| {
                    rest.starts_with(*k) || **k == "mlp.experts." && rest.starts_with("mlp.experts")
                })
                .map(|k| k.trim_end_matches('.').to_owned())
        } else if name.starts_with("model.layers.") {
            continue;
        } else {
            match name.as_str() {
                "model.embed_tokens.weight" => Some("Embedding".to_owned()),
                "model.embed_positions.weight" if learned_positions.is_some() => {
                    Some("LearnedPositions".to_owned())
                }
                "model.embed_layernorm.weight" | "model.embed_layernorm.bias" => {
                    Some("embedding norm".to_owned())
                }
                "model.norm.weight" | "model.norm.bias" => Some("final norm".to_owned()),
                "head.dense.weight" | "head.dense.bias" | "head.norm.weight" | "head.norm.bias"
                    if head_renames.is_some() =>
                {
                    Some("prediction head".to_owned())
                }
                "lm_head.weight" => Some("output layer (absent when tied)".to_owned()),
                "lm_head.bias" => Some("output layer bias".to_owned()),
                _ => None,
            }
        };
        match block {
            Some(b) => weight_map.push((name.clone(), b)),
            None => gaps.push(format!("parameter `{name}` is taken by no known block")),
        }
    }

    // The output layer's bias, by the flag that switches it.
    let lm_head_bias_field = flag_probes
        .iter()
        .find(|p| p.switches("lm_head.bias"))
        .map(|p| p.field.clone());
    if let Some(f) = &lm_head_bias_field {
        add(&mut fields, f, FieldType::Bool, "biases on");
        decisions.push(format!("the output layer's bias where `{f}`"));
    }
    // The prediction head: its bias by the flag that adds it, its activation by the field
    // that changes its activation module (introspect.py's probe).
    let prediction_head = match (&head_renames, facts.value.get("prediction_head")) {
        (Some(_), Some(head)) => {
            let bias = match flag_probes.iter().find(|p| p.switches("head.dense.bias")) {
                Some(p) => Flag::Field(p.field.clone()),
                None if params.contains_key("head.dense.bias") => Flag::Always,
                None => Flag::Never,
            };
            if let Flag::Field(f) = &bias {
                add(&mut fields, f, FieldType::Bool, "biases on");
            }
            match head.get("activation_field").and_then(Value::as_str) {
                Some(act) => {
                    add(
                        &mut fields,
                        act,
                        FieldType::Str,
                        "prediction head activation",
                    );
                    decisions.push(format!(
                        "a prediction head before the output layer: `head.dense` (bias {bias:?}), `{act}`, `head.norm`"
                    ));
                    Some(HeadPlan {
                        bias,
                        activation_field: act.to_owned(),
                    })
                }
                None => {
                    gaps.push(
                        "the prediction head's activation is named by no config field".to_owned(),
                    );
                    None
                }
            }
        }
        (None, Some(head)) => {
            gaps.push(format!(
                "`{}` transforms the hidden states before the output layer, not as dense, activation, norm",
                str_of(head, "name")
            ));
            None
        }
        _ => None,
    };

    // Boolean fields that change what Transformers computes (the flag probes) but that
    // nothing above reads: the module accepts the value the fixtures verify and refuses
    // the other with a typed error, rather than computing something else silently.
    let read_by_the_shared_config = [
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "use_sliding_window",
    ];
    let mut refused = Vec::new();
    for p in &flag_probes {
        let read = fields.iter().any(|f| f.name == p.field)
            || read_by_the_shared_config.contains(&p.field.as_str())
            || INERT.contains(&p.field.as_str());
        if read || p.refused || !p.changes_the_model() {
            continue;
        }
        add(
            &mut fields,
            &p.field,
            FieldType::Bool,
            "checked: the value the fixtures verify, the other refused",
        );
        decisions.push(format!(
            "`{}` = {} changes the model ({}): refused",
            p.field,
            p.value,
            if p.added.is_empty() && p.removed.is_empty() {
                format!("logits move by {:.3e}", p.logits_max_abs.unwrap_or(0.0))
            } else {
                format!(
                    "parameters added {:?}, removed {:?}",
                    p.added
                        .iter()
                        .filter(|n| !n.contains("layers.1."))
                        .collect::<Vec<_>>(),
                    p.removed
                        .iter()
                        .filter(|n| !n.contains("layers.1."))
                        .collect::<Vec<_>>()
                )
            }
        ));
        refused.push((p.field.clone(), !p.value));
    }
    // A refused flag that only moves the logits may be the switch between two norm
    // placements the structure allows (GPT-NeoX's `use_parallel_residual`: side by side, or
    // in sequence): tried after every plain candidate, each way round.
    if placements.len() > 1 {
        let moving: Vec<&String> = refused
            .iter()
            .map(|(field, _)| field)
            .filter(|field| {
                flag_probes
                    .iter()
                    .any(|p| &p.field == *field && p.added.is_empty() && p.removed.is_empty())
            })
            .collect();
        let plain = choices.clone();
        for field in moving {
            for choice in &plain {
                for &other in placements.iter().filter(|p| **p != choice.norm_placement) {
                    choices.push(Choice {
                        placement_when: Some((field.clone(), other)),
                        ..choice.clone()
                    });
                }
            }
        }
    }
    // Integer fields whose other values add parameters the tiny model does not have (Granite
    // MoE's `shared_intermediate_size` > 0 adds a shared MLP): unless the plan reads them, the
    // module refuses every value but the default instead of failing on unknown weights.
    let own_names = facts.parameters();
    let mut refused_values: Vec<(String, i64)> = layer_key_refused
        .into_iter()
        .map(|(default, key)| (key, default))
        .collect();
    for probe in facts
        .value
        .get("width_probes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let field = str_of(probe, "field");
        let added: Vec<&str> = probe
            .get("widened")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|n| !own_names.contains_key(*n) && !n.contains("layers.1."))
            .collect();
        let read =
            fields.iter().any(|f| f.name == field) || aliases.iter().any(|(_, own)| own == field);
        let Some(default) = defaults.get(field).and_then(Value::as_i64) else {
            continue;
        };
        if added.is_empty() || read {
            continue;
        }
        add(
            &mut fields,
            field,
            FieldType::I32,
            "checked: the value the fixtures verify, others refused",
        );
        decisions.push(format!(
            "`{field}` other than {default} adds parameters no block loads ({added:?}): refused"
        ));
        refused_values.push((field.to_owned(), default));
    }

    // Hub configs' own names of RoPE fields, which the config class converts into its RoPE
    // parameters (GPT-NeoX's `rotary_emb_base`, `rotary_pct`): read under both names.
    for (own, common) in facts
        .value
        .get("rope_legacy_names")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let Some(common) = common.as_str() else {
            continue;
        };
        if !aliases.iter().any(|(_, o)| o == own) {
            decisions.push(format!(
                "`{common}` is `{own}` in Hub configs (the config class converts it; probed): read under both names"
            ));
            aliases.push((common.to_owned(), own.to_owned()));
        }
    }

    let derived_list_keys = super::probed::derived_list_keys(facts.value, &mut decisions);

    // Fields read vs ignored.
    let mut ignored = Vec::new();
    let rope_fields = [
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "partial_rotary_factor",
        "original_max_position_embeddings",
    ];
    // A field the class's `attribute_map` reads a read field as (SolarOpen's
    // `num_local_experts` → `n_routed_experts`) is read under that name.
    let read_through_attribute_map = |name: &str| {
        facts
            .value
            .get("attribute_map")
            .and_then(Value::as_object)
            .is_some_and(|m| {
                m.iter().any(|(common, own)| {
                    own.as_str() == Some(name) && fields.iter().any(|f| &f.name == common)
                })
            })
    };
    for (name, default) in &defaults {
        if fields.iter().any(|f| &f.name == name)
            || rope_fields.contains(&name.as_str())
            || aliases.iter().any(|(_, own)| own == name)
            || read_through_attribute_map(name)
            || intermediate_multiple.as_deref() == Some(name.as_str())
        {
            continue;
        }
        let reason = if INERT.contains(&name.as_str()) || name.ends_with("dropout") {
            "no effect on inference".to_owned()
        } else if name == "model_type" {
            "registry key".to_owned()
        } else if name.contains("bidirectional") || name.contains("causal") {
            format!("causal attention only: a config that changes it (default {default}) is not supported")
        } else if name == "hidden_act" && act_field != "hidden_act" {
            format!("superseded by `{act_field}`")
        } else {
            let suspicious = [
                "scal", "mult", "cap", "window", "norm", "rope", "bias", "act", "expert", "layer",
            ]
            .iter()
            .any(|k| name.contains(k));
            if suspicious {
                format!("not read — may change the forward pass (default {default}); check")
            } else {
                format!("not read (default {default})")
            }
        };
        ignored.push((name.clone(), reason));
    }

    let nested_refused = nested_refused(facts.value, &mut decisions);
    for (name, reason) in ignored.iter_mut() {
        let keys: Vec<String> = nested_refused
            .iter()
            .filter(|(field, _, _)| field == name)
            .map(|(_, key, _)| format!("`{key}`"))
            .collect();
        if !keys.is_empty() {
            *reason = format!(
                "not read; its entries {} change the model and are checked: only their defaults \
                 accepted",
                keys.join(", ")
            );
        }
    }
    Plan {
        model_type,
        default_theta: measured_rope
            .base
            .unwrap_or_else(|| default_theta(facts.value)),
        module: module.to_owned(),
        architecture: str_of(facts.value, "architecture").to_owned(),
        config_class: str_of(facts.value, "config_class").to_owned(),
        transformers_version: str_of(facts.value, "transformers_version").to_owned(),
        fields,
        qkv_fused,
        qkv_bias,
        o_bias,
        qk_norm,
        mlp_layout,
        mlp_bias,
        moe,
        mla,
        recurrent: None,
        hybrid,
        layer_norm,
        weightless_norms,
        null_norm,
        derived_list_keys,
        eps_field,
        eps_constant,
        act_field,
        activation_constant,
        attention_scale,
        attention_softcap,
        clip_qkv,
        final_softcap,
        residual_scale,
        logits_scale,
        sliding_window,
        layer_types_field,
        layer_rule,
        rope,
        no_rope,
        rope_dims_field: measured_rope.dims_field,
        default_partial_rotary: measured_rope.default_partial,
        rope_from_code: measured_rope.base.is_some(),
        qkv_groups,
        layer_rope_bases,
        sinks,
        gate_proj,
        output_gate,
        differential,
        sub_norms,
        unused_prefixes: unused_prefixes(facts.value, &mut decisions),
        unused_anywhere: unused_anywhere(facts.value),
        choices,
        decisions,
        gaps,
        ignored,
        refused,
        refused_values,
        renames: roles.renames.clone(),
        conv1d: layer_conv1d(facts.value, &roles.renames),
        learned_positions,
        norm_on_embeddings,
        rope_reversed,
        sinusoidal_positions,
        final_norm,
        o_bias_only,
        alibi,
        embedding_layernorm: params.contains_key("model.embed_layernorm.weight"),
        nested_refused,
        aliases,
        intermediate_per_hidden,
        intermediate_multiple,
        prefix_renames,
        lm_head_bias: params.contains_key("lm_head.bias"),
        lm_head_bias_field,
        first_layer_no_input_norm,
        prediction_head,
        divided_aliases,
        intermediate_divisor,
        layer_period,
        layer_calls: layer_events(facts.value)
            .into_iter()
            .filter(|e| e.enter && !e.module.is_empty())
            .map(|e| {
                let path = format!("model.layers.0.{}.", e.module);
                let renamed = super::trace::rename(&path, &roles.renames);
                let name = renamed["model.layers.0.".len()..].trim_end_matches('.');
                (name.to_owned(), e.class)
            })
            .collect(),
        weight_map,
    }
}

/// The mixture of experts of the first sparse layer (`layer`), if any: a router `mlp.gate`
/// of `[experts, hidden]` and experts stacked (`mlp.experts.gate_up_proj`, `down_proj`) or
/// one module each; what no block expresses is a gap.
fn moe_plan(
    facts: &Facts,
    layer: &BTreeMap<&str, &Vec<i64>>,
    defaults: &BTreeMap<String, Value>,
    routing: Result<Option<super::routing::Routing>, String>,
    gaps: &mut Vec<String>,
) -> Option<MoePlan> {
    let expert_params: Vec<&str> = layer
        .keys()
        .copied()
        .filter(|n| n.starts_with("mlp.experts"))
        .collect();
    if expert_params.is_empty() {
        return None;
    }
    let has_field = |n: &str| defaults.contains_key(n);
    let resolved_i64 = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| facts.resolved(n).and_then(Value::as_i64))
    };
    let experts = resolved_i64(&["num_experts", "num_local_experts", "n_routed_experts"]);
    let hidden = facts.resolved("hidden_size").and_then(Value::as_i64);
    match layer.get("mlp.gate.weight") {
        Some(shape) if Some(shape.as_slice()) == experts.zip(hidden).map(|(e, h)| [e, h]).as_ref().map(|a| &a[..]) => {}
        Some(shape) => gaps.push(format!(
            "the router `mlp.gate.weight` is {shape:?}, not [experts {experts:?}, hidden {hidden:?}]"
        )),
        None => gaps.push("experts without a router `mlp.gate`".to_owned()),
    }
    if resolved_i64(&["num_experts_per_tok", "moe_topk"]).is_none() {
        gaps.push("a mixture of experts without `num_experts_per_tok`".to_owned());
    }
    let stacked = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"];
    let per_expert = ["gate_proj", "up_proj", "down_proj"]
        .iter()
        .all(|p| layer.contains_key(format!("mlp.experts.0.{p}.weight").as_str()));
    if !(stacked.iter().all(|p| layer.contains_key(p)) && expert_params.len() == 2 || per_expert) {
        gaps.push(format!(
            "experts {expert_params:?} are neither stacked gate_up_proj/down_proj nor per-expert gate/up/down projections"
        ));
    }
    // The experts' width: `moe_intermediate_size`, else `intermediate_size`.
    let width = resolved_i64(&["moe_intermediate_size"]).or(resolved_i64(&["intermediate_size"]));
    if let (Some(down), Some(width)) = (layer.get("mlp.experts.down_proj"), width) {
        if down.last() != Some(&width) {
            gaps.push(format!(
                "the experts' `down_proj` is {down:?}: its width is not `moe_intermediate_size`/`intermediate_size` ({width})"
            ));
        }
    }
    // How the router routes: from the routing probes; without them (facts recorded
    // before), these fields say the block's softmax top-k may not be what it computes.
    let routing = match routing {
        Ok(Some(r)) => {
            routing_gaps(&r, layer, gaps);
            Some(r)
        }
        Ok(None) => {
            for field in [
                "n_group",
                "topk_group",
                "routed_scaling_factor",
                "scoring_func",
                "topk_method",
            ] {
                if has_field(field) {
                    gaps.push(format!(
                        "the router reads `{field}` and no routing probe was recorded"
                    ));
                }
            }
            None
        }
        Err(why) => {
            gaps.push(why);
            None
        }
    };
    let (dense_layers, layer_types_dense_prefix) = sparse_layer_rule(facts, has_field, gaps);
    // Gate and up projections apart, or in one (gate rows first: `sanitize_moe` splits it).
    let shared_expert = (layer.contains_key("mlp.shared_expert.gate_proj.weight")
        || layer.contains_key("mlp.shared_expert.gate_up_proj.weight"))
    .then(|| layer.contains_key("mlp.shared_expert_gate.weight"));
    if shared_expert.is_some()
        && !has_field("shared_expert_intermediate_size")
        && !has_field("shared_intermediate_size")
        && !has_field("n_shared_experts")
        && !has_field("num_shared_experts")
        && !has_field("moe_num_shared_experts")
    {
        gaps.push("a shared expert without `shared_expert_intermediate_size`".to_owned());
    }
    let conversions = facts.value.get("checkpoint_conversions");
    let pairs: Vec<(String, String)> = conversions
        .and_then(|c| c.get("renamings"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some((
                r.get(0)?.as_str()?.to_owned(),
                r.get(1)?.as_str()?.to_owned(),
            ))
        })
        .collect();
    // A weight renamed is its module renamed, so that quantized checkpoints' `scales` and
    // `biases` follow; a module's weight renamed to a bare parameter (GraniteMoE's
    // `input_linear.weight` → `experts.gate_up_proj`) keeps `gate_up_proj.scales` beside it.
    let mut checkpoint_renames = Vec::new();
    let mut bare = Vec::new();
    for (from, to) in pairs {
        match (from.strip_suffix(".weight"), to.strip_suffix(".weight")) {
            (Some(f), Some(t)) => checkpoint_renames.push((format!("{f}."), format!("{t}."))),
            (Some(f), None) => {
                checkpoint_renames.push((format!("{f}."), format!("{to}.")));
                bare.push((format!("{to}.weight"), to));
            }
            _ => checkpoint_renames.push((from, to)),
        }
    }
    checkpoint_renames.extend(bare);
    let names = conversions.and_then(|c| c.get("experts"));
    let projections = ["gate_proj", "up_proj", "down_proj"]
        .into_iter()
        .map(|p| {
            let hub = names
                .and_then(|n| n.get(p))
                .and_then(Value::as_str)
                .unwrap_or(p);
            (hub.to_owned(), p.to_owned())
        })
        .collect();
    Some(MoePlan {
        checkpoint_renames,
        projections,
        shared_expert,
        shared_expert_bias: if layer.contains_key("mlp.shared_expert.gate_proj.bias") {
            Flag::Always
        } else {
            Flag::Never
        },
        normalize_field: match routing.as_ref().map(|r| &r.normalize) {
            Some(super::routing::Rule::Field(f)) => Some(f.clone()),
            Some(_) => None,
            None => has_field("norm_topk_prob").then(|| "norm_topk_prob".to_owned()),
        },
        dense_layers,
        routing,
        layer_types_dense_prefix,
        shared_join: None,
        list_rope: None,
        dense_width_field: None,
    })
}

/// The norms where the epsilon field is null, from the null probes
/// ([`super::probed::null_norm`]), for the plan's norms `layer_norm`.
fn null_norm_decision(
    facts: &Facts,
    eps_field: &str,
    layer_norm: &Option<Flag>,
    gaps: &mut Vec<String>,
    decisions: &mut Vec<String>,
) -> Option<super::probed::NullNorm> {
    let set = match layer_norm {
        None => None,
        Some(Flag::Never) => Some(false),
        Some(Flag::Always) => Some(true),
        Some(Flag::Field(f)) => {
            if facts
                .value
                .get("null_norm_probes")
                .and_then(Value::as_array)
                .is_some_and(|p| !p.is_empty())
            {
                gaps.push(format!(
                    "a null `{eps_field}` changes the norms, whose bias `{f}` switches"
                ));
            }
            return None;
        }
    };
    let found = super::probed::null_norm(facts.value, eps_field, set, gaps)?;
    decisions.push(format!(
        "a null `{}` makes the norms {} of `{}` (the null probe)",
        found.field,
        match found.layer_norm {
            Some(true) => "LayerNorms with bias",
            Some(false) => "LayerNorms without bias",
            None => "RMSNorms",
        },
        found.eps_field
    ));
    Some(found)
}

/// The MoE decisions of the shared-expert and layer RoPE probes ([`super::probed`]), set on
/// `m`; the config fields they read, with their types and roles.
fn moe_probed_decisions(
    facts: &Facts,
    m: &mut MoePlan,
    gaps: &mut Vec<String>,
    decisions: &mut Vec<String>,
) -> Vec<(String, FieldType, &'static str)> {
    let mut read = Vec::new();
    if m.shared_expert.is_some() {
        m.shared_join = super::probed::shared_join(facts.value, gaps);
        match &m.shared_join {
            Some(super::probed::SharedJoin::ByField { field, values }) => {
                decisions.push(format!(
                    "the shared expert joins the routed experts per `{field}`: {values:?} (the shared-expert probes)"
                ));
                read.push((
                    field.clone(),
                    FieldType::Str,
                    "how the shared expert joins the routed experts",
                ));
            }
            Some(super::probed::SharedJoin::Fixed(j)) => {
                decisions.push(format!(
                    "the shared expert joins the routed experts: {j:?} (the shared-expert probes)"
                ));
            }
            None => {}
        }
    }
    if let Some(rope) = super::probed::list_rope(facts.value, gaps) {
        if rope.list_field != "mlp_layer_types"
            || m.layer_types_dense_prefix.is_none()
            || !matches!(rope.kind.as_str(), "dense" | "sparse")
        {
            gaps.push(format!(
                "the `{}` layers of `{}` rotate on full attention too: no block reads that list",
                rope.kind, rope.list_field
            ));
            return read;
        }
        decisions.push(format!(
            "RoPE also on the full-attention `{}` layers of `{}`{} (the layer RoPE probe)",
            rope.kind,
            rope.list_field,
            rope.while_field
                .as_ref()
                .map(|(f, v)| format!(", while `{f}` is {v}"))
                .unwrap_or_default()
        ));
        if let Some((field, _)) = &rope.while_field {
            read.push((
                field.clone(),
                FieldType::I32,
                "RoPE on the full-attention layers of that kind while it has its default",
            ));
        }
        m.list_rope = Some(rope);
    }
    if m.layer_types_dense_prefix.is_some() {
        m.dense_width_field = super::probed::kind_width_field(facts.value, "dense", gaps);
        if let Some(field) = &m.dense_width_field {
            decisions.push(format!(
                "`{field}` sets the dense layers' MLP width, null meaning `intermediate_size` (the kind width probe)"
            ));
            read.push((
                field.clone(),
                FieldType::I32,
                "the dense layers' MLP width (null: intermediate_size)",
            ));
        }
    }
    read
}

/// What a decided routing needs that the block or [`mlx_models::family::MoeConfig`] does
/// not have: a correction vector under another name than the router loads, group sizes
/// under other fields.
fn routing_gaps(
    r: &super::routing::Routing,
    layer: &BTreeMap<&str, &Vec<i64>>,
    gaps: &mut Vec<String>,
) {
    if let Some(v) = &r.correction_bias {
        let loaded = "mlp.gate.e_score_correction_bias";
        if v != "e_score_correction_bias" && !layer.contains_key(loaded) {
            gaps.push(format!(
                "the router's vector `{v}` is added to its scores: the block loads `e_score_correction_bias`"
            ));
        } else if !layer.contains_key(format!("mlp.gate.{v}").as_str())
            && !layer.contains_key(loaded)
        {
            gaps.push(format!(
                "the router adds `{v}`, which the checkpoint does not carry as `mlp.gate.{v}`"
            ));
        }
    }
}

/// Which layers have experts: `(dense_layers, layer_types_dense_prefix)` for
/// [`MoePlan`]. A per-layer list of `dense`/`sparse` that the class derives when the
/// config leaves it null (`mlp_layer_types`) names them, the derived list (12 layers)
/// giving the default; else `decoder_sparse_step`, `mlp_only_layers`,
/// `first_k_dense_replace` where the class has them. Either way the rule must give the
/// layers the tiny model built with experts, or it is a gap.
fn sparse_layer_rule(
    facts: &Facts,
    has_field: impl Fn(&str) -> bool,
    gaps: &mut Vec<String>,
) -> (bool, Option<usize>) {
    let resolved = facts.value.get("resolved_config");
    let layers = resolved
        .and_then(|r| r.get("num_hidden_layers"))
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize;
    let params = facts.parameters();
    let built: Vec<bool> = (0..layers)
        .map(|i| {
            let layer = format!("model.layers.{i}.");
            params.keys().any(|n| {
                n.strip_prefix(&layer)
                    .and_then(|rest| rest.split_once('.'))
                    .is_some_and(|(_, rest)| rest.starts_with("experts"))
            })
        })
        .collect();
    let derived = facts
        .value
        .get("derived_layer_lists")
        .and_then(Value::as_object)
        .and_then(|d| d.get("mlp_layer_types"))
        .and_then(Value::as_array);
    let (rule, predicted): (_, Vec<bool>) = if let Some(list) = derived {
        let kinds: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
        let prefix = kinds.iter().take_while(|k| **k == "dense").count();
        if kinds[prefix..].iter().any(|k| *k != "sparse") {
            gaps.push(format!(
                "`mlp_layer_types` defaults to {kinds:?}: not dense layers then sparse ones"
            ));
        }
        let listed: Option<Vec<bool>> = resolved
            .and_then(|r| r.get("mlp_layer_types"))
            .and_then(Value::as_array)
            .map(|l| l.iter().map(|k| k.as_str() == Some("sparse")).collect());
        (
            (false, Some(prefix)),
            listed.unwrap_or_else(|| (0..layers).map(|i| i >= prefix).collect()),
        )
    } else {
        // As `MoeConfig::is_sparse` reads them (ERNIE 4.5's own names beside).
        let get = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| resolved.and_then(|r| r.get(*n)).filter(|v| !v.is_null()))
        };
        let step = get(&["decoder_sparse_step", "moe_layer_interval"])
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .max(1) as usize;
        let first = get(&[
            "first_k_dense_replace",
            "moe_layer_start_index",
            "num_dense_layers",
        ])
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize;
        let last = get(&["moe_layer_end_index"])
            .and_then(Value::as_u64)
            .map_or(usize::MAX, |e| e as usize);
        let only: Vec<u64> = get(&["mlp_only_layers"])
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        let dense = [
            "decoder_sparse_step",
            "moe_layer_interval",
            "mlp_only_layers",
            "first_k_dense_replace",
            "moe_layer_start_index",
            "moe_layer_end_index",
            "num_dense_layers",
        ]
        .iter()
        .any(|f| has_field(f));
        (
            (dense, None),
            (0..layers)
                .map(|i| {
                    !dense
                        || !only.contains(&(i as u64))
                            && i >= first
                            && i <= last
                            && (i + 1).is_multiple_of(step)
                })
                .collect(),
        )
    };
    if predicted != built {
        gaps.push(format!(
            "the tiny model has experts on layers {:?}; the config's fields say {:?}",
            (0..layers).filter(|&i| built[i]).collect::<Vec<_>>(),
            (0..layers).filter(|&i| predicted[i]).collect::<Vec<_>>()
        ));
    }
    rule
}

/// Multi-head latent attention in layer 0, if its attention has the latent projections:
/// every width checked against the config fields [`mlx_models::family::MlaConfig`] reads,
/// and the bias switch against the one [`mlx_models::mla::MlaSettings::bias`] follows
/// (`attention_bias` on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj`, as the flag probes
/// say); what differs is a gap.
fn mla_plan(
    facts: &Facts,
    layer: &BTreeMap<&str, &Vec<i64>>,
    defaults: &BTreeMap<String, Value>,
    gaps: &mut Vec<String>,
) -> Option<MlaPlan> {
    if !layer.contains_key("self_attn.kv_a_proj_with_mqa.weight") {
        return None;
    }
    for name in &MLA_FIELDS[..5] {
        if !defaults.contains_key(*name) {
            gaps.push(format!(
                "latent attention without the config field `{name}` the latent block reads"
            ));
        }
    }
    let get = |name: &str| facts.resolved(name).and_then(Value::as_i64).unwrap_or(0);
    let (hidden, heads) = (get("hidden_size"), get("num_attention_heads"));
    let (rank, nope, rope, v) = (
        get("kv_lora_rank"),
        get("qk_nope_head_dim"),
        get("qk_rope_head_dim"),
        get("v_head_dim"),
    );
    let q_rank = facts.resolved("q_lora_rank").and_then(Value::as_i64);
    let mut expected = vec![
        (
            "self_attn.kv_a_proj_with_mqa.weight",
            vec![rank + rope, hidden],
        ),
        ("self_attn.kv_a_layernorm.weight", vec![rank]),
        ("self_attn.kv_b_proj.weight", vec![heads * (nope + v), rank]),
        ("self_attn.o_proj.weight", vec![hidden, heads * v]),
    ];
    match q_rank {
        Some(q) => expected.extend([
            ("self_attn.q_a_proj.weight", vec![q, hidden]),
            ("self_attn.q_a_layernorm.weight", vec![q]),
            ("self_attn.q_b_proj.weight", vec![heads * (nope + rope), q]),
        ]),
        None => expected.push((
            "self_attn.q_proj.weight",
            vec![heads * (nope + rope), hidden],
        )),
    }
    for (name, shape) in expected {
        match layer.get(name) {
            Some(found) if **found == shape => {}
            found => gaps.push(format!(
                "latent attention: `{name}` is {found:?}, the latent block loads {shape:?}"
            )),
        }
    }
    // Which flag puts a bias where: the latent block follows `attention_bias`.
    for probe in facts.flag_probes() {
        let bias: Vec<&String> = probe
            .added
            .iter()
            .chain(&probe.removed)
            .filter(|n| n.starts_with("model.layers.0.self_attn.") && n.ends_with(".bias"))
            .collect();
        if bias.is_empty() {
            continue;
        }
        let taken = [
            "model.layers.0.self_attn.q_a_proj.bias",
            "model.layers.0.self_attn.kv_a_proj_with_mqa.bias",
            "model.layers.0.self_attn.o_proj.bias",
        ];
        let all = taken
            .iter()
            .all(|t| bias.iter().any(|b| b == t) || q_rank.is_none() && t.contains("q_a"));
        if probe.field != "attention_bias"
            || !all
            || bias.iter().any(|b| !taken.contains(&b.as_str()))
        {
            gaps.push(format!(
                "latent attention: `{}` switches the biases {bias:?}; the latent block puts \
                 `attention_bias` on q_a_proj, kv_a_proj_with_mqa and o_proj",
                probe.field
            ));
        }
    }
    Some(MlaPlan {
        interleave_field: defaults.contains_key("rope_interleave"),
    })
}

/// The module under a decoder layer that holds `experts` (GraniteMoE's
/// `block_sparse_moe`, most families' `mlp`).
fn expert_block(params: &BTreeMap<String, Vec<i64>>) -> Option<String> {
    params.keys().find_map(|name| {
        let path = name.strip_prefix("model.layers.")?.split_once('.')?.1;
        let (block, _) = path.split_once(".experts")?;
        (!block.contains('.')).then(|| block.to_owned())
    })
}

/// The expert block's module names where they are not the ones the blocks load: the block
/// (the module holding `experts`, GraniteMoE's `block_sparse_moe`) is `mlp`, its `router`
/// linear layer `mlp.gate`; the router first (the first rename that matches applies).
fn expert_block_renames(facts: &Facts) -> Vec<(String, String)> {
    let params = facts.parameters();
    let Some(block) = expert_block(&params) else {
        return Vec::new();
    };
    let mut renames = Vec::new();
    let router = format!(".{block}.router.weight");
    // A router module whose linear layer is its `gate` (AFMoE's `router.gate`).
    let router_gate = format!(".{block}.router.gate.weight");
    if params.keys().any(|n| n.ends_with(&router)) {
        renames.push((format!("{block}.router"), "mlp.gate".to_owned()));
    } else if params.keys().any(|n| n.ends_with(&router_gate)) {
        renames.push((format!("{block}.router.gate"), "mlp.gate".to_owned()));
    }
    // DeepSeek's `shared_experts` (one MLP of `n_shared_experts` experts' width) is the
    // block's shared expert.
    let shared = format!(".{block}.shared_experts.");
    if params.keys().any(|n| n.contains(&shared)) {
        renames.push((
            format!("{block}.shared_experts"),
            "mlp.shared_expert".to_owned(),
        ));
    }
    if block != "mlp" {
        renames.push((block, "mlp".to_owned()));
    }
    renames
}

/// A vector the MoE block itself holds and hands to its router (LFM2-MoE's
/// `feed_forward.expert_bias`, recorded by the routing probes): renamed to the router's
/// correction vector, where the block loads it (the routing fit decides what it does).
/// First among the renames, before the block's own.
fn block_vector_rename(facts: &Facts) -> Option<(String, String)> {
    let params = facts.parameters();
    let block = expert_block(&params)?;
    let recorded = |v: &str| {
        facts
            .value
            .get("routing_probes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|p| p.pointer(&format!("/vectors/{v}")).is_some())
    };
    let own_vectors: Vec<String> = params
        .iter()
        .filter(|(_, shape)| shape.len() == 1)
        .filter_map(|(name, _)| {
            let path = name.strip_prefix("model.layers.")?.split_once('.')?.1;
            let v = path.strip_prefix(&format!("{block}."))?;
            (!v.contains('.') && recorded(v)).then(|| v.to_owned())
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    match own_vectors.as_slice() {
        [v] => Some((
            format!("{block}.{v}"),
            "mlp.gate.e_score_correction_bias".to_owned(),
        )),
        _ => None,
    }
}

/// Hub checkpoints' names converted to Transformers' (substring renames, in order).
pub fn checkpoint_name(name: &str, renames: &[(String, String)]) -> String {
    let pairs: Vec<(&str, &str)> = renames
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    mlx_models::weights::rename_substrings(name, &pairs)
}

/// Whether the final norm's weight starts at zero in Transformers' init (the `1 + w`
/// convention).
fn norm_init_is_zero(facts: &Facts) -> bool {
    facts
        .value
        .get("parameters")
        .and_then(Value::as_array)
        .and_then(|ps| ps.iter().find(|p| str_of(p, "name") == "model.norm.weight"))
        .is_some_and(|p| str_of(p, "init") == "zeros")
}

/// Whether Transformers keeps the window only when `use_sliding_window` (Qwen3-MoE's config
/// class sets `sliding_window` to None otherwise): a class without `layer_types` whose
/// default window is set, resolved for a tiny config that sets neither field, to none.
fn window_needs_enabling(facts: &Facts, defaults: &BTreeMap<String, Value>) -> bool {
    let small = facts.value.get("small_config");
    let unset = |name: &str| small.and_then(|c| c.get(name)).is_none();
    !defaults.contains_key("layer_types")
        && defaults
            .get("use_sliding_window")
            .is_some_and(|v| v == &Value::Bool(false))
        && defaults.get("sliding_window").is_some_and(|v| !v.is_null())
        && unset("sliding_window")
        && unset("use_sliding_window")
        && facts.resolved("sliding_window").is_none()
}

/// The field that sets a sliding window in a class without `sliding_window` (GPT-Neo's
/// `window_size`): introspect.py finds it by the attention reach it sets.
fn window_field(facts: &Value) -> Option<String> {
    facts
        .get("window_field")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            // The class maps `sliding_window` onto its own field (RecurrentGemma's
            // `attention_window_size`) and resolves some layer as `sliding_attention`.
            let slides = facts
                .get("layer_types")?
                .as_array()?
                .iter()
                .any(|t| t.as_str() == Some("sliding_attention"));
            let own = facts.pointer("/attribute_map/sliding_window")?.as_str()?;
            slides.then(|| own.to_owned())
        })
}

/// Whether the module holding the embeddings keeps a 0-d bfloat16 buffer (RecurrentGemma's
/// `normalizer`, √hidden_size in bfloat16 whatever the model's dtype).
fn bf16_normalizer(facts: &Value) -> bool {
    let Some(embeddings) = facts
        .pointer("/structure/embeddings")
        .and_then(Value::as_str)
    else {
        return false;
    };
    let parent = embeddings.rsplit_once('.').map_or("", |(p, _)| p);
    facts
        .get("modules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| m["name"].as_str() == Some(parent))
        .filter_map(|m| m.get("buffers")?.as_object())
        .flat_map(|b| b.values())
        .any(|b| {
            b["dtype"].as_str() == Some("bfloat16")
                && b["shape"].as_array().is_some_and(Vec::is_empty)
        })
}

/// `k` where the MLP is `intermediate_size / k` wide (RecurrentGemma's half): the tiny
/// model's layer-0 down projection takes in the resolved width over `k`, and the width
/// probe (`intermediate_size` set to another value) widened no weight to that value.
fn intermediate_divisor(
    facts: &Facts<'_>,
    params: &BTreeMap<String, Vec<i64>>,
    has_field: bool,
) -> Option<i32> {
    let inter = facts.resolved("intermediate_size")?.as_i64()?;
    let width = *params.get("model.layers.0.mlp.down_proj.weight")?.get(1)?;
    let unwidened = facts
        .value
        .get("width_probes")?
        .as_array()?
        .iter()
        .find(|p| p["field"].as_str() == Some("intermediate_size"))?
        .get("widened")?
        .as_array()?
        .is_empty();
    (has_field && unwidened && width > 0 && width < inter && inter % width == 0)
        .then(|| i32::try_from(inter / width).ok())
        .flatten()
}

/// Finds the zoo's rule that reproduces every probe, if any: each is evaluated by the zoo's
/// own [`SlidingWindowConfig::layer_types`] on the probe's config over the defaults.
///
/// [`SlidingWindowConfig::layer_types`]: mlx_models::family::SlidingWindowConfig::layer_types
fn derive_layer_rule(
    probes: &[(Value, Vec<String>)],
    defaults: &BTreeMap<String, Value>,
) -> Option<LayerRule> {
    use mlx_models::family::{NoRopeConfig, SlidingWindowConfig};
    if probes.is_empty() {
        return None;
    }
    // A fixed period (Gemma 2: every 2nd layer full, OLMo 3: every 4th), then the rules that
    // read fields, for the families whose configs have them.
    let mut candidates = vec![LayerRule::All, LayerRule::NoSliding];
    candidates.extend((2..=8).map(LayerRule::EveryNth));
    candidates.extend((2..=8).map(LayerRule::EveryNthFromFirst));
    candidates.extend(
        [
            LayerRule::Pattern,
            LayerRule::FromMaxWindowLayers,
            LayerRule::WithoutRope,
            LayerRule::AllWhenEnabled,
            LayerRule::AlternateBelowMaxWindowLayers,
            LayerRule::FromMaxWindowLayersWhenSet,
        ]
        .into_iter()
        .filter(|rule| {
            rule.fields()
                .iter()
                .all(|(name, _)| defaults.contains_key(*name))
                && (*rule != LayerRule::WithoutRope || defaults.contains_key("no_rope_layers"))
        }),
    );
    let holds = |rule: LayerRule, config: &Value, expected: &[String]| {
        let mut merged: serde_json::Map<String, Value> = defaults.clone().into_iter().collect();
        if let Some(fields) = config.as_object() {
            merged.extend(fields.clone());
        }
        merged.remove("layer_types");
        let n = merged
            .get("num_hidden_layers")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let merged = Value::Object(merged);
        let (Ok(windows), Ok(no_rope)) = (
            serde_json::from_value::<SlidingWindowConfig>(merged.clone()),
            serde_json::from_value::<NoRopeConfig>(merged),
        ) else {
            return false;
        };
        let types = windows.layer_types(n, rule, &no_rope.uses_rope(n));
        serde_json::to_value(types).ok() == Some(Value::from(expected))
    };
    candidates.into_iter().find(|&rule| {
        probes
            .iter()
            .all(|(config, expected)| holds(rule, config, expected))
    })
}

fn no_rope_rule_holds(probes: &[(Value, Vec<String>)], interval_field: Option<&str>) -> bool {
    probes.iter().all(|(config, expected)| {
        let n = config
            .get("num_hidden_layers")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let interval = interval_field
            .and_then(|f| config.get(f))
            .and_then(Value::as_i64)
            .unwrap_or(0) as i32;
        let ours: Vec<String> = mlx_models::transformer::rope_layers(n, None, interval)
            .iter()
            .map(|&b| i32::from(b).to_string())
            .collect();
        &ours == expected
    })
}

impl Plan {
    /// Drops the fields `choice` does not read (a soft cap Transformers never applies) into
    /// the ignored list, with the reason.
    pub fn settle(&mut self, choice: &Choice) {
        // The flag that switches the norm placement is read, not refused.
        if let Some((switch, _)) = &choice.placement_when {
            self.refused.retain(|(field, _)| field != switch);
            for f in self.fields.iter_mut().filter(|f| &f.name == switch) {
                f.role = "switches the norm placement (see `settings`)";
            }
        }
        if !choice.attention_softcap {
            if let Scalar::Field(name) =
                std::mem::replace(&mut self.attention_softcap, Scalar::None)
            {
                self.fields.retain(|f| f.name != name);
                self.ignored.push((
                    name,
                    "declared, but Transformers' forward does not apply it (the fixtures tell)"
                        .to_owned(),
                ));
                self.ignored.sort();
            }
        }
    }
}

/// The RoPE base Transformers uses when a config gives none.
fn default_theta(facts: &Value) -> f64 {
    match facts.get("default_theta") {
        Some(Value::Number(n)) => return n.as_f64().unwrap_or(10_000.0),
        Some(Value::Object(m)) => {
            if let Some(t) = m.get("global").and_then(Value::as_f64) {
                return t;
            }
        }
        _ => {}
    }
    let params = facts
        .pointer("/config_fields/rope_parameters/default")
        .filter(|v| !v.is_null())
        .or_else(|| facts.pointer("/resolved_config/rope_parameters"));
    let theta = |p: &Value| p.get("rope_theta").and_then(Value::as_f64);
    params
        .and_then(|p| theta(p).or_else(|| p.get("full_attention").and_then(theta)))
        .or_else(|| {
            facts
                .pointer("/config_fields/rope_theta/default")
                .and_then(Value::as_f64)
        })
        .unwrap_or(10_000.0)
}

/// RoPE as the probe measured it on decoder layer 0's queries (`rotary_probe`), where it
/// rotates something.
#[derive(Debug, Default, PartialEq)]
pub struct MeasuredRope {
    /// Rotated features of each head.
    pub dims: Option<i64>,
    /// Adjacent pairs (true) or halves.
    pub pairs: Option<bool>,
    /// The base, where no config field names it (it is in Transformers' code).
    pub base: Option<f64>,
    /// The field that names `dims` in features.
    pub dims_field: Option<String>,
    /// The share of the head that rotates where a config names none.
    pub default_partial: Option<f64>,
}

/// Reads the RoPE probe: the layout always (the candidates need not guess it); the base
/// and the rotated width where no config field carries them. A partial rotation no field
/// names is a gap.
pub fn measured_rope(
    facts: &Facts,
    has_field: &dyn Fn(&str) -> bool,
    decisions: &mut Vec<String>,
    gaps: &mut Vec<String>,
) -> MeasuredRope {
    let Some(probe) = facts.value.get("rotary_probe").filter(|p| !p.is_null()) else {
        return MeasuredRope::default();
    };
    let dims = probe.get("dims").and_then(Value::as_i64).unwrap_or(0);
    if dims == 0 {
        return MeasuredRope::default();
    }
    let head_dim = probe
        .get("head_dim")
        .and_then(Value::as_i64)
        .unwrap_or(dims);
    let pairs = probe.get("pairs").and_then(Value::as_bool);
    let named = has_field("rope_parameters") || has_field("rope_theta");
    let base = probe.get("base").and_then(Value::as_f64).filter(|_| !named);
    let dims_field = facts
        .value
        .get("rotary_dims_field")
        .and_then(Value::as_str)
        .map(str::to_owned);
    decisions.push(format!(
        "RoPE measured on layer 0's queries: {dims} of {head_dim} features rotate, {}{}{}",
        match pairs {
            Some(true) => "adjacent pairs",
            _ => "two halves",
        },
        match &dims_field {
            Some(f) => format!(", as many as `{f}` says"),
            None => String::new(),
        },
        match base {
            Some(b) => format!(", base {b} (no config field names it)"),
            None => String::new(),
        }
    ));
    if !named && base.is_none() {
        gaps.push("RoPE whose base neither the config nor the probe gives".to_owned());
    }
    // A share no declared field carries, that the config class puts in `rope_parameters`.
    let share = dims as f64 / head_dim as f64;
    let mut default_partial = None;
    if dims != head_dim && dims_field.is_none() && !has_field("partial_rotary_factor") {
        let resolved = facts
            .resolved("rope_parameters")
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(Value::as_f64);
        if resolved == Some(share) {
            decisions.push(format!(
                "`partial_rotary_factor` is {share} where a config names none (the config class sets it)"
            ));
            default_partial = Some(share);
        } else {
            gaps.push(format!(
                "RoPE rotates {dims} of {head_dim} features, and no config field is found to say so"
            ));
        }
    }
    MeasuredRope {
        dims: Some(dims),
        pairs,
        base,
        dims_field,
        default_partial,
    }
}

/// The row groups of a fused q/k/v projection ([`mlx_models::fused_qkv::grouped_to_blocks`]).
#[derive(Debug, Clone, PartialEq)]
pub struct QkvGroups {
    /// `None`: one group per head (GPT-NeoX); else that many, whatever the heads (CodeGen's 4).
    pub groups: Option<i32>,
    /// The parts in a group, in the order stored.
    pub order: [mlx_models::fused_qkv::Part; 3],
}

/// Reads how the fused projection's rows are laid out, as the probe found them: the
/// projection's output replaced by its row numbers, read back where attention takes the
/// queries, keys and values. All queries, then keys, then values (or no probe) need
/// nothing; groups of them are reordered; a fused projection whose layout the probe could
/// not read is left to the fixtures.
pub fn qkv_groups(
    facts: &Facts,
    qkv_fused: bool,
    decisions: &mut Vec<String>,
    gaps: &mut Vec<String>,
) -> Option<QkvGroups> {
    use mlx_models::fused_qkv::Part;
    let layout = facts
        .value
        .get("fused_qkv_layout")
        .filter(|l| qkv_fused && !l.is_null())?;
    let order_text = layout.get("order").and_then(Value::as_str).unwrap_or("");
    let parts: Vec<Part> = order_text
        .chars()
        .filter_map(|c| match c {
            'q' => Some(Part::Query),
            'k' => Some(Part::Key),
            'v' => Some(Part::Value),
            _ => None,
        })
        .collect();
    let groups = match layout.get("groups") {
        Some(Value::String(s)) if s == "heads" => None,
        Some(g) => match g.as_i64() {
            Some(n) if n > 0 => Some(n as i32),
            _ => {
                gaps.push(format!("fused q/k/v projection in groups {g}: not read"));
                return None;
            }
        },
        None => return None,
    };
    let Ok(order) = <[Part; 3]>::try_from(parts) else {
        gaps.push(format!(
            "fused q/k/v projection in the order `{order_text}`: not read"
        ));
        return None;
    };
    if groups == Some(1) && order == [Part::Query, Part::Key, Part::Value] {
        return None;
    }
    decisions.push(format!(
        "fused q/k/v rows (measured: the projection's output replaced by its row numbers): {}, \
         each `{order_text}`; `sanitize` reorders them into all queries, keys, values",
        match groups {
            None => "one group per head".to_owned(),
            Some(g) => format!("{g} groups of heads"),
        }
    ));
    Some(QkvGroups { groups, order })
}

/// The per-head modules the fused-projection probe found fed the projected queries and
/// keys before RoPE (Persimmon's `q_layernorm`/`k_layernorm`), where they are norms: the
/// blocks' `q_norm`/`k_norm`. (A norm fed one of separate projections is found by the
/// call trace's checksums; a fused projection's parts have none of their own.)
pub fn fused_qk_norm_renames(facts: &Facts) -> Vec<(String, String)> {
    let Some(fed) = facts
        .value
        .pointer("/fused_qkv_layout/before_rope")
        .and_then(Value::as_object)
    else {
        return Vec::new();
    };
    let is_norm = |name: &str| {
        facts
            .value
            .get("modules")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|m| str_of(m, "name").ends_with(&format!(".0.{name}")))
            .is_some_and(|m| str_of(m, "class").contains("Norm"))
    };
    let mut renames = Vec::new();
    for (part, canonical) in [("q", "q_norm"), ("k", "k_norm")] {
        let Some(name) = fed.get(part).and_then(Value::as_str) else {
            return Vec::new();
        };
        if !is_norm(name) {
            return Vec::new();
        }
        let target = match name.rsplit_once('.') {
            Some((parent, _)) => format!("{parent}.{canonical}"),
            None => canonical.to_owned(),
        };
        if target != name {
            renames.push((name.to_owned(), target));
        }
    }
    renames
}
