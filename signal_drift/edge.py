r"""Stability edges of GD and Adam on the LoRA Hessian, and what signal and drift contribute.

Lemma 1's edge is for gradient descent: on a quadratic with Hessian ``H_θ`` the iteration is
stable while ``η · λ_max(H_θ) < 2``. Adam with a frozen diagonal preconditioner
``P = diag(√v̂) + ε`` and first-moment EMA ``β₁`` is heavy-ball on ``P^{-1/2} H_θ P^{-1/2}``
with step ``η(1 − β₁)`` and momentum ``β₁``, stable while

.. math::

    η · λ_max(P^{-1} H_θ) < \frac{2 + 2β₁}{1 - β₁}\qquad(= 38 \text{ for } β₁ = 0.9)

(Cohen et al., "Adaptive Gradient Methods at the Edge of Stability", 2022);
``λ_max(P^{-1}H_θ)`` is the top eigenvalue of the symmetric ``P^{-1/2} H_θ P^{-1/2}``
(:class:`PreconditionedOperator`). Both edges are tested on quadratics against the iterations
themselves (``tests/test_edge.py``).

With ``H_θ = H_signal + H_drift`` (Prop. 1) the preconditioned sharpness splits at its top
eigenvector ``u``: ``λ = uᵀ P^{-1/2} H_signal P^{-1/2} u + uᵀ P^{-1/2} H_drift P^{-1/2} u``
(:class:`Sharpness` ``signal_share`` and ``drift_share``). The hypothesis this module lets one
test (docs/theory.md#adam-edge): at ``B = 0`` raising ``α`` by ``k`` scales the gradient and so
``P`` by ``k``, ``H_signal`` by ``k²`` and ``H_drift`` by ``k``, so the preconditioned signal grows
as ``k`` and the preconditioned drift not at all, while raising ``η`` by ``k`` multiplies both by
``k``; :func:`predict_breakdown` turns the base run's shares into the multiplier at which each
path is predicted to cross the edge.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ._errors import InputError
from .operators import LinearOperator, ParamLayout
from .spectra.lanczos import ACCEPT, EigResult, lanczos_eigs

__all__ = [
    "GD_EDGE",
    "adam_edge",
    "PreconditionedOperator",
    "adam_preconditioner",
    "torch_adam_state",
    "Sharpness",
    "sharpness",
    "columns",
    "from_json",
    "from_columns",
    "Breakdown",
    "predict_breakdown",
    "observed_breakdown",
    "format_k",
    "peft_sharpness",
    "SharpnessCallback",  # noqa: F822 - built on first access (module __getattr__)
]

#: GD on a quadratic is stable while ``η · λ_max(H) < 2`` (Lemma 1).
GD_EDGE = 2.0


def adam_edge(beta1: float = 0.9) -> float:
    """Adam's edge ``(2 + 2β₁)/(1 − β₁)`` on ``η · λ_max(P^{-1}H)`` (frozen preconditioner).

    >>> round(adam_edge(0.9), 9)
    38.0
    """
    if not 0 <= beta1 < 1:
        raise InputError(f"beta1={beta1} is invalid: need 0 <= beta1 < 1")
    return (2 + 2 * beta1) / (1 - beta1)


class PreconditionedOperator(LinearOperator):
    """``P^{-1/2} A P^{-1/2}`` for a symmetric operator ``A`` and a positive diagonal ``P``.

    Its eigenvalues are those of ``P^{-1} A``. ``[n, n]`` like ``A``.

    Args:
        op: symmetric ``[n, n]`` operator.
        p: the diagonal of ``P``, ``[n]``, positive and finite.

    Raises:
        InputError: ``p`` of the wrong length, or with an entry that is not positive and finite.
    """

    symmetric = True

    def __init__(self, op: LinearOperator, p: torch.Tensor):
        n = op.shape[0]
        if p.ndim != 1 or p.shape[0] != n:
            raise InputError(f"preconditioner: shape {tuple(p.shape)}, need [{n}] for a {n}×{n} operator")
        if not bool(torch.isfinite(p).all()) or not bool((p > 0).all()):
            raise InputError("preconditioner: every entry must be positive and finite")
        self.op = op
        self.d = p.to(device=op.device, dtype=op.dtype).rsqrt()[:, None]
        self.in_layout, self.out_layout = op.in_layout, op.out_layout
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.d * self.op.matmat(self.d * V)


def adam_preconditioner(
    v: Mapping[str, torch.Tensor],
    t: int,
    layout: ParamLayout,
    *,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The flat diagonal of Adam's preconditioner ``P = √(v / (1 − β₂ᵗ)) + ε``.

    Args:
        v: second moments ``{name: tensor}`` (the optimizer's ``exp_avg_sq``), after ``t`` steps.
        t: the step count the moments include (``≥ 1``).
        layout: the flat layout of ``θ`` (the operator's ``in_layout``).
        beta2: Adam's ``β₂``.
        eps: Adam's ``ε`` (added outside the square root, as ``torch.optim.Adam`` does).

    Returns:
        ``[|θ|]`` in ``layout`` order.
    """
    if t < 1:
        raise InputError(f"optimizer state: step count {t}; the preconditioner needs at least one step")
    corr = 1 - beta2**t
    return layout.flatten({n: (v[n] / corr).sqrt() + eps for n in layout.names})


