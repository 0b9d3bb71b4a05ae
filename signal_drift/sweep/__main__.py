"""CLI: ``python -m signal_drift.sweep`` — resumable (r, α, η) grid on the MLP (Findings I, III)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .._errors import run_cli
from ..io import atomic_write_text
from . import MLPSweepConfig, analyse, config_dict, describe_alpha_star, mlp_cell, run_grid

PROG = "python -m signal_drift.sweep"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--test-samples", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--alphas", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/sweep")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    cfg = MLPSweepConfig(
        dim=a.dim,
        depth=a.depth,
        samples=a.samples,
        test_samples=a.test_samples,
        steps=a.steps,
        ranks=tuple(a.ranks),
        alphas=tuple(a.alphas),
        lrs=tuple(a.lrs),
        seed=a.seed,
    )
    cfg.validate()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = [c | {"test_samples": cfg.test_samples} for c in cfg.cells()]
    records = run_grid(cells, mlp_cell, out / "sweep.jsonl", progress=sys.stderr.isatty(), log=print)
    result = {"config": config_dict(cfg), **analyse(records)}
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=1) + "\n")
    if not a.no_plot:
        from ..plotting import plot_fig1

        plot_fig1(result, records, out)
    print(f"signal-drift sweep: {len(records)} cells (r × α × η) on the d={cfg.dim} MLP -> {out}/")
    for r, per in result["eta_star"].items():
        trend = ", ".join(f"α={al}: η*={lr:g}" for al, lr in per.items())
        print(f"  r={r}: {trend}")
    print("\n".join(describe_alpha_star(result)))
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
