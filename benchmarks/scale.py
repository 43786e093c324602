"""ResNet-18 (or ResNet-50) at ImageNet shapes: statistics, decomposition and latency, end to end.

The network is ``sigmadecomp_torch.resnet.resnet18()`` (``--arch resnet50``:
``resnet50()``; torchvision's exact layout and layer names, random weights,
eval mode); the calibration data are
random images (time and memory do not depend on the pixel values). Measured in
one run:

* the forward pass over the calibration batches against
  ``collect_covariances`` over the same batches (every Conv2d and Linear),
  the bytes of the statistics and the peak resident memory after it;
* ``compress(model, method, ratio=3)`` of every Conv2d with the statistics,
  for each method (default ``tucker2`` and ``cp``) and each *setting*
  ``P:T`` -- ``P`` processes (1: this process; 2: processes spawned with
  ``torch.multiprocessing`` in a gloo group, ``compress`` spreading the
  layers over them, timed from a barrier before the call to one after it),
  ``T`` threads (``default``: no thread setting at all, the library's own
  policy; ``1``: ``sigmadecomp.threads(1)`` around the call in every
  process). The default setting runs first. Whole-model seconds, the seconds
  of every layer (from the report, measured by the process that decomposed
  it), the Sigma-error of every layer, the peak resident memory of each
  process, and whether the model of each multi-process run is bit-identical
  to the one-process model with the same threads;
* latency of the original and of each method's one-process default-thread
  model, measured after all decompositions in ``--latency-rounds``
  interleaved rounds (``torch.utils.benchmark``, batch 1 and 16): at torch's
  default threads and at one thread in the default contiguous layout; then
  both models and the input in ``torch.channels_last`` at default threads;
  then the same with every BatchNorm folded into the conv before it
  (``torch.fx.experimental.optimization.fuse``, eval mode), in both models;
  then both models through ``torch.compile`` (inductor, static shapes,
  compiled once per model and batch before the rounds), contiguous and in
  ``channels_last`` (``--no-compile`` leaves these out; ``--quick`` does).

``--n-iter-max`` bounds the sweeps of every layer (and the sweeps of the
Tucker-2 HOOI start) to keep the run within minutes on a small machine;
``--cp-layers`` restricts CP to a subset of the convs. The notes say what
was used.

Run from the repository root::

    python -m benchmarks.scale                  # full run: notes/scale.md + notes/scale.png
    python -m benchmarks.scale --quick          # seconds: two 64-channel layers, 32x32 images,
                                                # 1 sweep, prints only
    python -m benchmarks.scale --arch resnet50 --methods tucker2
                                                # notes/scale_resnet50.md + .png
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import tempfile
import time
import warnings

import torch

import sigmadecomp
from benchmarks.common import (NOTES_DIR, check_output_dir, check_output_file, peak_rss_mib,
                               positive_float, positive_int)
from benchmarks.latency import count_macs
from sigmadecomp_torch import collect_covariances, compress, load_covariances, save_covariances
from sigmadecomp_torch.resnet import resnet18, resnet50

#: ``--arch``: (constructor, title in the notes, stem of the notes' file names).
ARCHS = {"resnet18": (resnet18, "ResNet-18", "scale"),
         "resnet50": (resnet50, "ResNet-50", "scale_resnet50")}

#: The performance goals on 2 cores at default settings.
TARGETS = {"tucker2": 600.0, "cp": 900.0, "memory_mib": 3 * 1024.0}


def _batches(n_images, size, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    out, left = [], n_images
    while left > 0:
        b = min(batch, left)
        out.append(torch.rand(b, 3, size, size, generator=g))
        left -= b
    return out


def _model(arch="resnet18"):
    torch.manual_seed(0)
    return ARCHS[arch][0]().eval()


def conv_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


def time_forward(model, batches):
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    return time.perf_counter() - t0


def prepare(model, batch, size, channels_last=False, fold_bn=False, compile=False):
    """``(model, x)`` ready to time: a random input of ``batch`` images, and a copy of
    the model with each BatchNorm folded into its conv (``fold_bn``), in
    ``torch.channels_last`` with the input (``channels_last``), and wrapped in
    ``torch.compile`` (``compile``; compiled by one warm-up call here, so that
    the timing sees only the compiled code).
    """
    x = torch.rand(batch, 3, size, size)
    if fold_bn:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit, imported by fx
            from torch.fx.experimental.optimization import fuse

            model = fuse(copy.deepcopy(model))
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if compile:
        # one compiled graph per (model, batch): static shapes, no recompilation
        model = torch.compile(model, dynamic=False)
    with torch.no_grad():
        model(x)  # warm-up (and compilation)
    return model, x


def time_model(model, x, min_run_time, threads=None):
    """Median seconds of ``model(x)`` without grad (torch.utils.benchmark), at torch's
    current thread count or at ``threads``."""
    from torch.utils import benchmark

    with torch.no_grad():
        t = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x},
                            num_threads=threads or torch.get_num_threads())
        return t.blocked_autorange(min_run_time=min_run_time).median


#: The latency settings: (name, keyword arguments of :func:`prepare` plus
#: ``threads``); the first is the user's default, the others tuned.
LATENCY_VARIANTS = (
    ("default threads", {}),
    ("one thread", {"threads": 1}),
    ("default threads, channels_last", {"channels_last": True}),
    ("channels_last, BatchNorm folded", {"channels_last": True, "fold_bn": True}),
    ("torch.compile", {"compile": True}),
    ("torch.compile, channels_last", {"compile": True, "channels_last": True}),
)


def latency_rounds(models, sizes, args):
    """``({variant: {label: {batch: [seconds of each round]}}}, {variant: error})``.

    Every model is measured in turn, round after round, so that a drift of
    the machine (load, clock) hits the original and the compressed models
    alike; the notes give the median of the rounds. Each (variant, model,
    batch) is prepared once (compiled once) and timed in every round.
    Variants that compile are left out when ``args.compile`` is false; one
    that fails (e.g. no C++ compiler for torch.compile) is recorded under
    the second dict with its error and the others go on.
    """
    out, failed = {}, {}
    for name, kw in LATENCY_VARIANTS:
        kw = dict(kw)
        threads = kw.pop("threads", None)
        if kw.get("compile") and not getattr(args, "compile", True):
            continue
        try:
            ready = {(label, b): prepare(m, b, args.size, **kw)
                     for label, m in models.items() for b in sizes}
        except Exception as exc:  # reported, not fatal: the other settings still count
            failed[name] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        per = {label: {b: [] for b in sizes} for label in models}
        for _ in range(args.latency_rounds):
            for b in sizes:
                for label in models:
                    per[label][b].append(time_model(*ready[label, b], args.min_run_time,
                                                    threads))
        out[name] = per
        del ready
    return out, failed


def _options(method, n_iter_max, cp_inner="exact"):
    opts = {} if n_iter_max is None else {"n_iter_max": n_iter_max}
    if method == "tucker2" and n_iter_max is not None:
        opts["init_iter_max"] = n_iter_max
    if method == "cp" and cp_inner == "adaptive":  # the documented fast option of cp
        opts["inner"] = {"maxiter": "adaptive"}
    return opts


def _compress(model, stats, method, layers, n_iter_max, threads, distributed, cp_inner="exact"):
    ctx = contextlib.nullcontext() if threads == "default" else sigmadecomp.threads(int(threads))
    with ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bounded sweeps: a ConvergenceWarning per layer
        t0 = time.perf_counter()
        small, report = compress(model, method, covariances=stats, ratio=3.0, layers=layers,
                                 options=_options(method, n_iter_max, cp_inner), progress=False,
                                 distributed=distributed)
        return small, report, time.perf_counter() - t0


def _worker(rank, world, init_method, stats_path, out_path, job):
    import torch.distributed as dist

    stats = load_covariances(stats_path)
    model = _model(job["arch"])
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        dist.barrier()
        t0 = time.perf_counter()
        small, report, _ = _compress(model, stats, job["method"], job["layers"],
                                     job["n_iter_max"], job["threads"], None,
                                     job["cp_inner"])
        dist.barrier()
        wall = time.perf_counter() - t0
        rss = torch.tensor([peak_rss_mib()], dtype=torch.float64)
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        if rank == 0:
            torch.save({"seconds": wall, "report": _rows(report), "peak_rss_mib": float(rss),
                        "state": small.state_dict()}, out_path)
    finally:
        dist.destroy_process_group()


def _spawn(world, stats_path, job):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(world, "file://" + os.path.join(tmp, "pg"), stats_path,
                                out_path, job), nprocs=world, join=True)
        return torch.load(out_path, weights_only=False)


def _rows(report):
    return [{"name": r["name"], "method": r["method"], "ranks": r["ranks"],
             "seconds": r["seconds"], "sigma_error": r["sigma_error"], "n_iter": r["n_iter"]}
            for r in report.layers]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _parse_settings(text):
    out = []
    for item in text.split(","):
        p, _, t = item.partition(":")
        if not p.isdigit() or int(p) < 1 or not (t == "default" or (t.isdigit() and int(t) > 0)):
            raise ValueError(f"--settings item {item!r} is not allowed; use P:T with P a "
                             "process count and T 'default' or a thread count")
        out.append((int(p), t))
    return out


def _notes_paths(args):
    stem = ARCHS[args.arch][2]
    return (os.path.join(args.notes, stem + ".md"), os.path.join(args.notes, stem + ".png"))


def _save_partial(out, args):
    """Write the figures so far (JSON, and the notes in the full mode): an
    interrupted run keeps what it measured."""
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    if not args.quick and out.get("runs"):
        out.setdefault("load_end", os.getloadavg())
        write_notes(out, *_notes_paths(args))
        del out["load_end"]


def run(args):
    model = _model(args.arch)
    batches = _batches(args.images, args.size, args.batch)
    out = {"arch": args.arch, "stats_dtype": args.stats_dtype, "images": args.images,
           "size": args.size, "batch": args.batch, "torch_threads": torch.get_num_threads(),
           "cores": os.cpu_count(),
           "load_start": os.getloadavg(), "n_iter_max": args.n_iter_max, "ratio": 3.0,
           "cp_inner": args.cp_inner,
           "settings": args.settings, "methods": args.methods}
    time_forward(model, batches[:1])  # warm-up
    out["forward_s"] = time_forward(model, batches)
    t0 = time.perf_counter()
    stats = collect_covariances(model, batches, layers=args.layers, progress=False,
                                dtype=getattr(torch, args.stats_dtype))
    out["statistics_s"] = time.perf_counter() - t0
    out["statistics_mib"] = sum(s.sigma.numel() * s.sigma.element_size()
                                for s in {id(v): v for v in stats.values()}.values()) / 2**20
    out["peak_rss_after_statistics_mib"] = peak_rss_mib()
    out["load_after_statistics"] = os.getloadavg()[0]
    print(f"forward {out['forward_s']:.2f} s, statistics {out['statistics_s']:.2f} s "
          f"({out['statistics_s'] / out['forward_s']:.1f}x), {out['statistics_mib']:.0f} MiB "
          f"of statistics, peak RSS {out['peak_rss_after_statistics_mib']:.0f} MiB, load "
          f"{out['load_after_statistics']:.1f}", flush=True)
    sizes = [1] if args.quick else [1, 16]
    latency_models = {"original": model}
    convs = conv_names(model)
    settings = _parse_settings(args.settings)
    stats_path = None
    out["runs"] = []
    with tempfile.TemporaryDirectory() as tmp:
        if any(p > 1 for p, _ in settings):
            stats_path = os.path.join(tmp, "stats.pt")
            save_covariances(stats, stats_path)
        for method in args.methods.split(","):
            layers = args.layers or convs
            if method == "cp" and args.cp_layers:
                layers = [n for n in layers if n in args.cp_layers]
            one = {}  # threads -> state of the one-process model
            for procs, threads in settings:
                load0 = os.getloadavg()[0]
                if procs == 1:
                    rss0 = peak_rss_mib()
                    small, report, wall = _compress(model, stats, method, layers,
                                                    args.n_iter_max, threads, False,
                                                    args.cp_inner)
                    rec = {"seconds": wall, "report": _rows(report),
                           "peak_rss_mib": peak_rss_mib(), "peak_rss_before_mib": rss0}
                    one[threads] = small.state_dict()
                else:
                    job = {"arch": args.arch, "method": method, "layers": layers,
                           "n_iter_max": args.n_iter_max, "threads": threads,
                           "cp_inner": args.cp_inner}
                    rec = _spawn(procs, stats_path, job)
                    state = rec.pop("state")
                    rec["identical_to_1_process"] = (_same(state, one[threads])
                                                     if threads in one else None)
                    small = None
                rec.update(method=method, processes=procs, threads=threads,
                           load_before=load0, load_after=os.getloadavg()[0],
                           layers=len(layers))
                if small is not None and threads == "default":
                    latency_models[method] = small  # timed after all runs, with the original
                out["runs"].append(rec)
                _save_partial(out, args)
                print(f"{method} processes={procs} threads={threads}: {rec['seconds']:.1f} s "
                      f"({len(layers)} layers), peak RSS {rec['peak_rss_mib']:.0f} MiB, load "
                      f"{load0:.1f} -> {rec['load_after']:.1f}"
                      + (f", identical to 1 process: {rec['identical_to_1_process']}"
                         if "identical_to_1_process" in rec else ""), flush=True)
    x1 = torch.rand(1, 3, args.size, args.size)
    out["macs"] = {label: count_macs(m, x1) for label, m in latency_models.items()}
    out["latency_load_before"] = os.getloadavg()[0]
    out["latency"], out["latency_failed"] = latency_rounds(latency_models, sizes, args)
    out["latency_rounds"] = args.latency_rounds
    for name, per in out["latency"].items():
        print(f"latency, {name}: " + "; ".join(
            f"{label} " + " / ".join(f"{1e3 * statistics.median(v):.1f}" for v in by_b.values())
            + " ms" for label, by_b in per.items()), flush=True)
    out["load_end"] = os.getloadavg()
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def _fmt_s(v):
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def write_notes(out, path_md, path_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for path in (path_md, path_png):  # a new --notes folder is created, not a crash
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    runs = out["runs"]
    names = []
    for r in runs:
        for row in r["report"]:
            if row["name"] not in names:
                names.append(row["name"])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        sec = {row["name"]: row["seconds"] for row in r["report"]}
        xs = [j + i * width for j, n in enumerate(names) if n in sec]
        ax.bar(xs, [sec[n] for n in names if n in sec], width=width,
               label=f"{r['method']}, {r['processes']} proc., threads {r['threads']}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("seconds per layer")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    title = ARCHS[out.get("arch", "resnet18")][1]
    ax.set_title(f"{title} ({out['size']}x{out['size']}), decomposition time per layer at rX=3, "
                 f"n_iter_max={out['n_iter_max']}")
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)

    ratio = out["statistics_s"] / out["forward_s"]
    ls, le = out["load_start"], out["load_end"]
    lines = [
        f"# {title} at scale",
        "",
        "Command: `python -m benchmarks.scale"
        + ("" if out.get("arch", "resnet18") == "resnet18" else f" --arch {out['arch']}")
        + ("" if out.get("stats_dtype", "float64") == "float64" else
           f" --stats-dtype {out['stats_dtype']}")
        + ("" if out.get("cp_inner", "exact") == "exact" else f" --cp-inner {out['cp_inner']}")
        + ("" if out.get("methods", "tucker2,cp") == "tucker2,cp" else
           f" --methods {out['methods']}")
        + f"` ({out['images']} random images of "
        f"{out['size']}x{out['size']}, batches of {out['batch']}, every Conv2d at rX=3, "
        f"n_iter_max={out['n_iter_max']}, settings {out['settings']}; {out['cores']} cores, "
        f"torch threads {out['torch_threads']}). Load average (1, 5, 15 min) at the start "
        f"{ls[0]:.1f}, {ls[1]:.1f}, {ls[2]:.1f}; at the end {le[0]:.1f}, {le[1]:.1f}, "
        f"{le[2]:.1f}.",
        "",
        "## Statistics",
        "",
        f"- forward pass over the {out['images']} images: {out['forward_s']:.2f} s",
        "- `collect_covariances` (every Conv2d and the Linear layer, accumulated in float64, "
        f"stored in {out.get('stats_dtype', 'float64')}): {out['statistics_s']:.1f} s, "
        f"**{ratio:.1f}x the forward pass**",
        f"- statistics: {out['statistics_mib']:.0f} MiB; peak RSS after them "
        f"{out['peak_rss_after_statistics_mib']:.0f} MiB",
        "",
        "## Decomposition (`compress`, rX=3)",
        "",
        "| method | layers | processes | threads | seconds | peak RSS MiB | load before -> after "
        "| identical to 1 process |",
        "|---|---:|---:|---|---:|---:|---|---|",
    ]
    for r in runs:
        ident = r.get("identical_to_1_process")
        ident = "-" if "identical_to_1_process" not in r else ("n/a" if ident is None
                                                                else str(ident).lower())
        lines.append(f"| {r['method']} | {r['layers']} | {r['processes']} | {r['threads']} | "
                     f"{_fmt_s(r['seconds'])} | {r['peak_rss_mib']:.0f} | "
                     f"{r['load_before']:.1f} -> {r['load_after']:.1f} | {ident} |")
    lines += latency_lines(out)
    lines += ["", f"Per-layer seconds: `{os.path.basename(path_png)}` and the table below "
              "(seconds, Sigma-error).", ""]
    head = "| layer | " + " | ".join(f"{r['method']} {r['processes']}p/{r['threads']}"
                                     for r in runs) + " |"
    lines += [head, "|---|" + "---:|" * len(runs)]
    for n in names:
        cells = []
        for r in runs:
            row = next((x for x in r["report"] if x["name"] == n), None)
            cells.append("-" if row is None else
                         f"{_fmt_s(row['seconds'])} ({row['sigma_error']:.3f})"
                         if row["sigma_error"] is not None else _fmt_s(row["seconds"]))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    with open(path_md, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def latency_lines(out):
    """The latency table of the notes: medians of the interleaved rounds."""
    lat = out.get("latency")
    if not lat:
        return []
    labels = list(next(iter(lat.values())))
    methods = [m for m in labels if m != "original"]
    lines = ["", f"## Latency (median of {out['latency_rounds']} interleaved rounds, ms)", "",
             "Each round times every model in turn (torch.utils.benchmark, eval mode, no "
             f"grad); load average {out['latency_load_before']:.1f} before. The first "
             "setting is the user's default (contiguous layout, torch's default threads), "
             "the others tuned. Speed-up = original / compressed, from the medians; in "
             "brackets the range of the per-round ratios.", ""]
    macs = out.get("macs")
    if macs:
        o = macs["original"]
        lines += ["Multiply-adds per image (`FlopCounterMode`, whole model): original "
                  f"{o / 1e9:.3f} G; " + "; ".join(
                      f"{m} {macs[m] / 1e9:.3f} G (reduction **{o / macs[m]:.2f}x**, "
                      f"0.6 of it {0.6 * o / macs[m]:.2f}x)" for m in methods) + ".", ""]
    lines += ["| setting | batch | original | " + " | ".join(methods) + " | "
              + " | ".join(f"speed-up {m}" for m in methods) + " |",
              "|---|---:|---:|" + "---:|" * (2 * len(methods))]
    for name, per in lat.items():
        for b in per["original"]:
            o = statistics.median(per["original"][b])
            cells = [f"{1e3 * statistics.median(per[m][b]):.1f}" for m in methods]
            ratios = []
            for m in methods:
                rr = [x / y for x, y in zip(per["original"][b], per[m][b])]
                ratios.append(f"**{o / statistics.median(per[m][b]):.2f}x** "
                              f"({min(rr):.2f}-{max(rr):.2f})")
            lines.append(f"| {name} | {b} | {1e3 * o:.1f} | " + " | ".join(cells) + " | "
                         + " | ".join(ratios) + " |")
    for name, err in out.get("latency_failed", {}).items():
        lines.append(f"| {name} | - | failed: {err} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="32x32 images, 1 sweep, seconds")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="resnet18",
                    help="the network (random weights, torchvision's layout)")
    ap.add_argument("--images", type=positive_int, default=64)
    ap.add_argument("--stats-dtype", choices=("float64", "float32"), default="float64",
                    help="storage of the statistics (collect_covariances(dtype=...))")
    ap.add_argument("--size", type=positive_int, default=224)
    ap.add_argument("--batch", type=positive_int, default=16)
    ap.add_argument("--methods", default="tucker2,cp",
                    help="comma-separated formats of compress (svd, tucker2, cp, tt)")
    ap.add_argument("--settings", default="1:default,1:1,2:default,2:1",
                    help="comma-separated P:T (processes:threads), default first")
    ap.add_argument("--n-iter-max", type=positive_int, default=None,
                    help="bound the sweeps per layer")
    ap.add_argument("--cp-inner", choices=("exact", "adaptive"), default="exact",
                    help="CP's B-update: 'exact' (the default of cp) or 'adaptive' "
                         "(inner={'maxiter': 'adaptive'}, a few CG iterations per sweep)")
    ap.add_argument("--min-run-time", type=positive_float, default=1.0)
    ap.add_argument("--latency-rounds", type=positive_int, default=5,
                    help="interleaved rounds of the latency measurement (median reported)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time both models under torch.compile (needs a C++ compiler)")
    ap.add_argument("--layers", default=None,
                    help="comma-separated layer names (default: every Conv2d)")
    ap.add_argument("--cp-layers", default=None,
                    help="comma-separated layer names CP is restricted to (default: all)")
    ap.add_argument("--json", default=None, help="also write the raw figures here")
    ap.add_argument("--notes", default=NOTES_DIR,
                    help="folder of scale.md and scale.png (scale_resnet50.* for resnet50)")
    args = ap.parse_args(argv)
    try:
        _parse_settings(args.settings)
    except ValueError as exc:
        ap.error(str(exc))
    bad = [m for m in args.methods.split(",") if m not in ("svd", "tucker2", "cp", "tt")]
    if bad or not args.methods:
        ap.error(f"--methods {args.methods!r}: expected comma-separated formats of svd, "
                 "tucker2, cp, tt")
    check_output_file(ap, "--json", args.json)
    check_output_dir(ap, "--notes", args.notes)
    if args.quick:
        args.images, args.size, args.batch = 2, 32, 2
        args.n_iter_max, args.min_run_time, args.latency_rounds = 1, 0.05, 1
        args.compile = False  # compiling takes tens of seconds per model
        args.layers = args.layers or "layer1.0.conv1,layer1.0.conv2"
    for name in ("layers", "cp_layers"):
        if getattr(args, name):
            setattr(args, name, getattr(args, name).split(","))
    out = run(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    if not args.quick:
        write_notes(out, *_notes_paths(args))
    return out


if __name__ == "__main__":
    main()
