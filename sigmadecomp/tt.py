"""Tensor-Train decompositions: TT-SVD, TT-matrices and TT-ALS in the Sigma-norm.

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

Algorithms
----------
* **TT-SVD** (Oseledets 2011): sequential truncated SVDs of the unfoldings of
  the tensor whose modes pair ``(s_k, t_k)``; the squared Frobenius error is
  at most (here: exactly) the sum of the discarded squared singular values.
  Ranks are given, or chosen from a relative tolerance ``eps``.
* **TT-ALS-Sigma**: sweeps over the cores. The approximation is linear in each
  core, so every update is the exact minimiser of the Sigma-weighted
  least-squares problem ``tr(D Sigma D^T)`` over that core. The normal
  operator is block diagonal in the output index ``t_k`` (the output side is
  not weighted), so one ``(r_{k-1} m_k r_k)``-square system is shared by the
  ``n_k`` right-hand sides. It is formed densely when that size is at most
  ``dense_max`` and solved by Cholesky (minimum-norm eigen-solve when it is
  singular, :func:`sigmadecomp.sigma.psd_solve`), otherwise solved
  matrix-free by conjugate gradients warm-started at the current core (which
  never increases the objective), preconditioned by a Kronecker model of
  ``Sigma`` built from its partial traces. Cores are kept in canonical
  (orthogonal) gauge, which does not change the approximation but keeps the
  systems well conditioned. A sweep that raises the error -- possible only
  through the eigenvalue floor of singular solves, at the level of that
  floor -- is rejected (the previous cores are kept and the run ends), so
  ``errors`` never increases. Started at the TT-SVD point, the Sigma-error
  never exceeds that of TT-SVD. With ``sigma=None`` the same sweeps are the
  classical Frobenius TT-ALS.

Modes, ranks and counts
-----------------------
:func:`auto_modes` factors channel counts into balanced modes;
:func:`tt_ranks_for_ratio` / :func:`tt_ranks_from_budget` give the largest
uniform ranks meeting a compression ratio / parameter budget, ``eps`` a
tolerance-based choice; :func:`tt_param_count` and :func:`tt_mac_count` count
parameters and multiply-adds of the TT layers (``tt_layer_*``: the same from a
weight shape with automatic modes).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field

import numpy as np

from . import _backend as B
from ._threads import solver_threads
from ._validation import (
    PRECOND_FLOOR,
    check_array,
    check_finite,
    check_int,
    check_positive_float,
    check_sigma,
)
from .results import _IterativeResult, _fmt_err, _kind, _ridge_tail
from .sigma import DEFAULT_RIDGE, _add_ridge, _ridge_result_fields, check_ridge, psd_solve
from .solvers import pcg

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


# ----------------------------------------------------------------------------
# result object
# ----------------------------------------------------------------------------


@dataclass(repr=False)
class TTResult(_IterativeResult):
    """A Tensor-Train decomposition.

    Attributes
    ----------
    cores : list of arrays
        ``kind='tensor'``: 3-D cores ``(r_{k-1}, I_k, r_k)``.
        ``kind='matrix'`` / ``'conv'``: 4-D cores ``(r_{k-1}, m_k, n_k, r_k)``
        (input mode ``m_k``, output mode ``n_k``); for a conv the first core is
        the spatial core ``(1, H*W, 1, r_0)``.
    kind : {'tensor', 'matrix', 'conv'}
    shape : tuple of int
        Shape of the approximated array (``(T, S, H, W)`` for a conv,
        ``(T, N)`` for a Linear weight).
    in_modes, out_modes : tuple of int
        Channel factorisations ``S = prod in_modes`` (``N`` for a Linear
        weight), ``T = prod out_modes``; empty for ``kind='tensor'``.
    solves : dict
        Core updates by method: ``{'dense': ..., 'cg': ..., 'cg_iter': ...}``
        (total CG iterations).
    svd_tails : list of float
        Squared Frobenius norm discarded by each truncation of the TT-SVD
        (absolute, in the float64 computation). Their sum bounds the squared
        Frobenius error of the TT-SVD point.
    errors : list of float
        Relative error in the metric minimised, starting at the TT-SVD point,
        then one entry per ALS sweep: the Sigma-error in
        ``ridge_sigma(sigma, ridge)`` (the plain Sigma-error when ``ridge=0``;
        relative Frobenius error when no ``sigma`` was given).
    ridge : float
        The ``ridge`` used (0 without ``sigma``).
    sigma_error : float or None
        Final relative Sigma-error in the user's ``sigma`` itself (``None``
        without ``sigma``); equal to ``error`` when ``ridge == 0``.
    n_iter, converged, weighted, seconds : as for the other results.
    """

    cores: list = field(default_factory=list)
    kind: str = "tensor"
    shape: tuple = ()
    in_modes: tuple = ()
    out_modes: tuple = ()
    svd_tails: list = field(default_factory=list)
    solves: dict = field(default_factory=dict)

    @property
    def ranks(self):
        """Internal TT ranks ``(r_0, ..., r_{d-1})`` (boundary ranks of 1 excluded)."""
        return tuple(int(c.shape[-1]) for c in self.cores[:-1])

    @property
    def kernel_size(self):
        """``(H, W)`` for a conv, else ``None``."""
        return tuple(self.shape[2:]) if self.kind == "conv" else None

    @property
    def n_params(self):
        """Number of entries in all cores."""
        return int(sum(math.prod(c.shape) for c in self.cores))

    def to_tensor(self):
        """Reconstruct the approximated array (its original shape and layout)."""
        if self.kind == "tensor":
            cur = self.cores[0]
            for c in self.cores[1:]:
                cur = B.einsum("...a,abc->...bc", cur, c)
            xp = B.namespace(cur)
            return xp.reshape(cur, self.shape)
        Wt = _chain(self.cores)
        xp = B.namespace(Wt)
        if self.kind == "matrix":
            return Wt
        T, S, H, Wd = self.shape
        return xp.permute_dims(xp.reshape(Wt, (T, H, Wd, S)), (0, 3, 1, 2))

    def __repr__(self):
        modes = "" if self.kind == "tensor" else f", in_modes={self.in_modes}, out_modes={self.out_modes}"
        norm = "Sigma" if self.weighted else "Frobenius"
        kind = _kind(self.cores[0]) if self.cores else ""
        return (
            f"TTResult(kind={self.kind!r}, shape={self.shape}, ranks={self.ranks}{modes}, "
            f"{norm} error={_fmt_err(self.error)}, {_ridge_tail(self)}n_iter={self.n_iter}, "
            f"converged={self.converged}, {kind})"
        )


# ----------------------------------------------------------------------------
# modes, ranks and counts
# ----------------------------------------------------------------------------


def _prime_factors(n):
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def tt_modes(n, d):
    """Factor ``n`` into ``d`` balanced integer modes (ascending, ``1`` if needed).

    Prime factors are dealt largest first to the currently smallest mode.

    Parameters
    ----------
    n : int
        Size to factor, ``n >= 1``.
    d : int
        Number of modes, ``d >= 1``.

    Returns
    -------
    modes : tuple of int
        ``len(modes) == d`` and ``prod(modes) == n``.

    Examples
    --------
    >>> from sigmadecomp.tt import tt_modes
    >>> tt_modes(128, 3)
    (4, 4, 8)
    >>> tt_modes(3, 2)
    (1, 3)
    """
    n = check_int(n, "n", low=1)
    d = check_int(d, "d", low=1)
    modes = [1] * d
    for p in sorted(_prime_factors(n), reverse=True):
        i = int(np.argmin(modes))
        modes[i] *= p
    return tuple(sorted(modes))


def auto_modes(in_size, out_size, d=None):
    """Paired input/output channel factorisations for a TT-matrix or TT-conv.

    Parameters
    ----------
    in_size, out_size : int
        ``S`` (input channels / features) and ``T`` (outputs).
    d : int, optional
        Number of channel modes; default ``ceil(log_8(max(S, T)))`` (at least
        1), so that modes are about 4 to 8 as in Garipov et al.

    Returns
    -------
    in_modes, out_modes : tuple of int
        Each of length ``d``, ascending, with products ``S`` and ``T``.

    Examples
    --------
    >>> from sigmadecomp.tt import auto_modes
    >>> auto_modes(128, 64)
    ((4, 4, 8), (4, 4, 4))
    """
    in_size = check_int(in_size, "in_size", low=1)
    out_size = check_int(out_size, "out_size", low=1)
    if d is None:
        d = max(1, math.ceil(math.log(max(in_size, out_size)) / math.log(8) - 1e-9))
    d = check_int(d, "d", low=1)
    return tt_modes(in_size, d), tt_modes(out_size, d)


def _check_modes(modes, name, total, d=None):
    if isinstance(modes, numbers.Integral):
        modes = (modes,)
    try:
        modes = tuple(modes)
    except TypeError:
        raise TypeError(f"{name}={modes!r} is not allowed; {name} must be a sequence of positive integers")
    if not modes:
        raise ValueError(f"{name}=() is not allowed; {name} must have at least one mode")
    modes = tuple(check_int(m, f"{name}[{i}]", low=1) for i, m in enumerate(modes))
    if math.prod(modes) != total:
        raise ValueError(
            f"{name}={modes} has product {math.prod(modes)}; its product must be {total}"
        )
    if d is not None and len(modes) != d:
        raise ValueError(
            f"{name}={modes} has {len(modes)} modes; it must have {d} to pair with the other modes"
        )
    return modes


def _resolve_modes(in_modes, out_modes, S, T):
    if in_modes is None and out_modes is None:
        return auto_modes(S, T)
    if in_modes is None:
        out_modes = _check_modes(out_modes, "out_modes", T)
        return tt_modes(S, len(out_modes)), out_modes
    in_modes = _check_modes(in_modes, "in_modes", S)
    if out_modes is None:
        return in_modes, tt_modes(T, len(in_modes))
    return in_modes, _check_modes(out_modes, "out_modes", T, len(in_modes))


def _bond_caps(dims):
    """Largest useful rank of each internal bond of a TT with mode sizes ``dims``."""
    D = len(dims)
    caps = [min(math.prod(dims[: k + 1]), math.prod(dims[k + 1:])) for k in range(D - 1)]
    return caps


def _clip_ranks(ranks, dims):
    """Make ranks consistent: ``r_k <= r_{k-1} d_k`` and ``r_k <= d_{k+1} r_{k+1}``."""
    r = [1] + [int(x) for x in ranks] + [1]
    for k in range(1, len(r) - 1):
        r[k] = min(r[k], r[k - 1] * dims[k - 1])
    for k in range(len(r) - 2, 0, -1):
        r[k] = min(r[k], dims[k] * r[k + 1])
    return tuple(r[1:-1])


def _check_ranks(ranks, n_bonds, name="ranks"):
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        return (check_int(ranks, name, low=1),) * n_bonds
    try:
        ranks = tuple(ranks)
    except TypeError:
        raise TypeError(
            f"{name}={ranks!r} is not allowed; {name} must be a positive int or a sequence of "
            f"{n_bonds} positive ints"
        )
    if len(ranks) != n_bonds:
        raise ValueError(
            f"{name}={ranks} has {len(ranks)} entries; this TT has {n_bonds} internal bonds, "
            f"so {name} must be an int or have {n_bonds} entries"
        )
    return tuple(check_int(r, f"{name}[{i}]", low=1) for i, r in enumerate(ranks))


def _dims(in_modes, out_modes, kernel_size):
    """Input and output mode sizes of all cores (spatial core first for a conv)."""
    ms, ns = list(in_modes), list(out_modes)
    if kernel_size is not None:
        ms = [int(math.prod(kernel_size))] + ms
        ns = [1] + ns
    return ms, ns


def tt_param_count(in_modes, out_modes, ranks, *, kernel_size=None):
    """Number of parameters of a TT-matrix / TT-conv (bias excluded).

    Parameters
    ----------
    in_modes, out_modes : sequence of int
        Paired channel modes (length ``d``).
    ranks : int or sequence of int
        Internal ranks: ``d - 1`` of them for a TT-matrix, ``d`` for a TT-conv
        (``r_0`` is the rank of the spatial core). Clipped as the
        decompositions clip them.
    kernel_size : (int, int), optional
        ``(H, W)`` for a conv kernel; ``None`` for a Linear weight.

    Returns
    -------
    int
        ``sum_k r_{k-1} m_k n_k r_k`` (``H W r_0`` for the spatial core).

    Examples
    --------
    >>> from sigmadecomp.tt import tt_param_count
    >>> tt_param_count((4, 4, 8), (4, 4, 8), 16, kernel_size=(3, 3))  # r_0 clipped to 9
    7505
    >>> tt_param_count((4, 8), (2, 5), 3)   # Linear 32 -> 10: 4*2*3 + 3*8*5
    144
    """
    ms, ns = _dims(in_modes, out_modes, kernel_size)
    dims = [m * n for m, n in zip(ms, ns)]
    r = (1,) + _clip_ranks(_check_ranks(ranks, len(dims) - 1), dims) + (1,)
    return int(sum(r[k] * ms[k] * ns[k] * r[k + 1] for k in range(len(dims))))


def tt_mac_count(in_modes, out_modes, ranks, *, kernel_size=None, out_hw=None):
    """Multiply-adds of the TT layer for one sample (Garipov's evaluation order).

    The spatial core is a convolution of each input channel with ``r_0``
    filters (``S r_0 H W`` per output position); then core ``k`` contracts
    ``(s_k, r_{k-1})`` into ``(t_k, r_k)``, costing
    ``s_{k+1}..s_d * t_1..t_{k-1} * s_k r_{k-1} t_k r_k`` per position.

    Parameters
    ----------
    in_modes, out_modes, ranks, kernel_size : as in :func:`tt_param_count`.
    out_hw : (int, int), optional
        Output spatial size of a conv; required when ``kernel_size`` is given.

    Returns
    -------
    int

    Examples
    --------
    >>> from sigmadecomp.tt import tt_mac_count
    >>> tt_mac_count((4, 8), (2, 5), 3)   # Linear 32 -> 10: 8*4*2*3 + 2*8*3*5
    432
    """
    ms, ns = _dims(in_modes, out_modes, kernel_size)
    dims = [m * n for m, n in zip(ms, ns)]
    r = (1,) + _clip_ranks(_check_ranks(ranks, len(dims) - 1), dims) + (1,)
    positions = 1
    total = 0
    off = 0
    if kernel_size is not None:
        if out_hw is None:
            raise ValueError("out_hw=None is not allowed for a conv; give the output (height, width)")
        positions = int(out_hw[0]) * int(out_hw[1])
        total += math.prod(in_modes) * r[1] * ms[0]
        off = 1
    sm, tm = list(in_modes), list(out_modes)
    for j in range(len(sm)):
        k = j + off
        rest = math.prod(sm[j + 1:]) * math.prod(tm[:j])
        total += rest * sm[j] * r[k] * tm[j] * r[k + 1]
    return int(total * positions)


def tt_ranks_for_ratio(in_modes, out_modes, ratio, *, kernel_size=None):
    """Largest uniform TT rank whose compression ratio is at least ``ratio``.

    Parameters
    ----------
    in_modes, out_modes : sequence of int
    ratio : float
        Target ``params(original) / params(TT)`` (bias excluded), ``> 0``.
    kernel_size : (int, int), optional
        ``(H, W)`` for a conv.

    Returns
    -------
    ranks : tuple of int
        Clipped ranks (``d`` for a conv, ``d - 1`` for a Linear weight).

    Raises
    ------
    ValueError
        If even rank 1 does not reach ``ratio`` (the message gives the largest
        reachable ratio).

    Examples
    --------
    >>> from sigmadecomp.tt import tt_ranks_for_ratio, tt_param_count
    >>> r = tt_ranks_for_ratio((4, 4, 8), (4, 4, 8), 10, kernel_size=(3, 3))
    >>> r
    (9, 24, 24)
    >>> 128 * 128 * 9 / tt_param_count((4, 4, 8), (4, 4, 8), r, kernel_size=(3, 3)) >= 10
    True
    """
    ratio = check_positive_float(ratio, "ratio")
    ms, ns = _dims(in_modes, out_modes, kernel_size)
    dims = [m * n for m, n in zip(ms, ns)]
    original = math.prod(ms) * math.prod(ns)
    n_bonds = len(dims) - 1
    if n_bonds == 0:
        if ratio <= 1.0:
            return ()
        raise ValueError(
            f"ratio={ratio:g} is not reachable with a single TT core (ratio 1); use more modes"
        )
    cap = max(_bond_caps(dims))

    def params(r):
        return tt_param_count(in_modes, out_modes, r, kernel_size=kernel_size)

    if original / params(1) < ratio:
        raise ValueError(
            f"ratio={ratio:g} is not reachable for in_modes={tuple(in_modes)}, "
            f"out_modes={tuple(out_modes)}: rank 1 gives {original / params(1):.3g}; "
            "ratio must be at most that"
        )
    lo, hi = 1, cap
    while lo < hi:  # params is non-decreasing in r
        mid = (lo + hi + 1) // 2
        if original / params(mid) >= ratio:
            lo = mid
        else:
            hi = mid - 1
    return _clip_ranks((lo,) * n_bonds, dims)


# --- the same counts from a weight shape, with automatic modes -------------------


def _shape_modes(shape):
    try:
        shape = tuple(int(v) for v in shape)
    except TypeError:
        raise TypeError(f"shape={shape!r} is not allowed; shape must be (T, S, H, W) or (T, n)")
    if len(shape) == 4 and min(shape) >= 1:
        T, S, H, W = shape
        return auto_modes(S, T) + ((H, W),)
    if len(shape) == 2 and min(shape) >= 1:
        T, N = shape
        return auto_modes(N, T) + (None,)
    raise ValueError(f"shape={shape} is not allowed; shape must be (T, S, H, W) or (T, n) "
                     "with positive entries")


def tt_layer_ranks(shape, ranks):
    """Validated, clipped TT ranks for a weight shape with automatic modes.

    Parameters
    ----------
    shape : tuple of int
        ``(T, S, H, W)`` (conv, modes from :func:`auto_modes`) or ``(T, n)``.
    ranks : int or sequence of int

    Returns
    -------
    ranks : tuple of int

    Examples
    --------
    >>> from sigmadecomp.tt import tt_layer_ranks
    >>> tt_layer_ranks((128, 128, 3, 3), 16)
    (9, 16, 16)
    """
    im, om, ks = _shape_modes(shape)
    ms, ns = _dims(im, om, ks)
    dims = [m * n for m, n in zip(ms, ns)]
    return _clip_ranks(_check_ranks(ranks, len(dims) - 1), dims)


def tt_layer_params(shape, ranks):
    """Weight parameters (no bias) of the TT layer for a weight shape (automatic modes).

    Examples
    --------
    >>> from sigmadecomp.tt import tt_layer_params
    >>> tt_layer_params((128, 128, 3, 3), 16)
    7505
    """
    im, om, ks = _shape_modes(shape)
    return tt_param_count(im, om, ranks, kernel_size=ks)


def tt_layer_macs(shape, ranks, out_hw=None, in_hw=None):
    """Multiply-adds per sample of the TT layer for a weight shape (automatic modes).

    ``out_hw`` is required for a conv (all TT work happens at the output
    resolution; ``in_hw`` is accepted and unused). A Linear weight ignores both.

    Examples
    --------
    >>> from sigmadecomp.tt import tt_layer_macs
    >>> tt_layer_macs((10, 64), 3)   # modes (8, 8) x (2, 5)
    624
    """
    im, om, ks = _shape_modes(shape)
    if ks is None:
        return tt_mac_count(im, om, ranks)
    return tt_mac_count(im, om, ranks, kernel_size=ks, out_hw=out_hw)


def _largest_uniform_rank(im, om, ks, budget):
    ms, ns = _dims(im, om, ks)
    dims = [m * n for m, n in zip(ms, ns)]
    if len(dims) == 1:
        return ()
    lo, hi = 1, max(_bond_caps(dims))
    while lo < hi:  # the count is non-decreasing in the uniform rank
        mid = (lo + hi + 1) // 2
        if tt_param_count(im, om, mid, kernel_size=ks) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return _clip_ranks((lo,) * (len(dims) - 1), dims)


def tt_ranks_from_budget(shape, budget, keep_proportion=True):
    """Largest uniform TT ranks whose parameter count is at most ``budget`` (at least 1).

    Parameters
    ----------
    shape : tuple of int
        ``(T, S, H, W)`` or ``(T, n)`` (automatic modes).
    budget : int
        Weight parameters allowed.
    keep_proportion : bool
        Accepted for interface compatibility with the other formats; TT
        ranks are uniform (clipped per bond).

    Returns
    -------
    ranks : tuple of int
        Rank 1 everywhere when even that exceeds the budget.

    Examples
    --------
    >>> from sigmadecomp.tt import tt_ranks_from_budget, tt_layer_params
    >>> r = tt_ranks_from_budget((128, 128, 3, 3), 128 * 128 * 9 // 8)
    >>> r, tt_layer_params((128, 128, 3, 3), r) <= 128 * 128 * 9 // 8
    ((9, 27, 27), True)
    """
    im, om, ks = _shape_modes(shape)
    budget = check_int(budget, "budget")
    return _largest_uniform_rank(im, om, ks, budget)


# ----------------------------------------------------------------------------
# TT-SVD
# ----------------------------------------------------------------------------


def _tt_svd_dense(X, dims, ranks, eps):
    """TT-SVD of the float64 tensor ``X`` with mode sizes ``dims``.

    ``ranks``: tuple of bond caps (already clipped) or None; ``eps``: relative
    Frobenius tolerance or None. Returns 3-D cores and the discarded tails.
    """
    xp = B.namespace(X)
    D = len(dims)
    if D == 1:
        return [xp.reshape(X, (1, dims[0], 1))], []
    if ranks is None:
        ranks = _clip_ranks(_bond_caps(dims), dims)
    total = float(xp.sum(X * X))
    delta2 = (eps**2) * total / (D - 1) if eps is not None else None
    cores, tails = [], []
    C = xp.reshape(X, (dims[0], -1))
    r_prev = 1
    for k in range(D - 1):
        C = xp.reshape(C, (r_prev * dims[k], -1))
        U, s, Vh = B.svd(C)
        U, Vh = B.svd_flip(U, Vh)
        r = min(ranks[k], int(s.shape[0]))
        if delta2 is not None:
            s2 = B.to_numpy(s) ** 2
            tail_from = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])  # tail_from[j] = sum s2[j:]
            r_tol = int(np.argmax(tail_from <= delta2))
            r = max(1, min(r, r_tol))
        tails.append(float(xp.sum(s[r:] ** 2)))
        cores.append(xp.reshape(U[:, :r], (r_prev, dims[k], r)))
        C = s[:r, None] * Vh[:r, :]
        r_prev = r
    cores.append(xp.reshape(C, (r_prev, dims[-1], 1)))
    return cores, tails


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
    check_finite(tensor, "tensor")
    dims = [int(s) for s in tensor.shape]
    if eps is not None:
        eps = check_positive_float(eps, "eps", allow_zero=True)
    if ranks is not None:
        ranks = _clip_ranks(_check_ranks(ranks, len(dims) - 1), dims)
    X = B.as_compute(tensor)
    cores, tails = _tt_svd_dense(X, dims, ranks, eps)
    xp = B.namespace(X)
    total = float(xp.sum(X * X))
    approx = cores[0]
    for c in cores[1:]:
        approx = B.einsum("...a,abc->...bc", approx, c)
    diff = X - xp.reshape(approx, X.shape)
    err = float(np.sqrt(float(xp.sum(diff * diff)) / total)) if total > 0 else 0.0
    return TTResult(
        errors=[err],
        n_iter=0,
        converged=True,
        weighted=False,
        seconds=time.perf_counter() - t0,
        cores=[xp.astype(c, tensor.dtype) for c in cores],
        kind="tensor",
        shape=tuple(dims),
        svd_tails=tails,
    )


# ----------------------------------------------------------------------------
# TT-matrix machinery (float64, internal)
# ----------------------------------------------------------------------------


def _chain(cores):
    """``(T, N)`` matrix of a list of 4-D TT-matrix cores (rows t, columns s, row-major)."""
    xp = B.namespace(cores[0])
    c0 = cores[0]
    cur = xp.reshape(c0, c0.shape[1:])  # (m, n, r)
    for c in cores[1:]:
        M, Tn, _ = cur.shape
        cur = B.einsum("xta,amnb->xmtnb", cur, c)
        cur = xp.reshape(cur, (M * c.shape[1], Tn * c.shape[2], c.shape[3]))
    return xp.permute_dims(cur[:, :, 0], (1, 0))


def _matrix_to_pair_tensor(W, ms, ns):
    """``W`` (T, N) -> tensor with modes ``(m_0 n_0, m_1 n_1, ...)``."""
    xp = B.namespace(W)
    D = len(ms)
    X = xp.reshape(W, tuple(ns) + tuple(ms))
    perm = []
    for k in range(D):
        perm += [D + k, k]
    X = xp.permute_dims(X, tuple(perm))
    return xp.reshape(X, tuple(m * n for m, n in zip(ms, ns)))


def _left_interfaces_step(L, C):
    """Append core ``C`` (a, m, n, b) to the left interface ``L`` (M, T, a)."""
    xp = B.namespace(L)
    M, Tl, _ = L.shape
    out = B.einsum("xta,amnb->xmtnb", L, C)
    return xp.reshape(out, (M * C.shape[1], Tl * C.shape[2], C.shape[3]))


def _right_interfaces_step(C, R):
    """Prepend core ``C`` (a, m, n, b) to the right interface ``R`` (b, M, T)."""
    xp = B.namespace(R)
    _, M, Tu = R.shape
    out = B.einsum("amnb,byu->amynu", C, R)
    return xp.reshape(out, (C.shape[0], C.shape[1] * M, C.shape[2] * Tu))


def _right_orthogonalize(cores):
    """Gauge so that cores ``1..D-1`` are right-orthogonal (the product is unchanged)."""
    xp = B.namespace(cores[0])
    cores = list(cores)
    for k in range(len(cores) - 1, 0, -1):
        a, m, n, b = cores[k].shape
        Q, Rm = B.qr(xp.permute_dims(xp.reshape(cores[k], (a, m * n * b)), (1, 0)))
        cores[k] = xp.reshape(xp.permute_dims(Q, (1, 0)), (Q.shape[1], m, n, b))
        cores[k - 1] = B.einsum("amnb,cb->amnc", cores[k - 1], Rm)
    return cores


def _left_orthogonalize_one(cores, k):
    xp = B.namespace(cores[k])
    a, m, n, b = cores[k].shape
    Q, Rm = B.qr(xp.reshape(cores[k], (a * m * n, b)))
    cores[k] = xp.reshape(Q, (a, m, n, Q.shape[1]))
    cores[k + 1] = B.einsum("cb,bmnd->cmnd", Rm, cores[k + 1])


_GRAM_MAX = 2**25  # entries of an interface Gram matrix (256 MB in float64) for a dense update


def _sq_err(W, approx, S):
    D = W - approx
    xp = B.namespace(D)
    if S is None:
        return float(xp.sum(D * D))
    return max(float(xp.sum((D @ S) * D)), 0.0)


def _kron_preconditioner(S, L, R, X, m, Y, rtol=PRECOND_FLOOR):
    """``Z -> P^{-1} Z`` with ``P = A (x) M (x) I_n (x) B`` a Kronecker model of the normal operator.

    ``A`` (r_{k-1}^2), ``M`` (m_k^2) and ``B`` (r_k^2) are the left, middle and
    right factors the normal operator would have if ``Sigma`` were a Kronecker
    product over (before, mode k, after): each is the interface contracted
    with the matching partial trace of ``Sigma`` (``O(n^2)`` work, no
    ``n x n x r`` product). CG is invariant to the scale of ``P``; eigenvalues
    below ``rtol`` times the largest are raised to that floor so ``P`` is
    positive definite, which keeps warm-started CG monotone.
    """
    xp = B.namespace(S)
    S6 = xp.reshape(S, (X, m, Y, X, m, Y))
    c = B.einsum("xsyXsy->xX", S6)  # partial trace over (mode k, after)
    d = B.einsum("xsyxsY->yY", S6)  # partial trace over (before, mode k)
    Lt = B.einsum("xta,Xta->xX", L, L)
    Rt = B.einsum("byu,bYu->yY", R, R)
    A = B.einsum("xta,Xtc,xX->ac", L, L, c)
    Bm = B.einsum("byu,dYu,yY->bd", R, R, d)
    M = B.einsum("xsyXSY,xX,yY->sS", S6, Lt, Rt)

    def inv_root(F):
        lam, V = B.eigh(0.5 * (F + F.T))
        top = float(lam[-1]) if lam.shape[0] else 0.0
        floor = max(top, 1e-300) * rtol
        return V, 1.0 / xp.where(lam > floor, lam, floor)

    VA, iA = inv_root(A)
    VM, iM = inv_root(M)
    VB, iB = inv_root(Bm)
    scale = iA[:, None, None] * iM[None, :, None] * iB[None, None, :]

    def apply(Z):  # Z: (a, m, n, b)
        Zt = B.einsum("amnb,aA,mM,bB->AMnB", Z, VA, VM, VB)
        Zt = Zt * scale[:, :, None, :]
        return B.einsum("AMnB,aA,mM,bB->amnb", Zt, VA, VM, VB)

    return apply


def _update_core(k, cores, L, R, W, WS, S, ms, ns, opts, stats):
    """Exact (or CG, warm-started) minimiser of the objective over core ``k``."""
    xp = B.namespace(W)
    a, m, n, b = cores[k].shape
    X, Tl, _ = L.shape
    _, Y, Tu = R.shape
    if S is None:
        rhs = B.einsum("tnuxmy,xta,byu->amnb", xp.reshape(W, (Tl, n, Tu, X, m, Y)), L, R)
        Lg = B.einsum("xta,xtc->ac", L, L)
        Rg = B.einsum("byu,dyu->bd", R, R)
        G = psd_solve(Lg, xp.reshape(rhs, (a, m * n * b)))
        G = xp.reshape(G, (a, m * n, b))
        Rginv = psd_solve(Rg, xp.eye(b, dtype=W.dtype, device=B.device(W)))
        G = B.einsum("aqb,bd->aqd", G, Rginv)
        stats["dense"] += 1
        return xp.reshape(G, (a, m, n, b))
    rhs = B.einsum("tnuxmy,xta,byu->amnb", xp.reshape(WS, (Tl, n, Tu, X, m, Y)), L, R)
    dim = a * m * b
    gram = max((X * a) ** 2, (Y * b) ** 2)
    if dim <= opts["dense_max"] and gram <= _GRAM_MAX:
        S6 = xp.reshape(S, (X, m, Y, X, m, Y))
        Lg = B.einsum("xta,Xtc->xaXc", L, L)
        Rg = B.einsum("byu,dYu->byYd", R, R)
        H = B.einsum("xmyXMY,xaXc,byYd->ambcMd", S6, Lg, Rg)
        H = xp.reshape(H, (dim, dim))
        rhs_m = xp.reshape(xp.permute_dims(rhs, (0, 1, 3, 2)), (dim, n))
        G = psd_solve(H, rhs_m)
        stats["dense"] += 1
        return xp.permute_dims(xp.reshape(G, (a, m, b, n)), (0, 1, 3, 2))

    def apply(Z):
        Wt = B.einsum("xta,amnb,byu->tnuxmy", L, Z, R)
        Yt = xp.reshape(xp.reshape(Wt, (Tl * n * Tu, X * m * Y)) @ S, (Tl, n, Tu, X, m, Y))
        return B.einsum("tnuxmy,xta,byu->amnb", Yt, L, R)

    precond = _kron_preconditioner(S, L, R, X, m, Y) if opts["precond"] == "kron" else None
    G, info = pcg(apply, rhs, x0=cores[k], rtol=opts["cg_rtol"], maxiter=opts["cg_maxiter"],
                  precond=precond)
    stats["cg"] += 1
    stats["cg_iter"] += info.n_iter
    return G


def _tt_matrix(W, ms, ns, ranks, eps, S, *, n_iter_max, tol, dense_max, cg_rtol, cg_maxiter,
               precond, callback, init):
    """Shared driver: TT-SVD then (Sigma-)ALS sweeps on the float64 ``W`` (T, N)."""
    xp = B.namespace(W)
    dims = [m * n for m, n in zip(ms, ns)]
    if init is None:
        cores3, tails = _tt_svd_dense(_matrix_to_pair_tensor(W, ms, ns), dims, ranks, eps)
        cores = [xp.reshape(c, (c.shape[0], m, n, c.shape[2])) for c, m, n in zip(cores3, ms, ns)]
    else:
        cores, tails = [B.as_compute(B.asarray_like(c, W)) for c in init], []
    total = _sq_err(W, 0.0 * W, S)
    approx = _chain(cores)

    def rel(sq):
        return float(np.sqrt(sq / total)) if total > 0 else 0.0

    errors = [rel(_sq_err(W, approx, S))]
    D = len(cores)
    WS = None if S is None else W @ S
    opts = {"dense_max": dense_max, "cg_rtol": cg_rtol, "cg_maxiter": cg_maxiter,
            "precond": precond}
    stats = {"dense": 0, "cg": 0, "cg_iter": 0}
    converged = n_iter_max == 0
    n_iter = 0
    stopped = False
    one = xp.ones((1, 1, 1), dtype=W.dtype, device=B.device(W))
    for it in range(1, n_iter_max + 1):
        before = cores
        cores = _right_orthogonalize(cores)
        rights = [None] * D
        rights[D - 1] = one
        for k in range(D - 1, 0, -1):
            rights[k - 1] = _right_interfaces_step(cores[k], rights[k])
        L = one
        for k in range(D):
            cores[k] = _update_core(k, cores, L, rights[k], W, WS, S, ms, ns, opts, stats)
            if k < D - 1:
                _left_orthogonalize_one(cores, k)
                L = _left_interfaces_step(L, cores[k])
        n_iter = it
        errors.append(rel(_sq_err(W, _chain(cores), S)))
        if errors[-1] > errors[-2]:
            # every update is an exact minimiser, so only the eigenvalue floor of the
            # singular solves (or CG rounding) can make a sweep worse: reject it
            cores, errors[-1] = before, errors[-2]
        prev, cur = errors[-2], errors[-1]
        if callback is not None and callback(cores, cur):
            stopped = True
        if prev - cur <= tol * max(prev, 1e-300):
            converged = True
            break
        if stopped:
            break
    return cores, tails, errors, n_iter, converged, stats


_DEFAULT_SWEEPS = 20


def _common(weight_m, ms, ns, ranks, eps, sigma, sigma_m, kw):
    """Validate options and run the driver; returns the TTResult fields."""
    n_iter_max = kw.pop("n_iter_max")
    if n_iter_max is None:
        n_iter_max = 0 if sigma is None else _DEFAULT_SWEEPS
    n_iter_max = check_int(n_iter_max, "n_iter_max", low=0)
    tol = check_positive_float(kw.pop("tol"), "tol", allow_zero=True)
    dense_max = check_int(kw.pop("dense_max"), "dense_max", low=0)
    cg_rtol = check_positive_float(kw.pop("cg_rtol"), "cg_rtol")
    cg_maxiter = check_int(kw.pop("cg_maxiter"), "cg_maxiter", low=1)
    precond = kw.pop("precond")
    if precond not in ("kron", None):
        raise ValueError(f"precond={precond!r} is not allowed; precond must be 'kron' or None")
    callback = kw.pop("callback")
    init = kw.pop("init")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback={callback!r} is not allowed; callback must be callable or None")
    dims = [m * n for m, n in zip(ms, ns)]
    if init is not None:
        init = _check_init(init, ms, ns)
        ranks = tuple(int(c.shape[-1]) for c in init[:-1])
    elif len(dims) == 1:  # a single core has no internal bond
        ranks = ()
    elif ranks is None and eps is None:
        raise ValueError("ranks=None and eps=None is not allowed; give ranks, or a tolerance eps")
    elif ranks is not None:
        ranks = _clip_ranks(_check_ranks(ranks, len(dims) - 1), dims)
    if eps is not None:
        eps = check_positive_float(eps, "eps", allow_zero=True)
    return _tt_matrix(weight_m, ms, ns, ranks, eps, sigma_m, n_iter_max=n_iter_max, tol=tol,
                      dense_max=dense_max, cg_rtol=cg_rtol, cg_maxiter=cg_maxiter,
                      precond=precond, callback=callback, init=init)


def _check_init(init, ms, ns):
    cores = list(init.cores) if isinstance(init, TTResult) else list(init)
    if len(cores) != len(ms):
        raise ValueError(f"init has {len(cores)} cores; it must have {len(ms)}")
    prev = 1
    for k, (c, m, n) in enumerate(zip(cores, ms, ns)):
        if c.ndim != 4 or c.shape[0] != prev or c.shape[1] != m or c.shape[2] != n:
            raise ValueError(
                f"init core {k} has shape {tuple(c.shape)}; it must be ({prev}, {m}, {n}, r_{k})"
            )
        prev = c.shape[3]
    if prev != 1:
        raise ValueError("init's last core must end with rank 1")
    return cores


_OPTIONS_DOC = """
    eps : float, optional
        Relative Frobenius tolerance for the TT-SVD rank choice (each of the
        ``D-1`` truncations discards at most ``eps^2 ||W||_F^2 / (D-1)``);
        with ``ranks`` too, ``ranks`` are upper bounds. The Sigma-ALS then
        keeps these ranks.
    n_iter_max : int, optional
        Maximum number of ALS sweeps. Default: 20 with ``sigma``, 0 (plain
        TT-SVD) without; ``n_iter_max > 0`` with ``sigma=None`` runs the
        Frobenius TT-ALS.
    tol : float, optional
        Stop when a sweep lowers the relative error by at most ``tol`` times
        its previous value (default 1e-6).
    dense_max : int, optional
        Largest system size ``r_{k-1} m_k r_k`` solved by a dense normal
        matrix (default 4096); bigger core updates use conjugate gradients.
    cg_rtol, cg_maxiter : float, int, optional
        Inner CG tolerance and iteration cap (defaults 1e-4, 50).
    precond : {'kron', None}, optional
        CG preconditioner: ``'kron'`` (default) models ``Sigma`` as a
        Kronecker product over (modes before, mode k, modes after) through
        partial traces (exact when it is one); ``None``: plain CG.
    init : TTResult or list of 4-D cores, optional
        Starting cores instead of the TT-SVD (their ranks are used).
    callback : callable, optional
        ``callback(cores, error)`` after every sweep (float64 cores); a true
        return value stops the sweeps.
    ridge : float, optional
        With ``sigma``: minimise in ``sigma + ridge * (trace(sigma) / n) * I``
        (:func:`sigmadecomp.sigma.ridge_sigma`) instead of ``sigma``, so that
        directions ``sigma`` never saw (fewer calibration samples than ``n``)
        stay close to the original weight. Default ``1e-2``: on a ResNet layer
        calibrated with fewer patches than ``n`` it raised the Sigma-error by
        less than 0.1% and lowered both the Frobenius error and the
        Sigma-error on held-out data, though not to TT-SVD's Frobenius error
        (``notes/ridge.md``). ``0`` minimises the Sigma-error itself.
        ``errors`` are then relative errors in the ridged matrix and
        ``sigma_error`` is the final relative Sigma-error in ``sigma`` itself.

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


@solver_threads
def tt_linear(weight, in_modes=None, out_modes=None, ranks=None, sigma=None, *, eps=None,
              n_iter_max=None, tol=1e-6, dense_max=4096, cg_rtol=1e-4, cg_maxiter=50,
              precond="kron", init=None, callback=None, ridge=DEFAULT_RIDGE):
    t0 = time.perf_counter()
    check_array(weight, "weight", ndim=2)
    check_finite(weight, "weight")
    T, N = (int(s) for s in weight.shape)
    ms, ns = _resolve_modes(in_modes, out_modes, N, T)
    W = B.as_compute(weight)
    ridge = check_ridge(ridge)
    S = check_sigma(sigma, N, W)
    cores, tails, errors, n_iter, converged, stats = _common(
        W, list(ms), list(ns), ranks, eps, sigma, _add_ridge(S, ridge),
        dict(n_iter_max=n_iter_max, tol=tol, dense_max=dense_max, cg_rtol=cg_rtol,
             cg_maxiter=cg_maxiter, precond=precond, callback=callback, init=init))
    xp = B.namespace(W)
    ridge, sigma_error = _ridge_result_fields(W, _chain(cores), S, ridge, errors[-1])
    return TTResult(
        errors=errors, n_iter=n_iter, converged=converged, weighted=S is not None,
        seconds=time.perf_counter() - t0, ridge=ridge, sigma_error=sigma_error,
        cores=[xp.astype(c, weight.dtype) for c in cores],
        kind="matrix", shape=(T, N), in_modes=tuple(ms), out_modes=tuple(ns), svd_tails=tails,
        solves=stats,
    )


tt_linear.__doc__ = """TT-matrix decomposition of a Linear weight, Frobenius or Sigma-weighted.

    ``W[(t_1..t_d), (s_1..s_d)] ~= G_1[s_1, t_1] ... G_d[s_d, t_d]``
    (Novikov et al. 2015). ``sigma=None`` gives the TT-SVD of the TT-matrix
    (optionally refined by Frobenius TT-ALS); a ``sigma`` runs TT-ALS-Sigma
    from the TT-SVD point, each core update the exact minimiser of
    ``tr((W - W~) Sigma (W - W~)^T)`` over that core.

    Parameters
    ----------
    weight : array of shape (T, N)
        NumPy array or torch tensor, float32 or float64.
    in_modes, out_modes : sequence of int, optional
        ``N = prod in_modes``, ``T = prod out_modes``, same length ``d``
        (``1`` entries allowed). Default: :func:`auto_modes`; one of them
        given fixes ``d`` for the other.
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
    >>> plain = tt_linear(W, (4, 8), (2, 5), ranks=3)
    >>> res = tt_linear(W, (4, 8), (2, 5), ranks=3, sigma=S, ridge=0)
    >>> [c.shape for c in res.cores]
    [(1, 4, 2, 3), (3, 8, 5, 1)]
    >>> abs(res.errors[0] - relative_sigma_error(W, plain.to_tensor(), S)) < 1e-12
    True
    >>> bool(res.error <= res.errors[0])
    True
    >>> ridged = tt_linear(W, (4, 8), (2, 5), ranks=3, sigma=S)   # default ridge=1e-2
    >>> abs(ridged.sigma_error - relative_sigma_error(W, ridged.to_tensor(), S)) < 1e-12
    True
    """


@solver_threads
def tt_conv(kernel, in_modes=None, out_modes=None, ranks=None, sigma=None, *, eps=None,
            n_iter_max=None, tol=1e-6, dense_max=4096, cg_rtol=1e-4, cg_maxiter=50,
            precond="kron", init=None, callback=None, ridge=DEFAULT_RIDGE):
    t0 = time.perf_counter()
    check_array(kernel, "kernel", ndim=4)
    check_finite(kernel, "kernel")
    T, S_in, H, Wd = (int(s) for s in kernel.shape)
    P = H * Wd
    n = S_in * P
    ms, ns = _resolve_modes(in_modes, out_modes, S_in, T)
    K = B.as_compute(kernel)
    xp = B.namespace(K)
    # (T, S, H, W) -> (T, (h, w, s)): the spatial core comes first
    Wm = xp.reshape(xp.permute_dims(xp.reshape(K, (T, S_in, P)), (0, 2, 1)), (T, n))
    ridge = check_ridge(ridge)
    S = check_sigma(sigma, n, K)
    Sp = None
    if S is not None:
        Sp = xp.reshape(xp.permute_dims(xp.reshape(S, (S_in, P, S_in, P)), (1, 0, 3, 2)), (n, n))
    cores, tails, errors, n_iter, converged, stats = _common(
        Wm, [P] + list(ms), [1] + list(ns), ranks, eps, sigma, _add_ridge(Sp, ridge),
        dict(n_iter_max=n_iter_max, tol=tol, dense_max=dense_max, cg_rtol=cg_rtol,
             cg_maxiter=cg_maxiter, precond=precond, callback=callback, init=init))
    ridge, sigma_error = _ridge_result_fields(Wm, _chain(cores), Sp, ridge, errors[-1])
    return TTResult(
        errors=errors, n_iter=n_iter, converged=converged, weighted=S is not None,
        seconds=time.perf_counter() - t0, ridge=ridge, sigma_error=sigma_error,
        cores=[xp.astype(c, kernel.dtype) for c in cores],
        kind="conv", shape=(T, S_in, H, Wd), in_modes=tuple(ms), out_modes=tuple(ns),
        svd_tails=tails, solves=stats,
    )


tt_conv.__doc__ = """TT decomposition of a conv kernel in Garipov's reshaping, Frobenius or Sigma.

    ``K[t, s, h, w] ~= G_0[h, w] G_1[s_1, t_1] ... G_d[s_d, t_d]`` with a
    spatial core ``G_0[h, w]`` (``1 x r_0``) and channel cores ``G_k[s_k, t_k]``
    (``r_{k-1} x r_k``, ``r_d = 1``): the TT-matrix of the kernel read as a
    matrix over ``(h, w, s_1..s_d) x (t_1..t_d)`` (Garipov et al. 2016).
    ``sigma=None`` gives its TT-SVD (optionally refined by Frobenius
    TT-ALS); a ``sigma`` runs TT-ALS-Sigma from the TT-SVD point. ``Sigma``
    couples the spatial and input-channel modes; it is permuted internally
    from the library's ``(s, h, w)`` order to ``(h, w, s)``.

    Parameters
    ----------
    kernel : array of shape (T, S, H, W)
        NumPy array or torch tensor, float32 or float64.
    in_modes, out_modes : sequence of int, optional
        ``S = prod in_modes``, ``T = prod out_modes``, same length ``d``
        (``1`` entries allowed). Default: :func:`auto_modes`.
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
    >>> res = tt_conv(K, (2, 3), (2, 4), ranks=(4, 6), sigma=S, n_iter_max=5)
    >>> [tuple(c.shape) for c in res.cores]
    [(1, 9, 1, 4), (4, 2, 2, 6), (6, 3, 4, 1)]
    >>> res.to_tensor().shape
    (8, 6, 3, 3)
    >>> all(b <= a + 1e-12 for a, b in zip(res.errors, res.errors[1:]))
    True
    >>> float(tt_conv(K, (2, 3), (2, 4), ranks=100).error) < 1e-12   # full ranks: exact
    True
    """
