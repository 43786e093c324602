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
import functools
import inspect
import json
import math
import numbers
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch
from torch import nn

from sigmadecomp import ranks as _ranks
from sigmadecomp.exceptions import CompressionWarning, ConvergenceWarning
from sigmadecomp.sigma import relative_sigma_error
from sigmadecomp.svd import sigma_svd

from . import latency as _latency
from . import parallel as _parallel
from .covariance import LayerStats, select_layers
from .layers import CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d

__all__ = [
    "compress",
    "default_layers",
    "SIGMA_ERROR_WARN",
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
        statistics), ``frobenius_error`` (``||K - K~|| / ||K||``), ``n_iter``,
        ``converged`` (False when an iterative method stopped at
        ``n_iter_max``; None for the closed-form SVD), ``seconds`` and
        ``aliases`` (the module's other names when it is registered under
        several; the one factorized module stands under all of them); with
        ``min_speedup`` also ``latency_dense_ms`` and ``latency_factorized_ms``
        (median milliseconds at the layer's input size) for the timed layers.
    skipped : list of dict
        ``name``, ``kind`` and ``reason`` of each candidate left as it was
        (with both latencies for a layer kept dense by ``min_speedup``).
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
                "sigma_err", "frob_err", "iters", "conv", "sec"]
        rows = []
        for r in self.layers:
            ranks = r["ranks"]
            if isinstance(ranks, (tuple, list)):
                ranks = "x".join(str(v) for v in ranks)
            conv = r.get("converged")
            label = r["name"] if r["name"] else "(model)"
            if r.get("aliases"):
                label += " = " + " = ".join(r["aliases"])
            rows.append([label, r["kind"], r["method"], str(ranks), str(r["params_before"]),
                         str(r["params_after"]),
                         f"{r['params_before'] / max(r['params_after'], 1):.2f}",
                         _fmt(r["sigma_error"], ".4f"), _fmt(r["frobenius_error"], ".4f"),
                         _fmt(r["n_iter"], "d"), "-" if conv is None else ("yes" if conv else "NO"),
                         f"{r['seconds']:.2f}"])
        rows.append([f"total ({len(self.layers)} layers)", "", "", "",
                     str(self.layer_params_before), str(self.layer_params_after),
                     f"{self.layer_ratio:.2f}", "", "", "", "", f"{self.seconds:.2f}"])
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
        for r in self.layers:
            if r.get("latency_dense_ms") is not None:
                out.append(f"latency {r['name']}: {r['latency_dense_ms']:.3f} ms dense -> "
                           f"{r['latency_factorized_ms']:.3f} ms factorized")
        for s in self.skipped:
            out.append(f"skipped {s['name']} ({s['kind']}): {s['reason']}")
        return "\n".join(out)

    def __str__(self):
        return self.table()

    def __repr__(self):
        return (f"CompressionReport(method={self.method!r}, layers={len(self.layers)}, "
                f"skipped={len(self.skipped)}, params {self.params_before} -> "
                f"{self.params_after}, rX={self.ratio:.3g})")


# ------------------------------------------------------------ layer choice


#: A layer whose relative Sigma-error (the relative change of its output on
#: the calibration data) exceeds this gets a :class:`CompressionWarning`.
#: Chosen from single-layer measurements on the reference network (see
#: ``benchmarks/sigma_error_threshold.py`` and the docstring of :func:`compress`).
SIGMA_ERROR_WARN = 0.2

#: Estimated floating-point operations of one CP layer above which
#: :func:`compress` warns before starting: 1e14 is over half an hour at
#: 50 GFLOP/s. Ranks from ``ratio=`` stay below it on ResNet-50's largest
#: 3x3 conv (512 x 512 x 3 x 3 at rX 3: about 3e13); a rank far beyond the
#: layer's size (R = 20000 on a 64 x 64 x 3 x 3 conv: about 2e15) does not.
CP_COST_WARN_FLOP = 1e14

#: Throughput assumed to turn the estimate into a time in the warning.
_ASSUMED_FLOPS = 50e9

