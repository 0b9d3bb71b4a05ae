"""Figures: Fig. 2 (dynamics), Fig. 1 (sweeps) and the training-path plots.

Figure 8 is drawn by its experiment, :mod:`signal_drift.spectra.figure`.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "plot_fig2",
    "plot_fig1",
    "plot_train_loss",
    "plot_update_norms",
    "plot_scaling_paths",
]


def _save(fig, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)


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
    """Write ``fig2.png``: losses, λ_max(H_θ) against 2/η, SDR curves, final loss, one-step probes.

    Args:
        summary: the ``dynamics.json`` content.
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
    _save(fig, path)
    return path


def _alpha_star_panel(ax, analysis: dict, label: str) -> np.ndarray:
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


def plot_fig1(analysis: dict, records: list[dict], out_dir: str | Path) -> Path:
    """Write ``fig1.png``: (a) loss vs η per α, (b) best loss vs α per rank, (c) α*(r) fit."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ranks = sorted({rec["cell"]["rank"] for rec in records})
    r_mid = ranks[len(ranks) // 2]
    alphas = sorted({rec["cell"]["alpha"] for rec in records})
    cmap = plt.get_cmap("viridis")
    metric = analysis["metric"]
    ax = axes[0]
    for i, a in enumerate(alphas):
        rows = sorted((rec["cell"]["lr"], rec.get(metric, np.nan)) for rec in records
                      if rec["cell"]["rank"] == r_mid and rec["cell"]["alpha"] == a)  # fmt: skip
        ax.loglog(
            [x for x, _ in rows],
            [y for _, y in rows],
            "o-",
            color=cmap(i / max(len(alphas) - 1, 1)),
            label=f"α={a:g}",
        )
    ax.set_xlabel("learning rate η")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"(a) loss vs η per α (r={r_mid}); gaps: diverged")
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, r in enumerate(ranks):
        best = analysis["best_loss"].get(str(r), {})
        xs = [float(a) for a in best]
        ax.semilogx(
            xs,
            list(best.values()),
            "o-",
            color=plt.get_cmap("plasma")(i / max(len(ranks) - 1, 1)),
            label=f"r={r}",
        )
    ax.set_xlabel("α")
    ax.set_ylabel(f"best {metric.replace('_', ' ')} over η")
    ax.set_title("(b) best loss against α (Finding I)")
    ax.legend(fontsize=7)
    ax = axes[2]
    rs = _alpha_star_panel(ax, analysis, "α*(r) (grid argmin)")
    if len(rs):
        ax.loglog(rs, rs, ":", color="gray", label="α = r (heuristic)")
        ax.set_xticks(rs, [f"{r:g}" for r in rs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("rank r")
    ax.set_ylabel("α*")
    ax.set_title("(c) optimal α against rank (Finding III)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "fig1.png"
    _save(fig, path)
    return path


def plot_train_loss(metrics: dict, path: str | Path, title: str = "") -> Path:
    """Write the train / held-out NLL curves of a ``train`` run (``metrics.json`` layout)."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    tl, hl = metrics["train_loss"], metrics["heldout_nll"]
    ax.plot([s for s, _ in tl], [v for _, v in tl], lw=0.8, label="train NLL")
    ax.plot([s for s, _ in hl], [v for _, v in hl], "o-", label="held-out NLL")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    return path


def _sdr(signal: np.ndarray, drift: np.ndarray) -> np.ndarray:
    """``signal / drift`` where the drift is non-zero, NaN (a gap in the plot) elsewhere."""
    return np.where(drift > 0, signal / np.where(drift > 0, drift, 1.0), np.nan)


