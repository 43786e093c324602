"""The Sigma-norm, PSD roots and whitening.

``Sigma`` is the (uncentered) second moment of a layer's input patches, a
symmetric positive semi-definite ``(n, n)`` matrix. Proposition 1 of Kalle et
al. (NeurIPS 2025): for a weight change ``D = K_(1) - K~_(1)`` the expected
squared change of the layer output is ``tr(D Sigma D^T) = ||D Sigma^{1/2}||_F^2``.

Rank-deficient policy
---------------------
Real covariances are often singular (zero padding, ReLU, fewer samples than
``n``) and, after accumulation in floating point, slightly indefinite. Every
entry point that takes a ``sigma`` (:func:`sigma_norm`,
:func:`relative_sigma_error`, :func:`psd_root`, :func:`sigmadecomp.sigma_svd`,
:func:`sigmadecomp.tucker2`, :func:`sigmadecomp.tt_conv`,
:func:`sigmadecomp.tt_linear`) follows one policy, with the thresholds named
once in ``sigmadecomp._validation`` (``ZERO_RTOL``, ``NEG_RTOL``, ...):

* the matrix is symmetrised and handled in float64;
* an eigenvalue below ``-neg_rtol * lambda_max`` means the input is not a
  second-moment matrix: a ``ValueError`` names the argument ``sigma`` and its
  smallest and largest eigenvalues. Default ``neg_rtol = 1e-8`` for a float64
  ``sigma`` and ``1e-4`` for a float32 one, whose rounding alone makes
  negative eigenvalues of order ``1e-7 * lambda_max``. The check costs a
  shifted Cholesky factorisation (about a third of an eigen-decomposition)
  unless the entry point eigen-decomposes ``sigma`` anyway;
* where ``sigma`` is factored (:func:`psd_root`), eigenvalues
  ``<= rtol * lambda_max`` are treated as exactly zero (default ``rtol = 1e-10``
  for float64, ``1e-6`` for float32): their eigenvectors span the numerical
  null space, which the Sigma-norm does not see.

Linear systems with a PSD matrix (:func:`psd_solve`) use Cholesky when it
succeeds and otherwise the minimum-norm solution under the same eigenvalue
floor, which is still an exact minimiser of the underlying least-squares
problem.

Ridge
-----
Directions that ``sigma`` never saw (its null space, e.g. fewer calibration
patches than ``n``) leave the Sigma-optimal factors free there; the solvers
then may return weights far from the original in those directions. Their
``ridge`` option minimises the error in ``ridge_sigma(sigma, ridge) =
sigma + ridge * (trace(sigma) / n) * I`` instead: a small multiple of the mean
eigenvalue, which pulls the unseen directions toward the original weight while
changing the Sigma-error very little. The default :data:`DEFAULT_RIDGE` is the
largest value of the grid measured in ``notes/ridge.md`` that kept the
Sigma-error within 1% of the unregularised one for every solver on every
measured singular layer; an eigenvalue floor (raising only the eigenvalues
below ``ridge * trace(sigma) / n``) traded the two errors no better there.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from . import _backend as B
from ._validation import (
    CHOL_PIVOT,
    ZERO_RTOL,
    check_array,
    check_finite,
    check_positive_float,
    check_psd,
    check_sigma,
    neg_rtol as _neg_rtol,
    zero_rtol,
)

__all__ = [
    "sigma_norm",
    "relative_sigma_error",
    "psd_root",
    "PSDRoot",
    "psd_solve",
    "ridge_sigma",
    "DEFAULT_RTOL",
    "DEFAULT_NEG_RTOL",
    "DEFAULT_RIDGE",
    "default_rtol",
    "default_neg_rtol",
    "solver_rtol",
]

DEFAULT_RTOL = None  # ZERO_RTOL of sigma's dtype: 1e-10 for float64, 1e-6 for float32
DEFAULT_NEG_RTOL = None  # NEG_RTOL of sigma's dtype: 1e-8 for float64, 1e-4 for float32

#: Default ``ridge`` of the solvers, as a multiple of the mean eigenvalue
#: ``trace(sigma) / n``; chosen by the measurement in ``notes/ridge.md``: the
#: largest grid value whose Sigma-error stayed within 1% of ``ridge=0`` for
#: every solver on every measured singular layer.
DEFAULT_RIDGE = 5e-4


def default_rtol(dtype):
    """The eigenvalue floor used when ``rtol=None``: 1e-10 (float64) or 1e-6 (float32)."""
    return zero_rtol(dtype)


def solver_rtol(rtol, sigma):
    """The eigenvalue floor ``rtol`` of a solver, by the one rule every solver follows.

    A given ``rtol`` is validated (a finite real ``>= 0``) and used as is.
    ``None`` is :func:`default_rtol` of the dtype of the user's ``sigma``
    (1e-10 for float64, 1e-6 for float32: a float32 ``sigma`` carries
    eigenvalue noise of about 1e-7 of its largest eigenvalue from its own
    rounding), and the float64 floor 1e-10 without ``sigma`` (the Frobenius
    algebra is float64 whatever the weight's dtype). ``sigma`` may be a
    :class:`sigmadecomp.prepared.PreparedSigma` (its ``dtype`` is the one of
    the matrix it was made from).

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.sigma import solver_rtol
    >>> S = np.eye(3)
    >>> solver_rtol(None, S), solver_rtol(None, S.astype(np.float32)), solver_rtol(None, None)
    (1e-10, 1e-06, 1e-10)
    >>> solver_rtol(1e-3, S.astype(np.float32))
    0.001
    """
    if rtol is not None:
        return check_positive_float(rtol, "rtol", allow_zero=True)
    # (an invalid sigma is refused by check_sigma, with its own message)
    dtype = getattr(sigma, "dtype", None)
    return default_rtol("float64" if dtype is None else dtype)


def default_neg_rtol(dtype):
    """The negative-eigenvalue tolerance used when ``neg_rtol=None``: 1e-8 (float64) or 1e-4 (float32)."""
    return _neg_rtol(dtype)


def check_ridge(ridge):
    """Validate a ``ridge`` option (a finite float ``>= 0``)."""
    return check_positive_float(ridge, "ridge", allow_zero=True)


def _add_ridge(S, ridge):
    """``S + ridge * (trace(S) / n) * I`` for a float64 ``S`` (a new array; ``S`` itself if ridge is 0)."""
    if S is None or ridge == 0.0:
        return S
    xp = B.namespace(S)
    n = S.shape[0]
    if n == 0:
        return S
    shift = ridge * float(xp.sum(xp.linalg.diagonal(S))) / n
    return S + shift * xp.eye(n, dtype=S.dtype, device=B.device(S))


def ridge_sigma(sigma, ridge=DEFAULT_RIDGE):
    """The matrix the solvers minimise in: ``sigma + ridge * (trace(sigma) / n) * I``.

    Parameters
    ----------
    sigma : array of shape (n, n)
        Symmetric PSD second moment (NumPy or torch).
    ridge : float, optional
        Multiple of the mean eigenvalue ``trace(sigma) / n`` added to the
        diagonal, ``>= 0``.

    Returns
    -------
    array of shape (n, n)
        A new array in the library, dtype and device of ``sigma``; ``sigma``
        is not modified.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import tucker2, relative_sigma_error
    >>> from sigmadecomp.sigma import ridge_sigma
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((4, 3, 3, 3))
    >>> X = rng.standard_normal((10, 27))   # 10 samples, n = 27: singular
    >>> S = X.T @ X / 10
    >>> res = tucker2(K, (2, 2), S, ridge=1e-3)
    >>> bool(np.isclose(res.error, relative_sigma_error(K, res.to_tensor(), ridge_sigma(S, 1e-3))))
    True
    >>> bool(np.isclose(res.sigma_error, relative_sigma_error(K, res.to_tensor(), S)))
    True
    """
    check_array(sigma, "sigma", ndim=2)
    ridge = check_ridge(ridge)
    xp = B.namespace(sigma)
    S = B.as_compute(sigma)
    return xp.astype(_add_ridge(S, ridge) if ridge else S + 0.0, sigma.dtype)


def _flatten_delta(delta, name="delta"):
    check_array(delta, name)
    if delta.ndim < 1:
        raise ValueError(f"{name} has ndim=0; {name} must have shape (T, ...)")
    xp = B.namespace(delta)
    if delta.ndim == 1:
        return xp.reshape(delta, (1, -1))
    return xp.reshape(delta, (delta.shape[0], math.prod(delta.shape[1:])))


#: Relative size (to ``max|S| * ||D||_F^2``) below which a negative ``tr(D S D^T)``
#: counts as the rounding of a PSD ``S``: ``n * eps`` for ``n`` up to ~10^4.
NEG_ROUNDING = 1e-12


def _sq_sigma_norm(D, S):
    """``tr(D S D^T)`` for float64 ``D`` (T, n) and ``S`` (n, n), never negative.

    An accepted ``S`` may have eigenvalues down to ``-neg_rtol * lambda_max``.
    When ``D`` lies mostly along them the quadratic is negative beyond
    rounding (below ``-NEG_ROUNDING * max|S| * ||D||^2``); it is then measured
    in the nearest PSD matrix of ``S`` (negative eigenvalues set to 0; one
    eigen-decomposition, on this rare path only), never reported as 0. A
    smaller negative value is rounding of a PSD ``S`` and is clamped to 0.
    """
    xp = B.namespace(D)
    if S is None:
        return xp.sum(D * D)
    val = xp.sum((D @ S) * D)
    if float(val) < 0.0 and -float(val) > NEG_ROUNDING * float(
            xp.max(xp.abs(S))) * float(xp.sum(D * D)):
        val = xp.sum((D @ _nearest_psd(S)) * D)
    return xp.clip(val, 0.0, None) if hasattr(xp, "clip") else xp.maximum(val, 0.0)


#: A matrix whose largest entry lies in this range is used as it is by :func:`_unit_scaled`
#: (products with it neither under- nor overflow); only one outside it is divided (an
#: (n, n) copy, which on the largest layers costs real memory).
SAFE_MATRIX_SCALE = (1e-100, 1e100)


def _unit_scaled(D, S, *more):
    """``(D, *more, S)`` divided by ``max|D|`` and, at extreme magnitudes only, ``max|S|``
    (NumPy or torch, float64), and the factor ``max|D| * sqrt(s)`` that multiplies a
    Sigma-norm back: squared norms of the scaled arrays neither under- nor overflow,
    whatever the user's scale."""
    xp = B.namespace(D)
    a = float(xp.max(xp.abs(D))) if math.prod(D.shape) else 0.0
    s = 1.0 if S is None else (float(xp.max(xp.abs(S))) if S.shape[0] else 0.0)
    a = a if a > 0.0 else 1.0
    s = s if s > 0.0 and not SAFE_MATRIX_SCALE[0] <= s <= SAFE_MATRIX_SCALE[1] else 1.0
    scaled = [D / a] + [m / a for m in more] + ([None] if S is None
                                                 else [S / s if s != 1.0 else S])
    return scaled, a * float(np.sqrt(s))


def _rel_sigma_error(K1, A1, S, den=None):
    """Relative Sigma-error of float64 ``A1`` against ``K1`` (both (T, n)), no validation.

    ``den``: ``tr(K1 S K1^T)`` when the caller has it (saves a ``T x n x n`` product).
    """
    num = float(_sq_sigma_norm(K1 - A1, S))
    den = float(_sq_sigma_norm(K1, S)) if den is None else float(den)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))


