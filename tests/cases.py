"""Shared float64 test cases and the one comparison helper used everywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from signal_drift import attach_lora, init_theta, make_mlp, make_task
from signal_drift.optim import adam_steps

torch.set_default_dtype(torch.float64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-12):
    """Compare two tensors entrywise; on failure report the worst entries."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = diff > bound
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        worst = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{int(bad.sum())} entries differ (max |diff| {diff.max():.3e}); first: {worst}")


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


def assert_cli_refuses(cli: list[str], needle: str, out: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m *cli``: bad input must exit 2 naming ``needle``, with no traceback and no ``out``."""
    r = subprocess.run([sys.executable, "-m", *cli], capture_output=True, text=True)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    if out is not None:
        assert not out.exists()
    return r
