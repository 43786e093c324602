"""EVBMF: the rank of a noisy matrix from its singular values, and of a layer weight.

The global analytic solution of empirical variational Bayesian matrix
factorisation (Nakajima, Sugiyama, Babacan and Tomioka, JMLR 14, 2013),
applied to the (Sigma-whitened) unfoldings of a layer weight.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import _backend as B
from ._validation import EVB_BRACKET, EVB_GRID, check_array, check_finite, check_sigma
from .costs import method_spec

__all__ = ["EVBMFResult", "evbmf", "evbmf_ranks", "whitened_spectra", "check_weight",
           "evbmf_from_singular_values"]


@dataclass(repr=False)
class EVBMFResult:
    """Empirical variational Bayesian matrix factorisation of a noisy matrix.

    Attributes
    ----------
    rank : int
        The estimated rank, at least 1 (``max(evb_rank, 1)``).
    evb_rank : int
        Number of singular values above the EVB threshold; can be 0 when the
        matrix looks like pure noise.
    singular_values : ndarray of shape (min(m, n),)
        EVB estimates of the singular values (shrunk; zero below the
        threshold), float64, descending.
    sigma2 : float
        Estimated noise variance per entry.
    threshold : float
        Singular values above it are kept:
        ``sqrt(M * sigma2 * (1 + tau) * (1 + alpha / tau))``.
    shape : (int, int)
        Shape of the input matrix.
    """

    rank: int
    evb_rank: int
    singular_values: np.ndarray
    sigma2: float
    threshold: float
    shape: tuple

    def __repr__(self):
        return (
            f"EVBMFResult(rank={self.rank}, evb_rank={self.evb_rank}, "
            f"sigma2={self.sigma2:.6g}, threshold={self.threshold:.6g}, shape={self.shape})"
        )


def _tau(x, alpha):
    """Larger root of ``tau^2 - (x - 1 - alpha) tau + alpha = 0`` (``x >= (1+sqrt(alpha))^2``)."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _psi1(tau, alpha):
    return np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau


def _tau_lower(alpha):
    """Positive zero ``tau_`` of ``log(1 + tau) + alpha*log(1 + tau/alpha) - tau`` above sqrt(alpha)."""
    from scipy.optimize import brentq

    lo = math.sqrt(alpha)
    hi = max(4.0, 4.0 * lo)
    while _psi1(hi, alpha) > 0:
        hi *= 2.0
    return brentq(lambda t: _psi1(t, alpha), lo, hi, xtol=1e-14, rtol=1e-14)


def _evb_objective(s2, sv2, M, alpha, xbar):
    """``2F / M`` of EVB at noise variance ``s2`` up to a constant (vectorised over ``s2``)."""
    s2 = np.atleast_1d(s2)[:, None]
    x = sv2[None, :] / (M * s2)
    big = x > xbar
    psi1 = np.where(big, _psi1(_tau(np.where(big, x, xbar), alpha), alpha), 0.0)
    return np.sum(x + np.log(s2) + psi1, axis=1)


def evbmf_from_singular_values(sv, L, M, sigma2=None):
    """EVBMF from the singular values ``sv`` (descending) of an ``L x M`` matrix, ``L <= M``."""
    sv = np.asarray(sv, dtype=np.float64)
    # EVB is scale-equivariant (sigma2 scales with the square of the matrix): solve it on
    # the singular values divided by the largest, so that squares of very large or very
    # small ones neither overflow nor underflow (a 1e-300-scaled matrix is not noise-free)
    top = float(sv.max()) if sv.size else 0.0
    if top > 0.0 and math.isfinite(top) and top != 1.0:
        known = None if sigma2 is None else float(sigma2) / top / top
        evb_rank, shrunk, s2, threshold = evbmf_from_singular_values(sv / top, L, M, known)
        s2 = s2 * top * top if sigma2 is None else float(sigma2)
        return evb_rank, shrunk * top, s2, threshold * top
    return _evbmf_normalised(sv, L, M, sigma2)


