r"""The block structure of ``H_θ(α) = α² S₁ + α D₁`` at initialisation (``B = 0``).

At ``B = 0`` the network output, hence ``g`` and ``H``, do not depend on ``α``, so
``H_signal(α) = α² S₁`` and ``H_drift(α) = α D₁`` exactly (Prop. 1 and 4). Both are sparse in
the ``(A, B)`` split of ``θ``:

- ``S₁ = J_Bᵀ H J_B`` lives on the ``B`` block only (``J_A = s(I ⊗ B) = 0``);
- ``D₁`` couples each layer's ``A`` with its own ``B``, ``[[0, C_l], [C_lᵀ, 0]]``, so its
  eigenvalues are ``±σ(C_l)`` and zeros (Prop. 2(ii)).

So

.. math::

    H_θ(α) = \begin{pmatrix} 0 & α C \\ α C^T & α² S_{BB} \end{pmatrix}

has a zero ``A`` block, its products cost ``|B|² + 2 Σ_l |A_l||B_l|`` multiply-adds instead of
``P²``, and its inertia is known exactly in the common case (:meth:`InitBlocks.negative_count`).
:class:`InitBlocks` holds these blocks, cut once from the dense ``S₁`` and ``D₁``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._errors import InputError
from ..lora import LoraProblem
from ..operators import FunctionOperator, LinearOperator
from .inertia import count_below

__all__ = ["Coupling", "InitBlocks"]


@dataclass(frozen=True)
class Coupling:
    """One layer's drift block ``C_l = D₁[A_l, B_l]`` at ``B = 0``.

    Attributes:
        iA: flat indices of ``A_l`` in ``θ``, ``[|A_l|]``.
        iB: flat indices of ``B_l`` in ``θ``, ``[|B_l|]``.
        C: the block ``[|A_l|, |B_l|]``.
        singular_values: ``σ(C_l)``, descending.
    """

    iA: torch.Tensor
    iB: torch.Tensor
    C: torch.Tensor
    singular_values: torch.Tensor


@dataclass(frozen=True)
class InitBlocks:
    """The non-zero blocks of ``S₁`` and ``D₁`` at ``B = 0`` (see the module docstring).

    >>> S1 = torch.zeros(4, 4, dtype=torch.float64); S1[2:, 2:] = torch.eye(2)
    >>> D1 = torch.zeros(4, 4, dtype=torch.float64); D1[:2, 2:] = 3 * torch.eye(2)
    >>> D1 = D1 + D1.T
    >>> blocks = InitBlocks(4, torch.tensor([2, 3]), S1[2:, 2:],
    ...                     (Coupling(torch.tensor([0, 1]), torch.tensor([2, 3]), D1[:2, 2:],
    ...                               torch.tensor([3.0, 3.0], dtype=torch.float64)),), 2.0)
    >>> [e.tolist() for e in blocks.eigvalsh()]
    [[0.0, 0.0, 1.0, 1.0], [-3.0, -3.0, 3.0, 3.0]]
    >>> torch.equal(blocks.H_theta(2.0).to_dense(), 4 * S1 + 2 * D1)
    True
    >>> blocks.negative_count(2.0)
    (2, 'exact: |A| (zero A block, invertible square C_l)')

    Attributes:
        size: ``P_θ``, the number of LoRA parameters.
        iB: flat indices of every ``B`` block, ``[|B|]``.
        S_BB: ``S₁[B, B]``, ``[|B|, |B|]``.
        couplings: one :class:`Coupling` per adapter, in adapter order.
        trace_signal: ``tr S₁``.
    """

    size: int
    iB: torch.Tensor
    S_BB: torch.Tensor
    couplings: tuple[Coupling, ...]
    trace_signal: float

    @classmethod
    def from_dense(cls, problem: LoraProblem, S1: torch.Tensor, D1: torch.Tensor) -> InitBlocks:
        """Cut the blocks out of the dense ``S₁`` and ``D₁`` ``[P_θ, P_θ]`` (``α = 1``, ``B = 0``).

        The block indices live on ``S₁``'s device (made once: every product of :meth:`H_theta`
        indexes with them, with no host copy).
        """
        lay, dev = problem.theta_layout, S1.device
        iB = lay.indices([a.key_B for a in problem.adapters], device=dev)
        couplings = []
        for a in problem.adapters:
            iA_l, iB_l = lay.indices([a.key_A], device=dev), lay.indices([a.key_B], device=dev)
            C = D1[iA_l[:, None], iB_l]
            couplings.append(Coupling(iA_l, iB_l, C, torch.linalg.svdvals(C)))
        return cls(S1.shape[0], iB, S1[iB[:, None], iB], tuple(couplings), float(torch.trace(S1)))

    def eigvalsh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact spectra of ``S₁`` (its ``B`` block, then zeros) and ``D₁`` (``±σ(C_l)``, then zeros).

        Returns:
            ``(eig S₁, eig D₁)``, each ``[P_θ]`` ascending.
        """
        S_BB = self.S_BB
        sig = torch.linalg.eigvalsh(S_BB)
        sv = torch.cat([c.singular_values for c in self.couplings])
        zeros = lambda k: torch.zeros(k, dtype=S_BB.dtype, device=S_BB.device)  # noqa: E731
        eS = torch.sort(torch.cat([sig, zeros(self.size - len(sig))])).values
        eD = torch.sort(torch.cat([sv, -sv, zeros(self.size - 2 * len(sv))])).values
        return eS, eD

    def trace_H_theta(self, alpha: float) -> float:
        """``tr H_θ(α) = α² tr S₁`` (``tr D₁ = 0``: the drift is block off-diagonal)."""
        return alpha * alpha * self.trace_signal

    def H_theta(self, alpha: float) -> LinearOperator:
        """``α² S₁ + α D₁`` as a symmetric operator ``[P_θ, P_θ]`` through the non-zero blocks only."""
        iB, S_BB = self.iB, self.S_BB

        def matmat(V: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(V)
            out[iB] = (alpha * alpha) * (S_BB @ V[iB])
            for c in self.couplings:
                out[c.iA] += alpha * (c.C @ V[c.iB])
                out[c.iB] += alpha * (c.C.T @ V[c.iA])
            return out

        P = self.size
        return FunctionOperator(matmat, (P, P), S_BB.dtype, S_BB.device, symmetric=True)

    def dense_H_theta(self, alpha: float) -> torch.Tensor:
        """``α² S₁ + α D₁`` as a dense ``[P_θ, P_θ]`` matrix."""
        S_BB = self.S_BB
        M = torch.zeros(self.size, self.size, dtype=S_BB.dtype, device=S_BB.device)
        M[self.iB[:, None], self.iB] = (alpha * alpha) * S_BB
        for c in self.couplings:
            M[c.iA[:, None], c.iB] = alpha * c.C
            M[c.iB[:, None], c.iA] = alpha * c.C.T
        return M

    def negative_count(self, alpha: float) -> tuple[int, str]:
        """The exact number of negative eigenvalues of ``H_θ(α)``, and how it was found.

        The ``A`` block of ``H_θ`` is exactly zero at init, so ``H_θ`` has a neutral subspace of
        dimension ``|A|``: it has at least ``|A|`` eigenvalues ``≥ 0`` and ``|A|`` eigenvalues
        ``≤ 0``. When every layer's coupling ``C_l`` is square (``|A_l| = |B_l|``, square layers)
        and invertible, ``det H_θ = ±∏ det(αC_l)² ≠ 0``, so no eigenvalue is 0 and exactly
        ``|A| = P_θ/2`` are negative, whatever ``S_BB`` and ``α > 0`` are (Sylvester's law of
        inertia). Otherwise the count comes from an ``L D Lᵀ`` factorisation of the dense
        ``H_θ(α)`` (:func:`~signal_drift.spectra.inertia.count_below`).

        Returns:
            ``(count, method)``.
        """
        if not alpha > 0:
            raise InputError(f"alpha={alpha} is invalid: the count needs α > 0")
        svals = [c.singular_values for c in self.couplings]
        top = max(float(s.max()) for s in svals)
        square = all(c.C.shape[0] == c.C.shape[1] for c in self.couplings)
        # invertible beyond round-off of the SVD in this dtype (a singular C_l computes σ_min ≈ n·eps·σ_max)
        tol = 100 * max(max(c.C.shape) for c in self.couplings) * torch.finfo(svals[0].dtype).eps * top
        if square and all(float(s.min()) > tol for s in svals):
            n_A = sum(c.C.shape[0] for c in self.couplings)
            return n_A, "exact: |A| (zero A block, invertible square C_l)"
        low, high = count_below(self.dense_H_theta(alpha))
        if low != high:
            return low, f"LDLᵀ inertia: between {low} and {high} (eigenvalues within round-off of 0)"
        return low, "exact: LDLᵀ inertia"
