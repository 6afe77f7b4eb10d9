#!/usr/bin/env python3
"""Exports layer-by-layer reference fixtures from Hugging Face Transformers.

For each variant of a variants spec (xtask/fixtures/<model_type>.json) this

1. builds a small random-weight model with a fixed seed and saves it with
   `save_pretrained` (float32 safetensors; for `"config_style": "hub"` variants
   config.json is then rewritten to the Hub-style `rope_theta` + `rope_scaling`
   keys, and Transformers must load it back to the very same model);
2. reloads it from disk and records, with forward hooks, what Transformers
   computes for a fixed 16-token prompt: the input of decoder layer 0, the
   output of every decoder layer, the final norm and the logits; the 32 greedy
   tokens; and cos/sin of the model's own rotary module at a few positions;
3. reloads the same weights in bfloat16 and records only the dtype of each
   activation, to document Transformers' bf16 conventions;
4. writes `config.json`, `model.safetensors` (and `generation_config.json`),
   `expected.safetensors` and the manifest `fixture.json` into
   `<out>/<model_type>/<variant>/`.

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

from fixture_common import check_fixture_size, configure_determinism, versions, write_json

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
    # ... and is then replaced entirely by draws that depend on nothing else.
    randomize_parameters(model, variant["seed"], config.initializer_range)
    return model


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


def load_model(directory: Path, dtype):
    """Loads a saved fixture model the way a user would, in `dtype`."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
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
    """Rewrites a Transformers-5 config.json dict to the Hub's RoPE keys.

    Transformers 5 writes one `rope_parameters` dict holding `rope_theta`. Most
    configs on the Hub predate it: `rope_theta` at the top level and the scaling,
    if any, in `rope_scaling` (as Llama 3.1, Qwen2.5-with-YaRN or Phi-3 ship).
    Unscaled RoPE gets no `rope_scaling` key at all, as in Mistral's configs.
    """
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    return config


def decoder_parts(model):
    """The decoder layers, final norm and rotary module of a decoder-only model."""
    base = model.model
    return base.layers, base.norm, base.rotary_emb


