"""Rank selection: layer cost counts, ratio targets, EVBMF and a global budget.

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

import heapq
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np

from . import _backend as B
from . import tt as _tt
from ._validation import check_array, check_choice, check_finite, check_int, check_sigma

__all__ = [
    "METHODS",
    "MethodSpec",
    "register_method",
    "layer_params",
    "layer_macs",
    "ratio_to_ranks",
    "EVBMFResult",
    "evbmf",
    "evbmf_ranks",
    "RankCurve",
    "error_curve",
    "LayerSpec",
    "Allocation",
    "allocate",
    "allocate_ranks",
]


# ---------------------------------------------------------------------------
# shapes and rank arguments
# ---------------------------------------------------------------------------


def _check_shape(shape, name="shape"):
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(
            f"{name}={shape!r} is not allowed; {name} must be a weight shape "
            "(T, S, H, W) or (T, n)"
        ) from None
    if len(dims) not in (2, 4) or any(
        isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dims
    ):
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
    if len(pair) != 2 or any(
        isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in pair
    ):
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


def _proportional_pairs(T, S):
    """Rank pairs ``(r_T, r_S)`` with ``r_T / r_S ~= T / S`` (arrays, increasing)."""
    rs = np.arange(1, S + 1)
    rt = np.clip(np.floor(rs * T / S + 0.5).astype(np.int64), 1, T)
    rt2 = np.arange(1, T + 1)
    rs2 = np.clip(np.floor(rt2 * S / T + 0.5).astype(np.int64), 1, S)
    pairs = np.unique(np.stack([np.concatenate([rt, rt2]), np.concatenate([rs, rs2])], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _tucker2_params_arr(shape, rt, rs):
    T, S, H, W = shape
    return S * rs + rt * rs * H * W + T * rt


def _tucker2_from_budget(shape, budget, keep_proportion):
    T, S, H, W = shape
    if keep_proportion:
        rt, rs = _proportional_pairs(T, S)
    else:
        rs = np.arange(1, S + 1, dtype=np.int64)
        rt = np.minimum((budget - S * rs) // (rs * H * W + T), T)
    p = _tucker2_params_arr(shape, rt, rs)
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


def _method(method, shape=None):
    if method not in METHODS:
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
    shape = _check_shape(shape)
    if method == "dense":
        if ranks is not None:
            raise ValueError(f"ranks={ranks!r} is not allowed for method='dense'; use ranks=None")
        return math.prod(shape)
    spec = _method(method, shape)
    return int(spec.params(shape, spec.check_ranks(shape, ranks)))


def _hw_pair(shape, out_hw, in_hw):
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
    shape = _check_shape(shape)
    out_hw, in_hw = _hw_pair(shape, out_hw, in_hw)
    if method == "dense":
        if ranks is not None:
            raise ValueError(f"ranks={ranks!r} is not allowed for method='dense'; use ranks=None")
        dense = math.prod(shape)
        return dense if out_hw is None else dense * out_hw[0] * out_hw[1]
    spec = _method(method, shape)
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
    shape = _check_shape(shape)
    spec = _method(method, shape)
    ratio = _check_ratio(ratio)
    budget = int(math.floor(math.prod(shape) / ratio * (1 + 1e-12)))
    return spec.from_budget(shape, budget, bool(keep_proportion))


# candidate rank lists for allocation -----------------------------------------


def _svd_candidates(shape, keep_proportion):
    T, n = shape[0], math.prod(shape[1:])
    dense = math.prod(shape)
    rmax = max(1, min(min(T, n), dense // (T + n)))
    return list(range(1, rmax + 1))


def _tucker2_candidates(shape, keep_proportion):
    T, S, H, W = shape
    dense = math.prod(shape)
    if keep_proportion:
        rt, rs = _proportional_pairs(T, S)
    else:
        rt, rs = (a.ravel() for a in np.meshgrid(np.arange(1, T + 1), np.arange(1, S + 1),
                                                  indexing="ij"))
    p = _tucker2_params_arr(shape, rt, rs)
    keep = p <= dense
    keep[0] = True
    order = np.argsort(p, kind="stable")
    return [(int(rt[i]), int(rs[i])) for i in order if keep[i]]


def _cp_candidates(shape, keep_proportion):
    dense = math.prod(shape)
    return list(range(1, max(1, dense // sum(shape)) + 1))


def _tails(s2):
    """``tails[k] = sum_{j >= k} s2[j]`` for k = 0..len(s2)."""
    return np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])


def _svd_curve(spectra, cands):
    tail0 = _tails(spectra["s0"] ** 2)
    r = np.minimum(np.asarray(cands, dtype=np.int64), tail0.shape[0] - 1)
    return tail0[r]


def _tucker2_curve(spectra, cands):
    tail0, tail1 = _tails(spectra["s0"] ** 2), _tails(spectra["s1"] ** 2)
    c = np.asarray(cands, dtype=np.int64).reshape(-1, 2)
    rt = np.minimum(c[:, 0], tail0.shape[0] - 1)
    rs = np.minimum(c[:, 1], tail1.shape[0] - 1)
    return tail0[rt] + tail1[rs]


def _cp_curve(spectra, cands):
    # equal-size Tucker-2 proxy: the best proportional Tucker-2 whose parameter
    # count does not exceed the CP layer's
    shape = spectra["shape"]
    tail0, tail1 = _tails(spectra["s0"] ** 2), _tails(spectra["s1"] ** 2)
    rt, rs = _proportional_pairs(shape[0], shape[1])
    p2 = _tucker2_params_arr(shape, rt, rs)
    e2 = tail0[np.minimum(rt, tail0.shape[0] - 1)] + tail1[np.minimum(rs, tail1.shape[0] - 1)]
    order = np.argsort(p2, kind="stable")
    p2, best = p2[order], np.minimum.accumulate(e2[order])
    p_cp = np.asarray(cands, dtype=np.int64) * sum(shape)
    idx = np.maximum(np.searchsorted(p2, p_cp, side="right") - 1, 0)
    return best[idx]


register_method("svd", MethodSpec(
    ndims=(2, 4), check_ranks=_svd_ranks, params=_svd_params, macs=_svd_macs,
    from_budget=_svd_from_budget, candidates=_svd_candidates, curve=_svd_curve))
register_method("tucker2", MethodSpec(
    ndims=(4,), check_ranks=_tucker2_ranks, params=_tucker2_params, macs=_tucker2_macs,
    from_budget=_tucker2_from_budget, candidates=_tucker2_candidates, curve=_tucker2_curve))
register_method("cp", MethodSpec(
    ndims=(4,), check_ranks=_cp_ranks, params=_cp_params, macs=_cp_macs,
    from_budget=_cp_from_budget, candidates=_cp_candidates, curve=_cp_curve))
# Tensor-Train (Garipov layout, automatic channel modes); no error proxy yet, so
# it is not offered to the budget allocation.
register_method("tt", MethodSpec(
    ndims=(2, 4), check_ranks=_tt.tt_layer_ranks, params=_tt.tt_layer_params,
    macs=_tt.tt_layer_macs, from_budget=_tt.tt_ranks_from_budget))



# ---------------------------------------------------------------------------
# EVBMF
# ---------------------------------------------------------------------------


@dataclass(repr=False)
class EVBMFResult:
    """Empirical variational Bayesian matrix factorisation of a noisy matrix.

    Attributes
    ----------
    rank : int
        The estimated rank, at least 1 (``max(evb_rank, 1)``).
    evb_rank : int
        Number of singular values above the EVB threshold; can be 0 when the
        matrix looks like pure noise.
    singular_values : ndarray of shape (min(m, n),)
        EVB estimates of the singular values (shrunk; zero below the
        threshold), float64, descending.
    sigma2 : float
        Estimated noise variance per entry.
    threshold : float
        Singular values above it are kept:
        ``sqrt(M * sigma2 * (1 + tau) * (1 + alpha / tau))``.
    shape : (int, int)
        Shape of the input matrix.
    """

    rank: int
    evb_rank: int
    singular_values: np.ndarray
    sigma2: float
    threshold: float
    shape: tuple

    def __repr__(self):
        return (
            f"EVBMFResult(rank={self.rank}, evb_rank={self.evb_rank}, "
            f"sigma2={self.sigma2:.6g}, threshold={self.threshold:.6g}, shape={self.shape})"
        )


def _tau(x, alpha):
    """Larger root of ``tau^2 - (x - 1 - alpha) tau + alpha = 0`` (``x >= (1+sqrt(alpha))^2``)."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _psi1(tau, alpha):
    return np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau


def _tau_lower(alpha):
    """Positive zero ``tau_`` of ``log(1 + tau) + alpha*log(1 + tau/alpha) - tau`` above sqrt(alpha)."""
    from scipy.optimize import brentq

    lo = math.sqrt(alpha)
    hi = max(4.0, 4.0 * lo)
    while _psi1(hi, alpha) > 0:
        hi *= 2.0
    return brentq(lambda t: _psi1(t, alpha), lo, hi, xtol=1e-14, rtol=1e-14)


def _evb_objective(s2, sv2, M, alpha, xbar):
    """``2F / M`` of EVB at noise variance ``s2`` up to a constant (vectorised over ``s2``)."""
    s2 = np.atleast_1d(s2)[:, None]
    x = sv2[None, :] / (M * s2)
    big = x > xbar
    psi1 = np.where(big, _psi1(_tau(np.where(big, x, xbar), alpha), alpha), 0.0)
    return np.sum(x + np.log(s2) + psi1, axis=1)


def _evbmf_from_singular_values(sv, L, M, sigma2=None):
    """EVBMF from the singular values ``sv`` (descending) of an ``L x M`` matrix, ``L <= M``."""
    from scipy.optimize import minimize_scalar

    sv = np.asarray(sv, dtype=np.float64)
    sv2 = sv * sv
    alpha = L / M
    tau_ = _tau_lower(alpha)
    xbar = (1.0 + tau_) * (1.0 + alpha / tau_)
    total = float(np.sum(sv2))
    if sigma2 is None:
        hi = total / (L * M)
        if hi <= 0.0:
            s2 = 0.0
        else:
            # The global minimiser lies in [lo, hi] (Nakajima et al. 2013):
            # EVB keeps at most Hbar = ceil(L / (1 + alpha)) - 1 components.
            hbar = min(int(math.ceil(L / (1.0 + alpha))) - 1, sv2.shape[0] - 1)
            lo = 0.0
            if hbar >= 0:
                lo = max(sv2[hbar] / (M * xbar), float(np.sum(sv2[hbar:])) / (M * (L - hbar)))
            lo = min(max(lo, hi * 1e-12), hi)
            if lo >= hi:
                s2 = hi
            else:
                grid = np.geomspace(lo, hi, 400)
                vals = _evb_objective(grid, sv2, M, alpha, xbar)
                i = int(np.argmin(vals))
                a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.shape[0] - 1)]
                s2, best = grid[i], vals[i]
                if b > a:
                    res = minimize_scalar(
                        lambda u: float(_evb_objective(math.exp(u), sv2, M, alpha, xbar)[0]),
                        bounds=(math.log(a), math.log(b)), method="bounded",
                        options={"xatol": 1e-12})
                    if res.fun < best:
                        s2 = math.exp(res.x)
    else:
        s2 = float(sigma2)
    s2 = float(s2)
    threshold = math.sqrt(M * s2 * xbar)
    keep = sv > threshold
    if s2 > 0:
        q = np.where(keep, (L + M) * s2 / np.where(keep, sv2, 1.0), 0.0)
        disc = np.maximum((1.0 - q) ** 2 - 4.0 * L * M * s2 * s2 / np.where(keep, sv2 * sv2, 1.0), 0.0)
        shrunk = np.where(keep, 0.5 * sv * (1.0 - q + np.sqrt(disc)), 0.0)
    else:
        shrunk = np.where(keep, sv, 0.0)
    evb_rank = int(np.sum(keep))
    return evb_rank, shrunk, s2, threshold


