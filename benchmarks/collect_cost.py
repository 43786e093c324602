"""Cost of ``collect_covariances`` relative to a plain forward pass.

A small ResNet-style network (:class:`sigmadecomp_torch.models.ResNetSmall`)
runs over the same Fashion-MNIST batches (smooth random images if the Debian
package dataset-fashion-mnist is not installed) in three ways, interleaved and
repeated; the figure is the ratio of medians:

* ``forward``  -- ``model(x)`` under ``torch.no_grad()`` (the baseline);
* ``collect (all)`` -- statistics of every Conv2d and Linear layer;
* ``collect (3x3)`` -- only the 3x3 convs after the stem (the layers that
  :func:`sigmadecomp_torch.compress` factorizes with Tucker-2 / CP);
* ``collect (full GEMM)`` -- as ``all`` but forming the whole ``X^T X`` of
  each chunk instead of its upper blocks (what the blocking saves);
* ``collect (all, position_fraction=f)`` -- a random fraction ``f`` of the
  output positions (an estimate of Sigma; its distance to the exact one is
  printed too).

It also counts multiply-adds per image: the forward convs/linears versus the
Gram products ``n^2 * L`` (``n`` patch size, ``L`` output positions).

Run from the repository root::

    python -m benchmarks.collect_cost [--images 1024] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from benchmarks.common import calibration_images
from sigmadecomp_torch import collect_covariances
from sigmadecomp_torch import covariance as _cov
from sigmadecomp_torch.models import ResNetSmall, conv3x3_names


def _macs(model, x):
    """Forward multiply-adds and Gram multiply-adds per image, by hooks."""
    fwd, gram = {}, {}

    def hook(name):
        def f(m, args, out):
            n = m.weight[0].numel()
            L = out[0, 0].numel() if isinstance(m, nn.Conv2d) else 1
            fwd[name] = m.weight.numel() * L
            g = m.groups if isinstance(m, nn.Conv2d) else 1
            gram[name] = g * n * n * L
        return f

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
          if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x[:1])
    for h in hs:
        h.remove()
    return fwd, gram


def _full_gram(self, X):
    self.xx += X.transpose(-1, -2) @ X


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: robust timings on a shared machine)")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--fractions", default="0.25,0.1",
                    help="comma-separated position_fraction values to time")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, source = calibration_images(args.images, seed=0)
    x = torch.from_numpy(images).unsqueeze(1)
    batches = list(x.split(args.batch))
    torch.manual_seed(0)
    model = ResNetSmall(width=args.width).eval()
    names = conv3x3_names(model, skip_first=True)

    def forward():
        with torch.no_grad():
            for b in batches:
                model(b)

    def collect_all():
        collect_covariances(model, batches, progress=False)

    def collect_3x3():
        collect_covariances(model, batches, layers=names, progress=False)

    fractions = [float(f) for f in args.fractions.split(",") if f]

    def collect_fraction(f):
        return lambda: collect_covariances(model, batches, position_fraction=f, progress=False)

    def collect_full_gemm():
        orig = _cov._Accumulator._gram
        _cov._Accumulator._gram = _full_gram
        try:
            collect_covariances(model, batches, progress=False)
        finally:
            _cov._Accumulator._gram = orig

    runs = {"forward": forward, "collect (all)": collect_all, "collect (3x3)": collect_3x3,
            "collect (full GEMM)": collect_full_gemm}
    for f in fractions:
        runs[f"collect (all, position_fraction={f:g})"] = collect_fraction(f)
    forward()  # warm-up
    collect_3x3()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    exact = collect_covariances(model, batches, progress=False)
    devs = {}
    for f in fractions:
        approx = collect_fraction(f)()
        devs[f] = sorted(float((approx[k].sigma - exact[k].sigma).norm()
                               / exact[k].sigma.norm()) for k in names)

    fwd, gram = _macs(model, x)
    fwd_total = sum(fwd.values())
    gram_all = sum(gram.values())
    gram_3x3 = sum(gram[n] for n in names)
    print(f"# collect_covariances cost: ResNetSmall(width={args.width}), {args.images} "
          f"{source} images, batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"torch {torch.__version__}")
    print()
    print("| run | median s | x forward | runs (s) |")
    print("|---|---:|---:|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.3f} | {med[k] / med['forward']:.2f} | "
              + ", ".join(f"{t:.2f}" for t in v) + " |")
    print()
    print(f"multiply-adds per image: forward {fwd_total / 1e6:.2f} M; Gram n^2*L over all "
          f"layers {gram_all / 1e6:.2f} M ({gram_all / fwd_total:.2f}x), over the 3x3 convs "
          f"{gram_3x3 / 1e6:.2f} M; the upper-block Gram does about half of that")
    for f, dev in devs.items():
        print(f"position_fraction={f:g}: ||Sigma~ - Sigma||_F / ||Sigma||_F over the 3x3 "
              f"convs from {dev[0]:.4f} to {dev[-1]:.4f} (median {statistics.median(dev):.4f})")


if __name__ == "__main__":
    main()
