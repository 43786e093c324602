# One concept, Tucker-2 decomposition (HOOI and Tucker2-ALS-Sigma with its two block
# minimisers); slightly longer than ~600 lines for it.
"""Tucker-2 decomposition of conv kernels: HOOI and Tucker2-ALS-Sigma.

A kernel ``K`` of shape ``(T, S, H, W)`` is approximated on its two channel
modes, ``K ~= G x_1 U_T x_2 U_S``, with ``U_T`` (T, r_T) and ``U_S`` (S, r_S)
orthonormal and a core ``G`` of shape ``(r_T, r_S, H, W)``. Deployed, this is
a 1x1 conv (S -> r_S), the HxW core conv (r_S -> r_T) and a 1x1 conv
(r_T -> T).

With ``sigma=None`` the factors minimise the Frobenius error (HOOI, the higher
order orthogonal iteration on modes 0 and 1). With a second moment ``sigma``
of the layer's input patches they minimise the Sigma-error
``tr(D Sigma D^T)``, ``D = K_(1) - K~_(1)``, by alternating two exact block
minimisers (design notes, section 4):

* ``(U_T, G)`` given ``span(U_S)``: a reduced-rank regression with a closed
  form. Its optimal value gives the error of the sweep for free.
* ``U_S`` given ``(U_T, G)``: a quadratic whose normal operator costs one
  ``r_T x n x n`` product per application, solved by conjugate gradients
  warm-started at the current ``U_S`` with a Kronecker preconditioner (a dense
  direct solve when ``S * r_S`` is small), then orthonormalised.

Warm-started CG never increases the quadratic, so the objective is monotone
whatever the inner accuracy.
"""

from __future__ import annotations

import time

import numpy as np

from . import _backend as B
from ._threads import retune, solver_threads
from ._validation import (
    CANCEL,
    CHOL_PIVOT,
    PRECOND_FLOOR,
    TINY,
    check_array,
    check_finite,
    check_int,
    check_magnitude,
    check_nonempty,
    check_positive_float,
    check_sigma,
)
from .contract import (
    check_callback,
    check_init_name,
    check_inner,
    check_n_iter_max,
    check_tol,
    deprecated_options,
    relative_error,
    same,
    tol_reached,
    wants_stop,
)
from .results import Tucker2Result
from .sigma import (
    DEFAULT_RIDGE,
    _fitted_sigma,
    _psd_root_unchecked,
    _rel_sigma_error,
    check_ridge,
    psd_solve,
    solver_rtol,
)
from .solvers import pcg

__all__ = ["tucker2"]

#: Defaults of ``inner`` (:class:`sigmadecomp.InnerSolver`) for the U_S block:
#: 'auto' solves it densely when ``S * r_S <= dense_max``, else by CG.
#: Default ``tol``: stop when a sweep lowers the relative error by at most this
#: fraction of its value. On the curves of five ResNet-18 and reference-network
#: layers at rX=3 this rule stops 0.02-0.06% above the converged error (1e-4:
#: up to 0.09%), after about half the sweeps of the earlier absolute 1e-6
#: (notes/sweeps.md).
TOL = 5e-5
#: Default ``n_iter_max`` (``n_iter_max=None`` means it, as ``tol=None`` means ``TOL``).
N_ITER_MAX = 100
#: With ``inner.rtol`` at least this, the CG operator of the U_S block multiplies
#: by a float32 copy of Sigma (rounding ~1e-6 relative, far below the tolerance):
#: 15-27% less time per run on 128-channel layers, errors equal to 1e-7
#: (notes/sweeps.md). Everything else, and every error, stays in float64.
CG_FLOAT32_RTOL = 1e-4
#: String starts of :func:`tucker2` (``'whitened'`` is its own, beyond the shared names).
INITS = ("svd", "frobenius", "whitened", "random")

INNER_DEFAULTS = {"method": "auto", "rtol": 1e-2, "maxiter": 10, "dense_max": 512,
                  "precond": True}
_RENAMED = {"inner_solver": ("method", same), "inner_rtol": ("rtol", same),
            "inner_maxiter": ("maxiter", same)}


# ----------------------------------------------------------------------------
# small helpers (all arrays float64 in the library/device of the kernel)
# ----------------------------------------------------------------------------

def _zeros(xp, shape, like):
    return xp.zeros(shape, dtype=like.dtype, device=B.device(like))


def _top_left(A, r):
    """``(U[:, :r], s, Vh)`` of the thin SVD of ``A`` (T, m), zero-padded if ``m < r``."""
    xp = B.namespace(A)
    T, m = A.shape
    if m < r:
        A = xp.concat([A, _zeros(xp, (T, r - m), A)], axis=1)
    U, s, Vh = B.svd(A)
    U, Vh = B.svd_flip(U, Vh)
    return U[:, :r], s, Vh[:, :m]


