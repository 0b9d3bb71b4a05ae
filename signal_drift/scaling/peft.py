"""LoRA-α for Hugging Face PEFT: a ``LoraConfig`` per scaling rule, read back from the model.

Every effective scale comes from :func:`signal_drift.scaling.lora_scale` of
:func:`signal_drift.scaling.effective_alpha` (one formula); this module only expresses it in
PEFT's terms (``lora_alpha``, ``use_rslora``, per-module ``alpha_pattern``) and reads PEFT's
``module.scaling[adapter]`` back so that tests can assert the two agree for every rule.

PEFT's A inits: ``init_lora_weights=True`` is Kaiming-uniform (a = √5), ``σ² = 1/(3n)``;
``"gaussian"`` is ``N(0, 1/r²)``, ``σ² = 1/r²``. Variant II uses the variance of the init that
PEFT will actually apply.

Requires the ``peft`` extra (``pip install signal-drift[peft]``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from torch import nn

from .._errors import InputError, check_positive_float, check_positive_int
from . import Rule, effective_alpha, lora_scale, variant_ii_alpha

__all__ = ["LLAMA_TARGETS", "target_linears", "present_targets", "expected_scales", "lora_alpha_config",
           "effective_scales", "lora_modules", "loraplus_param_groups"]  # fmt: skip

PeftInit = Literal["kaiming_uniform", "gaussian"]

#: The linear projections of a Llama block.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_linears(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules PEFT would wrap: full name, or a name ending in ``.<target>``."""
    out = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules)
    }
    if not out:
        raise InputError(f"target_modules={list(target_modules)} matches no nn.Linear of the model")
    return out


def present_targets(model: nn.Module, candidates: Sequence[str]) -> list[str]:
    """The entries of ``candidates`` that name (as a suffix ``.<target>``) a module of ``model``."""
    names = [n for n, _ in model.named_modules()]
    return [t for t in candidates if any(n.endswith("." + t) for n in names)]


def _sigma2(init: PeftInit, fan_in: int, rank: int) -> float:
    if init == "kaiming_uniform":
        return 1.0 / (3.0 * fan_in)
    if init == "gaussian":
        return 1.0 / rank**2
    raise InputError(f"init={init!r} is invalid: use 'kaiming_uniform' (PEFT default) or 'gaussian'")


def expected_scales(
    model: nn.Module,
    rule: Rule | str,
    rank: int,
    *,
    target_modules: Sequence[str] = LLAMA_TARGETS,
    gamma: float = 1.0,
    alpha: float = 16.0,
    base: float = 256.0,
    init: PeftInit = "kaiming_uniform",
) -> dict[str, float]:
    """``{module name: γ α_eff / r}`` for every targeted linear (the single scaling formula)."""
    out = {}
    for name, lin in target_linears(model, target_modules).items():
        if Rule(rule) is Rule.VARIANT2:
            a = variant_ii_alpha(rank, _sigma2(init, lin.in_features, rank))
        else:
            a = effective_alpha(rule, rank, alpha=alpha, base=base)
        out[name] = lora_scale(a, rank, gamma)
    return out


