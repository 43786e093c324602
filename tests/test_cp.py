import functools

import numpy as np
import pytest

from sigmadecomp import CPResult, InnerSolver, relative_sigma_error
from sigmadecomp import cp as _cp
from sigmadecomp.cp import FROBENIUS_INIT_SWEEPS
# Single block updates and line-search steps are not reachable through cp() (it runs
# whole sweeps), so the block-level tests use the documented internal entry points.
from sigmadecomp.cp import als_engine, try_extrapolation

# These tests check CP-ALS-Sigma itself (exact blocks, monotone errors equal to the
# recomputed Sigma-error), so they run it unregularised; the default ridge is
# tested with the other solvers in test_sigma_policy.py.
cp = functools.partial(_cp, ridge=0.0)
from _helpers import patches  # noqa: E402

SHAPE = (5, 4, 3, 2)


def random_psd(rng, n, rank=None, spread=3.0):
    rank = n if rank is None else rank
    X = rng.standard_normal((max(rank, 1), n)) * np.geomspace(1.0 / spread, spread, n)
    return X.T @ X / max(rank, 1)


def random_cp(rng, shape, R):
    return np.abs(rng.standard_normal(R)) + 0.5, [rng.standard_normal((d, R)) for d in shape]


def cp_tensor(w, F):
    return np.einsum("r,tr,sr,hr,wr->tshw", w, *F)


def dense_objective(K, w, F, S):
    D = (K - cp_tensor(w, F)).reshape(K.shape[0], -1)
    return float(np.sum((D @ S) * D)) if S is not None else float(np.sum(D * D))


def assert_monotone(errors, slack=1e-10):
    e = np.asarray(errors)
    assert np.all(np.diff(e) <= slack * max(e[0], 1e-300)), e


def real_patch_covariance(channels=4, n_images=24):
    """Second moment (36 x 36) of 3x3 patches of ReLU feature maps of real images."""
    from sigmadecomp.datasets import DatasetNotFoundError, load_fashion_mnist

    try:
        images, _ = load_fashion_mnist(split="test")
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) not installed")
    rng = np.random.default_rng(1)
    x = images[rng.choice(images.shape[0], n_images, replace=False)][:, None].astype(np.float64)
    w = rng.standard_normal((channels, 9)) / 3.0
    f = np.maximum(patches(x) @ w.T + 0.05, 0.0)  # (N*28*28, channels)
    f = f.reshape(n_images, 28, 28, channels).transpose(0, 3, 1, 2)
    U = patches(f)
    return U.T @ U / U.shape[0]


# --------------------------------------------------------------------------
# exact block minimisers against a brute-force dense least-squares solve
# --------------------------------------------------------------------------

def brute_force_block(K, w, F, S, mode, l2):
    """min over X = F_mode diag(w) of ||(K - K~(X)) L||^2 + l2 ||X||^2 by lstsq."""
    T = K.shape[0]
    n = K[0].size
    if S is None:
        L = np.eye(n)
    else:
        lam, V = np.linalg.eigh(S)
        L = V * np.sqrt(np.clip(lam, 0, None))
    others = [f.copy() for f in F]
    I, R = F[mode].shape
    cols = []
    for i in range(I):
        for r in range(R):
            E = np.zeros((I, R))
            E[i, r] = 1.0
            others[mode] = E
            cols.append((cp_tensor(np.ones(R), others).reshape(T, n) @ L).ravel())
    A = np.stack(cols, axis=1)
    b = (K.reshape(T, n) @ L).ravel()
    if l2:
        A = np.vstack([A, np.sqrt(l2) * np.eye(I * R)])
        b = np.concatenate([b, np.zeros(I * R)])
    x, *_ = np.linalg.lstsq(A, b, rcond=None)
    val = float(np.sum((A @ x - b) ** 2))
    return x.reshape(I, R), val


