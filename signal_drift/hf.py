"""Hugging Face causal LMs and PEFT adapters as LoRA problems (docs/theory.md#lm-experiment).

The curvature engine of :mod:`signal_drift.hessian` and :mod:`signal_drift.decomposition`
works on any :class:`~signal_drift.lora.LoraProblem`; this module builds one from what an LM
practitioner has:

- :func:`lm_problem`: a ``transformers`` causal LM (``LlamaForCausalLM``, ``GPT2LMHeadModel``
  with its transposed ``Conv1D`` layers, ``Qwen2ForCausalLM``, ...) with fresh LoRA adapters on
  the named linear layers, scored by :func:`~signal_drift.lm.causal_lm_loss`;
- :func:`from_peft`: a PEFT model with a trained (or freshly initialised) LoRA adapter, read
  with the scaling PEFT actually applies (``use_rslora``, ``alpha_pattern``, ``rank_pattern``),
  returned with ``θ`` at the adapter's current values;
- :func:`lm_batches`: token windows as batches (``input_ids``, ``attention_mask``, ``labels``).

**Precision.** Second derivatives need an attention whose forward is differentiable twice:
the problem runs the model with its eager attention whatever ``attn_implementation`` it was
loaded with. In a float64 model, ``transformers`` still computes RMSNorm, rotary embeddings and
the eager softmax in float32 (Llama, Qwen2, Mistral), which caps every identity at ~1e-7;
:func:`float64_forward` (applied by both builders when the model is float64, only during the
problem's own forward passes) computes them in the input's dtype instead. The user's model is
left as it was.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ._errors import InputError
from .lm import IGNORE_INDEX, causal_lm_loss
from .lora import (
    AdapterSpec,
    Batch,
    LoraProblem,
    _check_problem,
    _eval_mode,
    _is_conv1d,
    _is_linear_layer,
    _total_weight,
    as_batches,
    loss_weight,
    model_output,
)
from .lora import attach_lora as _attach_lora
from .scaling import InitKind

__all__ = ["float64_forward", "lm_batches", "lm_problem", "from_peft", "lm_data", "shard"]

Theta = dict[str, torch.Tensor]


# -- precision --------------------------------------------------------------------------------
def _rms_norm_forward(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(h: torch.Tensor) -> torch.Tensor:
        return mod.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon))

    return forward


def _rotary_forward(mod: nn.Module) -> Callable:
    def forward(x: torch.Tensor, position_ids: torch.Tensor):
        inv = mod.inv_freq.to(device=x.device, dtype=x.dtype)
        freqs = position_ids[..., None].to(x.dtype) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * mod.attention_scaling, emb.sin() * mod.attention_scaling

    return forward


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with the softmax in the scores' own dtype (``transformers`` forces float32)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    weights = torch.nn.functional.softmax(scores, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


#: Modules whose eager attention is plain scaled dot-product attention with GQA and an additive mask
#: (what :func:`_eager_attention` reproduces); other families (soft-capping, sinks, ...) keep theirs.
_PLAIN_EAGER = frozenset(
    f"transformers.models.{m}.modeling_{m}" for m in ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2")
)


def _static_rope(mod: nn.Module) -> bool:
    """Rotary embeddings whose frequencies do not change with the input (no dynamic/longrope update)."""
    kind = str(getattr(mod, "rope_type", "default"))
    return "dynamic" not in kind and "longrope" not in kind


@contextlib.contextmanager
def float64_forward(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention, and in float64 throughout if it is a float64 model.

    Inside the block: the attention is eager (second derivatives exist everywhere); for a
    float64 model, RMSNorm (modules named ``*RMSNorm`` with ``variance_epsilon``), rotary
    embeddings (``*RotaryEmbedding`` with ``inv_freq``, static frequencies only) and the eager
    attention's softmax (Llama, Mistral, Qwen2/3, Phi-3, OLMo-2, whose eager attention is plain)
    compute in float64 instead of float32. Everything is restored on exit. The problem builders
    check that the patched forward gives the model's own loss (:func:`_check_same_loss`).
    """
    restore: list[Callable[[], None]] = []
    configs = {
        id(m.config): m.config
        for m in model.modules()
        if hasattr(getattr(m, "config", None), "_attn_implementation")
    }
    for cfg in configs.values():
        old = cfg._attn_implementation
        if old != "eager":
            cfg._attn_implementation = "eager"
            restore.append(lambda cfg=cfg, old=old: setattr(cfg, "_attn_implementation", old))
    params = [p for p in model.parameters() if p.is_floating_point()]
    if params and params[0].dtype == torch.float64:
        for mod in model.modules():
            name = type(mod).__name__
            if name.endswith("RMSNorm") and hasattr(mod, "variance_epsilon") and hasattr(mod, "weight"):
                patch = _rms_norm_forward(mod)
            elif name.endswith("RotaryEmbedding") and hasattr(mod, "inv_freq") and _static_rope(mod):
                patch = _rotary_forward(mod)
            else:
                patch = None
            if patch is not None and "forward" not in vars(mod):
                mod.forward = patch
                restore.append(lambda mod=mod: vars(mod).pop("forward", None))
            lib = sys.modules.get(type(mod).__module__)
            if (
                name.endswith("Attention")
                and type(mod).__module__ in _PLAIN_EAGER
                and getattr(lib, "eager_attention_forward", None) not in (None, _eager_attention)
            ):
                old_fn = lib.eager_attention_forward
                lib.eager_attention_forward = _eager_attention
                restore.append(lambda lib=lib, old_fn=old_fn: setattr(lib, "eager_attention_forward", old_fn))
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()


