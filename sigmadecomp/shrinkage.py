"""Shrinkage of a second moment toward the Frobenius metric.

Statistics gathered on another dataset than the one the network will see
weight the input directions wrongly: a direction the calibration images
excite strongly may be quiet on the real inputs and the other way round. The
Sigma solvers trust ``sigma`` fully; the Frobenius solvers ignore it. Between
the two lies the shrunk matrix

    shrink_sigma(sigma, alpha) = (1 - alpha) * sigma + alpha * (trace(sigma) / n) * I

``alpha = 0`` is ``sigma`` itself, ``alpha = 1`` a multiple of the identity,
for which every Sigma solver returns its Frobenius solution (the solvers are
invariant to a positive scale of ``sigma``). The identity term keeps the
trace, so the matrix stays on the scale of ``sigma``.

Choosing ``alpha`` from data
----------------------------
* :func:`holdout_alpha` -- fit the weight at each candidate ``alpha`` with the
  statistics of one part of the calibration data and keep the ``alpha`` whose
  fit has the lowest Sigma-error in the statistics of the other part. It
  measures what the shrinkage is for (the error of the fit on inputs the fit
  did not see) but only detects a mismatch between the two parts: both come
  from the calibration distribution.
* :func:`moment_alpha` -- keep the ``alpha`` under which the layer's output
  channels have the energies the network says they have on its own training
  data, e.g. ``running_var + running_mean**2`` of the BatchNorm that follows
  the layer. It compares the calibration statistics with the training
  distribution, so it can see a shift of distribution, but only through the
  ``T`` directions of the kernel's rows.
* :func:`oas_alpha` -- the analytic oracle-approximating shrinkage of Chen et
  al. (2010) for ``count`` independent samples. It corrects sampling noise
  only.

A second matrix can take part: :func:`mix_sigma` mixes the shrunk ``sigma``
with a ``prior`` second moment (e.g. one derived from the network's
BatchNorm layers without data), and :func:`moment_mixture` chooses the
shrinkage and the prior's share together by the criterion of
:func:`moment_alpha`.

A scalar ``alpha`` (and ``w``) can only make the output energies roughly
right. :func:`match_moments` then makes them exactly right with the least
change: the second moment closest to the given one (Kullback-Leibler
divergence between zero-mean Gaussians) under which every output channel has
its target mean square, up to one common factor.

Examples
--------
>>> import numpy as np
>>> from sigmadecomp.shrinkage import shrink_sigma
>>> S = np.diag([3.0, 1.0])
>>> shrink_sigma(S, 0.5)
array([[2.5, 0. ],
       [0. , 1.5]])
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _backend as B
from ._validation import check_array, check_finite, check_sigma, neg_rtol
from .sigma import relative_sigma_error

__all__ = [
    "shrink_sigma",
    "check_alpha",
    "holdout_alpha",
    "moment_alpha",
    "oas_alpha",
    "mix_sigma",
    "moment_mixture",
    "match_moments",
    "MomentMatch",
    "DEFAULT_ALPHAS",
    "DEFAULT_WEIGHTS",
]

#: The candidate values searched by :func:`holdout_alpha` and :func:`moment_alpha`.
DEFAULT_ALPHAS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)

#: The candidate weights of the prior searched by :func:`moment_mixture`.
DEFAULT_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def check_alpha(alpha, name="alpha"):
    """``alpha`` as a float in ``[0, 1]``, or a clear error naming it.

    A value that is not a real number raises TypeError; a real number outside
    ``[0, 1]``, NaN and infinities included, raises ValueError.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{name}={alpha!r} is not allowed; {name} must be a real number "
                        "in [0, 1]")
    if not np.isfinite(float(alpha)):
        raise ValueError(f"{name}={alpha!r} is not allowed; {name} must be a finite "
                         "real number in [0, 1]")
    if not 0.0 <= float(alpha) <= 1.0:
        meaning = ("the share of the prior statistics: 0 keeps the shrunk sigma, 1 gives "
                   "the prior" if name.startswith("weight")  # mix_sigma's weight, weights[i]
                   else "0 keeps sigma, 1 gives the Frobenius metric")
        raise ValueError(f"{name}={alpha!r} is not allowed; {name} must be in [0, 1] "
                         f"({meaning})")
    return float(alpha)


