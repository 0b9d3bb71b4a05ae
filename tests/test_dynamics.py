import json
import math
import subprocess
import sys

import pytest
from cases import assert_cli_refuses, mlp_problem

from signal_drift import init_theta
from signal_drift.dynamics import DynamicsConfig, run_dynamics, sdr_probes, train_lora


def test_per_step_records_satisfy_the_decomposition_identities():
    problem = mlp_problem()
    run = train_lora(problem, init_theta(problem), steps=8, lr=0.05, optimizer="sgd", curvature_every=4)
    assert len(run.loss) == 9 and not run.diverged
    for s, d, r in zip(run.norm_signal, run.norm_drift, run.sdr, strict=True):
        assert s > 0 and (d == 0 and math.isinf(r) or math.isclose(r, s / d))
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
