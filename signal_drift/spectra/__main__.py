"""CLI: ``python -m signal_drift.spectra --dim 64`` — Figure 8 and ``spectra.json``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .._errors import run_cli
from ..io import atomic_savez, atomic_write_text
from ..settings import ConfigParser
from .experiment import SpectraConfig, run_spectra

PROG = "python -m signal_drift.spectra"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    p = ConfigParser(SpectraConfig, prog=PROG, description=__doc__)
    p.add_output("out/spectra", figures="the PNG figures")
    cfg, args = p.parse_config(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    progress = sys.stderr.isatty()
    out = Path(args.out)

    def write(summary: dict, arrays: dict) -> None:
        # finished stages and α values are on disk at every point (spectra.json "complete": false
        # until the end), so Ctrl-C or a crash keeps them
        out.mkdir(parents=True, exist_ok=True)
        atomic_savez(out / "spectra_arrays.npz", **arrays)
        atomic_write_text(out / "spectra.json", json.dumps(summary, indent=1, default=float) + "\n")

    res = run_spectra(cfg, progress=progress, log=lambda m: print(m, file=sys.stderr), checkpoint=write)
    write(res.summary, res.arrays)
    if not args.no_plot:
        from .figure import plot_fig8

        plot_fig8(res.summary, res.arrays, out)
    print(f"signal-drift spectra: d={cfg.dim}, r={cfg.rank}, {res.summary['point']} -> {out}/")
    for line in res.lines:
        print("  " + line)
    for w in res.summary["warnings"]:
        print("  warning: " + w)
    total = sum(res.summary["timings"].values())
    print(f"  time {total:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in res.summary["timings"].items()))
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
