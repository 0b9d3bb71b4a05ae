"""Lanczos tridiagonalisation with full reorthogonalisation, and extreme eigenpairs.

Two paths to the extreme eigenvalues of any symmetric :class:`~signal_drift.LinearOperator`:

- :func:`eigsh`: SciPy's ARPACK (implicitly restarted Lanczos) through ``op.to_scipy()``;
- :func:`lanczos_eigs`: a torch-native Lanczos (runs on the operator's device, e.g. CUDA).

Both report the true residual ``‖A v − λ v‖`` of every returned pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse.linalg as spla
import torch
from tqdm.auto import tqdm

from .._errors import InputError
from ..operators import LinearOperator

__all__ = [
    "LanczosTridiag",
    "EigResult",
    "lanczos",
    "lanczos_probes",
    "lanczos_eigs",
    "eigsh",
    "dense_eigvalsh",
]


#: DGKS threshold: reorthogonalise again when one pass leaves less than this fraction of ‖w‖.
_DGKS = 0.5**0.5


@dataclass(frozen=True)
class LanczosTridiag:
    """``Q^T A Q = T`` with ``T = tridiag(beta, alpha, beta)``.

    Attributes:
        alpha: diagonal of ``T``, ``[m]``.
        beta: off-diagonal of ``T``, ``[m - 1]``.
        Q: Lanczos basis ``[P, m]`` (orthonormal columns).
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    Q: torch.Tensor

    def T(self) -> torch.Tensor:  # noqa: N802
        """The ``[m, m]`` tridiagonal matrix."""
        return torch.diag(self.alpha) + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)


#: A returned pair counts as converged when ``‖A v − λ v‖ ≤ ACCEPT · max|λ|`` (then ``λ`` is within
#: that distance of an eigenvalue of ``A``).
ACCEPT = 1e-6


@dataclass(frozen=True)
class EigResult:
    """Eigenpairs with their residuals and whether each converged.

    Attributes:
        values: eigenvalues, ascending, ``[k]``.
        vectors: eigenvectors ``[P, k]``.
        residuals: ``‖A v_i − λ_i v_i‖`` per pair, ``[k]``.
        matvecs: number of operator products used.
        converged: ``residuals ≤ accept · scale`` per pair, ``[k]`` (``scale``: the largest
            ``|λ|`` seen by the solver, i.e. about ``‖A‖``: each value is then within
            ``accept · ‖A‖`` of an eigenvalue; a caller that needs accuracy relative to ``|λ|``
            itself re-judges with ``dataclasses.replace``, as ``calibrate`` does).
        accept: the relative residual that counts as converged.
    """

    values: np.ndarray
    vectors: np.ndarray
    residuals: np.ndarray
    matvecs: int
    converged: np.ndarray | None = None
    accept: float = ACCEPT

    def checked(self, name: str = "λ") -> tuple[np.ndarray, list[str]]:
        """The values with NaN where a pair did not converge, and one warning per such pair.

        >>> r = EigResult(np.array([1.0, 2.0]), np.eye(2), np.array([1e-12, 0.5]), 4, np.array([True, False]))
        >>> r.checked("λ_max")
        (array([ 1., nan]), ['λ_max = 2 not converged (residual 5.00e-01 > 1e-06 relative): reported as NaN'])
        """
        conv = np.ones(len(self.values), bool) if self.converged is None else self.converged
        vals = np.where(conv, self.values, np.nan)
        warn = [
            f"{name} = {v:.6g} not converged (residual {r:.2e} > {self.accept:g} relative): reported as NaN"
            for v, r, c in zip(self.values, self.residuals, conv, strict=True)
            if not c
        ]
        return vals, warn


