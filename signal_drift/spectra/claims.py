"""Figure 8's claims in words, each with the number of a run that confirms or refutes it.

:func:`summarize` reads a :func:`~signal_drift.spectra.experiment.run_spectra` summary (the
``spectra.json`` content) and returns one line per claim: (a) the trace rule (Prop. 3) and the
compression of ``λ_max`` at ``α ≈ r``, (b) ``λ_max(H_signal)`` against ``α²ρ·λ_max(H)``,
(c) purification and negative curvature, (d) the slopes 2 and 1 (Prop. 4).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["summarize"]


def summarize(s: dict) -> list[str]:
    """Human summary: each claim of Figure 8 with the number that confirms or refutes it."""
    lines = []
    al = s["alphas"]
    star = int(np.argmin([abs(math.log(a / s["alpha_star_variant_ii"])) for a in al]))
    if s.get("trace_signal_mc_interval"):
        band = s["trace_signal_mc_interval"][star]
        pr = s["trace_rule_predicted"][star]
        ok = band["low"] <= pr <= band["high"]
        lines.append(
            f"(a) trace rule at α={al[star]:g}: E_A tr H_signal = {band['estimate']:.5g}"
            f" [{band['low']:.5g}, {band['high']:.5g}] (95 %, {s['a_draws']} draws) vs α²ρ·tr H = {pr:.5g}"
            f" — {'inside the interval' if ok else 'OUTSIDE the interval'};"
            f" this draw of A: {s['trace_signal'][star]:.5g}"
        )
    lm = s["lambda_max_fft"]
    j = int(np.argmin([abs(math.log(a / s["rank"])) for a in al]))
    lj = s["lambda_max_lora"][j]
    lines.append(
        f"(a) compression at α≈r ({al[j]:g}): λ_max(H_θ) = {lj:.4g} vs λ_max(H) = {lm:.4g}"
        f" (×{lj / lm:.3g}) — {'confirmed' if lj < lm else 'REFUTED'}"
    )
    ratio = [s["lambda_max_signal"][i] / (a * a * s["rho"] * lm) for i, a in enumerate(al)]
    lines.append(
        f"(b) λ_max(H_signal) / (α²ρ·λ_max(H)) = {min(ratio):.3g}…{max(ratio):.3g} (the trace ratio is 1"
        f" in expectation): {'above' if min(ratio) > 1 else 'not above'} 1, so λ_max(H_signal) reaches"
        f" λ_max(H) at α ≈ {1 / math.sqrt(max(ratio)):.2g}…{1 / math.sqrt(min(ratio)):.2g}"
        " × the trace-matched α*"
    )
    d2s, lmin = s["drift_to_signal"], s["lambda_min_lora"]
    top = [s["lambda_max_lora"][i] / s["lambda_max_signal"][i] for i in (0, -1)]
    identity = ", an identity at init" if s.get("slope_signal_measured") is not None else ""
    lines.append(
        f"(c) purification: ‖H_drift‖/‖H_signal‖ {d2s[0]:.3g} → {d2s[-1]:.3g} (slope"
        f" {s['slope_drift_to_signal']:.4f}{identity},"
        f" expected −1); λ_min(H_θ) {lmin[0]:.3g} → {lmin[-1]:.3g}"
        f" vs λ_min(H_signal) {s['lambda_min_signal'][-1]:.3g}; λ_max(H_θ)/λ_max(H_signal)"
        f" {top[0]:.3g} → {top[1]:.4g}"
    )
    neg = s["negative_mass_lora"]
    frac = s["negative_fraction_fft_interval"]
    fft_mass = s.get("negative_mass_fft_interval")
    fft_mass = f"negative mass of H {fft_mass['low']:.3f}…{fft_mass['high']:.3f} (95 %); " if fft_mass else ""
    lines.append(
        f"(c) negative curvature: a share {frac['low']:.3f}…{frac['high']:.3f} (95 %; SLQ estimate"
        f" {frac['estimate']:.3f}) of H's eigenvalues is < 0; {fft_mass}negative mass of H_θ {neg[0]:.3f} at"
        f" α={al[0]:g} → {neg[-1]:.3f} at α={al[-1]:g}, floor set by H_signal"
        f" {s['negative_mass_signal'][-1]:.3f}"
    )
    if s.get("slope_signal_measured") is not None:
        lines.append(
            f"(d) slopes, measured from products at each α: ‖H_signal‖ ∝ α^{s['slope_signal_measured']:.6f}"
            f" (expected 2), ‖H_drift‖ ∝ α^{s['slope_drift_measured']:.6f} (expected 1)"
        )
    else:
        lines.append(
            f"(d) slopes: ‖H_signal‖ ∝ α^{s['slope_signal']:.6f} (expected 2),"
            f" ‖H_drift‖ ∝ α^{s['slope_drift']:.6f} (expected 1)"
        )
    if s.get("autograd_check_residual"):
        worst = max(s["autograd_check_residual"].values())
        lines.append(f"check: assembled H_θ vs plain autograd H_θ, relative residual {worst:.1e}")
    return lines
