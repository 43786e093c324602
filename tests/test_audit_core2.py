"""Audit of the core solvers: one default ``rtol`` rule, argument checks of the TT
counts, and every reported error against an independent recomputation."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sigmadecomp as sd
from sigmadecomp.costs import (tt_mac_count, tt_param_count, tt_ranks_for_ratio,
                               tt_ranks_from_budget)
from sigmadecomp.prepared import prepare_sigma
from sigmadecomp.sigma import default_rtol, ridge_sigma

torch = pytest.importorskip("torch")

SOLVERS = ("sigma_svd", "tucker2", "cp", "tt_conv", "tt_linear")


def _as(lib, x, dtype):
    if lib == "torch":
        return torch.as_tensor(np.asarray(x, dtype=np.float64)).to(getattr(torch, dtype))
    return np.asarray(x, dtype=np.float64).astype(dtype)


def _np64(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _call(name, K, r, S, **kw):
    """Run solver ``name`` on a (T, S, H, W) kernel ``K`` (flattened for the matrix ones)."""
    T = K.shape[0]
    W = K.reshape(T, -1)
    if name == "sigma_svd":
        return sd.sigma_svd(W, min(r, *W.shape), S, **kw), W
    if name == "tucker2":
        return sd.tucker2(K, (min(r, T), min(r, K.shape[1])), S, n_iter_max=4, **kw), K
    if name == "cp":
        return sd.cp(K, r, S, n_iter_max=4, **kw), K
    if name == "tt_conv":
        return sd.tt_conv(K, r, S, n_iter_max=3, **kw), K
    return sd.tt_linear(W, r, S, n_iter_max=3, **kw), W


def _rel_error(K, A, S, psd_part=False):
    """Relative Sigma-error ``||(K - A) S^{1/2}|| / ||K S^{1/2}||`` from an eigen-decomposition
    of ``S`` in float64. An indefinite ``S`` (float32 rounding) is read as
    ``sum_i lam_i ||D v_i||^2``, measured in its PSD part when that is negative (or always,
    with ``psd_part``)."""
    K1 = _np64(K).reshape(K.shape[0], -1)
    D = K1 - _np64(A).reshape(K1.shape)
    lam, V = np.linalg.eigh(0.5 * (S + S.T))
    if psd_part:
        lam = np.clip(lam, 0.0, None)

    def quad(M, w):
        return float(np.sum(w * np.sum((M @ V) ** 2, axis=0)))

    num = quad(D, lam)
    if num < 0:
        num = quad(D, np.clip(lam, 0.0, None))
    den = quad(K1, lam)
    if den <= 0.0:  # the library's convention for a zero reference norm
        return (0.0 if num <= 0.0 else float("inf")), lam, K1, D
    return float(np.sqrt(num / den)), lam, K1, D


# ---------------------------------------------------------------------------
# 1. one default rtol for every solver: the floor of sigma's dtype
# ---------------------------------------------------------------------------

def _floor_sensitive_problem():
    """A rank-3 sigma plus eigenvalues 1e-8 of the largest: noise for a float32 sigma
    (below its floor 1e-6), signal for a float64 one (above 1e-10)."""
    rng = np.random.default_rng(1)
    K = rng.standard_normal((4, 4, 2, 2))
    Q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    lam = np.r_[np.ones(3), np.full(13, 1e-8)]
    S = (Q * lam) @ Q.T
    return K, 0.5 * (S + S.T)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("name", SOLVERS)
def test_default_rtol_is_the_floor_of_sigmas_dtype_in_every_solver(name, lib):
    K, S = _floor_sensitive_problem()
    for dtype, floor in (("float32", 1e-6), ("float64", 1e-10)):
        Kc, Sc = _as(lib, K, dtype), _as(lib, S, dtype)
        r = 6 if name == "cp" else 3

        def run(**kw):
            return _np64(_call(name, Kc, r, Sc, ridge=0, **kw)[0].to_tensor())

        default = run()
        np.testing.assert_array_equal(default, run(rtol=floor))
        if dtype == "float32":
            # the floor matters here: the float64 floor keeps the noise directions
            assert np.abs(default - run(rtol=1e-10)).max() > 1e-2


def test_default_rtol_of_a_prepared_float32_sigma_is_float32s():
    K, S = _floor_sensitive_problem()
    K32, S32 = K.astype(np.float32), S.astype(np.float32)
    a = sd.cp(K32, 6, prepare_sigma(S32), n_iter_max=3, ridge=0)
    b = sd.cp(K32, 6, S32, n_iter_max=3, ridge=0, rtol=1e-6)
    np.testing.assert_array_equal(a.to_tensor(), b.to_tensor())


def test_solver_rtol_rule():
    from sigmadecomp.sigma import solver_rtol

    S = np.eye(3)
    assert solver_rtol(None, S) == default_rtol(np.float64) == 1e-10
    assert solver_rtol(None, S.astype(np.float32)) == default_rtol(np.float32) == 1e-6
    assert solver_rtol(None, torch.eye(3, dtype=torch.float32)) == 1e-6
    assert solver_rtol(None, None) == 1e-10
    assert solver_rtol(0, S.astype(np.float32)) == 0.0
    with pytest.raises(ValueError, match=r"rtol=-1\.0 is not allowed"):
        solver_rtol(-1.0, S)
    with pytest.raises(TypeError, match=r"rtol=nan is not allowed"):
        solver_rtol(float("nan"), S)


@pytest.mark.parametrize("name", ["sigma_svd", "cp"])
def test_a_non_array_sigma_is_still_refused_by_name(name):
    K = np.random.default_rng(0).standard_normal((3, 2, 1, 1))
    with pytest.raises(TypeError, match="sigma of type list is not allowed"):
        _call(name, K, 1, np.eye(2).tolist())


# ---------------------------------------------------------------------------
# 2. the TT counts check their arguments
# ---------------------------------------------------------------------------

def test_tt_ranks_from_budget_refuses_a_negative_budget():
    with pytest.raises(ValueError, match=r"budget=-5 is not allowed; budget must be at least 0"):
        tt_ranks_from_budget((128, 128, 3, 3), -5)
    assert tt_ranks_from_budget((128, 128, 3, 3), 0) == (1, 1, 1)  # rank 1: the documented floor
    with pytest.raises(TypeError, match=r"budget=1000\.0 is not allowed"):
        tt_ranks_from_budget((128, 128, 3, 3), 1000.0)


@pytest.mark.parametrize("shape, exc", [
    ((128, 128.7, 3, 3), TypeError), ((True, 4), TypeError), ("ab", TypeError),
    (5, TypeError), ((8, 0), ValueError), ((8, 8, 3), ValueError)])
def test_tt_ranks_from_budget_refuses_bad_shapes(shape, exc):
    with pytest.raises(exc, match=r"shape=.* is not allowed"):
        tt_ranks_from_budget(shape, 1000)


def test_tt_ranks_from_budget_checks_its_deprecated_flag():
    with pytest.raises(TypeError, match="keep_proportion='x' is not allowed"):
        tt_ranks_from_budget((128, 128, 3, 3), 10**6, "x")
    with pytest.warns(DeprecationWarning, match="keep_proportion"):
        assert tt_ranks_from_budget((128, 128, 3, 3), 10**6, True) == tt_ranks_from_budget(
            (128, 128, 3, 3), 10**6)


@pytest.mark.parametrize("args, kw, exc, msg", [
    (((2, 0), (2, 2), 1), {}, ValueError, r"in_modes\[1\]=0 is not allowed"),
    (((2, -2), (2, -2), 1), {}, ValueError, r"in_modes\[1\]=-2 is not allowed"),
    (((2, 2.5), (2, 2), 1), {}, TypeError, r"in_modes\[1\]=2\.5 is not allowed"),
    (((2, 2), (2, 2, 2), 1), {}, ValueError, "same length"),
    (((), (), 1), {}, ValueError, "non-empty"),
    (((2, 2), (2, 2), 1), {"kernel_size": (0, 3)}, ValueError, r"kernel_size\[0\]=0"),
    (((2, 2), (2, 2), 1), {"kernel_size": (3.5, 3)}, TypeError, r"kernel_size\[0\]=3\.5"),
    (((2, 2), (2, 2), 1), {"kernel_size": (3, 3, 3)}, ValueError, "kernel_size=.* pair"),
])
def test_tt_param_count_refuses_bad_modes(args, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        tt_param_count(*args, **kw)
    with pytest.raises(exc, match=msg):
        tt_ranks_for_ratio(args[0], args[1], 2.0, **kw)


def test_tt_mac_count_refuses_a_bad_output_size():
    with pytest.raises(ValueError, match=r"out_hw=\(-1, 2\) is not allowed"):
        tt_mac_count((2, 2), (2, 2), 1, kernel_size=(3, 3), out_hw=(-1, 2))
    # unchanged counts for valid input (NumPy ints too)
    assert tt_mac_count((4, 8), (2, 5), 3) == 432
    assert tt_param_count((np.int64(4), 4, 8), (4, 4, 8), 16, kernel_size=(3, 3)) == 7505
    assert tt_mac_count((2, 2), (2, 2), 1, kernel_size=(3, 3), out_hw=(2, 2)) > 0


# ---------------------------------------------------------------------------
# 3. every reported error is an independent recomputation
# ---------------------------------------------------------------------------

def _sigma(seed, n, log_cond, rank):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.logspace(0.0, -log_cond, n)
    if rank is not None:
        lam[rank:] = 0.0
    S = (Q * lam) @ Q.T
    return 0.5 * (S + S.T)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), name=st.sampled_from(SOLVERS),
       lib=st.sampled_from(["numpy", "torch"]), dtype=st.sampled_from(["float64", "float32"]),
       dims=st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
       log_cond=st.floats(0.0, 12.0), singular=st.booleans(), r=st.integers(1, 5),
       ridge=st.sampled_from([0.0, 5e-4, 0.1]))
def test_reported_errors_equal_an_independent_recomputation(seed, name, lib, dtype, dims,
                                                            log_cond, singular, r, ridge):
    rng = np.random.default_rng(seed)
    n = dims[1] * dims[2] * dims[3]
    S = _sigma(seed, n, log_cond, int(rng.integers(0, n + 1)) if singular else None)
    K = rng.standard_normal(dims)
    Kc, Sc = _as(lib, K, dtype), _as(lib, S, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, ref = _call(name, Kc, r, Sc, ridge=ridge)
    A = res.to_tensor()
    assert type(A) is type(Kc) and A.dtype == Kc.dtype and tuple(A.shape) == tuple(ref.shape)
    S_user = _np64(Sc)
    e_user, lam, K1, D = _rel_error(ref, A, S_user)
    e_fit, *_ = _rel_error(ref, A, ridge_sigma(S_user, ridge), psd_part=True)
    # rounding allowance: the change D and the weights measured against the reference norm
    slack = (np.sqrt(max(lam[-1], 0.0)) * (np.linalg.norm(D) + np.linalg.norm(K1))
             / np.sqrt(max(np.sum((K1 @ S_user) * K1), 1e-300)))
    rel, absl = (1e-8, 1e-8) if dtype == "float64" else (1e-5, 1e-6)
    if np.isinf(e_user) or np.isinf(e_fit):  # a zero reference norm (K in sigma's null space)
        assert (res.sigma_error, res.errors[-1]) == (e_user, e_fit)
    else:
        assert abs(res.sigma_error - e_user) <= rel * e_user + absl * slack
        assert abs(res.errors[-1] - e_fit) <= rel * e_fit + absl * slack
    assert res.error == res.errors[-1]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(res.errors, res.errors[1:]))


@pytest.mark.parametrize("name", SOLVERS)
def test_mixed_libraries_give_the_result_of_one_library(name):
    rng = np.random.default_rng(3)
    K = rng.standard_normal((4, 3, 2, 2))
    S = _sigma(3, 12, 6.0, 8)
    ref = _np64(_call(name, K, 2, S)[0].to_tensor())
    a = _call(name, torch.as_tensor(K), 2, S)[0].to_tensor()
    b = _call(name, K, 2, torch.as_tensor(S))[0].to_tensor()
    assert isinstance(a, torch.Tensor) and isinstance(b, np.ndarray)
    np.testing.assert_allclose(_np64(a), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("name", SOLVERS)
def test_inputs_unchanged_and_default_runs_deterministic(name, lib):
    rng = np.random.default_rng(4)
    K = rng.standard_normal((4, 3, 2, 2))
    S = _sigma(4, 12, 3.0, None)
    S[0, 1] += 1e-13  # an accepted asymmetry: symmetrised internally, not in place
    Kc, Sc = _as(lib, K, "float32"), _as(lib, S, "float64")
    if lib == "numpy":
        Kc, Sc = np.asfortranarray(Kc), np.asfortranarray(Sc)
    K0, S0 = _np64(Kc).copy(), _np64(Sc).copy()
    a = _np64(_call(name, Kc, 2, Sc)[0].to_tensor())
    b = _np64(_call(name, Kc, 2, Sc)[0].to_tensor())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(_np64(Kc), K0)
    np.testing.assert_array_equal(_np64(Sc), S0)


# ---------------------------------------------------------------------------
# 4. NaN/inf refused with the argument's name
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["weight", "approx"])
def test_relative_sigma_error_refuses_non_finite_arrays(bad):
    K = np.ones((2, 3))
    A = 0.5 * K
    if bad == "weight":
        K = K.copy()
        K[0, 0] = np.inf
    else:
        A = A.copy()
        A[1, 2] = np.nan
    with pytest.raises(ValueError, match=f"{bad} contains NaN or inf values"):
        sd.relative_sigma_error(K, A, np.eye(3))


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_tt_user_init_with_nan_is_refused_by_name(kind):
    rng = np.random.default_rng(0)
    K = rng.standard_normal((4, 3, 2, 2))
    S = _sigma(0, 12, 1.0, None)
    solver = sd.tt_conv if kind == "conv" else sd.tt_linear
    weight = K if kind == "conv" else K.reshape(4, -1)
    start = solver(weight, 2, S, n_iter_max=1)
    cores = [c.copy() for c in start.cores]
    cores[1][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="init core 1 contains NaN or inf values"):
        solver(weight, None, S, init=cores)


# ---------------------------------------------------------------------------
# 5. callback and tol: one meaning in every solver, library and dtype
# ---------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), name=st.sampled_from(SOLVERS[1:]),
       lib=st.sampled_from(["numpy", "torch"]), dtype=st.sampled_from(["float64", "float32"]),
       tol=st.sampled_from([0.0, 1e-3, 1e-2]), log_cond=st.floats(0.0, 12.0))
def test_callback_and_tol_follow_the_contract(seed, name, lib, dtype, tol, log_cond):
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((4, 3, 2, 2))
    S = _sigma(seed, 12, log_cond, None)
    seen = []
    res, _ = _call(name, _as(lib, K, dtype), 2, _as(lib, S, dtype), tol=tol,
                   callback=lambda r: seen.append((r.n_iter, r.errors[-1])))
    e = res.errors
    assert [s[0] for s in seen] == list(range(res.n_iter + 1)) and [s[1] for s in seen] == e
    assert len(e) == res.n_iter + 1
    rule = [tol > 0 and e[k - 1] - e[k] <= tol * e[k - 1] for k in range(1, len(e))]
    # the run stops at the first sweep that meets the rule and runs on otherwise; a sweep
    # that rounding made worse is rejected (the previous error repeated, converged)
    assert not any(rule[:-1])
    if res.converged:
        assert rule[-1] or e[-1] == e[-2]
    else:
        assert res.n_iter == (3 if name.startswith("tt") else 4) and not any(rule)


# ---------------------------------------------------------------------------
# 6. IDX reader: a damaged header is a clear ValueError
# ---------------------------------------------------------------------------

def test_load_idx_refuses_a_truncated_header(tmp_path):
    from sigmadecomp.datasets import load_idx

    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big"))  # 3 dims, one given
    with pytest.raises(ValueError, match="truncated"):
        load_idx(p)


def test_load_idx_refuses_a_header_whose_size_overflows(tmp_path):
    from sigmadecomp.datasets import load_idx

    p = tmp_path / "x-idx4-ubyte"
    dims = b"".join((2**16).to_bytes(4, "big") for _ in range(4))  # 2**64 entries
    p.write_bytes(bytes([0, 0, 0x08, 4]) + dims + bytes(8))
    with pytest.raises(ValueError, match="truncated"):
        load_idx(p)
