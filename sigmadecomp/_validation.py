"""Input checks shared by every public function.

Each check raises a ``TypeError`` or ``ValueError`` whose message names the
argument, the value (or its shape/dtype) and what is allowed.
"""

from __future__ import annotations

import numbers

import numpy as np
from array_api_compat import is_array_api_obj, is_numpy_array, is_torch_array

from . import _backend as B

_FLOAT_NAMES = ("float32", "float64")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


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


def check_positive_float(value, name, *, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise TypeError(f"{name}={value!r} is not allowed; {name} must be a finite real number")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be {bound}")
    return float(value)


def check_choice(value, name, choices):
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be one of {allowed}")
    return value


def check_sigma(sigma, n, like, name="sigma", *, sym_rtol=None):
    """Validate a ``(n, n)`` symmetric second-moment matrix.

    Returns ``sigma`` converted to the library and device of ``like`` in float64
    and exactly symmetrised. Raises if the shape is wrong, the entries are not
    finite, or the matrix is not symmetric to within ``sym_rtol`` (relative to
    its largest entry; default 1e-6 for float32 input, 1e-10 for float64).
    Positive semi-definiteness is checked where the matrix is factored
    (:func:`sigmadecomp.psd_root`).
    """
    if sigma is None:
        return None
    check_array(sigma, name, ndim=2)
    if tuple(sigma.shape) != (n, n):
        raise ValueError(
            f"{name} has shape {tuple(sigma.shape)}; {name} must be ({n}, {n}) to match "
            f"the flattened input dimension n={n} of the weight"
        )
    if sym_rtol is None:
        sym_rtol = 1e-6 if _dtype_name(sigma.dtype) == "float32" else 1e-10
    s = B.asarray_like(sigma, like, dtype=B.namespace(like).float64)
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
    return 0.5 * (s + s.T)
