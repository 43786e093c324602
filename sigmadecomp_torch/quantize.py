"""int8 per-channel weight quantization of (factorized) layers, and model size.

Low-rank factorization and quantization compose: the SVD, Tucker-2 and CP
layers are made of plain ``nn.Conv2d`` / ``nn.Linear`` modules, so their
weights can be stored as int8 with one float32 scale per output channel
(symmetric, zero point 0). Tensor-Train layers (``TTConv2d``, ``TTLinear``)
hold their cores as parameters of their own and stay in float; they are
listed in :attr:`QuantizedWeights.skipped` with a ``CompressionWarning``.

* :func:`quantize_weights` computes the scales with torch's own observer
  (:class:`torch.ao.quantization.observer.PerChannelMinMaxObserver`, per-channel
  symmetric, ``qint8``) and replaces each chosen weight by its fake-quantized
  value (:func:`torch.fake_quantize_per_channel_affine` picks the codes of
  float32/float16/bfloat16 weights, float64 weights get the nearest codes of
  their own values; the weight becomes ``code * scale``: the exact product
  for float64 weights, else computed in float32 and stored in the weight's
  dtype), so the model computes what the int8-weight model computes
  (exactly for float32 and float64 weights; weight-only quantization:
  activations stay float). The int8 codes and scales are kept in the returned
  :class:`QuantizedWeights`.
* :func:`quantized_state_dict` is the compact ``state_dict`` to ship (int8
  weights plus scales); :func:`load_quantized_state_dict` restores a model
  from it; :func:`model_size_bytes` is the size of a serialized state dict.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from sigmadecomp_torch.quantize import quantize_weights, quantized_state_dict, model_size_bytes
>>> model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 8, 1))
>>> qmodel, qw = quantize_weights(model)
>>> sorted(qw.int8), qw.int8['0'].dtype
(['0', '2'], torch.int8)
>>> bool(qw.max_abs_error['0'] <= 0.5 * float(qw.scales['0'].max()) + 1e-7)
True
>>> model_size_bytes(quantized_state_dict(qmodel, qw)) < 0.5 * model_size_bytes(model)
True
"""

from __future__ import annotations

import copy
import io
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from sigmadecomp.exceptions import CompressionWarning

from ._batches import check_type, outside_inference_mode, user_stacklevel

__all__ = [
    "QuantizedWeights",
    "quantize_weights",
    "quantized_state_dict",
    "load_quantized_state_dict",
    "model_size_bytes",
]

_SCALE_KEY = "weight_scale"  # beside each int8 "weight" of the compact state dict


@dataclass(repr=False)
class QuantizedWeights:
    """int8 codes and per-output-channel scales of quantized weights.

    Attributes
    ----------
    int8 : dict of str to torch.Tensor (int8)
        Codes, same shape as the weight; ``weight = int8 * scale[:, None, ...]``.
    scales : dict of str to torch.Tensor (float32) of shape (out_channels,)
    max_abs_error : dict of str to float
        Largest change ``|w - stored w|`` per layer: for float32/float64
        weights at most half a scale step up to float32 rounding
        (``|w - stored w| <= scale / 2 + 2**-23 * |w|`` per entry, the
        second term from the float32 scale and product); float16/bfloat16 weights store the
        dequantized value rounded to their dtype, which may add up to half an
        ulp of that dtype.
    skipped : dict of str to str
        Layers under the chosen names left in float, with the reason
        (Tensor-Train layers).
    """

    int8: dict = field(default_factory=dict)
    scales: dict = field(default_factory=dict)
    max_abs_error: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    @property
    def layers(self):
        """Names of the quantized modules."""
        return list(self.int8)

    def __repr__(self):
        worst = max(self.max_abs_error.values(), default=0.0)
        return f"QuantizedWeights({len(self.int8)} layers, max |error| {worst:.3g})"



def _dequantized(codes, scale, dtype):
    """``codes * scale`` (per output channel) stored in ``dtype``: for float64 the exact
    product (an int8 code times a float32 scale fits a float64), else the float32 product
    rounded to ``dtype`` (for float32 the exact product rounded once)."""
    shape = (-1,) + (1,) * (codes.ndim - 1)
    if dtype == torch.float64:
        return codes.double() * scale.to(codes.device, torch.float64).view(shape)
    return (codes.float() * scale.to(codes.device, torch.float32).view(shape)).to(dtype)


def _is_tt(module):
    from .tt_layers import TTConv2d, TTLinear

    return isinstance(module, (TTConv2d, TTLinear))


