import pytest
import torch
from cases import mlp_problem

from signal_drift import DivergenceError, init_theta, lora_gradient
from signal_drift.optim import (
    adam_steps,
    init_opt_state,
    muon_direction,
    newton_schulz_orthogonalize,
    step_direction,
)


def _polar(G):
    """Polar factor of a full-rank ``G`` without an SVD: ``G (GᵀG)^{-1/2}`` (tall) by ``eigh``."""
    if G.shape[0] < G.shape[1]:
        return _polar(G.T).T
    lam, Q = torch.linalg.eigh(G.T @ G)
    return G @ (Q * lam.rsqrt()) @ Q.T


def _assert_polar_factor(D, G):
    # the polar decomposition G = D P: D has orthonormal rows or columns and P = DᵀG is SPD
    k = min(G.shape)
    DD = D.T @ D if G.shape[0] >= G.shape[1] else D @ D.T
    torch.testing.assert_close(DD, torch.eye(k), rtol=0, atol=1e-12)
    P = D.T @ G if G.shape[0] >= G.shape[1] else G @ D.T
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-12 * float(P.abs().max()))
    assert torch.linalg.eigvalsh(0.5 * (P + P.T)).min() > 0


def test_newton_schulz_equals_svd_polar_factor():
    gen = torch.Generator().manual_seed(0)
    for shape in [(7, 3), (3, 7), (5, 5)]:
        G = torch.randn(*shape, generator=gen)
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        torch.testing.assert_close(newton_schulz_orthogonalize(G), U @ Vh, rtol=0, atol=1e-10)
        torch.testing.assert_close(newton_schulz_orthogonalize(G), _polar(G), rtol=0, atol=1e-10)
        _assert_polar_factor(newton_schulz_orthogonalize(G), G)


def test_muon_step_is_orthogonal_polar_factor_of_momentum():
    # references by eigh ((GᵀG)^{-1/2}) and the polar characterisation, not the SVD muon uses
    gen = torch.Generator().manual_seed(0)
    g = {"w": torch.randn(6, 3, generator=gen), "v": torch.randn(2, 5, generator=gen)}
    D, state = step_direction("muon", g, init_opt_state(g))
    for k, G in g.items():  # first step: momentum = g
        torch.testing.assert_close(D[k], _polar(G), rtol=0, atol=1e-10)
        _assert_polar_factor(D[k], G)
        torch.testing.assert_close(muon_direction(g, "svd")[k], _polar(G), rtol=0, atol=1e-12)
        _assert_polar_factor(muon_direction(g, "svd")[k], G)
    g2 = {k: torch.randn(v.shape, generator=gen) for k, v in g.items()}
    D2, _ = step_direction("muon", g2, state)
    for k in g:  # second step: momentum 0.95 g + g2
        torch.testing.assert_close(D2[k], _polar(0.95 * g[k] + g2[k]), rtol=0, atol=1e-10)


def test_muon_svd_direction_of_a_rank_one_gradient_is_u_vt():
    # G = σ u vᵀ has polar factor u vᵀ on its range (the zero singular values stay zero)
    u, v = torch.tensor([3.0, 0.0, 4.0]) / 5, torch.tensor([1.0, 2.0, 2.0, 4.0]) / 5
    D = muon_direction({"w": 7.0 * torch.outer(u, v)}, "svd")["w"]
    torch.testing.assert_close(D, torch.outer(u, v), rtol=0, atol=1e-14)


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
    # sqrt at 0: a finite loss (0) with an infinite gradient, so Adam's step is inf/inf = NaN
    params = {"x": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    with pytest.raises(DivergenceError, match="parameter 'x'.*after step 1") as err:
        adam_steps(lambda p: p["x"].sqrt().sum(), params, steps=1, lr=0.1)
    assert err.value.step == 1
    out = adam_steps(lambda p: (p["x"] ** 2).sum(), params, steps=3, lr=0.1)
    assert torch.isfinite(out["x"]).all()
