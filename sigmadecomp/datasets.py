"""Small real image datasets for calibration and experiments (NumPy only).

* :func:`load_idx` reads a file in the standard IDX format (optionally gzip'ed).
* :func:`load_fashion_mnist` reads the four Fashion-MNIST IDX files from a
  directory; by default the one installed by the Debian package
  ``dataset-fashion-mnist``.
* :func:`load_digits_28` gives scikit-learn's bundled 8x8 handwritten digits
  resized to 28x28 (the second dataset of the transfer experiment).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import numpy as np

__all__ = [
    "load_idx",
    "load_fashion_mnist",
    "find_fashion_mnist",
    "load_digits_28",
    "DatasetNotFoundError",
    "FASHION_MNIST_DIRS",
    "INSTALL_HINT",
]

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
# the four IDX files of Fashion-MNIST (each may also be gzip'ed, name + ".gz")
_FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
INSTALL_HINT = (
    "install it with:  sudo apt-get install dataset-fashion-mnist  "
    "(or pass a directory holding " + ", ".join(f + "[.gz]" for f in _FASHION_FILES)
    + "; the environment variable SIGMADECOMP_FASHION_MNIST may name that directory)"
)

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are missing; the message says how to get them."""


def load_idx(path):
    """Read an IDX file (as used by MNIST / Fashion-MNIST), gzip'ed or not.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    array : numpy.ndarray
        With the shape and element type recorded in the file header
        (converted to native byte order).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from sigmadecomp.datasets import load_idx
    >>> d = tempfile.mkdtemp()
    >>> p = os.path.join(d, "x-idx2-ubyte")
    >>> with open(p, "wb") as f:
    ...     _ = f.write(bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big")
    ...                 + (3).to_bytes(4, "big") + bytes(range(6)))
    >>> load_idx(p)
    array([[0, 1, 2],
           [3, 4, 5]], dtype=uint8)
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{path} is truncated: its header needs {offset} bytes for {ndim} "
                         f"dimensions, the file has {len(data)} bytes")
    dims = struct.unpack(">" + "I" * ndim, data[4:offset])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(dims)  # exact (Python ints): no overflow for any header
    expected = offset + count * dtype.itemsize
    if len(data) < expected:
        raise ValueError(
            f"{path} is truncated: header says shape {dims} ({expected} bytes), "
            f"file has {len(data)} bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_file(directory, stem):
    for name in (stem, stem + ".gz"):
        p = Path(directory) / name
        if p.exists():
            return p
    return None


def find_fashion_mnist(directory=None):
    """The directory holding the Fashion-MNIST IDX files, or raise with an install hint.

    Looks at ``directory`` if given, else ``$SIGMADECOMP_FASHION_MNIST``, else
    the Debian package's location.
    """
    candidates = (
        [directory]
        if directory is not None
        else [os.environ.get("SIGMADECOMP_FASHION_MNIST")] + list(FASHION_MNIST_DIRS)
    )
    for d in candidates:
        if not d:
            continue
        found = [f for f in _FASHION_FILES if _find_file(d, f)]
        if len(found) == len(_FASHION_FILES):
            return Path(d)
        if found:  # a partial copy: loading a split would fail later, less clearly
            missing = [f for f in _FASHION_FILES if f not in found]
            raise DatasetNotFoundError(
                f"Fashion-MNIST in {d} is incomplete: {', '.join(missing)} (or .gz) missing "
                f"beside {', '.join(found)}; {INSTALL_HINT}")
    where = directory if directory is not None else ", ".join(c for c in candidates if c)
    raise DatasetNotFoundError(f"Fashion-MNIST IDX files not found in {where}; {INSTALL_HINT}")


def load_fashion_mnist(directory=None, *, split="train"):
    """Load Fashion-MNIST images and labels.

    Parameters
    ----------
    directory : str or Path, optional
        Directory with the four IDX files (``.gz`` or not). Default: see
        :func:`find_fashion_mnist`.
    split : {'train', 'test'}

    Returns
    -------
    images : numpy.ndarray of shape (N, 28, 28), float32 in [0, 1]
    labels : numpy.ndarray of shape (N,), int64
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not allowed; split must be 'train' or 'test'")
    d = find_fashion_mnist(directory)
    prefix = "train" if split == "train" else "t10k"
    images = load_idx(_find_file(d, f"{prefix}-images-idx3-ubyte"))
    labels = load_idx(_find_file(d, f"{prefix}-labels-idx1-ubyte"))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{d}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split"
        )
    return images.astype(np.float32) / 255.0, labels.astype(np.int64)


def load_digits_28():
    """scikit-learn's bundled handwritten digits, resized from 8x8 to 28x28.

    Bilinear resize (separable linear interpolation), intensities scaled to
    [0, 1]. Needs scikit-learn (the ``bench`` extra); no download.

    Returns
    -------
    images : numpy.ndarray of shape (1797, 28, 28), float32
    labels : numpy.ndarray of shape (1797,), int64
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits_28 needs scikit-learn: pip install 'sigmadecomp[bench]'"
        ) from exc
    d = load_digits()
    small = d.images.astype(np.float64) / 16.0
    # separable linear interpolation 8 -> 28 (pixel centres aligned)
    src = (np.arange(28) + 0.5) * 8 / 28 - 0.5
    src = np.clip(src, 0, 7)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, 7)
    frac = src - lo
    M = np.zeros((28, 8))
    M[np.arange(28), lo] += 1 - frac
    M[np.arange(28), hi] += frac
    big = np.einsum("ij,njk,lk->nil", M, small, M)
    return big.astype(np.float32), d.target.astype(np.int64)
