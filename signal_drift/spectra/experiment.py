"""The Figure 8 experiment: exact spectra of H, H_θ, H_signal and H_drift across α.

PAPER_NOTES §5 (Fig. 8 a–d) on the 5-layer SiLU MLP. At init (``B = 0``) the network output,
hence ``g`` and ``H``, do not depend on ``α``; then ``H_signal(α) = α² S₁`` and
``H_drift(α) = α D₁`` exactly (Prop. 1 and 4), so ``S₁`` and ``D₁`` are computed once (exact,
dense) and every ``H_θ(α) = α² S₁ + α D₁`` is diagonalised densely. The assembled ``H_θ`` is
cross-checked against plain autograd ``H_θ`` at the smallest and largest ``α`` in the same run.

Past a few thousand LoRA parameters (``lora_spectra="auto"`` switches at 6 000; d = 256 has
10 240) the per-α dense eigendecompositions are replaced by Lanczos extremes and SLQ densities
on ``α² S₁ + α D₁`` (products with the dense blocks, milliseconds each), while the signal and
drift spectra stay exact and are diagonalised once: ``S₁`` is non-zero only on the ``B`` block
at init, and ``D₁``'s eigenvalues are ``±σ(C_l)`` of its per-layer ``A``–``B`` coupling blocks.
With ``train_steps > 0`` every ``α`` gets its own trained point and everything is recomputed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from .._errors import DivergenceError, InputError, check_choice, check_positive_float, check_positive_int
from .._memory import check_dense, format_bytes
from ..decomposition import curvature
from ..hessian import fft_hessian, lora_hessian
from ..intervals import mean_interval
from ..lora import LoraProblem, attach_lora, init_theta
from ..model import make_mlp, make_task, pretrain, shifted_task
from ..operators import FunctionOperator
from ..optim import adam_steps
from ..scaling import InitKind, init_variance, variant_ii_alpha
from ..theory import loglog_slope, signal_trace_at_init, trace_rule
from .inertia import count_below
from .lanczos import lanczos_eigs
from .slq import slq

__all__ = ["SpectraConfig", "SpectraResult", "default_alphas", "run_spectra"]


@dataclass(frozen=True)
class SpectraConfig:
    """Settings of :func:`run_spectra` (the flags of ``python -m signal_drift.spectra``).

    The settings ``dim``, ``rank``, ``depth``, ``samples``, ``seed`` mean the same in every config
    (:data:`signal_drift.cli.COMMON_HELP`).

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
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InputError(f"device={self.device!r} is invalid: use cpu or cuda", fields=["device"])
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(
                f"device={self.device}: CUDA is not available on this machine; use device cpu",
                fields=["device"],
            )


def default_alphas(rank: int, sigma2: float, n: int = 8) -> tuple[float, ...]:
    """``n`` geometric values ``α* · 2^(−4 … n−5)`` around Variant II's ``α* = sqrt(r/σ²)``.

    >>> default_alphas(4, 1 / 64)
    (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
    """
    star = variant_ii_alpha(rank, sigma2)
    return tuple(float(star * 2.0 ** (i - 4)) for i in range(n))


@dataclass
class SpectraResult:
    """JSON-ready numbers (``summary``) and arrays for the figures (``arrays``)."""

    summary: dict
    arrays: dict = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def _point_label(cfg: SpectraConfig) -> str:
    label = "init (B = 0)" if cfg.train_steps == 0 else f"{cfg.train_steps} Adam steps per α"
    if cfg.pretrain_steps:
        label += f", W0 pre-trained {cfg.pretrain_steps} steps, task shift {cfg.task_shift}"
    return label


def _neg_mass(eig: torch.Tensor) -> float:
    """``Σ|λ_i<0| / Σ|λ_i|``: the share of spectral mass that is negative."""
    tot = float(eig.abs().sum())
    return float(eig[eig < 0].abs().sum()) / tot if tot > 0 else 0.0


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


