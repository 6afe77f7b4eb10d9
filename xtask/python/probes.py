"""Probes of how a Transformers config class derives per-layer settings.

Hub configs often predate `layer_types` (and SmolLM3-style `no_rope_layers`): Transformers
then derives them in the config class from other fields (`sliding_window_pattern`,
`use_sliding_window` + `max_window_layers`, `no_rope_layer_interval`, ...). The port tool
cannot read that logic, so it asks: build the config without the derived field for a few
settings of the fields it may depend on, record what Transformers derived, and let the
tool find the rule that reproduces every probe.
"""

import itertools

PROBE_LAYERS = 12


def _derived(config_class, kwargs, attribute):
    config = config_class(**kwargs)
    value = getattr(config, attribute, None)
    return list(value) if value is not None else None


def legacy_fields(config_class, fields):
    """Keys Hub configs carry that the class reads without declaring them, with their
    defaults: Gemma 3's `sliding_window_pattern` and `rope_local_base_freq`."""
    found = {}
    if "layer_types" in fields and "sliding_window_pattern" not in fields:
        plain = _derived(config_class, {"num_hidden_layers": PROBE_LAYERS}, "layer_types")
        patterned = _derived(
            config_class, {"num_hidden_layers": PROBE_LAYERS, "sliding_window_pattern": 3}, "layer_types"
        )
        if plain and patterned and plain != patterned and "full_attention" in plain:
            found["sliding_window_pattern"] = plain.index("full_attention") + 1
    default = config_class()
    nested = getattr(default, "rope_parameters", None) or {}
    if "sliding_attention" in nested and "rope_local_base_freq" not in fields:
        probe = config_class(rope_local_base_freq=1234.0)
        if probe.rope_parameters["sliding_attention"]["rope_theta"] == 1234.0:
            found["rope_local_base_freq"] = nested["sliding_attention"]["rope_theta"]
    return found


def legacy_kwargs(config_class, fields):
    """Keys the config class reads from its keyword arguments without declaring them
    (`kwargs.get("global_attn_every_n_layers", 3)`, `kwargs.pop("local_rope_theta", ...)`
    in the ModernBERT decoder's), found in its source, that set the RoPE base of one layer
    type or which layers slide: `{name: {"default": value, "sets": layer type | "layer_types"}}`.
    Hub configs carry them where Transformers 5 writes `rope_parameters` and `layer_types`."""
    import inspect
    import re

    try:
        source = inspect.getsource(config_class)
    except (OSError, TypeError):
        return {}
    names = sorted(set(re.findall(r"kwargs\.(?:get|pop)\(\s*[\"'](\w+)[\"']", source)))
    found = {}
    default = config_class()
    nested = getattr(default, "rope_parameters", None) or {}
    try:
        plain = _derived(config_class, {"num_hidden_layers": PROBE_LAYERS}, "layer_types")
    except Exception:  # noqa: BLE001 - a class that refuses the layer count (GPT-Neo's patterns)
        plain = None
    for name in names:
        if name in fields or name in ("rope_scaling", "rope_theta", "rope_local_base_freq", "sliding_window_pattern"):
            continue
        for layer_type, rope in nested.items() if isinstance(nested, dict) else []:
            if not isinstance(rope, dict) or "rope_theta" not in rope:
                continue
            try:
                probe = config_class(**{name: 1234.0})
            except Exception:  # noqa: BLE001 - a key the class refuses sets nothing
                break
            if (probe.rope_parameters.get(layer_type) or {}).get("rope_theta") == 1234.0:
                found[name] = {"default": rope["rope_theta"], "sets": layer_type}
                break
        if name in found or not plain:
            continue
        same, other, by_value = [], False, []
        for value in range(2, 9):
            try:
                derived = _derived(config_class, {"num_hidden_layers": PROBE_LAYERS, name: value}, "layer_types")
            except Exception:  # noqa: BLE001
                break
            by_value.append({"value": value, "layer_types": derived})
            if derived == plain:
                same.append(value)
            else:
                other = True
        # Some value changes the layers, and one value gives the default ones.
        if other and len(same) == 1:
            found[name] = {"default": same[0], "sets": "layer_types", "probes": by_value}
    return found


def layer_type_probes(config_class, fields):
    """`[{"config": {...}, "layer_types": [...]}]`, or [] if the class has no layer_types."""
    if "layer_types" not in fields or "sliding_window" not in fields:
        return []
    fields = {**fields, **legacy_fields(config_class, fields)}
    options = {"sliding_window": [4]}
    for name, values in (
        ("sliding_window_pattern", [3, 4]),
        ("use_sliding_window", [True, False]),
        ("max_window_layers", [5, 7]),
    ):
        if name in fields:
            options[name] = values
    probes = []
    names = sorted(options)
    for combination in itertools.product(*(options[n] for n in names)):
        kwargs = {"num_hidden_layers": PROBE_LAYERS, **dict(zip(names, combination))}
        derived = _derived(config_class, kwargs, "layer_types")
        if derived is not None:
            probes.append({"config": kwargs, "layer_types": derived})
    return probes


def field_layer_probes(config_class, fields):
    """`{field: [{"value": v, "layer_types": [...]}]}`: the integer fields (beyond the window
    fields the layer rules read) that change the `layer_types` the class derives for
    PROBE_LAYERS layers (AFMoE's `global_attn_every_n_layers`), each at 2, 3 and 4. {} if
    the class has no `layer_types`."""
    if "layer_types" not in fields:
        return {}
    known = {"sliding_window", "sliding_window_pattern", "max_window_layers", "num_hidden_layers"}
    base = {"num_hidden_layers": PROBE_LAYERS}
    try:
        plain = _derived(config_class, base, "layer_types")
    except Exception:
        return {}
    found = {}
    for name, field in sorted(fields.items()):
        if field.get("kind") != "int" or name in known or name in COMMON_SIZES or name.endswith("token_id"):
            continue
        probes = []
        for value in (2, 3, 4):
            try:
                derived = _derived(config_class, {**base, name: value}, "layer_types")
            except Exception:
                probes = []
                break
            probes.append({"value": value, "layer_types": derived})
        if probes and any(p["layer_types"] != plain for p in probes):
            found[name] = probes
    return found


def no_rope_probes(config_class, fields):
    """`[{"config": {...}, "no_rope_layers": [...]}]` for classes with `no_rope_layers`."""
    if "no_rope_layers" not in fields:
        return []
    probes = []
    for interval in ([3, 4] if "no_rope_layer_interval" in fields else [None]):
        kwargs = {"num_hidden_layers": PROBE_LAYERS}
        if interval is not None:
            kwargs["no_rope_layer_interval"] = interval
        derived = _derived(config_class, kwargs, "no_rope_layers")
        if derived is not None:
            probes.append({"config": kwargs, "no_rope_layers": [int(x) for x in derived]})
    return probes


def norm_init(model):
    """The value Transformers initializes the final norm's weight to (1.0, or 0.0 for
    families that store RMSNorm weights as offsets from one)."""
    from fixture_common import decoder_stack

    norm = decoder_stack(model)["norm"]
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    return float(weight.detach().flatten()[0])


# Boolean fields that never change what a causal LM computes on one prompt.
INERT_FLAGS = {
    "use_cache",
    "tie_word_embeddings",
    "output_router_logits",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "is_decoder",
    "is_encoder_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "torchscript",
    "use_return_dict",
}


def nested_probes(architecture, small, build_config, tiny_model, model_type):
    """What each scalar of a nested sub-config (MPT's `attn_config`) does when changed:
    a bool flipped, a number doubled (1 for 0), null set to 1.5. `{"field", "key",
    "default", "value", "logits_max_abs"}` per sub-field, with every weight copied over;
    `logits_max_abs` None where the class or the model refuses the value. The port tool
    refuses, in the module it writes, any other value of a sub-field that changes the
    logits, since no block reads it."""
    import torch

    base_config = build_config(model_type, small)
    base = tiny_model(architecture, base_config)
    ids = torch.arange(1, 9).unsqueeze(0) % base_config.vocab_size
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    probes = []
    resolved = base_config.to_dict()
    for name in sorted(resolved):
        nested = resolved[name]
        if not isinstance(nested, dict) or name in ("id2label", "label2id", "rope_parameters", "rope_scaling"):
            continue
        for key in sorted(nested):
            default = nested[key]
            if isinstance(default, bool):
                value = not default
            elif isinstance(default, (int, float)):
                value = default * 2 if default else 1
            elif default is None:
                value = 1.5
            else:
                continue
            entry = {"field": name, "key": key, "default": default, "value": value, "logits_max_abs": None}
            try:
                changed = build_config(model_type, {**small, name: {**nested, key: value}})
                model = tiny_model(architecture, changed)
                model.load_state_dict(base.state_dict(), strict=False)
                with torch.no_grad():
                    logits = model(input_ids=ids).logits
                if logits.shape == base_logits.shape:
                    entry["logits_max_abs"] = float((logits - base_logits).abs().max())
            except Exception as error:
                entry["error"] = f"{type(error).__name__}: {error}"[:200]
            probes.append(entry)
    return probes


