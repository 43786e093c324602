"""The ``sigmadecomp`` command.

    sigmadecomp demo [--full | --quick]
    sigmadecomp compress MODEL --data DIR --method tucker2 --ratio 3 --out OUT

``demo`` runs the end-to-end experiment of the source tree
(``benchmarks/experiment.py``: Fashion-MNIST, Frobenius against Sigma
decompositions without fine-tuning) and writes its tables and plots.
``compress`` compresses a saved model with calibration images from an image
folder or IDX files and writes the compressed model and its report.
Run ``sigmadecomp <command> --help`` for every option.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

__all__ = ["main", "build_parser"]

APT_COMMAND = ["apt-get", "install", "-y", "dataset-fashion-mnist"]


# --------------------------------------------------------------------- demo


def _import_experiment():
    """``benchmarks.experiment`` from the source tree (it is not an installed package)."""
    try:
        import benchmarks.experiment as exp  # noqa: F401

        return exp
    except ImportError:
        root = Path(__file__).resolve().parent.parent
        if (root / "benchmarks" / "experiment.py").exists():
            sys.path.insert(0, str(root))
            import benchmarks.experiment as exp

            return exp
        raise SystemExit(
            "sigmadecomp demo needs the source tree (benchmarks/experiment.py and the "
            "committed weights in benchmarks/weights): run it from a checkout of the "
            "repository installed with  pip install -e \".[torch,bench]\""
        ) from None


def _ensure_fashion_mnist(log=print):
    """Find the dataset; install the Debian package when possible, else say how. Returns bool."""
    from sigmadecomp.datasets import DatasetNotFoundError, find_fashion_mnist

    try:
        find_fashion_mnist()
        return True
    except DatasetNotFoundError:
        pass
    cmd = APT_COMMAND if os.geteuid() == 0 else ["sudo"] + APT_COMMAND
    if shutil.which("apt-get") and (os.geteuid() == 0 or shutil.which("sudo")):
        log(f"Fashion-MNIST is not installed; running: {' '.join(cmd)}")
        try:
            subprocess.run(cmd, check=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
            find_fashion_mnist()
            return True
        except (subprocess.CalledProcessError, OSError, DatasetNotFoundError) as exc:
            log(f"could not install it automatically ({exc})")
    log("Fashion-MNIST is needed; install it with:\n    sudo apt-get install dataset-fashion-mnist\n"
        "or set SIGMADECOMP_FASHION_MNIST to a directory holding the four IDX files.")
    return False


def add_demo_options(parser):
    """The options of the end-to-end experiment (``demo`` here, and the script's own)."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true",
                   help="the whole grid (more ratios, more calibration images; slow)")
    g.add_argument("--quick", action="store_true",
                   help="a small subset (one rX, 1000 test images) to check the set-up")
    parser.add_argument("--out-dir", default=None,
                        help="directory for results.md, results.json and the PNGs (default: "
                             "notes/ of the source tree; notes/quick/ with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _cmd_demo(args):
    if not _ensure_fashion_mnist():
        return 2
    exp = _import_experiment()
    argv = []
    if args.full:
        argv.append("--full")
    if args.quick:
        argv.append("--quick")
    if args.out_dir:
        argv += ["--out-dir", args.out_dir]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.no_progress:
        argv.append("--no-progress")
    return exp.main(argv)


# ----------------------------------------------------------------- compress


def _load_model(path):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(path, map_location="cpu")
    except Exception:  # not a TorchScript archive
        scripted = None
    if scripted is not None:
        raise SystemExit(
            f"{path} is a TorchScript model. TorchScript graphs are compiled against their "
            "modules' types, so their layers cannot be replaced by factorized ones; save the "
            "Python module instead (torch.save(model, path)) and pass that file. The compressed "
            "model can be written as TorchScript with --torchscript."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SystemExit(f"could not load MODEL={path!r}: {exc}") from None
    if not isinstance(obj, torch.nn.Module):
        hint = (" (a state_dict holds only weights: save the module itself with "
                "torch.save(model, path))") if isinstance(obj, dict) else ""
        raise SystemExit(f"MODEL={path!r} holds a {type(obj).__name__}, not a torch.nn.Module{hint}")
    return obj.eval()


def _default_layers(model, include_first):
    """k x k convs (k > 1, ungrouped), without the first unless asked."""
    from torch import nn

    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and m.groups == 1]
    return names if include_first else names[1:]


def _first_in_channels(model):
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def _parse_floats(text, name):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"{name}={text!r} is not allowed; give comma-separated numbers") from None