_SUPPORTED = (nn.Conv2d, nn.Linear)


def _call_order(model, example_input):
    """Names of the Conv2d/Linear modules in the order a forward pass first calls them."""
    order, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, _SUPPORTED):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, _n=name: order.append(_n) if _n not in order else None))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            elif isinstance(example_input, dict):
                model(**example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order


def default_layers(model, *, include_first=False, include_last=False, example_input=None):
    """The layers :func:`compress` factorizes when ``layers=None``.

    Every ``nn.Conv2d`` and ``nn.Linear`` of the model except the first one
    in module order (the layer reading the model's input, e.g. the stem conv:
    few input channels, little to gain and the most sensitive) and the last
    one (the output layer, e.g. the classifier: cutting it to a low rank
    removes directions the decision needs). This is the choice of Kalle et al.
    (2025), who leave the first layer and the classifier alone. "First" and
    "last" follow the order in which the modules were registered
    (``model.named_modules()``), which is the order of execution in
    sequential models; give ``example_input`` (or name the layers in
    ``layers=``) where it is not.

    A bare ``nn.Conv2d`` or ``nn.Linear`` given as the model is its own only
    layer: ``['']``.

    Parameters
    ----------
    model : torch.nn.Module
    include_first, include_last : bool, optional
        Keep the first (resp. last) layer in the list.
    example_input : tensor, tuple or dict, optional
        One input batch (``model(x)``, ``model(*x)`` or ``model(**x)``): the
        first and last layer are then the first and last one the forward
        pass calls (run in eval mode without gradients; the model's mode is
        restored). Layers the pass never calls stay in the list.

    Returns
    -------
    list of str
        Dotted names in model order. Layers that cannot be factorized
        (grouped convs, ...) are included; :func:`compress` skips them with
        a reason.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import default_layers
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3),
    ...                       nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(32, 10))
    >>> default_layers(model)
    ['2', '3']
    >>> default_layers(model, include_first=True)
    ['0', '2', '3']
    >>> default_layers(model, example_input=torch.randn(1, 3, 5, 5))
    ['2', '3']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model of type {type(model).__name__} is not allowed; model must be "
                        "a torch.nn.Module")
    if isinstance(model, _SUPPORTED):
        return [""]
    names = [n for n, m in model.named_modules() if isinstance(m, _SUPPORTED)]
    if not names:
        return []
    called = _call_order(model, example_input) if example_input is not None else names
    if not called:
        return names
    first, last = called[0], called[-1]
    return [n for n in names if (include_first or n != first) and (include_last or n != last)]


def _default_exclusions(model):
    """Skipped rows for the layers :func:`default_layers` leaves out."""
    if isinstance(model, _SUPPORTED):
        return []
    names = [(n, m) for n, m in model.named_modules() if isinstance(m, _SUPPORTED)]
    if not names:
        return []
    out = [{"name": names[0][0], "kind": _kind(names[0][1]),
            "reason": "first layer (reads the model's input): left alone by default; "
                      "name it in layers= to compress it"}]
    if len(names) > 1:
        out.append({"name": names[-1][0], "kind": _kind(names[-1][1]),
                    "reason": "last layer (the model's output, e.g. the classifier): left "
                              "alone by default; name it in layers= to compress it"})
    return out


def _unsupported_modules(model):
    """Skipped rows for conv-like modules no factorized layer stands in for."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            reason = "transposed convolutions are not factorized (only Conv2d and Linear)"
        elif isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.Conv2d):
            reason = (f"{type(m).__name__} layers are not factorized (only Conv2d and Linear); "
                      "a Conv1d/Conv3d can be rewritten as a Conv2d/Linear by the user")
        elif isinstance(m, nn.Bilinear):
            reason = "Bilinear layers are not factorized (only Conv2d and Linear)"
        else:
            continue
        out.append({"name": name, "kind": type(m).__name__, "reason": reason})
    return out


# -------------------------------------------------------- surgery obstacles


