import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from sigmadecomp import InnerSolver, Tucker2Result, relative_sigma_error, tucker2
# Single block updates are not reachable through tucker2() (it runs whole sweeps), so
# the block-level tests use the documented internal entry point als_blocks.
from sigmadecomp.tucker2 import als_blocks
from _helpers import patches, random_psd  # noqa: E402


def patch_covariance(rng, channels=4, k=3, n_images=20):
    """Second moment of k x k patches of real images through a random conv + ReLU."""
    pytest.importorskip("sklearn")
    from sigmadecomp.datasets import load_digits_28

    images, _ = load_digits_28()
    images = np.asarray(images[:n_images], dtype=np.float64)[:, ::2, ::2]  # 14x14
    N, Hh, Ww = images.shape
    w = rng.standard_normal((channels, 3, 3)) / 3.0
    feat = np.maximum(patches(images[:, None], 3) @ w.reshape(channels, 9).T + 0.05, 0.0)
    feat = feat.reshape(N, Hh, Ww, channels).transpose(0, 3, 1, 2)
    U = patches(feat, k)
    return U.T @ U / U.shape[0]


def sigma_objective(K, Kt, S):
    D = (K - Kt).reshape(K.shape[0], -1)
    return float(np.sum((D @ S) * D))


# ---------------------------------------------------------------------------
# HOOI (Frobenius)
# ---------------------------------------------------------------------------

def test_hooi_matches_tensorly_partial_tucker(rng):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker

    K = rng.standard_normal((8, 7, 3, 3))
    ranks = (4, 3)
    tol = 1e-10
    (core, factors), rec = partial_tucker(tl.tensor(K), list(ranks), modes=[0, 1], tol=tol,
                                          n_iter_max=500, init="svd")
    ref = tl.to_numpy(tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]))
    ref_err = np.linalg.norm(K - ref) / np.linalg.norm(K)
    res = tucker2(K, ranks, tol=tol, n_iter_max=500)
    assert res.converged and not res.weighted
    assert res.error == pytest.approx(ref_err, rel=1e-6)
    assert res.error == pytest.approx(float(rec[-1]), rel=1e-6)
    np.testing.assert_allclose(res.to_tensor(), ref, atol=1e-6 * np.abs(K).max())
    # the error history is the true Frobenius error of the final point
    assert res.error == pytest.approx(np.linalg.norm(K - res.to_tensor()) / np.linalg.norm(K), rel=1e-9)


def test_hooi_monotone_and_shapes(lib, rng):
    K = rng.standard_normal((9, 6, 2, 3))
    res = tucker2(lib.asarray(K), (4, 3), n_iter_max=30, tol=0)
    assert res.n_iter == 30 and len(res.errors) == 31
    assert np.all(np.diff(res.errors) <= 1e-12)
    assert res.core.shape == (4, 3, 2, 3)
    assert res.out_factor.shape == (9, 4) and res.in_factor.shape == (6, 3)
    for a in (res.core, res.out_factor, res.in_factor, res.to_tensor()):
        assert lib.is_same_kind(a)
    U = lib.to_numpy(res.out_factor)
    np.testing.assert_allclose(U.T @ U, np.eye(4), atol=100 * lib.rtol)
    ref = tucker2(K, (4, 3), n_iter_max=30, tol=0)
    assert res.error == pytest.approx(ref.error, rel=100 * lib.rtol)


# ---------------------------------------------------------------------------
# Tucker2-ALS-Sigma: block updates against brute-force dense least squares
# ---------------------------------------------------------------------------

def _tiny_problem(rng, T=4, S=3, H=2, W=2, sigma_rank=None):
    K = rng.standard_normal((T, S, H, W))
    n = S * H * W
    Sig = random_psd(rng, n, sigma_rank)
    return K, Sig


