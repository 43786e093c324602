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

    python -m benchmarks.collect_cost [--images 1024] [--repeats 5] [--threads default,1]

The table is printed per thread setting: torch's default threads first, then
pinned to one (``--threads``).

``--model resnet18`` measures the ImageNet-scale case instead: torchvision's
ResNet-18 layout (:func:`sigmadecomp_torch.resnet.resnet18`, random weights),
``--images 64`` random 224x224 images in batches of 16. Each configuration runs
in a fresh process (so that its peak RSS is its own): the forward pass over
the same batches (median of ``--repeats``), then one collection; the figure is
the ratio. Configurations: exact (float64 products), ``gram_dtype=float32``,
``position_fraction=0.25``, and ``dtype=float32`` results; first at torch's
default threads, then pinned to one. The rounding of the float32 products is
measured against the exact statistics on ``--error-images`` images (relative
max-entry error and the most negative eigenvalue relative to the largest).
``--quick`` runs a tiny version in seconds, in-process (for the test suite)::

    python -m benchmarks.collect_cost --model resnet18 [--images 64] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from torch import nn

from benchmarks.common import calibration_images, peak_rss_mib, positive_int, threads_setting
from sigmadecomp_torch import collect_covariances
from sigmadecomp_torch import covariance as cov_module
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


def _full_gram(xx, X):
    xx += X.transpose(-1, -2) @ X


_CONFIGS = {
    "exact": {},
    "gram_dtype=float32": {"gram_dtype": torch.float32},
    "position_fraction=0.25": {"position_fraction": 0.25},
    "dtype=float32": {"dtype": torch.float32},
}


def _quick_layers(name, module):
    """--quick: the stem and the first block only (their statistics are small)."""
    return name == "conv1" or name.startswith("layer1.0.")


def _resnet_batches(images, size, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(images, 3, size, size, generator=g)
    return list(x.split(batch))


def _resnet_run(config, threads, images, size, batch, repeats, out=None, layers=None):
    """Forward time, collection time, peak RSS and bytes of one configuration."""
    from sigmadecomp_torch.resnet import resnet18

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = resnet18().eval()
    batches = _resnet_batches(images, size, batch)
    fwd = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                model(b)
        fwd.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    stats = collect_covariances(model, batches, progress=False, layers=layers,
                                **_CONFIGS[config])
    t = time.perf_counter() - t0
    nbytes = sum(s.sigma.element_size() * s.sigma.numel() for s in stats.values())
    res = {"forward": statistics.median(fwd), "collect": t, "rss": peak_rss_mib(),
           "stats_mib": nbytes / 2**20, "threads": torch.get_num_threads()}
    if out is not None:
        out.put(res)
    return res


def _isolated(config, threads, images, size, batch, repeats):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_resnet_run, args=(config, threads, images, size, batch, repeats, q))
    p.start()
    res = q.get()
    p.join()
    return res


def _float32_error(images, size, batch, layers=None):
    """Per layer: max |S32 - S64| / max |S64|, lambda_min / lambda_max of S64 and S32,
    and ||S_f - S64||_F / ||S64||_F of position_fraction=0.25."""
    from sigmadecomp_torch.resnet import resnet18

    torch.manual_seed(0)
    model = resnet18().eval()
    batches = _resnet_batches(images, size, batch)
    exact = collect_covariances(model, batches, progress=False, layers=layers)
    approx = collect_covariances(model, batches, progress=False, gram_dtype=torch.float32,
                                 layers=layers)
    sub = collect_covariances(model, batches, progress=False, position_fraction=0.25,
                              layers=layers)
    rows = []
    for k, s in exact.items():
        a = approx[k].sigma
        err = float((a - s.sigma).abs().max() / s.sigma.abs().max())
        ev64 = torch.linalg.eigvalsh(s.sigma) if s.n <= 2304 else None
        ev32 = torch.linalg.eigvalsh(a) if s.n <= 2304 else None
        frac = float((sub[k].sigma - s.sigma).norm() / s.sigma.norm())
        rows.append((k, s.n, s.count, err,
                     None if ev64 is None else float(ev64[0] / ev64[-1]),
                     None if ev32 is None else float(ev32[0] / ev32[-1]), frac))
    return rows


