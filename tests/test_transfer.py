"""Shrinkage of statistics toward the Frobenius metric (core and torch adapter)."""

import math

import numpy as np
import pytest

from sigmadecomp import sigma_svd, tucker2
from sigmadecomp.shrinkage import (
    check_alpha,
    holdout_alpha,
    match_moments,
    moment_alpha,
    oas_alpha,
    shrink_sigma,
)

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp_torch import LayerStats, collect_covariances, compress  # noqa: E402
from sigmadecomp_torch.transfer import (  # noqa: E402
    ShrunkCovariances,
    output_moments,
    shrink_covariances,
)

pytestmark = [pytest.mark.filterwarnings("ignore::sigmadecomp.ConvergenceWarning"),
              pytest.mark.filterwarnings("ignore::sigmadecomp.CompressionWarning")]


def _psd(rng, n, m=None):
    X = rng.standard_normal((m or 3 * n, n)) * np.linspace(0.1, 3.0, n)
    return X.T @ X / X.shape[0]


# ------------------------------------------------------------------ core


def test_shrink_sigma_endpoints_trace_and_psd(lib, rng):
    S = _psd(rng, 6, m=4)  # rank 4 of 6
    Sx = lib.asarray(S)
    for a in (0.0, 0.3, 1.0):
        out = shrink_sigma(Sx, a)
        assert lib.is_same_kind(out)
        o = lib.to_numpy(out)
        assert np.isclose(np.trace(o), np.trace(S), rtol=lib.rtol)
        assert np.linalg.eigvalsh(o).min() >= -lib.rtol * np.trace(S)
    np.testing.assert_allclose(lib.to_numpy(shrink_sigma(Sx, 0.0)), S, rtol=lib.rtol)
    np.testing.assert_allclose(lib.to_numpy(shrink_sigma(Sx, 1.0)), np.trace(S) / 6 * np.eye(6),
                               rtol=lib.rtol, atol=lib.rtol * np.trace(S))
    np.testing.assert_allclose(lib.to_numpy(shrink_sigma(Sx, 0.3)),
                               0.7 * S + 0.3 * np.trace(S) / 6 * np.eye(6), rtol=lib.rtol,
                               atol=lib.rtol * np.trace(S))


def test_shrink_sigma_new_array_and_stack(rng):
    S = _psd(rng, 4)
    before = S.copy()
    out = shrink_sigma(S, 0.0)
    assert out is not S
    out[0, 0] = 123.0
    np.testing.assert_array_equal(S, before)
    stack = np.stack([S, 2 * _psd(rng, 4)])
    got = shrink_sigma(stack, 0.5)
    for g in range(2):
        np.testing.assert_allclose(got[g], shrink_sigma(stack[g], 0.5))


@pytest.mark.parametrize("bad, err", [(-0.1, ValueError), (1.5, ValueError), (True, TypeError),
                                      (float("nan"), ValueError), ("half", TypeError),
                                      (None, TypeError)])
def test_bad_alpha_core(bad, err, rng):
    with pytest.raises(err, match="alpha"):
        shrink_sigma(_psd(rng, 3), bad)
    with pytest.raises(err, match="alpha"):
        check_alpha(bad)


def test_alpha_one_gives_the_frobenius_solution(rng):
    K = rng.standard_normal((6, 4, 3, 3))
    S = _psd(rng, 36)
    S1 = shrink_sigma(S, 1.0)
    # matrix case: exact
    W = K.reshape(6, -1)
    np.testing.assert_allclose(sigma_svd(W, 2, S1).to_tensor(),
                               sigma_svd(W, 2, np.eye(36)).to_tensor(), atol=1e-10)
    np.testing.assert_allclose(sigma_svd(W, 2, S1).to_tensor(),
                               sigma_svd(W, 2, None).to_tensor(), atol=1e-10)
    # Tucker-2: the solver result equals the Sigma = I one
    a = tucker2(K, (3, 2), S1, n_iter_max=5, rng=0).to_tensor()
    b = tucker2(K, (3, 2), np.eye(36), n_iter_max=5, rng=0).to_tensor()
    np.testing.assert_allclose(a, b, atol=1e-8)