# -- data ---------------------------------------------------------------------------------------
def lm_batches(
    ids: torch.Tensor | Sequence[torch.Tensor],
    batch_size: int | None = None,
    *,
    labels: torch.Tensor | None = None,
    pad_id: int = 0,
) -> tuple[Batch, ...]:
    """Token sequences as :class:`~signal_drift.lora.Batch` es for :func:`~signal_drift.lm.causal_lm_loss`.

    Args:
        ids: ``[N, T]`` token ids, or a list of 1-D sequences of any lengths (right-padded per
            batch with ``pad_id``, masked in ``attention_mask`` and ``labels``).
        batch_size: sequences per batch (default: all in one).
        labels: ``[N, T]`` labels (``-100`` where not scored, e.g. the prompt in SFT); default
            the ids themselves.
        pad_id: token id written at padded positions.

    Returns:
        Batches with inputs ``{"input_ids", "attention_mask"}`` and targets ``labels``.

    Raises:
        InputError: naming ``ids`` if it is empty or a sequence is shorter than 2 tokens.
    """
    seqs = list(ids) if not isinstance(ids, torch.Tensor) or ids.ndim == 2 else [ids]
    if not seqs:
        raise InputError("ids: no sequence")
    short = [i for i, s in enumerate(seqs) if s.ndim != 1 or len(s) < 2]
    if short:
        raise InputError(f"ids: sequence {short[0]} is shorter than 2 tokens (nothing to predict)")
    lab = list(labels) if labels is not None else seqs
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size={batch_size} is invalid: must be >= 1 (or None: one batch)")
    size = batch_size or len(seqs)
    out = []
    for i in range(0, len(seqs), size):
        chunk, lchunk = seqs[i : i + size], lab[i : i + size]
        T = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        for j, (s, ls) in enumerate(zip(chunk, lchunk, strict=True)):
            input_ids[j, : len(s)], mask[j, : len(s)], y[j, : len(s)] = s, 1, ls
        out.append(Batch({"input_ids": input_ids, "attention_mask": mask}, y))
    return tuple(out)


def lm_data(data) -> tuple[Batch, ...]:
    """``data`` as batches.

    A ``[N, T]`` id tensor is one batch with every position scored; anything else goes through
    :func:`~signal_drift.lora.as_batches`.
    """
    if isinstance(data, torch.Tensor) and not data.is_floating_point():
        return lm_batches(data)
    return as_batches(data)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- problems -----------------------------------------------------------------------------------