@pytest.mark.parametrize("kind", ["frobenius", "identity", "full", "deficient"])
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_each_block_update_is_the_exact_minimiser(kind, mode, l2):
    rng = np.random.default_rng(100 + mode)
    K = rng.standard_normal(SHAPE)
    n = int(np.prod(SHAPE[1:]))
    R = 3
    w, F = random_cp(rng, SHAPE, R)
    S = {"frobenius": None, "identity": np.eye(n), "full": random_psd(rng, n),
         "deficient": random_psd(rng, n, rank=7)}[kind]
    eng = als_engine(K, w, [f.copy() for f in F], S, l2_reg=l2, inner_rtol=1e-13,
                     inner_maxiter=2000)
    # bring the engine to the state in which `mode` is updated (A first)
    updates = [eng.update_A, eng.update_B, eng.update_C, eng.update_D]
    for k in range(mode):
        updates[k]()
    w0, F0 = eng.point()
    X_ref, f_ref = brute_force_block(K, w0, F0, S, mode, l2)
    before = dense_objective(K, w0, F0, S) + l2 * np.sum((F0[mode] * w0) ** 2)
    updates[mode]()
    w1, F1 = eng.point()
    X = F1[mode] * w1
    f_new = dense_objective(K, w1, F1, S) + l2 * np.sum(X ** 2)
    assert f_new <= before * (1 + 1e-12)
    assert f_new == pytest.approx(f_ref, rel=1e-8, abs=1e-10 * before)
    # other factors untouched, weights carried by the updated block
    for k in range(4):
        if k != mode:
            np.testing.assert_allclose(F1[k], F0[k], atol=1e-14)
    if kind in ("frobenius", "identity", "full") or l2 > 0:  # unique minimiser
        np.testing.assert_allclose(X, X_ref, rtol=1e-6, atol=1e-8)


def test_inexact_cg_update_never_increases_objective(rng):
    K = rng.standard_normal((6, 7, 3, 3))
    n = 63
    S = random_psd(rng, n, spread=30.0)
    for maxiter in (1, 2, 5):
        w, F = random_cp(rng, K.shape, 4)
        eng = als_engine(K, w, F, S, inner_maxiter=maxiter)
        eng.update_A()
        before = dense_objective(K, *eng.point(), S)
        eng.update_B()
        after = dense_objective(K, *eng.point(), S)
        assert after <= before * (1 + 1e-12)
        assert eng.cg_iters[-1] <= maxiter


def test_sweep_objective_matches_dense_formula(rng):
    K = rng.standard_normal(SHAPE)
    S = random_psd(rng, 24)
    for metric in (None, S):
        eng = als_engine(K, *random_cp(rng, SHAPE, 3), metric)
        f = eng.sweep()
        ref = dense_objective(K, *eng.point(), metric)
        assert f == pytest.approx(ref, rel=1e-9)
        assert eng.objective() == pytest.approx(ref, rel=1e-9)


# --------------------------------------------------------------------------
# whole algorithm
# --------------------------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("linesearch", [False, True])
def test_errors_monotone_and_consistent(lib, rng, weighted, linesearch):
    K = rng.standard_normal((6, 5, 3, 3))
    S = random_psd(rng, 45, spread=10.0) if weighted else None
    Kx = lib.asarray(K)
    Sx = lib.asarray(S) if weighted else None
    res = cp(Kx, 4, Sx, n_iter_max=30, tol=0.0, rng=0, linesearch=linesearch)
    assert isinstance(res, CPResult) and res.weighted is weighted
    assert lib.is_same_kind(res.weights) and all(lib.is_same_kind(f) for f in res.factors)
    assert [tuple(f.shape) for f in res.factors] == [(6, 4), (5, 4), (3, 4), (3, 4)]
    assert res.n_iter == 30 and len(res.errors) == 31 and not res.converged
    assert_monotone(res.errors, slack=1e-10)
    assert res.errors[-1] < res.errors[0]
    Kt = lib.to_numpy(res.to_tensor())
    err = relative_sigma_error(K, Kt, S)
    assert err == pytest.approx(res.error, rel=max(10 * lib.rtol, 1e-7), abs=1e-6)
    for f in res.factors[1:]:
        f = lib.to_numpy(f)
        np.testing.assert_allclose(np.linalg.norm(f, axis=0), 1.0, rtol=10 * lib.rtol)
        idx = np.argmax(np.abs(f), axis=0)
        assert np.all(f[idx, np.arange(4)] > 0)  # deterministic signs
    assert "CPResult(rank=4" in repr(res)


