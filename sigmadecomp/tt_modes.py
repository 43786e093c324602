"""Factoring channel counts into TT modes, and the rank bookkeeping of a TT.

A TT-matrix pairs input modes ``m_k`` with output modes ``n_k``; a TT-conv
puts a spatial core (``H*W`` inputs, 1 output) first. The helpers here check
modes and ranks and clip ranks to what each bond can use.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._validation import LOG_SLACK, check_int

__all__ = [
    "tt_modes",
    "auto_modes",
    "check_modes",
    "resolve_modes",
    "bond_caps",
    "clip_ranks",
    "check_tt_ranks",
    "core_dims",
    "shape_modes",
]


def _prime_factors(n):
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def tt_modes(n, d):
    """Factor ``n`` into ``d`` balanced integer modes (ascending, ``1`` if needed).

    Prime factors are dealt largest first to the currently smallest mode.

    Parameters
    ----------
    n : int
        Size to factor, ``n >= 1``.
    d : int
        Number of modes, ``d >= 1``.

    Returns
    -------
    modes : tuple of int
        ``len(modes) == d`` and ``prod(modes) == n``.

    Examples
    --------
    >>> from sigmadecomp.tt_modes import tt_modes
    >>> tt_modes(128, 3)
    (4, 4, 8)
    >>> tt_modes(3, 2)
    (1, 3)
    """
    n = check_int(n, "n", low=1)
    d = check_int(d, "d", low=1)
    modes = [1] * d
    for p in sorted(_prime_factors(n), reverse=True):
        i = int(np.argmin(modes))
        modes[i] *= p
    return tuple(sorted(modes))


def auto_modes(in_size, out_size, d=None):
    """Paired input/output channel factorisations for a TT-matrix or TT-conv.

    Parameters
    ----------
    in_size, out_size : int
        ``S`` (input channels / features) and ``T`` (outputs).
    d : int, optional
        Number of channel modes; default ``ceil(log_8(max(S, T)))`` (at least
        1), so that modes are about 4 to 8 as in Garipov et al.

    Returns
    -------
    in_modes, out_modes : tuple of int
        Each of length ``d``, ascending, with products ``S`` and ``T``.

    Examples
    --------
    >>> from sigmadecomp.tt_modes import auto_modes
    >>> auto_modes(128, 64)
    ((4, 4, 8), (4, 4, 4))
    """
    in_size = check_int(in_size, "in_size", low=1)
    out_size = check_int(out_size, "out_size", low=1)
    if d is None:
        d = max(1, math.ceil(math.log(max(in_size, out_size)) / math.log(8) - LOG_SLACK))
    d = check_int(d, "d", low=1)
    return tt_modes(in_size, d), tt_modes(out_size, d)


def check_modes(modes, name, total, d=None):
    if isinstance(modes, numbers.Integral):
        modes = (modes,)
    try:
        modes = tuple(modes)
    except TypeError:
        raise TypeError(f"{name}={modes!r} is not allowed; {name} must be a sequence of positive integers")
    if not modes:
        raise ValueError(f"{name}=() is not allowed; {name} must have at least one mode")
    modes = tuple(check_int(m, f"{name}[{i}]", low=1) for i, m in enumerate(modes))
    if math.prod(modes) != total:
        raise ValueError(
            f"{name}={modes} has product {math.prod(modes)}; its product must be {total}"
        )
    if d is not None and len(modes) != d:
        raise ValueError(
            f"{name}={modes} has {len(modes)} modes; it must have {d} to pair with the other modes"
        )
    return modes


def resolve_modes(in_modes, out_modes, S, T):
    if in_modes is None and out_modes is None:
        return auto_modes(S, T)
    if in_modes is None:
        out_modes = check_modes(out_modes, "out_modes", T)
        return tt_modes(S, len(out_modes)), out_modes
    in_modes = check_modes(in_modes, "in_modes", S)
    if out_modes is None:
        return in_modes, tt_modes(T, len(in_modes))
    return in_modes, check_modes(out_modes, "out_modes", T, len(in_modes))


def bond_caps(dims):
    """Largest useful rank of each internal bond of a TT with mode sizes ``dims``."""
    D = len(dims)
    caps = [min(math.prod(dims[: k + 1]), math.prod(dims[k + 1:])) for k in range(D - 1)]
    return caps


def clip_ranks(ranks, dims):
    """Make ranks consistent: ``r_k <= r_{k-1} d_k`` and ``r_k <= d_{k+1} r_{k+1}``."""
    r = [1] + [int(x) for x in ranks] + [1]
    for k in range(1, len(r) - 1):
        r[k] = min(r[k], r[k - 1] * dims[k - 1])
    for k in range(len(r) - 2, 0, -1):
        r[k] = min(r[k], dims[k] * r[k + 1])
    return tuple(r[1:-1])


def check_tt_ranks(ranks, n_bonds, name="ranks"):
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        return (check_int(ranks, name, low=1),) * n_bonds
    try:
        if isinstance(ranks, (str, bytes)):
            raise TypeError
        ranks = tuple(ranks)
    except TypeError:
        raise TypeError(
            f"{name}={ranks!r} is not allowed; {name} must be a positive int or a sequence of "
            f"{n_bonds} positive ints"
        )
    if len(ranks) != n_bonds:
        raise ValueError(
            f"{name}={ranks} has {len(ranks)} entries; this TT has {n_bonds} internal bonds, "
            f"so {name} must be an int or have {n_bonds} entries"
        )
    return tuple(check_int(r, f"{name}[{i}]", low=1) for i, r in enumerate(ranks))


def _int_tuple(values, name, what):
    """``values`` as a tuple of positive ints (Python or NumPy; no bools, no floats)."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name}={values!r} is not allowed; {name} must be {what}")
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{name}={values!r} is not allowed; {name} must be {what}") from None
    return tuple(check_int(v, f"{name}[{i}]", low=1) for i, v in enumerate(values))


