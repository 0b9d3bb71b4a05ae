"""The training figures: a run's loss curves and per-layer signal/drift, and a sweep's Eq. 2/3 paths.

Kept out of ``signal_drift.train``'s namespace so that importing training does not load
matplotlib.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from ..plotting import alpha_star_panel, alpha_star_seeds_panel, errorbar_over_seeds, save_figure  # noqa: E402

__all__ = [
    "plot_train_loss",
    "plot_update_norms",
    "plot_scaling_paths",
    "plot_alpha_star_seeds",
    "plot_alpha_eta_grid",
    "plot_base_edge",
]


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
    save_figure(fig, path)
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
    save_figure(fig, path)
    return path


def plot_scaling_paths(result: dict, path: str | Path) -> Path:
    """Eq. 2 and Eq. 3 of a training sweep: loss and SDR along both paths, and α*(r).

    Args:
        result: the ``sweep.json`` content
            (:meth:`~signal_drift.train.sweep.TrainSweepResult.to_json`).
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
            if len(rows) < 2:  # not run (--paths), or only the shared base run
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
    rs = alpha_star_panel(ax, ap, "α*(r) on the α-scaling path")
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
    save_figure(fig, path)
    return path


def plot_alpha_star_seeds(summary: dict, path: str | Path) -> Path:
    """Finding III over seeds on the α path (``eq3.png``).

    (a) held-out NLL against α per rank (mean and 95 % interval over seeds), (b) α*(r) per seed,
    their geometric mean and the Eq. 3 fit.

    Args:
        summary: the ``sweep.json`` content; uses ``over_seeds.finding_3``
            (:func:`~signal_drift.sweep.alpha_star_over_seeds`).
        path: the PNG to write.
    """
    path = Path(path)
    f3 = summary["over_seeds"]["finding_3"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    ranks = list(f3["cells"])
    for i, r in enumerate(ranks):
        cells = f3["cells"][r]
        errorbar_over_seeds(ax, [float(a) for a in cells], cells.values(), ms=4,
                            color=plt.get_cmap("plasma")(i / max(len(ranks), 1)), label=f"r={r}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("α (η fixed)")
    ax.set_ylabel("held-out NLL (nats/token)")
    ax.set_title(f"(a) the α path per rank: mean and 95 % interval over {len(f3['seeds'])} seeds", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    alpha_star_seeds_panel(ax, f3)
    ax.set_xlabel("rank r")
    ax.set_ylabel("α*")
    ax.set_title("\n".join(textwrap.wrap(f"(b) Eq. 3 over seeds: {f3['verdict']}", 90)), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def _at(cell: dict, rank: int, alpha: float, lr: float) -> bool:
    return cell["rank"] == rank and cell["alpha"] == alpha and cell["lr"] == lr


def plot_alpha_eta_grid(summary: dict, records: list[dict], path: str | Path) -> Path:
    """Finding I on the α path's (α, η) grid (``eq1.png``, with ``alpha_path_lrs`` and seeds).

    (a) held-out NLL against η per α, mean and 95 % interval over seeds (the first rank);
    (b) the best NLL over η against α per rank, mean and 95 % interval over seeds.

    Args:
        summary: the ``sweep.json`` content; uses ``config`` and ``over_seeds.finding_1``.
        records: the sweep's records (``sweep.jsonl``).
        path: the PNG to write.
    """
    from ..replicates import over_seeds

    path = Path(path)
    cfg, f1 = summary["config"], summary["over_seeds"]["finding_1"]
    r0, lrs = cfg["ranks"][0], f1["lrs"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    alphas = sorted({rec["cell"]["alpha"] for rec in records if rec["cell"]["rank"] == r0})
    for i, a in enumerate(alphas):
        cells = [
            over_seeds([rec["heldout_nll"] for rec in records if _at(rec["cell"], r0, a, lr)]) for lr in lrs
        ]
        color = plt.get_cmap("viridis")(i / max(len(alphas) - 1, 1))
        errorbar_over_seeds(ax, lrs, cells, ms=4, color=color, label=f"α={a:g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate η")
    ax.set_ylabel("held-out NLL (nats/token)")
    ax.set_title(f"(a) r={r0}: NLL against η per α, mean and 95 % interval over seeds", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, (r, cells) in enumerate(f1["cells"].items()):
        errorbar_over_seeds(ax, [float(a) for a in cells], cells.values(), color=f"C{i}", label=f"r={r}")
    ax.set_xscale("log")
    ax.set_xlabel("α")
    ax.set_ylabel("best held-out NLL over η")
    e, b = f1["eta_star_slope"]["interval"], f1["best_loss_slope"]["interval"]
    title = "(b) Finding I"
    if e and b:
        title += (
            f": slope of log η* vs log α {e['estimate']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}]; best NLL "
            f"per doubling of α {b['estimate']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}] (95 %, seeds)"
        )
    edge = f1.get("eta_star_bounds")
    if edge:
        title += f"; left out of both: {edge['cells']} of {edge['of']} (seed, α) whose η* is a bound"
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    for a in axes:
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_base_edge(summary: dict, path: str | Path) -> Path:
    """Adam's edge ratio and the drift share along each rank's base run (``sweep.json``'s ``edge``)."""
    path = Path(path)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.3))
    for i, (r, e) in enumerate(sorted(summary["edge"].items(), key=lambda kv: int(kv[0]))):
        c = e["sharpness"]
        x = np.asarray(c["step"], float) + 1  # step 0 (before the first update) at 1
        for key, style, lab in (
            ("edge_ratio", "o-", "Adam: η·λ_max(P⁻¹H_θ)/38"),
            ("gd_ratio", "s:", "GD: η·λ_max(H_θ)/2"),
        ):
            y = np.asarray(c[key], float)
            ok = np.isfinite(y) & (y > 0)
            ax.loglog(x[ok], y[ok], style, color=f"C{i}", ms=3, lw=1, label=f"r={r}, {lab}")
        f = np.asarray(c["drift_fraction"], float)
        ok = np.isfinite(f)
        bx.semilogx(x[ok], f[ok], "o-", color=f"C{i}", ms=3, lw=1, label=f"r={r}")
    ax.axhline(1.0, color="k", lw=1)
    ax.set_xlabel("step + 1 (step 0: v_A = 0, P_A = ε)")
    ax.set_title(
        "base run (α0, η_FFT): ratio to each optimizer's edge (unconverged values not drawn)", fontsize=9
    )
    ax.legend(fontsize=7)
    bx.set_xlabel("step + 1")
    bx.set_ylabel("drift share of λ_max(P⁻¹H_θ)")
    bx.set_title("drift's share at the top preconditioned eigenvector", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return path
