"""Measured per-layer α: match each layer's signal curvature at init to its FFT curvature.

For an adapted layer ``W ∈ R^{m×n}`` with its actual LoRA init ``A ∈ R^{r×n}`` and ``B = 0``,
the signal Hessian of ``B`` is ``s² J0ᵀ H_ll J0`` with ``s = α/r``, ``J0 vec(Z) = vec(Z A)``,
and ``H_ll = ∇²_W L`` the layer's diagonal block of the FFT Hessian (Prop. 1, 3). Two ways to
make it match ``H_ll``:

- **trace** (the empirical Corollary 1, no Gaussian assumption on A or isotropy of H):
  ``α_tr = r · √(tr H_ll / tr(J0ᵀ H_ll J0))``, both traces by Hutchinson on per-layer HVPs.
- **λ_max**: ``α_λ = r · √(λ_max(H_ll) / λ_max(J0ᵀ H_ll J0))``, by Lanczos on per-layer HVPs.

The products come from the curvature engine (:func:`layer_blocks`): the model with LoRA
adapters (:func:`~signal_drift.hf.lm_problem`, α = r so that ``s = 1``) at ``θ = {A, B = 0}``;
per layer, ``H_ll`` is :func:`~signal_drift.hessian.fft_hessian` of the layer's one-adapter
problem (the diagonal block of the FFT Hessian) and ``J0ᵀ H_ll J0`` its signal operator
``JᵀHJ`` restricted to ``B`` and divided by ``s²``. HVPs are reverse-over-reverse through the
model, so any architecture and activation works; attention runs in its eager form, whose second
derivative exists everywhere.

Per-layer HVPs keep the other layers' blocks out of the estimate; a joint probe over all layers
is unbiased too but its variance carries every cross-layer block and was useless in practice.
Each per-layer product equals a full-model HVP whose direction is zero outside the layer, at
the price of about two backward passes of the calibration batch from the loss down to the
layer (the gradient graph is linearised once per layer). Cost: ``layers × 2 × (probes +
Lanczos steps + 1)`` such HVPs at most (Lanczos stops once converged).

With Gaussian A and isotropic curvature ``α_tr → √(r/σ²)`` (Corollary 1, Variant II). The
paper names the gap between the trace and λ_max criteria as open; ``α_λ / α_tr`` measures it.

**Precision.** A float64 model runs under :func:`~signal_drift.hf.float64_forward`: RMSNorm,
rotary embeddings and the attention softmax in float64, where ``transformers`` computes them in
float32. Calibrations made before the engine (with the model's own forward, otherwise the same
estimators: probes, Lanczos start vectors, acceptance) differ from today's by that float32
round-off propagated through the curvature: on the offline Llama at r = 8 with 8 × 128 tokens,
up to 3e-5 relative in the traces, 1e-5 in ``λ_max``, 1e-6 in ``α_λ`` and 4e-5 in an ``α_tr``
bound. Run under ``float64_forward``, the former code gives today's numbers to 1e-13.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .._errors import InputError, check_choice, check_positive_int
from ..decomposition import MappingJacobian, SignalOperator, block_indices
from ..hessian import fft_hessian
from ..hf import lm_problem
from ..io import atomic_write_text
from ..lm import build_base_model, check_model_dir, corpus_ids, load_model, sample_windows
from ..lora import LoraProblem
from ..operators import LinearOperator
from ..scaling import InitKind
from ..scaling.peft import lora_alpha_config, lora_modules, present_targets
from ..spectra.lanczos import EigResult, lanczos_eigs
from ..spectra.trace import TraceEstimate, hutchinson

__all__ = ["CalibrateConfig", "LayerCurvature", "layer_blocks", "calibrate_model",
           "lora_init", "CalibrationResult", "calibrate", "summarize"]  # fmt: skip


#: Relative Lanczos residual up to which a ``λ_max`` counts as converged (an eigenvalue lies within
#: it, so ``α_λ ∝ √λ`` is within half of it); beyond, the value is NaN with a warning.
LAMBDA_ACCEPT = 1e-4


@dataclass(frozen=True)
class CalibrateConfig:
    """Settings of :func:`calibrate` (the flags of ``python -m signal_drift.calibrate``).

    The settings ``model``, ``rank``, ``pretrain_steps``, ``seed``, ``out`` mean the same in every config
    (:data:`signal_drift.settings.COMMON_HELP`).

    Attributes:
        data: .txt or .jsonl calibration corpus (default: offline docstrings).
        targets: module-name suffixes, as in PEFT.
        init: the A init PEFT applies.
        samples: calibration sequences.
        seq_len: tokens per calibration sequence.
        probes: Hutchinson probes (shared by all layers).
        lanczos_steps: Lanczos steps per λ_max.
        dtype: precision of the model and every HVP.
    """

    model: str | None = None
    data: str | None = None
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    init: InitKind = "kaiming_uniform"
    samples: int = 8
    seq_len: int = 128
    probes: int = 64
    lanczos_steps: int = 150
    dtype: Literal["float64", "float32"] = "float64"
    pretrain_steps: int = 300
    seed: int = 0
    out: str = "out/calibrate"

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first invalid field."""
        for name in ("rank", "samples", "seq_len", "lanczos_steps"):
            check_positive_int(name, getattr(self, name))
        if self.probes < 2:
            raise InputError(
                f"probes={self.probes} is invalid: need >= 2 for an error bar", fields=["probes"]
            )
        check_choice("init", self.init, ("kaiming_uniform", "gaussian"))
        check_choice("dtype", self.dtype, ("float32", "float64"))
        if self.pretrain_steps < 0:
            raise InputError("pretrain_steps must be >= 0", fields=["pretrain_steps"])
        check_model_dir(self.model)


