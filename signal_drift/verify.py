"""``python -m signal_drift.verify``: every proposition checked numerically on a fresh model.

Each check compares the toolkit's fast path against an independent reference (plain autograd
of the composed loss, closed forms, or simulation) in float64 and reports a
:class:`CheckResult`. Exit status 1 if any check fails, 2 on invalid arguments.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.func import grad
from tqdm.auto import tqdm

from ._errors import check_positive_int, run_cli
from .decomposition import block_indices, curvature, decompose_update
from .hessian import dense_hessian, fft_gradient, lora_gradient
from .lora import LoraProblem, attach_lora, init_theta
from .model import make_mlp, make_task
from .optim import adam_steps, gd_direction, muon_direction, sign_direction
from .settings import ConfigParser
from .theory import loglog_slope, signal_alignment, signal_trace_at_init, stability_threshold, trace_rule

__all__ = ["CheckResult", "CHECKS", "run_checks", "main"]

PROG = "python -m signal_drift.verify"


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check: measured error against its tolerance."""

    name: str
    error: float
    tolerance: float
    passed: bool
    detail: str = ""


def _result(name: str, error: float, tol: float, detail: str = "", ok: bool = True) -> CheckResult:
    return CheckResult(name, float(error), float(tol), bool(ok and error <= tol), detail)


@dataclass(frozen=True)
class Setup:
    """The fresh model the checks run on."""

    problem: LoraProblem
    theta0: dict[str, torch.Tensor]
    theta: dict[str, torch.Tensor]  # trained point, B != 0
    seed: int


