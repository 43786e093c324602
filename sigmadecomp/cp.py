# One concept, CP decomposition (Frobenius and Sigma CP-ALS: the two engines, the
# preconditioner of the B-update, the public function); longer than ~600 lines for it.
"""CP decomposition of conv kernels: CP-ALS (Frobenius) and CP-ALS-Sigma.

A kernel ``K`` of shape ``(T, S, H, W)`` is approximated by ``R`` rank-one terms,

    K ~= sum_r w_r a_r (x) b_r (x) c_r (x) d_r,     K~_(1) = A diag(w) Z^T,

with ``Z = khatri_rao([B, C, D])`` of shape ``(n, R)``, ``n = S*H*W``. In a
network this is a 1x1 conv (S -> R), an Hx1 and a 1xW depthwise conv and a
1x1 conv (R -> T).

``sigma=None`` minimises the Frobenius error (classical CP-ALS).
With a second-moment matrix ``Sigma`` of shape ``(n, n)`` the objective is
``tr((K_(1) - K~_(1)) Sigma (K_(1) - K~_(1))^T)``, the expected squared change
of the layer output (Kalle et al., NeurIPS 2025). Each block update minimises
that objective over one factor (the scale ``w`` absorbed into it):

* output mode ``A``: closed form ``A = K Sigma Z (Z^T Sigma Z)^+`` (exact);
* spatial modes ``C`` and ``D``: small dense normal systems (``H*R`` and
  ``W*R`` unknowns) built from ``Sigma`` contracted twice with ``B`` (exact);
* input-channel mode ``B``: ``S*R`` unknowns, solved matrix-free by
  preconditioned conjugate gradients warm-started at the current ``B`` (each
  iteration one ``n x n x R`` product) until CG's estimate of the block
  objective's excess over its minimum is at most ``BLOCK_EXCESS_RTOL = 1e-8``
  of the objective (default), or until the relative residual of its normal
  equations is at most ``inner.rtol`` when that is given (see :func:`cp`).
  ``inner.maxiter`` caps the
  iterations for cheap, inexact sweeps (a fixed cap, or ``'adaptive'``: a
  cap that starts at a few iterations and doubles whenever the outer
  progress stalls). CG from the current factor never increases the
  quadratic, whatever the number of iterations.

Singular Sigma: minimum-norm solves (pseudo-inverses under an eigenvalue
floor) for A, C and D, and a B correction that stays in the range of the CG
preconditioner (pseudo-inverse blocks), so directions that Sigma does not
see are never amplified.
The reported errors are checked against cancellation (see :func:`cp`), and a
sweep that would increase the objective through rounding is rejected, so the
history is monotone.
"""

from __future__ import annotations

import time

import numpy as np

