"""Cost of the positive semi-definiteness check on a large Sigma.

Every entry point taking a ``sigma`` refuses an indefinite one
(:func:`sigmadecomp._validation.check_psd`): a Cholesky factorisation of
``sigma + tol * m * I`` (``m`` a lower bound of the largest eigenvalue), with
the eigenvalues computed only when it fails. This script times, on a
``(n, n)`` second moment of rank ``n / 2`` (fewer samples than ``n``, the hard
case) and median of ``--repeats`` runs:

* ``validate``: ``check_sigma`` without the PSD check (conversion, symmetry);
* ``validate + psd``: ``check_sigma`` as the entry points call it;
* ``eigvalsh``: what a check through the eigenvalues would cost;
* ``relative_sigma_error``: the cheapest entry point, for a ``(T, n)`` weight,
  which the check slows down the most.

Run from the repository root::

    python -m benchmarks.psd_check [--n 4608] [--T 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from benchmarks.common import positive_int
from sigmadecomp import relative_sigma_error
from sigmadecomp._validation import check_sigma


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _even_size(text):
    n = positive_int(text)
    if n % 2 or n < 2:
        raise argparse.ArgumentTypeError(f"invalid value {n}: expected an even size >= 2")
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=_even_size, default=4608,
                    help="size of Sigma (even, >= 2; its rank is n / 2)")
    ap.add_argument("--T", type=positive_int, default=512)
    ap.add_argument("--repeats", type=positive_int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    n, T = args.n, args.T
    X = np.maximum(rng.standard_normal((n // 2, n)), 0.0)
    S = X.T @ X / X.shape[0]
    S = 0.5 * (S + S.T)
    W = rng.standard_normal((T, n))
    A = 0.9 * W
    rows = {
        "validate": _median_time(lambda: check_sigma(S, n, W, psd=False), args.repeats),
        "validate + psd": _median_time(lambda: check_sigma(S, n, W), args.repeats),
        "eigvalsh": _median_time(lambda: np.linalg.eigvalsh(S), max(1, args.repeats // 2)),
        "relative_sigma_error": _median_time(lambda: relative_sigma_error(W, A, S),
                                             args.repeats),
    }
    gemm = _median_time(lambda: W @ S, args.repeats)
    print(f"# PSD check cost, n={n} (rank {n // 2}), T={T}, median of {args.repeats}")
    print("| step | seconds | vs. validate | vs. W @ Sigma |")
    print("|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} | {v / rows['validate']:.1f}x | {v / gemm:.1f}x |")
    print(f"| W @ Sigma (T x n x n GEMM) | {gemm:.3f} | | 1.0x |")
    psd = rows["validate + psd"] - rows["validate"]
    print(f"\nPSD check alone: {psd:.3f} s = {psd / rows['eigvalsh']:.2f} of an eigvalsh")


if __name__ == "__main__":
    main()