def test_holdout_alpha_picks_zero_when_the_check_is_the_fit(rng):
    W = rng.standard_normal((5, 8))
    S = _psd(rng, 8)
    fit = lambda K, Sg: sigma_svd(K, 2, Sg).to_tensor()  # noqa: E731
    a, errs = holdout_alpha(W, S, S, fit)
    assert a == 0.0
    assert errs[0.0] == min(errs.values()) and len(errs) > 2
    # checked in the identity metric, the Frobenius fit (a = 1) is the best
    a1, errs1 = holdout_alpha(W, S, np.eye(8), fit)
    assert a1 == 1.0 and errs1[1.0] < errs1[0.0]
    with pytest.raises(ValueError, match="sigma_check"):
        holdout_alpha(W, S, np.eye(7), fit)


def test_moment_alpha_finds_the_metric_behind_the_targets(rng):
    K = rng.standard_normal((12, 8))
    S = _psd(rng, 8)
    for a_true in (0.0, 0.3, 1.0):
        St = shrink_sigma(S, a_true)
        target = 2.5 * np.einsum("tn,nm,tm->t", K, St, K)  # any common factor
        a, spreads = moment_alpha(K, S, target)
        assert a == a_true
        assert spreads[a] < 1e-10
    with pytest.raises(ValueError, match="target"):
        moment_alpha(K, S, np.ones(5))
    with pytest.raises(ValueError, match="target"):
        moment_alpha(K, S, -np.ones(12))


def test_oas_alpha_in_range_and_shrinks_less_with_more_samples(rng):
    S = _psd(rng, 10)
    vals = [oas_alpha(S, c) for c in (5, 50, 5000)]
    assert all(0.0 <= v <= 1.0 for v in vals)
    assert vals[0] >= vals[1] >= vals[2]
    assert oas_alpha(np.eye(4), 3) == 1.0
    with pytest.raises(ValueError, match="count"):
        oas_alpha(S, 0)


# ------------------------------------------------------------------ torch adapter


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),  # no BatchNorm after it
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 2, 6, 6))  # BatchNorm learns "training" moments
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    model = _model()
    gen = torch.Generator().manual_seed(1)
    # calibration data of another distribution: positive, smaller, shifted
    data = [torch.rand(16, 2, 6, 6, generator=gen) * 0.5 for _ in range(2)]
    stats = collect_covariances(model, data, layers=["3", "6", "10"], progress=False)
    return model, stats


def _copy(stats):
    return {k: (v.sigma.clone(), v.mean.clone(), v.count) for k, v in stats.items()}


def _same(stats, saved):
    return all(torch.equal(v.sigma, saved[k][0]) and torch.equal(v.mean, saved[k][1])
               and v.count == saved[k][2] for k, v in stats.items())


def test_alpha_zero_is_the_identity_with_new_objects(setup):
    _, stats = setup
    out = shrink_covariances(stats, 0.0)
    assert isinstance(out, ShrunkCovariances) and out.rule == "given"
    for k, v in stats.items():
        assert out[k] is not v and out[k].sigma is not v.sigma
        assert torch.equal(out[k].sigma, v.sigma) and torch.equal(out[k].mean, v.mean)


@pytest.mark.parametrize("alpha", [0.4, "auto", "moments", "oas"])
def test_metadata_preserved_inputs_untouched_and_compress_accepts(setup, alpha):
    model, stats = setup
    saved = _copy(stats)
    out = shrink_covariances(stats, alpha, model=model, images=32)
    assert _same(stats, saved)
    assert set(out) == set(stats)
    for k, v in stats.items():
        o = out[k]
        assert (o.count, o.layer, o.groups, o.kind, o.weight_shape, o.geometry) == (
            v.count, v.layer, v.groups, v.kind, v.weight_shape, v.geometry)
        assert o.sigma.dtype == v.sigma.dtype and o.sigma.device == v.sigma.device
        assert 0.0 <= out.alphas[k] <= 1.0
        a = out.alphas[k]
        n = v.sigma.shape[0]
        want = (1 - a) * v.sigma + a * v.sigma.trace() / n * torch.eye(n, dtype=v.sigma.dtype)
        torch.testing.assert_close(o.sigma, want)
        # the centered covariance shrinks the same way
        C = v.centered()
        torch.testing.assert_close(o.centered(),
                                   (1 - a) * C + a * v.sigma.trace() / n
                                   * torch.eye(n, dtype=C.dtype))
    small, report = compress(model, "tucker2", covariances=out, layers=["3"], ratio=2,
                             options={"n_iter_max": 2})
    assert [r["name"] for r in report.layers] == ["3"]
    assert small(torch.rand(2, 2, 6, 6)).shape == (2, 3)


