"""signal_drift.hf: Hugging Face causal LMs and PEFT adapters as LoRA problems.

Every curvature product of the engine is checked against a dense reference built here from
scratch: ``torch.func`` Hessians and Jacobians of a scalar function written in this file (the
model through ``functional_call`` with ``W = W0 + (α/r) B A``, transposed for GPT-2's ``Conv1D``,
logits into a shifted float64 cross-entropy), with the float64 RMSNorm, rotary embeddings and
softmax written here from their formulas (``transformers`` computes them in float32).
"""

import contextlib
import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from cases import assert_close, compare_matmat, dense_curvature
from torch import nn
from torch.func import functional_call, hessian

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import transformers.models.gpt2.modeling_gpt2 as modeling_gpt2  # noqa: E402
import transformers.models.llama.modeling_llama as modeling_llama  # noqa: E402
import transformers.models.qwen2.modeling_qwen2 as modeling_qwen2  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402
from transformers.utils import ModelOutput  # noqa: E402

import signal_drift.hf  # noqa: E402
from signal_drift import InputError  # noqa: E402
from signal_drift.decomposition import block_indices, curvature  # noqa: E402
from signal_drift.hf import float64_forward, from_peft, lm_batches, lm_problem  # noqa: E402
from signal_drift.lm import causal_lm_loss  # noqa: E402
from signal_drift.lora import Batch, attach_lora, init_theta  # noqa: E402

VOCAB = 20


# -- tiny models (built locally, float64, default attention: sdpa) ----------------------------------
def _tiny_gqa(config_cls, model_cls, seed):
    """1 layer, hidden 8, 4 query heads sharing 2 kv heads (GQA), float64."""
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return model_cls(cfg).double()


def tiny_llama(seed=0):
    return _tiny_gqa(transformers.LlamaConfig, transformers.LlamaForCausalLM, seed)


def tiny_qwen2(seed=0):  # q, k, v with biases
    return _tiny_gqa(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, seed)


def tiny_gpt2(seed=0):
    """GPT-2 with its default dropout (0.1): left in training mode, the engine must evaluate in eval mode."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=8, n_inner=8, n_layer=1, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).double()


@dataclass(frozen=True)
class Arch:
    build: object
    targets: tuple
    lib: object  # the modeling module
    norm: str | None = None  # its RMSNorm class (float32 inside transformers)
    rotary: str | None = None  # its rotary embedding class (float32 inside transformers)


ARCHS = {
    "llama": Arch(tiny_llama, ("q_proj", "v_proj", "down_proj"), modeling_llama, "LlamaRMSNorm",
                  "LlamaRotaryEmbedding"),
    "gpt2": Arch(tiny_gpt2, ("c_attn", "c_fc", "c_proj"), modeling_gpt2),
    "qwen2": Arch(tiny_qwen2, ("q_proj", "k_proj", "up_proj"), modeling_qwen2, "Qwen2RMSNorm",
                  "Qwen2RotaryEmbedding"),
}  # fmt: skip


def sequences(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


# -- the float64 reference forward, from the formulas ------------------------------------------------
def _rms_norm(self, h):  # w · h / sqrt(mean(h²) + ε), in h's dtype
    return self.weight * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def _rotary(self, x, position_ids):  # angles p·θ_i, duplicated over the two halves
    angles = position_ids.to(x.dtype)[:, :, None] * self.inv_freq.to(x.dtype)[None, None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling


def _softmax_attention(repeat_kv):
    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = repeat_kv(key, module.num_key_value_groups)
        value = repeat_kv(value, module.num_key_value_groups)
        scores = query @ key.transpose(-1, -2) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[..., : key.shape[-2]]
        weights = torch.softmax(scores, dim=-1)
        return (weights @ value).transpose(1, 2), weights

    return attention


@contextlib.contextmanager
def reference_forward(model, arch: Arch):
    """``model`` in eval mode, eager attention, and (Llama, Qwen2) float64 RMSNorm, rotary and softmax."""
    modes = [(m, m.training) for m in model.modules()]
    old = model.config._attn_implementation
    with contextlib.ExitStack() as stack:
        if arch.norm is not None:
            stack.enter_context(mock.patch.object(getattr(arch.lib, arch.norm), "forward", _rms_norm))
            stack.enter_context(mock.patch.object(getattr(arch.lib, arch.rotary), "forward", _rotary))
            attention = _softmax_attention(arch.lib.repeat_kv)
            stack.enter_context(mock.patch.object(arch.lib, "eager_attention_forward", attention))
        model.eval()
        model.config._attn_implementation = "eager"
        try:
            yield
        finally:
            model.config._attn_implementation = old
            for m, training in modes:
                m.training = training


def nll_sum(logits, labels):
    """Shifted next-token NLL in float64: (sum over scored positions, number of scored positions)."""
    logp = torch.log_softmax(logits[:, :-1].to(torch.float64), dim=-1)
    y = labels[:, 1:]
    scored = y != -100
    nll = -logp.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return (nll * scored).sum(), int(scored.sum())


def lora_params(model, theta, scale):
    """The model's parameters with every adapted ``W`` replaced by ``W0 + scale · B A``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    for key_A in [k for k in theta if k.endswith(".lora_A")]:
        name = key_A.removesuffix(".lora_A")
        W = params[f"{name}.weight"]
        conv = isinstance(dict(model.named_modules())[name], Conv1D)
        delta = scale * theta[f"{name}.lora_B"] @ theta[key_A]
        params[f"{name}.weight"] = W + (delta.T if conv else delta)
    return params


