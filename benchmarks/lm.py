"""LM rows of the benchmark: H_θ products on a GPT-2-small batch, and the peers side by side.

Two parts, one process, in the style of ``benchmarks/run.py`` (its timing, checking and summary
helpers are reused): every timed answer is checked against a reference first (a result outside
its tolerance is printed as WRONG and gets no ratio; a wrong signal-drift row makes the run exit
non-zero), contenders are timed round-robin, and peers that fail are reported, not hidden.

**cost** — one batch of a GPT-2-small-sized model (``GPT2Config`` defaults: 12 layers, hidden
768, vocabulary 50 257; random weights, fp32, eager attention), 2 × 128 tokens, LoRA r = 8 on
``c_attn``/``c_proj``/``c_fc`` (``signal_drift.hf.lm_problem``): the time of one H_θ product as a
multiple of one gradient ∇_θ L, *fresh* (linearisation included: ``lora_hessian`` + one product)
and *amortised* (the operator reused: what every Lanczos step pays), against plain
reverse-over-reverse ``torch.autograd``; the signal product JᵀHJv and the drift product likewise.
GFLOP per call are counted (``torch.utils.flop_counter``) to say where the time goes. Rows
marked *prototype* are an independent low-rank forward (``factored_loss``); since
``LoraProblem.output_theta`` the package computes the same way, and the two agree.

**peers** — a small GPT-2 (2 layers, hidden 64, 4 heads, vocabulary 512, float64, random
weights), 2 × 64 tokens, a PEFT LoRA adapter (r = 4 on the same layers, B ~ N(0, 0.02²)) read
with ``signal_drift.hf.from_peft``. The peers see only the LoRA A/B as parameters (PEFT freezes
the rest): hessian-eigenthings ``HessianOperator``, PyHessian ``hessian``, curvlinops
``HessianLinearOperator``. Tasks: one HVP, the top-4 eigenvalues by magnitude (reference: SciPy
ARPACK at tol 1e-13 on our operator; every solver given what it needs for 1e-8), the trace
(reference: exact, from all P columns by plain autograd, which also gives ‖H_θ‖_F, the scale of
an estimator's error; estimators at an equal budget of 300 products).

Run time on the 2-core dev machine: 16.6 min in a busy spell (GEMM at half speed; the exact-trace
reference ~6 min of it); peak RSS 8.3 GB (part 1's three linearised graphs).

    python benchmarks/lm.py [--part all|cost|peers] [--layers 12] [--hidden 768] [--seq 128] ...

Peers: ``make bench`` installs them with ``--no-deps`` (PyHessian 0.1 included).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
import warnings

import numpy as np
import scipy.sparse.linalg as spla
import torch
from run import ROWS, WRONG, gemm_gflops, interleaved, record, summary, timeit
from torch import nn
from torch.func import grad, jvp, vjp
from torch.utils.flop_counter import FlopCounterMode

from signal_drift.decomposition import DriftOperator, MappingJacobian, SignalOperator
from signal_drift.hessian import fft_gradient, fft_hessian, lora_gradient, lora_hessian
from signal_drift.lora import init_theta
from signal_drift.spectra import hutchinson, hutchpp, lanczos_eigs

TARGETS = ("c_attn", "c_proj", "c_fc")
#: fp32 products of two different summation orders agree to ~1e-6 here; float64 as in run.py.
TOL = {"fp32": 1e-4, "product": 1e-10, "eigenvalues": 1e-8}


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def gflop(fn):
    """GFLOP of one call of ``fn`` (matrix products and convolutions; elementwise work is not counted)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e9


