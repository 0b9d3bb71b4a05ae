"""Training dynamics of LoRA seen through the signal–drift decomposition (Fig. 2, Prop. 4).

- :func:`train_lora`: optimizer steps on ``θ`` recording, per step, the loss, ``‖Δw_signal‖``,
  ``‖Δw_drift‖``, SDR, ``⟨Δw_signal, −g⟩``, ``⟨Δw_drift, −g⟩`` and, every ``K`` steps,
  ``λ_max(H_θ)`` (matrix-free Lanczos to a tolerance, with its residual and a converged flag;
  NaN and a warning where it did not converge) against the GD stability bound ``2/η``
  (Lemma 1) and, for Adam, its preconditioned sharpness against Adam's edge with the signal and
  drift shares (:mod:`signal_drift.edge`). Divergence (NaN/Inf or loss blow-up) stops the run
  and is reported with its step.
- :func:`sdr_probes` (:mod:`.probes`): one-step SDR probes from common checkpoints, varying only
  ``η`` (slope −1, an identity) or only ``α``, by the frozen-state and the consistent
  (function-preserving) probe (docs/theory.md#prop-4, its Adam paragraph included).
- :func:`run_dynamics`: the η-scaling path ``(α0, k η0)`` against the α-scaling path
  ``(k α0, η0)`` for every multiplier ``k`` (paper Eq. 2), and where the base run's edge ratio
  predicts each path to break down beside where it did (:func:`~signal_drift.edge.predict_breakdown`).

CLI: ``python -m signal_drift.dynamics``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, get_args

import numpy as np
import torch
from torch.func import grad_and_value
from tqdm.auto import tqdm

from .._errors import InputError, check_choice, check_positive_float, check_positive_int
from ..decomposition import (
    DriftOperator,
    MappingJacobian,
    SignalOperator,
    decompose_update,
    decomposed_lora_hessian,
    pullback,
)
from ..edge import Sharpness, adam_preconditioner, columns, from_columns, predict_breakdown, sharpness
from ..hessian import fft_hessian
from ..lora import LoraProblem, attach_lora, init_theta
from ..model import make_mlp, make_task
from ..optim import OptimizerName, OptState, init_opt_state, step_direction
from ..theory import loglog_slope
from .probes import SdrProbe, consistent_alpha_point, sdr_probes

__all__ = [
    "CurvatureRecord",
    "Run",
    "train_lora",
    "SdrProbe",
    "sdr_probes",
    "consistent_alpha_point",
    "DynamicsConfig",
    "DynamicsResult",
    "run_dynamics",
    "broke_down",
    "edge_summary",
    "paths_over_seeds",
]

TensorDict = dict[str, torch.Tensor]


class CurvatureRecord(NamedTuple):
    """``λ_max(H_θ)`` at one step, as Lanczos returned it (a named tuple: ``record[0]`` is the step).

    Attributes:
        step: 0-based step (before the update).
        value: ``λ_max``, NaN when the pair did not converge.
        residual: true residual ``‖H_θ v − λ v‖`` of the returned pair.
        converged: residual within the solver's acceptance (``EigResult.converged``).
        matvecs: operator products used.
        warning: the solver's message when it did not converge, else None.
    """

    step: int
    value: float
    residual: float
    converged: bool
    matvecs: int
    warning: str | None = None


@dataclass
class Run:
    """One training run: per-step records and its outcome.

    Attributes:
        loss: loss before each step ``[steps]`` (plus the final loss at the end).
        norm_signal, norm_drift, sdr, align_signal, align_drift: per step.
        lambda_max: a :class:`CurvatureRecord` every ``curvature_every`` steps.
        sharpness: Adam only: a :class:`~signal_drift.edge.Sharpness` at the same steps, with the
            preconditioner of that step's update (its second moment includes the step's gradient).
        diverged_step: 1-based step at which the run diverged, or None.
        checkpoints: ``{step: (θ, OptState)}`` at the requested steps.
        theta: the final ``θ`` (None if the run diverged).
    """

    loss: list[float] = field(default_factory=list)
    norm_signal: list[float] = field(default_factory=list)
    norm_drift: list[float] = field(default_factory=list)
    sdr: list[float] = field(default_factory=list)
    align_signal: list[float] = field(default_factory=list)
    align_drift: list[float] = field(default_factory=list)
    lambda_max: list[CurvatureRecord] = field(default_factory=list)
    sharpness: list[Sharpness] = field(default_factory=list)
    diverged_step: int | None = None
    checkpoints: dict[int, tuple[TensorDict, OptState]] = field(default_factory=dict)
    theta: TensorDict | None = None

    @property
    def diverged(self) -> bool:
        """Whether the run diverged."""
        return self.diverged_step is not None

    def summary(self) -> dict:
        """JSON-ready outcome: final/best loss, divergence, mean SDR."""
        finite = [x for x in self.loss if math.isfinite(x)]
        sdr = [x for x in self.sdr if math.isfinite(x)]
        return {
            "initial_loss": self.loss[0] if self.loss else float("nan"),
            "final_loss": self.loss[-1] if not self.diverged else float("nan"),
            "best_loss": min(finite) if finite else float("nan"),
            "diverged": self.diverged,
            "diverged_step": self.diverged_step,
            "sdr_mean": float(np.exp(np.mean(np.log(sdr)))) if sdr else float("nan"),
        }


def train_lora(
    problem: LoraProblem,
    theta0: Mapping[str, torch.Tensor],
    *,
    steps: int,
    lr: float,
    optimizer: OptimizerName = "adam",
    curvature_every: int = 0,
    curvature_early: int = 0,
    lanczos_steps: int = 300,
    lanczos_tol: float = 1e-9,
    blowup: float = 1e3,
    checkpoints: Sequence[int] = (),
    progress: bool = False,
    desc: str = "train",
) -> Run:
    """Train ``θ`` for ``steps`` optimizer steps, recording the signal–drift view of every step.

    Args:
        problem: the LoRA problem (α, γ, r per adapter).
        theta0: starting point.
        steps: number of steps.
        lr: learning rate ``η``.
        optimizer: ``adam``, ``sgd``, ``signsgd`` or ``muon``.
        curvature_every: every this many steps, ``λ_max(H_θ)`` by Lanczos (0: never); with Adam
            also its preconditioned sharpness (:class:`~signal_drift.edge.Sharpness`).
        curvature_early: also at each of the first this many steps (where runs diverge).
        lanczos_steps: cap on Lanczos steps for ``λ_max``.
        lanczos_tol: Lanczos stops when the top Ritz pair's residual estimate is below
            ``lanczos_tol · max|θ_i|``; the pair counts as converged when its true residual is
            within ``EigResult.accept`` (1e-6) of that scale.
        blowup: divergence when the loss exceeds ``blowup ×`` the initial loss (or is NaN/Inf).
        checkpoints: steps (0-based, before the step) at which ``(θ, state)`` is kept.
        progress: show a tqdm bar.
        desc: bar label.

    Returns:
        A :class:`Run`; a diverged run stops at the step where it diverged.
    """
    from ..spectra.lanczos import lanczos_eigs

    check_positive_int("steps", steps)
    check_positive_float("lr", lr)
    theta = {k: v.detach().clone() for k, v in theta0.items()}
    state = init_opt_state(theta)
    vg = grad_and_value(problem.loss_w)
    run = Run()
    loss0 = None
    for t in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        w = {k: v.detach() for k, v in problem.weights(theta).items()}
        G, value = vg(w)
        loss = float(value)
        loss0 = loss if loss0 is None else loss0
        run.loss.append(loss)
        if not math.isfinite(loss) or loss > blowup * loss0:
            run.diverged_step = t + 1
            return run
        if t in checkpoints:
            run.checkpoints[t] = ({k: v.clone() for k, v in theta.items()}, state)
        D, state = step_direction(optimizer, pullback(problem, theta, G), state)
        if (curvature_every and t % curvature_every == 0) or t < curvature_early:
            if optimizer == "adam":
                rec = _adam_sharpness(problem, theta, state, lr, t, lanczos_steps, lanczos_tol, desc)
                run.sharpness.append(rec)
                run.lambda_max.append(
                    CurvatureRecord(t, rec.lambda_max, rec.lambda_max_residual, math.isfinite(rec.lambda_max),
                                    rec.matvecs, next((w for w in rec.warnings if "λ_max(H_θ)" in w), None))
                )  # fmt: skip
            else:
                res = lanczos_eigs(
                    decomposed_lora_hessian(problem, theta), 1, "LA", steps=lanczos_steps, tol=lanczos_tol
                )
                vals, warn = res.checked(f"λ_max(H_θ) at step {t}")
                run.lambda_max.append(
                    CurvatureRecord(
                        t, float(vals[-1]), float(res.residuals[-1]), bool(res.converged[-1]), res.matvecs,
                        warn[0] if warn else None,
                    )
                )  # fmt: skip
        step = {k: -lr * d for k, d in D.items()}
        dec = decompose_update(problem, theta, step, g=G)
        run.norm_signal.append(dec.norm_signal)
        run.norm_drift.append(dec.norm_drift)
        run.sdr.append(dec.sdr)
        run.align_signal.append(dec.align_signal)
        run.align_drift.append(dec.align_drift)
        theta = {k: theta[k] + step[k] for k in theta}
        if not all(torch.isfinite(v).all() for v in theta.values()):
            run.diverged_step = t + 1
            return run
    final = float(problem.loss_theta(theta))
    run.loss.append(final)
    run.theta = theta
    if not math.isfinite(final) or final > blowup * loss0:
        run.diverged_step = steps
    return run


def _adam_sharpness(
    problem: LoraProblem,
    theta: TensorDict,
    state: OptState,
    lr: float,
    t: int,
    steps: int,
    tol: float,
    desc: str,
) -> Sharpness:
    """Adam's sharpness at ``θ`` with the preconditioner of the update about to be taken.

    ``H_θ = H_signal + H_drift`` through the MLP fast path (Prop. 1, tested against autograd
    elsewhere), so the two shares add up to the preconditioned sharpness by construction.
    """
    H = fft_hessian(problem, theta)
    S = SignalOperator(MappingJacobian(problem, theta), H)
    D = DriftOperator(problem, theta, H.gradient)
    P = adam_preconditioner(state.v, state.t, problem.theta_layout)
    return sharpness(
        S + D, D, P, lr, signal=S, step=t, lanczos_steps=steps, tol=tol, label=f"{desc} step {t}"
    )


@dataclass(frozen=True)
class DynamicsConfig:
    """Settings of :func:`run_dynamics` (the flags of ``python -m signal_drift.dynamics``).

    The settings ``dim``, ``rank``, ``depth``, ``samples``, ``seed`` mean the same in every config
    (:data:`signal_drift.settings.COMMON_HELP`).

    Attributes:
        steps: optimizer steps of every run.
        optimizer: the optimizer of every run.
        alpha0: base α (default: r).
        lr0: base learning rate η0.
        multipliers: the k of the η-scaling path (α0, k·η0) and the α-scaling path (k·α0, η0).
        curvature_every: λ_max(H_θ) (and, with Adam, the preconditioned sharpness) every K steps (0: off).
        curvature_early: the same at each of the first N steps too (0: off).
        lanczos_steps: cap on Lanczos steps per λ_max.
        lanczos_tol: Lanczos stops when the top pair's residual estimate is below tol·max|λ|.
        seeds: more seeds (task, base MLP, A init) at which both paths are run again, without
            curvature or probes, for Finding II over seeds (``over_seeds`` in the summary).
    """

    dim: int = 256
    rank: int = 4
    depth: int = 5
    samples: int = 1024
    steps: int = 100
    optimizer: OptimizerName = "adam"
    alpha0: float | None = None
    lr0: float = 1e-2
    multipliers: tuple[float, ...] = (1, 2, 4, 8, 16)
    curvature_every: int = 25
    curvature_early: int = 10
    lanczos_steps: int = 300
    lanczos_tol: float = 1e-9
    seeds: tuple[int, ...] = ()
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid field."""
        check_positive_int("dim", self.dim)
        check_positive_int("rank", self.rank, self.dim)
        for name in ("depth", "samples", "steps"):
            check_positive_int(name, getattr(self, name))
        check_positive_float("lr0", self.lr0)
        if self.alpha0 is not None:
            check_positive_float("alpha0", self.alpha0)
        check_choice("optimizer", self.optimizer, get_args(OptimizerName))
        if not self.multipliers or any(not (m > 0) for m in self.multipliers):
            raise InputError(
                f"multipliers={list(self.multipliers)} is invalid: need positive values",
                fields=["multipliers"],
            )
        if self.curvature_every < 0:
            raise InputError("curvature_every must be >= 0", fields=["curvature_every"])
        if self.curvature_early < 0:
            raise InputError("curvature_early must be >= 0", fields=["curvature_early"])
        check_positive_int("lanczos_steps", self.lanczos_steps)
        every = (self.seed, *self.seeds)
        if len(set(every)) != len(every) or any(x < 0 for x in every):
            msg = f"seeds={list(self.seeds)} is invalid: need distinct seeds >= 0, other than --seed"
            raise InputError(msg, fields=["seeds"])
        if not (0 < self.lanczos_tol < 1):
            raise InputError(
                f"lanczos_tol={self.lanczos_tol} is invalid: need 0 < tol < 1", fields=["lanczos_tol"]
            )


