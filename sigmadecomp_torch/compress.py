"""Model surgery: replace Conv2d/Linear layers by factorized ones, with a report.

:func:`compress` reads as a pipeline, one step per function:

1. **select** the layers (:mod:`sigmadecomp_torch.selection`): the default
   choice, the candidates left alone and why;
2. **plan** each layer (:class:`LayerPlan`): its format, its statistics as a
   :class:`sigmadecomp.prepared.PreparedSigma` -- validated once, its PSD
   test and eigen-decomposition computed at most once and shared by every
   later step (and by layers reading the same statistic) -- and its options;
3. **choose ranks** (explicit, ``ratio``, ``'evbmf'`` or ``budget``; the
   Sigma-aware ones reuse the prepared Sigma);
4. **decompose and build** each layer (:func:`decompose_layer`): the core
   function of its format (:func:`sigmadecomp.sigma_svd`,
   :func:`sigmadecomp.tucker2`, :func:`sigmadecomp.cp`,
   :func:`sigmadecomp.tt_conv` / :func:`sigmadecomp.tt_linear`) in the
   Sigma-norm when statistics from
   :func:`sigmadecomp_torch.collect_covariances` are given, in the Frobenius
   norm otherwise, on the model's device in float64, then the factorized
   module (:mod:`sigmadecomp_torch.layers`,
   :mod:`sigmadecomp_torch.tt_layers`) in the layer's dtype;
5. **report** (:class:`CompressionReport`, :mod:`sigmadecomp_torch.report`)
   and put the new modules in place.

Every format goes through these steps. A format is an entry of
:data:`LAYER_METHODS` (:mod:`sigmadecomp_torch.formats`: how to decompose a
weight and build the module from the result); a new one is added with
:func:`register_layer_method`.

One concept, the pipeline; most of its length is the documentation of
:func:`compress`'s options.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import numbers
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from sigmadecomp import ranks as _ranks
from sigmadecomp.exceptions import CompressionWarning
from sigmadecomp.prepared import PreparedSigma
from sigmadecomp.sigma import _sq_sigma_norm, _unit_scaled, relative_sigma_error

from . import latency as _latency
from . import parallel as _parallel
from .covariance import LayerStats, select_layers
from .formats import LAYER_METHODS, LayerMethod, layer_method_for, register_layer_method
from .layers import equivalent_weight
from .report import SIGMA_ERROR_WARN, CompressionReport, warn_layer
from sigmadecomp.tt_modes import check_tt_ranks

from ._batches import (as_batches, check_not_meta, check_type, outside_inference_mode,
                       progress_bar, user_stacklevel)
from .selection import (
    SUPPORTED,
    CallOrder,
    _call_order,
    _default_names,
    default_exclusions,
    default_layers,
    dense_reasons,
    held_outside,
    module_kind,
    module_names,
    n_params,
    obstacle,
    param_owners,
    unsupported_modules,
)

__all__ = [
    "compress",
    "default_layers",
    "SIGMA_ERROR_WARN",
    "CompressionReport",
    "LayerMethod",
    "LayerPlan",
    "LAYER_METHODS",
    "register_layer_method",
    "layer_method_for",
    "decompose_layer",
]


# ------------------------------------------------------------------ helpers


#: Estimated floating-point operations of one CP layer above which
#: :func:`compress` warns before starting: 1e14 is over half an hour at
#: 50 GFLOP/s. Ranks from ``ratio=`` stay below it on ResNet-50's largest
#: 3x3 conv (512 x 512 x 3 x 3 at rX 3: about 3e13); a rank far beyond the
#: layer's size (R = 20000 on a 64 x 64 x 3 x 3 conv: about 2e15) does not.
CP_COST_WARN_FLOP = 1e14

#: Throughput assumed to turn the estimate into a time in the warning.
_ASSUMED_FLOPS = 50e9


_progress = progress_bar  # (a module name of its own: tests replace it)


def _check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio):
        raise TypeError(f"ratio={ratio!r} is not allowed; ratio must be a finite number > 1")
    if ratio <= 1:
        raise ValueError(f"ratio={ratio!r} is not allowed; ratio (the per-layer compression "
                         "factor rX = weights(original) / weights(factorized), biases not "
                         "counted) must be > 1")
    return float(ratio)


def _check_not_meta(model, covariances):
    check_not_meta(model, who="compress needs")
    for k, st in (covariances or {}).items():
        if isinstance(st, LayerStats) and (st.sigma.is_meta or st.mean.is_meta):
            raise ValueError(f"covariances[{k!r}] is on the meta device (shapes without data); "
                             "collect or load the statistics on a real device")


#: CG iterations of one exact CP B-update assumed by :func:`cp_flop` (measured
#: 60-110 on ResNet-18 and reference layers at rX=3, notes/sweeps.md).
CP_EXACT_CG_ITERATIONS = 80
#: ... when the statistic averaged fewer patch vectors than it has inputs, so
#: that Sigma is singular and its ridge sets the conditioning (measured: 425
#: on a 512-channel ResNet-18 conv, 3,136 patches for 4,608 inputs,
#: notes/cp_scale.md).
CP_SINGULAR_CG_ITERATIONS = 400
#: ... and of one B-update under ``inner={'maxiter': 'adaptive'}`` (a cap of 5
#: that doubles only when progress stalls).
CP_ADAPTIVE_CG_ITERATIONS = 6


def cp_flop(shape, rank, options, weighted, samples=None):
    """Rough floating-point operations of :func:`sigmadecomp.cp` on a ``shape`` kernel.

    A Sigma sweep costs about ``2 n^2 R`` per CG iteration of its B-update plus
    three such products (the other blocks and the error); the number of CG
    iterations follows ``options['inner']`` (exact by default) and, for the
    exact B-update, whether the statistic is singular: ``samples`` (the patch
    vectors it averaged, ``LayerStats.count``) below its size ``n``.
    """
    T = shape[0]
    n = int(math.prod(shape[1:]))
    R = float(rank)
    sweeps = int(options.get("n_iter_max", 100))
    per_frob = 6 * T * n * R + 2 * R ** 3 + 4 * (T + n) * R ** 2
    if not weighted:
        return sweeps * per_frob
    inner = options.get("inner") or {}
    maxiter = inner.get("maxiter") if isinstance(inner, dict) else getattr(inner, "maxiter", None)
    exact = (CP_SINGULAR_CG_ITERATIONS if samples is not None and samples < n
             else CP_EXACT_CG_ITERATIONS)
    if maxiter is None:
        cg = exact
    elif maxiter == "adaptive":
        cg = CP_ADAPTIVE_CG_ITERATIONS
    else:
        cg = min(int(maxiter), exact)
    per_sigma = 2 * (cg + 3) * n * n * R + 4 * n * R ** 2 + 2 * R ** 3 + 4 * T * n * R
    init = options.get("init", "frobenius")
    return sweeps * per_sigma + (25 * per_frob if init in (None, "frobenius") else 0)


def _named_error(name, exc):
    """``exc`` again, of the same type, with the layer's name in front; chained to it."""
    label = repr(name) if name else "(the model itself)"
    try:
        new = type(exc)(f"layer {label}: {exc}")
    except Exception:
        exc.add_note(f"raised while compressing layer {label}")
        return exc
    return new


def _carry_requires_grad(old, new):
    """Factors train (or stay frozen) like the weight they replace; the bias like the bias."""
    w_flag = old.weight.requires_grad
    b_flag = old.bias.requires_grad if getattr(old, "bias", None) is not None else w_flag
    for pname, p in new.named_parameters():
        p.requires_grad_(b_flag if pname.rsplit(".", 1)[-1] == "bias" else w_flag)


