"""The solver contract: every decomposition takes the same options and returns the same result."""

import inspect
import warnings

import numpy as np
import pytest

from sigmadecomp import (
    DecompositionResult,
    InnerSolver,
    cp,
    sigma_svd,
    tt_conv,
    tt_linear,
    tucker2,
)
from sigmadecomp.contract import relative_error, tol_reached
from _helpers import random_psd  # noqa: E402

T, S, H, W = 6, 4, 2, 2
N = S * H * W
COMMON = ("init", "n_iter_max", "tol", "rng", "callback", "rtol", "ridge", "inner")

# name -> (solver, weight shape, rank argument, extra keywords)
SOLVERS = {
    "sigma_svd": (sigma_svd, (T, N), 3, {}),
    "tucker2": (tucker2, (T, S, H, W), (3, 2), {}),
    "cp": (cp, (T, S, H, W), 3, {"inner": {"maxiter": 50}}),
    "tt_conv": (tt_conv, (T, S, H, W), (3, 4), {"in_modes": (2, 2), "out_modes": (2, 3)}),
    "tt_linear": (tt_linear, (T, N), 3, {"in_modes": (4, 4), "out_modes": (2, 3)}),
}
ITERATIVE = [name for name in SOLVERS if name != "sigma_svd"]


@pytest.fixture
def problem():
    rng = np.random.default_rng(7)
    K = rng.standard_normal((T, S, H, W))
    return K, random_psd(rng, N)


def _run(name, K, Sig, **kw):
    fn, shape, rank, extra = SOLVERS[name]
    return fn(K.reshape(shape), rank, Sig, **{**extra, **kw})


@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_solver_has_the_common_signature(name):
    params = inspect.signature(SOLVERS[name][0]).parameters
    names = list(params)
    assert names[2] == "sigma" and params["sigma"].default is None
    assert params[names[0]].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params[names[1]].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    for option in COMMON:
        assert params[option].kind is inspect.Parameter.KEYWORD_ONLY, option


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("weighted", [False, True])
def test_every_solver_accepts_the_common_options_and_returns_the_common_result(
        problem, name, weighted):
    K, Sig = problem
    res = _run(name, K, Sig if weighted else None, init="svd", n_iter_max=3, tol=1e-6, rng=0,
               callback=lambda r: None, rtol=1e-10, ridge=0.0,
               inner=InnerSolver(rtol=1e-3) if name != "cp" else {"rtol": 1e-3, "maxiter": 20})
    assert isinstance(res, DecompositionResult)
    assert isinstance(res.factors, tuple) and len(res.factors) >= 2
    assert isinstance(res.errors, list) and all(isinstance(e, float) for e in res.errors)
    assert res.error == res.errors[-1]
    if name == "sigma_svd":  # a closed form: no sweeps, no tolerance
        assert res.n_iter is None and res.converged is None
    else:
        assert isinstance(res.n_iter, int) and isinstance(res.converged, bool)
    assert res.ridge == 0.0 and res.weighted == weighted
    assert (res.sigma_error is None) == (not weighted)
    if weighted:
        assert res.sigma_error == res.error  # ridge=0: the metric minimised is sigma itself
    rebuilt = res.to_tensor()
    assert rebuilt.size == K.size
    D = K.reshape(T, -1) - rebuilt.reshape(T, -1)
    M = Sig if weighted else np.eye(N)
    ref = np.sqrt(np.sum((D @ M) * D) / np.sum((K.reshape(T, -1) @ M) * K.reshape(T, -1)))
    assert res.error == pytest.approx(ref, rel=1e-7, abs=1e-12)
    for f in res.factors:
        assert f.dtype == K.dtype


@pytest.mark.parametrize("name", ITERATIVE)
def test_callback_sees_every_error_entry_and_can_stop(problem, name):
    K, Sig = problem
    seen = []

    def stop_after_two(r):
        assert type(r).__name__ == type(_run(name, K, Sig, n_iter_max=0)).__name__
        seen.append((r.n_iter, r.errors[-1]))
        return r.n_iter == 2

    res = _run(name, K, Sig, n_iter_max=20, tol=0.0, callback=stop_after_two)
    assert res.n_iter == 2 and not res.converged
    assert [s[0] for s in seen] == [0, 1, 2]
    assert [s[1] for s in seen] == res.errors
    at_start = _run(name, K, Sig, n_iter_max=20, tol=0.0, callback=lambda r: True)
    assert at_start.n_iter == 0 and len(at_start.errors) == 1 and not at_start.converged
    # no sweep run: no convergence either (only the tol rule sets it)
    for kw in ({}, {"callback": lambda r: True}):
        none = _run(name, K, Sig, n_iter_max=0, **kw)
        assert none.n_iter == 0 and none.converged is False, kw


