"""CPU latency of compressed layers and of a compressed ResNet-18 against the dense ones.

Two parts, both timed with :mod:`torch.utils.benchmark` (medians of
``blocked_autorange`` blocks, original and compressed runs interleaved, median
of ``--rounds`` rounds):

* **per layer** -- each factorized form at rX = 3 (Tucker-2, CP, the
  low-rank SVD conv, TT; the low-rank Linear and TT-FC on the 512 -> 1000
  classifier) against the dense layer, on ResNet-18 3x3 conv shapes at their
  real input size, batch 1 and 16, contiguous and channels_last, at torch's
  default threads;
* **whole model** -- :func:`sigmadecomp_torch.resnet.resnet18` (torchvision's
  layout, random weights: only time is measured) at 224 x 224, Tucker-2 at
  rX = 3 on every 3x3 conv but the stem (ranks from the ratio), original vs
  compressed at batch 1 and 16, contiguous and
  channels_last, first at torch's default threads, then at one thread; and
  the same with ``compress(..., min_speedup=S, example_input=x)`` (layers
  whose factorized form is not ``S`` times faster at that batch stay dense).

Only time is measured, so Tucker-2 and the low-rank SVD layers are built by
``compress`` from random factors of the right ranks (registered here as the
formats ``tucker2_random`` / ``svd_random``; a real Frobenius decomposition of
ResNet-18's 512-channel kernels takes minutes on this machine, even at
``n_iter_max=2``, because of its 100-sweep HOOI initialisation); CP runs one
sweep from a random start, TT its closed-form TT-SVD.

The speed-up is set against the multiply-add reduction counted with
:class:`torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2). The machine's
load average is printed with the figures. Run from the repository root::

    python -m benchmarks.latency [--rounds 3] [--min-speedup 1.0] [--min-run-time 0.5]
                                 [--layer-shapes 4] [--out notes/latency.md]

``--quick`` runs a tiny version in seconds (64 x 64 input, short timings) and
does not write the notes unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
import warnings

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (NOTES_DIR, check_output_file, nonnegative_float, nonnegative_int,
                               positive_float, positive_int)
from sigmadecomp.exceptions import ConvergenceWarning
from sigmadecomp_torch import LAYER_METHODS, LayerMethod, compress, register_layer_method
from sigmadecomp_torch.latency import compare_latency, measure_latency
from sigmadecomp_torch.resnet import resnet18

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _load():
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def count_macs(model, x):
    """Multiply-adds of one forward pass (FLOPs / 2 of FlopCounterMode)."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2


class _RandomFactors:
    """Random factors of the right shapes (only time is measured, values do not matter)."""

    def __init__(self, weight, **factors):
        self.shape = tuple(weight.shape)
        g = torch.Generator(device="cpu").manual_seed(0)
        for k, shp in factors.items():
            setattr(self, k, torch.randn(shp, generator=g, dtype=weight.dtype)
                    .to(weight.device) / max(shp[0], 1) ** 0.5)

    def to_tensor(self):
        if hasattr(self, "core"):
            return torch.einsum("tsij,Tt,Ss->TSij", self.core, self.out_factor, self.in_factor)
        return self.left @ self.right


def _random_tucker2(weight, ranks, sigma, options):
    T, S, H, W = weight.shape
    rT, rS = ranks
    return _RandomFactors(weight, core=(rT, rS, H, W), out_factor=(T, rT), in_factor=(S, rS))


def _random_svd(weight, rank, sigma, options):
    T = weight.shape[0]
    return _RandomFactors(weight, left=(T, int(rank)), right=(int(rank), weight[0].numel()))


@contextlib.contextmanager
def _random_formats():
    """The formats of LAYER_METHODS with random factors instead of a decomposition.

    The Frobenius decompositions of ResNet-18's large kernels take minutes on
    this machine and the factors' values do not change the time. Registered
    only while the benchmark runs.
    """
    register_layer_method("tucker2_random", LayerMethod(
        "tucker2", _random_tucker2, LAYER_METHODS["tucker2"].build))
    register_layer_method("svd_random", LayerMethod(
        "svd", _random_svd, LAYER_METHODS["svd"].build))
    try:
        yield
    finally:
        del LAYER_METHODS["tucker2_random"], LAYER_METHODS["svd_random"]


def _is_inner_3x3(name, m):
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3) and name != "conv1"


def _compress(model, x=None, min_speedup=None, method="tucker2_random", layers=_is_inner_3x3):
    opts = {"n_iter_max": 1, "init": "random", "rng": 0} if method == "cp" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return compress(model, method, ratio=3, layers=layers, options=opts,
                        progress=False, min_speedup=min_speedup, example_input=x)


def _fmt_model(model, fmt):
    return model.to(memory_format=FORMATS[fmt])


