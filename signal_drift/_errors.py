"""User-facing errors and the thin CLI wrapper that turns them into one-line messages."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "InputError",
    "DenseTooLargeError",
    "DivergenceError",
    "PrecisionWarning",
    "check_finite",
    "check_positive_int",
    "check_positive_float",
    "check_choice",
    "warn_low_precision",
    "run_cli",
]


class InputError(ValueError):
    """Invalid user input (bad shape, rank, dim, dtype, non-finite data).

    The message always names the offending argument and the allowed range.

    Attributes:
        fields: the argument or config field names the message names (as Python spells them),
            so that a command line can name them by its flags (:mod:`signal_drift.settings`).
    """

    def __init__(self, message: str, *, fields: Sequence[str] = ()):
        super().__init__(message)
        self.fields = tuple(fields)


class DivergenceError(RuntimeError):
    """Training diverged (NaN/Inf or blow-up); ``step`` is the 1-based step where it happened."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    def __reduce__(self):  # picklable, so a sweep worker's error reaches its parent
        return type(self), (str(self), self.step)


class DenseTooLargeError(InputError, MemoryError):
    """A dense matrix was requested that would not fit in the memory budget."""


class PrecisionWarning(UserWarning):
    """Exact curvature computed in less than float64: small eigenvalues and residuals are noise."""


def warn_low_precision(what: str, dtype: torch.dtype) -> None:
    """Warn (:class:`PrecisionWarning`) when ``what`` is computed in a dtype coarser than float64.

    The one wording for every entry point (library operators and CLIs alike).
    """
    if dtype.is_floating_point and torch.finfo(dtype).eps > torch.finfo(torch.float64).eps:
        name = str(dtype).removeprefix("torch.")
        warnings.warn(
            f"{what} in {name}: eigenvalues below ~{torch.finfo(dtype).eps * 10:.0e}·λ_max, log–log "
            "slopes and the Prop. 1 residual are at round-off; use float64 to verify the theory",
            PrecisionWarning,
            stacklevel=3,
        )


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise :class:`InputError` if ``tensor`` holds NaN or Inf.

    Args:
        name: argument name used in the message.
        tensor: any tensor.

    Raises:
        InputError: naming ``name`` and how many entries are not finite.

    """
    if tensor.is_floating_point() or tensor.is_complex():
        bad = (~torch.isfinite(tensor)).sum().item()
        if bad:
            raise InputError(f"{name}: {bad} of {tensor.numel()} entries are NaN or Inf")


def check_positive_int(name: str, value: int, upper: int | None = None) -> int:
    """Validate ``1 <= value <= upper`` and return it as ``int``."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        rng = f"1..{upper}" if upper is not None else ">= 1"
        raise InputError(f"{name}={value!r} is invalid: must be an integer in {rng}", fields=[name])
    if upper is not None and value > upper:
        raise InputError(f"{name}={value} is invalid: must be an integer in 1..{upper}", fields=[name])
    return int(value)


def check_positive_float(name: str, value: float) -> float:
    """Validate that ``value`` is a finite number > 0 and return it as ``float``."""
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"{name}={value!r} is invalid: must be a finite number > 0", fields=[name])
    return v


def check_device(device: str) -> None:
    """Raise :class:`InputError` (field ``device``) unless ``device`` is cpu or cuda[:K] with CUDA present."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"device={device!r} is invalid: use cpu or cuda", fields=["device"])
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            f"device={device}: CUDA is not available on this machine; use device cpu", fields=["device"]
        )


def check_choice(name: str, value: object, choices: Sequence) -> None:
    """Raise :class:`InputError` unless ``value`` is one of ``choices``.

    >>> check_choice("dtype", "float16", ("float64", "float32"))
    Traceback (most recent call last):
    signal_drift._errors.InputError: dtype='float16' is invalid: use float64 or float32
    """
    if value not in choices:
        names = [str(c) for c in choices]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise InputError(f"{name}={value!r} is invalid: use {listed}", fields=[name])


def run_cli(
    main: Callable[[Sequence[str] | None], int],
    argv: Sequence[str] | None = None,
    prog: str = "signal_drift",
) -> None:
    """Run a CLI ``main`` and exit; :class:`InputError` becomes one line on stderr and exit 2.

    Ctrl-C exits with status 130 after ``main`` had the chance to flush finished results.
    """
    try:
        code = main(argv)
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; finished results were kept", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
