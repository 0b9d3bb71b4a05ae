"""LoRA adapters as pure functions over parameter dicts.

docs/theory.md#objects: one adapted linear layer with weight ``W0 ∈ R^{m×n}`` becomes

.. math::  W = W_0 + γ (α / r) B A,  B ∈ R^{m×r} (init 0),  A ∈ R^{r×n} (init random).

A :class:`LoraProblem` bundles a user ``nn.Module`` (any architecture), the frozen base
parameters, the adapted layers (``nn.Linear``, or GPT-2's transposed ``Conv1D``), data and
loss. The LoRA parameters ``θ`` live in a plain dict ``{"<layer>.lora_A": A, "<layer>.lora_B": B}``
so every ``torch.func`` transform applies to :meth:`LoraProblem.loss_theta`.

**Data** is one or more :class:`Batch` es. A batch's inputs are a tensor (passed positionally)
or a dict (passed as keyword arguments: ``input_ids``, ``attention_mask``, ...); the model's
output may be a tensor, a tuple (first element) or a Hugging Face ``ModelOutput`` (its
``logits``). The loss of the problem is the loss of all the data at once: each batch's mean
loss is weighted by its share of the loss's own normaliser (:func:`loss_weight`: the number
of scored tokens for :func:`~signal_drift.lm.causal_lm_loss`, the number of rows for a mean
loss), so ``L = Σ_b (n_b / N) L_b`` equals the loss of one concatenated batch, ragged batches
included. Under ``torch.distributed`` (``distributed=True``) each process holds its own batches,
``N`` is the total over processes, and the curvature operators sum their products over
processes (:func:`all_reduce_sum`).

The curvature is that of the deterministic network: every forward pass runs the module in
eval mode (dropout off, batch norm on its running statistics), whatever mode the user left it
in, and restores each submodule's ``training`` flag afterwards (see :func:`attach_lora`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ._errors import InputError, check_finite, check_positive_float, check_positive_int
from .model import check_data, mse_loss
from .operators import ParamLayout
from .scaling import InitKind, init_variance, lora_scale

__all__ = ["AdapterSpec", "Batch", "LoraProblem", "attach_lora", "init_theta", "loss_weight", "model_output",
           "all_reduce_sum", "as_batches"]  # fmt: skip

Theta = dict[str, torch.Tensor]
Inputs = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """One batch of data.

    Attributes:
        inputs: a tensor ``[N, ...]`` (the model's positional input) or a dict of tensors (its
            keyword inputs, e.g. ``{"input_ids": [N, T], "attention_mask": [N, T]}``).
        targets: what the loss compares the output with (``[N, ...]``; token labels with
            ``-100`` at unscored positions for :func:`~signal_drift.lm.causal_lm_loss`).
    """

    inputs: Inputs
    targets: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        """A copy on ``device``."""
        inputs = self.inputs
        if isinstance(inputs, Mapping):
            inputs = {k: v.to(device) for k, v in inputs.items()}
        else:
            inputs = inputs.to(device)
        return Batch(inputs, self.targets.to(device))


def as_batches(data: Batch | tuple | Iterable) -> tuple[Batch, ...]:
    """Normalise ``data`` to a tuple of :class:`Batch`.

    Accepts one :class:`Batch`, one ``(inputs, targets)`` pair, or an iterable of either (a
    list, a generator, a ``DataLoader`` yielding pairs or dicts with a ``labels`` entry).

    Raises:
        InputError: naming ``data`` if it is empty or an item is not a batch.
    """
    if isinstance(data, Batch):
        return (data,)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        return (Batch(data[0], data[1]),)
    out = []
    for i, item in enumerate(data):
        if isinstance(item, Batch):
            out.append(item)
        elif isinstance(item, Mapping) and "labels" in item:
            out.append(Batch({k: v for k, v in item.items() if k != "labels"}, item["labels"]))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            out.append(Batch(item[0], item[1]))
        else:
            raise InputError(
                f"data: item {i} is a {type(item).__name__}; expected a Batch, an (inputs, targets) pair "
                "or a dict with 'labels'"
            )
    if not out:
        raise InputError("data: no batch")
    return tuple(out)


def loss_weight(loss_fn: Callable, targets: torch.Tensor) -> float:
    """The share of the loss's normaliser that one batch carries.

    ``loss_fn.weight(targets)`` where the loss defines it (the scored-token count of
    :func:`~signal_drift.lm.causal_lm_loss`), else the number of rows ``targets.shape[0]``
    (a loss that is a mean over the batch).
    """
    w = getattr(loss_fn, "weight", None)
    return float(w(targets)) if w is not None else float(targets.shape[0])


def model_output(out) -> torch.Tensor:
    """The tensor a loss reads from a model's output: itself, a tuple's first element or ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputError(
        f"model output is a {type(out).__name__}: expected a tensor, a tuple of tensors or an object "
        "with .logits"
    )


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes of the default group (in place; returned)."""
    if _distributed() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


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
    """One adapted linear layer: ``W = W0 + γ (α/r) B A``.

    Attributes:
        name: module path of the layer (as in ``model.named_modules()``).
        fan_out: ``m`` (rows of ``W``).
        fan_in: ``n`` (columns of ``W``).
        rank: ``r``, ``1 <= r <= min(m, n)``.
        alpha: ``α``.
        gamma: ``γ`` multiplier (LoRA-α protocol, default 1).
        init: init of ``A``: ``"gaussian"`` or ``"kaiming_uniform"``.
        init_std: Gaussian std of ``A`` (default ``1/sqrt(n)``).
        param: key of ``W0`` among the module's parameters (default ``name + ".weight"``).
        transposed: the module stores ``Wᵀ`` (``[n, m]``: GPT-2's ``Conv1D``, PEFT's
            ``fan_in_fan_out``); ``W`` itself is always ``[m, n]`` here.

    """

    name: str
    fan_out: int
    fan_in: int
    rank: int
    alpha: float
    gamma: float = 1.0
    init: InitKind = "gaussian"
    init_std: float | None = None
    param: str | None = None
    transposed: bool = False

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
    def weight_key(self) -> str:
        """Key of ``W0`` in :attr:`LoraProblem.base`."""
        return self.param if self.param is not None else _join(self.name, "weight")

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
        batches: the data this process holds (:class:`Batch` es).
        loss_fn: ``loss_fn(output, targets) -> scalar``, the batch's mean loss; default
            :func:`~signal_drift.model.mse_loss`.
        total_weight: the loss's normaliser over all the data (every process): the sum of
            :func:`loss_weight` over batches.
        distributed: the batches are this process's share; products are summed over the
            processes of the default ``torch.distributed`` group.
        forward_context: a factory of the context every forward pass runs in (e.g.
            :func:`signal_drift.hf.float64_forward`), or None.

    """

    module: nn.Module
    base: Mapping[str, torch.Tensor]
    adapters: tuple[AdapterSpec, ...]
    batches: tuple[Batch, ...]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mse_loss
    total_weight: float = 0.0
    distributed: bool = False
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None

    # -- data ---------------------------------------------------------------------------------
    @property
    def X(self) -> Inputs:  # noqa: N802
        """The inputs of a single-batch problem."""
        return self._single().inputs

    @property
    def y(self) -> torch.Tensor:
        """The targets of a single-batch problem."""
        return self._single().targets

    def _single(self) -> Batch:
        if len(self.batches) != 1:
            raise InputError(f"this problem holds {len(self.batches)} batches; use .batches")
        return self.batches[0]

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
        return self.base[self.adapters[0].weight_key].dtype

    @property
    def device(self) -> torch.device:
        """Device of the adapted weights."""
        return self.base[self.adapters[0].weight_key].device

    def base_weights(self) -> dict[str, torch.Tensor]:
        """``{layer: W0 [m, n]}`` for the adapted layers."""
        return {a.name: _oriented(a, self.base[a.weight_key]) for a in self.adapters}

    # -- pure functions ---------------------------------------------------------------------
    def weights(self, theta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The map ``θ -> w``: ``{layer: W0 + γ(α/r) B A}`` (each ``[m, n]``)."""
        W0 = self.base_weights()
        return {a.name: W0[a.name] + a.scale * (theta[a.key_B] @ theta[a.key_A]) for a in self.adapters}

    def output_w(self, w: Mapping[str, torch.Tensor], X: Inputs | None = None) -> torch.Tensor:
        """Network output (a tensor, see :func:`model_output`) with the adapted weights ``w``, eval mode.

        Args:
            w: ``{layer: W [m, n]}``.
            X: inputs (default: those of a single-batch problem).
        """
        params = dict(self.base)
        for a in self.adapters:
            params[a.weight_key] = _oriented(a, w[a.name])
        return self._forward(params, X)

    def output_theta(self, theta: Mapping[str, torch.Tensor], X: Inputs | None = None) -> torch.Tensor:
        """Network output at ``w(θ)`` as LoRA computes it: ``W0``, plus ``s (x Aᵀ) Bᵀ`` per adapted layer.

        The same function as ``output_w(weights(θ))`` (to round-off), but its derivatives in ``θ``
        never form an ``m × n`` matrix: a gradient or Hessian-vector product in ``θ`` costs about
        half the matrix products (the gradient through ``W = W0 + s B A`` would need ``∂L/∂W``).
        """

        def low_rank(a: AdapterSpec):
            A, B = theta[a.key_A], theta[a.key_B]
            return lambda mod, inp, out: out + a.scale * ((inp[0] @ A.T) @ B.T)

        hooks = []
        try:
            for a in self.adapters:
                hooks.append(self.module.get_submodule(a.name).register_forward_hook(low_rank(a)))
            return self._forward(dict(self.base), X)
        finally:
            for h in hooks:
                h.remove()

    def _forward(self, params: dict[str, torch.Tensor], X: Inputs | None) -> torch.Tensor:
        """``module`` with ``params`` on ``X`` (tensor or keyword dict), eval mode, ``forward_context``."""
        X = self.X if X is None else X
        context = self.forward_context() if self.forward_context is not None else contextlib.nullcontext()
        with _eval_mode(self.module), context:
            if isinstance(X, Mapping):
                out = functional_call(self.module, params, (), dict(X))
            else:
                out = functional_call(self.module, params, (X,))
        return model_output(out)

    def batch_loss_theta(self, batch: Batch, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One batch's term of :meth:`loss_theta` (through :meth:`output_theta`)."""
        return self._share(batch) * self.loss_fn(self.output_theta(theta, batch.inputs), batch.targets)

    def batch_loss_w(self, batch: Batch, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One batch's term of :meth:`loss_w`: ``(n_b / N) · loss_fn(f(x_b), y_b)``."""
        return self._share(batch) * self.loss_fn(self.output_w(w, batch.inputs), batch.targets)

    def _share(self, batch: Batch) -> float:
        """``n_b / N``: the batch's share of the loss's normaliser."""
        return loss_weight(self.loss_fn, batch.targets) / self.total_weight

    def loss_w(self, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Task loss ``L(w)`` of this process's data (the FFT objective; all of it in one process)."""
        return _sum_terms(self.loss_terms_w(), w)

    def loss_theta(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """LoRA loss ``L(w(θ))`` of this process's data (through :meth:`output_theta`)."""
        return _sum_terms(self.loss_terms_theta(), theta)

    def loss(self, theta: Mapping[str, torch.Tensor]) -> float:
        """``L(w(θ))`` over all the data, summed over processes when distributed."""
        with torch.no_grad():
            value = self.loss_theta(theta).detach().reshape(1).clone()
        return float(all_reduce_sum(value) if self.distributed else value)

    def loss_terms_w(self) -> list[Callable[[Mapping[str, torch.Tensor]], torch.Tensor]]:
        """:meth:`loss_w` split into one function of ``w`` per batch (their sum is ``loss_w``)."""
        return self._terms(self.batch_loss_w)

    def loss_terms_theta(self) -> list[Callable[[Mapping[str, torch.Tensor]], torch.Tensor]]:
        """:meth:`loss_theta` split into one function of ``θ`` per batch."""
        return self._terms(self.batch_loss_theta)

    def _terms(self, batch_loss: Callable) -> list[Callable[[Mapping[str, torch.Tensor]], torch.Tensor]]:
        scored = self._scored()
        if not scored:  # this process holds no scored target: its share is 0, still a function of p
            return [lambda p: sum((0.0 * v).sum() for v in p.values())]
        return [lambda p, b=b: batch_loss(b, p) for b in scored]

    def _scored(self) -> tuple[Batch, ...]:
        """The batches that carry part of the normaliser (a batch with no scored target adds 0)."""
        return tuple(b for b in self.batches if loss_weight(self.loss_fn, b.targets) > 0)

    # -- variations -------------------------------------------------------------------------
    def with_alpha(self, alpha: float | Mapping[str, float]) -> LoraProblem:
        """A copy with ``α`` replaced (one value for all layers, or per layer name)."""
        new = []
        for a in self.adapters:
            val = alpha[a.name] if isinstance(alpha, Mapping) else alpha
            new.append(dataclasses.replace(a, alpha=float(val)))
        return dataclasses.replace(self, adapters=tuple(new))

    def select(self, names: Sequence[str], theta: Mapping[str, torch.Tensor]) -> tuple[LoraProblem, Theta]:
        """The problem with only the adapters ``names``, the others merged into the base at ``θ``.

        The network is the same (every other layer keeps its ``W0 + s B A``), so the selected
        layers' blocks of ``H``, ``H_θ``, ``H_signal`` and ``H_drift`` are unchanged, while every
        product only differentiates through the selected weights (much cheaper for one layer
        of a deep model than restricting the full operator, whose products pay for the whole
        gradient graph).

        Returns:
            ``(problem, theta)`` restricted to ``names`` (in adapter order).

        Raises:
            InputError: a name that is not an adapted layer.
        """
        known = [a.name for a in self.adapters]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputError(f"names: {unknown} are not adapted layers; adapted: {known}")
        keep = tuple(a for a in self.adapters if a.name in names)
        base = dict(self.base)
        with torch.no_grad():
            w = self.weights(theta)
        for a in self.adapters:
            if a.name not in names:
                base[a.weight_key] = _oriented(a, w[a.name]).detach()
        sub = {k: theta[k] for a in keep for k in (a.key_A, a.key_B)}
        return dataclasses.replace(self, base=base, adapters=keep), sub

    def with_data(self, X: Inputs | Batch | Iterable, y: torch.Tensor | None = None) -> LoraProblem:
        """A copy with other data: ``(X, y)`` or any ``data`` that :func:`as_batches` accepts (validated)."""
        batches = tuple(b.to(self.device) for b in as_batches((X, y) if y is not None else X))
        _check_batches(batches)
        total = _total_weight(self.loss_fn, batches, self.distributed)
        return dataclasses.replace(self, batches=batches, total_weight=total)

    def check_theta(self, theta: Mapping[str, torch.Tensor], name: str = "theta") -> None:
        """Validate ``θ``'s blocks, shapes and finiteness against the adapters.

        Raises:
            InputError: naming ``name`` and the block that is missing, misshaped or not finite.
        """
        _check_blocks(self.theta_layout, theta, name)

    def check_weights(self, w: Mapping[str, torch.Tensor], name: str = "w") -> None:
        """Validate a weight-space dict (``w``, ``g``, ``Δw``: ``{layer: [m, n]}``) likewise."""
        _check_blocks(self.weight_layout, w, name)


def _sum_terms(terms: list[Callable], p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    values = [f(p) for f in terms]
    return values[0] if len(values) == 1 else torch.stack(values).sum()


def _oriented(a: AdapterSpec, W: torch.Tensor) -> torch.Tensor:
    """``W`` as stored by the module ↔ as ``[m, n]`` (a transpose for ``Conv1D``; an involution)."""
    return W.T if a.transposed else W


def _check_batches(batches: tuple[Batch, ...]) -> None:
    for i, b in enumerate(batches):
        name = "data" if len(batches) == 1 else f"data batch {i}"
        if isinstance(b.inputs, Mapping):
            for k, v in b.inputs.items():
                if v.is_floating_point():
                    check_finite(f"{name} input {k!r}", v)
            if b.targets.is_floating_point():
                check_finite(f"{name} targets", b.targets)
        elif b.inputs.is_floating_point() or b.inputs.ndim >= 2:
            if b.inputs.is_floating_point():
                check_data(b.inputs, b.targets)
            elif b.targets.shape[0] != b.inputs.shape[0]:
                raise InputError(
                    f"{name}: inputs have {b.inputs.shape[0]} rows but targets {b.targets.shape[0]}"
                )
        else:
            raise InputError(f"{name}: inputs have shape {tuple(b.inputs.shape)}: expected [N, ...]")


def _total_weight(loss_fn: Callable, batches: tuple[Batch, ...], distributed: bool) -> float:
    device = batches[0].targets.device  # NCCL reduces device tensors only
    total = torch.tensor(
        [sum(loss_weight(loss_fn, b.targets) for b in batches)], dtype=torch.float64, device=device
    )
    if distributed:
        all_reduce_sum(total)
    if not float(total) > 0:
        raise InputError("data: no scored target (every label is masked)")
    return float(total)


def _is_linear_layer(m: nn.Module) -> bool:
    """``nn.Linear`` or a transposed linear (``Conv1D`` of GPT-2: ``weight [n, m]``, ``nf == m``)."""
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def _is_conv1d(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.ndim == 2 and hasattr(m, "nf")


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
    X: Inputs | None = None,
    y: torch.Tensor | None = None,
    *,
    data: Batch | Iterable | None = None,
    targets: Sequence[str] | None = None,
    rank: int = 4,
    alpha: float | None = None,
    gamma: float = 1.0,
    init: InitKind = "gaussian",
    init_std: float | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mse_loss,
    distributed: bool = False,
) -> LoraProblem:
    """Attach LoRA adapters to the linear layers of ``module``.

    Args:
        module: any ``nn.Module``; its parameters become the frozen base (``W0``).
        X: inputs ``[N, ...]`` (a tensor or a dict of tensors) of a single batch.
        y: targets ``[N, ...]`` of that batch.
        data: instead of ``X, y``: one or more batches (anything :func:`as_batches` accepts).
        targets: names of the ``nn.Linear`` (or GPT-2 ``Conv1D``) submodules to adapt (default:
            all of them).
        rank: default rank ``r``.
        alpha: default ``α`` (default ``α = r``, the heuristic).
        gamma: ``γ`` multiplier for every layer.
        init: init scheme of ``A``.
        init_std: Gaussian std of ``A`` (default ``1/sqrt(fan_in)``).
        rank_pattern: per-layer rank overrides (PEFT's ``rank_pattern``).
        alpha_pattern: per-layer ``α`` overrides (PEFT's ``alpha_pattern``).
        loss_fn: ``loss_fn(output, targets) -> scalar``, the mean loss of a batch.
        distributed: ``data`` is this process's share under ``torch.distributed``; the loss's
            normaliser and every curvature product are summed over processes.

    Returns:
        A :class:`LoraProblem`; initialise ``θ`` with :func:`init_theta`.

    Raises:
        InputError: unknown or non-linear targets, rank outside ``1..min(m, n)``, non-finite
            weights or data, mismatched data shapes, both or neither of ``X, y`` and ``data``,
            or a forward pass that is random even in eval mode (two passes differ).

    The loss, and so every gradient and Hessian of the problem, is that of the module in
    **eval mode**: dropout is off and batch norm uses its running statistics (which are read,
    never updated), whatever mode ``module`` is in, so that ``H_θ = H_signal + H_drift`` holds
    and repeated calls agree. The module's own ``training`` flags are restored after every
    pass. A Hessian of a training-mode forward (a new dropout mask at every call, batch
    statistics) is not a fixed matrix and is not offered; a model that draws random numbers
    in eval mode is refused.

    """
    if (data is None) == (X is None and y is None) or (data is None and (X is None or y is None)):
        raise InputError("data: pass either X and y, or data=")
    batches = as_batches((X, y) if data is None else data)
    _check_batches(batches)
    linears = {n: m for n, m in module.named_modules() if _is_linear_layer(m)}
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
        if v.is_floating_point():
            check_finite(f"module parameter {k!r}", v)
    adapters = []
    for n in names:
        conv = _is_conv1d(linears[n])
        m, nin = linears[n].weight.shape[::-1] if conv else linears[n].weight.shape
        r = (rank_pattern or {}).get(n, rank)
        check_positive_int(f"rank (layer {n!r}, weight {m}x{nin})", r, min(m, nin))
        a = (alpha_pattern or {}).get(n, r if alpha is None else alpha)
        adapters.append(
            AdapterSpec(n, int(m), int(nin), int(r), float(a), float(gamma), init, init_std, transposed=conv)
        )
    for a in adapters:
        if a.weight_key not in base:
            raise InputError(
                f"targets: {a.name!r} shares its weight with another module (tied); not supported"
            )
    total = _total_weight(loss_fn, batches, distributed)
    problem = LoraProblem(module, base, tuple(adapters), batches, loss_fn, total, distributed)
    _check_problem(problem)
    return problem


def _check_problem(problem: LoraProblem) -> None:
    """Refuse a random forward pass and outputs that do not fit the targets (first batch)."""
    first = problem.batches[0]
    with torch.no_grad():
        out = problem.output_w(problem.base_weights(), first.inputs)
        again = problem.output_w(problem.base_weights(), first.inputs)
    if out.is_floating_point() and out.numel():
        if float((out - again).abs().max()) > 1e3 * torch.finfo(out.dtype).eps * float(out.abs().max()):
            raise InputError(
                "module: two forward passes in eval mode differ (it draws random numbers); "
                "the Hessian of a random loss is not defined: make the forward deterministic"
            )
    y = first.targets
    if out.shape[0] != y.shape[0] or (problem.loss_fn is mse_loss and out.shape != y.shape):
        raise InputError(f"model output has shape {tuple(out.shape)} but y has shape {tuple(y.shape)}")
