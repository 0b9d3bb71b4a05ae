"""Memory guard for dense materialisations: host RAM for CPU tensors, the GPU's free memory for CUDA ones."""

from __future__ import annotations

import os

import torch

from ._errors import DenseTooLargeError

__all__ = [
    "available_memory_bytes",
    "available_device_memory_bytes",
    "dense_budget_bytes",
    "check_dense",
    "format_bytes",
]

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


def available_device_memory_bytes(device: str | torch.device) -> int:
    """Bytes free on a CUDA ``device``: the driver's free memory plus PyTorch's cached, unused blocks."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _on_gpu(device: str | torch.device | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def dense_budget_bytes(device: str | torch.device | None = None) -> int:
    """The dense-matrix budget: ``$SIGNAL_DRIFT_MAX_DENSE_BYTES``, else half the memory free where it lives.

    Args:
        device: where the matrix will be; a CUDA device is budgeted against its own free memory
            (:func:`available_device_memory_bytes`), anything else against host RAM.
    """
    env = os.environ.get("SIGNAL_DRIFT_MAX_DENSE_BYTES")
    if env:
        return int(float(env))
    free = available_device_memory_bytes(device) if _on_gpu(device) else available_memory_bytes()
    return int(_BUDGET_FRACTION * free)


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
    device: str | torch.device | None = None,
    copies: int = 1,
) -> int:
    """Refuse a dense ``rows x cols`` matrix (``copies`` of it alive at once) above the memory budget.

    Args:
        what: name of the matrix, used in the message.
        rows: number of rows.
        cols: number of columns.
        dtype: element type.
        alternative: what to use instead (the matrix-free operator), named in the message.
        budget: byte budget; defaults to :func:`dense_budget_bytes` of ``device``.
        device: where the matrix will live (a CUDA device is budgeted against its free memory,
            not host RAM).
        copies: how many such matrices the computation keeps alive at once.

    Returns:
        The number of bytes the ``copies`` matrices need.

    Raises:
        DenseTooLargeError: if the matrix needs more than ``budget`` bytes.

    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = rows * cols * itemsize * copies
    budget = dense_budget_bytes(device) if budget is None else budget
    if need > budget:
        times = f"{copies} x " if copies > 1 else ""
        where = f" on {torch.device(device)}" if _on_gpu(device) else ""
        raise DenseTooLargeError(
            f"dense {what} ({times}{rows} x {cols}, {dtype}) needs {format_bytes(need)}, above the "
            f"budget{where} of {format_bytes(budget)} (set SIGNAL_DRIFT_MAX_DENSE_BYTES to change it); "
            f"use {alternative} instead"
        )
    return need
