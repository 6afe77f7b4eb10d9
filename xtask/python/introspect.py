#!/usr/bin/env python3
"""Describes a Transformers decoder-only family for the Rust code generator.

`cargo xtask port <model_type>` reads what this script writes (`--out facts.json`)
to generate a port: the config class and its fields with their defaults, a tiny
config and what Transformers derives from it (layer_types, rope_parameters,
head_dim, ...), the parameters of the tiny model, its modules with their simple
attributes (eps, scaling, sliding_window, layer_type, use_rope, the activation
class, ...), the rotary module, and the fixture variants worth exporting. Those
variants are chosen mechanically from which config fields exist, so the script
works for a family nobody tuned by hand; `--spec-out` writes them as a variants
spec in the format of xtask/fixtures/llama.json, for export_fixtures.py.

Nothing here depends on the clock, the machine or a download: the same
Transformers version gives the same bytes.

facts.json (sorted keys, 2-space indent, final newline):

    model_type, transformers_version, config_class, architecture
    config_fields    {name: {default, kind, nullable, annotation}}: the fields the
                     family's config class declares (Transformers 5 configs are
                     dataclasses; the fields common to all configs that the class
                     does not redeclare, like id2label or return_dict, are left out).
                     kind: int|float|bool|str|list|dict|none (of the default when it
                     is not null, else of the first type of the annotation).
    attribute_map    the config class's aliases (alias -> field)
    small_config     the tiny config (the spec's base_config)
    resolved_config  AutoConfig.for_model(model_type, **small_config).to_dict()
    parameters       [{name, shape[, tied_to][, init]}] of the tiny model's state_dict,
                     sorted; tied_to names the parameter a tied one shares storage
                     with (save_pretrained writes only that one); init ("zeros" or
                     "ones", vectors only) is Transformers' initial value: Gemma's
                     RMSNorm weights start at zeros because the norm scales by
                     1 + weight
    modules          [{name, class, attrs[, buffers]}] for the non-layer modules and
                     those of decoder layers 0 and 1; attrs holds the instance
                     attributes that are JSON values (numbers, strings, booleans,
                     null, and lists/dicts of them) and, for parameter-less child
                     modules such as act_fn, the child's class name; buffers:
                     {name: {shape, dtype, persistent}}
    structure        {embeddings, positions, layers, norm, rotary, lm_head}: the full module
                     names of the input embedding, learned absolute position embeddings
                     (GPT-2's transformer.wpe, else null), the decoder layers' ModuleList
                     (model.layers, transformer.h, gpt_neox.layers), the final norm, the
                     rotary module (null without RoPE) and the output layer, found by
                     structure (fixture_common.decoder_stack), not by fixed names
    saved_names      {written: loaded}: the names save_pretrained writes where they are not
                     the model's own (GPT-NeoX's embed_out.weight for lm_head.weight)
    layer_types      the tiny config's layer_types, or null
    rotary           {class, per_layer_type, rope_types, supported_rope_types} (class null
                     and the rest empty for a model without RoPE):
                     per_layer_type is true when the rotary module computes one
                     RoPE per attention layer type (forward takes a layer type);
                     rope_types maps layer type -> rope_type ("all" when not per
                     layer type); supported_rope_types lists the RoPE types the
                     config class accepts
    variants         the proposed fixture variants (the spec's variants)

Variants, in this order, each where the config class has the fields named:

    default          transformers5 style, the tiny config as it is (tied only if
                     the family's default ties)
    tied | untied    tie_word_embeddings: the opposite of the family's default
    bias | no-bias   bool fields named *_bias or use_bias: all true (all false
                     when the family's defaults are all true, as Starcoder2's)
    sliding          sliding_window: a window of 5 (use_sliding_window true where
                     it exists); with layer_types, 3 layers [sliding, full,
                     sliding] and intermediate_size 64 to stay small
    sliding-hub      max_window_layers + use_sliding_window (Qwen2/3): the window
                     from layer 1 on, derived, in a Hub-style config
    linear | longrope | yarn
                     rope_parameters, Hub style: linear factor 8 on the full-attention
                     RoPE when the rotary module has one RoPE per layer type (Gemma
                     3); longrope when the class has a top-level
                     original_max_position_embeddings or accepts longrope but not
                     yarn (Phi-3); else yarn (else linear)
    hub              the default in a Hub-style config
    softcap          attn_logit_softcapping / final_logit_softcapping: 2.0 / 3.0
    multipliers      *_multiplier / logits_scaling: non-trivial values
    no-rope          no_rope_layers: every second layer without RoPE
    partial-rotary   partial_rotary_factor as a field or in the resolved
                     rope_parameters (Phi-3): 0.75, Hub style

Seeds are 1, 2, 3, ... in that order; unless --no-seed-check, each variant is
built, saved, reloaded and run greedily as export_fixtures.py does, and a seed
with a greedy near-tie (margin below export_fixtures.MIN_GREEDY_MARGIN) moves on
to seed + 100, + 200, ... So every proposed variant passes that check of the
exporter; its other checks do not depend on the seed.

Usage:
    python introspect.py --model-type qwen2 --out facts.json [--config small.json [--replace-config]]
                         [--spec-out xtask/fixtures/qwen2.json] [--no-seed-check]
"""

import argparse
import copy
import dataclasses
import json
import math
import re
import sys
import types
import typing
from pathlib import Path

from fixture_common import configure_determinism, decoder_stack, write_json
import probes

# The tiny config: these fields are overridden wherever the config class has them.
SMALL_SIZES = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "norm_epsilon": 1e-05,
    "layer_norm_eps": 1e-05,
    "initializer_range": 0.15,
    # Gemma 2/3 scale attention scores by query_pre_attn_scalar**-0.5: keep it apart
    # from head_dim (16) as Gemma 2 27B does (144 vs 128), so that a port that scales
    # by head_dim fails.
    "query_pre_attn_scalar": 32,
    # GPT-J and CodeGen rotate the first rotary_dim features of each 16-wide head (64 by default).
    "rotary_dim": 8,
    # Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): every width apart from the
    # others, so that a port that mixes two of them up fails on shapes.
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    # Mamba2 mixers of hybrids (Bamba, Granite 4, Falcon-H1): heads x head width equal to
    # mamba_expand (2) x hidden_size, as the mixer requires; a prompt of several chunks.
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_d_state": 16,
    "mamba_chunk_size": 4,
}
HEAD_DIM = SMALL_SIZES["hidden_size"] // SMALL_SIZES["num_attention_heads"]
# A mixture of experts whose class leaves the expert count null (dots1) or above 4: 4 experts
# of width 8, 2 per token, one shared, so that the tiny model builds and stays small.
MOE_SMALL_SIZES = {
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    # Aria's own name, which no attribute_map aliases.
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "n_shared_experts": 1,
    # Cohere2-MoE's shared experts (0 by default): one, so that the fixtures check how the
    # block joins it to the routed experts.
    "num_shared_experts": 1,
    "moe_intermediate_size": 8,
    # LFM2-MoE's leading dense layers (2 by default): one, so that layer 1 has experts.
    "num_dense_layers": 1,
}
# The width of an optional block the class leaves out by default (a field whose default 0
# means none): apart from every tiny size.
OPTIONAL_WIDTH = 24
# Families with learned absolute positions (GPT-2's wpe) get this many, enough for the
# fixtures' prompt and greedy run.
LEARNED_POSITIONS = 64
# Positions recorded of what a model adds to its embeddings by position alone.
POSITION_SIGNAL_ROWS = 8
# Variants with sliding-window layers: the window is smaller than the 16-token prompt.
SLIDING_WINDOW = 5
# Variants that mix layer types use 3 layers and a narrower MLP to stay below ~510 KB.
MIXED_LAYERS = 3
MIXED_INTERMEDIATE_SIZE = 64
# Seeds are 1, 2, 3, ... in variant order; a seed whose greedy run has a near-tie
# is replaced by seed + SEED_RETRY_STEP * k, the first that passes.
SEED_RETRY_STEP = 100
SEED_RETRIES = 20
# Non-trivial values for multiplier fields (Granite-style); other *_multiplier fields get 0.5.
MULTIPLIER_VALUES = {
    "embedding_multiplier": 4.0,
    "residual_multiplier": 0.5,
    "attention_multiplier": 0.125,
    "logits_scaling": 2.0,
}
# Softcaps small enough to bite on the tiny random model (Gemma 2 ships 50 / 30).
SOFTCAP_VALUES = {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}
# Parameters of each scaled-RoPE variant.
YARN = {"rope_type": "yarn", "rope_theta": 100000.0, "factor": 4.0, "original_max_position_embeddings": 64}
YARN_MAX_POSITION_EMBEDDINGS = 256  # = factor x original_max_position_embeddings
LINEAR = {"rope_type": "linear", "factor": 8.0}
LONGROPE_ORIGINAL_MAX_POSITION_EMBEDDINGS = 4096
LONGROPE_SHORT_FACTOR = [1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.6, 2.0]
LONGROPE_LONG_FACTOR = [1.0, 1.25, 1.8, 3.0, 5.5, 10.0, 19.0, 36.0]
PARTIAL_ROTARY_FACTOR = 0.75  # Phi-4-mini; 12 of 16 head dims rotate
# The RoPE types whose acceptance is probed, with parameters valid at the tiny size.
ROPE_PROBES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "longrope": {
        "rope_type": "longrope",
        "original_max_position_embeddings": 64,
        "short_factor": LONGROPE_SHORT_FACTOR,
        "long_factor": LONGROPE_LONG_FACTOR,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}