def reference_loss(model, batches, params=None, arch=None):
    """The float64 loss of all ``batches`` at once: total NLL over total scored positions."""
    params = {k: v.detach() for k, v in model.named_parameters()} if params is None else params
    total, count = 0.0, 0
    ctx = reference_forward(model, arch) if arch is not None else contextlib.nullcontext()
    with ctx:
        for b in batches:
            out = functional_call(model, params, (), dict(b.inputs))
            s, n = nll_sum(out.logits, b.targets)
            total, count = total + s, count + n
    return total / count


@dataclass(frozen=True)
class DenseLM:
    """Dense curvature at ``θ``; flat ``θ``: per layer ``A`` then ``B``, row-major; flat ``w``: each ``W``."""

    H: torch.Tensor  # ∇²_w L
    g: torch.Tensor  # ∇_w L
    H_theta: torch.Tensor  # ∇²_θ L(w(θ))
    J: torch.Tensor  # ∂w/∂θ
    signal: torch.Tensor  # Jᵀ H J
    drift: torch.Tensor  # Hessian of θ ↦ ⟨g, w(θ)⟩, g fixed
    loss: float
    slices: dict  # {(layer, "A" | "B"): slice of flat θ}


def dense_lm_reference(model, arch, batches, layers, scale, theta) -> DenseLM:
    """``layers``: adapted module names in θ's order; ``scale``: α / r (the same for every layer)."""
    mods = dict(model.named_modules())
    conv = {n: isinstance(mods[n], Conv1D) for n in layers}
    W0 = {n: mods[n].weight.detach().T if conv[n] else mods[n].weight.detach() for n in layers}
    base = {k: v.detach() for k, v in model.named_parameters()}
    t_shapes, slices, i = [], {}, 0
    for n in layers:
        m, k = W0[n].shape
        r = theta[f"{n}.lora_A"].shape[0]
        for which, shape in (("A", (r, k)), ("B", (m, r))):
            t_shapes.append(shape)
            slices[n, which] = slice(i, i + math.prod(shape))
            i += math.prod(shape)

    def w_of(t):
        out = []
        for n in layers:
            A = t[slices[n, "A"]].reshape(t_shapes[2 * layers.index(n)])
            B = t[slices[n, "B"]].reshape(t_shapes[2 * layers.index(n) + 1])
            out.append((W0[n] + scale * B @ A).reshape(-1))
        return torch.cat(out)

    def loss_w(w):
        params, j = dict(base), 0
        for n in layers:
            W = w[j : j + W0[n].numel()].reshape(W0[n].shape)
            params[f"{n}.weight"] = W.T if conv[n] else W
            j += W0[n].numel()
        return reference_loss(model, batches, params, arch)

    t0 = torch.cat([theta[f"{n}.lora_{x}"].detach().reshape(-1) for n in layers for x in "AB"])
    return DenseLM(**dense_curvature(loss_w, w_of, t0), loss=float(loss_w(w_of(t0))), slices=slices)