def _top_left_gram(Y, r):
    """Top-``r`` left singular vectors of ``Y`` (T, m) and ``U^T Y``, via the ``T x T`` Gram matrix.

    Cheaper than an SVD when ``m > T``; only the dominant subspace is needed.
    """
    xp = B.namespace(Y)
    T = Y.shape[0]
    lam, V = B.eigh(Y @ Y.T)
    U = xp.flip(V[:, T - r:], axis=1)
    U, _ = B.svd_flip(U, _zeros(xp, (r, 1), U))
    return U, U.T @ Y


_rel = relative_error


# ----------------------------------------------------------------------------
# Frobenius: HOSVD and HOOI
# ----------------------------------------------------------------------------

def _leading(A, r):
    """Top-``r`` left singular vectors of ``A`` (T, m).

    From the ``T x T`` Gram matrix when ``A`` is wide (``m >= 2 T``: the HOOI
    unfoldings of large layers, e.g. 512 x 2196, where a thin SVD costs several
    times the Gram product), else from the thin SVD. Only the dominant
    subspace is used, which the Gram matrix determines to within
    ``eps * s_1^2 / (s_r^2 - s_{r+1}^2)``.
    """
    T, m = A.shape
    if m >= 2 * T and r < T:
        return _top_left_gram(A, r)[0]
    return _top_left(A, r)[0]


def _hosvd(K, r_T, r_S):
    xp = B.namespace(K)
    T, S = K.shape[:2]
    U_T = _leading(xp.reshape(K, (T, -1)), r_T)
    U_S = _leading(xp.reshape(xp.moveaxis(K, 1, 0), (S, -1)), r_S)
    return U_T, U_S


def _hooi_sweep(K, U_S, r_T, r_S):
    """One HOOI sweep (U_T then U_S); returns ``(U_T, U_S, core)``."""
    xp = B.namespace(K)
    T, S, H, W = K.shape
    A = B.einsum("tshw,sb->tbhw", K, U_S)
    U_T = _leading(xp.reshape(A, (T, -1)), r_T)
    Bm = B.einsum("tshw,ta->sahw", K, U_T)
    U_S = _leading(xp.reshape(Bm, (S, -1)), r_S)
    core = B.einsum("tshw,ta,sb->abhw", K, U_T, U_S)
    return U_T, U_S, core


def _frob_error(normsq, core, K=None, U_T=None, U_S=None):
    """``sqrt(||K||^2 - ||G||^2) / ||K||``; recomputed from ``K - K~`` when that cancels."""
    xp = B.namespace(core)
    sq = normsq - float(xp.sum(core * core))
    if K is not None and sq <= CANCEL * normsq:
        D = K - B.einsum("ta,abhw,sb->tshw", U_T, core, U_S)
        sq = float(xp.sum(D * D))
    return _rel(sq, normsq)


def _frob_error_general(K, normsq, U_T, core, U_S):
    """Frobenius error of a decomposition with orthonormal factors; recomputed from
    ``K - K~`` when ``||K||^2 - 2 <proj, G> + ||G||^2`` cancels."""
    xp = B.namespace(K)
    proj = B.einsum("tshw,ta,sb->abhw", K, U_T, U_S)
    sq = normsq - 2.0 * float(xp.sum(proj * core)) + float(xp.sum(core * core))
    if sq <= CANCEL * normsq:
        D = K - B.einsum("ta,abhw,sb->tshw", U_T, core, U_S)
        sq = float(xp.sum(D * D))
    return _rel(sq, normsq)


# ----------------------------------------------------------------------------
# Sigma: the two exact block minimisers
# ----------------------------------------------------------------------------

def _block_out_core(KS3, S4, U_S, r_T, total, rtol, K1=None, Sig=None):
    """Exact minimiser over ``(U_T, G)`` given ``span(U_S)``.

    Parameters
    ----------
    KS3 : (T, S, P) array, ``K_(1) Sigma`` reshaped.
    S4 : (S, P, S, P) array, ``Sigma`` reshaped.
    U_S : (S, r_S) orthonormal.

    Returns ``U_T`` (T, r_T), ``G`` (r_T, r_S, P), relative error, squared error.
    With ``B = (U_S kron I_P)^T``, ``C = B Sigma B^T`` and ``N = K_(1) Sigma B^T``
    the unconstrained minimiser is ``M* = N C^+``; ``U_T`` spans the top left
    singular vectors of ``N C^{-1/2}`` (eigenvectors of its Gram matrix) and
    ``G_(1) = U_T^T M*``. The squared error is ``tr(K Sigma K^T)`` minus the
    kept squared singular values.
    """
    xp = B.namespace(KS3)
    T, S, P = KS3.shape
    r_S = U_S.shape[1]
    m = r_S * P
    N = xp.reshape(B.einsum("tsp,sb->tbp", KS3, U_S), (T, m))
    C = xp.reshape(B.einsum("sb,spuq,uc->bpcq", U_S, S4, U_S), (m, m))
    C = 0.5 * (C + C.T)
    diag_max = float(xp.max(xp.abs(xp.linalg.diagonal(C))))
    L = None
    if diag_max > 0.0:
        try:
            L = B.cholesky(C)
            if float(xp.min(xp.linalg.diagonal(L))) ** 2 <= CHOL_PIVOT * rtol * diag_max:
                L = None
        except np.linalg.LinAlgError:
            L = None
    if L is not None:
        Y = B.solve_triangular(L, N.T, lower=True).T  # N L^{-T}, (T, m)
        U, SV = _top_left_gram(Y, r_T)
        G1 = B.solve_triangular(L.T, SV.T, lower=False).T  # SV L^{-1}
    else:  # singular C: minimum-norm solution under the library's eigenvalue floor
        root = _psd_root_unchecked(C, rtol)
        Y = N @ root.pinv_factor.T  # N C^{+1/2} restricted to the kept eigenpairs
        U, SV = _top_left_gram(Y, r_T)
        G1 = SV @ root.pinv_factor
    kept = float(xp.sum(SV * SV))
    sq = total - kept
    G = xp.reshape(G1, (r_T, r_S, P))
    if sq <= CANCEL * total and K1 is not None:  # tiny error: compute it from D directly
        Z = xp.reshape(B.einsum("sb,tbp->tsp", U_S, G), (r_T, S * P))
        D = K1 - U @ Z
        sq = float(xp.sum((D @ Sig) * D))
    return U, G, _rel(sq, total), sq


