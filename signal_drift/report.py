"""README numbers rendered from the committed experiment JSON, so the two cannot drift apart.

Every number the README quotes from an experiment sits between ``<!-- begin: NAME -->`` and
``<!-- end: NAME -->`` and is written by the fragment function ``NAME`` below from the files
under ``experiments/``. ``python -m signal_drift.report`` rewrites the README in place;
``--check`` exits 1 when the README differs from what the JSON renders (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["FRAGMENTS", "render", "main"]

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"(<!-- begin: ([\w-]+) -->\n)(.*?)(<!-- end: \2 -->)", re.S)


def _load(root: Path, rel: str) -> dict:
    return json.loads((root / "experiments" / rel).read_text())


def _nearest(values: list[float], target: float) -> int:
    return min(range(len(values)), key=lambda i: abs(math.log(values[i] / target)))


def _band(b: dict, spec: str = ".4g") -> str:
    return f"[{b['low']:{spec}}, {b['high']:{spec}}]"


def _fig8_column(s: dict) -> list[str]:
    al = s["alphas"]
    i = _nearest(al, s["alpha_star_variant_ii"])
    j = _nearest(al, s["rank"])
    band, pred = s["trace_signal_mc_interval"][i], s["trace_rule_predicted"][i]
    ok = "✔" if band["low"] <= pred <= band["high"] else "✘"
    ratio = s["lambda_max_signal"][i] / (al[i] ** 2 * s["rho"] * s["lambda_max_fft"])
    frac = s["negative_fraction_fft_interval"]
    counts = sorted(set(s["negative_count_lora"]))
    count = f"{counts[0]} = P_θ/2 at every α" if counts == [s["params_lora"] // 2] else f"{counts}"
    return [
        f"E_A tr H_signal ∈ {_band(band)} vs {pred:.4g} {ok}",
        f"{s['lambda_max_lora'][j]:.3g} vs {s['lambda_max_fft']:.3g} {'✔' if s['lambda_max_lora'][j] < s['lambda_max_fft'] else '✘'}",
        f"{ratio:.3g}: λ_max matched at α = {1 / math.sqrt(ratio):.2f}·α*",
        f"{s['drift_to_signal'][0]:.3g} → {s['drift_to_signal'][-1]:.3g}",
        f"{s['negative_mass_lora'][0]:.3f} → {s['negative_mass_lora'][-1]:.3f} ({s['negative_mass_signal'][-1]:.3f})",
        count,
        f"{s['lambda_min_fft'] / s['lambda_max_fft']:.3f}",
        f"{_band(frac, '.2f')} (plain SLQ {frac['estimate']:.3f})",
        f"{_band(s['negative_mass_fft_interval'], '.3f')}",
        f"{s['slope_signal_measured']:.6f}, {s['slope_drift_measured']:.6f} ✔",
        f"{max(s['autograd_check_residual'].values()):.1e}",
    ]


def fig8_table(root: Path) -> str:
    """The Figure 8 claims at d = 64, random and pre-trained ``W0``."""
    a, b = _load(root, "spectra_dim64/spectra.json"), _load(root, "spectra_dim64_pretrained/spectra.json")
    star, r, al = a["alpha_star_variant_ii"], a["rank"], a["alphas"]
    rows = [
        f"(a) trace rule at α = α* = {star:g}: E_A tr H_signal ({a['a_draws']} draws of A, 95 % interval) vs α²ρ·tr H",
        f"(a) compression at α = r = {r}: λ_max(H_θ) vs λ_max(H)",
        "(b) λ_max(H_signal) / (α²ρ·λ_max(H)) at α* (the trace ratio is 1)",
        f"(c) ‖H_drift‖/‖H_signal‖ from α = {al[0]:g} to {al[-1]:g} (∝ 1/α: an identity at init)",
        f"(c) negative mass of H_θ, α = {al[0]:g} → {al[-1]:g} (floor: H_signal), exact",
        "(c) negative eigenvalues of H_θ (exact count)",
        "(c) λ_min(H)/λ_max(H) (Lanczos, converged)",
        "(c) share of H's eigenvalues < 0: SLQ 95 % interval (bias included)",
        "(c) negative mass of H: SLQ 95 % interval",
        "(d) log–log slopes of ‖H_signal‖, ‖H_drift‖, measured from products at each α",
        "assembled H_θ vs plain autograd H_θ at every α (relative)",
    ]
    head = (
        "| claim (Fig. 8) | random W0 (`make run`) | W0 pre-trained, shifted task (`--pretrain-steps 1000`) |"
    )
    lines = [head, "|---|---|---|"]
    lines += [
        f"| {row} | {x} | {y} |" for row, x, y in zip(rows, _fig8_column(a), _fig8_column(b), strict=True)
    ]
    return "\n".join(lines) + "\n"


def fig8_dim256(root: Path) -> str:
    """The d = 256 run in one paragraph."""
    s = _load(root, "spectra_dim256/spectra.json")
    al = s["alphas"]
    i, j = _nearest(al, s["alpha_star_variant_ii"]), _nearest(al, s["rank"])
    band, pred = s["trace_signal_mc_interval"][i], s["trace_rule_predicted"][i]
    m0, m1 = s["negative_mass_lora_interval"][0], s["negative_mass_lora_interval"][-1]
    ratio = s["lambda_max_signal"][i] / (al[i] ** 2 * s["rho"] * s["lambda_max_fft"])
    return (
        f"FFT H {s['params_fft']:,}², H_θ {s['params_lora']:,}²; trace rule E_A tr H_signal ∈"
        f" {_band(band, '.5g')} vs α²ρ·tr H = {pred:.5g}; compression ×{s['lambda_max_lora'][j] / s['lambda_max_fft']:.3f}"
        f" at α = r; slopes measured {s['slope_signal_measured']:.6f} / {s['slope_drift_measured']:.6f};"
        f" ‖H_drift‖/‖H_signal‖ {s['drift_to_signal'][0]:.3g} → {s['drift_to_signal'][-1]:.3g}; negative"
        f" eigenvalues of H_θ exactly {s['negative_count_lora'][0]:,} = P_θ/2 at every α (Sylvester); negative"
        f" mass of H_θ {_band(m0, '.3f')} → {_band(m1, '.3f')} (SLQ, 95 %; floor {s['negative_mass_signal'][-1]:.3f},"
        f" exact); λ_max(H_signal)/(α²ρλ_max(H)) = {ratio:.3g} at α*; assembled vs autograd H_θ"
        f" {max(s['autograd_check_residual'].values()):.1e} at every α.\n"
    )


def fig2_table(root: Path) -> str:
    """Figure 2 (d = 64) and the MLP sweep: each claim, its number, a verdict."""
    d, sw = _load(root, "dynamics_dim64/dynamics.json"), _load(root, "sweep_dim32/sweep.json")
    cps = d["sdr_probes"]["checkpoints"]

    def path(name: str) -> str:
        cells = []
        for k, c in d[name].items():
            cells.append(
                f"k={k}: diverged @ step {c['diverged_step']}"
                if c["diverged"]
                else f"k={k}: {c['best_loss']:.3f}"
            )
        return ", ".join(cells)

    def best(name: str) -> tuple[str, float]:
        ok = {k: c["best_loss"] for k, c in d[name].items() if not c["diverged"]}
        k = min(ok, key=ok.get)
        return k, ok[k]

    ke, le = best("eta_scaling")
    ka, la = best("alpha_scaling")
    fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    conv = d["lambda_max_convergence"]
    rows = [
        (
            "one-step SDR ∝ 1/η from a fixed state (Prop. 4)",
            f"slope {d['sdr_slope_eta_identity']:.4f}",
            "an identity of the construction (Δθ ∝ η with the direction fixed): a check of the code, not a measurement",
        ),
        (
            "one-step SDR independent of α (Prop. 4), consistent probe: same network function at kα0 (B → B/k, Adam's"
            " m_B → k·m_B, v_B → k²·v_B)",
            f"slopes {fmt(d['sdr_slope_alpha_consistent'])} at steps {cps}",
            "reproduced where Prop. 4 applies (exactly 0 at B = 0, tested to 1e-10); at trained checkpoints the"
            " B·ΔA part of the signal does not grow with α, so SDR falls to its closed form ‖k·S_B + S_A‖/(k‖Dr‖),"
            " not as 1/k",
        ),
        (
            "the same with (A, B) and Adam's state frozen, gradient recomputed at kα0",
            f"slopes {fmt(d['sdr_slope_alpha_frozen_state'])}",
            "not a test of Prop. 4: where B ≠ 0 this probe changes the network function (also for sign-SGD, which has no state)",
        ),
        (
            "trajectory SDR",
            f"η-path slope {d['trajectory_sdr_slope_eta']:.2f}, α-path slope {d['trajectory_sdr_slope_alpha']:+.2f}",
            "direction as predicted, far flatter than −1 along trajectories (B grows ∝ ηt)",
        ),
        (
            "Finding II: large-k η-scaling diverges, α-scaling stays stable",
            f"η-path: {path('eta_scaling')}; α-path: {path('alpha_scaling')}",
            (
                "reproduced"
                if any(c["diverged"] for c in d["eta_scaling"].values())
                and not any(c["diverged"] for c in d["alpha_scaling"].values())
                else "not reproduced"
            )
            + " at seed 0; over seeds: see the seeds table",
        ),
        (
            "Finding II: α-scaling reaches lower loss",
            f"best η-path {le:.3f} (k = {ke}) vs best α-path {la:.3f} (k = {ka})",
            ("reproduced" if la < le else "**not reproduced**")
            + " at seed 0; over seeds: see the seeds table",
        ),
        (
            "λ_max(H_θ) along both paths (Lanczos)",
            f"{conv['converged']} of {conv['measured']} converged, relative"
            f" residual ≤ {conv['max_relative_residual_converged']:.1e}",
            "unconverged values would be NaN with a warning",
        ),
    ]
    r4 = "4" if "4" in sw["eta_star"] else next(iter(sw["eta_star"]))
    es = sw["eta_star"][r4]
    falls = (
        all(es[b] <= es[a] for a, b in zip(list(es), list(es)[1:], strict=False))
        and es[list(es)[-1]] < es[list(es)[0]]
    )
    rows.append(
        (
            "Finding I: η*(α) falls as α grows",
            f"r = {r4}: " + ", ".join(f"α={a}: {e:g}" for a, e in es.items()),
            "reproduced" if falls else "not monotone",
        )
    )
    rows.append(
        (
            "Finding I: best loss improves with α",
            "best held-out loss per α at r = "
            + r4
            + ": "
            + ", ".join(f"{v:.3f}" for v in sw["best_loss"][r4].values())
            + " (`fig1.png` b)",
            "reproduced (one seed)"
            if min(sw["best_loss"][r4], key=sw["best_loss"][r4].get) == list(sw["best_loss"][r4])[-1]
            else f"**not reproduced**: the best α is {min(sw['best_loss'][r4], key=sw['best_loss'][r4].get)}, not the"
            " largest (seed 0; over seeds: see the seeds table)",
        )
    )
    fit = sw["fit"]
    a_star = ", ".join(
        f"r={r}: {a:g}" + (" (edge)" if r in sw.get("alpha_star_edge", {}) else "")
        for r, a in sw["alpha_star"].items()
    )
    rows.append(
        (
            "Finding III: α* = c·r^k with k ≈ ½",
            f"α*(r) = {a_star}; fit over r = {', '.join(fit['ranks'])}: k = {fit['k']:.2f}, the grid cells allow"
            f" k ∈ [{fit['k_grid_range'][0]:.2f}, {fit['k_grid_range'][1]:.2f}]",
            "**not identifiable at seed 0**: with η tuned per α the optimum over α is nearly flat at MLP scale; over "
            "seeds: see the seeds table",
        )
    )
    lines = ["| claim | measured (MLP) | verdict |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def fig2_dim256(root: Path) -> str:
    """The d = 256 dynamics in one sentence list."""
    d = _load(root, "dynamics_dim256/dynamics.json")
    div = [f"k = {k} (step {c['diverged_step']})" for k, c in d["eta_scaling"].items() if c["diverged"]]
    stable = not any(c["diverged"] for c in d["alpha_scaling"].values())
    best = {
        p: min(((c["best_loss"], k) for k, c in d[p].items() if not c["diverged"]))
        for p in d
        if p.endswith("_scaling")
    }
    fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    conv = d["lambda_max_convergence"]
    return (
        f"η-scaling diverges at {' and '.join(div) or 'no k'} while α-scaling is"
        f" {'stable at every k' if stable else 'not stable at every k'}; trajectory SDR slope along α"
        f" {d['trajectory_sdr_slope_alpha']:.3f}, along η {d['trajectory_sdr_slope_eta']:.2f}; best losses:"
        f" η-path {best['eta_scaling'][0]:.3f} at k = {best['eta_scaling'][1]}, α-path {best['alpha_scaling'][0]:.3f}"
        f" at k = {best['alpha_scaling'][1]}; one-step α-probes at steps {d['sdr_probes']['checkpoints']}:"
        f" consistent {fmt(d['sdr_slope_alpha_consistent'])}, frozen-state {fmt(d['sdr_slope_alpha_frozen_state'])};"
        f" {conv['converged']} of {conv['measured']} λ_max(H_θ) values converged (relative residual ≤"
        f" {conv['max_relative_residual_converged']:.1e}).\n"
    )


def calibrate_table(root: Path) -> str:
    """Per-layer α from ``calibrate`` at r = 8."""
    c = _load(root, "calibrate_r8/calibration.json")
    L = c["layers"]
    r = c["config"]["rank"]
    fin = lambda key: [d[key] for d in L if math.isfinite(d[key])]  # noqa: E731
    lam, tr, gauss = fin("alpha_lambda"), fin("alpha_trace"), fin("alpha_gaussian")
    nan_tr = [d for d in L if not math.isfinite(d["alpha_trace"])]
    why = []
    for d in nan_tr:
        unresolved = [
            name
            for name, v, se in (
                ("tr H_ll", d["tr_H"], d["tr_H_se"]),
                ("tr J0ᵀH_llJ0", d["tr_S"], d["tr_S_se"]),
            )
            if abs(v) < 2.3 * se
        ]
        why.append(
            f"`{d['name'].split('.', 2)[-1]}`, {' and '.join(unresolved) or 'traces of opposite sign'} not"
            f" resolved from 0 (estimates and standard errors: tr H_ll {d['tr_H']:.3g} (SE {d['tr_H_se']:.2g}),"
            f" tr J0ᵀH_llJ0 {d['tr_S']:.2g} (SE {d['tr_S_se']:.2g}))"
        )
    widths = [d["alpha_trace_high"] / d["alpha_trace_low"] for d in L if math.isfinite(d["alpha_trace"])]
    rows = [
        (
            f"α by λ_max ({len(lam)} of {len(L)} converged)",
            f"{min(lam):.0f} – {max(lam):.0f}",
            f"Lanczos residual ≤ {max(max(d['lam_H_residual'], d['lam_S_residual']) for d in L):.0e} relative",
        ),
        (
            f"α by trace ({len(tr)} layers)",
            f"{min(tr):.0f} – {max(tr):.0f}",
            f"95 % intervals span ×{min(widths):.2f} to ×{max(widths):.2f} (high/low); NaN: "
            + ("; ".join(why) if why else "none"),
        ),
        ("Corollary 1, √(r/σ²) with A's empirical σ²", f"{min(gauss):.0f} – {max(gauss):.0f}", "≈ √(3nr)"),
        ("Variant I, 256√r", f"{256 * math.sqrt(r):.0f}", ""),
    ]
    lines = [f"| per layer ({len(L)}) | range | note |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {n} |" for a, b, n in rows]
    gaps = [
        d["alpha_lambda"] / d["alpha_trace"]
        for d in L
        if math.isfinite(d["alpha_lambda"]) and math.isfinite(d["alpha_trace"])
    ]
    lines.append("")
    lines.append(
        f"α_λ / α_tr per layer: median {c['gap_lambda_over_trace']:.2f}, range {min(gaps):.2f}–{max(gaps):.2f}."
    )
    return "\n".join(lines) + "\n"


def train_sweep_table(root: Path) -> str:
    """Eq. 2 on the offline Llama: held-out NLL per k, both paths, every rank."""
    s = _load(root, "train_sweep/sweep.json")
    ranks = list(s["paths"])
    ks = [row[0] for row in s["paths"][ranks[0]]["eta"]]
    best = {(r, p): min(row[1] for row in s["paths"][r][p]) for r in ranks for p in ("eta", "alpha")}
    mid = ranks[len(ranks) // 2]
    head = "| k | " + " | ".join(f"r={r} η-path | r={r} α-path" for r in ranks) + f" | SDR r={mid}: η / α |"
    lines = [head, "|" + "---|" * (2 + 2 * len(ranks))]
    for i, k in enumerate(ks):
        cells = []
        for r in ranks:
            for p in ("eta", "alpha"):
                v = s["paths"][r][p][i][1]
                cells.append(f"**{v:.3f}**" if v == best[(r, p)] else f"{v:.3f}")
        sdr = f"{s['paths'][mid]['eta'][i][2]:.0f} / {s['paths'][mid]['alpha'][i][2]:.0f}"
        lines.append(f"| {k:g} | " + " | ".join(cells) + f" | {sdr} |")
    return "\n".join(lines) + "\n"


def train_table(root: Path) -> str:
    """LoRA-α rules on the offline Llama: effective scale and final held-out NLL per rule and η."""
    runs = {}
    for f in sorted((root / "experiments" / "train").glob("*/metrics.json")):
        m = json.loads(f.read_text())
        runs[(m["config"]["scaling"], m["config"]["lr"])] = m
    names = {
        "rank": "heuristic α = r",
        "variant2": "Variant II √(3nr) per module",
        "calibrated": "measured by `calibrate` (λ_max), per module",
        "variant1": "Variant I 256√r",
    }
    lrs = sorted({lr for _, lr in runs})
    best = min(m["final_heldout_nll"] for m in runs.values())
    lines = [
        "| rule | effective scale | " + " | ".join(f"η = {lr:g}" for lr in lrs) + " |",
        "|---|---|" + "---|" * len(lrs),
    ]
    for rule, name in names.items():
        got = [runs.get((rule, lr)) for lr in lrs]
        any_run = next(m for m in got if m is not None)
        sc = list(any_run["scales"].values())
        scale = f"{min(sc):.3g}" if max(sc) - min(sc) < 1e-9 else f"{min(sc):.2g}–{max(sc):.3g}"
        cells = []
        for m in got:
            v = None if m is None else m["final_heldout_nll"]
            cells.append("—" if v is None else f"**{v:.3f}**" if v == best else f"{v:.3f}")
        lines.append(f"| {name} | {scale} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def train_sweep_eq3(root: Path) -> str:
    """The Eq. 3 fit on the α path of the offline-Llama sweep, in one bullet."""
    a = _load(root, "train_sweep/sweep.json")["alpha_path"]
    fit, star = a["fit"], a["alpha_star"]
    ratios = [v / (256 * math.sqrt(float(r))) for r, v in star.items()]
    edge = a.get("alpha_star_edge") or {}
    where = "all inside the grid" if not edge else f"at the grid edge for r = {', '.join(edge)}"
    return (
        f"- **Eq. 3 is not identifiable here.** α*(r) = {', '.join(f'{v:,.0f}' for v in star.values())} for"
        f" r = {', '.join(star)} ({where}): {min(ratios):.0f}–{max(ratios):.0f}× Variant I's 256√r; the fit gives"
        f" k = {fit['k']:.2f}, and with each α* known only to its grid cell the cells allow any k in"
        f" [{fit['k_grid_range'][0]:.2f}, {fit['k_grid_range'][1]:.2f}]. Three ranks on a ×4 grid cannot decide"
        " k ≈ ½: the study in [Finding III on the offline Llama](#finding-iii-on-the-offline-llama) takes"
        " ranks 1–64 on a ×2 grid over five seeds.\n"
    )


def llama_alpha_star(root: Path) -> str:
    """Finding III on the offline Llama over seeds: α*(r) per rank with intervals, and the fit."""
    path = root / "experiments" / "train_alpha_star" / "sweep.json"
    if not path.exists():
        return f"Not finished ({_progress(root, 'train_alpha_star/sweep.jsonl', [0, 1, 2, 3, 4])}).\n"
    t = json.loads(path.read_text())
    f3 = t["over_seeds"]["finding_3"]
    rows = [
        "| r | α grid | α* per seed | α* over seeds (geometric mean, 95 %) | ÷ 256√r | lowest mean NLL on the grid |",
        "|---|---|---|---|---|---|",
    ]
    for r, per in f3["alpha_star"].items():
        cells = f3["cells"][r]
        grid = [float(a) for a in cells]
        g = f3["alpha_star_geometric_mean"].get(r)
        each = ", ".join(f"{v:,.0f}" if math.isfinite(v) else "at an end" for v in per)
        gm = "n/a" if g is None else f"{g['estimate']:,.0f} [{g['low']:,.0f}, {g['high']:,.0f}]"
        ratio = "n/a" if g is None else f"{g['estimate'] / (256 * math.sqrt(float(r))):.2f}"
        a, best = min(
            cells.items(), key=lambda kv: kv[1]["mean"] if math.isfinite(kv[1]["mean"]) else math.inf
        )
        rows.append(
            f"| {r} | {grid[0]:,.0f} – {grid[-1]:,.0f} (×2) | {each} | {gm} | {ratio} | "
            f"{best['mean']:.3f} at α = {float(a):,.0f} |"
        )
    fit = f3["fit"]
    tail = (
        f"\nEq. 3 over {len(f3['seeds'])} seeds (a log–log fit per seed, Student-t over seeds): "
        + (
            f"k = {_iv(fit['k'], '.3f')}, c = {_iv(fit['c'], ',.0f')} (pooled k = {fit['k_pooled']:.3f}). "
            if "k" in fit
            else f"no fit ({fit['skipped']}). "
        )
        + f"Verdict on k ≈ ½: **{f3['verdict']}**.\n"
    )
    return "\n".join(rows) + "\n" + tail


def lm_fig8_table(root: Path) -> str:
    """Figure 8 on the offline Llama (``spectra lm``): the four questions at init and at a trained adapter."""
    s = _load(root, "spectra_lm/lm.json")
    pts = s["points"]
    names = list(pts)

    def cell(point: str, what: str) -> str:
        p, c = pts[point], s["claims"][point]
        al = p["alphas"]
        if what == "trace":
            if "trace_rule_layers" not in c:
                return "— (Prop. 3 is a statement at init)"
            n, ok, un = (
                c["trace_rule_layers"],
                c["trace_rule_layers_covering_1"],
                c["trace_rule_layers_unresolved"],
            )
            ratios = [x["trace_rule_ratio"]["estimate"] for x in p["layers"] if x.get("trace_rule_ratio")]
            rng = f"; ratios {min(ratios):.2f}–{max(ratios):.2f}" if ratios else ""
            return f"band covers 1 in {ok} of {n - un} resolved layers ({un} unresolved){rng}"
        if what == "lambda":
            r = c["lambda_signal_over_fft_at_k1"]
            mark = "✔" if r < 1 else "✘"
            return f"λ_max(H_signal) / λ_max(H) = {r:.3g} {mark} (λ_max(H) = {p['H_lambda_max']:.3g})"
        if what == "ratio":
            lo, hi = al[0]["drift_over_signal_fro"], al[-1]["drift_over_signal_fro"]
            tag = "identity of S = k²S₁, D = kD₁" if c["slope_is_identity"] else "measured"
            return (
                f"{_band(lo, '.3g')} → {_band(hi, '.3g')}; slope {c['drift_over_signal_slope']:.2f} ({tag})"
            )
        if what == "purify":
            if "negative_mass_falls" not in c:
                return "not resolved (λ_min not converged)"
            a, b = c["negative_mass_smallest_k"], c["negative_mass_largest_k"]
            if c["negative_mass_falls"]:
                return f"{_band(a, '.3f')} → {_band(b, '.3f')} ✔ falls"
            if b["low"] > a["high"]:
                return f"{_band(a, '.3f')} → {_band(b, '.3f')} ✘ rises"
            return (
                f"not resolved at this budget (bands {_band(a, '.2f')} → {_band(b, '.2f')} overlap); "
                f"estimates {a['estimate']:.3f} → {b['estimate']:.3f}"
            )
        if what == "layers":
            lam = [x.get("H_theta_lambda_max") for x in p.get("layers") or []]
            ok = [v for v in lam if v is not None and math.isfinite(v)]
            if not lam or lam[0] is None:
                return "not computed"
            return (
                f"{min(ok):.3g} – {max(ok):.3g} ({len(ok)} of {len(lam)} converged)"
                if ok
                else "none converged"
            )
        if what == "crossing":
            above = [r["k"] for r in al if r["H_theta"]["lambda_max"] > p["H_lambda_max"]]
            return f"from k = {above[0]:g} on" if above else f"never (k ≤ {al[-1]['k']:g})"
        if what == "identity":
            return f"{max(r['identity_residual'] for r in al):.1e}"
        return ""

    ks = [r["k"] for r in pts[names[0]]["alphas"]]
    rows = [
        ("Trace rule per layer: E_A tr H_signal / α²ρ tr H_ll (95 %)", "trace"),
        (f"λ_max compressed at standard α (k = 1, α = {s['config']['rank']} = r)", "lambda"),
        ("λ_max(H_θ) above the FFT λ_max(H)", "crossing"),
        ("Per layer: λ_max of H_θ's diagonal block at k = 1 (Lanczos)", "layers"),
        (f"‖H_drift‖_F / ‖H_signal‖_F, k = {ks[0]:g} → {ks[-1]:g} (95 %)", "ratio"),
        (f"Larger α purifies H_θ: negative mass, k = {ks[0]:g} → {ks[-1]:g} (95 %)", "purify"),
        ("Prop. 1 measured: ‖(H_signal + H_drift − H_θ)V‖ / ‖H_θ V‖, max over α", "identity"),
    ]
    lines = ["| question | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cell(n, key) for n in names) + " |" for label, key in rows]
    lines.append("")
    lines.append(
        f"{len(s['layers'])} adapted layers, |θ| = {s['params_theta']}, |w| = {s['params_w']}, {s['tokens']} scored"
        f" tokens; trained point: {s['adapter']}; Lanczos values not converged (reported as missing):"
        f" {len(s['warnings'])}; run time {sum(s['timings'].values()):.0f} s."
    )
    return "\n".join(lines) + "\n"


def _observed(first, stable) -> str:
    """The interval the grid leaves for the breakdown multiplier."""
    if first is None:
        return f"> {stable:g} (none broke)"
    return f"≤ {first:g} (k = {first:g} broke first)" if stable is None else f"({stable:g}, {first:g}]"


def _yes(b: bool) -> str:
    return "yes" if b else "**no**"


def _edge_row(name: str, pred: dict, steps: str) -> str:
    from .edge import format_k

    alpha = format_k(pred["predicted_alpha"])
    return (
        f"| {name} | {steps} | {pred['max_edge_ratio']:.3g} | {pred['drift_fraction']:.2f} | "
        f"{format_k(pred['predicted_eta'])} | {_observed(pred['observed_eta'], pred['last_stable_eta'])} | "
        f"{_yes(pred['within_2_eta'])} | {alpha} | "
        f"{_observed(pred['observed_alpha'], pred['last_stable_alpha'])} | {_yes(pred['within_2_alpha'])} |"
    )


def edge_table(root: Path) -> str:
    """Adam's edge: the breakdown multiplier each path's base run predicts, beside the observed one."""
    from .edge import format_k

    head = [
        "| model | base-run records used | max η·λ_max(P⁻¹H_θ)/38 | drift share there | predicted k, η-path "
        "| observed, η-path | within ×2 | predicted range of k, α-path | observed, α-path | within ×2 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows, late = [], []
    for dim in (64, 256):
        d = _load(root, f"dynamics_dim{dim}/dynamics.json")
        ep = d["edge_prediction"]
        e, a = ep["early"], ep["all_steps"]
        rows.append(_edge_row(f"MLP d = {dim}", e, f"steps {e['records_used'][0]}–{e['records_used'][-1]}"))
        late.append(
            f"MLP d = {dim}: k_η ≈ {format_k(a['predicted_eta'])}, k_α in {format_k(a['predicted_alpha'])}"
        )
    t = _load(root, "train_sweep/sweep.json")
    for r, e in sorted(t.get("edge", {}).items(), key=lambda kv: int(kv[0])):
        p, a = e["early"], e["all_steps"]
        if "error" in p:
            continue
        rows.append(
            _edge_row(f"offline Llama r = {r}", p, f"steps {p['records_used'][0]}–{p['records_used'][-1]}")
        )
        late.append(
            f"Llama r = {r}: k_η ≈ {format_k(a['predicted_eta'])}, k_α in {format_k(a['predicted_alpha'])}"
        )
    return (
        "\n".join(head + rows)
        + "\n\nFrom every record of the base run instead (later steps included): "
        + "; ".join(late)
        + ".\n"
    )


def _iv(iv: dict | None, spec: str = "+.3f") -> str:
    return "n/a" if iv is None else f"{iv['estimate']:{spec}} [{iv['low']:{spec}}, {iv['high']:{spec}}]"


def _progress(root: Path, rel: str, seeds: list[int]) -> str:
    """How many of a seeded study's cells are in its committed JSONL, per seed."""
    counts: dict = {}
    for line in (root / "experiments" / rel).read_text().splitlines():
        if line.strip():
            s = json.loads(line)["cell"].get("seed")
            counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"seed {s}: {counts.get(s, 0)} cells" for s in seeds)


