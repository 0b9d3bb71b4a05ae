"""Raw products of every curvature operator against brute-force dense references.

``to_dense`` symmetrises and quadratic forms ``vᵀAv`` see only the symmetric part of ``A``, so
both are blind to an antisymmetric error. Here every operator's ``matmat(V)`` and ``rmatmat(U)``
(several columns, through ``to_scipy()`` too) are compared entrywise with the
``torch.func.hessian``/``jacrev`` reference of :func:`cases.dense_reference`, on real ``nn.SiLU``
MLPs at init (``B = 0``) and at a trained point (``B ≠ 0``): fixture ``dense_case``.
"""

import pytest
import torch
from cases import assert_close, compare_matmat

from signal_drift import (
    DriftOperator,
    FunctionOperator,
    HessianOperator,
    MappingJacobian,
    SignalOperator,
    block_indices,
    curvature,
    fft_gradient,
    fft_hessian,
    lora_gradient,
    lora_hessian,
)
from signal_drift.decomposition import decomposed_lora_hessian
from signal_drift.mlp_hessian import MLPHessianOperator


def test_the_reference_itself_obeys_prop1(dense_case):
    ref = dense_case
    # H_θ = JᵀHJ + Σ g_k T_k, three independent jacrev/hessian calls
    scale = ref.H_theta.abs().max()
    assert_close(ref.signal + ref.drift, ref.H_theta, rtol=0, atol=1e-13 * scale)
    # the drift is block off-diagonal in (A, B) and the J_A columns vanish at B = 0
    for a in ref.problem.adapters:
        for key in (a.key_A, a.key_B):
            i = block_indices(ref.problem, "A" if key == a.key_A else "B", a.name)
            assert ref.drift[i[:, None], i].abs().max() == 0
    if "init" in ref.name:
        assert ref.J[:, block_indices(ref.problem, "A")].abs().max() == 0
    else:
        assert ref.J[:, block_indices(ref.problem, "A")].abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["mlp", "autograd"])
def test_fft_hessian_products(dense_case, backend):
    ref = dense_case
    H = fft_hessian(ref.problem, ref.theta, backend=backend)
    assert isinstance(H, MLPHessianOperator if backend == "mlp" else HessianOperator)
    compare_matmat(H, ref.H)
    assert_close(H.flat_gradient(), ref.g, rtol=1e-12, atol=1e-14)
    assert_close(ref.problem.weight_layout.flatten(fft_gradient(ref.problem, ref.theta)), ref.g, atol=1e-14)


def test_mlp_fast_path_over_more_columns_than_its_chunk(dense_case):
    ref = dense_case
    H = fft_hessian(ref.problem, ref.theta, backend="mlp")
    compare_matmat(H, ref.H, k=H.chunk_size + 3, seed=1)


def test_lora_hessian_products(dense_case):
    ref = dense_case
    compare_matmat(lora_hessian(ref.problem, ref.theta), ref.H_theta)
    grad_theta = ref.problem.theta_layout.flatten(lora_gradient(ref.problem, ref.theta))
    assert_close(grad_theta, ref.J.T @ ref.g, atol=1e-14)


def test_mapping_jacobian_products(dense_case):
    ref = dense_case
    J = MappingJacobian(ref.problem, ref.theta)
    assert J.shape == tuple(ref.J.shape) and J.shape[0] != J.shape[1]
    compare_matmat(J, ref.J)  # matmat against jacrev of θ -> w, rmatmat against its transpose
    compare_matmat(J.T, ref.J.T)
    compare_matmat(2.5 * J, 2.5 * ref.J)


@pytest.mark.parametrize("backend", ["mlp", "autograd"])
def test_signal_products(dense_case, backend):
    ref = dense_case
    S = SignalOperator(MappingJacobian(ref.problem, ref.theta), fft_hessian(ref.problem, ref.theta, backend))
    compare_matmat(S, ref.signal)


def test_drift_products(dense_case):
    ref = dense_case
    compare_matmat(DriftOperator(ref.problem, ref.theta), ref.drift)
    g = fft_hessian(ref.problem, ref.theta, "mlp").gradient
    compare_matmat(DriftOperator(ref.problem, ref.theta, g), ref.drift)


def _members(c, ref):
    """Every member of a ``curvature()`` bundle beside its dense reference."""
    return [
        (c.H, ref.H),
        (c.H_theta, ref.H_theta),
        (c.J, ref.J),
        (c.signal, ref.signal),
        (c.drift, ref.drift),
    ]


