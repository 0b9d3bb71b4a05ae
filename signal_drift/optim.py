"""Step directions of the optimisers analysed in Prop. 2: GD, sign-Adam, Muon.

Each returns a direction ``D`` with the step ``Δθ = -η D``; inputs and outputs are
``{key: tensor}`` dicts over ``θ``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

__all__ = ["gd_direction", "sign_direction", "muon_direction", "newton_schulz_orthogonalize"]

TensorDict = dict[str, torch.Tensor]


def gd_direction(grad: Mapping[str, torch.Tensor]) -> TensorDict:
    """Gradient descent: ``D = ∇_θ L``."""
    return {k: v.clone() for k, v in grad.items()}


def sign_direction(grad: Mapping[str, torch.Tensor]) -> TensorDict:
    """Adam abstracted as sign descent: ``D = sign(∇_θ L)`` elementwise (paper Eq. 24)."""
    return {k: torch.sign(v) for k, v in grad.items()}


def newton_schulz_orthogonalize(G: torch.Tensor, steps: int = 30) -> torch.Tensor:
    """Approximate ``U V^T`` of ``G = U Σ V^T`` by the cubic Newton–Schulz iteration.

    Converges to the exact polar factor for full-rank ``G`` (singular values mapped to 1);
    Muon's quintic variant trades exactness for speed, this one is exact in the limit.

    Args:
        G: ``[m, n]`` matrix.
        steps: number of iterations.

    """
    X = G / (torch.linalg.matrix_norm(G) + torch.finfo(G.dtype).tiny)
    transpose = X.shape[0] > X.shape[1]
    if transpose:
        X = X.T
    for _ in range(steps):
        X = 1.5 * X - 0.5 * (X @ X.T) @ X
    return X.T if transpose else X


def muon_direction(
    grad: Mapping[str, torch.Tensor], method: Literal["svd", "newton_schulz"] = "svd"
) -> TensorDict:
    """Muon: per matrix block ``G = U Σ V^T``, ``D = U V^T`` (Prop. 2(i)).

    Args:
        grad: gradient blocks (2-D each).
        method: exact SVD or Newton–Schulz iteration.

    """
    out = {}
    for k, G in grad.items():
        if method == "svd":
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            rank = int((S > S.max() * G.shape[0] * torch.finfo(G.dtype).eps).sum()) if S.numel() else 0
            out[k] = U[:, :rank] @ Vh[:rank]
        else:
            out[k] = newton_schulz_orthogonalize(G)
    return out
