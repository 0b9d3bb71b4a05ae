"""Crash-safe output: atomic writes and append-only JSONL that tolerates a torn last line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_savez", "append_jsonl", "read_jsonl"]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_savez(path: str | Path, **arrays) -> None:
    """``numpy.savez_compressed`` through a temporary file and ``os.replace``."""
    import numpy as np

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON record as a line, flushed and fsynced before returning."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Records of a JSONL file; a torn (partially written) last line is skipped."""
    path = Path(path)
    if not path.exists():
        return
    with open(path) as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