def _finding_1_rows(o: dict, model: str, loss: str, over: str = "") -> list[str]:
    """Finding I's two rows: the slopes over seeds (the verdict is on their sign) and what they leave out."""
    e, b = o["eta_star_slope"], o["best_loss_slope"]
    n = sum(math.isfinite(v) for v in e["per_seed"])
    left = o.get("eta_star_bounds")
    note = (
        f"; left out: {left['cells']} of {left['of']} cells whose η* is a bound"
        if left and left["cells"]
        else ""
    )
    over = f", {over}" if over else ""
    return [
        f"| I: η* falls as α grows | {model} | log–log slope of η* vs α{over}: {_iv(e['interval'])} ({n} seeds"
        f"{note}) | {o['verdicts']['finding_1_eta_star_falls']} (the sign) |",
        f"| I: the best {loss} improves with α | {model} | slope of the best held-out {loss} vs log₂ α: "
        f"{_iv(b['interval'], '+.4f')} | {o['verdicts']['finding_1_loss_improves_with_alpha']} |",
    ]


def _fit3(f: dict, c_spec: str) -> str:
    """The Eq. 3 fit over seeds in a table cell: k and c, and the ranks left out of it."""
    if "k" not in f:
        return f"no fit: {f['skipped']}"
    out = f"k = {_iv(f['k'])}, c = {_iv(f['c'], c_spec)}"
    if f.get("ranks_left_out"):
        out += f"; fitted over r = {', '.join(f['ranks'])} (r = {', '.join(f['ranks_left_out'])}: no α* at some seed, at a grid end or next to a diverged run)"
    return out