def _evbmf_normalised(sv, L, M, sigma2):
    from scipy.optimize import minimize_scalar

    sv2 = sv * sv
    alpha = L / M
    tau_ = _tau_lower(alpha)
    xbar = (1.0 + tau_) * (1.0 + alpha / tau_)
    total = float(np.sum(sv2))
    if sigma2 is None:
        hi = total / (L * M)
        if hi <= 0.0:
            s2 = 0.0
        else:
            # The global minimiser lies in [lo, hi] (Nakajima et al. 2013):
            # EVB keeps at most Hbar = ceil(L / (1 + alpha)) - 1 components.
            hbar = min(int(math.ceil(L / (1.0 + alpha))) - 1, sv2.shape[0] - 1)
            lo = 0.0
            if hbar >= 0:
                lo = max(sv2[hbar] / (M * xbar), float(np.sum(sv2[hbar:])) / (M * (L - hbar)))
            lo = min(max(lo, hi * EVB_BRACKET), hi)
            if lo >= hi:
                s2 = hi
            else:
                grid = np.geomspace(lo, hi, EVB_GRID)
                vals = _evb_objective(grid, sv2, M, alpha, xbar)
                i = int(np.argmin(vals))
                a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.shape[0] - 1)]
                s2, best = grid[i], vals[i]
                if b > a:
                    res = minimize_scalar(
                        lambda u: float(_evb_objective(math.exp(u), sv2, M, alpha, xbar)[0]),
                        bounds=(math.log(a), math.log(b)), method="bounded",
                        options={"xatol": EVB_BRACKET})
                    if res.fun < best:
                        s2 = math.exp(res.x)
    else:
        s2 = float(sigma2)
    s2 = float(s2)
    threshold = math.sqrt(M * s2 * xbar)
    keep = sv > threshold
    if s2 > 0:
        ratio = np.where(keep, s2 / np.where(keep, sv2, 1.0), 0.0)  # sigma2 / gamma_h^2
        q = (L + M) * ratio
        disc = np.maximum((1.0 - q) ** 2 - 4.0 * L * M * ratio * ratio, 0.0)
        shrunk = np.where(keep, 0.5 * sv * (1.0 - q + np.sqrt(disc)), 0.0)
    else:
        shrunk = np.where(keep, sv, 0.0)
    evb_rank = int(np.sum(keep))
    return evb_rank, shrunk, s2, threshold


