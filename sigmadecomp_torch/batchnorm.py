"""Data-free input statistics from the BatchNorm layers of a trained model.

A layer whose input is ``ReLU(BN(y))`` (or ``BN(y)``, or ``ReLU`` of a sum of
BatchNorm branches as in a residual block) has, per channel ``c``, a
pre-activation ``z_c`` with mean ``beta_c`` and variance
``gamma_c^2 v_c / (v_c + eps)`` (``v_c`` the running variance): in eval mode
BatchNorm is affine in the standardised ``y_c``. :func:`covariances_from_batchnorm`
turns this into the second moment ``Sigma`` of the layer's input patches
(and their mean) without any data. The per-channel marginals always come
from BatchNorm; what couples channels and positions is one of three models
(``spatial=``):

* ``"propagate"`` (the default when ``input_shape=(C, H, W)`` is given):
  smooth Gaussian-noise images (:func:`sigmadecomp_torch.data.synthetic_images`)
  are pushed through a copy of the model whose BatchNorm layers normalise
  with the statistics of each batch, so that every BatchNorm output has
  exactly the mean ``beta`` and standard deviation ``|gamma| sqrt(v / (v +
  eps))`` it has on the training data (``v`` its running variance; the
  affine weight of the copy carries that factor and its ``eps`` is
  negligible), while the correlations between channels and positions are
  those the network's own weights create; the patch statistics are then
  collected as :func:`collect_covariances` does. This is a Monte-Carlo
  propagation of the moments through every layer, not only the last one.
* ``"kernel"`` (the default otherwise): a stationary Gaussian field whose
  correlations are those of ``y = conv(K, x)`` for the producing layer's
  kernel ``K`` and a white input ``x`` (independent, unit variance per
  channel and position): ``Cov(y_c(p), y_c'(p + d)) = sum_{s,a} K[c,s,a]
  K[c',s,a-e]`` with ``e = stride * d / dilation`` of the producer; added
  branches (residual blocks) are taken as independent. ReLU moments are
  exact for a rectified bivariate Gaussian:
  ``E[X+ Y+] = s1 s2 [(ab + r) Phi2(a, b; r) + a phi(b) Phi((a - r b)/q)
  + b phi(a) Phi((b - r a)/q) + q phi(a) phi((b - r a)/q)]`` with
  ``a = m1/s1``, ``b = m2/s2``, correlation ``r``, ``q = sqrt(1 - r^2)``,
  ``Phi2`` through Owen's T function (:func:`relu_moments`). The patch
  matrix ``Sigma[(s,h,w),(s',h',w')]`` is the field moment at offset
  ``((h'-h) dh, (w'-w) dw)`` times the fraction of output positions at which
  both entries lie inside the input (zero padding; needs ``input_shape``,
  without it the maps are taken as infinite).
* ``"independent"``: the same without any correlation (channels and
  positions independent; cross terms are products of the means).

**Shrinkage** toward the Frobenius metric,
``Sigma_a = (1 - a) Sigma + a tr(Sigma)/n I`` (with the mean scaled by
``sqrt(1 - a)``, so that the covariance shrinks the same way). With
``shrinkage="bn"`` (the default) ``a`` is fitted per layer to the layer's
*own* output BatchNorm, where there is one: its running variances are
measurements of the true input covariance ``C`` along the rows ``k_c`` of the
weight, ``running_var_c = k_c^T C k_c`` -- the very quadratic forms the
Sigma-error is made of. ``a`` in ``[0, 1]`` minimises the spread over
channels of ``log(k_c^T C_a k_c / running_var_c)`` (a global scale is free,
it changes no decomposition); ``a = 1`` is chosen when the model explains
these variances no better than the Frobenius metric does. Layers without
such a BatchNorm get the median ``a`` of the fitted layers (0.5 if none).
``shrinkage="bn-gain"`` also fits a gain of the model's correlations
(non-negative least squares on the same equations).

Finding the BatchNorm feeding a layer needs the graph: ``graph="fx"`` traces
the model with :func:`torch.fx.symbolic_trace` (additions of branches, ReLU as
module, function or method, Identity and Dropout are followed);
``graph="sequential"`` reads the children of ``nn.Sequential`` containers in
order (a layer is modelled when the modules just before it in its own
``nn.Sequential`` are BatchNorm [+ ReLU]; residual additions and layers outside
an ``nn.Sequential`` are not seen); ``"auto"`` tries fx first and falls back
to the containers when tracing fails. Layers whose input comes from anything
else (pooling, flatten, concatenation, another activation, the model input,
a grouped conv, ...) are listed in the report with the reason.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from sigmadecomp_torch import covariances_from_batchnorm
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
...                       nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
...                       nn.Conv2d(16, 4, 1))
>>> _ = model(torch.randn(32, 3, 12, 12))   # (training mode: BatchNorm records statistics)
>>> _ = model.eval()
>>> stats, report = covariances_from_batchnorm(model, input_shape=(3, 12, 12), samples=64)
>>> sorted(stats), stats['3'].sigma.shape
(['3', '6'], torch.Size([72, 72]))
>>> report.skipped
{'0': "its input is the model input 'input', not a BatchNorm output"}

One concept, data-free statistics from BatchNorm (the moment formulas, the
graph reading that finds each layer's BatchNorm and the fitted shrinkage
serve only this); longer than most modules for that reason.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._batches import check_not_meta, check_type, eval_modes
from .covariance import select_layers
from .layer_stats import LayerStats, layer_geometry, layer_kind

__all__ = ["covariances_from_batchnorm", "BatchNormReport", "relu_moments"]

_SPATIAL = ("auto", "propagate", "kernel", "independent")
_GRAPHS = ("auto", "fx", "sequential")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)

#: ``eps`` of the BatchNorm layers of the ``"propagate"`` copy: far below any
#: variance of real activations, it only keeps a constant (dead) channel finite.
_PROPAGATE_EPS = 1e-12
_PASS = (nn.Identity, nn.Dropout, nn.Dropout2d)
_DEFAULT_SHRINKAGE = 0.5
_FITS = ("bn", "bn-gain")


class _Unmodelled(Exception):
    """The input of a layer is not something this module can describe."""


@dataclass
class _Source:
    relu: bool
    branches: list  # of (bn name, producer name or None)
    output_bn: str | None = None


@dataclass
class BatchNormReport:
    """What :func:`covariances_from_batchnorm` did, per layer.

    Attributes
    ----------
    modelled : dict of str to dict
        Per modelled layer: ``branches`` (list of ``(bn, producer)`` names),
        ``relu``, ``spatial`` (the model used for each branch), ``shrinkage``
        (the ``a`` used), ``gain`` (the correlation gain, 1 unless
        ``shrinkage="bn-gain"``), ``fitted`` (whether ``a`` was fitted to an output
        BatchNorm, and its name), ``fit_spread`` (the spread of the log
        variance ratios at ``a = 0``, at the chosen ``a`` and at ``a = 1``).
    skipped : dict of str to str
        The layers not modelled, with the reason.
    graph : str
        How the graph was read (``"fx"`` or ``"sequential"``, with the
        reason fx was not used when it failed).
    notes : list of str
        What makes the statistics doubtful although they were computed (each
        also raised as a :class:`~sigmadecomp.CompressionWarning`): BatchNorm
        layers whose running statistics were never updated (still the
        initial mean 0 and variance 1), BatchNorm layers in training mode.
    """

    modelled: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    graph: str = ""
    notes: list = field(default_factory=list)

    def __repr__(self):
        lines = [f"covariances_from_batchnorm (graph: {self.graph}): "
                 f"{len(self.modelled)} layers modelled, {len(self.skipped)} not"]
        for name, info in self.modelled.items():
            src = " + ".join(f"BN {bn!r}" + (f" of {p!r}" if p else "")
                             for bn, p in info["branches"])
            fit = f" (fitted to {info['fitted']!r})" if info["fitted"] else ""
            lines.append(f"  {name}: {'ReLU(' if info['relu'] else '('}{src}), "
                         f"spatial={'/'.join(info['spatial'])}, a={info['shrinkage']:.2f}, "
                         f"g={info['gain']:.2f}{fit}")
        for name, reason in self.skipped.items():
            lines.append(f"  not modelled {name}: {reason}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


# ---------------------------------------------------------------- moments


def _phi(x):
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x):
    from scipy.special import ndtr

    return ndtr(x)


def _bvn_cdf(h, k, r):
    """P(U < h, V < k) for standard normals of correlation r (|r| < 1), by Owen's T."""
    from scipy.special import owens_t

    tiny = 1e-10
    h = np.where(np.abs(h) < tiny, tiny, h)
    k = np.where(np.abs(k) < tiny, tiny, k)
    q = np.sqrt(1.0 - r * r)
    beta = np.where(h * k > 0, 0.0, 0.5)
    return (0.5 * (_Phi(h) + _Phi(k)) - owens_t(h, (k - r * h) / (h * q))
            - owens_t(k, (h - r * k) / (k * q)) - beta)


