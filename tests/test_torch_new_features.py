"""Audit of torch.inference_mode around the package's entry points, the warnings they
raise, and CompressionReport.plot without layers."""

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp.exceptions import CompressionWarning, ConvergenceWarning  # noqa: E402
from sigmadecomp_torch import compress, load_compressed  # noqa: E402
from sigmadecomp_torch.quantize import quantize_weights  # noqa: E402
from sigmadecomp_torch.report import CompressionReport  # noqa: E402

FAST = {"n_iter_max": 2}


def _build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _trains(model, x):
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kw", [{"sequential": True}, {"refit": "all"},
                                {"sequential": True, "refit": "all", "centered": True}])
@pytest.mark.parametrize("made_in_inference_mode", ["model", "data", "call"])
def test_sequential_and_refit_take_models_and_data_made_under_inference_mode(
        kw, made_in_inference_mode):
    """The layer groups are found through autograd, which refuses inference tensors: the
    model or the batches made under torch.inference_mode gave a RuntimeError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference, _ = compress(_build(), "tucker2", ratio=2, data=_batches(), options=FAST,
                                progress=False, **kw)
        with torch.inference_mode(made_in_inference_mode == "model"):
            model = _build()
        with torch.inference_mode(made_in_inference_mode == "data"):
            data = _batches()
        with torch.inference_mode(made_in_inference_mode == "call"):
            small, _ = compress(model, "tucker2", ratio=2, data=data, options=FAST,
                                progress=False, **kw)
    assert _same(small, reference)  # bit for bit
    _trains(small, _batches()[0])


def test_in_place_on_a_model_made_under_inference_mode_works_under_inference_mode():
    """Its tensors can only be written in inference mode (as before the entry points left
    it); the model cannot train whatever is done, so nothing is lost by staying in it."""
    x = _batches()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, _ = compress(_build(), "tucker2", ratio=2, options=FAST, progress=False)
        refitted, _ = compress(_build(), "tucker2", ratio=2, data=_batches(), refit="all",
                               options=FAST, progress=False)
        quantized, _ = quantize_weights(_build())
        with torch.inference_mode():
            model = _build()
            loaded = load_compressed(model, small.state_dict(), inplace=True)
            assert loaded is model and torch.equal(loaded(x), small(x))
            model = _build()
            out, _ = quantize_weights(model, inplace=True)
            assert out is model and _same(out, quantized)
            model = _build()
            out, _ = compress(model, "tucker2", ratio=2, data=_batches(), refit="all",
                              options=FAST, progress=False, inplace=True)
            assert out is model and _same(out, refitted)
            model = _build()
            out, _ = compress(model, "tucker2", ratio=2, data=_batches(), sequential=True,
                              options=FAST, progress=False, inplace=True)
            assert out is model
    # a copy is still made outside inference mode, and trains
    with torch.inference_mode():
        model = _build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            copy_, _ = quantize_weights(model)
    assert _same(copy_, quantized)
    _trains(copy_, x)


def test_warnings_of_the_entry_points_name_the_callers_line():
    """The inference-mode wrapper put its own line (in _batches.py) in their place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, _ = compress(model, "tt", ratio=2, options={"n_iter_max": 1}, progress=False,
                            layers=["1"])
        quantize_weights(small)
        with torch.inference_mode():
            compress(model, "tucker2", ratio=2, options={"n_iter_max": 1}, progress=False,
                     layers=["1"])
        # warnings raised in the planning steps and by the statistics
        compress(model, "tucker2", ranks={"1": (8, 8)}, options={"n_iter_max": 1},
                 progress=False)  # more parameters than the layer has
        compress(model, "tt", ranks={"1": 500}, options={"n_iter_max": 1},
                 progress=False)  # TT ranks clipped
    ours = [w for w in caught if issubclass(w.category, (CompressionWarning,
                                                         ConvergenceWarning))]
    assert {w.category for w in ours} == {CompressionWarning, ConvergenceWarning}
    messages = " | ".join(str(w.message) for w in ours)
    assert "more than the" in messages and "were clipped" in messages
    assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]


def test_the_figure_of_a_report_without_layers_says_so():
    pytest.importorskip("matplotlib")
    report = CompressionReport(method="tucker2", weighted=True, centered=False,
                               params_before=100, params_after=100,
                               skipped=[{"name": "a", "kind": "Conv2d", "reason": "slower"}])
    fig = report.plot()
    left, right = fig.axes
    assert not left.patches and not right.patches
    # no legend of bars that are not there (their swatches had the default colour)
    assert left.get_legend() is None and right.get_legend() is None
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("no layer was factorized" in t for t in texts)
    assert [ax.get_xlabel() for ax in fig.axes] == ["rX (parameters before / after)",
                                                    "relative error"]
