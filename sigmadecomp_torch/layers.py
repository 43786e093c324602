"""Factorized layers built from plain ``nn.Conv2d`` / ``nn.Linear`` modules.

Each class is an ``nn.Sequential`` of standard modules, so a compressed model
exports like any other (TorchScript, ONNX, ``torch.compile``) and its
``state_dict`` holds ordinary weights. Each layer computes exactly the
convolution (or linear map) with the reconstructed weight of the core result
object it was built from, with the original layer's bias, stride, padding
(per axis, including ``'same'``/``'valid'`` and non-zero ``padding_mode``) and
dilation.

* :class:`Tucker2Conv2d` -- 1x1 (S->r_S), HxW core (r_S->r_T, the original
  geometry), 1x1 (r_T->T, bias).
* :class:`CPConv2d` -- 1x1 (S->R), Hx1 depthwise, 1xW depthwise (geometry split
  per axis), 1x1 (R->T, bias).
* :class:`LowRankConv2d` -- HxW (S->r, the original geometry), 1x1 (r->T, bias);
  for a 1x1 conv the first factor is a 1x1 conv.
* :class:`LowRankLinear` -- Linear (n->r), Linear (r->T, bias).

``bias_shift`` (optional, shape ``(T,)``) is added to the original bias: the
bias correction ``b~ = b + (K_(1) - K~_(1)) mu`` of the centered variant.

Each layer keeps the size and geometry attributes of the layer it replaces
(``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``,
``dilation``, ``groups``, ``padding_mode``; ``in_features``, ``out_features``
for a Linear), so that code reading them still runs; it has no ``weight``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

__all__ = ["Tucker2Conv2d", "CPConv2d", "LowRankConv2d", "LowRankLinear", "factorized_bias",
           "equivalent_weight"]


def _t(x, like):
    """Convert a factor (NumPy or torch) to ``like``'s dtype and device."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=like.device, dtype=like.dtype)
    import numpy as np

    return torch.as_tensor(np.asarray(x), dtype=like.dtype, device=like.device)


def factorized_bias(module, bias_shift=None):
    """The bias of the factorized layer: the original bias plus ``bias_shift``.

    Returns ``None`` when the module has no bias and no shift is given.
    """
    b = module.bias.detach().clone() if module.bias is not None else None
    if bias_shift is not None:
        shift = _t(bias_shift, module.weight).reshape(-1)
        if shift.shape[0] != module.weight.shape[0]:
            raise ValueError(f"bias_shift has {shift.shape[0]} entries; it must have "
                             f"{module.weight.shape[0]} (one per output)")
        b = shift.clone() if b is None else b + shift
    return b


def _check_conv(conv, name):
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name} needs an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"{name}: grouped convolutions (groups={conv.groups}) are not "
                         "supported; factorize each group separately")


def _stack(original, bias_shift, parts):
    """The modules of a factorized layer, weights set, as an ``OrderedDict`` for ``nn.Sequential``.

    ``parts`` is a list of ``(name, make, weight)``: ``make(bias=..., device=...,
    dtype=...)`` creates a plain ``nn.Conv2d`` / ``nn.Linear`` and ``weight``
    is copied into it. Every factor takes the dtype and device of
    ``original``'s weight; the last one carries the bias
    (:func:`factorized_bias`), the others have none.
    """
    bias = factorized_bias(original, bias_shift)
    w = original.weight
    modules = OrderedDict()
    for i, (name, make, weight) in enumerate(parts):
        last = i == len(parts) - 1
        mod = make(bias=last and bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mod.weight.copy_(weight)
            if last and bias is not None:
                mod.bias.copy_(bias)
        modules[name] = mod
    return modules


def _geom(conv):
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                padding_mode=conv.padding_mode)


def _describe(layer, original):
    """Give ``layer`` the size and geometry attributes of the layer it replaces.

    Code that reads ``conv.out_channels`` or ``fc.in_features`` of a layer
    (e.g. to reshape its input) keeps working once the layer is factorized;
    the values are plain Python attributes, not parameters.
    """
    if isinstance(original, nn.Linear):
        layer.in_features, layer.out_features = original.in_features, original.out_features
        return
    layer.in_channels, layer.out_channels = original.in_channels, original.out_channels
    layer.kernel_size = tuple(original.kernel_size)
    layer.stride, layer.dilation = tuple(original.stride), tuple(original.dilation)
    padding = original.padding
    layer.padding = padding if isinstance(padding, str) else tuple(padding)
    layer.padding_mode, layer.groups = original.padding_mode, original.groups


