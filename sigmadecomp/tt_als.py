"""TT-ALS: sweeps of exact core updates in the Sigma-norm (or Frobenius).

The approximation is linear in each core, so every update is the exact
minimiser of ``tr(D Sigma D^T)`` over that core. The normal operator is block
diagonal in the output index ``n_k`` (the output side is not weighted), so one
``(r_{k-1} m_k r_k)``-square system is shared by the ``n_k`` right-hand sides.
It is formed densely when that size is at most ``dense_max`` and solved by
Cholesky (minimum-norm eigen-solve when it is singular,
:func:`sigmadecomp.sigma.psd_solve`), otherwise solved matrix-free by
conjugate gradients warm-started at the current core (which never increases
the objective), preconditioned by a Kronecker model of ``Sigma`` built from
its partial traces. Cores are kept in canonical (orthogonal) gauge, which does
not change the approximation but keeps the systems well conditioned. A sweep
that raises the error -- possible only through the eigenvalue floor of
singular solves -- is rejected (the previous cores are kept and the run ends),
so ``errors`` never increases.

With ``extrapolate`` on, every sweep is followed by a guarded extrapolation
step: both the point before the sweep and the point after it are brought to
the same gauge (left-orthogonal cores, each bond rotated by the orthogonal
Procrustes factor that best matches the new left interface to the old one),
and the cores ``G + beta (G - G_old)`` are tried. The trial point is kept only
when its error is lower than that of the sweep's point; ``beta`` grows after a
success and shrinks after a failure. ``errors`` therefore still never
increases, and every entry is the error of the cores returned with it.

:func:`core_update` is the documented internal entry point to one update
(tests compare it with a brute-force least-squares solve).
"""

from __future__ import annotations

from . import _backend as B
from .contract import relative_error, tol_reached, wants_stop
from ._tt_algebra import (
    left_interface_step,
    left_orthogonalize_one,
    right_interface_step,
    right_orthogonalize,
    tt_matrix,
)
from ._threads import retune
from ._validation import PRECOND_FLOOR, TINY, zero_rtol
from .sigma import psd_solve
from .solvers import pcg

__all__ = ["core_update", "als_sweeps"]


#: Largest interface Gram matrix (entries; 256 MB in float64) of a dense core update;
#: a core whose Gram would be larger is updated by CG.
GRAM_MAX = 2**25


def _sq_err(W, approx, S):
    D = W - approx
    xp = B.namespace(D)
    if S is None:
        return float(xp.sum(D * D))
    return max(float(xp.sum((D @ S) * D)), 0.0)


def _kron_preconditioner(S, L, R, X, m, Y, rtol=PRECOND_FLOOR):
    """``Z -> P^{-1} Z`` with ``P = A (x) M (x) I_n (x) B`` a Kronecker model of the normal operator.

    ``A`` (r_{k-1}^2), ``M`` (m_k^2) and ``B`` (r_k^2) are the left, middle and
    right factors the normal operator would have if ``Sigma`` were a Kronecker
    product over (before, mode k, after): each is the interface contracted
    with the matching partial trace of ``Sigma`` (``O(n^2)`` work, no
    ``n x n x r`` product). CG is invariant to the scale of ``P``; eigenvalues
    below ``rtol`` times the largest are raised to that floor so ``P`` is
    positive definite, which keeps warm-started CG monotone.
    """
    xp = B.namespace(S)
    S6 = xp.reshape(S, (X, m, Y, X, m, Y))
    c = B.einsum("xsyXsy->xX", S6)  # partial trace over (mode k, after)
    d = B.einsum("xsyxsY->yY", S6)  # partial trace over (before, mode k)
    Lt = B.einsum("xta,Xta->xX", L, L)
    Rt = B.einsum("byu,bYu->yY", R, R)
    A = B.einsum("xta,Xtc,xX->ac", L, L, c)
    Bm = B.einsum("byu,dYu,yY->bd", R, R, d)
    M = B.einsum("xsyXSY,xX,yY->sS", S6, Lt, Rt)

    def inv_root(F):
        lam, V = B.eigh(0.5 * (F + F.T))
        top = float(lam[-1]) if lam.shape[0] else 0.0
        floor = max(top, TINY) * rtol
        return V, 1.0 / xp.where(lam > floor, lam, floor)

    VA, iA = inv_root(A)
    VM, iM = inv_root(M)
    VB, iB = inv_root(Bm)
    scale = iA[:, None, None] * iM[None, :, None] * iB[None, None, :]

    def apply(Z):  # Z: (a, m, n, b)
        Zt = B.einsum("amnb,aA,mM,bB->AMnB", Z, VA, VM, VB)
        Zt = Zt * scale[:, :, None, :]
        return B.einsum("AMnB,aA,mM,bB->amnb", Zt, VA, VM, VB)

    return apply


