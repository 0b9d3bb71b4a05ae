"""Closed-form predictions of the paper's propositions (what the numerics are checked against).

- Prop. 2(i): ``⟨Δw_signal, -g⟩`` for GD, sign-Adam and Muon steps.
- Prop. 3: ``E_A tr(J^T H J) = α² ρ tr(H)``, ``ρ = σ²/r`` (per adapted layer, with ``γ``).
- Lemma 1: GD on a quadratic is stable iff ``η < 2 / λ_max``.
- Prop. 4 / Corollary 1: log–log slopes and ``α* = sqrt(r/σ²)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from ._errors import InputError
from .lora import LoraProblem

__all__ = [
    "signal_alignment",
    "trace_rule",
    "layer_traces",
    "signal_trace_at_init",
    "stability_threshold",
    "loglog_slope",
]

Optimizer = Literal["gd", "sign", "muon"]


def signal_alignment(grad_theta: Mapping[str, torch.Tensor], optimizer: Optimizer, eta: float) -> float:
    """Prop. 2(i): ``⟨Δw_signal, -g⟩ = ⟨Δθ, -∇_θ L⟩`` in closed form.

    GD: ``η ‖∇_θ L‖²``; sign-Adam: ``η ‖∇_θ L‖_1``; Muon: ``η Σ_blocks ‖G‖_*``.

    >>> g = {"a": torch.tensor([[3.0, 0.0], [0.0, -4.0]])}
    >>> signal_alignment(g, "gd", 1.0), signal_alignment(g, "sign", 1.0), signal_alignment(g, "muon", 1.0)
    (25.0, 7.0, 7.0)
    """
    if optimizer == "gd":
        return eta * float(sum((v**2).sum() for v in grad_theta.values()))
    if optimizer == "sign":
        return eta * float(sum(v.abs().sum() for v in grad_theta.values()))
    if optimizer == "muon":
        return eta * float(sum(torch.linalg.matrix_norm(v, ord="nuc") for v in grad_theta.values()))
    raise InputError(f"optimizer={optimizer!r} is invalid: use 'gd', 'sign' or 'muon'")


def layer_traces(H_dense: torch.Tensor, problem: LoraProblem) -> dict[str, float]:
    """``tr(H_ll)`` per adapted layer from a dense FFT Hessian ``[|w|, |w|]``."""
    lay = problem.weight_layout
    diag = torch.diagonal(H_dense)
    return {n: float(diag[lay.slice(n)].sum()) for n in lay.names}


def trace_rule(problem: LoraProblem, traces_H: Mapping[str, float]) -> float:
    """Prop. 3: ``E_A tr(H_signal) = Σ_l γ_l² α_l² ρ_l tr(H_ll)`` with ``ρ_l = σ_l² / r_l``.

    Exact expectation at init (``B = 0``, i.i.d. zero-mean entries of ``A`` with variance
    ``σ²``), since ``E[A^T A] = r σ² I``.

    Args:
        problem: the LoRA problem (α, γ, r, σ² per adapter).
        traces_H: ``{layer: tr(H_ll)}``, the FFT Hessian's per-layer traces.
    """
    return float(
        sum(a.gamma**2 * a.alpha**2 * (a.sigma2 / a.rank) * traces_H[a.name] for a in problem.adapters)
    )


def signal_trace_at_init(
    problem: LoraProblem, theta: Mapping[str, torch.Tensor], K: Mapping[str, torch.Tensor]
) -> float:
    """Exact ``tr(H_signal)`` at ``B = 0`` from per-layer partial traces (Prop. 3's integrand).

    At ``B = 0``, ``J_A = 0`` and ``tr(J_Bᵀ H J_B) = Σ_l s_l² tr(K_l A_lᵀ A_l)`` with
    ``K_l[j, j'] = Σ_i H_ll[(i, j), (i, j')]`` (``[n, n]``, row-major vec of ``W``).

    Args:
        problem: the LoRA problem.
        theta: a point with ``B = 0`` (only ``A`` is read).
        K: ``{layer: K_l}``, e.g. from ``H.partial_traces()`` where ``H.supports_partial_traces``.
    """
    return float(
        sum(a.scale**2 * torch.sum(K[a.name] * (theta[a.key_A].T @ theta[a.key_A])) for a in problem.adapters)
    )


def stability_threshold(lambda_max: float) -> float:
    """Lemma 1: the largest stable GD learning rate on a quadratic, ``2 / λ_max``."""
    if not lambda_max > 0:
        raise InputError(f"lambda_max={lambda_max}: the stability bound needs λ_max > 0")
    return 2.0 / lambda_max


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``.

    >>> round(loglog_slope([1, 2, 4], [3, 12, 48]), 12)
    2.0

    Raises:
        InputError: fewer than 2 points, ``x`` and ``y`` of different lengths, a value that is
            not finite and > 0 (its logarithm would make the slope NaN), or all ``x`` equal.
    """
    xa, ya = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if len(xa) != len(ya) or len(xa) < 2:
        raise InputError(f"x, y: a log–log slope needs >= 2 points, as many x as y; got {len(xa)}, {len(ya)}")
    for name, v in (("x", xa), ("y", ya)):
        bad = np.flatnonzero(~(np.isfinite(v) & (v > 0)))
        if len(bad):
            i = int(bad[0])
            raise InputError(
                f"{name}[{i}]={float(v[i])!r} is invalid: a log–log slope needs finite values > 0"
            )
    if np.ptp(xa) == 0:
        raise InputError("x: all values are equal; a slope needs at least two distinct x")
    return float(np.polyfit(np.log(xa), np.log(ya), 1)[0])