def lanczos(
    op: LinearOperator,
    v0: torch.Tensor,
    steps: int,
    stop: Callable[[torch.Tensor, torch.Tensor, float], bool] | None = None,
    check_every: int = 10,
) -> LanczosTridiag:
    """``steps`` Lanczos iterations from ``v0`` with full reorthogonalisation.

    Stops early on an invariant subspace (``β < 1e-12 ‖T‖``), or when
    ``stop(alpha, beta, beta_next)`` returns True (checked every ``check_every`` steps).

    >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    >>> from signal_drift.operators import FunctionOperator
    >>> op = FunctionOperator(lambda V: A @ V, (5, 5), torch.float64, symmetric=True)
    >>> tri = lanczos(op, torch.ones(5, dtype=torch.float64), 5)
    >>> torch.linalg.eigvalsh(tri.T()).round(decimals=8).tolist()
    [1.0, 2.0, 3.0, 4.0, 5.0]
    """
    v0 = v0.reshape(-1, 1)
    return lanczos_probes(op, v0, steps, stop=stop, check_every=check_every, keep_basis=True)[0]


def lanczos_probes(
    op: LinearOperator,
    V0: torch.Tensor,
    steps: int,
    progress: bool = False,
    stop: Callable[[torch.Tensor, torch.Tensor, float], bool] | None = None,
    check_every: int = 10,
    keep_basis: bool = False,
) -> list[LanczosTridiag]:
    """Independent Lanczos runs from the columns of ``V0`` ``[P, k]``, advanced together.

    Each run reorthogonalises fully against its own basis (classical Gram–Schmidt, a second pass
    only where the first cancelled much of ``w``: the DGKS test ARPACK uses) and stops on its own
    invariant subspace or ``stop``. Advancing them together makes every step one ``op.matmat`` of
    ``k`` vectors, which turns memory-bound matrix-vector products into GEMMs (SLQ probes).

    Args:
        op: symmetric operator ``[P, P]``.
        V0: start vectors ``[P, k]``.
        steps: iterations per run (at most ``P``).
        progress: tqdm bar over steps.
        stop: ``stop(alpha, beta, beta_next)`` per run, checked every ``check_every`` steps.
        check_every: see ``stop``.
        keep_basis: return each run's basis ``Q`` ``[P, m]`` (otherwise ``[P, 0]``).

    Returns:
        One :class:`LanczosTridiag` per column.
    """
    if not op.symmetric:
        raise InputError("lanczos needs a symmetric operator")
    P, k = V0.shape
    steps = min(int(steps), P)
    dt, dev, tiny = op.dtype, op.device, torch.finfo(op.dtype).tiny
    # each run's basis row-wise, [steps, P]: reorthogonalising reads its j + 1 contiguous rows,
    # not the whole basis (memory-bound at large P)
    Q = torch.zeros(k, steps, P, dtype=dt, device=dev)
    alpha = torch.zeros(k, steps, dtype=dt, device=dev)
    beta = torch.zeros(k, max(steps - 1, 0), dtype=dt, device=dev)
    q = V0.to(dt).to(dev).T
    q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
    active = [True] * k
    m = [steps] * k
    for j in tqdm(range(steps), desc="Lanczos", disable=not progress, leave=False):
        Q[:, j] = q
        w = op.matmat(q.T).T.contiguous()  # [k, P]
        alpha[:, j] = (q * w).sum(1)
        for i in range(k):
            if not active[i]:
                continue
            Qi, norm_in = Q[i, : j + 1], torch.linalg.vector_norm(w[i])
            w[i] -= Qi.T @ (Qi @ w[i])
            if torch.linalg.vector_norm(w[i]) < _DGKS * norm_in:  # "twice is enough"
                w[i] -= Qi.T @ (Qi @ w[i])
        if j == steps - 1:
            break
        b = torch.linalg.vector_norm(w, dim=1)
        for i in range(k):
            if not active[i]:
                continue
            # invariant subspace: β below 1e-12 ‖T‖ (Gershgorin bound max|α| + 2 max β, within 3× of ‖T‖)
            t_norm = alpha[i, : j + 1].abs().max() + (2 * beta[i, :j].max() if j else 0.0)
            done = bool(b[i] < 1e-12 * t_norm.clamp_min(tiny))
            if not done:
                beta[i, j] = b[i]
                checked = stop is not None and (j + 1) % check_every == 0
                done = checked and stop(alpha[i, : j + 1], beta[i, :j], float(b[i]))
            if done:
                m[i], active[i] = j + 1, False
        if not any(active):
            break
        on = torch.tensor(active, device=dev)[:, None]
        q = torch.where(on, w / b.clamp_min(tiny)[:, None], torch.zeros_like(w))
    empty = torch.zeros(P, 0, dtype=dt, device=dev)
    return [
        LanczosTridiag(alpha[i, : m[i]], beta[i, : max(m[i] - 1, 0)], Q[i, : m[i]].T if keep_basis else empty)
        for i in range(k)
    ]


