import numpy as np
import pytest
import scipy.optimize
from hypothesis import given
from hypothesis import strategies as st

from sigmadecomp import relative_sigma_error, sigma_norm, sigma_svd
from _helpers import random_psd  # noqa: E402


def eckart_young(W, r):
    U, s, Vh = np.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vh[:r], np.sqrt((s[r:] ** 2).sum() / (s**2).sum())


@pytest.mark.parametrize("use_identity", [False, True])
def test_plain_and_identity_equal_eckart_young(lib, rng, use_identity):
    W = rng.standard_normal((7, 5))
    Wx = lib.asarray(W)
    S = lib.asarray(np.eye(5)) if use_identity else None
    for r in (1, 3, 5):
        res = sigma_svd(Wx, r, sigma=S)
        assert lib.is_same_kind(res.left) and lib.is_same_kind(res.right)
        assert res.left.shape == (7, r) and res.right.shape == (r, 5)
        ref, err = eckart_young(lib.to_numpy(Wx), r)
        np.testing.assert_allclose(lib.to_numpy(res.to_tensor()), ref, atol=10 * lib.rtol)
        assert res.error == pytest.approx(err, rel=1e-6, abs=1e-6)
        left = lib.to_numpy(res.left)
        np.testing.assert_allclose(left.T @ left, np.eye(r), atol=10 * lib.rtol)


