"""Memory guard for dense materialisations."""

from __future__ import annotations

import os

import torch

from ._errors import DenseTooLargeError

__all__ = ["available_memory_bytes", "dense_budget_bytes", "check_dense", "format_bytes"]

_BUDGET_FRACTION = 0.5


def available_memory_bytes() -> int:
    """Bytes of RAM currently available (``MemAvailable``), or 8 GiB if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def dense_budget_bytes() -> int:
    """The dense-matrix budget: ``$SIGNAL_DRIFT_MAX_DENSE_BYTES`` or half the available RAM."""
    env = os.environ.get("SIGNAL_DRIFT_MAX_DENSE_BYTES")
    if env:
        return int(float(env))
    return int(_BUDGET_FRACTION * available_memory_bytes())


def format_bytes(n: float) -> str:
    """Human-readable byte count, e.g. ``'3.4 GB'``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    raise AssertionError  # pragma: no cover


def check_dense(
    what: str,
    rows: int,
    cols: int,
    dtype: torch.dtype,
    alternative: str,
    budget: int | None = None,
) -> int:
    """Refuse a dense ``rows x cols`` matrix above the memory budget.

    Args:
        what: name of the matrix, used in the message.
        rows: number of rows.
        cols: number of columns.
        dtype: element type.
        alternative: what to use instead (the matrix-free operator), named in the message.
        budget: byte budget; defaults to :func:`dense_budget_bytes`.

    Returns:
        The number of bytes the matrix needs.

    Raises:
        DenseTooLargeError: if the matrix needs more than ``budget`` bytes.

    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = rows * cols * itemsize
    budget = dense_budget_bytes() if budget is None else budget
    if need > budget:
        raise DenseTooLargeError(
            f"dense {what} ({rows} x {cols}, {dtype}) needs {format_bytes(need)}, above the "
            f"budget of {format_bytes(budget)} (set SIGNAL_DRIFT_MAX_DENSE_BYTES to change it); "
            f"use {alternative} instead"
        )
    return need