def test_alpha_one_compresses_like_frobenius():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(),
                          nn.Linear(9, 3)).eval()
    data = [torch.rand(64, 10) + 1.0]
    stats = collect_covariances(model, data, layers=["2"], progress=False)
    shrunk = shrink_covariances(stats, 1.0)
    a, _ = compress(model, "svd", covariances=shrunk, layers=["2"], ranks={"2": 3})
    b, _ = compress(model, "svd", covariances=None, layers=["2"], ranks={"2": 3})
    x = torch.rand(5, 10)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)
    c, _ = compress(model, "svd", covariances=stats, layers=["2"], ranks={"2": 3})
    assert not torch.allclose(c(x), b(x), atol=1e-4)  # the unshrunk statistics do differ


def test_auto_rule_is_deterministic_in_range_and_lists_layers_without_batchnorm(setup):
    model, stats = setup
    a = shrink_covariances(stats, "auto", model=model)
    b = shrink_covariances(stats, "auto", model=model)
    assert a.rule == "moments" and a.alphas == b.alphas
    assert all(0.0 <= v <= 1.0 for v in a.alphas.values())
    for k in stats:
        torch.testing.assert_close(a[k].sigma, b[k].sigma, rtol=0, atol=0)
    # layer '6' has no BatchNorm reading its output; "10" is a Linear (none either)
    assert set(a.skipped) == {"6", "10"} and a.alphas["6"] == a.alphas["10"] == 0.0
    assert "BatchNorm" in a.skipped["6"]
    assert set(a.scores) == {"3"}
    # the rule sees the shift: these statistics are not the BatchNorm's
    assert a.alphas["3"] > 0.0


def test_moments_rule_keeps_statistics_that_match_the_batchnorm():
    model, stats, _ = _bn_model_and_data()
    out = shrink_covariances(stats, "moments", model=model)
    assert out.alphas["2"] <= 0.02  # the unbiased running_var is n/(n-1) off


def test_output_moments_finds_the_batchnorm(setup):
    model, _ = setup
    targets, reasons = output_moments(model, ["0", "3", "6", "10"])
    assert set(targets) == {"0", "3"} and set(reasons) == {"6", "10"}
    bn = model[4]
    torch.testing.assert_close(targets["3"], (bn.running_var + bn.running_mean ** 2).double())


def test_holdout_rule(setup):
    model, stats = setup
    gen = torch.Generator().manual_seed(2)
    other = collect_covariances(model, [torch.rand(16, 2, 6, 6, generator=gen) * 0.5],
                                layers=["3", "6", "10"], progress=False)
    saved, saved_o = _copy(stats), _copy(other)
    out = shrink_covariances(stats, "holdout", holdout=other, model=model, method="tucker2",
                             ratio=2, options={"n_iter_max": 2, "rng": 0}, alphas=(0, 0.5, 1))
    assert _same(stats, saved) and _same(other, saved_o)
    assert out.rule == "holdout" and set(out.scores) == set(stats)
    for k in stats:
        assert set(out.scores[k]) == {0.0, 0.5, 1.0}
        assert out.alphas[k] == min(out.scores[k], key=lambda a: (out.scores[k][a], a))
        assert out[k].count == stats[k].count + other[k].count  # applied to all the data
    again = shrink_covariances(stats, "holdout", holdout=other, model=model, method="tucker2",
                               ratio=2, options={"n_iter_max": 2, "rng": 0}, alphas=(0, 0.5, 1))
    assert again.alphas == out.alphas


def test_layers_sharing_statistics_keep_sharing():
    e = torch.eye(3, dtype=torch.float64)
    st = LayerStats(2 * e, torch.zeros(3, dtype=torch.float64), 10)
    out = shrink_covariances({"a": st, "b": st}, 0.2)
    assert out["a"] is out["b"]
    out = shrink_covariances({"a": st, "b": st}, {"a": 0.2})
    assert out["a"] is not out["b"] and out.alphas == {"a": 0.2, "b": 0.0}


@pytest.mark.parametrize("alpha, err, match", [
    (-0.5, ValueError, "alpha"), (2, ValueError, "alpha"), (True, TypeError, "alpha"),
    ("best", ValueError, "alpha='best'"), ([0.1], TypeError, "alpha"),
    (float("inf"), ValueError, "alpha"), ({"nope": 0.1}, ValueError, "nope"),
    ({"3": 1.2}, ValueError, r"alpha\['3'\]"),
])
def test_bad_alpha_adapter(setup, alpha, err, match):
    _, stats = setup
    with pytest.raises(err, match=match):
        shrink_covariances(stats, alpha)