def evbmf(matrix, *, sigma2=None):
    """Rank of a noisy matrix by empirical variational Bayesian matrix factorisation.

    The global analytic EVB solution of Nakajima, Sugiyama, Babacan and
    Tomioka (JMLR 14, 2013). With ``L = min(m, n)``, ``M = max(m, n)``,
    ``alpha = L / M`` and singular values ``gamma_h``:

    1. ``tau_`` is the zero above ``sqrt(alpha)`` of
       ``psi1(tau) = log(1 + tau) + alpha log(1 + tau / alpha) - tau``, and
       ``x_ = (1 + tau_)(1 + alpha / tau_)``;
    2. the noise variance minimises the free energy
       ``sum_h [x_h - log x_h] + sum_{x_h > x_} psi1(tau(x_h))`` with
       ``x_h = gamma_h^2 / (M sigma2)`` (a log-spaced scan of the interval the
       paper proves contains the minimiser, refined by bounded Brent search);
    3. components with ``gamma_h > sqrt(M sigma2 x_)`` are kept and shrunk to
       ``gamma_h/2 (1 - (L+M) sigma2/gamma_h^2 + sqrt((1 - (L+M) sigma2/gamma_h^2)^2
       - 4 L M sigma2^2/gamma_h^4))``.

    Either orientation is accepted (the matrix is transposed internally when it
    has more rows than columns). The returned ``rank`` is at least 1 even when
    EVB prunes every component (``evb_rank == 0``): a factorized layer needs a
    positive rank.

    Parameters
    ----------
    matrix : array of shape (m, n)
        NumPy array or torch tensor (float32 or float64).
    sigma2 : float, optional
        Known noise variance per entry; estimated when None.

    Returns
    -------
    EVBMFResult

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.ranks import evbmf
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 60))
    >>> res = evbmf(X + 0.1 * rng.standard_normal((40, 60)))
    >>> res.rank, round(res.sigma2, 2)
    (3, 0.01)
    >>> evbmf((X + 0.1 * rng.standard_normal((40, 60))).T).rank
    3
    """
    check_array(matrix, "matrix", ndim=2)
    check_finite(matrix, "matrix")
    if sigma2 is not None:
        if isinstance(sigma2, bool) or not isinstance(sigma2, numbers.Real) or not sigma2 >= 0:
            raise ValueError(f"sigma2={sigma2!r} is not allowed; sigma2 must be a real number >= 0")
    m, n = (int(d) for d in matrix.shape)
    if m == 0 or n == 0:
        raise ValueError(f"matrix has shape {(m, n)}; matrix must have at least one row and column")
    A = B.as_compute(matrix)
    sv = B.to_numpy(B.svd(A)[1])
    L, M = min(m, n), max(m, n)
    evb_rank, shrunk, s2, thr = _evbmf_from_singular_values(sv, L, M, sigma2)
    return EVBMFResult(rank=max(evb_rank, 1), evb_rank=evb_rank, singular_values=shrunk,
                       sigma2=s2, threshold=thr, shape=(m, n))


# ---------------------------------------------------------------------------
# whitened spectra, EVBMF ranks and error curves
# ---------------------------------------------------------------------------


