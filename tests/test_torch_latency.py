"""Latency helpers and compress(min_speedup=...): behaviour only, never a speed."""

import math

import pytest
import torch
from torch import nn

from sigmadecomp_torch import Tucker2Conv2d, compress
from sigmadecomp_torch.latency import (compare_latency, input_shapes, layer_latency,
                                       measure_latency)
from sigmadecomp_torch.layers import LowRankLinear


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 64),
                         nn.Linear(64, 10))


pytestmark = pytest.mark.filterwarnings("ignore::sigmadecomp.exceptions.ConvergenceWarning")

X = torch.randn(2, 3, 12, 12)
OPTS = {"n_iter_max": 3}


def test_measure_latency_sane_and_restores_mode():
    model = _model().train()
    ms = measure_latency(model, X, min_run_time=0.01)
    assert math.isfinite(ms) and 0 < ms < 5000
    assert model.training


def test_layer_latency_both_formats_leave_module_alone():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    w = conv.weight.detach().clone()
    for fmt in (torch.contiguous_format, torch.channels_last):
        ms = layer_latency(conv, (2, 8, 10, 10), memory_format=fmt, min_run_time=0.01)
        assert math.isfinite(ms) and ms > 0
    assert conv.weight.is_contiguous() and torch.equal(conv.weight, w)
    with pytest.raises(ValueError, match="memory_format"):
        layer_latency(nn.Linear(4, 4), (2, 4), memory_format=torch.channels_last)
    d, f = compare_latency(conv, conv, (1, 8, 6, 6), min_run_time=0.01, rounds=1)
    assert d > 0 and f > 0


def test_bad_arguments_named():
    with pytest.raises(ValueError, match="min_run_time"):
        measure_latency(_model(), X, min_run_time=0)
    with pytest.raises(ValueError, match="example_input"):
        compress(_model(), "tucker2", ratio=3, min_speedup=1.0, progress=False)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_speedup"):
            compress(_model(), "tucker2", ratio=3, min_speedup=bad, example_input=X,
                     progress=False)
    for bad in (True, "1", [1.0]):
        with pytest.raises(TypeError, match="min_speedup"):
            compress(_model(), "tucker2", ratio=3, min_speedup=bad, example_input=X,
                     progress=False)


def test_input_shapes_records_size_and_format():
    model = _model()
    shapes = input_shapes(model, X)
    assert shapes["2"] == ((2, 16, 12, 12), torch.contiguous_format)
    assert shapes["9"] == ((2, 64), torch.contiguous_format)
    cl = input_shapes(model.to(memory_format=torch.channels_last),
                      X.contiguous(memory_format=torch.channels_last), names=["2"])
    assert list(cl) == ["2"] and cl["2"][1] is torch.channels_last


def test_impossible_speedup_keeps_every_layer_dense():
    model = _model()
    small, report = compress(model, "tucker2", ratio=3, options=OPTS, progress=False,
                             min_speedup=1000, example_input=X)
    assert report.layers == []
    kept = [s for s in report.skipped if "min_speedup" in s["reason"]]
    assert {s["name"] for s in kept} == {"2", "4", "8"}
    for s in kept:
        assert s["latency_dense_ms"] > 0 and s["latency_factorized_ms"] > 0
    assert all(type(a) is type(b) for a, b in zip(small, model))
    assert small is not model
    sd, so = small.state_dict(), model.state_dict()
    assert sd.keys() == so.keys() and all(torch.equal(sd[k], so[k]) for k in sd)
    assert report.params_after == report.params_before
    assert "kept dense" in report.table()