def core_dims(in_modes, out_modes, kernel_size):
    """Input and output mode sizes of all cores (spatial core first for a conv).

    ``in_modes`` and ``out_modes`` must be non-empty sequences of positive
    integers of the same length, ``kernel_size`` None or a pair of positive
    integers ``(H, W)``.
    """
    ms = list(_int_tuple(in_modes, "in_modes", "a sequence of positive integers"))
    ns = list(_int_tuple(out_modes, "out_modes", "a sequence of positive integers"))
    if not ms or len(ms) != len(ns):
        raise ValueError(
            f"in_modes={tuple(ms)} and out_modes={tuple(ns)} are not allowed; they must be "
            "non-empty and of the same length (paired modes)")
    if kernel_size is not None:
        ks = _int_tuple(kernel_size, "kernel_size", "None or a pair of positive integers (H, W)")
        if len(ks) != 2:
            raise ValueError(f"kernel_size={kernel_size!r} is not allowed; kernel_size must be "
                             "None or a pair of positive integers (H, W)")
        ms = [ks[0] * ks[1]] + ms
        ns = [1] + ns
    return ms, ns


def shape_modes(shape):
    """Automatic ``(in_modes, out_modes, kernel_size)`` of a weight shape.

    ``shape`` must be ``(T, S, H, W)`` or ``(T, n)`` of positive integers
    (Python or NumPy ints; floats and booleans are refused, not truncated).
    """
    if isinstance(shape, (str, bytes)):
        raise TypeError(f"shape={shape!r} is not allowed; shape must be (T, S, H, W) or (T, n)")
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(
            f"shape={shape!r} is not allowed; shape must be (T, S, H, W) or (T, n)") from None
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in dims):
        raise TypeError(f"shape={shape!r} is not allowed; shape must be (T, S, H, W) or (T, n) "
                        "of integers")
    shape = tuple(int(v) for v in dims)
    if len(shape) == 4 and min(shape) >= 1:
        T, S, H, W = shape
        return auto_modes(S, T) + ((H, W),)
    if len(shape) == 2 and min(shape) >= 1:
        T, N = shape
        return auto_modes(N, T) + (None,)
    raise ValueError(f"shape={shape} is not allowed; shape must be (T, S, H, W) or (T, n) "
                     "with positive entries")
