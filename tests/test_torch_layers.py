"""Factorized layers equal the convolution with the reconstructed kernel."""

import io
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp.results import CPResult, SVDResult, Tucker2Result  # noqa: E402
from sigmadecomp_torch import CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d  # noqa: E402

F64 = torch.float64



GEOMETRIES = [
    # kernel, stride, padding, dilation, padding_mode
    ((3, 3), (1, 1), (1, 1), (1, 1), "zeros"),
    ((3, 5), (2, 1), (1, 2), (1, 2), "zeros"),
    ((3, 3), (1, 2), (2, 0), (2, 1), "reflect"),
    ((2, 3), (1, 1), "same", (1, 1), "zeros"),
    ((3, 2), (1, 1), "same", (2, 1), "circular"),
    ((3, 3), (2, 2), "valid", (1, 1), "zeros"),
    ((5, 3), (3, 1), (2, 1), (1, 1), "replicate"),
]


def _conv(T, S, kernel, stride, padding, dilation, mode, bias=True, dtype=F64):
    g = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(S, T, kernel, stride=stride, padding=padding, dilation=dilation,
                     padding_mode=mode, bias=bias, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=dtype))
        if bias:
            conv.bias.copy_(torch.randn(T, generator=g, dtype=dtype))
    return conv


def _reference(conv, kernel, bias_shift=None):
    """A copy of ``conv`` whose weight is ``kernel``."""
    ref = _conv(conv.out_channels, conv.in_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.padding_mode,
                bias=conv.bias is not None or bias_shift is not None, dtype=conv.weight.dtype)
    with torch.no_grad():
        ref.weight.copy_(kernel.reshape(ref.weight.shape))
        if ref.bias is not None:
            b = conv.bias.clone() if conv.bias is not None else torch.zeros_like(ref.bias)
            ref.bias.copy_(b + (0 if bias_shift is None else bias_shift))
    return ref


def _close(a, b, tol=1e-10):
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert a.shape == b.shape
    assert err <= tol * scale, err


def _input(S, h=11, w=12, n=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, S, h, w, generator=g, dtype=F64)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
def test_tucker2_layer_matches_reconstructed_conv(geom, bias):
    conv = _conv(5, 4, *geom, bias=bias)
    H, W = conv.kernel_size
    res = Tucker2Result(core=_randn(3, 2, H, W, seed=1), out_factor=_randn(5, 3, seed=2),
                        in_factor=_randn(4, 2, seed=3))
    layer = Tucker2Conv2d.from_result(conv, res)
    assert layer.ranks == (3, 2)
    assert all(type(m) is nn.Conv2d for m in layer)
    x = _input(4)
    with torch.no_grad():
        _close(layer(x), _reference(conv, res.to_tensor())(x))


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
def test_cp_layer_matches_reconstructed_conv(geom, bias):
    conv = _conv(6, 3, *geom, bias=bias)
    H, W = conv.kernel_size
    res = CPResult(weights=_randn(4, seed=1),
                   factors=[_randn(d, 4, seed=2 + i) for i, d in enumerate((6, 3, H, W))])
    layer = CPConv2d.from_result(conv, res)
    assert layer.rank == 4
    x = _input(3)
    with torch.no_grad():
        _close(layer(x), _reference(conv, res.to_tensor())(x))


@pytest.mark.parametrize("geom", GEOMETRIES + [((1, 1), (2, 2), (0, 0), (1, 1), "zeros")])
def test_low_rank_conv_matches_reconstructed_conv(geom):
    conv = _conv(5, 4, *geom)
    H, W = conv.kernel_size
    res = SVDResult(left=_randn(5, 2, seed=1), right=_randn(2, 4 * H * W, seed=2),
                    singular_values=None, error=0.0, rank=2)
    layer = LowRankConv2d.from_result(conv, res)
    assert layer.rank == 2
    x = _input(4)
    with torch.no_grad():
        _close(layer(x), _reference(conv, res.to_tensor())(x))


@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_linear_matches_product(bias):
    lin = nn.Linear(7, 5, bias=bias, dtype=F64)
    L, R = _randn(5, 3, seed=1), _randn(3, 7, seed=2)
    layer = LowRankLinear(lin, L, R)
    x = _randn(4, 2, 7, seed=3)
    expect = x @ (L @ R).T + (lin.bias if bias else 0)
    with torch.no_grad():
        _close(layer(x), expect)