# --------------------------------------------------------------------- plan


@dataclass(eq=False, repr=False)
class LayerPlan:
    """One layer's work in :func:`compress`, decided before any decomposition runs.

    Attributes
    ----------
    name : str
        The layer's (first) dotted name; ``''`` for a bare layer.
    module : nn.Conv2d or nn.Linear
        The original layer (never modified).
    kind : str
        ``'Linear'``, ``'Conv2d 3x3'``, ...
    method : str
        Its format, a key of :data:`LAYER_METHODS` (``'svd'`` for Linear
        layers and 1x1 convs under the conv methods, see
        :func:`layer_method_for`).
    aliases : list of str
        The module's other names (a shared module is replaced under all).
    sigma : PreparedSigma or None
        The matrix the error is minimised in: the layer's Sigma, or its
        centered covariance with ``centered=True``; None without statistics.
        Layers reading one statistic share one object, so its eigen-
        decomposition (if any step needs it) runs once for all of them.
    sigma_full : PreparedSigma, torch.Tensor or None
        The uncentered Sigma: the denominator of the reported relative
        Sigma-error (the same object as ``sigma`` unless ``centered``, then
        the statistics' own matrix, converted to float64 when used).
    mean : torch.Tensor or None
        The input mean for the bias correction (only with ``centered=True``).
    ranks : int or tuple of int
        Chosen by the rank step.
    params : int
        Weight parameters of the factorized layer at ``ranks``.
    options : dict
        Keyword arguments of the core function (none for the closed-form SVD).
    samples : int or None
        The patch vectors the statistic averaged (``LayerStats.count``; its
        rank is at most this); None without statistics. Used by the cost model.
    """

    name: str
    module: nn.Module
    kind: str
    method: str
    aliases: List[str] = field(default_factory=list)
    sigma: Optional[PreparedSigma] = None
    sigma_full: object = None
    mean: Optional[torch.Tensor] = None
    ranks: object = None
    params: Optional[int] = None
    options: dict = field(default_factory=dict)
    samples: Optional[int] = None

    @property
    def names(self):
        """Every name of the module, its own first."""
        return [self.name] + list(self.aliases)

    @property
    def shape(self):
        return tuple(self.module.weight.shape)

    def weight64(self):
        """The weight as a float64 tensor on its device (detached)."""
        return self.module.weight.detach().to(torch.float64)

    def __repr__(self):
        return (f"LayerPlan({self.name!r}, {self.kind}, method={self.method!r}, "
                f"ranks={self.ranks}, weighted={self.sigma is not None})")


def _prepare_statistics(key, module, stats, centered, cache):
    """``(sigma, sigma_full, mean)`` of one layer: the statistic prepared once per object.

    ``sigma`` is a :class:`PreparedSigma` of the float64 Sigma (or of the
    centered covariance) on the weight's device; layers reading one shared
    :class:`LayerStats` object (e.g. attention q/k/v) get the very same one.
    """
    if not isinstance(stats, LayerStats):
        raise TypeError(f"covariances[{key!r}] is a {type(stats).__name__}; it must be a "
                        "LayerStats from collect_covariances")
    w = module.weight
    # the statistics must describe this layer's input: kind, input size, geometry
    stats.check_compatible(module, key)
    cache_key = (id(stats), w.device)
    if cache_key not in cache:
        if centered:
            sigma = PreparedSigma(stats.centered(), like=w, rebuild=stats.centered)
            full = stats.sigma  # converted when the layer's error is measured
        else:
            sigma = full = PreparedSigma(stats.sigma, like=w)
        # checked now; the float64 matrix is made again when a layer needs it and
        # released after its last layer (_decompose_all), so that a network's
        # statistics are not held twice
        sigma.release()
        # the stats object is kept in the entry so its id cannot be reused during this call
        cache[cache_key] = (sigma, full, stats.mean.to(w.device, torch.float64), stats)
    sigma, full, mean, _ = cache[cache_key]
    return sigma, full, (mean if centered else None)


@contextlib.contextmanager
def _naming(name, shard=None):
    """Re-raise an error of one layer's work with the layer's name in front."""
    try:
        yield
    except Exception as e:
        named = _named_error(name, e)
        if shard is not None:
            shard.abort(named)
        if named is e:  # the type cannot be rebuilt: the name is in a note
            raise
        raise named from e


def _every_layer(name, module):
    """The predicate of ``layers='all'``."""
    return True


def select_step(model, layers, explicit, ratio, canon=lambda n: n):
    """Step 1: ``(chosen (name, module) pairs, whether named, skipped rows, the layers asked)``.

    ``explicit`` maps layer names to ranks given by the user; ``canon`` maps a
    name to the first name of its module. Also used by sequential compression.
    """
    skipped = []
    _check_rank_names(model, explicit)
    order = layers if isinstance(layers, CallOrder) else None  # the default, by call order
    if order is not None:
        layers = None
    if isinstance(layers, str) and layers == "all" and layers not in dict(model.named_modules()):
        layers = _every_layer  # every Conv2d and Linear, as a predicate (none is "named")
    named = layers is not None and not callable(layers)
    if layers is None:
        if explicit and ratio is None:
            layers, named = list(explicit), True
        else:
            layers = _default_names(model, order)
            layers += [k for k in explicit if k not in layers]
            skipped += [s for s in default_exclusions(model, order) if s["name"] not in layers]
            skipped += unsupported_modules(model)
    elif callable(layers) and not isinstance(layers, torch.nn.Module):
        # a predicate or 'all' chooses among Conv2d/Linear: list what none can choose
        skipped += unsupported_modules(model)
    elif isinstance(layers, str):
        layers = [canon(layers)]
    elif not callable(layers):
        try:
            layers = [canon(n) for n in layers]
        except TypeError:
            pass  # select_layers explains
    chosen = select_layers(model, layers)
    chosen_names = {n for n, _ in chosen}
    for k in explicit:
        if k not in chosen_names:
            raise ValueError(f"ranks contains {k!r}, which is not among the layers to "
                             f"compress; the chosen layers are {sorted(chosen_names)}")
    return chosen, named, skipped, layers


def _check_rank_names(model, explicit):
    """Refuse keys of ``ranks`` that name no Conv2d/Linear module of ``model`` (a bare layer
    is named ``''``), naming ``ranks`` rather than ``layers``."""
    if not explicit:
        return
    if isinstance(model, SUPPORTED):
        names = [""]
    else:
        names = [n for n, m in model.named_modules(remove_duplicate=False)
                 if isinstance(m, SUPPORTED)]
    for k in explicit:
        if not isinstance(k, str):
            raise TypeError(f"ranks has the key {k!r} of type {type(k).__name__}; its keys "
                            "must be layer names (str), e.g. {'layer1.0.conv1': 8}")
        if k not in names:
            shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
            raise ValueError(f"ranks has the key {k!r}, which is not a Conv2d/Linear module of "
                             f"the model; the Conv2d/Linear modules are: {shown}")


#: The skip reason of a default layer without statistics.
_NO_STATISTICS = "no statistics for this layer in covariances"


