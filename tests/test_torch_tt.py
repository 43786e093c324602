import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from sigmadecomp import relative_sigma_error, tt_conv, tt_linear  # noqa: E402
from sigmadecomp.tt import tt_mac_count, tt_param_count  # noqa: E402
from sigmadecomp_torch.tt_layers import TTConv2d, TTLinear, tt_compress_module  # noqa: E402




CONV_CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=(3, 1), padding=(1, 0), stride=(1, 2)),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding="same", padding_mode="circular"),
    dict(kernel_size=1),
]


def patch_sigma(conv, x):
    """Second moment of the conv's input patches in (s, h, w) order."""
    if conv.padding_mode != "zeros":
        raise ValueError("zeros padding only in this helper")
    U = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                 stride=conv.stride)
    U = U.transpose(1, 2).reshape(-1, U.shape[1]).double()
    return (U.T @ U / U.shape[0]).numpy()


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_tt_conv_layer_equals_reconstructed_kernel(case):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 6, **case).double()
    res = tt_conv(conv.weight.detach(), (3, 4), in_modes=(2, 6), out_modes=(2, 3))
    layer = TTConv2d.from_result(conv, res)
    x = torch.randn(2, 12, 9, 8, dtype=torch.float64)
    ref = conv._conv_forward(x, res.to_tensor(), conv.bias)
    out = layer(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.kernel(), res.to_tensor(), rtol=0, atol=1e-12)
    assert (layer.bias is None) == (conv.bias is None)
    assert layer.stride == conv.stride and layer.dilation == conv.dilation


def test_full_rank_tt_conv_layer_reproduces_the_conv():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    res = tt_conv(conv.weight.detach(), 100, in_modes=(2, 2), out_modes=(3, 2))
    layer = TTConv2d.from_result(conv, res)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-10)


def test_tt_linear_layer_equals_reconstructed_weight():
    torch.manual_seed(0)
    lin = nn.Linear(24, 10).double()
    res = tt_linear(lin.weight.detach(), (2, 3), in_modes=(2, 3, 4), out_modes=(1, 2, 5))
    layer = TTLinear.from_result(lin, res)
    x = torch.randn(3, 4, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, res.to_tensor(), lin.bias), rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.weight(), res.to_tensor(), rtol=0, atol=1e-12)
    nob = nn.Linear(24, 10, bias=False).double()
    res = tt_linear(nob.weight.detach(), 2, in_modes=(2, 3, 4), out_modes=(1, 2, 5))
    layer = TTLinear.from_result(nob, res)
    assert layer.bias is None


def test_float32_layers_follow_module_dtype():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    res = tt_conv(conv.weight.detach().double(), (4, 6), in_modes=(2, 4), out_modes=(2, 4))
    layer = TTConv2d.from_result(conv, res)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    x = torch.randn(2, 8, 6, 6)
    ref = F.conv2d(x.double(), res.to_tensor(), conv.bias.double(), padding=1)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-4, atol=1e-5)


def test_from_result_rejects_mismatches():
    conv = nn.Conv2d(8, 8, 3, groups=2)
    res = tt_conv(torch.randn(8, 4, 3, 3, dtype=torch.float64), 2, in_modes=(2, 2), out_modes=(2, 4))
    with pytest.raises(ValueError, match="groups=2"):
        TTConv2d.from_result(conv, res)
    with pytest.raises(ValueError, match="shape"):
        TTConv2d.from_result(nn.Conv2d(4, 8, 1), res)
    lres = tt_linear(torch.randn(8, 4, dtype=torch.float64), 2, in_modes=(2, 2), out_modes=(2, 4))
    with pytest.raises(ValueError, match="kind 'conv'"):
        TTConv2d.from_result(nn.Conv2d(4, 8, 1), lres)
    with pytest.raises(ValueError, match="kind 'matrix'"):
        TTLinear.from_result(nn.Linear(4, 8), res)
    with pytest.raises(TypeError, match="nn.Linear"):
        TTLinear.from_result(nn.Conv2d(4, 8, 1), lres)