def test_bias_shift_is_added_to_the_bias():
    conv = _conv(5, 4, *GEOMETRIES[1], bias=False)
    H, W = conv.kernel_size
    res = Tucker2Result(core=_randn(2, 2, H, W), out_factor=_randn(5, 2, seed=1),
                        in_factor=_randn(4, 2, seed=2))
    shift = _randn(5, seed=9)
    layer = Tucker2Conv2d.from_result(conv, res, bias_shift=shift)
    x = _input(4)
    with torch.no_grad():
        _close(layer(x), _reference(conv, res.to_tensor(), shift)(x))
    cp = CPConv2d(conv, torch.ones(2, dtype=F64),
                  [_randn(d, 2, seed=i) for i, d in enumerate((5, 4, H, W))], bias_shift=shift)
    assert torch.equal(cp.last.bias, shift)


def test_numpy_factors_and_dtype_follow_the_layer():
    conv = nn.Conv2d(4, 6, 3, padding=1)  # float32
    rng = np.random.default_rng(0)
    layer = Tucker2Conv2d(conv, rng.standard_normal((3, 2, 3, 3)),
                          rng.standard_normal((6, 3)), rng.standard_normal((4, 2)))
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    assert torch.equal(layer.last.bias, conv.bias)
    assert layer.last.bias.data_ptr() != conv.bias.data_ptr()  # a copy, not shared


def test_bad_factors_and_grouped_convs_are_rejected():
    conv = _conv(5, 4, *GEOMETRIES[0])
    with pytest.raises(ValueError, match="do not fit"):
        Tucker2Conv2d(conv, _randn(3, 2, 3, 3), _randn(5, 2), _randn(4, 2))
    with pytest.raises(ValueError, match="do not fit"):
        CPConv2d(conv, _randn(2), [_randn(5, 2), _randn(4, 2), _randn(3, 2), _randn(2, 2)])
    with pytest.raises(ValueError, match="do not fit"):
        LowRankConv2d(conv, _randn(5, 2), _randn(2, 4))
    with pytest.raises(ValueError, match="do not fit"):
        LowRankLinear(nn.Linear(3, 2), _randn(2, 1), _randn(1, 4))
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        LowRankConv2d(grouped, _randn(4, 1), _randn(1, 18))
    with pytest.raises(TypeError, match="nn.Linear"):
        LowRankLinear(conv, _randn(5, 1), _randn(1, 36))


def _layers():
    conv = _conv(5, 4, *GEOMETRIES[2])
    H, W = conv.kernel_size
    yield Tucker2Conv2d(conv, _randn(3, 2, H, W), _randn(5, 3, seed=1), _randn(4, 2, seed=2))
    yield CPConv2d(conv, _randn(3), [_randn(d, 3, seed=i) for i, d in enumerate((5, 4, H, W))])
    yield LowRankConv2d(conv, _randn(5, 2), _randn(2, 4 * H * W, seed=1))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("index", [0, 1, 2])
def test_torchscript_and_state_dict_round_trip(index):
    layer = list(_layers())[index]
    x = _input(4)
    with torch.no_grad():
        y = layer(x)
        scripted = torch.jit.script(layer)
        _close(scripted(x), y, 1e-13)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        _close(torch.jit.load(buf)(x), y, 1e-13)
        # a layer of the same architecture, other weights, takes the state dict
        other = list(_layers())[index]
        for p in other.parameters():
            p.add_(1.0)
        assert float((other(x) - y).abs().max()) > 1e-3
        other.load_state_dict(layer.state_dict())
        _close(other(x), y, 0)


def test_parameter_counts_match_the_rank_formulas():
    from sigmadecomp.ranks import layer_params

    conv = nn.Conv2d(8, 6, (3, 5), bias=False)
    t = Tucker2Conv2d(conv, torch.zeros(4, 3, 3, 5), torch.zeros(6, 4), torch.zeros(8, 3))
    c = CPConv2d(conv, torch.ones(5), [torch.zeros(d, 5) for d in (6, 8, 3, 5)])
    s = LowRankConv2d(conv, torch.zeros(6, 2), torch.zeros(2, 8 * 15))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(t) == layer_params((6, 8, 3, 5), "tucker2", (4, 3))
    assert count(c) == layer_params((6, 8, 3, 5), "cp", 5)
    assert count(s) == layer_params((6, 8, 3, 5), "svd", 2)
    for a, b in itertools.combinations([count(t), count(c), count(s)], 2):
        assert a != b