_READ = re.compile(r"(?:\.\s*([A-Za-z_]\w*)|\[\s*(-?\d+)\s*\])\s*\.\s*(?:weight|bias)\b")
_SETUP_METHODS = frozenset({"__init__", "reset_parameters", "_reset_parameters",
                            "init_weights", "_init_weights", "extra_repr", "__repr__",
                            "__setstate__"})


@functools.lru_cache(maxsize=None)
def _children_read_by(cls):
    """``{child name: 'Class.method'}`` of children whose weight/bias ``cls`` reads.

    Found in the source of the class's methods (``self.out_proj.weight``,
    ``layer.linear1.bias``, ``self.head[0].weight``), set-up methods excluded.
    """
    found = {}
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object or not issubclass(klass, nn.Module):
            continue
        for attr, fn in vars(klass).items():
            if attr in _SETUP_METHODS:
                continue
            fn = getattr(fn, "__func__", fn)
            if not inspect.isfunction(fn):
                continue
            try:
                src = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            for m in _READ.finditer(src):
                found.setdefault(m.group(1) or m.group(2), f"{klass.__name__}.{attr}")
    return found


def _read_by_ancestor(model, path):
    """``(ancestor path, where)`` of a module that reads the parameters at ``path``."""
    if not path:
        return None
    parts = path.split(".")
    leaf = parts[-1]
    for k in range(len(parts) - 1, -1, -1):
        anc_path = ".".join(parts[:k])
        anc = model.get_submodule(anc_path)
        reads = _children_read_by(type(anc))
        keys = {leaf}
        if leaf.lstrip("-").isdigit() and k == len(parts) - 1 and hasattr(anc, "__len__"):
            keys.add(str(int(leaf) - len(anc)))
        for key in keys:
            if key in reads:
                return anc_path, reads[key]
    return None


def _forward_overridden(module):
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    cls = type(module)
    if cls.forward is not base.forward:
        return True
    return base is nn.Conv2d and cls._conv_forward is not nn.Conv2d._conv_forward


def _obstacle(model, module, paths, owners):
    """Why ``module`` cannot be replaced by a factorized one (or None)."""
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "uninitialized lazy module: run one batch through the model first"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return (f"grouped convolution (groups={module.groups}) is not supported by "
                "the factorized layers")
    if type(module) not in _SUPPORTED and _forward_overridden(module):
        return (f"{type(module).__name__} overrides forward(); a factorized layer would not "
                "reproduce what it computes")
    if torch.nn.utils.parametrize.is_parametrized(module):
        return ("its weight is parametrized (torch.nn.utils.parametrize); remove the "
                "parametrization first")
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks, which a replacement would silently drop"
    for pname in ("weight", "bias"):
        p = getattr(module, pname, None)
        if p is None:
            continue
        others = [o for o in owners.get(id(p), []) if o[1] is not module]
        if others:
            where = ", ".join(f"{o[0]!r}.{o[2]}" if o[0] else o[2] for o in others[:3])
            return (f"its {pname} is tied to {where}; compressing it would untie the "
                    "shared parameter")
    for path in paths:
        found = _read_by_ancestor(model, path)
        if found is not None:
            anc_path, where = found
            anc = model.get_submodule(anc_path)
            at = f" ({anc_path!r})" if anc_path else ""
            return (f"its parent {type(anc).__name__}{at} reads its weight/bias directly "
                    f"(in {where}), which a factorized module does not have")
    return None


def _param_owners(model):
    """``{id(parameter): [(module path, module, attribute), ...]}`` over all registrations."""
    owners = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                lst = owners.setdefault(id(p), [])
                if not any(o[1] is mod and o[2] == attr for o in lst):
                    lst.append((path, mod, attr))
    return owners


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


def _check_not_meta(model, covariances):
    for kind, items in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for n, t in items:
            if t.is_meta:
                raise ValueError(
                    f"model has {kind} {n!r} on the meta device (shapes without data); "
                    "compress needs the real weights: materialise the model first, e.g. "
                    "model.to_empty(device='cpu') then model.load_state_dict(...)")
    for k, st in (covariances or {}).items():
        if isinstance(st, LayerStats) and (st.sigma.is_meta or st.mean.is_meta):
            raise ValueError(f"covariances[{k!r}] is on the meta device (shapes without data); "
                             "collect or load the statistics on a real device")


