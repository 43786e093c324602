"""Tensor-Train decompositions: TT-SVD, and TT-matrices of Linear and conv weights.

A Linear weight ``W`` of shape ``(T, N)`` with ``N = prod s_k`` and
``T = prod t_k`` is a *TT-matrix* (Novikov et al. 2015) when

    W[(t_1..t_d), (s_1..s_d)] = G_1[s_1, t_1] G_2[s_2, t_2] ... G_d[s_d, t_d],

each ``G_k[s_k, t_k]`` an ``r_{k-1} x r_k`` matrix, ``r_0 = r_d = 1``; both
multi-indices are row-major (first mode slowest). A conv kernel ``(T, S, H, W)``
follows Garipov et al. (2016, "Ultimate tensorization"): it is read as a
matrix over ``(h, w, s_1..s_d) x (t_1..t_d)`` and

    K[t, s, h, w] = G_0[h, w] G_1[s_1, t_1] ... G_d[s_d, t_d],

with a spatial core ``G_0[h, w]`` of size ``1 x r_0`` and ``r_d = 1``.

Every core is stored as a 4-D array ``(r_{k-1}, m_k, n_k, r_k)`` (input mode
size ``m_k``, output mode size ``n_k``); the spatial core of a conv is
``(1, H*W, 1, r_0)``.

* **TT-SVD** (Oseledets 2011, :func:`tt_svd`): sequential truncated SVDs of
  the unfoldings; ranks given, or chosen from a relative tolerance ``eps``.
* **TT-ALS-Sigma** (:func:`tt_conv`, :func:`tt_linear`; the sweeps are in
  :mod:`sigmadecomp.tt_als`): exact core-by-core minimisers of
  ``tr(D Sigma D^T)``, started at the TT-SVD point, so the Sigma-error never
  exceeds that of TT-SVD. With ``sigma=None`` the same sweeps are the
  classical Frobenius TT-ALS.

Mode factoring lives in :mod:`sigmadecomp.tt_modes`, the parameter and
multiply-add counts in :mod:`sigmadecomp.costs`; their names are re-exported
here.
"""

from __future__ import annotations

import copy
import functools
import time
import warnings

from . import _backend as B
from ._threads import solver_threads
from ._tt_algebra import pair_tensor, tt_matrix, tt_svd_dense
from ._validation import (check_array, check_finite, check_flag, check_magnitude,
                          check_nonempty, check_positive_float, check_sigma)
from .contract import (
    check_callback,
    check_init_name,
    check_inner,
    check_n_iter_max,
    check_tol,
    deprecated_options,
    is_int_sequence,
    relative_error,
    same,
)
from .costs import (
    tt_layer_macs,
    tt_layer_params,
    tt_layer_ranks,
    tt_mac_count,
    tt_param_count,
    tt_ranks_for_ratio,
    tt_ranks_from_budget,
)
from .results import TTResult
from .sigma import (DEFAULT_RIDGE, _fitted_sigma, _ridge_result_fields, check_ridge,
                    solver_rtol)
from .tt_als import als_sweeps
from .tt_modes import auto_modes, check_tt_ranks, clip_ranks, resolve_modes, tt_modes

__all__ = [
    "TTResult",
    "tt_svd",
    "tt_conv",
    "tt_linear",
    "tt_modes",
    "auto_modes",
    "tt_ranks_for_ratio",
    "tt_param_count",
    "tt_mac_count",
    "tt_layer_ranks",
    "tt_layer_params",
    "tt_layer_macs",
    "tt_ranks_from_budget",
]