def test_closed_form_calls_the_callback_once(problem):
    K, Sig = problem
    seen = []
    res = _run("sigma_svd", K, Sig, callback=seen.append)
    assert seen == [res]
    assert res.n_iter is None and res.converged is None and res.errors == [res.error]


@pytest.mark.parametrize("name", ITERATIVE)
def test_tol_means_the_same_for_every_solver(problem, name):
    K, Sig = problem
    # the full history without the stopping rule, then the run with a tolerance
    # chosen from it: it must stop at the first sweep that meets the documented rule
    full = _run(name, K, Sig, init="random", rng=3, n_iter_max=8, tol=0.0)
    e = full.errors
    assert full.n_iter == 8 and len(e) == 9
    decrease = [(e[k - 1] - e[k]) / e[k - 1] for k in range(1, 9)]
    t = max(d for d in decrease[1:] if d < decrease[0])  # not met by the first sweep
    first = next(k for k in range(1, 9) if tol_reached(e[k - 1], e[k], t))
    res = _run(name, K, Sig, init="random", rng=3, n_iter_max=8, tol=t)
    assert first > 1 and res.converged and res.n_iter == first
    np.testing.assert_allclose(res.errors, e[:first + 1], rtol=1e-12)


def test_tol_rule():
    assert tol_reached(1.0, 0.9995, 1e-3) and not tol_reached(1.0, 0.99, 1e-3)
    assert not tol_reached(1.0, 1.0, 0.0)  # tol=0 switches the rule off
    assert relative_error(0.0, 0.0) == 0.0 and relative_error(1.0, 0.0) == float("inf")
    assert relative_error(-1e-30, 1.0) == 0.0 and relative_error(9.0, 4.0) == 1.5


@pytest.mark.parametrize("name", ["tucker2", "cp", "tt_conv"])
def test_inner_options_as_object_or_dict(problem, name):
    K, Sig = problem
    a = _run(name, K, Sig, n_iter_max=3, inner=InnerSolver(rtol=1e-4, maxiter=7))
    b = _run(name, K, Sig, n_iter_max=3, inner={"rtol": 1e-4, "maxiter": 7})
    np.testing.assert_array_equal(a.to_tensor(), b.to_tensor())
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['cg_rtol'\]"):
        _run(name, K, Sig, inner={"cg_rtol": 1e-4})
    with pytest.raises(TypeError, match="inner of type str is not allowed"):
        _run(name, K, Sig, inner="cg")


def test_tt_modes_are_keyword_only(problem):
    K, Sig = problem
    new = tt_conv(K, 4, Sig, n_iter_max=2)  # ranks=4, sigma=Sig
    assert new.weighted and max(new.ranks) <= 4
    same = tt_conv(K, ranks=4, sigma=Sig, n_iter_max=2)
    np.testing.assert_array_equal(new.to_tensor(), same.to_tensor())
    with pytest.warns(DeprecationWarning, match=r"use tt_conv\(weight, ranks, sigma, in_modes"):
        old = tt_conv(K, (2, 2), (2, 3), (3, 4), Sig, n_iter_max=2)
    ref = tt_conv(K, (3, 4), Sig, in_modes=(2, 2), out_modes=(2, 3), n_iter_max=2)
    np.testing.assert_array_equal(old.to_tensor(), ref.to_tensor())
    with pytest.warns(DeprecationWarning):
        old = tt_linear(K.reshape(T, N), (4, 4), (2, 3), ranks=3)
    ref = tt_linear(K.reshape(T, N), 3, in_modes=(4, 4), out_modes=(2, 3))
    np.testing.assert_array_equal(old.to_tensor(), ref.to_tensor())