SIMPLE_TYPES = (bool, int, float, str, type(None))


# --------------------------------------------------------------------------- helpers


def jsonable(value):
    """`value` as plain JSON (tuples become lists, non-finite floats strings), or raises TypeError."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, SIMPLE_TYPES):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    raise TypeError(type(value).__name__)


def jsonable_or_none(value):
    try:
        return jsonable(value), True
    except TypeError:
        return None, False


def kind_of_value(value) -> str:
    if value is None:
        return "none"
    for python_type, kind in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "list"),
                              (tuple, "list"), (dict, "dict")):
        if isinstance(value, python_type):
            return kind
    return type(value).__name__


def annotation_kinds(annotation) -> list:
    """The kinds an annotation allows, in its order (`int | None` -> ["int", "none"])."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = []
        for argument in typing.get_args(annotation):
            kinds += [kind for kind in annotation_kinds(argument) if kind not in kinds]
        return kinds
    if annotation is type(None) or annotation is None:
        return ["none"]
    if origin is typing.Literal:
        return [kind_of_value(typing.get_args(annotation)[0])]
    base = origin or annotation
    for python_type, kind in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "list"),
                              (tuple, "list"), (dict, "dict")):
        if isinstance(base, type) and issubclass(base, python_type):
            return [kind]
    if isinstance(base, type) and typing.is_typeddict(base):
        return ["dict"]
    return [getattr(base, "__name__", str(base))]


def annotation_text(annotation) -> str:
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


# --------------------------------------------------------------------------- config


def resolve_annotation(config_class, field):
    """A field's annotation as a type, evaluated in its class's module when it is a string."""
    annotation = field.type
    if not isinstance(annotation, str):
        return annotation
    for klass in config_class.__mro__:
        if field.name in getattr(klass, "__annotations__", {}):
            namespace = vars(sys.modules[klass.__module__])
            try:
                return eval(annotation, dict(namespace))  # noqa: S307 - the class's own annotation text
            except Exception:  # noqa: BLE001 - keep the text
                return annotation
    return annotation


def config_fields(config_class) -> dict:
    """The dataclass fields the family's config class declares, with default and kind."""
    from transformers import PreTrainedConfig

    declared = set()
    for klass in config_class.__mro__:
        if klass is PreTrainedConfig:
            break
        declared |= set(getattr(klass, "__annotations__", {}))
    fields = {}
    for field in dataclasses.fields(config_class):
        if field.name not in declared or field.name == "kwargs":
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        default, _ = jsonable_or_none(default)
        annotation = resolve_annotation(config_class, field)
        kinds = annotation_kinds(annotation)
        fields[field.name] = {
            "default": default,
            "kind": kind_of_value(default) if default is not None else next(
                (kind for kind in kinds if kind != "none"), "none"
            ),
            "nullable": "none" in kinds,
            "annotation": annotation_text(annotation),
        }
    return fields


def build_config(model_type: str, config: dict):
    import transformers

    return transformers.AutoConfig.for_model(model_type, **copy.deepcopy(config))


def accepted_sizes(model_type: str, fields: dict, config: dict) -> dict:
    """`config` with the tiny sizes the config class refuses given back their defaults (or
    left to the class where the default is None), one field at a time in order, until the
    class accepts it (ZAYA supports one expert per token only); `config` as it is where it
    builds, or where no such field makes it."""
    try:
        build_config(model_type, config)
        return config
    except Exception:
        pass
    for name in list(config):
        if name not in fields or name.endswith("token_id"):
            continue
        # A default of None: the class derives the value itself (Dots3's key/value heads).
        if fields[name]["default"] is None:
            trial = {k: v for k, v in config.items() if k != name}
        else:
            trial = {**config, name: fields[name]["default"]}
        try:
            build_config(model_type, trial)
        except Exception:
            continue
        return trial
    return config


def small_config(model_type: str, fields: dict, attribute_map: dict) -> dict:
    """The tiny config: SMALL_SIZES where the class has the field, tie_word_embeddings as the family's default.

    Special token ids beyond the tiny vocabulary are set to its last id.

    If the family's full-size default mixes attention layer types (Gemma 3: five
    sliding, one full) but the tiny one would not, layer_types cycles through
    them (Gemma 3 then has a full-attention layer, and both of its RoPEs).
    """
    config = {name: value for name, value in SMALL_SIZES.items() if name in fields}
    # Fields a class declares under its own name with the common one as an alias (GPT-2's
    # n_embd, n_layer, n_head, n_positions) get the common one's size.
    for name, value in SMALL_SIZES.items():
        own = attribute_map.get(name)
        if name not in fields and own in fields:
            config[own] = value
    if "head_dim" not in fields:
        config.pop("head_dim", None)
    # MoE sizes under the class's own names too (ERNIE 4.5's `moe_num_experts`, `moe_k`).
    def own_name(name):
        return name if name in fields else attribute_map.get(name)

    counts = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    defaults = [fields[own_name(n)]["default"] for n in counts if own_name(n) in fields]
    if any(d is None or (isinstance(d, int) and d > MOE_SMALL_SIZES[counts[0]]) for d in defaults):
        config.update({own_name(n): v for n, v in MOE_SMALL_SIZES.items() if own_name(n) in fields})
        if "moe_intermediate_size" not in fields and "intermediate_size" in config:
            # Experts as wide as `intermediate_size` (Granite MoE): narrower, to stay small.
            config["intermediate_size"] = MOE_SMALL_SIZES["moe_intermediate_size"] * 4
    if "tie_word_embeddings" in fields:
        config["tie_word_embeddings"] = fields["tie_word_embeddings"]["default"]
    # Special token ids outside the tiny vocabulary (Phi-3's pad 32000) become its last id.
    vocab_size = config.get("vocab_size", SMALL_SIZES["vocab_size"])
    for name, field in fields.items():
        default = field["default"]
        if name.endswith("token_id") and default is not None:
            values = default if isinstance(default, list) else [default]
            if any(isinstance(value, int) and value >= vocab_size for value in values):
                clipped = [value if value < vocab_size else vocab_size - 1 for value in values]
                config[name] = clipped if isinstance(default, list) else clipped[0]
    config = accepted_sizes(model_type, fields, config)
    if "layer_types" in fields:
        full_size = build_config(model_type, {}).layer_types or []
        tiny = build_config(model_type, config).layer_types or []
        kinds = list(dict.fromkeys(full_size))
        # A kind that attends first: the plan reads the attention from layer 0 and a hybrid's
        # mixer from the others (Qwen3-Next's full-size layers start with linear attention).
        kinds = [k for k in kinds if attends(k)] + [k for k in kinds if not attends(k)]
        if len(kinds) > 1 and (len(set(tiny)) < len(kinds) or (tiny and not attends(tiny[0]))):
            config["layer_types"] = [kinds[i % len(kinds)] for i in range(config["num_hidden_layers"])]
    config = probes.fit_layer_patterns(model_type, config, build_config)
    config = layer_types_the_model_reads(model_type, fields, config)
    return mix_layer_kinds(model_type, fields, config)