def _chosen(model, layers):
    """``(quantized, tt)``: the (name, module) pairs to quantize and the TT layers met."""
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared module: every name
    kinds = (nn.Conv2d, nn.Linear, nn.Conv1d, nn.Conv3d)

    def under(prefix):
        return [(n, m) for n, m in modules.items()
                if n == prefix or n.startswith(prefix + ".") or prefix == ""]

    if layers is None:
        layers = [""]
    elif isinstance(layers, str):
        layers = [layers]
    elif not isinstance(layers, (list, tuple)) or not all(isinstance(x, str) for x in layers):
        raise TypeError(f"layers={layers!r} is not allowed; layers must be None, a module name "
                        "or a list of module names")
    elif not layers:
        raise ValueError(f"layers={layers!r} is not allowed; give None (every layer) or at least "
                         "one module name")
    out, tt = {}, {}
    for prefix in layers:
        if prefix not in modules:
            raise ValueError(f"layers contains {prefix!r}, which is not a module of the model")
        inside = under(prefix)
        tt.update((n, m) for n, m in inside if _is_tt(m))
        found = [(n, m) for n, m in inside if isinstance(m, kinds)]
        if not found and prefix in tt:
            raise ValueError(f"layers contains {prefix!r}, a Tensor-Train layer "
                             f"({type(modules[prefix]).__name__}); its cores are not quantized")
        if not found:
            raise ValueError(
                f"layers contains {prefix!r}, which holds no Conv or Linear module to quantize"
            )
        out.update(found)
    order = {n: i for i, n in enumerate(modules)}
    return sorted(out.items(), key=lambda t: order[t[0]]), sorted(tt, key=order.get)


@outside_inference_mode
def quantize_weights(model, *, layers=None, inplace=False):
    """int8 per-output-channel symmetric weight quantization.

    Parameters
    ----------
    model : torch.nn.Module
    layers : None, str or list of str, optional
        Module names; every ``Conv1d`` / ``Conv2d`` / ``Conv3d`` / ``Linear``
        module at or under each name is quantized (e.g. the names of
        factorized layers). Default: all. Transposed convolutions (output
        channels on their second axis) are left in float. A weight shared by
        several modules (or a module registered under several names) is
        quantized once; its codes are listed under every name (the same tensor
        objects, saved once). Weights with NaN or inf values raise a
        ``ValueError`` before anything is changed.
    inplace : bool, optional
        Modify ``model`` itself; default works on a deep copy. Tensor-Train
        layers under the chosen names stay in float (``quantized.skipped``,
        with a ``CompressionWarning``).

    Returns
    -------
    model : torch.nn.Module
        With each chosen weight replaced by its dequantized int8 value (the
        same numbers an int8-weight kernel computes with). Biases stay float.
    quantized : QuantizedWeights

    Notes
    -----
    Scales come from ``PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8,
    qscheme=torch.per_channel_symmetric)``: ``scale_c = max|w_c| / 127.5``
    (codes in [-128, 127]; an all-zero channel gets the float32 eps); rounding to
    nearest.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import quantize_weights
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> q_model, q = quantize_weights(model)
    >>> sorted(q.int8), q.int8["0"].dtype
    (['0', '2'], torch.int8)
    >>> w, s = model[0].weight, q.scales["0"]
    >>> bool((q_model[0].weight - w).abs().max() <= s.max() / 2 + 1e-6)  # half a step
    True
    >>> torch.equal(model[0].weight, w)  # the input model is not changed
    True
    """
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    check_type(model, nn.Module, "model", "a torch.nn.Module")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace={inplace!r} is not allowed; inplace must be True or False")
    chosen, tt = _chosen(model, layers)  # (checked before the copy)
    for name, module in chosen:  # before any weight is overwritten (inplace=True)
        if not bool(torch.isfinite(module.weight.detach()).all()):
            raise ValueError(f"layer {name!r} has NaN or inf weights, which cannot be quantized; "
                             "fix the weights or leave the layer out with layers=")
    if not inplace:
        model = copy.deepcopy(model)
        chosen, tt = _chosen(model, layers)
    result = QuantizedWeights()
    for name in tt:
        result.skipped[name] = "Tensor-Train layer: its cores stay in float"
    if tt:
        warnings.warn(f"quantize_weights: {len(tt)} Tensor-Train layer(s) ({', '.join(tt)}) stay "
                      "in float; only Conv/Linear weights are quantized", CompressionWarning,
                      stacklevel=user_stacklevel())
    first = {}  # id of a weight -> the first name it was quantized under
    for name, module in chosen:
        if id(module.weight) in first:  # tied: already quantized, keep one set of codes
            src = first[id(module.weight)]
            for table in (result.int8, result.scales, result.max_abs_error):
                table[name] = table[src]
            continue
        first[id(module.weight)] = name
        w = module.weight.detach().clone()  # (the weight itself is overwritten below)
        obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        obs = obs.to(w.device)
        obs(w.float())
        scale, zero_point = obs.calculate_qparams()
        scale = scale.to(w.device, torch.float32)
        zero_point = zero_point.to(w.device, torch.int32)
        fq = torch.fake_quantize_per_channel_affine(
            w.float(), scale, zero_point, 0, obs.quant_min, obs.quant_max
        )
        shape = (-1,) + (1,) * (w.ndim - 1)
        if w.dtype == torch.float64:  # nearest codes of the weight itself, not of its
            # float32 rounding (which can move a value across a rounding boundary)
            codes = torch.clamp(torch.round(w / scale.double().view(shape)),
                                obs.quant_min, obs.quant_max)
        else:  # the int8 codes chosen by the fake-quantizer
            codes = torch.clamp(torch.round(fq / scale.view(shape)),
                                obs.quant_min, obs.quant_max)
        codes = codes.to(torch.int8)
        result.int8[name] = codes
        result.scales[name] = scale
        with torch.no_grad():
            module.weight.copy_(_dequantized(codes, scale, w.dtype))
        # measured on the weight as stored (rounded to its dtype), against the original
        result.max_abs_error[name] = float((module.weight.detach().double() - w.double())
                                           .abs().max())
    return model, result


