"""The factorized formats :func:`sigmadecomp_torch.compress` knows, by ``method`` name.

A format is a :class:`LayerMethod`: how a layer's weight is decomposed (a core
function) and how the factorized module is built from the result (a layer of
:mod:`sigmadecomp_torch.layers` or :mod:`sigmadecomp_torch.tt_layers`).
:data:`LAYER_METHODS` holds them; :func:`register_layer_method` adds one;
:func:`layer_method_for` says which format a layer gets under a ``method``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

from torch import nn

from sigmadecomp.svd import sigma_svd

from .layers import CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d

__all__ = ["LayerMethod", "LAYER_METHODS", "register_layer_method", "layer_method_for"]


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
        device, ``sigma`` a :class:`sigmadecomp.prepared.PreparedSigma` (of a
        float64 ``(n, n)`` tensor on that device, its ``matrix``; every core
        function accepts it in place of the matrix) or None, ``options`` a
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

    Examples
    --------
    A Tucker-2 format whose decomposition always runs 3 sweeps from the
    Frobenius start, under its own name:

    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import LayerMethod, compress, register_layer_method
    >>> from sigmadecomp_torch.formats import LAYER_METHODS
    >>> from sigmadecomp import tucker2
    >>> def three_sweeps(weight, ranks, sigma, options):
    ...     return tucker2(weight, ranks, sigma, init="frobenius", n_iter_max=3)
    >>> register_layer_method("tucker2_3", LayerMethod(
    ...     "tucker2", three_sweeps, LAYER_METHODS["tucker2"].build))
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    >>> small, report = compress(model, "tucker2_3", ratio=2, layers=["2"], progress=False)
    >>> report.layers[0]["method"], report.layers[0]["n_iter"]
    ('tucker2_3', 3)
    >>> del LAYER_METHODS["tucker2_3"]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is not allowed; name must be a non-empty string")
    if not isinstance(spec, LayerMethod):
        raise TypeError(f"spec of type {type(spec).__name__} is not allowed; spec must be "
                        "a LayerMethod")
    from sigmadecomp.costs import METHODS

    if spec.rank_method not in METHODS:
        allowed = ", ".join(repr(m) for m in METHODS)
        raise ValueError(f"spec.rank_method={spec.rank_method!r} is not allowed; it must be a "
                         f"format known to sigmadecomp.ranks ({allowed}), or one added with "
                         "sigmadecomp.ranks.register_method first")
    for attr in ("decompose", "build"):
        if not callable(getattr(spec, attr)):
            raise TypeError(f"spec.{attr} of type {type(getattr(spec, attr)).__name__} is not "
                            "allowed; it must be callable")
    LAYER_METHODS[name] = spec


def layer_method_for(module, method):
    """The format used for ``module`` under ``method``.

    Linear layers and 1x1 convs use ``'svd'`` (the Sigma-SVD is their exact
    optimum) except under ``'tt'``, which tensorizes them too (TT-FC); other
    convs use ``method``.

    Examples
    --------
    >>> from torch import nn
    >>> from sigmadecomp_torch import layer_method_for
    >>> layer_method_for(nn.Conv2d(8, 8, 3), "cp"), layer_method_for(nn.Conv2d(8, 8, 1), "cp")
    ('cp', 'svd')
    >>> layer_method_for(nn.Linear(8, 8), "tucker2"), layer_method_for(nn.Linear(8, 8), "tt")
    ('svd', 'tt')
    """
    if method == "tt":
        return "tt"
    if isinstance(module, nn.Linear):
        return "svd"
    if tuple(module.kernel_size) == (1, 1):
        return "svd"
    return method