def _sigma_for(name, module, stats, centered, cache):
    """``(sigma, mean, full sigma)`` in float64 on the weight's device, once per statistic.

    Layers reading one shared :class:`LayerStats` object (e.g. attention
    q/k/v) get the very same tensors.
    """
    if not isinstance(stats, LayerStats):
        raise TypeError(f"covariances[{name!r}] is a {type(stats).__name__}; it must be a "
                        "LayerStats from collect_covariances")
    w = module.weight
    # the statistics must describe this layer's input: kind, input size, geometry
    stats.check_compatible(module, name)
    key = (id(stats), w.device)
    if key not in cache:
        full = stats.sigma.to(device=w.device, dtype=torch.float64)
        S = stats.centered().to(device=w.device, dtype=torch.float64) if centered else full
        # the stats object is kept in the entry so its id cannot be reused during this call
        cache[key] = (S, stats.mean.to(w.device, torch.float64), full, stats)
    S, mean, full, _ = cache[key]
    return S, mean, full


def _cp_flop(shape, rank, options, weighted):
    """Rough floating-point operations of :func:`sigmadecomp.cp` on a ``shape`` kernel."""
    T = shape[0]
    n = int(math.prod(shape[1:]))
    R = float(rank)
    sweeps = int(options.get("n_iter_max", 100))
    per_frob = 6 * T * n * R + 2 * R ** 3 + 4 * (T + n) * R ** 2
    per_sigma = 16 * n * n * R + 4 * n * R ** 2 + 2 * R ** 3 + 4 * T * n * R
    if not weighted:
        return sweeps * per_frob
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


def _warn_layer(row):
    """The warnings of one report row (after every layer is done, on every process)."""
    name, ranks, sig_err = row["name"], row["ranks"], row["sigma_error"]
    if row["converged"] is False:
        warnings.warn(
            f"layer {name!r}: the {row['method']} decomposition stopped after {row['n_iter']} "
            "iterations without meeting its tolerance (raise options['n_iter_max'] or "
            "options['tol'])", ConvergenceWarning, stacklevel=3)
    if sig_err is not None and sig_err > SIGMA_ERROR_WARN:
        warnings.warn(
            f"layer {name!r}: relative Sigma-error {sig_err:.3f} > {SIGMA_ERROR_WARN} "
            f"at ranks {ranks}; its output changes enough to cost accuracy (use "
            "higher ranks for it, or leave it out of layers=)", CompressionWarning,
            stacklevel=3)


def _carry_requires_grad(old, new):
    """Factors train (or stay frozen) like the weight they replace; the bias like the bias."""
    w_flag = old.weight.requires_grad
    b_flag = old.bias.requires_grad if getattr(old, "bias", None) is not None else w_flag
    for pname, p in new.named_parameters():
        p.requires_grad_(b_flag if pname.rsplit(".", 1)[-1] == "bias" else w_flag)