@dataclass(frozen=True)
class LayerCurvature:
    """One layer's curvature at init and the α each criterion gives.

    Attributes:
        name: module name in the base model.
        fan_in: ``n``; ``fan_out``: ``m``.
        sigma2: empirical variance of the layer's actual ``A``.
        tr_H, tr_H_se: Hutchinson estimate of ``tr H_ll`` and its standard error.
        tr_S, tr_S_se: the same for ``tr(J0ᵀ H_ll J0)``, from probes independent of ``tr_H``'s.
        lam_H, lam_S: ``λ_max(H_ll)`` and ``λ_max(J0ᵀ H_ll J0)`` by Lanczos (NaN if not positive
            or not converged).
        lam_H_residual, lam_S_residual: relative Lanczos residuals ``‖Av − λv‖ / |λ|``.
        alpha_trace: ``r √(tr H / tr S)`` (NaN unless both trace bands exclude 0 with one sign).
        alpha_trace_low, alpha_trace_high: its 95 % interval, from the two traces' 97.5 %
            Student-t bands (union bound; ``α`` is monotone in each trace).
        alpha_lambda: ``r √(λ_max H / λ_max S)`` (NaN unless both converged).
        alpha_gaussian: Corollary 1 with the empirical variance, ``√(r / σ²)``.
    """

    name: str
    fan_in: int
    fan_out: int
    sigma2: float
    tr_H: float
    tr_H_se: float
    tr_S: float
    tr_S_se: float
    lam_H: float
    lam_S: float
    lam_H_residual: float
    lam_S_residual: float
    alpha_trace: float
    alpha_trace_low: float
    alpha_trace_high: float
    alpha_lambda: float
    alpha_gaussian: float


def layer_blocks(problem: LoraProblem, layer: str, A: torch.Tensor) -> tuple[LinearOperator, LinearOperator]:
    """One adapted layer's FFT curvature ``H_ll`` and signal curvature ``J0ᵀ H_ll J0`` at init.

    Both come from the engine's operators on the layer's one-adapter problem ``P_l`` (the same
    model, data and loss, adapted at layer ``l`` only: every other weight at its base value,
    which at init, ``B = 0``, is ``w(θ)``), at ``θ_l = {A, B = 0}``:

    - ``H_ll =`` :func:`~signal_drift.hessian.fft_hessian` ``(P_l, θ_l)``, the Hessian over
      ``W_l`` alone: the diagonal block of the FFT Hessian over all adapted weights (equal to
      ``fft_hessian(problem, θ).restrict(...)`` on layer ``l``'s weights, tested);
    - ``J0ᵀ H_ll J0 = (Jᵀ H J)[B, B] / s²``: the :class:`~signal_drift.decomposition.SignalOperator`
      restricted to ``B`` (:func:`~signal_drift.decomposition.block_indices`), as ``J_B V = s V A``
      (the division is exact at ``s = 1``).

    Each product is one reverse-over-reverse HVP through the model (the gradient graph of
    ``W_l`` is linearised once, here): the full model's HVP with a direction zero outside the
    layer, costing about two backward passes of the data from the loss down to layer ``l`` (not
    through the other adapted weights' gradients, as the restriction of the all-layer ``H``
    would: the same numbers, in 1/1.8 (first layer) to 1/15 (last layer) of the time on the
    offline Llama with 8 × 128 tokens).

    Args:
        problem: the model with its adapted layers, data and loss (float64 for exact curvature).
        layer: name of an adapted layer, ``W_l [m, n]``.
        A: its ``A [r, n]`` (converted to the problem's dtype and device).

    Returns:
        ``(H_ll [m·n, m·n], J0ᵀ H_ll J0 [m·r, m·r])``, symmetric, vectors row-major (``vec W``,
        ``vec B``).

    Raises:
        InputError: ``layer`` is not adapted by ``problem``, or ``A`` is misshaped.

    Warns:
        PrecisionWarning: a model coarser than float64.
    """
    sub, theta = _layer_init(problem, layer, A)
    H = fft_hessian(sub, theta)
    signal = SignalOperator(MappingJacobian(sub, theta), H)
    return H, signal.restrict(block_indices(sub, "B")) * (1.0 / sub.adapters[0].scale ** 2)


