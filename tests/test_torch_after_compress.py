"""What users do around and after compression: latency probes, quantization, TT
layers built by hand, transformers with ``data=``, shrinkage options, refit reports.

Each test pins a behaviour that once went wrong.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sigmadecomp.exceptions import CompressionWarning, ConvergenceWarning
from sigmadecomp_torch import collect_covariances, compress
from sigmadecomp_torch.latency import measure_latency
from sigmadecomp_torch.quantize import (load_quantized_state_dict, model_size_bytes,
                                        quantize_weights, quantized_state_dict)
from sigmadecomp_torch.transfer import shrink_covariances
from sigmadecomp_torch.tt_layers import TTConv2d, TTLinear, tt_compress_module


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 16, 4))


def test_latency_probes_give_every_module_its_own_mode_back():
    model = _bn_net()
    model.train()
    model[1].eval()
    model[4].eval()  # fine-tuning with frozen BatchNorm
    modes = {n: m.training for n, m in model.named_modules()}
    x = torch.randn(2, 3, 4, 4)
    measure_latency(model, x, min_run_time=0.01)
    assert {n: m.training for n, m in model.named_modules()} == modes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, _ = compress(model, "svd", ratio=2, example_input=x, min_speedup=0.0)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not small[1].training and not small[4].training


def test_quantize_checks_its_arguments():
    model = _bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="inplace='no' is not allowed"):
        quantize_weights(model, inplace="no")
    with pytest.raises(TypeError, match="layers=3 is not allowed"):
        quantize_weights(model, layers=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("layer", [nn.Linear(64, 64), nn.Conv2d(8, 16, 3)])
def test_quantized_bare_layer_round_trips(layer):
    q, qw = quantize_weights(layer)
    st = quantized_state_dict(q, qw)
    assert set(st) == {"weight", "bias", "weight_scale"} and st["weight"].dtype == torch.int8
    assert model_size_bytes(st) < model_size_bytes(layer)  # (was larger: float weight kept)
    fresh = type(layer)(*((64, 64) if isinstance(layer, nn.Linear) else (8, 16, 3)))
    load_quantized_state_dict(fresh, st)
    assert torch.equal(fresh.weight, q.weight)


def test_quantize_lists_tt_layers_left_in_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 64), nn.ReLU(), nn.Linear(64, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, _ = compress(model, "tt", ratio=3)
    with pytest.warns(CompressionWarning, match=r"2 Tensor-Train layer\(s\) \(2, 5\) stay in float"):
        _, qw = quantize_weights(small)
    assert qw.layers == ["0", "7"] and sorted(qw.skipped) == ["2", "5"]
    with pytest.raises(ValueError, match=r"'2', a Tensor-Train layer \(TTConv2d\)"):
        quantize_weights(small, layers="2")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_quantize_error_is_measured_on_the_stored_weight(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).to(dtype)
    w0 = lin.weight.detach().clone()
    q, qw = quantize_weights(lin)
    actual = float((q.weight.detach().double() - w0.double()).abs().max())
    assert qw.max_abs_error[""] == actual > 0


def test_tt_without_statistics_is_a_closed_form_without_warning():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 16), nn.ReLU(), nn.Linear(16, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        warnings.simplefilter("ignore", CompressionWarning)
        _, rep = compress(m, "tt", ratio=2)
    assert [(r["n_iter"], r["converged"]) for r in rep.layers] == [(None, None)] * 2


def test_data_shortcut_on_a_transformer_matches_the_two_step_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16),
                          nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = [torch.randn(4, 5, 8) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        two, rep2 = compress(model, "svd", covariances=collect_covariances(model, data,
                                                                           progress=False), ratio=2)
        one, rep1 = compress(model, "svd", data=data, ratio=2)
    assert [r["name"] for r in rep1.layers] == [r["name"] for r in rep2.layers] == ["2"]
    assert [s["name"] for s in rep1.skipped] == [s["name"] for s in rep2.skipped]
    assert "1.self_attn.out_proj" in [s["name"] for s in rep1.skipped]
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert torch.allclose(one(x), two(x), atol=1e-6)


def test_tt_layers_refuse_bad_arguments_by_name():
    cases = [
        (lambda: TTConv2d(4, 6, 3, (2, 2), (2, 3), (0, 2)), "ranks=\\(0, 2\\) is not allowed"),
        (lambda: TTLinear(4, 6, (2, 2), (2, 3), (0,)), "ranks=\\(0,\\) is not allowed"),
        (lambda: TTConv2d(4, 6, 3, (2, 2), (2, 3), (2, 2), padding="foo"), "padding='foo'"),
        (lambda: TTConv2d(4, 6, 3, (2, 2), (2, 3), (2, 2), padding=-1), "padding=-1"),
        (lambda: TTConv2d(4, 6, 3, (2, 2), (2, 3), (2, 2), padding="same", stride=2),
         "'same' padding needs stride 1"),
        (lambda: TTConv2d(4, 6, 3, (2, 2), (2, 3), (2, 2))(torch.randn(1, 5, 8, 8)),
         "expected input with 4 channels"),
        (lambda: TTLinear(4, 6, (2, 2), (2, 3), (2,))(torch.randn(3, 5)),
         "expected input with 4 features"),
        (lambda: tt_compress_module(nn.Conv2d(16, 16, 3, padding=1), ratio=0.5),
         "ratio=0.5 is not allowed"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    conv = TTConv2d(8, 8, 3, (8,), (8,), (3,), padding=1, padding_mode="circular")
    assert "padding_mode='circular'" in repr(conv)


def _grouped_net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU())
    m.train()(torch.randn(16, 3, 6, 6))
    return m.eval()


def test_shrink_covariances_names_its_arguments_and_lists_grouped_layers():
    m = _grouped_net()
    st = collect_covariances(m, [torch.rand(8, 3, 6, 6)], progress=False)
    with pytest.raises(ValueError, match="images=0 is not allowed"):
        shrink_covariances(st, "oas", images=0)
    with pytest.raises(ValueError, match=r"weights\[0\]=3.0 is not allowed.*share of the prior"):
        shrink_covariances(st, "moments", model=m, prior=st, weights=[3.0])
    with pytest.raises(ValueError, match=r"alphas\[1\]=2.0 is not allowed"):
        shrink_covariances(st, 0.5, alphas=[0.5, 2.0])  # checked even when no rule uses them
    for rule, kw in (("moments", dict(model=m)), ("oas", dict(images=8))):
        assert shrink_covariances(st, rule, **kw).skipped == {"3": "grouped statistics"}


def test_refit_report_lists_each_layer_once():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))
    data = [torch.randn(4, 3, 4, 4) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = compress(m, "tucker2", data=data, ratio=2, refit="all",
                          options={"n_iter_max": 3}, progress=False)
    names = [s["name"] for s in rep.skipped]
    assert len(names) == len(set(names)) and "0" in names
    first = next(s for s in rep.skipped if s["name"] == "0")
    assert "first layer" in first["reason"]


def test_tt_with_a_budget_is_refused_before_any_work():
    model = _bn_net()

    def never(*_):
        raise AssertionError("data was read")

    with pytest.raises(ValueError, match="budget=0.5 is not available for method='tt'"):
        compress(model, "tt", data=map(never, [0]), budget=0.5)


def test_batchnorm_statistics_with_a_sample_count_one_above_a_batch():
    from sigmadecomp_torch import covariances_from_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)).eval()
    stats, _ = covariances_from_batchnorm(model, input_shape=(1, 12, 12), samples=257)
    assert sorted(stats) == ["11", "3"]


def test_distributed_true_without_a_group_reads_no_batch():
    model = _bn_net().eval()
    read = []

    def batches():
        for _ in range(3):
            read.append(1)
            yield torch.randn(2, 3, 4, 4)

    for kw in ({}, {"sequential": True}):
        with pytest.raises(ValueError, match="distributed=True is not allowed without"):
            compress(model, "svd", data=batches(), ratio=2, distributed=True, **kw)
    with pytest.raises(ValueError, match="distributed=True is not allowed without"):
        collect_covariances(model, batches(), distributed=True)
    assert read == []


@pytest.mark.parametrize("weight_scale,running_var", [(1.0, 1e-6), (1e-3, 1.0)])
def test_propagated_batchnorm_marginals_follow_the_running_variance(weight_scale, running_var):
    import math

    from scipy.stats import norm

    from sigmadecomp_torch import covariances_from_batchnorm

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 5, 1)).eval()  # 1x1 consumer: its patch is the channel
    with torch.no_grad():
        m[0].weight.mul_(weight_scale)
        m[0].bias.zero_()
        m[1].weight.copy_(torch.tensor([1.5, -0.7, 0.3, 2.0]))
        m[1].bias.copy_(torch.tensor([0.2, -0.4, 1.0, 0.0]))
        m[1].running_var.fill_(running_var)
    g, b = m[1].weight.detach().double().numpy(), m[1].bias.detach().double().numpy()
    sd = abs(g) * math.sqrt(running_var / (running_var + m[1].eps))
    expected = sd * norm.pdf(b / sd) + b * norm.cdf(b / sd)  # rectified Gaussian mean
    got = covariances_from_batchnorm(m, input_shape=(3, 8, 8), spatial="propagate",
                                     shrinkage=0.0, samples=512)[0]["3"].mean.numpy()
    assert np.allclose(got, expected, atol=0.03)  # Monte-Carlo error of 512 noise images


@pytest.mark.parametrize("weighted", [True, False])
def test_report_plot_draws_each_layers_ratio_and_errors(tmp_path, weighted):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 6, 3))
    stats = collect_covariances(model, [torch.randn(4, 3, 9, 9)], progress=False) \
        if weighted else None
    _, report = compress(model, "tucker2", covariances=stats, ratio=2,
                         layers=["0", "2", "4"], options={"n_iter_max": 3}, progress=False)
    fig = report.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    left, right = fig.axes
    rx = [r["params_before"] / r["params_after"] for r in report.layers]
    assert [p.get_width() for p in left.patches] == pytest.approx(rx)
    errors = [r["frobenius_error"] for r in report.layers]
    if weighted:
        errors = [r["sigma_error"] for r in report.layers] + errors
    assert [p.get_width() for p in right.patches] == pytest.approx(errors)
    assert [t.get_text() for t in left.get_yticklabels()] == ["0", "2", "4"]


def test_a_report_read_back_from_json_equals_the_report(tmp_path):
    from sigmadecomp_torch import CompressionReport

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 6, 3))
    stats = collect_covariances(model, [torch.randn(4, 3, 9, 9)], progress=False)
    for method in ("tucker2", "svd"):
        _, report = compress(model, method, covariances=stats, ratio=2,
                             options=None if method == "svd" else {"n_iter_max": 2},
                             progress=False)
        report.to_json(tmp_path / "r.json")
        back = CompressionReport.from_json(tmp_path / "r.json")
        assert back == report and back.table() == report.table()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not a JSON file"):
        CompressionReport.from_json(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="CompressionReport.to_dict"):
        CompressionReport.from_json(tmp_path / "other.json")


def _report_dict():
    """The to_dict of a small hand-made Sigma-weighted report (no compression: fast)."""
    from sigmadecomp_torch import CompressionReport

    rows = [{"name": "a", "kind": "Conv2d", "method": "tucker2", "ranks": (2, 3),
             "params_before": 100, "params_after": 40, "sigma_error": 0.1,
             "frobenius_error": 0.3, "n_iter": 2, "converged": True, "seconds": 0.5,
             "aliases": ["b"]},
            {"name": "c", "kind": "Linear", "method": "svd", "ranks": 2,
             "params_before": 60, "params_after": 30, "sigma_error": None,
             "frobenius_error": 0.2, "n_iter": None, "converged": None, "seconds": 0.25,
             "aliases": []}]
    return CompressionReport(
        method="tucker2", weighted=True, centered=False, layers=rows,
        skipped=[{"name": "d", "kind": "Conv2d", "reason": "slower"}],
        params_before=200, params_after=110, seconds=1.0,
        refitted=[{"name": "e", "kind": "Linear", "params_before": 20, "params_after": 20,
                   "target_change": 0.05, "group": 0, "output_error": None}]).to_dict()


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(totals={}), r"data\['totals'\] lacks 'params_before'"),
    (lambda d: d["totals"].pop("params_after"), r"data\['totals'\] lacks 'params_after'"),
    (lambda d: d.update(totals=None), r"data\['totals'\] must be a dict.*got None"),
    (lambda d: d["totals"].update(params_before="many"),
     r"data\['totals'\]\['params_before'\] must be an int; got 'many'"),
    (lambda d: d.update(layers={"a": 1}), r"data\['layers'\] must be a list of dicts; got \{'a': 1\}"),
    (lambda d: d["layers"].append(3), r"data\['layers'\]\[2\] must be a dict; got 3"),
    (lambda d: d["layers"][0].pop("ranks"), r"data\['layers'\]\[0\] lacks 'ranks'"),
    (lambda d: d["layers"][1].pop("name"), r"data\['layers'\]\[1\] lacks 'name'"),
    (lambda d: d["layers"][1].pop("sigma_error"), r"data\['layers'\]\[1\] lacks 'sigma_error'"),
    (lambda d: d["layers"][0].update(ranks=[2, "x"]),
     r"data\['layers'\]\[0\]\['ranks'\] must be an int or a list of ints; got \[2, 'x'\]"),
    (lambda d: d["layers"][0].update(sigma_error="0.1"),
     r"data\['layers'\]\[0\]\['sigma_error'\] must be a number or None; got '0.1'"),
    (lambda d: d["layers"][0].update(seconds=None),
     r"data\['layers'\]\[0\]\['seconds'\] must be a number; got None"),
    (lambda d: d["layers"][0].update(aliases="b"),
     r"data\['layers'\]\[0\]\['aliases'\] must be a list of str.*; got 'b'"),
    (lambda d: d["layers"][0].update(latency_dense_ms=1.0),
     r"data\['layers'\]\[0\] lacks 'latency_factorized_ms'"),
    (lambda d: d["skipped"][0].pop("reason"), r"data\['skipped'\]\[0\] lacks 'reason'"),
    (lambda d: d["refitted"][0].pop("target_change"),
     r"data\['refitted'\]\[0\] lacks 'target_change'"),
    (lambda d: d.update(weighted="no"), r"data\['weighted'\] must be a bool.*; got 'no'"),
])
def test_a_report_dict_with_a_missing_or_malformed_field_is_refused_by_name(change, match):
    from sigmadecomp_torch import CompressionReport

    data = _report_dict()
    change(data)
    with pytest.raises(ValueError, match=match):
        CompressionReport.from_dict(data)


def test_a_report_dict_without_the_optional_fields_reads_back_with_their_defaults():
    from sigmadecomp_torch import CompressionReport

    data = _report_dict()
    for key in ("weighted", "centered", "skipped", "refitted"):
        del data[key]
    del data["totals"]["seconds"]
    for row in data["layers"]:
        del row["converged"], row["aliases"]
    report = CompressionReport.from_dict(data)
    assert not report.weighted and report.skipped == [] and report.seconds == 0.0
    assert [(r["converged"], r["aliases"]) for r in report.layers] == [(None, [])] * 2
    assert str(report).splitlines()[3].split()[:4] == ["a", "Conv2d", "tucker2", "2x3"]
    assert report.to_dict()["totals"]["layer_params_after"] == 70


def test_a_report_and_its_dict_share_no_mutable_data():
    from sigmadecomp_torch import CompressionReport

    data = _report_dict()
    report = CompressionReport.from_dict(data)
    assert report.to_dict() == _report_dict()
    out = report.to_dict()
    out["layers"][0]["aliases"].append("ZZZ")
    out["layers"][0]["ranks"].append(9)
    out["skipped"][0]["reason"] = "changed"
    out["refitted"][0]["target_change"] = 1.0
    data["layers"][0]["aliases"].append("YYY")
    data["layers"][1]["name"] = "changed"
    data["skipped"].append({"name": "x", "kind": "Linear", "reason": "r"})
    data["refitted"][0]["kind"] = "changed"
    assert report.to_dict() == _report_dict()  # (a fresh copy of what it was)


def test_report_plot_writes_a_path_without_suffix_as_png_at_that_path(tmp_path):
    pytest.importorskip("matplotlib")
    from sigmadecomp_torch import CompressionReport

    report = CompressionReport.from_dict(_report_dict())
    report.plot(tmp_path / "figure")
    assert (tmp_path / "figure").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report.plot(str(tmp_path / "fig.pdf"))
    assert (tmp_path / "fig.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "figure"]


def test_report_plot_marks_a_sigma_error_that_was_not_computed():
    pytest.importorskip("matplotlib")
    from sigmadecomp_torch import CompressionReport

    report = CompressionReport.from_dict(_report_dict())  # layer "c": sigma_error None
    fig = report.plot()
    _, right = fig.axes
    # no bar of width 0 for it (it would read as an error of 0) ...
    assert [p.get_width() for p in right.patches] == pytest.approx([0.1, 0.3, 0.2])
    # ... but an "n/a" on its row, next to the Frobenius bar of that row
    na = [t for t in right.texts if t.get_text() == "n/a"]
    assert len(na) == 1 and 0.5 < na[0].get_position()[1] < 1.5  # row 1: layer "c"
    legend = [t.get_text() for t in right.get_legend().get_texts()]
    assert any("n/a" in t and "not computed" in t for t in legend), legend
