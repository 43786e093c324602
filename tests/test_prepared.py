"""PreparedSigma: the same results as the plain matrix, with the work done once."""

import numpy as np
import pytest

from sigmadecomp import (
    cp,
    psd_root,
    relative_sigma_error,
    sigma_norm,
    sigma_svd,
    tt_conv,
    tt_linear,
    tucker2,
)
from sigmadecomp import _backend as B
from sigmadecomp import ranks
from sigmadecomp.prepared import PreparedSigma, prepare_sigma

torch = pytest.importorskip("torch")


def _problem(lib, dtype, singular):
    rng = np.random.default_rng(3)
    K = rng.standard_normal((6, 4, 3, 3))
    X = rng.standard_normal((20 if singular else 200, 36))
    S = X.T @ X / X.shape[0]
    if lib == "torch":
        K, S = torch.tensor(K), torch.tensor(S)
    else:
        K, S = K.copy(), S.copy()
    return K.astype(dtype) if lib == "numpy" else K.to(getattr(torch, dtype)), \
        S.astype(dtype) if lib == "numpy" else S.to(getattr(torch, dtype))


def _close(a, b, dtype):
    a, b = B.to_numpy(a), B.to_numpy(b)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("singular", [False, True])
def test_every_entry_point_gives_the_plain_matrix_result(lib, dtype, singular):
    K, S = _problem(lib, dtype, singular)
    P = PreparedSigma(S)
    W = K.reshape(K.shape[0], -1)
    runs = [
        lambda s: sigma_svd(W, 3, s).to_tensor(),
        lambda s: sigma_svd(W, 3, s, ridge=0).to_tensor(),
        lambda s: tucker2(K, (3, 2), s, n_iter_max=4).to_tensor(),
        lambda s: cp(K, 4, s, n_iter_max=4).to_tensor(),
        lambda s: tt_conv(K, in_modes=(2, 2), out_modes=(2, 3), ranks=(2, 2), sigma=s,
                          n_iter_max=2).to_tensor(),
        lambda s: tt_linear(W, in_modes=(4, 9), out_modes=(2, 3), ranks=(2,), sigma=s,
                            n_iter_max=2).to_tensor(),
    ]
    for run in runs:
        _close(run(P), run(S), dtype)
    approx = tucker2(K, (2, 2), S, n_iter_max=2).to_tensor()
    assert relative_sigma_error(K, approx, P) == pytest.approx(
        relative_sigma_error(K, approx, S), rel=1e-12)
    _close(sigma_norm(K - approx, P), sigma_norm(K - approx, S), dtype)
    for method in ("svd", "tucker2", "cp"):
        w = W if method == "svd" else K
        assert ranks.evbmf_ranks(w, method, P) == ranks.evbmf_ranks(w, method, S)
    a = ranks.error_curve(K, "tucker2", P)
    b = ranks.error_curve(K, "tucker2", S)
    np.testing.assert_allclose(a.errors, b.errors, rtol=1e-10, atol=1e-12)
    r1, r2 = psd_root(P), psd_root(S)
    assert r1.rank == r2.rank
    _close(r1.sqrt(), r2.sqrt(), dtype)


def test_eigendecomposition_and_psd_test_run_once(monkeypatch):
    K, S = _problem("numpy", "float64", True)
    calls = []
    real = B.eigh
    # counted at the backend, where every eigen-decomposition of the library runs
    monkeypatch.setattr(B, "eigh", lambda a: calls.append(a.shape) or real(a))
    P = PreparedSigma(S)
    assert not calls and not P.psd_checked
    W = K.reshape(6, -1)
    ranks.evbmf_ranks(K, "tucker2", P)
    sigma_svd(W, 3, P)
    ranks.error_curve(K, "cp", P)
    psd_root(P)
    tucker2(K, (3, 2), P, n_iter_max=2)
    assert calls.count((36, 36)) == 1 and P.eigh_count == 1
    calls.clear()
    sigma_svd(W, 3, S)
    sigma_svd(W, 3, S)
    assert calls.count((36, 36)) == 2  # the plain matrix: once per call


def test_psd_test_without_eigendecomposition_runs_once(monkeypatch):
    import sigmadecomp._validation as V

    K, S = _problem("numpy", "float64", False)
    seen = []
    real = V.check_psd
    monkeypatch.setattr(V, "check_psd", lambda *a, **k: seen.append(1) or real(*a, **k))
    import sigmadecomp.prepared as prep

    monkeypatch.setattr(prep, "check_psd", V.check_psd)
    P = PreparedSigma(S)
    tucker2(K, (3, 2), P, n_iter_max=2)
    cp(K, 3, P, n_iter_max=2)
    relative_sigma_error(K, K * 0.5, P)
    assert len(seen) == 1 and P.psd_checked and P.eigh_count == 0


