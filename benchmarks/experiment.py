"""The end-to-end experiment, writing the committed figures into ``notes/``.

    python -m benchmarks.experiment            # default grid (what notes/results.md shows)
    python -m benchmarks.experiment --quick    # a small subset, written to notes/quick/
    python -m benchmarks.experiment --full     # the whole grid (slow)

The experiment itself is the installed ``sigmadecomp demo``
(:mod:`sigmadecomp_torch.demo`); this script only changes where its files go.
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks.common import NOTES_DIR
from sigmadecomp_torch.demo import add_demo_options, main as demo_main

PROG = "python -m benchmarks.experiment"


def main(argv=None):
    parser = add_demo_options(argparse.ArgumentParser(
        prog=PROG, description="sigmadecomp demo, writing to notes/ (notes/quick/ with --quick)"))
    args = parser.parse_args(argv)
    default = os.path.join(NOTES_DIR, "quick") if args.quick else NOTES_DIR
    return demo_main(args, prog=PROG, default_out_dir=default)


if __name__ == "__main__":
    sys.exit(main())
