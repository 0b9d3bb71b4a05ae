"""The training path on a tiny Llama built locally (CPU, offline)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from cases import assert_cli_refuses, free_port  # noqa: E402

from signal_drift import DivergenceError, InputError  # noqa: E402
from signal_drift.lm import build_base_model  # noqa: E402
from signal_drift.train import TrainConfig, resolve_precision, train  # noqa: E402
from signal_drift.train._dist import Dist  # noqa: E402

SMALL = dict(batch_size=8, seq_len=32, eval_every=5, checkpoint_every=3, pretrain_steps=30, rank=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base_model(tmp_path_factory.mktemp("base") / "model", steps=30, seq_len=32)


def quiet(*_):
    pass


def test_a_few_steps_lower_the_heldout_nll(tmp_path, base):
    m = train(TrainConfig(model=str(base), steps=15, lr=3e-4, out=str(tmp_path), **SMALL), log=quiet)
    assert m["final_heldout_nll"] < m["heldout_nll"][0][1]
    assert len(m["scales"]) == 14 and len(set(m["scales"].values())) == 1  # Variant I: one scale, 256/√r
    assert abs(next(iter(m["scales"].values())) - 128.0) < 1e-9
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "adapter").is_dir()
    assert m["processes"] == 1 and m["precision"] == resolve_precision("auto", torch.device(m["device"]))
    assert m["device"] != "cpu" or m["precision"] == "fp32"  # "auto" on a CPU


def test_every_step_is_split_into_signal_and_drift_per_layer(tmp_path, base):
    m = train(TrainConfig(model=str(base), steps=4, lr=1e-3, out=str(tmp_path), **SMALL), log=quiet)
    norms = m["update_norms"]
    assert len(norms) == 14 and all([r[0] for r in rows] == [1, 2, 3, 4] for rows in norms.values())
    assert all(s > 0 for rows in norms.values() for _, s, _ in rows)
    assert all(rows[1][2] > 0 for rows in norms.values())  # drift appears once B != 0
    assert (tmp_path / "signal_drift.png").stat().st_size > 0


def test_adam_sharpness_is_recorded_along_training(tmp_path, base):
    """Records before updates 0, 1 (early) and 4 (every 4), with AdamW's own η and β₁.

    That the pending P equals the one AdamW then applies, and its mapping onto θ, are checked in
    tests/test_edge.py.
    """
    cfg = dict(model=str(base), steps=4, lr=1e-3, out=str(tmp_path), sharpness_every=4, sharpness_early=2,
               sharpness_lanczos=80, **SMALL)  # fmt: skip
    m = train(TrainConfig(**cfg), log=quiet)
    recs = m["sharpness"]
    assert [r["step"] for r in recs] == [0, 1]
    for r in recs:
        assert r["lr"] == 1e-3 and r["beta1"] == 0.9
        assert math.isfinite(r["preconditioned"]) and r["preconditioned"] > 0
        assert r["edge_ratio"] == pytest.approx(1e-3 * r["preconditioned"] / 38.0)
        assert r["signal_share"] + r["drift_share"] == pytest.approx(r["preconditioned"], rel=1e-5)
    m2 = train(
        TrainConfig(**(cfg | {"steps": 5})), log=quiet
    )  # resumes at step 4: the record before update 4
    assert [r["step"] for r in m2["sharpness"]] == [0, 1, 4]
    with pytest.raises(InputError, match="sharpness_batch|sharpness-batch"):
        TrainConfig(sharpness_batch=0).validate()


def test_bf16_autocast_trains(tmp_path, base):
    m = train(TrainConfig(model=str(base), steps=10, lr=3e-4, precision="bf16", out=str(tmp_path), **SMALL),
              log=quiet)  # fmt: skip
    assert m["precision"] == "bf16" and m["final_heldout_nll"] < m["heldout_nll"][0][1]


def test_torchrun_two_processes_equal_one(tmp_path, base):
    """Data-parallel over 2 gloo ranks = the single-process run with the same global batch.

    The 2-process run also accumulates each rank's 4 windows over 2 micro-batches (DDP ``no_sync``)
    and takes the loss over slices of 24 tokens (``--loss-chunk``: DDP wraps the loss).
    """
    flags = ["--model", str(base), "--steps", "4", "--lr", "1e-3", "--batch-size", "8", "--seq-len", "32",
             "--eval-every", "2", "--checkpoint-every", "2", "--rank", "4", "--monitor-every", "0",
             "--sharpness-early", "2", "--sharpness-batch", "4", "--sharpness-lanczos", "80"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # the CPU (gloo, fp32) twin
    r = subprocess.run([sys.executable, "-m", "signal_drift.train", *flags, "--out", str(tmp_path / "one")],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "signal_drift.train", *flags, "--micro-batch", "2", "--loss-chunk", "24",
                        "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert one["processes"] == 1 and two["processes"] == 2
    torch.testing.assert_close(
        torch.tensor(two["train_loss"]), torch.tensor(one["train_loss"]), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        torch.tensor(two["heldout_nll"]), torch.tensor(one["heldout_nll"]), rtol=1e-5, atol=1e-6
    )
    # Adam's sharpness measured by both processes on their halves of the windows, products all-reduced
    for key in ("preconditioned", "lambda_max", "drift_share", "edge_ratio"):
        got = torch.tensor([r[key] for r in two["sharpness"]], dtype=torch.float64)
        want = torch.tensor([r[key] for r in one["sharpness"]], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0.0, equal_nan=True)
        assert torch.isfinite(want).any()
    assert [r["step"] for r in two["sharpness"]] == [0, 1]


def test_resume_continues_exactly_where_it_stopped(tmp_path, base):
    cfg = dict(model=str(base), lr=1e-3, **SMALL)
    full = train(TrainConfig(steps=9, out=str(tmp_path / "full"), **cfg), log=quiet)
    train(
        TrainConfig(steps=6, out=str(tmp_path / "cut"), **cfg), log=quiet
    )  # "interrupted" after a checkpoint
    notes = []
    resumed = train(TrainConfig(steps=9, out=str(tmp_path / "cut"), **cfg), log=notes.append)
    assert any("resuming from step 6" in n for n in notes)
    assert [s for s, _ in resumed["train_loss"]] == list(range(1, 10))
    torch.testing.assert_close(
        torch.tensor(resumed["train_loss"]), torch.tensor(full["train_loss"]), rtol=1e-5, atol=1e-6
    )
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(torch.tensor(resumed["update_norms"][name]), torch.tensor(full["update_norms"][name]),
                               rtol=1e-4, atol=1e-9)  # fmt: skip


@pytest.fixture
def on_cpu(monkeypatch):
    """Train on the CPU even where a GPU is visible (these tests check CPU logic)."""
    monkeypatch.setattr("signal_drift.train.setup", lambda: Dist())


def _capture_peft_model(monkeypatch) -> list:
    """The PEFT models ``train`` builds, appended to the returned list."""
    import peft

    made, real = [], peft.get_peft_model
    monkeypatch.setattr(peft, "get_peft_model", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    return made


def test_a_resumed_run_reports_itself_not_the_checkpoint(tmp_path, base, monkeypatch, on_cpu):
    cfg = dict(model=str(base), lr=1e-3, out=str(tmp_path), **SMALL)
    train(TrainConfig(steps=3, **cfg), log=quiet)
    ckpt = tmp_path / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    state["metrics"] |= {"device": "cuda:3", "processes": 8}  # as if written under torchrun on GPUs
    torch.save(state, ckpt)
    notes = []
    monkeypatch.setattr("signal_drift.train.setup", lambda: Dist(rank=1))  # a non-zero rank: silent
    train(TrainConfig(steps=4, **cfg), log=notes.append)
    assert not any("resuming" in n for n in notes)
    monkeypatch.setattr("signal_drift.train.setup", lambda: Dist())
    m = train(TrainConfig(steps=4, **cfg), log=notes.append)
    assert f"resuming from step 3 ({ckpt})" in notes
    assert (m["device"], m["processes"], m["precision"]) == ("cpu", 1, "fp32")
    assert json.loads((tmp_path / "metrics.json").read_text())["processes"] == 1


def test_a_resume_in_another_resolved_precision_is_refused(tmp_path, base, monkeypatch, on_cpu):
    """A CPU fp32 run resumed where "auto" means bf16 (a GPU) stops; --precision fp32 resumes it."""
    cfg = dict(model=str(base), lr=1e-3, out=str(tmp_path), **SMALL)
    train(TrainConfig(steps=3, **cfg), log=quiet)  # auto: fp32 on the CPU
    monkeypatch.setattr("signal_drift.train.resolve_precision", lambda p, d: "bf16" if p == "auto" else p)
    with pytest.raises(InputError, match="trained in fp32 but --precision auto is bf16.*--precision fp32"):
        train(TrainConfig(steps=6, **cfg), log=quiet)
    notes = []
    m = train(TrainConfig(steps=6, **(cfg | {"precision": "fp32"})), log=notes.append)
    assert any("resuming from step 3" in n for n in notes) and m["precision"] == "fp32"
    assert [s for s, _ in m["train_loss"]] == list(range(1, 7))


def test_a_bf16_base_trains_fp32_adapters(tmp_path, base, monkeypatch, on_cpu):
    """The frozen base in bf16 (as on a bf16 GPU), the adapters and their AdamW state in fp32."""
    monkeypatch.setattr(
        "signal_drift.train.base_dtype", lambda p, d: torch.bfloat16 if p == "bf16" else torch.float32
    )
    made = _capture_peft_model(monkeypatch)
    m = train(
        TrainConfig(model=str(base), steps=3, lr=1e-3, precision="bf16", out=str(tmp_path), **SMALL),
        log=quiet,
    )
    frozen = {p.dtype for p in made[0].parameters() if not p.requires_grad}
    trained = {p.dtype for p in made[0].parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert all(
        p.dtype == torch.float32 for p in torch.load(tmp_path / "checkpoint.pt", weights_only=False)["params"]
    )
    assert m["precision"] == "bf16" and all(math.isfinite(v) for _, v in m["train_loss"])


def test_divergence_stops_names_the_step_and_keeps_metrics(tmp_path, base):
    with pytest.raises(DivergenceError) as err:
        train(TrainConfig(model=str(base), steps=30, lr=5.0, out=str(tmp_path), **SMALL), log=quiet)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["diverged_step"] == err.value.step and 1 < err.value.step <= 30


def test_variant2_uses_per_module_fan_in(tmp_path, base):
    m = train(
        TrainConfig(model=str(base), steps=1, scaling="variant2", out=str(tmp_path), **SMALL), log=quiet
    )
    s = m["scales"]
    # √(3 n r)/r: fan-in 128 for attention and gate/up, 256 for down_proj
    assert abs(s["model.layers.0.self_attn.q_proj"] - (3 * 128 * 4) ** 0.5 / 4) < 1e-9
    assert abs(s["model.layers.0.mlp.down_proj"] - (3 * 256 * 4) ** 0.5 / 4) < 1e-9


def test_user_corpus_and_bad_inputs(tmp_path, base):
    empty = tmp_path / "empty.txt"
    empty.write_text("  ")
    with pytest.raises(InputError, match="empty"):
        train(
            TrainConfig(model=str(base), data=str(empty), steps=1, out=str(tmp_path / "o"), **SMALL),
            log=quiet,
        )
    with pytest.raises(InputError, match="config.json"):
        TrainConfig(model=str(tmp_path)).validate()


@pytest.mark.parametrize("args,needle", [(["--rank", "0"], "--rank=0"), (["--scaling", "huge"], "--scaling"),
                                         (["--model", "/nonexistent"], "--model"), (["--precision", "fp8"], "--precision"),
                                         (["--monitor-every", "-1"], "--monitor-every"),
                                         (["--sharpness-every", "-1"], "--sharpness-every"),
                                         (["--sharpness-lanczos", "0"], "--sharpness-lanczos")])  # fmt: skip
def test_cli_rejects_bad_input(tmp_path, args, needle):
    out = tmp_path / "o"
    assert_cli_refuses(["signal_drift.train", *args, "--out", str(out)], needle, out)


def test_a_model_without_llama_linears_is_refused_before_anything_is_written(tmp_path):
    # GPT-2's projections are Conv1D, not nn.Linear: no fallback to them, a clear refusal
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "o"
    assert_cli_refuses(
        ["signal_drift.train", "--model", str(tmp_path / "gpt2"), "--steps", "1", "--out", str(out)],
        "Conv1D",
        out,
    )


def test_gradient_accumulation_equals_the_whole_batch(tmp_path, base):
    """--micro-batch 3 (slices of 3, 3, 2 windows) takes the same steps as 8 windows at once.

    So does --loss-chunk 40 on top (the logits 40 tokens at a time, in training and evaluation).
    """
    cfg = dict(model=str(base), steps=4, lr=1e-3, monitor_every=0, **SMALL)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **cfg), log=quiet)
    sliced = train(TrainConfig(micro_batch=3, out=str(tmp_path / "sliced"), **cfg), log=quiet)
    chunked = train(
        TrainConfig(micro_batch=3, loss_chunk=40, out=str(tmp_path / "chunked"), **cfg), log=quiet
    )
    for key in ("train_loss", "heldout_nll"):
        torch.testing.assert_close(torch.tensor(sliced[key]), torch.tensor(whole[key]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(chunked[key]), torch.tensor(whole[key]), rtol=1e-5, atol=1e-6)
    for name in ("micro_batch", "loss_chunk"):
        with pytest.raises(InputError, match=name):
            TrainConfig(**{name: 0}).validate()


def test_gradient_checkpointing_takes_the_same_steps(tmp_path, base, monkeypatch):
    made = _capture_peft_model(monkeypatch)
    cfg = dict(model=str(base), steps=3, lr=1e-3, monitor_every=0, **SMALL)
    plain = train(TrainConfig(out=str(tmp_path / "plain"), **cfg), log=quiet)
    recomputed = train(TrainConfig(grad_checkpointing=True, out=str(tmp_path / "ckpt"), **cfg), log=quiet)
    assert any(getattr(m, "gradient_checkpointing", False) for m in made[1].modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in made[0].modules())
    for key in ("train_loss", "heldout_nll"):
        torch.testing.assert_close(
            torch.tensor(recomputed[key]), torch.tensor(plain[key]), rtol=1e-5, atol=1e-6
        )
