"""CLI: ``python -m signal_drift.calibrate`` — measured per-layer α as a PEFT ``alpha_pattern``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .._errors import run_cli
from ..settings import ConfigParser
from . import CalibrateConfig, calibrate

PROG = "python -m signal_drift.calibrate"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    cfg, _ = ConfigParser(CalibrateConfig, prog=PROG, description=__doc__).parse_config(argv)
    res = calibrate(cfg, progress=sys.stderr.isatty(), log=lambda s: print(s, file=sys.stderr))
    print(f"{'layer':40s} {'n':>6s} {'α_trace [95 %]':>18s} {'α_λmax':>9s} {'√(r/σ²)':>9s}")
    for d in res.layers:
        tr = f"{d.alpha_trace:.1f} [{d.alpha_trace_low:.0f}, {d.alpha_trace_high:.0f}]"
        print(f"{d.name:40s} {d.fan_in:6d} {tr:>18s} {d.alpha_lambda:9.1f} {d.alpha_gaussian:9.1f}")
    print(f"median α_λmax / α_trace = {res.gap_lambda_over_trace:.3f}")
    print(f"written: {cfg.out}/calibration.json (alpha_pattern: trace, lambda), calibration.png")
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
