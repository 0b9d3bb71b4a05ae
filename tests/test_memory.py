"""The dense-matrix guard: host RAM for CPU matrices, the GPU's free memory for CUDA ones (mocked)."""

import pytest
import torch

from signal_drift import DenseTooLargeError, _memory


@pytest.fixture
def gpu_with(monkeypatch):
    """A fake CUDA device with ``free`` bytes free to the driver and ``cached`` unused in PyTorch's cache."""

    def set_free(free: int, cached: int = 0):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: cached + 100)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)

    monkeypatch.delenv("SIGNAL_DRIFT_MAX_DENSE_BYTES", raising=False)
    monkeypatch.setattr(_memory, "available_memory_bytes", lambda: 64 * 2**30)  # plenty of host RAM
    return set_free


def test_a_cuda_matrix_is_budgeted_against_the_gpu_not_host_ram(gpu_with):
    gpu_with(free=2 * 2**30, cached=2**30)  # 3 GiB usable on the GPU: a 1.5 GiB budget
    assert _memory.dense_budget_bytes("cuda:0") == int(1.5 * 2**30)
    assert _memory.dense_budget_bytes("cpu") == _memory.dense_budget_bytes() == 32 * 2**30
    n = 21_000  # 21000² float32 = 1.8 GB: fits in host RAM, not on this GPU
    assert _memory.check_dense("H", n, n, torch.float32, "X") == 4 * n * n
    with pytest.raises(DenseTooLargeError, match=r"on cuda:0 of 1\.6 GB.*use X"):
        _memory.check_dense("H", n, n, torch.float32, "X", device=torch.device("cuda", 0))


def test_every_live_copy_is_counted(gpu_with):
    gpu_with(free=8 * 2**30)  # a 4 GiB budget
    n = 16_000  # 16000² float32 = 1.02 GB each
    assert _memory.check_dense("P2", n, n, torch.float32, "X", device="cuda") == 4 * n * n
    assert _memory.check_dense("P2", n, n, torch.float32, "X", device="cuda", copies=4) == 16 * n * n
    with pytest.raises(DenseTooLargeError, match=r"\(5 x 16000 x 16000, torch\.float32\) needs 5\.1 GB"):
        _memory.check_dense("P2", n, n, torch.float32, "X", device="cuda", copies=5)


def test_the_environment_budget_still_wins(gpu_with, monkeypatch):
    gpu_with(free=2**40)
    monkeypatch.setenv("SIGNAL_DRIFT_MAX_DENSE_BYTES", "1000")
    assert _memory.dense_budget_bytes("cuda:0") == 1000
    with pytest.raises(DenseTooLargeError):
        _memory.check_dense("H", 16, 16, torch.float32, "X", device="cuda:0")
