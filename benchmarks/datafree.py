"""Data-free Sigma on the reference network: BatchNorm model against the alternatives.

Compresses the 3x3 convs of the demo's reference network (all but the stem)
with Tucker-2 and CP at several per-layer ratios rX and reports the test
accuracy without fine-tuning for the statistics

* ``frobenius``      no statistics (the classical algorithm);
* ``synthetic``      Sigma from 2048 synthetic smooth images (the demo's
  current data-free row);
* ``bn-indep``       :func:`covariances_from_batchnorm`, channels and positions
  independent, no shrinkage (the naive model);
* ``bn-kernel``      correlations from the producing layer's kernel, no
  shrinkage;
* ``bn-indep-fit``, ``bn-kernel-fit``   the same with the shrinkage fitted to
  each layer's output BatchNorm (the default of the function);
* ``bn-kernel-half``  kernel model, fixed shrinkage 0.5;
* ``real``           Sigma from 2048 Fashion-MNIST training images;
* ``synthetic-mix``  the synthetic-image Sigma mixed per layer with the
  BatchNorm statistics by :func:`shrink_covariances`' moments rule (the CP
  recipe of ``notes/datafree.md``); ``synthetic-mix-match`` the same with
  ``match=True``, ``bn-prop-fit-match`` the default BatchNorm statistics
  matched to the BatchNorm output energies (``notes/transfer.md``);
* ``synthetic-seq``  error-compensating sequential compression
  (``compress(..., data=, sequential=True)``) fed with the 2048 synthetic
  smooth images: data-free as well, no image of any dataset is used.

Every Sigma variant is run with the centered covariance and bias correction
(``centered=True``, as the demo's data-free row) unless ``--uncentered``.

Run ``python -m benchmarks.datafree`` (all 10,000 test images, rX 2 3 4 6,
10 ALS sweeps) or ``--quick`` (2000 test images, rX 3 and 6, 5 sweeps, Tucker-2,
the variants ``frobenius``, ``bn-prop-fit`` and ``real``).
A full run writes ``notes/datafree.json`` and ``notes/datafree.png`` (``--out``
sets another prefix); ``--quick`` writes only where ``--out`` says.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np
import torch

from benchmarks.common import NOTES_DIR, check_output_file, positive_int

VARIANTS = {
    # name: None (Frobenius) | "synthetic" | "real" | dict of covariances_from_batchnorm options
    "frobenius": None,
    "bn-prop-fit": dict(spatial="propagate", shrinkage="bn"),   # the default
    "synthetic": "synthetic",
    "real": "real",
    "synthetic-seq": "synthetic-seq",
    # synthetic-image Sigma mixed per layer with the BatchNorm statistics (propagate,
    # no shrinkage of their own) by shrink_covariances' moments rule: the transfer
    # recipe with synthetic images as the other dataset
    "synthetic-mix": "synthetic-mix",
    # the same, then each layer's statistics matched to its BatchNorm's output energies
    # (shrink_covariances(..., match=True)); and the default BatchNorm statistics matched
    "synthetic-mix-match": "synthetic-mix-match",
    "bn-prop-fit-match": dict(spatial="propagate", shrinkage="bn", match=True),
    "bn-indep": dict(spatial="independent", shrinkage=0.0),
    "bn-kernel-fit": dict(spatial="kernel", shrinkage="bn"),
    "bn-prop": dict(spatial="propagate", shrinkage=0.0),
    "bn-kernel": dict(spatial="kernel", shrinkage=0.0),
    "bn-indep-fit": dict(spatial="independent", shrinkage="bn"),
    "bn-kernel-half": dict(spatial="kernel", shrinkage=0.5),
    "bn-indep-gain": dict(spatial="independent", shrinkage="bn-gain"),
    "bn-kernel-gain": dict(spatial="kernel", shrinkage="bn-gain"),
}
DEFAULT_VARIANTS = ("frobenius", "bn-prop-fit", "synthetic", "real", "bn-indep",
                    "bn-kernel-fit", "bn-prop", "bn-kernel")


def statistics(model, names, variants, n_images, seed):
    """The statistics of every variant (None for Frobenius) and their cost in seconds."""
    from sigmadecomp_torch import (collect_covariances, covariances_from_batchnorm,
                                   shrink_covariances)
    from sigmadecomp_torch.data import fashion_mnist, make_loader, synthetic_images

    out, seconds, reports = {}, {}, {}
    for v in variants:
        spec = VARIANTS[v]
        t0 = time.perf_counter()
        if spec is None:
            out[v] = None
        elif spec == "synthetic-seq":  # no statistics ahead: compress collects them as it goes
            out[v] = make_loader(synthetic_images(n_images, seed=seed), batch_size=256)
        elif spec in ("synthetic", "real", "synthetic-mix", "synthetic-mix-match"):
            x = (fashion_mnist("train", limit=n_images, seed=seed)[0] if spec == "real"
                 else synthetic_images(n_images, seed=seed))
            out[v] = collect_covariances(model, make_loader(x, batch_size=256), layers=names,
                                         progress=False)
            if spec.startswith("synthetic-mix"):
                prior, _ = covariances_from_batchnorm(model, layers=names,
                                                      input_shape=(1, 28, 28), shrinkage=0.0)
                out[v] = shrink_covariances(out[v], "auto", model=model, prior=prior,
                                            match=spec.endswith("-match"))
        else:
            spec = dict(spec)
            match = spec.pop("match", False)
            out[v], rep = covariances_from_batchnorm(model, layers=names, input_shape=(1, 28, 28),
                                                     **spec)
            if match:  # no further shrinkage (a = 0): the match alone
                out[v] = shrink_covariances(out[v], "auto", model=model, alphas=(0.0,),
                                            match=True)
            reports[v] = {k: {"shrinkage": i["shrinkage"], "gain": i["gain"], "fitted": i["fitted"],
                              "fit_spread": i["fit_spread"], "spatial": i["spatial"]}
                          for k, i in rep.modelled.items()}
            reports[v]["skipped"] = rep.skipped
        seconds[v] = time.perf_counter() - t0
    return out, seconds, reports


def run(*, quick=False, rx=None, methods=("tucker2", "cp"), variants=None, centered=True,
        threads=1, seed=0, log=print, on_row=None):
    """Compress and evaluate every (variant, method, rX); ``on_row(result)`` after each."""
    from sigmadecomp.exceptions import CompressionWarning, ConvergenceWarning
    from sigmadecomp_torch import compress
    from sigmadecomp_torch.data import fashion_mnist
    from sigmadecomp_torch.demo.reference import evaluate, load_reference
    from sigmadecomp_torch.models import conv3x3_names

    if threads:
        torch.set_num_threads(int(threads))
    rx = tuple(rx) if rx else ((3, 6) if quick else (2, 3, 4, 6))
    variants = tuple(variants) if variants else DEFAULT_VARIANTS
    n_test = 2000 if quick else 10000
    options = {"n_iter_max": 5 if quick else 10, "rng": seed}
    model = load_reference()
    names = conv3x3_names(model, skip_first=True)
    x_test, y_test = fashion_mnist("test", limit=None if n_test >= 10000 else n_test, seed=seed)
    base = evaluate(model, x_test, y_test, batch_size=250)
    log(f"reference accuracy {100 * base:.2f}% on {len(x_test)} test images; layers {names}")
    stat_seconds, reports = {}, {}
    rows = []
    result = {
        "reference_accuracy": base, "test_images": len(x_test), "layers": names,
        "centered": bool(centered), "options": {k: v for k, v in options.items()},
        "rx": list(rx), "methods": list(methods), "variants": list(variants), "rows": rows,
        "statistics_seconds": stat_seconds, "bn_reports": reports,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.machine()},
    }
    # one variant at a time over all settings: an interrupted run keeps whole rows
    for v in variants:
        st, sec, rep = statistics(model, names, (v,), 2048, seed)
        cov = st[v]
        stat_seconds.update(sec)
        reports.update(rep)
        log(f"statistics {v}: {sec[v]:.1f} s")
        for method in methods:
            for r in rx:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    warnings.simplefilter("ignore", CompressionWarning)
                    if VARIANTS[v] == "synthetic-seq":
                        cm, rep = compress(model, method, data=cov, sequential=True, ratio=r,
                                           layers=names, centered=bool(centered),
                                           options=options, progress=False)
                    else:
                        cm, rep = compress(model, method, covariances=cov, ratio=r, layers=names,
                                           centered=bool(centered and cov is not None),
                                           options=options, progress=False)
                sec = time.perf_counter() - t0
                with torch.inference_mode():
                    acc = evaluate(cm, x_test, y_test, batch_size=250)
                rows.append({"method": method, "rx": r, "variant": v, "accuracy": acc,
                             "seconds": sec, "load": os.getloadavg()[0]})
                log(f"{method:8s} rX={r:<3g} {v:15s} {100 * acc:6.2f}%  ({sec:.1f} s)")
                if on_row is not None:
                    on_row(result)
    return result


def spreads(seed=0, n_images=2048):
    """How well each Sigma explains the running variances of the layer's output BatchNorm.

    For each compressed layer and statistic, the spread (standard deviation over
    output channels) of ``log(k_c^T C k_c / running_var_c)`` with ``C`` the
    centered covariance: ~0 means the statistic predicts the layer's output
    variances up to one global scale (the measurement the shrinkage rule uses).
    """
    from sigmadecomp_torch.demo.reference import load_reference
    from sigmadecomp_torch.models import conv3x3_names

    model = load_reference()
    names = conv3x3_names(model, skip_first=True)
    mods = dict(model.named_modules())
    keys = ("real", "synthetic", "bn-indep", "bn-kernel", "bn-prop", "frobenius")
    stats = {k: statistics(model, names, (k,), n_images, seed)[0][k] for k in keys}
    out = {}
    for n in names:
        K = mods[n].weight.detach().double().reshape(mods[n].weight.shape[0], -1)
        v = mods[n.replace("conv", "bn")].running_var.double()
        row = {}
        for k in keys:
            if stats[k] is None:  # Frobenius: C proportional to I
                q = (K * K).sum(1)
            else:
                C = stats[k][n].centered()
                q = torch.einsum("ti,ij,tj->t", K, C, K)
            row[k] = float(torch.log(q / v).std(unbiased=False))
        out[n] = row
    return out


def correlations(seed=0, n_images=1024):
    """Correlation structure of each statistic against Sigma from real images, per layer.

    ``chan``: mean |correlation| between channels at the centre pixel (centered
    covariance); ``agree``: correlation coefficient between those off-diagonal
    entries and the real ones; ``nbr``: mean correlation of a channel with
    itself one pixel to the right; ``var``: correlation coefficient of the
    log channel variances with the real ones; ``mean``: the same for the
    channel means (centre pixel).
    """
    from sigmadecomp_torch.demo.reference import load_reference
    from sigmadecomp_torch.models import conv3x3_names

    model = load_reference()
    names = conv3x3_names(model, skip_first=True)
    keys = ("real", "bn-kernel", "bn-prop", "synthetic")
    stats = {k: statistics(model, names, (k,), n_images, seed)[0][k] for k in keys}
    out = {}
    for n in names:
        row = {}
        ref_off = ref_var = ref_mean = None
        for k in keys:
            mean = stats[k][n].mean.reshape(-1, 9)[:, 4]
            C = stats[k][n].centered()
            S = C.shape[0] // 9
            C = C.reshape(S, 9, S, 9)
            c = C[:, 4, :, 4]
            d = c.diagonal().clamp_min(1e-30).sqrt()
            corr = c / d[:, None] / d[None, :]
            off = corr[~torch.eye(S, dtype=torch.bool)]
            if ref_off is None:
                ref_off, ref_var, ref_mean = off, d.log(), mean
            i = torch.arange(S)
            row[k] = {"chan": float(off.abs().mean()),
                      "agree": float(np.corrcoef(off.numpy(), ref_off.numpy())[0, 1]),
                      "nbr": float((C[i, 4, i, 5] / C[i, 4, i, 4]).mean()),
                      "var": float(np.corrcoef(d.log().numpy(), ref_var.numpy())[0, 1]),
                      "mean": float(np.corrcoef(mean.numpy(), ref_mean.numpy())[0, 1])}
        out[n] = row
    return out


def table(res):
    """Markdown table: one row per (method, variant), one column per rX."""
    acc = {(r["method"], r["variant"], r["rx"]): r["accuracy"] for r in res["rows"]}
    head = "| method | statistics | " + " | ".join(f"rX={r:g}" for r in res["rx"]) + " |"
    lines = [head, "|" + "---|" * (2 + len(res["rx"]))]
    for m in res["methods"]:
        for v in res["variants"]:
            cells = [f"{100 * acc[(m, v, r)]:.2f}" if (m, v, r) in acc else "-" for r in res["rx"]]
            lines.append(f"| {m} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["methods"]), figsize=(5.5 * len(res["methods"]), 4.2),
                             squeeze=False)
    style = {"frobenius": ("k", "o", "-"), "synthetic": ("tab:gray", "s", "--"),
             "real": ("tab:green", "^", "-"), "bn-prop-fit": ("tab:red", "D", "-"),
             "bn-prop": ("tab:pink", ".", ":"), "bn-indep": ("tab:orange", ".", ":"),
             "bn-kernel": ("tab:blue", ".", ":"), "bn-kernel-fit": ("tab:purple", ".", ":")}
    for ax, m in zip(axes[0], res["methods"]):
        for v in res["variants"]:
            pts = sorted((r["rx"], 100 * r["accuracy"]) for r in res["rows"]
                         if r["method"] == m and r["variant"] == v)
            if not pts:
                continue
            c, mk, ls = style.get(v, (None, ".", ":"))
            ax.plot(*zip(*pts), color=c, marker=mk, linestyle=ls, label=v,
                    linewidth=2 if v == "bn-prop-fit" else 1)
        ax.axhline(100 * res["reference_accuracy"], color="k", linewidth=0.5)
        ax.set_title(f"{m}, no fine-tuning ({res['test_images']} test images)")
        ax.set_xlabel("per-layer compression ratio rX")
        ax.set_ylabel("test accuracy (%)")
        lo = min(100 * r["accuracy"] for r in res["rows"] if r["method"] == m)
        ax.set_ylim(max(lo - 1, 0), 100 * res["reference_accuracy"] + 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: the variants of a --quick run: the Frobenius and real-data ends and the default
QUICK_VARIANTS = ("frobenius", "bn-prop-fit", "real")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2000 test images, rX 3 and 6, 5 sweeps; Tucker-2 and the variants "
                        + ", ".join(QUICK_VARIANTS) + " unless given")
    p.add_argument("--rx", type=float, nargs="+")
    p.add_argument("--methods", nargs="+", default=None, choices=["tucker2", "cp"],
                   help="default: tucker2 and cp (tucker2 with --quick)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    p.add_argument("--uncentered", action="store_true",
                   help="plain Sigma instead of centered Sigma + bias correction")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--correlations", action="store_true",
                   help="only print the correlation structure of each statistic against "
                        "the real one")
    p.add_argument("--spreads", action="store_true",
                   help="only print how well each statistic explains the output BatchNorm "
                        "variances (spread of log ratios per layer)")
    p.add_argument("--seed", type=int, default=0,
                   help="synthetic images, calibration subset and ALS start (default 0)")
    p.add_argument("--out", default=None,
                   help="prefix of the .json and .png written (default notes/datafree for a "
                        "full run; nothing is written with --quick unless given)")
    a = p.parse_args(argv)
    a.methods = a.methods or (["tucker2"] if a.quick else ["tucker2", "cp"])
    if a.quick and a.variants is None:
        a.variants = list(QUICK_VARIANTS)
    if a.rx is not None and min(a.rx) <= 0:
        p.error(f"--rx {min(a.rx):g}: expected positive compression ratios")
    if a.out is not None:
        check_output_file(p, "--out", a.out + ".json")
    elif not a.quick:
        a.out = os.path.join(NOTES_DIR, "datafree")
    if a.correlations:
        torch.set_num_threads(a.threads)
        res = correlations()
        keys = list(next(iter(res.values())))
        print("| layer | " + " | ".join(f"{k} chan / agree / nbr / var / mean" for k in keys)
              + " |")
        print("|" + "---|" * (1 + len(keys)))
        for n, row in res.items():
            print(f"| {n} | " + " | ".join(
                f"{row[k]['chan']:.2f} / {row[k]['agree']:.2f} / {row[k]['nbr']:.2f} / "
                f"{row[k]['var']:.2f} / {row[k]['mean']:.2f}"
                for k in keys) + " |")
        return
    if a.spreads:
        torch.set_num_threads(a.threads)
        res = spreads()
        cols = list(next(iter(res.values())))
        print("| layer | " + " | ".join(cols) + " |")
        print("|" + "---|" * (1 + len(cols)))
        for n, row in res.items():
            print(f"| {n} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
        return

    def save(res):
        if a.out is None:
            return
        with open(a.out + ".json", "w") as f:
            json.dump(res, f, indent=1)

    res = run(quick=a.quick, rx=a.rx, methods=a.methods, variants=a.variants,
              centered=not a.uncentered, threads=a.threads, seed=a.seed, on_row=save)
    print(table(res))
    if a.out is not None:
        save(res)
        plot(res, a.out + ".png")
        print(f"wrote {a.out}.json, {a.out}.png")
    return res


if __name__ == "__main__":
    main()
