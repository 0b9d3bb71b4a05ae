"""Matrix-free linear operators over flat parameter vectors, bridged to SciPy.

Every curvature object of the toolkit (``H``, ``H_θ``, ``H_signal``, ``H_drift``, block
restrictions, the mapping Jacobian ``J``) is a :class:`LinearOperator`. Subclasses implement a
single batched product ``_matmat(V)`` with ``V`` of shape ``[P, k]``; everything else (dense
materialisation with a memory guard, ``to_scipy()`` for ``eigsh``/Lanczos/trace estimators,
restriction to blocks, sums and scalar multiples) is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse.linalg as spla
import torch

from ._errors import InputError
from ._memory import check_dense

__all__ = ["ParamLayout", "LinearOperator", "FunctionOperator", "SumOperator", "ScaledOperator"]


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of a dict of tensors flattened into one vector.

    Flattening is row-major per tensor (``Tensor.reshape(-1)``), tensors concatenated in
    ``names`` order.

    >>> lay = ParamLayout.from_shapes({"a": (2, 3), "b": (4,)})
    >>> lay.numel, lay.slice("b")
    (10, slice(6, 10, None))
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_shapes(cls, shapes: dict[str, Sequence[int]]) -> ParamLayout:
        """Layout from a ``{name: shape}`` mapping (insertion order)."""
        return cls(tuple(shapes), tuple(tuple(int(s) for s in v) for v in shapes.values()))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ParamLayout:
        """Layout of a ``{name: tensor}`` dict (insertion order)."""
        return cls.from_shapes({k: tuple(v.shape) for k, v in tensors.items()})

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of entries of each tensor."""
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def numel(self) -> int:
        """Total length of the flat vector."""
        return int(sum(self.sizes))

    def slice(self, name: str) -> slice:
        """The slice of the flat vector that holds tensor ``name``."""
        start = 0
        for n, size in zip(self.names, self.sizes, strict=True):
            if n == name:
                return slice(start, start + size)
            start += size
        raise KeyError(name)

    def indices(self, names: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Flat indices (``[q]``, int64) covering the tensors ``names``, in layout order.

        Args:
            names: the tensors.
            device: where the indices live (default: the CPU). Index the tensors of a GPU with
                indices made there once: a CPU index tensor is copied to the GPU, with a host
                synchronisation, by every indexing operation.
        """
        missing = [n for n in names if n not in self.names]
        if missing:
            raise InputError(f"unknown parameter block(s) {missing}; known: {list(self.names)}")
        parts = [torch.arange(self.slice(n).start, self.slice(n).stop, device=device)
                 for n in self.names if n in names]  # fmt: skip
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate ``tensors`` into ``[*batch, P]`` (``batch_dims`` leading dims kept)."""
        self._check(tensors, batch_dims)
        lead = next(iter(tensors.values())).shape[:batch_dims] if tensors else ()
        return torch.cat([tensors[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`flatten`: ``[*batch, P]`` -> ``{name: [*batch, *shape]}``."""
        if flat.shape[-1] != self.numel:
            raise InputError(f"vector has length {flat.shape[-1]}, expected {self.numel}")
        lead = flat.shape[:-1]
        chunks = torch.split(flat, list(self.sizes), dim=-1)
        return {n: c.reshape(*lead, *s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def _check(self, tensors: dict[str, torch.Tensor], batch_dims: int) -> None:
        if set(tensors) != set(self.names):
            raise InputError(f"expected blocks {list(self.names)}, got {list(tensors)}")
        for n, s in zip(self.names, self.shapes, strict=True):
            got = tuple(tensors[n].shape[batch_dims:])
            if got != s:
                raise InputError(f"block {n!r} has shape {got}, expected {s}")


class LinearOperator:
    """A linear map ``R^P -> R^Q`` acting on torch tensors, with a SciPy bridge.

    Subclasses set ``shape``, ``dtype``, ``device`` and implement :meth:`_matmat`; symmetric
    operators set ``symmetric = True`` and inherit the adjoint.

    Attributes:
        shape: ``(Q, P)``.
        dtype: element type of inputs and outputs.
        device: device of inputs and outputs.
        symmetric: whether the operator equals its transpose.
        in_layout: optional :class:`ParamLayout` of the input vector.
        out_layout: optional :class:`ParamLayout` of the output vector.
        supports_partial_traces: whether :meth:`partial_traces` is implemented.
        supports_signal_at_init: whether :meth:`signal_at_init` is implemented.

    Optional abilities are declared here so that callers ask the operator, never its type: a
    Hessian over adapted weights that can do more than products (such as
    :class:`~signal_drift.mlp_hessian.MLPHessianOperator`) sets the ``supports_...`` flag and
    overrides the method; everywhere else the method raises :class:`NotImplementedError`.

    >>> op = FunctionOperator(lambda V: 2 * V, (3, 3), torch.float64, symmetric=True)
    >>> op.supports_partial_traces
    False
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    symmetric: bool = False
    in_layout: ParamLayout | None = None
    out_layout: ParamLayout | None = None
    #: Number of columns pushed through :meth:`_matmat` at once by :meth:`matmat`.
    chunk_size: int = 256
    supports_partial_traces: bool = False
    supports_signal_at_init: bool = False

    # -- to implement -------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Apply the operator to ``V`` of shape ``[P, k]``; return ``[Q, k]``."""
        raise NotImplementedError

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """Apply the transpose to ``U`` of shape ``[Q, k]``; return ``[P, k]``."""
        if self.symmetric:
            return self._matmat(U)
        raise NotImplementedError(f"{type(self).__name__} has no transpose product")

    # -- optional abilities (see ``supports_...``) ----------------------------------------
    def partial_traces(self, chunk: int = 64) -> dict[str, torch.Tensor]:
        """Exact partial traces of the diagonal blocks of a Hessian over adapted weights.

        For each adapted layer ``W [m, n]`` (row-major vec), ``K[j, j'] = Σ_i H[(i, j), (i, j')]``;
        then ``tr H_ll = tr K`` and, at ``B = 0``, ``tr(J_Bᵀ H J_B) = s² tr(K AᵀA)`` (Prop. 3).

        Args:
            chunk: directions pushed through at once.

        Returns:
            ``{layer: K [n, n]}``.

        Raises:
            NotImplementedError: unless :attr:`supports_partial_traces`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no exact partial traces (supports_partial_traces is False); "
            "estimate the trace with signal_drift.spectra.hutchpp"
        )

    def signal_at_init(self, right: Mapping[str, torch.Tensor], chunk: int = 64) -> torch.Tensor:
        """The dense signal block ``J_Bᵀ H J_B`` at ``B = 0`` (Prop. 1), without ``J``'s products.

        Args:
            right: ``{layer: s_l A_l [r_l, n_l]}`` for every adapted layer.
            chunk: directions pushed through at once.

        Returns:
            ``[Σ m_l r_l, Σ m_l r_l]``, layers in adapter order, each ``B_l`` flattened row-major.

        Raises:
            NotImplementedError: unless :attr:`supports_signal_at_init`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no dense signal block at init (supports_signal_at_init is "
            "False); use SignalOperator.to_dense()"
        )

    # -- shared -------------------------------------------------------------------------
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for ``V`` of shape ``[P, k]`` (processed in chunks of columns)."""
        V = self._as_input(V, self.shape[1])
        if V.shape[1] <= self.chunk_size:
            return self._matmat(V)
        return torch.cat(
            [self._matmat(V[:, i : i + self.chunk_size]) for i in range(0, V.shape[1], self.chunk_size)],
            dim=1,
        )

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """``A^T @ U`` for ``U`` of shape ``[Q, k]``."""
        U = self._as_input(U, self.shape[0])
        return torch.cat(
            [self._rmatmat(U[:, i : i + self.chunk_size]) for i in range(0, U.shape[1], self.chunk_size)],
            dim=1,
        )

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for ``v`` of shape ``[P]``."""
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        return self.matvec(V) if V.ndim == 1 else self.matmat(V)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        return SumOperator([self, other])

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        return SumOperator([self, ScaledOperator(other, -1.0)])

    def __mul__(self, c: float) -> LinearOperator:
        return ScaledOperator(self, float(c))

    __rmul__ = __mul__

    @property
    def T(self) -> LinearOperator:  # noqa: N802 - matches numpy/scipy
        """The transpose operator."""
        return self if self.symmetric else _Transpose(self)

    def to_dense(self, budget: int | None = None) -> torch.Tensor:
        """Materialise the ``[Q, P]`` matrix by multiplying identity columns.

        Raises:
            DenseTooLargeError: if it does not fit in the memory budget.

        """
        check_dense(
            f"{type(self).__name__}",
            *self.shape,
            self.dtype,
            alternative="the matrix-free operator (.matmat / .to_scipy() with eigsh, "
            "signal_drift.spectra's Lanczos or Hutch++)",
            budget=budget,
            device=getattr(self, "device", None),
        )
        P = self.shape[1]
        cols = [self._matmat(self._basis_block(i)) for i in range(0, P, self.chunk_size)]
        D = torch.cat(cols, dim=1)
        return 0.5 * (D + D.T) if self.symmetric else D

    def _basis_block(self, start: int) -> torch.Tensor:
        """Columns ``start … start + chunk_size − 1`` of the ``[P, P]`` identity (fewer at the end)."""
        P = self.shape[1]
        k = min(self.chunk_size, P - start)
        E = torch.zeros(P, k, dtype=self.dtype, device=self.device)
        E[torch.arange(start, start + k), torch.arange(k)] = 1
        return E

    def to_scipy(self, dtype: np.dtype | type = np.float64) -> spla.LinearOperator:
        """A :class:`scipy.sparse.linalg.LinearOperator` over NumPy arrays (the SciPy bridge)."""

        def on_numpy(product: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], np.ndarray]:
            def mm(X: np.ndarray) -> np.ndarray:
                X = np.asarray(X)
                squeeze = X.ndim == 1
                Xt = torch.as_tensor(X.reshape(X.shape[0], -1), dtype=self.dtype, device=self.device)
                out = product(Xt).detach().cpu().numpy().astype(dtype, copy=False)
                return out.reshape(-1) if squeeze else out

            return mm

        mm, rmm = on_numpy(self.matmat), on_numpy(self.rmatmat)
        return spla.LinearOperator(self.shape, matvec=mm, matmat=mm, rmatvec=rmm, rmatmat=rmm, dtype=dtype)

    def restrict(self, rows: torch.Tensor, cols: torch.Tensor | None = None) -> LinearOperator:
        """The block ``A[rows][:, cols]`` (principal block when ``cols`` is None)."""
        return _Restricted(self, rows, rows if cols is None else cols)

    def _as_input(self, V: torch.Tensor, n: int) -> torch.Tensor:
        if V.ndim != 2 or V.shape[0] != n:
            raise InputError(f"{type(self).__name__}: input has shape {tuple(V.shape)}, expected [{n}, k]")
        return V.to(dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class FunctionOperator(LinearOperator):
    """Wrap a batched product ``fn(V: [P, k]) -> [Q, k]`` as a :class:`LinearOperator`.

    >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> op = FunctionOperator(lambda V: A @ V, (2, 2), torch.float64, symmetric=True)
    >>> op.to_dense().tolist()
    [[2.0, 1.0], [1.0, 3.0]]
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        symmetric: bool = False,
        rfn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self._fn, self._rfn = fn, rfn
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        self.symmetric = symmetric

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._fn(V)

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        if self._rfn is not None:
            return self._rfn(U)
        return super()._rmatmat(U)


class SumOperator(LinearOperator):
    """Sum of operators of equal shape."""

    def __init__(self, ops: Sequence[LinearOperator]):
        shapes = {op.shape for op in ops}
        if len(shapes) != 1:
            raise InputError(f"cannot add operators of shapes {sorted(shapes)}")
        self.ops = list(ops)
        first = self.ops[0]
        self.shape, self.dtype, self.device = first.shape, first.dtype, first.device
        self.symmetric = all(op.symmetric for op in ops)
        self.in_layout, self.out_layout = first.in_layout, first.out_layout

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return sum(op._matmat(V) for op in self.ops)

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        return sum(op._rmatmat(U) for op in self.ops)


class ScaledOperator(LinearOperator):
    """``c * A``."""

    def __init__(self, op: LinearOperator, c: float):
        self.op, self.c = op, c
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.symmetric, self.in_layout, self.out_layout = op.symmetric, op.in_layout, op.out_layout

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.c * self.op._matmat(V)

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        return self.c * self.op._rmatmat(U)


class _Transpose(LinearOperator):
    def __init__(self, op: LinearOperator):
        self.op = op
        self.shape = (op.shape[1], op.shape[0])
        self.dtype, self.device = op.dtype, op.device
        self.in_layout, self.out_layout = op.out_layout, op.in_layout

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.op._rmatmat(V)

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        return self.op._matmat(U)


class _Restricted(LinearOperator):
    def __init__(self, op: LinearOperator, rows: torch.Tensor, cols: torch.Tensor):
        self.op, self.rows, self.cols = op, rows.to(op.device), cols.to(op.device)
        self.shape = (len(rows), len(cols))
        self.dtype, self.device = op.dtype, op.device
        self.symmetric = op.symmetric and torch.equal(self.rows, self.cols)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.op.shape[1], V.shape[1], dtype=V.dtype, device=V.device)
        full[self.cols] = V
        return self.op._matmat(full)[self.rows]

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.op.shape[0], U.shape[1], dtype=U.dtype, device=U.device)
        full[self.rows] = U
        return self.op._rmatmat(full)[self.cols]
