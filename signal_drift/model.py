"""The controlled MLP experiment of the paper (App. E): SiLU MLP and synthetic regression.

docs/theory.md#mlp-experiment: a depth-5 SiLU MLP of width ``d``; ``x ~ N(0, I_d)``, ``y = W* x`` with
``W* = U diag(s) V^T`` from random orthogonal ``U, V`` and decaying singular values; MSE loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from ._errors import InputError, check_finite, check_positive_float, check_positive_int
from .optim import adam_steps

__all__ = ["make_mlp", "Task", "make_task", "mse_loss", "linear_names", "pretrain", "shifted_task"]

Decay = Literal["power", "geometric"]


def make_mlp(
    dim: int,
    depth: int = 5,
    *,
    bias: bool = False,
    activation: type[nn.Module] = nn.SiLU,
    weight_std: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """Build ``depth`` square ``nn.Linear(dim, dim)`` layers with ``activation`` between them.

    Weights ``W0`` are Gaussian, ``N(0, weight_std^2)`` with ``weight_std = 1/sqrt(dim)`` by
    default (activations stay O(1)); biases, if any, start at zero.

    Args:
        dim: width ``d`` (input, hidden and output size).
        depth: number of linear layers.
        bias: whether the linear layers carry a bias.
        activation: elementwise activation module class placed between linear layers.
        weight_std: standard deviation of ``W0`` entries.
        seed: RNG seed for ``W0``.
        dtype: parameter dtype.

    Returns:
        ``nn.Sequential`` whose linear layers are named ``"0", "2", ...``.

    """
    check_positive_int("dim", dim)
    check_positive_int("depth", depth)
    std = 1.0 / dim**0.5 if weight_std is None else check_positive_float("weight_std", weight_std)
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(dim, dim, bias=bias, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(dim, dim, generator=gen, dtype=dtype) * std)
            if bias:
                lin.bias.zero_()
        layers.append(lin)
        if i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` submodule, in registration order."""
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


@dataclass(frozen=True)
class Task:
    """A synthetic regression task.

    Attributes:
        X: inputs ``[N, d_in]``.
        y: targets ``[N, d_out]``.
        W_star: the target map ``[d_out, d_in]`` (``y = X W_star^T``).

    """

    X: torch.Tensor
    y: torch.Tensor
    W_star: torch.Tensor


def _random_orthogonal(n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    return Q * torch.sign(torch.diagonal(R))  # Haar-distributed


def make_task(
    dim: int,
    samples: int = 1024,
    *,
    decay: float = 1.0,
    decay_kind: Decay = "power",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Task:
    """Synthetic task ``y = W* x`` with ``W* = U diag(s) V^T`` (docs/theory.md#mlp-experiment).

    Singular values: ``s_i = i^(-decay)`` (``"power"``) or ``s_i = decay^(i-1)`` with
    ``0 < decay < 1`` (``"geometric"``), ``i = 1..dim``.

    Args:
        dim: input and output dimension ``d``.
        samples: number of samples ``N``.
        decay: decay rate of the singular values.
        decay_kind: ``"power"`` or ``"geometric"``.
        seed: RNG seed.
        dtype: dtype of the tensors.

    Returns:
        A :class:`Task` with ``X: [N, d]``, ``y: [N, d]``.

    >>> t = make_task(4, samples=3, decay=1.0)
    >>> torch.linalg.svdvals(t.W_star).mul(12).round().tolist()  # 12 * [1, 1/2, 1/3, 1/4]
    [12.0, 6.0, 4.0, 3.0]

    """
    check_positive_int("dim", dim)
    check_positive_int("samples", samples)
    i = torch.arange(1, dim + 1, dtype=dtype)
    if decay_kind == "power":
        if not decay >= 0:
            raise InputError(f"decay={decay} is invalid: power decay must be >= 0")
        s = i ** (-float(decay))
    elif decay_kind == "geometric":
        if not 0 < decay <= 1:
            raise InputError(f"decay={decay} is invalid: geometric decay must be in (0, 1]")
        s = float(decay) ** (i - 1)
    else:
        raise InputError(f"decay_kind={decay_kind!r} is invalid: use 'power' or 'geometric'")
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    U = _random_orthogonal(dim, gen, dtype)
    V = _random_orthogonal(dim, gen, dtype)
    W_star = (U * s) @ V.T
    X = torch.randn(samples, dim, generator=gen, dtype=dtype)
    return Task(X=X, y=X @ W_star.T, W_star=W_star)


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L = (1/N) sum_n 1/2 ||f(x_n) - y_n||^2`` for ``output, target: [N, d_out]``."""
    if output.shape != target.shape:
        raise InputError(f"output shape {tuple(output.shape)} does not match target {tuple(target.shape)}")
    return 0.5 * (output - target).pow(2).sum(-1).mean()


def check_data(X: torch.Tensor, y: torch.Tensor) -> None:
    """Validate a data pair: 2-D, same number of rows, finite."""
    if X.ndim < 2:
        raise InputError(f"X has shape {tuple(X.shape)}: expected [N, d_in]")
    if y.shape[0] != X.shape[0]:
        raise InputError(f"X has {X.shape[0]} rows but y has {y.shape[0]}: they must match")
    check_finite("X", X)
    check_finite("y", y)


def pretrain(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float = 1e-2,
    loss_fn=mse_loss,
    progress: bool = False,
) -> nn.Module:
    """Fit every parameter of a copy of ``model`` on ``(X, y)`` with ``steps`` Adam steps.

    Makes ``W0`` a real "pre-trained" weight (small residual, ``H`` close to PSD) before
    adapters are attached (docs/theory.md#mlp-experiment, the spectra command's ``--pretrain-steps``).

    Returns:
        A new module; ``model`` is left untouched.

    Raises:
        DivergenceError: if the loss becomes NaN/Inf, naming the step.
    """
    out = copy.deepcopy(model)
    params = {k: v.detach() for k, v in out.named_parameters()}

    def loss(p):
        return loss_fn(functional_call(out, p, (X,)), y)

    trained = adam_steps(loss, params, steps, lr, progress=progress, desc="pretrain")
    with torch.no_grad():
        for k, v in out.named_parameters():
            v.copy_(trained[k])
    return out


def shifted_task(task: Task, shift: float, seed: int = 1) -> Task:
    """A downstream task on the same inputs: ``W*_ft = W* + shift · W*_other``.

    ``W*_other`` has the same singular values as ``W*`` and independent random singular
    vectors. Used to fine-tune a model pre-trained on ``task`` (so that ``g ≠ 0`` at ``W0``).

    Args:
        task: the pre-training task.
        shift: size of the shift (0 returns the same targets).
        seed: seed of ``W*_other``.
    """
    if not shift >= 0:
        raise InputError(f"shift={shift} is invalid: must be >= 0")
    dim_out, dim_in = task.W_star.shape
    if dim_out != dim_in:
        raise InputError("shifted_task needs a square W*")
    other = make_task(dim_in, 1, seed=seed + 7919, dtype=task.X.dtype).W_star
    W = task.W_star + float(shift) * other
    return Task(X=task.X, y=task.X @ W.T, W_star=W)
