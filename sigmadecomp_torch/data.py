"""Torch-side data helpers for calibration, evaluation and the experiment.

* :func:`fashion_mnist` and :func:`digits` turn the NumPy loaders of
  :mod:`sigmadecomp.datasets` into ``(N, 1, 28, 28)`` float tensors in
  ``[0, 1]`` with int64 labels (optionally a seeded random subset).
* :func:`make_loader` wraps tensors in a :class:`~torch.utils.data.DataLoader`.
* :func:`synthetic_images` draws inputs for the *data-free* setting: random
  smooth images with the grey-level statistics of natural images, no data.
* :class:`ImageFolder` and :func:`load_images` read calibration images given
  by the user: a directory of IDX files (MNIST layout) or a folder of image
  files (flat or one sub-folder per class, as torchvision's ``ImageFolder``).

Examples
--------
>>> from sigmadecomp_torch.data import synthetic_images, make_loader
>>> x = synthetic_images(8, seed=0)
>>> x.shape, bool(x.min() >= 0), bool(x.max() <= 1)
(torch.Size([8, 1, 28, 28]), True, True)
>>> [tuple(b.shape) for b in make_loader(x, batch_size=5)]
[(5, 1, 28, 28), (3, 1, 28, 28)]
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sigmadecomp._validation import is_positive_int_tuple
from sigmadecomp.datasets import load_digits_28, load_fashion_mnist, load_idx

__all__ = [
    "fashion_mnist",
    "digits",
    "subset",
    "make_loader",
    "synthetic_images",
    "ImageFolder",
    "load_images",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _check_limit(limit):
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit={limit!r} is not allowed; limit must be None or a positive integer")
    return int(limit)


def _check_real(name, value, low=None, *, strict=False):
    """``value`` as a float: a finite real number, ``>= low`` (``> low`` when ``strict``)
    unless ``low`` is None."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
          and bool(np.isfinite(value))
          and (low is None or (value > low if strict else value >= low)))
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low}"
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be a finite "
                         f"number{bound}")
    return float(value)


def _check_size(size):
    """``size`` as ``(H, W)`` of positive ints (None stays None), or a named error."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, (int, np.integer)) else size
    if not is_positive_int_tuple(pair, 2):
        raise ValueError(f"size={size!r} is not allowed; size must be None, a positive "
                         "integer or a pair (H, W) of positive integers")
    return int(pair[0]), int(pair[1])


def subset(images, labels=None, limit=None, *, seed=0):
    """A seeded random subset of at most ``limit`` rows (all rows if ``limit`` is None).

    Parameters
    ----------
    images : array-like of shape (N, ...)
    labels : array-like of shape (N,), optional
    limit : int, optional
    seed : int, optional

    Returns
    -------
    images[idx], labels[idx] (or ``None``), with ``idx`` sorted.
    """
    limit = _check_limit(limit)
    n = len(images)
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries but images has {n}; they must "
                         "match")
    if limit is None or limit >= n:
        return images, labels
    idx = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    idx_t = torch.as_tensor(idx) if isinstance(images, torch.Tensor) else idx
    out_labels = None
    if labels is not None:
        out_labels = labels[torch.as_tensor(idx)] if isinstance(labels, torch.Tensor) else labels[idx]
    return images[idx_t], out_labels


def fashion_mnist(split="train", *, directory=None, limit=None, seed=0):
    """Fashion-MNIST as tensors.

    Parameters
    ----------
    split : {'train', 'test'}
    directory : str or Path, optional
        Directory with the four IDX files; default: the Debian package
        ``dataset-fashion-mnist`` (see :func:`sigmadecomp.datasets.find_fashion_mnist`).
    limit : int, optional
        Keep a seeded random subset of this many images.
    seed : int, optional

    Returns
    -------
    images : torch.Tensor of shape (N, 1, 28, 28), float32 in [0, 1]
    labels : torch.Tensor of shape (N,), int64

    Raises
    ------
    sigmadecomp.datasets.DatasetNotFoundError
        When the files are missing (the message says how to install them).
    """
    images, labels = load_fashion_mnist(directory, split=split)
    images, labels = subset(images, labels, limit, seed=seed)
    return torch.from_numpy(np.ascontiguousarray(images[:, None])), torch.from_numpy(labels)


def digits(*, limit=None, seed=0):
    """scikit-learn's handwritten digits resized to 28x28, as tensors.

    Returns
    -------
    images : torch.Tensor of shape (N, 1, 28, 28), float32 in [0, 1]
    labels : torch.Tensor of shape (N,), int64 (digit 0-9)
    """
    images, labels = load_digits_28()
    images, labels = subset(images, labels, limit, seed=seed)
    return torch.from_numpy(np.ascontiguousarray(images[:, None])), torch.from_numpy(labels)


def make_loader(images, labels=None, *, batch_size=256, shuffle=False, seed=0, drop_last=False):
    """A :class:`~torch.utils.data.DataLoader` over in-memory tensors.

    Parameters
    ----------
    images : torch.Tensor of shape (N, C, H, W)
    labels : torch.Tensor of shape (N,), optional
        When given, batches are ``(images, labels)`` pairs; else image tensors.
    batch_size : int, optional
    shuffle : bool, optional
        Reshuffle every epoch with a generator seeded by ``seed``.
    seed : int, optional
    drop_last : bool, optional

    Returns
    -------
    torch.utils.data.DataLoader
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed; batch_size must be a positive integer")
    if labels is None:
        dataset = _ImagesOnly(images)
    else:
        if len(labels) != len(images):
            raise ValueError(f"labels has {len(labels)} entries but images has {len(images)}; "
                             "they must match")
        dataset = TensorDataset(images, labels)
    if shuffle and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"seed={seed!r} is not allowed; seed must be an integer")
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=drop_last)


