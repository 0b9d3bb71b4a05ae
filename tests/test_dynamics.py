import json
import math
import subprocess
import sys

import pytest
from cases import assert_cli_refuses, assert_close, mlp_problem
from torch.func import grad, jvp

from signal_drift import init_theta
from signal_drift.dynamics import DynamicsConfig, run_dynamics, sdr_probes, train_lora


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


def test_one_step_sdr_probe_slopes_from_a_checkpoint():
    problem = mlp_problem()
    run = train_lora(problem, init_theta(problem), steps=6, lr=0.02, checkpoints=[5])
    out = sdr_probes(problem, run.checkpoints[5], 3.0, 0.02, [1, 2, 4, 8], optimizer="signsgd")
    assert abs(out["slope_eta"] + 1) < 1e-9
    assert abs(out["slope_alpha"]) < 0.2  # sign steps: α only changes which entries flip


def test_dynamics_runs_both_paths_and_reports_slopes():
    cfg = DynamicsConfig(
        dim=6, rank=2, samples=64, steps=12, multipliers=(1, 4, 400), lr0=0.02, curvature_every=6
    )
    s, runs = run_dynamics(cfg)
    assert set(s["eta_scaling"]) == set(s["alpha_scaling"]) == {"1", "4", "400"}
    assert s["eta_scaling"]["400"]["diverged"]  # η = 8 blows up
    assert abs(s["sdr_slope_eta"] + 1) < 1e-9
    assert s["curvature"]["eta_scaling"]["1"]["steps"] == [0, 6]


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
                                         (["--multipliers", "1", "0"], "--multipliers")])  # fmt: skip
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
    s, _ = run_dynamics(cfg)
    assert any("eta_scaling k=1000 diverged at step" in w for w in s["warnings"])