def test_rules_say_what_they_need(setup):
    model, stats = setup
    with pytest.raises(ValueError, match="model="):
        shrink_covariances(stats, "moments")
    with pytest.raises(ValueError, match="holdout="):
        shrink_covariances(stats, "holdout", model=model, ratio=2)
    with pytest.raises(ValueError, match="ratio= or ranks="):
        shrink_covariances(stats, "holdout", holdout=stats, model=model)
    with pytest.raises(ValueError, match="method="):
        shrink_covariances(stats, "holdout", holdout=stats, model=model, ratio=2, method="tt")
    with pytest.raises(TypeError, match="stats"):
        shrink_covariances([1, 2], 0.1)
    assert math.isclose(shrink_covariances(stats, "oas", images=10**9).alphas["3"], 0.0,
                        abs_tol=1e-6)


@pytest.mark.slow
def test_benchmark_quick_runs(tmp_path):
    """benchmarks/transfer.py --quick end to end (minutes: Fashion-MNIST, digits, 10 fits)."""
    from sigmadecomp.datasets import DatasetNotFoundError, find_fashion_mnist

    pytest.importorskip("sklearn")
    try:
        find_fashion_mnist()
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    from benchmarks import transfer as bench

    out = bench.main(["--quick", "--out", str(tmp_path / "t.json")], log=lambda *a: None)
    labels = {r["row"] for r in out["rows"]}
    assert labels == {"frobenius", "sigma", "digits", "digits+moments", "digits+a=0.5"}
    moments = next(r for r in out["rows"] if r["row"] == "digits+moments")
    assert all(0.0 <= a <= 1.0 for a in moments["alphas"].values())
    assert (tmp_path / "t.json").exists()


# ------------------------------------------------------------------ mixture with a prior


def test_mix_sigma_endpoints_scale_and_psd(lib, rng):
    from sigmadecomp.shrinkage import mix_sigma

    S, P = _psd(rng, 6, m=4), 7.0 * _psd(rng, 6)
    S_, P_ = lib.asarray(S), lib.asarray(P)
    keep_S, keep_P = lib.to_numpy(S_).copy(), lib.to_numpy(P_).copy()
    tol = dict(rtol=lib.rtol, atol=lib.rtol * np.trace(S))
    out = mix_sigma(S_, P_, 0.3, 0.0)
    assert lib.is_same_kind(out)
    np.testing.assert_allclose(lib.to_numpy(out), lib.to_numpy(shrink_sigma(S_, 0.3)), **tol)
    np.testing.assert_allclose(lib.to_numpy(mix_sigma(S_, P_, 0.3, 1.0)),
                               P * np.trace(S) / np.trace(P), **tol)
    for a, w in ((0.0, 0.4), (0.5, 0.7)):
        m = mix_sigma(S_, P_, a, w)
        assert lib.is_same_kind(m)
        m = lib.to_numpy(m)
        assert np.isclose(np.trace(m), np.trace(S), rtol=lib.rtol)
        assert np.linalg.eigvalsh(m).min() >= -lib.rtol * np.trace(S)
        expect = (1 - w) * shrink_sigma(S, a) + w * P * np.trace(S) / np.trace(P)
        np.testing.assert_allclose(m, expect, **tol)
    np.testing.assert_array_equal(lib.to_numpy(S_), keep_S)
    np.testing.assert_array_equal(lib.to_numpy(P_), keep_P)


def test_mix_sigma_takes_the_prior_to_sigmas_library(rng):
    from sigmadecomp.shrinkage import mix_sigma

    S, P = _psd(rng, 5), _psd(rng, 5)
    expect = mix_sigma(S, P, 0.2, 0.3)
    out = mix_sigma(S, torch.from_numpy(P), 0.2, 0.3)  # NumPy sigma, torch prior
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, expect, rtol=1e-12)
    out = mix_sigma(torch.from_numpy(S), P, 0.2, 0.3)  # and the other way round
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-12)


