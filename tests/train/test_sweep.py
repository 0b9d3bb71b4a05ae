"""`train sweep`: the Eq. 2 paths and the Eq. 3 fit on a tiny local Llama."""

import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from cases import assert_cli_refuses, free_port  # noqa: E402

from signal_drift import InputError  # noqa: E402
from signal_drift.lm import build_base_model  # noqa: E402
from signal_drift.sweep import cell_key  # noqa: E402
from signal_drift.train.sweep import TrainSweepConfig, analyse_paths, path_cells, run_train_sweep  # noqa: E402


def test_paths_share_only_the_baseline_cell():
    cfg = TrainSweepConfig(ranks=(2, 8), multipliers=(1, 4, 16), base_lr=1e-3)
    cells = path_cells(cfg, "m")
    assert len(cells) == 2 * (2 * 3 - 1) and len({cell_key(c) for c in cells}) == len(cells)
    r8 = {(c["alpha"], c["lr"]) for c in cells if c["rank"] == 8}
    assert r8 == {(8.0, 1e-3), (8.0, 4e-3), (8.0, 16e-3), (32.0, 1e-3), (128.0, 1e-3)}
    fixed = path_cells(TrainSweepConfig(ranks=(2,), multipliers=(1, 4), base_alpha=16.0), "m")
    assert {c["alpha"] for c in fixed} == {16.0, 64.0}


def test_memory_settings_reach_every_run_but_not_the_cell_keys(monkeypatch):
    """--micro-batch, --grad-checkpointing and --loss-chunk do not change results: same cells, passed on."""
    from signal_drift.train import sweep as train_sweep

    memory = dict(micro_batch=2, grad_checkpointing=True, loss_chunk=64)
    cfg = TrainSweepConfig(ranks=(2,), multipliers=(1, 4), **memory)
    assert path_cells(cfg, "m") == path_cells(TrainSweepConfig(ranks=(2,), multipliers=(1, 4)), "m")
    seen = []
    monkeypatch.setattr(train_sweep, "train", lambda c, log: seen.append(c) or {"update_norms": {}})
    train_sweep._run_cell(path_cells(cfg, "m")[0], Path("unused"), cfg.memory())
    assert {k: getattr(seen[0], k) for k in memory} == memory
    with pytest.raises(InputError, match="loss_chunk"):
        TrainSweepConfig(loss_chunk=0).validate()


def _records(cfg, loss):
    return [
        {"key": cell_key(c), "cell": c, "heldout_nll": loss(c), "sdr_median": 1.0}
        for c in path_cells(cfg, "m")
    ]


def test_seeds_replicate_every_cell_and_sharpness_is_taken_at_the_first_seed():
    cfg = TrainSweepConfig(ranks=(2,), multipliers=(1, 4), seeds=(3, 5))
    cells = path_cells(cfg, "m")
    assert len(cells) == 2 * 3 and sorted({c["seed"] for c in cells}) == [3, 5]
    assert [c["seed"] for c in cells if "sharpness_every" in c] == [3]
    with pytest.raises(InputError, match="seeds"):
        TrainSweepConfig(seeds=(1, 1)).validate()


def test_finding_2_over_seeds_pairs_the_paths_at_each_seed():
    """Synthetic NLL: the α-path is 0.05 lower at its best and breaks down 4× later, with a seed effect."""
    cfg = TrainSweepConfig(ranks=(2, 4), multipliers=(1, 4, 16, 64), seeds=(0, 1, 2, 3, 4, 5))
    shift = {s: 0.3 * math.sin(7 * s) for s in cfg.replicates}  # shared by both paths at a seed

    eta = {1: 2.0, 4: 1.85, 16: 1.8, 64: 3.0}  # breaks down at k = 64 (above 2.5 before fine-tuning)
    alpha = {1: 2.0, 4: 1.9, 16: 1.75, 64: 1.8}  # never breaks; best at 16, 0.05 below the η-path's best

    def nll(c):
        k_eta, k_alpha = round(c["lr"] / cfg.base_lr), round(c["alpha"] / c["rank"])
        v = eta[k_eta] if k_eta > 1 else alpha[k_alpha]
        return v + shift[c["seed"]] + 1e-3 * c["seed"] * (k_alpha > 1)

    recs = [r | {"heldout_nll_before": 2.5 + shift[r["cell"]["seed"]]} for r in _records(cfg, nll)]
    o = analyse_paths(recs, cfg).over_seeds
    assert o["seeds"] == [0, 1, 2, 3, 4, 5]
    r2 = o["ranks"]["2"]
    assert r2["breakdown_k"]["eta"] == [64.0] * 6 and r2["breakdown_k"]["alpha"] == [None] * 6
    assert r2["best"]["alpha"]["best_k_per_seed"] == [16.0] * 6
    d = o["best_alpha_minus_best_eta"]
    assert d["high"] < 0 and d["low"] < d["estimate"] < d["high"]  # the seed shift cancels in the pair
    assert o["verdicts"]["finding_2_alpha_reaches_lower_loss"] == "reproduced"
    assert o["alpha_breaks_later"] == {"seeds": 6, "later": 6, "sign_test_p": pytest.approx(1 / 64)}
    assert o["verdicts"]["finding_2_alpha_tolerates_larger_k"].startswith("reproduced")
    three = TrainSweepConfig(ranks=(2, 4), multipliers=(1, 4, 16, 64), seeds=(0, 1, 2))
    o3 = analyse_paths([r for r in recs if r["cell"]["seed"] < 3], three).over_seeds
    assert o3["verdicts"]["finding_2_alpha_tolerates_larger_k"].startswith("not resolved")  # p = 1/8


