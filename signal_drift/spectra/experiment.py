"""The Figure 8 experiment: exact spectra of H, H_θ, H_signal and H_drift across α.

``docs/theory.md#mlp-experiment`` (Fig. 8 a–d) on the 5-layer SiLU MLP. At init (``B = 0``) the
network output, hence ``g`` and ``H``, do not depend on ``α``; then ``H_signal(α) = α² S₁`` and
``H_drift(α) = α D₁`` exactly (Prop. 1 and 4), so ``S₁`` and ``D₁`` are computed once (exact,
dense) and every ``H_θ(α) = α² S₁ + α D₁`` is diagonalised densely. The assembled ``H_θ`` is
cross-checked against plain autograd ``H_θ`` at every ``α`` in the same run
(:func:`~signal_drift.spectra.checks.alpha_check`).

Past a few thousand LoRA parameters (``lora_spectra="auto"`` switches at 6 000; d = 256 has
10 240) the per-α dense eigendecompositions are replaced by Lanczos extremes and SLQ densities
on ``α² S₁ + α D₁`` (products with the dense blocks, milliseconds each), while the signal and
drift spectra stay exact and are diagonalised once: the block structure at init
(:class:`~signal_drift.spectra.init_blocks.InitBlocks`) puts ``S₁`` on the ``B`` block and gives
``D₁``'s eigenvalues as ``±σ(C_l)``. With ``train_steps > 0`` every ``α`` gets its own trained
point and everything is recomputed.

The run is a sequence of stages (build, FFT spectrum, signal/drift blocks, one H_θ(α) per α,
checks), each recorded in ``timings`` and checkpointed; per-matrix numbers are
:class:`~signal_drift.spectra.stats.SpectrumStats`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from .._errors import (
    DivergenceError,
    InputError,
    check_choice,
    check_device,
    check_positive_float,
    check_positive_int,
)
from .._memory import check_dense, format_bytes
from ..decomposition import curvature
from ..hessian import fft_hessian
from ..lora import LoraProblem, attach_lora, init_theta
from ..model import make_mlp, make_task, pretrain, shifted_task
from ..operators import LinearOperator
from ..optim import adam_steps
from ..scaling import InitKind, init_variance, variant_ii_alpha
from ..theory import loglog_slope, trace_rule
from .checks import alpha_check, trace_rule_mc
from .claims import summarize
from .init_blocks import InitBlocks
from .lanczos import EigResult, lanczos_eigs
from .slq import SLQResult, slq
from .stats import SpectrumStats
from .trace import hutchpp

__all__ = ["SpectraConfig", "SpectraResult", "default_alphas", "run_spectra"]

#: ``lora_spectra="auto"`` uses Lanczos + SLQ on H_θ(α) above this many LoRA parameters.
LANCZOS_ABOVE = 6000


@dataclass(frozen=True)
class SpectraConfig:
    """Settings of :func:`run_spectra` (the flags of ``python -m signal_drift.spectra``).

    The settings ``dim``, ``rank``, ``depth``, ``samples``, ``seed`` mean the same in every config
    (:data:`signal_drift.settings.COMMON_HELP`).

    Attributes:
        alphas: α values, at least 2 (default: 8 around Variant II's α*, :func:`default_alphas`).
        dtype: precision of the model and every Hessian.
        device: cpu, cuda or cuda:K.
        train_steps: evaluate after K Adam steps per α (0: at init).
        lr: Adam learning rate of ``train_steps``.
        pretrain_steps: first fit W0 on the task with K Adam steps.
        pretrain_lr: Adam learning rate of ``pretrain_steps``.
        task_shift: with ``pretrain_steps``: fine-tune target shift.
        a_draws: A draws for the trace-rule Monte Carlo.
        slq_probes: probe vectors per SLQ density.
        slq_steps: Lanczos steps per SLQ probe.
        lanczos_steps: Lanczos steps per extreme eigenvalue.
        exact_fft: also diagonalise the dense FFT Hessian (slow).
        lora_spectra: H_θ(α) spectra: dense eigvalsh, lanczos (extremes + SLQ), or auto (lanczos
            above 6000 params).
        init: LoRA A init.
        decay: power-law decay of the target map's singular values (:func:`~signal_drift.model.make_task`).
    """

    dim: int = 64
    rank: int = 4
    depth: int = 5
    alphas: tuple[float, ...] | None = None
    samples: int = 1024
    seed: int = 0
    dtype: Literal["float64", "float32"] = "float64"
    device: str = "cpu"
    train_steps: int = 0
    lr: float = 1e-3
    pretrain_steps: int = 0
    pretrain_lr: float = 1e-2
    task_shift: float = 0.25
    a_draws: int = 512
    slq_probes: int = 8
    slq_steps: int = 80
    lanczos_steps: int = 150
    exact_fft: bool = False
    lora_spectra: Literal["auto", "dense", "lanczos"] = "auto"
    init: InitKind = "gaussian"
    decay: float = 1.0

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid field."""
        check_positive_int("dim", self.dim)
        check_positive_int("rank", self.rank, self.dim)
        for name in ("depth", "samples", "a_draws", "slq_probes", "slq_steps", "lanczos_steps"):
            check_positive_int(name, getattr(self, name))
        for a in self.alphas or ():
            check_positive_float("alphas", a)
        if self.alphas is not None and len(self.alphas) < 2:
            raise InputError("alphas: give at least 2 values (slopes are fitted across α)", fields=["alphas"])
        for name in ("task_shift", "decay"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name}={getattr(self, name)} is invalid: must be >= 0", fields=[name])
        if self.train_steps < 0 or self.pretrain_steps < 0:
            raise InputError(
                "train_steps/pretrain_steps must be >= 0", fields=["train_steps", "pretrain_steps"]
            )
        check_positive_float("lr", self.lr)
        check_positive_float("pretrain_lr", self.pretrain_lr)
        check_choice("lora_spectra", self.lora_spectra, ("auto", "dense", "lanczos"))
        check_choice("dtype", self.dtype, ("float64", "float32"))
        check_choice("init", self.init, get_args(InitKind))
        check_device(self.device)


def default_alphas(rank: int, sigma2: float, n: int = 8) -> tuple[float, ...]:
    """``n`` geometric values ``α* · 2^(−4 … n−5)`` around Variant II's ``α* = sqrt(r/σ²)``.

    >>> default_alphas(4, 1 / 64)
    (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
    """
    star = variant_ii_alpha(rank, sigma2)
    return tuple(float(star * 2.0 ** (i - 4)) for i in range(n))


@dataclass(frozen=True)
class SpectraResult:
    """What :func:`run_spectra` returns.

    Attributes:
        summary: every number of the run, keyed as in ``spectra.json`` (per-α lists in ``alphas``
            order; ``config``, ``warnings``, ``timings``, ``complete``).
        arrays: what the figure needs beyond the numbers (``spectra_arrays.npz``):
            ``slq_nodes_fft``, ``slq_weights_fft`` ``[probes, steps]``, ``alphas``, and
            ``eig_lora`` ``[n_alpha, P_θ]`` or, matrix-free, ``slq_nodes_lora`` /
            ``slq_weights_lora`` ``[n_alpha, probes, steps]``; ``eig_fft`` with ``exact_fft``.
        lines: one line per claim of Figure 8 (:func:`~signal_drift.spectra.claims.summarize`).
    """

    summary: dict
    arrays: dict = field(default_factory=dict)
    lines: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """``summary`` in plain JSON types (what ``spectra.json`` holds; NaN stays NaN)."""
        return json.loads(json.dumps(self.summary, default=float))


@dataclass(frozen=True)
class _Solver:
    """The Lanczos and SLQ settings every stage shares."""

    lanczos_steps: int
    slq_probes: int
    slq_steps: int
    seed: int

    def extremes(self, op: LinearOperator, which: Literal["LA", "SA", "BE"]) -> EigResult:
        """One extreme eigenpair of ``op`` (each end for ``"BE"``) by Lanczos."""
        return lanczos_eigs(op, 1, which, steps=self.lanczos_steps, seed=self.seed)

    def density(self, op: LinearOperator, progress: bool = False) -> SLQResult:
        """The SLQ quadrature of ``op``'s spectral density."""
        return slq(op, probes=self.slq_probes, steps=self.slq_steps, seed=self.seed, progress=progress)


#: The per-α series of the summary (more appear with the first α: interval and method keys).
_PER_ALPHA = (
    "lambda_max_lora", "lambda_min_lora", "lambda_max_signal", "lambda_min_signal",
    "lambda_min_drift", "lambda_max_drift", "trace_lora", "trace_signal", "trace_rule_predicted",
    "norm_signal", "norm_drift", "drift_to_signal", "negative_mass_lora", "negative_mass_signal",
    "negative_count_lora", "lambda_max_fft_at_point", "diverged_step",
)  # fmt: skip


@dataclass
class _Run:
    """Everything a run has finished so far, its stage timings, and the checkpoint hook."""

    alphas: tuple[float, ...]
    config: dict
    checkpoint: Callable[[dict, dict], None] | None
    summary: dict = field(default_factory=dict)
    per: dict[str, list] = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    eig_lora: list = field(default_factory=list)
    slq_lora: list[SLQResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        """Record the seconds since the previous lap as stage ``name``."""
        self.timings[name] = round(time.perf_counter() - self.t0, 3)
        self.t0 = time.perf_counter()

    def lora_arrays(self) -> dict:
        """The per-α H_θ spectra (dense) or SLQ quadratures (matrix-free) finished so far."""
        out = {}
        if self.eig_lora:
            out["eig_lora"] = np.array(self.eig_lora)
        if self.slq_lora:
            out["slq_nodes_lora"] = np.stack([d.nodes for d in self.slq_lora])
            out["slq_weights_lora"] = np.stack([d.weights for d in self.slq_lora])
        return out

    def snapshot(self) -> None:
        """Hand everything finished so far to the checkpoint (``complete`` False)."""
        if self.checkpoint is None:
            return
        part = {**self.summary, **{k: list(v) for k, v in self.per.items()}}
        part["alphas_done"] = len(self.per["norm_signal"])
        part.update(complete=False, config=self.config, warnings=list(self.warnings))
        part["timings"] = dict(self.timings)
        self.checkpoint(part, {**self.arrays, "alphas": np.array(self.alphas), **self.lora_arrays()})


def run_spectra(
    cfg: SpectraConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict, dict], None] | None = None,
) -> SpectraResult:
    """Run the Figure 8 experiment; see the module docstring.

    Args:
        cfg: settings.
        progress: show tqdm bars.
        log: where to print stage messages.
        checkpoint: called as ``checkpoint(summary, arrays)`` with everything finished so far
            (``summary["complete"]`` False, the per-α lists as long as the α values done) after
            every stage and every α, so an interrupted run keeps its finished results.

    Returns:
        A :class:`SpectraResult` (``summary["complete"]`` True).
    """
    cfg.validate()
    dtype = getattr(torch, cfg.dtype)
    sigma2 = init_variance(cfg.init, cfg.dim)
    run = _Run(tuple(cfg.alphas) if cfg.alphas else default_alphas(cfg.rank, sigma2), asdict(cfg), checkpoint)
    problem = _build(cfg, dtype, progress)
    theta0 = init_theta(problem, cfg.seed)
    P_w, P_t = problem.weight_layout.numel, problem.theta_layout.numel
    run.lap("build")
    _refuse_dense_beyond_budget(P_w, P_t, dtype, cfg.exact_fft, log, cfg.device)
    run.summary.update({
        "dim": cfg.dim, "rank": cfg.rank, "depth": cfg.depth, "samples": cfg.samples,
        "alphas": list(run.alphas), "alpha_star_variant_ii": variant_ii_alpha(cfg.rank, sigma2),
        "rho": sigma2 / cfg.rank, "params_fft": P_w, "params_lora": P_t,
        "point": _point_label(cfg.train_steps, cfg.pretrain_steps, cfg.task_shift),
    })  # fmt: skip
    if cfg.dtype == "float32":
        run.warnings.append(
            "float32: eigenvalues below ~1e-6·λ_max, slopes and the Prop. 1 residual are at round-off; "
            "use float64 to verify the theory"
        )
    solver = _Solver(cfg.lanczos_steps, cfg.slq_probes, cfg.slq_steps, cfg.seed)
    H0 = fft_hessian(problem, theta0)
    log(f"FFT Hessian H: {P_w} x {P_w} (matrix-free, {type(H0).__name__}); LoRA H_θ: {P_t} x {P_t} (dense)")
    K = _fft_spectrum(run, H0, solver, cfg.exact_fft, progress)
    run.lap("fft_spectrum")

    run.per.update({k: [] for k in _PER_ALPHA})
    if cfg.train_steps:
        run.per["lanczos_residual_fft_at_point"] = []
    run.snapshot()
    method = _lora_method(cfg.lora_spectra, cfg.train_steps, P_t)
    run.summary["lora_spectra_method"] = "dense eigvalsh" if method == "dense" else "Lanczos extremes + SLQ"
    if cfg.train_steps == 0:
        S1, D1 = _spectra_at_init(run, problem, theta0, H0, K, method, solver, progress)
        _checks_at_init(run, problem, theta0, K, S1, D1, seed=cfg.seed, a_draws=cfg.a_draws)
    else:
        _spectra_at_trained_points(run, problem, theta0, cfg.train_steps, cfg.lr, solver, progress)
    return _finish(run)