def _nearest_psd(Sg):
    """``Sg`` itself if it is numerically positive definite, else its nearest PSD matrix.

    A Cholesky factorisation whose smallest squared pivot exceeds
    ``1e-9 * max(diag)`` (the test of :func:`sigmadecomp.sigma.psd_solve`)
    keeps ``Sg`` unchanged at the cost of one ``n^3 / 3`` factorisation.
    Otherwise (singular, very ill-conditioned or slightly indefinite ``Sg``)
    its negative eigenvalues -- rounding, e.g. of a float32 second moment --
    are set to zero: the nearest PSD matrix in Frobenius norm, one ``n x n``
    eigen-decomposition. With a negative eigenvalue left in, the objective
    would be unbounded below and ALS would run off along that direction.

    The iterative solvers (Tucker-2, CP, TT) fit in this matrix of the ridged
    ``sigma`` (:func:`_fitted_sigma`).
    """
    return _psd_projection(Sg)[0]


def _psd_projection(Sg):
    """:func:`_nearest_psd` and ``-lambda_min / lambda_max`` of ``Sg`` when it was projected
    (0 when ``Sg`` is returned unchanged)."""
    xp = B.namespace(Sg)
    n = Sg.shape[0]
    dmax = float(xp.max(xp.linalg.diagonal(Sg))) if n else 0.0
    if not dmax > 0.0:
        return Sg, 0.0
    try:
        piv = xp.linalg.diagonal(B.cholesky(Sg))
        if float(xp.min(piv * piv)) > CHOL_PIVOT * ZERO_RTOL["float64"] * dmax:
            return Sg, 0.0
    except np.linalg.LinAlgError:
        pass
    lam, V = B.eigh(Sg)
    if float(lam[0]) >= 0.0:
        return Sg, 0.0
    Vp = V * xp.sqrt(xp.where(lam > 0, lam, 0.0))[None, :]
    out = Vp @ Vp.T
    return 0.5 * (out + out.T), -float(lam[0]) / float(lam[-1])


