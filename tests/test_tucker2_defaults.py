"""The stopping rule, the Kronecker-whitened start and the float32 CG operator of tucker2."""

import importlib

import numpy as np
import pytest

from sigmadecomp import relative_sigma_error, tucker2

t2mod = importlib.import_module("sigmadecomp.tucker2")  # the module, not the function


def random_psd(rng, n, spread=3.0):
    X = rng.standard_normal((2 * n, n)) * np.geomspace(1.0 / spread, spread, n)
    return X.T @ X / (2 * n)


@pytest.mark.parametrize("sigma", [False, True])
def test_tol_is_relative_to_the_previous_error(sigma):
    rng = np.random.default_rng(0)
    K = rng.standard_normal((8, 7, 3, 3))
    S = random_psd(rng, 63) if sigma else None
    tol = 1e-3
    res = tucker2(K, (4, 3), S, tol=tol, n_iter_max=200, inner={"method": "cg"})
    e = np.asarray(res.errors)
    assert res.converged
    # the run stopped at the first sweep that gained at most tol * previous error
    assert e[-2] - e[-1] <= tol * e[-2]
    assert np.all(e[:-2] - e[1:-1] > tol * e[:-2])


def test_tol_zero_runs_every_sweep():
    rng = np.random.default_rng(1)
    K = rng.standard_normal((6, 5, 3, 3))
    S = random_psd(rng, 45)
    res = tucker2(K, (3, 2), S, tol=0, n_iter_max=7)
    assert res.n_iter == 7 and not res.converged


def test_default_start_is_hooi_to_the_same_tol():
    rng = np.random.default_rng(2)
    K = rng.standard_normal((8, 7, 3, 3))
    S = random_psd(rng, 63)
    hooi = tucker2(K, (4, 3))  # HOOI with the default tol
    res = tucker2(K, (4, 3), S, n_iter_max=0, ridge=0)
    # the Sigma run starts from HOOI's input factor (and completes U_T, G for Sigma)
    np.testing.assert_allclose(res.in_factor, hooi.in_factor, atol=1e-12)


def test_whitened_start_is_optimal_for_a_kronecker_sigma():
    # Sigma = Sigma_S kron Sigma_P and r_T = T: the whitened HOSVD is the exact optimum
    rng = np.random.default_rng(3)
    T, S, H = 5, 6, 3
    K = rng.standard_normal((T, S, H, H))
    sig_S, sig_P = random_psd(rng, S), random_psd(rng, H * H)
    Sig = np.kron(sig_S, sig_P)
    start = tucker2(K, (T, 2), Sig, init="whitened", n_iter_max=0, ridge=0)
    best = tucker2(K, (T, 2), Sig, n_iter_max=300, tol=0, ridge=0)
    assert start.errors[0] <= best.error * (1 + 1e-9)
    assert start.errors[0] == pytest.approx(best.error, rel=1e-7)


@pytest.mark.parametrize("H", [1, 3])
def test_whitened_start_runs_monotone_and_reports_true_errors(H):
    rng = np.random.default_rng(4 + H)
    K = rng.standard_normal((7, 6, H, H))
    n = 6 * H * H
    X = rng.standard_normal((n // 2, n))  # rank-deficient sigma
    Sig = X.T @ X / n
    res = tucker2(K, (3, 2), Sig, init="whitened", n_iter_max=20, tol=0)
    assert np.all(np.diff(res.errors) <= 1e-12)
    assert res.sigma_error == pytest.approx(relative_sigma_error(K, res.to_tensor(), Sig), rel=1e-8)
    U = res.in_factor
    np.testing.assert_allclose(U.T @ U, np.eye(2), atol=1e-10)


def test_float32_cg_operator_changes_errors_only_by_rounding(monkeypatch):
    rng = np.random.default_rng(5)
    K = rng.standard_normal((10, 12, 3, 3))
    Sig = random_psd(rng, 108, spread=10.0)
    kw = dict(n_iter_max=15, tol=0)
    f32 = tucker2(K, (5, 4), Sig, inner={"method": "cg"}, **kw)  # default rtol 1e-2: float32
    monkeypatch.setattr(t2mod, "CG_FLOAT32_RTOL", float("inf"))
    f64 = tucker2(K, (5, 4), Sig, inner={"method": "cg"}, **kw)
    np.testing.assert_allclose(f32.errors, f64.errors, rtol=1e-6)
    assert f32.core.dtype == np.float64
    assert np.all(np.diff(f32.errors) <= 1e-12)
    # a tight inner.rtol keeps the float64 operator: identical runs
    monkeypatch.setattr(t2mod, "CG_FLOAT32_RTOL", 1e-4)
    a = tucker2(K, (5, 4), Sig, inner={"method": "cg", "rtol": 1e-6}, **kw)
    monkeypatch.setattr(t2mod, "CG_FLOAT32_RTOL", float("inf"))
    b = tucker2(K, (5, 4), Sig, inner={"method": "cg", "rtol": 1e-6}, **kw)
    assert a.errors == b.errors