def _plan(model, chosen, method, covariances, centered, options, paths, named, skipped):
    """Step 2: a :class:`LayerPlan` per layer that can be replaced (no decomposition yet).

    ``named``: True when the user named every chosen layer, else the set of the names
    given their own ranks; a named layer that cannot be replaced raises, others are
    skipped with the reason."""
    owners, held = param_owners(model), held_outside(model)
    cache = {}
    plans = []
    for name, module in chosen:
        kind = module_kind(module)
        names = paths.get(id(module), [name])
        reason = obstacle(model, module, names, owners, held)
        stats_key = None
        if reason is None and covariances is not None:
            stats_key = next((n for n in names if n in covariances), None)
            if stats_key is None:
                reason = _NO_STATISTICS
        if reason is not None:
            # a layer the user named (in layers=, or with its own ranks=) raises
            if named is True or (named and name in named):
                raise ValueError(f"layer {name!r} cannot be compressed: {reason}")
            skipped.append({"name": name, "kind": kind, "reason": reason})
            continue
        fmt = layer_method_for(module, method)
        if fmt not in LAYER_METHODS:
            raise ValueError(f"method {fmt!r} for layer {name!r} is not registered")
        plan = LayerPlan(name=name, module=module, kind=kind, method=fmt,
                         aliases=[n for n in names if n != name],
                         options=options if fmt != "svd" or method == "svd" else {})
        if covariances is not None:
            plan.sigma, plan.sigma_full, plan.mean = _prepare_statistics(
                stats_key, module, covariances[stats_key], centered, cache)
            plan.samples = covariances[stats_key].count
        plans.append(plan)
    return plans


def _choose_ranks(plans, *, explicit, ranks, ratio, budget, options, skipped):
    """Step 3: set ``plan.ranks`` and ``plan.params``; drop layers that would not shrink."""
    sigma_aware = budget is not None or ranks == "evbmf"
    # only the Sigma-SVD needs a factorization again after the ranks are chosen
    needed = {id(p.sigma) for p in plans if p.method == "svd"}
    if budget is not None:
        alloc = _ranks.allocate_ranks(
            _SpecsOneAtATime(plans, explicit, needed), budget,
            method={p.name: LAYER_METHODS[p.method].rank_method for p in plans})
    kept = []
    for p in plans:
        shape = p.shape
        rmeth = LAYER_METHODS[p.method].rank_method
        dense = _ranks.layer_params(shape, "dense", None)
        auto = True
        if p.name in explicit:
            r, auto = explicit[p.name], False
        elif budget is not None:
            r = alloc[p.name]
        elif ranks == "evbmf":
            with _naming(p.name):
                if p.sigma is not None:
                    p.sigma.eigh()  # a failure of the factorization names the layer
                r = _ranks.evbmf_ranks(p.weight64(), rmeth, p.sigma)
            if p.sigma is not None and id(p.sigma) not in needed:
                _release(p)
        else:
            r = _ranks.ratio_to_ranks(shape, rmeth, ratio)
        try:
            p.params = _ranks.layer_params(shape, rmeth, r)
        except (TypeError, ValueError) as e:
            raise type(e)(f"ranks for layer {p.name!r} (weight {shape}): {e}") from None
        p.ranks = tuple(int(v) for v in r) if isinstance(r, (tuple, list)) else int(r)
        # (with a budget too: dense costs no more than the share allocated to the layer)
        if auto and p.params >= dense:
            skipped.append({"name": p.name, "kind": p.kind,
                            "reason": f"ranks {p.ranks} would not reduce its {dense} "
                                      "weight parameters"})
            continue
        if not auto and p.params > dense:
            warnings.warn(
                f"ranks {p.ranks} for layer {p.name!r} (weight {shape}) give "
                f"{p.params} weight parameters, more than the {dense} of the original "
                "layer; the layer is replaced anyway", CompressionWarning,
                stacklevel=user_stacklevel())
        if rmeth == "cp":
            flop = cp_flop(shape, p.ranks, options, p.sigma is not None, p.samples)
            if flop > CP_COST_WARN_FLOP:
                warnings.warn(
                    f"CP rank {p.ranks} for layer {p.name!r} (weight {shape}) needs about "
                    f"{flop:.1e} floating-point operations (~{flop / _ASSUMED_FLOPS / 60:.0f} "
                    "min at 50 GFLOP/s); choose a smaller rank or fewer n_iter_max"
                    + ("" if options.get("inner") or p.sigma is None else
                       ", or cap the inner solves: with options={'inner': {'maxiter': "
                       "'adaptive'}, 'n_iter_max': 10} every conv of a ResNet-18 at rX=3 "
                       "took about 5.5 min on 2 cores"),
                    CompressionWarning, stacklevel=user_stacklevel())
        kept.append(p)
    if sigma_aware:  # layers dropped above: their factorizations are not needed either
        needed = {id(p.sigma) for p in kept if p.method == "svd"}
        for p in plans:
            if p.sigma is not None and id(p.sigma) not in needed:
                _release(p)
    return kept


class _SpecsOneAtATime(Mapping):
    """The plans as ``{name: LayerSpec}`` for the budget allocation, one layer in memory at a time.

    The allocation reads the items in order and is done with a layer's Sigma
    (its error curve computed) when it asks for the next one. Each Sigma is
    factorized when its layer is reached, so that a failure names the layer,
    and released when the next item is asked for, unless ``needed`` holds it
    (the Sigma-SVD reuses its factorization). Otherwise every layer's float64
    Sigma and eigenvectors would be held at once (ResNet-50: about three
    times its statistics).
    """

    def __init__(self, plans, explicit, needed):
        self._plans = plans
        self._explicit = explicit
        self._needed = needed

    def __len__(self):
        return len(self._plans)

    def __iter__(self):
        return (p.name for p in self._plans)

    def __getitem__(self, name):
        p = next(p for p in self._plans if p.name == name)
        return _ranks.LayerSpec(p.weight64(), p.sigma)

    def items(self):
        for p in self._plans:
            if p.sigma is not None and p.name not in self._explicit:
                with _naming(p.name):
                    p.sigma.eigh()
            yield p.name, _ranks.LayerSpec(p.weight64(), p.sigma)
            if p.sigma is not None and id(p.sigma) not in self._needed:
                _release(p)


