"""Proposition 1 (Kalle et al., NeurIPS 2025), checked on data.

For any convolution (channels, kernel size, stride, padding, dilation, bias),
any inputs and any kernel change ``D = K - K~``, the mean over samples and
output positions of ``||Conv_K(x) - Conv_K~(x)||^2`` equals
``sigma_norm(D, sigma)**2`` with ``sigma`` from :func:`collect_covariances` on
the same inputs. With the bias corrected by ``D mu`` the error is
``tr(D C D^T)``, ``C`` the centered covariance.
"""

import pytest

torch = pytest.importorskip("torch")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from sigmadecomp import sigma_norm  # noqa: E402
from sigmadecomp_torch import collect_covariances  # noqa: E402

F64 = torch.float64




@st.composite
def conv_cases(draw):
    S = draw(st.integers(1, 4))
    T = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([g for g in (1, 2) if S % g == 0 and T % g == 0]))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if stride == (1, 1) and draw(st.booleans()):
        padding = "same"
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    if mode == "reflect" and padding != "same":  # reflect needs padding < input size
        padding = (min(padding[0], 1), min(padding[1], 1))
    H = dh * (kh - 1) + 1 + draw(st.integers(1, 5))
    W = dw * (kw - 1) + 1 + draw(st.integers(1, 5))
    return dict(S=S, T=T, groups=groups, kernel=(kh, kw), dilation=(dh, dw), stride=stride,
                padding=padding, mode=mode, bias=draw(st.booleans()),
                N=draw(st.integers(1, 3)), H=H, W=W, seed=draw(st.integers(0, 2 ** 16)),
                shift=draw(st.floats(-1.0, 1.0)))


def _make(case):
    g = torch.Generator().manual_seed(case["seed"])
    conv = nn.Conv2d(case["S"], case["T"], case["kernel"], stride=case["stride"],
                     padding=case["padding"], dilation=case["dilation"],
                     groups=case["groups"], bias=case["bias"],
                     padding_mode=case["mode"], dtype=F64)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=F64))
        if case["bias"]:
            conv.bias.copy_(torch.randn(case["T"], generator=g, dtype=F64))
    x = torch.randn(case["N"], case["S"], case["H"], case["W"], generator=g, dtype=F64)
    x = x + case["shift"]  # a non-zero mean makes the centered variant differ
    delta = 0.3 * torch.randn(conv.weight.shape, generator=g, dtype=F64)
    return conv, x, delta


def _perturbed(conv, delta, bias_shift=None):
    other = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                      stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                      dtype=F64)
    with torch.no_grad():
        other.weight.copy_(conv.weight - delta)
        b = conv.bias.clone() if conv.bias is not None else torch.zeros(conv.out_channels,
                                                                        dtype=F64)
        other.bias.copy_(b if bias_shift is None else b + bias_shift)
    return other


def _mse(y, z):
    """Mean over samples and output positions of the squared output-vector change."""
    N, T = y.shape[:2]
    L = y[0, 0].numel()
    return float(((y - z) ** 2).sum()) / (N * L)


def _expected(delta, stats, groups, centered=False):
    """sum_g ||D_g||^2 in the (centered) Sigma-norm of group g."""
    S = stats.centered() if centered else stats.sigma
    if groups == 1:
        return float(sigma_norm(delta.reshape(delta.shape[0], -1), S)) ** 2
    Tg = delta.shape[0] // groups
    return sum(float(sigma_norm(delta[g * Tg:(g + 1) * Tg].reshape(Tg, -1), S[g])) ** 2
               for g in range(groups))


def _bias_shift(delta, stats, groups):
    Tg = delta.shape[0] // groups
    mean = stats.mean if groups > 1 else stats.mean[None]
    return torch.cat([delta[g * Tg:(g + 1) * Tg].reshape(Tg, -1) @ mean[g]
                      for g in range(groups)])


@given(conv_cases())
def test_output_error_equals_sigma_norm(case):
    conv, x, delta = _make(case)
    stats = collect_covariances(conv, [x[:1], x[1:]] if case["N"] > 1 else [x],
                                progress=False)[""]
    with torch.no_grad():
        mse = _mse(conv(x), _perturbed(conv, delta)(x))
    assert mse == pytest.approx(_expected(delta, stats, conv.groups), rel=1e-10, abs=1e-12)


@given(conv_cases())
def test_bias_corrected_output_error_equals_centered_norm(case):
    conv, x, delta = _make(case)
    stats = collect_covariances(conv, [x], progress=False)[""]
    shift = _bias_shift(delta, stats, conv.groups)
    with torch.no_grad():
        mse = _mse(conv(x), _perturbed(conv, delta, shift)(x))
    expect = _expected(delta, stats, conv.groups, centered=True)
    assert mse == pytest.approx(expect, rel=1e-9, abs=1e-11)
    # the correction never hurts
    assert expect <= _expected(delta, stats, conv.groups) * (1 + 1e-12) + 1e-12


@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3), st.integers(0, 2 ** 16),
       st.booleans())
def test_linear_output_error_equals_sigma_norm(n, T, extra, seed, bias):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n, T, bias=bias, dtype=F64)
    x = torch.randn(3, extra, n, generator=g, dtype=F64) + 0.5
    delta = torch.randn(T, n, generator=g, dtype=F64)
    stats = collect_covariances(lin, [x], progress=False)[""]
    with torch.no_grad():
        y = lin(x)
        z = torch.nn.functional.linear(x, lin.weight - delta, lin.bias)
        mse = float(((y - z) ** 2).sum()) / (3 * extra)
        zc = z + delta @ stats.mean
        mse_c = float(((y - zc) ** 2).sum()) / (3 * extra)
    assert mse == pytest.approx(float(sigma_norm(delta, stats.sigma)) ** 2, rel=1e-10, abs=1e-12)
    assert mse_c == pytest.approx(float(sigma_norm(delta, stats.centered())) ** 2,
                                  rel=1e-9, abs=1e-11)


def test_one_by_one_conv_and_a_deep_layer():
    """1x1 conv inside a model: the statistic is of that layer's own input."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(5, 4, 1, stride=2)).double()
    x = torch.randn(4, 2, 7, 7, dtype=F64)
    stats = collect_covariances(model, [x], progress=False)["2"]
    delta = torch.randn(4, 5, 1, 1, dtype=F64)
    with torch.no_grad():
        h = model[1](model[0](x))
        mse = _mse(model[2](h), _perturbed(model[2], delta)(h))
    assert mse == pytest.approx(float(sigma_norm(delta, stats.sigma)) ** 2, rel=1e-10)
    assert mse > 0.01  # not a vacuous comparison
