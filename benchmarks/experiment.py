"""The end-to-end experiment: compress a trained CNN on Fashion-MNIST without fine-tuning.

    python -m benchmarks.experiment            # default grid, about 10 minutes on 2 cores
    python -m benchmarks.experiment --quick    # a small subset (one rX), a check that everything runs
    python -m benchmarks.experiment --full     # the whole grid (slow)

(``sigmadecomp demo [--full]`` runs the same.) Steps:

1. Load the committed reference network (``benchmarks/weights``, trained by
   ``python -m benchmarks.train_reference``) and Fashion-MNIST (Debian package
   ``dataset-fashion-mnist``).
2. Input statistics (Sigma, mean) of every 3x3 conv from a calibration subset
   of the *training* set; for the transfer setting from scikit-learn's digits
   (resized to 28x28); for the data-free setting from synthetic smooth images.
3. Compress every 3x3 conv but the first with Tucker-2 and CP at several
   per-layer compression ratios rX, each with the Frobenius algorithm, the
   Sigma algorithm, and Sigma with the centered covariance and bias
   correction; test accuracy **without fine-tuning**.
4. Baselines and combinations: Frobenius followed by a short fine-tuning;
   int8 per-channel weight quantization of the factorized layers (model size
   in bytes); budget-allocated ranks against uniform rX; Tensor-Train when
   available.
5. Parameters, multiply-adds, CPU latency (``torch.utils.benchmark``, median,
   batch 1 and 64) of the original and of every compressed shape, and the
   decomposition seconds.

Writes ``notes/results.md`` (tables), ``notes/results.json`` (raw rows),
``notes/accuracy_vs_rx_<method>.png`` and ``notes/results_als_convergence.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import NOTES_DIR
from benchmarks.train_reference import INFO_FILE, WEIGHTS_FILE, augment, evaluate, load_reference
from sigmadecomp.datasets import DatasetNotFoundError
from sigmadecomp_torch.data import digits, fashion_mnist, make_loader, synthetic_images
from sigmadecomp_torch.cli import add_demo_options
from sigmadecomp_torch.models import conv3x3_names, count_parameters
from sigmadecomp_torch.quantize import model_size_bytes, quantize_weights, quantized_state_dict

# ----------------------------------------------------------------- configs

VARIANTS = {
    # name: (use statistics, centered + bias correction)
    "frobenius": (False, False),
    "sigma": (True, False),
    "sigma-centered": (True, True),
}
LABELS = {
    "frobenius": "Frobenius",
    "sigma": "Sigma",
    "sigma-centered": "Sigma centered + bias corr.",
    "frobenius+ft": "Frobenius + fine-tune",
    "transfer:sigma": "Sigma from digits (transfer)",
    "transfer:sigma-centered": "Sigma centered from digits (transfer)",
    "datafree:sigma": "Sigma from synthetic inputs (data-free)",
    "datafree:sigma-centered": "Sigma centered from synthetic inputs (data-free)",
    "budget:sigma-centered": "Sigma centered, budget-allocated ranks",
    "int8:sigma-centered": "Sigma centered + int8 weights",
}

CONFIGS = {
    "quick": dict(
        calib_images=256, test_images=1000, digits_images=512, rx=(3,), methods=("tucker2", "cp"),
        variants=("frobenius", "sigma", "sigma-centered"),
        transfer_rx=(3,), transfer_variants=("sigma", "sigma-centered"),
        datafree_rx=(3,), datafree_variants=("sigma-centered",),
        finetune_rx=(3,), finetune_steps=20, quant_rx=(3,), budget_rx=(3,),
        tt_rx=(), tt_variants=("frobenius", "sigma-centered"),
        latency=True, latency_seconds=0.05, latency_rounds=2, convergence=True, convergence_iter=10,
        options={"n_iter_max": 5},
    ),
    "default": dict(
        calib_images=2048, test_images=10000, digits_images=None, rx=(2, 3, 4, 6, 8),
        methods=("tucker2", "cp"),
        variants=("frobenius", "sigma", "sigma-centered"),
        transfer_rx=(2, 3, 4, 6, 8), transfer_variants=("sigma", "sigma-centered"),
        datafree_rx=(3, 6), datafree_variants=("sigma-centered",),
        finetune_rx=(2, 3, 4, 6, 8), finetune_steps=100, quant_rx=(2, 3, 4, 6, 8),
        budget_rx=(3,), tt_rx=(3, 6), tt_variants=("frobenius", "sigma"),
        latency=True, latency_seconds=0.2, latency_rounds=3, convergence=True, convergence_iter=30,
        options={"n_iter_max": 10},
    ),
    "full": dict(
        calib_images=8192, test_images=10000, digits_images=None,
        rx=(1.5, 2, 3, 4, 6, 8, 12, 16),
        methods=("tucker2", "cp"), variants=("frobenius", "sigma", "sigma-centered"),
        transfer_rx=(1.5, 2, 3, 4, 6, 8, 12, 16), transfer_variants=("sigma", "sigma-centered"),
        datafree_rx=(1.5, 2, 3, 4, 6, 8, 12, 16), datafree_variants=("sigma", "sigma-centered"),
        finetune_rx=(1.5, 2, 3, 4, 6, 8, 12, 16), finetune_steps=300,
        quant_rx=(1.5, 2, 3, 4, 6, 8, 12, 16), budget_rx=(2, 3, 4, 6, 8), tt_rx=(2, 3, 4, 6),
        tt_variants=("frobenius", "sigma", "sigma-centered"),
        latency=True, latency_seconds=1.0, latency_rounds=5, convergence=True, convergence_iter=100,
        options={"n_iter_max": 50},
    ),
}


def make_config(mode="default", **overrides):
    """The settings of a run: one of :data:`CONFIGS` with keys overridden."""
    if mode not in CONFIGS:
        raise ValueError(f"mode={mode!r} is not allowed; mode must be one of {sorted(CONFIGS)}")
    cfg = copy.deepcopy(CONFIGS[mode])
    unknown = set(overrides) - set(cfg) - {"layers", "weights", "seed", "threads"}
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; allowed: {sorted(cfg)}")
    cfg.update(overrides)
    cfg["mode"] = mode
    cfg.setdefault("layers", None)
    cfg.setdefault("weights", WEIGHTS_FILE)
    cfg.setdefault("seed", 0)
    cfg.setdefault("threads", None)
    return cfg


# ------------------------------------------------------------ measurements


def count_macs(model, input_shape):
    """Multiply-adds of one forward pass per sample (Conv / Linear layers), by hooks.

    A model holding parameters outside ``Conv2d`` / ``Linear`` / normalisation
    modules (e.g. Tensor-Train cores contracted by batched matrix products) is
    counted with torch's ``FlopCounterMode`` instead (its matrix-product and
    convolution FLOPs / 2), which sees those contractions.
    """
    counted = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm)
    for m in model.modules():
        if not isinstance(m, counted) and any(True for _ in m.parameters(recurse=False)):
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with torch.inference_mode(), counter:
                model.eval()(torch.zeros((1,) + tuple(input_shape)))
            return int(counter.get_total_flops()) // 2
    total = [0]

    def hook(module, args, out):
        if isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total[0] += out[0].numel() * k
        elif isinstance(module, nn.Linear):
            total[0] += out[0].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros((1,) + tuple(input_shape)))
    finally:
        for h in handles:
            h.remove()
    return int(total[0])


def measure_latency(model, batch, *, min_run_time=0.3, shape=(1, 28, 28)):
    """Median seconds of one forward pass (``torch.utils.benchmark``, inference mode)."""
    import torch.utils.benchmark as benchmark

    x = torch.rand((batch,) + tuple(shape))
    model.eval()
    with torch.inference_mode():
        model(x)  # warm-up
        timer = benchmark.Timer(
            stmt="model(x)", globals={"model": model, "x": x},
            num_threads=torch.get_num_threads(),
            setup="import torch; torch.set_grad_enabled(False)",
        )
        m = timer.blocked_autorange(min_run_time=min_run_time)
    return float(m.median)


def finetune(model, x_train, y_train, *, steps, batch_size=128, lr=0.01, seed=0):
    """Short fine-tuning (SGD + momentum, cosine decay, the training augmentation)."""
    model = copy.deepcopy(model)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


# ------------------------------------------------------------------ the run


def _progress(total, enabled, desc):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=True, file=sys.stderr)


def _rx_label(rx):
    return f"{rx:g}"


def _task_list(cfg, have_tt, have_budget):
    tasks = []
    for method in cfg["methods"]:
        for rx in cfg["rx"]:
            for v in cfg["variants"]:
                tasks.append(("main", method, v, rx))
        for rx in cfg["finetune_rx"]:
            tasks.append(("finetune", method, "frobenius+ft", rx))
        for rx in cfg["transfer_rx"]:
            tasks += [("transfer", method, f"transfer:{v}", rx) for v in cfg["transfer_variants"]]
        for rx in cfg["datafree_rx"]:
            tasks += [("datafree", method, f"datafree:{v}", rx) for v in cfg["datafree_variants"]]
        for rx in cfg["quant_rx"]:
            tasks.append(("quant", method, "int8:sigma-centered", rx))
        if have_budget:
            for rx in cfg["budget_rx"]:
                tasks.append(("budget", method, "budget:sigma-centered", rx))
    if have_tt:
        for rx in cfg["tt_rx"]:
            for v in cfg["tt_variants"]:
                tasks.append(("main", "tt", v, rx))
    return tasks


def _tt_available():
    try:
        from sigmadecomp_torch.compress import LAYER_METHODS
    except ImportError:  # pragma: no cover
        return False
    return "tt" in LAYER_METHODS


def run(cfg, *, out_dir=NOTES_DIR, progress=True, log=print, write=True):
    """Run the experiment described by ``cfg`` (see :func:`make_config`).

    Returns
    -------
    results : dict
        JSON-serialisable: ``config``, ``reference``, ``rows`` (one dict per
        evaluated model), ``shapes`` (params / MACs / latency per compressed
        shape), ``convergence``, ``targets``, ``seconds``.
    """
    from sigmadecomp_torch.compress import compress
    from sigmadecomp_torch.covariance import collect_covariances

    t_run = time.perf_counter()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    model = load_reference(cfg["weights"])
    names = cfg["layers"] or conv3x3_names(model, skip_first=True)
    seed = cfg["seed"]

    # ---- data
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test", limit=cfg["test_images"], seed=seed + 1)
    perm = np.random.default_rng(seed).permutation(len(x_train))[: cfg["calib_images"]]
    x_cal = x_train[torch.as_tensor(np.sort(perm))]
    x_dig, _ = digits(limit=cfg["digits_images"], seed=seed)
    x_syn = synthetic_images(cfg["calib_images"], seed=seed + 2)

    timings = {}
    t0 = time.perf_counter()
    base_acc = evaluate(model, x_test, y_test)
    timings["evaluate_original"] = time.perf_counter() - t0
    log(f"reference model: {count_parameters(model)} parameters, test accuracy "
        f"{base_acc:.4f} on {len(x_test)} test images")

    have_tt = _tt_available() and bool(cfg["tt_rx"])
    # Tensor-Train rows compress the convs and the final Linear layer (TT-FC)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    tt_names = names + [n for n in linear_names if n not in names]
    stat_names = tt_names if have_tt else names

    # ---- statistics
    stats = {}
    for key, x in (("fmnist", x_cal), ("digits", x_dig), ("synthetic", x_syn)):
        t0 = time.perf_counter()
        stats[key] = collect_covariances(model, make_loader(x, batch_size=256), layers=stat_names,
                                         progress=progress)
        timings[f"statistics_{key}"] = time.perf_counter() - t0
    log(f"statistics of {len(names)} layers from {len(x_cal)} Fashion-MNIST training images, "
        f"{len(x_dig)} digits, {len(x_syn)} synthetic images "
        f"({sum(timings[k] for k in timings if k.startswith('statistics')):.1f} s)")

    have_budget = bool(cfg["budget_rx"])
    tasks = _task_list(cfg, have_tt, have_budget)
    bar = _progress(len(tasks), progress, "experiment")

    rows, shapes, built = [], {}, {}
    orig_params = count_parameters(model)
    orig_macs = count_macs(model, (1, 28, 28))
    shapes["original"] = {"method": "original", "rx": None, "params": orig_params,
                          "macs": orig_macs}

    def do_compress(method, variant_key, rx, source="fmnist", budget=None):
        use_stats, centered = VARIANTS[variant_key]
        kw = dict(layers=tt_names if method == "tt" else names, progress=False, centered=centered,
                  covariances=stats[source] if use_stats else None,
                  options=dict(cfg["options"], rng=seed) if method in ("tucker2", "cp") else None)
        if budget is None:
            kw["ratio"] = rx
        else:
            kw["budget"] = budget
        t0 = time.perf_counter()
        cmodel, report = compress(model, method, **kw)
        return cmodel, report, time.perf_counter() - t0

    def record(kind, method, variant, rx, cmodel, report, seconds, **extra):
        t0 = time.perf_counter()
        with torch.inference_mode():
            acc = evaluate(cmodel, x_test, y_test, batch_size=250)
        row = {
            "kind": kind, "method": method, "variant": variant, "rx_target": rx,
            "accuracy": acc, "accuracy_drop": base_acc - acc,
            "params": count_parameters(cmodel), "model_rx": orig_params / count_parameters(cmodel),
            "layer_rx": report.layer_ratio if report is not None else None,
            "decomposition_seconds": seconds, "eval_seconds": time.perf_counter() - t0,
        }
        if report is not None:
            row["ranks"] = {r["name"]: (list(r["ranks"]) if isinstance(r["ranks"], tuple)
                                        else r["ranks"]) for r in report.layers}
            row["sigma_errors"] = {r["name"]: r["sigma_error"] for r in report.layers}
            row["frobenius_errors"] = {r["name"]: r["frobenius_error"] for r in report.layers}
            row["n_iter"] = {r["name"]: r["n_iter"] for r in report.layers}
        row.update(extra)
        rows.append(row)
        return row

    for kind, method, variant, rx in tasks:
        if bar is not None:
            bar.set_postfix_str(f"{method} {variant} rX={rx:g}")
        if kind == "main":
            cmodel, report, sec = do_compress(method, variant, rx)
            built[(method, variant, rx)] = (cmodel, report, sec)
            record(kind, method, variant, rx, cmodel, report, sec)
            key = f"{method}@{_rx_label(rx)}"
            if key not in shapes:
                shapes[key] = {"method": method, "rx": rx, "params": count_parameters(cmodel),
                               "macs": count_macs(cmodel, (1, 28, 28)), "model": cmodel}
        elif kind == "finetune":
            if (method, "frobenius", rx) in built:
                cmodel, report, sec = built[(method, "frobenius", rx)]
            else:
                cmodel, report, sec = do_compress(method, "frobenius", rx)
            t0 = time.perf_counter()
            tuned = finetune(cmodel, x_train, y_train, steps=cfg["finetune_steps"], seed=seed)
            record(kind, method, variant, rx, tuned, report, sec,
                   finetune_steps=cfg["finetune_steps"], finetune_seconds=time.perf_counter() - t0)
        elif kind in ("transfer", "datafree"):
            source = "digits" if kind == "transfer" else "synthetic"
            cmodel, report, sec = do_compress(method, variant.split(":")[1], rx, source=source)
            record(kind, method, variant, rx, cmodel, report, sec, statistics=source)
        elif kind == "quant":
            if (method, "sigma-centered", rx) in built:
                cmodel, report, sec = built[(method, "sigma-centered", rx)]
            else:
                cmodel, report, sec = do_compress(method, "sigma-centered", rx)
            factorized = [r["name"] for r in report.layers]
            qmodel, qw = quantize_weights(cmodel, layers=factorized)
            record(kind, method, variant, rx, qmodel, report, sec,
                   size_bytes_float=model_size_bytes(cmodel),
                   size_bytes=model_size_bytes(quantized_state_dict(qmodel, qw)),
                   max_abs_weight_error=max(qw.max_abs_error.values()))
        elif kind == "budget":
            try:
                cmodel, report, sec = do_compress(method, "sigma-centered", rx, budget=1.0 / rx)
            except Exception as exc:  # rank allocation may be unavailable or fail
                log(f"budget allocation failed for {method} rX={rx}: {exc}")
                rows.append({"kind": kind, "method": method, "variant": variant, "rx_target": rx,
                             "accuracy": None, "error": str(exc)})
            else:
                record(kind, method, variant, rx, cmodel, report, sec, budget_fraction=1.0 / rx)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    # ---- int8 of the original (size reference)
    q_orig, qw_orig = quantize_weights(model, layers=names)
    q_orig_acc = evaluate(q_orig, x_test, y_test)
    size = {"original_bytes": model_size_bytes(model),
            "original_int8_bytes": model_size_bytes(quantized_state_dict(q_orig, qw_orig)),
            "original_int8_accuracy": q_orig_acc}

    # ---- latency
    if cfg["latency"]:
        # round-robin over the models, several rounds: a drifting background load
        # then hits the original and the compressed models alike; speed-ups are
        # medians of per-round ratios against the original of the same round
        items = list(shapes.items())
        rounds = int(cfg.get("latency_rounds", 3))
        times = {key: {1: [], 64: []} for key, _ in items}
        bar = _progress(rounds * len(items), progress, "latency")
        for _ in range(rounds):
            for key, sh in items:
                m = model if key == "original" else sh["model"]
                for b in (1, 64):
                    times[key][b].append(
                        1e3 * measure_latency(m, b, min_run_time=cfg["latency_seconds"]))
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        for key, sh in items:
            for b in (1, 64):
                sh[f"latency_b{b}_ms"] = float(np.median(times[key][b]))
                sh[f"speedup_b{b}"] = float(np.median(
                    np.array(times["original"][b]) / np.array(times[key][b])))
                sh[f"latency_b{b}_runs_ms"] = times[key][b]
    for sh in shapes.values():
        sh.pop("model", None)
        sh["macs_ratio"] = orig_macs / sh["macs"] if sh["macs"] else None
        sh["params_ratio"] = orig_params / sh["params"]

    # ---- ALS convergence on the largest layer
    convergence = _convergence(model, stats["fmnist"], names, cfg) if cfg["convergence"] else {}

    results = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()
                   if k != "weights"},
        "reference": {"accuracy": base_acc, "params": orig_params, "macs": orig_macs,
                      "test_images": len(x_test), "calibration_images": len(x_cal),
                      "digits_images": len(x_dig), "synthetic_images": len(x_syn),
                      "layers": names, "info": _reference_info()},
        "rows": rows,
        "shapes": shapes,
        "size": size,
        "convergence": convergence,
        "timings": timings,
        "environment": {"torch": torch.__version__, "numpy": np.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine(),
                        "python": platform.python_version()},
    }
    results["targets"] = check_targets(results)
    results["seconds"] = time.perf_counter() - t_run
    if write:
        write_outputs(results, out_dir)
    return results


def _reference_info():
    try:
        with open(INFO_FILE) as f:
            info = json.load(f)
    except OSError:
        return {}
    return {k: info[k] for k in ("test_accuracy", "parameters", "settings", "train_seconds")
            if k in info}


def _convergence(model, stats, names, cfg):
    """Error histories of Tucker-2 / CP ALS (Frobenius and Sigma) on the largest layer."""
    from sigmadecomp.cp import cp
    from sigmadecomp.ranks import ratio_to_ranks
    from sigmadecomp.tucker2 import tucker2

    modules = dict(model.named_modules())
    name = max(names, key=lambda n: modules[n].weight.numel())
    W = modules[name].weight.detach().to(torch.float64)
    sigma = stats[name].sigma.to(torch.float64)
    rx = 3 if 3 in cfg["rx"] else cfg["rx"][0]
    n_iter = int(cfg.get("convergence_iter", 30))
    out = {"layer": name, "rx": rx, "shape": list(W.shape)}
    for method in cfg["methods"]:
        r = ratio_to_ranks(tuple(W.shape), method, rx)
        fn = tucker2 if method == "tucker2" else cp
        ranks = tuple(int(v) for v in r) if isinstance(r, (tuple, list)) else int(r)
        hist = {}
        for label, sig in (("frobenius", None), ("sigma", sigma)):
            t0 = time.perf_counter()
            res = fn(W, ranks, sig, n_iter_max=n_iter, tol=0.0, rng=cfg["seed"])
            hist[label] = {"errors": [float(e) for e in res.errors], "n_iter": int(res.n_iter),
                           "seconds": time.perf_counter() - t0,
                           "sigma_error": _rel_sigma_error(W, res.to_tensor(), sigma)}
        out[method] = {"ranks": list(ranks) if isinstance(ranks, tuple) else ranks, **hist}
    return out


def _rel_sigma_error(W, approx, sigma):
    from sigmadecomp.sigma import relative_sigma_error

    return float(relative_sigma_error(W.reshape(W.shape[0], -1),
                                      torch.as_tensor(approx).reshape(W.shape[0], -1), sigma))


# ------------------------------------------------------------------ targets


def _acc(rows, kind, method, variant, rx):
    for r in rows:
        if (r["kind"], r["method"], r["variant"], r["rx_target"]) == (kind, method, variant, rx):
            return r["accuracy"]
    return None


def check_targets(results):
    """The issue's targets, each with ``passed`` (True/False/None if not measured) and figures."""
    rows, base = results["rows"], results["reference"]["accuracy"]
    cfg = results["config"]
    out = []
    for method in cfg["methods"]:
        for rx in cfg["rx"]:
            f = _acc(rows, "main", method, "frobenius", rx)
            s = _acc(rows, "main", method, "sigma", rx)
            sc = _acc(rows, "main", method, "sigma-centered", rx)
            if f is not None and s is not None:
                out.append({"target": "Sigma beats Frobenius (no fine-tuning)", "method": method,
                            "rx": rx, "passed": s > f, "figures": {"sigma": s, "frobenius": f}})
            if rx <= 3 and s is not None:
                out.append({"target": "Sigma within 1 point of the original", "method": method,
                            "rx": rx, "passed": base - s <= 0.01,
                            "figures": {"sigma": s, "original": base}})
                ft = _acc(rows, "finetune", method, "frobenius+ft", rx)
                if ft is not None:
                    out.append({"target": "Sigma >= Frobenius + fine-tune", "method": method,
                                "rx": rx, "passed": s >= ft,
                                "figures": {"sigma": s, "frobenius+ft": ft}})
            if s is not None and sc is not None:
                out.append({"target": "bias correction never worse than plain Sigma",
                            "method": method, "rx": rx, "passed": sc >= s,
                            "figures": {"sigma-centered": sc, "sigma": s}})
            ts = _acc(rows, "transfer", method, "transfer:sigma", rx)
            tsc = _acc(rows, "transfer", method, "transfer:sigma-centered", rx)
            if ts is not None and f is not None and s is not None:
                gain, kept = s - f, ts - f
                out.append({"target": "transfer keeps most of the Sigma gain", "method": method,
                            "rx": rx, "passed": (kept >= 0.5 * gain) if gain > 0 else kept >= gain,
                            "figures": {"transfer_sigma": ts, "sigma": s, "frobenius": f,
                                        "share_of_gain_kept": kept / gain if gain > 0 else None}})
            if ts is not None and tsc is not None:
                out.append({"target": "bias correction never worse than plain Sigma (transfer)",
                            "method": method, "rx": rx, "passed": tsc >= ts,
                            "figures": {"transfer_sigma-centered": tsc, "transfer_sigma": ts}})
    return out