def _nearest_kron(S4):
    """``Sigma ~= Sigma_S kron Sigma_P`` (Van Loan-Pitsianis), both symmetric, traces >= 0."""
    xp = B.namespace(S4)
    S, P = S4.shape[:2]
    R = xp.reshape(xp.permute_dims(S4, (0, 2, 1, 3)), (S * S, P * P))
    lam, V = B.eigh(R.T @ R)
    v = V[:, -1]
    sig_P = xp.reshape(v, (P, P))
    sig_S = xp.reshape(R @ v, (S, S))
    if float(xp.sum(xp.linalg.diagonal(sig_P))) < 0:
        sig_P, sig_S = -sig_P, -sig_S
    return 0.5 * (sig_S + sig_S.T), 0.5 * (sig_P + sig_P.T)


def _whitened_start(K, sig_S, sig_P, r_S, rtol):
    """``U_S`` (S, r_S) of the HOSVD of ``K`` whitened by ``Sigma ~= Sigma_S kron Sigma_P``.

    Under a Kronecker-structured ``Sigma`` the objective is the Frobenius error
    of ``K x_2 Sigma_S^{1/2} x_(h,w) Sigma_P^{1/2}``; the leading ``r_S``
    eigenvectors ``V`` of the Gram matrix of its input-channel unfolding,
    ``Sigma_S^{1/2} M Sigma_S^{1/2}`` with
    ``M[s, s'] = sum_{t,p,q} K[t,s,p] Sigma_P[p,q] K[t,s',q]``, map back to
    ``span(U_S) = Sigma_S^{+1/2} V`` (eigenvalues of ``Sigma_S`` under the floor
    ``rtol`` count as zero). Costs about one ``S^2 x P^2`` product and two
    ``S x S`` eigen-decompositions. ``None`` when ``Sigma_S`` has no usable root.
    """
    xp = B.namespace(K)
    T, S = K.shape[:2]
    P = sig_P.shape[0]
    K3 = xp.reshape(K, (T, S, P))
    KP = B.einsum("tsp,pq->tsq", K3, sig_P)
    M = B.einsum("tsq,tuq->su", KP, K3)
    lam, E = B.eigh(sig_S)
    top = max(float(lam[-1]), 0.0)
    keep = lam > rtol * top if top > 0 else lam > 0
    root = xp.where(keep, xp.sqrt(xp.where(keep, lam, 0.0)), 0.0)
    iroot = xp.where(keep, 1.0 / xp.where(keep, root, 1.0), 0.0)
    Ls = (E * root[None, :]) @ E.T
    A = Ls @ M @ Ls
    mu, V = B.eigh(0.5 * (A + A.T))
    V = xp.flip(V[:, S - r_S:], axis=1)
    U_S = (E * iroot[None, :]) @ (E.T @ V)
    if not bool(xp.all(xp.isfinite(U_S))) or float(xp.max(xp.abs(U_S))) == 0.0:
        return None
    return B.qr(U_S)[0]


class _Kron:
    """Preconditioner ``M = Sigma_S kron Q_P`` applied as ``X -> M^{-1} X`` on (S, r_S)."""

    def __init__(self, sig_S, sig_P):
        xp = B.namespace(sig_S)
        lam, self.E_S = B.eigh(sig_S)
        self.lam = xp.where(lam > 0, lam, 0.0)
        self.sig_P = sig_P

    def update(self, G):
        xp = B.namespace(G)
        Q = B.einsum("tbp,pq,tcq->bc", G, self.sig_P, G)
        mu, self.E_G = B.eigh(0.5 * (Q + Q.T))
        mu = xp.where(mu > 0, mu, 0.0)
        d = self.lam[:, None] * mu[None, :]
        floor = PRECOND_FLOOR * max(float(xp.max(d)), TINY)
        self.inv = 1.0 / xp.where(d > floor, d, floor)
        return self

    def __call__(self, R):
        return self.E_S @ (((self.E_S.T @ R) @ self.E_G) * self.inv) @ self.E_G.T


