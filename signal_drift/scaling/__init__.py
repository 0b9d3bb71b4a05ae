"""LoRA scaling rules, computed in exactly one place, and the paper's Table 6.

Every rule returns the *effective* ``α`` in ``W = W0 + γ (α / r) B A``; :func:`lora_scale`
is the single formula for the factor multiplying ``B A``.

Rules (docs/theory.md#lora-alpha):

- ``rank``: the heuristic ``α = r`` (scale 1).
- ``double_rank``: ``α = 2r``.
- ``fixed``: a constant ``α`` (e.g. 16).
- ``rslora``: rsLoRA, scale ``α / sqrt(r)``, i.e. effective ``α_eff = α sqrt(r)``.
- ``variant1``: LoRA-α Variant I, ``α* = base sqrt(r)`` with ``base = 256``.
- ``variant2``: LoRA-α Variant II, ``α* = sqrt(r / σ²)`` per layer (Corollary 1), ``σ²`` the
  variance of the entries of ``A`` at init; Kaiming-uniform gives ``σ² = 1/(3 n)`` and
  ``α* = sqrt(3 n r)``.

CLI: ``python -m signal_drift.scaling --fan-in 4096 --ranks 1 4 8 16 32 64 128 256``
prints Table 6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import Literal

from .._errors import InputError, check_positive_float, check_positive_int

__all__ = [
    "Rule",
    "InitKind",
    "lora_scale",
    "init_variance",
    "effective_alpha",
    "variant_ii_alpha",
    "table6",
]

InitKind = Literal["gaussian", "kaiming_uniform"]


class Rule(str, Enum):
    """Scaling rules for the LoRA factor ``α``."""

    RANK = "rank"
    DOUBLE_RANK = "double_rank"
    FIXED = "fixed"
    RSLORA = "rslora"
    VARIANT1 = "variant1"
    VARIANT2 = "variant2"


def lora_scale(alpha: float, rank: int, gamma: float = 1.0) -> float:
    """The factor ``γ α / r`` multiplying ``B A`` (the one scaling formula).

    >>> lora_scale(16, 4), lora_scale(16, 4, gamma=2.0)
    (4.0, 8.0)

    Raises:
        InputError: ``rank`` not an integer ``>= 1``, ``alpha`` or ``gamma`` not finite ``> 0``.
    """
    r = check_positive_int("rank", rank)
    return check_positive_float("gamma", gamma) * check_positive_float("alpha", alpha) / r


def init_variance(init: InitKind, fan_in: int, std: float | None = None) -> float:
    """Variance ``σ²`` of the entries of ``A`` under an init scheme.

    Args:
        init: ``"gaussian"`` (``N(0, std²)``, ``std = 1/sqrt(fan_in)`` by default) or
            ``"kaiming_uniform"`` (PEFT's default, ``U(-1/sqrt(n), 1/sqrt(n))``).
        fan_in: input size ``n`` of the layer.
        std: Gaussian standard deviation.

    >>> init_variance("kaiming_uniform", 3)
    0.1111111111111111

    """
    check_positive_int("fan_in", fan_in)
    if init == "gaussian":
        return (1.0 / fan_in) if std is None else check_positive_float("init_std", std) ** 2
    if init == "kaiming_uniform":
        return 1.0 / (3.0 * fan_in)
    raise InputError(f"init={init!r} is invalid: use 'gaussian' or 'kaiming_uniform'")


def variant_ii_alpha(rank: int, sigma2: float) -> float:
    """Corollary 1: ``α* = sqrt(r / σ²)`` (so that ``α*² ρ = 1`` with ``ρ = σ² / r``).

    >>> round(variant_ii_alpha(1, 1 / (3 * 4096)), 2)
    110.85
    """
    check_positive_int("rank", rank)
    return math.sqrt(rank / check_positive_float("sigma2", sigma2))


def effective_alpha(
    rule: Rule | str,
    rank: int,
    *,
    fan_in: int | None = None,
    init: InitKind = "kaiming_uniform",
    init_std: float | None = None,
    alpha: float = 16.0,
    base: float = 256.0,
) -> float:
    """Effective ``α`` of ``W = W0 + γ (α / r) B A`` under ``rule``.

    Args:
        rule: a :class:`Rule` or its value.
        rank: LoRA rank ``r``.
        fan_in: layer input size ``n`` (needed by ``variant2``).
        init: init of ``A`` (``variant2`` uses its variance).
        init_std: Gaussian std of ``A`` (``variant2`` with ``init="gaussian"``).
        alpha: the constant of ``fixed`` and ``rslora``.
        base: Variant I's base (256 in the paper).

    >>> effective_alpha("variant1", 4), effective_alpha("rslora", 4, alpha=16)
    (512.0, 32.0)

    """
    check_positive_int("rank", rank)
    try:
        rule = Rule(rule)
    except ValueError:
        raise InputError(f"rule={rule!r} is invalid: use one of {[r.value for r in Rule]}") from None
    if rule is Rule.RANK:
        return float(rank)
    if rule is Rule.DOUBLE_RANK:
        return 2.0 * rank
    if rule is Rule.FIXED:
        return check_positive_float("alpha", alpha)
    if rule is Rule.RSLORA:
        return check_positive_float("alpha", alpha) * math.sqrt(rank)
    if rule is Rule.VARIANT1:
        return check_positive_float("base", base) * math.sqrt(rank)
    if fan_in is None:
        raise InputError("fan_in is required for rule='variant2'")
    return variant_ii_alpha(rank, init_variance(init, fan_in, init_std))


def table6(fan_in: int = 4096, ranks: Sequence[int] = (1, 4, 8, 16, 32, 64, 128, 256)) -> list[dict]:
    """Rows of the paper's Table 6: heuristic, Variant I and II (Kaiming-uniform) α per rank.

    Returns:
        ``[{r, heuristic, variant_i, variant_ii, ratio}]``; α values rounded to integers,
        ``ratio`` = Variant I / heuristic rounded to one decimal.

    >>> table6(4096, [8])
    [{'r': 8, 'heuristic': 8, 'variant_i': 724, 'variant_ii': 314, 'ratio': 90.5}]

    """
    rows = []
    for r in ranks:
        check_positive_int("rank", r)
        v1 = effective_alpha(Rule.VARIANT1, r)
        v2 = effective_alpha(Rule.VARIANT2, r, fan_in=fan_in, init="kaiming_uniform")
        h = effective_alpha(Rule.RANK, r)
        rows.append(
            {
                "r": r,
                "heuristic": round(h),
                "variant_i": round(v1),
                "variant_ii": round(v2),
                "ratio": round(v1 / h, 1),
            }
        )
    return rows
