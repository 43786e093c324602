"""Fit each conv to its output as the following BatchNorm scales it (tried; not built).

    python -m benchmarks.output_weighting                      # Tucker-2 and CP, rX 2 3 4 6
    python -m benchmarks.output_weighting --methods cp --rx 4  # one cell
    python -m benchmarks.output_weighting --quick              # small, for a smoke test

A conv followed by an eval-mode BatchNorm feeds the next layers with
``D (K x) + const``, ``D = diag(|gamma| / sqrt(running_var + eps))``. By
Proposition 1 the expected squared change of *that* output is
``||D (K - K~) Sigma^{1/2}||_F^2``: the Sigma-error with the output channels
weighted by ``D``. The low-rank formats keep their shape under a row scaling
(``D^{-1}`` folds into the output factor), so every solver minimises it
unchanged: decompose ``D K``, then scale the last factor by ``D^{-1}``.
This script compares, on the committed reference network (every 3x3 conv but
the stem at the per-layer ratio rX, ALS ``n_iter_max`` 10, ``rng`` 0, Sigma
from 2,048 Fashion-MNIST training images, no fine-tuning, all 10,000 test
images):

* ``frobenius`` / ``sigma``: the unweighted objectives (as everywhere else);
* ``frobenius+D`` / ``sigma+D``: the same objectives with the rows weighted
  by ``D`` (``D`` clipped below at 1e-3 of its largest entry).

Results and their reading: ``notes/output_weighting.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings



def parse_args(argv=None):
    from benchmarks.common import check_output_file, positive_float, positive_int

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="Tucker-2 at rX 4 on 2000 test images with 512 calibration images")
    p.add_argument("--methods", nargs="+", default=None, choices=("tucker2", "cp"))
    p.add_argument("--rx", nargs="+", type=positive_float, default=None)
    p.add_argument("--calib", type=positive_int, default=None)
    p.add_argument("--test", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    check_output_file(p, "--out", args.out)
    quick = args.quick
    args.methods = args.methods or (["tucker2"] if quick else ["tucker2", "cp"])
    args.rx = args.rx or ([4.0] if quick else [2.0, 3.0, 4.0, 6.0])
    args.calib = args.calib or (512 if quick else 2048)
    args.test = args.test or (2000 if quick else None)
    return args


def batchnorm_scales(model, names):
    """``{name: D}``: ``|gamma| / sqrt(running_var + eps)`` of the BatchNorm registered right
    after each layer in its parent (``conv1, bn1``), float64, clipped below at 1e-3 of its
    largest entry so that ``D^{-1}`` stays finite."""
    import torch
    from torch import nn

    out = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        kids = list(model.get_submodule(parent).named_children())
        i = [k for k, (n, _) in enumerate(kids) if n == leaf][0]
        bn = kids[i + 1][1] if i + 1 < len(kids) else None
        if not isinstance(bn, nn.BatchNorm2d):
            raise ValueError(f"no BatchNorm2d registered right after {name!r}")
        d = (bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)).double()
        out[name] = torch.clamp(d, min=1e-3 * float(d.max()))
    return out


def weighted_compress(model, method, covariances, ratio, names, options, scales):
    """``compress`` of every layer in ``names`` with its rows weighted by ``scales[name]``:
    ``D K`` is decomposed and the last factor of the result scaled by ``D^{-1}``."""
    import torch

    from sigmadecomp_torch import compress

    work = copy.deepcopy(model)
    for name, d in scales.items():
        conv = work.get_submodule(name)
        with torch.no_grad():
            conv.weight.mul_(d.view(-1, 1, 1, 1).to(conv.weight))
    small, report = compress(work, method, covariances=covariances, ratio=ratio, layers=names,
                             options=options, progress=False)
    done = {r["name"] for r in report.layers}
    for name, d in scales.items():
        layer = small.get_submodule(name)
        target = layer.last if name in done else layer  # (a layer left dense: its own weight)
        with torch.no_grad():
            target.weight.div_(d.view(-1, 1, 1, 1).to(target.weight))
    return small


def main(argv=None, *, log=print):
    import torch

    from sigmadecomp.exceptions import CompressionWarning, ConvergenceWarning
    from sigmadecomp_torch import collect_covariances
    from sigmadecomp_torch.data import make_loader
    from sigmadecomp_torch.demo.reference import evaluate

    from benchmarks.common import reference_setup
    from sigmadecomp_torch.models import conv3x3_names

    args = parse_args(argv)
    t_start = time.perf_counter()
    model, x_cal, x_test, y_test = reference_setup(args.calib, args.test, args.seed)
    names = conv3x3_names(model, skip_first=True)
    stats = collect_covariances(model, make_loader(x_cal, batch_size=256), layers=names,
                                progress=False)
    scales = batchnorm_scales(model, names)
    none = {n: torch.ones_like(d) for n, d in scales.items()}
    options = {"n_iter_max": 10, "rng": 0}
    rows = []
    for method in args.methods:
        for rx in args.rx:
            row = {"method": method, "rx": rx}
            for label, cov, weights in (("frobenius", None, none), ("sigma", stats, none),
                                        ("frobenius+D", None, scales),
                                        ("sigma+D", stats, scales)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    warnings.simplefilter("ignore", CompressionWarning)
                    small = weighted_compress(model, method, cov, rx, names, options, weights)
                with torch.inference_mode():
                    row[label] = round(100 * evaluate(small, x_test, y_test, batch_size=250), 2)
            rows.append(row)
            log(json.dumps(row))
    out = {"config": vars(args), "layers": names, "rows": rows,
           "seconds": time.perf_counter() - t_start}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