def _point_label(train_steps: int, pretrain_steps: int, task_shift: float) -> str:
    label = "init (B = 0)" if train_steps == 0 else f"{train_steps} Adam steps per α"
    if pretrain_steps:
        label += f", W0 pre-trained {pretrain_steps} steps, task shift {task_shift}"
    return label


def _build(cfg: SpectraConfig, dtype: torch.dtype, progress: bool) -> LoraProblem:
    model = make_mlp(cfg.dim, cfg.depth, seed=cfg.seed, dtype=dtype)
    task = make_task(cfg.dim, cfg.samples, decay=cfg.decay, seed=cfg.seed, dtype=dtype)
    X, y = task.X.to(cfg.device), task.y.to(cfg.device)
    model = model.to(cfg.device)
    if cfg.pretrain_steps:
        # pre-train W0 on the source task, fine-tune on a shifted target (g ≠ 0 at W0)
        model = pretrain(model, X, y, cfg.pretrain_steps, cfg.pretrain_lr, progress=progress)
        y = shifted_task(task, cfg.task_shift, seed=cfg.seed).y.to(cfg.device)
    return attach_lora(model, X, y, rank=cfg.rank, alpha=1.0, init=cfg.init)


def _refuse_dense_beyond_budget(
    P_w: int, P_t: int, dtype: torch.dtype, exact_fft: bool, log: Callable[[str], None], device: str = "cpu"
) -> None:
    """Refuse what will not fit before any work: the dense H_θ blocks (and H for ``exact_fft``).

    Up to four ``P_θ × P_θ`` matrices are alive at once (``S₁``, ``D₁``, an assembled ``H_θ(α)``
    and ``eigvalsh``'s copy), on ``device`` (a GPU is budgeted against its own free memory).
    """
    free = "the matrix-free SignalOperator"
    check_dense("H_signal", P_t, P_t, dtype, alternative=free, device=device, copies=4)
    if exact_fft:
        check_dense("H (--exact-fft)", P_w, P_w, dtype, alternative="the default run without --exact-fft",
                    device=device, copies=2)  # fmt: skip
        need = P_w * P_w * torch.empty((), dtype=dtype).element_size()
        log(f"--exact-fft: dense H is {P_w} x {P_w} ({format_bytes(need)}); eigvalsh takes roughly "
            f"{P_w**3 * 9 / 3e10 / 60:.0f} min on 2 cores")  # fmt: skip


