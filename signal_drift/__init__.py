"""signal-drift: exact LoRA curvature, the signal/drift decomposition and the LoRA-α rule.

See the README for the two setup commands and ``docs/theory.md`` for the math.
"""

from ._errors import DenseTooLargeError, DivergenceError, InputError, PrecisionWarning

# curvature operators
from .decomposition import (
    Curvature,
    DriftOperator,
    MappingJacobian,
    SignalOperator,
    UpdateDecomposition,
    block_indices,
    curvature,
    decompose_update,
)
from .hessian import (
    HessianOperator,
    dense_hessian,
    fft_gradient,
    fft_hessian,
    lora_gradient,
    lora_hessian,
)

# language models and PEFT adapters
from .hf import float64_forward, from_peft, lm_batches, lm_problem
from .lm import causal_lm_loss

# models and adapters
from .lora import AdapterSpec, Batch, LoraProblem, attach_lora, init_theta
from .mlp_hessian import MLPHessianOperator
from .model import Task, make_mlp, make_task, mse_loss
from .operators import FunctionOperator, LinearOperator, ParamLayout

# optimiser directions
from .optim import gd_direction, muon_direction, sign_direction

# scaling rules
from .scaling import Rule, effective_alpha, init_variance, lora_scale, table6, variant_ii_alpha

__version__ = "0.1.0"

__all__ = [
    # errors
    "InputError",
    "PrecisionWarning",
    "DenseTooLargeError",
    "DivergenceError",
    # models and adapters
    "make_mlp",
    "make_task",
    "mse_loss",
    "Task",
    "AdapterSpec",
    "LoraProblem",
    "attach_lora",
    "init_theta",
    "Batch",
    # language models and PEFT adapters
    "lm_problem",
    "from_peft",
    "lm_batches",
    "causal_lm_loss",
    "float64_forward",
    # curvature operators
    "LinearOperator",
    "FunctionOperator",
    "ParamLayout",
    "HessianOperator",
    "MLPHessianOperator",
    "dense_hessian",
    "fft_hessian",
    "lora_hessian",
    "fft_gradient",
    "lora_gradient",
    "MappingJacobian",
    "SignalOperator",
    "DriftOperator",
    "Curvature",
    "curvature",
    "block_indices",
    "UpdateDecomposition",
    "decompose_update",
    # optimiser directions
    "gd_direction",
    "sign_direction",
    "muon_direction",
    # scaling rules
    "Rule",
    "lora_scale",
    "init_variance",
    "effective_alpha",
    "variant_ii_alpha",
    "table6",
]
