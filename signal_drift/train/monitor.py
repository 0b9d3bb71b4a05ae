"""Per-layer signal/drift of each optimizer step on a PEFT model (Prop. 1 in weight space).

For one adapted layer with scale ``s`` and a step ``(ΔA, ΔB)`` from ``(A, B)``:

    Δw_signal = s (ΔB A + B ΔA),     Δw_drift = s ΔB ΔA,     Δw = Δw_signal + Δw_drift.

The norms are computed from ``r × r`` Gram matrices, never forming an ``m × n`` matrix:
with ``P = [ΔB, B]`` (``m × 2r``) and ``Q = [A; ΔA]`` (``2r × n``), ``Δw_signal = s P Q`` and
``‖P Q‖²_F = tr(PᵀP · Q Qᵀ)``. Cost ``O((m + n) r²)`` per layer, nothing next to a forward pass.

:class:`SignalDriftMonitor` snapshots ``A`` and ``B`` before ``optimizer.step()`` and measures
after it; :class:`SignalDriftCallback` wires it into a ``transformers.Trainer``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

from .._errors import InputError
from ..scaling.peft import lora_modules

__all__ = ["StepNorms", "lora_step_norms", "SignalDriftMonitor", "SignalDriftCallback"]


@dataclass(frozen=True)
class StepNorms:
    """Norms of one layer's step in weight space.

    Attributes:
        signal: ``‖Δw_signal‖_F``.
        drift: ``‖Δw_drift‖_F``.
        cross: ``⟨Δw_signal, Δw_drift⟩_F``, so ``‖Δw‖² = signal² + drift² + 2 cross``.
    """

    signal: float
    drift: float
    cross: float

    @property
    def sdr(self) -> float:
        """Signal-to-drift ratio ``‖Δw_signal‖ / ‖Δw_drift‖`` (``inf`` when the drift is 0)."""
        return self.signal / self.drift if self.drift > 0 else math.inf

    @property
    def total(self) -> float:
        """``‖Δw‖_F`` of the whole step."""
        return math.sqrt(max(self.signal**2 + self.drift**2 + 2 * self.cross, 0.0))


def lora_step_norms(
    A: torch.Tensor, B: torch.Tensor, dA: torch.Tensor, dB: torch.Tensor, scale: float
) -> StepNorms:
    """Signal and drift norms of the step ``(ΔA, ΔB)`` from ``(A, B)`` (Prop. 1), in float64.

    Args:
        A: ``(r, n)`` down-projection before the step.
        B: ``(m, r)`` up-projection before the step.
        dA: ``(r, n)`` step of ``A``.
        dB: ``(m, r)`` step of ``B``.
        scale: the layer's LoRA scale ``s = γα/r`` (PEFT's ``scaling``).

    Returns:
        A :class:`StepNorms`.
    """
    if A.shape != dA.shape or B.shape != dB.shape or A.shape[0] != B.shape[1]:
        raise InputError(
            f"shapes do not form a LoRA step: A {tuple(A.shape)}, dA {tuple(dA.shape)}, "
            f"B {tuple(B.shape)}, dB {tuple(dB.shape)}"
        )
    A, B, dA, dB = (t.detach().to(torch.float64) for t in (A, B, dA, dB))
    P = torch.cat([dB, B], dim=1)  # (m, 2r)
    Q = torch.cat([A, dA], dim=0)  # (2r, n)
    sig2 = float((P.T @ P * (Q @ Q.T)).sum())
    dri2 = float((dB.T @ dB * (dA @ dA.T)).sum())
    cross = float((P.T @ dB * (Q @ dA.T)).sum())
    return StepNorms(
        signal=abs(scale) * math.sqrt(max(sig2, 0.0)),
        drift=abs(scale) * math.sqrt(max(dri2, 0.0)),
        cross=scale * scale * cross,
    )


@dataclass
class SignalDriftMonitor:
    """Record ``‖Δw_signal‖``, ``‖Δw_drift‖`` and SDR per adapted layer and per optimizer step.

    Usage::

        monitor = SignalDriftMonitor(peft_model)
        monitor.before_step(); optimizer.step(); monitor.after_step(step)

    ``history[layer]`` holds ``[step, signal, drift]`` rows (JSON-ready).
    """

    model: torch.nn.Module
    adapter: str = "default"
    history: dict[str, list[list[float]]] = field(default_factory=dict)
    _snap: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    def __post_init__(self):
        self._layers = lora_modules(self.model, self.adapter)
        if not self._layers:
            raise InputError("the model has no PEFT LoRA layers to monitor")

    def _ab(self, mod) -> tuple[torch.Tensor, torch.Tensor]:
        return mod.lora_A[self.adapter].weight, mod.lora_B[self.adapter].weight

    @torch.no_grad()
    def before_step(self) -> None:
        """Snapshot every layer's ``A`` and ``B`` (call right before ``optimizer.step()``)."""
        self._snap = {n: tuple(t.detach().clone() for t in self._ab(m)) for n, m in self._layers.items()}

    @torch.no_grad()
    def after_step(self, step: int) -> dict[str, StepNorms]:
        """Measure the step just taken against the snapshot; append to :attr:`history`."""
        if self._snap is None:
            raise RuntimeError("after_step() without before_step()")
        out = {}
        for name, mod in self._layers.items():
            A0, B0 = self._snap[name]
            A1, B1 = self._ab(mod)
            out[name] = n = lora_step_norms(A0, B0, A1 - A0, B1 - B0, float(mod.scaling[self.adapter]))
            self.history.setdefault(name, []).append([step, n.signal, n.drift])
        self._snap = None
        return out

    def summary(self) -> dict[str, float]:
        """Median over layers of the last step's SDR, and of its signal and drift norms."""
        last = [rows[-1] for rows in self.history.values() if rows]
        if not last:
            return {}
        return {
            "sdr_median": statistics.median(s / d if d > 0 else math.inf for _, s, d in last),
            "signal_median": statistics.median(s for _, s, _ in last),
            "drift_median": statistics.median(d for _, _, d in last),
        }


def _trainer_callback_base():
    try:
        from transformers import TrainerCallback  # optional dependency
    except ImportError:  # pragma: no cover - transformers is an optional extra
        return object
    return TrainerCallback


class SignalDriftCallback(_trainer_callback_base()):
    """``transformers.Trainer`` callback: per-layer signal/drift of every optimizer step.

    The medians over layers of the last step are added to the Trainer's logs and its
    ``state.log_history`` (``sdr_median``, ``signal_median``, ``drift_median``); the full
    per-layer history is in ``callback.monitor.history``.
    """

    def __init__(self, adapter: str = "default"):
        self.adapter = adapter
        self.monitor: SignalDriftMonitor | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        """Snapshot ``A`` and ``B`` before the optimizer moves them."""
        if self.monitor is None:
            self.monitor = SignalDriftMonitor(model, self.adapter)
        self.monitor.before_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Measure the step just taken (numbered like ``state.global_step`` after it)."""
        self.monitor.after_step(state.global_step + 1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the last step's medians over layers to ``logs`` and the Trainer's log history."""
        if self.monitor is None or logs is None:
            return
        summary = self.monitor.summary()
        logs.update(summary)  # seen by the callbacks after this one (printer, progress bar)
        if state.log_history:  # the Trainer appended its copy of ``logs`` before calling us
            state.log_history[-1].update(summary)