@contextmanager
def activation_hooks(model):
    """Records the activations of one forward pass into the yielded dict.

    `embeddings` is the input of decoder layer 0, so families that scale their
    embeddings are captured after the scaling; `layers.{i}` the hidden state a
    decoder layer returns (a tensor, or the first item of a tuple); `norm` the
    output of the final norm.
    """
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
            keep(f"layers.{index}", output[0] if isinstance(output, tuple) else output)

        return hook

    handles = [layers[0].register_forward_pre_hook(on_first_layer_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(on_layer_output(i)) for i, layer in enumerate(layers)]
    handles.append(norm.register_forward_hook(lambda _module, _args, output: keep("norm", output)))
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
    a port's own cache check should expect.
    """
    import torch
    from transformers import DynamicCache

    worst = 0.0
    with torch.no_grad():
        for prefill in CACHE_PREFILL_SIZES:
            cache = DynamicCache(config=model.config)
            chunks = [input_ids[:, :prefill]] + [input_ids[:, t : t + 1] for t in range(prefill, input_ids.shape[1])]
            pieces = [model(input_ids=chunk, past_key_values=cache, use_cache=True).logits for chunk in chunks]
            worst = max(worst, float((torch.cat(pieces, dim=1) - logits).abs().max()))
    return worst


def capture_rope(model, dtype):
    """cos/sin (and inv_freq, when exposed) of the model's rotary module at ROPE_POSITIONS.

    One call with all positions, as a forward pass over those positions would make
    it. The input `x` only lends its dtype and device. Returns the tensors and the
    module's `attention_scaling`, the factor it multiplies cos and sin by.
    """
    import torch

    _, _, rotary = decoder_parts(model)
    position_ids = torch.tensor([ROPE_POSITIONS], dtype=torch.int64)
    x = torch.zeros(1, len(ROPE_POSITIONS), model.config.hidden_size, dtype=dtype)
    with torch.no_grad():
        cos, sin = rotary(x, position_ids)
    tensors = {"rope.cos": cos[0].clone(), "rope.sin": sin[0].clone()}
    inv_freq = getattr(rotary, "inv_freq", None)
    if isinstance(inv_freq, torch.Tensor):
        tensors["rope.inv_freq"] = inv_freq.detach().clone()
    return tensors, float(getattr(rotary, "attention_scaling", 1.0))


def float64_angle_deviation(rope: dict, attention_scaling: float) -> float:
    """How far the recorded cos/sin are from cos/sin of float64 angles with the same inv_freq.

    Transformers multiplies position and inv_freq in float32, so at position
    131071 the angle is rounded to 1/128 rad and cos/sin move by up to ~1e-3: a
    port matches the recorded values within rope_max_abs only if it rounds the
    same way (float32 inv_freq bit-identical to rope.inv_freq, float32 product).
    """
    import torch

    positions = torch.tensor(ROPE_POSITIONS, dtype=torch.float64)
    angles = positions[:, None] * rope["rope.inv_freq"].double()[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos() * attention_scaling, angles.sin() * attention_scaling
    return max(
        float((cos - rope["rope.cos"].double()).abs().max()),
        float((sin - rope["rope.sin"].double()).abs().max()),
    )


def unscaled_twin(model):
    """The same weights under unscaled RoPE of the same theta, to measure what scaling does."""
    config = copy.deepcopy(model.config)
    rope = config.rope_parameters
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    if "partial_rotary_factor" in rope:
        config.rope_parameters["partial_rotary_factor"] = rope["partial_rotary_factor"]
    twin = type(model)(config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def scaling_checks(model, input_ids, logits, rope: dict) -> dict:
    """How far this variant's RoPE and logits are from those of unscaled RoPE.

    A variant that scales RoPE must differ at the recorded rope positions, or a
    port that ignored the scaling would pass; the logits show whether the scaling
    also reaches the prompt (it does not for dynamic NTK below its threshold).
    """
    twin = unscaled_twin(model)
    twin_rope, _ = capture_rope(twin, rope["rope.cos"].dtype)
    rope_effect = max(float((rope[k] - twin_rope[k]).abs().max()) for k in ("rope.cos", "rope.sin"))
    logits_effect = float((run_forward(twin, input_ids)["logits"] - logits).abs().max())
    if rope_effect < MIN_ROPE_SCALING_EFFECT:
        raise SystemExit(
            f"{model.config.rope_parameters['rope_type']} RoPE changes cos/sin by only {rope_effect:.3g} "
            f"at {ROPE_POSITIONS}: adjust the variant so that its scaling is exercised"
        )
    return {"rope_vs_unscaled_max_abs": rounded(rope_effect), "logits_vs_unscaled_max_abs": rounded(logits_effect)}


def rope_note(config):
    """Explains, for RoPE types whose cos/sin depend on the sequence length, what was recorded.

    Transformers decides per call of the rotary module, from
    seq_len = max(position_ids) + 1, so the rope.* tensors (one call with all
    ROPE_POSITIONS) can use another regime than the prompt does.
    """
    rope = config.rope_parameters
    rope_type = rope["rope_type"]
    rope_len = max(ROPE_POSITIONS) + 1
    longest = PROMPT_LENGTH + GREEDY_NEW_TOKENS - 1  # the last greedy step sees this many positions
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


def rounded(value: float) -> float:
    """A float for the manifest: 6 significant digits are plenty to read."""
    return float(f"{value:.6g}")


def dtype_name(dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`."""
    return str(dtype).removeprefix("torch.")


def export_variant(spec: dict, variant: dict, out_root: Path) -> None:
    """Writes the fixture directory of one variant."""
    import torch
    from safetensors.torch import save_file

    name, seed = variant["name"], variant["seed"]
    style = variant.get("config_style", "transformers5")
    model = build_model(spec, variant)
    vocab_size = model.config.vocab_size
    prompt_generator = torch.Generator().manual_seed(seed + PROMPT_SEED_OFFSET)
    input_ids = torch.randint(0, vocab_size, (1, PROMPT_LENGTH), generator=prompt_generator, dtype=torch.int64)
    checks = {}

    with tempfile.TemporaryDirectory() as temporary:
        staging = Path(temporary) / name
        model.save_pretrained(staging, safe_serialization=True)
        reference = load_model(staging, torch.float32)
        assert_same_parameters(model, reference)

        if style == "hub":
            # Rewrite the RoPE keys, then demand that Transformers reads back the same model.
            config_path = staging / "config.json"
            write_json(config_path, to_hub_style(json.loads(config_path.read_text(encoding="utf-8"))))
            from_hub = load_model(staging, torch.float32)
            if from_hub.config.rope_parameters != reference.config.rope_parameters:
                raise SystemExit(
                    f"hub-style config loads as {from_hub.config.rope_parameters}, "
                    f"not {reference.config.rope_parameters}"
                )
            with torch.no_grad():
                before = reference(input_ids=input_ids).logits
                after = from_hub(input_ids=input_ids).logits
            if not torch.equal(before, after):
                raise SystemExit("the hub-style config.json gives other logits than the Transformers-5 one")
            checks["hub_roundtrip_logits_max_abs"] = float((before - after).abs().max())
            reference = from_hub

        activations = run_forward(reference, input_ids)
        greedy_tokens, greedy_margin = greedy_decode(reference, input_ids, GREEDY_NEW_TOKENS)
        if greedy_margin < MIN_GREEDY_MARGIN:
            raise SystemExit(f"a greedy step is a near-tie (margin {greedy_margin:.3g}): pick another seed")
        checks["greedy_min_logit_margin"] = rounded(greedy_margin)
        checks["cache_vs_full_logits_max_abs"] = rounded(
            cache_consistency(reference, input_ids, activations["logits"])
        )
        # Last: dynamic RoPE keeps state in the rotary module between calls.
        rope, attention_scaling = capture_rope(reference, torch.float32)
        if "rope.inv_freq" in rope:
            checks["rope_vs_float64_angles_max_abs"] = rounded(float64_angle_deviation(rope, attention_scaling))
        if reference.config.rope_parameters["rope_type"] != "default":
            checks.update(scaling_checks(reference, input_ids, activations["logits"], rope))

        # The bfloat16 run keeps only the dtypes Transformers computes in.
        half = load_model(staging, torch.bfloat16)
        half_tensors = run_forward(half, input_ids)
        half_tensors.update(capture_rope(half, torch.bfloat16)[0])
        half_tensors.pop("rope.inv_freq", None)  # a buffer, not something computed in the bf16 run
        bf16_dtypes = {key: dtype_name(value.dtype) for key, value in half_tensors.items()}

        tensors = {**activations, "greedy_tokens": greedy_tokens, **rope}
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
            "rope_attention_scaling": attention_scaling,
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
        note = rope_note(reference.config)
        if note is not None:
            manifest["rope_note"] = note
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
