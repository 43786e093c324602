"""Input checks shared by every public function.

Each check raises a ``TypeError`` or ``ValueError`` whose message names the
argument, the value (or its shape/dtype) and what is allowed.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from array_api_compat import is_array_api_obj, is_numpy_array, is_torch_array

from . import _backend as B

_FLOAT_NAMES = ("float32", "float64")


def _dtype_name(dtype) -> str:
    name = str(dtype)
    if name.startswith("torch."):
        return name[len("torch."):]
    try:
        return np.dtype(dtype).name
    except TypeError:
        return name


# ----------------------------------------------------------------------------
# Numeric floors: every relative threshold of the Sigma algebra, named once.
# ----------------------------------------------------------------------------
# Floors that depend on the precision of the user's ``sigma`` are keyed by its
# dtype. The float32 values are 1e4 times the float64 ones: a float32 sigma
# carries eigenvalue noise of about 1e-7 to 1e-6 of lambda_max from its own
# rounding (eps = 6e-8, growing mildly with n), so its floors must sit above
# that, while the float64 floors sit far above float64 rounding (eps = 1.1e-16)
# and are set by the conditioning the algebra tolerates.

#: An eigenvalue ``<= ZERO_RTOL * lambda_max`` counts as exactly zero (the
#: numerical null space). 1e-10 for float64 is ~1e6 times the rounding of a
#: float64 Sigma of size a few thousand; 1e-6 for float32 is ~10 times the
#: eigenvalue noise of a Sigma rounded to float32.
ZERO_RTOL = {"float64": 1e-10, "float32": 1e-6}

#: An eigenvalue below ``-NEG_RTOL * lambda_max`` means ``sigma`` is not a
#: second-moment matrix and is refused. 100 times the zero floor: rounding in
#: the accumulation of ``X^T X`` makes tiny negative eigenvalues of a singular
#: Sigma, a genuinely indefinite matrix has negative eigenvalues of order one.
NEG_RTOL = {"float64": 1e-8, "float32": 1e-4}

#: ``max |sigma - sigma.T|`` above ``SYM_RTOL * max |sigma|`` is refused: a few
#: hundred ulps of the dtype, what an ``X^T X`` computed blockwise may differ by.
SYM_RTOL = {"float64": 1e-10, "float32": 1e-6}

#: A Cholesky factor whose smallest pivot satisfies
#: ``min(diag(L))^2 <= CHOL_PIVOT * rtol * max(diag(A))`` is treated as singular
#: (the eigen-solve under the zero floor is used instead): a factor ten of
#: margin over the zero floor, since Cholesky pivots bound the eigenvalues
#: only up to a factor of order the condition number.
CHOL_PIVOT = 10.0

#: CP-ALS evaluates its objective by the expansion ``f = tr(K S K^T) - 2 c + q``,
#: whose rounding error is about ``eps * (tr(K S K^T) + 2|c| + q)``. While ``f``
#: is at least ``EXPANSION_CANCEL`` times that scale the relative rounding error
#: of ``f`` stays below ``eps / 1e-5 ~ 1e-11``; below it (a nearly exact fit, or
#: large terms that cancel) the objective is recomputed from the residual.
EXPANSION_CANCEL = 1e-5

#: Below this squared relative error, error formulas of the form
#: ``total - kept`` lose more than half their digits to cancellation and the
#: error is recomputed from ``D = K - K~`` instead (sqrt(1e-6) = 1e-3 relative
#: error; a double has 16 digits, so at least 10 remain in the shortcut above
#: it).
CANCEL = 1e-6

#: Eigenvalues of CG preconditioner factors are raised to ``PRECOND_FLOOR``
#: times the largest, so the preconditioner is positive definite (CG then
#: stays monotone); a preconditioner needs no more precision than that.
PRECOND_FLOOR = 1e-8


#: EVBMF searches its noise variance in ``[lo, hi]`` with ``lo`` raised to at
#: least ``EVB_BRACKET * hi``: the grid below then spans at most 12 decades,
#: and a variance smaller than 1e-12 of the mean squared entry is rounding
#: noise of float64 data rather than a noise level. The bounded search that
#: refines the grid point stops at the same relative width in log scale.
EVB_BRACKET = 1e-12

#: Relative slack when a parameter count is compared with the bound
#: ``params(dense) / ratio`` computed in floating point: far above its
#: rounding (~1e-16) and far below one unit of the counts, so that an exact
#: ratio (``ratio=4`` on a layer whose size divides by 4) is met, not missed
#: by rounding.
COUNT_SLACK = 1e-12

#: Slack subtracted from ``log(n) / log(8)`` before the ceiling that picks the
#: number of TT modes: ``n = 8**k`` must give ``k`` modes although the quotient
#: of two rounded logarithms may exceed ``k`` by a few ulps.
LOG_SLACK = 1e-9

#: Points of the log-spaced grid on which EVBMF brackets the minimiser of its
#: noise-variance objective before a bounded scalar search refines it: the
#: objective has at most a few local minima over the bracket, and 400 points
#: (a ratio of ~1.07 between neighbours over 12 decades) separate them at a
#: cost of microseconds.
EVB_GRID = 400

#: The blocked upper-triangle ``X^T X`` of the statistics collector
#: (``sigmadecomp_torch.covariance``) splits the ``n`` columns into blocks of
#: ``max(GRAM_BLOCK_MIN, ceil(n / GRAM_BLOCKS))``: at most 8 block GEMMs, so
#: the triangle costs about (1 + 1/8) / 2 of the full product, and at least 96
#: columns per block so that each GEMM stays wide enough for the BLAS to run
#: near its full speed (below that the loop overhead eats the saving; layers
#: with ``n <= 96`` take one full product).
GRAM_BLOCK_MIN = 96
GRAM_BLOCKS = 8

#: Smallest positive scale used as a guard where a ratio to a largest
#: eigenvalue or a previous error could divide by zero: the order of the
#: smallest normal float64 (2.2e-308) with room to spare, so it never changes
#: a result that is not otherwise 0/0.
TINY = 1e-300


def _floor(table, dtype):
    return table.get(_dtype_name(dtype), table["float64"])


def zero_rtol(dtype):
    """:data:`ZERO_RTOL` for a ``sigma`` of this dtype (float64's for other dtypes)."""
    return _floor(ZERO_RTOL, dtype)


def neg_rtol(dtype):
    """:data:`NEG_RTOL` for a ``sigma`` of this dtype (float64's for other dtypes)."""
    return _floor(NEG_RTOL, dtype)


def check_array(x, name, *, ndim=None, allow_none=False):
    """Check that ``x`` is a real floating NumPy array or torch tensor.

    Python lists/tuples and integer NumPy arrays are rejected with a message
    (we never guess a dtype silently).
    """
    if x is None:
        if allow_none:
            return None
        raise TypeError(f"{name}=None is not allowed; {name} must be an array")
    if not (is_numpy_array(x) or is_torch_array(x)):
        if is_array_api_obj(x):
            raise TypeError(
                f"{name} of type {type(x).__name__} is not supported; "
                f"{name} must be a NumPy array or a torch tensor"
            )
        raise TypeError(
            f"{name} of type {type(x).__name__} is not allowed; {name} must be a "
            "NumPy array or a torch tensor (convert lists with numpy.asarray)"
        )
    if _dtype_name(x.dtype) not in _FLOAT_NAMES:
        raise TypeError(
            f"{name} has dtype {_dtype_name(x.dtype)}, which is not supported; "
            f"{name} must be float32 or float64"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(
                f"{name} has ndim={x.ndim} (shape {tuple(x.shape)}); {name} must "
                f"be {want}-dimensional"
            )
    return x


def check_nonempty(x, name):
    """Refuse an array with a zero-size dimension (nothing to decompose)."""
    if any(int(s) == 0 for s in x.shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; every dimension of {name} must "
                         "be positive")
    return x


def check_same_library(arrays, name):
    """Refuse a sequence mixing NumPy arrays and torch tensors, or torch devices."""
    kinds = {("torch", str(a.device)) if is_torch_array(a) else ("numpy", "cpu") for a in arrays}
    if len(kinds) > 1:
        found = ", ".join(sorted(k if k == "numpy" else f"torch on {d}" for k, d in kinds))
        raise TypeError(f"{name} mixes {found}; all must be of one library and on one device "
                        "(convert with numpy.asarray or torch.as_tensor first)")


#: ``max|weight|^2 * max|sigma|`` must lie within ``[1/MAGNITUDE_LIMIT, MAGNITUDE_LIMIT]``:
#: the squared Sigma-norms ``tr(K S K^T)`` behind every relative error are then
#: far inside float64's range (1e-308 to 1e308) even after sums over millions
#: of terms, so no error under- or overflows to a wrong 0, inf or nan.
MAGNITUDE_LIMIT = 1e150


def check_magnitude(x, name, sigma=None):
    """Refuse a weight (and ``sigma``) whose squared norms would leave float64's range.

    Relative errors do not depend on the scale of the weight or of ``sigma``,
    so the message asks the user to rescale.
    """
    xp = B.namespace(x)
    a = float(xp.max(xp.abs(x))) if math.prod(x.shape) else 0.0
    s = 1.0 if sigma is None else float(xp.max(xp.abs(sigma))) if sigma.shape[0] else 0.0
    if a == 0.0 or s == 0.0:
        return
    size = 2.0 * np.log10(a) + np.log10(s)
    if abs(size) > np.log10(MAGNITUDE_LIMIT):
        what = f"max|{name}|^2" + ("" if sigma is None else " * max|sigma|")
        raise ValueError(
            f"{name} is too {'small' if size < 0 else 'large'} in scale: {what} = 1e{size:.0f}, "
            f"outside [1e-{np.log10(MAGNITUDE_LIMIT):.0f}, 1e{np.log10(MAGNITUDE_LIMIT):.0f}] where "
            "its squared norms stay exact in float64; rescale it (relative errors and the "
            "decomposition's shape do not depend on the scale)")


def check_finite(x, name):
    xp = B.namespace(x)
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or inf values; {name} must be finite")
    return x


def check_int(value, name, *, low=None, high=None):
    """An integer in ``[low, high]`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} is not allowed; {name} must be an integer")
    value = int(value)
    if low is not None and value < low:
        hi = f" and at most {high}" if high is not None else ""
        raise ValueError(f"{name}={value} is not allowed; {name} must be at least {low}{hi}")
    if high is not None and value > high:
        raise ValueError(
            f"{name}={value} is not allowed; {name} must be at most {high}"
            + (f" and at least {low}" if low is not None else "")
        )
    return value


def is_positive_int_tuple(value, length=None):
    """Whether ``value`` is a non-empty sequence (not a string) of integers >= 1 (bools
    excluded), of ``length`` entries when given."""
    try:
        return (not isinstance(value, (str, bytes)) and len(value) > 0
                and (length is None or len(value) == length)
                and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                        for v in value))
    except TypeError:  # (not a sequence)
        return False


def check_positive_float(value, name, *, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise TypeError(f"{name}={value!r} is not allowed; {name} must be a finite real number")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be {bound}")
    return float(value)


def check_flag(value, name):
    """``value`` as a bool: True/False (NumPy booleans too); anything else is refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}={value!r} is not allowed; {name} must be True or False")


def check_choice(value, name, choices):
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be one of {allowed}")
    return value


def check_sigma(sigma, n, like, name="sigma", *, sym_rtol=None, psd=True):
    """Validate a ``(n, n)`` symmetric positive semi-definite second-moment matrix.

    Returns ``sigma`` converted to the library and device of ``like`` in float64
    and exactly symmetrised. Raises if the shape is wrong, the entries are not
    finite, the matrix is not symmetric to within ``sym_rtol`` (relative to its
    largest entry; default :data:`SYM_RTOL` of its dtype) or, with ``psd=True``,
    not positive semi-definite under the policy of :func:`check_psd`. Callers
    that eigen-decompose ``sigma`` anyway pass ``psd=False`` and call
    :func:`check_psd` with the eigenvalues.

    A :class:`sigmadecomp.prepared.PreparedSigma` is accepted in place of the
    matrix: its checks ran when it was made, its PSD test runs at most once,
    and its matrix is returned (converted to ``like``'s library and device).
    """
    if sigma is None:
        return None
    if type(sigma).__name__ == "PreparedSigma":
        from .prepared import PreparedSigma

        if isinstance(sigma, PreparedSigma):
            return sigma.validated(n, like, name, psd=psd)
    check_array(sigma, name, ndim=2)
    if tuple(sigma.shape) != (n, n):
        raise ValueError(
            f"{name} has shape {tuple(sigma.shape)}; {name} must be ({n}, {n}) to match "
            f"the flattened input dimension n={n} of the weight"
        )
    if sym_rtol is None:
        sym_rtol = _floor(SYM_RTOL, sigma.dtype)
    s = _as_float64(sigma, like)
    check_finite(s, name)
    xp = B.namespace(s)
    scale = float(xp.max(xp.abs(s))) if n else 0.0
    asym = float(xp.max(xp.abs(s - s.T))) if n else 0.0
    if asym > sym_rtol * max(scale, np.finfo(np.float64).tiny):
        raise ValueError(
            f"{name} is not symmetric (max |sigma - sigma.T| = {asym:.3g}, "
            f"{asym / max(scale, 1e-300):.3g} relative); {name} must be a symmetric "
            "positive semi-definite matrix"
        )
    s = _symmetrised(s)
    if psd:
        check_psd(s, sigma.dtype, name)
    return s


def _as_float64(sigma, like):
    return B.asarray_like(sigma, like, dtype=B.namespace(like).float64)


def _symmetrised(s):
    return 0.5 * (s + s.T)


def symmetrised_float64(sigma, like):
    """What :func:`check_sigma` returns for ``sigma``, without its checks.

    For a matrix that passed them before (the same input again): converted
    to float64 in the library and on the device of ``like``, and
    symmetrised, by the same operations, so the result is identical.
    """
    return _symmetrised(_as_float64(sigma, like))


def _not_psd(name, lam_min, lam_max, tol):
    return ValueError(
        f"{name} is not positive semi-definite: smallest eigenvalue {lam_min:.3g}, "
        f"largest {lam_max:.3g} (allowed: >= -{tol:g} * largest); {name} must be a "
        "second-moment (covariance) matrix"
    )


def lambda_max_lower(S):
    """A lower bound of the largest eigenvalue of the symmetric ``S`` (NumPy or torch),
    without an eigen-solve: the largest diagonal entry and the Rayleigh quotients of a
    few power iterations (those of unit vectors are lower bounds of lambda_max)."""
    xp = B.namespace(S)
    n = S.shape[0]
    m = float(xp.max(xp.linalg.diagonal(S)))
    v = xp.ones((n,), dtype=S.dtype, device=B.device(S)) / float(np.sqrt(n))
    for _ in range(3):
        w = S @ v
        m = max(m, float(xp.sum(v * w)))
        wmax = float(xp.max(xp.abs(w)))
        if wmax == 0.0:
            break
        w = w / wmax  # (no overflow in the norm for huge entries)
        v = w / float(xp.sqrt(xp.sum(w * w)))
    return m


def check_psd(S, dtype, name="sigma", *, eigenvalues=None, tol=None):
    """Refuse a symmetric ``S`` whose smallest eigenvalue is below ``-tol * lambda_max``.

    The one positive semi-definiteness policy of the library. ``S`` is the
    symmetrised float64 matrix, ``dtype`` the dtype of the user's ``sigma``
    (it sets ``tol``, default :data:`NEG_RTOL`) and ``name`` the user's
    argument, which the message names together with the smallest and largest
    eigenvalues.

    With ``eigenvalues`` (ascending, from a decomposition the caller needs
    anyway) the test is read off them. Otherwise a Cholesky factorisation of
    ``S + tol * m * I`` is tried, with ``m <= lambda_max`` a cheap lower bound
    (the largest diagonal entry and a few power-iteration Rayleigh quotients):
    it succeeds only if ``lambda_min > -tol * m >= -tol * lambda_max`` (up to
    the backward error of Cholesky, ~``n * eps`` of ``lambda_max``), which
    accepts every second-moment matrix at about a third of the cost of an
    eigen-decomposition. When it fails, the eigenvalues are computed and
    decide exactly, so the outcome is the same as with ``eigenvalues``.
    """
    if tol is None:
        tol = neg_rtol(dtype)
    n = S.shape[0]
    if n == 0:
        return
    xp = B.namespace(S)
    if eigenvalues is None:
        m = lambda_max_lower(S)
        if m > 0.0:
            shifted = xp.asarray(S, copy=True)
            idx = xp.arange(n, device=B.device(S))
            shifted[idx, idx] += tol * m
            try:
                B.cholesky(shifted)
                return
            except np.linalg.LinAlgError:
                pass
        elif m == 0.0 and float(xp.max(xp.abs(S))) == 0.0:
            return  # the zero matrix
        eigenvalues = xp.linalg.eigvalsh(S)
    lam_min = float(eigenvalues[0])
    lam_max = float(eigenvalues[-1])
    if lam_max < 0 or lam_min < -tol * max(lam_max, 0.0):
        raise _not_psd(name, lam_min, lam_max, tol)