class _ImagesOnly(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def synthetic_images(n, shape=(1, 28, 28), *, mean=0.29, std=0.35, smoothness=1.5, seed=0):
    """Random smooth images in ``[0, 1]`` for calibration without data.

    White Gaussian noise blurred by a Gaussian of width ``smoothness`` pixels
    (natural images are spatially correlated), rescaled per image to the given
    grey-level mean and standard deviation and clipped to ``[0, 1]``. Drawn in
    NumPy from ``np.random.default_rng(seed)``; no global seeding.

    Parameters
    ----------
    n : int
        Number of images.
    shape : tuple of int, optional
        ``(C, H, W)``, positive integers.
    mean, std : float, optional
        Target grey-level mean and standard deviation (defaults close to
        Fashion-MNIST's; the data-free setting assumes only these two numbers).
    smoothness : float, optional
        Blur width in pixels; 0 gives white noise.
    seed : int or None, optional
        Non-negative seed of ``np.random.default_rng`` (None: fresh randomness).

    Returns
    -------
    images : torch.Tensor of shape (n, C, H, W), float32
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r} is not allowed; n must be a positive integer")
    n = int(n)
    if not is_positive_int_tuple(shape, 3):  # no silent int() of 28.7 or of a bool
        raise ValueError(f"shape={shape!r} is not allowed; shape must be (C, H, W) with positive "
                         "integer sizes")
    shape = tuple(int(s) for s in shape)
    if seed is not None and (isinstance(seed, (bool, np.bool_))
                             or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed={seed!r} is not allowed; seed must be a non-negative integer "
                         "(or None for fresh randomness)")
    mean = _check_real("mean", mean)
    std = _check_real("std", std, 0.0, strict=True)
    smoothness = _check_real("smoothness", smoothness, 0.0)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + shape)
    if smoothness > 0:
        half = max(1, int(np.ceil(3 * smoothness)))
        k = np.exp(-0.5 * (np.arange(-half, half + 1) / smoothness) ** 2)
        k /= k.sum()
        for axis in (2, 3):
            pad = [(0, 0)] * 4
            pad[axis] = (half, half)
            xp = np.pad(x, pad, mode="reflect" if x.shape[axis] > half else "edge")
            x = sum(
                k[i] * np.take(xp, np.arange(i, i + x.shape[axis]), axis=axis)
                for i in range(len(k))
            )
    x -= x.mean(axis=(1, 2, 3), keepdims=True)
    x /= x.std(axis=(1, 2, 3), keepdims=True) + 1e-12
    x = np.clip(mean + std * x, 0.0, 1.0)
    return torch.from_numpy(x.astype(np.float32))


def _idx_pair(directory):
    """(images, labels) paths of the first IDX image file in ``directory``, else None."""
    d = Path(directory)
    files = sorted(p for p in d.iterdir() if p.is_file() and "idx3-ubyte" in p.name)
    if not files:
        return None
    # prefer the training split when both are present
    files.sort(key=lambda p: (not p.name.startswith("train"), p.name))
    img = files[0]
    lab = d / img.name.replace("images-idx3", "labels-idx1")
    return img, (lab if lab.exists() and lab != img else None)


class ImageFolder(Dataset):
    """Image files under a directory, decoded with Pillow.

    Either flat (``root/*.png``) or one sub-folder per class
    (``root/<class>/*.jpg``, classes sorted by name, as torchvision's
    ``ImageFolder``). Images are converted to ``channels`` channels, resized
    to ``size`` (bilinear) and returned as float32 tensors in ``[0, 1]``.

    Parameters
    ----------
    root : str or Path
    size : int or (int, int), optional
        Output ``(H, W)``; default keeps each file's size (then batches need
        equal sizes).
    channels : {1, 3}, optional
        Default 3.
    transform : callable, optional
        Applied to the tensor after conversion (e.g. a normalisation).

    Attributes
    ----------
    samples : list of (Path, int)
    classes : list of str
    """

    def __init__(self, root, *, size=None, channels=3, transform=None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"root={str(root)!r} is not a directory")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is not allowed; channels must be 1 or 3")
        self.root, self.channels, self.transform = root, channels, transform
        self.size = _check_size(size)
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        self.classes = [p.name for p in subdirs]
        samples = [(p, -1) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        for label, d in enumerate(subdirs):
            for dirpath, _, filenames in sorted(os.walk(d)):
                for f in sorted(filenames):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        samples.append((Path(dirpath) / f, label))
        if not samples:
            raise FileNotFoundError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}"
            )
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            if self.size is not None:
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
        x = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())
        if self.transform is not None:
            x = self.transform(x)
        return x, label


def load_images(path, *, limit=None, size=None, channels=None, seed=0):
    """Calibration images from a user-given path, as one tensor.

    Parameters
    ----------
    path : str or Path
        An IDX image file, a directory holding IDX files (MNIST layout, e.g.
        ``train-images-idx3-ubyte[.gz]``; the training split is preferred), or
        an image folder (see :class:`ImageFolder`).
    limit : int, optional
        Keep a seeded random subset of this many images.
    size : int or (int, int), optional
        Resize to this ``(H, W)`` (image folders; IDX images keep their size).
    channels : {1, 3}, optional
        Channels of the result; default: 1 for IDX files, 3 for image folders.
        IDX images are repeated to 3 channels when asked.
    seed : int, optional

    Returns
    -------
    images : torch.Tensor of shape (N, C, H, W), float32 in [0, 1]
    labels : torch.Tensor of shape (N,), int64, or None
        IDX labels when found; class indices for class sub-folders (-1 for
        files directly under the root).
    """
    limit = _check_limit(limit)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"path={str(path)!r} does not exist; give an image folder or IDX files")
    pair = (p, None) if p.is_file() else _idx_pair(p)
    if pair is not None:
        arr = load_idx(pair[0])
        if arr.ndim == 3:
            arr = arr[:, None]
        if arr.ndim != 4:
            raise ValueError(f"{pair[0]}: IDX images must have 3 or 4 dimensions, got shape {arr.shape}")
        labels = load_idx(pair[1]).astype(np.int64) if pair[1] is not None else None
        arr, labels = subset(arr, labels, limit, seed=seed)
        scale = 255.0 if arr.dtype == np.uint8 else 1.0
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32) / scale)
        if channels == 3 and x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif channels not in (None, x.shape[1]):
            raise ValueError(f"channels={channels!r} is not allowed for {x.shape[1]}-channel IDX images")
        return x, (torch.from_numpy(labels) if labels is not None else None)
    folder = ImageFolder(p, size=size, channels=3 if channels is None else channels)
    idx = np.arange(len(folder))
    if limit is not None and limit < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), size=limit, replace=False))
    items = [folder[int(i)] for i in idx]
    shapes = {tuple(x.shape) for x, _ in items}
    if len(shapes) > 1:
        raise ValueError(f"images under {str(p)!r} have different sizes {sorted(shapes)[:3]}...; pass size=")
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)
