"""Error-compensating sequential compression.

One-shot statistics fit every layer to its input in the *original* model.
Once earlier layers are compressed, a layer sees another input, and its own
error adds to theirs. Sequential compression fits the layers in network
order, each to the inputs it will really get:

    minimise over K~   E || K x_o - K~ x_c ||^2

with ``x_o`` a layer's input patch in the original model and ``x_c`` the same
patch in the model whose earlier layers are already compressed. With
``Sigma_cc = E[x_c x_c^T]`` and ``Sigma_oc = E[x_o x_c^T]``,

    E || K x_o - K~ x_c ||^2 = || (K~ - K') Sigma_cc^{1/2} ||_F^2 + const,
    K' = K Sigma_oc Sigma_cc^+,

so every Sigma decomposition applies unchanged to the corrected target
``K'`` in the metric ``Sigma_cc`` (``const = E||K x_o||^2 - tr(K' Sigma_cc
K'^T)`` does not depend on ``K~``). The pseudo-inverse follows the package's
eigenvalue floor (:func:`sigmadecomp.sigma.psd_solve`): directions of
``Sigma_cc`` below ``1e-10 * lambda_max`` are treated as absent, and ``K'``
has no component along them.

Centered variant: with a free bias ``b~`` the best one is
``b~ = b + K mu_o - K~ mu_c`` and the error becomes
``E || K (x_o - mu_o) - K~ (x_c - mu_c) ||^2``, the same problem in the
centered moments ``C_cc = Sigma_cc - mu_c mu_c^T`` and
``C_oc = Sigma_oc - mu_o mu_c^T``: target ``K'_c = K C_oc C_cc^+``, metric
``C_cc``, and that bias.

The statistics need the original and the partly compressed model run side
by side on the same batches (:func:`collect_cross_covariances`);
:func:`sequential_compress` does so once per group of layers whose inputs do
not depend on each other, and compresses each group with
:func:`sigmadecomp_torch.compress`.

One concept, error-compensating sequential compression (its cross-moment
statistics, the corrected target and the layer-by-layer driver belong
together); longer than most modules for that reason.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigmadecomp.exceptions import CompressionWarning
from sigmadecomp.sigma import DEFAULT_RIDGE, psd_solve

from ._batches import (as_batches, batch_mask, check_device, check_not_meta, check_not_nested,
                       check_pass_options, check_type, eval_modes, model_device,
                       outside_inference_mode, progress_bar, run_batch, token_rows,
                       user_stacklevel, warn_mask_use)
from .covariance import LayerStats, select_layers
from .parallel import agree, checking, first_given, resolve_group
from .selection import dense_reasons, obstacle, param_owners

__all__ = ["CrossStats", "collect_cross_covariances", "corrected_target",
           "sequential_compress", "refit_after"]

_DEFAULT_CHUNK_BYTES = 1 << 26


# ------------------------------------------------------------------ statistics


@dataclass(repr=False, eq=False)
class CrossStats:
    """Joint input statistics of one layer in the original and the compressed model.

    Attributes
    ----------
    sigma_cc : torch.Tensor of shape (n, n)
        ``E[x_c x_c^T]``: second moment of the layer's input patches in the
        compressed model (float64).
    sigma_oc : torch.Tensor of shape (n, n)
        ``E[x_o x_c^T]``: cross moment of the original and the compressed
        model's patches (float64; not symmetric).
    mean_o, mean_c : torch.Tensor of shape (n,)
        Mean patch in the original and in the compressed model.
    count : int
        Number of patch pairs averaged.
    output_energy : float
        ``E || K x_o ||^2`` with the original layer's weight ``K`` (the
        squared output norm, bias excluded, that relative errors refer to).
    layer : str
        ``repr`` of the original module.

    Examples
    --------
    >>> import torch
    >>> e = torch.eye(2, dtype=torch.float64)
    >>> z = torch.zeros(2, dtype=torch.float64)
    >>> s = CrossStats(e, 0.5 * e, z, z, 10, 1.0)
    >>> s.layer_stats().sigma.tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """

    sigma_cc: torch.Tensor
    sigma_oc: torch.Tensor
    mean_o: torch.Tensor
    mean_c: torch.Tensor
    count: int
    output_energy: float
    layer: str = ""

    @property
    def n(self):
        """Dimension of one input patch."""
        return int(self.sigma_cc.shape[-1])

    def layer_stats(self):
        """``Sigma_cc`` and ``mu_c`` as a :class:`LayerStats` (the metric of the fit)."""
        return LayerStats(self.sigma_cc, self.mean_c, self.count, layer=self.layer)

    def __repr__(self):
        return (f"CrossStats(n={self.n}, count={self.count}, "
                f"output_energy={self.output_energy:.4g}, layer={self.layer!r})")


def _output_size(module, x):
    """``(H_out, W_out)`` of the Conv2d ``module`` on the input ``x`` (N, C, H, W)."""
    left, right, top, bottom = module._reversed_padding_repeated_twice
    out = []
    for size, k, d, st in zip((x.shape[-2] + top + bottom, x.shape[-1] + left + right),
                              module.kernel_size, module.dilation, module.stride):
        out.append((size - d * (k - 1) - 1) // st + 1)
    return tuple(out)


def _patch_rows(module, x, name, rows=None):
    """The (M, n) patch rows of a Conv2d/Linear input, in (s, h, w) order; for a conv,
    ``rows=(r0, r1)`` keeps the output rows ``r0 <= r < r1`` only (from the input rows
    they read), so that a large feature map is taken in parts."""
    if isinstance(module, nn.Conv2d):
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != module.in_channels:
            raise ValueError(f"layer {name!r}: input has shape {tuple(x.shape)}; this Conv2d "
                             f"needs inputs of shape (N, {module.in_channels}, H, W)")
        pad = list(module._reversed_padding_repeated_twice)
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pad, mode=mode)
        if rows is not None:
            r0, r1 = rows
            st, d, k = module.stride[0], module.dilation[0], module.kernel_size[0]
            x = x[:, :, r0 * st:(r1 - 1) * st + d * (k - 1) + 1]
        U = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return U.transpose(1, 2).reshape(-1, U.shape[1])
    n = module.in_features
    if x.shape[-1] != n:
        raise ValueError(f"layer {name!r}: input has shape {tuple(x.shape)}; a Linear layer "
                         f"with in_features={n} needs inputs of shape (..., {n})")
    return x.reshape(-1, n)


class _CrossAccumulator:
    """Float64 sums of ``x_c x_c^T``, ``x_o x_c^T``, ``x_o``, ``x_c``, ``||K x_o||^2``.

    The hook on the original module queues its inputs; the hook on the
    compressed model's module pairs each of its inputs with the queued one of
    the same call (calls are matched in order within a batch).
    """

    def __init__(self, name, module, chunk_bytes):
        self.name = name
        self.module = module
        self.is_conv = isinstance(module, nn.Conv2d)
        w = module.weight.detach()
        self.device = w.device
        self.K = w.reshape(w.shape[0], -1).to(torch.float64)
        n = self.K.shape[1]
        self.n = n
        self.chunk_bytes = int(chunk_bytes)
        self.cc = torch.zeros((n, n), dtype=torch.float64, device=self.device)
        self.oc = torch.zeros((n, n), dtype=torch.float64, device=self.device)
        self.so = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.sc = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.energy = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = 0
        self.queue = []
        self.mask = None
        self.mask_used = False  # whether a token mask applied to this layer's input
        self.square_mask = None  # (name, shape) of the first ambiguous square mask
        self.changed = False  # whether any input differed between the two models
        self.calls = 0  # pairs of calls seen (a masked-out call adds no rows)

    def hook_original(self, module, args, kwargs=None):
        self.queue.append(self._input(args, kwargs).detach())

    def hook_compressed(self, module, args, kwargs=None):
        xc = self._input(args, kwargs).detach()
        if not self.queue:
            raise RuntimeError(f"layer {self.name!r} ran more often in the compressed model "
                               "than in the original one in the same batch; the two "
                               "forward passes must call it the same number of times")
        xo = self.queue.pop(0)
        self.calls += 1
        if xo.shape != xc.shape:
            raise ValueError(f"layer {self.name!r}: input of shape {tuple(xc.shape)} in the "
                             f"compressed model, {tuple(xo.shape)} in the original")
        if not self.changed and not torch.equal(xo, xc):
            self.changed = True
        self._add(xo, xc)

    def _input(self, args, kwargs=None):
        # (a layer may be called with its input as a keyword: layer(input=x))
        x = args[0] if args else (kwargs or {}).get("input")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"layer {self.name!r}: the input is not a tensor (got "
                            f"{type(x).__name__})")
        check_not_nested(x, self.name)
        if not x.is_floating_point():
            raise TypeError(f"layer {self.name!r}: input has dtype {x.dtype}; a floating "
                            "point input is required")
        return x

    def _add(self, xo, xc):
        if not self.is_conv:
            xo, used, square = token_rows(xo, self.mask)
            xc = token_rows(xc, self.mask)[0]
            self.mask_used = self.mask_used or used
            if square and self.square_mask is None:
                self.square_mask = (self.name, tuple(self.mask.shape))
        if not (bool(torch.isfinite(xo).all()) and bool(torch.isfinite(xc).all())):
            raise ValueError(f"layer {self.name!r}: its input contains NaN or inf values; "
                             "statistics need finite activations")
        if self.is_conv:
            if xo.ndim == 3:
                xo, xc = xo.unsqueeze(0), xc.unsqueeze(0)
            if xo.shape[0] == 0:  # a batch without samples adds nothing
                return
            m = self.module
            per = max(1, xo[0].numel() * self.n // max(1, m.in_channels))  # rough patch size
            if 8 * 2 * per <= self.chunk_bytes:  # whole samples per chunk
                step = max(1, self.chunk_bytes // (8 * 2 * per))
                for i in range(0, xo.shape[0], step):
                    self._rows(_patch_rows(m, xo[i:i + step], self.name),
                               _patch_rows(m, xc[i:i + step], self.name))
                return
            # one sample's patches exceed the cap: blocks of output rows of one sample
            h_out, w_out = _output_size(m, xo)
            block = max(1, self.chunk_bytes // (8 * 2 * max(1, w_out) * self.n))
            for i in range(xo.shape[0]):
                for r0 in range(0, h_out, block):
                    rows = (r0, min(h_out, r0 + block))
                    self._rows(_patch_rows(m, xo[i:i + 1], self.name, rows),
                               _patch_rows(m, xc[i:i + 1], self.name, rows))
        else:
            Xo = _patch_rows(self.module, xo, self.name)
            Xc = _patch_rows(self.module, xc, self.name)
            step = max(1, self.chunk_bytes // (8 * 2 * self.n))
            for i in range(0, Xo.shape[0], step):
                self._rows(Xo[i:i + step], Xc[i:i + step])

    def _rows(self, Xo, Xc):
        Xo = Xo.to(self.device, torch.float64)
        Xc = Xc.to(self.device, torch.float64)
        self.cc += Xc.T @ Xc
        self.oc += Xo.T @ Xc
        self.so += Xo.sum(0)
        self.sc += Xc.sum(0)
        Y = Xo @ self.K.T
        self.energy += (Y * Y).sum()
        self.count += int(Xo.shape[0])

    def all_reduce(self):
        import torch.distributed as dist

        cnt = torch.tensor([float(self.count), float(self.changed), float(self.calls)],
                           dtype=torch.float64, device=self.device)
        for t in (self.cc, self.oc, self.so, self.sc, self.energy, cnt):
            dist.all_reduce(t)
        self.count = int(round(float(cnt[0].item())))
        self.changed = bool(cnt[1].item() > 0)
        self.calls = int(round(float(cnt[2].item())))

    def result(self):
        c = self.count
        if c == 0:
            what = ("ran, but none of its input rows entered the statistics (a token mask "
                    "that is zero everywhere)" if self.calls else "never ran in the forward "
                    "pass")
            raise ValueError(f"layer {self.name!r} {what}; no statistics for it")
        cc = self.cc / c
        cc = 0.5 * (cc + cc.T)
        return CrossStats(cc, self.oc / c, self.so / c, self.sc / c, c,
                          float(self.energy) / c, repr(self.module))


class _OutputAccumulator:
    """``E||y_o - y_c||^2`` of one layer's outputs (original vs compressed model).

    ``linear``: the layer is an ``nn.Linear`` (output features on the last axis; the
    token mask of the batch, ``mask``, keeps padded tokens out as in the statistics),
    else a conv (channels on axis 1, no mask).
    """

    def __init__(self, name, bias, linear=False):
        self.name = name
        self.bias = bias
        self.linear = bool(linear)
        self.mask = None  # the token mask of the current batch (set by _run_pair)
        self.queue = []
        self.diff = 0.0
        self.energy = 0.0
        self.count = 0
        #: why the calls of the two models did not pair up (then no error is reported)
        self.unpaired = None

    def hook_original(self, module, args, out):
        self.queue.append(out.detach())

    def hook_compressed(self, module, args, out):
        if not self.queue:
            self.unpaired = "it ran more often in the compressed model than in the original"
            return
        yo = self.queue.pop(0).to(torch.float64)
        yc = out.detach().to(torch.float64)
        if yo.shape != yc.shape:
            self.unpaired = (f"its output has shape {tuple(yc.shape)} in the compressed "
                             f"model, {tuple(yo.shape)} in the original")
            return
        if self.linear:  # the real tokens only, as the statistics count them
            yo = token_rows(yo, self.mask)[0]
            yc = token_rows(yc, self.mask)[0]
        self.diff += float(((yo - yc) ** 2).sum())
        ref = yo
        if self.bias is not None:
            shape = [1] * yo.ndim
            shape[-1 if self.linear else 1] = -1  # (a Linear's features come last)
            ref = yo - self.bias.to(yo).reshape(shape)
        self.energy += float((ref * ref).sum())
        self.count += 1

    def end_batch(self):
        """After a batch: calls of the original left without a partner unpair the layer."""
        if self.queue:
            self.unpaired = "it ran more often in the original model than in the compressed"
            self.queue = []

    def all_reduce(self, device):
        import torch.distributed as dist

        t = torch.tensor([self.diff, self.energy, float(self.count),
                          float(self.unpaired is not None)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        self.diff, self.energy = float(t[0]), float(t[1])
        self.count = int(round(float(t[2])))  # (a process without batches has none)
        if t[3] > 0 and self.unpaired is None:
            self.unpaired = "its calls did not pair up on another process"

    def relative(self):
        """The relative output error; None without paired calls, or when they did not pair
        up (a forward pass whose control flow changed with the compression)."""
        if self.count == 0 or self.unpaired is not None:
            return None
        if self.energy <= 0:
            return 0.0 if self.diff == 0 else math.inf
        return math.sqrt(self.diff / self.energy)


def _check_pass(chunk_bytes, forward, mask, max_batches):
    """The options of the passes over the data (as :func:`collect_covariances` checks them)."""
    check_pass_options(chunk_bytes=chunk_bytes, forward=forward, mask=mask,
                       max_batches=max_batches)


def _check_reiterable(data, name="data"):
    if isinstance(data, (torch.Tensor, Mapping)):  # one batch
        return [data]
    if isinstance(data, (str, bytes)):
        raise TypeError(f"{name} of type {type(data).__name__} is not allowed; it must be a "
                        "tensor or an iterable of batches (a list or a DataLoader)")
    if isinstance(data, Iterator):
        raise TypeError(f"{name} of type {type(data).__name__} is an iterator, which can be "
                        "read only once; sequential compression and refit read the data "
                        "several times (once per group of layers): pass a list of batches, a "
                        "tensor or a DataLoader")
    try:
        iter(data)
    except TypeError:
        raise TypeError(f"{name} of type {type(data).__name__} is not allowed; it must be a "
                        "tensor or an iterable of batches (a list or a DataLoader)") from None
    return data


def _run_pair(original, compressed, data, *, cross, outputs, max_batches, forward, mask,
              device, progress, desc, distributed=None, warn_unused_mask=True):
    """Run both models on every batch with the given accumulators hooked in; under a process
    group (``distributed``, as for :func:`collect_covariances`) the sums are all-reduced.

    Returns ``(mask_seen, mask_used)``: whether a batch had a token mask, and whether it
    applied to the input of one of the ``cross`` layers (a driver of several passes that
    gives ``warn_unused_mask=False`` warns once from these, over all of its passes)."""
    group = resolve_group(distributed)
    what = f"running the original and the compressed model ({desc})"
    signature = [acc.name for acc, _, _ in cross] + ["out:" + acc.name for acc, _, _ in outputs]
    handles = []
    try:
        for acc, m_o, m_c in cross:
            handles.append(m_o.register_forward_pre_hook(acc.hook_original, with_kwargs=True))
            handles.append(m_c.register_forward_pre_hook(acc.hook_compressed,
                                                         with_kwargs=True))
        for acc, m_o, m_c in outputs:
            handles.append(m_o.register_forward_hook(acc.hook_original))
            handles.append(m_c.register_forward_hook(acc.hook_compressed))
        n_batches = 0
        mask_seen = False
        it = progress_bar(data, total=None, enabled=progress, desc=desc)
        with eval_modes(original, compressed), torch.no_grad():
            for i, batch in enumerate(it):
                if max_batches is not None and i >= max_batches:
                    break
                m = batch_mask(mask, batch, i, device)
                mask_seen = mask_seen or m is not None
                for acc, _, _ in cross:
                    acc.mask = m
                    acc.queue = []
                for acc, _, _ in outputs:
                    acc.mask = m
                    acc.queue = []
                run_batch(original, batch, i, device, forward)
                run_batch(compressed, batch, i, device, forward)
                for acc, _, _ in outputs:
                    acc.end_batch()
                for acc, _, _ in cross:
                    if acc.queue:
                        raise RuntimeError(
                            f"layer {acc.name!r} ran {len(acc.queue)} more time(s) in the "
                            f"original model than in the compressed one in batch {i}; the "
                            "two forward passes must call it the same number of times")
                n_batches += 1
        if n_batches == 0 and group is None:
            raise ValueError(f"data yielded no batches; {what} needs at least one batch")
    except Exception as exc:
        agree(group, what, signature, error=exc)
        raise
    finally:
        for h in handles:
            h.remove()
        for acc, _, _ in list(cross) + list(outputs):
            acc.queue = []
    mask_used = any(a.mask_used for a, _, _ in cross)
    if cross:  # the same warnings as collect_covariances
        square = next((a.square_mask for a, _, _ in cross if a.square_mask is not None), None)
        warn_mask_use(square, mask_seen and warn_unused_mask, mask_used)
    if group is not None:  # (a process without batches adds zero sums and counts)
        agree(group, what, signature)
        import torch.distributed as dist

        total = torch.tensor([float(n_batches)], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        if total.item() == 0:
            raise ValueError(f"data yielded no batches on any process of the group; {what} "
                             "needs at least one batch on one of them")
        for acc, _, _ in cross:
            acc.all_reduce()
        for acc, m_o, _ in outputs:
            acc.all_reduce(m_o.weight.device)
    return mask_seen, mask_used


def collect_cross_covariances(original, compressed, data, *, layers=None, max_batches=None,
                              forward=None, mask="auto", device=None,
                              chunk_bytes=_DEFAULT_CHUNK_BYTES, progress=False,
                              distributed=None):
    """Joint input statistics of layers in an original and a compressed model.

    Both models are run (eval mode, no gradients) on every batch; forward
    pre-hooks on the chosen layer of each model gather the im2col patches of
    its input exactly as :func:`collect_covariances` does (padding mode,
    stride, dilation; rows of a Linear input, token mask applied), and pair
    the i-th call of the layer in the original model with its i-th call in
    the compressed one. Sums are in float64 and are all-reduced over the
    ``torch.distributed`` process group as :func:`collect_covariances` does
    (``distributed``: None, True or False, with the same meaning).

    Parameters
    ----------
    original, compressed : torch.nn.Module
        The original model and a copy of it with some layers replaced (the
        same object twice is allowed: it is copied). The chosen layers must exist under the same names in both and be
        ``nn.Conv2d`` (``groups=1``) or ``nn.Linear`` in the original.
    data : tensor or iterable of batches
        As for :func:`collect_covariances` (a tensor is one batch).
    layers : str or list of str, optional
        Names of the layers (default: every Conv2d/Linear of ``original``
        that is still one in ``compressed``).
    max_batches, forward, mask, device, chunk_bytes, progress
        As for :func:`collect_covariances`.

    Returns
    -------
    dict of str to CrossStats

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> s = collect_cross_covariances(net, net, torch.randn(32, 4), layers=["2"])["2"]
    >>> bool(torch.allclose(s.sigma_oc, s.sigma_cc)), s.count
    (True, 32)
    """
    # under a process group, a process whose checks fail tells the others (one exchange)
    with checking(resolve_group(distributed)):
        for what, m in (("original", original), ("compressed", compressed)):
            check_type(m, nn.Module, what)
        _check_pass(chunk_bytes, forward, mask, max_batches)
        data = as_batches(data)  # (read once: a generator is fine)
        if compressed is original:  # hooks on one module would see both passes
            compressed = copy.deepcopy(original)
        comp_modules = dict(compressed.named_modules())
        if layers is None:
            chosen = [(n, m) for n, m in select_layers(original)
                      if isinstance(comp_modules.get(n), (nn.Conv2d, nn.Linear))]
        else:
            chosen = select_layers(original, layers)
        cross = []
        for name, m in chosen:
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise ValueError(f"layer {name!r} is a grouped convolution (groups="
                                 f"{m.groups}); cross statistics are gathered for groups=1 "
                                 "only")
            mc = comp_modules.get(name)
            if mc is None:
                raise ValueError(f"layer {name!r} of the original model is not a module of "
                                 "the compressed model")
            cross.append((_CrossAccumulator(name, m, chunk_bytes), m, mc))
        if device is None:
            device = model_device(original)
        device = check_device(device, "device")  # (an unavailable one: a named ValueError)
        if device.type == "meta":
            raise ValueError("device='meta' is not allowed; statistics need real data (use "
                             "the device of the model's weights)")
    _run_pair(original, compressed, data, cross=cross, outputs=[], max_batches=max_batches,
              forward=forward, mask=mask, device=device, progress=progress,
              desc="cross statistics", distributed=distributed)
    out = {}
    for acc, _, _ in cross:
        out[acc.name] = acc.result()
    return out


def corrected_target(weight, stats, *, centered=False, ridge=0.0):
    """The corrected target ``K'`` (and bias shift) of the sequential objective.

    Parameters
    ----------
    weight : torch.Tensor of shape (T, ...)
        The original layer's weight ``K`` (any float dtype; flattened to
        ``(T, n)``).
    stats : CrossStats
    centered : bool, optional
        Use the centered moments (target ``K C_oc C_cc^+``).
    ridge : float, optional
        Solve with ``M + ridge * (trace(M) / n) * I`` in place of the metric
        ``M`` (``Sigma_cc``, or ``C_cc`` when centered): the target of the
        ridge-regularised objective ``E||K x_o - K~ x_c||^2 + ridge *
        (trace(M) / n) ||K~||_F^2``, which is what a solver run with the same
        ``ridge`` (:func:`sigmadecomp.sigma.ridge_sigma`) minimises. Give a
        solver's ridge here: a target without it can be far larger than
        ``K`` along weak directions of ``M``, where the ridged solver does not
        follow it. Default 0: the exact ``K Sigma_oc Sigma_cc^+``.

    Returns
    -------
    target : torch.Tensor of the weight's shape, float64
        ``K Sigma_oc Sigma_cc^+`` (pseudo-inverse under the eigenvalue floor of
        :func:`sigmadecomp.sigma.psd_solve`).
    bias_shift : torch.Tensor of shape (T,) or None
        With ``centered``: ``K mu_o - K' mu_c``, the bias change that, with
        the usual centered bias correction ``(K' - K~) mu_c``, gives the best
        bias ``b + K mu_o - K~ mu_c``. None otherwise.

    Examples
    --------
    >>> import torch
    >>> e = torch.eye(3, dtype=torch.float64)
    >>> z = torch.zeros(3, dtype=torch.float64)
    >>> K = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    >>> target, _ = corrected_target(K, CrossStats(e, 0.5 * e, z, z, 1, 1.0))
    >>> target.tolist()
    [[0.0, 0.5, 1.0], [1.5, 2.0, 2.5]]
    """
    if not isinstance(stats, CrossStats):
        raise TypeError(f"stats of type {type(stats).__name__} is not allowed; it must be "
                        "a CrossStats")
    K = weight.detach().reshape(weight.shape[0], -1).to(stats.sigma_cc.device, torch.float64)
    if K.shape[1] != stats.n:
        raise ValueError(f"weight of shape {tuple(weight.shape)} has {K.shape[1]} inputs per "
                         f"output; the statistics have n={stats.n}")
    Scc, Soc = stats.sigma_cc, stats.sigma_oc
    if centered:
        mo, mc = stats.mean_o, stats.mean_c
        Scc = Scc - mc[:, None] * mc[None, :]
        Soc = Soc - mo[:, None] * mc[None, :]
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 \
            or not math.isfinite(ridge):
        raise ValueError(f"ridge={ridge!r} is not allowed; ridge must be a finite number >= 0")
    Scc = 0.5 * (Scc + Scc.T)
    if ridge:
        n = Scc.shape[0]
        Scc = Scc + (ridge * float(torch.trace(Scc)) / n) * torch.eye(n, dtype=Scc.dtype,
                                                                        device=Scc.device)
    # K' = K Soc Scc^+  <=>  K'^T = Scc^+ (Soc^T K^T)   (Scc symmetric)
    target = psd_solve(Scc, Soc.T @ K.T).T
    shift = None
    if centered:
        shift = K @ stats.mean_o - target @ stats.mean_c
    return target.reshape(weight.shape).contiguous(), shift


# ------------------------------------------------------------------- grouping


def _first_samples(batch, k=2):
    """A small slice of a batch (tensors cut along their first axis)."""
    def cut(v):
        return v[:k] if isinstance(v, torch.Tensor) and v.ndim > 0 else v

    if isinstance(batch, torch.Tensor):
        return cut(batch)
    if isinstance(batch, Mapping):
        return {key: cut(v) for key, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch)
    return batch


def _layer_groups(model, names, batch, device, forward, independent):
    """Groups of layers in call order; a layer joins the current group unless its
    input depends (through the autograd graph of one small batch) on a layer of it.

    Returns ``(groups, never_called)``.
    """
    with torch.inference_mode(False):  # autograd refuses tensors made in inference mode:
        if any(t.is_inference() for t in (*model.parameters(), *model.buffers())):
            model = copy.deepcopy(model)  # ... a model's (its copy here has normal ones)
        batch = _normal_tensors(batch)  # ... or a batch's
        return _traced_groups(model, names, batch, device, forward, independent)


def _normal_tensors(batch):
    """``batch`` with its tensors made under inference mode cloned (outside it)."""
    def normal(v):
        return v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v

    if isinstance(batch, torch.Tensor):
        return normal(batch)
    if type(batch) in (dict, tuple, list):  # (other containers as they are)
        values = batch.values() if isinstance(batch, dict) else batch
        if any(isinstance(v, torch.Tensor) and v.is_inference() for v in values):
            if isinstance(batch, dict):
                return type(batch)((k, normal(v)) for k, v in batch.items())
            return type(batch)(normal(v) for v in batch)
    return batch


def _traced_groups(model, names, batch, device, forward, independent):
    modules = dict(model.named_modules())
    wanted = set(names)
    order, inputs, zeros, handles = [], {}, {}, []

    def pre(name):
        def hook(module, args, kwargs):
            if name not in order:
                order.append(name)
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor):
                inputs.setdefault(name, []).append(x)
        return hook

    def post(name):
        def hook(module, args, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            z = torch.zeros_like(out, requires_grad=True)
            zeros.setdefault(name, []).append(z)
            return out + z
        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(pre(name), with_kwargs=True))
            if independent:
                handles.append(modules[name].register_forward_hook(post(name)))
        with eval_modes(model), torch.enable_grad():
            try:  # two samples suffice for the graph's structure
                run_batch(model, _first_samples(batch), 0, device, forward)
            except Exception:  # noqa: BLE001 - a batch that cannot be cut: run it whole
                order.clear()
                inputs.clear()
                zeros.clear()
                run_batch(model, batch, 0, device, forward)
            deps = {}
            if independent:
                for b in order:
                    others = [(a, z) for a in order if a != b for z in zeros.get(a, [])]
                    found = set()
                    for x in inputs.get(b, []):
                        if not x.requires_grad or not others:
                            continue
                        grads = torch.autograd.grad(x.sum(), [z for _, z in others],
                                                    allow_unused=True, retain_graph=True)
                        found |= {a for (a, _), g in zip(others, grads) if g is not None}
                    deps[b] = found
    finally:
        for h in handles:
            h.remove()
    groups = []
    for name in order:
        if name not in wanted:
            continue
        if groups and independent and not (deps.get(name, set()) & set(groups[-1])):
            groups[-1].append(name)
        else:
            groups.append([name])
    never = [n for n in names if n not in order]
    return groups, never


def _groups_on_first_batch(model, names, data, device, forward, independent, group,
                           who="sequential compression"):
    """``(groups, never)`` of :func:`_layer_groups` on the first batch of ``data``.

    Under a process group (``group`` from :func:`resolve_group`) every process gets those
    of the lowest-ranked process that has a batch (one without any takes part with zero
    sums later); a process that fails here makes the others raise. An error when no
    process has a batch.
    """
    what = "finding the layer groups on the first batch"
    try:
        first = next(iter(data), None)
        found = (None if first is None else
                 _layer_groups(model, names, first, device, forward, independent))
    except Exception as exc:
        if group is not None:
            first_given(group, None, error=exc, what=what)
        raise
    if group is not None:
        found = first_given(group, found, what=what)
    if found is None:
        raise ValueError("data yielded no batches"
                         + (" on any process of the group" if group is not None else "")
                         + f"; {who} needs at least one batch")
    return found


# --------------------------------------------------------------- compression


def _candidates(model, layers, ranks, ratio):
    """``(names in model order, named, skipped rows)`` chosen as :func:`compress` chooses them."""
    from .compress import select_step

    explicit = dict(ranks) if hasattr(ranks, "items") else {}
    chosen, named, skipped, _ = select_step(model, layers, explicit, ratio)
    if not named:  # layers surgery leaves dense are reported with their obstacle up front
        dense = dense_reasons(model, [n for n, m in chosen  # (grouped convs: handled later)
                                      if not (isinstance(m, nn.Conv2d) and m.groups != 1)])
        for n, m in chosen:  # a layer given its own ranks is named: it raises, as in compress
            if n in explicit and (n in dense or (isinstance(m, nn.Conv2d) and m.groups != 1)):
                reason = dense.get(n) or obstacle(model, m, [n], param_owners(model))
                raise ValueError(f"layer {n!r} cannot be compressed: {reason}")
        skipped += [{"name": n, "kind": type(m).__name__, "reason": dense[n]}
                    for n, m in chosen if n in dense]
        chosen = [(n, m) for n, m in chosen if n not in dense]
    return [n for n, _ in chosen], named, skipped


def _refit_candidates(model, refit, names):
    """``(names, named, skipped rows)`` of the dense layers ``refit`` asks to refit."""
    if refit is None:
        return [], False, []
    if isinstance(model, (nn.Conv2d, nn.Linear)):
        if not (isinstance(refit, str) and refit == "all"):
            raise ValueError(f"refit={refit!r} is not allowed for a single layer: it has no "
                             "dense layers to refit; give refit=None")
        return [], False, []
    compressed = set(names)
    if isinstance(refit, str) and refit == "all":
        named, chosen = False, select_layers(model)
    elif callable(refit) and not isinstance(refit, nn.Module):
        named, chosen = False, select_layers(model, refit, name="refit")
    else:
        named, chosen = True, select_layers(model, refit, name="refit")
        clash = [n for n, _ in chosen if n in compressed]
        if clash:
            raise ValueError(f"refit contains {clash[0]!r}, which is also a layer to "
                             "compress (it is among the chosen layers, even if its ranks "
                             "end up leaving it dense); refit is for layers outside that "
                             "choice: leave it out of layers= to refit it")
    chosen = [(n, m) for n, m in chosen if n not in compressed]
    dense = dense_reasons(model, [n for n, _ in chosen])
    out, skipped = [], []
    for n, m in chosen:
        why = dense.get(n)
        if why is None and not isinstance(m.weight, nn.Parameter):
            why = "its weight is not a parameter"
        if why is not None:
            if named:
                raise ValueError(f"refit contains {n!r}, which cannot be refitted: {why}")
            skipped.append({"name": n, "kind": type(m).__name__, "reason": f"not refitted: {why}"})
            continue
        out.append(n)
    return out, named, skipped


def _budget_ranks(model, method, names, budget, data, *, centered, max_batches, forward,
                  mask, distributed=None):
    """Ranks of a budget allocation from the original model's one-shot statistics.

    The error curves use the metric the one-shot fit would use: ``Sigma``, or
    with ``centered`` the centered covariance (as :func:`compress` allocates).
    """
    from sigmadecomp import ranks as _ranks

    from .compress import LAYER_METHODS, layer_method_for
    from .covariance import collect_covariances
    modules = dict(model.named_modules())
    # only layers compress can replace share the budget (as in one-shot compression)
    dense = dense_reasons(model, names)
    names = [n for n in names if n not in dense]
    stats = collect_covariances(model, data, layers=names, max_batches=max_batches,
                                progress=False, forward=forward, mask=mask,
                                distributed=distributed, _checked=True)  # (checked by caller)
    specs, methods = {}, {}
    for n in names:
        if n not in stats:
            continue
        m = modules[n]
        S = stats[n].centered() if centered else stats[n].sigma
        specs[n] = _ranks.LayerSpec(m.weight.detach().to(torch.float64),
                                    S.to(m.weight.device, torch.float64))
        methods[n] = LAYER_METHODS[layer_method_for(m, method)].rank_method
    return _ranks.allocate_ranks(specs, budget, method=methods)


@outside_inference_mode
def sequential_compress(model, method, data, *, ratio=None, ranks=None, budget=None,
                        layers=None, inplace=False, centered=False, options=None,
                        progress=True, distributed=None, min_speedup=None,
                        example_input=None, cross=True, independent=True, target_ridge=None,
                        refit=None, max_batches=None, forward=None, mask="auto"):
    """Compress layer by layer, each fitted to the inputs it gets once earlier ones are compressed.

    This is what ``compress(model, method, data=data, sequential=True, ...)``
    runs. Layers are taken in the order the forward pass calls them, in
    groups whose inputs do not depend on each other (found once from the
    autograd graph of a two-sample batch). For each group the original model
    and the partly compressed copy are run side by side over ``data``
    (:func:`collect_cross_covariances`); each layer's weight ``K`` is
    replaced by the corrected target ``K' = K Sigma_oc Sigma_cc^+``
    (:func:`corrected_target`) and decomposed by :func:`compress` in the
    metric ``Sigma_cc``. So the fit minimises ``E||K x_o - K~ x_c||^2``, the
    change of the layer's output from the original model to the compressed
    one, upstream errors included.

    Parameters
    ----------
    model : torch.nn.Module
        Never modified unless ``inplace`` (and then only after every layer
        succeeded).
    method : {'tucker2', 'cp', 'svd', 'tt'}
    data : tensor or re-iterable of batches
        Calibration batches (a list or a ``DataLoader``; an iterator is
        refused: the data are read once per group, plus once for the
        budget allocation and once for the final output errors). Batch rules
        as in :func:`collect_covariances`. Under a process group each
        process passes its own share; a process with none adds zero sums
        (and counts) to every pass and returns the same model as the others,
        which is the one-process model on the union of the shares (the layer
        groups are those found on the first batch of the lowest-ranked
        process that has one). Only data without a batch on every process is
        an error.
    ratio, ranks, budget, layers, inplace, centered, options, progress, distributed, \
min_speedup, example_input
        As for :func:`compress`. ``ranks='evbmf'`` is evaluated on the
        corrected target in the metric ``Sigma_cc``; ``budget`` is allocated
        up front from the one-shot statistics of the original model (the
        corrections are not known before the layers are compressed).
        ``centered`` fits the centered moments and sets the bias to
        ``b + K mu_o - K~ mu_c`` (see the module notes).
    cross : bool, optional
        ``True`` (default): the corrected target. ``False``: decompose ``K``
        itself in the metric ``Sigma_cc`` of the compressed model's inputs
        (plain re-collection, kept as an ablation: it ignores that the layer
        should undo the upstream change).
    target_ridge : float, optional
        ``ridge`` of :func:`corrected_target`. ``None`` (default): the ridge
        the layer's solver minimises with, so the fit is the exact optimum of
        the ridge-regularised objective: ``options['ridge']`` or
        :data:`sigmadecomp.sigma.DEFAULT_RIDGE` for Tucker-2, CP and TT and for
        ``method='svd'``, and ``DEFAULT_RIDGE`` for the SVD that other methods
        use on Linear and 1x1 layers (``compress`` passes it no options).
    independent : bool, optional
        Compress layers whose inputs do not depend on each other in one
        group (one pass over the data for all of them). ``False``: one
        layer per group. The dependence is read from the autograd graph of
        one forward pass: a layer reached from another only through
        ``.detach()`` or another non-differentiable step is taken as
        independent of it (and fitted to inputs the other's compression does
        not yet change); use ``False`` for such models.
    refit : None, 'all', str, list of str or callable, optional
        Dense layers (``nn.Conv2d`` with ``groups=1`` or ``nn.Linear``) to
        refit in place, in network order with the others: their weight
        becomes the corrected target ``K'`` itself (full rank; the ridge as
        ``target_ridge``, default
        :data:`sigmadecomp.sigma.DEFAULT_RIDGE`), the exact minimiser of
        the ridge-regularised ``E||K x_o - K~ x_c||^2`` over dense ``K~``,
        so a layer downstream of compressed ones (a shortcut, the
        classifier) undoes part of their error. With ``centered`` the bias
        becomes ``b + K mu_o - K' mu_c`` (a layer without bias gets one, its
        only added parameters). ``'all'``: every such layer that can be
        refitted (the others are listed in ``report.skipped``), the layers
        chosen for compression that their ranks leave dense included (kept
        dense because the factorized form would not be smaller, or by
        ``min_speedup``), as one-shot compression + refit does; a
        predicate ``f(name, module)``: those of them it accepts; names:
        those (an error if one cannot be, or if it is among the layers to
        compress). A layer whose inputs the
        compression does not change is left as it is. ``None`` (default):
        dense layers keep their weights. ``compress(..., data=...,
        refit=...)`` without ``sequential`` refits after a one-shot
        compression (:func:`refit_after`). On the reference net ``'all'``
        (two shortcut 1x1 convs and the classifier) adds 0.09 to 0.41
        point to Tucker-2 with budget ranks at rX 2 to 8 and 0.14 to 0.28
        to CP at rX 4 and 6 (``notes/sequential.md``).
    max_batches, forward, mask
        As for :func:`collect_covariances`.

    Returns
    -------
    compressed_model : torch.nn.Module
    report : CompressionReport
        Rows as from :func:`compress`, where ``sigma_error`` and
        ``frobenius_error`` measure the fit to the corrected target ``K'``
        (in ``Sigma_cc``, resp. relative to ``||K'||``), plus
        ``output_error``: the measured relative change
        ``sqrt(E||y_o - y_c||^2 / E||y_o - b||^2)`` of the layer's output
        (original model vs the final compressed one) on ``data`` (for a Linear
        layer, over the tokens the statistics count: real ones under a token
        mask); None,
        with a ``CompressionWarning``, when the two models do not call the
        layer alike (control flow that changes with the compression),
        ``target_change`` (``||K' - K|| / ||K||``) and ``group`` (the index
        of the pass that compressed the layer). Layers refitted by
        ``refit`` are listed in ``report.refitted`` (``name``, ``kind``,
        ``params_before``, ``params_after``, ``target_change``, ``group``,
        ``output_error``).

    Raises
    ------
    TypeError, ValueError
        Bad arguments (named in the message), as :func:`compress`.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import compress
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
    ...                     nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> data = [torch.randn(64, 8) for _ in range(2)]
    >>> small, report = compress(net, 'svd', ratio=2, data=data, sequential=True,
    ...                          progress=False)
    >>> [(r['name'], r['ranks'], r['group']) for r in report.layers]
    [('2', 4, 0), ('4', 4, 1)]
    """
    from .compress import check_evbmf_method, compress, layer_method_for

    t_start = time.perf_counter()
    pg = resolve_group(distributed)  # (the process group, if any)
    bare = isinstance(model, (nn.Conv2d, nn.Linear))
    # under a process group every process learns whether the others' argument checks
    # passed, and that they take the same path (the same exchanges follow)
    path = {"single layer": bare, "budget given": budget is not None,
            "layers given": layers is not None, "refit given": refit is not None}
    with checking(pg, path):
        check_type(model, nn.Module, "model")
        if data is None:
            raise ValueError("data=None is not allowed with sequential=True; sequential "
                             "compression needs calibration batches (data=...)")
        data = _check_reiterable(data)
        for flag, value in (("cross", cross), ("independent", independent),
                            ("inplace", inplace), ("centered", centered)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag}={value!r} is not allowed; {flag} must be True or "
                                "False")
        if method not in ("svd", "tucker2", "cp", "tt"):
            from .compress import LAYER_METHODS

            if method not in LAYER_METHODS:
                allowed = ", ".join(repr(m) for m in LAYER_METHODS)
                raise ValueError(f"method={method!r} is not allowed; method must be one of "
                                 f"{allowed}")
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"options of type {type(options).__name__} is not allowed; "
                            "options must be a dict of keyword arguments of the core "
                            "decomposition, e.g. {'n_iter_max': 20}")
        if target_ridge is not None and (isinstance(target_ridge, bool)
                                         or not isinstance(target_ridge, (int, float))
                                         or not math.isfinite(target_ridge)
                                         or target_ridge < 0):
            raise ValueError(f"target_ridge={target_ridge!r} is not allowed; target_ridge "
                             "must be None or a finite number >= 0")
        if ratio is None and ranks is None and budget is None:
            raise ValueError("no way to choose ranks: give ratio=, ranks= (a dict or "
                             "'evbmf') or budget=")
        if budget is not None and (ratio is not None or ranks is not None):
            raise ValueError("budget cannot be combined with ratio or ranks; give one of them")
        if isinstance(ranks, str) and ranks != "evbmf":
            raise ValueError(f"ranks={ranks!r} is not allowed; ranks must be a dict of layer "
                             "name -> ranks or the string 'evbmf'")
        check_evbmf_method(method, ranks, budget)
        _check_pass(_DEFAULT_CHUNK_BYTES, forward, mask, max_batches)
        check_not_meta(model, who="sequential compression needs")
        if bare:
            _refit_candidates(model, refit, [])  # refuses a named refit
        else:
            names, named, skipped = _candidates(model, layers, ranks, ratio)
            if not names and refit is None:  # as one-shot compress says it
                raise ValueError("no layer can be compressed: "
                                 + ("; ".join(f"{r['name']!r}: {r['reason']}" for r in skipped)
                                    or f"layers={layers!r} selects no Conv2d/Linear module"))
            explicit = dict(ranks) if hasattr(ranks, "items") else {}
            if ratio is None and budget is None and ranks != "evbmf":
                missing = [n for n in names if n not in explicit]
                if missing:
                    raise ValueError(f"layers {missing} have no ranks: ranks= does not name "
                                     "them and ratio= is not given")
            refits, refit_named, refit_skipped = _refit_candidates(model, refit, names)
            # with 'all' or a predicate, refit also takes the chosen layers that their
            # ranks leave dense (as one-shot compression + refit does)
            late = set() if refit is None or refit_named else (
                set(_refit_candidates(model, refit, [])[0]) & set(names))
    if bare:
        # a single layer has no upstream layers: sequential equals one-shot (the checks
        # of both calls are among those exchanged above)
        from .covariance import collect_covariances

        stats = collect_covariances(model, data, max_batches=max_batches, progress=False,
                                    forward=forward, mask=mask, distributed=distributed,
                                    _checked=True)
        return compress(model, method, covariances=stats, ratio=ratio, ranks=ranks,
                        budget=budget, layers=layers, inplace=inplace, centered=centered,
                        options=options, progress=progress, distributed=distributed,
                        min_speedup=min_speedup, example_input=example_input, _checked=True)

    add_skipped(skipped, refit_skipped)
    device = torch.device(model_device(model))
    groups, never = _groups_on_first_batch(model, names + refits, data, device, forward,
                                           independent, pg)
    for n in never:
        if n in refits:
            if refit_named:
                raise ValueError(f"refit contains {n!r}, which never ran in the forward "
                                 "pass; it cannot be refitted")
            add_skipped(skipped, [{"name": n, "kind": type(model.get_submodule(n)).__name__,
                                   "reason": "not refitted: never ran in the forward pass on "
                                             "data"}])
            continue
        if named:
            raise ValueError(f"layer {n!r} was chosen in layers but never ran in the "
                             "forward pass; sequential compression needs its inputs")
        skipped.append({"name": n, "kind": type(model.get_submodule(n)).__name__,
                        "reason": "never ran in the forward pass on data"})
    refit_set = set(refits)
    alloc = None
    if budget is not None:
        alloc = _budget_ranks(model, method,
                              [n for g in groups for n in g if n not in refit_set], budget,
                              data, centered=centered, max_batches=max_batches,
                              forward=forward, mask=mask, distributed=distributed)

    params_before = sum(p.numel() for p in model.parameters())
    original = model  # read only: hooks are attached and removed, its mode restored
    work = copy.deepcopy(model)
    work_modules = dict(work.named_modules())
    orig_modules = dict(original.named_modules())
    rows, refitted, pending_out = [], [], []
    # whether any batch had a token mask, and whether it applied in any pass: a pass over
    # layers none of which reads tokens (the head after pooling) is no reason to warn
    mask_seen = mask_used = False
    for gi, full_group in enumerate(groups):
        group = [n for n in full_group if n not in refit_set]
        eligible = [n for n in group
                    if not (isinstance(orig_modules[n], nn.Conv2d)
                            and orig_modules[n].groups != 1)]
        refit_here = [n for n in full_group if n in refit_set]
        cross_accs = [(_CrossAccumulator(n, orig_modules[n], _DEFAULT_CHUNK_BYTES),
                       orig_modules[n], work_modules[n]) for n in eligible + refit_here]
        seen, used = _run_pair(original, work, data, cross=cross_accs, outputs=pending_out,
                               max_batches=max_batches, forward=forward, mask=mask,
                               device=device, progress=progress,
                               desc=f"sequential group {gi + 1}/{len(groups)}",
                               distributed=distributed, warn_unused_mask=False)
        mask_seen, mask_used = mask_seen or seen, mask_used or used
        _finish_outputs(rows + refitted, pending_out)
        pending_out = []
        stats, saved, changes = {}, {}, {}
        for acc, m_o, m_c in cross_accs:
            if acc.name in refit_set:
                _refit_into(acc, m_o, m_c, gi, centered=centered,
                            ridge=DEFAULT_RIDGE if target_ridge is None else target_ridge,
                            refitted=refitted, skipped=skipped, pending=pending_out)
                continue
            cs = acc.result()
            K = m_o.weight.detach()
            saved[acc.name] = (m_c.weight.detach().clone(),
                               None if m_c.bias is None else m_c.bias.detach().clone(),
                               m_c.bias is None)
            if cross:
                lam = target_ridge
                if lam is None:
                    lam = _solver_ridge(layer_method_for(m_o, method), options, method)
                target, shift = corrected_target(K, cs, centered=centered, ridge=lam)
            else:
                target = K.to(torch.float64)
                shift = (K.reshape(K.shape[0], -1).to(torch.float64) @ (cs.mean_o - cs.mean_c)
                         if centered else None)
            changes[acc.name] = _relative_change(target, K)
            _install_target(m_c, target, shift)
            stats[acc.name] = cs.layer_stats()
        kw = dict(covariances=stats, inplace=True, centered=centered, options=options,
                  progress=False, distributed=distributed, min_speedup=min_speedup,
                  example_input=example_input, _checked=True)  # (checked above)
        if alloc is not None:
            kw["ranks"] = {n: alloc[n] for n in eligible if n in alloc}
        elif ranks == "evbmf":
            kw["ranks"] = "evbmf"
        else:
            kw["ratio"] = ratio
            sub = {n: explicit[n] for n in eligible if n in explicit}
            if sub:
                kw["ranks"] = sub
        grp = set(group)
        kw["layers"] = list(group) if named else (lambda n, m, _g=grp: n in _g)
        if not group:  # only layers to refit in this pass
            continue
        if alloc is not None and not kw["ranks"]:
            report = None
            reason = "not in the budget allocation"
        else:
            try:
                _, report = compress(work, method, **kw)
                reason = None
            except ValueError as e:
                if named or not str(e).startswith("no layer can be compressed"):
                    raise
                report, reason = None, str(e)
        done = set()
        if report is not None:
            for r in report.layers:
                r = dict(r)
                name = r["name"]
                done.add(name)
                r["params_before"] = sum(p.numel() for p in orig_modules[name].parameters())
                r["target_change"] = changes.get(name)
                r["group"] = gi
                r["output_error"] = None
                rows.append(r)
                b = orig_modules[name].bias
                pending_out.append((_OutputAccumulator(name, None if b is None
                                                       else b.detach(),
                                                       isinstance(orig_modules[name],
                                                                  nn.Linear)),
                                    orig_modules[name], work.get_submodule(name)))
            skipped += [s for s in report.skipped if s["name"] in grp]
        else:  # each layer's own obstacle where it has one (as one-shot compress reports)
            dense = dense_reasons(original, group)
            skipped += [{"name": n, "kind": type(orig_modules[n]).__name__,
                         "reason": dense.get(n, reason)} for n in group]
        by_name = {acc.name: acc for acc, _, _ in cross_accs}
        for n in group:  # layers left dense get their own weights back ...
            if n in done or n not in saved:
                continue
            w, b, had_none = saved[n]
            m_c = work_modules[n]
            with torch.no_grad():
                m_c.weight.copy_(w)
                if had_none:
                    m_c.bias = None
                else:
                    m_c.bias.copy_(b)
            if n in late:  # ... or are refitted, with refit='all' or a predicate
                _refit_into(by_name[n], orig_modules[n], m_c, gi, centered=centered,
                            ridge=DEFAULT_RIDGE if target_ridge is None else target_ridge,
                            refitted=refitted, skipped=skipped, pending=pending_out)
    if groups:  # (as collect_covariances warns: once, over all the passes)
        warn_mask_use(None, mask_seen, mask_used)
    _last_outputs(original, work, data, pending_out, rows + refitted, max_batches=max_batches,
                  forward=forward, mask=mask, device=device, progress=progress,
                  distributed=distributed)

    from .compress import CompressionReport

    target = _install(model, work, rows, refitted) if inplace else work
    report = CompressionReport(
        method=method, weighted=True, centered=bool(centered), layers=rows, skipped=skipped,
        params_before=params_before, params_after=sum(p.numel() for p in target.parameters()),
        seconds=time.perf_counter() - t_start, refitted=refitted)
    return target, report


@outside_inference_mode
def refit_after(model, data, refit, compress_fn, *, centered=False, inplace=False,
                ridge=None, progress=True, layers=None, max_batches=None, forward=None,
                mask="auto", distributed=None):
    """One-shot compression, then a refit of the dense layers downstream.

    What ``compress(model, method, data=data, refit=...)`` runs without
    ``sequential``: the statistics are collected from ``data`` once,
    ``compress_fn(model, statistics)`` compresses, and then the dense
    layers chosen by ``refit`` (as in :func:`sequential_compress`; the
    compressed ones excluded) are refitted in network order, in groups of
    layers whose inputs do not depend on each other (one pass over ``data``
    per group, plus one that measures their output errors): each weight
    becomes the corrected target ``K Sigma_oc (Sigma_cc + l I)^{-1}`` of its
    inputs in the original and the compressed model (``l`` from ``ridge``,
    default :data:`sigmadecomp.sigma.DEFAULT_RIDGE`; ``centered`` also
    sets the bias).

    Parameters
    ----------
    model : torch.nn.Module
    data : iterable of batches
        Calibration batches, as for :func:`collect_covariances`; read once for
        the statistics and once or more per refit group.
    refit : 'all', str, list of str or callable
        The dense layers to refit, as in :func:`sequential_compress`.
    compress_fn : callable
        ``compress_fn(model, statistics) -> (compressed_model, report)``,
        e.g. ``lambda m, s: compress(m, 'tucker2', covariances=s, ratio=3)``.
    centered : bool, optional
        Also refit the biases (centered statistics).
    inplace : bool, optional
        Return ``model`` itself, compressed and refitted; default False.
        ``compress_fn`` then works on a copy, whose factorized layers and
        refitted weights are put into ``model`` once every pass succeeded,
        so ``model`` is left unchanged on every error.
    ridge : float, optional
        Ridge of the refit solves; default :data:`sigmadecomp.sigma.DEFAULT_RIDGE`.
    progress : bool, optional
        Progress bars of the passes over ``data``.
    layers : list of str, optional
        The layers whose statistics are collected (default every
        Conv2d/Linear; ``compress`` passes the ones it will choose).
    max_batches, forward, mask :
        As for :func:`collect_covariances`: at most that many batches per
        pass, a ``forward(model, batch)`` for batches the model does not take
        as they are, and the token mask of padded sequence batches.
    distributed : None or bool, optional
        Process group use of the statistics passes, as for
        :func:`collect_covariances` (``compress_fn`` has its own): the
        outcome of the argument checks is exchanged first, and a process
        without batches adds zero sums.

    Returns
    -------
    compressed_model, report
        As from :func:`compress`, with ``report.refitted`` filled and the
        layers that could not be refitted added to ``report.skipped``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import compress
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
    ...                     nn.Linear(16, 4))
    >>> data = [torch.randn(64, 8) for _ in range(2)]
    >>> small, report = compress(net, 'svd', ratio=2, layers=['2'], data=data, refit='all',
    ...                          progress=False)
    >>> [r['name'] for r in report.refitted]
    ['4']
    """
    from .covariance import collect_covariances

    t_start = time.perf_counter()
    pg = resolve_group(distributed)  # (the process group, if any)
    bare = isinstance(model, (nn.Conv2d, nn.Linear))
    # under a process group every process learns whether the others' checks passed
    with checking(pg, {"single layer": bare}):
        check_type(model, nn.Module, "model")
        data = _check_reiterable(data)
        if not callable(compress_fn):
            raise TypeError(f"compress_fn={compress_fn!r} is not allowed; compress_fn must be "
                            "a callable compress_fn(model, statistics) -> (model, report)")
        for flag, value in (("centered", centered), ("inplace", inplace)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag}={value!r} is not allowed; {flag} must be True or "
                                "False")
        if ridge is not None and (isinstance(ridge, bool) or not isinstance(ridge, (int, float))
                                  or not math.isfinite(ridge) or ridge < 0):
            raise ValueError(f"ridge={ridge!r} is not allowed; ridge must be None or a finite "
                             "number >= 0")
        _check_pass(_DEFAULT_CHUNK_BYTES, forward, mask, max_batches)
        check_not_meta(model)
        # (what the statistics pass checks: it runs without an exchange of its own)
        if not select_layers(model, layers):
            raise ValueError("the model has no nn.Conv2d or nn.Linear module to collect "
                             f"statistics for (layers={layers!r})")
        # refit checked before any work (a name among the layers compress takes is refused,
        # and so is a named layer that never runs: compress_fn may work in place)
        pre, pre_named, _ = _refit_candidates(model, refit, layers or [])
        first = next(iter(data), None)
        if pre_named and pre and first is not None and not bare:
            _, never = _layer_groups(model, pre, first, torch.device(model_device(model)),
                                     forward, True)
            if never:
                raise ValueError(f"refit contains {never[0]!r}, which never ran in the "
                                 "forward pass; it cannot be refitted")
    original = model  # the reference outputs, unchanged until every pass succeeded
    stats = collect_covariances(model, data, layers=layers, progress=progress,
                                max_batches=max_batches, forward=forward, mask=mask,
                                distributed=distributed, _checked=True)
    if bare:  # (nothing downstream to refit)
        return compress_fn(model, stats)
    # with inplace, compress_fn works in place on a copy, installed into model at the end
    small, report = compress_fn(copy.deepcopy(model) if inplace else model, stats)
    done = [r["name"] for r in report.layers]
    done += [a for r in report.layers for a in r.get("aliases", [])]
    refits, named, skipped = _refit_candidates(original, refit, done)
    add_skipped(report.skipped, skipped)
    if not refits:
        return small, report
    device = torch.device(model_device(original))
    groups, never = _groups_on_first_batch(original, refits, data, device, forward, True, pg,
                                           who="the refit")
    for n in never:
        if named:
            raise ValueError(f"refit contains {n!r}, which never ran in the forward pass; "
                             "it cannot be refitted")
        add_skipped(report.skipped, [{"name": n, "kind": type(original.get_submodule(n)).__name__,
                                      "reason": "not refitted: never ran in the forward pass "
                                                "on data"}])
    orig_modules = dict(original.named_modules())
    lam = DEFAULT_RIDGE if ridge is None else ridge
    refitted, pending = [], []
    for gi, group in enumerate(groups):
        accs = [(_CrossAccumulator(n, orig_modules[n], _DEFAULT_CHUNK_BYTES), orig_modules[n],
                 small.get_submodule(n)) for n in group]
        _run_pair(original, small, data, cross=accs, outputs=pending, max_batches=max_batches,
                  forward=forward, mask=mask, device=device, progress=progress,
                  desc=f"refit group {gi + 1}/{len(groups)}", distributed=distributed,
                  warn_unused_mask=False)
        _finish_outputs(refitted, pending)
        pending = []
        for acc, m_o, m_c in accs:
            _refit_into(acc, m_o, m_c, gi, centered=centered, ridge=lam, refitted=refitted,
                        skipped=report.skipped, pending=pending)
    _last_outputs(original, small, data, pending, refitted, max_batches=max_batches,
                  forward=forward, mask=mask, device=device, progress=progress,
                  distributed=distributed)
    report.refitted = refitted
    if inplace:
        small = _install(model, small, report.layers, refitted)
    report.params_after = sum(p.numel() for p in small.parameters())
    report.seconds = time.perf_counter() - t_start
    return small, report


def _install(model, work, rows, refitted):
    """``model`` with the factorized layers of ``rows`` and the refitted dense weights of
    ``work`` (a compressed copy of it) put in, under every name of a shared module."""
    for r in rows:
        new = work.get_submodule(r["name"])
        for path in [r["name"]] + list(r.get("aliases", [])):
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
    for r in refitted:  # in place, so every name of a shared module sees the change
        _copy_dense(work.get_submodule(r["name"]), model.get_submodule(r["name"]))
    return model


def _refit_layer(acc, m_o, m_c, *, centered, ridge):
    """Replace the dense layer ``m_c``'s weight by its corrected target; its report row.

    None (and ``m_c`` untouched) when no input differed between the two models.
    """
    if not acc.changed:
        return None
    cs = acc.result()
    if cs.count < cs.n:
        warnings.warn(
            f"layer {acc.name!r} is refitted from {cs.count} input rows for {cs.n} inputs; "
            "a full-rank fit to fewer rows than inputs can follow the calibration data "
            "(give more data, or leave the layer out of refit=)", CompressionWarning,
            stacklevel=user_stacklevel())
    K = m_o.weight.detach()
    target, shift = corrected_target(K, cs, centered=centered, ridge=ridge)
    before = sum(p.numel() for p in m_c.parameters())
    _install_target(m_c, target, shift)
    return {"name": acc.name, "kind": type(m_o).__name__, "params_before": before,
            "params_after": sum(p.numel() for p in m_c.parameters()),
            "target_change": _relative_change(target, K), "output_error": None}


def add_skipped(skipped, rows):
    """Add skip rows to a report's ``skipped`` list, one row per layer: the reason of a
    layer already listed (e.g. left alone by ``compress``, then not refitted) is extended."""
    for row in rows:
        old = next((r for r in skipped if r["name"] == row["name"]), None)
        if old is None:
            skipped.append(row)
        elif row["reason"] not in old["reason"]:
            old["reason"] = f"{old['reason']}; {row['reason']}"


def _refit_into(acc, m_o, m_c, group, *, centered, ridge, refitted, skipped, pending):
    """Refit one dense layer; append its row (or its skip reason) and its output check."""
    row = _refit_layer(acc, m_o, m_c, centered=centered, ridge=ridge)
    if row is None:
        add_skipped(skipped, [{"name": acc.name, "kind": type(m_o).__name__,
                               "reason": "not refitted: compression did not change its inputs"}])
        return
    row["group"] = group
    refitted.append(row)
    b = m_o.bias
    pending.append((_OutputAccumulator(acc.name, None if b is None else b.detach(),
                                       isinstance(m_o, nn.Linear)), m_o, m_c))


def _install_target(module, target, shift):
    """``module``'s weight := ``target``; ``shift`` added to its bias (created if None)."""
    with torch.no_grad():
        module.weight.copy_(target.to(module.weight))
        if shift is not None:
            if module.bias is None:
                module.bias = nn.Parameter(shift.to(module.weight),
                                           requires_grad=module.weight.requires_grad)
            else:
                module.bias.add_(shift.to(module.bias))