# --- prototype: the low-rank forward ----------------------------------------------------------------
@contextlib.contextmanager
def low_rank(problem, theta):
    """Forward hooks adding ``s (x Aᵀ) Bᵀ`` to every adapted layer's output (what PEFT's forward does).

    With these the model runs on ``W0`` and θ enters through rank-r products only, so neither
    the m × n weight ``W = W0 + s B A`` nor its gradient ``∂L/∂W = δᵀ x`` is ever formed.
    """
    hooks = []
    for a in problem.adapters:
        A, B = theta[a.key_A], theta[a.key_B]

        def hook(mod, inputs, out, A=A, B=B, s=a.scale):
            return out + s * ((inputs[0] @ A.T) @ B.T)

        hooks.append(problem.module.get_submodule(a.name).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def factored_loss(problem):
    """``θ ↦ L`` of ``problem`` with the low-rank forward (equal to ``problem.loss_theta``)."""
    W0 = problem.base_weights()

    def loss(theta):
        with low_rank(problem, theta):
            return sum(problem.batch_loss_w(b, W0) for b in problem.batches)

    return loss


# --- part 1: cost of one product on a GPT-2-small batch ----------------------------------------------
def cost(args, g32):
    from transformers import GPT2Config, GPT2LMHeadModel

    from signal_drift.hf import lm_problem

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=args.layers,
        n_embd=args.hidden,
        n_head=args.heads,
        vocab_size=args.vocab,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
    problem = lm_problem(model, ids, targets=TARGETS, rank=args.rank)
    theta = init_theta(problem)
    # a generic point (B ≠ 0, as after some steps); no product's cost depends on it
    theta = {
        k: v if k.endswith("lora_A") else 0.01 * torch.randn(v.shape, generator=gen) for k, v in theta.items()
    }
    lay = problem.theta_layout
    P = lay.numel
    v = torch.randn(P, generator=gen)
    vd = lay.unflatten(v)
    n_w = problem.weight_layout.numel
    print(
        f"# cost: GPT-2 {args.layers} layers, hidden {args.hidden}, vocab {cfg.vocab_size}, fp32, eager attention; "
        f"{args.batch} × {args.seq} tokens; LoRA r={args.rank} on {'/'.join(TARGETS)}: |θ| = {P:,}, |w| = {n_w:,}"
    )

    # plain reverse-over-reverse autograd: the baseline (fresh by construction) and the reference
    leaves = {k: t.clone().requires_grad_() for k, t in theta.items()}

    def plain_rr():
        gs = torch.autograd.grad(problem.loss_theta(leaves), list(leaves.values()), create_graph=True)
        hv = torch.autograd.grad(gs, list(leaves.values()), grad_outputs=[vd[k] for k in leaves])
        return lay.flatten(dict(zip(leaves, hv, strict=True)))

    def fresh_ours():
        return lora_hessian(problem, theta).matvec(v)

    def fresh_signal():
        H = fft_hessian(problem, theta)
        return SignalOperator(MappingJacobian(problem, theta), H).matvec(v)

    def fresh_drift():
        return DriftOperator(problem, theta, fft_gradient(problem, theta)).matvec(v)

    floss = factored_loss(problem)

    def fresh_proto():
        return lay.flatten(vjp(grad(floss), theta)[1](vd)[0])

    def fwd_proto():
        return lay.flatten(jvp(grad(floss), (theta,), (vd,))[1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PrecisionWarning: fp32 on purpose (the setup)
        ref = plain_rr()
        op = lora_hessian(problem, theta)
        H = fft_hessian(problem, theta)
        sig = SignalOperator(MappingJacobian(problem, theta), H)
        drift = DriftOperator(problem, theta, H.gradient)
        _, proto_vjp = vjp(grad(floss), theta)
        sd = sig.matvec(v) + drift.matvec(v)
        # (task, tool, fn, reference or None, note)
        grad_task, hvp_task = "LM gradient ∇_θL", "LM H_θ product"
        rows = [
            (grad_task, "signal-drift lora_gradient", lambda: lay.flatten(lora_gradient(problem, theta)), None,
             "the unit: forms ∂L/∂W = δᵀx per layer"),
            (hvp_task, "signal-drift, fresh", fresh_ours, ref, "lora_hessian (linearise) + 1 product"),
            (hvp_task, "signal-drift, amortised", lambda: op.matvec(v), ref, "operator reused: per Lanczos step"),
            (hvp_task, "torch.autograd rev-over-rev", plain_rr, None, "the issue's baseline; the reference"),
            ("LM signal product JᵀHJv", "signal-drift, fresh", fresh_signal, None, "fft_hessian (linearise over w) + 1"),
            ("LM signal product JᵀHJv", "signal-drift, amortised", lambda: sig.matvec(v), None, "operator reused"),
            ("LM drift product", "signal-drift, fresh", fresh_drift, None, "fft_gradient + closed form"),
            ("LM drift product", "signal-drift, amortised", lambda: drift.matvec(v), None, "closed form, no H"),
            ("LM signal + drift", "signal-drift, amortised", lambda: sig.matvec(v) + drift.matvec(v), ref,
             "= H_θ v (Prop. 1)"),
            (grad_task, "prototype low-rank forward", lambda: lay.flatten(grad(floss)(theta)), None,
             "= PEFT's gradient: no m × n product"),
            (hvp_task, "prototype low-rank, fresh", fresh_proto, ref, "vjp(grad) of the low-rank loss + 1"),
            (hvp_task, "prototype low-rank, amortised", lambda: lay.flatten(proto_vjp(vd)[0]), ref, "graph reused"),
            (hvp_task, "prototype low-rank, fwd-over-rev", fwd_proto, ref, "jvp(grad): no graph kept"),
        ]  # fmt: skip
        g_ref = lay.flatten(lora_gradient(problem, theta))
        checked = []
        for task, who, fn, r, note in rows:
            try:
                out = fn()
            except Exception as err:  # noqa: BLE001  (a failing variant is reported, not hidden)
                record(task, who, None, f"FAILS: {str(err).splitlines()[0][:90]}")
                continue
            if r is None and task == grad_task:
                r = g_ref
            err = None if r is None or fn is plain_rr else rel(out, r)
            if err is not None:
                note += f"; rel err {err:.1e}"
            note += f"; {gflop(fn):.1f} GFLOP"
            checked.append((task, who, fn, note, err))
        print(f"# signal + drift vs H_θ v: rel err {rel(sd, ref):.1e}")
        best = interleaved([c[2] for c in checked], rounds=args.rounds)
    times = {(c[0], c[1]): t for c, t in zip(checked, best, strict=True)}
    unit = times[(grad_task, "signal-drift lora_gradient")]
    unit_lr = times.get((grad_task, "prototype low-rank forward"), float("nan"))
    start, lines = len(ROWS), []
    for (task, who, _, note, err), t in zip(checked, best, strict=True):
        record(task, who, t, f"{t / unit:.2f}× gradient, {t / unit_lr:.2f}× low-rank gradient; {note}", err,
               TOL["fp32"])  # fmt: skip
        lines.append(f"| {task} | {who} | {t:.2f} s | **{t / unit:.2f}×** | {t / unit_lr:.2f}× | {note} |")
    del ROWS[start:]  # ratios to the gradient here, not peer / ours: this part prints its own table
    print(f"\n# fp32 GEMM {g32:.0f} GFLOP/s")
    print("| task | tool | time | × gradient | × low-rank gradient | note |\n|---|---|---|---|---|---|")
    print("\n".join(lines))


# --- part 2: peers on a small GPT-2 ------------------------------------------------------------------
class ShiftedLogits(nn.Module):
    """``input_ids ↦`` next-token logits ``[B (T − 1), V]``: with ``CrossEntropyLoss`` on
    ``input_ids[:, 1:]`` this is ``causal_lm_loss`` (what the peers' model-plus-criterion needs)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x):
        logits = self.lm(input_ids=x).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1])


def exact_trace(model, crit, X, y, params, chunk=64):
    """``(tr H, ‖H‖_F)`` from every column of the Hessian over ``params`` (plain autograd, batched)."""
    gs = torch.autograd.grad(crit(model(X), y), params, create_graph=True)
    sizes = [p.numel() for p in params]
    P = sum(sizes)
    tr, fro2 = 0.0, 0.0
    for i in range(0, P, chunk):
        c = min(chunk, P - i)
        E = torch.zeros(c, P, dtype=params[0].dtype)
        E[torch.arange(c), torch.arange(i, i + c)] = 1.0
        outs = [e.reshape(c, *p.shape) for e, p in zip(E.split(sizes, dim=1), params, strict=True)]
        cols = torch.autograd.grad(gs, params, grad_outputs=outs, retain_graph=True, is_grads_batched=True)
        cols = torch.cat([h.reshape(c, -1) for h in cols], dim=1)
        tr += float(cols[torch.arange(c), torch.arange(i, i + c)].sum())
        fro2 += float((cols**2).sum())
    return tr, fro2**0.5


def top_by_magnitude(values, k):
    v = np.asarray(values, dtype=np.float64)
    return v[np.argsort(-np.abs(v))][:k]


def peers(args):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from signal_drift.hf import from_peft

    torch.set_default_dtype(torch.float64)  # PyHessian draws its vectors in the default dtype
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    cfg = GPT2Config(n_layer=args.small_layers, n_embd=args.small_hidden, n_head=4, vocab_size=args.small_vocab,
                     n_positions=args.small_seq, attn_implementation="eager", bos_token_id=0, eos_token_id=0)  # fmt: skip
    base = GPT2LMHeadModel(cfg).to(torch.float64).eval()
    lcfg = LoraConfig(r=args.small_rank, lora_alpha=args.small_rank, target_modules=list(TARGETS),
                      fan_in_fan_out=True, lora_dropout=0.0)  # fmt: skip
    pm = get_peft_model(base, lcfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    ids = torch.randint(0, cfg.vocab_size, (2, args.small_seq), generator=gen)
    problem, theta = from_peft(pm, ids)
    op = lora_hessian(problem, theta)
    lay = problem.theta_layout
    P = lay.numel
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    params = [p for n, p in pm.named_parameters() if p.requires_grad]
    # the peers' flat order (PEFT's parameters) → ours (problem.theta_layout)
    keys = [n.removeprefix("base_model.model.").removesuffix(".default.weight") for n in names]
    perm = torch.cat([torch.arange(lay.slice(k).start, lay.slice(k).stop) for k in keys])
    assert len(perm) == P and sum(p.numel() for p in params) == P
    model, X, y = ShiftedLogits(pm), ids, ids[:, 1:].reshape(-1)
    crit = nn.CrossEntropyLoss()
    with torch.no_grad():
        assert abs(float(crit(model(X), y)) - problem.loss(theta)) < 1e-12
    print(
        f"# peers: GPT-2 {args.small_layers} layers, hidden {args.small_hidden}, vocab {args.small_vocab}, float64, "
        f"2 × {args.small_seq} tokens; PEFT LoRA r={args.small_rank} on {'/'.join(TARGETS)}: |θ| = P = {P:,}"
    )

    # --- one HVP ------------------------------------------------------------------------------
    v = torch.randn(P, generator=gen)
    ref = lay.flatten(jvp(grad(problem.loss_theta), (theta,), (lay.unflatten(v),))[1])  # forward-over-reverse
    vp, refp = v[perm], ref[perm]
    one = "LM HVP H_θ, 1 vector"
    hvps = [
        (one, "signal-drift, amortised", lambda: op.matvec(v), ref),
        (one, "signal-drift, fresh", lambda: lora_hessian(problem, theta).matvec(v), ref),
    ]
    _, proto_vjp = vjp(grad(factored_loss(problem)), theta)
    hvps.append(
        (
            one,
            "prototype low-rank forward, amortised",
            lambda: lay.flatten(proto_vjp(lay.unflatten(v))[0]),
            ref,
        )
    )
    he = ph = cl = None
    try:
        import hessian_eigenthings as he_mod

        he = he_mod.HessianOperator(model, [(X, y)], lambda m, b: crit(m(b[0]), b[1]))
        hvps.append((one, "hessian-eigenthings", lambda: he.matvec(vp), refp))
    except ImportError:
        record(one, "hessian-eigenthings", None, "not installed")
    try:
        from pyhessian import hessian as PyHessian
        from pyhessian.utils import hessian_vector_product

        try:
            PyHessian(model, crit, data=(X, y))  # its default cuda=True
        except Exception as err:  # noqa: BLE001
            print(
                f"# PyHessian with its default cuda=True: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            )
        ph = PyHessian(model, crit, data=(X, y), cuda=False)
        vs = [t.reshape(p.shape) for t, p in zip(vp.split([p.numel() for p in params]), params, strict=True)]
        hvps.append(
            (one, "PyHessian", lambda: torch.cat([h.reshape(-1) for h in hessian_vector_product(ph.gradsH, ph.params, vs)]),
             refp)
        )  # fmt: skip
    except ImportError:
        record(one, "PyHessian", None, "not installed")
    try:
        from curvlinops import HessianLinearOperator

        cl = HessianLinearOperator(model, crit, params, [(X, y)], check_deterministic=False)
        hvps.append((one, "curvlinops HessianLinearOperator", lambda: cl @ vp, refp))
    except ImportError:
        record(one, "curvlinops", None, "not installed")
    checked = []
    for task, who, fn, r in hvps:
        try:
            err = rel(fn(), r)
        except Exception as e:  # noqa: BLE001
            record(task, who, None, f"FAILS: {str(e).splitlines()[0][:90]}")
            if who.startswith("curvlinops"):
                cl = None
            continue
        checked.append((task, who, fn, err))
    best = interleaved([c[2] for c in checked], rounds=args.rounds)
    for (task, who, _, err), t in zip(checked, best, strict=True):
        record(task, who, t, f"rel err {err:.1e} vs forward-over-reverse", err, TOL["product"])

    # --- top-4 eigenvalues by magnitude -------------------------------------------------------
    k = 4
    t0 = time.perf_counter()
    vals, _ = spla.eigsh(
        op.to_scipy(), k=k, which="LM", tol=1e-13, v0=np.random.default_rng(0).standard_normal(P)
    )
    ref_top = top_by_magnitude(vals, k)
    print(f"# reference top-{k} |λ| (ARPACK tol 1e-13, {time.perf_counter() - t0:.1f} s): {ref_top}")
    task = f"LM top-{k} eigenvalues of H_θ (by |λ|)"

    def eig_err(values):
        return float(np.max(np.abs(top_by_magnitude(values, k) - ref_top)) / abs(ref_top[0]))

    t, res = timeit(lambda: lanczos_eigs(op, k=k, which="BE", steps=600, tol=1e-10), repeat=1, warmup=0)
    steps = res.matvecs - 2 * k  # Lanczos steps (the rest checks the residuals)
    err = eig_err(res.values)
    record(task, "signal-drift torch Lanczos", t, f"max rel err {err:.1e}, {res.matvecs} products (both ends)",
           err, TOL["eigenvalues"])  # fmt: skip
    if he is not None:
        try:
            t, res = timeit(lambda: he_mod.lanczos(he, k=k, which="LM", max_iter=steps, seed=0, reorthogonalize=True),
                            repeat=1, warmup=0)  # fmt: skip
            err = eig_err(res.eigenvalues.cpu().numpy())
            record(task, "hessian-eigenthings lanczos", t, f"max rel err {err:.1e}, {steps} steps (ours)", err,
                   TOL["eigenvalues"])  # fmt: skip
        except Exception as e:  # noqa: BLE001
            record(task, "hessian-eigenthings lanczos", None, f"FAILS: {str(e).splitlines()[0][:90]}")
    if cl is not None:
        try:
            count = [0]
            sp = cl.to_scipy()

            def mv(x):
                count[0] += 1
                return sp.matvec(x)

            lin = spla.LinearOperator((P, P), matvec=mv, dtype=np.float64)
            t, vals = timeit(lambda: spla.eigsh(lin, k=k, which="LM", tol=1e-10, v0=np.ones(P))[0], repeat=1,
                             warmup=0)  # fmt: skip
            err = eig_err(vals)
            record(task, "curvlinops + SciPy eigsh", t, f"max rel err {err:.1e}, {count[0]} products", err,
                   TOL["eigenvalues"])  # fmt: skip
        except Exception as e:  # noqa: BLE001
            record(task, "curvlinops + SciPy eigsh", None, f"FAILS: {str(e).splitlines()[0][:90]}")
    if ph is not None:
        for it, tol in ((100, 1e-3), (args.pyhessian_iters, 1e-10)):
            try:
                t, (vals, _) = timeit(lambda it=it, tol=tol: ph.eigenvalues(maxIter=it, tol=tol, top_n=k), repeat=1,
                                      warmup=0)  # fmt: skip
                err = eig_err(vals)
                record(task, f"PyHessian power iteration ({it} it, tol {tol:.0e})", t, f"max rel err {err:.1e}",
                       err, TOL["eigenvalues"])  # fmt: skip
            except Exception as e:  # noqa: BLE001
                record(task, "PyHessian power iteration", None, f"FAILS: {str(e).splitlines()[0][:90]}")

    # --- trace ----------------------------------------------------------------------------------
    # The reference: every column of H_θ by plain torch.autograd on the PEFT model (graph built once,
    # unit vectors in batches), giving the exact trace and ‖H_θ‖_F, the scale of a trace estimator's
    # error (this random point's spectrum comes in ± pairs, so tr H_θ itself is near zero).
    t, (tr, fro) = timeit(lambda: exact_trace(model, crit, X, y, params), repeat=1, warmup=0)
    record("LM trace of H_θ, exact", "reference: plain autograd, P columns", t,
           f"tr H_θ = {tr:.6g}, ‖H_θ‖_F = {fro:.4g} ({P} products, batches of 64)")  # fmt: skip
    m = args.trace_matvecs
    task = f"LM trace of H_θ, {m} products"

    def tr_note(val, se=None):
        out = f"error {abs(val - tr) / fro:.1e} ‖H_θ‖_F"
        return out + (f" (its stderr {se / fro:.1e})" if se is not None else "")

    t, est = timeit(lambda: hutchpp(op, m, seed=0), repeat=1, warmup=0)
    record(task, "signal-drift Hutch++", t, tr_note(est.value, est.stderr))
    t, est = timeit(lambda: hutchinson(op, m, seed=0), repeat=1, warmup=0)
    record(task, "signal-drift Hutchinson", t, tr_note(est.value, est.stderr))
    if he is not None:
        try:
            t, res = timeit(lambda: he_mod.hutch_plus_plus(he, num_matvecs=m, seed=0), repeat=1, warmup=0)
            record(task, "hessian-eigenthings Hutch++", t, tr_note(res.estimate, res.stderr))
        except Exception as e:  # noqa: BLE001
            record(task, "hessian-eigenthings Hutch++", None, f"FAILS: {str(e).splitlines()[0][:90]}")
    if cl is not None:
        try:
            from curvlinops import hutchpp_trace

            torch.manual_seed(0)
            t, val = timeit(lambda: float(hutchpp_trace(cl, m)), repeat=1, warmup=0)
            record(task, "curvlinops hutchpp_trace", t, tr_note(val))
        except Exception as e:  # noqa: BLE001
            record(task, "curvlinops hutchpp_trace", None, f"FAILS: {str(e).splitlines()[0][:90]}")
    if ph is not None:
        try:
            # tol=-inf: its stop test divides by the signed running mean, so a negative trace stops it at once
            torch.manual_seed(0)
            t, samples = timeit(lambda: ph.trace(maxIter=m, tol=float("-inf")), repeat=1, warmup=0)
            s = np.asarray(samples)
            record(task, "PyHessian Hutchinson", t,
                   tr_note(float(s.mean()), float(s.std(ddof=1) / len(s) ** 0.5)) + "; no Hutch++")  # fmt: skip
        except Exception as e:  # noqa: BLE001
            record(task, "PyHessian Hutchinson", None, f"FAILS: {str(e).splitlines()[0][:90]}")
        try:
            ph.density(iter=4, n_v=1)
            record("LM spectral density (SLQ)", "PyHessian density", None, "runs")
        except Exception as e:  # noqa: BLE001
            record(
                "LM spectral density (SLQ)",
                "PyHessian density",
                None,
                f"FAILS: {type(e).__name__}: {str(e).splitlines()[0][:110]}",
            )
        for p in params:  # PyHessian left graph-carrying .grad on every parameter
            p.grad = None
    torch.set_default_dtype(torch.float32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=("all", "cost", "peers"), default="all")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="round-robin timing rounds (best of each)")
    p.add_argument("--small-layers", type=int, default=2)
    p.add_argument("--small-hidden", type=int, default=64)
    p.add_argument("--small-vocab", type=int, default=512)
    p.add_argument("--small-seq", type=int, default=64)
    p.add_argument("--small-rank", type=int, default=4)
    p.add_argument("--trace-matvecs", type=int, default=300)
    p.add_argument(
        "--pyhessian-iters", type=int, default=300, help="power iterations per eigenvalue, 2nd setting"
    )
    args = p.parse_args()
    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip
    g64, g32 = gemm_gflops(torch.float64), gemm_gflops(torch.float32)
    print(f"# GEMM throughput: fp64 {g64:.1f} GFLOP/s, fp32 {g32:.1f} GFLOP/s")
    if args.part in ("all", "cost"):
        cost(args, g32)
    if args.part in ("all", "peers"):
        peers(args)
    if ROWS:
        summary(ROWS)
    if WRONG:
        sys.exit("signal-drift gave wrong answers in: " + "; ".join(WRONG))


if __name__ == "__main__":
    main()
