"""Tables, findings, plots and files of the demo's results.

:func:`write_outputs` writes ``results.md`` (tables, findings, plots),
``results.json`` (the raw rows) and the PNG plots of a result dict of
:func:`sigmadecomp_torch.demo.experiment.run` into a directory;
:func:`print_summary` prints the tables and findings.
"""

from __future__ import annotations

import json
import os

import numpy as np

from sigmadecomp_torch.demo.experiment import LABELS, QUESTIONS, accuracy_of, rx_label

__all__ = ["write_outputs", "print_summary", "markdown", "results_table", "shapes_table",
           "latency_note", "quant_table", "findings_text", "write_plots", "accuracy_figure",
           "VARIANT_ORDER", "STYLES"]


VARIANT_ORDER = ["frobenius", "sigma", "sigma-centered", "frobenius+ft", "transfer:sigma",
                 "transfer:sigma-centered", "datafree:sigma", "datafree:sigma-centered",
                 "budget:sigma-centered", "sequential:sigma", "seqbudget:sigma",
                 "int8:sigma-centered"]
"""The variants (rows of the accuracy table) in the order shown; each is plotted
(:data:`STYLES`)."""


def _fmt_acc(a):
    return "-" if a is None else f"{100 * a:.2f}"


def results_table(results):
    """Markdown table: accuracy (%) per method x variant (rows) and rX (columns)."""
    rows, cfg = results["rows"], results["config"]
    rxs = sorted({r["rx_target"] for r in rows if r.get("rx_target") is not None})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | variant | " + " | ".join(f"rX={rx_label(x)}" for x in rxs) + " |"
    lines = [head, "|" + "---|" * (2 + len(rxs))]
    for method in methods:
        for v in VARIANT_ORDER:
            cells = []
            found = False
            for rx in rxs:
                acc = next((r["accuracy"] for r in rows if r["method"] == method
                            and r["variant"] == v and r["rx_target"] == rx), None)
                found |= acc is not None
                cells.append(_fmt_acc(acc))
            if found:
                lines.append(f"| {method} | {LABELS.get(v, v)} | " + " | ".join(cells) + " |")
    del cfg
    return "\n".join(lines)


