"""Fast exact Hessian-vector products for ``nn.Sequential`` MLPs with MSE loss.

A batched Pearlmutter R-operator written out layer by layer: one forward/backward pass is
stored at the point, then each block of ``k`` vectors costs a handful of ``[k·N, d] × [d, d]``
GEMMs per layer and no autograd graph. Activations may be any elementwise module; their first
and second derivatives are taken by autograd on the stored pre-activations, so ``nn.SiLU``,
``nn.GELU`` etc. work without hand-written formulas.

Exactness is tested against :class:`signal_drift.hessian.HessianOperator` (plain autograd).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ._errors import warn_low_precision
from .lora import LoraProblem, _join
from .model import mse_loss
from .operators import LinearOperator

__all__ = ["ELEMENTWISE", "supports_fast_path", "MLPHessianOperator", "clear_workspace"]

#: Activation modules known to act elementwise (their Jacobian is diagonal).
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.SiLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU,
    nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Tanhshrink,
)  # fmt: skip


def supports_fast_path(problem: LoraProblem) -> bool:
    """Whether the fast path applies: ``nn.Sequential`` of linears/elementwise acts, MSE, 2-D data."""
    m = problem.module
    if not isinstance(m, nn.Sequential) or problem.loss_fn is not mse_loss or problem.X.ndim != 2:
        return False
    return all(isinstance(layer, (nn.Linear, *ELEMENTWISE)) for layer in m)


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

    Args:
        problem: a problem for which :func:`supports_fast_path` holds.
        w: the adapted weights ``{layer: [m, n]}`` (the point).

    Attributes:
        gradient: ``∇_w L`` at the point, ``{layer: [m, n]}``.
    """

    symmetric = True
    chunk_size = 16  # measured best on 2 cores at d=64, N=1024 (see BENCHMARKS.md)

    def __init__(self, problem: LoraProblem, w: Mapping[str, torch.Tensor]):
        self.problem = problem
        self.in_layout = self.out_layout = problem.weight_layout
        P = self.in_layout.numel
        self.shape, self.dtype, self.device = (P, P), problem.dtype, problem.device
        warn_low_precision("Hessian", self.dtype)
        adapted = {a.name for a in problem.adapters}
        # forward pass, storing what the R-op needs
        ops = []  # ("lin", name, W, h_in, adapted) | ("act", z, φ', φ'')
        h = problem.X
        for name, layer in problem.module.named_children():
            if isinstance(layer, nn.Linear):
                W = w[name] if name in adapted else problem.base[_join(name, "weight")]
                ops.append(("lin", name, W, h, name in adapted))
                h = h @ W.T
                if layer.bias is not None:
                    h = h + problem.base[_join(name, "bias")]
            else:
                z = h
                h, d1, d2 = _derivatives(layer, z)
                ops.append(("act", z, d1, d2))
        self._n = problem.X.shape[0]
        self.residual = h - problem.y
        # backward pass: gradient and the incoming gradient at every op
        gh = self.residual / self._n
        self._g_in: list[torch.Tensor] = [None] * len(ops)  # type: ignore[list-item]
        self.gradient: dict[str, torch.Tensor] = {}
        for i in range(len(ops) - 1, -1, -1):
            op = ops[i]
            self._g_in[i] = gh
            if op[0] == "lin":
                _, name, W, h_in, is_adapted = op
                if is_adapted:
                    self.gradient[name] = gh.T @ h_in
                gh = gh @ W
            else:
                gh = gh * op[2]
        self.gradient = {a.name: self.gradient[a.name] for a in problem.adapters}
        self._g_d2 = {i: self._g_in[i] * op[3] for i, op in enumerate(ops) if op[0] == "act"}
        self._ops = ops
        self._widths = [op[2].shape[0] if op[0] == "lin" else op[1].shape[1] for op in ops]
        self._first = next(i for i, op in enumerate(ops) if op[0] == "lin" and op[4])
        # feature-major copies for the R-op: R-tensors are [width, k, N], so every product is a
        # short-wide GEMM, which runs ~1.5-2x faster than its tall-skinny transpose here
        self._fm = [
            {
                "Wt": op[2].T.contiguous(),
                "h_inT": op[3].T.contiguous(),
                "gT": self._g_in[i].T.contiguous(),
                "rows": self.in_layout.slice(op[1]) if op[4] else None,
            }
            if op[0] == "lin"
            else {"d1": op[2].T.unsqueeze(1).contiguous(), "gd2": self._g_d2[i].T.unsqueeze(1).contiguous()}
            for i, op in enumerate(ops)
        ]

    def _workspace(self, k: int) -> list[torch.Tensor]:
        """One ``[width_out, k, N]`` buffer per op, reused across calls (see :data:`_WORKSPACE`).

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
        ops, fm, N = self._ops, self._fm, self._n
        F = self._workspace(k)  # F[i]: the R-tensor after op i (R-forward), reused going back
        out = V.new_empty(V.shape)
        # R-forward: live = whether the R-tensor is non-zero yet (it is zero before the first
        # adapted layer)
        live = [False] * len(ops)
        for i, op in enumerate(ops):
            prev = i > 0 and live[i - 1]
            if op[0] == "lin":
                W, is_adapted = op[2], op[4]
                m, n = W.shape
                Fi = F[i].view(m, k * N)
                if is_adapted:  # V_l h_in (+ W Rh): [m·k, n] @ [n, N], then W @ [n, k·N] added in place
                    vb = V[fm[i]["rows"]].view(m, n, k)
                    torch.mm(vb.transpose(1, 2).reshape(m * k, n), fm[i]["h_inT"], out=Fi.view(m * k, N))
                    if prev:
                        Fi.addmm_(W, F[i - 1].view(n, k * N))
                elif prev:
                    torch.mm(W, F[i - 1].view(n, k * N), out=Fi)
                live[i] = is_adapted or prev
            else:
                if prev:
                    torch.mul(F[i - 1], fm[i]["d1"], out=F[i])
                live[i] = prev
        # R-backward: Rg = directional derivative of the back-propagated gradient, in place
        Rg = F[-1].div_(N)  # the network output's R-tensor is not needed again
        for i in range(len(ops) - 1, self._first - 1, -1):
            op = ops[i]
            has_in = i > 0 and live[i - 1]  # R_in of op i is F[i - 1]
            if op[0] == "act":
                Rg.mul_(fm[i]["d1"])
                if has_in:
                    Rg.addcmul_(fm[i]["gd2"], F[i - 1])
                continue
            W, is_adapted = op[2], op[4]
            m, n = W.shape
            if is_adapted:
                # Rg h_inᵀ as [n, m·k] (the fast K = N form), transposed into [m, n, k] ...
                rows = fm[i]["rows"]
                Rw = (fm[i]["h_inT"] @ Rg.view(m * k, N).T).view(n, m, k)
                out[rows].view(m, n, k).copy_(Rw.transpose(0, 1))
                if has_in:  # ... plus g Rhᵀ, which is [m, n·k] already
                    out[rows].view(m, n * k).addmm_(fm[i]["gT"], F[i - 1].view(n * k, N).T)
            if i > self._first:  # Wᵀ Rg (+ V_lᵀ g) into F[i - 1], whose R_in use is over
                Rg_new = F[i - 1].view(n, k * N)
                if is_adapted:
                    vb = V[fm[i]["rows"]].view(m, n, k)
                    torch.mm(vb.permute(1, 2, 0).reshape(n * k, m), fm[i]["gT"], out=Rg_new.view(n * k, N))
                    Rg_new.addmm_(fm[i]["Wt"], Rg.view(m, k * N))
                else:
                    torch.mm(fm[i]["Wt"], Rg.view(m, k * N), out=Rg_new)
                Rg = F[i - 1]
        return out

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
        ops, N = self._ops, self._n
        lin = {op[1]: i for i, op in enumerate(ops) if op[0] == "lin" and op[4]}
        names = [a.name for a in self.problem.adapters]
        R = {nm: right[nm].to(self.dtype) for nm in names}
        u = {nm: ops[lin[nm]][3] @ R[nm].T for nm in names}  # [N, r]
        m_of = {nm: ops[lin[nm]][2].shape[0] for nm in names}
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
                    # block (l', l) for the adapted linear l' = op i, as [k, r, m2, r2]
                    nm2 = ops[i][1]
                    m2, r2 = m_of[nm2], R[nm2].shape[0]
                    uu = (u[nm][:, :, None] * u[nm2][:, None, :]).reshape(N, r * r2)
                    blk = (Rg.reshape(m2 * k, N) @ uu).view(m2, k, r, r2).permute(1, 2, 0, 3)
                    if R_in is not None:
                        n2 = R_in.shape[0]
                        P = (R[nm2] @ R_in.view(n2, k * N)).view(r2 * k, N)
                        ug = (u[nm][:, :, None] * self._g_in[i][:, None, :]).reshape(N, r * m2)
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
        """Push ``F[start]`` (an R-tensor ``[m, k, N]`` injected after op ``start``) forward and back.

        ``visit(i, Rg, R_in)`` is called at every adapted linear op ``i > start`` on the way back,
        with ``R(∂L/∂z_i)`` ``[m_i, k, N]`` and the op's R-input ``[n_i, k, N]``.

        Returns ``R(∂L/∂z)`` at op ``start`` as ``[m, k, N]``, a view of a workspace buffer.
        """
        ops, fm, N = self._ops, self._fm, self._n
        for i in range(start + 1, len(ops)):
            if ops[i][0] == "lin":
                m, n = ops[i][2].shape
                torch.mm(ops[i][2], F[i - 1].view(n, k * N), out=F[i].view(m, k * N))
            else:
                torch.mul(F[i - 1], fm[i]["d1"], out=F[i])
        Rg = F[-1].div_(N)
        for i in range(len(ops) - 1, start, -1):
            if ops[i][0] == "act":
                Rg.mul_(fm[i]["d1"]).addcmul_(fm[i]["gd2"], F[i - 1])
            else:
                if visit is not None and ops[i][4]:
                    visit(i, Rg, F[i - 1])
                m, n = ops[i][2].shape
                torch.mm(fm[i]["Wt"], Rg.view(m, k * N), out=F[i - 1].view(n, k * N))
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
            ``R(∂L/∂z)`` at op ``start`` ``[m, k, N]`` and the index pair ``(i0 + arange(k),
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
        for idx, op in enumerate(self._ops):
            if op[0] != "lin" or not op[4]:
                continue
            _, name, W, h_in, _ = op
            m = W.shape[0]
            trM = torch.zeros(N, dtype=W.dtype, device=W.device)
            for i0 in range(0, m, step):
                k = min(step, m - i0)
                Rg, ii, kk = self._from_unit_directions(idx, i0, k)  # Rg[i_k, k, n] = (M_n)_{ii}
                trM += Rg[ii, kk, :].sum(0)
            out[name] = (h_in * trM[:, None]).T @ h_in
        return out
