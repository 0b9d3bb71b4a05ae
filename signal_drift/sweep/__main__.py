"""CLI: ``python -m signal_drift.sweep`` — resumable (r, α, η) grid on the MLP (Findings I, III)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .._errors import run_cli
from ..io import atomic_write_text
from ..settings import ConfigParser
from . import (
    MLPSweepConfig,
    analyse,
    config_dict,
    describe_alpha_star,
    findings_over_seeds,
    mlp_cell,
    run_grid,
)

PROG = "python -m signal_drift.sweep"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    p = ConfigParser(MLPSweepConfig, prog=PROG, description=__doc__)
    p.add_output("out/sweep", figures="fig1.png")
    cfg, a = p.parse_config(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = [c | {"test_samples": cfg.test_samples} for c in cfg.cells()]
    records = run_grid(
        cells, mlp_cell, out / "sweep.jsonl", progress=sys.stderr.isatty(), log=print, workers=cfg.workers
    )
    seeds = cfg.replicates
    first = [r for r in records if r["cell"]["seed"] == seeds[0]]
    analysis = analyse(first)  # the first seed, as before
    result = {"config": config_dict(cfg), **analysis.to_json()}
    if len(seeds) > 1:
        result["over_seeds"] = findings_over_seeds(records, seeds)
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=1) + "\n")
    if not a.no_plot:
        from .figure import plot_fig1

        plot_fig1(result, first, out)
    print(f"signal-drift sweep: {len(records)} cells (r × α × η) on the d={cfg.dim} MLP -> {out}/")
    for r, per in analysis.eta_star.items():
        trend = ", ".join(f"α={al}: η*={lr:g}" for al, lr in per.items())
        print(f"  r={r}: {trend}")
    print("\n".join(describe_alpha_star(analysis)))
    if "over_seeds" in result:
        o = result["over_seeds"]
        print(f"  over {len(seeds)} seeds (Student-t 95 % intervals):")
        for name, v in o["verdicts"].items():
            print(f"    {name}: {v}")
        if "k" in o["fit"]:
            k = o["fit"]["k"]
            print(f"    Eq. 3 exponent k = {k['estimate']:.3f} [{k['low']:.3f}, {k['high']:.3f}]")
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
