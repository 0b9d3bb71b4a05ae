"""CLI: ``python -m signal_drift.train`` — LoRA-α fine-tuning (offline by default).

``python -m signal_drift.train sweep`` runs the η- and α-scaling paths (Eq. 2) and the α*(r) fit
(Eq. 3) on the same model and data.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .._errors import DivergenceError, run_cli
from . import TrainConfig, train

PROG = "python -m signal_drift.train"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``train [flags]`` or ``train sweep [flags]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=f"see also: {PROG} sweep --help")
    p.add_argument(
        "--model", help="local Hugging Face model directory (default: build a small Llama offline)"
    )
    p.add_argument("--data", help=".txt or .jsonl corpus (default: offline standard-library docstrings)")
    p.add_argument(
        "--scaling",
        default="variant1",
        help="variant1, variant2, rank, double_rank, rslora, fixed, or calibrated (with --calibration)",
    )
    p.add_argument(
        "--calibration", help="calibration.json of `python -m signal_drift.calibrate`, PATH[:lambda|:trace]"
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=16.0, help="α of 'fixed' and 'rslora'")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument(
        "--pretrain-steps", type=int, default=300, help="pre-training of the default offline model"
    )
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, else fp32), fp32 or bf16")
    p.add_argument(
        "--monitor-every", type=int, default=1, help="log per-layer signal/drift every N steps (0: off)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/train")
    a = p.parse_args(argv)
    cfg = TrainConfig(model=a.model, data=a.data, scaling=a.scaling, rank=a.rank, lr=a.lr, gamma=a.gamma,
                      alpha=a.alpha, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                      eval_every=a.eval_every, checkpoint_every=a.checkpoint_every,
                      pretrain_steps=a.pretrain_steps, precision=a.precision,
                      monitor_every=a.monitor_every, calibration=a.calibration, seed=a.seed,
                      out=a.out)  # fmt: skip
    cfg.validate()
    try:
        m = train(cfg, progress=sys.stderr.isatty(), log=lambda s: print(s, file=sys.stderr))
    except DivergenceError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    if "final_heldout_nll" not in m:  # a non-zero torchrun rank: rank 0 reports
        return 0
    first, last = m["heldout_nll"][0][1], m["final_heldout_nll"]
    print(f"held-out NLL {first:.4f} -> {last:.4f} nats/token after {cfg.steps} steps")
    names = ["metrics.json", "loss.png", "signal_drift.png", "adapter/", "checkpoint.pt"]
    print(
        f"written in {cfg.out}/: " + ", ".join(n for n in names if (Path(cfg.out) / n.rstrip("/")).exists())
    )
    return 0


def sweep_main(argv: Sequence[str]) -> int:
    """``train sweep``: Eq. 2 paths and the Eq. 3 fit (resumable)."""
    from ..sweep import describe_alpha_star
    from .sweep import TrainSweepConfig, run_train_sweep

    p = argparse.ArgumentParser(prog=f"{PROG} sweep", description=run_train_sweep.__doc__)
    p.add_argument(
        "--model", help="local Hugging Face model directory (default: build a small Llama offline)"
    )
    p.add_argument("--data", help=".txt or .jsonl corpus (default: offline standard-library docstrings)")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    p.add_argument("--base-alpha", type=float, help="α0 of the baseline (default: α0 = r, the heuristic)")
    p.add_argument("--base-lr", type=float, default=1e-4, help="η_FFT of the baseline")
    p.add_argument("--multipliers", type=float, nargs="+", default=[1, 4, 16, 64], help="the k of Eq. 2")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/train_sweep")
    a = p.parse_args(argv)
    cfg = TrainSweepConfig(model=a.model, data=a.data, ranks=tuple(a.ranks), base_alpha=a.base_alpha,
                           base_lr=a.base_lr, multipliers=tuple(a.multipliers), gamma=a.gamma, steps=a.steps,
                           batch_size=a.batch_size, seq_len=a.seq_len, pretrain_steps=a.pretrain_steps,
                           seed=a.seed, out=a.out)  # fmt: skip
    cfg.validate()
    result, records = run_train_sweep(
        cfg, progress=sys.stderr.isatty(), log=lambda s: print(s, file=sys.stderr)
    )
    if int(os.environ.get("RANK", "0")) != 0:  # a non-zero torchrun rank: rank 0 reports
        return 0
    print(f"signal-drift train sweep: {len(records)} runs -> {cfg.out}/sweep.json, eq2.png")
    for r, best in result["best_k"].items():
        print(f"  r={r}: best k on the η path {best['eta']}, on the α path {best['alpha']}")
    ap = result["alpha_path"]
    print("  α* at η_FFT (α-scaling path):")
    print("\n".join(describe_alpha_star(ap)))
    if ap["alpha_star_edge"]:
        print(
            f"  warning: α* of r={list(ap['alpha_star_edge'])} is at the end of the path; widen --multipliers"
        )
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