# ------------------------------------------------------------------ outputs


def _fmt_acc(a):
    return "-" if a is None else f"{100 * a:.2f}"


def results_table(results):
    """Markdown table: accuracy (%) per method x variant (rows) and rX (columns)."""
    rows, cfg = results["rows"], results["config"]
    rxs = sorted({r["rx_target"] for r in rows if r.get("rx_target") is not None})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    order = ["frobenius", "sigma", "sigma-centered", "frobenius+ft", "transfer:sigma",
             "transfer:sigma-centered", "datafree:sigma", "datafree:sigma-centered",
             "budget:sigma-centered", "int8:sigma-centered"]
    head = "| method | variant | " + " | ".join(f"rX={_rx_label(x)}" for x in rxs) + " |"
    lines = [head, "|" + "---|" * (2 + len(rxs))]
    for method in methods:
        for v in order:
            cells = []
            found = False
            for rx in rxs:
                acc = next((r["accuracy"] for r in rows if r["method"] == method
                            and r["variant"] == v and r["rx_target"] == rx), None)
                found |= acc is not None
                cells.append(_fmt_acc(acc))
            if found:
                lines.append(f"| {method} | {LABELS.get(v, v)} | " + " | ".join(cells) + " |")
    del cfg
    return "\n".join(lines)