def _check_alphas(alphas, name="alphas"):
    if isinstance(alphas, (str, bytes)) or not hasattr(alphas, "__iter__"):
        raise TypeError(f"{name}={alphas!r} is not allowed; {name} must be a sequence of "
                        "numbers in [0, 1]")
    out = sorted({check_alpha(a, f"{name}[{i}]") for i, a in enumerate(alphas)})
    if not out:
        raise ValueError(f"{name} is empty; give at least one value in [0, 1]")
    return out


def shrink_sigma(sigma, alpha):
    """``(1 - alpha) * sigma + alpha * (trace(sigma) / n) * I``.

    Parameters
    ----------
    sigma : array of shape (n, n) or (groups, n, n)
        Symmetric PSD second moment(s), NumPy or torch; a stack is shrunk
        matrix by matrix (each toward its own mean eigenvalue).
    alpha : float in [0, 1]
        ``0`` returns a copy of ``sigma``, ``1`` the multiple of the identity
        with the same trace.

    Returns
    -------
    array like ``sigma``
        A new array in the library, dtype and device of ``sigma``; ``sigma``
        is not modified. It is PSD when ``sigma`` is, with the same trace.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.shrinkage import shrink_sigma
    >>> S = np.array([[2.0, 1.0], [1.0, 0.0]])
    >>> shrink_sigma(S, 0.0).tolist(), shrink_sigma(S, 1.0).tolist()
    ([[2.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]])
    >>> float(np.trace(shrink_sigma(S, 0.3)))
    2.0
    """
    check_array(sigma, "sigma", ndim=(2, 3))
    alpha = check_alpha(alpha)
    if sigma.shape[-1] != sigma.shape[-2]:
        raise ValueError(f"sigma has shape {tuple(sigma.shape)}; its last two axes must be "
                         "equal (n, n)")
    check_finite(sigma, "sigma")
    xp = B.namespace(sigma)
    n = sigma.shape[-1]
    if n == 0:
        return sigma + 0.0
    S = B.as_compute(sigma)
    mean_eig = xp.sum(xp.linalg.diagonal(S), axis=-1) / n
    eye = xp.eye(n, dtype=S.dtype, device=B.device(S))
    if S.ndim == 3:
        mean_eig = mean_eig[:, None, None]
    out = (1.0 - alpha) * S + alpha * mean_eig * eye
    return xp.astype(out, sigma.dtype)


def _flat(weight):
    check_array(weight, "weight")
    if weight.ndim < 2:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; it must be (T, ...) with "
                         "at least 2 dimensions")
    xp = B.namespace(weight)
    return xp.reshape(B.as_compute(weight), (weight.shape[0], -1))


def holdout_alpha(weight, sigma_fit, sigma_check, fit, *, alphas=DEFAULT_ALPHAS):
    """The ``alpha`` whose fit on ``sigma_fit`` is best in ``sigma_check``.

    For each candidate, ``fit(weight, shrink_sigma(sigma_fit, alpha))`` gives
    an approximation of ``weight``; its relative Sigma-error is measured in
    ``sigma_check`` (statistics of data the fit did not see). The smallest
    error wins; ties go to the smaller ``alpha`` (less change to the data).

    Parameters
    ----------
    weight : array of shape (T, ...)
    sigma_fit, sigma_check : arrays of shape (n, n), n = prod(weight.shape[1:])
        Second moments of two disjoint parts of the calibration data.
    fit : callable ``(weight, sigma) -> approx``
        The decomposition to tune, returning an array of ``weight``'s shape
        (e.g. ``lambda K, S: tucker2(K, ranks, S).to_tensor()``). It should
        be deterministic (fixed ``rng``) so that the choice is.
    alphas : sequence of float in [0, 1], optional
        Candidates (:data:`DEFAULT_ALPHAS`).

    Returns
    -------
    alpha : float
    errors : dict of float to float
        Held-out relative Sigma-error per candidate.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import sigma_svd
    >>> from sigmadecomp.shrinkage import holdout_alpha
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((6, 8))
    >>> X = rng.standard_normal((400, 8)) * np.linspace(0.2, 2.0, 8)
    >>> S1, S2 = X[:200].T @ X[:200] / 200, X[200:].T @ X[200:] / 200
    >>> fit = lambda W, S: sigma_svd(W, 2, S).to_tensor()
    >>> alpha, errors = holdout_alpha(K, S1, S2, fit, alphas=(0.0, 0.5, 1.0))
    >>> alpha, errors[alpha] == min(errors.values())
    (0.0, True)
    """
    K = _flat(weight)
    alphas = _check_alphas(alphas)
    check_array(sigma_fit, "sigma_fit", ndim=2)
    check_array(sigma_check, "sigma_check", ndim=2)
    n = K.shape[1]
    for name, S in (("sigma_fit", sigma_fit), ("sigma_check", sigma_check)):
        if tuple(S.shape) != (n, n):
            raise ValueError(f"{name} has shape {tuple(S.shape)}; it must be ({n}, {n}) for "
                             f"a weight of shape {tuple(weight.shape)}")
    if not callable(fit):
        raise TypeError(f"fit={fit!r} is not allowed; fit must be a callable "
                        "(weight, sigma) -> approximation")
    errors = {}
    for a in alphas:
        approx = fit(weight, shrink_sigma(sigma_fit, a))
        errors[a] = float(relative_sigma_error(weight, B.asarray_like(approx, weight),
                                               sigma_check))
    best = min(alphas, key=lambda a: (errors[a], a))
    return best, errors


