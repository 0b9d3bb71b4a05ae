"""``--estimate-memory``: the parameter terms exact, the activations near what the forward saves."""

import json

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from signal_drift import InputError  # noqa: E402
from signal_drift.lm import NextTokenLoss, tiny_llama_config  # noqa: E402
from signal_drift.scaling.peft import LLAMA_TARGETS, lora_alpha_config, present_targets  # noqa: E402
from signal_drift.train.__main__ import main  # noqa: E402
from signal_drift.train.memory import estimate_memory  # noqa: E402


def _peft_model(config, rank: int, bf16_base: bool = False, grad_checkpointing: bool = False):
    """The model ``train`` builds: the base (bf16 or fp32), LoRA on the Llama projections, fp32 adapters."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16 if bf16_base else torch.float32)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = present_targets(model, LLAMA_TARGETS)
    model = get_peft_model(model, lora_alpha_config(model, "variant1", rank, target_modules=targets))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model.train()


def test_the_parameter_terms_are_exact():
    config = tiny_llama_config(32)
    model = _peft_model(config, rank=4)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    for precision, width in (("fp32", 4), ("bf16", 2)):
        est = estimate_memory(config, batch=2, seq_len=32, precision=precision, lora_rank=4)
        assert (est.base_params, est.lora_params) == (base, lora)
        assert (
            est.base_weights == width * base and est.lora_state == 4 * 4 * lora
        )  # weights, grads, 2 moments
    with pytest.raises(InputError, match="precision"):
        estimate_memory(config, batch=2, seq_len=32, precision="auto", lora_rank=4)


def _saved_bytes(model, x, bf16: bool) -> int:
    """Bytes the forward saves for backward (each storage once, the parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            NextTokenLoss(model, 16)(x)  # sliced logits: nothing vocabulary-wide is saved
    return sum(b for ptr, b in seen.items() if ptr not in params)


@pytest.mark.parametrize("precision,checkpointing,attention",
                         [("fp32", False, "sdpa"), ("bf16", False, "sdpa"), ("bf16", False, "eager"),
                          ("fp32", True, "sdpa"), ("bf16", True, "sdpa")])  # fmt: skip
def test_the_activation_term_is_within_a_factor_2_of_what_the_forward_saves(
    precision, checkpointing, attention
):
    config = tiny_llama_config(32)
    config._attn_implementation = attention
    model = _peft_model(config, rank=4, bf16_base=precision == "bf16", grad_checkpointing=checkpointing)
    x = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    measured = _saved_bytes(model, x, bf16=precision == "bf16")
    est = estimate_memory(config, batch=2, seq_len=32, precision=precision, lora_rank=4,
                          grad_checkpointing=checkpointing, attention=attention)  # fmt: skip
    assert 0.5 < est.activations / measured < 2.0


def test_the_logits_term_and_its_slices():
    config = tiny_llama_config(32)
    whole = estimate_memory(config, batch=2, seq_len=32, precision="bf16", lora_rank=4)
    sliced = estimate_memory(config, batch=2, seq_len=32, precision="bf16", lora_rank=4, loss_chunk=16)
    assert whole.logits == 64 * config.vocab_size * (2 + 4 + 4)  # bf16 logits, fp32 copy, log-softmax
    assert sliced.logits == 16 * config.vocab_size * (2 + 4 + 4 + 4) and sliced.total < whole.total
    assert "total" in whole.table().splitlines()[-1]


def test_the_cli_estimates_from_a_config_alone_and_writes_nothing(tmp_path, capsys):
    model_dir = tmp_path / "config_only"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(tiny_llama_config(32).to_dict()))
    out = tmp_path / "out"
    flags = [
        "--model",
        str(model_dir),
        "--batch-size",
        "8",
        "--seq-len",
        "32",
        "--rank",
        "4",
        "--out",
        str(out),
    ]
    assert main(["--estimate-memory", "--processes", "2", "--micro-batch", "2", "--grad-checkpointing",
                 "--loss-chunk", "16", "--precision", "fp32", *flags]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "2 process(es), 2 sequence(s) of 32 tokens" in text and "grad checkpointing on" in text
    assert text.splitlines()[-2].startswith("total") and not out.exists()
    with pytest.raises(InputError, match="no weights"):
        main(flags)


def test_the_readme_memory_table_is_what_the_estimator_prints(tmp_path):
    """The README's 8B rows come from the command it shows (the 8B model on the meta device: no memory)."""
    import re
    from pathlib import Path

    from signal_drift.train import TrainConfig
    from signal_drift.train.memory import describe_run

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    shape = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(shape))
    rows = re.findall(r"^\| `(--micro-batch [^`]+)` \|.* \| ([\d.]+) GiB \|$", readme, flags=re.M)
    assert len(rows) == 4
    for flags, total in rows:
        kw = dict(re.findall(r"--([\w-]+) (\d+)", flags))
        cfg = TrainConfig(model=str(tmp_path), rank=16, batch_size=128, seq_len=2048, precision="bf16",
                          micro_batch=int(kw["micro-batch"]), loss_chunk=int(kw["loss-chunk"]),
                          grad_checkpointing="--grad-checkpointing" in flags)  # fmt: skip
        assert re.search(rf"^total +{re.escape(total)} GiB$", describe_run(cfg, processes=8), flags=re.M)
