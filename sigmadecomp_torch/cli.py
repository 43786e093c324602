"""The ``sigmadecomp`` command.

    sigmadecomp demo [--quick | --full] [--out-dir DIR]
    sigmadecomp compress MODEL --data DIR --method tucker2 --ratio 3 --out OUT

``demo`` runs the end-to-end experiment installed with the package
(:mod:`sigmadecomp_torch.demo`: Fashion-MNIST, Frobenius against Sigma
decompositions without fine-tuning) and writes its tables and plots to a new
folder. ``compress`` compresses a saved model with calibration images from an
image folder or IDX files and writes the compressed model and its report.
Run ``sigmadecomp <command> --help`` for every option.

The module imports torch only when a command runs, so ``--help`` is quick and
works without torch. Mistakes of the user end in one line naming the option
and the fix, and a non-zero exit status (:data:`EXIT_STATUS_ALL`): 2 for a
refused command line (an unknown option or a bad value, as argparse, or a
value or combination of options that is not allowed), 1 for a run that failed
(a missing or unreadable file, a model that cannot be loaded or run, an error
of the compression), 3 when the demo's dataset is missing. An option without
effect in its combination is refused with the reason. Warnings are printed as
one line, ``warning: <message>``, without the file and line of their source,
and the library's messages name the options of the command (``--n-iter``, not
``n_iter_max``).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from pathlib import Path

from sigmadecomp_torch.demo import TIMES, add_demo_options, int_at_least, positive_int

__all__ = ["main", "build_parser", "cli_default_layers"]

TORCH_HINT = ("the sigmadecomp command needs PyTorch: pip install 'sigmadecomp[torch]' "
              "(or pip install torch first, e.g. the CPU build)")


class UserError(Exception):
    """A refused command line: a value or a combination of options that is not allowed.
    Printed as one line; exit status 2, as argparse's usage errors."""

    status = 2


class RunError(UserError):
    """A run that failed: a file missing or unreadable, a model that cannot be loaded or run
    on the images, an error of the compression. Printed as one line; exit status 1."""

    status = 1


_non_negative_int = int_at_least(0)

_EXIT_REFUSED = ("exit status: 0 done; 2 the command line is refused (an unknown option, or a "
                 "value or combination of options that is not allowed: the message names the "
                 "option and what is allowed); 1 the run failed (a file missing or unreadable, "
                 "PyTorch missing, a model that cannot be loaded or run on the images, an "
                 "error of the compression")
#: The exit statuses of ``compress``, the epilog of its ``--help``.
EXIT_STATUS = _EXIT_REFUSED + ")"
#: Those of every command, the epilog of ``sigmadecomp --help``.
EXIT_STATUS_ALL = (_EXIT_REFUSED + "; demo: an --out-dir that cannot be written); 3 demo: "
                   "the Fashion-MNIST data are not installed")


def _version():
    """The installed package's version (importlib.metadata), else sigmadecomp.__version__."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sigmadecomp")
    except PackageNotFoundError:
        import sigmadecomp

        return getattr(sigmadecomp, "__version__", "unknown")


# ------------------------------------------------------------ the CLI's words

#: The library's keywords in the messages the CLI passes on (errors and warnings of
#: compress and of the statistics), and the options of the command that set them.
_OPTION_OF = {"ratio": "--ratio", "budget": "--budget", "layers": "--layers",
              "refit": "--refit", "data": "--data", "n_iter_max": "--n-iter",
              "channels": "--channels", "min_speedup": "--min-speedup"}
_KEYWORD = "(?<![\\w'-])(" + "|".join(_OPTION_OF) + ")"

#: (pattern, replacement) in order: whole phrases first, then any ``keyword=``.
_CLI_WORDS = [
    (r"options\['n_iter_max'\] or options\['tol'\]", "--n-iter"),
    (r"choose a smaller rank or fewer n_iter_max",
     "choose a smaller rank (a larger --ratio) or a smaller --n-iter"),
    (r"options=\{'inner': \{'maxiter': 'adaptive'\}, 'n_iter_max': (\d+)\}",
     r"--cp-inner adaptive --n-iter \1"),
    (r"\(use higher ranks for it, or leave it out of layers=\)",
     "(give it higher ranks with a smaller --ratio or a larger --budget, or leave it out of "
     "--layers)"),
    (r"data yielded no batches \(or the chosen layers never ran\); collect_covariances needs "
     r"at least one batch", "no chosen layer ran in the forward pass on the images of --data"),
    (r"no statistics for this layer in covariances", "no statistics for this layer"),
    (r"; pass size=$", ""),  # (the CLI adds its hint: --image-size)
    (r"\bcovariances\[('(?:[^'\\]|\\.)*')\]", r"the statistics of \1"),
    (_KEYWORD + r" contains\b", lambda m: f"{_OPTION_OF[m[1]]} contains"),
    (r"\bchosen in layers\b", "chosen in --layers"),
    (_KEYWORD + r"=(?=[^\s),;.:])", lambda m: f"{_OPTION_OF[m[1]]}="),  # with its value
    (_KEYWORD + r"=", lambda m: _OPTION_OF[m[1]]),  # the keyword alone ("out of layers=)")
]


def _cli_words(text):
    """``text`` (a message of the library) with the options of the command for its keywords."""
    for pattern, replacement in _CLI_WORDS:
        text = re.sub(pattern, replacement, text)
    return text


def _warning_printer(words):
    """A ``warnings.showwarning`` for a command: ``warning: <message>`` on one line, without
    the file and line of the source; ``words`` rewrites the message."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
        print(f"warning: {words(text)}", file=sys.stderr if file is None else file)

    return show


# --------------------------------------------------------------------- demo


def _cmd_demo(args):
    from sigmadecomp_torch.demo import main as demo_main

    return demo_main(args)


# ----------------------------------------------------------------- compress


