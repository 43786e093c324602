"""ALS convergence of Tucker-2: HOOI, our Tucker2-ALS-Sigma and the published method.

Run from the repository root::

    python -m benchmarks.als_convergence            # (128, 128, 3, 3), ranks (64, 64)
    python -m benchmarks.als_convergence --quick    # tiny smoke run (seconds)
    python -m benchmarks.als_convergence --torch    # also time ours on torch CPU tensors

On a kernel of shape (128, 128, 3, 3) with a realistic covariance (second
moment of 3x3 patches of real Fashion-MNIST feature maps, see
``benchmarks.common.realistic_covariance``) and ranks (64, 64) it runs

* HOOI (Frobenius Tucker-2; its Sigma-error is evaluated outside the timing),
* ``sigmadecomp.tucker2`` with ``sigma`` (ours: joint closed-form (U_T, core)
  block, U_S by Kronecker-preconditioned CG warm-started at the current U_S),
* a re-statement of the published Tucker2-ALS-Sigma: HOSVD factors with a
  Sigma-least-squares core as the start, then per sweep U_S by MINRES from
  zero (``rtol=1e-10``, ``maxiter=2000``) on the U_S normal equations, U_T by
  its own least-squares solve, then the core by its own least-squares solve.
  The operator is applied matrix-free with the same contraction order as ours
  (one ``T x n x n`` product per MINRES iteration), so the comparison measures
  the algorithms, not the operator code. It is capped at ``--baseline-sweeps``
  sweeps (default 5: its 5-sweep error is the reference).

It writes ``notes/als_tucker2.csv`` (method, run, sweep, seconds, relative
Sigma-error), ``notes/als_tucker2.png`` (error vs sweep and vs wall time) and
prints a one-line summary: the time each method needs to reach the published
method's 5-sweep error and their ratio (medians over ``--runs`` runs of ours
and HOOI; ``--baseline-runs`` runs of the published method).

Timings are wall-clock at the libraries' default threads, or with BLAS limited
to ``--threads`` threads (``--threads 1`` gives steadier figures on a shared
machine); all methods run in float64 on NumPy in the same process, and the
summary names the setting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from benchmarks.common import (NOTES_DIR, Timer, check_output_dir, positive_int, realistic_covariance,
                               threads_setting, trained_like_kernel, write_csv)
from sigmadecomp import relative_sigma_error, tucker2
from sigmadecomp._backend import einsum


# ---------------------------------------------------------------------------
# the published method, re-stated (NumPy, float64)
# ---------------------------------------------------------------------------

def published_tucker2_sigma(K, Sig, ranks, *, n_sweeps=5, minres_rtol=1e-10, minres_maxiter=2000,
                            record=None):
    """Tucker2-ALS-Sigma as published: separate blocks, MINRES from zero for U_S.

    ``record(sweep, U_T, G, U_S, error)`` is called after the start and every
    sweep; the time it takes is the caller's to subtract.
    """
    T, S, H, W = K.shape
    P, n = H * W, S * H * W
    r_T, r_S = ranks
    K1 = K.reshape(T, n)
    KS = K1 @ Sig
    total = float(np.sum(KS * K1))
    S4 = Sig.reshape(S, P, S, P)

    def error(U_T, G, U_S):
        Kt = einsum("ta,abp,sb->tsp", U_T, G, U_S).reshape(T, n)
        D = K1 - Kt
        return float(np.sqrt(max(np.sum((D @ Sig) * D), 0.0) / total))

    def core_ls(U_T, U_S):  # core given both factors (normal equations)
        N = einsum("tsp,sb->tbp", KS.reshape(T, S, P), U_S).reshape(T, r_S * P)
        C = einsum("sb,spuq,uc->bpcq", U_S, S4, U_S).reshape(r_S * P, r_S * P)
        DX = np.linalg.solve(C, N.T).T  # (T, r_S P)
        G1 = np.linalg.solve(U_T.T @ U_T, U_T.T @ DX)
        return G1.reshape(r_T, r_S, P)

    # start: HOSVD factors, Sigma-least-squares core
    U_T = scipy.linalg.svd(K1, full_matrices=False)[0][:, :r_T]
    U_S = scipy.linalg.svd(np.moveaxis(K, 1, 0).reshape(S, -1), full_matrices=False)[0][:, :r_S]
    G = core_ls(U_T, U_S)
    err = error(U_T, G, U_S)
    if record:
        record(0, U_T, G, U_S, err)
    for sweep in range(1, n_sweeps + 1):
        # U_S: normal equations H(X) = rhs, MINRES from zero
        Wf = einsum("ta,abp->tbp", U_T, G)  # (T, r_S, P)
        rhs = einsum("tsp,tbp->sb", KS.reshape(T, S, P), Wf).reshape(-1)

        def matvec(x, Wf=Wf):
            X = x.reshape(S, r_S)
            Z = einsum("sb,tbp->tsp", X, Wf).reshape(T, n)
            return einsum("tsp,tbp->sb", (Z @ Sig).reshape(T, S, P), Wf).reshape(-1)

        op = scipy.sparse.linalg.LinearOperator((S * r_S, S * r_S), matvec=matvec, dtype=np.float64)
        x, _ = scipy.sparse.linalg.minres(op, rhs, rtol=minres_rtol, maxiter=minres_maxiter)
        U_S = x.reshape(S, r_S)
        # U_T given (G, U_S): least squares
        Wm = einsum("abp,sb->asp", G, U_S).reshape(r_T, n)
        WS = Wm @ Sig
        U_T = np.linalg.solve(WS @ Wm.T, WS @ K1.T).T
        # core given (U_T, U_S): least squares
        G = core_ls(U_T, U_S)
        err = error(U_T, G, U_S)
        if record:
            record(sweep, U_T, G, U_S, err)
    return U_T, G, U_S


# ---------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------

class Trace:
    """Records (sweep, seconds, error); time spent inside the recorder is excluded."""

    def __init__(self):
        self.rows = []
        self.t0 = time.perf_counter()
        self.paused = 0.0

    def add(self, sweep, error_fn):
        t_in = time.perf_counter()
        elapsed = t_in - self.t0 - self.paused
        err = error_fn()
        self.rows.append((sweep, elapsed, err))
        self.paused += time.perf_counter() - t_in


def time_to_reach(rows, target):
    for sweep, sec, err in rows:
        if err <= target:
            return sec, sweep
    return None, None


def run_hooi(K, Sig, ranks, n_iter_max):
    tr = Trace()

    def cb(res):
        tr.add(len(tr.rows), lambda: relative_sigma_error(K, res.to_tensor(), Sig))

    tucker2(K, ranks, None, n_iter_max=n_iter_max, tol=0, callback=cb)
    return tr.rows


def run_ours(K, Sig, ranks, n_iter_max, **options):
    tr = Trace()

    def cb(res):
        tr.add(len(tr.rows), lambda: res.errors[-1])

    res = tucker2(K, ranks, Sig, n_iter_max=n_iter_max, tol=0, callback=cb, **options)
    return tr.rows, res


def run_published(K, Sig, ranks, n_sweeps, maxiter):
    tr = Trace()
    published_tucker2_sigma(K, Sig, ranks, n_sweeps=n_sweeps, minres_maxiter=maxiter,
                            record=lambda s, a, g, b, e: tr.add(s, lambda: e))
    return tr.rows


def gemm_seconds(Sig, r, repeats=20):
    """Median time of one ``r x n x n`` product (the unit of work of a sweep)."""
    Z = np.random.default_rng(0).standard_normal((r, Sig.shape[0]))
    times = []
    for _ in range(repeats):
        with Timer() as t:
            Z @ Sig
        times.append(t.seconds)
    return statistics.median(times)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run (32 channels, ranks (16, 16)); writes to a temporary directory")
    ap.add_argument("--runs", type=positive_int, default=5, help="runs of ours and HOOI (median)")
    ap.add_argument("--baseline-runs", type=positive_int, default=3,
                    help="runs of the published method (median; default 3)")
    ap.add_argument("--baseline-sweeps", type=positive_int, default=5,
                    help="sweeps of the published method")
    ap.add_argument("--sweeps", type=positive_int, default=40, help="sweeps of ours and HOOI")
    ap.add_argument("--inner-maxiter", type=positive_int, default=10,
                    help="CG iterations per sweep of ours (tucker2's inner.maxiter)")
    ap.add_argument("--threads", type=threads_setting, default="default",
                    help="BLAS threads: 'default' (the libraries' own choice, the default) or "
                         "a count to pin them to, e.g. 1 for steadier figures on a shared machine")
    ap.add_argument("--torch", action="store_true",
                    help="also time ours on torch CPU tensors (same code path; not in the CSV)")
    ap.add_argument("--out", default=None,
                    help="output directory for CSV and PNG (default notes/; a temporary "
                         "directory with --quick)")
    args = ap.parse_args(argv)
    check_output_dir(ap, "--out", args.out)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="als_quick_") if args.quick else NOTES_DIR

    try:
        from threadpoolctl import threadpool_limits

        if args.threads != "default":
            threadpool_limits(args.threads)
    except ImportError:  # pragma: no cover
        pass
    torch = None
    if args.torch:
        import torch

        if args.threads != "default":
            torch.set_num_threads(args.threads)

    if args.quick:
        C, ranks, maxiter = 32, (16, 16), 300
        args.runs, args.sweeps = min(args.runs, 2), min(args.sweeps, 15)
    else:
        C, ranks, maxiter = 128, (64, 64), 2000
    Sig, source = realistic_covariance(channels=C, k=3)
    K = trained_like_kernel(C, C, 3, seed=0)
    n = Sig.shape[0]
    lam = np.linalg.eigvalsh(Sig)
    print(f"kernel {K.shape}, ranks {ranks}, sigma {Sig.shape} from {source} patches, "
          f"numerical rank {int(np.sum(lam > 1e-10 * lam[-1]))}/{n}, "
          f"condition {lam[-1] / max(lam[lam > 1e-10 * lam[-1]][0], 1e-300):.2e}, threads {args.threads}")

    csv_rows = []

    pub_runs = []
    for run in range(args.baseline_runs):
        rows = run_published(K, Sig, ranks, args.baseline_sweeps, maxiter)
        pub_runs.append(rows)
        csv_rows += [dict(method="published", run=run, sweep=s, seconds=f"{t:.4f}", error=f"{e:.8g}")
                     for s, t, e in rows]
        print(f"published run {run}: " + ", ".join(f"{s}:{e:.5f}@{t:.1f}s" for s, t, e in rows))
    target = pub_runs[0][-1][2]

    ours_runs, hooi_runs, gemms = [], [], []
    for run in range(args.runs):
        rows, res = run_ours(K, Sig, ranks, args.sweeps, inner={"maxiter": args.inner_maxiter})
        ours_runs.append(rows)
        gemms.append(gemm_seconds(Sig, ranks[0]))  # measured under the same load as the run
        csv_rows += [dict(method="ours", run=run, sweep=s, seconds=f"{t:.4f}", error=f"{e:.8g}")
                     for s, t, e in rows]
        rows = run_hooi(K, Sig, ranks, args.sweeps)
        hooi_runs.append(rows)
        csv_rows += [dict(method="hooi", run=run, sweep=s, seconds=f"{t:.4f}", error=f"{e:.8g}")
                     for s, t, e in rows]
    check = relative_sigma_error(K, res.to_tensor(), Sig)
    print(f"ours final error {ours_runs[-1][-1][2]:.6f} (recomputed from the reconstruction: {check:.6f}), "
          f"monotone: {bool(np.all(np.diff(res.errors) <= 1e-12))}")

    os.makedirs(args.out, exist_ok=True)
    suffix = ""
    csv_path = os.path.join(args.out, f"als_tucker2{suffix}.csv")
    write_csv(csv_path, csv_rows, ["method", "run", "sweep", "seconds", "error"])

    def med_reach(runs):
        hits = [time_to_reach(r, target) for r in runs]
        secs = [h[0] for h in hits if h[0] is not None]
        if len(secs) < len(runs):
            return None, None
        return statistics.median(secs), statistics.median(h[1] for h in hits)

    t_pub, s_pub = med_reach(pub_runs)
    t_ours, s_ours = med_reach(ours_runs)
    t_hooi, _ = med_reach(hooi_runs)
    sweep_ours = statistics.median(
        (r[-1][1] - r[1][1]) / (len(r) - 2) for r in ours_runs if len(r) > 2)
    sweep_pub = statistics.median((r[-1][1] - r[0][1]) / (len(r) - 1) for r in pub_runs)
    g = statistics.median(gemms)
    print(f"per sweep: ours {sweep_ours * 1e3:.0f} ms = {sweep_ours / g:.1f} r_T x n x n GEMMs "
          f"({g * 1e3:.1f} ms each; {args.inner_maxiter + 1} operator applications + the "
          f"closed-form block); published {sweep_pub:.2f} s = {sweep_pub / g:.0f} GEMMs")
    hooi_txt = "never" if t_hooi is None else f"{t_hooi:.2f} s"
    ratio = (t_pub / t_ours) if (t_pub and t_ours) else float("nan")
    ours_txt = "never" if t_ours is None else f"{t_ours:.2f} s (sweep {s_ours:g})"
    summary = (f"SUMMARY target = published {args.baseline_sweeps}-sweep Sigma-error {target:.5f}: "
               f"published {t_pub:.1f} s, ours {ours_txt}, HOOI {hooi_txt}; "
               f"ours is {ratio:.0f}x sooner (medians of {args.runs} runs of ours and HOOI, "
               f"{args.baseline_runs} of the published method; threads {args.threads})")
    print(summary)
    if torch is not None:
        Kt, St = torch.as_tensor(K), torch.as_tensor(Sig)
        hits = [time_to_reach(run_ours(Kt, St, ranks, args.sweeps,
                                       inner={"maxiter": args.inner_maxiter})[0],
                              target)[0] for _ in range(args.runs)]
        hits = [h for h in hits if h is not None]
        print(f"ours on torch CPU tensors: target reached in {statistics.median(hits):.2f} s "
              f"(median of {len(hits)} runs)" if hits else "ours on torch: target not reached")

    png_path = os.path.join(args.out, "als_tucker2.png")
    if plot(csv_path, png_path, target, f"{'x'.join(map(str, K.shape))} kernel, ranks {ranks}, "
            f"{source} patch covariance"):
        print(f"wrote {csv_path} and {png_path}")
    return summary


def plot(csv_path, png_path, target, title):
    """Error vs sweep and vs time (top), excess over the best error found (bottom)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib missing: no plot")
        return False
    import csv

    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["run"] == "0"]
    best = min(float(r["error"]) for r in rows)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    styles = {"published": ("C3", "published method"), "ours": ("C0", "Tucker2-ALS-Sigma (ours)"),
              "hooi": ("C7", "HOOI (Frobenius)")}
    for name, (color, label) in styles.items():
        sel = [r for r in rows if r["method"] == name]
        sw = [int(r["sweep"]) for r in sel]
        sec = [max(float(r["seconds"]), 1e-3) for r in sel]
        err = np.array([float(r["error"]) for r in sel])
        excess = np.maximum(err - best, 1e-6)
        for ax, x, y in ((axes[0, 0], sw, err), (axes[0, 1], sec, err),
                         (axes[1, 0], sw, excess), (axes[1, 1], sec, excess)):
            ax.plot(x, y, "-o", ms=3, color=color, label=label)
    for ax in axes[0]:
        ax.axhline(target, color="k", lw=0.7, ls="--")
        ax.set_ylabel("relative Sigma-error")
    for ax in axes[1]:
        ax.axhline(max(target - best, 1e-6), color="k", lw=0.7, ls="--")
        ax.set_ylabel(f"error - {best:.5f} (best found)")
    for ax in axes.ravel():
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[1]:
        ax.set_ylim(1e-6, 1.0)
    for ax in axes[:, 0]:
        ax.set_xlabel("sweep")
    for ax in axes[:, 1]:
        ax.set_xlabel("wall time [s]")
        ax.set_xscale("log")
    axes[0, 0].legend()
    fig.suptitle(f"Tucker-2 ALS convergence: {title}; dashed: published 5-sweep error")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