def _layer_init(
    problem: LoraProblem, layer: str, A: torch.Tensor
) -> tuple[LoraProblem, dict[str, torch.Tensor]]:
    """Layer ``layer``'s one-adapter problem and its init ``θ_l = {A, B = 0}`` (validated)."""
    spec = next((a for a in problem.adapters if a.name == layer), None)
    if spec is None:
        raise InputError(f"layer {layer!r} is not adapted; adapted: {[a.name for a in problem.adapters][:5]}")
    sub = dataclasses.replace(problem, adapters=(spec,))
    dev = {"dtype": problem.dtype, "device": problem.device}
    theta = {spec.key_A: A.to(**dev), spec.key_B: torch.zeros(spec.fan_out, spec.rank, **dev)}
    sub.check_theta(theta, f"A of {layer!r}")
    return sub, theta


def calibrate_model(
    problem: LoraProblem,
    A: Mapping[str, torch.Tensor],
    *,
    probes: int = 64,
    lanczos_steps: int = 150,
    seed: int = 0,
    progress: bool = False,
    on_layer: Callable[[LayerCurvature], None] | None = None,
) -> list[LayerCurvature]:
    """Per-layer trace and λ_max calibration of α at init (see the module docstring).

    Args:
        problem: the model, data and loss with its adapted layers (e.g.
            :func:`~signal_drift.hf.lm_problem`; any ``α``: the operators divide by ``s²``).
        A: ``{layer: A [r, n]}``, the LoRA init actually used (``B = 0``), for the adapted layers
            to measure.
        probes: Hutchinson probes per layer and operator.
        lanczos_steps: Lanczos iterations per layer and operator.
        seed: seed of the probes and Lanczos start vectors.
        progress: show tqdm bars.
        on_layer: called with each finished layer (e.g. to write partial results).

    Returns:
        One :class:`LayerCurvature` per entry of ``A``, in order.

    Raises:
        InputError: an entry of ``A`` is not an adapted layer or is misshaped.

    Warns:
        PrecisionWarning: a model coarser than float64.
    """
    for name, a in A.items():  # refuse a bad entry before measuring any layer
        _layer_init(problem, name, a)
    out = []
    for name in tqdm(A, desc="calibrate layers", disable=not progress):
        rec = _measure(problem, name, A[name], probes, lanczos_steps, seed)
        out.append(rec)
        if on_layer is not None:
            on_layer(rec)
    return out


def _measure(problem: LoraProblem, name: str, A: torch.Tensor, probes: int, lanczos_steps: int, seed: int):
    """One layer's :class:`LayerCurvature` (its operators, and their graph, are freed on return)."""
    A = A.to(dtype=problem.dtype, device=problem.device)
    H, S = layer_blocks(problem, name, A)
    # independent probes for the two traces (a shared seed would make S's probes the
    # first m·r rows of H's, correlating the two estimates)
    tr_H, tr_S = hutchinson(H, probes, seed), hutchinson(S, probes, seed + 1)
    # iterate to 1e-8; accept a residual up to 1e-4 |λ| (then α_λ is within 5e-5 relative)
    eig_H = _accept_relative(lanczos_eigs(H, 1, "LA", steps=lanczos_steps, seed=seed, tol=1e-8))
    eig_S = _accept_relative(lanczos_eigs(S, 1, "LA", steps=lanczos_steps, seed=seed, tol=1e-8))
    warn = eig_H.checked(f"{name}: λ_max(H_ll)")[1] + eig_S.checked(f"{name}: λ_max(J0ᵀH_llJ0)")[1]
    for w in warn:
        warnings.warn(w, stacklevel=3)
    m, n = H.shape[0] // A.shape[1], A.shape[1]
    return _layer(name, (m, n), A, tr_H, tr_S, eig_H, eig_S)