#: The per-step records of a :class:`Run` that ``dynamics_curves.json`` holds.
CURVE_FIELDS = ("loss", "sdr", "norm_signal", "norm_drift", "align_signal", "align_drift")


@dataclass(frozen=True)
class DynamicsResult:
    """What :func:`run_dynamics` returns.

    Attributes:
        summary: every number of the run, keyed as in ``dynamics.json`` (``config``, per-path
            outcomes keyed by ``f"{k:g}"``, the one-step probes, ``curvature``, ``warnings``).
        runs: ``{"eta_scaling"|"alpha_scaling": {k: Run}}``; ``alpha_scaling[1.0]`` is the
            ``eta_scaling[1.0]`` run (the shared baseline).
    """

    summary: dict
    runs: dict[str, dict[float, Run]]

    def to_json(self) -> dict:
        """``summary`` in plain JSON types (what ``dynamics.json`` holds)."""
        return json.loads(json.dumps(self.summary))

    def curves_json(self) -> dict:
        """The per-step records of every run (what ``dynamics_curves.json`` holds).

        ``{path: {f"{k:g}": {field: [...]}}}`` for the fields in :data:`CURVE_FIELDS`.
        """
        return {
            p: {f"{k:g}": {f: getattr(r, f) for f in CURVE_FIELDS} for k, r in rs.items()}
            for p, rs in self.runs.items()
        }