def flag_probes(architecture, small, build_config, tiny_model, model_type):
    """What each boolean field of the tiny config does when flipped.

    For every field whose tiny value is a bool: the parameters the flipped model adds
    and removes (full names), and how far its logits move on a fixed prompt with every
    weight the two models share copied over (`logits_max_abs`; `None` when the flipped
    config is refused or the model cannot run). The port tool reads which flag puts a
    bias on which projection from this, and refuses, in the module it writes, the values
    of flags that change the computation in a way its plan does not read.
    """
    import torch

    base_config = build_config(model_type, small)
    base = tiny_model(architecture, base_config)
    base_state = base.state_dict()
    ids = torch.arange(1, 9).unsqueeze(0) % base_config.vocab_size
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    probes = []
    resolved = base_config.to_dict()
    for name in sorted(resolved):
        value = resolved[name]
        if not isinstance(value, bool) or name in INERT_FLAGS:
            continue
        entry = {"field": name, "value": not value}
        try:
            flipped_config = build_config(model_type, {**small, name: not value})
            flipped = tiny_model(architecture, flipped_config)
        except Exception as error:  # the class refuses the value
            entry["error"] = f"{type(error).__name__}: {error}"[:200]
            probes.append(entry)
            continue
        state = flipped.state_dict()
        entry["added"] = sorted(set(state) - set(base_state))
        entry["removed"] = sorted(set(base_state) - set(state))
        shared = {
            k: v for k, v in base_state.items() if k in state and state[k].shape == v.shape
        }
        flipped.load_state_dict(shared, strict=False)
        try:
            with torch.no_grad():
                logits = flipped(input_ids=ids).logits
            entry["logits_max_abs"] = float((logits - base_logits).abs().max())
            # A flip whose whole effect is embeddings times √hidden_size (AFMoE's
            # `mup_enabled`): one model with its embeddings so scaled gives the other's
            # logits; recorded is the value of the field that scales them.
            if entry["logits_max_abs"] > 1e-4 and not entry["added"] and not entry["removed"]:
                root = float(base_config.hidden_size) ** 0.5
                for model, target, scaled_when in ((base, logits, not value), (flipped, base_logits, value)):
                    hook = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out * root)
                    try:
                        with torch.no_grad():
                            moved = float((model(input_ids=ids).logits - target).abs().max())
                    finally:
                        hook.remove()
                    if moved < 1e-4:
                        entry["embeddings_times_sqrt_hidden_when"] = scaled_when
                        break
            # After the logits: the fit switches the model to eager attention.
            entry["attention_scale"] = attention_scale(flipped, flipped_config.vocab_size)
        except Exception as error:
            entry["logits_max_abs"] = None
            entry["error"] = f"{type(error).__name__}: {error}"[:200]
        probes.append(entry)
    return probes


def width_probes(architecture, small, build_config, tiny_model, model_type, fields):
    """Which integer fields set a parameter's width: each int field but the common sizes
    (GPT-2's `n_inner`, OPT's `ffn_dim`) set to WIDTH_PROBE, and the parameters that then
    have that width (full names). The port tool reads the family's own name of the MLP width from this, and
    what a null one stands for (the tiny model's width, as a multiple of hidden_size)."""
    base_config = build_config(model_type, small)
    resolved = base_config.to_dict()
    base = {k: tuple(v.shape) for k, v in tiny_model(architecture, base_config).state_dict().items()}
    probes = []
    for name, field in sorted(fields.items()):
        value = resolved.get(name)
        if field.get("kind") != "int" or isinstance(value, bool) or name in COMMON_SIZES:
            continue
        entry = {"field": name, "value": WIDTH_PROBE}
        try:
            state = tiny_model(architecture, build_config(model_type, {**small, name: WIDTH_PROBE})).state_dict()
        except Exception as error:  # the class refuses the value
            entry["error"] = f"{type(error).__name__}: {error}"[:200]
            probes.append(entry)
            continue
        entry["widened"] = sorted(
            k for k, v in state.items()
            if WIDTH_PROBE in tuple(v.shape) and WIDTH_PROBE not in base.get(k, ())
        )
        # A multiple of the width instead (GPT-NeoX-Japanese's `intermediate_multiple_size`).
        scaled = WIDTH_PROBE * base_config.hidden_size
        multiplied = sorted(
            k for k, v in state.items() if scaled in tuple(v.shape) and scaled not in base.get(k, ())
        )
        if multiplied:
            entry["widened_times_hidden"] = multiplied
        probes.append(entry)
    return probes


# A width no tiny size has (hidden 64, MLP 128, heads 4, head_dim 16, vocab 256).
WIDTH_PROBE = 96
# Fields whose role every family shares (by their common or their usual own names): not
# probed, the tool reads them as they are.
COMMON_SIZES = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions", "n_ctx",
    "d_model", "num_layers", "num_heads", "attention_heads",
}


def scalar_probes(architecture, small, build_config, tiny_model, model_type):
    """Which float fields scale the logits: each set to twice its tiny value, the same
    weights loaded; `"multiplies"` when the logits double, `"divides"` when they halve,
    else how far they moved (`None` if the doubled value is refused)."""
    import torch

    base_config = build_config(model_type, small)
    base = tiny_model(architecture, base_config)
    state = base.state_dict()
    ids = torch.arange(1, 9).unsqueeze(0) % base_config.vocab_size
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.double()
    probes = []
    resolved = base_config.to_dict()
    for name in sorted(resolved):
        value = resolved[name]
        if isinstance(value, bool) or not isinstance(value, float) or value == 0.0:
            continue
        if "dropout" in name or name in ("initializer_range",) or "rope" in name:
            continue
        entry = {"field": name}
        try:
            probed = tiny_model(architecture, build_config(model_type, {**small, name: 2 * value}))
            probed.load_state_dict(state)
            with torch.no_grad():
                logits = probed(input_ids=ids).logits.double()
        except Exception as error:
            entry["effect"] = None
            entry["error"] = f"{type(error).__name__}: {error}"[:200]
            probes.append(entry)
            continue
        scale = float(base_logits.abs().max())
        if torch.allclose(logits, 2 * base_logits, atol=1e-6 * scale, rtol=1e-5):
            entry["effect"] = "multiplies"
        elif torch.allclose(logits, base_logits / 2, atol=1e-6 * scale, rtol=1e-5):
            entry["effect"] = "divides"
        else:
            entry["effect"] = float((logits - base_logits).abs().max())
        probes.append(entry)
    return probes


def call_trace(model, vocab_size):
    """The calls into decoder layer 0's modules during one forward pass, in order:
    `{"event": "enter"|"exit", "module": name relative to the layer, "class": ...,
    "input": checksum, "output": checksum}`. A checksum is the sum and the sum of squares
    of the first floating-point tensor, enough to tell which module fed which."""
    import torch

    from fixture_common import decoder_stack

    layer = decoder_stack(model)["layers"][0]
    events = []

    def checksum(value):
        if isinstance(value, (tuple, list)):
            value = next((v for v in value if torch.is_tensor(v) and v.is_floating_point()), None)
        if not torch.is_tensor(value) or not value.is_floating_point():
            return None
        v = value.detach().double()
        return [round(float(v.sum()), 6), round(float((v * v).sum()), 6)]

    handles = []
    for name, module in layer.named_modules():
        def enter(module, args, kwargs, name=name):
            first = args[0] if args else next(iter(kwargs.values()), None)
            events.append({"event": "enter", "module": name, "class": type(module).__name__,
                           "input": checksum(first)})

        def exit(module, args, kwargs, output, name=name):
            events.append({"event": "exit", "module": name, "class": type(module).__name__,
                           "output": checksum(output)})

        handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(module.register_forward_hook(exit, with_kwargs=True))
    ids = torch.arange(1, 9).unsqueeze(0) % vocab_size
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return events


