"""Statistics over seeds against synthetic data with known truth: coverage, shrinkage, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from signal_drift._errors import InputError
from signal_drift.replicates import (
    best_on_path,
    bootstrap,
    fit_power_law_seeds,
    over_seeds,
    paired_difference,
    refine_argmin,
    table,
)

RANKS = np.array([1, 2, 4, 8, 16, 32], float)


def _alpha_star(rng, seeds, ranks, k=0.5, c=200.0, seed_sd=0.3, noise_sd=0.25):
    """α*_{s,r} = c · r^k · exp(u_s + ε_{s,r}): a seed-level offset shared by every rank, plus noise."""
    u = rng.normal(0, seed_sd, size=(seeds, 1))
    eps = rng.normal(0, noise_sd, size=(seeds, len(ranks)))
    return c * ranks[None, :] ** k * np.exp(u + eps)


def test_power_law_intervals_cover_the_true_exponent_and_constant():
    rng = np.random.default_rng(0)
    trials, hit_k, hit_c = 1000, 0, 0
    for _ in range(trials):
        f = fit_power_law_seeds(RANKS, _alpha_star(rng, 3, RANKS))
        hit_k += f["k"]["low"] <= 0.5 <= f["k"]["high"]
        hit_c += f["c"]["low"] <= 200.0 <= f["c"]["high"]
    # nominal 95 %, Monte-Carlo SE 0.7 %: exact for Gaussian per-seed fits, at 3 seeds too
    assert 0.93 <= hit_k / trials <= 0.97 and 0.93 <= hit_c / trials <= 0.97, (hit_k, hit_c)


def test_power_law_intervals_shrink_with_more_ranks_and_more_seeds():
    rng = np.random.default_rng(1)

    def width(seeds, ranks):
        ws = []
        for _ in range(300):
            f = fit_power_law_seeds(ranks, _alpha_star(rng, seeds, ranks))
            ws.append(f["k"]["high"] - f["k"]["low"])
        return float(np.median(ws))

    few_ranks, all_ranks, more_seeds = width(3, RANKS[:3]), width(3, RANKS), width(8, RANKS)
    assert few_ranks > 1.5 * all_ranks and all_ranks > 2 * more_seeds, (few_ranks, all_ranks, more_seeds)


def test_noise_free_fit_is_exact():
    y = 3.0 * RANKS**0.5
    f = fit_power_law_seeds(RANKS, [y, y, y])
    assert f["k"]["estimate"] == pytest.approx(0.5) and f["c"]["estimate"] == pytest.approx(3.0)
    assert f["k_pooled"] == pytest.approx(0.5) and f["points"] == 18 and f["seeds"] == 3
    with pytest.raises(InputError, match="intervals over seeds need 2"):
        fit_power_law_seeds(RANKS, [y, [math.nan] * 6])


def test_t_interval_over_seeds_covers_and_the_percentile_bootstrap_does_not():
    """Why the bands are Student-t over seeds: at 3 seeds the percentile bootstrap under-covers."""
    rng = np.random.default_rng(2)
    trials, t_hits, boot_hits = 1000, 0, 0
    for i in range(trials):
        x = rng.normal(1.0, 0.5, size=3)
        iv = over_seeds(list(x))["interval"]
        t_hits += iv["low"] <= 1.0 <= iv["high"]
        reps = bootstrap(x[:, None], lambda s: float(s.mean()), n_boot=400, seed=i)
        lo, hi = np.quantile(reps, [0.025, 0.975])
        boot_hits += lo <= 1.0 <= hi
    assert 0.93 <= t_hits / trials <= 0.97, t_hits
    assert boot_hits / trials < 0.85, boot_hits


def test_paired_difference_covers_and_pairs():
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(1000):
        seed_effect = rng.normal(0, 1.0, size=4)  # shared by both paths at a seed: cancels in the pair
        a = 2.0 + seed_effect + rng.normal(0, 0.1, size=4)
        b = 2.3 + seed_effect + rng.normal(0, 0.1, size=4)
        iv = paired_difference(list(a), list(b))
        hits += iv.covers(-0.3)
    assert 0.93 <= hits / 1000 <= 0.97
    assert paired_difference([1.0, 2.0, math.nan], [0.5, 1.4, 0.0]).estimate == pytest.approx(0.55)
    with pytest.raises(InputError, match="same seeds"):
        paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(InputError, match="needs 2"):
        paired_difference([1.0, math.nan], [1.0, 2.0])


def test_refine_argmin():
    xs = [1, 2, 4, 8, 16]
    assert refine_argmin(xs, [(math.log(x) - math.log(5.0)) ** 2 for x in xs]) == pytest.approx(5.0)
    assert refine_argmin(xs, [5, 4, 3, 2, 1]) == 16  # at the grid's end: the grid value
    assert refine_argmin(xs, [5, 1, 9, 9, math.nan]) == pytest.approx(refine_argmin(xs[:4], [5, 1, 9, 9]))
    assert refine_argmin(xs, [math.nan] * 5) != refine_argmin(xs, [math.nan] * 5)  # NaN: nothing finite
    v = refine_argmin(xs, [3, 2, 1.0001, 1.0, 3])  # vertex pulled toward 8: kept within half a step
    assert 4 * 2**0.5 <= v <= 8 * 2**0.5


def test_best_on_path():
    ks = [1, 4, 16]
    t = [[3.0, 2.0, math.nan], [3.0, 2.5, 2.4], [3.0, 2.1, 2.0]]  # k = 16 diverged at seed 0
    b = best_on_path(t, ks, n_boot=500)
    assert b["best_k_per_seed"] == [4.0, 16.0, 16.0]
    assert b["best_loss_per_seed"] == [2.0, 2.4, 2.0]
    assert b["best_loss"]["n"] == 3 and b["best_loss"]["mean"] == pytest.approx(6.4 / 3)
    assert b["best_k_of_mean"] == 4.0  # a multiplier that diverged at any seed cannot win the mean
    assert sum(b["best_k_frequency"].values()) == pytest.approx(1.0)
    with pytest.raises(InputError, match="shape"):
        best_on_path([[1.0, 2.0]], ks)


def test_table_aligns_seeds():
    recs = [{"cell": {"k": 1, "seed": s}, "loss": 10.0 + s} for s in (2, 0)]
    assert table(recs, [0, 1, 2], lambda c: c["k"], "loss") == {1: [10.0, math.nan, 12.0]}