def lm_problem(
    model: nn.Module,
    data,
    *,
    targets: Sequence[str],
    rank: int = 8,
    alpha: float | None = None,
    init: InitKind = "kaiming_uniform",
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    distributed: bool = False,
) -> LoraProblem:
    """A causal LM with fresh LoRA adapters on the linear layers whose names end with ``targets``.

    Args:
        model: a ``transformers`` causal LM (any dtype; float64 for exact curvature).
        data: token ids ``[N, T]`` or batches (see :func:`lm_batches`).
        targets: module-name suffixes, as PEFT's ``target_modules`` (``"q_proj"``, ``"c_attn"``).
        rank: LoRA rank ``r``.
        alpha: ``α`` (default ``r``).
        init: init of ``A`` (PEFT's is ``"kaiming_uniform"``).
        rank_pattern: per-layer ranks, keyed by full module name.
        alpha_pattern: per-layer ``α``, keyed by full module name.
        distributed: ``data`` is this process's share (see :class:`~signal_drift.lora.LoraProblem`).

    Returns:
        The :class:`~signal_drift.lora.LoraProblem`, loss :func:`~signal_drift.lm.causal_lm_loss`,
        forward passes under :func:`float64_forward`.

    Raises:
        InputError: no linear layer matches ``targets``, or bad data (see ``attach_lora``).
    """
    names = [n for n, m in model.named_modules()
             if _is_linear_layer(m) and any(n == t or n.endswith("." + t) for t in targets)]  # fmt: skip
    if not names:
        raise InputError(f"targets: {list(targets)} match no linear layer of the model")
    batches = tuple(b.to(_device_of(model)) for b in lm_data(data))
    with float64_forward(model):
        problem = _attach_lora(
            model, data=batches, targets=names, rank=rank, alpha=alpha, init=init, rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern, loss_fn=causal_lm_loss, distributed=distributed,
        )  # fmt: skip
    problem = _with_context(problem)
    _check_same_loss(problem, problem.base_weights(), model, "model")
    return problem


def _with_context(problem: LoraProblem) -> LoraProblem:
    import dataclasses

    return dataclasses.replace(problem, forward_context=lambda: float64_forward(problem.module))


_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA rescales each column of W by a learned magnitude: W is not W0 + s·B·A",
    "alora_invocation_tokens": "activated LoRA applies the adapter to some tokens only",
    "use_qalora": "QA-LoRA pools the input before A",
    "trainable_token_indices": "trained embedding rows are outside θ = (A, B)",
    "use_bdlora": "block-diagonal LoRA factors are not a plain B·A",
    "lora_bias": "a bias on lora_B adds parameters outside θ = (A, B)",
    "modules_to_save": "fully trained modules beside the adapter are outside θ = (A, B)",
    "layer_replication": "replicated layers share weights across depth",
}


