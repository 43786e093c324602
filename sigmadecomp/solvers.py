"""Matrix-free preconditioned conjugate gradients on array-valued unknowns.

The ALS updates of Tucker-2 (``U_S``) and CP (input-channel factor) are
quadratic problems whose normal operator is cheap to apply but expensive to
form. :func:`pcg` solves ``A(X) = B`` for a symmetric positive semi-definite
linear operator ``A`` acting on arrays of any shape, with the inner product
``<X, Y> = sum(X * Y)``.

Started from ``x0``, every CG iterate does not increase the quadratic
``f(X) = <X, A(X)>/2 - <B, X>`` (exact arithmetic; a preconditioner that is
symmetric positive definite keeps this), so an inexact inner solve warm-started
at the current factor keeps an ALS objective monotone.

CG also tells how far the quadratic still is from its minimum. With
``t_j = alpha_j <R_j, Z_j>`` (step length times the preconditioned residual
product of iteration ``j``), ``f(X_k) - f(X_{k+1}) = t_k / 2`` and
``||X_k - X*||_A^2 = sum_{j >= k} t_j`` (exact arithmetic; Hestenes and
Stiefel, 1952; Strakos and Tichy, 2002). The sum of the ``delay`` terms
computed after ``X_k`` is therefore a lower bound of its squared energy-norm
error that is tight when CG converges at all quickly, and
``<R_k, Z_k> / lambda_min`` (of the preconditioned operator) an upper bound;
``energy_stop`` of :func:`pcg` stops on an estimate built from both
(:func:`_energy_estimate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _backend as B

__all__ = ["pcg", "PCGInfo", "ENERGY_DELAY"]


@dataclass
class PCGInfo:
    """Outcome of :func:`pcg`.

    Attributes
    ----------
    n_iter : int
        Iterations performed (operator applications after the initial residual).
    residual : float
        Final relative residual ``||B - A(X)|| / ||B||``.
    converged : bool
        Whether the stopping rule was met: ``residual <= rtol``, or
        ``energy_stop`` returned True.
    terms : list of float
        ``t_j = alpha_j <R_j, Z_j>`` of every iteration: their sum is
        ``||X_0 - X*||_A^2 - ||X_end - X*||_A^2`` (twice the decrease of the
        quadratic ``<X, A(X)>/2 - <rhs, X>``).
    """

    n_iter: int
    residual: float
    converged: bool
    terms: list = field(default_factory=list)


def _energy_estimate(terms, delay, rz, diag, off):
    """Estimate of ``||X_k - X*||_A^2`` after CG iteration ``k`` (``k >= 2 * delay``).

    * ``rz / theta``: ``||X_k - X*||_A^2 = R_k^T A^+ R_k <= <R_k, Z_k> / lambda_min``,
      ``lambda_min`` the smallest eigenvalue of the preconditioned operator
      that the residual sees. ``theta`` is the smallest eigenvalue of the
      Lanczos tridiagonal ``T_k`` built from CG's ``alpha`` and ``beta``: it
      approaches ``lambda_min`` from above, so this is the bound itself once
      the lowest Ritz value has converged and an estimate of it before.
    * ``s``, the sum of the last ``delay`` terms: ``||X_{k-delay} - X*||_A^2 -
      ||X_k - X*||_A^2``, at least ``||X_k - X*||_A^2`` whenever those
      iterations halved the squared error. It counts only when ``s`` is at
      most half the sum of the ``delay`` terms before (CG converging
      steadily); otherwise it is ``inf``.

    The larger of the two is returned. Measured on CP-ALS-Sigma B-updates
    (real layers, ``notes/cp_exact.md``) and on badly conditioned random
    systems (tests/test_solvers.py), it was above the true error at every stop.
    """
    from scipy.linalg import eigvalsh_tridiagonal

    last = sum(terms[-delay:])
    window = last if 2.0 * last <= sum(terms[-2 * delay:-delay]) else float("inf")
    theta = float(eigvalsh_tridiagonal(np.asarray(diag), np.asarray(off), select="i",
                                       select_range=(0, 0))[0])
    ritz = rz / theta if theta > 0.0 else float("inf")
    return max(window, ritz)


def _dot(a, b):
    xp = B.namespace(a)
    return float(xp.sum(a * b))


#: Default number of CG terms summed by the energy-norm error estimate of
#: :func:`pcg` (``energy_stop``).
ENERGY_DELAY = 5


def pcg(apply_A, rhs, x0=None, *, rtol=1e-3, maxiter=100, precond=None, callback=None,
        energy_stop=None, delay=ENERGY_DELAY):
    """Solve ``apply_A(X) = rhs`` by (preconditioned) conjugate gradients.

    Parameters
    ----------
    apply_A : callable
        ``X -> A(X)``, symmetric positive semi-definite for ``<X, Y> = sum(X*Y)``.
    rhs : array
        Right-hand side, any shape.
    x0 : array, optional
        Warm start (default zeros).
    rtol : float, optional
        Stop when ``||rhs - A(X)||_F <= rtol * ||rhs||_F``.
    maxiter : int, optional
        Maximum number of iterations.
    precond : callable, optional
        ``R -> M^{-1} R`` with ``M`` symmetric positive definite.
    callback : callable, optional
        Called as ``callback(X, residual)`` after every iteration.
    energy_stop : callable, optional
        A second stopping rule, on the error of the quadratic instead of the
        residual. After iteration ``k >= 2 * delay`` it is called as
        ``energy_stop(estimate, decrease)``; CG stops, converged, when it
        returns True. ``decrease`` is the sum of all terms so far,
        ``||X_0 - X*||_A^2 - ||X_k - X*||_A^2``. ``estimate`` estimates
        ``||X_k - X*||_A^2`` (see :func:`_energy_estimate`): the larger of
        ``<R_k, Z_k> / theta_k`` (``theta_k`` the smallest Ritz value of the
        preconditioned operator, which CG's coefficients give for free) and
        the sum of the last ``delay`` terms (``inf`` unless they halved over
        the ``delay`` iterations before). ``rtol`` still applies; ``rtol=0``
        leaves this rule alone in charge.
    delay : int, optional
        Number of terms in ``estimate`` (default ``ENERGY_DELAY = 5``).

    Returns
    -------
    X : array
    info : PCGInfo

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.solvers import pcg
    >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> x, info = pcg(lambda v: A @ v, np.array([1.0, 2.0]), rtol=1e-12)
    >>> np.allclose(A @ x, [1.0, 2.0]), info.converged
    (True, True)
    """
    xp = B.namespace(rhs)
    X = xp.zeros_like(rhs) if x0 is None else x0
    R = rhs - apply_A(X) if x0 is not None else rhs
    bnorm = _dot(rhs, rhs) ** 0.5
    if bnorm == 0.0:
        return xp.zeros_like(rhs), PCGInfo(0, 0.0, True)
    res = _dot(R, R) ** 0.5 / bnorm
    if res <= rtol:
        return X, PCGInfo(0, res, True)
    Z = precond(R) if precond is not None else R
    P = Z
    rz = _dot(R, Z)
    it = 0
    terms = []
    decrease = 0.0
    diag, off = [], []  # Lanczos tridiagonal T_k (energy_stop only)
    alpha_prev = beta_prev = 1.0
    for it in range(1, maxiter + 1):
        AP = apply_A(P)
        pAp = _dot(P, AP)
        if pAp <= 0.0 or rz <= 0.0:  # breakdown: direction in the null space
            it -= 1
            break
        alpha = rz / pAp
        X = X + alpha * P
        R = R - alpha * AP
        res = _dot(R, R) ** 0.5 / bnorm
        terms.append(alpha * rz)
        decrease += alpha * rz
        if callback is not None:
            callback(X, res)
        if res <= rtol:
            return X, PCGInfo(it, res, True, terms)
        Z = precond(R) if precond is not None else R
        rz_new = _dot(R, Z)
        beta = rz_new / rz
        if energy_stop is not None:
            # Lanczos tridiagonal of the preconditioned operator from CG's coefficients
            diag.append(1.0 / alpha + (beta_prev / alpha_prev if it > 1 else 0.0))
            if it > 1:
                off.append(beta_prev ** 0.5 / alpha_prev)
            alpha_prev, beta_prev = alpha, beta
            if it >= 2 * delay:
                if energy_stop(_energy_estimate(terms, delay, rz_new, diag, off), decrease):
                    return X, PCGInfo(it, res, True, terms)
        P = Z + beta * P
        rz = rz_new
    return X, PCGInfo(it, res, res <= rtol, terms)
