"""Stability edges (GD, Adam) and the preconditioned sharpness, against iterations and dense truth."""

from __future__ import annotations

import math

import pytest
import torch

from signal_drift import init_theta
from signal_drift._errors import InputError
from signal_drift.decomposition import DriftOperator, MappingJacobian, SignalOperator
from signal_drift.edge import (
    GD_EDGE,
    PreconditionedOperator,
    Sharpness,
    adam_edge,
    adam_preconditioner,
    observed_breakdown,
    predict_breakdown,
    sharpness,
    torch_adam_state,
)
from signal_drift.hessian import fft_hessian, lora_hessian
from signal_drift.operators import FunctionOperator

from .cases import assert_close, compare_matmat, dense_reference, mlp_problem, trained_theta

torch.set_default_dtype(torch.float64)


def _spd(n: int, seed: int, cond: float = 50.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return Q @ torch.diag(torch.logspace(0, math.log10(cond), n)) @ Q.T


def _positive(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).exp()


def _op(M: torch.Tensor) -> FunctionOperator:
    return FunctionOperator(lambda V: M @ V, tuple(M.shape), M.dtype, symmetric=True)


def _gd(H, lr, steps=3000):
    x = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        x = x - lr * (H @ x)
    return float(x.norm())


def _frozen_adam(H, p, lr, beta1, steps=3000):
    """Adam's update with the preconditioner frozen at ``p``: EMA momentum with bias correction."""
    x = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1))
    m = torch.zeros_like(x)
    for t in range(1, steps + 1):
        m = beta1 * m + (1 - beta1) * (H @ x)
        x = x - lr * (m / (1 - beta1**t)) / p
    return float(x.norm())


def _pre_lambda(H, p):
    d = p.rsqrt()
    return float(torch.linalg.eigvalsh(d[:, None] * H * d[None, :])[-1])


def test_adam_edge_values():
    assert adam_edge(0.9) == pytest.approx(38.0, rel=1e-14)
    assert adam_edge(0.0) == GD_EDGE == 2.0  # no momentum: Adam's frozen-P edge is GD's on P⁻¹H
    with pytest.raises(InputError, match="beta1"):
        adam_edge(1.0)


@pytest.mark.parametrize("side,expect_stable", [(0.98, True), (1.02, False)])
def test_gd_edge_on_a_quadratic(side, expect_stable):
    H = _spd(30, 0)
    lam = float(torch.linalg.eigvalsh(H)[-1])
    final = _gd(H, side * GD_EDGE / lam)
    assert (final < 1e-3) if expect_stable else not (final < 1e6), final  # inf/NaN count as diverged


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("side,expect_stable", [(0.98, True), (1.02, False)])
def test_adam_edge_on_a_quadratic(beta1, side, expect_stable):
    """Frozen-P Adam is stable just below η·λ_max(P⁻¹H) = (2+2β₁)/(1−β₁) and diverges just above.

    λ_max(P⁻¹H) comes from the package (Lanczos on :class:`PreconditionedOperator`); the iteration
    is written out here.
    """
    H, p = _spd(30, 2), _positive(30, 3)
    res = sharpness(_op(H), _op(torch.zeros(30, 30)), p, 1.0, beta1=beta1, parts=False)
    assert res.preconditioned == pytest.approx(_pre_lambda(H, p), rel=1e-10)
    lr = side * adam_edge(beta1) / res.preconditioned
    final = _frozen_adam(H, p, lr, beta1)
    assert (final < 1e-3) if expect_stable else not (final < 1e6), final  # inf/NaN count as diverged
    # GD's ratio alone would not have said this: the un-preconditioned λ_max differs
    assert not math.isclose(res.lambda_max, res.preconditioned, rel_tol=0.1)


def test_preconditioned_operator_matmat_against_dense():
    problem = mlp_problem(dim=6, depth=3, rank=2, alpha=3.0)
    theta = trained_theta(problem, seed=1)
    ref = dense_reference(problem, theta)
    p = _positive(ref.H_theta.shape[0], 4)
    d = p.rsqrt()
    for op, M in [(lora_hessian(problem, theta), ref.H_theta), (DriftOperator(problem, theta), ref.drift)]:
        compare_matmat(PreconditionedOperator(op, p), d[:, None] * M * d[None, :], rtol=1e-9)


