"""Tensor-Train layers (Garipov et al. 2016; Novikov et al. 2015) built from plain torch ops.

:class:`TTConv2d` evaluates a TT-conv kernel without forming it: the spatial
core is a convolution of every input channel, reshaped to a single-channel
image, with ``r_0`` filters (the conv's stride, padding and dilation); then
each channel core ``G_k`` (``r_{k-1} x s_k x t_k x r_k``) contracts the input
mode ``s_k`` and rank ``r_{k-1}`` into the output mode ``t_k`` and rank ``r_k``
as one batched matrix product. :class:`TTLinear` is the same chain without the
spatial core. Only ``reshape``, ``permute``, ``matmul`` and ``conv2d`` are used,
so the layers trace, script and export like any other module.

The chain is cheap in parameters, not always in compute: at the ranks of
usual compression ratios it costs more multiply-adds than the dense layer.
Both layers therefore have an ``evaluation`` setting (a constructor keyword
and a plain attribute that may be changed on a built model):

* ``'chain'`` -- the chain above;
* ``'kernel'`` -- multiply the cores out into the dense kernel / weight
  inside the forward (differentiably, once per call), then one ``conv2d`` /
  ``linear``. When no gradient is taken through the cores (inference under
  ``torch.no_grad()`` / ``torch.inference_mode()``, or frozen cores), the
  built kernel is kept and reused by later calls until a core changes (its
  storage or version counter: an optimizer step, ``load_state_dict``,
  ``.to()``), so they cost the dense layer only; meanwhile the layer holds one
  dense weight (not saved with the model; ``keep_kernel = False`` on a layer,
  or on the class, builds it in every call instead). Traced and compiled
  graphs build it in each call;
* ``'auto'`` (default) -- per call, the path with fewer predicted
  multiply-adds for the call's input shape: with ``P`` the number of output
  positions of the call (batch x output height x width for the conv, the
  number of input rows for the Linear), the kernel path is taken when
  ``build + P * dense < P * chain`` (``build``: contracting the cores into the
  kernel, counted as 0 when the kernel is kept for later calls, i.e. in
  inference, where it is paid once; ``dense``: the dense layer per
  position; ``chain``: the chain per
  position, :func:`sigmadecomp.tt.tt_mac_count`), the chain otherwise. The
  counts are integer arithmetic on the shapes only. A traced graph keeps the
  path chosen for the example input.

Both layers compute exactly the layer with the reconstructed weight
(``TTResult.to_tensor()``), up to floating-point rounding, whichever path runs.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import List

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


_EVALUATIONS = ("auto", "chain", "kernel")


def _check_evaluation(value):
    if not isinstance(value, str) or value not in _EVALUATIONS:
        raise ValueError(f"evaluation={value!r} is not allowed; evaluation must be one of "
                         "'auto', 'chain', 'kernel'")
    return value


class _TTChain(nn.Module):
    """Holds ``cores`` (a ParameterList) and ``_modes`` (input modes); applies the chain.

    Also the evaluation choice shared by both layers: the multiply-add counts
    of the chain and of the kernel path, and the contraction of the cores
    into the dense kernel.
    """

    # class default: modules pickled before the setting existed evaluate as 'auto'
    evaluation = "auto"
    #: Keep the kernel the kernel path built when no gradient is taken through the cores
    #: and reuse it while they are unchanged (inference speed for one dense weight of
    #: memory); False builds it in every call.
    keep_kernel = True

    def __setattr__(self, name, value):
        if name == "evaluation":
            value = _check_evaluation(value)
        super().__setattr__(name, value)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_costs" not in self.__dict__:  # pickled before the evaluation setting existed
            self._set_costs()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_kernel_reuse", None)  # a kept kernel is rebuilt, never stored
        return state

    def _build(self) -> torch.Tensor:
        """The dense weight of the kernel path (differentiable); per layer type."""
        raise NotImplementedError

    def _factors(self) -> List[torch.Tensor]:
        """The parameters the dense weight is built from."""
        return list(self.cores)

    @torch.jit.unused
    def _reuse_key(self):
        """What a kept kernel must match to be used again, or None when it may not be kept:
        gradients are taken through the cores, or a graph is traced or compiled. The key
        holds each factor's storage and version counter (in-place updates and ``.to()``
        change them) and the inference-mode flag (an inference-mode tensor must not meet
        autograd outside it)."""
        if not self.keep_kernel or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        factors = self._factors()
        if torch.is_grad_enabled() and any(p.requires_grad for p in factors):
            return None
        return (torch.is_inference_mode_enabled(),) + tuple(
            (p.data_ptr(), p._version, p.dtype, p.device) for p in factors)

    @torch.jit.unused
    def _kept(self):
        """The kernel kept by an earlier call, if it is still valid (else None)."""
        kept = self.__dict__.get("_kernel_reuse")
        if kept is None:
            return None
        key = self._reuse_key()
        return kept[1] if key is not None and kept[0] == key else None

    @torch.jit.unused
    def _reused(self) -> torch.Tensor:
        """The dense weight for the kernel path: the kept one when valid, else a new one,
        kept when no gradient is taken through the cores (inference: repeated calls then
        cost the dense layer only; the layer holds one dense weight meanwhile)."""
        kept = self._kept()
        if kept is not None:
            return kept
        w = self._build()
        key = self._reuse_key()
        self.__dict__["_kernel_reuse"] = None if key is None else (key, w)
        return w

    def _dense_for_call(self) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._build()
        return self._reused()

    def _reusable(self) -> bool:
        """Whether a kernel built now would be kept for later calls (or is kept already):
        its build is then paid once, not per call."""
        if torch.jit.is_scripting():
            return False
        return self._reuse_key() is not None

    def _set_costs(self):
        self._costs = _evaluation_costs(self._lead_dims(), self.in_modes, self.out_modes,
                                        self._bond_ranks(), self._spatial_macs())

    def _lead_dims(self) -> int:
        """Rows of the leading factor of the kernel (``kh * kw`` for a conv, 1 for a Linear)."""
        return 1

    def _bond_ranks(self):
        return (1,) + tuple(self.ranks) + (1,)

    def _spatial_macs(self) -> int:
        return 0

    def _use_kernel(self, positions: int, kept: bool = False) -> bool:
        """Whether a call with ``positions`` output positions runs the kernel path (``kept``:
        the kernel is or will be kept for later calls, so its build is not paid per call)."""
        if self.evaluation == "kernel":
            return True
        if self.evaluation == "chain":
            return False
        build = 0 if kept else self._costs[1]
        return build + positions * self._costs[2] < positions * self._costs[0]

    def _path_macs(self, positions: int, kept: bool = False):
        """``(path, multiply-adds)`` of one call with ``positions`` output positions (``kept``:
        an inference call once the kernel is kept, which costs no build)."""
        if self._use_kernel(positions, kept):
            return "kernel", (0 if kept else self._costs[1]) + positions * self._costs[2]
        return "chain", positions * self._costs[0]

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

    def _contract(self, lead: torch.Tensor) -> torch.Tensor:
        """The dense weight as (T, N, lead rows) from ``lead`` of shape (lead rows, r_0).

        The cores before the split bond (``_costs[3]``) are appended to ``lead``
        left to right, those after it are multiplied right to left, then the
        two parts are joined by one matrix product over the split bond; every
        step is one matrix product. The rows end in the order
        (lead, s_1, t_1, ..., s_d, t_d), then are permuted to (t, s, lead).
        """
        split = self._costs[3]
        cores: List[torch.Tensor] = []
        for core in self.cores:
            cores.append(core)
        d = len(cores)
        cur = lead
        for k in range(split):
            r = cores[k].shape[0]
            cur = torch.matmul(cur.reshape(-1, r), cores[k].reshape(r, -1))
        if split < d:
            last = cores[d - 1]
            right = last.reshape(last.shape[0], -1)  # (r_{d-1}, s_d t_d)
            k = d - 2
            while k >= split:
                c = cores[k]
                right = torch.matmul(c.reshape(-1, c.shape[3]), right).reshape(c.shape[0], -1)
                k -= 1
            cur = torch.matmul(cur.reshape(-1, right.shape[0]), right)
        shape = [lead.shape[0]]
        n_out = 1
        n_in = 1
        for c in cores:
            shape.append(c.shape[1])
            shape.append(c.shape[2])
            n_in = n_in * c.shape[1]
            n_out = n_out * c.shape[2]
        perm = [2 * k + 2 for k in range(d)] + [2 * k + 1 for k in range(d)] + [0]
        return cur.reshape(shape).permute(perm).reshape(n_out, n_in, lead.shape[0])


def _evaluation_costs(lead, in_modes, out_modes, rr, spatial):
    """``[chain, build, dense, split]`` multiply-adds of a TT layer's two paths.

    ``chain``: the chain per output position (``spatial``, the spatial core's
    share, included), as :func:`sigmadecomp.tt.tt_mac_count`; ``dense``: the
    dense layer per position; ``build``: the cheapest contraction of the
    cores into the dense weight over the orders of :meth:`_TTChain._contract`
    (``lead`` rows of the leading factor, bond ranks ``rr = (r_0, ..., r_d)``
    with ``r_d = 1``), and ``split`` the bond of that order.
    """
    d = len(in_modes)
    sizes = [s * t for s, t in zip(in_modes, out_modes)]
    rest, done, chain = math.prod(in_modes), 1, spatial
    for k, (s, t) in enumerate(zip(in_modes, out_modes)):
        rest //= s
        chain += rest * done * s * rr[k] * t * rr[k + 1]
        done *= t
    best = None
    for split in range(d + 1):
        cost, rows = 0, lead
        for k in range(split):  # left to right
            cost += rows * rr[k] * sizes[k] * rr[k + 1]
            rows *= sizes[k]
        cols = sizes[d - 1] if split < d else 1
        for k in range(d - 2, split - 1, -1):  # right to left
            cost += rr[k] * sizes[k] * rr[k + 1] * cols
            cols *= sizes[k]
        if split < d:  # the join over bond ``split``
            cost += rows * rr[split] * cols
        if best is None or cost < best[0]:
            best = (cost, split)
    return [chain, best[0], lead * math.prod(sizes), best[1]]


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
    evaluation : {'auto', 'chain', 'kernel'}, default 'auto'
        How the forward runs (see the module docstring): the TT chain, the
        dense kernel formed from the cores, or per call the one with fewer
        multiply-adds for the input's shape. Also a plain attribute.

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
        the whole batch at once. Only the chain is chunked: the kernel path
        is one dense convolution.

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
                 device=None, dtype=None, evaluation="auto"):
        super().__init__()
        self.evaluation = evaluation
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
        self._set_costs()

    @classmethod
    def from_result(cls, conv, result, *, bias_shift=None, evaluation="auto"):
        """Build from the conv and a ``tt_conv`` result approximating its kernel.

        Keeps the conv's bias, stride, padding, dilation, padding mode, dtype
        and device; the conv itself is not modified. ``bias_shift`` (shape
        (T,)), if given, is added to the bias (a bias is created if the conv
        has none): the centered-Sigma correction ``b + D mu``. ``evaluation``
        is the layer's setting (``'auto'``, ``'chain'`` or ``'kernel'``). The
        argument order is that of every factorized layer's ``from_result``;
        the old order ``(result, conv)`` still works with a
        ``DeprecationWarning``.

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
                    padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype,
                    evaluation=evaluation)
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
        """The equivalent (T, S, H, W) kernel (for checks; the kernel path forms it itself)."""
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

    def _lead_dims(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def _bond_ranks(self):
        return tuple(self.ranks) + (1,)

    def _spatial_macs(self) -> int:
        return self.in_channels * self.ranks[0] * self.kernel_size[0] * self.kernel_size[1]

    def _out_positions(self, n: int, h: int, w: int) -> int:
        """Output positions (batch x height x width) for an input of ``n`` x ``h`` x ``w``."""
        pad = self._rev_pad  # (left, right, top, bottom)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho = (h + pad[2] + pad[3] - dh * (kh - 1) - 1) // sh + 1
        wo = (w + pad[0] + pad[1] - dw * (kw - 1) - 1) // sw + 1
        return n * max(ho, 0) * max(wo, 0)

    def _dense_kernel(self):
        """The (T, S, H, W) kernel contracted from the cores (differentiable, scriptable)."""
        kh, kw = self.kernel_size[0], self.kernel_size[1]
        lead = self.spatial.reshape(self.spatial.shape[0], kh * kw).t()
        w = self._contract(lead)  # (T, S, kh kw)
        return w.reshape(w.shape[0], w.shape[1], kh, kw)

    def _factors(self) -> List[torch.Tensor]:
        return [self.spatial] + list(self.cores)

    def _build(self) -> torch.Tensor:
        return self._dense_kernel()

    def _forward_kernel(self, x):
        w = self._dense_for_call()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._rev_pad, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)

    def _batched(self, x):
        if self.evaluation == "kernel" or (self.evaluation == "auto" and self._use_kernel(
                self._out_positions(x.shape[0], x.shape[2], x.shape[3]), self._reusable())):
            return self._forward_kernel(x)
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
                + ("" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}")
                + f", evaluation={self.evaluation!r}")


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
    evaluation : {'auto', 'chain', 'kernel'}, default 'auto'
        As for :class:`TTConv2d`; the positions of a call are its input rows.

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
                 device=None, dtype=None, evaluation="auto"):
        super().__init__()
        self.evaluation = evaluation
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
        self._set_costs()

    @classmethod
    def from_result(cls, linear, result, *, bias_shift=None, evaluation="auto"):
        """Build from the Linear layer and a ``tt_linear`` result approximating its weight.

        The bias is kept; ``bias_shift`` (shape (T,)), if given, is added to it.
        ``evaluation`` is the layer's setting (``'auto'``, ``'chain'`` or ``'kernel'``).
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
                    device=w.device, dtype=w.dtype, evaluation=evaluation)
        with torch.no_grad():
            for p, c in zip(layer.cores, _as_cores(result, w)):
                p.copy_(c)
            _set_bias(layer, linear.bias, bias_shift)
        layer.train(linear.training)
        return layer

    def weight(self):
        """The equivalent (T, N) weight (for checks; the kernel path forms it itself)."""
        return tt_matrix(list(self.cores))

    def _dense_weight(self):
        """The (T, N) weight contracted from the cores (differentiable, scriptable)."""
        core = self.cores[0]
        lead = torch.ones((1, 1), dtype=core.dtype, device=core.device)
        w = self._contract(lead)  # (T, N, 1)
        return w.reshape(w.shape[0], w.shape[1])

    def _build(self) -> torch.Tensor:
        return self._dense_weight()

    def forward(self, x):
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"TTLinear: expected input with {self.in_features} features in its "
                             f"last dimension, got input of shape {list(x.shape)}")
        out_shape = list(x.shape[:-1])
        if self.evaluation != "chain":
            rows = 1
            for n in out_shape:
                rows = rows * n
            if self._use_kernel(rows, self._reusable()):
                return F.linear(x, self._dense_for_call(), self.bias)
        out_shape.append(self.out_features)
        z = x.reshape(-1, self.in_features, 1)
        y = self._apply_cores(z)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(out_shape)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, "
                f"bias={self.bias is not None}, evaluation={self.evaluation!r}")


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
        height, width of a conv, for the multiply-add counts), ``evaluation``
        (the new layer's setting, ``'auto'`` by default), and the options
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
        ``macs_before`` / ``macs_after`` (for one sample, a batch of 1, at
        ``out_hw`` for a conv; ``None`` for a conv without ``out_hw``),
        ``evaluation`` (the path whose cost ``macs_after`` is: ``'chain'``
        (:func:`sigmadecomp.tt.tt_mac_count`) or ``'kernel'`` (contracting the
        cores, then the dense layer); with ``evaluation='auto'`` the path the
        layer takes for that input in a call with gradients through the
        cores (training: the kernel is built in every call); ``None`` when
        ``macs_after`` is), ``macs_inference`` and ``evaluation_inference``
        (the same for an inference call once the kernel is kept: no build;
        the first inference call also builds it, see the module docstring),
        ``rel_sigma_error`` (``None`` without ``sigma``),
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
    unknown = set(opts) - set(_CORE_OPTS) - {"in_modes", "out_modes", "out_hw", "evaluation"}
    if unknown:
        raise TypeError(
            f"unexpected options {sorted(unknown)}; allowed: in_modes, out_modes, out_hw, "
            "evaluation, " + ", ".join(_CORE_OPTS)
        )
    evaluation = _check_evaluation(opts.get("evaluation", "auto"))
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
    new.evaluation = evaluation
    path = kept_path = macs_kept = None
    if ks is not None:
        if out_hw is None:
            macs_before = macs_after = None
        else:
            pos = int(out_hw[0]) * int(out_hw[1])
            macs_before = T * S * kh * kw * pos
            path, macs_after = new._path_macs(pos)
            kept_path, macs_kept = new._path_macs(pos, kept=True)
            chain = tt_mac_count(result.in_modes, result.out_modes, result.ranks,
                                 kernel_size=ks, out_hw=out_hw)
    else:
        macs_before = T * S
        path, macs_after = new._path_macs(1)
        kept_path, macs_kept = new._path_macs(1, kept=True)
        chain = tt_mac_count(result.in_modes, result.out_modes, result.ranks)
    if path == "chain":
        macs_after = chain
    if kept_path == "chain":
        macs_kept = chain
    info = {
        "method": "tt",
        "ranks": result.ranks,
        "in_modes": result.in_modes,
        "out_modes": result.out_modes,
        "params_before": row["params_before"],
        "params_after": row["params_after"],
        "macs_before": macs_before,
        "macs_after": macs_after,
        "evaluation": path,
        "macs_inference": macs_kept,
        "evaluation_inference": kept_path,
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