def _check_weight(weight, name="weight"):
    check_array(weight, name, ndim=(2, 4))
    check_finite(weight, name)
    return weight


def _whitened(weight, sigma):
    """``Y = K_(1) Sigma^{1/2}`` (symmetric floored root) as float64, shape of the weight."""
    from .prepared import prepared_or
    from .sigma import default_neg_rtol, default_rtol, psd_root

    K = B.as_compute(weight)
    xp = B.namespace(K)
    T = K.shape[0]
    K1 = xp.reshape(K, (T, -1))
    if sigma is None:
        return K
    S = check_sigma(sigma, K1.shape[1], K1, psd=False)  # psd_root checks it
    root = psd_root(prepared_or(sigma, S), rtol=default_rtol(sigma.dtype), neg_rtol=default_neg_rtol(sigma.dtype))
    return xp.reshape(K1 @ root.sqrt(), tuple(K.shape))


def _spectra(weight, sigma):
    """Singular values (NumPy float64) of the whitened mode-0 and mode-1 unfoldings."""
    from .tenalg import unfold

    Y = _whitened(weight, sigma)
    xp = B.namespace(Y)
    out = {"s0": B.to_numpy(B.svd(xp.reshape(Y, (Y.shape[0], -1)))[1]),
           "energy": float(xp.sum(Y * Y)), "shape": tuple(int(d) for d in Y.shape)}
    if Y.ndim == 4:
        out["s1"] = B.to_numpy(B.svd(unfold(Y, 1))[1])
    return out


def evbmf_ranks(weight, method, sigma=None):
    """EVBMF ranks of a layer weight, optionally Sigma-aware.

    The weight is whitened as ``Y = K_(1) Sigma^{1/2}`` (symmetric root under
    the eigenvalue floor of :func:`sigmadecomp.psd_root`; ``Y = K`` when
    ``sigma`` is None) and :func:`evbmf` is applied to the mode-0 unfolding
    ``Y_(1)`` (T x S*H*W) and the mode-1 unfolding (S x T*H*W). For the
    mode-0 side this is exactly the spectrum the Sigma-optimal factorisation
    sees; for the mode-1 side it is exact when ``Sigma`` is a Kronecker product
    ``Sigma_S kron Sigma_HW`` and a proxy otherwise.

    Parameters
    ----------
    weight : array of shape (T, S, H, W) or (T, n)
    method : {'svd', 'tucker2', 'cp'}
        ``'svd'``: the EVBMF rank of the mode-0 unfolding. ``'tucker2'``:
        ``(r_T, r_S)`` from the mode-0 and mode-1 unfoldings. ``'cp'``: the
        larger of the two (a heuristic: a CP rank is at least either
        unfolding rank).
    sigma : array of shape (n, n), optional

    Returns
    -------
    ranks : int or (int, int)

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.ranks import evbmf_ranks
    >>> rng = np.random.default_rng(0)
    >>> core = rng.standard_normal((4, 3, 3, 3))
    >>> U, V = rng.standard_normal((32, 4)), rng.standard_normal((24, 3))
    >>> K = np.einsum('abhw,ta,sb->tshw', core, U, V)
    >>> evbmf_ranks(K + 0.01 * rng.standard_normal(K.shape), 'tucker2')
    (4, 3)
    """
    _check_weight(weight)
    shape = tuple(int(d) for d in weight.shape)
    _method(method, shape)
    if method not in ("svd", "tucker2", "cp"):
        raise ValueError(f"method={method!r} is not allowed; evbmf_ranks supports 'svd', 'tucker2', 'cp'")
    sp = _spectra(weight, sigma)
    T, n = shape[0], math.prod(shape[1:])
    r0 = max(1, _evbmf_from_singular_values(sp["s0"], min(T, n), max(T, n))[0])
    if method == "svd":
        return min(r0, T, n)
    S, rest = shape[1], T * shape[2] * shape[3]
    r1 = max(1, _evbmf_from_singular_values(sp["s1"], min(S, rest), max(S, rest))[0])
    if method == "tucker2":
        return min(r0, T), min(r1, S)
    return max(r0, r1)


@dataclass(repr=False)
class RankCurve:
    """Relative Sigma-error of a layer against its rank choices.

    Attributes
    ----------
    method : str
    shape : tuple of int
    ranks : list
        Rank choices in increasing parameter count.
    params : ndarray of int
    macs : ndarray of int or None
        None when no ``out_hw`` was given for a conv.
    errors : ndarray of float
        Relative Sigma-error of each choice (proxy unless ``exact``).
    exact : bool
        Whether ``errors`` are errors of actual decompositions.
    """

    method: str
    shape: tuple
    ranks: list
    params: np.ndarray
    macs: Optional[np.ndarray]
    errors: np.ndarray
    exact: bool = False

    def __repr__(self):
        return (
            f"RankCurve(method={self.method!r}, shape={self.shape}, n_choices={len(self.ranks)}, "
            f"exact={self.exact})"
        )