@given(
    T=st.integers(1, 6),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_error_is_whitened_tail_and_matches_direct(T, n, seed, data):
    rng = np.random.default_rng(seed)
    r = data.draw(st.integers(1, min(T, n)))
    W = rng.standard_normal((T, n))
    S = random_psd(rng, n)
    res = sigma_svd(W, r, sigma=S, ridge=0)
    L = np.linalg.cholesky(S + 0 * np.eye(n))
    s = np.linalg.svd(W @ L, compute_uv=False)
    tail = np.sqrt((s[r:] ** 2).sum() / (s**2).sum())
    assert res.error == pytest.approx(tail, rel=1e-7, abs=1e-9)
    assert relative_sigma_error(W, res.to_tensor(), S) == pytest.approx(res.error, rel=1e-6, abs=1e-8)
    assert np.linalg.matrix_rank(res.to_tensor(), tol=1e-8) <= r


def _best_by_local_search(W, S, r, rng, starts=8):
    T, n = W.shape
    Ls = np.linalg.cholesky(S + 1e-14 * np.eye(n))

    def f(z):
        A = z[: T * r].reshape(T, r)
        B = z[T * r:].reshape(r, n)
        D = (W - A @ B) @ Ls
        return float((D * D).sum())

    best = np.inf
    for _ in range(starts):
        z0 = rng.standard_normal(T * r + r * n)
        out = scipy.optimize.minimize(f, z0, method="BFGS", options={"gtol": 1e-10, "maxiter": 2000})
        best = min(best, out.fun)
    return best


@pytest.mark.parametrize("sigma_rank", [4, 2])
def test_never_beaten_by_other_rank_r_candidates(rng, sigma_rank):
    T, n, r = 3, 4, 1
    W = rng.standard_normal((T, n))
    S = random_psd(rng, n, sigma_rank)
    res = sigma_svd(W, r, sigma=S, ridge=0)
    ours = float(sigma_norm(W - res.to_tensor(), S)) ** 2
    # random rank-r candidates and a multi-start local optimiser never do better
    for _ in range(2000):
        X = rng.standard_normal((T, r)) @ rng.standard_normal((r, n))
        assert float(sigma_norm(W - X, S)) ** 2 >= ours - 1e-10
    assert _best_by_local_search(W, S, r, rng) >= ours - 1e-8
    # and it beats (or ties) the plain truncated SVD in the Sigma-norm
    plain = sigma_svd(W, r).to_tensor()
    assert float(sigma_norm(W - plain, S)) ** 2 >= ours - 1e-12


def test_rank_deficient_sigma(lib, rng):
    T, n = 5, 8
    W = rng.standard_normal((T, n))
    S = random_psd(rng, n, 3)
    for r in (1, 3, 5):  # r = 5 exceeds the rank Sigma can see
        res = sigma_svd(lib.asarray(W), r, sigma=lib.asarray(S), ridge=0)
        X = lib.to_numpy(res.to_tensor())
        assert np.all(np.isfinite(X))
        assert res.left.shape == (T, r) and res.right.shape == (r, n)
        Wn, Sn = lib.to_numpy(lib.asarray(W)), lib.to_numpy(lib.asarray(S))
        direct = relative_sigma_error(Wn, X, Sn)
        # a float32 sigma is only rank-deficient up to rounding (~1e-7 relative
        # eigenvalues), which shows up as ~sqrt(1e-7) in a relative error
        abs_tol = 1e-3 if lib.dtype_name == "float32" else 1e-7
        assert res.error == pytest.approx(direct, rel=1e-3, abs=abs_tol)
        if r >= 3:
            assert res.error == pytest.approx(0.0, abs=abs_tol)


def test_zero_sigma_and_zero_weight():
    res = sigma_svd(np.ones((3, 4)), 2, sigma=np.zeros((4, 4)))
    assert np.all(res.to_tensor() == 0) and res.error == 0.0
    res = sigma_svd(np.zeros((3, 4)), 2, sigma=np.eye(4))
    assert res.error == 0.0 and np.all(np.isfinite(res.to_tensor()))


def test_inputs_not_mutated_and_deterministic_signs(rng):
    W = rng.standard_normal((4, 6))
    S = random_psd(rng, 6)
    W0, S0 = W.copy(), S.copy()
    a = sigma_svd(W, 2, sigma=S)
    b = sigma_svd(-(-W), 2, sigma=S)
    assert np.array_equal(W, W0) and np.array_equal(S, S0)
    np.testing.assert_array_equal(a.left, b.left)
    idx = np.abs(a.left).argmax(axis=0)
    assert np.all(a.left[idx, np.arange(2)] > 0)


def test_torch_and_numpy_agree(rng):
    torch = pytest.importorskip("torch")
    W = rng.standard_normal((6, 9))
    S = random_psd(rng, 9)
    a = sigma_svd(W, 3, sigma=S)
    b = sigma_svd(torch.from_numpy(W), 3, sigma=torch.from_numpy(S))
    np.testing.assert_allclose(b.left.numpy(), a.left, atol=1e-10)
    np.testing.assert_allclose(b.right.numpy(), a.right, atol=1e-10)
    # a NumPy sigma is accepted for a torch weight (moved to its library/device)
    c = sigma_svd(torch.from_numpy(W).float(), 3, sigma=S)
    assert c.left.dtype == torch.float32 and isinstance(c.right, torch.Tensor)


def test_repr_mentions_rank_and_error(rng):
    res = sigma_svd(rng.standard_normal((4, 5)), 2, sigma=np.eye(5))
    text = repr(res)
    assert "rank=2" in text and "Sigma error=" in text and "4x2" in text


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        (dict(weight=np.ones((3, 4)), rank=0), ValueError, "rank=0 is not allowed; rank must be at least 1"),
        (dict(weight=np.ones((3, 4)), rank=4), ValueError, "rank=4 is not allowed; rank must be at most 3"),
        (dict(weight=np.ones((3, 4)), rank=1.5), TypeError, "rank=1.5 is not allowed"),
        (dict(weight=np.ones((3, 4, 1)), rank=1), ValueError, "weight has ndim=3"),
        (dict(weight=np.full((3, 4), np.nan), rank=1), ValueError, "weight contains NaN"),
        (dict(weight=np.ones((3, 4), dtype=np.int32), rank=1), TypeError, "weight has dtype int32"),
        (dict(weight=np.ones((3, 4)), rank=1, sigma=np.eye(3)), ValueError, "sigma has shape"),
        (dict(weight=np.ones((3, 4)), rank=1, sigma=np.triu(np.ones((4, 4)))), ValueError, "not symmetric"),
        (dict(weight=np.ones((3, 4)), rank=1, sigma=-np.eye(4)), ValueError, "not positive semi-definite"),
        (dict(weight=[[1.0, 2.0]], rank=1), TypeError, "weight of type list"),
    ],
)
def test_validation_messages(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        sigma_svd(**kwargs)