def test_mix_sigma_bad_input(rng):
    from sigmadecomp.shrinkage import mix_sigma

    S = _psd(rng, 4)
    with pytest.raises(ValueError, match="prior"):
        mix_sigma(S, np.eye(3), 0.1, 0.5)
    with pytest.raises(ValueError, match="weight"):
        mix_sigma(S, np.eye(4), 0.1, 1.5)
    with pytest.raises(ValueError, match="prior"):
        mix_sigma(S, np.zeros((4, 4)), 0.1, 0.5)


def test_moment_mixture_finds_the_mixture_behind_the_targets(rng):
    from sigmadecomp.shrinkage import mix_sigma, moment_mixture

    K = rng.standard_normal((16, 8))
    S, P = _psd(rng, 8), _psd(rng, 8) * np.linspace(3.0, 0.2, 8)[:, None]
    P = (P + P.T) / 2 + np.eye(8)
    for a_true, w_true in ((0.0, 0.0), (0.3, 0.5), (0.0, 1.0), (0.7, 0.2)):
        target = 3.0 * np.einsum("tn,nm,tm->t", K, mix_sigma(S, P, a_true, w_true), K)
        (a, w), spreads = moment_mixture(K, S, P, target)
        assert w == w_true and (a == a_true or w == 1.0)
        assert spreads[(a, w)] < 1e-10
    # without a prior in play (w = 0 only) it is moment_alpha
    target = np.einsum("tn,nm,tm->t", K, shrink_sigma(S, 0.3), K)
    assert moment_mixture(K, S, P, target, weights=(0.0,))[0] == (0.3, 0.0)
    assert moment_alpha(K, S, target)[0] == 0.3
    with pytest.raises(ValueError, match="prior"):
        moment_mixture(K, S, np.eye(7), target)
    with pytest.raises(ValueError, match="target"):
        moment_mixture(K, S, P, np.ones(3))


def _run_once_in_training_mode(model, x):
    """With ``momentum=None`` the BatchNorm running statistics become exactly those of ``x``."""
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def _bn_model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, padding=1, bias=False),
                          nn.BatchNorm2d(8, momentum=None),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 2))
    x = torch.randn(64, 3, 5, 5)
    _run_once_in_training_mode(model, x)
    train = collect_covariances(model, [x], layers=["2"], progress=False)
    other = collect_covariances(model, [torch.rand(64, 3, 5, 5) * 0.3 + 0.5], layers=["2"],
                                progress=False)
    return model, train, other


def test_moments_rule_with_a_prior_prefers_the_statistics_that_match():
    model, train, other = _bn_model_and_data()
    saved_t, saved_o = _copy(train), _copy(other)
    # the prior reproduces the BatchNorm moments, the calibration data do not
    out = shrink_covariances(other, "auto", model=model, prior=train)
    assert out.weights["2"] >= 0.8
    plain = shrink_covariances(other, "auto", model=model)
    assert plain.weights == {"2": 0.0}
    assert min(out.scores["2"].values()) < min(plain.scores["2"].values())
    # the other way round the prior is not wanted
    back = shrink_covariances(train, "auto", model=model, prior=other)
    assert back.weights["2"] <= 0.1
    assert _same(train, saved_t) and _same(other, saved_o)


def test_prior_mixture_is_a_valid_moment_pair_and_compress_accepts(setup):
    model, stats = setup
    gen = torch.Generator().manual_seed(3)
    prior = collect_covariances(model, [torch.randn(16, 2, 6, 6, generator=gen)],
                                layers=["3"], progress=False)
    out = shrink_covariances(stats, "moments", model=model, prior=prior, weights=(0.5,),
                             alphas=(0.2,))
    assert out.weights == {"3": 0.5, "6": 0.0, "10": 0.0} and out.alphas["3"] == 0.2
    st, p = stats["3"], prior["3"]
    c = float(torch.trace(st.sigma) / torch.trace(p.sigma))
    expect = 0.5 * shrink_sigma(st.sigma, 0.2) + 0.5 * c * p.sigma
    torch.testing.assert_close(out["3"].sigma, expect.to(st.sigma))
    mean = 0.5 * math.sqrt(0.8) * st.mean + 0.5 * math.sqrt(c) * p.mean
    torch.testing.assert_close(out["3"].mean, mean.to(st.mean))
    cov = (out["3"].sigma - torch.outer(out["3"].mean, out["3"].mean)).double()
    assert torch.linalg.eigvalsh(cov).min() > -1e-8 * float(cov.diagonal().max())
    assert out["3"].count == st.count and "weights={3: 0.5}" in repr(out)
    small, report = compress(model, "tucker2", covariances=out, ratio=2, layers=["3"],
                             options={"n_iter_max": 2}, progress=False)
    assert [r["name"] for r in report.layers] == ["3"]