def layer_type_names(model_type: str) -> list:
    """The layer kinds the family's modeling code names where it reads `layer_types[...]`,
    those that attend first: the strings a read is compared with (`config.layer_types[i] !=
    "conv"`), and the keys of a mapping a read indexes (`causal_mask_mapping[
    self.config.layer_types[i]]` with `{"full_attention": ..., "conv": ...}`). Read from the
    source of the module that defines the causal-LM class (empty where it cannot be read)."""
    import ast
    import inspect

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        module = inspect.getmodule(getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]))
        tree = ast.parse(inspect.getsource(module))
    except Exception:  # noqa: BLE001 - no source: no names
        return []

    def reads(node) -> bool:
        return any(
            isinstance(n, ast.Subscript) and isinstance(n.value, ast.Attribute) and n.value.attr == "layer_types"
            for n in ast.walk(node)
        )

    def strings(node) -> list:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [s for e in node.elts for s in strings(e)]
        return []

    names, mappings = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(reads(o) for o in operands):
                names += [s for o in operands if not reads(o) for s in strings(o)]
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and reads(node.slice):
            mappings.add(node.value.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            if any(isinstance(t, ast.Name) and t.id in mappings for t in node.targets):
                names += [s for k in node.value.keys if k is not None for s in strings(k)]
    names = list(dict.fromkeys(names))
    return [n for n in names if attends(n)] + [n for n in names if not attends(n)]


def layer_types_the_model_reads(model_type: str, fields: dict, config: dict) -> dict:
    """A `layer_types` for a class whose field defaults to null while its model indexes it
    (LFM2-MoE's `config.layer_types[layer_idx] != "conv"`: the default config builds no model):
    the kinds its modeling code names ([`layer_type_names`]), layer 0 of one that attends and
    the others cycling through the rest, kept only if the tiny model then builds. `config`
    unchanged where the class resolves a `layer_types` of its own or the model builds without."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if "layer_types" not in fields or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return config
    try:
        if getattr(build_config(model_type, config), "layer_types", None) is not None:
            return config
    except Exception:
        return config
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    try:
        tiny_model(architecture, build_config(model_type, config))
        return config
    except Exception:  # noqa: BLE001 - the model needs the layer kinds
        pass
    kinds = layer_type_names(model_type)
    if not kinds:
        return config
    rest = kinds[1:] or kinds
    layers = config.get("num_hidden_layers", SMALL_SIZES["num_hidden_layers"])
    trial = {**config, "layer_types": [kinds[0]] + [rest[i % len(rest)] for i in range(layers - 1)]}
    try:
        getattr(transformers, architecture)(build_config(model_type, trial))
    except Exception:  # noqa: BLE001 - not kinds it accepts
        return config
    return trial


def layer_kinds(resolved) -> list:
    """The kind of each layer a config resolves to (`layer_types`, or `layers_block_type`)."""
    return list(getattr(resolved, "layer_types", None) or getattr(resolved, "layers_block_type", None) or [])


def attends(kind: str) -> bool:
    """Whether a resolved layer kind (`layer_types`, `layers_block_type`) is attention."""
    return kind.endswith("attention") and kind != "linear_attention"


def attention_pattern_changes(fields: dict, layers: int, attending: list) -> list:
    """The pattern-field values that make exactly the layers in `attending` attend: an index
    list of attention layers (`attn_layer_indices`, `full_attn_idxs`), or a period and offset
    (`attn_layer_period`, `attn_layer_offset`) where `attending` is every n-th layer."""
    tries = []
    for name in fields:
        if "attn" in name and (name.endswith("idxs") or name.endswith("indices")):
            tries.append({name: list(attending)})
    if "attn_layer_period" in fields and "attn_layer_offset" in fields and len(attending) >= 1:
        period = attending[1] - attending[0] if len(attending) > 1 else layers
        tries.append({"attn_layer_period": period, "attn_layer_offset": attending[0]})
    return tries


def mix_layer_kinds(model_type: str, fields: dict, config: dict) -> dict:
    """A tiny config with a layer of each kind where the family's layer-pattern fields can say so.

    A hybrid's tiny config often has one kind of layer only (Bamba's null
    `attn_layer_indices` makes every layer Mamba; LFM2's default `full_attn_idxs` makes
    every one attention), so the other kind would never run. Where the resolved layers
    are all alike, the pattern field the class has is set so that the first layer attends
    and the others do not (the structure, the call trace and the RoPE probes read layer 0,
    the recurrent mixer is read from the others): an index list of attention layers
    (`attn_layer_indices`, `full_attn_idxs`) becomes `[0]`; a period and offset of
    attention layers (`attn_layer_period`, `attn_layer_offset`) become the layer count
    and 0. The change is kept only if the config class then resolves two kinds of layer.
    """
    try:
        kinds = layer_kinds(build_config(model_type, config))
    except Exception:
        return config
    if len(set(kinds)) != 1:
        return config
    layers = config.get("num_hidden_layers", len(kinds))
    for change in attention_pattern_changes(fields, layers, [0]):
        mixed = {**config, **change}
        # A `layer_types` the tiny config carries would override the pattern.
        if "layer_types" in fields and "layer_types" not in change:
            mixed.pop("layer_types", None)
        try:
            if len(set(layer_kinds(build_config(model_type, mixed)))) > 1:
                return mixed
        except Exception:
            continue
    return config


def hybrid_layers(model_type: str, fields: dict, small: dict) -> dict | None:
    """How a hybrid's config says which layers attend, probed on the config class: the
    pattern field (an index list, or a period and offset) set to attend at layers 0 and 2
    of 4 and at 1 and 3, each checked against the kinds it resolves, and what a null index
    list means. None where the tiny config's layers are all alike or no pattern field
    reproduces them.

    Where the class has a `layer_types` field and the tiny config's kinds include one that
    does not attend (LFM2's "conv"), that list is the rule (it wins over a pattern field
    wherever a config.json carries it): {"rule": "layer_types", "field", "kinds": the tiny
    config's kinds in order of first use, "fallback": the pattern rule above, or None}.

    A list field naming the kinds in a repeating pattern (RecurrentGemma's `block_types`)
    is the rule {"rule": "cycle", "field", "attending", "mixing"} ([`cycled_pattern_rule`])."""
    found = pattern_rule(model_type, fields, small)
    try:
        kinds = layer_kinds(build_config(model_type, small))
    except Exception:
        return found
    if "layer_types" in fields and len(set(kinds)) > 1 and not all(attends(k) for k in kinds):
        return {"rule": "layer_types", "field": "layer_types", "kinds": list(dict.fromkeys(kinds)), "fallback": found}
    return found


def pattern_rule(model_type: str, fields: dict, small: dict) -> dict | None:
    """The pattern field of [`hybrid_layers`] (an index list, or a period and offset), or None."""
    try:
        kinds = layer_kinds(build_config(model_type, small))
    except Exception:
        return None
    if len(set(kinds)) < 2:
        return None
    cycled = cycled_pattern_rule(model_type, small)
    if cycled is not None:
        return cycled
    base = {key: value for key, value in small.items() if key != "layer_types"}
    base["num_hidden_layers"] = 4
    for first, second in zip(
        attention_pattern_changes(fields, 4, [0, 2]), attention_pattern_changes(fields, 4, [1, 3])
    ):
        agrees = True
        for change, want in ((first, [True, False, True, False]), (second, [False, True, False, True])):
            try:
                got = [attends(k) for k in layer_kinds(build_config(model_type, {**base, **change}))]
            except Exception:
                got = None
            agrees = agrees and got == want
        if not agrees:
            continue
        if "attn_layer_period" in first:
            return {"rule": "period", "period": "attn_layer_period", "offset": "attn_layer_offset"}
        (field,) = first
        try:
            null = [attends(k) for k in layer_kinds(build_config(model_type, {**base, field: None}))]
        except Exception:
            null = None
        return {
            "rule": "indices",
            "field": field,
            # Every layer attends, none does, or the class refuses null.
            "null_attends": null[0] if null and len(set(null)) == 1 else None,
        }
    return None


def cycled_pattern_fields(model_type: str, small: dict) -> list:
    """The list-of-strings fields of the tiny config whose entries, repeated over the layers,
    name each layer's kind (RecurrentGemma's `block_types`: layer i is
    `block_types[i % len]`): for each, the field and which of its values attend. A field
    qualifies when each value alone, as a one-entry list, makes every layer one kind, and
    the tiny config's list, repeated, gives the kinds the config resolves."""
    try:
        kinds = layer_kinds(build_config(model_type, small))
    except Exception:
        return []
    found = []
    for field, value in small.items():
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            continue
        attending = {}
        for entry in dict.fromkeys(value):
            try:
                alone = layer_kinds(build_config(model_type, {**small, field: [entry]}))
            except Exception:
                alone = []
            # The one entry names every layer (a per-layer list would name one).
            if len(alone) != len(kinds) or len(set(alone)) != 1:
                break
            attending[entry] = attends(alone[0])
        else:
            cycled = [attending[value[i % len(value)]] for i in range(len(kinds))]
            if cycled == [attends(k) for k in kinds] and len(set(attending.values())) == 2:
                found.append((field, attending))
    return found


def cycled_pattern_rule(model_type: str, small: dict) -> dict | None:
    """The rule of a field that names the layer kinds in a repeating pattern
    ([`cycled_pattern_fields`]): {"rule": "cycle", "field", "attending": its values that
    attend, "mixing": the one that does not}; None where no field does, or more than one
    value does not attend."""
    for field, attending in cycled_pattern_fields(model_type, small):
        mixing = [v for v, a in attending.items() if not a]
        if len(mixing) == 1:
            return {
                "rule": "cycle",
                "field": field,
                "attending": [v for v, a in attending.items() if a],
                "mixing": mixing[0],
            }
    return None


def attention_first(model_type: str, small: dict) -> dict:
    """The tiny config with its repeating layer pattern ([`cycled_pattern_fields`]) rotated
    so that layer 0 attends, where it does not (the structure, the call trace and the RoPE
    probes read layer 0; the recurrent mixer is read from the others): RecurrentGemma's
    `block_types` ["recurrent", "attention"] becomes ["attention", "recurrent"]. `small`
    unchanged where layer 0 attends or no such field exists."""
    try:
        kinds = layer_kinds(build_config(model_type, small))
    except Exception:
        return small
    if not kinds or attends(kinds[0]):
        return small
    for field, attending in cycled_pattern_fields(model_type, small):
        pattern = small[field]
        first = next((i for i, v in enumerate(pattern) if attending[v]), None)
        if first is not None:
            return {**small, field: pattern[first:] + pattern[:first]}
    return small


def runnable_kv_heads(architecture: str, model_type: str, small: dict) -> dict:
    """The tiny config with as many key/value heads as query heads where the tiny model cannot run with fewer.

    Latent attention expands its keys and values to every query head before Transformers
    repeats them by `num_attention_heads // num_key_value_heads`: such a model runs only
    with the two equal (DeepSeek-V2's configs set them so).
    """
    import torch

    heads = small.get("num_attention_heads")
    if heads is None or small.get("num_key_value_heads", heads) == heads:
        return small
    ids = torch.arange(1, 5).unsqueeze(0) % small.get("vocab_size", SMALL_SIZES["vocab_size"])

    def runs(config: dict):
        try:
            with torch.no_grad():
                tiny_model(architecture, build_config(model_type, config))(input_ids=ids)
            return None
        except Exception as error:  # noqa: BLE001 - any failure: the config does not run
            return error

    error = runs(small)
    if error is None:
        return small
    # Two key/value heads first (DiffLlama splits its values in two halves), then all of them.
    counts = [n for n in (2, heads) if n > small.get("num_key_value_heads", heads) and heads % n == 0]
    for count in dict.fromkeys(counts):
        more = {**small, "num_key_value_heads": count}
        if runs(more) is None:
            print(f"{model_type}: the tiny model does not run with fewer key/value heads ({error}); "
                  f"num_key_value_heads {count}", file=sys.stderr, flush=True)
            return more
    return small  # Not the heads: whatever fails is reported where it fails.


def supported_rope_types(model_type: str, config: dict) -> list:
    """The RoPE types the config class accepts at the tiny size (it validates them on construction)."""
    import transformers

    supported = []
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # the probes' parameters draw warnings
    for name, probe in ROPE_PROBES.items():
        try:
            built = build_config(model_type, {**config, "rope_parameters": {**probe, "rope_theta": 10000.0}})
        except Exception:  # noqa: BLE001 - any refusal means unsupported
            continue
        rope = built.rope_parameters
        if rope.get("rope_type") == name or any(
            isinstance(value, dict) and value.get("rope_type") == name for value in rope.values()
        ):
            supported.append(name)
    transformers.utils.logging.set_verbosity(verbosity)
    return supported


# --------------------------------------------------------------------------- model


def tiny_model(architecture: str, config):
    import torch
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, architecture)(config).eval()