def off_init(problem, seed=1, b_scale=0.4):
    """``init_theta`` plus noise: a point with ``B ≠ 0``."""
    gen = torch.Generator().manual_seed(seed)
    theta = init_theta(problem, seed)
    return {k: v + (b_scale if k.endswith("lora_B") else 0.1) * torch.randn(v.shape, generator=gen)
            for k, v in theta.items()}  # fmt: skip


def assert_dense(op, M, rtol=1e-10):
    """``op`` applied to the identity equals ``M`` entrywise (round-off scale: the largest entry of ``M``)."""
    assert_close(op.matmat(torch.eye(op.shape[1])), M, rtol=rtol, atol=1e-13 * float(M.abs().max()))


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# -- 1. three architectures against the dense reference ---------------------------------------------
RANK, ALPHA = 2, 3.0


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_case(request):
    arch = ARCHS[request.param]
    model = arch.build()
    assert model.config._attn_implementation == "sdpa"
    seen = []
    batches = lm_batches(sequences((7, 5, 6)), batch_size=2)  # ragged, two batches
    # construction also runs the model's own (sdpa) forward once, to check the problem reproduces it
    problem = lm_problem(model, batches, targets=arch.targets, rank=RANK, alpha=ALPHA)
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod.config._attn_implementation))
             for m in model.modules() if type(m).__name__.endswith("Attention")]  # fmt: skip
    theta = off_init(problem)
    c = curvature(problem, theta)
    problem.loss(theta)
    for h in hooks:
        h.remove()
    layers = [a.name for a in problem.adapters]
    ref = dense_lm_reference(model, arch, batches, layers, ALPHA / RANK, theta)
    return request.param, model, problem, theta, c, ref, seen


def test_every_engine_forward_is_eager_and_the_model_is_left_as_loaded(arch_case):
    name, model, problem, *_, seen = arch_case
    assert seen and set(seen) == {"eager"}  # loaded with sdpa: every forward of the engine ran eager
    assert model.config._attn_implementation == "sdpa"
    assert model.training  # the user's mode is restored (the engine ran in eval mode)
    expected = {"llama": 3, "gpt2": 4, "qwen2": 3}[name]  # GPT-2: "c_proj" is attn.c_proj and mlp.c_proj
    assert len(problem.adapters) == expected
    assert all(a.transposed == (name == "gpt2") for a in problem.adapters)


def test_operators_equal_the_dense_reference(arch_case):
    _, model, problem, theta, c, ref, _ = arch_case
    assert all(theta[a.key_B].abs().max() > 0.1 for a in problem.adapters)
    assert math.isclose(problem.loss(theta), ref.loss, rel_tol=1e-13)
    assert_close(problem.weight_layout.flatten(c.g), ref.g, atol=1e-14 * float(ref.g.abs().max()))
    for op, M in ((c.H, ref.H), (c.H_theta, ref.H_theta), (c.J, ref.J), (c.signal, ref.signal),
                  (c.drift, ref.drift)):  # fmt: skip
        assert_dense(op, M)
        compare_matmat(op, M, k=3)
    assert_close(c.J.rmatmat(torch.eye(c.J.shape[0])), ref.J.T, atol=1e-15)


def test_prop1_identity_and_signal_is_jt_h_j(arch_case):
    _, model, problem, theta, c, ref, _ = arch_case
    P = c.H_theta.shape[0]
    H_theta, signal, drift = (op.matmat(torch.eye(P)) for op in (c.H_theta, c.signal, c.drift))
    assert rel(signal + drift, H_theta) <= 1e-12  # measured ~2e-16
    assert rel(ref.signal + ref.drift, ref.H_theta) <= 1e-12  # the reference's own Prop 1
    assert_close(signal, ref.J.T @ ref.H @ ref.J, atol=1e-13 * float(ref.signal.abs().max()))


