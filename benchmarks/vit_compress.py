"""Accuracy vs rX of the reference ViT compressed by SVD, Sigma-SVD and centered Sigma-SVD.

    python -m benchmarks.vit_compress                  # full run, writes notes/vit.md + PNG
    python -m benchmarks.vit_compress --quick --out-dir OUT   # seconds (default: a temp folder)

Model: the committed :class:`sigmadecomp_torch.vit.ViT` (``load_vit``).
Layers: every Linear of attention (``q``/``k``/``v``/``out``) and of the MLP
(``fc1``/``fc2``) in every block, i.e. ``default_layers(model)`` (the patch
embedding reads the input and the classifier is the output; both are left
alone). Statistics: ``collect_covariances`` on training images (fed as dict
batches ``{'pixel_values': x}`` through a ``pixel_values=`` wrapper, as a
Hugging Face model would be). For every rX the layers are replaced by

* ``uniform``: ``compress(..., ratio=rX)``, every layer at rX;
* ``budget``: ``compress(..., budget=1/rX)``, the same total size distributed
  over the layers by ``sigmadecomp.ranks.allocate_ranks``;

each with the Frobenius SVD (``covariances=None``), Sigma-SVD and Sigma-SVD
centered (``centered=True``); the test accuracy is measured without
fine-tuning. The same is then tried on :class:`sigmadecomp_torch.vit.TorchViT`
(the same weights in ``nn.TransformerEncoderLayer`` blocks) to list which of
its layers ``compress`` can reach.

``--recipes`` instead runs the recipes of ``notes/sequential.md`` on the ViT
(Sigma-SVD centered, budget ranks, ``data=`` the calibration batches): one-shot
and sequential (``sequential=True``), each without and with ``refit='all'``
(the classifier head refitted to the original logits on the compressed
model's inputs), and writes ``vit_recipes.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import torch
from torch import nn

from benchmarks.common import check_input_file, check_output_dir, positive_int
from sigmadecomp_torch import collect_covariances, compress, default_layers
from sigmadecomp_torch.data import fashion_mnist
from sigmadecomp_torch.demo.reference import evaluate
from sigmadecomp_torch.vit import VIT_WEIGHTS_FILE, TorchViT, load_vit

NOTES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notes")
RX_FULL = (1.5, 2, 3, 4, 6, 8, 12)
RX_QUICK = (2, 6)
METHODS = (("SVD (Frobenius)", dict()),
           ("Sigma-SVD", dict(sigma=True)),
           ("Sigma-SVD centered", dict(sigma=True, centered=True)))


class PixelValues(nn.Module):
    """Wraps an image model to take ``pixel_values=`` as a Hugging Face model does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values)


def compress_grid(model, stats, x_test, y_test, rxs, log=print):
    """Rows ``{alloc, method, rx, accuracy, params_after, ...}`` for every combination."""
    layers = default_layers(model)
    rows = []
    for rx in rxs:
        for alloc in ("uniform", "budget"):
            for label, kw in METHODS:
                size = dict(ratio=rx) if alloc == "uniform" else dict(budget=1.0 / rx)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # per-layer Sigma-error warnings
                    small, report = compress(
                        model, "svd", covariances=stats if kw.get("sigma") else None,
                        centered=kw.get("centered", False), layers=layers, progress=False, **size)
                seconds = time.perf_counter() - t0
                # over every chosen layer: those a budget keeps dense (ranks that would
                # not shrink them) count at their own size
                dense = [model.get_submodule(x["name"]) for x in report.skipped
                         if x["name"] in layers]
                kept = sum(p.numel() for m in dense for p in m.parameters())
                before = sum(r["params_before"] for r in report.layers) + kept
                after = sum(r["params_after"] for r in report.layers) + kept
                row = {"alloc": alloc, "method": label, "rx": rx,
                       "accuracy": evaluate(small, x_test, y_test),
                       "params_before": before, "params_after": after,
                       "achieved_rx": round(before / after, 3),
                       "ranks": {r["name"]: r["ranks"] for r in report.layers},
                       "seconds": round(seconds, 2)}
                rows.append(row)
                log(f"rX={rx:<4} {alloc:<8} {label:<20} acc {row['accuracy']:.4f} "
                    f"(achieved rX {row['achieved_rx']})")
    return rows


RECIPES = (("one-shot", dict()), ("one-shot + refit", dict(refit="all")),
           ("sequential", dict(sequential=True)),
           ("sequential + refit", dict(sequential=True, refit="all")))


def recipes_grid(model, calib, x_test, y_test, rxs, log=print):
    """Rows ``{recipe, rx, accuracy, seconds, refitted}``: Sigma-SVD centered, budget ranks."""
    layers = default_layers(model)
    rows = []
    for rx in rxs:
        for label, kw in RECIPES:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # per-layer Sigma-error warnings
                small, report = compress(model, "svd", data=calib, budget=1.0 / rx,
                                         centered=True, layers=layers, progress=False, **kw)
            row = {"recipe": label, "rx": rx, "accuracy": evaluate(small, x_test, y_test),
                   "seconds": round(time.perf_counter() - t0, 2),
                   "refitted": [r["name"] for r in report.refitted]}
            rows.append(row)
            log(f"rX={rx:<4} {label:<20} acc {row['accuracy']:.4f} ({row['seconds']} s)")
    return rows