def quantized_state_dict(model, quantized):
    """The compact state dict: int8 weights plus ``<name>.weight_scale`` vectors.

    Parameters
    ----------
    model : torch.nn.Module
        The model returned by :func:`quantize_weights`.
    quantized : QuantizedWeights

    Returns
    -------
    dict of str to torch.Tensor
        Every key of ``model.state_dict()``; each quantized weight (under every
        name it has in the model: shared modules, tied weights) as int8 codes,
        with its float32 scales under ``<name>.weight_scale``.

    Raises
    ------
    ValueError
        When a quantized weight of ``model`` no longer equals its int8 value
        (changed after :func:`quantize_weights`, e.g. by fine-tuning) or
        ``quantized`` names a layer ``model`` does not have: the codes would
        silently drop the change.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import quantize_weights, quantized_state_dict
    >>> _ = torch.manual_seed(0)
    >>> q_model, q = quantize_weights(nn.Sequential(nn.Linear(8, 4)))
    >>> state = quantized_state_dict(q_model, q)
    >>> state["0.weight"].dtype, state["0.weight_scale"].shape
    (torch.int8, torch.Size([4]))
    """
    check_type(model, nn.Module, "model", "the torch.nn.Module returned by quantize_weights")
    check_type(quantized, QuantizedWeights, "quantized",
                "the QuantizedWeights returned by quantize_weights")
    modules = dict(model.named_modules(remove_duplicate=False))
    by_weight = {}  # id of a quantized weight -> the layer name its codes are listed under
    for name, codes in quantized.int8.items():
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"quantized lists layer {name!r}, which is not a module with a weight "
                             "in model; pass the model quantize_weights returned with it")
        scale = quantized.scales[name].to(weight.device)
        codes = codes.to(weight.device)
        stored = _dequantized(codes, scale, weight.dtype)
        # (a model quantized in float32 and converted to float64 holds the float32 products)
        rounded = _dequantized(codes, scale, torch.float32).to(weight.dtype)
        if stored.shape != weight.shape or not (torch.equal(stored, weight.detach())
                                                or torch.equal(rounded, weight.detach())):
            raise ValueError(
                f"the weight of layer {name!r} is no longer its int8 value (changed since "
                "quantize_weights, e.g. by training, or from another model); its codes would "
                "drop the change: call quantize_weights again and save what it returns")
        by_weight.setdefault(id(weight), name)

    copies = {}  # tensors shared in the model (tied weights) stay shared, so saved once

    def copy_of(t):
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))
        if key not in copies:
            copies[key] = t.detach().clone()
        return copies[key]

    state, scales = {}, {}
    for key, value in model.state_dict(keep_vars=True).items():
        is_weight = key == "weight" or key.endswith(".weight")
        name = by_weight.get(id(value)) if is_weight else None
        if name is None:
            state[key] = copy_of(value)
        else:  # also under every other name of a shared module or tied weight
            state[key] = copy_of(quantized.int8[name])
            scales[key[: -len("weight")] + _SCALE_KEY] = copy_of(quantized.scales[name])
    state.update(scales)
    return state