def from_peft(
    peft_model: nn.Module, data, *, adapter: str | None = None, distributed: bool = False
) -> tuple[LoraProblem, Theta]:
    """Read a PEFT LoRA adapter as a problem and its point ``θ``.

    Every LoRA layer of the adapter becomes an :class:`~signal_drift.lora.AdapterSpec` with
    ``A = lora_A.weight`` (``[r, n]``), ``B = lora_B.weight`` (``[m, r]``) and the scale PEFT
    applies, ``scaling = lora_alpha / r`` (or ``/ √r`` with ``use_rslora``; per layer with
    ``alpha_pattern`` / ``rank_pattern``), written in the one formula ``s = γ α / r`` with
    ``γ = 1`` and ``α = scaling · r``. ``nn.Linear`` and GPT-2's ``Conv1D``
    (``fan_in_fan_out``) layers are read. The base weights ``W0`` are the wrapped layers'
    ``base_layer.weight``; PEFT's own LoRA branch is silenced in the problem's forward passes
    (its ``lora_B`` read as zero), so ``θ`` enters only through ``W = W0 + s B A``.

    Args:
        peft_model: a ``peft.PeftModel`` (or the base model PEFT injected into).
        data: token ids ``[N, T]`` or batches (see :func:`lm_batches`), scored by
            :func:`~signal_drift.lm.causal_lm_loss`.
        adapter: adapter name (default: the active one).
        distributed: ``data`` is this process's share.

    Returns:
        ``(problem, theta)``: ``theta`` holds the adapter's current ``A`` and ``B``, in the
        base weights' dtype.

    Raises:
        InputError: one line naming what the decomposition does not cover (DoRA, bias or
            embedding adapters, merged or several active adapters, modules to save, dropout in
            training mode, quantised base layers), or an adapter with no LoRA layer.
    """
    from .scaling.peft import lora_modules

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    configs = getattr(peft_model, "peft_config", None) or getattr(base, "peft_config", {})
    if adapter is None:
        active = getattr(peft_model, "active_adapters", None) or [
            getattr(peft_model, "active_adapter", "default")
        ]
        adapter = active[0]
    else:
        active = getattr(peft_model, "active_adapters", None) or [
            getattr(peft_model, "active_adapter", adapter)
        ]
    if adapter not in configs:
        raise InputError(f"adapter: {adapter!r} is not an adapter of the model; it has {list(configs)}")
    if list(active) != [adapter]:
        raise InputError(
            f"model: active adapters {list(active)}; exactly one, the one read ({adapter!r}), must be active "
            "(peft_model.set_adapter(name))"
        )
    cfg = configs[adapter]
    for key, why in _UNSUPPORTED_CONFIG.items():
        if getattr(cfg, key, None):
            raise InputError(f"adapter {adapter!r}: {key} is not supported ({why})")
    for name, mod in base.named_modules():  # PEFT's embedding layers keep their factors apart from lora_A
        if adapter in getattr(mod, "lora_embedding_A", {}):
            where = f"adapter {adapter!r}, layer {name!r}"
            raise InputError(f"{where}: LoRA on an embedding is not supported (only linear layers)")
    layers = lora_modules(base, adapter)
    if not layers:
        raise InputError(f"adapter {adapter!r}: the model has no LoRA layer for it")
    specs, theta = [], {}
    for name, mod in layers.items():
        spec, A, B = _read_layer(name, mod, adapter, base, getattr(cfg, "init_lora_weights", True))
        specs.append(spec)
        theta[spec.key_A], theta[spec.key_B] = A, B
    params = {k: v.detach() for k, v in base.named_parameters()}
    params.update({k: v.detach() for k, v in base.named_buffers()})
    for k in list(params):
        if ".lora_B." in k or ".lora_embedding_B." in k:
            params[k] = torch.zeros_like(params[k])  # PEFT's branch adds nothing: θ enters through W
    batches = tuple(b.to(_device_of(base)) for b in lm_data(data))
    total = _total_weight(causal_lm_loss, batches, distributed)
    problem = LoraProblem(base, params, tuple(specs), batches, causal_lm_loss, total, distributed)
    problem = _with_context(problem)
    _check_problem(problem)
    problem.check_theta(theta)
    with torch.no_grad():
        _check_same_loss(problem, problem.weights(theta), peft_model, "adapter")
    return problem, theta


def _check_same_loss(
    problem: LoraProblem, w: Mapping[str, torch.Tensor], model: nn.Module, what: str
) -> None:
    """Refuse a problem whose loss on its first batch differs from ``model``'s own forward at ``w``.

    Catches adapter variants and attention forms the problem does not reproduce. The tolerance
    (1e-5 relative) leaves room for the float32 blocks a float64 model has outside
    :func:`float64_forward` (~1e-7) and none for a different network.
    """
    b = problem.batches[0]
    if not loss_weight(problem.loss_fn, b.targets) > 0:
        return
    with torch.no_grad(), _eval_mode(model):
        out = model(**b.inputs) if isinstance(b.inputs, Mapping) else model(b.inputs)
        ref = float(problem.loss_fn(model_output(out), b.targets))
        ours = float(problem.loss_fn(problem.output_w(w, b.inputs), b.targets))
    if not abs(ours - ref) <= 1e-5 * max(abs(ref), 1e-12):
        raise InputError(
            f"{what}: the problem's loss {ours:.10g} differs from the model's own forward {ref:.10g}; this "
            "architecture or adapter type is not reproduced exactly"
        )


