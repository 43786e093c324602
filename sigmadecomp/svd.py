"""Sigma-weighted truncated SVD: the closed form for Linear and 1x1 conv layers."""

from __future__ import annotations

import copy
import time

from . import _backend as B
from ._threads import solver_threads
from ._validation import (check_array, check_finite, check_int, check_magnitude,
                          check_nonempty, check_sigma)
from .contract import (
    check_callback,
    check_init_name,
    check_inner,
    check_n_iter_max,
    check_tol,
    relative_error,
)
from .prepared import prepared_or
from .results import SVDResult
from .sigma import (
    DEFAULT_RIDGE,
    DEFAULT_RTOL,
    NEG_ROUNDING,
    _add_ridge,
    _rel_sigma_error,
    _root_from_eigh,
    check_ridge,
    default_neg_rtol,
    psd_root,
    solver_rtol,
)

__all__ = ["sigma_svd"]


@solver_threads
def sigma_svd(weight, rank, sigma=None, *, init=None, n_iter_max=None, tol=None, rng=None,
              callback=None, rtol=DEFAULT_RTOL, ridge=DEFAULT_RIDGE, inner=None):
    """Best rank-``rank`` approximation of a matrix in the Sigma-norm.

    Minimises ``||(W - X) Sigma^{1/2}||_F`` over matrices ``X`` of rank at most
    ``rank``. With ``Sigma = L L^T`` the minimiser is ``X* = [W L]_r L^+``: the
    truncated SVD of the whitened matrix, un-whitened (design notes, section 4).
    The squared error is the tail of the squared singular values of ``W L``.
    ``sigma=None`` is the plain truncated SVD (Eckart-Young).

    The call follows the solver contract of :mod:`sigmadecomp.contract`. A
    closed form has no iterations: ``init``, ``n_iter_max``, ``tol``, ``rng``
    and ``inner`` are validated but have no effect, ``callback`` is called
    once, with the result (its return value is ignored: there is nothing left
    to stop), and the result's ``n_iter`` and ``converged`` are ``None``.

    Parameters
    ----------
    weight : array of shape (T, n)
        NumPy array or torch tensor, float32 or float64 (a Linear weight, or a
        1x1 conv weight reshaped to ``(T, S)``).
    rank : int
        Target rank, ``1 <= rank <= min(T, n)``.
    sigma : array of shape (n, n), optional
        Symmetric PSD second moment of the layer input; an indefinite one
        raises ``ValueError`` (policy of :mod:`sigmadecomp.sigma`).
        Rank-deficient input is handled by the eigenvalue floor of
        :func:`sigmadecomp.psd_root`: with ``ridge=0`` the approximation has
        no component in the floored null space, where the Sigma-norm cannot
        see it.
    init : {None, 'svd', 'frobenius'}, optional
        Accepted for the common contract; both names are the closed form.
    n_iter_max, tol, rng, inner : optional
        Accepted for the common contract and validated; no effect.
    callback : callable, optional
        ``callback(result)``, called once with a copy of the final :class:`SVDResult`
        (equal to the one returned, which the callback cannot change).
    rtol : float, optional
        Eigenvalue floor relative to the largest eigenvalue of ``sigma``
        (default: the rule shared by every solver,
        :func:`sigmadecomp.sigma.solver_rtol`: 1e-10 for a float64 ``sigma``,
        1e-6 for float32; see :func:`sigmadecomp.psd_root`).
    ridge : float, optional
        Minimise in ``sigma + ridge * (trace(sigma) / n) * I``
        (:func:`sigmadecomp.sigma.ridge_sigma`) instead of ``sigma``, so that
        directions ``sigma`` never saw keep the original weight rather than
        being dropped. Default :data:`sigmadecomp.sigma.DEFAULT_RIDGE`
        (``5e-4``): on the measured singular layers it kept the Sigma-error
        within 1% of ``ridge=0`` and lowered both the Frobenius error and the
        Sigma-error on held-out data, though not to the truncated SVD's
        Frobenius error (``notes/ridge.md``). ``0`` is the exact Sigma-optimal
        rank-``rank`` matrix.
        Ignored without ``sigma``.

    Returns
    -------
    SVDResult
        ``left`` (T, r) with orthonormal columns, ``right`` (r, n), the
        whitened singular values (of ``W L`` with ``L L^T`` the ridged
        ``sigma``), ``error`` (relative error in the metric minimised, the
        ridged ``sigma``), ``sigma_error`` (relative Sigma-error in ``sigma``
        itself), ``ridge`` and ``to_tensor()``. Factors follow the input's
        library, dtype and device; the algebra is done in float64. Signs are
        deterministic (largest entry of each left column positive).

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import sigma_svd, sigma_norm
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((6, 10))
    >>> X = rng.standard_normal((200, 10)) * np.linspace(0.1, 3, 10)
    >>> S = X.T @ X / 200
    >>> res = sigma_svd(W, 3, sigma=S)
    >>> res.left.shape, res.right.shape, res.to_tensor().shape
    ((6, 3), (3, 10), (6, 10))
    >>> plain = sigma_svd(W, 3)
    >>> bool(sigma_norm(W - res.to_tensor(), S) <= sigma_norm(W - plain.to_tensor(), S))
    True
    >>> exact = sigma_svd(W, 3, sigma=S, ridge=0)   # no ridge: error is the Sigma-error
    >>> exact.error == exact.sigma_error and exact.sigma_error <= res.sigma_error
    True
    """
    t0 = time.perf_counter()
    check_array(weight, "weight", ndim=2)
    check_nonempty(weight, "weight")
    check_finite(weight, "weight")
    if init is not None:
        if not isinstance(init, str):
            raise TypeError(
                f"init of type {type(init).__name__} is not allowed for sigma_svd; it is a "
                "closed form without a starting point (init must be None, 'svd' or 'frobenius')")
        init = check_init_name(init, "sigma_svd", ("svd", "frobenius"))
    check_n_iter_max(n_iter_max)
    check_tol(tol)
    rtol = solver_rtol(rtol, sigma)  # the shared rule: the floor of sigma's dtype
    B.check_rng(rng)
    check_inner(inner, defaults={"precond": True}, solver="sigma_svd")
    callback = check_callback(callback, "sigma_svd")
    T, n = weight.shape
    rank = check_int(rank, "rank", low=1, high=min(T, n))
    W = B.as_compute(weight)
    xp = B.namespace(W)
    ridge = check_ridge(ridge)
    S = check_sigma(sigma, n, W, psd=False)  # PSD-checked by psd_root below
    check_magnitude(W, "weight", S)

    if S is None:
        U, s, Vh = B.svd(W)
        U, Vh = B.svd_flip(U, Vh)
        left = U[:, :rank]
        right = s[:rank, None] * Vh[:rank, :]
        total = float(xp.sum(s * s))
        tail = float(xp.sum(s[rank:] ** 2))
        weighted = False
    else:
        neg = default_neg_rtol(sigma.dtype)
        root = psd_root(prepared_or(sigma, S), rtol=rtol, neg_rtol=neg)  # once per PreparedSigma
        S_user = S
        # an eigenvalue floored beyond rounding: the error below is in the floored sigma
        lam = root.eigenvalues
        floored = -float(lam[0]) > NEG_ROUNDING * max(float(lam[-1]), 0.0)
        if ridge:  # sigma + c I has the eigenvectors of sigma and eigenvalues lam + c
            S = _add_ridge(S, ridge)
            c = float(S[0, 0] - S_user[0, 0])
            root = _root_from_eigh(root.eigenvalues + c, root.eigenvectors, rtol)
        k = root.rank
        total = float(xp.sum((W @ S) * W))
        dev = B.device(W)  # new arrays on the weight's device
        if k == 0:
            left = xp.zeros((T, rank), dtype=W.dtype, device=dev)
            right = xp.zeros((rank, n), dtype=W.dtype, device=dev)
            s = xp.zeros((0,), dtype=W.dtype, device=dev)
            tail = float(root.null_energy(W))
        else:
            U, s, Vh = B.svd(root.whiten(W))
            U, Vh = B.svd_flip(U, Vh)
            r = min(rank, s.shape[0])
            left = U[:, :r]
            right = root.unwhiten(s[:r, None] * Vh[:r, :])
            if r < rank:  # sigma sees fewer than `rank` directions: pad with zeros
                left = xp.concat([left, xp.zeros((T, rank - r), dtype=W.dtype, device=dev)],
                                 axis=1)
                right = xp.concat([right, xp.zeros((rank - r, n), dtype=W.dtype, device=dev)],
                                  axis=0)
            tail = float(xp.sum(s[r:] ** 2)) + float(root.null_energy(W))
        weighted = True

    error = relative_error(tail, total)
    sigma_error = None
    if S is not None:
        exact = not ridge and not floored  # error is already measured in the user's sigma
        sigma_error = error if exact else _rel_sigma_error(W, left @ right, S_user)
    result = SVDResult(
        left=xp.astype(left, weight.dtype),
        right=xp.astype(right, weight.dtype),
        singular_values=s,
        error=error,
        rank=rank,
        weighted=weighted,
        ridge=ridge if S is not None else 0.0,
        sigma_error=sigma_error,
        seconds=time.perf_counter() - t0,
    )
    if callback is not None:
        callback(copy.deepcopy(result))  # an equal copy: the callback cannot change result
    return result