def torch_adam_state(
    optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor], *, pending: bool = False
) -> tuple[dict[str, torch.Tensor], int, dict]:
    """Second moments, step count and hyper-parameters of a ``torch.optim`` Adam/AdamW.

    Args:
        optimizer: ``torch.optim.Adam`` or ``AdamW`` (``exp_avg_sq``, or ``max_exp_avg_sq`` with
            AMSGrad, and ``step`` per parameter).
        params: ``{name: parameter}``, the parameters to read, each in the optimizer.
        pending: the moments of the step about to be taken: each parameter's ``.grad`` (already
            computed, not yet applied) folded in, ``v ← β₂ v + (1 − β₂) g²`` and ``t ← t + 1``,
            as ``optimizer.step()`` will (from zero moments before the first step). This is the
            ``P`` that multiplies the update from the current ``θ``.

    Returns:
        ``(v, t, hyper)``: ``v = {name: second moment}`` (detached), the step count ``t`` and
        ``hyper = {"lr", "beta1", "beta2", "eps"}`` of the parameters' group.

    Raises:
        InputError: a parameter the optimizer does not hold, a group without ``betas``/``eps``
            (not Adam), ``maximize``, coupled weight decay (Adam's ``weight_decay``, which adds
            ``λI`` to the Hessian the update sees), no moments yet (no step taken and not
            ``pending``), a missing ``.grad`` with ``pending``, or parameters in groups with
            different hyper-parameters or step counts.
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    v, steps, hyper = {}, set(), set()
    for name, p in params.items():
        g = groups.get(id(p))
        if g is None:
            raise InputError(f"optimizer: does not hold parameter {name!r}")
        if "betas" not in g or "eps" not in g:
            raise InputError(f"optimizer: {type(optimizer).__name__} has no Adam state (betas, eps)")
        if g.get("maximize"):
            raise InputError("optimizer: maximize=True is not supported (the edge is for descent)")
        if g.get("weight_decay") and not (decoupled or g.get("decoupled_weight_decay")):
            raise InputError(
                "optimizer: Adam's coupled weight_decay adds λI to the Hessian the update sees; use AdamW "
                "(decoupled) or weight_decay=0"
            )
        b2 = float(g["betas"][1])
        key = "max_exp_avg_sq" if g.get("amsgrad") else "exp_avg_sq"
        st = optimizer.state.get(p, {})
        if key not in st and not pending:
            raise InputError(
                f"optimizer: no Adam second moment ({key}) for {name!r}; "
                f"{type(optimizer).__name__} is not Adam, or no step was taken yet"
            )
        old = st[key].detach() if key in st else torch.zeros_like(p.detach())
        t = int(st["step"]) if "step" in st else 0
        if pending:
            if p.grad is None:
                raise InputError(f"optimizer: parameter {name!r} has no .grad to fold into the pending step")
            gr = p.grad.detach()
            new = (
                b2 * (st["exp_avg_sq"].detach() if "exp_avg_sq" in st else torch.zeros_like(gr))
                + (1 - b2) * gr * gr
            )
            old, t = (torch.maximum(old, new) if g.get("amsgrad") else new), t + 1
        v[name] = old
        steps.add(t)
        hyper.add((float(g["lr"]), float(g["betas"][0]), b2, float(g["eps"])))
    if len(steps) != 1 or len(hyper) != 1:
        raise InputError("optimizer: the parameters have different step counts or hyper-parameters")
    lr, b1, b2, eps = hyper.pop()
    return v, steps.pop(), {"lr": lr, "beta1": b1, "beta2": b2, "eps": eps}


@dataclass(frozen=True)
class Sharpness:
    """GD's and Adam's sharpness of ``H_θ`` at one point, and the split of Adam's (Prop. 1).

    Every eigenvalue is Lanczos's top Ritz value with its true residual; one that did not
    converge is NaN, with a line in ``warnings`` saying how far it got.

    Attributes:
        step: training step the point belongs to (caller's numbering).
        lr: the learning rate ``η`` the ratios use.
        beta1: Adam's ``β₁`` (its edge is ``(2 + 2β₁)/(1 − β₁)``).
        lambda_max: ``λ_max(H_θ)``.
        lambda_max_residual: ``‖H_θ u − λ u‖``.
        preconditioned: ``λ_max(P^{-1/2} H_θ P^{-1/2})``.
        preconditioned_residual: its residual.
        signal_share: ``uᵀ P^{-1/2} H_signal P^{-1/2} u`` at the top eigenvector ``u``.
        drift_share: ``uᵀ P^{-1/2} H_drift P^{-1/2} u`` (``signal_share + drift_share =
            preconditioned`` to the Lanczos residual, Prop. 1).
        signal_max: ``λ_max(P^{-1/2} H_signal P^{-1/2})`` (NaN when not asked for).
        drift_max: ``λ_max(P^{-1/2} H_drift P^{-1/2})`` (NaN when not asked for).
        matvecs: operator products used in all.
        warnings: one line per value reported as NaN.
    """

    step: int
    lr: float
    beta1: float
    lambda_max: float
    lambda_max_residual: float
    preconditioned: float
    preconditioned_residual: float
    signal_share: float
    drift_share: float
    signal_max: float
    drift_max: float
    matvecs: int
    warnings: tuple[str, ...] = ()

    @property
    def gd_ratio(self) -> float:
        """``η · λ_max(H_θ) / 2``: GD is stable on the quadratic model below 1 (Lemma 1)."""
        return self.lr * self.lambda_max / GD_EDGE

    @property
    def edge_ratio(self) -> float:
        """``η · λ_max(P^{-1}H_θ) / ((2 + 2β₁)/(1 − β₁))``: Adam with this ``P`` is stable below 1."""
        return self.lr * self.preconditioned / adam_edge(self.beta1)

    @property
    def drift_fraction(self) -> float:
        """``drift_share / preconditioned``: the part of Adam's sharpness that comes from drift."""
        return self.drift_share / self.preconditioned if self.preconditioned else math.nan

    def to_json(self) -> dict:
        """Every field and the three derived ratios, JSON-ready."""
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d | {
            "gd_ratio": self.gd_ratio,
            "edge_ratio": self.edge_ratio,
            "drift_fraction": self.drift_fraction,
        }


def _top(op: LinearOperator, steps: int, tol: float, accept: float, seed: int, name: str, warn: list[str]):
    res: EigResult = lanczos_eigs(op, 1, "LA", steps=steps, seed=seed, tol=tol, accept=accept)
    ok = bool(res.converged[-1])
    if not ok:
        warn.append(
            f"{name} = {res.values[-1]:.6g} not converged after {res.matvecs} products "
            f"(residual {res.residuals[-1]:.2e} > {accept:g} relative; raise the Lanczos steps): "
            "reported as NaN"
        )
    return (float(res.values[-1]) if ok else math.nan), float(res.residuals[-1]), res


def sharpness(
    H_theta: LinearOperator,
    drift: LinearOperator,
    precond: torch.Tensor,
    lr: float,
    *,
    signal: LinearOperator | None = None,
    beta1: float = 0.9,
    step: int = 0,
    lanczos_steps: int = 100,
    tol: float = 1e-9,
    accept: float = ACCEPT,
    parts: bool = True,
    seed: int = 0,
    label: str = "",
) -> Sharpness:
    """GD's and Adam's sharpness of ``H_θ`` and the signal/drift split of Adam's.

    Args:
        H_theta: ``H_θ``, ``[|θ|, |θ|]`` (autograd, or ``H_signal + H_drift``).
        drift: ``H_drift = Σ g_k T_k`` at the same point.
        precond: the diagonal of Adam's ``P`` (:func:`adam_preconditioner`), ``[|θ|]``.
        lr: learning rate ``η``.
        signal: ``H_signal``; without it ``signal_share`` is ``preconditioned − drift_share``
            (Prop. 1) and ``signal_max`` is NaN.
        beta1: Adam's ``β₁``.
        step: the training step, stored in the record.
        lanczos_steps: cap on Lanczos steps per eigenvalue.
        tol: Lanczos stops when the top pair's residual estimate is below ``tol · max|θ_i|``.
        accept: a pair counts as converged when its true residual is within ``accept`` of the
            largest Ritz value.
        parts: also the top eigenvalues of the preconditioned signal and drift alone.
        seed: Lanczos start vectors.
        label: prefix of the warnings (e.g. the run's name and step).

    Returns:
        A :class:`Sharpness`.
    """
    warn: list[str] = []
    at = f"{label}: " if label else ""
    lam, lam_res, r0 = _top(H_theta, lanczos_steps, tol, accept, seed, f"{at}λ_max(H_θ)", warn)
    pre_op = PreconditionedOperator(H_theta, precond)
    pre, pre_res, r1 = _top(pre_op, lanczos_steps, tol, accept, seed + 1, f"{at}λ_max(P⁻¹H_θ)", warn)
    u = torch.as_tensor(r1.vectors[:, -1:], dtype=H_theta.dtype, device=H_theta.device)
    pre_d = PreconditionedOperator(drift, precond)
    q_d = float((u * pre_d.matmat(u)).sum())
    matvecs = r0.matvecs + r1.matvecs + 1
    sig_max = dri_max = math.nan
    if signal is not None:
        pre_s = PreconditionedOperator(signal, precond)
        q_s = float((u * pre_s.matmat(u)).sum())
        matvecs += 1
    else:
        q_s = float(r1.values[-1]) - q_d
    if not math.isfinite(pre):
        q_s = q_d = math.nan
    if parts:
        dri_max, _, r3 = _top(pre_d, lanczos_steps, tol, accept, seed + 3, f"{at}λ_max(P⁻¹H_drift)", warn)
        matvecs += r3.matvecs
        if signal is not None:
            sig_max, _, r2 = _top(
                pre_s, lanczos_steps, tol, accept, seed + 2, f"{at}λ_max(P⁻¹H_signal)", warn
            )
            matvecs += r2.matvecs
    return Sharpness(step, float(lr), float(beta1), lam, lam_res, pre, pre_res, q_s, q_d, sig_max, dri_max,
                     matvecs, tuple(warn))  # fmt: skip


#: The per-record columns of a run's sharpness table in the JSON files.
COLUMNS = ("step", "lr", "beta1", "lambda_max", "preconditioned", "signal_share", "drift_share", "signal_max",
           "drift_max", "gd_ratio", "edge_ratio", "drift_fraction", "matvecs")  # fmt: skip


def columns(records: Sequence[Sharpness | Mapping]) -> dict[str, list]:
    """A run's records as ``{column: [value per record]}`` (:data:`COLUMNS`); dicts: ``to_json()``'s."""
    rows = [r.to_json() if isinstance(r, Sharpness) else r for r in records]
    return {c: [row.get(c, math.nan) for row in rows] for c in COLUMNS}


def from_columns(cols: Mapping[str, Sequence]) -> list[Sharpness]:
    """The records of a :func:`columns` table (``beta1`` 0.9 where the table predates that column)."""
    names = [n for n in Sharpness.__dataclass_fields__ if n != "warnings"]
    n = len(cols["step"])
    rows = [
        {k: (cols[k][i] if k in cols else (0.9 if k == "beta1" else math.nan)) for k in names}
        for i in range(n)
    ]
    return [Sharpness(**row) for row in rows]


def from_json(row: Mapping) -> Sharpness:
    """The :class:`Sharpness` of a ``to_json()`` dict."""
    names = Sharpness.__dataclass_fields__
    return Sharpness(**{k: (tuple(v) if k == "warnings" else v) for k, v in row.items() if k in names})


@dataclass(frozen=True)
class Breakdown:
    """Where each path is predicted to cross Adam's edge, and where it broke down.

    With ``P`` frozen at the base run's, the η-path ``(α0, kη0)`` multiplies
    ``η·P^{-1/2}H_θP^{-1/2}`` by ``k``: it crosses at exactly ``k_η = 1/ρ`` (``ρ`` the edge ratio).
    The α-path ``(kα0, η0)`` under the B = 0 scaling (module docstring) has
    ``P^{-1/2}H_θP^{-1/2} → k S̃ + D̃`` (``S̃``, ``D̃`` the preconditioned signal and drift). The
    drift is block off-diagonal between A and B, and so is ``D̃``: its spectrum is symmetric,
    ``λ_min(D̃) = −λ_max(D̃)``, and Weyl's inequalities give
    ``k λ_max(S̃) − λ_max(D̃) ≤ λ_max(k S̃ + D̃) ≤ k λ_max(S̃) + λ_max(D̃)``: the crossing lies in

    ``[(1 − ρ_D)/ρ_S, (1 + ρ_D)/ρ_S]``, ``ρ_S = η λ_max(S̃)/edge``, ``ρ_D = η λ_max(D̃)/edge``

    (the lower end clipped at 0: ``ρ_D ≥ 1`` means the drift alone may already cross). Over the
    base run's records, the earliest crossing counts: ``k_η = min_t 1/ρ_t`` and the α range is
    ``[min_t lo_t, min_t hi_t]``.

    Attributes:
        predicted_eta: ``k_η``.
        predicted_alpha: ``[lo, hi]``, the range of ``k_α`` (``None`` without the signal and
            drift maxima in the records).
        observed_eta: the first multiplier of the η-path that broke down, or None.
        observed_alpha: the same on the α-path.
        last_stable_eta: the largest multiplier below ``observed_eta`` that did not (None: none).
        last_stable_alpha: the same on the α-path.
        within_2_eta: whether ``[k_η/2, 2k_η]`` meets the interval the grid leaves for the
            breakdown, ``(last stable, observed]`` (``(largest k, ∞)`` where no run broke down).
        within_2_alpha: whether ``[lo/2, 2 hi]`` meets it on the α-path.
        records_used: the base-run steps the prediction used.
        max_edge_ratio: ``max_t ρ_t`` of the base run.
        drift_fraction: the drift share at the top eigenvector at the step of ``max_t ρ_t``.
        step_of_max: that step.
    """

    predicted_eta: float
    predicted_alpha: list[float] | None
    observed_eta: float | None
    observed_alpha: float | None
    last_stable_eta: float | None
    last_stable_alpha: float | None
    within_2_eta: bool
    within_2_alpha: bool
    records_used: list[int]
    max_edge_ratio: float
    drift_fraction: float
    step_of_max: int

    def to_json(self) -> dict:
        """JSON-ready (``inf`` as a string)."""

        def enc(v):
            if isinstance(v, float) and math.isinf(v):
                return "inf"
            return [enc(x) for x in v] if isinstance(v, list) else v

        return {k: enc(v) for k, v in asdict(self).items()}


def format_k(x, none: str = "n/a") -> str:
    """A multiplier of :meth:`Breakdown.to_json` for tables and CLIs: ``[lo, hi]`` for a range, ``∞``.

    >>> format_k([645.2, "inf"]), format_k(3.917), format_k(None, "none in the grid")
    ('[645, ∞]', '3.92', 'none in the grid')
    """
    if x is None:
        return none
    if isinstance(x, list):
        return f"[{format_k(x[0])}, {format_k(x[1])}]"
    x = float(x)
    return "∞" if math.isinf(x) else f"{x:.3g}"


def observed_breakdown(outcomes: Mapping[float, bool]) -> tuple[float | None, float | None]:
    """``(first multiplier that broke down, largest one below it that did not)`` on one path.

    Args:
        outcomes: ``{k: broke_down}``.
    """
    ks = sorted(outcomes)
    first = next((k for k in ks if outcomes[k]), None)
    below = [k for k in ks if not outcomes[k] and (first is None or k < first)]
    return first, (max(below) if below else None)


def _within_2(lo: float, hi: float, observed: float | None, stable: float | None, largest: float) -> bool:
    """Whether ``[lo/2, 2 hi]`` meets the interval the grid leaves for the breakdown."""
    a, b = (largest, math.inf) if observed is None else (stable or 0.0, observed)
    if not math.isfinite(lo):
        return observed is None
    return hi * 2 > a and lo / 2 <= b


def predict_breakdown(
    base: Sequence[Sharpness],
    eta_outcomes: Mapping[float, bool],
    alpha_outcomes: Mapping[float, bool],
    *,
    min_step: int = 1,
    max_step: int | None = None,
) -> Breakdown:
    """Predicted vs observed breakdown multipliers of both paths (paper Eq. 2) from the base run.

    Args:
        base: the base run's :class:`Sharpness` records (``k = 1`` on both paths).
        eta_outcomes: ``{k: broke down}`` on the η-path (divergence, or a final loss worse than
            before fine-tuning).
        alpha_outcomes: the same on the α-path.
        min_step: records before this step are left out. At step 0 (before the first update)
            ``v`` holds only the first gradient, taken at ``B = 0`` where ``∇_A L = 0``: ``P_A = ε``
            exactly and the frozen-preconditioner edge does not describe the next steps.
        max_step: records after this step are left out (None: none). The α-path scaling holds
            near ``B = 0``; later, Adam's ``v`` adapts to each run's own trajectory.

    Raises:
        InputError: no record at or after ``min_step`` with a finite preconditioned sharpness.
    """
    last = math.inf if max_step is None else max_step
    recs = [
        s
        for s in base
        if min_step <= s.step <= last and math.isfinite(s.preconditioned) and s.preconditioned > 0
    ]
    if not recs:
        window = f"step >= {min_step}" + ("" if max_step is None else f" and <= {max_step}")
        raise InputError(f"base run: no converged preconditioned sharpness at {window} to predict from")
    rho = np.array([s.edge_ratio for s in recs])
    i = int(np.argmax(rho))
    k_eta = float(1 / rho[i])
    edge = np.array([adam_edge(s.beta1) / s.lr if s.lr > 0 else math.inf for s in recs])
    rs = np.array([s.signal_max for s in recs]) / edge
    rd = np.array([s.drift_max for s in recs]) / edge
    ok = np.isfinite(rs) & np.isfinite(rd) & (rs > 0)
    k_alpha = None
    if ok.any():
        lo = np.maximum((1 - rd[ok]) / rs[ok], 0.0)
        hi = (1 + rd[ok]) / rs[ok]
        k_alpha = [float(lo.min()), float(hi.min())]
    oe, se = observed_breakdown(eta_outcomes)
    oa, sa = observed_breakdown(alpha_outcomes)
    a_lo, a_hi = (math.inf, math.inf) if k_alpha is None else k_alpha
    return Breakdown(
        k_eta, k_alpha, oe, oa, se, sa,
        _within_2(k_eta, k_eta, oe, se, max(eta_outcomes, default=1.0)),
        _within_2(a_lo, a_hi, oa, sa, max(alpha_outcomes, default=1.0)),
        [s.step for s in recs], float(rho[i]), float(recs[i].drift_fraction), recs[i].step,
    )  # fmt: skip


# -- PEFT models and transformers.Trainer ------------------------------------------------------
def peft_sharpness(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data,
    *,
    adapter: str | None = None,
    step: int = 0,
    lanczos_steps: int = 40,
    tol: float = 1e-9,
    accept: float = ACCEPT,
    parts: bool = True,
    dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
    pending: bool = False,
    distributed: bool = False,
) -> Sharpness:
    """:func:`sharpness` of a PEFT LoRA model under its ``torch.optim`` Adam/AdamW, on ``data``.

    The model is read with :func:`~signal_drift.hf.from_peft` (a ``dtype`` copy in eval mode,
    float64 by default, so the Lanczos residuals mean something; ``None`` measures the model in
    place), ``P`` from the optimizer's own ``exp_avg_sq`` and step count
    (:func:`torch_adam_state`), ``H_θ`` by autograd, ``H_drift`` in closed form and, with
    ``parts``, ``H_signal = JᵀHJ`` through the LM curvature engine. ``lr`` and ``β₁`` are the
    optimizer's. AdamW's decoupled weight decay (which shrinks θ outside ``P``) is not in the edge.

    Args:
        model: a ``peft.PeftModel`` with LoRA adapters, trained by ``optimizer``.
        optimizer: ``torch.optim.Adam`` or ``AdamW`` (after at least one step).
        data: token ids ``[N, T]`` or batches (:func:`~signal_drift.hf.lm_batches`): the cost of
            every product is one forward and backward over them.
        adapter: adapter name (default: the active one).
        step: the training step, stored in the record.
        lanczos_steps: cap on Lanczos steps per eigenvalue (2 to 4 eigenvalues per call).
        tol: Lanczos stopping tolerance (see :func:`sharpness`).
        accept: relative residual that counts as converged.
        parts: also ``λ_max`` of the preconditioned signal and drift alone (one more Lanczos each).
        dtype: precision of the measurement.
        seed: Lanczos start vectors.
        pending: measure with the ``P`` of the step about to be taken (call between
            ``backward()`` and ``optimizer.step()``; :func:`torch_adam_state`); otherwise with the
            ``P`` of the last step taken.
        distributed: ``data`` is this process's share under ``torchrun``; every process must call
            this with its share (products are all-reduced; every process gets the same record).

    Raises:
        InputError: a model without LoRA layers, an optimizer without Adam state, or what
            :func:`~signal_drift.hf.from_peft` refuses.
    """
    from .decomposition import DriftOperator, MappingJacobian, SignalOperator
    from .hessian import fft_hessian, lora_hessian
    from .hf import from_peft
    from .lora import _eval_mode
    from .scaling.peft import lora_modules

    inner = getattr(model, "module", model)  # a DDP wrapper's model
    name = adapter or _active_adapter(inner)
    live = lora_modules(inner, name)
    if not live:
        raise InputError(
            f"model: has no PEFT LoRA layers for adapter {name!r} (wrap it with peft.get_peft_model)"
        )
    params = {}
    measured = inner if dtype is None else copy.deepcopy(inner).to(dtype)
    with _eval_mode(measured):
        problem, theta = from_peft(measured, data, adapter=name, distributed=distributed)
        for a in problem.adapters:
            mod = live[a.name]
            params[a.key_A], params[a.key_B] = mod.lora_A[name].weight, mod.lora_B[name].weight
        v, t, hyper = torch_adam_state(optimizer, params, pending=pending)
        v = {k: x.to(device=problem.device, dtype=problem.dtype) for k, x in v.items()}
        P = adam_preconditioner(v, t, problem.theta_layout, beta2=hyper["beta2"], eps=hyper["eps"])
        Ht = lora_hessian(problem, theta)
        D = DriftOperator(problem, theta)
        S = SignalOperator(MappingJacobian(problem, theta), fft_hessian(problem, theta)) if parts else None
        return sharpness(Ht, D, P, hyper["lr"], signal=S, beta1=hyper["beta1"], step=step,
                         lanczos_steps=lanczos_steps, tol=tol, accept=accept, parts=parts, seed=seed,
                         label=f"step {step}")  # fmt: skip


def _active_adapter(model: torch.nn.Module) -> str:
    active = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", "default")]
    return active[0]


def __getattr__(name: str):
    """Build ``SharpnessCallback`` on first use.

    Subclassing ``transformers.TrainerCallback`` imports ``transformers.trainer_utils`` (and PEFT):
    seconds that importing this module (and ``dynamics``) should not cost.
    """
    if name == "SharpnessCallback":
        cls = _sharpness_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sharpness_callback() -> type:
    try:
        from transformers import TrainerCallback as base  # optional dependency
    except ImportError:  # pragma: no cover - transformers is an optional extra
        base = object

    class SharpnessCallback(base):
        """``transformers.Trainer`` callback: GD's and Adam's sharpness of the LoRA Hessian every N steps.

        Before every ``every``-th optimizer update (and each of the first ``early``), on a fixed
        ``data`` batch,
        :func:`peft_sharpness` measures ``λ_max(H_θ)``, Adam's preconditioned sharpness with the
        optimizer's own ``v``, the edge ratio ``η·λ_max(P⁻¹H_θ)/((2+2β₁)/(1−β₁))``, GD's ratio
        ``η·λ_max(H_θ)/2`` and the drift share. Each record is appended to ``state.log_history``
        (keys ``sharpness/...``) and to :attr:`records`; the first time the edge ratio reaches ``warn_at``
        a ``UserWarning`` says so (once per run). ``η`` is the optimizer's current learning rate: after
        the scheduler's step, the rate of the next update.

        Cost per record: ``2–4`` Lanczos runs of at most ``lanczos_steps`` Hessian-vector products on
        ``data``, each one forward and two backwards in ``dtype`` (bounded by the batch and the steps).

        Args:
            data: token ids ``[N, T]`` (or batches) to measure on, e.g. a few training windows.
            every: record every this many optimizer steps (``> 0``).
            early: also record at each of the first this many steps.
            lanczos_steps: cap per eigenvalue.
            parts: also the preconditioned signal and drift maxima.
            warn_at: warn once when the edge ratio reaches this (default 0.8).
            dtype: precision of the measurement (float64 copy of the model by default).

        Raises:
            InputError: ``every <= 0``; at the first record, a model without LoRA layers or an
                optimizer without Adam state.
        """

        def __init__(
            self,
            data,
            every: int = 50,
            *,
            early: int = 0,
            lanczos_steps: int = 40,
            parts: bool = True,
            warn_at: float = 0.8,
            dtype: torch.dtype | None = torch.float64,
        ):
            if not isinstance(every, int) or every <= 0:
                raise InputError(f"every={every!r} is invalid: need a positive number of steps")
            if not isinstance(early, int) or early < 0:
                raise InputError(f"early={early!r} is invalid: need a number of steps >= 0")
            self.data, self.every, self.early = data, every, early
            self.lanczos_steps, self.parts, self.warn_at, self.dtype = lanczos_steps, parts, warn_at, dtype
            self.records: list[Sharpness] = []
            self.warned = False

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            """Measure at the current θ with the ``P`` and ``η`` of the update about to be taken.

            The record's step is ``state.global_step``, the number of updates already taken.
            """
            step = state.global_step
            if not (step % self.every == 0 or step < self.early):
                return
            opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
            rec = peft_sharpness(model, opt, self.data, step=step, lanczos_steps=self.lanczos_steps,
                                 parts=self.parts, dtype=self.dtype, pending=True)  # fmt: skip
            self.records.append(rec)
            js = rec.to_json()
            keys = ("lambda_max", "preconditioned", "gd_ratio", "edge_ratio", "drift_fraction", "signal_max",
                    "drift_max")  # fmt: skip
            entry = {f"sharpness/{k}": js[k] for k in keys}
            state.log_history.append({"step": step, **entry})
            for w in rec.warnings:
                warnings.warn(w, stacklevel=2)
            # step 0: v_A = 0 (B = 0 makes ∇_A L = 0), P_A = ε: the frozen-P edge says nothing yet
            if (
                step > 0
                and not self.warned
                and math.isfinite(rec.edge_ratio)
                and rec.edge_ratio >= self.warn_at
            ):
                self.warned = True
                warnings.warn(
                    f"step {step}: η·λ_max(P⁻¹H_θ) is {rec.edge_ratio:.0%} of Adam's edge "
                    f"{adam_edge(rec.beta1):.3g} (drift share {rec.drift_fraction:.2f}): the run is near its "
                    "stability limit",
                    stacklevel=2,
                )

    SharpnessCallback.__module__ = __name__
    SharpnessCallback.__qualname__ = "SharpnessCallback"
    return SharpnessCallback
