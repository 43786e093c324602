"""Peak memory of ``compress`` on an ImageNet-class network, against the statistics it is given.

Each configuration runs in a fresh process (peak resident memory is per
process): build the network (``sigmadecomp_torch.resnet``, random weights),
collect the statistics of every conv and Linear layer on a few small random
images (Sigma's size does not depend on the image size), then
``compress(model, 'tucker2', ...)`` every conv with one sweep per layer
(memory, not accuracy, is measured). Reported per configuration: the bytes
of the statistics, the process's resident memory after collecting them, its
peak after ``compress``, and the seconds of ``compress``.

Configurations: the statistics stored in float64 and in float32, centered
Tucker-2, and ranks from a parameter budget (a third of the convs' weights)
instead of a ratio.

Run from the repository root::

    python -m benchmarks.compress_memory                 # ResNet-50, about 3 minutes
    python -m benchmarks.compress_memory --arch resnet18
    python -m benchmarks.compress_memory --quick         # seconds: two layers of ResNet-18
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings

from benchmarks.common import check_output_file

#: (label, statistics dtype, centered, budget instead of ratio 3)
CONFIGS = (
    ("float64 statistics", "float64", False, False),
    ("float32 statistics", "float32", False, False),
    ("float64, centered=True", "float64", True, False),
    ("float64, budget=1/3 of the weights", "float64", False, True),
)


def measure(arch, dtype, centered, budget, layers=None, images=8, size=64):
    """One configuration, in this process: a dict of the figures."""
    import torch

    from benchmarks.common import peak_rss_mib, rss_mib
    from benchmarks.scale import _model
    from sigmadecomp_torch import collect_covariances, compress

    model = _model(arch)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 3, size, size, generator=g) for _ in range(max(1, images // 4))]
    stats = collect_covariances(model, batches, layers=layers, progress=False,
                                dtype=getattr(torch, dtype))
    rss_stats = rss_mib()
    convs = layers or [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    how = {"ratio": 3.0}
    if budget:
        how = {"budget": sum(model.get_submodule(n).weight.numel() for n in convs) // 3}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one sweep per layer: a ConvergenceWarning each
        _, report = compress(model, "tucker2", covariances=stats, layers=convs,
                             centered=centered, progress=False,
                             options={"n_iter_max": 1, "init_iter_max": 1}, **how)
    return {"statistics_mib": sum(s.sigma.numel() * s.sigma.element_size()
                                  for s in stats.values()) / 2**20,
            "rss_after_statistics_mib": rss_stats, "peak_rss_mib": peak_rss_mib(),
            "compress_s": time.perf_counter() - t0, "layers": len(report.layers)}


def run(args):
    rows = []
    for label, dtype, centered, budget in CONFIGS:
        cmd = [sys.executable, "-m", "benchmarks.compress_memory", "--one",
               json.dumps([args.arch, dtype, centered, budget, args.layers])]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["config"] = label
        rows.append(row)
        print(f"{label}: statistics {row['statistics_mib']:.0f} MiB, RSS after them "
              f"{row['rss_after_statistics_mib']:.0f} MiB, peak after compress "
              f"{row['peak_rss_mib']:.0f} MiB, compress {row['compress_s']:.1f} s "
              f"({row['layers']} layers)", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet50", choices=("resnet18", "resnet50"))
    ap.add_argument("--quick", action="store_true", help="two layers of ResNet-18")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args(argv)
    check_output_file(ap, "--json", args.json)
    if args.one is not None:
        arch, dtype, centered, budget, layers = json.loads(args.one)
        print(json.dumps(measure(arch, dtype, centered, budget, layers)))
        return None
    args.layers = None
    if args.quick:
        args.arch, args.layers = "resnet18", ["layer1.0.conv1", "layer1.0.conv2"]
    rows = run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
