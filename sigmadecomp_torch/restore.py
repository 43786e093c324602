"""Load the state dict of a compressed model into a fresh model of the original architecture.

A compressed model can be saved whole (``torch.save(model)``), but checkpoints
and model hubs keep state dicts: ``small.state_dict()`` holds the factors
under the names of the factorized layers (``layer1.conv.first.weight``,
``layer1.conv.core.weight``, ...), which a freshly built original model does
not have. :func:`load_compressed` reads from the state dict alone which
layers were factorized, in which format and at which ranks, puts factorized
layers of those shapes in their places and loads the state dict::

    model = build_the_original_architecture()
    small = load_compressed(model, torch.load("small_state.pt"))

Every format of :func:`sigmadecomp_torch.compress` is recognised by its keys:

=============  ==============================================================
format         keys under the layer's name ``N``
=============  ==============================================================
Tucker-2       ``N.first.weight``, ``N.core.weight``, ``N.last.weight``
CP             ``N.first.weight``, ``N.vertical.weight``,
               ``N.horizontal.weight``, ``N.last.weight``
low rank       ``N.first.weight``, ``N.last.weight`` (conv or linear)
Tensor-Train   ``N.cores.0``, ``N.cores.1``, ... (and ``N.spatial`` for a conv)
=============  ==============================================================

A layer whose own ``N.weight`` is in the state dict stays dense. A bias that
the compressed layer has and the original has not (the bias correction of
``centered=True``, also of a dense layer refitted with it) is created; the
bias of a factorized layer whose original has one (``N.last.bias``, or
``N.bias`` for Tensor-Train) is a key like any other, missing if the state
dict lacks it. The compact state dicts of
:func:`quantized_state_dict` (int8 weights and ``weight_scale`` vectors) load
too, dequantized. A tensor the model holds under several names (a shared
module, tied weights) may be given under one of them, as safetensors'
``save_model`` writes it.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict

import torch
from torch import nn

from ._batches import check_type, outside_inference_mode, user_stacklevel
from .compress import _carry_requires_grad
from .layers import CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d
from .quantize import _SCALE_KEY, load_quantized_state_dict
from .tt_layers import TTConv2d, TTLinear

__all__ = ["load_compressed", "factorized_formats"]

_FORMAT_NAMES = {"tucker2": "Tucker-2", "cp": "CP", "svd": "low-rank", "tt": "Tensor-Train"}


def _parts(state, name):
    """``{part key: shape}`` of the entries under ``name`` (``name.<rest>``); the shape of a
    value that is not a tensor is None."""
    prefix = name + "." if name else ""
    return {k[len(prefix):]: tuple(v.shape) if isinstance(v, torch.Tensor) else None
            for k, v in state.items()
            if k.startswith(prefix) and not k.endswith("." + _SCALE_KEY)}


_FACTOR_KEYS = {  # the keys of each factorized layer (besides an optional bias)
    "tucker2": {"first.weight", "core.weight", "last.weight"},
    "cp": {"first.weight", "vertical.weight", "horizontal.weight", "last.weight"},
    "svd": {"first.weight", "last.weight"},
}


def _format_of(parts):
    """The factorized format the keys of one layer describe, or None (dense, absent, or
    keys no factorized layer has: submodules of the model that happen to be named
    ``first``, ``last``, ...)."""
    has = set(parts)
    for fmt, keys in _FACTOR_KEYS.items():
        if keys <= has <= keys | {"last.bias"}:
            return fmt
    cores = {k for k in has if k.startswith("cores.")}
    if "cores.0" in has and has - cores <= {"spatial", "bias"}:
        return "tt"
    return None


def factorized_formats(state_dict):
    """``{layer name: format}`` of the factorized layers a compressed state dict holds.

    Read from the keys alone: a module of the model whose own children look like
    factors (e.g. ``first`` and ``last`` Linear layers without biases) is listed
    too; :func:`load_compressed` tells them apart with the model at hand.

    Parameters
    ----------
    state_dict : dict of str to torch.Tensor
        E.g. ``compressed_model.state_dict()``.

    Returns
    -------
    dict of str to str
        Formats ``'tucker2'``, ``'cp'``, ``'svd'`` (low rank) or ``'tt'``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import LowRankLinear
    >>> from sigmadecomp_torch.restore import factorized_formats
    >>> lin = nn.Linear(6, 4)
    >>> model = nn.Sequential(LowRankLinear(lin, torch.randn(4, 2), torch.randn(2, 6)),
    ...                       nn.ReLU(), nn.Linear(4, 3))
    >>> factorized_formats(model.state_dict())
    {'0': 'svd'}
    """
    names = set()
    for key in state_dict:
        for marker in (".first.weight", ".cores.0"):
            if key.endswith(marker):
                names.add(key[: -len(marker)])
        if key in ("first.weight", "cores.0"):
            names.add("")
    out = {}
    for name in sorted(names):
        fmt = _format_of(_parts(state_dict, name))
        if fmt is not None:
            out[name] = fmt
    return out


def _factor_shapes(fmt, module):
    """``{key: shape}`` of a Tucker-2, CP or low-rank factorization of ``module``: the
    entries of a shape are ints or the names of ranks, which the keys must agree on. A rank
    is read from the first key that has it: the factors next to the input and output
    first, so that a core which does not fit them is the one named."""
    T, *rest = module.weight.shape
    if isinstance(module, nn.Linear):  # (low rank only)
        return {"first.weight": ("r", rest[0]), "last.weight": (T, "r"), "last.bias": (T,)}
    S, H, W = rest
    shapes = {
        "tucker2": {"first.weight": ("r_S", S, 1, 1), "last.weight": (T, "r_T", 1, 1),
                    "core.weight": ("r_T", "r_S", H, W)},
        "cp": {"first.weight": ("R", S, 1, 1), "last.weight": (T, "R", 1, 1),
               "vertical.weight": ("R", 1, H, 1), "horizontal.weight": ("R", 1, 1, W)},
        "svd": {"first.weight": ("r", S, H, W), "last.weight": (T, "r", 1, 1)},
    }[fmt]
    return {**shapes, "last.bias": (T,)}


def _shape_text(shape):
    """``(4, r_S, 3, 3)``: a shape whose entries may be names."""
    return "(" + ", ".join(str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_factors(name, module, fmt, parts):
    """Raise a ValueError naming the first key of ``parts`` (a Tucker-2, CP or low-rank
    layer's) whose shape does not fit a ``fmt`` factorization of ``module``."""
    prefix = name + "." if name else ""
    ranks = {}  # rank name -> (its value, the key it was read from)
    for key, want in _factor_shapes(fmt, module).items():
        got = parts.get(key)
        if got is None:
            continue
        if len(got) == len(want):
            for n, w in zip(got, want):
                if isinstance(w, str):
                    ranks.setdefault(w, (n, key))
        need = tuple(ranks[w][0] if w in ranks else w for w in want)
        if got == need:
            continue
        read = [ranks[w][1] for w in want if w in ranks and ranks[w][1] != key]
        read = [f"{prefix + k!r} of shape {parts[k]}" for k in dict.fromkeys(read)]
        raise ValueError(
            f"layer {name!r}: the state dict's {prefix + key!r} has shape {got}, but a "
            f"{_FORMAT_NAMES[fmt]} factorization of this {type(module).__name__} of weight "
            f"{tuple(module.weight.shape)} needs {_shape_text(need)}"
            f"{' (the ranks of ' + ' and '.join(read) + ')' if read else ''}; is the model "
            "the compressed one's original architecture?")


def _skeleton(name, module, fmt, parts):
    """A factorized layer of the shapes in ``parts`` standing in for ``module`` (values
    are overwritten by the state dict)."""
    w = module.weight
    fk = {"device": w.device, "dtype": w.dtype}
    zeros = lambda *shape: torch.zeros(shape, **fk)  # noqa: E731
    conv = isinstance(module, nn.Conv2d)
    if not conv and fmt in ("tucker2", "cp"):
        raise ValueError(f"layer {name!r} is a {type(module).__name__} in the model, but the "
                         f"state dict holds a {_FORMAT_NAMES[fmt]} factorization there, which "
                         "only Conv2d layers have; is the model the compressed one's original "
                         "architecture?")
    bias_key = "bias" if fmt == "tt" else "last.bias"
    # a bias where the state dict has one, or the original layer (then its key is missing
    # if the state dict lacks it, and the bias keeps the model's value with strict=False)
    has_bias = bias_key in parts or module.bias is not None
    shift = zeros(w.shape[0]) if bias_key in parts and module.bias is None else None
    if conv and module.groups != 1:
        raise ValueError(f"layer {name!r} is a grouped Conv2d (groups={module.groups}) in the "
                         f"model, but the state dict holds a {_FORMAT_NAMES[fmt]} "
                         "factorization there, which compress makes of groups=1 convs only; "
                         "is the model the compressed one's original architecture?")
    if fmt != "tt":
        _check_factors(name, module, fmt, parts)
    if fmt == "tucker2":
        rT, rS, H, W = parts["core.weight"]
        layer = Tucker2Conv2d(module, zeros(rT, rS, H, W), zeros(w.shape[0], rT),
                              zeros(w.shape[1], rS), bias_shift=shift)
    elif fmt == "cp":
        R = parts["first.weight"][0]
        T, S, H, W = w.shape
        layer = CPConv2d(module, torch.ones(R, **fk),
                         [zeros(T, R), zeros(S, R), zeros(H, R), zeros(W, R)], bias_shift=shift)
    elif fmt == "svd" and conv:
        r = parts["first.weight"][0]
        layer = LowRankConv2d(module, zeros(w.shape[0], r), zeros(r, math.prod(w.shape[1:])),
                              bias_shift=shift)
    elif fmt == "svd":
        r = parts["first.weight"][0]
        layer = LowRankLinear(module, zeros(w.shape[0], r), zeros(r, w.shape[1]),
                              bias_shift=shift)
    else:  # Tensor-Train
        if conv != ("spatial" in parts):  # TTConv2d has a spatial core, TTLinear none
            made_of = "a Conv2d (it has a 'spatial' core)" if "spatial" in parts else \
                "a Linear (it has no 'spatial' core)"
            raise ValueError(f"layer {name!r} is a {type(module).__name__} in the model, but the "
                             f"state dict holds a Tensor-Train factorization of {made_of} "
                             "there; is the model the compressed one's original architecture?")
        d = sum(1 for k in parts if k.startswith("cores."))
        cores = [parts.get(f"cores.{k}") for k in range(d)]
        if any(c is None for c in cores):
            raise ValueError(f"layer {name!r}: the Tensor-Train cores of the state dict are "
                             f"not numbered 0..{d - 1}: {sorted(parts)}")
        for k, c in enumerate(cores):
            if len(c) != 4:
                key = f"{name}.cores.{k}" if name else f"cores.{k}"
                raise ValueError(f"layer {name!r}: the state dict's {key!r} has shape {c}, "
                                 "but a Tensor-Train core needs 4 axes (rank, input mode, "
                                 "output mode, rank)")
        in_modes = [c[1] for c in cores]
        out_modes = [c[2] for c in cores]
        if conv:  # ranks (r_0, ..., r_{d-1}): r_0 spatial filters
            layer = TTConv2d(module.in_channels, module.out_channels, module.kernel_size,
                             in_modes, out_modes, [c[0] for c in cores], stride=module.stride,
                             padding=module.padding, dilation=module.dilation, bias=has_bias,
                             padding_mode=module.padding_mode, **fk)
        else:
            layer = TTLinear(module.in_features, module.out_features, in_modes, out_modes,
                             [c[0] for c in cores[1:]], bias=has_bias, **fk)
        if module.bias is not None:  # (as the other formats' factorized_bias)
            with torch.no_grad():
                layer.bias.copy_(module.bias)
    _carry_requires_grad(module, layer)
    layer.train(module.training)  # as compress does
    return layer


def _own_keys(module, parts):
    """Whether the keys ``parts`` under a module's name are its own submodules' (a module
    with children named ``first`` and ``last``), not the factors of a replaced layer."""
    return (not isinstance(module, (nn.Conv2d, nn.Linear))
            and set(parts) <= set(module.state_dict()))


def _add_refit_biases(model, state_dict):
    """A bias for each dense Conv2d/Linear that has none but whose state dict entry has one
    (the bias correction of a layer refitted with ``centered=True``); returns the modules
    given one."""
    given = []
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = name + "." if name else ""
        if (isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is None
                and prefix + "bias" in state_dict and prefix + "weight" in state_dict):
            w = module.weight
            module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                       requires_grad=w.requires_grad)
            given.append(module)
    return given


