"""Figure 8's four panels, drawn from a run's ``summary`` and ``arrays``.

(a) LoRA compresses the FFT spectrum and the trace follows ``α²ρ·tr H`` (Prop. 3); (b) the trace
rule against ``λ_max``; (c) the drift injects negative curvature and a large α purifies it;
(d) ``‖H_signal‖ ∝ α²``, ``‖H_drift‖ ∝ α`` (Prop. 4). The inputs are a
:class:`~signal_drift.spectra.experiment.SpectraResult`'s ``summary`` and ``arrays``, or the
``spectra.json`` and ``spectra_arrays.npz`` the CLI writes. The claims in words, with the numbers
that confirm or refute them, are :func:`~signal_drift.spectra.claims.summarize`.

Kept out of ``signal_drift.spectra``'s namespace so that importing the engine does not load
matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..plotting import save_figure  # also selects the Agg backend

__all__ = ["plot_fig8", "plot_lm_fig8"]


def _per_decade(nodes, weights, grid, sigma=0.12):
    """Eigenvalues per decade on ``grid`` (log10 λ), Gaussian-broadened in log space."""
    pos = nodes > 0
    ln = np.where(pos, np.log10(np.where(pos, nodes, 1.0)), np.nan)
    k = np.exp(-0.5 * ((grid[None, None, :] - ln[..., None]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    k = np.nan_to_num(k)
    return (weights[..., None] * k).sum(1).mean(0)


def _panel_a(ax, s, arr):
    al = np.array(s["alphas"])
    lam = s["lambda_max_fft"]
    top = max(lam, float(np.nanmax(s["lambda_max_lora"])))
    grid = np.linspace(np.log10(top) - 7, np.log10(top) + 0.5, 400)
    P = s["params_fft"]
    d = P * _per_decade(arr["slq_nodes_fft"], arr["slq_weights_fft"], grid)
    ax.plot(10**grid, d, color="k", lw=2.2, label=f"H (FFT, {P} params; SLQ)")
    ymax = float(d.max())
    ax.axvline(lam, color="k", ls=":", lw=1)
    picks = sorted({0, int(np.argmin(abs(np.log(al / s["rank"])))),
                    int(np.argmin(abs(np.log(al / s["alpha_star_variant_ii"])))), len(al) - 1})  # fmt: skip
    cmap = plt.get_cmap("viridis")
    slq_lora = "slq_nodes_lora" in arr  # matrix-free mode: SLQ densities instead of full spectra
    Pt = s["params_lora"]
    for i in picks:
        if not np.isfinite(s["lambda_max_lora"][i]):
            continue
        if slq_lora:
            dd = Pt * _per_decade(arr["slq_nodes_lora"][i], arr["slq_weights_lora"][i], grid)
        else:
            e = arr["eig_lora"][i]
            dd = _per_decade(e[None, :], np.ones((1, len(e))), grid)
        c = cmap(i / max(len(al) - 1, 1))
        ax.plot(
            10**grid,
            dd,
            color=c,
            lw=1.4,
            label=f"H_θ, α={al[i]:g} ({Pt} params{'; SLQ' if slq_lora else ''})",
        )
        ymax = max(ymax, float(dd.max()))
        ax.axvline(float(s["lambda_max_lora"][i]), color=c, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(1, 30 * ymax)
    ax.set_xlabel("eigenvalue λ > 0 (dotted: λ_max)")
    ax.set_ylabel("eigenvalues per decade")
    ax.set_title("(a) LoRA compresses the FFT spectrum (positive part)")
    txt = "tr H = {:.4g}".format(s["trace_fft"])
    if s.get("trace_signal_mc_interval"):
        i = int(np.argmin(abs(np.log(al / s["alpha_star_variant_ii"]))))
        b = s["trace_signal_mc_interval"][i]
        txt += "\nα={:g}: E_A tr H_signal ∈ [{:.4g}, {:.4g}] (95 %)\n       α²ρ·tr H      = {:.4g}".format(
            al[i], b["low"], b["high"], s["trace_rule_predicted"][i]
        )
    ax.text(0.02, 0.97, txt, transform=ax.transAxes, va="top", fontsize=8, family="monospace")
    ax.legend(fontsize=7, loc="lower left")


def _panel_b(ax, s, arr):
    al = np.array(s["alphas"])
    rho = s["rho"]
    ax.loglog(al, s["trace_signal"], "o", color="C0", label="tr H_signal (this A)")
    if s.get("trace_signal_mc_interval"):
        band = s["trace_signal_mc_interval"]
        mc = np.array([b["estimate"] for b in band])
        err = np.array([[b["estimate"] - b["low"] for b in band], [b["high"] - b["estimate"] for b in band]])
        ax.errorbar(al, mc, yerr=err, fmt="s", mfc="none", color="C0", ms=7,
                    label="E_A tr H_signal (MC, 95 %)")  # fmt: skip
    if s["trace_rule_predicted"][0] is not None:
        ax.loglog(al, s["trace_rule_predicted"], "-", color="C0", label="α²ρ · tr H")
    ax.loglog(al, s["lambda_max_signal"], "o", color="C3", label="λ_max(H_signal)")
    ax.loglog(al, [a * a * rho * s["lambda_max_fft"] for a in al], "-", color="C3", label="α²ρ · λ_max(H)")
    ax.loglog(al, np.abs(s["lambda_max_lora"]), "x", color="C1", label="λ_max(H_θ)")
    ax.axhline(s["trace_fft"], color="C0", ls=":", lw=1)
    ax.axhline(s["lambda_max_fft"], color="C3", ls=":", lw=1)
    ax.axvline(s["alpha_star_variant_ii"], color="gray", ls="--", lw=1)
    ax.text(
        s["alpha_star_variant_ii"], ax.get_ylim()[0], " α* (α²ρ=1)", fontsize=7, color="gray", va="bottom"
    )
    ax.set_xlabel("α")
    ax.set_title(
        "(b) trace follows α²ρ·tr H; λ_max less strictly\n(dotted: FFT tr H and λ_max(H))", fontsize=10
    )
    ax.legend(fontsize=7)


def _panel_c(ax, s, arr):
    al = np.array(s["alphas"])
    ax.semilogx(al, s["negative_mass_lora"], "o-", color="C1", label="H_θ")
    if s.get("negative_mass_lora_interval"):  # SLQ estimate: draw its 95 % band
        band = s["negative_mass_lora_interval"]
        ax.fill_between(al, [b["low"] for b in band], [b["high"] for b in band], color="C1", alpha=0.2,
                        lw=0, label="H_θ, 95 % band (SLQ)")  # fmt: skip
    ax.semilogx(al, s["negative_mass_signal"], "s--", color="C0", label="H_signal")
    ax.axhline(0.5, color="C2", ls=":", lw=1, label="H_drift (±pairs: 0.5)")
    ax.set_ylim(-0.02, 0.55)
    ax.set_xlabel("α")
    ax.set_ylabel("negative spectral mass Σ|λ<0| / Σ|λ|")
    ax.set_title("(c) drift injects negative curvature; large α purifies")
    ax2 = ax.twinx()
    ax2.loglog(al, s["drift_to_signal"], "^-", color="C4", ms=4, label="‖H_drift‖/‖H_signal‖")
    ax2.set_ylabel("‖H_drift‖_F / ‖H_signal‖_F", color="C4")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")


def _panel_d(ax, s, arr):
    al = np.array(s["alphas"])
    # at init the slopes of the run's own S(α) = α²S₁, D(α) = αD₁ are identities: label the ones
    # measured from products evaluated at each α when the run has them
    ks, kd = ("slope_signal_measured", "slope_drift_measured") if s.get("slope_signal_measured") else (
        "slope_signal", "slope_drift")  # fmt: skip
    how = " (measured)" if ks.endswith("measured") else ""
    ax.loglog(al, s["norm_signal"], "o-", color="C0", label=f"‖H_signal‖_F  slope {s[ks]:.3f}{how}")
    ax.loglog(al, s["norm_drift"], "s-", color="C2", label=f"‖H_drift‖_F  slope {s[kd]:.3f}{how}")
    ax.loglog(al, s["lambda_max_lora"], "x", color="C1", label="λ_max(H_θ)")
    ax.loglog(al, s["lambda_max_signal"], "+", color="C3", ms=9, label="λ_max(H_signal)")
    ax.set_xlabel("α")
    ax.set_title("(d) signal ∝ α², drift ∝ α")
    ax.legend(fontsize=7)


_PANELS = {"a": _panel_a, "b": _panel_b, "c": _panel_c, "d": _panel_d}


def plot_fig8(summary: dict, arrays: dict, out_dir: str | Path) -> list[Path]:
    """Write ``fig8.png`` (four panels) and ``fig8a.png`` … ``fig8d.png``.

    Args:
        summary: the ``spectra.json`` content.
        arrays: ``slq_nodes_fft``, ``slq_weights_fft``, and ``eig_lora`` ([n_alpha, P]) or, in the
            matrix-free mode, ``slq_nodes_lora`` / ``slq_weights_lora`` ([n_alpha, probes, steps]).
        out_dir: output folder.

    Returns:
        The written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    for ax, fn in zip(axes.flat, _PANELS.values(), strict=True):
        fn(ax, summary, arrays)
    fig.suptitle(
        f"Figure 8 — {summary['depth']}-layer SiLU MLP, d={summary['dim']}, r={summary['rank']}, "
        f"N={summary['samples']}, {summary['point']}"
    )
    fig.tight_layout()
    paths = [out / "fig8.png"]
    save_figure(fig, paths[0])
    for key, fn in _PANELS.items():
        f, ax = plt.subplots(figsize=(6.5, 5))
        fn(ax, summary, arrays)
        f.tight_layout()
        paths.append(out / f"fig8{key}.png")
        save_figure(f, paths[-1])
    return paths


