import json
import math
import subprocess
import sys

import pytest
import torch
from cases import assert_cli_refuses, assert_close, mlp_problem
from torch.func import grad, jvp

from signal_drift import init_theta
from signal_drift.dynamics import (
    DynamicsConfig,
    consistent_alpha_point,
    run_dynamics,
    sdr_probes,
    train_lora,
)


def test_per_step_records_satisfy_the_decomposition_identities():
    # every record against Δw parts computed here, not by decompose_update: the GD step
    # Δθ = −η ∇_θL by autograd, Δw_signal = J Δθ as a jvp of θ ↦ w, and Δw_drift = ½ ΔθᵀTΔθ
    # as a second jvp (the map is bilinear, so nothing else is left)
    problem, lr, steps = mlp_problem(), 0.05, 8
    run = train_lora(
        problem,
        init_theta(problem),
        steps=steps,
        lr=lr,
        optimizer="sgd",
        curvature_every=4,
        checkpoints=range(steps),
    )
    assert len(run.loss) == 9 and not run.diverged
    thetas = [run.checkpoints[t][0] for t in range(steps)] + [run.theta]

    def norm(d):
        return math.sqrt(sum(float(v.pow(2).sum()) for v in d.values()))

    for t, theta in enumerate(thetas[:-1]):
        grad_theta = grad(problem.loss_theta)(theta)
        dtheta = {k: -lr * v for k, v in grad_theta.items()}
        for k in theta:  # the run took this step
            assert_close(thetas[t + 1][k] - theta[k], dtheta[k], rtol=1e-9, atol=1e-15)
        _, sig = jvp(problem.weights, (theta,), (dtheta,))
        _, curv = jvp(
            lambda th, dtheta=dtheta: jvp(problem.weights, (th,), (dtheta,))[1], (theta,), (dtheta,)
        )
        dri = {k: 0.5 * v for k, v in curv.items()}
        G = grad(problem.loss_w)({k: v.detach() for k, v in problem.weights(theta).items()})
        ns, nd = norm(sig), norm(dri)
        assert ns > 0 and math.isclose(run.norm_signal[t], ns, rel_tol=1e-10)
        if t == 0:  # at B = 0 the A-gradient s BᵀG vanishes, so ΔA = 0 and the drift s ΔB ΔA too
            assert nd == 0 and run.norm_drift[0] == 0 and math.isinf(run.sdr[0])
        else:
            assert nd > 0 and math.isclose(run.norm_drift[t], nd, rel_tol=1e-10)
            assert math.isclose(run.sdr[t], ns / nd, rel_tol=1e-10)
        # Prop. 2(i): ⟨Δw_signal, −g⟩ = η ‖∇_θL‖² under GD
        gg = sum(float(v.pow(2).sum()) for v in grad_theta.values())
        assert math.isclose(run.align_signal[t], -sum(float((sig[k] * G[k]).sum()) for k in G), rel_tol=1e-10)
        assert math.isclose(run.align_signal[t], lr * gg, rel_tol=1e-10)
        ad = -sum(float((dri[k] * G[k]).sum()) for k in G)
        assert math.isclose(run.align_drift[t], ad, rel_tol=1e-9, abs_tol=1e-15 * lr * gg)
    assert all(a > 0 for a in run.align_signal)  # Prop. 2(i) under GD
    assert [x[0] for x in run.lambda_max] == [0, 4]


def test_divergence_is_detected_with_its_step():
    problem = mlp_problem()
    run = train_lora(problem, init_theta(problem), steps=50, lr=50.0, optimizer="sgd")
    assert run.diverged and 1 <= run.diverged_step < 50
    assert run.summary()["diverged"] and math.isnan(run.summary()["final_loss"])


def _checkpoint(problem, step=5):
    run = train_lora(problem, init_theta(problem), steps=step + 1, lr=0.02, checkpoints=[step])
    return run.checkpoints[step]


def test_consistent_alpha_point_keeps_the_function_and_scales_the_b_gradient():
    # the derivation behind the consistent probe: at (kα, A, B/k) w is unchanged, ∇_A too, ∇_B → k ∇_B
    problem = mlp_problem()
    theta, state = _checkpoint(problem)
    g1 = grad(problem.loss_theta)(theta)
    for k in (0.5, 3.0, 16.0):
        pk, thk, stk = consistent_alpha_point(problem, theta, state, k)
        w1, wk = problem.weights(theta), pk.weights(thk)
        for name in w1:
            assert_close(wk[name], w1[name], rtol=1e-13, atol=1e-15)
        gk = grad(pk.loss_theta)(thk)
        for a in problem.adapters:
            assert_close(gk[a.key_A], g1[a.key_A], rtol=1e-10, atol=1e-15)
            assert_close(gk[a.key_B], k * g1[a.key_B], rtol=1e-10, atol=1e-15)
            assert_close(stk.m[a.key_B], k * state.m[a.key_B], rtol=1e-15, atol=0)
            assert_close(stk.v[a.key_B], k**2 * state.v[a.key_B], rtol=1e-15, atol=0)
            assert stk.m[a.key_A] is state.m[a.key_A] and thk[a.key_A] is theta[a.key_A]


