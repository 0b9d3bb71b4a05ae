"""CLI: ``python -m signal_drift.calibrate`` — measured per-layer α as a PEFT ``alpha_pattern``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._errors import run_cli
from . import CalibrateConfig, calibrate

PROG = "python -m signal_drift.calibrate"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    d = CalibrateConfig()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument(
        "--model", help="local Hugging Face model directory (default: build a small Llama offline)"
    )
    p.add_argument("--data", help=".txt or .jsonl calibration corpus (default: offline docstrings)")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--targets", nargs="+", default=list(d.targets), help="module-name suffixes, as in PEFT")
    p.add_argument(
        "--init", default=d.init, help="A init PEFT applies: kaiming_uniform (default) or gaussian"
    )
    p.add_argument("--samples", type=int, default=d.samples, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--probes", type=int, default=d.probes, help="Hutchinson probes (shared by all layers)")
    p.add_argument("--lanczos-steps", type=int, default=d.lanczos_steps)
    p.add_argument("--dtype", default=d.dtype, help="float64 (default) or float32")
    p.add_argument(
        "--pretrain-steps", type=int, default=d.pretrain_steps, help="for the default offline model"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=d.out)
    a = p.parse_args(argv)
    cfg = CalibrateConfig(model=a.model, data=a.data, rank=a.rank, targets=tuple(a.targets), init=a.init,
                          samples=a.samples, seq_len=a.seq_len, probes=a.probes,
                          lanczos_steps=a.lanczos_steps, dtype=a.dtype, pretrain_steps=a.pretrain_steps,
                          seed=a.seed, out=a.out)  # fmt: skip
    cfg.validate()
    res = calibrate(cfg, progress=sys.stderr.isatty(), log=lambda s: print(s, file=sys.stderr))
    print(f"{'layer':40s} {'n':>6s} {'α_trace [95 %]':>18s} {'α_λmax':>9s} {'√(r/σ²)':>9s}")
    for d in res["layers"]:
        tr = f"{d['alpha_trace']:.1f} [{d['alpha_trace_low']:.0f}, {d['alpha_trace_high']:.0f}]"
        print(
            f"{d['name']:40s} {d['fan_in']:6d} {tr:>18s} {d['alpha_lambda']:9.1f} {d['alpha_gaussian']:9.1f}"
        )
    print(f"median α_λmax / α_trace = {res['gap_lambda_over_trace']:.3f}")
    print(f"written: {cfg.out}/calibration.json (alpha_pattern: trace, lambda), calibration.png")
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