def _check_second_moment(M, name, n, weight):
    """Refuse ``M`` unless it is an ``(n, n)`` symmetric PSD array matching ``weight``'s input
    size (the library's PSD policy, :func:`sigmadecomp._validation.check_psd`)."""
    check_array(M, name, ndim=2)
    if tuple(M.shape) != (n, n):
        raise ValueError(f"{name} has shape {tuple(M.shape)}; it must be ({n}, {n}) for a "
                         f"weight of shape {tuple(weight.shape)}")
    check_sigma(M, n, M, name)


def _check_target(target, T):
    """``target`` as a float64 NumPy vector of ``T`` finite non-negative mean squares.

    A zero (a channel that is constant on the training data, e.g. a pruned one)
    carries no information about the input's second moment; the rules leave
    such channels out, as they do all-zero kernel rows."""
    tgt = np.asarray(B.to_numpy(target) if not isinstance(target, np.ndarray) else target,
                     dtype=np.float64).reshape(-1)
    if tgt.shape != (T,):
        raise ValueError(f"target has shape {tgt.shape}; it must be ({T},), one value per "
                         "output channel")
    bad = ~np.isfinite(tgt) | (tgt < 0)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"target[{i}]={float(tgt[i])!r} is not allowed; target must be finite "
                         "and non-negative (an expected mean square per output channel)")
    return tgt


def moment_alpha(weight, sigma, target, *, alphas=DEFAULT_ALPHAS):
    """The ``alpha`` under which the output channels have the ``target`` energies.

    Under a second moment ``S`` the output channel ``t`` of the layer has the
    mean square ``q_t = (K_(1) S K_(1)^T)[t, t]``. When the network tells
    what those are on its training data (``target``; e.g.
    ``running_var + running_mean**2`` of a BatchNorm reading the layer's
    output, bias-free layer), the candidate whose ``log q_t - log target_t``
    varies least over the channels wins. The spread ignores a common factor,
    as the solvers do. Ties go to the smaller ``alpha``.

    Parameters
    ----------
    weight : array of shape (T, ...)
    sigma : array of shape (n, n)
        Calibration second moment, ``n = prod(weight.shape[1:])``.
    target : array of shape (T,)
        Non-negative expected mean square of each output channel (zeros are left out).
    alphas : sequence of float in [0, 1], optional

    Returns
    -------
    alpha : float
    spreads : dict of float to float
        Standard deviation over the channels of ``log q_t - log target_t``.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.shrinkage import moment_alpha
    >>> K = np.eye(3)
    >>> S = np.diag([4.0, 1.0, 1.0])
    >>> moment_alpha(K, S, np.ones(3))[0]   # only the identity gives equal energies
    1.0
    >>> moment_alpha(K, S, np.array([4.0, 1.0, 1.0]))[0]
    0.0
    """
    K = _flat(weight)
    alphas = _check_alphas(alphas)
    n, T = K.shape[1], K.shape[0]
    _check_second_moment(sigma, "sigma", n, weight)
    tgt = _check_target(target, T)
    Kn = B.to_numpy(K).astype(np.float64)
    Sn = B.to_numpy(B.as_compute(sigma)).astype(np.float64)
    # an all-zero row or a zero target carries no information
    keep = (np.einsum("tn,tn->t", Kn, Kn) > 0) & (tgt > 0)
    if not np.any(keep):
        return alphas[0], {a: 0.0 for a in alphas}
    q_sigma = np.einsum("tn,nm,tm->t", Kn[keep], Sn, Kn[keep])
    q_eye = np.einsum("tn,tn->t", Kn[keep], Kn[keep]) * (np.trace(Sn) / n)
    log_t = np.log(tgt[keep])
    spreads = {}
    for a in alphas:
        q = (1.0 - a) * q_sigma + a * q_eye
        with np.errstate(divide="ignore"):
            d = np.log(q) - log_t
        spreads[a] = float(np.std(d)) if np.all(np.isfinite(d)) else float("inf")
    best = min(alphas, key=lambda a: (spreads[a], a))
    return best, spreads