def _update_core(k, cores, L, R, W, WS, S, opts, stats):
    """Exact (or CG, warm-started) minimiser of the objective over core ``k``.

    ``L`` (M_<, T_<, a) and ``R`` (b, M_>, T_>) are the interfaces left and
    right of core ``k``; ``WS = W @ S``; ``opts`` holds the checked inner
    options (``method``, ``dense_max``, ``rtol``, ``maxiter``, ``precond``)
    and ``psd_rtol``, the eigenvalue floor of the dense solves.
    """
    xp = B.namespace(W)
    a, m, n, b = cores[k].shape
    X, Tl, _ = L.shape
    _, Y, Tu = R.shape
    if S is None:
        rhs = B.einsum("tnuxmy,xta,byu->amnb", xp.reshape(W, (Tl, n, Tu, X, m, Y)), L, R)
        Lg = B.einsum("xta,xtc->ac", L, L)
        Rg = B.einsum("byu,dyu->bd", R, R)
        G = psd_solve(Lg, xp.reshape(rhs, (a, m * n * b)), rtol=opts["psd_rtol"])
        G = xp.reshape(G, (a, m * n, b))
        Rginv = psd_solve(Rg, xp.eye(b, dtype=W.dtype, device=B.device(W)), rtol=opts["psd_rtol"])
        G = B.einsum("aqb,bd->aqd", G, Rginv)
        stats["dense"] += 1
        return xp.reshape(G, (a, m, n, b))
    rhs = B.einsum("tnuxmy,xta,byu->amnb", xp.reshape(WS, (Tl, n, Tu, X, m, Y)), L, R)
    dim = a * m * b
    gram = max((X * a) ** 2, (Y * b) ** 2)
    method = opts["method"]
    if method == "direct" or (method == "auto" and dim <= opts["dense_max"] and gram <= GRAM_MAX):
        S6 = xp.reshape(S, (X, m, Y, X, m, Y))
        Lg = B.einsum("xta,Xtc->xaXc", L, L)
        Rg = B.einsum("byu,dYu->byYd", R, R)
        H = B.einsum("xmyXMY,xaXc,byYd->ambcMd", S6, Lg, Rg)
        H = xp.reshape(H, (dim, dim))
        rhs_m = xp.reshape(xp.permute_dims(rhs, (0, 1, 3, 2)), (dim, n))
        G = psd_solve(H, rhs_m, rtol=opts["psd_rtol"])
        stats["dense"] += 1
        return xp.permute_dims(xp.reshape(G, (a, m, b, n)), (0, 1, 3, 2))

    def apply(Z):
        Wt = B.einsum("xta,amnb,byu->tnuxmy", L, Z, R)
        Yt = xp.reshape(xp.reshape(Wt, (Tl * n * Tu, X * m * Y)) @ S, (Tl, n, Tu, X, m, Y))
        return B.einsum("tnuxmy,xta,byu->amnb", Yt, L, R)

    precond = _kron_preconditioner(S, L, R, X, m, Y) if opts["precond"] else None
    G, info = pcg(apply, rhs, x0=cores[k], rtol=opts["rtol"], maxiter=opts["maxiter"],
                  precond=precond)
    stats["cg"] += 1
    stats["cg_iter"] += info.n_iter
    return G


def core_update(weight, cores, k, sigma=None, *, method="auto", dense_max=4096, rtol=1e-4,
                maxiter=50, precond=True, psd_rtol=None):
    """The update of core ``k`` that TT-ALS would make (internal entry point).

    Parameters
    ----------
    weight : array of shape (T, N)
        float64 TT-matrix weight (for a conv: ``(T, (h, w, s))``).
    cores : sequence of 4-D float64 arrays
        The current cores (any gauge).
    k : int
    sigma : array of shape (N, N), optional
        float64 Sigma in the column order of ``weight``; None: Frobenius.
    method, dense_max, rtol, maxiter, precond :
        The inner options (see :class:`sigmadecomp.InnerSolver`).
    psd_rtol : float, optional
        Eigenvalue floor of the dense solves (default: the float64 zero floor).

    Returns
    -------
    core : array
        The new core ``k`` (the others unchanged).
    stats : dict
        ``{'dense': ..., 'cg': ..., 'cg_iter': ...}`` of this update.
    """
    xp = B.namespace(weight)
    one = xp.ones((1, 1, 1), dtype=weight.dtype, device=B.device(weight))
    L = one
    for j in range(k):
        L = left_interface_step(L, cores[j])
    R = one
    for j in range(len(cores) - 1, k, -1):
        R = right_interface_step(cores[j], R)
    opts = {"method": method, "dense_max": dense_max, "rtol": rtol, "maxiter": maxiter,
            "precond": precond, "psd_rtol": zero_rtol("float64") if psd_rtol is None else psd_rtol}
    stats = {"dense": 0, "cg": 0, "cg_iter": 0}
    WS = None if sigma is None else weight @ sigma
    return _update_core(k, list(cores), L, R, weight, WS, sigma, opts, stats), stats


