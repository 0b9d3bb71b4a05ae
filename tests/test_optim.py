import torch
from cases import mlp_problem

from signal_drift import init_theta, lora_gradient
from signal_drift.optim import init_opt_state, muon_direction, newton_schulz_orthogonalize, step_direction


def test_newton_schulz_equals_svd_polar_factor():
    gen = torch.Generator().manual_seed(0)
    for shape in [(7, 3), (3, 7), (5, 5)]:
        G = torch.randn(*shape, generator=gen)
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        torch.testing.assert_close(newton_schulz_orthogonalize(G), U @ Vh, rtol=0, atol=1e-10)


def test_muon_step_is_orthogonal_polar_factor_of_momentum():
    g = {"w": torch.randn(6, 3)}
    D, state = step_direction("muon", g, init_opt_state(g))
    U, _, Vh = torch.linalg.svd(g["w"], full_matrices=False)  # first step: momentum = g
    torch.testing.assert_close(D["w"], U @ Vh, rtol=0, atol=1e-10)
    torch.testing.assert_close(D["w"].T @ D["w"], torch.eye(3), rtol=0, atol=1e-10)
    assert torch.equal(muon_direction(g, "svd")["w"], U @ Vh)


def test_signsgd_step_is_the_sign_of_the_gradient():
    problem = mlp_problem()
    theta = init_theta(problem)
    theta = {k: v + 0.1 for k, v in theta.items()}
    g = lora_gradient(problem, theta)
    D, _ = step_direction("signsgd", g, init_opt_state(g))
    for k in g:
        assert torch.equal(D[k], torch.sign(g[k]))


def test_first_adam_step_is_the_sign_up_to_epsilon():
    g = {"w": torch.tensor([[2.0, -3.0], [1e-3, -5.0]])}
    D, state = step_direction("adam", g, init_opt_state(g))
    torch.testing.assert_close(D["w"], torch.sign(g["w"]), rtol=1e-4, atol=0)
    assert state.t == 1


def test_adam_steps_stops_when_a_parameter_becomes_nan_while_the_loss_is_finite():
    import pytest

    from signal_drift._errors import DivergenceError
    from signal_drift.optim import adam_steps

    # sqrt at 0: a finite loss (0) with an infinite gradient, so Adam's step is inf/inf = NaN
    params = {"x": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    with pytest.raises(DivergenceError, match="parameter 'x'.*after step 1") as err:
        adam_steps(lambda p: p["x"].sqrt().sum(), params, steps=1, lr=0.1)
    assert err.value.step == 1
    out = adam_steps(lambda p: (p["x"] ** 2).sum(), params, steps=3, lr=0.1)
    assert torch.isfinite(out["x"]).all()
