"""Sweeps of the training path: the η- and α-scaling paths (paper Eq. 2) and the α*(r) fit (Eq. 3).

From a baseline ``(α0, η_FFT)`` per rank, the η-scaling path trains ``(α0, k·η_FFT)`` and the
α-scaling path ``(k·α0, η_FFT)`` for each multiplier ``k`` (``k = 1`` is shared). Each cell is
one :func:`~signal_drift.train.train` run with the fixed-α rule (scale ``γα/r``), scored by its
final held-out NLL; cells land in a resumable JSONL through :func:`~signal_drift.sweep.run_grid`
(and each run resumes from its own checkpoint), so an interrupted sweep loses nothing finished.

α*(r) is the best α on the α-scaling path (η fixed at η_FFT), known to within its grid cell
and flagged where it sits at either end of the path; ``α* = c·r^k`` is fitted in log–log space
over the bracketed ranks, with the slope interval their cells allow
(:func:`~signal_drift.sweep.analyse`, :func:`~signal_drift.sweep.fit_power_law`). Over seeds,
α*(r) is refined per seed and ``k``, ``c`` get Student-t intervals over the per-seed fits
(:func:`~signal_drift.sweep.alpha_star_over_seeds`); ``paths="alpha"`` runs the α path alone for
that, and ``workers`` runs the cells in parallel processes.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from .._errors import DivergenceError, InputError, check_positive_float, check_positive_int
from ..edge import columns, from_json, observed_breakdown, predict_breakdown
from ..io import atomic_write_text
from ..lm import build_base_model, check_model_dir
from ..sweep import SweepAnalysis, alpha_star_over_seeds, analyse, cell_key, findings_over_seeds, run_grid
from . import TrainConfig, train
from ._dist import setup

__all__ = [
    "TrainSweepConfig",
    "path_cells",
    "ScalingPaths",
    "analyse_paths",
    "TrainSweepResult",
    "run_train_sweep",
    "over_seeds_paths",
]


@dataclass(frozen=True)
class TrainSweepConfig:
    """Settings of :func:`run_train_sweep` (the flags of ``python -m signal_drift.train sweep``).

    The settings ``model``, ``data``, ``gamma``, ``batch_size``, ``seq_len``, ``pretrain_steps``,
    ``seed``, ``workers``, ``out`` mean the same in every config
    (:data:`signal_drift.settings.COMMON_HELP`).

    Attributes:
        ranks: the LoRA ranks r.
        base_alpha: α0 of the baseline (default: α0 = r, the heuristic).
        base_lr: η_FFT, the baseline learning rate shared by both paths.
        multipliers: the k of Eq. 2.
        paths: which paths to run: ``both`` (Finding II), or ``alpha`` alone (α*(r), Finding
            III, at half the cost) or ``eta`` alone.
        alpha_path_lrs: more learning rates for the α path: every α of it is also trained at each
            of these, an (α, η) grid for Finding I over seeds (η* and the best NLL against α);
            α*(r) (Finding III) stays the one at ``base_lr``.
        steps: optimizer steps per run.
        sharpness_every: the base run of each rank (k = 1) records Adam's sharpness every N steps
            (:func:`signal_drift.edge.peft_sharpness`; 0 and ``sharpness_early`` 0: off).
        sharpness_early: ... and after each of the first N steps, from which the crossing of each
            path is predicted (:func:`signal_drift.edge.predict_breakdown`).
        sharpness_lanczos: cap on Lanczos steps per eigenvalue of those records.
        seeds: replicate every cell at these seeds (data order and A init; the pre-trained base is
            the one of ``seed``); empty: ``seed`` alone. The sharpness records are taken at the
            first seed only. With two or more, ``sweep.json`` gains ``over_seeds``.
        micro_batch, grad_checkpointing, loss_chunk: the memory settings of every run (as in
            :class:`~signal_drift.train.TrainConfig`); they do not change the results, so they
            are not part of a cell's key and a resumed sweep may change them.
    """

    model: str | None = None
    data: str | None = None
    ranks: tuple[int, ...] = (4, 8)
    base_alpha: float | None = None
    base_lr: float = 1e-4
    multipliers: tuple[float, ...] = (1, 4, 16, 64)
    paths: Literal["both", "alpha", "eta"] = "both"
    alpha_path_lrs: tuple[float, ...] = ()
    gamma: float = 1.0
    steps: int = 100
    batch_size: int = 16
    micro_batch: int | None = None
    grad_checkpointing: bool = False
    loss_chunk: int | None = None
    seq_len: int = 128
    pretrain_steps: int = 300
    sharpness_every: int = 25
    sharpness_early: int = 10
    sharpness_lanczos: int = 80
    seeds: tuple[int, ...] = ()
    seed: int = 0
    workers: int = 1
    out: str = "out/train_sweep"

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid field."""
        if not self.ranks or not self.multipliers:
            raise InputError(
                "ranks and multipliers need at least one value each", fields=["ranks", "multipliers"]
            )
        for r in self.ranks:
            check_positive_int("ranks", r)
        for k in self.multipliers:
            check_positive_float("multipliers", k)
        for lr in self.alpha_path_lrs:
            check_positive_float("alpha_path_lrs", lr)
        if self.alpha_path_lrs and self.paths == "eta":
            raise InputError(
                "alpha_path_lrs needs the α path (paths both or alpha)", fields=["alpha_path_lrs"]
            )
        if self.base_alpha is not None:
            check_positive_float("base_alpha", self.base_alpha)
        check_positive_float("base_lr", self.base_lr)
        check_positive_float("gamma", self.gamma)
        if self.paths not in ("both", "alpha", "eta"):
            raise InputError(f"paths={self.paths!r} is invalid: need both, alpha or eta", fields=["paths"])
        for name in ("steps", "batch_size", "seq_len", "sharpness_lanczos", "workers"):
            check_positive_int(name, getattr(self, name))
        for name in ("sharpness_every", "sharpness_early"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0 (0 turns it off)", fields=[name])
        if len(set(self.replicates)) != len(self.replicates) or any(s < 0 for s in self.replicates):
            raise InputError(
                f"seeds={list(self.seeds)} is invalid: need distinct seeds >= 0", fields=["seeds"]
            )
        for name in ("micro_batch", "loss_chunk"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.workers > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InputError(
                f"workers={self.workers} is invalid under torchrun: its processes already share each cell",
                fields=["workers"],
            )
        check_model_dir(self.model)

    @property
    def replicates(self) -> tuple[int, ...]:
        """The seeds every cell is run at: ``seeds``, or ``(seed,)`` when it is empty."""
        return tuple(self.seeds) or (self.seed,)

    def memory(self) -> dict:
        """The memory settings each run takes (not part of the cells: they do not change results)."""
        return {"micro_batch": self.micro_batch, "grad_checkpointing": self.grad_checkpointing,
                "loss_chunk": self.loss_chunk}  # fmt: skip

    def alpha0(self, rank: int) -> float:
        """The baseline α0 of ``rank``."""
        return float(rank) if self.base_alpha is None else float(self.base_alpha)


def path_cells(cfg: TrainSweepConfig, model_dir: str) -> list[dict]:
    """The cells of Eq. 2's paths (``cfg.paths``) for every rank, without duplicates (``k = 1`` is shared)."""
    cells, seen = [], set()
    first = cfg.replicates[0]
    for seed, r, k in ((s, r, k) for s in cfg.replicates for r in cfg.ranks for k in cfg.multipliers):
        a0 = cfg.alpha0(r)
        grid = [("eta", a0, k * cfg.base_lr), ("alpha", k * a0, cfg.base_lr)]
        grid += [("alpha", k * a0, lr) for lr in cfg.alpha_path_lrs]  # Finding I's (α, η) grid
        for path, alpha, lr in grid:
            if cfg.paths not in ("both", path):
                continue
            cell = {"model": model_dir, "data": cfg.data, "rank": r, "alpha": float(alpha),
                    "lr": float(lr), "gamma": cfg.gamma, "steps": cfg.steps,
                    "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "seed": seed}  # fmt: skip
            base = k == 1 and lr == cfg.base_lr and seed == first
            if base and (cfg.sharpness_every or cfg.sharpness_early):  # the base run
                cell |= {"sharpness_every": cfg.sharpness_every, "sharpness_early": cfg.sharpness_early,
                         "sharpness_lanczos": cfg.sharpness_lanczos}  # fmt: skip
            if cell_key(cell) not in seen:
                seen.add(cell_key(cell))
                cells.append(cell)
    return cells


def _cell_dir(cell: dict) -> str:
    """The run's directory: every setting that changes its records (a changed one must not resume it)."""
    sharp = "".join(
        f"_{k[10:]}{cell[k]}"
        for k in ("sharpness_every", "sharpness_early", "sharpness_lanczos")
        if k in cell
    )
    return f"r{cell['rank']}_alpha{cell['alpha']:g}_lr{cell['lr']:g}_seed{cell['seed']}{sharp}"


def _run_cell(cell: dict, out: Path, memory: dict | None = None) -> dict:
    """One cell's run; ``memory``: :meth:`TrainSweepConfig.memory` (default: TrainConfig's)."""
    steps = cell["steps"]
    cfg = TrainConfig(model=cell["model"], data=cell["data"], scaling="fixed", rank=cell["rank"],
                      alpha=cell["alpha"], lr=cell["lr"], gamma=cell["gamma"], steps=steps,
                      batch_size=cell["batch_size"], seq_len=cell["seq_len"], eval_every=steps,
                      checkpoint_every=max(steps // 4, 1), monitor_every=max(steps // 20, 1),
                      seed=cell["seed"], out=str(out / "cells" / _cell_dir(cell)),
                      sharpness_every=cell.get("sharpness_every", 0),
                      sharpness_early=cell.get("sharpness_early", 0),
                      sharpness_lanczos=cell.get("sharpness_lanczos", 40), **(memory or {}))  # fmt: skip
    try:
        m = train(cfg, log=lambda _: None)
    except DivergenceError as err:
        return {"heldout_nll": math.nan, "diverged_step": err.step, "sdr_median": math.nan}
    finally:
        _free()
    sdr = [s / d for rows in m["update_norms"].values() for _, s, d in rows if d > 0]
    # under torchrun only rank 0 evaluates and monitors; the other ranks' records are not written
    return {"heldout_nll": m.get("final_heldout_nll", math.nan), "diverged_step": None,
            "sdr_median": statistics.median(sdr) if sdr else math.inf,
            "heldout_nll_before": m["heldout_nll"][0][1] if m.get("heldout_nll") else math.nan,
            **({"sharpness": m["sharpness"]} if m.get("sharpness") else {})}  # fmt: skip


def _free() -> None:
    """Free the finished cell's model, optimizer and DDP wrapper before the next cell loads.

    ``gc.collect()`` breaks the reference cycles that keep them alive; the GPU cache goes back.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_cell(cell: dict, rank: int, alpha: float, lr: float) -> bool:
    return cell["rank"] == rank and math.isclose(cell["alpha"], alpha) and math.isclose(cell["lr"], lr)


@dataclass(frozen=True)
class ScalingPaths:
    """Loss and SDR along both paths of Eq. 2 per rank, and α*(r) on the α path (:func:`analyse_paths`).

    Rank keys are strings, as in ``sweep.json``.

    Attributes:
        paths: ``{r: {"eta": [[k, nll, sdr], ...], "alpha": [...]}}``, the held-out NLL and the
            median per-layer SDR of each run, by multiplier.
        best_k: ``{r: {"eta": k, "alpha": k}}``, the multiplier of the lowest finite NLL on each
            path (``None`` where every run diverged).
        alpha_path: :func:`~signal_drift.sweep.analyse` of the α-path runs: ``alpha_star``, its
            grid cell ``alpha_star_cell``, ``alpha_star_edge`` (ranks whose α* is the smallest α
            tried, k = 1, an upper bound only, or the largest, a lower bound only) and the ``fit``
            over the bracketed ranks with its ``k_grid_range``.
        edge: ``{r: {"sharpness": columns of the base run, "early": Breakdown, "all_steps":
            Breakdown}}``: where Adam's edge, measured along the base run, predicts each path to
            break down (diverged, or held-out NLL above its value before fine-tuning) beside where
            it did (:func:`~signal_drift.edge.predict_breakdown`); ranks whose base run has no
            records are left out.
        over_seeds: with two or more seeds, Finding II over seeds (:func:`over_seeds_paths`, when
            both paths ran) and, under ``finding_3``, Finding III over seeds: α*(r) per seed on the
            α path and the Eq. 3 fit with Student-t intervals
            (:func:`~signal_drift.sweep.alpha_star_over_seeds`), and with ``alpha_path_lrs`` under
            ``finding_1`` Finding I over seeds on the (α, η) grid of the α path
            (:func:`~signal_drift.sweep.findings_over_seeds`); the other fields describe the
            first seed.
    """

    paths: dict[str, dict[str, list[list[float]]]]
    best_k: dict[str, dict[str, float | None]]
    alpha_path: SweepAnalysis
    edge: dict[str, dict] = field(default_factory=dict)
    over_seeds: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The analysis as ``sweep.json`` holds it (without ``config``)."""
        out = json.loads(json.dumps({"paths": self.paths, "best_k": self.best_k})) | {
            "alpha_path": self.alpha_path.to_json(),
            "edge": json.loads(json.dumps(self.edge)),
        }
        if self.over_seeds:
            out["over_seeds"] = json.loads(json.dumps(self.over_seeds))
        return out


@dataclass(frozen=True)
class TrainSweepResult:
    """What :func:`run_train_sweep` returns.

    Attributes:
        config: the :class:`TrainSweepConfig` as a JSON-ready dict.
        analysis: the paths, the best k and α*(r) (:func:`analyse_paths`).
        records: one ``sweep.jsonl`` record per cell (``key``, ``cell``, ``heldout_nll``,
            ``diverged_step``, ``sdr_median``), in the order of :func:`path_cells`.
    """

    config: dict
    analysis: ScalingPaths
    records: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        """What ``sweep.json`` holds: ``config``, ``paths``, ``best_k`` and ``alpha_path``."""
        return json.loads(json.dumps({"config": self.config})) | self.analysis.to_json()


def analyse_paths(records: Sequence[dict], cfg: TrainSweepConfig) -> ScalingPaths:
    """Loss and SDR along both paths per rank, the best k of each, and α*(r) with its fit.

    Returns:
        A :class:`ScalingPaths`; its ``alpha_path`` is :func:`~signal_drift.sweep.analyse` of
        the α-path records, scored by ``heldout_nll``.
    """
    all_records, first = records, cfg.replicates[0]
    records = [rec for rec in records if rec["cell"].get("seed", cfg.seed) == first]
    paths, best_k, alpha_recs, edges = {}, {}, [], {}
    for r in cfg.ranks:
        a0 = cfg.alpha0(r)
        rows = {"eta": [], "alpha": []}
        for k in cfg.multipliers:
            for path, alpha, lr in (("eta", a0, k * cfg.base_lr), ("alpha", k * a0, cfg.base_lr)):
                rec = next((rec for rec in records if _is_cell(rec["cell"], r, alpha, lr)), None)
                if rec is not None:
                    rows[path].append([float(k), rec["heldout_nll"], rec.get("sdr_median", math.nan)])
                    if path == "alpha":
                        alpha_recs.append(rec)
        paths[str(r)] = rows
        best_k[str(r)] = {
            p: min((row for row in v if math.isfinite(row[1])), key=lambda row: row[1], default=[None])[0]
            for p, v in rows.items()
        }
        edge = _edge(records, cfg, r)
        if edge is not None:
            edges[str(r)] = edge
    seeds = {}
    if len(cfg.replicates) > 1:
        seeds = over_seeds_paths(all_records, cfg) if cfg.paths == "both" else {"seeds": list(cfg.replicates)}
        if cfg.paths != "eta":
            on_alpha = [rec for rec in all_records if _on_alpha_path(rec["cell"], cfg)]
            seeds["finding_3"] = alpha_star_over_seeds(on_alpha, cfg.replicates, metric="heldout_nll")
        if cfg.alpha_path_lrs:
            lrs = [cfg.base_lr, *cfg.alpha_path_lrs]
            grid = [rec for rec in all_records if _on_alpha_path(rec["cell"], cfg, lrs)]
            f1 = findings_over_seeds(grid, cfg.replicates, metric="heldout_nll")
            seeds["finding_1"] = {
                "lrs": sorted(lrs),
                "eta_star_slope": f1["eta_star_slope"],
                "best_loss_slope": f1["best_loss_slope"],
                "eta_star_bounds": f1["eta_star_bounds"],
                "cells": f1["cells"],
                "verdicts": {k: v for k, v in f1["verdicts"].items() if k.startswith("finding_1")},
            }
    return ScalingPaths(paths, best_k, analyse(alpha_recs, metric="heldout_nll"), edges, seeds)


def _on_alpha_path(cell: dict, cfg: TrainSweepConfig, lrs: Sequence[float] | None = None) -> bool:
    r = cell["rank"]
    lrs = [cfg.base_lr] if lrs is None else lrs
    return any(_is_cell(cell, r, k * cfg.alpha0(r), lr) for k in cfg.multipliers for lr in lrs)


def over_seeds_paths(records: Sequence[dict], cfg: TrainSweepConfig) -> dict:
    """Finding II over seeds: per rank, both paths' best multiplier and loss, and their paired comparison.

    Per seed and path: the held-out NLL at every multiplier, the best
    (:func:`~signal_drift.replicates.best_on_path`) and the first multiplier that broke down (NaN,
    or NLL above the base run's NLL before fine-tuning). Over seeds (the two paths share data
    order, init and base at each seed; ranks share a seed, so they are averaged within it first):
    the paired difference "best α-path NLL − best η-path NLL" (Student-t over seeds), and the
    number of seeds at which the α-path broke down later than the η-path (or not at all) at every
    rank, with its one-sided sign-test p-value.

    Returns:
        ``{"seeds", "ranks": {r: {...}}, "alpha_breaks_later", "best_alpha_minus_best_eta",
        "verdicts"}``.
    """
    from ..intervals import mean_interval
    from ..replicates import best_on_path, over_seeds, paired_difference, sign_test
    from ..sweep import _verdict

    seeds, ks = list(cfg.replicates), sorted(float(k) for k in cfg.multipliers)
    out = {}
    later = {s: [] for s in seeds}  # per seed: did the α-path break down later, at each rank where η broke?
    diffs = {s: [] for s in seeds}  # per seed: best α-path NLL − best η-path NLL, at each rank
    for r in cfg.ranks:
        a0 = cfg.alpha0(r)
        tab = {p: [[None] * len(ks) for _ in seeds] for p in ("eta", "alpha")}  # None: not run (yet)
        before = [math.nan] * len(seeds)
        for rec in records:
            c = rec["cell"]
            if c["rank"] != r or c.get("seed", cfg.seed) not in seeds:
                continue
            i = seeds.index(c.get("seed", cfg.seed))
            for j, k in enumerate(ks):
                for p, alpha, lr in (("eta", a0, k * cfg.base_lr), ("alpha", k * a0, cfg.base_lr)):
                    if _is_cell(c, r, alpha, lr):
                        tab[p][i][j] = rec["heldout_nll"]
            if "heldout_nll_before" in rec:
                before[i] = rec["heldout_nll_before"]
        complete = [i for i in range(len(seeds)) if all(v is not None for p in tab for v in tab[p][i])]
        if not complete:
            out[str(r)] = {"skipped": "no seed has every cell of both paths yet"}
            continue
        tab = {p: [t[i] for i in complete] for p, t in tab.items()}  # a seed missing a cell is left out
        before, seeds_r = [before[i] for i in complete], [seeds[i] for i in complete]
        paths = {p: best_on_path(t, ks) for p, t in tab.items()}
        broke = {
            p: [_first_broken(ks, row, b) for row, b in zip(t, before, strict=True)] for p, t in tab.items()
        }
        best_a, best_e = paths["alpha"]["best_loss_per_seed"], paths["eta"]["best_loss_per_seed"]
        try:
            d = paired_difference(best_a, best_e).to_json()
        except InputError as err:
            d = {"skipped": str(err)}
        for s_, be, ba, a, e in zip(seeds_r, broke["eta"], broke["alpha"], best_a, best_e, strict=True):
            if be is not None:  # comparable only where the η-path broke down inside the grid
                later[s_].append(ba is None or ba > be)
            if math.isfinite(a - e):
                diffs[s_].append(a - e)
        out[str(r)] = {
            "nll": {
                p: {f"{k:g}": over_seeds([row[j] for row in t]) for j, k in enumerate(ks)}
                for p, t in tab.items()
            },
            "best": paths,
            "best_alpha_minus_best_eta": d,
            "breakdown_k": broke,
            "heldout_nll_before": before,
            "seeds": seeds_r,
        }
    per_seed = [sum(v) / len(v) for v in diffs.values() if v]
    pooled = (
        mean_interval(per_seed, 0.95, f"Student-t over {len(per_seed)} seeds (mean over ranks)").to_json()
        if len(per_seed) > 1
        else None
    )
    # a seed counts when the α-path broke down later at every rank where the η-path broke down
    sign = sign_test([all(v) for v in later.values() if v], unit="seeds (at every rank)")
    return {
        "seeds": seeds,
        "ranks": out,
        "alpha_breaks_later": {"seeds": sign["n"], "later": sign["later"], "sign_test_p": sign["p"]},
        "best_alpha_minus_best_eta": pooled,
        "verdicts": {
            "finding_2_alpha_reaches_lower_loss": _verdict(pooled, 0.0, -1),
            "finding_2_alpha_tolerates_larger_k": sign["verdict"],
        },
    }


def _broke(nll: float, before: float) -> bool:
    """A run broke down: it diverged (NaN) or ended above the held-out NLL before fine-tuning."""
    return not nll <= before


def _first_broken(ks: Sequence[float], row: Sequence[float], before: float) -> float | None:
    """The first multiplier whose run broke down (:func:`_broke`), or None."""
    return observed_breakdown({k: _broke(v, before) for k, v in zip(ks, row, strict=True)})[0]


def _edge(records: Sequence[dict], cfg: TrainSweepConfig, r: int) -> dict | None:
    """Predicted vs observed breakdown of both paths at rank ``r`` from its base run's records."""
    a0 = cfg.alpha0(r)
    base = next(
        (rec for rec in records if _is_cell(rec["cell"], r, a0, cfg.base_lr) and rec.get("sharpness")), None
    )
    if base is None:
        return None
    before = base["heldout_nll_before"]

    def broke(alpha: float, lr: float) -> bool | None:
        rec = next((rec for rec in records if _is_cell(rec["cell"], r, alpha, lr)), None)
        return None if rec is None else _broke(rec["heldout_nll"], before)

    outcomes = {
        p: {k: b for k in cfg.multipliers if (b := broke(*((a0, k * cfg.base_lr) if p == "eta" else
                                                          (k * a0, cfg.base_lr)))) is not None}
        for p in ("eta", "alpha")
    }  # fmt: skip
    recs = [from_json(x) for x in base["sharpness"]]
    out = {"sharpness": columns(recs), "heldout_nll_before": before}
    early = max(base["cell"].get("sharpness_early", 0) - 1, 1)
    for name, last in (("early", early), ("all_steps", None)):
        try:
            out[name] = predict_breakdown(recs, outcomes["eta"], outcomes["alpha"], max_step=last).to_json()
        except InputError as err:
            out[name] = {"error": str(err)}
    return out


def run_train_sweep(cfg: TrainSweepConfig, progress: bool = False, log=print) -> TrainSweepResult:
    """Run (or resume) every cell; write ``sweep.jsonl``, ``sweep.json`` and ``eq2.png`` under ``cfg.out``.

    With two or more seeds on the α path also ``eq3.png`` (Finding III over seeds), and with
    ``alpha_path_lrs`` ``eq1.png`` (Finding I). Under
    ``torchrun`` every rank runs every cell data-parallel; rank 0 writes the files.
    """
    from .figure import plot_scaling_paths  # here: importing it selects Agg

    cfg.validate()
    dist = setup()
    out = Path(cfg.out)
    model_dir = cfg.model or str(out / "base_model")
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.model is None:
            build_base_model(out / "base_model", cfg.pretrain_steps, cfg.seq_len, cfg.seed, progress,
                             device=dist.device)  # fmt: skip
    dist.barrier()
    cells = path_cells(cfg, model_dir)
    quiet = not dist.main
    records = run_grid(
        cells,
        partial(_run_cell, out=out, memory=cfg.memory()),
        out / "sweep.jsonl",
        progress=progress and not quiet,
        log=None if quiet else log,
        write=not quiet,
        workers=cfg.workers,
    )
    result = TrainSweepResult(asdict(cfg), analyse_paths(records, cfg), records)
    if dist.main:
        summary = result.to_json()
        atomic_write_text(out / "sweep.json", json.dumps(summary, indent=1) + "\n")
        plot_scaling_paths(summary, out / "eq2.png")
        if "finding_3" in summary.get("over_seeds", {}):
            from .figure import plot_alpha_star_seeds

            plot_alpha_star_seeds(summary, out / "eq3.png")
        if "finding_1" in summary.get("over_seeds", {}):
            from .figure import plot_alpha_eta_grid

            plot_alpha_eta_grid(summary, records, out / "eq1.png")
        if summary["edge"]:
            from .figure import plot_base_edge

            plot_base_edge(summary, out / "edge.png")
    return result
