"""Shared pieces of the benchmark scripts: realistic kernels and covariances.

``realistic_covariance`` builds the second moment of 3x3 patches of real
feature maps: Fashion-MNIST images (random smooth images when the dataset is
not installed) pushed through a random 3x3 conv + ReLU with ``channels``
outputs, then im2col'ed with padding 1 exactly as the next conv would see them.
The result is a full ``(channels*k*k, channels*k*k)`` PSD matrix with the
strong spatial correlations, non-zero mean and spectrum decay of real
activations.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import time

import numpy as np

from sigmadecomp.datasets import DatasetNotFoundError, load_fashion_mnist
from sigmadecomp_torch.demo import int_at_least


def calibration_images(n_images=256, seed=0):
    """``(N, 28, 28)`` float32 images: Fashion-MNIST if installed, else smooth noise."""
    rng = np.random.default_rng(seed)
    try:
        images, _ = load_fashion_mnist(split="train")
        idx = rng.choice(images.shape[0], size=n_images, replace=False)
        return images[idx], "fashion-mnist"
    except DatasetNotFoundError:
        x = rng.standard_normal((n_images, 28, 28))
        k = np.exp(-0.5 * (np.arange(-3, 4) / 1.5) ** 2)
        k /= k.sum()
        for ax in (1, 2):
            x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), ax, x)
        return x.astype(np.float32), "smooth-noise"


def reference_setup(calib, test, seed):
    """The committed reference network and its Fashion-MNIST images, as the accuracy
    benchmarks use them: ``(model, x_cal, x_test, y_test)`` with ``calib`` training images
    (a seeded random subset, in file order) and ``test`` test images (None: all)."""
    import torch

    from sigmadecomp_torch.data import fashion_mnist
    from sigmadecomp_torch.demo.reference import load_reference

    model = load_reference()
    x_train, _ = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test", limit=test, seed=seed + 1)
    perm = np.random.default_rng(seed).permutation(len(x_train))[:calib]
    return model, x_train[torch.as_tensor(np.sort(perm))], x_test, y_test


def im2col(x, k=3, pad=1):
    """Patches of ``x`` (N, C, H, W) as rows (N*H*W, C*k*k), column order (c, i, j)."""
    N, C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    Ho, Wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    cols = np.empty((N, C, k, k, Ho, Wo), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i:i + Ho, j:j + Wo]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(N * Ho * Wo, C * k * k)


def realistic_covariance(channels=128, k=3, n_images=256, seed=0, stride=2):
    """Second moment of ``k x k`` patches of ReLU feature maps with ``channels`` channels.

    Returns ``(sigma, source)`` with ``sigma`` float64 of shape (n, n),
    ``n = channels*k*k``, and the name of the image source.
    """
    rng = np.random.default_rng(seed)
    images, source = calibration_images(n_images, seed)
    x = images[:, None].astype(np.float64)
    # first layer: 1 -> 32 channels, 3x3, ReLU; second: 32 -> channels, stride, ReLU
    w1 = rng.standard_normal((32, 9)) / 3.0
    h = np.maximum(im2col(x, 3, 1) @ w1.T, 0.0)
    h = h.reshape(x.shape[0], 28, 28, 32).transpose(0, 3, 1, 2)[:, :, ::stride, ::stride]
    w2 = rng.standard_normal((channels, 32 * 9)) / np.sqrt(32 * 9)
    N, _, H, W = h.shape
    f = np.maximum(im2col(np.ascontiguousarray(h), 3, 1) @ w2.T + 0.1, 0.0)
    f = f.reshape(N, H, W, channels).transpose(0, 3, 1, 2)
    U = im2col(np.ascontiguousarray(f), k, k // 2)
    sigma = U.T @ U / U.shape[0]
    return 0.5 * (sigma + sigma.T), source


def trained_like_kernel(T=128, S=128, k=3, seed=0, decay=0.5):
    """A random kernel with a decaying channel spectrum, like trained conv weights."""
    rng = np.random.default_rng(seed)
    n = S * k * k
    U, _ = np.linalg.qr(rng.standard_normal((T, T)))
    V, _ = np.linalg.qr(rng.standard_normal((n, T)))
    s = (1.0 + np.arange(T)) ** (-decay)
    return ((U * s) @ V.T).reshape(T, S, k, k) / np.sqrt(n)


class Timer:
    """Wall-clock stopwatch (``time.perf_counter``)."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def write_csv(path, rows, fieldnames):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        for r in rows:
            w.writerow(r)


NOTES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notes")


def _status_mib(field):
    """``field`` (``VmRSS``, ``VmHWM``, ...) of ``/proc/self/status`` in MiB; None
    where that file does not exist (not Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return None


def peak_rss_mib():
    """Peak resident memory of this process so far (MiB).

    ``VmHWM`` of ``/proc/self/status`` where available: ``ru_maxrss`` is
    kept across ``exec`` on Linux, so a spawned worker would report its
    parent's peak; otherwise ``ru_maxrss`` (KiB on Linux).
    """
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib():
    """Resident memory of this process now (MiB; ``VmRSS``, Linux only)."""
    now = _status_mib("VmRSS")
    if now is None:
        raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")
    return now


# ---------------------------------------------------------------------------
# command-line checks shared by the scripts
# ---------------------------------------------------------------------------

# integer counts: the one parser of the package's command line
positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def _number_at_least(low, strict):
    what = f"a finite number {'>' if strict else '>='} {low:g}"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (np.isfinite(value) and (value > low if strict else value >= low)):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


positive_float = _number_at_least(0.0, strict=True)
nonnegative_float = _number_at_least(0.0, strict=False)


def threads_setting(text):
    """argparse type: ``'default'`` (the libraries' own choice) or a positive thread count."""
    if text == "default":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected 'default' or a positive integer")
    return value


def check_output_file(parser, option, path, *, inputs=(), make_folder=False):
    """Reject an output file ``path`` of ``option`` before any work is done.

    An error (``parser.error``: usage, message, exit status 2) when ``path`` is
    an existing folder, when the folder it would go in does not exist (unless
    ``make_folder``: the script creates it) or is a file, or when ``path`` is
    one of the ``inputs`` the same run reads. ``None`` passes.
    """
    if path is None:
        return
    if os.path.isdir(path):
        parser.error(f"{option} {path!r}: is a folder; expected a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        parser.error(f"{option} {path!r}: {folder!r} is a file, not a folder")
    if not make_folder and not os.path.isdir(folder):
        parser.error(f"{option} {path!r}: the folder {folder!r} does not exist")
    for other in inputs:
        if other is not None and os.path.abspath(other) == os.path.abspath(path):
            parser.error(f"{option} {path!r}: would overwrite an input of this run")


def check_output_dir(parser, option, path):
    """Reject an output folder ``path`` of ``option`` that is an existing file."""
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{option} {path!r}: is a file; expected a folder")


def check_input_file(parser, option, path):
    """Reject an input file ``path`` of ``option`` that does not exist."""
    if path is not None and not os.path.isfile(path):
        parser.error(f"{option} {path!r}: no such file")
