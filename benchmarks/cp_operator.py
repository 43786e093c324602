"""CP-ALS-Sigma's B-update through ``A``: the CG operator at ``n x n x T`` instead of ``n x n x R``.

Each CG iteration of CP-ALS-Sigma's (exact, default) B-update multiplies
Sigma (n x n) by an n x R matrix and then by ``G = A^T A``. When the rank R
exceeds the output channels T (R ~ 1.5 T for a square 3x3 conv at rX 3),
``(Sigma (Z A^T)) A`` is the same operator at about T/R of the cost. This
script measures both forms on ResNet-18 convs at rX 3 with their real input
statistics (``benchmarks.scale``'s model and images), at default thread
settings, in one process, the two forms alternating:

* the operator alone: the median of ``--apply-runs`` applications each;
* one whole exact B-update from the same point (the Sigma-CP start that
  ``cp`` itself reaches after ``--start-sweeps`` adaptive sweeps): seconds,
  CG iterations and the block objective after it, ``--update-runs`` times.

Run from the repository root::

    python -m benchmarks.cp_operator --json notes/cp_operator.json
    python -m benchmarks.cp_operator --quick     # seconds: 32x32 images, small layers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

LAYERS = ("layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1")
QUICK_LAYERS = ("layer1.0.conv1",)


def _stats(layers, images, size, batch):
    from benchmarks.scale import _batches, _model
    from sigmadecomp_torch import collect_covariances

    model = _model()
    stats = collect_covariances(model, _batches(images, size, batch), layers=list(layers),
                                progress=False)
    mods = dict(model.named_modules())
    return {n: (mods[n].weight.detach().double().numpy(), stats[n].sigma.double().numpy())
            for n in layers}


def _start(K, sigma, rank, start_sweeps):
    """The point ``cp`` reaches after ``start_sweeps`` adaptive sweeps, and the
    ridged Sigma it minimises."""
    from sigmadecomp import cp
    from sigmadecomp.sigma import DEFAULT_RIDGE, _add_ridge

    res = cp(K, rank, sigma, n_iter_max=start_sweeps, tol=0.0, inner={"maxiter": "adaptive"})
    return res.weights, list(res.factors), _add_ridge(sigma, DEFAULT_RIDGE)


def _engine(K, start, through_a):
    """A fresh :func:`sigmadecomp.cp.als_engine` at ``start`` after one A-update
    (a sweep's B-update follows its A-update), the operator in the form asked."""
    cpmod = sys.modules["sigmadecomp.cp"]
    weights, factors, Sg = start
    cpmod.THROUGH_A_MARGIN = 1e30 if through_a else 0.0
    engine = cpmod.als_engine(K, weights, [f.copy() for f in factors], Sg)
    engine.update_A()
    return engine


def _time_apply(engine, runs):
    apply, _, _, rhs = engine._B_operator()
    X = engine.F[1] * engine.w[None, :]
    apply(X)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        apply(X)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name, K, sigma, runs_apply, runs_update, start_sweeps):
    cpmod = sys.modules["sigmadecomp.cp"]
    saved = cpmod.THROUGH_A_MARGIN
    T, S, H, W = K.shape
    n = S * H * W
    rank = int(T * n / 3 / (T + S + H + W))
    try:
        row = {"layer": name, "shape": list(K.shape), "rank": rank,
               "chosen_by_default": bool(cpmod._through_A(n, rank, T))}
        start = _start(K, sigma, rank, start_sweeps)
        apply_s = {True: [], False: []}
        for _ in range(2):  # two alternations of the operator timings
            for flag in (False, True):
                eng = _engine(K, start, flag)
                apply_s[flag].append(_time_apply(eng, runs_apply))
        row["apply_s"] = {"Z": apply_s[False], "through_A": apply_s[True]}
        updates = {True: [], False: []}
        for _ in range(runs_update):
            for flag in (False, True):
                eng = _engine(K, start, flag)
                t0 = time.perf_counter()
                eng.update_B()
                sec = time.perf_counter() - t0
                updates[flag].append({"seconds": sec, "cg_iters": eng.cg_iters[-1],
                                      "objective": eng.objective()})
        row["update_B"] = {"Z": updates[False], "through_A": updates[True]}
        med = {f: statistics.median(apply_s[f]) for f in apply_s}
        medu = {f: statistics.median(u["seconds"] for u in updates[f]) for f in updates}
        row["apply_ratio"] = med[False] / med[True]
        row["update_ratio"] = medu[False] / medu[True]
        obj = [u["objective"] for u in updates[False] + updates[True]]
        row["objective_spread"] = (max(obj) - min(obj)) / max(obj)
        return row
    finally:
        cpmod.THROUGH_A_MARGIN = saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32x32 images, two small layers")
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--apply-runs", type=int, default=5)
    ap.add_argument("--update-runs", type=int, default=3)
    ap.add_argument("--start-sweeps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    layers = args.layers.split(",")
    size, batch = 224, 16
    if args.quick:
        layers, size, batch, args.images = list(QUICK_LAYERS), 32, 2, 4
        args.apply_runs, args.update_runs, args.start_sweeps = 2, 1, 1
    load0 = os.getloadavg()
    data = _stats(layers, args.images, size, batch)
    rows = []
    for name in layers:
        K, sigma = data[name]
        row = measure(name, K, sigma, args.apply_runs, args.update_runs, args.start_sweeps)
        rows.append(row)
        print(f"{name} {tuple(row['shape'])} R={row['rank']}: operator "
              f"{statistics.median(row['apply_s']['Z']) * 1e3:.1f} -> "
              f"{statistics.median(row['apply_s']['through_A']) * 1e3:.1f} ms "
              f"({row['apply_ratio']:.2f}x); B-update {row['update_ratio']:.2f}x "
              f"(CG {[u['cg_iters'] for u in row['update_B']['Z']]} -> "
              f"{[u['cg_iters'] for u in row['update_B']['through_A']]}), objectives equal "
              f"to {row['objective_spread']:.1e}; load {os.getloadavg()[0]:.1f}", flush=True)
    out = {"rows": rows, "load_before": load0, "load_after": os.getloadavg(),
           "cores": os.cpu_count(), "images": args.images, "size": size}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