def test_zero_speedup_compresses_all_with_timings():
    model = _model()
    ref, ref_report = compress(model, "tucker2", ratio=3, options=OPTS, progress=False)
    small, report = compress(model, "tucker2", ratio=3, options=OPTS, progress=False,
                             min_speedup=0, example_input=X)
    assert [r["name"] for r in report.layers] == [r["name"] for r in ref_report.layers]
    assert isinstance(small[2], Tucker2Conv2d) and isinstance(small[8], LowRankLinear)
    for r in report.layers:
        assert r["latency_dense_ms"] > 0 and r["latency_factorized_ms"] > 0
    assert all("latency_dense_ms" not in r for r in ref_report.layers)
    with torch.no_grad():
        torch.testing.assert_close(small(X), ref(X))
    assert "ms factorized" in report.table()
    assert report.to_dict()["layers"][0]["latency_factorized_ms"] > 0


def test_bare_layer_kept_dense():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    out, report = compress(conv, "tucker2", ratio=3, options=OPTS, progress=False,
                           min_speedup=1000, example_input=torch.randn(1, 16, 8, 8))
    assert type(out) is nn.Conv2d and torch.equal(out.weight, conv.weight)
    assert out is not conv and report.layers == []


def test_latency_benchmark_quick(tmp_path):
    from benchmarks import latency as bench
    from sigmadecomp_torch import LAYER_METHODS

    before = set(LAYER_METHODS)
    out = tmp_path / "latency.md"
    model_rows, layer_rows, macs = bench.main(["--quick", "--out", str(out)])
    assert set(LAYER_METHODS) == before
    assert macs[0] > macs[1] > 0
    assert len(model_rows) == 2 * 2 * 2  # threads x batch x format
    for _, _, _, med, _ in model_rows:
        assert len(med) == 3 and all(0 < v < 1e5 for v in med.values())
    forms = {r[1] for r in layer_rows}
    assert forms == {"Tucker2Conv2d", "CPConv2d", "LowRankConv2d", "TTConv2d",
                     "LowRankLinear", "TTLinear"}
    text = out.read_text()
    assert "## Whole model" in text and "min_speedup=1" in text


@pytest.mark.parametrize("wrap", [lambda x: x, lambda x: (x, torch.zeros(len(x))),
                                  lambda x: {"input": x}])
def test_min_speedup_times_the_layers_at_the_first_batch_of_data(monkeypatch, wrap):
    """Without example_input, the first batch of data= (its inputs) is the example."""
    import importlib

    lat = importlib.import_module("sigmadecomp_torch.latency")
    seen = []
    real = lat.input_shapes

    def spy(model, example_input, names=None):
        seen.append(example_input)
        return real(model, example_input, names)

    monkeypatch.setattr(lat, "input_shapes", spy)

    class Keyword(nn.Module):  # dict batches run as model(**batch)
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, input):
            return self.net(input)

    model = Keyword() if isinstance(wrap(X), dict) else _model()
    data = [wrap(X), wrap(torch.randn(3, 3, 12, 12))]
    _, report = compress(model, "tucker2", ratio=3, options=OPTS, progress=False,
                         min_speedup=0, data=data)
    assert len(seen) == 1
    got = seen[0]["input"] if isinstance(seen[0], dict) else seen[0]
    assert torch.equal(got, X)
    assert report.layers and all(r["latency_dense_ms"] > 0 for r in report.layers)


class _CountingBatches:
    """Re-iterable calibration data that counts the batches read."""

    def __init__(self, n=5):
        self.n, self.read = n, 0

    def __iter__(self):
        for _ in range(self.n):
            self.read += 1
            yield torch.randn(2, 3, 9, 9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="svd", ratio=2, min_speedup=-1), "min_speedup=-1 is not allowed"),
    (dict(method="bogus", ratio=2), "method='bogus' is not allowed"),
    (dict(method="svd", ratio=-3), "ratio=-3 is not allowed"),
    (dict(method="svd", ratio=2, budget=0.5), "budget cannot be combined with ratio"),
])
@pytest.mark.parametrize("sequential", [False, True])
def test_bad_options_are_refused_before_any_batch_is_read(kwargs, match, sequential):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    data = _CountingBatches()
    with pytest.raises(ValueError, match=match):
        compress(model, data=data, sequential=sequential, progress=False, **kwargs)
    assert data.read == 0
