"""The B-update's block preconditioner built in chunks of components, float32 storage."""

import importlib

import numpy as np
import pytest
import torch

from sigmadecomp.cp import _block_inverse_factors, als_engine

# the module itself (the package exports the function under the same name)
cp_module = importlib.import_module("sigmadecomp.cp")

S, H, W = 6, 2, 2
P = H * W


def _inputs(rng, R, rank=None):
    n = S * P
    rank = n if rank is None else rank
    X = rng.standard_normal((rank, n)) * np.geomspace(0.3, 3.0, n)
    sigma = X.T @ X / rank
    CD = rng.standard_normal((P, R))
    gdiag = np.abs(rng.standard_normal(R)) + 0.5
    return sigma, CD, gdiag


def _blocks(sigma, CD, gdiag, l2):
    """Brute force: M_r = G_rr (I kron cd_r)^T Sigma (I kron cd_r) + l2 I."""
    out = []
    for r in range(CD.shape[1]):
        E = np.kron(np.eye(S), CD[:, r][:, None])  # (n, S)
        out.append(gdiag[r] * E.T @ sigma @ E + l2 * np.eye(S))
    return out


@pytest.mark.parametrize("l2", [0.0, 0.3])
@pytest.mark.parametrize("rank", [None, 10, 3])  # definite / deficient Sigma / singular blocks
def test_chunked_factors_equal_unchunked(rng, l2, rank):
    R = 7
    sigma, CD, gdiag = _inputs(rng, R, rank)
    whole = _block_inverse_factors(sigma, CD, gdiag, l2, S, chunk_bytes=10**9)
    for k in (1, 2, 3):  # forced chunks of k components (the last one shorter)
        part = _block_inverse_factors(sigma, CD, gdiag, l2, S, chunk_bytes=8 * S * S * k)
        assert part.dtype == np.float64
        np.testing.assert_allclose(part, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    # each factor W_r inverts its block on the block's range: M_r W_r^T W_r M_r = M_r
    for Wr, Mr in zip(whole, _blocks(sigma, CD, gdiag, l2)):
        np.testing.assert_allclose(Mr @ Wr.T @ Wr @ Mr, Mr, atol=1e-8 * np.abs(Mr).max())
        if rank is None or l2:
            np.testing.assert_allclose(Wr.T @ Wr @ Mr, np.eye(S), atol=1e-8)


@pytest.mark.parametrize("rank", [None, 3])  # Cholesky / pseudo-inverse blocks
def test_torch_factors_equal_numpy(rng, rank):
    sigma, CD, gdiag = _inputs(rng, 5, rank=rank)
    ref = _block_inverse_factors(sigma, CD, gdiag, 0.0, S, chunk_bytes=8 * S * S * 2)
    out = _block_inverse_factors(torch.from_numpy(sigma), torch.from_numpy(CD),
                                 torch.from_numpy(gdiag), 0.0, S, chunk_bytes=8 * S * S * 2)
    # pseudo-inverse roots are unique up to the eigenvectors' signs: compare W^T W
    gram = np.swapaxes(ref, 1, 2) @ ref
    np.testing.assert_allclose(np.swapaxes(out.numpy(), 1, 2) @ out.numpy(), gram,
                               atol=1e-9 * np.abs(gram).max())
    if rank is None:  # Cholesky inverses are unique
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-9 * np.abs(ref).max())


def test_large_factors_are_float32_unless_a_block_is_singular(rng):
    sigma, CD, gdiag = _inputs(rng, 5)
    ref = _block_inverse_factors(sigma, CD, gdiag, 0.0, S)
    lo = _block_inverse_factors(sigma, CD, gdiag, 0.0, S, chunk_bytes=8 * S * S * 2,
                                float32_bytes=0)
    assert lo.dtype == np.float32
    np.testing.assert_allclose(lo, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    sing, CD, gdiag = _inputs(rng, 5, rank=3)  # rank 3 < S: every block singular
    out = _block_inverse_factors(sing, CD, gdiag, 0.0, S, float32_bytes=0)
    assert out.dtype == np.float64


@pytest.mark.parametrize("rank", [None, 12])
def test_float32_chunked_preconditioner_keeps_b_updates_exact(rng, monkeypatch, rank):
    """Sweeps with float32 factors built in chunks reach the inner rtol (float64
    residuals) and follow the float64 path to rounding of the solves."""
    R = 4
    K = rng.standard_normal((5, S, H, W))
    n = S * P
    X = rng.standard_normal((rank or n, n)) * np.geomspace(0.3, 3.0, n)
    sigma = X.T @ X / X.shape[0]
    w0 = np.abs(rng.standard_normal(R)) + 0.5
    F0 = [rng.standard_normal((d, R)) for d in K.shape]

    def run():
        eng = als_engine(K, w0, F0, sigma, inner_rtol=1e-10)
        fs = [eng.sweep() for _ in range(6)]
        return eng, np.array(fs)

    ref_eng, ref = run()
    monkeypatch.setattr(cp_module, "PRECOND_FLOAT32_BYTES", 0)
    monkeypatch.setattr(cp_module, "PRECOND_CHUNK_BYTES", 8 * S * S)
    eng, got = run()
    if rank is None:
        assert eng._Linv.dtype == np.float32
    assert max(eng.cg_residuals) <= 1e-10 and max(ref_eng.cg_residuals) <= 1e-10
    np.testing.assert_allclose(got, ref, rtol=1e-7)
    assert np.all(np.diff(got) <= 1e-10 * got[0])


def test_loose_inner_rtol_uses_a_float32_operator_and_matches_float64(rng, monkeypatch):
    """inner.rtol >= CG_FLOAT32_RTOL: the CG product with Sigma in float32; the run
    follows the float64 operator's to well within that tolerance."""
    K = rng.standard_normal((5, S, H, W))
    sigma, _, _ = _inputs(rng, 1)
    kw = dict(n_iter_max=6, tol=0.0, inner={"rtol": 1e-4})
    eng = als_engine(K, np.ones(3), [rng.standard_normal((d, 3)) for d in K.shape], sigma,
                     inner_rtol=1e-4)
    assert eng._Sig_lo is not None and eng._Sig_lo.dtype == np.float32
    assert als_engine(K, np.ones(3), [rng.standard_normal((d, 3)) for d in K.shape], sigma,
                      inner_rtol=1e-5)._Sig_lo is None
    lo = cp_module.cp(K, 3, sigma, **kw)
    monkeypatch.setattr(cp_module, "CG_FLOAT32_RTOL", 1.0)  # float64 operator
    hi = cp_module.cp(K, 3, sigma, **kw)
    np.testing.assert_allclose(lo.errors, hi.errors, rtol=1e-5)
    assert np.all(np.diff(lo.errors) <= 1e-12)
