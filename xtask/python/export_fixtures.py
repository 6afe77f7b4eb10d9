#!/usr/bin/env python3
"""Exports layer-by-layer reference fixtures from Hugging Face Transformers.

For each variant of a variants spec (xtask/fixtures/<model_type>.json) this

1. builds a small random-weight model with a fixed seed and saves it with
   `save_pretrained` (float32 safetensors; for `"config_style": "hub"` variants
   config.json is then rewritten the way the family's configs on the Hub look,
   see `to_hub_style`, and Transformers must load it back to the very same model);
2. reloads it from disk and records, with forward hooks, what Transformers
   computes for a fixed 16-token prompt: the input of decoder layer 0, the
   output of every decoder layer, the final norm and the logits; the 32 greedy
   tokens; and cos/sin of the model's own rotary module at a few positions
   (`rope.*`; models with one RoPE per attention layer type, like Gemma 3, also
   get `rope_local.*` for the sliding-window layers, see `ROPE_RECORD_PREFIXES`);
3. reloads the same weights in bfloat16 and records only the dtype of each
   activation, to document Transformers' bf16 conventions;
4. writes `config.json`, `model.safetensors` (and `generation_config.json`),
   `expected.safetensors` and the manifest `fixture.json` into
   `<out>/<model_type>/<variant>/`.

Beyond the greedy near-tie check, a variant is refused when what it is meant
to test does not reach the numbers: scaled RoPE must move cos/sin, a sliding
window shorter than the prompt and tanh softcapping must move the logits (the
manifest's `checks` record by how much), and a hub-style config.json must load
with every field of the Transformers-5 one (what it leaves out, such as
`layer_types`, Transformers must derive the same). A variant may list further
`effect_checks`: twins with other config values or zeroed weights whose logits
must differ (`logits_vs_<name>_max_abs`).

Mixture-of-experts models (a router module in `_can_record_outputs`) run the
eager per-expert loop (`experts_implementation`); expected.safetensors also gets
each MoE layer's routing (`router.L.logits`, `router.L.top_k_index`,
`router.L.top_k_weights`), and a variant is refused unless every MoE layer picks
at least two different expert sets over the prompt. model.safetensors is what
`save_pretrained` writes: the family's Hub checkpoint layout (per-expert tensors
for most families), or Transformers 5's fused layout for `"weights_layout":
"transformers5"`; either way Transformers must load it back to the very same
parameters. The manifest records `weights_layout` and a `routing` summary.

Recurrent (hybrid) families, whose DynamicCache holds conv and recurrent states for some
layers (Mamba, Mamba2, FalconMamba, Jamba, Falcon-H1, Granite-4.0-H, Nemotron-H, LFM2,
Qwen3-Next, Qwen3.5, RecurrentGemma), are run through Transformers' torch reference paths.
Their manifest gets a `recurrent` section (which layers are recurrent, each mixer's conv and
state sizes, and how the reference prefill scans the prompt: the chunk size it used and
whether the 16-token prompt spans several chunks), their checks a cache continuation
measurement (a multi-token forward from a cached state) and the logits of the prompt
prefilled in other chunks, and expected.safetensors the states cached after the prompt
(`state.L.conv`, `state.L.recurrent`); see STATE_RECORD_PREFIX and recurrent_checks. A spec may
set `parameter_base_values` (vectors' values before the noise) and `initializer_range` (for
config classes without one).

Run it twice and the files are byte-for-byte identical. The Rust tests read the
committed files and never need Python; `cargo xtask fixtures export` runs this
script in the pinned virtual environment.

Usage:
    python export_fixtures.py --spec xtask/fixtures/llama.json --out tests/fixtures [--variant NAME]...
"""

import argparse
import copy
import json
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fixture_common import check_fixture_size, configure_determinism, decoder_stack, versions, write_json
import probes

# Bumped whenever the layout of a fixture directory or manifest changes.
FORMAT_VERSION = 1

PROMPT_LENGTH = 16
GREEDY_NEW_TOKENS = 32
# Positions at which the rotary module's cos/sin are recorded: the first ones,
# a small one, and positions up to 128k where every scaling scheme differs.
ROPE_POSITIONS = [0, 1, 17, 4095, 32767, 131071]
# How closely the Rust port must match the float32 expectations.
TOLERANCES = {"max_abs": 1e-4, "rope_max_abs": 1e-4, "min_cosine": 0.99999}
# The reference runs the plain matmul-softmax-matmul attention.
ATTN_IMPLEMENTATION = "eager"
# Prefill lengths of the KV-cache consistency check (then one token at a time).
CACHE_PREFILL_SIZES = (1, 8, 15)
# The prompt comes from its own generator, seeded with the variant's seed plus this.
PROMPT_SEED_OFFSET = 1000
CONFIG_STYLES = ("transformers5", "hub")
# A scaled RoPE must move cos/sin by at least this much (at the recorded positions)
# compared with unscaled RoPE of the same theta, or the variant tests nothing.
MIN_ROPE_SCALING_EFFECT = 100 * TOLERANCES["rope_max_abs"]
# The greedy tokens are only a fair test if no step is a near-tie in float32.
MIN_GREEDY_MARGIN = 10 * TOLERANCES["max_abs"]
# A sliding window shorter than the prompt must move the logits by at least this
# much compared with full attention, or the variant does not test the window.
MIN_SLIDING_WINDOW_EFFECT = 100 * TOLERANCES["max_abs"]
# Tanh softcapping (Gemma 2/3) must move the logits by at least this much, likewise.
MIN_SOFTCAP_EFFECT = 100 * TOLERANCES["max_abs"]
SOFTCAP_FIELDS = ("attn_logit_softcapping", "final_logit_softcapping")
# For rotary modules with one RoPE per attention layer type (Gemma 3): the prefix of
# each layer type's records in expected.safetensors. `rope.*` stays the global
# (full-attention) RoPE, as for every other family; other layer types would get
# `rope_<layer type>.*`. The manifest's `rope_layer_types` maps prefix -> layer type.
ROPE_RECORD_PREFIXES = {"full_attention": "rope", "sliding_attention": "rope_local"}
# Hub-style configs of these families spell the RoPE type `type`, not `rope_type`
# (Phi-3: `"rope_scaling": {"type": "longrope", ...}`).
HUB_ROPE_TYPE_KEY = {
    "phi3": "type",
    "phimoe": "type",
    "hunyuan_v1_moe": "type",
    "deepseek_v2": "type",
    "deepseek_v3": "type",
}
# Hub-style configs of these families list `layer_types` even where Transformers
# could derive it; for all others a derivable `layer_types` is dropped.
HUB_KEEPS_LAYER_TYPES = {"smollm3", "gpt_oss"}
# Hub-style configs of these families carry a sliding window even where
# `use_sliding_window` is false (Qwen2.5: `"sliding_window": 32768`), which
# Transformers then ignores; a null window (0 for Qwen2-MoE, whose config turns an
# unused window into 0) is written as max_position_embeddings.
HUB_IGNORED_SLIDING_WINDOW = {"qwen2", "qwen2_moe"}
# Values the family's Hub configs spell the legacy way, which Transformers maps back:
# (field, value Transformers writes, value on the Hub). Gemma's `"hidden_act": "gelu"`
# means the tanh approximation (Transformers turns it into gelu_pytorch_tanh).
HUB_LEGACY_VALUES = {"gemma": [("hidden_act", "gelu_pytorch_tanh", "gelu")]}
# Gemma 3 on the Hub: `sliding_window_pattern` instead of `layer_types`; the
# pattern Transformers assumes when it is missing.
GEMMA3_DEFAULT_SLIDING_WINDOW_PATTERN = 6
# Hub-style configs of these families keep `original_max_position_embeddings` inside
# `rope_scaling` as well as at the top level (Phi-3.5-MoE).
HUB_ROPE_KEEPS_ORIGINAL_MAX = {"phimoe"}
# Hub-style configs of these families give the rotated width of a head as
# `rotary_dim` instead of `partial_rotary_factor` (MiniMax-M2: `"rotary_dim": 64`
# with `"head_dim": 128`); Transformers turns it back into the factor.
HUB_ROTARY_DIM = {"minimax_m2"}
# Fields that the family's Hub configs leave out when they have this value, which
# is then what Transformers assumes (Qwen1.5-MoE and Qwen2-57B-A14B predate `qkv_bias`;
# gpt-oss has no `swiglu_alpha`, its 1.702 is built in).
HUB_OMITTED_VALUES = {
    "qwen2_moe": [("qkv_bias", True)],
    "gpt_oss": [("swiglu_alpha", 1.702)],
    # DeepSeek-V2 predates `mlp_bias`.
    "deepseek_v2": [("mlp_bias", False)],
    # DeepSeek-V3 / Kimi-K2 and GLM-4.7-Flash predate `rope_interleave`: their RoPE is interleaved.
    "deepseek_v3": [("rope_interleave", True), ("pretraining_tp", 1)],
    "glm4_moe_lite": [("rope_interleave", True), ("pretraining_tp", 1)],
}
# Fields that Transformers' config class derives from others and writes into config.json,
# which the family's Hub configs leave out (DeepSeek: head_dim = qk_rope_head_dim and
# qk_head_dim = qk_nope_head_dim + qk_rope_head_dim; GLM-4.7-Flash: mlp_layer_types, dense
# first then sparse). Left out only where Transformers derives the very same value without them.
HUB_DERIVED_FIELDS = {
    # ModernBERT decoder (Ettin): the window is half of `local_attention`, which the Hub's give.
    "modernbert-decoder": ["sliding_window"],
    "deepseek_v2": ["head_dim", "qk_head_dim"],
    "deepseek_v3": ["head_dim", "qk_head_dim"],
    "glm4_moe_lite": ["qk_head_dim", "mlp_layer_types"],
}
# Fields that Transformers writes under another name than the family's Hub configs
# (through the config's attribute_map): (name written, name on the Hub).
HUB_RENAMED_FIELDS = {
    "qwen3_moe": [("num_local_experts", "num_experts")],
    # Pythia and GPT-NeoX-20B: the RoPE base and the rotated share of each head by their old names.
    "gpt_neox": [("rope_theta", "rotary_emb_base"), ("partial_rotary_factor", "rotary_pct")],
    "gpt_neox_japanese": [("rope_theta", "rotary_emb_base"), ("partial_rotary_factor", "rotary_pct")],
}
# Constant fields that the family's Hub configs carry and Transformers does not read:
# the variant Transformers implements (MiniMax-M2: per-layer q/k norm over all heads,
# sigmoid router with a routing bias; Hunyuan-A13B: q/k norm, shared MLP next to the experts).
HUB_EXTRA_FIELDS = {
    "minimax_m2": {"use_qk_norm": True, "qk_norm_type": "per_layer", "scoring_func": "sigmoid", "use_routing_bias": True},
    "hunyuan_v1_moe": {"use_qk_norm": True, "use_mixed_mlp_moe": True},
    # recurrentgemma-2b: the embedding scaling Transformers always applies.
    "recurrent_gemma": {"embeddings_scale_by_sqrt_dim": True},
    # DeepSeek-V3 / Kimi-K2: the router Transformers implements (sigmoid scores, routing bias,
    # group-limited top-k), every layer from first_k_dense_replace on MoE.
    "deepseek_v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1},
    # DeepSeek-V2(-Lite, .5): softmax router (topk_method is a field Transformers reads).
    "deepseek_v2": {"scoring_func": "softmax", "moe_layer_freq": 1},
    # GLM-4.7-Flash: layer 0 dense (Transformers reads mlp_layer_types, which it derives the same),
    # DeepSeek-V3's router, one MTP layer, no RoPE scaling.
    "glm4_moe_lite": {
        "first_k_dense_replace": 1,
        "topk_method": "noaux_tc",
        "num_nextn_predict_layers": 1,
        "partial_rotary_factor": 1.0,
        "rope_scaling": None,
    },
}

# Multi-head latent attention families whose attention rotates interleaved feature pairs
# (2i, 2i + 1) although their rotary module returns cos/sin in the halves layout
# (cat(freqs, freqs)): Transformers' apply_rotary_pos_emb_interleave reads the first half of
# cos/sin, one value per pair. The value names the config flag that switches it on (true by
# default; false rotates halves), or None where it is always on. Their rope.cos/rope.sin are
# recorded one per frequency and the manifest says `"rope_layout": "pairs"`, as for Llama 4.
INTERLEAVED_ROPE_FLAG = {"deepseek_v3": "rope_interleave", "glm4_moe_lite": "rope_interleave", "longcat_flash": None}

