"""LoRA-α through PEFT on a tiny Llama built locally (no hub): every rule's effective scale,
read back from the wrapped modules, equals the single formula of signal_drift.scaling."""

import math

import pytest
import torch
from cases import UNIFORM_KURTOSIS, sample_variance_se

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from signal_drift import InputError  # noqa: E402
from signal_drift.scaling import Rule  # noqa: E402
from signal_drift.scaling.peft import (  # noqa: E402
    effective_scales,
    expected_scales,
    lora_alpha_config,
    loraplus_param_groups,
)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("rule", [r.value for r in Rule])
@pytest.mark.parametrize("init", ["kaiming_uniform", "gaussian"])
def test_peft_scaling_equals_the_single_formula(rule, init):
    model = tiny_llama()
    want = expected_scales(model, rule, 4, gamma=2.0, init=init)
    cfg = lora_alpha_config(model, rule, 4, gamma=2.0, init=init)
    got = effective_scales(peft.get_peft_model(model, cfg))
    assert set(got) == set(want) and len(got) == 14
    for name in want:
        assert math.isclose(got[name], want[name], rel_tol=1e-12), name


def test_variant_ii_alpha_pattern_is_sqrt_3_fan_in_r_under_kaiming_uniform():
    model = tiny_llama()
    cfg = lora_alpha_config(model, "variant2", 4)
    assert cfg.alpha_pattern["model.layers.0.self_attn.q_proj"] == pytest.approx(math.sqrt(3 * 32 * 4))
    assert cfg.alpha_pattern["model.layers.1.mlp.down_proj"] == pytest.approx(math.sqrt(3 * 48 * 4))
    assert cfg.use_rslora is False


def test_variant_i_is_rslora_with_alpha_256():
    cfg = lora_alpha_config(tiny_llama(), "variant1", 16, target_modules=["q_proj"])
    assert cfg.use_rslora and cfg.lora_alpha == 256.0
    assert effective_scales(peft.get_peft_model(tiny_llama(), cfg))["model.layers.0.self_attn.q_proj"] == 64.0


def test_forward_pass_applies_the_scale():
    model = tiny_llama()
    s = expected_scales(model, "variant2", 2, target_modules=["q_proj"])["model.layers.0.self_attn.q_proj"]
    pm = peft.get_peft_model(model, lora_alpha_config(model, "variant2", 2, target_modules=["q_proj"]))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + s * x @ A.T @ B.T)


def test_peft_gaussian_init_has_the_variance_variant_ii_assumes():
    model = tiny_llama()
    pm = peft.get_peft_model(model, lora_alpha_config(model, "variant2", 4, init="gaussian"))
    A = torch.cat(
        [
            m.lora_A["default"].weight.flatten()
            for m in pm.modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A
        ]
    )
    se = math.sqrt(2 / A.numel()) / 16
    assert abs(A.var().item() - 1 / 16) < 5 * se


def test_peft_default_init_is_kaiming_uniform_with_variance_one_over_3n():
    # PEFT's default lora_A init, grouped by fan-in n: U(−1/√n, 1/√n), so σ² = 1/(3n)
    model = tiny_llama()
    pm = peft.get_peft_model(model, lora_alpha_config(model, "rank", 16))
    by_n = {}
    for m in pm.modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            A = m.lora_A["default"].weight.detach()
            by_n.setdefault(A.shape[1], []).append(A.flatten())
    assert sorted(by_n) == [32, 48]
    for n, parts in by_n.items():
        A, sigma2 = torch.cat(parts), 1 / (3 * n)
        assert A.abs().max() <= 1 / math.sqrt(n)
        assert abs(A.var().item() - sigma2) < 4 * sample_variance_se(sigma2, A.numel(), UNIFORM_KURTOSIS)


def test_loraplus_groups_scale_only_b():
    model = tiny_llama()
    pm = peft.get_peft_model(model, lora_alpha_config(model, "rank", 4))
    groups = loraplus_param_groups(pm, 1e-4, ratio=16)
    assert groups[1]["lr"] == 16e-4 and len(groups[1]["params"]) == 14
    assert all(p.shape[1] == 4 for p in groups[1]["params"])  # B is [m, r]
    torch.optim.AdamW(groups)


def test_rank_larger_than_a_layer_is_rejected():
    with pytest.raises(InputError, match=r"rank .*1\.\.32"):
        lora_alpha_config(tiny_llama(), "variant1", 40)