def test_compress_conv_with_sigma_report_and_data_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, stride=2).double()
    x = torch.relu(torch.randn(16, 8, 8, 8, dtype=torch.float64) + 0.3)
    x = x + 0.5 * x.roll(1, dims=1)  # correlated channels
    sigma = patch_sigma(conv, x)
    new_f, info_f = tt_compress_module(conv, ranks=(3, 4), in_modes=(2, 4), out_modes=(2, 4),
                                       out_hw=(4, 4))
    new_s, info_s = tt_compress_module(conv, ranks=(3, 4), sigma=sigma, in_modes=(2, 4),
                                       out_modes=(2, 4), out_hw=(4, 4), n_iter_max=10, ridge=0)
    for info, new in ((info_f, new_f), (info_s, new_s)):
        assert info["method"] == "tt" and info["ranks"] == (3, 4)
        assert info["params_before"] == sum(p.numel() for p in conv.parameters())
        assert info["params_after"] == sum(p.numel() for p in new.parameters())
        assert info["params_after"] == tt_param_count((2, 4), (2, 4), (3, 4), kernel_size=(3, 3)) + 8
        assert info["macs_before"] == 8 * 8 * 9 * 16
        assert info["macs_after"] == tt_mac_count((2, 4), (2, 4), (3, 4), kernel_size=(3, 3),
                                                  out_hw=(4, 4))
        assert info["seconds"] >= 0 and isinstance(info["rel_frobenius_error"], float)
    assert info_f["rel_sigma_error"] is None and info_f["n_iter"] is None  # the TT-SVD alone
    assert info_s["rel_sigma_error"] == pytest.approx(info_s["errors"][-1], rel=1e-9)
    assert info_s["rel_sigma_error"] <= info_s["errors"][0]
    # Proposition 1: the Sigma-error is the output error on the calibration data
    out_err = {}
    for name, new in (("frob", new_f), ("sigma", new_s)):
        d = (conv(x) - new(x)).pow(2).sum(dim=1).mean().item()
        out_err[name] = d
    assert out_err["sigma"] < out_err["frob"]
    w = conv.weight.detach()
    d_s = relative_sigma_error(w, new_s.kernel().detach(), sigma) ** 2
    base = float(np.sum((w.reshape(8, -1).numpy() @ sigma) * w.reshape(8, -1).numpy()))
    assert out_err["sigma"] == pytest.approx(d_s * base, rel=1e-8)
    assert new_s.training == conv.training


def test_compress_conv_macs_match_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1, stride=2)
    new, info = tt_compress_module(conv, ranks=(4, 5), out_hw=(4, 4))
    x = torch.randn(1, 16, 8, 8)
    with FlopCounterMode(display=False) as fc:
        new(x)
    assert fc.get_total_flops() // 2 == info["macs_after"]
    with FlopCounterMode(display=False) as fc:
        conv(x)
    assert fc.get_total_flops() // 2 == info["macs_before"]
    _, info = tt_compress_module(conv, ranks=(4, 5))
    assert info["macs_before"] is None and info["macs_after"] is None


def test_compress_linear_ratio_and_sigma():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    X = torch.randn(500, 64) @ torch.randn(64, 64) * torch.linspace(0.1, 2, 64)
    sigma = (X.T.double() @ X.double() / 500)
    new, info = tt_compress_module(lin, ratio=4, sigma=sigma)
    assert isinstance(new, TTLinear) and new.cores[0].dtype == torch.float32
    assert (64 * 32) / tt_param_count(info["in_modes"], info["out_modes"], info["ranks"]) >= 4
    assert info["macs_before"] == 64 * 32
    assert info["rel_sigma_error"] <= info["errors"][0] + 1e-12
    y = new(X)
    assert y.shape == (500, 32)


def test_compress_module_rejects_bad_requests():
    with pytest.raises(ValueError, match="groups=4"):
        tt_compress_module(nn.Conv2d(8, 8, 3, groups=4), ranks=2)
    with pytest.raises(TypeError, match="nn.Conv2d or nn.Linear"):
        tt_compress_module(nn.Conv1d(8, 8, 3), ranks=2)
    with pytest.raises(TypeError, match="nn.Conv2d or nn.Linear"):
        tt_compress_module(nn.ReLU(), ranks=2)
    with pytest.raises(ValueError, match="not both"):
        tt_compress_module(nn.Linear(8, 8), ranks=2, ratio=2)
    with pytest.raises(TypeError, match="unexpected options"):
        tt_compress_module(nn.Linear(8, 8), ranks=2, rank_tol=0.1)


def test_layers_script_trace_and_compile():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect")
    lin = nn.Linear(24, 10)
    for mod, x in ((conv, torch.randn(2, 8, 6, 6)), (lin, torch.randn(3, 5, 24))):
        new, _ = tt_compress_module(mod, ratio=2)
        ref = new(x)
        torch.testing.assert_close(torch.jit.script(new)(x), ref)
        torch.testing.assert_close(torch.jit.trace(new, (x,))(x), ref)
        torch.testing.assert_close(torch.compile(new, backend="eager")(x), ref)


