"""Per-layer signal/drift of optimizer steps (train.monitor) against the core decomposition."""

import math

import pytest
import torch
from cases import assert_close, mlp_problem, trained_theta

from signal_drift import InputError
from signal_drift.decomposition import decompose_update
from signal_drift.train.monitor import SignalDriftMonitor, lora_step_norms


@pytest.fixture(scope="module")
def step():
    problem = mlp_problem(dim=7, depth=3, rank=3, alpha=5.0)
    theta = trained_theta(problem)  # B != 0, so both signal terms ΔB·A and B·ΔA are present
    gen = torch.Generator().manual_seed(1)
    delta = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    return problem, theta, delta, decompose_update(problem, theta, delta)


def test_norms_equal_the_core_decomposition_per_layer(step):
    problem, theta, delta, ref = step
    for a in problem.adapters:
        n = lora_step_norms(theta[a.key_A], theta[a.key_B], delta[a.key_A], delta[a.key_B], a.scale)
        sig, dri = ref.signal[a.name], ref.drift[a.name]
        assert_close(torch.tensor([n.signal, n.drift, n.cross]),
                     torch.stack([sig.norm(), dri.norm(), (sig * dri).sum()]))  # fmt: skip


def test_signal_plus_drift_is_the_exact_weight_change(step):
    problem, theta, delta, ref = step
    for a in problem.adapters:
        n = lora_step_norms(theta[a.key_A], theta[a.key_B], delta[a.key_A], delta[a.key_B], a.scale)
        assert math.isclose(n.total, float(ref.delta_w[a.name].norm()), rel_tol=1e-10)


def test_at_init_only_db_a_is_signal():
    A, dA, dB = torch.randn(2, 6), torch.randn(2, 6), torch.randn(4, 2)
    n = lora_step_norms(A, torch.zeros(4, 2), dA, dB, 3.0)
    assert math.isclose(n.signal, 3.0 * float((dB @ A).norm()), rel_tol=1e-12)
    assert math.isclose(n.drift, 3.0 * float((dB @ dA).norm()), rel_tol=1e-12)


def test_shape_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="LoRA step"):
        lora_step_norms(torch.zeros(2, 6), torch.zeros(4, 2), torch.zeros(2, 5), torch.zeros(4, 2), 1.0)


def _tiny_peft_llama(dtype=torch.float64):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return peft.get_peft_model(model, lcfg)


def _delta_weights(model):
    return {n.split("base_model.model.", 1)[-1]: m.get_delta_weight("default").detach().clone()
            for n, m in model.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}  # fmt: skip


def test_monitor_on_a_peft_model_matches_peft_delta_weights():
    model = _tiny_peft_llama()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    monitor = SignalDriftMonitor(model)
    for step in range(1, 4):
        before = _delta_weights(model)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        monitor.before_step()
        opt.step()
        norms = monitor.after_step(step)
        after = _delta_weights(model)
        assert set(norms) == set(before) and len(norms) == 6
        for name, n in norms.items():
            assert math.isclose(n.total, float((after[name] - before[name]).norm()), rel_tol=1e-9)
            assert n.signal > 0 and n.drift > 0
    assert [r[0] for r in monitor.history["model.layers.1.mlp.down_proj"]] == [1, 2, 3]
    assert set(monitor.summary()) == {"sdr_median", "signal_median", "drift_median"}


def test_monitor_refuses_a_model_without_lora():
    with pytest.raises(InputError, match="no PEFT LoRA"):
        SignalDriftMonitor(torch.nn.Linear(3, 3))


def test_trainer_callback_logs_every_step(tmp_path):
    transformers = pytest.importorskip("transformers")
    from signal_drift.train.monitor import SignalDriftCallback

    model = _tiny_peft_llama(torch.float32)
    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": (ids := torch.randint(0, 50, (12,), generator=gen)), "labels": ids} for _ in range(8)
    ]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                          learning_rate=1e-2)  # fmt: skip
    cb = SignalDriftCallback()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()
    rows = cb.monitor.history["model.layers.0.self_attn.q_proj"]
    assert [r[0] for r in rows] == [1, 2, 3] and all(s > 0 for _, s, _ in rows)
    # B = 0 at init makes ∇_A L = 0, so (no weight decay) the first step moves only B: no drift.
    assert rows[0][2] == 0 and rows[1][2] > 0 and rows[2][2] > 0
    logged = [h["sdr_median"] for h in trainer.state.log_history if "sdr_median" in h]
    assert len(logged) >= 3 and logged[0] == math.inf and all(math.isfinite(v) and v > 0 for v in logged[1:])
