"""`calibrate`: per-layer curvature operators against dense autograd, α by trace and λ_max."""

import json
import math
import subprocess
import sys

import pytest
import torch
from cases import assert_cli_refuses, assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from signal_drift import InputError  # noqa: E402
from signal_drift.calibrate import LAMBDA_ACCEPT, LayerHessians, calibrate_model, layer_operators, lora_init  # noqa: E402
from signal_drift.lm import build_base_model, next_token_nll  # noqa: E402
from signal_drift.model import make_mlp, make_task, mse_loss  # noqa: E402
from signal_drift.scaling.peft import effective_scales  # noqa: E402
from signal_drift.train import TrainConfig, train  # noqa: E402

LLAMA_LAYERS = ["model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj"]


def _mlp_loss(model, batch):
    return mse_loss(model(batch[0]), batch[1])


def _mlp_case():
    model = make_mlp(6, 3, seed=0)  # nn.SiLU modules between the linears
    task = make_task(6, 50, seed=0)
    gen = torch.Generator().manual_seed(2)
    A = {"0": torch.randn(2, 6, generator=gen) / 6**0.5, "2": torch.randn(3, 6, generator=gen) / 6**0.5}
    return model, (task.X, task.y), A, _mlp_loss, 1e-10


@pytest.fixture(scope="module", params=["mlp", "llama"])
def problem(request):
    """(model, batch, A, loss_fn, tol): a pure-float64 SiLU MLP, and a tiny Llama.

    HF's Llama runs RMSNorm and rotary embeddings in float32 even in a float64 model, so its
    comparison tolerance is float32-sized; the MLP is float64 end to end.
    """
    if request.param == "mlp":
        return _mlp_case()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                                   attn_implementation="eager")  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    x = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    A = lora_init(model, 2, ["v_proj", "down_proj"], "kaiming_uniform", seed=0)
    return model, x, {n: A[n].double() for n in LLAMA_LAYERS}, next_token_nll, 1e-6


def _dense_block(model, batch, loss_fn, name):
    """Reference: dense ∇²_W L by reverse-over-reverse autograd on the weight W alone."""
    key = name + ".weight"
    W0 = dict(model.named_parameters())[key].detach()

    def loss(W):
        return loss_fn(lambda *a, **kw: torch.func.functional_call(model, {key: W}, a, kw), batch)

    return torch.autograd.functional.hessian(loss, W0).reshape(W0.numel(), W0.numel())


def _J0(A, m):
    return torch.kron(
        torch.eye(m, dtype=torch.float64), A.T.contiguous()
    )  # row-major vec(Z A) = (I ⊗ Aᵀ) vec(Z)


def _curv(model, batch, loss_fn, names):
    mods = dict(model.named_modules())
    ws = {n: mods[n].weight for n in names}
    for w in ws.values():
        w.requires_grad_(True)
    return LayerHessians(loss_fn(model, batch), ws)