def _fft_summary(H, cfg: SpectraConfig, progress: bool) -> tuple[dict, dict, list[str]]:
    out, arrays, warn = {}, {}, []
    top = lanczos_eigs(H, k=1, which="LA", steps=cfg.lanczos_steps, seed=cfg.seed)
    bottom = lanczos_eigs(H, k=1, which="SA", steps=cfg.lanczos_steps, seed=cfg.seed)
    (lam_max,), w1 = top.checked("Lanczos λ_max(H)")
    (lam_min,), w2 = bottom.checked("Lanczos λ_min(H)")
    warn += w1 + w2
    out["lambda_max_fft"], out["lambda_min_fft"] = float(lam_max), float(lam_min)
    out["lanczos_residual_max_fft"] = float(top.residuals[-1])
    out["lanczos_residual_min_fft"] = float(bottom.residuals[0])
    if hasattr(H, "partial_traces"):
        K = H.partial_traces()
        out["trace_fft"] = float(sum(torch.trace(k) for k in K.values()))
        out["trace_fft_method"] = "exact (partial traces)"
    else:
        from .trace import hutchpp

        est = hutchpp(H, 300, seed=cfg.seed)
        K = None
        out["trace_fft"], out["trace_fft_interval"] = est.value, est.interval().to_json()
        out["trace_fft_method"] = "Hutch++ (300 matvecs)"
    dens = slq(H, probes=cfg.slq_probes, steps=cfg.slq_steps, seed=cfg.seed, progress=progress)
    frac = dens.negative_fraction()
    out["negative_fraction_fft"], out["negative_fraction_fft_interval"] = frac.estimate, frac.to_json()
    arrays["slq_nodes_fft"], arrays["slq_weights_fft"] = dens.nodes, dens.weights
    if cfg.exact_fft:
        e = torch.linalg.eigvalsh(H.to_dense())
        arrays["eig_fft"] = e.cpu().numpy()
        out["negative_mass_fft"] = _neg_mass(e)
        out["negative_fraction_fft_dense"] = float((e < 0).double().mean())
        out["trace_fft_dense"] = float(e.sum())
    return out, {"K": K, **arrays}, warn


