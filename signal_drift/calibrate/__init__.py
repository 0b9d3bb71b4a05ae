"""Measured per-layer α: match each layer's signal curvature at init to its FFT curvature.

For an adapted layer ``W ∈ R^{m×n}`` with its actual LoRA init ``A ∈ R^{r×n}`` and ``B = 0``,
the signal Hessian of ``B`` is ``s² J0ᵀ H_ll J0`` with ``s = α/r``, ``J0 vec(Z) = vec(Z A)``,
and ``H_ll = ∇²_W L`` the layer's diagonal block of the FFT Hessian (Prop. 1, 3). Two ways to
make it match ``H_ll``:

- **trace** (the empirical Corollary 1, no Gaussian assumption on A or isotropy of H):
  ``α_tr = r · √(tr H_ll / tr(J0ᵀ H_ll J0))``, both traces by Hutchinson on per-layer HVPs.
- **λ_max**: ``α_λ = r · √(λ_max(H_ll) / λ_max(J0ᵀ H_ll J0))``, by Lanczos on per-layer HVPs.

Per-layer HVPs (direction zero outside the layer) keep the other layers' blocks out of the
estimate; a joint probe over all layers is unbiased too but its variance carries every
cross-layer block and was useless in practice. Cost: ``layers × (2 probes + 2 Lanczos steps)``
HVPs, each about two backward passes of one calibration batch.

With Gaussian A and isotropic curvature ``α_tr → √(r/σ²)`` (Corollary 1, Variant II). The
paper names the gap between the trace and λ_max criteria as open; ``α_λ / α_tr`` measures it.

HVPs are reverse-over-reverse through the model (``autograd.grad`` of the retained gradient
graph of one calibration batch), so any architecture and activation works; attention is
loaded in its eager form, whose second derivative exists everywhere.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .._errors import InputError, check_choice, check_positive_int, warn_low_precision
from ..io import atomic_write_text
from ..lm import build_base_model, check_model_dir, corpus_ids, load_model, next_token_nll, sample_windows
from ..operators import FunctionOperator, LinearOperator
from ..scaling import InitKind
from ..scaling.peft import lora_alpha_config, lora_modules, present_targets
from ..spectra.lanczos import EigResult, lanczos_eigs
from ..spectra.trace import TraceEstimate, hutchinson

__all__ = ["CalibrateConfig", "LayerCurvature", "LayerHessians", "layer_operators", "calibrate_model",
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


class LayerHessians:
    """The diagonal blocks ``H_ll = ∇²_W L`` of one batch's loss, as HVPs on the targeted weights.

    The gradient graph is built once (``create_graph=True``) and every product reuses it.

    Args:
        loss: the batch loss, a scalar computed from the weights below.
        weights: ``{module name: weight tensor with requires_grad}``.
    """

    def __init__(self, loss: torch.Tensor, weights: dict[str, torch.Tensor]):
        self.names = list(weights)
        self.weights = [weights[n] for n in self.names]
        self.grads = torch.autograd.grad(loss, self.weights, create_graph=True)

    def block(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``V ↦ H_ll V`` for layer ``i`` (``V`` shaped like its weight)."""
        g, w = self.grads[i], self.weights[i]
        return lambda V: torch.autograd.grad(g, w, grad_outputs=V, retain_graph=True)[0]


def _columns(fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int]):
    """Lift ``fn`` on ``shape``-matrices to a batched map on ``[m·n, k]`` columns."""
    return lambda V: torch.stack([fn(v.reshape(shape)).reshape(-1) for v in V.T], dim=1)


def layer_operators(curv: LayerHessians, i: int, A: torch.Tensor) -> tuple[LinearOperator, LinearOperator]:
    """``H_ll`` on ``R^{m·n}`` and ``J0ᵀ H_ll J0`` on ``R^{m·r}`` (``Z ↦ (H_ll (Z A)) Aᵀ``)."""
    W = curv.weights[i]
    m, n = W.shape
    r = A.shape[0]
    block = curv.block(i)
    H = FunctionOperator(_columns(block, (m, n)), (m * n, m * n), W.dtype, W.device, symmetric=True)
    S = FunctionOperator(
        _columns(lambda Z: block(Z @ A) @ A.T, (m, r)), (m * r, m * r), W.dtype, W.device, symmetric=True
    )
    return H, S


