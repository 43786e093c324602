"""Edge cases of the core solvers: reported errors, stopping, argument checks.

Each test pins a behaviour that once went wrong: an error figure that
differed from its recomputation, a run that went on after a rejected sweep,
a message that did not name the argument.
"""

import numpy as np
import pytest

import sigmadecomp as sd
from sigmadecomp import relative_sigma_error, sigma_norm


def _true_rel(K, A, S=None):
    """Relative Sigma-error in the PSD part of S (eigenvalues < 0 set to 0), by eigh."""
    K1, A1 = K.reshape(len(K), -1), A.reshape(len(K), -1)
    if S is None:
        return np.linalg.norm(K1 - A1) / np.linalg.norm(K1)
    w, V = np.linalg.eigh(np.asarray(S, dtype=np.float64))
    L = V * np.sqrt(np.clip(w, 0, None))
    return np.linalg.norm((K1 - A1) @ L) / np.linalg.norm(K1 @ L)


def _low_tucker(rng):
    G = rng.standard_normal((2, 2, 3, 3))
    UT = np.linalg.qr(rng.standard_normal((6, 2)))[0]
    US = np.linalg.qr(rng.standard_normal((5, 2)))[0]
    return G, UT, US, np.einsum("ta,abhw,sb->tshw", UT, G, US)


@pytest.mark.parametrize("distance", [1e-7, 1e-10])
def test_tucker2_frobenius_error_of_a_user_start_near_the_kernel(distance):
    rng = np.random.default_rng(3)
    G, UT, US, K0 = _low_tucker(rng)
    E = rng.standard_normal(K0.shape)
    K = K0 + distance * np.linalg.norm(K0) * E / np.linalg.norm(E)
    res = sd.tucker2(K, (2, 2), init=(G, UT, US), n_iter_max=2, tol=0)
    assert res.errors[0] == pytest.approx(_true_rel(K, K0), rel=1e-6)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(res.errors, res.errors[1:]))  # to rounding
    start = sd.tucker2(K, (2, 2), init=(G, UT, US), n_iter_max=0)
    assert start.error == pytest.approx(_true_rel(K, K0), rel=1e-6)


def _indefinite_float32(rng, n=16):
    """Rank 7 of 16 plus one eigenvalue -5e-5 * lambda_max: accepted for float32."""
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.logspace(0, -3, n)
    lam[7:] = 0.0
    lam[-1] = -5e-5
    S = ((Q * lam) @ Q.T).astype(np.float32)
    return (S + S.T) / 2


@pytest.mark.parametrize("solver", ["tt_conv", "tucker2", "cp", "sigma_svd"])
def test_accepted_indefinite_sigma_sigma_error_is_recomputable(solver):
    rng = np.random.default_rng(1)
    K = rng.standard_normal((5, 4, 2, 2))
    S = _indefinite_float32(rng)
    res = {"tt_conv": lambda: sd.tt_conv(K, 2, S, ridge=0),
           "tucker2": lambda: sd.tucker2(K, (3, 2), S, ridge=0),
           "cp": lambda: sd.cp(K, 3, S, ridge=0, n_iter_max=20),
           "sigma_svd": lambda: sd.sigma_svd(K.reshape(5, -1), 3, S, ridge=0)}[solver]()
    A = np.asarray(res.to_tensor()).reshape(K.shape)
    rel = relative_sigma_error(K, A, S)
    # sigma_error is the user's Sigma-error as relative_sigma_error recomputes it
    assert res.sigma_error == pytest.approx(rel, rel=1e-8)
    # error is in the matrix fitted (the PSD part, to float32's eigenvalue floors), never
    # a clamped 0 for an inexact fit
    assert res.error == pytest.approx(_true_rel(K, A, S), rel=1e-4)
    assert res.error > 0 and rel > 0