@solver_threads
def tt_svd(tensor, ranks=None, *, eps=None):
    """TT-SVD of a tensor (Oseledets 2011) with given ranks or a relative tolerance.

    Parameters
    ----------
    tensor : array of shape (I_1, ..., I_D)
        NumPy array or torch tensor (float32 or float64), ``D >= 1``.
    ranks : int or sequence of D-1 int, optional
        Internal ranks ``(r_1, ..., r_{D-1})``; larger values are reduced to
        the largest useful rank of each bond. Default: exact (full) ranks, or
        the ranks chosen by ``eps``.
    eps : float, optional
        Relative tolerance: each truncation discards at most
        ``eps^2 ||X||^2 / (D-1)``, so ``||X - X~|| <= eps ||X||``. With
        ``ranks`` too, ``ranks`` are upper bounds.

    Returns
    -------
    TTResult
        ``kind='tensor'``, 3-D cores ``(r_{k-1}, I_k, r_k)`` in the input's
        library, dtype and device (computed in float64); left cores have
        orthonormal columns; ``errors`` holds the relative Frobenius error.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import tt_svd
    >>> X = np.random.default_rng(0).standard_normal((4, 5, 6))
    >>> res = tt_svd(X, ranks=(3, 4))
    >>> [c.shape for c in res.cores]
    [(1, 4, 3), (3, 5, 4), (4, 6, 1)]
    >>> err = np.linalg.norm(X - res.to_tensor())
    >>> bool(err**2 <= sum(res.svd_tails) * (1 + 1e-9))
    True
    >>> float(tt_svd(X).error) < 1e-12    # full ranks: exact
    True
    """
    t0 = time.perf_counter()
    check_array(tensor, "tensor")
    if tensor.ndim < 1:
        raise ValueError("tensor has ndim=0; tensor must have at least one dimension")
    check_nonempty(tensor, "tensor")
    check_finite(tensor, "tensor")
    dims = [int(s) for s in tensor.shape]
    if eps is not None:
        eps = check_positive_float(eps, "eps", allow_zero=True)
    if ranks is not None:
        ranks = clip_ranks(check_tt_ranks(ranks, len(dims) - 1), dims)
    X = B.as_compute(tensor)
    check_magnitude(X, "tensor")
    cores, tails = tt_svd_dense(X, dims, ranks, eps)
    xp = B.namespace(X)
    total = float(xp.sum(X * X))
    approx = cores[0]
    for c in cores[1:]:
        approx = B.einsum("...a,abc->...bc", approx, c)
    diff = X - xp.reshape(approx, X.shape)
    err = relative_error(float(xp.sum(diff * diff)), total)
    return TTResult(
        errors=[err],
        n_iter=None,  # a closed form: no sweeps
        converged=None,
        weighted=False,
        seconds=time.perf_counter() - t0,
        cores=[xp.astype(c, tensor.dtype) for c in cores],
        kind="tensor",
        shape=tuple(dims),
        svd_tails=tails,
    )


# ----------------------------------------------------------------------------
# TT-matrices of Linear and conv weights
# ----------------------------------------------------------------------------

#: Default number of TT-ALS sweeps with ``sigma`` (none without: TT-SVD); with ``DEFAULT_TOL``
#: and the extrapolation step, default runs ended within 0.08% of the converged error on the
#: measured layers (``notes/sweeps.md``).
DEFAULT_SWEEPS = 100
#: Default ``tol`` of the TT-ALS sweeps (relative decrease of the error in one sweep).
DEFAULT_TOL = 1e-5
#: Default of ``extrapolate``: a guarded extrapolation step after every sweep.
DEFAULT_EXTRAPOLATE = True
#: Inner-solver defaults of the TT-ALS core updates (see ``inner``).
INNER_DEFAULTS = {"method": "auto", "rtol": 1e-4, "maxiter": 50, "dense_max": 4096,
                  "precond": True}
_RENAMED = {
    "dense_max": ("dense_max", same),
    "cg_rtol": ("rtol", same),
    "cg_maxiter": ("maxiter", same),
    "precond": ("precond", lambda v: True if isinstance(v, str) and v == "kron"
                else False if v is None else v),
}