def _normal_operator(Sig, G, Sig_lo=None):
    """``X -> H(X)`` for the U_S block; one ``r_T x n x n`` GEMM per call.

    With ``Sig_lo`` (``Sigma`` in a lower precision) that GEMM runs in its
    dtype and the result is cast back.
    """
    xp = B.namespace(G)
    r_T, r_S, P = G.shape
    n = Sig.shape[0]
    S = n // P

    def apply(X):
        Z = xp.reshape(B.einsum("sb,tbp->tsp", X, G), (r_T, n))
        if Sig_lo is None:
            ZS = Z @ Sig
        else:
            ZS = xp.astype(xp.astype(Z, Sig_lo.dtype) @ Sig_lo, Z.dtype)
        ZS = xp.reshape(ZS, (r_T, S, P))
        return B.einsum("tsp,tbp->sb", ZS, G)

    return apply


def _block_in(KS3, Sig, S4, U_T, G, U_S, *, solver, inner_rtol, inner_maxiter, precond, rtol,
              Sig_lo=None):
    """Minimise over ``U_S`` given ``(U_T, G)``; returns the new (unorthonormalised) X and CG iterations.

    The objective is ``tr((Y - Z(X)) Sigma (Y - Z(X))^T)`` with ``Y = U_T^T K_(1)``
    and ``Z(X)[t, (s, p)] = sum_b X[s, b] G[t, b, p]``; normal equations
    ``H(X) = Z^*(Y Sigma)``.
    """
    xp = B.namespace(KS3)
    T, S, P = KS3.shape
    r_S = G.shape[1]
    YS = B.einsum("ta,tsp->asp", U_T, KS3)  # U_T^T K Sigma
    rhs = B.einsum("asp,abp->sb", YS, G)
    if solver == "direct":
        Hm = B.einsum("spuq,tbp,tcq->sbuc", S4, G, G)
        Hm = xp.reshape(Hm, (S * r_S, S * r_S))
        X = xp.reshape(psd_solve(Hm, xp.reshape(rhs, (-1, 1)), rtol=rtol), (S, r_S))
        return X, 0
    apply = _normal_operator(Sig, G, Sig_lo)
    R0 = rhs - apply(U_S)
    D, info = pcg(apply, R0, rtol=inner_rtol, maxiter=inner_maxiter,
                  precond=precond.update(G) if precond is not None else None)
    return U_S + D, info.n_iter


def _sigma_error_general(KS, Sig, total, U_T, G, U_S, K1):
    """Sigma-error of a decomposition with orthonormal ``U_T`` (one r_T x n x n GEMM).

    ``total - 2 cross + quad`` cancels when the error is small; it is then
    recomputed from ``D = K - K~`` (one T x n x n GEMM).
    """
    xp = B.namespace(KS)
    r_T, r_S, P = G.shape
    n = KS.shape[1]
    Z = xp.reshape(B.einsum("sb,tbp->tsp", U_S, G), (r_T, n))
    cross = float(xp.sum((U_T.T @ KS) * Z))
    quad = float(xp.sum((Z @ Sig) * Z))
    sq = total - 2.0 * cross + quad
    if sq <= CANCEL * total:
        D = K1 - U_T @ Z
        sq = float(xp.sum((D @ Sig) * D))
    return _rel(sq, total)


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------

def _check_ranks(ranks, T, S):
    if (isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__len__")
            or getattr(ranks, "ndim", 1) != 1 or len(ranks) != 2):
        raise ValueError(
            f"ranks={ranks!r} is not allowed; ranks must be a pair (r_T, r_S) of integers"
        )
    r_T = check_int(ranks[0], "ranks[0] (r_T)", low=1, high=T)
    r_S = check_int(ranks[1], "ranks[1] (r_S)", low=1, high=S)
    return r_T, r_S


def _check_user_init(init, K64, r_T, r_S):
    """``(core, out_factor, in_factor)`` in float64, orthonormalised (same tensor)."""
    if isinstance(init, Tucker2Result):
        parts = (init.core, init.out_factor, init.in_factor)
    else:
        parts = tuple(init)
        if len(parts) != 3:
            raise ValueError(
                f"init has {len(parts)} entries; a user-given init must be a Tucker2Result "
                "or a tuple (core, out_factor, in_factor)"
            )
    T, S, H, W = K64.shape
    want = ((r_T, r_S, H, W), (T, r_T), (S, r_S))
    names = ("core", "out_factor", "in_factor")
    out = []
    for a, shp, nm in zip(parts, want, names):
        check_array(a, f"init {nm}")
        if tuple(a.shape) != shp:
            raise ValueError(
                f"init {nm} has shape {tuple(a.shape)}; for kernel shape {tuple(K64.shape)} "
                f"and ranks ({r_T}, {r_S}) it must be {shp}"
            )
        a = B.asarray_like(a, K64)
        check_finite(a, f"init {nm}")
        out.append(a)
    core, U_T, U_S = out
    U_T, R_T = B.qr(U_T)
    U_S, R_S = B.qr(U_S)
    core = B.einsum("ia,abhw,jb->ijhw", R_T, core, R_S)
    return core, U_T, U_S


