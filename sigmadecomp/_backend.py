"""The few array operations the array API standard lacks, per library.

Every public function of :mod:`sigmadecomp` is written once against the array
API standard (through :mod:`array_api_compat`). NumPy arrays take the
reference path (SciPy where the standard has no routine); torch tensors run the
same algorithm on their own device. This module is the only place that knows
which library it is talking to.

There is no global backend switch: the library of the first array argument
decides, and new arrays follow its dtype and device.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import opt_einsum
import scipy.linalg
from array_api_compat import array_namespace, is_numpy_array, is_torch_array
from array_api_compat import device as _device

__all__ = [
    "namespace",
    "is_torch",
    "is_array",
    "arrays_equal",
    "device",
    "to_numpy",
    "asarray_like",
    "as_compute",
    "einsum",
    "eigh",
    "svd",
    "svd_flip",
    "solve_triangular",
    "cholesky",
    "cho_solve",
    "check_rng",
    "random_normal",
    "qr",
]


def no_autograd(func):
    """Decorator: run ``func`` without recording autograd (when torch is loaded).

    A decomposition or an error figure is not differentiated; torch inputs
    that require gradients (an ``nn.Parameter``) then give plain tensors and
    scalars, without a graph or torch's warning about converting them.
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        torch = sys.modules.get("torch")
        if torch is not None and torch.is_grad_enabled():
            with torch.no_grad():
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    return wrapper


def namespace(*arrays):
    """Array namespace of the non-``None`` arguments (``array_api_compat``)."""
    return array_namespace(*[a for a in arrays if a is not None])


def is_torch(x) -> bool:
    return is_torch_array(x)


def is_array(x) -> bool:
    """Whether ``x`` is a NumPy array or a torch tensor."""
    return is_numpy_array(x) or is_torch_array(x)


def arrays_equal(a, b) -> bool:
    """Whether ``a`` and ``b`` are arrays of one library, dtype, device and shape with
    equal entries (NaN equal to NaN)."""
    if not (is_array(a) and is_array(b)) or is_torch_array(a) != is_torch_array(b):
        return False
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if is_torch_array(a):
        if a.device != b.device:
            return False
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def device(x):
    return _device(x)


def to_numpy(x) -> np.ndarray:
    """A NumPy copy/view of ``x`` (moved to host memory if needed)."""
    if is_torch_array(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def asarray_like(x, like, dtype=None):
    """Convert ``x`` (NumPy, torch, list, scalar) to the library and device of ``like``.

    ``dtype`` defaults to the dtype of ``like``.
    """
    xp = namespace(like)
    if dtype is None:
        dtype = like.dtype
    if is_torch_array(like):
        import torch

        if is_torch_array(x):
            return x.to(device=like.device, dtype=dtype)
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=like.device)
    if is_torch_array(x):
        x = x.detach().cpu().numpy()
    return xp.asarray(np.asarray(x), dtype=dtype)


def as_compute(x, dtype=None):
    """``x`` in the compute dtype (float64 unless ``dtype`` is given), same device."""
    xp = namespace(x)
    target = xp.float64 if dtype is None else dtype
    if x.dtype == target:
        return x
    return xp.astype(x, target)


def einsum(subscripts, *operands, optimize="auto"):
    """``opt_einsum.contract`` (works on NumPy arrays and torch tensors alike)."""
    return opt_einsum.contract(subscripts, *operands, optimize=optimize)


def eigh(a):
    """Eigen-decomposition of a symmetric matrix, eigenvalues ascending."""
    if is_numpy_array(a):
        return scipy.linalg.eigh(a, driver="evd", check_finite=False)
    xp = namespace(a)
    res = xp.linalg.eigh(a)
    return res[0], res[1]


def svd(a):
    """Thin SVD ``a = u @ diag(s) @ vh``, singular values descending."""
    if is_numpy_array(a):
        try:
            return scipy.linalg.svd(a, full_matrices=False, check_finite=False,
                                    lapack_driver="gesdd")
        except np.linalg.LinAlgError:  # gesdd may fail to converge; gesvd is robust
            return scipy.linalg.svd(a, full_matrices=False, check_finite=False,
                                    lapack_driver="gesvd")
    xp = namespace(a)
    u, s, vh = xp.linalg.svd(a, full_matrices=False)
    return u, s, vh


def svd_flip(u, vh):
    """Deterministic signs: the largest-magnitude entry of each column of ``u`` is positive.

    Returns new ``(u, vh)``; ``u @ diag(s) @ vh`` is unchanged.
    """
    xp = namespace(u)
    if u.shape[1] == 0:
        return u, vh
    idx = xp.argmax(xp.abs(u), axis=0)
    picked = xp.take_along_axis(u, idx[None, :], axis=0)[0]
    signs = xp.where(picked < 0, -1.0, 1.0)
    signs = xp.astype(signs, u.dtype)
    return u * signs[None, :], vh * signs[:, None]


def solve_triangular(a, b, *, lower):
    """Solve ``a @ x = b`` with ``a`` triangular."""
    if is_numpy_array(a):
        return scipy.linalg.solve_triangular(a, b, lower=lower, check_finite=False)
    import torch

    return torch.linalg.solve_triangular(a, b, upper=not lower)


def cholesky(a):
    """Lower Cholesky factor; raises ``numpy.linalg.LinAlgError`` if not PD (both libraries)."""
    if is_numpy_array(a):
        return scipy.linalg.cholesky(a, lower=True, check_finite=False)
    import torch

    L, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise np.linalg.LinAlgError("matrix is not positive definite")
    return L


def cho_solve(L, b):
    """Solve ``(L L^T) x = b`` given the lower Cholesky factor ``L``."""
    if is_numpy_array(L):
        return scipy.linalg.cho_solve((L, True), b, check_finite=False)
    import torch

    if b.ndim == 1:
        return torch.cholesky_solve(b[:, None], L, upper=False)[:, 0]
    return torch.cholesky_solve(b, L, upper=False)


def qr(a):
    """Thin QR factorisation."""
    xp = namespace(a)
    if is_numpy_array(a):
        return scipy.linalg.qr(a, mode="economic", check_finite=False)
    q, r = xp.linalg.qr(a)
    return q, r


def check_rng(rng):
    """Normalise ``rng`` (None, int, or Generator) into a ``numpy.random.Generator``.

    ``None`` is the fixed seed 0 (the contract of every solver): default runs
    are reproducible; pass a Generator or another seed for other draws.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng(0)
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"rng={rng!r} is not allowed; an int seed must be non-negative")
        return np.random.default_rng(rng)
    raise TypeError(
        f"rng={rng!r} is not allowed; rng must be None, an int seed or a "
        "numpy.random.Generator"
    )


def random_normal(rng, shape, like, dtype=None):
    """Standard normal draws made in NumPy, moved to the library/device of ``like``."""
    return asarray_like(check_rng(rng).standard_normal(shape), like, dtype=dtype)