def relu_moments(mean1, mean2, std1, std2, rho):
    """``E[max(X, 0) max(Y, 0)]`` for jointly Gaussian ``X, Y`` (arrays broadcast).

    Parameters
    ----------
    mean1, mean2 : array_like
        Means of ``X`` and ``Y``.
    std1, std2 : array_like
        Standard deviations (> 0).
    rho : array_like
        Correlation in ``[-1, 1]``; ``|rho| = 1`` is evaluated at
        ``+-(1 - 1e-9)`` (use ``X is Y`` moments on the diagonal:
        ``relu_moments(m, m, s, s, 1.0)`` is exact to that order).

    Returns
    -------
    numpy.ndarray of float64

    Raises
    ------
    ValueError
        For a mean that is not finite, a standard deviation that is not
        finite and positive, or a correlation outside ``[-1, 1]``.

    Examples
    --------
    >>> from sigmadecomp_torch.batchnorm import relu_moments
    >>> float(relu_moments(0.0, 0.0, 1.0, 1.0, 0.0))   # E[X+]^2 = 1/(2 pi)
    0.15915494309189535
    >>> round(float(relu_moments(0.0, 0.0, 1.0, 1.0, 1.0)), 6)   # E[X+^2] = 1/2
    0.5
    """
    m1, m2, s1, s2, r = (np.asarray(v, dtype=np.float64) for v in (mean1, mean2, std1, std2, rho))
    for name, v, ok, allowed in (
            ("mean1", m1, np.isfinite(m1), "finite"), ("mean2", m2, np.isfinite(m2), "finite"),
            ("std1", s1, np.isfinite(s1) & (s1 > 0), "finite and > 0"),
            ("std2", s2, np.isfinite(s2) & (s2 > 0), "finite and > 0"),
            ("rho", r, (r >= -1) & (r <= 1), "in [-1, 1]")):
        if not np.all(ok):
            bad = float(v[~ok].flat[0])
            raise ValueError(f"{name} has the value {bad!r}, which is not allowed; {name} must "
                             f"be {allowed}")
    r = np.clip(r, -1 + 1e-9, 1 - 1e-9)
    a, b = m1 / s1, m2 / s2
    q = np.sqrt(1.0 - r * r)
    ca, cb = (a - r * b) / q, (b - r * a) / q
    joint = np.exp(-0.5 * (a * a - 2 * r * a * b + b * b) / (q * q)) / (2 * math.pi)
    val = ((a * b + r) * _bvn_cdf(a, b, r) + a * _phi(b) * _Phi(ca) + b * _phi(a) * _Phi(cb)
           + q * joint)
    # the mean of a product of two non-negative variables: a rounding below zero is zero
    return s1 * s2 * np.maximum(val, 0.0)