def oas_alpha(sigma, count):
    """Oracle-approximating shrinkage intensity (Chen et al., 2010).

    ``rho = ((1 - 2/n) tr(S^2) + tr(S)^2) / ((count + 1 - 2/n) (tr(S^2) - tr(S)^2/n))``,
    clipped to ``[0, 1]``; the estimator for ``count`` independent Gaussian
    samples. Patches of one image overlap and are far from independent, so
    ``count`` should be the number of independent samples (e.g. images), not
    of patches. It corrects sampling noise, not a shift of distribution.

    Parameters
    ----------
    sigma : array of shape (n, n)
    count : int
        Number of independent samples behind ``sigma`` (>= 1).

    Returns
    -------
    alpha : float in [0, 1]

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.shrinkage import oas_alpha
    >>> S = np.diag([2.0, 1.0, 0.5])
    >>> oas_alpha(S, 10) > oas_alpha(S, 1000)
    True
    """
    check_array(sigma, "sigma", ndim=2)
    if sigma.shape[0] != sigma.shape[1] or sigma.shape[0] == 0:
        raise ValueError(f"sigma has shape {tuple(sigma.shape)}; it must be a non-empty square "
                         "(n, n) matrix")
    check_finite(sigma, "sigma")
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise ValueError(f"count={count!r} is not allowed; count must be a positive integer")
    S = B.to_numpy(B.as_compute(sigma)).astype(np.float64)
    n = S.shape[0]
    tr = float(np.trace(S))
    tr2 = float(np.sum(S * S))
    den = (count + 1.0 - 2.0 / n) * (tr2 - tr * tr / n)
    if den <= 0:  # already a multiple of the identity
        return 1.0
    return float(min(1.0, max(0.0, ((1.0 - 2.0 / n) * tr2 + tr * tr) / den)))


def _mean_eig(S):
    xp = B.namespace(S)
    return xp.sum(xp.linalg.diagonal(S), axis=-1) / S.shape[-1]


def mix_sigma(sigma, prior, alpha, weight):
    """``(1 - w) shrink_sigma(sigma, alpha) + w c prior / c_p``, on the scale of ``sigma``.

    ``c`` and ``c_p`` are the mean eigenvalues (``trace / n``) of ``sigma``
    and ``prior``: the prior is brought to the scale of ``sigma`` before the
    convex combination, so that ``weight`` is the share of the trace it gets.
    ``weight = 0`` is :func:`shrink_sigma`; ``weight = 1`` is the rescaled
    ``prior``. It is the second moment of a mixture of the two (shrunk)
    distributions, so it is PSD when both are.

    Parameters
    ----------
    sigma, prior : arrays of shape (n, n)
        Symmetric PSD second moments, NumPy or torch (``prior`` is taken to
        the library and device of ``sigma``).
    alpha, weight : float in [0, 1]

    Returns
    -------
    array like ``sigma``
        New array; the inputs are not modified. Its trace is that of ``sigma``.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.shrinkage import mix_sigma
    >>> mix_sigma(np.diag([3.0, 1.0]), np.diag([0.0, 10.0]), 0.0, 0.5).tolist()
    [[1.5, 0.0], [0.0, 2.5]]
    """
    check_array(sigma, "sigma", ndim=2)
    check_array(prior, "prior", ndim=2)
    if sigma.shape[0] != sigma.shape[1] or tuple(prior.shape) != tuple(sigma.shape):
        raise ValueError(f"sigma has shape {tuple(sigma.shape)} and prior "
                         f"{tuple(prior.shape)}; both must be the same (n, n)")
    weight = check_alpha(weight, "weight")
    out = shrink_sigma(sigma, alpha)
    if weight == 0.0:
        return out
    check_finite(prior, "prior")
    S, P = B.as_compute(out), B.as_compute(B.asarray_like(prior, sigma))  # sigma's library
    cp = float(_mean_eig(P))
    if not cp > 0:
        raise ValueError("prior has no positive trace; it must be a second moment with "
                         "some energy")
    mixed = (1.0 - weight) * S + weight * (float(_mean_eig(S)) / cp) * P
    return B.namespace(sigma).astype(mixed, sigma.dtype)


