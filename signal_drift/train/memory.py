"""Peak memory per process of a LoRA training run, from the model's config alone (no weights).

``python -m signal_drift.train --estimate-memory ...`` prints :func:`estimate_memory` of the
run the same flags would start, and exits. The terms:

- **base weights**: every parameter of the model, 2 bytes in bf16 (the frozen base on a GPU,
  :func:`~signal_drift.train.base_dtype`), 4 in fp32;
- **LoRA state**: ``r·(in + out)`` per adapted linear, in fp32, four times over (the weights,
  their gradients, AdamW's two moments);
- **activations**: what the forward pass saves for the backward pass, per token and decoder
  layer, in the activation dtype (2 bytes under bf16 autocast, 4 in fp32): the layer's
  inputs and the attention projections (``2·hidden + 2·q + 2·kv``), four ``intermediate``-wide
  tensors of the MLP, each adapter's ``r``-wide ``A`` output, two float32 ``hidden``-wide
  RMSNorm copies and, over a bf16 base, each adapter's own copy of its input (PEFT casts
  the input to the adapters' fp32, autocast back to bf16, one copy per adapter). Eager attention adds
  ``heads·T`` attention scores per token (float32 softmax, plus its bf16 copy in bf16); SDPA
  (the default) keeps ``O(T)``. With gradient checkpointing each layer keeps only its input
  and one layer's activations are recomputed at a time (**recompute**);
- **logits**: the whole micro-batch's logits, their float32 copy and the saved log-softmax
  (``B·T·V·(2 + 4 + 4)`` bytes in bf16), or with ``loss_chunk`` the same for one slice plus its
  gradient (:func:`signal_drift.lm.chunked_next_token_nll`).

The activation formula counts what the offline Llama's forward actually saves on the CPU
(``torch.autograd.graph.saved_tensors_hooks``, tested within a factor 2 across widths, depths,
dtypes and attention kinds); the CUDA context (≈ 0.5–1 GB), the allocator's fragmentation and
the transient gradients of the backward pass come on top.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from .._errors import InputError, check_positive_int

__all__ = ["MemoryEstimate", "estimate_memory", "model_config"]

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training process, by term (bytes); see the module docstring.

    Attributes:
        base_weights: the model's own parameters (frozen).
        lora_state: the adapters, their gradients and AdamW's two moments (fp32).
        activations: what the forward pass saves for the backward pass.
        recompute: one decoder layer's activations, rebuilt in the backward pass under gradient
            checkpointing (0 without).
        logits: the output head's logits and the cross-entropy's copies (whole batch or slice).
        base_params, lora_params: parameter counts.
        tokens: tokens per forward (micro-batch × sequence length).
    """

    base_weights: int
    lora_state: int
    activations: int
    recompute: int
    logits: int
    base_params: int
    lora_params: int
    tokens: int

    @property
    def total(self) -> int:
        """The sum of the memory terms (bytes)."""
        return self.base_weights + self.lora_state + self.activations + self.recompute + self.logits

    def table(self) -> str:
        """The terms and their total in GiB, one per line."""
        rows = [(f.name.replace("_", " "), getattr(self, f.name)) for f in fields(self)][:5]
        rows.append(("total", self.total))
        return "\n".join(f"{name:<14}{b / GIB:>9.2f} GiB" for name, b in rows)


def model_config(model: str | Path | Mapping | None, seq_len: int = 128):
    """A ``transformers`` config: a model directory's (``config.json`` alone), a dict's, the offline Llama's.

    Raises:
        InputError: if the directory has no ``config.json``.
    """
    from transformers import AutoConfig  # optional dependency

    from ..lm import tiny_llama_config

    if model is None:
        return tiny_llama_config(seq_len)
    if not isinstance(model, Mapping):
        path = Path(model) / "config.json"
        if not path.is_file():
            raise InputError(f"--model {model}: not a local Hugging Face model directory (no config.json)")
        model = json.loads(path.read_text())
    d = dict(model)
    return AutoConfig.for_model(d.pop("model_type", "llama"), **d)


