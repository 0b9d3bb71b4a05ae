"""Prop. 2(i), Prop. 3, Prop. 4 and Lemma 1 against closed forms, in float64."""

import math

import numpy as np
import pytest
import torch
from cases import linear_problem, mlp_problem, trained_theta
from torch import nn

from signal_drift import (
    InputError,
    attach_lora,
    curvature,
    decompose_update,
    fft_gradient,
    gd_direction,
    init_theta,
    lora_gradient,
    muon_direction,
    sign_direction,
)
from signal_drift.theory import layer_traces, loglog_slope, signal_alignment, stability_threshold, trace_rule

ETA = 1e-2


@pytest.mark.parametrize(
    "optimizer,direction",
    [("gd", gd_direction), ("sign", sign_direction), ("muon", muon_direction)],
)
def test_signal_alignment_closed_form(optimizer, direction):
    problem = mlp_problem()
    theta = trained_theta(problem)
    gt = lora_gradient(problem, theta)
    step = {k: -ETA * v for k, v in direction(gt).items()}
    d = decompose_update(problem, theta, step, g=fft_gradient(problem, theta))
    expected = signal_alignment(gt, optimizer, ETA)
    assert expected > 0
    assert math.isclose(d.align_signal, expected, rel_tol=1e-10)


def test_drift_alignment_is_minus_half_eta_squared_quadratic_form_under_gd():
    problem = mlp_problem()
    theta = trained_theta(problem)
    c = curvature(problem, theta)
    gt = problem.theta_layout.flatten(lora_gradient(problem, theta))
    step = problem.theta_layout.unflatten(-ETA * gt)
    d = decompose_update(problem, theta, step, g=c.g)
    expected = -0.5 * ETA**2 * float(gt @ (c.drift @ gt))
    assert math.isclose(d.align_drift, expected, rel_tol=1e-10)


def test_scalar_counterexample_drift_alignment_is_minus_eta_squared():
    # w = w0 + b·a with α/r = 1, a = b = 1 and L(w) = w (so g = 1): ⟨Δw_drift, −g⟩ = −η².
    model = nn.Linear(1, 1, bias=False)
    X, y = torch.ones(1, 1), torch.zeros(1, 1)
    problem = attach_lora(model, X, y, rank=1, alpha=1.0, loss_fn=lambda out, _: out.sum())
    theta = {"lora_A": torch.ones(1, 1), "lora_B": torch.ones(1, 1)}
    g = fft_gradient(problem, theta)
    assert float(g[""]) == 1.0
    eta = 0.3
    step = {k: -eta * v for k, v in lora_gradient(problem, theta).items()}
    d = decompose_update(problem, theta, step, g=g)
    assert math.isclose(d.align_drift, -(eta**2), rel_tol=1e-12)


@pytest.mark.parametrize("init", ["gaussian", "kaiming_uniform"])
def test_trace_rule_holds_in_expectation_over_a(init):
    # E_A tr(JᵀHJ) = α²ρ tr H at B = 0; H does not depend on A there, so it is formed once.
    problem = mlp_problem(dim=6, depth=3, rank=2, alpha=5.0, init=init)
    c0 = curvature(problem, init_theta(problem, 0))
    H = c0.H.to_dense()
    predicted = trace_rule(problem, layer_traces(H, problem))
    draws = []
    for seed in range(400):
        J = curvature(problem, init_theta(problem, seed)).J.to_dense()
        draws.append(float(torch.trace(J.T @ H @ J)))
    draws = np.array(draws)
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    assert se < 0.05 * abs(predicted)  # precise enough to catch a factor error
    assert abs(draws.mean() - predicted) < 4 * se


def test_signal_and_drift_scale_as_alpha_squared_and_alpha_at_init():
    problem = mlp_problem()
    theta = init_theta(problem)
    alphas = [1.0, 4.0, 16.0, 64.0]
    ns, nd = [], []
    for a in alphas:
        c = curvature(problem.with_alpha(a), theta)
        ns.append(float(torch.linalg.matrix_norm(c.signal.to_dense())))
        nd.append(float(torch.linalg.matrix_norm(c.drift.to_dense())))
    assert abs(loglog_slope(alphas, ns) - 2) < 1e-9
    assert abs(loglog_slope(alphas, nd) - 1) < 1e-9


def test_one_step_update_scaling_from_a_fixed_state():
    # Adam-type normalised step Δθ = −η·sign(∇θL) from a fixed (A, B) and direction:
    # Δw_signal ∝ αη, Δw_drift ∝ αη², SDR ∝ 1/η and independent of α.
    problem = mlp_problem()
    theta = trained_theta(problem)
    direction = sign_direction(lora_gradient(problem, theta))
    etas, alphas = [1e-3, 2e-3, 4e-3, 8e-3], [2.0, 8.0, 32.0]

    def probe(alpha, eta):
        step = {k: -eta * v for k, v in direction.items()}
        return decompose_update(problem.with_alpha(alpha), theta, step)

    by_eta = [probe(8.0, e) for e in etas]
    by_alpha = [probe(a, 2e-3) for a in alphas]
    assert abs(loglog_slope(etas, [d.norm_signal for d in by_eta]) - 1) < 1e-9
    assert abs(loglog_slope(etas, [d.norm_drift for d in by_eta]) - 2) < 1e-9
    assert abs(loglog_slope(etas, [d.sdr for d in by_eta]) + 1) < 1e-9
    assert abs(loglog_slope(alphas, [d.norm_signal for d in by_alpha]) - 1) < 1e-9
    assert abs(loglog_slope(alphas, [d.norm_drift for d in by_alpha]) - 1) < 1e-9
    assert abs(loglog_slope(alphas, [d.sdr for d in by_alpha])) < 1e-9


def _gd_final_loss(problem, w0, eta, steps):
    from torch.func import grad

    w = dict(w0)
    g = grad(problem.loss_w)
    for _ in range(steps):
        gw = g(w)
        w = {k: w[k] - eta * gw[k] for k in w}
    return float(problem.loss_w(w))


def test_gd_is_stable_just_below_two_over_lambda_max_and_diverges_just_above():
    problem = linear_problem(dim=5, samples=30)
    theta = init_theta(problem)
    H = curvature(problem, theta).H.to_dense()
    lam = float(torch.linalg.eigvalsh(H).max())
    eta_c = stability_threshold(lam)
    w0 = {k: v.detach() for k, v in problem.weights(theta).items()}
    start = float(problem.loss_w(w0))
    assert _gd_final_loss(problem, w0, 0.98 * eta_c, 600) < start
    assert _gd_final_loss(problem, w0, 1.02 * eta_c, 600) > 1e3 * start


@pytest.mark.parametrize(
    "x,y,needle",
    [([1, 2, 4], [3, 0, 48], r"y\[1\]=0\.0"), ([1, 2, 4], [3, -1, 48], r"y\[1\]=-1\.0"),
     ([1, 2, 4], [3, float("inf"), 48], r"y\[1\]=inf"), ([0, 2, 4], [3, 12, 48], r"x\[0\]=0\.0"),
     ([1, 2], [3, 12, 48], ">= 2 points"), ([1], [3], ">= 2 points"), ([2, 2], [3, 12], "distinct x")],
)  # fmt: skip
def test_loglog_slope_refuses_what_would_make_it_nan(x, y, needle):
    with pytest.raises(InputError, match=needle):
        loglog_slope(x, y)