#: Extrapolation step of the first try, and its growth / shrink factors after a success /
#: failure; ``beta`` stays within ``[EXTRAP_MIN, EXTRAP_MAX]``.
EXTRAP_BETA0 = 1.0
EXTRAP_GROW = 1.5
EXTRAP_SHRINK = 0.7
EXTRAP_MIN = 0.05
EXTRAP_MAX = 30.0


def _left_orthogonal(cores):
    cores = list(cores)
    for k in range(len(cores) - 1):
        left_orthogonalize_one(cores, k)
    return cores


def _aligned(new, old):
    """``new`` in the gauge closest to ``old``; both must be left-orthogonal (cores ``0..D-2``).

    Bond ``k`` is rotated by the orthogonal ``Q`` that minimises
    ``||U_new Q - U_old||_F`` over the left interfaces (the polar factor of
    ``U_new^T U_old``, computed core by core, never forming ``U``). The
    product of the cores is unchanged.
    """
    xp = B.namespace(new[0])
    new = list(new)
    P = None
    for k in range(len(new) - 1):
        if P is None:
            P = B.einsum("amnb,amnd->bd", new[k], old[k])
        else:
            P = B.einsum("amnb,ac,cmnd->bd", new[k], P, old[k])
        U, _, Vh = B.svd(P)
        Q = U @ Vh
        new[k] = B.einsum("amnb,bd->amnd", new[k], Q)
        new[k + 1] = B.einsum("bd,bmnc->dmnc", Q, new[k + 1])
        P = xp.permute_dims(Q, (1, 0)) @ P  # = (U_new Q)^T U_old
    return new


def als_sweeps(W, S, cores, *, n_iter_max, tol, opts, on_point=None, extrapolate=False):
    """TT-ALS sweeps from ``cores`` on the float64 ``W`` (T, N) in the metric ``S`` (or None).

    ``on_point(cores, errors, n_iter, converged)`` is called at the starting
    point and after every sweep; a ``True`` return stops the run. Returns
    ``(cores, errors, n_iter, converged, stats)``; ``converged`` is True when
    the ``tol`` rule held or a sweep was rejected (False with ``n_iter_max == 0``).
    ``extrapolate``: try the guarded extrapolation step after every sweep
    (module docstring); ``stats['extrapolated']`` counts the accepted steps.
    """
    xp = B.namespace(W)
    cores = list(cores)
    total = _sq_err(W, 0.0 * W, S)

    def rel(sq):
        return relative_error(sq, total)

    errors = [rel(_sq_err(W, tt_matrix(cores), S))]
    D = len(cores)
    WS = None if S is None else W @ S
    stats = {"dense": 0, "cg": 0, "cg_iter": 0}
    if extrapolate:
        stats["extrapolated"] = 0
        beta = EXTRAP_BETA0
        old = _left_orthogonal(cores)
    converged = False  # only the tol rule sets it (the contract); no sweep, no convergence
    n_iter = 0
    if on_point is not None and wants_stop(on_point(cores, errors, 0, converged)):
        return cores, errors, 0, converged, stats
    one = xp.ones((1, 1, 1), dtype=W.dtype, device=B.device(W))
    for it in range(1, n_iter_max + 1):
        before = cores
        cores = right_orthogonalize(cores)
        rights = [None] * D
        rights[D - 1] = one
        for k in range(D - 1, 0, -1):
            rights[k - 1] = right_interface_step(cores[k], rights[k])
        L = one
        for k in range(D):
            cores[k] = _update_core(k, cores, L, rights[k], W, WS, S, opts, stats)
            if k < D - 1:
                left_orthogonalize_one(cores, k)
                L = left_interface_step(L, cores[k])
        n_iter = it
        retune()  # long runs follow the cores that free up or fill
        errors.append(rel(_sq_err(W, tt_matrix(cores), S)))
        if errors[-1] > errors[-2]:
            # every update is an exact minimiser, so only the eigenvalue floor of the
            # singular solves (or CG rounding) can make a sweep worse: reject it; the
            # next sweep would repeat it from the same point, so the run ends here
            cores, errors[-1] = before, errors[-2]
            converged = True
            if on_point is not None:
                on_point(cores, errors, n_iter, converged)
            break
        if extrapolate:
            aligned = _aligned(cores, old)  # cores are left-orthogonal after a sweep
            trial = [c + beta * (c - o) for c, o in zip(aligned, old)]
            e_try = rel(_sq_err(W, tt_matrix(trial), S))
            if e_try < errors[-1]:
                cores, errors[-1] = _left_orthogonal(trial), e_try
                stats["extrapolated"] += 1
                beta = min(beta * EXTRAP_GROW, EXTRAP_MAX)
            else:
                beta = max(beta * EXTRAP_SHRINK, EXTRAP_MIN)
            old = cores
        converged = tol_reached(errors[-2], errors[-1], tol)
        stop = on_point is not None and wants_stop(on_point(cores, errors, n_iter, converged))
        if converged or stop:
            break
    return cores, errors, n_iter, converged, stats