def decompose_layer(plan):
    """Step 4 for one layer: decompose its weight, build the replacement, measure the errors.

    Parameters
    ----------
    plan : LayerPlan
        With ``ranks`` chosen.

    Returns
    -------
    new_module : nn.Module
        In the layer's dtype, device and training mode; every factor keeps
        the ``requires_grad`` of the weight (the bias of the bias) it
        replaces.
    row : dict
        The layer's row of :class:`CompressionReport` (without latencies).
    result
        The core result object.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch.compress import LayerPlan, decompose_layer
    >>> conv = nn.Conv2d(8, 8, 3)
    >>> plan = LayerPlan('conv', conv, 'Conv2d 3x3', 'tucker2', ranks=(4, 4),
    ...                  options={'n_iter_max': 5})
    >>> new, row, result = decompose_layer(plan)
    >>> type(new).__name__, row['ranks'], row['params_after']
    ('Tucker2Conv2d', (4, 4), 216)
    """
    spec = LAYER_METHODS[plan.method]
    module = plan.module
    t0 = time.perf_counter()
    W = plan.weight64()
    result = spec.decompose(W, plan.ranks, plan.sigma, plan.options)
    approx = result.to_tensor()
    if not isinstance(approx, torch.Tensor):
        approx = torch.as_tensor(approx)
    approx = approx.to(W).reshape(W.shape)
    D = (W - approx).reshape(W.shape[0], -1)
    bias_shift = D @ plan.mean if plan.mean is not None else None
    new = spec.build(module, result, bias_shift)
    new.train(module.training)
    _carry_requires_grad(module, new)
    seconds = time.perf_counter() - t0
    # the errors of the layer as built: its own factors (in the layer's dtype) multiplied
    # out in float64, so that a float32 layer reports what it computes, not what the
    # float64 result would have
    built = equivalent_weight(new)
    if built is not None and built.numel() == W.numel():
        approx = built.to(W).reshape(W.shape)
        D = (W - approx).reshape(W.shape[0], -1)
    sig_err = None
    if plan.sigma is not None:
        full = plan.sigma_full
        full = (full.matrix if isinstance(full, PreparedSigma)
                else full.to(device=W.device, dtype=torch.float64))
        sig_err = _relative_error(W.reshape(W.shape[0], -1), D, plan.sigma.matrix, full)
    n_iter = getattr(result, "n_iter", None)
    converged = getattr(result, "converged", None)
    ranks = plan.ranks
    if plan.method == "tt":  # the core clips TT ranks to each bond's largest useful rank
        ranks = tuple(int(r) for r in result.ranks)
        if plan.ranks is not None and check_tt_ranks(plan.ranks, len(ranks)) != ranks:
            warnings.warn(f"TT ranks {plan.ranks} for layer {plan.name!r} (weight "
                          f"{tuple(W.shape)}) were clipped to {ranks}, the largest useful rank "
                          "of each bond", CompressionWarning, stacklevel=user_stacklevel())
    row = {
        "name": plan.name, "kind": plan.kind, "method": plan.method, "ranks": ranks,
        "params_before": n_params(module), "params_after": n_params(new),
        "sigma_error": sig_err, "frobenius_error": float(relative_sigma_error(W, approx)),
        "n_iter": None if n_iter is None else int(n_iter),
        "converged": None if converged is None else bool(converged),
        "seconds": seconds, "aliases": list(plan.aliases),
    }
    return new, row, result


def _relative_error(K, D, M, S):
    """``sqrt(tr(D M D^T) / tr(K S K^T))`` in float64, each quadratic form measured by the
    library's Sigma-norm policy (:func:`sigmadecomp.sigma_norm`: a value that is negative
    beyond rounding, of a float32 or slightly indefinite statistic, is measured in the
    nearest PSD matrix, never clamped to 0), each scaled so that neither under- nor
    overflows."""
    (Dn, Mn), fd = _unit_scaled(D, M)
    (Kn, Sn), fk = _unit_scaled(K, S)
    num = float(_sq_sigma_norm(Dn, Mn))
    den = float(_sq_sigma_norm(Kn, Sn))
    if den > 0:
        return (fd / fk) * math.sqrt(num / den)
    return 0.0 if num == 0 else math.inf


@contextlib.contextmanager
def _sweeps_on(bar, plan):
    """Show the sweeps of ``plan``'s decomposition on the progress bar (when there is one
    and the user gave no callback of their own); ``plan.options`` is restored after."""
    if not hasattr(bar, "set_postfix_str") or plan.method == "svd" or "callback" in plan.options:
        yield
        return
    saved = plan.options
    limit = saved.get("n_iter_max")

    def show(result):
        errors = getattr(result, "errors", None)
        # a closed form (TT-SVD) has n_iter None: no sweep to show
        parts = [] if result.n_iter is None else [
            f"sweep {result.n_iter}" + (f"/{limit}" if limit else "")]
        parts += [f"error {float(errors[-1]):.4g}"] if errors else []
        bar.set_postfix_str(f"{plan.name}: " + ", ".join(parts), refresh=True)
        return False

    plan.options = {**saved, "callback": show}
    try:
        yield
    finally:
        plan.options = saved


def _decompose_all(plans, options, distributed, progress, shapes, min_speedup):
    """Step 4: every planned layer (this process's share), then every process's results."""
    rows, new_modules = [], {}
    shard = _parallel.LayerShard(plans, options, distributed)  # this process's layers
    it = _progress(shard.layers(plans), total=len(plans) if not shard.active else None,
                   enabled=progress and len(plans) > 1, desc="compress")
    # a statistic shared by several layers keeps its factorization until the last of
    # them in the shard's hand-out order: no later layer can need it after that
    position = {plans[i].name: k for k, i in enumerate(shard.order)}
    last = {}
    for p in plans:
        if p.sigma is not None:
            last[id(p.sigma)] = max(last.get(id(p.sigma), -1), position[p.name])
    held = {}
    for p in it:
        for key in [key for key in held if last[key] < position[p.name]]:
            _release(held.pop(key))
        with _naming(p.name, shard), _sweeps_on(it, p):
            new, row, _ = decompose_layer(p)
        if p.sigma is not None:
            if last[id(p.sigma)] == position[p.name]:
                _release(p)  # free the n x n matrices and factors
            else:
                held[id(p.sigma)] = p
        row["_dense_reason"] = None
        if shapes.get(p.name) is not None:
            shape = shapes[p.name]
            keep, d_ms, f_ms = _latency.speedup_verdict(p.module, new, shape, min_speedup)
            row.update(latency_dense_ms=d_ms, latency_factorized_ms=f_ms)
            if not keep:
                row["_dense_reason"] = (
                    f"factorized {d_ms / f_ms:.2f}x as fast as dense ({f_ms:.3f} vs "
                    f"{d_ms:.3f} ms at input {tuple(shape[0])}), below "
                    f"min_speedup={min_speedup:g}: kept dense")
        rows.append(row)
        new_modules[p.name] = (new, p.names)
    for p in held.values():
        _release(p)
    return shard.gather(rows, new_modules)  # all layers, on every process


def _release(plan):
    """Free the float64 statistics of ``plan`` (rebuilt from the originals on a later use)."""
    for sigma in (plan.sigma, plan.sigma_full):
        if isinstance(sigma, PreparedSigma):
            sigma.release()


def _keep_fast_enough(rows, new_modules, skipped):
    """Layers whose factorized form is not fast enough stay dense (listed in ``skipped``)."""
    kept = []
    for row in rows:
        reason = row.pop("_dense_reason")
        if reason is None:
            kept.append(row)
            continue
        new_modules.pop(row["name"])
        skipped.append({"name": row["name"], "kind": row["kind"],
                        "latency_dense_ms": row["latency_dense_ms"],
                        "latency_factorized_ms": row["latency_factorized_ms"], "reason": reason})
    return kept


def _install(model, new_modules, inplace):
    """Step 5: the model with the new modules in place (a copy unless ``inplace``)."""
    if isinstance(model, SUPPORTED) and "" in new_modules:
        return new_modules[""][0]
    target = model if inplace else copy.deepcopy(model)
    for new, names in new_modules.values():
        for path in names:
            parent_name, _, child = path.rpartition(".")
            parent = target.get_submodule(parent_name) if parent_name else target
            setattr(parent, child, new)
    return target


#: The formats whose ranks ``ranks='evbmf'`` can estimate (:func:`sigmadecomp.evbmf_ranks`).
EVBMF_METHODS = ("svd", "tucker2", "cp")


def check_evbmf_method(method, ranks, budget=None):
    """Refuse ``ranks='evbmf'`` and ``budget=`` for a format they cannot serve (Tensor-Train),
    before any work is done."""
    if isinstance(ranks, str) and ranks == "evbmf" and method not in EVBMF_METHODS:
        allowed = ", ".join(repr(m) for m in EVBMF_METHODS)
        raise ValueError(f"ranks='evbmf' is not available for method={method!r}; EVBMF "
                         f"estimates the ranks of {allowed} only: give ratio= for it")
    if budget is not None and method == "tt":
        raise ValueError(f"budget={budget!r} is not available for method='tt': Tensor-Train "
                         "has no error curve to allocate ranks by; give ratio= (or ranks=)")


