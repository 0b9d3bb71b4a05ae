"""Spectral density by stochastic Lanczos quadrature (SLQ).

Ubaru, Chen & Saad (2017), "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature";
Ghorbani, Krishnan & Xiao (2019), "An investigation into neural net optimization via Hessian
eigenvalue density". Each Rademacher probe ``v`` gives a Gauss quadrature ``{(θ_j, τ_j²)}`` of
the spectral measure ``Σ_i (v·u_i)² δ(λ − λ_i) / ‖v‖²``; averaging over probes estimates the
normalised density ``(1/P) Σ_i δ(λ − λ_i)``. Lanczos runs with full reorthogonalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..operators import LinearOperator
from .lanczos import lanczos_probes

__all__ = ["SLQResult", "slq"]

#: Memory for the Lanczos bases of the probes advanced together (each ``steps × P``).
_BASES_BYTES = 2**30


@dataclass(frozen=True)
class SLQResult:
    """Quadrature nodes and weights of every probe.

    Attributes:
        nodes: Ritz values ``[probes, m]``.
        weights: squared first components of the Ritz vectors ``[probes, m]`` (rows sum to 1).
        dim: the operator's size ``P``.
    """

    nodes: np.ndarray
    weights: np.ndarray
    dim: int

    def density(self, grid: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian-broadened density on ``grid`` and its standard error across probes.

        Returns:
            ``(density, stderr)``, each ``[len(grid)]``; the density integrates to ~1.
        """
        g = np.asarray(grid)[None, None, :]
        kern = np.exp(-0.5 * ((g - self.nodes[..., None]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        per_probe = (self.weights[..., None] * kern).sum(1)  # [probes, grid]
        se = (
            per_probe.std(0, ddof=1) / np.sqrt(len(per_probe))
            if len(per_probe) > 1
            else np.zeros(g.shape[-1])
        )
        return per_probe.mean(0), se

    def trace(self) -> tuple[float, float]:
        """``tr(A) ≈ P · E[Σ τ² θ]`` with its standard error across probes."""
        per = self.dim * (self.weights * self.nodes).sum(1)
        return float(per.mean()), float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else 0.0

    def negative_fraction(self) -> tuple[float, float]:
        """Fraction of the spectrum below zero (count), with its standard error."""
        per = (self.weights * (self.nodes < 0)).sum(1)
        return float(per.mean()), float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else 0.0


def slq(
    op: LinearOperator, probes: int = 8, steps: int = 80, seed: int = 0, progress: bool = False
) -> SLQResult:
    """Run SLQ on a symmetric operator.

    Args:
        op: symmetric operator ``[P, P]``.
        probes: number of Rademacher probe vectors.
        steps: Lanczos steps per probe.
        seed: RNG seed (results are deterministic given it).
        progress: show a tqdm bar over Lanczos steps.
    """
    gen = torch.Generator().manual_seed(seed)
    V = torch.stack(
        [torch.randint(0, 2, (op.shape[0],), generator=gen).to(op.dtype) * 2 - 1 for _ in range(probes)], 1
    )
    # probes advance together, as many at a time as keep their bases within _BASES_BYTES
    per_probe = min(steps, op.shape[0]) * op.shape[0] * torch.finfo(op.dtype).bits // 8
    group = max(1, min(probes, _BASES_BYTES // max(per_probe, 1)))
    tris = []
    for g0 in range(0, probes, group):
        tris += lanczos_probes(op, V[:, g0 : g0 + group], steps, progress=progress)
    nodes, weights = [], []
    for tri in tris:
        theta, S = torch.linalg.eigh(tri.T())
        m = len(theta)
        th = np.full(steps, np.nan)
        w = np.zeros(steps)
        th[:m], w[:m] = theta.cpu().numpy(), (S[0] ** 2).cpu().numpy()
        th[m:] = th[m - 1]
        nodes.append(th)
        weights.append(w)
    return SLQResult(np.array(nodes), np.array(weights), op.shape[0])
