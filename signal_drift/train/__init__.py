"""LoRA-α fine-tuning of causal LMs with transformers + PEFT (offline by default).

With no ``--model``, a small Llama-architecture causal LM is built locally and pre-trained on
offline text (the ``pydoc`` domain), then LoRA-fine-tuned on a held-out domain (standard-library
docstrings), so the α-vs-η comparison runs on a real, if small, model with no network.
``--model PATH`` loads a local Hugging Face checkpoint (``local_files_only``); ``--data PATH``
takes a ``.txt`` or ``.jsonl`` corpus. Held-out NLL (paper Eq. 1) on the corpus tail. Models,
tokenizers, corpora, token windows and the loss come from :mod:`signal_drift.lm`; this package
holds the training itself.

Checkpoints (adapter + optimizer + step + metrics) are written atomically every
``checkpoint_every`` steps; rerunning the same command resumes from the last one. Divergence
(NaN/Inf or loss > ``blowup ×`` its first value) stops training, names the step and keeps
everything written so far. Every optimizer step is split into per-layer signal and drift
(:mod:`.monitor`). On a GPU with native bf16 the forward runs in bf16 autocast over a bf16 frozen
base (``precision="auto"``), and ``torchrun --nproc_per_node K -m signal_drift.train ...`` trains
data-parallel, one process per GPU (:mod:`._dist`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .._errors import DivergenceError, InputError, check_positive_float, check_positive_int
from ..edge import peft_sharpness
from ..io import atomic_write_text
from ..lm import (
    NextTokenLoss,
    build_base_model,
    check_model_dir,
    corpus_ids,
    heldout_nll,
    load_model,
    sample_windows,
)
from ..scaling import Rule
from ..scaling.peft import (
    LLAMA_TARGETS,
    describe,
    effective_scales,
    lora_alpha_config,
    present_targets,
    target_linears,
)
from ._dist import setup
from .monitor import SignalDriftMonitor

__all__ = [
    "TrainConfig",
    "train",
    "calibrated_pattern",
    "resolve_precision",
    "native_bf16",
    "base_dtype",
    "PRECISIONS",
]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train` (the flags of ``python -m signal_drift.train``).

    The settings ``model``, ``data``, ``rank``, ``gamma``, ``seq_len``, ``pretrain_steps``, ``seed``,
    ``out`` mean the same in every config (:data:`signal_drift.settings.COMMON_HELP`).

    Attributes:
        scaling: variant1, variant2, rank, double_rank, rslora, fixed, or calibrated (with
            ``calibration``).
        lr: AdamW learning rate η.
        alpha: α of 'fixed' and 'rslora'.
        steps: optimizer steps.
        batch_size: sequences per step (a multiple of the torchrun processes).
        micro_batch: sequences per forward/backward on each process, the gradients accumulated
            over the process's share of the batch (default: all of it at once); the step is the
            same up to round-off, the activation memory that of ``micro_batch`` sequences.
        grad_checkpointing: recompute each decoder layer's activations in the backward pass
            (less activation memory for about one more forward per step).
        loss_chunk: take the output head and the cross-entropy over slices of this many tokens,
            each recomputed in the backward pass, instead of the logits of the whole micro-batch at
            once (:func:`signal_drift.lm.chunked_next_token_nll`; default: at once); the same
            loss up to round-off, the logits memory that of ``loss_chunk`` tokens.
        eval_every: held-out NLL every N steps.
        checkpoint_every: checkpoint every N steps.
        blowup: divergence: a loss above blowup × its first value (or NaN/Inf) stops training.
        precision: auto (bf16 on a CUDA GPU with native bf16, compute capability 8.0+, else fp32),
            fp32 or bf16.
        monitor_every: log per-layer signal/drift every N steps (0: off).
        sharpness_every: before every N-th update (steps 0, N, 2N, ...), λ_max(H_θ), Adam's
            preconditioned sharpness with the P and η of that update (AdamW's state with the step's
            gradient folded in), the edge ratios and the drift share
            (:func:`signal_drift.edge.peft_sharpness`, in float64 on ``sharpness_batch`` fixed
            training windows, split over the torchrun processes; 0: off).
        sharpness_early: the same before each of the first N updates too.
        sharpness_batch: windows the sharpness is measured on (the cost of each product).
        sharpness_lanczos: cap on Lanczos steps per eigenvalue (the cost of each record).
        calibration: calibration.json of ``python -m signal_drift.calibrate``, PATH[:lambda|:trace].
    """

    model: str | None = None
    data: str | None = None
    scaling: str = "variant1"
    rank: int = 8
    lr: float = 1e-3
    gamma: float = 1.0
    alpha: float = 16.0
    steps: int = 200
    batch_size: int = 16
    micro_batch: int | None = None
    grad_checkpointing: bool = False
    loss_chunk: int | None = None
    seq_len: int = 128
    eval_every: int = 25
    checkpoint_every: int = 50
    pretrain_steps: int = 300
    blowup: float = 10.0
    precision: str = "auto"
    monitor_every: int = 1
    sharpness_every: int = 0
    sharpness_early: int = 0
    sharpness_batch: int = 4
    sharpness_lanczos: int = 40
    calibration: str | None = None
    seed: int = 0
    out: str = "out/train"

    def validate(self, weights: bool = True) -> None:
        """Raise :class:`InputError` naming the first invalid field.

        Args:
            weights: ``model`` must hold weights (``False``: its ``config.json`` will do).
        """
        valid = [r.value for r in Rule] + ["calibrated"]
        if self.scaling not in valid:
            raise InputError(f"scaling={self.scaling!r} is invalid: use one of {valid}", fields=["scaling"])
        if (self.scaling == "calibrated") != (self.calibration is not None):
            raise InputError("scaling calibrated and calibration PATH[:lambda|:trace] go together",
                             fields=["scaling", "calibration"])  # fmt: skip
        if self.calibration is not None:
            path, _, crit = self.calibration.partition(":")
            if not Path(path).is_file() or crit not in ("", "lambda", "trace"):
                raise InputError(f"calibration {self.calibration}: need an existing calibration.json, "
                                 "optionally with :lambda (default) or :trace",
                                 fields=["calibration"])  # fmt: skip
        for name in ("rank", "steps", "batch_size", "seq_len", "eval_every", "checkpoint_every"):
            check_positive_int(name, getattr(self, name))
        for name in ("lr", "gamma", "alpha", "blowup"):
            check_positive_float(name, getattr(self, name))
        for name in ("micro_batch", "loss_chunk"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.pretrain_steps < 0:
            raise InputError("pretrain_steps must be >= 0", fields=["pretrain_steps"])
        if self.monitor_every < 0:
            raise InputError("monitor_every must be >= 0 (0 turns the signal/drift monitor off)",
                             fields=["monitor_every"])  # fmt: skip
        for name in ("sharpness_every", "sharpness_early"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0 (0 turns it off)", fields=[name])
        check_positive_int("sharpness_batch", self.sharpness_batch)
        check_positive_int("sharpness_lanczos", self.sharpness_lanczos)
        if self.precision not in PRECISIONS:
            raise InputError(f"precision={self.precision!r} is invalid: use one of {list(PRECISIONS)}",
                             fields=["precision"])  # fmt: skip
        check_model_dir(self.model, weights=weights)


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` is bf16 on a CUDA device with native bf16 (:func:`native_bf16`), fp32 otherwise."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """True on a GPU with bf16 in hardware (compute capability 8.0+: Ampere and later).

    Pre-Ampere GPUs (V100, T4) only emulate bf16, slower than fp32, so ``"auto"`` keeps fp32 there.
    """
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8 and torch.cuda.is_bf16_supported(including_emulation=False)


def base_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The frozen base model's dtype: bf16 when training in bf16 on CUDA, fp32 otherwise.

    A bf16 base is not re-cast by autocast on every forward (2 bytes per frozen parameter instead
    of 4 plus a bf16 copy); the LoRA adapters and their AdamW state stay fp32.
    """
    return torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32


def _resume_key(config: dict) -> dict:
    """The settings a checkpoint must share with the run resuming it (precision: compared resolved).

    Memory settings (micro-batches, checkpointing, loss slices) and measurements may change.
    """
    free = (
        "steps",
        "precision",
        "micro_batch",
        "grad_checkpointing",
        "loss_chunk",
        "sharpness_every",
        "sharpness_early",
        "sharpness_batch",
        "sharpness_lanczos",
    )
    return {k: v for k, v in config.items() if k not in free}


def _accumulate(ddp, batch: torch.Tensor, micro: int | None, precision: str, device) -> torch.Tensor:
    """The process's mean loss over ``batch``, its gradient accumulated over ``micro``-window slices.

    ``ddp`` is a :class:`~signal_drift.lm.NextTokenLoss` (DDP-wrapped under ``torchrun``): its
    forward is the loss. Under DDP the gradients are averaged over the processes once, in the
    last slice's backward (``no_sync`` before it). Returns the loss, detached.
    """
    chunks = batch.split(micro or len(batch))
    total = None
    for i, chunk in enumerate(chunks):
        defer = i < len(chunks) - 1 and isinstance(ddp, DistributedDataParallel)
        with ddp.no_sync() if defer else contextlib.nullcontext():
            with _autocast(precision, device):
                loss = ddp(chunk)
            if len(chunks) > 1:
                loss = loss * (len(chunk) / len(batch))
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: TrainConfig, progress: bool = False, log=print) -> dict:
    """Fine-tune with LoRA under ``cfg.scaling``; returns the metrics (also in ``out/metrics.json``).

    Under ``torchrun`` every rank runs this; rank 0 writes the files and returns the full metrics.

    Raises:
        DivergenceError: after writing metrics up to the diverged step.
        InputError: bad settings, data, or a model without Llama-style ``nn.Linear``
            projections (e.g. GPT-2, whose ``Conv1D`` layers are not supported), before
            anything is written under ``out``.
    """
    from peft import get_peft_model  # optional dependency

    cfg.validate()
    dist = setup()
    if (cfg.sharpness_every or cfg.sharpness_early) and cfg.sharpness_batch % dist.world:
        raise InputError(
            f"--sharpness-batch={cfg.sharpness_batch} must be a multiple of the {dist.world} processes"
        )
    if cfg.batch_size % dist.world:
        raise InputError(f"--batch-size={cfg.batch_size} must be a multiple of the {dist.world} processes")
    out = Path(cfg.out)
    precision = resolve_precision(cfg.precision, dist.device)
    if cfg.model is None:
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
            build_base_model(out / "base_model", cfg.pretrain_steps, cfg.seq_len, cfg.seed, progress,
                             device=dist.device)  # fmt: skip
        dist.barrier()
        model_dir = out / "base_model"
    else:
        model_dir = Path(cfg.model)
    model = load_model(model_dir, dtype=base_dtype(precision, dist.device), device=dist.device)
    train_ids, val_ids = dist.from_main(lambda: corpus_ids(model, model_dir, cfg.data))
    targets = present_targets(model, LLAMA_TARGETS)
    if not targets:
        raise InputError(
            f"--model {model_dir}: has none of the Llama projections {list(LLAMA_TARGETS)}; the trainer "
            "adapts Llama-style nn.Linear projections (GPT-2's Conv1D layers are not supported)"
        )
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rule = "rank" if cfg.scaling == "calibrated" else cfg.scaling
    lcfg = lora_alpha_config(model, rule, cfg.rank, target_modules=targets, gamma=cfg.gamma, alpha=cfg.alpha)
    if cfg.scaling == "calibrated":
        wrapped = list(target_linears(model, targets))
        lcfg.alpha_pattern = {
            n: cfg.gamma * a for n, a in calibrated_pattern(cfg.calibration, cfg.rank, wrapped).items()
        }
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lcfg)
    model.to(dist.device)
    model.train()  # on every rank (from_pretrained gives eval mode; checkpointing needs train mode)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # the adapters and their AdamW state stay fp32 whatever the base's dtype
        p.data = p.data.float()
    scales = effective_scales(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    # this run's device, processes and precision, never a checkpoint's
    run = {"device": str(dist.device), "processes": dist.world, "precision": precision}
    metrics = {"config": asdict(cfg) | {"model_dir": str(model_dir)}, "scales": scales, "train_loss": [],
               "heldout_nll": [], "diverged_step": None, **run, "update_norms": {},
               "sharpness": []}  # fmt: skip
    ckpt = out / "checkpoint.pt"
    start = 0
    if ckpt.is_file():
        # to the CPU: load_state_dict moves AdamW's moments to the parameters, each `step` stays a CPU scalar
        state = torch.load(ckpt, weights_only=False, map_location="cpu")
        if _resume_key(state["config"]) != _resume_key(metrics["config"]):
            raise InputError(f"{ckpt} was written with other settings; use another --out or delete it")
        was = state["metrics"].get("precision", precision)
        if was != precision:
            raise InputError(
                f"{ckpt} was trained in {was} but --precision {cfg.precision} is {precision} on "
                f"{dist.device.type}: pass --precision {was} to resume it, or use another --out"
            )
        for p, saved in zip(params, state["params"], strict=True):
            p.data.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        metrics, start = metrics | state["metrics"] | {"config": metrics["config"], **run}, state["step"]
        del state
        if dist.main:
            log(f"resuming from step {start} ({ckpt})")
    monitor = None
    if cfg.monitor_every and dist.main:
        monitor = SignalDriftMonitor(model, history=metrics["update_norms"])
    if dist.main:
        where = f"{precision}, {dist.world} process(es) on {dist.device.type}"
        log(f"LoRA-{cfg.scaling}, r={cfg.rank}, η={cfg.lr:g}: {describe(scales, cfg.rank)}, "
            f"{len(scales)} modules, {where}")  # fmt: skip
    ddp = dist.wrap(NextTokenLoss(model, cfg.loss_chunk))  # DDP's forward is the loss
    val_ids = val_ids.to(dist.device)
    sharp_ids = None
    if cfg.sharpness_every or cfg.sharpness_early:  # every rank measures on its share (products all-reduced)
        windows = sample_windows(
            train_ids, cfg.sharpness_batch, cfg.seq_len, torch.Generator().manual_seed(cfg.seed + 17)
        )
        sharp_ids = dist.shard(windows).to(dist.device)

    def evaluate() -> float:
        with _autocast(precision, dist.device):
            return heldout_nll(model, val_ids, cfg.seq_len, loss_chunk=cfg.loss_chunk)

    if not metrics["heldout_nll"] and dist.main:
        metrics["heldout_nll"].append((0, evaluate()))
    first = metrics["train_loss"][0][1] if metrics["train_loss"] else None

    def write_metrics() -> None:
        if dist.main:
            atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")

    def save(step: int) -> None:
        if dist.main:
            tmp = ckpt.with_name(".checkpoint.tmp")
            torch.save({"config": metrics["config"], "params": [p.detach().cpu() for p in params],
                        "optimizer": opt.state_dict(), "metrics": metrics, "step": step}, tmp)  # fmt: skip
            os.replace(tmp, ckpt)
        write_metrics()

    for step in tqdm(range(start, cfg.steps), desc="LoRA fine-tune", disable=not (progress and dist.main),
                     initial=start, total=cfg.steps):  # fmt: skip
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # batch depends only on the step
        batch = dist.shard(sample_windows(train_ids, cfg.batch_size, cfg.seq_len, gen)).to(dist.device)
        opt.zero_grad()
        value = dist.mean(_accumulate(ddp, batch, cfg.micro_batch, precision, dist.device))
        first = value if first is None else first
        if not math.isfinite(value) or value > cfg.blowup * first:
            metrics["diverged_step"] = step + 1
            write_metrics()
            raise DivergenceError(
                f"training diverged at step {step + 1} (loss {value:.4g}); metrics kept in {out}", step + 1
            )
        watch = monitor is not None and (step == 0 or (step + 1) % cfg.monitor_every == 0)
        due = (cfg.sharpness_every and step % cfg.sharpness_every == 0) or step < cfg.sharpness_early
        if sharp_ids is not None and due:
            # at θ before this update, with the P and η of this update (its gradient folded into v)
            try:
                rec = peft_sharpness(model, opt, sharp_ids, step=step, lanczos_steps=cfg.sharpness_lanczos,
                                     pending=True, distributed=dist.world > 1)  # fmt: skip
            except InputError as err:  # a measurement that cannot be made must not stop training
                metrics.setdefault("sharpness_skipped", []).append([step, str(err)])
                if dist.main:
                    log(f"warning: sharpness at step {step} not measured: {err}")
            else:
                metrics["sharpness"].append(rec.to_json())
                for w in rec.warnings if dist.main else ():
                    log(f"warning: {w}")
        if watch:
            monitor.before_step()
        opt.step()
        if watch:
            monitor.after_step(step + 1)
        metrics["train_loss"].append((step + 1, value))
        if dist.main and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            metrics["heldout_nll"].append((step + 1, evaluate()))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save(step + 1)
    dist.barrier()
    if dist.main:
        model.save_pretrained(out / "adapter")
        metrics["final_heldout_nll"] = metrics["heldout_nll"][-1][1]
        write_metrics()
        from .figure import plot_train_loss, plot_update_norms  # here: importing it selects Agg

        plot_train_loss(metrics, out / "loss.png", title=_title(cfg))
        if metrics["update_norms"]:
            plot_update_norms(metrics["update_norms"], out / "signal_drift.png", title=_title(cfg))
    return metrics


def calibrated_pattern(spec: str, rank: int, modules: list[str]) -> dict[str, float]:
    """The measured ``alpha_pattern`` of a ``calibrate`` run (``PATH[:lambda|:trace]``) for ``modules``.

    Raises:
        InputError: if the calibration was run at another rank or with another A init than
            training uses (PEFT's Kaiming-uniform), or leaves a module without a finite α.
    """
    path, _, crit = spec.partition(":")
    crit = crit or "lambda"
    res = json.loads(Path(path).read_text())
    if not res.get("complete"):
        raise InputError(f"--calibration {path}: the calibration run did not finish; run it again")
    if res["config"]["rank"] != rank or res["config"]["init"] != "kaiming_uniform":
        got = f"r={res['config']['rank']} with {res['config']['init']} A"
        raise InputError(
            f"--calibration {path} was measured at {got}; training uses r={rank}, kaiming_uniform A"
        )
    pattern = res["alpha_pattern"][crit]
    missing = [m for m in modules if m not in pattern]
    if missing:
        raise InputError(f"--calibration {spec}: no finite α_{crit} for {len(missing)} module(s), e.g. "
                         f"{missing[0]!r}" + (" (try :lambda)" if crit == "trace" else ""))  # fmt: skip
    return {m: float(pattern[m]) for m in modules}


def _title(cfg: TrainConfig) -> str:
    return f"LoRA-{cfg.scaling}, r={cfg.rank}, η={cfg.lr:g}, γ={cfg.gamma:g}"