def attention_scale(model, vocab_size):
    """The factor on q·k in decoder layer 0's attention, as Transformers computes it: the
    attention weights it returns (eager attention) fitted against the queries and keys
    its projections output, row by row, `log p_ij = s * q_i·k_j + c_i`. q and k are the
    outputs of the layer's first two linear projections (or the first two thirds of a
    fused one). `{"scale": s, "residual": max misfit}`, or None where the model returns
    no weights or no q/k split fits (RoPE or ALiBi between them, per-head packing): then
    the tool reads the scale from the config or the fixtures instead."""
    import torch

    from fixture_common import decoder_stack

    try:
        model.set_attn_implementation("eager")
    except Exception:
        pass
    layer = decoder_stack(model)["layers"][0]
    outputs = []
    handles = [
        m.register_forward_hook(lambda m, a, o: outputs.append(o.detach().double()))
        for m in layer.modules()
        if type(m).__name__ in ("Linear", "Conv1D")
    ]
    ids = torch.arange(1, 13).unsqueeze(0) % vocab_size
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    attentions = getattr(out, "attentions", None)
    if not attentions or attentions[0] is None or len(outputs) < 2:
        return None
    probs = attentions[0][0].double()  # [heads, T, T]
    heads, t = probs.shape[0], probs.shape[-1]
    first = outputs[0][0]
    splits = [(outputs[0][0], outputs[1][0])]
    if first.shape[-1] % 3 == 0:
        third = first.shape[-1] // 3
        splits.append((first[:, :third], first[:, third:2 * third]))
    best = None
    for q, k in splits:
        if q.shape[-1] % heads or k.shape[-1] != q.shape[-1]:
            continue
        if q.shape[0] != t or k.shape[0] != t:
            # The projections saw other rows than the attention weights cover (CPM-Ant
            # puts prompt positions before the tokens): no fit.
            continue
        dim = q.shape[-1] // heads
        q = q.reshape(t, heads, dim).transpose(0, 1)
        k = k.reshape(t, heads, dim).transpose(0, 1)
        dots = q @ k.transpose(-1, -2)  # [heads, T, T]
        xs, ys = [], []
        for i in range(2, t):
            d = dots[:, i, : i + 1]
            lp = probs[:, i, : i + 1].clamp_min(1e-300).log()
            xs.append(d - d.mean(-1, keepdim=True))
            ys.append(lp - lp.mean(-1, keepdim=True))
        x, y = torch.cat(xs, -1).flatten(), torch.cat(ys, -1).flatten()
        scale = float((x * y).sum() / (x * x).sum())
        residual = float((y - scale * x).abs().max())
        if best is None or residual < best["residual"]:
            best = {"scale": round(scale, 6), "residual": residual}
    return best if best is not None and best["residual"] < 1e-4 else None


def position_bias(model, vocab_size):
    """ALiBi, read from what decoder layer 0's attention computes: one token repeated, so
    every position has the same hidden state and queries and keys differ only by where
    they are. The score steps between neighbouring keys, `log p[h, i, j] − log p[h, i,
    j−1]` (eager attention weights), are then zero without positional information, vary
    with RoPE or learned positions, and are one constant per head — its slope — with a
    linear bias `slope · (j − i)` on the scores. `{"slopes": [...], "residual": max
    deviation}` when every head's steps are one nonzero constant; else None."""
    import torch

    try:
        model.set_attn_implementation("eager")
    except Exception:
        pass
    ids = torch.full((1, 12), 1 % vocab_size, dtype=torch.long)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True)
    except Exception:
        return None
    attentions = getattr(out, "attentions", None)
    if not attentions or attentions[0] is None:
        return None
    logp = attentions[0][0].double().clamp_min(1e-300).log()  # [heads, T, T]
    heads, t = logp.shape[0], logp.shape[-1]
    slopes, residual = [], 0.0
    for h in range(heads):
        steps = torch.cat([logp[h, i, 1 : i + 1] - logp[h, i, :i] for i in range(1, t)])
        slope = float(steps.mean())
        residual = max(residual, float((steps - slope).abs().max()))
        slopes.append(slope)
    if residual > 1e-4 * max(1e-12, max(abs(s) for s in slopes)) or min(abs(s) for s in slopes) < 1e-6:
        return None
    return {"slopes": [round(s, 9) for s in slopes], "residual": residual}


ACTIVATIONS = {
    "silu": lambda x, F: F.silu(x),
    "gelu": lambda x, F: F.gelu(x),
    "gelu_pytorch_tanh": lambda x, F: F.gelu(x, approximate="tanh"),
    "relu": lambda x, F: F.relu(x),
    "relu2": lambda x, F: F.relu(x) ** 2,
}


def mlp_activation(model):
    """The activation decoder layer 0's MLP applies, by what it computes: each
    parameterless module inside the MLP other than a linear or dropout is run on a range
    of values and compared with the activations the blocks know (BLOOM's `BloomGelu` is
    the tanh GELU). The name (as `hidden_act` spells it), or None."""
    import torch
    import torch.nn.functional as F

    from fixture_common import decoder_stack

    layer = decoder_stack(model)["layers"][0]
    x = torch.linspace(-6, 6, 241, dtype=torch.float32)
    for name, module in layer.named_modules():
        if not name or "mlp" not in name.split(".")[0].lower() and "ffn" not in name.lower():
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Dropout)) or list(module.parameters()) or list(module.children()):
            continue
        try:
            with torch.no_grad():
                y = module(x)
        except Exception:
            continue
        for act, f in ACTIVATIONS.items():
            if torch.allclose(y, f(x, F), rtol=0, atol=1e-6):
                return act
    return None


def norm_scales_by_one_plus_weight(model):
    """Whether the final norm scales by `1 + weight` (the weight an offset from one): run it
    with its weight (and bias) zeroed on random input; a norm that scales by the weight
    gives zeros. `None` when the model has no such norm."""
    import torch

    from fixture_common import decoder_stack

    norm = decoder_stack(model)["norm"]
    weight = getattr(norm, "weight", None)
    if norm is None or weight is None:
        return None
    saved = {name: p.detach().clone() for name, p in norm.named_parameters()}
    try:
        with torch.no_grad():
            for p in norm.parameters():
                p.zero_()
            x = torch.randn(2, 3, weight.shape[-1], generator=torch.Generator().manual_seed(0))
            out = norm(x)
        return bool(out.abs().max() > 1e-3)
    finally:
        with torch.no_grad():
            for name, p in norm.named_parameters():
                p.copy_(saved[name])


def checkpoint_conversions(model_type: str) -> dict:
    """How Transformers converts the family's Hub checkpoints to its own module names.

    renamings: [[from, to]] substrings Transformers renames on load (Mixtral's
    `.block_sparse_moe.` -> `.mlp.`); experts: the Hub name of each expert projection
    Transformers stacks into its fused `experts.gate_up_proj` (gate first, then up) and
    `experts.down_proj` ({"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}), read
    from the source patterns `...experts.*.<name>.weight`. Empty when the family has no
    conversion mapping.
    """
    import re

    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return {"renamings": [], "experts": {}}
    renamings, experts = [], {}
    for conversion in get_checkpoint_conversion_mapping(model_type) or []:
        sources = conversion.source_patterns
        sources = [sources] if isinstance(sources, str) else list(sources)
        targets = conversion.target_patterns
        targets = [targets] if isinstance(targets, str) else list(targets)
        names = [m.group(1) for m in (re.search(r"experts\.\*\.(\w+)\.weight$", s) for s in sources) if m]
        if len(targets) == 1 and names and len(names) == len(sources):
            if targets[0].endswith("experts.gate_up_proj") and len(names) == 2:
                experts.update(gate_proj=names[0], up_proj=names[1])
                continue
            if targets[0].endswith("experts.down_proj") and len(names) == 1:
                experts["down_proj"] = names[0]
                continue
        if type(conversion).__name__ == "WeightRenaming" and len(sources) == 1 and len(targets) == 1:
            # Plain names only (escaped dots allowed): no anchors, groups or lookbehinds.
            if re.fullmatch(r"(?:\w|\\\.|\.)+", sources[0]) and re.fullmatch(r"[\w.]+", targets[0]):
                renamings.append([sources[0].replace("\\.", "."), targets[0]])
    return {"renamings": renamings, "experts": experts}


ROUTING_COMPARISON = r"""(?:self|config)\.(\w+)\s*==\s*["'](\w+)["']"""


