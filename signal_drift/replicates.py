r"""Statistics over seeds for the empirical findings (I–III): intervals a reviewer can check.

A sweep run at several seeds gives, per cell, one number per seed; seeds are the replicates
(data order, ``A`` init, and where it applies the base model). Everything here treats the seed as
the unit of replication, so effects shared by every cell of one seed (a lucky init, an easy data
order) cannot masquerade as precision:

- :func:`over_seeds`: mean, spread and a Student-t interval of one cell over its seeds;
- :func:`paired_difference`: two quantities measured at the same seeds (the α-path and the η-path
  share everything but the multiplier), the interval of their mean difference from the per-seed
  differences;
- :func:`best_on_path`: per seed the best multiplier and its loss, their interval over seeds, and
  how often each multiplier wins when the seeds are resampled (:func:`bootstrap`);
- :func:`refine_argmin`: an optimum between grid points (a parabola in ``log x``), so that
  ``α*`` is not quantised to the grid;
- :func:`fit_power_law_seeds`: ``α* = c·r^k`` (paper Eq. 3) fitted per seed, with the Student-t
  interval of ``k`` and ``log c`` over the per-seed fits.

Why Student-t over seeds and not a percentile bootstrap for the bands: with 3 to 5 seeds the
percentile bootstrap of a mean under-covers badly (its spread is the plug-in ``σ/√n`` without
the t-quantile: about 75 % nominal 95 % at three seeds, measured in ``tests/test_replicates.py``),
while the t-interval over per-seed values is exact for Gaussian seed effects and covers within
Monte-Carlo error in the same test. The bootstrap is kept for what has no closed form: how often
each multiplier is best.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ._errors import InputError
from .intervals import Interval, mean_interval

__all__ = [
    "over_seeds",
    "paired_difference",
    "bootstrap",
    "best_on_path",
    "refine_argmin",
    "fit_power_law_seeds",
    "table",
    "sign_test",
]


def _finite(x: Sequence[float]) -> np.ndarray:
    return np.asarray([v for v in x if v is not None and math.isfinite(v)], float)


def over_seeds(values: Sequence[float], level: float = 0.95) -> dict:
    """One cell over its seeds: ``n``, ``n_failed`` (NaN: diverged), mean, SD and the t-interval.

    >>> over_seeds([1.0, 2.0, 3.0])["interval"]["low"] < 2.0
    True
    """
    x = _finite(values)
    out = {"n": len(x), "n_failed": len(values) - len(x)}
    if len(x) == 0:
        return out | {"mean": math.nan, "sd": math.nan, "interval": None}
    iv = mean_interval(x, level, f"Student-t over {len(x)} seeds") if len(x) > 1 else None
    return out | {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else math.nan,
                  "interval": iv.to_json() if iv else None}  # fmt: skip


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``a_s − b_s`` over seeds ``s`` (aligned), Student-t over the per-seed differences.

    Raises:
        InputError: unequal lengths, or fewer than 2 seeds where both are finite.
    """
    if len(a) != len(b):
        raise InputError(
            f"paired values: {len(a)} and {len(b)} seeds; they must be measured at the same seeds"
        )
    d = _finite([x - y for x, y in zip(a, b, strict=True)])
    if len(d) < 2:
        raise InputError(f"paired values: {len(d)} seed(s) where both are finite; an interval needs 2")
    return mean_interval(d, level, f"Student-t over {len(d)} paired seeds")


