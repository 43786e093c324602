"""Small builders shared by the test modules."""

import numpy as np


def random_psd(rng, n, rank=None):
    """A random ``(n, n)`` PSD matrix of the given rank (full by default; 0 gives zeros)."""
    rank = n if rank is None else rank
    X = rng.standard_normal((max(rank, 1), n)) * rng.uniform(0.1, 3.0, n)
    if rank == 0:
        X = 0 * X
    return X.T @ X / max(rank, 1)
