"""IDX reader, Fashion-MNIST and digits loaders, and the torch-side data helpers."""

import gzip
import struct

import numpy as np
import pytest

from sigmadecomp.datasets import (
    INSTALL_HINT,
    DatasetNotFoundError,
    find_fashion_mnist,
    load_digits_28,
    load_fashion_mnist,
    load_idx,
)

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
          np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path, array, *, compress=False):
    """Write ``array`` in the IDX format (big-endian payload)."""
    array = np.asarray(array)
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    code = _CODES[np.dtype(big.dtype)]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    payload = header + big.tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)
    return path


def fake_fashion_dir(tmp_path, *, n_train=12, n_test=5, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labs = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", imgs, compress=compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labs, compress=compress)
        data[prefix] = (imgs, labs)
    return data


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_roundtrip(tmp_path, dtype, compress):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    p = write_idx(tmp_path / ("a-idx3" + (".gz" if compress else "")), a, compress=compress)
    b = load_idx(p)
    assert b.shape == (3, 4, 5)
    assert b.dtype == np.dtype(dtype)
    assert b.dtype.isnative
    np.testing.assert_array_equal(b, a)


def test_load_idx_vector_and_writable(tmp_path):
    p = write_idx(tmp_path / "labels-idx1-ubyte", np.arange(7, dtype=np.uint8))
    b = load_idx(p)
    np.testing.assert_array_equal(b, np.arange(7))
    b[0] = 99  # a private, writable copy
    assert load_idx(p)[0] == 0


def test_load_idx_bad_magic(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_idx(p)


def test_load_idx_unknown_type(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="unknown IDX element type 0x07"):
        load_idx(p)


def test_load_idx_truncated(tmp_path):
    p = tmp_path / "short"
    p.write_bytes(b"\x00\x00\x08\x02" + (4).to_bytes(4, "big") + (4).to_bytes(4, "big") + bytes(10))
    with pytest.raises(ValueError, match="truncated"):
        load_idx(p)


# --------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("compress", [True, False])
def test_load_fashion_mnist_from_directory(tmp_path, compress):
    data = fake_fashion_dir(tmp_path, compress=compress)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = load_fashion_mnist(tmp_path, split=split)
        imgs, labs = data[prefix]
        assert x.shape == imgs.shape and x.dtype == np.float32
        assert y.shape == labs.shape and y.dtype == np.int64
        assert 0.0 <= x.min() and x.max() <= 1.0
        np.testing.assert_allclose(x * 255.0, imgs, atol=1e-4)
        np.testing.assert_array_equal(y, labs)
    assert find_fashion_mnist(tmp_path) == tmp_path


def test_load_fashion_mnist_env_variable(tmp_path, monkeypatch):
    fake_fashion_dir(tmp_path, n_train=3, n_test=2)
    monkeypatch.setenv("SIGMADECOMP_FASHION_MNIST", str(tmp_path))
    x, _ = load_fashion_mnist(split="test")
    assert x.shape == (2, 28, 28)


def test_load_fashion_mnist_bad_split(tmp_path):
    fake_fashion_dir(tmp_path)
    with pytest.raises(ValueError, match="split='val'.*'train' or 'test'"):
        load_fashion_mnist(tmp_path, split="val")


def test_load_fashion_mnist_label_mismatch(tmp_path):
    fake_fashion_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8), compress=True)
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        load_fashion_mnist(tmp_path, split="test")


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist(tmp_path / "nowhere")
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "nowhere") in msg
    assert INSTALL_HINT in msg
    assert isinstance(info.value, FileNotFoundError)


def test_a_partial_copy_names_the_missing_files(tmp_path, monkeypatch):
    fake_fashion_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    monkeypatch.setenv("SIGMADECOMP_FASHION_MNIST", str(tmp_path))
    for call in (lambda: find_fashion_mnist(tmp_path), lambda: load_fashion_mnist(split="train")):
        with pytest.raises(DatasetNotFoundError) as info:
            call()
        msg = str(info.value)
        assert f"Fashion-MNIST in {tmp_path} is incomplete: train-labels-idx1-ubyte, " \
               "t10k-images-idx3-ubyte (or .gz) missing" in msg
        assert INSTALL_HINT in msg


def _real_fashion_dir():
    try:
        return find_fashion_mnist()
    except DatasetNotFoundError:
        return None


needs_fashion = pytest.mark.skipif(
    _real_fashion_dir() is None,
    reason="Fashion-MNIST is not installed: sudo apt-get install dataset-fashion-mnist",
)