def _alpha_check(problem: LoraProblem, theta, S1: torch.Tensor, D1: torch.Tensor, alphas, seed: int) -> dict:
    """An independent look at every α: products computed at that α, not scaled from α = 1.

    The run builds ``H_θ(α) = α² S₁ + α D₁`` from one evaluation at ``α = 1``, so its slopes 2
    and 1 hold by construction. Here, on 4 random directions ``V`` ``[P_θ, 4]`` and at each α,
    plain autograd gives ``H_θ(α) V`` and the signal operator built at α gives ``S(α) V`` (its ``J``
    evaluated at α); their gap to the assembled products is reported, and the log–log slopes of
    ``‖S(α)V‖`` and ``‖(H_θ(α) − S(α))V‖`` are measured from these products alone.
    """
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(S1.shape[0], 4, generator=gen, dtype=S1.dtype).to(S1.device)
    S1V, D1V = S1 @ V, D1 @ V
    res, res_s, ns, nd = {}, {}, [], []
    for a in alphas:
        pa = problem.with_alpha(a)
        HV = lora_hessian(pa, theta).matmat(V)
        SV = curvature(pa, theta).signal.matmat(V)
        ref = a * a * S1V + a * D1V
        res[f"{a:g}"] = float(torch.linalg.matrix_norm(HV - ref) / torch.linalg.matrix_norm(HV))
        res_s[f"{a:g}"] = float(torch.linalg.matrix_norm(SV - a * a * S1V) / torch.linalg.matrix_norm(SV))
        ns.append(float(torch.linalg.matrix_norm(SV)))
        nd.append(float(torch.linalg.matrix_norm(HV - SV)))
    return {
        "autograd_check_residual": res,
        "signal_at_alpha_check_residual": res_s,
        "slope_signal_measured": loglog_slope(alphas, ns),
        "slope_drift_measured": loglog_slope(alphas, nd),
    }


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
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        timings[name] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()

    def snapshot() -> None:
        if checkpoint is None:
            return
        part = {**summary, **{k: list(v) for k, v in per.items()}, "alphas_done": len(per["norm_signal"])}
        part.update(complete=False, config=asdict(cfg), warnings=list(warnings), timings=dict(timings))
        arr = {**arrays, "alphas": np.array(alphas)}
        if eig_lora:
            arr["eig_lora"] = np.array(eig_lora)
        if slq_lora:
            arr["slq_nodes_lora"] = np.stack([d.nodes for d in slq_lora])
            arr["slq_weights_lora"] = np.stack([d.weights for d in slq_lora])
        checkpoint(part, arr)

    per: dict[str, list] = {}
    arrays: dict = {}
    eig_lora: list = []
    slq_lora: list = []
    problem = _build(cfg, dtype, progress)
    sigma2 = init_variance(cfg.init, cfg.dim)
    alphas = tuple(cfg.alphas) if cfg.alphas else default_alphas(cfg.rank, sigma2)
    theta0 = init_theta(problem, cfg.seed)
    P_w, P_t = problem.weight_layout.numel, problem.theta_layout.numel
    lap("build")
    # refuse what will not fit before any work: the dense H_θ blocks (and H for --exact-fft)
    check_dense("H_signal", P_t, P_t, dtype, alternative="the matrix-free SignalOperator")
    if cfg.exact_fft:
        check_dense("H (--exact-fft)", P_w, P_w, dtype, alternative="the default run without --exact-fft")
    if cfg.exact_fft:
        need = P_w * P_w * torch.empty((), dtype=dtype).element_size()
        log(f"--exact-fft: dense H is {P_w} x {P_w} ({format_bytes(need)}); eigvalsh takes roughly "
            f"{P_w**3 * 9 / 3e10 / 60:.0f} min on 2 cores")  # fmt: skip
    summary: dict = {
        "dim": cfg.dim, "rank": cfg.rank, "depth": cfg.depth, "samples": cfg.samples,
        "alphas": list(alphas), "alpha_star_variant_ii": variant_ii_alpha(cfg.rank, sigma2),
        "rho": sigma2 / cfg.rank, "params_fft": P_w, "params_lora": P_t,
        "point": _point_label(cfg),
    }  # fmt: skip
    warnings: list[str] = []
    if cfg.dtype == "float32":
        warnings.append(
            "float32: eigenvalues below ~1e-6·λ_max, slopes and the Prop. 1 residual are at round-off; "
            "use float64 to verify the theory"
        )
    H0 = fft_hessian(problem, theta0)
    log(f"FFT Hessian H: {P_w} x {P_w} (matrix-free, {type(H0).__name__}); LoRA H_θ: {P_t} x {P_t} (dense)")
    fft, fft_arrays, warn = _fft_summary(H0, cfg, progress)
    K = fft_arrays.pop("K")
    summary.update(fft)
    warnings += warn
    arrays.update(fft_arrays)
    lap("fft_spectrum")

    per.update({k: [] for k in (
        "lambda_max_lora", "lambda_min_lora", "lambda_max_signal", "lambda_min_signal",
        "lambda_min_drift", "lambda_max_drift", "trace_lora", "trace_signal", "trace_rule_predicted",
        "norm_signal", "norm_drift", "drift_to_signal", "negative_mass_lora", "negative_mass_signal",
        "negative_count_lora", "lambda_max_fft_at_point", "diverged_step",
    )})  # fmt: skip
    if cfg.train_steps:
        per["lanczos_residual_fft_at_point"] = []
    snapshot()
    method = cfg.lora_spectra
    if method == "auto":
        method = "lanczos" if cfg.train_steps == 0 and P_t > LANCZOS_ABOVE else "dense"
    summary["lora_spectra_method"] = "dense eigvalsh" if method == "dense" else "Lanczos extremes + SLQ"
    if cfg.train_steps == 0:
        c1 = curvature(problem.with_alpha(1.0), theta0, H=H0)
        S1, D1 = c1.signal.to_dense(), c1.drift.to_dense()
        if method == "dense":
            eS1, eD1 = torch.linalg.eigvalsh(S1), torch.linalg.eigvalsh(D1)
        else:
            blocks = _init_blocks(problem, S1, D1)
            eS1, eD1 = _signal_drift_eigvals_at_init(S1.shape[0], blocks)
        lap("signal_drift_dense")
        snapshot()
        for a in tqdm(alphas, desc="H_θ(α) spectra", disable=not progress, leave=False):
            S, D = a * a * S1, a * D1
            # positive scalings keep the order: only H_θ(α) needs its own eigendecomposition
            e = {"signal": a * a * eS1, "drift": a * eD1}
            if method == "dense":
                e["lora"] = torch.linalg.eigvalsh(S + D)
                eig_lora.append(e["lora"].cpu().numpy())
                _append(per, e, S, D, problem.with_alpha(a), K, summary["lambda_max_fft"])
            else:
                est, dens, warn = _lora_extremes_slq(blocks, S1.shape[0], a, cfg)
                warnings += warn
                slq_lora.append(dens)
                _append(per, e, S, D, problem.with_alpha(a), K, summary["lambda_max_fft"], est)
            snapshot()
        if slq_lora:
            arrays["slq_nodes_lora"] = np.stack([d.nodes for d in slq_lora])
            arrays["slq_weights_lora"] = np.stack([d.weights for d in slq_lora])
        lap("lora_spectra")
        check = _alpha_check(problem, theta0, S1, D1, alphas, cfg.seed)
        summary.update(check)
        if max(check["autograd_check_residual"].values()) > 1e-8:
            warnings.append(f"assembled H_θ differs from autograd H_θ: {check['autograd_check_residual']}")
        lap("autograd_check")
        if K is not None:
            summary.update(_trace_mc(problem, theta0, K, S1, alphas, cfg))
            lap("trace_rule_mc")
    else:
        for a in tqdm(alphas, desc=f"train {cfg.train_steps} steps + spectra per α", disable=not progress):
            pa = problem.with_alpha(a)
            try:
                th = adam_steps(pa.loss_theta, theta0, cfg.train_steps, cfg.lr, desc=f"α={a:g}")
            except DivergenceError as err:
                warnings.append(f"α={a:g}: {err}; its spectra are left out (NaN)")
                _append_nan(per, err.step)
                eig_lora.append(np.full(P_t, np.nan))
                snapshot()
                continue
            Ha = fft_hessian(pa, th)
            ca = curvature(pa, th, H=Ha)
            S, D = ca.signal.to_dense(), ca.drift.to_dense()
            e = {
                "lora": torch.linalg.eigvalsh(S + D),
                "signal": torch.linalg.eigvalsh(S),
                "drift": torch.linalg.eigvalsh(D),
            }
            eig_lora.append(e["lora"].cpu().numpy())
            Ka = Ha.partial_traces() if hasattr(Ha, "partial_traces") else None
            top = lanczos_eigs(Ha, 1, "LA", steps=cfg.lanczos_steps, seed=cfg.seed)
            (lam,), warn = top.checked(f"α={a:g}: Lanczos λ_max(H) at the trained point")
            warnings += warn
            per["lanczos_residual_fft_at_point"].append(float(top.residuals[-1]))
            _append(per, e, S, D, pa, Ka, float(lam))
            snapshot()
        lap("trained_spectra")
    summary.update(per)
    finite = [i for i, v in enumerate(per["norm_signal"]) if np.isfinite(v)]
    xs = [alphas[i] for i in finite]
    for key, series in (("slope_signal", "norm_signal"), ("slope_drift", "norm_drift"),
                        ("slope_drift_to_signal", "drift_to_signal")):  # fmt: skip
        summary[key] = loglog_slope(xs, [per[series][i] for i in finite]) if len(xs) > 1 else None
    arrays["eig_lora"] = np.array(eig_lora)
    arrays["alphas"] = np.array(alphas)
    summary["config"] = asdict(cfg)
    summary["warnings"] = warnings
    summary["timings"] = timings
    summary["complete"] = True
    res = SpectraResult(summary, arrays)
    res.lines = summarize(summary)
    return res