def calibrate_model(
    model: torch.nn.Module,
    batch: torch.Tensor,
    A: dict[str, torch.Tensor],
    loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    *,
    probes: int = 64,
    lanczos_steps: int = 150,
    seed: int = 0,
    progress: bool = False,
    on_layer: Callable[[LayerCurvature], None] | None = None,
) -> list[LayerCurvature]:
    """Per-layer trace and λ_max calibration of α (see the module docstring).

    Args:
        model: the base model (B = 0 at init, so its Hessian is the FFT Hessian).
        batch: calibration inputs passed to ``loss_fn``.
        A: ``{module name: A (r, n)}``, the LoRA init actually used, for every targeted ``nn.Linear``.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        probes: Hutchinson probes per layer and operator.
        lanczos_steps: Lanczos iterations per layer and operator.
        seed: seed of the probes and Lanczos start vectors.
        progress: show tqdm bars.
        on_layer: called with each finished layer (e.g. to write partial results).

    Returns:
        One :class:`LayerCurvature` per entry of ``A``, in order.
    """
    mods = dict(model.named_modules())
    missing = [n for n in A if not isinstance(mods.get(n), torch.nn.Linear)]
    if missing:
        raise InputError(f"not nn.Linear modules of the model: {missing[:3]}")
    weights = {n: mods[n].weight for n in A}
    for n, a in A.items():
        W = weights[n]
        if a.ndim != 2 or a.shape[1] != W.shape[1] or not 1 <= a.shape[0] <= min(W.shape):
            raise InputError(
                f"A of {n!r} has shape {tuple(a.shape)}: need (r, {W.shape[1]}) with r <= {min(W.shape)}"
            )
    warn_low_precision("calibration curvature", next(iter(weights.values())).dtype)
    saved = [(w, w.requires_grad) for w in model.parameters()]
    for w in model.parameters():  # differentiate w.r.t. the targeted weights only
        w.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    try:
        curv = LayerHessians(loss_fn(model, batch), weights)
        out = []
        for i, name in enumerate(tqdm(curv.names, desc="calibrate layers", disable=not progress)):
            A_i = A[name].to(weights[name].dtype).to(weights[name].device)
            H, S = layer_operators(curv, i, A_i)
            # independent probes for the two traces (a shared seed would make S's probes the
            # first m·r rows of H's, correlating the two estimates)
            tr_H, tr_S = hutchinson(H, probes, seed), hutchinson(S, probes, seed + 1)
            # iterate to 1e-8; accept a residual up to 1e-4 |λ| (then α_λ is within 5e-5 relative)
            eig_H = _accept_relative(lanczos_eigs(H, 1, "LA", steps=lanczos_steps, seed=seed, tol=1e-8))
            eig_S = _accept_relative(lanczos_eigs(S, 1, "LA", steps=lanczos_steps, seed=seed, tol=1e-8))
            warn = eig_H.checked(f"{name}: λ_max(H_ll)")[1] + eig_S.checked(f"{name}: λ_max(J0ᵀH_llJ0)")[1]
            for w in warn:
                warnings.warn(w, stacklevel=2)
            rec = _layer(name, weights[name].shape, A_i, tr_H, tr_S, eig_H, eig_S)
            out.append(rec)
            if on_layer is not None:
                on_layer(rec)
        return out
    finally:
        for w, flag in saved:
            w.requires_grad_(flag)


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
    if cfg.model is None:
        model_dir = build_base_model(out / "base_model", cfg.pretrain_steps, cfg.seq_len, cfg.seed, progress)
    else:
        model_dir = Path(cfg.model)
    dtype = getattr(torch, cfg.dtype)
    model = load_model(model_dir, dtype=dtype, attn_implementation="eager")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    train_ids, _ = corpus_ids(model, model_dir, cfg.data)
    present = present_targets(model, cfg.targets)
    if not present:
        raise InputError(f"--targets {list(cfg.targets)} match no module of the model")
    A = lora_init(model, cfg.rank, present, cfg.init, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = sample_windows(train_ids, cfg.samples, cfg.seq_len, gen).to(next(model.parameters()).device)
    model.eval()
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
        calibrate_model(model, batch, A, next_token_nll, probes=cfg.probes, lanczos_steps=cfg.lanczos_steps,
                        seed=cfg.seed, progress=progress, on_layer=write)  # fmt: skip
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
