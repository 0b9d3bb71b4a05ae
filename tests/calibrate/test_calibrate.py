"""`calibrate`: per-layer curvature operators against dense autograd, α by trace and λ_max."""

import json
import math
import subprocess
import sys
from dataclasses import dataclass, fields

import pytest
import torch
from cases import assert_cli_refuses, assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from signal_drift import InputError  # noqa: E402
from signal_drift.calibrate import LAMBDA_ACCEPT, calibrate_model, layer_blocks, lora_init  # noqa: E402
from signal_drift.hessian import fft_hessian  # noqa: E402
from signal_drift.hf import float64_forward, lm_problem  # noqa: E402
from signal_drift.lm import build_base_model, next_token_nll  # noqa: E402
from signal_drift.lora import LoraProblem, attach_lora  # noqa: E402
from signal_drift.model import make_mlp, make_task, mse_loss  # noqa: E402
from signal_drift.operators import FunctionOperator  # noqa: E402
from signal_drift.scaling.peft import effective_scales  # noqa: E402
from signal_drift.spectra.lanczos import lanczos_eigs  # noqa: E402
from signal_drift.spectra.trace import hutchinson  # noqa: E402
from signal_drift.train import TrainConfig, train  # noqa: E402

LLAMA_LAYERS = ["model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"]


@dataclass(frozen=True)
class Case:
    """A calibration problem and what the references need.

    Attributes:
        problem: the engine's problem (``α = r``: ``s = 1``).
        A: ``{layer: A [r, n]}``, the init to calibrate.
        model, batch, loss_fn: the same loss as ``loss_fn(model, batch)``, for the autograd references.
    """

    problem: LoraProblem
    A: dict
    model: torch.nn.Module
    batch: object
    loss_fn: object


def _mlp_loss(model, batch):
    return mse_loss(model(batch[0]), batch[1])


def _mlp_case(dtype=torch.float64):
    model = make_mlp(6, 3, seed=0).to(dtype)  # nn.SiLU modules between the linears
    task = make_task(6, 50, seed=0)
    X, y = task.X.to(dtype), task.y.to(dtype)
    gen = torch.Generator().manual_seed(2)
    A = {"0": torch.randn(2, 6, generator=gen) / 6**0.5, "2": torch.randn(3, 6, generator=gen) / 6**0.5}
    problem = attach_lora(model, X, y, targets=list(A), rank_pattern={n: a.shape[0] for n, a in A.items()})
    return Case(problem, A, model, (X, y), _mlp_loss)


def _llama_case():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                   attn_implementation="eager")  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    x = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(1))  # windows of T + 1 tokens
    A = lora_init(model, 2, ["v_proj", "down_proj"], "kaiming_uniform", seed=0)
    problem = lm_problem(model, x, targets=["v_proj", "down_proj"], rank=2)  # causal_lm_loss of x, labels = x
    return Case(problem, {n: A[n].double() for n in LLAMA_LAYERS}, model, x, next_token_nll)


@pytest.fixture(scope="module", params=["mlp", "llama"])
def problem(request):
    """A pure-float64 SiLU MLP (the engine's MLP fast path), and a tiny Llama.

    The Llama's references run under ``float64_forward`` as the problem does (HF computes RMSNorm,
    rotary embeddings and the softmax in float32 otherwise), so both compare to float64 round-off.
    """
    return _mlp_case() if request.param == "mlp" else _llama_case()


def _reference_loss(case, name):
    """``W ↦ loss_fn(model with W at layer name, batch)``: the model's own forward, not the engine's."""
    key = name + ".weight"

    def loss(W):
        def model(*args, **kwargs):
            return torch.func.functional_call(case.model, {key: W}, args, kwargs)

        with float64_forward(case.model):
            return case.loss_fn(model, case.batch)

    return loss, dict(case.model.named_parameters())[key].detach()


def _dense_block(case, name):
    """Reference: dense ∇²_W L by reverse-over-reverse autograd on the weight W alone."""
    loss, W0 = _reference_loss(case, name)
    return torch.autograd.functional.hessian(loss, W0).reshape(W0.numel(), W0.numel())


def _autograd_blocks(case, name):
    """Reference: the pre-engine path, ``autograd.grad`` of ``W_l``'s retained gradient graph.

    ``H_ll`` on ``vec W`` and ``J0ᵀ H_ll J0`` on ``vec Z`` (``Z ↦ (H_ll (Z A)) Aᵀ``), column by column.
    """
    loss, W0 = _reference_loss(case, name)
    W = W0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(W), W, create_graph=True)
    A = case.A[name].double()
    (m, n), r = W.shape, A.shape[0]

    def hvp(V):
        return torch.autograd.grad(g, W, grad_outputs=V, retain_graph=True)[0]

    def columns(fn, shape):
        return lambda V: torch.stack([fn(v.reshape(shape)).reshape(-1) for v in V.T], dim=1)

    H = FunctionOperator(columns(hvp, (m, n)), (m * n, m * n), W.dtype, symmetric=True)
    S = FunctionOperator(columns(lambda Z: hvp(Z @ A) @ A.T, (m, r)), (m * r, m * r), W.dtype, symmetric=True)
    return H, S


