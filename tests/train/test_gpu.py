"""The training path on a real CUDA GPU (``gpu`` marker: skipped cleanly without one).

bf16 autocast rounds to 8 mantissa bits, so a GPU run matches its CPU (fp32) twin to about a
percent, not to the 1e-5 of the CPU twins.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from cases import free_port  # noqa: E402

from signal_drift import InputError  # noqa: E402
from signal_drift.lm import build_base_model, load_model  # noqa: E402
from signal_drift.train import TrainConfig, resolve_precision, train  # noqa: E402

pytestmark = pytest.mark.gpu

SMALL = dict(batch_size=8, seq_len=32, eval_every=2, checkpoint_every=3, rank=4, monitor_every=0)
BF16 = dict(rtol=3e-2, atol=3e-2)  # bf16 tolerance on NLLs of a few nats


def quiet(*_):
    pass


def _flags(base, steps: int) -> list[str]:
    return ["--model", str(base), "--steps", str(steps), "--lr", "1e-3", "--batch-size", "8", "--seq-len", "32",
            "--eval-every", "2", "--checkpoint-every", "3", "--rank", "4", "--monitor-every", "0"]  # fmt: skip


def _cli(args: list[str], cpu: bool = False, nproc: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"} | ({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port())] if nproc else [sys.executable]  # fmt: skip
    return subprocess.run([*run, "-m", "signal_drift.train", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base_model(tmp_path_factory.mktemp("base") / "model", steps=30, seq_len=32, device="cuda")


def test_the_base_pretrains_on_the_gpu_and_is_saved_from_the_cpu(base):
    assert all(torch.isfinite(p).all() for p in load_model(base).parameters())


def test_a_gpu_run_matches_its_cpu_twin_to_bf16_tolerance(tmp_path, base, monkeypatch):
    import peft

    made, real = [], peft.get_peft_model
    monkeypatch.setattr(peft, "get_peft_model", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    r = _cli([*_flags(base, 6), "--out", str(tmp_path / "cpu")], cpu=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cpu = json.loads((tmp_path / "cpu" / "metrics.json").read_text())
    gpu = train(TrainConfig(model=str(base), steps=6, lr=1e-3, out=str(tmp_path / "gpu"), **SMALL), log=quiet)
    precision = resolve_precision("auto", torch.device("cuda"))
    assert gpu["device"].startswith("cuda") and gpu["precision"] == precision and cpu["precision"] == "fp32"
    torch.testing.assert_close(torch.tensor(gpu["train_loss"]), torch.tensor(cpu["train_loss"]), **BF16)
    torch.testing.assert_close(torch.tensor(gpu["heldout_nll"]), torch.tensor(cpu["heldout_nll"]), **BF16)
    frozen = {(p.dtype, p.device.type) for p in made[0].parameters() if not p.requires_grad}
    trained = {(p.dtype, p.device.type) for p in made[0].parameters() if p.requires_grad}
    base_dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # the base loads straight in bf16
    assert frozen == {(base_dtype, "cuda")} and trained == {(torch.float32, "cuda")}


def test_a_resume_on_the_gpu_keeps_adamw_step_on_the_cpu(tmp_path, base, monkeypatch):
    opts = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opts.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    cfg = dict(model=str(base), lr=1e-3, out=str(tmp_path), **SMALL)
    train(TrainConfig(steps=3, **cfg), log=quiet)
    notes = []
    m = train(TrainConfig(steps=5, **cfg), log=notes.append)
    assert any("resuming from step 3" in n for n in notes) and m["device"].startswith("cuda")
    states = list(opts[-1].state.values())
    assert states and all(s["step"].device.type == "cpu" for s in states)
    assert all(s["exp_avg"].device.type == "cuda" for s in states)


def test_a_cpu_run_is_not_resumed_in_bf16_on_the_gpu(tmp_path, base):
    if resolve_precision("auto", torch.device("cuda")) != "bf16":
        pytest.skip("this GPU has no native bf16: auto is fp32 here too")
    out = tmp_path / "o"
    r = _cli([*_flags(base, 3), "--out", str(out)], cpu=True)
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(InputError, match="trained in fp32 but --precision auto is bf16"):
        train(TrainConfig(model=str(base), steps=6, lr=1e-3, out=str(out), **SMALL), log=quiet)
    m = train(
        TrainConfig(model=str(base), steps=6, lr=1e-3, precision="fp32", out=str(out), **SMALL), log=quiet
    )
    assert m["precision"] == "fp32" and m["device"].startswith("cuda") and m["processes"] == 1


def test_torchrun_on_two_gpus_matches_one_to_bf16_tolerance(tmp_path, base):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    r = _cli([*_flags(base, 4), "--out", str(tmp_path / "one")])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli([*_flags(base, 4), "--out", str(tmp_path / "two")], nproc=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("resuming") == 0
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert one["processes"] == 1 and two["processes"] == 2 and two["device"] == "cuda:0"
    torch.testing.assert_close(torch.tensor(two["train_loss"]), torch.tensor(one["train_loss"]), **BF16)
    torch.testing.assert_close(torch.tensor(two["heldout_nll"]), torch.tensor(one["heldout_nll"]), **BF16)


def test_more_processes_than_gpus_is_refused_in_one_line(tmp_path, base):
    n = torch.cuda.device_count()
    r = _cli([*_flags(base, 1), "--out", str(tmp_path / "o")], nproc=n + 1)
    assert r.returncode != 0 and f"processes on this node but {n} GPU(s) are visible" in r.stderr
    assert "invalid device ordinal" not in r.stderr and not (tmp_path / "o").exists()
