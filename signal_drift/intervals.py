"""Confidence intervals that cover the truth, not ``± SE`` around a biased number.

Every estimate the toolkit prints with an error band is an :class:`Interval`: a point estimate,
the band ``[low, high]`` and its nominal coverage ``level``. The band either comes from sampling
alone (an unbiased Monte-Carlo mean: Student-t on the sample) or from deterministic per-sample
bounds that hold exactly plus sampling (SLQ counts: the quadrature's bias is inside the bounds,
see :mod:`signal_drift.spectra.slq`). Coverage is checked against dense truth in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["Interval", "t_quantile", "standard_error", "mean_interval", "bracket_interval"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a band ``[low, high]`` that covers the truth with probability ``level``.

    Attributes:
        estimate: the point estimate (may be biased; the band accounts for that).
        low: lower end of the band.
        high: upper end of the band.
        level: nominal coverage, e.g. 0.95.
        method: how the band was made, in words (for JSON and tables).
    """

    estimate: float
    low: float
    high: float
    level: float
    method: str = ""

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"Interval: low={self.low} > high={self.high}")

    def covers(self, value: float) -> bool:
        """Whether ``value`` lies in ``[low, high]``."""
        return self.low <= value <= self.high

    @property
    def half_width(self) -> float:
        """Half the band's width."""
        return 0.5 * (self.high - self.low)

    def map(self, f: Callable[[float], float]) -> Interval:
        """The image under a monotone increasing ``f`` (the coverage is unchanged)."""
        return Interval(f(self.estimate), f(self.low), f(self.high), self.level, self.method)

    def format(self, spec: str = ".3g") -> str:
        """``"0.207 [0.19, 0.23]"`` (the band, never a ``±``)."""
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    def to_json(self) -> dict:
        """``{"estimate", "low", "high", "level", "method"}``."""
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level,
                "method": self.method}  # fmt: skip


def t_quantile(level: float, n: int, sides: int = 2) -> float:
    """Student-t quantile ``q`` for ``n`` samples, each side failing with ``(1 − level) / sides``.

    ``sides=2`` is the two-sided ``P(|T| ≤ q) = level``; larger ``sides`` serve several one-sided
    bounds joined by the union bound.

    >>> round(t_quantile(0.95, 10**9), 3)
    1.96
    """
    if n < 2:
        return math.inf
    return float(stats.t.ppf(1 - (1 - level) / sides, n - 1))


def standard_error(x: np.ndarray) -> float:
    """Standard error of the mean of the samples ``x`` ``[n]`` (``inf`` for fewer than 2)."""
    x = np.asarray(x, dtype=float)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.inf


def mean_interval(samples: np.ndarray, level: float = 0.95, method: str = "") -> Interval:
    """Student-t interval for the mean of i.i.d. unbiased samples ``[n]``."""
    x = np.asarray(samples, dtype=float)
    m, q = float(x.mean()), t_quantile(level, len(x))
    h = q * standard_error(x)
    return Interval(m, m - h, m + h, level, method or f"Student-t over {len(x)} samples")


def bracket_interval(
    estimate: float,
    lower: np.ndarray,
    upper: np.ndarray,
    level: float = 0.95,
    method: str = "",
    support: tuple[float, float] = (-math.inf, math.inf),
) -> Interval:
    """Interval for ``E[X]`` from per-sample bounds ``lower_i ≤ E[X | sample i] ≤ upper_i``.

    ``mean(lower) − q·SE(lower) ≤ E[X] ≤ mean(upper) + q·SE(upper)``, each side failing with
    probability ``(1 − level) / 2``: the bounds carry any bias of ``estimate``, the t-quantile the
    sampling error. The band is clipped to ``support``, the range ``E[X]`` can take (e.g. ``[0, 1]``
    for a fraction), which cannot lower its coverage.
    """
    lo, hi = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    q = t_quantile(level, len(lo))
    low = float(lo.mean()) - q * standard_error(lo) if q < math.inf else -math.inf
    high = float(hi.mean()) + q * standard_error(hi) if q < math.inf else math.inf
    low, high = max(low, support[0]), min(high, support[1])
    return Interval(float(estimate), min(low, estimate), max(high, estimate), level, method)
