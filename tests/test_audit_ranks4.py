"""Audit of rank selection: ratio -> ranks against brute force, the budget allocation
against enumeration of every rank combination, EVBMF against a separate transcription of
the published global analytic solution, and the scale-freedom of the error curves."""

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy.optimize import brentq, minimize_scalar

from sigmadecomp.ranks import (LayerSpec, allocate, error_curve, evbmf, evbmf_ranks,
                               layer_params, ratio_to_ranks)
from sigmadecomp.costs import proportional_pairs

SHAPES = [(1, 1, 1, 1), (1, 5, 1, 3), (7, 2, 1, 1), (2, 9, 3, 1), (20, 1, 3, 3),
          (1, 20, 3, 3), (9, 4, 2, 5), (4, 30, 1, 1)]
RATIOS = [1.01, 1.5, 3, 4.7, 20, 1000]


def _largest_feasible(shape, method, choices, target):
    counts = [layer_params(shape, method, r) for r in choices]
    feasible = [c for c in counts if c <= target]
    return max(feasible) if feasible else min(counts)


@pytest.mark.parametrize("shape", SHAPES)
def test_ratio_to_ranks_is_the_largest_feasible_count_by_brute_force(shape):
    T, S, H, W = shape
    dense = T * S * H * W
    every_pair = list(itertools.product(range(1, T + 1), range(1, S + 1)))
    rt, rs = proportional_pairs(T, S)
    prop_pairs = list(zip(rt.tolist(), rs.tolist()))
    for rx in RATIOS:
        target = dense / rx
        for method, choices, kw in (
                ("svd", range(1, min(T, S * H * W) + 1), {}),
                ("cp", range(1, dense + 1), {}),
                ("tucker2", prop_pairs, {"keep_proportion": True}),
                ("tucker2", every_pair, {"keep_proportion": False})):
            got = layer_params(shape, method, ratio_to_ranks(shape, method, rx, **kw))
            assert got == _largest_feasible(shape, method, choices, target), (method, rx, kw)


def _tiny_layers(rng, n):
    layers = {}
    for i in range(n):
        T, S = (int(v) for v in rng.integers(1, 5, 2))
        H, W = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        decay = 0.5 ** (rng.uniform(0, 3) * np.arange(T))
        layers[f"l{i}"] = LayerSpec(rng.standard_normal((T, S, H, W)) * decay[:, None, None, None])
    return layers


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
def test_allocation_matches_enumeration_of_every_rank_combination(method):
    rng = np.random.default_rng({"svd": 1, "tucker2": 2, "cp": 3}[method])
    for _ in range(4):
        layers = _tiny_layers(rng, 3)
        curves = [error_curve(s.weight, method) for s in layers.values()]
        dense = sum(s.weight.size for s in layers.values())
        least = sum(int(c.params[0]) for c in curves)
        for budget in sorted({least, int(0.4 * dense), int(0.8 * dense)}):
            if budget < least:
                continue
            rows = []
            for combo in itertools.product(*(range(len(c.ranks)) for c in curves)):
                if sum(int(c.params[k]) for c, k in zip(curves, combo)) <= budget:
                    errs = [float(c.errors[k]) for c, k in zip(curves, combo)]
                    rows.append((sum(errs), max(errs)))
            best_sum = min(r[0] for r in rows)
            best_max = min(r[1] for r in rows)
            sum_at_max = min(r[0] for r in rows if r[1] <= best_max + 1e-12)
            a = allocate(layers, budget, method=method, solver="exact")
            b = allocate(layers, budget, method=method, objective="max")
            for res in (a, b):
                recount = sum(layer_params(layers[k].weight.shape, method, r)
                              for k, r in res.ranks.items())
                assert recount == res.total_cost <= budget
            assert a.sum_error == pytest.approx(best_sum, abs=1e-12)
            assert b.max_error == pytest.approx(best_max, abs=1e-12)
            assert b.sum_error == pytest.approx(sum_at_max, abs=1e-12)


