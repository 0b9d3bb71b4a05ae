"""Independent checks of the Figure 8 run at init (``B = 0``).

The run assembles ``H_θ(α) = α² S₁ + α D₁`` from one evaluation at ``α = 1`` (Prop. 1 and 4),
so its slopes 2 and 1 hold by construction; :func:`alpha_check` recomputes the products at
every α instead. :func:`trace_rule_mc` tests Prop. 3, ``E_A tr H_signal = α²ρ·tr H``, by Monte
Carlo over draws of ``A`` with the exact per-draw trace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..decomposition import curvature
from ..hessian import lora_hessian
from ..intervals import mean_interval
from ..lora import LoraProblem, init_theta
from ..theory import loglog_slope, signal_trace_at_init

__all__ = ["alpha_check", "trace_rule_mc"]


def alpha_check(
    problem: LoraProblem,
    theta: Mapping[str, torch.Tensor],
    S1: torch.Tensor,
    D1: torch.Tensor,
    alphas: Sequence[float],
    seed: int,
) -> dict:
    """An independent look at every α: products computed at that α, not scaled from α = 1.

    On 4 random directions ``V`` ``[P_θ, 4]`` and at each α, plain autograd gives ``H_θ(α) V``
    and the signal operator built at α gives ``S(α) V`` (its ``J`` evaluated at α); their gap to
    the assembled ``(α² S₁ + α D₁) V`` and ``α² S₁ V`` is reported, and the log–log slopes of
    ``‖S(α)V‖`` and ``‖(H_θ(α) − S(α))V‖`` are measured from these products alone.

    Args:
        problem: the LoRA problem (any α; each α is set with ``with_alpha``).
        theta: the point, ``B = 0``.
        S1: dense ``H_signal`` at ``α = 1``, ``[P_θ, P_θ]``.
        D1: dense ``H_drift`` at ``α = 1``, ``[P_θ, P_θ]``.
        alphas: the α values (at least 2).
        seed: seed of the directions ``V``.

    Returns:
        ``autograd_check_residual`` and ``signal_at_alpha_check_residual`` (``{f"{α:g}": relative
        Frobenius gap}``), ``slope_signal_measured`` and ``slope_drift_measured``.
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


def trace_rule_mc(
    problem: LoraProblem,
    theta0: Mapping[str, torch.Tensor],
    K: Mapping[str, torch.Tensor],
    trace_S1: float,
    alphas: Sequence[float],
    seed: int,
    a_draws: int,
) -> dict:
    """Prop. 3 by Monte Carlo over draws of ``A``, each with the exact ``tr H_signal = s² tr(K AᵀA)``.

    Args:
        problem: the LoRA problem.
        theta0: the run's point (``B = 0``), for the identity check against ``trace_S1``.
        K: ``H``'s partial traces ``{layer: K [n, n]}`` (``H.partial_traces()``).
        trace_S1: ``tr S₁`` of the run's dense ``S₁`` at ``α = 1``.
        alphas: the α values.
        seed: draw ``i`` of ``A`` is ``init_theta(problem, seed + 1 + i)``.
        a_draws: number of draws.

    Returns:
        ``trace_identity_residual`` (``s² tr(K AᵀA)`` at ``θ₀`` against ``trace_S1``), ``a_draws``,
        and per α ``trace_signal_mc_mean`` and ``trace_signal_mc_interval`` (Student-t, 95 %).
    """
    p1 = problem.with_alpha(1.0)
    ident = abs(signal_trace_at_init(p1, theta0, K) - trace_S1) / abs(trace_S1)
    vals = np.array([signal_trace_at_init(p1, init_theta(problem, seed + 1 + i), K) for i in range(a_draws)])
    band = mean_interval(vals, method=f"Student-t over {len(vals)} draws of A")
    return {
        "trace_identity_residual": ident,
        "a_draws": a_draws,
        "trace_signal_mc_mean": [a * a * band.estimate for a in alphas],
        "trace_signal_mc_interval": [band.map(lambda x, a=a: a * a * x).to_json() for a in alphas],
    }
