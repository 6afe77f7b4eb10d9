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