def _cmd_compress(args):
    import torch

    from sigmadecomp_torch.compress import compress
    from sigmadecomp_torch.covariance import collect_covariances, load_covariances, save_covariances
    from sigmadecomp_torch.data import load_images, make_loader

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load_model(args.model)
    if args.layers in (None, "auto"):
        layers = _default_layers(model, args.include_first)
    elif args.layers == "all":
        layers = None
    else:
        layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    if layers == []:
        raise SystemExit("no layer to compress: the model has no k x k convolution besides the "
                         "first; name layers with --layers or use --layers all")
    weighted = not args.frobenius
    if weighted and args.data is None and args.transfer_stats is None:
        raise SystemExit("give calibration images with --data DIR, statistics with "
                         "--transfer-stats FILE, or --frobenius for data-free weight-space "
                         "decompositions")
    if args.centered and not weighted:
        raise SystemExit("--centered needs statistics; it cannot be combined with --frobenius")

    stats = None
    if weighted and args.transfer_stats is not None:
        stats = load_covariances(args.transfer_stats)
        print(f"statistics of {len(stats)} layers from {args.transfer_stats}")
    elif weighted:
        channels = args.channels or _first_in_channels(model)
        x, _ = load_images(args.data, limit=args.calib_images, size=args.image_size,
                           channels=channels if channels in (1, 3) else None, seed=args.seed)
        if args.normalize:
            vals = _parse_floats(args.normalize, "--normalize")
            if len(vals) % 2:
                raise SystemExit(f"--normalize={args.normalize!r}: give MEAN,STD or "
                                 "M1,M2,M3,S1,S2,S3 (an even count of numbers)")
            half = len(vals) // 2
            mean = torch.tensor(vals[:half]).view(1, -1, 1, 1)
            std = torch.tensor(vals[half:]).view(1, -1, 1, 1)
            x = (x - mean) / std
        print(f"calibration: {len(x)} images of shape {tuple(x.shape[1:])} from {args.data}")
        stats = collect_covariances(model, make_loader(x, batch_size=args.batch_size),
                                    layers=layers, progress=not args.no_progress)
        if args.save_stats:
            save_covariances(stats, args.save_stats)
            print(f"wrote statistics to {args.save_stats}")

    kw = dict(covariances=stats, layers=layers, centered=args.centered,
              progress=not args.no_progress)
    if args.ratio is not None:
        kw["ratio"] = args.ratio
    elif args.budget is not None:
        kw["budget"] = int(args.budget) if args.budget >= 1 else args.budget
    else:
        kw["ranks"] = "evbmf"
    if args.n_iter is not None:
        kw["options"] = {"n_iter_max": args.n_iter}
    try:
        small, report = compress(model, args.method, **kw)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"error: {exc}") from None

    out = Path(args.out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True)
    torch.save(small, out)
    stem = out.with_suffix("")
    report.to_json(f"{stem}.report.json")
    table = report.table()
    Path(f"{stem}.report.txt").write_text(table + "\n")
    written = [str(out), f"{stem}.report.json", f"{stem}.report.txt"]
    if args.torchscript:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = torch.jit.script(small.eval())
        except Exception:
            example = x[:1] if weighted and args.transfer_stats is None else None
            if example is None:
                raise SystemExit("torch.jit.script failed on this model and no calibration image "
                                 "is at hand to trace it; use --data") from None
            scripted = torch.jit.trace(small.eval(), example)
        scripted.save(f"{stem}.torchscript.pt")
        written.append(f"{stem}.torchscript.pt")
    print(table)
    print("wrote " + ", ".join(written))
    return 0


# ------------------------------------------------------------------- parser