# Mixture-of-experts families (a model whose `_can_record_outputs` names a router
# module) are run with the plain per-expert loop of Transformers' experts modules,
# as attention runs eager; the manifest records how far the default (grouped_mm)
# implementation is from it.
EXPERTS_IMPLEMENTATION = "eager"
# Where MoE fixtures record the routing of each MoE layer L in expected.safetensors:
# `router.L.logits` [tokens, experts] (what the router module returns as logits),
# `router.L.top_k_index` [tokens, k] (ascending per token) and `router.L.top_k_weights`
# [tokens, k] (the weight each chosen expert's output is multiplied by, same order).
ROUTER_RECORD_PREFIX = "router"
# A MoE variant only tests routing if the prompt's tokens pick different experts: every
# MoE layer (the first one included) must choose at least this many distinct expert sets.
MIN_DISTINCT_EXPERT_SETS = 2
# The experts a router chooses must not be a near-tie: over the prompt, the k-th chosen
# expert's selection score must beat the best unchosen one by this much (in the units
# of the score the router ranks by: logits, or sigmoid + routing bias), and so must the
# chosen groups of group-limited routing and PhiMoE's sparsemixer thresholds, or a port
# within the tolerances could pick other experts.
MIN_ROUTER_MARGIN = 10 * TOLERANCES["max_abs"]
# Routers whose routing bias is added to softmax scores rather than sigmoid scores
# (LongCat-Flash: softmax over the routed and the zero-computation experts).
SOFTMAX_BIAS_ROUTERS = {"LongcatFlashTopkRouter", "Ernie4_5_MoeTopKRouter"}
# An option a variant exercises (spec `effect_checks`) must move the logits by this much.
MIN_OPTION_EFFECT = 100 * TOLERANCES["max_abs"]
# Persistent buffers of MoE models that are weights of the checkpoint (the routing bias
# of GLM-4.5 and MiniMax-M2): seeded noise like vectors, from their own generator.
BUFFER_SEED_OFFSET = 2000
# How model.safetensors is written: "hub" is save_pretrained's default, which turns
# Transformers' fused experts back into the layout of the family's checkpoints on the
# Hub (per-expert tensors for most families); "transformers5" keeps the fused in-memory
# layout (save_original_format=False).
WEIGHTS_LAYOUTS = ("hub", "transformers5", "bitnet-packed")

# The final norm of the decoder stack, by its attribute name on the base model: `norm` for
# most families, `norm_f` (Mamba, Mamba2, FalconMamba, Nemotron-H), `embedding_norm` (LFM2,
# applied after the last layer despite its name), `final_layernorm` (Jamba, Falcon-H1),
# `final_norm` (RecurrentGemma).

# Recurrent (hybrid) families: a model whose DynamicCache, built from its config, holds a
# LinearAttentionLayer (conv and recurrent states instead of keys and values) for some layer.
# The manifest's `recurrent` section describes those layers (the mixer, its conv kernel and
# state sizes, how the reference prefill scans the prompt) and expected.safetensors gets the
# states Transformers caches for each of them after a cached forward over the whole prompt:
# `state.L.conv` (the conv cache, [batch, conv channels, kept inputs], oldest first) and
# `state.L.recurrent` (the SSM / delta-rule / RG-LRU state; none for LFM2's short conv).
STATE_RECORD_PREFIX = "state"
# The cache continuation check: prefill this many prompt tokens, then the rest in ONE
# forward (a multi-token step that starts from a cached state, as a chunked prefill does).
CONTINUATION_PREFILL = 5
# For the prefill-chunking check of gated-DeltaNet families, whose chunk size is the
# default argument of Transformers' torch_chunk_gated_delta_rule (64, longer than the
# prompt): the logits with this chunk size instead.
DELTA_RULE_CHECK_CHUNK = 4
# Mixers whose multi-token forward ignores a cached state, so the continuation check is
# expected to differ (a property of Transformers 5.23's reference paths, not of the model).
CONTINUATION_IGNORES_STATE = {
    "MambaMixer": "mamba_selective_scan (the multi-token path) starts from a zero SSM state and never reads the "
    "cached one; only the conv state is continued",
    "FalconMambaMixer": "mamba_selective_scan (the multi-token path) starts from a zero SSM state and never reads the "
    "cached one; only the conv state is continued",
    "JambaMambaMixer": "mamba_selective_scan (the multi-token path) starts from a zero SSM state and never reads the "
    "cached one; only the conv state is continued",
    "RecurrentGemmaRecurrentBlock": "a multi-token forward runs the temporal conv zero-padded (the cached conv1d_state "
    "is overwritten, not read); the RG-LRU does continue from its cached state",
}


def load_spec(path: Path) -> dict:
    """Reads a variants spec and checks the fields this exporter relies on."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    for key in ("model_type", "architecture", "base_config", "variants"):
        if key not in spec:
            raise SystemExit(f"{path}: missing {key!r}")
    names = set()
    for variant in spec["variants"]:
        for key in ("name", "description", "seed", "config_overrides"):
            if key not in variant:
                raise SystemExit(f"{path}: variant {variant.get('name')!r} lacks {key!r}")
        if variant.get("config_style", "transformers5") not in CONFIG_STYLES:
            raise SystemExit(f"{path}: variant {variant['name']!r}: config_style must be one of {CONFIG_STYLES}")
        if variant.get("weights_layout", "hub") not in WEIGHTS_LAYOUTS:
            raise SystemExit(f"{path}: variant {variant['name']!r}: weights_layout must be one of {WEIGHTS_LAYOUTS}")
        for effect in variant.get("effect_checks", []):
            if "name" not in effect or not (set(effect) - {"name"}) <= {"config_overrides", "zero_weights"}:
                raise SystemExit(
                    f"{path}: variant {variant['name']!r}: an effect check has a name and "
                    "config_overrides and/or zero_weights"
                )
        if variant["name"] in names:
            raise SystemExit(f"{path}: variant {variant['name']!r} is listed twice")
        names.add(variant["name"])
    return spec


def build_model(spec: dict, variant: dict):
    """The variant's model with random weights, from its seed alone."""
    import torch
    import transformers

    # The config may edit nested dicts (rope_parameters) in place: give it copies.
    kwargs = copy.deepcopy({**spec["base_config"], **variant["config_overrides"]})
    config = transformers.AutoConfig.for_model(spec["model_type"], **kwargs)
    # Whatever Transformers' own init draws comes from this seed ...
    torch.manual_seed(variant["seed"])
    model = getattr(transformers, spec["architecture"])(config).eval()
    set_base_values(model, {**spec.get("parameter_base_values", {}), **variant.get("parameter_base_values", {})})
    # ... and is then replaced entirely by draws that depend on nothing else. The spread is the config's
    # initializer_range, or the spec's own where the config class has none (RecurrentGemma).
    randomize_parameters(model, variant["seed"], spec.get("initializer_range") or config.initializer_range)
    if router_class(model) is not None:
        randomize_weight_buffers(
            model, variant["seed"] + BUFFER_SEED_OFFSET,
            getattr(config, "initializer_range", None) or spec.get("initializer_range"),
        )
    if variant.get("weights_layout") == "bitnet-packed":
        make_ternary(model)
    return model


def ternary_linears(model) -> dict:
    """The decoder layers' linear layers, which BitNet checkpoints ship ternary ({name: module})."""
    import torch

    layers = decoder_parts(model)[0]
    return {
        f"model.layers.{i}.{name}": module
        for i, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def make_ternary(model) -> None:
    """Gives every decoder-layer linear weight the values BitNet's offline quantization leaves:
    scale = 1 / mean|W|, W = clamp(round(W·scale), -1, 1) / scale, so that the float model computes
    exactly what the packed checkpoint (write_bitnet_packed) stores."""
    import torch

    with torch.no_grad():
        for module in ternary_linears(model).values():
            scale = 1.0 / module.weight.abs().mean().clamp(min=1e-5)
            module.weight.copy_((module.weight * scale).round().clamp(-1, 1) / scale)
            module.bitnet_weight_scale = scale


def write_bitnet_packed(directory: Path, model) -> None:
    """Rewrites model.safetensors in the layout of BitNet's Hub checkpoints (Transformers'
    integrations/bitnet.py `pack_weights`): each ternary weight [out, in] as uint8 [out / 4, in], row
    r of block i (rows i·out/4 + r) in bits 2i..2i+1 as value + 1, with its `weight_scale` [1]; and
    config.json gets the `quantization_config` those checkpoints carry. The reference keeps the float
    model (no activation quantization), as mlx-lm's BitLinear computes."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = directory / "model.safetensors"
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    for name, module in ternary_linears(model).items():
        weight = tensors.pop(f"{name}.weight")
        scale = module.bitnet_weight_scale
        ternary = (weight * scale).round().to(torch.int64)
        if not torch.equal(ternary / scale, weight) or ternary.shape[0] % 4:
            raise SystemExit(f"{name}: the weight is not ternary times a scale in 4-row blocks")
        rows = ternary.shape[0] // 4
        packed = torch.zeros((rows, ternary.shape[1]), dtype=torch.uint8)
        for i in range(4):
            packed |= (ternary[i * rows : (i + 1) * rows] + 1).to(torch.uint8) << (2 * i)
        tensors[f"{name}.weight"] = packed
        tensors[f"{name}.weight_scale"] = scale.reshape(1).to(weight.dtype)
    save_file(tensors, path, metadata=metadata)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["quantization_config"] = {
        "linear_class": "bitlinear",
        "quant_method": "bitnet",
        "quantization_mode": "offline",
    }
    write_json(config_path, config)


def set_base_values(model, base_values: dict) -> None:
    """Sets the vectors whose names end with a key of `base_values` to that constant, before the noise.

    For recurrent families whose initialisation leaves the recurrence nearly memoryless at this
    size (spec `parameter_base_values`, top level or per variant): Qwen3-Next's dt_bias starts at
    1, so with A = exp(A_log) up to 16 the gated DeltaNet decays its state by exp(-20) per token
    and the cached state would not matter; a dt_bias of -4 keeps the decays within a few units.
    """
    import torch

    with torch.no_grad():
        for suffix, value in base_values.items():
            chosen = [parameter for name, parameter in model.named_parameters() if name.endswith(suffix)]
            if not chosen or any(parameter.dim() != 1 for parameter in chosen):
                raise SystemExit(f"parameter_base_values: {suffix!r} must name vectors of the model")
            for parameter in chosen:
                parameter.fill_(value)


def randomize_parameters(model, seed: int, std: float) -> None:
    """Gives every parameter seeded random values, in name order.

    Matrices get N(0, std). Vectors (norm weights, biases) keep the constant that
    Transformers initialises them to (ones or zeros) plus N(0, std) noise: left
    constant, a port that ignored norm weights or biases would still pass.
    `named_parameters` lists a tied lm_head once, under the embedding.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * std
            if parameter.dim() >= 2:
                parameter.copy_(noise)
            else:
                parameter.add_(noise)


def randomize_weight_buffers(model, seed: int, std: float) -> None:
    """Adds seeded N(0, std) noise to the floating-point persistent buffers, in name order.

    Only for MoE models: their persistent buffers (the routing bias
    `e_score_correction_bias` of GLM-4.5 and MiniMax-M2) are checkpoint weights that
    Transformers initialises to zeros, which a port ignoring them would match.
    """
    import torch

    parameters = {name for name, _ in model.named_parameters()}
    buffers = [
        (name, tensor)
        for name, tensor in model.state_dict(keep_vars=True).items()
        if name not in parameters and tensor.is_floating_point()
    ]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, buffer in sorted(buffers, key=lambda item: item[0]):
            buffer.add_(torch.randn(buffer.shape, generator=generator, dtype=torch.float32).to(buffer.dtype) * std)


def load_model(directory: Path, dtype):
    """Loads a saved fixture model the way a user would, in `dtype`.

    MoE models whose experts module lets the implementation be chosen run the plain
    per-expert loop (EXPERTS_IMPLEMENTATION); other models load exactly as before.
    """
    import transformers

    kwargs = {}
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    architecture = getattr(transformers, (config.get("architectures") or [""])[0], None)
    if architecture is not None and architecture._can_set_experts_implementation():
        kwargs["experts_implementation"] = EXPERTS_IMPLEMENTATION
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, **kwargs
    )
    return model.eval()


def assert_same_parameters(expected, actual) -> None:
    """Fails unless two models hold bit-identical parameters."""
    import torch

    left, right = expected.state_dict(), actual.state_dict()
    if left.keys() != right.keys():
        raise SystemExit(f"reloaded model has other parameters: {sorted(left.keys() ^ right.keys())}")
    for name, tensor in left.items():
        if not torch.equal(tensor, right[name]):
            raise SystemExit(f"reloaded parameter {name} differs from the saved one")


