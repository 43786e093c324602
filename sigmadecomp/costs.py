# One concept, the cost models of every factorized format (SVD, Tucker-2, CP and
# Tensor-Train: parameter and multiply-add counts, ratio -> ranks, the method
# registry); longer than ~600 lines because the TT counts live here too.
"""Cost models of the factorized formats: parameter and multiply-add counts, ratio -> ranks.

Three ways to choose the ranks of a factorized layer:

* **a compression ratio per layer** -- :func:`ratio_to_ranks` returns the
  ranks whose parameter count is the largest not exceeding
  ``params(dense) / ratio``; :func:`layer_params` and :func:`layer_macs`
  count the weights and the multiply-adds of a factorized layer;
* **EVBMF** (Nakajima et al., JMLR 2013) -- :func:`evbmf` estimates the rank
  of a noisy matrix from its singular values alone; :func:`evbmf_ranks`
  applies it to the (Sigma-whitened) unfoldings of a weight;
* **a global budget** -- :func:`allocate_ranks` distributes a total parameter
  (or multiply-add) budget over several layers so that the summed (or the
  largest) relative Sigma-error is as small as possible, using each layer's
  error-versus-rank curve (:func:`error_curve`).

Layouts
-------
``shape`` is a weight shape in torch layout: ``(T, S, H, W)`` for a conv,
``(T, n)`` for a Linear layer. The factorized layers counted here are the
sequences of plain convolutions of the torch adapter:

=========  ==================================================  ==========================
method     layers                                              parameters (no bias)
=========  ==================================================  ==========================
dense      the original layer                                  ``T*S*H*W`` (``T*n``)
svd        ``HxW`` conv ``S->r`` then ``1x1`` conv ``r->T``     ``r*(T + S*H*W)``
           (Linear: ``n->r`` then ``r->T``)                    (``r*(T + n)``)
tucker2    ``1x1 S->r_S``, ``HxW r_S->r_T``, ``1x1 r_T->T``    ``S*r_S + r_T*r_S*H*W + T*r_T``
cp         ``1x1 S->R``, ``Hx1`` and ``1xW`` depthwise,        ``R*(S + H + W + T)``
           ``1x1 R->T``
=========  ==================================================  ==========================

The methods live in one table (:data:`METHODS`); a new format (for instance
Tensor-Train) is added with :func:`register_method` and is then understood by
the counts and :func:`ratio_to_ranks`, and by the allocation when its
:class:`MethodSpec` provides candidates and an error curve.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np

from ._validation import (COUNT_SLACK, check_flag, check_int, check_positive_float,
                          is_positive_int_tuple)
from .tt_modes import bond_caps, check_tt_ranks, clip_ranks, core_dims, shape_modes

__all__ = [
    "METHODS",
    "MethodSpec",
    "register_method",
    "layer_params",
    "layer_macs",
    "ratio_to_ranks",
    "tt_param_count",
    "tt_mac_count",
    "tt_ranks_for_ratio",
    "tt_layer_ranks",
    "tt_layer_params",
    "tt_layer_macs",
    "tt_ranks_from_budget",
    "check_shape",
    "check_hw_pair",
    "method_spec",
    "proportional_pairs",
    "tucker2_params_arr",
]


# ---------------------------------------------------------------------------
# shapes and rank arguments
# ---------------------------------------------------------------------------


def check_shape(shape, name="shape"):
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(
            f"{name}={shape!r} is not allowed; {name} must be a weight shape "
            "(T, S, H, W) or (T, n)"
        ) from None
    if len(dims) not in (2, 4) or not is_positive_int_tuple(dims):
        raise ValueError(
            f"{name}={shape!r} is not allowed; {name} must be a weight shape of positive "
            "integers, (T, S, H, W) for a conv or (T, n) for a Linear layer"
        )
    return tuple(int(d) for d in dims)


def _check_hw(hw, name):
    if hw is None:
        return None
    try:
        pair = tuple(hw)
    except TypeError:
        raise TypeError(f"{name}={hw!r} is not allowed; {name} must be a pair (H, W)") from None
    if not is_positive_int_tuple(pair, 2):
        raise ValueError(
            f"{name}={hw!r} is not allowed; {name} must be a pair of positive integers (H, W)"
        )
    return int(pair[0]), int(pair[1])


def _svd_ranks(shape, ranks):
    T, n = shape[0], math.prod(shape[1:])
    return check_int(ranks, "ranks", low=1, high=min(T, n))


def _tucker2_ranks(shape, ranks):
    T, S = shape[0], shape[1]
    try:
        pair = tuple(ranks)
    except TypeError:
        raise TypeError(
            f"ranks={ranks!r} is not allowed; Tucker-2 ranks must be a pair (r_T, r_S)"
        ) from None
    if len(pair) != 2:
        raise ValueError(
            f"ranks={ranks!r} is not allowed; Tucker-2 ranks must be a pair (r_T, r_S)"
        )
    r_t = check_int(pair[0], "ranks[0] (r_T)", low=1, high=T)
    r_s = check_int(pair[1], "ranks[1] (r_S)", low=1, high=S)
    return r_t, r_s


def _cp_ranks(shape, ranks):
    return check_int(ranks, "ranks", low=1)


# ---------------------------------------------------------------------------
# cost formulas per method
# ---------------------------------------------------------------------------


def _svd_params(shape, r):
    return r * (shape[0] + math.prod(shape[1:]))


def _svd_macs(shape, r, out_hw, in_hw):
    T, n = shape[0], math.prod(shape[1:])
    if len(shape) == 2:
        return r * (n + T)
    return r * (n + T) * out_hw[0] * out_hw[1]


def _tucker2_params(shape, ranks):
    T, S, H, W = shape
    r_t, r_s = ranks
    return S * r_s + r_t * r_s * H * W + T * r_t


def _tucker2_macs(shape, ranks, out_hw, in_hw):
    T, S, H, W = shape
    r_t, r_s = ranks
    lo, li = out_hw[0] * out_hw[1], in_hw[0] * in_hw[1]
    return S * r_s * li + r_t * r_s * H * W * lo + T * r_t * lo


def _cp_params(shape, R):
    T, S, H, W = shape
    return R * (S + H + W + T)


def _cp_macs(shape, R, out_hw, in_hw):
    T, S, H, W = shape
    (ho, wo), (hi, wi) = out_hw, in_hw
    # 1x1 at the input size; Hx1 depthwise gives (ho, wi); 1xW depthwise gives (ho, wo)
    return R * (S * hi * wi + H * ho * wi + W * ho * wo + T * ho * wo)


def _svd_from_budget(shape, budget, keep_proportion):
    T, n = shape[0], math.prod(shape[1:])
    return min(max(budget // (T + n), 1), min(T, n))


def _cp_from_budget(shape, budget, keep_proportion):
    return max(budget // sum(shape), 1)


def proportional_pairs(T, S):
    """Rank pairs ``(r_T, r_S)`` with ``r_T / r_S ~= T / S`` (arrays, increasing)."""
    rs = np.arange(1, S + 1)
    rt = np.clip(np.floor(rs * T / S + 0.5).astype(np.int64), 1, T)
    rt2 = np.arange(1, T + 1)
    rs2 = np.clip(np.floor(rt2 * S / T + 0.5).astype(np.int64), 1, S)
    pairs = np.unique(np.stack([np.concatenate([rt, rt2]), np.concatenate([rs, rs2])], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def tucker2_params_arr(shape, rt, rs):
    T, S, H, W = shape
    return S * rs + rt * rs * H * W + T * rt


def _tucker2_from_budget(shape, budget, keep_proportion):
    T, S, H, W = shape
    if keep_proportion:
        rt, rs = proportional_pairs(T, S)
    else:
        rs = np.arange(1, S + 1, dtype=np.int64)
        rt = np.minimum((budget - S * rs) // (rs * H * W + T), T)
    p = tucker2_params_arr(shape, rt, rs)
    ok = (rt >= 1) & (p <= budget)
    if not np.any(ok):
        return 1, 1
    rt, rs, p = rt[ok], rs[ok], p[ok]
    # the largest count; ties broken towards the T:S proportion, then the larger r_S
    skew = np.abs(rt / T - rs / S)
    best = np.lexsort((-rs, skew, -p))[0]
    return int(rt[best]), int(rs[best])


@dataclass(frozen=True)
class MethodSpec:
    """How one factorized format counts its cost and reads its ranks.

    Attributes
    ----------
    ndims : tuple of int
        Weight dimensions the format accepts (2 for Linear, 4 for conv).
    check_ranks : callable ``(shape, ranks) -> ranks``
        Validates and normalises a rank argument.
    params : callable ``(shape, ranks) -> int``
        Weight parameters of the factorized layer.
    macs : callable ``(shape, ranks, out_hw, in_hw) -> int``
        Multiply-adds per input sample (``out_hw``/``in_hw`` are None for Linear).
    from_budget : callable ``(shape, budget, keep_proportion) -> ranks``
        The ranks with the largest parameter count ``<= budget`` (an int),
        at least rank 1 each.
    candidates : callable ``(shape, keep_proportion) -> list of ranks``, optional
        Rank choices offered to :func:`allocate_ranks`, in increasing cost.
    curve : callable ``(spectra, candidates) -> array``, optional
        Proxy relative errors of the candidates from the whitened spectra
        (see :func:`error_curve`).
    """

    ndims: tuple
    check_ranks: Callable
    params: Callable
    macs: Callable
    from_budget: Callable
    candidates: Optional[Callable] = None
    curve: Optional[Callable] = None


#: The factorized formats known to this module, by name. Extend with
#: :func:`register_method`.
METHODS: Dict[str, MethodSpec] = {}


def register_method(name, spec):
    """Add (or replace) a factorized format in :data:`METHODS`.

    Parameters
    ----------
    name : str
        The ``method`` string users pass (e.g. ``'tt'``).
    spec : MethodSpec

    Examples
    --------
    >>> from sigmadecomp import ranks
    >>> sorted(ranks.METHODS)
    ['cp', 'svd', 'tt', 'tucker2']
    """
    if not isinstance(name, str) or not name or name == "dense":
        raise ValueError(f"name={name!r} is not allowed; name must be a non-empty string other than 'dense'")
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"spec of type {type(spec).__name__} is not allowed; spec must be a MethodSpec")
    METHODS[name] = spec


def method_spec(method, shape=None):
    if not isinstance(method, str) or method not in METHODS:
        allowed = ", ".join(repr(m) for m in sorted(METHODS))
        raise ValueError(f"method={method!r} is not allowed; method must be one of {allowed}")
    spec = METHODS[method]
    if shape is not None and len(shape) not in spec.ndims:
        kinds = " or ".join("(T, n)" if d == 2 else "(T, S, H, W)" for d in spec.ndims)
        raise ValueError(
            f"method={method!r} does not apply to a weight of shape {shape}; it needs a "
            f"weight shape {kinds}"
        )
    return spec


def layer_params(shape, method, ranks):
    """Weight parameters (no bias) of a factorized layer.

    Parameters
    ----------
    shape : tuple of int
        Weight shape, ``(T, S, H, W)`` for a conv or ``(T, n)`` for a Linear layer.
    method : {'dense', 'svd', 'tucker2', 'cp'}
        ``'dense'`` (with ``ranks=None``) counts the original layer. For a conv,
        ``'svd'`` factors ``K_(1)`` of shape ``(T, S*H*W)``.
    ranks : None, int or (int, int)
        ``None`` for dense, ``r`` for svd, ``(r_T, r_S)`` for tucker2, ``R`` for cp.

    Returns
    -------
    params : int
        ``r*(T + n)`` (svd), ``S*r_S + r_T*r_S*H*W + T*r_T`` (tucker2),
        ``R*(S + H + W + T)`` (cp).

    Examples
    --------
    >>> from sigmadecomp.ranks import layer_params
    >>> layer_params((64, 32, 3, 3), 'dense', None)
    18432
    >>> layer_params((64, 32, 3, 3), 'tucker2', (16, 8))
    2432
    >>> layer_params((64, 32, 3, 3), 'cp', 10), layer_params((10, 20), 'svd', 2)
    (1020, 60)
    """
    shape = check_shape(shape)
    if method == "dense":
        if ranks is not None:
            raise ValueError(f"ranks={ranks!r} is not allowed for method='dense'; use ranks=None")
        return math.prod(shape)
    spec = method_spec(method, shape)
    return int(spec.params(shape, spec.check_ranks(shape, ranks)))


def check_hw_pair(shape, out_hw, in_hw):
    out_hw = _check_hw(out_hw, "out_hw")
    in_hw = _check_hw(in_hw, "in_hw")
    if len(shape) == 2:
        if out_hw is not None or in_hw is not None:
            raise ValueError(
                f"out_hw={out_hw!r}, in_hw={in_hw!r} are not allowed for a Linear weight "
                f"of shape {shape}; leave them None"
            )
        return None, None
    if out_hw is None:
        raise ValueError(
            f"out_hw=None is not allowed for a conv weight of shape {shape}; give the "
            "output spatial size out_hw=(H_out, W_out)"
        )
    return out_hw, (out_hw if in_hw is None else in_hw)


def layer_macs(shape, method, ranks, out_hw=None, *, in_hw=None):
    """Multiply-adds per input sample of a (factorized) layer.

    Parameters
    ----------
    shape : tuple of int
        ``(T, S, H, W)`` (conv) or ``(T, n)`` (Linear).
    method : {'dense', 'svd', 'tucker2', 'cp'}
    ranks : None, int or (int, int)
        As for :func:`layer_params`.
    out_hw : (int, int), optional
        Output spatial size of the conv (required for convs, None for Linear).
    in_hw : (int, int), optional
        Input spatial size, seen by the first ``1x1`` conv of Tucker-2 and CP
        (and by the ``Hx1`` depthwise conv of CP, whose output is
        ``(H_out, W_in)``). Defaults to ``out_hw``.

    Returns
    -------
    macs : int
        Dense conv: ``T*S*H*W*H_out*W_out``; svd:
        ``r*(S*H*W + T)*H_out*W_out``; tucker2:
        ``S*r_S*H_in*W_in + (r_T*r_S*H*W + T*r_T)*H_out*W_out``; cp:
        ``R*(S*H_in*W_in + H*H_out*W_in + (W + T)*H_out*W_out)``. Linear:
        ``T*n`` (dense) and ``r*(n + T)`` (svd).

    Examples
    --------
    >>> from sigmadecomp.ranks import layer_macs
    >>> layer_macs((64, 32, 3, 3), 'dense', None, (8, 8))
    1179648
    >>> layer_macs((64, 32, 3, 3), 'cp', 10, (8, 8))
    65280
    >>> layer_macs((10, 20), 'svd', 2)
    60
    """
    shape = check_shape(shape)
    out_hw, in_hw = check_hw_pair(shape, out_hw, in_hw)
    if method == "dense":
        if ranks is not None:
            raise ValueError(f"ranks={ranks!r} is not allowed for method='dense'; use ranks=None")
        dense = math.prod(shape)
        return dense if out_hw is None else dense * out_hw[0] * out_hw[1]
    spec = method_spec(method, shape)
    return int(spec.macs(shape, spec.check_ranks(shape, ranks), out_hw, in_hw))


def _check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio):
        raise TypeError(f"ratio={ratio!r} is not allowed; ratio must be a finite real number > 1")
    if ratio <= 1:
        raise ValueError(
            f"ratio={ratio!r} is not allowed; ratio (the compression factor rX = "
            "params(dense) / params(factorized)) must be > 1"
        )
    return float(ratio)


def ratio_to_ranks(shape, method, ratio, *, keep_proportion=True):
    """Ranks meeting a compression ratio ``rX = params(dense) / params(factorized)``.

    Returns the ranks whose parameter count is the largest one not exceeding
    ``params(dense) / ratio``, with every rank at least 1 (so the count can
    exceed the target only when even rank 1 does).

    Parameters
    ----------
    shape : tuple of int
        ``(T, S, H, W)`` or ``(T, n)``.
    method : {'svd', 'tucker2', 'cp'}
    ratio : float
        Target compression ratio, ``> 1``.
    keep_proportion : bool, optional
        Tucker-2 only: ``True`` (default) restricts the search to pairs with
        ``r_T / r_S`` as close as integers allow to ``T / S``; ``False``
        searches every pair ``(r_T, r_S)``. Ties in the count go to the pair
        nearest the ``T : S`` proportion.

    Returns
    -------
    ranks : int or (int, int)

    Examples
    --------
    >>> from sigmadecomp.ranks import ratio_to_ranks, layer_params
    >>> ratio_to_ranks((64, 32, 3, 3), 'tucker2', 4)
    (24, 12)
    >>> layer_params((64, 32, 3, 3), 'tucker2', (24, 12)), 18432 // 4
    (4512, 4608)
    >>> ratio_to_ranks((64, 32, 3, 3), 'cp', 4), ratio_to_ranks((100, 50), 'svd', 3)
    (45, 11)
    """
    shape = check_shape(shape)
    spec = method_spec(method, shape)
    ratio = _check_ratio(ratio)
    keep_proportion = check_flag(keep_proportion, "keep_proportion")
    budget = int(math.floor(math.prod(shape) / ratio * (1 + COUNT_SLACK)))
    return spec.from_budget(shape, budget, keep_proportion)


# candidate rank lists for allocation -----------------------------------------


def svd_candidates(shape, keep_proportion):
    T, n = shape[0], math.prod(shape[1:])
    dense = math.prod(shape)
    rmax = max(1, min(min(T, n), dense // (T + n)))
    return list(range(1, rmax + 1))


def tucker2_candidates(shape, keep_proportion):
    T, S, H, W = shape
    dense = math.prod(shape)
    if keep_proportion:
        rt, rs = proportional_pairs(T, S)
    else:
        rt, rs = (a.ravel() for a in np.meshgrid(np.arange(1, T + 1), np.arange(1, S + 1),
                                                  indexing="ij"))
    p = tucker2_params_arr(shape, rt, rs)
    keep = p <= dense
    keep[0] = True
    order = np.argsort(p, kind="stable")
    return [(int(rt[i]), int(rs[i])) for i in order if keep[i]]


def cp_candidates(shape, keep_proportion):
    dense = math.prod(shape)
    return list(range(1, max(1, dense // sum(shape)) + 1))


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
    >>> from sigmadecomp.costs import tt_param_count
    >>> tt_param_count((4, 4, 8), (4, 4, 8), 16, kernel_size=(3, 3))  # r_0 clipped to 9
    7505
    >>> tt_param_count((4, 8), (2, 5), 3)   # Linear 32 -> 10: 4*2*3 + 3*8*5
    144
    """
    ms, ns = core_dims(in_modes, out_modes, kernel_size)
    dims = [m * n for m, n in zip(ms, ns)]
    r = (1,) + clip_ranks(check_tt_ranks(ranks, len(dims) - 1), dims) + (1,)
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
    >>> from sigmadecomp.costs import tt_mac_count
    >>> tt_mac_count((4, 8), (2, 5), 3)   # Linear 32 -> 10: 8*4*2*3 + 2*8*3*5
    432
    """
    ms, ns = core_dims(in_modes, out_modes, kernel_size)
    dims = [m * n for m, n in zip(ms, ns)]
    r = (1,) + clip_ranks(check_tt_ranks(ranks, len(dims) - 1), dims) + (1,)
    positions = 1
    total = 0
    off = 0
    if kernel_size is not None:
        if out_hw is None:
            raise ValueError("out_hw=None is not allowed for a conv; give the output (height, width)")
        ho, wo = _check_hw(out_hw, "out_hw")
        positions = ho * wo
        total += math.prod(ms[1:]) * r[1] * ms[0]
        off = 1
    sm, tm = ms[off:], ns[off:]
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
    >>> from sigmadecomp.costs import tt_ranks_for_ratio, tt_param_count
    >>> r = tt_ranks_for_ratio((4, 4, 8), (4, 4, 8), 10, kernel_size=(3, 3))
    >>> r
    (9, 24, 24)
    >>> 128 * 128 * 9 / tt_param_count((4, 4, 8), (4, 4, 8), r, kernel_size=(3, 3)) >= 10
    True
    """
    ratio = check_positive_float(ratio, "ratio")
    ms, ns = core_dims(in_modes, out_modes, kernel_size)
    dims = [m * n for m, n in zip(ms, ns)]
    original = math.prod(ms) * math.prod(ns)
    n_bonds = len(dims) - 1
    if n_bonds == 0:
        if ratio <= 1.0:
            return ()
        raise ValueError(
            f"ratio={ratio:g} is not reachable with a single TT core (ratio 1); use more modes"
        )
    cap = max(bond_caps(dims))

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
    return clip_ranks((lo,) * n_bonds, dims)