def test_sigma_identity_equals_frobenius_from_same_start(rng):
    K = rng.standard_normal((6, 5, 3, 3))
    start = random_cp(rng, K.shape, 4)
    fro = cp(K, 4, init=start, n_iter_max=25, tol=0.0)
    eye = cp(K, 4, np.eye(45), init=start, n_iter_max=25, tol=0.0)
    np.testing.assert_allclose(eye.errors, fro.errors, rtol=1e-7)
    np.testing.assert_allclose(eye.to_tensor(), fro.to_tensor(), atol=1e-6)


def test_frobenius_matches_or_beats_tensorly(rng):
    tl = pytest.importorskip("tensorly")
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import parafac

    K = rng.standard_normal((8, 6, 3, 3))
    for R in (3, 7):
        w, F = random_cp(rng, K.shape, R)
        tl.set_backend("numpy")
        tl_res, tl_err = parafac(K, R, n_iter_max=15, init=CPTensor((w.copy(), [f.copy() for f in F])),
                                 tol=0.0, return_errors=True)
        ours = cp(K, R, init=(w, F), n_iter_max=15, tol=0.0)
        tl_final = relative_sigma_error(K, tl.cp_to_tensor(tl_res))
        assert ours.error <= tl_final * (1 + 1e-8)
        assert ours.error == pytest.approx(tl_final, rel=1e-6)  # the same iterates


@pytest.mark.parametrize("source", ["random", "real-patches"])
def test_sigma_cp_beats_frobenius_cp_in_sigma_norm(rng, source):
    if source == "random":
        K = rng.standard_normal((6, 5, 3, 3))
        S = random_psd(rng, 45, spread=10.0)
    else:
        S = real_patch_covariance()
        K = rng.standard_normal((6, 4, 3, 3))
    for R in (2, 6):
        fro = cp(K, R, n_iter_max=50, rng=1)
        sig = cp(K, R, S, n_iter_max=50, rng=1)
        e_fro = relative_sigma_error(K, fro.to_tensor(), S)
        assert sig.error <= e_fro + 1e-12
        assert_monotone(sig.errors)


@pytest.mark.parametrize("weighted", [False, True])
def test_exact_recovery_of_rank_R_kernel(rng, weighted):
    w, F = random_cp(rng, (6, 5, 3, 3), 2)
    K = cp_tensor(w, F)
    S = random_psd(rng, 45) if weighted else None
    res = cp(K, 2, S, init="svd", n_iter_max=400, tol=0.0, rng=0, linesearch=True)
    assert res.error < 1e-6
    np.testing.assert_allclose(res.to_tensor(), K, atol=1e-5 * np.abs(K).max())


def test_rank_deficient_sigma(rng):
    K = rng.standard_normal((6, 5, 3, 3))
    S = random_psd(rng, 45, rank=10)  # rank 10 < n = 45
    res = cp(K, 3, S, n_iter_max=30, rng=2)
    assert all(np.isfinite(res.errors)) and np.all(np.isfinite(res.to_tensor()))
    assert_monotone(res.errors)
    fro = cp(K, 3, n_iter_max=30, rng=2)
    assert res.error <= relative_sigma_error(K, fro.to_tensor(), S) + 1e-12
    assert res.error == pytest.approx(relative_sigma_error(K, res.to_tensor(), S), rel=1e-6)
    zero = cp(K, 2, np.zeros((45, 45)), n_iter_max=3)  # Sigma sees nothing
    assert zero.error == 0.0 and np.all(np.isfinite(zero.to_tensor()))