def test_curvature_bundle_and_operator_algebra(dense_case):
    ref = dense_case
    c = curvature(ref.problem, ref.theta)
    for op, M in [
        *_members(c, ref),
        (c.signal + c.drift, ref.H_theta),
        (c.H_theta - c.drift, ref.signal),
        (c.H_theta - c.signal, ref.drift),
        (-0.5 * c.drift, -0.5 * ref.drift),
        (decomposed_lora_hessian(ref.problem, ref.theta), ref.H_theta),
    ]:
        compare_matmat(op, M)
    assert_close(ref.problem.weight_layout.flatten(c.g), ref.g, atol=1e-14)


def test_block_restrictions(dense_case):
    ref = dense_case
    problem = ref.problem
    c = curvature(problem, ref.theta)
    layers = [a.name for a in problem.adapters]
    for layer in [None, *layers]:
        iA, iB = block_indices(problem, "A", layer), block_indices(problem, "B", layer)
        iAll = block_indices(problem, "all", layer)
        for op, M in [(c.H_theta, ref.H_theta), (c.signal, ref.signal), (c.drift, ref.drift)]:
            for rows, cols in [(iAll, None), (iA, None), (iB, None), (iA, iB), (iB, iA)]:
                R = op.restrict(rows, cols)
                cols = rows if cols is None else cols
                compare_matmat(R, M[rows[:, None], cols])
    wl = problem.weight_layout
    for layer in layers:  # a layer's block of H and its W-by-θ block of J
        rows = wl.indices([layer])
        compare_matmat(c.H.restrict(rows), ref.H[rows[:, None], rows])
        cols = block_indices(problem, "all", layer)
        compare_matmat(c.J.restrict(rows, cols), ref.J[rows[:, None], cols])
    other = wl.indices(layers[1:])
    compare_matmat(c.H.restrict(wl.indices(layers[:1]), other), ref.H[wl.indices(layers[:1])[:, None], other])


def test_to_dense_of_every_operator(dense_case):
    # to_dense has its own paths (closed-form drift, signal_at_init at B = 0), checked entrywise
    ref = dense_case
    c = curvature(ref.problem, ref.theta)
    for op, M in _members(c, ref):
        D = op.to_dense()
        scale = M.abs().max()
        assert_close(D, M, rtol=1e-10, atol=1e-13 * scale)
    a = ref.problem.adapters[0]
    iA, iB = block_indices(ref.problem, "A", a.name), block_indices(ref.problem, "B", a.name)
    assert_close(c.J.restrict(iA, iB).to_dense(), ref.J[iA[:, None], iB])


def test_function_operator_products():
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(4, 7, generator=gen)
    compare_matmat(FunctionOperator(lambda V: M @ V, (4, 7), torch.float64, rfn=lambda U: M.T @ U), M)
    S = M.T @ M + torch.diag(torch.arange(7.0))
    compare_matmat(FunctionOperator(lambda V: S @ V, (7, 7), torch.float64, symmetric=True), S)
    op = FunctionOperator(lambda V: M @ V, (4, 7), torch.float64)
    with pytest.raises(NotImplementedError, match="no transpose"):
        op.rmatmat(torch.ones(4, 1))
    # the comparison helper sees what the symmetrised dense matrix hides
    K = torch.randn(7, 7, generator=gen)
    bad = FunctionOperator(lambda V: S @ V + 1e-6 * (K - K.T) @ V, (7, 7), torch.float64, symmetric=True)
    assert_close(bad.to_dense(), S, rtol=1e-12, atol=0)
    with pytest.raises(AssertionError, match="matmat"):
        compare_matmat(bad, S)


def test_optional_abilities_are_declared_on_the_base(dense_case):
    # callers ask the operator (supports_...), never its type; the base raises for the rest
    ref = dense_case
    fast = fft_hessian(ref.problem, ref.theta, backend="mlp")
    slow = fft_hessian(ref.problem, ref.theta, backend="autograd")
    assert fast.supports_partial_traces and fast.supports_signal_at_init
    assert not slow.supports_partial_traces and not slow.supports_signal_at_init
    with pytest.raises(NotImplementedError, match="supports_partial_traces"):
        slow.partial_traces()
    with pytest.raises(NotImplementedError, match="supports_signal_at_init"):
        slow.signal_at_init({})


def test_layout_indices_are_made_on_the_device_asked_for():
    """Indices for a GPU's tensors are made there (meta stands in for the GPU), equal to the CPU's."""
    from signal_drift.operators import ParamLayout

    lay = ParamLayout.from_shapes({"a": (2, 3), "b": (4,), "c": (1, 2)})
    cpu, meta = lay.indices(["c", "a"]), lay.indices(["c", "a"], device="meta")
    assert cpu.tolist() == [0, 1, 2, 3, 4, 5, 10, 11] and cpu.device.type == "cpu"
    assert meta.device.type == "meta" and meta.shape == cpu.shape and meta.dtype == torch.long
    assert lay.indices([], device="meta").device.type == "meta"
