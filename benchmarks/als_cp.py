"""CP-ALS convergence and speed: TensorLy ``parafac`` vs our CP-ALS vs CP-ALS-Sigma.

Kernels ``(128, 128, 3, 3)`` with a decaying channel spectrum
(``trained_like_kernel``) and the second moment of real 3x3 feature-map
patches (``realistic_covariance``, Fashion-MNIST through a small random conv
net), ranks R in {32, 128}.

Measured in one run, every figure a median over repeated runs:

* seconds per sweep of TensorLy's ``parafac`` (NumPy backend) and of our
  Frobenius CP-ALS from the same initial factors for the same number of
  sweeps. Both are exact ALS in the same mode order, so their iterates (and
  errors) agree sweep by sweep -- the time ratio is a ratio at equal error;
  the script checks the errors agree and prints the largest difference;
* seconds per CP-ALS-Sigma sweep, against one ``n x n x R`` GEMM
  (``sigma @ X`` with ``X`` of shape ``(n, R)``, ``n = 1152``) timed right
  after each run (median of the per-run ratios, in wall-clock and in CPU
  time; the CPU-time ratio is less sensitive to other load on the machine);
* relative Sigma-error per sweep of all three (curves; TensorLy's iterates
  recorded through its callback outside the timed runs).

* a CP-ALS-Sigma run with the default ``tol=1e-6`` (``n_iter_max=100``):
  sweeps, seconds, final error and whether it converged; with the default
  (exact) B-updates every one is solved to ``inner.rtol``. The figures in
  ``notes/als_convergence.md`` were taken when the default was the capped
  schedule that is now ``inner={'maxiter': 'adaptive'}`` (see ``notes/sweeps.md``).

The timings run twice: first with the libraries' default threads, then with
BLAS pinned to one thread (``threadpoolctl``), which keeps the comparison fair
and stable on a shared machine; the CSV and plots come from the pinned run.

Run from the repository root::

    python -m benchmarks.als_cp            # full run (a few minutes): CSV + PNGs in notes/
    python -m benchmarks.als_cp --quick    # smoke run, prints the figures only
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from benchmarks.common import (NOTES_DIR, Timer, check_output_dir, realistic_covariance,
                               trained_like_kernel, write_csv)
from sigmadecomp import cp, relative_sigma_error
from sigmadecomp.cp import FROBENIUS_INIT_SWEEPS, INNER_MAXITER_START, als_engine


def _median_time(fn, reps):
    times = []
    for _ in range(reps):
        with Timer() as t:
            fn()
        times.append(t.seconds)
    return statistics.median(times)


def _gemm_seconds(sigma, R, reps=21):
    X = np.random.default_rng(0).standard_normal((sigma.shape[0], R))
    sigma @ X  # warm-up
    return _median_time(lambda: sigma @ X, reps)


def run_rank(K, S, R, *, n_fro, n_sig, reps, conv_sweeps=None):
    import tensorly as tl
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import parafac

    tl.set_backend("numpy")
    start = cp(K, R, n_iter_max=0, rng=0)  # our 'svd' start, shared by all methods
    w0, F0 = start.weights, start.factors

    def tl_run(n, callback=None):
        return parafac(K, R, n_iter_max=n, init=CPTensor((w0.copy(), [f.copy() for f in F0])),
                       tol=0.0, return_errors=True, callback=callback)

    def ours_fro(n, callback=None):
        return cp(K, R, init=(w0, F0), n_iter_max=n, tol=0.0, callback=callback)

    def ours_sig(n, init=None):
        return cp(K, R, S, init=(w0, F0) if init is None else init, n_iter_max=n, tol=0.0)

    tl_run(2), ours_fro(2), ours_sig(1)  # warm-up
    t_tl = _median_time(lambda: tl_run(n_fro), reps) / n_fro
    t_fro = _median_time(lambda: ours_fro(n_fro), reps) / n_fro
    # Sigma sweep vs GEMM: each timed run is followed by GEMM timings, and the ratio
    # is taken per run, so that load changes on a shared machine cancel out
    X = np.random.default_rng(0).standard_normal((S.shape[0], R))
    sig_times, ratios, cpu_ratios = [], [], []
    for _ in range(reps):
        c0, w0_ = time.process_time(), time.perf_counter()
        ours_sig(n_sig)
        c1, w1_ = time.process_time(), time.perf_counter()
        for _ in range(9):
            S @ X
        c2, w2_ = time.process_time(), time.perf_counter()
        sig_times.append((w1_ - w0_) / n_sig)
        ratios.append(((w1_ - w0_) / n_sig) / ((w2_ - w1_) / 9))
        cpu_ratios.append(((c1 - c0) / n_sig) / max((c2 - c1) / 9, 1e-9))
    t_sig = statistics.median(sig_times)
    sig_over_gemm = statistics.median(ratios)
    sig_over_gemm_cpu = statistics.median(cpu_ratios)
    t_init = _median_time(lambda: cp(K, R, S, n_iter_max=0, rng=0), reps)  # 'frobenius' init + setup
    t_gemm = _gemm_seconds(S, R)

    # equal error: the same iterates sweep by sweep
    _, tl_err = tl_run(n_fro)
    fro = ours_fro(n_fro)
    diff = float(np.max(np.abs(np.asarray(tl_err) - np.asarray(fro.errors[1:]))))

    # Sigma-error curves (untimed; the time axis uses the medians above)
    tl_sig = []  # TensorLy calls back at the start point and after every sweep
    tl_run(n_fro, callback=lambda cpt, err: tl_sig.append(
        relative_sigma_error(K, tl.cp_to_tensor(cpt), S)))
    fro_sig = []  # cp calls back at the start point and after every sweep too
    ours_fro(n_fro, callback=lambda r: fro_sig.append(relative_sigma_error(K, r.to_tensor(), S)))
    sig = cp(K, R, S, n_iter_max=n_sig, tol=0.0, rng=0)  # default init: 'frobenius'

    # CG iterations per B-update in the timed (default, tol=0) runs: the cap never grows
    eng = als_engine(K, sig.weights, list(sig.factors), S, inner_maxiter=INNER_MAXITER_START)
    for _ in range(3):
        eng.sweep()
    # a run to convergence with the defaults (tol=1e-6): the CG cap doubles on stalls
    # (conv_sweeps: a cap on its sweeps, for the smoke run)
    with Timer() as t_conv:
        conv = cp(K, R, S, rng=0, **({} if conv_sweeps is None else {"n_iter_max": conv_sweeps}))

    rows = []
    for k, e in enumerate(tl_sig):
        rows.append(dict(rank=R, method="tensorly_parafac", sweep=k, time_s=k * t_tl,
                         sigma_error=e, frobenius_error=tl_err[k - 1] if k else fro.errors[0]))
    for k, e in enumerate(fro_sig):
        rows.append(dict(rank=R, method="cp_als", sweep=k, time_s=k * t_fro, sigma_error=e,
                         frobenius_error=fro.errors[k]))
    for k, e in enumerate(sig.errors):
        rows.append(dict(rank=R, method="cp_als_sigma", sweep=k, time_s=t_init + k * t_sig,
                         sigma_error=e, frobenius_error=""))
    summary = dict(
        rank=R, tl_sweep=t_tl, fro_sweep=t_fro, speedup=t_tl / t_fro, max_err_diff=diff,
        sig_sweep=t_sig, gemm=t_gemm, sig_over_gemm=sig_over_gemm, sig_over_gemm_cpu=sig_over_gemm_cpu, init=t_init,
        cg_iters=float(np.mean(eng.cg_iters)),
        conv_seconds=t_conv.seconds, conv_iter=conv.n_iter, conv_error=conv.error,
        conv_converged=conv.converged,
        fro_final_fro=fro.errors[-1], fro_final_sigma=fro_sig[-1],
        sig_start=sig.errors[0], sig_final=sig.errors[-1], n_fro=n_fro, n_sig=n_sig,
    )
    return rows, summary


def plot(rows, R, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"tensorly_parafac": "TensorLy parafac", "cp_als": "our CP-ALS",
              "cp_als_sigma": "our CP-ALS-Sigma"}
    styles = {"tensorly_parafac": dict(ls="--", lw=2.5, alpha=0.6), "cp_als": dict(ls="-"),
              "cp_als_sigma": dict(ls="-", lw=2)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in labels:
        rr = [r for r in rows if r["rank"] == R and r["method"] == m]
        x_it = [r["sweep"] for r in rr]
        x_t = [r["time_s"] for r in rr]
        y = [r["sigma_error"] for r in rr]
        axes[0].plot(x_it, y, label=labels[m], **styles[m])
        axes[1].plot(x_t, y, label=labels[m], **styles[m])
    axes[0].set_xlabel("sweep (CP-ALS-Sigma: after the Frobenius init)")
    axes[1].set_xlabel("seconds (median per-sweep time x sweep; Sigma incl. init)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("relative Sigma-error")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"CP of a (128, 128, 3, 3) kernel, R = {R}, real-patch covariance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="short smoke run (rank 32, 2 repeats, the run to convergence capped at "
                         "10 sweeps), prints figures only")
    ap.add_argument("--out", default=None, help="directory for CSV/PNGs (default: notes/ for a full run)")
    ap.add_argument("--threads", choices=("both", "default", "1"), default="both",
                    help="thread settings to time: library defaults, BLAS pinned to one, or both "
                         "(default, in that order; the CSV/PNGs come from the last one)")
    args = ap.parse_args(argv)
    check_output_dir(ap, "--out", args.out)
    from threadpoolctl import threadpool_limits

    if args.quick:
        ranks, n_fro, n_sig, reps, n_images, conv_sweeps = (32,), 10, 3, 2, 64, 10
    else:
        ranks, n_fro, n_sig, reps, n_images, conv_sweeps = (32, 128), 100, 30, 5, 256, None
    out = args.out if args.out is not None else (None if args.quick else NOTES_DIR)

    S, source = realistic_covariance(channels=128, k=3, n_images=n_images, seed=0)
    K = trained_like_kernel(128, 128, 3, seed=0)
    print(f"kernel {K.shape}, sigma {S.shape} from {source}; "
          f"Frobenius init for Sigma = {FROBENIUS_INIT_SWEEPS} CP-ALS sweeps")
    rows, sums = [], []
    settings = {"both": ("default", 1), "default": ("default",), "1": (1,)}[args.threads]
    for threads in settings:
        print(f"--- threads: {threads}")
        with threadpool_limits(limits=None if threads == "default" else threads):
            rows, s = _run_all(K, S, ranks, n_fro, n_sig, reps, conv_sweeps)
            sums.append((threads, s))
    if out:
        os.makedirs(out, exist_ok=True)
        write_csv(os.path.join(out, "als_cp.csv"), rows,
                  ["rank", "method", "sweep", "time_s", "sigma_error", "frobenius_error"])
        for R in ranks:
            plot(rows, R, os.path.join(out, f"als_cp_R{R}.png"))
        print(f"wrote {out}/als_cp.csv and als_cp_R*.png")
    return sums


def _run_all(K, S, ranks, n_fro, n_sig, reps, conv_sweeps=None):
    rows, sums = [], []
    if True:
        for R in ranks:
            t0 = time.perf_counter()
            r, s = run_rank(K, S, R, n_fro=n_fro, n_sig=n_sig, reps=reps,
                            conv_sweeps=conv_sweeps)
            rows += r
            sums.append(s)
            print(
                f"R={R:4d}: per sweep TensorLy {s['tl_sweep'] * 1e3:8.2f} ms | ours "
                f"{s['fro_sweep'] * 1e3:7.2f} ms | speed-up {s['speedup']:5.1f}x "
                f"(max |error diff| {s['max_err_diff']:.1e}, {n_fro} sweeps)\n"
                f"        CP-ALS-Sigma sweep {s['sig_sweep'] * 1e3:8.2f} ms = "
                f"{s['sig_over_gemm']:5.1f} x GEMM n x n x R ({s['gemm'] * 1e3:.2f} ms) wall, "
                f"{s['sig_over_gemm_cpu']:5.1f} x in CPU time; "
                f"CG iters/B-update {s['cg_iters']:.1f}; init+setup {s['init'] * 1e3:.0f} ms\n"
                f"        Sigma-error: Frobenius CP-ALS {s['fro_final_sigma']:.4f} "
                f"(Frobenius error {s['fro_final_fro']:.4f}) | CP-ALS-Sigma "
                f"{s['sig_start']:.4f} -> {s['sig_final']:.4f} after {n_sig} sweeps\n"
                f"        defaults (tol=1e-6"
                f"{'' if conv_sweeps is None else f', at most {conv_sweeps} sweeps'}): "
                f"{s['conv_iter']} sweeps, {s['conv_seconds']:.1f} s, "
                f"error {s['conv_error']:.5f}, converged={s['conv_converged']} "
                f"[{time.perf_counter() - t0:.0f} s]", flush=True
            )
    return rows, sums


if __name__ == "__main__":
    main()