def test_block_out_core_is_the_dense_least_squares_minimiser(rng):
    T, S, H, W = 4, 3, 2, 2
    P, n = H * W, S * H * W
    K, Sig = _tiny_problem(rng)
    r_T, r_S = 2, 2
    U_S = np.linalg.qr(rng.standard_normal((S, r_S)))[0]
    K1 = K.reshape(T, n)
    U_T, G, err, sq = als_blocks(K, Sig).out_core(U_S, r_T)
    Bm = np.kron(U_S, np.eye(P)).T  # (r_S P, n)
    Kt = U_T @ G.reshape(r_T, -1) @ Bm
    assert sq == pytest.approx(sigma_objective(K, Kt.reshape(K.shape), Sig), rel=1e-9)
    assert err == pytest.approx(relative_sigma_error(K, Kt.reshape(K.shape), Sig), rel=1e-9)

    L = np.linalg.cholesky(Sig)
    # (1) given U_T, the core is the weighted least-squares solution in Kronecker form:
    #     vec_row(U_T G1 Bm) = kron(U_T, Bm^T) vec_row(G1), weights I_T kron Sigma
    A = np.kron(U_T, Bm.T)
    Wt = np.kron(np.eye(T), L.T)
    g_ls = np.linalg.lstsq(Wt @ A, Wt @ K1.reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(G.reshape(-1), g_ls, atol=1e-9)

    # (2) over all X = U_T G1 of rank <= r_T: unconstrained LS then a rank-r_T
    #     truncation in the metric C = Bm Sigma Bm^T (matrix square root by sqrtm)
    X_ls = np.linalg.lstsq((Bm @ L).T, (K1 @ L).T, rcond=None)[0].T  # (T, r_S P)
    C_half = np.real(scipy.linalg.sqrtm(Bm @ Sig @ Bm.T))
    u, s, vh = np.linalg.svd(X_ls @ C_half)
    X_best = (u[:, :r_T] * s[:r_T]) @ vh[:r_T] @ np.linalg.inv(C_half)
    best = sigma_objective(K, (X_best @ Bm).reshape(K.shape), Sig)
    assert sq == pytest.approx(best, rel=1e-8)
    # and no random rank-r_T candidate in the same span does better
    for _ in range(20):
        X = rng.standard_normal((T, r_T)) @ rng.standard_normal((r_T, r_S * P))
        assert sigma_objective(K, (X @ Bm).reshape(K.shape), Sig) >= sq - 1e-10


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("sigma_rank", [None, 5])
def test_block_in_is_the_dense_least_squares_minimiser(rng, solver, sigma_rank):
    T, S, H, W = 4, 3, 2, 2
    P, n = H * W, S * H * W
    K, Sig = _tiny_problem(rng, sigma_rank=sigma_rank)
    r_T, r_S = 2, 2
    U_T = np.linalg.qr(rng.standard_normal((T, r_T)))[0]
    U_S = np.linalg.qr(rng.standard_normal((S, r_S)))[0]
    G = rng.standard_normal((r_T, r_S, P))
    K1 = K.reshape(T, n)
    X = als_blocks(K, Sig, rtol=1e-12).in_factor(U_T, G, U_S, method=solver, rtol=1e-13,
                                                 maxiter=500)

    # Kronecker-form design matrix: K~1[t, (s, p)] = sum_b U_S[s, b] Wf[t, b, p]
    Wf = np.einsum("ta,abp->tbp", U_T, G)
    A = np.einsum("su,tbp->tspub", np.eye(S), Wf).reshape(T * n, S * r_S)
    lam, V = np.linalg.eigh(Sig)
    Lr = V * np.sqrt(np.clip(lam, 0, None))  # Sigma = Lr Lr^T, also when singular
    Wt = np.kron(np.eye(T), Lr.T)
    x_ls = np.linalg.lstsq(Wt @ A, Wt @ K1.reshape(-1), rcond=None)[0]
    f = lambda x: sigma_objective(K, (A @ x).reshape(K.shape), Sig)
    assert f(X.reshape(-1)) == pytest.approx(f(x_ls), rel=1e-8, abs=1e-12)
    if sigma_rank is None:  # unique minimiser
        np.testing.assert_allclose(X.reshape(-1), x_ls, atol=1e-7)


def test_kron_preconditioner_is_exact_for_kronecker_sigma(rng):
    S, P, r_T, r_S = 5, 4, 3, 2
    Sig = np.kron(random_psd(rng, S), random_psd(rng, P))
    G = rng.standard_normal((r_T, r_S, P))
    blocks = als_blocks(np.zeros((r_T, S, 2, 2)), Sig)
    pc = blocks.preconditioner().update(G)
    H = blocks.normal_operator(G)
    X = rng.standard_normal((S, r_S))
    np.testing.assert_allclose(pc(H(X)), X, rtol=1e-7, atol=1e-7)


# ---------------------------------------------------------------------------
# Tucker2-ALS-Sigma: whole runs
# ---------------------------------------------------------------------------

def test_sigma_als_monotone_consistent_and_follows_input_kind(lib, rng):
    K = rng.standard_normal((6, 5, 3, 3))
    Sig = random_psd(rng, 45)
    res = tucker2(lib.asarray(K), (3, 3), lib.asarray(Sig), n_iter_max=15, tol=0,
                  inner=InnerSolver(method="cg", maxiter=3), ridge=0)
    assert res.weighted and res.n_iter == 15 and len(res.errors) == 16
    assert np.all(np.diff(res.errors) <= 1e-10)
    for a in (res.core, res.out_factor, res.in_factor, res.to_tensor()):
        assert lib.is_same_kind(a)
    Kt = lib.to_numpy(res.to_tensor())
    assert res.error == pytest.approx(relative_sigma_error(K, Kt, Sig), rel=100 * lib.rtol)
    hooi = tucker2(K, (3, 3))
    assert res.error <= relative_sigma_error(K, hooi.to_tensor(), Sig) + 1e-6
    ref = tucker2(K, (3, 3), Sig, n_iter_max=15, tol=0, inner=InnerSolver(method="cg", maxiter=3),
                  ridge=0)
    assert res.error == pytest.approx(ref.error, rel=1e3 * lib.rtol)


@given(T=st.integers(2, 6), S=st.integers(2, 5), H=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_sigma_als_never_worse_than_hooi_on_random_kernels(T, S, H, seed, data):
    rng = np.random.default_rng(seed)
    r_T = data.draw(st.integers(1, T))
    r_S = data.draw(st.integers(1, S))
    K = rng.standard_normal((T, S, H, H))
    Sig = random_psd(rng, S * H * H, data.draw(st.sampled_from([None, 1, S * H * H // 2 + 1])))
    hooi = tucker2(K, (r_T, r_S), n_iter_max=50)
    res = tucker2(K, (r_T, r_S), Sig, n_iter_max=20, init_iter_max=50, ridge=0)
    base = relative_sigma_error(K, hooi.to_tensor(), Sig)
    # squared relative errors are exact up to rounding (~1e-16 of the total)
    assert res.error**2 <= base**2 + 1e-14
    assert np.all(np.diff(np.asarray(res.errors) ** 2) <= 1e-14)
    assert res.error == pytest.approx(relative_sigma_error(K, res.to_tensor(), Sig), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("inner_solver", ["auto", "cg", "direct"])
def test_sigma_als_beats_hooi_on_real_patch_covariance(rng, inner_solver):
    Sig = patch_covariance(rng, channels=4)
    K = rng.standard_normal((6, 4, 3, 3))
    hooi = tucker2(K, (3, 2))
    base = relative_sigma_error(K, hooi.to_tensor(), Sig)
    res = tucker2(K, (3, 2), Sig, n_iter_max=50, inner={"method": inner_solver})
    assert np.all(np.diff(res.errors) <= 1e-10)
    assert res.errors[0] <= base + 1e-12
    assert res.error < 0.9 * base  # a real, not a cosmetic, improvement


def test_identity_sigma_equals_hooi(lib, rng):
    K = rng.standard_normal((7, 6, 3, 3))
    hooi = tucker2(K, (3, 4), tol=1e-12, n_iter_max=500)
    res = tucker2(lib.asarray(K), (3, 4), lib.asarray(np.eye(54)), tol=1e-12, n_iter_max=20,
                  init_iter_max=500, init_tol=1e-12)
    assert res.errors[0] == pytest.approx(hooi.error, rel=max(1e-6, 100 * lib.rtol))
    assert res.error == pytest.approx(hooi.error, rel=max(1e-6, 100 * lib.rtol))


@pytest.mark.parametrize("sigma_rank", [None, 10, 0])
def test_full_ranks_recover_the_kernel(rng, sigma_rank):
    K = rng.standard_normal((5, 4, 2, 2))
    hooi = tucker2(K, (5, 4))
    np.testing.assert_allclose(hooi.to_tensor(), K, atol=1e-10)
    assert hooi.error < 1e-7
    Sig = random_psd(rng, 16, sigma_rank)
    res = tucker2(K, (5, 4), Sig, n_iter_max=3)
    assert res.error < 1e-6 or sigma_rank == 0
    if sigma_rank is None:
        np.testing.assert_allclose(res.to_tensor(), K, atol=1e-8)
    if sigma_rank == 0:  # sigma = 0 sees nothing: error 0 by convention
        assert res.error == 0.0


def test_rank_deficient_sigma_with_cg(rng):
    K = rng.standard_normal((8, 12, 3, 3))
    Sig = random_psd(rng, 108, 40)
    hooi = tucker2(K, (4, 6))
    res = tucker2(K, (4, 6), Sig, inner={"method": "cg"}, n_iter_max=30, ridge=0)
    assert np.all(np.isfinite(res.errors))
    assert np.all(np.diff(res.errors) <= 1e-10)
    assert res.error <= relative_sigma_error(K, hooi.to_tensor(), Sig)
    assert res.error == pytest.approx(relative_sigma_error(K, res.to_tensor(), Sig), rel=1e-6)


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("init", ["frobenius", "svd", "random", "result", "tuple"])
def test_every_init(rng, init, weighted):
    K = rng.standard_normal((6, 5, 2, 2))
    Sig = random_psd(rng, 20) if weighted else None
    if init == "result":
        init = tucker2(K, (3, 2), init="random", rng=1, n_iter_max=1)
        start = relative_sigma_error(K, init.to_tensor(), Sig)
    elif init == "tuple":
        g = rng.standard_normal((3, 2, 2, 2))
        a, b = rng.standard_normal((6, 3)), rng.standard_normal((5, 2))  # not orthonormal
        Kt = np.einsum("ta,abhw,sb->tshw", a, g, b)
        start = relative_sigma_error(K, Kt, Sig)
        init = (g, a, b)
    else:
        start = None
    res = tucker2(K, (3, 2), Sig, init=init, rng=0, n_iter_max=10, tol=0, ridge=0)
    if start is not None:  # a user-given start is used as given
        assert res.errors[0] == pytest.approx(start, rel=1e-9)
    assert np.all(np.diff(res.errors) <= 1e-10)
    U = res.in_factor
    np.testing.assert_allclose(U.T @ U, np.eye(2), atol=1e-10)
    again = tucker2(K, (3, 2), Sig, init=init, rng=0, n_iter_max=10, tol=0, ridge=0)
    assert again.errors == res.errors


def test_callback_sees_every_sweep_and_can_stop(rng):
    K = rng.standard_normal((6, 5, 2, 2))
    Sig = random_psd(rng, 20)
    seen = []

    def cb(result):
        assert isinstance(result, Tucker2Result)
        seen.append(result.errors[-1])
        return len(seen) == 3

    res = tucker2(K, (3, 2), Sig, tol=0, n_iter_max=50, callback=cb)
    assert res.n_iter == 2 and not res.converged
    assert seen == res.errors
    seen.clear()
    res = tucker2(K, (3, 2), tol=0, n_iter_max=50, callback=cb)
    assert res.n_iter == 2 and seen == res.errors


def test_converged_flag_and_tol(rng):
    K = rng.standard_normal((6, 5, 2, 2))
    res = tucker2(K, (3, 2), tol=1e-3, n_iter_max=100)
    assert res.converged and res.n_iter < 100
    assert abs(res.errors[-2] - res.errors[-1]) < 1e-3
    res = tucker2(K, (3, 2), tol=0, n_iter_max=4)
    assert not res.converged and res.n_iter == 4
    res = tucker2(K, (3, 2), n_iter_max=0)
    assert res.n_iter == 0 and len(res.errors) == 1


def test_inputs_are_not_mutated(rng):
    K = rng.standard_normal((6, 5, 2, 2))
    Sig = random_psd(rng, 20)
    init = (rng.standard_normal((3, 2, 2, 2)), rng.standard_normal((6, 3)), rng.standard_normal((5, 2)))
    copies = [K.copy(), Sig.copy()] + [a.copy() for a in init]
    tucker2(K, (3, 2), Sig, init=init, n_iter_max=3)
    for a, b in zip([K, Sig] + list(init), copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(ranks=(0, 2)), ValueError, r"ranks\[0\].*at least 1"),
        (dict(ranks=(3, 6)), ValueError, r"ranks\[1\].*at most 5"),
        (dict(ranks=(3,)), ValueError, "ranks=.*pair"),
        (dict(ranks=3), ValueError, "ranks=.*pair"),
        (dict(ranks=(2.5, 2)), TypeError, "must be an integer"),
        (dict(sigma=np.eye(19)), ValueError, r"sigma has shape \(19, 19\).*\(20, 20\)"),
        (dict(init="hooi"), ValueError, "init='hooi' is not allowed"),
        (dict(init=5), TypeError, "init of type int"),
        (dict(init=(np.zeros((3, 2, 2, 2)), np.zeros((6, 2)), np.zeros((5, 2)))), ValueError,
         r"out_factor has shape \(6, 2\).*\(6, 3\)"),
        (dict(inner={"method": "minres"}), ValueError, "inner.method='minres' is not allowed"),
        (dict(tol=-1.0), ValueError, "tol=-1.0"),
        (dict(n_iter_max=-1), ValueError, "n_iter_max=-1"),
        (dict(callback=3), TypeError, "callback=3"),
    ],
)
def test_bad_input_messages(rng, kwargs, exc, match):
    K = rng.standard_normal((6, 5, 2, 2))
    args = dict(ranks=(3, 2), sigma=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        tucker2(K, **args)


def test_bad_kernel_messages(rng):
    with pytest.raises(ValueError, match="kernel has ndim=2"):
        tucker2(rng.standard_normal((6, 5)), (2, 2))
    K = rng.standard_normal((6, 5, 2, 2))
    K[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="kernel contains NaN"):
        tucker2(K, (2, 2))
    S = np.eye(20)
    S[0, 1] = np.inf
    with pytest.raises(ValueError, match="sigma"):
        tucker2(rng.standard_normal((6, 5, 2, 2)), (2, 2), S)


@pytest.mark.parametrize("weighted", [False, True])
def test_1x1_kernel_with_r_T_above_r_S_reaches_the_sigma_svd(rng, weighted):
    from sigmadecomp import sigma_svd

    K = rng.standard_normal((7, 6, 1, 1))
    Sig = random_psd(rng, 6) if weighted else None
    best = sigma_svd(K.reshape(7, 6), 2, Sig).error  # rank <= r_S = 2 whatever r_T is
    res = tucker2(K, (5, 2), Sig, n_iter_max=200, tol=1e-12)
    assert res.out_factor.shape == (7, 5)
    assert res.error >= best - 1e-9
    assert res.error == pytest.approx(best, rel=1e-5)


def test_user_init_error_does_not_cancel(rng):
    # a user-given start close to the kernel: total - 2 cross + quad loses most
    # digits to cancellation; the error is recomputed from K - K~ instead
    K = rng.standard_normal((5, 4, 3, 3))
    Sig = random_psd(rng, 36)
    exact = tucker2(K, (5, 4))
    core = exact.core + 1e-6 * rng.standard_normal(exact.core.shape)
    init = (core, exact.out_factor, exact.in_factor)
    res = tucker2(K, (5, 4), Sig, init=init, n_iter_max=0, ridge=0)
    approx = np.einsum("ta,abhw,sb->tshw", exact.out_factor, core, exact.in_factor)
    direct = relative_sigma_error(K, approx, Sig)
    assert 1e-8 < direct < 1e-5
    assert res.errors[0] == pytest.approx(direct, rel=1e-6)