def _append(per, e, S, D, pa: LoraProblem, K, lam_fft, lora: dict | None = None):
    """Append one α's numbers; ``lora`` replaces the H_θ statistics of a dense ``e["lora"]``."""
    if lora is None:
        ev = e["lora"]
        lora = {"lambda_max_lora": float(ev[-1]), "lambda_min_lora": float(ev[0]),
                "trace_lora": float(ev.sum()), "negative_mass_lora": _neg_mass(ev),
                "negative_count_lora": int((ev < 0).sum()),
                "negative_count_lora_method": "exact: dense eigvalsh"}  # fmt: skip
    ns, nd = float(torch.linalg.matrix_norm(S)), float(torch.linalg.matrix_norm(D))
    for key, val in lora.items():
        per.setdefault(key, []).append(val)
    per["lambda_max_signal"].append(float(e["signal"][-1]))
    per["lambda_min_signal"].append(float(e["signal"][0]))
    per["lambda_min_drift"].append(float(e["drift"][0]))
    per["lambda_max_drift"].append(float(e["drift"][-1]))
    per["trace_signal"].append(float(torch.trace(S)))
    traces = {name: float(torch.trace(k)) for name, k in K.items()} if K is not None else None
    per["trace_rule_predicted"].append(trace_rule(pa, traces) if traces else None)
    per["norm_signal"].append(ns)
    per["norm_drift"].append(nd)
    per["drift_to_signal"].append(nd / ns if ns > 0 else math.inf)
    per["negative_mass_signal"].append(_neg_mass(e["signal"]))
    per["lambda_max_fft_at_point"].append(lam_fft)
    per["diverged_step"].append(None)