def test_alpha_star_and_its_fit_come_from_the_alpha_path():
    cfg = TrainSweepConfig(ranks=(1, 4, 16), multipliers=(1, 2, 4, 8, 16, 32, 64, 128, 256), base_alpha=1.0)
    # a loss whose minimum over α sits at 8√r, whatever η is: the fit must find k = 1/2, c = 8
    res = analyse_paths(
        _records(cfg, lambda c: math.log(c["alpha"] / (8 * c["rank"] ** 0.5)) ** 2 + c["lr"]), cfg
    )
    assert res.alpha_path.alpha_star == {"1": 8.0, "4": 16.0, "16": 32.0}
    assert math.isclose(res.alpha_path.fit["k"], 0.5) and math.isclose(res.alpha_path.fit["c"], 8.0)
    assert res.best_k["4"] == {"alpha": 16.0, "eta": 1.0}
    assert res.alpha_path.alpha_star_edge == {}
    # each α* known to within a factor √2 either side: k = 0.5 ± (log √2)·Σ|w_i| = 0.5 ± 0.25
    assert all(
        math.isclose(a, b) for a, b in zip(res.alpha_path.fit["k_grid_range"], [0.25, 0.75], strict=True)
    )


def test_an_optimum_at_the_grid_edge_is_flagged():
    cfg = TrainSweepConfig(ranks=(1, 4), multipliers=(1, 2, 4))
    res = analyse_paths(_records(cfg, lambda c: -c["alpha"]), cfg)  # loss keeps falling with α
    assert res.alpha_path.alpha_star == {"1": 4.0, "4": 16.0}
    assert res.alpha_path.alpha_star_edge == {"1": "upper", "4": "upper"}
    assert res.alpha_path.fit is None and res.alpha_path.fit_skipped is not None
    res = analyse_paths(_records(cfg, lambda c: c["alpha"]), cfg)  # loss rises with α: α* = α0
    assert res.alpha_path.alpha_star == {"1": 1.0, "4": 4.0}
    assert res.alpha_path.alpha_star_edge == {"1": "lower", "4": "lower"}


def test_diverged_cells_are_never_best():
    cfg = TrainSweepConfig(ranks=(2,), multipliers=(1, 2, 4))
    res = analyse_paths(_records(cfg, lambda c: math.nan if c["lr"] > 1e-4 else -c["alpha"]), cfg)
    assert res.best_k["2"] == {"eta": 1.0, "alpha": 4.0}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    base = build_base_model(tmp_path_factory.mktemp("base") / "model", steps=30, seq_len=32)
    cfg = TrainSweepConfig(model=str(base), ranks=(2, 4), multipliers=(1, 8), steps=6, batch_size=8, seq_len=32,
                           sharpness_every=0, sharpness_early=3, out=str(tmp_path_factory.mktemp("sweep")))  # fmt: skip
    return cfg, run_train_sweep(cfg, log=lambda _: None)


def test_sdr_falls_along_the_eta_path_and_not_along_the_alpha_path(sweep):
    """Prop. 4 on a real model: SDR ∝ 1/η and independent of α (a band around the prediction)."""
    _, result = sweep
    for paths in result.analysis.paths.values():
        (_, _, s1), (_, _, s8) = paths["eta"]
        assert s8 / s1 > 1 / 16 and s8 / s1 < 1 / 4  # ≈ 1/8
        (_, _, a1), (_, _, a8) = paths["alpha"]
        assert 0.8 < a8 / a1 < 1.25