def _relu_second(mean, std):
    """``E[max(X, 0)^2]`` for ``X ~ N(mean, std^2)``."""
    a = mean / std
    return std * std * ((a * a + 1) * _Phi(a) + a * _phi(a))


def _relu_first(mean, std):
    a = mean / std
    return std * (a * _Phi(a) + _phi(a))


# ------------------------------------------------------ pre-activation model


def _bn_affine(bn):
    """(mean, std) of BN's output per channel from its parameters and running variance."""
    rv = bn.running_var.detach().to(torch.float64).cpu().numpy()
    C = rv.shape[0]
    gamma = (bn.weight.detach().to(torch.float64).cpu().numpy() if bn.weight is not None
             else np.ones(C))
    beta = (bn.bias.detach().to(torch.float64).cpu().numpy() if bn.bias is not None
            else np.zeros(C))
    std = np.abs(gamma) * np.sqrt(rv / (rv + bn.eps))
    return beta, std, np.sign(gamma) + (gamma == 0)


def _kernel_correlation(producer, offsets):
    """Correlations of ``producer``'s output channels at ``offsets`` under a white input.

    Returns ``(C, C, len(offsets))`` float64 or None when no offset but zero
    is reachable (the correlation is then zero there).
    """
    W = producer.weight.detach().to(torch.float64).cpu()
    if isinstance(producer, nn.Linear):
        W = W[:, :, None, None]
        stride, dil = (1, 1), (1, 1)
    else:
        stride, dil = producer.stride, producer.dilation
    T, _, kh, kw = W.shape
    out = torch.zeros(T, T, len(offsets), dtype=torch.float64)
    for i, (dy, dx) in enumerate(offsets):
        ey, ry = divmod(stride[0] * dy, dil[0])
        ex, rx = divmod(stride[1] * dx, dil[1])
        if ry or rx or abs(ey) >= kh or abs(ex) >= kw:
            continue
        # sum over s and a of K[c, s, a] K[c', s, a - e]
        A = W[:, :, max(ey, 0):kh + min(ey, 0), max(ex, 0):kw + min(ex, 0)]
        B = W[:, :, max(-ey, 0):kh + min(-ey, 0), max(-ex, 0):kw + min(-ex, 0)]
        out[:, :, i] = torch.einsum("csab,dsab->cd", A, B)
    d = torch.diagonal(out[:, :, offsets.index((0, 0))]).clamp_min(1e-300).sqrt()
    return (out / (d[:, None, None] * d[None, :, None])).numpy()


def _field_moments(modules, source, offsets, spatial):
    """Mean (C,) and second moments ``E[u_c(i) u_c'(i+d)]`` (C, C, len(offsets)) of the input field."""
    mean, cov, used = 0.0, 0.0, []
    for bn_name, prod_name in source.branches:
        beta, std, sign = _bn_affine(modules[bn_name])
        producer = modules.get(prod_name) if prod_name else None
        how = spatial
        if spatial == "kernel" and (producer is None
                                    or (isinstance(producer, nn.Conv2d) and producer.groups != 1)):
            how = "independent"
        if how == "kernel":
            corr = _kernel_correlation(producer, offsets)
            sv = std * sign
            c = sv[:, None, None] * sv[None, :, None] * corr
        else:
            C = std.shape[0]
            c = np.zeros((C, C, len(offsets)))
            c[np.arange(C), np.arange(C), offsets.index((0, 0))] = std * std
        mean = mean + beta
        cov = cov + c
        used.append(how)
    zero = offsets.index((0, 0))
    sd = np.sqrt(np.maximum(np.diagonal(cov[:, :, zero]), 1e-24))
    if not source.relu:
        return mean, cov + mean[:, None, None] * mean[None, :, None], used
    rho = np.clip(cov / (sd[:, None, None] * sd[None, :, None]), -1.0, 1.0)  # (rounding)
    M = relu_moments(mean[:, None, None], mean[None, :, None], sd[:, None, None],
                     sd[None, :, None], rho)
    idx = np.arange(sd.shape[0])
    M[idx, idx, zero] = _relu_second(mean, sd)
    return _relu_first(mean, sd), M, used


