"""Causal language models for the training and calibration paths: model, tokenizer, data, loss.

Everything here runs offline. With no checkpoint, :func:`build_base_model` builds a small
Llama-architecture model and pre-trains it on text that ships with every CPython install;
:func:`load_model` and :func:`tokenizer_for` read a local Hugging Face directory
(``local_files_only``); :func:`corpus_ids` turns a corpus into train and held-out token streams,
:func:`sample_windows` draws training windows from them, and :func:`next_token_nll` is the loss
(paper Eq. 1) that :mod:`signal_drift.train` minimises (:func:`chunked_next_token_nll`: the same
over slices of the logits, for large vocabularies; :class:`NextTokenLoss`: either as a module's
forward, what DDP wraps); :func:`causal_lm_loss` is the same loss
in the labels convention of ``transformers`` (the windows as ``input_ids`` and ``labels``), which
the curvature engine, and so :mod:`signal_drift.calibrate`, differentiates twice.

The two offline text domains:

- ``"pydoc"``: the language-reference topics of ``pydoc_data.topics`` (pre-training domain);
- ``"docstrings"``: API docstrings of a fixed list of standard-library modules (the held-out
  fine-tuning domain: another register of English about Python).

Model building and loading need the ``transformers`` extra (``pip install signal-drift[peft]``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path
from pydoc_data.topics import topics as _PYDOC_TOPICS

import torch
from tqdm.auto import tqdm

from ._errors import InputError, check_finite, check_positive_int

__all__ = [
    # text and tokens
    "ByteTokenizer",
    "offline_text",
    "load_text",
    "split_ids",
    "tokenizer_for",
    "corpus_ids",
    "sample_windows",
    # loss
    "causal_lm_loss",
    "IGNORE_INDEX",
    "next_token_nll",
    "chunked_next_token_nll",
    "NextTokenLoss",
    "heldout_nll",
    # models
    "tiny_llama_config",
    "build_base_model",
    "check_model_dir",
    "load_model",
]

_MODULES = ("json", "argparse", "textwrap", "email.message", "http.client", "collections", "itertools",
            "functools", "pathlib", "datetime", "decimal", "fractions", "statistics", "string", "csv",
            "logging", "unittest", "typing", "subprocess", "shutil")  # fmt: skip

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ByteTokenizer:
    """Bytes as tokens (ids 0–255) plus ``<bos>`` (256) and ``<eos>`` (257).

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("LoRA-α"))
    'LoRA-α'
    """

    vocab_size = 258
    bos_token_id, eos_token_id = 256, 257

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Inverse of :meth:`encode` (special tokens dropped)."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def offline_text(domain: str) -> str:
    """The text of an offline domain, in a deterministic order.

    Args:
        domain: ``"pydoc"`` (language-reference topics) or ``"docstrings"`` (standard-library
            API docstrings).

    Returns:
        The domain's documents joined by blank lines.

    Raises:
        InputError: for any other ``domain``.
    """
    if domain == "pydoc":
        return "\n\n".join(_PYDOC_TOPICS[k] for k in sorted(_PYDOC_TOPICS))
    if domain == "docstrings":
        parts = []
        for name in _MODULES:
            mod = importlib.import_module(name)
            for attr, obj in sorted(inspect.getmembers(mod), key=lambda t: t[0]):
                doc = inspect.getdoc(obj)
                if doc and not attr.startswith("_") and getattr(obj, "__module__", name) == mod.__name__:
                    parts.append(f"{name}.{attr}: {doc}")
        return "\n\n".join(parts)
    raise InputError(f"domain={domain!r} is invalid: use 'pydoc' or 'docstrings'")


def load_text(path: str | Path) -> str:
    """A user corpus: a ``.txt`` file, or ``.jsonl`` with a ``"text"`` field per line.

    Args:
        path: the corpus file.

    Returns:
        The text (JSONL records joined by blank lines).

    Raises:
        InputError: if the file is missing or empty, or a JSONL line has no ``"text"``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows or any("text" not in r for r in rows):
            raise InputError(f"--data {path}: every JSONL line needs a 'text' field")
        return "\n\n".join(r["text"] for r in rows)
    text = path.read_text()
    if not text.strip():
        raise InputError(f"--data {path}: the file is empty")
    return text