from . import _backend as B
from ._threads import retune, solver_threads
from ._validation import (
    CHOL_PIVOT,
    EXPANSION_CANCEL,
    ZERO_RTOL,
    check_array,
    check_finite,
    check_flag,
    check_int,
    check_magnitude,
    check_nonempty,
    check_positive_float,
    check_sigma,
)
from .contract import (
    INIT_NAMES,
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
from .results import CPResult
from .sigma import (DEFAULT_RIDGE, _fitted_sigma, _ridge_result_fields, check_ridge,
                    psd_solve, solver_rtol)
from .solvers import pcg
from .tucker2 import CG_FLOAT32_RTOL

__all__ = ["cp"]

#: Defaults of ``n_iter_max`` and ``tol`` (``None`` for either means its default).
N_ITER_MAX = 100
TOL = 1e-6
#: Sweeps of Frobenius CP-ALS (from the ``'svd'`` start) behind ``init='frobenius'``.
FROBENIUS_INIT_SWEEPS = 25

#: Default stopping rule of the B-update (``inner.rtol`` left at None): CG stops
#: once its estimate of how far the block objective still is above its minimum
#: (the energy-norm error of the CG iterate, see :mod:`sigmadecomp.solvers`) is
#: at most ``BLOCK_EXCESS_RTOL`` times the current objective, so every B-update is
#: an exact block minimiser to 1e-8 of the objective (notes/cp_exact.md).
BLOCK_EXCESS_RTOL = 1e-8
#: CG terms summed by that estimate (``delay`` of :func:`sigmadecomp.solvers.pcg`).
BLOCK_EXCESS_DELAY = 5
#: The default rule also stops once the relative residual of the normal equations
#: is at most this (tighter than the residual rule ``inner.rtol = 1e-8`` that was
#: the default before): a B-block already solved to rounding, e.g. at an exact
#: fit where the objective itself is rounding, is left alone instead of letting
#: CG amplify noise.
BLOCK_RESIDUAL_RTOL = 1e-10
# an excess below this fraction of tr(K Sigma K^T) is below the rounding of the
# objective itself (float64 machine epsilon): the excess rule never asks for less
_OBJECTIVE_FLOOR = float(np.finfo(np.float64).eps)
#: With ``inner.maxiter='adaptive'`` the CG cap of a B-update starts here and
#: doubles whenever the outer progress stalls, up to ``INNER_MAXITER_LIMIT``.
INNER_MAXITER_START = 5
#: Cap on the CG iterations of an exact B-update (``inner.maxiter=None``), a
#: safeguard only: the solve stops at ``inner.rtol`` long before.
INNER_MAXITER_LIMIT = 5000
_PRECOND_REFRESH = 5  # sweeps between rebuilds of the preconditioner's S x S blocks
#: The preconditioner's S x S blocks are built and factorised this many bytes of
#: float64 blocks at a time (a chunk of components), so its set-up never holds all
#: R blocks twice.
PRECOND_CHUNK_BYTES = 64 * 2**20
#: When the R inverse factors of the preconditioner would take more than this many
#: bytes in float64 (R * S * S * 8; 1.6 GB for S=512, R=763), the Cholesky ones are
#: stored and applied in float32: a preconditioner need not be exact (CG measures
#: its residuals with the float64 operator). Pseudo-inverse factors of singular
#: blocks keep float64, so the range of the preconditioner stays exact.
PRECOND_FLOAT32_BYTES = 256 * 2**20
# eigenvalues <= this * largest count as zero in the preconditioner: the zero floor
# of the float64 algebra
_PINV_RTOL = ZERO_RTOL["float64"]
_CANCEL = EXPANSION_CANCEL  # named and explained in sigmadecomp._validation
#: Defaults of ``inner`` (:class:`sigmadecomp.InnerSolver`) for the B-update: CG
#: (always preconditioned) until the block objective is exact to
#: ``BLOCK_EXCESS_RTOL`` (``rtol=None``; a number is the residual rule instead);
#: ``maxiter=None`` is exact (no cap but ``INNER_MAXITER_LIMIT``),
#: ``maxiter='adaptive'`` the doubling cap.
INNER_DEFAULTS = {"method": "cg", "rtol": None, "maxiter": None, "dense_max": None,
                  "precond": None}
_RENAMED = {"inner_rtol": ("rtol", same), "inner_maxiter": ("maxiter", same)}


# ----------------------------------------------------------------------------
# small helpers (float64 arrays of one library)
# ----------------------------------------------------------------------------

def _normalize(X):
    """Unit columns of ``X`` and their norms (a zero column stays zero, norm 0)."""
    xp = B.namespace(X)
    norms = xp.sqrt(xp.sum(X * X, axis=0))
    safe = xp.where(norms == 0, 1.0, norms)
    return X / safe[None, :], norms


def _pair(C, D):
    """``CD[(h, w), r] = C[h, r] D[w, r]`` of shape (H*W, R)."""
    xp = B.namespace(C)
    return xp.reshape(C[:, None, :] * D[None, :, :], (-1, C.shape[1]))


def _solve_spd(V, rhs, l2_reg, rtol=_PINV_RTOL):
    """Exact minimiser ``X`` of ``tr(X V X^T) - 2 tr(rhs X^T) + l2 ||X||^2`` (rows of X)."""
    xp = B.namespace(V)
    if l2_reg:
        V = V + l2_reg * xp.eye(V.shape[0], dtype=V.dtype, device=B.device(V))
    return psd_solve(V, rhs.T, rtol=rtol).T


def _guarded(norm2, cross, quad, residual):
    """``norm2 - 2 cross + quad``, or ``residual()`` when that shortcut cancels.

    The shortcut carries a rounding error of about ``eps * (norm2 + 2|cross| +
    quad)``; when its value is within ``_CANCEL`` of that scale (a nearly exact
    fit, or large terms that cancel) the objective is recomputed from the
    residual ``K_(1) - A diag(w) Z^T``, whose rounding error is proportional
    to the residual itself.
    """
    f = norm2 - 2.0 * cross + quad
    if f <= _CANCEL * (norm2 + 2.0 * abs(cross) + abs(quad)):
        return residual()
    return f


_rel = relative_error


# ----------------------------------------------------------------------------
# the two ALS engines
# ----------------------------------------------------------------------------

class _ALSBase:
    """Shared state: unit-column factors ``A, B, C, D`` and weights ``w``.

    A block update for mode ``k`` solves for ``F_k diag(w)`` with the other three
    factors fixed (unit columns), then splits it again into unit columns and
    ``w``. ``objective()`` is ``tr(D Sigma D^T)`` (``Sigma = I`` for Frobenius).
    ``rtol`` is the eigenvalue floor of the dense solves (the ``rtol`` of
    :func:`cp`).
    """

    rtol = _PINV_RTOL

    def __init__(self, K, weights, factors, l2_reg):
        self.K = K
        self.T, self.S, self.H, self.W = K.shape
        self.n = self.S * self.H * self.W
        self.P = self.H * self.W
        self.K1 = B.namespace(K).reshape(K, (self.T, self.n))
        self.l2 = l2_reg
        self.set_point(weights, factors)

    # state -----------------------------------------------------------------
    def set_point(self, weights, factors):
        self.w = weights
        self.F = list(factors)
        for k in range(4):
            self.F[k], norms = _normalize(self.F[k])
            self.w = self.w * norms
        self._invalidate()

    def _invalidate(self):
        self._cache = None  # product of the operator with Z for the current B, C, D

    def point(self):
        return self.w, list(self.F)

    def Z(self):
        xp = B.namespace(self.w)
        _, Bf, C, D = self.F
        return xp.reshape(Bf[:, None, :] * _pair(C, D)[None, :, :], (self.n, -1))

    def sweep(self):
        """One ALS sweep (modes A, B, C, D); returns the objective at its end."""
        self.update_A()
        self.update_B()
        self.update_C()
        return self.update_D()


class _FrobeniusALS(_ALSBase):
    """Classical CP-ALS: normal equations with Hadamard products of Gram matrices.

    The MTTKRPs reuse ``P = K_(1)^T A`` (n x R) for modes B, C and D, so a sweep
    costs two ``T x n x R`` products and no Khatri-Rao product larger than
    ``n x R``.
    """

    def __init__(self, K, weights, factors, l2_reg):
        super().__init__(K, weights, factors, l2_reg)
        xp = B.namespace(K)
        self.norm2 = float(xp.sum(self.K1 * self.K1))

    def _grams(self):
        return [F.T @ F for F in self.F]

    def objective(self):
        xp = B.namespace(self.w)
        if self._cache is None:
            self._cache = self.K1 @ self.Z()
        Aw = self.F[0] * self.w[None, :]
        cross = float(xp.sum(self._cache * Aw))
        G = self._grams()
        quad = float(xp.sum((Aw.T @ Aw) * G[1] * G[2] * G[3]))
        return _guarded(self.norm2, cross, quad, self.residual_objective)

    def residual_objective(self):
        """``||K_(1) - A diag(w) Z^T||_F^2`` from the residual (one ``T x n x R`` product)."""
        xp = B.namespace(self.w)
        Dm = self.K1 - (self.F[0] * self.w[None, :]) @ self.Z().T
        return float(xp.sum(Dm * Dm))

    def update_A(self):
        if self._cache is None:
            self._cache = self.K1 @ self.Z()
        G = self._grams()
        X = _solve_spd(G[1] * G[2] * G[3], self._cache, self.l2, self.rtol)
        self.F[0], self.w = _normalize(X)
        xp = B.namespace(X)
        self._P = xp.reshape(self.K1.T @ self.F[0], (self.S, self.H, self.W, -1))

    def _mttkrp(self, mode):
        xp = B.namespace(self.w)
        _, Bf, C, D = self.F
        P = self._P
        if mode == 1:
            return xp.sum(xp.reshape(P, (self.S, self.P, -1)) * _pair(C, D)[None], axis=1)
        if mode == 2:
            Pb = xp.sum(P * Bf[:, None, None, :], axis=0)  # (H, W, R)
            return xp.sum(Pb * D[None, :, :], axis=1)
        Pb = xp.sum(P * Bf[:, None, None, :], axis=0)
        return xp.sum(Pb * C[:, None, :], axis=0)

    def _update(self, mode):
        G = self._grams()
        V = G[0]
        for j in (1, 2, 3):
            if j != mode:
                V = V * G[j]
        M = self._mttkrp(mode)
        X = _solve_spd(V, M, self.l2, self.rtol)
        self._invalidate()
        return X, M, V

    def update_B(self):
        X, _, _ = self._update(1)
        self.F[1], self.w = _normalize(X)

    def update_C(self):
        X, _, _ = self._update(2)
        self.F[2], self.w = _normalize(X)

    def update_D(self):
        xp = B.namespace(self.w)
        X, M, V = self._update(3)
        self.F[3], self.w = _normalize(X)
        return _guarded(self.norm2, float(xp.sum(M * X)), float(xp.sum((X.T @ X) * V)),
                        self.residual_objective)


class _SigmaALS(_ALSBase):
    """CP-ALS in the Sigma-norm with exact block minimisers (design notes, section 4).

    Cached product per sweep: ``Y = B^T Sigma`` (R, P, n), one ``n x n x R``
    product after the B-update; from it the C- and D-normal matrices (one
    ``R*L*L x S*L' x R`` GEMM each, see ``_normal_spatial``), the next
    ``Sigma Z`` and the A-update come at a fraction of that cost. The
    B-update runs PCG (each iteration one ``n x n x R`` product) warm-started
    at the current B until its stopping rule holds (``inner_rtol=None``: the
    excess rule, see ``_excess_rule``; a number: the relative residual of the
    normal equations) or ``inner_maxiter`` iterations ran (``last_exact``
    tells which), preconditioned by the diagonal blocks (one ``S x S``
    Cholesky per component, or a pseudo-inverse root when a block is
    singular, built in chunks of components with one ``n x n x R``-sized
    product every few sweeps, see ``_block_inverse_factors``) coupled through
    an R x R correlation (see ``_coupled_preconditioner``; exact when
    ``Sigma = I``).
    """

    def __init__(self, K, weights, factors, l2_reg, sigma, *, inner_rtol=None,
                 inner_maxiter=INNER_MAXITER_LIMIT):
        self.Sg = sigma
        self.inner_rtol, self.inner_maxiter = inner_rtol, inner_maxiter
        self.last_exact = False  # did the last B-update meet its stopping rule?
        self.cg_iters = []  # CG iterations of every B-update
        self.cg_residuals = []  # final relative residual of every B-update
        self._pc_age, self._Linv = 0, None
        xp = B.namespace(sigma)
        T, S, H, W = K.shape
        P = H * W
        # partial trace over channels, (P, P) (a view of Sigma summed: no n x n copy)
        S4 = xp.permute_dims(xp.reshape(sigma, (S, P, S, P)), (1, 3, 0, 2))
        self._Sig_P = xp.sum(xp.linalg.diagonal(S4), axis=-1)
        self._Y = None  # cache of the B-update, rebuilt by each one
        # inner.rtol >= CG_FLOAT32_RTOL (the rule of tucker2's CG): the CG operator
        # multiplies by a float32 copy of Sigma, its rounding (~1e-6 relative) far
        # below the requested residual; residuals, right-hand side and start stay float64
        loose = inner_rtol is not None and inner_rtol >= CG_FLOAT32_RTOL
        self._Sig_lo = xp.astype(sigma, xp.float32) if loose else None
        super().__init__(K, weights, factors, l2_reg)
        self.SK = sigma @ self.K1.T  # (n, T), once
        self.norm2 = float(xp.sum(self.K1.T * self.SK))

    def _SZ(self):
        if self._cache is None:
            self._cache = self.Sg @ self.Z()
        return self._cache

    def objective(self):
        xp = B.namespace(self.w)
        Z = self.Z()
        SZ = self._SZ()
        Aw = self.F[0] * self.w[None, :]
        cross = float(xp.sum((self.SK.T @ Z) * Aw))
        quad = float(xp.sum((Aw.T @ Aw) * (Z.T @ SZ)))
        return _guarded(self.norm2, cross, quad, self.residual_objective)

    def residual_objective(self):
        """``tr(D Sigma D^T)`` from ``D = K_(1) - A diag(w) Z^T`` and the cached ``Sigma Z``.

        ``Sigma D^T = Sigma K^T - (Sigma Z) diag(w) A^T``: two ``T x n x R``
        products, no ``n x n`` one.
        """
        xp = B.namespace(self.w)
        Aw = self.F[0] * self.w[None, :]
        Dm = self.K1 - Aw @ self.Z().T
        SD = self.SK - self._SZ() @ Aw.T
        return float(xp.sum(Dm.T * SD))

    def update_A(self):
        Z = self.Z()
        SZ = self._SZ()
        X = _solve_spd(Z.T @ SZ, self.SK.T @ Z, self.l2, self.rtol)
        self.F[0], self.w = _normalize(X)
        self._Q = self.SK @ self.F[0]  # Sigma K^T A, (n, R): right-hand sides of B, C, D

    # B: matrix-free normal operator ------------------------------------------
    def _B_operator(self):
        xp = B.namespace(self.w)
        A, _, C, D = self.F
        S, P, n = self.S, self.P, self.n
        G = A.T @ A
        CD = _pair(C, D)
        l2 = self.l2

        def from_SZ(SZ, X):
            out = xp.sum(xp.reshape(SZ @ G, (S, P, -1)) * CD[None], axis=1)
            return out + l2 * X if l2 else out

        Sg_lo = self._Sig_lo

        def apply(X):
            Zx = xp.reshape(X[:, None, :] * CD[None, :, :], (n, -1))
            if Sg_lo is not None:
                return from_SZ(xp.astype(Sg_lo @ xp.astype(Zx, xp.float32), X.dtype), X)
            return from_SZ(self.Sg @ Zx, X)

        # the S x S blocks are refreshed every _PRECOND_REFRESH sweeps (any SPD
        # preconditioner keeps CG monotone); the R x R coupling every sweep
        if self._pc_age % _PRECOND_REFRESH == 0:
            self._Linv = None  # free the old factors before building the new ones
            self._Linv = _block_inverse_factors(self.Sg, CD, xp.linalg.diagonal(G), l2, S)
        self._pc_age += 1
        precond = None if self._Linv is None else _coupled_preconditioner(
            self._Linv, self._Sig_P, CD, G)
        rhs = xp.sum(xp.reshape(self._Q, (S, P, -1)) * CD[None], axis=1)
        return apply, from_SZ, precond, rhs

    def update_B(self):
        self._Y = None  # rebuilt below; not held during the preconditioner set-up
        apply, from_SZ, precond, rhs = self._B_operator()
        x0 = self.F[1] * self.w[None, :]
        # H(x0) from the cached Sigma Z (Z(x0) = Z diag(w)): no extra product
        r0 = rhs - from_SZ(self._SZ() * self.w[None, :], x0)
        xp = B.namespace(rhs)
        bnorm = float(xp.sqrt(xp.sum(rhs * rhs)))
        rnorm = float(xp.sqrt(xp.sum(r0 * r0)))
        if self.inner_rtol is None:
            # default: the block objective is f(x) = <x, H x> - 2 <rhs, x> + const
            # (+ l2 ||x||^2), so f(x_k) - min f = ||x_k - x*||_H^2, which pcg
            # estimates from its terms; f(x_k) = f(x0) - (sum of the terms so far)
            rtol = BLOCK_RESIDUAL_RTOL * bnorm / rnorm if rnorm > 0 else 1.0
            stop = self._excess_rule(self.objective())
        else:
            # ||rhs - H(x0 + E)|| <= inner_rtol * ||rhs|| (pcg measures against ||r0||)
            rtol = self.inner_rtol * bnorm / rnorm if rnorm > 0 else 1.0
            stop = None
        E, info = pcg(apply, r0, None, rtol=rtol, maxiter=self.inner_maxiter, precond=precond,
                      energy_stop=stop, delay=BLOCK_EXCESS_DELAY)
        self.cg_iters.append(info.n_iter)
        self.cg_residuals.append(info.residual * rnorm / bnorm if bnorm > 0 else 0.0)
        # exact to inner_rtol, or CG broke down (nothing left to solve in its range)
        self.last_exact = bool(info.converged) or info.n_iter < self.inner_maxiter
        self.F[1], self.w = _normalize(x0 + E)
        self._invalidate()
        self._after_B()

    def _excess_rule(self, f0):
        """``energy_stop`` for :func:`pcg`: the estimated excess of the block objective
        over its minimum is at most ``BLOCK_EXCESS_RTOL`` times the current objective
        (``f0`` minus the decrease so far), or below the objective's rounding
        ``_OBJECTIVE_FLOOR * tr(K Sigma K^T)``."""
        floor = _OBJECTIVE_FLOOR * self.norm2

        def stop(estimate, decrease):
            return estimate <= max(BLOCK_EXCESS_RTOL * (f0 - decrease), floor)

        return stop

    def _after_B(self):
        xp = B.namespace(self.w)
        S, P, n = self.S, self.P, self.n
        Bf = self.F[1]
        self._Y = xp.reshape(Bf.T @ xp.reshape(self.Sg, (S, P * n)), (Bf.shape[1], P, n))

    # C and D: dense normal systems from Y -------------------------------------
    def _normal_spatial(self, mode):
        """Normal matrix of mode 2 (C) or 3 (D), ``(L*R, L*R)``, and its right-hand side.

        For C: ``N[(h,r),(k,q)] = G[r,q] sum_{w,v} D[w,r] D[v,q] sum_{s'}
        Y[r,(h,w),(s',k,v)] B[s',q]``: ``Y`` contracted with the other spatial
        factor's column ``r`` (R x P x n work), then one
        ``(R*L*L, S*L') @ (S*L', R)`` GEMM with ``B (x) D``; D likewise.
        """
        xp = B.namespace(self.w)
        A, Bf, C, D = self.F
        G = A.T @ A
        S, H, W, R = self.S, self.H, self.W, Bf.shape[1]
        Y = xp.reshape(self._Y, (R, H, W, self.n))
        Qb = xp.sum(xp.reshape(self._Q, (S, H, W, R)) * Bf[:, None, None, :], axis=0)
        if mode == 2:  # keep h (rows) and k (columns of Sigma); sum w with D[:, r]
            L, O, other = H, W, D
            Yo = (xp.permute_dims(D, (1, 0))[:, None, None, :] @ Y)[:, :, 0, :]  # (R, H, n)
            Yo = xp.permute_dims(xp.reshape(Yo, (R, H, S, H, W)), (0, 1, 3, 2, 4))
            rhs = xp.sum(Qb * D[None, :, :], axis=1)
        else:  # keep w and v; sum h with C[:, r]
            L, O, other = W, H, C
            Yo = xp.reshape(xp.permute_dims(C, (1, 0))[:, None, :]
                            @ xp.reshape(Y, (R, H, W * self.n)), (R, W, S, H, W))
            Yo = xp.permute_dims(Yo, (0, 1, 4, 2, 3))
            rhs = xp.sum(Qb * C[:, None, :], axis=0)
        Bo = xp.reshape(Bf[:, None, :] * other[None, :, :], (S * O, R))  # B (x) other
        M = xp.reshape(xp.reshape(Yo, (R * L * L, S * O)) @ Bo, (R, L, L, R))
        N = xp.permute_dims(M * G[:, None, None, :], (1, 0, 2, 3))
        return xp.reshape(N, (L * R, L * R)), rhs

    def _normal_C(self):
        return self._normal_spatial(2)

    def _normal_D(self):
        return self._normal_spatial(3)

    def _solve_dense(self, N, rhs):
        xp = B.namespace(N)
        if self.l2:
            N = N + self.l2 * xp.eye(N.shape[0], dtype=N.dtype, device=B.device(N))
        x = psd_solve(N, xp.reshape(rhs, (-1,)), rtol=self.rtol)
        return xp.reshape(x, rhs.shape)

    def update_C(self):
        N, rhs = self._normal_C()
        X = self._solve_dense(N, rhs)
        self.F[2], self.w = _normalize(X)
        self._invalidate()

    def update_D(self):
        xp = B.namespace(self.w)
        N, rhs = self._normal_D()
        X = self._solve_dense(N, rhs)
        x = xp.reshape(X, (-1,))
        self.F[3], self.w = _normalize(X)
        # Sigma Z for the new C, D from Y (B unchanged): (Sigma Z)[m, q] = sum_p Y[q,p,m] CD[p,q]
        CD = _pair(self.F[2], self.F[3])
        self._cache = xp.permute_dims((xp.permute_dims(CD, (1, 0))[:, None, :] @ self._Y)[:, 0, :],
                                      (1, 0))
        return _guarded(self.norm2, float(xp.sum(rhs * X)), float(xp.sum(x * (N @ x))),
                        self.residual_objective)


def _block_inverse_factors(sigma, CD, gdiag, l2, S, *, chunk_bytes=None, float32_bytes=None):
    """Inverse factors ``W_r`` (R, S, S) of the diagonal blocks of the B operator.

    Block ``r`` is ``M_r = G[r, r] Sigma_r + l2 I`` with
    ``Sigma_r = (I kron cd_r)^T Sigma (I kron cd_r)`` (S x S), from one GEMM
    ``Sigma_(s s'),(p p') @ (cd_r kron cd_r)``. ``W_r^T W_r`` is ``M_r^{-1}``
    (``W_r = L_r^{-1}`` from a Cholesky factor) when ``M_r`` is numerically
    definite, and its pseudo-inverse otherwise (eigenvalues
    ``<= _PINV_RTOL * largest`` count as zero); the choice is made block by
    block. No diagonal shift: a preconditioner must not amplify the null space
    of a singular Sigma, where rounding errors of the residual live (they would
    grow into huge, unseen components of B and huge weights). Every null vector
    of ``M_r`` (a column ``x`` with ``Sigma (x kron cd_r) = 0``) is a null
    vector of the operator, so the operator's range stays inside the
    preconditioner's and CG remains exact. Returns ``None`` (no
    preconditioning) when Sigma sees none of the components.

    Memory: the blocks are built and factorised ``chunk_bytes`` of float64
    blocks at a time (plus one transient ``n x n`` copy of Sigma in the
    ``(s s'), (p p')`` layout) and written into the result, which is float32
    when its float64 size would exceed ``float32_bytes`` and every block has a
    Cholesky factor (a pseudo-inverse block makes it float64). ``None``: the
    module's ``PRECOND_CHUNK_BYTES`` and ``PRECOND_FLOAT32_BYTES``.
    """
    chunk_bytes = PRECOND_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    float32_bytes = PRECOND_FLOAT32_BYTES if float32_bytes is None else float32_bytes
    xp = B.namespace(CD)
    n, R = sigma.shape[0], CD.shape[1]
    P = n // S
    dev = B.device(CD)
    sig_ssp = xp.reshape(xp.permute_dims(xp.reshape(sigma, (S, P, S, P)), (0, 2, 1, 3)),
                         (S * S, P * P))
    step = int(max(1, min(R, chunk_bytes // (8 * S * S))))
    low = R * S * S * 8 > float32_bytes
    out = xp.empty((R, S, S), dtype=xp.float32 if low else CD.dtype, device=dev)
    eye = xp.eye(S, dtype=CD.dtype, device=dev) if l2 else None
    top = 0.0
    for r0 in range(0, R, step):
        cd = CD[:, r0:r0 + step]
        CC = xp.reshape(cd[:, None, :] * cd[None, :, :], (P * P, -1))
        blocks = xp.reshape(sig_ssp @ CC, (S, S, -1))
        blocks = xp.permute_dims(blocks, (2, 0, 1)) * gdiag[r0:r0 + step, None, None]
        blocks = 0.5 * (blocks + xp.permute_dims(blocks, (0, 2, 1)))  # symmetric blocks
        if l2:
            blocks = blocks + l2 * eye[None]
        dmax = xp.max(xp.linalg.diagonal(blocks), axis=1)
        top = max(top, float(xp.max(dmax)))
        W, pinv = _chunk_inverse_factors(blocks, dmax)
        del blocks
        if pinv and out.dtype != CD.dtype:
            out = xp.astype(out, CD.dtype)
        out[r0:r0 + step] = xp.astype(W, out.dtype)
    if not top > 0.0:
        return None
    return out


def _chunk_inverse_factors(blocks, dmax):
    """Inverse factors of a stack (c, S, S) of symmetric PSD blocks, block by block.

    ``L^{-1}`` where the Cholesky factor ``L`` exists and its smallest squared
    pivot exceeds ``CHOL_PIVOT * _PINV_RTOL * dmax`` (``dmax`` the block's
    largest diagonal entry), else the pseudo-inverse root ``diag(lam^-1/2) V^T``
    (eigenvalues ``<= _PINV_RTOL * largest`` dropped). Returns the factors and
    whether any block took the pseudo-inverse.
    """
    xp = B.namespace(blocks)
    Linv, good = _cholesky_inverses(blocks, CHOL_PIVOT * _PINV_RTOL * dmax)
    if bool(xp.all(good)):
        return Linv, False
    idx = xp.nonzero(~good)[0]
    lam, V = xp.linalg.eigh(blocks[idx])  # batched, ascending
    floor = _PINV_RTOL * xp.max(lam, axis=1, keepdims=True)
    keep = lam > floor
    inv_sqrt = xp.where(keep, 1.0 / xp.sqrt(xp.where(keep, lam, 1.0)), 0.0)
    Linv[idx] = inv_sqrt[:, :, None] * xp.permute_dims(V, (0, 2, 1))  # diag(lam^-1/2) V^T
    return Linv, True


def _cholesky_inverses(blocks, pivot_floor):
    """``L_i^{-1}`` for the blocks whose Cholesky factor exists with every squared
    pivot above ``pivot_floor[i]``, and the mask of those blocks (other factors zero)."""
    S = blocks.shape[1]
    if B.is_torch(blocks):
        import torch

        L, info = torch.linalg.cholesky_ex(blocks)
        piv = torch.diagonal(L, dim1=-2, dim2=-1)
        good = (info == 0) & torch.all(torch.isfinite(L), dim=2).all(dim=1)
        good = good & (torch.min(piv * piv, dim=1).values > pivot_floor)
        eye = torch.eye(S, dtype=L.dtype, device=L.device)
        L = torch.where(good[:, None, None], L, eye)  # no inf/nan from failed factors
        Linv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
        return torch.where(good[:, None, None], Linv, 0.0), good
    from scipy.linalg import lapack

    out = np.zeros_like(blocks)
    good = np.zeros(blocks.shape[0], dtype=bool)
    for i in range(blocks.shape[0]):
        L, info = lapack.dpotrf(blocks[i], lower=1, clean=1)
        if info != 0 or not np.all(np.isfinite(L)):
            continue
        piv = np.diagonal(L)
        if not float(np.min(piv * piv)) > float(pivot_floor[i]):
            continue
        inv, info = lapack.dtrtri(L, lower=1)
        if info == 0 and np.all(np.isfinite(inv)):
            out[i] = inv
            good[i] = True
    return out, good


def _coupled_preconditioner(Linv, sig_P, CD, G):
    """Preconditioner ``R -> M^{-1} R`` of the B normal operator.

    The operator couples components ``r`` and ``q`` through
    ``G[r, q] (I kron cd_r)^T Sigma (I kron cd_q)``. ``M`` keeps the diagonal
    blocks ``M_rr = L_r L_r^T`` (see :func:`_block_inverse_factors`) and models
    the coupling as ``M_rq = c[r, q] L_r L_q^T`` with the R x R correlation
    ``c = G * (CD^T Sigma_P CD)`` normalised to a unit diagonal (``Sigma_P`` the
    partial trace of Sigma over channels). ``M`` is SPD, and equal to the
    operator when ``Sigma = I``. ``M^{-1} = L^{-T} (c^{-1} kron I) L^{-1}``.
    """
    xp = B.namespace(CD)
    R = CD.shape[1]
    c = G * (CD.T @ sig_P @ CD)
    d = xp.sqrt(xp.abs(xp.linalg.diagonal(c)))
    d = xp.where(d > 0, d, 1.0)
    c = c / (d[:, None] * d[None, :])
    lam, V = B.eigh(0.5 * (c + c.T))
    if float(lam[-1]) > 0.0:  # pseudo-inverse: dependent components are not amplified
        keep = lam > _PINV_RTOL * float(lam[-1])
        inv = xp.where(keep, 1.0 / xp.where(keep, lam, 1.0), 0.0)
        c_inv = (V * inv[None, :]) @ V.T
    else:
        c_inv = xp.eye(R, dtype=CD.dtype, device=B.device(CD))
    LinvT = xp.permute_dims(Linv, (0, 2, 1))
    lo = Linv.dtype != CD.dtype  # float32 factors (see PRECOND_FLOAT32_BYTES)

    def down(X):
        return xp.astype(X, Linv.dtype) if lo else X

    def up(X):
        return xp.astype(X, CD.dtype) if lo else X

    def apply(Rm):
        Y = up((Linv @ down(xp.permute_dims(Rm, (1, 0)))[:, :, None])[:, :, 0])  # (R, S)
        Y = c_inv @ Y  # coupling (c_inv symmetric)
        Y = up((LinvT @ down(Y)[:, :, None])[:, :, 0])
        return xp.permute_dims(Y, (1, 0))

    return apply

# ----------------------------------------------------------------------------
# initialisation and input checks
# ----------------------------------------------------------------------------

def _svd_init(K, rank, rng):
    """Leading left singular vectors of each unfolding, random columns beyond them."""
    xp = B.namespace(K)
    factors = []
    for mode in range(4):
        M = xp.reshape(xp.moveaxis(K, mode, 0), (K.shape[mode], -1))
        U, _, Vh = B.svd(M)
        U, _ = B.svd_flip(U, Vh)
        k = min(rank, U.shape[1])
        F = U[:, :k]
        if k < rank:
            F = xp.concat([F, B.random_normal(rng, (K.shape[mode], rank - k), K)], axis=1)
        factors.append(F)
    return factors


def _random_init(K, rank, rng):
    return [B.random_normal(rng, (K.shape[m], rank), K) for m in range(4)]


def _best_scale(engine):
    """Rescale ``w`` by the scalar that minimises the objective (cheap, uses the cache)."""
    f1 = engine.objective()  # norm2 - 2 c + q at scale 1
    q = _quad_part(engine)
    c = 0.5 * (engine.norm2 + q - f1)
    if q > 0:
        engine.w = engine.w * (c / q)


def _quad_part(engine):
    xp = B.namespace(engine.w)
    Aw = engine.F[0] * engine.w[None, :]
    if isinstance(engine, _SigmaALS):
        Z = engine.Z()
        return float(xp.sum((Aw.T @ Aw) * (Z.T @ engine._SZ())))
    G = engine._grams()
    return float(xp.sum((Aw.T @ Aw) * G[1] * G[2] * G[3]))


def _user_init(init, K, rank):
    if isinstance(init, CPResult):
        weights, factors = init.weights, init.factors
    else:
        try:
            weights, factors = init
        except (TypeError, ValueError):
            raise TypeError(
                f"init of type {type(init).__name__} is not allowed; init must be one of "
                f"{', '.join(repr(c) for c in INIT_NAMES)}, None, a CPResult or a tuple "
                "(weights, factors)"
            ) from None
    factors = list(factors)
    if len(factors) != 4:
        raise ValueError(
            f"init has {len(factors)} factors; a CP of a 4-D kernel needs 4 factors "
            "[(T, R), (S, R), (H, R), (W, R)]"
        )
    check_array(weights, "init weights", ndim=1)
    if tuple(weights.shape) != (rank,):
        raise ValueError(
            f"init weights have shape {tuple(weights.shape)}; they must be ({rank},) "
            f"for rank={rank}"
        )
    out = []
    for k, F in enumerate(factors):
        check_array(F, f"init factors[{k}]", ndim=2)
        want = (K.shape[k], rank)
        if tuple(F.shape) != want:
            raise ValueError(
                f"init factors[{k}] has shape {tuple(F.shape)}; it must be {want} for a "
                f"kernel of shape {tuple(K.shape)} and rank={rank}"
            )
        check_finite(F, f"init factors[{k}]")
        out.append(B.asarray_like(F, K))  # a converted copy: never mutate the input
    check_finite(weights, "init weights")
    return B.asarray_like(weights, K), out


def _sign_fix(w, factors):
    """Deterministic signs: the largest-magnitude entry of each column of B, C, D is positive."""
    xp = B.namespace(w)
    factors = list(factors)
    for k in (1, 2, 3):
        F = factors[k]
        idx = xp.argmax(xp.abs(F), axis=0)
        picked = xp.take_along_axis(F, idx[None, :], axis=0)[0]
        sgn = xp.where(picked < 0, -1.0, 1.0)
        factors[k] = F * sgn[None, :]
        factors[0] = factors[0] * sgn[None, :]
    return w, factors


def _result(engine, errors, n_iter, converged, weighted, seconds, like, ridge=0.0,
            projected=False):
    """The current point as a :class:`CPResult`; with ``sigma``, ``ridge`` is the one in
    use and ``sigma_error`` is ``errors[-1]`` when it is 0 (the final result replaces it
    by the error in the user's ``sigma`` otherwise)."""
    xp = B.namespace(like)
    w, F = _sign_fix(*engine.point())
    return CPResult(
        ridge=ridge if weighted else 0.0,
        sigma_error=errors[-1] if weighted and not ridge and not projected else None,
        errors=list(errors),
        n_iter=n_iter,
        converged=converged,
        weighted=weighted,
        seconds=seconds,
        weights=xp.astype(w, like.dtype),
        factors=[xp.astype(f, like.dtype) for f in F],
    )


# ----------------------------------------------------------------------------
# the public function
# ----------------------------------------------------------------------------

@deprecated_options("cp", _RENAMED)
@solver_threads
def cp(kernel, rank, sigma=None, *, init=None, n_iter_max=N_ITER_MAX, tol=TOL, rng=None,
       callback=None, rtol=None, ridge=DEFAULT_RIDGE, inner=None, l2_reg=0.0,
       linesearch=False):
    """CP decomposition of a conv kernel by ALS, in the Frobenius or the Sigma-norm.

    Approximates ``K`` (T, S, H, W) by ``sum_r w_r a_r (x) b_r (x) c_r (x) d_r``
    minimising ``||K_(1) - K~_(1)||_F`` (``sigma=None``, classical CP-ALS) or
    the Sigma-norm ``||(K_(1) - K~_(1)) Sigma^{1/2}||_F`` (CP-ALS-Sigma).
    Each sweep updates the factors in the order A (output channels), B (input
    channels), C (kernel rows), D (kernel columns). Frobenius CP-ALS and the
    A, C and D updates of CP-ALS-Sigma are exact block minimisers (A closed
    form, C and D small dense normal systems). The B-update of CP-ALS-Sigma
    is preconditioned CG warm-started at the current B (each iteration one
    ``n x n x R`` product). By default it runs until the B-block is exact to
    ``BLOCK_EXCESS_RTOL = 1e-8`` of the objective: the block objective is a
    quadratic whose excess over its minimum is the squared energy-norm error
    of the CG iterate, and CG stops once its estimate of that error (the
    larger of the last ``BLOCK_EXCESS_DELAY = 5`` decreases, counted only
    while they halve, and ``<r, z> / theta_min``, ``theta_min`` CG's smallest
    Ritz value; :func:`sigmadecomp.solvers.pcg`) is at most
    ``BLOCK_EXCESS_RTOL`` times the current objective (or below the
    objective's rounding, ``eps * tr(K Sigma K^T)``), or once the relative
    residual is at most ``BLOCK_RESIDUAL_RTOL = 1e-10``. Against
    high-accuracy solves on ResNet-18 and reference-network layers at rX=3
    the block ended 4e-10 to 1e-9 of the objective above its minimum, after
    42-79 CG iterations where the residual rule ``inner.rtol = 1e-8`` (the
    previous default, exact to about 1e-13) took 68-115
    (``notes/cp_exact.md``). So by default CP-ALS-Sigma is exact ALS.
    ``inner.rtol`` set to a number replaces that rule by the residual rule
    ``||b - H(B diag(w))||_F <= inner.rtol * ||b||_F`` of the Sigma-weighted
    normal equations. ``inner.maxiter`` trades exactness for
    cheaper, inexact sweeps: an integer caps the iterations of every
    B-update, and ``'adaptive'`` starts with a cap of
    ``INNER_MAXITER_START = 5`` iterations that doubles, up to
    ``INNER_MAXITER_LIMIT = 5000``, whenever a sweep lowers the error by at
    most ``tol`` (the run then only counts as converged after a sweep whose
    B-update met its stopping rule). Inexact sweeps are cheaper (8-9x per
    sweep on 64- and 128-channel layers at rX=3, 6-7x less time to the
    same error, gaining within 0.2% as much per sweep; ``notes/cp_exact.md``)
    but follow another path than exact ALS: from identical starts,
    25 sweeps with a cap of 5 ended more than 1e-4 (relative objective) away
    from exact ALS on 28 of 60 small random problems, 13 of them higher, by
    up to 1.3% (``notes/sweeps.md``).
    CG started at the current factor never increases the quadratic, and a
    sweep that rounding would make worse is rejected (the run then stops with
    the previous point), so ``errors`` never increases (for ``l2_reg=0``).
    The CG preconditioner keeps the ``S x S`` block of every component (a
    pseudo-inverse where Sigma makes it singular) and an R x R coupling
    between them; it is exact for ``Sigma = I``, where CP-ALS-Sigma
    reproduces CP-ALS. The options shared by every solver (``init``,
    ``n_iter_max``, ``tol``, ``rng``, ``callback``, ``rtol``, ``ridge``,
    ``inner``) follow :mod:`sigmadecomp.contract`.

    Parameters
    ----------
    kernel : array of shape (T, S, H, W)
        NumPy array or torch tensor, float32 or float64 (any device).
    rank : int
        Number of rank-one terms ``R >= 1``.
    sigma : array of shape (n, n), optional
        Symmetric PSD second moment of the layer's input patches,
        ``n = S*H*W``, indexed ``(s, h, w)`` row-major. Rank-deficient matrices
        are fine: the dense solves use :func:`sigmadecomp.sigma.psd_solve`
        (Cholesky, else the minimum-norm solution with eigenvalues
        ``<= 1e-10 * lambda_max`` treated as zero, still an exact minimiser),
        and the CG preconditioner uses pseudo-inverses under the same floor,
        so null-space directions never grow. If Sigma is not numerically
        positive definite (a Cholesky pivot test, one ``n^3/3``
        factorisation), its negative eigenvalues -- rounding, e.g. of a
        float32 second moment -- are set to zero first (the nearest PSD
        matrix, one ``n x n`` eigen-decomposition): with them the objective
        would be unbounded below. ``None``: Frobenius.
    init : {'frobenius', 'svd', 'random'}, CPResult or (weights, factors), optional
        Starting point. ``'svd'`` (default without ``sigma``): leading left
        singular vectors of each unfolding, random normal columns where the
        mode is smaller than ``rank``, scaled by the best scalar.
        ``'frobenius'`` (default with ``sigma``): the result of
        ``FROBENIUS_INIT_SWEEPS = 25`` sweeps of Frobenius CP-ALS from the
        ``'svd'`` start (cheap: a Frobenius sweep costs two ``T x n x R``
        products); since CP-ALS-Sigma is monotone, its Sigma-error is then
        never worse than that of the Frobenius CP it starts from.
        ``'random'``: standard normal factors drawn from ``rng``, best scalar.
        A user-given CP (a :class:`CPResult` or ``(weights, factors)`` with
        factors ``[(T, R), (S, R), (H, R), (W, R)]``) is copied, not modified.
    n_iter_max : int, optional
        Maximum number of sweeps (``>= 0``; default ``N_ITER_MAX = 100``, also
        for ``None``).
    tol : float, optional
        Stop after the first sweep that lowers the relative error by at most
        ``tol`` times its previous value (:mod:`sigmadecomp.contract`; with
        the adaptive inner cap, only once the B-update met ``inner.rtol``);
        ``0`` runs all ``n_iter_max`` sweeps. Default ``TOL = 1e-6`` (also for
        ``None``).
    rng : None, int or numpy.random.Generator, optional
        Randomness for ``'random'`` and for the padding columns of ``'svd'``
        (used when a mode is smaller than ``rank``). ``None`` means the fixed
        seed 0, so default runs are reproducible.
    l2_reg : float, optional
        Tikhonov term: each block update minimises
        ``objective + l2_reg * ||F diag(w)||_F^2`` over its factor. The reported
        ``errors`` are unregularised; with ``l2_reg > 0`` they need not be
        monotone (the column normalisation moves weight between factors).
    linesearch : bool, optional
        After each sweep (from the third on), try the extrapolated point
        ``F_old + s (F_new - F_old)`` with ``s = k ** (1/p)`` (``k`` the sweep,
        ``p`` starting at 3 and growing by 1 after each rejection), accepting it
        only if its error is lower, so ``errors`` stays monotone. Costs one
        ``n x n x R`` (Sigma) or ``T x n x R`` (Frobenius) product per try,
        re-used by the next sweep when accepted.
    callback : callable, optional
        ``callback(result)`` with a :class:`CPResult` of the current iterate
        (``errors`` so far) at the starting point and after every sweep.
        Returning ``True`` stops the run (``converged`` is then True only if
        the ``tol`` rule held on that sweep).
    rtol : float, optional
        Eigenvalue floor, relative to the largest eigenvalue, of the dense
        solves (A, C, D; :func:`sigmadecomp.sigma.psd_solve`). Default: the
        rule shared by every solver (:func:`sigmadecomp.sigma.solver_rtol`),
        ``1e-10`` for a float64 ``sigma`` (and without ``sigma``), ``1e-6``
        for a float32 one.
    inner : InnerSolver or dict, optional
        The B-update of CP-ALS-Sigma (:class:`sigmadecomp.InnerSolver`;
        ignored without ``sigma``). ``method``: 'auto' or 'cg' (the same:
        preconditioned CG; 'direct' is not available, and ``dense_max`` has no
        effect). ``rtol``: ``None``
        (default) is the excess rule above (exact to ``BLOCK_EXCESS_RTOL =
        1e-8`` of the objective); a number is the relative residual of its
        Sigma-weighted normal equations instead (``0`` runs every B-update to
        its iteration cap). With ``rtol >= CG_FLOAT32_RTOL = 1e-4`` (the rule of
        :func:`sigmadecomp.tucker2`) the CG operator multiplies by a float32
        copy of Sigma (rounding about 1e-6 relative, far below ``rtol``);
        everything else, and every reported error, stays float64.
        ``maxiter``: ``None`` (default) has no cap but the safeguard
        ``INNER_MAXITER_LIMIT = 5000``, so every B-update meets its
        stopping rule (exact ALS); an integer is a fixed cap (cheap, inexact
        sweeps that are still monotone but may stop at a worse point);
        ``'adaptive'`` is the cap schedule described above.
        ``precond=False`` is refused (always preconditioned).
        The old keywords ``inner_rtol`` and ``inner_maxiter`` still work with
        a ``DeprecationWarning``.
    ridge : float, optional
        Minimise in ``sigma + ridge * (trace(sigma) / n) * I``
        (:func:`sigmadecomp.sigma.ridge_sigma`) instead of ``sigma``, so that
        directions ``sigma`` never saw stay close to the kernel; default
        :data:`sigmadecomp.sigma.DEFAULT_RIDGE` (``5e-4``, ``notes/ridge.md``),
        ``0`` minimises the Sigma-error itself.
        Ignored without ``sigma``.

    Returns
    -------
    CPResult
        ``weights`` (R,), ``factors`` ``[A (T, R), B (S, R), C (H, R), D (W, R)]``
        with unit-norm columns (signs fixed: the largest-magnitude entry of
        each column of B, C, D is positive), ``errors`` (relative error in the
        metric minimised -- the Sigma-error in the ridged ``sigma``, the plain
        Sigma-error when ``ridge=0``, Frobenius when ``sigma`` is None -- per
        sweep starting with the initial point), ``sigma_error`` (the final
        relative Sigma-error in ``sigma`` itself; ``None`` in the results
        passed to ``callback`` when ``ridge > 0``), ``ridge``, ``n_iter``,
        ``converged``, ``seconds`` and
        ``to_tensor()``. Arrays follow the kernel's library, dtype and
        device; the algebra is done in float64. Each error comes from the
        cheap expansion ``tr(K Sigma K^T) - 2 c + q`` unless that is within
        ``1e-5`` of the size of its terms (a nearly exact fit, where it would
        cancel), in which case it is recomputed from the residual
        ``K_(1) - A diag(w) Z^T`` (two ``T x n x R`` products); either way it
        equals :func:`sigmadecomp.relative_sigma_error` of the float64
        iterate to about 1e-8 relative.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import cp, relative_sigma_error
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((6, 5, 3, 3))
    >>> X = rng.standard_normal((200, 45)) * np.linspace(0.2, 2.0, 45)
    >>> S = X.T @ X / 200
    >>> plain = cp(K, 4)
    >>> weighted = cp(K, 4, S, n_iter_max=30)
    >>> [f.shape for f in weighted.factors]
    [(6, 4), (5, 4), (3, 4), (3, 4)]
    >>> bool(np.all(np.diff(weighted.errors) <= 1e-12))
    True
    >>> e_plain = relative_sigma_error(K, plain.to_tensor(), S)
    >>> bool(weighted.sigma_error <= e_plain + 1e-12)
    True
    >>> abs(weighted.sigma_error - relative_sigma_error(K, weighted.to_tensor(), S)) < 1e-10
    True
    >>> again = cp(K, 4, S, n_iter_max=30)  # rng=None is a fixed seed: the same result
    >>> bool(np.array_equal(again.weights, weighted.weights))
    True
    """
    t0 = time.perf_counter()
    check_array(kernel, "kernel", ndim=4)
    check_nonempty(kernel, "kernel")
    check_finite(kernel, "kernel")
    rank = check_int(rank, "rank", low=1)
    n_iter_max = check_n_iter_max(n_iter_max, N_ITER_MAX)
    tol = check_tol(tol, TOL)
    l2_reg = check_positive_float(l2_reg, "l2_reg", allow_zero=True)
    linesearch = check_flag(linesearch, "linesearch")
    callback = check_callback(callback, "cp")
    opts = check_inner(inner, defaults=INNER_DEFAULTS, methods=("auto", "cg"), solver="cp",
                       maxiter_words=("adaptive",))
    inner_rtol, inner_maxiter = opts.rtol, opts.maxiter
    adaptive = inner_maxiter == "adaptive"
    if inner_maxiter is None:
        inner_maxiter = INNER_MAXITER_LIMIT
    rtol_given = rtol
    rtol = solver_rtol(rtol, sigma)  # the shared rule: the floor of sigma's dtype
    rng = B.check_rng(0 if rng is None else rng)  # None: a fixed seed, reproducible runs

    K = B.as_compute(kernel)
    T, S, H, W = K.shape
    n = S * H * W
    ridge = check_ridge(ridge)
    Sg_user = check_sigma(sigma, n, K)
    check_magnitude(K, "kernel", Sg_user)
    Sg, projected = _fitted_sigma(Sg_user, ridge)
    weighted = Sg is not None
    if not weighted:
        ridge = 0.0

    if init is None:
        init = "frobenius" if weighted else "svd"
    if isinstance(init, str):
        init = check_init_name(init, "cp")
        if init == "frobenius":
            # exactly the Frobenius CP-ALS of these options (its rtol default has no sigma)
            fro = cp(K, rank, None, init="svd", n_iter_max=FROBENIUS_INIT_SWEEPS, tol=0.0,
                     rng=rng, rtol=rtol_given, l2_reg=l2_reg, linesearch=linesearch)
            w0, F0 = fro.weights, fro.factors
        else:
            F0 = _svd_init(K, rank, rng) if init == "svd" else _random_init(K, rank, rng)
            w0 = None
    else:
        w0, F0 = _user_init(init, K, rank)

    xp = B.namespace(K)
    scale_init = w0 is None
    if scale_init:
        w0 = xp.ones((rank,), dtype=K.dtype, device=B.device(K))
    if weighted:
        engine = _SigmaALS(K, w0, F0, l2_reg, Sg, inner_rtol=inner_rtol,
                           inner_maxiter=INNER_MAXITER_START if adaptive else inner_maxiter)
    else:
        engine = _FrobeniusALS(K, w0, F0, l2_reg)
    engine.rtol = rtol
    if scale_init:
        _best_scale(engine)

    norm2 = engine.norm2
    f = engine.objective()
    errors = [_rel(f, norm2)]
    converged = False
    n_iter = 0
    power = 3.0
    stop = callback is not None and wants_stop(callback(
        _result(engine, errors, 0, False, weighted, time.perf_counter() - t0, kernel,
                ridge, projected)))
    for it in range(1, n_iter_max + 1 if not stop else 1):
        old = engine.point()
        saved_cache = engine._cache
        f_old = f
        f = engine.sweep()
        n_iter = it
        retune()  # long runs follow the cores that free up or fill
        rejected = f > f_old and not l2_reg
        if rejected:
            # rounding made the sweep (slightly) worse: keep the previous point; the
            # next sweep would repeat it, so the run stops here as converged
            engine.w, engine.F, engine._cache = old[0], list(old[1]), saved_cache
            f = f_old
        elif linesearch and it >= 3:
            f, power = _try_extrapolation(engine, old, f, it, power)
        errors.append(_rel(f, norm2))
        reached = rejected or tol_reached(errors[-2], errors[-1], tol)
        if reached and (adaptive and weighted and not engine.last_exact
                        and engine.inner_maxiter < INNER_MAXITER_LIMIT):
            # stalled on inexact B-updates: solve them more accurately and go on
            engine.inner_maxiter = min(2 * engine.inner_maxiter, INNER_MAXITER_LIMIT)
            reached = False
        if callback is not None:
            snap = _result(engine, errors, n_iter, reached, weighted,
                           time.perf_counter() - t0, kernel, ridge, projected)
            if wants_stop(callback(snap)):
                converged = reached
                break
        if reached:
            converged = True
            break
    res = _result(engine, errors, n_iter, converged, weighted, time.perf_counter() - t0, kernel)
    if weighted:
        w, F = engine.point()
        K1 = xp.reshape(K, (T, n))
        approx1 = (F[0] * w[None, :]) @ engine.Z().T
        res.ridge, res.sigma_error = _ridge_result_fields(K1, approx1, Sg_user, ridge, res.error,
                                                          projected)
    return res


def _try_extrapolation(engine, old, f_new, it, power):
    """Extrapolate along the last sweep; keep the new point only if it is better."""
    w_old, F_old = old
    w_new, F_new = engine.point()
    s = it ** (1.0 / power)
    # A carries the scale: extrapolate A diag(w) and the unit-column B, C, D
    A_old = F_old[0] * w_old[None, :]
    A_new = F_new[0] * w_new[None, :]
    trial = [A_old + s * (A_new - A_old)]
    trial += [F_old[k] + s * (F_new[k] - F_old[k]) for k in (1, 2, 3)]
    xp = B.namespace(w_new)
    saved_cache = engine._cache
    engine.set_point(xp.ones_like(w_new), trial)
    f_try = engine.objective()
    if f_try < f_new:
        return f_try, power
    engine.w, engine.F = w_new, list(F_new)
    engine._cache = saved_cache
    return f_new, power + 1.0


# ----------------------------------------------------------------------------
# internal entry point (tests and benchmarks that need single block updates)
# ----------------------------------------------------------------------------

def als_engine(kernel, weights, factors, sigma=None, *, l2_reg=0.0, inner_rtol=None,
               inner_maxiter=INNER_MAXITER_LIMIT):
    """The ALS state behind :func:`cp`, for checks of single block updates.

    Not part of the stable API: :func:`cp` is. Tests compare each block update
    with a brute-force least-squares solve and benchmarks time the B-update,
    which whole runs of :func:`cp` cannot isolate.

    Parameters
    ----------
    kernel : float64 array of shape (T, S, H, W)
    weights : array of shape (R,)
    factors : sequence of 4 arrays ``(T, R), (S, R), (H, R), (W, R)``
    sigma : float64 array of shape (n, n), optional
        The metric (no validation, no ridge); ``None`` is Frobenius CP-ALS.
    l2_reg, inner_rtol, inner_maxiter :
        As in :func:`cp` (``inner_maxiter`` fixed; default 5000).

    Returns
    -------
    engine
        With ``update_A()`` .. ``update_D()``, ``sweep()`` (returns the
        objective ``tr(D Sigma D^T)``), ``objective()``, ``point()`` ->
        ``(weights, factors)``, and for Sigma ``cg_iters`` / ``cg_residuals``
        of its B-updates.
    """
    if sigma is None:
        return _FrobeniusALS(kernel, weights, factors, l2_reg)
    return _SigmaALS(kernel, weights, factors, l2_reg, sigma, inner_rtol=inner_rtol,
                     inner_maxiter=inner_maxiter)


def try_extrapolation(engine, old, f_new, it, power):
    """The line-search step of ``cp(linesearch=True)`` on an :func:`als_engine`.

    Tries ``old + s (new - old)`` with ``s = it ** (1 / power)``; returns the
    objective and the next ``power`` (raised by one when the try is rejected,
    in which case the engine keeps its point).
    """
    return _try_extrapolation(engine, old, f_new, it, power)
