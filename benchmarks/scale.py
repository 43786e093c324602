"""ResNet-18 at ImageNet shapes: statistics, decomposition and latency, end to end.

The network is ``sigmadecomp_torch.resnet.resnet18()`` (torchvision's exact
layout and layer names, random weights, eval mode); the calibration data are
random images (time and memory do not depend on the pixel values). Measured in
one run:

* the forward pass over the calibration batches against
  ``collect_covariances`` over the same batches (every Conv2d and Linear),
  and the bytes of the statistics;
* ``compress(..., method, ratio=3)`` with the statistics, for each method
  (default ``tucker2`` and ``cp``), at default thread settings first and then
  pinned to one thread (``sigmadecomp.threads(1)``): whole-model seconds and
  the seconds of every layer (from the report);
* peak resident memory of the process after each phase
  (``ru_maxrss``, a running maximum);
* latency of the original and of each compressed model
  (``torch.utils.benchmark``, median, batch 1 and 16).

Sweeps can be bounded (``--n-iter-max``) to keep the run within minutes on a
small machine; the report says what was used. Layer-parallel decomposition
over processes is not measured here.

Run from the repository root::

    python -m benchmarks.scale                  # full run: notes/scale.md + notes/scale.png
    python -m benchmarks.scale --quick          # seconds: two 64-channel layers, 32x32 images,
                                                # 1 sweep, prints only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time

import torch

import sigmadecomp
from benchmarks.common import NOTES_DIR
from sigmadecomp_torch import collect_covariances, compress
from sigmadecomp_torch.resnet import resnet18


def peak_rss_mib():
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batches(n_images, size, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    out, left = [], n_images
    while left > 0:
        b = min(batch, left)
        out.append(torch.rand(b, 3, size, size, generator=g))
        left -= b
    return out


def time_forward(model, batches):
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    return time.perf_counter() - t0


def latency(model, batch, size, min_run_time):
    """Median seconds of one forward pass at ``batch`` images (torch.utils.benchmark)."""
    from torch.utils import benchmark

    x = torch.rand(batch, 3, size, size)
    with torch.no_grad():
        model(x)  # warm-up
        t = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x},
                            num_threads=torch.get_num_threads())
        return t.blocked_autorange(min_run_time=min_run_time).median


def run(args):
    torch.manual_seed(0)
    model = resnet18().eval()
    batches = _batches(args.images, args.size, args.batch)
    out = {"images": args.images, "size": args.size, "batch": args.batch,
           "torch_threads": torch.get_num_threads(), "load_start": os.getloadavg()[0],
           "n_iter_max": args.n_iter_max, "ratio": args.ratio,
           "layers": "all Conv2d and Linear" if args.layers is None else ", ".join(args.layers)}
    out["forward_s"] = time_forward(model, batches)
    t0 = time.perf_counter()
    stats = collect_covariances(model, batches, layers=args.layers, progress=False)
    out["statistics_s"] = time.perf_counter() - t0
    out["statistics_mib"] = sum(s.sigma.numel() * s.sigma.element_size()
                                for s in stats.values()) / 2**20
    out["peak_rss_after_statistics_mib"] = peak_rss_mib()
    print(f"forward {out['forward_s']:.2f} s, statistics {out['statistics_s']:.2f} s "
          f"({out['statistics_s'] / out['forward_s']:.1f}x), {out['statistics_mib']:.0f} MiB "
          f"of statistics, peak RSS {out['peak_rss_after_statistics_mib']:.0f} MiB", flush=True)
    options = {} if args.n_iter_max is None else {"n_iter_max": args.n_iter_max}
    sizes = [1, 16] if not args.quick else [1]
    out["latency_original_s"] = {b: latency(model, b, args.size, args.min_run_time) for b in sizes}
    out["runs"] = []
    for method in args.methods.split(","):
        for setting in ("default", "1"):
            ctx = contextlib.nullcontext() if setting == "default" else sigmadecomp.threads(1)
            with ctx:
                t0 = time.perf_counter()
                small, report = compress(model, method, covariances=stats, ratio=args.ratio,
                                         layers=args.layers, options=dict(options),
                                         progress=False)
                wall = time.perf_counter() - t0
            rec = {"method": method, "threads": setting, "seconds": wall,
                   "layers": [(r["name"], r["seconds"]) for r in report.layers],
                   "compression": report.ratio,
                   "peak_rss_mib": peak_rss_mib(), "load": os.getloadavg()[0]}
            if setting == "default":
                rec["latency_s"] = {b: latency(small, b, args.size, args.min_run_time)
                                    for b in sizes}
            out["runs"].append(rec)
            print(f"{method} threads={setting}: {wall:.1f} s, peak RSS "
                  f"{rec['peak_rss_mib']:.0f} MiB, load {rec['load']:.1f}", flush=True)
    out["load_end"] = os.getloadavg()[0]
    return out


def write_notes(out, path_md, path_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in out["runs"] if r["threads"] == "default"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        names = [n for n, _ in r["layers"]]
        ax.bar([j + i * width for j in range(len(names))], [s for _, s in r["layers"]],
               width=width, label=r["method"])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("seconds (default threads)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"ResNet-18, decomposition time per layer, rX={out['ratio']}")
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    lines = ["# ResNet-18 at scale", "", "Command: `python -m benchmarks.scale` "
             f"(images {out['images']} x {out['size']}^2, batches of {out['batch']}, "
             f"n_iter_max={out['n_iter_max']}, rX={out['ratio']}, torch threads "
             f"{out['torch_threads']}, load average {out['load_start']:.1f} -> "
             f"{out['load_end']:.1f}).", "",
             f"- forward over the calibration batches: {out['forward_s']:.2f} s",
             f"- `collect_covariances`: {out['statistics_s']:.2f} s "
             f"({out['statistics_s'] / out['forward_s']:.1f}x the forward), statistics "
             f"{out['statistics_mib']:.0f} MiB, peak RSS {out['peak_rss_after_statistics_mib']:.0f} MiB",
             "", "| method | threads | seconds | peak RSS MiB | load | latency b=1 / b=16 (ms) |",
             "|---|---|---:|---:|---:|---|"]
    orig = out["latency_original_s"]
    lines.append("| original | - | - | - | - | " + " / ".join(
        f"{1e3 * v:.1f}" for v in orig.values()) + " |")
    for r in out["runs"]:
        lat = r.get("latency_s")
        lat_s = " / ".join(f"{1e3 * v:.1f}" for v in lat.values()) if lat else "-"
        lines.append(f"| {r['method']} | {r['threads']} | {r['seconds']:.1f} "
                     f"| {r['peak_rss_mib']:.0f} | {r['load']:.1f} | {lat_s} |")
    lines += ["", f"Per-layer seconds: `{os.path.basename(path_png)}` and below.", ""]
    for r in out["runs"]:
        lines.append(f"- {r['method']} ({r['threads']}): " + ", ".join(
            f"{n} {s:.1f}" for n, s in r["layers"]))
    with open(path_md, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="32x32 images, 1 sweep, seconds")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=3.0)
    ap.add_argument("--methods", default="tucker2,cp")
    ap.add_argument("--n-iter-max", type=int, default=None, help="bound the sweeps per layer")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--layers", default=None,
                    help="comma-separated layer names (default: every Conv2d and Linear)")
    ap.add_argument("--json", default=None, help="also write the raw figures here")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.size, args.batch = 2, 32, 2
        args.n_iter_max, args.min_run_time = 1, 0.05
        args.layers = args.layers or "layer1.0.conv1,layer1.0.conv2"
    if args.layers:
        args.layers = args.layers.split(",")
    out = run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    if not args.quick:
        write_notes(out, os.path.join(NOTES_DIR, "scale.md"), os.path.join(NOTES_DIR, "scale.png"))
    return out


if __name__ == "__main__":
    main()
