"""Sigma-error against sweeps and time for tucker2, cp and tt_conv; the choice of defaults.

Run from the repository root::

    python -m benchmarks.sweeps --method tucker2          # the measurement (tens of minutes)
    python -m benchmarks.sweeps --method cp
    python -m benchmarks.sweeps --method tt
    python -m benchmarks.sweeps --quick                   # tiny smoke run (seconds)
    python -m benchmarks.sweeps --report                  # notes/sweeps.md tables + PNG from the CSVs

Problems (kernels at rX=3, ranks from :func:`sigmadecomp.ranks.ratio_to_ranks`):

* ``resnet18/<layer>``: torchvision's ResNet-18 layout
  (:func:`sigmadecomp_torch.resnet.resnet18`, random Kaiming weights); Sigma
  is collected by :func:`sigmadecomp_torch.collect_covariances` from
  ``--images`` random smooth images (:func:`sigmadecomp_torch.data.synthetic_images`,
  3 channels) at ``--size`` x ``--size`` pixels;
* ``reference/<layer>``: the trained reference network of the demo, Sigma
  from 256 Fashion-MNIST training images.

Every configuration runs with ``tol=0`` up to ``--max-sweeps`` sweeps or
``--max-seconds`` of wall time, recording (sweep, seconds since the call,
error in the metric minimised) through the solver's callback. The converged
error ``e*`` of a problem is the lowest error any configuration reached
(including a long reference run with tight inner solves). A configuration
"reaches the target" at the first sweep whose error is within 0.1% of
``e*``. Stopping rules are evaluated on the recorded curves: the sweep at
which a rule would stop, its error relative to ``e*`` and its time.

BLAS and torch run one thread (``sigmadecomp.threads(1)``) and times are
CPU seconds of the process, so the figures do not depend on the other jobs
of a shared machine; the machine load is printed with the results.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import numpy as np

from benchmarks.common import (NOTES_DIR, check_output_file, positive_float, positive_int,
                               write_csv)

TARGET = 1e-3  # within 0.1% of the converged error

RESNET_LAYERS = {64: "layer1.0.conv2", 128: "layer2.0.conv2", 256: "layer3.0.conv2",
                 512: "layer4.0.conv2"}
REFERENCE_LAYERS = {64: "layer2.conv2", 128: "layer3.conv2"}

#: configurations: name -> keyword arguments of the solver (tol=0 added)
TUCKER2_CONFIGS = {
    "default": {},
    "hooi10": {"init_iter_max": 10},
    "hooi3": {"init_iter_max": 3},
    "hosvd": {"init": "svd"},
    "whitened": {"init": "whitened"},
    "cg1e-1x3": {"inner": {"rtol": 1e-1, "maxiter": 3}},
    "cg1e-3x30": {"inner": {"rtol": 1e-3, "maxiter": 30}},
    "reference": {"inner": {"rtol": 1e-8, "maxiter": 200}},
}
CP_CONFIGS = {
    # the previous default: CG cap 5, doubled when a sweep gains < tol (needs tol > 0)
    "adaptive": {"inner": {"maxiter": "adaptive"}, "tol": 1e-6},
    "exact1e-10": {"inner": {"rtol": 1e-10, "maxiter": 5000}},
    "exact1e-8": {"inner": {"rtol": 1e-8, "maxiter": 5000}},
    "fixed5": {"inner": {"rtol": 1e-10, "maxiter": 5}},
}
TT_CONFIGS = {
    "default": {},  # extrapolation on; dense core solves up to 4096 unknowns, else PCG to rtol 1e-4
    "plain": {"extrapolate": False},  # the previous default: plain ALS sweeps
    "cg1e-8": {"inner": {"rtol": 1e-8, "maxiter": 500}},  # tight inner solves (reference)
}
METHODS = ("tucker2", "cp", "tt")


# ---------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------

def _resnet_problems(channels, n_images, size, seed=0):
    import torch

    from sigmadecomp_torch import collect_covariances
    from sigmadecomp_torch.data import synthetic_images
    from sigmadecomp_torch.resnet import resnet18

    torch.manual_seed(seed)
    model = resnet18().eval()
    names = [RESNET_LAYERS[c] for c in channels]
    x = synthetic_images(n_images, (3, size, size), seed=seed)
    x = (x - x.mean()) / x.std()
    stats = collect_covariances(model, torch.split(x, 4), layers=names, progress=False)
    mods = dict(model.named_modules())
    return [(f"resnet18/{nm}", mods[nm].weight.detach().double().numpy(),
             stats[nm].sigma.numpy()) for nm in names]


def _reference_problems(channels, n_images=256, seed=0):
    import torch

    from sigmadecomp_torch import collect_covariances
    from sigmadecomp_torch.data import fashion_mnist
    from sigmadecomp_torch.demo.reference import load_reference

    model = load_reference()
    names = [REFERENCE_LAYERS[c] for c in channels if c in REFERENCE_LAYERS]
    x, _ = fashion_mnist("train", limit=n_images, seed=seed)
    stats = collect_covariances(model, torch.split(x, 128), layers=names, progress=False)
    mods = dict(model.named_modules())
    return [(f"reference/{nm}", mods[nm].weight.detach().double().numpy(),
             stats[nm].sigma.numpy()) for nm in names]


def load_problems(channels, *, n_images, size, cache=None, reference=True):
    """``[(name, kernel, sigma)]`` float64 NumPy; cached as .npz under ``cache`` if given."""
    key = f"sweeps_{'-'.join(map(str, channels))}_{n_images}_{size}_{int(reference)}.npz"
    path = os.path.join(cache, key) if cache else None
    if path and os.path.exists(path):
        z = np.load(path)
        names = list(z["names"])
        return [(str(n), z[f"K{i}"], z[f"S{i}"]) for i, n in enumerate(names)]
    probs = _resnet_problems(channels, n_images, size)
    if reference:
        probs += _reference_problems(channels)
    if path:
        os.makedirs(cache, exist_ok=True)
        arrs = {"names": np.array([p[0] for p in probs])}
        for i, (_, K, S) in enumerate(probs):
            arrs[f"K{i}"], arrs[f"S{i}"] = K, S
        np.savez(path, **arrs)
    return probs


# ---------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------

def run_one(method, K, S, kwargs, *, max_sweeps, max_seconds):
    """Run one configuration; returns ``[(sweep, cpu_seconds, error)]`` and the result.

    Times are CPU seconds of this process (``time.process_time``): with one
    thread they equal wall time on an idle machine and do not grow with the
    other jobs of a shared one.
    """
    from sigmadecomp import cp, tt_conv, tucker2
    from sigmadecomp.ranks import ratio_to_ranks
    from sigmadecomp.tt import tt_ranks_for_ratio
    from sigmadecomp.tt_modes import auto_modes

    if method == "tt":
        in_modes, out_modes = auto_modes(K.shape[1], K.shape[0])
        ranks = tt_ranks_for_ratio(in_modes, out_modes, 3, kernel_size=K.shape[2:])
    else:
        ranks = ratio_to_ranks(K.shape, method, 3)
    rec = []
    t0 = time.process_time()

    def callback(res, *rest):
        t = time.process_time() - t0
        errs = res.errors
        if not rec and len(errs) > 1:  # cp and tt report after the first sweep only
            rec.append((0, float("nan"), float(errs[0])))
        rec.append((len(errs) - 1, t, float(errs[-1])))
        return t > max_seconds

    kw = dict({"tol": 0.0}, n_iter_max=max_sweeps, callback=callback, **kwargs)
    if method == "tucker2":
        res = tucker2(K, tuple(ranks), S, **kw)
    elif method == "tt":
        res = tt_conv(K, ranks, S, in_modes=in_modes, out_modes=out_modes, **kw)
    else:
        res = cp(K, int(ranks), S, **kw)
    return rec, res


def first_within(rec, e_star, target=TARGET):
    for sweep, t, e in rec:
        if e <= e_star * (1 + target):
            return sweep, t
    return None, None


def stop_rule(rec, tol, patience=1, relative=True):
    """Sweep at which ``(e_prev - e) <= tol * (e_prev if relative else 1)`` held ``patience`` times in a row."""
    run = 0
    for (s0, _, e0), (s1, t1, e1) in zip(rec, rec[1:]):
        dec = e0 - e1
        if dec <= tol * (e0 if relative else 1.0):
            run += 1
            if run >= patience:
                return s1, t1, e1
        else:
            run = 0
    s, t, e = rec[-1]
    return s, t, e


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS, default="tucker2")
    p.add_argument("--channels", type=positive_int, nargs="+", default=[64, 128, 256])
    p.add_argument("--configs", nargs="+", default=None)
    p.add_argument("--images", type=positive_int, default=16)
    p.add_argument("--size", type=positive_int, default=224)
    p.add_argument("--max-sweeps", type=positive_int, default=300)
    p.add_argument("--max-seconds", type=positive_float, default=60.0, help="CPU seconds per run")
    p.add_argument("--no-reference", action="store_true", help="ResNet-18 layers only")
    p.add_argument("--only", nargs="+", default=None, help="run only problems whose name contains one of these")
    p.add_argument("--cache", default=None, help="directory for the collected statistics")
    p.add_argument("--out", default=None, help="CSV of the curves (default notes/sweeps_<method>.csv)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--report", action="store_true", help="write notes/sweeps.md and the PNG from the CSVs")
    p.add_argument("--compare", action="store_true",
                   help="tucker2 only: whole default runs, previous defaults against the current ones")
    p.add_argument("--float32", action="store_true",
                   help="tucker2 only: 20 sweeps with the float64 and the float32 CG operator")
    p.add_argument("--starts", action="store_true",
                   help="tucker2 only: CPU time and error of each start (n_iter_max=0)")
    args = p.parse_args(argv)
    known = {"tucker2": TUCKER2_CONFIGS, "cp": CP_CONFIGS, "tt": TT_CONFIGS}[args.method]
    bad = [c for c in args.configs or () if c not in known]
    if bad:
        p.error(f"--configs {' '.join(bad)}: not a configuration of --method {args.method}; "
                f"choose from {', '.join(known)}")
    check_output_file(p, "--out", args.out, make_folder=True)

    if args.report:
        return report()

    import torch

    from sigmadecomp import threads

    torch.set_num_threads(1)
    if args.quick:
        args.channels, args.images, args.size = [64], 2, 32
        args.max_sweeps, args.max_seconds = 5, 10.0
        args.no_reference = True
    configs = {"tucker2": TUCKER2_CONFIGS, "cp": CP_CONFIGS, "tt": TT_CONFIGS}[args.method]
    names = args.configs or list(configs)
    if args.quick:
        names = names[:2]
    out = args.out or os.path.join(NOTES_DIR, f"sweeps_{args.method}.csv")
    if args.quick and args.out is None:
        out = None

    probs = load_problems(args.channels, n_images=args.images, size=args.size, cache=args.cache,
                          reference=not args.no_reference)
    if args.only:
        probs = [p_ for p_ in probs if any(o in p_[0] for o in args.only)]
    if args.starts:
        return run_starts(probs, out or None, args.configs)
    if args.compare:
        return run_compare(probs, out or None)
    if args.float32:
        return run_float32(probs)
    rows = []
    for pname, K, S in probs:
        for cname in names:
            with threads(1):
                rec, res = run_one(args.method, K, S, configs[cname], max_sweeps=args.max_sweeps,
                                   max_seconds=args.max_seconds)
            for sweep, t, e in rec:
                rows.append({"method": args.method, "problem": pname, "config": cname,
                             "sweep": sweep, "seconds": f"{t:.4f}", "error": f"{e:.12g}"})
            last = rec[-1]
            print(f"{pname:28s} {cname:12s} sweeps={last[0]:4d} t={last[1]:8.2f}s "
                  f"err={last[2]:.8f}  load={os.getloadavg()[0]:.1f}", flush=True)
            if out:
                write_csv(out, rows, ["method", "problem", "config", "sweep", "seconds", "error"])
    return 0


STARTS = {
    "default": {},  # HOOI to tucker2's own default tol (relative 1e-4), at most 100 sweeps
    "hooi100": {"init": "frobenius", "init_iter_max": 100, "init_tol": 1e-6},
    "hooi10": {"init": "frobenius", "init_iter_max": 10},
    "hooi3": {"init": "frobenius", "init_iter_max": 3},
    "hosvd": {"init": "svd"},
    "whitened": {"init": "whitened"},
}


def run_compare(probs, out, repeats=2):
    """CPU time and final error of default ``tucker2`` runs: previous defaults against current ones.

    The previous defaults are emulated with the current code: an absolute
    stopping rule ``|e_prev - e| < 1e-6`` (through the callback), a HOOI start
    of up to 100 sweeps to a relative ``init_tol`` of 2.5e-6 (about the old
    absolute 1e-6 at HOOI errors of 0.2-0.5) and a float64 CG operator.
    """
    from sigmadecomp import threads, tucker2
    import importlib

    T2 = importlib.import_module("sigmadecomp.tucker2")
    from sigmadecomp.ranks import ratio_to_ranks

    def old_stop(res, *rest):
        e = res.errors
        return len(e) > 1 and abs(e[-2] - e[-1]) < 1e-6

    rows = []
    for pname, K, S in probs:
        ranks = tuple(ratio_to_ranks(K.shape, "tucker2", 3))
        for name in ("previous", "current"):
            for rep in range(repeats):
                saved = T2.CG_FLOAT32_RTOL
                try:
                    if name == "previous":
                        T2.CG_FLOAT32_RTOL = float("inf")
                        kw = dict(tol=0.0, init_tol=2.5e-6, callback=old_stop)
                    else:
                        kw = {}
                    with threads(1):
                        t0 = time.process_time()
                        res = tucker2(K, ranks, S, **kw)
                        t = time.process_time() - t0
                finally:
                    T2.CG_FLOAT32_RTOL = saved
                rows.append({"problem": pname, "defaults": name, "run": rep, "seconds": f"{t:.3f}",
                             "sweeps": res.n_iter, "error": f"{res.error:.10g}"})
                print(f"{pname:28s} {name:9s} cpu={t:8.2f}s sweeps={res.n_iter:3d} "
                      f"err={res.error:.8f}", flush=True)
                if out:
                    write_csv(out.replace(".csv", "_compare.csv"), rows,
                              ["problem", "defaults", "run", "seconds", "sweeps", "error"])
    return 0


def run_float32(probs, sweeps=20, repeats=2):
    """CPU seconds and errors of ``sweeps`` Sigma-ALS sweeps (HOSVD start) with either CG operator."""
    import importlib

    from sigmadecomp import threads, tucker2
    from sigmadecomp.ranks import ratio_to_ranks

    T2 = importlib.import_module("sigmadecomp.tucker2")
    saved = T2.CG_FLOAT32_RTOL
    for pname, K, S in probs:
        ranks = tuple(ratio_to_ranks(K.shape, "tucker2", 3))
        for _ in range(repeats):
            for name, limit in (("float64", float("inf")), ("float32", saved)):
                T2.CG_FLOAT32_RTOL = limit
                try:
                    with threads(1):
                        t0 = time.process_time()
                        res = tucker2(K, ranks, S, n_iter_max=sweeps, tol=0, init="svd")
                        t = time.process_time() - t0
                finally:
                    T2.CG_FLOAT32_RTOL = saved
                print(f"{pname:28s} {name} cpu={t:.2f}s err5={res.errors[5]:.8f} "
                      f"err{sweeps}={res.errors[-1]:.8f}", flush=True)
    return 0


def run_starts(probs, out, names=None):
    """CPU seconds and error of each tucker2 start: ``tucker2(..., n_iter_max=0)``."""
    from sigmadecomp import threads, tucker2
    from sigmadecomp.ranks import ratio_to_ranks

    rows = []
    for pname, K, S in probs:
        ranks = tuple(ratio_to_ranks(K.shape, "tucker2", 3))
        for name, kw in STARTS.items():
            if names and name not in names:
                continue
            with threads(1):
                t0 = time.process_time()
                res = tucker2(K, ranks, S, n_iter_max=0, **kw)
                t = time.process_time() - t0
            rows.append({"problem": pname, "start": name, "seconds": f"{t:.3f}",
                         "error": f"{res.errors[0]:.10g}"})
            print(f"{pname:28s} {name:9s} cpu={t:8.2f}s err0={res.errors[0]:.6f}", flush=True)
            if out:
                write_csv(out.replace(".csv", "_starts.csv"), rows,
                          ["problem", "start", "seconds", "error"])
    return 0


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def _read(path):
    curves = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            key = (r["problem"], r["config"])
            curves.setdefault(key, []).append((int(r["sweep"]), float(r["seconds"]), float(r["error"])))
    return curves


def summarise(curves):
    """Per problem: ``e*`` and per config the time/sweeps to reach it within 0.1%."""
    out = {}
    for (prob, cfg), rec in curves.items():
        out.setdefault(prob, {})[cfg] = rec
    table = []
    for prob, cfgs in out.items():
        e_star = min(e for rec in cfgs.values() for _, _, e in rec)
        for cfg, rec in cfgs.items():
            s, t = first_within(rec, e_star)
            sec_per_sweep = (rec[-1][1] - rec[1][1]) / max(rec[-1][0] - rec[1][0], 1) if len(rec) > 2 else float("nan")
            table.append({"problem": prob, "config": cfg, "e_star": e_star, "sweeps_to_target": s,
                          "seconds_to_target": t, "final_sweep": rec[-1][0], "final_error": rec[-1][2],
                          "seconds_per_sweep": sec_per_sweep, "start_seconds": rec[1][1] if len(rec) > 1 else float("nan")})
    return out, table


RULES = {  # name -> (tol, relative): the stopping rules evaluated on the curves
    "abs 1e-6": (1e-6, False),
    "rel 1e-6": (1e-6, True),
    "rel 1e-5": (1e-5, True),
    "rel 1e-4": (1e-4, True),
    "rel 1e-3": (1e-3, True),
}


def _fmt(x, spec):
    return "-" if x is None or x != x else format(x, spec)


def markdown_tables(method, groups, table):
    """Markdown: time/sweeps to the 0.1% target per config, and where each stopping rule stops."""
    lines = [f"### {method}: time and sweeps to within 0.1% of the converged error", "",
             "| problem | config | converged e* | start s | s/sweep | sweeps to 0.1% | "
             "s to 0.1% | last sweep run | its excess |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(
            f"| {r['problem']} | {r['config']} | {r['e_star']:.6f} | {_fmt(r['start_seconds'], '.2f')} | "
            f"{_fmt(r['seconds_per_sweep'], '.3f')} | {_fmt(r['sweeps_to_target'], 'd')} | "
            f"{_fmt(r['seconds_to_target'], '.2f')} | {r['final_sweep']} | "
            f"{r['final_error'] / r['e_star'] - 1:.1e} |")
    lines += ["", f"### {method}: where each stopping rule stops (sweep, excess over e*)", "",
              "| problem | config | " + " | ".join(RULES) + " |",
              "|---|---|" + "---|" * len(RULES)]
    for prob, cfgs in sorted(groups.items()):
        e_star = min(e for rec in cfgs.values() for _, _, e in rec)
        for cfg, rec in sorted(cfgs.items()):
            rec = [x for x in rec if x[1] == x[1]] if len(rec) > 1 else rec
            cells = []
            for tol, rel in RULES.values():
                sw, _, e = stop_rule(rec, tol, 1, rel)
                cells.append(f"{sw}, {e / e_star - 1:.1e}")
            lines.append(f"| {prob} | {cfg} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: the TT defaults before the extrapolation step (plain sweeps): cap and relative tol
TT_PREVIOUS_DEFAULTS = (20, 1e-6)


def stop_with_cap(rec, tol, cap):
    """``(sweep, seconds, error)`` where a run with ``n_iter_max=cap`` and relative ``tol`` stops.

    ``None`` when the recorded curve ends before that point.
    """
    for (s0, _, e0), (s1, t1, e1) in zip(rec, rec[1:]):
        if s1 > cap:
            break
        if e0 - e1 <= tol * e0 or s1 == cap:
            return s1, t1, e1
    return None


def tt_defaults_table(groups):
    """Markdown: plain sweeps (previous default) against the extrapolated default, per problem."""
    from sigmadecomp import tt as TT

    cap_old, tol_old = TT_PREVIOUS_DEFAULTS
    cap_new, tol_new = TT.DEFAULT_SWEEPS, TT.DEFAULT_TOL
    lines = ["### tt: previous default (plain sweeps, "
             f"n_iter_max={cap_old}, tol={tol_old:g}) against the current one (extrapolation, "
             f"n_iter_max={cap_new}, tol={tol_new:g})", "",
             "| problem | e* (lowest reached) | plain: sweeps, CPU s to 0.1% | plain: default stop "
             "(sweep, CPU s, excess) | extrapolated: sweeps, CPU s to 0.1% | extrapolated: default "
             "stop (sweep, CPU s, excess) |",
             "|---|---|---|---|---|---|"]
    for prob, cfgs in sorted(groups.items()):
        if "plain" not in cfgs or "default" not in cfgs:
            continue
        e_star = min(e for rec in cfgs.values() for _, _, e in rec)
        cells = []
        for cfg, cap, tol in (("plain", cap_old, tol_old), ("default", cap_new, tol_new)):
            rec = cfgs[cfg]
            sw, t = first_within(rec, e_star)
            cells.append(f"{sw}, {t:.1f} s" if sw is not None else f"not in {rec[-1][0]} sweeps")
            stop = stop_with_cap(rec, tol, cap)
            cells.append("-" if stop is None else
                         f"{stop[0]}, {stop[1]:.1f} s, {stop[2] / e_star - 1:.2%}")
        lines.append(f"| {prob} | {e_star:.7f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for method in METHODS:
        path = os.path.join(NOTES_DIR, f"sweeps_{method}.csv")
        if not os.path.exists(path):
            continue
        groups, table = summarise(_read(path))
        print(markdown_tables(method, groups, table))
        if method == "tt":
            print(tt_defaults_table(groups))
        with open(path) as f:  # which clock each problem's times are on (column 'clock')
            clock = {r["problem"]: r.get("clock") or "cpu" for r in csv.DictReader(f)}
        probs = sorted(groups)
        names = sorted({cfg for cfgs in groups.values() for cfg in cfgs})
        colour = {cfg: f"C{i % 10}" for i, cfg in enumerate(names)}
        fig, axes = plt.subplots(2, len(probs), figsize=(4 * len(probs), 7), squeeze=False)
        for j, prob in enumerate(probs):
            e_star = min(e for rec in groups[prob].values() for _, _, e in rec)
            for cfg, rec in sorted(groups[prob].items()):
                rec = [r for r in rec if r[1] == r[1]]
                s = [r[0] for r in rec]
                t = [r[1] for r in rec]
                g = [max(r[2] / e_star - 1, 1e-7) for r in rec]
                axes[0, j].semilogy(s, g, label=cfg, color=colour[cfg])
                axes[1, j].semilogy(t, g, label=cfg, color=colour[cfg])
            for i in range(2):
                axes[i, j].axhline(TARGET, color="k", lw=0.8, ls="--")
            axes[0, j].set_title(prob, fontsize=9)
            axes[0, j].set_xlabel("sweep")
            axes[1, j].set_xlabel(f"seconds ({clock.get(prob, 'cpu')}, one thread)")
            axes[0, j].legend(fontsize=7)
        axes[0, 0].set_ylabel("error / converged - 1")
        axes[1, 0].set_ylabel("error / converged - 1")
        ref = "the converged error" if method == "tucker2" else "the lowest error reached"
        fig.suptitle(f"{method}, rX=3: relative excess over {ref} (dashed: 0.1%)", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(NOTES_DIR, f"sweeps_{method}.png"), dpi=80)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
