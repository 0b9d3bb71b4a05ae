"""Step directions of the optimisers analysed in Prop. 2: GD, sign-Adam, Muon.

Each returns a direction ``D`` with the step ``Δθ = -η D``; inputs and outputs are
``{key: tensor}`` dicts over ``θ``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from ._errors import DivergenceError, InputError

__all__ = ["adam_steps", "gd_direction", "sign_direction", "muon_direction", "newton_schulz_orthogonalize"]

TensorDict = dict[str, torch.Tensor]


def gd_direction(grad: Mapping[str, torch.Tensor]) -> TensorDict:
    """Gradient descent: ``D = ∇_θ L``."""
    return {k: v.clone() for k, v in grad.items()}


def sign_direction(grad: Mapping[str, torch.Tensor]) -> TensorDict:
    """Adam abstracted as sign descent: ``D = sign(∇_θ L)`` elementwise (paper Eq. 24)."""
    return {k: torch.sign(v) for k, v in grad.items()}


def newton_schulz_orthogonalize(G: torch.Tensor, steps: int = 60) -> torch.Tensor:
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


def adam_steps(
    loss: Callable[[TensorDict], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    steps: int,
    lr: float,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    progress: bool = False,
    desc: str = "adam",
) -> TensorDict:
    """Run ``steps`` Adam steps on ``loss`` from ``params`` (pure: returns new tensors).

    Args:
        loss: scalar function of a ``{name: tensor}`` dict.
        params: starting point.
        steps: number of steps (0 returns a copy).
        lr: learning rate ``η``.
        betas: Adam's ``(β1, β2)``.
        eps: Adam's ``ε``.
        progress: show a tqdm bar.
        desc: bar label.

    Returns:
        The parameters after ``steps`` steps.

    Raises:
        DivergenceError: when the loss at a step's start, or a parameter after it, is NaN/Inf
            (an infinite gradient of a finite loss included), naming the step.
    """
    from tqdm.auto import tqdm

    p = {k: v.detach().clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    value_and_grad = torch.func.grad_and_value(loss)
    b1, b2 = betas
    for t in tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False):
        g, value = value_and_grad(p)
        if not torch.isfinite(value):
            raise DivergenceError(f"{desc}: loss became {float(value)} at step {t}", step=t)
        for k in p:
            m[k].mul_(b1).add_(g[k], alpha=1 - b1)
            v2[k].mul_(b2).addcmul_(g[k], g[k], value=1 - b2)
            mhat = m[k] / (1 - b1**t)
            vhat = v2[k] / (1 - b2**t)
            p[k] = p[k] - lr * mhat / (vhat.sqrt() + eps)
            if not torch.isfinite(p[k]).all():
                bad = int((~torch.isfinite(p[k])).sum())
                msg = f"{desc}: parameter {k!r} has {bad} NaN/Inf entries after step {t}"
                raise DivergenceError(msg, step=t)
    return p


OptimizerName = Literal["adam", "sgd", "signsgd", "muon"]


@dataclass(frozen=True)
class OptState:
    """Optimizer state (step count and moment estimates); immutable, replaced at each step."""

    t: int
    m: TensorDict
    v: TensorDict


def init_opt_state(params: Mapping[str, torch.Tensor]) -> OptState:
    """Zero moments for ``params``."""
    return OptState(
        0,
        {k: torch.zeros_like(p) for k, p in params.items()},
        {k: torch.zeros_like(p) for k, p in params.items()},
    )


def step_direction(
    name: OptimizerName,
    grad: Mapping[str, torch.Tensor],
    state: OptState,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.95,
) -> tuple[TensorDict, OptState]:
    """One optimizer step's direction ``D`` (the step is ``Δθ = −η D``) and the next state.

    - ``adam``: bias-corrected ``m̂ / (sqrt(v̂) + ε)``;
    - ``sgd``: ``∇θ L``;
    - ``signsgd``: ``sign(∇θ L)`` (Adam abstracted as sign descent, paper Eq. 24);
    - ``muon``: momentum ``m ← μ m + g``, then ``D = U Vᵀ`` of ``m`` per matrix (exact polar
      factor by Newton–Schulz, checked against an SVD in the tests).
    """
    t = state.t + 1
    if name == "adam":
        b1, b2 = betas
        m = {k: b1 * state.m[k] + (1 - b1) * g for k, g in grad.items()}
        v = {k: b2 * state.v[k] + (1 - b2) * g * g for k, g in grad.items()}
        D = {k: (m[k] / (1 - b1**t)) / ((v[k] / (1 - b2**t)).sqrt() + eps) for k in grad}
        return D, OptState(t, m, v)
    if name == "sgd":
        return gd_direction(grad), OptState(t, state.m, state.v)
    if name == "signsgd":
        return sign_direction(grad), OptState(t, state.m, state.v)
    if name == "muon":
        m = {k: momentum * state.m[k] + g for k, g in grad.items()}
        return muon_direction(m, method="newton_schulz"), OptState(t, m, state.v)
    raise InputError(f"optimizer={name!r} is invalid: use adam, sgd, signsgd or muon")