def _load_model(path):
    import torch

    if not Path(path).is_file():
        raise RunError(f"MODEL={path!r} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(path, map_location="cpu")
    except Exception:  # not a TorchScript archive
        scripted = None
    if scripted is not None:
        raise RunError(
            f"{path} is a TorchScript model. TorchScript graphs are compiled against their "
            "modules' types, so their layers cannot be replaced by factorized ones; save the "
            "Python module instead (torch.save(model, path)) and pass that file. The compressed "
            "model can be written as TorchScript with --torchscript.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except AttributeError as exc:
        # pickle stores classes by module and name; a class of the saving script is '__main__.X'
        raise RunError(
            f"could not load MODEL={path!r}: {exc}. The model's class must be importable here: "
            "if it was defined in the script that saved it (its __main__), move the class into "
            "a module (e.g. mynet.py), import it from there in that script, save the model "
            "again, and run sigmadecomp with that module's directory on PYTHONPATH") from None
    except ModuleNotFoundError as exc:
        raise RunError(
            f"could not load MODEL={path!r}: {exc}. The module defining the model's class must "
            "be importable: add its directory to PYTHONPATH") from None
    except Exception as exc:
        if not _torch_save_file(path):  # (pickle's own words, e.g. "Memo value not found")
            raise RunError(f"MODEL={path!r} is not a file written by torch.save; MODEL must be "
                           "a model saved with torch.save(model, path) (a pickled "
                           "torch.nn.Module)") from None
        raise RunError(f"could not load MODEL={path!r}: {exc}") from None
    if not isinstance(obj, torch.nn.Module):
        hint = (" (a state_dict holds only weights: save the module itself with "
                "torch.save(model, path))") if isinstance(obj, dict) else ""
        raise RunError(f"MODEL={path!r} holds an object of type {type(obj).__name__}, not a "
                       f"torch.nn.Module{hint}")
    return obj.eval()


def _torch_save_file(path):
    """Whether the file at ``path`` has the structure of a torch.save file: a zip archive
    with a data.pkl (torch >= 1.6), or the legacy format, which starts with torch's magic
    number."""
    import zipfile

    from torch.serialization import MAGIC_NUMBER

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return any(n.rsplit("/", 1)[-1] == "data.pkl" for n in z.namelist())
        with open(path, "rb") as f:
            head = f.read(32)
    except (OSError, zipfile.BadZipFile):
        return True  # (unreadable: torch.load's own message says why)
    return head[:1] == b"\x80" and MAGIC_NUMBER.to_bytes(10, "little") in head


def cli_default_layers(model, *, include_first=False, example=None):
    """The layers ``sigmadecomp compress`` compresses when ``--layers`` is not given.

    The library's default, :func:`sigmadecomp_torch.default_layers`: every
    Conv2d and Linear but the first (the layer reading the images) and the
    last (the classifier); the first too with ``include_first``. With
    ``example`` (a batch of calibration images) first and last are those a
    forward pass calls first and last; else the first and last registered.
    """
    from .compress import default_layers

    if example is not None:
        try:  # "first" and "last" in the order a forward pass calls the layers
            return default_layers(model, include_first=include_first, example_input=example)
        except RuntimeError as exc:
            raise _failed_on_images(exc, example) from None
    return default_layers(model, include_first=include_first)


def _runs_on(model, images):
    """Run the model on one calibration image; any failure is the one-line error."""
    import torch

    from ._batches import eval_modes

    try:
        with eval_modes(model), torch.no_grad():
            model(images[:1])
    except Exception as exc:
        guess = ""
        if _first_conv(model)[1] is None and images.shape[1] == 3:
            guess = ("; the model has no Conv2d to tell its channel count, so the images were "
                     "read with 3 channels: give --channels 1 for grey images")
        raise RunError(str(_failed_on_images(exc, images)) + guess) from None


def _replaceable(model, layers):
    """The chosen layers compress can replace: the others need no statistics (a layer its
    parent reads directly, like attention's out_proj, never even runs as a module), and the
    report says why they are left alone."""
    from .selection import dense_reasons

    if layers is None:
        return None
    dense = dense_reasons(model, layers)
    return [n for n in layers if n not in dense]


def _check_writable(path, flag):
    """Refuse an output path that cannot be written, before any work. Nothing is created
    here (a refused run leaves the file system as it was): the missing directories of the
    path are made by :func:`_make_parent` when the file is written."""
    import os

    if not path:
        raise UserError(f"{flag}={path!r} is empty; give a file name")
    if os.path.isdir(path):
        raise UserError(f"{flag}={path!r} is a directory; give a file name")
    if os.path.basename(path) in ("", ".", ".."):  # ("out/new/": Path would drop the "/")
        raise UserError(f"{flag}={path!r} names a directory (it ends in a path separator); "
                        "give a file name")
    # the nearest existing ancestor: the directory the missing ones would be made in
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunError(f"{flag}={path!r}: cannot create its directory ({parent!r} is not a "
                       "directory)")
    if (not os.access(parent, os.W_OK | os.X_OK)
            or (os.path.exists(path) and not os.access(path, os.W_OK))):
        raise RunError(f"{flag}={path!r} is not writable; choose another location")


def _check_companions(args):
    """Refuse an --out whose companion files (report, TorchScript) cannot be written: a
    directory, or a file that is not writable, under one of their names."""
    import os

    stem = Path(args.out).with_suffix("")
    for end in ((".report.json", ".report.txt", ".report.png")
                + ((".torchscript.pt",) if args.torchscript else ())):
        path = f"{stem}{end}"
        if os.path.isdir(path):
            raise UserError(f"--out={args.out!r} also writes {path!r}, which is a directory; "
                            "give another --out")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise RunError(f"--out={args.out!r} also writes {path!r}, which is not writable; "
                           "choose another location")


def _make_parent(path, flag):
    """Make the missing directories of the output ``path`` (checked by _check_writable)."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"{flag}={path!r}: cannot create its directory "
                       f"({exc.strerror or exc})") from None


def _same_file(a, b):
    """Whether the paths ``a`` and ``b`` name one file: os.path.samefile when both exist,
    else the same normalized absolute path."""
    import os

    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _inside(path, folder):
    """Whether ``path`` lies in the directory ``folder`` or below it (links resolved)."""
    import os

    if not os.path.isdir(folder):
        return False
    a = os.path.normcase(os.path.realpath(path))
    b = os.path.normcase(os.path.realpath(folder))
    try:
        return os.path.commonpath([a, b]) == b
    except ValueError:  # (paths on different drives)
        return False


def _check_no_overwrite(args):
    """Refuse an output that would overwrite an input of the command (or another output):
    --out and the files written next to it, and --save-stats; none of them may be written
    into a folder of images given as --data, whose images it would replace or add to (a
    report's PNG would be read as a calibration image by the next run), nor over a file of
    a directory of IDX files."""
    import os

    stem = Path(args.out).with_suffix("")
    outputs = [("--out", args.out, args.out)] + [
        ("--out", args.out, f"{stem}{end}") for end in
        (".report.json", ".report.txt", ".report.png")
        + ((".torchscript.pt",) if args.torchscript else ())]
    if args.save_stats is not None:
        outputs.append(("--save-stats", args.save_stats, args.save_stats))
    others = [("MODEL", args.model), ("--transfer-stats", args.transfer_stats),
              ("--data", args.data), ("--save-stats", args.save_stats)]
    for flag, value, path in outputs:
        # (in a directory of IDX files only their own names are read: a new file is harmless)
        if args.data is not None and _inside(path, args.data) and (
                not _holds_idx(args.data) or os.path.exists(path)):
            what = "" if path == value else f" (it writes {path!r})"
            raise UserError(f"{flag}={value!r}{what} is inside --data={args.data!r}: it would "
                            "overwrite or add to the calibration images; write it outside "
                            "that folder")
        for other, given in others:
            if given is not None and other != flag and _same_file(path, given):
                what = "" if path == value else f" (it writes {path!r})"
                raise UserError(f"{flag}={value!r}{what} is the file of {other}={given!r}, "
                                f"which would be overwritten; give another {flag}")


def _failed_on_images(exc, images):
    """The one-line error for a model that cannot run on the calibration images."""
    first = str(exc).strip().splitlines()[0]
    return RunError(f"the model failed on the calibration images of shape "
                    f"{tuple(images.shape[1:])}: {first} (check --image-size, --channels "
                    "and --normalize)")


def _first_conv(model):
    from torch import nn

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    return None, None


def _parse_floats(text, name):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{name}={text!r} is not allowed; give comma-separated numbers") from None


def _choose_layers(args, model, example=None):
    if args.include_first and args.layers not in (None, "auto"):
        raise UserError(f"--include-first applies to --layers auto, not to --layers="
                        f"{args.layers!r}; name the first layer in --layers instead")
    if args.layers in (None, "auto"):
        layers = cli_default_layers(model, include_first=args.include_first, example=example)
        if example is not None:  # (statistics need a layer to run: one that never does is left)
            from .selection import _call_order

            called = set(_call_order(model, example).order)
            never = [n for n in layers if n not in called]
            if never:
                print(f"left alone: {', '.join(never)} (never ran in the forward pass on a "
                      "calibration image)")
            layers = [n for n in layers if n in called]
        kept = _replaceable(model, layers)
        dense = [n for n in layers if n not in kept]  # e.g. attention's out_proj
        if layers and not kept:
            raise UserError("no layer to compress: the Conv2d/Linear layers besides the first "
                            f"and the last ({', '.join(dense[:4])}{', ...' if len(dense) > 4 else ''}) "
                            "cannot be replaced: their parent modules read their weights "
                            "directly (as nn.MultiheadAttention and nn.TransformerEncoderLayer "
                            "do), or another obstacle keeps them dense")
        if dense:
            print(f"left dense: {', '.join(dense)} (a factorized module cannot replace them)")
        layers = kept
        if not layers:
            raise UserError("no layer to compress: the model has no Conv2d or Linear besides "
                            "the first and the last; name layers with --layers or use "
                            "--layers all")
        skipped = "the last layer" if args.include_first else "the first and the last layer"
        print(f"layers: {len(layers)} Conv2d/Linear layers ({', '.join(layers)}); {skipped} "
              "left alone (choose with --layers)")
        return layers
    if args.layers == "all":
        from .compress import default_layers

        print("layers: every Conv2d and Linear (--layers all)")
        return default_layers(model, include_first=True, include_last=True)
    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    if not layers:
        raise UserError(f"--layers={args.layers!r} names no module; give comma-separated module "
                        "names, 'auto' or 'all'")
    known = dict(model.named_modules())
    missing = [n for n in layers if n not in known]
    if missing:
        raise UserError(f"--layers={args.layers!r}: {', '.join(missing)} not in the "
                        f"model; its modules include {', '.join(list(known)[1:6])}, ...")
    from .covariance import select_layers

    try:  # (a module that is no Conv2d or Linear)
        select_layers(model, layers)
    except ValueError as exc:
        raise UserError(_cli_words(str(exc))) from None
    return layers


def _check_chosen_layers(args, model, layers, stats):
    """The checks that need the model's layers but no image, run before any is read:
    --refit's names, and once the layers to compress are known (with --layers auto, after
    the image that gives their call order), --refit against them and --budget against
    their sizes."""
    if args.refit not in (None, "all"):
        from .covariance import select_layers
        from .sequential import _refit_candidates

        names = [n.strip() for n in args.refit.split(",") if n.strip()]
        try:
            if layers is None:
                select_layers(model, names, name="refit")
            else:
                _refit_candidates(model, names, layers)
        except ValueError as exc:
            raise UserError(_cli_words(str(exc))) from None
    if args.budget is not None and layers is not None:
        _check_budget_size(args, model, layers, stats)


def _check_budget_size(args, model, layers, stats):
    """Refuse a --budget below the cost of the compressed layers' smallest ranks (as the
    allocation does, once the statistics are at hand); warn about one at or above their
    original size."""
    from sigmadecomp.allocation import _check_budget as budget_count
    from sigmadecomp.costs import METHODS, layer_params

    from .formats import LAYER_METHODS, layer_method_for

    modules, seen, dense, least = dict(model.named_modules()), set(), 0, 0
    for name in _replaceable(model, layers):
        m = modules[name]
        if id(m) in seen or (stats is not None and name not in stats):
            continue  # (a layer without statistics stays dense: no share of the budget)
        seen.add(id(m))
        shape = tuple(m.weight.shape)
        rank_method = LAYER_METHODS[layer_method_for(m, args.method)].rank_method
        dense += layer_params(shape, "dense", None)
        least += layer_params(shape, rank_method,
                              METHODS[rank_method].candidates(shape, True)[0])
    if not dense:
        return
    b = args.budget
    # the allocator's own count (a fraction keeps its slack against float rounding)
    budget = budget_count(int(b) if b >= 1 else float(b), dense, "weight parameters")
    if least > budget:
        asked = (f"--budget={budget}" if b >= 1 else
                 f"--budget={b:g} (a fraction: {budget} of {dense} weight parameters)")
        fraction = "" if b >= 1 else f" (a fraction of at least {least / dense:.4g})"
        raise UserError(f"{asked} is not allowed for these layers; the smallest ranks already "
                        f"cost {least} weight parameters, so the budget must be at least "
                        f"{least}{fraction}")
    if b >= 1 and budget >= dense:
        n = len(seen)
        print(f"warning: --budget {budget} is at least the {dense} weight parameters of the "
              f"{n} layer{'' if n == 1 else 's'} to compress (biases not counted): they need "
              "no compression to fit it; give a smaller count, or a fraction in (0, 1)",
              file=sys.stderr)


def _rank_choice(args):
    """The rank keyword of compress and a sentence saying what was chosen."""
    if args.ratio is not None:
        if not (args.ratio > 1 and math.isfinite(args.ratio)):
            raise UserError(f"--ratio={args.ratio:g} is not allowed; the per-layer ratio rX "
                            "must be a finite number > 1")
        return {"ratio": args.ratio}, f"ranks: per-layer ratio rX = {args.ratio:g} (--ratio)"
    if args.budget is not None:
        if args.method == "tt":
            raise UserError("--budget is not available with --method tt (Tensor-Train has no "
                            "error curve to allocate ranks by); give --ratio RX")
        b = args.budget
        if 0 < b < 1:
            return ({"budget": b}, f"ranks: allocated across layers to keep {b:g} of their "
                                   "weight parameters (--budget)")
        if math.isfinite(b) and b >= 1 and b == int(b):
            return ({"budget": int(b)}, f"ranks: allocated across layers to keep {int(b)} "
                                        "weight parameters (--budget)")
        raise UserError(f"--budget={b:g} is not allowed; give a whole count of weight "
                        "parameters (>= 1) or a fraction in (0, 1) of the compressed layers' "
                        "weights")
    if args.method == "tt":
        raise UserError("--method tt needs --ratio: the default ranks (EVBMF) and --budget's "
                        "allocation work for tucker2, cp and svd only")
    return ({"ranks": "evbmf"},
            "ranks: EVBMF (estimated from each layer's weights, no size target); give --ratio "
            "or --budget to set the size")


def _bias_count(module):
    return int(sum(p.numel() for name, p in module.named_parameters()
                   if name.rsplit(".", 1)[-1] == "bias"))


def _weights(report, model, small):
    """``(row, weights before, weights after)`` of each compressed layer: its parameters but
    the biases, which --ratio and --budget do not count (a factorized layer keeps the bias)."""
    return [(r, r["params_before"] - _bias_count(model.get_submodule(r["name"])),
             r["params_after"] - _bias_count(small.get_submodule(r["name"])))
            for r in report.layers]


def _warn_unmet_ratio(weights, ratio):
    """One line when some layers cannot reach the per-layer ratio (ranks at their minimum);
    rX of the weights, as --ratio counts them."""
    short = [(r, b / max(a, 1)) for r, b, a in weights if b / max(a, 1) < 0.9 * ratio]
    if short:
        names = ", ".join(f"{r['name']} (ranks {r['ranks']}, rX {rx:.1f})" for r, rx in short[:4])
        more = f" and {len(short) - 4} more" if len(short) > 4 else ""
        before, after = sum(w[1] for w in weights), sum(w[2] for w in weights)
        print(f"warning: --ratio {ratio:g} cannot be met by {len(short)} of {len(weights)} "
              f"layers even at their smallest ranks: {names}{more}; the compressed layers reach "
              f"rX = {before / max(after, 1):.1f} (of their weights)", file=sys.stderr)


def _weights_note(weights, report, args):
    """The line under the table when biases make its params and rX differ from the weights
    that --ratio and --budget count; None without biases or without a size target."""
    before, after = sum(w[1] for w in weights), sum(w[2] for w in weights)
    if (args.ratio is None and args.budget is None) or (
            (before, after) == (report.layer_params_before, report.layer_params_after)):
        return None
    flag = f"--ratio {args.ratio:g}" if args.ratio is not None else f"--budget {args.budget:g}"
    why = ("kept, or added by the bias correction of --centered" if args.centered else
           "the factorized layers keep them")
    return (f"params and rX above count biases too ({why}); {flag} counts weights only: the "
            f"compressed layers' weights go {before} -> {after}, rX {before / max(after, 1):.2f}")


def _calibration_images(args, model):
    from sigmadecomp_torch.data import load_images

    first_name, first = _first_conv(model)
    in_ch = first.in_channels if first is not None else None
    if args.channels is not None and in_ch is not None and args.channels != in_ch:
        raise UserError(f"--channels {args.channels} does not match the model: its first conv "
                        f"{first_name!r} takes {in_ch} channel{'s' if in_ch != 1 else ''}; use "
                        f"--channels {in_ch} or omit it")
    channels = args.channels or (in_ch if in_ch in (1, 3) else None)
    data = Path(args.data)
    if not data.exists():
        raise RunError(f"--data={args.data!r} does not exist; give a folder of images (flat or "
                       "one sub-folder per class), a directory of IDX files, or an IDX file")
    try:
        x, _ = load_images(data, limit=args.calib_images, size=args.image_size,
                           channels=channels, seed=args.seed)
    except FileNotFoundError as exc:
        raise RunError(f"--data={args.data!r}: {_cli_words(str(exc))}; give a folder of images "
                       "or IDX files") from None
    except (ValueError, OSError) as exc:
        hint = " (resize them with --image-size SIZE)" if "different sizes" in str(exc) else ""
        raise RunError(f"--data={args.data!r}: {_cli_words(str(exc))}{hint}") from None
    if args.normalize:
        x = _normalize(x, args.normalize)
    # in the model's floating dtype (a float64 or float16 model takes no float32 images)
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is not None and x.is_floating_point() and x.dtype != p.dtype:
        x = x.to(p.dtype)
    print(f"calibration: {len(x)} image{'' if len(x) == 1 else 's'} of shape "
          f"{tuple(x.shape[1:])} from {args.data}")
    return x


def _holds_idx(data):
    """Whether --data names IDX data (an IDX file, or a directory with IDX image files), as
    load_images tells them from an image folder."""
    from sigmadecomp_torch.data import _idx_pair

    p = Path(data)
    try:
        return p.is_file() or (p.is_dir() and _idx_pair(p) is not None)
    except OSError:
        return False  # (reading --data says why)


def _normalize_values(text):
    """The numbers of ``--normalize``, checked as far as they can be without the images."""
    vals = _parse_floats(text, "--normalize")
    if not all(math.isfinite(v) for v in vals):
        raise UserError(f"--normalize={text!r} is not allowed; give finite numbers")
    if len(vals) % 2:
        raise UserError(f"--normalize={text!r} is not allowed; give MEAN,STD (2 values) or one "
                        "mean per channel then one std per channel (6 values for 3 channels)")
    if not all(v > 0 for v in vals[len(vals) // 2:]):
        raise UserError(f"--normalize={text!r}: the standard deviations must be > 0")
    return vals


def _normalize(x, text):
    """``x`` (N, C, H, W) normalized by ``--normalize`` = MEAN,STD (every channel) or C means then C stds."""
    import torch

    vals = _normalize_values(text)
    channels = x.shape[1]
    if len(vals) not in (2, 2 * channels):
        allowed = ("MEAN,STD (2 values) for these 1-channel images" if channels == 1 else
                   f"MEAN,STD or one mean and one std per channel ({channels} channels, so 2 "
                   f"or {2 * channels} values)")
        raise UserError(f"--normalize={text!r}: give {allowed}")
    half = len(vals) // 2
    mean = torch.tensor(vals[:half]).view(1, -1, 1, 1)
    std = torch.tensor(vals[half:]).view(1, -1, 1, 1)
    return (x - mean) / std


def _cmd_compress(args):
    import torch

    from sigmadecomp_torch.compress import compress
    from sigmadecomp_torch.covariance import collect_covariances, load_covariances, save_covariances
    from sigmadecomp_torch.data import make_loader

    if args.threads:
        torch.set_num_threads(args.threads)
    weighted = not args.frobenius
    if weighted and args.data is None and args.transfer_stats is None:
        raise UserError("give calibration images with --data DIR, statistics with "
                        "--transfer-stats FILE, or --frobenius for data-free weight-space "
                        "decompositions")
    if args.centered and not weighted:
        raise UserError("--centered needs statistics; it cannot be combined with --frobenius")
    if args.transfer_stats is not None and not weighted:
        raise UserError("--transfer-stats cannot be combined with --frobenius: it gives "
                        "statistics, and the weight-space decompositions of --frobenius use none")
    if args.normalize is not None:
        _normalize_values(args.normalize)
    fitted = args.sequential or args.refit is not None
    if fitted:
        what = "--sequential" if args.sequential else "--refit"
        if args.data is None:
            raise UserError(f"{what} needs calibration images: give --data DIR")
        if args.refit is not None and not args.refit.replace(",", "").strip():
            raise UserError(f"--refit={args.refit!r} names no layer; give 'all' or "
                            "comma-separated module names")
        for flag, given in (("--frobenius", args.frobenius),
                            ("--transfer-stats", args.transfer_stats is not None),
                            ("--save-stats", args.save_stats is not None)):
            if given:
                raise UserError(f"{what} cannot be combined with {flag}: it collects its own "
                                "statistics from --data as it goes")
    if args.save_stats is not None and (args.frobenius or args.transfer_stats is not None):
        raise UserError("--save-stats saves statistics collected from --data; with "
                        f"{'--frobenius' if args.frobenius else '--transfer-stats'} none are "
                        "collected")
    source = "--frobenius" if args.frobenius else "--transfer-stats"
    image_options = [flag for flag, value in (
        ("--calib-images", args.calib_images), ("--batch-size", args.batch_size),
        ("--image-size", args.image_size), ("--channels", args.channels),
        ("--normalize", args.normalize), ("--seed", args.seed)) if value is not None]
    if args.data is None and image_options:
        them = " and ".join(image_options)
        raise UserError(f"{them} appl{'y' if len(image_options) > 1 else 'ies'} to the "
                        f"calibration images of --data, and with {source} and no --data no "
                        f"image is read: give --data DIR, or leave {them} out")
    if args.latency_batch is not None and args.min_speedup is None:
        raise UserError("--latency-batch sets the batch --min-speedup times the layers at; "
                        "give --min-speedup X, or leave --latency-batch out")
    if args.min_speedup is not None:
        if not (math.isfinite(args.min_speedup) and args.min_speedup >= 0):
            raise UserError(f"--min-speedup={args.min_speedup:g} is not allowed; give a "
                            "finite number >= 0 (e.g. 1: keep a layer dense unless its "
                            "factorized form is faster)")
        if args.data is None:
            raise UserError("--min-speedup times each layer at the input size the images of "
                            "--data give it: give --data DIR")
    latency_batch = args.latency_batch or 1
    collects = fitted or not (args.frobenius or args.transfer_stats)  # statistics from --data
    if args.batch_size is not None and not collects:
        raise UserError(f"--batch-size sets the batches of the statistics collected from "
                        f"--data; with {source} none are collected: leave --batch-size out")
    if args.calib_images is not None and not collects:
        raise UserError(f"--calib-images sets how many images of --data the statistics are "
                        f"collected from; with {source} none are collected (one image is read "
                        "to choose the layers): leave --calib-images out")
    # (the image read then, or the batch --min-speedup times, serves by its size alone)
    for flag, value, does in (("--seed", args.seed, "chooses the images of --data"),
                              ("--normalize", args.normalize, "normalises the images of --data")):
        if value is not None and not collects:
            raise UserError(f"{flag} {does} the statistics are collected from; with {source} "
                            "none are collected (the image read to choose the layers counts "
                            f"by its size alone): leave {flag} out")
    if args.image_size is not None and args.data is not None and _holds_idx(args.data):
        raise UserError(f"--image-size resizes the images of a folder; --data={args.data!r} "
                        "holds IDX data, which keep their size: leave --image-size out")
    # (without statistics one image serves the layer choice and the first-image check, or
    # the batch --min-speedup times at)
    timed = latency_batch if args.min_speedup is not None else 1
    asked_images = args.calib_images
    args.calib_images = timed if not collects else (
        max(1024, timed) if args.calib_images is None else args.calib_images)
    if args.min_speedup is not None and args.calib_images < timed:
        raise UserError(f"--latency-batch {timed} needs as many images: --calib-images is "
                        f"{args.calib_images}")
    args.batch_size = 64 if args.batch_size is None else args.batch_size
    args.seed = 0 if args.seed is None else args.seed
    _check_writable(args.out, "--out")
    _check_companions(args)
    if args.save_stats is not None:
        _check_writable(args.save_stats, "--save-stats")
        suffix = Path(args.save_stats).suffix
        if suffix not in ("", ".pt", ".pth", ".safetensors"):  # (as save_covariances reads it)
            raise UserError(f"--save-stats={args.save_stats!r}: a {suffix} name is not "
                            "allowed; give a name ending in .safetensors (safetensors) or in "
                            ".pt or .pth (a torch.save file; so is a name without suffix)")
    _check_no_overwrite(args)
    rank_kw, rank_text = _rank_choice(args)
    options = {}
    if args.n_iter is not None:
        if args.method == "svd":
            raise UserError("--n-iter applies to tucker2, cp and tt; --method svd is a closed "
                            "form without iterations: leave --n-iter out")
        options["n_iter_max"] = args.n_iter
    if args.cp_inner is not None:
        if args.method != "cp":
            raise UserError(f"--cp-inner {args.cp_inner} applies to --method cp, not "
                            f"{args.method}: leave --cp-inner out")
        if not weighted:
            raise UserError(f"--cp-inner {args.cp_inner} sets the inner solves of "
                            "Sigma-weighted CP; the Frobenius CP of --frobenius has none: "
                            "leave --cp-inner out")
    if args.cp_inner == "adaptive":
        options["inner"] = {"maxiter": "adaptive"}
    model = _load_model(args.model)
    # images whenever --data is given: they also decide the default layers (call order)
    with_images = fitted or args.data is not None or (weighted and args.transfer_stats is None)
    # the default layers follow the order the model runs them on an image, once one is read
    defer = with_images and args.layers in (None, "auto")
    layers = None if defer else _choose_layers(args, model)

    stats, x = None, None
    if weighted and args.transfer_stats is not None:  # (before any image is read)
        try:
            stats = load_covariances(args.transfer_stats)
        except (OSError, ValueError, KeyError) as exc:
            raise RunError(f"--transfer-stats={args.transfer_stats!r}: "
                           f"{_cli_words(str(exc))}") from None
        print(f"statistics of {len(stats)} layer{'' if len(stats) == 1 else 's'} from "
              f"{args.transfer_stats}")
    _check_chosen_layers(args, model, layers, stats)  # (with --layers auto: --refit's names)
    if with_images:
        x = _calibration_images(args, model)
        if asked_images is not None and len(x) < asked_images:
            print(f"note: --calib-images {asked_images}: --data holds only {len(x)} "
                  f"image{'' if len(x) == 1 else 's'}, all used")
        _runs_on(model, x)
        if args.min_speedup is not None and len(x) < latency_batch:  # (before any output)
            raise UserError(f"--latency-batch {latency_batch}: --data has only {len(x)} "
                            "image(s)")
        if defer:
            layers = _choose_layers(args, model, example=x[:1])
            _check_chosen_layers(args, model, layers, stats)
    print(rank_text)
    if weighted and not fitted and args.transfer_stats is None:
        wanted = _replaceable(model, layers)
        try:  # (none replaceable: no statistics; compress then says why for each layer)
            stats = {} if wanted == [] else collect_covariances(
                model, make_loader(x, batch_size=args.batch_size), layers=wanted,
                progress=not args.no_progress)
        except (ValueError, TypeError) as exc:  # (the model itself ran: _runs_on)
            msg = _cli_words(str(exc))
            raise RunError(f"--layers={args.layers!r}: {msg}" if args.layers not in
                           (None, "auto", "all") and "--layers" not in msg else msg) from None
        except RuntimeError as exc:
            raise _failed_on_images(exc, x) from None
        if args.save_stats:
            _make_parent(args.save_stats, "--save-stats")
            save_covariances(stats, args.save_stats)
            print(f"wrote statistics to {args.save_stats}")

    kw = dict(covariances=stats, layers=layers, centered=args.centered,
              progress=not args.no_progress, **rank_kw)
    if fitted:
        refit = args.refit
        if refit is not None and refit != "all":
            refit = [n.strip() for n in refit.split(",") if n.strip()]
        kw.update(covariances=None, data=make_loader(x, batch_size=args.batch_size),
                  sequential=args.sequential, refit=refit)
    if options:
        kw["options"] = options
    if args.min_speedup is not None:
        kw.update(min_speedup=args.min_speedup, example_input=x[:latency_batch])
        print(f"timing each layer at batch {latency_batch} (--min-speedup "
              f"{args.min_speedup:g})")
    try:
        small, report = compress(model, args.method, **kw)
    except (ValueError, TypeError) as exc:
        msg, hint = _cli_words(str(exc)), ""
        if args.transfer_stats is not None and "no statistics for this layer" in msg:
            hint = (f" (--transfer-stats={args.transfer_stats!r} has no statistics for it: "
                    "they come from another model or other layers; collect them with "
                    "--data, or name the layers they cover with --layers)")
        elif args.transfer_stats is not None and "covariances" in str(exc):
            msg = f"--transfer-stats={args.transfer_stats!r}: {msg}"
        raise RunError(msg + hint) from None
    for row in report.skipped:  # (the reasons are printed with the table)
        row["reason"] = _cli_words(row["reason"])
    weights = _weights(report, model, small)
    if args.ratio is not None:
        _warn_unmet_ratio(weights, args.ratio)
    if not report.layers:
        why = (f" (each ran less than --min-speedup {args.min_speedup:g} times faster "
               f"factorized at batch {latency_batch})" if args.min_speedup is not None else "")
        print(f"warning: no layer was compressed{why}; the model written is the original "
              "one", file=sys.stderr)

    out = Path(args.out)
    _make_parent(out, "--out")
    torch.save(small, out)
    stem = out.with_suffix("")
    report.to_json(f"{stem}.report.json")
    # the title in the command's words: "--method svd (Sigma)", not "compress(method='svd', ...)"
    table = re.sub(r"\Acompress\(method='(\w+)', ", r"--method \1 (", report.table())
    note = _weights_note(weights, report, args)
    if note:
        table += "\n" + note
    Path(f"{stem}.report.txt").write_text(table + "\n")
    written = [str(out), f"{stem}.report.json", f"{stem}.report.txt"]
    try:  # the per-layer figure, when matplotlib is installed
        report.plot(f"{stem}.report.png")
        written.append(f"{stem}.report.png")
    except ImportError:
        print("(no report.png: matplotlib is not installed)")
    if args.torchscript:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = torch.jit.script(small.eval())
        except Exception:
            done = "; " + ", ".join(written) + " were written"
            if x is None:
                raise RunError("torch.jit.script failed on this model and no calibration image "
                               "is at hand to trace it; give --data to trace it"
                               + done) from None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    scripted = torch.jit.trace(small.eval(), x[:1])
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise RunError(f"--torchscript: neither torch.jit.script nor torch.jit.trace "
                               f"can convert this model ({first})" + done) from None
        scripted.save(f"{stem}.torchscript.pt")
        written.append(f"{stem}.torchscript.pt")
    print(table)
    print("wrote " + ", ".join(written))
    print(f"load it with torch.load({str(out)!r}, weights_only=False) where sigmadecomp_torch "
          "(and the model's own classes) can be imported"
          + (f"; {stem}.torchscript.pt is self-contained: torch.jit.load(path)"
             if args.torchscript else "; --torchscript also writes a self-contained file"))
    return 0


# ------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line (as every other refusal of the
    command): ``<prog>: error: <message>`` and a pointer to ``--help`` instead of the
    whole usage text first; exit status 2. Its sub-command parsers are of this class too."""

    def error(self, message):
        text = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def build_parser():
    """The argparse parser of the ``sigmadecomp`` command."""
    p = _Parser(
        prog="sigmadecomp",
        description="Distribution-aware low-rank compression of CNNs (Sigma-norm SVD, "
                    "Tucker-2, CP, Tensor-Train): factors chosen to keep each layer's output "
                    "on real data.",
        epilog=EXIT_STATUS_ALL,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser(
        "demo", help="run the Fashion-MNIST experiment and print its tables",
        description="Run the end-to-end experiment installed with the package: compress the "
                    "shipped reference CNN (Fashion-MNIST) with Tucker-2, CP and Tensor-Train "
                    "at several compression ratios, Frobenius against Sigma decompositions, "
                    "evaluate test accuracy without fine-tuning (and with a short fine-tuning, "
                    "transferred and data-free statistics, int8 weights, CPU latency), print the "
                    "tables and findings, and write results.md, results.json and plots to a new "
                    f"folder. Takes {TIMES}. Needs the Debian package dataset-fashion-mnist "
                    "or the four Fashion-MNIST IDX files in the directory named by the "
                    "environment variable SIGMADECOMP_FASHION_MNIST; without them, prints the "
                    "command that installs the package and exits with status 3.")
    add_demo_options(d)
    d.set_defaults(func=_cmd_demo)

    c = sub.add_parser(
        "compress", help="compress a saved model with calibration images",
        description="Compress a saved model (a pickled torch.nn.Module, saved with "
                    "torch.save(model, path)). Input statistics of the chosen layers are "
                    "collected on calibration images (an image folder or IDX files) or read "
                    "from a statistics file, the layers are replaced by factorized ones (SVD, "
                    "Tucker-2, CP or Tensor-Train), and the compressed model and its report "
                    "(JSON and a text table) are written. Load the result with "
                    "torch.load(OUT, weights_only=False) where sigmadecomp_torch is installed, "
                    "or write a self-contained TorchScript file with --torchscript.",
        epilog=EXIT_STATUS)
    c.add_argument("model", metavar="MODEL",
                   help="the model file: a pickled nn.Module (torch.save(model, path)); a "
                        "TorchScript file is recognised and refused with an explanation")
    c.add_argument("--data", metavar="DIR",
                   help="calibration images: a folder of image files (flat or one sub-folder "
                        "per class), a directory with IDX files (MNIST layout, the training "
                        "split is preferred), or one IDX image file")
    c.add_argument("--method", required=True, choices=["tucker2", "cp", "svd", "tt"],
                   help="format of the k x k convolutions (required): tucker2, cp, svd, or tt "
                        "(Tensor-Train, which tensorizes 1x1 convs and Linear layers too; with "
                        "the others those use the SVD)")
    r = c.add_mutually_exclusive_group()
    r.add_argument("--ratio", type=float, metavar="RX",
                   help="per-layer compression ratio rX = weights(original) / "
                        "weights(factorized), > 1 (biases, kept as they are, are not counted); "
                        "a warning names layers that cannot reach it. Without --ratio and "
                        "--budget, EVBMF estimates the ranks (no size target; not for --method tt)")
    r.add_argument("--budget", type=float,
                   help="total weight parameters of the compressed layers after compression "
                        "(biases not counted): a whole count, or a fraction in (0, 1) of their "
                        "original total; "
                        "ranks are allocated across layers by their error curves (tucker2, "
                        "cp and svd; not --method tt)")
    c.add_argument("--transfer-stats", metavar="FILE",
                   help="use statistics saved by --save-stats / save_covariances (e.g. from "
                        "another dataset) instead of collecting them from --data (not with "
                        "--frobenius, which uses none)")
    c.add_argument("--save-stats", metavar="FILE",
                   help="also save the collected statistics for reuse: a name ending in "
                        ".safetensors (safetensors), or in .pt or .pth or without suffix (a "
                        "torch.save file)")
    c.add_argument("--out", required=True, metavar="OUT",
                   help="where to write the compressed model (torch.save of the module; load "
                        "with torch.load(OUT, weights_only=False)); the report goes to OUT's "
                        "stem + .report.json and .report.txt (none of them inside a --data "
                        "image folder)")
    c.add_argument("--layers", default="auto",
                   help="comma-separated module names to compress; 'auto' (default) = every "
                        "Conv2d and Linear but the first and the last (the classifier), as "
                        "compress() does; 'all' = every Conv2d and Linear")
    c.add_argument("--include-first", action="store_true",
                   help="with --layers auto, also compress the first layer")
    c.add_argument("--centered", action="store_true",
                   help="decompose in the centered covariance and correct the biases: each "
                        "layer's expected squared output error is then at most plain Sigma's "
                        "(at the optimum); accuracy may still differ either way by a little")
    c.add_argument("--frobenius", action="store_true",
                   help="classical weight-space decompositions, no statistics (data-free)")
    c.add_argument("--sequential", action="store_true",
                   help="error-compensating sequential compression: each layer fitted, in "
                        "network order, to the original layer's output on the inputs it gets "
                        "once the layers before it are compressed (needs --data; several "
                        "passes over the images)")
    c.add_argument("--refit", metavar="LAYERS", default=None,
                   help="refit the layers left dense after the compressed ones (the "
                        "classifier, say) to the original outputs on the compressed model's "
                        "inputs: 'all' or comma-separated module names (needs --data)")
    g = c.add_argument_group("calibration images", "options of the images read from "
                             "--data (refused without --data)")
    g.add_argument("--calib-images", type=positive_int, default=None, metavar="N",
                   help="number of calibration images, a seeded random subset (default: 1024)")
    g.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="batch size for the statistics collected from --data (default: 64)")
    g.add_argument("--image-size", type=positive_int, default=None, metavar="SIZE",
                   help="resize images of a folder to SIZE x SIZE (default: keep; all images "
                        "must then have the same size)")
    g.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="image channels (default: the in_channels of the model's first conv)")
    g.add_argument("--normalize", metavar="MEAN,STD", default=None,
                   help="normalise calibration images in [0, 1] as (x - mean) / std before the "
                        "model, e.g. 0.485,0.456,0.406,0.229,0.224,0.225 for ImageNet models "
                        "(default: feed [0, 1] images unchanged)")
    g.add_argument("--seed", type=_non_negative_int, default=None,
                   help="seed of the calibration subset (default: 0)")
    c.add_argument("--n-iter", type=positive_int, default=None, metavar="N",
                   help="maximum ALS sweeps per layer of tucker2, cp and tt (default: the "
                        "decomposition's default)")
    c.add_argument("--min-speedup", type=float, default=None, metavar="X",
                   help="keep a layer dense unless its factorized form runs at least X times "
                        "faster (1: only if not slower), each layer timed dense and "
                        "factorized at the input size the images of --data give it (needs "
                        "--data); the report lists the times")
    c.add_argument("--latency-batch", type=positive_int, default=None, metavar="N",
                   help="with --min-speedup: the batch size the layers are timed at "
                        "(default: 1, single-image inference)")
    c.add_argument("--cp-inner", choices=("exact", "adaptive"), default=None,
                   help="CP's inner solves: 'exact' (default; each ALS block solved to its "
                        "minimiser) or 'adaptive' (a few CG iterations, more when progress "
                        "stalls: far faster on large layers, e.g. with --n-iter 10); "
                        "Sigma-weighted CP only")
    c.add_argument("--torchscript", action="store_true",
                   help="also write a self-contained TorchScript version (OUT's stem + "
                        ".torchscript.pt; load with torch.jit.load)")
    c.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_cmd_compress)
    return p


def main(argv=None):
    """Entry point of the ``sigmadecomp`` console script; returns the exit status.

    A mistake of the user raises ``SystemExit`` with a one-line message: a refused
    command line (:class:`UserError`) prints it and exits with status 2, as argparse's
    usage errors; a failed run (:class:`RunError`) and a missing torch exit with status 1.
    """
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # (restores showwarning; the filters stay the caller's)
            warnings.showwarning = _warning_printer(_cli_words if args.command == "compress"
                                                    else str)
            return args.func(args)
    except UserError as exc:
        # one plain line: no terminal escape codes (as in some of torch's messages passed
        # on) and no line breaks
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc))
        text = " ".join(part.strip() for part in text.splitlines() if part.strip())
        stop = SystemExit(f"sigmadecomp {args.command}: error: {text}")
        if exc.status != 1:  # (Python prints the message of a SystemExit with status 1 only)
            print(stop.code, file=sys.stderr)
            stop.code = exc.status
        raise stop from None
    except ModuleNotFoundError as exc:
        if exc.name == "torch" or (exc.name or "").startswith("torch."):
            raise SystemExit(f"sigmadecomp {args.command}: error: {TORCH_HINT}") from None
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