#: What each one-step probe in ``dynamics.json`` measures (see :mod:`.probes`).
PROBE_DEFINITIONS = {
    "sdr_eta": "(α0, k·η0), direction fixed: SDR(1)/k, slope −1 is an identity (Δθ ∝ η), not a finding",
    "sdr_alpha_frozen_state": "(k·α0, η0), (A, B) and optimizer state frozen, gradient recomputed at k·α0: "
    "the network function changes with k where B ≠ 0",
    "sdr_alpha_consistent": "(k·α0, A, B/k) with m_B → k·m_B, v_B → k²·v_B, η0: same function, same "
    "direction; residual α-dependence is the B·ΔA part of the signal (sdr_alpha_consistent_predicted)",
}


def run_dynamics(cfg: DynamicsConfig, progress: bool = False) -> DynamicsResult:
    """η-scaling vs α-scaling paths from a common baseline ``(α0, η0)`` (paper Eq. 2, Fig. 2).

    Returns:
        A :class:`DynamicsResult`: the JSON-ready ``summary`` and the ``runs`` of both paths.
    """
    cfg.validate()
    torch.set_default_dtype(torch.float64)
    ks = sorted(set(float(k) for k in cfg.multipliers))
    problem, alpha0, runs = _paths(cfg, cfg.seed, ks, measure=True, progress=progress)
    base = runs["eta_scaling"].get(1.0)
    points = sorted(base.checkpoints) if base else []
    probes = [sdr_probes(problem, base.checkpoints[c], alpha0, cfg.lr0, ks, cfg.optimizer) for c in points]
    summary: dict = {
        "config": asdict(cfg) | {"alpha0": alpha0},
        "eta_scaling": {f"{k:g}": runs["eta_scaling"][k].summary() for k in ks},
        "alpha_scaling": {
            f"{k:g}": runs["alpha_scaling"][k].summary() for k in ks if k in runs["alpha_scaling"]
        },
        # Δθ ∝ η with the direction fixed: −1 by construction, a check of the code, not a finding
        "sdr_slope_eta_identity": float(np.mean([p.slope_eta_identity for p in probes])) if probes else None,
        "sdr_slope_alpha_frozen_state": [p.slope_alpha_frozen_state for p in probes],
        "sdr_slope_alpha_consistent": [p.slope_alpha_consistent for p in probes],
        "sdr_probes": {
            "checkpoints": points,
            "definitions": PROBE_DEFINITIONS,
            "probes": [{"checkpoint": c} | asdict(p) for c, p in zip(points, probes, strict=True)],
        },
    }
    for path in ("eta_scaling", "alpha_scaling"):
        ok = [
            (k, runs[path][k].summary()["sdr_mean"])
            for k in ks
            if k in runs[path] and not runs[path][k].diverged
        ]
        summary[f"trajectory_sdr_slope_{path.split('_')[0]}"] = (
            loglog_slope(*zip(*ok, strict=True)) if len(ok) > 1 else None
        )
    warnings, records = [], []
    for path in runs:
        for k, r in sorted(runs[path].items()):
            if path == "alpha_scaling" and k == 1.0:
                continue  # the same run as eta_scaling k=1
            if r.diverged:
                warnings.append(f"{path} k={k:g} diverged at step {r.diverged_step}")
            warnings += [f"{path} k={k:g}: {c.warning}" for c in r.lambda_max if c.warning]
            records += r.lambda_max
    summary["warnings"] = warnings
    rel = [c.residual / abs(c.value) for c in records if c.converged and c.value != 0]
    summary["lambda_max_convergence"] = {
        "measured": len(records),
        "converged": sum(c.converged for c in records),
        "max_relative_residual_converged": max(rel) if rel else None,
        "max_matvecs": max((c.matvecs for c in records), default=None),
    }
    summary["curvature"] = {
        path: {
            f"{k:g}": {
                "steps": [c.step for c in r.lambda_max],
                "lambda_max": [c.value for c in r.lambda_max],
                "residual": [c.residual for c in r.lambda_max],
                "converged": [c.converged for c in r.lambda_max],
                "matvecs": [c.matvecs for c in r.lambda_max],
                "stability_bound": 2.0 / (k * cfg.lr0 if path == "eta_scaling" else cfg.lr0),
            }
            for k, r in runs[path].items()
        }
        for path in runs
    }
    summary["sharpness"] = {
        path: {f"{k:g}": columns(r.sharpness) for k, r in runs[path].items() if r.sharpness} for path in runs
    }
    summary["sharpness_definitions"] = SHARPNESS_DEFINITIONS
    summary.update(edge_summary(summary))
    if cfg.seeds:
        outcomes = [_outcomes(runs)]
        for sd in tqdm(cfg.seeds, desc="seeds", disable=not progress):
            outcomes.append(_outcomes(_paths(cfg, sd, ks, measure=False)[2]))
        summary["over_seeds"] = paths_over_seeds(outcomes, [cfg.seed, *cfg.seeds])
    return DynamicsResult(summary, runs)


