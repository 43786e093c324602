"""Statistics from another dataset: how much of the Sigma gain survives, and shrinkage.

    python -m benchmarks.transfer                       # Tucker-2 and CP, rX 2 3 4 6
    python -m benchmarks.transfer --methods cp --rx 4   # one cell
    python -m benchmarks.transfer --quick               # small, for a smoke test
    python -m benchmarks.transfer --merge a.json b.json --out all.json --png all.png

The committed reference network (``sigmadecomp_torch/demo/weights``); every
3x3 conv but the stem is compressed at the per-layer ratio rX, without
fine-tuning, and evaluated on the Fashion-MNIST test images (all 10,000 by
default). Rows, each with the same ALS options (``n_iter_max`` 10, ``rng`` 0):

* ``frobenius``: the classical algorithms (``covariances=None``);
* ``sigma``: Sigma from Fashion-MNIST training images (2,048, the demo's
  calibration set) -- the in-distribution reference;
* ``digits``: Sigma from scikit-learn's digits resized to 28x28 (all 1,797);
* ``digits+<rule>``: the digits statistics passed through
  :func:`sigmadecomp_torch.transfer.shrink_covariances` with that rule
  (``moments``, ``holdout`` -- fit on the digits of even batches, checked on
  the odd ones, applied to all -- ``oas`` with the number of digit images, and
  ``a=<value>`` for a fixed ``a`` on every layer);
* ``digits+moments+bn``: the moments rule with ``prior=`` the data-free
  statistics of :func:`sigmadecomp_torch.covariances_from_batchnorm`
  (unshrunk, 2,048 smooth-noise images): per layer the rule chooses the
  shrinkage ``a`` and the share ``w`` of the BatchNorm statistics together;
* ``digits+moments+bn+match`` (``digits+moments+match``): the same (the
  moments rule alone), then each layer's second moment matched to the
  BatchNorm's output mean squares (``match=True``);
* ``bn``: the data-free statistics alone, with their own BatchNorm-fitted
  shrinkage (no image data; a reference for the mixture).

``--rng`` changes only the seed of the ALS initialisation (the data are
those of ``--seed``), to see how much of a difference is fit-to-fit spread.
For each cell the fraction of the gain kept is
``(acc(row) - acc(frobenius)) / (acc(sigma) - acc(frobenius))``; the goal is
at least 2/3. Writes ``--out`` (JSON: rows, chosen ``a`` per layer, config)
and, with ``--png``, a figure of the fraction kept per cell.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np

GOAL = 2.0 / 3.0
RULES = ("moments", "moments+match", "moments+bn", "moments+bn+match", "bn", "holdout", "oas")


def parse_args(argv=None):
    from benchmarks.common import (check_input_file, check_output_file, positive_float,
                                   positive_int)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="256 calibration images, 512 digits, 1,000 test images, rX 4, "
                        "Tucker-2, 3 sweeps, rules moments and a=0.5")
    p.add_argument("--methods", nargs="+", default=None, choices=("tucker2", "cp"))
    p.add_argument("--rx", nargs="+", type=positive_float, default=None)
    p.add_argument("--rules", nargs="+", default=None,
                   help="moments, moments+match, moments+bn, moments+bn+match, bn, holdout, oas, "
                        "or a=<float> "
                        "(default: "
                        "moments, oas, a=0.5, holdout, moments+bn)")
    p.add_argument("--iters", type=positive_int, default=None, help="ALS sweeps (default 10)")
    p.add_argument("--calib", type=positive_int, default=None)
    p.add_argument("--digits", type=positive_int, default=None, help="digit images (default all)")
    p.add_argument("--test", type=positive_int, default=None)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rng", type=int, default=None,
                   help="seed of the ALS initialisation (default: --seed)")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--png", default=None, help="PNG of the fraction of the gain kept")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="no run: join the rows of earlier --out files (e.g. one per method), "
                        "print the table, write --out / --png")
    args = p.parse_args(argv)
    for path in args.merge or ():
        check_input_file(p, "--merge", path)
    check_output_file(p, "--out", args.out, inputs=args.merge or ())
    check_output_file(p, "--png", args.png)
    if args.quick:
        d = dict(methods=["tucker2"], rx=[4.0], rules=["moments", "a=0.5"], iters=3, calib=256,
                 digits=512, test=1000)
    else:
        d = dict(methods=["tucker2", "cp"], rx=[2.0, 3.0, 4.0, 6.0],
                 rules=["moments", "oas", "a=0.5", "holdout", "moments+bn"], iters=10,
                 calib=2048,
                 digits=None, test=10000)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for r in args.rules:
        if r not in RULES and not (r.startswith("a=") and _shrinkage(r[2:]) is not None):
            p.error(f"--rules: {r!r} is not allowed; use {', '.join(RULES)} or a=<float> "
                    f"with the float in [0, 1]")
    if args.rng is None:
        args.rng = args.seed
    return args


def _shrinkage(text):
    """``float(text)`` if it is a shrinkage in [0, 1], else None."""
    try:
        a = float(text)
    except ValueError:
        return None
    return a if 0.0 <= a <= 1.0 else None


def gain_kept(acc, frob, sigma):
    """``(acc - frob) / (sigma - frob)``; None when Sigma does not beat Frobenius."""
    if acc is None or sigma - frob <= 0:
        return None
    return (acc - frob) / (sigma - frob)


def main(argv=None, *, log=print):
    import torch

    from sigmadecomp.exceptions import CompressionWarning, ConvergenceWarning
    from sigmadecomp_torch import collect_covariances, compress, covariances_from_batchnorm
    from sigmadecomp_torch.data import digits, make_loader
    from sigmadecomp_torch.demo.reference import evaluate

    from benchmarks.common import reference_setup
    from sigmadecomp_torch.models import conv3x3_names
    from sigmadecomp_torch.transfer import shrink_covariances

    args = parse_args(argv)
    if args.merge:
        return merge(args, log=log)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, x_cal, x_test, y_test = reference_setup(args.calib, args.test, args.seed)
    names = conv3x3_names(model, skip_first=True)
    x_dig, _ = digits(limit=args.digits, seed=args.seed)

    def stats_of(x):
        return collect_covariances(model, make_loader(x, batch_size=256), layers=names,
                                   progress=False)

    s_fm = stats_of(x_cal)
    # the digits in batches of 128, even batches in one half, odd in the other
    batches = torch.arange(len(x_dig)) // 128
    s_even, s_odd = stats_of(x_dig[batches % 2 == 0]), stats_of(x_dig[batches % 2 == 1])
    s_dig = {k: s_even[k] + s_odd[k] for k in names}
    base = evaluate(model, x_test, y_test)
    log(f"reference accuracy {base:.4f} on {len(x_test)} test images; {len(x_cal)} Fashion-MNIST "
        f"calibration images, {len(x_dig)} digits; layers {names}")

    s_bn = {}

    def bn_stats(shrinkage):
        # data-free statistics from the BatchNorm layers (as many noise images as in the demo)
        if shrinkage not in s_bn:
            s_bn[shrinkage], _ = covariances_from_batchnorm(
                model, layers=names, input_shape=tuple(x_test.shape[1:]), samples=2048,
                seed=args.seed + 2, shrinkage=shrinkage)
        return s_bn[shrinkage]

    rows = []

    def run(method, rx, label, cov, **extra):
        opts = {"n_iter_max": args.iters, "rng": args.rng}
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", CompressionWarning)
            cm, rep = compress(model, method, covariances=cov, ratio=rx, layers=names,
                               options=opts, progress=False)
        sec = time.perf_counter() - t0
        with torch.inference_mode():
            acc = evaluate(cm, x_test, y_test, batch_size=250)
        row = {"method": method, "rx": rx, "row": label, "accuracy": acc,
               "compress_seconds": sec, **extra}
        rows.append(row)
        log(f"{method:8s} rX={rx:g} {label:16s} acc {100 * acc:6.2f}  ({sec:.1f} s"
            + (f", a={_fmt_alphas(extra['alphas'])}" if "alphas" in extra else "")
            + (f", w={_fmt_alphas(extra['weights'])}" if any(extra.get("weights", {}).values())
               else "") + ")")
        return row

    for method in args.methods:
        for rx in args.rx:
            run(method, rx, "frobenius", None)
            run(method, rx, "sigma", s_fm)
            run(method, rx, "digits", s_dig)
            for rule in args.rules:
                t0 = time.perf_counter()
                if rule == "bn":
                    run(method, rx, "bn", bn_stats("bn"))
                    continue
                if rule.startswith("a="):
                    cov = shrink_covariances(s_dig, float(rule[2:]))
                elif rule in ("moments", "moments+match"):
                    cov = shrink_covariances(s_dig, "moments", model=model,
                                             match=rule.endswith("+match"))
                elif rule.startswith("moments+bn"):
                    cov = shrink_covariances(s_dig, "moments", model=model, prior=bn_stats(0.0),
                                             match=rule.endswith("+match"))
                elif rule == "oas":
                    cov = shrink_covariances(s_dig, "oas", images=len(x_dig))
                else:
                    cov = shrink_covariances(s_even, "holdout", holdout=s_odd, model=model,
                                             method=method, ratio=rx,
                                             options={"n_iter_max": args.iters,
                                                      "rng": args.rng})
                sel = time.perf_counter() - t0
                run(method, rx, f"digits+{rule}", cov, alphas=dict(cov.alphas),
                    weights=dict(cov.weights), select_seconds=sel)

    for r in rows:
        ref = {x["row"]: x["accuracy"] for x in rows
               if (x["method"], x["rx"]) == (r["method"], r["rx"])}
        r["gain_kept"] = gain_kept(r["accuracy"], ref["frobenius"], ref["sigma"])
    out = {"config": vars(args), "reference_accuracy": base, "layers": names, "rows": rows,
           "seconds": time.perf_counter() - t_start, "threads": args.threads}
    log(table(out))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    if args.png:
        plot(out, args.png)
    return out


def merge(args, *, log=print):
    """Join the rows of several result files (later files win for a repeated row)."""
    rows, parts = {}, []
    for path in args.merge:
        with open(path) as f:
            part = json.load(f)
        cfg = {k: (os.path.basename(v) if k in ("out", "png") and v else v)
               for k, v in part["config"].items()}
        parts.append({"file": os.path.basename(path), "config": cfg, "seconds": part["seconds"]})
        for r in part["rows"]:
            rows[(r["method"], r["rx"], r["row"])] = r
    out = {"reference_accuracy": part["reference_accuracy"], "layers": part["layers"],
           "rows": list(rows.values()), "parts": parts}
    log(table(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    if args.png:
        plot(out, args.png)
    return out


def _fmt_alphas(alphas):
    return "[" + " ".join(f"{a:g}" for a in alphas.values()) + "]"


def table(out):
    """Markdown: accuracy (fraction of the gain kept) per row and cell; misses marked."""
    rows = out["rows"]
    cells = sorted({(r["method"], r["rx"]) for r in rows}, key=lambda c: (c[0] != "tucker2", c))
    labels = list(dict.fromkeys(r["row"] for r in rows))
    head = "| row | " + " | ".join(f"{m} rX={rx:g}" for m, rx in cells) + " |"
    lines = [head, "|---" * (len(cells) + 1) + "|"]
    for lab in labels:
        parts = []
        for m, rx in cells:
            r = next((x for x in rows if (x["method"], x["rx"], x["row"]) == (m, rx, lab)), None)
            if r is None:
                parts.append("")
                continue
            s = f"{100 * r['accuracy']:.2f}"
            if lab not in ("frobenius", "sigma") and r["gain_kept"] is not None:
                kept = r["gain_kept"]
                s += f" ({100 * kept:.0f}%{'' if kept >= GOAL else ' MISS'})"
            parts.append(s)
        lines.append(f"| {lab} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    labels = [lab for lab in dict.fromkeys(r["row"] for r in rows)
              if lab not in ("frobenius", "sigma")]
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4), squeeze=False)
    for ax, m in zip(axes[0], methods):
        rxs = sorted({r["rx"] for r in rows if r["method"] == m})
        width = 0.8 / max(len(labels), 1)
        for i, lab in enumerate(labels):
            vals = []
            for rx in rxs:
                r = next((x for x in rows if (x["method"], x["rx"], x["row"]) == (m, rx, lab)),
                         None)
                vals.append(np.nan if r is None or r["gain_kept"] is None else r["gain_kept"])
            xs = np.arange(len(rxs)) + (i - (len(labels) - 1) / 2) * width
            ax.bar(xs, np.clip(vals, -1.0, None), width, label=lab)
        ax.axhline(GOAL, color="k", ls="--", lw=1, label="goal 2/3")
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(np.arange(len(rxs)), [f"rX={rx:g}" for rx in rxs])
        ax.set_ylim(-1.0, 1.3)
        ax.set_title(f"{m}: fraction of the Sigma gain kept (clipped at -1)")
        ax.set_ylabel("(acc - Frobenius) / (Sigma Fashion - Frobenius)")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
