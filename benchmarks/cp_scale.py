"""CP-ALS-Sigma on one ResNet-18 ``layer4`` conv (512x512x3x3, rX=3): memory and time.

The statistic is the real second moment of the inputs of ``layer4.1.conv1`` of
``sigmadecomp_torch.resnet.resnet18()`` (random weights, as ``benchmarks.scale``)
over 64 random 224x224 images (4608 x 4608, rank 3136 before the ridge); the
kernel is that layer's weight. Each configuration runs in a fresh process, so
its peak resident memory (``VmHWM``) is its own: ``cp(K, 763, sigma)`` with the
default ridge, ``tol=0`` and a fixed number of sweeps, timed through the
callback (set-up = until the callback of the starting point: Frobenius start,
PSD check, caches; then each sweep).

Run from the repository root::

    python -m benchmarks.cp_scale --sweeps 12 --json notes/cp_scale.json \\
        --notes notes/cp_scale.md            # exact and adaptive, notes + PNG
    python -m benchmarks.cp_scale --one exact --sweeps 2   # one configuration, prints JSON
    python -m benchmarks.cp_scale --notes notes/cp_scale.md \
        --progress exact=exact.err,adaptive=adaptive.err   # PNG from --one progress lines

``--one`` prints one JSON line per sweep on stderr (wall and process CPU
seconds since the call, error, peak RSS, load), so a run stopped early still
leaves its curve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import check_output_file, peak_rss_mib, positive_int

LAYER = "layer4.1.conv1"
RANK = 763  # compress(..., ratio=3) for a 512x512x3x3 conv
CONFIGS = {"exact": None, "adaptive": {"maxiter": "adaptive"}}


def statistic(path):
    """``(K, sigma)`` float64 NumPy arrays of ``LAYER``, cached in ``path`` (.npz)."""
    if path and os.path.exists(path):
        with np.load(path) as f:
            return f["K"], f["sigma"]
    from benchmarks.scale import _batches, _model
    from sigmadecomp_torch import collect_covariances

    model = _model()
    stats = collect_covariances(model, _batches(64, 224, 16), layers=[LAYER], progress=False)
    K = dict(model.named_modules())[LAYER].weight.detach().double().numpy()
    sigma = stats[LAYER].sigma.double().numpy()
    if path:
        np.savez(path, K=K, sigma=sigma)
    return K, sigma


def run_one(config, sweeps, stat_path, library):
    import sigmadecomp
    from sigmadecomp import cp

    K, sigma = statistic(stat_path)
    if library == "torch":
        import torch

        K, sigma = torch.from_numpy(K), torch.from_numpy(sigma)
    base = peak_rss_mib()
    stamps, errors = [], []

    def cb(res):  # progress on stderr, one JSON line per sweep
        stamps.append(time.perf_counter())
        errors.append(float(res.errors[-1]))
        print(json.dumps({"sweep": len(errors) - 1, "elapsed_s": stamps[-1] - t0,
                          "cpu_s": time.process_time() - c0,
                          "error": errors[-1], "peak_rss_mib": peak_rss_mib(),
                          "load": os.getloadavg()[0]}), file=sys.stderr, flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    res = cp(K, RANK, sigma, n_iter_max=sweeps, tol=0.0, inner=CONFIGS[config], callback=cb)
    seconds = time.perf_counter() - t0
    times = [s - t0 for s in stamps]
    return {"config": config, "library": library, "sweeps": res.n_iter,
            "setup_s": times[0], "sweep_s": list(np.diff(times)), "elapsed_s": times,
            "errors": errors, "sigma_error": float(res.sigma_error), "seconds": seconds,
            "peak_rss_mib": peak_rss_mib(), "rss_before_cp_mib": base,
            "load": list(os.getloadavg()), "version": getattr(sigmadecomp, "__file__", "")}


def from_progress(config, path, library):
    """A run's record rebuilt from the progress lines of ``--one`` (stderr)."""
    rows = []
    with open(path) as fh:
        for line in fh:
            if line.startswith("{"):
                rows.append(json.loads(line))
    elapsed = [r["elapsed_s"] for r in rows]
    return {"config": config, "library": library, "sweeps": len(rows) - 1,
            "setup_s": elapsed[0], "sweep_s": list(np.diff(elapsed)), "elapsed_s": elapsed,
            "errors": [r["error"] for r in rows], "peak_rss_mib": rows[-1]["peak_rss_mib"],
            "load": [r["load"] for r in rows]}


def write_notes(runs, path_md, sweeps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = os.path.splitext(path_md)[0] + ".png"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
        lab = f"{r['config']} ({r['library']})"
        axes[0].plot(range(len(r["errors"])), r["errors"], marker="o", label=lab)
        axes[1].plot(r["elapsed_s"], r["errors"], marker="o", label=lab)
    axes[0].set_xlabel("sweep")
    axes[1].set_xlabel("seconds since the call (set-up included)")
    for ax in axes:
        ax.set_ylabel("relative Sigma-error (ridged Sigma)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"CP-ALS-Sigma, ResNet-18 {LAYER} (512x512x3x3), R={RANK}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return png


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", type=positive_int, default=12)
    ap.add_argument("--configs", default="exact,adaptive",
                    help="comma-separated, of " + ", ".join(CONFIGS))
    ap.add_argument("--library", default="numpy", choices=("numpy", "torch"))
    ap.add_argument("--stat", default=os.path.join(tempfile.gettempdir(), "cp_scale_layer4.npz"),
                    help="cache of the layer's statistics (default: in the temporary folder)")
    ap.add_argument("--one", default=None, help="run one configuration in this process")
    ap.add_argument("--json", default=None)
    ap.add_argument("--notes", default=None, help="markdown path; the PNG goes beside it")
    ap.add_argument("--progress", default=None,
                    help="config=FILE,...: plot from the stderr progress lines of --one runs "
                         "(runs stopped early) instead of running")
    args = ap.parse_args(argv)
    for config in [args.one] if args.one else args.configs.split(","):
        if config not in CONFIGS:
            ap.error(f"{'--one' if args.one else '--configs'} {config!r}: expected one of "
                     f"{', '.join(CONFIGS)}")
    check_output_file(ap, "--json", args.json)
    check_output_file(ap, "--notes", args.notes)
    if args.progress:
        runs = [from_progress(*item.split("=", 1), args.library)
                for item in args.progress.split(",")]
        print(write_notes(runs, args.notes, args.sweeps))
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.sweeps, args.stat, args.library)))
        return
    statistic(args.stat)
    runs = []
    for config in args.configs.split(","):
        cmd = [sys.executable, "-m", "benchmarks.cp_scale", "--one", config, "--sweeps",
               str(args.sweeps), "--stat", args.stat, "--library", args.library]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"{config}: set-up {r['setup_s']:.1f} s, sweeps {np.round(r['sweep_s'], 1)} s, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB, errors {np.round(r['errors'], 5)}, "
              f"load {r['load']}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(runs, fh, indent=1)
    if args.notes:
        print(write_notes(runs, args.notes, args.sweeps))


if __name__ == "__main__":
    main()
