r"""Signal–drift decomposition of LoRA curvature and updates (Prop. 1).

Because ``θ -> w`` is bilinear, for any step ``Δθ = (ΔA, ΔB)`` (per adapted layer,
``s = γ α / r``):

.. math::

    Δw = J Δθ + ½ Δθ^T T Δθ,\quad Δw_{signal} = s(ΔB A + B ΔA),\quad Δw_{drift} = s ΔB ΔA

    H_θ = J^T H J + Σ_k g_k T_k = H_{signal} + H_{drift}

Matrix-free products used here (per layer, ``G = ∂L/∂W``, ``v = (V_A, V_B)``):

- ``J v = s (V_B A + B V_A)``; ``J^T U = (s B^T U, s U A^T)``.
- ``H_drift v = (s V_B^T G, s G V_A^T)`` — block off-diagonal in the (A, B) split.
- ``H_signal v = J^T (H (J v))`` — never materialises ``H`` or ``T``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ._memory import check_dense
from .hessian import fft_gradient, fft_hessian, lora_hessian
from .lora import LoraProblem
from .operators import LinearOperator

__all__ = [
    "MappingJacobian",
    "pullback",
    "decomposed_lora_hessian",
    "DriftOperator",
    "SignalOperator",
    "Curvature",
    "curvature",
    "UpdateDecomposition",
    "decompose_update",
    "block_indices",
]

TensorDict = dict[str, torch.Tensor]


class MappingJacobian(LinearOperator):
    """The mapping Jacobian ``J = ∂w/∂θ``, shape ``[|w|, |θ|]`` (docs/theory.md#objects).

    With the row-major vec used here, ``J_A = s (B ⊗ I_n)`` and ``J_B = s (I_m ⊗ A^T)``
    (column-major: ``J_A = s (I_n ⊗ B)``, ``J_B = s (A^T ⊗ I_m)``).

    Raises:
        InputError: ``theta`` with missing, misshaped or non-finite blocks.
    """

    def __init__(self, problem: LoraProblem, theta: Mapping[str, torch.Tensor]):
        problem.check_theta(theta)
        self.problem = problem
        self.theta = {k: v.detach() for k, v in theta.items()}
        self.in_layout, self.out_layout = problem.theta_layout, problem.weight_layout
        self.shape = (self.out_layout.numel, self.in_layout.numel)
        self.dtype, self.device = problem.dtype, problem.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        v = self.in_layout.unflatten(V.T)  # {key: [k, ...]}
        out = {}
        for a in self.problem.adapters:
            A, B = self.theta[a.key_A], self.theta[a.key_B]
            out[a.name] = a.scale * (v[a.key_B] @ A + B @ v[a.key_A])
        return self.out_layout.flatten(out, batch_dims=1).T

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        out = pullback(self.problem, self.theta, self.out_layout.unflatten(U.T))
        return self.in_layout.flatten(out, batch_dims=1).T


def pullback(
    problem: LoraProblem, theta: Mapping[str, torch.Tensor], U: Mapping[str, torch.Tensor]
) -> TensorDict:
    """``Jᵀ U`` per layer: ``(s Bᵀ U, s U Aᵀ)``; with ``U = ∇_w L`` this is ``∇_θ L`` (chain rule).

    Args:
        problem: the LoRA problem.
        theta: the point.
        U: ``{layer: [..., m, n]}`` (leading batch dims allowed).

    Returns:
        ``{key_A: [..., r, n], key_B: [..., m, r]}``.
    """
    out = {}
    for a in problem.adapters:
        A, B = theta[a.key_A], theta[a.key_B]
        out[a.key_A] = a.scale * (B.T @ U[a.name])
        out[a.key_B] = a.scale * (U[a.name] @ A.T)
    return out


def decomposed_lora_hessian(problem: LoraProblem, theta: Mapping[str, torch.Tensor]) -> LinearOperator:
    """``H_θ = JᵀHJ + Σ g_k T_k`` matrix-free, through the fastest available ``H`` (Prop. 1).

    Equal to :func:`~signal_drift.hessian.lora_hessian` (tested); much cheaper when the MLP fast
    path applies.
    """
    H = fft_hessian(problem, theta)
    return SignalOperator(MappingJacobian(problem, theta), H) + DriftOperator(problem, theta, H.gradient)


class DriftOperator(LinearOperator):
    """``H_drift = Σ_k g_k T_k``, shape ``[|θ|, |θ|]`` (Prop. 1; block off-diagonal, Prop. 2(ii)).

    Args:
        problem: the LoRA problem.
        theta: the point.
        g: ``{layer: G}``, the task gradient at ``w(θ)`` (computed if omitted).

    Raises:
        InputError: ``theta`` or ``g`` with missing, misshaped or non-finite blocks.

    """

    symmetric = True

    def __init__(self, problem: LoraProblem, theta: Mapping[str, torch.Tensor], g: TensorDict | None = None):
        problem.check_theta(theta)
        if g is not None:
            problem.check_weights(g, "g")
        self.problem = problem
        self.g = fft_gradient(problem, theta) if g is None else g
        self.in_layout = self.out_layout = problem.theta_layout
        P = self.in_layout.numel
        self.shape, self.dtype, self.device = (P, P), problem.dtype, problem.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        v = self.in_layout.unflatten(V.T)
        out = {}
        for a in self.problem.adapters:
            G = self.g[a.name]
            out[a.key_A] = a.scale * (v[a.key_B].transpose(-1, -2) @ G)
            out[a.key_B] = a.scale * (G @ v[a.key_A].transpose(-1, -2))
        return self.in_layout.flatten(out, batch_dims=1).T

    def to_dense(self, budget: int | None = None) -> torch.Tensor:
        """Dense ``H_drift`` in closed form: per layer the block ``∂²L/∂A_ij ∂B_kl = s G_kj δ_il``.

        No products through the model: ``O(|θ|²)`` writes, the rest of the matrix zero.
        """
        P = self.shape[0]
        check_dense(
            "H_drift",
            P,
            P,
            self.dtype,
            alternative="the matrix-free DriftOperator",
            budget=budget,
            device=self.device,
        )
        out = torch.zeros(P, P, dtype=self.dtype, device=self.device)
        for a in self.problem.adapters:
            rows, cols = self.in_layout.slice(a.key_A), self.in_layout.slice(a.key_B)
            eye = torch.eye(a.rank, dtype=self.dtype, device=self.device)
            # [r, n, m, r]: (i, j) indexes A_ij, (k, l) indexes B_kl
            blk = a.scale * torch.einsum("kj,il->ijkl", self.g[a.name].to(self.dtype), eye)
            blk = blk.reshape(rows.stop - rows.start, cols.stop - cols.start)
            out[rows, cols] = blk
            out[cols, rows] = blk.T
        return out


class SignalOperator(LinearOperator):
    """``H_signal = J^T H J``, shape ``[|θ|, |θ|]`` (Prop. 1), through ``H``'s matvec."""

    symmetric = True

    def __init__(self, J: MappingJacobian, H: LinearOperator):
        self.J, self.H = J, H
        self.in_layout = self.out_layout = J.in_layout
        P = J.shape[1]
        self.shape, self.dtype, self.device = (P, P), J.dtype, J.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.J._rmatmat(self.H.matmat(self.J._matmat(V)))

    def to_dense(self, budget: int | None = None) -> torch.Tensor:
        """Dense ``JᵀHJ``, pushing through ``H`` only the columns of ``J`` that are non-zero.

        At ``B = 0`` every ``A`` column of ``J`` vanishes (``J_A = s(I ⊗ B) = 0``), which halves
        the number of Hessian-vector products; with the MLP fast path the ``B`` block then comes
        from ``H.signal_at_init`` where ``H`` supports it (the MLP fast path's low-rank R-op,
        :meth:`~signal_drift.mlp_hessian.MLPHessianOperator.signal_at_init`).
        """
        P = self.shape[0]
        check_dense(
            "H_signal",
            P,
            P,
            self.dtype,
            alternative="the matrix-free SignalOperator",
            budget=budget,
            device=self.device,
        )
        out = torch.zeros(P, P, dtype=self.dtype, device=self.device)
        problem, theta = self.J.problem, self.J.theta
        if self.H.supports_signal_at_init and not any(theta[a.key_B].any() for a in problem.adapters):
            idx = self.in_layout.indices([a.key_B for a in problem.adapters], device=self.device)
            out[idx[:, None], idx] = self.H.signal_at_init(
                {a.name: a.scale * theta[a.key_A] for a in problem.adapters}
            )
            return out
        for i in range(0, P, self.chunk_size):
            Jc = self.J._matmat(self._basis_block(i))
            nz = torch.nonzero(Jc.abs().amax(0) > 0).flatten()
            if len(nz):
                out[:, i + nz] = self.J._rmatmat(self.H.matmat(Jc[:, nz]))
        return 0.5 * (out + out.T)


@dataclass(frozen=True)
class Curvature:
    """All curvature objects at one point ``θ`` (each a :class:`LinearOperator`).

    Attributes:
        H: task Hessian over ``w``, ``[|w|, |w|]``.
        H_theta: LoRA Hessian by plain autograd, ``[|θ|, |θ|]``.
        J: mapping Jacobian, ``[|w|, |θ|]``.
        signal: ``J^T H J``.
        drift: ``Σ g_k T_k``.
        g: task gradient ``{layer: [m, n]}``.

    """

    H: LinearOperator
    H_theta: LinearOperator
    J: MappingJacobian
    signal: SignalOperator
    drift: DriftOperator
    g: TensorDict


def curvature(
    problem: LoraProblem, theta: Mapping[str, torch.Tensor], H: LinearOperator | None = None
) -> Curvature:
    """Build every curvature operator at ``θ`` (nothing dense is formed).

    Args:
        problem: the LoRA problem.
        theta: the point.
        H: an FFT Hessian operator to reuse (default: :func:`~signal_drift.hessian.fft_hessian`).

    """
    H = fft_hessian(problem, theta) if H is None else H
    g = getattr(H, "gradient", None) or fft_gradient(problem, theta)
    J = MappingJacobian(problem, theta)
    return Curvature(
        H=H,
        H_theta=lora_hessian(problem, theta),
        J=J,
        signal=SignalOperator(J, H),
        drift=DriftOperator(problem, theta, g),
        g=g,
    )


def block_indices(problem: LoraProblem, which: str = "all", layer: str | None = None) -> torch.Tensor:
    """Flat indices of a block of ``θ``: ``which`` in {"all", "A", "B"}, optionally one layer.

    Use with :meth:`LinearOperator.restrict` to get e.g. the B-only block of ``H_θ``.
    """
    keys = []
    for a in problem.adapters:
        if layer is not None and a.name != layer:
            continue
        if which in ("all", "A"):
            keys.append(a.key_A)
        if which in ("all", "B"):
            keys.append(a.key_B)
    if which not in ("all", "A", "B"):
        from ._errors import InputError

        raise InputError(f"which={which!r} is invalid: use 'all', 'A' or 'B'")
    return problem.theta_layout.indices(keys)


@dataclass(frozen=True)
class UpdateDecomposition:
    """Decomposition of one LoRA step ``Δθ`` in weight space (Prop. 1, Prop. 2).

    Attributes:
        delta_w: exact ``w(θ+Δθ) - w(θ)`` per layer.
        signal: ``Δw_signal = s(ΔB A + B ΔA)`` per layer.
        drift: ``Δw_drift = s ΔB ΔA`` per layer.
        norm_signal: ``‖Δw_signal‖`` (Frobenius over all layers).
        norm_drift: ``‖Δw_drift‖``.
        sdr: signal-to-drift ratio ``‖Δw_signal‖ / ‖Δw_drift‖`` (``inf`` if drift is 0).
        align_signal: ``⟨Δw_signal, -g⟩`` (None if ``g`` not given).
        align_drift: ``⟨Δw_drift, -g⟩`` (None if ``g`` not given).

    """

    delta_w: TensorDict
    signal: TensorDict
    drift: TensorDict
    norm_signal: float
    norm_drift: float
    sdr: float
    align_signal: float | None
    align_drift: float | None


def _norm(d: TensorDict) -> float:
    return float(torch.sqrt(sum((t**2).sum() for t in d.values())))


def decompose_update(
    problem: LoraProblem,
    theta: Mapping[str, torch.Tensor],
    delta_theta: Mapping[str, torch.Tensor],
    g: TensorDict | None = None,
) -> UpdateDecomposition:
    """Split a LoRA step into signal and drift in weight space.

    Args:
        problem: the LoRA problem.
        theta: the point ``θ`` before the step.
        delta_theta: the step ``Δθ`` (same keys/shapes as ``θ``).
        g: task gradient ``{layer: G}``; if given, the alignments ``⟨Δw_·, -g⟩`` are returned.

    Returns:
        An :class:`UpdateDecomposition`.

    Raises:
        InputError: ``theta``, ``delta_theta`` or ``g`` with missing, misshaped (a ``g`` block
            that would broadcast included) or non-finite blocks.

    """
    problem.check_theta(theta)
    problem.check_theta(delta_theta, "delta_theta")
    if g is not None:
        problem.check_weights(g, "g")
    sig, dri = {}, {}
    for a in problem.adapters:
        A, B = theta[a.key_A], theta[a.key_B]
        dA, dB = delta_theta[a.key_A], delta_theta[a.key_B]
        sig[a.name] = a.scale * (dB @ A + B @ dA)
        dri[a.name] = a.scale * (dB @ dA)
    w0 = problem.weights(theta)
    w1 = problem.weights({k: theta[k] + delta_theta[k] for k in theta})
    dw = {k: w1[k] - w0[k] for k in w0}
    ns, nd = _norm(sig), _norm(dri)
    al_s = al_d = None
    if g is not None:
        al_s = float(-sum((sig[k] * g[k]).sum() for k in sig))
        al_d = float(-sum((dri[k] * g[k]).sum() for k in dri))
    return UpdateDecomposition(
        delta_w=dw,
        signal=sig,
        drift=dri,
        norm_signal=ns,
        norm_drift=nd,
        sdr=ns / nd if nd > 0 else float("inf"),
        align_signal=al_s,
        align_drift=al_d,
    )
