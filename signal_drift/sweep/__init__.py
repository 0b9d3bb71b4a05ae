"""Resumable hyper-parameter sweeps and the paper's Findings I and III at MLP scale.

- :func:`run_grid`: generic and crash-safe. Each finished cell is appended to a JSONL file
  (flushed and fsynced); a rerun skips the cells already there, so a sweep killed by Ctrl-C or
  SIGKILL loses at most the cell in flight. The training path reuses it.
- :func:`mlp_cell`: one (r, α, η) cell on the controlled MLP task, scored by held-out loss.
- :func:`analyse`: η*(α) per rank (Finding I), α*(r) with its grid cell and a flag where it
  sits at either edge of the grid, and the fit ``α* = c·r^k`` by linear regression in log–log
  space over the bracketed ranks, with the slope interval their cells allow (Finding III,
  paper Eq. 3).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._errors import InputError, check_positive_float, check_positive_int
from ..io import append_jsonl, read_jsonl

__all__ = [
    "run_grid",
    "cell_key",
    "MLPSweepConfig",
    "mlp_cell",
    "SweepAnalysis",
    "analyse",
    "fit_power_law",
    "describe_alpha_star",
    "findings_over_seeds",
    "alpha_star_over_seeds",
]


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
    workers: int = 1,
) -> list[dict]:
    """Run ``fn`` on every cell not yet recorded in ``path``; return all records of ``cells``.

    Args:
        cells: JSON-serialisable dicts, one per grid point.
        fn: ``fn(cell) -> result dict``; the record is ``{"key", "cell", **result}``. With
            ``workers > 1`` it must be picklable (a module-level function or a
            :func:`functools.partial` of one).
        path: JSONL file (created if missing; appended to).
        progress: show a tqdm bar.
        log: called with a one-line note about skipped cells.
        write: append finished cells to ``path``; False on the non-writing ranks of a ``torchrun``
            job, which run every cell in step with rank 0 but leave the file to it.
        workers: run the cells in this many spawned processes, each with ``torch``'s threads
            divided among them (``get_num_threads() // processes``, at least 1). Cells land in
            ``path`` as they finish (in any order); Ctrl-C stops the workers and keeps every
            finished cell. A cell's numbers depend on its thread count only at round-off.
    """
    done = {rec["key"]: rec for rec in read_jsonl(path)}
    todo = [c for c in cells if cell_key(c) not in done]
    if log is not None and len(todo) < len(cells):
        log(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already in {path}")
    results = _in_workers(fn, todo, workers) if workers > 1 and len(todo) > 1 else ((c, fn(c)) for c in todo)
    try:
        for cell, result in tqdm(results, total=len(todo), desc="sweep", disable=not progress):
            rec = {"key": cell_key(cell), "cell": cell, **result}
            if write:
                append_jsonl(path, rec)
            done[rec["key"]] = rec
    finally:
        results.close()  # stops the workers when the loop ends early (Ctrl-C, an error)
    return [done[cell_key(c)] for c in cells]


def _worker_init(threads: int) -> None:
    """A sweep worker: its share of the threads; Ctrl-C is the parent's to handle."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)


def _in_workers(fn: Callable[[dict], dict], todo: Sequence[dict], workers: int):
    """``(cell, fn(cell))`` as each finishes in a pool of spawned processes.

    A worker that dies (killed, out of memory) raises ``BrokenProcessPool`` here instead of
    hanging; on any error or Ctrl-C the queued cells are cancelled and the workers terminated.
    """
    import concurrent.futures as cf
    import multiprocessing

    n = min(workers, len(todo))
    threads = max(1, torch.get_num_threads() // n)
    spawn = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(n, mp_context=spawn, initializer=_worker_init, initargs=(threads,))
    done = False
    try:
        futures = {pool.submit(fn, c): c for c in todo}
        for fut in cf.as_completed(futures):
            yield futures[fut], fut.result()
        done = True
    finally:
        procs = list((getattr(pool, "_processes", None) or {}).values())  # no public handle before 3.14
        if not done:  # a cell in flight would otherwise run to its end
            for proc in procs:
                proc.terminate()  # a no-op on one that already exited
        # then let the pool's own thread reap them: joining them here as well races its waitpid
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class MLPSweepConfig:
    """The (r, α, η) grid on the controlled MLP (the flags of ``python -m signal_drift.sweep``).

    The settings ``dim``, ``depth``, ``samples``, ``seed``, ``workers`` mean the same in every config
    (:data:`signal_drift.settings.COMMON_HELP`).

    Attributes:
        test_samples: held-out samples that score each cell.
        steps: Adam steps per cell.
        ranks: LoRA ranks r, each 1..dim.
        alphas: the α of the grid.
        lrs: the learning rates η of the grid.
        seeds: replicate every cell at these seeds (task, base MLP, A init); empty: ``seed`` alone.
            With two or more, ``sweep.json`` gains ``over_seeds`` (:func:`findings_over_seeds`).
    """

    dim: int = 32
    depth: int = 5
    samples: int = 512
    test_samples: int = 512
    steps: int = 100
    ranks: tuple[int, ...] = (1, 2, 4, 8)
    alphas: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    seeds: tuple[int, ...] = ()
    seed: int = 0
    workers: int = 1

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid field."""
        for name in ("dim", "depth", "samples", "test_samples", "steps", "workers"):
            check_positive_int(name, getattr(self, name))
        for r in self.ranks:
            check_positive_int("ranks", r, self.dim)
        for a in self.alphas:
            check_positive_float("alphas", a)
        for lr in self.lrs:
            check_positive_float("lrs", lr)
        if len(set(self.replicates)) != len(self.replicates) or any(s < 0 for s in self.replicates):
            raise InputError(
                f"seeds={list(self.seeds)} is invalid: need distinct seeds >= 0", fields=["seeds"]
            )

    @property
    def replicates(self) -> tuple[int, ...]:
        """The seeds every cell is run at: ``seeds``, or ``(seed,)`` when it is empty."""
        return tuple(self.seeds) or (self.seed,)

    def cells(self) -> list[dict]:
        """Every grid point at every seed as a dict (with the settings that define it)."""
        base = {"dim": self.dim, "depth": self.depth, "samples": self.samples, "steps": self.steps}
        return [
            base | {"seed": s, "rank": r, "alpha": float(a), "lr": float(lr)}
            for s in self.replicates
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


def fit_power_law(
    x: Sequence[float], y: Sequence[float], y_cells: Sequence[tuple[float, float]] | None = None
) -> dict:
    r"""Fit ``y = c·x^k`` by least squares in log–log space (paper Eq. 3).

    The slope is linear in the data, ``k̂ = Σ_i w_i log y_i`` with
    ``w_i = (log x_i − mean log x) / Σ_j (log x_j − mean log x)²`` (likewise ``log ĉ``). When
    each ``y_i`` is only known to lie in a cell ``[lo_i, hi_i]`` (a grid argmin stands for
    every value of its grid cell), the slopes that the cells allow form the interval

    .. math::

        \Big[k̂ + Σ_i \min(−w_i h_i^-, w_i h_i^+),\; k̂ + Σ_i \max(−w_i h_i^-, w_i h_i^+)\Big],
        \quad h_i^- = \log(y_i / lo_i),\; h_i^+ = \log(hi_i / y_i)

    (``k̂ ± h Σ|w_i|`` for cells of half-width ``h`` in log space), reported as ``k_grid_range``
    and ``c_grid_range``. It bounds the effect of the grid's resolution only, not that of noise
    in which cell wins.

    Args:
        x: positive abscissae (e.g. ranks).
        y: positive values (e.g. α*).
        y_cells: optional ``(lo_i, hi_i)`` with ``0 < lo_i <= y_i <= hi_i < inf``.

    Returns:
        ``{"k", "c", "r2", "n", "k_ci95_gaussian", "c_ci95_gaussian"}`` and, with ``y_cells``,
        ``"k_grid_range"``, ``"c_grid_range"``. The ``*_ci95_gaussian`` intervals are the
        Student-t regression intervals, valid only for Gaussian scatter of ``log y`` (not for
        grid argmins); ``None`` with 2 points.

    Raises:
        InputError: fewer than 2 points, values that are not finite and > 0, all ``x`` equal,
            or cells that do not contain their ``y``.

    >>> f = fit_power_law([1, 4, 16], [3, 6, 12])
    >>> round(f["k"], 6), round(f["c"], 6)
    (0.5, 3.0)
    >>> g = fit_power_law([1, 4, 16], [2, 4, 8], y_cells=[(v / 2**0.5, v * 2**0.5) for v in (2, 4, 8)])
    >>> [round(v, 6) for v in g["k_grid_range"]]  # 0.5 ± (log √2)·Σ|w| = 0.5 ± 0.25
    [0.25, 0.75]
    """
    from scipy import stats

    from ..theory import loglog_slope

    loglog_slope(x, y)  # the same validation: >= 2 points, finite > 0, distinct x
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
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
    out = {
        "k": float(res.slope),
        "c": float(math.exp(res.intercept)),
        "k_ci95_gaussian": k_ci,
        "c_ci95_gaussian": c_ci,
        "r2": float(res.rvalue**2),
        "n": n,
    }
    if y_cells is not None:
        cells = np.asarray(y_cells, float)
        if cells.shape != (n, 2) or not np.all(np.isfinite(cells)) or not np.all(cells > 0):
            raise InputError(f"y_cells: need {n} pairs (lo, hi) of finite values > 0")
        if not np.all((cells[:, 0] <= np.asarray(y, float)) & (np.asarray(y, float) <= cells[:, 1])):
            raise InputError("y_cells: every cell must contain its y (lo <= y <= hi)")
        h_lo, h_hi = ly - np.log(cells[:, 0]), np.log(cells[:, 1]) - ly
        w = (lx - lx.mean()) / ((lx - lx.mean()) ** 2).sum()
        for name, wt, centre in (("k", w, res.slope), ("c", 1.0 / n - lx.mean() * w, res.intercept)):
            lo = centre + np.minimum(-wt * h_lo, wt * h_hi).sum()
            hi = centre + np.maximum(-wt * h_lo, wt * h_hi).sum()
            lo, hi = (float(lo), float(hi)) if name == "k" else (math.exp(lo), math.exp(hi))
            out[f"{name}_grid_range"] = [lo, hi]
    return out


@dataclass(frozen=True)
class SweepAnalysis:
    """Findings I and III of a sweep (what :func:`analyse` returns); rank and α keys are strings.

    Attributes:
        metric: the record field that was minimised (e.g. ``test_loss``).
        eta_star: ``{r: {α: η*}}``, the best learning rate per (r, α) (Finding I).
        best_loss: ``{r: {α: loss}}``, the loss at ``η*``.
        alpha_star: ``{r: α*}``, the grid argmin of the best loss over η.
        alpha_star_cell: ``{r: [lo, hi]}``, the α interval that α* stands for (``None`` on an
            open side).
        alpha_star_edge: ``{r: "lower" | "upper" | "both"}``, only the ranks whose α* is the
            smallest / largest α tried (a bound, not an optimum; ``"both"`` if one α was tried).
        fit: :func:`fit_power_law` of the bracketed α* with their cells, plus ``ranks`` (those
            fitted) and ``excluded_at_edge``; ``None`` when fewer than 2 ranks are bracketed.
        fit_skipped: why there is no ``fit`` (``None`` when there is one).
    """

    metric: str
    eta_star: dict[str, dict[str, float]] = field(default_factory=dict)
    best_loss: dict[str, dict[str, float]] = field(default_factory=dict)
    alpha_star: dict[str, float] = field(default_factory=dict)
    alpha_star_cell: dict[str, list[float | None]] = field(default_factory=dict)
    alpha_star_edge: dict[str, str] = field(default_factory=dict)
    fit: dict | None = None
    fit_skipped: str | None = None

    def to_json(self) -> dict:
        """The analysis as ``sweep.json`` holds it: ``fit`` or ``fit_skipped``, whichever applies."""
        out = {"metric": self.metric, "eta_star": self.eta_star, "best_loss": self.best_loss,
               "alpha_star": self.alpha_star, "alpha_star_cell": self.alpha_star_cell,
               "alpha_star_edge": self.alpha_star_edge}  # fmt: skip
        if self.fit is not None:
            out["fit"] = self.fit
        else:
            out["fit_skipped"] = self.fit_skipped
        return json.loads(json.dumps(out))


def analyse(records: Sequence[dict], metric: str = "test_loss") -> SweepAnalysis:
    """Findings I and III from sweep records.

    α*(r) is a grid argmin, so it stands for its whole grid cell: from the geometric midpoint
    to the previous α tried to the one to the next. At the smallest (largest) α tried the cell
    is open below (above): the grid did not bracket the optimum and α* is only an upper
    (lower) bound. The Eq. 3 fit uses the bracketed ranks only, and reports the slope interval
    that their cells allow (:func:`fit_power_law`).

    Returns:
        A :class:`SweepAnalysis` (η*, best loss, α* with its cell and edge flag, and the fit or
        why there is none).
    """
    by: dict[int, dict[float, list[tuple[float, float]]]] = {}
    for rec in records:
        c = rec["cell"]
        val = rec.get(metric, float("nan"))
        by.setdefault(c["rank"], {}).setdefault(c["alpha"], []).append((c["lr"], val))
    eta_star, best, alpha_star, cell, edge = {}, {}, {}, {}, {}
    for r, per_alpha in sorted(by.items()):
        eta_star[str(r)], best[str(r)] = {}, {}
        for a, rows in sorted(per_alpha.items()):
            ok = [(lr, v) for lr, v in rows if math.isfinite(v)]
            if ok:
                lr, v = min(ok, key=lambda t: t[1])
                eta_star[str(r)][f"{a:g}"], best[str(r)][f"{a:g}"] = lr, v
        if best[str(r)]:
            tried = sorted(per_alpha)
            a_star = float(min(best[str(r)].items(), key=lambda t: t[1])[0])
            i = min(range(len(tried)), key=lambda j: abs(math.log(tried[j] / a_star)))
            alpha_star[str(r)] = a_star
            cell[str(r)] = [
                math.sqrt(tried[i - 1] * tried[i]) if i > 0 else None,
                math.sqrt(tried[i] * tried[i + 1]) if i < len(tried) - 1 else None,
            ]
            if i in (0, len(tried) - 1):
                edge[str(r)] = "both" if len(tried) == 1 else "lower" if i == 0 else "upper"
    found = {"metric": metric, "eta_star": eta_star, "best_loss": best, "alpha_star": alpha_star,
             "alpha_star_cell": cell, "alpha_star_edge": edge}  # fmt: skip
    inner = [r for r in alpha_star if r not in edge]
    if len(inner) >= 2:
        fit = fit_power_law(
            [float(r) for r in inner], [alpha_star[r] for r in inner], [tuple(cell[r]) for r in inner]
        ) | {"ranks": inner, "excluded_at_edge": sorted(edge, key=int)}
        return SweepAnalysis(**found, fit=fit)
    return SweepAnalysis(
        **found,
        fit_skipped=(
            f"{len(inner)} rank(s) with α* bracketed by the grid (at the edge: {sorted(edge, key=int)}); "
            "the fit needs 2"
        ),
    )


def _verdict(
    iv: dict | None, null: float, wanted_sign: int | None = None, target: tuple[float, float] | None = None
) -> str:
    """``reproduced`` / ``not reproduced`` / ``not resolved at this budget`` from an interval.

    With ``target = (lo, hi)`` (an equivalence margin): reproduced when the interval lies inside
    it, not reproduced when it lies outside, not resolved otherwise (wide data cannot "reproduce").
    """
    if iv is None:
        return "not resolved at this budget (fewer than 2 seeds)"
    lo, hi = iv["low"], iv["high"]
    if target is not None:
        if target[0] <= lo and hi <= target[1]:
            return f"reproduced (the interval lies within [{target[0]:g}, {target[1]:g}])"
        if hi < target[0] or lo > target[1]:
            return f"not reproduced (the interval lies outside [{target[0]:g}, {target[1]:g}])"
        return f"not resolved at this budget (the interval is not within [{target[0]:g}, {target[1]:g}])"
    if lo > null:
        return "reproduced" if wanted_sign == 1 else "not reproduced (the opposite holds)"
    if hi < null:
        return "reproduced" if wanted_sign == -1 else "not reproduced (the opposite holds)"
    return "not resolved at this budget (the interval contains no effect)"


def _best_over_lr(records: Sequence[dict], seeds: Sequence[int], metric: str):
    """Per (seed, rank, α): the best ``metric`` over η and its η, and which cells are complete.

    A (seed, rank, α) is complete when the seed ran every η that some seed ran there; an
    incomplete one (not run yet) has NaN ``best`` and ``eta``, so it never passes for a result.

    Returns:
        ``ranks``, ``alphas`` (sorted), ``best`` and ``eta`` ``[S, R, A]`` (NaN where no finite
        value: incomplete, or every η diverged), ``complete`` ``[S, R, A]``, ``tried`` ``[R, A]``
        (a record exists at some seed: the rank's α grid), ``profile`` ``{(s, r, α) indices: {η:
        loss}}``.
    """
    seeds = list(seeds)
    ranks = sorted({rec["cell"]["rank"] for rec in records})
    alphas = sorted({rec["cell"]["alpha"] for rec in records})
    best = np.full((len(seeds), len(ranks), len(alphas)), np.nan)
    eta = np.full_like(best, np.nan)
    profile: dict[tuple[int, int, int], dict[float, float]] = {}  # the loss against η per cell
    for rec in records:
        c = rec["cell"]
        if c["seed"] not in seeds:
            continue
        i, j, k = seeds.index(c["seed"]), ranks.index(c["rank"]), alphas.index(c["alpha"])
        v = profile.setdefault((i, j, k), {})[c["lr"]] = rec.get(metric, math.nan)
        if math.isfinite(v) and not v >= best[i, j, k]:
            best[i, j, k], eta[i, j, k] = v, c["lr"]
    tried = np.zeros(best.shape[1:], bool)
    lrs: dict[tuple[int, int], set] = {}
    for (_, j, k), got in profile.items():
        tried[j, k] = True
        lrs.setdefault((j, k), set()).update(got)
    complete = np.zeros(best.shape, bool)
    for (i, j, k), got in profile.items():
        complete[i, j, k] = set(got) == lrs[j, k]
    best[~complete], eta[~complete] = np.nan, np.nan
    return ranks, alphas, best, eta, complete, tried, profile


def _inner(y: Sequence[float], m: int) -> bool:
    """The optimum ``y[m]`` of a grid is measured, not bounded: not at an end, and finite on both sides."""
    return 0 < m < len(y) - 1 and math.isfinite(y[m - 1]) and math.isfinite(y[m + 1])


def _band3(iv: dict) -> str:
    return f"{iv['estimate']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]"


def _finding_3(ranks: list, alphas: list, best: np.ndarray, complete: np.ndarray, tried: np.ndarray) -> dict:
    """α*(r) per seed on each rank's own α grid, the Eq. 3 fit over seeds, and its verdict.

    A rank's grid is every α it ran at some seed. α* of a seed is NaN (known on one side only, or
    not at all) where a cell of the grid is incomplete, where the argmin sits at either end of
    the grid, or where a neighbour of the argmin diverged (the loss may still fall beyond it: the
    last stable α is not an optimum). The fit uses only the ranks where every seed has an α*: a
    rank kept for some seeds only would select the seeds by their α* and bias ``k``. A verdict
    needs 3 such ranks and an α grid no coarser than ×2 around every α* (a parabola through
    coarser points is biased by the loss's asymmetry, which no interval over seeds shows). With 5 or
    more, ``fit["halves"]`` holds ``k`` over the lower and the upper
    half of them (sharing the middle rank) and ``fit["halves_difference"]`` their difference,
    paired over seeds: a single power law has the same slope in both, and where the interval of
    the difference excludes 0 the verdict is "not reproduced as one power law".
    """
    from ..intervals import mean_interval
    from ..replicates import fit_power_law_seeds, refine_argmin

    a_star = np.full(best.shape[:2], np.nan)
    step = np.full(best.shape[:2], np.nan)  # the grid's spacing around each α*: the refinement's reach
    for j in range(len(ranks)):
        on = tried[j]
        grid = np.asarray(alphas)[on]
        for i in range(best.shape[0]):
            y = best[i, j, on]
            if not complete[i, j, on].all() or not np.isfinite(y).any():
                continue
            m = int(np.argmin(np.where(np.isfinite(y), y, np.inf)))
            if _inner(y, m):
                a_star[i, j] = refine_argmin(grid, y)
                step[i, j] = max(grid[m] / grid[m - 1], grid[m + 1] / grid[m])
    full = [j for j in range(len(ranks)) if np.isfinite(a_star[:, j]).all()]
    left_out = [str(r) for j, r in enumerate(ranks) if j not in full]
    try:
        fit = fit_power_law_seeds([float(ranks[j]) for j in full], a_star[:, full].tolist())
        fit |= {"ranks": [str(ranks[j]) for j in full], "ranks_left_out": left_out}
        if len(full) >= 5:  # is it one power law? the slope over the lower and the upper half of the ranks
            half = (len(full) + 1) // 2
            parts = {
                f"{ranks[part[0]]}-{ranks[part[-1]]}": fit_power_law_seeds(
                    [float(ranks[j]) for j in part], a_star[:, part].tolist()
                )
                for part in (full[:half], full[half - 1 :])
            }
            (lo_r, lo), (hi_r, hi) = parts.items()
            diff = np.asarray(lo["k_per_seed"]) - np.asarray(hi["k_per_seed"])  # paired: the same seeds
            fit["halves"] = {lo_r: lo["k"], hi_r: hi["k"]}
            fit["halves_difference"] = mean_interval(
                diff, 0.95, f"Student-t over {len(diff)} seeds of k(r = {lo_r}) − k(r = {hi_r})"
            ).to_json()
    except InputError as err:
        fit = {"skipped": str(err), "ranks_left_out": left_out}

    def geometric(v: np.ndarray) -> dict | None:  # α* varies by factors: its interval in log space
        if len(v) < 2 or not np.isfinite(v).all():
            return None
        iv = mean_interval(np.log(v), 0.95, f"Student-t over {len(v)} seeds, of log α*")
        return iv.map(math.exp).to_json()

    if "k" not in fit:
        verdict = f"not resolved at this budget ({fit['skipped']})"
    elif len(full) < 3:  # two ranks fix a line per seed exactly: nothing tests the power law itself
        verdict = (
            f"not resolved at this budget (an α* at every seed for r = {', '.join(fit['ranks'])} only; "
            "a verdict needs 3 ranks)"
        )
    elif coarse := [str(ranks[j]) for j in full if np.nanmax(step[:, j]) > 2 * (1 + 1e-9)]:
        verdict = (  # a parabola through points ×4 apart is biased by the loss's asymmetry, not in the band
            f"not resolved at this budget (the α grid is coarser than ×2 around α* at "
            f"r = {', '.join(coarse)}; k = {_band3(fit['k'])} there)"
        )
    elif fit["k"]["high"] - fit["k"]["low"] <= 0:
        verdict = "not resolved at this budget (no spread over seeds: α* sits on the same grid points)"
    else:
        verdict = _verdict(fit["k"], 0.0, target=(0.25, 0.75))
        d = fit.get("halves_difference")
        if d is None and verdict.startswith("reproduced"):
            verdict += " (with fewer than 5 ranks, nothing checks that α* follows one power law)"
        elif d is not None and (
            d["low"] > 0 or d["high"] < 0
        ):  # the halves' slopes differ, paired over seeds
            (lo_r, lo), (hi_r, hi) = fit["halves"].items()
            k = fit["k"]
            verdict = (
                f"not reproduced as one power law: the log–log slope goes from {_band3(lo)} over r = {lo_r} "
                f"to {_band3(hi)} over r = {hi_r} (difference {_band3(d)}, paired over seeds); over r = "
                f"{fit['ranks'][0]}–{fit['ranks'][-1]} its mean is {_band3(k)}, "
                + ("within" if 0.25 <= k["low"] and k["high"] <= 0.75 else "not within")
                + " [0.25, 0.75]"
            )
    return {
        "alpha_star": {str(r): [float(v) for v in a_star[:, j]] for j, r in enumerate(ranks)},
        "alpha_star_geometric_mean": {str(r): geometric(a_star[:, j]) for j, r in enumerate(ranks)},
        "fit": fit,
        "verdict": verdict,
    }


def _cells_over_seeds(ranks: list, alphas: list, best: np.ndarray, complete: np.ndarray, tried: np.ndarray):
    """Per rank and α its grid holds: the best loss over the seeds where the cell is complete."""
    from ..replicates import over_seeds

    return {
        str(r): {
            f"{a:g}": over_seeds([best[i, j, k] for i in range(best.shape[0]) if complete[i, j, k]])
            for k, a in enumerate(alphas)
            if tried[j, k]
        }
        for j, r in enumerate(ranks)
    }


def alpha_star_over_seeds(records: Sequence[dict], seeds: Sequence[int], metric: str = "test_loss") -> dict:
    """Finding III over seeds: α*(r) per seed and the Eq. 3 fit ``α* = c·r^k`` with intervals.

    Per seed and rank: the best ``metric`` over η at each α, and α* refined between that rank's
    grid points (:func:`~signal_drift.replicates.refine_argmin`). α* is NaN where the optimum sits
    at either end of the rank's α grid or next to a diverged run (a bound on one side only), or
    where a cell is incomplete. Then :func:`~signal_drift.replicates.fit_power_law_seeds` over the
    ranks where every seed has an α* (the others are listed in ``fit["ranks_left_out"]``): ``k``
    and ``c`` per seed, Student-t over seeds. "reproduced" when the interval of ``k`` lies within
    [¼, ¾], "not reproduced" when it lies outside, else "not resolved at this budget" (also when
    the seeds do not differ at all). Ranks may have different α grids (the training path's
    α = k·r); a diverged cell is not a missing one.

    Args:
        records: ``run_grid`` records whose ``cell`` has ``seed``, ``rank``, ``alpha``, ``lr``.
        seeds: the seeds to use (the replicates).
        metric: the record's loss to minimise (``test_loss`` on the MLP, ``heldout_nll`` on a LM).

    Returns:
        ``{"seeds", "metric", "cells": {r: {α: over_seeds of the best loss}}, "alpha_star": {r:
        [per seed]}, "alpha_star_geometric_mean": {r: Interval json or None}`` (Student-t over
        seeds of ``log α*``, mapped back; None unless every seed has an α*), ``"fit", "verdict"}``.
    """
    ranks, alphas, best, _, complete, tried, _ = _best_over_lr(records, seeds, metric)
    return {
        "seeds": list(seeds),
        "metric": metric,
        "cells": _cells_over_seeds(ranks, alphas, best, complete, tried),
        **_finding_3(ranks, alphas, best, complete, tried),
    }


def findings_over_seeds(records: Sequence[dict], seeds: Sequence[int], metric: str = "test_loss") -> dict:
    """Findings I and III with intervals over seeds (:mod:`signal_drift.replicates`).

    Per seed: the best loss over η at each (r, α) and ``η*``. Then, Student-t over seeds:

    - Finding I(a), ``η*`` falls as α grows: per seed the mean over ranks of the log–log slope of
      ``η*`` against α; reproduced when the interval is below 0. Cells whose ``η*`` is the
      smallest or largest η run there, or next to an η that diverged, are left out of both slopes
      (the optimum may lie beyond, so ``η*`` and the best loss are bounds), as α* is treated in
      Finding III; ``eta_star_bounds`` counts them. No spread over seeds: not resolved.
    - Finding I(b), the best loss improves with α: per seed the mean over ranks of the slope of the
      best loss against ``log₂ α``; reproduced when the interval is below 0.
    - Finding III, ``α* = c·r^k`` with ``k ≈ ½``: as :func:`alpha_star_over_seeds`.

    Returns:
        ``{"seeds", "cells": {r: {α: over_seeds of the best loss}}, "eta_star_slope",
        "best_loss_slope", "alpha_star": {r: [per seed]}, "fit", "verdicts"}``.
    """
    from ..intervals import mean_interval

    seeds = list(seeds)
    ranks, alphas, best, eta, complete, tried, profile = _best_over_lr(records, seeds, metric)
    found = np.isfinite(best)
    inner = np.zeros_like(found)  # η* with a finite loss on either side: else a bound, and so is its loss
    for (i, j, k), prof in profile.items():
        if found[i, j, k]:
            lrs = sorted(prof)
            inner[i, j, k] = _inner([prof[lr] for lr in lrs], lrs.index(eta[i, j, k]))
    la = np.log2(np.asarray(alphas))
    eta_slope, loss_slope = [], []
    for i in range(len(seeds)):
        es, ls = [], []
        for j in range(len(ranks)):
            ok = inner[i, j]
            if ok.sum() >= 2:
                es.append(np.polyfit(np.log(np.asarray(alphas)[ok]), np.log(eta[i, j, ok]), 1)[0])
                ls.append(np.polyfit(la[ok], best[i, j, ok], 1)[0])
        eta_slope.append(float(np.mean(es)) if es else math.nan)
        loss_slope.append(float(np.mean(ls)) if ls else math.nan)

    def iv(x: list[float]) -> dict | None:
        x = [v for v in x if math.isfinite(v)]
        return (
            mean_interval(np.asarray(x), 0.95, f"Student-t over {len(x)} seeds").to_json()
            if len(x) > 1
            else None
        )

    def verdict(iv: dict | None) -> str:
        if iv is not None and iv["high"] - iv["low"] <= 0:  # η* quantised on the grid alike at every seed
            return "not resolved at this budget (no spread over seeds: η* sits on the same grid points)"
        return _verdict(iv, 0.0, -1)

    f3 = _finding_3(ranks, alphas, best, complete, tried)
    e_iv, l_iv = iv(eta_slope), iv(loss_slope)
    return {
        "seeds": seeds,
        "metric": metric,
        "cells": _cells_over_seeds(ranks, alphas, best, complete, tried),
        "eta_star_slope": {"per_seed": eta_slope, "interval": e_iv},
        "eta_star_bounds": {"cells": int((found & ~inner).sum()), "of": int(found.sum())},
        "best_loss_slope": {"per_seed": loss_slope, "interval": l_iv},
        "alpha_star": f3["alpha_star"],
        "alpha_star_geometric_mean": f3["alpha_star_geometric_mean"],
        "fit": f3["fit"],
        "verdicts": {
            "finding_1_eta_star_falls": verdict(e_iv),
            "finding_1_loss_improves_with_alpha": verdict(l_iv),
            "finding_3_k_is_half": f3["verdict"],
        },
    }


def describe_alpha_star(analysis: SweepAnalysis) -> list[str]:
    """Lines for a CLI: α*(r) with its cell and edge flags, and the Eq. 3 fit (or why none)."""
    edge = analysis.alpha_star_edge
    lines = []
    for r, a in analysis.alpha_star.items():
        lo, hi = analysis.alpha_star_cell[r]
        cell = f"[{'0' if lo is None else f'{lo:.3g}'}, {'∞' if hi is None else f'{hi:.3g}'}]"
        note = {"lower": "  (smallest α tried: an upper bound)",
                "upper": "  (largest α tried: a lower bound)",
                "both": "  (the only α tried)"}.get(edge.get(r), "")  # fmt: skip
        lines.append(f"  α*(r={r}) = {a:g}, cell {cell}{note}")
    if analysis.fit is not None:
        f = analysis.fit
        kg, kc = f["k_grid_range"], f["k_ci95_gaussian"]
        gauss = "undefined" if kc[0] is None else f"[{kc[0]:.3f}, {kc[1]:.3f}]"
        lines.append(
            f"  fit α* = {f['c']:.3g} · r^{f['k']:.3f} over r = {', '.join(f['ranks'])}: k within "
            f"[{kg[0]:.3f}, {kg[1]:.3f}] as the grid cells allow (Gaussian-regression 95% CI "
            f"{gauss}); left out at the grid edge: r = {', '.join(f['excluded_at_edge']) or 'none'}"
        )
    else:
        lines.append(f"  no fit: {analysis.fit_skipped}")
    return lines


def config_dict(cfg: MLPSweepConfig) -> dict:
    """The config as a JSON-ready dict."""
    return asdict(cfg)