def evbmf(matrix, *, sigma2=None):
    """Rank of a noisy matrix by empirical variational Bayesian matrix factorisation.

    The global analytic EVB solution of Nakajima, Sugiyama, Babacan and
    Tomioka (JMLR 14, 2013). With ``L = min(m, n)``, ``M = max(m, n)``,
    ``alpha = L / M`` and singular values ``gamma_h``:

    1. ``tau_`` is the zero above ``sqrt(alpha)`` of
       ``psi1(tau) = log(1 + tau) + alpha log(1 + tau / alpha) - tau``, and
       ``x_ = (1 + tau_)(1 + alpha / tau_)``;
    2. the noise variance minimises the free energy
       ``sum_h [x_h - log x_h] + sum_{x_h > x_} psi1(tau(x_h))`` with
       ``x_h = gamma_h^2 / (M sigma2)`` (a log-spaced scan of the interval the
       paper proves contains the minimiser, refined by bounded Brent search);
    3. components with ``gamma_h > sqrt(M sigma2 x_)`` are kept and shrunk to
       ``gamma_h/2 (1 - (L+M) sigma2/gamma_h^2 + sqrt((1 - (L+M) sigma2/gamma_h^2)^2
       - 4 L M sigma2^2/gamma_h^4))``.

    Either orientation is accepted (the matrix is transposed internally when it
    has more rows than columns). The returned ``rank`` is at least 1 even when
    EVB prunes every component (``evb_rank == 0``): a factorized layer needs a
    positive rank.

    Parameters
    ----------
    matrix : array of shape (m, n)
        NumPy array or torch tensor (float32 or float64).
    sigma2 : float, optional
        Known noise variance per entry; estimated when None.

    Returns
    -------
    EVBMFResult

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.ranks import evbmf
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 60))
    >>> res = evbmf(X + 0.1 * rng.standard_normal((40, 60)))
    >>> res.rank, round(res.sigma2, 2)
    (3, 0.01)
    >>> evbmf((X + 0.1 * rng.standard_normal((40, 60))).T).rank
    3
    """
    check_array(matrix, "matrix", ndim=2)
    check_finite(matrix, "matrix")
    if sigma2 is not None:
        if isinstance(sigma2, bool) or not isinstance(sigma2, numbers.Real):
            raise TypeError(f"sigma2={sigma2!r} is not allowed; sigma2 must be a finite real "
                            "number >= 0 (or None to estimate it)")
        if not (math.isfinite(sigma2) and sigma2 >= 0):
            raise ValueError(f"sigma2={sigma2!r} is not allowed; sigma2 must be a finite real "
                             "number >= 0 (or None to estimate it)")
    m, n = (int(d) for d in matrix.shape)
    if m == 0 or n == 0:
        raise ValueError(f"matrix has shape {(m, n)}; matrix must have at least one row and column")
    A = B.as_compute(matrix)
    sv = B.to_numpy(B.svd(A)[1])
    L, M = min(m, n), max(m, n)
    evb_rank, shrunk, s2, thr = evbmf_from_singular_values(sv, L, M, sigma2)
    return EVBMFResult(rank=max(evb_rank, 1), evb_rank=evb_rank, singular_values=shrunk,
                       sigma2=s2, threshold=thr, shape=(m, n))


def check_weight(weight, name="weight"):
    check_array(weight, name, ndim=(2, 4))
    check_finite(weight, name)
    return weight


def _whitened(weight, sigma, rank_out=None):
    """``Y = K_(1) Sigma^{1/2}`` (symmetric floored root) as float64, shape of the weight.

    ``rank_out``: a list that receives the numerical rank of ``sigma`` (the
    number of input directions the data shows)."""
    from .prepared import prepared_or
    from .sigma import default_neg_rtol, default_rtol, psd_root

    K = B.as_compute(weight.detach() if B.is_torch(weight) else weight)
    xp = B.namespace(K)
    T = K.shape[0]
    K1 = xp.reshape(K, (T, -1))
    if sigma is None:
        return K
    if B.is_torch(sigma):  # only the values are needed (no autograd warning from the checks)
        sigma = sigma.detach()
    S = check_sigma(sigma, K1.shape[1], K1, psd=False)  # psd_root checks it
    root = psd_root(prepared_or(sigma, S), rtol=default_rtol(sigma.dtype),
                    neg_rtol=default_neg_rtol(sigma.dtype))  # once per PreparedSigma
    if rank_out is not None:
        rank_out.append(int(root.rank))
    return xp.reshape(K1 @ root.sqrt(), tuple(K.shape))


def _squared_norm(sv):
    """``sum(sv**2)`` scaled by the largest value, so that no square over- or underflows
    (``inf`` only when the sum itself is beyond the float range)."""
    top = float(np.max(sv)) if sv.size else 0.0
    if top == 0.0:
        return 0.0
    return top * top * float(np.sum((sv / top) ** 2))


