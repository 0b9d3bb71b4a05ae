"""Shared figure helpers: the Agg backend, atomic PNG writes and the α*(r) panel.

Each experiment draws its own figures (``signal_drift.<experiment>.figure``); the α*(r) panel is
shared by Figure 1 (:mod:`signal_drift.sweep.figure`) and the training sweep
(:mod:`signal_drift.train.figure`).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["save_figure", "alpha_star_panel"]


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically (a temporary file, then a rename) and close it."""
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)


def alpha_star_panel(ax, analysis: dict, label: str) -> np.ndarray:
    """Plot α*(r) with its grid cell, edge-bounded ranks and the Eq. 3 fit; return the ranks.

    Bracketed α* get their grid cell as a bar; edge-bounded ones an open triangle pointing the
    way the optimum may lie; the fit line spans the bracketed ranks, labelled with the slope
    range their cells allow.
    """
    st, cells, edge = analysis["alpha_star"], analysis["alpha_star_cell"], analysis["alpha_star_edge"]
    inner = [r for r in st if r not in edge]
    if inner:
        x = np.asarray([float(r) for r in inner])
        y = np.asarray([st[r] for r in inner])
        err = np.asarray([[y[i] - cells[r][0], cells[r][1] - y[i]] for i, r in enumerate(inner)]).T
        ax.errorbar(x, y, yerr=err, fmt="o", ms=7, capsize=4, label=f"{label}, bar: its grid cell")
    for kind, marker, text in (("lower", "v", "smallest α tried: an upper bound"),
                               ("upper", "^", "largest α tried: a lower bound"),
                               ("both", "s", "only α tried")):  # fmt: skip
        at = [r for r in st if edge.get(r) == kind]
        if at:
            ax.plot([float(r) for r in at], [st[r] for r in at], marker, mfc="none", ms=11, mew=1.5,
                    color="k", label=f"at the grid edge ({text})")  # fmt: skip
    if "fit" in analysis:
        f = analysis["fit"]
        fr = [float(r) for r in f["ranks"]]
        xx = np.geomspace(min(fr), max(fr), 50)
        kg = f["k_grid_range"]
        fit = f"fit α* = {f['c']:.3g}·r^{f['k']:.2f}, k ∈ [{kg[0]:.2f}, {kg[1]:.2f}] (grid cells)"
        ax.plot(xx, f["c"] * xx ** f["k"], "-", label=fit)
    ax.set_xscale("log")
    ax.set_yscale("log")
    return np.asarray([float(r) for r in st])