def test_indefinite_and_bad_input_are_refused_like_the_plain_matrix():
    K = np.random.default_rng(0).standard_normal((4, 4, 3, 3))
    S = np.eye(36)
    S[0, 0] = -1.0
    P = PreparedSigma(S)
    for s in (S, P):
        with pytest.raises(ValueError, match="sigma is not positive semi-definite: smallest "
                                             "eigenvalue -1"):
            tucker2(K, (2, 2), s)
    with pytest.raises(ValueError, match=r"must be \(18, 18\)"):
        tucker2(K[:, :2], (2, 2), PreparedSigma(np.eye(36)))
    with pytest.raises(ValueError, match="not symmetric"):
        PreparedSigma(np.triu(np.ones((3, 3))))
    with pytest.raises(ValueError, match=r"square"):
        PreparedSigma(np.ones((3, 4)))
    with pytest.raises(TypeError, match="must be float32 or float64"):
        PreparedSigma(np.eye(3, dtype=int))
    with pytest.raises(TypeError, match="already a PreparedSigma"):
        PreparedSigma(P)


def test_input_untouched_and_dtype_device_follow():
    S = torch.eye(5, dtype=torch.float32) * 2
    S[0, 1] = S[1, 0] = 0.5
    before = S.clone()
    P = prepare_sigma(S)
    assert prepare_sigma(P) is P and prepare_sigma(None) is None
    assert P.matrix.dtype == torch.float64 and isinstance(P.matrix, torch.Tensor)
    assert P.dtype == torch.float32 and P.shape == (5, 5)
    assert torch.equal(S, before)
    Q = P.like(np.zeros(1))
    assert isinstance(Q.matrix, np.ndarray) and P.like(P.matrix) is P
    np.testing.assert_array_equal(Q.matrix, P.matrix.numpy())


def test_discard_factorization_frees_and_recomputes_on_demand():
    _, S = _problem("numpy", "float64", True)
    P = PreparedSigma(S)
    first = psd_root(P).sqrt()
    P.discard_factorization()
    assert P.psd_checked and P.eigh_count == 1 and "eigh=no" in repr(P)
    np.testing.assert_allclose(psd_root(P).sqrt(), first, rtol=0, atol=1e-13)
    assert P.eigh_count == 2


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_release_frees_the_matrix_and_the_next_use_rebuilds_it_unchanged(lib, monkeypatch):
    K, S = _problem(lib, "float32", singular=True)
    P = PreparedSigma(S)
    first = B.to_numpy(P.matrix).copy()
    P.eigh()
    P.check_psd()
    assert P.release() is P
    assert not P.held and P._eigh is None and P.psd_checked  # the checks stay done
    import sigmadecomp.prepared as prepared_module

    def no_checks(*a, **kw):
        raise AssertionError("the checks ran again")

    monkeypatch.setattr(prepared_module, "check_sigma", no_checks)
    a = tucker2(K, (3, 2), P, n_iter_max=3)  # rebuilds the float64 matrix on first use
    monkeypatch.undo()
    assert P.held and P.eigh_count == 1
    np.testing.assert_array_equal(B.to_numpy(P.matrix), first)  # the same operations
    b = tucker2(K, (3, 2), PreparedSigma(S), n_iter_max=3)
    np.testing.assert_array_equal(B.to_numpy(a.to_tensor()), B.to_numpy(b.to_tensor()))
    # released again, a copy in the other library is made from the rebuilt matrix
    other = np.zeros(1) if lib == "torch" else torch.zeros(1, dtype=torch.float64)
    np.testing.assert_array_equal(B.to_numpy(P.release().like(other).matrix), first)


def test_release_uses_rebuild_and_does_not_keep_a_reference_to_like():
    import weakref

    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 6))
    calls = []

    def make():
        calls.append(1)
        return X.T @ X / 50

    like = torch.zeros(3, 3, dtype=torch.float32)
    P = PreparedSigma(make(), like=like, rebuild=make)
    assert B.is_torch(P.matrix) and P.matrix.dtype == torch.float64
    ref = weakref.ref(like)
    del like
    assert ref() is None  # like gave only its library and device
    P.release()
    assert len(calls) == 1 and not P.held
    np.testing.assert_allclose(P.matrix.numpy(), X.T @ X / 50, rtol=0, atol=1e-15)
    assert len(calls) == 2