def lora_alpha_config(
    model: nn.Module,
    rule: Rule | str,
    rank: int,
    *,
    target_modules: Sequence[str] = LLAMA_TARGETS,
    gamma: float = 1.0,
    alpha: float = 16.0,
    base: float = 256.0,
    init: PeftInit = "kaiming_uniform",
    **lora_kwargs,
):
    """A PEFT ``LoraConfig`` whose effective scale on every module follows ``rule``.

    Call it on the base model *before* ``peft.get_peft_model`` (which wraps modules in place).

    - ``variant1``: ``use_rslora=True``, ``lora_alpha = γ·base`` ⇒ scale ``γ·256/√r``.
    - ``variant2``: ``alpha_pattern`` with ``γ·√(r/σ²)`` per module (its own fan-in and init).
    - ``rslora``: ``use_rslora=True``, ``lora_alpha = γ·alpha``.
    - ``rank`` / ``double_rank`` / ``fixed``: ``lora_alpha = γ·r`` / ``γ·2r`` / ``γ·alpha``.

    Args:
        model: the base model (used to find the targeted linears and their fan-ins).
        rule: a :class:`~signal_drift.scaling.Rule` or its value.
        rank: LoRA rank ``r`` (``1 ≤ r ≤ min(m, n)`` for every targeted linear).
        target_modules: module-name suffixes, as in PEFT.
        gamma: LoRA-α's ``γ`` multiplier.
        alpha: the constant of ``fixed`` and ``rslora``.
        base: Variant I's base.
        init: the ``A`` init PEFT will apply.
        **lora_kwargs: passed to ``LoraConfig`` (e.g. ``lora_dropout``, ``task_type``).
    """
    from peft import LoraConfig

    check_positive_int("rank", rank)
    check_positive_float("gamma", gamma)
    rule = Rule(rule)
    lins = target_linears(model, target_modules)
    for name, lin in lins.items():
        check_positive_int(f"rank (module {name!r}, weight {lin.out_features}x{lin.in_features})", rank,
                           min(lin.in_features, lin.out_features))  # fmt: skip
    kw: dict = {
        "r": rank,
        "target_modules": list(target_modules),
        "init_lora_weights": True if init == "kaiming_uniform" else "gaussian",
    }
    if rule in (Rule.VARIANT1, Rule.RSLORA):
        kw |= {"use_rslora": True, "lora_alpha": gamma * (base if rule is Rule.VARIANT1 else alpha)}
    elif rule is Rule.VARIANT2:
        scales = expected_scales(model, rule, rank, target_modules=target_modules, gamma=gamma, init=init)
        pattern = {name: s * rank for name, s in scales.items()}
        kw |= {"use_rslora": False, "lora_alpha": min(pattern.values()), "alpha_pattern": pattern}
    else:
        kw |= {"use_rslora": False, "lora_alpha": gamma * effective_alpha(rule, rank, alpha=alpha)}
    return LoraConfig(**(kw | lora_kwargs))


def effective_scales(peft_model: nn.Module, adapter: str = "default") -> dict[str, float]:
    """``{module name in the base model: module.scaling[adapter]}`` for every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.scaling:
            out[name.removeprefix("base_model.model.")] = float(mod.scaling[adapter])
    return out


def lora_modules(model: nn.Module, adapter: str = "default") -> dict[str, nn.Module]:
    """The PEFT LoRA layers of ``model`` by qualified name (without PEFT's wrapper prefix).

    A layer is recognised by its ``lora_A`` and ``scaling`` attributes, so this needs no import
    of ``peft``.

    Args:
        model: a PEFT-wrapped model (or the base model PEFT wrapped in place).
        adapter: the adapter name.

    Returns:
        ``{module name in the base model: LoRA layer}`` for every layer holding ``adapter``.
    """
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "scaling") and adapter in getattr(mod, "lora_A", {}):
            out[name.split("base_model.model.", 1)[-1]] = mod
    return out


def loraplus_param_groups(
    peft_model: nn.Module, lr: float, ratio: float = 16.0, adapter: str = "default"
) -> list[dict]:
    """LoRA+ parameter groups: ``B`` matrices at ``ratio × lr``, everything else trainable at ``lr``.

    Groups are built from the LoRA layers' own ``lora_B`` modules (no parameter-name matching).
    """
    from peft.tuners.lora import LoraLayer

    check_positive_float("lr", lr)
    check_positive_float("ratio", ratio)
    b_params = {id(p): p for m in peft_model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_B
                for p in m.lora_B[adapter].parameters()}  # fmt: skip
    rest = [p for p in peft_model.parameters() if p.requires_grad and id(p) not in b_params]
    if not b_params:
        raise InputError(f"no LoRA B matrices for adapter {adapter!r} in the model")
    return [{"params": rest, "lr": lr}, {"params": list(b_params.values()), "lr": lr * ratio}]


def describe(scales: dict[str, float], rank: int) -> str:
    """One line: the range of effective scales and the α they correspond to (``scale·r``)."""
    lo, hi = min(scales.values()), max(scales.values())
    return (
        f"scale {lo:.4g}…{hi:.4g} (α = scale·r = {lo * rank:.4g}…{hi * rank:.4g}; √r = {math.sqrt(rank):.3g})"
    )