def test_sharpness_against_dense_truth():
    """Every number of :func:`sharpness` from dense eigendecompositions of the torch.func reference."""
    problem = mlp_problem(dim=6, depth=3, rank=2, alpha=3.0)
    theta = trained_theta(problem, seed=1)
    ref = dense_reference(problem, theta)
    p = _positive(ref.H_theta.shape[0], 5)
    d = p.rsqrt()

    def pre(M):
        return d[:, None] * M * d[None, :]

    H = fft_hessian(problem, theta)
    S, D = SignalOperator(MappingJacobian(problem, theta), H), DriftOperator(problem, theta, H.gradient)
    res = sharpness(lora_hessian(problem, theta), D, p, 0.01, signal=S, beta1=0.9, step=7, lanczos_steps=200)
    ev, U = torch.linalg.eigh(pre(ref.H_theta))
    u = U[:, -1]
    assert res.warnings == ()
    assert res.step == 7
    assert res.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(ref.H_theta)[-1]), rel=1e-9)
    assert res.preconditioned == pytest.approx(float(ev[-1]), rel=1e-9)
    assert res.signal_share == pytest.approx(
        float(u @ pre(ref.signal) @ u), rel=1e-7, abs=1e-9 * float(ev[-1])
    )
    assert res.drift_share == pytest.approx(float(u @ pre(ref.drift) @ u), rel=1e-7, abs=1e-9 * float(ev[-1]))
    assert res.signal_share + res.drift_share == pytest.approx(res.preconditioned, rel=1e-9)
    assert res.signal_max == pytest.approx(float(torch.linalg.eigvalsh(pre(ref.signal))[-1]), rel=1e-9)
    assert res.drift_max == pytest.approx(float(torch.linalg.eigvalsh(pre(ref.drift))[-1]), rel=1e-9)
    assert res.edge_ratio == pytest.approx(0.01 * float(ev[-1]) / 38.0, rel=1e-9)
    assert res.gd_ratio == pytest.approx(0.01 * res.lambda_max / 2, rel=1e-12)
    js = res.to_json()
    assert js["drift_fraction"] == pytest.approx(res.drift_share / res.preconditioned)
    # without the signal operator the share comes from Prop. 1: the same number
    res2 = sharpness(lora_hessian(problem, theta), D, p, 0.01, lanczos_steps=200, parts=False)
    assert res2.signal_share == pytest.approx(res.signal_share, rel=1e-7)
    assert math.isnan(res2.signal_max) and math.isnan(res2.drift_max)


def test_unconverged_values_are_nan_with_a_warning():
    H, p = _spd(60, 6, cond=1e3), _positive(60, 7)
    res = sharpness(_op(H), _op(torch.zeros(60, 60)), p, 1.0, lanczos_steps=3, label="run x step 5")
    assert math.isnan(res.preconditioned) and math.isnan(res.lambda_max)
    assert math.isnan(res.signal_share) and math.isnan(res.drift_share)
    assert any("run x step 5: λ_max(P⁻¹H_θ)" in w and "not converged after" in w for w in res.warnings)


def test_alpha_and_eta_scaling_at_b_zero_identity():
    """At B = 0 with P scaled by k (the gradient is): preconditioned signal ×k, drift ×1.

    An identity of the construction (H_signal ∝ k², H_drift ∝ k, P ∝ k), checked here as a code
    test; whether Adam's P really scales by k along training is what the runs measure.
    """
    problem = mlp_problem(dim=6, depth=3, rank=2, alpha=3.0)
    theta = init_theta(problem, seed=2)
    p = _positive(problem.theta_layout.numel, 8)
    out = {}
    for k in (1.0, 4.0):
        pk = problem.with_alpha(3.0 * k)
        H = fft_hessian(pk, theta)
        S, D = SignalOperator(MappingJacobian(pk, theta), H), DriftOperator(pk, theta, H.gradient)
        out[k] = sharpness(S + D, D, k * p, 0.01, signal=S, lanczos_steps=200)
    assert out[4.0].signal_max == pytest.approx(4 * out[1.0].signal_max, rel=1e-8)
    assert out[4.0].drift_max == pytest.approx(out[1.0].drift_max, rel=1e-8)
    # the η-path multiplies the whole ratio by k
    assert Sharpness(**{**out[1.0].__dict__, "lr": 0.04}).edge_ratio == pytest.approx(4 * out[1.0].edge_ratio)