def _random_factors(rng, K64, r_T, r_S):
    T, S = K64.shape[:2]
    U_T = B.qr(B.random_normal(rng, (T, r_T), K64))[0]
    U_S = B.qr(B.random_normal(rng, (S, r_S), K64))[0]
    return U_T, U_S


# ----------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------

def _old_callback(cb):
    # the old form: callback(result, error), at the start and after every sweep
    return lambda res: cb(res, res.errors[-1])


@deprecated_options("tucker2", _RENAMED)
@solver_threads(sigma_blas_unit="TUCKER2_WORK_PER_THREAD")
def tucker2(kernel, ranks, sigma=None, *, init=None, n_iter_max=N_ITER_MAX, tol=TOL, rng=None,
            callback=None, rtol=None, ridge=DEFAULT_RIDGE, inner=None, init_iter_max=100,
            init_tol=TOL):
    """Tucker-2 decomposition of a conv kernel on its two channel modes.

    Minimises ``||(K_(1) - K~_(1)) Sigma^{1/2}||_F`` over
    ``K~ = G x_1 U_T x_2 U_S`` (Tucker2-ALS-Sigma, Kalle et al., NeurIPS 2025),
    or the Frobenius error ``||K - K~||_F`` when ``sigma`` is None (HOOI on
    modes 0 and 1). Every Sigma-ALS sweep updates ``U_S`` (conjugate gradients
    warm-started at the current ``U_S``, or a dense solve), then ``(U_T, G)``
    jointly in closed form; both are exact block minimisers, so ``errors`` never
    increases (a sweep that would raise it -- possible only through the
    eigenvalue floor ``rtol`` of singular systems -- is rejected and ends the
    run). The options shared by every solver (``init``, ``n_iter_max``,
    ``tol``, ``rng``, ``callback``, ``rtol``, ``ridge``, ``inner``) follow
    :mod:`sigmadecomp.contract`.

    Parameters
    ----------
    kernel : array of shape (T, S, H, W)
        NumPy array or torch tensor (any device), float32 or float64.
    ranks : (int, int)
        ``(r_T, r_S)`` with ``1 <= r_T <= T`` and ``1 <= r_S <= S``.
    sigma : array of shape (S*H*W, S*H*W), optional
        Symmetric PSD second moment of the input patches, indexed ``(s, h, w)``
        like ``kernel.reshape(T, -1)``. ``None`` runs Frobenius HOOI.
        Rank-deficient ``sigma`` is allowed (see ``rtol`` and ``ridge``); an
        indefinite one raises ``ValueError`` (policy of
        :mod:`sigmadecomp.sigma`).
    init : {'frobenius', 'svd', 'whitened', 'random'}, Tucker2Result or tuple, optional
        Starting point. Default ``'frobenius'`` when ``sigma`` is given (the
        HOOI solution, so the error minimised -- the Sigma-error when
        ``ridge=0`` -- is never worse than HOOI's) and ``'svd'`` (the HOSVD;
        ``'hosvd'`` is its deprecated alias) for HOOI. ``'whitened'``: the
        input factor of the HOSVD of the kernel whitened by the Kronecker
        approximation ``Sigma ~= Sigma_S kron Sigma_(h,w)``, exact when Sigma
        is such a product and ``r_T = T``. No guarantee against HOOI: at rX=3
        it started 1.4-1.8% lower than HOOI on random-weight ResNet-18 layers
        at a fraction of the cost, but 0.8-1.1% higher on trained
        reference-network layers (``notes/sweeps.md``). ``'random'``: random
        orthonormal factors drawn
        from ``rng``. With ``sigma`` given, a string init only supplies
        ``U_S``; ``(U_T, G)`` are its exact Sigma-optimal completion. A
        :class:`Tucker2Result` or a tuple ``(core, out_factor, in_factor)`` is
        used as given (factors orthonormalised by QR, which keeps the tensor).
        With ``sigma=None``, ``'frobenius'`` and ``'svd'`` both start HOOI
        from the HOSVD.
    n_iter_max : int, optional
        Maximum number of sweeps (default ``N_ITER_MAX = 100``; ``None`` is
        the default).
    tol : float, optional
        Stop after the first sweep that lowers the relative error by at most
        ``tol`` times its previous value (:mod:`sigmadecomp.contract`); ``0``
        runs all ``n_iter_max`` sweeps. Default (also for ``None``)
        ``TOL = 5e-5``: on ResNet-18 and reference-network layers at rX=3 the
        Sigma-ALS then stopped within 0.06% of its converged error
        (``notes/sweeps.md``).
    rng : None, int or numpy.random.Generator, optional
        Randomness for ``init='random'``; ``None`` is the fixed seed 0 (default
        runs are reproducible).
    callback : callable, optional
        ``callback(result)`` with the current :class:`Tucker2Result` at the
        initial point and after every sweep; returning ``True`` stops the run
        (``converged`` is then True only if the ``tol`` rule held on that
        sweep). The old form ``callback(result, error)``
        still works with a ``DeprecationWarning``.
    inner : InnerSolver or dict, optional
        The ``U_S`` block (Sigma only; :class:`sigmadecomp.InnerSolver`):
        ``method`` 'cg' (preconditioned CG warm-started at the current
        ``U_S``), 'direct' (a dense solve of the ``(S*r_S)``-square normal
        equations) or 'auto' (default: dense when ``S*r_S <= dense_max``,
        default 512); CG stops when its residual has shrunk by ``rtol``
        (default 1e-2) relative to the warm start, or after ``maxiter``
        (default 10) iterations, each one ``r_T x n x n`` GEMM (run in float32
        when ``rtol >= CG_FLOAT32_RTOL = 1e-4``: its rounding, about 1e-6
        relative, is far below the tolerance; every other step and every
        reported error stay float64); ``precond``
        (default True) uses the Kronecker preconditioner. The old keywords
        ``inner_solver``, ``inner_rtol`` and ``inner_maxiter`` still work with
        a ``DeprecationWarning``.
    init_iter_max, init_tol : int and float, optional
        ``n_iter_max`` and ``tol`` of the HOOI run behind ``init='frobenius'``
        (defaults: those of :func:`tucker2` itself, so the start is exactly
        ``tucker2(kernel, ranks)``).
    rtol : float, optional
        Eigenvalue floor relative to the largest eigenvalue for the singular
        systems of the Sigma-ALS (the policy of :func:`sigmadecomp.psd_root`):
        default the rule shared by every solver
        (:func:`sigmadecomp.sigma.solver_rtol`), 1e-10 for a float64 ``sigma``
        (and without ``sigma``) and 1e-6 for float32. Systems
        that are numerically singular get the minimum-norm solution, which is
        still an exact minimiser.
    ridge : float, optional
        Minimise in ``sigma + ridge * (trace(sigma) / n) * I``
        (:func:`sigmadecomp.sigma.ridge_sigma`) instead of ``sigma``: in the
        directions ``sigma`` never saw (fewer calibration patches than ``n``)
        the result then stays close to the kernel instead of being arbitrary.
        Default :data:`sigmadecomp.sigma.DEFAULT_RIDGE` (``5e-4``): on the
        measured singular layers it kept the Sigma-error within 1% of
        ``ridge=0`` and lowered both the Frobenius error and the Sigma-error
        on held-out data, though not to HOOI's Frobenius error
        (``notes/ridge.md``). ``0`` minimises the
        Sigma-error itself. Ignored without ``sigma``.

    Returns
    -------
    Tucker2Result
        ``core`` (r_T, r_S, H, W), ``out_factor`` (T, r_T) and ``in_factor``
        (S, r_S) with orthonormal columns, in the library, dtype and device of
        ``kernel``; ``errors`` (relative error in the metric minimised -- the
        Sigma-error in the ridged ``sigma``, the plain Sigma-error when
        ``ridge=0``, Frobenius when ``sigma`` is None -- of the initial point
        and after each sweep), ``sigma_error`` (the final relative Sigma-error
        in ``sigma`` itself; ``None`` in the results passed to ``callback``
        when ``ridge > 0``), ``ridge``, ``n_iter``, ``converged``,
        ``seconds`` and ``to_tensor()``. All algebra is done in float64.

    Notes
    -----
    With ``n = S*H*W`` a Sigma-ALS sweep costs ``inner.maxiter + 1``
    products of an ``r_T x n`` by an ``n x n`` matrix (the CG operator,
    float32 by default), plus
    the closed-form block: ``C = B Sigma B^T`` (about ``n^2 r_S`` flops), a
    Cholesky factorisation of the ``(r_S*H*W)``-square ``C`` and a ``T x T``
    eigen-decomposition. The error of the sweep comes from the closed form,
    without a ``T x n x n`` product. ``tr(K Sigma K^T)`` and ``K_(1) Sigma``
    are formed once. Checking that ``sigma`` is positive semi-definite costs
    one Cholesky factorisation of an ``n x n`` matrix (``n^3 / 3`` flops);
    with ``ridge > 0`` the final ``sigma_error`` costs one more ``T x n x n``
    product.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import tucker2, relative_sigma_error
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((6, 5, 3, 3))
    >>> X = rng.standard_normal((500, 45)) * np.linspace(0.2, 2.0, 45)
    >>> Sigma = X.T @ X / 500
    >>> hooi = tucker2(K, (3, 2))
    >>> res = tucker2(K, (3, 2), Sigma)
    >>> res.core.shape, res.out_factor.shape, res.in_factor.shape
    ((3, 2, 3, 3), (6, 3), (5, 2))
    >>> bool(np.all(np.diff(res.errors) <= 1e-12))
    True
    >>> bool(res.sigma_error <= relative_sigma_error(K, hooi.to_tensor(), Sigma))
    True
    >>> bool(np.isclose(res.sigma_error, relative_sigma_error(K, res.to_tensor(), Sigma)))
    True
    >>> exact = tucker2(K, (3, 2), Sigma, ridge=0)   # errors are then plain Sigma-errors
    >>> exact.error == exact.sigma_error
    True
    """
    t0 = time.perf_counter()
    check_array(kernel, "kernel", ndim=4)
    check_nonempty(kernel, "kernel")
    check_finite(kernel, "kernel")
    T, S, H, W = (int(d) for d in kernel.shape)
    P, n = H * W, S * H * W
    r_T, r_S = _check_ranks(ranks, T, S)
    n_iter_max = check_n_iter_max(n_iter_max, N_ITER_MAX)
    tol = check_tol(tol, TOL)
    opts = check_inner(inner, defaults=INNER_DEFAULTS, solver="tucker2")
    inner_rtol, inner_maxiter = opts.rtol, opts.maxiter
    init_iter_max = check_int(init_iter_max, "init_iter_max", low=0)
    init_tol = check_positive_float(init_tol, "init_tol", allow_zero=True)
    callback = check_callback(callback, "tucker2", _old_callback)
    if init is None:
        init = "svd" if sigma is None else "frobenius"
    if isinstance(init, str):
        init = check_init_name(init, "tucker2", INITS)
    elif not isinstance(init, (Tucker2Result, tuple, list)):
        raise TypeError(
            f"init of type {type(init).__name__} is not allowed; init must be one of "
            "'svd', 'frobenius', 'whitened', 'random', a Tucker2Result or a tuple "
            "(core, out_factor, in_factor)"
        )
    rng = B.check_rng(rng)

    ridge = check_ridge(ridge)
    K = B.as_compute(kernel)
    xp = B.namespace(K)
    Sig_user = check_sigma(sigma, n, K)
    check_magnitude(K, "kernel", Sig_user)
    Sig, projected = _fitted_sigma(Sig_user, ridge)
    if Sig is None:
        ridge = 0.0
    rtol = solver_rtol(rtol, sigma)  # the shared rule: the floor of sigma's dtype

    def make_result(U_T, G, U_S, errors, n_done, converged, final=False):
        cast = lambda a: xp.astype(a, kernel.dtype)
        sigma_error = None
        if Sig is not None:
            if not ridge and not projected:
                sigma_error = errors[-1]
            elif final and not ridge:  # fitted in the nearest PSD matrix of sigma
                approx = U_T @ xp.reshape(B.einsum("sb,tbp->tsp", U_S, G), (r_T, n))
                sigma_error = _rel_sigma_error(xp.reshape(K, (T, n)), approx, Sig_user)
            elif final:
                K1_ = xp.reshape(K, (T, n))
                approx = U_T @ xp.reshape(B.einsum("sb,tbp->tsp", U_S, G), (r_T, n))
                # tr(K Sigma K^T) from K Sigma_ridge = K Sigma + c K, no second product
                shift = float(Sig[0, 0]) - float(Sig_user[0, 0])
                den = None if projected else total - shift * float(xp.sum(K1_ * K1_))
                sigma_error = _rel_sigma_error(K1_, approx, Sig_user, den=den)
        return Tucker2Result(
            errors=list(errors), n_iter=n_done, converged=converged, weighted=Sig is not None,
            seconds=time.perf_counter() - t0, core=cast(xp.reshape(G, (r_T, r_S, H, W))),
            out_factor=cast(U_T), in_factor=cast(U_S), ridge=ridge, sigma_error=sigma_error,
        )

    def stop_requested(U_T, G, U_S, errors, n_done, converged=False):
        if callback is None:
            return False
        return wants_stop(callback(make_result(U_T, G, U_S, errors, n_done, converged)))

    user_init = not isinstance(init, str)
    if user_init:
        G, U_T, U_S = _check_user_init(init, K, r_T, r_S)
    elif init == "random":
        U_T, U_S = _random_factors(rng, K, r_T, r_S)
        G = None
    elif init == "svd" or Sig is None:
        U_T, U_S = _hosvd(K, r_T, r_S)
        G = None
    elif init == "whitened":
        U_S = _whitened_start(K, *_nearest_kron(xp.reshape(Sig, (S, P, S, P))), r_S, rtol)
        U_T, G = None, None
        if U_S is None:  # Sigma_S without a usable root: fall back to the HOSVD
            U_T, U_S = _hosvd(K, r_T, r_S)
    else:  # 'frobenius' with sigma: the HOOI solution
        frob = tucker2(K, (r_T, r_S), None, init="svd", n_iter_max=init_iter_max, tol=init_tol)
        U_T, U_S, G = frob.out_factor, frob.in_factor, frob.core

    errors = []
    converged = False
    n_done = 0

    if Sig is None:
        # ---------------- HOOI ----------------
        normsq = float(xp.sum(K * K))
        if G is None:
            G = B.einsum("tshw,ta,sb->abhw", K, U_T, U_S)
            errors.append(_frob_error(normsq, G, K, U_T, U_S))
        else:
            G = xp.reshape(G, (r_T, r_S, H, W))
            errors.append(_frob_error_general(K, normsq, U_T, G, U_S))
        if not stop_requested(U_T, G, U_S, errors, 0):
            for it in range(1, n_iter_max + 1):
                U_T, U_S, G = _hooi_sweep(K, U_S, r_T, r_S)
                errors.append(_frob_error(normsq, G, K, U_T, U_S))
                n_done = it
                retune()  # long runs follow the cores that free up or fill
                converged = tol_reached(errors[-2], errors[-1], tol)
                if stop_requested(U_T, G, U_S, errors, n_done, converged) or converged:
                    break
        return make_result(U_T, G, U_S, errors, n_done, converged)

    # ---------------- Tucker2-ALS-Sigma ----------------
    K1 = xp.reshape(K, (T, n))
    KS = K1 @ Sig
    total = float(xp.sum(KS * K1))
    KS3 = xp.reshape(KS, (T, S, P))
    S4 = xp.reshape(Sig, (S, P, S, P))
    if user_init:
        G = xp.reshape(G, (r_T, r_S, P))
        errors.append(_sigma_error_general(KS, Sig, total, U_T, G, U_S, K1))
    else:
        U_T, G, err, _ = _block_out_core(KS3, S4, U_S, r_T, total, rtol, K1, Sig)
        errors.append(err)
    solver = opts.method
    if solver == "auto":
        solver = "direct" if S * r_S <= opts.dense_max else "cg"
    precond = Sig_lo = None
    if solver == "cg":
        if opts.precond:
            precond = _Kron(*_nearest_kron(S4))
        if inner_rtol >= CG_FLOAT32_RTOL:
            Sig_lo = xp.astype(Sig, xp.float32)

    if not stop_requested(U_T, G, U_S, errors, 0):
        for it in range(1, n_iter_max + 1):
            X, _ = _block_in(KS3, Sig, S4, U_T, G, U_S, solver=solver, inner_rtol=inner_rtol,
                             inner_maxiter=inner_maxiter, precond=precond, rtol=rtol,
                             Sig_lo=Sig_lo)
            U_S_new = B.qr(X)[0]
            U_T_new, G_new, err, _ = _block_out_core(KS3, S4, U_S_new, r_T, total, rtol, K1, Sig)
            n_done = it
            retune()  # long runs follow the cores that free up or fill
            if err > errors[-1]:
                # both blocks are exact minimisers, so only the eigenvalue floor of
                # singular systems can make a sweep worse: reject it and stop
                errors.append(errors[-1])
                converged = True
                stop_requested(U_T, G, U_S, errors, n_done, converged)
                break
            U_T, G, U_S = U_T_new, G_new, U_S_new
            errors.append(err)
            converged = tol_reached(errors[-2], errors[-1], tol)
            if stop_requested(U_T, G, U_S, errors, n_done, converged) or converged:
                break
    return make_result(U_T, G, U_S, errors, n_done, converged, final=True)


