"""Spectral density by stochastic Lanczos quadrature (SLQ).

Ubaru, Chen & Saad (2017), "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature";
Ghorbani, Krishnan & Xiao (2019), "An investigation into neural net optimization via Hessian
eigenvalue density". Each Rademacher probe ``v`` gives a Gauss quadrature ``{(θ_j, τ_j²)}`` of
the spectral measure ``Σ_i (v·u_i)² δ(λ − λ_i) / ‖v‖²``; averaging over probes estimates the
normalised density ``(1/P) Σ_i δ(λ − λ_i)``. Lanczos runs with full reorthogonalisation.

Counts and masses come with intervals that include the quadrature's bias. An ``m``-node Gauss
rule only pins the distribution function ``F_v(x) = μ_v((−∞, x))`` between its nodes: by the
Chebyshev–Markov–Stieltjes inequalities (Golub & Meurant, *Matrices, Moments and Quadrature*,
2010, Thm. 6.4), ``Σ_{j<k} τ_j² ≤ F_v(x) ≤ Σ_{j≤k+1} τ_j²`` for ``θ_k ≤ x < θ_{k+1}``. So the plain
estimate ``Σ_{θ_j<0} τ_j²`` can be off by the weight of the nodes next to 0 (where a cluster
of eigenvalues near 0 makes it biased in either direction), but the bracket is exact per probe,
and its probe average plus a Student-t term covers the true fraction
(:func:`~signal_drift.intervals.bracket_interval`). More Lanczos steps narrow the bracket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..intervals import Interval, bracket_interval, standard_error, t_quantile
from ..operators import LinearOperator
from .lanczos import lanczos_probes

__all__ = ["SLQResult", "slq"]

#: Memory for the Lanczos bases of the probes advanced together (each ``steps × P``).
_BASES_BYTES = 2**30


@dataclass(frozen=True)
class SLQResult:
    """Quadrature nodes and weights of every probe.

    Attributes:
        nodes: Ritz values ``[probes, m]``, ascending per probe.
        weights: squared first components of the Ritz vectors ``[probes, m]`` (rows sum to 1).
        dim: the operator's size ``P``.
        exact: ``[probes]``, True where Lanczos found an invariant subspace: that probe's measure
            is its quadrature exactly (the unused trailing nodes repeat the last one, weight 0).
    """

    nodes: np.ndarray
    weights: np.ndarray
    dim: int
    exact: np.ndarray | None = None

    def _exact(self) -> np.ndarray:
        return np.zeros(len(self.nodes), bool) if self.exact is None else np.asarray(self.exact)

    def distribution_bounds(self, x: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-probe bounds on ``F_v(x) = μ_v((−∞, x))`` (Chebyshev–Markov–Stieltjes).

        Returns:
            ``(lower, upper)``, each ``[probes]``; ``lower ≤ F_v(x) ≤ upper`` holds exactly for
            every probe (up to round-off in the Lanczos recurrence).
        """
        C = np.concatenate([np.zeros((len(self.nodes), 1)), np.cumsum(self.weights, 1)], 1)
        k = (self.nodes < x).sum(1)
        m = self.nodes.shape[1]
        rows = np.arange(len(k))
        lower = C[rows, np.maximum(k - 1, 0)]
        upper = C[rows, np.minimum(k + 1, m)]
        # an exact probe's measure is its quadrature, but an eigenvalue at x comes back as a node
        # within round-off of x: count nodes within δ = m·eps·max|θ| of x as either side
        ex = self._exact()
        delta = m * np.finfo(float).eps * np.nanmax(np.abs(self.nodes), axis=1)
        k_lo = (self.nodes < x - delta[:, None]).sum(1)
        k_hi = (self.nodes <= x + delta[:, None]).sum(1)
        lower[ex], upper[ex] = C[rows, k_lo][ex], C[rows, k_hi][ex]
        return lower, np.minimum(upper, 1.0)

    def negative_part_bounds(self, lower_edge: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-probe bounds on ``∫ max(−λ, 0) dμ_v = ∫_{λ_min}^0 F_v(x) dx``.

        Integrates the bounds of :meth:`distribution_bounds` between the nodes, from
        ``lower_edge`` (must be ``≤ λ_min`` of the operator) to 0.

        Returns:
            ``(lower, upper)``, each ``[probes]``.
        """
        n, m = self.nodes.shape
        C = np.concatenate([np.zeros((n, 1)), np.cumsum(self.weights, 1)], 1)  # C[:, k]: first k weights
        edges = np.concatenate([np.full((n, 1), lower_edge), self.nodes, np.zeros((n, 1))], 1)
        edges = np.minimum(np.maximum(edges, lower_edge), 0.0)
        edges = np.maximum.accumulate(edges, 1)
        length = np.diff(edges, axis=1)  # segment k: [θ_k, θ_{k+1}), k nodes to its left
        k = np.arange(m + 1)
        f_lo = C[:, np.maximum(k - 1, 0)]
        f_lo[:, 0] = 0.0
        f_hi = np.minimum(C[:, np.minimum(k + 1, m)], 1.0)
        ex = self._exact()
        f_lo[ex], f_hi[ex] = C[ex], C[ex]
        return (length * f_lo).sum(1), (length * f_hi).sum(1)

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

    def negative_fraction(self, level: float = 0.95) -> Interval:
        """Fraction of the eigenvalues below zero, with a band that includes the quadrature bias.

        ``estimate`` is the plain SLQ value ``mean_v Σ_{θ_j<0} τ_j²`` (biased when eigenvalues
        cluster near 0); ``[low, high]`` covers the true fraction with probability ``level``
        (per-probe bounds of :meth:`distribution_bounds` plus a Student-t term over probes).
        """
        per = (self.weights * (self.nodes < 0)).sum(1)
        lo, hi = self.distribution_bounds(0.0)
        return bracket_interval(float(per.mean()), lo, hi, level, self._method("count below 0"), (0.0, 1.0))

    def negative_mass(self, lower_edge: float, trace: float | None = None, level: float = 0.95) -> Interval:
        """``Σ_{λ<0} |λ| / Σ |λ|``, the share of spectral mass that is negative, with a band.

        Per probe, ``∫ λ⁻ dμ_v`` is bracketed (:meth:`negative_part_bounds`) and the positive part
        is ``∫ λ⁻ dμ_v + vᵀAv/‖v‖²`` (the quadrature integrates ``λ`` exactly). With the exact
        ``trace`` the ratio is ``n / (2n + tr/P)``, increasing in the one estimated mean ``n``;
        otherwise four one-sided bounds share the failure probability.

        Args:
            lower_edge: a lower bound on ``λ_min`` (e.g. a converged Lanczos ``λ_min`` minus its
                residual); the bracket's upper end assumes it.
            trace: ``tr A`` when known exactly.
            level: coverage of the band.
        """
        lo, hi = self.negative_part_bounds(lower_edge)
        rq = (self.weights * np.nan_to_num(self.nodes)).sum(1)  # vᵀAv/‖v‖² per probe
        neg = (self.weights * np.maximum(-np.nan_to_num(self.nodes), 0)).sum(1)
        n = len(lo)
        method = self._method("negative spectral mass")

        def ratio(a: float, b: float) -> float:
            return a / (a + b) if a + b > 0 else 0.0

        if trace is not None:
            # n / (2n + t): increasing in n when t >= 0, decreasing (towards 1/2) when t < 0;
            # the true 2n + t = E|λ| is positive, so a lower n with 2n + t <= 0 allows anything up to 1
            t = trace / self.dim
            est = ratio(float(neg.mean()), float(neg.mean()) + t)
            band = bracket_interval(float(neg.mean()), lo, hi, level, support=(0.0, math.inf))
            a, b = max(band.low, 0.0), band.high
            ends = [ratio(x, x + t) if 2 * x + t > 0 else 1.0 for x in (a, b)]
            return Interval(est, min(min(ends), est), max(max(ends), est), level, method + ", exact trace")
        q = t_quantile(level, n, sides=4)
        n_lo, n_hi = max(lo.mean() - q * standard_error(lo), 0.0), hi.mean() + q * standard_error(hi)
        pos_lo, pos_hi = lo + rq, hi + rq  # per-probe bounds on the positive part
        p_lo = max(pos_lo.mean() - q * standard_error(pos_lo), 0.0)
        p_hi = pos_hi.mean() + q * standard_error(pos_hi)
        est = ratio(float(neg.mean()), float((neg + rq).mean()))
        return Interval(est, min(ratio(n_lo, p_hi), est), max(ratio(n_hi, p_lo), est), level, method)

    def _method(self, what: str) -> str:
        return (
            f"SLQ {what}: Chebyshev–Markov–Stieltjes bounds per probe + Student-t over "
            f"{len(self.nodes)} probes ({self.nodes.shape[1]} Lanczos steps)"
        )


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
    nodes, weights, exact = [], [], []
    for tri in tris:
        theta, S = torch.linalg.eigh(tri.T())
        m = len(theta)
        th = np.full(steps, np.nan)
        w = np.zeros(steps)
        th[:m], w[:m] = theta.cpu().numpy(), (S[0] ** 2).cpu().numpy()
        th[m:] = th[m - 1]
        nodes.append(th)
        weights.append(w)
        exact.append(m < min(steps, op.shape[0]) or m == op.shape[0])
    return SLQResult(np.array(nodes), np.array(weights), op.shape[0], np.array(exact))