def test_torch_adam_state_is_what_adamw_applies():
    """``P`` read from ``torch.optim.AdamW`` reproduces AdamW's own step: Δθ = −η m̂/P."""
    gen = torch.Generator().manual_seed(0)
    w = {
        "a": torch.nn.Parameter(torch.randn(3, 4, generator=gen)),
        "b": torch.nn.Parameter(torch.randn(5, generator=gen)),
    }
    opt = torch.optim.AdamW(list(w.values()), lr=0.1, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)
    with pytest.raises(InputError, match="no step was taken"):
        torch_adam_state(opt, w)
    from signal_drift.operators import ParamLayout

    layout = ParamLayout.from_tensors({k: v.detach() for k, v in w.items()})
    for _ in range(3):
        before = {k: v.detach().clone() for k, v in w.items()}
        opt.zero_grad()
        ((w["a"] ** 3).sum() + (w["b"].sin()).sum()).backward()
        opt.step()
    v, t, hyper = torch_adam_state(opt, w)
    assert t == 3 and hyper == {"lr": 0.1, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6}
    P = adam_preconditioner(v, t, layout, beta2=0.99, eps=1e-6)
    m_hat = layout.flatten({k: opt.state[p]["exp_avg"] / (1 - 0.8**3) for k, p in w.items()})
    step = layout.flatten({k: w[k].detach() - before[k] for k in w})
    assert_close(step, -0.1 * m_hat / P, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_pending_state_is_the_one_the_step_then_uses(amsgrad):
    """``pending=True`` before ``opt.step()`` = the state ``opt.step()`` writes (first step included)."""
    gen = torch.Generator().manual_seed(1)
    w = {"a": torch.nn.Parameter(torch.randn(4, 3, generator=gen))}
    opt = torch.optim.AdamW(list(w.values()), lr=0.05, betas=(0.9, 0.99), amsgrad=amsgrad, weight_decay=0.0)
    for step in range(4):
        opt.zero_grad()
        ((w["a"] ** 3).sum() * (1 + step)).backward()
        v, t, _ = torch_adam_state(opt, w, pending=True)
        opt.step()
        after, t_after, _ = torch_adam_state(opt, w)
        assert t == t_after == step + 1
        assert_close(v["a"], after["a"], rtol=1e-14, atol=0.0)


def test_torch_adam_state_refusals():
    w = {"a": torch.nn.Parameter(torch.ones(2))}
    sgd = torch.optim.SGD(list(w.values()), lr=0.1)
    with pytest.raises(InputError, match="no Adam state"):
        torch_adam_state(sgd, w)
    other = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(InputError, match="does not hold parameter 'a'"):
        torch_adam_state(other, w)
    coupled = torch.optim.Adam(list(w.values()), weight_decay=0.1)
    with pytest.raises(InputError, match="coupled weight_decay"):
        torch_adam_state(coupled, w, pending=True)
    with pytest.raises(InputError, match="maximize"):
        torch_adam_state(torch.optim.Adam(list(w.values()), maximize=True), w, pending=True)
    with pytest.raises(InputError, match="no .grad"):
        torch_adam_state(torch.optim.Adam(list(w.values())), w, pending=True)
    with pytest.raises(InputError, match="at least one step"):
        adam_preconditioner(
            {"a": torch.ones(2)}, 0, __import__("signal_drift").operators.ParamLayout.from_shapes({"a": (2,)})
        )


def test_preconditioner_refusals():
    op = _op(torch.eye(3))
    with pytest.raises(InputError, match="positive and finite"):
        PreconditionedOperator(op, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(InputError, match="shape"):
        PreconditionedOperator(op, torch.ones(4))


def _rec(step, rho, f=0.5, rho_s=math.nan, rho_d=math.nan, lr=0.01, beta1=0.9):
    """A record with edge ratio ρ, drift fraction f and the ratios of the signal and drift maxima."""
    e = adam_edge(beta1) / lr
    pre = rho * e
    return Sharpness(step, lr, beta1, 1.0, 0.0, pre, 0.0, pre * (1 - f), pre * f, rho_s * e, rho_d * e, 1)


def test_predict_breakdown_formulas():
    recs = [
        _rec(0, 5.0, rho_s=1.0, rho_d=5.0),
        _rec(10, 0.2, rho_s=0.1, rho_d=0.15),
        _rec(20, 0.25, rho_s=0.05, rho_d=0.3),
    ]
    b = predict_breakdown(recs, {1: False, 2: False, 4: True, 8: True}, {1: False, 4: False, 16: False})
    assert b.records_used == [10, 20] and b.step_of_max == 20  # step 0 (P_A = ε) is left out
    assert b.predicted_eta == pytest.approx(4.0)  # 1 / 0.25
    # α-path: k ρ_S − ρ_D ≤ ratio ≤ k ρ_S + ρ_D crosses 1 in [(1 − ρ_D)/ρ_S, (1 + ρ_D)/ρ_S]; earliest record wins
    assert b.predicted_alpha == pytest.approx([min(0.85 / 0.1, 0.7 / 0.05), min(1.15 / 0.1, 1.3 / 0.05)])
    assert (b.observed_eta, b.last_stable_eta) == (4, 2)
    assert (b.observed_alpha, b.last_stable_alpha) == (None, 16)
    assert b.within_2_eta  # 4 ∈ (2, 4]
    assert b.within_2_alpha  # 2 · 11.5 > 16: no breakdown up to 16 is consistent
    early = predict_breakdown(recs, {1: False, 2: True}, {1: False}, max_step=10)
    assert early.records_used == [10] and early.predicted_eta == pytest.approx(5.0)
    far = predict_breakdown(
        [_rec(5, 0.01, rho_s=0.001, rho_d=0.001)], {1: False, 2: True}, {1: False, 2: True}
    )
    assert not far.within_2_eta and not far.within_2_alpha
    none = predict_breakdown([_rec(5, 0.1)], {1: False}, {1: False})  # no signal/drift maxima: no α range
    assert none.predicted_alpha is None and none.to_json()["predicted_alpha"] is None
    assert observed_breakdown({1: False, 2: True, 4: False}) == (2, 1)
    with pytest.raises(InputError, match="no converged preconditioned sharpness"):
        predict_breakdown([_rec(0, 0.5)], {}, {})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_range_brackets_the_true_crossing(seed):
    """The α-path crossing of η·λ_max(k S̃ + D̃) = 38, found by bisection on dense matrices, lies in the range.

    S̃ low-rank PSD, D̃ block off-diagonal (as LoRA's drift is, between A and B): the range comes
    from the records' λ_max(S̃) and λ_max(D̃) alone.
    """
    gen = torch.Generator().manual_seed(seed)
    n = 24
    G = torch.randn(n, 3, generator=gen)
    S = G @ G.T
    X = torch.randn(n // 2, n // 2, generator=gen)
    D = torch.zeros(n, n)
    D[: n // 2, n // 2 :], D[n // 2 :, : n // 2] = 2 * X, 2 * X.T
    lr = 0.67 * 38.0 / float(torch.linalg.eigvalsh(S + D)[-1])  # base run at ρ = 0.67
    rec = sharpness(_op(S + D), _op(D), torch.ones(n), lr, signal=_op(S), step=3, lanczos_steps=200)
    b = predict_breakdown([rec], {1: False}, {1: False})
    lo, hi = b.predicted_alpha

    def ratio(k):
        return lr * float(torch.linalg.eigvalsh(k * S + D)[-1]) / 38.0

    a, z = 1.0, 1e6
    for _ in range(200):
        m = (a * z) ** 0.5
        a, z = (m, z) if ratio(m) < 1 else (a, m)
    assert lo <= a <= hi, (lo, a, hi)
    assert 0 < hi < math.inf


# -- PEFT models and transformers.Trainer ----------------------------------------------------------
def _tiny_peft(dtype=torch.float32, seed=0):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=30, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    return peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    )


def _adamw_steps(pm, ids, steps=4, lr=0.02):
    opt = torch.optim.AdamW(
        [p for p in pm.parameters() if p.requires_grad], lr=lr, betas=(0.85, 0.995), eps=1e-7
    )
    pm.train()
    for _ in range(steps):
        opt.zero_grad()
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return opt


def test_peft_sharpness_reads_the_optimizer_and_matches_dense_truth():
    """P from AdamW's own state, mapped by parameter name (here) onto θ, against dense eigenvalues.

    The dense matrices come from the engine's H_θ and H_drift (tested against torch.func in
    tests/test_hf.py); what is checked is the reading of the model, of each block's ``exp_avg_sq``
    (a swapped block or layer would change the preconditioned spectrum), of ``η``, ``β₁``, ``β₂``, ``ε``.
    """
    from signal_drift.edge import peft_sharpness
    from signal_drift.hf import from_peft
    from signal_drift.lm import causal_lm_loss  # noqa: F401 - the loss the engine uses

    pm = _tiny_peft()
    ids = torch.randint(0, 30, (3, 10), generator=torch.Generator().manual_seed(0))
    opt = _adamw_steps(pm, ids)
    res = peft_sharpness(pm, opt, ids, step=4, lanczos_steps=300)
    assert res.warnings == () and res.step == 4 and res.lr == 0.02 and res.beta1 == 0.85
    assert pm.training  # the model was measured through a copy, left as it was
    ref = __import__("copy").deepcopy(pm).double().eval()
    problem, theta = from_peft(ref, ids)
    # P by parameter name: "...<layer>.lora_A.default.weight" -> θ's "<layer>.A"
    by_name = {n.split("base_model.model.", 1)[-1]: p for n, p in pm.named_parameters() if p.requires_grad}
    v = {}
    for a in problem.adapters:
        v[a.key_A] = opt.state[by_name[f"{a.name}.lora_A.default.weight"]]["exp_avg_sq"].double()
        v[a.key_B] = opt.state[by_name[f"{a.name}.lora_B.default.weight"]]["exp_avg_sq"].double()
    P = torch.cat([((v[k] / (1 - 0.995**4)).sqrt() + 1e-7).reshape(-1) for k in problem.theta_layout.names])
    d = P.rsqrt()
    Ht = lora_hessian(problem, theta).to_dense()
    Dm = DriftOperator(problem, theta).to_dense()
    ev, U = torch.linalg.eigh(d[:, None] * Ht * d[None, :])
    assert res.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(Ht)[-1]), rel=1e-8)
    assert res.preconditioned == pytest.approx(float(ev[-1]), rel=1e-8)
    u = U[:, -1]
    assert res.drift_share == pytest.approx(
        float(u @ (d[:, None] * Dm * d[None, :]) @ u), rel=1e-6, abs=1e-8 * float(ev[-1])
    )
    assert res.drift_max == pytest.approx(
        float(torch.linalg.eigvalsh(d[:, None] * Dm * d[None, :])[-1]), rel=1e-8
    )
    assert res.signal_share + res.drift_share == pytest.approx(res.preconditioned, rel=1e-6)


def test_peft_sharpness_refusals():
    from signal_drift.edge import peft_sharpness

    pm = _tiny_peft()
    ids = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="no PEFT LoRA layers"):
        peft_sharpness(torch.nn.Linear(3, 3), torch.optim.Adam(torch.nn.Linear(3, 3).parameters()), ids)
    sgd = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(InputError, match="no Adam state"):
        peft_sharpness(pm, sgd, ids)
    fresh = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad])
    with pytest.raises(InputError, match="no step was taken"):
        peft_sharpness(pm, fresh, ids)


