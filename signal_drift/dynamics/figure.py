"""Figure 2, drawn from a :class:`~signal_drift.dynamics.DynamicsResult`'s ``summary`` and ``runs``.

Losses along the η- and α-scaling paths, ``λ_max(H_θ)`` against ``2/η``, the per-step SDR, the
final loss against the multiplier and the one-step probes (Prop. 4). Kept out of
``signal_drift.dynamics``'s namespace so that importing the engine does not load matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..plotting import save_figure  # noqa: E402

__all__ = ["plot_fig2"]


def _fig2_curvature(ax, summary: dict, ks: list, cmap) -> None:
    """λ_max(H_θ) against the step per run (non-converged values, stored as NaN, are skipped)."""
    curv = summary.get("curvature", {})
    for path, mk in (("eta_scaling", "o-"), ("alpha_scaling", "s--")):
        for i, k in enumerate(ks):
            rec = curv.get(path, {}).get(f"{k:g}")
            if not rec or (path == "alpha_scaling" and k == 1.0):
                continue
            pts = [
                (t, v)
                for t, v in zip(rec["steps"], rec["lambda_max"], strict=True)
                if np.isfinite(v) and v > 0
            ]
            if pts:
                ax.semilogy(*zip(*pts, strict=True), mk, color=cmap(i / max(len(ks) - 1, 1)), ms=4, lw=1,
                            label=f"{path.split('_')[0]} k={k:g}")  # fmt: skip
            if path == "eta_scaling":
                ax.axhline(rec["stability_bound"], color=cmap(i / max(len(ks) - 1, 1)), ls=":", lw=0.8)
    lc = summary.get("lambda_max_convergence", {})
    ax.set_title(
        "λ_max(H_θ) (solid: η-path, dashed: α-path; dotted: 2/η of the η-path,\n"
        f"α-path 2/η0); {lc.get('converged', 0)}/{lc.get('measured', 0)} converged (others: NaN, not drawn)",
        fontsize=9,
    )
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)
    if not lc.get("measured"):
        ax.text(0.5, 0.5, "λ_max not recorded\n(--curvature-every 0 --curvature-early 0)", ha="center",
                va="center", transform=ax.transAxes, fontsize=10, color="0.3",
                bbox={"facecolor": "white", "edgecolor": "0.7"})  # fmt: skip


def _fig2_probes(ax, summary: dict) -> None:
    """One-step SDR(k)/SDR(1) at each checkpoint: η-probe, frozen-state and consistent α-probes."""
    probes = summary.get("sdr_probes", {}).get("probes", [])
    for j, p in enumerate(probes):
        ks = np.asarray(p["multipliers"])
        c = f"C{j}"
        lab = f"step {p['checkpoint']}"
        for key, mk, name in (
            ("sdr_alpha_consistent", "o", "consistent α"),
            ("sdr_alpha_frozen_state", "x", "frozen α"),
        ):
            y = np.asarray(p[key]) / p[key][0]
            ok = np.isfinite(y) & (y > 0)
            ax.loglog(ks[ok], y[ok], mk, color=c, ms=6, label=f"{lab}: {name}")
        y = np.asarray(p["sdr_alpha_consistent_predicted"]) / p["sdr_alpha_consistent_predicted"][0]
        ok = np.isfinite(y) & (y > 0)
        ax.loglog(ks[ok], y[ok], "-", color=c, lw=1)
    if probes:
        ks = np.asarray(probes[0]["multipliers"])
        ax.loglog(ks, 1 / ks, "k:", lw=1, label="η-probe: 1/k (identity)")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_xlabel("multiplier k")
    ax.set_ylabel("one-step SDR(k) / SDR(1)")
    ax.set_title(
        "one-step probes (Prop. 4): consistent α-probe (B/k, state rescaled; line: closed form\n"
        "‖k·sΔB·A + sB·ΔA‖/(k‖sΔB·ΔA‖)) vs frozen-state α-probe",
        fontsize=9,
    )
    ax.legend(fontsize=6, ncol=2)


def plot_fig2(summary: dict, runs: dict, out_dir: str | Path) -> Path:
    """Write ``fig2.png`` and, for Adam, ``edge.png`` (:func:`~signal_drift.plotting.plot_edge`).

    ``fig2.png``: losses, λ_max(H_θ) against 2/η, SDR curves, final loss, one-step probes.

    Args:
        summary: the ``dynamics.json`` content (:class:`~signal_drift.dynamics.DynamicsResult`'s
            ``summary``).
        runs: ``{"eta_scaling"|"alpha_scaling": {k: Run}}``.
        out_dir: output folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(19, 9.5))
    cmap = plt.get_cmap("plasma")
    ks = sorted(runs["eta_scaling"])
    for col, path in enumerate(("eta_scaling", "alpha_scaling")):
        ax = axes[0, col]
        for i, k in enumerate(ks):
            r = runs[path].get(k)
            if r is None:
                continue
            lab = f"k={k:g}" + (f" (diverged @ {r.diverged_step})" if r.diverged else "")
            ax.semilogy(r.loss, color=cmap(i / max(len(ks) - 1, 1)), label=lab)
        name = "η-scaling (α0, k·η0)" if path == "eta_scaling" else "α-scaling (k·α0, η0)"
        ax.set_title(f"loss, {name}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    _fig2_curvature(axes[0, 2], summary, ks, cmap)
    ax = axes[1, 0]
    for path, ls in (("eta_scaling", "-"), ("alpha_scaling", "--")):
        for i, k in enumerate(ks):
            r = runs[path].get(k)
            if r is None or not r.sdr:
                continue
            ax.semilogy(
                r.sdr, ls=ls, color=cmap(i / max(len(ks) - 1, 1)), lw=1, label=f"{path.split('_')[0]} k={k:g}"
            )
    te, ta = summary.get("trajectory_sdr_slope_eta"), summary.get("trajectory_sdr_slope_alpha")
    fmt = lambda x: "n/a" if x is None else f"{x:+.3f}"  # noqa: E731
    ax.set_title(
        "SDR = ‖Δw_signal‖/‖Δw_drift‖ per step (solid: η-path, dashed: α-path)\n"
        f"trajectory SDR slope vs k (finding): η-path {fmt(te)}, α-path {fmt(ta)}",
        fontsize=9,
    )
    ax.set_xlabel("step")
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1, 1]
    for path, mk in (("eta_scaling", "o-"), ("alpha_scaling", "s-")):
        rows = summary[path]
        xs = [float(k) for k in rows]
        ys = [rows[k]["final_loss"] for k in rows]
        ax.loglog(xs, ys, mk, label=path.replace("_", " "))
        for x, k in zip(xs, rows, strict=True):
            if rows[k]["diverged"]:
                ax.axvline(x, color="C0" if path == "eta_scaling" else "C1", ls=":", lw=1)
                ax.text(
                    x,
                    ax.get_ylim()[1] if ax.get_ylim()[1] < 1e300 else 1,
                    " diverged",
                    rotation=90,
                    fontsize=7,
                    va="top",
                )
    ax.set_xlabel("multiplier k")
    ax.set_ylabel("final loss")
    ax.set_title("final loss against the multiplier (U-curves; dotted: diverged)")
    ax.legend(fontsize=8)
    _fig2_probes(axes[1, 2], summary)
    c = summary["config"]
    fig.suptitle(f"Figure 2 — {c['depth']}-layer SiLU MLP, d={c['dim']}, r={c['rank']}, {c['optimizer']}, "
                 f"α0={c['alpha0']:g}, η0={c['lr0']:g}, {c['steps']} steps")  # fmt: skip
    fig.tight_layout()
    path = out / "fig2.png"
    save_figure(fig, path)
    if summary.get("sharpness", {}).get("eta_scaling"):
        plot_edge_png(summary, out)
    return path


def plot_edge_png(summary: dict, out_dir: str | Path) -> Path:
    """Write ``edge.png`` from a ``dynamics.json`` summary alone (its ``sharpness`` and ``broke_down``)."""
    from ..plotting import plot_edge

    c = summary["config"]
    head = f"Adam's stability edge along both paths — MLP d={c['dim']}, r={c['rank']}, η0={c['lr0']:g}"
    return plot_edge(summary["sharpness"], summary["broke_down"], Path(out_dir) / "edge.png", head)
