"""The Sigma-norm, PSD roots and whitening.

``Sigma`` is the (uncentered) second moment of a layer's input patches, a
symmetric positive semi-definite ``(n, n)`` matrix. Proposition 1 of Kalle et
al. (NeurIPS 2025): for a weight change ``D = K_(1) - K~_(1)`` the expected
squared change of the layer output is ``tr(D Sigma D^T) = ||D Sigma^{1/2}||_F^2``.

Rank-deficient policy
---------------------
Real covariances are often singular (zero padding, ReLU, fewer samples than
``n``) and, after accumulation in floating point, slightly indefinite. Every
factorisation in this library follows one policy, implemented by
:func:`psd_root`:

* the matrix is symmetrised and eigen-decomposed in float64;
* eigenvalues ``<= rtol * lambda_max`` are treated as exactly zero (default
  ``rtol = 1e-10`` for a float64 ``sigma`` and ``1e-6`` for a float32 one,
  whose rounding alone makes eigenvalues of about ``1e-7 * lambda_max``): their eigenvectors span the numerical null space, which the
  Sigma-norm does not see;
* an eigenvalue below ``-neg_rtol * lambda_max`` (default ``neg_rtol = 1e-8``)
  means the input is not a second-moment matrix: a ``ValueError`` is raised
  rather than returning a silently wrong answer.

Linear systems with a PSD matrix (:func:`psd_solve`) use Cholesky when it
succeeds and otherwise the minimum-norm solution under the same eigenvalue
floor, which is still an exact minimiser of the underlying least-squares
problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _backend as B
from ._validation import check_array, check_finite, check_positive_float, check_sigma

__all__ = [
    "sigma_norm",
    "relative_sigma_error",
    "psd_root",
    "PSDRoot",
    "psd_solve",
    "DEFAULT_RTOL",
    "DEFAULT_NEG_RTOL",
    "default_rtol",
]

DEFAULT_RTOL = None  # 1e-10 for float64 input, 1e-6 for float32 input
_RTOL = {"float64": 1e-10, "float32": 1e-6}


def default_rtol(dtype):
    """The eigenvalue floor used when ``rtol=None``: 1e-10 (float64) or 1e-6 (float32)."""
    return _RTOL.get(str(dtype).replace("torch.", ""), 1e-10)
DEFAULT_NEG_RTOL = 1e-8


def _flatten_delta(delta, name="delta"):
    check_array(delta, name)
    if delta.ndim < 1:
        raise ValueError(f"{name} has ndim=0; {name} must have shape (T, ...)")
    xp = B.namespace(delta)
    if delta.ndim == 1:
        return xp.reshape(delta, (1, -1))
    return xp.reshape(delta, (delta.shape[0], -1))


def _sq_sigma_norm(D, S):
    """``tr(D S D^T)`` for float64 ``D`` (T, n) and ``S`` (n, n), clamped at 0."""
    xp = B.namespace(D)
    if S is None:
        val = xp.sum(D * D)
    else:
        val = xp.sum((D @ S) * D)
    return xp.clip(val, 0.0, None) if hasattr(xp, "clip") else xp.maximum(val, 0.0)


def sigma_norm(delta, sigma=None):
    """Sigma-norm ``sqrt(tr(D Sigma D^T))`` of a weight change.

    Parameters
    ----------
    delta : array of shape (T, ...)
        Weight difference; flattened to ``D`` of shape ``(T, n)`` row-major
        (a conv kernel ``(T, S, H, W)`` gives ``n = S*H*W``). A 1-D array is
        treated as a single row.
    sigma : array of shape (n, n) or None
        Symmetric PSD second-moment matrix. ``None`` gives the Frobenius norm.

    Returns
    -------
    norm : 0-d array
        Same library, device and dtype as ``delta``. Computed in float64 as
        ``sum((D @ sigma) * D)`` -- no matrix square root is formed; a tiny
        negative value caused by round-off in an indefinite ``sigma`` is
        clamped to zero.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import sigma_norm
    >>> D = np.array([[1.0, 2.0]])
    >>> float(sigma_norm(D, np.diag([4.0, 1.0])))  # sqrt(1*4 + 4*1)
    2.8284271247461903
    >>> float(sigma_norm(D))  # Frobenius
    2.23606797749979
    """
    D = _flatten_delta(delta)
    check_finite(D, "delta")
    xp = B.namespace(D)
    S = check_sigma(sigma, D.shape[1], D)
    val = xp.sqrt(_sq_sigma_norm(B.as_compute(D), S))
    return xp.astype(val, delta.dtype)


def relative_sigma_error(weight, approx, sigma=None):
    """Relative Sigma-error ``sqrt(tr(D S D^T) / tr(K S K^T))`` with ``D = K - K~``.

    Parameters
    ----------
    weight, approx : arrays of the same shape (T, ...)
    sigma : array of shape (n, n) or None

    Returns
    -------
    error : float
        ``0.0`` when both the weight and the difference have zero Sigma-norm.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import relative_sigma_error
    >>> K = np.eye(3)
    >>> relative_sigma_error(K, 0.5 * K)
    0.5
    """
    K = _flatten_delta(weight, "weight")
    A = _flatten_delta(approx, "approx")
    if tuple(weight.shape) != tuple(approx.shape):
        raise ValueError(
            f"approx has shape {tuple(approx.shape)}; it must match weight's shape "
            f"{tuple(weight.shape)}"
        )
    K64 = B.as_compute(K)
    A64 = B.asarray_like(A, K64)
    S = check_sigma(sigma, K.shape[1], K64)
    num = float(_sq_sigma_norm(K64 - A64, S))
    den = float(_sq_sigma_norm(K64, S))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))


@dataclass(repr=False)
class PSDRoot:
    """A factorisation ``Sigma ~= factor @ factor.T`` of a PSD matrix.

    Attributes
    ----------
    eigenvalues : array of shape (n,)
        All eigenvalues of the symmetrised input, ascending, in float64.
    eigenvectors : array of shape (n, n)
        Matching orthonormal eigenvectors (columns).
    rank : int
        Number of eigenvalues above ``rtol * lambda_max`` (the numerical rank).
    rtol : float
        The floor used.
    """

    eigenvalues: object
    eigenvectors: object
    rank: int
    rtol: float

    def _kept(self):
        n = self.eigenvalues.shape[0]
        return self.eigenvalues[n - self.rank:], self.eigenvectors[:, n - self.rank:]

    @property
    def factor(self):
        """``L`` of shape (n, rank) with ``L @ L.T`` the floored Sigma."""
        lam, V = self._kept()
        xp = B.namespace(lam)
        return V * xp.sqrt(lam)[None, :]

    @property
    def pinv_factor(self):
        """``L^+`` of shape (rank, n): ``L^+ @ L = I_rank``."""
        lam, V = self._kept()
        xp = B.namespace(lam)
        return (V / xp.sqrt(lam)[None, :]).T

    def sqrt(self):
        """Symmetric square root ``Sigma^{1/2}`` (n, n) under the floor policy."""
        lam, V = self._kept()
        xp = B.namespace(lam)
        return (V * xp.sqrt(lam)[None, :]) @ V.T

    def inv_sqrt(self):
        """Pseudo-inverse of the symmetric square root (n, n)."""
        lam, V = self._kept()
        xp = B.namespace(lam)
        return (V / xp.sqrt(lam)[None, :]) @ V.T

    def whiten(self, weight):
        """``W @ L`` for ``W`` of shape (T, n): Frobenius norms of the result are Sigma-norms."""
        return weight @ self.factor

    def unwhiten(self, whitened):
        """``Y @ L^+`` for ``Y`` of shape (T, rank); the result has no null-space part."""
        return whitened @ self.pinv_factor

    def null_energy(self, weight):
        """``sum_j max(lambda_j, 0) ||W v_j||^2`` over the floored (null) eigenpairs."""
        n = self.eigenvalues.shape[0]
        lam = self.eigenvalues[: n - self.rank]
        V = self.eigenvectors[:, : n - self.rank]
        xp = B.namespace(lam)
        lam = xp.where(lam > 0, lam, 0.0)
        P = weight @ V
        return xp.sum(P * P * lam[None, :])

    def __repr__(self):
        n = self.eigenvalues.shape[0]
        return f"PSDRoot(n={n}, rank={self.rank}, rtol={self.rtol:g})"


def psd_root(sigma, *, rtol=DEFAULT_RTOL, neg_rtol=DEFAULT_NEG_RTOL):
    """Eigen-factorise a symmetric PSD matrix under the library's floor policy.

    Parameters
    ----------
    sigma : array of shape (n, n)
        Symmetric positive semi-definite (NumPy or torch).
    rtol : float, optional
        Eigenvalues ``<= rtol * lambda_max`` count as zero (numerical null space).
        Default: 1e-10 for a float64 ``sigma``, 1e-6 for a float32 one.
    neg_rtol : float, optional
        An eigenvalue below ``-neg_rtol * lambda_max`` raises ``ValueError``.

    Returns
    -------
    PSDRoot
        In float64, on the device of ``sigma``.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import psd_root
    >>> X = np.random.default_rng(0).standard_normal((3, 5))
    >>> S = X.T @ X              # rank 3, n = 5
    >>> root = psd_root(S)
    >>> root.rank
    3
    >>> L = root.factor
    >>> bool(np.allclose(L @ L.T, S))
    True
    """
    check_array(sigma, "sigma", ndim=2)
    if rtol is None:
        rtol = default_rtol(sigma.dtype)
    rtol = check_positive_float(rtol, "rtol", allow_zero=True)
    neg_rtol = check_positive_float(neg_rtol, "neg_rtol", allow_zero=True)
    n = sigma.shape[0]
    S = check_sigma(sigma, n, B.as_compute(sigma))
    lam, V = B.eigh(S)
    xp = B.namespace(lam)
    lam_max = float(lam[-1]) if n else 0.0
    lam_min = float(lam[0]) if n else 0.0
    if lam_max < 0 or lam_min < -neg_rtol * max(lam_max, 0.0):
        raise ValueError(
            f"sigma is not positive semi-definite: smallest eigenvalue {lam_min:.3g}, "
            f"largest {lam_max:.3g} (allowed: >= -{neg_rtol:g} * largest); sigma must "
            "be a second-moment (covariance) matrix"
        )
    thresh = rtol * lam_max
    rank = int(xp.sum(lam > thresh)) if lam_max > 0 else 0
    return PSDRoot(eigenvalues=lam, eigenvectors=V, rank=rank, rtol=rtol)


def psd_solve(A, b, *, rtol=1e-10):
    """Solve ``A X = b`` for a symmetric PSD ``A`` (an exact least-squares minimiser).

    Uses Cholesky when ``A`` is numerically positive definite (its smallest
    pivot is checked against ``rtol``), otherwise the minimum-norm solution
    ``A^+ b`` with eigenvalues ``<= rtol * lambda_max`` treated as zero.

    Parameters
    ----------
    A : array of shape (m, m)
    b : array of shape (m,) or (m, k)
    rtol : float, optional

    Returns
    -------
    x : array with the shape of ``b``

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.sigma import psd_solve
    >>> A = np.array([[2.0, 0.0], [0.0, 0.0]])
    >>> psd_solve(A, np.array([4.0, 0.0]))
    array([2., 0.])
    """
    xp = B.namespace(A)
    m = A.shape[0]
    if m == 0:
        return b
    A = 0.5 * (A + A.T)
    diag_max = float(xp.max(xp.abs(xp.linalg.diagonal(A)))) if hasattr(xp, "linalg") else 0.0
    try:
        L = B.cholesky(A)
        d = xp.linalg.diagonal(L)
        if float(xp.min(d)) ** 2 > rtol * max(diag_max, 1e-300) * 10:
            return B.cho_solve(L, b)
    except np.linalg.LinAlgError:
        pass
    lam, V = B.eigh(A)
    lam_max = float(lam[-1])
    keep = lam > rtol * max(lam_max, 0.0)
    inv = xp.where(keep, 1.0 / xp.where(keep, lam, 1.0), 0.0)
    vec = b.ndim == 1
    bb = b[:, None] if vec else b
    x = V @ (inv[:, None] * (V.T @ bb))
    return x[:, 0] if vec else x