def _accept_relative(eig: EigResult) -> EigResult:
    """Converged where ``‖Av − λv‖ ≤ LAMBDA_ACCEPT · |λ|`` (relative to the value itself, not to ``‖A‖``)."""
    conv = eig.residuals <= LAMBDA_ACCEPT * np.abs(eig.values)
    return replace(eig, converged=conv, accept=LAMBDA_ACCEPT)


def _layer(name, shape, A, tr_H: TraceEstimate, tr_S: TraceEstimate, eig_H: EigResult, eig_S: EigResult):
    r = A.shape[0]
    tH, tS = tr_H.value, tr_S.value
    # Away from a minimum tr H_ll can be negative; the criterion needs both traces of one sign,
    # resolved from zero, otherwise the ratio is noise and α_tr is NaN. Each band at 97.5 % makes
    # the α interval 95 % by the union bound; α = r √(tr H / tr S) is monotone in each trace.
    bH, bS = tr_H.interval(0.975), tr_S.interval(0.975)
    sign = 1.0 if bH.low > 0 and bS.low > 0 else -1.0 if bH.high < 0 and bS.high < 0 else 0.0
    if sign:
        (hl, hh), (sl, sh) = sorted((sign * bH.low, sign * bH.high)), sorted((sign * bS.low, sign * bS.high))
        a_tr, a_lo, a_hi = r * math.sqrt(tH / tS), r * math.sqrt(hl / sh), r * math.sqrt(hh / sl)
    else:
        a_tr = a_lo = a_hi = math.nan
    (lam_H,), _ = eig_H.checked()
    (lam_S,), _ = eig_S.checked()
    lam_H, lam_S = (float(v) if v > 0 else math.nan for v in (lam_H, lam_S))
    a_lam = r * math.sqrt(lam_H / lam_S) if math.isfinite(lam_H) and math.isfinite(lam_S) else math.nan
    sigma2 = float(A.detach().double().var(unbiased=False))
    rel = [float(e.residuals[-1] / max(abs(e.values[-1]), 1e-300)) for e in (eig_H, eig_S)]
    return LayerCurvature(
        name=name, fan_in=int(shape[1]), fan_out=int(shape[0]), sigma2=sigma2, tr_H=tH, tr_H_se=tr_H.stderr,
        tr_S=tS, tr_S_se=tr_S.stderr, lam_H=lam_H, lam_S=lam_S, lam_H_residual=rel[0], lam_S_residual=rel[1],
        alpha_trace=a_tr, alpha_trace_low=a_lo, alpha_trace_high=a_hi, alpha_lambda=a_lam,
        alpha_gaussian=math.sqrt(r / sigma2),
    )  # fmt: skip


def lora_init(model: torch.nn.Module, rank: int, targets: Sequence[str], init: str, seed: int) -> dict:
    """The A matrices PEFT draws for ``model`` (``{module name: A (r, n)}``).

    PEFT wraps the model in place (no copy of a large model), the A's are read, and the wrapping
    is undone: the modules and their ``requires_grad`` flags are as before.
    """
    from peft import get_peft_model  # optional dependency

    flags = [(p, p.requires_grad) for p in model.parameters()]
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model, lora_alpha_config(model, "rank", rank, target_modules=targets, init=init)
    )
    A = {n: m.lora_A["default"].weight.detach().clone() for n, m in lora_modules(peft_model).items()}
    peft_model.unload()
    for p, flag in flags:
        p.requires_grad_(flag)
    return A


@dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` returns, and what ``calibration.json`` holds at every point of a run.

    Attributes:
        config: the :class:`CalibrateConfig` as a dict, with ``model_dir`` and the ``targets``
            present in the model.
        layers: one :class:`LayerCurvature` per measured layer, in model order.
        complete: False while layers are still being measured (the fields below are then empty).
        warnings: the messages of unconverged ``λ_max`` (those values are NaN).
        alpha_pattern: ``{"trace" | "lambda": {module name: α}}``, the finite per-layer α of each
            criterion, a PEFT ``alpha_pattern`` (:func:`summarize`).
        gap_lambda_over_trace: the median ``α_λ / α_tr`` over layers (NaN if no layer has both).
    """

    config: dict
    layers: tuple[LayerCurvature, ...] = ()
    complete: bool = True
    warnings: tuple[str, ...] = ()
    alpha_pattern: dict[str, dict[str, float]] = field(default_factory=dict)
    gap_lambda_over_trace: float = math.nan

    def to_json(self) -> dict:
        """``calibration.json``: ``config``, ``layers``, ``complete`` and, once complete, the rest."""
        out = {"config": self.config, "layers": [asdict(d) for d in self.layers], "complete": self.complete}
        if self.complete:
            out |= {"warnings": list(self.warnings), "alpha_pattern": self.alpha_pattern,
                    "gap_lambda_over_trace": self.gap_lambda_over_trace}  # fmt: skip
        return json.loads(json.dumps(out))


def calibrate(cfg: CalibrateConfig, progress: bool = False, log=print) -> CalibrationResult:
    """Load (or build) the model, measure every targeted layer, write ``calibration.json`` and the PNG.

    ``calibration.json`` is rewritten after every layer (``"complete": false`` until the end).

    Returns:
        A complete :class:`CalibrationResult`: the layers, the PEFT ``alpha_pattern`` per
        criterion and the median ``α_λ / α_tr``.
    """
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.model is None:  # pre-trained where it will be measured
        model_dir = build_base_model(out / "base_model", cfg.pretrain_steps, cfg.seq_len, cfg.seed, progress,
                                     device=device)  # fmt: skip
    else:
        model_dir = Path(cfg.model)
    dtype = getattr(torch, cfg.dtype)
    model = load_model(model_dir, dtype=dtype, attn_implementation="eager")
    model.to(device)
    train_ids, _ = corpus_ids(model, model_dir, cfg.data)
    present = present_targets(model, cfg.targets)
    if not present:
        raise InputError(f"--targets {list(cfg.targets)} match no module of the model")
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = sample_windows(train_ids, cfg.samples, cfg.seq_len, gen)  # [N, T + 1]: one batch, all scored
    problem = lm_problem(model, batch, targets=present, rank=cfg.rank, init=cfg.init)  # α = r: s = 1
    A = lora_init(model, cfg.rank, present, cfg.init, cfg.seed)
    config = asdict(cfg) | {"model_dir": str(model_dir), "targets": present}
    layers: list[LayerCurvature] = []
    path = out / "calibration.json"

    def write(rec: LayerCurvature) -> None:
        layers.append(rec)
        partial = CalibrationResult(config, tuple(layers), complete=False)
        atomic_write_text(path, json.dumps(partial.to_json(), indent=1) + "\n")

    tokens = f"{cfg.samples}×{cfg.seq_len} tokens"
    log(f"calibrating {len(A)} layers (r={cfg.rank}, {cfg.init} A, {cfg.probes} probes, {tokens})")
    with warnings.catch_warnings(record=True) as caught:  # unconverged Lanczos values: NaN + a warning
        warnings.simplefilter("always")
        calibrate_model(problem, A, probes=cfg.probes, lanczos_steps=cfg.lanczos_steps, seed=cfg.seed,
                        progress=progress, on_layer=write)  # fmt: skip
    messages = tuple(str(w.message) for w in caught)
    for w in messages:
        log(f"warning: {w}")
    summary = summarize([asdict(d) for d in layers])
    result = CalibrationResult(config, tuple(layers), True, messages, summary["alpha_pattern"],
                               summary["gap_lambda_over_trace"])  # fmt: skip
    js = result.to_json()
    atomic_write_text(path, json.dumps(js, indent=1) + "\n")
    from .figure import plot_calibration  # here: importing it selects Agg

    plot_calibration(js, out / "calibration.png")
    return result


def summarize(layers: list[dict]) -> dict:
    """PEFT ``alpha_pattern`` per criterion and the median trace/λ_max gap over layers."""
    pattern = {
        crit: {d["name"]: d[f"alpha_{crit}"] for d in layers if math.isfinite(d[f"alpha_{crit}"])}
        for crit in ("trace", "lambda")
    }
    gaps = [d["alpha_lambda"] / d["alpha_trace"] for d in layers
            if math.isfinite(d["alpha_lambda"]) and math.isfinite(d["alpha_trace"])]  # fmt: skip
    return {"alpha_pattern": pattern, "gap_lambda_over_trace": statistics.median(gaps) if gaps else math.nan}