@pytest.mark.parametrize("init", ["frobenius", "svd", "random", "result", "tuple"])
def test_every_init(rng, init):
    K = rng.standard_normal((6, 5, 3, 3))
    S = random_psd(rng, 45)
    w, F = random_cp(rng, K.shape, 4)
    copies = [f.copy() for f in F]
    if init == "result":
        arg = CPResult(weights=w, factors=F)
    elif init == "tuple":
        arg = (w, F)
    else:
        arg = init
    res = cp(K, 4, S, init=arg, n_iter_max=5, tol=0.0, rng=3)
    assert res.n_iter == 5 and np.isfinite(res.error)
    assert_monotone(res.errors)
    for a, b in zip(F, copies):
        np.testing.assert_array_equal(a, b)  # the user's factors are not modified
    if init in ("result", "tuple"):
        assert res.errors[0] == pytest.approx(relative_sigma_error(K, cp_tensor(w, F), S), rel=1e-9)
    if init == "frobenius":
        fro = cp(K, 4, init="svd", n_iter_max=25, tol=0.0, rng=3)
        assert res.errors[0] == pytest.approx(relative_sigma_error(K, fro.to_tensor(), S), rel=1e-8)


def test_default_init_follows_sigma(rng):
    K = rng.standard_normal((6, 5, 3, 3))
    S = random_psd(rng, 45)
    a = cp(K, 3, S, n_iter_max=2, tol=0.0, rng=5)
    b = cp(K, 3, S, init="frobenius", n_iter_max=2, tol=0.0, rng=5)
    np.testing.assert_allclose(a.errors, b.errors)
    c = cp(K, 3, n_iter_max=2, tol=0.0, rng=5)
    d = cp(K, 3, init="svd", n_iter_max=2, tol=0.0, rng=5)
    np.testing.assert_allclose(c.errors, d.errors)


def test_tol_and_callback(rng):
    K = rng.standard_normal((6, 5, 3, 3))
    res = cp(K, 3, n_iter_max=500, tol=1e-3)
    assert res.converged and res.n_iter < 500
    assert res.errors[-2] - res.errors[-1] <= 1e-3 * res.errors[-2]
    seen = []

    def stop_after_three(r):
        seen.append((r.n_iter, r.error))
        return r.n_iter == 3

    res = cp(K, 3, random_psd(rng, 45), n_iter_max=50, tol=0.0, callback=stop_after_three)
    assert res.n_iter == 3 and not res.converged and len(res.errors) == 4
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[-1][1] == res.error


def test_l2_reg_shrinks_factors(rng):
    K = rng.standard_normal((6, 5, 3, 3))
    S = random_psd(rng, 45)
    start = random_cp(rng, K.shape, 4)
    plain = cp(K, 4, S, init=start, n_iter_max=10, tol=0.0)
    reg = cp(K, 4, S, init=start, n_iter_max=10, tol=0.0, l2_reg=5.0)
    assert np.all(np.isfinite(reg.errors))
    assert np.linalg.norm(reg.weights) < np.linalg.norm(plain.weights)


def test_float32_and_torch_match_numpy_float64(lib, rng):
    K = rng.standard_normal((6, 5, 3, 3))
    S = random_psd(rng, 45)
    start = random_cp(rng, K.shape, 3)
    ref = cp(K, 3, S, init=start, n_iter_max=8, tol=0.0)
    out = cp(lib.asarray(K), 3, lib.asarray(S), init=tuple([lib.asarray(start[0]),
                                                            [lib.asarray(f) for f in start[1]]]),
             n_iter_max=8, tol=0.0)
    np.testing.assert_allclose(out.errors, ref.errors, rtol=100 * lib.rtol, atol=100 * lib.rtol)
    np.testing.assert_allclose(lib.to_numpy(out.to_tensor()), ref.to_tensor(),
                               atol=1e3 * lib.rtol * np.abs(K).max())


