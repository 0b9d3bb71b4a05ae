import json
import subprocess
import sys

from signal_drift import verify

NAMES = [
    "prop1_update", "prop1_hessian", "prop2_signal_gd", "prop2_signal_adam", "prop2_signal_muon",
    "prop2_signal_psd", "prop2_drift_pairs", "prop2_counterexample", "prop3_trace_rule",
    "prop4_signal_slope", "prop4_drift_slope", "prop4_update_scaling", "lemma1_stability",
]  # fmt: skip


def test_verify_cli_passes_at_dim_8_and_prints_every_check_as_json():
    out = subprocess.run(
        [sys.executable, "-m", "signal_drift.verify", "--dim", "8", "--rank", "2", "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == NAMES
    assert all(r["passed"] and r["error"] <= r["tolerance"] for r in rows)


def test_verify_exits_1_when_a_check_fails(monkeypatch, capsys):
    bad = verify.CheckResult("prop1_update", 1.0, 1e-12, False)
    monkeypatch.setitem(verify.CHECKS, "prop1_update", lambda s: bad)
    assert verify.main(["--dim", "4", "--rank", "1"]) == 1
    assert "1 failed" in capsys.readouterr().out


def test_verify_rejects_rank_above_dim():
    out = subprocess.run(
        [sys.executable, "-m", "signal_drift.verify", "--dim", "4", "--rank", "5"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--rank=5" in out.stderr and "1..4" in out.stderr and "Traceback" not in out.stderr