def make_setup(dim: int, rank: int, seed: int, depth: int = 5, samples: int = 128) -> Setup:
    """5-layer SiLU MLP, synthetic task, LoRA on all layers; a trained point by 20 Adam steps."""
    model = make_mlp(dim, depth, seed=seed)
    task = make_task(dim, samples, seed=seed)
    problem = attach_lora(model, task.X, task.y, rank=rank, alpha=2.0 * rank)
    theta0 = init_theta(problem, seed)
    theta = adam_steps(problem.loss_theta, theta0, 20, 0.02)
    return Setup(problem, theta0, theta, seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def check_prop1_update(s: Setup) -> CheckResult:
    """Δw = Δw_signal + Δw_drift exactly, for a random step from a trained point."""
    gen = torch.Generator().manual_seed(s.seed)
    step = {k: 0.5 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in s.theta.items()}
    d = decompose_update(s.problem, s.theta, step)
    lay = s.problem.weight_layout
    err = _rel(lay.flatten(d.signal) + lay.flatten(d.drift), lay.flatten(d.delta_w))
    return _result("prop1_update", err, 1e-12)


def check_prop1_hessian(s: Setup) -> CheckResult:
    """Autograd H_θ = JᵀHJ + Σ g_k T_k at init and at a trained point."""
    errs = []
    for th in (s.theta0, s.theta):
        c = curvature(s.problem, th)
        ref = dense_hessian(s.problem.loss_theta, th)
        errs.append(_rel(c.signal.to_dense() + c.drift.to_dense(), ref))
    return _result("prop1_hessian", max(errs), 1e-9, f"init {errs[0]:.1e}, trained {errs[1]:.1e}")


def _alignment_check(name: str, optimizer: str, direction: Callable) -> Callable[[Setup], CheckResult]:
    def check(s: Setup) -> CheckResult:
        eta = 1e-2
        gt = lora_gradient(s.problem, s.theta)
        step = {k: -eta * v for k, v in direction(gt).items()}
        d = decompose_update(s.problem, s.theta, step, g=fft_gradient(s.problem, s.theta))
        expected = signal_alignment(gt, optimizer, eta)
        err = abs(d.align_signal - expected) / abs(expected)
        return _result(name, err, 1e-10, f"<Δw_signal,-g> = {d.align_signal:.6g}", ok=d.align_signal > 0)

    check.__doc__ = f"⟨Δw_signal, −g⟩ equals its closed form under {optimizer} and is ≥ 0."
    return check


def check_prop2_signal_psd(s: Setup) -> CheckResult:
    """H ⪰ 0 ⇒ H_signal ⪰ 0, on the convex one-layer linear task of the same width."""
    dim = s.problem.adapters[0].fan_in
    task = make_task(dim, 4 * dim, seed=s.seed)
    rank = s.problem.adapters[0].rank
    prob = attach_lora(make_mlp(dim, 1, seed=s.seed), task.X, task.y, rank=rank, alpha=2.0 * rank)
    theta = adam_steps(prob.loss_theta, init_theta(prob, s.seed), 20, 0.02)
    c = curvature(prob, theta)
    eig = torch.linalg.eigvalsh(c.signal.to_dense())
    err = max(0.0, float(-eig.min() / eig.max()))
    return _result("prop2_signal_psd", err, 1e-10, f"λ_min/λ_max = {float(eig.min() / eig.max()):.2e}")


def check_prop2_drift_pairs(s: Setup) -> CheckResult:
    """H_drift = [[0, C], [Cᵀ, 0]] in the (A, B) split; eigenvalues ±σ_i(C)."""
    D = curvature(s.problem, s.theta).drift.to_dense()
    a, b = block_indices(s.problem, "A"), block_indices(s.problem, "B")
    diag_blocks = max(float(D[a][:, a].abs().max()), float(D[b][:, b].abs().max()))
    sv = torch.linalg.svdvals(D[a][:, b])
    eig = torch.linalg.eigvalsh(D)
    expected = torch.cat([-sv, sv, torch.zeros(len(eig) - 2 * len(sv), dtype=D.dtype)]).sort().values
    err = max(diag_blocks, float((eig - expected).abs().max())) / float(sv.max())
    return _result("prop2_drift_pairs", err, 1e-10, f"λ ∈ [{float(eig.min()):.3g}, {float(eig.max()):.3g}]")


def check_prop2_counterexample(s: Setup) -> CheckResult:
    """Scalar w = w0 + b·a, a = b = g = 1, GD step η: ⟨Δw_drift, −g⟩ = −η²."""
    X, y = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    model = nn.Linear(1, 1, bias=False, dtype=torch.float64)
    prob = attach_lora(model, X, y, rank=1, alpha=1.0, loss_fn=lambda out, _: out.sum())
    theta = {"lora_A": torch.ones(1, 1, dtype=torch.float64), "lora_B": torch.ones(1, 1, dtype=torch.float64)}
    eta = 0.25
    step = {k: -eta * v for k, v in lora_gradient(prob, theta).items()}
    d = decompose_update(prob, theta, step, g=fft_gradient(prob, theta))
    return _result("prop2_counterexample", abs(d.align_drift + eta**2), 1e-14, f"= {d.align_drift:.6g}")


def check_prop3_trace_rule(s: Setup, draws: int = 2000) -> CheckResult:
    """Monte Carlo over A: mean tr(H_signal) = α²ρ tr(H) within 4 standard errors.

    At ``B = 0``, ``H`` does not depend on ``A`` and ``tr(J_BᵀHJ_B) = s² Σ_l tr(K_l AᵀA)`` with
    ``K_l[j, j'] = Σ_i H_ll[(i, j), (i, j')]``; the identity is checked on one draw against the
    signal operator, then the draws are cheap.
    """
    prob = s.problem
    c = curvature(prob, s.theta0)
    H = c.H.to_dense()
    lay = prob.weight_layout
    K, traces = {}, {}
    for a in prob.adapters:
        sl = lay.slice(a.name)
        Hl = H[sl, sl].reshape(a.fan_out, a.fan_in, a.fan_out, a.fan_in)
        K[a.name] = torch.einsum("ijik->jk", Hl)
        traces[a.name] = float(torch.trace(H[sl, sl]))

    identity_err = abs(signal_trace_at_init(prob, s.theta0, K) - float(torch.trace(c.signal.to_dense())))
    identity_err /= abs(float(torch.trace(c.signal.to_dense())))
    vals = np.array([signal_trace_at_init(prob, init_theta(prob, 10_000 + i), K) for i in range(draws)])
    pred = trace_rule(prob, traces)
    se = vals.std(ddof=1) / math.sqrt(draws)
    err = abs(vals.mean() - pred) / abs(pred)
    tol = 4 * se / abs(pred)
    ok = identity_err < 1e-10 and tol < 0.05
    detail = f"MC {vals.mean():.5g} ± {se:.2g} vs α²ρ·trH = {pred:.5g} ({draws} draws)"
    return _result("prop3_trace_rule", err, tol, detail, ok=ok)


def _norms_at_init(s: Setup, alphas: Sequence[float]) -> tuple[list[float], list[float]]:
    ns, nd = [], []
    for alpha in alphas:
        c = curvature(s.problem.with_alpha(alpha), s.theta0)
        ns.append(float(torch.linalg.matrix_norm(c.signal.to_dense())))
        nd.append(float(torch.linalg.matrix_norm(c.drift.to_dense())))
    return ns, nd


_ALPHAS = (1.0, 4.0, 16.0)


def check_prop4_signal_slope(s: Setup) -> CheckResult:
    """log–log slope of ‖H_signal‖_F against α is 2 at init."""
    ns, _ = _norms_at_init(s, _ALPHAS)
    slope = loglog_slope(_ALPHAS, ns)
    return _result("prop4_signal_slope", abs(slope - 2), 1e-8, f"slope {slope:.10f}")


def check_prop4_drift_slope(s: Setup) -> CheckResult:
    """log–log slope of ‖H_drift‖_F against α is 1 at init (g is α-independent at B = 0)."""
    _, nd = _norms_at_init(s, _ALPHAS)
    slope = loglog_slope(_ALPHAS, nd)
    return _result("prop4_drift_slope", abs(slope - 1), 1e-8, f"slope {slope:.10f}")


def check_prop4_update_scaling(s: Setup) -> CheckResult:
    """One sign-Adam step from a fixed state: Δw_signal ∝ αη, Δw_drift ∝ αη², SDR ∝ 1/η, α-free."""
    direction = sign_direction(lora_gradient(s.problem, s.theta))
    etas, alphas = (1e-3, 2e-3, 4e-3), (2.0, 8.0, 32.0)

    def probe(alpha: float, eta: float):
        return decompose_update(
            s.problem.with_alpha(alpha), s.theta, {k: -eta * v for k, v in direction.items()}
        )

    be = [probe(8.0, e) for e in etas]
    ba = [probe(a, 2e-3) for a in alphas]
    got = {
        "signal~η": loglog_slope(etas, [d.norm_signal for d in be]),
        "drift~η": loglog_slope(etas, [d.norm_drift for d in be]),
        "sdr~η": loglog_slope(etas, [d.sdr for d in be]),
        "signal~α": loglog_slope(alphas, [d.norm_signal for d in ba]),
        "drift~α": loglog_slope(alphas, [d.norm_drift for d in ba]),
        "sdr~α": loglog_slope(alphas, [d.sdr for d in ba]),
    }
    want = {"signal~η": 1, "drift~η": 2, "sdr~η": -1, "signal~α": 1, "drift~α": 1, "sdr~α": 0}
    err = max(abs(got[k] - want[k]) for k in want)
    return _result("prop4_update_scaling", err, 1e-8, ", ".join(f"{k} {v:+.3f}" for k, v in got.items()))


def check_lemma1_stability(s: Setup) -> CheckResult:
    """GD on the (exactly quadratic) linear task: the empirical stability edge is 2/λ_max."""
    dim = s.problem.adapters[0].fan_in
    task = make_task(dim, 4 * dim, seed=s.seed)
    prob = attach_lora(make_mlp(dim, 1, seed=s.seed), task.X, task.y, rank=1)
    th = init_theta(prob, s.seed)
    lam = float(torch.linalg.eigvalsh(curvature(prob, th).H.to_dense()).max())
    w0 = {k: v.detach() for k, v in prob.weights(th).items()}
    g = grad(prob.loss_w)
    start = float(prob.loss_w(w0))

    def diverged(etas: torch.Tensor, steps: int = 2000) -> torch.Tensor:
        # GD on the real loss for a whole grid of learning rates at once (vmap over η).
        w = {k: v.expand(len(etas), *v.shape).clone() for k, v in w0.items()}
        batched_grad = torch.func.vmap(g)
        for _ in range(steps):
            gw = batched_grad(w)
            w = {k: w[k] - etas.view(-1, 1, 1) * gw[k] for k in w}
        return ~(torch.func.vmap(prob.loss_w)(w) < start)

    lo, hi = 0.5 * stability_threshold(lam), 1.5 * stability_threshold(lam)
    for _ in range(2):  # two rounds of a 33-point grid, the second zoomed into the edge
        etas = torch.linspace(lo, hi, 33, dtype=torch.float64)
        bad = diverged(etas)
        first = int(torch.nonzero(bad)[0]) if bad.any() else len(etas) - 1
        lo, hi = float(etas[max(first - 1, 0)]), float(etas[first])
    edge = 0.5 * (lo + hi)
    err = abs(edge - stability_threshold(lam)) / stability_threshold(lam)
    return _result(
        "lemma1_stability", err, 2e-3, f"edge {edge:.6g} vs 2/λ_max {stability_threshold(lam):.6g}"
    )


CHECKS: dict[str, Callable[[Setup], CheckResult]] = {
    "prop1_update": check_prop1_update,
    "prop1_hessian": check_prop1_hessian,
    "prop2_signal_gd": _alignment_check("prop2_signal_gd", "gd", gd_direction),
    "prop2_signal_adam": _alignment_check("prop2_signal_adam", "sign", sign_direction),
    "prop2_signal_muon": _alignment_check("prop2_signal_muon", "muon", muon_direction),
    "prop2_signal_psd": check_prop2_signal_psd,
    "prop2_drift_pairs": check_prop2_drift_pairs,
    "prop2_counterexample": check_prop2_counterexample,
    "prop3_trace_rule": check_prop3_trace_rule,
    "prop4_signal_slope": check_prop4_signal_slope,
    "prop4_drift_slope": check_prop4_drift_slope,
    "prop4_update_scaling": check_prop4_update_scaling,
    "lemma1_stability": check_lemma1_stability,
}


@dataclass(frozen=True)
class _Settings:
    """The flags of ``python -m signal_drift.verify``: the arguments of :func:`run_checks`.

    Attributes:
        rank: LoRA rank r, 1..dim.
    """

    dim: int = 8
    rank: int = 2
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`~signal_drift.InputError` naming the first invalid field."""
        check_positive_int("dim", self.dim)
        check_positive_int("rank", self.rank, self.dim)


def run_checks(dim: int = 8, rank: int = 2, seed: int = 0, progress: bool = False) -> list[CheckResult]:
    """Run every check of :data:`CHECKS` on a fresh model; returns the results in order."""
    _Settings(dim, rank, seed).validate()
    setup = make_setup(dim, rank, seed)
    out = []
    for name, fn in tqdm(CHECKS.items(), disable=not progress, desc="verify", leave=False):
        out.append(fn(setup))
        assert out[-1].name == name
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    p = ConfigParser(_Settings, prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument(
        "--json", action="store_true", help="print a JSON list of {name, error, tolerance, passed}"
    )
    cfg, args = p.parse_config(argv)
    torch.set_default_dtype(torch.float64)
    results = run_checks(cfg.dim, cfg.rank, cfg.seed, progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps([{k: v for k, v in asdict(r).items() if k != "detail"} for r in results]))
    else:
        print(f"signal-drift verify: 5-layer SiLU MLP, d={cfg.dim}, r={cfg.rank}, seed={cfg.seed}, float64")
        print(f"{'check':<22} {'error':>10} {'tolerance':>10}  {'pass':<4}  detail")
        for r in results:
            mark = "yes" if r.passed else "NO"
            print(f"{r.name:<22} {r.error:>10.2e} {r.tolerance:>10.2e}  {mark:<4}  {r.detail}")
        n_ok = sum(r.passed for r in results)
        print(f"{n_ok} passed, {len(results) - n_ok} failed")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    run_cli(main, prog=PROG)
