"""What preparing each layer's Sigma once saves in compress's per-layer steps.

For every layer, :func:`sigmadecomp_torch.compress` runs rank selection, the
decomposition and the report on the layer's Sigma. Given a plain matrix, each
core step validates and symmetrises it again, tests it for positive
semi-definiteness (a shifted Cholesky, or an eigen-decomposition) and, where
it needs one, eigen-decomposes it again: EVBMF ranks and the budget's error
curves whiten with the symmetric root, and the Sigma-SVD of Linear layers and
1x1 convs factors Sigma too. A :class:`sigmadecomp.prepared.PreparedSigma`
does each of these at most once per layer.

Both paths run the same steps, with the same core calls, in the same run:

* ``plain``: rank selection, decomposition and report error with the plain
  float64 Sigma (what compress did before the prepared Sigma);
* ``prepared``: the same calls with a ``PreparedSigma`` made per layer (its
  construction is timed too).

Each case is timed twice: the whole per-layer steps (``--part full``), and
the Sigma steps only (``--part sigma``: rank selection and what each solver
does with ``sigma`` before iterating -- validation, PSD test, factorization
-- without the iterations, which are the same in both paths).

Each path's time is the median of ``--repeats`` runs (default 3); the ranks,
errors and weights of the two paths are compared (they must agree to
rounding). Rank selection modes: ``evbmf``, ``budget`` (error curves and the
allocation over the layers, :func:`sigmadecomp.ranks.allocate_ranks`) and
``ratio``. Formats as compress chooses them: Sigma-SVD for Linear layers and
1x1 convs, ``--method`` (default Tucker-2) for the k x k convs.

Cases:

* ``reference``: the Fashion-MNIST reference ResNet of the demo, every layer
  compress takes by default, statistics from 512 training images;
* ``large``: one 256 x 256 x 3 x 3 conv (``trained_like_kernel``) with a
  2304 x 2304 Sigma of 3x3 patches of 256-channel ReLU features
  (``benchmarks.common.realistic_covariance``), once as a Tucker-2 layer and
  once as a Sigma-SVD layer (``compress(..., 'svd')`` on a k x k conv). The
  whole steps of the large Tucker-2 layer (its sweeps take minutes on one
  shared core, the same in both paths) run only with ``--large-tucker2``.

Run from the repository root (torch at its default threads; ``--threads 1``
pins it to one, steadier on a shared machine)::

    python -m benchmarks.prepared_sigma [--quick] [--part all|sigma|full] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import sigmadecomp._backend as B
from benchmarks.common import check_output_file, positive_int, threads_setting
from sigmadecomp import ranks as R
from sigmadecomp.cp import cp
from sigmadecomp.prepared import PreparedSigma
from sigmadecomp.svd import sigma_svd
from sigmadecomp.tucker2 import tucker2


def _count_eigh(sigmas):
    """Wrap the backend eigh (where every eigen-decomposition of the library runs).

    Counts the calls on one of the layers' Sigmas (equal entries), not the
    solvers' own small systems.
    """
    import torch

    counter = {"n": 0}
    real = B.eigh
    by_shape = {}
    for S in sigmas:  # as given, and as the library symmetrises it
        by_shape.setdefault(tuple(S.shape), []).extend([S, 0.5 * (S + S.T)])

    def eigh(a):
        if any(torch.equal(a, S) for S in by_shape.get(tuple(a.shape), ())):
            counter["n"] += 1
        return real(a)

    B.eigh = eigh
    return counter, real


def _decompose(fmt, W, ranks, sigma, options):
    if fmt == "svd":
        return sigma_svd(W.reshape(W.shape[0], -1), ranks, sigma)
    if fmt == "tucker2":
        return tucker2(W, tuple(ranks), sigma, **options)
    return cp(W, ranks, sigma, **options)


def _sigma_steps_of_solver(fmt, W, sigma):
    """What a solver does with ``sigma`` before iterating (``check_sigma``, ``psd_root``)."""
    from sigmadecomp._validation import check_sigma
    from sigmadecomp.prepared import prepared_or
    from sigmadecomp.sigma import psd_root

    n = W.reshape(W.shape[0], -1).shape[1]
    if fmt == "svd":  # sigma_svd: validate, then factor (the PSD test reads the eigenvalues)
        S = check_sigma(sigma, n, W, psd=False)
        return psd_root(prepared_or(sigma, S))
    return check_sigma(sigma, n, W)  # tucker2 / cp / tt: validate and PSD-test


def run_path(layers, prepared, mode, options, ratio=3.0, budget=0.4, solve=True):
    """One pass of rank selection -> decomposition -> report over ``layers``.

    ``layers``: list of ``(name, W, fmt, S)`` with float64 torch ``W``, ``S``.
    Returns ``(seconds, {name: (ranks, sigma_error, approx)})``. With
    ``solve=False`` the decomposition is replaced by the Sigma work the
    solver does before iterating (and the report by the original weight),
    so only the steps that change between the two paths are timed.
    """
    import torch

    t0 = time.perf_counter()
    sig = {name: (PreparedSigma(S) if prepared else S) for name, _, _, S in layers}
    if mode == "budget":
        specs = {name: R.LayerSpec(W, sig[name]) for name, W, _, _ in layers}
        chosen = R.allocate_ranks(specs, budget, method={n: f for n, _, f, _ in layers})
    out = {}
    for name, W, fmt, S in layers:
        if mode == "budget":
            r = chosen[name]
        elif mode == "evbmf":
            r = R.evbmf_ranks(W, fmt, sig[name])
        else:
            r = R.ratio_to_ranks(tuple(W.shape), fmt, ratio)
        if not solve:
            _sigma_steps_of_solver(fmt, W, sig[name])
            out[name] = (r, 0.0, W)
            continue
        res = _decompose(fmt, W, r, sig[name], options)
        approx = torch.as_tensor(res.to_tensor()).reshape(W.shape)
        # the report: as compress computes it from the matrix (no factorization)
        D = (W - approx).reshape(W.shape[0], -1)
        K = W.reshape(W.shape[0], -1)
        M = sig[name].matrix if prepared else S
        err = float(torch.sqrt(torch.sum((D @ M) * D).clamp_min(0) / torch.sum((K @ M) * K)))
        out[name] = (r, err, approx)
    return time.perf_counter() - t0, out


def compare(label, layers, mode, options, repeats, solve=True):
    counter, real = _count_eigh([S for _, _, _, S in layers])
    try:
        times = {True: [], False: []}
        eighs = {}
        results = {}
        for _ in range(repeats):
            for prepared in (False, True):  # interleaved, so load changes hit both
                counter["n"] = 0
                sec, out = run_path(layers, prepared, mode, options, solve=solve)
                times[prepared].append(sec)
                eighs[prepared] = counter["n"]
                results[prepared] = out
    finally:
        B.eigh = real
    a, b = results[False], results[True]
    same_ranks = all(a[n][0] == b[n][0] for n in a)
    err_diff = max(abs(a[n][1] - b[n][1]) / max(abs(a[n][1]), 1e-300) for n in a)
    w_diff = max(float((a[n][2] - b[n][2]).abs().max() / a[n][2].abs().max().clamp_min(1e-300))
                 for n in a)
    plain, prep = statistics.median(times[False]), statistics.median(times[True])
    return {"case": label + ("" if solve else ", Sigma steps only"), "mode": mode,
            "layers": len(layers), "plain_s": plain,
            "prepared_s": prep, "speedup": plain / prep, "eigh_plain": eighs[False],
            "eigh_prepared": eighs[True], "same_ranks": same_ranks,
            "max_rel_err_diff": err_diff, "max_rel_weight_diff": w_diff,
            "runs_plain": times[False], "runs_prepared": times[True]}


def reference_layers(method, n_images=512):
    import torch

    from sigmadecomp_torch import collect_covariances, default_layers
    from sigmadecomp_torch.compress import layer_method_for
    from sigmadecomp_torch.data import fashion_mnist, make_loader
    from sigmadecomp_torch.demo.reference import load_reference

    model = load_reference()
    x, _ = fashion_mnist("train", limit=n_images, seed=0)
    names = default_layers(model)
    stats = collect_covariances(model, make_loader(x, batch_size=256), layers=names,
                                progress=False)
    out = []
    for name in names:
        mod = model.get_submodule(name)
        out.append((name, mod.weight.detach().to(torch.float64),
                    layer_method_for(mod, method), stats[name].sigma.to(torch.float64)))
    return out


def large_layers(quick):
    import torch

    from benchmarks.common import realistic_covariance, trained_like_kernel

    ch = 64 if quick else 256
    S, _ = realistic_covariance(channels=ch, n_images=16 if quick else 64)
    K = trained_like_kernel(ch, ch)
    W, S = torch.as_tensor(K), torch.as_tensor(S)
    return ch, [("conv", W, "tucker2", S)], [("conv", W, "svd", S)]


def _fmt_rows(rows):
    head = ("| case | rank selection | layers | plain (s) | prepared (s) | ratio | "
            "Sigma eigh plain -> prepared | same ranks | max rel. diff (error, weights) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['layers']} | {r['plain_s']:.3f} | "
            f"{r['prepared_s']:.3f} | {r['speedup']:.2f} | {r['eigh_plain']} -> "
            f"{r['eigh_prepared']} | {'yes' if r['same_ranks'] else 'NO'} | "
            f"{r['max_rel_err_diff']:.1e}, {r['max_rel_weight_diff']:.1e} |")
    return "\n".join(lines)


def main(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (seconds)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=threads_setting, default="default",
                   help="torch CPU threads: 'default' (torch's own choice, the default) or a "
                        "count, e.g. 1 for steadier figures on a shared machine")
    p.add_argument("--method", default="tucker2", choices=["tucker2", "cp"])
    p.add_argument("--n-iter-max", type=positive_int, default=10,
                   help="sweeps of the iterative methods (the same in both paths)")
    p.add_argument("--part", default="all", choices=["all", "sigma", "full"],
                   help="'sigma': only the Sigma steps (no solver iterations); 'full': the "
                        "whole per-layer steps")
    p.add_argument("--large-tucker2", action="store_true",
                   help="also run the whole steps (with sweeps) of the large Tucker-2 layer")
    p.add_argument("--out", default=None, help="write the table (markdown) here")
    args = p.parse_args(argv)
    check_output_file(p, "--out", args.out)
    if args.threads != "default":
        torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads} ({torch.get_num_threads()}); median of "
          f"{1 if args.quick else args.repeats} run(s) per path", flush=True)
    repeats = 1 if args.quick else args.repeats
    options = {"n_iter_max": 3 if args.quick else args.n_iter_max}
    rows = []
    ref = reference_layers(args.method, 128 if args.quick else 512)
    ch, tk, sv = large_layers(args.quick)
    n = ch * 9
    large = ((f"large {ch}x{ch}x3x3 Tucker-2 (n={n})", tk),
             (f"large {ch}x{ch}x3x3 Sigma-SVD (n={n})", sv))
    cases = []
    if args.part in ("all", "sigma"):  # the steps that differ, without the solver iterations
        cases += [("reference", ref, m, False) for m in ("evbmf", "budget", "ratio")]
        cases += [(lab, lay, m, False) for lab, lay in large for m in ("evbmf", "ratio")]
    if args.part in ("all", "full"):
        cases += [("reference", ref, m, True) for m in ("evbmf", "budget", "ratio")]
        # the large Tucker-2 layer's sweeps take minutes each on a shared core; they are the
        # same in both paths, so by default only its Sigma steps are timed
        full_large = large if args.large_tucker2 else large[1:]
        cases += [(lab, lay, m, True) for lab, lay in full_large for m in ("evbmf", "ratio")]
    for label, layers, mode, solve in cases:
        rows.append(compare(label, layers, mode, options, repeats, solve=solve))
        print(_fmt_rows(rows[-1:]).splitlines()[-1], flush=True)
    table = _fmt_rows(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
