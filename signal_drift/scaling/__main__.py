"""CLI: ``python -m signal_drift.scaling`` prints the paper's Table 6 (or ``--json``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from .._errors import check_positive_int, run_cli
from . import table6

PROG = "python -m signal_drift.scaling"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print Table 6 (or ``--json``)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--fan-in", type=int, default=4096, help="layer fan-in n (default 4096)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--json", action="store_true", help="print a JSON list of rows")
    args = p.parse_args(argv)
    check_positive_int("--fan-in", args.fan_in)
    for r in args.ranks:
        check_positive_int("--ranks", r)
    rows = table6(args.fan_in, args.ranks)
    if args.json:
        print(json.dumps(rows))
        return 0
    head = (
        "r",
        "heuristic α=r",
        "Variant I 256√r",
        f"Variant II √(3nr), n={args.fan_in}",
        "ratio I/heuristic",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        cells = [
            row["r"],
            row["heuristic"],
            row["variant_i"],
            row["variant_ii"],
            f"{row['ratio']:.1f}",
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
