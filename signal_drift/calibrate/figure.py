"""The per-layer α of a ``calibrate`` run against Corollary 1, Variant I and α = r.

Kept out of ``signal_drift.calibrate``'s namespace so that importing it does not load matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..plotting import save_figure  # noqa: E402

__all__ = ["plot_calibration"]


def plot_calibration(result: dict, path: str | Path) -> Path:
    """Per-layer α from ``calibrate``: trace and λ_max criteria against Corollary 1 and Variant I.

    Args:
        result: the ``calibration.json`` content
            (:meth:`~signal_drift.calibrate.CalibrationResult.to_json`).
        path: the PNG to write.
    """
    path = Path(path)
    layers = result["layers"]
    r = result["config"]["rank"]
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(layers) + 3), 4.8))
    tr = np.array([d["alpha_trace"] for d in layers], dtype=float)
    lo = np.array([d["alpha_trace_low"] for d in layers], dtype=float)
    hi = np.array([d["alpha_trace_high"] for d in layers], dtype=float)
    ax.errorbar(x, tr, yerr=[tr - lo, hi - tr], fmt="o", capsize=3,
                label="trace: r√(tr H / tr J0ᵀHJ0) (95 %)")  # fmt: skip
    ax.plot(x, [d["alpha_lambda"] for d in layers], "s", label="λ_max: r√(λ_max H / λ_max J0ᵀHJ0)")
    ax.plot(x, [d["alpha_gaussian"] for d in layers], "_", ms=14, mew=2, color="k",
            label="Corollary 1: √(r/σ²), empirical σ² of A")  # fmt: skip
    ax.axhline(256 * np.sqrt(r), ls=":", color="C3", label=f"Variant I: 256√r = {256 * np.sqrt(r):.0f}")
    ax.axhline(r, ls=":", color="gray", label=f"heuristic α = r = {r}")
    ax.set_yscale("log")
    ax.set_xticks(x, [d["name"].replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")
                      for d in layers], rotation=60, ha="right", fontsize=7)  # fmt: skip
    ax.set_ylabel("α")
    gap = result.get("gap_lambda_over_trace", float("nan"))
    ax.set_title(f"Measured per-layer α at init (r={r}); median α_λ/α_tr = {gap:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return path
