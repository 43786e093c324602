"""How large a layer's relative Sigma-error may get before accuracy suffers.

Evidence for the threshold of :data:`sigmadecomp_torch.compress.SIGMA_ERROR_WARN`
and for the default layer choice of :func:`sigmadecomp_torch.default_layers`.

On the committed reference network (``sigmadecomp_torch/demo/weights``, Fashion-MNIST),
with Sigma statistics of ``--calib`` training images:

1. every Conv2d/Linear layer alone is compressed at several ratios rX (the
   Sigma-aware format :func:`compress` uses for it) and the test accuracy of
   the model is measured; the table pairs each layer's reported relative
   Sigma-error with the accuracy drop it caused;
2. whole models at ``--ratio``: every layer, :func:`default_layers`, and the
   CLI's former choice (k x k convs but the first).

Run from the repository root::

    python -m benchmarks.sigma_error_threshold [--test 2000] [--calib 1024]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

from benchmarks.common import check_output_file, positive_float, positive_int
from sigmadecomp_torch.demo.reference import evaluate, load_reference
from sigmadecomp_torch import collect_covariances, compress
from sigmadecomp_torch.data import fashion_mnist, make_loader

RATIOS = (1.5, 2, 3, 4, 6, 8, 12)


def _row_text(r):
    return (f"{r['layer']:22s} {r['method']:8s} {r['rx']:5g} {r['sigma_error']:9.4f} "
            f"{100 * r['drop']:6.2f}%")


def single_layer_rows(model, stats, x_test, y_test, base, method, ratios=RATIOS, log=None):
    rows = []
    names = list(stats)
    for name in names:
        for rx in ratios:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    small, rep = compress(model, method, covariances=stats, ratio=rx,
                                          layers=[name], progress=False,
                                          options={"rng": 0} if method != "svd" else None)
                except ValueError:
                    continue
            if not rep.layers:
                continue
            acc = evaluate(small, x_test, y_test)
            r = rep.layers[0]
            rows.append({"layer": name, "kind": r["kind"], "method": r["method"], "rx": rx,
                         "sigma_error": r["sigma_error"], "accuracy": acc,
                         "drop": base - acc})
            if log is not None:
                log(_row_text(rows[-1]))
    return rows


def threshold_table(rows, thresholds=(0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)):
    """For each threshold: how many cases above/below it lost more than 1 / 3 points."""
    out = []
    err = np.array([r["sigma_error"] for r in rows])
    drop = np.array([r["drop"] for r in rows])
    for t in thresholds:
        above, below = err > t, err <= t
        out.append({
            "threshold": t,
            "n_above": int(above.sum()), "n_below": int(below.sum()),
            "above_drop>1pt": int((drop[above] > 0.01).sum()),
            "below_drop>1pt": int((drop[below] > 0.01).sum()),
            "above_drop>3pt": int((drop[above] > 0.03).sum()),
            "below_drop>3pt": int((drop[below] > 0.03).sum()),
            "max_drop_below": float(drop[below].max()) if below.any() else None,
        })
    return out


def whole_model_rows(model, stats, x_test, y_test, ratio, methods=("tucker2", "cp", "svd")):
    from torch import nn

    from sigmadecomp_torch import default_layers

    every = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    kxk = [n for n, m in model.named_modules()
           if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1][1:]
    choices = {"every layer": every, "default_layers": default_layers(model),
               "k x k convs but the first": kxk}
    rows = []
    for method in methods:
        for label, names in choices.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small, rep = compress(model, method, covariances=stats, ratio=ratio,
                                      layers=names, progress=False,
                                      options={"rng": 0} if method != "svd" else None)
            rows.append({"method": method, "layers": label, "rX": round(rep.ratio, 3),
                         "accuracy": evaluate(small, x_test, y_test)})
    return rows


FORMATS = ("svd", "tucker2", "cp", "tt")  # the layer formats of compress


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test", type=positive_int, default=2000, help="test images (seeded subset)")
    p.add_argument("--calib", type=positive_int, default=1024, help="calibration training images")
    p.add_argument("--ratio", type=positive_float, default=3.0, help="rX of the whole-model rows")
    p.add_argument("--method", default="svd", choices=FORMATS,
                   help="format of the k x k convs (part 1)")
    p.add_argument("--methods", default="tucker2,cp,svd",
                   help="formats of the whole-model rows (comma-separated, of "
                        + ", ".join(FORMATS) + ")")
    p.add_argument("--skip-single", action="store_true", help="only the whole-model rows")
    p.add_argument("--json", default=None, help="write all rows to this file")
    args = p.parse_args(argv)
    bad = [m for m in args.methods.split(",") if m not in FORMATS]
    if bad or not args.methods:
        p.error(f"--methods {args.methods!r}: expected comma-separated formats of "
                f"{', '.join(FORMATS)}")
    check_output_file(p, "--json", args.json)

    t0 = time.perf_counter()
    model = load_reference()
    x_train, _ = fashion_mnist("train", limit=args.calib, seed=0)
    x_test, y_test = fashion_mnist("test", limit=args.test, seed=1)
    stats = collect_covariances(model, make_loader(x_train, batch_size=256), progress=False)
    base = evaluate(model, x_test, y_test)
    print(f"reference accuracy {base:.4f} on {len(x_test)} test images; statistics of "
          f"{len(x_train)} training images")
    out = {"base": base, "test": args.test, "calib": args.calib}
    if not args.skip_single:
        print(f"\n{'layer':22s} {'format':8s} {'rX':>5s} {'sigma_err':>9s} {'drop':>7s}")
        rows = single_layer_rows(model, stats, x_test, y_test, base, args.method,
                                 log=lambda t: print(t, flush=True))
        out["single"] = rows
        out["thresholds"] = threshold_table(rows)
        print("\nthreshold  above(>1pt/>3pt)  below(>1pt/>3pt)  max drop below")
        for t in out["thresholds"]:
            print(f"{t['threshold']:9.2f}  {t['n_above']:3d} ({t['above_drop>1pt']:2d}/"
                  f"{t['above_drop>3pt']:2d})      {t['n_below']:3d} ({t['below_drop>1pt']:2d}/"
                  f"{t['below_drop>3pt']:2d})      {100 * t['max_drop_below']:.2f}%")
    out["whole"] = whole_model_rows(model, stats, x_test, y_test, args.ratio,
                                    methods=tuple(args.methods.split(",")))
    print(f"\nwhole model at ratio {args.ratio:g} per layer:")
    for r in out["whole"]:
        print(f"{r['method']:8s} {r['layers']:26s} rX {r['rX']:6.3f}  accuracy {r['accuracy']:.4f}")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