class Tucker2Conv2d(nn.Sequential):
    """Tucker-2 convolution: ``K ~= G x_1 U_T x_2 U_S``.

    Parameters
    ----------
    conv : nn.Conv2d
        The original layer (bias, stride, padding, dilation, dtype and device
        are taken from it; it is not modified).
    core : array of shape (r_T, r_S, H, W)
    out_factor : array of shape (T, r_T)
    in_factor : array of shape (S, r_S)
    bias_shift : array of shape (T,), optional

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import Tucker2Conv2d
    >>> conv = nn.Conv2d(6, 5, 3, padding=1)
    >>> layer = Tucker2Conv2d(conv, torch.randn(2, 3, 3, 3), torch.randn(5, 2), torch.randn(6, 3))
    >>> [tuple(m.weight.shape) for m in layer]
    [(3, 6, 1, 1), (2, 3, 3, 3), (5, 2, 1, 1)]
    >>> layer(torch.randn(1, 6, 8, 8)).shape
    torch.Size([1, 5, 8, 8])
    """

    def __init__(self, conv, core, out_factor, in_factor, *, bias_shift=None):
        _check_conv(conv, "Tucker2Conv2d")
        w = conv.weight
        T, S, H, W = w.shape
        core, U_T, U_S = _t(core, w), _t(out_factor, w), _t(in_factor, w)
        rT, rS = int(U_T.shape[1]), int(U_S.shape[1])
        if tuple(core.shape) != (rT, rS, H, W) or U_T.shape[0] != T or U_S.shape[0] != S:
            raise ValueError(
                f"Tucker2Conv2d: factors core {tuple(core.shape)}, out_factor "
                f"{tuple(U_T.shape)}, in_factor {tuple(U_S.shape)} do not fit a kernel "
                f"{tuple(w.shape)}; need ({rT}, {rS}, {H}, {W}), ({T}, r_T), ({S}, r_S)"
            )
        super().__init__(_stack(conv, bias_shift, [
            ("first", partial(nn.Conv2d, S, rS, 1), U_S.T.reshape(rS, S, 1, 1)),
            ("core", partial(nn.Conv2d, rS, rT, (H, W), **_geom(conv)), core),
            ("last", partial(nn.Conv2d, rT, T, 1), U_T.reshape(T, rT, 1, 1)),
        ]))
        _describe(self, conv)

    @classmethod
    def from_result(cls, conv, result, *, bias_shift=None):
        """Build from a :class:`sigmadecomp.Tucker2Result`."""
        return cls(conv, result.core, result.out_factor, result.in_factor,
                   bias_shift=bias_shift)

    @property
    def ranks(self):
        """``(r_T, r_S)``."""
        return int(self.core.out_channels), int(self.core.in_channels)

    def kernel(self, dtype=None):
        """The equivalent ``(T, S, H, W)`` kernel (for checks; the forward never forms it),
        in ``dtype`` (default: the layer's)."""
        dtype = self.core.weight.dtype if dtype is None else dtype
        U_S = self.first.weight.detach().to(dtype)[:, :, 0, 0]
        U_T = self.last.weight.detach().to(dtype)[:, :, 0, 0]
        return torch.einsum("ta,abhw,bs->tshw", U_T, self.core.weight.detach().to(dtype), U_S)