def routing_probes(architecture, small, build_config, tiny_model, model_type, fields):
    """What the router of the first sparse layer computes, for the routing settings the
    config class has.

    Each probe builds the tiny model with 16 experts, 3 per token and, where the class has
    them, `n_group` 4, `topk_group` 2, `routed_scaling_factor` 2.5, each value of
    `norm_topk_prob` and each value a string field is compared with in the modeling code
    (`topk_method == "greedy"`); every router vector beside its weight (a score-correction
    bias), and every vector of the MoE block itself, is drawn at random. It records, for 12 tokens, the router's logits (its input
    times its weight, in f32), those vectors, and the expert indices and weights the
    experts module is called with. The port tool finds the routing function (softmax or
    sigmoid scores, group-limited choice, correction bias, renormalization, scaling) that
    reproduces every probe. [] when the model has no stacked experts module.
    """
    import inspect
    import re

    import torch

    # Under the class's own names too (ERNIE 4.5's `moe_num_experts`, `moe_k`).
    attribute_map = dict(getattr(type(build_config(model_type, small)), "attribute_map", {}) or {})

    def own(name):
        return name if name in fields else attribute_map.get(name)

    counts = [own(n) for n in ("num_experts", "num_local_experts", "n_routed_experts") if own(n) in fields]
    per_token = [own(n) for n in ("num_experts_per_tok", "moe_topk") if own(n) in fields]
    if not counts or not per_token:
        return []
    base = {**small, counts[0]: 16, per_token[0]: 3}
    if "n_group" in fields and "topk_group" in fields:
        base.update(n_group=4, topk_group=2)
    # The factor on the chosen weights, under either name (AFMoE's `route_scale`).
    for scale in ("routed_scaling_factor", "route_scale", "router_scaling_factor"):
        if scale in fields:
            base[scale] = 2.5
            break
    options = []
    if "norm_topk_prob" in fields:
        options.append(("norm_topk_prob", [False, True]))
    module = inspect.getmodule(tiny_model(architecture, build_config(model_type, small)))
    source = inspect.getsource(module) if module is not None else ""
    compared = {}
    for field, value in re.findall(ROUTING_COMPARISON, source):
        if fields.get(field, {}).get("kind") == "str" and value not in compared.get(field, []):
            compared.setdefault(field, []).append(value)
    options.extend(sorted(compared.items()))
    probes = []
    names = [n for n, _ in options]
    for combination in itertools.product(*(values for _, values in options)):
        overrides = {**base, **dict(zip(names, combination))}
        entry = {"config": {k: overrides[k] for k in sorted(overrides) if small.get(k) != overrides[k]}}
        try:
            torch.manual_seed(7)
            model = tiny_model(architecture, build_config(model_type, overrides))
        except Exception as error:  # the class refuses the value
            entry["error"] = f"{type(error).__name__}: {error}"[:200]
            probes.append(entry)
            continue
        found = _record_routing(model, torch)
        if found is None:
            return []
        entry.update(found)
        probes.append(entry)
    return probes


def _first_expert_block(model):
    """The first stacked experts module (`<block>.experts` holding `gate_up_proj`) and the
    block that holds it: `(block_name, experts, block)`, or None."""
    named = dict(model.named_modules())
    for name, experts in named.items():
        if name.endswith(".experts") and hasattr(experts, "gate_up_proj"):
            block_name = name.rsplit(".", 1)[0]
            return block_name, experts, named[block_name]
    return None


def _record_routing(model, torch):
    """The first stacked experts module's router logits, vectors, indices and weights."""
    found = _first_expert_block(model)
    if found is None:
        return None
    block_name, experts, block = found
    router_name, router = next(
        ((n, m) for n, m in block.named_children() if n in ("gate", "router")), (None, None)
    )
    if router is None:
        return None
    # The router's linear layer: the router itself, or its `gate` (AFMoE's `router.gate`).
    linear = router if isinstance(getattr(router, "weight", None), torch.Tensor) else getattr(router, "gate", None)
    if linear is None or not isinstance(getattr(linear, "weight", None), torch.Tensor):
        return None
    vectors = {}
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        # A router initialised to zeros (AFMoE's) gives every expert the same logit, which
        # every routing reproduces: drawn at random instead.
        if float(linear.weight.abs().max()) == 0.0:
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * linear.weight.shape[-1] ** -0.5)
        for vname, tensor in list(router.named_parameters()) + list(router.named_buffers()):
            # A vector, or one row of them (ERNIE 4.5's `[1, experts]` routing bias).
            if vname in ("weight", "bias") or linear is not router and vname.startswith("gate."):
                continue
            if tensor.dim() not in (1, 2) or tensor.dim() == 2 and tensor.shape[0] != 1:
                continue
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
            vectors[vname] = tensor.reshape(-1).tolist()
        # A vector the block itself holds and hands to its router (LFM2-MoE's `expert_bias`).
        own = list(block.named_parameters(recurse=False)) + list(block.named_buffers(recurse=False))
        for vname, tensor in own:
            if tensor.dim() != 1 or not tensor.is_floating_point() or vname in vectors:
                continue
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
            vectors[vname] = tensor.tolist()
    seen = {}

    def block_input(_module, args):
        seen.setdefault("x", args[0].detach().reshape(-1, args[0].shape[-1]).float())

    def experts_call(_module, args, kwargs):
        values = list(args[1:]) + [kwargs[k] for k in ("top_k_index", "top_k_weights") if k in kwargs]
        seen.setdefault("call", values)

    hooks = [
        block.register_forward_pre_hook(block_input),
        experts.register_forward_pre_hook(experts_call, with_kwargs=True),
    ]
    ids = torch.arange(1, 13).unsqueeze(0) % model.config.vocab_size
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    if "call" not in seen or len(seen["call"]) < 2:
        return None
    indices, weights = seen["call"][:2]
    if indices.is_floating_point():
        indices, weights = weights, indices
    logits = torch.nn.functional.linear(seen["x"], linear.weight.float())
    if getattr(linear, "bias", None) is not None:
        logits = logits + linear.bias.float()
    return {
        "layer": int(block_name.split(".")[2]),
        "router": f"{block_name}.{router_name}",
        "logits": logits.tolist(),
        "vectors": vectors,
        "indices": indices.tolist(),
        "weights": weights.float().tolist(),
    }


def derived_layer_lists(config_class, fields):
    """`{field: [...]}`: the per-layer lists of strings (Glm4MoeLite's `mlp_layer_types`)
    the class derives for 12 layers when the config leaves the field null."""
    found = {}
    try:
        config = config_class(num_hidden_layers=PROBE_LAYERS)
    except Exception:  # the class needs more than the layer count
        return found
    for name, field in sorted(fields.items()):
        if field.get("default") is not None or name == "layer_types":
            continue
        value = getattr(config, name, None)
        if (
            isinstance(value, (list, tuple))
            and len(value) == PROBE_LAYERS
            and all(isinstance(v, str) for v in value)
        ):
            found[name] = list(value)
    return found


# --------------------------------------------------------------------------- attention reach

# Tokens of the prompt the attention reach is measured on.
REACH_PROMPT = 16


def attention_reach(model, vocab_size):
    """Per decoder layer, how many tokens (itself included) a query sees, measured on the
    attention weights Transformers computes (eager): None where the last query sees the
    whole REACH_PROMPT-token prompt, else the window. A family whose config has no
    `layer_types` but whose layers slide (GPT-Neo's `attention_types`) shows it here."""
    import torch

    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    ids = (torch.arange(REACH_PROMPT)[None] * 7 + 3) % vocab_size
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    reach = []
    for weights in out.attentions or []:
        if weights is None:
            return None
        seen = weights[0].abs().amax(0)[-1] > 0  # the last query, over all heads
        width = REACH_PROMPT - int(seen.nonzero()[0, 0])
        reach.append(None if width == REACH_PROMPT else width)
    return reach or None


def window_field(architecture, small, build_config, tiny_model, model_type, fields, window, divisor=1):
    """The integer field that, set to `window`, makes some layer see only `window` tokens:
    the family's sliding window under its own name (GPT-Neo's `window_size`), or None.
    Only fields the tiny config leaves at a default larger than the prompt are tried."""
    for name, field in sorted(fields.items()):
        default = field.get("default")
        # A field the tiny config sets is tried only at the probe's own value (a committed
        # spec's base config already holds the window found before).
        if (name in small and small[name] != window * divisor) or name.endswith("token_id") or isinstance(default, bool):
            continue
        if not isinstance(default, int) or default <= REACH_PROMPT:
            continue
        try:
            config = build_config(model_type, {**small, name: window * divisor})
            reach = attention_reach(tiny_model(architecture, config), config.vocab_size)
        except Exception:  # noqa: BLE001 - a value the class refuses tells nothing
            continue
        if reach and window in reach:
            return name
    return None


def reach_layer_types(reach):
    return ["full_attention" if r is None else "sliding_attention" for r in reach]


def reached_layer_type_probes(architecture, small, build_config, tiny_model, model_type, field, window, layers):
    """`layer_type_probes` for a family without `layer_types`: the layer types its tiny model
    computes (attention reach) with `layers` layers, the config's per-layer pattern fields
    scaled to them. The probe's config names the window `sliding_window`."""
    import transformers

    own = dict(type(build_config(model_type, small)).attribute_map).get("num_hidden_layers", "num_hidden_layers")
    # The tiny config's patterns are fitted to its own layer count: dropped, to be refitted.
    base = {k: v for k, v in small.items() if not (isinstance(v, list) and any(isinstance(x, list) for x in v))}
    config = fit_layer_patterns(model_type, {**base, own: layers, field: window}, build_config)
    built = build_config(model_type, config)
    reach = attention_reach(tiny_model(architecture, built), built.vocab_size)
    if not reach:
        return []
    shown = {"num_hidden_layers": layers, "sliding_window": window}
    return [{"config": shown, "layer_types": reach_layer_types(reach)}]