def test_bias_shift_and_plugin_functions():
    from sigmadecomp_torch.tt_layers import tt_build, tt_decompose

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1, bias=False).double()
    res = tt_decompose(conv.weight.detach(), (3, 4), None, {"in_modes": (2, 4)})
    assert res.out_modes == (2, 2)
    shift = torch.randn(4, dtype=torch.float64)
    layer = tt_build(conv, res, shift)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    ref = F.conv2d(x, res.to_tensor(), shift, padding=1)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-10)
    lin = nn.Linear(12, 6).double()
    lres = tt_decompose(lin.weight.detach(), 2, torch.eye(12, dtype=torch.float64), {"n_iter_max": 1})
    layer = tt_build(lin, lres, shift[:2].repeat(3))
    z = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(z), F.linear(z, lres.to_tensor(), lin.bias + shift[:2].repeat(3)),
                               rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="ndim=3"):
        tt_decompose(torch.zeros(2, 2, 2, dtype=torch.float64), 1)
    with pytest.raises(TypeError, match="nn.Conv2d or nn.Linear"):
        tt_build(nn.ReLU(), lres)


def test_tt_conv_chunked_batches_give_the_same_output():
    # large batches run in chunks of samples (bounded memory); the output must not change
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1, stride=2).double()
    res = tt_conv(conv.weight.detach(), (5, 3), in_modes=(4, 4), out_modes=(2, 4))
    layer = TTConv2d.from_result(conv, res)
    x = torch.randn(7, 16, 9, 9, dtype=torch.float64)
    whole = layer(x)
    assert layer._chunk_size(x) >= 7  # the default bound keeps this batch whole
    layer.max_chunk_elements = 3 * (9 + 6) ** 2 * 16 * 5  # three samples: (h + 2k)(w + 2k) S r_0 each
    assert layer._chunk_size(x) == 3
    torch.testing.assert_close(layer(x), whole, rtol=0, atol=1e-13)
    layer.max_chunk_elements = 1  # one sample per chunk
    assert layer._chunk_size(x) == 1
    torch.testing.assert_close(layer(x), whole, rtol=0, atol=1e-13)
    ref = torch.nn.functional.conv2d(x, layer.kernel(), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(whole, ref, rtol=0, atol=1e-12)
    # a script compiled from the chunking layer runs whole batches, same values
    torch.testing.assert_close(torch.jit.script(layer)(x), whole, rtol=0, atol=1e-13)


def test_from_result_old_argument_order_warns_and_builds_the_same_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1).double()
    res = tt_conv(conv.weight.detach(), in_modes=(2, 4), out_modes=(2, 2), ranks=(3, 4))
    with pytest.warns(DeprecationWarning, match=r"from_result\(module, result\)"):
        old = TTConv2d.from_result(res, conv)
    new = TTConv2d.from_result(conv, res)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)
    lin = nn.Linear(12, 6).double()
    lres = tt_linear(lin.weight.detach(), in_modes=(3, 4), out_modes=(2, 3), ranks=2)
    with pytest.warns(DeprecationWarning, match="TTLinear.from_result"):
        old = TTLinear.from_result(lres, lin)
    z = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(old(z), TTLinear.from_result(lin, lres)(z), rtol=0, atol=0)


def test_tt_conv_takes_unbatched_input_like_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    new, _ = tt_compress_module(conv, ratio=2)
    x = torch.randn(8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(new(x), new(x[None])[0], rtol=0, atol=0)
        assert new(x).shape == conv(x).shape
        with pytest.raises(ValueError, match=r"3D \(unbatched\) or 4D \(batched\) input"):
            new(torch.randn(2, 2, 8, 6, 6))
    scripted = torch.jit.script(new)
    torch.testing.assert_close(scripted(x), new(x))


def test_compress_reports_the_tt_ranks_it_used_and_warns_when_it_clipped_them():
    from sigmadecomp import CompressionWarning
    from sigmadecomp_torch import compress

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    with pytest.warns(CompressionWarning, match=r"TT ranks \(400, 4\) .* clipped to \(9, 4\)"):
        small, report = compress(model, "tt", ranks={"1": (400, 4)}, progress=False)
    assert report.layers[0]["ranks"] == (9, 4) == small[1].ranks
    # ranks the core keeps as given: no warning, the same ranks in the report
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)
        small, report = compress(model, "tt", ranks={"1": (3, 4)}, progress=False)
    assert report.layers[0]["ranks"] == (3, 4) == small[1].ranks
