"""One-shot against error-compensating sequential compression on the reference net.

    python -m benchmarks.sequential --quick           # oneshot/sequential, Tucker-2 and CP at rX 4
    python -m benchmarks.sequential                   # Tucker-2, CP, TT at rX 2 3 4 6 8
    python -m benchmarks.sequential --methods cp --ratios 3 6 --variants oneshot sequential

Reference network: the committed ``ResNetSmall`` of ``sigmadecomp_torch.demo``;
compressed layers: every 3x3 conv but the stem (TT also tensorizes the final
Linear, as in the demo). Calibration: 2048 Fashion-MNIST training images (the
demo's); accuracy on the 10,000 test images, without fine-tuning. Variants:

* ``oneshot``: ``collect_covariances`` on the original model, then
  ``compress(..., covariances=...)`` (the demo's Sigma row);
* ``sequential``: ``compress(..., data=..., sequential=True)``: each layer fitted
  to the corrected target ``K Sigma_oc Sigma_cc^+`` in the metric of its
  compressed-model input;
* ``plain``: the same passes without the cross term (``K`` itself in the metric
  ``Sigma_cc``, ``sequential_compress(..., cross=False)``), an ablation;
* ``budget``: one-shot with budget-allocated ranks, ``budget=1/rX`` of the
  compressed layers' parameters (the demo's budget row when ``--centered``);
* ``seqbudget``: sequential with the same budget (ranks allocated up front from
  the original model's one-shot statistics);
* ``seqrefit`` and ``seqbudgetrefit``: ``sequential`` and ``seqbudget`` with
  the dense layers downstream of compressed ones refitted as well
  (``refit=``, by default ``'all'``: the shortcut 1x1 convs and the
  classifier; ``--refit fc`` for the classifier only);
* ``oneshotrefit`` and ``budgetrefit``: ``oneshot`` and ``budget`` followed by
  the same refit (``compress(..., data=..., refit=...)`` without
  ``sequential``).

``--cp-inner adaptive`` gives CP the demo's adaptive CG cap of the B-updates
(``inner={'maxiter': 'adaptive'}``); the default ``exact`` keeps the solver's
default.

``--centered`` runs every variant with the centered moments and bias
correction. Time: wall-clock seconds of statistics plus decomposition per
model (the original model's evaluation excluded), with the threads given by
``--threads`` (default 1, to share the machine); ratios against one-shot are
taken in the same run. Writes ``--out`` (JSON) and, with ``--plot``, a PNG.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from torch import nn

from sigmadecomp.exceptions import CompressionWarning, ConvergenceWarning
from sigmadecomp_torch import collect_covariances, compress
from sigmadecomp_torch.data import make_loader
from sigmadecomp_torch.demo.reference import evaluate
from sigmadecomp_torch.models import conv3x3_names
from sigmadecomp_torch.sequential import sequential_compress

from benchmarks.common import (check_input_file, check_output_file, positive_float, positive_int,
                               reference_setup)

VARIANTS = ("oneshot", "sequential", "plain", "budget", "seqbudget", "seqrefit", "seqbudgetrefit",
            "oneshotrefit", "budgetrefit")


def _layers(model, method):
    names = conv3x3_names(model, skip_first=True)
    if method == "tt":
        names += [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    return names


def run_one(model, method, rx, variant, loader, *, centered, options, seed, cp_inner="exact",
            refit="all"):
    """Compress once; returns (model, report, seconds)."""
    layers = _layers(model, method)
    opts = dict(options, rng=seed) if method in ("tucker2", "cp") else dict(options)
    if method == "cp" and cp_inner == "adaptive":
        opts["inner"] = {"maxiter": "adaptive"}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", CompressionWarning)
        if variant == "oneshot":
            stats = collect_covariances(model, loader, layers=layers, progress=False)
            cm, rep = compress(model, method, covariances=stats, ratio=rx, layers=layers,
                               centered=centered, options=opts, progress=False)
        elif variant == "sequential":
            cm, rep = compress(model, method, data=loader, sequential=True, ratio=rx,
                               layers=layers, centered=centered, options=opts, progress=False)
        elif variant == "budget":
            stats = collect_covariances(model, loader, layers=layers, progress=False)
            cm, rep = compress(model, method, covariances=stats, budget=1.0 / rx,
                               layers=layers, centered=centered, options=opts,
                               progress=False)
        elif variant == "seqbudget":
            cm, rep = compress(model, method, data=loader, sequential=True, budget=1.0 / rx,
                               layers=layers, centered=centered, options=opts, progress=False)
        elif variant == "seqrefit":
            cm, rep = compress(model, method, data=loader, sequential=True, ratio=rx,
                               layers=layers, centered=centered, options=opts, progress=False,
                               refit=refit)
        elif variant == "seqbudgetrefit":
            cm, rep = compress(model, method, data=loader, sequential=True, budget=1.0 / rx,
                               layers=layers, centered=centered, options=opts, progress=False,
                               refit=refit)
        elif variant in ("oneshotrefit", "budgetrefit"):
            size = dict(ratio=rx) if variant == "oneshotrefit" else dict(budget=1.0 / rx)
            cm, rep = compress(model, method, data=loader, layers=layers, centered=centered,
                               options=opts, progress=False, refit=refit, **size)
        elif variant == "plain":
            cm, rep = sequential_compress(model, method, loader, ratio=rx, layers=layers,
                                          centered=centered, options=opts, progress=False,
                                          cross=False)
        else:
            raise ValueError(f"variant={variant!r}; allowed: {VARIANTS}")
    return cm, rep, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="oneshot and sequential, Tucker-2 and CP at rX 4, 512 calibration and "
                         "1000 test images")
    ap.add_argument("--methods", nargs="+", default=None, choices=("svd", "tucker2", "cp", "tt"))
    ap.add_argument("--ratios", nargs="+", type=positive_float, default=None)
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                    help="default: all (oneshot and sequential with --quick)")
    ap.add_argument("--centered", action="store_true")
    ap.add_argument("--calib", type=positive_int, default=None)
    ap.add_argument("--test", type=positive_int, default=None)
    ap.add_argument("--iters", type=positive_int, default=10, help="ALS sweeps (n_iter_max)")
    ap.add_argument("--cp-inner", choices=("exact", "adaptive"), default="exact",
                    help="CP B-update CG cap: the solver's default or the demo's adaptive one")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refit", default="all",
                    help="refit= of the *refit variants: 'all' or comma-separated names")
    ap.add_argument("--out", default=None, help="JSON file of the rows")
    ap.add_argument("--plot", default=None, help="PNG of accuracy vs rX")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="no run: merge the rows of earlier --out files, print the table "
                         "(and --plot, --out the merged rows)")
    args = ap.parse_args(argv)
    for path in args.combine or ():
        check_input_file(ap, "--combine", path)
    check_output_file(ap, "--out", args.out, inputs=args.combine or ())
    check_output_file(ap, "--plot", args.plot)
    if args.combine:
        return _combine(args)
    args.variants = args.variants or (["oneshot", "sequential"] if args.quick else list(VARIANTS))
    methods = args.methods or (["tucker2", "cp"] if args.quick else ["tucker2", "cp", "tt"])
    ratios = args.ratios or ([4.0] if args.quick else [2, 3, 4, 6, 8])
    calib = args.calib or (512 if args.quick else 2048)
    n_test = args.test or (1000 if args.quick else 10000)
    torch.set_num_threads(args.threads)

    model, x_cal, x_test, y_test = reference_setup(calib, n_test, args.seed)
    loader = make_loader(x_cal, batch_size=256)
    base = evaluate(model, x_test, y_test)
    print(f"original: {100 * base:.2f}% on {n_test} test images; calibration {calib} images; "
          f"threads {args.threads}; centered={args.centered}; n_iter_max={args.iters}; "
          f"cp_inner={args.cp_inner}",
          flush=True)
    rows = []
    for method in methods:
        for rx in ratios:
            for variant in args.variants:
                cm, rep, sec = run_one(model, method, rx, variant, loader,
                                       centered=args.centered,
                                       options={"n_iter_max": args.iters}, seed=args.seed,
                                       cp_inner=args.cp_inner,
                                       refit=(args.refit if args.refit == "all"
                                              else args.refit.split(",")))
                acc = evaluate(cm, x_test, y_test, batch_size=500)
                row = {"method": method, "rx": rx, "variant": variant, "accuracy": acc,
                       "seconds": sec, "model_rx": rep.ratio,
                       "layer_rx": rep.layer_ratio,
                       "ranks": {r["name"]: (list(r["ranks"]) if isinstance(r["ranks"], tuple)
                                             else r["ranks"]) for r in rep.layers},
                       "layer_errors": [r.get("output_error", r["sigma_error"])
                                        for r in rep.layers]}
                if rep.refitted:
                    row["refitted"] = {r["name"]: {"target_change": r["target_change"],
                                                   "output_error": r["output_error"]}
                                       for r in rep.refitted}
                rows.append(row)
                errs = " ".join(f"{e:.3f}" for e in row["layer_errors"] if e is not None)
                print(f"{method:8s} rX={rx:<4g} {variant:10s} acc {100 * acc:6.2f}%  "
                      f"{sec:6.1f} s  layer errors {errs}  ranks "
                      f"{list(row['ranks'].values())}", flush=True)
    print(_table(rows, methods, ratios, args.variants))
    result = {"original_accuracy": base, "test_images": n_test, "calibration_images": calib,
              "threads": args.threads, "centered": args.centered, "n_iter_max": args.iters,
              "cp_inner": args.cp_inner,
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        _plot(result, methods, args.variants, args.plot)
    return result


def _table(rows, methods, ratios, variants):
    head = ["| method | rX | " + " | ".join(variants) + " | gain seq - one-shot | "
            "time one-shot (s) | time seq (s) | ratio |",
            "|---|---|" + "---|" * len(variants) + "---|---|---|---|"]
    for method in methods:
        for rx in ratios:
            sel = {r["variant"]: r for r in rows if r["method"] == method and r["rx"] == rx}
            if not sel:
                continue
            cells = [f"{100 * sel[v]['accuracy']:.2f}" if v in sel else "-" for v in variants]
            if "sequential" in sel and "oneshot" in sel:
                a, b = sel["oneshot"], sel["sequential"]
                extra = (f"{100 * (b['accuracy'] - a['accuracy']):+.2f} | {a['seconds']:.0f} | "
                         f"{b['seconds']:.0f} | {b['seconds'] / a['seconds']:.2f}x")
            else:
                extra = "- | - | - | -"
            head.append(f"| {method} | {rx:g} | " + " | ".join(cells) + f" | {extra} |")
    return "\n".join(head)


def _combine(args):
    rows, first = [], None
    for path in args.combine:
        with open(path) as f:
            res = json.load(f)
        first = first or res
        rows += res["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ratios = sorted({r["rx"] for r in rows})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    print(_table(rows, methods, ratios, variants))
    result = dict(first, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        _plot(result, methods, variants, args.plot)
    return result


def _plot(result, methods, variants, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for v in variants:
            pts = sorted((r["rx"], 100 * r["accuracy"]) for r in result["rows"]
                         if r["method"] == method and r["variant"] == v)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=v)
        ax.axhline(100 * result["original_accuracy"], color="grey", ls=":", label="original")
        ax.set_title(method)
        ax.set_xlabel("per-layer rX")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
