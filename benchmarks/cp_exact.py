"""Cost of the exact CP B-update: CG iterations, CPU seconds per sweep, time to an error.

Run from the repository root (the statistics come from the cache of
:mod:`benchmarks.sweeps`, collected there on the first run)::

    python -m benchmarks.cp_exact --cache DIR --only resnet18/layer1 reference/layer3 \
        --max-seconds 60 --out notes/cp_exact.csv
    python -m benchmarks.cp_exact --report notes/cp_exact.csv     # markdown tables
    python -m benchmarks.cp_exact --quick                          # smoke run, seconds

Every configuration is a whole ``cp(K, R, Sigma, tol=0, ...)`` run at rX=3
from the same ``'frobenius'`` start, up to ``--max-sweeps`` sweeps or
``--max-seconds`` CPU seconds. One thread; times are CPU seconds of the
process (``time.process_time``), so they do not grow with the other jobs of a
shared machine (the load is printed with the results). The CG iterations of
every B-update are read from :func:`sigmadecomp.solvers.pcg` through a thin
wrapper installed for the run.

Configurations:

* ``adaptive``: ``inner={'maxiter': 'adaptive'}``, the former default (CG cap
  5, doubled on stalls; inexact sweeps);
* ``resid1e-8``: ``inner={'rtol': 1e-8}``, the residual rule that was the
  exact default before the excess rule;
* ``default``: the current default (CG stops on its estimate of the block
  objective's excess, ``BLOCK_EXCESS_RTOL = 1e-8`` of the objective).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np

from benchmarks.common import (check_input_file, check_output_file, positive_float, positive_int,
                               write_csv)

CONFIGS = {
    "adaptive": {"inner": {"maxiter": "adaptive"}, "tol": 1e-6},
    "resid1e-8": {"inner": {"rtol": 1e-8}},
    "default": {},
}


def run_one(K, S, kwargs, *, max_sweeps, max_seconds):
    """``[(sweep, cpu_seconds, error, cg_iterations_of_that_sweep)]`` of one cp run."""
    from sigmadecomp import cp
    from sigmadecomp.ranks import ratio_to_ranks

    cp_mod = sys.modules["sigmadecomp.cp"]
    iters = []
    plain = cp_mod.pcg

    def counted(*args, **kw):
        X, info = plain(*args, **kw)
        iters.append(info.n_iter)
        return X, info

    rec = []
    t0 = time.process_time()

    def callback(res):
        t = time.process_time() - t0
        if not rec:
            rec.append((0, t, float(res.errors[0]), 0))
            return False
        rec.append((len(res.errors) - 1, t, float(res.errors[-1]), iters[-1] if iters else 0))
        return t > max_seconds

    R = int(ratio_to_ranks(K.shape, "cp", 3))
    kw = dict({"tol": 0.0}, n_iter_max=max_sweeps, callback=callback, **kwargs)
    cp_mod.pcg = counted
    try:
        cp(K, R, S, **kw)
    finally:
        cp_mod.pcg = plain
    return rec


def load(path):
    rows = {}
    with open(path) as fh:
        for r in csv.DictReader(fh):
            rows.setdefault((r["problem"], r["config"]), []).append(
                (int(r["sweep"]), float(r["seconds"]), float(r["error"]), int(r["cg_iters"])))
    return rows


def first_at(rec, target):
    for sweep, t, e, _ in rec:
        if e <= target:
            return sweep, t
    return None, None


def report(path):
    """Markdown tables from the CSV of a run."""
    rows = load(path)
    problems = sorted({p for p, _ in rows})
    out = []
    for prob in problems:
        cfgs = [c for c in CONFIGS if (prob, c) in rows]
        recs = {c: rows[(prob, c)] for c in cfgs}
        # the lowest error every configuration reached, and the best reached by any
        common = max(min(e for _, _, e, _ in r) for r in recs.values())
        best = min(min(e for _, _, e, _ in r) for r in recs.values())
        out.append(f"#### {prob}\n")
        out.append(f"common error (reached by every configuration): {common:.6f}; "
                   f"best reached: {best:.6f}\n")
        out.append("| config | CG it per B-update: median (min-max), sweeps 2.. | CPU s per sweep "
                   "| sweeps run | error after 10 / 25 sweeps | sweeps, CPU s to the common error "
                   "| CPU s to 0.1% of best |")
        out.append("|---|---|---|---|---|---|---|")
        for c in cfgs:
            r = recs[c]
            its = [i for s, _, _, i in r if s >= 2]
            secs = [b[1] - a[1] for a, b in zip(r[1:], r[2:])]
            e10 = next((e for s, _, e, _ in r if s == 10), float("nan"))
            e25 = next((e for s, _, e, _ in r if s == 25), float("nan"))
            s_c, t_c = first_at(r, common)
            _, t_b = first_at(r, best * 1.001)
            it_txt = (f"{int(np.median(its))} ({min(its)}-{max(its)})" if its else "-")
            out.append(f"| {c} | {it_txt} | {np.median(secs):.3f} | {r[-1][0]} | {e10:.5f} / {e25:.5f} "
                       f"| {s_c}, {t_c:.1f} | {'-' if t_b is None else f'{t_b:.1f}'} |")
        out.append("")
    text = "\n".join(out)
    print(text)
    return text


def _load_average():
    """``load average a, b, c`` where the platform reports it, else ``load average n/a``."""
    try:
        return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):  # pragma: no cover - not a Unix
        return "load average n/a"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=None, help="directory of the cached statistics (benchmarks.sweeps)")
    p.add_argument("--channels", type=positive_int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--only", nargs="+", default=None)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--max-sweeps", type=positive_int, default=3000)
    p.add_argument("--max-seconds", type=positive_float, default=60.0)
    p.add_argument("--out", default=None, help="CSV of the curves")
    p.add_argument("--report", default=None, help="print the tables of this CSV")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    check_input_file(p, "--report", args.report)
    check_output_file(p, "--out", args.out, inputs=(args.report,), make_folder=True)
    if args.report:
        report(args.report)
        return
    import torch

    from benchmarks.sweeps import load_problems
    from sigmadecomp import threads

    torch.set_num_threads(1)
    if args.quick:
        rng = np.random.default_rng(0)
        X = rng.standard_normal((400, 72)) * np.geomspace(0.1, 3.0, 72)
        probs = [("random/8x8x3x3", rng.standard_normal((8, 8, 3, 3)), X.T @ X / 400)]
        args.max_sweeps, args.max_seconds = 5, 10.0
    else:
        probs = load_problems(args.channels, n_images=16, size=224, cache=args.cache)
        if args.only:
            probs = [q for q in probs if any(o in q[0] for o in args.only)]
    rows = []
    for name, K, S in probs:
        for c in args.configs:
            with threads(1):
                rec = run_one(K, S, CONFIGS[c], max_sweeps=args.max_sweeps,
                              max_seconds=args.max_seconds)
            load_avg = _load_average()
            print(f"{name} {c}: {rec[-1][0]} sweeps, {rec[-1][1]:.1f} CPU s, error {rec[-1][2]:.6f}, "
                  f"CG it (sweeps 2..) {[i for s, _, _, i in rec if s >= 2][:8]}...; {load_avg}",
                  flush=True)
            rows += [{"problem": name, "config": c, "sweep": s, "seconds": f"{t:.4f}",
                      "error": f"{e:.12g}", "cg_iters": i} for s, t, e, i in rec]
    if args.out:
        write_csv(args.out, rows, ["problem", "config", "sweep", "seconds", "error", "cg_iters"])
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
