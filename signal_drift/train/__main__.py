"""CLI: ``python -m signal_drift.train`` — LoRA-α fine-tuning (offline by default).

``python -m signal_drift.train sweep`` runs the η- and α-scaling paths (Eq. 2) and the α*(r) fit
(Eq. 3) on the same model and data.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .._errors import DivergenceError, run_cli
from ..edge import format_k
from ..settings import ConfigParser
from ..sweep import describe_alpha_star
from . import TrainConfig, train
from ._dist import teardown
from .memory import describe_run
from .sweep import TrainSweepConfig, run_train_sweep

PROG = "python -m signal_drift.train"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``train [flags]`` or ``train sweep [flags]``; leaves the process group at the end."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        teardown()


def _main(argv: list[str]) -> int:
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    p = ConfigParser(TrainConfig, prog=PROG, description=__doc__, epilog=f"see also: {PROG} sweep --help")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print the estimated peak memory per process of this run and exit, training and "
                   "writing nothing (--model may hold config.json alone)")  # fmt: skip
    p.add_argument("--processes", type=int, default=None,
                   help="with --estimate-memory: the torchrun processes sharing --batch-size "
                   "(default: WORLD_SIZE, else 1)")  # fmt: skip
    estimate = p.parse_known_args(argv)[0].estimate_memory
    cfg, ns = p.parse_config(argv, weights=not estimate)
    if estimate:
        print(describe_run(cfg, ns.processes))
        return 0
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
    p = ConfigParser(TrainSweepConfig, prog=f"{PROG} sweep", description=run_train_sweep.__doc__)
    cfg, _ = p.parse_config(argv)
    result = run_train_sweep(cfg, progress=sys.stderr.isatty(), log=lambda s: print(s, file=sys.stderr))
    if int(os.environ.get("RANK", "0")) != 0:  # a non-zero torchrun rank: rank 0 reports
        return 0
    print(f"signal-drift train sweep: {len(result.records)} runs -> {cfg.out}/sweep.json, eq2.png")
    ran = {p: name for p, name in (("eta", "η"), ("alpha", "α")) if cfg.paths in ("both", p)}
    for r, best in result.analysis.best_k.items():
        print(f"  r={r}: best k " + ", ".join(f"on the {name} path {best[p]}" for p, name in ran.items()))
    ap = result.analysis.alpha_path
    print("  α* at η_FFT (α-scaling path):")
    print("\n".join(describe_alpha_star(ap)))
    if ap.alpha_star_edge:
        print(f"  warning: α* of r={list(ap.alpha_star_edge)} is at the end of the path; widen --multipliers")
    o = result.analysis.over_seeds
    if "best_alpha_minus_best_eta" in o:
        d = o["best_alpha_minus_best_eta"]
        band = "n/a" if d is None else f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
        print(
            f"  over {len(o['seeds'])} seeds: best α-path NLL − best η-path NLL {band} "
            "(95 %, Student-t over seeds)"
        )
        for name, v in o["verdicts"].items():
            print(f"    {name}: {v}")
    if "finding_1" in o:
        f1 = o["finding_1"]
        for name in ("eta_star_slope", "best_loss_slope"):
            iv = f1[name]["interval"]
            band = "n/a" if iv is None else f"{iv['estimate']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}]"
            print(f"  over {len(o['seeds'])} seeds, the α path's (α, η) grid: {name} {band}")
        for name, v in f1["verdicts"].items():
            print(f"    {name}: {v}")
    if "finding_3" in o:
        f3 = o["finding_3"]
        k = f3["fit"].get("k")
        band = "n/a" if k is None else f"{k['estimate']:.3f} [{k['low']:.3f}, {k['high']:.3f}]"
        print(f"  over {len(o['seeds'])} seeds: Eq. 3 exponent k = {band} (95 %, Student-t over seed fits)")
        print(f"    finding_3_k_is_half: {f3['verdict']}")
    for r, e in result.analysis.edge.items():
        p = e.get("early", {})
        if "predicted_eta" in p:
            rng = format_k(p["predicted_alpha"])
            print(
                f"  r={r}: Adam's edge from the base run predicts the η-path to break at k ≈ "
                f"{format_k(p['predicted_eta'])}, the α-path at k in {rng}; observed {p['observed_eta']} and "
                f"{p['observed_alpha']}"
            )
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
