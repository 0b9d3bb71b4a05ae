"""LoRA adapters as pure functions over parameter dicts.

docs/theory.md#objects: one adapted linear layer with weight ``W0 ∈ R^{m×n}`` becomes

.. math::  W = W_0 + γ (α / r) B A,  B ∈ R^{m×r} (init 0),  A ∈ R^{r×n} (init random).

A :class:`LoraProblem` bundles a user ``nn.Module`` (any architecture), the frozen base
parameters, the adapted ``nn.Linear`` layers, data and loss. The LoRA parameters ``θ`` live
in a plain dict ``{"<layer>.lora_A": A, "<layer>.lora_B": B}`` so every ``torch.func``
transform applies to :meth:`LoraProblem.loss_theta`.

The curvature is that of the deterministic network: every forward pass runs the module in
eval mode (dropout off, batch norm on its running statistics), whatever mode the user left it
in, and restores each submodule's ``training`` flag afterwards (see :func:`attach_lora`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ._errors import InputError, check_finite, check_positive_float, check_positive_int
from .model import check_data, mse_loss
from .operators import ParamLayout
from .scaling import InitKind, init_variance, lora_scale

__all__ = ["AdapterSpec", "LoraProblem", "attach_lora", "init_theta"]

Theta = dict[str, torch.Tensor]


def _join(module: str, leaf: str) -> str:
    """Parameter path of ``leaf`` in submodule ``module`` (``""`` is the root module)."""
    return f"{module}.{leaf}" if module else leaf


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run the body with ``module`` in eval mode; restore every submodule's own flag after."""
    modes = [(m, m.training) for m in module.modules()]
    if not any(training for _, training in modes):
        yield
        return
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@dataclass(frozen=True)
class AdapterSpec:
    """One adapted ``nn.Linear``: ``W = W0 + γ (α/r) B A``.

    Attributes:
        name: module path of the ``nn.Linear`` (as in ``model.named_modules()``).
        fan_out: ``m`` (rows of ``W``).
        fan_in: ``n`` (columns of ``W``).
        rank: ``r``, ``1 <= r <= min(m, n)``.
        alpha: ``α``.
        gamma: ``γ`` multiplier (LoRA-α protocol, default 1).
        init: init of ``A``: ``"gaussian"`` or ``"kaiming_uniform"``.
        init_std: Gaussian std of ``A`` (default ``1/sqrt(n)``).

    """

    name: str
    fan_out: int
    fan_in: int
    rank: int
    alpha: float
    gamma: float = 1.0
    init: InitKind = "gaussian"
    init_std: float | None = None

    def __post_init__(self) -> None:
        check_positive_int(f"rank (layer {self.name!r})", self.rank, min(self.fan_out, self.fan_in))
        check_positive_float(f"alpha (layer {self.name!r})", self.alpha)
        check_positive_float(f"gamma (layer {self.name!r})", self.gamma)

    @property
    def scale(self) -> float:
        """``γ α / r`` (:func:`signal_drift.scaling.lora_scale`)."""
        return lora_scale(self.alpha, self.rank, self.gamma)

    @property
    def sigma2(self) -> float:
        """Variance ``σ²`` of the entries of ``A`` at init."""
        return init_variance(self.init, self.fan_in, self.init_std)

    @property
    def key_A(self) -> str:  # noqa: N802
        """Key of ``A`` (``[r, n]``) in ``θ``."""
        return _join(self.name, "lora_A")

    @property
    def key_B(self) -> str:  # noqa: N802
        """Key of ``B`` (``[m, r]``) in ``θ``."""
        return _join(self.name, "lora_B")


