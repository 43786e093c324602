"""Sequential compression and the refit at ResNet-18 (or ResNet-50) scale: time and peak memory.

    python -m benchmarks.sequential_scale            # 64 images of 224x224, Tucker-2 rX 3
    python -m benchmarks.sequential_scale --arch resnet50
    python -m benchmarks.sequential_scale --quick    # seconds: 32x32 images, two layers, fc

The ResNet-18 (``--arch resnet50``: ResNet-50) of ``benchmarks.scale``
(torchvision's layout, random weights,
random images: time and memory do not depend on the values), every Conv2d and
Linear but the first and the last compressed by Tucker-2 (the 1x1 convs by
the SVD) at rX 3, at default thread settings, one process. Three runs, each
in a fresh process (so that each peak is its own):

* ``one-shot``: ``compress(model, 'tucker2', data=batches, ratio=3)``;
* ``one-shot + refit``: the same with ``refit='all'`` (the classifier refitted);
* ``sequential + refit``: ``sequential=True, refit='all'``.

Prints wall seconds (statistics included) and the peak resident memory of
each run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings

from benchmarks.common import positive_int

RUNS = {"one-shot": {}, "one-shot + refit": {"refit": "all"},
        "sequential + refit": {"sequential": True, "refit": "all"}}


def one_run(label, images, size, batch, quick, arch="resnet18"):
    """Compress once in this process; returns the figures of ``label``."""
    from benchmarks.common import peak_rss_mib
    from benchmarks.scale import _batches, _model
    from sigmadecomp_torch import compress

    model = _model(arch)
    batches = _batches(images, size, batch)
    kw = dict(RUNS[label])
    if quick:  # two layers compressed, the classifier refitted
        kw.update(layers=["layer1.0.conv1", "layer1.0.conv2"], options={"n_iter_max": 1})
        if "refit" in kw:
            kw["refit"] = ["fc"]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = compress(model, "tucker2", data=batches, ratio=3, progress=False, **kw)
    return {"run": label, "seconds": time.perf_counter() - t0,
            "peak_rss_mib": peak_rss_mib(), "layers": len(report.layers),
            "refitted": [r["name"] for r in report.refitted],
            "groups": 1 + max((r.get("group", 0) for r in report.layers), default=0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32x32 images, two layers, seconds")
    ap.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50"),
                    help="a model of benchmarks.scale.ARCHS")
    ap.add_argument("--images", type=positive_int, default=64)
    ap.add_argument("--size", type=positive_int, default=224)
    ap.add_argument("--batch", type=positive_int, default=16)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one run
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.size, args.batch = 4, 32, 2
    if args.one:
        print(json.dumps(one_run(args.one, args.images, args.size, args.batch, args.quick,
                                 args.arch)))
        return None
    rows = []
    for label in RUNS:
        cmd = [sys.executable, "-m", "benchmarks.sequential_scale", "--one", label,
               "--images", str(args.images), "--size", str(args.size),
               "--batch", str(args.batch), "--arch", args.arch] + (
                   ["--quick"] if args.quick else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"{label:20s} {row['seconds']:7.1f} s  peak RSS {row['peak_rss_mib']:6.0f} MiB  "
              f"{row['layers']} layers, refitted {row['refitted']}"
              + (f", {row['groups']} groups" if "sequential" in label else ""), flush=True)
    return rows


if __name__ == "__main__":
    main()