def _checked_scale(state, key, codes):
    """``state[key]``, the float32 scales of the int8 ``codes``, refused unless it is a
    floating vector of one positive finite value per output channel (what
    :func:`quantize_weights` writes)."""
    scale = state[key]
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"state[{key!r}] is a {type(scale).__name__}; the scales of an int8 "
                        "weight must be a float32 tensor")
    want = (codes.shape[0],) if codes.ndim else None
    if not scale.is_floating_point() or tuple(scale.shape) != want:
        raise ValueError(f"state[{key!r}] has dtype {scale.dtype} and shape "
                         f"{tuple(scale.shape)}; the scales of an int8 weight of shape "
                         f"{tuple(codes.shape)} must be a float vector of shape {want} (one "
                         "per output channel)")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(f"state[{key!r}] holds scales that are not positive and finite "
                         f"(min {float(scale.min())}); quantize_weights writes positive "
                         "finite scales, is the file damaged?")
    return scale


def load_quantized_state_dict(model, state):
    """Load a :func:`quantized_state_dict` into ``model`` (dequantizing int8 weights), in place.

    An int8 weight without its ``weight_scale``, a weight with a
    ``weight_scale`` that is not int8, a ``weight_scale`` without its weight,
    or scales that are not a float vector of one positive finite value per
    output channel raise a ``ValueError`` naming the key (codes or scales
    that are not tensors a ``TypeError``).

    Returns
    -------
    model : torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import (load_quantized_state_dict, quantize_weights,
    ...                                quantized_state_dict)
    >>> _ = torch.manual_seed(0)
    >>> q_model, q = quantize_weights(nn.Sequential(nn.Linear(8, 4)))
    >>> state = quantized_state_dict(q_model, q)
    >>> fresh = load_quantized_state_dict(nn.Sequential(nn.Linear(8, 4)), state)
    >>> torch.equal(fresh[0].weight, q_model[0].weight)
    True
    """
    from collections.abc import Mapping

    check_type(model, nn.Module, "model", "a torch.nn.Module")
    check_type(state, Mapping, "state", "the dict quantized_state_dict returned")
    plain = {}
    targets = model.state_dict(keep_vars=True)  # (the dtype each weight is stored in)
    for key, value in state.items():
        if key == _SCALE_KEY or key.endswith("." + _SCALE_KEY):
            weight_key = key[: -len(_SCALE_KEY)] + "weight"
            if weight_key not in state:  # scales of no weight: foreign or partial state
                raise ValueError(f"state has scales {key!r} but no weight {weight_key!r} to "
                                 "dequantize with them; pass the whole dict "
                                 "quantized_state_dict returned")
            continue
        is_weight = key == "weight" or key.endswith(".weight")
        scale_key = key[: -len("weight")] + _SCALE_KEY if is_weight else None
        if scale_key is not None and scale_key in state:
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state[{key!r}] is a {type(value).__name__}, but state has "
                                f"its scales {scale_key!r}: it must be a tensor of int8 codes")
            if value.dtype != torch.int8:
                raise ValueError(f"state[{key!r}] has dtype {value.dtype}, but state has its "
                                 f"scales {scale_key!r}: a weight with scales must be int8 "
                                 "codes (scaling a float weight again would change it)")
            scale = _checked_scale(state, scale_key, value)
            target = targets.get(key)
            value = _dequantized(value, scale, target.dtype if isinstance(
                target, torch.Tensor) and target.is_floating_point() else torch.float32)
        elif is_weight and getattr(value, "dtype", None) == torch.int8:
            raise ValueError(f"state[{key!r}] holds int8 codes but state has no {scale_key!r}; "
                             "the codes cannot be dequantized without their scales (pass the "
                             "whole dict quantized_state_dict returned)")
        elif (getattr(value, "dtype", None) == torch.int8
              and isinstance(targets.get(key), torch.Tensor)
              and targets[key].is_floating_point()):  # (codes of a format not ours)
            raise ValueError(f"state[{key!r}] holds int8 values for the model's "
                             f"{targets[key].dtype} tensor {key!r}, without scales; only "
                             "weights (with their weight_scale) are quantized by "
                             "quantized_state_dict")
        plain[key] = value
    if hasattr(state, "_metadata"):  # (module versions, as load_state_dict reads them)
        plain = OrderedDict(plain)
        plain._metadata = state._metadata
    model.load_state_dict(plain)
    return model


def model_size_bytes(model_or_state):
    """Bytes of ``torch.save`` of a model's state dict (or of a given dict).

    Parameters
    ----------
    model_or_state : torch.nn.Module or dict of str to torch.Tensor

    Returns
    -------
    int
    """
    if isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict()
    elif isinstance(model_or_state, dict):
        state = model_or_state
    else:
        raise TypeError(f"model_or_state of type {type(model_or_state).__name__} is not "
                        "allowed; it must be a torch.nn.Module or a state dict")
    buf = io.BytesIO()
    torch.save(state, buf)
    return len(buf.getvalue())