@pytest.mark.parametrize("optimizer", ["adam", "signsgd", "sgd", "muon"])
def test_consistent_probe_matches_its_closed_form_at_a_checkpoint(optimizer):
    # B ≠ 0: the direction is the same at every k (SGD: its B block ∝ k), and SDR(k) is exactly
    # ‖k^(1+p_B) S_B + S_A‖/(k^(1+p_B)‖Dr‖): what remains of the α-dependence is the B·ΔA signal
    problem = mlp_problem()
    out = sdr_probes(problem, _checkpoint(problem), 3.0, 0.02, [1, 2, 4, 8], optimizer=optimizer, eps=0.0)
    assert out.consistent_direction_change < 1e-12
    for got, want in zip(out.sdr_alpha_consistent, out.sdr_alpha_consistent_predicted, strict=True):
        assert math.isclose(got, want, rel_tol=1e-11)
    assert 0.01 < out.signal_share_b_da < 0.5  # B ≠ 0: the B·ΔA part is present ...
    assert out.slope_alpha_consistent < -1e-3  # ... and is what makes the slope negative
    assert abs(out.slope_eta_identity + 1) < 1e-12


def test_consistent_probe_is_exactly_alpha_invariant_at_b_zero_and_the_frozen_probe_is_not():
    # B = 0 with Adam moments as training leaves them (m_A ≠ 0, so ΔA ≠ 0 and the drift is not 0):
    # Prop. 4's exact case. The frozen-state probe mixes a k-scaled gradient into an unscaled
    # state and moves the direction; the consistent one does not.
    problem = mlp_problem()
    theta, state = _checkpoint(problem)
    theta = dict(theta) | {a.key_B: torch.zeros_like(theta[a.key_B]) for a in problem.adapters}
    ks = [1, 2, 4, 8, 16]
    out = sdr_probes(problem, (theta, state), 3.0, 0.02, ks, optimizer="adam", eps=0.0)
    assert out.signal_share_b_da == 0.0
    assert abs(out.slope_alpha_consistent) < 1e-10
    assert max(out.sdr_alpha_consistent) / min(out.sdr_alpha_consistent) - 1 < 1e-10
    # frozen state: ∇_A = 0 leaves ΔA alone, but ΔB's direction moves (mild, far above round-off)
    assert abs(out.slope_alpha_frozen_state) > 1e-3
    # with Adam's ε the invariance holds to O(ε/√v)
    out = sdr_probes(problem, (theta, state), 3.0, 0.02, ks, optimizer="adam")
    assert abs(out.slope_alpha_consistent) < 1e-5


def test_frozen_state_probe_is_not_alpha_invariant_at_a_checkpoint():
    # B ≠ 0: α changes the loss itself, so even sign-SGD (no state) moves; the consistent probe
    # is its closed form and differs from the frozen one by far more than round-off
    problem = mlp_problem()
    ckpt = _checkpoint(problem)
    for optimizer in ("signsgd", "adam"):
        out = sdr_probes(problem, ckpt, 3.0, 0.02, [1, 2, 4, 8], optimizer=optimizer, eps=0.0)
        gap = [
            abs(f / c - 1) for f, c in zip(out.sdr_alpha_frozen_state, out.sdr_alpha_consistent, strict=True)
        ]
        assert max(gap) > 1e-2, (optimizer, gap)
        assert abs(out.slope_alpha_frozen_state - out.slope_alpha_consistent) > 1e-2