def test_base_runs_predict_each_paths_edge(sweep):
    """Each rank's base run records Adam's sharpness; the predictions follow from its records."""
    cfg, result = sweep
    assert set(result.analysis.edge) == {"2", "4"}
    for e in result.analysis.edge.values():
        c = e["sharpness"]
        assert c["step"] == [0, 1, 2] and all(x > 0 for x in c["edge_ratio"])
        pred = e["early"]
        assert pred["records_used"] == [1, 2]  # step 0: v_A = 0 exactly (∇_A L = 0 at B = 0), P_A = ε
        assert pred["predicted_eta"] == pytest.approx(1 / max(c["edge_ratio"][1:]))
        edge = 38.0 / np.asarray(c["lr"][1:])
        rs, rd = np.asarray(c["signal_max"][1:]) / edge, np.asarray(c["drift_max"][1:]) / edge
        lo, hi = pred["predicted_alpha"]
        assert lo == pytest.approx(float(np.min(np.maximum((1 - rd) / rs, 0)))) and hi == pytest.approx(
            float(np.min((1 + rd) / rs))
        )
        assert set(pred) >= {"observed_eta", "observed_alpha", "within_2_eta", "within_2_alpha"}
        assert math.isfinite(e["heldout_nll_before"])
    assert (Path(cfg.out) / "edge.png").stat().st_size > 0
    saved = json.loads((Path(cfg.out) / "sweep.json").read_text())["edge"]["2"]["early"]
    assert saved == result.analysis.edge["2"]["early"]


def test_a_rerun_resumes_every_finished_cell(sweep):
    cfg, result = sweep
    notes = []
    again = run_train_sweep(cfg, log=notes.append)
    assert notes == [f"resuming: 6 of 6 cells already in {cfg.out}/sweep.jsonl"]
    assert again.config == result.config and again.analysis == result.analysis
    assert again.records == result.records


def test_cli_rejects_bad_input(tmp_path):
    out = tmp_path / "o"
    assert_cli_refuses(["signal_drift.train", "sweep", "--ranks", "0", "--out", str(out)], "--ranks", out)


def test_torchrun_sweep_writes_each_cell_once(tmp_path, sweep):
    args = ["--model", sweep[0].model, "--ranks", "2", "--multipliers", "1", "2", "--steps", "2",
            "--batch-size", "4", "--seq-len", "32", "--out", str(tmp_path)]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "signal_drift.train", "sweep", *args],
                       capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (tmp_path / "sweep.jsonl").read_text().splitlines()
    assert len(lines) == 3 and r.stdout.count("signal-drift train sweep: 3 runs") == 1
    assert all(math.isfinite(json.loads(line)["heldout_nll"]) for line in lines)


def test_a_cell_frees_its_model_before_the_next_loads(tmp_path, sweep, monkeypatch):
    """No reference to a finished cell's model survives (figures, cycles, a divergence's traceback)."""
    import peft

    from signal_drift.train.sweep import _run_cell

    made, real = [], peft.get_peft_model

    def get_peft_model(*args, **kwargs):
        model = real(*args, **kwargs)
        made.append(weakref.ref(model))
        return model

    monkeypatch.setattr(peft, "get_peft_model", get_peft_model)
    cfg = TrainSweepConfig(
        model=sweep[0].model,
        ranks=(2,),
        multipliers=(1,),
        steps=2,
        batch_size=4,
        seq_len=32,
        sharpness_early=0,
    )
    cell = path_cells(cfg, cfg.model)[0]
    assert math.isfinite(_run_cell(cell, tmp_path)["heldout_nll"])
    assert math.isnan(_run_cell(cell | {"lr": 1e3, "steps": 30}, tmp_path)["heldout_nll"])  # diverges
    assert len(made) == 2 and all(ref() is None for ref in made)


