"""A second-moment matrix validated and factorized once, for every function that takes one.

A layer's ``sigma`` is read by several steps: rank selection
(:func:`sigmadecomp.ranks.evbmf_ranks`, :func:`sigmadecomp.ranks.error_curve`,
:func:`sigmadecomp.ranks.allocate_ranks`), the decomposition
(:func:`sigmadecomp.sigma_svd`, :func:`sigmadecomp.tucker2`,
:func:`sigmadecomp.cp`, :func:`sigmadecomp.tt_conv`,
:func:`sigmadecomp.tt_linear`) and the report
(:func:`sigmadecomp.relative_sigma_error`). Given a plain matrix, each of them
checks it (shape, finite entries, symmetry), symmetrises a float64 copy,
tests that it is positive semi-definite and, where needed, eigen-decomposes
it. A :class:`PreparedSigma` passed in place of the matrix does each of these
once:

* the checks and the symmetrised float64 copy at construction;
* the PSD test on first need -- read off the eigenvalues when they are
  already known, otherwise the shifted Cholesky test of the library's policy
  (:func:`sigmadecomp._validation.check_psd`);
* the eigen-decomposition on first need (lazily), and the
  :class:`sigmadecomp.PSDRoot` of each eigenvalue floor from it.

The results are the same as with the plain matrix (to rounding): the same
policy and thresholds apply, they are only not recomputed. The ridge of the
solvers (``sigma + ridge * mean eigenvalue * I``) is not part of the object:
each solver adds it to the prepared matrix as it does to a plain one (an
``n x n`` addition), and a ridged eigen-decomposition is the prepared one
with shifted eigenvalues.
"""

from __future__ import annotations

import numpy as np

from . import _backend as B
from ._validation import (
    check_array,
    check_psd,
    check_sigma,
    neg_rtol as _neg_rtol,
    symmetrised_float64,
    zero_rtol,
)

__all__ = ["PreparedSigma", "prepare_sigma"]