# ------------------------------------------------------------------ per layer


def per_layer(shapes, batches, min_run_time, rounds):
    """Rows ``(layer, form, batch, format, dense_ms, factorized_ms)``."""
    torch.manual_seed(0)
    rows = []
    cases = []
    for (c_out, c_in, hw) in shapes:
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).eval()
        label = f"conv {c_in}->{c_out} 3x3 @{hw}x{hw}"
        for method in ("tucker2_random", "cp", "svd_random", "tt"):
            small, _ = _compress(conv, method=method, layers=None)
            cases.append((label, type(small).__name__, conv, small, (c_in, hw, hw)))
    fc = nn.Linear(512, 1000).eval()
    for method in ("svd_random", "tt"):
        small, _ = _compress(fc, method=method, layers=None)
        cases.append(("fc 512->1000", type(small).__name__, fc, small, (512,)))
    for label, form, dense, small, shape in cases:
        for b in batches:
            fmts = FORMATS if len(shape) == 3 else {"contiguous": torch.contiguous_format}
            for fname, fmt in fmts.items():
                d, f = compare_latency(dense, small, (b,) + shape, memory_format=fmt,
                                       min_run_time=min_run_time, rounds=rounds)
                rows.append((label, form, b, fname, d, f))
    return rows


# ---------------------------------------------------------------- whole model


def whole_model(size, batches, threads_list, min_speedup, min_run_time, rounds,
                layers=_is_inner_3x3):
    """Whole-model medians; returns (rows, mac figures, per-layer verdicts)."""
    torch.manual_seed(0)
    original = resnet18().eval()
    t0 = time.perf_counter()
    compressed, report = _compress(original, layers=layers)
    t_comp = time.perf_counter() - t0
    x1 = torch.randn(1, 3, size, size)
    macs = (count_macs(original, x1), count_macs(compressed, x1))
    gated, verdicts = {}, {}
    for b in batches:  # min_speedup decides at the batch (and threads) it will run at
        xb = torch.randn(b, 3, size, size)
        gated[b], rep = _compress(original, xb, min_speedup, layers=layers)
        verdicts[b] = ([(r["name"], r["latency_dense_ms"], r["latency_factorized_ms"], True)
                        for r in rep.layers]
                       + [(s["name"], s["latency_dense_ms"], s["latency_factorized_ms"], False)
                          for s in rep.skipped if "latency_dense_ms" in s])
        verdicts[b].sort(key=lambda v: list(dict(original.named_modules())).index(v[0]))
    rows = []
    default_threads = torch.get_num_threads()
    try:
        for threads in threads_list:
            torch.set_num_threads(threads or default_threads)
            tlabel = f"default ({default_threads})" if threads is None else str(threads)
            for b in batches:
                for fname in FORMATS:
                    x = torch.randn(b, 3, size, size).contiguous(memory_format=FORMATS[fname])
                    models = {"original": original, "compressed": compressed,
                              f"min_speedup={min_speedup:g}": gated[b]}
                    models = {k: _fmt_model(m, fname) for k, m in models.items()}
                    times = {k: [] for k in models}
                    load = _load()
                    for _ in range(rounds):  # interleaved
                        for k, m in models.items():
                            times[k].append(measure_latency(m, x, min_run_time=min_run_time))
                    med = {k: statistics.median(v) for k, v in times.items()}
                    rows.append((tlabel, b, fname, med, load))
                    print(f"threads {tlabel:>11} batch {b:>2} {fname:<13} " + "  ".join(
                        f"{k} {v:8.2f} ms" for k, v in med.items()) + f"  load {load}",
                        flush=True)
    finally:
        torch.set_num_threads(default_threads)
        for m in [original, compressed, *gated.values()]:
            m.to(memory_format=torch.contiguous_format)
    return rows, macs, verdicts, report, t_comp


# -------------------------------------------------------------------- output