# --------------------------------------------------------- patch statistics


def _pads(module):
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0)
        th, tw = dh * (kh - 1), dw * (kw - 1)  # 'same'
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = module.padding
    return (pw, pw, ph, ph)


def _inside(module, size):
    """(P,) fraction of output positions where each kernel entry is inside the input, and
    (P, P) fraction where both entries are; all ones without a size or with non-zero padding."""
    kh, kw = module.kernel_size
    P = kh * kw
    if size is None or module.padding_mode != "zeros":
        return torch.ones(P, dtype=torch.float64), torch.ones(P, P, dtype=torch.float64)
    ones = F.pad(torch.ones(1, 1, *size, dtype=torch.float64), _pads(module))
    U = F.unfold(ones, module.kernel_size, dilation=module.dilation, stride=module.stride)[0]
    L = U.shape[1]
    return U.mean(1), U @ U.T / L


def _patch_stats(module, mean_c, M, offsets, size):
    """Sigma (n, n) and mean (n,) of the patches of a Conv2d / Linear from field moments."""
    M = torch.from_numpy(np.ascontiguousarray(M))
    mean_c = torch.from_numpy(np.asarray(mean_c, dtype=np.float64))
    if isinstance(module, nn.Linear):
        return M[:, :, offsets.index((0, 0))].clone(), mean_c.clone()
    kh, kw = module.kernel_size
    S = M.shape[0]
    lookup = {d: i for i, d in enumerate(offsets)}
    dh, dw = module.dilation
    idx = torch.tensor([[lookup[((h2 - h1) * dh, (w2 - w1) * dw)]
                         for h2 in range(kh) for w2 in range(kw)]
                        for h1 in range(kh) for w1 in range(kw)])  # (P, P)
    frac, both = _inside(module, size)
    P = kh * kw
    sig = M[:, :, idx] * both  # (S, S, P, P)
    sig = sig.permute(0, 2, 1, 3).reshape(S * P, S * P)
    mean = (mean_c[:, None] * frac[None, :]).reshape(S * P)
    return 0.5 * (sig + sig.T), mean


def _offsets(module):
    if isinstance(module, nn.Linear):
        return [(0, 0)]
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    return [(i * dh, j * dw) for i in range(-kh + 1, kh) for j in range(-kw + 1, kw)]


def _fit_shrinkage(module, sigma, mean, bn, gain):
    """Weights fitted to ``bn``'s running variances (relative errors, free global scale).

    With ``gain`` False: the ``a`` in [0, 1] of ``(1 - a) C + a t I`` minimising
    the spread of ``log(k_c^T C_a k_c / running_var_c)``. With ``gain`` True:
    non-negative ``(alpha, beta, gamma)`` of ``alpha diag(C) + beta offdiag(C) +
    gamma t I`` minimising ``sum_c (k_c^T C_fit k_c / running_var_c - 1)^2``,
    returned as ``(g, a)`` with ``g = beta / alpha`` (the gain of the
    correlations) and ``a = gamma t / (alpha mean(diag C) + gamma t)``.

    Returns ``(params, spread at a = 0, spread at the fit, spread at a = 1)``.
    """
    K = module.weight.detach().to(torch.float64).cpu().reshape(module.weight.shape[0], -1)
    C = sigma - mean[:, None] * mean[None, :]
    t = torch.trace(sigma) / sigma.shape[0]
    v = bn.running_var.detach().to(torch.float64).cpu().clamp_min(1e-300)
    dC = C.diagonal()
    d = (K * K) @ dC
    q = torch.einsum("ti,ij,tj->t", K, C, K)
    f = (K * K).sum(1) * t

    def spread(pred):
        return float(torch.log(pred.clamp_min(1e-300) / v).std(unbiased=False))

    if gain:
        from scipy.optimize import nnls

        A = torch.stack([d, q - d, f], 1) / v[:, None]
        coef, _ = nnls(A.numpy(), np.ones(len(v)))
        alpha, beta, gam = (float(c) for c in coef)
        if alpha <= 1e-12 * max(alpha + beta + gam, 1e-300):
            return (1.0, 1.0), spread(q), spread(f), spread(f)
        g, at = beta / alpha, gam * float(t) / alpha
        a = at / (float(dC.mean()) + at)
        return (g, a), spread(q), spread(d + g * (q - d) + (gam / alpha) * f), spread(f)
    grid = torch.linspace(0, 1, 201, dtype=torch.float64, device=q.device)
    pred = (1 - grid[:, None]) * q[None, :] + grid[:, None] * f[None, :]
    spreads = torch.log(pred.clamp_min(1e-300) / v[None, :]).std(dim=1, unbiased=False)
    i = int(torch.argmin(spreads))
    return (1.0, float(grid[i])), float(spreads[0]), float(spreads[i]), float(spreads[-1])


