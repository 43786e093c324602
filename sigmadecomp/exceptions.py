"""Warning classes of the package.

Both derive from ``UserWarning``, so they show by default and can be
filtered (or turned into errors) on their own::

    import warnings
    from sigmadecomp import ConvergenceWarning
    warnings.simplefilter("error", ConvergenceWarning)
"""

__all__ = ["ConvergenceWarning", "CompressionWarning"]


class ConvergenceWarning(UserWarning):
    """An iterative decomposition stopped at ``n_iter_max`` before meeting ``tol``.

    The result is still the best iterate found (the objectives are monotone);
    raise ``n_iter_max`` or loosen ``tol`` to silence it.
    """


class CompressionWarning(UserWarning):
    """A compression choice that is likely not what was wanted.

    Examples: explicit ranks that make a layer larger than the original, a run
    estimated to take minutes, or a layer whose relative Sigma-error is high
    enough to cost accuracy.
    """
