"""Offline text and tokens for the language-model path (``signal_drift.lm``)."""

import torch

from signal_drift.lm import ByteTokenizer, NextTokenLoss, next_token_nll, offline_text


def test_offline_domains_are_real_text():
    a, b = offline_text("pydoc"), offline_text("docstrings")
    assert len(a) > 100_000 and len(b) > 100_000 and a[:200] != b[:200]
    assert ByteTokenizer().decode(ByteTokenizer().encode(b[:500])) == b[:500]


def _tiny_lora(seed: int = 0):
    """The offline tiny Llama (random weights) under LoRA r = 4 with B ≠ 0 (so every adapter has a gradient)."""
    import pytest

    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from signal_drift.lm import tiny_llama_config

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(tiny_llama_config(32))
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_the_chunked_loss_equals_the_whole_batch_loss_and_its_gradients():
    """Slices of 13 positions (not a divisor of 2 × 32) give the loss and LoRA gradients of the whole batch."""
    model = _tiny_lora()
    x = torch.randint(0, ByteTokenizer.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    whole = next_token_nll(model, x)
    g_whole = torch.autograd.grad(whole, params)
    for chunk in (13, 64, 1000):
        loss = NextTokenLoss(model, chunk)(x)
        torch.testing.assert_close(loss, whole, rtol=1e-6, atol=0)
        for g, ref in zip(torch.autograd.grad(loss, params), g_whole, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
    assert NextTokenLoss(model)(x).item() == whole.item()


def test_the_chunked_loss_never_holds_all_the_logits():
    """No vocabulary-wide activation is saved for backward (the head's weight aside); whole: [B·T, V]."""
    model = _tiny_lora()
    x = torch.randint(0, ByteTokenizer.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    weights = {p.data_ptr() for p in model.parameters()}

    def vocabulary_wide(chunk):
        sizes = [0]

        def pack(t):
            if t.shape[-1:] == (ByteTokenizer.vocab_size,) and t.data_ptr() not in weights:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            NextTokenLoss(model, chunk)(x)
        return max(sizes)

    assert vocabulary_wide(None) == 64 * ByteTokenizer.vocab_size and vocabulary_wide(8) == 0


def test_the_chunked_loss_refuses_a_soft_capped_head():
    import pytest

    from signal_drift import InputError
    from signal_drift.lm import chunked_next_token_nll

    model = _tiny_lora()
    model.get_base_model().config.final_logit_softcapping = 30.0
    with pytest.raises(InputError, match="final_logit_softcapping"):
        chunked_next_token_nll(model, torch.zeros(1, 5, dtype=torch.long), 4)