def _read_layer(
    name: str, mod: nn.Module, adapter: str, base: nn.Module, init_how: object = True
) -> tuple[AdapterSpec, torch.Tensor, torch.Tensor]:
    """One LoRA layer as a spec and its ``A``, ``B``.

    ``init_how`` is PEFT's ``init_lora_weights``; the spec records its law of ``A``:
    Kaiming-uniform by default, ``N(0, 1/r²)`` for ``"gaussian"``.
    """
    where = f"adapter {adapter!r}, layer {name!r}"  # embedding layers were refused by from_peft
    if getattr(mod, "merged", False) or getattr(mod, "merged_adapters", None):
        raise InputError(f"{where}: the adapter is merged into the base weight; call unmerge_adapter() first")
    if getattr(mod, "use_dora", {}).get(adapter, False):
        raise InputError(f"{where}: DoRA is not supported (W is not W0 + s·B·A)")
    drop = mod.lora_dropout[adapter] if adapter in getattr(mod, "lora_dropout", {}) else None
    if drop is not None and base.training and getattr(drop, "p", 0) > 0:
        raise InputError(
            f"{where}: lora_dropout p={drop.p} is active (training mode); call model.eval(): the "
            "curvature is that of the deterministic network"
        )
    bl = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod.base_layer
    conv = _is_conv1d(bl)
    if not (isinstance(bl, nn.Linear) or conv):
        raise InputError(
            f"{where}: base layer is a {type(bl).__name__}; only nn.Linear and Conv1D are supported"
        )
    if type(bl.weight).__name__ not in ("Parameter", "Tensor"):
        raise InputError(
            f"{where}: base weight is a {type(bl.weight).__name__} (quantised?); load the base unquantised"
        )
    lin_A, lin_B = mod.lora_A[adapter], mod.lora_B[adapter]
    if not isinstance(lin_A, nn.Linear) or not isinstance(lin_B, nn.Linear):
        raise InputError(f"{where}: LoRA factors are {type(lin_A).__name__}; only linear LoRA is supported")
    if lin_B.bias is not None:
        raise InputError(f"{where}: lora_B has a bias (lora_bias); not supported")
    fifo = bool(getattr(mod, "fan_in_fan_out", False))
    if fifo != conv:
        raise InputError(f"{where}: fan_in_fan_out={fifo} does not match a {type(bl).__name__} base layer")
    W0 = bl.weight
    m, n = (W0.shape[1], W0.shape[0]) if conv else tuple(W0.shape)
    r = int(mod.r[adapter])
    A, B = lin_A.weight.detach().to(W0.dtype), lin_B.weight.detach().to(W0.dtype)
    if tuple(A.shape) != (r, n) or tuple(B.shape) != (m, r):
        raise InputError(
            f"{where}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit a {m}x{n} weight, r={r}"
        )
    scaling = float(mod.scaling[adapter])
    if not math.isfinite(scaling) or scaling <= 0:
        raise InputError(f"{where}: scaling {scaling} is not a positive number")
    prefix = name + "."
    param = prefix + ("base_layer.weight" if hasattr(mod, "base_layer") else "weight")
    init, std = ("gaussian", 1.0 / r) if init_how == "gaussian" else ("kaiming_uniform", None)
    spec = AdapterSpec(
        name, int(m), int(n), r, alpha=scaling * r, init=init, init_std=std, param=param, transposed=conv
    )
    return spec, A, B


def shard(batches: Iterable[Batch], rank: int, world: int) -> tuple[Batch, ...]:
    """The share of ``batches`` that process ``rank`` of ``world`` holds: every ``world``-th from ``rank``."""
    return tuple(batches)[rank::world]