#: ``lora_spectra="auto"`` uses Lanczos + SLQ on H_θ(α) above this many LoRA parameters.
LANCZOS_ABOVE = 6000


def _init_blocks(problem: LoraProblem, S1: torch.Tensor, D1: torch.Tensor) -> dict:
    """The non-zero blocks of ``S₁`` and ``D₁`` at ``B = 0``.

    ``S₁`` lives on the ``B`` block (``J_A = 0``); ``D₁`` couples each layer's ``A`` with its own
    ``B`` only: ``[[0, C_l], [C_lᵀ, 0]]``.
    """
    lay = problem.theta_layout
    iB = lay.indices([a.key_B for a in problem.adapters])
    coupling = []
    for a in problem.adapters:
        iA_l, iB_l = lay.indices([a.key_A]), lay.indices([a.key_B])
        coupling.append((iA_l, iB_l, D1[iA_l[:, None], iB_l]))
    sv = [torch.linalg.svdvals(C) for _, _, C in coupling]
    return {"iB": iB, "S_BB": S1[iB[:, None], iB], "C": coupling, "sv": sv, "trace_S": float(torch.trace(S1))}


def _signal_drift_eigvals_at_init(P: int, blocks: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact spectra of ``S₁`` (its ``B`` block, then zeros) and ``D₁`` (``±σ(C_l)``, then zeros)."""
    S_BB = blocks["S_BB"]
    sig = torch.linalg.eigvalsh(S_BB)
    sv = torch.cat(blocks["sv"])
    zeros = lambda k: torch.zeros(k, dtype=S_BB.dtype, device=S_BB.device)  # noqa: E731
    eS = torch.sort(torch.cat([sig, zeros(P - len(sig))])).values
    eD = torch.sort(torch.cat([sv, -sv, zeros(P - 2 * len(sv))])).values
    return eS, eD


def _lora_extremes_slq(blocks: dict, P: int, a: float, cfg: SpectraConfig):
    """``λ_max``, ``λ_min`` (Lanczos), negative mass and count (SLQ) of ``a² S₁ + a D₁``.

    Products use only the non-zero blocks (:func:`_init_blocks`): ``|B|²`` plus ``2 Σ_l |A_l||B_l|``
    multiply-adds instead of ``2 P²``.
    """
    iB, S_BB = blocks["iB"], blocks["S_BB"]

    def matmat(V: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(V)
        out[iB] = (a * a) * (S_BB @ V[iB])
        for iA_l, iB_l, C in blocks["C"]:
            out[iA_l] += a * (C @ V[iB_l])
            out[iB_l] += a * (C.T @ V[iA_l])
        return out

    op = FunctionOperator(matmat, (P, P), S_BB.dtype, S_BB.device, symmetric=True)
    ext = lanczos_eigs(op, 1, "BE", steps=cfg.lanczos_steps, seed=cfg.seed)
    (lam_min, lam_max), warn = ext.checked(f"α={a:g}: Lanczos λ_min/λ_max(H_θ)")
    dens = slq(op, probes=cfg.slq_probes, steps=cfg.slq_steps, seed=cfg.seed)
    trace = a * a * blocks["trace_S"]  # tr D₁ = 0: the drift is block off-diagonal
    # the band's lower integration edge: λ_min minus its residual (a bound when λ_min converged)
    edge = float(ext.values[0]) - float(ext.residuals[0])
    mass = dens.negative_mass(min(edge, float(np.nanmin(dens.nodes))), trace=trace)
    count, how = negative_count_at_init(blocks, a)
    est = {
        "lambda_max_lora": float(lam_max),
        "lambda_min_lora": float(lam_min),
        "lanczos_residual_max_lora": float(ext.residuals[-1]),
        "lanczos_residual_min_lora": float(ext.residuals[0]),
        "trace_lora": trace,
        "negative_mass_lora": mass.estimate,
        "negative_mass_lora_interval": mass.to_json(),
        "negative_count_lora": count,
        "negative_count_lora_method": how,
    }
    return est, dens, warn


def negative_count_at_init(blocks: dict, a: float) -> tuple[int, str]:
    """The exact number of negative eigenvalues of ``H_θ(α) = [[0, αC], [αCᵀ, α² S_BB]]`` at ``B = 0``.

    The ``A`` block of ``H_θ`` is exactly zero at init, so ``H_θ`` has a neutral subspace of
    dimension ``|A|``: it has at least ``|A|`` eigenvalues ``≥ 0`` and ``|A|`` eigenvalues ``≤ 0``.
    When every layer's coupling ``C_l`` is square (``|A_l| = |B_l|``, square layers) and
    invertible, ``det H_θ = ±∏ det(αC_l)² ≠ 0``, so no eigenvalue is 0 and exactly ``|A| = P_θ/2``
    are negative, whatever ``S_BB`` and ``α > 0`` are (Sylvester's law of inertia). Otherwise the
    count comes from an ``L D Lᵀ`` factorisation of the dense ``H_θ(α)``
    (:func:`~signal_drift.spectra.inertia.count_below`).

    Returns:
        ``(count, method)``.
    """
    svals = blocks["sv"]
    top = max(float(s.max()) for s in svals)
    square = all(C.shape[0] == C.shape[1] for _, _, C in blocks["C"])
    if square and all(float(s.min()) > 1e-10 * top for s in svals):
        return sum(C.shape[0] for _, _, C in blocks["C"]), "exact: |A| (zero A block, invertible square C_l)"
    iB, S_BB = blocks["iB"], blocks["S_BB"]
    P = len(iB) + sum(C.shape[0] for _, _, C in blocks["C"])
    M = torch.zeros(P, P, dtype=S_BB.dtype, device=S_BB.device)
    M[iB[:, None], iB] = (a * a) * S_BB
    for iA_l, iB_l, C in blocks["C"]:
        M[iA_l[:, None], iB_l] = a * C
        M[iB_l[:, None], iA_l] = a * C.T
    low, high = count_below(M)
    if low != high:
        return low, f"LDLᵀ inertia: between {low} and {high} (eigenvalues within round-off of 0)"
    return low, "exact: LDLᵀ inertia"


def _append_nan(per, step: int) -> None:
    for k in per:
        per[k].append(step if k == "diverged_step" else float("nan"))


def _trace_mc(problem: LoraProblem, theta0, K, S1: torch.Tensor, alphas, cfg: SpectraConfig) -> dict:
    """Prop. 3 by Monte Carlo over A draws: exact ``tr(H_signal)`` per draw via ``s² tr(K AᵀA)``."""
    p1 = problem.with_alpha(1.0)

    ident = abs(signal_trace_at_init(p1, theta0, K) - float(torch.trace(S1))) / abs(float(torch.trace(S1)))
    vals = np.array(
        [signal_trace_at_init(p1, init_theta(problem, cfg.seed + 1 + i), K) for i in range(cfg.a_draws)]
    )
    band = mean_interval(vals, method=f"Student-t over {len(vals)} draws of A")
    return {
        "trace_identity_residual": ident,
        "a_draws": cfg.a_draws,
        "trace_signal_mc_mean": [a * a * band.estimate for a in alphas],
        "trace_signal_mc_interval": [band.map(lambda x, a=a: a * a * x).to_json() for a in alphas],
    }


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
    lines.append(
        f"(c) negative curvature: a share {frac['low']:.3f}…{frac['high']:.3f} (95 %; SLQ estimate"
        f" {frac['estimate']:.3f}) of H's eigenvalues is < 0; negative mass of H_θ {neg[0]:.3f} at"
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
