"""Shared helpers of the fixture exporters (export_fixtures.py, export_smollm2.py).

Everything here serves one goal: running an exporter twice must produce the same
bytes, so that committed fixtures can be re-exported and diffed.
"""

import json
import os
from pathlib import Path

# Fixture directories are committed; each must stay below this many bytes.
MAX_FIXTURE_BYTES = 1_000_000


def configure_determinism() -> None:
    """Pins everything that could make two runs differ, before any torch work.

    One CPU thread (reductions then always run in the same order), deterministic
    kernels, and no network: every input of an export is local.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. the GGUF loader's own progress bar

    import torch
    import transformers

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.disable_progress_bar()


def versions() -> dict:
    """The versions that produced a fixture, recorded in its manifest."""
    import torch
    import transformers

    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def write_json(path: Path, value) -> None:
    """Writes JSON the one canonical way: sorted keys, 2-space indent, final newline.

    Non-ASCII text is written as UTF-8 rather than escaped, so that fixtures with
    accents, CJK or emoji stay readable in review.
    """
    text = json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def directory_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_fixture_size(path: Path) -> int:
    """Fails when a fixture directory is too large to commit; returns its size."""
    size = directory_bytes(path)
    if size >= MAX_FIXTURE_BYTES:
        raise SystemExit(f"{path}: {size} bytes, the limit for a committed fixture is {MAX_FIXTURE_BYTES}")
    return size


# Names the final norm goes by on the base model; a model with none of them has its final
# norm found by structure (see decoder_stack).
FINAL_NORM_NAMES = ("norm", "norm_f", "embedding_norm", "final_layernorm", "final_norm")


def decoder_stack(model) -> dict:
    """Where a causal LM keeps its parts, found from its module structure, not fixed names.

    `base`: the module that holds the decoder layers, the shallowest `nn.ModuleList` of
    `config.num_hidden_layers` modules in Transformers' `base_model` (`model.model` for
    Llama, `transformer` for GPT-2, `gpt_neox`, `backbone` for Mamba, OPT's
    `model.decoder`); `layers_name` its child that is that list (`layers`, GPT-2's `h`).
    `norm_name`: the final norm, the first of FINAL_NORM_NAMES the base has, else the last
    child registered after the layers whose class is a norm (GPT-2's `ln_f`, GPT-NeoX's
    `final_layer_norm`), else its only norm child (OPT's, registered first). `rotary`:
    the base model's rotary module (`rotary_emb`, else its child whose class ends in
    RotaryEmbedding, else
    the first inside the layers, as RecurrentGemma builds one per attention layer), or None
    for a model without RoPE (GPT-2's learned positions, Mamba). `embed_name`: the base
    model's child that is the input embedding (`get_input_embeddings`). Each name is
    relative to `base`; `prefix` is its full name in the causal LM.
    """
    import torch

    base = model.base_model
    # A multimodal model's (Gemma 3's) layer count is its text config's.
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    expected = getattr(text_config, "num_hidden_layers", None)
    # The shallowest ModuleList of the decoder layers, and the module that holds it (the
    # base model itself, or OPT's `model.decoder`).
    lists = [
        (name, module) for name, module in base.named_modules()
        if name and isinstance(module, torch.nn.ModuleList) and (expected is None or len(module) == expected)
    ]
    if not lists:
        raise SystemExit(f"{type(base).__name__}: no ModuleList of {expected} decoder layers in it")
    path, _ = min(lists, key=lambda item: (item[0].count("."), -len(item[1])))
    owner_path, _, layers_name = path.rpartition(".")
    owner = base.get_submodule(owner_path) if owner_path else base
    prefix = next(name for name, module in model.named_modules() if module is owner)
    children = list(owner.named_children())
    names = [name for name, _ in children]
    after = names[names.index(layers_name) + 1 :]
    norm_name = next((name for name in FINAL_NORM_NAMES if getattr(owner, name, None) is not None), None)
    if norm_name is None:
        norms = [name for name in names if "norm" in type(getattr(owner, name)).__name__.lower()]
        # The last registered after the layers, else the only one (OPT registers its
        # final_layer_norm before the layers).
        later = [name for name in norms if name in after]
        norm_name = later[-1] if later else (norms[0] if len(norms) == 1 else None)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        rotary = next((child for _, child in children if type(child).__name__.endswith("RotaryEmbedding")), None)
    if rotary is None:
        rotary = next(
            (module for module in base.modules() if type(module).__name__.endswith("RotaryEmbedding")), None
        )
    embeddings = model.get_input_embeddings()
    embed_name = next((name for name, child in children if child is embeddings), None)
    if embed_name is None:
        # Nested in a module of its own outside the layers (the ModernBERT decoder's
        # `embeddings.tok_embeddings`, beside the embeddings' norm): its dotted name.
        embed_name = next(
            (
                name for name, child in owner.named_modules()
                if child is embeddings and name and not name.startswith(f"{layers_name}.")
            ),
            None,
        )
    return {
        "base": owner,
        "prefix": prefix,
        "layers_name": layers_name,
        "layers": getattr(owner, layers_name),
        "norm_name": norm_name,
        "norm": getattr(owner, norm_name) if norm_name else None,
        "rotary": rotary,
        "embed_name": embed_name,
    }
