"""CLI: ``python -m signal_drift.spectra --dim 64`` — Figure 8 and ``spectra.json``.

``python -m signal_drift.spectra lm [--model DIR] [--adapter DIR] [--data FILE]``: Figure 8 on
a causal LM's LoRA adapter (:mod:`signal_drift.spectra.lm`), ``lm.json`` and ``lm_fig8.png``.
"""

from __future__ import annotations

import dataclasses
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
    """CLI entry point (``lm`` as the first argument selects the LM mode)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm"]:
        return lm_main(argv[1:])
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


def lm_main(argv: Sequence[str]) -> int:
    """``spectra lm``: the LM Figure 8; under ``torchrun`` every rank computes, rank 0 writes."""
    from .lm import LMSpectraConfig, run_lm_spectra

    p = ConfigParser(LMSpectraConfig, prog=PROG + " lm", description=lm_main.__doc__)
    p.add_output("out/spectra_lm", figures="lm_fig8.png")
    cfg, args = p.parse_config(argv)
    from ..train._dist import setup, teardown

    dist = setup(cuda=cfg.device.startswith("cuda"))  # torchrun: join the group, one GPU per process
    rank, world = dist.rank, dist.world
    if world > 1 and dist.device.type == "cuda":
        cfg = dataclasses.replace(cfg, device=str(dist.device))
    progress = sys.stderr.isatty() and rank == 0
    out = Path(args.out)

    def write(summary: dict) -> None:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "lm.json", json.dumps(summary, indent=1, default=float) + "\n")

    try:
        log = (lambda m: print(m, file=sys.stderr)) if rank == 0 else (lambda m: None)
        res = run_lm_spectra(cfg, out, progress=progress, log=log, checkpoint=write)
        write(res.summary)
        if rank == 0 and not args.no_plot:
            from .figure import plot_lm_fig8

            plot_lm_fig8(res.summary, out / "lm_fig8.png")
    finally:
        teardown()
    if rank == 0:
        s = res.summary
        print(f"signal-drift spectra lm: {len(s['layers'])} layers, |θ| = {s['params_theta']} -> {out}/")
        for point, c in s["claims"].items():
            print(f"  {point}: " + ", ".join(f"{k} {v}" for k, v in c.items() if not isinstance(v, dict)))
        for w in s["warnings"]:
            print("  warning: " + w)
        print("  time " + ", ".join(f"{k} {v:.1f} s" for k, v in s["timings"].items()))
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
