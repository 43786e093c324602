"""Decomposition phase of ``compress``: one process against N gloo processes.

Builds the ImageNet ResNet-18 of :mod:`sigmadecomp_torch.resnet` (random
weights), collects Sigma statistics of the chosen convs on a few random
images once, saves them, then times ``compress(model, method, ratio=3, ...)``
on those layers

* in this process (1 process, default threads), and
* in N processes spawned with ``torch.multiprocessing`` and joined in a gloo
  group (``tcp://127.0.0.1``), each decomposing its share of the layers
  (``distributed=None`` picks the group up); the time is from a barrier
  before the call to a barrier after it, on rank 0, so process start-up and
  statistics loading are not counted.

Each configuration runs ``--repeats`` times; the median is reported, with
the machine's load average before and after (the machine may be shared).
The N-process model is checked to be bit-identical to the one-process model.
Default threads first (no ``torch.set_num_threads``); ``--threads 1`` pins
one thread per process as the tuned figure.

Run::

    python -m benchmarks.parallel              # ~10 min on a loaded 2-core machine
    python -m benchmarks.parallel --quick      # about half a minute, start-up included
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import nonnegative_int, positive_int
from sigmadecomp_torch import collect_covariances, compress, load_covariances, save_covariances
from sigmadecomp_torch.resnet import resnet18

LAYERS = ["layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2",
          "layer3.0.conv1", "layer3.0.conv2"]
QUICK_LAYERS = ["layer1.0.conv1", "layer1.0.conv2"]


def _model():
    torch.manual_seed(0)
    return resnet18().eval()


def _compress(model, stats, args, distributed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few sweeps: ConvergenceWarning on every layer
        return compress(model, args.method, covariances=stats, ratio=3, layers=args.layers,
                        options={"n_iter_max": args.sweeps, "init": args.init},
                        progress=False, distributed=distributed)


def _worker(rank, world, init_method, stats_path, out_path, args):
    if args.threads:
        torch.set_num_threads(args.threads)
    stats = load_covariances(stats_path)
    model = _model()
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            small, _ = _compress(model, stats, args, None)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            torch.save({"times": times, "state": small.state_dict()}, out_path)
    finally:
        dist.destroy_process_group()


def _spawn(world, stats_path, out_path, args):
    init_file = tempfile.mktemp(prefix="sigmadecomp_pg_")
    mp.spawn(_worker, args=(world, f"file://{init_file}", stats_path, out_path, args),
             nprocs=world, join=True)
    if os.path.exists(init_file):
        os.remove(init_file)
    return torch.load(out_path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=positive_int, default=2)
    ap.add_argument("--method", default="tucker2", choices=["tucker2", "cp", "svd"])
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--sweeps", type=positive_int, default=3, help="n_iter_max of each layer")
    ap.add_argument("--init", default="svd", help="init option of the solver")
    ap.add_argument("--threads", type=nonnegative_int, default=0,
                    help="torch threads per process (0: default)")
    ap.add_argument("--quick", action="store_true", help="layer1 only, one repeat")
    args = ap.parse_args(argv)
    args.layers = QUICK_LAYERS if args.quick else LAYERS
    if args.quick:
        args.repeats, args.sweeps = 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    model = _model()
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    stats = collect_covariances(model, [torch.randn(4, 3, 64, 64, generator=g)
                                        for _ in range(2)],
                                layers=args.layers, progress=False)
    print(f"statistics of {len(args.layers)} layers: {time.perf_counter() - t0:.1f} s")
    load0 = os.getloadavg()
    one, ref = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref, report = _compress(model, stats, args, False)
        one.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = os.path.join(tmp, "stats.pt")
        save_covariances(stats, stats_path)
        got = _spawn(args.workers, stats_path, os.path.join(tmp, "out.pt"), args)
    load1 = os.getloadavg()
    ref_state = ref.state_dict()
    identical = ref_state.keys() == got["state"].keys() and all(
        torch.equal(ref_state[k], got["state"][k]) for k in ref_state)
    t1, tn = statistics.median(one), statistics.median(got["times"])
    threads = args.threads or f"default ({torch.get_num_threads()})"
    print(f"method={args.method} ratio=3 n_iter_max={args.sweeps} init={args.init} "
          f"threads/process={threads} layers={len(args.layers)}")
    for r in report.layers:
        print(f"  {r['name']:18s} {str(r['ranks']):12s} {r['seconds']:.2f} s (1 process)")
    print(f"1 process : median {t1:.2f} s  runs {[round(t, 2) for t in one]}")
    print(f"{args.workers} processes: median {tn:.2f} s  runs "
          f"{[round(t, 2) for t in got['times']]}")
    print(f"speed-up {t1 / tn:.2f}x  identical model: {identical}")
    print(f"load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load0)} "
          f"after {tuple(round(v, 2) for v in load1)} on {os.cpu_count()} cores")
    if not identical:
        raise SystemExit("the multi-process model differs from the one-process model")


if __name__ == "__main__":
    main()
