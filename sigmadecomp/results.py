"""Result objects returned by the decompositions.

Every result holds its factors in the library, dtype and device of the input,
the relative Sigma-error (``errors`` history for iterative methods), and
``to_tensor()`` to rebuild the approximated weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from . import _backend as B

__all__ = ["SVDResult", "Tucker2Result", "CPResult"]


def _shape(x):
    return "x".join(str(int(s)) for s in x.shape)


def _kind(x):
    if B.is_torch(x):
        return f"torch.{str(x.dtype).replace('torch.', '')} on {x.device}"
    return f"numpy.{x.dtype}"


def _fmt_err(e):
    return "None" if e is None else f"{e:.6g}"


@dataclass(repr=False)
class SVDResult:
    """Rank-``r`` factorisation ``W ~= left @ right`` of a ``(T, n)`` matrix.

    Attributes
    ----------
    left : array of shape (T, r)
        Orthonormal columns (zero columns when ``r`` exceeds the rank that
        ``sigma`` can see).
    right : array of shape (r, n)
    singular_values : array of shape (min(T, k),)
        Singular values of the whitened matrix ``W L`` (plain ``W`` when
        ``sigma`` is None), descending, float64.
    error : float
        Relative error in the metric minimised: the Sigma-error in
        ``ridge_sigma(sigma, ridge)`` (the plain Sigma-error when
        ``ridge == 0``; relative Frobenius error when ``sigma`` is None).
    rank : int
    weighted : bool
        Whether a ``sigma`` was used.
    ridge : float
        The ``ridge`` used (0 without ``sigma``).
    sigma_error : float or None
        Relative Sigma-error in the user's ``sigma`` itself (``None`` without
        ``sigma``); equal to ``error`` when ``ridge == 0``.
    """

    left: object
    right: object
    singular_values: object
    error: float
    rank: int
    weighted: bool = False
    ridge: float = 0.0
    sigma_error: Optional[float] = None

    @property
    def factors(self):
        """``(left, right)``."""
        return self.left, self.right

    def to_tensor(self):
        """The rank-``r`` approximation ``left @ right`` of shape (T, n)."""
        return self.left @ self.right

    def __repr__(self):
        norm = "Sigma" if self.weighted else "Frobenius"
        return (
            f"SVDResult(rank={self.rank}, left={_shape(self.left)}, "
            f"right={_shape(self.right)}, {norm} error={_fmt_err(self.error)}, "
            f"{_ridge_tail(self)}{_kind(self.left)})"
        )


def _ridge_tail(res):
    if not res.ridge:
        return ""
    return f"ridge={res.ridge:g}, true Sigma error={_fmt_err(res.sigma_error)}, "


@dataclass(repr=False)
class _IterativeResult:
    errors: List[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    weighted: bool = False
    seconds: float = 0.0
    ridge: float = 0.0
    sigma_error: Optional[float] = None

    @property
    def error(self) -> Optional[float]:
        """Final relative error (last entry of ``errors``)."""
        return self.errors[-1] if self.errors else None

    def _tail(self):
        norm = "Sigma" if self.weighted else "Frobenius"
        return (
            f"{norm} error={_fmt_err(self.error)}, {_ridge_tail(self)}n_iter={self.n_iter}, "
            f"converged={self.converged}"
        )


@dataclass(repr=False)
class Tucker2Result(_IterativeResult):
    """Tucker-2 decomposition ``K ~= G x_1 U_T x_2 U_S`` of a ``(T, S, H, W)`` kernel.

    Attributes
    ----------
    core : array of shape (r_T, r_S, H, W)
    out_factor : array of shape (T, r_T)
        ``U_T``, orthonormal columns.
    in_factor : array of shape (S, r_S)
        ``U_S``, orthonormal columns.
    errors : list of float
        Relative error after each sweep, starting with the initial point, in
        the metric minimised: the Sigma-error in ``ridge_sigma(sigma, ridge)``
        (the plain Sigma-error when ``ridge == 0``, Frobenius without
        ``sigma``).
    ridge : float
        The ``ridge`` used (0 without ``sigma``).
    sigma_error : float or None
        Relative Sigma-error of the result in the user's ``sigma`` itself
        (``None`` without ``sigma``); equal to ``error`` when ``ridge == 0``.
    n_iter : int
        Sweeps performed.
    converged : bool
        Whether the tolerance was met before ``n_iter_max``.
    """

    core: object = None
    out_factor: object = None
    in_factor: object = None

    @property
    def ranks(self):
        return int(self.out_factor.shape[1]), int(self.in_factor.shape[1])

    def to_tensor(self):
        """Reconstructed kernel ``sum_{a,b} U_T[t,a] G[a,b,h,w] U_S[s,b]``."""
        return B.einsum("ta,abhw,sb->tshw", self.out_factor, self.core, self.in_factor)

    def __repr__(self):
        return (
            f"Tucker2Result(ranks={self.ranks}, core={_shape(self.core)}, "
            f"{self._tail()}, {_kind(self.core)})"
        )


@dataclass(repr=False)
class CPResult(_IterativeResult):
    """CP decomposition ``K ~= sum_r w_r a_r (x) b_r (x) c_r (x) d_r``.

    Attributes
    ----------
    weights : array of shape (R,)
    factors : list of arrays [(T, R), (S, R), (H, R), (W, R)]
        Unit-norm columns (the scale is in ``weights``).
    errors, n_iter, converged : as for :class:`Tucker2Result`.
    """

    weights: object = None
    factors: list = field(default_factory=list)

    @property
    def rank(self):
        return int(self.weights.shape[0])

    def to_tensor(self):
        """Reconstructed kernel ``sum_r w_r A[t,r] B[s,r] C[h,r] D[w,r]``."""
        A, Bf, C, D = self.factors
        return B.einsum("r,tr,sr,hr,wr->tshw", self.weights, A, Bf, C, D)

    def __repr__(self):
        shapes = ", ".join(_shape(f) for f in self.factors)
        return (
            f"CPResult(rank={self.rank}, factors=[{shapes}], {self._tail()}, "
            f"{_kind(self.weights)})"
        )
