"""Offline text and a byte-level tokenizer for the default training path (no hub, no network).

Two real text domains that ship with every CPython install:

- ``"pydoc"``: the language-reference topics of ``pydoc_data.topics`` (pre-training domain);
- ``"docstrings"``: API docstrings of a fixed list of standard-library modules (the held-out
  fine-tuning domain: another register of English about Python).
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import torch

from .._errors import InputError

__all__ = ["ByteTokenizer", "offline_text", "load_text", "split_ids"]

_MODULES = ("json", "argparse", "textwrap", "email.message", "http.client", "collections", "itertools",
            "functools", "pathlib", "datetime", "decimal", "fractions", "statistics", "string", "csv",
            "logging", "unittest", "typing", "subprocess", "shutil")  # fmt: skip


class ByteTokenizer:
    """Bytes as tokens (ids 0–255) plus ``<bos>`` (256) and ``<eos>`` (257).

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("LoRA-α"))
    'LoRA-α'
    """

    vocab_size = 258
    bos_token_id, eos_token_id = 256, 257

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Inverse of :meth:`encode` (special tokens dropped)."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def offline_text(domain: str) -> str:
    """The text of an offline domain, ``"pydoc"`` or ``"docstrings"`` (deterministic order)."""
    if domain == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if domain == "docstrings":
        parts = []
        for name in _MODULES:
            mod = importlib.import_module(name)
            for attr, obj in sorted(inspect.getmembers(mod), key=lambda t: t[0]):
                doc = inspect.getdoc(obj)
                if doc and not attr.startswith("_") and getattr(obj, "__module__", name) == mod.__name__:
                    parts.append(f"{name}.{attr}: {doc}")
        return "\n\n".join(parts)
    raise InputError(f"domain={domain!r} is invalid: use 'pydoc' or 'docstrings'")


def load_text(path: str | Path) -> str:
    """A user corpus: a ``.txt`` file, or ``.jsonl`` with a ``"text"`` field per line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows or any("text" not in r for r in rows):
            raise InputError(f"--data {path}: every JSONL line needs a 'text' field")
        return "\n\n".join(r["text"] for r in rows)
    text = path.read_text()
    if not text.strip():
        raise InputError(f"--data {path}: the file is empty")
    return text


def split_ids(ids: list[int], held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous split into train and held-out token streams (the held-out part is the tail)."""
    if len(ids) < 100:
        raise InputError(f"the corpus has {len(ids)} tokens: need at least 100")
    cut = int(len(ids) * (1 - held_out))
    return torch.tensor(ids[:cut], dtype=torch.long), torch.tensor(ids[cut:], dtype=torch.long)
