import numpy as np
import pytest

from sigmadecomp import _backend as B


def test_check_rng_normalises_once():
    g = np.random.default_rng(3)
    assert B.check_rng(g) is g
    a = B.check_rng(7).standard_normal(3)
    b = B.check_rng(7).standard_normal(3)
    assert np.array_equal(a, b)
    with pytest.raises(TypeError, match="rng='x' is not allowed"):
        B.check_rng("x")


def test_asarray_like_follows_library_dtype_device():
    torch = pytest.importorskip("torch")
    like = torch.zeros(2, dtype=torch.float32)
    out = B.asarray_like(np.arange(3.0), like)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device == like.device
    back = B.asarray_like(torch.arange(3.0), np.zeros(1))
    assert isinstance(back, np.ndarray) and back.dtype == np.float64


def test_svd_flip_and_linear_algebra_agree_across_libraries(rng):
    torch = pytest.importorskip("torch")
    A = rng.standard_normal((6, 4))
    for x in (A, torch.from_numpy(A)):
        u, s, vh = B.svd(x)
        u, vh = B.svd_flip(u, vh)
        un = B.to_numpy(u)
        np.testing.assert_allclose(B.to_numpy((u * s) @ vh), A, atol=1e-12)
        assert np.all(un[np.abs(un).argmax(0), np.arange(4)] > 0)
    S = A.T @ A
    for x in (S, torch.from_numpy(S)):
        L = B.cholesky(x)
        np.testing.assert_allclose(B.to_numpy(B.cho_solve(L, x)), np.eye(4), atol=1e-10)
        np.testing.assert_allclose(
            B.to_numpy(B.solve_triangular(L, L @ x[:, :2], lower=True)), S[:, :2], atol=1e-10
        )
        w, V = B.eigh(x)
        np.testing.assert_allclose(B.to_numpy((V * w) @ V.T), S, atol=1e-10)
    with pytest.raises(np.linalg.LinAlgError):
        B.cholesky(torch.from_numpy(-S))