@needs_fashion
def test_real_fashion_mnist():
    x, y = load_fashion_mnist(split="test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 1000))
    # the well-known pixel mean of Fashion-MNIST
    assert abs(float(x.mean()) - 0.286) < 0.01


# ------------------------------------------------------------------- digits


def test_digits_28():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    x, y = load_digits_28()
    assert x.shape == (1797, 28, 28) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    assert 0.0 <= x.min() and x.max() <= 1.0
    small = load_digits().images / 16.0
    # linear interpolation keeps the mean brightness (up to edge effects) and the layout
    np.testing.assert_allclose(x.mean(axis=(1, 2)), small.mean(axis=(1, 2)), atol=0.05)
    block = x[:, 1:27, 1:27].reshape(1797, 2, 13, 2, 13).mean(axis=(2, 4))
    coarse = small.reshape(1797, 2, 4, 2, 4).mean(axis=(2, 4))
    assert np.corrcoef(block.ravel(), coarse.ravel())[0, 1] > 0.95


# ------------------------------------------------------ torch-side helpers


def test_torch_fashion_mnist_subset(tmp_path):
    torch = pytest.importorskip("torch")
    from sigmadecomp_torch.data import fashion_mnist

    data = fake_fashion_dir(tmp_path)
    x, y = fashion_mnist("train", directory=tmp_path, limit=5, seed=3)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    x2, y2 = fashion_mnist("train", directory=tmp_path, limit=5, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # each returned image is the training image with the same label
    imgs, labs = data["train"]
    for xi, yi in zip(x, y):
        j = int(np.argmin(np.abs(imgs / 255.0 - xi[0].numpy()).sum(axis=(1, 2))))
        assert labs[j] == int(yi)
    with pytest.raises(ValueError, match="limit=0"):
        fashion_mnist("train", directory=tmp_path, limit=0)


def test_torch_digits():
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from sigmadecomp_torch.data import digits

    x, y = digits(limit=100)
    assert tuple(x.shape) == (100, 1, 28, 28) and len(y) == 100


def test_synthetic_images_statistics():
    torch = pytest.importorskip("torch")
    from sigmadecomp_torch.data import synthetic_images

    x = synthetic_images(64, (1, 16, 16), mean=0.4, std=0.2, seed=1)
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert abs(float(x.mean()) - 0.4) < 0.02
    assert abs(float(x.std()) - 0.2) < 0.03
    # smooth: neighbouring pixels are strongly correlated, white noise is not
    def neighbour_corr(z):
        a, b = z[..., :, :-1].flatten(), z[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert neighbour_corr(x) > 0.6
    assert abs(neighbour_corr(synthetic_images(64, (1, 16, 16), smoothness=0, seed=1))) < 0.1
    assert torch.equal(x, synthetic_images(64, (1, 16, 16), mean=0.4, std=0.2, seed=1))
    with pytest.raises(ValueError, match="shape="):
        synthetic_images(2, (16, 16))


def test_make_loader():
    torch = pytest.importorskip("torch")
    from sigmadecomp_torch.data import make_loader

    x = torch.arange(10.0).reshape(10, 1, 1, 1)
    y = torch.arange(10)
    batches = list(make_loader(x, y, batch_size=4, shuffle=True, seed=0))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    xs = torch.cat([b[0] for b in batches]).flatten()
    ys = torch.cat([b[1] for b in batches])
    assert torch.equal(xs.long(), ys)  # pairs stay together
    assert sorted(ys.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="batch_size=0"):
        make_loader(x, batch_size=0)
    with pytest.raises(ValueError, match="must match"):
        make_loader(x, y[:3])


def test_load_images_idx_directory(tmp_path):
    torch = pytest.importorskip("torch")
    from sigmadecomp_torch.data import load_images

    data = fake_fashion_dir(tmp_path, n_train=9, n_test=4)
    x, y = load_images(tmp_path)
    assert x.shape == (9, 1, 28, 28)  # the training split is preferred
    np.testing.assert_allclose(x[:, 0].numpy() * 255, data["train"][0], atol=1e-3)
    assert torch.equal(y, torch.from_numpy(data["train"][1].astype(np.int64)))
    x3, _ = load_images(tmp_path / "t10k-images-idx3-ubyte.gz", channels=3, limit=2)
    assert x3.shape == (2, 3, 28, 28)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(tmp_path / "missing")


def test_load_images_folder(tmp_path):
    pytest.importorskip("torch")
    Image = pytest.importorskip("PIL.Image")
    from sigmadecomp_torch.data import ImageFolder, load_images

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            arr = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    folder = ImageFolder(tmp_path, channels=3)
    assert folder.classes == ["cat", "dog"] and len(folder) == 6
    x0, y0 = folder[0]
    assert tuple(x0.shape) == (3, 10, 12) and y0 == 0
    first = np.asarray(Image.open(folder.samples[0][0]), dtype=np.float32) / 255
    np.testing.assert_allclose(x0.numpy().transpose(1, 2, 0), first, atol=1e-6)
    x, y = load_images(tmp_path, size=8, channels=1)
    assert tuple(x.shape) == (6, 1, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    with pytest.raises(ValueError, match="channels=2"):
        ImageFolder(tmp_path, channels=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFolder(empty)