def plot_lm_fig8(summary: dict, path: str | Path) -> Path:
    """The LM Figure 8 from ``lm.json`` (:mod:`signal_drift.spectra.lm`); one PNG.

    (a) ``λ_max`` of ``H_θ``, ``H_signal`` and ``|λ_min|`` of ``H_θ`` against α, with the FFT
    ``λ_max(H)``; (b) ``‖H_drift‖_F / ‖H_signal‖_F`` with its bands and a ``1/α`` guide;
    (c) ``H_θ``'s negative spectral mass with its bands; (d) per layer, the trace rule
    ``E_A tr H_signal / α²ρ tr H`` at init with its bands. Init solid, trained dashed.
    """
    path = Path(path)
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    styles = {"init": ("C0", "-", "o"), "trained": ("C3", "--", "s")}
    for point, rec in summary["points"].items():
        col, ls, mk = styles.get(point, ("C2", ":", "^"))
        al = rec["alphas"]
        if not al:
            continue
        k = np.array([r["k"] for r in al])
        ax = axes[0]
        ax.plot(
            k, [r["H_theta"]["lambda_max"] for r in al], ls, color=col, marker=mk, label=f"λ_max(H_θ) {point}"
        )
        ax.plot(k, [r["signal_lambda_max"] for r in al], ls, color=col, marker="x", alpha=0.6,
                label=f"λ_max(H_signal) {point}")  # fmt: skip
        ax.plot(k, [abs(r["H_theta"]["lambda_min"]) for r in al], ls, color=col, marker="v", alpha=0.4,
                label=f"|λ_min(H_θ)| {point}")  # fmt: skip
        ax.axhline(rec["H_lambda_max"], color=col, lw=0.8, ls=":", label=f"λ_max(H), FFT, {point}")
        ax = axes[1]
        bands = [r["drift_over_signal_fro"] for r in al]
        est = np.array([b["estimate"] for b in bands])
        err = np.array([[b["estimate"] - b["low"], min(b["high"], 1e300) - b["estimate"]] for b in bands]).T
        slope = rec.get("drift_over_signal_slope", float("nan"))
        ax.errorbar(
            k, est, yerr=err, ls=ls, color=col, marker=mk, capsize=3, label=f"{point} (slope {slope:.2f})"
        )
        ax.plot(k, est[0] * k[0] / k, color="0.6", lw=0.8, ls=":")
        ax = axes[2]
        m = [r["H_theta"].get("negative_mass_interval") for r in al]
        if all(m):
            e = np.array([x["estimate"] for x in m])
            yerr = np.array([[x["estimate"] - x["low"] for x in m], [x["high"] - x["estimate"] for x in m]])
            ax.errorbar(k, e, yerr=yerr, ls=ls, color=col, marker=mk, capsize=3, label=point)
    axes[0].set(xscale="log", yscale="log", xlabel="α / α_ref", title="(a) extreme curvature")
    axes[1].set(xscale="log", yscale="log", xlabel="α / α_ref", title="(b) ‖H_drift‖_F / ‖H_signal‖_F (95 %)")
    axes[2].set(
        xscale="log", xlabel="α / α_ref", ylabel="Σ|λ<0| / Σ|λ|", title="(c) negative mass of H_θ (95 %)"
    )
    layers = summary["points"].get("init", {}).get("layers") or []
    rules = [(x["name"], x["trace_rule_ratio"]) for x in layers if x.get("trace_rule_ratio")]
    ax = axes[3]
    if rules:
        y = np.arange(len(rules))
        e = np.array([r["estimate"] for _, r in rules])
        lo = np.array([r["estimate"] - r["low"] for _, r in rules])
        hi = np.array([r["high"] - r["estimate"] for _, r in rules])
        ax.errorbar(e, y, xerr=[lo, hi], fmt="o", color="C0", capsize=3)
        ax.axvline(1.0, color="k", lw=0.8)
        wide = [i for i, (_, r) in enumerate(rules) if r["high"] > 3 or r["low"] < -0.5]
        ax.set_xlim(-0.5, 3.0)
        for i in wide:  # bands beyond the axis: marked, not hidden
            ax.annotate("band beyond axis", (2.95, y[i]), fontsize=6, ha="right", va="bottom", color="0.4")
        names = [
            n.replace("model.layers.", "L").replace(".self_attn", "").replace(".mlp", "") for n, _ in rules
        ]
        ax.set_yticks(y, names, fontsize=7)
    unresolved = sum(1 for x in layers if "trace_rule" in x and not x.get("trace_rule_ratio"))
    title = "(d) trace rule per layer, init (95 %)" + (f"; {unresolved} unresolved" if unresolved else "")
    ax.set(xlabel="E_A tr H_signal / α²ρ tr H_ll", title=title)
    axes[0].legend(fontsize=6, loc="upper left")
    for ax in axes[1:3]:
        ax.legend(fontsize=7)
    head = f"Figure 8 on a causal LM: {len(summary['layers'])} LoRA layers, |θ| = {summary['params_theta']}"
    fig.suptitle(f"{head}, {summary['tokens']} tokens; {summary['adapter']}", fontsize=9)
    save_figure(fig, path)
    return path