def test_per_layer_blocks(arch_case):
    _, model, problem, theta, c, ref, _ = arch_case
    for a in problem.adapters:
        sA, sB = ref.slices[a.name, "A"], ref.slices[a.name, "B"]
        iA, iB = block_indices(problem, "A", a.name), block_indices(problem, "B", a.name)
        assert iA.tolist() == list(range(sA.start, sA.stop)) and iB.tolist() == list(range(sB.start, sB.stop))
        assert_dense(c.H_theta.restrict(iB), ref.H_theta[sB, sB])
        compare_matmat(c.H_theta.restrict(iA, iB), ref.H_theta[sA, sB], k=2)
        compare_matmat(c.drift.restrict(iA, iB), ref.drift[sA, sB], k=2)
        assert not c.drift.restrict(iA).matmat(torch.eye(iA.numel())).any()  # the drift couples A only to B


# -- 2. data: ragged batches, SFT masks, fully masked batches --------------------------------------
SFT_LENGTHS, SFT_PROMPTS = (7, 4, 6, 3, 5), (3, 1, 2, 1, 4)


def sft_data(batch_size=None):
    seqs = sequences(SFT_LENGTHS, seed=3)
    labels = [s.clone() for s in seqs]
    for lab, p in zip(labels, SFT_PROMPTS, strict=True):
        lab[:p] = -100  # response-only: the prompt is not scored
    return lm_batches(seqs, batch_size, labels=labels)


@pytest.fixture(scope="module")
def llama_sft():
    model = tiny_llama(seed=2)
    one = lm_problem(model, sft_data(), targets=("q_proj", "o_proj", "up_proj"), rank=2, alpha=5.0)
    theta = off_init(one, seed=4)
    V = torch.randn(one.theta_layout.numel, 3, generator=torch.Generator().manual_seed(5))
    return model, one, theta, V, one.loss(theta), curvature(one, theta).H_theta.matmat(V)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_ragged_batches_equal_one_big_batch(llama_sft, batch_size):
    model, one, theta, V, loss, HV = llama_sft
    batches = sft_data(batch_size)
    assert len(batches) == math.ceil(5 / batch_size)
    assert sum(causal_lm_loss.weight(b.targets) for b in batches) == sum(
        n - p for n, p in zip(SFT_LENGTHS, SFT_PROMPTS, strict=True)
    )  # the prompts are not scored, nor is position 0
    problem = lm_problem(model, batches, targets=("q_proj", "o_proj", "up_proj"), rank=2, alpha=5.0)
    assert math.isclose(problem.loss(theta), loss, rel_tol=1e-13)
    ref = reference_loss(model, batches, lora_params(model, theta, 5.0 / 2), ARCHS["llama"])
    assert math.isclose(loss, float(ref), rel_tol=1e-13)
    assert_close(
        curvature(problem, theta).H_theta.matmat(V), HV, rtol=1e-12, atol=1e-13 * float(HV.abs().max())
    )


def test_a_fully_masked_batch_contributes_nothing(llama_sft):
    model, one, theta, V, loss, HV = llama_sft
    seq = sequences((6,), seed=9)
    masked = lm_batches(seq, labels=[torch.full((6,), -100)])
    # labels scored only at position 0: nothing to predict there either (the shift drops it)
    first_only = lm_batches(seq, labels=[torch.tensor([seq[0][0]] + [-100] * 5)])
    for extra in (masked, first_only):
        data = extra + sft_data(2) + extra
        problem = lm_problem(model, data, targets=("q_proj", "o_proj", "up_proj"), rank=2, alpha=5.0)
        assert len(problem.batches) == 5
        assert math.isclose(problem.loss(theta), loss, rel_tol=1e-13)
        HV2 = curvature(problem, theta).H_theta.matmat(V)
        assert_close(HV2, HV, rtol=1e-12, atol=1e-13 * float(HV.abs().max()))


def test_all_masked_data_is_refused():
    model = tiny_llama()
    seqs = sequences((5, 4))
    for labels in ([torch.full((5,), -100), torch.full((4,), -100)], [s.clone() for s in seqs]):
        for lab in labels:
            lab[1:] = -100  # only position 0 left, which nothing predicts
        with pytest.raises(InputError, match="no scored target") as err:
            lm_problem(model, lm_batches(seqs, 1, labels=labels), targets=("q_proj",), rank=2)
        assert "\n" not in str(err.value)