def split_ids(ids: list[int], held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous split into train and held-out token streams (the held-out part is the tail).

    Args:
        ids: the corpus as one token stream.
        held_out: the fraction kept for evaluation.

    Returns:
        ``(train_ids, heldout_ids)``, 1-D ``long`` tensors.

    Raises:
        InputError: if the corpus has fewer than 100 tokens.
    """
    if len(ids) < 100:
        raise InputError(f"the corpus has {len(ids)} tokens: need at least 100")
    cut = int(len(ids) * (1 - held_out))
    return torch.tensor(ids[:cut], dtype=torch.long), torch.tensor(ids[cut:], dtype=torch.long)


def tokenizer_for(model_dir: str | Path):
    """The tokenizer saved in ``model_dir``, or a :class:`ByteTokenizer` if it holds none.

    Args:
        model_dir: a local Hugging Face model directory.

    Returns:
        An object with ``encode(text) -> list[int]``.
    """
    path = Path(model_dir)
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer  # optional dependency

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return ByteTokenizer()


def corpus_ids(model, model_dir: str | Path, data: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out token ids of ``data`` for ``model``, with the model's own tokenizer.

    Args:
        model: the causal LM (its input-embedding size bounds the token ids).
        model_dir: its directory (where the tokenizer is looked for, :func:`tokenizer_for`).
        data: a ``.txt`` or ``.jsonl`` corpus (:func:`load_text`); ``None`` is the offline
            ``"docstrings"`` domain.

    Returns:
        ``(train_ids, heldout_ids)`` as in :func:`split_ids`.

    Raises:
        InputError: if the corpus is unusable or its ids exceed the model's vocabulary.
    """
    tok = tokenizer_for(model_dir)
    text = offline_text("docstrings") if data is None else load_text(data)
    try:
        train_ids, val_ids = split_ids(tok.encode(text))
    except InputError as err:
        raise InputError(f"--data {data}: {err}" if data is not None else str(err)) from None
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(max(train_ids.max(), val_ids.max())) >= vocab:
        raise InputError(
            f"--data: token ids exceed the model's vocabulary ({vocab}); give the model a tokenizer"
        )
    return train_ids, val_ids


def sample_windows(ids: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``seq_len + 1`` consecutive tokens at random offsets of ``ids``.

    Args:
        ids: a 1-D token stream longer than ``seq_len + 1``.
        batch: number of windows.
        seq_len: tokens predicted per window (each window carries one more, its first input).
        gen: the generator that draws the offsets (the batch depends on it alone).

    Returns:
        ``[batch, seq_len + 1]`` token ids, ready for :func:`next_token_nll`.
    """
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])


#: Label of a position that is not scored (PEFT/transformers convention: prompts in SFT, padding).
IGNORE_INDEX = -100


def _scored(labels: torch.Tensor) -> torch.Tensor:
    return labels[..., 1:] != IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the scored positions: the loss of ``transformers``' causal LMs.

    Position ``t`` of ``logits`` predicts ``labels[:, t + 1]`` (the shift is done here, as
    ``model(labels=...)`` does); labels equal to :data:`IGNORE_INDEX` (``-100``) are not scored,
    so response-only SFT masks and right padding work. Unlike ``model(labels=...)``, which casts
    the logits to float32, the cross-entropy is taken in the logits' own dtype when it is float64
    (at least float32 otherwise): second derivatives of a float64 model stay float64.

    Its :func:`~signal_drift.lora.loss_weight` is the number of scored positions
    (``causal_lm_loss.weight(labels)``), so batches of any size and padding combine into the
    loss of all the data at once.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` token ids, ``-100`` where not scored.

    Returns:
        A scalar tensor (NaN if no position is scored).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise InputError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: expected [B, T, V] and [B, T]"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).to(dtype),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


causal_lm_loss.weight = lambda labels: int(_scored(labels).sum())  # type: ignore[attr-defined]


def next_token_nll(model, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood (nats) of windows ``x`` under a causal LM.

    The model reads ``x[:, :-1]`` and is scored on ``x[:, 1:]``; the cross-entropy is taken in
    at least float32 whatever the logits' dtype (bf16 autocast included).

    Args:
        model: a causal LM called as ``model(input_ids=...)`` with ``.logits`` in its output.
        x: ``[B, T + 1]`` token ids.

    Returns:
        A scalar tensor, differentiable in the model's parameters.
    """
    logits = model(input_ids=x[:, :-1]).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
        x[:, 1:].reshape(-1),
    )


def _causal_parts(model):
    """The decoder body and the output head of a causal LM (a PEFT model or a ``transformers`` one).

    Raises:
        InputError: if the logits are not the head of the body's last hidden states alone
            (no decoder, or a final logit soft-cap or scale such as Gemma 2's or Cohere's).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    special = [
        k for k in ("final_logit_softcapping", "logit_scale") if getattr(cfg, k, None) not in (None, 1.0)
    ]
    if body is None or head is None or special:
        what = f"its {special[0]}" if special else "no decoder body and output head"
        raise InputError(f"--loss-chunk: {type(base).__name__} has {what}; use the whole-batch loss")
    return body, head


def chunked_next_token_nll(model, x: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """:func:`next_token_nll` computed ``chunk_tokens`` positions at a time: never all the logits at once.

    The decoder body runs once; the output head and the float32 cross-entropy then run over
    slices of ``chunk_tokens`` positions, each under non-reentrant activation checkpointing, so
    that the backward pass keeps only the last hidden states and recomputes one slice's logits at a
    time. At ``B × T`` positions and vocabulary ``V`` the logits term of the peak memory drops
    from ``B·T·V`` values in three copies (the logits, their float32 copy, the saved
    log-softmax) to ``chunk_tokens·V``. The same loss and gradients as :func:`next_token_nll` up
    to round-off (the sum is split).

    Args:
        model: a PEFT model or a ``transformers`` causal LM whose logits are
            ``get_output_embeddings()`` of the decoder's last hidden states (Llama, Qwen2,
            Mistral, ...).
        x: ``[B, T + 1]`` token ids.
        chunk_tokens: positions per slice.

    Returns:
        A scalar tensor, differentiable in the model's parameters.

    Raises:
        InputError: for a model whose logits are not the head of the hidden states alone
            (a final logit soft-cap or scale).
    """
    from torch.utils.checkpoint import checkpoint

    check_positive_int("loss_chunk", chunk_tokens)
    body, head = _causal_parts(model)
    hidden = body(input_ids=x[:, :-1], use_cache=False).last_hidden_state
    hidden, target = hidden.reshape(-1, hidden.shape[-1]), x[:, 1:].reshape(-1)

    def nll_sum(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        return torch.nn.functional.cross_entropy(
            logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction="sum"
        )

    total = 0.0
    for i in range(0, len(target), chunk_tokens):
        h, y = hidden[i : i + chunk_tokens], target[i : i + chunk_tokens]
        total = total + (checkpoint(nll_sum, h, y, use_reentrant=False) if torch.is_grad_enabled()
                         else nll_sum(h, y))  # fmt: skip
    return total / len(target)


class NextTokenLoss(torch.nn.Module):
    """A causal LM with its next-token loss as its forward: ``NextTokenLoss(model, chunk)(x)``.

    What ``DistributedDataParallel`` wraps in training: DDP's gradient synchronisation hangs on
    its own forward, and the chunked loss (:func:`chunked_next_token_nll`) calls the decoder body
    and the head one by one, which a DDP-wrapped causal LM's forward cannot.

    Args:
        model: the causal LM (a PEFT model).
        chunk_tokens: positions per slice of :func:`chunked_next_token_nll`; ``None``: the whole
            batch at once (:func:`next_token_nll`).
    """

    def __init__(self, model: torch.nn.Module, chunk_tokens: int | None = None):
        super().__init__()
        self.model, self.chunk_tokens = model, chunk_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mean next-token NLL of windows ``x`` (``[B, T + 1]``)."""
        if self.chunk_tokens is None:
            return next_token_nll(self.model, x)
        return chunked_next_token_nll(self.model, x, self.chunk_tokens)