def fit_layer_patterns(model_type, config, build_config):
    """`config` with the counts in the class's per-layer pattern fields scaled to its layer
    count, where the class refuses it otherwise (GPTNeoConfig expands `attention_types`
    [[["global", "local"], 12]] to 24 layers and requires as many as `num_layers`)."""
    try:
        build_config(model_type, config)
        return config
    except Exception as error:  # noqa: BLE001
        refusal = error
    full = build_config(model_type, {})
    layers = config.get("num_hidden_layers")
    if layers is None:
        own = dict(type(full).attribute_map).get("num_hidden_layers")
        layers = config.get(own)
    ratio = layers / full.num_hidden_layers

    def scaled(value):
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return max(1, round(value * ratio))
        if isinstance(value, (list, tuple)):
            return [scaled(v) for v in value]
        return value

    def has_count(value):
        if isinstance(value, (list, tuple)):
            return any(has_count(v) for v in value)
        return isinstance(value, int) and not isinstance(value, bool)

    for name, value in sorted(full.to_dict().items()):
        if name in config or not isinstance(value, (list, tuple)) or not has_count(value):
            continue
        fitted = {**config, name: scaled(value)}
        try:
            build_config(model_type, fitted)
        except Exception:  # noqa: BLE001
            continue
        return fitted
    raise refusal


def null_width_per_hidden(architecture, small, build_config, tiny_model, model_type, fields):
    """How many times hidden_size the MLP is when `intermediate_size` is null (GPT-Neo: 4),
    read from the parameter shapes of a tiny model built so; None where the class has no
    such field, its default is set, or the width does not follow hidden_size."""
    field = fields.get("intermediate_size")
    if field is None or field["default"] is not None:
        return None
    try:
        config = build_config(model_type, {**small, "intermediate_size": None})
        shapes = {n: tuple(p.shape) for n, p in tiny_model(architecture, config).state_dict().items()}
    except Exception:  # noqa: BLE001 - a class that refuses null has no such rule
        return None
    base = {n: tuple(p.shape) for n, p in tiny_model(architecture, build_config(model_type, small)).state_dict().items()}
    hidden = config.hidden_size
    for name, shape in shapes.items():
        if base.get(name) != shape:
            for dim in shape:
                if dim not in base[name] and dim % hidden == 0:
                    return dim // hidden
    return None


def per_layer_field(resolved, reach):
    """The resolved config's attribute that names each layer's attention (GPT-Neo's
    `attention_layers`, derived from `attention_types`), where the class has no
    `layer_types`: a list of one string per layer that tells the layers apart exactly as
    the measured reach does; None where there is none."""
    if not reach:
        return None
    kinds = reach_layer_types(reach)
    for name, value in sorted(resolved.to_dict().items()):
        if name == "layer_types" or not isinstance(value, (list, tuple)) or len(value) != len(kinds):
            continue
        if not all(isinstance(v, str) for v in value):
            continue
        pairs = set(zip(value, kinds))
        if len(pairs) == len({v for v, _ in pairs}) == len({k for _, k in pairs}):
            return name
    return None


# Positions the RoPE probe reads (one token repeated): enough angles to fit a base.
ROTARY_PROMPT = 12