def _apply(sigma, mean, g, a):
    """``(1 - a) [diag C + g offdiag C] + a mean(diag C) I + mean mean^T`` style update.

    ``g = 1`` is the plain shrinkage ``Sigma_a = (1 - a) Sigma + a tr(Sigma)/n I``
    with the mean scaled by ``sqrt(1 - a)``. For ``g != 1`` the covariance
    ``C = Sigma - mean mean^T`` has its off-diagonal part scaled by ``g``
    (eigenvalues clipped at zero when that leaves it indefinite), then it is
    shrunk toward ``mean(diag C) I`` with weight ``a``; the mean is kept.
    """
    n = sigma.shape[0]
    eye = torch.eye(n, dtype=sigma.dtype, device=sigma.device)
    if g == 1.0:
        return (1 - a) * sigma + (a * torch.trace(sigma) / n) * eye, math.sqrt(1 - a) * mean
    C = sigma - mean[:, None] * mean[None, :]
    dC = torch.diag(C.diagonal())
    Cg = dC + g * (C - dC)
    if g > 1.0:
        w, V = torch.linalg.eigh(Cg)
        if float(w[0]) < 0:
            Cg = (V * w.clamp_min(0)) @ V.T
    Cg = (1 - a) * Cg + a * float(C.diagonal().mean()) * eye
    return 0.5 * (Cg + Cg.T) + mean[:, None] * mean[None, :], mean.clone()


# --------------------------------------------------------------- the graph


def _is_relu(node, modules):
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, F.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _describe(node, modules):
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target!r}"
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def _skip(node, modules):
    while node.op == "call_module" and isinstance(modules[node.target], _PASS):
        node = node.args[0]
    return node


def _bn_branches(node, modules):
    node = _skip(node, modules)
    if node.op == "call_module" and isinstance(modules[node.target], _BN):
        prod = _skip(node.args[0], modules) if node.args else None
        pname = None
        if (prod is not None and prod.op == "call_module"
                and isinstance(modules[prod.target], (nn.Conv2d, nn.Linear))):
            pname = prod.target
        return [(node.target, pname)]
    if ((node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add))
            or (node.op == "call_method" and node.target in ("add", "add_"))) \
            and not node.kwargs and len(node.args) == 2:
        if not all(hasattr(a, "op") for a in node.args):
            raise _Unmodelled("its input adds a constant to a BatchNorm branch")
        return _bn_branches(node.args[0], modules) + _bn_branches(node.args[1], modules)
    raise _Unmodelled(f"its input is {_describe(node, modules)}, not a BatchNorm output")


def _sources_fx(model, names):
    import torch.fx

    gm = torch.fx.symbolic_trace(model)
    modules = dict(model.named_modules())
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    out = {}
    for name in names:
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            out[name] = ("called more than once in the forward pass" if nodes
                         else "not called in the traced forward pass")
            continue
        node = nodes[0]
        try:
            x = _skip(node.args[0], modules)
            relu = _is_relu(x, modules)
            if relu:
                x = x.args[0]
            branches = _bn_branches(x, modules)
        except _Unmodelled as exc:
            out[name] = str(exc)
            continue
        out_bn = None
        for user in node.users:
            user = next(iter(user.users), user) if (user.op == "call_module" and isinstance(
                modules[user.target], _PASS)) else user
            if user.op == "call_module" and isinstance(modules[user.target], _BN):
                out_bn = user.target
                break
        out[name] = _Source(relu, branches, out_bn)
    return out


def _sources_sequential(model, names):
    """Sources read from ``nn.Sequential`` containers: the children before a layer in its
    own ``nn.Sequential`` are what it reads (what feeds the first child is not known)."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        parent_name, _, key = name.rpartition(".")
        parent = modules[parent_name] if parent_name or name else None
        if not isinstance(parent, nn.Sequential):
            out[name] = ("not inside an nn.Sequential; without tracing (graph='fx') what "
                         "feeds it is not known")
            continue
        keys = list(parent._modules)
        kids = list(parent._modules.values())
        i = keys.index(key) - 1
        while i >= 0 and isinstance(kids[i], _PASS):
            i -= 1
        relu = i >= 0 and isinstance(kids[i], nn.ReLU)
        if relu:
            i -= 1
        if i < 0 or not isinstance(kids[i], _BN):
            what = ("nothing (it is the first module of its nn.Sequential)" if i < 0
                    else f"{type(kids[i]).__name__}")
            out[name] = f"the module before it in its nn.Sequential is {what}, not a BatchNorm"
            continue
        pre = (parent_name + "." if parent_name else "")
        pname = None
        if i >= 1 and isinstance(kids[i - 1], (nn.Conv2d, nn.Linear)):
            pname = pre + keys[i - 1]
        j = keys.index(key) + 1
        out_bn = pre + keys[j] if j < len(kids) and isinstance(kids[j], _BN) else None
        out[name] = _Source(relu, [(pre + keys[i], pname)], out_bn)
    return out


def _input_sizes(model, chosen, input_shape):
    """Spatial size of each chosen conv's input, from one forward pass on zeros."""
    sizes, handles = {}, []

    def hook(name):
        def fn(module, args):
            sizes[name] = tuple(args[0].shape[-2:])
        return fn

    try:
        for name, m in chosen:
            handles.append(m.register_forward_pre_hook(hook(name)))
        p = next(model.parameters(), None)
        x = torch.zeros((1,) + tuple(input_shape), dtype=p.dtype if p is not None else None,
                        device=p.device if p is not None else None)
        with eval_modes(model), torch.no_grad():
            try:
                model(x)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ValueError(
                    f"input_shape={tuple(input_shape)!r}: the model failed on one sample of "
                    f"that shape ({first}); input_shape is the shape of one sample, without "
                    "the batch dimension, e.g. (C, H, W)") from exc
    finally:
        for h in handles:
            h.remove()
    return sizes