def _exact_error(method, weight, sigma, ranks):
    """Relative Sigma-error of an actual decomposition at ``ranks``."""
    if method == "svd":
        from .svd import sigma_svd

        W = B.namespace(weight).reshape(weight, (weight.shape[0], -1))
        return sigma_svd(W, ranks, sigma).sigma_error
    if method == "tucker2":
        try:
            from .tucker2 import tucker2 as _run
        except ImportError:  # pragma: no cover - depends on the installed modules
            _run = None
    elif method == "cp":
        try:
            from .cp import cp as _run
        except ImportError:  # pragma: no cover
            _run = None
    else:
        _run = None
    if _run is None:
        raise ValueError(
            f"exact=True is not available for method={method!r}: no decomposition "
            "function for it is installed; use exact=False (spectral proxy)"
        )
    from .sigma import relative_sigma_error

    res = _run(weight, ranks, sigma=sigma)
    return relative_sigma_error(weight, res.to_tensor(), sigma)


def _thin(costs, k):
    """Indices of at most ``k`` choices spread geometrically in cost (first and last kept)."""
    m = costs.shape[0]
    if m <= k:
        return np.arange(m)
    targets = np.geomspace(costs[0], costs[-1], k)
    idx = np.unique(np.searchsorted(costs, targets, side="left").clip(0, m - 1))
    return np.unique(np.concatenate([[0], idx, [m - 1]]))


def error_curve(weight, method, sigma=None, *, out_hw=None, in_hw=None, keep_proportion=True,
                exact=False, max_exact=12):
    """Error-versus-rank curve of one layer (the input of :func:`allocate_ranks`).

    Proxies from the spectra of ``Y = K_(1) Sigma^{1/2}`` (see
    :func:`evbmf_ranks`), relative to ``||Y||_F^2 = tr(K Sigma K^T)``:

    * ``'svd'``: ``sum_{j > r} s0_j^2`` -- exactly the squared error of
      :func:`sigmadecomp.sigma_svd`;
    * ``'tucker2'``: ``sum_{j > r_T} s0_j^2 + sum_{j > r_S} s1_j^2``, the
      truncated-HOSVD bound of the whitened kernel (an upper bound of the
      optimum when ``Sigma`` is a Kronecker product, a proxy otherwise);
    * ``'cp'``: CP has no closed form; the proxy is the Tucker-2 proxy of the
      largest proportional Tucker-2 with no more parameters than the CP layer
      (equal size). On kernels with real-data covariances it tracks the
      actual Sigma-CP error within a roughly constant factor (CP is better,
      by 0.5-0.7x), which is what an allocation across layers needs; use
      ``exact=True`` when the CP errors themselves matter.

    Parameters
    ----------
    weight : array of shape (T, S, H, W) or (T, n)
    method : {'svd', 'tucker2', 'cp'}
    sigma : array of shape (n, n), optional
    out_hw, in_hw : (int, int), optional
        Output/input spatial size of a conv, for the multiply-add counts.
    keep_proportion : bool, optional
        Tucker-2 choices keep ``r_T : r_S ~= T : S`` (default) or range over
        every pair.
    exact : bool, optional
        Run the actual decomposition at (at most ``max_exact``) choices spread
        geometrically in parameter count and return only those.
    max_exact : int, optional

    Returns
    -------
    RankCurve
        Choices whose parameter count does not exceed the dense layer's (at
        least the smallest one), in increasing parameter count.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.ranks import error_curve
    >>> W = np.diag([3.0, 2.0, 1.0, 0.0])
    >>> c = error_curve(W, 'svd')
    >>> c.ranks, c.params.tolist()
    ([1, 2], [8, 16])
    >>> bool(np.allclose(c.errors ** 2, [5 / 14, 1 / 14]))
    True
    """
    _check_weight(weight)
    shape = tuple(int(d) for d in weight.shape)
    spec = _method(method, shape)
    if spec.candidates is None or spec.curve is None:
        raise ValueError(f"method={method!r} has no error curve; it cannot be allocated")
    if out_hw is not None or len(shape) == 2:
        out_hw, in_hw = _hw_pair(shape, out_hw, in_hw)
    elif in_hw is not None:
        raise ValueError(f"in_hw={in_hw!r} is not allowed without out_hw; give out_hw too")
    cands = spec.candidates(shape, bool(keep_proportion))
    params = np.array([spec.params(shape, r) for r in cands], dtype=np.int64)
    if len(shape) == 2 or out_hw is not None:
        macs = np.array([spec.macs(shape, r, out_hw, in_hw) for r in cands], dtype=np.int64)
    else:
        macs = None
    if exact and method != "svd":
        max_exact = check_int(max_exact, "max_exact", low=2)
        idx = _thin(params, max_exact)
        cands = [cands[i] for i in idx]
        params = params[idx]
        macs = None if macs is None else macs[idx]
        errors = np.array([_exact_error(method, weight, sigma, r) for r in cands])
        return RankCurve(method, shape, cands, params, macs, errors, exact=True)
    sp = _spectra(weight, sigma)
    energy = sp["energy"]
    tail = np.asarray(spec.curve(sp, cands), dtype=np.float64)
    if energy > 0:
        errors = np.sqrt(np.clip(tail / energy, 0.0, 1.0))
    else:
        errors = np.zeros(len(cands))
    return RankCurve(method, shape, cands, params, macs, errors, exact=(method == "svd"))