# -- 3. from_peft ---------------------------------------------------------------------------------------
PEFT_CASES = {
    # name: (arch, LoraConfig kwargs, {target suffix: expected scale from the config, written out})
    "plain": ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
              {"q_proj": 16 / 4, "v_proj": 16 / 4, "down_proj": 16 / 4}),
    "rslora": ("llama", dict(r=4, lora_alpha=16, use_rslora=True,
                             target_modules=["q_proj", "v_proj", "down_proj"]),
               {"q_proj": 16 / 2, "v_proj": 16 / 2, "down_proj": 16 / 2}),
    "patterns": ("qwen2", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 6}),
                 {"q_proj": 16 / 4, "v_proj": 16 / 2, "down_proj": 6 / 4}),
    "gpt2_fan_in_fan_out": ("gpt2", dict(r=2, lora_alpha=5, fan_in_fan_out=True,
                                         target_modules=["c_attn", "c_fc", "c_proj"]),
                            {"c_attn": 5 / 2, "c_fc": 5 / 2, "c_proj": 5 / 2}),
}  # fmt: skip


def peft_model(arch_name, seed=0, steps=0, data=None, **config):
    """A PEFT model on a tiny base after ``steps`` AdamW epochs on ``data`` (B moves off 0), in eval mode."""
    base = ARCHS[arch_name].build(seed)
    fresh_base = copy.deepcopy(base)
    pm = peft.get_peft_model(base, peft.LoraConfig(**config))
    if steps:
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.05)
        pm.train()
        for _ in range(steps):
            for b in data:
                opt.zero_grad()
                pm(**b.inputs, labels=b.targets).loss.backward()
                opt.step()
    pm.eval()
    return pm, fresh_base


def lora_layers(pm):
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}  # fmt: skip


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_from_peft_reads_scales_weights_and_loss(case):
    arch_name, config, expected = PEFT_CASES[case]
    data = lm_batches(sequences((6, 5, 7), seed=1), batch_size=2)
    pm, fresh_base = peft_model(arch_name, steps=3, data=data, **config)
    problem, theta = from_peft(pm, data)
    layers = lora_layers(pm)
    assert [a.name for a in problem.adapters] == list(layers)
    assert len(layers) == (4 if arch_name == "gpt2" else 3)
    for a in problem.adapters:
        mod = layers[a.name]
        want = next(s for t, s in expected.items() if a.name.endswith("." + t))
        assert math.isclose(a.scale, mod.scaling["default"], rel_tol=1e-12)
        assert math.isclose(a.scale, want, rel_tol=1e-12), (a.name, a.scale, want)
        assert a.transposed == (arch_name == "gpt2")
        assert torch.equal(theta[a.key_A], mod.lora_A["default"].weight.detach())
        assert torch.equal(theta[a.key_B], mod.lora_B["default"].weight.detach())
        assert theta[a.key_B].abs().max() > 1e-3  # trained: B ≠ 0
    # the PEFT model's own forward (its LoRA branch x Aᵀ Bᵀ s), at float64 precision
    with reference_forward(pm.get_base_model(), ARCHS[arch_name]), torch.no_grad():
        total, count = 0.0, 0
        for b in data:
            s, n = nll_sum(pm(**b.inputs).logits, b.targets)
            total, count = total + s, count + n
    assert math.isclose(problem.loss(theta), float(total / count), rel_tol=1e-12)
    # the same adapter as a fresh lm_problem on the untouched base: the same H_θ
    ranks = {a.name: a.rank for a in problem.adapters}
    alphas = {a.name: next(s for t, s in expected.items() if a.name.endswith("." + t)) * a.rank
              for a in problem.adapters}  # fmt: skip
    twin = lm_problem(fresh_base, data, targets=list(layers), rank=config["r"], rank_pattern=ranks,
                      alpha_pattern=alphas)  # fmt: skip
    assert [(a.name, a.rank, a.transposed) for a in twin.adapters] == [
        (a.name, a.rank, a.transposed) for a in problem.adapters
    ]
    assert math.isclose(twin.loss(theta), problem.loss(theta), rel_tol=1e-12)
    V = torch.randn(problem.theta_layout.numel, 3, generator=torch.Generator().manual_seed(0))
    HV = curvature(problem, theta).H_theta.matmat(V)
    assert_close(curvature(twin, theta).H_theta.matmat(V), HV, rtol=1e-12, atol=1e-13 * float(HV.abs().max()))


