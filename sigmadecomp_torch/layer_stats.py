"""The input statistics of one layer (:class:`LayerStats`) and the layer facts they record.

A :class:`LayerStats` holds Sigma, the mean and the count of a layer's input
patches together with the layer's kind, weight shape and geometry, so that
statistics are not applied to a layer of another kind, size or geometry
(:meth:`LayerStats.check_compatible`); statistics of two layers with the same
kind, input size and geometry cannot be told apart by these facts.
Collected by :func:`sigmadecomp_torch.collect_covariances`, saved and loaded by
:mod:`sigmadecomp_torch.covariance_io`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerStats", "layer_geometry", "layer_kind"]


def layer_kind(module):
    """Canonical kind of a supported module ("Conv2d" or "Linear")."""
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    if isinstance(module, nn.Linear):
        return "Linear"
    return type(module).__name__


def layer_geometry(module):
    """Conv geometry of a module (None for a Linear layer), JSON-friendly."""
    if not isinstance(module, nn.Conv2d):
        return None
    pad = module.padding if isinstance(module.padding, str) else list(module.padding)
    return {"kernel_size": list(module.kernel_size), "stride": list(module.stride),
            "padding": pad, "dilation": list(module.dilation),
            "padding_mode": str(module.padding_mode)}


def _describe(kind, weight_shape, geometry, groups):
    shape = "x".join(str(int(s)) for s in weight_shape) if weight_shape is not None else "?"
    out = f"{kind} with weight {shape}"
    if geometry:
        g = geometry
        out += (f", kernel_size={tuple(g['kernel_size'])}, stride={tuple(g['stride'])}, "
                f"padding={g['padding'] if isinstance(g['padding'], str) else tuple(g['padding'])}"
                f", dilation={tuple(g['dilation'])}, padding_mode={g['padding_mode']!r}")
    if kind == "Conv2d":
        out += f", groups={groups}"
    return out


def _within_rounding(c, sigma, stored):
    """The float64 covariance ``c`` of float32 statistics, rounding below 0 clipped.

    ``c`` is ``sigma - mean mean^T`` formed in float64 from the ``stored``
    dtype. When it passes the float64 PSD test (with a margin), it is returned
    as it is. Otherwise its eigenvalues down to ``-neg_rtol(stored) *
    lambda_max(sigma)`` are set to 0 (the rounding of the stored moments moves
    them by about ``eps(stored) * lambda_max(sigma)``, ``mean mean^T`` being
    at most ``sigma``). With a lower one, ``c`` is returned as it is, for the
    PSD test of its user to refuse: it fails that test, since
    ``neg_rtol(stored) * lambda_max(sigma) >= NEG_RTOL["float64"] * lambda_max(c)``.
    """
    from sigmadecomp._validation import lambda_max_lower, neg_rtol

    c_sym = 0.5 * (c + c.T)
    top = lambda_max_lower(c_sym)
    if top > 0.0:
        shifted = c_sym.clone()
        shifted.diagonal().add_(0.5 * neg_rtol(torch.float64) * top)
        if int(torch.linalg.cholesky_ex(shifted).info) == 0:
            return c
    lam, V = torch.linalg.eigh(c_sym)
    # lambda_max(c) <= lambda_max(sigma): both are lower bounds of the latter
    scale = max(lambda_max_lower(0.5 * (sigma + sigma.T)), float(lam[-1]))
    if float(lam[0]) < -neg_rtol(stored) * scale:
        return c  # not rounding: the caller's PSD test refuses it (naming the layer)
    out = (V * lam.clamp(min=0.0)) @ V.T
    return 0.5 * (out + out.T)


@dataclass(repr=False, eq=False)
class LayerStats:
    """Input statistics of one layer.

    Attributes
    ----------
    sigma : torch.Tensor of shape (n, n), or (groups, n, n) for a grouped conv
        Uncentered second moment of the input patches; float64 (or float32
        when collected with ``dtype=torch.float32``).
    mean : torch.Tensor of shape (n,), or (groups, n)
        Mean input patch, same dtype as ``sigma``.
    count : int
        Number of patch vectors averaged (samples times output positions;
        real tokens only when a mask was used).
    layer : str
        Description of the module the statistics came from (its ``repr``).
    groups : int
        Number of convolution groups (one statistic per group when > 1).
    kind : str or None
        ``"Conv2d"`` or ``"Linear"``: the kind of layer measured (None when
        unknown, e.g. statistics built by hand).
    weight_shape : tuple of int or None
        Shape of that layer's weight.
    geometry : dict or None
        For a conv: ``kernel_size``, ``stride``, ``padding``, ``dilation`` and
        ``padding_mode``; None for a Linear layer or when unknown.

    Notes
    -----
    ``a + b`` merges two statistics of the same layer exactly (count-weighted,
    in float64, stored in the wider of the two dtypes), e.g. from two
    datasets or two workers; ``sum([a, b, c])`` merges a list. :meth:`centered` gives the
    covariance ``sigma - mean mean^T``. :meth:`check_compatible` refuses to
    use the statistics for a layer of another kind or geometry.

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
    kind: str | None = None
    weight_shape: tuple | None = None
    geometry: dict | None = None

    def __post_init__(self):
        if not isinstance(self.sigma, torch.Tensor) or not isinstance(self.mean, torch.Tensor):
            raise TypeError("LayerStats: sigma and mean must be torch tensors")
        if not self.sigma.is_floating_point() or not self.mean.is_floating_point():
            raise TypeError(f"LayerStats: sigma and mean have dtypes {self.sigma.dtype} and "
                            f"{self.mean.dtype}; they must be floating point")
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
        if isinstance(self.count, bool) or not isinstance(self.count, numbers.Integral):
            if not (isinstance(self.count, numbers.Real) and float(self.count).is_integer()):
                raise TypeError(f"LayerStats: count={self.count!r}; it must be a whole number "
                                "(the patch vectors averaged)")
        self.count = int(self.count)
        if self.count < 1:
            raise ValueError(f"LayerStats: count={self.count}; it must be at least 1")
        if self.kind is not None and self.kind not in ("Conv2d", "Linear"):
            raise ValueError(f"LayerStats: kind={self.kind!r}; it must be 'Conv2d', 'Linear' "
                             "or None")
        if self.weight_shape is not None:
            self.weight_shape = tuple(int(s) for s in self.weight_shape)
            if self.kind is not None:
                # the record must describe a layer whose input patch is sigma's size
                dims = 4 if self.kind == "Conv2d" else 2
                size = 1
                for s in self.weight_shape[1:]:
                    size *= s
                if len(self.weight_shape) != dims or size != self.n:
                    raise ValueError(
                        f"LayerStats: weight_shape={self.weight_shape} does not fit a "
                        f"{self.kind} whose sigma has n={self.n}: it must have {dims} "
                        f"entries whose product after the first is n")

    @property
    def n(self):
        """Dimension of one input patch (per group)."""
        return int(self.sigma.shape[-1])

    def centered(self):
        """Covariance ``sigma - mean mean^T`` (same shape as ``sigma``, float64).

        Formed in float64. Statistics stored in float32 carry the rounding of
        that storage (about ``1e-7`` of ``sigma``'s scale); for a
        rank-deficient ``sigma`` (fewer patches than its size, or constant
        inputs) it makes the covariance slightly indefinite, beyond what the
        PSD test of a float64 matrix (:func:`sigmadecomp.sigma.psd_root`)
        allows. Eigenvalues of the covariance between ``-NEG_RTOL[dtype] *
        lambda_max(sigma)`` (the library's tolerance for a ``sigma`` of the
        stored dtype: ``1e-4`` for float32) and 0 are then set to 0. The
        covariance is returned unchanged when it passes the float64 test, and
        always for float64 statistics. An eigenvalue below the bound is kept:
        rounding cannot explain it (``sigma`` and ``mean`` are not the second
        moment and the mean of the same inputs), and the PSD test of the
        matrix's users (``compress(..., centered=True)``) refuses it, naming
        the layer.

        Examples
        --------
        >>> import torch
        >>> from sigmadecomp_torch import LayerStats
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 0.4]], dtype=torch.float64)
        >>> s = LayerStats(x.T @ x / 2, x.mean(0), 2).to(dtype=torch.float32)
        >>> m = s.mean.double()   # rank 1, but rounded below 0 when formed directly:
        >>> float(torch.linalg.eigvalsh(s.sigma.double() - m[:, None] * m[None, :])[0])
        -9.46...e-08
        >>> c = s.centered()
        >>> c.dtype, float(torch.linalg.eigvalsh(c)[0]) >= -1e-15
        (torch.float64, True)
        >>> bad = LayerStats(torch.eye(2), torch.tensor([0.0, 3.0]), 5)  # not of one input
        >>> torch.linalg.eigvalsh(bad.centered()).tolist()
        [-8.0, 1.0]
        """
        m = self.mean.to(torch.float64)
        sigma = self.sigma.to(torch.float64)
        c = sigma - m[..., :, None] * m[..., None, :]
        # the less precise of the two stored dtypes sets the rounding
        stored = max((self.sigma.dtype, self.mean.dtype), key=lambda t: torch.finfo(t).eps)
        if stored == torch.float64 or c.numel() == 0 or not bool(torch.isfinite(c).all()):
            return c  # (non-finite values are refused by the caller's checks)
        if c.ndim == 2:
            return _within_rounding(c, sigma, stored)
        return torch.stack([_within_rounding(c[g], sigma[g], stored) for g in range(len(c))])

    def _meta(self):
        return dict(layer=self.layer, groups=self.groups, kind=self.kind,
                    weight_shape=self.weight_shape, geometry=self.geometry)

    def to(self, device=None, dtype=None):
        """A copy on ``device`` and/or in floating ``dtype``."""
        return LayerStats(self.sigma.to(device=device, dtype=dtype),
                          self.mean.to(device=device, dtype=dtype), self.count, **self._meta())

    def check_compatible(self, module, name=None):
        """Raise unless these statistics describe the input of ``module``.

        The statistics of a layer depend on its input side only: the kind of
        layer, the input size of its weight (``weight.shape[1:]``), its conv
        geometry and its groups. Those must all match; the number of output
        channels may differ (layers that read the same input share one
        statistic). Statistics without a recorded kind (built by hand) are
        checked on ``n`` and ``groups`` only.

        Parameters
        ----------
        module : torch.nn.Conv2d or torch.nn.Linear
        name : str, optional
            The layer's name, used in the message.

        Raises
        ------
        ValueError
            When the statistics were collected on a layer of another kind,
            input size or geometry.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from sigmadecomp_torch import collect_covariances
        >>> conv = nn.Conv2d(2, 4, 3, padding=1)
        >>> s = collect_covariances(conv, torch.randn(1, 2, 5, 5), progress=False)[""]
        >>> s.check_compatible(nn.Conv2d(2, 8, 3, padding=1))   # other output size: fine
        >>> s.check_compatible(nn.Conv2d(2, 4, 3, stride=2, padding=1), "b")
        Traceback (most recent call last):
        ...
        ValueError: covariances['b'] were collected on a Conv2d with weight 4x2x3x3, ...
        """
        label = "covariances" if name is None else f"covariances[{name!r}]"
        kind = layer_kind(module)
        w = getattr(module, "weight", None)
        if kind not in ("Conv2d", "Linear") or not isinstance(w, torch.Tensor):
            raise TypeError(f"{label}: check_compatible needs an nn.Conv2d or nn.Linear "
                            f"module, got {type(module).__name__}")
        groups = int(module.groups) if kind == "Conv2d" else 1
        geometry = layer_geometry(module)
        n = int(w[0].numel())
        mine = _describe(self.kind or "layer", self.weight_shape, self.geometry, self.groups)
        theirs = _describe(kind, tuple(w.shape), geometry, groups)
        if self.kind is None:
            if self.n != n or self.groups != groups:
                raise ValueError(
                    f"{label} has sigma of shape {tuple(self.sigma.shape)}; the layer "
                    f"({theirs}) needs ({n}, {n}) with groups={groups}"
                )
            return
        same = (self.kind == kind and self.groups == groups
                and (self.weight_shape is None
                     or tuple(self.weight_shape[1:]) == tuple(w.shape[1:]))
                and self.geometry == geometry and self.n == n)
        if not same:
            raise ValueError(
                f"{label} were collected on a {mine}; the layer is a {theirs}. Statistics "
                "of a layer with another kind, input size or geometry cannot be used "
                "(collect them on this model)"
            )

    def __add__(self, other):
        if not isinstance(other, LayerStats):
            return NotImplemented
        if self.sigma.shape != other.sigma.shape or self.groups != other.groups:
            raise ValueError(
                "cannot merge LayerStats of different layers: sigma shapes "
                f"{tuple(self.sigma.shape)} and {tuple(other.sigma.shape)}, groups "
                f"{self.groups} and {other.groups}"
            )
        if (self.kind is not None and other.kind is not None
                and (self.kind, self.geometry) != (other.kind, other.geometry)):
            raise ValueError(
                "cannot merge LayerStats of different layers: "
                f"{_describe(self.kind, self.weight_shape, self.geometry, self.groups)} and "
                f"{_describe(other.kind, other.weight_shape, other.geometry, other.groups)}"
            )
        c = self.count + other.count
        wa, wb = self.count / c, other.count / c
        ob = other.sigma.to(self.sigma.device, torch.float64)
        om = other.mean.to(self.mean.device, torch.float64)
        meta = self._meta() if self.kind is not None else other._meta()
        # merged in float64, stored in the wider of the two storage types
        dtype = torch.promote_types(self.sigma.dtype, other.sigma.dtype)
        return LayerStats((wa * self.sigma.to(torch.float64) + wb * ob).to(dtype),
                          (wa * self.mean.to(torch.float64) + wb * om).to(dtype), c, **meta)

    def __radd__(self, other):
        if isinstance(other, numbers.Number) and other == 0:  # sum([a, b, ...]) starts at 0
            return self
        return NotImplemented

    def __repr__(self):
        shape = "x".join(str(s) for s in self.sigma.shape)
        return (f"LayerStats(sigma={shape}, count={self.count}, groups={self.groups}, "
                f"layer={self.layer!r})")
