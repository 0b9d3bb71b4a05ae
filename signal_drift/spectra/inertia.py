"""Exact eigenvalue counts by Sylvester's law of inertia, without eigenvalues.

For a symmetric ``M`` and a shift ``x``, ``M − xI = L D Lᵀ`` (Bunch–Kaufman, LAPACK ``sytrf``)
is a congruence, so ``M`` has exactly as many eigenvalues below ``x`` as ``D`` has negative
eigenvalues (``D`` is block diagonal with 1×1 and 2×2 blocks). The factorisation costs ``P³/3``
flops, a fraction of a dense eigendecomposition, and the count is exact for a matrix within the
factorisation's backward error of ``M``; evaluating it at ``x ± δ`` brackets the count at ``x``
robustly (:func:`count_below`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Inertia", "inertia", "count_below"]


@dataclass(frozen=True)
class Inertia:
    """Numbers of negative, zero and positive pivots' eigenvalues of ``D`` in ``M = L D Lᵀ``."""

    negative: int
    zero: int
    positive: int


def inertia(M: torch.Tensor) -> Inertia:
    """The inertia of a symmetric matrix from its ``L D Lᵀ`` factorisation.

    Args:
        M: symmetric ``[P, P]``.

    Returns:
        :class:`Inertia` (``zero`` counts pivots that are exactly 0).

    >>> M = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # eigenvalues ±1
    >>> inertia(M)
    Inertia(negative=1, zero=0, positive=1)
    """
    LD, piv = torch.linalg.ldl_factor(M)
    d = torch.diagonal(LD).cpu()
    off = torch.diagonal(LD, -1).cpu()
    piv = piv.cpu().tolist()
    neg = zero = pos = 0
    k, P = 0, M.shape[0]
    while k < P:
        if piv[k] > 0:  # 1×1 pivot
            vals = [float(d[k])]
            k += 1
        else:  # 2×2 pivot on rows k, k+1 (LAPACK: both entries negative)
            a, b, c = float(d[k]), float(off[k]), float(d[k + 1])
            vals = torch.linalg.eigvalsh(torch.tensor([[a, b], [b, c]], dtype=torch.float64)).tolist()
            k += 2
        for v in vals:
            neg, zero, pos = neg + (v < 0), zero + (v == 0), pos + (v > 0)
    return Inertia(neg, zero, pos)


def count_below(M: torch.Tensor, x: float = 0.0, delta: float | None = None) -> tuple[int, int]:
    """Bracket the number of eigenvalues of ``M`` below ``x``.

    Args:
        M: symmetric ``[P, P]``.
        x: the threshold.
        delta: half-width of the ambiguity zone; defaults to ``P · eps · ‖M‖_F``, above the
            backward error of the factorisation.

    Returns:
        ``(low, high)``: the numbers of eigenvalues below ``x − δ`` and below ``x + δ``. The count
        below ``x`` lies between them; ``low == high`` makes it exact.

    >>> M = torch.diag(torch.tensor([-2.0, -1.0, 0.5, 3.0], dtype=torch.float64))
    >>> count_below(M)
    (2, 2)
    """
    if delta is None:
        delta = M.shape[0] * torch.finfo(M.dtype).eps * float(torch.linalg.matrix_norm(M))
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    low = inertia(M - (x - delta) * eye).negative
    high = inertia(M - (x + delta) * eye).negative
    return low, high
