"""Shared figure helpers: the Agg backend, atomic PNG writes and the α*(r) panels.

Each experiment draws its own figures (``signal_drift.<experiment>.figure``); the α*(r) panels
(one seed with grid cells, and over seeds with intervals) are shared by Figure 1
(:mod:`signal_drift.sweep.figure`) and the training sweep (:mod:`signal_drift.train.figure`).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["save_figure", "errorbar_over_seeds", "alpha_star_panel", "alpha_star_seeds_panel", "plot_edge"]


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


def errorbar_over_seeds(ax, x, cells, **kw) -> None:
    """Plot the mean over seeds of each cell with its 95 % interval as an error bar.

    Args:
        ax: the axes.
        x: ``[n]`` abscissae.
        cells: ``[n]`` :func:`~signal_drift.replicates.over_seeds` results (``mean``, ``interval``
            or None where fewer than two seeds are finite).
        **kw: passed to ``ax.errorbar`` (``fmt`` defaults to ``"o-"``, ``capsize`` to 2).
    """
    cells = list(cells)
    m = np.asarray([c["mean"] for c in cells], float)
    lo = np.asarray([c["interval"]["low"] if c["interval"] else np.nan for c in cells], float)
    hi = np.asarray([c["interval"]["high"] if c["interval"] else np.nan for c in cells], float)
    ax.errorbar(np.asarray(x, float), m, yerr=[m - lo, hi - m], **({"fmt": "o-", "capsize": 2} | kw))


def alpha_star_seeds_panel(ax, f3: dict, variant_i: bool = True) -> np.ndarray:
    """Plot Finding III over seeds; return the ranks.

    α*(r) per seed, their geometric mean with its 95 % interval, and the Eq. 3 fit with the
    Student-t interval of ``k``.

    Args:
        ax: the axes.
        f3: :func:`~signal_drift.sweep.alpha_star_over_seeds` (or ``findings_over_seeds``) output.
        variant_i: draw Variant I's α = 256√r for reference (where α* is of that order).
    """
    per, gm = f3["alpha_star"], f3.get("alpha_star_geometric_mean", {})
    rs = np.asarray([float(r) for r in per])
    for i, (r, vals) in enumerate(per.items()):
        v = np.asarray(vals, float)
        ax.plot(np.full(v.shape, float(r)), v, ".", color="0.6", ms=5,
                label="α* per seed (refined between grid points)" if i == 0 else None)  # fmt: skip
    have = [(float(r), g) for r, g in gm.items() if g]
    if have:
        x = np.asarray([r for r, _ in have])
        y = np.asarray([g["estimate"] for _, g in have])
        err = np.asarray([[g["estimate"] - g["low"], g["high"] - g["estimate"]] for _, g in have]).T
        ax.errorbar(x, y, yerr=err, fmt="o", ms=7, capsize=4, color="C0",
                    label="geometric mean over seeds, 95 % interval")  # fmt: skip
    fit = f3.get("fit", {})
    if "k" in fit:
        k, c = fit["k"], fit["c"]
        used = [float(r) for r in fit["ranks"]]  # the ranks with an α* at every seed
        xx = np.geomspace(min(used), max(used), 50)
        band = f"{k['estimate']:.2f} [{k['low']:.2f}, {k['high']:.2f}]"
        ax.plot(xx, c["estimate"] * xx ** k["estimate"], "-", color="C1", label=f"fit α* = c·r^k: k = {band}")
    if len(rs):
        xx = np.geomspace(rs.min(), rs.max(), 50) if len(rs) > 1 else rs
        if variant_i:
            ax.plot(xx, 256 * np.sqrt(xx), ":", color="C3", label="Variant I: 256√r")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(rs, [f"{r:g}" for r in rs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    return rs


def plot_edge(sharpness: dict, broken: dict, path: Path, title: str) -> Path:
    """Adam's edge ratio ``η·λ_max(P⁻¹H_θ)/edge`` along training, per path and multiplier.

    Args:
        sharpness: ``{path: {k: columns}}`` with ``step``, ``edge_ratio``, ``gd_ratio`` and
            ``drift_fraction`` lists (``dynamics.json``'s ``sharpness``, or the training sweep's).
        broken: ``{path: {k: bool}}``: whether that run broke down (marked with a cross).
        path: the PNG to write.
        title: figure title.
    """
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    cmap = plt.get_cmap("plasma")
    ks = sorted({float(k) for runs in sharpness.values() for k in runs})
    names = {"eta_scaling": "η-path (α0, k·η0)", "alpha_scaling": "α-path (k·α0, η0)"}
    for ax, p in zip(axes[:2], ("eta_scaling", "alpha_scaling"), strict=True):
        for i, k in enumerate(ks):
            rec = sharpness.get(p, {}).get(f"{k:g}")
            if not rec:
                continue
            c = cmap(i / max(len(ks) - 1, 1))
            x = np.asarray(rec["step"], float) + 1
            y = np.asarray(rec["edge_ratio"], float)
            ok = np.isfinite(y) & (y > 0)
            bad = broken.get(p, {}).get(f"{k:g}", False)
            ax.loglog(
                x[ok], y[ok], "o-", color=c, ms=3, lw=1, label=f"k={k:g}" + (" (broke down)" if bad else "")
            )
            if bad and ok.any():
                ax.plot(x[ok][-1], y[ok][-1], "x", color=c, ms=10, mew=2)
            g = np.asarray(rec["gd_ratio"], float)
            okg = np.isfinite(g) & (g > 0)
            ax.loglog(x[okg], g[okg], ":", color=c, lw=0.8)
        ax.axhline(1.0, color="k", lw=1)
        ax.set_xlabel("step + 1")
        ax.set_ylabel("η·λ_max(P⁻¹H_θ) / ((2+2β₁)/(1−β₁))")
        ax.set_title(f"{names[p]}: Adam's edge ratio (solid), GD's η·λ_max(H_θ)/2 (dotted)", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2]
    for j, p in enumerate(("eta_scaling", "alpha_scaling")):
        for i, k in enumerate(ks):
            rec = sharpness.get(p, {}).get(f"{k:g}")
            if not rec or (p == "alpha_scaling" and k == 1.0):
                continue
            x = np.asarray(rec["step"], float) + 1
            f = np.asarray(rec["drift_fraction"], float)
            ok = np.isfinite(f)
            ax.semilogx(x[ok], f[ok], "o-" if j == 0 else "s--", color=cmap(i / max(len(ks) - 1, 1)), ms=3,
                        lw=1, label=f"{p.split('_')[0]} k={k:g}")  # fmt: skip
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("step + 1")
    ax.set_ylabel("drift share of λ_max(P⁻¹H_θ)")
    ax.set_title(
        "drift's share at the top preconditioned eigenvector (solid: η-path, dashed: α-path)", fontsize=9
    )
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return path
