"""Spectral engine (dense, Lanczos, SLQ, trace estimators) and the Figure 8 experiment.

CLI: ``python -m signal_drift.spectra --dim 64``. The figure itself is
:func:`signal_drift.spectra.figure.plot_fig8` (not re-exported here, so that importing the
engine does not load matplotlib).
"""

from .checks import alpha_check, trace_rule_mc
from .claims import summarize
from .experiment import SpectraConfig, SpectraResult, default_alphas, run_spectra
from .init_blocks import Coupling, InitBlocks
from .lanczos import EigResult, LanczosTridiag, dense_eigvalsh, eigsh, lanczos, lanczos_eigs
from .slq import SLQResult, slq
from .stats import SpectrumStats, negative_mass
from .trace import TraceEstimate, hutchinson, hutchpp

__all__ = [
    # eigensolvers
    "lanczos",
    "lanczos_eigs",
    "eigsh",
    "dense_eigvalsh",
    "LanczosTridiag",
    "EigResult",
    # densities and traces
    "slq",
    "SLQResult",
    "hutchinson",
    "hutchpp",
    "TraceEstimate",
    # per-matrix statistics and the block structure at init
    "SpectrumStats",
    "negative_mass",
    "InitBlocks",
    "Coupling",
    # the Figure 8 experiment
    "SpectraConfig",
    "SpectraResult",
    "default_alphas",
    "run_spectra",
    "summarize",
    "alpha_check",
    "trace_rule_mc",
]
