"""Exact Hessians by automatic differentiation: matrix-free operators and dense references.

- :func:`fft_hessian`: the task ("FFT") Hessian ``H = ∇²_w L`` over the adapted weights.
- :func:`lora_hessian`: the LoRA Hessian ``H_θ = ∇²_θ L(w(θ))`` over ``θ = (A, B)``.
- :func:`dense_hessian`: brute-force reference, ``jacrev(jacrev(f))`` of a scalar function of
  a parameter dict, flattened. Every fast path is tested against it.

Hessian-vector products are reverse-over-reverse (the VJP of the gradient, linearised once at
the point and reused for every vector), which works for any activation a user brings,
including ``nn.SiLU``, where forward-over-reverse compositions can fail, and through eager
attention.

A problem with several batches is linearised one batch at a time (the Hessian of a sum is the
sum of the Hessians; each batch's term carries its share of the loss's normaliser, see
:class:`~signal_drift.lora.LoraProblem`), and a distributed problem sums every gradient and
product over the processes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch.func import grad, jacrev, vjp, vmap

from ._errors import InputError, check_finite, warn_low_precision
from ._memory import check_dense
from .lora import LoraProblem, all_reduce_sum
from .mlp_hessian import MLPHessianOperator, supports_fast_path
from .operators import LinearOperator, ParamLayout

__all__ = [
    "HessianOperator",
    "dense_hessian",
    "fft_hessian",
    "lora_hessian",
    "fft_gradient",
    "lora_gradient",
]

TensorDict = dict[str, torch.Tensor]


def _detach(params: Mapping[str, torch.Tensor]) -> TensorDict:
    return {k: v.detach() for k, v in params.items()}


class HessianOperator(LinearOperator):
    """Matrix-free Hessian of a scalar function of a parameter dict.

    .. math::  (H v) = ∇_p ⟨∇_p f(p), v⟩   (reverse-over-reverse)

    Args:
        fn: scalar function of a ``{name: tensor}`` dict.
        params: the point ``p``; its insertion order defines the flat layout.
        terms: functions whose sum is ``fn`` (one per batch), linearised one at a time; each
            product is the sum of theirs. Default: ``[fn]``.
        distributed: sum the gradient and every product over the processes of the default
            ``torch.distributed`` group (each process holding its own ``terms``).

    Attributes:
        gradient: ``∇_p f`` at the point (``{name: tensor}``; summed over processes).

    Every linearisation is kept for the operator's lifetime (memory: one autograd graph per term).
    Several vectors go through one batched pass (``torch.func.vmap`` over the VJP, up to
    :attr:`vmap_columns` at a time: 2–3× faster per product on a transformer, with as many
    times the activation memory); a model with an op that ``vmap`` cannot batch falls back to
    one pass per vector, with the same results.

    Warns:
        PrecisionWarning: parameters coarser than float64 (float32 and below).

    >>> A = torch.tensor([[2.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
    >>> op = HessianOperator(lambda p: 0.5 * p["x"] @ A @ p["x"], {"x": torch.ones(2, dtype=torch.float64)})
    >>> op.to_dense().tolist()
    [[2.0, 1.0], [1.0, 4.0]]

    """

    symmetric = True
    #: Vectors pushed through one batched (``vmap``) pass.
    vmap_columns: int = 16

    def __init__(
        self,
        fn: Callable[[TensorDict], torch.Tensor],
        params: Mapping[str, torch.Tensor],
        *,
        terms: Sequence[Callable[[TensorDict], torch.Tensor]] | None = None,
        distributed: bool = False,
    ):
        params = _detach(params)
        for k, v in params.items():
            check_finite(f"parameter {k!r}", v)
        self.fn = fn
        self.params = params
        self.in_layout = self.out_layout = ParamLayout.from_tensors(params)
        P = self.in_layout.numel
        first = next(iter(params.values()))
        self.shape, self.dtype, self.device = (P, P), first.dtype, first.device
        warn_low_precision("Hessian", self.dtype)
        self.distributed = distributed
        self._vmap = True
        self._vjps = []
        grads = []
        for term in [fn] if terms is None else list(terms):
            g, f_vjp = vjp(grad(term), params)
            grads.append(g)
            self._vjps.append(f_vjp)
        if len(grads) == 1 and not distributed:
            self.gradient = grads[0]
        else:
            flat = self.in_layout.flatten({k: sum(g[k] for g in grads) for k in params})
            self.gradient = self.in_layout.unflatten(self._reduce(flat))

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t) if self.distributed else t

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = None
        for f_vjp in self._vjps:
            part = torch.cat([self._products(f_vjp, V[:, i : i + self.vmap_columns])
                              for i in range(0, V.shape[1], self.vmap_columns)], dim=1)  # fmt: skip
            out = part if out is None else out + part
        return self._reduce(out)

    def _products(self, f_vjp, V: torch.Tensor) -> torch.Tensor:
        """``[P, k]`` products of one term: one batched (``vmap``) pass, else one pass per column."""
        lay = self.in_layout
        if V.shape[1] > 1 and self._vmap:
            try:
                return lay.flatten(vmap(f_vjp)(lay.unflatten(V.T))[0], batch_dims=1).T
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, NotImplementedError) as err:  # an op without a batching rule
                self._vmap = False
                warnings.warn(
                    f"HessianOperator: vmap over the model failed ({str(err).splitlines()[0][:120]}); "
                    "products go one vector at a time (same results, slower)",
                    stacklevel=3,
                )
        return torch.stack([lay.flatten(f_vjp(lay.unflatten(V[:, j]))[0]) for j in range(V.shape[1])], dim=1)

    def flat_gradient(self) -> torch.Tensor:
        """``∇_p f`` at the point, flattened (``[P]``)."""
        return self.in_layout.flatten(self.gradient)


def dense_hessian(
    fn: Callable[[TensorDict], torch.Tensor], params: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Brute-force dense Hessian ``[P, P]`` of ``fn`` at ``params`` via ``jacrev(jacrev(fn))``.

    The reference implementation: no structure is used, only plain autograd.

    Raises:
        DenseTooLargeError: if ``P x P`` does not fit in the memory budget.

    Warns:
        PrecisionWarning: parameters coarser than float64.

    """
    params = _detach(params)
    lay = ParamLayout.from_tensors(params)
    P = lay.numel
    warn_low_precision("dense Hessian", next(iter(params.values())).dtype)
    check_dense(
        "Hessian",
        P,
        P,
        next(iter(params.values())).dtype,
        alternative="HessianOperator (matrix-free)",
    )
    blocks = jacrev(jacrev(fn))(params)
    rows = []
    for a, sa in zip(lay.names, lay.sizes, strict=True):
        rows.append(torch.cat([blocks[a][b].reshape(sa, -1) for b in lay.names], dim=1))
    return torch.cat(rows, dim=0)


Backend = Literal["auto", "autograd", "mlp"]


def fft_hessian(
    problem: LoraProblem, theta: Mapping[str, torch.Tensor], backend: Backend = "auto"
) -> LinearOperator:
    """The task Hessian ``H = ∇²_w L`` over the adapted weights at ``w(θ)``.

    Shape ``[|w|, |w|]``, layout :attr:`LoraProblem.weight_layout`. The returned operator has a
    ``gradient`` attribute (``{layer: [m, n]}``, the task gradient ``g``).

    Args:
        problem: the LoRA problem.
        theta: the point.
        backend: ``"autograd"`` (reverse-over-reverse on any module), ``"mlp"`` (batched exact
            R-operator for ``nn.Sequential`` MLPs with MSE, see :mod:`signal_drift.mlp_hessian`), or
            ``"auto"`` (``"mlp"`` where it applies).

    Raises:
        InputError: ``backend="mlp"`` on a model it does not support, or an unknown backend.
    """
    problem.check_theta(theta)
    with torch.no_grad():
        w = {k: v.detach() for k, v in problem.weights(theta).items()}
    if backend not in ("auto", "autograd", "mlp"):
        raise InputError(f"backend={backend!r} is invalid: use 'auto', 'autograd' or 'mlp'")
    fast = supports_fast_path(problem)
    if backend == "mlp" and not fast:
        raise InputError(
            "backend='mlp' needs an nn.Sequential of nn.Linear and elementwise activations with "
            "mse_loss; use backend='autograd'"
        )
    if backend == "mlp" or (backend == "auto" and fast):
        return MLPHessianOperator(problem, w)
    return HessianOperator(problem.loss_w, w, terms=problem.loss_terms_w(), distributed=problem.distributed)


def lora_hessian(problem: LoraProblem, theta: Mapping[str, torch.Tensor]) -> HessianOperator:
    """The LoRA Hessian ``H_θ = ∇²_θ L(w(θ))``, shape ``[|θ|, |θ|]``, layout ``theta_layout``."""
    problem.check_theta(theta)
    return HessianOperator(
        problem.loss_theta, theta, terms=problem.loss_terms_theta(), distributed=problem.distributed
    )


def fft_gradient(problem: LoraProblem, theta: Mapping[str, torch.Tensor]) -> TensorDict:
    """``g = ∇_w L`` at ``w(θ)``: ``{layer: [m, n]}``."""
    with torch.no_grad():
        w = problem.weights(theta)
    return _reduced(problem, grad(problem.loss_w)(_detach(w)))


def lora_gradient(problem: LoraProblem, theta: Mapping[str, torch.Tensor]) -> TensorDict:
    """``∇_θ L``: ``{key: tensor}`` in the layout of ``θ``."""
    return _reduced(problem, grad(problem.loss_theta)(_detach(theta)))


def _reduced(problem: LoraProblem, g: TensorDict) -> TensorDict:
    """``g`` summed over processes for a distributed problem (unchanged otherwise)."""
    if not problem.distributed:
        return g
    lay = ParamLayout.from_tensors(g)
    return lay.unflatten(all_reduce_sum(lay.flatten(g)))
