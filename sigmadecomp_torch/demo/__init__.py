"""``sigmadecomp demo``: the end-to-end experiment on Fashion-MNIST, installed with the package.

* :mod:`~sigmadecomp_torch.demo.reference` -- the reference CNN (its trained
  weights ship with the package), evaluation and augmentation.
* :mod:`~sigmadecomp_torch.demo.experiment` -- the grid of compressions and
  measurements, and the findings drawn from them.
* :mod:`~sigmadecomp_torch.demo.report` -- tables, plots and files.

This module itself imports neither torch nor the experiment, so that the
command line parses (and ``--help`` prints) at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

__all__ = ["add_demo_options", "fresh_out_dir", "check_out_dir", "main", "positive_int",
           "int_at_least", "EXIT_NO_DATA", "INSTALL_COMMAND"]

EXIT_NO_DATA = 3
"""Exit status of the demo when Fashion-MNIST is not installed."""

INSTALL_COMMAND = "sudo apt-get install dataset-fashion-mnist"
"""The one command that installs the demo's data (Debian package)."""

TIMES = "about 90 s with --quick, about 22 minutes by default, hours with --full, on 2 cores"


def int_at_least(low):
    """argparse type of an option that must be an integer >= ``low`` (a one-line error
    otherwise)."""
    import argparse

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not allowed; give an integer >= {low}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


#: argparse type of a count: an integer >= 1.
positive_int = int_at_least(1)


def add_demo_options(parser):
    """Add the demo's options to ``parser`` (the command's and the benchmark script's)."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true",
                   help="the whole grid (more ratios, more calibration images; slow)")
    g.add_argument("--quick", action="store_true",
                   help="a small subset to check the set-up: rX = 3 only, Tucker-2 and CP "
                        "(no Tensor-Train rows), 256 calibration and 1000 test images")
    parser.add_argument("--out-dir", default=None,
                        help="directory for results.md, results.json and the PNG plots, created "
                             "if missing, files in it overwritten (default: a new folder "
                             "sigmadecomp-demo-YYYYmmdd-HHMMSS in the current directory)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def fresh_out_dir(parent=".", *, stamp=None):
    """A directory name under ``parent`` that does not exist yet (not created).

    ``sigmadecomp-demo-YYYYmmdd-HHMMSS``, with ``-2``, ``-3``, ... appended if
    that name is taken.

    Examples
    --------
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     first = fresh_out_dir(d, stamp="20250101-000000")
    ...     os.mkdir(first)
    ...     second = fresh_out_dir(d, stamp="20250101-000000")
    >>> os.path.basename(first), os.path.basename(second)
    ('sigmadecomp-demo-20250101-000000', 'sigmadecomp-demo-20250101-000000-2')
    """
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(parent, f"sigmadecomp-demo-{stamp}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def check_out_dir(path, flag="--out-dir"):
    """Refuse an output directory that cannot be created or written, before any work.

    Leaves nothing behind (:func:`~sigmadecomp_torch.demo.report.write_outputs`
    makes the directory once there are results; the check creates and removes a
    scratch directory in the nearest existing one); raises ``ValueError`` with a
    one-line message naming ``flag`` when ``path`` or one of its existing parents
    is not a directory, or when the nearest existing one is not writable.

    Examples
    --------
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     open(os.path.join(d, "afile"), "w").close()
    ...     check_out_dir(os.path.join(d, "new", "sub"))
    ...     check_out_dir(os.path.join(d, "afile", "sub"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: --out-dir=...: ...afile' exists and is not a directory; give a directory ...
    """
    probe = os.path.abspath(path)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag}={path!r}: {probe!r} exists and is not a directory; give a "
                         "directory that exists or can be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}={path!r}: {probe!r} is not writable; choose another location")
    try:  # the permission bits can say yes where the file system says no (root on /proc or
        # on a read-only or root-squashed mount): make and remove a scratch directory there
        os.rmdir(tempfile.mkdtemp(prefix=".sigmadecomp-probe-", dir=probe))
    except OSError as exc:
        raise ValueError(f"{flag}={path!r}: no directory can be created in {probe!r} "
                         f"({exc.strerror or exc}); choose another location") from None


def _data_missing_message():
    return ("sigmadecomp demo needs the Fashion-MNIST dataset, which is not installed. "
            f"Install it with:\n    {INSTALL_COMMAND}\n"
            "(or set SIGMADECOMP_FASHION_MNIST to a directory holding its four IDX files)")


def main(argv=None, *, prog="sigmadecomp demo", default_out_dir=None, parser=None):
    """Run the demo; returns the exit status (0, or :data:`EXIT_NO_DATA` without the data).

    An output directory that cannot be written (:func:`check_out_dir`) ends the
    run before the experiment with ``SystemExit`` and a one-line message (exit
    status 1, as the command's other mistakes of the user).

    ``default_out_dir`` replaces the fresh folder of :func:`fresh_out_dir`
    when ``--out-dir`` is not given (the benchmark script passes ``notes/``).
    """
    if parser is None:
        parser = add_demo_options(argparse.ArgumentParser(prog=prog))
    args = parser.parse_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    from sigmadecomp.datasets import DatasetNotFoundError, find_fashion_mnist

    try:
        find_fashion_mnist()
    except DatasetNotFoundError:
        print(_data_missing_message(), file=sys.stderr)
        return EXIT_NO_DATA
    mode = "full" if args.full else "quick" if args.quick else "default"
    out_dir = args.out_dir or default_out_dir or fresh_out_dir()
    try:  # before the experiment, not after its minutes
        check_out_dir(out_dir)
    except ValueError as exc:
        raise SystemExit(f"{prog}: error: {exc}") from None
    print(f"sigmadecomp demo ({mode}): results go to {os.path.abspath(out_dir)}", flush=True)

    from sigmadecomp_torch.demo.experiment import make_config, run
    from sigmadecomp_torch.demo.report import print_summary, write_outputs

    cfg = make_config(mode, threads=args.threads)
    results = run(cfg, progress=not args.no_progress)
    results["command"] = " ".join([prog] + ([f"--{mode}"] if mode != "default" else []))
    print_summary(results)  # first: the tables are not lost if the files cannot be written
    try:
        written = write_outputs(results, out_dir)
    except OSError as exc:
        raise SystemExit(f"{prog}: error: --out-dir={out_dir!r}: the results could not be "
                         f"written ({exc}); the tables printed above are this run's "
                         "results") from None
    print(f"\nwrote {', '.join(written)} ({results['seconds']:.0f} s)")
    return 0