def _legacy_modes(fn):
    """Accept the old positional ``(weight, in_modes, out_modes, ranks, sigma)`` with a warning."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(weight, *args, **kw):
        old = len(args) >= 3 or (args and "ranks" in kw) or (
            len(args) == 2 and args[1] is not None and is_int_sequence(args[1]))
        if old:
            if len(args) > 4:
                raise TypeError(f"{name}() takes at most 5 positional arguments in its old form")
            for key, value in zip(("in_modes", "out_modes", "ranks", "sigma"), args):
                if key in kw:
                    raise TypeError(f"{name}() got multiple values for argument {key!r}")
                kw[key] = value
            warnings.warn(
                f"{name}(weight, in_modes, out_modes, ranks, sigma) is deprecated and will be "
                f"removed in the next release; use {name}(weight, ranks, sigma, "
                "in_modes=..., out_modes=...)", DeprecationWarning, stacklevel=2)
            return fn(weight, **kw)
        return fn(weight, *args, **kw)

    return wrapper


def _old_tt_callback(cb):
    # the old form was called after every sweep with the cores and the error
    return lambda res: cb(list(res.cores), res.errors[-1]) if res.n_iter else None


def _random_cores(rng, ms, ns, ranks, like):
    r = (1,) + tuple(ranks) + (1,)
    return [B.random_normal(rng, (r[k], m, n, r[k + 1]), like)
            for k, (m, n) in enumerate(zip(ms, ns))]


def _run(fname, weight_m, ms, ns, ranks, sigma, S_m, *, eps, init, n_iter_max, tol, rng,
         callback, rtol, ridge, inner, make, extrapolate):
    """Validate the options, pick the start, run the sweeps; ``make(...)`` builds the result."""
    xp = B.namespace(weight_m)
    n_iter_max = check_n_iter_max(n_iter_max, 0 if sigma is None else DEFAULT_SWEEPS)
    tol = check_tol(tol, DEFAULT_TOL)
    opts = check_inner(inner, defaults=INNER_DEFAULTS, solver=fname)
    rtol = solver_rtol(rtol, sigma)  # the shared rule: the floor of sigma's dtype
    callback = check_callback(callback, fname, _old_tt_callback)
    extrapolate = check_flag(extrapolate, "extrapolate")
    rng = B.check_rng(rng)
    if eps is not None:
        eps = check_positive_float(eps, "eps", allow_zero=True)
    dims = [m * n for m, n in zip(ms, ns)]
    if init is None:
        init = "svd"
    if isinstance(init, str):
        init = check_init_name(init, fname)
        if len(dims) == 1:  # a single core has no internal bond
            ranks = () if ranks is None else check_tt_ranks(ranks, 0)
        elif ranks is None and init == "random":
            raise ValueError("ranks=None is not allowed with init='random'; give ranks")
        elif ranks is None and eps is None:
            raise ValueError("ranks=None and eps=None is not allowed; give ranks, or a tolerance eps")
        elif ranks is not None:
            ranks = clip_ranks(check_tt_ranks(ranks, len(dims) - 1), dims)
        if init == "random":
            cores, tails = _random_cores(rng, ms, ns, ranks, weight_m), []
        else:  # 'svd' and 'frobenius': the TT-SVD, the quasi-optimal Frobenius TT
            cores3, tails = tt_svd_dense(pair_tensor(weight_m, ms, ns), dims, ranks, eps)
            cores = [xp.reshape(c, (c.shape[0], m, n, c.shape[2]))
                     for c, m, n in zip(cores3, ms, ns)]
    else:
        cores, tails = [B.asarray_like(c, weight_m) for c in _check_init(init, ms, ns)], []
        _check_init_ranks(init, cores, ranks, eps, dims)
    options = {"method": opts.method, "dense_max": opts.dense_max, "rtol": opts.rtol,
               "maxiter": opts.maxiter, "precond": opts.precond, "psd_rtol": rtol}
    def partial(cores_, errors_, n_iter_, converged_):
        return callback(make(cores_, list(errors_), n_iter_, converged_, tails, None, False))

    # the TT-SVD alone is a closed form, as tt_svd; a random or given start without sweeps
    # is not (n_iter 0, converged False, as every iterative solver)
    closed = sigma is None and n_iter_max == 0 and isinstance(init, str) and init != "random"
    on_point = None if callback is None or closed else partial
    cores, errors, n_iter, converged, stats = als_sweeps(
        weight_m, S_m, cores, n_iter_max=n_iter_max, tol=tol, opts=options, on_point=on_point,
        extrapolate=bool(extrapolate))
    if closed:
        n_iter = converged = None
    result = make(cores, errors, n_iter, converged, tails, stats, True)
    if closed and callback is not None:  # as sigma_svd: once, with a copy of the result
        callback(copy.deepcopy(result))
    return result


def _check_init_ranks(init, cores, ranks, eps, dims):
    """A user-given ``init`` fixes the TT ranks: refuse ``ranks`` that differ and ``eps``."""
    if eps is not None:
        raise ValueError(
            f"eps={eps!r} is not allowed with a user-given init; eps only chooses the ranks of "
            "the TT-SVD start, and the ranks of init are used (pass eps=None)")
    if ranks is None:
        return
    have = tuple(int(c.shape[-1]) for c in cores[:-1])
    given = check_tt_ranks(ranks, len(dims) - 1)
    want = clip_ranks(given, dims)
    if have not in (tuple(given), tuple(want)):
        raise ValueError(
            f"ranks={ranks!r} is not allowed with this init; its cores have ranks {have} "
            f"(ranks clipped to the bonds give {tuple(want)}); pass ranks=None or the ranks "
            "of init")


def _check_init(init, ms, ns):
    cores = list(init.cores) if isinstance(init, TTResult) else None
    if cores is None:
        try:
            cores = list(init)
        except TypeError:
            raise TypeError(
                f"init of type {type(init).__name__} is not allowed; init must be 'svd', "
                "'frobenius', 'random', a TTResult or a list of 4-D cores") from None
    if len(cores) != len(ms):
        raise ValueError(f"init has {len(cores)} cores; it must have {len(ms)}")
    prev = 1
    for k, (c, m, n) in enumerate(zip(cores, ms, ns)):
        check_array(c, f"init core {k}")
        check_finite(c, f"init core {k}")
        if c.ndim != 4 or c.shape[0] != prev or c.shape[1] != m or c.shape[2] != n:
            raise ValueError(
                f"init core {k} has shape {tuple(c.shape)}; it must be ({prev}, {m}, {n}, r_{k})"
            )
        prev = c.shape[3]
    if prev != 1:
        raise ValueError("init's last core must end with rank 1")
    return cores


def _maker(kind, shape, ms, ns, weight_m, S_user, ridge, dtype, t0, projected=False):
    xp = B.namespace(weight_m)

    def make(cores, errors, n_iter, converged, tails, stats, final):
        other = ridge or projected  # sigma_error in another matrix than errors'
        if final or not other:  # a partial result has sigma_error only where it is errors[-1]
            ridge_, sigma_error = _ridge_result_fields(weight_m, tt_matrix(cores) if other else None,
                                                       S_user, ridge, errors[-1], projected)
        else:
            ridge_, sigma_error = ridge, None
        return TTResult(
            errors=list(errors), n_iter=n_iter, converged=converged, weighted=S_user is not None,
            seconds=time.perf_counter() - t0, ridge=ridge_, sigma_error=sigma_error,
            cores=[xp.astype(c, dtype) for c in cores], kind=kind, shape=shape,
            in_modes=tuple(ms), out_modes=tuple(ns), svd_tails=list(tails), solves=stats or {},
        )

    return make


_OPTIONS_DOC = """
    in_modes, out_modes : sequence of int, optional, keyword-only
        Channel factorisations, same length ``d`` (``1`` entries allowed).
        Default: :func:`auto_modes`; one of them given fixes ``d`` for the
        other.
    eps : float, optional
        Relative Frobenius tolerance for the TT-SVD rank choice (each of the
        ``D-1`` truncations discards at most ``eps^2 ||W||_F^2 / (D-1)``);
        with ``ranks`` too, ``ranks`` are upper bounds. The Sigma-ALS then
        keeps these ranks.
    init : {'svd', 'frobenius', 'random'}, TTResult or list of 4-D cores, optional
        Starting point: ``'svd'`` (default) and ``'frobenius'`` the TT-SVD
        (the quasi-optimal Frobenius TT), ``'random'`` standard normal cores
        drawn from ``rng`` (needs ``ranks``), or given cores (their ranks are
        used: ``ranks`` must then be None or those ranks, and ``eps`` None).
    n_iter_max : int, optional
        Maximum number of ALS sweeps. Default: 100 with ``sigma``, 0 (plain
        TT-SVD, a closed form: ``n_iter`` and ``converged`` are None, as for
        :func:`tt_svd`; from a ``'random'`` or given start they are 0 and
        False) without; ``n_iter_max > 0`` with ``sigma=None`` runs the
        Frobenius TT-ALS. TT-ALS has a long slow tail: with the defaults the
        measured layers needed 44-95 sweeps to come within 0.1% of the
        converged error (``notes/sweeps.md``); fewer sweeps trade accuracy
        for time (after 20 sweeps they were 0.6-2.2% above it).
    tol : float, optional
        The stopping rule of :mod:`sigmadecomp.contract`: stop after the first
        sweep that lowers the relative error by at most ``tol`` times its
        previous value (default, also for ``None``, ``DEFAULT_TOL = 1e-5``;
        with the extrapolation step a sweep's gain includes the step's).
    rng : None, int or numpy.random.Generator, optional
        Randomness for ``init='random'``; ``None`` is the fixed seed 0 (default
        runs are reproducible).
    callback : callable, optional
        ``callback(result)`` with the partial :class:`TTResult` at the start
        and after every sweep (:mod:`sigmadecomp.contract`); ``True`` stops.
        A closed form (``sigma=None`` and ``n_iter_max=0``, the TT-SVD) calls
        it once, with a copy of the final result, as :func:`sigmadecomp.sigma_svd`.
    rtol : float, optional
        Eigenvalue floor of the dense core solves, relative to the largest
        eigenvalue. Default: the rule shared by every solver
        (:func:`sigmadecomp.sigma.solver_rtol`), 1e-10 for a float64
        ``sigma`` (and without ``sigma``), 1e-6 for a float32 one.
    ridge : float, optional
        With ``sigma``: minimise in ``sigma + ridge * (trace(sigma) / n) * I``
        (:func:`sigmadecomp.sigma.ridge_sigma`) instead of ``sigma``, so that
        directions ``sigma`` never saw (fewer calibration samples than ``n``)
        stay close to the original weight. Default
        :data:`sigmadecomp.sigma.DEFAULT_RIDGE` (``5e-4``): on the measured
        singular layers it kept the Sigma-error within 1% of ``ridge=0`` and
        lowered both the Frobenius error and the Sigma-error on held-out data,
        though not to TT-SVD's Frobenius error (``notes/ridge.md``). ``0`` minimises the Sigma-error itself.
        ``errors`` are then relative errors in the ridged matrix and
        ``sigma_error`` is the final relative Sigma-error in ``sigma`` itself.
    inner : InnerSolver or dict, optional
        Core updates (:class:`sigmadecomp.InnerSolver`): ``method='auto'``
        solves a core densely when its system size ``r_{k-1} m_k r_k`` is at
        most ``dense_max`` (default 4096) and its interface Gram matrices fit
        in 2^25 entries, else by CG (``'cg'``/``'direct'`` force one path);
        CG ``rtol`` 1e-4, ``maxiter`` 50, ``precond=True`` (a Kronecker model
        of ``Sigma`` over (modes before, mode k, modes after) from partial
        traces). The old keywords ``dense_max``, ``cg_rtol``, ``cg_maxiter``
        and ``precond`` still work with a ``DeprecationWarning``.
    extrapolate : bool, optional
        After every sweep, try one extrapolated point ``G + beta (G - G_old)``
        in the cores (the points before and after the sweep in the same gauge:
        left-orthogonal, each bond rotated to match the previous one) and keep
        it only if its error is lower than the sweep's; ``beta`` (first 1,
        at most 30) grows 1.5x after a kept step and shrinks 0.7x after a
        refused one. ``errors`` still never increases and each entry is the
        error of the cores returned with it; ``solves['extrapolated']``
        counts the kept steps. Costs one error evaluation (a ``T x n x n``
        product, 1-3% of a sweep on the measured layers) per sweep. Default True: on the measured layers it reached
        0.1% of the converged error in about 3x fewer sweeps
        (``notes/sweeps.md``). ``False`` runs the plain sweeps (the same
        iterates as before the option existed).

    Notes
    -----
    Cost with ``sigma`` (``n`` the flattened input size, ``T`` outputs): one
    Cholesky factorisation of ``sigma`` (``n^3 / 3`` flops) to check that it
    is positive semi-definite, one ``T x n x n`` product for ``W Sigma`` and
    one per sweep for the error (two more for ``sigma_error`` when
    ``ridge > 0``); a
    dense update of core ``k`` contracts ``Sigma`` with the Gram matrices of
    the left and right interfaces (about ``n^2 (r_{k-1}^2 + r_k^2)`` flops)
    and factors a ``(r_{k-1} m_k r_k)``-square matrix (``dim^3 / 3`` flops,
    ``8 dim^2`` bytes: 134 MB and ~2e10 flops at the default
    ``dense_max=4096``); the interface Gram matrices take
    ``8 (M_< r_{k-1})^2`` bytes (``M_<`` the product of the input modes
    before core ``k``) and a core whose Gram would exceed 2^25 entries is
    updated by CG instead. A CG update costs one ``T x n x n`` product per
    iteration. For a (128, 128, 3, 3) kernel with modes (4, 4, 8) and ranks
    (9, 27, 27) (compression 8.5x) every update is dense and a sweep takes
    about 1 to 1.5 s on one CPU core.