def test_the_alpha_path_alone_gives_finding_3_over_seeds(monkeypatch):
    """--paths alpha: only the α-path's cells; over seeds, α*(r) and the Eq. 3 fit with an interval.

    α0 = r (the default), so each rank's α grid is k·r and the k = 1 cell is the base run."""
    cfg = TrainSweepConfig(ranks=(1, 3, 8, 20), multipliers=tuple(2.0**i for i in range(9)), paths="alpha",
                           seeds=(0, 1, 2, 3))  # fmt: skip
    cells = path_cells(cfg, "m")
    assert {c["lr"] for c in cells} == {cfg.base_lr} and len(cells) == 4 * 4 * 9
    eta_only = path_cells(TrainSweepConfig(ranks=(2,), multipliers=(1, 4), paths="eta"), "m")
    assert {(c["alpha"], c["lr"]) for c in eta_only} == {(2.0, 1e-4), (2.0, 4e-4)}
    noise = {(s, r): 0.2 * math.sin(3 * s + 7 * r) for s in cfg.replicates for r in cfg.ranks}
    true = {(s, r): 16 * r**0.5 * 2 ** noise[s, r] for s, r in noise}
    recs = _records(cfg, lambda c: math.log2(c["alpha"] / true[c["seed"], c["rank"]]) ** 2)
    o = analyse_paths(recs, cfg).over_seeds
    assert "best_alpha_minus_best_eta" not in o  # Finding II needs both paths
    f3 = o["finding_3"]
    for (s, r), a in true.items():
        assert f3["alpha_star"][str(r)][s] == pytest.approx(a, rel=1e-9)
    k = f3["fit"]["k"]
    assert k["low"] < 0.5 < k["high"] and 0 < k["high"] - k["low"] < 0.5
    assert f3["verdict"].startswith(("reproduced", "not resolved"))
    assert set(f3["cells"]["3"]) == {f"{3 * k:g}" for k in cfg.multipliers}
    with pytest.raises(InputError, match="paths"):
        TrainSweepConfig(paths="beta").validate()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="workers"):
        TrainSweepConfig(workers=2).validate()


def test_alpha_path_lrs_give_finding_1_on_the_alpha_paths_grid(tmp_path):
    """--alpha-path-lrs: the α path at several η (no sharpness on the extra base cells); η* ∝ 1/α is
    found with a slope near −1 from the interior of a ×2 η grid, with scatter over seeds."""
    import numpy as np

    extra = (1.25e-4, 2.5e-4, 5e-4, 2e-3, 4e-3, 8e-3)
    cfg = TrainSweepConfig(ranks=(4,), multipliers=(1, 2, 4, 8, 16), base_alpha=8.0, base_lr=1e-3,
                           alpha_path_lrs=extra, paths="alpha", seeds=(0, 1, 2, 3, 4))  # fmt: skip
    cells = path_cells(cfg, "m")
    assert len(cells) == 5 * 5 * 7
    assert [c["lr"] for c in cells if "sharpness_every" in c] == [1e-3]  # the base run only
    u = np.random.default_rng(3).normal(0, 0.35, (5, 5))  # log2 scatter of η* per (seed, α)

    def nll(c):  # η* = 4e-3·8/α (inside the grid); the best loss at each α rises slowly with α
        a = round(math.log2(c["alpha"] / 8))
        log_eta_star = math.log2(4e-3 * 8 / c["alpha"]) + u[c["seed"], a]
        return 2.0 + 0.01 * math.log2(c["alpha"]) + 0.05 * (math.log2(c["lr"]) - log_eta_star) ** 2

    f1 = analyse_paths(_records(cfg, nll), cfg).over_seeds["finding_1"]
    assert f1["lrs"] == sorted([1e-3, *extra])
    e = f1["eta_star_slope"]["interval"]
    assert -1.3 < e["estimate"] < -0.7 and e["low"] < -1 < e["high"] and e["high"] - e["low"] > 0.02
    assert f1["verdicts"]["finding_1_eta_star_falls"] == "reproduced"
    assert f1["verdicts"]["finding_1_loss_improves_with_alpha"] == "not reproduced (the opposite holds)"
    res = analyse_paths(_records(cfg, nll), cfg)
    assert all(row[0] in cfg.multipliers for row in res.paths["4"]["alpha"])  # Eq. 2's path stays at base_lr
    assert len(res.paths["4"]["alpha"]) == 5
    with pytest.raises(InputError, match="alpha_path_lrs"):
        TrainSweepConfig(alpha_path_lrs=(1e-3,), paths="eta").validate()
    from dataclasses import asdict

    from signal_drift.train.figure import plot_alpha_eta_grid, plot_alpha_star_seeds

    summary = {"config": asdict(cfg)} | res.to_json()
    assert plot_alpha_eta_grid(summary, _records(cfg, nll), tmp_path / "eq1.png").stat().st_size > 10_000
    assert plot_alpha_star_seeds(summary, tmp_path / "eq3.png").stat().st_size > 10_000