def _fitted_sigma(S_user, ridge):
    """``(matrix, projected)``: the matrix the iterative solvers fit in -- ``S_user`` with
    its ridge, then :func:`_nearest_psd` -- and whether that projection removed more than
    rounding (an eigenvalue below ``-NEG_ROUNDING * lambda_max``, which an accepted float32
    ``sigma`` may have): errors in the fitted matrix then differ from those in ``S_user``
    beyond rounding, and ``sigma_error`` is measured separately."""
    Sg = _add_ridge(S_user, ridge)
    if Sg is None:
        return None, False
    fitted, negative = _psd_projection(Sg)
    return fitted, negative > NEG_ROUNDING


def _ridge_result_fields(K1, approx1, S_user, ridge, error, projected=False):
    """``(ridge, sigma_error)`` for a result: the relative Sigma-error in the user's ``sigma``.

    ``K1`` and ``approx1`` are float64 (T, n) (in the column order of
    ``S_user``), ``S_user`` the validated float64 ``sigma`` or None, ``error``
    the solver's final error in the ridged metric. With ``ridge == 0`` the two
    metrics agree and no product is formed, unless ``projected``: the solver
    fitted in the nearest PSD matrix of an accepted ``sigma`` with small
    negative eigenvalues (:func:`_nearest_psd`), and the error in the user's
    matrix is computed.
    """
    if S_user is None:
        return 0.0, None
    if not ridge and not projected:
        return 0.0, error
    return ridge, _rel_sigma_error(K1, approx1, S_user)


