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
products are not used: their rounding (about 1e-7 relative) makes a
rank-deficient Sigma visibly indefinite. The statistics are sums, so they
merge exactly (``a + b``) and are all-reduced through ``torch.distributed``
when a process group is initialised. For a cheaper estimate,
``position_fraction`` keeps a random subset of the output positions.

Grouped convolutions keep one statistic per group; the factorized layers of
:mod:`sigmadecomp_torch.layers` do not handle groups, so :func:`compress`
skips such layers (with the reason in its report).
"""

from __future__ import annotations

import itertools
import json
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LayerStats",
    "collect_covariances",
    "save_covariances",
    "load_covariances",
    "select_layers",
]

_DEFAULT_CHUNK_BYTES = 1 << 26  # 64 MiB of patches per GEMM


@dataclass(repr=False, eq=False)
class LayerStats:
    """Input statistics of one layer.

    Attributes
    ----------
    sigma : torch.Tensor of shape (n, n), or (groups, n, n) for a grouped conv
        Uncentered second moment of the input patches, float64.
    mean : torch.Tensor of shape (n,), or (groups, n)
        Mean input patch, float64.
    count : int
        Number of patch vectors averaged (samples times output positions).
    layer : str
        Description of the module the statistics came from (its ``repr``).
    groups : int
        Number of convolution groups (one statistic per group when > 1).

    Notes
    -----
    ``a + b`` merges two statistics of the same layer exactly (count-weighted),
    e.g. from two datasets or two workers. :meth:`centered` gives the
    covariance ``sigma - mean mean^T``.

    Examples
    --------
    >>> import torch
    >>> from sigmadecomp_torch import LayerStats
    >>> e, z = torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> a = LayerStats(e, z, 10)
    >>> b = LayerStats(3 * e, z + 1, 30)
    >>> (a + b).sigma.diagonal().tolist(), (a + b).count
    ([2.5, 2.5], 40)
    >>> (a + b).centered()[0].tolist()
    [1.9375, -0.5625]
    """

    sigma: torch.Tensor
    mean: torch.Tensor
    count: int
    layer: str = ""
    groups: int = 1

    def __post_init__(self):
        if not isinstance(self.sigma, torch.Tensor) or not isinstance(self.mean, torch.Tensor):
            raise TypeError("LayerStats: sigma and mean must be torch tensors")
        want = 2 if self.groups == 1 else 3
        if self.sigma.ndim != want or self.sigma.shape[-1] != self.sigma.shape[-2]:
            raise ValueError(
                f"LayerStats: sigma has shape {tuple(self.sigma.shape)}; with groups="
                f"{self.groups} it must be {'(n, n)' if want == 2 else '(groups, n, n)'}"
            )
        if tuple(self.mean.shape) != tuple(self.sigma.shape[:-1]):
            raise ValueError(
                f"LayerStats: mean has shape {tuple(self.mean.shape)}; it must be "
                f"{tuple(self.sigma.shape[:-1])} to match sigma"
            )
        if self.groups > 1 and self.sigma.shape[0] != self.groups:
            raise ValueError(
                f"LayerStats: sigma holds {self.sigma.shape[0]} groups; groups={self.groups}"
            )
        self.count = int(self.count)
        if self.count < 1:
            raise ValueError(f"LayerStats: count={self.count}; it must be at least 1")

    @property
    def n(self):
        """Dimension of one input patch (per group)."""
        return int(self.sigma.shape[-1])

    def centered(self):
        """Covariance ``sigma - mean mean^T`` (same shape as ``sigma``, float64)."""
        m = self.mean.to(torch.float64)
        return self.sigma.to(torch.float64) - m[..., :, None] * m[..., None, :]

    def to(self, device):
        """A copy on ``device``."""
        return LayerStats(self.sigma.to(device), self.mean.to(device), self.count,
                          self.layer, self.groups)

    def __add__(self, other):
        if not isinstance(other, LayerStats):
            return NotImplemented
        if self.sigma.shape != other.sigma.shape or self.groups != other.groups:
            raise ValueError(
                "cannot merge LayerStats of different layers: sigma shapes "
                f"{tuple(self.sigma.shape)} and {tuple(other.sigma.shape)}, groups "
                f"{self.groups} and {other.groups}"
            )
        c = self.count + other.count
        wa, wb = self.count / c, other.count / c
        ob = other.sigma.to(self.sigma.device, torch.float64)
        om = other.mean.to(self.mean.device, torch.float64)
        return LayerStats(wa * self.sigma.to(torch.float64) + wb * ob,
                          wa * self.mean.to(torch.float64) + wb * om,
                          c, self.layer, self.groups)

    def __repr__(self):
        shape = "x".join(str(s) for s in self.sigma.shape)
        return (f"LayerStats(sigma={shape}, count={self.count}, groups={self.groups}, "
                f"layer={self.layer!r})")


# --------------------------------------------------------------------------- hooks


class _Accumulator:
    """Float64 sums of ``u u^T`` and ``u`` for one module (upper triangle blocks)."""

    def __init__(self, name, module, chunk_bytes, fraction=1.0, seed=0):
        self.name = name
        self.module = module
        self.chunk_bytes = int(chunk_bytes)
        self.fraction = float(fraction)
        self.gen = torch.Generator().manual_seed(int(seed)) if self.fraction < 1 else None
        w = module.weight
        self.is_conv = isinstance(module, nn.Conv2d)
        if self.is_conv:
            self.groups = int(module.groups)
            kh, kw = module.kernel_size
            self.n = int(module.in_channels // self.groups) * kh * kw
        else:
            self.groups = 1
            self.n = int(module.in_features)
        shape = (self.n, self.n) if self.groups == 1 else (self.groups, self.n, self.n)
        self.xx = torch.zeros(shape, dtype=torch.float64, device=w.device)
        self.xs = torch.zeros(shape[:-1], dtype=torch.float64, device=w.device)
        self.count = 0
        self.batches = 0

    # -- the hook ----------------------------------------------------------
    def __call__(self, module, args):
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"layer {self.name!r}: the input is not a tensor")
        x = args[0].detach()
        if not x.is_floating_point():
            raise TypeError(f"layer {self.name!r}: input has dtype {x.dtype}; a floating "
                            "point input is required")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"layer {self.name!r}: its input contains NaN or inf values (call "
                f"{self.batches}); statistics need finite activations"
            )
        if self.is_conv:
            self._add_conv(x)
        else:
            self._add_linear(x)
        self.batches += 1
        return None  # the input is left unchanged

    def _keep(self, shape):
        """Bernoulli(fraction) mask of output positions (None: keep all)."""
        if self.gen is None:
            return None
        return (torch.rand(shape, generator=self.gen) < self.fraction).to(self.xx.device)

    def _gram(self, X):
        """Add ``X^T X`` of a float64 (M, n) or (G, M, n) chunk to the sum.

        Only the blocks on and above the diagonal are formed (about half the
        work of the full product); :meth:`result` mirrors the upper triangle.
        """
        n = X.shape[-1]
        block = max(96, -(-n // 8))
        if n <= block:
            self.xx += X.transpose(-1, -2) @ X
            return
        for a in range(0, n, block):
            b = min(a + block, n)
            self.xx[..., a:b, a:] += X[..., :, a:b].transpose(-1, -2) @ X[..., :, a:]

    def _add_rows(self, X):
        """X: (M, n_total) float64 rows of patches."""
        if self.groups > 1:
            X = X.reshape(X.shape[0], self.groups, self.n).transpose(0, 1)  # (G, M, n)
            s = X.sum(dim=1)
        else:
            s = X.sum(dim=0)
        self.xs += s
        self._gram(X)
        self.count += int(X.shape[-2])

    def _add_linear(self, x):
        if x.ndim < 1 or x.shape[-1] != self.n:
            raise ValueError(
                f"layer {self.name!r}: input has shape {tuple(x.shape)}; a Linear layer "
                f"with in_features={self.n} needs inputs of shape (..., {self.n})"
            )
        X = x.reshape(-1, self.n).to(self.xx.device)
        rows = max(1, self.chunk_bytes // (self.n * (X.element_size() + 8)))
        for a in range(0, X.shape[0], rows):
            self._add_rows(X[a:a + rows].to(torch.float64))

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
                dt = torch.float64 if self.gen is None else xi.dtype
                xl = torch.empty((nb, Hp, Wp, C), dtype=dt, device=self.xx.device)
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
                        V = V[keep].to(torch.float64)
                    self._add_rows(V.reshape(-1, n_tot))
                    continue
                xr = xi[:, :, r0 * sh:(r1 - 1) * sh + dh * (kh - 1) + 1]
                U = F.unfold(xr, (kh, kw), dilation=(dh, dw), stride=(sh, sw))
                keep = self._keep((U.shape[0], U.shape[2]))
                if keep is not None:
                    self._add_rows(U.transpose(1, 2)[keep].to(torch.float64))
                    continue
                X = torch.empty((U.shape[0], U.shape[2], n_tot), dtype=torch.float64,
                                device=self.xx.device)
                X.copy_(U.transpose(1, 2))
                self._add_rows(X.view(-1, n_tot))

    # -- results -----------------------------------------------------------
    def all_reduce(self):
        import torch.distributed as dist

        cnt = torch.tensor([float(self.count)], dtype=torch.float64, device=self.xx.device)
        dist.all_reduce(self.xx)
        dist.all_reduce(self.xs)
        dist.all_reduce(cnt)
        self.count = int(round(float(cnt.item())))

    def result(self):
        S = torch.triu(self.xx) + torch.triu(self.xx, 1).transpose(-1, -2)
        mean = self.xs
        if self.is_conv and self.groups == 1:
            # accumulated in (h, w, c) order; the convention is (c, h, w)
            kh, kw = self.module.kernel_size
            C = self.module.in_channels
            S = S.reshape(kh, kw, C, kh, kw, C).permute(2, 0, 1, 5, 3, 4).reshape(self.n, self.n)
            mean = mean.reshape(kh, kw, C).permute(2, 0, 1).reshape(self.n)
        return LayerStats(
            sigma=S / self.count,
            mean=mean / self.count,
            count=self.count,
            layer=repr(self.module),
            groups=self.groups,
        )


# ------------------------------------------------------------------- selection


def _is_supported(module):
    return isinstance(module, (nn.Conv2d, nn.Linear))


def select_layers(model, layers=None, *, name="layers"):
    """The ``(name, module)`` pairs chosen by ``layers``.

    Parameters
    ----------
    model : torch.nn.Module
    layers : None, str, iterable of str, or callable
        ``None``: every ``nn.Conv2d`` and ``nn.Linear``; names (dotted, as in
        ``model.named_modules()``); or a predicate ``f(name, module) -> bool``
        applied to the ``Conv2d``/``Linear`` modules.

    Returns
    -------
    list of (str, torch.nn.Module)
        In model order.

    Raises
    ------
    ValueError
        For a name that does not exist or names a module that is not a
        ``Conv2d`` or ``Linear``.
    """
    modules = dict(model.named_modules())
    candidates = [(n, m) for n, m in modules.items() if _is_supported(m)]
    if layers is None:
        return candidates
    if callable(layers) and not isinstance(layers, (str, nn.Module)):
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


def _batch_input(batch, index):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(
        f"batch {index} of type {type(batch).__name__} is not allowed; each batch must "
        "be a tensor or a tuple/list whose first item is the input tensor"
    )


def _model_device(model):
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _progress(iterable, *, total, enabled, desc):
    if not enabled or not sys.stderr.isatty():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the extra
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def collect_covariances(model, data, *, layers=None, max_batches=None, progress=True,
                        device=None, chunk_bytes=_DEFAULT_CHUNK_BYTES, position_fraction=1.0,
                        seed=0):
    """Second moments of the input patches of a model's Conv2d/Linear layers.

    The model is run over ``data`` (in eval mode, without gradients); a forward
    pre-hook on each chosen layer accumulates the statistics of its input.

    Parameters
    ----------
    model : torch.nn.Module
        Left in the training/eval mode it came in, with no hooks attached
        afterwards (also when a batch raises).
    data : iterable of batches, or a tensor
        Each batch is a tensor or a tuple/list whose first item is the input
        (as a ``DataLoader`` yields). A tensor ``data`` is one batch.
    layers : None, str, list of str, or callable, optional
        Which modules (see :func:`select_layers`); default all ``nn.Conv2d``
        and ``nn.Linear``.
    max_batches : int, optional
        Stop after this many batches.
    progress : bool, optional
        Show a tqdm bar (only when stderr is a terminal).
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
        time. Default 1.0: every position (exact; Proposition 1 then holds on
        the calibration data to rounding). Linear layers always use all rows.
    seed : int, optional
        Seed of the position draws (only used when ``position_fraction < 1``).

    Returns
    -------
    dict of str to LayerStats
        In model order. Grouped convs hold one statistic per group
        (``sigma`` of shape ``(groups, n, n)``). When a ``torch.distributed``
        process group is initialised the sums are all-reduced over it, so
        every worker returns the statistics of the union of their data (all
        workers must call this function with the same model and layers).

    Raises
    ------
    ValueError
        Empty ``data``, an input of the wrong shape, non-finite activations,
        an unknown layer name, or a chosen layer that never ran.

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
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model of type {type(model).__name__} is not allowed; model must "
                        "be a torch.nn.Module")
    if max_batches is not None:
        if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
            raise ValueError(f"max_batches={max_batches!r} is not allowed; max_batches must "
                             "be None or a positive integer")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes!r} is not allowed; chunk_bytes must be "
                         "a positive integer")
    if (isinstance(position_fraction, bool) or not isinstance(position_fraction, (int, float))
            or not 0 < position_fraction <= 1):
        raise ValueError(f"position_fraction={position_fraction!r} is not allowed; "
                         "position_fraction must be a number in (0, 1]")
    chosen = select_layers(model, layers)
    if not chosen:
        raise ValueError("the model has no nn.Conv2d or nn.Linear module to collect "
                         f"statistics for (layers={layers!r})")
    if isinstance(data, torch.Tensor):
        data = [data]
    if device is None:
        device = _model_device(model)
    device = torch.device(device)

    accs = {name: _Accumulator(name, m, chunk_bytes, position_fraction, seed + i)
            for i, (name, m) in enumerate(chosen)}
    modes = {m: m.training for m in model.modules()}
    handles = []
    n_batches = 0
    try:
        total = len(data) if hasattr(data, "__len__") else None
    except TypeError:
        total = None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    try:
        for name, m in chosen:
            handles.append(m.register_forward_pre_hook(accs[name]))
        model.eval()
        batches = data if max_batches is None else itertools.islice(data, max_batches)
        it = _progress(batches, total=total, enabled=progress and (total is None or total > 1),
                       desc="collect_covariances")
        with torch.no_grad():
            for i, batch in enumerate(it):
                x = _batch_input(batch, i).to(device)
                model(x)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for name in accs:
            accs[name].all_reduce()
    if all(a.count == 0 for a in accs.values()):
        raise ValueError("data yielded no batches (or the chosen layers never ran); "
                         "collect_covariances needs at least one batch")
    out = {}
    for name, acc in accs.items():
        if acc.count == 0:
            if layers is not None and not callable(layers):
                raise ValueError(f"layer {name!r} was chosen in layers but never ran in "
                                 "the forward pass; no statistics for it")
            warnings.warn(f"layer {name!r} never ran in the forward pass; it has no "
                          "statistics", RuntimeWarning, stacklevel=2)
            continue
        out[name] = acc.result()
    return out