def moment_mixture(weight, sigma, prior, target, *, alphas=DEFAULT_ALPHAS,
                   weights=DEFAULT_WEIGHTS):
    """The ``(alpha, w)`` of :func:`mix_sigma` under which the output channels have ``target``.

    :func:`moment_alpha` over a grid of two parameters: the shrinkage
    ``alpha`` of ``sigma`` toward the identity and the share ``w`` of a
    ``prior`` second moment (e.g. data-free statistics from the network's
    BatchNorm layers). The candidate whose output energies
    ``(K_(1) S K_(1)^T)[t, t]`` have the least spread of ``log q_t - log
    target_t`` over the channels wins; ties go to the smaller ``w``, then the
    smaller ``alpha``.

    Parameters
    ----------
    weight : array of shape (T, ...)
    sigma, prior : arrays of shape (n, n), ``n = prod(weight.shape[1:])``
    target : array of shape (T,)
        Non-negative expected mean square of each output channel (zeros are left out).
    alphas, weights : sequences of float in [0, 1], optional

    Returns
    -------
    (alpha, w) : tuple of float
    spreads : dict of (float, float) to float

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.shrinkage import mix_sigma, moment_mixture
    >>> K = np.eye(3)
    >>> S, P = np.diag([4.0, 1.0, 1.0]), np.diag([1.0, 4.0, 1.0])
    >>> target = np.diag(mix_sigma(S, P, 0.0, 0.5))   # equal parts of the two
    >>> moment_mixture(K, S, P, target)[0]
    (0.0, 0.5)
    """
    K = _flat(weight)
    alphas, weights = _check_alphas(alphas), _check_alphas(weights, "weights")
    n, T = K.shape[1], K.shape[0]
    _check_second_moment(sigma, "sigma", n, weight)
    _check_second_moment(prior, "prior", n, weight)
    tgt = _check_target(target, T)
    Kn = B.to_numpy(K).astype(np.float64)
    Sn = B.to_numpy(B.as_compute(sigma)).astype(np.float64)
    Pn = B.to_numpy(B.as_compute(prior)).astype(np.float64)
    if not np.trace(Pn) > 0:
        raise ValueError("prior has no positive trace; it must be a second moment with "
                         "some energy")
    keep = (np.einsum("tn,tn->t", Kn, Kn) > 0) & (tgt > 0)
    grid = [(a, w) for w in weights for a in alphas]
    if not np.any(keep):
        return grid[0], {g: 0.0 for g in grid}
    c = np.trace(Sn) / n
    q_sigma = np.einsum("tn,nm,tm->t", Kn[keep], Sn, Kn[keep])
    q_eye = np.einsum("tn,tn->t", Kn[keep], Kn[keep]) * c
    q_prior = np.einsum("tn,nm,tm->t", Kn[keep], Pn, Kn[keep]) * (c / (np.trace(Pn) / n))
    log_t = np.log(tgt[keep])
    spreads = {}
    for a, w in grid:
        q = (1.0 - w) * ((1.0 - a) * q_sigma + a * q_eye) + w * q_prior
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.log(q) - log_t
        spreads[(a, w)] = float(np.std(d)) if np.all(np.isfinite(d)) else float("inf")
    best = min(grid, key=lambda g: (spreads[g], g[1], g[0]))
    return best, spreads


class MomentMatch(tuple):
    """Result of :func:`match_moments`: ``(sigma, multipliers, scale)``.

    ``sigma`` is the matched second moment (library, dtype and device of the
    input), ``multipliers`` the ``T`` Lagrange multipliers ``lam`` of
    ``sigma^-1 -> sigma^-1 + K^T diag(lam) K`` (float64 NumPy, 0 for the
    channels left out), ``scale`` the common factor ``c`` of the matched mean
    squares ``c * target``.
    """

    __slots__ = ()

    def __new__(cls, sigma, multipliers, scale):
        return super().__new__(cls, (sigma, multipliers, scale))

    sigma = property(lambda self: self[0])
    multipliers = property(lambda self: self[1])
    scale = property(lambda self: self[2])


