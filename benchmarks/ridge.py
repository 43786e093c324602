"""The ``ridge`` default: Sigma-error cost versus sanity in the unseen directions.

With fewer calibration patches than the patch size ``n`` the second moment
Sigma is singular and the Sigma-optimal factors are free in its null space.
The solvers minimise in ``Sigma + ridge * (trace(Sigma) / n) * I`` instead. For
each ``ridge`` this script reports, per method:

* the relative Sigma-error in the calibration Sigma (what the method is asked
  to minimise) and its increase over ``ridge = 0`` (the target: < 1%);
* the relative Frobenius error ``||K - K~|| / ||K||`` (the target: near the
  Frobenius method's, printed as ``frobenius method``);
* the relative Sigma-error in a held-out Sigma from many more images (what
  the layer's output error on new data would be).

Layers:

* ``resnet.layer2.conv2``: the trained ResNetSmall (Fashion-MNIST) reference,
  its 64 -> 64 3x3 conv at 7x7 resolution (n = 576, 49 patches per image),
  calibrated on 10 images = 490 patches; held out: 2,000 test images.
* ``synthetic-128`` (``--layers synthetic``): 3x3 patches of 128-channel ReLU features of Fashion-MNIST
  images (random two-layer conv net, ``benchmarks.common``), n = 1152, 5
  images = 980 patches; kernel ``trained_like_kernel(128, 128)``; held out: 200
  other images.

Methods: ``sigma_svd`` of the flattened kernel (rank T/4), ``tucker2``
(ranks (T/4, S/4), 20 sweeps), ``tt_conv`` (uniform rank for a compression ratio of 8)
and ``cp`` (rank for a compression ratio of 8, 15 sweeps).

Run from the repository root (a few minutes on 2 cores)::

    python -m benchmarks.ridge [--quick] [--layers resnet synthetic] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from benchmarks.common import calibration_images, check_output_file, im2col, trained_like_kernel
from sigmadecomp import cp, relative_sigma_error, sigma_svd, tt_conv, tucker2
from sigmadecomp.tt import auto_modes, tt_ranks_for_ratio

RIDGES = [0.0, 1e-4, 1e-3, 1e-2, 1e-1]


def resnet_layer(n_calib=10, n_held=2000, name="layer2.conv2"):
    """``(kernel, sigma_calib, sigma_held, description)`` of a 3x3 conv of the reference ResNet."""
    import torch

    from sigmadecomp_torch.demo.reference import load_reference
    from sigmadecomp.datasets import load_fashion_mnist
    from sigmadecomp_torch import collect_covariances

    model = load_reference()
    train, _ = load_fashion_mnist(split="train")
    test, _ = load_fashion_mnist(split="test")
    rng = np.random.default_rng(0)
    calib = torch.as_tensor(train[rng.choice(train.shape[0], n_calib, replace=False)])[:, None]
    held = torch.as_tensor(test[:n_held])[:, None]
    s_cal = collect_covariances(model, calib, layers=[name], progress=False)[name]
    s_held = collect_covariances(model, [held[i:i + 500] for i in range(0, n_held, 500)],
                                 layers=[name], progress=False)[name]
    K = model.get_submodule(name).weight.detach().double().numpy()
    desc = (f"resnet.{name} {tuple(K.shape)}, n={K[0].size}, {int(s_cal.count)} calibration "
            f"patches ({n_calib} images), held out {n_held} test images")
    return K, s_cal.sigma.double().numpy(), s_held.sigma.double().numpy(), desc


def _features(images, channels, seed=0):
    """``channels`` ReLU features (N, C, 14, 14) of a fixed random two-layer conv net."""
    rng = np.random.default_rng(seed)
    x = images[:, None].astype(np.float64)
    w1 = rng.standard_normal((32, 9)) / 3.0
    h = np.maximum(im2col(x, 3, 1) @ w1.T, 0.0)
    h = h.reshape(x.shape[0], 28, 28, 32).transpose(0, 3, 1, 2)[:, :, ::2, ::2]
    w2 = rng.standard_normal((channels, 32 * 9)) / np.sqrt(32 * 9)
    N, _, H, W = h.shape
    f = np.maximum(im2col(np.ascontiguousarray(h), 3, 1) @ w2.T + 0.1, 0.0)
    return np.ascontiguousarray(f.reshape(N, H, W, channels).transpose(0, 3, 1, 2))


def feature_layer(feats, n_calib, channels):
    """``(K, Sigma_calib, Sigma_held, patches)`` of a 3x3 conv reading ``feats``.

    The first ``n_calib`` feature maps give the calibration Sigma, the rest the
    held-out one; ``K`` is a trained-like ``channels x channels`` kernel.
    """
    def sigma(f):
        U = im2col(f, 3, 1)
        return U.T @ U / U.shape[0], U.shape[0]

    s_cal, count = sigma(feats[:n_calib])
    s_held, _ = sigma(feats[n_calib:])
    K = trained_like_kernel(channels, channels, 3, seed=0)
    return K, 0.5 * (s_cal + s_cal.T), 0.5 * (s_held + s_held.T), count


def synthetic_layer(channels=128, n_calib=5, n_held=200):
    images, source = calibration_images(n_calib + n_held, seed=1)
    K, s_cal, s_held, count = feature_layer(_features(images, channels), n_calib, channels)
    desc = (f"synthetic-{channels} {tuple(K.shape)}, n={K[0].size}, {count} calibration patches "
            f"({n_calib} {source} images), held out {n_held} images")
    return K, s_cal, s_held, desc


def methods(K):
    T, S, H, W = K.shape
    im, om = auto_modes(S, T)
    tt_r = tt_ranks_for_ratio(im, om, 8, kernel_size=(H, W))
    cp_rank = max(1, int(T * S * H * W / 8 / (T + S + H + W)))
    W2 = K.reshape(T, -1)
    return {
        "sigma_svd": (lambda S_, r: sigma_svd(W2, T // 4, S_, ridge=r),
                      lambda: sigma_svd(W2, T // 4)),
        "tucker2": (lambda S_, r: tucker2(K, (T // 4, S // 4), S_, ridge=r, n_iter_max=20),
                    lambda: tucker2(K, (T // 4, S // 4))),
        "tt_conv": (lambda S_, r: tt_conv(K, tt_r, S_, in_modes=im, out_modes=om, ridge=r),
                    lambda: tt_conv(K, tt_r, in_modes=im, out_modes=om)),
        # the 'svd' start of CP draws random columns (rank > H, W): one seed for all runs
        "cp": (lambda S_, r: cp(K, cp_rank, S_, ridge=r, n_iter_max=15, rng=0),
               lambda: cp(K, cp_rank, n_iter_max=15, rng=0)),
    }


METHOD_NAMES = ("sigma_svd", "tucker2", "tt_conv", "cp")  # the keys of methods(K)


def run_layer(K, S_cal, S_held, desc, ridges, only=None):
    rows = []
    for name, (run, frob) in methods(K).items():
        if only and name not in only:
            continue
        F = np.asarray(frob().to_tensor()).reshape(K.shape)
        base = None
        for r in ridges:
            t0 = time.perf_counter()
            res = run(S_cal, r)
            sec = time.perf_counter() - t0
            A = np.asarray(res.to_tensor()).reshape(K.shape)
            e_sig = relative_sigma_error(K, A, S_cal)
            if r == 0.0:
                base = e_sig
            rows.append(dict(
                layer=desc.split(" ")[0], method=name, ridge=r, sigma_error=e_sig,
                increase=100.0 * (e_sig / base - 1.0), frobenius=relative_sigma_error(K, A),
                held_out=relative_sigma_error(K, A, S_held), seconds=sec))
            print(f"  {name:9s} ridge={r:<7g} sigma={e_sig:.4f} (+{rows[-1]['increase']:.3f}%) "
                  f"frob={rows[-1]['frobenius']:.3f} held-out={rows[-1]['held_out']:.4f} "
                  f"{sec:.1f}s", flush=True)
        rows.append(dict(layer=desc.split(" ")[0], method=name, ridge="frobenius method",
                         sigma_error=relative_sigma_error(K, F, S_cal), increase=float("nan"),
                         frobenius=relative_sigma_error(K, F),
                         held_out=relative_sigma_error(K, F, S_held), seconds=float("nan")))
    return rows


def to_markdown(blocks):
    out = []
    for desc, rows in blocks:
        out.append(f"### {desc}\n")
        out.append("| method | ridge | Sigma-error (calib.) | increase vs ridge=0 | "
                   "Frobenius error | held-out Sigma-error | seconds |")
        out.append("|---|---|---|---|---|---|---|")
        for r in rows:
            inc = "" if r["ridge"] == "frobenius method" else f"{r['increase']:+.3f}%"
            sec = "" if r["ridge"] == "frobenius method" else f"{r['seconds']:.1f}"
            rid = r["ridge"] if isinstance(r["ridge"], str) else f"{r['ridge']:g}"
            out.append(f"| {r['method']} | {rid} | {r['sigma_error']:.4f} | {inc} | "
                       f"{r['frobenius']:.3f} | {r['held_out']:.4f} | {sec} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="resnet layer only, ridge 0 and 1e-3")
    ap.add_argument("--layers", nargs="*", default=["resnet"], choices=["resnet", "synthetic"],
                    help="resnet (default) and/or synthetic")
    ap.add_argument("--methods", nargs="*", default=None, choices=list(METHOD_NAMES),
                    help="formats to run (default: all)")
    ap.add_argument("--out", default=None, help="write the markdown tables here")
    args = ap.parse_args(argv)
    check_output_file(ap, "--out", args.out, make_folder=True)
    ridges = [0.0, 1e-3] if args.quick else RIDGES
    makers = {"resnet": resnet_layer, "synthetic": synthetic_layer}
    layers = [resnet_layer] if args.quick else [makers[k] for k in args.layers]
    blocks = []
    for make in layers:
        K, S_cal, S_held, desc = make()
        lam = np.linalg.eigvalsh(S_cal)
        rank = int(np.sum(lam > 1e-10 * lam[-1]))
        desc = f"{desc}; calibration Sigma rank {rank} of {S_cal.shape[0]}"
        print(desc, flush=True)
        blocks.append((desc, run_layer(K, S_cal, S_held, desc, ridges, args.methods)))
    md = to_markdown(blocks)
    print(md)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()