def test_old_spellings_warn_and_mean_the_same(problem):
    K, Sig = problem
    cases = [
        (tucker2, (3, 2), dict(inner_solver="cg", inner_rtol=1e-4, inner_maxiter=7),
         dict(inner=InnerSolver(method="cg", rtol=1e-4, maxiter=7)), "inner=InnerSolver"),
        (cp, 3, dict(inner_rtol=1e-6, inner_maxiter=9), dict(inner={"rtol": 1e-6, "maxiter": 9}),
         "inner=InnerSolver"),
        (tucker2, (3, 2), dict(init="hosvd"), dict(init="svd"), "use init='svd'"),
    ]
    for fn, rank, old_kw, new_kw, message in cases:
        with pytest.warns(DeprecationWarning, match=message):
            old = fn(K, rank, Sig, n_iter_max=3, **old_kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            new = fn(K, rank, Sig, n_iter_max=3, **new_kw)
        np.testing.assert_array_equal(old.to_tensor(), new.to_tensor())
    tt_old = dict(dense_max=0, cg_rtol=1e-6, cg_maxiter=9, precond=None)
    with pytest.warns(DeprecationWarning, match=r"tt_conv\(cg_rtol=...\) is deprecated"):
        old = tt_conv(K, (3, 4), Sig, in_modes=(2, 2), out_modes=(2, 3), n_iter_max=2, **tt_old)
    new = tt_conv(K, (3, 4), Sig, in_modes=(2, 2), out_modes=(2, 3), n_iter_max=2,
                  inner=InnerSolver(dense_max=0, rtol=1e-6, maxiter=9, precond=False))
    np.testing.assert_array_equal(old.to_tensor(), new.to_tensor())
    with pytest.raises(TypeError, match="got both inner_rtol= and inner.rtol"):
        tucker2(K, (3, 2), Sig, inner_rtol=1e-3, inner={"rtol": 1e-4})


def test_old_callback_forms_still_work(problem):
    K, Sig = problem
    seen = []
    with pytest.warns(DeprecationWarning, match=r"use callback\(result\)"):
        res = tucker2(K, (3, 2), Sig, n_iter_max=5, tol=0.0,
                      callback=lambda r, err: seen.append(err) or len(seen) == 3)
    assert seen == res.errors and res.n_iter == 2
    seen.clear()
    with pytest.warns(DeprecationWarning, match=r"use callback\(result\)"):
        res = tt_conv(K, (3, 4), Sig, in_modes=(2, 2), out_modes=(2, 3), n_iter_max=5, tol=0.0,
                      callback=lambda cores, err: seen.append(err) or len(seen) == 2)
    assert seen == res.errors[1:] and res.n_iter == 2  # the old form saw sweeps only


@pytest.mark.parametrize("name", list(SOLVERS))
def test_shared_option_errors_name_the_argument(problem, name):
    K, Sig = problem
    bad = [
        (dict(tol=-1.0), ValueError, "tol=-1.0"),
        (dict(n_iter_max=-1), ValueError, "n_iter_max=-1"),
        (dict(rng="seed"), TypeError, "rng='seed'"),
        (dict(callback=3), TypeError, "callback=3"),
        (dict(rtol=-1.0), ValueError, "rtol=-1.0"),
        (dict(ridge=-1.0), ValueError, "ridge=-1.0"),
        (dict(inner={"maxiter": 0}), ValueError, "inner.maxiter=0"),
        (dict(init="hooi"), ValueError, "init='hooi' is not allowed"),
    ]
    for kw, exc, match in bad:
        with pytest.raises(exc, match=match):
            _run(name, K, Sig, **kw)


@pytest.mark.parametrize("name", ITERATIVE)
def test_random_starts_are_reproducible_by_default(problem, name):
    K, Sig = problem
    runs = [_run(name, K, Sig, init="random", n_iter_max=2, tol=0.0) for _ in range(2)]
    assert runs[0].errors == runs[1].errors  # rng=None: the fixed seed 0
    seeded = _run(name, K, Sig, init="random", n_iter_max=2, tol=0.0, rng=0)
    other = _run(name, K, Sig, init="random", n_iter_max=2, tol=0.0, rng=1)
    assert seeded.errors == runs[0].errors and other.errors[0] != runs[0].errors[0]
