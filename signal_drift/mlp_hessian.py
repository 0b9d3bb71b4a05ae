"""Fast exact Hessian-vector products for ``nn.Sequential`` MLPs with MSE loss.

A batched Pearlmutter R-operator written out layer by layer: one forward/backward pass is
stored at the point (one :class:`LinearStep` or :class:`ActivationStep` record per module),
then each block of ``k`` vectors costs a handful of ``[k·N, d] × [d, d]`` GEMMs per layer and
no autograd graph. Activations may be any elementwise module; their first and second
derivatives are taken by autograd on the stored pre-activations, so ``nn.SiLU``, ``nn.GELU``
etc. work without hand-written formulas.

Besides products, :class:`MLPHessianOperator` has the two optional abilities that the
:class:`~signal_drift.operators.LinearOperator` base declares: exact per-layer
:meth:`~MLPHessianOperator.partial_traces` and the dense signal block at init
(:meth:`~MLPHessianOperator.signal_at_init`).

Exactness is tested against :class:`signal_drift.hessian.HessianOperator` (plain autograd).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ._errors import warn_low_precision
from .lora import LoraProblem, _join
from .model import mse_loss
from .operators import LinearOperator

__all__ = [
    "ELEMENTWISE",
    "supports_fast_path",
    "LinearStep",
    "ActivationStep",
    "MLPHessianOperator",
    "clear_workspace",
]

#: Activation modules known to act elementwise (their Jacobian is diagonal).
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.SiLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU,
    nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Tanhshrink,
)  # fmt: skip


def supports_fast_path(problem: LoraProblem) -> bool:
    """Whether the fast path applies: ``nn.Sequential`` of linears/elementwise acts, MSE, one 2-D batch."""
    m = problem.module
    if not isinstance(m, nn.Sequential) or problem.loss_fn is not mse_loss or problem.distributed:
        return False
    if len(problem.batches) != 1 or not isinstance(problem.X, torch.Tensor) or problem.X.ndim != 2:
        return False
    return all(isinstance(layer, (nn.Linear, *ELEMENTWISE)) for layer in m)


@dataclass(frozen=True, slots=True)
class LinearStep:
    """One ``nn.Linear`` ``z = h_in Wᵀ (+ b)`` at the point, as the R-operator uses it.

    Attributes:
        name: the layer's name in the ``nn.Sequential``.
        W: its weight at the point, ``[m, n]`` (``W0 + s B A`` when adapted, else ``W0``).
        h_in: its input, ``[N, n]``.
        grad_out: ``∂L/∂z`` at its output, ``[N, m]``.
        rows: its slice of the flat weight vector when it is adapted, else ``None``.
        Wt: ``Wᵀ`` ``[n, m]``, contiguous.
        h_inT: ``h_inᵀ`` ``[n, N]``, contiguous.
        grad_outT: ``(∂L/∂z)ᵀ`` ``[m, N]``, contiguous.
    """

    name: str
    W: torch.Tensor
    h_in: torch.Tensor
    grad_out: torch.Tensor
    rows: slice | None
    Wt: torch.Tensor
    h_inT: torch.Tensor
    grad_outT: torch.Tensor

    @property
    def adapted(self) -> bool:
        """Whether the layer carries an adapter (its weight is a variable of ``H``)."""
        return self.rows is not None

    @property
    def width(self) -> int:
        """Output width ``m``."""
        return self.W.shape[0]


@dataclass(frozen=True, slots=True)
class ActivationStep:
    """One elementwise activation ``h = φ(z)`` at the point, feature-major (``[width, 1, N]``).

    Attributes:
        d1: ``φ'(z)``.
        gd2: ``(∂L/∂h) ⊙ φ''(z)``.
    """

    d1: torch.Tensor
    gd2: torch.Tensor

    @property
    def width(self) -> int:
        """Width of ``z`` (and ``h``)."""
        return self.d1.shape[0]


def _derivatives(act: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``φ(z), φ'(z), φ''(z)`` of an elementwise activation, by autograd."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        h = act(zz)
        (d1,) = torch.autograd.grad(h.sum(), zz, create_graph=True)
        if d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), zz, allow_unused=True)
            d2 = torch.zeros_like(z) if d2 is None else d2
        else:  # piecewise-linear activations: φ'' = 0
            d2 = torch.zeros_like(z)
    return h.detach(), d1.detach(), d2.detach()


#: Per-thread R-op buffers of the most recently used shapes (a single block size and a single
#: vector, say), at most ``_WORKSPACE_SETS`` sets and ``_WORKSPACE_BYTES`` beyond the newest.
_WORKSPACE = threading.local()
_WORKSPACE_SETS = 3
_WORKSPACE_BYTES = 512 * 2**20


def clear_workspace() -> None:
    """Free this thread's R-op buffers, e.g. before ``torch.cuda.empty_cache()``.

    They are allocated again by the next product.
    """
    _WORKSPACE.__dict__.pop("sets", None)


class MLPHessianOperator(LinearOperator):
    """Exact FFT Hessian ``H = ∇²_w L`` of an MLP over its adapted weights (batched R-op).

    For a single linear layer ``W [m, n]`` (row-major vec) and ``L = (1/2N) Σ ‖W x_n − y_n‖²``,
    ``H = I_m ⊗ XᵀX / N``:

    >>> from torch import nn
    >>> from signal_drift import attach_lora, fft_hessian, init_theta
    >>> X = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    >>> net = nn.Sequential(nn.Linear(2, 3, bias=False)).double()
    >>> problem = attach_lora(net, X, torch.zeros(2, 3, dtype=torch.float64), rank=1)
    >>> H = fft_hessian(problem, init_theta(problem))
    >>> isinstance(H, MLPHessianOperator), H.supports_partial_traces
    (True, True)
    >>> torch.equal(H.to_dense(), torch.kron(torch.eye(3, dtype=torch.float64), X.T @ X / 2))
    True

    Args:
        problem: a problem for which :func:`supports_fast_path` holds.
        w: the adapted weights ``{layer: [m, n]}`` (the point).

    Attributes:
        gradient: ``∇_w L`` at the point, ``{layer: [m, n]}``.
        residual: network output minus target, ``[N, d_out]``.
        steps: one :class:`LinearStep` or :class:`ActivationStep` per module, in order.
    """

    symmetric = True
    supports_partial_traces = True
    supports_signal_at_init = True
    chunk_size = 16  # measured best on 2 cores at d=64, N=1024 (see BENCHMARKS.md)

    def __init__(self, problem: LoraProblem, w: Mapping[str, torch.Tensor]):
        self.problem = problem
        self.in_layout = self.out_layout = problem.weight_layout
        P = self.in_layout.numel
        self.shape, self.dtype, self.device = (P, P), problem.dtype, problem.device
        warn_low_precision("Hessian", self.dtype)
        adapted = {a.name for a in problem.adapters}
        # forward pass: every module's input, the linears' weights, the activations' φ', φ''
        names, inputs = [], []
        weights: dict[int, torch.Tensor] = {}
        derivs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        h = problem.X
        for i, (name, layer) in enumerate(problem.module.named_children()):
            names.append(name)
            inputs.append(h)
            if isinstance(layer, nn.Linear):
                W = w[name] if name in adapted else problem.base[_join(name, "weight")]
                weights[i] = W
                h = h @ W.T
                if layer.bias is not None:
                    h = h + problem.base[_join(name, "bias")]
            else:
                h, d1, d2 = _derivatives(layer, h)
                derivs[i] = (d1, d2)
        self._n = problem.X.shape[0]
        self.residual = h - problem.y
        # backward pass: the gradient, and the gradient arriving at every module's output
        gh = self.residual / self._n
        grad_out: list[torch.Tensor] = [None] * len(names)  # type: ignore[list-item]
        self.gradient: dict[str, torch.Tensor] = {}
        for i in range(len(names) - 1, -1, -1):
            grad_out[i] = gh
            if i in weights:
                if names[i] in adapted:
                    self.gradient[names[i]] = gh.T @ inputs[i]
                gh = gh @ weights[i]
            else:
                gh = gh * derivs[i][0]
        self.gradient = {a.name: self.gradient[a.name] for a in problem.adapters}
        # feature-major copies for the R-op: R-tensors are [width, k, N], so every product is a
        # short-wide GEMM, which runs ~1.5-2x faster than its tall-skinny transpose here
        self.steps: tuple[LinearStep | ActivationStep, ...] = tuple(
            LinearStep(
                name=names[i],
                W=weights[i],
                h_in=inputs[i],
                grad_out=grad_out[i],
                rows=self.in_layout.slice(names[i]) if names[i] in adapted else None,
                Wt=weights[i].T.contiguous(),
                h_inT=inputs[i].T.contiguous(),
                grad_outT=grad_out[i].T.contiguous(),
            )
            if i in weights
            else ActivationStep(
                d1=derivs[i][0].T.unsqueeze(1).contiguous(),
                gd2=(grad_out[i] * derivs[i][1]).T.unsqueeze(1).contiguous(),
            )
            for i in range(len(names))
        )
        self._widths = [st.width for st in self.steps]
        self._first = next(i for i, st in enumerate(self.steps) if isinstance(st, LinearStep) and st.adapted)

    def _workspace(self, k: int) -> list[torch.Tensor]:
        """One ``[width_out, k, N]`` buffer per step, reused across calls (see :data:`_WORKSPACE`).

        Fresh multi-MB tensors on every call cost page faults that doubled the GEMM time here.
        """
        key = (self.dtype, self.device, k, self._n, tuple(self._widths))
        cache: dict = _WORKSPACE.__dict__.setdefault("sets", {})
        bufs = cache.pop(key, None)
        if bufs is None:
            bufs = [torch.empty(w, k, self._n, dtype=self.dtype, device=self.device) for w in self._widths]
        cache[key] = bufs  # most recent last
        while len(cache) > 1 and (
            len(cache) > _WORKSPACE_SETS
            or sum(b.numel() * b.element_size() for bs in cache.values() for b in bs) > _WORKSPACE_BYTES
        ):
            del cache[next(iter(cache))]
        return bufs

    def _directions_per_pass(self, chunk: int) -> int:
        """At most ``chunk`` unit directions per pass, with buffers within a quarter of the cap."""
        per_direction = sum(self._widths) * self._n * torch.finfo(self.dtype).bits // 8
        return max(1, min(chunk, _WORKSPACE_BYTES // 4 // per_direction))

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        # R-tensors are laid out feature-major, [width, k, N]: W @ R is one short-wide GEMM, sums
        # of two products are one addmm, every R-tensor lives in a reused buffer, and each layer's
        # result is written straight into its rows of the output ([m, n, k] = the row-major vec
        # of W, k columns).
        k = V.shape[1]
        V = V.contiguous()
        steps, N = self.steps, self._n
        F = self._workspace(k)  # F[i]: the R-tensor after step i (R-forward), reused going back
        out = V.new_empty(V.shape)
        # R-forward: live = whether the R-tensor is non-zero yet (it is zero before the first
        # adapted layer)
        live = [False] * len(steps)
        for i, st in enumerate(steps):
            prev = i > 0 and live[i - 1]
            if isinstance(st, LinearStep):
                m, n = st.W.shape
                Fi = F[i].view(m, k * N)
                if st.adapted:  # V_l h_in (+ W Rh): [m·k, n] @ [n, N], then W @ [n, k·N] added in place
                    vb = V[st.rows].view(m, n, k)
                    torch.mm(vb.transpose(1, 2).reshape(m * k, n), st.h_inT, out=Fi.view(m * k, N))
                    if prev:
                        Fi.addmm_(st.W, F[i - 1].view(n, k * N))
                elif prev:
                    torch.mm(st.W, F[i - 1].view(n, k * N), out=Fi)
                live[i] = st.adapted or prev
            else:
                if prev:
                    torch.mul(F[i - 1], st.d1, out=F[i])
                live[i] = prev
        # R-backward: Rg = directional derivative of the back-propagated gradient, in place
        Rg = F[-1].div_(N)  # the network output's R-tensor is not needed again
        for i in range(len(steps) - 1, self._first - 1, -1):
            st = steps[i]
            has_in = i > 0 and live[i - 1]  # R_in of step i is F[i - 1]
            if isinstance(st, ActivationStep):
                Rg.mul_(st.d1)
                if has_in:
                    Rg.addcmul_(st.gd2, F[i - 1])
                continue
            m, n = st.W.shape
            if st.adapted:
                # Rg h_inᵀ as [n, m·k] (the fast K = N form), transposed into [m, n, k] ...
                Rw = (st.h_inT @ Rg.view(m * k, N).T).view(n, m, k)
                out[st.rows].view(m, n, k).copy_(Rw.transpose(0, 1))
                if has_in:  # ... plus g Rhᵀ, which is [m, n·k] already
                    out[st.rows].view(m, n * k).addmm_(st.grad_outT, F[i - 1].view(n * k, N).T)
            if i > self._first:  # Wᵀ Rg (+ V_lᵀ g) into F[i - 1], whose R_in use is over
                Rg_new = F[i - 1].view(n, k * N)
                if st.adapted:
                    vb = V[st.rows].view(m, n, k)
                    torch.mm(vb.permute(1, 2, 0).reshape(n * k, m), st.grad_outT, out=Rg_new.view(n * k, N))
                    Rg_new.addmm_(st.Wt, Rg.view(m, k * N))
                else:
                    torch.mm(st.Wt, Rg.view(m, k * N), out=Rg_new)
                Rg = F[i - 1]
        return out

    def _adapted_steps(self) -> dict[str, int]:
        """``{layer: index of its step}`` for the adapted linears, in network order."""
        return {st.name: i for i, st in enumerate(self.steps) if isinstance(st, LinearStep) and st.adapted}

    def signal_at_init(self, right: Mapping[str, torch.Tensor], chunk: int = 64) -> torch.Tensor:
        """Dense ``J_Bᵀ H J_B`` at ``B = 0``: the whole signal Hessian at init (Prop. 1, 3).

        Column ``(l, i, j)`` of ``J_B`` is the weight direction ``e_i R_l[j]`` in layer ``l``
        (``R_l = s_l A_l``), whose R-forward starts at layer ``l``'s output as
        ``Rz_n = u_l[n, j] e_i`` with ``u_l = h_in R_lᵀ``. Everything after that is linear per
        sample, so only the ``m`` directions ``e_i`` are propagated (not ``m·r``) and ``u_l[n, j]``
        multiplies in at the end. Only blocks ``(l', l)`` with ``l' ≥ l`` are computed (the
        R-backward stops at layer ``l``; the rest is symmetry), projected onto ``R_{l'}`` before
        any ``m × n`` product:

            block[(i, j), (i', j')] = Σ_n u_l[n, j] (Q_i[n, i'] u_{l'}[n, j'] + g[n, i'] (P_i[n] R_{l'}ᵀ)[j'])

        with ``P_i``, ``Q_i`` the R-forward input and R-backward gradient at layer ``l'`` of ``e_i``.

        Args:
            right: ``{layer: R_l [r_l, n_l]}`` for every adapted layer (``s_l A_l``).
            chunk: directions ``e_i`` pushed through at once (fewer where their buffers would
                exceed a quarter of the 512 MiB workspace cap).

        Returns:
            ``[Σ m_l r_l, Σ m_l r_l]``, layers in adapter order, each ``B_l`` flattened row-major.
        """
        steps, N = self.steps, self._n
        lin = self._adapted_steps()
        names = [a.name for a in self.problem.adapters]
        R = {nm: right[nm].to(self.dtype) for nm in names}
        u = {nm: steps[lin[nm]].h_in @ R[nm].T for nm in names}  # [N, r]
        m_of = {nm: steps[lin[nm]].width for nm in names}
        sizes = [m_of[nm] * R[nm].shape[0] for nm in names]
        offs = [sum(sizes[:t]) for t in range(len(sizes))]
        out = torch.zeros(sum(sizes), sum(sizes), dtype=self.dtype, device=self.device)
        step = self._directions_per_pass(chunk)
        for t, nm in enumerate(names):
            start, m, r = lin[nm], m_of[nm], R[nm].shape[0]
            for i0 in range(0, m, step):
                k = min(step, m - i0)
                cols = slice(offs[t] + i0 * r, offs[t] + (i0 + k) * r)

                def block(i: int, Rg: torch.Tensor, R_in: torch.Tensor | None, k=k, cols=cols, nm=nm, r=r):
                    # block (l', l) for the adapted linear l' = step i, as [k, r, m2, r2]
                    nm2 = steps[i].name
                    m2, r2 = m_of[nm2], R[nm2].shape[0]
                    uu = (u[nm][:, :, None] * u[nm2][:, None, :]).reshape(N, r * r2)
                    blk = (Rg.reshape(m2 * k, N) @ uu).view(m2, k, r, r2).permute(1, 2, 0, 3)
                    if R_in is not None:
                        n2 = R_in.shape[0]
                        P = (R[nm2] @ R_in.view(n2, k * N)).view(r2 * k, N)
                        ug = (u[nm][:, :, None] * steps[i].grad_out[:, None, :]).reshape(N, r * m2)
                        blk = blk + (P @ ug).view(r2, k, r, m2).permute(1, 2, 3, 0)
                    t2 = names.index(nm2)
                    out[offs[t2] : offs[t2] + sizes[t2], cols] = blk.reshape(k * r, m2 * r2).T

                Rg, _, _ = self._from_unit_directions(start, i0, k, visit=block)
                block(start, Rg, None)
        for t in range(len(names)):  # blocks (l, l') with l < l' by symmetry
            for t2 in range(t + 1, len(names)):
                rows, cols = slice(offs[t], offs[t] + sizes[t]), slice(offs[t2], offs[t2] + sizes[t2])
                out[rows, cols] = out[cols, rows].T
        return 0.5 * (out + out.T)

    def flat_gradient(self) -> torch.Tensor:
        """``∇_w L`` flattened (``[P]``)."""
        return self.in_layout.flatten(self.gradient)

    def _r_backward_from(
        self,
        start: int,
        F: list[torch.Tensor],
        k: int,
        visit: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Push ``F[start]`` (an R-tensor ``[m, k, N]`` injected after step ``start``) forward and back.

        ``visit(i, Rg, R_in)`` is called at every adapted linear step ``i > start`` on the way
        back, with ``R(∂L/∂z_i)`` ``[m_i, k, N]`` and the step's R-input ``[n_i, k, N]``.

        Returns ``R(∂L/∂z)`` at step ``start`` as ``[m, k, N]``, a view of a workspace buffer.
        """
        steps, N = self.steps, self._n
        for i in range(start + 1, len(steps)):
            st = steps[i]
            if isinstance(st, LinearStep):
                m, n = st.W.shape
                torch.mm(st.W, F[i - 1].view(n, k * N), out=F[i].view(m, k * N))
            else:
                torch.mul(F[i - 1], st.d1, out=F[i])
        Rg = F[-1].div_(N)
        for i in range(len(steps) - 1, start, -1):
            st = steps[i]
            if isinstance(st, ActivationStep):
                Rg.mul_(st.d1).addcmul_(st.gd2, F[i - 1])
            else:
                if visit is not None and st.adapted:
                    visit(i, Rg, F[i - 1])
                m, n = st.W.shape
                torch.mm(st.Wt, Rg.view(m, k * N), out=F[i - 1].view(n, k * N))
                Rg = F[i - 1]
        return Rg

    def _from_unit_directions(
        self,
        start: int,
        i0: int,
        k: int,
        visit: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_r_backward_from` for unit directions ``e_{i0} … e_{i0+k−1}`` at every sample.

        Returns:
            ``R(∂L/∂z)`` at step ``start`` ``[m, k, N]`` and the index pair ``(i0 + arange(k),
            arange(k))`` that picks each direction's own output row.
        """
        F = self._workspace(k)
        ii, kk = torch.arange(i0, i0 + k, device=self.device), torch.arange(k, device=self.device)
        F[start].zero_()[ii, kk, :] = 1.0
        return self._r_backward_from(start, F, k, visit), ii, kk

    def partial_traces(self, chunk: int = 64) -> dict[str, torch.Tensor]:
        """Per adapted layer, the partial trace of its diagonal Hessian block over output rows.

        For ``W ∈ R^{m×n}`` (row-major vec), ``H_ll = Σ_n (h_n h_nᵀ) ⊗ M_n`` with ``M_n`` the
        Hessian of the per-sample loss w.r.t. the layer's pre-activation, so

        .. math::  K[j, j'] = Σ_i H_ll[(i, j), (i, j')] = Σ_n h_{nj} h_{nj'} tr M_n.

        Computed exactly with ``m`` batched R-passes per layer. Then ``tr(H_ll) = tr K`` and, at
        ``B = 0``, ``tr(J_Bᵀ H J_B) = s² tr(K AᵀA)`` for any ``A`` (Prop. 3).

        Args:
            chunk: directions ``e_i`` pushed through at once (fewer where their buffers would
                exceed a quarter of the 512 MiB workspace cap).

        Returns:
            ``{layer: K [n, n]}``.
        """
        out = {}
        N = self._n
        step = self._directions_per_pass(chunk)
        for name, idx in self._adapted_steps().items():
            st = self.steps[idx]
            m = st.width
            trM = torch.zeros(N, dtype=st.W.dtype, device=st.W.device)
            for i0 in range(0, m, step):
                k = min(step, m - i0)
                Rg, ii, kk = self._from_unit_directions(idx, i0, k)  # Rg[i_k, k, n] = (M_n)_{ii}
                trM += Rg[ii, kk, :].sum(0)
            out[name] = (st.h_in * trM[:, None]).T @ st.h_in
        return out
