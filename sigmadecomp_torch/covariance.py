"""Second moments of layer inputs, gathered with forward pre-hooks.

For a ``Conv2d`` the statistic is over the im2col patches the convolution
multiplies with its kernel: ``u`` is the ``n = (S/groups)*H*W`` vector of one
output position, indexed ``(s, h, w)`` row-major like ``weight.reshape(T, -1)``,
taken after padding (zero or the module's ``padding_mode``) with the module's
stride and dilation. For a ``Linear`` layer ``u`` is one row of the input over
its last dimension. With ``N*L`` such vectors (samples times output positions)

    sigma = (1/(N*L)) sum u u^T,    mean = (1/(N*L)) sum u,    count = N*L,

so that (Proposition 1 of Kalle et al., NeurIPS 2025) the mean squared change
of the layer output under a weight change ``D`` is ``tr(D sigma D^T)``.

Accumulation is in float64: each chunk of patches is converted to float64 and
its Gram matrix (upper blocks only) is added to a float64 sum. Float32
products (``gram_dtype=torch.float32``) are an opt-in: their rounding (about
1e-7 relative) makes a rank-deficient Sigma visibly indefinite. The result
can be stored in float32 (``dtype=torch.float32``) to halve its memory.
Batches may be tensors, ``(inputs, targets)`` pairs, mappings of keyword
arguments or anything with a ``forward`` callable; a token mask keeps padded
positions out of the statistics of Linear layers; layers that read the same
input tensor share one statistic. The statistics are sums, so they
merge exactly, layer by layer (``a[name] + b[name]``), and are all-reduced through ``torch.distributed``
when a process group is initialised. For a cheaper estimate,
``position_fraction`` keeps a random subset of the output positions.

Grouped convolutions keep one statistic per group; the factorized layers of
:mod:`sigmadecomp_torch.layers` do not handle groups, so :func:`compress`
skips such layers (with the reason in its report).

One concept, collecting the statistics (hooks, patch accumulation,
all-reduce), which is why this module is longer than most: the result type
lives in :mod:`sigmadecomp_torch.layer_stats`, files in
:mod:`sigmadecomp_torch.covariance_io`, batch handling in ``_batches``.
"""

from __future__ import annotations

import inspect
import itertools
import json
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from sigmadecomp._threads import busy_machine_threads
from sigmadecomp._validation import GRAM_BLOCK_MIN, GRAM_BLOCKS

from ._batches import (as_batches, batch_mask, check_device, check_not_meta,
                       check_not_nested, check_pass_options, check_type, eval_modes,
                       match_token_rows, model_device, progress_bar, run_batch, token_rows,
                       user_stacklevel, warn_flattened_order, warn_mask_use)
from .layer_stats import LayerStats, layer_geometry, layer_kind  # noqa: F401 (re-exported)
from .parallel import agree, checking, resolve_group

__all__ = [
    "LayerStats",
    "collect_covariances",
    "save_covariances",
    "load_covariances",
    "select_layers",
]

_DEFAULT_CHUNK_BYTES = 1 << 26  # 64 MiB of patches per GEMM


# --------------------------------------------------------------------------- hooks