def parameters(model) -> list:
    """state_dict entries (name, shape), sorted; tied ones name the entry they share storage with.

    Vectors also say what Transformers initialises them to (`init`: zeros or ones),
    from the freshly built model.
    """
    state = model.state_dict(keep_vars=True)
    first_of = {}
    entries = []
    for name in sorted(state):
        tensor = state[name]
        entry = {"name": name, "shape": list(tensor.shape)}
        if tensor.dim() == 1:
            # What Transformers initialises a vector to: Gemma's RMSNorm weights are zeros
            # (the norm scales by 1 + weight), most others ones; biases zeros.
            if bool((tensor == 0).all()):
                entry["init"] = "zeros"
            elif bool((tensor == 1).all()):
                entry["init"] = "ones"
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in first_of:
            entry["tied_to"] = first_of[key]
        else:
            first_of[key] = name
        entries.append(entry)
    # A tied lm_head sorts before model.embed_tokens: point from the one save_pretrained drops.
    tied_keys = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(tied_keys, dict):
        by_name = {entry["name"]: entry for entry in entries}
        for target, source in tied_keys.items():
            if target in by_name and source in by_name and (
                by_name[target].get("tied_to") == source or by_name[source].get("tied_to") == target
            ):
                by_name[source].pop("tied_to", None)
                by_name[target]["tied_to"] = source
    return entries


def module_attrs(module) -> dict:
    attrs = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        value, ok = jsonable_or_none(value)
        if ok:
            attrs[key] = value
    for name, child in module.named_children():
        if next(child.parameters(), None) is None and next(child.buffers(), None) is None and not list(
            child.children()
        ):
            attrs[name] = type(child).__name__
    return attrs


def measured_norm_eps(module, attrs: dict):
    """The epsilon of a norm module that keeps none as an attribute (OLMo's LayerNorm fixes
    1e-5 in its forward), measured: for x = s·(1, -1, 1, ...) (mean 0, mean square s²) a norm
    gives o(x) - o(0) = g·x / sqrt(s² + eps) whatever its scale g and bias; two scales give
    eps. None for a module that is no norm, keeps an epsilon, or does not run on one vector."""
    import torch

    if "norm" not in type(module).__name__.lower() or any(
        key in attrs for key in ("eps", "variance_epsilon", "epsilon")
    ):
        return None
    width = attrs.get("normalized_shape")
    width = width[-1] if isinstance(width, list) and width else None
    weight = getattr(module, "weight", None)
    if width is None and isinstance(weight, torch.Tensor):
        width = weight.shape[-1]
    if not width or width < 2:
        return None
    sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(width)])
    try:
        with torch.no_grad():
            zero = module(torch.zeros(1, width)).double()
            small, large = 1e-3, 1.0
            d_small = (module((small * sign).unsqueeze(0)).double() - zero)[0, 0] / small
            d_large = (module((large * sign).unsqueeze(0)).double() - zero)[0, 0] / large
    except Exception:  # noqa: BLE001 - not a module that normalizes one vector
        return None
    if d_large == 0:
        return None
    ratio = float((d_small / d_large) ** 2)
    if ratio <= 1:
        return None
    eps = (large**2 - ratio * small**2) / (ratio - 1)
    return float(f"{eps:.3g}") if eps > 0 else None


def modules(model) -> list:
    """Non-layer modules and those of decoder layers 0 and 1, in named_modules order."""
    stack = decoder_stack(model)
    layers = f"{stack['prefix']}.{stack['layers_name']}"
    layer_index = re.compile(re.escape(layers) + r"\.(\d+)(\.|$)")
    entries = []
    for name, module in model.named_modules():
        match = layer_index.match(name)
        if match and int(match.group(1)) >= 2:
            continue
        entry = {"name": name, "class": type(module).__name__, "attrs": module_attrs(module)}
        eps = measured_norm_eps(module, entry["attrs"])
        if eps is not None:
            entry["attrs"]["measured_eps"] = eps
        persistent = set(module._buffers) - set(getattr(module, "_non_persistent_buffers_set", set()))
        buffers = {
            buffer_name: {
                "shape": list(buffer.shape),
                "dtype": str(buffer.dtype).removeprefix("torch."),
                "persistent": buffer_name in persistent,
            }
            for buffer_name, buffer in module.named_buffers(recurse=False)
        }
        if buffers:
            entry["buffers"] = buffers
        entries.append(entry)
    return entries


def structure(model) -> dict:
    """Where the causal LM keeps its parts (fixture_common.decoder_stack), as full module
    names: `embeddings` (the input embedding), `positions` (learned absolute position
    embeddings, GPT-2's `wpe`: another Embedding of the base model with a row per
    position, or null), `layers` (the ModuleList of decoder layers), `norm` (the final
    norm, or null), `rotary` (or null), `lm_head` (the output embedding)."""
    import torch

    stack = decoder_stack(model)
    base, prefix = stack["base"], stack["prefix"]
    max_positions = getattr(model.config, "max_position_embeddings", None)
    positions = next(
        (
            name for name, child in base.named_children()
            # A row per position, and OPT's two more (its positions start at 2).
            if isinstance(child, torch.nn.Embedding) and name != stack["embed_name"]
            and max_positions is not None and max_positions <= child.num_embeddings <= max_positions + 2
        ),
        None,
    )
    full = {module: name for name, module in model.named_modules()}
    output = model.get_output_embeddings()
    embedding_norm, norm_on_embeddings = embedding_norm_of(model, stack)

    def named(child):
        return None if child is None else f"{prefix}.{child}"

    found = {
        "embeddings": named(stack["embed_name"]),
        "positions": named(positions),
        "layers": named(stack["layers_name"]),
        "norm": named(stack["norm_name"]),
        "rotary": full.get(stack["rotary"]) if stack["rotary"] is not None else None,
        "lm_head": full.get(output) if output is not None else None,
        "embedding_norm": named(embedding_norm),
    }
    if norm_on_embeddings:
        # The final norm also runs on the embeddings, before the first layer (NanoChat).
        found["norm_on_embeddings"] = True
    return found


def position_signal(model, rows: int = POSITION_SIGNAL_ROWS):
    """What the model adds to its token embeddings by position alone, as decoder layer 0
    receives it: the layer's input with the input embedding zeroed, for the first `rows`
    positions (rows x hidden, rounded), or None when it does not vary by position (RoPE,
    ALiBi: nothing added). A fixed table no parameter holds (XGLM's and CTRL's sinusoids)
    shows here; the port fits its closed form to these rows."""
    import torch

    probe = copy.deepcopy(model).eval()
    stack = decoder_stack(probe)
    with torch.no_grad():
        probe.get_input_embeddings().weight.zero_()
    seen = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        seen.append(hidden.detach().float()[0])

    handle = stack["layers"][0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            probe(input_ids=torch.zeros((1, rows), dtype=torch.long))
    finally:
        handle.remove()
    if not seen:
        return None
    table = seen[0]
    if float((table - table[0]).abs().max()) < 1e-6:
        return None
    return [[round(float(v), 7) for v in row] for row in table]


def embedding_norm_of(model, stack):
    """A norm module of the base model called after the input embedding and before the
    first decoder layer (BLOOM's `word_embeddings_layernorm`): its name under the base, or
    None; and whether the final norm is called there too (NanoChat's one `norm`, on the
    embeddings and after the last layer). Read from the order the base model's children
    are called in."""
    import torch

    base = stack["base"]
    order = []
    # Children of the base, and modules nested in them (the ModernBERT decoder's
    # `embeddings.norm` beside `embeddings.tok_embeddings`), the layers' excepted.
    layers = stack["layers_name"]
    handles = [
        child.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
        for name, child in base.named_modules()
        if name and name != layers and not name.startswith(f"{layers}.")
    ]
    first = stack["layers"][0].register_forward_pre_hook(lambda m, a: order.append(None))
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(1, 5).unsqueeze(0) % model.config.get_text_config().vocab_size)
    except Exception:
        return None, False
    finally:
        first.remove()
        for h in handles:
            h.remove()
    before = order[: order.index(None)] if None in order else []
    own = next(
        (
            name for name in before
            if name not in (stack["embed_name"], stack["norm_name"])
            and "norm" in type(base.get_submodule(name)).__name__.lower()
        ),
        None,
    )
    return own, stack["norm_name"] is not None and stack["norm_name"] in before