def _relative_change(target, K):
    """``||target - K|| / ||K||`` (float64)."""
    K = K.to(target)
    return float(torch.linalg.norm(target - K) / max(float(torch.linalg.norm(K)), 1e-300))


def _copy_dense(src, dst):
    """Copy a refitted layer's weight (and bias, added if ``dst`` had none) into ``dst``."""
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            if dst.bias is None:
                dst.bias = nn.Parameter(src.bias.detach().clone(),
                                        requires_grad=dst.weight.requires_grad)
            else:
                dst.bias.copy_(src.bias)


def _solver_ridge(fmt, options, method=None):
    """The ridge the core solver of format ``fmt`` minimises with (see ``target_ridge``):
    ``options['ridge']`` where ``compress`` passes ``options`` to it (Tucker-2, CP, TT, and
    the SVD when the method itself is ``'svd'``), else the default."""
    if fmt in ("tucker2", "cp", "tt") or (fmt == "svd" and method == "svd"):
        return float((options or {}).get("ridge", DEFAULT_RIDGE))
    return float(DEFAULT_RIDGE)


def _last_outputs(original, compressed, data, pending, rows, **run):
    """Measure the output errors still pending after the last group (one more
    side-by-side pass over ``data``) into ``rows``."""
    if pending:
        _run_pair(original, compressed, data, cross=[], outputs=pending, desc="output errors",
                  **run)
        _finish_outputs(rows, pending)


def _finish_outputs(rows, pending):
    by_name = {r["name"]: r for r in rows}
    for acc, _, _ in pending:
        if acc.name in by_name:
            by_name[acc.name]["output_error"] = acc.relative()
            if acc.unpaired is not None:
                warnings.warn(f"layer {acc.name!r}: its output error is not measured: "
                              f"{acc.unpaired} (a forward pass whose calls change with the "
                              "compression); output_error is None", CompressionWarning,
                              stacklevel=user_stacklevel())