#: Largest relative deviation of a matched mean square from its target that
#: :func:`match_moments` accepts before it warns.
MATCH_RTOL = 1e-8


def match_moments(weight, sigma, target, *, maxiter=200):
    """The second moment nearest ``sigma`` whose output mean squares are ``c * target``.

    Among the second moments ``S'`` under which the layer's output channels
    have the mean squares ``(K_(1) S' K_(1)^T)[t, t] = c * target_t``, the
    one with the least Kullback-Leibler divergence ``KL(N(0, S') || N(0,
    sigma))``. ``c`` is fixed beforehand as the geometric mean of ``q_t /
    target_t`` (``q_t`` the mean squares under ``sigma``): the solvers ignore
    the scale of Sigma, and the matched matrix keeps that of ``sigma``. The
    solution is ``S'^-1 = sigma^-1 + K^T diag(lam) K`` (the Gaussian tilted by
    ``exp(-sum_t lam_t (K_t x)^2 / 2)``), computed without inverting
    ``sigma``::

        S' = sigma - sigma K^T diag(lam) (I + Q diag(lam))^-1 K sigma,   Q = K sigma K^T

    where ``lam`` maximises the concave ``log det(I + Q^1/2 diag(lam) Q^1/2)
    - c target . lam`` (Newton's method with an exact line search, each step
    followed by a sweep of coordinate steps; ``T x T`` systems only). ``S'``
    is symmetric PSD, changes ``sigma`` only in the directions ``sigma K^T``
    and equals it when the mean squares are already proportional to
    ``target``. Use it after :func:`moment_alpha` or
    :func:`moment_mixture`, whose scalar choice leaves the energies only
    roughly right (``notes/transfer.md``).

    Channels whose kernel row is zero, whose target is zero (constant on the
    training data) or whose mean square under ``sigma`` is below ``1e-12`` of
    the largest carry no information about ``sigma`` and are left out
    (multiplier 0).

    Parameters
    ----------
    weight : array of shape (T, ...)
    sigma : array of shape (n, n)
        Symmetric PSD second moment, ``n = prod(weight.shape[1:])``; NumPy or
        torch, float32 or float64. Not modified.
    target : array of shape (T,)
        Non-negative expected mean square of each output channel (e.g.
        ``running_var + (running_mean - bias)**2`` of the following
        BatchNorm).
    maxiter : int, optional
        Newton steps at most (default 200). A match that is off by more
        than ``MATCH_RTOL`` (relative) after them warns with the deviation
        reached and why, and returns the closest matrix found. On the
        reference network's layers (ratios of target to current mean square
        within a decade) it converges in a few steps; with a well-conditioned
        ``K sigma K^T``, ratios spanning six decades take a few tens. Wider
        spreads, or an ill-conditioned ``K sigma K^T``, can fail to match
        (the search stops early once it makes no progress).

    Returns
    -------
    MomentMatch
        ``(sigma, multipliers, scale)``.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.shrinkage import match_moments
    >>> K = np.array([[1.0, 0.0], [1.0, 1.0]])
    >>> S = np.eye(2)
    >>> out = match_moments(K, S, np.array([1.0, 4.0]))
    >>> np.round(np.diag(K @ out.sigma @ K.T) / out.scale, 10)
    array([1., 4.])
    """
    import warnings

    from .contract import user_stacklevel
    from .exceptions import CompressionWarning

    K = _flat(weight)
    n, T = K.shape[1], K.shape[0]
    _check_second_moment(sigma, "sigma", n, weight)
    check_finite(sigma, "sigma")
    tgt = _check_target(target, T)
    if isinstance(maxiter, bool) or not isinstance(maxiter, numbers.Integral) or maxiter < 1:
        raise ValueError(f"maxiter={maxiter!r} is not allowed; maxiter must be a positive "
                         "integer")
    Kn = B.to_numpy(K).astype(np.float64)
    Sn = B.to_numpy(B.as_compute(sigma)).astype(np.float64)
    Sn = (Sn + Sn.T) / 2
    q_all = np.einsum("tn,nm,tm->t", Kn, Sn, Kn)
    keep = ((np.einsum("tn,tn->t", Kn, Kn) > 0) & (q_all > 1e-12 * max(q_all.max(), 0.0))
            & (tgt > 0))
    lam_all = np.zeros(T)
    if not np.any(keep):
        return MomentMatch(B.asarray_like(Sn, sigma), lam_all, 1.0)
    Kk = Kn[keep]
    SK = Sn @ Kk.T
    Q = Kk @ SK
    Q = (Q + Q.T) / 2
    q = q_all[keep]
    scale = float(np.exp(np.mean(np.log(q) - np.log(tgt[keep]))))
    v = scale * tgt[keep]
    lam, dev = _match_multipliers(Q, v, maxiter)
    m = len(q)
    A = np.linalg.solve(np.eye(m) + Q * lam[None, :], np.eye(m))  # (I + Q diag(lam))^-1
    out = Sn - SK @ (lam[:, None] * A) @ SK.T
    out = (out + out.T) / 2
    lam_all[keep] = lam
    if dev > MATCH_RTOL:
        spread = float(np.log10((v / q).max() / (v / q).min()))
        eig = np.linalg.eigvalsh(Q)
        rank = int(np.sum(eig > eig[-1] * len(q) * np.finfo(np.float64).eps))
        why = (f"the {len(q)} channels' rows are dependent under sigma (K sigma K^T has rank "
               f"{rank}), so no second moment on sigma's support has these energies"
               if rank < len(q) else
               f"the targets' ratios to the current mean squares span {spread:.1f} decades "
               f"and K sigma K^T has condition number {eig[-1] / eig[0]:.1e}, which puts the "
               "answer near the boundary of the solver's domain, where it converges slowly")
        lo, hi = np.linalg.eigvalsh(out)[[0, -1]]
        if lo < -neg_rtol(np.float64) * max(hi, 0.0):
            # the closest iterate is not a valid second moment in floating point: no match
            out, lam_all, what = Sn.copy(), np.zeros(T), "sigma is returned unchanged"
        else:
            what = "the closest matrix found is returned"
        warnings.warn(f"match_moments: the output mean squares match their targets only to "
                      f"{dev:.2e} (relative) (maxiter={maxiter}); {why}; {what}",
                      CompressionWarning, stacklevel=user_stacklevel())
    return MomentMatch(B.asarray_like(out, sigma), lam_all, scale)