def lanczos_eigs(
    op: LinearOperator,
    k: int = 1,
    which: Literal["LA", "SA", "BE"] = "LA",
    steps: int = 100,
    seed: int = 0,
    tol: float = 1e-10,
    accept: float = ACCEPT,
) -> EigResult:
    """Extreme eigenpairs by torch-native Lanczos (GPU-capable), with true residuals.

    ``which="BE"`` returns ``k`` pairs from each end of the spectrum out of one Krylov space.
    Iterates until the wanted Ritz pairs' residual estimates ``|β_m s_{m,i}|`` fall below
    ``tol · max|θ|`` (checked every 10 steps) or ``steps`` is reached. A pair whose true
    residual exceeds ``accept · max|θ|`` is marked not converged (``EigResult.converged``);
    :meth:`EigResult.checked` turns those into NaN with a warning.
    """
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(op.shape[0], generator=gen, dtype=op.dtype)

    def converged(alpha: torch.Tensor, beta: torch.Tensor, b_next: float) -> bool:
        T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
        th, S = torch.linalg.eigh(T)
        if len(th) < 2 * k + 2:
            return False
        ends = {"SA": S[-1, :k], "LA": S[-1, -k:], "BE": torch.cat([S[-1, :k], S[-1, -k:]])}[which]
        return bool((b_next * ends.abs()).max() < tol * th.abs().max())

    tri = lanczos(op, v0, steps, stop=converged if tol > 0 else None)
    theta, S = torch.linalg.eigh(tri.T())
    lo, hi = (
        torch.arange(k, device=theta.device),
        torch.arange(len(theta) - k, len(theta), device=theta.device),
    )
    idx = {"SA": lo, "LA": hi, "BE": torch.cat([lo, hi])}[which]
    vals, vecs = theta[idx], tri.Q @ S[:, idx]
    res = torch.linalg.vector_norm(op.matmat(vecs) - vecs * vals, dim=0).cpu().numpy()
    conv = res <= accept * float(theta.abs().max())
    return EigResult(vals.cpu().numpy(), vecs.cpu().numpy(), res, tri.Q.shape[1] + k, conv, accept)


def eigsh(
    op: LinearOperator,
    k: int = 1,
    which: Literal["LA", "SA"] = "LA",
    tol: float = 1e-10,
    seed: int = 0,
    accept: float = ACCEPT,
) -> EigResult:
    """Extreme eigenpairs by SciPy's ``eigsh`` on ``op.to_scipy()``, with true residuals.

    Args:
        op: symmetric operator.
        k: number of eigenpairs.
        which: ``"LA"`` (largest algebraic) or ``"SA"`` (smallest algebraic).
        tol: ARPACK's relative accuracy.
        seed: seed of the start vector (deterministic results).
        accept: relative residual above which a pair is marked not converged.
    """
    if which not in ("LA", "SA"):
        raise InputError(f"which={which!r} is invalid: use 'LA' or 'SA'")
    count = [0]
    sp = op.to_scipy()

    def mv(x: np.ndarray) -> np.ndarray:
        count[0] += 1
        return sp.matvec(x)

    lin = spla.LinearOperator(op.shape, matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(op.shape[0])
    vals, vecs = spla.eigsh(lin, k=k, which=which, tol=tol, v0=v0)
    order = np.argsort(vals)
    vals, vecs = vals[order], vecs[:, order]
    res = np.linalg.norm(sp.matmat(vecs) - vecs * vals, axis=0)
    conv = res <= accept * float(np.abs(vals).max())
    return EigResult(vals, vecs, res, count[0] + k, conv, accept)


def dense_eigvalsh(op: LinearOperator, budget: int | None = None) -> torch.Tensor:
    """All eigenvalues (ascending) of a symmetric operator via its dense form (memory-guarded)."""
    return torch.linalg.eigvalsh(op.to_dense(budget))