def main_resnet(args):
    quick = args.quick
    images = 2 if quick else args.images
    size = 32 if quick else args.size
    batch = 1 if quick else args.resnet_batch
    repeats = 1 if quick else args.repeats
    layers = _quick_layers if quick else None
    plan = []
    for part in filter(None, args.configs.split(",")):
        c, _, th = part.partition("@")
        if c not in _CONFIGS or th not in ("default", "1"):
            raise SystemExit(f"--configs: {part!r} is not <config>@default or <config>@1 "
                             f"with config in {list(_CONFIGS)}")
        plan.append((c, None if th == "default" else 1))
    runs = []
    for c, threads in plan:
        if quick:
            res = _resnet_run(c, threads, images, size, batch, repeats, layers=layers)
        else:
            res = _isolated(c, threads, images, size, batch, repeats)
        runs.append((c, "default" if threads is None else "1", res))
        print(f"  {c}, threads {runs[-1][1]} ({res['threads']}): collect "
              f"{res['collect']:.1f} s, forward {res['forward']:.2f} s", flush=True)
    print(f"# collect_covariances at scale: ResNet-18 (torchvision layout, random weights), "
          f"{images} random images {size}x{size}, batches of {batch}")
    print(f"torch {torch.__version__}; each row a fresh process"
          + (" (quick: in-process, RSS not isolated)" if quick else "") + "; forward = median "
          f"of {repeats} passes over the same batches in that process")
    print()
    print("| configuration | threads | forward s | collect s | x forward | peak RSS MiB | "
          "statistics MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for c, th, r in runs:
        print(f"| {c} | {th} | {r['forward']:.2f} | {r['collect']:.1f} | "
              f"{r['collect'] / r['forward']:.1f} | {r['rss']:.0f} | {r['stats_mib']:.0f} |")
    err_images = 2 if quick else args.error_images
    rows = _float32_error(err_images, size, batch, layers)
    print()
    print(f"Estimates against the exact statistics ({err_images} images): float32 products, "
          "max|S32 - S64| / max|S64| and lambda_min/lambda_max of S64 and S32 (layers with "
          "n <= 2304); position_fraction=0.25, ||S - S64||_F / ||S64||_F")
    print()
    print("| layer | n | count | float32: rel. max error | lmin/lmax float64 | "
          "lmin/lmax float32 | fraction 0.25: rel. F error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, n, cnt, err, e64, e32, frac in rows:
        f = (lambda v: "-" if v is None else f"{v:.1e}")
        print(f"| {k} | {n} | {cnt} | {err:.1e} | {f(e64)} | {f(e32)} | {frac:.4f} |")
    return runs, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=positive_int, default=1024)
    ap.add_argument("--batch", type=positive_int, default=256)
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--threads", type=_thread_settings, default="default,1",
                    help="small: comma-separated torch thread settings timed in this order, "
                         "'default' (torch's own choice) or a count (default 'default,1': "
                         "the default first, then pinned to one thread, steadier on a shared "
                         "machine)")
    ap.add_argument("--width", type=positive_int, default=32)
    ap.add_argument("--fractions", type=_fractions, default="0.25,0.1",
                    help="comma-separated position_fraction values to time, each in (0, 1]")
    ap.add_argument("--model", choices=["small", "resnet18"], default="small")
    ap.add_argument("--size", type=positive_int, default=224, help="resnet18: image size")
    ap.add_argument("--resnet-batch", type=positive_int, default=16, help="resnet18: batch size")
    ap.add_argument("--error-images", type=positive_int, default=16,
                    help="resnet18: images for the float32-product error table")
    ap.add_argument("--configs", default="exact@default,dtype=float32@default,exact@1,"
                    "gram_dtype=float32@1,position_fraction=0.25@1",
                    help="resnet18: comma-separated <config>@<threads> (default or 1), "
                    "config in " + ", ".join(_CONFIGS))
    ap.add_argument("--quick", action="store_true",
                    help="a tiny run of seconds (for the test suite): resnet18 at 32x32; the "
                         "small model on 64 images, 2 repeats")
    args = ap.parse_args(argv)
    if args.model == "resnet18":
        if args.images == 1024:
            args.images = 64
        if args.repeats == 5:
            args.repeats = 3
        return main_resnet(args)
    if args.quick:
        args.images, args.batch, args.repeats = min(args.images, 64), min(args.batch, 32), 2
    default_threads = torch.get_num_threads()
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

    fractions = args.fractions

    def collect_fraction(f):
        return lambda: collect_covariances(model, batches, position_fraction=f, progress=False)

    def collect_full_gemm():
        with mock.patch.object(cov_module, "add_gram", _full_gram):
            collect_covariances(model, batches, progress=False)

    runs = {"forward": forward, "collect (all)": collect_all, "collect (3x3)": collect_3x3,
            "collect (full GEMM)": collect_full_gemm}
    for f in fractions:
        runs[f"collect (all, position_fraction={f:g})"] = collect_fraction(f)
    print(f"# collect_covariances cost: ResNetSmall(width={args.width}), {args.images} "
          f"{source} images, batch {args.batch}, median of {args.repeats}")
    print(f"torch {torch.__version__}")
    results = []
    try:
        for setting in args.threads:  # the default first (as given), then the pinned ones
            torch.set_num_threads(default_threads if setting == "default" else setting)
            forward()  # warm-up
            collect_3x3()
            times = {k: [] for k in runs}
            for _ in range(args.repeats):
                for k, f in runs.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            results.append((setting, times, med))
            print()
            label = (f"default ({default_threads})" if setting == "default" else str(setting))
            print(f"threads: {label}")
            print()
            print("| run | median s | x forward | runs (s) |")
            print("|---|---:|---:|---|")
            for k, v in times.items():
                print(f"| {k} | {med[k]:.3f} | {med[k] / med['forward']:.2f} | "
                      + ", ".join(f"{t:.2f}" for t in v) + " |")
    finally:
        torch.set_num_threads(default_threads)

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
    print()
    print(f"multiply-adds per image: forward {fwd_total / 1e6:.2f} M; Gram n^2*L over all "
          f"layers {gram_all / 1e6:.2f} M ({gram_all / fwd_total:.2f}x), over the 3x3 convs "
          f"{gram_3x3 / 1e6:.2f} M; the upper-block Gram does about half of that")
    for f, dev in devs.items():
        print(f"position_fraction={f:g}: ||Sigma~ - Sigma||_F / ||Sigma||_F over the 3x3 "
              f"convs from {dev[0]:.4f} to {dev[-1]:.4f} (median {statistics.median(dev):.4f})")
    return results


def _thread_settings(text):
    """argparse type: comma-separated 'default' or positive thread counts."""
    out = [threads_setting(t.strip()) for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected e.g. 'default,1'")
    return out


def _fractions(text):
    """argparse type: comma-separated position fractions in (0, 1]."""
    out = []
    for t in filter(None, (t.strip() for t in text.split(","))):
        try:
            f = float(t)
        except ValueError:
            f = float("nan")
        if not 0 < f <= 1:
            raise argparse.ArgumentTypeError(
                f"invalid value {t!r}: expected position fractions in (0, 1]")
        out.append(f)
    return out


if __name__ == "__main__":
    main()