def to_hub_style(config: dict) -> dict:
    """Rewrites a Transformers-5 config.json dict to what the family's Hub configs carry.

    Transformers 5 writes one `rope_parameters` dict holding `rope_theta`. Most
    configs on the Hub predate it: `rope_theta` at the top level and the scaling,
    if any, in `rope_scaling` (as Llama 3.1, Qwen2.5-with-YaRN or Phi-3 ship).
    Unscaled RoPE gets no `rope_scaling` key at all, as in Mistral's configs.

    Beyond RoPE, per family (the caller checks that Transformers reads the result
    back to the very same model):

    * `partial_rotary_factor` moves to the top level (Phi-4-mini), and is left out
      when it is 1.0; `original_max_position_embeddings` stays only at the top
      level when the config has it there (Phi-3);
    * RoPE per attention layer type (Gemma 3): `rope_theta` (full attention),
      `rope_local_base_freq` (sliding) and `rope_scaling` (full attention only);
    * `layer_types` is left out where Transformers derives the same list from the
      other fields (Qwen2/Qwen3 from `use_sliding_window` + `max_window_layers`,
      Gemma 2 alternating), and replaced by `sliding_window_pattern` for Gemma 3;
      families in HUB_KEEPS_LAYER_TYPES keep it;
    * family quirks: HUB_ROPE_TYPE_KEY, HUB_IGNORED_SLIDING_WINDOW, HUB_LEGACY_VALUES,
      HUB_ROPE_KEEPS_ORIGINAL_MAX, HUB_ROTARY_DIM, HUB_OMITTED_VALUES, HUB_RENAMED_FIELDS,
      HUB_DERIVED_FIELDS, HUB_EXTRA_FIELDS;
    * the hybrid (recurrent) families' own spellings (HUB_FAMILY_REWRITES): the layer
      pattern as their checkpoints give it (`full_attn_idxs`, `full_attention_interval`,
      `hybrid_override_pattern`, `mamba`/`attention` layer types, `block_types`),
      `Infinity` as a JSON number in `time_step_limit`, and renamed or extra keys.
    """
    # Private attributes Transformers serializes (Gemma 3's `_sliding_window_pattern`) are no Hub keys.
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    model_type = config.get("model_type")
    if model_type in HUB_COMPOSITE_CONFIGS:
        return HUB_COMPOSITE_CONFIGS[model_type](config)
    rope = config.pop("rope_parameters", None)
    if rope is None:
        pass  # a family without RoPE (Mamba, Jamba, Nemotron-H)
    elif any(key in ROPE_RECORD_PREFIXES for key in rope):
        config.update(nested_rope_to_hub_style(rope, model_type))
    else:
        rope = dict(rope)
        config["rope_theta"] = rope.pop("rope_theta")
        partial = rope.pop("partial_rotary_factor", None)
        if model_type in HUB_ROTARY_DIM:
            config["rotary_dim"] = int(config["head_dim"] * (1.0 if partial is None else partial))
        elif partial is not None and partial != 1.0:
            config["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" in config and model_type not in HUB_ROPE_KEEPS_ORIGINAL_MAX:
            # The top-level value wins in Transformers (Phi-3), and is where the Hub has it.
            rope.pop("original_max_position_embeddings", None)
        if rope.get("rope_type", "default") != "default":
            type_key = HUB_ROPE_TYPE_KEY.get(model_type, "rope_type")
            if type_key != "rope_type":
                rope[type_key] = rope.pop("rope_type")
            config["rope_scaling"] = rope
    if (
        config.get("layer_types") is not None
        and model_type not in HUB_KEEPS_LAYER_TYPES
        and model_type not in HUB_FAMILY_REWRITES
    ):
        layer_types = config.pop("layer_types")
        if model_type == "gemma3_text":
            pattern = gemma3_sliding_window_pattern(layer_types)
            if pattern is None:
                raise SystemExit(f"layer_types {layer_types} follow no sliding_window_pattern: no Hub-style config")
            config["sliding_window_pattern"] = pattern
        elif derived_layer_types(config) != layer_types:
            config["layer_types"] = layer_types  # not derivable: the Hub config must list it
    if model_type in HUB_IGNORED_SLIDING_WINDOW and config.get("sliding_window") in (None, 0):
        if config.get("use_sliding_window") is False:
            config["sliding_window"] = config["max_position_embeddings"]
    for field, written, on_hub in HUB_LEGACY_VALUES.get(model_type, []):
        if config.get(field) == written:
            config[field] = on_hub
    for field, value in HUB_OMITTED_VALUES.get(model_type, []):
        if field in config and config[field] == value:
            config.pop(field)
    for written, on_hub in HUB_RENAMED_FIELDS.get(model_type, []):
        if written in config:
            config[on_hub] = config.pop(written)
    for field in HUB_DERIVED_FIELDS.get(model_type, []):
        if field in config and derived_field(config, field) == config[field]:
            config.pop(field)
    config.update(HUB_EXTRA_FIELDS.get(model_type, {}))
    if model_type in HUB_FAMILY_REWRITES:
        config = HUB_FAMILY_REWRITES[model_type](config)
    return config


def hub_rope_keys(model_type: str) -> dict:
    """The Hub keys of each layer type's RoPE base: the keys the config class reads from its
    keyword arguments for them (the ModernBERT decoder's `global_rope_theta`,
    `local_rope_theta`; probes.legacy_kwargs), else Gemma 3's `rope_theta` and
    `rope_local_base_freq`."""
    import transformers

    keys = {"full_attention": "rope_theta", "sliding_attention": "rope_local_base_freq"}
    if model_type is None:
        return keys
    default = transformers.AutoConfig.for_model(model_type)
    declared = {name: {} for name in default.to_dict()}
    for name, found in probes.legacy_kwargs(type(default), declared).items():
        if found["sets"] in keys:
            keys[found["sets"]] = name
    return keys


def nested_rope_to_hub_style(rope: dict, model_type: str | None = None) -> dict:
    """The Hub keys for RoPE per layer type (Gemma 3's, or the class's own: hub_rope_keys);
    the sliding layers' RoPE cannot be scaled there."""
    unknown = sorted(set(rope) - set(ROPE_RECORD_PREFIXES))
    if unknown:
        raise SystemExit(f"no Hub-style keys for the RoPE of layer types {unknown}")
    names = hub_rope_keys(model_type)
    keys = {}
    full = dict(rope["full_attention"])
    keys[names["full_attention"]] = full.pop("rope_theta")
    if full.get("rope_type", "default") != "default":
        keys["rope_scaling"] = full
    local = dict(rope["sliding_attention"])
    keys[names["sliding_attention"]] = local.pop("rope_theta")
    if local != {"rope_type": "default"}:
        raise SystemExit(f"the Hub-style config has no place for the sliding layers' RoPE {local}")
    return keys


def hub_infinity(config: dict) -> dict:
    """Infinite floats as the Hub configs write them: the JSON number `Infinity` (`"time_step_limit":
    [0.0, Infinity]`), where Transformers 5 writes `{"__float__": "Infinity"}`; Transformers reads both."""

    def fix(value):
        if isinstance(value, dict) and set(value) == {"__float__"}:
            return float(value["__float__"])
        if isinstance(value, list):
            return [fix(item) for item in value]
        return value

    return {key: fix(value) for key, value in config.items()}


def attention_interval(layer_types: list, linear: str = "linear_attention") -> int | None:
    """The `full_attention_interval` n from which Qwen3-Next derives `layer_types` (full attention where
    (i + 1) % n == 0, else linear attention), if any."""
    for interval in range(1, len(layer_types) + 1):
        derived = [linear if (i + 1) % interval else "full_attention" for i in range(len(layer_types))]
        if derived == layer_types:
            return interval
    return None


def lfm2_hub_style(config: dict) -> dict:
    """LiquidAI/LFM2-*: the attention layers as `full_attn_idxs` (no `layer_types`), the MLP width as
    `block_ff_dim`, tying as `tie_embedding`, and the block/conv widths the checkpoints also list."""
    layer_types = config.pop("layer_types")
    config["full_attn_idxs"] = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    config["block_ff_dim"] = config.pop("intermediate_size")
    config["tie_embedding"] = config.pop("tie_word_embeddings")
    for key in ("block_dim", "conv_dim", "conv_dim_out"):
        config[key] = config["hidden_size"]
    return config


def mamba2_hub_style(config: dict) -> dict:
    """Mamba-Codestral: `time_step_limit` [0.0, Infinity], and keys Transformers does not read: the gated
    RMSNorm's settings of the original code (`rms_norm` true, `norm_before_gate` false, which is what
    MambaRMSNormGated computes) and `intermediate_size` (expand * hidden_size)."""
    config = hub_infinity(config)
    config.update(rms_norm=True, norm_before_gate=False, intermediate_size=config["expand"] * config["hidden_size"])
    return config


def qwen3_next_hub_style(config: dict) -> dict:
    """Qwen3-Next: `full_attention_interval` instead of `layer_types` (kept where no interval derives them)."""
    layer_types = config.pop("layer_types")
    interval = attention_interval(layer_types)
    if interval is None:
        config["layer_types"] = layer_types
    else:
        config["full_attention_interval"] = interval
    return config


def granitemoehybrid_hub_style(config: dict) -> dict:
    """Granite-4.0-H: `layer_types` spelled "mamba" / "attention" (Transformers maps them to linear_attention /
    full_attention), `time_step_limit` with Infinity."""
    legacy = {"linear_attention": "mamba", "full_attention": "attention"}
    config["layer_types"] = [legacy[kind] for kind in config["layer_types"]]
    return hub_infinity(config)


def nemotron_h_hub_style(config: dict) -> dict:
    """Nemotron-H: the layers as `hybrid_override_pattern` (M mamba, * attention, E MoE, - MLP) and
    `num_hidden_layers`, no `layers_block_type`; no `mtp_layers_block_type` when there is no MTP layer
    (Transformers then assumes [full_attention, moe]); `time_step_limit` with Infinity."""
    kinds = config.pop("layers_block_type")
    letters = {"linear_attention": "M", "full_attention": "*", "moe": "E", "mlp": "-"}
    config["hybrid_override_pattern"] = "".join(letters[kind] for kind in kinds)
    config["num_hidden_layers"] = len(kinds)
    if config.get("mtp_layers_block_type") == ["full_attention", "moe"] and not config.get("num_nextn_predict_layers"):
        config.pop("mtp_layers_block_type")
    return hub_infinity(config)


def falcon_h1_hub_style(config: dict) -> dict:
    """Falcon-H1: `time_step_limit` with Infinity, and keys of its checkpoints Transformers does not read."""
    config = hub_infinity(config)
    config.update(mamba_use_mlp=True, rope_traditional=False)
    return config


def mamba_hub_style(config: dict) -> dict:
    """state-spaces/mamba-*-hf, tiiuae/falcon-mamba-7b, ai21labs Jamba: no `use_mambapy` /
    `use_associative_scan` (later Transformers switches, left at their defaults)."""
    for key, default in (("use_mambapy", False), ("use_associative_scan", True)):
        if config.get(key) == default:
            config.pop(key)
    if config["model_type"] == "mamba":
        config.update(fused_add_norm=True, rms_norm=True)
    return config


def qwen3_5_hub_style(config: dict, model_type: str = "qwen3_5", architecture: str = "Qwen3_5ForConditionalGeneration") -> dict:
    """Qwen3.5 (Qwen/Qwen3.5-*): the text model is the `text_config` of a `qwen3_5` config next to a
    `vision_config`, in Transformers-5 style (rope_parameters, with mrope_section / mrope_interleaved for the
    vision positions, layer_types and full_attention_interval both listed); AutoModelForCausalLM reads it as
    Qwen3_5ForCausalLM, the weights under model.language_model.* (HUB_WEIGHT_PREFIXES). Qwen3.5-MoE the same
    with `qwen3_5_moe`."""
    import transformers

    text = {key: value for key, value in config.items() if key not in ("architectures", "transformers_version")}
    interval = attention_interval(text["layer_types"])
    if interval is not None:
        text["full_attention_interval"] = interval
    vision = transformers.AutoConfig.for_model(f"{model_type}_vision").to_diff_dict()
    vision = {key: value for key, value in vision.items() if key != "transformers_version"}
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "text_config": text,
        "tie_word_embeddings": text["tie_word_embeddings"],
        "transformers_version": config["transformers_version"],
        "vision_config": vision,
    }


def qwen3_5_moe_hub_style(config: dict) -> dict:
    return qwen3_5_hub_style(config, "qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration")


# Families whose checkpoints on the Hub nest the text model in a multimodal config (to_hub_style
# writes that config instead) and prefix its weights: model.safetensors is renamed the same way
# (name prefix written by save_pretrained -> the prefix on the Hub).
HUB_COMPOSITE_CONFIGS = {"qwen3_5_text": qwen3_5_hub_style, "qwen3_5_moe_text": qwen3_5_moe_hub_style}
HUB_WEIGHT_PREFIXES = {
    "qwen3_5_text": [("model.", "model.language_model.")],
    "qwen3_5_moe_text": [("model.", "model.language_model.")],
    # GPT-NeoX checkpoints name the output layer embed_out (Transformers 5 renames it on load).
    "gpt_neox": [("lm_head.", "embed_out.")],
    # openai-community/gpt2 and its fine-tunes are saved from the base GPT2Model: no prefix.
    "gpt2": [("transformer.", "")],
}


