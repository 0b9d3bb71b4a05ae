"""Shared float64 test cases and the one comparison helper used everywhere."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from signal_drift import attach_lora, init_theta, make_mlp, make_task
from signal_drift.optim import adam_steps

torch.set_default_dtype(torch.float64)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    scale: torch.Tensor | None = None,
):
    """Compare two tensors entrywise; on failure report the worst entries.

    An entry passes when ``|actual - expected| <= atol + rtol * scale`` with ``scale = |expected|``
    unless given (e.g. ``|M| @ |V|``, the round-off scale of a product ``M @ V``).
    """
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bound = atol + rtol * (expected.abs() if scale is None else torch.as_tensor(scale))
    bad = ~(diff <= bound)  # NaN fails too
    if bad.any():
        excess = torch.where(bad, diff / bound, torch.zeros_like(diff)).nan_to_num(float("inf"))
        idx = [torch.unravel_index(i, diff.shape) for i in excess.flatten().argsort(descending=True)[:5]]
        worst = [
            (
                tuple(int(j) for j in i),
                actual[i].item(),
                expected[i].item(),
                f"{(diff / bound)[i].item():.2g}x bound",
            )
            for i in idx
        ]
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} entries differ (max |diff| {diff.max():.3e}, "
            f"max |expected| {expected.abs().max():.3e}); worst (index, actual, expected): {worst}"
        )


def compare_matmat(op, M: torch.Tensor, k: int = 4, seed: int = 0, rtol: float = 1e-10):
    """Check ``op``'s raw products against the dense reference ``M`` ``[Q, P]``, entrywise.

    Covers ``matmat`` (``k`` columns, and again pushed through in chunks of 2 columns), ``matvec``,
    ``@``, ``rmatmat`` against ``Mᵀ``, and the same four through ``op.to_scipy()``. Nothing is
    symmetrised: an antisymmetric error in a symmetric operator shows. Each entry of ``M @ V``
    must agree within ``rtol · (|M| @ |V|)``, the scale of the product's own round-off.
    """
    Q, P = M.shape
    assert op.shape == (Q, P), f"operator shape {op.shape} != reference {tuple(M.shape)}"
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(P, k, generator=gen, dtype=M.dtype)
    U = torch.randn(Q, k, generator=gen, dtype=M.dtype)

    def check(actual, mat, X, what):
        scale = mat.abs() @ X.abs()
        try:
            assert_close(
                torch.as_tensor(actual), mat @ X, rtol=rtol, atol=1e-14 * float(scale.max()), scale=scale
            )
        except AssertionError as e:
            raise AssertionError(f"{type(op).__name__} {what}: {e}") from None

    check(op.matmat(V), M, V, "matmat")
    check(op.rmatmat(U), M.T, U, "rmatmat")
    check(op.matvec(V[:, 0]), M, V[:, 0], "matvec")
    check(op @ V, M, V, "@")
    default = op.__dict__.pop("chunk_size", None)
    op.chunk_size = 2
    try:
        check(op.matmat(V), M, V, "matmat in chunks")
        check(op.rmatmat(U), M.T, U, "rmatmat in chunks")
    finally:
        del op.chunk_size
        if default is not None:
            op.chunk_size = default
    S = op.to_scipy()
    assert S.shape == (Q, P)
    check(S.matmat(V.numpy()), M, V, "to_scipy().matmat")
    check(S @ V.numpy(), M, V, "to_scipy() @")
    check(S.matvec(V[:, 0].numpy()), M, V[:, 0], "to_scipy().matvec")
    check(S.rmatmat(U.numpy()), M.T, U, "to_scipy().rmatmat")
    check(S.rmatvec(U[:, 0].numpy()), M.T, U[:, 0], "to_scipy().rmatvec")


def sample_variance_se(sigma2: float, n: int, kurtosis: float) -> float:
    """Standard error of the unbiased sample variance of ``n`` iid draws with variance ``sigma2``.

    ``Var(s²) = σ⁴ (κ − (n − 3)/(n − 1)) / n`` with ``κ = μ₄/σ⁴`` the kurtosis: ``3`` for a Gaussian
    (``≈ 2σ⁴/n``), ``9/5`` for a uniform ``U(−b, b)`` (``≈ 0.8σ⁴/n``).
    """
    return sigma2 * math.sqrt((kurtosis - (n - 3) / (n - 1)) / n)


#: Kurtosis ``μ₄/σ⁴`` of a uniform distribution (``(b⁴/5) / (b²/3)²``).
UNIFORM_KURTOSIS = 9 / 5


def mlp_problem(
    dim=6, depth=3, rank=2, alpha=3.0, samples=40, seed=0, activation=nn.SiLU, bias=False, init="gaussian"
):
    model = make_mlp(dim, depth, activation=activation, bias=bias, seed=seed)
    task = make_task(dim, samples, seed=seed)
    return attach_lora(model, task.X, task.y, rank=rank, alpha=alpha, init=init)


def trained_theta(problem, steps=15, lr=0.05, seed=0):
    """A point with B != 0 reached by Adam steps from the standard init."""
    theta = adam_steps(problem.loss_theta, init_theta(problem, seed), steps, lr)
    assert all(theta[a.key_B].abs().max() > 1e-3 for a in problem.adapters)
    return theta


def linear_problem(dim=5, samples=30, rank=2, alpha=2.0, seed=0):
    """One linear layer with MSE: a convex task whose H is PSD (H = I ⊗ XᵀX/N)."""
    model = make_mlp(dim, 1, seed=seed)
    task = make_task(dim, samples, seed=seed)
    return attach_lora(model, task.X, task.y, rank=rank, alpha=alpha)


def rect_problem(samples=30, seed=0):
    """Rectangular SiLU MLP 5 -> 7 -> 4 -> 3 with biases; only layers "2" and "4" adapted.

    Ranks, α and γ differ by layer (``rank_pattern``, ``alpha_pattern``, ``γ = 1.5``), and the
    first linear layer is frozen, so a swapped ``m``/``n`` or a shared scale cannot hide.
    """
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(5, 7, dtype=torch.float64), nn.SiLU(),
        nn.Linear(7, 4, dtype=torch.float64), nn.SiLU(),
        nn.Linear(4, 3, dtype=torch.float64),
    )  # fmt: skip
    with torch.no_grad():
        for lin in model[::2]:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / lin.in_features**0.5)
            lin.bias.copy_(0.3 * torch.randn(lin.bias.shape, generator=gen))
    X, y = torch.randn(samples, 5, generator=gen), torch.randn(samples, 3, generator=gen)
    return attach_lora(
        model, X, y, targets=["2", "4"], rank=2, rank_pattern={"4": 1}, alpha_pattern={"2": 5.0}, gamma=1.5
    )


@dataclass(frozen=True)
class DenseReference:
    """Dense curvature at one point by brute-force ``torch.func`` on the composed loss.

    Built without the package's operators, layouts or scaling code: ``θ`` is flattened here as
    per adapter ``A`` then ``B``, each row-major, and ``w`` as each adapted ``W`` row-major, in
    adapter order; ``W = W0 + γ α / r · B A`` and the MSE ``½ mean_n ‖f(x_n) − y_n‖²`` are written
    out below.

    Attributes:
        name: case label.
        problem: the LoRA problem.
        theta: the point.
        H: ``∇²_w L`` ``[|w|, |w|]``.
        g: ``∇_w L`` ``[|w|]``.
        H_theta: ``∇²_θ L(w(θ))`` ``[|θ|, |θ|]``.
        J: ``∂w/∂θ`` ``[|w|, |θ|]``.
        signal: ``Jᵀ H J``.
        drift: ``Σ_k g_k ∂²w_k/∂θ²``, the Hessian of ``θ ↦ ⟨g, w(θ)⟩`` with ``g`` held fixed.
    """

    name: str
    problem: object
    theta: dict
    H: torch.Tensor
    g: torch.Tensor
    H_theta: torch.Tensor
    J: torch.Tensor
    signal: torch.Tensor
    drift: torch.Tensor


def dense_reference(problem, theta, name="") -> DenseReference:
    ads = problem.adapters
    t_shapes = [s for a in ads for s in ((a.key_A, (a.rank, a.fan_in)), (a.key_B, (a.fan_out, a.rank)))]
    w_shapes = [(a.name, (a.fan_out, a.fan_in)) for a in ads]

    def unflat(x, shapes):
        out, i = {}, 0
        for key, shape in shapes:
            out[key] = x[i : i + math.prod(shape)].reshape(shape)
            i += math.prod(shape)
        assert i == x.numel()
        return out

    def flat(d, shapes):
        return torch.cat([d[key].reshape(-1) for key, _ in shapes])

    def weights(t):  # W0 + γ α / r · B A
        return {
            a.name: problem.base[f"{a.name}.weight"] + a.gamma * a.alpha / a.rank * t[a.key_B] @ t[a.key_A]
            for a in ads
        }

    def loss_w(wflat):
        params = dict(problem.base)
        params.update({f"{k}.weight": v for k, v in unflat(wflat, w_shapes).items()})
        out = functional_call(problem.module, params, (problem.X,))
        return 0.5 * ((out - problem.y) ** 2).sum(-1).mean()

    def w_of(tflat):
        return flat(weights(unflat(tflat, t_shapes)), w_shapes)

    t0 = flat({k: v.detach() for k, v in theta.items()}, t_shapes)
    return DenseReference(name=name, problem=problem, theta=theta, **dense_curvature(loss_w, w_of, t0))


def dense_curvature(loss_w, w_of, t0: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every curvature object by plain ``torch.func`` from a flat loss ``loss_w(w)`` and map ``w_of(θ)``.

    Returns ``H``, ``g``, ``H_theta``, ``J``, ``signal = JᵀHJ`` and ``drift`` (the Hessian of
    ``θ ↦ ⟨g, w(θ)⟩`` with ``g`` fixed), all at ``θ = t0``.
    """
    w0 = w_of(t0).detach()
    H, g, J = hessian(loss_w)(w0), jacrev(loss_w)(w0), jacrev(w_of)(t0)
    return {
        "H": H,
        "g": g,
        "H_theta": hessian(lambda t: loss_w(w_of(t)))(t0),
        "J": J,
        "signal": J.T @ H @ J,
        "drift": hessian(lambda t: g @ w_of(t))(t0),
    }