def build_parser():
    """The argparse parser of the ``sigmadecomp`` command."""
    p = argparse.ArgumentParser(
        prog="sigmadecomp",
        description="Distribution-aware low-rank compression of CNNs (Sigma-norm Tucker-2, "
                    "CP, SVD): factors chosen to keep each layer's output on real data.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser(
        "demo", help="run the Fashion-MNIST experiment and print its table",
        description="Run the end-to-end experiment of the source tree: compress the committed "
                    "reference CNN with Tucker-2 and CP at several compression ratios, with "
                    "Frobenius and Sigma decompositions, evaluate without fine-tuning, and "
                    "write notes/results.md, results.json and plots. Installs the Debian "
                    "package dataset-fashion-mnist when it can, otherwise prints the command.")
    add_demo_options(d)
    d.set_defaults(func=_cmd_demo)

    c = sub.add_parser(
        "compress", help="compress a saved model with calibration images",
        description="Compress a saved model (a pickled torch.nn.Module, saved with "
                    "torch.save(model, path)). Input statistics of the chosen layers are "
                    "collected on calibration images (an image folder or IDX files) or read "
                    "from a statistics file, the layers are replaced by factorized ones, and "
                    "the compressed model, its report (JSON and a text table) are written.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("model", metavar="MODEL",
                   help="the model file: a pickled nn.Module (torch.save(model, path)); a "
                        "TorchScript file is recognised and refused with an explanation")
    c.add_argument("--data", metavar="DIR",
                   help="calibration images: a folder of image files (flat or one sub-folder "
                        "per class), a directory with IDX files (MNIST layout, the training "
                        "split is preferred), or one IDX image file")
    c.add_argument("--method", required=True, choices=["tucker2", "cp", "svd", "tt"],
                   help="format of the k x k convolutions (1x1 convs and Linear layers use "
                        "the SVD, except with 'tt', Tensor-Train, which tensorizes them too)")
    r = c.add_mutually_exclusive_group()
    r.add_argument("--ratio", type=float, metavar="RX",
                   help="per-layer compression ratio rX = params(original) / params(factorized), "
                        "> 1 (default: EVBMF ranks when neither --ratio nor --budget is given)")
    r.add_argument("--budget", type=float,
                   help="total weight parameters of the compressed layers after compression: "
                        "an integer count, or a fraction in (0, 1) of their original total; "
                        "ranks are allocated across layers by their error curves")
    c.add_argument("--transfer-stats", metavar="FILE",
                   help="use statistics saved by --save-stats / save_covariances (e.g. from "
                        "another dataset) instead of collecting them from --data")
    c.add_argument("--save-stats", metavar="FILE",
                   help="also save the collected statistics (.pt or .safetensors) for reuse")
    c.add_argument("--out", required=True, metavar="OUT",
                   help="where to write the compressed model (torch.save of the module); the "
                        "report goes to OUT's stem + .report.json and .report.txt")
    c.add_argument("--layers", default="auto",
                   help="comma-separated module names to compress; 'auto' = every k x k conv "
                        "(k > 1) but the first; 'all' = every Conv2d and Linear")
    c.add_argument("--include-first", action="store_true",
                   help="with --layers auto, also compress the first k x k conv")
    c.add_argument("--centered", action="store_true",
                   help="decompose in the centered covariance and correct the biases "
                        "(never a larger expected output error than plain Sigma)")
    c.add_argument("--frobenius", action="store_true",
                   help="classical weight-space decompositions, no statistics (data-free)")
    c.add_argument("--calib-images", type=int, default=1024,
                   help="number of calibration images (a seeded random subset)")
    c.add_argument("--batch-size", type=int, default=64, help="batch size for the statistics")
    c.add_argument("--image-size", type=int, default=None,
                   help="resize images of a folder to SIZE x SIZE (default: keep; all images "
                        "must then have the same size)")
    c.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="image channels (default: the in_channels of the model's first conv)")
    c.add_argument("--normalize", metavar="MEAN,STD", default=None,
                   help="normalise calibration images in [0, 1] as (x - mean) / std before the "
                        "model, e.g. 0.485,0.456,0.406,0.229,0.224,0.225 for ImageNet models "
                        "(default: feed [0, 1] images unchanged)")
    c.add_argument("--n-iter", type=int, default=None,
                   help="maximum ALS sweeps per layer (default: the decomposition's default)")
    c.add_argument("--torchscript", action="store_true",
                   help="also write a TorchScript version (OUT's stem + .torchscript.pt)")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_cmd_compress)
    return p


def main(argv=None):
    """Entry point of the ``sigmadecomp`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
