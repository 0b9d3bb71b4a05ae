import pytest
import torch
from cases import assert_close, mlp_problem, trained_theta
from torch import nn

from signal_drift import DenseTooLargeError, dense_hessian, fft_hessian, init_theta, lora_hessian
from signal_drift.hessian import HessianOperator


@pytest.mark.parametrize("activation", [nn.SiLU, nn.Tanh, nn.GELU, nn.Softplus])
def test_lora_hessian_operator_matches_jacrev_reference_on_real_activation_modules(activation):
    problem = mlp_problem(activation=activation, bias=True)
    theta = trained_theta(problem)
    assert_close(lora_hessian(problem, theta).to_dense(), dense_hessian(problem.loss_theta, theta))


def test_fft_hessian_of_a_linear_layer_is_identity_kron_second_moment():
    # L = 1/(2N) Σ‖W x_n - y_n‖²  ⇒  H = I_m ⊗ XᵀX/N for row-major vec(W).
    from cases import linear_problem

    problem = linear_problem(dim=4, samples=25)
    theta = init_theta(problem)
    X = problem.X
    expected = torch.kron(torch.eye(4), X.T @ X / X.shape[0])
    assert_close(fft_hessian(problem, theta).to_dense(), expected)


def test_scipy_bridge_matches_torch_matvec():
    problem = mlp_problem()
    theta = trained_theta(problem)
    op = lora_hessian(problem, theta)
    v = torch.randn(op.shape[1])
    out = op.to_scipy() @ v.numpy()
    assert_close(torch.as_tensor(out), op @ v)


def test_block_restriction_equals_dense_sub_block():
    from signal_drift import block_indices

    problem = mlp_problem()
    theta = trained_theta(problem)
    op = lora_hessian(problem, theta)
    idx = block_indices(problem, "B", layer="2")
    assert_close(op.restrict(idx).to_dense(), op.to_dense()[idx][:, idx])


def test_dense_request_above_budget_names_bytes_and_alternative(monkeypatch):
    monkeypatch.setenv("SIGNAL_DRIFT_MAX_DENSE_BYTES", "1000")
    problem = mlp_problem()
    theta = init_theta(problem)
    with pytest.raises(DenseTooLargeError, match=r"needs .*kB.*matrix-free"):
        fft_hessian(problem, theta).to_dense()
    with pytest.raises(DenseTooLargeError, match="HessianOperator"):
        dense_hessian(problem.loss_theta, theta)


def test_hessian_operator_rejects_non_finite_point():
    from signal_drift import InputError

    with pytest.raises(InputError, match="NaN or Inf"):
        HessianOperator(lambda p: (p["x"] ** 2).sum(), {"x": torch.tensor([1.0, float("nan")])})


def test_every_exact_hessian_warns_below_float64():
    import warnings

    from signal_drift import PrecisionWarning, attach_lora, make_mlp, make_task

    task = make_task(4, 8, dtype=torch.float32)
    problem = attach_lora(make_mlp(4, 2, dtype=torch.float32), task.X, task.y, rank=1)
    theta = init_theta(problem)
    for build in (
        lambda: fft_hessian(problem, theta, backend="mlp"),
        lambda: fft_hessian(problem, theta, backend="autograd"),
        lambda: lora_hessian(problem, theta),
        lambda: dense_hessian(problem.loss_theta, theta),
    ):
        with pytest.warns(PrecisionWarning, match="float32: eigenvalues below .* use float64"):
            build()
    problem64 = mlp_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        fft_hessian(problem64, init_theta(problem64))
        lora_hessian(problem64, init_theta(problem64))
