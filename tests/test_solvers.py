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
