"""compress's pipeline: each layer's Sigma is prepared once and factorized at most once."""

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import sigmadecomp._backend as B  # noqa: E402
from sigmadecomp_torch import LayerStats, collect_covariances, compress  # noqa: E402
from sigmadecomp_torch.compress import LayerPlan, decompose_layer  # noqa: E402

F64 = torch.float64
QUIET = [pytest.mark.filterwarnings("ignore::sigmadecomp.ConvergenceWarning"),
         pytest.mark.filterwarnings("ignore::sigmadecomp.CompressionWarning")]


def _model_and_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8),
                          nn.ReLU(), nn.Linear(8, 3)).to(F64)
    data = [torch.randn(20, 3, 6, 6, dtype=F64) for _ in range(2)]
    return model, collect_covariances(model, data, progress=False)


def _eigh_counter(monkeypatch):
    """Every matrix the backend's eigh is called on.

    The backend function is wrapped (not replaced: it still computes) because
    it is where every eigen-decomposition of the library runs, whichever
    module asks for it; counting there cannot miss a call.
    """
    seen = []
    real = B.eigh

    def eigh(a):
        seen.append(a.detach().clone() if isinstance(a, torch.Tensor) else a.copy())
        return real(a)

    monkeypatch.setattr(B, "eigh", eigh)
    return seen


def _times_factorized(seen, sigma):
    S = sigma.to(F64)
    return sum(1 for a in seen if isinstance(a, torch.Tensor) and a.shape == S.shape
               and torch.equal(a, S))


@pytest.mark.parametrize("method, how", [("tucker2", {"ranks": "evbmf"}),
                                         ("svd", {"ranks": "evbmf"}),
                                         ("tucker2", {"budget": 0.5}),
                                         ("svd", {"ratio": 2}),
                                         ("cp", {"budget": 0.6})])
@pytest.mark.filterwarnings("ignore::sigmadecomp.ConvergenceWarning")
@pytest.mark.filterwarnings("ignore::sigmadecomp.CompressionWarning")
def test_each_sigma_is_eigendecomposed_at_most_once(monkeypatch, method, how):
    model, stats = _model_and_stats()
    layers = ["2", "4", "8"]  # a 3x3 conv, a 1x1 conv (Sigma-SVD), a Linear (Sigma-SVD)
    seen = _eigh_counter(monkeypatch)
    _, report = compress(model, method, covariances=stats, layers=layers,
                         options={"n_iter_max": 3}, progress=False, **how)
    # every layer is replaced, or (under a budget) kept dense when its allocated ranks
    # would not shrink it
    kept = [s["name"] for s in report.skipped if "would not reduce" in s["reason"]]
    assert sorted([r["name"] for r in report.layers] + kept) == layers
    assert not kept or "budget" in how
    counts = {n: _times_factorized(seen, stats[n].sigma) for n in layers}
    # rank selection, the SVD layers' decomposition and the report share one factorization;
    # Tucker-2/CP under ratio= need none (their PSD test is a Cholesky)
    want = {"2": 1 if method == "svd" or "ratio" not in how else 0, "4": 1, "8": 1}
    assert all(counts[n] == want[n] or (n in kept and counts[n] <= want[n]) for n in layers)


@pytest.mark.filterwarnings("ignore::sigmadecomp.CompressionWarning")
def test_layers_sharing_a_statistic_factorize_it_once(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 2)).to(F64)
    stats = dict(collect_covariances(model, [torch.randn(50, 5, dtype=F64)], progress=False))
    copy_of_1 = nn.Linear(8, 8).to(F64)
    model.append(copy_of_1)  # not called; reads the same input as '1' by construction
    stats["3"] = stats["1"]
    seen = _eigh_counter(monkeypatch)
    compress(model, "svd", covariances=stats, ranks="evbmf", layers=["1", "3"], progress=False)
    assert _times_factorized(seen, stats["1"].sigma) == 1


def test_rank_selection_errors_name_the_layer():
    model, stats = _model_and_stats()
    bad = stats["4"].sigma.clone()
    bad[0, 0] = -bad.abs().max() * 10
    stats = dict(stats)
    stats["4"] = LayerStats(bad, stats["4"].mean, stats["4"].count)
    for how in ({"ranks": "evbmf"}, {"budget": 0.5}):
        with pytest.raises(ValueError, match=r"^layer '4': sigma is not positive semi-definite"):
            compress(model, "svd", covariances=stats, layers=["2", "4"], progress=False, **how)


def test_decompose_layer_is_the_step_compress_runs():
    model, stats = _model_and_stats()
    _, report = compress(model, "tucker2", covariances=stats, ranks={"2": (3, 3)},
                         options={"n_iter_max": 4}, progress=False)
    from sigmadecomp.prepared import PreparedSigma

    plan = LayerPlan("2", model[2], "Conv2d 3x3", "tucker2", ranks=(3, 3),
                     sigma=PreparedSigma(stats["2"].sigma.to(F64)),
                     sigma_full=stats["2"].sigma.to(F64), options={"n_iter_max": 4})
    new, row, result = decompose_layer(plan)
    assert row["sigma_error"] == pytest.approx(report.layers[0]["sigma_error"], rel=1e-12)
    assert row["frobenius_error"] == pytest.approx(report.layers[0]["frobenius_error"],
                                                   rel=1e-12)
    assert row["n_iter"] == result.n_iter and row["params_after"] == report.layers[0][
        "params_after"]
    x = torch.randn(2, 6, 5, 5, dtype=F64)
    torch.testing.assert_close(new(x), nn.functional.conv2d(
        x, result.to_tensor(), model[2].bias, padding=1))
    assert plan.names == ["2"] and "tucker2" in repr(plan)
