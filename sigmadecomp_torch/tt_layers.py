"""Tensor-Train layers (Garipov et al. 2016; Novikov et al. 2015) built from plain torch ops.

:class:`TTConv2d` evaluates a TT-conv kernel without forming it: the spatial
core is a convolution of every input channel, reshaped to a single-channel
image, with ``r_0`` filters (the conv's stride, padding and dilation); then
each channel core ``G_k`` (``r_{k-1} x s_k x t_k x r_k``) contracts the input
mode ``s_k`` and rank ``r_{k-1}`` into the output mode ``t_k`` and rank ``r_k``
as one batched matrix product. :class:`TTLinear` is the same chain without the
spatial core. Only ``reshape``, ``permute``, ``matmul`` and ``conv2d`` are used,
so the layers trace, script and export like any other module.

Both layers compute exactly the layer with the reconstructed weight
(``TTResult.to_tensor()``), up to floating-point rounding.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from sigmadecomp._tt_algebra import tt_matrix
from sigmadecomp._validation import is_positive_int_tuple
from sigmadecomp.prepared import prepare_sigma
from sigmadecomp.tt import (
    TTResult,
    auto_modes,
    tt_conv,
    tt_linear,
    tt_mac_count,
    tt_modes,
    tt_ranks_for_ratio,
)

__all__ = ["TTConv2d", "TTLinear", "tt_compress_module", "tt_decompose", "tt_build"]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _is_count(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_counts(values, name):
    """``values`` as a tuple of ints (NumPy ints too), refusing fractions, bools and strings."""
    try:
        ok = not isinstance(values, (str, bytes)) and all(_is_count(v) for v in values)
    except TypeError:  # (not a sequence)
        ok = False
    if not ok:
        raise ValueError(f"{name}={values!r} is not allowed; {name} must be a sequence of "
                         "positive ints")
    return tuple(int(v) for v in values)


def _check_pair(value, name):
    """``value`` (an int or a pair of ints) as a pair of positive ints, as nn.Conv2d takes it."""
    pair = _pair(value)
    if not is_positive_int_tuple(pair, 2):
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be a positive int or "
                         "a pair of positive ints")
    return tuple(int(v) for v in pair)


def _check_modes_ranks(in_modes, out_modes, ranks, n_bonds):
    in_modes = _check_counts(in_modes, "in_modes")
    out_modes = _check_counts(out_modes, "out_modes")
    if len(in_modes) != len(out_modes) or not in_modes:
        raise ValueError(
            f"in_modes={in_modes} and out_modes={out_modes} must be non-empty and of equal length"
        )
    if min(in_modes + out_modes) < 1:
        raise ValueError(f"in_modes={in_modes} / out_modes={out_modes} is not allowed; modes "
                         "must be positive ints")
    ranks = _check_counts(ranks, "ranks")
    if len(ranks) != n_bonds:
        raise ValueError(f"ranks={ranks} has {len(ranks)} entries; this layer needs {n_bonds}")
    if ranks and min(ranks) < 1:
        raise ValueError(f"ranks={ranks} is not allowed; ranks must be positive ints")
    return in_modes, out_modes, ranks


def _check_padding(padding, stride):
    """``padding`` as nn.Conv2d accepts it: 'valid', 'same' (stride 1 only) or ints >= 0."""
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"padding={padding!r} is not allowed; padding must be 'valid', "
                             "'same' or non-negative ints")
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError(f"padding='same' is not allowed with stride={stride}; "
                             "'same' padding needs stride 1, as in nn.Conv2d")
        return padding
    pad = _pair(padding)
    if len(pad) != 2 or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in pad):
        raise ValueError(f"padding={padding!r} is not allowed; padding must be 'valid', 'same' "
                         "or non-negative ints")
    return pad


def _as_cores(result, like):
    return [torch.as_tensor(c).detach().to(dtype=like.dtype, device=like.device).clone()
            for c in result.cores]


def _module_first(cls, module, result):
    """``(module, result)`` of a ``from_result`` call, also from the old order (with a warning)."""
    if isinstance(module, TTResult) and isinstance(result, nn.Module):
        warnings.warn(
            f"{cls.__name__}.from_result(result, module) is deprecated; the order is "
            f"{cls.__name__}.from_result(module, result), as for every factorized layer",
            DeprecationWarning, stacklevel=3)
        return result, module
    return module, result


def _set_bias(layer, bias, shift):
    if layer.bias is None:
        return
    value = torch.zeros_like(layer.bias) if bias is None else bias.detach().to(layer.bias)
    if shift is not None:
        value = value + torch.as_tensor(shift).detach().to(layer.bias).reshape(-1)
    layer.bias.copy_(value)


class _TTChain(nn.Module):
    """Holds ``cores`` (a ParameterList) and ``_modes`` (input modes); applies the chain."""

    def _apply_cores(self, z: torch.Tensor) -> torch.Tensor:
        """Contract ``z`` of shape (batch, S, r_0) with the channel cores; returns (batch, T).

        Core ``k`` maps ``(s_k, r_{k-1})`` to ``(t_k, r_k)`` by one matrix product
        over a batch of (remaining input modes x finished output modes) rows.
        """
        bp = z.shape[0]
        rest = z.shape[1]
        t_done = 1
        r = z.shape[2]
        for i, core in enumerate(self.cores):
            s_k = self._modes[i]
            t_k = core.shape[2]
            r_next = core.shape[3]
            rest = rest // s_k
            z = z.reshape(bp, s_k, rest, t_done, r).permute(0, 2, 3, 1, 4)
            z = z.reshape(bp * rest * t_done, s_k * r)
            g = core.permute(1, 0, 2, 3).reshape(s_k * r, t_k * r_next)
            z = torch.matmul(z, g)
            t_done = t_done * t_k
            r = r_next
        return z.reshape(bp, t_done)


class TTConv2d(_TTChain):
    """Conv2d whose kernel is a Tensor-Train (Garipov's TT-conv).

    Parameters
    ----------
    in_channels, out_channels : int
        ``S = prod(in_modes)``, ``T = prod(out_modes)``.
    kernel_size : int or (int, int)
    in_modes, out_modes : sequence of int
        Paired channel modes (length ``d``).
    ranks : sequence of d int
        ``(r_0, ..., r_{d-1})``; ``r_0`` is the number of spatial filters.
    stride, padding, dilation, bias, padding_mode, device, dtype :
        As for :class:`torch.nn.Conv2d` (``groups=1`` only).

    Attributes
    ----------
    spatial : Parameter of shape (r_0, 1, H, W)
    cores : ParameterList of (r_{k-1}, s_k, t_k, r_k)
    bias : Parameter of shape (T,) or None
    max_chunk_elements : int
        The spatial core's output is ``r_0`` times the layer's input and the
        channel cores' intermediates are of the same order, so in eager mode
        a batch is evaluated in chunks of samples whose largest intermediate
        holds at most this many elements (default ``2**24``, 64 MiB in
        float32; at least one sample per chunk). The output is the same; only
        the peak memory changes. Traced, scripted and compiled graphs evaluate
        the whole batch at once.

    Examples
    --------
    >>> import torch
    >>> from sigmadecomp import tt_conv
    >>> from sigmadecomp_torch.tt_layers import TTConv2d
    >>> conv = torch.nn.Conv2d(8, 4, 3, padding=1).double()
    >>> res = tt_conv(conv.weight.detach(), (3, 4), in_modes=(2, 4), out_modes=(2, 2))
    >>> layer = TTConv2d.from_result(conv, res)
    >>> x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    >>> ref = torch.nn.functional.conv2d(x, res.to_tensor(), conv.bias, padding=1)
    >>> bool(torch.allclose(layer(x), ref, atol=1e-12))
    True
    """

    def __init__(self, in_channels, out_channels, kernel_size, in_modes, out_modes, ranks, *,
                 stride=1, padding=0, dilation=1, bias=True, padding_mode="zeros",
                 device=None, dtype=None):
        super().__init__()
        in_modes, out_modes, ranks = _check_modes_ranks(in_modes, out_modes, ranks, len(in_modes))
        if math.prod(in_modes) != in_channels or math.prod(out_modes) != out_channels:
            raise ValueError(
                f"in_modes={in_modes} / out_modes={out_modes} must multiply to "
                f"in_channels={in_channels} / out_channels={out_channels}"
            )
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(
                f"padding_mode={padding_mode!r} is not allowed; padding_mode must be one of "
                "'zeros', 'reflect', 'replicate', 'circular'"
            )
        fk = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _check_pair(kernel_size, "kernel_size")
        self.stride = _check_pair(stride, "stride")
        self.dilation = _check_pair(dilation, "dilation")
        self.padding = _check_padding(padding, self.stride)
        self.padding_mode = padding_mode
        self.in_modes, self.out_modes, self.ranks = in_modes, out_modes, ranks
        self._modes = list(in_modes)
        self._rev_pad = list(self._reversed_padding())
        kh, kw = self.kernel_size
        self.spatial = nn.Parameter(torch.empty((ranks[0], 1, kh, kw), **fk))
        rr = ranks + (1,)
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty((rr[k], s, t, rr[k + 1]), **fk))
             for k, (s, t) in enumerate(zip(in_modes, out_modes))]
        )
        self.bias = nn.Parameter(torch.zeros(out_channels, **fk)) if bias else None
        with torch.no_grad():
            nn.init.normal_(self.spatial, std=1.0 / math.sqrt(kh * kw))
            for c in self.cores:
                nn.init.normal_(c, std=1.0 / math.sqrt(c.shape[0] * c.shape[1]))

    @classmethod
    def from_result(cls, conv, result, *, bias_shift=None):
        """Build from the conv and a ``tt_conv`` result approximating its kernel.

        Keeps the conv's bias, stride, padding, dilation, padding mode, dtype
        and device; the conv itself is not modified. ``bias_shift`` (shape
        (T,)), if given, is added to the bias (a bias is created if the conv
        has none): the centered-Sigma correction ``b + D mu``. The argument
        order is that of every factorized layer's ``from_result``; the old
        order ``(result, conv)`` still works with a ``DeprecationWarning``.

        Raises
        ------
        ValueError
            If ``conv`` is grouped or its weight shape differs from the result's.
        """
        conv, result = _module_first(cls, conv, result)
        if not isinstance(result, TTResult) or result.kind != "conv":
            raise ValueError("result must be a TTResult of kind 'conv' (from sigmadecomp.tt_conv)")
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv of type {type(conv).__name__} is not allowed; it must be nn.Conv2d")
        if conv.groups != 1:
            raise ValueError(f"conv has groups={conv.groups}; TTConv2d supports groups=1 only")
        if tuple(conv.weight.shape) != tuple(result.shape):
            raise ValueError(
                f"conv.weight has shape {tuple(conv.weight.shape)} but the result approximates "
                f"shape {tuple(result.shape)}"
            )
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, result.in_modes,
                    result.out_modes, result.ranks, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=conv.bias is not None or bias_shift is not None,
                    padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
        cores = _as_cores(result, w)
        kh, kw = conv.kernel_size
        with torch.no_grad():
            layer.spatial.copy_(cores[0].reshape(kh, kw, -1).permute(2, 0, 1).unsqueeze(1))
            for p, c in zip(layer.cores, cores[1:]):
                p.copy_(c)
            _set_bias(layer, conv.bias, bias_shift)
        layer.train(conv.training)
        return layer

    def kernel(self):
        """The equivalent (T, S, H, W) kernel (for checks; the forward never forms it)."""
        kh, kw = self.kernel_size
        g0 = self.spatial.reshape(self.ranks[0], kh * kw).t().reshape(1, kh * kw, 1, self.ranks[0])
        w = tt_matrix([g0] + list(self.cores))  # (T, (h, w, s))
        return w.reshape(self.out_channels, kh, kw, self.in_channels).permute(0, 3, 1, 2)

    max_chunk_elements = 2 ** 24

    def forward(self, x):
        if x.dim() != 3 and x.dim() != 4:
            raise ValueError(f"TTConv2d: expected 3D (unbatched) or 4D (batched) input, "
                             f"got input of shape {list(x.shape)}")
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"TTConv2d: expected input with {self.in_channels} channels, got "
                             f"input of shape {list(x.shape)}")
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
            return self._batched(x.unsqueeze(0)).squeeze(0)
        return self._batched(x)

    def _batched(self, x):
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            chunk = self._chunk_size(x)
            if chunk < x.shape[0]:
                return torch.cat([self._forward(part) for part in torch.split(x, chunk)])
        return self._forward(x)

    @torch.jit.unused
    def _chunk_size(self, x):
        """Samples per chunk in eager mode (the whole batch when compiled)."""
        if torch.compiler.is_compiling():
            return x.shape[0]
        # the output positions of the spatial core (the padding may exceed the kernel)
        pw0, pw1, ph0, ph1 = self._rev_pad
        hp, wp = x.shape[2] + ph0 + ph1, x.shape[3] + pw0 + pw1
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        # at least (H + 2 kh)(W + 2 kw), the historical bound (more when the padding is larger)
        h = max(x.shape[2] + 2 * kh, (hp - dh * (kh - 1) - 1) // sh + 1)
        w = max(x.shape[3] + 2 * kw, (wp - dw * (kw - 1) - 1) // sw + 1)
        widths = [self.in_channels * self.ranks[0]]
        rest, done = self.in_channels, 1
        for s_k, t_k, r_k in zip(self.in_modes, self.out_modes, self.ranks[1:] + (1,)):
            rest, done = rest // s_k, done * t_k
            widths.append(rest * done * r_k)
        per_sample = h * w * max(widths)  # output positions x the widest intermediate
        if self.padding_mode != "zeros":  # the padded copy of the input
            per_sample = max(per_sample, self.in_channels * hp * wp)
        return max(1, int(self.max_chunk_elements) // per_sample)

    def _forward(self, x):
        n, c, h, w = x.shape
        z = x.reshape(n * c, 1, h, w)
        if self.padding_mode != "zeros":
            z = F.pad(z, self._rev_pad, mode=self.padding_mode)
            z = F.conv2d(z, self.spatial, None, self.stride, 0, self.dilation)
        else:
            z = F.conv2d(z, self.spatial, None, self.stride, self.padding, self.dilation)
        r0, ho, wo = z.shape[1], z.shape[2], z.shape[3]
        z = z.reshape(n, c, r0, ho, wo).permute(0, 3, 4, 1, 2).reshape(n * ho * wo, c, r0)
        y = self._apply_cores(z)
        y = y.reshape(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def _reversed_padding(self):
        if isinstance(self.padding, str):  # 'valid' or 'same' (as nn.Conv2d computes it)
            if self.padding == "valid":
                return (0, 0, 0, 0)
            out = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return tuple(out)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}"
                + ("" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"))


class TTLinear(_TTChain):
    """Linear layer whose weight is a TT-matrix (Novikov et al. 2015).

    Parameters
    ----------
    in_features, out_features : int
        ``N = prod(in_modes)``, ``T = prod(out_modes)``.
    in_modes, out_modes : sequence of int
        Paired modes (length ``d``).
    ranks : sequence of d-1 int
    bias, device, dtype :
        As for :class:`torch.nn.Linear`.

    Attributes
    ----------
    cores : ParameterList of (r_{k-1}, s_k, t_k, r_k)
    bias : Parameter of shape (T,) or None

    Examples
    --------
    >>> import torch
    >>> from sigmadecomp import tt_linear
    >>> from sigmadecomp_torch.tt_layers import TTLinear
    >>> lin = torch.nn.Linear(32, 10).double()
    >>> res = tt_linear(lin.weight.detach(), 3, in_modes=(4, 8), out_modes=(2, 5))
    >>> layer = TTLinear.from_result(lin, res)
    >>> layer(torch.randn(7, 32, dtype=torch.float64)).shape
    torch.Size([7, 10])
    """

    def __init__(self, in_features, out_features, in_modes, out_modes, ranks, *, bias=True,
                 device=None, dtype=None):
        super().__init__()
        in_modes, out_modes, ranks = _check_modes_ranks(in_modes, out_modes, ranks,
                                                        len(in_modes) - 1)
        if math.prod(in_modes) != in_features or math.prod(out_modes) != out_features:
            raise ValueError(
                f"in_modes={in_modes} / out_modes={out_modes} must multiply to "
                f"in_features={in_features} / out_features={out_features}"
            )
        fk = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.in_modes, self.out_modes, self.ranks = in_modes, out_modes, ranks
        self._modes = list(in_modes)
        rr = (1,) + ranks + (1,)
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty((rr[k], s, t, rr[k + 1]), **fk))
             for k, (s, t) in enumerate(zip(in_modes, out_modes))]
        )
        self.bias = nn.Parameter(torch.zeros(out_features, **fk)) if bias else None
        with torch.no_grad():
            for c in self.cores:
                nn.init.normal_(c, std=1.0 / math.sqrt(c.shape[0] * c.shape[1]))

    @classmethod
    def from_result(cls, linear, result, *, bias_shift=None):
        """Build from the Linear layer and a ``tt_linear`` result approximating its weight.

        The bias is kept; ``bias_shift`` (shape (T,)), if given, is added to it.
        The old argument order ``(result, linear)`` still works with a
        ``DeprecationWarning``.
        """
        linear, result = _module_first(cls, linear, result)
        if not isinstance(result, TTResult) or result.kind != "matrix":
            raise ValueError("result must be a TTResult of kind 'matrix' (from sigmadecomp.tt_linear)")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear of type {type(linear).__name__} is not allowed; it must be nn.Linear")
        if tuple(linear.weight.shape) != tuple(result.shape):
            raise ValueError(
                f"linear.weight has shape {tuple(linear.weight.shape)} but the result approximates "
                f"shape {tuple(result.shape)}"
            )
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, result.in_modes, result.out_modes,
                    result.ranks, bias=linear.bias is not None or bias_shift is not None,
                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for p, c in zip(layer.cores, _as_cores(result, w)):
                p.copy_(c)
            _set_bias(layer, linear.bias, bias_shift)
        layer.train(linear.training)
        return layer

    def weight(self):
        """The equivalent (T, N) weight (for checks; the forward never forms it)."""
        return tt_matrix(list(self.cores))

    def forward(self, x):
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"TTLinear: expected input with {self.in_features} features in its "
                             f"last dimension, got input of shape {list(x.shape)}")
        out_shape = list(x.shape[:-1])
        out_shape.append(self.out_features)
        z = x.reshape(-1, self.in_features, 1)
        y = self._apply_cores(z)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(out_shape)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, "
                f"bias={self.bias is not None}")


_CORE_OPTS = ("eps", "init", "n_iter_max", "tol", "rng", "callback", "rtol", "ridge", "inner",
              # deprecated spellings, still accepted by the core with a warning
              "dense_max", "cg_rtol", "cg_maxiter", "precond")


def tt_compress_module(module, ranks=None, ratio=None, sigma=None, **opts):
    """Replace an ``nn.Conv2d`` (groups=1) or ``nn.Linear`` by its TT layer.

    The per-layer step of :func:`sigmadecomp_torch.compress` (its
    :func:`~sigmadecomp_torch.compress.decompose_layer`) for one module and a
    plain ``sigma``, with TT-specific extras: the channel modes, and
    multiply-add counts in the returned ``info``. For a model, use
    ``compress(model, 'tt', ...)``.

    Parameters
    ----------
    module : nn.Conv2d or nn.Linear
        Left unchanged.
    ranks : int or sequence of int, optional
        TT ranks (``d`` for a conv, ``d - 1`` for a Linear).
    ratio : float, optional
        Target compression ``params(weight) / params(cores)``; the largest
        uniform rank reaching it (:func:`sigmadecomp.tt.tt_ranks_for_ratio`).
        Give ``ranks`` or ``ratio`` (or ``eps``), not both.
    sigma : array of shape (n, n), optional
        Second moment of the layer input (``n = S*H*W`` in ``(s, h, w)`` order,
        or ``in_features``); runs TT-ALS-Sigma. ``None``: TT-SVD.
    **opts
        ``in_modes``, ``out_modes`` (default: automatic), ``out_hw`` (output
        height, width of a conv, for the multiply-add counts), and the options
        of :func:`sigmadecomp.tt_conv` / :func:`sigmadecomp.tt_linear`
        (``eps``, ``init``, ``n_iter_max``, ``tol``, ``rng``, ``callback``,
        ``rtol``, ``ridge``, ``inner``).

    Returns
    -------
    new_module : TTConv2d or TTLinear
        Same dtype, device, training mode, bias and conv geometry.
    info : dict
        ``method`` ('tt'), ``ranks``, ``in_modes``, ``out_modes``,
        ``params_before`` / ``params_after`` (all parameters, bias included),
        ``macs_before`` / ``macs_after`` (per sample; ``None`` for a conv
        without ``out_hw``), ``rel_sigma_error`` (``None`` without ``sigma``),
        ``rel_frobenius_error``, ``errors``, ``n_iter``, ``converged``,
        ``seconds``, and ``result`` (the :class:`sigmadecomp.TTResult`).

    Examples
    --------
    >>> import torch
    >>> from sigmadecomp_torch.tt_layers import tt_compress_module
    >>> conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    >>> new, info = tt_compress_module(conv, ratio=4, out_hw=(8, 8))
    >>> info["params_before"] / info["params_after"] > 3
    True
    >>> new(torch.randn(1, 16, 8, 8)).shape
    torch.Size([1, 16, 8, 8])
    """
    unknown = set(opts) - set(_CORE_OPTS) - {"in_modes", "out_modes", "out_hw"}
    if unknown:
        raise TypeError(
            f"unexpected options {sorted(unknown)}; allowed: in_modes, out_modes, out_hw, "
            + ", ".join(_CORE_OPTS)
        )
    if ranks is not None and ratio is not None:
        raise ValueError("give ranks or ratio, not both")
    if ratio is not None:
        from .compress import _check_ratio

        ratio = _check_ratio(ratio)
    in_modes, out_modes, out_hw = opts.get("in_modes"), opts.get("out_modes"), opts.get("out_hw")
    if out_hw is not None:
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"out_hw={out_hw!r} is not allowed for a "
                             f"{type(module).__name__}; out_hw (the output height and width "
                             "for the multiply-add counts) applies to an nn.Conv2d")
        if not is_positive_int_tuple(out_hw, 2):
            raise ValueError(f"out_hw={out_hw!r} is not allowed; out_hw must be a pair of "
                             "positive integers (H, W), the conv's output size")
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"module has groups={module.groups}; TT compression supports groups=1 only")
        T, S, kh, kw = module.weight.shape
        ks = (kh, kw)
    elif isinstance(module, nn.Linear):
        T, S = module.weight.shape
        ks = None
    else:
        raise TypeError(
            f"module of type {type(module).__name__} is not allowed; it must be nn.Conv2d or nn.Linear"
        )
    if in_modes is None and out_modes is None:
        in_modes, out_modes = auto_modes(S, T)
    elif in_modes is None or out_modes is None:
        d = len(tuple(out_modes if in_modes is None else in_modes))
        in_modes = tt_modes(S, d) if in_modes is None else tuple(in_modes)
        out_modes = tt_modes(T, d) if out_modes is None else tuple(out_modes)
    if ratio is not None:
        ranks = tt_ranks_for_ratio(in_modes, out_modes, ratio, kernel_size=ks)
    # the one per-layer step of compress: decompose, build, measure
    from .compress import LayerPlan, decompose_layer
    from .selection import module_kind

    W64 = module.weight.detach().to(torch.float64)
    sigma = prepare_sigma(sigma, like=W64)
    options = {k: opts[k] for k in _CORE_OPTS if k in opts}
    options.update(in_modes=tuple(in_modes), out_modes=tuple(out_modes))
    plan = LayerPlan(name="", module=module, kind=module_kind(module), method="tt",
                     sigma=sigma, sigma_full=None if sigma is None else sigma.matrix,
                     ranks=ranks, options=options)
    new, row, result = decompose_layer(plan)
    if ks is not None:
        if out_hw is None:
            macs_before = macs_after = None
        else:
            pos = int(out_hw[0]) * int(out_hw[1])
            macs_before = T * S * kh * kw * pos
            macs_after = tt_mac_count(result.in_modes, result.out_modes, result.ranks,
                                      kernel_size=ks, out_hw=out_hw)
    else:
        macs_before = T * S
        macs_after = tt_mac_count(result.in_modes, result.out_modes, result.ranks)
    info = {
        "method": "tt",
        "ranks": result.ranks,
        "in_modes": result.in_modes,
        "out_modes": result.out_modes,
        "params_before": row["params_before"],
        "params_after": row["params_after"],
        "macs_before": macs_before,
        "macs_after": macs_after,
        "rel_sigma_error": row["sigma_error"],
        "rel_frobenius_error": row["frobenius_error"],
        "errors": list(result.errors),
        "n_iter": result.n_iter,
        "converged": result.converged,
        "seconds": row["seconds"],
        "result": result,
    }
    return new, info


def tt_decompose(weight, ranks, sigma=None, options=None):
    """``tt_conv`` for a 4-D weight, ``tt_linear`` for a 2-D one (automatic modes).

    The plug-in form ``(weight, ranks, sigma, options) -> result`` of a layer
    format: ``options`` holds keyword arguments of the core function
    (``in_modes`` / ``out_modes`` included).

    Examples
    --------
    >>> import torch
    >>> from sigmadecomp_torch.tt_layers import tt_decompose
    >>> tt_decompose(torch.randn(16, 8, 3, 3, dtype=torch.float64), 4).ranks
    (4, 4)
    """
    options = dict(options or {})
    if weight.ndim == 4:
        return tt_conv(weight, ranks, sigma, **options)
    if weight.ndim == 2:
        return tt_linear(weight, ranks, sigma, **options)
    raise ValueError(f"weight has ndim={weight.ndim}; it must be 4 (conv) or 2 (Linear)")


def tt_build(module, result, bias_shift=None):
    """The TT layer replacing ``module`` (its ``from_result``), the plug-in form of a format."""
    if isinstance(module, nn.Conv2d):
        return TTConv2d.from_result(module, result, bias_shift=bias_shift)
    if isinstance(module, nn.Linear):
        return TTLinear.from_result(module, result, bias_shift=bias_shift)
    raise TypeError(
        f"module of type {type(module).__name__} is not allowed; it must be nn.Conv2d or nn.Linear"
    )
