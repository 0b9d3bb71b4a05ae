import math

import pytest
import torch
from cases import UNIFORM_KURTOSIS, mlp_problem, sample_variance_se
from scipy import stats
from torch import nn

from signal_drift import InputError, attach_lora, init_theta, init_variance, make_mlp, make_task


def _data(d=6, n=10):
    t = make_task(d, n)
    return t.X, t.y


def test_init_gives_zero_b_and_a_with_the_declared_variance():
    problem = attach_lora(make_mlp(64, 2), *_data(64, 8), rank=8, init="kaiming_uniform")
    theta = init_theta(problem, 0)
    a = problem.adapters[0]
    assert theta[a.key_B].abs().max() == 0
    A = theta[a.key_A]
    assert A.abs().max() <= 1 / 64**0.5
    # sample variance of 512 uniform entries within 5 standard errors of 1/(3n); a uniform's
    # kurtosis is 9/5, so its SE is √(0.8/N)·σ², not the Gaussian √(2/N)·σ² (a 31 % band at 5 SE)
    assert a.sigma2 == pytest.approx(1 / (3 * 64), rel=1e-15)
    var, se = A.var().item(), sample_variance_se(a.sigma2, 512, UNIFORM_KURTOSIS)
    assert abs(var - a.sigma2) < 5 * se


def test_kaiming_uniform_a_has_variance_one_over_3n():
    # PEFT initialises lora_A by nn.init.kaiming_uniform_(a=√5): gain √(2/(1+a²)) = 1/√3, bound
    # gain·√(3/n) = 1/√n, so A ~ U(−1/√n, 1/√n) and σ² = b²/3 = 1/(3n) (docs/theory.md#prop-3)
    n, r = 1024, 16
    assert init_variance("kaiming_uniform", n) == pytest.approx(1 / (3 * n), rel=1e-15)
    gen = torch.Generator().manual_seed(0)
    peft_style = nn.init.kaiming_uniform_(torch.empty(r, n), a=math.sqrt(5), generator=gen)
    model = nn.Sequential(nn.Linear(n, r, bias=False))
    problem = attach_lora(
        model,
        torch.randn(4, n, generator=gen),
        torch.randn(4, r, generator=gen),
        rank=r,
        init="kaiming_uniform",
    )
    ours = init_theta(problem, seed=3)[problem.adapters[0].key_A]
    for A in (peft_style, ours):
        N, sigma2, b = A.numel(), 1 / (3 * n), 1 / math.sqrt(n)
        assert abs(A.var().item() - sigma2) < 4 * sample_variance_se(sigma2, N, UNIFORM_KURTOSIS)  # ±1.4 %
        # support [−b, b] and filled up to its ends: P(max |A| < b(1 − 10/N)) ≈ e^{−10}
        assert b * (1 - 10 / N) < A.abs().max() <= b
        # and uniform in between (Kolmogorov–Smirnov against U(−1, 1) after scaling by 1/b)
        assert stats.kstest((A.flatten() / b).numpy(), "uniform", args=(-1, 2)).pvalue > 1e-3


def test_weights_follow_w0_plus_gamma_alpha_over_r_ba():
    problem = mlp_problem(alpha=6.0)
    theta = {k: torch.randn_like(v) for k, v in init_theta(problem).items()}
    a = problem.adapters[0]
    expected = problem.base[f"{a.name}.weight"] + 6.0 / 2 * theta[a.key_B] @ theta[a.key_A]
    torch.testing.assert_close(problem.weights(theta)[a.name], expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("rank", [0, -1, 7])
def test_rank_outside_one_to_min_dims_is_rejected(rank):
    with pytest.raises(InputError, match=r"rank.*1\.\.6"):
        attach_lora(make_mlp(6, 2), *_data(), rank=rank)


def test_nan_in_data_or_weights_is_rejected():
    X, y = _data()
    X[0, 0] = float("nan")
    with pytest.raises(InputError, match="X: 1 of 60 entries are NaN or Inf"):
        attach_lora(make_mlp(6, 2), X, y)
    model = make_mlp(6, 2)
    with torch.no_grad():
        model[0].weight[1, 1] = float("inf")
    with pytest.raises(InputError, match="0.weight"):
        attach_lora(model, *_data())


def test_mismatched_shapes_are_rejected():
    X, y = _data()
    with pytest.raises(InputError, match="10 rows but y has 9"):
        attach_lora(make_mlp(6, 2), X, y[:9])
    with pytest.raises(InputError, match="output has shape"):
        attach_lora(make_mlp(6, 2), X, torch.zeros(10, 5))
    problem = attach_lora(make_mlp(6, 2), X, y, rank=2)
    theta = init_theta(problem)
    theta["0.lora_A"] = torch.zeros(3, 6)
    with pytest.raises(InputError, match="shape"):
        problem.check_theta(theta)


def test_unknown_targets_and_patterns_are_rejected():
    with pytest.raises(InputError, match="not an nn.Linear"):
        attach_lora(make_mlp(6, 2), *_data(), targets=["1"])
    with pytest.raises(InputError, match="rank_pattern"):
        attach_lora(make_mlp(6, 2), *_data(), targets=["0"], rank_pattern={"2": 3})


def test_per_layer_rank_and_alpha_patterns():
    problem = attach_lora(
        make_mlp(6, 3), *_data(), rank=2, alpha=4.0, rank_pattern={"2": 3}, alpha_pattern={"4": 9.0}
    )
    specs = {a.name: (a.rank, a.alpha) for a in problem.adapters}
    assert specs == {"0": (2, 4.0), "2": (3, 4.0), "4": (2, 9.0)}


def test_user_module_with_custom_loss_and_selected_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.act, self.head = nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.act(self.enc(x)))

    X, _ = _data()
    y = torch.randn(10, 1)
    problem = attach_lora(
        Net().double(), X, y, targets=["head"], rank=1, loss_fn=nn.functional.smooth_l1_loss
    )
    assert [a.name for a in problem.adapters] == ["head"]
    assert problem.loss_theta(init_theta(problem)).ndim == 0