def _meta_model(config):
    """The model of ``config`` on the meta device: exact shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM  # optional dependency

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def estimate_memory(
    config,
    *,
    batch: int,
    seq_len: int,
    precision: str,
    lora_rank: int,
    targets: Sequence[str] | None = None,
    grad_checkpointing: bool = False,
    loss_chunk: int | None = None,
    attention: str = "sdpa",
) -> MemoryEstimate:
    """Peak memory of one process training LoRA adapters on ``batch`` sequences per forward.

    Args:
        config: a ``transformers`` config or a dict of ``config.json`` (:func:`model_config`).
        batch: sequences per forward and backward (``micro_batch``, or the process's share of
            the batch).
        seq_len: tokens per sequence.
        precision: ``"bf16"`` (autocast over a bf16 base, as on a GPU) or ``"fp32"``.
        lora_rank: r.
        targets: the adapted projections (default: those of :data:`~signal_drift.scaling.peft.LLAMA_TARGETS`
            the model has, as training picks them).
        grad_checkpointing: recompute each decoder layer in the backward pass.
        loss_chunk: tokens per slice of the chunked cross-entropy (``None``: all at once).
        attention: ``"sdpa"`` (the default implementation) or ``"eager"`` (the ``T × T`` scores kept).

    Returns:
        A :class:`MemoryEstimate`.

    Raises:
        InputError: for a bad precision, attention, size, or targets that match no linear layer.
    """
    from ..scaling.peft import LLAMA_TARGETS, present_targets, target_linears

    if precision not in ("bf16", "fp32"):
        raise InputError(f"precision={precision!r}: use 'bf16' or 'fp32' (resolve 'auto' first)")
    if attention not in ("sdpa", "eager"):
        raise InputError(f"attention={attention!r}: use 'sdpa' or 'eager'")
    for name, v in (("batch", batch), ("seq_len", seq_len), ("lora_rank", lora_rank)):
        check_positive_int(name, v)
    if isinstance(config, Mapping):
        config = model_config(config)
    model = _meta_model(config)
    targets = present_targets(model, LLAMA_TARGETS) if targets is None else list(targets)
    linears = target_linears(model, targets)
    base_params = sum(p.numel() for p in model.parameters())
    lora_params = sum(lora_rank * (m.in_features + m.out_features) for m in linears.values())

    a = 2 if precision == "bf16" else 4  # activation bytes (autocast)
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers, vocab = config.num_hidden_layers, config.vocab_size
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = len([n for n in linears if ".layers." in n]) // max(layers, 1)
    copies = sum(m.in_features for m in linears.values()) // max(layers, 1) if a < 4 else 0
    layer_token = (
        a * (2 * hidden + 2 * q + 2 * kv + 4 * inter + lora_rank * per_layer + copies) + 4 * 2 * hidden
    )
    if attention == "eager":
        layer_token += heads * seq_len * (4 + (a if a < 4 else 0))
    tokens = batch * seq_len
    layer = tokens * layer_token
    final_norm = tokens * (4 * hidden + a * hidden)
    if grad_checkpointing:
        activations, recompute = layers * tokens * a * hidden + final_norm, layer
    else:
        activations, recompute = layers * layer + final_norm, 0
    per_logit = a + (4 if a < 4 else 0) + 4  # the logits, their float32 copy, the saved log-softmax
    if loss_chunk is None:
        logits = tokens * vocab * per_logit
    else:
        check_positive_int("loss_chunk", loss_chunk)
        logits = min(loss_chunk, tokens) * vocab * (per_logit + 4)  # + the slice's gradient
    return MemoryEstimate(
        base_weights=base_params * a,
        lora_state=lora_params * 4 * 4,
        activations=activations,
        recompute=recompute,
        logits=logits,
        base_params=base_params,
        lora_params=lora_params,
        tokens=tokens,
    )


def describe_run(cfg, processes: int | None = None) -> str:
    """What ``python -m signal_drift.train --estimate-memory`` prints for a ``TrainConfig``.

    Args:
        cfg: the run's settings (``model`` may hold ``config.json`` alone).
        processes: the ``torchrun`` processes sharing ``batch_size`` (default: ``WORLD_SIZE``, else 1).

    Returns:
        The settings the estimate assumes, then :meth:`MemoryEstimate.table`.

    Raises:
        InputError: if ``batch_size`` is not a multiple of ``processes``.
    """
    import os

    import torch

    from . import resolve_precision

    processes = int(os.environ.get("WORLD_SIZE", "1")) if processes is None else processes
    check_positive_int("processes", processes)
    if cfg.batch_size % processes:
        raise InputError(f"--batch-size={cfg.batch_size} must be a multiple of the {processes} processes")
    share = cfg.batch_size // processes
    batch = min(cfg.micro_batch or share, share)
    precision, note = cfg.precision, ""
    if precision == "auto":
        if torch.cuda.is_available():
            precision = resolve_precision("auto", torch.device("cuda"))
        else:
            precision, note = "bf16", " (auto, taken as a GPU with native bf16: no GPU here)"
    config = model_config(cfg.model, cfg.seq_len)
    est = estimate_memory(config, batch=batch, seq_len=cfg.seq_len, precision=precision, lora_rank=cfg.rank,
                          grad_checkpointing=cfg.grad_checkpointing, loss_chunk=cfg.loss_chunk)  # fmt: skip
    chunk = f"slices of {cfg.loss_chunk} tokens" if cfg.loss_chunk else "whole micro-batch"
    sizes = f"{est.base_params / 1e9:.3g}B parameters), LoRA r={cfg.rank} ({est.lora_params / 1e6:.3g}M"
    head = [
        f"estimated peak memory per process: {cfg.model or 'the offline Llama'} ({sizes} parameters)",
        f"  {precision}{note}; {processes} process(es), {batch} sequence(s) of {cfg.seq_len} tokens per "
        f"forward; grad checkpointing {'on' if cfg.grad_checkpointing else 'off'}; logits: {chunk}; "
        "SDPA attention",
    ]
    tail = (
        "  + the CUDA context (≈ 0.5–1 GiB), allocator fragmentation and the backward's transient gradients"
    )
    return "\n".join([*head, est.table(), tail])