@torch.no_grad()
def heldout_nll(
    model, ids: torch.Tensor, seq_len: int, max_windows: int = 64, loss_chunk: int | None = None
) -> float:
    """Mean next-token NLL (nats) over contiguous held-out windows (deterministic; paper Eq. 1).

    Args:
        model: the causal LM; evaluated in eval mode and returned to train mode.
        ids: the held-out token stream.
        seq_len: tokens predicted per window.
        max_windows: at most this many windows from the start of ``ids``.
        loss_chunk: positions per slice of the logits (:func:`chunked_next_token_nll`); ``None``:
            16 windows' logits at once.

    Returns:
        The mean NLL per token.

    Raises:
        InputError: if ``ids`` holds fewer than ``seq_len + 1`` tokens.
    """
    n = min(max_windows, (len(ids) - 1) // seq_len)
    if n < 1:
        raise InputError(f"held-out split has {len(ids)} tokens: fewer than --seq-len + 1")
    x = torch.stack([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]).to(
        next(model.parameters()).device
    )
    loss = NextTokenLoss(model, loss_chunk)
    model.eval()
    out = float(sum(loss(x[i : i + 16]) * len(x[i : i + 16]) for i in range(0, n, 16)) / n)
    model.train()
    return out


def tiny_llama_config(seq_len: int = 128):
    """The offline model's ``LlamaConfig``: 2 layers, hidden 128, 4 heads, byte vocabulary.

    Args:
        seq_len: the longest window it will see (positions: at least 128).

    Returns:
        A ``transformers.LlamaConfig``.
    """
    from transformers import LlamaConfig  # optional dependency

    return LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(seq_len, 128),
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_id=ByteTokenizer.eos_token_id,
    )