def add_gram(xx, X, work=None):
    """Add the upper triangle of ``X^T X`` of a (M, n) or (G, M, n) chunk to ``xx``.

    ``xx`` is the float64 ``(n, n)`` (or ``(G, n, n)``) sum of the collector;
    only the blocks on and above the diagonal are formed (about half the work
    of the full product) and the collector mirrors the upper triangle at the
    end, so an implementation that adds the full product is also correct
    (``benchmarks/collect_cost.py`` times that variant). A CPU chunk takes one
    BLAS SYRK, others blocked GEMMs. ``work``: a float32 ``(n, n)`` matrix,
    zero below the diagonal, reused by the SYRK of float32 chunks (see
    :func:`_syrk_upper`).
    """
    n = X.shape[-1]
    if X.ndim == 2 and X.device.type == "cpu" and xx.is_contiguous():
        _syrk_upper(X, xx, work)
        return
    block = max(GRAM_BLOCK_MIN, -(-n // GRAM_BLOCKS))  # why: sigmadecomp._validation
    if n <= block:
        xx += X.transpose(-1, -2) @ X
        return
    for a in range(0, n, block):
        b = min(a + block, n)
        xx[..., a:b, a:] += X[..., :, a:b].transpose(-1, -2) @ X[..., :, a:]


def _syrk_upper(X, out, work=None):
    """``out += X^T X`` on the upper triangle (C order) of a float64 CPU ``out``.

    A BLAS SYRK (half the multiply-adds of the full product, exactly the
    triangle): ``dsyrk`` into ``out`` itself, or ``ssyrk`` into a float32
    ``(n, n)`` work matrix (``work``, reused between calls; allocated when
    None) that is then added to ``out``. ``X`` (M, n) is read in place when
    contiguous. The strict lower triangle (C order) of ``out`` is left as it
    was.
    """
    import numpy as np
    from scipy.linalg import blas

    X = X.contiguous()
    A = X.numpy().T  # Fortran (n, M): A A^T = X^T X
    if X.dtype == torch.float64:
        c = out.numpy().T  # Fortran view; its lower triangle is out's upper one
        r = blas.dsyrk(1.0, A, beta=1.0, c=c, trans=0, lower=1, overwrite_c=1)
        if not np.shares_memory(r, c):  # pragma: no cover - f2py made a copy
            out.copy_(torch.from_numpy(np.ascontiguousarray(r.T)))
        return
    n = X.shape[1]
    if work is None:
        work = torch.zeros((n, n), dtype=torch.float32)
    c = work.numpy().T
    # beta=0: the triangle is overwritten; the other one keeps the zeros it was
    # created with, so the whole work matrix can be added
    r = blas.ssyrk(1.0, A, beta=0.0, c=c, trans=0, lower=1, overwrite_c=1)
    if not np.shares_memory(r, c):  # pragma: no cover - f2py made a copy
        work = torch.from_numpy(np.ascontiguousarray(r.T)).triu()
    out += work


class _Run:
    """State of one collection shared by the hooks: the current batch's mask, the
    inputs already measured in this forward pass (to share statistics) and the
    reused work buffers."""

    def __init__(self):
        self.batch = -1
        self.mask = None
        self.registry = {}  # (id(x), signature) -> list of _Seen
        self.serial = itertools.count()
        self.mask_used = False
        self.square_mask = None  # (layer, shape) of a 3-D input read under a square mask
        self.seq_first = None  # first layer whose input matched the mask sequence-first
        self.flattened = None  # first layer whose 2-D input matched the flattened mask
        self.buffers = {}  # (slot, device) -> flat uint8 tensor

    def start(self, mask):
        self.batch += 1
        self.mask = mask
        self.registry = {}

    def buffer(self, slot, shape, dtype, device, zero=False):
        """An uninitialised tensor of ``shape`` in a work buffer reused between calls.

        Fresh large allocations are returned to the system when freed, so on
        CPU every new patch matrix would pay its page faults again (measured
        here: 64 MiB of fresh memory cost more time than the SYRK on it). One
        buffer per ``slot`` and device grows to the largest request and is
        dropped with the collection. ``zero=True`` zeroes the view only when the
        buffer was (re)allocated or last served another shape or dtype (for
        the float32 SYRK, whose untouched triangle must stay zero).
        """
        device = torch.device(device)
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        key = (slot, device)
        buf, last = self.buffers.get(key, (None, None))
        fresh = buf is None or buf.numel() < nbytes
        if fresh:
            self.buffers.pop(key, None)
            buf = torch.empty(max(nbytes, 8), dtype=torch.uint8, device=device)
        out = buf[:nbytes].view(dtype).view(shape)
        if zero and (fresh or last != (tuple(shape), dtype)):
            out.zero_()
        self.buffers[key] = (buf, (tuple(shape), dtype))
        return out

    def release(self):
        self.registry = {}
        self.mask = None
        self.buffers = {}


class _Seen:
    """One measured input: a weak reference to the tensor, its version counter then (an
    in-place change since makes it another input), who measured it."""

    __slots__ = ("ref", "version", "acc", "serial")

    def __init__(self, x, acc, serial):
        self.ref = weakref.ref(x)
        self.version = _version(x)
        self.acc = acc
        self.serial = serial

    def same(self, x):
        """Whether ``x`` is the tensor measured, with the values it had then."""
        return self.ref() is x and _version(x) == self.version


def _version(x):
    """``x``'s version counter (bumped by in-place changes); None for an inference tensor,
    which has none (and cannot be changed in place outside inference mode)."""
    try:
        return x._version
    except RuntimeError:
        return None


class _Accumulator:
    """Float64 sums of ``u u^T`` and ``u`` for one module (upper triangle blocks).

    A module whose input in a forward pass is the very tensor another module
    with the same input geometry has just measured (attention q/k/v) is
    *linked* to that leader: it keeps no sums of its own and returns the
    leader's statistics, as long as it reads exactly the leader's inputs in
    every batch. The first batch that differs unlinks it: its sums are then
    rebuilt from the leader's sums before that batch plus its own inputs.
    """

    def __init__(self, name, module, chunk_bytes, run, fraction=1.0, seed=0,
                 gram_dtype=torch.float64):
        self.name = name
        self.gram_dtype = gram_dtype
        self.module = module
        self.run = run
        self.chunk_bytes = int(chunk_bytes)
        self.fraction = float(fraction)
        self.gen = torch.Generator().manual_seed(int(seed)) if self.fraction < 1 else None
        w = module.weight
        self.device = w.device
        self.is_conv = isinstance(module, nn.Conv2d)
        if self.is_conv:
            self.groups = int(module.groups)
            kh, kw = module.kernel_size
            self.n = int(module.in_channels // self.groups) * kh * kw
        else:
            self.groups = 1
            self.n = int(module.in_features)
        self.signature = (layer_kind(module), tuple(w.shape[1:]), self.groups,
                          json.dumps(layer_geometry(module)))
        self.shape = (self.n, self.n) if self.groups == 1 else (self.groups, self.n, self.n)
        self.xx = None  # allocated at the first input measured
        self.xs = None
        self.count = 0
        self.batches = 0
        self.calls = 0
        self.first_batch = None
        self.last_batch = None  # last batch this accumulator added data in
        self.pre = None  # (xx, xs, count) before the current batch, kept for followers
        self.masked = False
        # sharing
        self.link = None  # the leader this one follows
        self.followers = []
        self.held = []  # (x, mask, serial) read while linked, this batch
        self.provided = []  # serials of the inputs measured this batch (leaders)

    def _alloc(self):
        if self.xx is None:
            self.xx = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
            self.xs = torch.zeros(self.shape[:-1], dtype=torch.float64, device=self.device)

    # -- the hook ----------------------------------------------------------
    def __call__(self, module, args, kwargs=None):
        # (a layer may be called with its input as a keyword: layer(input=x))
        given = args[0] if args else (kwargs or {}).get("input")
        if not isinstance(given, torch.Tensor):
            raise TypeError(f"layer {self.name!r}: the input is not a tensor (got "
                            f"{type(given).__name__})")
        x = given
        check_not_nested(x, self.name)
        if x.is_meta:
            raise ValueError(f"layer {self.name!r}: its input is on the meta device (no "
                             "data); statistics need real activations")
        x = x.detach()
        if not x.is_floating_point():
            raise TypeError(f"layer {self.name!r}: input has dtype {x.dtype}; a floating "
                            "point input is required")
        run = self.run
        key = (id(given), self.signature)
        seen = [e for e in run.registry.get(key, ()) if e.same(given)]
        if self.link is None and self.calls == 0:
            for e in seen:
                if e.acc.link is None and e.acc.first_batch == run.batch:
                    self.link = e.acc
                    e.acc.followers.append(self)
                    break
        self.calls += 1
        if self.first_batch is None:
            self.first_batch = run.batch
        if self.link is not None:
            for e in seen:
                if e.acc is self.link:
                    self.held.append((x, run.mask, e.serial))
                    return None
            self._unlink()
        # (rows a token mask leaves out never enter the statistics: they may be anything)
        kept = x if self.is_conv or run.mask is None else token_rows(x, run.mask)[0]
        if not bool(torch.isfinite(kept).all()):
            raise ValueError(
                f"layer {self.name!r}: its input contains NaN or inf values (call "
                f"{self.calls - 1}); statistics need finite activations"
            )
        if self.last_batch != run.batch:
            if self.followers:
                self.pre = (None if self.xx is None else self.xx.clone(),
                            None if self.xs is None else self.xs.clone(), self.count)
            self.last_batch = run.batch
            self.provided = []
            self.batches += 1
        self._add(x, run.mask)
        serial = next(run.serial)
        self.provided.append(serial)
        entries = run.registry.setdefault(key, [])
        entries[:] = [e for e in entries if e.ref() is given]  # drop dead ids
        entries.append(_Seen(given, self, serial))
        return None  # the input is left unchanged

    def _add(self, x, mask):
        self._alloc()
        if self.is_conv:
            self._add_conv(x)
        else:
            self._add_linear(x, mask)

    def _unlink(self):
        """Stop following the leader: rebuild own sums (exactly) and add what was held."""
        lead, run = self.link, self.run
        self.link = None
        lead.followers.remove(self)
        if lead.last_batch == run.batch:
            xx, xs, count = lead.pre if lead.pre is not None else (None, None, 0)
        else:
            xx, xs, count = lead.xx, lead.xs, lead.count
        self.xx = None if xx is None else xx.clone()
        self.xs = None if xs is None else xs.clone()
        self.count = count
        self.masked = lead.masked
        self.batches = lead.batches - (lead.last_batch == run.batch)
        held, self.held = self.held, []
        if held:
            self.last_batch = run.batch
            self.batches += 1
            for x, mask, _ in held:
                self._add(x, mask)

    def end_batch(self):
        """After a forward pass: check that a follower read exactly its leader's inputs."""
        if self.link is None:
            return
        lead = self.link
        provided = lead.provided if lead.last_batch == self.run.batch else []
        if sorted(s for _, _, s in self.held) != sorted(provided):
            self._unlink()
        self.held = []

    def _keep(self, shape):
        """Bernoulli(fraction) mask of output positions (None: keep all)."""
        if self.gen is None:
            return None
        # (drawn on the CPU, as the generator is, whatever torch's default device)
        return (torch.rand(shape, generator=self.gen, device="cpu") < self.fraction).to(self.device)

    def _gram(self, X):
        """Add ``X^T X`` of a chunk to the float64 sum (:func:`add_gram`); float32
        CPU chunks reuse one float32 work matrix of the collection."""
        n = X.shape[-1]
        if (X.ndim == 2 and X.device.type == "cpu" and X.dtype == torch.float32
                and self.xx.is_contiguous()):
            work = self.run.buffer("gram", (n, n), torch.float32, "cpu", zero=True)
            add_gram(self.xx, X, work=work)
            return
        add_gram(self.xx, X)

    def _add_rows(self, X):
        """X: (M, n_total) rows of patches (in ``gram_dtype``)."""
        if self.groups > 1:
            X = X.reshape(X.shape[0], self.groups, self.n).transpose(0, 1)  # (G, M, n)
            s = X.sum(dim=1, dtype=torch.float64)
        else:
            s = X.sum(dim=0, dtype=torch.float64)
        self.xs += s
        self._gram(X)
        self.count += int(X.shape[-2])

    def _add_linear(self, x, mask=None):
        if x.ndim < 1 or x.shape[-1] != self.n:
            raise ValueError(
                f"layer {self.name!r}: input has shape {tuple(x.shape)}; a Linear layer "
                f"with in_features={self.n} needs inputs of shape (..., {self.n})"
            )
        x, how = match_token_rows(x, mask)
        if how is not None:
            self.masked = self.run.mask_used = True
        if how == "square" and self.run.square_mask is None:
            self.run.square_mask = (self.name, tuple(mask.shape))
        if how == "seq_first" and self.run.seq_first is None:
            self.run.seq_first = self.name
        if how == "flattened" and self.run.flattened is None:
            self.run.flattened = self.name
        X = x.reshape(-1, self.n).to(self.device)
        rows = max(1, self.chunk_bytes // (self.n * (X.element_size() + 8)))
        for a in range(0, X.shape[0], rows):
            part = X[a:a + rows]
            if part.dtype != self.gram_dtype:
                buf = self.run.buffer("rows", tuple(part.shape), self.gram_dtype, self.device)
                part = buf.copy_(part)
            self._add_rows(part)

    def _add_conv(self, x):
        m = self.module
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != m.in_channels:
            raise ValueError(
                f"layer {self.name!r}: input has shape {tuple(x.shape)}; this Conv2d "
                f"needs inputs of shape (N, {m.in_channels}, H, W)"
            )
        pad = list(m._reversed_padding_repeated_twice)
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        kh, kw = m.kernel_size
        sh, sw = m.stride
        dh, dw = m.dilation
        Hp, Wp = x.shape[-2:]
        Ho = (Hp - dh * (kh - 1) - 1) // sh + 1
        Wo = (Wp - dw * (kw - 1) - 1) // sw + 1
        if Ho < 1 or Wo < 1:
            raise ValueError(
                f"layer {self.name!r}: input of shape {tuple(x.shape)} (padded "
                f"{Hp}x{Wp}) is smaller than the kernel"
            )
        n_tot = m.in_channels * kh * kw
        C, N = m.in_channels, x.shape[0]
        # float64 rows of patches; the chunk is capped at chunk_bytes
        row_bytes = n_tot * Wo * (8 if self.groups == 1 else x.element_size() + 8)
        rows = max(1, self.chunk_bytes // row_bytes)
        if rows >= Ho:
            rows = Ho
            per = max(1, self.chunk_bytes // (row_bytes * Ho))
        else:
            per = 1
        for i in range(0, N, per):
            xi = x[i:i + per]
            nb = xi.shape[0]
            if self.groups == 1:
                # channels-last float64 copy of the (small) input; the patches are a
                # strided view of it, copied once into (h, w, c)-ordered rows
                # (subsampled: in the input's dtype, converted after the gather)
                dt = self.gram_dtype if self.gen is None else xi.dtype
                xl = self.run.buffer("input", (nb, Hp, Wp, C), dt, self.device)
                xl.copy_(xi.permute(0, 2, 3, 1))
                sN, sH, sW, sC = xl.stride()
            for r0 in range(0, Ho, rows):
                r1 = min(r0 + rows, Ho)
                if self.groups == 1:
                    V = xl.as_strided((nb, r1 - r0, Wo, kh, kw, C),
                                      (sN, sh * sH, sw * sW, dh * sH, dw * sW, sC),
                                      xl.storage_offset() + r0 * sh * sH)
                    keep = self._keep((nb, r1 - r0, Wo))
                    if keep is not None:
                        self._add_rows(V[keep].to(self.gram_dtype).reshape(-1, n_tot))
                        continue
                    # the patch rows, copied once into a reused buffer
                    P = self.run.buffer("patches", V.shape, self.gram_dtype, self.device)
                    P.copy_(V)
                    self._add_rows(P.view(-1, n_tot))
                    continue
                xr = xi[:, :, r0 * sh:(r1 - 1) * sh + dh * (kh - 1) + 1]
                U = F.unfold(xr, (kh, kw), dilation=(dh, dw), stride=(sh, sw))
                keep = self._keep((U.shape[0], U.shape[2]))
                if keep is not None:
                    self._add_rows(U.transpose(1, 2)[keep].to(self.gram_dtype))
                    continue
                X = self.run.buffer("patches", (U.shape[0], U.shape[2], n_tot),
                                    self.gram_dtype, self.device)
                X.copy_(U.transpose(1, 2))
                self._add_rows(X.view(-1, n_tot))

    # -- results -----------------------------------------------------------
    def all_reduce(self):
        import torch.distributed as dist

        self._alloc()
        cnt = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        dist.all_reduce(self.xx)
        dist.all_reduce(self.xs)
        dist.all_reduce(cnt)
        self.count = int(round(float(cnt.item())))

    def result(self, dtype=torch.float64):
        """The statistics as a LayerStats; frees the sums (call once).

        Works in place on the sums (mirror of the triangle, reordering of the
        patch entries, scaling), with temporaries of a block of rows only: no
        second matrix of the layer's size is allocated.
        """
        S, mean = self.xx, self.xs
        self.xx = self.xs = None
        _mirror_upper_(S)
        if self.is_conv and self.groups == 1:
            # accumulated in (h, w, c) order; the convention is (c, h, w)
            kh, kw = self.module.kernel_size
            C = self.module.in_channels
            order = torch.arange(self.n, device="cpu").reshape(kh, kw, C).permute(2, 0, 1).reshape(-1)
            _permute_sym_(S, order)
            mean = mean[order.to(mean.device)]
        S /= self.count
        mean /= self.count
        if dtype != torch.float64:
            S, mean = S.to(dtype), mean.to(dtype)
        m = self.module
        return LayerStats(sigma=S, mean=mean, count=self.count, layer=repr(m),
                          groups=self.groups, kind=layer_kind(m), weight_shape=tuple(m.weight.shape),
                          geometry=layer_geometry(m))


def _mirror_upper_(S, block=512):
    """Fill the strict lower triangle of ``S`` (..., n, n) from its upper one, in place.

    Works by blocks of rows, so the only temporary is one diagonal block.
    """
    n = S.shape[-1]
    for a in range(0, n, block):
        b = min(a + block, n)
        if b < n:
            S[..., b:, a:b] = S[..., a:b, b:].transpose(-1, -2)
        D = S[..., a:b, a:b]
        D.copy_(D.triu() + D.triu(1).transpose(-1, -2))
    return S


def _permute_sym_(S, order, block=256):
    """``S[:] = S[order][:, order]`` in place for a symmetric (n, n) ``S``.

    Columns are reordered one block of rows at a time (a temporary of that
    block); rows are then reordered by following the cycles of ``order``
    with one row as temporary. No second (n, n) matrix is allocated.
    """
    n = S.shape[-1]
    idx = order.to(S.device)
    tmp = torch.empty((min(block, n), n), dtype=S.dtype, device=S.device)
    for a in range(0, n, block):
        b = min(a + block, n)
        t = tmp[:b - a]
        torch.index_select(S[a:b], 1, idx, out=t)
        S[a:b] = t
    # rows: new row i is old row order[i]
    perm = order.tolist()
    done = [False] * n
    row = tmp[0]
    for i in range(n):
        if done[i] or perm[i] == i:
            done[i] = True
            continue
        row.copy_(S[i])
        j = i
        while True:
            done[j] = True
            k = perm[j]
            if k == i:
                S[j] = row
                break
            S[j] = S[k]
            j = k
    return S


# ------------------------------------------------------------------- selection


def _is_supported(module):
    return isinstance(module, (nn.Conv2d, nn.Linear))


def _check_predicate(predicate, name):
    """A predicate ``layers=`` must take ``(name, module)``; say so before calling it."""
    try:
        sig = inspect.signature(predicate)
    except (TypeError, ValueError):  # not introspectable (some builtins): trust it
        return
    try:
        sig.bind("", None)
    except TypeError:
        raise TypeError(f"{name}={predicate!r} is not allowed; a predicate {name}= is called "
                        "as f(name, module) with two arguments") from None


def select_layers(model, layers=None, *, name="layers"):
    """The ``(name, module)`` pairs chosen by ``layers``.

    Parameters
    ----------
    model : torch.nn.Module
    layers : None, str, iterable of str, or callable
        ``None`` or ``'all'``: every ``nn.Conv2d`` and ``nn.Linear`` (``'all'``
        names a module only in a model with a module of that name); names
        (dotted, as in ``model.named_modules()``); or a predicate
        ``f(name, module) -> bool`` applied to the ``Conv2d``/``Linear`` modules.
    name : str, optional
        The argument's name in error messages (e.g. ``'refit'`` when the
        names come from ``refit=``).

    Returns
    -------
    list of (str, torch.nn.Module)
        In model order.

    Raises
    ------
    ValueError
        For a name that does not exist or names a module that is not a
        ``Conv2d`` or ``Linear``.

    Examples
    --------
    >>> from torch import nn
    >>> from sigmadecomp_torch import select_layers
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(),
    ...                       nn.Linear(8, 2))
    >>> [name for name, _ in select_layers(model)]
    ['0', '2', '4']
    >>> [name for name, _ in select_layers(model, lambda n, m: isinstance(m, nn.Conv2d))]
    ['0', '2']
    """
    modules = dict(model.named_modules())
    candidates = [(n, m) for n, m in modules.items() if _is_supported(m)]
    if layers is None or (isinstance(layers, str) and layers == "all" and "all" not in modules):
        return candidates
    if callable(layers) and not isinstance(layers, (str, nn.Module)):
        _check_predicate(layers, name)
        return [(n, m) for n, m in candidates if layers(n, m)]
    if isinstance(layers, str):
        layers = [layers]
    try:
        names = list(layers)
    except TypeError:
        raise TypeError(
            f"{name}={layers!r} is not allowed; {name} must be None, a module name, a "
            "list of names or a predicate f(name, module) -> bool"
        ) from None
    order = {n: i for i, n in enumerate(modules)}
    out = []
    for n in names:
        if isinstance(n, str) and n not in modules:
            alias = next((m for path, m in model.named_modules(remove_duplicate=False)
                          if path == n), None)
            if alias is not None:  # a second name of a module registered twice
                first = next(k for k, m in modules.items() if m is alias)
                raise ValueError(
                    f"{name} contains {n!r}, a second name of the module {first!r} (one "
                    f"module registered under both names); name it {first!r}")
        if not isinstance(n, str) or n not in modules:
            avail = ", ".join(repr(c) for c, _ in candidates[:12])
            more = ", ..." if len(candidates) > 12 else ""
            raise ValueError(
                f"{name} contains {n!r}, which is not a module of the model; the "
                f"Conv2d/Linear modules are: {avail}{more}"
            )
        if not _is_supported(modules[n]):
            raise ValueError(
                f"{name} contains {n!r}, a {type(modules[n]).__name__}; only nn.Conv2d "
                "and nn.Linear modules are supported"
            )
        out.append((n, modules[n]))
    out = sorted(dict(out).items(), key=lambda t: order[t[0]])
    return out


# --------------------------------------------------------------------- collect


def collect_covariances(model, data, *, layers=None, max_batches=None, progress=True,
                        device=None, chunk_bytes=_DEFAULT_CHUNK_BYTES, position_fraction=1.0,
                        seed=0, forward=None, mask="auto", dtype=torch.float64,
                        gram_dtype=torch.float64, distributed=None, _checked=False):
    """Second moments of the input patches of a model's Conv2d/Linear layers.

    The model is run over ``data`` (in eval mode, without gradients); a forward
    pre-hook on each chosen layer accumulates the statistics of its input.

    Parameters
    ----------
    model : torch.nn.Module
        Left in the training/eval mode it came in, with no hooks attached
        afterwards (also when a batch raises).
    data : iterable of batches, a tensor or a mapping
        A tensor (or NumPy array) or a mapping ``data`` is one batch. Each
        batch is run by these rules (a NumPy array anywhere below counts as
        a tensor and is converted to one):

        * a tensor ``x``: ``model(x)``;
        * a mapping (a dict, a Hugging Face ``BatchEncoding``):
          ``model(**batch)``, its tensors moved to ``device``;
        * a tuple/list ``(x,)`` or ``(x, y)`` whose first item is a
          floating-point tensor, as a ``DataLoader`` yields images and labels:
          ``model(x)``; ``y`` (the targets) is not used;
        * any other tuple/list (e.g. ``(input_ids, attention_mask)`` or three
          items) is refused with a ``TypeError``: running the model on the first
          item alone would silently drop the others. Pass ``forward`` for it.
    layers : None, str, list of str, or callable, optional
        Which modules (see :func:`select_layers`); default all ``nn.Conv2d``
        and ``nn.Linear`` but those whose parent reads their weight directly
        instead of calling them (``nn.MultiheadAttention.out_proj``, the
        Linear layers of ``nn.TransformerEncoderLayer``): they may never run
        as modules, and no factorized module can replace them.
    max_batches : int, optional
        Stop after this many batches.
    progress : bool, optional
        Show a tqdm bar (when stderr is a terminal or in a Jupyter notebook; never in
        a log file or a pipe).
    device : torch.device or str, optional
        Where batches are sent; default the device of the model's parameters.
        Statistics are kept on the device of each layer's weight.
    chunk_bytes : int, optional
        Memory cap for the patch matrix of one GEMM (default 64 MiB): large
        feature maps are split over samples and output rows.
    position_fraction : float in (0, 1], optional
        Use each output position of a conv with this probability (independent
        Bernoulli draws per sample and position, from ``seed``) instead of all
        of them: the cost of the Gram products drops by this factor and the
        statistics are a consistent estimate from the kept patches (``count``
        is the number kept). Neighbouring patches are strongly correlated, so
        more images at a lower fraction are usually a better use of the same
        time. Measured on a ResNet-18 (8 images of 224x224, fraction 0.25),
        ``||sigma~ - sigma||_F / ||sigma||_F`` was 0.005 on the 56x56 maps,
        about 0.01 at 28x28, 0.014-0.031 at 14x14 and 0.04-0.18 at 7x7; it
        falls as one over the square root of the patches kept
        (``notes/collect_cost.md``). Default 1.0: every position (exact; Proposition 1 then holds on
        the calibration data to rounding). Linear layers always use all rows.
    seed : int, optional
        Seed of the position draws (only used when ``position_fraction < 1``): layer
        ``i`` of the chosen ones draws from ``seed + i``. Under a process group
        (``distributed``) that seed is mixed with the process's rank and the world size
        (:func:`position_seed`), so each process draws its own positions of its own
        batches: reproducible for a given ``seed``, world size and rank, and different
        from the one-process draws.
    forward : callable, optional
        ``forward(model, batch)`` runs the model on one batch, for batches the
        rules above do not cover (the callable moves data to the device
        itself). Its return value is not used.
    mask : "auto", None or callable, optional
        Token mask for padded sequences: a bool (or 0/1) tensor, True/1 for a
        real token (other values, as in an additive attention mask, are
        refused with a ``ValueError``). Rows of a ``Linear`` layer's input whose leading shape
        starts with the mask's shape (``(batch, seq, ..., features)``, or
        ``(seq, batch, ..., features)`` for sequence-first layers) enter the
        statistics only where the mask is true, so ``count`` is the number of
        real tokens. A 2-D input of ``batch * seq`` rows (tokens flattened
        before the layer, ``h.reshape(-1, d)``) is masked by the flattened
        mask, in the mask's row-major (batch, seq) order; a model that
        flattens (seq, batch) tokens needs a mask of that shape (a warning is
        given when one pass met both sequence-first and flattened inputs).
        Inputs of other shapes (e.g. a classifier head after pooling) and
        convolutions use all rows. ``"auto"`` (default): the ``"attention_mask"`` entry of mapping
        batches (Hugging Face convention), no mask otherwise; a callable
        ``mask(batch)`` returns the mask of any batch (e.g.
        ``lambda b: ~b["src_key_padding_mask"]`` for
        ``nn.TransformerEncoder``); None: no mask. A warning is given when a
        mask was found but no chosen layer's input matched its shape.
    dtype : torch.float64 or torch.float32, optional
        Dtype of the returned ``sigma`` and ``mean``. Sums are always
        accumulated in float64; float32 halves the memory of the result
        (relative rounding of about 6e-8 per entry).
    gram_dtype : torch.float64 or torch.float32, optional
        Dtype of the Gram product of each chunk of patches (the chunk's
        ``X^T X``), which is then added to the float64 sums. Default float64:
        exact to float64 rounding. float32 halves the memory traffic of the
        patches and was about 1.1x faster on a ResNet-18 on CPU, but each
        product carries float32 rounding: entries deviate by about 1e-7
        relative to the largest, so a rank-deficient ``sigma`` (few samples,
        ReLU inputs, zero padding) gets negative eigenvalues of about 1e-8
        relative to the largest, which a strict PSD check may reject (see
        ``notes/collect_cost.md`` for the measured figures).
    distributed : None or bool, optional
        ``None`` (default): when a ``torch.distributed`` process group of more
        than one process is initialised, sum the statistics over it. ``True``:
        the same, an uninitialised group being an error (raised before any
        batch is read). ``False``: this process's data alone, no collective
        (for a call that only some processes make). Under a group the outcome of
        the argument checks is exchanged before any batch is read: a process whose
        arguments are refused raises its error, the others a ``RuntimeError``
        naming it. A process with no batches adds zero sums.

    Returns
    -------
    dict of str to LayerStats
        In model order. Grouped convs hold one statistic per group
        (``sigma`` of shape ``(groups, n, n)``). Layers that read the same
        input tensor in every forward pass with the same input geometry (the
        q/k/v projections of attention) share one statistic: their entries
        are the *same* ``LayerStats`` object, computed once, so downstream
        code can factorize it once (test with ``is``). Under a process group
        (``distributed``) the sums are all-reduced over it, so every worker
        returns the statistics of the union of their data. All workers must
        call this function with the same model and layers: before the sums
        are reduced the workers compare their layers (a ``ValueError`` on a
        mismatch) and whether each got through its batches (an error on one
        makes every other raise a ``RuntimeError`` naming it, instead of
        waiting).

    Raises
    ------
    ValueError
        Empty ``data``, an input of the wrong shape, non-finite activations,
        an unknown layer name, a chosen layer that never ran, a model or
        batch on the ``meta`` device, a ``device`` that is not available, or
        a token mask with values other than 0/1.
    TypeError
        A batch the rules above do not cover (pass ``forward``).

    Notes
    -----
    Threads: the forward passes and the Gram products run at torch's and the
    BLAS library's thread counts, capped for the duration of the call at the
    cores free when it starts (:func:`sigmadecomp._threads.busy_machine_threads`:
    on a machine busy with other jobs extra threads only wait and spin);
    inside ``sigmadecomp.threads(n)`` exactly ``n``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import collect_covariances
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
    ...                       nn.Linear(8 * 6 * 6, 4))
    >>> stats = collect_covariances(model, [torch.randn(5, 3, 6, 6)], progress=False)
    >>> list(stats), tuple(stats['0'].sigma.shape), stats['0'].count
    (['0', '3'], (27, 27), 180)

    Padded token batches as a mapping: only the real tokens count.

    >>> lin = nn.Linear(4, 4)
    >>> class Tiny(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb, self.proj = nn.Embedding(10, 4), lin
    ...     def forward(self, input_ids, attention_mask):
    ...         return self.proj(self.emb(input_ids))
    >>> batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
    ...          "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    >>> collect_covariances(Tiny(), [batch], progress=False)["proj"].count
    5
    """
    group = resolve_group(distributed)  # before any batch is read
    # under a process group, a process whose checks fail tells the others (one exchange;
    # none with _checked, internal: the caller's exchanged checks covered these)
    with checking(group, exchange=not _checked):
        check_type(model, nn.Module, "model")
        check_pass_options(chunk_bytes=chunk_bytes, forward=forward, mask=mask,
                           max_batches=max_batches)
        if (isinstance(position_fraction, bool)
                or not isinstance(position_fraction, (int, float))
                or not 0 < position_fraction <= 1):
            raise ValueError(f"position_fraction={position_fraction!r} is not allowed; "
                             "position_fraction must be a number in (0, 1]")
        if dtype not in (torch.float64, torch.float32):
            raise ValueError(f"dtype={dtype!r} is not allowed; dtype must be torch.float64 "
                             "or torch.float32")
        if gram_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"gram_dtype={gram_dtype!r} is not allowed; gram_dtype must be "
                             "torch.float64 or torch.float32")
        check_not_meta(model)
        chosen = select_layers(model, layers)
        if layers is None and chosen:  # (by default, not the layers no forward pass calls)
            chosen = _called_layers(model, chosen)
        if not chosen:
            raise ValueError("the model has no nn.Conv2d or nn.Linear module to collect "
                             f"statistics for (layers={layers!r})")
        signature = [(n, type(m).__name__, tuple(m.weight.shape)) for n, m in chosen]
        data = as_batches(data)  # (a tensor or a mapping is one batch, not its rows or keys)
        if device is None:
            device = model_device(model)
        device = check_device(device, "device")
        if device.type == "meta":
            raise ValueError("device='meta' is not allowed; statistics need real data (use "
                             "the device of the model's weights)")
        seeds = [position_seed(seed, i, group) for i in range(len(chosen))]

    run = _Run()
    accs = {name: _Accumulator(name, m, chunk_bytes, run, position_fraction, seeds[i],
                               gram_dtype)
            for i, (name, m) in enumerate(chosen)}
    handles = []
    n_batches = 0
    mask_seen = False
    try:
        total = len(data) if hasattr(data, "__len__") else None
    except TypeError:
        total = None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    try:
        for name, m in chosen:
            handles.append(m.register_forward_pre_hook(accs[name], with_kwargs=True))
        batches = data if max_batches is None else itertools.islice(data, max_batches)
        it = progress_bar(batches, total=total, enabled=progress and (total is None or total > 1),
                       desc="collect_covariances")
        with eval_modes(model), torch.no_grad(), busy_machine_threads():
            for i, batch in enumerate(it):
                m = batch_mask(mask, batch, i, device)
                mask_seen = mask_seen or m is not None
                run.start(m)
                run_batch(model, batch, i, device, forward)
                for acc in accs.values():
                    acc.end_batch()
                n_batches += 1
    except Exception as exc:
        agree(group, "collecting statistics", signature, error=exc)
        raise
    finally:
        run.release()
        for h in handles:
            h.remove()
    warn_mask_use(run.square_mask, mask_seen, run.mask_used)
    warn_flattened_order(run.seq_first, run.flattened)
    if group is not None:
        agree(group, "collecting statistics", signature)
        _all_reduce(list(accs.values()))
    if all(a.count == 0 and a.link is None for a in accs.values()):
        if any(a.calls > 0 for a in accs.values()):
            raise ValueError("the chosen layers ran, but none of their input rows entered "
                             "the statistics " + _why_no_rows(position_fraction,
                                                              run.mask_used))
        raise ValueError("data yielded no batches (or the chosen layers never ran); "
                         "collect_covariances needs at least one batch")
    results = {}
    for name, acc in accs.items():
        if acc.link is None and acc.count > 0:
            results[name] = acc.result(dtype)
    out = {}
    for name, acc in accs.items():
        src = acc.link.name if acc.link is not None else name
        if src not in results:
            if accs[src].calls > 0:  # it ran, but every row was left out
                what = (f"layer {name!r} ran, but none of its input rows entered the "
                        "statistics " + _why_no_rows(position_fraction, accs[src].masked))
            else:
                what = f"layer {name!r} never ran in the forward pass"
            if layers is not None and not callable(layers):
                raise ValueError(f"{what}; no statistics for it (it was chosen in layers)")
            warnings.warn(f"{what}; it has no statistics", RuntimeWarning,
                          stacklevel=user_stacklevel())
            continue
        out[name] = results[src]
    return out


def _called_layers(model, chosen):
    """``chosen`` without the layers whose parent reads their weight directly instead of
    calling them (``nn.MultiheadAttention.out_proj``): they never run, so they have no
    statistics, and no factorized module can replace them."""
    from .selection import dense_reasons

    reasons = dense_reasons(model, [n for n, _ in chosen])
    return [(n, m) for n, m in chosen if "reads its weight/bias directly" not in reasons.get(n, "")]


def _why_no_rows(position_fraction, masked):
    """The possible causes of a layer that ran but added no rows, in parentheses.

    Parameters
    ----------
    position_fraction : float
        The ``position_fraction`` of the pass (a cause only when below 1).
    masked : bool
        Whether a token mask was applied to the layer's inputs (a cause only then).

    Examples
    --------
    >>> from sigmadecomp_torch.covariance import _why_no_rows
    >>> _why_no_rows(1.0, False)
    '(only batches with zero samples)'
    >>> _why_no_rows(0.01, True)  # doctest: +NORMALIZE_WHITESPACE
    '(only batches with zero samples, or a token mask that is zero everywhere,
    or position_fraction=0.01 too small to draw a position)'
    """
    causes = ["only batches with zero samples"]
    if masked:
        causes.append("a token mask that is zero everywhere")
    if position_fraction < 1:
        causes.append(f"position_fraction={position_fraction!r} too small to draw a position")
    return "(" + ", or ".join(causes) + ")"


def position_seed(seed, index, group=None):
    """Seed of the position draws of the ``index``-th chosen layer (``position_fraction``).

    One process: ``seed + index``. Under a process group (``group`` = ``(rank,
    world_size)`` from :func:`sigmadecomp_torch.parallel.resolve_group`) that number is
    mixed with the rank and the world size (``numpy.random.SeedSequence``), so that the
    processes draw different positions of their batches, each reproducibly.

    Examples
    --------
    >>> from sigmadecomp_torch.covariance import position_seed
    >>> position_seed(7, 2)
    9
    >>> position_seed(7, 2, (0, 2)) != position_seed(7, 2, (1, 2))
    True
    """
    import numbers

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed={seed!r} is not allowed; seed must be an integer")
    base = int(seed) + int(index)
    if group is None:
        return base
    import numpy as np

    rank, world = group
    mixed = np.random.SeedSequence((base % 2 ** 64, int(rank), int(world)))
    return int(mixed.generate_state(1, np.uint64)[0])


def _all_reduce(accs):
    """Sum the statistics over the process group (identical calls on every rank).

    Shared statistics stay shared only if every rank linked the same layers;
    otherwise the followers get their own sums before the reduction.
    """
    import torch.distributed as dist

    index = {id(a): i for i, a in enumerate(accs)}
    # on the statistics' device: a backend such as NCCL reduces device tensors only
    device = accs[0].device if accs else "cpu"
    links = torch.tensor([index[id(a.link)] if a.link is not None else -1 for a in accs],
                         dtype=torch.float64, device=device)
    lo, hi = links.clone(), links.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    for a, x, y in zip(accs, lo.tolist(), hi.tolist()):
        if a.link is not None and x != y:
            lead = a.link
            a.link = None
            lead.followers.remove(a)
            a.xx = None if lead.xx is None else lead.xx.clone()
            a.xs = None if lead.xs is None else lead.xs.clone()
            a.count = lead.count
    for a in accs:
        if a.link is None:
            a.all_reduce()


# save_covariances / load_covariances live in covariance_io (one concept a
# module); they stay importable from here.
from .covariance_io import load_covariances, save_covariances  # noqa: E402
