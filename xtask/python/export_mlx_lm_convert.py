#!/usr/bin/env python3
"""Records what Python mlx-lm's converter writes for committed fixtures: the reference
`mlx-models convert` must reproduce (tests/convert_mlx_lm.rs).

Runs `mlx_lm.convert.convert` itself (its dtype choice, `quantize_model`, the models'
`quant_predicate` / `cast_predicate`), with two seams replaced because the fixtures have
no tokenizer: the model is loaded with `mlx_lm.utils.load_model` (what `load` calls for
the weights) and `save` hands back the model and config instead of writing files.

For each (fixture, bits, group size, dtype) case the output holds the config's
`quantization` block and every tensor mlx-lm would save: dtype, shape and the SHA-256 of
its values (floating point widened to float32, integers as stored; little-endian), so
equal hashes mean bit-identical weights, scales and biases.

Run (outside the project's Transformers environment; MLX's CPU wheel is enough):

    python3 -m venv /tmp/mlx-lm-env
    /tmp/mlx-lm-env/bin/pip install mlx==0.32.2 mlx-cpu==0.32.2 mlx-lm==0.32.2
    /tmp/mlx-lm-env/bin/python xtask/python/export_mlx_lm_convert.py \
        tests/fixtures tests/fixtures/mlx-lm-convert/reference.json
"""

import hashlib
import importlib
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import mlx_lm
from mlx_lm.utils import load_model

# The module (the package exports a function of the same name).
mlx_convert = importlib.import_module("mlx_lm.convert")

# (fixture, bits, group size, --dtype): dense and mixture-of-experts families, the
# defaults (4-bit, groups of 64), 8-bit groups of 32, a cast, and the families whose
# `quant_predicate` keeps routers or projections at 8 bits.
CASES = [
    ("llama/default-tied", 4, 64, None),
    ("llama/llama3-untied", 8, 32, "bfloat16"),
    ("qwen3/hub", 4, 32, None),
    ("granite/hub", 4, 64, None),
    ("mixtral/hub", 4, 64, None),
    ("qwen3_moe/hub", 4, 64, None),
    ("qwen3_moe/hub", 8, 32, "float16"),
    ("qwen2_moe/hub", 4, 64, None),
    ("olmoe/default", 8, 64, None),
    ("deepseek_v2/lite", 4, 64, None),
    ("deepseek_v3/hub", 4, 64, None),
    ("glm4_moe_lite/hub", 8, 32, "bfloat16"),
    ("jamba/default", 4, 64, None),
]


def digest(array):
    if mx.issubdtype(array.dtype, mx.floating):
        array = array.astype(mx.float32)
    values = np.array(array)
    return hashlib.sha256(values.astype(values.dtype.newbyteorder("<")).tobytes()).hexdigest()


def run(fixture_dir, bits, group_size, dtype):
    captured = {}

    def load(path, **_):
        model, config = load_model(Path(path), lazy=True)
        return model, None, config

    def save(_dst, _src, model, _tokenizer, config):
        captured["model"] = model
        captured["config"] = config

    mlx_convert.load, mlx_convert.save = load, save
    out = Path("/nonexistent/mlx-lm-convert-reference")
    mlx_convert.convert(
        str(fixture_dir),
        mlx_path=str(out),
        quantize=True,
        q_group_size=group_size,
        q_bits=bits,
        dtype=dtype,
    )
    weights = dict(tree_flatten(captured["model"].parameters()))
    tensors = {}
    for name in sorted(weights):
        array = weights[name]
        mx.eval(array)
        tensors[name] = {
            "dtype": str(array.dtype).removeprefix("mlx.core."),
            "shape": list(array.shape),
            "sha256": digest(array),
        }
    return captured["config"]["quantization"], tensors


def main():
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    cases = []
    for fixture, bits, group_size, dtype in CASES:
        quantization, tensors = run(root / fixture, bits, group_size, dtype)
        cases.append(
            {
                "fixture": fixture,
                "bits": bits,
                "group_size": group_size,
                "dtype": dtype,
                "quantization": quantization,
                "tensors": tensors,
            }
        )
        quantized = sum(name.endswith(".scales") for name in tensors)
        print(f"{fixture} {bits}-bit g{group_size} {dtype}: {len(tensors)} tensors, {quantized} quantized")
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "mlx_lm_version": mlx_lm.__version__,
        "mlx_version": mx.__version__,
        "cases": cases,
    }
    out.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