# ---------------------------------------------------------------------------
# global allocation under a budget
# ---------------------------------------------------------------------------


@dataclass
class LayerSpec:
    """One layer offered to :func:`allocate_ranks`.

    Attributes
    ----------
    weight : array of shape (T, S, H, W) or (T, n)
        NumPy array or torch tensor in torch layout.
    sigma : array of shape (n, n), optional
        Second moment of the layer input (None: Frobenius errors).
    out_hw : (int, int), optional
        Output spatial size of a conv; needed for ``cost='macs'``.
    in_hw : (int, int), optional
        Input spatial size (defaults to ``out_hw``).
    """

    weight: object
    sigma: object = None
    out_hw: Optional[tuple] = None
    in_hw: Optional[tuple] = None


@dataclass(repr=False)
class Allocation:
    """Ranks chosen by :func:`allocate` and what they cost.

    Attributes
    ----------
    ranks : dict
        Layer name -> ranks (the format of :func:`layer_params`).
    methods : dict
        Layer name -> method used (Linear layers always use ``'svd'``).
    errors : dict
        Layer name -> relative Sigma-error of the choice (proxy unless exact).
    costs : dict
        Layer name -> parameters (or multiply-adds) of the factorized layer.
    total_cost, budget, dense_cost : int
        Sum of ``costs``, the budget, and the cost of the original layers.
    objective : str
        ``'sum'`` or ``'max'``.
    solver : str
        ``'exact'`` (Pareto dynamic programme) or ``'greedy'``.
    cost : str
        ``'params'`` or ``'macs'``.
    curves : dict
        Layer name -> :class:`RankCurve` used.
    """

    ranks: dict
    methods: dict
    errors: dict
    costs: dict
    total_cost: int
    budget: int
    dense_cost: int
    objective: str
    solver: str
    cost: str
    curves: dict = field(default_factory=dict)

    @property
    def sum_error(self):
        return float(sum(self.errors.values()))

    @property
    def max_error(self):
        return float(max(self.errors.values()))

    @property
    def ratio(self):
        """``dense_cost / total_cost`` (the overall rX in the chosen cost)."""
        return self.dense_cost / self.total_cost

    def __repr__(self):
        return (
            f"Allocation(layers={len(self.ranks)}, {self.cost}={self.total_cost}/{self.budget} "
            f"(rX={self.ratio:.3g}), sum_error={self.sum_error:.4g}, "
            f"max_error={self.max_error:.4g}, solver={self.solver!r})"
        )


def _pareto(costs, errors):
    """Indices of the non-dominated choices, cost ascending and error strictly descending."""
    order = np.lexsort((errors, costs))
    e = errors[order]
    prev = np.concatenate([[np.inf], np.minimum.accumulate(e)[:-1]])
    return order[e < prev]


def _solve_exact(opts, budget, max_states):
    """Exact multiple-choice knapsack by merging Pareto frontiers layer by layer.

    Returns the chosen option index per layer, or None when a frontier would
    exceed ``max_states`` pairs.
    """
    n = len(opts)
    mins = np.array([c[0] for c, _ in opts], dtype=np.int64)
    rem = np.concatenate([np.cumsum(mins[::-1])[::-1][1:], [0]])
    fc = np.zeros(1, dtype=np.int64)
    fe = np.zeros(1)
    back = []
    for l, (c, e) in enumerate(opts):
        if fc.shape[0] * c.shape[0] > max_states:
            return None
        C = (fc[:, None] + c[None, :]).ravel()
        E = (fe[:, None] + e[None, :]).ravel()
        ok = np.flatnonzero(C + rem[l] <= budget)
        keep = ok[_pareto(C[ok], E[ok])]
        back.append(keep)
        fc, fe = C[keep], E[keep]
    best = int(np.argmin(fe))
    choice = [0] * n
    for l in range(n - 1, -1, -1):
        flat = back[l][best]
        best, choice[l] = divmod(int(flat), opts[l][0].shape[0])
    return choice