def _values_to_restore(model, state_dict, new):
    """``[(tensor, copy)]``: the tensors of ``model`` that loading ``state_dict`` overwrites,
    but those whose ids are in ``new``."""
    saved, seen = [], set(new)
    for key, value in model.state_dict(keep_vars=True).items():
        if key in state_dict and isinstance(value, torch.Tensor) and id(value) not in seen:
            seen.add(id(value))
            saved.append((value, value.detach().clone()))
    return saved


def _put_back(replaced, biased, saved):
    """Undo what :func:`load_compressed` did to a model: the values loading overwrote, the
    biases created and the factorized layers put in place."""
    with torch.no_grad():
        for value, copy_ in saved:  # (an inference tensor outside inference mode is unwritten)
            if torch.is_inference_mode_enabled() or not value.is_inference():
                value.copy_(copy_)
    for module in biased:
        module.bias = None
    for parent, child, module in reversed(replaced):
        setattr(parent, child, module)


def _with_aliases(model, state_dict):
    """``state_dict`` with the entries of a tensor the model holds under several names (a
    shared module, tied weights) filled in from the one name given: files written by
    safetensors' ``save_model`` keep one name per tensor."""
    names = {}
    for key, value in model.state_dict(keep_vars=True).items():
        names.setdefault(id(value), []).append(key)
    filled = {}
    for keys in names.values():
        given = next((k for k in keys if k in state_dict), None)
        if given is None:
            continue
        for key in keys:
            if key not in state_dict:
                filled[key] = state_dict[given]
                scale = given[: -len("weight")] + _SCALE_KEY  # (an int8 weight's scales)
                if given.endswith("weight") and scale in state_dict:
                    filled[key[: -len("weight")] + _SCALE_KEY] = state_dict[scale]
    if not filled:
        return state_dict
    out = OrderedDict(state_dict)
    out.update(filled)
    if hasattr(state_dict, "_metadata"):
        out._metadata = state_dict._metadata
    return out