def _lora_method(choice: str, train_steps: int, P_t: int) -> Literal["dense", "lanczos"]:
    """``choice``, with ``"auto"`` resolved: Lanczos + SLQ at init past :data:`LANCZOS_ABOVE` parameters."""
    if choice != "auto":
        return choice  # type: ignore[return-value]
    return "lanczos" if train_steps == 0 and P_t > LANCZOS_ABOVE else "dense"


def _fft_spectrum(
    run: _Run, H: LinearOperator, solver: _Solver, exact: bool, progress: bool
) -> dict[str, torch.Tensor] | None:
    """Stage: ``λ_max``, ``λ_min`` (Lanczos), trace and negative fraction (SLQ) of the FFT ``H``.

    The trace is exact where ``H`` has partial traces, else Hutch++ with a band; ``exact``
    also diagonalises the dense ``H``.

    Returns:
        ``H``'s partial traces ``{layer: K [n, n]}``, or None where it has none.
    """
    top, bottom = solver.extremes(H, "LA"), solver.extremes(H, "SA")
    run.warnings += top.checked("Lanczos λ_max(H)")[1] + bottom.checked("Lanczos λ_min(H)")[1]
    if H.supports_partial_traces:
        K = H.partial_traces()
        tr = float(sum(torch.trace(k) for k in K.values()))
        trace = {"trace": tr, "trace_method": "exact (partial traces)"}
    else:
        K, est = None, hutchpp(H, 300, seed=solver.seed)
        band = est.interval()
        trace = {"trace": est.value, "trace_interval": band, "trace_method": "Hutch++ (300 matvecs)"}
    dens = solver.density(H, progress)
    # the mass band integrates from a lower bound on λ_min: only when λ_min converged
    negative = ("fraction", "mass") if bool(bottom.converged[0]) else ("fraction",)
    stats = SpectrumStats.from_lanczos_slq(bottom, top, dens, negative=negative, **trace)
    run.summary.update(stats.to_json("fft"))
    run.arrays["slq_nodes_fft"], run.arrays["slq_weights_fft"] = dens.nodes, dens.weights
    if exact:
        e = torch.linalg.eigvalsh(H.to_dense())
        run.arrays["eig_fft"] = e.cpu().numpy()
        dense = SpectrumStats.from_eigenvalues(e)
        run.summary["negative_mass_fft_dense"] = dense.negative_mass
        run.summary["negative_fraction_fft_dense"] = float((e < 0).double().mean())
        run.summary["trace_fft_dense"] = dense.trace
    return K


