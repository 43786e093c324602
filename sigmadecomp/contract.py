"""The options every decomposition shares, checked and documented in one place.

:func:`sigmadecomp.sigma_svd`, :func:`sigmadecomp.tucker2`,
:func:`sigmadecomp.cp`, :func:`sigmadecomp.tt_conv` and
:func:`sigmadecomp.tt_linear` share one call shape::

    solver(weight, rank_or_ranks, sigma=None, *, init=..., n_iter_max=...,
           tol=..., rng=None, callback=None, rtol=None, ridge=5e-4, inner=None)

and return a :class:`sigmadecomp.results.DecompositionResult` (results compare
equal by value, so a pickled or copied result equals the original). The
meaning of each shared option is fixed here:

``tol``
    The run stops after the first sweep ``k >= 1`` at which the relative error
    minimised decreased by at most ``tol`` times its previous value,
    ``errors[k-1] - errors[k] <= tol * errors[k-1]`` (:func:`tol_reached`).
    ``converged`` is then True. ``tol=0`` switches the rule off: all
    ``n_iter_max`` sweeps run, unless the solver rejects a sweep that rounding
    made worse (the run then stops at the previous point, reported as
    converged). ``tol=None`` and ``n_iter_max=None`` are the solver's
    defaults (:func:`check_tol`, :func:`check_n_iter_max`).
    CP-ALS-Sigma with its adaptive inner cap first solves its inner systems
    more accurately before it accepts the stop (see :func:`sigmadecomp.cp`).
``callback``
    ``callback(result)`` with the partial result object (the solver's result
    type, ``errors`` so far) once per entry of ``errors``: at the starting
    point (``n_iter == 0``) and after every sweep. Returning ``True`` (or
    NumPy's ``True``, :func:`wants_stop`) stops the run; ``converged`` is then
    True only if the ``tol`` rule held on that sweep. Any other return value
    continues. A closed form (:func:`sigmadecomp.sigma_svd`, and ``tt_conv``
    / ``tt_linear`` from the TT-SVD without ``sigma`` and sweeps) calls it
    once, with a copy of its result (equal to the one returned), and ignores
    what it returns. Whatever a callback does to the result it gets leaves the
    run and the returned result unchanged; an exception it raises propagates.
``inner``
    Options of the inner linear solves, an :class:`InnerSolver` or a dict
    with the same keys. Each field left at ``None`` takes the solver's own
    default.
``init``
    ``'svd'`` (SVD-based start: truncated SVD, HOSVD, SVD of the unfoldings
    or TT-SVD), ``'frobenius'`` (the classical Frobenius solution, the
    default with ``sigma``), ``'random'`` (drawn from ``rng``), or a
    previous result of the same solver. ``'hosvd'`` is a deprecated alias of
    ``'svd'``.
``rng``
    ``None`` (the fixed seed 0: default runs are reproducible), an int seed
    or a ``numpy.random.Generator``.
``rtol``
    Eigenvalue floor, relative to the largest eigenvalue, under which the
    singular systems of the Sigma algebra count as singular (the policy of
    :func:`sigmadecomp.psd_root`). ``None`` (the default of every solver)
    follows one rule, :func:`sigmadecomp.sigma.solver_rtol`: the floor of the
    dtype of the user's ``sigma``, 1e-10 for float64 and 1e-6 for float32
    (whose own rounding puts eigenvalue noise near 1e-7 of the largest), and
    1e-10 without ``sigma``.
``ridge``
    Minimise in ``sigma + ridge * (trace(sigma) / n) * I``
    (:func:`sigmadecomp.sigma.ridge_sigma`).

Relative errors follow one convention (:func:`relative_error`): a zero
reference norm gives 0 for a zero error and ``inf`` otherwise. ``errors``
are measured in the matrix minimised: the ridged ``sigma`` and, where that
has negative eigenvalues (an accepted ``sigma`` may have them down to
``-neg_rtol * lambda_max``, e.g. rounding of a float32 second moment), its
nearest positive semi-definite matrix. ``sigma_error`` is always the
relative Sigma-error in the user's ``sigma`` as
:func:`sigmadecomp.relative_sigma_error` recomputes it. Weights and
``sigma`` whose squared norms would leave float64's range
(``max|weight|^2 * max|sigma|`` outside 1e-150..1e150) are refused with a
request to rescale.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import sys
import warnings
from dataclasses import dataclass, fields, replace

import numpy as np

from ._validation import check_choice, check_flag, check_int, check_positive_float

__all__ = [
    "InnerSolver",
    "INIT_NAMES",
    "check_callback",
    "check_inner",
    "check_init_name",
    "check_tol",
    "check_n_iter_max",
    "relative_error",
    "tol_reached",
    "deprecated_options",
]

#: Names of the starting points every iterative solver understands.
INIT_NAMES = ("svd", "frobenius", "random")
#: Old init names kept one release as deprecated aliases.
INIT_ALIASES = {"hosvd": "svd"}

_METHODS = ("auto", "cg", "direct")


@dataclass(frozen=True)
class InnerSolver:
    """Options of the inner linear solves of the ALS solvers.

    Every field left at ``None`` takes the default of the solver it is passed
    to (each solver's docstring gives its defaults). A dict with the same keys
    is accepted wherever an ``InnerSolver`` is.

    Parameters
    ----------
    method : {'auto', 'cg', 'direct'}, optional
        How a block that has no closed form is solved: preconditioned
        conjugate gradients warm-started at the current block, a dense solve
        of its normal equations, or ``'auto'`` (dense when the system has at
        most ``dense_max`` unknowns). CP always uses CG (``'direct'`` is
        refused there).
    rtol : float, optional
        CG stops when the residual of the normal equations has shrunk by this
        factor.
    maxiter : int or str, optional
        Cap on the CG iterations of one block update (CP: ``None`` solves
        every B-update to ``rtol``, ``'adaptive'`` is a cap that starts small
        and doubles when the outer progress stalls).
    dense_max : int, optional
        Largest system ``'auto'`` solves densely.
    precond : bool, optional
        Whether CG is preconditioned (default True; CP is always
        preconditioned and refuses False).

    Examples
    --------
    >>> import numpy as np
    >>> from sigmadecomp import InnerSolver, tucker2
    >>> rng = np.random.default_rng(0)
    >>> K = rng.standard_normal((6, 5, 2, 2))
    >>> X = rng.standard_normal((100, 20))
    >>> S = X.T @ X / 100
    >>> a = tucker2(K, (3, 2), S, n_iter_max=5, inner=InnerSolver(method="cg", maxiter=20))
    >>> b = tucker2(K, (3, 2), S, n_iter_max=5, inner={"method": "cg", "maxiter": 20})
    >>> bool(np.allclose(a.to_tensor(), b.to_tensor()))
    True
    """

    method: object = None
    rtol: object = None
    maxiter: object = None
    dense_max: object = None
    precond: object = None


_FIELDS = tuple(f.name for f in fields(InnerSolver))


def check_inner(inner, name="inner", *, defaults, methods=_METHODS, solver="", maxiter_words=()):
    """Validate ``inner`` and fill its ``None`` fields from ``defaults`` (a dict).

    Returns a complete :class:`InnerSolver`. ``methods`` are the values of
    ``method`` the solver supports; ``maxiter_words`` the strings it accepts
    for ``maxiter`` besides an integer (cp: ``'adaptive'``); ``precond=False`` is refused when
    ``defaults['precond']`` is None (a solver that is always preconditioned).
    """
    if inner is None:
        inner = InnerSolver()
    elif isinstance(inner, dict):
        unknown = sorted(set(inner) - set(_FIELDS))
        if unknown:
            raise ValueError(
                f"{name} has unknown key(s) {unknown}; the keys allowed are "
                f"{', '.join(repr(f) for f in _FIELDS)}"
            )
        inner = InnerSolver(**inner)
    elif not isinstance(inner, InnerSolver):
        raise TypeError(
            f"{name} of type {type(inner).__name__} is not allowed; {name} must be None, "
            "an InnerSolver or a dict with its keys"
        )
    vals = {f: getattr(inner, f) for f in _FIELDS}
    for f in _FIELDS:
        if vals[f] is None:
            vals[f] = defaults.get(f)
    if vals["method"] is None:
        vals["method"] = "auto"
    check_choice(vals["method"], f"{name}.method", methods)
    if vals["rtol"] is not None:
        vals["rtol"] = check_positive_float(vals["rtol"], f"{name}.rtol", allow_zero=True)
    if isinstance(vals["maxiter"], str):
        if vals["maxiter"] not in maxiter_words:
            allowed = "".join(f", {w!r}" for w in maxiter_words)
            raise ValueError(
                f"{name}.maxiter={vals['maxiter']!r} is not allowed; {name}.maxiter must be "
                f"None, an integer >= 1{allowed}"
            )
    elif vals["maxiter"] is not None:
        vals["maxiter"] = check_int(vals["maxiter"], f"{name}.maxiter", low=1)
    if vals["dense_max"] is not None:
        vals["dense_max"] = check_int(vals["dense_max"], f"{name}.dense_max", low=0)
    if inner.precond is not None:  # numpy booleans count as the Python ones (linesearch, ...)
        inner = replace(inner, precond=check_flag(inner.precond, f"{name}.precond"))
        vals["precond"] = inner.precond
    if inner.precond is False and defaults.get("precond") is None:
        raise ValueError(
            f"{name}.precond=False is not allowed for {solver or 'this solver'}; its CG is "
            "always preconditioned (leave precond at None or True)"
        )
    if vals["precond"] is None:
        vals["precond"] = True
    return replace(inner, **vals)


def check_tol(tol, default=None):
    """A finite ``tol >= 0`` (see the module docstring for its meaning); ``None`` is the
    solver's ``default``."""
    if tol is None:
        return default
    return check_positive_float(tol, "tol", allow_zero=True)


def check_n_iter_max(n_iter_max, default=None):
    """An integer ``n_iter_max >= 0``; ``None`` is the solver's ``default``."""
    if n_iter_max is None:
        return default
    return check_int(n_iter_max, "n_iter_max", low=0)


def tol_reached(prev, cur, tol):
    """The one stopping rule: ``tol > 0`` and ``prev - cur <= tol * prev``.

    ``prev`` and ``cur`` are the relative errors before and after a sweep.

    Examples
    --------
    >>> from sigmadecomp.contract import tol_reached
    >>> tol_reached(0.5, 0.4999, 1e-3), tol_reached(0.5, 0.4, 1e-3), tol_reached(0.5, 0.5, 0.0)
    (True, False, False)
    """
    return tol > 0 and prev - cur <= tol * prev


def relative_error(sq_err, sq_ref):
    """``sqrt(sq_err / sq_ref)`` with negative rounding clamped to 0.

    A zero reference (``sq_ref <= 0``) gives 0 when the error is 0 and ``inf``
    otherwise.

    Examples
    --------
    >>> from sigmadecomp.contract import relative_error
    >>> relative_error(1.0, 4.0), relative_error(-1e-20, 4.0), relative_error(0.0, 0.0)
    (0.5, 0.0, 0.0)
    """
    sq_err = max(float(sq_err), 0.0)
    if sq_ref <= 0.0:
        return 0.0 if sq_err == 0.0 else float("inf")
    return math.sqrt(sq_err / float(sq_ref))


#: The project's packages: frames in them are not the user's.
_PACKAGES = ("sigmadecomp", "sigmadecomp_torch")


def user_stacklevel():
    """The ``stacklevel`` for ``warnings.warn`` that names the first line outside the
    project's packages: the user's call, however deep inside (and through which wrappers)
    the function calling ``warnings.warn`` runs. Python shows a ``DeprecationWarning``
    by default only when it is attributed to the user's code."""
    frame, level = sys._getframe(1), 1  # the function that warns is level 1
    while (frame.f_back is not None
           and frame.f_globals.get("__name__", "").split(".")[0] in _PACKAGES):
        frame, level = frame.f_back, level + 1
    return level


def wants_stop(value):
    """Whether a callback's return ``value`` asks the solver to stop: ``True`` (also
    NumPy's ``True``, e.g. ``np.float64(err) < 1e-3``); anything else, ``None`` included,
    lets it go on."""
    return value is True or (isinstance(value, np.bool_) and bool(value))


def check_init_name(init, solver, allowed=INIT_NAMES):
    """Validate a string ``init``; deprecated aliases warn and are translated."""
    if init in INIT_ALIASES:
        new = INIT_ALIASES[init]
        warnings.warn(
            f"{solver}(init={init!r}) is deprecated and will be removed in the next release; "
            f"use init={new!r}", DeprecationWarning, stacklevel=user_stacklevel())
        init = new
    return check_choice(init, "init", allowed)


def _n_required_positional(fn):
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            n += 1
        elif p.kind == p.VAR_POSITIONAL:
            return None
    return n


def check_callback(callback, solver, old_form=None):
    """``callback`` as a one-argument callable ``callback(result)``.

    A callable that needs two positional arguments is the old form of
    ``solver`` (``old_form(callback)`` adapts it); it keeps working with a
    ``DeprecationWarning``.
    """
    if callback is None:
        return None
    if not callable(callback):
        raise TypeError(f"callback={callback!r} is not allowed; callback must be callable or None")
    n_req = _n_required_positional(callback)
    if old_form is None and n_req is not None and n_req >= 2:
        raise TypeError(f"callback={callback!r} takes {n_req} required arguments; {solver} "
                        "calls callback(result) with one (the error is result.errors[-1])")
    if old_form is not None and n_req == 2:
        warnings.warn(
            f"{solver}: a callback taking two arguments is deprecated and will not be "
            "supported in the next release; use callback(result) (the error is "
            "result.errors[-1])", DeprecationWarning, stacklevel=user_stacklevel())
        return old_form(callback)
    try:
        sig = inspect.signature(callback)
    except (TypeError, ValueError):  # not introspectable (some builtins): trust it
        return callback
    try:
        sig.bind(None)
    except TypeError:
        raise TypeError(f"callback={callback!r} is not allowed; it cannot be called with one "
                        f"argument, and {solver} calls callback(result)") from None
    return callback


def deprecated_options(solver, renames, stacklevel=2):
    """Decorator: old keyword names of ``solver`` mapped to fields of ``inner``.

    ``renames`` maps an old keyword to ``(field, convert)``; the value given
    under the old name is ``convert(value)`` in ``inner``. Each old keyword
    warns once per call with the new spelling.
    """

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            old = [k for k in renames if k in kw]
            if old:
                inner = kw.get("inner")
                if isinstance(inner, InnerSolver):
                    merged = {f: getattr(inner, f) for f in _FIELDS if getattr(inner, f) is not None}
                elif isinstance(inner, dict):
                    merged = dict(inner)
                elif inner is None:
                    merged = {}
                else:
                    merged = None  # let the solver reject it
                for k in old:
                    field_, convert = renames[k]
                    value = kw.pop(k)
                    warnings.warn(
                        f"{solver}({k}=...) is deprecated and will be removed in the next "
                        f"release; use inner=InnerSolver({field_}=...)",
                        DeprecationWarning, stacklevel=stacklevel)
                    if merged is not None:
                        if field_ in merged and merged[field_] is not None:
                            raise TypeError(
                                f"{solver} got both {k}= and inner.{field_}; give only inner")
                        merged[field_] = convert(value)
                if merged is not None:
                    kw["inner"] = merged
            return fn(*args, **kw)

        wrapper.deprecated_names = tuple(renames)  # still accepted (the adapter checks names)
        return wrapper

    return deco


def same(value):
    return value


def is_int_sequence(x):
    """Whether ``x`` is an int or a non-array sequence of ints (mode sizes, ranks)."""
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return True
    if isinstance(x, (tuple, list)):
        return all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in x)
    return False
