"""Spectral engine against dense eigendecompositions, and the Figure 8 experiment."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from cases import assert_cli_refuses, assert_close, compare_matmat, mlp_problem, rect_problem, trained_theta

from signal_drift import curvature, init_theta
from signal_drift.spectra import (
    InitBlocks,
    SpectraConfig,
    SpectrumStats,
    eigsh,
    hutchinson,
    hutchpp,
    lanczos_eigs,
    run_spectra,
    slq,
)


@pytest.fixture(scope="module")
def h_theta():
    torch.set_default_dtype(torch.float64)
    problem = mlp_problem(dim=6, depth=3, rank=2)
    op = curvature(problem, trained_theta(problem)).H_theta
    return op, torch.linalg.eigvalsh(op.to_dense())


def test_torch_lanczos_finds_both_extremes_of_an_indefinite_operator(h_theta):
    op, eig = h_theta
    res = lanczos_eigs(op, k=2, which="BE", steps=op.shape[0])
    np.testing.assert_allclose(res.values, [eig[0], eig[1], eig[-2], eig[-1]], rtol=1e-8)
    assert res.residuals.max() < 1e-8 * float(eig.abs().max())


def test_lanczos_basis_stays_orthonormal_where_plain_lanczos_would_not():
    # a geometric spectrum converges its top Ritz values early, which is exactly when plain
    # Lanczos loses orthogonality (‖QᵀQ − I‖ ≈ 7 after 120 steps here); with reorthogonalisation
    # the basis must stay orthonormal and the well-separated top eigenvalues come out exactly
    from signal_drift.operators import FunctionOperator
    from signal_drift.spectra.lanczos import lanczos

    P = 300
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(P, P, generator=gen, dtype=torch.float64))
    lam = torch.cat([0.7 ** torch.arange(P // 2.0, dtype=torch.float64), -torch.linspace(0, 1, P - P // 2)])
    A = U @ torch.diag(lam) @ U.T
    op = FunctionOperator(lambda V: A @ V, (P, P), torch.float64, symmetric=True)
    tri = lanczos(op, torch.randn(P, generator=gen, dtype=torch.float64), P)
    m = tri.Q.shape[1]
    assert tri.Q.shape == (P, m)
    assert torch.linalg.matrix_norm(tri.Q.T @ tri.Q - torch.eye(m, dtype=torch.float64)) < 1e-12
    assert torch.linalg.matrix_norm(tri.Q.T @ A @ tri.Q - tri.T()) < 1e-12
    assert m > 150  # it ran far past the point where plain Lanczos breaks down
    ritz, lam_sorted = torch.linalg.eigvalsh(tri.T()), torch.sort(lam).values
    assert torch.allclose(ritz[-20:], lam_sorted[-20:], rtol=0, atol=1e-12)
    assert abs(ritz[0] - lam_sorted[0]) < 1e-12


def test_probes_advanced_together_equal_separate_lanczos_runs(h_theta):
    from signal_drift.operators import FunctionOperator
    from signal_drift.spectra.lanczos import lanczos, lanczos_probes

    op, _ = h_theta
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(op.shape[0], 4, generator=gen, dtype=torch.float64)
    for tri, i in zip(lanczos_probes(op, V, 30), range(4), strict=True):
        ref = lanczos(op, V[:, i], 30)
        assert len(tri.alpha) == len(ref.alpha)
        assert torch.allclose(
            torch.linalg.eigvalsh(tri.T()), torch.linalg.eigvalsh(ref.T()), rtol=0, atol=1e-10
        )
    # runs stop on their own invariant subspaces: an eigenvector after 1 step, the others after 3
    A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 5.0, 5.0], dtype=torch.float64))
    small = FunctionOperator(lambda X: A @ X, (6, 6), torch.float64, symmetric=True)
    V = torch.tensor([[0, 1, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6], [1, -1, 1, -1, 1, -1]], dtype=torch.float64).T
    tris = lanczos_probes(small, V, 6)
    assert (
        [len(t.alpha) for t in tris] == [len(lanczos(small, V[:, i], 6).alpha) for i in range(3)] == [1, 3, 3]
    )
    assert torch.allclose(
        torch.linalg.eigvalsh(tris[1].T()), torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    )


def _zero_diagonal_operator(n=10, rank=2):
    """``[[0, C], [Cᵀ, 0]]`` with ``C`` of rank 2 (H_drift's shape) and a start vector in one block.

    From there every Lanczos ``α_j`` is exactly 0 and the Krylov space is
    ``span{v0} ⊕ range(C) ⊕ range(Cᵀ)``, of dimension ``1 + 2·rank``.
    """
    from signal_drift.operators import FunctionOperator

    gen = torch.Generator().manual_seed(0)
    L, R = (torch.randn(n, rank, generator=gen, dtype=torch.float64) for _ in range(2))
    C = L @ R.T
    Z = torch.zeros(n, n, dtype=torch.float64)
    A = torch.cat([torch.cat([Z, C], 1), torch.cat([C.T, Z], 1)], 0)
    v0 = torch.cat([torch.randn(n, generator=gen, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)])
    return FunctionOperator(lambda V: A @ V, (2 * n, 2 * n), torch.float64, symmetric=True), v0, C


def test_lanczos_on_a_zero_diagonal_operator_finds_plus_minus_singular_values():
    from signal_drift.spectra.lanczos import lanczos

    op, v0, C = _zero_diagonal_operator()
    tri = lanczos(op, v0, op.shape[0])
    assert tri.alpha.abs().max() == 0
    m = tri.Q.shape[1]
    assert torch.linalg.matrix_norm(tri.Q.T @ tri.Q - torch.eye(m, dtype=torch.float64)) < 1e-12
    s = torch.linalg.svdvals(C)[:2]
    ritz = torch.linalg.eigvalsh(tri.T())
    assert torch.allclose(ritz[[0, 1, -2, -1]], torch.cat([-s, s.flip(0)]), rtol=0, atol=1e-12 * float(s[0]))


def test_lanczos_stops_on_an_invariant_subspace_relative_to_the_norm_of_t():
    from signal_drift.spectra.lanczos import lanczos

    op, v0, _ = _zero_diagonal_operator()
    tri = lanczos(op, v0, op.shape[0])
    # the 5th residual is round-off, ~1e-15·‖T‖ (‖T‖ = σ_max(C)), far below 1e-12·‖T‖
    assert len(tri.alpha) == 5


def test_slq_gives_the_same_quadrature_whatever_the_probe_grouping(h_theta, monkeypatch):
    import importlib

    slq_module = importlib.import_module("signal_drift.spectra.slq")  # the package re-exports slq()

    op, _ = h_theta
    together = slq(op, probes=5, steps=15, seed=3)
    monkeypatch.setattr(slq_module, "_BASES_BYTES", 1)  # one probe at a time
    alone = slq(op, probes=5, steps=15, seed=3)
    assert np.allclose(together.nodes, alone.nodes, rtol=0, atol=1e-10 * np.abs(alone.nodes).max())
    assert np.allclose(together.weights, alone.weights, rtol=0, atol=1e-10)


def test_scipy_eigsh_bridge_matches_dense(h_theta):
    op, eig = h_theta
    top = eigsh(op, k=3, which="LA")
    bottom = eigsh(op, k=2, which="SA")
    np.testing.assert_allclose(top.values, eig[-3:].numpy(), rtol=1e-8)
    np.testing.assert_allclose(bottom.values, eig[:2].numpy(), rtol=1e-8)
    assert top.residuals.max() < 1e-7 * float(eig.abs().max())


def test_slq_trace_and_negative_fraction_agree_with_dense(h_theta):
    op, eig = h_theta
    res = slq(op, probes=30, steps=30)
    tr, se = res.trace()
    assert abs(tr - float(eig.sum())) < 4 * se + 1e-9
    assert res.negative_fraction().covers(float((eig < 0).double().mean()))
    # a count needs no slack where the math gives it exactly: with a full Krylov space (steps = P)
    # every probe's Ritz nodes are the eigenvalues, so each counts the exact number of negative
    # ones, and the band is the probes' exact measures ± t·SE (with fewer steps Ritz nodes
    # straddle 0 and the plain estimate is biased: the band above carries that bias)
    full = slq(op, probes=30, steps=op.shape[0])
    n_neg = int((eig < 0).sum())
    assert 0 < n_neg < op.shape[0]
    assert [int((nodes < 0).sum()) for nodes in full.nodes] == [n_neg] * 30
    assert full.exact.all() and full.negative_fraction().covers(n_neg / op.shape[0])
    sigma = 0.05 * float(eig.abs().max())
    grid = np.linspace(float(eig[0]) - 8 * sigma, float(eig[-1]) + 8 * sigma, 4000)
    dens, _ = res.density(grid, sigma=sigma)
    assert abs(np.trapezoid(dens, grid) - 1) < 1e-3


@pytest.mark.parametrize("estimator", [hutchinson, hutchpp])
def test_trace_estimators_are_within_their_error_bars(h_theta, estimator):
    op, eig = h_theta
    est = estimator(op, 90, seed=3)
    assert est.stderr > 0
    assert abs(est.value - float(eig.sum())) < 4 * est.stderr


def test_spectrum_stats_from_lanczos_and_slq_agree_with_the_dense_ones(h_theta):
    op, eig = h_theta
    dense = SpectrumStats.from_eigenvalues(eig)
    assert dense.negative_count == int((eig < 0).sum()) and dense.trace == float(eig.sum())
    ext = lanczos_eigs(op, 1, "BE", steps=op.shape[0])
    dens = slq(op, probes=30, steps=op.shape[0])
    est = SpectrumStats.from_lanczos_slq(ext, ext, dens, dense.trace, negative=("mass", "fraction"))
    assert math.isclose(est.lambda_max, dense.lambda_max, rel_tol=1e-8)
    assert math.isclose(est.lambda_min, dense.lambda_min, rel_tol=1e-8)
    assert est.negative_mass_interval.covers(dense.negative_mass)
    assert est.negative_fraction_interval.covers(dense.negative_count / op.shape[0])
    assert list(est.to_json("x")) == [
        "lambda_max_x", "lambda_min_x", "lanczos_residual_max_x", "lanczos_residual_min_x", "trace_x",
        "negative_fraction_x", "negative_fraction_x_interval", "negative_mass_x", "negative_mass_x_interval",
    ]  # fmt: skip


@pytest.mark.parametrize("case", ["square", "rectangular"])
def test_init_blocks_reproduce_h_theta_at_init(case):
    """Block-wise spectra, products and inertia of α² S₁ + α D₁ against the dense matrices."""
    problem = mlp_problem(dim=5, depth=3, rank=2) if case == "square" else rect_problem()
    c = curvature(problem, init_theta(problem, seed=1))
    S1, D1 = c.signal.to_dense(), c.drift.to_dense()
    blocks = InitBlocks.from_dense(problem, S1, D1)
    index = [blocks.iB, *(i for c in blocks.couplings for i in (c.iA, c.iB))]
    assert {i.device for i in index} == {
        S1.device
    }  # made once where the products run, never copied per product
    eS, eD = blocks.eigvalsh()
    assert_close(eS, torch.linalg.eigvalsh(S1), atol=1e-12 * float(S1.abs().max()))
    assert_close(eD, torch.linalg.eigvalsh(D1), atol=1e-12 * float(D1.abs().max()))
    for a in (0.5, 3.0):
        M = a * a * S1 + a * D1
        compare_matmat(blocks.H_theta(a), M)
        assert_close(blocks.dense_H_theta(a), M)
        assert math.isclose(blocks.trace_H_theta(a), float(torch.trace(M)), rel_tol=1e-12)
        eig = torch.linalg.eigvalsh(M)
        count, how = blocks.negative_count(a)
        assert count == int((eig < -1e-9 * float(eig.abs().max())).sum())
        assert ("|A|" in how) == (case == "square") and ("LDLᵀ" in how) == (case == "rectangular")


@pytest.fixture(scope="module")
def small_run():
    cfg = SpectraConfig(dim=8, rank=2, samples=128, a_draws=2000, slq_probes=4, slq_steps=30)
    return run_spectra(cfg, progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def lanczos_run(small_run):
    cfg = SpectraConfig(
        dim=8, rank=2, samples=128, a_draws=2000, slq_probes=16, slq_steps=30, lora_spectra="lanczos"
    )
    return run_spectra(cfg, progress=False, log=lambda m: None)


EXACT_IN_BOTH_MODES = ["lambda_max_lora", "lambda_min_lora", "lambda_max_signal", "lambda_min_signal",
                       "lambda_max_drift", "lambda_min_drift", "trace_lora", "trace_signal", "norm_signal",
                       "norm_drift", "negative_mass_signal"]  # fmt: skip


def test_matrix_free_lora_spectra_keep_every_exact_number(small_run, lanczos_run):
    """Lanczos extremes and block-wise signal/drift spectra = the dense eigendecompositions."""
    d, m = small_run.summary, lanczos_run.summary
    assert (
        d["lora_spectra_method"] == "dense eigvalsh" and m["lora_spectra_method"] == "Lanczos extremes + SLQ"
    )
    for key in EXACT_IN_BOTH_MODES:
        np.testing.assert_allclose(m[key], d[key], rtol=1e-9, atol=1e-12 * max(map(abs, d[key])), err_msg=key)


def test_matrix_free_negative_mass_band_covers_the_dense_value(small_run, lanczos_run):
    d, m = small_run.summary, lanczos_run.summary
    for exact, band in zip(d["negative_mass_lora"], m["negative_mass_lora_interval"], strict=True):
        assert band["low"] <= exact <= band["high"] and band["level"] == 0.95


def test_matrix_free_negative_count_is_exact(small_run, lanczos_run):
    """Sylvester: the zero A block at B = 0 and invertible square C_l give exactly P_θ/2 negatives."""
    d, m = small_run.summary, lanczos_run.summary
    assert d["negative_count_lora"] == m["negative_count_lora"] == [m["params_lora"] // 2] * 8
    assert all(how.startswith("exact") for how in m["negative_count_lora_method"])


def test_matrix_free_mode_plots_slq_densities(lanczos_run, tmp_path):
    from signal_drift.spectra.figure import plot_fig8

    assert (
        lanczos_run.arrays["slq_nodes_lora"].shape == (8, 16, 30)
        and "eig_lora" not in lanczos_run.arrays
        or (len(lanczos_run.arrays["eig_lora"]) == 0)
    )
    paths = plot_fig8(lanczos_run.summary, lanczos_run.arrays, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


def test_spectra_result_is_frozen_and_json_ready(small_run):
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        small_run.summary = {}
    js = small_run.to_json()
    assert json.loads(json.dumps(js, allow_nan=False)) == js
    assert js["lambda_max_lora"] == small_run.summary["lambda_max_lora"] and js["config"]["alphas"] is None
    assert small_run.lines and all(isinstance(line, str) for line in small_run.lines)


def test_spectra_slopes_are_two_and_one_at_init(small_run):
    s = small_run.summary
    # the run's own slopes are identities of S(α) = α²S₁, D(α) = αD₁ ...
    assert abs(s["slope_signal"] - 2) < 1e-6
    assert abs(s["slope_drift"] - 1) < 1e-6
    assert abs(s["slope_drift_to_signal"] + 1) < 1e-6
    # ... the measured ones come from products evaluated at each α (autograd H_θ(α), S(α) at α)
    assert abs(s["slope_signal_measured"] - 2) < 1e-9
    assert abs(s["slope_drift_measured"] - 1) < 1e-9


def test_spectra_trace_rule_inside_the_reported_band(small_run):
    s = small_run.summary
    rows = zip(s["trace_signal_mc_interval"], s["trace_rule_predicted"], strict=True)
    for band, pred in rows:
        assert band["high"] - band["low"] < 0.1 * pred
        assert band["low"] <= pred <= band["high"]
    assert s["trace_identity_residual"] < 1e-10


def test_spectra_assembled_lora_hessian_matches_autograd_at_every_alpha(small_run):
    s = small_run.summary
    assert len(s["autograd_check_residual"]) == len(s["alphas"])
    assert max(s["autograd_check_residual"].values()) < 1e-10
    assert max(s["signal_at_alpha_check_residual"].values()) < 1e-10


def test_spectra_drift_dominates_small_alpha_and_purifies_at_large_alpha(small_run):
    s = small_run.summary
    assert s["drift_to_signal"][0] > 1 > s["drift_to_signal"][-1]
    # drift-dominated: near-symmetric ± spectrum; purified: λ(H_θ) → λ(H_signal)
    assert abs(s["lambda_min_lora"][0] + s["lambda_max_lora"][0]) < 0.5 * s["lambda_max_lora"][0]
    assert math.isclose(s["lambda_max_lora"][-1], s["lambda_max_signal"][-1], rel_tol=0.1)
    i = int(np.argmin([abs(math.log(a / s["rank"])) for a in s["alphas"]]))
    assert s["lambda_max_lora"][i] < s["lambda_max_fft"]


def test_spectra_at_trained_points_reports_every_alpha():
    cfg = SpectraConfig(
        dim=6, rank=2, samples=64, alphas=(2.0, 8.0), train_steps=3, slq_probes=2, slq_steps=10
    )
    s = run_spectra(cfg, progress=False, log=lambda m: None).summary
    assert len(s["lambda_max_lora"]) == 2 and all(np.isfinite(s["lambda_max_lora"]))
    assert s["point"].startswith("3 Adam steps")


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "signal_drift.spectra", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )


def test_spectra_cli_writes_figures_and_is_deterministic(tmp_path):
    args = ["--dim", "6", "--rank", "2", "--samples", "64", "--slq-probes", "2", "--slq-steps", "12"]
    a, b = tmp_path / "a", tmp_path / "b"
    r1 = _cli(*args, "--out", str(a))
    assert r1.returncode == 0, r1.stderr
    r2 = _cli(*args, "--out", str(b), "--no-plot")
    assert r2.returncode == 0, r2.stderr
    for name in ["fig8.png", "fig8a.png", "fig8b.png", "fig8c.png", "fig8d.png", "spectra.json"]:
        assert (a / name).stat().st_size > 0
    ja, jb = json.loads((a / "spectra.json").read_text()), json.loads((b / "spectra.json").read_text())
    ja.pop("timings"), jb.pop("timings")
    assert ja == jb
    required = (
        "dim rank alphas lambda_max_fft trace_fft lambda_max_lora lambda_min_lora lambda_max_signal"
        " lambda_min_drift lambda_max_drift trace_lora trace_signal trace_rule_predicted norm_signal"
        " norm_drift slope_signal slope_drift config"
    ).split()
    assert all(k in ja for k in required)
    assert "(d) slopes" in r1.stdout


@pytest.mark.parametrize("lora_spectra", ["dense", "lanczos"])
def test_spectra_cli_interrupted_keeps_every_finished_alpha(tmp_path, monkeypatch, lora_spectra):
    import signal_drift.spectra.experiment as experiment
    from signal_drift.spectra.__main__ import main

    args = ["--dim", "6", "--rank", "2", "--samples", "64", "--slq-probes", "2", "--slq-steps", "12"]
    args += ["--lora-spectra", lora_spectra, "--no-plot"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "spectra.json").read_text())
    calls, append = [], experiment._append

    def append_then_ctrl_c(*a, **kw):  # Ctrl-C while the third α is being processed
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return append(*a, **kw)

    monkeypatch.setattr(experiment, "_append", append_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "cut")])
    part = json.loads((tmp_path / "cut" / "spectra.json").read_text())
    arrays = np.load(tmp_path / "cut" / "spectra_arrays.npz")
    assert full["complete"] is True and part["complete"] is False and part["alphas_done"] == 2
    for key in ("lambda_max_fft", "trace_fft", "negative_fraction_fft"):
        assert part[key] == full[key]
    for key in ("lambda_max_lora", "lambda_min_lora", "norm_signal", "norm_drift"):
        assert part[key] == full[key][:2]
    assert "slq_nodes_fft" in arrays
    if lora_spectra == "dense":
        assert arrays["eig_lora"].shape[0] == 2
    else:
        assert arrays["slq_nodes_lora"].shape[0] == 2


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--rank", "0"], "--rank=0"),
        (["--dim", "4", "--rank", "5"], "1..4"),
        (["--dim", "0"], "--dim=0"),
        (["--dtype", "float16"], "--dtype"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--alphas", "1", "-2"], "--alphas"),
    ],
)
def test_spectra_cli_rejects_bad_input_with_one_line_and_no_output(tmp_path, args, needle):
    out = tmp_path / "o"
    r = assert_cli_refuses(["signal_drift.spectra", *args, "--out", str(out)], needle, out)
    assert len(r.stderr.strip().splitlines()) == 1


def test_exact_fft_diagonalises_h_and_agrees_with_lanczos_and_exact_trace():
    cfg = SpectraConfig(dim=4, rank=2, depth=3, samples=32, exact_fft=True, slq_probes=2, slq_steps=10)
    res = run_spectra(cfg, progress=False, log=lambda m: None)
    e, s = res.arrays["eig_fft"], res.summary
    assert math.isclose(e.max(), s["lambda_max_fft"], rel_tol=1e-8)
    assert math.isclose(e.min(), s["lambda_min_fft"], rel_tol=1e-8, abs_tol=1e-12)
    assert math.isclose(s["trace_fft_dense"], s["trace_fft"], rel_tol=1e-10)
    # the SLQ bands of the FFT spectrum cover the dense truth
    eig = torch.as_tensor(res.arrays["eig_fft"])
    frac, mass = s["negative_fraction_fft_interval"], s["negative_mass_fft_interval"]
    assert frac["low"] <= float((eig < 0).double().mean()) <= frac["high"]
    assert mass["low"] <= s["negative_mass_fft_dense"] <= mass["high"]


def test_spectra_cli_refuses_a_dense_matrix_above_the_memory_budget(tmp_path):
    import os

    env = dict(os.environ, SIGNAL_DRIFT_MAX_DENSE_BYTES="10000")
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "signal_drift.spectra", "--dim", "6", "--rank", "2", "--samples", "16",
                        "--out", str(out)], capture_output=True, text=True, env=env)  # fmt: skip
    assert (
        r.returncode == 2
        and "needs" in r.stderr
        and "matrix-free" in r.stderr
        and "Traceback" not in r.stderr
    )
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "H_signal" in errors[0] and not out.exists()
