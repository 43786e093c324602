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
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _backend as B

__all__ = ["pcg", "PCGInfo"]


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
        Whether ``residual <= rtol`` was reached.
    """

    n_iter: int
    residual: float
    converged: bool


def _dot(a, b):
    xp = B.namespace(a)
    return float(xp.sum(a * b))


def pcg(apply_A, rhs, x0=None, *, rtol=1e-3, maxiter=100, precond=None, callback=None):
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
        if callback is not None:
            callback(X, res)
        if res <= rtol:
            return X, PCGInfo(it, res, True)
        Z = precond(R) if precond is not None else R
        rz_new = _dot(R, Z)
        P = Z + (rz_new / rz) * P
        rz = rz_new
    return X, PCGInfo(it, res, res <= rtol)