def shapes_table(results):
    """Markdown table of parameters, multiply-adds, latency and decomposition time per shape."""
    shapes, rows = results["shapes"], results["rows"]
    lines = ["| model | params | params rX | MACs | MACs ratio | latency b=1 (ms) | speed-up b=1 "
             "| latency b=64 (ms) | speed-up b=64 | decomposition s (Frob / Sigma / centered) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, sh in shapes.items():
        secs = []
        for v in ("frobenius", "sigma", "sigma-centered"):
            s = next((r["decomposition_seconds"] for r in rows if r["kind"] == "main"
                      and r["method"] == sh["method"] and r["variant"] == v
                      and r["rx_target"] == sh["rx"]), None)
            secs.append("-" if s is None else f"{s:.1f}")
        lat = [sh.get(k) for k in ("latency_b1_ms", "speedup_b1", "latency_b64_ms", "speedup_b64")]
        lat = ["-" if v is None else (f"{v:.3f}" if i % 2 == 0 else f"{v:.2f}x")
               for i, v in enumerate(lat)]
        macs = "n/a" if sh["macs"] is None else f"{sh['macs']:,}"
        macs_ratio = "n/a" if sh["macs_ratio"] is None else f"{sh['macs_ratio']:.2f}"
        lines.append(f"| {key} | {sh['params']:,} | {sh['params_ratio']:.2f} | {macs} | "
                     f"{macs_ratio} | " + " | ".join(lat) + " | "
                     + ("-" if key == "original" else " / ".join(secs)) + " |")
    return "\n".join(lines)


def latency_note(results):
    """The line under :func:`shapes_table`: how many rounds the latencies are medians of."""
    cfg = results["config"]
    if not cfg.get("latency"):
        return ""
    rounds = cfg.get("latency_rounds", 3)
    note = (f"Latency rounds: {rounds}, each at least {cfg['latency_seconds']:g} s per model and "
            "batch, the models in turn; a speed-up is the median over the rounds of the "
            "original's time divided by the model's in the same round, so under a changing "
            "load it can differ from the ratio of the two median latencies shown. The times "
            "of each round are in results.json (`latency_b1_runs_ms`, `latency_b64_runs_ms`).")
    if rounds < 3:
        note += (f" Only {rounds} rounds: on a loaded machine these latencies and speed-ups "
                 "are rough" + ("; run without --quick for figures to quote."
                                if cfg.get("mode") == "quick" else "."))
    return note


def quant_table(results):
    rows = [r for r in results["rows"] if r["kind"] == "quant"]
    if not rows:
        return ""
    size = results["size"]
    lines = ["| model | accuracy (%) | size (bytes) | vs original float |", "|---|---|---|---|",
             f"| original float32 | {_fmt_acc(results['reference']['accuracy'])} | "
             f"{size['original_bytes']:,} | 1.00x |",
             f"| original, int8 weights of the compressed convs | "
             f"{_fmt_acc(size['original_int8_accuracy'])} | {size['original_int8_bytes']:,} | "
             f"{size['original_bytes'] / size['original_int8_bytes']:.2f}x |"]
    for r in rows:
        f = accuracy_of(results["rows"], "main", r["method"], "sigma-centered", r["rx_target"])
        lines.append(f"| {r['method']} rX={rx_label(r['rx_target'])} Sigma centered, float32 | "
                     f"{_fmt_acc(f)} | {r['size_bytes_float']:,} | "
                     f"{size['original_bytes'] / r['size_bytes_float']:.2f}x |")
        lines.append(f"| {r['method']} rX={rx_label(r['rx_target'])} Sigma centered + int8 | "
                     f"{_fmt_acc(r['accuracy'])} | {r['size_bytes']:,} | "
                     f"{size['original_bytes'] / r['size_bytes']:.2f}x |")
    return "\n".join(lines)


def _points(d):
    return f"{100 * d:+.2f}"


def findings_text(results):
    """The findings as Markdown: per question how often it holds, then each figure."""
    items = results.get("findings") or []
    lines = []
    for key, (statement, meaning) in QUESTIONS.items():
        group = [f for f in items if f["question"] == key]
        if not group:
            continue
        holds = sum(f["holds"] for f in group)
        diffs = [f["difference"] for f in group]
        lines.append(f"**{statement[0].upper()}{statement[1:]}**: true at {holds} of {len(group)} "
                     f"settings (difference {_points(min(diffs))} to {_points(max(diffs))} "
                     f"points). {meaning}")
        lines.append("")
        for f in group:
            figs = ", ".join(f"{k} {_fmt_acc(v)}" for k, v in f["figures"].items())
            note = f"; {f['note']}" if f.get("note") else ""
            lines.append(f"- {f['method']} rX={rx_label(f['rx'])}: {figs} "
                         f"({_points(f['difference'])}{note})")
        lines.append("")
    return "\n".join(lines).rstrip()


def write_outputs(results, out_dir):
    """``results.md``, ``results.json`` and the PNG plots in ``out_dir`` (created if missing).

    Returns the paths written.
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
        f.write("\n")
    plots = write_plots(results, out_dir)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results, plots))
    return [os.path.join(out_dir, n) for n in ("results.md", "results.json", *plots)]


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def markdown(results, plots=()):
    ref, cfg = results["reference"], results["config"]
    mode = cfg["mode"]
    cmd = results.get("command") or ("sigmadecomp demo" + ("" if mode == "default" else f" --{mode}"))
    info = ref.get("info", {})
    has_tt = any(r.get("method") == "tt" for r in results["rows"])
    parts = [
        "# End-to-end results: compression without fine-tuning on Fashion-MNIST",
        "",
        f"Produced by `{cmd}` (mode `{mode}`, {results['seconds']:.0f} s on "
        f"{results['environment']['threads']} CPU threads, torch {results['environment']['torch']}).",
        "",
        f"Reference network: `ResNetSmall` ({ref['params']:,} parameters, {ref['macs']:,} "
        f"multiply-adds per image), committed weights trained by "
        f"`python -m benchmarks.train_reference` of the source tree (test accuracy "
        f"{_fmt_acc(info.get('test_accuracy'))}% on the full test set). Compressed layers: "
        f"{', '.join(ref['layers'])} (all 3x3 convs but the first"
        + ("; the Tensor-Train (`tt`) rows also tensorize the final Linear layer, TT-FC"
           if has_tt else "") + "). Accuracy on "
        f"{ref['test_images']} test images; original accuracy on them: "
        f"**{_fmt_acc(ref['accuracy'])}%**.",
        "",
        f"Statistics: {ref['calibration_images']} Fashion-MNIST training images (calibration); "
        + (f"transfer: {ref['digits_images']} scikit-learn digits resized to 28x28, the "
           "statistics shrunk toward the Frobenius metric and mixed with the model's "
           "data-free BatchNorm statistics per layer (`shrink_covariances(..., prior=)`); "
           if ref["digits_images"] else "transfer: skipped (scikit-learn not installed); ")
        + "data-free: from the model's BatchNorm layers (`covariances_from_batchnorm`, "
        f"{ref['synthetic_images']} smooth-noise samples pushed through the model, no image "
        "data). rX is the per-layer parameter "
        "compression ratio of the compressed layers; the whole-model ratio is lower (stem, "
        "shortcuts, BatchNorm and" + (", except for TT," if has_tt else "")
        + " the classifier stay dense), see the second table. "
        + ("Multiply-adds of TT models are counted with torch's FlopCounterMode. "
           if has_tt else "")
        + f"Frobenius + fine-tune: {cfg['finetune_steps']} SGD steps of batch 128. "
        f"ALS options: {cfg['options']}; CP's B-updates use the adaptive CG cap "
        "(`inner={'maxiter': 'adaptive'}`) instead of the exact default.",
        "",
        "## Test accuracy (%) without fine-tuning",
        "",
        results_table(results),
        "",
        "## Parameters, multiply-adds, CPU latency, decomposition time",
        "",
        "Latency: median over rounds of `torch.utils.benchmark` (`blocked_autorange`, itself a "
        "median of repeated runs), inference mode, the models measured round-robin; speed-up: "
        "median of the per-round ratios to the original. "
        "Decomposition seconds cover all compressed layers of one model.",
        "",
        shapes_table(results),
        "",
    ]
    note = latency_note(results)
    if note:
        parts += [note, ""]
    q = quant_table(results)
    if q:
        parts += ["## Combination with int8 weight quantization", "",
                  "int8 per-output-channel symmetric weights of the factorized layers (scales from "
                  "torch's `PerChannelMinMaxObserver`, fake-quantized with "
                  "`torch.fake_quantize_per_channel_affine`); size = bytes of the saved state dict "
                  "(int8 codes + float32 scales).", "", q, ""]
    parts += ["## Findings", "",
              "Each statement below is checked on every setting the run measured; the "
              "figures are test accuracies (%) and the difference is in points.", "",
              findings_text(results) or "(no setting measured)", ""]
    conv = results.get("convergence") or {}
    if conv:
        parts += ["## ALS convergence", "",
                  f"Layer `{conv['layer']}` {tuple(conv['shape'])} at rX={rx_label(conv['rx'])}:"]
        for method in cfg["methods"]:
            if method in conv:
                c = conv[method]
                parts.append(
                    f"- {method} ranks {c['ranks']}: relative Sigma error Frobenius "
                    f"{c['frobenius']['sigma_error']:.4f} ({c['frobenius']['n_iter']} it, "
                    f"{c['frobenius']['seconds']:.1f} s), Sigma {c['sigma']['sigma_error']:.4f} "
                    f"({c['sigma']['n_iter']} it, {c['sigma']['seconds']:.1f} s)")
        parts.append("")
    if plots:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(parts)


STYLES = {"frobenius": ("tab:red", "o-"), "sigma": ("tab:blue", "s-"),
          "sigma-centered": ("tab:green", "^-"), "frobenius+ft": ("tab:red", "D--"),
          "transfer:sigma": ("tab:purple", "<--"),
          "transfer:sigma-centered": ("tab:purple", "v-"),
          "datafree:sigma": ("tab:orange", ">--"),
          "datafree:sigma-centered": ("tab:orange", "d-"),
          "int8:sigma-centered": ("tab:olive", "x:"),
          "budget:sigma-centered": ("tab:cyan", "P-"),
          "sequential:sigma": ("tab:brown", "*-"),
          "seqbudget:sigma": ("tab:pink", "X-")}
"""Colour and line style (marker, line) per variant; each variant has its own marker.

Every variant of :data:`VARIANT_ORDER` (every row of the accuracy table) is here: a
variant missing from this dict would be left out of the plots."""


def accuracy_figure(results, method):
    """The matplotlib figure of accuracy against rX for ``method`` (every rX labelled)."""
    import matplotlib.pyplot as plt

    rows, base = results["rows"], results["reference"]["accuracy"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for v, (color, style) in STYLES.items():
        pts = sorted((r["rx_target"], r["accuracy"]) for r in rows
                     if r["method"] == method and r["variant"] == v and r["accuracy"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, color=color,
                    label=LABELS[v])
    ax.axhline(100 * base, color="k", lw=0.8, ls=":", label="original")
    ax.set_xlabel("per-layer compression ratio rX")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{method}: accuracy without fine-tuning")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["rx_target"] for r in rows if r["method"] == method
                    and r.get("rx_target") is not None})
    ax.set_xticks(ticks, [rx_label(t) for t in ticks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_plots(results, out_dir):
    """PNG plots; returns their file names (relative to ``out_dir``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return []
    files = []
    for method in dict.fromkeys(r["method"] for r in results["rows"]):
        fig = accuracy_figure(results, method)
        name = f"accuracy_vs_rx_{method}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)
    conv = results.get("convergence") or {}
    methods = [m for m in results["config"]["methods"] if m in conv]
    if methods:
        fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.8), squeeze=False)
        for ax, method in zip(axes[0], methods):
            c = conv[method]
            for label, color in (("frobenius", "tab:red"), ("sigma", "tab:blue")):
                e = c[label]["errors"]
                ax.plot(range(len(e)), e, color=color,
                        label=f"{label} ALS ({'Frobenius' if label == 'frobenius' else 'Sigma'} error)")
            ax.set_yscale("log")
            ax.set_xlabel("sweep")
            ax.set_ylabel("relative error")
            ax.set_title(f"{method} {conv['layer']} rX={rx_label(conv['rx'])}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        name = "results_als_convergence.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def print_summary(results, out=print):
    out("")
    out(results_table(results))
    out("")
    out(shapes_table(results))
    note = latency_note(results)
    if note:
        out(note)
    q = quant_table(results)
    if q:
        out("")
        out(q)
    out("")
    out(findings_text(results))