def prediction_head(architecture: str, model_type: str, small: dict, model):
    """A module of the causal LM besides its base model and output layer that transforms
    the final hidden states before the output layer (the ModernBERT decoder's `lm_head`:
    dense, activation, norm): `{"name", "calls": [[child, class], ...] in call order,
    "activation_field"}`, or None. `activation_field` is the string field that, set to
    `relu`, turns the head's activation module into a ReLU (its own field, not the MLP's)."""
    import torch

    output = model.get_output_embeddings()
    base = model.base_model
    candidates = {
        name: child for name, child in model.named_children()
        if child is not base and child is not output and any(True for _ in child.parameters())
    }
    if not candidates or output is None:
        return None
    order = []
    handles = [child.register_forward_pre_hook(lambda m, a, name=name: order.append(name)) for name, child in candidates.items()]
    handles.append(output.register_forward_pre_hook(lambda m, a: order.append(None)))
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(1, 5).unsqueeze(0) % model.config.get_text_config().vocab_size)
    finally:
        for h in handles:
            h.remove()
    before = order[: order.index(None)] if None in order else []
    if len(set(before)) != 1:
        return None
    name = before[0]
    head = candidates[name]
    calls = []
    inner = [
        child.register_forward_pre_hook(lambda m, a, local=local: calls.append([local, type(m).__name__]))
        for local, child in head.named_children()
    ]
    try:
        with torch.no_grad():
            head(torch.zeros((1, 1, model.config.get_text_config().hidden_size)))
    finally:
        for h in inner:
            h.remove()

    def act_class(config: dict):
        probe = tiny_model(architecture, build_config(model_type, config))
        for local, cls in calls:
            module = getattr(getattr(probe, name), local)
            if "norm" not in cls.lower() and "Linear" not in cls and "Dropout" not in cls:
                return type(module).__name__
        return None

    own = act_class(small)
    activation_field = None
    resolved = build_config(model_type, small).to_dict()
    for field, value in sorted(resolved.items()):
        if not isinstance(value, str) or value == "relu" or field in small:
            continue
        try:
            changed = act_class({**small, field: "relu"})
        except Exception:
            continue
        if changed != own:
            activation_field = field
            break
    return {"name": name, "calls": calls, "activation_field": activation_field}


def saved_names(model) -> dict:
    """The names save_pretrained writes where they differ from the model's own:
    {written: loaded}. Transformers 5 writes some checkpoints in their original layout
    (GPT-NeoX's `lm_head` as `embed_out`); a port must read those names. Matched by
    value: each written tensor is the parameter it equals."""
    import tempfile

    import torch
    from safetensors.torch import load_file

    state = model.state_dict()
    renamed = {}
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory, safe_serialization=True)
        written = {}
        for path in sorted(Path(directory).glob("*.safetensors")):
            written.update(load_file(path))
    for name, tensor in sorted(written.items()):
        if name in state and torch.equal(state[name], tensor):
            continue
        match = next(
            (own for own, value in state.items() if value.shape == tensor.shape and torch.equal(value, tensor)),
            None,
        )
        if match is not None and match != name:
            renamed[name] = match
    return renamed


def optional_blocks_on(architecture: str, model_type: str, small: dict, fields: dict) -> dict:
    """`small` with each integer field whose default 0 leaves a block out set to
    OPTIONAL_WIDTH, where that value adds parameters of that width under new names
    (Granite-MoE-Shared's `shared_intermediate_size` adds a shared MLP beside the experts;
    a count, whose blocks are not that wide, stays 0): the tiny model then holds the block,
    so the port reads its structure and the fixtures check it."""
    base_config = build_config(model_type, small)
    resolved = base_config.to_dict()
    base = set(tiny_model(architecture, base_config).state_dict())
    for name, field in sorted(fields.items()):
        default = field.get("default")
        if (
            field.get("kind") != "int"
            or type(default) is not int
            or default != 0
            or resolved.get(name) != 0
            or name in small
            or name.endswith("token_id")
            or name in probes.COMMON_SIZES
        ):
            continue
        try:
            state = tiny_model(architecture, build_config(model_type, {**small, name: OPTIONAL_WIDTH})).state_dict()
        except Exception:  # the class or the model refuses the value
            continue
        added = [k for k, v in state.items() if k not in base and OPTIONAL_WIDTH in tuple(v.shape)]
        if added:
            small = {**small, name: OPTIONAL_WIDTH}
    return small


def size_widths(architecture: str, model_type: str, small: dict, fields: dict, attribute_map: dict) -> dict:
    """The tiny config with the family's own width fields sized too: an int field left at a
    full-size default (OPT's `ffn_dim` 3072, `word_embed_proj_dim` 768) that sets a
    parameter's width (probed: WIDTH_PROBE there widens one) gets the tiny hidden size where
    its default is the class's default hidden size, else the tiny MLP width."""
    hidden_field = attribute_map.get("hidden_size", "hidden_size")
    hidden_default = fields.get(hidden_field, {}).get("default")
    if hidden_field not in small:
        return small
    sized = dict(small)
    base = None
    for name, field in sorted(fields.items()):
        default = field.get("default")
        if name in small or field.get("kind") != "int" or isinstance(default, bool):
            continue
        if not isinstance(default, int) or default <= 256:
            continue
        if base is None:
            base = {k: tuple(v.shape) for k, v in tiny_model(architecture, build_config(model_type, small)).state_dict().items()}
        try:
            probe = tiny_model(architecture, build_config(model_type, {**small, name: probes.WIDTH_PROBE})).state_dict()
        except Exception:
            continue
        if not any(probes.WIDTH_PROBE in tuple(v.shape) and probes.WIDTH_PROBE not in base.get(k, ()) for k, v in probe.items()):
            continue
        sized[name] = small[hidden_field] if default == hidden_default else SMALL_SIZES["intermediate_size"]
    return sized


def learned_positions_size(architecture: str, model_type: str, small: dict, attribute_map: dict) -> dict:
    """The tiny config with LEARNED_POSITIONS positions when the model learns a row per
    position (GPT-2's wpe: 131072 rows would not fit a fixture, and GPT-BigCode keeps a
    positions x positions mask); RoPE families keep theirs. Decided on a model built with
    LEARNED_POSITIONS positions, which is small whatever the family."""
    field = attribute_map.get("max_position_embeddings", "max_position_embeddings")
    if field not in small:
        return small
    probe = {**small, field: LEARNED_POSITIONS}
    if structure(tiny_model(architecture, build_config(model_type, probe)))["positions"] is None:
        return small
    return probe


def rotary_facts(model, model_type: str, config: dict) -> dict:
    """The rotary module's class and RoPE types; all empty for a model without RoPE (GPT-2)."""
    rotary = decoder_stack(model)["rotary"]
    if rotary is None:
        return {"class": None, "per_layer_type": False, "rope_types": {}, "supported_rope_types": []}
    rope_type = getattr(rotary, "rope_type", None)
    per_layer_type = isinstance(rope_type, dict)
    return {
        "class": type(rotary).__name__,
        "per_layer_type": per_layer_type,
        "rope_types": dict(rope_type) if per_layer_type else {"all": rope_type},
        "supported_rope_types": supported_rope_types(model_type, config),
    }


# --------------------------------------------------------------------------- variants


def text(value) -> str:
    """A value as JSON text, for descriptions."""
    return json.dumps(value)


def describe_rope(rope: dict | None) -> str:
    if not isinstance(rope, dict):
        # A layer type without RoPE (BEAM's null entry).
        return "no RoPE"
    if "rope_type" not in rope:
        return "; ".join(f"{layer_type}: {describe_rope(value)}" for layer_type, value in rope.items())
    described = f"{rope['rope_type']} RoPE, theta {rope.get('rope_theta')}"
    extra = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta") and not isinstance(v, list)}
    if extra:
        described += " (" + ", ".join(f"{key} {value}" for key, value in sorted(extra.items())) + ")"
    return described


def mixed_layer_overrides(fields: dict, layer_types: list, small: dict | None = None) -> dict:
    overrides = {"num_hidden_layers": len(layer_types), "layer_types": layer_types}
    if "intermediate_size" in fields:
        # Never wider than the tiny config's (a mixture of experts' is narrower already).
        overrides["intermediate_size"] = min(MIXED_INTERMEDIATE_SIZE, (small or {}).get("intermediate_size") or MIXED_INTERMEDIATE_SIZE)
    return overrides


