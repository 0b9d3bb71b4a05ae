"""Every printed band covers the truth: coverage against dense truth over many seeds.

Each estimator that prints an interval is run over >= 20 seeds on a problem small enough for the
exact answer; its stated 95 % interval must cover the truth at least 90 % of the time. Where a
naive ``± SE`` band is known to fail (SLQ counts near a cluster of eigenvalues at 0), the test
also shows that it fails there, so the coverage check has the power to see the difference.
"""

import math

import numpy as np
import pytest
import torch
from cases import mlp_problem, trained_theta

from signal_drift import attach_lora, curvature, fft_hessian, init_theta, make_mlp, make_task
from signal_drift.intervals import Interval, bracket_interval, mean_interval, t_quantile
from signal_drift.operators import FunctionOperator
from signal_drift.spectra import hutchinson, hutchpp, slq
from signal_drift.spectra.inertia import count_below, inertia
from signal_drift.theory import signal_trace_at_init

SEEDS = range(20)


@pytest.fixture(scope="module")
def fft_d16():
    """The FFT Hessian of a d = 16 SiLU MLP at init: 44 % negative eigenvalues, many near 0."""
    torch.set_default_dtype(torch.float64)
    model, task = make_mlp(16, 5, seed=0), make_task(16, 256, seed=0)
    problem = attach_lora(model, task.X, task.y, rank=2, alpha=1.0)
    H = fft_hessian(problem, init_theta(problem, 0))
    return H, torch.linalg.eigvalsh(H.to_dense())


@pytest.fixture(scope="module")
def slq_runs(fft_d16):
    H, _ = fft_d16
    return [slq(H, probes=8, steps=30, seed=s) for s in SEEDS]


def _naive_covers(res, truth: float) -> bool:
    per = (res.weights * (res.nodes < 0)).sum(1)
    half = t_quantile(0.95, len(per)) * per.std(ddof=1) / math.sqrt(len(per))
    return abs(per.mean() - truth) <= half


def test_slq_negative_fraction_band_covers_the_exact_count(fft_d16, slq_runs):
    _, eig = fft_d16
    truth, runs = float((eig < 0).double().mean()), slq_runs
    bands = [r.negative_fraction() for r in runs]
    assert sum(b.covers(truth) for b in bands) >= 0.9 * len(bands)
    assert all(b.level == 0.95 and b.low < b.estimate < b.high for b in bands)
    # the plain quadrature ± t·SE is biased here and its band misses the truth most of the time
    assert sum(_naive_covers(r, truth) for r in runs) < 0.5 * len(runs)


def test_slq_negative_mass_band_covers_the_exact_mass(fft_d16, slq_runs):
    _, eig = fft_d16
    truth, runs = float(eig[eig < 0].abs().sum() / eig.abs().sum()), slq_runs
    edge = float(eig[0]) * (1 + 1e-9)
    plain = [r.negative_mass(edge) for r in runs]
    with_trace = [r.negative_mass(edge, trace=float(eig.sum())) for r in runs]
    assert sum(b.covers(truth) for b in plain) >= 0.9 * len(runs)
    assert sum(b.covers(truth) for b in with_trace) >= 0.9 * len(runs)
    # knowing the trace exactly removes one estimated quantity: a narrower band
    assert np.mean([b.half_width for b in with_trace]) < np.mean([b.half_width for b in plain])


def test_slq_band_narrows_with_more_steps(fft_d16):
    """The bracket holds the quadrature's bias, so more Lanczos steps must shrink it."""
    H, _ = fft_d16
    widths = [slq(H, probes=4, steps=m, seed=0).negative_fraction().half_width for m in (10, 40, 160)]
    assert widths[0] > widths[1] > widths[2]