def build_base_model(
    cache: Path,
    steps: int,
    seq_len: int = 128,
    seed: int = 0,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> Path:
    """Build a small Llama locally and pre-train it on the offline ``pydoc`` domain; cached.

    AdamW (lr 3e-3), batches of 16 windows; the directory is written atomically, and an
    existing one is returned as it is. The weights are initialised on the CPU (the same on any
    device), pre-trained on ``device`` and moved back to the CPU to be saved.

    Args:
        cache: the model directory to create (or reuse).
        steps: pre-training steps.
        seq_len: window length (:func:`tiny_llama_config`).
        seed: seed of the initial weights and of the batches.
        progress: show a tqdm bar.
        device: where to pre-train (default: the CPU); under ``torchrun``, the rank's GPU, so
            that the other ranks do not wait past NCCL's timeout.

    Returns:
        The local Hugging Face directory of the pre-trained model (``cache``).
    """
    from transformers import LlamaForCausalLM  # optional dependency

    if (cache / "config.json").is_file():
        return cache
    torch.manual_seed(seed)
    device = torch.device("cpu" if device is None else device)
    model = LlamaForCausalLM(tiny_llama_config(seq_len)).to(device)
    ids, _ = split_ids(ByteTokenizer().encode(offline_text("pydoc")))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="pre-train base model", disable=not progress):
        loss = next_token_nll(model, sample_windows(ids, 16, seq_len, gen).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    del opt
    model.to("cpu")
    tmp = cache.with_name(cache.name + ".tmp")
    model.save_pretrained(tmp)
    os.replace(tmp, cache)
    return cache


def check_model_dir(model: str | None, weights: bool = True) -> None:
    """Raise :class:`InputError` unless ``model`` is None or a local Hugging Face model directory.

    Args:
        model: the directory.
        weights: require weights next to ``config.json`` (``False``: the config alone will do,
            for what reads only the architecture, e.g. a memory estimate).

    Raises:
        InputError: naming ``--model`` if ``model/config.json`` does not exist, or the weights.
    """
    if model is not None and not (Path(model) / "config.json").is_file():
        raise InputError(f"--model {model}: not a local Hugging Face model directory (no config.json)")
    if (
        model is not None
        and weights
        and not any(next(Path(model).glob(p), None) for p in ("*.safetensors", "*.bin", "*.index.json"))
    ):
        raise InputError(f"--model {model}: no weights (*.safetensors or *.bin) next to config.json")


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
):
    """Load a local Hugging Face causal LM (no network) and check its weights are finite.

    Args:
        path: a local directory in Hugging Face format (``config.json`` + weights).
        dtype: parameter dtype.
        attn_implementation: e.g. ``"eager"`` where second derivatives are needed (HVPs).
        device: a GPU to load the weights straight onto (``device_map``), without a full copy in
            host memory first; ``None`` or a CPU device loads on the CPU.

    Returns:
        The ``transformers`` causal LM.

    Raises:
        InputError: if a weight holds NaN or Inf.
    """
    from transformers import AutoModelForCausalLM  # optional dependency
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per sweep cell is noise
    try:
        kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        if device is not None and torch.device(device).type != "cpu":
            dev = torch.device(device)
            if dev.type == "cuda":  # a GPU index, the form every transformers version takes
                dev = torch.cuda.current_device() if dev.index is None else dev.index
            kw["device_map"] = {"": dev if isinstance(dev, int) else str(dev)}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype, **kw)
        except (OSError, ValueError, KeyError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise InputError(f"--model {path}: cannot be loaded as a causal LM ({first})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    for name, p in model.named_parameters():
        check_finite(f"model weight {name!r}", p.detach())
    return model
