"""CLI: ``python -m signal_drift.train`` — LoRA-α fine-tuning (offline by default)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._errors import DivergenceError, run_cli
from . import TrainConfig, train

PROG = "python -m signal_drift.train"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument(
        "--model", help="local Hugging Face model directory (default: build a small Llama offline)"
    )
    p.add_argument("--data", help=".txt or .jsonl corpus (default: offline standard-library docstrings)")
    p.add_argument(
        "--scaling", default="variant1", help="variant1, variant2, rank, double_rank, rslora or fixed"
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/train")
    a = p.parse_args(argv)
    cfg = TrainConfig(model=a.model, data=a.data, scaling=a.scaling, rank=a.rank, lr=a.lr, gamma=a.gamma,
                      alpha=a.alpha, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                      eval_every=a.eval_every, checkpoint_every=a.checkpoint_every,
                      pretrain_steps=a.pretrain_steps, seed=a.seed, out=a.out)  # fmt: skip
    cfg.validate()
    try:
        m = train(cfg, progress=sys.stderr.isatty(), log=lambda s: print(s, file=sys.stderr))
    except DivergenceError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    first, last = m["heldout_nll"][0][1], m["final_heldout_nll"]
    print(f"held-out NLL {first:.4f} -> {last:.4f} nats/token after {cfg.steps} steps")
    print(f"written: {cfg.out}/metrics.json, loss.png, adapter/, checkpoint.pt")
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
