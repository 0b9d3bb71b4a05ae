"""Figure 1, drawn from the ``sweep.json`` content and the sweep's records.

(a) loss against η per α, (b) best loss against α per rank (Finding I), (c) α*(r) and its fit
(Finding III, Eq. 3). Kept out of ``signal_drift.sweep``'s namespace so that importing the
sweep does not load matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from ..plotting import alpha_star_panel, alpha_star_seeds_panel, errorbar_over_seeds, save_figure  # noqa: E402

__all__ = ["plot_fig1"]


def plot_fig1(analysis: dict, records: list[dict], out_dir: str | Path) -> Path:
    """Write ``fig1.png``: (a) loss vs η per α, (b) best loss vs α per rank, (c) α*(r) fit.

    Args:
        analysis: the ``sweep.json`` content (:meth:`~signal_drift.sweep.SweepAnalysis.to_json`,
            with or without ``config``).
        records: the sweep's records (``sweep.jsonl``).
        out_dir: output folder.
    """
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
    ax.set_title(f"(a) loss vs η per α (r={r_mid}, seed {records[0]['cell'].get('seed', 0)}); gaps: diverged")
    ax.legend(fontsize=7)
    ax = axes[1]
    seeds = analysis.get("over_seeds")
    for i, r in enumerate(ranks):
        color = plt.get_cmap("plasma")(i / max(len(ranks) - 1, 1))
        if seeds:  # mean over seeds with its 95 % Student-t interval
            cells = seeds["cells"].get(str(r), {})
            errorbar_over_seeds(ax, [float(a) for a in cells], cells.values(), color=color, label=f"r={r}")
            ax.set_xscale("log")
        else:
            best = analysis["best_loss"].get(str(r), {})
            ax.semilogx([float(a) for a in best], list(best.values()), "o-", color=color, label=f"r={r}")
    ax.set_xlabel("α")
    ax.set_ylabel(f"best {metric.replace('_', ' ')} over η")
    ax.set_title(
        f"(b) best loss against α (Finding I): mean and 95 % interval over {len(seeds['seeds'])} seeds"
        if seeds
        else "(b) best loss against α (Finding I)",
        fontsize=9 if seeds else None,
    )
    ax.legend(fontsize=7)
    ax = axes[2]
    if seeds:
        alpha_star_seeds_panel(ax, seeds, variant_i=False)
        ax.set_title(f"(c) optimal α against rank (Finding III), {len(seeds['seeds'])} seeds", fontsize=9)
    else:
        rs = alpha_star_panel(ax, analysis, "α*(r) (grid argmin)")
        if len(rs):
            ax.loglog(rs, rs, ":", color="gray", label="α = r (heuristic)")
            ax.set_xticks(rs, [f"{r:g}" for r in rs])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title("(c) optimal α against rank (Finding III)")
    ax.set_xlabel("rank r")
    ax.set_ylabel("α*")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "fig1.png"
    save_figure(fig, path)
    return path