def _check_arguments(model, method, ratio, ranks, budget, centered, covariances):
    check_type(model, nn.Module, "model")
    if method not in LAYER_METHODS:
        allowed = ", ".join(repr(m) for m in LAYER_METHODS)
        raise ValueError(f"method={method!r} is not allowed; method must be one of {allowed}")
    if ratio is not None:
        ratio = _check_ratio(ratio)
    if isinstance(ranks, str) and ranks != "evbmf":
        raise ValueError(f"ranks={ranks!r} is not allowed; ranks must be a dict of layer "
                         "name -> ranks or the string 'evbmf'")
    if ranks is not None and not isinstance(ranks, str) and not hasattr(ranks, "items"):
        raise TypeError(f"ranks of type {type(ranks).__name__} is not allowed; ranks must be "
                        "a dict of layer name -> ranks or the string 'evbmf'")
    if budget is not None and (ratio is not None or ranks is not None):
        raise ValueError("budget cannot be combined with ratio or ranks; give one of them")
    if ranks == "evbmf" and ratio is not None:
        raise ValueError("ranks='evbmf' cannot be combined with ratio; give one of them")
    check_evbmf_method(method, ranks, budget)
    if ratio is None and ranks is None and budget is None:
        raise ValueError("no way to choose ranks: give ratio=, ranks= (a dict or 'evbmf') "
                         "or budget=")
    if centered and covariances is None:
        raise ValueError("centered=True needs covariances (the mean of each layer's input)")
    if covariances is not None and not hasattr(covariances, "items"):
        raise TypeError(f"covariances of type {type(covariances).__name__} is not allowed; "
                        "it must be a dict of layer name -> LayerStats")
    _check_not_meta(model, covariances)
    return ratio


# ----------------------------------------------------------------- compress


def _default_by_call_order(model, layers, data, example_input, forward=None):
    """``(layers, data)``: ``layers=None`` as a :class:`CallOrder` when an input batch is at
    hand, so that the layers left alone (those reading the model's input, those whose
    output it returns) are found in one extra forward pass on one batch; ``data`` still
    yields every batch."""
    if (layers is not None or not isinstance(model, nn.Module)
            or isinstance(model, SUPPORTED) or (data is None and example_input is None)):
        return layers, data
    from ._batches import model_device, run_batch

    if example_input is not None:
        order = _call_order(model, example_input)
    else:
        first, data = _first_batch(data)
        if first is None:
            return layers, data  # no batch (or no iterable): collect_covariances explains
        order = _call_order(model, None,
                            run=lambda m: run_batch(m, first, 0, model_device(m), forward))
    return (order if order else None), data


def _first_batch(data):
    """``(the first batch or None, data)``; a one-shot iterator gets the batch read back in
    front, so ``data`` still yields every batch."""
    if isinstance(data, (torch.Tensor, Mapping)):  # one batch
        return data, data
    try:
        it = iter(data)
    except TypeError:
        return None, data
    try:
        first = next(it)
    except StopIteration:
        return None, data
    if it is data:
        data = itertools.chain([first], it)
    return first, data


def _data_layers(model, layers, ranks, ratio):
    """Names of the layers ``compress`` will choose: those whose statistics ``data=`` needs.

    None for a bare layer (its statistics are collected under the name ``''``).
    """
    if not isinstance(model, nn.Module) or isinstance(model, (nn.Conv2d, nn.Linear)):
        return None
    _, canon, explicit = _canonical_names(model, ranks)
    chosen, _, _, _ = select_step(model, layers, explicit, ratio, canon)
    # layers surgery leaves dense need no statistics; the report lists them as skipped
    dense = dense_reasons(model, [n for n, _ in chosen])
    # nor do default layers the pass on the first batch never called (no rows to collect;
    # planning skips them for want of statistics, and says why)
    called = set(layers.order) if isinstance(layers, CallOrder) else None
    return [n for n, _ in chosen if n not in dense
            and (called is None or n in called or n in explicit)]


def _no_data_layers(model, layers, ranks, ratio):
    """Whether ``compress`` would choose no layer at all. A choice that raises (a bad layer
    name, say) counts as not empty: sequential compression and refit then refuse it in
    their own argument checks, which every process of a group takes part in."""
    try:
        return _data_layers(model, layers, ranks, ratio) == []
    except Exception:
        return False


def _canonical_names(model, ranks):
    """``(paths, canon, explicit)``: every name of every module, the map of a name to its
    module's first name, and the explicit ranks under those first names."""
    paths = module_names(model)
    canonical = {p: lst[0] for lst in paths.values() for p in lst}

    def canon(n):
        return canonical.get(n, n) if isinstance(n, str) else n

    explicit, given_as = {}, {}
    for k, v in (ranks.items() if hasattr(ranks, "items") else ()):
        c = canon(k)
        if c in explicit and not _same_ranks(explicit[c], v):
            raise ValueError(f"ranks gives {given_as[c]!r}: {explicit[c]!r} and {k!r}: {v!r}, "
                             "two names of one shared module; give its ranks once")
        explicit[c], given_as[c] = v, k
    return paths, canon, explicit


def _same_ranks(a, b):
    try:
        return bool(a == b)
    except Exception:  # (e.g. tensors of several entries)
        return False


def _check_option_names(method, options):
    """Refuse a key of ``options`` that the method's core solver does not take, before any
    work, listing the ones it takes (``'tt'`` and registered methods check their own)."""
    import inspect

    import sigmadecomp

    name = {"svd": "sigma_svd", "tucker2": "tucker2", "cp": "cp"}.get(method)
    if name is None or not options:
        return
    solver = getattr(sigmadecomp, name)
    takes = list(inspect.signature(solver).parameters)[3:]  # after weight, ranks, sigma
    allowed = set(takes) | set(getattr(solver, "deprecated_names", ()))
    for key in options:
        if key not in allowed:
            raise TypeError(f"options contains {key!r}, which method={method!r} does not take; "
                            f"the options of sigmadecomp.{name} are: {', '.join(takes)}")


def _check_data_options(data, max_batches, forward, mask, min_speedup, example_input):
    """``max_batches``, ``forward`` and ``mask`` of :func:`compress`: valid, and given only
    with ``data`` (they describe the passes over it)."""
    from ._batches import check_pass_options

    given = [n for n, v, d in (("max_batches", max_batches, None), ("forward", forward, None),
                               ("mask", mask, "auto")) if v is not d]
    if given and data is None:
        raise ValueError(f"{given[0]}= needs data=: it describes the passes over the "
                         "calibration data")
    check_pass_options(forward=forward, mask=mask, max_batches=max_batches)
    if forward is not None and min_speedup is not None and example_input is None:
        raise ValueError("min_speedup with forward= needs example_input= (one input of the "
                         "model): the batches of data are not the model's inputs as they are")