# -- 4. refusals ------------------------------------------------------------------------------------------
def _merged(pm):
    pm.merge_adapter()


def _training_with_dropout(pm):
    pm.train()


def _second_adapter_active(pm):
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.base_model.set_adapter(["default", "other"])


def _other_adapter_active(pm):
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.set_adapter("other")


REFUSALS = {
    "dora": (dict(use_dora=True), None, {}, "use_dora"),
    "activated_lora": (dict(alora_invocation_tokens=[3]), None, {}, "alora"),
    "two_active_adapters": ({}, _second_adapter_active, {"adapter": "default"}, "active adapters"),
    "reading_an_inactive_adapter": ({}, _other_adapter_active, {"adapter": "default"}, "active adapters"),
    "lora_bias": (dict(lora_bias=True), None, {}, "lora_bias"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), None, {}, "modules_to_save"),
    "embedding_only": (dict(target_modules=["embed_tokens"]), None, {}, "embedding"),
    "embedding_and_linear": (dict(target_modules=["embed_tokens", "q_proj"]), None, {}, "embedding"),
    "merged": ({}, _merged, {}, "merged"),
    "dropout_in_training_mode": (dict(lora_dropout=0.1), _training_with_dropout, {}, "lora_dropout"),
    "unknown_adapter": ({}, None, {"adapter": "nope"}, "'nope'"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_from_peft_refuses_what_the_decomposition_does_not_cover(case):
    config, action, kwargs, needle = REFUSALS[case]
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]} | config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lora_bias: PEFT warns that the base layer has no bias to merge into
        pm, _ = peft_model("llama", **config)
    if action is not None:
        action(pm)
    with pytest.raises(InputError, match=needle) as err:
        from_peft(pm, lm_batches(sequences((5, 4))), **kwargs)
    assert "\n" not in str(err.value)


def test_dropout_in_eval_mode_is_accepted_and_deterministic():
    pm, _ = peft_model("llama", r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.5)
    problem, theta = from_peft(pm, lm_batches(sequences((5, 4))))
    assert problem.loss(theta) == problem.loss(theta)


def test_sequences_of_one_token_are_refused():
    pm, _ = peft_model("llama", r=2, lora_alpha=4, target_modules=["q_proj"])
    for data in (torch.tensor([[3], [4]]), [torch.tensor([1, 2, 3]), torch.tensor([5])]):
        with pytest.raises(InputError, match="shorter than 2 tokens") as err:
            from_peft(pm, data if isinstance(data, torch.Tensor) else lm_batches(data))
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="shorter than 2 tokens"):
        lm_problem(tiny_llama(), torch.tensor([[3], [4]]), targets=("q_proj",), rank=2)