def _paths(
    cfg: DynamicsConfig, seed: int, ks: Sequence[float], *, measure: bool, progress: bool = False
) -> tuple[LoraProblem, float, dict[str, dict[float, Run]]]:
    """Both paths at ``seed`` (task, base MLP, A init): ``(problem at α0, α0, runs)``.

    With ``measure``, the curvature records and the base run's checkpoints for the probes (the
    main seed); without, the trajectories alone (the extra seeds of Finding II).
    """
    model = make_mlp(cfg.dim, cfg.depth, seed=seed)
    task = make_task(cfg.dim, cfg.samples, seed=seed)
    alpha0 = float(cfg.rank) if cfg.alpha0 is None else cfg.alpha0
    problem = attach_lora(model, task.X, task.y, rank=cfg.rank, alpha=alpha0)
    theta0 = init_theta(problem, seed)
    ckpts = sorted({cfg.steps // 4, cfg.steps // 2, (3 * cfg.steps) // 4}) if measure else []
    curv = (
        {"curvature_every": cfg.curvature_every, "curvature_early": cfg.curvature_early,
         "lanczos_steps": cfg.lanczos_steps, "lanczos_tol": cfg.lanczos_tol}
        if measure else {}
    )  # fmt: skip
    runs: dict[str, dict[float, Run]] = {"eta_scaling": {}, "alpha_scaling": {}}
    jobs = [("eta_scaling", k) for k in ks] + [("alpha_scaling", k) for k in ks if k != 1.0]
    for path, k in tqdm(jobs, desc=f"runs (seed {seed})", disable=not progress):
        alpha, lr = (alpha0, k * cfg.lr0) if path == "eta_scaling" else (k * alpha0, cfg.lr0)
        runs[path][k] = train_lora(
            problem.with_alpha(alpha), theta0, steps=cfg.steps, lr=lr, optimizer=cfg.optimizer,
            checkpoints=ckpts if (path, k) == ("eta_scaling", 1.0) else (), desc=f"{path} k={k:g}", **curv,
        )  # fmt: skip
    if 1.0 in runs["eta_scaling"]:
        runs["alpha_scaling"][1.0] = runs["eta_scaling"][1.0]
    return problem, alpha0, runs


def _outcomes(runs: dict[str, dict[float, Run]]) -> dict:
    """``{path: {k: (final loss or NaN, broke down)}}``."""
    return {
        p: {k: (r.summary()["final_loss"], broke_down(r)) for k, r in rs.items()} for p, rs in runs.items()
    }


def paths_over_seeds(outcomes: Sequence[Mapping], seeds: Sequence[int]) -> dict:
    """Finding II over seeds: both paths' best loss (paired by seed) and breakdown multipliers.

    Args:
        outcomes: per seed ``{path: {k: (final loss or NaN, broke down)}}``.
        seeds: the seeds, in the same order.

    Returns:
        ``best_alpha_minus_best_eta`` (Student-t over seeds of the paired difference of the best
        final losses), per seed the best k and first broken k of each path, and the verdicts
        (the α-path breaking down later at every seed: one-sided sign test over seeds).
    """
    from ..replicates import paired_difference, sign_test
    from ..sweep import _verdict

    best, broke = {"eta": [], "alpha": []}, {"eta": [], "alpha": []}
    for o in outcomes:
        for p, key in (("eta", "eta_scaling"), ("alpha", "alpha_scaling")):
            rows = sorted(o[key].items())
            finite = [(v, k) for k, (v, _) in rows if math.isfinite(v)]
            best[p].append(min(finite) if finite else (math.nan, None))
            broke[p].append(next((k for k, (_, b) in rows if b), None))
    try:
        d = paired_difference([v for v, _ in best["alpha"]], [v for v, _ in best["eta"]]).to_json()
    except InputError:
        d = None
    pairs = [(be, ba) for be, ba in zip(broke["eta"], broke["alpha"], strict=True) if be is not None]
    sign = sign_test([ba is None or ba > be for be, ba in pairs])
    return {
        "seeds": list(seeds),
        "best_loss": {p: [v for v, _ in b] for p, b in best.items()},
        "best_k": {p: [k for _, k in b] for p, b in best.items()},
        "breakdown_k": broke,
        "best_alpha_minus_best_eta": d,
        "alpha_breaks_later": {"seeds": sign["n"], "later": sign["later"], "sign_test_p": sign["p"]},
        "verdicts": {
            "finding_2_alpha_reaches_lower_loss": _verdict(d, 0.0, -1),
            "finding_2_alpha_tolerates_larger_k": sign["verdict"],
        },
    }


#: What the ``sharpness`` columns of ``dynamics.json`` hold (see :mod:`signal_drift.edge`).
SHARPNESS_DEFINITIONS = {
    "preconditioned": "λ_max(P⁻¹H_θ), P = diag(√v̂) + ε of the step's own Adam update",
    "edge_ratio": "η·λ_max(P⁻¹H_θ) / ((2 + 2β₁)/(1 − β₁)): Adam with P frozen is stable below 1",
    "gd_ratio": "η·λ_max(H_θ) / 2: GD is stable below 1 (Lemma 1)",
    "drift_fraction": "uᵀP^{-1/2}H_drift P^{-1/2}u / λ_max(P⁻¹H_θ) at the top eigenvector u",
    "signal_max": "λ_max(P^{-1/2}H_signal P^{-1/2})",
    "drift_max": "λ_max(P^{-1/2}H_drift P^{-1/2})",
    "step 0": "B = 0 and v holds one gradient, v_A = 0 so P_A = ε: the frozen-P edge does not describe "
    "step 0; predictions use steps >= 1",
}


def broke_down(run: Run) -> bool:
    """Diverged, or ended with a loss above the loss before fine-tuning."""
    return _broke(run.summary())


def _broke(row: Mapping) -> bool:
    """:func:`broke_down` from a run's :meth:`Run.summary` (a ``dynamics.json`` row)."""
    return bool(row["diverged"] or not row["final_loss"] <= row["initial_loss"])


#: How ``edge_prediction`` in ``dynamics.json`` is made (see :func:`signal_drift.edge.predict_breakdown`).
EDGE_PREDICTION_DEFINITIONS = {
    "early": "from the base run's records at steps 1 … curvature_early−1, where B ≈ 0 and the α-path "
    "scaling (signal ×k, drift ×1 after preconditioning) applies; the frozen-P edge 38 is asymptotic "
    "(momentum needs ~1/(1−β₁) steps, v̂ moves fast), so these steps are also where it is least exact",
    "eta": "k_η = 1/max ρ: exact for P frozen at the base run's",
    "alpha": "[lo, hi] = Weyl range of the crossing of k·S̃ + D̃ from λ_max(S̃), λ_max(D̃) (D̃ has a symmetric "
    "spectrum: block off-diagonal between A and B)",
    "all_steps": "from every base-run record at step >= 1; later records reflect Adam's adaptation of v "
    "to the base run's own trajectory",
    "observed": "the first multiplier whose run diverged or ended above its starting loss",
}


def _max_ratio(recs: Sequence[Sharpness]) -> dict:
    """The largest edge and GD ratios of a run at steps >= 1 (step 0 has P_A = ε), unconverged left out."""
    later = [r for r in recs if r.step >= 1]

    def top(xs: list[float]) -> float:
        xs = [x for x in xs if math.isfinite(x)]
        return max(xs) if xs else math.nan

    return {
        "edge_ratio": top([r.edge_ratio for r in later]),
        "gd_ratio": top([r.gd_ratio for r in later]),
        "unconverged": sum(not math.isfinite(r.preconditioned) for r in later),
    }


def edge_summary(summary: Mapping) -> dict:
    """``edge_prediction``, ``max_edge_ratio`` and ``broke_down`` from a ``dynamics.json`` summary.

    Everything comes from the summary itself (the base run's ``sharpness`` columns and each run's
    outcome), so a committed ``dynamics.json`` can be re-analysed without re-running it: the same
    function :func:`run_dynamics` calls.
    """
    sharp = summary.get("sharpness", {})
    broken = {p: {k: _broke(row) for k, row in summary[p].items()} for p in ("eta_scaling", "alpha_scaling")}
    out = {"broke_down": broken, "max_edge_ratio": {
        p: {k: _max_ratio(from_columns(cols)) for k, cols in runs.items()} for p, runs in sharp.items()
    }}  # fmt: skip
    base = sharp.get("eta_scaling", {}).get("1")
    if not base:
        return out | {"edge_prediction": None}
    recs = from_columns(base)
    eta = {float(k): b for k, b in broken["eta_scaling"].items()}
    alpha = {float(k): b for k, b in broken["alpha_scaling"].items()} | {
        1.0: broken["eta_scaling"].get("1", False)
    }
    early = max(summary["config"].get("curvature_early", 0) - 1, 1)
    pred = {}
    for name, last in (("early", early), ("all_steps", None)):
        try:
            pred[name] = predict_breakdown(recs, eta, alpha, min_step=1, max_step=last).to_json()
        except InputError as err:
            pred[name] = {"error": str(err)}
    return out | {"edge_prediction": pred | {"definitions": EDGE_PREDICTION_DEFINITIONS}}
