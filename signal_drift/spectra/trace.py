"""Stochastic trace estimators with error bars.

- Hutchinson (1989): ``tr A ≈ mean_i v_iᵀ A v_i`` with Rademacher ``v_i``.
- Hutch++ (Meyer, Musco, Musco & Woodruff, 2021): sketch the top subspace ``Q`` with a third of
  the budget, take ``tr(Qᵀ A Q)`` exactly, and apply Hutchinson to the deflated remainder.
- :func:`frobenius_ratio`: ``‖X‖_F / ‖Y‖_F`` from Hutch++ on ``tr XᵀX = ‖X‖_F²``, with a band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._errors import InputError
from ..intervals import Interval, t_quantile
from ..operators import LinearOperator

__all__ = ["TraceEstimate", "hutchinson", "hutchpp", "frobenius_ratio"]


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its standard error and cost.

    Attributes:
        value: the estimate (unbiased).
        stderr: standard error of its stochastic part (0 when exact).
        matvecs: operator products used.
        samples: Hutchinson samples behind ``stderr`` (its degrees of freedom + 1).
    """

    value: float
    stderr: float
    matvecs: int
    samples: int = 0

    def interval(self, level: float = 0.95) -> Interval:
        """Student-t band ``value ± t·stderr`` over the Hutchinson samples (exact when none)."""
        if self.samples < 2:
            return Interval(self.value, self.value, self.value, level, "exact")
        h = t_quantile(level, self.samples) * self.stderr
        return Interval(self.value, self.value - h, self.value + h, level,
                        f"Student-t over {self.samples} Rademacher probes")  # fmt: skip


def _rademacher(P: int, k: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randint(0, 2, (P, k), generator=gen).to(dtype) * 2 - 1


def hutchinson(op: LinearOperator, samples: int = 100, seed: int = 0) -> TraceEstimate:
    """Hutchinson's estimator with Rademacher probes; stderr from the sample variance."""
    if samples < 2:
        raise InputError(f"samples={samples} is invalid: need >= 2 for an error bar")
    gen = torch.Generator().manual_seed(seed)
    V = _rademacher(op.shape[0], samples, gen, op.dtype).to(op.device)
    vals = (V * op.matmat(V)).sum(0)
    return TraceEstimate(float(vals.mean()), float(vals.std() / samples**0.5), samples, samples)


def hutchpp(op: LinearOperator, matvecs: int = 150, seed: int = 0) -> TraceEstimate:
    """Hutch++ with ``matvecs`` operator products; stderr of its Hutchinson part.

    >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    >>> from signal_drift.operators import FunctionOperator
    >>> op = FunctionOperator(lambda V: A @ V, (10, 10), torch.float64, symmetric=True)
    >>> round(hutchpp(op, matvecs=30).value, 8)  # the sketch spans everything: exact
    55.0
    """
    if matvecs < 6:
        raise InputError(f"matvecs={matvecs} is invalid: Hutch++ needs >= 6")
    gen = torch.Generator().manual_seed(seed)
    P = op.shape[0]
    k = min(matvecs // 3, P)
    S = _rademacher(P, k, gen, op.dtype).to(op.device)
    Q, _ = torch.linalg.qr(op.matmat(S))
    t_top = float(torch.trace(Q.T @ op.matmat(Q)))
    m = matvecs - 2 * k
    if m < 2 or k == P:
        return TraceEstimate(t_top, 0.0, 2 * k)
    G = _rademacher(P, m, gen, op.dtype).to(op.device)
    G = G - Q @ (Q.T @ G)
    vals = (G * op.matmat(G)).sum(0)
    return TraceEstimate(t_top + float(vals.mean()), float(vals.std() / m**0.5), matvecs, m)


def frobenius_ratio(
    num: LinearOperator, den: LinearOperator, matvecs: int = 12, seed: int = 0, level: float = 0.95
) -> Interval:
    """``‖num‖_F / ‖den‖_F`` with a band, from Hutch++ on ``XᵀX`` (``‖X‖_F² = tr XᵀX``).

    Each squared norm is a Hutch++ trace of ``XᵀX`` (products ``Xᵀ(X v)``): the sketch takes the
    dominant directions exactly, which keeps the Student-t band on the remainder honest when one
    direction dominates (plain Hutchinson ``E‖Xz‖²`` then has χ²₁-like samples and its band
    under-covers). Each norm's band is at ``1 − (1 − level)/2``; the ratio's band joins them by
    the union bound (the ratio is monotone in each). Used for ``‖H_drift‖_F / ‖H_signal‖_F``.

    Args:
        num: operator ``[Q, P]``.
        den: operator ``[Q', P']``.
        matvecs: Hutch++ products of ``XᵀX`` per norm (each two products with ``X``), >= 6.
        seed: RNG seed (the two norms use ``seed`` and ``seed + 1``).
        level: coverage of the band.

    Returns:
        An :class:`~signal_drift.intervals.Interval` (``high`` is ``inf`` when ``den``'s band
        reaches 0).
    """
    half = 1 - (1 - level) / 2
    bn, bd = (hutchpp(_gram(op), matvecs, seed + i).interval(half) for i, op in enumerate((num, den)))
    est = math.sqrt(max(bn.estimate, 0.0) / bd.estimate) if bd.estimate > 0 else math.inf
    low = math.sqrt(max(bn.low, 0.0) / bd.high) if bd.high > 0 else 0.0
    high = math.sqrt(max(bn.high, 0.0) / bd.low) if bd.low > 0 else math.inf
    method = f"Hutch++ on XᵀX ({matvecs} products per norm), Student-t per norm, union bound"
    return Interval(est, min(low, est), max(high, est), level, method)


def _gram(op: LinearOperator) -> LinearOperator:
    """``XᵀX`` as an operator (``Xᵀ(X V)``)."""
    from ..operators import FunctionOperator

    return FunctionOperator(
        lambda V: op.rmatmat(op.matmat(V)), (op.shape[1], op.shape[1]), op.dtype, op.device, symmetric=True
    )