@pytest.mark.parametrize("alpha, shown", [(0.5, "0.5"), ("oas", "'oas'")])
@pytest.mark.parametrize("option", ["prior", "match"])
def test_prior_and_match_need_the_moments_rule(setup, option, alpha, shown):
    model, stats = setup
    kw, word = ({"prior": stats}, "prior=") if option == "prior" else ({"match": True},
                                                                        "match=True")
    with pytest.raises(ValueError, match=f"{word} is not allowed with alpha={shown}"):
        shrink_covariances(stats, alpha, **kw)


def test_prior_bad_input(setup):
    model, stats = setup
    bad = {"3": stats["6"]}
    with pytest.raises(ValueError, match=r"prior\['3'\]"):
        shrink_covariances(stats, "auto", model=model, prior=bad)
    with pytest.raises(TypeError, match="prior"):
        shrink_covariances(stats, "auto", model=model, prior=[1])


def test_moments_rule_models_a_layer_with_a_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=None),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 2))
    with torch.no_grad():
        model[0].bias.copy_(torch.linspace(-2.0, 3.0, 6))  # far from zero
    x = torch.randn(64, 3, 5, 5)
    _run_once_in_training_mode(model, x)
    stats = collect_covariances(model, [x], layers=["0"], progress=False)
    targets, reasons = output_moments(model, ["0"])
    assert reasons == {}
    # the mean square of K x (the output without its bias) on the same batch
    K = model[0].weight.detach().double().reshape(6, -1)
    expect = torch.einsum("ti,ij,tj->t", K, stats["0"].sigma, K)
    torch.testing.assert_close(targets["0"], expect, rtol=2e-3, atol=0)  # running_var: n/(n-1)
    out = shrink_covariances(stats, "moments", model=model)
    assert out.skipped == {} and out.alphas["0"] <= 0.02


# ------------------------------------------------------------------ match_moments


def _kl(S1, S0):
    """KL(N(0, S1) || N(0, S0)) for positive definite matrices."""
    n = S0.shape[0]
    M = np.linalg.solve(S0, S1)
    return 0.5 * (np.trace(M) - n - np.linalg.slogdet(M)[1])


def test_match_moments_hits_the_targets_with_the_kkt_structure(lib, rng):
    T, n = 5, 12
    K = rng.standard_normal((T, n))
    S = _psd(rng, n)
    t = rng.uniform(0.3, 3.0, T)
    S_in, K_in = lib.asarray(S), lib.asarray(K)
    saved = lib.to_numpy(S_in).copy()
    out = match_moments(K_in, S_in, t)
    assert lib.is_same_kind(out.sigma)
    np.testing.assert_array_equal(lib.to_numpy(S_in), saved)
    Sp = lib.to_numpy(out.sigma)
    float64 = lib.dtype_name == "float64"
    tol = 1e-9 if float64 else 1e-5
    # every output channel has c * target, c the geometric mean of the old ratios
    S64, K64 = lib.to_numpy(S_in), lib.to_numpy(K_in)
    q = np.einsum("tn,nm,tm->t", K64, S64, K64)
    assert out.scale == pytest.approx(np.exp(np.mean(np.log(q / t))), rel=1e-12)
    np.testing.assert_allclose(np.einsum("tn,nm,tm->t", K64, Sp, K64), out.scale * t, rtol=tol)
    assert np.linalg.eigvalsh(Sp).min() > -tol * np.trace(Sp)
    # stationarity of the KL projection: Sp^-1 - S^-1 = K^T diag(lam) K
    if float64:
        lhs = np.linalg.inv(Sp) - np.linalg.inv(S64)
        rhs = K64.T @ np.diag(out.multipliers) @ K64
        np.testing.assert_allclose(lhs, rhs, atol=1e-6 * np.abs(rhs).max())


