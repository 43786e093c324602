"""Regression tests from the audit of the BatchNorm statistics, shrinkage, report, CLI,
latency, quantization, TT layers and ViT helpers."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sigmadecomp import CompressionWarning
from sigmadecomp_torch import cli, covariances_from_batchnorm

from _helpers import write_idx

torch.set_num_threads(1)


# ------------------------------------------------------ covariances_from_batchnorm


def _bn_net(track=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=track),
                         nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(),
                         nn.Linear(4, 3))


def _trained(model):
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 5))
    return model.eval()


def test_bn_never_updated_statistics_are_named_in_a_warning_and_the_report():
    model = _bn_net().eval()
    with pytest.warns(CompressionWarning, match=r"\['1', '4'\] were never updated") as rec:
        _, report = covariances_from_batchnorm(model, spatial="kernel")
    assert rec[0].filename == __file__  # (attributed to the caller's line)
    assert any("were never updated" in n and "['3', '6']" in n for n in report.notes)
    assert "note: BatchNorm layers ['1', '4'] were never updated" in repr(report)
    # trained (or loaded) statistics: no note, no warning
    model = _trained(_bn_net())
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)
        _, report = covariances_from_batchnorm(model, spatial="kernel")
    assert report.notes == [] and sorted(report.modelled) == ["3", "6"]
    # statistics loaded into a fresh model (num_batches_tracked still 0) are real ones
    fresh = _bn_net().eval()
    state = model.state_dict()
    state = {k: (torch.zeros_like(v) if k.endswith("num_batches_tracked") else v)
             for k, v in state.items()}
    fresh.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)
        covariances_from_batchnorm(fresh, spatial="kernel")


def test_bn_training_mode_is_named_and_untracked_statistics_are_skipped():
    model = _trained(_bn_net()).train()
    with pytest.warns(CompressionWarning, match=r"\['1', '4'\] are in training mode"):
        _, report = covariances_from_batchnorm(model, spatial="kernel")
    assert any("model.eval()" in n for n in report.notes)
    assert all(m.training for m in model.modules())  # (left as given)
    # no running statistics: the layer it feeds is reported, not modelled
    model = _bn_net(track=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        stats, report = covariances_from_batchnorm(model, spatial="kernel")
    assert "3" not in stats and "does not track running statistics" in report.skipped["3"]


# ----------------------------------------------------------------------- CLI


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, dirs, files in os.walk(root) for f in dirs + files)


def test_cli_refused_run_leaves_no_directories(tmp_path):
    torch.manual_seed(0)
    model_path = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)), model_path)
    before = _tree(tmp_path)
    refused = [
        # refused once the outputs' paths are checked: a bad --save-stats suffix, --n-iter
        # with svd; and --save-stats without statistics to save
        ["--save-stats", str(tmp_path / "new" / "s.npz"), "--data", str(tmp_path)],
        ["--method", "svd", "--frobenius", "--ratio", "2", "--n-iter", "3"],
        ["--frobenius", "--ratio", "2", "--save-stats", str(tmp_path / "deep" / "s.pt")],
    ]
    for extra in refused:
        argv = ["compress", str(model_path), "--out", str(tmp_path / "a" / "b" / "o.pt"),
                "--no-progress"]
        if "--method" not in extra:
            argv += ["--method", "tucker2", "--ratio", "2"]
        with pytest.raises(SystemExit) as info:
            cli.main(argv + extra)
        assert info.value.code == 2, info.value.code
        assert _tree(tmp_path) == before
    # the output is the model itself, in a directory to be made: refused, nothing made
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", str(model_path), "--method", "svd", "--frobenius", "--ratio",
                  "2", "--out", str(tmp_path / "x" / ".." / "m.pt"), "--no-progress"])
    assert info.value.code == 2 and _tree(tmp_path) == before
    # more --latency-batch than --data has images: refused before the statistics are saved
    idx = tmp_path / "idx"
    idx.mkdir()
    write_idx(idx / "train-images-idx3-ubyte",
              np.random.default_rng(0).integers(0, 256, (4, 8, 8)))
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", str(model_path), "--method", "svd", "--ratio", "2", "--data",
                  str(idx), "--save-stats", str(tmp_path / "st" / "s.pt"), "--min-speedup",
                  "1", "--latency-batch", "8", "--out", str(tmp_path / "o" / "o.pt"),
                  "--no-progress"])
    assert info.value.code == 2 and _tree(tmp_path) == before
    # a file in the way of the directories: refused with the reason, nothing made
    (tmp_path / "afile").write_text("x")
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", str(model_path), "--method", "svd", "--frobenius", "--ratio",
                  "2", "--out", str(tmp_path / "afile" / "sub" / "o.pt"), "--no-progress"])
    assert "cannot create its directory" in str(info.value) and _tree(tmp_path) == before


def test_cli_accepted_run_still_makes_the_output_directories(tmp_path):
    torch.manual_seed(0)
    model_path = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                             nn.Conv2d(4, 2, 1)), model_path)
    out = tmp_path / "a" / "b" / "o.pt"
    assert cli.main(["compress", str(model_path), "--method", "svd", "--frobenius",
                     "--ratio", "1.2", "--layers", "2", "--out", str(out),
                     "--no-progress"]) == 0
    assert out.is_file() and (tmp_path / "a" / "b" / "o.report.json").is_file()


def test_cli_empty_out_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", str(tmp_path / "m.pt"), "--method", "svd", "--frobenius",
                  "--ratio", "2", "--out", ""])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--out='' is empty; give a file name" in err and "separator" not in err


# ------------------------------------------------------------ shrink_covariances


def test_output_moments_warns_of_a_never_updated_batchnorm():
    from sigmadecomp_torch import LayerStats
    from sigmadecomp_torch.transfer import output_moments, shrink_covariances

    model = _bn_net().eval()  # fresh: running mean 0, variance 1
    with pytest.warns(CompressionWarning, match=r"\['1', '4'\] after the layers \['0', '3'\] "
                                                 "were never updated") as rec:
        targets, reasons = output_moments(model, ["0", "3"])
    assert rec[0].filename == __file__
    assert sorted(targets) == ["0", "3"] and reasons == {}
    stats = {"0": LayerStats(torch.eye(5, dtype=torch.float64),
                             torch.zeros(5, dtype=torch.float64), 10)}
    with pytest.warns(CompressionWarning, match=r"\['1'\] after the layers \['0'\]") as rec:
        shrink_covariances(stats, "moments", model=model)
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)
        targets, reasons = output_moments(_trained(_bn_net()), ["0", "3"])
    assert sorted(targets) == ["0", "3"] and reasons == {}


def test_moment_targets_name_the_bad_value():
    from sigmadecomp.shrinkage import match_moments, moment_alpha

    K, S = np.eye(3), np.eye(3)
    with pytest.raises(ValueError, match=r"target\[1\]=-2\.0 is not allowed"):
        match_moments(K, S, np.array([1.0, -2.0, 1.0]))
    with pytest.raises(ValueError, match=r"target\[2\]=nan is not allowed"):
        moment_alpha(K, S, np.array([1.0, 1.0, np.nan]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_match_moments_torch_and_numpy_agree_and_inputs_kept(dtype):
    from sigmadecomp.shrinkage import match_moments

    rng = np.random.default_rng(0)
    K = rng.standard_normal((4, 6))
    X = rng.standard_normal((50, 6))
    S = X.T @ X / 50
    t = np.array([1.0, 2.0, 0.5, 1.5])
    St, Kt, tt = (torch.tensor(a, dtype=dtype) for a in (S, K, t))
    saved = [a.clone() for a in (St, Kt, tt)]
    out_t = match_moments(Kt, St, tt)
    out_n = match_moments(K, S, t)
    assert isinstance(out_t.sigma, torch.Tensor) and out_t.sigma.dtype == dtype
    assert all(torch.equal(a, b) for a, b in zip(saved, (St, Kt, tt)))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(out_t.sigma.double().numpy(), out_n.sigma, atol=tol)
    energies = np.diag(K @ out_n.sigma @ K.T) / out_n.scale
    np.testing.assert_allclose(energies, t, rtol=1e-8)


# ---------------------------------------------------------------------- latency


def test_layer_latency_refuses_a_fractional_or_malformed_shape_and_bad_seed():
    from sigmadecomp_torch.latency import layer_latency

    conv = nn.Conv2d(3, 4, 3)
    for shape in [(1, 3, 6.5, 6), "1366", 5, (), (1, 0, 6, 6), (1, 3, True, 6)]:
        with pytest.raises(ValueError, match="input_shape=.* is not allowed"):
            layer_latency(conv, shape, min_run_time=0.001)
    with pytest.raises(ValueError, match="seed=-1 is not allowed"):
        layer_latency(conv, (1, 3, 6, 6), min_run_time=0.001, seed=-1)
    with pytest.raises(TypeError, match="module of type str"):
        layer_latency("conv", (1, 3, 6, 6), min_run_time=0.001)
    assert layer_latency(conv, (1, 3, 6, 6), min_run_time=0.001) > 0


def test_input_shapes_takes_one_name_and_refuses_unknown_names():
    from sigmadecomp_torch.latency import input_shapes

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(1, 3, 6, 6)
    assert input_shapes(model, x, names="2") == {"2": ((1, 64), torch.contiguous_format)}
    with pytest.raises(ValueError, match=r"\['conv1'\], not a Conv2d or Linear"):
        input_shapes(model, x, names="conv1")
    with pytest.raises(ValueError, match=r"\['1'\]"):  # a Flatten
        input_shapes(model, x, names=["0", "1"])
    conv = nn.Conv2d(3, 3, 1)  # one module under two names: either name is found
    shared = nn.Sequential(conv, nn.ReLU(), conv)
    assert input_shapes(shared, x, names="2") == {"2": ((1, 3, 6, 6), torch.contiguous_format)}
    assert sorted(input_shapes(shared, x)) == ["0", "2"]


# ----------------------------------------------------------------- quantization


def test_load_quantized_state_dict_refuses_scales_beside_a_float_weight():
    from sigmadecomp_torch.quantize import (load_quantized_state_dict, quantize_weights,
                                            quantized_state_dict)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.Linear(4, 5))
    q, qw = quantize_weights(model)
    state = quantized_state_dict(q, qw)
    target = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.Linear(4, 5))
    load_quantized_state_dict(target, state)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(),
                                                 q.state_dict().values()))
    bad = dict(state)
    bad["0.weight"] = q[0].weight.detach().clone()  # already dequantized: scaled twice
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"state\['0.weight'\] has dtype torch.float32"):
        load_quantized_state_dict(target, bad)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(TypeError, match="model of type dict"):
        load_quantized_state_dict(state, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_int8_round_trip_within_half_a_step_without_bias(dtype):
    from sigmadecomp_torch.quantize import quantize_weights

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.Linear(4, 6, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight[2].zero_()  # an all-zero channel
    q, qw = quantize_weights(model)
    for name in ("0", "1"):
        w = dict(model.named_modules())[name].weight.detach().double()
        wq = dict(q.named_modules())[name].weight.detach()
        assert wq.dtype == dtype and dict(q.named_modules())[name].bias is None
        scale = qw.scales[name].double().view(-1, *[1] * (w.ndim - 1))
        # half a step, plus the float32 rounding of code * scale
        assert bool(((w - wq.double()).abs() <= 0.5 * scale + 2.0 ** -23 * w.abs()).all())
        torch.testing.assert_close(qw.int8[name].double() * scale, wq.double(), rtol=0,
                                   atol=1e-7)
    assert bool((q[0].weight[2] == 0).all())


# --------------------------------------------------------------------- TT layers


def test_tt_compress_module_checks_out_hw_before_the_work():
    from sigmadecomp_torch.tt_layers import tt_compress_module

    conv = nn.Conv2d(8, 6, 3, padding=1)
    for bad in [8, (8,), (8, 0), (8, 2.5), "88"]:
        with pytest.raises(ValueError, match="out_hw=.* is not allowed; out_hw must be a pair"):
            tt_compress_module(conv, ratio=2, out_hw=bad)
    with pytest.raises(ValueError, match="applies to an nn.Conv2d"):
        tt_compress_module(nn.Linear(12, 10), ranks=3, out_hw=(4, 4))
    _, info = tt_compress_module(conv, ranks=(2, 2), in_modes=(2, 4), out_modes=(3, 2),
                                 out_hw=(np.int64(4), 4))
    assert info["macs_after"] > 0


@pytest.mark.parametrize("stride,padding,dilation,mode", [
    (1, 0, 1, "zeros"), ((2, 1), (1, 2), 1, "reflect"), (3, 3, (2, 1), "zeros"),
    (1, "same", (1, 2), "circular"), (2, "valid", 1, "replicate")])
def test_tt_conv_equals_the_dense_conv_of_its_kernel(stride, padding, dilation, mode):
    from sigmadecomp_torch.tt_layers import TTConv2d

    torch.manual_seed(0)
    layer = TTConv2d(6, 5, (3, 2), (2, 3), (1, 5), (3, 2), stride=stride, padding=padding,
                     dilation=dilation, padding_mode=mode, dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
    ref = nn.Conv2d(6, 5, (3, 2), stride=stride, padding=padding, dilation=dilation,
                    padding_mode=mode, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(layer.kernel())
        ref.bias.copy_(layer.bias)
    for x in [torch.randn(1, 6, 7, 5, dtype=torch.float64),
              torch.randn(2, 6, 7, 5, dtype=torch.float64).contiguous(
                  memory_format=torch.channels_last)]:
        torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-12)
    layer.max_chunk_elements = 1  # one sample per chunk: the same output
    x = torch.randn(3, 6, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-12)


# -------------------------------------------------------------------------- ViT


def test_vit_accepts_numpy_integers_in_its_configuration():
    from sigmadecomp_torch.vit import TorchViT, ViT

    torch.manual_seed(0)
    vit = ViT(image_size=np.int64(8), patch=np.int32(4), channels=1, dim=np.int64(8),
              depth=1, heads=2, mlp_dim=8, n_classes=3).eval()
    assert all(type(v) is int for v in vit.config.values())
    x = torch.rand(2, 1, 8, 8)
    twin = TorchViT.from_vit(vit).eval()
    torch.testing.assert_close(vit(x), twin(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"dim=np.float64\(8.0\) is not allowed"):
        ViT(dim=np.float64(8.0))


@pytest.mark.parametrize("end,extra", [(".report.json", []), (".report.png", []),
                                       (".torchscript.pt", ["--torchscript"])])
def test_cli_refuses_an_out_whose_companion_file_is_a_directory(tmp_path, capsys, end, extra):
    torch.manual_seed(0)
    model_path = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)), model_path)
    (tmp_path / f"o{end}").mkdir()
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", str(model_path), "--method", "svd", "--frobenius", "--ratio",
                  "2", "--out", str(tmp_path / "o.pt"), "--no-progress", *extra])
    assert info.value.code == 2
    assert f"also writes {str(tmp_path / f'o{end}')!r}, which is a directory" in \
        capsys.readouterr().err
    assert _tree(tmp_path) == before  # (o.pt not written)


def test_cli_error_is_one_plain_line_without_escape_codes(tmp_path, capsys):
    torch.manual_seed(0)
    model_path = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                             nn.Conv2d(4, 2, 1)), model_path)
    # a pickled model given as statistics: torch's weights-only refusal is passed on
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", str(model_path), "--method", "svd", "--ratio", "2",
                  "--transfer-stats", str(model_path), "--out", str(tmp_path / "o.pt"),
                  "--no-progress"])
    msg = str(info.value.code)
    assert msg.startswith("sigmadecomp compress: error: --transfer-stats=")
    assert "\x1b" not in msg and "\n" not in msg.strip()


def test_relu_moments_refuses_values_outside_its_domain():
    from sigmadecomp_torch.batchnorm import relu_moments

    with pytest.raises(ValueError, match=r"std1 has the value 0.0.*finite and > 0"):
        relu_moments(0.0, 0.0, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"std2 has the value -1.0"):
        relu_moments(0.0, 0.0, [1.0, 1.0], [1.0, -1.0], 0.0)
    with pytest.raises(ValueError, match=r"rho has the value 2.0.*in \[-1, 1\]"):
        relu_moments(0.0, 0.0, 1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match=r"mean1 has the value nan"):
        relu_moments(float("nan"), 0.0, 1.0, 1.0, 0.0)
    assert float(relu_moments(0.0, 0.0, 1.0, 1.0, 1.0)) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=0), "kernel_size=0 is not allowed"),
    (dict(stride=0), "stride=0 is not allowed"),
    (dict(dilation=(1, 0)), r"dilation=\(1, 0\) is not allowed"),
    (dict(ranks=(2.5, 2)), r"ranks=\(2.5, 2\) is not allowed"),
    (dict(in_modes=(2.0, 3)), r"in_modes=\(2.0, 3\) is not allowed"),
])
def test_tt_conv_refuses_bad_geometry_and_fractional_modes_or_ranks(kwargs, match):
    from sigmadecomp_torch.tt_layers import TTConv2d

    args = dict(in_channels=6, out_channels=5, kernel_size=3, in_modes=(2, 3),
                out_modes=(1, 5), ranks=(3, 2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TTConv2d(**args)
    # NumPy integers are integers
    layer = TTConv2d(6, 5, np.int64(3), (np.int64(2), 3), (1, 5), (np.int32(3), 2))
    assert layer(torch.randn(1, 6, 4, 4)).shape == (1, 5, 2, 2)


def test_cli_compresses_a_float64_model_with_its_calibration_images(tmp_path):
    torch.manual_seed(0)
    model_path = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                             nn.Conv2d(6, 2, 1)).double(), model_path)
    idx = tmp_path / "idx"
    idx.mkdir()
    write_idx(idx / "train-images-idx3-ubyte",
              np.random.default_rng(0).integers(0, 256, (6, 8, 8)))
    out = tmp_path / "o.pt"
    assert cli.main(["compress", str(model_path), "--method", "svd", "--ratio", "1.5",
                     "--data", str(idx), "--out", str(out), "--no-progress"]) == 0
    small = torch.load(out, weights_only=False)
    assert all(p.dtype == torch.float64 for p in small.parameters())
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["weighted"] and report["layers"][0]["sigma_error"] is not None


def test_moments_rule_skips_a_layer_whose_targets_are_all_zero():
    from sigmadecomp_torch import LayerStats
    from sigmadecomp_torch.transfer import shrink_covariances

    model = _trained(_bn_net())
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.standard_normal((40, 6)))
    stats = {"3": LayerStats(X.T @ X / 40, X.mean(0), 40)}
    saved = stats["3"].sigma.clone()
    out = shrink_covariances(stats, "moments", model=model, targets={"3": torch.zeros(4)},
                             match=True)
    assert out.alphas == {"3": 0.0} and "every target is zero" in out.skipped["3"]
    assert out.scales == {} and torch.equal(out["3"].sigma, saved)
    assert torch.equal(stats["3"].sigma, saved) and out["3"] is not stats["3"]
    # one positive target is information: the layer is fitted
    t = torch.tensor([0.0, 1.0, 2.0, 0.5])
    out = shrink_covariances(stats, "moments", model=model, targets={"3": t})
    assert out.skipped == {} and "3" in out.scores
