"""The guarded extrapolation step of TT-ALS-Sigma (``extrapolate=True``, the default)."""

import numpy as np
import pytest

from sigmadecomp import relative_sigma_error, tt_conv, tt_linear
from sigmadecomp import tt_als
from sigmadecomp._tt_algebra import left_orthogonalize_one, right_orthogonalize, tt_matrix
from sigmadecomp.tt_als import core_update
from _helpers import random_psd, tt_identity_case  # noqa: E402


def conv_problem(seed):
    rng = np.random.default_rng(seed)
    T, S_in, H, W = 8, 6, 3, 3
    n = S_in * H * W
    K = rng.standard_normal((T, S_in, H, W))
    A = rng.standard_normal((n, n)) / np.sqrt(n) + np.eye(n)
    U = rng.standard_normal((300, n)) @ A.T * np.geomspace(0.05, 3, n)
    return K, U.T @ U / 300


CONV = dict(in_modes=(2, 3), out_modes=(2, 4))


def run_recorded(K, S, **kw):
    """tt_conv with the partial results of every sweep recorded."""
    points = []
    res = tt_conv(K, (3, 4), S, callback=lambda r: points.append(r) and None, **CONV, **kw)
    return res, points


@pytest.mark.parametrize("seed", range(4))
def test_objective_monotone_and_steps_accepted(seed):
    K, S = conv_problem(seed)
    res = tt_conv(K, (3, 4), S, n_iter_max=40, tol=0.0, ridge=0, **CONV)
    e = np.array(res.errors)
    assert np.all(e[1:] ** 2 <= e[:-1] ** 2 * (1 + 1e-12) + 1e-15)
    assert res.solves["extrapolated"] > 0


@pytest.mark.parametrize("seed", range(3))
def test_reported_errors_are_errors_of_the_returned_cores(seed):
    K, S = conv_problem(seed)
    res, points = run_recorded(K, S, n_iter_max=15, tol=0.0, ridge=0)
    assert res.solves["extrapolated"] > 0
    for p in points[1:]:
        assert p.errors[-1] == pytest.approx(relative_sigma_error(K, p.to_tensor(), S), rel=1e-10)
    assert res.error == pytest.approx(relative_sigma_error(K, res.to_tensor(), S), rel=1e-10)
    # with the default ridge, sigma_error is recomputed in sigma itself
    ridged = tt_conv(K, (3, 4), S, n_iter_max=15, tol=0.0, **CONV)
    assert ridged.sigma_error == pytest.approx(
        relative_sigma_error(K, ridged.to_tensor(), S), rel=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_accepted_steps_lower_the_objective_below_the_plain_sweep(seed):
    # from each recorded point, one plain sweep; the extrapolated run's next error is that
    # sweep's error when the step was refused and strictly lower when it was accepted
    K, S = conv_problem(seed)
    res, points = run_recorded(K, S, n_iter_max=12, tol=0.0)
    lowered = 0
    for p, nxt in zip(points, points[1:]):
        plain = tt_conv(K, None, S, init=p, n_iter_max=1, tol=0.0, extrapolate=False, **CONV)
        assert nxt.errors[-1] <= plain.errors[-1]
        if nxt.errors[-1] < plain.errors[-1]:
            lowered += 1
            # and lower than the plain sweep by more than round-off
            assert nxt.errors[-1] < plain.errors[-1] * (1 - 1e-12)
    assert lowered == res.solves["extrapolated"] > 0


def plain_als(W, S, cores, sweeps):
    """The plain TT-ALS sweep written out with :func:`core_update`."""
    out = []
    for _ in range(sweeps):
        cores = right_orthogonalize(cores)
        for k in range(len(cores)):
            cores[k], _ = core_update(W, cores, k, S)
            if k < len(cores) - 1:
                left_orthogonalize_one(cores, k)
        out.append([c.copy() for c in cores])
    return out


@pytest.mark.parametrize("seed", range(3))
def test_off_gives_the_plain_iterates_bit_for_bit(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((12, 24))
    S = random_psd(rng, 24) + 0.05 * np.eye(24)
    kw = dict(in_modes=(2, 3, 4), out_modes=(2, 2, 3))
    monkeypatch.setattr(tt_als, "_aligned", lambda *a: pytest.fail("extrapolation tried"))
    points = []
    res = tt_linear(W, (3, 4), S, n_iter_max=6, tol=0.0, ridge=0, extrapolate=False,
                    callback=lambda r: points.append(r) and None, **kw)
    assert "extrapolated" not in res.solves
    start = tt_linear(W, (3, 4), **kw).cores
    ref = plain_als(W, S, list(start), 6)
    assert len(points) == 7
    for got, want in zip(points[1:], ref):
        for a, b in zip(got.cores, want):
            assert np.array_equal(a, b)
        assert got.errors[-1] == relative_sigma_error(W, tt_matrix(want), S) or \
            got.errors[-1] == pytest.approx(relative_sigma_error(W, tt_matrix(want), S), rel=1e-12)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_identity_sigma_equals_frobenius_with_extrapolation(rng, kind):
    K, ranks, kw, fn, n = tt_identity_case(rng, kind)
    frob = fn(K, ranks, n_iter_max=15, tol=0.0, extrapolate=True, **kw)
    ident = fn(K, ranks, np.eye(n), n_iter_max=15, tol=0.0, ridge=0, extrapolate=True, **kw)
    np.testing.assert_allclose(ident.to_tensor(), frob.to_tensor(), atol=1e-9)
    np.testing.assert_allclose(ident.errors, frob.errors, rtol=1e-9)
    assert ident.solves["extrapolated"] == frob.solves["extrapolated"]


def test_extrapolation_reaches_a_lower_error_in_the_same_sweeps():
    # not a guarantee per problem; on these fixed problems the extrapolated run is lower
    wins = 0
    for seed in range(4):
        K, S = conv_problem(seed)
        on = tt_conv(K, (3, 4), S, n_iter_max=30, tol=0.0, **CONV)
        off = tt_conv(K, (3, 4), S, n_iter_max=30, tol=0.0, extrapolate=False, **CONV)
        wins += on.error < off.error
    assert wins >= 3


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_extrapolate_must_be_bool(bad):
    K, S = conv_problem(0)
    with pytest.raises(TypeError, match="extrapolate"):
        tt_conv(K, (3, 4), S, extrapolate=bad, **CONV)
    with pytest.raises(TypeError, match="extrapolate"):
        tt_linear(K.reshape(8, -1), 2, extrapolate=bad, in_modes=(6, 9), out_modes=(2, 4))


def test_sweeps_benchmark_stop_evaluation_matches_a_real_run():
    # the report evaluates (n_iter_max, tol) on curves recorded with tol=0: the stop it
    # reads off must be where a run with that n_iter_max and tol really stops
    from benchmarks.sweeps import stop_with_cap, tt_defaults_table

    K, S = conv_problem(1)
    _, points = run_recorded(K, S, n_iter_max=40, tol=0.0)
    rec = [(p.n_iter, float(p.n_iter), p.errors[-1]) for p in points]
    for cap, tol in ((40, 1e-3), (40, 1e-4), (7, 1e-6)):
        real = tt_conv(K, (3, 4), S, n_iter_max=cap, tol=tol, **CONV)
        sweep, _, err = stop_with_cap(rec, tol, cap)
        assert (sweep, err) == (real.n_iter, real.error)
    assert stop_with_cap(rec, 0.0, 80) is None  # the curve ends before the cap
    table = tt_defaults_table({"p": {"plain": rec, "default": rec}})
    assert table.count("\n| p |") == 1