# --------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(kernel=np.zeros((4, 3, 3))), ValueError, "kernel has ndim=3"),
        (dict(kernel=np.zeros((4, 3, 3, 3), dtype=int)), TypeError, "kernel has dtype"),
        (dict(kernel=[[[[1.0]]]]), TypeError, "kernel of type list"),
        (dict(kernel=np.full((2, 2, 1, 1), np.nan)), ValueError, "kernel contains NaN"),
        (dict(rank=0), ValueError, "rank=0 is not allowed"),
        (dict(rank=2.5), TypeError, "rank=2.5"),
        (dict(sigma=np.eye(5)), ValueError, r"sigma has shape \(5, 5\)"),
        (dict(init="hooi"), ValueError, "init='hooi' is not allowed"),
        (dict(init=3), TypeError, "init of type int"),
        (dict(init=(np.ones(3), [np.ones((4, 3))] * 3)), ValueError, "init has 3 factors"),
        (dict(init=(np.ones(2), [np.ones((4, 3)), np.ones((3, 3)), np.ones((3, 3)), np.ones((3, 3))])),
         ValueError, r"init weights have shape \(2,\)"),
        (dict(init=(np.ones(3), [np.ones((4, 3)), np.ones((2, 3)), np.ones((3, 3)), np.ones((3, 3))])),
         ValueError, r"init factors\[1\] has shape \(2, 3\)"),
        (dict(n_iter_max=-1), ValueError, "n_iter_max=-1"),
        (dict(tol=-1.0), ValueError, "tol=-1.0"),
        (dict(l2_reg=-0.5), ValueError, "l2_reg=-0.5"),
        (dict(linesearch="yes"), TypeError, "linesearch='yes'"),
        (dict(callback=5), TypeError, "callback=5"),
        (dict(rng="seed"), TypeError, "rng='seed'"),
        (dict(inner={"rtol": -1.0}), ValueError, "inner.rtol=-1.0"),
        (dict(inner={"maxiter": 0}), ValueError, "inner.maxiter=0"),
        (dict(inner={"maxiter": 2.5}), TypeError, "inner.maxiter=2.5"),
        (dict(inner={"method": "direct"}), ValueError, "inner.method='direct' is not allowed"),
        (dict(inner={"precond": False}), ValueError, "inner.precond=False is not allowed"),
        (dict(inner={"maxiter": "exact"}), ValueError, "inner.maxiter='exact'.*'adaptive'"),
    ],
)
def test_bad_input_messages(kwargs, exc, match):
    args = dict(kernel=np.ones((4, 3, 3, 3)), rank=3)
    args.update(kwargs)
    kernel, rank = args.pop("kernel"), args.pop("rank")
    with pytest.raises(exc, match=match):
        cp(kernel, rank, **args)


def test_does_not_mutate_inputs(rng):
    K = rng.standard_normal((6, 5, 3, 3))
    S = random_psd(rng, 45)
    K0, S0 = K.copy(), S.copy()
    cp(K, 3, S, n_iter_max=3)
    np.testing.assert_array_equal(K, K0)
    np.testing.assert_array_equal(S, S0)


@pytest.mark.parametrize("weighted", [False, True])
def test_extrapolation_is_accepted_only_when_better(rng, weighted):
    K = rng.standard_normal((6, 5, 3, 3))
    S = random_psd(rng, 45) if weighted else None
    w, F = random_cp(rng, K.shape, 4)
    eng = als_engine(K, w, F, S)
    accepted = rejected = 0
    for it in range(1, 40):
        old = eng.point()
        f_new = eng.sweep()
        f, power = try_extrapolation(eng, old, f_new, max(it, 3), 3.0)
        assert f <= f_new
        assert f == pytest.approx(dense_objective(K, *eng.point(), S), rel=1e-9)
        accepted += f < f_new
        rejected += power > 3.0
    assert accepted > 0
    # a huge step is rejected and leaves the point unchanged
    old = eng.point()
    f_new = eng.sweep()
    w1, F1 = eng.point()
    f, power = try_extrapolation(eng, old, f_new, 10**9, 1.0)
    assert f == f_new and power == 2.0
    np.testing.assert_array_equal(eng.point()[0], w1)
    assert eng.sweep() <= f_new * (1 + 1e-12)  # the engine keeps working from there


# --------------------------------------------------------------------------
# singular and ill-conditioned Sigma, exact B-updates, reproducibility
# --------------------------------------------------------------------------

def psd_with_spectrum(rng, n, rank, cond):
    """A random PSD matrix of the given rank whose nonzero eigenvalues span ``cond``."""
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.geomspace(1.0, 1.0 / cond, n)
    lam[rank:] = 0.0
    S = (Q * lam) @ Q.T
    return 0.5 * (S + S.T)


