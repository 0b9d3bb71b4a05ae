"""The batched R-operator fast path (signal_drift/mlp_hessian.py) against plain autograd."""

import pytest
import torch
from cases import assert_close, mlp_problem, trained_theta
from torch import nn

from signal_drift import InputError, attach_lora, fft_hessian, init_theta, make_mlp, make_task
from signal_drift.mlp_hessian import MLPHessianOperator, clear_workspace, supports_fast_path


@pytest.mark.parametrize("activation", [nn.SiLU, nn.GELU, nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_hessian_equals_autograd(activation, bias):
    problem = mlp_problem(activation=activation, bias=bias)
    theta = trained_theta(problem)
    fast = fft_hessian(problem, theta, backend="mlp")
    ref = fft_hessian(problem, theta, backend="autograd")
    assert isinstance(fast, MLPHessianOperator)
    assert_close(fast.to_dense(), ref.to_dense())
    for k in ref.gradient:
        assert_close(fast.gradient[k], ref.gradient[k])


def test_fast_hessian_with_a_subset_of_adapted_layers():
    model = make_mlp(5, 4, bias=True, seed=1)
    task = make_task(5, 20, seed=1)
    problem = attach_lora(model, task.X, task.y, targets=["2", "6"], rank=2)
    theta = init_theta(problem)
    assert_close(
        fft_hessian(problem, theta, backend="mlp").to_dense(),
        fft_hessian(problem, theta, backend="autograd").to_dense(),
    )


def test_partial_traces_are_exact():
    problem = mlp_problem(bias=True)
    theta = trained_theta(problem)
    H = fft_hessian(problem, theta, backend="mlp")
    Hd = H.to_dense()
    K = H.partial_traces(chunk=4)
    lay = problem.weight_layout
    for a in problem.adapters:
        sl = lay.slice(a.name)
        block = Hd[sl, sl].reshape(a.fan_out, a.fan_in, a.fan_out, a.fan_in)
        assert_close(K[a.name], torch.einsum("ijik->jk", block))


def test_custom_loss_or_module_is_not_routed_to_the_fast_path():
    model = make_mlp(4, 2)
    task = make_task(4, 10)
    problem = attach_lora(model, task.X, task.y, loss_fn=lambda o, y: ((o - y) ** 4).mean())
    assert not supports_fast_path(problem)
    with pytest.raises(InputError, match="backend='autograd'"):
        fft_hessian(problem, init_theta(problem), backend="mlp")


@pytest.mark.parametrize("activation", [nn.SiLU, nn.GELU])
@pytest.mark.parametrize("bias", [False, True])
def test_signal_at_init_equals_the_generic_sandwich_through_autograd(activation, bias):
    """The low-rank R-op for JᵀHJ at B = 0 against Jᵀ (autograd H) J, block by block."""
    from signal_drift.decomposition import MappingJacobian, SignalOperator

    problem = mlp_problem(dim=6, depth=4, rank=2, activation=activation, bias=bias)
    theta = init_theta(problem, seed=3)
    J = MappingJacobian(problem, theta)
    ref = SignalOperator(J, fft_hessian(problem, theta, backend="autograd")).to_dense()
    fast_H = fft_hessian(problem, theta, backend="mlp")
    fast = SignalOperator(J, fast_H).to_dense()
    assert_close(fast, ref)
    idx = problem.theta_layout.indices([a.key_B for a in problem.adapters])
    right = {a.name: a.scale * theta[a.key_A] for a in problem.adapters}
    assert_close(fast_H.signal_at_init(right, chunk=5), ref[idx][:, idx])  # chunk not dividing m·r


def test_signal_at_init_with_a_subset_of_adapted_layers():
    from signal_drift.decomposition import MappingJacobian, SignalOperator

    model = make_mlp(5, 4, bias=True, seed=1)
    task = make_task(5, 20, seed=1)
    problem = attach_lora(model, task.X, task.y, targets=["2", "6"], rank=2)
    theta = init_theta(problem)
    J = MappingJacobian(problem, theta)
    assert_close(SignalOperator(J, fft_hessian(problem, theta, backend="mlp")).to_dense(),
                 SignalOperator(J, fft_hessian(problem, theta, backend="autograd")).to_dense())  # fmt: skip


@pytest.mark.parametrize("k", [1, 3, 11])
def test_fast_hvp_on_non_square_layers_equals_autograd(k):
    # m ≠ n in every layer, so a swapped (m, n) in the feature-major output would show
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.SiLU(), nn.Linear(7, 4, bias=False), nn.GELU(), nn.Linear(4, 3))
    model = model.to(torch.float64)
    X = torch.randn(17, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(17, 3, generator=gen, dtype=torch.float64)
    problem = attach_lora(model, X, y, rank=2)
    theta = trained_theta(problem)
    fast = fft_hessian(problem, theta, backend="mlp")
    ref = fft_hessian(problem, theta, backend="autograd")
    assert isinstance(fast, MLPHessianOperator)
    V = torch.randn(fast.shape[0], k, generator=gen, dtype=torch.float64)
    assert_close(fast.matmat(V), ref.matmat(V))


def test_operators_sharing_the_reused_buffers_stay_independent():
    # two points of one problem (same buffer shapes) and a problem of another width, interleaved
    # with block sizes 1 and 5: every product must equal its own autograd reference
    p1, p2 = mlp_problem(seed=0), mlp_problem(dim=7, seed=1)
    ops = []
    for problem, theta in ((p1, init_theta(p1)), (p1, trained_theta(p1)), (p2, trained_theta(p2))):
        ops.append(
            (fft_hessian(problem, theta, backend="mlp"), fft_hessian(problem, theta, backend="autograd"))
        )
    gen = torch.Generator().manual_seed(0)
    for k in (5, 1, 5, 2):
        if k == 2:
            clear_workspace()  # freed buffers are simply made again
        for fast, ref in ops:
            V = torch.randn(fast.shape[0], k, generator=gen, dtype=torch.float64)
            assert_close(fast.matmat(V), ref.matmat(V))