@pytest.fixture(scope="module")
def offline_base(tmp_path_factory):
    from signal_drift.lm import build_base_model

    return build_base_model(tmp_path_factory.mktemp("base") / "model", steps=30, seq_len=32)


def test_sharpness_callback_with_a_real_trainer(offline_base, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from signal_drift.edge import SharpnessCallback
    from signal_drift.lm import load_model

    model = peft.get_peft_model(load_model(offline_base, dtype=torch.float32),
                                peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows = [torch.randint(0, vocab, (16,), generator=gen) for _ in range(8)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                          learning_rate=5e-3, weight_decay=0.0)  # fmt: skip
    cb = SharpnessCallback(torch.stack(rows[:2]), every=2, early=1, lanczos_steps=60, warn_at=0.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    with pytest.warns(UserWarning, match="of Adam's edge") as caught:
        trainer.train()
    warned = [str(w.message) for w in caught if "of Adam's edge" in str(w.message)]
    assert len(warned) == 1 and warned[0].startswith("step 2:")  # once, and never at step 0 (P_A = ε)
    assert [r.step for r in cb.records] == [0, 2]  # before updates 0 (early) and 2 (every 2)
    # η is the rate the update being taken uses (linear decay from 5e-3 over 4 updates)
    assert [r.lr for r in cb.records] == pytest.approx([5e-3, 5e-3 * 2 / 4])
    for r in cb.records:
        assert math.isfinite(r.preconditioned) and r.preconditioned > 0 and math.isfinite(r.drift_fraction)
        assert r.edge_ratio == pytest.approx(r.lr * r.preconditioned / 38.0)
    logged = [h for h in trainer.state.log_history if "sharpness/edge_ratio" in h]
    assert [h["step"] for h in logged] == [0, 2]
    assert logged[-1]["sharpness/edge_ratio"] == cb.records[-1].edge_ratio
    with pytest.raises(InputError, match="every"):
        SharpnessCallback(torch.stack(rows[:2]), every=0)