def rotary_share_style(model_type: str, small: dict, params: dict) -> str | None:
    """The config style in which a config sets the rotated share of the head: "hub" where
    the top-level `partial_rotary_factor` the Hub's configs carry is read, "transformers5"
    where only the nested `rope_parameters` one is (Bamba's class pins the top-level one to
    0.5), None where neither is."""

    def share_of(config: dict):
        try:
            resolved = build_config(model_type, {**small, **config})
        except Exception:
            return None
        rope = getattr(resolved, "rope_parameters", None) or {}
        return rope.get("partial_rotary_factor", getattr(resolved, "partial_rotary_factor", None))

    want = params["partial_rotary_factor"]
    legacy = {"partial_rotary_factor": want, "rope_theta": params["rope_theta"]}
    if share_of(legacy) == want:
        return "hub"
    if share_of({"rope_parameters": params}) == want:
        return "transformers5"
    return None


def propose_variants(
    model_type: str, fields: dict, small: dict, resolved, rotary: dict, behaviour: dict | None = None
) -> list:
    """The fixture variants, from which config fields exist (seeds assigned later);
    `behaviour` holds the probes that call for options of their own (`null_norm_probes`,
    `shared_expert_probes`, `layer_rope_probes`)."""
    behaviour = behaviour or {}
    variants = []
    tied_default = bool(small.get("tie_word_embeddings", False))
    rope = getattr(resolved, "rope_parameters", None) or {}
    per_layer_type = rotary["per_layer_type"]

    def add(name, description, overrides, style="transformers5"):
        variants.append(
            {"name": name, "description": description, "config_style": style, "config_overrides": overrides}
        )

    heads = getattr(resolved, "num_attention_heads", None)
    kv_heads = getattr(resolved, "num_key_value_heads", None) or heads
    # A recurrent-only family (Mamba) has no attention heads to describe.
    attention = (
        f"{heads} query heads, {kv_heads} kv head{'s' if kv_heads != 1 else ''}, " if heads else ""
    )
    base = (
        f"{resolved.num_hidden_layers} layers, {attention}"
        f"lm_head {'tied' if tied_default else 'untied'}"
    )
    if getattr(resolved, "layer_types", None) is not None:
        base += f", layer_types {text(resolved.layer_types)}"
    if rope:
        base += f", {describe_rope(rope)}"
    add("default", f"The family's defaults at tiny size: {base}.", {})

    if "tie_word_embeddings" in fields:
        if tied_default:
            add("untied", "As default, with an lm_head of its own (tie_word_embeddings false).",
                {"tie_word_embeddings": False})
        else:
            add("tied", "As default, with the lm_head tied to the embeddings (tie_word_embeddings true).",
                {"tie_word_embeddings": True})

    bias_fields = [
        name for name, field in fields.items()
        if (name.endswith("_bias") or name in ("use_bias", "bias")) and field["kind"] == "bool"
    ]
    if bias_fields:
        if all(fields[name]["default"] is True for name in bias_fields):
            add("no-bias", f"As default, without biases ({', '.join(bias_fields)} false).",
                {name: False for name in bias_fields})
        else:
            add("bias", f"As default, with random biases ({', '.join(bias_fields)} true).",
                {name: True for name in bias_fields})

    if "q_lora_rank" in fields and fields["q_lora_rank"].get("nullable") and small.get("q_lora_rank") is not None:
        overrides, summary = {"q_lora_rank": None}, "q_lora_rank null, DeepSeek-V2-Lite style"
        if fields.get("v_head_dim", {}).get("default", 0) is None:
            # The class derives a null v_head_dim (MiniCPM3: hidden_size // num_attention_heads).
            overrides["v_head_dim"] = None
            summary += "; v_head_dim null, derived by the config class"
        add("no-q-lora", f"As default, with a plain q_proj ({summary}).", overrides)

    if "sliding_window" in fields:
        overrides = {"sliding_window": SLIDING_WINDOW}
        if "use_sliding_window" in fields:
            overrides["use_sliding_window"] = True
        summary = f"Sliding-window attention with a window of {SLIDING_WINDOW} tokens (the prompt has 16)"
        if "layer_types" in fields:
            layer_types = ["sliding_attention", "full_attention", "sliding_attention"][:MIXED_LAYERS]
            overrides.update(mixed_layer_overrides(fields, layer_types, small))
            summary += f", layer_types {text(layer_types)} (intermediate_size {overrides.get('intermediate_size')} to stay small)"
            kinds = rotating_layer_kind(behaviour.get("layer_rope_probes"), layer_types)
            if kinds is not None:
                overrides.update(kinds)
                (field, values), = kinds.items()
                summary += f", {field} {text(values)} (the full-attention layer of the kind RoPE reaches too)"
                # The fields that set only those layers' widths, at a width of their own.
                widths = [p["field"] for p in (behaviour.get("kind_width_probes") or {}).get("fields", [])]
                for width in widths:
                    overrides[width] = OPTIONAL_WIDTH
                if widths:
                    summary += f", {', '.join(widths)} {OPTIONAL_WIDTH}"
        else:
            summary += ", in every layer"
        add("sliding", summary + ".", overrides)
        if "max_window_layers" in fields and "use_sliding_window" in fields:
            derived = ["full_attention"] + ["sliding_attention"] * (MIXED_LAYERS - 1)
            overrides = {
                "use_sliding_window": True,
                "sliding_window": SLIDING_WINDOW,
                "max_window_layers": 1,
                "num_hidden_layers": MIXED_LAYERS,
            }
            if "intermediate_size" in fields:
                overrides["intermediate_size"] = MIXED_INTERMEDIATE_SIZE
            add(
                "sliding-hub",
                f"Sliding window {SLIDING_WINDOW} from layer max_window_layers = 1 on ({MIXED_LAYERS} layers: "
                f"{text(derived)}); Hub-style config without layer_types, so a port must derive them from "
                "use_sliding_window and max_window_layers.",
                overrides,
                "hub",
            )

    if "rope_parameters" in fields and rope:
        supported = rotary["supported_rope_types"]
        # Keys of the family's own in its rope_parameters, which its code reads whatever the
        # RoPE type (Ministral 3's llama_4_scaling_beta): each scaled variant keeps them.
        own_keys = {
            key: rope[key]
            for key in sorted(getattr(type(resolved), "ignore_keys_at_rope_validation", ()) or ())
            if key in rope and key != "max_position_embeddings" and not per_layer_type
        }
        if per_layer_type:
            scaled = {}
            for layer_type, params in rope.items():
                if params is None:
                    continue
                keep = {"rope_type": "default", "rope_theta": params["rope_theta"]}
                scaled[layer_type] = keep
            target = "full_attention" if "full_attention" in scaled else sorted(scaled)[0]
            scaled[target] = {**LINEAR, "rope_theta": scaled[target]["rope_theta"]}
            add(
                "linear",
                f"Linear RoPE scaling (factor {LINEAR['factor']}) for the {target} layers only, as Gemma 3 4B and "
                f"larger ship; the other layer types keep unscaled RoPE. Hub-style config.",
                {"rope_parameters": scaled},
                "hub",
            )
        elif "original_max_position_embeddings" in fields or ("yarn" not in supported and "longrope" in supported):
            rotary_dim = int(HEAD_DIM * rope.get("partial_rotary_factor", 1.0))
            count = rotary_dim // 2
            overrides = {
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": rope.get("rope_theta", 10000.0),
                    "short_factor": LONGROPE_SHORT_FACTOR[:count],
                    "long_factor": LONGROPE_LONG_FACTOR[:count],
                }
            }
            overrides["rope_parameters"].update(own_keys)
            if "original_max_position_embeddings" in fields:
                overrides["original_max_position_embeddings"] = LONGROPE_ORIGINAL_MAX_POSITION_EMBEDDINGS
            else:
                overrides["rope_parameters"]["original_max_position_embeddings"] = (
                    LONGROPE_ORIGINAL_MAX_POSITION_EMBEDDINGS
                )
            add(
                "longrope",
                f"LongRoPE as Phi-3 128k ships it: original_max_position_embeddings "
                f"{LONGROPE_ORIGINAL_MAX_POSITION_EMBEDDINGS}, "
                f"max_position_embeddings {small['max_position_embeddings']}: "
                "the prompt and greedy run use short_factor, the recorded rope positions long_factor (see "
                "rope_note). Hub-style config.",
                overrides,
                "hub",
            )
        elif "yarn" in supported or "linear" in supported:
            if "yarn" in supported:
                overrides = {"max_position_embeddings": YARN_MAX_POSITION_EMBEDDINGS, "rope_parameters": dict(YARN)}
                summary = (
                    f"YaRN RoPE, factor {YARN['factor']}, original_max_position_embeddings "
                    f"{YARN['original_max_position_embeddings']} "
                    f"(max_position_embeddings {YARN_MAX_POSITION_EMBEDDINGS}), "
                    f"theta {YARN['rope_theta']}. Hub-style config."
                )
                name = "yarn"
            else:
                overrides = {"rope_parameters": {**LINEAR, "rope_theta": rope.get("rope_theta", 10000.0)}}
                summary = f"Linear RoPE scaling, factor {LINEAR['factor']}. Hub-style config."
                name = "linear"
            if "partial_rotary_factor" in rope:
                overrides["rope_parameters"]["partial_rotary_factor"] = rope["partial_rotary_factor"]
            overrides["rope_parameters"].update(own_keys)
            add(name, summary, overrides, "hub")

    hub, summary = {}, ""
    width = fields.get("intermediate_size")
    if width is not None and width["default"] is None and small.get("intermediate_size") is not None:
        # GPT-Neo's checkpoints: a null MLP width, which the model derives from hidden_size.
        hub, summary = {"intermediate_size": None}, ", intermediate_size null as the class's default"
    add("hub", "As default, with the config.json the family's checkpoints on the Hub carry (see to_hub_style in "
        f"export_fixtures.py){summary}.", hub, "hub")

    for probe in behaviour.get("null_norm_probes") or []:
        field, null = probe["field"], probe["null"]
        add("null-norm", f"As default, with {field} null ({null['kind']} norms of {null['eps_field']}, as the class "
            "builds them then).", {field: None})
    shared = behaviour.get("shared_expert_probes") or []
    default_join = next((p for p in shared if not p["config"]), None)
    for probe in shared:
        if default_join is not None and probe["config"] and (probe["routed"], probe["shared"]) != (
            default_join["routed"], default_join["shared"]
        ):
            (field, value), = probe["config"].items()
            add("shared-join", f"As default, with {field} {text(value)} (the shared expert joined as "
                f"{probe['routed']} routed + {probe['shared']} shared).", {field: value})
            break

    softcaps = [name for name in SOFTCAP_VALUES if name in fields]
    if softcaps:
        values = {name: SOFTCAP_VALUES[name] for name in softcaps}
        add("softcap", "Tanh softcapping small enough to bite: "
            + ", ".join(f"{name} {value}" for name, value in values.items()) + ".", values)

    multipliers = [name for name in fields if name.endswith("_multiplier") or name == "logits_scaling"]
    if multipliers:
        values = {name: MULTIPLIER_VALUES.get(name, 0.5) for name in multipliers}
        add("multipliers", "Non-trivial multipliers: "
            + ", ".join(f"{name} {value}" for name, value in values.items()) + ".", values)

    if "no_rope_layers" in fields:
        layers = small["num_hidden_layers"]
        no_rope = [int((i + 1) % 2 != 0) for i in range(layers)]
        add("no-rope", f"no_rope_layers {text(no_rope)}: the layers marked 0 use no RoPE (NoPE).",
            {"no_rope_layers": no_rope})

    if "layer_rope_theta" in fields:
        # A RoPE base per layer: the first layer without RoPE (0), the others at bases of their own.
        layers = small["num_hidden_layers"]
        bases = [0.0] + [50000.0 * i for i in range(1, layers)]
        add("layer-rope-bases", f"layer_rope_theta {text(bases)}: each layer's own RoPE base, 0 for none (NoPE).",
            {"layer_rope_theta": bases})

    params = {"rope_type": "default", "rope_theta": rope.get("rope_theta", 10000.0),
              "partial_rotary_factor": PARTIAL_ROTARY_FACTOR}
    share_style = rotary_share_style(model_type, small, params)
    if ("partial_rotary_factor" in fields or (not per_layer_type and "partial_rotary_factor" in rope)) and share_style:
        rotary_dim = int(HEAD_DIM * PARTIAL_ROTARY_FACTOR)
        add("partial-rotary",
            f"partial_rotary_factor {PARTIAL_ROTARY_FACTOR}: RoPE on the first {rotary_dim} of {HEAD_DIM} head "
            "dims (Phi-4-mini style). "
            + ("Hub-style config (partial_rotary_factor at the top level)." if share_style == "hub"
               else "In rope_parameters: the class pins a top-level partial_rotary_factor."),
            {"rope_parameters": params}, share_style)

    # Grouped, scaled routing (DeepSeek-V3 style): 8 experts in 4 groups, 2 eligible,
    # weights scaled and renormalized the other way than the default, the first layer dense.
    routing = {}
    for names, value in (
        (("n_routed_experts", "num_local_experts", "num_experts"), 8),
        (("n_group",), 4),
        (("topk_group",), 2),
        (("routed_scaling_factor",), 2.5),
        (("first_k_dense_replace",), 1),
    ):
        name = next((n for n in names if n in fields), None)
        if name is not None and small.get(name) != value:
            routing[name] = value
    if "norm_topk_prob" in fields:
        routing["norm_topk_prob"] = not bool(getattr(resolved, "norm_topk_prob", False))
    if "routed_scaling_factor" in routing or "n_group" in routing:
        add("routing", "Routing options together: " + ", ".join(f"{k} {text(v)}" for k, v in routing.items()) + ".",
            routing)
    return drop_subsumed_hub(combine_options(variants), scaling_reaches_every_layer_type(type(resolved)))


