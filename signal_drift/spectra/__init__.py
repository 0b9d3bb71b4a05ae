"""Spectral engine (dense, Lanczos, SLQ, trace estimators) and the Figure 8 experiment.

CLI: ``python -m signal_drift.spectra --dim 64``.
"""

from .experiment import SpectraConfig, SpectraResult, default_alphas, run_spectra
from .lanczos import EigResult, LanczosTridiag, dense_eigvalsh, eigsh, lanczos, lanczos_eigs
from .slq import SLQResult, slq
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
    # the Figure 8 experiment
    "SpectraConfig",
    "SpectraResult",
    "default_alphas",
    "run_spectra",
]