# --- the same counts from a weight shape, with automatic modes -------------------


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
    >>> from sigmadecomp.costs import tt_layer_ranks
    >>> tt_layer_ranks((128, 128, 3, 3), 16)
    (9, 16, 16)
    """
    im, om, ks = shape_modes(shape)
    ms, ns = core_dims(im, om, ks)
    dims = [m * n for m, n in zip(ms, ns)]
    return clip_ranks(check_tt_ranks(ranks, len(dims) - 1), dims)


def tt_layer_params(shape, ranks):
    """Weight parameters (no bias) of the TT layer for a weight shape (automatic modes).

    Examples
    --------
    >>> from sigmadecomp.costs import tt_layer_params
    >>> tt_layer_params((128, 128, 3, 3), 16)
    7505
    """
    im, om, ks = shape_modes(shape)
    return tt_param_count(im, om, ranks, kernel_size=ks)


def tt_layer_macs(shape, ranks, out_hw=None, in_hw=None):
    """Multiply-adds per sample of the TT layer for a weight shape (automatic modes).

    ``out_hw`` is required for a conv (all TT work happens at the output
    resolution). A Linear weight ignores it. ``in_hw`` has no effect and is
    deprecated (a ``DeprecationWarning`` when given).

    Examples
    --------
    >>> from sigmadecomp.costs import tt_layer_macs
    >>> tt_layer_macs((10, 64), 3)   # modes (8, 8) x (2, 5)
    624
    """
    if in_hw is not None:
        _deprecated_ignored("tt_layer_macs", "in_hw")
    im, om, ks = shape_modes(shape)
    if ks is None:
        return tt_mac_count(im, om, ranks)
    return tt_mac_count(im, om, ranks, kernel_size=ks, out_hw=out_hw)


def _largest_uniform_rank(im, om, ks, budget):
    ms, ns = core_dims(im, om, ks)
    dims = [m * n for m, n in zip(ms, ns)]
    if len(dims) == 1:
        return ()
    lo, hi = 1, max(bond_caps(dims))
    while lo < hi:  # the count is non-decreasing in the uniform rank
        mid = (lo + hi + 1) // 2
        if tt_param_count(im, om, mid, kernel_size=ks) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return clip_ranks((lo,) * (len(dims) - 1), dims)


def tt_ranks_from_budget(shape, budget, keep_proportion=None):
    """Largest uniform TT ranks whose parameter count is at most ``budget`` (at least 1).

    Parameters
    ----------
    shape : tuple of int
        ``(T, S, H, W)`` or ``(T, n)`` (automatic modes).
    budget : int
        Weight parameters allowed, ``>= 0``.
    keep_proportion : bool, optional
        Deprecated, no effect (TT ranks are uniform, clipped per bond); a
        ``DeprecationWarning`` when given (it must still be True or False).

    Returns
    -------
    ranks : tuple of int
        Rank 1 everywhere when even that exceeds the budget.

    Examples
    --------
    >>> from sigmadecomp.costs import tt_ranks_from_budget, tt_layer_params
    >>> r = tt_ranks_from_budget((128, 128, 3, 3), 128 * 128 * 9 // 8)
    >>> r, tt_layer_params((128, 128, 3, 3), r) <= 128 * 128 * 9 // 8
    ((9, 27, 27), True)
    """
    im, om, ks = shape_modes(shape)
    budget = check_int(budget, "budget", low=0)
    if keep_proportion is not None:
        check_flag(keep_proportion, "keep_proportion")
        _deprecated_ignored("tt_ranks_from_budget", "keep_proportion")
    return _largest_uniform_rank(im, om, ks, budget)


def _deprecated_ignored(fname, arg):
    warnings.warn(f"{fname}({arg}=...) has no effect, is deprecated and will be removed in the "
                  f"next release; leave {arg} out", DeprecationWarning, stacklevel=3)


register_method("svd", MethodSpec(
    ndims=(2, 4), check_ranks=_svd_ranks, params=_svd_params, macs=_svd_macs,
    from_budget=_svd_from_budget, candidates=svd_candidates))
register_method("tucker2", MethodSpec(
    ndims=(4,), check_ranks=_tucker2_ranks, params=_tucker2_params, macs=_tucker2_macs,
    from_budget=_tucker2_from_budget, candidates=tucker2_candidates))
register_method("cp", MethodSpec(
    ndims=(4,), check_ranks=_cp_ranks, params=_cp_params, macs=_cp_macs,
    from_budget=_cp_from_budget, candidates=cp_candidates))
# Tensor-Train (Garipov layout, automatic channel modes); no error proxy yet, so
# it is not offered to the budget allocation.
register_method("tt", MethodSpec(
    ndims=(2, 4), check_ranks=tt_layer_ranks, params=tt_layer_params,
    macs=lambda shape, ranks, out_hw, in_hw: tt_layer_macs(shape, ranks, out_hw),
    from_budget=lambda shape, budget, keep_proportion: tt_ranks_from_budget(shape, budget)))