"""


@_legacy_modes
@deprecated_options("tt_linear", _RENAMED, stacklevel=3)
@solver_threads
def tt_linear(weight, ranks=None, sigma=None, *, in_modes=None, out_modes=None, eps=None,
              init=None, n_iter_max=None, tol=DEFAULT_TOL, rng=None, callback=None, rtol=None,
              ridge=DEFAULT_RIDGE, inner=None, extrapolate=DEFAULT_EXTRAPOLATE):
    t0 = time.perf_counter()
    check_array(weight, "weight", ndim=2)
    check_nonempty(weight, "weight")
    check_finite(weight, "weight")
    T, N = (int(s) for s in weight.shape)
    ms, ns = resolve_modes(in_modes, out_modes, N, T)
    W = B.as_compute(weight)
    ridge = check_ridge(ridge)
    S = check_sigma(sigma, N, W)
    check_magnitude(W, "weight", S)
    if S is None:
        ridge = 0.0
    fitted, projected = _fitted_sigma(S, ridge)
    make = _maker("matrix", (T, N), ms, ns, W, S, ridge, weight.dtype, t0, projected)
    return _run("tt_linear", W, list(ms), list(ns), ranks, sigma, fitted,
                eps=eps, init=init, n_iter_max=n_iter_max, tol=tol, rng=rng, callback=callback,
                rtol=rtol, ridge=ridge, inner=inner, make=make, extrapolate=extrapolate)


tt_linear.__doc__ = """TT-matrix decomposition of a Linear weight, Frobenius or Sigma-weighted.

    ``W[(t_1..t_d), (s_1..s_d)] ~= G_1[s_1, t_1] ... G_d[s_d, t_d]``
    (Novikov et al. 2015). ``sigma=None`` gives the TT-SVD of the TT-matrix
    (optionally refined by Frobenius TT-ALS); a ``sigma`` runs TT-ALS-Sigma
    from the TT-SVD point, each core update the exact minimiser of
    ``tr((W - W~) Sigma (W - W~)^T)`` over that core. The options shared by
    every solver are described once in :mod:`sigmadecomp.contract`.

    Parameters
    ----------
    weight : array of shape (T, N)
        NumPy array or torch tensor, float32 or float64.
    ranks : int or sequence of d-1 int, optional
        Internal TT ranks; clipped to the largest useful rank of each bond.
    sigma : array of shape (N, N), optional
        Symmetric PSD second moment of the layer input (float64 algebra); an
        indefinite one raises ``ValueError`` (policy of
        :mod:`sigmadecomp.sigma`).
    """ + _OPTIONS_DOC + """
    Returns
    -------
    TTResult
        ``kind='matrix'``, cores ``(r_{k-1}, s_k, t_k, r_k)`` in the input's
        library, dtype and device; ``to_tensor()`` has shape (T, N).

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import tt_linear, relative_sigma_error
    >>> rng = np.random.default_rng(0)
    >>> W = rng.standard_normal((10, 32))
    >>> X = rng.standard_normal((500, 32)) * np.linspace(0.1, 2, 32)
    >>> S = X.T @ X / 500
    >>> plain = tt_linear(W, 3, in_modes=(4, 8), out_modes=(2, 5))
    >>> res = tt_linear(W, 3, S, in_modes=(4, 8), out_modes=(2, 5), ridge=0)
    >>> [c.shape for c in res.cores]
    [(1, 4, 2, 3), (3, 8, 5, 1)]
    >>> abs(res.errors[0] - relative_sigma_error(W, plain.to_tensor(), S)) < 1e-12
    True
    >>> bool(res.error <= res.errors[0])
    True
    >>> ridged = tt_linear(W, 3, S, in_modes=(4, 8), out_modes=(2, 5))   # default ridge=5e-4
    >>> abs(ridged.sigma_error - relative_sigma_error(W, ridged.to_tensor(), S)) < 1e-12
    True
    """


@_legacy_modes
@deprecated_options("tt_conv", _RENAMED, stacklevel=3)
@solver_threads
def tt_conv(kernel, ranks=None, sigma=None, *, in_modes=None, out_modes=None, eps=None,
            init=None, n_iter_max=None, tol=DEFAULT_TOL, rng=None, callback=None, rtol=None,
            ridge=DEFAULT_RIDGE, inner=None, extrapolate=DEFAULT_EXTRAPOLATE):
    t0 = time.perf_counter()
    check_array(kernel, "kernel", ndim=4)
    check_nonempty(kernel, "kernel")
    check_finite(kernel, "kernel")
    T, S_in, H, Wd = (int(s) for s in kernel.shape)
    P = H * Wd
    n = S_in * P
    ms, ns = resolve_modes(in_modes, out_modes, S_in, T)
    K = B.as_compute(kernel)
    xp = B.namespace(K)
    # (T, S, H, W) -> (T, (h, w, s)): the spatial core comes first
    Wm = xp.reshape(xp.permute_dims(xp.reshape(K, (T, S_in, P)), (0, 2, 1)), (T, n))
    ridge = check_ridge(ridge)
    S = check_sigma(sigma, n, K)
    check_magnitude(K, "kernel", S)
    Sp = None
    if S is not None:
        Sp = xp.reshape(xp.permute_dims(xp.reshape(S, (S_in, P, S_in, P)), (1, 0, 3, 2)), (n, n))
    else:
        ridge = 0.0
    fitted, projected = _fitted_sigma(Sp, ridge)
    make = _maker("conv", (T, S_in, H, Wd), ms, ns, Wm, Sp, ridge, kernel.dtype, t0, projected)
    return _run("tt_conv", Wm, [P] + list(ms), [1] + list(ns), ranks, sigma,
                fitted, eps=eps, init=init, n_iter_max=n_iter_max, tol=tol,
                rng=rng, callback=callback, rtol=rtol, ridge=ridge, inner=inner, make=make,
                extrapolate=extrapolate)


tt_conv.__doc__ = """TT decomposition of a conv kernel in Garipov's reshaping, Frobenius or Sigma.

    ``K[t, s, h, w] ~= G_0[h, w] G_1[s_1, t_1] ... G_d[s_d, t_d]`` with a
    spatial core ``G_0[h, w]`` (``1 x r_0``) and channel cores ``G_k[s_k, t_k]``
    (``r_{k-1} x r_k``, ``r_d = 1``): the TT-matrix of the kernel read as a
    matrix over ``(h, w, s_1..s_d) x (t_1..t_d)`` (Garipov et al. 2016).
    ``sigma=None`` gives its TT-SVD (optionally refined by Frobenius
    TT-ALS); a ``sigma`` runs TT-ALS-Sigma from the TT-SVD point. ``Sigma``
    couples the spatial and input-channel modes; it is permuted internally
    from the library's ``(s, h, w)`` order to ``(h, w, s)``. The options
    shared by every solver are described once in :mod:`sigmadecomp.contract`;
    the modes are keyword-only (``tt_conv(K, 4, S)`` is ranks 4 in the
    metric ``S``).

    Parameters
    ----------
    kernel : array of shape (T, S, H, W)
        NumPy array or torch tensor, float32 or float64.
    ranks : int or sequence of d int, optional
        ``(r_0, ..., r_{d-1})``, ``r_0`` the rank of the spatial core;
        clipped to the largest useful rank of each bond.
    sigma : array of shape (S*H*W, S*H*W), optional
        Symmetric PSD second moment of the input patches, indexed ``(s, h, w)``;
        an indefinite one raises ``ValueError`` (policy of
        :mod:`sigmadecomp.sigma`).
    """ + _OPTIONS_DOC + """
    Returns
    -------
    TTResult
        ``kind='conv'``; ``cores[0]`` is the spatial core ``(1, H*W, 1, r_0)``
        (``(h, w)`` row-major), ``cores[k]`` is ``(r_{k-1}, s_k, t_k, r_k)``.
        Same library, dtype and device as ``kernel``; ``to_tensor()`` has
        shape (T, S, H, W).

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import tt_conv
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((8, 6, 3, 3))
    >>> X = rng.standard_normal((300, 54)) * np.linspace(0.2, 2, 54)
    >>> S = X.T @ X / 300
    >>> res = tt_conv(K, (4, 6), S, in_modes=(2, 3), out_modes=(2, 4), n_iter_max=5)
    >>> [tuple(c.shape) for c in res.cores]
    [(1, 9, 1, 4), (4, 2, 2, 6), (6, 3, 4, 1)]
    >>> res.to_tensor().shape
    (8, 6, 3, 3)
    >>> all(b <= a + 1e-12 for a, b in zip(res.errors, res.errors[1:]))
    True
    >>> float(tt_conv(K, 100, in_modes=(2, 3), out_modes=(2, 4)).error) < 1e-12   # exact
    True
    """