# -- 5. the precision trap, measured ---------------------------------------------------------------------
@contextlib.contextmanager
def _eager_only(model):
    """``float64_forward`` without its float64 fixes: eager attention, transformers' float32 internals."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    old = {k: c._attn_implementation for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = "eager"
    try:
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = old[k]


@pytest.fixture(scope="module")
def llama_precision():
    """A tiny Llama, a point, its dense float64 reference, and the engine without float64_forward."""
    model = tiny_llama(seed=5)
    batches = lm_batches(sequences((7, 6), seed=6))
    targets = ("q_proj", "k_proj", "o_proj")

    def build():
        return lm_problem(model, batches, targets=targets, rank=2, alpha=4.0)

    problem = build()
    theta = off_init(problem, seed=7)
    ref = dense_lm_reference(model, ARCHS["llama"], batches, [a.name for a in problem.adapters], 2.0, theta)
    with mock.patch.object(signal_drift.hf, "float64_forward", _eager_only):
        naive = build()
        c_naive = curvature(naive, theta)
        naive_loss = naive.loss(theta)
        P = c_naive.H_theta.shape[0]
        Ht_naive = c_naive.H_theta.matmat(torch.eye(P))
        residual_naive = rel(
            c_naive.signal.matmat(torch.eye(P)) + c_naive.drift.matmat(torch.eye(P)), Ht_naive
        )
    return problem, theta, ref, naive_loss, Ht_naive, residual_naive


def test_float32_internals_break_the_identities_float64_forward_restores_them(llama_precision):
    problem, theta, ref, naive_loss, Ht_naive, residual_naive = llama_precision
    # Without float64_forward (transformers' float32 RMSNorm, rotary and softmax in a float64 model),
    # measured (torch 2.13, transformers 5.24): H_θ vs the float64 reference 7.4e-7 (max-relative),
    # loss 4.9e-10 relative. The Prop 1 residual stays at 1.1e-16: H_θ, JᵀHJ and the drift are all
    # exact derivatives of the same float32-rounded graph, so the identity cannot detect the trap;
    # only an independent float64 reference does.
    assert rel(Ht_naive, ref.H_theta) > 1e-10
    assert residual_naive <= 1e-12
    assert abs(naive_loss - ref.loss) > 1e-11 * abs(ref.loss)
    # With it, measured: H_θ vs the reference 2.5e-15, Prop 1 residual 1.1e-16, loss 2.9e-16.
    c = curvature(problem, theta)
    P = c.H_theta.shape[0]
    Ht = c.H_theta.matmat(torch.eye(P))
    assert rel(Ht, ref.H_theta) <= 1e-12
    assert rel(c.signal.matmat(torch.eye(P)) + c.drift.matmat(torch.eye(P)), Ht) <= 1e-12
    assert math.isclose(problem.loss(theta), ref.loss, rel_tol=1e-13)


def test_float64_forward_restores_the_model_on_exit():
    model = tiny_llama()
    norm, rotary = model.model.norm, model.model.rotary_emb
    with float64_forward(model):
        assert model.config._attn_implementation == "eager"
        assert "forward" in vars(norm) and "forward" in vars(rotary)
        assert modeling_llama.eager_attention_forward is not _original_llama_eager
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in vars(norm) and "forward" not in vars(rotary)
    assert modeling_llama.eager_attention_forward is _original_llama_eager


_original_llama_eager = modeling_llama.eager_attention_forward


def test_hf_builtin_loss_is_float32_ours_is_float64():
    model = tiny_gpt2(seed=3).eval()
    (batch,) = lm_batches(sequences((7, 5, 6), seed=8))
    with torch.no_grad():
        out = model(**batch.inputs, labels=batch.targets)
    s, n = nll_sum(out.logits, batch.targets)
    ref = float(s / n)
    ours = float(causal_lm_loss(out.logits, batch.targets))
    assert out.logits.dtype == torch.float64
    assert abs(ours - ref) <= 1e-14 * ref
    # transformers (5.24) still casts the logits to float32 in ForCausalLMLoss: measured 4.0e-9 relative
    # (ours: 0.0)
    assert abs(float(out.loss) - ref) > 1e-10 * ref
    assert abs(float(out.loss) - ref) < 1e-5 * ref


# -- 6. generic attach_lora: dict inputs, ModelOutput and tuple outputs -------------------------------
@dataclass
class _Out(ModelOutput):
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


class _Net(nn.Module):
    def __init__(self, output):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.inp, self.out, self.output = nn.Linear(3, 5), nn.Linear(5, 2), output
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / 2)

    def forward(self, x, gate):
        h = torch.tanh(self.inp(x)) * gate
        y = self.out(h)
        return {"model_output": _Out(logits=y, hidden=h), "tuple": (y, h), "tensor": y}[self.output]


@pytest.mark.parametrize("output", ["model_output", "tuple", "tensor"])
def test_attach_lora_with_dict_inputs_and_structured_outputs(output):
    gen = torch.Generator().manual_seed(1)
    net = _Net(output)
    X, G, Y = (
        torch.randn(9, 3, generator=gen),
        torch.rand(9, 1, generator=gen) + 0.5,
        torch.randn(9, 2, generator=gen),
    )
    data = [{"x": X[:4], "gate": G[:4], "labels": Y[:4]}, Batch({"x": X[4:], "gate": G[4:]}, Y[4:])]
    problem = attach_lora(net, data=data, rank=2, alpha=3.0)
    theta = off_init(problem, seed=2)

    def loss(t):  # ½ mean ‖f − y‖² over all 9 rows, W = W0 + (α/r) B A written out
        A1, B1, A2, B2 = (
            t[:6].reshape(2, 3),
            t[6:16].reshape(5, 2),
            t[16:26].reshape(2, 5),
            t[26:].reshape(2, 2),
        )
        h = torch.tanh(X @ (net.inp.weight + 1.5 * B1 @ A1).T + net.inp.bias) * G
        f = h @ (net.out.weight + 1.5 * B2 @ A2).T + net.out.bias
        return 0.5 * ((f - Y) ** 2).sum(-1).mean()

    t0 = torch.cat([theta[k].reshape(-1) for k in ("inp.lora_A", "inp.lora_B", "out.lora_A", "out.lora_B")])
    assert math.isclose(problem.loss(theta), float(loss(t0).detach()), rel_tol=1e-13)
    c = curvature(problem, theta)
    H = hessian(loss)(t0.detach()).detach()
    assert_dense(c.H_theta, H)
    assert rel(c.signal.matmat(torch.eye(30)) + c.drift.matmat(torch.eye(30)), H) <= 1e-12


def test_lm_problem_targets_full_names_and_top_level_layers():
    """PEFT's target_modules match a suffix or the full name; ``lm_head`` has no parent module."""
    model = tiny_llama()
    data = lm_batches(sequences((5, 4)))
    by_suffix = lm_problem(model, data, targets=("q_proj", "lm_head"), rank=2)
    by_name = lm_problem(model, data, targets=("model.layers.0.self_attn.q_proj", "lm_head"), rank=2)
    assert [a.name for a in by_name.adapters] == [a.name for a in by_suffix.adapters]
    assert [a.name for a in by_suffix.adapters] == ["model.layers.0.self_attn.q_proj", "lm_head"]
    for bad in (("embed_tokens",), ("nope",), ("self_attn",)):
        with pytest.raises(InputError, match="match no linear layer"):
            lm_problem(model, data, targets=bad, rank=2)


