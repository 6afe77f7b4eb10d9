#!/usr/bin/env python3
"""Exports gguf-py's dequantization of GGUF blocks, the reference for our block decoders.

For every type we read, a few blocks and what `gguf.quants.dequantize` makes of them,
as float32 bit patterns (so the comparison is exact):

* real blocks from the two real files the tests use (SmolLM2 Q4_1/Q8_0, Gemma 3
  Q4_K/Q5_0/Q6_K/Q8_0): the first blocks of a tensor and some from its middle;
* seeded random blocks for every type, with their float16 scale fields set to finite
  values (any other byte pattern is a valid block).

    python export_gguf_blocks.py --smollm2 PATH --gemma3 PATH --out tests/fixtures/gguf-blocks
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from fixture_common import write_json

# Byte offsets of the float16 scale fields of each type's block.
HALF_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.IQ4_NL: [0],
    T.IQ4_XS: [0],
}
RANDOM_BLOCKS = 3


def record(kind, raw: np.ndarray, source: str) -> dict:
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    block, size = GGML_QUANT_SIZES[kind]
    values = dequantize(raw.reshape(1, -1), kind).astype(np.float32).reshape(-1)
    if values.size != raw.size // size * block:
        raise SystemExit(f"{kind.name}: {values.size} values from {raw.size} bytes")
    return {
        "type": kind.name,
        "source": source,
        "hex": raw.tobytes().hex(),
        "bits": values.view(np.uint32).tolist(),
    }


def random_blocks(kind, rng) -> dict:
    block, size = GGML_QUANT_SIZES[kind]
    if kind in (T.F16, T.BF16):
        values = rng.normal(0, 1, block * 64).astype(np.float32)
        raw = values.astype(np.float16).view(np.uint8) if kind == T.F16 else (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return record(kind, raw, "random")
    raw = rng.integers(0, 256, size * RANDOM_BLOCKS, dtype=np.uint8).reshape(RANDOM_BLOCKS, size)
    for offset in HALF_FIELDS[kind]:
        scale = rng.normal(0, 0.02, RANDOM_BLOCKS).astype(np.float16).view(np.uint8).reshape(RANDOM_BLOCKS, 2)
        raw[:, offset : offset + 2] = scale
    return record(kind, raw, "random")


def file_blocks(path: Path, names: list[str]) -> list[dict]:
    reader = GGUFReader(path)
    out = []
    for tensor in reader.tensors:
        if tensor.name not in names:
            continue
        block, size = GGML_QUANT_SIZES[tensor.tensor_type]
        data = np.asarray(tensor.data).view(np.uint8).reshape(-1)
        blocks = data.size // size
        picks = [0, 1, blocks // 2, blocks - 1] if block == 256 else [0, 1, 2, 3, blocks // 2, blocks // 2 + 1, blocks - 1]
        raw = np.concatenate([data[i * size : (i + 1) * size] for i in picks])
        entry = record(tensor.tensor_type, raw, f"{path.name}:{tensor.name} blocks {picks}")
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", type=Path, required=True)
    parser.add_argument("--gemma3", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    rng = np.random.default_rng(18)
    cases = file_blocks(args.smollm2, ["token_embd.weight", "blk.0.attn_q.weight"])
    cases += file_blocks(args.gemma3, ["blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.0.ffn_down.weight", "blk.0.attn_v.weight"])
    for kind in [T.F16, T.BF16, *HALF_FIELDS]:
        cases.append(random_blocks(kind, rng))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "blocks.json", {"description": __doc__.split("\n\n")[0], "cases": cases})
    print(f"{len(cases)} cases", flush=True)


if __name__ == "__main__":
    sys.exit(main())
