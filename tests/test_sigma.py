import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sigmadecomp import psd_root, relative_sigma_error, sigma_norm
from sigmadecomp.sigma import psd_solve
from _helpers import random_psd  # noqa: E402


@given(
    T=st.integers(1, 5),
    n=st.integers(1, 8),
    rank_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_sigma_norm_equals_trace_formula(T, n, rank_frac, seed):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((T, n))
    S = random_psd(rng, n, int(round(rank_frac * n)))
    expected = np.sqrt(max(np.trace(D @ S @ D.T), 0.0))
    assert float(sigma_norm(D, S)) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_sigma_norm_kinds_and_identity(lib, rng):
    D = rng.standard_normal((4, 3, 2, 2))
    S = random_psd(rng, 12)
    Dx = lib.asarray(D)
    val = sigma_norm(Dx, lib.asarray(S))
    # a 0-d result in the input's library and dtype (NumPy gives a NumPy scalar)
    assert val.dtype == lib.dtype and val.ndim == 0
    assert lib.is_same_kind(val) or (lib.name == "numpy" and isinstance(val, np.generic))
    Df = lib.to_numpy(Dx).reshape(4, -1)
    Sf = lib.to_numpy(lib.asarray(S))
    np.testing.assert_allclose(
        lib.to_numpy(val), np.sqrt(np.trace(Df @ Sf @ Df.T)), rtol=lib.rtol
    )
    # identity and None give the Frobenius norm
    fro = np.linalg.norm(Df)
    np.testing.assert_allclose(lib.to_numpy(sigma_norm(Dx, lib.asarray(np.eye(12)))), fro, rtol=lib.rtol)
    np.testing.assert_allclose(lib.to_numpy(sigma_norm(Dx)), fro, rtol=lib.rtol)


def test_sigma_norm_does_not_mutate(rng):
    D = rng.standard_normal((3, 4))
    S = random_psd(rng, 4)
    D0, S0 = D.copy(), S.copy()
    sigma_norm(D, S)
    relative_sigma_error(D, 0.5 * D, S)
    assert np.array_equal(D, D0) and np.array_equal(S, S0)


def test_relative_sigma_error(rng):
    K = rng.standard_normal((3, 5))
    S = random_psd(rng, 5)
    assert relative_sigma_error(K, K, S) == 0.0
    assert relative_sigma_error(K, 0 * K, S) == pytest.approx(1.0)
    assert relative_sigma_error(K, 0.75 * K, S) == pytest.approx(0.25)
    assert relative_sigma_error(0 * K, 0 * K, S) == 0.0
    with pytest.raises(ValueError, match="approx has shape"):
        relative_sigma_error(K, K[:, :4], None)


@pytest.mark.parametrize("rank", [0, 1, 3, 6])
def test_psd_root_factorises_rank_deficient(lib, rng, rank):
    n = 6
    S = random_psd(rng, n, rank)
    root = psd_root(lib.asarray(S))
    assert root.rank == rank
    Sx = lib.to_numpy(lib.asarray(S))
    L = lib.to_numpy(root.factor)
    assert L.shape == (n, rank)
    scale = max(np.abs(Sx).max(), 1.0)
    np.testing.assert_allclose(L @ L.T, Sx, atol=1e-9 * scale)
    R = lib.to_numpy(root.sqrt())
    np.testing.assert_allclose(R @ R, Sx, atol=1e-9 * scale)
    if rank:
        np.testing.assert_allclose(lib.to_numpy(root.pinv_factor) @ L, np.eye(rank), atol=1e-8)
        Ri = lib.to_numpy(root.inv_sqrt())
        P = Ri @ R  # projector onto the range
        np.testing.assert_allclose(P @ P, P, atol=1e-8)


def test_psd_root_clips_tiny_negative_and_rejects_indefinite(rng):
    S = random_psd(rng, 5, 3)
    lam, V = np.linalg.eigh(S)
    lam[0] = -1e-13 * lam[-1]  # round-off sized: clipped, counted as null
    S2 = (V * lam) @ V.T
    assert psd_root(S2).rank == 3
    lam[0] = -1e-3 * lam[-1]  # genuinely indefinite: an error, not a silent answer
    with pytest.raises(ValueError, match="not positive semi-definite"):
        psd_root((V * lam) @ V.T)


def test_psd_root_rtol_floor(rng):
    S = np.diag([1.0, 1e-6, 1e-12])
    assert psd_root(S).rank == 2
    assert psd_root(S, rtol=1e-5).rank == 1
    assert psd_root(S, rtol=0.0).rank == 3
    with pytest.raises(ValueError, match="rtol=-1"):
        psd_root(S, rtol=-1)


def test_psd_solve_singular_is_least_squares(rng):
    n = 6
    S = random_psd(rng, n, 3)
    b = S @ rng.standard_normal(n)  # consistent right-hand side
    x = psd_solve(S, b)
    np.testing.assert_allclose(S @ x, b, atol=1e-9)
    x_ref = np.linalg.pinv(S, rcond=1e-10) @ b
    np.testing.assert_allclose(x, x_ref, atol=1e-8)
    A = random_psd(rng, n)
    B = rng.standard_normal((n, 2))
    np.testing.assert_allclose(psd_solve(A, B), np.linalg.solve(A, B), rtol=1e-8)


def test_sigma_validation_errors(rng):
    D = rng.standard_normal((3, 4))
    with pytest.raises(ValueError, match=r"sigma has shape \(3, 3\); sigma must be \(4, 4\)"):
        sigma_norm(D, np.eye(3))
    S = np.eye(4)
    S[0, 1] = 1.0
    with pytest.raises(ValueError, match="sigma is not symmetric"):
        sigma_norm(D, S)
    with pytest.raises(ValueError, match="sigma contains NaN"):
        sigma_norm(D, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="delta contains NaN"):
        sigma_norm(np.full((3, 4), np.inf), np.eye(4))
    with pytest.raises(TypeError, match="delta has dtype int64"):
        sigma_norm(np.ones((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="sigma has ndim=1"):
        sigma_norm(D, np.ones(4))


def test_psd_solve_vector_rhs_both_libraries(rng):
    torch = pytest.importorskip("torch")
    A = random_psd(rng, 5)
    b = rng.standard_normal(5)
    for lib_A, lib_b in ((A, b), (torch.from_numpy(A), torch.from_numpy(b))):
        x = psd_solve(lib_A, lib_b)
        assert x.shape == (5,)
        np.testing.assert_allclose(np.asarray(x), np.linalg.solve(A, b), rtol=1e-8)


def test_check_psd_corner_cases():
    from sigmadecomp._validation import check_psd

    # a negative eigenvalue behind a zero diagonal, and an all-negative matrix
    for S in (np.array([[0.0, 1.0], [1.0, 0.0]]), -np.eye(3), np.diag([0.0, -1e-3])):
        lam = np.linalg.eigvalsh(S)
        with pytest.raises(ValueError, match=f"smallest eigenvalue {lam[0]:.3g}, largest {lam[-1]:.3g}"):
            check_psd(S, np.float64)
    # zero, PSD of rank 1, and a float32-sized rounding error are accepted
    check_psd(np.zeros((3, 3)), np.float64)
    v = np.arange(1.0, 5.0)
    check_psd(np.outer(v, v), np.float64)
    S = np.outer(v, v) + np.diag([0.0, 0.0, 0.0, -1e-5 * 30])
    with pytest.raises(ValueError, match="allowed: >= -1e-08"):
        check_psd(S, np.float64)
    check_psd(S, np.float32)  # within float32's 1e-4 of the largest eigenvalue (30)
    # the Cholesky shortcut and the eigenvalues decide alike at the threshold
    lam_max = 30.0
    for frac, ok in ((0.9e-8, True), (1.1e-8, False)):
        Q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))
        lam = np.array([-frac * lam_max, 1.0, 2.0, lam_max])
        S = (Q * lam) @ Q.T
        S = 0.5 * (S + S.T)
        if ok:
            check_psd(S, np.float64)
        else:
            with pytest.raises(ValueError, match="not positive semi-definite"):
                check_psd(S, np.float64)
