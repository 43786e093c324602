"""Regression tests of the solver contract audit (sigmadecomp.contract).

Each test failed before the matching fix; all run on tiny problems.
"""

import warnings

import numpy as np
import pytest

import sigmadecomp as sd


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    K = rng.standard_normal((4, 3, 2, 2))
    X = rng.standard_normal((40, 12))
    W = rng.standard_normal((4, 6))
    X2 = rng.standard_normal((40, 6))
    Wt = rng.standard_normal((4, 8))
    X3 = rng.standard_normal((40, 8))
    return {"K": K, "S": X.T @ X / 40, "W": W, "S2": X2.T @ X2 / 40, "Wt": Wt,
            "S3": X3.T @ X3 / 40}


def _solvers(d):
    return {
        "sigma_svd": lambda **kw: sd.sigma_svd(d["W"], 2, d["S2"], **kw),
        "tucker2": lambda **kw: sd.tucker2(d["K"], (2, 2), d["S"], **kw),
        "cp": lambda **kw: sd.cp(d["K"], 2, d["S"], **kw),
        "tt_conv": lambda **kw: sd.tt_conv(d["K"], 2, d["S"], **kw),
        "tt_linear": lambda **kw: sd.tt_linear(d["Wt"], 2, d["S3"], in_modes=(2, 4),
                                               out_modes=(2, 2), **kw),
    }


@pytest.mark.parametrize("rtol, exc", [(-1.0, ValueError), ("x", TypeError),
                                       (float("nan"), TypeError)])
def test_sigma_svd_validates_rtol_without_sigma(data, rtol, exc):
    # every other solver refuses a bad rtol whether or not sigma is given
    with pytest.raises(exc, match="rtol="):
        sd.sigma_svd(data["W"], 2, rtol=rtol)
    with pytest.raises(exc, match="rtol="):
        sd.tucker2(data["K"], (2, 2), rtol=rtol)


@pytest.mark.parametrize("name", ["sigma_svd", "tucker2", "cp", "tt_conv", "tt_linear"])
def test_callback_that_takes_no_argument_is_refused_up_front(data, name):
    calls = []

    def no_args():
        calls.append(1)

    with pytest.raises(TypeError, match=r"callback=.*cannot be called with one argument"):
        _solvers(data)[name](callback=no_args)
    assert calls == []
    # a callback with an optional second argument is the new form and still works
    seen = []
    _solvers(data)[name](callback=lambda res, extra=None: seen.append(len(res.errors)),
                         n_iter_max=1)
    assert seen


@pytest.mark.parametrize("kind", ["tt_conv", "tt_linear"])
def test_tt_user_init_does_not_silently_ignore_ranks_or_eps(data, kind):
    if kind == "tt_conv":
        def run(ranks, **kw):
            return sd.tt_conv(data["K"], ranks, data["S"], **kw)
    else:
        def run(ranks, **kw):
            return sd.tt_linear(data["Wt"], ranks, data["S3"], in_modes=(2, 4),
                                out_modes=(2, 2), **kw)
    first = run(2, n_iter_max=1)
    assert first.ranks == (2,)
    with pytest.raises(ValueError, match=r"ranks=3 is not allowed with this init.*\(2,\)"):
        run(3, init=first, n_iter_max=1)
    with pytest.raises(ValueError, match=r"eps=0.1 is not allowed with a user-given init"):
        run(None, init=first, eps=0.1, n_iter_max=1)
    # the ranks of init, or None, keep working
    assert run(2, init=first, n_iter_max=1).ranks == (2,)
    assert run(None, init=list(first.cores), n_iter_max=1).ranks == (2,)


def test_inner_precond_accepts_numpy_booleans(data):
    K, S = data["K"], data["S"]
    a = sd.tucker2(K, (2, 2), S, n_iter_max=2, inner={"method": "cg", "precond": False})
    b = sd.tucker2(K, (2, 2), S, n_iter_max=2, inner={"method": "cg", "precond": np.False_})
    assert a.errors == b.errors
    c = sd.tt_conv(K, 2, S, n_iter_max=1, inner={"method": "cg", "precond": np.True_})
    assert c.n_iter == 1
    with pytest.raises(ValueError, match="precond=False is not allowed for cp"):
        sd.cp(K, 2, S, n_iter_max=1, inner={"precond": np.False_})


def test_legacy_tt_precond_gives_a_named_error(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(TypeError, match=r"precond=\[1\] is not allowed"):
            sd.tt_conv(data["K"], 2, data["S"], precond=[1])


@pytest.mark.parametrize("name", ["sigma_svd", "tucker2", "cp", "tt_conv", "tt_linear"])
def test_deprecated_init_alias_warning_points_at_the_caller(data, name):
    # a DeprecationWarning is shown by default only when attributed to the user's code
    with pytest.warns(DeprecationWarning, match="hosvd") as rec:
        _solvers(data)[name](init="hosvd", n_iter_max=0)
    assert [w.filename for w in rec if "hosvd" in str(w.message)] == [__file__]


def test_deprecated_two_argument_callback_warning_points_at_the_caller(data):
    with pytest.warns(DeprecationWarning, match="two arguments") as rec:
        sd.tucker2(data["K"], (2, 2), data["S"], n_iter_max=1, callback=lambda r, e: None)
    assert [w.filename for w in rec if "two arguments" in str(w.message)] == [__file__]


@pytest.mark.parametrize("solver", ["tucker2", "cp", "tt_conv"])
def test_a_callback_returning_numpy_true_stops_the_run(data, solver):
    K, S = data["K"], data["S"]
    calls = []

    def cb(result):
        calls.append(result.n_iter)
        return np.float64(len(calls)) >= 2  # a NumPy bool, True on the second call

    fn = {"tucker2": lambda: sd.tucker2(K, (2, 2), S, n_iter_max=20, tol=0, callback=cb),
          "cp": lambda: sd.cp(K, 3, S, n_iter_max=20, tol=0, callback=cb),
          "tt_conv": lambda: sd.tt_conv(K, 2, S, n_iter_max=20, tol=0, callback=cb)}[solver]
    result = fn()
    assert len(calls) == 2 and result.n_iter == 1