def shapes_table(results):
    """Markdown table of parameters, multiply-adds, latency and decomposition time per shape."""
    shapes, rows = results["shapes"], results["rows"]
    lines = ["| model | params | params rX | MACs | MACs ratio | latency b=1 (ms) | speed-up b=1 "
             "| latency b=64 (ms) | speed-up b=64 | decomposition s (Frob / Sigma / centered) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, sh in shapes.items():
        secs = []
        for v in ("frobenius", "sigma", "sigma-centered"):
            s = next((r["decomposition_seconds"] for r in rows if r["kind"] == "main"
                      and r["method"] == sh["method"] and r["variant"] == v
                      and r["rx_target"] == sh["rx"]), None)
            secs.append("-" if s is None else f"{s:.1f}")
        lat = [sh.get(k) for k in ("latency_b1_ms", "speedup_b1", "latency_b64_ms", "speedup_b64")]
        lat = ["-" if v is None else (f"{v:.3f}" if i % 2 == 0 else f"{v:.2f}x")
               for i, v in enumerate(lat)]
        macs = "n/a" if sh["macs"] is None else f"{sh['macs']:,}"
        macs_ratio = "n/a" if sh["macs_ratio"] is None else f"{sh['macs_ratio']:.2f}"
        lines.append(f"| {key} | {sh['params']:,} | {sh['params_ratio']:.2f} | {macs} | "
                     f"{macs_ratio} | " + " | ".join(lat) + " | "
                     + ("-" if key == "original" else " / ".join(secs)) + " |")
    return "\n".join(lines)


def quant_table(results):
    rows = [r for r in results["rows"] if r["kind"] == "quant"]
    if not rows:
        return ""
    size = results["size"]
    lines = ["| model | accuracy (%) | size (bytes) | vs original float |", "|---|---|---|---|",
             f"| original float32 | {_fmt_acc(results['reference']['accuracy'])} | "
             f"{size['original_bytes']:,} | 1.00x |",
             f"| original, int8 weights of the compressed convs | "
             f"{_fmt_acc(size['original_int8_accuracy'])} | {size['original_int8_bytes']:,} | "
             f"{size['original_bytes'] / size['original_int8_bytes']:.2f}x |"]
    for r in rows:
        f = _acc(results["rows"], "main", r["method"], "sigma-centered", r["rx_target"])
        lines.append(f"| {r['method']} rX={_rx_label(r['rx_target'])} Sigma centered, float32 | "
                     f"{_fmt_acc(f)} | {r['size_bytes_float']:,} | "
                     f"{size['original_bytes'] / r['size_bytes_float']:.2f}x |")
        lines.append(f"| {r['method']} rX={_rx_label(r['rx_target'])} Sigma centered + int8 | "
                     f"{_fmt_acc(r['accuracy'])} | {r['size_bytes']:,} | "
                     f"{size['original_bytes'] / r['size_bytes']:.2f}x |")
    return "\n".join(lines)


def _fmt_share(v):
    return "-" if v is None else f"{100 * v:.0f}%"


def targets_text(results):
    met = sum(t["passed"] is True for t in results["targets"])
    lines = [f"{met} of {len(results['targets'])} checks met.", ""] if results["targets"] else []
    for t in results["targets"]:
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["passed"]]
        figs = ", ".join(f"{k} {_fmt_share(v) if k == 'share_of_gain_kept' else _fmt_acc(v)}"
                         for k, v in t["figures"].items())
        lines.append(f"- {mark}: {t['target']} — {t['method']} rX={_rx_label(t['rx'])} ({figs})")
    return "\n".join(lines)


