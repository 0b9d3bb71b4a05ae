"""Per-matrix spectral statistics, one frozen record whichever way they were computed.

A :class:`SpectrumStats` holds ``λ_max``, ``λ_min``, the trace, the negative spectral mass
``Σ_{λ<0} |λ| / Σ |λ|`` and the number of negative eigenvalues, each with how it was obtained
(an :class:`~signal_drift.intervals.Interval` where it is an estimate). It is built either from
a dense eigendecomposition (:meth:`SpectrumStats.from_eigenvalues`: everything exact) or from
Lanczos extremes and an SLQ density (:meth:`SpectrumStats.from_lanczos_slq`: extremes to the
Lanczos residual, mass and fraction with bands that include the quadrature's bias).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch

from ..intervals import Interval
from .lanczos import EigResult
from .slq import SLQResult

__all__ = ["SpectrumStats", "negative_mass"]


def negative_mass(eig: torch.Tensor) -> float:
    """``Σ|λ_i<0| / Σ|λ_i|``: the share of spectral mass that is negative (0 for a zero matrix).

    >>> negative_mass(torch.tensor([-1.0, 0.0, 3.0]))
    0.25
    """
    tot = float(eig.abs().sum())
    return float(eig[eig < 0].abs().sum()) / tot if tot > 0 else 0.0


@dataclass(frozen=True)
class SpectrumStats:
    """Summary numbers of one symmetric matrix's spectrum; ``None`` where not computed.

    >>> st = SpectrumStats.from_eigenvalues(torch.tensor([-1.0, 0.0, 3.0], dtype=torch.float64))
    >>> st.lambda_min, st.lambda_max, st.trace, st.negative_mass, st.negative_count
    (-1.0, 3.0, 2.0, 0.25, 1)
    >>> st.to_json("lora")["negative_count_lora_method"]
    'exact: dense eigvalsh'

    Attributes:
        lambda_max: largest eigenvalue (NaN where Lanczos did not converge).
        lambda_min: smallest eigenvalue (NaN where Lanczos did not converge).
        lanczos_residual_max: ``‖A v − λ_max v‖`` of the Lanczos pair.
        lanczos_residual_min: ``‖A v − λ_min v‖`` of the Lanczos pair.
        trace: ``tr A``.
        trace_interval: its band when it is an estimate.
        trace_method: how the trace was obtained, in words.
        negative_fraction: share of the eigenvalues below 0 (SLQ estimate).
        negative_fraction_interval: its band.
        negative_mass: ``Σ_{λ<0} |λ| / Σ |λ|``.
        negative_mass_interval: its band when it is an SLQ estimate.
        negative_count: number of eigenvalues below 0.
        negative_count_method: how it was counted, in words.
    """

    lambda_max: float
    lambda_min: float
    lanczos_residual_max: float | None = None
    lanczos_residual_min: float | None = None
    trace: float | None = None
    trace_interval: Interval | None = None
    trace_method: str | None = None
    negative_fraction: float | None = None
    negative_fraction_interval: Interval | None = None
    negative_mass: float | None = None
    negative_mass_interval: Interval | None = None
    negative_count: int | None = None
    negative_count_method: str | None = None

    @classmethod
    def from_eigenvalues(cls, eig: torch.Tensor, trace: float | None = None) -> SpectrumStats:
        """Exact statistics of a dense spectrum.

        Args:
            eig: all eigenvalues, ascending, ``[P]`` (e.g. ``torch.linalg.eigvalsh``).
            trace: ``tr A`` computed from the matrix itself (default: ``Σ λ_i``).
        """
        return cls(
            lambda_max=float(eig[-1]),
            lambda_min=float(eig[0]),
            trace=float(eig.sum()) if trace is None else trace,
            negative_mass=negative_mass(eig),
            negative_count=int((eig < 0).sum()),
            negative_count_method="exact: dense eigvalsh",
        )

    @classmethod
    def from_lanczos_slq(
        cls,
        smallest: EigResult,
        largest: EigResult,
        density: SLQResult,
        trace: float,
        *,
        negative: Collection[Literal["mass", "fraction"]] = ("mass",),
        trace_interval: Interval | None = None,
        trace_method: str | None = None,
        negative_count: tuple[int, str] | None = None,
    ) -> SpectrumStats:
        """Extremes from Lanczos, negative mass or fraction from SLQ.

        Args:
            smallest: Lanczos result whose first pair is ``λ_min`` (``which="SA"`` or ``"BE"``).
            largest: Lanczos result whose last pair is ``λ_max`` (``which="LA"`` or ``"BE"``; may
                be ``smallest``). Unconverged extremes are NaN (:meth:`EigResult.checked`).
            density: SLQ quadrature of the same matrix.
            trace: ``tr A``, exact or estimated (then give ``trace_interval``).
            negative: what to estimate of the negative part: ``"mass"`` (with the exact trace
                unless ``trace_interval`` is given; the band's lower integration edge is ``λ_min``
                minus its residual) and/or ``"fraction"`` of the eigenvalues below 0.
            trace_interval: the trace's band when it is an estimate.
            trace_method: how the trace was obtained.
            negative_count: ``(count, method)`` when known by other means.
        """
        frac = density.negative_fraction() if "fraction" in negative else None
        mass = None
        if "mass" in negative:
            # the band's lower integration edge: λ_min minus its residual (a bound when λ_min converged)
            edge = float(smallest.values[0]) - float(smallest.residuals[0])
            exact_trace = trace if trace_interval is None else None
            mass = density.negative_mass(min(edge, float(np.nanmin(density.nodes))), trace=exact_trace)
        count, how = negative_count if negative_count is not None else (None, None)
        return cls(
            lambda_max=float(largest.checked()[0][-1]),
            lambda_min=float(smallest.checked()[0][0]),
            lanczos_residual_max=float(largest.residuals[-1]),
            lanczos_residual_min=float(smallest.residuals[0]),
            trace=trace,
            trace_interval=trace_interval,
            trace_method=trace_method,
            negative_fraction=None if frac is None else frac.estimate,
            negative_fraction_interval=frac,
            negative_mass=None if mass is None else mass.estimate,
            negative_mass_interval=mass,
            negative_count=count,
            negative_count_method=how,
        )

    def to_json(self, suffix: str | None = None) -> dict:
        """The numbers that were computed, JSON-ready, in field order.

        Args:
            suffix: appended to each key before a trailing ``_interval``/``_method``
                (``"lora"``: ``lambda_max_lora``, ``negative_mass_lora_interval``, ...).
        """
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            key = f.name
            if suffix:
                base, _, tail = key.rpartition("_")
                key = f"{base}_{suffix}_{tail}" if tail in ("interval", "method") else f"{key}_{suffix}"
            out[key] = value.to_json() if isinstance(value, Interval) else value
        return out