def findings_seeds(root: Path) -> str:
    """Findings I–III over seeds, with intervals and verdicts (or the study's progress)."""
    rows = ["| finding | model | measured over seeds (95 % interval) | verdict |", "|---|---|---|---|"]
    notes = []
    for dim in (32, 64):
        if not (root / "experiments" / f"sweep_dim{dim}" / "sweep.jsonl").exists():
            continue
        rel = f"sweep_dim{dim}/sweep.json"
        o = _load(root, rel).get("over_seeds") if (root / "experiments" / rel).exists() else None
        if not o:
            notes.append(
                f"MLP d = {dim} study not finished ({_progress(root, f'sweep_dim{dim}/sweep.jsonl', [0])})"
            )
            continue
        n, model = len(o["seeds"]), f"MLP d = {dim}"
        rows += _finding_1_rows(o, model, "loss", "mean over ranks")
        rows.append(
            f"| III: α* = c·r^k with k ≈ ½ | {model}, r = {', '.join(o['alpha_star'])} | {_fit3(o['fit'], '.3g')} "
            f"({n} seeds) | {o['verdicts']['finding_3_k_is_half']} |"
        )
    for dim in (64, 256):  # the five-seed study where it exists, else Figure 2's run with its seeds
        rel = next(
            (r for r in (f"dynamics_dim{dim}_seeds", f"dynamics_dim{dim}")
             if (root / "experiments" / r / "dynamics.json").exists()),
            None,
        )  # fmt: skip
        d = _load(root, f"{rel}/dynamics.json") if rel else {}
        dyn = d.get("over_seeds")
        if not dyn:
            continue
        ks = d["config"]["multipliers"]
        model = f"MLP d = {dim}, k = {ks[0]:g}–{ks[-1]:g}"
        fmt = lambda v: "–" if v is None else f"{v:g}"  # noqa: E731
        rows.append(
            f"| II: α-scaling reaches a lower loss | {model} (`dynamics`) | best α-path − best η-path final "
            f"loss: {_iv(dyn['best_alpha_minus_best_eta'], '+.4f')} ({len(dyn['seeds'])} seeds) | "
            f"{dyn['verdicts']['finding_2_alpha_reaches_lower_loss']} |"
        )
        rows.append(
            f"| II: α-scaling tolerates larger k | {model} | first k that broke down per seed (–: none): η-path "
            f"{', '.join(map(fmt, dyn['breakdown_k']['eta']))}; α-path "
            f"{', '.join(map(fmt, dyn['breakdown_k']['alpha']))} | "
            f"{dyn['verdicts']['finding_2_alpha_tolerates_larger_k']} |"
        )
    path = root / "experiments" / "train_eta_alpha" / "sweep.json"
    f1 = json.loads(path.read_text())["over_seeds"].get("finding_1") if path.exists() else None
    if f1:
        cfg = json.loads(path.read_text())["config"]
        etas = ", ".join(f"{x:g}" for x in f1["lrs"])
        rows += _finding_1_rows(
            f1, f"offline Llama, r = {', '.join(map(str, cfg['ranks']))}, η ∈ {{{etas}}}", "NLL"
        )
    else:
        notes.append("Finding I on the Llama not measured yet (experiments/train_eta_alpha)")
    t = _load(root, "train_sweep/sweep.json")
    o = t.get("over_seeds")
    if o:
        later = o["alpha_breaks_later"]
        rows.append(
            f"| II: α-scaling reaches a lower loss | offline Llama, r = {', '.join(o['ranks'])} | best α-path "
            f"NLL − best η-path NLL: {_iv(o['best_alpha_minus_best_eta'], '+.4f')} ({len(o['seeds'])} seeds) "
            f"| {o['verdicts']['finding_2_alpha_reaches_lower_loss']} |"
        )
        rows.append(
            f"| II: α-scaling tolerates larger k | offline Llama | α-path broke down later at every rank "
            f"for {later['later']} of {later['seeds']} seeds | "
            f"{o['verdicts']['finding_2_alpha_tolerates_larger_k']} |"
        )
    else:
        notes.append(
            f"Llama seeds study not finished ({_progress(root, 'train_sweep/sweep.jsonl', [0, 1, 2])})"
        )
    path = root / "experiments" / "train_alpha_star" / "sweep.json"
    if path.exists():
        t3 = json.loads(path.read_text())
        f3 = t3["over_seeds"]["finding_3"]
        rows.append(
            f"| III: α* = c·r^k with k ≈ ½ | offline Llama, r = {', '.join(f3['alpha_star'])}, "
            f"η = {t3['config']['base_lr']:g} | {_fit3(f3['fit'], ',.0f')} ({len(f3['seeds'])} seeds) | "
            f"{f3['verdict']} |"
        )
    else:
        progress = _progress(root, "train_alpha_star/sweep.jsonl", [0, 1, 2, 3, 4])
        notes.append(f"Llama α*(r) study not finished ({progress})")
    out = "\n".join(rows) + "\n"
    if notes:
        out += "\nStill running (resumable; rerun the command to continue): " + "; ".join(notes) + ".\n"
    return out


