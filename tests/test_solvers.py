import numpy as np
import pytest

from sigmadecomp.solvers import pcg


def spd(rng, n, cond=1e3):
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.geomspace(1.0, cond, n)) @ Q.T


def test_pcg_solves_matrix_unknowns(lib, rng):
    A = spd(rng, 12)
    X_true = rng.standard_normal((4, 3))
    Ax = lib.asarray(A)
    apply_A = lambda X: (Ax @ X.reshape(12, 1)).reshape(4, 3)
    rhs = apply_A(lib.asarray(X_true))
    X, info = pcg(apply_A, rhs, rtol=1e-12 if lib.dtype_name == "float64" else 1e-5, maxiter=200)
    assert lib.is_same_kind(X) and X.shape == (4, 3)
    np.testing.assert_allclose(lib.to_numpy(X), X_true, rtol=1e-3 if lib.dtype_name == "float32" else 1e-8,
                               atol=1e-3 if lib.dtype_name == "float32" else 1e-8)
    assert info.converged and info.n_iter <= 200


def test_warm_started_cg_never_increases_the_quadratic(rng):
    A = spd(rng, 30, cond=1e5)
    b = rng.standard_normal(30)
    f = lambda x: 0.5 * x @ A @ x - b @ x
    x0 = rng.standard_normal(30)
    values = [f(x0)]
    pcg(lambda v: A @ v, b, x0=x0, rtol=1e-14, maxiter=60, callback=lambda x, r: values.append(f(x)))
    assert len(values) > 5
    assert np.all(np.diff(values) <= 1e-9 * np.abs(values[:-1]).max())


def test_preconditioner_reduces_iterations(rng):
    n = 40
    d = np.geomspace(1, 1e6, n)
    A = np.diag(d) + 1e-3 * spd(rng, n, 10)
    b = rng.standard_normal(n)
    _, plain = pcg(lambda v: A @ v, b, rtol=1e-10, maxiter=500)
    x, jac = pcg(lambda v: A @ v, b, rtol=1e-10, maxiter=500, precond=lambda r: r / np.diag(A))
    assert jac.converged and jac.n_iter < plain.n_iter
    np.testing.assert_allclose(A @ x, b, atol=1e-6 * np.linalg.norm(b))


def test_singular_consistent_system_and_zero_rhs(rng):
    M = rng.standard_normal((3, 6))
    A = M.T @ M  # rank 3
    b = A @ rng.standard_normal(6)
    x, info = pcg(lambda v: A @ v, b, rtol=1e-10, maxiter=50)
    np.testing.assert_allclose(A @ x, b, atol=1e-8 * np.linalg.norm(b))
    x, info = pcg(lambda v: A @ v, np.zeros(6))
    assert info.converged and info.n_iter == 0 and not x.any()


def _energy(A, x, x_star):
    e = x - x_star
    return float(e @ A @ e)


@pytest.mark.parametrize("precond", [False, True])
def test_cg_terms_are_the_energy_norm_decrease(rng, precond):
    """sum of t_j = ||x0 - x*||_A^2 - ||x_k - x*||_A^2 at every k (preconditioned or not)."""
    A = spd(rng, 40, cond=1e4)
    b = rng.standard_normal(40)
    x_star = np.linalg.solve(A, b)
    x0 = rng.standard_normal(40)
    iterates = []
    M = (lambda r: r / np.diag(A)) if precond else None
    _, info = pcg(lambda v: A @ v, b, x0=x0, rtol=1e-12, maxiter=200, precond=M,
                  callback=lambda x, r: iterates.append(x.copy()))
    e0 = _energy(A, x0, x_star)
    assert len(info.terms) == info.n_iter == len(iterates) > 10
    for k in (1, 5, 10, len(iterates)):
        got = sum(info.terms[:k])
        want = e0 - _energy(A, iterates[k - 1], x_star)
        assert got == pytest.approx(want, rel=1e-8, abs=1e-12 * e0)


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_energy_stop_estimate_bounds_the_error_left(cond):
    """Where energy_stop stops, its estimate is at least the true ||x_k - x*||_A^2,
    also on badly conditioned systems where CG's terms jump by orders of magnitude
    (the sum of the last few terms alone underestimates the error there)."""
    for seed in range(8):
        rng = np.random.default_rng(seed)
        A = spd(rng, 60, cond=cond)
        b = rng.standard_normal(60)
        x_star = np.linalg.solve(A, b)
        e0 = _energy(A, np.zeros(60), x_star)
        for tol in (1e-4, 1e-8):
            calls = []

            def stop(estimate, decrease, tol=tol, calls=calls):
                calls.append((estimate, decrease))
                return estimate <= tol * e0

            x, info = pcg(lambda v: A @ v, b, rtol=0.0, maxiter=2000, energy_stop=stop, delay=5)
            assert info.converged and calls[-1][0] <= tol * e0  # stopped by the rule
            assert info.n_iter == 2 * 5 + len(calls) - 1  # first called after 2 * delay iterations
            true = _energy(A, x, x_star)
            assert true <= calls[-1][0], (seed, tol, true, calls[-1][0])
            assert calls[-1][1] == pytest.approx(e0 - true, rel=1e-6, abs=1e-9 * e0)


def test_energy_stop_looser_threshold_stops_earlier_with_a_larger_error(rng):
    A = spd(rng, 50, cond=1e4)
    b = rng.standard_normal(50)
    x_star = np.linalg.solve(A, b)
    e0 = _energy(A, np.zeros(50), x_star)
    out = {}
    for tol in (1e-3, 1e-10):
        x, info = pcg(lambda v: A @ v, b, rtol=0.0, maxiter=1000,
                      energy_stop=lambda est, dec, tol=tol: est <= tol * e0)
        out[tol] = (info.n_iter, _energy(A, x, x_star))
    assert out[1e-3][0] < out[1e-10][0]
    assert out[1e-3][1] > 1e-10 * e0 >= out[1e-10][1]
