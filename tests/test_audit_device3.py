"""Device audit: arrays the library creates follow the input's device.

No GPU is needed: with torch's default device set to ``meta``, a tensor made
without an explicit ``device=`` lands on ``meta``; mixed with the CPU inputs it
raises, or it comes back in the result on the wrong device. On a GPU the same
line would put a CPU tensor next to CUDA ones.
"""

import contextlib
import warnings

import numpy as np
import pytest

import sigmadecomp as sd
from sigmadecomp import CompressionWarning, ConvergenceWarning

torch = pytest.importorskip("torch")


@contextlib.contextmanager
def meta_default_device():
    """Tensors made without ``device=`` land on ``meta`` inside the block."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device("cpu")


def _low_rank_sigma(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(k, n, generator=g, dtype=dtype)
    return X.T @ X


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_svd_zero_padding_stays_on_the_weight_device(dtype):
    # sigma of rank 2 sees fewer directions than rank 4: the factors are padded with zeros
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 6, generator=g, dtype=dtype)
    S = _low_rank_sigma(6, 2, dtype)
    expected = sd.sigma_svd(W, 4, S, ridge=0)
    with meta_default_device():
        res = sd.sigma_svd(W, 4, S, ridge=0)
    for name in ("left", "right", "singular_values"):
        assert getattr(res, name).device == W.device, name
    assert res.left.shape == (5, 4) and res.right.shape == (4, 6)
    assert torch.equal(res.left[:, 2:], torch.zeros(5, 2, dtype=dtype))
    assert torch.equal(res.right[2:], torch.zeros(2, 6, dtype=dtype))
    assert torch.allclose(res.to_tensor(), expected.to_tensor())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_svd_zero_sigma_stays_on_the_weight_device(dtype):
    # a zero sigma sees nothing: the approximation is zero, made on the weight's device
    W = torch.ones(3, 4, dtype=dtype)
    S = torch.zeros(4, 4, dtype=dtype)
    with meta_default_device():
        res = sd.sigma_svd(W, 2, S, ridge=0)
    for name in ("left", "right", "singular_values"):
        assert getattr(res, name).device == W.device, name
    assert res.left.dtype == dtype and res.right.dtype == dtype
    assert torch.count_nonzero(res.to_tensor()) == 0
    assert res.singular_values.shape == (0,)


@pytest.mark.parametrize("method", ["whiten", "null_energy"])
def test_psd_root_takes_float32_torch_weights_like_numpy_ones(method):
    # the root is float64; a float32 weight is taken to it (NumPy promotes, torch did not)
    S = _low_rank_sigma(6, 3, torch.float64)
    root = sd.psd_root(S)
    g = torch.Generator().manual_seed(2)
    W32 = torch.randn(4, 6, generator=g, dtype=torch.float32)
    got = getattr(root, method)(W32)
    want = getattr(root, method)(W32.double())
    assert got.dtype == torch.float64 and got.device == W32.device
    assert torch.equal(got, want)
    root_np = sd.psd_root(S.numpy())
    assert np.allclose(getattr(root_np, method)(W32.numpy()), want.numpy(), rtol=1e-10, atol=1e-12)


def test_psd_root_unwhiten_takes_float32_torch_arrays():
    S = _low_rank_sigma(6, 3, torch.float64)
    root = sd.psd_root(S)
    Y = torch.ones(2, root.rank, dtype=torch.float32)
    got = root.unwhiten(Y)
    assert got.dtype == torch.float64
    assert torch.equal(got, root.unwhiten(Y.double()))


def _on_cpu(*arrays):
    return all(a.device == torch.device("cpu") for a in arrays)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ridge", [0.0, None])
def test_core_solvers_make_nothing_off_the_input_device(dtype, ridge):
    # a singular sigma (fewer samples than inputs) takes the floored / padded branches
    g = torch.Generator().manual_seed(3)
    K = torch.randn(5, 3, 3, 3, generator=g, dtype=dtype)
    S = _low_rank_sigma(27, 6, dtype)
    kw = {} if ridge is None else {"ridge": ridge}
    with meta_default_device():
        runs = [sd.sigma_svd(K.reshape(5, -1), 4, S, **kw)]
        for init in ("frobenius", "whitened", "random"):
            runs.append(sd.tucker2(K, (3, 2), S, init=init, n_iter_max=2, **kw))
        for init in ("svd", "random"):
            runs.append(sd.cp(K, 4, S, init=init, n_iter_max=2, **kw))
        runs.append(sd.tt_conv(K, 2, S, n_iter_max=2, **kw))
        approx = [r.to_tensor() for r in runs]
    for r, a in zip(runs, approx):
        assert _on_cpu(a, *[f for f in r.factors if hasattr(f, "device")])
        assert a.dtype == dtype
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
def test_compress_makes_nothing_off_the_model_device(method):
    from torch import nn

    from sigmadecomp_torch import collect_covariances, compress

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 6, 1), nn.Flatten(), nn.Linear(6 * 16, 4)).eval()
    data = [torch.randn(2, 3, 4, 4)]
    stats = collect_covariances(model, data, progress=False)
    with meta_default_device(), warnings.catch_warnings():
        # (random weights at tiny ranks, two sweeps)
        warnings.simplefilter("ignore", CompressionWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        small, report = compress(model, method, covariances=stats, ratio=2, centered=True,
                                 options={"n_iter_max": 2}, progress=False)
        out = small(data[0])
    assert all(_on_cpu(p) for p in small.parameters())
    assert _on_cpu(out) and out.shape == (2, 4)
    assert report.layers and all(r["sigma_error"] is not None for r in report.layers)


def test_adapter_randoms_and_shrinkage_make_nothing_off_the_model_device():
    # position_fraction's mask, the (h, w, c) -> (c, h, w) reordering and the BatchNorm
    # statistics' shrinkage draw or build on an explicit device, whatever torch's default
    # device is (layer_latency's input likewise; torch's own timer does not run under meta)
    from torch import nn

    from sigmadecomp_torch import collect_covariances, covariances_from_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(10)
    data = [torch.randn(2, 3, 6, 6)]
    with meta_default_device():
        stats = collect_covariances(model, data, progress=False, position_fraction=0.5, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bn, _ = covariances_from_batchnorm(model, input_shape=(3, 6, 6))
    assert stats and all(_on_cpu(s.sigma) for s in stats.values())
    assert bn and all(_on_cpu(s.sigma) and torch.isfinite(s.sigma).all() for s in bn.values())