def test_slq_distribution_bounds_hold_per_probe_exactly():
    """Chebyshev–Markov–Stieltjes: each probe's bracket contains its own exact spectral measure."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(30):
        P = 60 + trial
        lam = torch.cat([1e-3 * torch.randn(P // 2, generator=gen), torch.randn(P - P // 2, generator=gen)])
        U, _ = torch.linalg.qr(torch.randn(P, P, generator=gen))
        A = U @ torch.diag(lam) @ U.T
        op = FunctionOperator(lambda V, A=A: A @ V, (P, P), torch.float64, symmetric=True)
        res = slq(op, probes=3, steps=5 + trial % 20, seed=trial)
        gen_v = torch.Generator().manual_seed(trial)  # the probes slq drew
        V = torch.stack([torch.randint(0, 2, (P,), generator=gen_v).double() * 2 - 1 for _ in range(3)], 1)
        mu = ((U.T @ V) ** 2 / P).T  # [probes, P]: each probe's exact spectral measure
        for x in (0.0, float(torch.randn((), generator=gen))):
            exact = (mu * (lam < x)).sum(1).numpy()
            lo, hi = res.distribution_bounds(x)
            assert np.all(lo - 1e-12 <= exact) and np.all(exact <= hi + 1e-12)
        neg = (mu * torch.clamp(-lam, min=0)).sum(1).numpy()
        lo, hi = res.negative_part_bounds(float(lam.min()))
        assert np.all(lo - 1e-12 <= neg) and np.all(neg <= hi + 1e-12)


def test_slq_on_an_invariant_subspace_is_exact():
    A = torch.diag(torch.tensor([-2.0, -1.0, 1.0, 3.0]))
    op = FunctionOperator(lambda V: A @ V, (4, 4), torch.float64, symmetric=True)
    res = slq(op, probes=3, steps=10)
    assert res.exact.all()  # Lanczos stopped on the 4-dimensional Krylov space
    band = res.negative_fraction()  # every Rademacher probe sees exactly half the mass below 0
    assert math.isclose(band.low, 0.5, abs_tol=1e-12) and math.isclose(band.high, 0.5, abs_tol=1e-12)


@pytest.mark.parametrize("estimator", [hutchinson, hutchpp])
def test_trace_estimator_bands_cover_the_exact_trace(estimator):
    torch.set_default_dtype(torch.float64)
    problem = mlp_problem(dim=6, depth=3, rank=2)
    A = curvature(problem, trained_theta(problem)).H_theta.to_dense()  # indefinite, P = 90
    op = FunctionOperator(lambda V: A @ V, A.shape, torch.float64, symmetric=True)
    truth = float(torch.trace(A))
    bands = [estimator(op, 30, seed=s).interval() for s in range(40)]
    assert sum(b.covers(truth) for b in bands) >= 0.9 * len(bands)
    assert all(b.high > b.low for b in bands)


def test_trace_rule_monte_carlo_band_covers_alpha2_rho_trH():
    """Prop. 3: E_A tr H_signal = α²ρ tr H exactly; the printed band over A draws must cover it."""
    torch.set_default_dtype(torch.float64)
    model, task = make_mlp(8, 3, seed=0), make_task(8, 128, seed=0)
    problem = attach_lora(model, task.X, task.y, rank=2, alpha=1.0)
    K = fft_hessian(problem, init_theta(problem, 0)).partial_traces()
    # A ~ N(0, 1/n): E[AᵀA] = (r/n) I, so E tr(s² K AᵀA) = s² (r/n) tr K per layer
    truth = sum(a.scale**2 * a.rank / a.fan_in * float(torch.trace(K[a.name])) for a in problem.adapters)
    covered = 0
    for s in SEEDS:
        vals = [signal_trace_at_init(problem, init_theta(problem, 1000 * s + i), K) for i in range(40)]
        covered += mean_interval(np.array(vals)).covers(truth)
    assert covered >= 0.9 * len(SEEDS)


def test_bracket_interval_contains_its_estimate_and_the_bounds():
    band = bracket_interval(0.5, np.array([0.4, 0.45, 0.42]), np.array([0.6, 0.58, 0.61]))
    assert band.low < 0.4 < 0.61 < band.high and band.covers(0.5)
    with pytest.raises(ValueError):
        Interval(1.0, 2.0, 0.5, 0.95)


def test_inertia_counts_match_eigenvalues():
    gen = torch.Generator().manual_seed(0)
    for P in (1, 2, 7, 40, 120):
        M = torch.randn(P, P, generator=gen)
        M = M + M.T
        eig = torch.linalg.eigvalsh(M)
        got = inertia(M)
        assert (got.negative, got.positive) == (int((eig < 0).sum()), int((eig > 0).sum()))
        x = float(eig[P // 2 - 1] + eig[P // 2]) / 2 if P > 1 else float(eig[0]) + 1
        assert count_below(M, x) == (int((eig < x).sum()),) * 2


def test_fraction_band_stays_inside_zero_one():
    # two probes that disagree wildly: the raw t-band would reach below 0 and above 1
    band = bracket_interval(0.5, np.array([0.0, 0.9]), np.array([0.1, 1.0]), support=(0.0, 1.0))
    assert band.low == 0.0 and band.high == 1.0


def test_exact_probes_bracket_eigenvalues_at_zero():
    """Exact zeros come back as Ritz nodes of ±1e-16: the band must not decide their sign by round-off."""
    gen = torch.Generator().manual_seed(3)
    lam = torch.cat([-torch.ones(10), torch.zeros(20), torch.ones(10)])
    U, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen))
    A = U @ torch.diag(lam) @ U.T
    op = FunctionOperator(lambda V: A @ V, (40, 40), torch.float64, symmetric=True)
    res = slq(op, probes=64, steps=40)
    assert res.exact.all()
    assert res.negative_fraction().covers(0.25)


def test_slq_negative_mass_band_has_power_where_plain_slq_is_biased():
    """Small negative and positive eigenvalues share Ritz nodes: the plain ratio ± t·SE misses."""
    gen = torch.Generator().manual_seed(0)
    lam = torch.cat([0.1 * torch.rand(150, generator=gen) - 0.06, 0.5 + torch.rand(150, generator=gen)])
    U, _ = torch.linalg.qr(torch.randn(300, 300, generator=gen))
    A = U @ torch.diag(lam) @ U.T
    op = FunctionOperator(lambda V: A @ V, (300, 300), torch.float64, symmetric=True)
    truth = float(lam[lam < 0].abs().sum() / lam.abs().sum())
    ours = naive = 0
    for s in SEEDS:
        res = slq(op, probes=8, steps=4, seed=s)
        ours += res.negative_mass(float(lam.min()) * (1 + 1e-9)).covers(truth)
        w, th = res.weights, res.nodes
        per = (w * np.abs(th) * (th < 0)).sum(1) / (w * np.abs(th)).sum(1)
        naive += abs(per.mean() - truth) <= t_quantile(0.95, 8) * per.std(ddof=1) / math.sqrt(8)
    assert ours >= 0.9 * len(SEEDS)
    assert naive < 0.9 * len(SEEDS)