def _attention_queries(model, vocab_size):
    """The queries decoder layer 0's attention multiplies with its keys, `[heads, T, D]`,
    for one token repeated ROTARY_PROMPT times, as the op Transformers runs receives them
    (eager attention: the first batched matmul of a `[.., T, D]` by a `[.., D, T]`; or a
    fused attention kernel's query). None where no such op runs."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    t = ROTARY_PROMPT
    found = []

    class Queries(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not found:
                name = func.__name__ if hasattr(func, "__name__") else str(func)
                tensors = [a for a in args if torch.is_tensor(a)]
                if "scaled_dot_product" in str(func) and len(tensors) >= 2:
                    q = tensors[0]
                    if q.dim() >= 3 and q.shape[-2] == t:
                        found.append(q.detach().reshape(-1, t, q.shape[-1]).clone())
                elif name.startswith(("bmm", "baddbmm")):
                    a, b = tensors[-2], tensors[-1]
                    if a.dim() == 3 and a.shape[-2] == t and b.shape[-1] == t and a.shape[-1] == b.shape[-2]:
                        found.append(a.detach().clone())
            return func(*args, **kwargs)

    before = getattr(model.config, "_attn_implementation", None)
    try:
        model.set_attn_implementation("eager")
    except Exception:  # noqa: BLE001 - a model without the switch runs its own attention
        pass
    ids = torch.full((1, t), 7 % vocab_size)
    try:
        with torch.no_grad(), Queries():
            model(input_ids=ids)
    except Exception:  # noqa: BLE001 - a model that does not run tells nothing
        return None
    finally:
        if before is not None:
            try:
                model.set_attn_implementation(before)
            except Exception:  # noqa: BLE001
                pass
    return found[0].double() if found else None


def rotary_probe(model, vocab_size):
    """RoPE as decoder layer 0 computes it, read from its queries: one token repeated, so
    every position's query before RoPE is the same and position 0's is unrotated. The
    features that change with the position rotate (`dims`, a prefix of the head), in
    pairs whose norm is kept: the two halves (`pairs` false) or adjacent features
    (`pairs` true); the angle of pair i at position 1 is its frequency `base^(-2i/dims)`,
    from which `base` is fitted, and its sign the direction (`reversed` where negative). `{"dims": 0}` where nothing rotates, None where the
    queries are not found or rotate some other way."""
    import math

    q = _attention_queries(model, vocab_size)
    if q is None:
        return None
    heads, t, head_dim = q.shape
    scale = float(q.abs().max())
    if scale == 0.0:
        return None
    moved = ((q - q[:, :1]).abs().amax(dim=(0, 1)) > 1e-5 * scale).tolist()
    dims = sum(moved)
    if dims == 0:
        return {"dims": 0, "head_dim": head_dim}
    if moved[:dims] != [True] * dims or dims % 2:
        return None
    half = dims // 2
    layouts = {
        False: (list(range(half)), list(range(half, dims))),
        True: (list(range(0, dims, 2)), list(range(1, dims, 2))),
    }
    for pairs, (first, second) in layouts.items():
        a, b = q[:, :, first], q[:, :, second]
        norms = (a * a + b * b).sqrt()
        if (norms - norms[:, :1]).abs().max() > 1e-5 * scale:
            continue
        # The angle each pair turned by from position 0 to 1, over all heads.
        z0 = a[:, 0] + 1j * b[:, 0]
        z1 = a[:, 1] + 1j * b[:, 1]
        turned = (z1 * z0.conj()).sum(0)
        angles = [math.atan2(float(z.imag), float(z.real)) for z in turned]
        omega = [abs(a) for a in angles]
        if omega[0] == 0.0 or any(w <= 0.0 for w in omega):
            return None
        # omega_i = omega_0 * base^(-2i/dims): a least-squares slope of log omega over i.
        if half == 1:
            base = None
        else:
            xs = [2 * i / dims for i in range(half)]
            ys = [math.log(w) for w in omega]
            mx, my = sum(xs) / half, sum(ys) / half
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            base = math.exp(-slope)
            base = float(round(base)) if abs(base - round(base)) < 1e-3 * base else round(base, 3)
        found = {
            "dims": dims,
            "head_dim": head_dim,
            "pairs": pairs,
            "base": base,
            "first_frequency": round(omega[0], 6),
        }
        # Turning by -θ (NanoChat's `rotate_half` returns (x2, -x1)): every pair's angle
        # is negative where Llama's are positive.
        if all(a < 0.0 for a in angles):
            found["reversed"] = True
        return found
    return None


def rotary_dims_field(architecture, small, build_config, tiny_model, model_type, fields, probe):
    """The integer field that names the rotated width in features (GPT-J's `rotary_dim`):
    among the fields whose tiny value equals the measured `dims`, the one that, set to
    another even width, makes the queries rotate that many features. None if no field
    does (a share of the head, `partial_rotary_factor`, is read as such)."""
    if not probe or not probe.get("dims"):
        return None
    dims = probe["dims"]
    other = dims // 2 if dims % 4 == 0 else dims + 2
    resolved = build_config(model_type, small).to_dict()
    for name, field in sorted(fields.items()):
        if field.get("kind") != "int" or name in COMMON_SIZES or resolved.get(name) != dims:
            continue
        try:
            config = build_config(model_type, {**small, name: other})
            probed = rotary_probe(tiny_model(architecture, config), config.vocab_size)
        except Exception:  # noqa: BLE001 - a value the class refuses tells nothing
            continue
        if probed and probed.get("dims") == other:
            return name
    return None


def _fused_qkv_rows(model, vocab_size):
    """Which output row of decoder layer 0's fused q/k/v projection each query, key and
    value feature is: the projection's output replaced by its row numbers (1, 2, ...), the
    attention's inputs read back (`[heads, D]` each, position 0: RoPE has not turned it).
    Queries and keys are read where a per-head norm takes them (its input), else where the
    attention multiplies them. None without one fused projection."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from fixture_common import decoder_stack

    layer = decoder_stack(model)["layers"][0]
    linears = [
        (n, m) for n, m in layer.named_modules()
        if type(m).__name__ in ("Linear", "Conv1D") and ("attn" in n or "attention" in n)
    ]
    if not linears:
        return None
    fused_name, fused = linears[0]
    out_features = getattr(fused, "out_features", None) or fused.weight.shape[-1]
    hidden = model.config.hidden_size
    if out_features <= hidden or out_features % 3:
        return None
    t = 4
    index = torch.arange(1, out_features + 1, dtype=torch.float32)

    def replace(module, args, output):
        return index.expand(output.shape).clone()

    head_inputs = []

    def record(module, args, name):
        if args and torch.is_tensor(args[0]):
            head_inputs.append((name, args[0].detach().clone()))

    head_dim = out_features // 3 // model.config.num_attention_heads
    handles = [fused.register_forward_hook(replace)]
    for name, module in layer.named_modules():
        if name.startswith(fused_name.rsplit(".", 1)[0]) and module is not fused and len(list(module.children())) == 0:
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: record(m, a, name)))
    found = []

    class Operands(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            if name.startswith(("bmm", "baddbmm")) and len(found) < 2:
                tensors = [a for a in args if torch.is_tensor(a)]
                found.append((tensors[-2].detach().clone(), tensors[-1].detach().clone()))
            return func(*args, **(kwargs or {}))

    before = getattr(model.config, "_attn_implementation", None)
    try:
        model.set_attn_implementation("eager")
    except Exception:  # noqa: BLE001
        pass
    try:
        with torch.no_grad(), Operands():
            model(input_ids=torch.full((1, t), 3 % vocab_size))
    except Exception:  # noqa: BLE001 - a model that does not run tells nothing
        return None
    finally:
        for h in handles:
            h.remove()
        if before is not None:
            try:
                model.set_attn_implementation(before)
            except Exception:  # noqa: BLE001
                pass
    if len(found) < 2:
        return None
    (q, kt), (_, v) = found
    q, k, v = q[:, 0], kt.transpose(-1, -2)[:, 0], v[:, 0]  # [heads, D] at position 0
    heads = model.config.num_attention_heads
    # Per-head modules fed the queries and keys as projected (every position alike: before
    # RoPE), e.g. q/k norms.
    per_head = [
        (n, x) for n, x in head_inputs
        if x.dim() == 4 and tuple(x.shape[-3:]) == (t, heads, head_dim) and bool((x == x[:, :1]).all())
    ]
    rows = {}
    if len(per_head) >= 2:
        (qn, q), (kn, k) = ((n, x[0, 0]) for n, x in per_head[:2])
        rows["modules"] = {"q": qn, "k": kn}
    for part, x in (("q", q), ("k", k), ("v", v)):
        r = x.round()
        if (r - x).abs().max() > 1e-3 or r.min() < 1:
            return None
        rows[part] = [int(i) - 1 for i in r.flatten().tolist()]
    return rows


def fused_qkv_layout(architecture, small, build_config, tiny_model, model_type, fields):
    """How decoder layer 0's fused q/k/v projection lays out its output rows:
    `{"groups": g, "order": "qkv"|"qvk"|...}` where the rows are g groups, each holding
    its share of the heads' queries, then keys, then values in `order` (1 group: all
    queries, then all keys, then all values; one per head: GPT-NeoX's per-head rows;
    CodeGen: 4 groups of query, value, key). `groups` is `"heads"` where it follows the
    head count (probed at two), else the number. None without a fused projection, or one
    laid out otherwise. `before_rope` names the per-head modules (q/k norms) fed the
    projected queries and keys, before RoPE."""
    import itertools

    heads_field = next((f for f in ("num_attention_heads", "n_head") if f in small), None)
    if heads_field is None:
        return None
    results = []
    for scale in (1, 2):
        config = dict(small)
        config[heads_field] = small[heads_field] * scale
        for kv in ("num_key_value_heads", "multi_query_group_num"):
            if kv in config and config[kv] is not None:
                config[kv] = config[kv] * scale
        try:
            built = build_config(model_type, config)
            rows = _fused_qkv_rows(tiny_model(architecture, built), built.vocab_size)
        except Exception:  # noqa: BLE001 - a config the class refuses tells nothing
            return None
        if rows is None:
            return None
        heads = config[heads_field]
        total = len(rows["q"]) + len(rows["k"]) + len(rows["v"])
        if not (len(rows["q"]) == len(rows["k"]) == len(rows["v"])):
            return None
        head_dim = len(rows["q"]) // heads
        match = None
        for groups in (g for g in range(1, heads + 1) if heads % g == 0):
            for order in itertools.permutations("qkv"):
                share = total // 3 // groups
                expected = {
                    part: [g * 3 * share + order.index(part) * share + i for g in range(groups) for i in range(share)]
                    for part in "qkv"
                }
                if all(expected[p] == rows[p] for p in "qkv"):
                    match = (groups, "".join(order))
                    break
            if match:
                break
        if match is None:
            return None
        results.append((match, heads, head_dim, rows.get("modules")))
    ((g1, o1), h1, _, modules), ((g2, o2), h2, _, _) = results
    if o1 != o2:
        return None
    if g1 == 1 and g2 == 1:
        layout = {"groups": 1, "order": o1}
    elif g1 == h1 and g2 == h2:
        layout = {"groups": "heads", "order": o1}
    elif g1 == g2:
        layout = {"groups": g1, "order": o1}
    else:
        return None
    if modules:
        layout["before_rope"] = modules
    return layout


# Layer counts a model is also built with to tell which layers hold a parameter (the tiny
# model has 2: "the last" and "layer 1" only part there).
PRESENCE_LAYERS = (3, 5)


def layer_presence_probes(architecture, small, build_config, tiny_model, model_type, layers_path):
    """Parameters only some decoder layers hold (GPT-NeoX-Japanese's `attention.dense_bias`,
    built on the last layer only): the model built with each of PRESENCE_LAYERS layers, and
    for each parameter name under a layer (`attention.dense_bias`) that not every layer
    holds, the indices of the layers that do. `[{"num_hidden_layers", "partial": {name:
    [indices]}}]` (or `"error"` where the class refuses the count)."""
    import re

    pattern = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.(.+)$")
    probes = []
    for count in PRESENCE_LAYERS:
        entry = {"num_hidden_layers": count}
        try:
            model = tiny_model(architecture, build_config(model_type, {**small, "num_hidden_layers": count}))
        except Exception as error:  # noqa: BLE001 - the class refuses the count
            entry["error"] = f"{type(error).__name__}: {error}"[:200]
            probes.append(entry)
            continue
        held = {}
        for name in model.state_dict():
            match = pattern.match(name)
            if match:
                held.setdefault(match.group(2), set()).add(int(match.group(1)))
        entry["partial"] = {name: sorted(layers) for name, layers in sorted(held.items()) if len(layers) != count}
        probes.append(entry)
    return probes


def bare_biases(model, vocab_size):
    """Bare vectors that act as a projection's bias (GPT-NeoX-Japanese's
    `attention.dense_bias`, added to `dense`'s output by the layer): a 1-D parameter of a
    module with a bias-free `Linear` child of that output width, such that moving a random
    vector from the parameter into the Linear's bias leaves the logits as they are, while
    the vector itself moves them. `{parameter: linear}` (full names)."""
    import torch

    ids = torch.arange(1, 9).unsqueeze(0) % vocab_size
    candidates = []
    for owner_name, owner in model.named_modules():
        linears = [
            (name, child) for name, child in owner.named_children()
            if isinstance(child, torch.nn.Linear) and child.bias is None
        ]
        for name, param in owner.named_parameters(recurse=False):
            for child_name, child in linears:
                if param.dim() == 1 and param.shape[0] == child.out_features:
                    prefix = f"{owner_name}." if owner_name else ""
                    candidates.append((f"{prefix}{name}", param, f"{prefix}{child_name}", child))
    found = {}
    with torch.no_grad():
        for name, param, child_name, child in candidates:
            saved = param.detach().clone()
            vector = torch.randn(param.shape, generator=torch.Generator().manual_seed(0))
            param.copy_(vector)
            as_param = model(input_ids=ids).logits.double()
            param.zero_()
            without = model(input_ids=ids).logits.double()
            child.bias = torch.nn.Parameter(vector.clone())
            as_bias = model(input_ids=ids).logits.double()
            child.bias = None
            param.copy_(saved)
            effect = (as_param - without).abs().max().item()
            moved = (as_param - as_bias).abs().max().item()
            # The same sum in another order: float32 rounding, far below the vector's effect.
            if effect > 1e-3 and moved <= 1e-4 * effect:
                found[name] = child_name
    return found


def rope_legacy_names(config_class, fields):
    """Keys of Hub configs the class converts into its RoPE parameters without declaring
    them (GPT-NeoX's `rotary_emb_base` → `rope_theta`, `rotary_pct` →
    `partial_rotary_factor`): the names its `convert_rope_params_to_dict` takes out of the
    keyword arguments, each kept only where the class, given it, puts that very value into
    `rope_parameters`. `{own name: rope_parameters key}`."""
    import inspect
    import re

    convert = getattr(config_class, "convert_rope_params_to_dict", None)
    try:
        source = inspect.getsource(convert) if convert is not None else ""
    except (OSError, TypeError):
        return {}
    named = set(re.findall(r"kwargs\.(?:pop|get)\(\s*[\"'](\w+)[\"']", source))
    try:
        base = dict(config_class().rope_parameters or {})
    except Exception:  # noqa: BLE001
        return {}
    found = {}
    for name in sorted(named - set(fields) - {"rope_scaling", "rope_parameters"}):
        for value in (0.375, 4321.0):
            try:
                probe = dict(config_class(**{name: value}).rope_parameters or {})
            except Exception:  # noqa: BLE001 - the class refuses the value
                continue
            keys = [k for k, v in probe.items() if v == value and base.get(k) != value]
            if len(keys) == 1:
                if keys[0] != name:  # the common name itself, read as it is
                    found[name] = keys[0]
                break
    return found


# The step limit of the clamp probe: tight enough that random steps exceed it.
CLAMP_PROBE_LIMIT = (0.0, 0.05)


def step_clamps(architecture, small, build_config, tiny_model, model_type, fields):
    """Whether a recurrent mixer's token-by-token step clamps `dt` to `time_step_limit` as
    its chunked scan of a prompt does: with a tight limit, the logits of one decoded token
    after a cached prompt are compared with the full pass's (equal: the step clamps too;
    Bamba's and Mamba2's `mamba2_selective_state_update` does not). None where the class
    has no `time_step_limit`, the mixer does not read it, or the model takes no cache."""
    import inspect

    import torch
    from transformers import DynamicCache

    if "time_step_limit" not in fields:
        return None
    try:
        config = build_config(model_type, {**small, "time_step_limit": list(CLAMP_PROBE_LIMIT)})
        model = tiny_model(architecture, config)
    except Exception:
        return None
    parameters = inspect.signature(model.forward).parameters
    cache_name = "past_key_values" if "past_key_values" in parameters else "cache_params"
    if cache_name not in parameters:
        return None
    ids = torch.arange(9, dtype=torch.int64)[None] % config.vocab_size
    positions = {"position_ids": torch.arange(8, 9)[None]} if "position_ids" in parameters else {}
    unlimited = tiny_model(architecture, build_config(model_type, small))
    try:
        with torch.no_grad():
            full = model(input_ids=ids).logits[0, -1]
            # A mixer that ignores the field (Nemotron-H clamps to its own range) tells nothing.
            if torch.equal(full, unlimited(input_ids=ids).logits[0, -1]):
                return None
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :8], use_cache=True, **{cache_name: cache})
            step = model(input_ids=ids[:, 8:], use_cache=True, **{cache_name: cache}, **positions).logits[0, -1]
    except Exception:  # a cache Transformers cannot run for this tiny model
        return None
    gap = float((step - full).abs().max())
    return {"limit": list(CLAMP_PROBE_LIMIT), "step_vs_full_max_abs": gap, "clamps": gap < 1e-4}


