#!/usr/bin/env python3
"""Writes a tiny, complete llama GGUF (a few KB) for the loading fuzz tests, with gguf-py.

One layer, hidden size 32, two heads of 16 (one key/value head), a byte-level vocabulary
of 48 tokens, a chat template, and tensors in seven types (F32 norms, Q8_0, Q4_1, Q4_0,
Q5_0, Q5_1, F16, BF16), quantized by gguf-py from seeded random weights. Beside it,
`tiny.fields.json` lists the byte offset and width of every structural field (counts,
string and array lengths, value types, dimensions, tensor types and offsets) for the
fuzz test's structured mutations.

    python export_tiny_gguf.py --out tests/fixtures/gguf-tiny
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType as T
from gguf.quants import quantize

from fixture_common import write_json

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 32, 64, 2, 1, 16


def tokens() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *letters, "Ġ", "!", "?", ".", ",", "Ċ", "ab", "Ġa", "th", "he", "the", "in", "an", "er", "on", "re", "ing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "tiny.gguf"

    vocab = tokens()
    rng = np.random.default_rng(7)
    w = GGUFWriter(path, "llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(1)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3, 3, 3] + [1] * (len(vocab) - 3))
    w.add_token_merges(["a b", "Ġ a", "t h", "h e", "th e", "i n", "a n", "e r", "o n", "r e", "in g"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")

    def add(name, shape, kind):
        data = rng.normal(0, 0.2, shape).astype(np.float32)
        if kind == T.F32:
            w.add_tensor(name, data)
        elif kind == T.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            q = quantize(data, kind)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=kind)

    add("token_embd.weight", (len(vocab), HIDDEN), T.Q8_0)
    add("output_norm.weight", (HIDDEN,), T.F32)
    add("blk.0.attn_norm.weight", (HIDDEN,), T.F32)
    add("blk.0.ffn_norm.weight", (HIDDEN,), T.F32)
    add("blk.0.attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), T.Q4_1)
    add("blk.0.attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), T.Q4_0)
    add("blk.0.attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), T.Q5_0)
    add("blk.0.attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), T.Q5_1)
    add("blk.0.ffn_gate.weight", (FFN, HIDDEN), T.F16)
    add("blk.0.ffn_up.weight", (FFN, HIDDEN), T.Q8_0)
    add("blk.0.ffn_down.weight", (HIDDEN, FFN), T.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Where each structural field lies, for structured mutations.
    reader = GGUFReader(path)
    fields = []
    for name, field in reader.fields.items():
        offset = field.offset
        for part in field.parts:
            if part.dtype in (np.uint64, np.uint32) and part.size == 1 or name.startswith("GGUF."):
                fields.append({"field": name, "offset": int(offset), "width": int(part.nbytes)})
            offset += int(part.nbytes)
    for tensor in reader.tensors:
        offset = tensor.field.offset
        for part in tensor.field.parts:
            if part.dtype in (np.uint64, np.uint32):
                for i in range(part.size):
                    fields.append({"field": tensor.name, "offset": int(offset + i * part.itemsize), "width": int(part.itemsize)})
            offset += int(part.nbytes)
    write_json(args.out / "tiny.fields.json", {"data_offset": int(reader.data_offset), "fields": fields})
    print(f"{path}: {path.stat().st_size} bytes, {len(fields)} fields", flush=True)


if __name__ == "__main__":
    sys.exit(main())