def torch_variant(model, stats_images):
    """What ``compress`` does on the same network in ``nn.TransformerEncoderLayer`` blocks."""
    twin = TorchViT.from_vit(model).eval()
    with torch.no_grad():
        diff = float((twin(stats_images) - model(stats_images)).abs().max())
    out = {"max_abs_logit_difference": diff}
    linears = [n for n, m in twin.named_modules() if isinstance(m, nn.Linear)]
    out["linear_modules"] = linears
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = compress(twin, "svd", ratio=2, layers=lambda n, m: True, progress=False)
    out["compressed"] = [r["name"] for r in report.layers]
    out["skipped"] = {s["name"]: s["reason"] for s in report.skipped}
    return out


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"SVD (Frobenius)": "tab:gray", "Sigma-SVD": "tab:blue",
              "Sigma-SVD centered": "tab:orange"}
    for alloc, style in (("uniform", "--"), ("budget", "-")):
        for label, _ in METHODS:
            pts = [(r["rx"], 100 * r["accuracy"]) for r in rows
                   if r["alloc"] == alloc and r["method"] == label]
            ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[label],
                    label=f"{label}, {alloc}")
    ax.set_xscale("log")
    rxs = sorted({r["rx"] for r in rows})
    ax.set_xticks(rxs)
    ax.set_xticklabels([str(x) for x in rxs])
    ax.set_xlabel("rX (compression ratio of the block Linears)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows, reference):
    rxs = sorted({r["rx"] for r in rows})
    lines = ["| allocation | method | " + " | ".join(f"rX={x}" for x in rxs) + " |",
             "|---|---|" + "---|" * len(rxs)]
    for alloc in ("uniform", "budget"):
        for label, _ in METHODS:
            acc = {r["rx"]: r["accuracy"] for r in rows
                   if r["alloc"] == alloc and r["method"] == label}
            lines.append(f"| {alloc} | {label} | "
                         + " | ".join(f"{100 * acc[x]:.2f}" for x in rxs) + " |")
    lines.append(f"\nOriginal model: {100 * reference:.2f}%.")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a few hundred images and two rX (seconds), for the tests")
    p.add_argument("--calib", type=positive_int, default=None,
                   help="calibration images (default 2000)")
    p.add_argument("--test", type=positive_int, default=None,
                   help="test images (default all 10000)")
    p.add_argument("--out-dir", default=None,
                   help="where to write vit.json/.png (default notes/; a new temporary folder "
                        "with --quick)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--weights", default=VIT_WEIGHTS_FILE, help="ViT state_dict (.pt)")
    p.add_argument("--recipes", action="store_true",
                   help="one-shot / sequential, without / with refit: vit_recipes.json")
    args = p.parse_args(argv)
    check_output_dir(p, "--out-dir", args.out_dir)
    check_input_file(p, "--weights", args.weights)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_calib = args.calib or (256 if args.quick else 2000)
    n_test = args.test or (500 if args.quick else None)
    rxs = RX_QUICK if args.quick else RX_FULL
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="vit_quick_") if args.quick else NOTES)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()

    model = load_vit(args.weights)
    x_calib, _ = fashion_mnist("train", limit=n_calib, seed=1)
    x_test, y_test = fashion_mnist("test", limit=n_test)
    reference = evaluate(model, x_test, y_test)
    print(f"original ViT: test accuracy {reference:.4f} on {len(x_test)} images")

    if args.recipes:
        calib = [x_calib[i:i + 250] for i in range(0, len(x_calib), 250)]
        rxs = rxs[:2] if args.quick else (2, 3, 4, 6, 8, 12)
        rows = recipes_grid(model, calib, x_test, y_test, rxs)
        result = {"reference_accuracy": reference, "n_calib": len(x_calib),
                  "n_test": len(x_test), "rows": rows,
                  "seconds": round(time.perf_counter() - t0, 1),
                  "command": "python -m benchmarks.vit_compress --recipes"
                             + (" --quick" if args.quick else "")}
        with open(os.path.join(out_dir, "vit_recipes.json"), "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {os.path.join(out_dir, 'vit_recipes.json')}")
        print("| rX | " + " | ".join(r for r, _ in RECIPES) + " |")
        print("|---|" + "---|" * len(RECIPES))
        for rx in rxs:
            acc = {r["recipe"]: r["accuracy"] for r in rows if r["rx"] == rx}
            print(f"| {rx:g} | " + " | ".join(f"{100 * acc[r]:.2f}" for r, _ in RECIPES) + " |")
        return result

    wrapped = PixelValues(model)
    batches = [{"pixel_values": x_calib[i:i + 250]} for i in range(0, len(x_calib), 250)]
    stats = collect_covariances(wrapped, batches, layers=[f"model.{n}" for n in
                                                          default_layers(model)],
                                progress=False)
    stats = {name[len("model."):]: s for name, s in stats.items()}
    rows = compress_grid(model, stats, x_test, y_test, rxs)
    variant = torch_variant(model, x_test[:64])
    print("TransformerEncoderLayer variant: compressed", variant["compressed"])

    result = {"reference_accuracy": reference, "n_calib": len(x_calib), "n_test": len(x_test),
              "rxs": list(rxs), "layers": default_layers(model), "rows": rows,
              "torch_variant": variant, "model": model.config,
              "seconds": round(time.perf_counter() - t0, 1),
              "command": "python -m benchmarks.vit_compress" + (" --quick" if args.quick else "")}
    with open(os.path.join(out_dir, "vit.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    plot(rows, os.path.join(out_dir, "vit_accuracy_vs_rx.png"),
         f"ViT on Fashion-MNIST, svd on {len(result['layers'])} Linears, no fine-tuning")
    print(table(rows, reference))
    print(f"{result['seconds']:.0f} s; wrote vit.json and vit_accuracy_vs_rx.png in {out_dir}")
    return result


if __name__ == "__main__":
    main()