@pytest.mark.parametrize("noisy", [nn.Dropout(0.5), nn.BatchNorm1d(6)], ids=["dropout", "batchnorm"])
def test_a_module_in_training_mode_gives_the_eval_mode_hessian(noisy):
    from signal_drift.decomposition import decomposed_lora_hessian
    from signal_drift.hessian import lora_hessian

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 6), nn.SiLU(), noisy, nn.Linear(6, 6)).double()
    if isinstance(noisy, nn.BatchNorm1d):  # non-trivial running statistics
        noisy.running_mean.uniform_(-1, 1)
        noisy.running_var.uniform_(0.5, 2)
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    module.train()
    X, y = _data()
    problem = attach_lora(module, X, y, rank=2)
    theta = {k: torch.randn_like(v) for k, v in init_theta(problem).items()}
    H1 = lora_hessian(problem, theta).to_dense()
    H2 = lora_hessian(problem, theta).to_dense()
    torch.testing.assert_close(H1, H2, rtol=0, atol=0)
    # Prop. 1 holds (it fails by ~0.9·‖H_θ‖ with a fresh dropout mask at every call)
    torch.testing.assert_close(decomposed_lora_hessian(problem, theta).to_dense(), H1, rtol=0, atol=1e-11)
    # the module's mode and buffers are left as they were
    assert all(m.training for m in module.modules())
    for k, v in module.named_buffers():
        assert torch.equal(v, buffers[k]), k
    # and the Hessian is that of the module in eval mode
    module.eval()
    H_eval = lora_hessian(attach_lora(module, X, y, rank=2), theta).to_dense()
    torch.testing.assert_close(H1, H_eval, rtol=0, atol=1e-13)


def test_a_forward_that_is_random_in_eval_mode_is_refused():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6, dtype=torch.float64)

        def forward(self, x):
            return nn.functional.dropout(self.lin(x), 0.5, training=True)

    with pytest.raises(InputError, match="two forward passes in eval mode differ"):
        attach_lora(Noisy().eval(), *_data(), rank=2)


def test_select_keeps_the_network_and_the_diagonal_blocks():
    """One layer's problem (others merged at θ) has the same loss and the same diagonal blocks, raw products."""
    from cases import mlp_problem, trained_theta

    from signal_drift.decomposition import curvature
    from signal_drift.hessian import fft_hessian

    problem = mlp_problem(dim=6, depth=3, rank=2, alpha=3.0)
    theta = trained_theta(problem, seed=1)
    full = curvature(problem, theta)
    layer = problem.adapters[1].name
    sub, th = problem.select([layer], theta)
    assert [a.name for a in sub.adapters] == [layer] and set(th) == {f"{layer}.lora_A", f"{layer}.lora_B"}
    assert sub.loss(th) == pytest.approx(problem.loss(theta), rel=1e-14)
    part = curvature(sub, th, H=fft_hessian(sub, th, backend="autograd"))
    w_idx = problem.weight_layout.indices([layer])
    t_idx = problem.theta_layout.indices([f"{layer}.lora_A", f"{layer}.lora_B"])
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(len(w_idx), 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(part.H.matmat(V), full.H.restrict(w_idx).matmat(V), rtol=1e-10, atol=1e-14)
    U = torch.randn(len(t_idx), 3, generator=gen, dtype=torch.float64)
    for name in ("H_theta", "signal", "drift"):
        torch.testing.assert_close(
            getattr(part, name).matmat(U),
            getattr(full, name).restrict(t_idx).matmat(U),
            rtol=1e-10,
            atol=1e-14,
        )
    with pytest.raises(InputError, match="names"):
        problem.select(["nope"], theta)