def _match_multipliers(Q, v, maxiter):
    """``lam`` with ``diag((Q^-1 + diag(lam))^-1) = v``, and the relative deviation reached.

    Newton's method on the dual ``f(lam) = v . lam - log det(I + Q^1/2 diag(lam) Q^1/2)``
    (convex; its minimiser is the answer), started from the better of the solution
    for the diagonal of ``Q`` and a few sweeps of exact coordinate steps (iterative
    proportional fitting: the ``lam_t`` that matches channel ``t`` with the others
    fixed). Each Newton direction is searched exactly: along ``lam + s d`` the
    dual is ``f(lam) + s v . d - sum_i log(1 + s e_i)`` with ``e`` the eigenvalues
    of one ``T x T`` matrix, so its minimiser (inside the domain, lowering ``f``)
    costs one eigendecomposition and one factorisation, however far the answer is.
    Every Newton step is followed by a sweep of coordinate steps, kept when it
    lowers ``f``: targets far from the current energies put the answer near the
    boundary of the dual's domain, where Newton's steps are short and the sweeps
    go much further (with ratios spanning six decades, tens of steps instead of
    thousands). The search stops when the deviation has not improved for a
    while; the iterate that came closest is returned with its deviation.
    """
    m = len(v)
    w, V = np.linalg.eigh(Q)
    Qh = (V * np.sqrt(np.maximum(w, max(w.max(), 0.0) * 1e-13))) @ V.T
    eye = np.eye(m)
    tol = MATCH_RTOL * 1e-2

    def evaluate(lam):
        # P = Qh (I + Qh diag(lam) Qh)^-1 Qh, X = L^-1 Qh (P = X^T X) and f, or Nones
        # outside the domain
        try:
            L = np.linalg.cholesky(eye + Qh @ (lam[:, None] * Qh))
        except np.linalg.LinAlgError:
            return None, None, None
        X = np.linalg.solve(L, Qh)
        P = X.T @ X
        if not np.all(np.isfinite(P)):
            return None, None, None
        return P, X, float(v @ lam - 2.0 * np.sum(np.log(np.diag(L))))

    def deviation(P):
        return float(np.max(np.abs(np.diag(P) / v - 1.0)))

    def search(lam, X, d):
        # the exact minimiser of f along lam + s d, evaluated (s = 0: no descent)
        e = np.linalg.eigvalsh(X @ (d[:, None] * X.T))
        s = _line_minimum(float(v @ d), e)
        for _ in range(60):  # (rounding at the boundary of the domain)
            if s <= 0.0:
                break
            P2, X2, f2 = evaluate(lam + s * d)
            if P2 is not None:
                return s, P2, X2, f2
            s *= 0.5
        return 0.0, None, None, None

    lam = np.zeros(m)
    P, X, f = evaluate(lam)
    dev = deviation(P)
    if dev <= tol:  # already proportional: nothing to move
        return lam, dev
    # start: the diagonal solution (exact when Q is diagonal), searched along from zero
    s, P2, X2, f2 = search(lam, X, 1.0 / v - 1.0 / np.diag(Q))
    if P2 is not None and f2 <= f:
        lam, P, X, f = s * (1.0 / v - 1.0 / np.diag(Q)), P2, X2, f2
    # or a few sweeps of coordinate steps from zero: a better start when the targets are far
    lam_c, P_c = np.zeros(m), Q.copy()
    for _ in range(5):
        lam_c, P_c = _coordinate_sweep(lam_c, P_c, v)
    P2, X2, f2 = evaluate(lam_c)
    if P2 is not None and f2 < f:
        lam, P, X, f = lam_c, P2, X2, f2
    dev = deviation(P)
    best, since = (dev, lam.copy()), 0
    for _ in range(maxiter):
        # matched; or no progress for many steps (at rounding level once within MATCH_RTOL)
        if dev <= tol or since >= (10 if best[0] <= MATCH_RTOL else 50):
            break
        g = v - np.diag(P)
        step = -np.linalg.lstsq(P * P, g, rcond=None)[0]
        s, P2, X2, f2 = search(lam, X, step)
        if P2 is not None and f2 <= f + 1e-12 * abs(f):
            lam, P, X, f = lam + s * step, P2, X2, f2
        # then a sweep of coordinate steps: far from the answer (near the boundary of the
        # domain) Newton's steps are short and these move much further
        lam_c, P_c = _coordinate_sweep(lam, P, v)
        P2, X2, f2 = evaluate(lam_c)
        if P2 is not None and f2 < f:
            lam, P, X, f = lam_c, P2, X2, f2
        dev = deviation(P)
        if dev < 0.999 * best[0]:
            best, since = (dev, lam.copy()), 0
        else:
            since += 1
            if dev < best[0]:
                best = (dev, lam.copy())
    return best[1], best[0]