@pytest.fixture(scope="session", params=["square-init", "square-trained", "rect-init", "rect-trained"])
def dense_case(request) -> DenseReference:
    """A SiLU MLP at init (``B = 0``) or after Adam steps (``B ≠ 0``), with its dense reference."""
    torch.set_default_dtype(torch.float64)
    shape, point = request.param.split("-")
    problem = mlp_problem(dim=6, depth=3, rank=2, alpha=3.0) if shape == "square" else rect_problem()
    theta = init_theta(problem, seed=1) if point == "init" else trained_theta(problem, seed=1)
    return dense_reference(problem, theta, request.param)


def assert_cli_refuses(cli: list[str], needle: str, out: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m *cli``: bad input must exit 2 naming ``needle``, with no traceback and no ``out``."""
    r = subprocess.run([sys.executable, "-m", *cli], capture_output=True, text=True)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    if out is not None:
        assert not out.exists()
    return r


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for ``torchrun --master_port``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StopBuild(Exception):
    """Raised by :func:`record_build_device`'s stand-in, before any model is loaded."""


def record_build_device(monkeypatch, module) -> list:
    """Replace ``module.build_base_model`` by a stand-in that records its ``device`` and stops the run.

    CUDA is reported available (mocked); the caller runs the command under
    ``pytest.raises(StopBuild)`` and reads the devices from the returned list.
    """
    seen: list = []

    def build(*args, device=None, **kwargs):
        seen.append(device)
        raise StopBuild

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(module, "build_base_model", build)
    return seen
