"""CLI: ``python -m signal_drift.spectra --dim 64`` — Figure 8 and ``spectra.json``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .._errors import run_cli
from ..io import atomic_savez, atomic_write_text
from .experiment import SpectraConfig, run_spectra

PROG = "python -m signal_drift.spectra"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--dim", type=int, default=64, help="MLP width d (default 64)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (default 4)")
    p.add_argument("--depth", type=int, default=5, help="number of linear layers (default 5)")
    p.add_argument("--alphas", type=float, nargs="+", help="α values (default: 8 around Variant II's α*)")
    p.add_argument("--samples", type=int, default=1024, help="training samples N (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/spectra", help="output folder (default out/spectra)")
    p.add_argument("--dtype", default="float64", help="float64 (default) or float32")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--train-steps", type=int, default=0, help="evaluate after K Adam steps per α (default 0: init)"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate for --train-steps")
    p.add_argument("--pretrain-steps", type=int, default=0, help="first fit W0 on the task with K Adam steps")
    p.add_argument("--pretrain-lr", type=float, default=1e-2)
    p.add_argument(
        "--task-shift", type=float, default=0.25, help="with --pretrain-steps: fine-tune target shift"
    )
    p.add_argument("--a-draws", type=int, default=512, help="A draws for the trace-rule Monte Carlo")
    p.add_argument("--slq-probes", type=int, default=8)
    p.add_argument("--slq-steps", type=int, default=80)
    p.add_argument("--exact-fft", action="store_true", help="also diagonalise the dense FFT Hessian (slow)")
    p.add_argument(
        "--lora-spectra",
        default="auto",
        help="H_θ(α) spectra: dense eigvalsh, lanczos (extremes + SLQ), or auto (lanczos above 6000 params)",
    )
    p.add_argument("--init", default="gaussian", choices=["gaussian", "kaiming_uniform"])
    p.add_argument("--no-plot", action="store_true", help="skip the PNG figures")
    args = p.parse_args(argv)
    cfg = SpectraConfig(
        dim=args.dim, rank=args.rank, depth=args.depth, alphas=tuple(args.alphas) if args.alphas else None,
        samples=args.samples, seed=args.seed, dtype=args.dtype, device=args.device,
        train_steps=args.train_steps, lr=args.lr, pretrain_steps=args.pretrain_steps,
        pretrain_lr=args.pretrain_lr, task_shift=args.task_shift, a_draws=args.a_draws,
        slq_probes=args.slq_probes,
        slq_steps=args.slq_steps, exact_fft=args.exact_fft, lora_spectra=args.lora_spectra, init=args.init,
    )  # fmt: skip
    cfg.validate()
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