@dataclass(frozen=True)
class LoraProblem:
    """A model with LoRA adapters, data and loss, as pure functions of ``θ`` or ``w``.

    Attributes:
        module: the user ``nn.Module`` (only its structure is used; see ``base``).
        base: all parameters and buffers of ``module`` (detached), ``W0`` included.
        adapters: the adapted layers.
        X: inputs ``[N, ...]``.
        y: targets ``[N, ...]``.
        loss_fn: ``loss_fn(output, y) -> scalar``; default :func:`~signal_drift.model.mse_loss`.

    """

    module: nn.Module
    base: Mapping[str, torch.Tensor]
    adapters: tuple[AdapterSpec, ...]
    X: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mse_loss

    # -- layouts --------------------------------------------------------------------------
    @property
    def theta_layout(self) -> ParamLayout:
        """Layout of ``θ``: per adapter ``A`` (``[r, n]``) then ``B`` (``[m, r]``)."""
        shapes: dict[str, tuple[int, int]] = {}
        for a in self.adapters:
            shapes[a.key_A] = (a.rank, a.fan_in)
            shapes[a.key_B] = (a.fan_out, a.rank)
        return ParamLayout.from_shapes(shapes)

    @property
    def weight_layout(self) -> ParamLayout:
        """Layout of ``w``: the adapted weights ``W`` (``[m, n]``), keyed by layer name."""
        return ParamLayout.from_shapes({a.name: (a.fan_out, a.fan_in) for a in self.adapters})

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the adapted weights."""
        return self.base[_join(self.adapters[0].name, "weight")].dtype

    @property
    def device(self) -> torch.device:
        """Device of the adapted weights."""
        return self.base[_join(self.adapters[0].name, "weight")].device

    def base_weights(self) -> dict[str, torch.Tensor]:
        """``{layer: W0}`` for the adapted layers."""
        return {a.name: self.base[_join(a.name, "weight")] for a in self.adapters}

    # -- pure functions ---------------------------------------------------------------------
    def weights(self, theta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The map ``θ -> w``: ``{layer: W0 + γ(α/r) B A}`` (each ``[m, n]``)."""
        return {
            a.name: self.base[_join(a.name, "weight")] + a.scale * (theta[a.key_B] @ theta[a.key_A])
            for a in self.adapters
        }

    def output_w(self, w: Mapping[str, torch.Tensor], X: torch.Tensor | None = None) -> torch.Tensor:
        """Network output with the adapted weights replaced by ``w``, the module in eval mode."""
        params = dict(self.base)
        params.update({_join(k, "weight"): v for k, v in w.items()})
        with _eval_mode(self.module):
            return functional_call(self.module, params, (self.X if X is None else X,))

    def loss_w(self, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Task loss ``L(w)`` as a function of the adapted weights (the FFT objective)."""
        return self.loss_fn(self.output_w(w), self.y)

    def loss_theta(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """LoRA loss ``L(w(θ))``."""
        return self.loss_w(self.weights(theta))

    # -- variations -------------------------------------------------------------------------
    def with_alpha(self, alpha: float | Mapping[str, float]) -> LoraProblem:
        """A copy with ``α`` replaced (one value for all layers, or per layer name)."""
        new = []
        for a in self.adapters:
            val = alpha[a.name] if isinstance(alpha, Mapping) else alpha
            new.append(dataclasses.replace(a, alpha=float(val)))
        return dataclasses.replace(self, adapters=tuple(new))

    def with_data(self, X: torch.Tensor, y: torch.Tensor) -> LoraProblem:
        """A copy with other data (validated)."""
        check_data(X, y)
        return dataclasses.replace(self, X=X, y=y)

    def check_theta(self, theta: Mapping[str, torch.Tensor], name: str = "theta") -> None:
        """Validate ``θ``'s blocks, shapes and finiteness against the adapters.

        Raises:
            InputError: naming ``name`` and the block that is missing, misshaped or not finite.
        """
        _check_blocks(self.theta_layout, theta, name)

    def check_weights(self, w: Mapping[str, torch.Tensor], name: str = "w") -> None:
        """Validate a weight-space dict (``w``, ``g``, ``Δw``: ``{layer: [m, n]}``) likewise."""
        _check_blocks(self.weight_layout, w, name)


def _check_blocks(layout: ParamLayout, tensors: Mapping[str, torch.Tensor], name: str) -> None:
    try:
        layout._check(dict(tensors), 0)
    except InputError as err:
        raise InputError(f"{name}: {err}") from None
    for k, v in tensors.items():
        check_finite(f"{name}[{k!r}]", v)


def init_theta(problem: LoraProblem, seed: int = 0) -> Theta:
    """Standard LoRA init: ``B = 0``, ``A`` Gaussian ``N(0, σ²)`` or Kaiming-uniform.

    Args:
        problem: the problem whose adapters define shapes and init schemes.
        seed: RNG seed for ``A``.

    Returns:
        ``θ`` as ``{key_A: [r, n], key_B: [m, r]}`` per adapter.

    """
    gen = torch.Generator().manual_seed(int(seed))
    theta: Theta = {}
    dtype = problem.dtype
    for a in problem.adapters:
        if a.init == "gaussian":
            A = torch.randn(a.rank, a.fan_in, generator=gen, dtype=dtype) * a.sigma2**0.5
        else:
            bound = 1.0 / a.fan_in**0.5
            A = (torch.rand(a.rank, a.fan_in, generator=gen, dtype=dtype) * 2 - 1) * bound
        theta[a.key_A] = A.to(problem.device)
        theta[a.key_B] = torch.zeros(a.fan_out, a.rank, dtype=dtype, device=problem.device)
    return theta


def attach_lora(
    module: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    targets: Sequence[str] | None = None,
    rank: int = 4,
    alpha: float | None = None,
    gamma: float = 1.0,
    init: InitKind = "gaussian",
    init_std: float | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mse_loss,
) -> LoraProblem:
    """Attach LoRA adapters to the ``nn.Linear`` layers of ``module``.

    Args:
        module: any ``nn.Module``; its parameters become the frozen base (``W0``).
        X: inputs ``[N, ...]``.
        y: targets ``[N, ...]``.
        targets: names of the ``nn.Linear`` submodules to adapt (default: all of them).
        rank: default rank ``r``.
        alpha: default ``α`` (default ``α = r``, the heuristic).
        gamma: ``γ`` multiplier for every layer.
        init: init scheme of ``A``.
        init_std: Gaussian std of ``A`` (default ``1/sqrt(fan_in)``).
        rank_pattern: per-layer rank overrides (PEFT's ``rank_pattern``).
        alpha_pattern: per-layer ``α`` overrides (PEFT's ``alpha_pattern``).
        loss_fn: ``loss_fn(output, y) -> scalar``.

    Returns:
        A :class:`LoraProblem`; initialise ``θ`` with :func:`init_theta`.

    Raises:
        InputError: unknown or non-linear targets, rank outside ``1..min(m, n)``, non-finite
            weights or data, mismatched data shapes, or a forward pass that is random even in
            eval mode (two passes differ).

    The loss, and so every gradient and Hessian of the problem, is that of the module in
    **eval mode**: dropout is off and batch norm uses its running statistics (which are read,
    never updated), whatever mode ``module`` is in, so that ``H_θ = H_signal + H_drift`` holds
    and repeated calls agree. The module's own ``training`` flags are restored after every
    pass. A Hessian of a training-mode forward (a new dropout mask at every call, batch
    statistics) is not a fixed matrix and is not offered; a model that draws random numbers
    in eval mode is refused.

    """
    check_data(X, y)
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    names = list(linears) if targets is None else list(targets)
    if not names:
        raise InputError("targets: the module has no nn.Linear layer to adapt")
    for n in names:
        if n not in linears:
            raise InputError(f"targets: {n!r} is not an nn.Linear of the module; choose from {list(linears)}")
    for pattern, label in ((rank_pattern, "rank_pattern"), (alpha_pattern, "alpha_pattern")):
        for n in pattern or {}:
            if n not in names:
                raise InputError(f"{label}: {n!r} is not an adapted layer; adapted: {names}")
    base = {k: v.detach() for k, v in module.named_parameters()}
    base.update({k: v.detach() for k, v in module.named_buffers()})
    for k, v in base.items():
        check_finite(f"module parameter {k!r}", v)
    adapters = []
    for n in names:
        m, nin = linears[n].weight.shape
        r = (rank_pattern or {}).get(n, rank)
        check_positive_int(f"rank (layer {n!r}, weight {m}x{nin})", r, min(m, nin))
        a = (alpha_pattern or {}).get(n, r if alpha is None else alpha)
        adapters.append(AdapterSpec(n, int(m), int(nin), int(r), float(a), float(gamma), init, init_std))
    problem = LoraProblem(module, base, tuple(adapters), X, y, loss_fn)
    with torch.no_grad():
        out = problem.output_w(problem.base_weights())
        again = problem.output_w(problem.base_weights())
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
        if float((out - again).abs().max()) > 1e3 * torch.finfo(out.dtype).eps * float(out.abs().max()):
            raise InputError(
                "module: two forward passes in eval mode differ (it draws random numbers); "
                "the Hessian of a random loss is not defined: make the forward deterministic"
            )
    if out.shape[0] != y.shape[0] or (loss_fn is mse_loss and out.shape != y.shape):
        raise InputError(f"model output has shape {tuple(out.shape)} but y has shape {tuple(y.shape)}")
    return problem