def _spectra_at_init(
    run: _Run,
    problem: LoraProblem,
    theta0: dict[str, torch.Tensor],
    H0: LinearOperator,
    K: dict[str, torch.Tensor] | None,
    method: Literal["dense", "lanczos"],
    solver: _Solver,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages at ``B = 0``: dense ``S₁``, ``D₁`` once, then the spectra of ``H_θ(α)`` per α.

    Returns:
        ``(S₁, D₁)`` ``[P_θ, P_θ]``.
    """
    c1 = curvature(problem.with_alpha(1.0), theta0, H=H0)
    S1, D1 = c1.signal.to_dense(), c1.drift.to_dense()
    if method == "dense":
        eS1, eD1 = torch.linalg.eigvalsh(S1), torch.linalg.eigvalsh(D1)
    else:
        blocks = InitBlocks.from_dense(problem, S1, D1)
        eS1, eD1 = blocks.eigvalsh()
    run.lap("signal_drift_dense")
    run.snapshot()
    for a in tqdm(run.alphas, desc="H_θ(α) spectra", disable=not progress, leave=False):
        S, D = a * a * S1, a * D1
        # positive scalings keep the order: only H_θ(α) needs its own eigendecomposition
        signal = SpectrumStats.from_eigenvalues(a * a * eS1, trace=float(torch.trace(S)))
        drift = SpectrumStats.from_eigenvalues(a * eD1)
        if method == "dense":
            e = torch.linalg.eigvalsh(S + D)
            run.eig_lora.append(e.cpu().numpy())
            lora = SpectrumStats.from_eigenvalues(e)
        else:
            lora, dens, warn = _lora_stats_at_init(blocks, a, solver)
            run.warnings += warn
            run.slq_lora.append(dens)
        predicted = _predicted_trace(problem.with_alpha(a), K)
        _append(run.per, lora, signal, drift, *_norms(S, D), predicted, run.summary["lambda_max_fft"])
        run.snapshot()
    if run.slq_lora:
        run.arrays.update(run.lora_arrays())
    run.lap("lora_spectra")
    return S1, D1


def _lora_stats_at_init(
    blocks: InitBlocks, a: float, solver: _Solver
) -> tuple[SpectrumStats, SLQResult, list[str]]:
    """``λ_max``, ``λ_min`` (Lanczos), negative mass (SLQ) and exact negative count of ``H_θ(a)``.

    Products go through the non-zero blocks only (:meth:`InitBlocks.H_theta`); the trace is exact.
    """
    op = blocks.H_theta(a)
    ext = solver.extremes(op, "BE")
    _, warn = ext.checked(f"α={a:g}: Lanczos λ_min/λ_max(H_θ)")
    dens = solver.density(op)
    stats = SpectrumStats.from_lanczos_slq(
        ext, ext, dens, blocks.trace_H_theta(a), negative=("mass",), negative_count=blocks.negative_count(a)
    )
    return stats, dens, warn


def _checks_at_init(
    run: _Run,
    problem: LoraProblem,
    theta0: dict[str, torch.Tensor],
    K: dict[str, torch.Tensor] | None,
    S1: torch.Tensor,
    D1: torch.Tensor,
    *,
    seed: int,
    a_draws: int,
) -> None:
    """Stages: the per-α autograd check of the assembled ``H_θ(α)``, and the trace rule by Monte Carlo."""
    check = alpha_check(problem, theta0, S1, D1, run.alphas, seed)
    run.summary.update(check)
    if max(check["autograd_check_residual"].values()) > 1e-8:
        run.warnings.append(f"assembled H_θ differs from autograd H_θ: {check['autograd_check_residual']}")
    run.lap("autograd_check")
    if K is not None:
        run.summary.update(
            trace_rule_mc(problem, theta0, K, float(torch.trace(S1)), run.alphas, seed, a_draws)
        )
        run.lap("trace_rule_mc")


def _spectra_at_trained_points(
    run: _Run,
    problem: LoraProblem,
    theta0: dict[str, torch.Tensor],
    train_steps: int,
    lr: float,
    solver: _Solver,
    progress: bool,
) -> None:
    """Stage: per α, ``train_steps`` Adam steps from ``θ₀``, then every spectrum at that point (dense)."""
    P_t = problem.theta_layout.numel
    for a in tqdm(run.alphas, desc=f"train {train_steps} steps + spectra per α", disable=not progress):
        pa = problem.with_alpha(a)
        try:
            th = adam_steps(pa.loss_theta, theta0, train_steps, lr, desc=f"α={a:g}")
        except DivergenceError as err:
            run.warnings.append(f"α={a:g}: {err}; its spectra are left out (NaN)")
            _append_nan(run.per, err.step)
            run.eig_lora.append(np.full(P_t, np.nan))
            run.snapshot()
            continue
        Ha = fft_hessian(pa, th)
        ca = curvature(pa, th, H=Ha)
        S, D = ca.signal.to_dense(), ca.drift.to_dense()
        e = torch.linalg.eigvalsh(S + D)
        run.eig_lora.append(e.cpu().numpy())
        lora = SpectrumStats.from_eigenvalues(e)
        signal = SpectrumStats.from_eigenvalues(torch.linalg.eigvalsh(S), trace=float(torch.trace(S)))
        drift = SpectrumStats.from_eigenvalues(torch.linalg.eigvalsh(D))
        Ka = Ha.partial_traces() if Ha.supports_partial_traces else None
        top = solver.extremes(Ha, "LA")
        (lam,), warn = top.checked(f"α={a:g}: Lanczos λ_max(H) at the trained point")
        run.warnings += warn
        run.per["lanczos_residual_fft_at_point"].append(float(top.residuals[-1]))
        _append(run.per, lora, signal, drift, *_norms(S, D), _predicted_trace(pa, Ka), float(lam))
        run.snapshot()
    run.lap("trained_spectra")


def _finish(run: _Run) -> SpectraResult:
    """Slopes across the finite α values; the complete summary and arrays."""
    summary, per, alphas = run.summary, run.per, run.alphas
    summary.update(per)
    finite = [i for i, v in enumerate(per["norm_signal"]) if np.isfinite(v)]
    xs = [alphas[i] for i in finite]
    for key, series in (("slope_signal", "norm_signal"), ("slope_drift", "norm_drift"),
                        ("slope_drift_to_signal", "drift_to_signal")):  # fmt: skip
        summary[key] = loglog_slope(xs, [per[series][i] for i in finite]) if len(xs) > 1 else None
    run.arrays["eig_lora"] = np.array(run.eig_lora)
    run.arrays["alphas"] = np.array(alphas)
    summary.update(config=run.config, warnings=run.warnings, timings=run.timings, complete=True)
    return SpectraResult(summary, run.arrays, tuple(summarize(summary)))


def _norms(S: torch.Tensor, D: torch.Tensor) -> tuple[float, float]:
    """Frobenius norms ``‖H_signal‖``, ``‖H_drift‖``."""
    return float(torch.linalg.matrix_norm(S)), float(torch.linalg.matrix_norm(D))


def _predicted_trace(pa: LoraProblem, K: dict[str, torch.Tensor] | None) -> float | None:
    """Prop. 3's ``α²ρ·tr H`` from ``H``'s per-layer traces ``tr K_l`` (None without them)."""
    traces = {name: float(torch.trace(k)) for name, k in K.items()} if K is not None else None
    return trace_rule(pa, traces) if traces else None


def _append(
    per: dict[str, list],
    lora: SpectrumStats,
    signal: SpectrumStats,
    drift: SpectrumStats,
    norm_signal: float,
    norm_drift: float,
    predicted_trace: float | None,
    lambda_max_fft: float,
) -> None:
    """Append one α's numbers to the per-α series."""
    for key, val in lora.to_json("lora").items():
        per.setdefault(key, []).append(val)
    per["lambda_max_signal"].append(signal.lambda_max)
    per["lambda_min_signal"].append(signal.lambda_min)
    per["lambda_min_drift"].append(drift.lambda_min)
    per["lambda_max_drift"].append(drift.lambda_max)
    per["trace_signal"].append(signal.trace)
    per["trace_rule_predicted"].append(predicted_trace)
    per["norm_signal"].append(norm_signal)
    per["norm_drift"].append(norm_drift)
    per["drift_to_signal"].append(norm_drift / norm_signal if norm_signal > 0 else math.inf)
    per["negative_mass_signal"].append(signal.negative_mass)
    per["lambda_max_fft_at_point"].append(lambda_max_fft)
    per["diverged_step"].append(None)


def _append_nan(per: dict[str, list], step: int) -> None:
    for k in per:
        per[k].append(step if k == "diverged_step" else float("nan"))
