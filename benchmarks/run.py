"""Side-by-side benchmark: signal-drift vs curvlinops, hessian-eigenthings, PyHessian and plain torch.func.

One process, one model (5-layer SiLU MLP, width d, N samples, float64), one set of probe
vectors. Every timed result is checked against a reference (products to 1e-10, eigenvalues to
1e-8 relative); a result outside its tolerance is printed as WRONG and gets no ratio, and a wrong
signal-drift row makes the run exit non-zero. HVP contenders are timed round-robin so that the
VM's slow spells hit all of them alike. Peers that are not installed or that fail are reported as
such, not hidden. The summary table gives peer / ours for every peer row.

    python benchmarks/run.py [--dim 64] [--samples 1024] [--rank 4] [--skip-command]

Install the peers without their CUDA-pulling dependencies (what `make bench` does):
    pip install --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 \
        hessian-eigenthings==1.0.0a5 pyhessian==0.1 einops einconv opt-einsum linear_operator \
        unfoldNd jaxtyping wadler_lindig
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time

import numpy as np
import torch
from torch.func import grad, jvp, vmap

from signal_drift import attach_lora, curvature, init_theta, make_mlp, make_task
from signal_drift.hessian import HessianOperator
from signal_drift.mlp_hessian import MLPHessianOperator
from signal_drift.spectra import eigsh, hutchpp, lanczos_eigs

ROWS: list[tuple[str, str, float | None, str]] = []


def timeit(fn, repeat=7, warmup=1):
    """Best of ``repeat`` runs (noise on a shared VM only ever adds time), and the last output."""
    for _ in range(warmup):
        out = fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return min(ts), out


def interleaved(fns, rounds=9):
    """Best time of each callable over ``rounds`` round-robin rounds (after one warm-up each)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


#: A timed answer further than this from its reference is WRONG: its time gets no ratio, and a
#: wrong signal-drift row makes the run exit non-zero. Products and eigenvalues in float64.
TOL = {"product": 1e-10, "eigenvalues": 1e-8}
WRONG: list[str] = []


def record(task, who, seconds, note="", err=None, tol=None):
    """One row; with ``err``/``tol``, a result off by more than ``tol`` is flagged WRONG."""
    ok = err is None or err <= tol
    if not ok:
        note = f"WRONG (err {err:.1e} > {tol:.0e}); {note}"
        if who.startswith("signal-drift"):
            WRONG.append(f"{task}: {who}")
    ROWS.append((task, who, seconds, note))
    s = f"{seconds * 1e3:10.2f} ms" if seconds is not None else "      —     "
    print(f"{task:<34} {who:<34} {s}  {note}", flush=True)


def gemm_gflops(dtype, n=2048):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t, _ = timeit(lambda: a @ b, repeat=5)
    return 2 * n**3 / t / 1e9


