# One concept, the allocation of a budget over layers (error curves and the
# multiple-choice knapsack); slightly longer than ~600 lines for it.
"""Error-versus-rank curves and the global allocation of a budget over layers.

Each layer offers rank choices in increasing cost (the ``candidates`` of its
method in :data:`sigmadecomp.costs.METHODS`) with a relative Sigma-error for
each (:func:`error_curve`: a proxy from the whitened spectra, or actual
decompositions); :func:`allocate` picks one choice per layer so that the
total cost fits the budget and the summed (or the largest) error is smallest
(a multiple-choice knapsack: greedy on the lower convex hulls, or exact by
merging Pareto frontiers).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import _backend as B
from ._validation import COUNT_SLACK, check_array, check_choice, check_flag, check_int
from .costs import (
    METHODS,
    check_hw_pair,
    layer_macs,
    layer_params,
    method_spec,
    proportional_pairs,
    register_method,
    tucker2_params_arr,
)
from .evbmf import check_weight, whitened_spectra

__all__ = ["RankCurve", "error_curve", "LayerSpec", "Allocation", "allocate", "allocate_ranks"]


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
    rt, rs = proportional_pairs(shape[0], shape[1])
    p2 = tucker2_params_arr(shape, rt, rs)
    e2 = tail0[np.minimum(rt, tail0.shape[0] - 1)] + tail1[np.minimum(rs, tail1.shape[0] - 1)]
    order = np.argsort(p2, kind="stable")
    p2, best = p2[order], np.minimum.accumulate(e2[order])
    p_cp = np.asarray(cands, dtype=np.int64) * sum(shape)
    idx = np.maximum(np.searchsorted(p2, p_cp, side="right") - 1, 0)
    return best[idx]


# the error proxies of the allocation, attached to the cost models of costs.py
for _name, _curve in (("svd", _svd_curve), ("tucker2", _tucker2_curve), ("cp", _cp_curve)):
    register_method(_name, dataclasses.replace(METHODS[_name], curve=_curve))


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
      :func:`sigmadecomp.sigma_svd` with ``ridge=0`` (with its default ridge
      the solver's ``sigma_error`` is slightly higher: where ``sigma`` is
      singular and the rank covers its range, the curve is 0 and the ridged
      solution keeps an error of the order of 1e-4);
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
    check_weight(weight)
    shape = tuple(int(d) for d in weight.shape)
    spec = method_spec(method, shape)
    keep_proportion = check_flag(keep_proportion, "keep_proportion")
    exact = check_flag(exact, "exact")
    max_exact = check_int(max_exact, "max_exact", low=2)
    if spec.candidates is None or spec.curve is None:
        raise ValueError(f"method={method!r} has no error curve; it cannot be allocated")
    if out_hw is not None or len(shape) == 2:
        out_hw, in_hw = check_hw_pair(shape, out_hw, in_hw)
    elif in_hw is not None:
        raise ValueError(f"in_hw={in_hw!r} is not allowed without out_hw; give out_hw too")
    cands = spec.candidates(shape, keep_proportion)
    params = np.array([spec.params(shape, r) for r in cands], dtype=np.int64)
    if len(shape) == 2 or out_hw is not None:
        macs = np.array([spec.macs(shape, r, out_hw, in_hw) for r in cands], dtype=np.int64)
    else:
        macs = None
    if exact and method != "svd":
        idx = _thin(params, max_exact)
        cands = [cands[i] for i in idx]
        params = params[idx]
        macs = None if macs is None else macs[idx]
        errors = np.array([_exact_error(method, weight, sigma, r) for r in cands])
        return RankCurve(method, shape, cands, params, macs, errors, exact=True)
    sp = whitened_spectra(weight, sigma)
    # the errors are relative, hence scale-free: work on the spectra divided by the
    # largest singular value, so that squares of very large or very small ones neither
    # overflow (NaN errors) nor underflow (all errors 0)
    top = float(np.max(sp["s0"])) if sp["s0"].size else 0.0
    if top > 0.0:
        sp = dict(sp, **{k: sp[k] / top for k in ("s0", "s1") if k in sp})
        energy = float(np.sum(sp["s0"] ** 2))
    else:
        energy = 0.0
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


def _drop_saturated(opts, labels, budget):
    """The choices without those of relative error 1, when the budget allows.

    A relative error of 1 says the layer's whole output is lost; for the
    spectral proxies it is also where the bound is clipped (the Tucker-2 and CP
    proxy ``tail0 + tail1`` exceeds the energy at the smallest ranks), so such
    choices carry no information and look alike. Offered to the solver, the
    cheapest of them is a near-free sacrifice of a large layer (rank 1) that
    pays for small gains elsewhere, which the summed error cannot see but the
    network's accuracy does. They are left out of a layer's choices when it has
    others, unless the smallest remaining choices no longer fit the budget
    (then every choice is kept, as before).
    """
    kept_opts, kept_labels = [], []
    for (c, e), lab in zip(opts, labels):
        ok = e < 1.0
        if ok.any() and not ok.all():
            idx = np.flatnonzero(ok)
            c, e, lab = c[idx], e[idx], [lab[i] for i in idx]
        kept_opts.append((c, e))
        kept_labels.append(lab)
    if sum(int(c[0]) for c, _ in kept_opts) > budget:
        return opts, labels
    return kept_opts, kept_labels


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
    # the same slack as ratio_to_ranks: 0.29 of 100 is 29, although 0.29 * 100 rounds to
    # 28.999999999999996 in floating point
    return int(math.floor(float(budget) * dense_total * (1 + COUNT_SLACK)))


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
    keep_proportion = check_flag(keep_proportion, "keep_proportion")
    exact = check_flag(exact, "exact")
    if not hasattr(layers, "items"):
        raise ValueError(
            f"layers of type {type(layers).__name__} is not allowed; layers must be a "
            "non-empty mapping of name -> LayerSpec"
        )
    if len(layers) == 0:
        raise ValueError("layers is empty; give at least one layer (name -> LayerSpec)")
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
        method_spec(m)  # a misspelt method is refused for Linear layers too
        if len(shape) == 2:
            m = "svd"
        method_spec(m, shape)
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
    given = budget
    budget = _check_budget(budget, dense_total, cost)
    opts, labels = _drop_saturated(opts, labels, budget)
    minimum = int(sum(int(c[0]) for c, _ in opts))
    if minimum > budget:
        asked = (f"budget={given!r} (a fraction: {budget} of {dense_total} {cost})"
                 if isinstance(given, float) else f"budget={budget}")
        least = (f"at least {minimum} (a fraction of at least {minimum / dense_total:.4g})"
                 if isinstance(given, float) else f"at least {minimum}")
        raise ValueError(
            f"{asked} is not allowed for these layers; the smallest ranks already cost "
            f"{minimum} {cost}, so the budget must be {least}"
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
                   keep_proportion=True, solver="auto", max_states=None):
    """Ranks per layer that fit a total budget with the least summed (or largest) error.

    The same as ``allocate(...).ranks`` with the same parameters
    (``max_states=None`` keeps :func:`allocate`'s default); see
    :func:`allocate` for them, the error proxies and the solvers.

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
    extra = {} if max_states is None else {"max_states": max_states}
    return allocate(layers, budget, method=method, cost=cost, objective=objective, exact=exact,
                    keep_proportion=keep_proportion, solver=solver, **extra).ranks