def test_dynamics_runs_both_paths_and_reports_slopes():
    cfg = DynamicsConfig(
        dim=6,
        rank=2,
        samples=64,
        steps=12,
        multipliers=(1, 4, 400),
        lr0=0.02,
        curvature_every=6,
        curvature_early=2,
    )
    s = run_dynamics(cfg).summary
    assert set(s["eta_scaling"]) == set(s["alpha_scaling"]) == {"1", "4", "400"}
    assert s["eta_scaling"]["400"]["diverged"]  # η = 8 blows up
    assert abs(s["sdr_slope_eta_identity"] + 1) < 1e-9
    probes = s["sdr_probes"]["probes"]
    assert [p["checkpoint"] for p in probes] == s["sdr_probes"]["checkpoints"] == [3, 6, 9]
    assert s["sdr_slope_alpha_frozen_state"] == [p["slope_alpha_frozen_state"] for p in probes]
    assert s["sdr_slope_alpha_consistent"] == [p["slope_alpha_consistent"] for p in probes]
    for p in probes:
        for got, want in zip(p["sdr_alpha_consistent"], p["sdr_alpha_consistent_predicted"], strict=True):
            assert math.isclose(got, want, rel_tol=1e-6)  # Adam's ε: O(ε/√v)
    curv = s["curvature"]["eta_scaling"]["1"]
    assert curv["steps"] == [0, 1, 6] and curv["converged"] == [True, True, True]
    sh = s["sharpness"]["eta_scaling"]["1"]
    assert sh["step"] == [0, 1, 6] and sh["lambda_max"] == curv["lambda_max"]
    assert all(
        r == pytest.approx(0.02 * p / 38.0)
        for r, p in zip(sh["edge_ratio"], sh["preconditioned"], strict=True)
    )
    pred = s["edge_prediction"]["early"]
    assert (
        pred["records_used"] == [1]
        and pred["observed_eta"] == 400
        and pred["predicted_eta"] == pytest.approx(1 / sh["edge_ratio"][1])
    )
    assert s["edge_prediction"]["all_steps"]["records_used"] == [1, 6]
    assert all(r <= 1e-6 * abs(v) for r, v in zip(curv["residual"], curv["lambda_max"], strict=True))
    lc = s["lambda_max_convergence"]
    assert lc["measured"] == lc["converged"] > 0 and lc["max_relative_residual_converged"] < 1e-6


def test_unconverged_lambda_max_is_nan_with_its_residual_and_a_warning():
    problem = mlp_problem()
    run = train_lora(problem, init_theta(problem), steps=5, lr=0.02, curvature_every=4, lanczos_steps=3)
    for c, sh in zip(run.lambda_max, run.sharpness, strict=True):  # Adam: λ_max comes with Adam's sharpness
        assert not c.converged and math.isnan(c.value) and c.residual > 1e-6 and c.matvecs == sh.matvecs <= 20
        assert f"step {c.step}: λ_max(H_θ) =" in c.warning and "not converged after 4 products" in c.warning
        assert math.isnan(sh.preconditioned) and len(sh.warnings) == 4  # H_θ, P⁻¹H_θ, P⁻¹S, P⁻¹D
    run = train_lora(problem, init_theta(problem), steps=5, lr=0.02, optimizer="sgd", curvature_every=4,
                     lanczos_steps=3)  # fmt: skip
    for c in run.lambda_max:  # without Adam: λ_max alone
        assert not c.converged and math.isnan(c.value) and c.residual > 1e-6 and c.matvecs <= 4
        assert f"λ_max(H_θ) at step {c.step} =" in c.warning and "not converged" in c.warning
    assert run.sharpness == []
    run = train_lora(problem, init_theta(problem), steps=5, lr=0.02, curvature_every=4)
    assert all(c.converged and c.warning is None and c.residual <= 1e-6 * c.value for c in run.lambda_max)