def test_negative_quadratic_is_measured_in_the_psd_part():
    rng = np.random.default_rng(1)
    S = _indefinite_float32(rng)
    w, V = np.linalg.eigh(S.astype(np.float64))
    K = rng.standard_normal((2, 16))
    pos = int(np.argmax(w > 1e-4))  # the smallest clearly positive eigenvalue (1e-3)
    # the change lies mostly along the negative direction, a little along a positive one
    A = K - (1e-3 * V[:, 0] + 1e-5 * V[:, pos])[None, :].repeat(2, axis=0)
    assert np.sum(((K - A) @ S.astype(np.float64)) * (K - A)) < 0
    got = relative_sigma_error(K, A, S)
    assert got > 0  # (the denominator stays in S itself: equal to float32's tolerance)
    assert got == pytest.approx(_true_rel(K, A, S), rel=1e-4)


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_cp_callback_results_carry_ridge_and_sigma_error(ridge):
    rng = np.random.default_rng(1)
    K = rng.standard_normal((5, 4, 2, 2))
    X = rng.standard_normal((60, 16))
    S = X.T @ X / 60
    seen = []
    sd.cp(K, 3, S, ridge=ridge, n_iter_max=1, callback=lambda r: seen.append(r))
    assert [r.ridge for r in seen] == [ridge, ridge]
    for r in seen:
        assert r.sigma_error == (r.errors[-1] if ridge == 0 else None)


def test_extreme_scales_are_exact_or_refused():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((5, 16))
    X = rng.standard_normal((48, 16))
    S = X.T @ X / 48
    for scale in (1e-200, 1e160):
        assert relative_sigma_error(W * scale, 0.5 * W * scale, S) == pytest.approx(0.5)
    assert relative_sigma_error(W, 0.5 * W, S * 1e160) == pytest.approx(0.5)
    assert float(sigma_norm(W * 1e-200, S)) == pytest.approx(1e-200 * float(sigma_norm(W, S)))
    import torch

    Wt, St = torch.as_tensor(W, dtype=torch.float32), torch.as_tensor(S, dtype=torch.float32)
    assert relative_sigma_error(Wt * 1e-30, 0.5 * Wt * 1e-30, St) == pytest.approx(0.5, rel=1e-6)
    for empty in (np.zeros((0, 16)), torch.zeros(0, 16)):  # no rows: norm 0
        assert float(sigma_norm(empty, S if isinstance(empty, np.ndarray) else St)) == 0.0
    for bad in ((W * 1e-200, S), (W * 1e160, S), (W, S * 1e300)):
        with pytest.raises(ValueError, match=r"weight is too (small|large) in scale.*rescale"):
            sd.sigma_svd(bad[0], 3, bad[1])
    K = W.reshape(5, 4, 2, 2)
    for f, r in ((sd.tucker2, (3, 2)), (sd.cp, 3), (sd.tt_conv, 2)):
        with pytest.raises(ValueError, match="kernel is too large in scale"):
            f(K, r, S * 1e160)


def test_rejected_sweep_ends_the_run_as_converged():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 16))
    tt = sd.tt_linear(W, (4, 8), None, in_modes=(2, 2, 4), out_modes=(2, 2, 2),
                      n_iter_max=15, tol=0, extrapolate=False)
    assert tt.converged and tt.n_iter < 15
    assert tt.errors[-1] == tt.errors[-2]  # the rejected sweep kept the previous point
    A, Bf, C, D = (rng.standard_normal((d, 2)) for d in (5, 4, 3, 3))
    K = np.einsum("tr,sr,hr,wr->tshw", A, Bf, C, D)  # exact rank 2: rounding decides
    cp = sd.cp(K, 2, None, n_iter_max=120, tol=0, init="random", rng=1)
    assert cp.converged and cp.n_iter < 120
    assert cp.errors[-1] == cp.errors[-2]
    assert sum(a == b for a, b in zip(cp.errors, cp.errors[1:])) == 1


def test_callback_stop_reports_whether_tol_held():
    rng = np.random.default_rng(1)
    K = rng.standard_normal((5, 4, 2, 2))
    X = rng.standard_normal((60, 16))
    S = X.T @ X / 60
    for f, r in ((sd.tucker2, (3, 2)), (sd.cp, 3), (sd.tt_conv, 2)):
        held = f(K, r, S, tol=0.5, callback=lambda res: res.n_iter >= 1)
        assert held.n_iter == 1 and held.converged  # 1 sweep, tol 0.5 met: converged
        not_held = f(K, r, S, tol=0.0, callback=lambda res: res.n_iter >= 1)
        assert not_held.n_iter == 1 and not not_held.converged


