"""The trade-off of the ``ridge``: Sigma-error increase against Frobenius error.

For each layer and solver this script runs the solver in a regularised matrix
``M(Sigma, lam)`` (``ridge=0`` on ``M``, which is the same objective as the
solver's own ``ridge`` option for the isotropic rule) over a grid of ``lam``,
and records for each point

* the relative Sigma-error in the calibration Sigma and its increase over
  ``lam = 0`` (the goal: at most +1%);
* the relative Frobenius error ``||K - K~|| / ||K||`` and the Frobenius
  method's (truncated SVD, HOOI, TT-SVD, CP-ALS) for comparison;
* the relative Sigma-error in a held-out Sigma (the output error on new data).

Two rules for ``M`` (``m = trace(Sigma) / n`` the mean eigenvalue):

* ``iso``: ``Sigma + lam * m * I`` (the solvers' ``ridge``);
* ``floor``: the eigenvalues of Sigma below ``lam * m`` raised to ``lam * m``
  (``V max(Lambda, lam * m) V^T``): it acts only where Sigma is weak.

Layers: ``resnet`` (``layer2.conv2`` of the trained reference, n = 576 from
490 patches), ``synthetic`` (n = 1152 from 980 patches, see
``benchmarks/ridge.py``) and ``r18`` / ``r18-256`` / ``r18-128``: 3x3 convs of
512 / 256 / 128 random-net ReLU channels at 7x7 resolution calibrated on 64 /
32 / 16 images, i.e.
patches / n = 0.68 as for a ResNet-18 ``layer4`` conv calibrated on 64 images
(3,136 patches for n = 4,608).

Run from the repository root; rows are appended to ``--out`` (JSON lines) as
they are measured, and ``--plot`` draws ``notes/ridge.png`` from that file::

    python -m benchmarks.ridge_pareto --layers synthetic --methods sigma_svd tucker2 --out F
    python -m benchmarks.ridge_pareto --plot F --png notes/ridge.png
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from benchmarks.common import (NOTES_DIR, calibration_images, check_input_file,
                               check_output_file)
from benchmarks.ridge import (METHOD_NAMES, _features, feature_layer, methods, resnet_layer,
                              synthetic_layer)
from sigmadecomp import relative_sigma_error

GRID_FINE = [0.0] + [float(f"{v:.3g}") for v in np.logspace(-5, 0, 26)]
GRID = [0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]


def r18_layer(channels=512, n_calib=None, n_held=200):
    """A ResNet-18 ``layer4``-like 3x3 conv: 7x7 maps, patches / n = 0.68."""
    n = channels * 9
    if n_calib is None:
        n_calib = int(round(0.68 * n / 49))
    images, source = calibration_images(n_calib + n_held, seed=2)
    feats = _features(images, channels)[:, :, ::2, ::2]  # 14x14 -> 7x7
    feats = np.ascontiguousarray(feats)
    K, s_cal, s_held, count = feature_layer(feats, n_calib, channels)
    desc = (f"r18-{channels} {tuple(K.shape)}, n={n}, {count} calibration patches "
            f"({n_calib} {source} images at 7x7), held out {n_held} images")
    return K, s_cal, s_held, desc


def regularised(S, lam_S, V_S, lam, rule):
    """``M(Sigma, lam)`` (the floor from Sigma's eigen-decomposition)."""
    m = float(np.trace(S)) / S.shape[0]
    if rule == "iso":
        return S + lam * m * np.eye(S.shape[0])
    if rule == "floor":
        d = np.maximum(lam_S, lam * m)
    else:
        raise ValueError(rule)
    M = (V_S * d) @ V_S.T
    return 0.5 * (M + M.T)


def run(layer, make, only, rules, grid, out):
    K, S_cal, S_held, desc = make()
    lam_S, V_S = np.linalg.eigh(S_cal) if "floor" in rules else (np.linalg.eigvalsh(S_cal), None)
    lam_S = np.maximum(lam_S, 0.0)
    rank = int(np.sum(lam_S > 1e-10 * lam_S[-1]))
    print(f"{desc}; rank {rank}", flush=True)
    for name, (solve, frob) in methods(K).items():
        if only and name not in only:
            continue
        F = np.asarray(frob().to_tensor()).reshape(K.shape)
        rec = dict(layer=layer, desc=desc, rank=rank, method=name, rule="frobenius", lam=None,
                   sigma_error=relative_sigma_error(K, F, S_cal),
                   frobenius=relative_sigma_error(K, F),
                   held_out=relative_sigma_error(K, F, S_held), seconds=None)
        _emit(rec, out)
        for rule in rules:
            for lam in grid:
                if lam == 0.0 and rule != rules[0]:
                    continue
                M = S_cal if lam == 0.0 else regularised(S_cal, lam_S, V_S, lam, rule)
                t0 = time.perf_counter()
                res = solve(M, 0.0)
                sec = time.perf_counter() - t0
                A = np.asarray(res.to_tensor()).reshape(K.shape)
                rec = dict(layer=layer, desc=desc, rank=rank, method=name,
                           rule="none" if lam == 0.0 else rule, lam=lam,
                           sigma_error=relative_sigma_error(K, A, S_cal),
                           frobenius=relative_sigma_error(K, A),
                           held_out=relative_sigma_error(K, A, S_held), seconds=sec)
                _emit(rec, out)


def _emit(rec, out):
    print(f"  {rec['layer']} {rec['method']:9s} {rec['rule']:9s} lam={rec['lam']} "
          f"sigma={rec['sigma_error']:.5f} frob={rec['frobenius']:.4f} "
          f"held={rec['held_out']:.5f}", flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(rows, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    meths = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(layers), len(meths), figsize=(3.6 * len(meths),
                                                                3.0 * len(layers)),
                             squeeze=False)
    style = {"iso": ("C0", "o"), "floor": ("C1", "s")}
    for i, layer in enumerate(layers):
        for j, meth in enumerate(meths):
            ax = axes[i][j]
            sel = [r for r in rows if r["layer"] == layer and r["method"] == meth]
            base = [r for r in sel if r["rule"] == "none"]
            if not base:
                ax.set_visible(False)
                continue
            e0 = base[0]["sigma_error"]
            for rule, (c, mk) in style.items():
                pts = sorted([r for r in sel if r["rule"] == rule], key=lambda r: r["lam"])
                pts = base + pts
                ax.plot([100 * (r["sigma_error"] / e0 - 1) for r in pts],
                        [r["frobenius"] for r in pts], color=c, marker=mk, ms=3, lw=1,
                        label=f"{rule} ridge")
            fr = [r for r in sel if r["rule"] == "frobenius"]
            if fr:
                ax.axhline(fr[0]["frobenius"], color="k", ls="--", lw=0.8,
                           label="Frobenius method")
            ax.plot([0], [base[0]["frobenius"]], "k*", ms=8, label="ridge 0")
            ax.axvline(1.0, color="r", ls=":", lw=0.8, label="+1%")
            ax.set_xscale("symlog", linthresh=0.1)
            ax.set_xlim(-1, 100)
            ax.set_title(f"{layer}: {meth}", fontsize=9)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("Frobenius error", fontsize=8)
            if i == len(layers) - 1:
                ax.set_xlabel("Sigma-error increase vs ridge 0 (%)", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def table(rows, show=(0.0, 5e-4, 1e-3, 2e-3, 1e-2)):
    """Markdown: per layer and method the rows at ``show`` (iso rule), the Frobenius
    method, and the best measured Frobenius error within +1% Sigma-error."""
    out = ["| layer | method | ridge | Sigma-error (calib.) | increase vs 0 | Frobenius error "
           "| held-out Sigma-error |", "|---|---|---|---|---|---|---|"]
    best = ["| layer | method | Frobenius error at ridge 0 | best at <= +1% (ridge) "
            "| Frobenius method | gap closed |", "|---|---|---|---|---|---|"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    for layer in layers:
        for meth in dict.fromkeys(r["method"] for r in rows if r["layer"] == layer):
            sel = [r for r in rows if r["layer"] == layer and r["method"] == meth]
            base = [r for r in sel if r["rule"] == "none"]
            fr = [r for r in sel if r["rule"] == "frobenius"]
            if not base:
                continue
            e0 = base[0]["sigma_error"]
            iso = {r["lam"]: r for r in sel if r["rule"] == "iso"}
            iso[0.0] = base[0]
            for lam in show:
                if lam in iso:
                    r = iso[lam]
                    out.append(f"| {layer} | {meth} | {lam:g} | {r['sigma_error']:.4f} | "
                               f"{100 * (r['sigma_error'] / e0 - 1):+.3f}% | "
                               f"{r['frobenius']:.3f} | {r['held_out']:.4f} |")
            if fr:
                r = fr[0]
                out.append(f"| {layer} | {meth} | Frobenius method | {r['sigma_error']:.4f} | "
                           f" | {r['frobenius']:.3f} | {r['held_out']:.4f} |")
            ok = [r for r in sel if r["rule"] in ("none", "iso", "floor")
                  and r["sigma_error"] <= 1.01 * e0]
            b = min(ok, key=lambda r: r["frobenius"])
            f0, ff = base[0]["frobenius"], fr[0]["frobenius"] if fr else float("nan")
            gap = (f0 - b["frobenius"]) / (f0 - ff) if f0 != ff else float("nan")
            best.append(f"| {layer} | {meth} | {f0:.3f} | {b['frobenius']:.3f} "
                        f"({b['rule']} {b['lam']:g}) | {ff:.3f} | {100 * gap:.0f}% |")
    return "\n".join(out) + "\n\n" + "\n".join(best)


LAYERS = ("resnet", "synthetic", "r18", "r18-256", "r18-128")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", nargs="*", default=["synthetic"], choices=LAYERS,
                    help="resnet, synthetic, r18 (512 ch), r18-256, r18-128")
    ap.add_argument("--methods", nargs="*", default=None, choices=list(METHOD_NAMES),
                    help="formats to run (default: all)")
    ap.add_argument("--rules", nargs="*", default=["iso", "floor"], choices=["iso", "floor"])
    ap.add_argument("--fine", action="store_true", help="the 26-point log grid 1e-5..1")
    ap.add_argument("--grid", nargs="*", type=float, default=None)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--plot", default=None, help="draw the PNG from this JSON-lines file")
    ap.add_argument("--png", default=os.path.join(NOTES_DIR, "ridge.png"),
                    help="the PNG --plot draws (default notes/ridge.png)")
    ap.add_argument("--table", default=None, help="print the markdown tables of this file")
    args = ap.parse_args(argv)
    check_input_file(ap, "--table", args.table)
    check_input_file(ap, "--plot", args.plot)
    if args.plot:
        check_output_file(ap, "--png", args.png, inputs=(args.plot,))
    check_output_file(ap, "--out", args.out)
    if args.grid is not None and any(not (g >= 0 and np.isfinite(g)) for g in args.grid):
        ap.error(f"--grid {args.grid}: expected non-negative finite ridge values")
    if args.table:
        print(table(load(args.table)))
        return
    if args.plot:
        plot(load(args.plot), args.png)
        return
    makers = {"resnet": resnet_layer, "synthetic": synthetic_layer,
              "r18": lambda: r18_layer(512), "r18-256": lambda: r18_layer(256),
              "r18-128": lambda: r18_layer(128)}
    grid = args.grid if args.grid else (GRID_FINE if args.fine else GRID)
    for layer in args.layers:
        run(layer, makers[layer], args.methods, args.rules, grid, args.out)


if __name__ == "__main__":
    main()
