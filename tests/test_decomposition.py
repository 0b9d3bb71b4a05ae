"""Prop. 1 (exact signal–drift decomposition) and Prop. 2(ii) (drift structure)."""

import pytest
import torch
from cases import assert_close, linear_problem, mlp_problem, trained_theta
from torch.func import grad, jacrev

from signal_drift import curvature, decompose_update, dense_hessian, init_theta
from signal_drift.operators import ParamLayout


def _reference_decomposition(problem, theta):
    """JᵀHJ and Σ g_k T_k from plain autograd of the map θ→w (no structure used)."""
    tl = problem.theta_layout
    wl = problem.weight_layout

    def w_flat(flat):
        return wl.flatten(problem.weights(tl.unflatten(flat)))

    t = tl.flatten(theta)
    J = jacrev(w_flat)(t)  # [|w|, |θ|]
    T = jacrev(jacrev(w_flat))(t)  # [|w|, |θ|, |θ|]
    w = {k: v.detach() for k, v in problem.weights(theta).items()}
    H = dense_hessian(problem.loss_w, w)
    g = wl.flatten(grad(problem.loss_w)(w))
    return J, H, g, J.T @ H @ J, torch.einsum("k,kij->ij", g, T)


@pytest.mark.parametrize("where", ["init", "trained"])
@pytest.mark.parametrize("make", [linear_problem, mlp_problem], ids=["one_layer", "mlp"])
def test_lora_hessian_equals_signal_plus_drift(make, where):
    problem = make()
    theta = init_theta(problem) if where == "init" else trained_theta(problem)
    _, _, _, signal, drift = _reference_decomposition(problem, theta)
    H_theta = dense_hessian(problem.loss_theta, theta)
    assert_close(H_theta, signal + drift)


def test_five_layer_mlp_identity_at_trained_point():
    problem = mlp_problem(dim=5, depth=5, rank=2, samples=30)
    theta = trained_theta(problem)
    _, _, _, signal, drift = _reference_decomposition(problem, theta)
    assert_close(dense_hessian(problem.loss_theta, theta), signal + drift)


def test_operators_match_autograd_reference():
    problem = mlp_problem()
    theta = trained_theta(problem)
    J, H, g, signal, drift = _reference_decomposition(problem, theta)
    c = curvature(problem, theta)
    assert_close(c.J.to_dense(), J)
    assert_close(c.J.T.to_dense(), J.T)
    assert_close(c.H.to_dense(), H)
    assert_close(c.signal.to_dense(), signal)
    assert_close(c.drift.to_dense(), drift)
    assert_close(problem.weight_layout.flatten(c.g), g)


def test_at_init_drift_is_the_only_a_b_coupling_and_signal_lives_on_b():
    problem = mlp_problem()
    c = curvature(problem, init_theta(problem))
    tl = problem.theta_layout
    a_idx = tl.indices([a.key_A for a in problem.adapters])
    S = c.signal.to_dense()
    assert S[a_idx].abs().max() == 0  # J_A = 0 at B = 0


def test_update_identity_is_exact():
    problem = mlp_problem()
    theta = trained_theta(problem)
    step = {k: 0.3 * torch.randn_like(v) for k, v in theta.items()}
    d = decompose_update(problem, theta, step)
    for name in d.delta_w:
        assert_close(d.delta_w[name], d.signal[name] + d.drift[name], rtol=1e-12, atol=1e-14)
    # Δw_signal is the first-order term J Δθ
    c = curvature(problem, theta)
    flat = problem.theta_layout.flatten(step)
    assert_close(problem.weight_layout.flatten(d.signal), c.J @ flat)