def test_a_tied_output_layer_is_refused_not_a_key_error():
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2)
    )
    with pytest.raises(InputError, match="tied"):
        lm_problem(model.double(), lm_batches(sequences((5, 4))), targets=("lm_head",), rank=2)


def test_families_we_do_not_patch_keep_their_own_forward():
    """Gemma-2 soft-caps its attention scores: the float64 patches leave it alone, the loss is the model's."""
    cfg = transformers.Gemma2Config(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                    attn_logit_softcapping=0.5, max_position_embeddings=16)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(1))
    problem = lm_problem(model, ids, targets=("q_proj",), rank=2)  # checks the loss against the model's own
    with torch.no_grad():
        ref = float(causal_lm_loss(model(input_ids=ids).logits, ids))
    assert problem.loss(init_theta(problem, 0)) == pytest.approx(ref, rel=1e-6)


def test_with_data_moves_batches_to_the_model_and_a_rank_without_scored_tokens_adds_zero():
    model = tiny_llama()
    problem = lm_problem(model, lm_batches(sequences((5, 4))), targets=("q_proj",), rank=2)
    masked = lm_batches(sequences((5,)), labels=[torch.full((5,), -100)])
    local = dataclasses.replace(problem, batches=masked)  # as a process holding only prompt tokens
    theta = init_theta(problem, 0)
    assert local.loss_theta(theta) == 0  # not NaN: its share of the loss is zero
    assert problem.with_data(lm_batches(sequences((6,)))).batches[0].targets.device == problem.device


def test_lm_problem_keeps_the_user_model_unchanged():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    problem = lm_problem(model, lm_batches(sequences((5, 4))), targets=("q_proj",), rank=2)
    theta = off_init(problem)
    curvature(problem, theta).H_theta.matmat(torch.ones(problem.theta_layout.numel, 1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert dataclasses.is_dataclass(problem) and problem.forward_context is not None