# ----------------------------------------------------------------------------
# internal entry point (tests that check single block updates)
# ----------------------------------------------------------------------------

class ALSBlocks:
    """The two block minimisers of Tucker2-ALS-Sigma for one kernel and ``sigma``.

    Not part of the stable API (:func:`tucker2` is): tests compare each block
    update with a brute-force least-squares solve, which whole runs of
    :func:`tucker2` cannot isolate. Build it with :func:`als_blocks`.
    """

    def __init__(self, kernel, sigma, rtol):
        T, S, H, W = kernel.shape
        xp = B.namespace(kernel)
        self.P, n = H * W, S * H * W
        self.K1 = xp.reshape(kernel, (T, n))
        self.Sig = sigma
        KS = self.K1 @ sigma
        self.total = float(xp.sum(KS * self.K1))
        self.KS3 = xp.reshape(KS, (T, S, self.P))
        self.S4 = xp.reshape(sigma, (S, self.P, S, self.P))
        self.rtol = rtol

    def out_core(self, U_S, r_T):
        """Block ``(U_T, G)`` given ``span(U_S)``: ``(U_T, G (r_T, r_S, H*W), error, squared error)``."""
        return _block_out_core(self.KS3, self.S4, U_S, r_T, self.total, self.rtol, self.K1,
                               self.Sig)

    def in_factor(self, U_T, G, U_S, *, method="direct", rtol=1e-2, maxiter=10, precond=True):
        """Block ``U_S`` given ``(U_T, G)`` (before orthonormalisation), ``method`` 'direct' or 'cg'."""
        pc = self.preconditioner() if method == "cg" and precond else None
        return _block_in(self.KS3, self.Sig, self.S4, U_T, G, U_S, solver=method,
                         inner_rtol=rtol, inner_maxiter=maxiter, precond=pc, rtol=self.rtol)[0]

    def preconditioner(self):
        """The Kronecker preconditioner of the ``U_S`` block; ``.update(G)`` makes it ``M^{-1}``."""
        return _Kron(*_nearest_kron(self.S4))

    def normal_operator(self, G):
        """``X -> H(X)``, the normal operator of the ``U_S`` block for the core ``G``."""
        return _normal_operator(self.Sig, G)


def als_blocks(kernel, sigma, *, rtol=1e-10):
    """:class:`ALSBlocks` for a float64 kernel (T, S, H, W) and a float64 ``sigma`` (no checks)."""
    return ALSBlocks(kernel, sigma, rtol)