def _propagated(model, names, input_shape, samples, seed):
    """Patch statistics of ``names`` from smooth noise pushed through a copy of ``model``
    whose BatchNorm layers normalise with the statistics of each batch."""
    import copy

    from .covariance import collect_covariances
    from .data import synthetic_images

    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, _BN):
            # on the training data the output has std |gamma| sqrt(v / (v + eps)); with batch
            # statistics (and eps -> 0) the copy gives each batch that std whatever the
            # variance of the noise reaching it
            if m.running_var is not None:
                v = m.running_var.detach()
                scale = torch.sqrt(v / (v + m.eps))
                if m.affine:
                    with torch.no_grad():
                        m.weight.mul_(scale.to(m.weight.dtype))
                else:
                    # no affine weight to carry the factor: give the copy one (bias zero)
                    m.weight = nn.Parameter(scale.clone(), requires_grad=False)
                    m.bias = nn.Parameter(torch.zeros_like(scale), requires_grad=False)
                    m.affine = True
                m.eps = _PROPAGATE_EPS
            m.running_mean = None
            m.running_var = None
            m.track_running_stats = False
    x = synthetic_images(samples, shape=input_shape, seed=seed)
    p = next(model.parameters(), None)
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype)
    # batches of (nearly) equal size, at most 256: a short last batch would be normalised
    # with its own few samples (and a single sample cannot be at all)
    batches = torch.tensor_split(x, -(-samples // 256))
    # the same noise on every process: statistics of this process alone, no collective
    return collect_covariances(twin, batches, layers=names, progress=False, distributed=False)


# ------------------------------------------------------------------ public


def covariances_from_batchnorm(model, *, layers=None, input_shape=None, spatial="auto",
                               shrinkage="bn", graph="auto", samples=2048, seed=0):
    """Input statistics of the layers fed by BatchNorm, from the weights alone (no data).

    See the module docstring for the model. The returned statistics are
    :class:`LayerStats` with the layer's kind, weight shape and geometry, so
    that ``compress(model, method, covariances=stats)`` accepts them (also
    with ``centered=True``: the mean of each patch is modelled too).

    Parameters
    ----------
    model : torch.nn.Module
        The trained model; BatchNorm layers must track running statistics.
        It is not modified (a forward pass on zeros runs in eval mode when
        ``input_shape`` is given; the training flags are restored).
    layers : None, str, iterable of str or callable, optional
        The Conv2d / Linear layers to model, as for
        :func:`collect_covariances` (default: all).
    input_shape : tuple of int, optional
        Shape of one input sample, e.g. ``(1, 28, 28)``: used for the spatial
        size of each conv's input (zero-padding at the borders). Without it
        the maps are taken as infinite (no border effect).
    spatial : {"auto", "propagate", "kernel", "independent"}, optional
        How channels and positions are coupled (module docstring):
        smooth noise propagated through the model with BatchNorm on batch
        statistics, the producing layer's kernel under a white input, or
        none. ``"auto"``: ``"propagate"`` when ``input_shape`` is
        ``(C, H, W)``, else ``"kernel"``. With ``"kernel"`` a branch whose
        producer is not a plain Conv2d/Linear is treated as independent
        (said in the report).
    shrinkage : "bn", "bn-gain" or float in [0, 1], optional
        Weight ``a`` of the Frobenius metric: fitted per layer to its output
        BatchNorm (``"bn"``, the default; ``"bn-gain"`` also fits a gain of
        the correlations) or fixed.
    graph : {"auto", "fx", "sequential"}, optional
        How the BatchNorm feeding each layer is found: torch.fx tracing, the
        order of the children of ``nn.Sequential`` containers, or fx with the
        containers as fallback when tracing fails.
    samples : int, optional
        Number of noise images for ``spatial="propagate"`` (default 2048).
    seed : int, optional
        Seed of those images.

    Returns
    -------
    stats : dict of str to LayerStats
        For each modelled layer: float64 ``sigma`` (n, n) and ``mean`` (n,),
        ``count=1`` (no samples).
    report : BatchNormReport
        The modelled layers (sources, shrinkage, fit) and the others with the
        reason they were not modelled.

    Notes
    -----
    The statistics describe the training distribution as the BatchNorm
    layers saw it; ``count`` is 1 (merging them with measured statistics by
    ``+`` weights them as one sample). The model is assumed to be in the
    state it will be used in (eval-mode BatchNorm).

    Warns
    -----
    CompressionWarning
        When a BatchNorm layer behind the statistics was never updated
        (``num_batches_tracked`` 0 with the initial running mean 0 and
        variance 1: a model that was never trained nor loaded) or is in
        training mode; the statistics are still returned and the same text
        is in ``report.notes``. BatchNorm layers without running statistics
        (``track_running_stats=False``) are not used: the layers they feed
        are in ``report.skipped`` with that reason.

    Raises
    ------
    ValueError
        For an unknown ``spatial`` or ``graph``, a ``shrinkage`` outside
        ``[0, 1]``, a malformed ``input_shape``, ``spatial="propagate"``
        without ``input_shape=(C, H, W)``, ``samples < 2``, or ``graph="fx"``
        on a model that cannot be traced.
    TypeError
        When ``model`` is not an ``nn.Module``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import compress, covariances_from_batchnorm
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(),
    ...                       nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
    ...                       nn.Linear(32, 5))
    >>> _ = model(torch.randn(64, 20))   # (training mode: BatchNorm records statistics)
    >>> _ = model.eval()
    >>> stats, report = covariances_from_batchnorm(model)
    >>> sorted(stats), report.modelled['3']['relu']
    (['3', '6'], True)
    >>> small, rep = compress(model, 'svd', covariances=stats, ranks={'3': 24}, progress=False)
    >>> small(torch.randn(4, 20)).shape
    torch.Size([4, 5])
    """
    check_type(model, nn.Module, "model")
    if spatial not in _SPATIAL:
        raise ValueError(f"spatial={spatial!r} is not allowed; spatial must be one of {_SPATIAL}")
    if graph not in _GRAPHS:
        raise ValueError(f"graph={graph!r} is not allowed; graph must be one of {_GRAPHS}")
    if not (isinstance(shrinkage, str) and shrinkage in _FITS):
        ok = (isinstance(shrinkage, numbers.Real) and not isinstance(shrinkage, (bool, np.bool_))
              and 0.0 <= float(shrinkage) <= 1.0)
        if not ok:
            raise ValueError(f"shrinkage={shrinkage!r} is not allowed; shrinkage must be 'bn', "
                             "'bn-gain' or a number in [0, 1]")
    if input_shape is not None:
        try:
            if not all(isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_))
                       for s in input_shape):
                raise TypeError
            input_shape = tuple(int(s) for s in input_shape)
        except (TypeError, ValueError):
            raise ValueError(f"input_shape={input_shape!r} is not allowed; input_shape must be "
                             "a tuple of positive integers (one sample, e.g. (C, H, W))") from None
        if not input_shape or min(input_shape) < 1:
            raise ValueError(f"input_shape={input_shape!r} is not allowed; input_shape must be "
                             "a tuple of positive integers (one sample, e.g. (C, H, W))")
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 2:
        raise ValueError(f"samples={samples!r} is not allowed; samples must be an integer "
                         ">= 2")
    samples = int(samples)
    if seed is not None and (isinstance(seed, (bool, np.bool_))
                             or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed={seed!r} is not allowed; seed must be a non-negative integer "
                         "(or None)")
    # every path reads the weights and running statistics (not only their shapes)
    check_not_meta(model, "data-free statistics from BatchNorm need")

    chosen = select_layers(model, layers)
    names = [n for n, _ in chosen]
    report = BatchNormReport()
    if graph in ("auto", "fx"):
        try:
            sources = _sources_fx(model, names)
            report.graph = "fx"
        except Exception as exc:
            if graph == "fx":
                raise ValueError(f"graph='fx': torch.fx cannot trace the model ({exc}); use "
                                 "graph='sequential' for an nn.Sequential-style model") from exc
            sources = _sources_sequential(model, names)
            report.graph = f"sequential (fx tracing failed: {type(exc).__name__}: {exc})"
    else:
        sources = _sources_sequential(model, names)
        report.graph = "sequential"
    if spatial == "auto":
        spatial = "propagate" if input_shape is not None and len(input_shape) == 3 else "kernel"
    if spatial == "propagate":
        if input_shape is None or len(input_shape) != 3:
            raise ValueError(f"spatial='propagate' needs input_shape=(C, H, W); got "
                             f"input_shape={input_shape!r}")
    sizes = _input_sizes(model, chosen, input_shape) if input_shape is not None else {}
    prop = None

    modules = dict(model.named_modules())
    raw = {}
    for name, module in chosen:
        src = sources[name]
        if isinstance(src, str):
            report.skipped[name] = src
            continue
        reason = _check(module, src, modules)
        if reason is not None:
            report.skipped[name] = reason
            continue
        if spatial == "propagate":
            if prop is None:
                ok = [n for n in names if not isinstance(sources[n], str)]
                prop = _propagated(model, ok, input_shape, samples, seed)
            sigma = prop[name].sigma.to("cpu", torch.float64)
            mean = prop[name].mean.to("cpu", torch.float64)
            used = ["propagate"] * len(src.branches)
        else:
            offsets = _offsets(module)
            mean_c, M, used = _field_moments(modules, src, offsets, spatial)
            sigma, mean = _patch_stats(module, mean_c, M, offsets, sizes.get(name))
        raw[name] = (module, src, sigma, mean, used)

    fitted = {}
    fit = shrinkage in _FITS
    if fit:
        for name, (module, src, sigma, mean, _) in raw.items():
            out_var = (getattr(modules[src.output_bn], "running_var", None)
                       if src.output_bn is not None else None)
            if out_var is not None and out_var.shape[0] == module.weight.shape[0]:
                fitted[name] = _fit_shrinkage(module, sigma, mean, modules[src.output_bn],
                                              gain=shrinkage == "bn-gain")
        fallback = ((float(np.median([f[0][0] for f in fitted.values()])),
                     float(np.median([f[0][1] for f in fitted.values()]))) if fitted
                    else (1.0, _DEFAULT_SHRINKAGE))
    stats = {}
    for name, (module, src, sigma, mean, used) in raw.items():
        if fit:
            g, a = fitted[name][0] if name in fitted else fallback
        else:
            g, a = 1.0, float(shrinkage)
        sig, mu = _apply(sigma, mean, g, a)
        w = module.weight
        stats[name] = LayerStats(sigma=sig.to(w.device), mean=mu.to(w.device), count=1,
                                 layer=repr(module), groups=1, kind=layer_kind(module),
                                 weight_shape=tuple(w.shape), geometry=layer_geometry(module))
        report.modelled[name] = {
            "branches": [tuple(b) for b in src.branches], "relu": src.relu, "spatial": used,
            "shrinkage": a, "gain": g, "fitted": src.output_bn if name in fitted else None,
            "fit_spread": fitted[name][1:] if name in fitted else None,
        }
    _note_doubtful(report, raw, fitted, modules)
    return stats, report