def rel(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def summary(rows=ROWS):
    """The markdown table: every row, with peer / ours against our fastest row of the same task."""
    ours_best: dict[str, float] = {}
    for task_, who, s, note in rows:
        if who.startswith("signal-drift") and s is not None and not note.startswith("WRONG"):
            ours_best[task_] = min(s, ours_best.get(task_, float("inf")))
    print("\n| task | tool | time | peer / ours | note |\n|---|---|---|---|---|")
    for task_, who, s, note in rows:
        ratio = (
            ""
            if who.startswith("signal-drift")
            or s is None
            or note.startswith("WRONG")
            or task_ not in ours_best
            else f"{s / ours_best[task_]:.1f}×"
        )
        print(f"| {task_} | {who} | {'—' if s is None else f'{s * 1e3:.1f} ms'} | {ratio} | {note} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--k", type=int, default=32, help="vectors per batched HVP")
    p.add_argument("--skip-command", action="store_true", help="do not time the spectra command")
    p.add_argument("--skip-dense", action="store_true", help="do not time the dense H_θ")
    args = p.parse_args()
    torch.set_default_dtype(torch.float64)
    d, N, L = args.dim, args.samples, 5
    print(
        f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    g64, g32 = gemm_gflops(torch.float64), gemm_gflops(torch.float32)
    print(f"# GEMM throughput: fp64 {g64:.1f} GFLOP/s, fp32 {g32:.1f} GFLOP/s")
    model = make_mlp(d, L)
    task = make_task(d, N)
    problem = attach_lora(model, task.X, task.y, rank=args.rank, alpha=float(args.rank))
    theta = init_theta(problem)
    w = {k: v.detach() for k, v in problem.weights(theta).items()}
    ours = MLPHessianOperator(problem, w)
    P = ours.shape[0]
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(P, args.k, generator=gen)
    v1 = V[:, :1]
    ref_k = HessianOperator(problem.loss_w, w).matmat(V)  # reverse-over-reverse autograd reference
    flops = (6 * L - 4) * 2 * N * d * d  # GEMMs of 2·N·d² in the R-op: 6 per layer, 2 fewer at each end
    floor = flops / (g64 * 1e9)
    print(
        f"# model: {L}-layer SiLU MLP, d={d}, N={N}, P={P} FFT params; HVP GEMM floor {floor * 1e3:.2f} ms/vector at fp64"
    )

    # --- Hessian-vector products of H -------------------------------------------------------------
    # Every contender is checked once against the reference, then all are timed round-robin
    # (``interleaved``), so a slow spell of the machine hits them alike and the ratios hold.
    lay = problem.weight_layout

    def loss_flat(x):
        return problem.loss_w(lay.unflatten(x))

    x0 = lay.flatten(w)
    fwd = vmap(lambda v: jvp(grad(loss_flat), (x0,), (v,))[1])
    rr = HessianOperator(problem.loss_w, w)
    params = [model[i].weight for i in range(0, 2 * L - 1, 2)]
    scale = d / 2.0  # our L = (1/2N)Σ‖·‖² = (d/2)·MSELoss(mean)
    one, blk = "HVP H, 1 vector", f"HVP H, per vector (k={args.k})"
    # (task, tool, fn, vectors per call, reference or None when the product is another matrix)
    hvps = [
        (one, "signal-drift (R-op)", lambda: ours.matmat(v1), 1, ref_k[:, :1]),
        (blk, "signal-drift (R-op)", lambda: ours.matmat(V), args.k, ref_k),
        (one, "torch.func rev-over-rev", lambda: rr.matmat(v1), 1, ref_k[:, :1]),
        (blk, "torch.func vmap(jvp(grad))", lambda: fwd(V.T).T, args.k, ref_k),
    ]
    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator

        for cls, name in (
            (HessianLinearOperator, "curvlinops Hessian"),
            (GGNLinearOperator, "curvlinops GGN"),
        ):
            try:
                op = cls(model, torch.nn.MSELoss(), params, [(task.X, task.y)], check_deterministic=False)
                hess = cls is HessianLinearOperator
                hvps.append((blk, name, lambda op=op: scale * (op @ V), args.k, ref_k if hess else None))
            except Exception as err:  # noqa: BLE001
                record(blk, name, None, f"FAILS: {str(err).splitlines()[0][:90]}")
    except ImportError:
        record("HVP H", "curvlinops", None, "not installed")
    try:
        import hessian_eigenthings as he

        def he_loss(m, batch):
            x, y = batch
            return 0.5 * ((m(x) - y) ** 2).sum(-1).mean()

        heop = he.HessianOperator(model, [(task.X, task.y)], he_loss)
        hvps.append((one, "hessian-eigenthings", lambda: heop.matvec(v1[:, 0])[:, None], 1, ref_k[:, :1]))
    except ImportError:
        heop = None
        record("HVP H", "hessian-eigenthings", None, "not installed")
    try:
        from pyhessian import hessian as PyHessian
        from pyhessian.utils import hessian_vector_product

        # cuda=False: its default cuda=True fails on a CPU build ("Torch not compiled with CUDA enabled")
        ph = PyHessian(
            model, lambda out, y: 0.5 * ((out - y) ** 2).sum(-1).mean(), data=(task.X, task.y), cuda=False
        )
        ph_v = [
            t.reshape(p.shape)
            for t, p in zip(v1[:, 0].split([p.numel() for p in ph.params]), ph.params, strict=True)
        ]

        def ph_hvp():
            return torch.cat([h.reshape(-1) for h in hessian_vector_product(ph.gradsH, ph.params, ph_v)])[
                :, None
            ]

        hvps.append((one, "PyHessian 0.1", ph_hvp, 1, ref_k[:, :1]))
    except ImportError:
        ph = None
        record("HVP H", "PyHessian", None, "not installed")
    checked = []
    for task_, who, fn, per, ref in hvps:
        try:
            out = fn()
        except Exception as err:  # noqa: BLE001  (a peer that fails is reported, not hidden)
            record(task_, who, None, f"FAILS: {str(err).splitlines()[0][:90]}")
            continue
        err = None if ref is None else rel(out, ref)
        note = "GGN ≠ H: not comparable" if ref is None else f"rel err {err:.1e}"
        checked.append((task_, who, fn, per, note, err))
    best = interleaved([c[2] for c in checked])
    for (task_, who, _, per, note, err), t in zip(checked, best, strict=True):
        if who.startswith("signal-drift") and per > 1:
            note += f"; {flops / (t / per) / 1e9:.1f} GFLOP/s = {floor / (t / per):.0%} of GEMM peak"
        record(task_, who, t / per, note, err, TOL["product"])

    # --- signal / drift / H_θ matvecs ---------------------------------------------------------
    c = curvature(problem, theta, H=ours)
    Vt = torch.randn(c.signal.shape[0], args.k, generator=gen)
    # references: Jᵀ(H_autograd(J v)) for the signal, autograd H_θ minus it for the drift
    ref_sig = c.J.rmatmat(rr.matmat(c.J.matmat(Vt)))
    ref_drift = c.H_theta.matmat(Vt) - ref_sig
    for name, op, ref in (("signal", c.signal, ref_sig), ("drift", c.drift, ref_drift)):
        t, out = timeit(lambda op=op: op.matmat(Vt))
        err = rel(out, ref)
        record(
            f"{name} matvec, per vector (k={args.k})",
            "signal-drift",
            t / args.k,
            f"rel err {err:.1e}",
            err,
            TOL["product"],
        )

    # --- top-k eigenvalues of H -----------------------------------------------------------------
    ref_top = eigsh(ours, k=20, which="LA", tol=1e-13).values[::-1]
    for k in (1, 20):
        t, res = timeit(
            lambda k=k: lanczos_eigs(ours, k=k, which="LA", steps=150 if k == 1 else 300), repeat=1, warmup=0
        )
        err = float(np.max(np.abs(res.values[::-1] - ref_top[:k]) / abs(ref_top[0])))
        record(
            f"top-{k} eigenvalues of H",
            "signal-drift (torch Lanczos)",
            t,
            f"max rel err {err:.1e}, {res.matvecs} matvecs",
            err,
            TOL["eigenvalues"],
        )
        t, res = timeit(lambda k=k: eigsh(ours, k=k, which="LA", tol=1e-10), repeat=1, warmup=0)
        err = float(np.max(np.abs(res.values[::-1] - ref_top[:k]) / abs(ref_top[0])))
        record(
            f"top-{k} eigenvalues of H",
            "signal-drift (scipy eigsh)",
            t,
            f"max rel err {err:.1e}, {res.matvecs} matvecs",
            err,
            TOL["eigenvalues"],
        )
        if heop is not None:
            try:
                steps = 150 if k == 1 else 300  # its default is 2k steps: give it our budget
                t, res = timeit(
                    lambda k=k, steps=steps: he.lanczos(
                        heop, k=k, which="LA", tol=1e-10, seed=0, max_iter=steps, reorthogonalize=True
                    ),
                    repeat=1,
                    warmup=0,
                )
                vals = np.sort(
                    np.asarray(res.eigenvalues.cpu() if hasattr(res.eigenvalues, "cpu") else res.eigenvalues)
                )[::-1]
                err = float(np.max(np.abs(vals[:k] - ref_top[:k]) / abs(ref_top[0])))
                record(
                    f"top-{k} eigenvalues of H",
                    "hessian-eigenthings lanczos",
                    t,
                    f"max rel err {err:.1e}, {steps} steps",
                    err,
                    TOL["eigenvalues"],
                )
            except Exception as err:  # noqa: BLE001
                record(
                    f"top-{k} eigenvalues of H",
                    "hessian-eigenthings lanczos",
                    None,
                    f"FAILS: {str(err)[:80]}",
                )

        if ph is not None:
            # power iteration with deflation (it finds the largest |λ|; here those are the top of H)
            it, tol = (1000, 1e-10) if k == 1 else (100, 1e-3)
            try:
                torch.manual_seed(0)
                t, (vals, _) = timeit(lambda k=k, it=it, tol=tol: ph.eigenvalues(maxIter=it, tol=tol, top_n=k),
                                      repeat=1, warmup=0)  # fmt: skip
                vals = np.sort(np.asarray(vals))[::-1]
                err = float(np.max(np.abs(vals[:k] - ref_top[:k]) / abs(ref_top[0])))
                record(
                    f"top-{k} eigenvalues of H",
                    f"PyHessian power iteration ({it} it, tol {tol:.0e})",
                    t,
                    f"max rel err {err:.1e}",
                    err,
                    TOL["eigenvalues"],
                )
            except Exception as err:  # noqa: BLE001
                record(
                    f"top-{k} eigenvalues of H", "PyHessian power iteration", None, f"FAILS: {str(err)[:80]}"
                )

    # --- trace of H -----------------------------------------------------------------------------
    t, K = timeit(lambda: ours.partial_traces(), repeat=1)
    tr = float(sum(torch.trace(k) for k in K.values()))
    record(
        "trace of H",
        "signal-drift (exact partial traces)",
        t,
        f"exact (tested in the suite): tr H = {tr:.6g}",
    )
    # the same estimator at the same budget as the peer: an equal-accuracy comparison
    t, est = timeit(lambda: hutchpp(ours, 300, seed=0), repeat=1)
    record(
        "trace of H",
        "signal-drift (Hutch++, 300 matvecs)",
        t,
        f"rel err {abs(est.value - tr) / abs(tr):.1e} (its stderr {est.stderr / abs(tr):.1e})",
    )
    if heop is not None:
        try:
            t, res = timeit(lambda: he.hutch_plus_plus(heop, num_matvecs=300, seed=0), repeat=1, warmup=0)
            val = float(getattr(res, "estimate", getattr(res, "trace", np.nan)))
            record(
                "trace of H",
                "hessian-eigenthings (Hutch++, 300 matvecs)",
                t,
                f"rel err {abs(val - tr) / abs(tr):.1e}",
            )
        except Exception as err:  # noqa: BLE001
            record(
                "trace of H", "hessian-eigenthings (Hutch++, 300 matvecs)", None, f"FAILS: {str(err)[:80]}"
            )

    if ph is not None:
        try:
            # Hutchinson only (no Hutch++); tol=-inf runs all 300 probes (its stop test divides by the
            # signed running mean, so a negative trace would stop it after two)
            torch.manual_seed(0)
            t, samples = timeit(lambda: ph.trace(maxIter=300, tol=float("-inf")), repeat=1, warmup=0)
            s = np.asarray(samples)
            record(
                "trace of H",
                "PyHessian (Hutchinson, 300 matvecs)",
                t,
                f"rel err {abs(s.mean() - tr) / abs(tr):.1e} (its stderr {s.std(ddof=1) / len(s) ** 0.5 / abs(tr):.1e})",
            )
        except Exception as err:  # noqa: BLE001
            record("trace of H", "PyHessian (Hutchinson, 300 matvecs)", None, f"FAILS: {str(err)[:80]}")
        for prm in ph.params:  # PyHessian leaves a graph-carrying .grad on every parameter
            prm.grad = None

    # --- dense H_θ and its eigendecomposition --------------------------------------------------
    if not args.skip_dense:

        def dense_ours():
            M = c.signal.to_dense() + c.drift.to_dense()
            return M, torch.linalg.eigvalsh(M)

        t, (M, e) = timeit(dense_ours, repeat=1, warmup=0)
        t2, M2 = timeit(lambda: c.H_theta.to_dense(), repeat=1, warmup=0)  # the reference
        err = rel(M, M2)
        task_ = f"dense H_θ ({M.shape[0]}²)"
        note = f"incl. all eigenvalues (eigvalsh); rel err {err:.1e}"
        record(task_, "signal-drift (signal + drift)", t, note, err, TOL["product"])
        record(task_, "torch.func rev-over-rev", t2, "no eigenvalues; the reference")

    if not args.skip_command:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "signal_drift.spectra", "--dim", str(d), "--out", "/tmp/bench_spectra",
                        "--no-plot"], check=True, capture_output=True)  # fmt: skip
        record(f"spectra --dim {d} (whole command)", "signal-drift", time.perf_counter() - t0)

    summary()

    if WRONG:
        sys.exit("signal-drift gave wrong answers in: " + "; ".join(WRONG))


if __name__ == "__main__":
    main()