def rename_hub_weights(directory: Path, model_type: str) -> None:
    """Renames the tensors of model.safetensors to the family's Hub prefixes (HUB_WEIGHT_PREFIXES)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefixes = HUB_WEIGHT_PREFIXES.get(model_type)
    if not prefixes:
        return
    path = directory / "model.safetensors"
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}

    def renamed(name):
        for written, on_hub in prefixes:
            if name.startswith(written):
                return on_hub + name[len(written) :]
        return name

    save_file({renamed(name): tensor for name, tensor in tensors.items()}, path, metadata=metadata)


# Per-family rewrites of hybrid (recurrent) families, applied last by to_hub_style.
HUB_FAMILY_REWRITES = {
    "lfm2": lfm2_hub_style,
    "mamba2": mamba2_hub_style,
    "qwen3_next": qwen3_next_hub_style,
    "granitemoehybrid": granitemoehybrid_hub_style,
    "nemotron_h": nemotron_h_hub_style,
    "falcon_h1": falcon_h1_hub_style,
    "mamba": mamba_hub_style,
    "falcon_mamba": mamba_hub_style,
    "jamba": mamba_hub_style,
}


def gemma3_sliding_window_pattern(layer_types: list) -> int | None:
    """The `sliding_window_pattern` from which Gemma 3 derives `layer_types` (6 preferred), if any."""

    def derived(pattern):
        return [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(len(layer_types))
        ]

    candidates = [GEMMA3_DEFAULT_SLIDING_WINDOW_PATTERN] + list(range(1, len(layer_types) + 2))
    return next((pattern for pattern in candidates if derived(pattern) == layer_types), None)


def derived_layer_types(config: dict):
    """The `layer_types` Transformers derives for a config.json dict that lacks them."""
    import transformers

    kwargs = {key: value for key, value in config.items() if key not in ("model_type", "layer_types")}
    return transformers.AutoConfig.for_model(config["model_type"], **copy.deepcopy(kwargs)).layer_types


def derived_field(config: dict, field: str):
    """The value Transformers derives for `field` of a config.json dict that lacks it."""
    import transformers

    kwargs = {key: value for key, value in config.items() if key not in ("model_type", field)}
    return getattr(transformers.AutoConfig.for_model(config["model_type"], **copy.deepcopy(kwargs)), field, None)


def without_legacy_type(rope):
    """rope_parameters without the legacy `type` key Transformers keeps next to an equal `rope_type` (Phi-3)."""
    if not isinstance(rope, dict):
        return rope
    if "rope_type" in rope and rope.get("type", rope["rope_type"]) == rope["rope_type"]:
        return {key: value for key, value in rope.items() if key != "type"}
    return {key: without_legacy_type(value) if isinstance(value, dict) else value for key, value in rope.items()}


def assert_same_config(expected, actual, ignored=()) -> None:
    """Fails unless every public field of `expected` reads the same in `actual` (extra fields may differ),
    but for the fields `ignored`."""
    left, right = expected.to_dict(), actual.to_dict()
    left = {key: value for key, value in left.items() if key not in ignored}
    right["rope_parameters"] = without_legacy_type(right.get("rope_parameters"))
    differ = sorted(key for key in left if not key.startswith("_") and left[key] != right.get(key))
    if differ:
        raise SystemExit(
            "the hub-style config.json loads with other values: "
            + "; ".join(f"{key}: {right.get(key)!r} instead of {left[key]!r}" for key in differ)
        )


def decoder_parts(model):
    """The decoder layers, final norm (None for a model without one: OpenAI GPT's
    post-norm layers end in a norm of their own) and rotary module of a decoder-only model,
    found by structure (fixture_common.decoder_stack): `model.model.layers` for most families,
    GPT-2's `transformer.h`, GPT-NeoX's `gpt_neox.layers`, Mamba's `backbone.layers`. The
    rotary module is None for models without RoPE (GPT-2, Mamba, Jamba, Nemotron-H,
    Granite-4.0-H with position_embedding_type "nope").
    """
    stack = decoder_stack(model)
    return stack["layers"], stack["norm"], stack["rotary"]


def router_class(model):
    """The router module class of a mixture-of-experts model, else None.

    Transformers names it in `_can_record_outputs["router_logits"]` (an OutputRecorder
    or the class itself), on the causal-LM class or on its base model (Llama 4).
    """
    for owner in (model, getattr(model, "model", None)):
        recorder = (getattr(owner, "_can_record_outputs", None) or {}).get("router_logits")
        if isinstance(recorder, (list, tuple)):
            # Several routers (JetMoE's attention and MLP experts): their classes together.
            return tuple(getattr(r, "target_class", r) for r in recorder) or None
        if recorder is not None:
            return getattr(recorder, "target_class", recorder)
    return None


def routers(model) -> dict:
    """Decoder layer index -> its router module, for the MoE layers (none for dense models)."""
    cls = router_class(model)
    if cls is None:
        return {}
    found = {}
    for index, layer in enumerate(decoder_parts(model)[0]):
        modules = [module for module in layer.modules() if isinstance(module, cls)]
        if len(modules) > 1:
            names = sorted({type(m).__name__ for m in modules})
            raise SystemExit(f"decoder layer {index} holds {len(modules)} routers ({', '.join(names)})")
        if modules:
            found[index] = modules[0]
    return found


def router_record_names(model) -> list:
    """The expected.safetensors names of the routing records (ROUTER_RECORD_PREFIX)."""
    return [
        f"{ROUTER_RECORD_PREFIX}.{index}.{what}"
        for index in routers(model)
        for what in ("logits", "top_k_index", "top_k_weights")
    ]


def routing_of(module, output):
    """(logits, top_k_index, top_k_weights) of one router call, the experts ascending per token.

    Every router of these families returns (logits, top-k weights, top-k indices),
    except Llama 4's: (scores over all experts, zero where not chosen; logits), whose
    top-k are the experts with the k largest logits (how it chose them).
    """
    import torch

    if isinstance(output, tuple) and len(output) == 3:
        logits, weights, index = output
    elif isinstance(output, tuple) and len(output) == 2:
        scores, logits = output
        index = torch.topk(logits, module.top_k, dim=-1).indices
        weights = scores.gather(-1, index)
    else:
        raise SystemExit(f"{type(module).__name__} returned {type(output).__name__}: no routing found in it")
    order = index.argsort(dim=-1)
    return logits, index.gather(-1, order), weights.gather(-1, order)


@contextmanager
def activation_hooks(model):
    """Records the activations of one forward pass into the yielded dict.

    `embeddings` is the input of decoder layer 0, so families that scale their
    embeddings are captured after the scaling; `layers.{i}` the hidden state a
    decoder layer returns (a tensor, or the first item of a tuple); `norm` the
    output of the final norm. MoE models also get their routing per MoE layer
    (ROUTER_RECORD_PREFIX).
    """
    import torch

    layers, norm, _ = decoder_parts(model)
    captured = {}

    def keep(name, value):
        if name in captured:
            raise SystemExit(f"{name} was recorded twice in one forward pass")
        captured[name] = value.detach().clone()

    def on_first_layer_input(_module, args, kwargs):
        keep("embeddings", args[0] if args else kwargs["hidden_states"])

    def on_layer_output(index):
        def hook(_module, _args, output):
            # A tensor, or a tuple (a list for OpenAI GPT) whose first item is one.
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            keep(f"layers.{index}", hidden)
            if norm is None and index == len(layers) - 1:
                # No final norm: the output layer reads the last layer's output.
                keep("norm", hidden)

        return hook

    def on_router_output(index):
        def hook(module, _args, output):
            logits, top_k_index, top_k_weights = routing_of(module, output)
            keep(f"{ROUTER_RECORD_PREFIX}.{index}.logits", logits)
            keep(f"{ROUTER_RECORD_PREFIX}.{index}.top_k_index", top_k_index.to(torch.int64))
            keep(f"{ROUTER_RECORD_PREFIX}.{index}.top_k_weights", top_k_weights)

        return hook

    handles = [layers[0].register_forward_pre_hook(on_first_layer_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(on_layer_output(i)) for i, layer in enumerate(layers)]
    def on_norm_output(_module, _args, output):
        # The final norm may also run before the layers (NanoChat normalizes the embeddings
        # with the same module): its record is the last call, the one after the last layer.
        captured["norm"] = output.detach().clone()

    if norm is not None:
        handles.append(norm.register_forward_hook(on_norm_output))
    handles += [router.register_forward_hook(on_router_output(i)) for i, router in routers(model).items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_forward(model, input_ids) -> dict:
    """Activations and logits of one forward pass over the whole prompt, no cache."""
    import torch

    with activation_hooks(model) as captured, torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits
    expected = ["embeddings"] + [f"layers.{i}" for i in range(len(decoder_parts(model)[0]))] + ["norm"]
    expected += router_record_names(model)
    if sorted(captured) != sorted(expected):
        raise SystemExit(f"hooks recorded {sorted(captured)}, expected {expected}")
    return {**{name: captured[name] for name in expected}, "logits": logits.detach().clone()}


def greedy_decode(model, input_ids, new_tokens: int):
    """The greedy continuation of the prompt, and the smallest top-1/top-2 logit gap.

    EOS must not end generation early, and passing `eos_token_id=None` to
    `generate` is not enough: Transformers merges in the model's own generation
    config, whose EOS still stops it. So the model's generation config is
    replaced by one with greedy search and nothing else (no EOS, no penalties,
    no length constraints that mask tokens). The result is then checked against
    a plain argmax loop that recomputes the whole sequence at every step.
    """
    import torch
    from transformers import GenerationConfig

    settings = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, eos_token_id=None)
    model.generation_config = settings
    with torch.no_grad():
        sequence = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=settings
        )
    generated = sequence[0, input_ids.shape[1] :].clone()
    if generated.shape[0] != new_tokens:
        raise SystemExit(f"generate returned {generated.shape[0]} tokens, expected {new_tokens}")

    tokens, margins = input_ids, []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=tokens, use_cache=False).logits[0, -1]
            top2 = logits.topk(2).values
            margins.append(float(top2[0] - top2[1]))
            tokens = torch.cat([tokens, logits.argmax().view(1, 1)], dim=1)
    if not torch.equal(tokens[0, input_ids.shape[1] :], generated):
        raise SystemExit("generate() and a plain argmax loop disagree on the greedy tokens")
    return generated.to(torch.int64), min(margins)


def cache_consistency(model, input_ids, logits) -> float:
    """Largest logit change when the prompt runs through Transformers' KV cache.

    The prompt is prefilled with its first k tokens (k in CACHE_PREFILL_SIZES) and
    then fed one token at a time; the logits are compared with those of the single
    full pass. Transformers' RoPE schemes that pick frequencies per call from
    seq_len (longrope, dynamic NTK) keep the keys cached under earlier
    frequencies, so for them this is not zero but a property of Transformers that
    a port's own cache check should expect. Each piece gets its positions, as
    `generate()` hands them over.
    """
    import inspect

    import torch
    from transformers import DynamicCache

    accepted = inspect.signature(model.forward).parameters
    if "past_key_values" not in accepted and "cache_params" not in accepted:
        # No cache at all (OpenAI GPT): Transformers reruns the whole prefix each step, so
        # a port's cache must give the full pass's logits, up to rounding.
        return 0.0
    worst = 0.0
    with torch.no_grad():
        for prefill in CACHE_PREFILL_SIZES:
            cache = DynamicCache(config=model.config)
            spans = [(0, prefill)] + [(t, t + 1) for t in range(prefill, input_ids.shape[1])]
            pieces = [
                model(
                    input_ids=input_ids[:, start:end],
                    use_cache=True,
                    **cache_argument(model, cache),
                    **continuation_positions(model, start, end),
                ).logits
                for start, end in spans
            ]
            worst = max(worst, float((torch.cat(pieces, dim=1) - logits).abs().max()))
    return worst


def cache_argument(model, cache) -> dict:
    """The keyword argument that hands a cache to the model's forward.

    Most families take `past_key_values`; the Mamba families (Mamba, Mamba2, FalconMamba)
    take `cache_params`. Either way it is Transformers' DynamicCache, which, built from the
    config, holds a LinearAttentionLayer (conv and recurrent states) for each recurrent layer.
    """
    import inspect

    name = "past_key_values" if "past_key_values" in inspect.signature(model.forward).parameters else "cache_params"
    return {name: cache}


def continuation_positions(model, start: int, end: int) -> dict:
    """The positions of a continuation from a cache, handed over as `generate()` does.

    Some forwards count positions from 0 when none are given, whatever the cache holds
    (Bamba's in Transformers 5.23), so a continuation without them would be rotated as
    if it began the sequence; families without `position_ids` (Mamba) take nothing.
    """
    import inspect

    import torch

    if "position_ids" not in inspect.signature(model.forward).parameters:
        return {}
    return {"position_ids": torch.arange(start, end, dtype=torch.int64)[None]}


def rope_layer_types(rotary) -> dict | None:
    """Record prefix -> layer type for a rotary module with one RoPE per layer type, else None.

    Such a module (Gemma 3) keeps `rope_type` as a dict by layer type, holds
    `<layer type>_inv_freq` buffers, and its forward takes the layer type.
    """
    if not isinstance(getattr(rotary, "rope_type", None), dict):
        return None
    return {ROPE_RECORD_PREFIXES.get(layer_type, f"rope_{layer_type}"): layer_type for layer_type in rotary.rope_type}


def rope_parameter_sets(config, rotary) -> dict:
    """Record prefix -> the rope_parameters dict that RoPE comes from."""
    layer_types = rope_layer_types(rotary)
    if layer_types is None:
        return {"rope": config.rope_parameters}
    return {prefix: config.rope_parameters[layer_type] for prefix, layer_type in layer_types.items()}


def first_called(model, modules):
    """The first of `modules` (in their order) a forward pass of `model` over a few tokens calls."""
    import torch

    called = set()
    handles = [m.register_forward_hook(lambda m, *_: called.add(id(m))) for m in modules]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        for handle in handles:
            handle.remove()
    return next((m for m in modules if id(m) in called), None)


def capture_rope(model, dtype):
    """cos/sin (and inv_freq, when exposed) of the model's rotary module at ROPE_POSITIONS.

    One call with all positions, as a forward pass over those positions would make
    it. The input `x` only lends its dtype and device. Families whose attention
    rotates interleaved pairs from halves-layout cos/sin (INTERLEAVED_ROPE_FLAG) get the
    first half, one value per frequency. Returns the tensors and, per
    record prefix (`rope`, and `rope_local` for a rotary module with one RoPE per
    layer type), the module's `attention_scaling`, the factor it multiplies cos and
    sin by.
    """
    import torch

    _, _, rotary = decoder_parts(model)
    if rotary is None:
        return {}, {}  # no RoPE (Mamba, Jamba, Nemotron-H, ...): nothing to record
    # A module built but never called describes no layer: Granite SWA keeps its global-base one and
    # rotates with one module per base of `layer_rope_theta`; record the first of those called.
    rotary = first_called(model, [rotary] + [m for m in model.modules() if type(m) is type(rotary)])
    if rotary is None:
        return {}, {}
    position_ids = torch.tensor([ROPE_POSITIONS], dtype=torch.int64)
    x = torch.zeros(1, len(ROPE_POSITIONS), model.config.hidden_size, dtype=dtype)
    layer_types = rope_layer_types(rotary)
    calls = {"rope": None} if layer_types is None else layer_types
    tensors, scalings = {}, {}
    for prefix, layer_type in calls.items():
        attribute = "" if layer_type is None else f"{layer_type}_"
        with torch.no_grad():
            if layer_type is None:
                result = rotary(x, position_ids)
            else:
                result = rotary(x, position_ids, layer_type)
        if isinstance(result, torch.Tensor) and result.is_complex():
            # Llama 4: one complex rotation per pair of features, cos + i sin (times the scaling).
            cos, sin = result.real, result.imag
        else:
            cos, sin = result
            if interleaved_rope(model.config):
                # The interleaved rotation reads the first half only: one value per pair.
                cos, sin = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
        tensors[f"{prefix}.cos"], tensors[f"{prefix}.sin"] = cos[0].clone(), sin[0].clone()
        inv_freq = getattr(rotary, f"{attribute}inv_freq", None)
        scaling = float(getattr(rotary, f"{attribute}attention_scaling", 1.0))
        if type(rotary).__name__ == "PhimoeRotaryEmbedding":
            inv_freq, scaling = phimoe_rope_in_use(rotary, max(ROPE_POSITIONS) + 1)
        if isinstance(inv_freq, torch.Tensor):
            tensors[f"{prefix}.inv_freq"] = inv_freq.detach().clone()
        scalings[prefix] = scaling
    return tensors, scalings


def rotates_pairs(rotary, config) -> bool:
    """Whether the attention rotates adjacent feature pairs (2i, 2i + 1) rather than halves
    (i, i + dims/2): the rotary module returns complex rotations (Llama 4, DeepSeek-V2), or
    the family applies halves-layout cos/sin to interleaved pairs (INTERLEAVED_ROPE_FLAG)."""
    import torch

    if rope_layer_types(rotary) is not None:
        return False
    if interleaved_rope(config):
        return True
    with torch.no_grad():
        result = rotary(torch.zeros(1, 1, config.hidden_size), torch.zeros(1, 1, dtype=torch.int64))
    return isinstance(result, torch.Tensor) and result.is_complex()


def rotated_unit_query(reference):
    """The family's own `apply_rotary_pos_emb` applied to a unit query (feature 0) with the cos/sin its
    rotary module gives at position 1: `(rotated, sin, head_dim)`, or None where the family has no such
    function or it cannot be called this way."""
    import sys

    import torch

    module = sys.modules.get(type(reference).__module__)
    apply = getattr(module, "apply_rotary_pos_emb", None)
    rotary = decoder_parts(reference)[2]
    config = reference.config
    if apply is None or rotary is None or rope_layer_types(rotary) is not None:
        return None
    try:
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, 1, config.hidden_size), torch.ones(1, 1, dtype=torch.int64))
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            q = torch.zeros(1, 1, 1, head_dim)
            q[..., 0] = 1.0
            rotated, _ = apply(q, q.clone(), cos, sin)
    except Exception:
        return None
    return rotated, sin, head_dim


def applies_rope_to_pairs(reference) -> bool:
    """Whether the family's own `apply_rotary_pos_emb` rotates feature 0 with feature 1 (adjacent pairs:
    Cohere, GLM, GLM-4) rather than with the other half: probed on a unit query with the cos/sin the model's
    rotary module gives at position 1. False where the family has no such function or it cannot be called
    this way."""
    probe = rotated_unit_query(reference)
    if probe is None:
        return False
    rotated, _, head_dim = probe
    moved = rotated.flatten().abs()
    return bool(moved[1] > 1e-6) and head_dim > 2


def applies_rope_reversed(reference) -> bool:
    """Whether the family's own `apply_rotary_pos_emb` rotates by -θ the angles its rotary module gives
    (NanoChat's `rotate_half` returns (x2, -x1)): probed like applies_rope_to_pairs, on a unit query at
    position 1, where the partner feature gets sin(-θ) < 0 instead of sin(θ) > 0. False where the family
    has no such function or it cannot be called this way."""
    probe = rotated_unit_query(reference)
    if probe is None:
        return False
    rotated, sin, head_dim = probe
    partner = 1 if applies_rope_to_pairs(reference) else sin.shape[-1] // 2
    if sin.is_complex() or partner >= head_dim or float(sin.flatten()[partner]) <= 1e-6:
        return False
    return bool(rotated.flatten()[partner] < -1e-6)


def interleaved_rope(config) -> bool:
    """Whether the family's attention applies halves-layout cos/sin to interleaved pairs (INTERLEAVED_ROPE_FLAG)."""
    if config.model_type not in INTERLEAVED_ROPE_FLAG:
        # Latent attention families name it in their config (YouTu's `rope_interleave`).
        return getattr(config, "kv_lora_rank", None) is not None and getattr(config, "rope_interleave", None) is True
    flag = INTERLEAVED_ROPE_FLAG[config.model_type]
    return flag is None or bool(getattr(config, flag))


def phimoe_rope_in_use(rotary, seq_len: int):
    """The inv_freq and cos/sin factor PhimoeRotaryEmbedding.forward uses for a call with this seq_len.

    Its forward recomputes inv_freq with `rope_init_fn(config)` and no seq_len, so
    LongRoPE always gets short_factor there (the `inv_freq` buffer that
    dynamic_rope_update switches to long_factor is not used), and multiplies cos/sin
    by long_mscale when seq_len > original_max_position_embeddings, else short_mscale.
    """
    rope = rotary.config.rope_parameters
    inv_freq, scaling = rotary.rope_init_fn(rotary.config)
    if rope["rope_type"] != "default":
        long = seq_len > rope["original_max_position_embeddings"]
        scaling = rope["long_mscale"] if long else rope["short_mscale"]
    return inv_freq, float(scaling)


def float64_angle_deviation(rope: dict, attention_scaling: float, prefix: str = "rope") -> float:
    """How far the recorded cos/sin are from cos/sin of float64 angles with the same inv_freq.

    Transformers multiplies position and inv_freq in float32, so at position
    131071 the angle is rounded to 1/128 rad and cos/sin move by up to ~1e-3: a
    port matches the recorded values within rope_max_abs only if it rounds the
    same way (float32 inv_freq bit-identical to rope.inv_freq, float32 product).
    """
    import torch

    positions = torch.tensor(ROPE_POSITIONS, dtype=torch.float64)
    angles = positions[:, None] * rope[f"{prefix}.inv_freq"].double()[None, :]
    if rope[f"{prefix}.cos"].shape[-1] != angles.shape[-1]:
        # cos/sin of both halves of a head; GPT-OSS and Llama 4 keep one per frequency.
        angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos() * attention_scaling, angles.sin() * attention_scaling
    return max(
        float((cos - rope[f"{prefix}.cos"].double()).abs().max()),
        float((sin - rope[f"{prefix}.sin"].double()).abs().max()),
    )


def unscaled_rope_parameters(rope: dict) -> dict:
    """Unscaled RoPE with the theta (and partial rotary factor) of `rope`.

    The other keys stay: default RoPE ignores them, and a family's own code may read
    them whatever the RoPE type (Ministral 3's query scaling reads
    llama_4_scaling_beta and original_max_position_embeddings).
    """
    unscaled = {key: value for key, value in rope.items() if key != "type"}
    unscaled["rope_type"] = "default"
    return unscaled


def unscaled_twin(model):
    """The same weights under unscaled RoPE of the same theta, to measure what scaling does.

    With one RoPE per layer type (Gemma 3) every layer type's RoPE is unscaled.
    """
    config = copy.deepcopy(model.config)
    layer_types = rope_layer_types(decoder_parts(model)[2])
    if layer_types is None:
        config.rope_parameters = unscaled_rope_parameters(config.rope_parameters)
    else:
        config.rope_parameters = {
            **config.rope_parameters,
            **{lt: unscaled_rope_parameters(config.rope_parameters[lt]) for lt in layer_types.values()},
        }
    twin = type(model)(config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def scaled_rope_prefixes(model) -> list:
    """The record prefixes whose RoPE is scaled (rope_type other than default)."""
    if decoder_parts(model)[2] is None:
        return []
    sets = rope_parameter_sets(model.config, decoder_parts(model)[2])
    return [prefix for prefix, rope in sets.items() if rope["rope_type"] != "default"]


def scaling_checks(model, input_ids, logits, rope: dict) -> dict:
    """How far this variant's RoPE and logits are from those of unscaled RoPE.

    A variant that scales RoPE must differ at the recorded rope positions, or a
    port that ignored the scaling would pass; the logits show whether the scaling
    also reaches the prompt (it does not for dynamic NTK below its threshold).
    """
    twin = unscaled_twin(model)
    dtype = next(value.dtype for key, value in rope.items() if key.endswith(".cos"))
    twin_rope, _ = capture_rope(twin, dtype)
    checks = {}
    sets = rope_parameter_sets(model.config, decoder_parts(model)[2])
    for prefix in scaled_rope_prefixes(model):
        effect = max(float((rope[k] - twin_rope[k]).abs().max()) for k in (f"{prefix}.cos", f"{prefix}.sin"))
        if effect < MIN_ROPE_SCALING_EFFECT:
            raise SystemExit(
                f"{sets[prefix]['rope_type']} RoPE ({prefix}) changes cos/sin by only {effect:.3g} "
                f"at {ROPE_POSITIONS}: adjust the variant so that its scaling is exercised"
            )
        checks[f"{prefix}_vs_unscaled_max_abs"] = rounded(effect)
    logits_effect = float((run_forward(twin, input_ids)["logits"] - logits).abs().max())
    checks["logits_vs_unscaled_max_abs"] = rounded(logits_effect)
    return checks


def sliding_window_checks(model, input_ids, logits) -> dict:
    """How far the logits move when the sliding window (shorter than the prompt) becomes unlimited.

    Only for configs with a sliding window shorter than the prompt; the window
    must change the logits, or a port that ignored it would pass.
    """
    window = getattr(model.config, "sliding_window", None)
    # Qwen2-MoE's config turns an unused window into 0.
    if not (isinstance(window, int) and 0 < window < PROMPT_LENGTH):
        return {}
    config = copy.deepcopy(model.config)
    config.sliding_window = 1 << 20  # longer than any sequence here: full attention
    twin = type(model)(config).eval()
    twin.load_state_dict(model.state_dict())
    effect = float((run_forward(twin, input_ids)["logits"] - logits).abs().max())
    if effect < MIN_SLIDING_WINDOW_EFFECT:
        raise SystemExit(f"the sliding window changes the logits by only {effect:.3g}: make it smaller")
    return {"logits_vs_unlimited_window_max_abs": rounded(effect)}


def softcap_checks(model, input_ids, logits) -> dict:
    """How far the logits move without tanh softcapping, for models that softcap; it must bite."""
    config = copy.deepcopy(model.config)
    capped = [name for name in SOFTCAP_FIELDS if getattr(config, name, None) is not None]
    if not capped:
        return {}
    for name in capped:
        setattr(config, name, None)
    twin = type(model)(config).eval()
    twin.load_state_dict(model.state_dict())
    effect = float((run_forward(twin, input_ids)["logits"] - logits).abs().max())
    if effect < MIN_SOFTCAP_EFFECT:
        raise SystemExit(f"softcapping ({', '.join(capped)}) changes the logits by only {effect:.3g}")
    return {"logits_vs_no_softcap_max_abs": rounded(effect)}


def routing_checks(model, activations) -> tuple:
    """Refuses a MoE variant whose prompt does not exercise the routing; (checks, manifest summary).

    Every MoE layer (the first one, layer 0 where it is MoE, and every later one)
    must choose fewer experts than it has, and at least MIN_DISTINCT_EXPERT_SETS
    different expert sets over the prompt's tokens, so that a port ignoring the
    router (or choosing the same experts for every token) cannot pass. Dense models
    get ({}, None).
    """
    layers = sorted(routers(model))
    if not layers:
        return {}, None
    summary = {}
    for index in layers:
        chosen = activations[f"{ROUTER_RECORD_PREFIX}.{index}.top_k_index"]
        num_experts = activations[f"{ROUTER_RECORD_PREFIX}.{index}.logits"].shape[-1]
        top_k = chosen.shape[-1]
        if top_k >= num_experts:
            raise SystemExit(f"layer {index} routes every token to {top_k} of {num_experts} experts: no routing")
        summary[str(index)] = {
            "distinct_expert_sets": len({tuple(row) for row in chosen.tolist()}),
            "experts_used": len(set(chosen.flatten().tolist())),
            "num_experts": num_experts,
            "top_k": top_k,
        }
    for index in layers:
        count = summary[str(index)]["distinct_expert_sets"]
        if count < MIN_DISTINCT_EXPERT_SETS:
            raise SystemExit(
                f"MoE layer {index} chooses {count} expert set(s) for the {PROMPT_LENGTH} prompt tokens, "
                f"fewer than {MIN_DISTINCT_EXPERT_SETS}: pick another seed"
            )
    first = summary[str(layers[0])]["distinct_expert_sets"]
    checks = {
        "router_first_moe_layer": layers[0],
        "router_first_moe_layer_distinct_expert_sets": first,
        "router_min_distinct_expert_sets": min(layer["distinct_expert_sets"] for layer in summary.values()),
    }
    return checks, {"moe_layers": layers, "layers": summary}


# The names of the vector a router adds to its scores to choose experts (not to weight them):
# DeepSeek-V3's `e_score_correction_bias`, LFM2-MoE's `expert_bias` (on its MoE block).
ROUTING_BIAS_NAMES = ("e_score_correction_bias", "expert_bias")


def routing_margins(model, activations) -> dict:
    """How far each MoE layer's choice of experts is from a tie; refuses near-ties (MIN_ROUTER_MARGIN).

    The score the experts are ranked by is rebuilt from the recorded router logits
    the way Transformers ranks them: the logits themselves (softmax and sigmoid
    routers are monotone in them; PhiMoE's sparsemixer takes the best, then the best
    of the rest), or sigmoid(logits) + e_score_correction_bias where a layer has that
    routing bias (GLM-4.5, MiniMax-M2, DeepSeek-V3, LFM2-MoE; softmax(logits) + the bias for the
    routers in SOFTMAX_BIAS_ROUTERS), restricted to the best `topk_group` of
    `num_group` groups (each scored by the sum of its top-2, or by its best expert for
    DeepSeek-V2's `group_limited_greedy`; not at all for its `greedy`) where the router groups
    experts. The recorded choice must be the top-k of that score, which also checks
    this description. Returns the smallest margins (checks entries).
    """
    import torch

    choice, group, threshold = [], [], []
    for index, router in routers(model).items():
        logits = activations[f"{ROUTER_RECORD_PREFIX}.{index}.logits"].float()
        chosen = activations[f"{ROUTER_RECORD_PREFIX}.{index}.top_k_index"]
        layer = decoder_parts(model)[0][index]
        biases = [
            getattr(module, name)
            for module in layer.modules()
            for name in ROUTING_BIAS_NAMES
            if isinstance(getattr(module, name, None), torch.Tensor)
        ]
        num_group = getattr(router, "num_group", 1) or 1
        if not biases:
            score = logits
        else:
            # The bias joins sigmoid scores (most), softmax scores (SOFTMAX_BIAS_ROUTERS first)
            # or the logits themselves (Kolibri-1): without groups, the ranking that gives the
            # recorded choice.
            bias = biases[0].float().reshape(-1)
            candidates = [logits.sigmoid() + bias, logits.softmax(dim=-1) + bias, logits + bias]
            if type(router).__name__ in SOFTMAX_BIAS_ROUTERS:
                candidates.insert(0, candidates.pop(1))
            score = candidates[0]
            if num_group <= 1:
                k = chosen.shape[-1]
                score = next(
                    (c for c in candidates if torch.equal(c.topk(k, dim=-1).indices.sort(dim=-1).values, chosen)),
                    score,
                )
        method = getattr(router, "topk_method", None)
        if num_group > 1 and method != "greedy":
            experts = score.shape[-1]
            grouped = score.view(-1, num_group, experts // num_group)
            if method == "group_limited_greedy":
                # DeepSeek-V2: a group scores its best expert's softmax score (ranked as the logits).
                group_scores = grouped.max(dim=-1).values
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            ranked = group_scores.sort(dim=-1, descending=True).values
            group.append(float((ranked[:, router.topk_group - 1] - ranked[:, router.topk_group]).min()))
            kept = group_scores.topk(router.topk_group, dim=-1).indices
            eligible = torch.zeros_like(group_scores).scatter_(1, kept, 1).bool()
            score = score.masked_fill(~eligible.repeat_interleave(experts // num_group, dim=1), float("-inf"))
        top = score.topk(chosen.shape[-1], dim=-1).indices.sort(dim=-1).values
        if not torch.equal(top, chosen):
            raise SystemExit(
                f"{type(router).__name__} (layer {index}) does not choose the top-k of the score routing_margins "
                "assumes: teach it how this router ranks experts"
            )
        others = score.scatter(1, chosen, float("-inf")).max(dim=-1).values
        choice.append(float((score.gather(1, chosen).min(dim=-1).values - others).min()))
        if hasattr(router, "router_jitter_noise"):
            threshold.append(sparsemixer_threshold_margin(logits, router.router_jitter_noise))
    margins = {"router_min_choice_margin": min(choice)}
    if group:
        margins["router_min_group_margin"] = min(group)
    if threshold:
        margins["router_min_sparsemixer_threshold_margin"] = min(threshold)
    for name, value in margins.items():
        if value < MIN_ROUTER_MARGIN:
            raise SystemExit(f"the routing is a near-tie ({name} {value:.3g}): pick another seed")
    return {name: rounded(value) for name, value in margins.items()}


def sparsemixer_threshold_margin(logits, jitter_eps: float) -> float:
    """How far PhiMoE's sparsemixer is from masking one more or one fewer expert (inference path).

    Each of its two passes keeps in the softmax the experts whose
    (max - logit) / max(|logit|, max) is at most 2 * router_jitter_noise, max being
    the best logit still in the running (the first pass's winner is out of the second).
    """
    import torch

    remaining = logits.clone()
    margins = []
    for _ in range(2):
        best = remaining.max(dim=-1, keepdim=True).values
        ratio = (best - logits) / logits.abs().clamp(min=best)
        in_running = remaining > float("-inf")
        margins.append(float((ratio - 2 * jitter_eps).abs()[in_running].min()))
        remaining = remaining.scatter(-1, remaining.argmax(dim=-1, keepdim=True), float("-inf"))
    return min(margins)


def experts_implementation_checks(model, input_ids, logits) -> dict:
    """How far Transformers' default experts implementation (grouped_mm) is from the recorded eager one."""
    if not type(model)._can_set_experts_implementation():
        return {}
    default = model.get_correct_experts_implementation(None)
    recorded = model.config._experts_implementation
    if default == recorded:
        return {}
    model.set_experts_implementation(default)
    try:
        other = run_forward(model, input_ids)["logits"]
    finally:
        model.set_experts_implementation(recorded)
    if model.config._experts_implementation != recorded:
        raise SystemExit("could not restore the experts implementation")
    return {f"logits_vs_{default}_experts_max_abs": rounded(float((other - logits).abs().max()))}


def option_effect_checks(model, input_ids, logits, effects: list) -> dict:
    """How far the logits move without each option a variant is meant to test (spec `effect_checks`).

    Each effect check names a twin of the model: the same weights, with
    `config_overrides` set on a copy of the config (read when the twin is built)
    and the state-dict entries whose names end with one of `zero_weights` zeroed;
    weights of modules the twin does not have (use_qk_norm false) are left out.
    The option must move the logits by MIN_OPTION_EFFECT, or a port that ignored
    it would pass; the manifest's checks get `logits_vs_<name>_max_abs`.
    """
    import torch

    checks = {}
    for effect in effects:
        config = copy.deepcopy(model.config)
        for key, value in effect.get("config_overrides", {}).items():
            setattr(config, key, copy.deepcopy(value))
        twin = type(model)(config).eval()
        state = model.state_dict()
        suffixes = tuple(effect.get("zero_weights", []))
        zeroed = [name for name in state if suffixes and name.endswith(suffixes)]
        if suffixes and not zeroed:
            raise SystemExit(f"effect check {effect['name']!r}: no weight ends with {list(suffixes)}")
        state = {name: torch.zeros_like(value) if name in zeroed else value for name, value in state.items()}
        # An option may drop modules (use_qk_norm false): their weights are left out, none may be missing.
        missing = twin.load_state_dict(state, strict=False).missing_keys
        if missing:
            raise SystemExit(f"effect check {effect['name']!r}: the twin needs weights the model lacks: {missing}")
        delta = float((run_forward(twin, input_ids)["logits"] - logits).abs().max())
        if delta < MIN_OPTION_EFFECT:
            raise SystemExit(f"effect check {effect['name']!r}: the option changes the logits by only {delta:.3g}")
        checks[f"logits_vs_{effect['name']}_max_abs"] = rounded(delta)
    return checks


def mla_notes(model) -> dict:
    """Manifest entries for multi-head latent attention (a config with kv_lora_rank), else {}.

    `attention_softmax_scale` is the factor Transformers multiplies q·k by before the
    softmax (the attention module's `scaling`), and `attention_note` spells out how it
    computes MLA where a port could go wrong: the layout of q and k, the RoPE pairing, the
    eps of the latent norms and the YaRN mscale in the softmax scale.
    """
    import math

    config = model.config
    if getattr(config, "kv_lora_rank", None) is None:
        return {}
    attention = next(module for module in model.modules() if hasattr(module, "kv_b_proj"))
    nope, rope_dim, value = attention.qk_nope_head_dim, attention.qk_rope_head_dim, attention.v_head_dim
    qk = attention.qk_head_dim
    if getattr(attention, "q_a_proj", None) is not None:
        query = f"q = q_b_proj(q_a_layernorm(q_a_proj(x))) (q_lora_rank {config.q_lora_rank})"
    else:
        query = "q = q_proj(x) (q_lora_rank null)"
    notes = [
        f"{query}, viewed [heads, {qk}] and split into q_nope ({nope}) | q_pe ({rope_dim}); "
        f"kv_a_proj_with_mqa(x) splits into the latent ({config.kv_lora_rank}) | k_pe ({rope_dim}, one for all heads); "
        f"kv_b_proj(kv_a_layernorm(latent)) viewed [heads, {nope + value}] splits into k_nope ({nope}) | v ({value}); "
        f"q = [q_nope, rope(q_pe)] and k = [k_nope, rope(k_pe)] in that order; the attention output "
        f"[heads, v_head_dim {value}] (no padding) goes to o_proj.",
        f"{'q_a_layernorm and kv_a_layernorm use' if getattr(attention, 'q_a_layernorm', None) is not None else 'kv_a_layernorm uses'} "
        f"eps {attention.kv_a_layernorm.variance_epsilon:g} "
        f"(RMSNorm's default; rms_norm_eps {config.rms_norm_eps:g} is for the other norms).",
    ]
    if hasattr(attention, "mla_scale_q_lora"):
        notes.append(
            f"LongCat: q_nope and q_pe are multiplied by (hidden_size / q_lora_rank)^0.5 = {attention.mla_scale_q_lora:.9g} "
            f"and the normed latent by (hidden_size / kv_lora_rank)^0.5 = {attention.mla_scale_kv_lora:.9g}."
        )
    rotary = decoder_parts(model)[2]
    with_scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if interleaved_rope(config):
        notes.append(
            "RoPE rotates interleaved pairs (2i, 2i + 1) by angle i (apply_rotary_pos_emb_interleave); its output "
            "lists the rotated first elements, then the second ones, for q and k alike, which leaves q·k unchanged."
        )
    elif rotates_pairs(rotary, config):
        notes.append(
            "RoPE rotates interleaved pairs (2i, 2i + 1): q_pe and k_pe are viewed as complex numbers in float32 and "
            "multiplied by the rotary module's cos + i·sin (times rope_attention_scaling), keeping the pair order."
        )
    else:
        notes.append("RoPE rotates halves (i, i + qk_rope_head_dim / 2) (rope_interleave false).")
    scale = float(attention.scaling)
    base = qk ** -0.5
    rope = config.rope_parameters
    if scale == base:
        notes.append(f"Softmax scale qk_head_dim^-0.5 = {qk}^-0.5 = {scale:.9g} (no mscale_all_dim to apply).")
    else:
        mscale = 0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0
        notes.append(
            f"Softmax scale {scale:.9g} = qk_head_dim^-0.5 ({qk}^-0.5 = {base:.9g}) * mscale^2, mscale = "
            f"0.1 * mscale_all_dim ({rope['mscale_all_dim']:g}) * ln(factor {rope['factor']:g}) + 1 = {mscale:.9g} "
            "(applied when rope_type is not default, mscale_all_dim is set and non-zero and factor > 1). "
            f"YaRN's attention_factor {with_scaling:.9g} (rope_attention_scaling, get_mscale(factor, mscale) / "
            "get_mscale(factor, mscale_all_dim)) multiplies cos and sin on top of that."
        )
    return {"attention_softmax_scale": scale, "attention_note": " ".join(notes)}


def rope_note(config, rotary=None):
    """Explains, for RoPE types whose cos/sin depend on the sequence length, what was recorded.

    Transformers decides per call of the rotary module, from
    seq_len = max(position_ids) + 1, so the rope.* tensors (one call with all
    ROPE_POSITIONS) can use another regime than the prompt does.
    """
    if getattr(config, "rope_parameters", None) is None:
        return None  # no RoPE
    layer_types = None if rotary is None else rope_layer_types(rotary)
    if layer_types is None:
        return rope_note_for(config, config.rope_parameters)
    notes = []
    for prefix, layer_type in layer_types.items():
        note = rope_note_for(config, config.rope_parameters[layer_type])
        if note is not None:
            notes.append(f"{prefix}.* ({layer_type} layers): {note}")
    return " ".join(notes) or None


def rope_note_for(config, rope):
    """rope_note for one rope_parameters dict."""
    rope_type = rope["rope_type"]
    rope_len = max(ROPE_POSITIONS) + 1
    longest = PROMPT_LENGTH + GREEDY_NEW_TOKENS - 1  # the last greedy step sees this many positions
    if rope_type == "dynamic" and rope.get("alpha"):
        return (
            "NTK-alpha (Hunyuan): `rope_type` dynamic with `alpha` is a fixed base, "
            "rope_theta * alpha ** (head_dim / (head_dim - 2)), the same for every sequence length "
            "(Transformers calls it ntk_alpha and does not recompute it per call); "
            "attention_scaling 1."
        )
    if rope_type == "longrope" and config.model_type == "phimoe":
        limit = rope["original_max_position_embeddings"]

        def regime(length):
            return "long_mscale" if length > limit else "short_mscale"

        first, last = regime(PROMPT_LENGTH), regime(longest)
        greedy = f"all use {first}" if first == last else f"go from {first} to {last}"
        return (
            "PhiMoE LongRoPE: Transformers' PhimoeRotaryEmbedding always rotates with short_factor "
            "(its forward recomputes inv_freq without seq_len; rope.inv_freq is that short_factor inv_freq) "
            f"and multiplies cos/sin by long_mscale when seq_len = max(position_ids) + 1 exceeds "
            f"original_max_position_embeddings ({limit}), else by short_mscale (rope_attention_scaling is the "
            f"factor of the recorded call). rope.* come from one call with all rope_positions (seq_len {rope_len}): "
            f"{regime(rope_len)}. The {PROMPT_LENGTH}-token forward uses {first}; the greedy steps "
            f"(seq_len {PROMPT_LENGTH} to {longest}) {greedy}."
        )
    if rope_type == "dynamic":
        limit = config.max_position_embeddings

        def regime(length):
            return f"the base scaled for seq_len {length}" if length > limit else "the unscaled base"

        subject = (
            "dynamic NTK: Transformers recomputes the base per call when seq_len exceeds "
            f"max_position_embeddings ({limit})"
        )
    elif rope_type == "longrope":
        limit = rope["original_max_position_embeddings"]

        def regime(length):
            return "long_factor" if length > limit else "short_factor"

        subject = (
            "longrope: Transformers picks long_factor for all positions of a call when seq_len exceeds "
            f"original_max_position_embeddings ({limit}), short_factor otherwise"
        )
    else:
        return None
    first, last = regime(PROMPT_LENGTH), regime(longest)
    greedy = f"all use {first}" if first == last else f"go from {first} to {last}"
    return (
        f"{subject}; seq_len = max(position_ids) + 1. rope.* come from one call with all rope_positions "
        f"(seq_len {rope_len}): {regime(rope_len)}. The {PROMPT_LENGTH}-token forward (seq_len {PROMPT_LENGTH}) "
        f"uses {first}; the greedy steps (seq_len {PROMPT_LENGTH} to {longest}) {greedy}."
    )


def recurrent_mixers(model) -> dict:
    """Decoder layer index -> its recurrent mixer, for the layers whose cache is recurrent (none for
    attention-only models).

    Which layers are recurrent is what Transformers' own DynamicCache makes of the config (a
    LinearAttentionLayer, or Falcon-H1's attention-and-SSM layer); the mixer is the module of that
    layer that owns its depthwise Conv1d (Mamba / Mamba2 mixers, the gated DeltaNet, LFM2's short
    conv, RecurrentGemma's recurrent block).
    """
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    cache_layers = DynamicCache(config=model.config).layers
    found = {}
    for index, layer in enumerate(decoder_parts(model)[0]):
        if index >= len(cache_layers) or not isinstance(cache_layers[index], LinearAttentionCacheLayerMixin):
            continue
        owners = [
            module
            for module in layer.modules()
            if any(isinstance(child, torch.nn.Conv1d) for child in module.children())
        ]
        if len(owners) != 1:
            raise SystemExit(f"recurrent layer {index}: found {len(owners)} modules owning a Conv1d, expected one")
        found[index] = owners[0]
    return found


# Mixer attributes worth a line in the manifest (those a mixer has, as JSON values).
MIXER_ATTRIBUTES = (
    "intermediate_size", "num_heads", "head_dim", "n_groups", "ssm_state_size", "time_step_rank",
    "time_step_limit", "chunk_size", "activation", "num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim",
    "key_dim", "value_dim", "conv_dim", "lru_width", "layer_norm_epsilon", "rms_eps", "mamba_rms_norm",
)


def mixer_summary(mixer) -> dict:
    """What a recurrent mixer is made of: its class, depthwise conv and the sizes it keeps as attributes."""
    import math

    conv = next(child for child in mixer.children() if type(child).__name__ == "Conv1d")
    summary = {
        "mixer": type(mixer).__name__,
        "conv_channels": conv.in_channels,
        "conv_kernel": conv.kernel_size[0],
        "conv_bias": conv.bias is not None,
    }
    for name in MIXER_ATTRIBUTES:
        value = getattr(mixer, name, None)
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, list):
            value = [item if math.isfinite(item) else str(item) for item in value]
        if isinstance(value, (bool, int, float, str, list)):
            summary[name] = value
    block = getattr(getattr(mixer, "rg_lru", None), "block_width", None)
    if block is not None:
        summary["rg_lru_block_width"] = block
    return summary


def delta_rule_function(mixer):
    """(module namespace, name) of the chunked gated-delta-rule function a gated DeltaNet calls, else None."""
    import sys

    namespace = vars(sys.modules[type(mixer).__module__])
    name = "torch_chunk_gated_delta_rule"
    return (namespace, name) if "DeltaNet" in type(mixer).__name__ and name in namespace else None


def prefill_scan(mixer) -> dict:
    """How the reference (torch) prefill of this mixer scans the prompt: chunk size and chunk count, or sequential."""
    import inspect
    import math

    if isinstance(getattr(mixer, "chunk_size", None), int):
        size, source = mixer.chunk_size, "config (the mixer's chunk_size)"
    elif delta_rule_function(mixer) is not None:
        namespace, name = delta_rule_function(mixer)
        size = inspect.signature(namespace[name]).parameters["chunk_size"].default
        source = f"the default chunk_size of {name} (no config field; the mixer does not pass one)"
    elif hasattr(mixer, "rg_lru"):
        return {"kind": "sequential", "note": "RG-LRU: a Python loop over the prompt's tokens (_rnn_scan)"}
    elif hasattr(mixer, "x_proj"):
        return {
            "kind": "sequential",
            "note": "selective scan: a Python loop over the prompt's tokens (mamba_selective_scan; the associative "
            "scan is only used under torch.compile)",
        }
    else:
        return {"kind": "none", "note": "convolution only, no recurrent state"}
    chunks = math.ceil(PROMPT_LENGTH / size)
    return {
        "kind": "chunked",
        "chunk_size": size,
        "chunk_size_source": source,
        "prompt_chunks": chunks,
        "prompt_spans_chunks": chunks > 1,
        "padding": (size - PROMPT_LENGTH % size) % size,
    }


@contextmanager
def prefill_chunk_size(mixers, size: int):
    """Runs the reference prefill with another chunk size: the mixers' chunk_size attribute, or the default
    chunk_size of the gated delta rule function they call (patched in their module for the duration)."""
    import functools

    saved_sizes, saved_functions = [], []
    for mixer in mixers:
        if isinstance(getattr(mixer, "chunk_size", None), int):
            saved_sizes.append((mixer, mixer.chunk_size))
            mixer.chunk_size = size
        elif delta_rule_function(mixer) is not None:
            namespace, name = delta_rule_function(mixer)
            if not any(saved[0] is namespace for saved in saved_functions):
                saved_functions.append((namespace, name, namespace[name]))
                namespace[name] = functools.partial(namespace[name], chunk_size=size)
    try:
        yield
    finally:
        for mixer, value in saved_sizes:
            mixer.chunk_size = value
        for namespace, name, function in saved_functions:
            namespace[name] = function


def recurrent_checks(model, input_ids, logits) -> tuple:
    """Checks and manifest section for models with recurrent layers; ({}, None) for others.

    * `cache_continuation_vs_full_logits_max_abs`: the prompt's first CONTINUATION_PREFILL tokens
      through Transformers' cache, then the rest in one multi-token forward that starts from the
      cached states (a chunked prefill), against the full pass. Mixers in
      CONTINUATION_IGNORES_STATE are expected to differ; the manifest says why.
    * `logits_vs_one_chunk_max_abs` (the reference prefill chunks the prompt) or
      `logits_vs_chunk_size_<n>_max_abs` (it fits one chunk): the same forward with the whole
      prompt in one chunk, or in chunks of DELTA_RULE_CHECK_CHUNK; only float rounding may differ.
    """
    import torch
    from transformers import DynamicCache

    mixers = recurrent_mixers(model)
    if not mixers:
        return {}, None
    checks = {}
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        first = model(input_ids=input_ids[:, :CONTINUATION_PREFILL], use_cache=True, **cache_argument(model, cache))
        rest = model(
            input_ids=input_ids[:, CONTINUATION_PREFILL:],
            use_cache=True,
            **cache_argument(model, cache),
            **continuation_positions(model, CONTINUATION_PREFILL, input_ids.shape[1]),
        )
    continuation = float((torch.cat([first.logits, rest.logits], dim=1) - logits).abs().max())
    checks["cache_continuation_vs_full_logits_max_abs"] = rounded(continuation)

    scans = {index: prefill_scan(mixer) for index, mixer in mixers.items()}
    chunked = [scan for scan in scans.values() if scan["kind"] == "chunked"]
    if chunked:
        spans = any(scan["prompt_spans_chunks"] for scan in chunked)
        size, name = (PROMPT_LENGTH, "one_chunk") if spans else (DELTA_RULE_CHECK_CHUNK, f"chunk_size_{DELTA_RULE_CHECK_CHUNK}")
        with prefill_chunk_size(mixers.values(), size):
            other = run_forward(model, input_ids)["logits"]
        checks[f"logits_vs_{name}_max_abs"] = rounded(float((other - logits).abs().max()))

    layer_types = getattr(model.config, "layer_types", None)
    section = {
        "recurrent_layers": sorted(mixers),
        "layers": {str(index): {**mixer_summary(mixer), "prefill_scan": scans[index]} for index, mixer in mixers.items()},
        "continuation_prefill": CONTINUATION_PREFILL,
    }
    if layer_types is not None:
        section["layer_types"] = list(layer_types)
    ignoring = sorted({CONTINUATION_IGNORES_STATE[type(m).__name__] for m in mixers.values() if type(m).__name__ in CONTINUATION_IGNORES_STATE})
    limits = sorted({tuple(m.time_step_limit) for m in mixers.values() if hasattr(m, "time_step_limit")})
    if any(limit != (0.0, float("inf")) for limit in limits):
        configured = getattr(model.config, "time_step_limit", None)
        section["dt_clamp_note"] = (
            f"dt = softplus(dt + dt_bias) is clamped to {[list(limit) for limit in limits]} in the chunked scan "
            "(the prompt), but Transformers' single-step cache update (mamba2_selective_state_update) does not clamp, "
            "so cache_vs_full_logits_max_abs includes that difference; the recorded full-prompt logits are clamped."
            + (
                f" The mixer uses (time_step_min, inf), not config.time_step_limit {list(configured)}."
                if configured is not None and tuple(configured) not in limits
                else ""
            )
        )
    if ignoring:
        section["continuation_note"] = (
            "Transformers' multi-token forward from a cached state is not exact for this family: "
            + "; ".join(ignoring)
            + ". cache_continuation_vs_full_logits_max_abs measures that; a port should match the full-prompt "
            "logits instead."
        )
    elif continuation > TOLERANCES["max_abs"]:
        raise SystemExit(f"the cache continuation differs from the full pass by {continuation:.3g}: explain why")
    return checks, section


def recurrent_states(model, input_ids) -> dict:
    """The states Transformers caches for each recurrent layer after one cached forward over the whole prompt.

    `state.L.conv`: the conv cache (LinearAttentionLayer.conv_states, [batch, channels, conv_kernel] holding
    the last conv_kernel conv inputs, oldest first; RecurrentGemma's conv1d_state keeps conv1d_width - 1);
    `state.L.recurrent`: the recurrent state (LinearAttentionLayer.recurrent_states, or RecurrentGemma's
    rg_lru.recurrent_states), where the layer has one.
    """
    import torch
    from transformers import DynamicCache

    mixers = recurrent_mixers(model)
    if not mixers:
        return {}
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=True, **cache_argument(model, cache))
    states = {}
    for index, mixer in mixers.items():
        if hasattr(mixer, "rg_lru"):
            conv, recurrent = mixer.conv1d_state, mixer.rg_lru.recurrent_states
        else:
            conv, recurrent = cache.layers[index].conv_states[0], cache.layers[index].recurrent_states[0]
        states[f"{STATE_RECORD_PREFIX}.{index}.conv"] = conv.detach().clone()
        if recurrent is not None:
            states[f"{STATE_RECORD_PREFIX}.{index}.recurrent"] = recurrent.detach().clone()
    return states


def rounded(value: float) -> float:
    """A float for the manifest: 6 significant digits are plenty to read."""
    return float(f"{value:.6g}")


def dtype_name(dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`."""
    return str(dtype).removeprefix("torch.")


def prompt_ids(seed: int, vocab_size: int):
    """The variant's 16-token prompt, from its own generator."""
    import torch

    prompt_generator = torch.Generator().manual_seed(seed + PROMPT_SEED_OFFSET)
    return torch.randint(0, vocab_size, (1, PROMPT_LENGTH), generator=prompt_generator, dtype=torch.int64)


def greedy_margin(spec: dict, variant: dict) -> float:
    """The smallest top-1/top-2 logit gap of the variant's greedy run, as export_variant measures it.

    export_variant refuses a variant whose margin is below MIN_GREEDY_MARGIN; a
    spec generator (introspect.py) uses this to pick a seed that passes. A mixture of
    experts' routing must pass its checks too (MIN_ROUTER_MARGIN, the same bound): the
    smallest router margin counts, and a routing export_variant refuses gives 0.
    """
    import torch

    model = build_model(spec, variant)
    with tempfile.TemporaryDirectory() as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        reference = load_model(Path(temporary), torch.float32)
    input_ids = prompt_ids(variant["seed"], model.config.vocab_size)
    margin = greedy_decode(reference, input_ids, GREEDY_NEW_TOKENS)[1]
    if router_class(reference) is not None:
        activations = run_forward(reference, input_ids)
        try:
            _, routing = routing_checks(reference, activations)
            if routing is not None:
                margin = min([margin, *routing_margins(reference, activations).values()])
        except SystemExit as refused:
            print(f"{variant.get('name')}: seed {variant.get('seed')}: {refused}", file=sys.stderr, flush=True)
            return 0.0
    return margin


def legacy_rope_keys_read(config, hub: dict) -> bool:
    """Whether the config class reads the legacy RoPE keys of `hub` (`rope_theta`,
    `rope_local_base_freq`): doubled, they must change the RoPE it resolves. A class that
    ignores them (Mellum: no old-format configs to convert) takes its defaults instead, which
    may match by chance."""
    own = hub_rope_keys(hub.get("model_type")).values()
    keys = [key for key in ("rope_theta", "rope_local_base_freq", *own) if isinstance(hub.get(key), (int, float))]
    if not keys:
        return False
    doubled = {**hub, **{key: hub[key] * 2 for key in keys}}
    return type(config).from_dict(doubled).rope_parameters != type(config).from_dict(hub).rope_parameters


def hub_model_or_none(staging: Path, reference):
    """The model Transformers loads from the hub-style `staging`, if it loads with the reference's RoPE."""
    import torch

    try:
        model = load_model(staging, torch.float32)
    except (KeyError, ValueError, TypeError):
        return None
    rope = without_legacy_type(getattr(model.config, "rope_parameters", None))
    return model if rope == without_legacy_type(getattr(reference.config, "rope_parameters", None)) else None


def export_variant(spec: dict, variant: dict, out_root: Path) -> None:
    """Writes the fixture directory of one variant."""
    import torch
    from safetensors.torch import save_file

    name, seed = variant["name"], variant["seed"]
    style = variant.get("config_style", "transformers5")
    layout = variant.get("weights_layout", "hub")
    model = build_model(spec, variant)
    moe = router_class(model) is not None
    input_ids = prompt_ids(seed, model.config.vocab_size)
    checks = {}

    with tempfile.TemporaryDirectory() as temporary:
        staging = Path(temporary) / name
        if layout in ("hub", "bitnet-packed"):
            model.save_pretrained(staging, safe_serialization=True)
        else:
            model.save_pretrained(staging, safe_serialization=True, save_original_format=False)
        # Whatever layout the weights were written in, Transformers must read back the very same model.
        reference = load_model(staging, torch.float32)
        assert_same_parameters(model, reference)

        if style == "hub":
            # Rewrite the RoPE keys, then demand that Transformers reads back the same model.
            config_path = staging / "config.json"
            written = json.loads(config_path.read_text(encoding="utf-8"))
            hub_config = to_hub_style(written)
            write_json(config_path, hub_config)
            rename_hub_weights(staging, spec["model_type"])
            rope = written.get("rope_parameters")
            nested = isinstance(rope, dict) and any(key in ROPE_RECORD_PREFIXES for key in rope)
            if nested and (not legacy_rope_keys_read(reference.config, hub_config)
                           or hub_model_or_none(staging, reference) is None):
                # RoPE per layer type with no legacy keys the class converts (families born with
                # Transformers 5, unlike Gemma 3): their Hub configs carry `rope_parameters` as written.
                hub = to_hub_style({key: value for key, value in written.items() if key != "rope_parameters"})
                write_json(config_path, {**hub, "rope_parameters": rope})
            from_hub = load_model(staging, torch.float32)
            # Either side may keep the legacy `type` (Ministral 3's own default carries it).
            if without_legacy_type(getattr(from_hub.config, "rope_parameters", None)) != without_legacy_type(
                getattr(reference.config, "rope_parameters", None)
            ):
                raise SystemExit(
                    f"hub-style config loads as {from_hub.config.rope_parameters}, "
                    f"not {reference.config.rope_parameters}"
                )
            # Whatever the hub-style config leaves out (layer_types, ...) Transformers must derive the same.
            # A text model read from a multimodal config (HUB_COMPOSITE_CONFIGS) has no architectures of its own.
            ignored = ("architectures",) if spec["model_type"] in HUB_COMPOSITE_CONFIGS else ()
            assert_same_config(reference.config, from_hub.config, ignored)
            with torch.no_grad():
                before = reference(input_ids=input_ids).logits
                after = from_hub(input_ids=input_ids).logits
            if not torch.equal(before, after):
                raise SystemExit("the hub-style config.json gives other logits than the Transformers-5 one")
            checks["hub_roundtrip_logits_max_abs"] = float((before - after).abs().max())
            reference = from_hub

        activations = run_forward(reference, input_ids)
        routing_check_values, routing = routing_checks(reference, activations)
        checks.update(routing_check_values)
        if routing is not None:
            checks.update(routing_margins(reference, activations))
        greedy_tokens, greedy_margin = greedy_decode(reference, input_ids, GREEDY_NEW_TOKENS)
        if greedy_margin < MIN_GREEDY_MARGIN:
            raise SystemExit(f"a greedy step is a near-tie (margin {greedy_margin:.3g}): pick another seed")
        checks["greedy_min_logit_margin"] = rounded(greedy_margin)
        checks["cache_vs_full_logits_max_abs"] = rounded(
            cache_consistency(reference, input_ids, activations["logits"])
        )
        recurrent_check_values, recurrent = recurrent_checks(reference, input_ids, activations["logits"])
        checks.update(recurrent_check_values)
        states = recurrent_states(reference, input_ids)
        # Last: dynamic RoPE keeps state in the rotary module between calls.
        rope, attention_scalings = capture_rope(reference, torch.float32)
        for prefix, attention_scaling in attention_scalings.items():
            if f"{prefix}.inv_freq" in rope:
                deviation = float64_angle_deviation(rope, attention_scaling, prefix)
                checks[f"{prefix}_vs_float64_angles_max_abs"] = rounded(deviation)
        checks.update(sliding_window_checks(reference, input_ids, activations["logits"]))
        checks.update(softcap_checks(reference, input_ids, activations["logits"]))
        if scaled_rope_prefixes(reference):
            checks.update(scaling_checks(reference, input_ids, activations["logits"], rope))
        checks.update(option_effect_checks(reference, input_ids, activations["logits"], variant.get("effect_checks", [])))
        if moe:
            checks.update(experts_implementation_checks(reference, input_ids, activations["logits"]))

        # The bfloat16 run keeps only the dtypes Transformers computes in.
        half = load_model(staging, torch.bfloat16)
        half_tensors = run_forward(half, input_ids)
        half_tensors.update(capture_rope(half, torch.bfloat16)[0])
        for key in [key for key in half_tensors if key.endswith(".inv_freq")]:
            half_tensors.pop(key)  # a buffer, not something computed in the bf16 run
        bf16_dtypes = {key: dtype_name(value.dtype) for key, value in half_tensors.items()}

        tensors = {**activations, "greedy_tokens": greedy_tokens, **rope, **states}
        tensors = {key: value.contiguous() for key, value in tensors.items()}
        save_file(tensors, staging / "expected.safetensors")

        manifest = {
            "format_version": FORMAT_VERSION,
            "model_type": spec["model_type"],
            "variant": name,
            "description": variant["description"],
            **versions(),
            "seed": seed,
            "dtype": "float32",
            "input_ids": input_ids[0].tolist(),
            "greedy_new_tokens": GREEDY_NEW_TOKENS,
            "greedy_stops_at_eos": False,
            "rope_positions": ROPE_POSITIONS,
            **{f"{prefix}_attention_scaling": value for prefix, value in attention_scalings.items()},
            "tolerances": TOLERANCES,
            "tensors": {
                key: {"shape": list(value.shape), "dtype": dtype_name(value.dtype)} for key, value in tensors.items()
            },
            "bf16_dtypes": bf16_dtypes,
            "architecture": type(reference).__name__,
            "attn_implementation": ATTN_IMPLEMENTATION,
            "config_style": style,
            "checks": checks,
        }
        if moe or "weights_layout" in variant:
            manifest["weights_layout"] = layout
        if moe:
            if type(reference)._can_set_experts_implementation():
                manifest["experts_implementation"] = reference.config._experts_implementation
            manifest["routing"] = routing
        rotary = decoder_parts(reference)[2]
        if rope_layer_types(rotary) is not None:
            manifest["rope_layer_types"] = rope_layer_types(rotary)
        note = rope_note(reference.config, rotary)
        if note is not None:
            manifest["rope_note"] = note
        if rotary is not None and (rotates_pairs(rotary, reference.config) or applies_rope_to_pairs(reference)):
            manifest["rope_layout"] = "pairs"
        if rotary is not None and applies_rope_reversed(reference):
            manifest["rope_direction"] = "reversed"
        manifest.update(mla_notes(reference))
        if recurrent is not None:
            manifest["recurrent"] = recurrent
        if layout == "bitnet-packed":
            write_bitnet_packed(staging, model)
        write_json(staging / "fixture.json", manifest)

        target = out_root / spec["model_type"] / name
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, target)

    size = check_fixture_size(target)
    files = ", ".join(sorted(path.name for path in target.iterdir()))
    print(f"{spec['model_type']}/{name}: {size} bytes ({files})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, action="append", required=True, help="variants spec (JSON); repeatable")
    parser.add_argument("--out", type=Path, required=True, help="fixtures root, e.g. tests/fixtures")
    parser.add_argument("--variant", action="append", default=[], help="export only this variant; repeatable")
    args = parser.parse_args()

    configure_determinism()
    specs = [load_spec(path) for path in args.spec]
    known = {variant["name"] for spec in specs for variant in spec["variants"]}
    unknown = sorted(set(args.variant) - known)
    if unknown:
        raise SystemExit(f"no such variant: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    for spec in specs:
        for variant in spec["variants"]:
            if not args.variant or variant["name"] in args.variant:
                export_variant(spec, variant, args.out)


if __name__ == "__main__":
    sys.exit(main())
