"""Resumable hyper-parameter sweeps and the paper's Findings I and III at MLP scale.

- :func:`run_grid`: generic and crash-safe. Each finished cell is appended to a JSONL file
  (flushed and fsynced); a rerun skips the cells already there, so a sweep killed by Ctrl-C or
  SIGKILL loses at most the cell in flight. The training path reuses it.
- :func:`mlp_cell`: one (r, α, η) cell on the controlled MLP task, scored by held-out loss.
- :func:`analyse`: η*(α) per rank (Finding I), α*(r) and the fit ``α* = c·r^k`` by linear
  regression in log–log space with a 95 % confidence interval (Finding III, paper Eq. 3).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._errors import InputError, check_positive_float, check_positive_int
from ..io import append_jsonl, read_jsonl

__all__ = ["run_grid", "cell_key", "MLPSweepConfig", "mlp_cell", "analyse", "fit_power_law"]


def cell_key(cell: dict) -> str:
    """Canonical key of a cell (sorted JSON)."""
    return json.dumps(cell, sort_keys=True)


def run_grid(
    cells: Sequence[dict],
    fn: Callable[[dict], dict],
    path: str | Path,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    write: bool = True,
) -> list[dict]:
    """Run ``fn`` on every cell not yet recorded in ``path``; return all records of ``cells``.

    Args:
        cells: JSON-serialisable dicts, one per grid point.
        fn: ``fn(cell) -> result dict``; the record is ``{"key", "cell", **result}``.
        path: JSONL file (created if missing; appended to).
        progress: show a tqdm bar.
        log: called with a one-line note about skipped cells.
        write: append finished cells to ``path``; False on the non-writing ranks of a ``torchrun``
            job, which run every cell in step with rank 0 but leave the file to it.
    """
    done = {rec["key"]: rec for rec in read_jsonl(path)}
    todo = [c for c in cells if cell_key(c) not in done]
    if log is not None and len(todo) < len(cells):
        log(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already in {path}")
    for cell in tqdm(todo, desc="sweep", disable=not progress):
        rec = {"key": cell_key(cell), "cell": cell, **fn(cell)}
        if write:
            append_jsonl(path, rec)
        done[rec["key"]] = rec
    return [done[cell_key(c)] for c in cells]


@dataclass(frozen=True)
class MLPSweepConfig:
    """The (r, α, η) grid on the controlled MLP."""

    dim: int = 32
    depth: int = 5
    samples: int = 512
    test_samples: int = 512
    steps: int = 100
    ranks: tuple[int, ...] = (1, 2, 4, 8)
    alphas: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid field."""
        check_positive_int("--dim", self.dim)
        check_positive_int("--depth", self.depth)
        check_positive_int("--samples", self.samples)
        check_positive_int("--test-samples", self.test_samples)
        check_positive_int("--steps", self.steps)
        for r in self.ranks:
            check_positive_int("--ranks", r, self.dim)
        for a in self.alphas:
            check_positive_float("--alphas", a)
        for lr in self.lrs:
            check_positive_float("--lrs", lr)

    def cells(self) -> list[dict]:
        """Every grid point as a dict (with the settings that define it)."""
        base = {
            "dim": self.dim,
            "depth": self.depth,
            "samples": self.samples,
            "steps": self.steps,
            "seed": self.seed,
        }
        return [
            base | {"rank": r, "alpha": float(a), "lr": float(lr)}
            for r in self.ranks
            for a in self.alphas
            for lr in self.lrs
        ]


def mlp_cell(cell: dict) -> dict:
    """Train one cell with Adam; report train and held-out loss (NaN when diverged)."""
    from ..dynamics import train_lora
    from ..lora import attach_lora, init_theta
    from ..model import make_mlp, make_task

    torch.set_default_dtype(torch.float64)
    n_train = cell["samples"]
    task = make_task(cell["dim"], n_train + cell.get("test_samples", n_train), seed=cell["seed"])
    model = make_mlp(cell["dim"], cell["depth"], seed=cell["seed"])
    problem = attach_lora(model, task.X[:n_train], task.y[:n_train], rank=cell["rank"], alpha=cell["alpha"])
    theta0 = init_theta(problem, cell["seed"])
    run = train_lora(problem, theta0, steps=cell["steps"], lr=cell["lr"])
    if run.diverged:
        return run.summary() | {"test_loss": float("nan")}
    test = problem.with_data(task.X[n_train:], task.y[n_train:]).loss_theta(run.theta)
    return run.summary() | {"test_loss": float(test)}


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> dict:
    """Fit ``y = c·x^k`` by least squares in log–log space, with 95 % confidence intervals.

    >>> f = fit_power_law([1, 4, 16], [3, 6, 12])
    >>> round(f["k"], 6), round(f["c"], 6)
    (0.5, 3.0)
    """
    from scipy import stats

    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(lx) < 2:
        raise InputError("a power-law fit needs at least 2 points")
    res = stats.linregress(lx, ly)
    n = len(lx)
    tq = stats.t.ppf(0.975, n - 2) if n > 2 else float("inf")
    k_ci = [float(res.slope - tq * res.stderr), float(res.slope + tq * res.stderr)] if n > 2 else [None, None]
    c_ci = (
        [
            math.exp(res.intercept - tq * res.intercept_stderr),
            math.exp(res.intercept + tq * res.intercept_stderr),
        ]
        if n > 2
        else [None, None]
    )
    return {
        "k": float(res.slope),
        "c": float(math.exp(res.intercept)),
        "k_ci95": k_ci,
        "c_ci95": c_ci,
        "r2": float(res.rvalue**2),
        "n": n,
    }


def analyse(records: Sequence[dict], metric: str = "test_loss") -> dict:
    """Findings I and III from sweep records.

    Returns:
        ``{"eta_star": {r: {α: η*}}, "best_loss": {r: {α: loss}}, "alpha_star": {r: α*},
        "fit": power-law fit of α*(r)}`` (keys as strings for JSON).
    """
    by: dict[int, dict[float, list[tuple[float, float]]]] = {}
    for rec in records:
        c = rec["cell"]
        val = rec.get(metric, float("nan"))
        by.setdefault(c["rank"], {}).setdefault(c["alpha"], []).append((c["lr"], val))
    eta_star, best, alpha_star = {}, {}, {}
    for r, per_alpha in sorted(by.items()):
        eta_star[str(r)], best[str(r)] = {}, {}
        for a, rows in sorted(per_alpha.items()):
            ok = [(lr, v) for lr, v in rows if math.isfinite(v)]
            if ok:
                lr, v = min(ok, key=lambda t: t[1])
                eta_star[str(r)][f"{a:g}"], best[str(r)][f"{a:g}"] = lr, v
        if best[str(r)]:
            alpha_star[str(r)] = float(min(best[str(r)].items(), key=lambda t: t[1])[0])
    out = {"metric": metric, "eta_star": eta_star, "best_loss": best, "alpha_star": alpha_star}
    if len(alpha_star) >= 2:
        out["fit"] = fit_power_law([float(r) for r in alpha_star], list(alpha_star.values()))
    return out


def config_dict(cfg: MLPSweepConfig) -> dict:
    """The config as a JSON-ready dict."""
    return asdict(cfg)
