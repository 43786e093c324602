"""Uniform per-layer rX against budget-allocated ranks at the same total size.

    python -m benchmarks.budget_vs_uniform                 # the reference network
    python -m benchmarks.budget_vs_uniform --synthetic     # layers from benchmarks.common
    python -m benchmarks.budget_vs_uniform --methods tucker2 --ratios 2 3 5 --iters 20

Layers: the 3x3 convs (all but the stem) of the reference Fashion-MNIST
network (``sigmadecomp_torch/demo/weights``) with their input covariances
collected by ``sigmadecomp_torch.collect_covariances`` on training images (the
Fashion-MNIST data must be installed); with ``--synthetic``, six 64-channel kernels with
different spectral decay (``trained_like_kernel``) paired with second moments
of real Fashion-MNIST feature-map patches (``realistic_covariance``).

For every method and ratio rX:

* ``uniform``: ``ratio_to_ranks`` on every layer; its total parameter count
  ``P`` is the budget of the other rows;
* ``budget-sum``: ``allocate_ranks(layers, P, objective='sum')``;
* ``budget-max``: ``allocate_ranks(layers, P, objective='max')`` (ALDS-style);
* ``evbmf`` (once per method): Sigma-aware EVBMF ranks, whatever their size.

Each choice is decomposed for real (Sigma-SVD, Sigma-Tucker-2 or Sigma-CP)
and the summed / largest relative Sigma-error of the actual decompositions is
reported next to the allocator's proxy; with the trained model the layers are
replaced through ``sigmadecomp_torch.compress(..., ranks=...)`` and the test
accuracy (no fine-tuning) is reported too. Prints one line per choice and a markdown table;
``--csv PATH`` also writes the rows as CSV.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import (Timer, check_output_file, positive_float, positive_int,
                               realistic_covariance, trained_like_kernel, write_csv)
from sigmadecomp import sigma_svd
from sigmadecomp.ranks import LayerSpec, allocate, evbmf_ranks, layer_params, ratio_to_ranks

from sigmadecomp_torch.demo.reference import WEIGHTS_FILE as WEIGHTS  # the packaged weights


def synthetic_layers(channels=64, n_images=128):
    """Six kernels of different spectral decay with real feature-map covariances."""
    sigmas = [realistic_covariance(channels=channels, n_images=n_images, seed=s)[0]
              for s in range(3)]
    layers = {}
    for i, decay in enumerate((0.1, 0.3, 0.5, 0.8, 1.2, 2.0)):
        K = trained_like_kernel(T=channels, S=channels, k=3, seed=10 + i, decay=decay)
        layers[f"conv{i}(decay={decay})"] = LayerSpec(K, sigmas[i % 3])
    return layers, None


def model_layers(n_calib=2000):
    """3x3 convs of the committed reference model and their input covariances."""
    import torch

    from sigmadecomp_torch.demo.reference import load_reference
    from sigmadecomp_torch import collect_covariances
    from sigmadecomp_torch.data import fashion_mnist, make_loader
    from sigmadecomp_torch.models import conv3x3_names

    model = load_reference(WEIGHTS)
    names = conv3x3_names(model)
    x, _ = fashion_mnist("train", limit=n_calib, seed=0)
    stats = collect_covariances(model, make_loader(x, batch_size=250), layers=names,
                                progress=False)
    mods = dict(model.named_modules())
    layers = {n: LayerSpec(mods[n].weight.detach().to(torch.float64).numpy(),
                           stats[n].sigma.to(torch.float64).numpy()) for n in names}
    return layers, (model, stats)


def actual_error(method, K, sigma, r, n_iter):
    """Relative Sigma-error of the real Sigma-decomposition at ranks ``r``.

    Tucker-2 and CP run ``n_iter`` ALS sweeps from their Frobenius
    initialisation (the error only decreases with more sweeps).
    """
    if method == "svd":
        return sigma_svd(K.reshape(K.shape[0], -1), r, sigma).error
    if method == "tucker2":
        from sigmadecomp.tucker2 import tucker2

        return tucker2(K, r, sigma, n_iter_max=n_iter).error
    from sigmadecomp.cp import cp

    return cp(K, r, sigma, n_iter_max=n_iter).error


def compress_and_score(model_stats, method, choice, n_iter, n_test):
    """Compress the model with ``choice``; per-layer Sigma-errors and test accuracy."""
    from sigmadecomp_torch.demo.reference import evaluate
    from sigmadecomp_torch import compress
    from sigmadecomp_torch.data import fashion_mnist

    model, stats = model_stats
    opts = {"n_iter_max": n_iter} if method in ("tucker2", "cp") else None
    small, report = compress(model, method, covariances=stats, ranks=dict(choice),
                             layers=list(choice), options=opts, progress=False)
    errs = {r["name"]: float(r["sigma_error"]) for r in report.layers}
    x, y = fashion_mnist("test", limit=n_test, seed=0)
    return [errs[n] for n in choice], evaluate(small, x, y)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", action="store_true", help="use synthetic layers")
    ap.add_argument("--methods", nargs="+", default=["tucker2", "cp", "svd"],
                    choices=["tucker2", "cp", "svd"])
    ap.add_argument("--ratios", nargs="+", type=positive_float, default=[2.0, 4.0])
    ap.add_argument("--n-test", type=positive_int, default=10000)
    ap.add_argument("--iters", type=positive_int, default=10,
                    help="ALS sweeps of the Tucker-2/CP decompositions (default 10)")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = ap.parse_args(argv)
    check_output_file(ap, "--csv", args.csv, make_folder=True)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:  # pragma: no cover
        pass

    use_model = not args.synthetic
    with Timer() as t_load:
        layers, model_stats = model_layers() if use_model else synthetic_layers()
    source = "reference model" if use_model else "synthetic (trained_like_kernel + realistic_covariance)"
    print(f"layers from {source}: " + ", ".join(
        f"{k} {tuple(v.weight.shape)}" for k, v in layers.items()) + f" ({t_load.seconds:.1f} s)")
    base_acc = None
    if model_stats is not None:
        from sigmadecomp_torch.demo.reference import evaluate
        from sigmadecomp_torch.data import fashion_mnist

        x, y = fashion_mnist("test", limit=args.n_test, seed=0)
        base_acc = evaluate(model_stats[0], x, y)
        print(f"uncompressed test accuracy: {base_acc:.4f}")

    rows = []
    cache = {}

    def evaluate_choice(method, rx, kind, choice, alloc_seconds, proxy):
        errs, acc = [], None
        t0 = time.perf_counter()
        if model_stats is not None:
            errs, acc = compress_and_score(model_stats, method, choice, args.iters, args.n_test)
        else:
            for name, spec in layers.items():
                key = (method, name, choice[name])
                if key not in cache:
                    cache[key] = actual_error(method, spec.weight, spec.sigma, choice[name],
                                              args.iters)
                errs.append(cache[key])
        dec_s = time.perf_counter() - t0
        params = sum(layer_params(s.weight.shape, method, choice[n]) for n, s in layers.items())
        dense = sum(s.weight.size for s in layers.values())
        row = dict(source="model" if use_model else "synthetic", method=method, rx=rx, kind=kind,
                   params=params, dense=dense, rx_actual=round(dense / params, 3),
                   sum_error=round(float(np.sum(errs)), 5), max_error=round(float(np.max(errs)), 5),
                   proxy_sum=None if proxy is None else round(proxy, 5),
                   alloc_seconds=round(alloc_seconds, 3), decomp_seconds=round(dec_s, 2),
                   ranks=";".join(f"{choice[n]}" for n in layers).replace(" ", ""),
                   accuracy=None if acc is None else round(acc, 4))
        rows.append(row)
        label = "-" if rx is None else f"{rx:g}"
        print(f"{method:8s} rX={label:<4s} {kind:11s} params={params:7d} (rX {dense / params:5.2f}) "
              f"sum={row['sum_error']:.4f} max={row['max_error']:.4f} "
              f"proxy={row['proxy_sum']} acc={row['accuracy']} ranks={row['ranks']}", flush=True)

    for method in args.methods:
        for rx in args.ratios:
            uniform = {n: ratio_to_ranks(s.weight.shape, method, rx) for n, s in layers.items()}
            budget = sum(layer_params(s.weight.shape, method, uniform[n]) for n, s in layers.items())
            with Timer() as ta:
                a_sum = allocate(layers, budget, method=method, objective="sum")
            with Timer() as tm:
                a_max = allocate(layers, budget, method=method, objective="max")
            curves = a_sum.curves
            try:
                proxy_u = float(sum(curves[n].errors[curves[n].ranks.index(uniform[n])]
                                    for n in layers))
            except ValueError:  # a uniform choice outside the allocator's candidates
                proxy_u = None
            evaluate_choice(method, rx, "uniform", uniform, 0.0, proxy_u)
            evaluate_choice(method, rx, "budget-sum", a_sum.ranks, ta.seconds, a_sum.sum_error)
            evaluate_choice(method, rx, "budget-max", a_max.ranks, tm.seconds, a_max.sum_error)
        with Timer() as te:
            ev = {n: evbmf_ranks(s.weight, method, s.sigma) for n, s in layers.items()}
        evaluate_choice(method, None, "evbmf", ev, te.seconds, None)

    print(markdown_table(rows, base_acc))
    if args.csv:
        write_csv(args.csv, rows, list(rows[0].keys()))
        print(f"wrote {args.csv}")
    return rows


def markdown_table(rows, base_acc=None):
    """The rows as a markdown table (summed / largest actual Sigma-error, proxy, accuracy)."""
    acc = any(r["accuracy"] is not None for r in rows)
    head = ["method", "rX target", "ranks chosen by", "params", "rX", "sum Sigma-err",
            "max Sigma-err", "proxy sum"] + (["test acc."] if acc else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], "-" if r["rx"] is None else f"{r['rx']:g}", r["kind"],
                 str(r["params"]), f"{r['rx_actual']:.2f}", f"{r['sum_error']:.4f}",
                 f"{r['max_error']:.4f}", "-" if r["proxy_sum"] is None else f"{r['proxy_sum']:.4f}"]
        if acc:
            cells.append(f"{r['accuracy']:.4f}")
        out.append("| " + " | ".join(cells) + " |")
    if base_acc is not None:
        out.append(f"\nuncompressed test accuracy: {base_acc:.4f}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
