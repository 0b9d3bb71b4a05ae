"""Resumable sweeps: finished cells survive SIGINT and SIGKILL and are not recomputed."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
from cases import assert_cli_refuses

from signal_drift.io import read_jsonl
from signal_drift.sweep import analyse, fit_power_law, run_grid

ARGS = ["--dim", "4", "--depth", "2", "--samples", "16", "--test-samples", "16", "--steps", "250",
        "--ranks", "1", "2", "--alphas", "1", "4", "--lrs", "1e-3", "1e-2", "--no-plot"]  # fmt: skip
N_CELLS = 8


def test_run_grid_skips_finished_cells_and_tolerates_a_torn_line(tmp_path):
    path = tmp_path / "g.jsonl"
    calls = []

    def fn(c):
        calls.append(c["x"])
        return {"y": c["x"] ** 2}

    run_grid([{"x": 1}, {"x": 2}], fn, path)
    with open(path, "a") as fh:
        fh.write('{"key": "torn')  # a write killed half-way
    recs = run_grid([{"x": 1}, {"x": 2}, {"x": 3}], fn, path)
    assert calls == [1, 2, 3]
    assert [r["y"] for r in recs] == [1, 4, 9]


def test_power_law_fit_recovers_exponent_and_covers_it():
    r = [1, 2, 4, 8, 16]
    noise = [1.05, 0.97, 1.02, 0.96, 1.01]
    f = fit_power_law(r, [256 * x**0.5 * e for x, e in zip(r, noise, strict=True)])
    assert f["k_ci95_gaussian"][0] < 0.5 < f["k_ci95_gaussian"][1]
    assert abs(f["k"] - 0.5) < 0.05 and abs(math.log(f["c"] / 256)) < 0.1


def test_analyse_finds_argmins():
    recs = [{"cell": {"rank": r, "alpha": a, "lr": lr}, "test_loss": (a - 4 * r) ** 2 + lr + 1}
            for r in (1, 2, 4) for a in (1, 4, 8, 16) for lr in (0.1, 0.2)]  # fmt: skip
    out = analyse(recs)
    assert out.alpha_star == {"1": 4.0, "2": 8.0, "4": 16.0}
    assert out.eta_star["1"]["4"] == 0.1
    # α*(r=4) = 16 is the largest α tried: a lower bound, flagged and left out of the fit
    assert out.alpha_star_edge == {"4": "upper"}
    assert out.alpha_star_cell["1"] == [2.0, math.sqrt(32)] and out.alpha_star_cell["4"][1] is None
    assert out.fit["ranks"] == ["1", "2"] and out.fit["excluded_at_edge"] == ["4"]
    assert abs(out.fit["k"] - 1) < 1e-12


def _quantised(true_alpha, ranks, alphas):
    """Records whose best α over the grid is the grid point nearest (in log) to ``true_alpha(r)``."""
    return [{"cell": {"rank": r, "alpha": a, "lr": 0.1}, "test_loss": math.log(a / true_alpha(r)) ** 2}
            for r in ranks for a in alphas]  # fmt: skip


def test_alpha_star_at_either_edge_is_a_bound_and_is_not_fitted():
    alphas = [1.0, 2.0, 4.0, 8.0, 16.0]
    out = analyse(_quantised(lambda r: {1: 0.3, 2: 4.0, 4: 8.0, 8: 100.0}[r], [1, 2, 4, 8], alphas))
    # the MLP sweep's α*(r=4) = 1 at the lower edge used to pass for an optimum
    assert out.alpha_star == {"1": 1.0, "2": 4.0, "4": 8.0, "8": 16.0}
    assert out.alpha_star_edge == {"1": "lower", "8": "upper"}
    assert out.alpha_star_cell["1"] == [None, math.sqrt(2)]
    assert out.fit["ranks"] == ["2", "4"] and out.fit["excluded_at_edge"] == ["1", "8"]
    one = analyse(_quantised(lambda r: 0.1, [1, 2, 4], alphas))
    assert one.fit is None and "3 rank" not in one.fit_skipped and "0 rank" in one.fit_skipped


def test_the_grid_slope_range_is_what_the_cells_allow_and_covers_the_true_exponent():
    import itertools

    import numpy as np

    ranks, alphas = [1, 2, 4, 8, 16], [2.0**i for i in range(-2, 12)]
    for k_true in (0.5, 0.3, 1.2):
        out = analyse(_quantised(lambda r, k=k_true: 7.0 * r**k, ranks, alphas))
        assert not out.alpha_star_edge
        f = out.fit
        lo, hi = f["k_grid_range"]
        assert lo <= k_true <= hi, (k_true, lo, hi)
        assert f["c_grid_range"][0] <= 7.0 <= f["c_grid_range"][1]
        # the range is k̂ ± h·Σ|w_i| (h = half a cell in log α), reached at a corner of the cells
        lx = np.log(ranks)
        w = (lx - lx.mean()) / ((lx - lx.mean()) ** 2).sum()
        h = math.log(2) / 2
        assert math.isclose(hi - f["k"], h * np.abs(w).sum(), abs_tol=1e-12) and math.isclose(
            f["k"] - lo, h * np.abs(w).sum()
        )
        corners = [
            np.polyfit(lx, np.log([out.alpha_star[str(r)] for r in ranks]) + h * np.array(s), 1)[0]
            for s in itertools.product((-1, 1), repeat=len(ranks))
        ]
        assert math.isclose(min(corners), lo, abs_tol=1e-12) and math.isclose(max(corners), hi, abs_tol=1e-12)


def _lines(path):
    return list(read_jsonl(path)) if path.exists() else []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_sweep_killed_mid_way_keeps_finished_cells_and_resumes(tmp_path, sig):
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "signal_drift.sweep", *ARGS, "--out", str(out)]
    # a shell's background job inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored:
    # give the child the default disposition, as an interactive Ctrl-C would find it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while len(_lines(out / "sweep.jsonl")) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "finished results were kept" in err
    finished = _lines(out / "sweep.jsonl")
    assert 2 <= len(finished) < N_CELLS
    assert not (out / "sweep.json").exists()  # no complete-looking summary from a killed run
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert f"resuming: {len(finished)} of {N_CELLS} cells" in r.stdout
    recs = _lines(out / "sweep.jsonl")
    assert len(recs) == N_CELLS and len({x["key"] for x in recs}) == N_CELLS
    assert recs[: len(finished)] == finished  # finished cells were not recomputed
    assert json.loads((out / "sweep.json").read_text())["alpha_star"]


def test_sweep_rejects_rank_above_dim(tmp_path):
    out = tmp_path / "o"
    assert_cli_refuses(
        ["signal_drift.sweep", "--dim", "4", "--ranks", "8", "--out", str(out)], "--ranks=8", out
    )


def _synthetic_records(seeds, ranks, alphas, lrs, k=0.5, c=4.0, noise=0.05, seed=0):
    """Loss = (log₂ α − log₂ α*_s(r))² + (log₁₀ η − log₁₀ η*(α))² + noise, with α*_s(r) = c r^k e^{u_s}."""
    import numpy as np

    rng = np.random.default_rng(seed)
    recs = []
    for s in seeds:
        u = rng.normal(0, 0.1)
        for r in ranks:
            a_star = c * r**k * math.exp(u)
            for a in alphas:
                for lr in lrs:
                    eta_star = 1e-2 / a  # η* falls as α grows (Finding I a)
                    loss = (math.log2(a) - math.log2(a_star)) ** 2 + (
                        math.log10(lr) - math.log10(eta_star)
                    ) ** 2
                    loss += 1.0 + noise * rng.normal()
                    recs.append({"cell": {"seed": s, "rank": r, "alpha": a, "lr": lr}, "test_loss": loss})
    return recs


def test_findings_over_seeds_recover_a_known_exponent():
    from signal_drift.sweep import findings_over_seeds

    ranks, alphas = [1, 2, 4, 8, 16], [2.0**i for i in range(0, 9)]
    lrs = [1e-2 / a for a in alphas]  # η*(α) on the grid: the best loss over η is exactly the α parabola
    o = findings_over_seeds(_synthetic_records([0, 1, 2], ranks, alphas, lrs), [0, 1, 2])
    k = o["fit"]["k"]
    assert k["low"] <= 0.5 <= k["high"] and k["high"] - k["low"] < 0.3
    assert o["verdicts"]["finding_3_k_is_half"].startswith("reproduced")
    assert o["verdicts"]["finding_1_eta_star_falls"] == "reproduced"
    assert o["eta_star_slope"]["interval"]["high"] < 0
    assert o["cells"]["4"]["8"]["n"] == 3
    wrong = findings_over_seeds(_synthetic_records([0, 1, 2], ranks, alphas, lrs, k=1.0), [0, 1, 2])
    assert wrong["verdicts"]["finding_3_k_is_half"].startswith("not reproduced")


def test_sweep_cli_with_seeds_resumes_the_first_seed(tmp_path):
    args = ["--dim", "4", "--depth", "2", "--samples", "16", "--test-samples", "16", "--steps", "3",
            "--ranks", "1", "2", "--alphas", "1", "2", "4", "--lrs", "0.01", "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "signal_drift.sweep", *args, "--no-plot"], check=True, capture_output=True
    )
    one = json.loads((tmp_path / "sweep.json").read_text())
    r = subprocess.run([sys.executable, "-m", "signal_drift.sweep", *args, "--seeds", "0", "1", "--no-plot"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    assert "resuming: 6 of 12 cells" in r.stdout
    two = json.loads((tmp_path / "sweep.json").read_text())
    assert two["alpha_star"] == one["alpha_star"] and two["over_seeds"]["seeds"] == [0, 1]
    assert set(two["over_seeds"]["verdicts"]) == {
        "finding_1_eta_star_falls",
        "finding_1_loss_improves_with_alpha",
        "finding_3_k_is_half",
    }
    assert_cli_refuses(["signal_drift.sweep", *args[:-2], "--seeds", "1", "1", "--out", str(tmp_path / "x")],
                       "--seeds", tmp_path / "x")  # fmt: skip


def _mlp_cells():
    base = {"dim": 4, "depth": 2, "samples": 16, "test_samples": 16, "steps": 20, "seed": 0}
    return [
        base | {"rank": r, "alpha": a, "lr": lr} for r in (1, 2) for a in (1.0, 4.0) for lr in (1e-3, 1e-2)
    ]


def test_run_grid_in_workers_equals_a_serial_run(tmp_path):
    from signal_drift.sweep import mlp_cell

    serial = run_grid(_mlp_cells(), mlp_cell, tmp_path / "serial.jsonl")
    par = run_grid(_mlp_cells(), mlp_cell, tmp_path / "par.jsonl", workers=2)
    assert [r["key"] for r in par] == [r["key"] for r in serial]  # in the order of the cells
    for a, b in zip(par, serial, strict=True):
        assert math.isclose(a["test_loss"], b["test_loss"], rel_tol=1e-9)
        assert math.isclose(a["final_loss"], b["final_loss"], rel_tol=1e-9)
    written = _lines(tmp_path / "par.jsonl")  # every cell once, in the order they finished
    assert sorted(r["key"] for r in written) == sorted(r["key"] for r in serial)
    again = run_grid(_mlp_cells(), mlp_cell, tmp_path / "par.jsonl", workers=2)  # resumes: nothing to run
    assert again == par and len(_lines(tmp_path / "par.jsonl")) == len(written)


def test_run_grid_in_workers_raises_a_cells_error_and_stops_the_workers(tmp_path):
    import multiprocessing

    with pytest.raises(TypeError):  # json.loads(dict): the worker's error reaches the caller
        run_grid([{"x": 1}, {"x": 2}, {"x": 3}], json.loads, tmp_path / "g.jsonl", workers=2)
    assert multiprocessing.active_children() == []
    assert _lines(tmp_path / "g.jsonl") == []


def _alpha_path_records(ranks, ks, seeds, loss):
    return [{"cell": {"seed": s, "rank": r, "alpha": k * r, "lr": 1e-4}, "nll": loss(s, r, k * r)}
            for s in seeds for r in ranks for k in ks]  # fmt: skip


def test_alpha_star_over_seeds_uses_each_ranks_own_grid():
    """Grids α = k·r on different lattices (r = 3, 20 are not powers of 2): α* is refined on the
    rank's own grid (with the union grid its neighbours would be cells never run), and the per-seed
    fits give an interval of k that covers the truth without being degenerate."""
    import numpy as np

    from signal_drift.replicates import refine_argmin
    from signal_drift.sweep import alpha_star_over_seeds

    ranks, ks, seeds = [1, 3, 8, 20], [2.0**i for i in range(9)], list(range(6))
    noise = dict(np.ndenumerate(np.random.default_rng(1).normal(0, 0.15, (len(seeds), len(ranks)))))
    true = {(s, r): 16 * r**0.5 * 2 ** noise[s, j] for s in seeds for j, r in enumerate(ranks)}

    def loss(s, r, a):
        return (math.log2(a) - math.log2(true[s, r])) ** 2

    recs = _alpha_path_records(ranks, ks, seeds, loss)
    recs[0]["nll"] = math.nan  # a diverged run (seed 0, r = 1, α = 1, the grid's end) is not a missing one
    o = alpha_star_over_seeds(recs, seeds, metric="nll")
    for r in ranks:
        grid = [k * r for k in ks]
        for s in seeds:
            want = refine_argmin(grid, [loss(s, r, a) for a in grid])
            assert math.isclose(o["alpha_star"][str(r)][s], want)
            assert math.isclose(want, true[s, r], rel_tol=1e-9)  # a parabola in log α: exact
    k = o["fit"]["k"]
    assert k["low"] <= 0.5 <= k["high"] and 0.02 < k["high"] - k["low"] < 0.4
    assert o["verdict"].startswith("reproduced") and o["fit"]["ranks_left_out"] == []
    assert set(o["cells"]["3"]) == {f"{3 * k:g}" for k in ks}  # only the α the rank ran
    g = o["alpha_star_geometric_mean"]["8"]
    assert g["low"] < g["estimate"] < g["high"]


def test_alpha_star_is_a_bound_at_a_grid_end_or_next_to_a_diverged_run():
    """The optimum is unknown on one side there: NaN, and the rank leaves the fit for every seed."""
    from signal_drift.sweep import alpha_star_over_seeds

    ranks, ks, seeds = [1, 2, 4, 8], [2.0**i for i in range(9)], [0, 1, 2]

    def wobble(s, r):
        return 1 + 0.1 * math.sin(5 * s + r)

    # the loss falls with α until training diverges above 8r: the last stable α is no optimum
    edge = _alpha_path_records(
        ranks, ks, seeds, lambda s, r, a: -a if a <= 8 * r * wobble(s, r) else math.nan
    )
    o = alpha_star_over_seeds(edge, seeds, "nll")
    assert all(math.isnan(v) for per in o["alpha_star"].values() for v in per)
    assert "k" not in o["fit"] and o["verdict"].startswith("not resolved at this budget")

    # one seed's optimum at r = 2 beyond the grid: r = 2 leaves the fit (kept for some seeds it would
    # select them by their α*), the others stay; with 3 ranks left a verdict is still possible
    def loss(s, r, a):
        target = 4096.0 if (s, r) == (1, 2) else 8 * r**0.5 * wobble(s, r)
        return (math.log2(a) - math.log2(target)) ** 2

    o = alpha_star_over_seeds(_alpha_path_records(ranks, ks, seeds, loss), seeds, "nll")
    assert math.isnan(o["alpha_star"]["2"][1]) and math.isfinite(o["alpha_star"]["2"][0])
    assert o["fit"]["ranks"] == ["1", "4", "8"] and o["fit"]["ranks_left_out"] == ["2"]
    assert o["alpha_star_geometric_mean"]["2"] is None
    two = alpha_star_over_seeds([r for r in _alpha_path_records(ranks, ks, seeds, loss) if r["cell"]["rank"] < 8],
                                seeds, "nll")  # fmt: skip
    assert two["verdict"].startswith("not resolved at this budget (an α* at every seed for r = 1, 4 only")
    # every seed on the same grid points: no spread, no interval to speak of
    flat = alpha_star_over_seeds(_alpha_path_records(ranks, ks, seeds, lambda s, r, a: abs(math.log2(a / (4 * r)))),
                                 seeds, "nll")  # fmt: skip
    assert flat["verdict"].startswith("not resolved at this budget (no spread over seeds")
    few = alpha_star_over_seeds([r for r in edge if r["cell"]["seed"] == 0], [0], "nll")
    assert few["verdict"].startswith("not resolved at this budget")


def test_a_seed_missing_a_cell_has_no_alpha_star_and_is_not_counted_as_diverged():
    from signal_drift.sweep import alpha_star_over_seeds, findings_over_seeds

    ranks, alphas, lrs = (
        [1, 2, 4, 8, 16],
        [2.0**i for i in range(0, 9)],
        [1e-2 / a for a in [2.0**i for i in range(9)]],
    )
    recs = _synthetic_records([0, 1, 2], ranks, alphas, lrs)
    full = alpha_star_over_seeds(recs, [0, 1, 2])
    key = (1, 4, 8.0, lrs[3])  # seed 1 never ran η = η*(α) at r = 4, α = 8 = α*(4)
    gone = [r for r in recs if tuple(r["cell"][f] for f in ("seed", "rank", "alpha", "lr")) != key]
    assert len(gone) == len(recs) - 1
    part = alpha_star_over_seeds(gone, [0, 1, 2])
    assert math.isnan(part["alpha_star"]["4"][1]) and part["alpha_star"]["4"][0] == full["alpha_star"]["4"][0]
    assert part["cells"]["4"]["8"]["n"] == 2 and part["cells"]["4"]["8"]["n_failed"] == 0
    assert findings_over_seeds(gone, [0, 1, 2])["cells"]["4"]["8"]["n"] == 2


def test_run_grid_in_workers_raises_when_a_worker_dies(tmp_path):
    """A killed worker (out of memory, a crash) ends the sweep with an error instead of a hang."""
    import textwrap

    script = tmp_path / "die.py"
    script.write_text(
        textwrap.dedent("""
        import os, sys
        from signal_drift.sweep import run_grid

        def die(cell):
            os._exit(3)

        if __name__ == "__main__":
            try:
                run_grid([{"x": 1}, {"x": 2}], die, sys.argv[1], workers=2)
            except Exception as err:
                print(type(err).__name__)
    """)
    )
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "g.jsonl")], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert "BrokenProcessPool" in r.stdout, r.stderr[-2000:]


def test_a_divergence_error_survives_pickling():
    import pickle

    from signal_drift import DivergenceError

    err = pickle.loads(pickle.dumps(DivergenceError("loss is NaN at step 7", 7)))
    assert err.step == 7 and str(err) == "loss is NaN at step 7"


def test_a_bent_power_law_is_reported_as_such():
    """α* ∝ r^0.8 up to r = 8 and ∝ r^0.2 above: the overall k may look like ½, the halves tell."""
    import numpy as np

    from signal_drift.sweep import alpha_star_over_seeds

    ranks, ks, seeds = [1, 2, 4, 8, 16, 32, 64], [2.0**i for i in range(12)], list(range(5))
    noise = np.random.default_rng(0).normal(0, 0.1, (len(seeds), len(ranks)))  # independent per (seed, rank)

    def records(k_lo, k_hi):
        def loss(s, r, a):
            j = ranks.index(r)
            log_star = k_lo * math.log2(min(r, 8)) + k_hi * math.log2(max(r, 8) / 8) + noise[s, j]
            return (math.log2(a) - log_star - 4) ** 2

        return _alpha_path_records(ranks, ks, seeds, loss)

    bent = alpha_star_over_seeds(records(0.8, 0.2), seeds, "nll")
    assert set(bent["fit"]["halves"]) == {"1-8", "8-64"}
    assert bent["fit"]["halves"]["1-8"]["low"] > 0.6 and bent["fit"]["halves"]["8-64"]["high"] < 0.4
    assert bent["verdict"].startswith("not reproduced as one power law: the log–log slope goes from 0.8")
    assert bent["fit"]["halves_difference"]["low"] > 0.4  # 0.8 − 0.2, paired over the seeds
    straight = alpha_star_over_seeds(records(0.5, 0.5), seeds, "nll")
    assert straight["verdict"].startswith("reproduced") and "power law" not in straight["verdict"]
    d = straight["fit"]["halves_difference"]
    assert d["low"] < 0 < d["high"]


def test_the_interval_of_k_covers_the_truth_when_some_seeds_fall_off_the_grid():
    """95 % coverage of the Eq. 3 exponent over repeated studies, five seeds each, with α* scattered
    per (seed, rank) and a grid whose top cuts the largest rank at some seeds (that rank leaves the
    fit: kept for the seeds inside, the seeds with the smaller α* would pull k down)."""
    import numpy as np

    from signal_drift.sweep import alpha_star_over_seeds

    ranks, seeds, k_true = [1, 2, 4, 8, 16, 32, 64], list(range(5)), 0.5
    alphas = [2.0**i for i in range(9)]  # 1 … 256, the same grid for every rank; α*(64) = 2^7 on average
    rng = np.random.default_rng(0)
    hits, left_out = 0, 0
    reps = 200
    for _ in range(reps):
        u = rng.normal(0, 0.4, (len(seeds), len(ranks)))  # log2 scatter of α* per (seed, rank)
        log_star = {(s, r): 4 + k_true * math.log2(r) + u[s, j] for s in seeds for j, r in enumerate(ranks)}
        recs = [{"cell": {"seed": s, "rank": r, "alpha": a, "lr": 1e-3}, "nll": (math.log2(a) - log_star[s, r]) ** 2}
                for s in seeds for r in ranks for a in alphas]  # fmt: skip
        o = alpha_star_over_seeds(recs, seeds, "nll")
        k = o["fit"]["k"]
        hits += k["low"] <= k_true <= k["high"]
        left_out += "64" in o["fit"]["ranks_left_out"]
    assert left_out > 0.2 * reps  # the top of the grid does cut r = 64 at some seed in many studies
    assert hits >= 0.9 * reps, hits  # nominal 95 %; 200 reps: 0.90 is > 3 standard errors below


def test_finding_1_leaves_out_cells_whose_best_eta_is_at_an_end_of_the_eta_grid():
    from signal_drift.sweep import findings_over_seeds

    alphas, lrs = [2.0**i for i in range(9)], [1e-4, 1e-3, 1e-2]  # η*(α) = 1e-2/α runs off both ends
    o = findings_over_seeds(_synthetic_records([0, 1, 2], [1, 2], alphas, lrs, noise=0.0), [0, 1, 2])
    # per (seed, rank) the nearest grid η is 1e-2 for α ≤ 2 and 1e-4 for α ≥ 32: 6 of 9 cells are bounds
    assert o["eta_star_bounds"] == {"cells": 6 * 3 * 2, "of": 9 * 3 * 2}
    # the three inner cells (α = 4, 8, 16: η* = 1e-3 at each) give a flat η*, not the edges' steep one
    assert o["eta_star_slope"]["per_seed"] == pytest.approx([0.0] * 3, abs=1e-12)


def test_finding_1_without_spread_over_seeds_is_not_resolved():
    """Identical seeds put η* on the same grid points: a zero-width interval is no measurement."""
    from signal_drift.sweep import findings_over_seeds

    alphas, lrs = [2.0**i for i in range(9)], [1e-2 / 2.0**i for i in range(-1, 10)]
    recs = [r for r in _synthetic_records([0], [1, 2], alphas, lrs, noise=0.0)]
    same = [{"cell": r["cell"] | {"seed": s}, "test_loss": r["test_loss"]} for s in (0, 1, 2) for r in recs]
    o = findings_over_seeds(same, [0, 1, 2])
    assert o["eta_star_slope"]["interval"]["high"] - o["eta_star_slope"]["interval"]["low"] == 0
    assert o["verdicts"]["finding_1_eta_star_falls"].startswith("not resolved at this budget (no spread")


def test_a_grid_coarser_than_x2_around_the_optimum_cannot_decide_k():
    """A parabola through points ×4 apart is biased by an asymmetric loss, which no band over seeds
    shows: the issue's design asks for ×2 around each optimum, and the verdict holds to it."""
    from signal_drift.sweep import alpha_star_over_seeds

    ranks, seeds = [1, 4, 16], [0, 1, 2]

    def loss(s, r, a):
        return (math.log2(a) - math.log2(16 * r**0.5) - 0.2 * math.sin(3 * s + r)) ** 2

    coarse = alpha_star_over_seeds(
        _alpha_path_records(ranks, [4.0**i for i in range(6)], seeds, loss), seeds, "nll"
    )
    assert coarse["verdict"].startswith("not resolved at this budget (the α grid is coarser than ×2")
    fine = alpha_star_over_seeds(
        _alpha_path_records(ranks, [2.0**i for i in range(11)], seeds, loss), seeds, "nll"
    )
    assert fine["verdict"].startswith("reproduced")