def assert_reported_is_true(reported, true, K=None, S=None, float32=False):
    """Reported error = recomputed error, to 1e-8 relative for float64 results.

    Both carry rounding: entries of ``Sigma`` of order ``eps * lambda_max`` (also
    in its null space, where the residual may be as large as ``K``) move
    ``tr(D Sigma D^T)`` by up to about ``n eps lambda_max ||K||^2``; squared errors
    therefore agree to ``2e-8`` relative plus a floor ``1e-13 lambda_max ||K||^2 /
    tr(K Sigma K^T)`` (negligible unless the error is below about 1e-5). float32
    results: the returned factors are rounded to float32.
    """
    if float32:
        assert reported == pytest.approx(true, rel=1e-3, abs=1e-4)
        return
    K1 = K.reshape(K.shape[0], -1)
    floor = 1e-13 * np.linalg.eigvalsh(S)[-1] * np.sum(K1 * K1) / np.sum((K1 @ S) * K1)
    assert abs(reported ** 2 - true ** 2) <= 2e-8 * true ** 2 + floor, (reported, true)


def test_singular_sigma_1x1_does_not_blow_up():
    # an 8x8 kernel, Sigma of rank 6, R = 7: the jittered preconditioner amplified
    # the null space (weights ~1e8, reported error 0.0 against a true 0.13)
    rng = np.random.default_rng(0)
    K = rng.standard_normal((8, 8, 1, 1))
    X = rng.standard_normal((6, 8))
    S = X.T @ X / 6
    res = cp(K, 7, S)
    true = relative_sigma_error(K, res.to_tensor(), S)
    assert_reported_is_true(res.error, true, K, S)
    assert np.abs(res.weights).max() <= 10 * np.linalg.norm(K)
    assert_monotone(res.errors, slack=0.0)
    fro = cp(K, 7, n_iter_max=FROBENIUS_INIT_SWEEPS, tol=0.0, init="svd")
    assert true <= relative_sigma_error(K, fro.to_tensor(), S) + 1e-9