def test_layer_hessian_and_signal_block_equal_dense_autograd(problem):
    model, batch, A, loss_fn, tol = problem
    curv = _curv(model, batch, loss_fn, list(A))
    for i, name in enumerate(A):
        H_ref = _dense_block(model, batch, loss_fn, name)
        H, S = layer_operators(curv, i, A[name])
        J0 = _J0(A[name], H_ref.shape[0] // A[name].shape[1])
        S_ref = J0.T @ H_ref @ J0
        assert_close(H.to_dense(), H_ref, rtol=tol, atol=tol * float(H_ref.abs().max()))
        assert_close(S.to_dense(), S_ref, rtol=tol, atol=tol * float(S_ref.abs().max()))


@pytest.fixture(scope="module")
def measured(problem):
    model, batch, A, loss_fn, _ = problem
    return calibrate_model(model, batch, A, loss_fn, probes=400, lanczos_steps=200)


def test_traces_are_unbiased_within_their_error_bars(problem, measured):
    model, batch, A, loss_fn, _ = problem
    for rec in measured:
        H_ref = _dense_block(model, batch, loss_fn, rec.name)
        J0 = _J0(A[rec.name], rec.fan_out)
        assert abs(rec.tr_H - float(H_ref.trace())) < 4 * rec.tr_H_se
        assert abs(rec.tr_S - float((J0.T @ H_ref @ J0).trace())) < 4 * rec.tr_S_se
        assert rec.tr_H_se > 0 and rec.tr_S_se > 0


def test_alpha_trace_interval_covers_the_exact_ratio():
    """The printed 95 % interval of α_tr covers r √(tr H_ll / tr J0ᵀH_llJ0) in >= 90 % of 20 seeds."""
    model, batch, A, loss_fn, _ = _mlp_case()
    exact = {}
    for name, a in A.items():
        H_ref = _dense_block(model, batch, loss_fn, name)
        J0 = _J0(a, H_ref.shape[0] // a.shape[1])
        exact[name] = a.shape[0] * math.sqrt(float(H_ref.trace()) / float((J0.T @ H_ref @ J0).trace()))
    covered = total = 0
    for seed in range(20):
        for rec in calibrate_model(model, batch, A, loss_fn, probes=20, lanczos_steps=30, seed=seed):
            assert rec.alpha_trace_low < rec.alpha_trace < rec.alpha_trace_high
            covered += rec.alpha_trace_low <= exact[rec.name] <= rec.alpha_trace_high
            total += 1
    assert total == 40 and covered >= 0.9 * total


def test_unconverged_lambda_max_is_nan_with_a_warning(problem):
    model, batch, A, loss_fn, _ = problem
    with pytest.warns(UserWarning, match="not converged"):
        recs = calibrate_model(model, batch, A, loss_fn, probes=4, lanczos_steps=3)
    assert all(
        math.isnan(r.alpha_lambda) for r in recs if max(r.lam_H_residual, r.lam_S_residual) > LAMBDA_ACCEPT
    )
    assert any(math.isnan(r.alpha_lambda) for r in recs)


def test_alpha_lambda_is_the_exact_eigenvalue_ratio(problem, measured):
    model, batch, A, loss_fn, tol = problem
    for rec in measured:
        H_ref = _dense_block(model, batch, loss_fn, rec.name)
        J0 = _J0(A[rec.name], rec.fan_out)
        lam_H, lam_S = (
            float(torch.linalg.eigvalsh(H_ref)[-1]),
            float(torch.linalg.eigvalsh(J0.T @ H_ref @ J0)[-1]),
        )
        rel = max(100 * tol, 1e-8)
        assert math.isclose(rec.lam_H, lam_H, rel_tol=rel) and math.isclose(rec.lam_S, lam_S, rel_tol=rel)
        r = A[rec.name].shape[0]
        assert math.isclose(rec.alpha_lambda, r * math.sqrt(rec.lam_H / rec.lam_S), rel_tol=1e-12)


def test_scaling_A_by_c_scales_both_alphas_by_one_over_c(problem, measured):
    model, batch, A, loss_fn, tol = problem
    scaled = calibrate_model(model, batch, {n: 3.0 * a for n, a in A.items()}, loss_fn, probes=400,
                             lanczos_steps=200)  # fmt: skip
    for a, b in zip(measured, scaled, strict=True):
        assert math.isclose(b.alpha_lambda, a.alpha_lambda / 3, rel_tol=max(100 * tol, 1e-7))
        if math.isfinite(a.alpha_trace):
            assert math.isclose(b.alpha_trace, a.alpha_trace / 3, rel_tol=max(10 * tol, 1e-9))
        assert math.isclose(b.alpha_gaussian, a.alpha_gaussian / 3, rel_tol=1e-12)


def test_requires_grad_flags_are_restored(problem, measured):
    model = problem[0]
    assert all(p.requires_grad for p in model.parameters())  # as they were: a fresh model trains everything


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
    model, batch, A, loss_fn, _ = problem
    runs = [calibrate_model(model, batch, A, loss_fn, probes=8, lanczos_steps=10, seed=5) for _ in range(2)]
    assert runs[0] == runs[1]
    other = calibrate_model(model, batch, A, loss_fn, probes=8, lanczos_steps=10, seed=6)
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

    model, batch, A, loss_fn, _ = _mlp_case()
    model = model.float()
    with pytest.warns(PrecisionWarning, match="float32"):
        calibrate_model(
            model,
            (batch[0].float(), batch[1].float()),
            {n: a.float() for n, a in A.items()},
            loss_fn,
            probes=4,
            lanczos_steps=20,
        )