def _line_minimum(c, e):
    """The ``s >= 0`` minimising the convex ``s c - sum_i log(1 + s e_i)`` on its domain
    (``1 + s e_i > 0``): 0 when it does not descend, else a point at or just before the
    minimiser, strictly inside the domain (safeguarded Newton steps on the slope)."""
    def slope(s):
        return c - float(np.sum(e / (1.0 + s * e)))

    if not slope(0.0) < 0.0:
        return 0.0
    neg = e < 0
    lo, hi = 0.0, (float(np.min(-1.0 / e[neg])) if np.any(neg) else np.inf)
    if not np.isfinite(hi):  # no boundary that way: bracket the minimiser by doubling
        hi = 1.0
        while slope(hi) < 0.0:
            lo, hi = hi, 2.0 * hi
            if hi > 1e300:
                return lo
    s = min(1.0, 0.5 * (lo + hi)) if lo == 0.0 else 0.5 * (lo + hi)
    for _ in range(100):
        d = slope(s)
        if d < 0.0:
            lo = s
        else:
            hi = s
        if d == 0.0 or hi - lo <= 1e-14 * hi:
            break
        curv = float(np.sum((e / (1.0 + s * e)) ** 2))
        t = s - d / curv if curv > 0 else 0.5 * (lo + hi)
        s = t if lo < t < hi else 0.5 * (lo + hi)
    return lo if lo > 0.0 else s if slope(s) <= 0.0 else lo


def _coordinate_sweep(lam, P, v):
    """One sweep of exact coordinate steps: for each ``t`` in turn, the ``lam_t`` that gives
    ``P[t, t] = v[t]`` (a rank-one update of ``P``, which stays positive definite)."""
    lam, P = lam.copy(), P.copy()
    for t in range(len(v)):
        d = 1.0 / v[t] - 1.0 / P[t, t]
        Pt = P[:, t].copy()
        P -= (d / (1.0 + d * Pt[t])) * np.outer(Pt, Pt)
        lam[t] += d
    return lam, P
