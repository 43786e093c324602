"""Unfolding, folding and Khatri-Rao products (row-major conventions).

The mode-``k`` unfolding puts mode ``k`` on the rows and the remaining modes,
in their original order and row-major (last index fastest), on the columns.
For a conv kernel ``K`` of torch layout ``(T, S, H, W)`` this makes
``unfold(K, 0) == K.reshape(T, S*H*W)`` with columns indexed ``(s, h, w)``,
the same order as ``torch.nn.functional.unfold`` patches.
"""

from __future__ import annotations

import math

from . import _backend as B
from ._validation import check_array, check_int, check_same_library

__all__ = ["unfold", "fold", "khatri_rao"]


def unfold(tensor, mode):
    """Mode-``mode`` unfolding of a tensor.

    Parameters
    ----------
    tensor : array of shape (I_0, ..., I_{N-1})
        NumPy array or torch tensor.
    mode : int
        The mode that becomes the rows, ``0 <= mode < N`` (negative values count
        from the end).

    Returns
    -------
    matrix : array of shape (I_mode, prod of the other I_k)
        Columns indexed by the remaining modes in order, row-major.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import unfold
    >>> K = np.arange(24.0).reshape(2, 3, 2, 2)
    >>> unfold(K, 0).shape
    (2, 12)
    >>> bool((unfold(K, 0) == K.reshape(2, -1)).all())
    True
    >>> unfold(K, 1).shape
    (3, 8)
    """
    check_array(tensor, "tensor")
    nd = tensor.ndim
    if nd < 1:
        raise ValueError("tensor has ndim=0; tensor must have at least one dimension")
    mode = check_int(mode, "mode", low=-nd, high=nd - 1) % nd
    xp = B.namespace(tensor)
    moved = xp.moveaxis(tensor, mode, 0)
    return xp.reshape(moved, (tensor.shape[mode], -1))


def fold(matrix, mode, shape):
    """Inverse of :func:`unfold`.

    Parameters
    ----------
    matrix : array of shape (shape[mode], prod of the other shape[k])
    mode : int
    shape : tuple of int
        Shape of the folded tensor.

    Returns
    -------
    tensor : array of shape ``shape``

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import fold, unfold
    >>> K = np.random.default_rng(0).standard_normal((2, 3, 2, 2))
    >>> bool(np.array_equal(fold(unfold(K, 1), 1, K.shape), K))
    True
    """
    check_array(matrix, "matrix", ndim=2)
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    if nd < 1:
        raise ValueError("shape=() is not allowed; shape must have at least one entry")
    if min(shape) < 0:
        raise ValueError(f"shape={shape} is not allowed; its entries must be non-negative sizes")
    mode = check_int(mode, "mode", low=-nd, high=nd - 1) % nd
    rest = shape[:mode] + shape[mode + 1:]
    expected = (shape[mode], math.prod(rest))
    if tuple(matrix.shape) != expected:
        raise ValueError(
            f"matrix has shape {tuple(matrix.shape)}; to fold mode {mode} into shape "
            f"{shape} it must be {expected}"
        )
    xp = B.namespace(matrix)
    t = xp.reshape(matrix, (shape[mode],) + rest)
    return xp.moveaxis(t, 0, mode)


def khatri_rao(matrices):
    """Column-wise Kronecker product, first matrix varying slowest.

    Parameters
    ----------
    matrices : sequence of arrays of shape (I_k, R)
        All with the same number of columns ``R``.

    Returns
    -------
    product : array of shape (prod I_k, R)
        ``product[(i_0, ..., i_{N-1}), r] = prod_k matrices[k][i_k, r]`` with the
        row index row-major, so that a CP kernel satisfies
        ``K.reshape(T, -1) == A @ khatri_rao([B, C, D]).T``.

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import khatri_rao
    >>> A, B = np.ones((2, 3)), np.arange(12.0).reshape(4, 3)
    >>> khatri_rao([A, B]).shape
    (8, 3)
    """
    matrices = list(matrices)
    if not matrices:
        raise ValueError("matrices=[] is not allowed; give at least one matrix")
    for i, m in enumerate(matrices):
        check_array(m, f"matrices[{i}]", ndim=2)
    check_same_library(matrices, "matrices")
    R = matrices[0].shape[1]
    for i, m in enumerate(matrices):
        if m.shape[1] != R:
            raise ValueError(
                f"matrices[{i}] has {m.shape[1]} columns but matrices[0] has {R}; "
                "all matrices must have the same number of columns"
            )
    xp = B.namespace(*matrices)
    out = matrices[0]
    for m in matrices[1:]:
        out = xp.reshape(out[:, None, :] * m[None, :, :], (-1, R))
    return out