class CPConv2d(nn.Sequential):
    """CP convolution: ``K ~= sum_r w_r a_r (x) b_r (x) c_r (x) d_r``.

    Parameters
    ----------
    conv : nn.Conv2d
    weights : array of shape (R,)
    factors : sequence of arrays [(T, R), (S, R), (H, R), (W, R)]
    bias_shift : array of shape (T,), optional

    Notes
    -----
    Stride, padding and dilation are split per axis between the two depthwise
    convolutions; separable padding modes (zeros, reflect, replicate,
    circular) commute with the split, so the result is exact for all of them.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import CPConv2d
    >>> conv = nn.Conv2d(4, 6, (3, 5), stride=2, padding=(1, 2))
    >>> fac = [torch.randn(6, 3), torch.randn(4, 3), torch.randn(3, 3), torch.randn(5, 3)]
    >>> layer = CPConv2d(conv, torch.ones(3), fac)
    >>> [tuple(m.weight.shape) for m in layer]
    [(3, 4, 1, 1), (3, 1, 3, 1), (3, 1, 1, 5), (6, 3, 1, 1)]
    >>> layer(torch.randn(1, 4, 9, 9)).shape == conv(torch.randn(1, 4, 9, 9)).shape
    True
    """

    def __init__(self, conv, weights, factors, *, bias_shift=None):
        _check_conv(conv, "CPConv2d")
        w = conv.weight
        T, S, H, W = w.shape
        lam = _t(weights, w).reshape(-1)
        if len(factors) != 4:
            raise ValueError(f"CPConv2d: {len(factors)} factors given; a conv kernel needs 4")
        A, Bf, C, D = (_t(f, w) for f in factors)
        R = int(lam.shape[0])
        want = [(T, R), (S, R), (H, R), (W, R)]
        got = [tuple(f.shape) for f in (A, Bf, C, D)]
        if got != want:
            raise ValueError(f"CPConv2d: factor shapes {got} do not fit a kernel "
                             f"{tuple(w.shape)} at rank {R}; need {want}")
        if conv.padding == "same" or conv.padding == "valid":
            ph = pw = conv.padding
        else:
            ph, pw = (conv.padding[0], 0), (0, conv.padding[1])
        depthwise = dict(groups=R, padding_mode=conv.padding_mode)
        super().__init__(_stack(conv, bias_shift, [
            ("first", partial(nn.Conv2d, S, R, 1), Bf.T.reshape(R, S, 1, 1)),
            ("vertical", partial(nn.Conv2d, R, R, (H, 1), stride=(conv.stride[0], 1),
                                 padding=ph, dilation=(conv.dilation[0], 1), **depthwise),
             C.T.reshape(R, 1, H, 1)),
            ("horizontal", partial(nn.Conv2d, R, R, (1, W), stride=(1, conv.stride[1]),
                                   padding=pw, dilation=(1, conv.dilation[1]), **depthwise),
             D.T.reshape(R, 1, 1, W)),
            ("last", partial(nn.Conv2d, R, T, 1), (A * lam[None, :]).reshape(T, R, 1, 1)),
        ]))
        _describe(self, conv)

    @classmethod
    def from_result(cls, conv, result, *, bias_shift=None):
        """Build from a :class:`sigmadecomp.CPResult`."""
        return cls(conv, result.weights, result.factors, bias_shift=bias_shift)

    @property
    def rank(self):
        return int(self.first.out_channels)

    def kernel(self, dtype=None):
        """The equivalent ``(T, S, H, W)`` kernel (for checks; the forward never forms it),
        in ``dtype`` (default: the layer's)."""
        dtype = self.first.weight.dtype if dtype is None else dtype
        B = self.first.weight.detach().to(dtype)[:, :, 0, 0]
        C = self.vertical.weight.detach().to(dtype)[:, 0, :, 0]
        D = self.horizontal.weight.detach().to(dtype)[:, 0, 0, :]
        A = self.last.weight.detach().to(dtype)[:, :, 0, 0]
        return torch.einsum("tr,rs,rh,rw->tshw", A, B, C, D)


class LowRankConv2d(nn.Sequential):
    """Rank-``r`` convolution ``K_(1) ~= left @ right``.

    Parameters
    ----------
    conv : nn.Conv2d
    left : array of shape (T, r)
    right : array of shape (r, S*H*W)
    bias_shift : array of shape (T,), optional

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import LowRankConv2d
    >>> conv = nn.Conv2d(8, 8, 1)
    >>> layer = LowRankConv2d(conv, torch.randn(8, 2), torch.randn(2, 8))
    >>> [tuple(m.weight.shape) for m in layer]
    [(2, 8, 1, 1), (8, 2, 1, 1)]
    """

    def __init__(self, conv, left, right, *, bias_shift=None):
        _check_conv(conv, "LowRankConv2d")
        w = conv.weight
        T, S, H, W = w.shape
        L, Rt = _t(left, w), _t(right, w)
        r = int(L.shape[1])
        if tuple(L.shape) != (T, r) or tuple(Rt.shape) != (r, S * H * W):
            raise ValueError(f"LowRankConv2d: left {tuple(L.shape)}, right "
                             f"{tuple(Rt.shape)} do not fit a kernel {tuple(w.shape)}; "
                             f"need ({T}, r) and (r, {S * H * W})")
        super().__init__(_stack(conv, bias_shift, [
            ("first", partial(nn.Conv2d, S, r, (H, W), **_geom(conv)), Rt.reshape(r, S, H, W)),
            ("last", partial(nn.Conv2d, r, T, 1), L.reshape(T, r, 1, 1)),
        ]))
        _describe(self, conv)

    @classmethod
    def from_result(cls, conv, result, *, bias_shift=None):
        """Build from a :class:`sigmadecomp.SVDResult` of ``weight.reshape(T, -1)``."""
        return cls(conv, result.left, result.right, bias_shift=bias_shift)

    @property
    def rank(self):
        return int(self.first.out_channels)

    def kernel(self, dtype=None):
        """The equivalent ``(T, S, H, W)`` kernel (for checks; the forward never forms it),
        in ``dtype`` (default: the layer's)."""
        dtype = self.first.weight.dtype if dtype is None else dtype
        L = self.last.weight.detach().to(dtype)[:, :, 0, 0]
        return torch.einsum("tr,rshw->tshw", L, self.first.weight.detach().to(dtype))