def plot_update_norms(history: dict, path: str | Path, title: str = "") -> Path:
    """Per-layer ``‖Δw_signal‖``, ``‖Δw_drift‖`` and SDR against the step.

    Args:
        history: ``{layer: [[step, signal, drift], ...]}`` as recorded by
            :class:`~signal_drift.train.monitor.SignalDriftMonitor`.
        path: the PNG to write.
        title: figure title.
    """
    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    names = list(history)
    rows = {n: np.asarray(history[n], dtype=float) for n in names}  # [steps, (step, signal, drift)]
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(names):
        step, sig, dri = rows[name].T
        color = cmap(i / max(len(names) - 1, 1))
        axes[0].semilogy(step, sig, color=color, lw=0.8)
        axes[1].semilogy(step, np.where(dri > 0, dri, np.nan), color=color, lw=0.8)
        axes[2].semilogy(step, _sdr(sig, dri), color=color, lw=0.8)
    if names and len({len(r) for r in rows.values()}) == 1:
        arr = np.stack([rows[n] for n in names])  # [layers, steps, 3]
        ratio = _sdr(arr[:, :, 1], arr[:, :, 2])
        some = ~np.isnan(ratio).all(axis=0)  # steps where some layer has drift (not the first from B = 0)
        med = np.full(ratio.shape[1], np.nan)
        med[some] = np.nanmedian(ratio[:, some], axis=0)
        axes[2].semilogy(arr[0, :, 0], med, "k-", lw=2, label="median over layers")
        axes[2].legend(fontsize=8)
    for ax, lab in zip(axes, ["‖Δw_signal‖ per layer", "‖Δw_drift‖ per layer", "SDR per layer"], strict=True):
        ax.set_xlabel("step")
        ax.set_title(lab)
    fig.suptitle(f"{title} — {len(names)} adapted layers (colour: depth order)")
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_scaling_paths(result: dict, path: str | Path) -> Path:
    """Eq. 2 and Eq. 3 of a training sweep: loss and SDR along both paths, and α*(r).

    Args:
        result: :func:`~signal_drift.train.sweep.analyse_paths` output (``sweep.json``).
        path: the PNG to write.
    """
    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ranks = list(result["paths"])
    colors = plt.get_cmap("plasma")
    for i, r in enumerate(ranks):
        color = colors(i / max(len(ranks), 1))
        for p, style, name in (("eta", "o-", "η-scaling (α0, kη)"), ("alpha", "s--", "α-scaling (kα0, η)")):
            rows = np.asarray(result["paths"][r][p], dtype=float).reshape(-1, 3)
            if not len(rows):
                continue
            axes[0].semilogx(rows[:, 0], rows[:, 1], style, color=color, label=f"r={r}: {name}")
            bad = ~np.isfinite(rows[:, 1])
            if bad.any():
                top = np.nanmax(rows[:, 1]) if (~bad).any() else 1.0
                axes[0].semilogx(rows[bad, 0], np.full(bad.sum(), top), "x", color=color, ms=10, mew=2)
            axes[2].loglog(rows[:, 0], rows[:, 2], style, color=color, label=f"r={r}: {name}")
    for ax in axes:
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].set_xlabel("multiplier k")
    axes[0].set_ylabel("held-out NLL (nats/token)")
    axes[0].set_title("(a) Eq. 2: loss along both paths (×: diverged)")
    axes[0].legend(fontsize=7)
    axes[2].set_xlabel("multiplier k")
    axes[2].set_ylabel("median per-layer SDR over the run")
    axes[2].set_title("(c) SDR: Prop. 4 predicts ∝ 1/k (η) and flat (α)")
    axes[2].legend(fontsize=7)
    ax = axes[1]
    ap = result["alpha_path"]
    rs = _alpha_star_panel(ax, ap, "α*(r) on the α-scaling path")
    if len(rs):
        xx = np.geomspace(rs.min(), rs.max(), 50) if len(rs) > 1 else rs
        ax.loglog(xx, 256 * np.sqrt(xx), ":", color="C3", label="Variant I: 256√r")
        ax.loglog(xx, xx, ":", color="gray", label="heuristic α = r")
        ax.set_xticks(rs, [f"{r:g}" for r in rs])
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("rank r")
    ax.set_ylabel("α*")
    ax.set_title("(b) Eq. 3: optimal α against rank")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_calibration(result: dict, path: str | Path) -> Path:
    """Per-layer α from ``calibrate``: trace and λ_max criteria against Corollary 1 and Variant I.

    Args:
        result: :func:`~signal_drift.calibrate.calibrate` output (``calibration.json``).
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
    _save(fig, path)
    return path