def _lower_hull(c, e):
    """Indices of the lower convex hull of points sorted by cost (errors descending)."""
    hull = []
    for i in range(c.shape[0]):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> i
            if (e[b] - e[a]) * (c[i] - c[a]) >= (e[i] - e[a]) * (c[b] - c[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _solve_greedy(opts, budget):
    """Greedy marginal gain along each layer's lower convex hull, then a fill pass."""
    n = len(opts)
    choice = [0] * n
    spent = int(sum(int(c[0]) for c, _ in opts))
    hulls = [_lower_hull(c, e) for c, e in opts]
    pos = [0] * n
    heap = []

    def push(l):
        h = hulls[l]
        if pos[l] + 1 < len(h):
            c, e = opts[l]
            a, b = h[pos[l]], h[pos[l] + 1]
            heapq.heappush(heap, ((e[b] - e[a]) / (c[b] - c[a]), l))

    for l in range(n):
        push(l)
    while heap:
        _, l = heapq.heappop(heap)
        c, e = opts[l]
        a, b = hulls[l][pos[l]], hulls[l][pos[l] + 1]
        if spent + int(c[b] - c[a]) <= budget:
            spent += int(c[b] - c[a])
            pos[l] += 1
            choice[l] = b
            push(l)
    while True:  # spend what is left on the single best affordable upgrade
        best = None
        for l, (c, e) in enumerate(opts):
            cur = choice[l]
            j = int(np.searchsorted(c, c[cur] + budget - spent, side="right")) - 1
            if j > cur:
                gain = e[cur] - e[j]
                if best is None or gain > best[0]:
                    best = (gain, l, j)
        if best is None:
            break
        _, l, j = best
        spent += int(opts[l][0][j] - opts[l][0][choice[l]])
        choice[l] = j
    return choice


def _solve_sum(opts, budget, solver, max_states):
    if solver in ("auto", "exact"):
        choice = _solve_exact(opts, budget, max_states)
        if choice is not None:
            return choice, "exact"
        if solver == "exact":
            raise ValueError(
                f"solver='exact' needs more than max_states={max_states} frontier pairs for "
                "these layers; raise max_states or use solver='greedy' (or 'auto')"
            )
    return _solve_greedy(opts, budget), "greedy"


def _solve_max(opts, budget, solver, max_states):
    """Smallest achievable largest error, then the smallest sum under that cap."""
    levels = np.unique(np.concatenate([e for _, e in opts]))

    def cost_at(eps):
        total = 0
        for c, e in opts:
            j = int(np.searchsorted(-e, -eps, side="left"))  # first choice with e <= eps
            if j >= e.shape[0]:
                return None
            total += int(c[j])
        return total

    lo, hi = 0, levels.shape[0] - 1  # the largest level is always affordable (min costs)
    while lo < hi:
        mid = (lo + hi) // 2
        t = cost_at(levels[mid])
        if t is not None and t <= budget:
            hi = mid
        else:
            lo = mid + 1
    eps = levels[lo]
    capped = []
    offsets = []
    for c, e in opts:
        j = int(np.searchsorted(-e, -eps, side="left"))
        capped.append((c[j:], e[j:]))
        offsets.append(j)
    choice, used = _solve_sum(capped, budget, solver, max_states)
    return [j + o for j, o in zip(choice, offsets)], used


def _check_budget(budget, dense_total, cost):
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(
            f"budget={budget!r} is not allowed; budget must be an int (total {cost}) or a "
            "float in (0, 1) (fraction of the original total)"
        )
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"budget={budget!r} is not allowed; an int budget must be >= 1")
        return int(budget)
    if not (0.0 < float(budget) < 1.0):
        raise ValueError(
            f"budget={budget!r} is not allowed; a float budget is a fraction of the original "
            f"total {cost} ({dense_total}) and must lie in (0, 1)"
        )
    return int(math.floor(float(budget) * dense_total))


def allocate(layers, budget, *, method, cost="params", objective="sum", exact=False,
             keep_proportion=True, solver="auto", max_states=4_000_000):
    """Distribute a parameter (or multiply-add) budget over layers; full report.

    Each layer's choices and errors come from :func:`error_curve`; dominated
    choices (costlier and no better) are dropped. Then:

    * ``objective='sum'`` minimises the sum of the layers' relative
      Sigma-errors subject to the total cost ``<= budget``. This is a
      multiple-choice knapsack. ``solver='exact'`` solves it exactly by merging
      the layers' Pareto frontiers (total cost, summed error) one layer at a
      time, pruning dominated and unaffordable partial choices -- exact for
      the given curves, and fast for tens of layers because the frontiers stay
      small. ``solver='greedy'`` walks each layer's lower convex hull in order
      of the best error decrease per unit cost (the Lagrangian solution, optimal
      whenever the budget falls on a hull vertex), then spends the remainder on
      the best affordable upgrade. ``'auto'`` (default) runs the exact solver
      and falls back to greedy when a frontier product exceeds ``max_states``.
    * ``objective='max'`` (ALDS-style) minimises the largest layer error -- a
      bisection over the error levels, each layer taking its cheapest choice
      below the level -- and then spends the remaining budget minimising the
      sum without raising that maximum.

    Parameters
    ----------
    layers : mapping of str to LayerSpec
        ``LayerSpec(weight, sigma=None, out_hw=None)`` per layer (a bare weight
        array is accepted as ``LayerSpec(weight)``).
    budget : int or float
        An int is the total factorized cost over these layers (weight
        parameters, or multiply-adds when ``cost='macs'``); a float in
        ``(0, 1)`` is that fraction of the layers' original total.
    method : str or mapping of str to str
        ``'svd'``, ``'tucker2'`` or ``'cp'`` for every layer, or per layer.
        Two-dimensional (Linear) weights always use ``'svd'``.
    cost : {'params', 'macs'}
    objective : {'sum', 'max'}
    exact : bool
        Use actual decomposition errors (see :func:`error_curve`).
    keep_proportion : bool
        Tucker-2 choices keep ``r_T : r_S ~= T : S``.
    solver : {'auto', 'exact', 'greedy'}
    max_states : int
        Largest frontier product the exact solver accepts.

    Returns
    -------
    Allocation

    Raises
    ------
    ValueError
        When even rank 1 everywhere costs more than ``budget``.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.ranks import LayerSpec, allocate
    >>> rng = np.random.default_rng(0)
    >>> flat = rng.standard_normal((16, 16))
    >>> steep = (rng.standard_normal((16, 16)) * 0.5 ** np.arange(16)) @ rng.standard_normal((16, 16))
    >>> layers = {'flat': LayerSpec(flat), 'steep': LayerSpec(steep)}
    >>> a = allocate(layers, 0.5, method='svd')   # half of the 512 dense parameters
    >>> a.ranks, a.total_cost, a.solver
    ({'flat': 4, 'steep': 4}, 256, 'exact')
    >>> allocate(layers, 0.5, method='svd', objective='max').ranks
    {'flat': 6, 'steep': 2}
    """
    cost = check_choice(cost, "cost", ("params", "macs"))
    objective = check_choice(objective, "objective", ("sum", "max"))
    solver = check_choice(solver, "solver", ("auto", "exact", "greedy"))
    max_states = check_int(max_states, "max_states", low=1)
    if not hasattr(layers, "items") or len(layers) == 0:
        raise ValueError(
            f"layers of type {type(layers).__name__} is not allowed; layers must be a "
            "non-empty mapping of name -> LayerSpec"
        )
    names, curves, methods, opts, labels = [], {}, {}, [], []
    dense_total = 0
    for name, spec in layers.items():
        if not isinstance(spec, LayerSpec):
            spec = LayerSpec(spec)
        check_array(spec.weight, f"layers[{name!r}].weight", ndim=(2, 4))
        shape = tuple(int(d) for d in spec.weight.shape)
        m = method.get(name) if hasattr(method, "get") else method
        if m is None:
            raise ValueError(f"method has no entry for layer {name!r}; give a method for every layer")
        if len(shape) == 2:
            m = "svd"
        _method(m, shape)
        if cost == "macs" and len(shape) == 4 and spec.out_hw is None:
            raise ValueError(
                f"layers[{name!r}].out_hw=None is not allowed with cost='macs'; give the conv's "
                "output size out_hw=(H_out, W_out)"
            )
        curve = error_curve(spec.weight, m, spec.sigma, out_hw=spec.out_hw, in_hw=spec.in_hw,
                            keep_proportion=keep_proportion, exact=exact)
        c = curve.params if cost == "params" else curve.macs
        keep = _pareto(c, curve.errors)
        opts.append((c[keep], curve.errors[keep]))
        labels.append([curve.ranks[i] for i in keep])
        names.append(name)
        curves[name] = curve
        methods[name] = m
        dense_total += (layer_params(shape, "dense", None) if cost == "params"
                        else layer_macs(shape, "dense", None, spec.out_hw, in_hw=spec.in_hw))
    budget = _check_budget(budget, dense_total, cost)
    minimum = int(sum(int(c[0]) for c, _ in opts))
    if minimum > budget:
        raise ValueError(
            f"budget={budget} is not allowed for these layers; the smallest ranks already cost "
            f"{minimum} {cost}, so the budget must be at least {minimum}"
        )
    if objective == "sum":
        choice, used = _solve_sum(opts, budget, solver, max_states)
    else:
        choice, used = _solve_max(opts, budget, solver, max_states)
    ranks = {nm: labels[i][choice[i]] for i, nm in enumerate(names)}
    errors = {nm: float(opts[i][1][choice[i]]) for i, nm in enumerate(names)}
    costs = {nm: int(opts[i][0][choice[i]]) for i, nm in enumerate(names)}
    return Allocation(ranks=ranks, methods=methods, errors=errors, costs=costs,
                      total_cost=int(sum(costs.values())), budget=budget,
                      dense_cost=int(dense_total), objective=objective, solver=used,
                      cost=cost, curves=curves)


def allocate_ranks(layers, budget, *, method, cost="params", objective="sum", exact=False,
                   keep_proportion=True, solver="auto"):
    """Ranks per layer that fit a total budget with the least summed (or largest) error.

    The same as ``allocate(...).ranks``; see :func:`allocate` for the
    parameters, the error proxies and the solvers.

    Returns
    -------
    ranks : dict
        Layer name -> ranks (int for svd/cp, ``(r_T, r_S)`` for tucker2).

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.ranks import LayerSpec, allocate_ranks, layer_params
    >>> rng = np.random.default_rng(0)
    >>> layers = {'a': LayerSpec(rng.standard_normal((8, 4, 3, 3))),
    ...           'b': LayerSpec(rng.standard_normal((16, 8, 3, 3)))}
    >>> r = allocate_ranks(layers, 600, method='cp')
    >>> sum(layer_params(l.weight.shape, 'cp', r[k]) for k, l in layers.items()) <= 600
    True
    """
    return allocate(layers, budget, method=method, cost=cost, objective=objective, exact=exact,
                    keep_proportion=keep_proportion, solver=solver).ranks