class LowRankLinear(nn.Sequential):
    """Rank-``r`` linear layer ``W ~= left @ right``.

    Parameters
    ----------
    linear : nn.Linear
    left : array of shape (T, r)
    right : array of shape (r, n)
    bias_shift : array of shape (T,), optional

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import LowRankLinear
    >>> lin = nn.Linear(10, 4)
    >>> layer = LowRankLinear(lin, torch.randn(4, 2), torch.randn(2, 10))
    >>> layer(torch.randn(3, 10)).shape
    torch.Size([3, 4])
    """

    def __init__(self, linear, left, right, *, bias_shift=None):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LowRankLinear needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        T, n = w.shape
        L, Rt = _t(left, w), _t(right, w)
        r = int(L.shape[1])
        if tuple(L.shape) != (T, r) or tuple(Rt.shape) != (r, n):
            raise ValueError(f"LowRankLinear: left {tuple(L.shape)}, right "
                             f"{tuple(Rt.shape)} do not fit a weight {tuple(w.shape)}; "
                             f"need ({T}, r) and (r, {n})")
        super().__init__(_stack(linear, bias_shift, [
            ("first", partial(nn.Linear, n, r), Rt),
            ("last", partial(nn.Linear, r, T), L),
        ]))
        _describe(self, linear)

    @classmethod
    def from_result(cls, linear, result, *, bias_shift=None):
        """Build from a :class:`sigmadecomp.SVDResult`."""
        return cls(linear, result.left, result.right, bias_shift=bias_shift)

    @property
    def rank(self):
        return int(self.first.out_features)

    def kernel(self, dtype=None):
        """The equivalent ``(T, n)`` weight (for checks; the forward never forms it), in
        ``dtype`` (default: the layer's)."""
        dtype = self.first.weight.dtype if dtype is None else dtype
        return self.last.weight.detach().to(dtype) @ self.first.weight.detach().to(dtype)


def equivalent_weight(module):
    """The dense weight that a (factorized) layer computes with, as a float64 tensor.

    The product of the layer's own factors, as stored (in the layer's dtype),
    multiplied out in float64: what the layer's forward computes up to the
    rounding of its evaluation. Shape ``(T, S, H, W)`` for a conv, ``(T, n)``
    for a Linear layer; a plain ``nn.Conv2d`` / ``nn.Linear`` gives its weight.

    Parameters
    ----------
    module : nn.Module
        A layer of this module or of :mod:`sigmadecomp_torch.tt_layers`, or a
        plain ``nn.Conv2d`` / ``nn.Linear``.

    Returns
    -------
    torch.Tensor or None
        None for a module of another type (e.g. a format added with
        :func:`sigmadecomp_torch.register_layer_method`).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch.layers import LowRankLinear, equivalent_weight
    >>> lin = nn.Linear(5, 3)
    >>> left, right = torch.randn(3, 2), torch.randn(2, 5)
    >>> W = equivalent_weight(LowRankLinear(lin, left, right))
    >>> W.dtype, bool(torch.allclose(W, (left @ right).double()))
    (torch.float64, True)
    """
    with torch.no_grad():
        if isinstance(module, (Tucker2Conv2d, CPConv2d, LowRankConv2d, LowRankLinear)):
            return module.kernel(torch.float64)
        from .tt_layers import TTConv2d, TTLinear

        if isinstance(module, (TTConv2d, TTLinear)):
            # (a float64 copy: the TT chain is multiplied out in the copy's dtype)
            m64 = copy.deepcopy(module).to(torch.float64)
            return (m64.kernel() if isinstance(m64, TTConv2d) else m64.weight()).detach()
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return module.weight.detach().to(torch.float64)
    return None