# --------------------------------------------------------------------------- null norm fields


def _norm_kind(norm, torch):
    """What a norm module computes, measured on random input with its weight (and bias) as
    they are: `rms` (x / rms(x) · w + b) or `layer` (mean subtracted), the epsilon it
    reads (its `eps` or `variance_epsilon` attribute), whether it has a bias. None when
    neither formula reproduces it."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    bias = getattr(norm, "bias", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(eps, float):
        return None
    x = torch.randn(2, 3, weight.shape[-1], generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    with torch.no_grad():
        out = norm(x).float()
        w = weight.float()
        b = bias.float() if isinstance(bias, torch.Tensor) else 0.0
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w + b
        centred = x - x.mean(-1, keepdim=True)
        layer = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * w + b
    for kind, expected in (("rms", rms), ("layer", layer)):
        if float((out - expected).abs().max()) < 1e-4:
            return {"kind": kind, "eps": eps, "bias": isinstance(bias, torch.Tensor)}
    return None


# Distinct epsilons for the norm fields of a null probe, so that the field a norm reads is
# told apart by its value.
NULL_PROBE_EPS = (2e-5, 3e-5, 4e-5, 6e-5)


def null_norm_probes(architecture, small, build_config, tiny_model, model_type, fields):
    """What a nullable float field of the tiny config does when null, where it changes the
    norms: `[{field, set, null}]`, each side the final norm as `_norm_kind` measures it (a
    null `rms_norm_eps` makes Cohere2-MoE's norms LayerNorms), with the field that sets
    the epsilon then (`eps_field`: every float field ending in `eps` or `epsilon` given a
    value of its own, the one the norm reads). [] where no such field changes the norms."""
    import torch

    from fixture_common import decoder_stack

    eps_fields = sorted(
        n for n, f in fields.items() if f.get("kind") == "float" and n.endswith(("eps", "epsilon")) and n in small
    )
    distinct = {n: NULL_PROBE_EPS[i % len(NULL_PROBE_EPS)] for i, n in enumerate(eps_fields)}
    found = []
    for name, field in sorted(fields.items()):
        if field.get("kind") != "float" or not field.get("nullable") or small.get(name) is None:
            continue
        sides = {}
        for side, value in (("set", distinct.get(name, small[name])), ("null", None)):
            config = {**small, **distinct, name: value}
            try:
                torch.manual_seed(3)
                model = tiny_model(architecture, build_config(model_type, config))
            except Exception:  # noqa: BLE001 - the class refuses a null
                break
            norm = decoder_stack(model)["norm"]
            kind = _norm_kind(norm, torch) if norm is not None else None
            if kind is None:
                break
            kind["eps_field"] = next((n for n, v in distinct.items() if v == kind["eps"] and config[n] == v), None)
            sides[side] = kind
        if len(sides) == 2 and sides["set"] != sides["null"]:
            found.append({"field": name, **sides})
    return found


# --------------------------------------------------------------------------- shared experts


def shared_expert_probes(architecture, small, build_config, tiny_model, model_type, fields):
    """How the first sparse layer's block joins its shared expert to the routed experts:
    for the tiny config and each value a string field is compared with in the modeling
    code, the block's output fitted as `a · routed + b · shared` (least squares over 12
    tokens; `residual` the largest error of the fit). `[{config, routed, shared, residual}]`;
    [] where the block has no ungated shared expert beside stacked experts."""
    import inspect
    import re

    import torch

    try:
        model = tiny_model(architecture, build_config(model_type, small))
    except Exception:  # noqa: BLE001
        return []
    module = inspect.getmodule(model)
    source = inspect.getsource(module) if module is not None else ""
    compared = {}
    for field, value in re.findall(ROUTING_COMPARISON, source):
        if fields.get(field, {}).get("kind") == "str" and value not in compared.get(field, []):
            compared.setdefault(field, []).append(value)
    options = [{}] + [{f: v} for f, values in sorted(compared.items()) for v in values]
    found = []
    for overrides in options:
        try:
            torch.manual_seed(9)
            model = tiny_model(architecture, build_config(model_type, {**small, **overrides}))
        except Exception:  # noqa: BLE001 - the class refuses the value
            continue
        fit = _fit_shared_combination(model, torch)
        if fit is None:
            return []
        found.append({"config": overrides, **fit})
    return found


def _fit_shared_combination(model, torch):
    found = _first_expert_block(model)
    if found is None:
        return None
    block_name, experts, block = found
    children = dict(block.named_children())
    shared = [
        m for n, m in children.items()
        if n.startswith("shared_expert") and not n.endswith("gate") and any(True for _ in m.parameters())
    ]
    if len(shared) != 1 or any(n.endswith("_gate") for n in children):
        return None
    seen = {}

    def keep(key):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen.setdefault(key, out.detach().reshape(-1, out.shape[-1]).double())

        return hook

    hooks = [
        experts.register_forward_hook(keep("routed")),
        shared[0].register_forward_hook(keep("shared")),
        block.register_forward_hook(keep("out")),
    ]
    ids = torch.arange(1, 13).unsqueeze(0) % model.config.vocab_size
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    if len(seen) != 3:
        return None
    basis = torch.stack([seen["routed"].reshape(-1), seen["shared"].reshape(-1)], dim=1)
    target = seen["out"].reshape(-1, 1)
    coefficients = torch.linalg.lstsq(basis, target).solution.reshape(-1)
    residual = float((basis @ coefficients.reshape(-1, 1) - target).abs().max())
    return {
        "routed": round(float(coefficients[0]), 6),
        "shared": round(float(coefficients[1]), 6),
        "residual": residual,
    }


# --------------------------------------------------------------------------- RoPE per layer

# `config.mlp_layer_types[layer_idx] == "dense"`: a per-layer list the modeling code
# compares with a kind.
LAYER_KIND_COMPARISON = r"""(?:self|config)\.(\w+)\[\w+\]\s*==\s*["'](\w+)["']"""


def _layer_queries(model, vocab_size):
    """The queries each attention layer multiplies with its keys (one token repeated
    ROTARY_PROMPT times), in layer order, as `_attention_queries` reads layer 0's."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    t = ROTARY_PROMPT
    found = []

    class Queries(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.__name__ if hasattr(func, "__name__") else str(func)
            tensors = [a for a in args if torch.is_tensor(a)]
            if name.startswith(("bmm", "baddbmm")) and len(tensors) >= 2:
                a, b = tensors[-2], tensors[-1]
                # q · kᵀ: [.., T, D] by [.., D, T] (not the weights times the values, [.., T, T]).
                if a.dim() == 3 and a.shape[-2] == t and b.shape[-1] == t and a.shape[-1] == b.shape[-2] != t:
                    found.append(a.detach().clone())
            return func(*args, **kwargs)

    model.set_attn_implementation("eager")
    ids = torch.full((1, t), 7 % vocab_size)
    with torch.no_grad(), Queries():
        model(input_ids=ids)
    return found


def layer_rope_probes(architecture, small, build_config, tiny_model, model_type, fields):
    """Which layers rotate their queries, where a per-layer list besides `layer_types` (one
    the modeling code compares with a kind: Cohere2-MoE's `mlp_layer_types[i] == "dense"`)
    tells layers apart: a model with a layer of each combination of attention kind and that
    list's kinds, one token repeated (every position's query is the same before RoPE), a
    layer rotating where its queries differ by position. Then each int field of the class
    (not a size) set one above its value, where that changes which layers rotate (Cohere2-
    MoE's dense layers rotate only while `prefix_dense_sliding_window_pattern` is 1).
    `{layer_types, <list>: [...], rotates, fields: [{field, value, rotates}]}`, or None."""
    import torch

    layer_types = small.get("layer_types")
    if "layer_types" not in fields or not layer_types:
        return None
    try:
        model = tiny_model(architecture, build_config(model_type, small))
    except Exception:  # noqa: BLE001
        return None
    compared = _compared_layer_list(model, fields)
    if compared is None:
        return None
    list_field, kinds = compared
    attention = list(dict.fromkeys(layer_types))
    combos = list(itertools.product(attention, kinds))
    config = {
        **small,
        "num_hidden_layers": len(combos),
        "layer_types": [a for a, _ in combos],
        list_field: [k for _, k in combos],
    }

    def rotates(overrides):
        torch.manual_seed(13)
        built = tiny_model(architecture, build_config(model_type, {**config, **overrides}))
        queries = _layer_queries(built, built.config.vocab_size)
        if len(queries) != len(combos):
            return None
        return [bool((q - q[:, :1]).abs().max() > 1e-5 * max(float(q.abs().max()), 1e-30)) for q in queries]

    try:
        base = rotates({})
    except Exception:  # noqa: BLE001
        return None
    if base is None:
        return None
    changed = []
    for name, field in sorted(fields.items()):
        value = config.get(name, field.get("default"))
        if (
            field.get("kind") != "int"
            or type(value) is not int
            or name.endswith("token_id")
            or name in COMMON_SIZES
            or name in config
        ):
            continue
        try:
            other = rotates({name: value + 1})
        except Exception:  # noqa: BLE001 - the class or the model refuses the value
            continue
        if other is not None and other != base:
            changed.append({"field": name, "value": value + 1, "rotates": other})
    return {"layer_types": config["layer_types"], list_field: config[list_field], "list_field": list_field,
            "rotates": base, "fields": changed}


# --------------------------------------------------------------------------- Hub keys for per-layer lists


def layer_list_kwargs(config_class, fields):
    """Keys the config class reads from its keyword arguments without declaring them whose
    value changes the per-layer lists it derives where a config leaves them out
    (`layer_types`, and each list `derived_layer_lists` finds): Cohere2-MoE pops
    `first_k_dense_replace`, which makes the first layers dense and gives them layer types
    of their own. `{name: {"default": value, "lists": [...]}}` for an int default (read
    from the source, `kwargs.pop("first_k_dense_replace", 0)`), probed at default + 2."""
    import ast
    import inspect
    import re

    try:
        source = inspect.getsource(config_class)
    except (OSError, TypeError):
        return {}
    lists = ["layer_types"] + sorted(derived_layer_lists(config_class, fields))
    found = {}
    for name, default in sorted(set(re.findall(r"kwargs\.(?:get|pop)\(\s*[\"'](\w+)[\"']\s*,\s*([^,()]+)\)", source))):
        if name in fields:
            continue
        try:
            default = ast.literal_eval(default.strip())
        except (ValueError, SyntaxError):
            continue
        if type(default) is not int:
            continue
        changed = []
        for field in lists:
            try:
                plain = _derived(config_class, {"num_hidden_layers": PROBE_LAYERS}, field)
                other = _derived(config_class, {"num_hidden_layers": PROBE_LAYERS, name: default + 2}, field)
            except Exception:  # noqa: BLE001 - the class refuses the value
                continue
            if plain != other:
                changed.append(field)
        if changed:
            found[name] = {"default": default, "lists": changed}
    return found


def _compared_layer_list(model, fields):
    """The one per-layer list besides `layer_types` that the model's code compares with a
    kind (Cohere2-MoE's `mlp_layer_types` against "dense") and that its config class derives:
    `(field, kinds)` with the kinds in order of first use, or None where there is not
    exactly one."""
    import inspect
    import re

    module = inspect.getmodule(model)
    source = inspect.getsource(module) if module is not None else ""
    derived = derived_layer_lists(type(model.config), fields)
    lists = {}
    for field, kind in re.findall(LAYER_KIND_COMPARISON, source):
        if field in derived and field != "layer_types":
            lists[field] = list(dict.fromkeys(derived[field] + [kind]))
    if len(lists) != 1:
        return None
    return next(iter(lists.items()))


def kind_width_probes(architecture, small, build_config, tiny_model, model_type, fields):
    """The int fields that set the width of the layers of one kind of a per-layer list the
    modeling code compares (Cohere2-MoE's `prefix_dense_intermediate_size`: the MLP of its
    `mlp_layer_types` "dense" layers, null meaning `intermediate_size`): a model with a
    layer of each kind, each such field set to WIDTH_PROBE, and the parameters that then
    have that width. `{list_field, kinds, fields: [{field, widened}]}` or None."""
    try:
        model = tiny_model(architecture, build_config(model_type, small))
    except Exception:  # noqa: BLE001
        return None
    compared = _compared_layer_list(model, fields)
    if compared is None:
        return None
    list_field, kinds = compared
    config = {**small, "num_hidden_layers": len(kinds), list_field: kinds}
    if small.get("layer_types"):
        config["layer_types"] = [small["layer_types"][i % len(small["layer_types"])] for i in range(len(kinds))]
    try:
        base = {k: tuple(v.shape) for k, v in tiny_model(architecture, build_config(model_type, config)).state_dict().items()}
    except Exception:  # noqa: BLE001
        return None
    found = []
    for name, field in sorted(fields.items()):
        if field.get("kind") != "int" or name in COMMON_SIZES or name in config or name.endswith("token_id"):
            continue
        try:
            state = tiny_model(architecture, build_config(model_type, {**config, name: WIDTH_PROBE})).state_dict()
        except Exception:  # noqa: BLE001 - the class refuses the value
            continue
        widened = sorted(
            k for k, v in state.items() if WIDTH_PROBE in tuple(v.shape) and WIDTH_PROBE not in base.get(k, ())
        )
        if widened:
            found.append({"field": name, "widened": widened})
    return {"list_field": list_field, "kinds": kinds, "fields": found}