def render(args, layer_rows, model_rows, macs, verdicts, report, t_comp, seconds):
    mac_red = macs[0] / macs[1]
    gate = f"min_speedup={args.min_speedup:g}"
    out = ["# Latency of compressed layers and of a compressed ResNet-18 (CPU)", "",
           f"Command: `python -m benchmarks.latency{' --quick' if args.quick else ''} "
           f"--rounds {args.rounds} --min-speedup {args.min_speedup:g} --min-run-time "
           f"{args.min_run_time:g} --layer-shapes {args.layer_shapes}`; torch "
           f"{torch.__version__}, {os.cpu_count()} CPUs, default threads "
           f"{torch.get_num_threads()}; total {seconds:.0f} s. Times are medians "
           "(torch.utils.benchmark `blocked_autorange`, then the median over "
           f"{args.rounds} interleaved rounds), in ms, no_grad, eval mode. The machine is "
           "shared: the load average (1/5/15 min) is printed with each figure.", ""]
    out += ["## Whole model", "",
            f"ResNet-18 (torchvision layout, random weights) at {args.size}x{args.size}; "
            "Tucker-2 rX=3 (ranks from the ratio, random factors) on "
            f"{len(report.layers)} 3x3 convs (every one but the stem unless --quick), "
            "parameters "
            f"{report.params_before} -> {report.params_after} (model rX "
            f"{report.ratio:.2f}); decomposition {t_comp:.1f} s.",
            f"Multiply-adds per image (FlopCounterMode / 2): {macs[0] / 1e9:.3f} G -> "
            f"{macs[1] / 1e9:.3f} G, a reduction of **{mac_red:.2f}x**; the target speed-up "
            f"is >= 0.6 x {mac_red:.2f} = {0.6 * mac_red:.2f}x.", "",
            f"`{gate}`: each candidate layer is timed dense and factorized at the batch "
            "of the row (default threads, contiguous) and kept dense unless the factorized "
            "form is faster.", "",
            "| threads | batch | format | original | compressed | speed-up | / MAC red. | "
            f"{gate} | speed-up | load |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for tlabel, b, fname, med, load in model_rows:
        o, c, g = med["original"], med["compressed"], med[gate]
        out.append(f"| {tlabel} | {b} | {fname} | {o:.2f} | {c:.2f} | {o / c:.2f}x | "
                   f"{o / c / mac_red:.2f} | {g:.2f} | {o / g:.2f}x | {load} |")
    out += ["", f"Per-layer verdicts of `{gate}` (dense ms -> factorized ms, default "
            "threads, contiguous):", ""]
    for b, vs in verdicts.items():
        kept = [v for v in vs if not v[3]]
        out.append(f"* batch {b}: {len(vs) - len(kept)} of {len(vs)} layers factorized; kept "
                   "dense: " + (", ".join(f"{n} ({d:.2f} -> {f:.2f})" for n, d, f, _ in kept)
                                or "none"))
        out.append("  factorized: " + ", ".join(f"{n} ({d:.2f} -> {f:.2f})"
                                                for n, d, f, k in vs if k))
    out += ["", "## Per layer (default threads)", "",
            "Each form at rX=3 from `compress` on the bare layer (random weights), against "
            "the dense layer at its ResNet-18 input size; speed-up = dense / factorized.", "",
            "| layer | form | batch | format | dense | factorized | speed-up |",
            "|---|---|---|---|---|---|---|"]
    for label, form, b, fname, d, f in layer_rows:
        out.append(f"| {label} | {form} | {b} | {fname} | {d:.3f} | {f:.3f} | {d / f:.2f}x |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--min-speedup", type=nonnegative_float, default=1.0)
    ap.add_argument("--size", type=positive_int, default=224)
    ap.add_argument("--min-run-time", type=positive_float, default=0.5,
                    help="seconds of blocked_autorange per whole-model measurement")
    ap.add_argument("--out", default=None, help="markdown file (default notes/latency.md, "
                    "none with --quick)")
    ap.add_argument("--layer-shapes", type=nonnegative_int, default=4,
                    help="how many of the ResNet-18 conv shapes (64@56, 128@28, 256@14, "
                    "512@7) to time per layer")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    check_output_file(ap, "--out", args.out)
    t0 = time.perf_counter()
    layers, batches = _is_inner_3x3, (1, 16)
    if args.quick:  # tiny input, the last stage only, short timings
        args.size, args.rounds, args.min_run_time = 32, 1, 0.01
        shapes, layer_time, batches = [(32, 32, 8)], 0.01, (1, 2)
        layers = lambda name, m: _is_inner_3x3(name, m) and name.startswith("layer4")  # noqa
    else:
        shapes, layer_time = [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)], 0.05
    out = args.out if args.out is not None or args.quick else os.path.join(NOTES_DIR, "latency.md")
    print(f"load average {_load()}", flush=True)
    shapes = shapes[:args.layer_shapes]

    def write(layer_rows):
        text = render(args, layer_rows, model_rows, macs, verdicts, report, t_comp,
                      time.perf_counter() - t0)
        if out:
            with open(out, "w") as f:
                f.write(text)
        return text

    with _random_formats():
        model_rows, macs, verdicts, report, t_comp = whole_model(
            args.size, batches, (None, 1), args.min_speedup, args.min_run_time, args.rounds,
            layers)
        write([])  # the whole-model figures are kept if the per-layer part is cut short
        layer_rows = per_layer(shapes, batches, layer_time, args.rounds)
    print(write(layer_rows))
    return model_rows, layer_rows, macs


if __name__ == "__main__":
    main()
