"""The on-disk cache of tokenized datasets.

Tokenizing is done once per (data files, tokenizer, template, settings): the key hashes each data file's path,
size and modification time, the content of the tokenizer files, the chat template's source and every setting that
changes the tokens. A dataset is stored as one safetensors file of flat arrays (all tokens back to back, a trained
flag per token, and where each sequence starts) plus its counts as JSON metadata; nothing is ever pickled. Files
are written under a temporary name and renamed, so an interrupted run never leaves a half-written cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from litft.checkpoint import TOKENIZER_FILES

CACHE_VERSION = 1


@dataclass
class TokenizedDataset:
    """Sequences stored back to back: sequence i is `tokens[offsets[i]:offsets[i + 1]]`."""

    tokens: np.ndarray  # (total,) int32
    trained: np.ndarray  # (total,) bool: the model is trained to produce this token
    offsets: np.ndarray  # (num_sequences + 1,) int64
    counts: dict[str, int] = field(default_factory=dict)  # records, truncated, dropped_overlong, dropped_untrained
    format: str = ""

    def __len__(self) -> int:
        return len(self.offsets) - 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("LITFT_CACHE_DIR") or Path.home() / ".cache" / "litft") / "data"


def cache_key(files: list[Path], tokenizer: Any, template_source: str, settings: dict[str, Any]) -> str:
    """A hash of everything that decides the tokens."""
    digest = hashlib.sha256()
    digest.update(f"litft-data-v{CACHE_VERSION}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    checkpoint_dir = Path(getattr(tokenizer, "checkpoint_dir", ""))
    # config.json can carry the BOS / EOS ids the tokenizer falls back to.
    for name in (*TOKENIZER_FILES, "config.json"):
        path = checkpoint_dir / name
        if path.is_file():
            digest.update(name.encode() + hashlib.sha256(path.read_bytes()).digest())
    digest.update(template_source.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def load_cached(path: Path) -> TokenizedDataset | None:
    """The dataset stored at `path`, or None when there is none (or it cannot be read: it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in ("tokens", "trained", "offsets")}
        return TokenizedDataset(
            tokens=arrays["tokens"],
            trained=arrays["trained"],
            offsets=arrays["offsets"],
            counts=json.loads(metadata["counts"]),
            format=metadata["format"],
        )
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def save_cached(path: Path, dataset: TokenizedDataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(
            {"tokens": dataset.tokens, "trained": dataset.trained, "offsets": dataset.offsets},
            temporary,
            metadata={"counts": json.dumps(dataset.counts), "format": dataset.format},
        )
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