def test_match_moments_is_the_nearest_in_kl_among_feasible_matrices(rng):
    # with K = I the constraint is diag(S') = c t; D S D (D diagonal) is another feasible S'
    n = 6
    S = _psd(rng, n)
    t = rng.uniform(0.5, 2.0, n)
    out = match_moments(np.eye(n), S, t)
    np.testing.assert_allclose(np.diag(out.sigma), out.scale * t, rtol=1e-10)
    D = np.diag(np.sqrt(out.scale * t / np.diag(S)))
    other = D @ S @ D
    np.testing.assert_allclose(np.diag(other), out.scale * t, rtol=1e-12)
    assert _kl(out.sigma, S) < _kl(other, S)
    for _ in range(5):  # and than random feasible perturbations of the solution
        E = rng.standard_normal((n, n)) * 1e-3
        E = E + E.T
        np.fill_diagonal(E, 0.0)
        assert _kl(out.sigma, S) <= _kl(out.sigma + E, S) + 1e-14


def test_match_moments_keeps_sigma_when_the_targets_already_agree(rng):
    K = rng.standard_normal((4, 9))
    S = _psd(rng, 9)
    q = np.einsum("tn,nm,tm->t", K, S, K)
    out = match_moments(K, S, 3.0 * q)
    np.testing.assert_allclose(out.sigma, S, rtol=1e-12, atol=1e-14 * np.trace(S))
    np.testing.assert_allclose(out.multipliers, 0.0, atol=1e-12)
    assert out.scale == pytest.approx(1.0 / 3.0)


def test_match_moments_zero_rows_and_out_of_reach_targets(rng):
    from sigmadecomp.exceptions import CompressionWarning

    K = rng.standard_normal((5, 9))
    K[2] = 0.0  # carries no information: left out
    S = _psd(rng, 9)
    t = np.array([1.0, 2.0, 5.0, 0.5, 0.0])  # a zero target (constant channel): left out too
    out = match_moments(K, S, t)
    assert out.multipliers[2] == 0.0 and out.multipliers[4] == 0.0
    got = np.einsum("tn,nm,tm->t", K, out.sigma, K)
    np.testing.assert_allclose(got[[0, 1, 3]], out.scale * t[[0, 1, 3]], rtol=1e-9)
    alpha, _ = moment_alpha(K, S, t)  # the selection rules leave zeros out the same way
    assert 0.0 <= alpha <= 1.0
    # more channels than sigma has rank: no sigma' on sigma's support has these energies
    X = rng.standard_normal((9, 2))
    S2 = X @ X.T
    K2 = rng.standard_normal((5, 9))
    with pytest.warns(CompressionWarning, match=r"match their targets only to .*rank 2"):
        bad = match_moments(K2, S2, np.array([1.0, 9.0, 0.2, 4.0, 1.0]))
    assert np.all(np.isfinite(bad.sigma))
    assert np.linalg.eigvalsh(bad.sigma).min() > -1e-9 * np.trace(bad.sigma)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(target=np.ones(3)), ValueError, r"target has shape \(3,\); it must be \(4,\)"),
    (dict(target=np.array([1.0, -1.0, 1.0, 1.0])), ValueError, "finite and non-negative"),
    (dict(sigma=np.diag([1.0] * 8 + [-1.0])), ValueError,
     "sigma is not positive semi-definite: smallest eigenvalue -1"),
    (dict(maxiter=0), ValueError, "maxiter=0 is not allowed"),
    (dict(sigma=np.eye(5)), ValueError, r"sigma has shape \(5, 5\); it must be \(9, 9\)"),
    (dict(sigma=np.full((9, 9), np.nan)), ValueError, "sigma"),
])
def test_match_moments_bad_input(rng, kwargs, err, match):
    args = dict(weight=rng.standard_normal((4, 1, 3, 3)), sigma=np.eye(9), target=np.ones(4))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        match_moments(args.pop("weight"), args.pop("sigma"), args.pop("target"), **args)


def test_match_true_gives_the_batchnorm_energies_and_a_valid_pair():
    model, train, other = _bn_model_and_data()
    saved = _copy(other)
    out = shrink_covariances(other, "auto", model=model, match=True)
    plain = shrink_covariances(other, "auto", model=model)
    assert _same(other, saved) and out.alphas == plain.alphas
    targets, _ = output_moments(model, ["2"])
    K = model[2].weight.detach().double().reshape(8, -1)
    st = out["2"]
    got = torch.einsum("ti,ij,tj->t", K, st.sigma.double(), K)
    torch.testing.assert_close(got, out.scales["2"] * targets["2"], rtol=1e-8, atol=0)
    before = torch.einsum("ti,ij,tj->t", K, plain["2"].sigma.double(), K)
    assert float(torch.std(torch.log(before / targets["2"]))) > 1e-3  # the rule alone: rough
    cov = (st.sigma - torch.outer(st.mean, st.mean)).double()
    assert torch.linalg.eigvalsh(cov).min() > -1e-9 * float(cov.diagonal().max())
    assert st.sigma.dtype == other["2"].sigma.dtype and st.count == other["2"].count
    small, report = compress(model, "tucker2", covariances=out, ratio=2, layers=["2"],
                             options={"n_iter_max": 2}, progress=False)
    assert [r["name"] for r in report.layers] == ["2"]


