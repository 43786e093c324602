"""Audit of the solver contract across every decomposition (callback, tol, results).

Each test failed before the matching fix; all run on tiny problems.
"""

import copy
import pickle
import warnings

import numpy as np
import pytest

import sigmadecomp as sd
from sigmadecomp import cp, sigma_svd, tt_conv, tt_linear, tucker2

torch = pytest.importorskip("torch")

ITERATIVE = ("tucker2", "cp", "tt_conv", "tt_linear")
SOLVERS = ("sigma_svd",) + ITERATIVE


def _data(lib="numpy", dtype="float64", sigma=True):
    rng = np.random.default_rng(0)
    K = rng.standard_normal((4, 3, 2, 2))
    X = rng.standard_normal((40, 12))
    S = X.T @ X / 40
    if lib == "torch":
        conv = lambda a: torch.as_tensor(a).to(getattr(torch, dtype))  # noqa: E731
    else:
        conv = lambda a: a.astype(dtype)  # noqa: E731
    return conv(K), (conv(S) if sigma else None)


def _run(name, K, S, **kw):
    W = K.reshape(K.shape[0], -1)
    if name == "sigma_svd":
        return sigma_svd(W, 2, S, **kw)
    if name == "tucker2":
        return tucker2(K, (2, 2), S, **kw)
    if name == "cp":
        return cp(K, 2, S, **kw)
    if name == "tt_conv":
        return tt_conv(K, 2, S, **kw)
    return tt_linear(W, 2, S, in_modes=(3, 4), out_modes=(2, 2), **kw)


def _indefinite_float32_sigma():
    """Rank 7 of 12 plus one eigenvalue -5e-5 * lambda_max: accepted for float32, and
    fitted in its nearest PSD matrix."""
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    lam = np.logspace(0, -3, 12)
    lam[7:] = 0.0
    lam[-1] = -5e-5
    S = ((Q * lam) @ Q.T).astype(np.float32)
    return (S + S.T) / 2


# ---------------------------------------------------------------------------
# callback
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ITERATIVE)
def test_numpy_true_at_the_start_stops_every_solver(name):
    # cp honoured NumPy's True after a sweep but not at the starting point
    K, S = _data()
    calls = []

    def cb(result):
        calls.append(result.n_iter)
        return np.float64(result.errors[-1]) >= 0.0  # np.True_

    res = _run(name, K, S, n_iter_max=5, tol=0.0, callback=cb)
    assert calls == [0]
    assert res.n_iter == 0 and len(res.errors) == 1 and res.converged is False


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_a_callback_that_mutates_the_sigma_svd_result_leaves_the_returned_one(lib):
    K, S = _data(lib)
    ref = _run("sigma_svd", K, S)
    seen = []

    def vandal(result):
        seen.append(copy.deepcopy(result))
        result.left[...] = 0.0
        result.right[...] = 7.0
        result.errors.append(1.0)
        result.error = -1.0

    res = _run("sigma_svd", K, S, callback=vandal)
    assert seen == [res]  # called once, with the result
    np.testing.assert_array_equal(np.asarray(res.to_tensor()), np.asarray(ref.to_tensor()))
    assert res.errors == ref.errors and res.error == ref.error


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("name", SOLVERS)
def test_a_callback_that_mutates_its_result_changes_no_run(name, lib):
    K, S = _data(lib)
    ref = _run(name, K, S, n_iter_max=3, tol=0.0)

    def vandal(result):
        for a in result.factors:
            a[...] = 1e6
        result.errors[:] = [-1.0]

    res = _run(name, K, S, n_iter_max=3, tol=0.0, callback=vandal)
    assert res.errors == ref.errors
    np.testing.assert_array_equal(np.asarray(res.to_tensor()), np.asarray(ref.to_tensor()))


@pytest.mark.parametrize("name", SOLVERS)
def test_an_exception_in_the_callback_propagates_unchanged(name):
    K, S = _data()
    boom = KeyError("from the callback")

    def raise_it(result):
        raise boom

    with pytest.raises(KeyError) as info:
        _run(name, K, S, n_iter_max=2, callback=raise_it)
    assert info.value is boom


def test_the_shared_options_come_in_one_order_in_every_solver():
    import inspect
    shared = ["init", "n_iter_max", "tol", "rng", "callback", "rtol", "ridge", "inner"]
    for fn in (sigma_svd, tucker2, cp, tt_conv, tt_linear):
        names = [p for p in inspect.signature(fn).parameters if p in shared]
        assert names == shared, fn.__name__


@pytest.mark.parametrize("name", ["tt_conv", "tt_linear"])
def test_a_tt_closed_form_calls_the_callback_once_with_the_final_result(name):
    # as sigma_svd: no sweeps, so one call with the result (n_iter and converged None),
    # not a starting point with n_iter=0 that the returned result contradicts
    K, _ = _data()
    seen = []
    res = _run(name, K, None, callback=seen.append)
    assert res.n_iter is None and res.converged is None
    assert len(seen) == 1 and seen[0] == res
    # with sweeps it is the partial results, from the starting point on
    seen.clear()
    res = _run(name, K, None, n_iter_max=2, tol=0.0, callback=seen.append)
    assert [r.n_iter for r in seen] == [0, 1, 2] and res.n_iter == 2
    # the old two-argument form saw sweeps only: the closed form has none
    old = []
    with pytest.warns(DeprecationWarning, match="two arguments"):
        _run(name, K, None, callback=lambda cores, err: old.append(err))
    assert old == []


