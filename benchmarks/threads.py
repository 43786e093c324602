"""Thread policy: every solver at default settings against 1 thread and all cores.

For each solver (``sigma_svd``, ``tucker2``, ``cp``, ``tt_conv``), on NumPy and
torch (float64) inputs, on the channel counts of ResNet-18's 3x3 layers
(``S = T`` in 64, 128, 256, 512, kernels ``(S, S, 3, 3)``, Sigma of side
``n = 9 S``, ranks for a compression ratio of 3), the script times one call

1. at default settings (nothing pinned: the solvers' own thread policy),
2. pinned to one thread (``sigmadecomp.threads(1)``: BLAS and torch),
3. on all cores (``sigmadecomp.threads(cores)``: what every call ran at
   before the policy existed),

in rounds (after one untimed warm-up call; default first in the first round,
the order rotated in the others), and reports the median wall time of
each and its process CPU time (all threads; on a loaded machine the wall time
of identical settings varies with the share of the cores the run gets, the CPU
time much less; spinning worker threads show up as CPU time), the thread count
the policy chose and ``default / best`` (best of the two pinned settings). The load average is
recorded before and after every case: the machine may be shared.

Sweeps are bounded so that the whole run takes minutes: the timings compare
settings on the same work, not convergence.

Kernels have a decaying channel spectrum (``trained_like_kernel``); Sigma is
the second moment of 3x3 patches of random, spatially smooth, channel-mixed
ReLU feature maps with a small ridge (full rank, the strong correlations of
real activations).

Run from the repository root, with no thread environment variables set::

    python -m benchmarks.threads            # full run: notes/threads.md + notes/threads.csv
    python -m benchmarks.threads --quick    # seconds: small layers, prints the table
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import platform
import statistics
import time

import numpy as np

import sigmadecomp
from benchmarks.common import (NOTES_DIR, check_input_file, check_output_file, im2col,
                               positive_int, trained_like_kernel)
from sigmadecomp import cp, sigma_svd, tt_conv, tucker2
from sigmadecomp import _threads
from sigmadecomp._threads import available_cores
from sigmadecomp.ranks import ratio_to_ranks
from sigmadecomp.tt import auto_modes, tt_ranks_for_ratio

SOLVERS = ("sigma_svd", "tucker2", "cp", "tt_conv")
RATIO = 3


def layer_sigma(S, k=3, seed=0, ridge=1e-3):
    """Second moment ``(S*k*k, S*k*k)`` of ``k x k`` patches of smooth ReLU feature maps."""
    rng = np.random.default_rng(seed)
    n = S * k * k
    hw = 8
    N = max(4, math.ceil(0.5 * n / (hw * hw)))  # about n/2 patches, plus the ridge
    x = rng.standard_normal((N, S, hw + 2, hw + 2))
    x = (x[:, :, :-2] + 2 * x[:, :, 1:-1] + x[:, :, 2:]) / 4  # smooth along rows
    x = (x[:, :, :, :-2] + 2 * x[:, :, :, 1:-1] + x[:, :, :, 2:]) / 4  # and columns
    mix = rng.standard_normal((S, S)) * (1.0 + np.arange(S)) ** -0.7 / math.sqrt(S)
    f = np.maximum(np.einsum("ts,nshw->nthw", mix, x) + 0.05, 0.0)
    U = im2col(np.ascontiguousarray(f), k, k // 2)
    sigma = U.T @ U / U.shape[0]
    sigma = 0.5 * (sigma + sigma.T)
    sigma[np.diag_indices(n)] += ridge * np.trace(sigma) / n
    return sigma


def make_case(solver, S, sweeps, lib):
    """``(call, ranks)`` for one solver on a ``(S, S, 3, 3)`` layer in ``lib``."""
    K = trained_like_kernel(S, S, 3, seed=1)
    sigma = layer_sigma(S)
    if lib == "torch":
        import torch

        K, sigma = torch.from_numpy(K), torch.from_numpy(sigma)
    shape = (S, S, 3, 3)
    if solver == "sigma_svd":
        r = ratio_to_ranks((S, 9 * S), "svd", RATIO)
        W = K.reshape(S, 9 * S)
        return (lambda: sigma_svd(W, r, sigma)), r
    if solver == "tucker2":
        r = ratio_to_ranks(shape, "tucker2", RATIO)
        return (lambda: tucker2(K, r, sigma, n_iter_max=sweeps, init_iter_max=sweeps)), r
    if solver == "cp":
        r = ratio_to_ranks(shape, "cp", RATIO)
        return (lambda: cp(K, r, sigma, n_iter_max=sweeps)), r
    if solver == "tt_conv":
        ms, ns = auto_modes(S, S)
        r = tt_ranks_for_ratio(ms, ns, RATIO, kernel_size=(3, 3))
        return (lambda: tt_conv(K, r, sigma, in_modes=ms, out_modes=ns, n_iter_max=sweeps)), r
    raise ValueError(f"solver={solver!r} is not allowed; one of {SOLVERS}")


def _pinned(n):
    return contextlib.nullcontext() if n is None else sigmadecomp.threads(n)


def _timed(fn, n, pause):
    # let worker threads of the previous run stop spinning before the clock starts
    time.sleep(pause)
    with _pinned(n):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w0, time.process_time() - c0


def run_case(solver, lib, S, sweeps, reps, cores, all_reps=None):
    call, ranks = make_case(solver, S, sweeps, lib)
    settings = {"default": None, "1": 1, "all": cores}
    wall = {k: [] for k in settings}
    cpu = {k: [] for k in settings}
    chosen = []
    load0 = os.getloadavg()[0]
    # warm-up at default settings (first-touch of the arrays, caches, lazy imports);
    # without it the first timed call, the default one, pays those costs alone
    w, _ = _timed(call, None, 0.0)
    pause = min(0.5, 0.2 + w)
    all_reps = reps if all_reps is None else all_reps
    names = list(settings)
    for rnd in range(reps):
        # the order rotates between rounds (default first in the first), so that
        # no setting always runs first after the pause or right after another
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            n = settings[name]
            if name == "all" and rnd >= all_reps:
                continue
            w, c = _timed(call, n, pause)
            wall[name].append(w)
            cpu[name].append(c)
            if name == "default":
                chosen.append(_threads.last_choice)
    load1 = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in wall.items()}
    cpu = {k: statistics.median(v) for k, v in cpu.items()}
    best = min(med["1"], med["all"])
    chosen = sorted({c[1] if lib == "torch" else c[0] for c in chosen})
    return dict(solver=solver, lib=lib, channels=S, ranks=str(ranks), sweeps=sweeps,
                reps=reps, all_reps=all_reps,
                default_s=med["default"], one_s=med["1"], all_s=med["all"],
                ratio=med["default"] / best, best="1" if med["1"] <= med["all"] else "all",
                default_cpu_s=cpu["default"], one_cpu_s=cpu["1"], all_cpu_s=cpu["all"],
                policy_threads="/".join(str(c) for c in chosen), load_before=load0, load_after=load1)


FIELDS = ["solver", "lib", "channels", "ranks", "sweeps", "reps", "all_reps", "default_s", "one_s", "all_s",
          "ratio", "best", "policy_threads", "default_cpu_s", "one_cpu_s", "all_cpu_s",
          "load_before", "load_after"]


def _typed(row):
    """A CSV row with its numeric fields as floats."""
    out = dict(row)
    for k in ("default_s", "one_s", "all_s", "ratio", "default_cpu_s", "one_cpu_s", "all_cpu_s",
              "load_before", "load_after"):
        out[k] = float(out[k])
    return out


def format_table(rows, cores):
    lines = [
        "| solver | input | channels | ranks | sweeps | default (s) | 1 thread (s) "
        f"| {cores} threads (s) | default / best | policy threads "
        f"| CPU s: default / 1 / {cores} | load before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['solver']} | {r['lib']} | {r['channels']} | {r['ranks']} | {r['sweeps']} "
            f"| {r['default_s']:.3f} | {r['one_s']:.3f} | {r['all_s']:.3f} | {r['ratio']:.2f} "
            f"| {r['policy_threads']} "
            f"| {r['default_cpu_s']:.2f} / {r['one_cpu_s']:.2f} / {r['all_cpu_s']:.2f} "
            f"| {r['load_before']:.2f} -> {r['load_after']:.2f} |")
    return "\n".join(lines)


def environment():
    from threadpoolctl import threadpool_info

    info = [f"{d['internal_api']} {d.get('version')} ({d['num_threads']} threads, "
            f"{d.get('threading_layer', '-')})" for d in threadpool_info()]
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                      "OPENBLAS_CORETYPE") if k in os.environ}
    out = [f"cores available: {available_cores()}", f"python {platform.python_version()}, "
           f"numpy {np.__version__}", "thread pools: " + "; ".join(info),
           f"thread environment variables: {env or 'none'}"]
    try:
        import torch

        out.append(f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}")
    except ImportError:  # pragma: no cover
        pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small layers, seconds")
    ap.add_argument("--reps", type=positive_int, default=3, help="rounds per case (median)")
    ap.add_argument("--all-reps", type=positive_int, default=None,
                    help="rounds that include the all-cores setting (default: all)")
    ap.add_argument("--solvers", default=",".join(SOLVERS))
    ap.add_argument("--libs", default="numpy,torch")
    ap.add_argument("--channels", default=None, help="comma-separated, default 64,128,256,512")
    ap.add_argument("--out", default=None, help="CSV path (full run: notes/threads.csv)")
    ap.add_argument("--append", action="store_true", help="keep the rows already in --out")
    ap.add_argument("--table", default=None, metavar="CSV",
                    help="print the markdown table of a CSV written by this script and exit")
    args = ap.parse_args(argv)
    check_input_file(ap, "--table", args.table)
    check_output_file(ap, "--out", args.out, inputs=(args.table,))
    if args.append and args.out is None and args.quick:
        ap.error("--append: needs --out (a quick run writes no file otherwise)")
    for name, known in (("--solvers", SOLVERS), ("--libs", ("numpy", "torch"))):
        given = getattr(args, name[2:])
        bad = [x for x in given.split(",") if x not in known]
        if bad:
            ap.error(f"{name} {given!r}: expected comma-separated names of {', '.join(known)}")
    if args.channels:
        try:
            positive = all(int(c) > 0 for c in args.channels.split(","))
        except ValueError:
            positive = False
        if not positive:
            ap.error(f"--channels {args.channels!r}: expected comma-separated positive integers")
    cores = available_cores()
    if args.table:
        with open(args.table, newline="") as fh:
            rows = [_typed(r) for r in csv.DictReader(fh)]
        print(format_table(rows, cores))
        return rows
    if args.quick:
        channels, sweeps = [8], {8: 2}
    else:
        channels = [64, 128, 256, 512]
        sweeps = {64: 3, 128: 2, 256: 1, 512: 1}
    if args.channels:
        channels = [int(c) for c in args.channels.split(",")]
    for line in environment():
        print(line)
    rows = []
    t0 = time.perf_counter()
    out = args.out or (None if args.quick else os.path.join(NOTES_DIR, "threads.csv"))
    if out and os.path.exists(out) and args.append:
        with open(out, newline="") as fh:
            rows = [_typed(r) for r in csv.DictReader(fh)]
    for S in channels:
        for solver in args.solvers.split(","):
            for lib in args.libs.split(","):
                row = run_case(solver, lib, S, sweeps.get(S, 2), max(1, args.reps), cores,
                               args.all_reps)
                rows.append(row)
                print(format_table([row], cores).splitlines()[-1], flush=True)
                if out:  # rewritten after every case, so an interrupted run keeps its rows
                    with open(out, "w", newline="") as fh:
                        w = csv.DictWriter(fh, fieldnames=FIELDS)
                        w.writeheader()
                        w.writerows(rows)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