def whitened_spectra(weight, sigma):
    """Singular values (NumPy float64) of the whitened mode-0 and mode-1 unfoldings, and
    ``rank``: the number of input directions ``sigma`` shows (its numerical rank; all
    ``n`` without ``sigma``)."""
    from .tenalg import unfold

    rank = []
    Y = _whitened(weight, sigma, rank)
    xp = B.namespace(Y)
    n = math.prod(int(d) for d in Y.shape[1:])
    s0 = B.to_numpy(B.svd(xp.reshape(Y, (Y.shape[0], -1)))[1])
    out = {"s0": s0, "energy": _squared_norm(s0), "shape": tuple(int(d) for d in Y.shape),
           "rank": rank[0] if rank else n}
    if Y.ndim == 4:
        out["s1"] = B.to_numpy(B.svd(unfold(Y, 1))[1])
    return out


def evbmf_ranks(weight, method, sigma=None):
    """EVBMF ranks of a layer weight, optionally Sigma-aware.

    The weight is whitened as ``Y = K_(1) Sigma^{1/2}`` (symmetric root under
    the eigenvalue floor of :func:`sigmadecomp.psd_root`; ``Y = K`` when
    ``sigma`` is None) and :func:`evbmf` is applied to the mode-0 unfolding
    ``Y_(1)`` (T x S*H*W) and the mode-1 unfolding (S x T*H*W). For the
    mode-0 side this is exactly the spectrum the Sigma-optimal factorisation
    sees; for the mode-1 side it is exact when ``Sigma`` is a Kronecker product
    ``Sigma_S kron Sigma_HW`` and a proxy otherwise. A singular ``Sigma``
    (fewer samples than inputs, dead input channels) shows only ``rank(Sigma)``
    input directions: EVB then treats the mode-0 side as the ``T x rank``
    matrix it is, and the mode-1 side as ``S`` rows of the same number of
    entries (``T * rank``), so that the exact zeros outside the data are not
    mistaken for a vanishing noise level.

    Parameters
    ----------
    weight : array of shape (T, S, H, W) or (T, n)
    method : {'svd', 'tucker2', 'cp'}
        ``'svd'``: the EVBMF rank of the mode-0 unfolding. ``'tucker2'``:
        ``(r_T, r_S)`` from the mode-0 and mode-1 unfoldings. ``'cp'``: the
        larger of the two (a heuristic: a CP rank is at least either
        unfolding rank).
    sigma : array of shape (n, n), optional

    Returns
    -------
    ranks : int or (int, int)

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.ranks import evbmf_ranks
    >>> rng = np.random.default_rng(0)
    >>> core = rng.standard_normal((4, 3, 3, 3))
    >>> U, V = rng.standard_normal((32, 4)), rng.standard_normal((24, 3))
    >>> K = np.einsum('abhw,ta,sb->tshw', core, U, V)
    >>> evbmf_ranks(K + 0.01 * rng.standard_normal(K.shape), 'tucker2')
    (4, 3)
    """
    check_weight(weight)
    shape = tuple(int(d) for d in weight.shape)
    method_spec(method, shape)
    if method not in ("svd", "tucker2", "cp"):
        raise ValueError(f"method={method!r} is not allowed; evbmf_ranks supports 'svd', 'tucker2', 'cp'")
    sp = whitened_spectra(weight, sigma)
    T, n = shape[0], math.prod(shape[1:])
    # a singular sigma shows only sp["rank"] input directions: the whitened weight is then
    # a T x rank matrix in disguise (the other singular values are exactly 0, not noise),
    # and EVB runs on that size -- else its noise estimate collapses and every direction
    # the data shows is kept
    m = max(1, min(n, sp["rank"]))
    L0 = min(T, m)
    r0 = max(1, evbmf_from_singular_values(sp["s0"][:L0], L0, max(T, m))[0])
    if method == "svd":
        return min(r0, T, n)
    # mode 1 (S x T*H*W): the same number of observed entries, T * rank, over S rows
    S = shape[1]
    cols = max(1, -(-T * m // S))
    L1 = min(S, cols)
    r1 = max(1, evbmf_from_singular_values(sp["s1"][:L1], L1, max(S, cols))[0])
    if method == "tucker2":
        return min(r0, T), min(r1, S)
    return max(r0, r1)