@outside_inference_mode
def load_compressed(model, state_dict, *, strict=True, inplace=False):
    """``model`` with the factorized layers ``state_dict`` describes, and its values loaded.

    Parameters
    ----------
    model : torch.nn.Module
        A model of the original (uncompressed) architecture, e.g. freshly
        built; its weights are overwritten. Shared modules stay shared.
    state_dict : dict of str to torch.Tensor
        The state dict of a model returned by :func:`compress` (possibly after
        :func:`quantize_weights` and :func:`quantized_state_dict`).
    strict : bool, optional
        Passed to ``load_state_dict`` (default True: every key must match,
        the bias of a factorized layer whose original layer has one too).
        With ``False``, keys that do not match are named in a ``UserWarning``
        and left out: a key of the model missing from the state dict keeps
        the model's value (the bias of a factorized layer: the bias of the
        model's layer), and the keys of factorized layers the model does not
        have are skipped. Factors that do not fit the model's layers are
        errors either way, and a quantized state dict (``weight_scale``
        entries) loads with ``strict=True`` only.
    inplace : bool, optional
        Change ``model`` itself (default: a deep copy is changed and returned).
        If loading fails, ``model`` is left as it was (the values that
        loading overwrites are copied aside first).

    Returns
    -------
    torch.nn.Module
        The model with the factorized layers in place (the layer itself when
        ``model`` is a bare factorized ``Conv2d``/``Linear``).

    Raises
    ------
    TypeError
        ``strict`` or ``inplace`` not a bool, an entry of a factorized
        layer that is not a tensor, or an entry that is a dict (a checkpoint
        holding the state dict was passed instead of the state dict).
    ValueError
        A factorized layer of the state dict that is not a ``Conv2d``/``Linear``
        of the model (or, with ``strict=True``, that the model does not have),
        factor shapes that do not fit it, ``strict=False`` with a quantized
        state dict, int8 codes without their ``weight_scale``, or scales
        that do not fit their codes (see :func:`load_quantized_state_dict`).
    RuntimeError
        From ``load_state_dict``: with ``strict=True``, keys of the model
        missing from the state dict or keys of the state dict the model does
        not have.

    Notes
    -----
    The ``evaluation`` setting of Tensor-Train layers (``'auto'``, ``'chain'``,
    ``'kernel'``) is not part of a state dict: they come back with the default
    ``'auto'``; set ``layer.evaluation`` again where the saved model used
    another (the paths agree up to floating-point rounding).

    Examples
    --------
    >>> import io, torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import compress, load_compressed
    >>> def build():
    ...     torch.manual_seed(0)
    ...     return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),
    ...                          nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> small, report = compress(build(), "tucker2", ratio=2, progress=False)
    >>> buffer = io.BytesIO()
    >>> torch.save(small.state_dict(), buffer)
    >>> _ = buffer.seek(0)
    >>> restored = load_compressed(build(), torch.load(buffer))
    >>> type(restored[2]).__name__
    'Tucker2Conv2d'
    >>> x = torch.randn(1, 3, 9, 9)
    >>> bool(torch.equal(restored(x), small(x)))
    True
    """
    check_type(model, nn.Module, "model",
               "a torch.nn.Module of the original architecture")
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise TypeError(f"state_dict of type {type(state_dict).__name__} is not allowed; "
                        "state_dict must be a dict of str to tensor, e.g. "
                        "torch.load('compressed_state.pt')")
    if not isinstance(strict, bool):
        raise TypeError(f"strict={strict!r} is not allowed; it must be True or False")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace={inplace!r} is not allowed; it must be True or False")
    own = model.state_dict(keep_vars=True)
    nested = [k for k, v in state_dict.items() if isinstance(v, dict) and k not in own]
    if nested:  # a checkpoint holding the state dict (and more), not the state dict
        raise TypeError(f"state_dict[{nested[0]!r}] is a dict, not a tensor; state_dict must "
                        "be the model's state dict itself (for a checkpoint that holds one, "
                        f"e.g. checkpoint[{nested[0]!r}])")
    quantized = any(k == _SCALE_KEY or k.endswith("." + _SCALE_KEY) for k in state_dict)
    if quantized and not strict:
        raise ValueError("strict=False is not allowed with a quantized state dict "
                         "(weight_scale entries); load it whole, with strict=True")
    codes = [k for k, v in state_dict.items()
             if isinstance(v, torch.Tensor) and v.dtype == torch.int8
             # (an int8 buffer of the model loads as it is)
             and not (isinstance(own.get(k), torch.Tensor) and not own[k].is_floating_point())]
    if codes and not quantized:  # (loading would silently cast int8 codes to float)
        if not strict:
            raise ValueError(f"state_dict[{codes[0]!r}] holds int8 codes but the state dict "
                             "has no weight_scale entries to dequantize them; pass the whole "
                             "dict quantized_state_dict returned")
        quantized = True  # load_quantized_state_dict names the key
    formats = factorized_formats(state_dict)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules(remove_duplicate=False))
    formats = {n: f for n, f in formats.items()
               if n not in modules or not _own_keys(modules[n], _parts(state_dict, n))}
    absent = [n for n in formats if n not in modules]
    if absent:
        said = f"{absent[:4]}{' (and more)' if len(absent) > 4 else ''}"
        if strict:
            raise ValueError(f"the state dict holds factorized layers {said} that the model "
                             "does not have; is the model the compressed one's original "
                             "architecture?")
        warnings.warn(f"load_compressed(strict=False): the state dict holds factorized layers "
                      f"{said} that the model does not have; their keys were ignored",
                      UserWarning, stacklevel=user_stacklevel())
        prefixes = tuple(n + "." for n in absent)
        kept = OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith(prefixes))
        if hasattr(state_dict, "_metadata"):
            kept._metadata = state_dict._metadata
        state_dict = kept
        formats = {n: f for n, f in formats.items() if n not in absent}
    built = {}  # one factorized layer per module object: shared modules stay shared
    for name, fmt in formats.items():  # every layer built and checked before any is put in
        module = modules[name]
        if id(module) in built:
            continue
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"layer {name!r} is a {type(module).__name__} in the model; "
                             f"the state dict holds a {_FORMAT_NAMES[fmt]} factorization of "
                             "a Conv2d or Linear there")
        parts = _parts(state_dict, name)
        for key, shape in parts.items():
            if shape is None:
                full = f"{name}.{key}" if name else key
                raise TypeError(f"layer {name!r}: the state dict's {full!r} is a "
                                f"{type(state_dict[full]).__name__}; the entries of a "
                                f"{_FORMAT_NAMES[fmt]} factorization must be tensors")
        try:
            built[id(module)] = _skeleton(name, module, fmt, parts)
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith(f"layer {name!r}") else
                             f"layer {name!r}: {msg}") from None
        for key, value in built[id(module)].state_dict().items():
            if key in parts and parts[key] != tuple(value.shape):
                full = f"{name}.{key}" if name else key
                raise ValueError(
                    f"layer {name!r}: the state dict's {full!r} has shape {parts[key]}, "
                    f"but a {_FORMAT_NAMES[fmt]} factorization of this "
                    f"{type(module).__name__} of weight {tuple(module.weight.shape)} needs "
                    f"{tuple(value.shape)}; is the model the compressed one's original "
                    "architecture?")
    replaced, biased, saved = [], [], []  # what to undo if loading fails (inplace)
    try:
        for name, fmt in formats.items():
            module = modules[name]
            layer = built[id(module)]
            if name == "":
                target = layer
                continue
            # under each of its names (a state dict may hold a shared module's keys under one)
            for alias in [n for n, m in modules.items() if m is module]:
                parent_name, _, child = alias.rpartition(".")
                parent = modules[parent_name] if parent_name else target
                replaced.append((parent, child, module))
                setattr(parent, child, layer)
        biased = _add_refit_biases(target, state_dict)
        state_dict = _with_aliases(target, state_dict)
        if inplace:  # (the tensors made here are dropped if loading fails)
            new = [m.bias for m in biased]
            new += [t for m in built.values() for t in m.state_dict(keep_vars=True).values()]
            saved = _values_to_restore(target, state_dict, map(id, new))
        if quantized:
            return load_quantized_state_dict(target, state_dict)
        result = target.load_state_dict(state_dict, strict=strict)
    except BaseException:
        if inplace:
            _put_back(replaced, biased, saved)
        raise
    if result.missing_keys or result.unexpected_keys:  # (strict=False: said, not silent)
        warnings.warn(
            f"load_compressed(strict=False): {len(result.missing_keys)} key(s) of the model "
            f"not in the state dict ({', '.join(result.missing_keys[:4])}"
            f"{', ...' if len(result.missing_keys) > 4 else ''}) keep their values; "
            f"{len(result.unexpected_keys)} key(s) of the state dict not in the model "
            f"({', '.join(result.unexpected_keys[:4])}"
            f"{', ...' if len(result.unexpected_keys) > 4 else ''}) were ignored",
            UserWarning, stacklevel=user_stacklevel())
    return target