def test_unconverged_lambda_max_reaches_the_json_the_warnings_and_stderr(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "signal_drift.dynamics", "--dim", "6", "--rank", "2", "--samples", "32", "--steps", "6",
         "--multipliers", "1", "2", "--curvature-every", "3", "--curvature-early", "0", "--lanczos-steps", "2",
         "--out", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    js = json.loads((tmp_path / "dynamics.json").read_text())
    curv = js["curvature"]["alpha_scaling"]["2"]
    assert curv["converged"] == [False, False] and all(math.isnan(v) for v in curv["lambda_max"])
    assert js["lambda_max_convergence"]["converged"] == 0 and js["lambda_max_convergence"]["measured"] == 6
    lines = [w for w in js["warnings"] if "not converged" in w]
    assert len(lines) == 6 and all(f"warning: {w}" in r.stderr for w in lines)
    assert all(math.isnan(v) for v in js["sharpness"]["alpha_scaling"]["2"]["preconditioned"])
    assert (tmp_path / "fig2.png").stat().st_size > 0  # the plot skips the NaN


def test_dynamics_cli_writes_json_and_figure(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "signal_drift.dynamics", "--dim", "6", "--rank", "2", "--samples", "32", "--steps", "6",
         "--multipliers", "1", "2", "--curvature-every", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    js = json.loads((tmp_path / "dynamics.json").read_text())
    for key in ("final_loss", "best_loss", "diverged", "diverged_step", "sdr_mean"):
        assert key in js["eta_scaling"]["2"] and key in js["alpha_scaling"]["2"]
    assert (tmp_path / "fig2.png").stat().st_size > 0


@pytest.mark.parametrize("args,needle", [(["--rank", "0"], "--rank=0"), (["--optimizer", "lbfgs"], "--optimizer"),
                                         (["--multipliers", "1", "0"], "--multipliers"),
                                         (["--curvature-early", "-1"], "--curvature-early")])  # fmt: skip
def test_dynamics_cli_rejects_bad_input(tmp_path, args, needle):
    out = tmp_path / "o"
    assert_cli_refuses(["signal_drift.dynamics", "--dim", "6", *args, "--out", str(out)], needle, out)


def test_dynamics_json_is_deterministic_by_seed(tmp_path):
    args = ["--dim", "5", "--rank", "2", "--samples", "24", "--steps", "8", "--multipliers", "1", "3",
            "--curvature-every", "4", "--no-plot"]  # fmt: skip
    for d in ("a", "b"):
        subprocess.run([sys.executable, "-m", "signal_drift.dynamics", *args, "--out", str(tmp_path / d)], check=True,
                       capture_output=True)  # fmt: skip
    for name in ("dynamics.json", "dynamics_curves.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_divergence_is_surfaced_as_a_warning():
    cfg = DynamicsConfig(
        dim=5, rank=2, samples=24, steps=10, multipliers=(1, 1000), lr0=0.02, curvature_every=0
    )
    s = run_dynamics(cfg).summary
    assert any("eta_scaling k=1000 diverged at step" in w for w in s["warnings"])


def test_adam_sharpness_uses_the_preconditioner_of_the_step_it_records():
    """The record at step t: H_θ at θ_t and P from the Adam state after step t's moment update.

    Checked against dense eigenvalues of P^{-1/2} H_θ P^{-1/2} built here (torch.func H_θ, P from
    the checkpointed state advanced by one gradient by hand).
    """
    from cases import dense_reference

    problem = mlp_problem()
    run = train_lora(problem, init_theta(problem), steps=4, lr=0.02, curvature_every=0, curvature_early=3,
                     checkpoints=(2,))  # fmt: skip
    assert [r.step for r in run.sharpness] == [0, 1, 2]
    theta, state = run.checkpoints[2]
    g = grad(problem.loss_theta)(theta)
    v = {k: 0.999 * state.v[k] + 0.001 * g[k] ** 2 for k in theta}
    P = torch.cat(
        [
            ((v[k] / (1 - 0.999 ** (state.t + 1))).sqrt() + 1e-8).reshape(-1)
            for k in problem.theta_layout.names
        ]
    )
    d = P.rsqrt()
    ref = dense_reference(problem, theta)
    ev = torch.linalg.eigvalsh(d[:, None] * ref.H_theta * d[None, :])
    rec = run.sharpness[2]
    assert rec.preconditioned == pytest.approx(float(ev[-1]), rel=1e-8)
    assert rec.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(ref.H_theta)[-1]), rel=1e-8)
    assert rec.edge_ratio == pytest.approx(0.02 * float(ev[-1]) / 38.0, rel=1e-8)


def test_finding_2_over_seeds():
    """Synthetic outcomes: paired best-loss difference and breakdown multipliers over seeds."""
    from signal_drift.dynamics import paths_over_seeds

    def seed(shift, broken_eta):
        eta = {
            1.0: (1.0 + shift, False),
            4.0: (0.8 + shift, False),
            16.0: (math.nan, True) if broken_eta else (0.9 + shift, False),
        }
        alpha = {1.0: (1.0 + shift, False), 4.0: (0.7 + shift, False), 16.0: (0.75 + shift, False)}
        return {"eta_scaling": eta, "alpha_scaling": alpha}

    o = paths_over_seeds([seed(0.0, True), seed(0.3, True), seed(-0.2, True)], [0, 1, 2])
    d = o["best_alpha_minus_best_eta"]
    assert d["estimate"] == pytest.approx(-0.1) and d["high"] < 0  # the seed shifts cancel in the pairs
    assert o["best_k"]["alpha"] == [4.0, 4.0, 4.0] and o["breakdown_k"]["eta"] == [16.0] * 3
    assert o["verdicts"]["finding_2_alpha_reaches_lower_loss"] == "reproduced"
    assert o["alpha_breaks_later"] == {"seeds": 3, "later": 3, "sign_test_p": pytest.approx(0.125)}
    assert o["verdicts"]["finding_2_alpha_tolerates_larger_k"].startswith("not resolved")
    with pytest.raises(Exception, match="seeds"):
        DynamicsConfig(seeds=(0,)).validate()  # the main seed again