def compress(model, method, *, covariances=None, ratio=None, ranks=None, budget=None,
             layers=None, inplace=False, centered=False, options=None, progress=True,
             distributed=None, min_speedup=None, example_input=None, data=None,
             sequential=False):
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
        are the largest whose weight count is at most ``params / ratio``
        (:func:`sigmadecomp.ranks.ratio_to_ranks`).
    ranks : dict or 'evbmf', optional
        Explicit ranks by layer name (``int`` for svd/cp, ``(r_T, r_S)`` for
        Tucker-2; with ``layers=None`` and no ``ratio`` only these layers are
        compressed; with ``ratio`` the dict overrides it), or ``'evbmf'`` for
        EVBMF ranks (Sigma-aware when statistics are given). Explicit ranks
        that make a layer larger than the original warn
        (:class:`sigmadecomp.CompressionWarning`), as does a CP rank whose
        run is estimated to take minutes (before any work is done).
    budget : int or float, optional
        Total weight parameters of the chosen layers after compression (an
        int), or that fraction of their original total (a float in (0, 1));
        distributed over the layers by :func:`sigmadecomp.ranks.allocate_ranks`.
    layers : None, str, list of str, or callable, optional
        Which modules may be compressed (names, or ``f(name, module) -> bool``
        over the ``Conv2d``/``Linear`` modules). Default
        :func:`default_layers`: every ``Conv2d`` and ``Linear`` except the
        first layer (reading the model's input) and the last (the output
        layer, e.g. the classifier), which are listed in ``report.skipped``;
        layers named in ``ranks`` are added. Named layers that cannot be
        compressed raise; other candidates are skipped with a reason.
    inplace : bool, optional
        Modify ``model`` itself (default: work on a deep copy). A bare layer
        cannot turn into another class: its factorized replacement is
        returned and ``model`` is left as it is.
    centered : bool, optional
        Decompose in the centered covariance ``sigma - mu mu^T`` and correct the
        bias by ``(K_(1) - K~_(1)) mu`` (needs ``covariances``). The expected
        squared output error is then ``tr(D C D^T) <= tr(D Sigma D^T)``.
    options : dict, optional
        Keyword arguments for the core decomposition of the k x k convs
        (e.g. ``n_iter_max``, ``tol``, ``rng`` of :func:`sigmadecomp.tucker2`).
    progress : bool, optional
        A tqdm bar over layers (only when stderr is a terminal).
    distributed : None or bool, optional
        Spread the layers over the processes of a ``torch.distributed``
        process group. ``None`` (default): when a group is initialized with
        more than one process (e.g. under ``torchrun --nproc_per_node N``,
        gloo on CPU), every process decomposes its share of the layers
        (balanced by a predicted cost, :mod:`sigmadecomp_torch.parallel`)
        and the results are exchanged with ``all_gather_object``, so every
        process returns the same model and report (timings aside) as one
        process. Every process must call ``compress`` with the same model,
        statistics and arguments (pass ``False`` where only some processes
        call it: the others would never answer). ``True``: the same, but
        refuse to run without an initialized group; ``False``: decompose
        every layer here.
        The processes are started by the user (``torchrun``, or
        ``torch.multiprocessing.spawn`` as in ``benchmarks/parallel.py``),
        each with its own copy of the model and statistics.
    min_speedup : float, optional
        Keep a layer dense unless its factorized form runs at least this many
        times faster than the dense layer (``1.0``: only strictly not slower).
        Each layer is timed after its decomposition, dense and factorized
        interleaved, at the input size, batch and memory format it sees in
        ``example_input`` (:func:`sigmadecomp_torch.latency.compare_latency`,
        torch's current threads); a layer kept dense is listed in
        ``report.skipped`` with both times. ``None`` (default): no timing.
        Requires ``example_input``. Layers the example pass never calls are
        compressed without timing. Times are noisy on a busy machine.
    example_input : tensor, tuple or dict, optional
        One input batch of the model, for ``min_speedup``.
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
    ``Bilinear`` layers (listed when ``layers=None``); subclasses of
    ``Conv2d``/``Linear`` that override ``forward``; parametrized weights and
    modules with forward hooks; weights tied to another module's parameter;
    and layers whose parent reads their ``weight``/``bias`` directly instead
    of calling them (``nn.MultiheadAttention.out_proj``, the Linear layers of
    ``nn.TransformerEncoderLayer``; found in the source of the enclosing
    modules' methods). A module registered under several names is replaced by
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
    # --- data= / sequential= (sigmadecomp_torch.sequential) ---------------------------
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential={sequential!r} is not allowed; it must be True or False")
    if (sequential or data is not None) and covariances is not None:
        raise ValueError("covariances= cannot be combined with data= or sequential=True: the "
                         "statistics are then collected from data; give one or the other")
    if sequential:
        from .sequential import sequential_compress

        return sequential_compress(
            model, method, data, ratio=ratio, ranks=ranks, budget=budget, layers=layers,
            inplace=inplace, centered=centered, options=options, progress=progress,
            distributed=distributed, min_speedup=min_speedup, example_input=example_input)
    if data is not None and isinstance(model, nn.Module):
        from .covariance import collect_covariances

        covariances = collect_covariances(model, data, progress=progress)
    # --- end data= / sequential= -------------------------------------------------------
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
    _check_not_meta(model, covariances)
    options = dict(options or {})
    min_speedup = _latency.check_min_speedup(min_speedup, example_input)

    # every name of every module (a module registered twice has several)
    paths = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        lst = paths.setdefault(id(mod), [])
        if path not in lst:
            lst.append(path)
    canonical = {p: lst[0] for lst in paths.values() for p in lst}

    def canon(n):
        return canonical.get(n, n) if isinstance(n, str) else n

    explicit = {canon(k): v for k, v in ranks.items()} if hasattr(ranks, "items") else {}
    skipped = []
    named = layers is not None and not callable(layers)
    if layers is None:
        if explicit and ratio is None:
            layers, named = list(explicit), True
        else:
            layers = default_layers(model)
            layers += [k for k in explicit if k not in layers]
            skipped += [s for s in _default_exclusions(model) if s["name"] not in layers]
            skipped += _unsupported_modules(model)
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

    # -- plan: which layers, with which format, sigma and ranks (no work yet)
    owners = _param_owners(model)
    sigma_cache = {}
    plan = []
    for name, module in chosen:
        kind = _kind(module)
        names = paths.get(id(module), [name])
        reason = _obstacle(model, module, names, owners)
        stats_key = None
        if reason is None and covariances is not None:
            stats_key = next((n for n in names if n in covariances), None)
            if stats_key is None:
                reason = "no statistics for this layer in covariances"
        if reason is not None:
            if named:
                raise ValueError(f"layer {name!r} cannot be compressed: {reason}")
            skipped.append({"name": name, "kind": kind, "reason": reason})
            continue
        fmt = layer_method_for(module, method)
        if fmt not in LAYER_METHODS:
            raise ValueError(f"method {fmt!r} for layer {name!r} is not registered")
        sig = mean = full = None
        if covariances is not None:
            sig, mean, full = _sigma_for(stats_key, module, covariances[stats_key], centered,
                                         sigma_cache)
        plan.append({"name": name, "module": module, "kind": kind, "format": fmt,
                     "sigma": sig, "mean": mean, "full": full,
                     "aliases": [n for n in names if n != name]})
    if not plan:
        raise ValueError("no layer can be compressed: "
                         + ("; ".join(f"{s['name']!r}: {s['reason']}" for s in skipped)
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
        if not auto and p["params"] > dense:
            warnings.warn(
                f"ranks {p['ranks']} for layer {name!r} (weight {shape}) give "
                f"{p['params']} weight parameters, more than the {dense} of the original "
                "layer; the layer is replaced anyway", CompressionWarning, stacklevel=2)
        if rmeth == "cp":
            flop = _cp_flop(shape, p["ranks"], options, p["sigma"] is not None)
            if flop > CP_COST_WARN_FLOP:
                warnings.warn(
                    f"CP rank {p['ranks']} for layer {name!r} (weight {shape}) needs about "
                    f"{flop:.1e} floating-point operations (~{flop / _ASSUMED_FLOPS / 60:.0f} "
                    "min at 50 GFLOP/s); choose a smaller rank or fewer n_iter_max",
                    CompressionWarning, stacklevel=2)
        auto_plan.append(p)
    plan = auto_plan

    shapes = {}
    if min_speedup is not None:  # input size of each layer, under any of its names
        seen = _latency.input_shapes(model, example_input)
        shapes = {p["name"]: next((seen[n] for n in [p["name"]] + p["aliases"] if n in seen),
                                  None) for p in plan}

    # -- decompose (the model is untouched until every layer succeeded)
    rows, new_modules = [], {}
    shard = _parallel.LayerShard(plan, options, distributed)  # this process's layers
    it = _progress(plan, total=len(plan), enabled=progress and len(plan) > 1, desc="compress")
    for p in it:
        name, module, fmt = p["name"], p["module"], p["format"]
        if not shard.owns(name):
            continue
        spec = LAYER_METHODS[fmt]
        t0 = time.perf_counter()
        W = module.weight.detach().to(torch.float64)
        opts = options if fmt != "svd" else {}
        try:
            result = spec.decompose(W, p["ranks"], p["sigma"], opts)
            approx = result.to_tensor()
            if not isinstance(approx, torch.Tensor):
                approx = torch.as_tensor(approx)
            approx = approx.to(W).reshape(W.shape)
            D = (W - approx).reshape(W.shape[0], -1)
            bias_shift = D @ p["mean"] if centered else None
            new = spec.build(module, result, bias_shift)
        except Exception as e:
            named_exc = _named_error(name, e)
            shard.abort(named_exc)
            if named_exc is e:  # the type cannot be rebuilt: the name is in a note
                raise
            raise named_exc from e
        new.train(module.training)
        _carry_requires_grad(module, new)
        seconds = time.perf_counter() - t0
        frob = relative_sigma_error(W, approx)
        sig_err = None
        if p["sigma"] is not None:
            K = W.reshape(W.shape[0], -1)
            num = float(torch.sum((D @ p["sigma"]) * D).clamp_min(0))
            den = float(torch.sum((K @ p["full"]) * K))
            sig_err = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
        n_iter = getattr(result, "n_iter", None)
        converged = getattr(result, "converged", None)
        converged = None if converged is None else bool(converged)
        dense_reason = None
        timing = {}
        if shapes.get(name) is not None:
            keep, d_ms, f_ms = _latency.speedup_verdict(module, new, shapes[name], min_speedup)
            timing = {"latency_dense_ms": d_ms, "latency_factorized_ms": f_ms}
            if not keep:
                dense_reason = (f"factorized {d_ms / f_ms:.2f}x as fast as dense ({f_ms:.3f} "
                                f"vs {d_ms:.3f} ms at input {tuple(shapes[name][0])}), "
                                f"below min_speedup={min_speedup:g}: kept dense")
        rows.append({**timing, "_dense_reason": dense_reason,
            "name": name, "kind": p["kind"], "method": fmt, "ranks": p["ranks"],
            "params_before": _n_params(module), "params_after": _n_params(new),
            "sigma_error": sig_err, "frobenius_error": float(frob),
            "n_iter": None if n_iter is None else int(n_iter), "converged": converged,
            "seconds": seconds, "aliases": list(p["aliases"]),
        })
        new_modules[name] = (new, [name] + p["aliases"])
    rows, new_modules = shard.gather(rows, new_modules)  # all layers, on every process
    kept = []
    for row in rows:  # layers whose factorized form is not fast enough stay dense
        reason = row.pop("_dense_reason")
        if reason is None:
            kept.append(row)
            continue
        new_modules.pop(row["name"])
        skipped.append({"name": row["name"], "kind": row["kind"],
                        "latency_dense_ms": row["latency_dense_ms"],
                        "latency_factorized_ms": row["latency_factorized_ms"], "reason": reason})
    rows = kept
    for row in rows:
        _warn_layer(row)

    params_before = _n_params(model)
    if isinstance(model, _SUPPORTED) and "" in new_modules:
        target = new_modules[""][0]
    else:
        target = model if inplace else copy.deepcopy(model)
        for name, (new, names) in new_modules.items():
            for path in names:
                parent_name, _, child = path.rpartition(".")
                parent = target.get_submodule(parent_name) if parent_name else target
                setattr(parent, child, new)
    report = CompressionReport(
        method=method, weighted=covariances is not None, centered=bool(centered),
        layers=rows, skipped=skipped, params_before=params_before,
        params_after=_n_params(target), seconds=time.perf_counter() - t_start,
    )
    return target, report
