"""Statistics from another dataset: shrink them toward the Frobenius metric.

Input statistics collected on images unlike those the network will see (e.g.
handwritten digits for a Fashion-MNIST network) weight the input directions
wrongly, and the Sigma solvers trust them fully. :func:`shrink_covariances`
returns new statistics with each layer's second moment shrunk,

    sigma_a = (1 - a) * sigma + a * (trace(sigma) / n) * I,   mean_a = sqrt(1 - a) * mean,

so that the centered covariance shrinks the same way,
``sigma_a - mean_a mean_a^T = (1 - a) C + a (trace(sigma) / n) I``. ``a = 0``
keeps the statistics, ``a = 1`` gives the Frobenius solution. ``a`` is given,
or chosen per layer by a rule that uses the statistics and the model only:

``'moments'`` (what ``'auto'`` means)
    A network with BatchNorm records, in the running mean and variance of
    the BatchNorm reading a layer's output, the mean square of every output
    channel on its *training* data: ``running_var + (running_mean - bias)**2``
    is the mean square of the layer's output without its bias (``bias`` = 0
    for a bias-free layer). Under the calibration statistics the same channel has
    the mean square ``(K_(1) sigma_a K_(1)^T)[t, t]``. The rule keeps the ``a``
    for which the two agree best up to a common factor (the least spread of
    their log ratio over the channels, :func:`sigmadecomp.shrinkage.moment_alpha`).
    It compares the calibration data with the training distribution itself,
    in the directions of the kernel's rows, which are the directions the
    Sigma-error weighs. On matching statistics it picks ``a`` near 0; on
    shifted ones it shrinks. Layers with no BatchNorm reading their output
    (and no ``targets`` entry) are left unshrunk and listed in ``skipped``.
    With ``prior=`` (e.g. the data-free statistics of
    :func:`sigmadecomp_torch.covariances_from_batchnorm`) the same criterion
    also chooses the share ``w`` of the prior in a mixture with the shrunk
    statistics (:func:`sigmadecomp.shrinkage.moment_mixture`). With
    ``match=True`` the chosen statistics are then moved, with the least
    change, to the second moment whose output energies equal the
    BatchNorm's exactly (:func:`sigmadecomp.shrinkage.match_moments`).
``'holdout'``
    Fit each layer at every candidate ``a`` with ``stats`` and measure the
    relative Sigma-error in ``holdout`` (statistics of other batches of the
    calibration data); keep the best ``a`` and apply it to ``stats + holdout``
    (:func:`sigmadecomp.shrinkage.holdout_alpha`). It measures the fit on
    unseen inputs, but both halves come from the same distribution, so it
    corrects sampling noise, not a shift of distribution.
``'oas'``
    The analytic oracle-approximating shrinkage (Chen et al., 2010) for
    ``images`` independent samples (:func:`sigmadecomp.shrinkage.oas_alpha`).
    Sampling noise only, as ``'holdout'``.

``notes/transfer.md`` has the measurements behind the choice of ``'auto'``.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from sigmadecomp_torch import collect_covariances, compress
>>> from sigmadecomp_torch.transfer import shrink_covariances
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
...                       nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
...                       nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
>>> _ = model.train()(torch.randn(64, 3, 8, 8))   # BatchNorm learns the training moments
>>> stats = collect_covariances(model.eval(), [torch.rand(16, 3, 8, 8)], progress=False)
>>> shrunk = shrink_covariances(stats, "auto", model=model)
>>> 0.0 <= shrunk.alphas["3"] <= 1.0, stats["3"] is not shrunk["3"]
(True, True)
>>> import warnings
>>> with warnings.catch_warnings():   # random weights: large errors, which compress warns of
...     warnings.simplefilter("ignore")
...     small, report = compress(model, "tucker2", covariances=shrunk, ratio=2,
...                              options={"n_iter_max": 3})
>>> small(torch.rand(2, 3, 8, 8)).shape
torch.Size([2, 4])
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch
from torch import nn

from sigmadecomp.exceptions import CompressionWarning

from sigmadecomp.shrinkage import (
    DEFAULT_ALPHAS,
    DEFAULT_WEIGHTS,
    _check_alphas,
    check_alpha,
    holdout_alpha,
    match_moments,
    mix_sigma,
    moment_alpha,
    moment_mixture,
    oas_alpha,
    shrink_sigma,
)

from sigmadecomp_torch.batchnorm import _never_updated, never_updated_message

__all__ = ["shrink_covariances", "ShrunkCovariances", "output_moments", "RULES"]

#: The data-only rules of :func:`shrink_covariances` (``'auto'`` is ``'moments'``).
RULES = ("moments", "holdout", "oas")
AUTO_RULE = "moments"


class ShrunkCovariances(dict):
    """Shrunk statistics by layer name (a ``dict`` of ``LayerStats``), with how.

    Attributes
    ----------
    alphas : dict of str to float
        The ``a`` applied to each layer.
    rule : str
        ``'given'`` for a float or dict ``alpha``, else the rule used.
    scores : dict of str to dict
        Per layer, the rule's score of every candidate (held-out Sigma-error
        for ``'holdout'``, spread of the log energy ratio for ``'moments'``).
    skipped : dict of str to str
        Layers left unshrunk by the rule, with the reason.
    weights : dict of str to float
        The share ``w`` of the ``prior`` statistics mixed into each layer
        (0 for every layer without a prior).
    scales : dict of str to float
        With ``match=True``, the common factor ``c`` of each matched layer's
        output mean squares ``c * target`` (empty otherwise).
    """

    def __init__(self, items, *, alphas, rule, scores=None, skipped=None, weights=None):
        super().__init__(items)
        self.alphas = dict(alphas)
        self.rule = rule
        self.scores = dict(scores or {})
        self.skipped = dict(skipped or {})
        self.weights = {k: float((weights or {}).get(k, 0.0)) for k in self.alphas}
        self.scales = {}

    def __repr__(self):
        shown = ", ".join(f"{k}: {v:g}" for k, v in self.alphas.items())
        mixed = ", ".join(f"{k}: {v:g}" for k, v in self.weights.items() if v)
        return (f"ShrunkCovariances(rule={self.rule!r}, alphas={{{shown}}}"
                + (f", weights={{{mixed}}})" if mixed else ")"))


def _shrink_stats(st, a, prior=None, w=0.0):
    if w > 0.0:
        # the second moment and mean of the mixture of the shrunk statistics (share 1 - w)
        # and the prior brought to their scale (share w): a valid pair, PSD covariance
        P = prior.sigma.to(st.sigma)
        scale = float(torch.trace(st.sigma.to(torch.float64))) / float(
            torch.trace(P.to(torch.float64)))
        mean = ((1.0 - w) * math.sqrt(1.0 - a) * st.mean
                + w * math.sqrt(scale) * prior.mean.to(st.mean))
        return dataclasses.replace(st, sigma=mix_sigma(st.sigma, P, a, w), mean=mean)
    if a == 0.0:
        return dataclasses.replace(st, sigma=st.sigma.clone(), mean=st.mean.clone())
    return dataclasses.replace(st, sigma=shrink_sigma(st.sigma, a),
                               mean=st.mean * math.sqrt(1.0 - a))


def _check_stats(stats, name="stats"):
    from sigmadecomp_torch.covariance import LayerStats

    if not isinstance(stats, dict):
        raise TypeError(f"{name} of type {type(stats).__name__} is not allowed; {name} must be "
                        "a dict of layer name to LayerStats (collect_covariances)")
    for k, v in stats.items():
        if not isinstance(v, LayerStats):
            raise TypeError(f"{name}[{k!r}] is a {type(v).__name__}; every value must be a "
                            "LayerStats")


def output_moments(model, names):
    """Training mean square of each output channel, from the BatchNorm after each layer.

    For every name, the ``BatchNorm2d`` / ``BatchNorm1d`` registered right
    after the layer in the same parent module (the ``conv -> bn`` order of
    ``nn.Sequential`` blocks and of ResNet-style ``conv1, bn1`` attributes),
    with as many features as the layer has outputs and running statistics,
    gives ``running_var + (running_mean - bias)**2``: the mean square of the
    layer's output without its bias (the BatchNorm's input is ``K x + bias``,
    whose variance is that of ``K x``), which is what ``K sigma K^T`` models.

    Parameters
    ----------
    model : torch.nn.Module
    names : iterable of str

    Returns
    -------
    targets : dict of str to torch.Tensor of shape (T,)
        float64; only for the layers where such a BatchNorm was found.
    reasons : dict of str to str
        Why the other layers have none.

    Warns
    -----
    CompressionWarning
        When a BatchNorm giving targets was never updated (``num_batches_tracked``
        0 with the initial running mean 0 and variance 1: a model that was
        never trained nor loaded); its targets are still returned.
    """
    modules = dict(model.named_modules())
    children = {}
    for name, mod in model.named_modules():
        children[name] = list(mod.named_children())
    targets, reasons, fresh = {}, {}, {}
    for name in names:
        layer = modules.get(name)
        if layer is None:
            reasons[name] = "no module of that name in the model"
            continue
        parent, _, leaf = name.rpartition(".")
        sibs = children.get(parent, [])
        idx = [i for i, (n, _) in enumerate(sibs) if n == leaf]
        nxt = sibs[idx[0] + 1][1] if idx and idx[0] + 1 < len(sibs) else None
        T = layer.weight.shape[0]
        if not isinstance(nxt, nn.modules.batchnorm._BatchNorm):  # 1d/2d/3d, SyncBatchNorm
            reasons[name] = "no BatchNorm registered right after it"
        elif nxt.num_features != T or nxt.running_var is None or nxt.running_mean is None:
            reasons[name] = (f"the BatchNorm after it has {nxt.num_features} features or no "
                             f"running statistics; the layer has {T} outputs")
        else:
            if _never_updated(nxt):
                fresh[name] = (parent + "." if parent else "") + sibs[idx[0] + 1][0]
            mean = nxt.running_mean.detach().to(torch.float64)
            if getattr(layer, "bias", None) is not None:
                mean = mean - layer.bias.detach().to(mean)
            t = nxt.running_var.detach().to(torch.float64) + mean ** 2
            targets[name] = t.cpu()
    if fresh:
        import warnings

        from sigmadecomp_torch._batches import user_stacklevel

        msg = never_updated_message(fresh.values(), "their targets", after=fresh)
        warnings.warn(f"output_moments: {msg}", CompressionWarning,
                      stacklevel=user_stacklevel())
    return targets, reasons


def shrink_covariances(stats, alpha="auto", *, model=None, holdout=None, method="tucker2",
                       ratio=None, ranks=None, options=None, targets=None, images=None,
                       alphas=DEFAULT_ALPHAS, prior=None, weights=DEFAULT_WEIGHTS, match=False):
    """New statistics shrunk toward the Frobenius metric, layer by layer.

    Parameters
    ----------
    stats : dict of str to LayerStats
        From :func:`sigmadecomp_torch.collect_covariances`; not modified.
    alpha : float, dict of str to float, or {'auto', 'moments', 'holdout', 'oas'}, optional
        A float in ``[0, 1]`` for every layer; a dict by layer name (layers
        not in it keep ``a = 0``); or a rule choosing ``a`` per layer among
        ``alphas`` (see the module docstring). ``'auto'`` (default) is
        ``'moments'``, the rule that kept the most of the gain in
        ``notes/transfer.md``.
    model : torch.nn.Module, optional
        The network; needed by ``'moments'`` (its BatchNorm statistics,
        :func:`output_moments`) unless ``targets`` gives them, and by
        ``'holdout'`` (the weights to fit).
    holdout : dict of str to LayerStats, optional
        ``'holdout'`` only: statistics of other batches of the calibration
        data, measured on the same layers.
    method : {'tucker2', 'cp', 'svd'}, optional
        ``'holdout'`` only: the decomposition whose fit is measured.
    ratio : float, optional
        ``'holdout'`` only: the per-layer compression ratio (> 1), or
    ranks : dict of str to int or tuple, optional
        ``'holdout'`` only: explicit ranks by layer name.
    options : dict, optional
        ``'holdout'`` only: keyword arguments of the decomposition
        (e.g. ``n_iter_max``, ``rng``).
    targets : dict of str to tensor of shape (T,), optional
        ``'moments'`` only: the expected mean square of each output channel
        on the training data, for layers whose BatchNorm is not found.
    images : int, optional
        ``'oas'`` only: the number of independent samples behind the
        statistics, e.g. the number of calibration images. Default: the
        statistics' ``count`` of patches, which overlap and overstate it.
    alphas : sequence of float in [0, 1], optional
        The candidates of the rules.
    prior : dict of str to LayerStats, optional
        ``'moments'`` (and ``'auto'``) only: other statistics of the same
        layers to mix in, typically the data-free ones of
        :func:`sigmadecomp_torch.covariances_from_batchnorm` (computed with
        ``shrinkage=0``, the rule does the shrinking). For each layer with a
        prior the rule chooses the shrinkage ``a`` *and* the prior's share
        ``w`` among ``alphas`` x ``weights``
        (:func:`sigmadecomp.shrinkage.moment_mixture`): the second moment
        becomes ``(1 - w) sigma_a + w (tr(sigma) / tr(prior)) prior``
        (:func:`sigmadecomp.shrinkage.mix_sigma`), the mean that of the same
        mixture. Layers without a prior entry are shrunk as without it.
    weights : sequence of float in [0, 1], optional
        The candidate shares of ``prior``.
    match : bool, optional
        ``'moments'`` (and ``'auto'``) only. After the choice of ``a`` (and
        ``w``), replace each layer's second moment by the nearest one (in
        Kullback-Leibler divergence between zero-mean Gaussians) under which
        its output channels have the BatchNorm's mean squares exactly, up to
        one common factor (:func:`sigmadecomp.shrinkage.match_moments`). The
        scalar choice alone leaves them only roughly right. Default False.
        With digits statistics mixed with the BatchNorm prior it kept 82 %
        instead of 63 % of the Tucker-2 gain at rX = 3 and 76 % instead of
        64 % at rX = 4 (mean of four calibration subsets), and won or tied
        in every other cell measured (Tucker-2 and CP, rX 2 to 6); without a
        prior the effect was mixed (``notes/transfer.md``). The mean is kept, scaled down where needed so
        that the centered covariance stays PSD. Layers sharing statistics
        (same input) get their own matched copy; layers the rule skipped are
        not matched.

    Returns
    -------
    ShrunkCovariances
        A dict of new ``LayerStats`` (same keys, dtype, device, count and
        metadata; usable as ``covariances=`` in
        :func:`sigmadecomp_torch.compress`) with the attributes ``alphas``,
        ``rule``, ``scores``, ``skipped``, ``weights`` (the prior's share)
        and ``scales`` (with ``match=True``, the common factor of the matched
        mean squares per layer; empty otherwise).

    Raises
    ------
    ValueError, TypeError
        A bad ``alpha`` (out of ``[0, 1]``, unknown rule, dict with unknown
        layer names) or a rule without what it needs.

    Examples
    --------
    >>> import torch
    >>> from sigmadecomp_torch import LayerStats
    >>> from sigmadecomp_torch.transfer import shrink_covariances
    >>> st = LayerStats(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)),
    ...                 torch.zeros(2, dtype=torch.float64), 100)
    >>> shrink_covariances({"fc": st}, 0.5)["fc"].sigma.diagonal().tolist()
    [2.5, 1.5]
    >>> shrink_covariances({"fc": st}, {"fc": 1.0})["fc"].sigma.diagonal().tolist()
    [2.0, 2.0]
    """
    _check_stats(stats)
    scores, skipped, shares = {}, {}, {}
    _check_alphas(alphas)  # up front, whether or not a layer comes to use them
    _check_alphas(weights, "weights")
    if images is not None and (isinstance(images, bool) or not isinstance(images, numbers.Integral)
                               or images < 1):
        raise ValueError(f"images={images!r} is not allowed; images must be a positive integer "
                         "(the number of independent calibration samples)")
    if prior is not None:
        _check_prior(prior, stats, alpha)
    if not isinstance(match, bool):
        raise TypeError(f"match={match!r} is not allowed; match must be True or False")
    if match and alpha not in ("auto", "moments"):
        raise ValueError(f"match=True is not allowed with alpha={alpha!r}; the output "
                         "energies it matches are those of the 'moments' rule (alpha='moments' "
                         "or 'auto')")
    found = {}
    if isinstance(alpha, str):
        if alpha not in ("auto",) + RULES:
            raise ValueError(f"alpha={alpha!r} is not allowed; alpha must be a float in [0, 1], "
                             f"a dict of layer name to float, or one of "
                             f"{', '.join(repr(r) for r in ('auto',) + RULES)}")
        rule = AUTO_RULE if alpha == "auto" else alpha
        if rule == "moments":
            chosen = _rule_moments(stats, model, targets, alphas, scores, skipped, prior,
                                   weights, shares, found)
        elif rule == "holdout":
            chosen = _rule_holdout(stats, holdout, model, method, ratio, ranks, options, alphas,
                                   scores, skipped)
            stats = {k: (v + holdout[k]) for k, v in stats.items()}
        else:
            chosen = _rule_oas(stats, images, scores, skipped)
    elif isinstance(alpha, dict):
        unknown = sorted(set(alpha) - set(stats))
        if unknown:
            raise ValueError(f"alpha names layers {unknown} that are not in stats; allowed: "
                             f"{sorted(stats)}")
        chosen = {k: check_alpha(alpha.get(k, 0.0), f"alpha[{k!r}]") for k in stats}
        rule = "given"
    elif isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        a = check_alpha(alpha)
        chosen = {k: a for k in stats}
        rule = "given"
    else:
        raise TypeError(f"alpha={alpha!r} is not allowed; alpha must be a float in [0, 1], a "
                        "dict of layer name to float, or one of 'auto', 'moments', 'holdout', "
                        "'oas'")
    # layers that shared one LayerStats (same input) keep sharing when their a agrees
    cache, out = {}, {}
    for k, st in stats.items():
        w = shares.get(k, 0.0)
        key = (id(st), chosen[k], w, id(prior[k]) if w else None)
        if key not in cache:
            cache[key] = _shrink_stats(st, chosen[k], prior[k] if w else None, w)
        out[k] = cache[key]
    scales = {}
    if match:
        for k in out:
            if k not in skipped:
                out[k], scales[k] = _match_stats(out[k], _weight_of(model, k, out[k]), found[k],
                                                 k)
    result = ShrunkCovariances(out, alphas=chosen, rule=rule, scores=scores, skipped=skipped,
                               weights=shares)
    result.scales = scales
    return result


def _match_stats(st, W, target, name):
    """``st`` with the matched second moment and a mean that keeps it a valid pair."""
    import warnings

    from sigmadecomp_torch._batches import user_stacklevel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompressionWarning)
        sigma, lam, scale = match_moments(W, st.sigma.to(torch.float64).cpu(), target)
    for w in caught:  # the layer's name, at the caller's line
        text = str(w.message).replace("match_moments:", f"match=True, layer {name!r}:", 1)
        warnings.warn(text, w.category, stacklevel=user_stacklevel())
    # sigma'^-1 = sigma^-1 + K^T diag(lam) K, and mean^T sigma^+ mean <= 1 for valid
    # statistics, so mean^T sigma'^+ mean <= 1 + sum lam (K mean)^2: scale the mean by
    # the square root of the inverse of that bound when it exceeds 1
    m = W.reshape(W.shape[0], -1) @ st.mean.to(torch.float64).cpu()
    bound = 1.0 + float((torch.as_tensor(lam) * m ** 2).sum())
    shrink = 1.0 / math.sqrt(bound) if bound > 1.0 else 1.0
    return dataclasses.replace(st, sigma=sigma.to(st.sigma), mean=st.mean * shrink), scale


def _check_prior(prior, stats, alpha):
    if alpha not in ("auto", "moments"):
        raise ValueError(f"prior= is not allowed with alpha={alpha!r}; the share of the "
                         "prior is chosen by the 'moments' rule (alpha='moments' or 'auto')")
    _check_stats(prior, "prior")
    for k, p in prior.items():
        if k not in stats:
            continue
        if tuple(p.sigma.shape) != tuple(stats[k].sigma.shape):
            raise ValueError(f"prior[{k!r}] has sigma of shape {tuple(p.sigma.shape)}; stats "
                             f"has {tuple(stats[k].sigma.shape)} for that layer (they must "
                             "describe the same layer)")


def _weight_of(model, name, st):
    if model is None:
        raise ValueError("this rule needs model= (the network whose layers the statistics "
                         "describe)")
    mod = dict(model.named_modules()).get(name)
    if mod is None or not hasattr(mod, "weight"):
        raise ValueError(f"stats has layer {name!r}, which is not a layer of the model")
    st.check_compatible(mod, name)
    return mod.weight.detach().to(torch.float64).cpu()


def _rule_moments(stats, model, targets, alphas, scores, skipped, prior=None,
                  weights=DEFAULT_WEIGHTS, shares=None, found_out=None):
    if model is None and targets is None:
        raise ValueError("alpha='moments' (and 'auto') needs model= (BatchNorm statistics) or "
                         "targets= (mean square of each output channel)")
    found, reasons = ({}, {}) if model is None else output_moments(model, stats)
    if targets is not None:
        if not isinstance(targets, dict):
            raise TypeError(f"targets of type {type(targets).__name__} is not allowed; targets "
                            "must be a dict of layer name to a tensor of shape (T,)")
        unknown = sorted(set(targets) - set(stats))
        if unknown:
            raise ValueError(f"targets names layers {unknown} that are not in stats; allowed: "
                             f"{sorted(stats)}")
        for k, v in targets.items():
            t = torch.as_tensor(v, dtype=torch.float64).cpu()
            T = _weight_of(model, k, stats[k]).shape[0] if model is not None else None
            if t.ndim != 1 or (T is not None and t.shape[0] != T):
                raise ValueError(f"targets[{k!r}] has shape {tuple(t.shape)}; it must be "
                                 f"({T if T is not None else 'T'},), one mean square per output "
                                 "channel of the layer")
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError(f"targets[{k!r}] must be finite and non-negative (a mean "
                                 "square per output channel)")
            found[k] = t
    if found_out is not None:
        found_out.update(found)
    chosen = {}
    for k, st in stats.items():
        if k not in found or st.groups != 1:
            chosen[k] = 0.0
            skipped[k] = ("grouped statistics" if st.groups != 1
                          else reasons.get(k, "no target given"))
            continue
        if model is not None:
            W = _weight_of(model, k, st)
        else:
            raise ValueError("alpha='moments' with targets= also needs model= (the weights)")
        if not bool((found[k] > 0).any()):
            chosen[k] = 0.0
            skipped[k] = ("every target is zero: no output channel gives its mean square on "
                          "the training data")
            continue
        S = st.sigma.to(torch.float64).cpu()
        if prior is not None and k in prior and prior[k].groups == 1:
            (chosen[k], shares[k]), scores[k] = moment_mixture(
                W, S, prior[k].sigma.to(torch.float64).cpu(), found[k], alphas=alphas,
                weights=weights)
        else:
            chosen[k], scores[k] = moment_alpha(W, S, found[k], alphas=alphas)
    return chosen


def _rule_holdout(stats, holdout, model, method, ratio, ranks, options, alphas, scores,
                  skipped):
    from sigmadecomp.cp import cp
    from sigmadecomp.ranks import ratio_to_ranks
    from sigmadecomp.svd import sigma_svd
    from sigmadecomp.tucker2 import tucker2

    if holdout is None:
        raise ValueError("alpha='holdout' needs holdout= (statistics of other calibration "
                         "batches, same layers)")
    _check_stats(holdout, "holdout")
    missing = sorted(set(stats) - set(holdout))
    if missing:
        raise ValueError(f"holdout has no statistics for layers {missing}")
    fns = {"tucker2": tucker2, "cp": cp, "svd": sigma_svd}
    if method not in fns:
        raise ValueError(f"method={method!r} is not allowed with alpha='holdout'; method must "
                         f"be one of {', '.join(repr(m) for m in fns)}")
    if ratio is None and ranks is None:
        raise ValueError("alpha='holdout' needs ratio= or ranks= (the fit to measure)")
    opts = dict(options or {})
    chosen = {}
    for k, st in stats.items():
        if st.groups != 1:
            chosen[k], skipped[k] = 0.0, "grouped statistics"
            continue
        W = _weight_of(model, k, st)
        m = method if W.ndim == 4 and W.shape[2] * W.shape[3] > 1 else "svd"
        if ranks is not None and k in ranks:
            r = ranks[k]
        else:
            r = ratio_to_ranks(tuple(W.shape) if m != "svd" else (W.shape[0], W[0].numel()),
                               m, ratio)
        r = tuple(int(v) for v in r) if isinstance(r, (tuple, list)) else int(r)
        kw = opts if m != "svd" else {}

        def fit(K, S, _fn=fns[m], _r=r, _kw=kw, _m=m):
            if _m == "svd":
                return _fn(K.reshape(K.shape[0], -1), _r, S).to_tensor().reshape(K.shape)
            return _fn(K, _r, S, **_kw).to_tensor()

        chosen[k], scores[k] = holdout_alpha(W, st.sigma.to(torch.float64).cpu(),
                                             holdout[k].sigma.to(torch.float64).cpu(), fit,
                                             alphas=alphas)
    return chosen


def _rule_oas(stats, images, scores, skipped):
    chosen = {}
    for k, st in stats.items():
        if st.groups != 1:
            chosen[k], skipped[k] = 0.0, "grouped statistics"
            continue
        n_img = st.count if images is None else images
        chosen[k] = oas_alpha(st.sigma, n_img)
        scores[k] = {"images": int(n_img)}
    return chosen