@pytest.mark.parametrize("shape, R", [((8, 8, 1, 1), 7), ((4, 3, 3, 3), 4)])
@pytest.mark.parametrize("cond", [1.0, 1e6, 1e12])
def test_rank_deficient_sweep(lib, shape, R, cond):
    """Reported = recomputed error, monotone, no worse than Frobenius CP, sane weights."""
    rng = np.random.default_rng(int(np.log10(cond)) + 7 * shape[2])
    K = rng.standard_normal(shape)
    n = int(np.prod(shape[1:]))
    S = psd_with_spectrum(rng, n, int(rng.integers(n // 2, n)), cond)
    Kx, Sx = lib.asarray(K), lib.asarray(S)
    # the matrix cp was given (float32 rounding included), in its dtype: the PSD
    # tolerance of the recomputation follows the dtype, as it did for cp
    S_seen = lib.to_numpy(Sx).astype(lib.dtype_name)
    res = cp(Kx, R, Sx, n_iter_max=8)
    Kt = lib.to_numpy(res.to_tensor())
    true = relative_sigma_error(K, Kt, S_seen)
    assert_reported_is_true(res.error, true, K, S_seen, float32=lib.dtype_name == "float32")
    assert_monotone(res.errors, slack=0.0)
    fro = cp(Kx, R, n_iter_max=FROBENIUS_INIT_SWEEPS, tol=0.0, init="svd")
    e_fro = relative_sigma_error(K, lib.to_numpy(fro.to_tensor()), S_seen)
    assert true <= e_fro * (1 + 10 * lib.rtol) + 10 * lib.rtol
    assert np.abs(lib.to_numpy(res.weights)).max() <= 10 * np.linalg.norm(K)


def test_float32_rank_deficient_sigma_negative_rounding():
    # X^T X in float32 has eigenvalues of about -1e-7 * largest; left in, the
    # objective is unbounded below and ALS runs off along them
    rng = np.random.default_rng(3)
    K = rng.standard_normal((8, 8, 1, 1)).astype(np.float32)
    X = rng.standard_normal((5, 8)).astype(np.float32)
    S = X.T @ X / np.float32(5)
    S = 0.5 * (S + S.T)
    assert np.linalg.eigvalsh(S.astype(np.float64))[0] < 0  # really indefinite
    res = cp(K, 7, S)
    true = relative_sigma_error(K.astype(np.float64), res.to_tensor().astype(np.float64), S)
    assert_reported_is_true(res.error, true, float32=True)
    assert np.abs(res.weights).max() <= 10 * np.linalg.norm(K)


@pytest.mark.parametrize("kind", ["full", "deficient", "1x1-deficient"])
def test_b_update_equals_dense_minimiser_through_public_api(kind):
    """One sweep with exact inner solves equals A, B, C, D dense minimisers in turn."""
    rng = np.random.default_rng(11)
    shape = (5, 6, 1, 1) if kind == "1x1-deficient" else SHAPE
    K = rng.standard_normal(shape)
    n = int(np.prod(shape[1:]))
    S = random_psd(rng, n, rank=None if kind == "full" else n // 2 + 1, spread=30.0)
    R = 3
    w, F = random_cp(rng, shape, R)
    res = cp(K, R, S, init=(w, F), n_iter_max=1, tol=0.0,
             inner=InnerSolver(rtol=1e-13, maxiter=2000))
    # brute force: each block in turn by dense least squares
    wk, Fk = np.ones(R), [f.copy() for f in F]
    Fk[0] = Fk[0] * w
    for mode in range(4):
        X, _ = brute_force_block(K, wk, Fk, S, mode, 0.0)
        Fk[mode] = X
    f_ref = dense_objective(K, wk, Fk, S)
    f_ours = dense_objective(K, res.weights, res.factors, S)
    assert f_ours == pytest.approx(f_ref, rel=1e-8, abs=1e-12 * dense_objective(K, w, F, S))


def test_adaptive_converged_run_ends_with_exact_b_updates():
    # inner_maxiter='adaptive': the CG cap starts small and doubles on stalls; a
    # converged run's last sweep solved B to inner_rtol, so one more exact sweep
    # gains about tol
    rng = np.random.default_rng(12347)
    K = rng.standard_normal((6, 7, 3, 3))
    S = random_psd(rng, 63, spread=100.0)
    res = cp(K, 5, S, n_iter_max=300, tol=1e-5, inner={"maxiter": "adaptive"})
    assert res.converged
    more = cp(K, 5, S, init=res, n_iter_max=1, tol=0.0)
    assert more.error >= res.error * (1 - 1e-4)


def test_fixed_inner_maxiter_is_respected(rng):
    K = rng.standard_normal((6, 7, 3, 3))
    S = random_psd(rng, 63, spread=100.0)
    w, F = random_cp(rng, K.shape, 4)
    eng = als_engine(K, w, F, S, inner_maxiter=2)
    for _ in range(3):
        eng.sweep()
    assert max(eng.cg_iters) <= 2
    exact = als_engine(K, w, F, S, inner_rtol=1e-10, inner_maxiter=5000)
    exact.sweep()
    assert exact.cg_residuals[-1] <= 1e-10


@pytest.mark.parametrize("weighted", [False, True])
def test_default_rng_is_reproducible(lib, weighted):
    # H = W = 3 < rank: the 'svd' start fills columns with random numbers
    rng = np.random.default_rng(4)
    K = lib.asarray(rng.standard_normal((6, 5, 3, 3)))
    S = lib.asarray(random_psd(rng, 45)) if weighted else None
    a = cp(K, 5, S, n_iter_max=3)
    b = cp(K, 5, S, n_iter_max=3)
    np.testing.assert_array_equal(lib.to_numpy(a.weights), lib.to_numpy(b.weights))
    for fa, fb in zip(a.factors, b.factors):
        np.testing.assert_array_equal(lib.to_numpy(fa), lib.to_numpy(fb))
    assert a.errors == b.errors


def test_objective_does_not_cancel_near_exact_fit(rng):
    # a rank-R kernel: the shortcut norm2 - 2c + q is all rounding near the end
    w, F = random_cp(rng, (6, 5, 3, 3), 2)
    K = cp_tensor(w, F)
    S = random_psd(rng, 45)
    res = cp(K, 2, S, init="svd", n_iter_max=60, tol=0.0, linesearch=True)
    true = relative_sigma_error(K, res.to_tensor(), S)
    assert res.error < 1e-5
    assert_reported_is_true(res.error, true, K, S)
