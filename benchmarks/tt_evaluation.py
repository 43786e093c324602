"""Latency of the Tensor-Train layers' evaluation paths against the dense layers (CPU).

    python -m benchmarks.tt_evaluation                 # layers and the reference net
    python -m benchmarks.tt_evaluation --quick         # seconds: small shapes, one round

`TTConv2d` / `TTLinear` (`sigmadecomp_torch.tt_layers`) evaluate either the TT
chain (`evaluation='chain'`) or the dense kernel multiplied out of their cores
(`'kernel'`; in inference the kernel is kept between calls until a core
changes), and `'auto'` (the default) picks by predicted multiply-adds. Rows:

* per layer (random weights, TT-SVD at rX = 3, the shapes of
  `benchmarks/latency.py`): dense layer, chain, kernel rebuilt in every call
  (`keep_kernel = False`), auto (inference: the kernel kept), batch 1 and 16;
* the committed reference net with its six 3x3 convs and the classifier in TT
  at rX = 3 (`compress(model, 'tt', ratio=3, layers=...)`, no statistics
  needed for time), chain against auto, batch 1 and 64.

Default threads (nothing set), `torch.no_grad()`, eval mode. Each figure is
the median over `--rounds` interleaved rounds of `measure_latency` (torch's
`blocked_autorange`); speed-ups are the dense time over the path's. The load
average is printed with each row (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import warnings

from benchmarks.common import check_output_file
from sigmadecomp_torch.demo import int_at_least


def _load():
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def _set(model, evaluation, keep):
    from sigmadecomp_torch.tt_layers import TTConv2d, TTLinear

    for m in model.modules():
        if isinstance(m, (TTConv2d, TTLinear)):
            m.evaluation = evaluation
            m.keep_kernel = keep
            m.__dict__.pop("_kernel_reuse", None)  # each setting starts without a kept kernel


def _macs(model, x):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() // 2


def _rounds(dense, tt, x, settings, rounds, min_run_time):
    """Median ms of the dense model and of ``tt`` under each ``(label, evaluation, keep)``."""
    from sigmadecomp_torch.latency import measure_latency

    times = {label: [] for label in ["dense"] + [s[0] for s in settings]}
    for _ in range(rounds):
        times["dense"].append(measure_latency(dense, x, min_run_time=min_run_time))
        for label, evaluation, keep in settings:
            _set(tt, evaluation, keep)
            times[label].append(measure_latency(tt, x, min_run_time=min_run_time))
    _set(tt, "auto", True)
    return {k: statistics.median(v) for k, v in times.items()}


LAYER_SETTINGS = (("chain", "chain", False), ("kernel, rebuilt", "kernel", False),
                  ("auto", "auto", True))
MODEL_SETTINGS = (("chain", "chain", False), ("auto", "auto", True))


def layer_rows(quick, rounds, min_run_time):
    import torch
    from torch import nn

    from sigmadecomp_torch import compress

    shapes = ([("conv 16->16 3x3 @14x14", 16, 14), ("fc 64->100", 64, None)] if quick else
              [("conv 64->64 3x3 @56x56", 64, 56), ("conv 128->128 3x3 @28x28", 128, 28),
               ("fc 512->1000", 512, None)])
    rows = []
    for label, c, hw in shapes:
        torch.manual_seed(0)
        dense = (nn.Conv2d(c, c, 3, padding=1, bias=False) if hw else
                 nn.Linear(c, 1000 if c == 512 else 100)).eval()
        tt, _ = compress(dense, "tt", ratio=3, layers=None, progress=False)
        tt.eval()
        for batch in (1, 16):
            x = torch.randn((batch, c, hw, hw) if hw else (batch, c))
            before = _load()
            med = _rounds(dense, tt, x, LAYER_SETTINGS, rounds, min_run_time)
            rows.append({"layer": label, "ranks": list(tt.ranks), "batch": batch,
                         "ms": med, "load": f"{before} -> {_load()}"})
            print(_layer_line(rows[-1]), flush=True)
    return rows


def _layer_line(r):
    m = r["ms"]
    cells = " | ".join(f"{m[s[0]]:.3f} ({m['dense'] / m[s[0]]:.2f}x)" for s in LAYER_SETTINGS)
    return f"| {r['layer']} | {tuple(r['ranks'])} | {r['batch']} | {m['dense']:.3f} | {cells} | {r['load']} |"


def model_rows(quick, rounds, min_run_time):
    import torch

    from sigmadecomp_torch import compress
    from sigmadecomp_torch.demo.reference import load_reference
    from sigmadecomp_torch.models import conv3x3_names

    model = load_reference().eval()
    names = conv3x3_names(model, skip_first=True) + ["fc"]
    if quick:
        names = names[:2]
    tt, report = compress(model, "tt", ratio=3, layers=names, progress=False)
    tt.eval()
    rows = []
    for batch in ((1,) if quick else (1, 64)):
        x = torch.randn(batch, 1, 28, 28)
        macs = {"original": _macs(model, x) / batch}
        for label, evaluation, keep in MODEL_SETTINGS:
            _set(tt, evaluation, keep)
            _macs(tt, x)  # (auto in inference: the first call builds the kernels)
            macs[label] = _macs(tt, x) / batch
        before = _load()
        med = _rounds(model, tt, x, MODEL_SETTINGS, rounds, min_run_time)
        rows.append({"batch": batch, "layers": len(report.layers),
                     "params": [report.params_before, report.params_after],
                     "macs_per_image": macs, "ms": med, "load": f"{before} -> {_load()}"})
        print(_model_line(rows[-1]), flush=True)
    return rows


def _model_line(r):
    m, a = r["ms"], r["macs_per_image"]
    return (f"| {r['batch']} | {a['original'] / 1e6:.2f} / {a['chain'] / 1e6:.2f} / "
            f"{a['auto'] / 1e6:.2f} M | {m['dense']:.3f} | {m['chain']:.3f} "
            f"({m['dense'] / m['chain']:.2f}x) | {m['auto']:.3f} ({m['dense'] / m['auto']:.2f}x) "
            f"| {r['load']} |")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.tt_evaluation",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small shapes, two TT layers of the reference net, one round (seconds)")
    p.add_argument("--rounds", type=int_at_least(1), default=None,
                   help="interleaved rounds per figure (default 5, 1 with --quick)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per measurement (default 0.2, 0.01 with --quick)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.min_run_time is not None and not args.min_run_time > 0:
        p.error(f"--min-run-time={args.min_run_time} is not allowed; it must be > 0")
    if args.json is not None:
        check_output_file(p, "--json", args.json)
    rounds = args.rounds or (1 if args.quick else 5)
    min_run_time = args.min_run_time or (0.01 if args.quick else 0.2)
    import torch

    print(f"torch {torch.__version__}, default threads ({torch.get_num_threads()}), "
          f"{rounds} interleaved round(s), load {_load()}", flush=True)
    print("\n| layer (rX=3) | ranks | batch | dense ms | chain | kernel, rebuilt | auto (kept) "
          "| load |\n|---|---|---:|---:|---:|---:|---:|---|", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (TT-SVD at rX 3 of random weights: large errors)
        layers = layer_rows(args.quick, rounds, min_run_time)
        print("\n| batch | MACs/image original / chain / auto | original ms | chain | auto | load "
              "|\n|---:|---|---:|---:|---:|---|", flush=True)
        model = model_rows(args.quick, rounds, min_run_time)
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "rounds": rounds, "layers": layers, "model": model}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
