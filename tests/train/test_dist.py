"""Process placement, precision choice and process-group teardown, with CUDA mocked (no GPU needed)."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from cases import free_port  # noqa: E402

from signal_drift import InputError  # noqa: E402
from signal_drift._errors import run_cli  # noqa: E402
from signal_drift.train import _dist, base_dtype, resolve_precision  # noqa: E402
from signal_drift.train.__main__ import main  # noqa: E402


def _fake_gpus(monkeypatch, n: int, capability=(8, 0), native=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation
    )


def _torchrun_env(monkeypatch, local_rank: int, local_world: int):
    for k, v in {"WORLD_SIZE": local_world, "RANK": local_rank, "LOCAL_RANK": local_rank,
                 "LOCAL_WORLD_SIZE": local_world}.items():  # fmt: skip
        monkeypatch.setenv(k, str(v))


@pytest.mark.parametrize("local_rank", [0, 1])
def test_more_processes_than_gpus_is_one_clear_error_on_every_rank(monkeypatch, local_rank):
    _fake_gpus(monkeypatch, 1)
    _torchrun_env(monkeypatch, local_rank, 2)
    with pytest.raises(InputError, match=r"2 processes on this node but 1 GPU\(s\) are visible"):
        _dist.setup()


def test_the_cli_exits_2_with_one_line_instead_of_invalid_device_ordinal(monkeypatch, tmp_path, capsys):
    _fake_gpus(monkeypatch, 2)
    _torchrun_env(monkeypatch, 0, 4)
    with pytest.raises(SystemExit) as code:
        run_cli(main, ["--steps", "1", "--out", str(tmp_path / "o")], prog="train")
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1 and "--nproc_per_node 2 or fewer" in err, err
    assert not (tmp_path / "o").exists()


def test_auto_precision_is_bf16_only_with_native_bf16(monkeypatch):
    cuda, cpu = torch.device("cuda:0"), torch.device("cpu")
    _fake_gpus(monkeypatch, 1, capability=(8, 0), native=True)  # A100, H100
    assert resolve_precision("auto", cuda) == "bf16" and resolve_precision("auto", cpu) == "fp32"
    _fake_gpus(monkeypatch, 1, capability=(7, 0), native=False)  # V100, T4: bf16 only emulated
    assert resolve_precision("auto", cuda) == "fp32"
    _fake_gpus(monkeypatch, 1, capability=(8, 0), native=False)
    assert resolve_precision("auto", cuda) == "fp32"
    assert resolve_precision("bf16", cuda) == "bf16" and resolve_precision("fp32", cuda) == "fp32"


def test_the_base_is_bf16_only_when_training_in_bf16_on_cuda():
    cuda, cpu = torch.device("cuda:0"), torch.device("cpu")
    assert base_dtype("bf16", cuda) == torch.bfloat16
    assert base_dtype("bf16", cpu) == torch.float32 and base_dtype("fp32", cuda) == torch.float32


def test_teardown_leaves_the_process_group(tmp_path):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    assert torch.distributed.is_initialized()
    _dist.teardown()
    assert not torch.distributed.is_initialized()
    _dist.teardown()  # no group: nothing to do


def test_a_single_process_runs_main_only_work_itself():
    assert _dist.Dist().from_main(lambda: 42) == 42


_FROM_MAIN = """
import torch, torch.distributed as td
from signal_drift import InputError
from signal_drift.train._dist import Dist

td.init_process_group("gloo")
d = Dist(rank=td.get_rank(), world=2, device=torch.device("cuda"))  # the GPU route: over a gloo subgroup
calls = []
ids = d.from_main(lambda: calls.append(1) or torch.arange(5))
assert ids.tolist() == [0, 1, 2, 3, 4] and len(calls) == (d.rank == 0)


def bad():
    raise InputError("no usable corpus")


try:
    d.from_main(bad)
except InputError as err:
    print(f"rank {d.rank}: {err}")
td.destroy_process_group()
"""


def test_rank_0_works_alone_and_hands_its_result_or_error_to_every_rank(tmp_path):
    script = tmp_path / "from_main.py"
    script.write_text(_FROM_MAIN)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(script)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 0: no usable corpus" in r.stdout and "rank 1: no usable corpus" in r.stdout
