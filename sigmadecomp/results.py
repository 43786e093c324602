"""Result objects returned by the decompositions.

Every decomposition returns a subclass of :class:`DecompositionResult`: the
factors as a tuple in the library, dtype and device of the input, the history
``errors`` of the relative error minimised, ``n_iter``, ``converged``,
``sigma_error``, ``ridge`` and ``to_tensor()`` to rebuild the approximated
weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import List, Optional

from . import _backend as B
from ._tt_algebra import tt_matrix

__all__ = ["DecompositionResult", "SVDResult", "Tucker2Result", "CPResult", "TTResult"]


def _shape(x):
    return "x".join(str(int(s)) for s in x.shape)


def _kind(x):
    if B.is_torch(x):
        return f"torch.{str(x.dtype).replace('torch.', '')} on {x.device}"
    return f"numpy.{x.dtype}"


def _same(a, b):
    """Whether two field values are equal: arrays by library, dtype, device, shape and
    entries; sequences and dicts entry by entry; anything else by ``==``."""
    if B.is_array(a) or B.is_array(b):
        return B.arrays_equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _fmt_err(e):
    return "None" if e is None else f"{e:.6g}"


def _ridge_tail(res):
    if not res.ridge:
        return ""
    return f"ridge={res.ridge:g}, true Sigma error={_fmt_err(res.sigma_error)}, "


@dataclass(repr=False, eq=False)
class DecompositionResult:
    """What every decomposition returns (the base of the result classes).

    Attributes
    ----------
    factors : tuple of arrays
        The factors of the format (see each subclass), in the library, dtype
        and device of the input.
    errors : list of float
        Relative error in the metric minimised -- the Sigma-error in
        ``ridge_sigma(sigma, ridge)`` (the plain Sigma-error when
        ``ridge == 0``; relative Frobenius error without ``sigma``) -- of the
        starting point and after each sweep (one entry for a closed form).
    error : float
        The last entry of ``errors``.
    n_iter : int or None
        Sweeps performed (``None`` for a closed form, which has none).
    converged : bool or None
        Whether the ``tol`` criterion was met (``None`` for a closed form).
    weighted : bool
        Whether a ``sigma`` was used.
    seconds : float
        Wall time of the call.
    ridge : float
        The ``ridge`` used (0 without ``sigma``).
    sigma_error : float or None
        Relative Sigma-error in the user's ``sigma`` itself (``None`` without
        ``sigma``, and in partial results passed to a callback when
        ``ridge > 0`` or ``sigma`` was made PSD); equal to ``error`` when ``ridge == 0`` (and ``sigma`` has no
        eigenvalue below 0 beyond rounding, :mod:`sigmadecomp.contract`).
    """

    errors: List[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    weighted: bool = False
    seconds: float = 0.0
    ridge: float = 0.0
    sigma_error: Optional[float] = None

    def __eq__(self, other):
        """Equal when of the same class with equal fields (arrays compared entry by
        entry, so a pickled or deep-copied result equals the original)."""
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    __hash__ = None  # mutable

    @property
    def error(self) -> Optional[float]:
        """Final relative error (last entry of ``errors``)."""
        return self.errors[-1] if self.errors else None

    @property
    def factors(self) -> tuple:
        raise NotImplementedError

    def to_tensor(self):
        """The approximated weight."""
        raise NotImplementedError

    def _tail(self):
        norm = "Sigma" if self.weighted else "Frobenius"
        return (
            f"{norm} error={_fmt_err(self.error)}, {_ridge_tail(self)}n_iter={self.n_iter}, "
            f"converged={self.converged}"
        )


@dataclass(repr=False, eq=False)
class SVDResult(DecompositionResult):
    """Rank-``r`` factorisation ``W ~= left @ right`` of a ``(T, n)`` matrix.

    Attributes
    ----------
    left : array of shape (T, r)
        Orthonormal columns (zero columns when ``r`` exceeds the rank that
        ``sigma`` can see).
    right : array of shape (r, n)
    factors : tuple
        ``(left, right)``.
    singular_values : array of shape (min(T, k),)
        Singular values of the whitened matrix ``W L`` (plain ``W`` when
        ``sigma`` is None), descending, float64.
    error : float
        Relative error in the metric minimised: the Sigma-error in
        ``ridge_sigma(sigma, ridge)`` (the plain Sigma-error when
        ``ridge == 0``; relative Frobenius error when ``sigma`` is None).
        ``errors == [error]``.
    rank : int
    weighted, ridge, sigma_error, seconds : as for :class:`DecompositionResult`.
    n_iter, converged : None
        A closed form has no iterations and no tolerance.
    """

    left: object = None
    right: object = None
    singular_values: object = None
    error: Optional[float] = None
    rank: int = 0
    n_iter: Optional[int] = None
    converged: Optional[bool] = None

    def __post_init__(self):
        if not self.errors and self.error is not None:
            self.errors = [self.error]
        elif self.errors and self.error is None:
            self.error = self.errors[-1]

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


@dataclass(repr=False, eq=False)
class Tucker2Result(DecompositionResult):
    """Tucker-2 decomposition ``K ~= G x_1 U_T x_2 U_S`` of a ``(T, S, H, W)`` kernel.

    Attributes
    ----------
    core : array of shape (r_T, r_S, H, W)
    out_factor : array of shape (T, r_T)
        ``U_T``, orthonormal columns.
    in_factor : array of shape (S, r_S)
        ``U_S``, orthonormal columns.
    factors : tuple
        ``(out_factor, in_factor)``.
    errors, error, n_iter, converged, weighted, seconds, ridge, sigma_error :
        as for :class:`DecompositionResult`.
    """

    core: object = None
    out_factor: object = None
    in_factor: object = None

    @property
    def factors(self):
        """``(out_factor, in_factor)``; the core is ``core``."""
        return self.out_factor, self.in_factor

    @property
    def ranks(self):
        """``(r_T, r_S)``."""
        return int(self.out_factor.shape[1]), int(self.in_factor.shape[1])

    def to_tensor(self):
        """Reconstructed kernel ``sum_{a,b} U_T[t,a] G[a,b,h,w] U_S[s,b]``."""
        return B.einsum("ta,abhw,sb->tshw", self.out_factor, self.core, self.in_factor)

    def __repr__(self):
        return (
            f"Tucker2Result(ranks={self.ranks}, core={_shape(self.core)}, "
            f"{self._tail()}, {_kind(self.core)})"
        )


@dataclass(repr=False, eq=False)
class CPResult(DecompositionResult):
    """CP decomposition ``K ~= sum_r w_r a_r (x) b_r (x) c_r (x) d_r``.

    Attributes
    ----------
    weights : array of shape (R,)
    factors : tuple of arrays ((T, R), (S, R), (H, R), (W, R))
        Unit-norm columns (the scale is in ``weights``).
    errors, error, n_iter, converged, weighted, seconds, ridge, sigma_error :
        as for :class:`DecompositionResult`.
    """

    weights: object = None
    factors: tuple = ()

    def __post_init__(self):
        self.factors = tuple(self.factors)

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


@dataclass(repr=False, eq=False)
class TTResult(DecompositionResult):
    """A Tensor-Train decomposition.

    Attributes
    ----------
    cores : tuple of arrays
        ``kind='tensor'``: 3-D cores ``(r_{k-1}, I_k, r_k)``.
        ``kind='matrix'`` / ``'conv'``: 4-D cores ``(r_{k-1}, m_k, n_k, r_k)``
        (input mode ``m_k``, output mode ``n_k``); for a conv the first core is
        the spatial core ``(1, H*W, 1, r_0)``.
    kind : {'tensor', 'matrix', 'conv'}
    shape : tuple of int
        Shape of the approximated array (``(T, S, H, W)`` for a conv,
        ``(T, N)`` for a Linear weight).
    in_modes, out_modes : tuple of int
        Channel factorisations ``S = prod in_modes`` (``N`` for a Linear
        weight), ``T = prod out_modes``; empty for ``kind='tensor'``.
    solves : dict
        Core updates by method: ``{'dense': ..., 'cg': ..., 'cg_iter': ...}``
        (total CG iterations).
    svd_tails : list of float
        Squared Frobenius norm discarded by each truncation of the TT-SVD
        (absolute, in the float64 computation). Their sum bounds the squared
        Frobenius error of the TT-SVD point.
    errors : list of float
        Relative error in the metric minimised, starting at the TT-SVD point,
        then one entry per ALS sweep: the Sigma-error in
        ``ridge_sigma(sigma, ridge)`` (the plain Sigma-error when ``ridge=0``;
        relative Frobenius error when no ``sigma`` was given).
    ridge : float
        The ``ridge`` used (0 without ``sigma``).
    sigma_error : float or None
        Final relative Sigma-error in the user's ``sigma`` itself (``None``
        without ``sigma``); equal to ``error`` when ``ridge == 0`` (and ``sigma``
        has no eigenvalue below 0 beyond rounding, :mod:`sigmadecomp.contract`).
    n_iter, converged, weighted, seconds : as for the other results.
    """

    cores: tuple = ()
    kind: str = "tensor"
    shape: tuple = ()
    in_modes: tuple = ()
    out_modes: tuple = ()
    svd_tails: list = field(default_factory=list)
    solves: dict = field(default_factory=dict)

    def __post_init__(self):
        self.cores = tuple(self.cores)

    @property
    def factors(self):
        """The cores (``cores``)."""
        return self.cores

    @property
    def ranks(self):
        """Internal TT ranks ``(r_0, ..., r_{d-1})`` (boundary ranks of 1 excluded)."""
        return tuple(int(c.shape[-1]) for c in self.cores[:-1])

    @property
    def kernel_size(self):
        """``(H, W)`` for a conv, else ``None``."""
        return tuple(self.shape[2:]) if self.kind == "conv" else None

    @property
    def n_params(self):
        """Number of entries in all cores."""
        return int(sum(math.prod(c.shape) for c in self.cores))

    def to_tensor(self):
        """Reconstruct the approximated array (its original shape and layout)."""
        if self.kind == "tensor":
            cur = self.cores[0]
            for c in self.cores[1:]:
                cur = B.einsum("...a,abc->...bc", cur, c)
            xp = B.namespace(cur)
            return xp.reshape(cur, self.shape)
        Wt = tt_matrix(self.cores)
        xp = B.namespace(Wt)
        if self.kind == "matrix":
            return Wt
        T, S, H, Wd = self.shape
        return xp.permute_dims(xp.reshape(Wt, (T, H, Wd, S)), (0, 3, 1, 2))

    def __repr__(self):
        modes = "" if self.kind == "tensor" else f", in_modes={self.in_modes}, out_modes={self.out_modes}"
        norm = "Sigma" if self.weighted else "Frobenius"
        kind = _kind(self.cores[0]) if self.cores else ""
        return (
            f"TTResult(kind={self.kind!r}, shape={self.shape}, ranks={self.ranks}{modes}, "
            f"{norm} error={_fmt_err(self.error)}, {_ridge_tail(self)}n_iter={self.n_iter}, "
            f"converged={self.converged}, {kind})"
        )