def _never_updated(bn):
    """Whether ``bn`` tracks running statistics that no forward pass in training mode (and
    no loaded state) has changed: ``num_batches_tracked`` 0, mean 0 and variance 1."""
    if bn.running_mean is None or bn.running_var is None:
        return False
    count = getattr(bn, "num_batches_tracked", None)
    if count is not None and int(count) != 0:
        return False
    return bool((bn.running_mean == 0).all()) and bool((bn.running_var == 1).all())


def never_updated_message(bns, what, after=None):
    """The text that says the BatchNorm layers ``bns`` (reading the outputs of the layers
    ``after``, when given) were never updated, so ``what`` (e.g. "the statistics of the
    layers [...]") describes no data."""
    where = "" if after is None else f" after the layers {list(after)}"
    return (f"BatchNorm layers {list(bns)}{where} were never updated (num_batches_tracked=0, "
            f"running mean 0 and variance 1, their initial values): {what} describe no "
            "data; train the model or load its trained state first")


def _note_doubtful(report, raw, fitted, modules):
    """Record (and warn about) the BatchNorm layers behind the modelled statistics whose
    running statistics were never updated or that are in training mode."""
    import warnings

    from sigmadecomp.exceptions import CompressionWarning

    from ._batches import user_stacklevel

    used = {}  # bn name -> the modelled layers it informs (in order)
    for name, (_, src, _, _, _) in raw.items():
        bns = [bn for bn, _ in src.branches]
        if name in fitted:
            bns.append(src.output_bn)
        for bn in bns:
            used.setdefault(bn, [])
            if name not in used[bn]:
                used[bn].append(name)

    def layers_of(bns):
        return sorted({layer for bn in bns for layer in used[bn]}, key=list(raw).index)

    fresh = [bn for bn in used if _never_updated(modules[bn])]
    if fresh:
        report.notes.append(never_updated_message(
            fresh, f"the statistics of the layers {layers_of(fresh)} modelled from them"))
    training = [bn for bn in used if modules[bn].training]
    if training:
        report.notes.append(
            f"BatchNorm layers {training} are in training mode: the statistics of the layers "
            f"{layers_of(training)} model eval-mode BatchNorm (running statistics), while in "
            "training mode BatchNorm normalises each batch with its own statistics; call "
            "model.eval() if the model is to be used in eval mode")
    for note in report.notes:
        warnings.warn(f"covariances_from_batchnorm: {note}", CompressionWarning,
                      stacklevel=user_stacklevel())


def _check(module, src, modules):
    """Why a found source cannot be used for ``module`` (None when it can)."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped convolution (groups={module.groups}) is not modelled"
    want = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
    for bn_name, _ in src.branches:
        bn = modules[bn_name]
        if bn.running_var is None:
            return f"BatchNorm {bn_name!r} does not track running statistics"
        if bn.num_features != want:
            return (f"BatchNorm {bn_name!r} has {bn.num_features} channels; the layer reads "
                    f"{want} input {'channels' if isinstance(module, nn.Conv2d) else 'features'}")
        if isinstance(module, nn.Conv2d) != isinstance(bn, nn.BatchNorm2d):
            return f"BatchNorm {bn_name!r} ({type(bn).__name__}) does not match a {layer_kind(module)}"
    return None