# ------------------------------------------------------------------ save/load


def save_covariances(stats, path):
    """Save a mapping ``name -> LayerStats`` as plain tensors.

    Parameters
    ----------
    stats : dict of str to LayerStats
    path : str or os.PathLike
        A name ending in ``.safetensors`` uses the safetensors format
        (tensors ``<name>.sigma``, ``<name>.mean``, metadata for counts and
        layers); anything else is a ``torch.save`` file holding a dict of plain
        tensors, ints and strings (loadable with ``weights_only=True``).

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from sigmadecomp_torch import LayerStats, save_covariances, load_covariances
    >>> s = {"fc": LayerStats(torch.eye(3, dtype=torch.float64),
    ...                       torch.zeros(3, dtype=torch.float64), 7, "Linear")}
    >>> path = os.path.join(tempfile.mkdtemp(), "stats.pt")
    >>> save_covariances(s, path)
    >>> load_covariances(path)["fc"]
    LayerStats(sigma=3x3, count=7, groups=1, layer='Linear')
    """
    path = str(path)
    for k, v in stats.items():
        if not isinstance(v, LayerStats):
            raise TypeError(f"stats[{k!r}] is a {type(v).__name__}; save_covariances "
                            "needs a mapping of name -> LayerStats")
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        tensors = {}
        meta = {}
        for k, v in stats.items():
            tensors[f"{k}.sigma"] = v.sigma.detach().cpu().contiguous()
            tensors[f"{k}.mean"] = v.mean.detach().cpu().contiguous()
            meta[k] = {"count": v.count, "layer": v.layer, "groups": v.groups}
        save_file(tensors, path, metadata={"sigmadecomp.layers": json.dumps(meta)})
        return
    payload = {
        k: {"sigma": v.sigma.detach().cpu(), "mean": v.mean.detach().cpu(),
            "count": int(v.count), "layer": str(v.layer), "groups": int(v.groups)}
        for k, v in stats.items()
    }
    torch.save({"format": "sigmadecomp.covariances/1", "layers": payload}, path)


def load_covariances(path, *, map_location="cpu"):
    """Load statistics written by :func:`save_covariances`.

    Parameters
    ----------
    path : str or os.PathLike
    map_location : str or torch.device, optional
        Device of the loaded tensors (default CPU).

    Returns
    -------
    dict of str to LayerStats
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        out = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {}).get("sigmadecomp.layers", "{}"))
            for k, info in meta.items():
                out[k] = LayerStats(f.get_tensor(f"{k}.sigma").to(map_location),
                                    f.get_tensor(f"{k}.mean").to(map_location),
                                    int(info["count"]), str(info["layer"]),
                                    int(info["groups"]))
        return out
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != "sigmadecomp.covariances/1":
        raise ValueError(f"{path!r} is not a statistics file written by save_covariances")
    return {k: LayerStats(v["sigma"], v["mean"], v["count"], v["layer"], v["groups"])
            for k, v in obj["layers"].items()}
