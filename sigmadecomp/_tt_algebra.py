"""TT-matrix algebra shared by TT-SVD, TT-ALS and the TT result (float64, no validation).

Cores are 4-D arrays ``(r_{k-1}, m_k, n_k, r_k)`` (input mode ``m_k``, output
mode ``n_k``), multi-indices row-major. The functions here are public names of
a private module: the TT solvers, :class:`sigmadecomp.results.TTResult` and the
torch TT layers use them.
"""

from __future__ import annotations

import numpy as np

from . import _backend as B
from .tt_modes import bond_caps, clip_ranks

__all__ = [
    "tt_matrix",
    "pair_tensor",
    "tt_svd_dense",
    "left_interface_step",
    "right_interface_step",
    "right_orthogonalize",
    "left_orthogonalize_one",
]


def tt_matrix(cores):
    """``(T, N)`` matrix of a list of 4-D TT-matrix cores (rows t, columns s, row-major)."""
    xp = B.namespace(cores[0])
    c0 = cores[0]
    cur = xp.reshape(c0, c0.shape[1:])  # (m, n, r)
    for c in cores[1:]:
        M, Tn, _ = cur.shape
        cur = B.einsum("xta,amnb->xmtnb", cur, c)
        cur = xp.reshape(cur, (M * c.shape[1], Tn * c.shape[2], c.shape[3]))
    return xp.permute_dims(cur[:, :, 0], (1, 0))


def pair_tensor(W, ms, ns):
    """``W`` (T, N) -> tensor with modes ``(m_0 n_0, m_1 n_1, ...)``."""
    xp = B.namespace(W)
    D = len(ms)
    X = xp.reshape(W, tuple(ns) + tuple(ms))
    perm = []
    for k in range(D):
        perm += [D + k, k]
    X = xp.permute_dims(X, tuple(perm))
    return xp.reshape(X, tuple(m * n for m, n in zip(ms, ns)))


def left_interface_step(L, C):
    """Append core ``C`` (a, m, n, b) to the left interface ``L`` (M, T, a)."""
    xp = B.namespace(L)
    M, Tl, _ = L.shape
    out = B.einsum("xta,amnb->xmtnb", L, C)
    return xp.reshape(out, (M * C.shape[1], Tl * C.shape[2], C.shape[3]))


def right_interface_step(C, R):
    """Prepend core ``C`` (a, m, n, b) to the right interface ``R`` (b, M, T)."""
    xp = B.namespace(R)
    _, M, Tu = R.shape
    out = B.einsum("amnb,byu->amynu", C, R)
    return xp.reshape(out, (C.shape[0], C.shape[1] * M, C.shape[2] * Tu))


def right_orthogonalize(cores):
    """Gauge so that cores ``1..D-1`` are right-orthogonal (the product is unchanged)."""
    xp = B.namespace(cores[0])
    cores = list(cores)
    for k in range(len(cores) - 1, 0, -1):
        a, m, n, b = cores[k].shape
        Q, Rm = B.qr(xp.permute_dims(xp.reshape(cores[k], (a, m * n * b)), (1, 0)))
        cores[k] = xp.reshape(xp.permute_dims(Q, (1, 0)), (Q.shape[1], m, n, b))
        cores[k - 1] = B.einsum("amnb,cb->amnc", cores[k - 1], Rm)
    return cores


def left_orthogonalize_one(cores, k):
    xp = B.namespace(cores[k])
    a, m, n, b = cores[k].shape
    Q, Rm = B.qr(xp.reshape(cores[k], (a * m * n, b)))
    cores[k] = xp.reshape(Q, (a, m, n, Q.shape[1]))
    cores[k + 1] = B.einsum("cb,bmnd->cmnd", Rm, cores[k + 1])


def tt_svd_dense(X, dims, ranks, eps):
    """TT-SVD of the float64 tensor ``X`` with mode sizes ``dims``.

    ``ranks``: tuple of bond caps (already clipped) or None; ``eps``: relative
    Frobenius tolerance or None. Returns 3-D cores and the discarded tails.
    """
    xp = B.namespace(X)
    D = len(dims)
    if D == 1:
        return [xp.reshape(X, (1, dims[0], 1))], []
    if ranks is None:
        ranks = clip_ranks(bond_caps(dims), dims)
    total = float(xp.sum(X * X))
    delta2 = (eps**2) * total / (D - 1) if eps is not None else None
    cores, tails = [], []
    C = xp.reshape(X, (dims[0], -1))
    r_prev = 1
    for k in range(D - 1):
        C = xp.reshape(C, (r_prev * dims[k], -1))
        U, s, Vh = B.svd(C)
        U, Vh = B.svd_flip(U, Vh)
        r = min(ranks[k], int(s.shape[0]))
        if delta2 is not None:
            s2 = B.to_numpy(s) ** 2
            # tail_from[j] = sum s2[j:]
            tail_from = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
            r_tol = int(np.argmax(tail_from <= delta2))
            r = max(1, min(r, r_tol))
        tails.append(float(xp.sum(s[r:] ** 2)))
        cores.append(xp.reshape(U[:, :r], (r_prev, dims[k], r)))
        C = s[:r, None] * Vh[:r, :]
        r_prev = r
    cores.append(xp.reshape(C, (r_prev, dims[-1], 1)))
    return cores, tails
