"""Side-by-side benchmark: signal-drift vs curvlinops, hessian-eigenthings and plain torch.func.

One process, one model (5-layer SiLU MLP, width d, N samples, float64), one set of probe
vectors. Every timed result is checked against a reference; a fast wrong answer is a failure.
Peers that are not installed or that fail are reported as such, not hidden.

    python benchmarks/run.py [--dim 64] [--samples 1024] [--rank 4] [--skip-command]

Install the peers without their CUDA-pulling dependencies (what `make bench` does):
    pip install --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 \
        hessian-eigenthings==1.0.0a5 einops einconv opt-einsum linear_operator unfoldNd \
        jaxtyping wadler_lindig
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
from signal_drift._mlp import MLPHessianOperator
from signal_drift.hessian import HessianOperator
from signal_drift.spectra import eigsh, lanczos_eigs

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


def record(task, who, seconds, note=""):
    ROWS.append((task, who, seconds, note))
    s = f"{seconds * 1e3:10.2f} ms" if seconds is not None else "      —     "
    print(f"{task:<34} {who:<34} {s}  {note}", flush=True)


def gemm_gflops(dtype, n=2048):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t, _ = timeit(lambda: a @ b, repeat=5)
    return 2 * n**3 / t / 1e9


def rel(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


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
    flops = 6 * 2 * N * d * d * L  # six GEMMs of 2·N·d² per layer in the R-op
    floor = flops / (g64 * 1e9)
    print(
        f"# model: {L}-layer SiLU MLP, d={d}, N={N}, P={P} FFT params; HVP GEMM floor {floor * 1e3:.2f} ms/vector at fp64"
    )

    # --- Hessian-vector products of H -------------------------------------------------------------
    t, out = timeit(lambda: ours.matmat(v1))
    record("HVP H, 1 vector", "signal-drift (R-op)", t, f"rel err {rel(out, ref_k[:, :1]):.1e}")
    t, out = timeit(lambda: ours.matmat(V))
    tb_ours = t / args.k
    record(
        f"HVP H, per vector (k={args.k})",
        "signal-drift (R-op)",
        tb_ours,
        f"rel err {rel(out, ref_k):.1e}; {flops / tb_ours / 1e9:.1f} GFLOP/s = {floor / tb_ours:.0%} of GEMM peak",
    )
    rr = HessianOperator(problem.loss_w, w)
    t, out = timeit(lambda: rr.matmat(v1))
    record("HVP H, 1 vector", "torch.func rev-over-rev", t, f"rel err {rel(out, ref_k[:, :1]):.1e}")
    lay = problem.weight_layout

    def loss_flat(x):
        return problem.loss_w(lay.unflatten(x))

    x0 = lay.flatten(w)
    g = grad(loss_flat)
    fwd = vmap(lambda v: jvp(g, (x0,), (v,))[1])
    try:
        t, out = timeit(lambda: fwd(V.T).T)
        record(
            f"HVP H, per vector (k={args.k})",
            "torch.func vmap(jvp(grad))",
            t / args.k,
            f"rel err {rel(out, ref_k):.1e}",
        )
    except Exception as err:  # noqa: BLE001
        record(
            f"HVP H, per vector (k={args.k})", "torch.func vmap(jvp(grad))", None, f"FAILS: {str(err)[:80]}"
        )

    params = [model[i].weight for i in range(0, 2 * L - 1, 2)]
    scale = d / 2.0  # our L = (1/2N)Σ‖·‖² = (d/2)·MSELoss(mean)
    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator

        for cls, name in (
            (HessianLinearOperator, "curvlinops Hessian"),
            (GGNLinearOperator, "curvlinops GGN"),
        ):
            try:
                op = cls(model, torch.nn.MSELoss(), params, [(task.X, task.y)], check_deterministic=False)
                t, out = timeit(lambda op=op: op @ V)
                note = (
                    f"rel err {rel(scale * out, ref_k):.1e}"
                    if cls is HessianLinearOperator
                    else "GGN ≠ H: not comparable"
                )
                record(f"HVP H, per vector (k={args.k})", name, t / args.k, note)
            except Exception as err:  # noqa: BLE001
                record(
                    f"HVP H, per vector (k={args.k})", name, None, f"FAILS: {str(err).splitlines()[0][:90]}"
                )
    except ImportError:
        record("HVP H", "curvlinops", None, "not installed")
    try:
        import hessian_eigenthings as he

        def he_loss(m, batch):
            x, y = batch
            return 0.5 * ((m(x) - y) ** 2).sum(-1).mean()

        heop = he.HessianOperator(model, [(task.X, task.y)], he_loss)
        t, out = timeit(lambda: heop.matvec(v1[:, 0]))
        record("HVP H, 1 vector", "hessian-eigenthings", t, f"rel err {rel(out[:, None], ref_k[:, :1]):.1e}")
    except ImportError:
        heop = None
        record("HVP H", "hessian-eigenthings", None, "not installed")

    # --- signal / drift / H_θ matvecs ---------------------------------------------------------
    c = curvature(problem, theta, H=ours)
    Vt = torch.randn(c.signal.shape[0], args.k, generator=gen)
    t, _ = timeit(lambda: c.signal.matmat(Vt))
    record(f"signal matvec, per vector (k={args.k})", "signal-drift", t / args.k)
    t, _ = timeit(lambda: c.drift.matmat(Vt))
    record(f"drift matvec, per vector (k={args.k})", "signal-drift", t / args.k)

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
        )
        t, res = timeit(lambda k=k: eigsh(ours, k=k, which="LA", tol=1e-10), repeat=1, warmup=0)
        err = float(np.max(np.abs(res.values[::-1] - ref_top[:k]) / abs(ref_top[0])))
        record(
            f"top-{k} eigenvalues of H",
            "signal-drift (scipy eigsh)",
            t,
            f"max rel err {err:.1e}, {res.matvecs} matvecs",
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
                )
            except Exception as err:  # noqa: BLE001
                record(
                    f"top-{k} eigenvalues of H",
                    "hessian-eigenthings lanczos",
                    None,
                    f"FAILS: {str(err)[:80]}",
                )

    # --- trace of H -----------------------------------------------------------------------------
    t, K = timeit(lambda: ours.partial_traces(), repeat=1)
    tr = float(sum(torch.trace(k) for k in K.values()))
    record("trace of H (exact)", "signal-drift partial traces", t, f"tr H = {tr:.6g}")
    if heop is not None:
        try:
            t, res = timeit(lambda: he.hutch_plus_plus(heop, num_matvecs=300, seed=0), repeat=1, warmup=0)
            val = float(getattr(res, "estimate", getattr(res, "trace", np.nan)))
            record(
                "trace of H (Hutch++, 300 matvecs)",
                "hessian-eigenthings",
                t,
                f"rel err {abs(val - tr) / abs(tr):.1e}",
            )
        except Exception as err:  # noqa: BLE001
            record(
                "trace of H (Hutch++, 300 matvecs)", "hessian-eigenthings", None, f"FAILS: {str(err)[:80]}"
            )

    # --- dense H_θ and its eigendecomposition --------------------------------------------------
    if not args.skip_dense:

        def dense_ours():
            M = c.signal.to_dense() + c.drift.to_dense()
            return M, torch.linalg.eigvalsh(M)

        t, (M, e) = timeit(dense_ours, repeat=1, warmup=0)
        record(f"dense H_θ ({M.shape[0]}²) + eigvalsh", "signal-drift (signal + drift)", t)
        t, M2 = timeit(lambda: c.H_theta.to_dense(), repeat=1, warmup=0)
        record(f"dense H_θ ({M.shape[0]}²)", "torch.func rev-over-rev", t, f"rel err {rel(M, M2):.1e}")

    if not args.skip_command:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "signal_drift.spectra", "--dim", str(d), "--out", "/tmp/bench_spectra",
                        "--no-plot"], check=True, capture_output=True)  # fmt: skip
        record(f"spectra --dim {d} (whole command)", "signal-drift", time.perf_counter() - t0)

    print("\n| task | tool | time | note |\n|---|---|---|---|")
    for task_, who, s, note in ROWS:
        print(f"| {task_} | {who} | {'—' if s is None else f'{s * 1e3:.1f} ms'} | {note} |")


if __name__ == "__main__":
    main()