def _check_early(model, method, covariances, ratio, ranks, budget, layers, data, sequential,
                 refit, inplace, centered, options, min_speedup=None, example_input=None,
                 progress=True):
    """The checks of :func:`compress` that come before any pass over ``data`` or exchange:
    its options (method, ratio, ranks, budget, min_speedup: a bad value must not cost a
    pass over the calibration data first), and with ``data`` (one-shot) what the
    statistics pass checks, which then runs without an exchange of its own (the layer
    names, the batches' container)."""
    for flag, value in (("sequential", sequential), ("inplace", inplace),
                        ("centered", centered), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag}={value!r} is not allowed; it must be True or False")
    # (centered needs the statistics, which data= collects later: checked with them)
    _check_arguments(model, method, ratio, ranks, budget, centered and data is None,
                     covariances)
    _latency.check_min_speedup(
        min_speedup, example_input if data is None else "the first batch of data")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options of type {type(options).__name__} is not allowed; options "
                        "must be a dict of keyword arguments of the core decomposition, e.g. "
                        "{'n_iter_max': 20}")
    _check_option_names(method, options)
    if (sequential or data is not None) and covariances is not None:
        raise ValueError("covariances= cannot be combined with data= or sequential=True: the "
                         "statistics are then collected from data; give one or the other")
    check_evbmf_method(method, ranks, budget)
    if isinstance(model, nn.Module):  # before any forward pass could materialize them
        check_not_meta(model, who="compress needs")
    if refit is not None and data is None:
        raise ValueError(f"refit={refit!r} needs data=: dense layers are refitted to the "
                         "original outputs on the compressed model's inputs, measured on "
                         "calibration batches")
    if (sequential or refit is not None) and data is not None:
        from .sequential import _check_reiterable

        _check_reiterable(data)  # (before a one-shot iterator is wrapped, so it is named)
    if data is not None and not sequential and isinstance(model, nn.Module):
        as_batches(data)
        if not isinstance(model, SUPPORTED):  # the names the statistics are collected for
            _, canon, explicit = _canonical_names(model, ranks)
            select_step(model, layers, explicit, ratio, canon)