def test_match_true_with_a_prior_leaves_skipped_layers_alone(setup):
    model, stats = setup
    gen = torch.Generator().manual_seed(3)
    prior = collect_covariances(model, [torch.randn(16, 2, 6, 6, generator=gen)],
                                layers=["3"], progress=False)
    out = shrink_covariances(stats, "moments", model=model, prior=prior, match=True)
    assert set(out.scales) == {"3"} and "6" in out.skipped
    torch.testing.assert_close(out["6"].sigma, stats["6"].sigma, rtol=0, atol=0)
    targets, _ = output_moments(model, ["3"])
    K = model[3].weight.detach().double().reshape(8, -1)
    got = torch.einsum("ti,ij,tj->t", K, out["3"].sigma.double(), K)
    torch.testing.assert_close(got, out.scales["3"] * targets["3"], rtol=1e-8, atol=0)


def test_match_must_be_a_bool(setup):
    model, stats = setup
    with pytest.raises(TypeError, match="match='yes' is not allowed"):
        shrink_covariances(stats, "auto", model=model, match="yes")


def test_match_moments_targets_spread_over_decades():
    # full-rank rows and a positive definite sigma: any positive targets are reachable,
    # also six decades apart (the solution then lies near the boundary of the dual)
    rng = np.random.default_rng(3)
    A = rng.standard_normal((12, 40))
    S = A @ A.T / 40
    K = rng.standard_normal((5, 12))
    t = np.array([1e-3, 1.0, 1.0, 1.0, 1e3])
    out = match_moments(K, S, t)
    np.testing.assert_allclose(np.einsum("tn,nm,tm->t", K, out.sigma, K), out.scale * t,
                               rtol=1e-8)
    assert np.linalg.eigvalsh(out.sigma).min() > -1e-9 * np.trace(out.sigma)


def test_match_warning_names_the_layer_and_the_callers_line():
    from sigmadecomp.exceptions import CompressionWarning

    torch.manual_seed(0)
    # 32 inputs seen through 2 batches of 1 image: a rank-2 statistic for 8 channels
    model = nn.Sequential(nn.Linear(32, 8, bias=False), nn.BatchNorm1d(8))
    _run_once_in_training_mode(model, torch.randn(64, 32))
    stats = collect_covariances(model, [torch.randn(1, 32), torch.randn(1, 32)], layers=["0"],
                                progress=False)
    with pytest.warns(CompressionWarning, match=r"match=True, layer '0': .*rank 2") as rec:
        shrink_covariances(stats, "auto", model=model, match=True, alphas=(0.0,))
    assert any(w.filename == __file__ for w in rec)


def test_targets_are_checked_by_layer(setup):
    model, stats = setup
    with pytest.raises(ValueError, match=r"targets names layers \['zz'\]"):
        shrink_covariances(stats, "auto", model=model, targets={"zz": torch.ones(8)})
    with pytest.raises(ValueError, match=r"targets\['6'\] has shape \(3,\); it must be \(8,\)"):
        shrink_covariances(stats, "auto", model=model, targets={"6": torch.ones(3)})
    with pytest.raises(ValueError, match=r"targets\['6'\] must be finite and non-negative"):
        shrink_covariances(stats, "auto", model=model, targets={"6": -torch.ones(8)})
    # a zero target (constant channel) is allowed and left out
    t = torch.ones(8)
    t[3] = 0.0
    out = shrink_covariances(stats, "auto", model=model, targets={"6": t}, match=True)
    assert "6" in out.scales and "6" not in out.skipped


def test_output_moments_finds_sync_batchnorm():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.SyncBatchNorm(4), nn.ReLU())
    model.eval()
    targets, reasons = output_moments(model, ["0"])
    assert reasons == {} and targets["0"].shape == (4,)
