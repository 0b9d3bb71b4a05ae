"""CLI: ``python -m signal_drift.scaling`` prints the paper's Table 6 (or ``--json``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from .._errors import check_positive_int, run_cli
from ..settings import ConfigParser
from . import table6

PROG = "python -m signal_drift.scaling"


@dataclass(frozen=True)
class _Settings:
    """The flags of ``python -m signal_drift.scaling``: the arguments of :func:`table6`.

    Attributes:
        fan_in: layer fan-in n.
        ranks: the ranks r of the rows.
    """

    fan_in: int = 4096
    ranks: tuple[int, ...] = (1, 4, 8, 16, 32, 64, 128, 256)

    def validate(self) -> None:
        """Raise :class:`~signal_drift.InputError` naming the first invalid field."""
        check_positive_int("fan_in", self.fan_in)
        for r in self.ranks:
            check_positive_int("ranks", r)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print Table 6 (or ``--json``)."""
    p = ConfigParser(_Settings, prog=PROG, description=__doc__)
    p.add_argument("--json", action="store_true", help="print a JSON list of rows")
    cfg, ns = p.parse_config(argv)
    rows = table6(cfg.fan_in, cfg.ranks)
    if ns.json:
        print(json.dumps(rows))
        return 0
    head = (
        "r",
        "heuristic α=r",
        "Variant I 256√r",
        f"Variant II √(3nr), n={cfg.fan_in}",
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
