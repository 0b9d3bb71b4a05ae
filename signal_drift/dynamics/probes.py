r"""One-step SDR probes of Prop. 4 from a fixed state: change only ``η``, or only ``α``.

A probe takes one optimizer step from a checkpoint ``(θ, state)`` and measures
``SDR = ‖Δw_signal‖ / ‖Δw_drift‖`` (docs/theory.md#prop-4).

**η-probe.** ``Δθ = −k η0 D`` with ``D`` fixed, so ``SDR(k) = SDR(1) / k``: slope −1 is an
identity of the construction (``Δθ ∝ η``), not a measurement.

**α-probes.** Raising ``α`` by ``k`` at a checkpoint with ``B ≠ 0`` changes the network
function ``W = W0 + s B A`` (``s = γα/r``), hence the loss and ``g``. Two probes:

- *frozen state* (the earlier probe): ``(A, B)`` and the optimizer state fixed, gradient
  recomputed at ``kα``. The loss, ``g`` and the state/gradient balance all move with ``k``.
- *consistent*: hold the function fixed, ``(kα, A, B/k)``, so ``w``, the loss and ``g`` are
  unchanged. Then (per layer, ``G = ∂L/∂W``)

  .. math::

      ∇_A = k s (B/k)^T G = ∇_A^{(1)},\qquad ∇_B = k s\, G A^T = k ∇_B^{(1)},

  so the state is rescaled with its gradient: ``m_B → k m_B``, ``v_B → k² v_B`` (A blocks
  unchanged). Adam's ``m̂/√v̂`` (for ``ε → 0``), ``sign(∇)`` and Muon's polar factor of its
  momentum are then exactly the same direction ``D = (D_A, D_B)`` at every ``k``; SGD's is
  ``(D_A, k D_B)``. With ``S_B = s ΔB A``, ``S_A = s B ΔA``, ``Dr = s ΔB ΔA`` from the ``k = 1``
  step and the direction blocks scaling as ``(k^{p_A}, k^{p_B})``:

  .. math::

      SDR(k) = \frac{‖k^{1+p_B} S_B + k^{p_A} S_A‖}{k^{1+p_A+p_B} ‖Dr‖}

  (``p_A = p_B = 0`` for Adam, sign-SGD and Muon; ``p_B = 1`` for SGD). At ``B = 0``
  (``S_A = 0``) this is ``‖S_B‖/‖Dr‖`` for the normalised optimizers: exactly α-invariant,
  Prop. 4. At ``B ≠ 0`` what remains is the ``B ΔA`` part of the signal, which does not grow
  with ``α``: SDR falls from ``‖S_B + S_A‖/‖Dr‖`` toward ``‖S_B‖/‖Dr‖``. The probe reports this
  closed form beside the measurement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import grad_and_value

from ..decomposition import decompose_update, pullback
from ..lora import LoraProblem
from ..optim import OptimizerName, OptState, step_direction
from ..theory import loglog_slope

__all__ = ["SdrProbe", "sdr_probes", "consistent_alpha_point", "direction_exponents"]

TensorDict = dict[str, torch.Tensor]


def direction_exponents(optimizer: OptimizerName) -> tuple[int, int]:
    """``(p_A, p_B)``: the consistent α-probe's direction blocks scale as ``(k^{p_A}, k^{p_B})``.

    Normalised directions (Adam with ``ε → 0``, sign-SGD, Muon) do not move; SGD's B block is
    the gradient, ``∝ k``.
    """
    return (0, 1) if optimizer == "sgd" else (0, 0)


def consistent_alpha_point(
    problem: LoraProblem, theta: Mapping[str, torch.Tensor], state: OptState, k: float
) -> tuple[LoraProblem, TensorDict, OptState]:
    """The same network function and optimizer balance at ``k α``: ``(kα, A, B/k)``, ``m_B·k``, ``v_B·k²``.

    Args:
        problem: the problem at the checkpoint's ``α`` (per layer).
        theta: the checkpoint ``θ``.
        state: the checkpoint's optimizer state (first moment ``m``, second moment ``v``).
        k: the α multiplier.

    Returns:
        ``(problem at kα, θ with B/k, state with the B blocks' moments rescaled)``; the weights
        ``w`` are equal to round-off and ``∇_θ L`` becomes ``(∇_A, k ∇_B)`` (tested).
    """
    p = problem.with_alpha({a.name: k * a.alpha for a in problem.adapters})
    th, m, v = dict(theta), dict(state.m), dict(state.v)
    for a in problem.adapters:
        th[a.key_B] = theta[a.key_B] / k
        m[a.key_B] = state.m[a.key_B] * k
        v[a.key_B] = state.v[a.key_B] * k**2
    return p, th, OptState(state.t, m, v)


def _step(
    problem: LoraProblem, theta: TensorDict, state: OptState, lr: float, optimizer: OptimizerName, eps: float
) -> tuple[TensorDict, TensorDict]:
    """The step ``Δθ = −η D`` the optimizer takes from ``(θ, state)``, with ``D``."""
    G, _ = grad_and_value(problem.loss_w)({n: v.detach() for n, v in problem.weights(theta).items()})
    D, _ = step_direction(optimizer, pullback(problem, theta, G), state, eps=eps)
    return {n: -lr * d for n, d in D.items()}, D


def _norm(parts: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float((x * x).sum()) for x in parts))


def _slope(ks: Sequence[float], ys: Sequence[float]) -> float | None:
    """log–log slope, or None where a value is not finite and positive (e.g. zero drift)."""
    if len(ks) < 2 or not all(math.isfinite(y) and y > 0 for y in ys):
        return None
    return loglog_slope(ks, ys)


@dataclass(frozen=True)
class SdrProbe:
    """One-step SDR probes from one checkpoint (see the module docstring for the definitions).

    Attributes:
        multipliers: the ``k`` values.
        sdr_eta: SDR at ``(α0, k η0)``.
        slope_eta_identity: its log–log slope: −1 by construction (``Δθ ∝ η``).
        sdr_alpha_frozen_state: SDR at ``(kα0, η0)`` with ``(A, B)`` and the state frozen.
        slope_alpha_frozen_state: its slope.
        sdr_alpha_consistent: SDR at ``(kα0, A, B/k)`` with the state rescaled, ``η0``.
        slope_alpha_consistent: its slope.
        sdr_alpha_consistent_predicted: the closed form from the ``k = 1`` step.
        consistent_direction_change: ``max_k ‖D(k) − k^p D(1)‖/‖D(1)‖`` (0 up to Adam's ``ε``).
        signal_share_b_da: ``‖S_A‖/‖S_A + S_B‖`` at ``k = 1``: the part of the signal that does
            not grow with ``α`` (0 at ``B = 0``).
        sdr_alpha_consistent_limit: ``lim_{k→∞}`` of the consistent SDR, ``‖S_B‖/‖Dr‖``.
    """

    multipliers: list[float]
    sdr_eta: list[float]
    slope_eta_identity: float | None
    sdr_alpha_frozen_state: list[float]
    slope_alpha_frozen_state: float | None
    sdr_alpha_consistent: list[float]
    slope_alpha_consistent: float | None
    sdr_alpha_consistent_predicted: list[float]
    consistent_direction_change: float
    signal_share_b_da: float
    sdr_alpha_consistent_limit: float


def sdr_probes(
    problem: LoraProblem,
    checkpoint: tuple[Mapping[str, torch.Tensor], OptState],
    alpha0: float,
    lr0: float,
    multipliers: Sequence[float],
    optimizer: OptimizerName = "adam",
    eps: float = 1e-8,
) -> SdrProbe:
    """One-step SDR from a fixed state: the η-probe and both α-probes (module docstring).

    Args:
        problem: the LoRA problem (its ``α`` is replaced by ``alpha0``).
        checkpoint: ``(θ, optimizer state)`` before the step.
        alpha0: base ``α`` of every layer.
        lr0: base learning rate ``η0``.
        multipliers: the ``k`` values (positive).
        optimizer: ``adam``, ``sgd``, ``signsgd`` or ``muon``.
        eps: Adam's ``ε`` (the consistent probe's direction is exactly invariant for ``ε = 0``).

    Returns:
        An :class:`SdrProbe`.
    """
    theta, state = {n: v.detach() for n, v in checkpoint[0].items()}, checkpoint[1]
    base = problem.with_alpha(alpha0)
    ks = [float(k) for k in multipliers]
    step1, D1 = _step(base, theta, state, lr0, optimizer, eps)
    sdr_eta = [decompose_update(base, theta, {n: k * d for n, d in step1.items()}).sdr for k in ks]
    frozen, consistent, change = [], [], 0.0
    pa, pb = direction_exponents(optimizer)
    ref = _norm(list(D1.values()))
    for k in ks:
        p = base.with_alpha(k * alpha0)
        frozen.append(decompose_update(p, theta, _step(p, theta, state, lr0, optimizer, eps)[0]).sdr)
        pk, thk, stk = consistent_alpha_point(base, theta, state, k)
        stepk, Dk = _step(pk, thk, stk, lr0, optimizer, eps)
        consistent.append(decompose_update(pk, thk, stepk).sdr)
        diff = []
        for a in base.adapters:
            diff += [Dk[a.key_A] - k**pa * D1[a.key_A], Dk[a.key_B] - k**pb * D1[a.key_B]]
        change = max(change, _norm(diff) / ref if ref > 0 else 0.0)
    # closed form from the k = 1 step: S_B = sΔB A, S_A = sB ΔA, Dr = sΔB ΔA per layer
    S_B, S_A, Dr = [], [], []
    for a in base.adapters:
        A, B, dA, dB = theta[a.key_A], theta[a.key_B], step1[a.key_A], step1[a.key_B]
        S_B.append(a.scale * dB @ A)
        S_A.append(a.scale * B @ dA)
        Dr.append(a.scale * dB @ dA)
    nd = _norm(Dr)

    def predicted(k: float) -> float:
        sig = _norm([k ** (1 + pb) * sb + k**pa * sa for sb, sa in zip(S_B, S_A, strict=True)])
        return sig / (k ** (1 + pa + pb) * nd) if nd > 0 else float("inf")

    n_sig = _norm([sb + sa for sb, sa in zip(S_B, S_A, strict=True)])
    return SdrProbe(
        multipliers=ks,
        sdr_eta=sdr_eta,
        slope_eta_identity=_slope(ks, sdr_eta),
        sdr_alpha_frozen_state=frozen,
        slope_alpha_frozen_state=_slope(ks, frozen),
        sdr_alpha_consistent=consistent,
        slope_alpha_consistent=_slope(ks, consistent),
        sdr_alpha_consistent_predicted=[predicted(k) for k in ks],
        consistent_direction_change=change,
        signal_share_b_da=_norm(S_A) / n_sig if n_sig > 0 else 0.0,
        sdr_alpha_consistent_limit=_norm(S_B) / nd if nd > 0 else float("inf"),
    )