@pytest.mark.parametrize("name", ["tt_conv", "tt_linear"])
def test_a_tt_run_without_sweeps_from_a_random_or_given_start_is_not_a_closed_form(name):
    # only the TT-SVD start is the closed form; random or given cores without a sweep are a
    # starting point (n_iter 0, converged False), as in every iterative solver
    K, _ = _data()
    start = _run(name, K, None)
    for kw in ({"init": "random"}, {"init": start}):
        seen = []
        res = _run(name, K, None, callback=seen.append, **kw)
        assert res.n_iter == 0 and res.converged is False and len(res.errors) == 1, kw
        assert [r.n_iter for r in seen] == [0], kw


@pytest.mark.parametrize("name", ITERATIVE)
def test_partial_results_of_a_projected_sigma_have_no_sigma_error(name):
    # the contract: sigma_error is None in partial results when sigma was made PSD (tt
    # computed it at every point, one extra product per sweep); the final one has it
    K, _ = _data()
    S = _indefinite_float32_sigma()
    seen = []
    res = _run(name, K, S, ridge=0, n_iter_max=2, tol=0.0,
               callback=lambda r: seen.append(r.sigma_error))
    assert seen == [None, None, None]
    ref = sd.relative_sigma_error(K.reshape(4, -1), np.asarray(res.to_tensor()).reshape(4, -1), S)
    assert res.sigma_error == pytest.approx(ref, rel=1e-8)


# ---------------------------------------------------------------------------
# tol and n_iter_max: None means the solver's default everywhere
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", SOLVERS)
def test_none_tol_and_n_iter_max_mean_the_solvers_default(name):
    # sigma_svd and the TT solvers took None, tucker2 and cp refused it
    K, S = _data()
    default = _run(name, K, S)
    for kw in ({"tol": None}, {"n_iter_max": None}, {"tol": None, "n_iter_max": None}):
        res = _run(name, K, S, **kw)
        assert res.errors == default.errors and res.n_iter == default.n_iter, kw
        np.testing.assert_array_equal(res.to_tensor(), default.to_tensor())
    with pytest.raises(TypeError, match="tol='1e-3' is not allowed"):
        _run(name, K, S, tol="1e-3")
    with pytest.raises(TypeError, match="n_iter_max=1.5 is not allowed"):
        _run(name, K, S, n_iter_max=1.5)


def test_the_default_constants_are_the_signature_defaults():
    # what None stands for is what the signature shows
    import importlib
    import inspect

    cp_mod, tt_mod, tucker2_mod = (importlib.import_module(f"sigmadecomp.{m}")
                                   for m in ("cp", "tt", "tucker2"))

    cases = ((tucker2, tucker2_mod.TOL, tucker2_mod.N_ITER_MAX),
             (cp, cp_mod.TOL, cp_mod.N_ITER_MAX),
             (tt_conv, tt_mod.DEFAULT_TOL, None), (tt_linear, tt_mod.DEFAULT_TOL, None))
    for fn, tol, n_iter_max in cases:
        params = inspect.signature(fn).parameters
        assert params["tol"].default == tol and params["n_iter_max"].default == n_iter_max


# ---------------------------------------------------------------------------
# results: copies and pickles compare equal
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("lib, dtype", [("numpy", "float64"), ("numpy", "float32"),
                                        ("torch", "float32")])
@pytest.mark.parametrize("name", SOLVERS)
def test_a_pickled_or_copied_result_equals_the_original(name, lib, dtype):
    # comparing a result with its deep copy raised "truth value of an array is ambiguous"
    K, S = _data(lib, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = _run(name, K, S, n_iter_max=2)
    for other in (pickle.loads(pickle.dumps(res)), copy.deepcopy(res), copy.copy(res)):
        assert other == res and not (other != res)
        assert type(other.to_tensor()) is type(K) and other.to_tensor().dtype == K.dtype
    changed = copy.deepcopy(res)
    changed.factors[0][0, 0] = changed.factors[0][0, 0] + 1.0
    assert changed != res
    assert res != "a result" and res != [res]  # other kinds of object: not equal
    with pytest.raises(TypeError, match="unhashable"):
        hash(res)


def test_results_of_different_runs_or_libraries_differ():
    K, S = _data()
    a = _run("tucker2", K, S, n_iter_max=2)
    b = copy.deepcopy(a)
    b.errors[-1] += 1e-9
    assert a != b
    t = copy.deepcopy(a)
    t.core = torch.as_tensor(t.core)
    assert a != t  # same values, another library
    c = copy.deepcopy(a)
    c.core = c.core.astype(np.float32)
    assert a != c  # another dtype