@B.no_autograd
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
        An indefinite ``sigma`` (smallest eigenvalue below the tolerance of
        the module's policy) raises ``ValueError``.

    Returns
    -------
    norm : 0-d array
        Same library, device and dtype as ``delta``. Computed in float64 as
        ``sum((D @ sigma) * D)`` -- no matrix square root is formed; a tiny
        negative value caused by round-off (``sigma`` may have eigenvalues
        down to ``-neg_rtol * lambda_max``) is clamped to zero.

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
    D64 = B.as_compute(D)
    (D64, S), scale = _unit_scaled(D64, S)
    val = xp.sqrt(_sq_sigma_norm(D64, S)) * scale
    return xp.astype(val, delta.dtype)


@B.no_autograd
def relative_sigma_error(weight, approx, sigma=None):
    """Relative Sigma-error ``sqrt(tr(D S D^T) / tr(K S K^T))`` with ``D = K - K~``.

    Parameters
    ----------
    weight, approx : arrays of the same shape (T, ...)
        Finite (NaN or inf raises ``ValueError`` naming the argument).
    sigma : array of shape (n, n) or None
        Symmetric PSD second moment (checked as in :func:`sigma_norm`);
        ``None`` gives the relative Frobenius error.

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
    K = check_finite(_flatten_delta(weight, "weight"), "weight")
    A = check_finite(_flatten_delta(approx, "approx"), "approx")
    if tuple(weight.shape) != tuple(approx.shape):
        raise ValueError(
            f"approx has shape {tuple(approx.shape)}; it must match weight's shape "
            f"{tuple(weight.shape)}"
        )
    K64 = B.as_compute(K)
    A64 = B.asarray_like(A, K64)
    S = check_sigma(sigma, K.shape[1], K64)
    (K64, A64, S), _ = _unit_scaled(K64, S, A64)
    return _rel_sigma_error(K64, A64, S)


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

    def _own(self, x):
        """``x`` in the root's library, float64 and device (as the factors are)."""
        return B.asarray_like(x, self.eigenvectors)

    def whiten(self, weight):
        """``W @ L`` for ``W`` of shape (T, n): Frobenius norms of the result are Sigma-norms.

        ``W`` (NumPy or torch, any float dtype or device) is taken to the root's library,
        float64 and device first, as is the result."""
        return self._own(weight) @ self.factor

    def unwhiten(self, whitened):
        """``Y @ L^+`` for ``Y`` of shape (T, rank); the result has no null-space part
        (in the root's library, float64 and device, like :meth:`whiten`)."""
        return self._own(whitened) @ self.pinv_factor

    def null_energy(self, weight):
        """``sum_j max(lambda_j, 0) ||W v_j||^2`` over the floored (null) eigenpairs."""
        n = self.eigenvalues.shape[0]
        lam = self.eigenvalues[: n - self.rank]
        V = self.eigenvectors[:, : n - self.rank]
        xp = B.namespace(lam)
        lam = xp.where(lam > 0, lam, 0.0)
        P = self._own(weight) @ V
        return xp.sum(P * P * lam[None, :])

    def __repr__(self):
        n = self.eigenvalues.shape[0]
        return f"PSDRoot(n={n}, rank={self.rank}, rtol={self.rtol:g})"


def psd_root(sigma, *, rtol=DEFAULT_RTOL, neg_rtol=DEFAULT_NEG_RTOL):
    """Eigen-factorise a symmetric PSD matrix under the library's floor policy.

    Parameters
    ----------
    sigma : array of shape (n, n) or PreparedSigma
        Symmetric positive semi-definite (NumPy or torch). A
        :class:`sigmadecomp.prepared.PreparedSigma` gives the same root from
        its cached eigen-decomposition.
    rtol : float, optional
        Eigenvalues ``<= rtol * lambda_max`` count as zero (numerical null space).
        Default: 1e-10 for a float64 ``sigma``, 1e-6 for a float32 one.
    neg_rtol : float, optional
        An eigenvalue below ``-neg_rtol * lambda_max`` raises ``ValueError``.
        Default: 1e-8 for a float64 ``sigma``, 1e-4 for a float32 one.

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
    from .prepared import PreparedSigma

    if not isinstance(sigma, PreparedSigma):
        check_array(sigma, "sigma", ndim=2)
    if rtol is None:
        rtol = default_rtol(sigma.dtype)
    if neg_rtol is None:
        neg_rtol = default_neg_rtol(sigma.dtype)
    rtol = check_positive_float(rtol, "rtol", allow_zero=True)
    neg_rtol = check_positive_float(neg_rtol, "neg_rtol", allow_zero=True)
    if isinstance(sigma, PreparedSigma):  # its eigen-decomposition is computed once
        return sigma.root(rtol=rtol, neg_rtol=neg_rtol)
    n = sigma.shape[0]
    S = check_sigma(sigma, n, B.as_compute(sigma), psd=False)
    lam, V = B.eigh(S)
    check_psd(S, sigma.dtype, "sigma", eigenvalues=lam, tol=neg_rtol)
    return _root_from_eigh(lam, V, rtol)


def _root_from_eigh(lam, V, rtol):
    xp = B.namespace(lam)
    lam_max = float(lam[-1]) if lam.shape[0] else 0.0
    rank = int(xp.sum(lam > rtol * lam_max)) if lam_max > 0 else 0
    return PSDRoot(eigenvalues=lam, eigenvectors=V, rank=rank, rtol=rtol)


def _psd_root_unchecked(S, rtol):
    """:func:`psd_root` of an internal float64 symmetric matrix, without the PSD check.

    For matrices built from an already validated ``sigma`` (``B Sigma B^T``):
    they are PSD up to rounding, and an error about them would name a matrix
    the user never gave.
    """
    lam, V = B.eigh(0.5 * (S + S.T))
    return _root_from_eigh(lam, V, rtol)


def psd_solve(A, b, *, rtol=ZERO_RTOL["float64"]):
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
        if float(xp.min(d)) ** 2 > CHOL_PIVOT * rtol * max(diag_max, 1e-300):
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