# ------------------------------------------------------------------ error curves: scale


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
@pytest.mark.parametrize("scale", [1e-170, 1e160])
def test_error_curve_is_scale_free_for_extreme_weights(method, scale):
    # relative errors do not depend on the scale of the weight; the squared singular
    # values used to underflow (every error 0) or overflow (NaN errors and warnings)
    w = np.random.default_rng(0).standard_normal((6, 4, 3, 3))
    ref = error_curve(w, method).errors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = error_curve(w * scale, method).errors
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_allocation_of_a_huge_weight_is_not_nan():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4, 3, 3))
    v = rng.standard_normal((8, 4, 3, 3)) * 0.5 ** np.arange(8)[:, None, None, None]
    ref = allocate({"a": w, "b": v}, 0.5, method="svd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big = allocate({"a": w * 1e160, "b": v * 1e160}, 0.5, method="svd")
    assert big.ranks == ref.ranks
    assert math.isfinite(big.sum_error)
    assert big.sum_error == pytest.approx(ref.sum_error, rel=1e-9)


def test_error_curve_refuses_a_bad_max_exact_even_when_unused():
    w = np.random.default_rng(0).standard_normal((6, 4, 3, 3))
    with pytest.raises(TypeError, match="max_exact='x'"):
        error_curve(w, "svd", max_exact="x")
    with pytest.raises(ValueError, match="max_exact=1 .*at least 2"):
        error_curve(w, "tucker2", max_exact=1)


def test_sigma_requiring_grad_gives_no_autograd_warning():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w = torch.tensor(rng.standard_normal((6, 4, 3, 3)))
    X = rng.standard_normal((100, 36))
    sigma = torch.tensor(X.T @ X / 100, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = error_curve(w, "tucker2", sigma).errors
        r = evbmf_ranks(w, "tucker2", sigma)
    np.testing.assert_allclose(got, error_curve(w, "tucker2", sigma.detach()).errors)
    assert r == evbmf_ranks(w, "tucker2", sigma.detach())


# ------------------------------------------------------------------ EVBMF


def _evb_reference(Y):
    """The EVB global analytic solution written from the paper's formulas."""
    L, M = sorted(Y.shape)
    alpha = L / M
    g = np.linalg.svd(np.asarray(Y, dtype=np.float64), compute_uv=False)

    def psi(t):
        return math.log1p(t) + alpha * math.log1p(t / alpha) - t

    t_low = brentq(psi, math.sqrt(alpha), 100.0 * (1.0 + math.sqrt(alpha)))
    x_low = (1.0 + t_low) * (1.0 + alpha / t_low)

    def free_energy(s2):
        x = g * g / (M * s2)
        total = float(np.sum(x + np.log(s2)))
        for xh in x[x > x_low]:
            b = xh - 1.0 - alpha
            total += psi(0.5 * (b + math.sqrt(max(b * b - 4.0 * alpha, 0.0))))
        return total

    hi = float(np.sum(g * g)) / (L * M)
    grid = np.geomspace(hi * 1e-10, hi * 2.0, 3000)
    vals = [free_energy(s) for s in grid]
    i = int(np.argmin(vals))
    res = minimize_scalar(lambda u: free_energy(math.exp(u)), method="bounded",
                          bounds=(math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, 2999)])),
                          options={"xatol": 1e-12})
    s2 = math.exp(res.x) if res.fun < vals[i] else float(grid[i])
    threshold = math.sqrt(M * s2 * x_low)
    return int(np.sum(g > threshold)), s2, threshold


@pytest.mark.parametrize("m,n,k,noise", [(30, 30, 4, 0.1), (60, 5, 2, 0.05), (5, 60, 2, 0.05),
                                         (12, 40, 0, 1.0), (25, 9, 3, 1e-3)])
def test_evbmf_matches_a_separate_transcription_of_the_paper(m, n, k, noise):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(m * n + k)
    X = 3.0 * rng.standard_normal((m, k)) @ rng.standard_normal((k, n))
    Y = X + noise * rng.standard_normal((m, n))
    rank, s2, thr = _evb_reference(Y)
    assert rank == k
    for arg in (Y, Y.astype(np.float32), torch.tensor(Y), torch.tensor(Y, dtype=torch.float32)):
        ref_rank, ref_s2, ref_thr = (rank, s2, thr) if arg is Y else _evb_reference(
            np.asarray(arg.numpy() if hasattr(arg, "numpy") else arg, dtype=np.float64))
        res = evbmf(arg)
        assert res.evb_rank == ref_rank
        # the free energy is flat at its minimum: both searches stop within ~1e-4
        assert res.sigma2 == pytest.approx(ref_s2, rel=5e-4)
        assert res.threshold == pytest.approx(ref_thr, rel=5e-4)
    assert evbmf(Y).sigma2 == pytest.approx(noise ** 2, rel=0.35)


# ------------------------------------------------------------------ fractional budgets


@pytest.mark.parametrize("shape,fraction,rank", [((4, 25), 0.29, 1), ((6, 15), 0.7, 3),
                                                 ((12, 30), 0.35, 3)])
def test_fractional_budget_is_not_lost_to_rounding(shape, fraction, rank):
    # fraction * dense is an exact integer that floating point rounds just below
    # (0.29 * 100 = 28.999999999999996); the budget is that integer, as in ratio_to_ranks
    w = np.random.default_rng(0).standard_normal(shape)
    dense = shape[0] * shape[1]
    a = allocate({"a": w}, fraction, method="svd")
    assert a.budget == round(fraction * dense)
    assert a.ranks == {"a": rank}
    assert a.total_cost == layer_params(shape, "svd", rank) == a.budget


# ------------------------------------------------------------------ method arguments


@pytest.mark.parametrize("method", ["bogus", 5, {"fc": "nope"}])
def test_allocate_refuses_an_unknown_method_for_a_linear_layer(method):
    # Linear layers always use 'svd', but a misspelt method must not pass silently
    w = np.random.default_rng(0).standard_normal((6, 15))
    with pytest.raises(ValueError, match="method=.* is not allowed; method must be one of"):
        allocate({"fc": w}, 0.5, method=method)
    assert allocate({"fc": w}, 0.5, method="tucker2").methods == {"fc": "svd"}


def test_an_unhashable_method_gets_the_method_error():
    w = np.random.default_rng(0).standard_normal((6, 15))
    for call in (lambda: ratio_to_ranks((4, 4, 3, 3), ["svd"], 2),
                 lambda: layer_params((4, 4), ["svd"], 1),
                 lambda: allocate({"fc": w}, 0.5, method=["svd"])):
        with pytest.raises(ValueError, match=r"method=\['svd'\] is not allowed"):
            call()
