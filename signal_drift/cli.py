"""The ``signal-drift`` console command: one entry point for every ``python -m signal_drift.X``.

``signal-drift COMMAND [ARGS...]`` runs ``python -m signal_drift.COMMAND [ARGS...]`` in-process:
the same flags, outputs and exit statuses (2 with a one-line message on invalid input). The
command's module is imported only when it is chosen, so ``signal-drift --help`` stays fast and
needs none of the optional extras.

>>> sorted(COMMANDS) == sorted(["spectra", "verify", "scaling", "dynamics", "sweep", "train", "calibrate"])
True
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from ._errors import run_cli

__all__ = ["COMMANDS", "main"]

PROG = "signal-drift"

#: Command name -> (module whose ``main(argv)`` runs it, one-line summary).
COMMANDS: dict[str, tuple[str, str]] = {
    "spectra": ("signal_drift.spectra.__main__", "Figure 8: exact spectra of H, H_θ, signal and drift"),
    "verify": ("signal_drift.verify", "check every proposition against an independent reference"),
    "scaling": ("signal_drift.scaling.__main__", "the paper's Table 6 of LoRA-α scaling rules"),
    "dynamics": ("signal_drift.dynamics.__main__", "Figure 2: η-scaling vs α-scaling training paths"),
    "sweep": ("signal_drift.sweep.__main__", "Findings I and III: resumable (r, α, η) grid at MLP scale"),
    "train": ("signal_drift.train.__main__", "LoRA-α fine-tuning of a causal LM ('train sweep': Eq. 2/3)"),
    "calibrate": ("signal_drift.calibrate.__main__", "measured per-layer α as a PEFT alpha_pattern"),
}


def usage() -> str:
    """The top-level help text: the commands and how to get each one's flags."""
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    return (
        f"usage: {PROG} COMMAND [ARGS...]\n\n"
        "Exact LoRA curvature: signal/drift Hessian decomposition and the LoRA-alpha scaling rule.\n\n"
        f"commands:\n{rows}\n\n"
        f"'{PROG} COMMAND --help' lists a command's flags; '{PROG} COMMAND ...' is the same as\n"
        "'python -m signal_drift.COMMAND ...'.\n"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command named by ``argv[0]`` (default: ``sys.argv[1:]``) and exit with its status.

    Args:
        argv: ``[COMMAND, *ARGS]``; ``--help`` (or nothing) prints the list of commands.

    Raises:
        SystemExit: always: the command's own status, 0 for ``--help``, 2 for a missing or
            unknown command or invalid input.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{PROG}: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    run_cli(module.main, rest, prog=f"{PROG} {name}")