def write_outputs(results, out_dir):
    """notes/results.md, notes/results.json and the PNG plots."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
        f.write("\n")
    plots = write_plots(results, out_dir)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results, plots))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def markdown(results, plots=()):
    ref, cfg = results["reference"], results["config"]
    mode = cfg["mode"]
    cmd = "python -m benchmarks.experiment" + ("" if mode == "default" else f" --{mode}")
    info = ref.get("info", {})
    parts = [
        "# End-to-end results: compression without fine-tuning on Fashion-MNIST",
        "",
        f"Produced by `{cmd}` (mode `{mode}`, {results['seconds']:.0f} s on "
        f"{results['environment']['threads']} CPU threads, torch {results['environment']['torch']}).",
        "",
        f"Reference network: `ResNetSmall` ({ref['params']:,} parameters, {ref['macs']:,} "
        f"multiply-adds per image), committed weights trained by "
        f"`python -m benchmarks.train_reference` (test accuracy "
        f"{_fmt_acc(info.get('test_accuracy'))}% on the full test set). Compressed layers: "
        f"{', '.join(ref['layers'])} (all 3x3 convs but the first; the Tensor-Train (`tt`) rows "
        "also tensorize the final Linear layer, TT-FC). Accuracy on "
        f"{ref['test_images']} test images; original accuracy on them: "
        f"**{_fmt_acc(ref['accuracy'])}%**.",
        "",
        f"Statistics: {ref['calibration_images']} Fashion-MNIST training images (calibration); "
        f"transfer: all {ref['digits_images']} scikit-learn digits resized to 28x28; data-free: "
        f"{ref['synthetic_images']} synthetic smooth-noise images. rX is the per-layer parameter "
        "compression ratio of the compressed layers; the whole-model ratio is lower (stem, "
        "shortcuts, BatchNorm and, except for TT, the classifier stay dense), see the second "
        "table. Multiply-adds of TT models are counted with torch's FlopCounterMode. "
        f"Frobenius + fine-tune: {cfg['finetune_steps']} SGD steps of batch 128. "
        f"ALS options: {cfg['options']}.",
        "",
        "## Test accuracy (%) without fine-tuning",
        "",
        results_table(results),
        "",
        "## Parameters, multiply-adds, CPU latency, decomposition time",
        "",
        "Latency: median over rounds of `torch.utils.benchmark` (`blocked_autorange`, itself a "
        "median of repeated runs), inference mode, the models measured round-robin; speed-up: "
        "median of the per-round ratios to the original. Decomposition seconds cover all "
        "compressed layers of one model.",
        "",
        shapes_table(results),
        "",
    ]
    q = quant_table(results)
    if q:
        parts += ["## Combination with int8 weight quantization", "",
                  "int8 per-output-channel symmetric weights of the factorized layers (scales from "
                  "torch's `PerChannelMinMaxObserver`, fake-quantized with "
                  "`torch.fake_quantize_per_channel_affine`); size = bytes of the saved state dict "
                  "(int8 codes + float32 scales).", "", q, ""]
    parts += ["## Targets", "", targets_text(results) or "(none measured)", ""]
    conv = results.get("convergence") or {}
    if conv:
        parts += ["## ALS convergence", "",
                  f"Layer `{conv['layer']}` {tuple(conv['shape'])} at rX={_rx_label(conv['rx'])}:"]
        for method in cfg["methods"]:
            if method in conv:
                c = conv[method]
                parts.append(
                    f"- {method} ranks {c['ranks']}: relative Sigma error Frobenius "
                    f"{c['frobenius']['sigma_error']:.4f} ({c['frobenius']['n_iter']} it, "
                    f"{c['frobenius']['seconds']:.1f} s), Sigma {c['sigma']['sigma_error']:.4f} "
                    f"({c['sigma']['n_iter']} it, {c['sigma']['seconds']:.1f} s)")
        parts.append("")
    if plots:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(parts)


def write_plots(results, out_dir):
    """PNG plots; returns their file names (relative to ``out_dir``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return []
    rows, base = results["rows"], results["reference"]["accuracy"]
    files = []
    styles = {"frobenius": ("tab:red", "o-"), "sigma": ("tab:blue", "s-"),
              "sigma-centered": ("tab:green", "^-"), "frobenius+ft": ("tab:red", "o--"),
              "transfer:sigma-centered": ("tab:purple", "v-"),
              "datafree:sigma-centered": ("tab:orange", "d-"),
              "int8:sigma-centered": ("tab:olive", "x:"),
              "budget:sigma-centered": ("tab:cyan", "P-")}
    for method in dict.fromkeys(r["method"] for r in rows):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for v, (color, style) in styles.items():
            pts = sorted((r["rx_target"], r["accuracy"]) for r in rows
                         if r["method"] == method and r["variant"] == v and r["accuracy"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, color=color,
                        label=LABELS[v])
        ax.axhline(100 * base, color="k", lw=0.8, ls=":", label="original")
        ax.set_xlabel("per-layer compression ratio rX")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{method}: accuracy without fine-tuning")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"accuracy_vs_rx_{method}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)
    conv = results.get("convergence") or {}
    methods = [m for m in results["config"]["methods"] if m in conv]
    if methods:
        fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.8), squeeze=False)
        for ax, method in zip(axes[0], methods):
            c = conv[method]
            for label, color in (("frobenius", "tab:red"), ("sigma", "tab:blue")):
                e = c[label]["errors"]
                ax.plot(range(len(e)), e, color=color,
                        label=f"{label} ALS ({'Frobenius' if label == 'frobenius' else 'Sigma'} error)")
            ax.set_yscale("log")
            ax.set_xlabel("sweep")
            ax.set_ylabel("relative error")
            ax.set_title(f"{method} {conv['layer']} rX={_rx_label(conv['rx'])}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        name = "results_als_convergence.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def print_summary(results, out=print):
    out("")
    out(results_table(results))
    out("")
    out(shapes_table(results))
    q = quant_table(results)
    if q:
        out("")
        out(q)
    out("")
    out(targets_text(results))


# --------------------------------------------------------------------- main


def build_parser(parser=None):
    p = parser or argparse.ArgumentParser(
        prog="python -m benchmarks.experiment",
        description="Compress the reference CNN on Fashion-MNIST with Frobenius and Sigma "
                    "decompositions and compare accuracy without fine-tuning.")
    add_demo_options(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    mode = "full" if args.full else "quick" if args.quick else "default"
    cfg = make_config(mode, threads=args.threads)
    if args.out_dir is None:
        args.out_dir = os.path.join(NOTES_DIR, "quick") if mode == "quick" else NOTES_DIR
    os.makedirs(args.out_dir, exist_ok=True)
    try:
        results = run(cfg, out_dir=args.out_dir, progress=not args.no_progress)
    except DatasetNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(results)
    print(f"\nwrote {os.path.join(args.out_dir, 'results.md')} and results.json, plots "
          f"({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
