"""Sweeps and errors of ``tucker2`` at its default ``tol`` on realistic layers.

Usage::

    python -m benchmarks.tol_rule [--tol 1e-6]

Prints one JSON line per case (HOOI and Tucker2-ALS-Sigma on three layer
shapes): sweeps, final relative error, converged, seconds. One BLAS thread.
Run it with ``PYTHONPATH`` pointing at another checkout of the package to
compare two versions on the same inputs (``notes/contract.md``).
"""

import argparse
import json
import time

from threadpoolctl import threadpool_limits

from benchmarks.common import realistic_covariance, trained_like_kernel
from sigmadecomp import tucker2

CASES = ((64, (16, 16)), (64, (32, 32)), (128, (32, 32)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tol", type=float, default=None, help="tol of tucker2 (default: its own)")
    args = ap.parse_args(argv)
    kw = {} if args.tol is None else {"tol": args.tol}
    with threadpool_limits(1):
        for C, ranks in CASES:
            S, _ = realistic_covariance(channels=C)
            K = trained_like_kernel(T=C, S=C)
            for sig in (None, S):
                t0 = time.perf_counter()
                r = tucker2(K, ranks, sig, **kw)
                print(json.dumps(dict(C=C, ranks=ranks, sigma=sig is not None, n_iter=r.n_iter,
                                      error=r.error, converged=r.converged,
                                      seconds=round(time.perf_counter() - t0, 2))))


if __name__ == "__main__":
    main()