# Variants whose options change independent parts of the model (the output layer's tie, the
# projections' biases, scalar multipliers, softcaps): one fixture tests them together, so a
# family stays small; a wrong reading of any of them still fails it.
COMBINABLE = ("untied", "tied", "no-bias", "bias", "multipliers", "softcap", "null-norm", "shared-join")


def rotating_layer_kind(probe: dict | None, layer_types: list) -> dict | None:
    """`{list_field: kinds}` for the mixed layers `layer_types` where the layer RoPE probe
    found a kind of that list that rotates a full-attention layer (Cohere2-MoE's dense
    layers): the first full-attention layer gets it, the others the other kind."""
    if not probe:
        return None
    field = probe["list_field"]
    rotating = [k for a, k, r in zip(probe["layer_types"], probe[field], probe["rotates"]) if a == "full_attention" and r]
    others = [k for k in probe[field] if k not in rotating]
    if not rotating or not others or "full_attention" not in layer_types:
        return None
    first = layer_types.index("full_attention")
    return {field: [rotating[0] if i == first else others[0] for i in range(len(layer_types))]}


def scaling_reaches_every_layer_type(config_class) -> bool:
    """Whether the class applies a Hub config's `rope_scaling` to the RoPE of every layer
    type (the ModernBERT decoder's does; Gemma 3's scales the full-attention layers only):
    a variant that scales one layer type then has no Hub-style config."""
    try:
        nested = config_class(rope_scaling={"rope_type": "linear", "factor": 2.0}).rope_parameters
    except Exception:  # noqa: BLE001 - a class that refuses the key converts none
        return False
    if not isinstance(nested, dict) or "sliding_attention" not in nested:
        return False
    return all(isinstance(r, dict) and r.get("factor") == 2.0 for r in nested.values())


def drop_subsumed_hub(variants: list, scaling_reaches_every_layer_type: bool = False) -> list:
    """`variants` without the plain `hub` variant where another Hub-style variant of the defaults
    (scaled RoPE: `yarn`, `linear`, `longrope`) goes through the same config rewrite: not
    where the class scales every layer type from `rope_scaling`, so that a variant scaling
    one keeps `rope_parameters` and only the plain one carries the Hub's RoPE keys."""
    hub = next((v for v in variants if v["name"] == "hub"), None)
    scaled = [v for v in variants if v["name"] in ("yarn", "linear", "longrope") and v["config_style"] == "hub"]
    if hub is None or hub["config_overrides"] or not scaled or scaling_reaches_every_layer_type:
        return variants
    return [v for v in variants if v is not hub]


def combine_options(variants: list) -> list:
    """`variants` with the COMBINABLE Transformers-5-style ones merged into one `options` variant,
    where the first of them was."""
    together = [v for v in variants if v["name"] in COMBINABLE and v["config_style"] == "transformers5"]
    if len(together) < 2:
        return variants
    overrides = {}
    for variant in together:
        overrides.update(variant["config_overrides"])
    parts = [v["description"].removeprefix("As default, ").rstrip(".") for v in together]
    combined = {
        "name": "options",
        "description": "Options that change independent parts of the model, together: " + "; ".join(parts) + ".",
        "config_style": "transformers5",
        "config_overrides": overrides,
    }
    first = variants.index(together[0])
    return [combined if i == first else v for i, v in enumerate(variants) if i == first or v not in together]


def assign_seeds(spec: dict, check: bool) -> None:
    """Seeds 1, 2, 3, ...; with `check`, a seed whose greedy run has a near-tie moves on by SEED_RETRY_STEP."""
    import export_fixtures

    for index, variant in enumerate(spec["variants"]):
        seed = index + 1
        if check:
            for attempt in range(SEED_RETRIES):
                candidate = seed + SEED_RETRY_STEP * attempt
                margin = export_fixtures.greedy_margin(spec, {**variant, "seed": candidate})
                if margin >= export_fixtures.MIN_GREEDY_MARGIN:
                    seed = candidate
                    break
                print(f"{spec['model_type']}/{variant['name']}: seed {candidate} has a greedy near-tie "
                      f"({margin:.3g}), trying the next", file=sys.stderr, flush=True)
            else:
                raise SystemExit(f"{variant['name']}: no seed without a greedy near-tie")
        variant["seed"] = seed
    # Key order as in llama.json.
    spec["variants"] = [
        {key: variant[key] for key in ("name", "description", "seed", "config_style", "config_overrides")}
        for variant in spec["variants"]
    ]


# --------------------------------------------------------------------------- main


