"""Model surgery: replace Conv2d/Linear layers by factorized ones, with a report.

:func:`compress` decomposes each chosen layer's weight with the core
(:func:`sigmadecomp.sigma_svd`, :func:`sigmadecomp.tucker2`,
:func:`sigmadecomp.cp`) -- in the Sigma-norm when statistics from
:func:`sigmadecomp_torch.collect_covariances` are given, in the Frobenius norm
otherwise -- and swaps in the factorized layers of
:mod:`sigmadecomp_torch.layers`. Decompositions run on the model's device
through torch tensors, in float64; the factors are cast back to the layer's
dtype.

Methods are looked up in a small table (:data:`LAYER_METHODS`): each entry
says how to decompose a weight and how to build the module from the result.
A new format is added with :func:`register_layer_method`.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch
from torch import nn

from sigmadecomp import ranks as _ranks
from sigmadecomp.sigma import relative_sigma_error
from sigmadecomp.svd import sigma_svd

from .covariance import LayerStats, select_layers
from .layers import CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d

__all__ = [
    "compress",
    "CompressionReport",
    "LayerMethod",
    "LAYER_METHODS",
    "register_layer_method",
    "layer_method_for",
]


# ----------------------------------------------------------------- dispatch


@dataclass(frozen=True)
class LayerMethod:
    """How one factorized format is computed and turned into a module.

    Attributes
    ----------
    rank_method : str
        Name of the format in :data:`sigmadecomp.ranks.METHODS` (parameter
        counts, ratio -> ranks, EVBMF, budget allocation).
    decompose : callable ``(weight, ranks, sigma, options) -> result``
        ``weight`` is the float64 torch weight in torch layout on the model's
        device, ``sigma`` a float64 ``(n, n)`` tensor or None, ``options`` a
        dict of keyword arguments for the core function. The result must have
        ``to_tensor()`` (the weight's shape or ``(T, n)``) and may have
        ``n_iter``.
    build : callable ``(module, result, bias_shift) -> nn.Module``
    """

    rank_method: str
    decompose: Callable
    build: Callable


def _svd_decompose(weight, ranks, sigma, options):
    return sigma_svd(weight.reshape(weight.shape[0], -1), ranks, sigma, **options)


def _svd_build(module, result, bias_shift):
    if isinstance(module, nn.Linear):
        return LowRankLinear.from_result(module, result, bias_shift=bias_shift)
    return LowRankConv2d.from_result(module, result, bias_shift=bias_shift)


def _tucker2_decompose(weight, ranks, sigma, options):
    from sigmadecomp.tucker2 import tucker2

    return tucker2(weight, tuple(ranks), sigma, **options)


def _cp_decompose(weight, ranks, sigma, options):
    from sigmadecomp.cp import cp

    return cp(weight, ranks, sigma, **options)


def _tt_decompose(weight, ranks, sigma, options):
    from .tt_layers import tt_decompose

    return tt_decompose(weight, ranks, sigma, options)


def _tt_build(module, result, bias_shift):
    from .tt_layers import tt_build

    return tt_build(module, result, bias_shift)


#: The factorized formats :func:`compress` knows, by ``method`` name.
LAYER_METHODS: Dict[str, LayerMethod] = {
    "svd": LayerMethod("svd", _svd_decompose, _svd_build),
    "tucker2": LayerMethod(
        "tucker2", _tucker2_decompose,
        lambda m, r, b: Tucker2Conv2d.from_result(m, r, bias_shift=b)),
    "cp": LayerMethod(
        "cp", _cp_decompose, lambda m, r, b: CPConv2d.from_result(m, r, bias_shift=b)),
    "tt": LayerMethod("tt", _tt_decompose, _tt_build),
}


def register_layer_method(name, spec):
    """Add (or replace) a format in :data:`LAYER_METHODS` (e.g. ``'tt'``).

    The rank bookkeeping must be known to :mod:`sigmadecomp.ranks` under
    ``spec.rank_method`` (see :func:`sigmadecomp.ranks.register_method`).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is not allowed; name must be a non-empty string")
    if not isinstance(spec, LayerMethod):
        raise TypeError(f"spec of type {type(spec).__name__} is not allowed; spec must be "
                        "a LayerMethod")
    LAYER_METHODS[name] = spec


def layer_method_for(module, method):
    """The format used for ``module`` under ``method``.

    Linear layers and 1x1 convs use ``'svd'`` (the Sigma-SVD is their exact
    optimum) except under ``'tt'``, which tensorizes them too (TT-FC); other
    convs use ``method``.
    """
    if method == "tt":
        return "tt"
    if isinstance(module, nn.Linear):
        return "svd"
    if tuple(module.kernel_size) == (1, 1):
        return "svd"
    return method


# ------------------------------------------------------------------- report


def _kind(module):
    if isinstance(module, nn.Linear):
        return "Linear"
    kh, kw = module.kernel_size
    g = f" g{module.groups}" if module.groups != 1 else ""
    return f"Conv2d {kh}x{kw}{g}"


def _n_params(module):
    return int(sum(p.numel() for p in module.parameters()))


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


@dataclass(repr=False)
class CompressionReport:
    """What :func:`compress` did, per layer and in total.

    Attributes
    ----------
    method : str
    weighted : bool
        Whether Sigma statistics were used.
    centered : bool
        Whether the centered covariance and the bias correction were used.
    layers : list of dict
        One row per compressed layer: ``name``, ``kind``, ``method`` (the
        format used), ``ranks``, ``params_before``, ``params_after`` (of the
        module, bias included), ``sigma_error`` (relative expected squared
        output change ``sqrt(tr(D M D^T) / tr(K Sigma K^T))`` with ``M`` the
        Sigma, or the centered covariance with bias correction; None without
        statistics), ``frobenius_error`` (``||K - K~|| / ||K||``), ``n_iter``
        and ``seconds``.
    skipped : list of dict
        ``name``, ``kind`` and ``reason`` of each candidate left as it was.
    params_before, params_after : int
        Parameters of the whole model before and after.
    seconds : float
    """

    method: str
    weighted: bool
    centered: bool
    layers: List[dict] = field(default_factory=list)
    skipped: List[dict] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0

    @property
    def ratio(self):
        """Overall rX of the model: ``params_before / params_after``."""
        return self.params_before / max(self.params_after, 1)

    @property
    def layer_params_before(self):
        return int(sum(r["params_before"] for r in self.layers))

    @property
    def layer_params_after(self):
        return int(sum(r["params_after"] for r in self.layers))

    @property
    def layer_ratio(self):
        """rX over the compressed layers only."""
        return self.layer_params_before / max(self.layer_params_after, 1)

    def to_dict(self):
        """A JSON-serialisable dict (rows, skipped layers and totals)."""
        rows = []
        for r in self.layers:
            r = dict(r)
            if isinstance(r["ranks"], tuple):
                r["ranks"] = list(r["ranks"])
            rows.append(r)
        return {
            "method": self.method,
            "weighted": self.weighted,
            "centered": self.centered,
            "layers": rows,
            "skipped": [dict(s) for s in self.skipped],
            "totals": {
                "params_before": self.params_before,
                "params_after": self.params_after,
                "ratio": self.ratio,
                "layer_params_before": self.layer_params_before,
                "layer_params_after": self.layer_params_after,
                "layer_ratio": self.layer_ratio,
                "seconds": self.seconds,
            },
        }

    def to_json(self, path=None, *, indent=2):
        """The :meth:`to_dict` content as JSON text; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def table(self):
        """The report as a plain-text table."""
        head = ["layer", "kind", "method", "ranks", "params", "->", "rX",
                "sigma_err", "frob_err", "iters", "sec"]
        rows = []
        for r in self.layers:
            ranks = r["ranks"]
            if isinstance(ranks, (tuple, list)):
                ranks = "x".join(str(v) for v in ranks)
            rows.append([r["name"], r["kind"], r["method"], str(ranks), str(r["params_before"]),
                         str(r["params_after"]),
                         f"{r['params_before'] / max(r['params_after'], 1):.2f}",
                         _fmt(r["sigma_error"], ".4f"), _fmt(r["frobenius_error"], ".4f"),
                         _fmt(r["n_iter"], "d"), f"{r['seconds']:.2f}"])
        rows.append([f"total ({len(self.layers)} layers)", "", "", "",
                     str(self.layer_params_before), str(self.layer_params_after),
                     f"{self.layer_ratio:.2f}", "", "", "", f"{self.seconds:.2f}"])
        width = [max(len(head[i]), *(len(row[i]) for row in rows)) for i in range(len(head))]
        left = {0, 1, 2, 3}

        def line(cells):
            return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, width))).rstrip()

        norm = "Sigma" if self.weighted else "Frobenius"
        if self.centered:
            norm += ", centered + bias correction"
        out = [f"compress(method={self.method!r}, {norm})", line(head),
               line(["-" * w for w in width])]
        out += [line(r) for r in rows[:-1]]
        out += [line(["-" * w for w in width]), line(rows[-1])]
        out.append(f"model: {self.params_before} -> {self.params_after} parameters, "
                   f"rX = {self.ratio:.2f}")
        for s in self.skipped:
            out.append(f"skipped {s['name']} ({s['kind']}): {s['reason']}")
        return "\n".join(out)

    def __str__(self):
        return self.table()

    def __repr__(self):
        return (f"CompressionReport(method={self.method!r}, layers={len(self.layers)}, "
                f"skipped={len(self.skipped)}, params {self.params_before} -> "
                f"{self.params_after}, rX={self.ratio:.3g})")


# ----------------------------------------------------------------- compress


def _progress(iterable, *, total, enabled, desc):
    if not enabled or not sys.stderr.isatty():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio):
        raise TypeError(f"ratio={ratio!r} is not allowed; ratio must be a finite number > 1")
    if ratio <= 1:
        raise ValueError(f"ratio={ratio!r} is not allowed; ratio (the per-layer compression "
                         "factor rX = params(original) / params(factorized)) must be > 1")
    return float(ratio)


def _sigma_for(name, module, stats, centered):
    if not isinstance(stats, LayerStats):
        raise TypeError(f"covariances[{name!r}] is a {type(stats).__name__}; it must be a "
                        "LayerStats from collect_covariances")
    w = module.weight
    n = int(w[0].numel())
    if stats.groups != 1 or stats.n != n:
        raise ValueError(
            f"covariances[{name!r}] has sigma of shape {tuple(stats.sigma.shape)}; layer "
            f"{name!r} with weight {tuple(w.shape)} needs ({n}, {n})"
        )
    S = stats.centered() if centered else stats.sigma
    return S.to(device=w.device, dtype=torch.float64), stats.mean.to(w.device, torch.float64)


def compress(model, method, *, covariances=None, ratio=None, ranks=None, budget=None,
             layers=None, inplace=False, centered=False, options=None, progress=True):
    """Replace Conv2d/Linear layers of a model by factorized layers.

    Parameters
    ----------
    model : torch.nn.Module
    method : {'tucker2', 'cp', 'svd', 'tt'}
        Format of the k x k convolutions. Linear layers and 1x1 convs use the
        (Sigma-)SVD under the other methods; ``'svd'`` on a k x k conv factors
        ``K_(1)`` into a k x k conv to ``r`` channels and a 1x1 conv. ``'tt'``
        (Tensor-Train, Garipov et al. 2016) applies to convs and Linear layers
        alike, with automatic channel modes; its ranks are one int (uniform)
        or the tuple of TT ranks.
    covariances : dict of str to LayerStats, optional
        Statistics from :func:`collect_covariances`: the Sigma algorithms are
        used. ``None``: the classical Frobenius algorithms.
    ratio : float, optional
        Per-layer parameter compression ratio rX (> 1); each layer's ranks
        are the largest whose weight count is at most ``params / ratio``
        (:func:`sigmadecomp.ranks.ratio_to_ranks`).
    ranks : dict or 'evbmf', optional
        Explicit ranks by layer name (``int`` for svd/cp, ``(r_T, r_S)`` for
        Tucker-2; with ``layers=None`` and no ``ratio`` only these layers are
        compressed; with ``ratio`` the dict overrides it), or ``'evbmf'`` for
        EVBMF ranks (Sigma-aware when statistics are given).
    budget : int or float, optional
        Total weight parameters of the chosen layers after compression (an
        int), or that fraction of their original total (a float in (0, 1));
        distributed over the layers by :func:`sigmadecomp.ranks.allocate_ranks`.
    layers : None, str, list of str, or callable, optional
        Which modules may be compressed (names, or ``f(name, module) -> bool``);
        default every ``Conv2d`` and ``Linear``. Named layers that cannot be
        compressed raise; other candidates are skipped with a reason.
    inplace : bool, optional
        Modify ``model`` itself (default: work on a deep copy).
    centered : bool, optional
        Decompose in the centered covariance ``sigma - mu mu^T`` and correct the
        bias by ``(K_(1) - K~_(1)) mu`` (needs ``covariances``). The expected
        squared output error is then ``tr(D C D^T) <= tr(D Sigma D^T)``.
    options : dict, optional
        Keyword arguments for the core decomposition of the k x k convs
        (e.g. ``n_iter_max``, ``tol``, ``rng`` of :func:`sigmadecomp.tucker2`).
    progress : bool, optional
        A tqdm bar over layers (only when stderr is a terminal).

    Returns
    -------
    compressed_model : torch.nn.Module
        ``model`` itself when ``inplace``, otherwise a modified copy (the
        original is untouched).
    report : CompressionReport
        Printable table; ``to_dict()`` / ``to_json()``.

    Raises
    ------
    ValueError
        Unknown method or layer name, ``ratio <= 1``, ranks out of range,
        missing statistics, grouped convs named explicitly, or no way to
        choose ranks. The model is left unchanged on every error.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import compress
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
    >>> small, report = compress(model, 'tucker2', ratio=3, options={'n_iter_max': 10},
    ...                          progress=False)
    >>> type(small[2]).__name__, small[2].ranks
    ('Tucker2Conv2d', (15, 15))
    >>> [(r['name'], r['params_before'], r['params_after']) for r in report.layers]
    [('0', 4640, 1474), ('2', 9248, 3017)]
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model of type {type(model).__name__} is not allowed; model must be "
                        "a torch.nn.Module")
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
    if ratio is None and ranks is None and budget is None:
        raise ValueError("no way to choose ranks: give ratio=, ranks= (a dict or 'evbmf') "
                         "or budget=")
    if centered and covariances is None:
        raise ValueError("centered=True needs covariances (the mean of each layer's input)")
    if covariances is not None and not hasattr(covariances, "items"):
        raise TypeError(f"covariances of type {type(covariances).__name__} is not allowed; "
                        "it must be a dict of layer name -> LayerStats")
    options = dict(options or {})

    explicit = ranks if hasattr(ranks, "items") else {}
    if layers is None and explicit and ratio is None:
        layers = list(explicit)
    named = layers is not None and not callable(layers)
    chosen = select_layers(model, layers)
    chosen_names = {n for n, _ in chosen}
    for k in explicit:
        if k not in chosen_names:
            raise ValueError(f"ranks contains {k!r}, which is not among the layers to "
                             f"compress; the chosen layers are {sorted(chosen_names)}")

    # -- plan: which layers, with which format, sigma and ranks (no work yet)
    plan, skipped = [], []
    for name, module in chosen:
        kind = _kind(module)
        reason = None
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            reason = (f"grouped convolution (groups={module.groups}) is not supported by "
                      "the factorized layers")
        elif covariances is not None and name not in covariances:
            reason = "no statistics for this layer in covariances"
        if reason is not None:
            if named:
                raise ValueError(f"layer {name!r} cannot be compressed: {reason}")
            skipped.append({"name": name, "kind": kind, "reason": reason})
            continue
        fmt = layer_method_for(module, method)
        if fmt not in LAYER_METHODS:
            raise ValueError(f"method {fmt!r} for layer {name!r} is not registered")
        sig = mean = None
        if covariances is not None:
            sig, mean = _sigma_for(name, module, covariances[name], centered)
        plan.append({"name": name, "module": module, "kind": kind, "format": fmt,
                     "sigma": sig, "mean": mean})
    if not plan:
        raise ValueError("no layer can be compressed: "
                         + ("; ".join(f"{s['name']}: {s['reason']}" for s in skipped)
                            or f"layers={layers!r} selects no Conv2d/Linear module"))

    # ranks
    if budget is not None:
        specs = {p["name"]: _ranks.LayerSpec(p["module"].weight.detach().to(torch.float64),
                                             p["sigma"]) for p in plan}
        alloc = _ranks.allocate_ranks(
            specs, budget, method={p["name"]: LAYER_METHODS[p["format"]].rank_method
                                   for p in plan})
    auto_plan = []
    for p in plan:
        name, module = p["name"], p["module"]
        shape = tuple(module.weight.shape)
        rmeth = LAYER_METHODS[p["format"]].rank_method
        dense = _ranks.layer_params(shape, "dense", None)
        auto = False
        if name in explicit:
            r = explicit[name]
        elif budget is not None:
            r, auto = alloc[name], True
        elif ranks == "evbmf":
            r = _ranks.evbmf_ranks(module.weight.detach().to(torch.float64), rmeth, p["sigma"])
            auto = True
        else:
            r, auto = _ranks.ratio_to_ranks(shape, rmeth, ratio), True
        try:
            p["params"] = _ranks.layer_params(shape, rmeth, r)
        except (TypeError, ValueError) as e:
            raise type(e)(f"ranks for layer {name!r} (weight {shape}): {e}") from None
        p["ranks"] = tuple(int(v) for v in r) if isinstance(r, (tuple, list)) else int(r)
        if auto and p["params"] >= dense and budget is None:
            skipped.append({"name": name, "kind": p["kind"],
                            "reason": f"ranks {p['ranks']} would not reduce its {dense} "
                                      "weight parameters"})
            continue
        auto_plan.append(p)
    plan = auto_plan

    # -- decompose (the model is untouched until every layer succeeded)
    rows, new_modules = [], {}
    it = _progress(plan, total=len(plan), enabled=progress and len(plan) > 1, desc="compress")
    for p in it:
        name, module, fmt = p["name"], p["module"], p["format"]
        spec = LAYER_METHODS[fmt]
        t0 = time.perf_counter()
        W = module.weight.detach().to(torch.float64)
        opts = options if fmt != "svd" else {}
        result = spec.decompose(W, p["ranks"], p["sigma"], opts)
        approx = result.to_tensor()
        if not isinstance(approx, torch.Tensor):
            approx = torch.as_tensor(approx)
        approx = approx.to(W).reshape(W.shape)
        D = (W - approx).reshape(W.shape[0], -1)
        bias_shift = D @ p["mean"] if centered else None
        new = spec.build(module, result, bias_shift)
        new.train(module.training)
        seconds = time.perf_counter() - t0
        frob = relative_sigma_error(W, approx)
        sig_err = None
        if p["sigma"] is not None:
            K = W.reshape(W.shape[0], -1)
            full = covariances[name].sigma.to(W.device, torch.float64)
            num = float(torch.sum((D @ p["sigma"]) * D).clamp_min(0))
            den = float(torch.sum((K @ full) * K))
            sig_err = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
        n_iter = getattr(result, "n_iter", None)
        rows.append({
            "name": name, "kind": p["kind"], "method": fmt, "ranks": p["ranks"],
            "params_before": _n_params(module), "params_after": _n_params(new),
            "sigma_error": sig_err, "frobenius_error": float(frob),
            "n_iter": None if n_iter is None else int(n_iter), "seconds": seconds,
        })
        new_modules[name] = new

    params_before = _n_params(model)
    target = model if inplace else copy.deepcopy(model)
    for name, new in new_modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        setattr(parent, child, new)
    report = CompressionReport(
        method=method, weighted=covariances is not None, centered=bool(centered),
        layers=rows, skipped=skipped, params_before=params_before,
        params_after=_n_params(target), seconds=time.perf_counter() - t_start,
    )
    return target, report