def test_closed_forms_have_no_sweeps():
    K = np.random.default_rng(1).standard_normal((5, 4, 2, 2))
    for res in (sd.tt_svd(K, 2), sd.sigma_svd(K.reshape(5, -1), 3)):
        assert res.n_iter is None and res.converged is None


def test_two_argument_callback_refused_where_no_old_form_exists():
    K = np.random.default_rng(1).standard_normal((5, 4, 2, 2))
    with pytest.raises(TypeError, match=r"takes 2 required arguments; cp calls callback\(result\)"):
        sd.cp(K, 3, callback=lambda res, err: None)
    with pytest.raises(TypeError, match=r"sigma_svd calls callback\(result\) with one"):
        sd.sigma_svd(K.reshape(5, -1), 3, callback=lambda res, err: None)


def test_bad_arguments_are_named():
    import torch

    from sigmadecomp.ranks import allocate

    rng = np.random.default_rng(0)
    K = rng.standard_normal((5, 4, 2, 2))
    W = rng.standard_normal((5, 16))
    cases = [
        (lambda: sd.tucker2(K, (2, 2), rng=-1), ValueError, "rng=-1 is not allowed"),
        (lambda: sd.tucker2(K, np.array(2)), ValueError, r"ranks=array\(2\) is not allowed"),
        (lambda: sd.tucker2(K, torch.tensor(2)), ValueError, "ranks=tensor"),
        (lambda: sd.tt_svd(rng.standard_normal((3, 4, 5)), ranks="a"), TypeError,
         "ranks='a' is not allowed"),
        (lambda: sd.sigma_svd(W[:0], 1), ValueError, r"weight has shape \(0, 16\)"),
        (lambda: sd.tt_conv(K[:, :, :0], 1), ValueError, r"kernel has shape \(5, 4, 0, 2\)"),
        (lambda: sd.tucker2(K[:, :, :0], (1, 1)), ValueError, "every dimension of kernel"),
        (lambda: sd.tt_svd(np.zeros((3, 0, 2))), ValueError, "every dimension of tensor"),
        (lambda: sd.fold(np.ones((2, 12)), 0, (2, -3, -4)), ValueError, r"shape=\(2, -3, -4\)"),
        (lambda: sd.khatri_rao([np.ones((2, 3)), torch.ones(4, 3)]), TypeError,
         "matrices mixes numpy, torch on cpu"),
        (lambda: allocate({}, 0.5, method="svd"), ValueError, "layers is empty"),
        (lambda: sd.tt_linear(W, -5, in_modes=(16,), out_modes=(5,)), ValueError,
         "ranks=-5 is not allowed"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()
    # a 1-D array or tensor of two ranks is still a pair
    assert sd.tucker2(K, np.array([2, 2]), n_iter_max=1).core.shape[:2] == (2, 2)


def test_evbmf_ranks_with_a_singular_sigma_sees_only_the_data_directions():
    from sigmadecomp.evbmf import evbmf, evbmf_ranks

    rng = np.random.default_rng(0)
    T, n, true_rank, k = 20, 120, 3, 10
    Q = np.linalg.qr(rng.standard_normal((n, k)))[0]
    S = Q @ Q.T  # rank 10 of 120
    K = (0.3 * rng.standard_normal((T, true_rank)) @ rng.standard_normal((true_rank, n))
         + 0.1 * rng.standard_normal((T, n)))
    # the whitened weight is the T x 10 matrix K Q in disguise: the same answer
    assert evbmf_ranks(K, "svd", S) == evbmf(K @ Q).rank == true_rank
    assert evbmf_ranks(K, "svd") == evbmf(K).rank  # without sigma: unchanged


def test_oas_alpha_checks_sigma():
    from sigmadecomp.shrinkage import oas_alpha

    with pytest.raises(ValueError, match="sigma contains NaN"):
        oas_alpha(np.full((3, 3), np.nan), 10)
    for bad in (np.ones((2, 3)), np.zeros((0, 0))):
        with pytest.raises(ValueError, match="non-empty square"):
            oas_alpha(bad, 10)
