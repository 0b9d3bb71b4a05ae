"""Property-based checks (hypothesis) of Prop. 1 and the drift ± pairing over random settings."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signal_drift import (
    attach_lora,
    curvature,
    decompose_update,
    dense_hessian,
    init_theta,
    make_mlp,
    make_task,
)

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    dim = draw(st.integers(2, 5))
    depth = draw(st.integers(1, 3))
    rank = draw(st.integers(1, dim))
    alpha = draw(st.floats(0.1, 100.0))
    seed = draw(st.integers(0, 10_000))
    torch.set_default_dtype(torch.float64)
    task = make_task(dim, 12, seed=seed)
    model = make_mlp(dim, depth, seed=seed, bias=draw(st.booleans()))
    problem = attach_lora(model, task.X, task.y, rank=rank, alpha=alpha)
    theta = init_theta(problem, seed)
    gen = torch.Generator().manual_seed(seed)
    theta = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    return problem, theta


@SETTINGS
@given(problems())
def test_lora_hessian_is_signal_plus_drift(case):
    problem, theta = case
    c = curvature(problem, theta)
    ref = dense_hessian(problem.loss_theta, theta)
    scale = ref.abs().max().clamp_min(1e-300)
    assert ((c.signal.to_dense() + c.drift.to_dense() - ref).abs().max() / scale) < 1e-10


@SETTINGS
@given(problems())
def test_update_splits_exactly_into_signal_and_drift(case):
    problem, theta = case
    step = {k: torch.randn_like(v) for k, v in theta.items()}
    d = decompose_update(problem, theta, step)
    for k in d.delta_w:
        torch.testing.assert_close(d.delta_w[k], d.signal[k] + d.drift[k], rtol=1e-12, atol=1e-12)


@SETTINGS
@given(problems())
def test_drift_spectrum_is_symmetric(case):
    problem, theta = case
    e = torch.linalg.eigvalsh(curvature(problem, theta).drift.to_dense())
    assert (e + e.flip(0)).abs().max() <= 1e-10 * e.abs().max().clamp_min(1e-300)