def bootstrap(
    samples: np.ndarray,
    stat: Callable[[np.ndarray], float],
    n_boot: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """``stat`` of ``n_boot`` resamples of the rows (seeds) of ``samples`` ``[S, ...]``, with replacement.

    Returns the ``[n_boot]`` replicate values (deterministic by ``seed``); summarise them as the
    caller needs (e.g. the frequency of each argmin).
    """
    x = np.asarray(samples, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    return np.asarray([stat(x[i]) for i in idx], float)


def refine_argmin(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The minimiser of ``y(x)`` on a geometric grid, refined by a parabola in ``log x``.

    The parabola goes through the grid argmin and its two neighbours; its vertex, kept within
    half a grid step of the argmin (a parabola extrapolates badly). At either end of the grid, or
    where the three points are not convex, the grid argmin is returned. Non-finite ``y`` (diverged
    runs) never win.

    >>> round(refine_argmin([1, 2, 4, 8], [(math.log2(x) - 1.3) ** 2 for x in (1, 2, 4, 8)]), 6)
    2.462289
    """
    grid = np.asarray(xs, float)
    x, y = np.log(grid), np.asarray(ys, float)
    y = np.where(np.isfinite(y), y, np.inf)
    i = int(np.argmin(y))
    if not np.isfinite(y[i]):
        return math.nan
    if i == 0 or i == len(x) - 1 or not np.all(np.isfinite(y[i - 1 : i + 2])):
        return float(grid[i])
    x0, x1, x2 = x[i - 1 : i + 2]
    y0, y1, y2 = y[i - 1 : i + 2]
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
    b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / den
    if not a > 0:
        return float(grid[i])
    v = -b / (2 * a)
    lo, hi = 0.5 * (x0 + x1), 0.5 * (x1 + x2)
    return float(math.exp(min(max(v, lo), hi)))


def best_on_path(
    table: Sequence[Sequence[float]],
    ks: Sequence[float],
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """The best multiplier and loss of one path over seeds.

    Args:
        table: ``[S][K]`` loss per seed and multiplier (NaN: diverged, never best).
        ks: the ``K`` multipliers.
        level: interval level.
        n_boot: bootstrap resamples of the seeds for ``best_k_frequency``.
        seed: bootstrap seed.

    Returns:
        ``best_k_per_seed``, ``best_loss_per_seed``, ``best_loss`` (:func:`over_seeds` of the
        latter), ``best_k_of_mean`` (argmin of the mean curve over seeds that did not diverge),
        ``best_k_frequency`` (``{k: share of seed resamples whose mean curve is lowest at k}``).
    """
    t = np.asarray(table, float)
    if t.ndim != 2 or t.shape[1] != len(ks):
        raise InputError(f"table: shape {t.shape}, need [seeds, {len(ks)}]")
    safe = np.where(np.isfinite(t), t, np.inf)
    per_k = [float(ks[i]) if np.isfinite(safe[s, i]) else None for s, i in enumerate(np.argmin(safe, 1))]
    per_loss = [float(v) if np.isfinite(v) else math.nan for v in safe.min(1)]

    def arg_of_mean(rows: np.ndarray) -> float:
        m = np.where(np.isfinite(rows).all(0), rows.mean(0), np.inf)  # a multiplier that diverged once loses
        return float(np.argmin(m)) if np.isfinite(m).any() else math.nan

    reps = bootstrap(t, arg_of_mean, n_boot, seed)
    freq = {f"{float(ks[int(i)]):g}": float(np.mean(reps == i)) for i in np.unique(reps[np.isfinite(reps)])}
    j = arg_of_mean(t)
    return {
        "best_k_per_seed": per_k,
        "best_loss_per_seed": per_loss,
        "best_loss": over_seeds(per_loss, level),
        "best_k_of_mean": None if math.isnan(j) else float(ks[int(j)]),
        "best_k_frequency": freq,
    }


def fit_power_law_seeds(
    x: Sequence[float], y_per_seed: Sequence[Sequence[float]], level: float = 0.95
) -> dict:
    r"""``y = c·x^k`` fitted by least squares in log–log space per seed, with intervals over seeds.

    Per seed ``s``: ``(k_s, log c_s)`` by OLS over the ``x`` where ``y`` is finite and positive (at
    least 2 points). The estimates are the means over seeds; the intervals are Student-t over the
    per-seed values (the seed is the replicate, so a seed-level offset shared by every ``x``
    widens the band instead of hiding in it). Also the pooled fit over every point.

    Args:
        x: ``[R]`` positive abscissae (ranks).
        y_per_seed: ``[S][R]`` values (``α*``), NaN where missing.
        level: interval level.

    Returns:
        ``{"k": Interval json, "c": Interval json, "k_per_seed", "c_per_seed", "k_pooled",
        "c_pooled", "seeds": S used, "points": n used}``.

    Raises:
        InputError: fewer than 2 seeds with a fit.
    """
    lx = np.log(np.asarray(x, float))
    ks, cs, px, py = [], [], [], []
    for row in y_per_seed:
        y = np.asarray(row, float)
        ok = np.isfinite(y) & (y > 0)
        if ok.sum() >= 2 and np.ptp(lx[ok]) > 0:
            k, logc = np.polyfit(lx[ok], np.log(y[ok]), 1)
            ks.append(float(k))
            cs.append(float(logc))
            px += list(lx[ok])
            py += list(np.log(y[ok]))
    if len(ks) < 2:
        raise InputError(f"fit: {len(ks)} seed(s) with 2 or more finite points; intervals over seeds need 2")
    k_iv = mean_interval(np.asarray(ks), level, f"Student-t over {len(ks)} per-seed fits")
    c_iv = mean_interval(np.asarray(cs), level, f"Student-t over {len(ks)} per-seed fits (of log c)").map(
        math.exp
    )
    kp, cp = np.polyfit(np.asarray(px), np.asarray(py), 1)
    return {
        "k": k_iv.to_json(),
        "c": c_iv.to_json(),
        "k_per_seed": ks,
        "c_per_seed": [math.exp(c) for c in cs],
        "k_pooled": float(kp),
        "c_pooled": float(math.exp(cp)),
        "seeds": len(ks),
        "points": len(px),
    }


def table(
    records: Sequence[Mapping], seeds: Sequence[int], key: Callable[[Mapping], object], metric: str
) -> dict:
    """``{key(cell): [metric per seed in seeds order]}`` from sweep records (NaN where missing)."""
    out: dict = {}
    pos = {s: i for i, s in enumerate(seeds)}
    for rec in records:
        c = rec["cell"]
        if c.get("seed") not in pos:
            continue
        row = out.setdefault(key(c), [math.nan] * len(seeds))
        row[pos[c["seed"]]] = rec.get(metric, math.nan)
    return out


def sign_test(later: Sequence[bool], unit: str = "seeds") -> dict:
    """One-sided sign test that the α-path breaks down later than the η-path, and its verdict.

    Args:
        later: per replicate (a seed) whether the α-path broke down later (or not at all) than the
            η-path; only replicates where the η-path broke down inside the grid belong here.
        unit: what a replicate is, for the verdict's wording.

    Returns:
        ``{"n", "later", "p", "verdict"}``; ``p`` is ``P(X ≥ later)`` for ``X ~ Bin(n, ½)`` (None
        with no replicate). Fewer than 5 replicates cannot reach ``p < 0.05``.

    >>> sign_test([True] * 5)["p"]
    0.03125
    """
    from scipy import stats

    n, k = len(later), int(sum(bool(x) for x in later))
    if not n:
        return {"n": 0, "later": 0, "p": None,
                "verdict": "not resolved at this budget (no η-path breakdown inside the grid)"}  # fmt: skip
    p = float(stats.binom.sf(k - 1, n, 0.5))
    head = "reproduced" if p < 0.05 else "not resolved at this budget (a sign test needs 5 seeds)"
    return {"n": n, "later": k, "p": p,
            "verdict": f"{head}: the α-path broke down later (or not at all) at {k} of {n} {unit} "
                       f"(one-sided sign test, p = {p:.3g})"}  # fmt: skip