def _warn_foreign_statistics(model, covariances):
    """Warn when ``covariances`` holds statistics under names that are no module of the
    model (e.g. collected on a wrapped or unwrapped copy): they are not used, and the
    layers they were meant for would be skipped for want of statistics."""
    if not covariances or not isinstance(model, nn.Module):
        return
    names = {n for n, _ in model.named_modules(remove_duplicate=False)}
    foreign = [k for k in covariances if k not in names]
    if foreign:
        shown = ", ".join(repr(k) for k in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        warnings.warn(
            f"covariances has statistics for {len(foreign)} name(s) that are no module of "
            f"the model: {shown}; they are not used (statistics collected on another or a "
            "wrapped copy of the model? the names must be those of model.named_modules())",
            CompressionWarning, stacklevel=user_stacklevel())


def _plan_steps(model, method, covariances, ratio, ranks, budget, layers, centered, options,
                min_speedup, example_input):
    """Steps 1-3 of :func:`compress`: ``(options, min_speedup, skipped rows, plans, input
    shapes)``."""
    ratio = _check_arguments(model, method, ratio, ranks, budget, centered, covariances)
    options = dict(options or {})
    min_speedup = _latency.check_min_speedup(min_speedup, example_input)

    # every name of every module (a shared one has several), and ranks under first names
    paths, canon, explicit = _canonical_names(model, ranks)

    # 1. select  2. plan (statistics prepared once)  3. ranks -- no decomposition yet
    chosen, named, skipped, asked = select_step(model, layers, explicit, ratio, canon)
    _warn_foreign_statistics(model, covariances)
    plans = _plan(model, chosen, method, covariances, centered, options, paths,
                  True if named else set(explicit), skipped)
    if not plans:
        raise ValueError("no layer can be compressed: "
                         + ("; ".join(f"{s['name']!r}: {s['reason']}" for s in skipped)
                            or f"layers={asked!r} selects no Conv2d/Linear module"))
    plans = _choose_ranks(plans, explicit=explicit, ranks=ranks, ratio=ratio, budget=budget,
                          options=options, skipped=skipped)
    shapes = {}
    if min_speedup is not None:  # input size of each layer, under any of its names
        seen = _latency.input_shapes(model, example_input)
        shapes = {p.name: next((seen[n] for n in p.names if n in seen), None) for p in plans}
    return options, min_speedup, skipped, plans, shapes


@outside_inference_mode
def compress(model, method, *, covariances=None, ratio=None, ranks=None, budget=None,
             layers=None, inplace=False, centered=False, options=None, progress=True,
             distributed=None, min_speedup=None, example_input=None, data=None,
             sequential=False, refit=None, max_batches=None, forward=None, mask="auto",
             _checked=False):
    """Replace Conv2d/Linear layers of a model by factorized layers.

    Parameters
    ----------
    model : torch.nn.Module
        A network, or a single ``nn.Conv2d`` / ``nn.Linear`` (then the
        factorized layer itself is returned; its name in the report and in
        ``covariances`` is ``''``).
    method : {'tucker2', 'cp', 'svd', 'tt'}
        Format of the k x k convolutions. Linear layers and 1x1 convs use the
        (Sigma-)SVD under the other methods; ``'svd'`` on a k x k conv factors
        ``K_(1)`` into a k x k conv to ``r`` channels and a 1x1 conv. ``'tt'``
        (Tensor-Train, Garipov et al. 2016) applies to convs and Linear layers
        alike, with automatic channel modes; its ranks are one int (uniform)
        or the tuple of TT ranks.
    covariances : dict of str to LayerStats, optional
        Statistics from :func:`collect_covariances`: the Sigma algorithms are
        used. ``None``: the classical Frobenius algorithms. Layers sharing one
        ``LayerStats`` object (layers reading the same input) share its
        prepared Sigma.
    ratio : float, optional
        Per-layer parameter compression ratio rX (> 1); each layer's ranks
        are the largest whose weight count is at most ``weights / ratio``
        (biases not counted; :func:`sigmadecomp.ranks.ratio_to_ranks`). A
        layer too small for that even at its smallest ranks gets those
        (ranks of 1) and stays below ``ratio``, as its row shows (or is left
        dense when they would not shrink it at all). The report's ``rX``
        counts the biases too, so a layer that meets ``ratio`` in weights
        can show a slightly lower ``rX``.
    ranks : dict or 'evbmf', optional
        Explicit ranks by layer name (``int`` for svd/cp, ``(r_T, r_S)`` for
        Tucker-2; with ``layers=None`` and no ``ratio`` only these layers are
        compressed; with ``ratio`` the dict overrides it), or ``'evbmf'`` for
        EVBMF ranks (Sigma-aware when statistics are given; ``'svd'``,
        ``'tucker2'`` and ``'cp'`` only, not ``'tt'``). Explicit ranks
        that make a layer larger than the original warn
        (:class:`sigmadecomp.CompressionWarning`), as does a CP rank whose
        run is estimated to take minutes (before any work is done).
    budget : int or float, optional
        Total weight parameters of the chosen layers after compression (an
        int), or that fraction of their original total (a float in (0, 1));
        distributed over the layers by :func:`sigmadecomp.ranks.allocate_ranks`
        (methods ``'svd'``, ``'tucker2'`` and ``'cp'``; not ``'tt'``).
    layers : None, str, list of str, or callable, optional
        Which modules may be compressed (names, or ``f(name, module) -> bool``
        over the ``Conv2d``/``Linear`` modules; ``'all'``: every one of
        them, unless the model has a module named ``'all'``). Default
        :func:`default_layers`: every ``Conv2d`` and ``Linear`` except the
        first layer (reading the model's input) and the last (the output
        layer, e.g. the classifier), which are listed in ``report.skipped``;
        layers named in ``ranks`` are added. With ``data`` (or
        ``example_input``) they are found in a forward pass on its first
        batch, as :func:`default_layers` does with ``example_input`` (every
        layer reading a model input and every layer whose output the model
        returns); without either, the first and last registered. With
        ``data``, a default layer that pass never calls has no statistics
        and is skipped with that reason.
        Named layers that cannot be compressed raise; other candidates are
        skipped with a reason.
    inplace : bool, optional
        Modify ``model`` itself (default: work on a deep copy). A bare layer
        cannot turn into another class: its factorized replacement is
        returned and ``model`` is left as it is.
    centered : bool, optional
        Decompose in the centered covariance ``sigma - mu mu^T`` and correct the
        bias by ``(K_(1) - K~_(1)) mu`` (needs ``covariances``). The expected
        squared output error is then ``tr(D C D^T) <= tr(D Sigma D^T)``, and
        the report's ``sigma_error`` is measured in ``C``:
        ``sqrt(tr(D C D^T) / tr(K Sigma K^T))``, the relative change of the
        layer's output once the bias is corrected.
    options : dict, optional
        Keyword arguments for the core decomposition of the k x k convs
        (e.g. ``n_iter_max``, ``tol``, ``rng`` of :func:`sigmadecomp.tucker2`);
        with ``method='svd'`` those of :func:`sigmadecomp.sigma_svd` (e.g.
        ``ridge``). Under the other methods, Linear layers and 1x1 convs use the
        closed-form Sigma-SVD with its defaults.
    progress : bool, optional
        A tqdm bar over layers (when stderr is a terminal or in a Jupyter notebook).
    distributed : None or bool, optional
        Spread the layers over the processes of a ``torch.distributed``
        process group. ``None`` (default): when a group is initialized with
        more than one process (e.g. under ``torchrun --nproc_per_node N``,
        gloo on CPU), every process decomposes a share of the layers (the
        next one, largest predicted cost first, whenever it is free:
        :mod:`sigmadecomp_torch.parallel`) and the results are exchanged with ``all_gather_object``, so every
        process returns the same model and report (timings aside) as one
        process. Every process must call ``compress`` with the same model,
        statistics and arguments (pass ``False`` where only some processes
        call it: the others would never answer). ``True``: the same, but
        refuse to run without an initialized group (checked before any
        batch is read); ``False``: decompose every layer here.
        The processes are started by the user (``torchrun``, or
        ``torch.multiprocessing.spawn`` as in ``benchmarks/parallel.py``),
        each with its own copy of the model and statistics. With ``data=``
        the statistics passes follow the same setting (summed over the
        group, or this process's data alone with ``False``). The processes
        compare their plans (layers, formats, ranks, a hash of each weight,
        statistics counts) and learn of each other's errors at each step
        that needs them all, the argument checks first (before any batch is
        read), so a process that fails makes the others raise an error
        naming it instead of waiting. A process whose ``data`` has no batch
        takes part with zero sums (one-shot and sequential alike).
    min_speedup : float, optional
        Keep a layer dense unless its factorized form runs at least this many
        times faster than the dense layer (``1.0``: only strictly not slower).
        Each layer is timed after its decomposition, dense and factorized
        interleaved, at the input size, batch and memory format it sees in
        ``example_input`` (:func:`sigmadecomp_torch.latency.compare_latency`,
        torch's current threads); a layer kept dense is listed in
        ``report.skipped`` with both times. ``None`` (default): no timing.
        Needs ``example_input``, or else ``data``: its first batch is the
        example (the inputs of a ``(inputs, targets)`` batch). Layers the
        example pass never calls are compressed without timing. Times are
        noisy on a busy machine.
    example_input : tensor, tuple or dict, optional
        One input batch of the model, for ``min_speedup`` and for the call
        order of the default ``layers`` (default: the first batch of
        ``data``, when given).
    data : tensor or iterable of batches, optional
        Calibration data. Without ``sequential``: the statistics are
        collected from it (:func:`collect_covariances` over every layer) and
        used as ``covariances``. Cannot be combined with ``covariances``.
    sequential : bool, optional
        Error-compensating sequential compression
        (:func:`sigmadecomp_torch.sequential.sequential_compress`, needs
        ``data``, a list or ``DataLoader``): layers are compressed in network
        order, each fitted to the inputs it gets once the earlier layers are
        compressed, with the target corrected by the cross-moment of the
        original and the compressed inputs. Default False (one-shot).
    refit : None, 'all', str, list of str or callable, optional
        Dense layers to refit to the compressed model's inputs (the
        classifier, say; needs ``data``): each one's weight becomes the
        least-squares fit of the original layer's output on the inputs it
        gets in the compressed model (``sequential_compress`` has the
        details; ``report.refitted`` lists them). With ``sequential``
        they are refitted in network order with the compressed layers;
        without, after the one-shot compression (one more pass over
        ``data`` per group of dependent layers). ``'all'`` and a predicate
        also take the chosen layers that their ranks leave dense, in both
        modes. Default None.
    max_batches, forward, mask : optional
        With ``data``, as for :func:`collect_covariances`, in every pass over
        it: at most that many batches per pass; ``forward(model, batch)`` for
        batches the model does not take as they are (e.g. a tuple of three
        tensors: ``forward=lambda m, b: m(*b)``; with ``min_speedup``, give
        ``example_input`` too, as the layers cannot be timed without knowing
        the model's input); the token mask of padded sequence batches
        (``'auto'``: a batch's ``attention_mask``).

    Returns
    -------
    compressed_model : torch.nn.Module
        ``model`` itself when ``inplace``, otherwise a modified copy (the
        original is untouched); for a bare layer, the factorized layer.
    report : CompressionReport
        Printable table; ``to_dict()`` / ``to_json()``.

    Raises
    ------
    ValueError
        Unknown method or layer name, ``ratio <= 1``, ranks out of range,
        missing statistics, a named layer that cannot be replaced (grouped
        conv, tied weight, ...), a model or statistics on the ``meta``
        device, or no way to choose ranks. The model is left unchanged on
        every error. An error raised while decomposing a layer is re-raised
        with the same type, the layer's name in front, chained to the
        original (``__cause__``).

    Warns
    -----
    sigmadecomp.ConvergenceWarning
        A layer's iterative decomposition stopped at ``n_iter_max`` before
        meeting ``tol`` (its row in the report has ``converged=False``).
    sigmadecomp.CompressionWarning
        Explicit ranks that make a layer larger; a CP run estimated (from the
        shapes, before any work) above :data:`CP_COST_WARN_FLOP` = 1e14
        floating-point operations; a layer whose relative
        Sigma-error exceeds :data:`SIGMA_ERROR_WARN` = 0.2. That threshold
        comes from compressing each layer of the Fashion-MNIST reference
        ResNet alone at rX 1.5-12 (``benchmarks/sigma_error_threshold.py``,
        ``notes/sigma_error_threshold.md``): no layer with an error up to 0.2
        cost more than 0.75 points of test accuracy; between 0.2 and 0.3 some
        did (up to 2 points); above 0.3 most did, up to tens of points.
        Errors of several layers add up, so a model can lose accuracy with
        every layer below the threshold.

    Notes
    -----
    What is left alone, each with its reason in ``report.skipped``: grouped
    convolutions; ``Conv1d``, ``Conv3d``, transposed convolutions and
    ``Bilinear`` layers, ``nn.MultiheadAttention``'s bare q/k/v projection
    (``in_proj_weight``) and 4-D parameters held outside a ``Conv2d`` (a kernel
    applied with ``torch.nn.functional.conv2d``) (listed when ``layers=None``,
    ``'all'`` or a predicate); subclasses of
    ``Conv2d``/``Linear`` that override ``forward``; parametrized weights and
    modules with forward or backward hooks; weights tied to another module's
    parameter; layers a module also keeps in a plain list, tuple or dict
    attribute (not ``nn.ModuleList``/``nn.ModuleDict``), where a replacement
    would not reach; and layers whose parent reads their ``weight``/``bias`` directly
    instead of calling them (``nn.MultiheadAttention.out_proj``, the Linear
    layers of ``nn.TransformerEncoderLayer``; found in the source of the
    enclosing modules' methods and properties, ``getattr(child, 'weight')``
    included; a read in ``forward`` through a local name, e.g. ``for layer in
    self.layers: F.linear(x, layer.weight)``, or by a function of the user's
    module given ``self.child``, keeps the child's layers dense, or every
    layer below the module when the source does not say which child it is).
    A factorized layer keeps the size attributes of the layer it replaces
    (``in_channels``, ``out_features``, ``kernel_size``, ...) but has no
    ``weight``. A module registered under several names is replaced by
    one factorized module under every name (the report lists the other
    names in ``aliases``), and every factor keeps the ``requires_grad`` of
    the weight (the bias of the bias) it replaces. Convolutions called
    functionally (``torch.nn.functional.conv2d`` with a weight parameter) are
    not modules, so they are neither seen nor reported.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import compress
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
    >>> small, report = compress(model, 'tucker2', ratio=3, layers=['0', '2'],
    ...                          options={'n_iter_max': 10, 'tol': 1e-3}, progress=False)
    >>> type(small[2]).__name__, small[2].ranks
    ('Tucker2Conv2d', (15, 15))
    >>> [(r['name'], r['params_before'], r['params_after']) for r in report.layers]
    [('0', 4640, 1474), ('2', 9248, 3017)]
    """
    t_start = time.perf_counter()
    group = _parallel.resolve_group(distributed)  # distributed=True without a group: refused
    # (explicit ranks alone name the layers themselves: no default to find)
    explicit_only = bool(hasattr(ranks, "items") and ranks and ratio is None and budget is None)
    # under a process group every process learns whether the others' argument checks
    # passed, and that they take the same path (the same exchanges follow); _checked
    # (internal): the caller's exchanged checks covered these, so no exchange here
    # min_speedup without example_input times the layers at the first batch of data
    example_from_data = (min_speedup is not None and example_input is None
                         and data is not None and isinstance(model, nn.Module))
    path = {"sequential": sequential is True, "refit given": refit is not None,
            "data given": data is not None, "covariances given": covariances is not None,
            "layers given": layers is not None, "explicit ranks alone": explicit_only,
            "example from data": example_from_data}
    with _parallel.checking(group, path, exchange=not _checked):
        _check_early(model, method, covariances, ratio, ranks, budget, layers, data,
                     sequential, refit, inplace, centered, options, min_speedup,
                     example_input, progress)
        _check_data_options(data, max_batches, forward, mask, min_speedup, example_input)
    if example_from_data:
        from ._batches import batch_inputs, model_device

        first, data = _first_batch(data)
        example_input = None if first is None else batch_inputs(first, model_device(model))
        if group is not None:  # (a process without batches times at another's)
            example_input = _parallel.first_given(group, example_input,
                                                  what="reading an example batch")
    # --- data= / sequential= (sigmadecomp_torch.sequential) ---------------------------
    if not explicit_only:
        default = layers is None
        try:
            layers, data = _default_by_call_order(model, layers, data, example_input, forward)
        except Exception as exc:  # (e.g. the model fails on the first batch)
            if default and group is not None:
                _parallel.first_given(group, None, error=exc)
            raise
        if default and group is not None:  # the same choice on every process, also on one
            layers = _parallel.first_given(group, layers)  # that has no batch to look at
    if (sequential or refit is not None) and _no_data_layers(model, layers, ranks, ratio):
        # no layer can be replaced: planning says why (as one-shot), nothing to refit
        return compress(model, method, covariances={}, ratio=ratio, ranks=ranks,
                        budget=budget, layers=layers, inplace=inplace, centered=centered,
                        options=options, progress=progress, distributed=distributed,
                        _checked=True)
    if refit is not None and not sequential:
        from .sequential import refit_after

        return refit_after(
            model, data, refit, lambda m, stats: compress(
                m, method, covariances=stats, ratio=ratio, ranks=ranks, budget=budget,
                layers=layers, inplace=inplace, centered=centered, options=options,
                progress=progress, distributed=distributed, min_speedup=min_speedup,
                example_input=example_input, _checked=True),  # (checked above)
            centered=centered, inplace=inplace, progress=progress,
            layers=_data_layers(model, layers, ranks, ratio), distributed=distributed,
            max_batches=max_batches, forward=forward, mask=mask)
    if sequential:
        from .sequential import sequential_compress

        return sequential_compress(
            model, method, data, ratio=ratio, ranks=ranks, budget=budget, layers=layers,
            inplace=inplace, centered=centered, options=options, progress=progress,
            distributed=distributed, min_speedup=min_speedup, example_input=example_input,
            refit=refit, max_batches=max_batches, forward=forward, mask=mask)
    if data is not None and isinstance(model, nn.Module):
        from .covariance import collect_covariances

        wanted = _data_layers(model, layers, ranks, ratio)
        # (no layer that can be replaced: no statistics to collect; planning says why)
        # (its argument checks are among those exchanged above: _check_early)
        if isinstance(layers, CallOrder) and wanted:
            # default layers: one that never runs on data has no statistics and is skipped
            # (planning says why), as one the first pass never called is (_data_layers)
            chosen_set = set(wanted)
            wanted = lambda name, module: name in chosen_set  # noqa: E731
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"layer .* never ran in the forward "
                                    r"pass; it has no statistics")
            covariances = {} if wanted == [] else collect_covariances(
                model, data, progress=progress, layers=wanted, distributed=distributed,
                max_batches=max_batches, forward=forward, mask=mask, _checked=True)
    # --- end data= / sequential= -------------------------------------------------------
    # steps 1-3 on every process; under a process group each learns whether the others
    # planned too, so none waits in the decomposition's exchange for one that failed here
    try:
        options, min_speedup, skipped, plans, shapes = _plan_steps(
            model, method, covariances, ratio, ranks, budget, layers, centered, options,
            min_speedup, example_input)
    except Exception as exc:
        _parallel.agree(group, "planning the compression", None, error=exc)
        raise
    _parallel.agree(group, "planning the compression", None)
    for row in skipped:  # a default layer that never ran: on data=, or in the choosing pass
        if (isinstance(layers, CallOrder) and row["reason"] == _NO_STATISTICS
                and (data is not None or row["name"] not in layers.order)):
            row["reason"] = ("never ran in the forward pass on data (or on example_input, "
                             "which chose the default layers), so it has no statistics")

    # 4. decompose and build (the model is untouched until every layer succeeded)
    rows, new_modules = _decompose_all(plans, options, distributed, progress, shapes,
                                       min_speedup)
    rows = _keep_fast_enough(rows, new_modules, skipped)
    for row in rows:
        warn_layer(row)

    # 5. report, and the new modules in place
    params_before = n_params(model)
    target = _install(model, new_modules, inplace)
    report = CompressionReport(
        method=method, weighted=covariances is not None, centered=bool(centered),
        layers=rows, skipped=skipped, params_before=params_before,
        params_after=n_params(target), seconds=time.perf_counter() - t_start,
    )
    return target, report