def _J0(A, m):
    return torch.kron(
        torch.eye(m, dtype=torch.float64), A.T.contiguous()
    )  # row-major vec(Z A) = (I ⊗ Aᵀ) vec(Z)


def test_layer_blocks_equal_dense_autograd(problem):
    for name, A in problem.A.items():
        H_ref = _dense_block(problem, name)
        H, S = layer_blocks(problem.problem, name, A)
        J0 = _J0(A.double(), H_ref.shape[0] // A.shape[1])
        S_ref = J0.T @ H_ref @ J0
        assert_close(H.to_dense(), H_ref, rtol=1e-10, atol=1e-10 * float(H_ref.abs().max()))
        assert_close(S.to_dense(), S_ref, rtol=1e-10, atol=1e-10 * float(S_ref.abs().max()))


def test_layer_blocks_equal_the_old_per_layer_autograd_products(problem):
    """Raw products on random matrices: the engine's blocks, the old code path's, the full ``H`` restricted.

    Also: ``S`` does not depend on ``α`` (the signal block is divided by ``s²``).
    """
    gen = torch.Generator().manual_seed(3)
    theta = {}
    for a in problem.problem.adapters:
        theta[a.key_A] = problem.A[a.name].double()
        theta[a.key_B] = torch.zeros(a.fan_out, a.rank, dtype=torch.float64)
    H_all = fft_hessian(problem.problem, theta)
    other_alpha = problem.problem.with_alpha(7.0)
    for name, A in problem.A.items():
        H, S = layer_blocks(problem.problem, name, A)
        H_old, S_old = _autograd_blocks(problem, name)
        V = torch.randn(H.shape[0], 5, generator=gen, dtype=torch.float64)
        Z = torch.randn(S.shape[0], 5, generator=gen, dtype=torch.float64)
        HV, SZ = H.matmat(V), S.matmat(Z)
        assert_close(HV, H_old.matmat(V), rtol=1e-10, atol=1e-10 * float(HV.abs().max()))
        assert_close(SZ, S_old.matmat(Z), rtol=1e-10, atol=1e-10 * float(SZ.abs().max()))
        rows = problem.problem.weight_layout.indices([name])
        assert_close(HV, H_all.restrict(rows).matmat(V), rtol=1e-12, atol=1e-12 * float(HV.abs().max()))
        SZ7 = layer_blocks(other_alpha, name, A)[1].matmat(Z)
        assert_close(SZ7, SZ, rtol=1e-12, atol=1e-12 * float(SZ.abs().max()))


def test_calibration_equals_the_old_estimators_on_the_old_operators(problem):
    """Same probes, Lanczos start vectors and acceptance: the numbers of the pre-engine path to 1e-9."""
    recs = calibrate_model(problem.problem, problem.A, probes=8, lanczos_steps=40, seed=4)
    for rec in recs:
        H_old, S_old = _autograd_blocks(problem, rec.name)
        assert math.isclose(rec.tr_H, hutchinson(H_old, 8, 4).value, rel_tol=1e-9)
        assert math.isclose(rec.tr_S, hutchinson(S_old, 8, 5).value, rel_tol=1e-9)
        for lam, op in ((rec.lam_H, H_old), (rec.lam_S, S_old)):
            (ref,) = lanczos_eigs(op, 1, "LA", steps=40, seed=4, tol=1e-8).values
            assert math.isclose(lam, float(ref), rel_tol=1e-9)


def test_calibrate_model_refuses_a_layer_that_is_not_adapted(problem):
    A = dict(problem.A) | {"not.a.layer": next(iter(problem.A.values()))}
    with pytest.raises(InputError, match="not.a.layer"):
        calibrate_model(problem.problem, A, probes=2, lanczos_steps=2)
    name, a = next(iter(problem.A.items()))
    with pytest.raises(InputError, match="lora_A"):
        calibrate_model(problem.problem, {name: a[:, :-1]}, probes=2, lanczos_steps=2)


@pytest.fixture(scope="module")
def measured(problem):
    return calibrate_model(problem.problem, problem.A, probes=400, lanczos_steps=200)


def test_traces_are_unbiased_within_their_error_bars(problem, measured):
    for rec in measured:
        H_ref = _dense_block(problem, rec.name)
        J0 = _J0(problem.A[rec.name].double(), rec.fan_out)
        assert abs(rec.tr_H - float(H_ref.trace())) < 4 * rec.tr_H_se
        assert abs(rec.tr_S - float((J0.T @ H_ref @ J0).trace())) < 4 * rec.tr_S_se
        assert rec.tr_H_se > 0 and rec.tr_S_se > 0


def test_alpha_trace_interval_covers_the_exact_ratio():
    """The printed 95 % interval of α_tr covers r √(tr H_ll / tr J0ᵀH_llJ0) in >= 90 % of 20 seeds."""
    case = _mlp_case()
    exact = {}
    for name, a in case.A.items():
        H_ref = _dense_block(case, name)
        J0 = _J0(a, H_ref.shape[0] // a.shape[1])
        exact[name] = a.shape[0] * math.sqrt(float(H_ref.trace()) / float((J0.T @ H_ref @ J0).trace()))
    covered = total = 0
    for seed in range(20):
        for rec in calibrate_model(case.problem, case.A, probes=20, lanczos_steps=30, seed=seed):
            assert rec.alpha_trace_low < rec.alpha_trace < rec.alpha_trace_high
            covered += rec.alpha_trace_low <= exact[rec.name] <= rec.alpha_trace_high
            total += 1
    assert total == 40 and covered >= 0.9 * total


def test_unconverged_lambda_max_is_nan_with_a_warning(problem):
    with pytest.warns(UserWarning, match="not converged"):
        recs = calibrate_model(problem.problem, problem.A, probes=4, lanczos_steps=3)
    assert all(
        math.isnan(r.alpha_lambda) for r in recs if max(r.lam_H_residual, r.lam_S_residual) > LAMBDA_ACCEPT
    )
    assert any(math.isnan(r.alpha_lambda) for r in recs)


def test_alpha_lambda_is_the_exact_eigenvalue_ratio(problem, measured):
    for rec in measured:
        H_ref = _dense_block(problem, rec.name)
        J0 = _J0(problem.A[rec.name].double(), rec.fan_out)
        lam_H, lam_S = (
            float(torch.linalg.eigvalsh(H_ref)[-1]),
            float(torch.linalg.eigvalsh(J0.T @ H_ref @ J0)[-1]),
        )
        assert math.isclose(rec.lam_H, lam_H, rel_tol=1e-8) and math.isclose(rec.lam_S, lam_S, rel_tol=1e-8)
        r = problem.A[rec.name].shape[0]
        assert math.isclose(rec.alpha_lambda, r * math.sqrt(rec.lam_H / rec.lam_S), rel_tol=1e-12)


def test_scaling_A_by_c_scales_both_alphas_by_one_over_c(problem, measured):
    scaled = calibrate_model(problem.problem, {n: 3.0 * a for n, a in problem.A.items()}, probes=400,
                             lanczos_steps=200)  # fmt: skip
    for a, b in zip(measured, scaled, strict=True):
        assert math.isclose(b.alpha_lambda, a.alpha_lambda / 3, rel_tol=1e-7)
        if math.isfinite(a.alpha_trace):
            assert math.isclose(b.alpha_trace, a.alpha_trace / 3, rel_tol=1e-9)
        assert math.isclose(b.alpha_gaussian, a.alpha_gaussian / 3, rel_tol=1e-12)


def test_the_numbers_do_not_depend_on_the_problems_alpha(problem):
    recs = [calibrate_model(p, problem.A, probes=8, lanczos_steps=40, seed=1)
            for p in (problem.problem, problem.problem.with_alpha(0.3))]  # fmt: skip
    for a, b in zip(*recs, strict=True):
        for f in fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if f.name not in ("name", "lam_H_residual", "lam_S_residual") and math.isfinite(x):
                assert math.isclose(x, y, rel_tol=1e-9), f.name


def test_requires_grad_flags_are_left_as_they_were(problem, measured):
    assert all(p.requires_grad for p in problem.model.parameters())  # a fresh model trains everything


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base_model(tmp_path_factory.mktemp("base") / "model", steps=30, seq_len=32)


@pytest.fixture(scope="module")
def calibrated(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal")
    r = subprocess.run([sys.executable, "-m", "signal_drift.calibrate", "--model", str(base), "--rank", "4",
                        "--probes", "4", "--lanczos-steps", "150", "--seq-len", "32", "--samples", "2",
                        "--out", str(out)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_cli_writes_a_peft_alpha_pattern_that_peft_applies(calibrated, base):
    res = json.loads((calibrated / "calibration.json").read_text())
    assert (
        res["complete"] and len(res["layers"]) == 14 and (calibrated / "calibration.png").stat().st_size > 0
    )
    assert res["warnings"] == []  # every λ_max converged (else NaN and a warning)
    assert all(0 <= d["lam_H_residual"] < 1e-4 and 0 <= d["lam_S_residual"] < 1e-4 for d in res["layers"])
    pattern = res["alpha_pattern"]["lambda"]
    assert len(pattern) == 14 and all(math.isfinite(a) and a > 0 for a in pattern.values())
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=4, target_modules=["down_proj", "q_proj"],
                                                    alpha_pattern=pattern))  # fmt: skip
    got = effective_scales(pm)
    assert len(got) == 4 and all(math.isclose(got[n], pattern[n] / 4, rel_tol=1e-12) for n in got)


def test_train_uses_the_calibrated_alpha_per_module(calibrated, base, tmp_path):
    m = train(TrainConfig(model=str(base), scaling="calibrated", calibration=str(calibrated / "calibration.json"),
                          rank=4, gamma=2.0, steps=1, batch_size=2, seq_len=32, out=str(tmp_path)),
              log=lambda _: None)  # fmt: skip
    pattern = json.loads((calibrated / "calibration.json").read_text())["alpha_pattern"]["lambda"]
    assert set(m["scales"]) == set(pattern)
    assert all(math.isclose(m["scales"][n], 2.0 * pattern[n] / 4, rel_tol=1e-12) for n in pattern)


def test_train_refuses_a_calibration_of_another_rank_or_with_gaps(calibrated, base, tmp_path):
    path = calibrated / "calibration.json"
    with pytest.raises(InputError, match="r=4"):
        train(TrainConfig(model=str(base), scaling="calibrated", calibration=str(path), rank=8, steps=1,
                          out=str(tmp_path / "a")), log=lambda _: None)  # fmt: skip
    res = json.loads(path.read_text())
    res["alpha_pattern"]["trace"].pop("model.layers.0.self_attn.q_proj", None)
    gappy = tmp_path / "gappy.json"
    gappy.write_text(json.dumps(res))
    with pytest.raises(InputError, match="try :lambda"):
        train(TrainConfig(model=str(base), scaling="calibrated", calibration=f"{gappy}:trace", rank=4, steps=1,
                          out=str(tmp_path / "b")), log=lambda _: None)  # fmt: skip
    with pytest.raises(InputError, match="go together"):
        TrainConfig(scaling="calibrated").validate()


@pytest.mark.parametrize("args,needle", [(["--rank", "0"], "--rank=0"), (["--probes", "1"], "--probes"),
                                         (["--dtype", "float16"], "--dtype"), (["--model", "/nonexistent"], "--model"),
                                         (["--init", "orthogonal"], "--init")])  # fmt: skip
def test_cli_rejects_bad_input(tmp_path, args, needle):
    out = tmp_path / "o"
    assert_cli_refuses(["signal_drift.calibrate", *args, "--out", str(out)], needle, out)


def test_rank_above_the_layer_size_is_refused(tmp_path, base):
    cli = ["signal_drift.calibrate", "--model", str(base), "--rank", "999", "--out", str(tmp_path / "o")]
    assert_cli_refuses(cli, "rank")


def test_same_seed_same_numbers(problem):
    runs = [calibrate_model(problem.problem, problem.A, probes=8, lanczos_steps=10, seed=5) for _ in range(2)]
    assert runs[0] == runs[1]
    other = calibrate_model(problem.problem, problem.A, probes=8, lanczos_steps=10, seed=6)
    assert [r.tr_H for r in other] != [r.tr_H for r in runs[0]]


def test_lora_init_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    A = lora_init(model, 2, ["q_proj", "down_proj"], "kaiming_uniform", seed=0)
    assert set(A) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())
    assert type(dict(model.named_modules())["model.layers.0.self_attn.q_proj"]) is torch.nn.Linear
    again = lora_init(model, 2, ["q_proj", "down_proj"], "kaiming_uniform", seed=0)
    assert all(torch.equal(A[k], again[k]) for k in A)


def test_float32_calibration_warns_about_precision():
    from signal_drift import PrecisionWarning

    case = _mlp_case(torch.float32)
    with pytest.warns(PrecisionWarning, match="float32"):
        calibrate_model(case.problem, {n: a.float() for n, a in case.A.items()}, probes=4, lanczos_steps=20)


def test_the_offline_base_is_pretrained_on_the_gpu_it_is_measured_on(tmp_path, monkeypatch):
    """With CUDA visible (mocked), the default model is pre-trained there, not on the CPU."""
    from cases import StopBuild, record_build_device

    from signal_drift import calibrate as calibrate_module

    seen = record_build_device(monkeypatch, calibrate_module)
    with pytest.raises(StopBuild):
        calibrate_module.calibrate(calibrate_module.CalibrateConfig(out=str(tmp_path)), log=lambda _: None)
    assert seen == [torch.device("cuda")]