class PreparedSigma:
    """A validated, symmetrised ``sigma`` with its PSD test and eigen-decomposition cached.

    Every function of the library that takes ``sigma`` accepts a
    ``PreparedSigma`` in its place and gives the same result as with the
    matrix it was made from. Work is done once per object: make one per
    layer (or per statistic shared by several layers) and pass it to every
    step.

    Parameters
    ----------
    sigma : array of shape (n, n)
        Symmetric positive semi-definite second moment (NumPy or torch,
        float32 or float64); it is not modified. Its dtype sets the
        tolerances of the policy of :mod:`sigmadecomp.sigma`, as for the
        plain matrix.
    like : array, optional
        Hold the matrix in the library and on the device of ``like``
        (default: those of ``sigma``). The matrix is always float64.
    name : str, optional
        How error messages name the matrix (default ``'sigma'``).
    rebuild : callable, optional
        A function of no arguments that returns ``sigma`` again, for
        :meth:`release`. By default ``sigma`` itself is kept for it (a
        reference, not a copy).

    Attributes
    ----------
    matrix : array of shape (n, n)
        The symmetrised float64 matrix (do not modify it).
    dtype
        The dtype of the ``sigma`` given (float32 or float64).
    n : int
    name : str

    Raises
    ------
    TypeError, ValueError
        As the functions taking ``sigma`` would: not a float array, not
        square, not finite, not symmetric. Positive semi-definiteness is
        tested on first need (:meth:`check_psd`) with the same message.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import tucker2, relative_sigma_error
    >>> from sigmadecomp.prepared import PreparedSigma
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((6, 4, 3, 3))
    >>> X = rng.standard_normal((200, 36))
    >>> S = X.T @ X / 200
    >>> P = PreparedSigma(S)
    >>> a = tucker2(K, (3, 2), P, n_iter_max=5)
    >>> b = tucker2(K, (3, 2), S, n_iter_max=5)
    >>> bool(np.allclose(a.to_tensor(), b.to_tensor()))
    True
    >>> bool(np.isclose(relative_sigma_error(K, a.to_tensor(), P), a.sigma_error))
    True
    >>> P.eigh_count, P.psd_checked   # tucker2 needs no eigen-decomposition of sigma
    (0, True)
    """

    def __init__(self, sigma, *, like=None, name="sigma", rebuild=None):
        if isinstance(sigma, PreparedSigma):
            raise TypeError(f"{name} is already a PreparedSigma; pass it as it is")
        check_array(sigma, name, ndim=2)
        n = int(sigma.shape[0])
        if tuple(sigma.shape) != (n, n):
            raise ValueError(f"{name} has shape {tuple(sigma.shape)}; {name} must be a square "
                             "(n, n) matrix")
        if like is None:
            like = sigma
        self.name = name
        self.dtype = sigma.dtype
        self.n = n
        # an empty float64 array in like's library and on its device: all that the
        # conversion needs, without holding a reference to (or a copy of) like
        self._compute = B.as_compute(like.reshape(-1)[:0])
        self._matrix = check_sigma(sigma, n, self._compute, name, psd=False)
        self._source = (lambda: sigma) if rebuild is None else rebuild
        self._psd_checked = False
        self._eigh = None
        self._roots = {}
        self._copies = {}
        #: How many eigen-decompositions of this matrix were computed (0 or 1).
        self.eigh_count = 0

    # -- what array-taking code reads from a ``sigma``
    @property
    def matrix(self):
        if self._matrix is None:  # released: the checked input, converted again
            self._matrix = symmetrised_float64(self._source(), self._compute)
        return self._matrix

    @property
    def shape(self):
        return (self.n, self.n)

    @property
    def ndim(self):
        return 2

    @property
    def device(self):
        return B.device(self.matrix)

    @property
    def psd_checked(self):
        """Whether the PSD test has run (it passed: a failure raises)."""
        return self._psd_checked

    def __repr__(self):
        lib = "torch" if B.is_torch(self.matrix) else "numpy"
        return (f"PreparedSigma(n={self.n}, {lib}, dtype={_name(self.dtype)}, "
                f"psd_checked={self._psd_checked}, eigh={'yes' if self._eigh else 'no'})")

    # -- the cached work
    def eigh(self):
        """``(eigenvalues, eigenvectors)`` of :attr:`matrix`, ascending; computed once.

        The first call also decides the PSD test from the eigenvalues (if it
        has not run yet).
        """
        if self._eigh is None:
            lam, V = B.eigh(self.matrix)
            self.eigh_count += 1
            self._eigh = (lam, V)
            if not self._psd_checked:
                check_psd(self.matrix, self.dtype, self.name, eigenvalues=lam)
                self._psd_checked = True
        return self._eigh

    def check_psd(self):
        """Refuse an indefinite matrix (the policy of :func:`sigmadecomp.sigma.psd_root`), once.

        Read off the eigenvalues when they are known, else a shifted
        Cholesky test (about a third of an eigen-decomposition).
        """
        if not self._psd_checked:
            eig = None if self._eigh is None else self._eigh[0]
            check_psd(self.matrix, self.dtype, self.name, eigenvalues=eig)
            self._psd_checked = True
        return self

    def root(self, *, rtol=None, neg_rtol=None):
        """The :class:`sigmadecomp.PSDRoot` of :func:`sigmadecomp.psd_root` with these floors.

        Built from the cached eigen-decomposition; one object per ``rtol``.
        """
        from .sigma import _root_from_eigh

        rtol = zero_rtol(self.dtype) if rtol is None else float(rtol)
        lam, V = self.eigh()
        if neg_rtol is not None and float(neg_rtol) != _neg_rtol(self.dtype):
            check_psd(self.matrix, self.dtype, self.name, eigenvalues=lam, tol=float(neg_rtol))
        if rtol not in self._roots:
            self._roots[rtol] = _root_from_eigh(lam, V, rtol)
        return self._roots[rtol]

    def discard_factorization(self):
        """Free the eigen-decomposition and the roots built from it (the PSD test stays done).

        For a caller that holds many prepared matrices and knows that no
        later step needs a root (an ``n x n`` eigenvector matrix each). A
        later :meth:`eigh` or :meth:`root` recomputes it (counted in
        :attr:`eigh_count`).
        """
        self._eigh = None
        self._roots.clear()
        self._copies.clear()
        return self

    def release(self):
        """Free everything held for this matrix: the float64 matrix too, not only the factorization.

        For a caller that prepares many matrices up front and uses one at a
        time (``compress`` over a network's layers): the checks stay done and
        the next use rebuilds the matrix from the original (or ``rebuild``)
        with the same conversion, so results do not change; only the
        conversion (one ``n x n`` copy) is paid again, not the checks.

        Examples
        --------
        >>> import numpy as np
        >>> from sigmadecomp.prepared import PreparedSigma
        >>> S = np.array([[2.0, 1.0], [1.0, 2.0]])
        >>> P = PreparedSigma(S).release()
        >>> P.held
        False
        >>> bool(np.array_equal(P.matrix, S)), P.held
        (True, True)
        """
        self.discard_factorization()
        self._matrix = None
        return self

    @property
    def held(self):
        """Whether the float64 matrix is in memory (False after :meth:`release`)."""
        return self._matrix is not None

    def like(self, x):
        """This object in the library and on the device of ``x`` (itself if they match).

        A copy shares the work already done (converted, not recomputed) and
        is cached, so each library/device pair converts once.
        """
        if _same_place(self.matrix, x):
            return self
        key = (type(x).__module__, str(B.device(x)))
        other = self._copies.get(key)
        if other is None:
            other = object.__new__(PreparedSigma)
            other.name, other.dtype, other.n = self.name, self.dtype, self.n
            conv = B.as_compute(x)
            other._matrix = B.asarray_like(self._matrix, conv)
            other._compute = conv.reshape(-1)[:0]
            other._source = lambda: self.matrix
            other._psd_checked = self._psd_checked
            other._eigh = (None if self._eigh is None else
                           tuple(B.asarray_like(a, conv) for a in self._eigh))
            other._roots, other._copies, other.eigh_count = {}, {}, 0
            self._copies[key] = other
        elif self._psd_checked:
            other._psd_checked = True
        return other

    def validated(self, n, like, name="sigma", *, psd=True):
        """The matrix for a function expecting an ``(n, n)`` ``sigma``, as ``check_sigma`` gives it.

        In the library and on the device of ``like``, float64, PSD-tested
        once when ``psd``.
        """
        if self.n != n:
            raise ValueError(
                f"{name} has shape {self.shape}; {name} must be ({n}, {n}) to match "
                f"the flattened input dimension n={n} of the weight"
            )
        if psd:
            self.check_psd()
        return self.like(like).matrix


def _name(dtype):
    s = str(dtype)
    return s[len("torch."):] if s.startswith("torch.") else np.dtype(dtype).name


def _same_place(a, b):
    return B.is_torch(a) == B.is_torch(b) and str(B.device(a)) == str(B.device(b))


def prepare_sigma(sigma, *, like=None, name="sigma"):
    """``sigma`` as a :class:`PreparedSigma` (``None`` and prepared objects pass through).

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp.prepared import prepare_sigma
    >>> P = prepare_sigma(np.eye(3))
    >>> prepare_sigma(P) is P, prepare_sigma(None)
    (True, None)
    """
    if sigma is None or isinstance(sigma, PreparedSigma):
        return sigma
    return PreparedSigma(sigma, like=like, name=name)


def prepared_or(sigma, matrix):
    """``sigma`` if it is a :class:`PreparedSigma` (in ``matrix``'s library/device), else ``matrix``.

    For a function that has validated its ``sigma`` into ``matrix`` with
    :func:`sigmadecomp._validation.check_sigma` and then factorizes it:
    passing the result to :func:`sigmadecomp.psd_root` reuses the prepared
    eigen-decomposition.
    """
    return sigma.like(matrix) if isinstance(sigma, PreparedSigma) else matrix