FRAGMENTS: dict[str, Callable[[Path], str]] = {
    "findings-seeds": findings_seeds,
    "llama-alpha-star": llama_alpha_star,
    "edge-table": edge_table,
    "lm-fig8-table": lm_fig8_table,
    "train-sweep-eq3": train_sweep_eq3,
    "train-table": train_table,
    "fig8-table": fig8_table,
    "fig8-dim256": fig8_dim256,
    "fig2-table": fig2_table,
    "fig2-dim256": fig2_dim256,
    "calibrate-table": calibrate_table,
    "train-sweep-table": train_sweep_table,
}


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every ``<!-- begin: NAME -->…<!-- end: NAME -->`` block re-rendered from JSON.

    Raises:
        KeyError: for a block whose ``NAME`` has no fragment.
    """
    return _BLOCK.sub(lambda m: m.group(1) + FRAGMENTS[m.group(2)](root) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    """``python -m signal_drift.report [--check] [--readme README.md]``."""
    p = argparse.ArgumentParser(prog="python -m signal_drift.report", description=__doc__.splitlines()[0])
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the README differs from the JSON")
    a = p.parse_args(argv)
    old = a.readme.read_text()
    new = render(old, a.readme.resolve().parent)
    if a.check:
        if new != old:
            print(f"{a.readme}: numbers differ from experiments/*.json; run python -m signal_drift.report")
            return 1
        return 0
    a.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