def test_drift_is_block_off_diagonal_with_paired_eigenvalues():
    problem = mlp_problem()
    theta = trained_theta(problem)
    D = curvature(problem, theta).drift.to_dense()
    tl = problem.theta_layout
    a_idx = tl.indices([a.key_A for a in problem.adapters])
    b_idx = tl.indices([a.key_B for a in problem.adapters])
    assert D[a_idx][:, a_idx].abs().max() == 0
    assert D[b_idx][:, b_idx].abs().max() == 0
    C = D[a_idx][:, b_idx]
    eig = torch.linalg.eigvalsh(D)
    sv = torch.linalg.svdvals(C)
    expected = torch.cat([-sv, sv, torch.zeros(len(eig) - 2 * len(sv))]).sort().values
    assert_close(eig, expected, rtol=1e-9, atol=1e-12)
    assert eig.min() < 0 < eig.max()  # indefinite


def test_signal_is_psd_when_task_hessian_is_psd():
    problem = linear_problem()
    theta = trained_theta(problem)
    c = curvature(problem, theta)
    assert torch.linalg.eigvalsh(c.H.to_dense()).min() > 0  # convex case
    S = c.signal.to_dense()
    eig = torch.linalg.eigvalsh(S)
    assert eig.min() >= -1e-12 * eig.max()
    # ... while H_theta itself is indefinite there: the drift injects negative curvature
    assert torch.linalg.eigvalsh(c.H_theta.to_dense()).min() < -1e-6


def test_layout_round_trip():
    lay = ParamLayout.from_shapes({"a": (2, 3), "b": (4,)})
    t = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    back = lay.unflatten(lay.flatten(t))
    assert all(torch.equal(back[k], t[k]) for k in t)


def test_pullback_of_task_gradient_is_the_lora_gradient():
    from signal_drift import fft_gradient, lora_gradient
    from signal_drift.decomposition import pullback

    problem = mlp_problem()
    theta = trained_theta(problem)
    got = pullback(problem, theta, fft_gradient(problem, theta))
    ref = lora_gradient(problem, theta)
    for k in ref:
        assert_close(got[k], ref[k])


def test_decomposed_lora_hessian_equals_autograd_lora_hessian():
    from signal_drift.decomposition import decomposed_lora_hessian

    problem = mlp_problem(bias=True)
    theta = trained_theta(problem)
    assert_close(decomposed_lora_hessian(problem, theta).to_dense(), dense_hessian(problem.loss_theta, theta))


def test_closed_form_dense_drift_equals_its_products_on_a_subset_of_layers():
    from signal_drift import attach_lora, make_mlp, make_task
    from signal_drift.operators import LinearOperator

    model, task = make_mlp(5, 4, seed=2), make_task(5, 20, seed=2)
    problem = attach_lora(model, task.X, task.y, targets=["2", "6"], rank=3, alpha=2.0)
    c = curvature(problem, trained_theta(problem))
    # the generic to_dense pushes the identity through the matvec, block by block
    assert_close(c.drift.to_dense(), LinearOperator.to_dense(c.drift))


def test_bad_gradient_and_non_finite_theta_are_refused():
    from signal_drift import InputError
    from signal_drift.decomposition import DriftOperator, MappingJacobian
    from signal_drift.hessian import fft_gradient

    problem = mlp_problem()
    theta = trained_theta(problem)
    step = {k: 1e-2 * torch.randn_like(v) for k, v in theta.items()}
    g = fft_gradient(problem, theta)
    name = problem.adapters[0].name
    short = g | {name: g[name][:1]}  # [1, n] would broadcast against [m, n]
    with pytest.raises(InputError, match=r"^g: block .* has shape"):
        decompose_update(problem, theta, step, short)
    with pytest.raises(InputError, match=r"^g: block .* has shape"):
        DriftOperator(problem, theta, short)
    with pytest.raises(InputError, match=r"^g\["):
        decompose_update(problem, theta, step, g | {name: g[name] * float("nan")})
    nan_theta = theta | {problem.adapters[0].key_A: theta[problem.adapters[0].key_A] * float("nan")}
    for make in (MappingJacobian, DriftOperator):
        with pytest.raises(InputError, match=r"^theta\[.*NaN or Inf"):
            make(problem, nan_theta)
    with pytest.raises(InputError, match=r"^delta_theta\["):
        decompose_update(problem, theta, nan_theta)