def sliding_window_under_own_name(architecture: str, model_type: str, small: dict, fields: dict):
    """The field that sets a sliding window in a family whose class has no `sliding_window`
    (GPT-Neo's `window_size`), found by what the attention computes (see
    probes.window_field), and what it is divided by (the ModernBERT decoder's
    `local_attention` is twice the window its layers see): `(field, divisor)`, or
    `(None, 1)` where there is none or the class has `sliding_window`."""
    if "sliding_window" in fields:
        return None, 1
    for divisor in (1, 2):
        field = probes.window_field(
            architecture, small, build_config, tiny_model, model_type, fields, SLIDING_WINDOW, divisor
        )
        if field is not None:
            return field, divisor
    return None, 1


def reached_layer_types(model, window):
    """The tiny model's layer types from what its attention reaches, for a family whose
    window field was found (it has no `layer_types`), else None."""
    if window is None:
        return None
    reach = probes.attention_reach(model, model.config.vocab_size)
    return probes.reach_layer_types(reach) if reach else None


def introspect(model_type: str, config_override: dict | None, replace: bool, check_seeds: bool):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise SystemExit(f"unknown model_type {model_type!r}")
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if architecture is None:
        raise SystemExit(f"{model_type!r} has no causal-LM class in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    config_class = getattr(transformers, CONFIG_MAPPING_NAMES[model_type])
    fields = config_fields(config_class)

    small = small_config(model_type, fields, dict(config_class.attribute_map))
    if config_override is not None:
        small = dict(config_override) if replace else {**small, **config_override}
    if not replace:
        small = attention_first(model_type, small)
    # Key/value heads the tiny model runs with before anything else builds it.
    small = runnable_kv_heads(architecture, model_type, small)
    if config_override is None or not replace:
        small = optional_blocks_on(architecture, model_type, small, fields)
    small = size_widths(architecture, model_type, small, fields, dict(config_class.attribute_map))
    small = learned_positions_size(architecture, model_type, small, dict(config_class.attribute_map))
    small = dict(sorted(small.items()))
    small = runnable_kv_heads(architecture, model_type, small)
    window, window_divisor = sliding_window_under_own_name(architecture, model_type, small, fields)
    if window is not None:
        small = dict(sorted({**small, window: SLIDING_WINDOW * window_divisor}.items()))
    resolved = build_config(model_type, small)
    model = tiny_model(architecture, resolved)
    rotary = rotary_facts(model, model_type, small)
    rotary_probe = probes.rotary_probe(tiny_model(architecture, resolved), resolved.vocab_size)
    probed = (architecture, small, build_config, tiny_model, model_type, fields)
    behaviour = {
        "null_norm_probes": probes.null_norm_probes(*probed),
        "shared_expert_probes": probes.shared_expert_probes(*probed),
        "layer_rope_probes": probes.layer_rope_probes(*probed),
        "kind_width_probes": probes.kind_width_probes(*probed),
    }

    spec = {
        "model_type": model_type,
        "architecture": architecture,
        "comment": (
            f"Random-weight {architecture} fixtures, proposed by introspect.py from the fields of "
            f"{config_class.__name__} (Transformers {transformers.__version__}); see llama.json for the conventions. "
            "base_config and each variant's config_overrides are merged and passed to the config class; weights "
            "are N(0, initializer_range) from the variant's seed (vectors keep their init constant plus noise); "
            "config_style 'hub' rewrites config.json to what the family's Hub checkpoints carry."
        ),
        "base_config": small,
        "variants": propose_variants(model_type, fields, small, resolved, rotary, behaviour),
    }
    if "initializer_range" not in fields:
        # OPT and XGLM name theirs init_std: the exporter's noise needs a width all the same.
        spec["initializer_range"] = SMALL_SIZES["initializer_range"]
    assign_seeds(spec, check_seeds)

    facts = {
        "model_type": model_type,
        "transformers_version": transformers.__version__,
        "config_class": config_class.__name__,
        "architecture": architecture,
        "config_fields": fields,
        "attribute_map": dict(config_class.attribute_map),
        # Checkpoint keys Transformers ignores when it loads the causal LM (Mellum's `^mtp\.`).
        "ignored_checkpoint_keys": list(getattr(type(model), "_keys_to_ignore_on_load_unexpected", None) or []),
        "small_config": small,
        "resolved_config": jsonable(resolved.to_dict()),
        "parameters": parameters(model),
        "modules": modules(model),
        "structure": structure(model),
        "saved_names": saved_names(model),
        "position_signal": position_signal(model),
        "layer_types": jsonable(getattr(resolved, "layer_types", None)) or reached_layer_types(model, window),
        "window_field": window,
        "per_layer_field": probes.per_layer_field(resolved, probes.attention_reach(model, resolved.vocab_size))
        if window is not None
        else None,
        "null_width_per_hidden": probes.null_width_per_hidden(architecture, small, build_config, tiny_model, model_type, fields),
        "rotary": rotary,
        "hybrid_layers": hybrid_layers(model_type, fields, small),
        "step_clamps": probes.step_clamps(architecture, small, build_config, tiny_model, model_type, fields),
        "layer_type_probes": probes.layer_type_probes(config_class, fields)
        or (
            probes.reached_layer_type_probes(
                architecture, small, build_config, tiny_model, model_type, window, SLIDING_WINDOW * window_divisor,
                probes.PROBE_LAYERS
            )
            if window is not None
            else []
        ),
        "legacy_fields": probes.legacy_fields(config_class, fields),
        "field_layer_probes": probes.field_layer_probes(config_class, fields),
        "default_theta": jsonable(getattr(config_class, "default_theta", None)),
        "no_rope_probes": probes.no_rope_probes(config_class, fields),
        "flag_probes": probes.flag_probes(architecture, small, build_config, tiny_model, model_type),
        "nested_probes": probes.nested_probes(architecture, small, build_config, tiny_model, model_type),
        "scalar_probes": probes.scalar_probes(architecture, small, build_config, tiny_model, model_type),
        "width_probes": probes.width_probes(architecture, small, build_config, tiny_model, model_type, fields),
        "derived_layer_lists": probes.derived_layer_lists(config_class, fields),
        "routing_probes": probes.routing_probes(architecture, small, build_config, tiny_model, model_type, fields),
        "call_trace": probes.call_trace(model, resolved.vocab_size),
        "attention_scale": probes.attention_scale(tiny_model(architecture, resolved), resolved.vocab_size),
        "rotary_probe": rotary_probe,
        "fused_qkv_layout": probes.fused_qkv_layout(architecture, small, build_config, tiny_model, model_type, fields),
        "rotary_dims_field": probes.rotary_dims_field(
            architecture, small, build_config, tiny_model, model_type, fields, rotary_probe
        ),
        "position_bias": probes.position_bias(tiny_model(architecture, resolved), resolved.vocab_size),
        "mlp_activation": probes.mlp_activation(model),
        "checkpoint_conversions": probes.checkpoint_conversions(model_type),
        "norm_plus_one": probes.norm_scales_by_one_plus_weight(model),
        "layer_presence_probes": probes.layer_presence_probes(
            architecture, small, build_config, tiny_model, model_type, structure(model)["layers"]
        ),
        "rope_legacy_names": probes.rope_legacy_names(config_class, fields),
        "layer_list_kwargs": probes.layer_list_kwargs(config_class, fields),
        "bare_biases": probes.bare_biases(tiny_model(architecture, resolved), resolved.vocab_size),
        **behaviour,
        "variants": spec["variants"],
    }
    if window_divisor != 1:
        facts["window_divisor"] = window_divisor
    legacy = probes.legacy_kwargs(config_class, fields)
    if legacy:
        # Hub configs' own keys, read as fields (defaults) with what each sets.
        facts["legacy_fields"] = {**facts["legacy_fields"], **{k: v["default"] for k, v in legacy.items()}}
        facts["legacy_effects"] = {k: v["sets"] for k, v in legacy.items()}
        # What Transformers derives for each value of a key that sets the layer types.
        layer_probes = {k: v["probes"] for k, v in legacy.items() if "probes" in v}
        if layer_probes:
            facts["legacy_layer_probes"] = layer_probes
    head = prediction_head(architecture, model_type, small, model)
    if head is not None:
        facts["prediction_head"] = head
    return facts, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", required=True, help="Transformers model_type, e.g. qwen2")
    parser.add_argument("--config", type=Path, help="JSON object merged over the derived tiny config")
    parser.add_argument("--replace-config", action="store_true", help="use --config as the tiny config as it is")
    parser.add_argument("--out", type=Path, required=True, help="facts JSON to write")
    parser.add_argument("--spec-out", type=Path, help="also write the variants spec (export_fixtures.py --spec)")
    parser.add_argument("--no-seed-check", action="store_true",
                        help="assign seeds 1, 2, 3, ... without checking the greedy margin")
    args = parser.parse_args()
    if args.replace_config and args.config is None:
        parser.error("--replace-config needs --config")

    configure_determinism()
    override = json.loads(args.config.read_text(encoding="utf-8")) if args.config else None
    facts, spec = introspect(args.model_type, override, args.replace_config, not args.no_seed_check)
    write_json(args.out, facts)
    if args.spec_out is not None:
        write_json(args.spec_out, spec)


if __name__ == "__main__":
    sys.exit(main())
