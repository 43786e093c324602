"""Every number of compress's report against an independent recomputation.

The errors are recomputed from the *returned* layers (their factors multiplied
out here, by einsum, in float64) and the statistics (eigen-decomposition in
float64); parameter counts and totals from the returned model; the output
errors from forward passes. Tiny models, a few batches.
"""

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sigmadecomp as sd
from sigmadecomp_torch import CompressionReport, collect_covariances, compress
from sigmadecomp_torch.layers import (CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d,
                                      equivalent_weight)
from sigmadecomp_torch.tt_layers import TTConv2d, TTLinear

F64 = torch.float64
FAST = {"n_iter_max": 3}
CHOSEN = ["2", "4", "6", "9"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------ recomputation


def kernel_of(module):
    """The dense weight of a returned layer, from its factors, in float64 (einsum here)."""
    if isinstance(module, Tucker2Conv2d):
        return torch.einsum("ta,abhw,bs->tshw", module.last.weight[:, :, 0, 0].double(),
                            module.core.weight.double(), module.first.weight[:, :, 0, 0].double())
    if isinstance(module, CPConv2d):
        return torch.einsum("tr,rs,rh,rw->tshw", module.last.weight[:, :, 0, 0].double(),
                            module.first.weight[:, :, 0, 0].double(),
                            module.vertical.weight[:, 0, :, 0].double(),
                            module.horizontal.weight[:, 0, 0, :].double())
    if isinstance(module, LowRankConv2d):
        return torch.einsum("tr,rshw->tshw", module.last.weight[:, :, 0, 0].double(),
                            module.first.weight.double())
    if isinstance(module, LowRankLinear):
        return module.last.weight.double() @ module.first.weight.double()
    if isinstance(module, (TTConv2d, TTLinear)):
        m64 = copy.deepcopy(module).double()
        return m64.kernel() if isinstance(m64, TTConv2d) else m64.weight()
    return module.weight.double()


def sq_norm(D, S):
    """``||D S^{1/2}||_F^2`` by an eigen-decomposition of ``S`` (negative eigenvalues: 0)."""
    lam, V = np.linalg.eigh(np.asarray(S, dtype=np.float64))
    Z = np.asarray(D, dtype=np.float64) @ V * np.sqrt(np.clip(lam, 0.0, None))
    return float(np.sum(Z * Z))


def recompute(original, returned, stats=None, centered=False):
    """``(sigma_error, frobenius_error)`` of one layer, recomputed."""
    with torch.no_grad():
        K = original.weight.detach().double()
        Kt = kernel_of(returned).detach().reshape(K.shape)
    K, D = K.reshape(K.shape[0], -1).numpy(), (K - Kt).reshape(K.shape[0], -1).numpy()
    fro = float(np.linalg.norm(D) / np.linalg.norm(K))
    if stats is None:
        return None, fro
    S = stats.sigma.double().numpy()
    mu = stats.mean.double().numpy()
    M = S - np.outer(mu, mu) if centered else S
    return math.sqrt(sq_norm(D, M) / sq_norm(K, S)), fro


def close(a, b, rel=1e-6, abs_=1e-9):
    return abs(a - b) <= rel * max(abs(a), abs(b)) + abs_


def count(module, biases=True):
    return sum(p.numel() for n, p in module.named_parameters()
               if biases or n.rsplit(".", 1)[-1] != "bias")


def net(dtype=F64):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 8, (3, 2), stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5)).to(dtype).eval()


def batches(dtype=F64, n=3, size=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 8, 8, generator=g).to(dtype) for _ in range(n)]


def rounding_bound(original, returned, stats, centered):
    """How far the squared relative Sigma-error may move when the statistic's negative
    eigenvalues (rounding of a float32 or singular statistic) are dropped."""
    with torch.no_grad():
        K = original.weight.detach().double()
        D = (K - kernel_of(returned).detach().reshape(K.shape)).reshape(K.shape[0], -1)
    S = stats.sigma.double().numpy()
    mu = stats.mean.double().numpy()
    M = S - np.outer(mu, mu) if centered else S
    neg = max(-float(np.linalg.eigvalsh(M)[0]), 0.0)
    return 1.01 * neg * float((D ** 2).sum()) / sq_norm(K.reshape(K.shape[0], -1), S)


def check_rows(model, small, report, stats=None, centered=False, rel=1e-6, errors=True,
               float32_stats=False):
    """Every row against the returned model: type, ranks, errors, parameter counts."""
    for r in report.layers:
        o, m = model.get_submodule(r["name"]), small.get_submodule(r["name"])
        assert m is not o and not isinstance(m, (nn.Conv2d, nn.Linear)), r["name"]
        sig, fro = recompute(o, m, None if stats is None else stats[r["name"]], centered)
        if not errors:  # (rows that measure something else, checked by the caller)
            pass
        elif not close(fro, r["frobenius_error"], rel):
            raise AssertionError((r["name"], fro, r["frobenius_error"]))
        elif stats is None:
            assert r["sigma_error"] is None
        elif float32_stats:  # the report takes the stored matrix as it is
            bound = rounding_bound(o, m, stats[r["name"]], centered)
            assert abs(sig ** 2 - r["sigma_error"] ** 2) <= bound + 1e-12, (r["name"], sig, r)
        else:
            assert close(sig, r["sigma_error"], rel), (r["name"], sig, r["sigma_error"])
        assert r["params_before"] == count(o) and r["params_after"] == count(m)
        ranks = {Tucker2Conv2d: lambda x: x.ranks, TTConv2d: lambda x: tuple(x.ranks),
                 TTLinear: lambda x: tuple(x.ranks)}.get(type(m), lambda x: x.rank)(m)
        assert tuple(np.atleast_1d(ranks)) == tuple(np.atleast_1d(r["ranks"])), r["name"]
    assert report.params_before == count(model) and report.params_after == count(small)
    assert report.layer_params_before == sum(count(model.get_submodule(r["name"]))
                                             for r in report.layers)
    assert report.layer_params_after == sum(count(small.get_submodule(r["name"]))
                                            for r in report.layers)
    assert report.ratio == pytest.approx(count(model) / count(small), rel=1e-12)
    for s in report.skipped:  # a layer reported dense is as it was
        o = model.get_submodule(s["name"])
        m = small.get_submodule(s["name"])
        assert type(m) is type(o) and torch.equal(m.weight, o.weight)


# ------------------------------------------------- errors, every method and option


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_every_reported_number_matches_the_returned_model(method, dtype):
    model = net(dtype)
    stats = collect_covariances(model, batches(dtype), progress=False)
    for centered in (False, True):
        small, rep = compress(model, method, covariances=stats, ratio=2, layers=CHOSEN,
                              centered=centered, progress=False,
                              options=None if method == "svd" else FAST)
        assert rep.weighted and rep.centered == centered
        check_rows(model, small, rep, stats, centered)
    small, rep = compress(model, method, ratio=2, layers=CHOSEN, progress=False,
                          options=None if method == "svd" else FAST)
    assert not rep.weighted
    check_rows(model, small, rep)


def test_a_float32_singular_statistic_does_not_report_a_zero_sigma_error():
    # a Linear layer seen on one sample: Sigma has rank 1, stored in float32; the
    # rank-5 Sigma-SVD leaves an error at the statistic's rounding, which the quadratic
    # form of the float32 matrix puts slightly below zero
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).double()
    stats = collect_covariances(lin, [torch.randn(1, 32, dtype=F64)], progress=False,
                                dtype=torch.float32)
    new, rep = compress(lin, "svd", covariances=stats, ranks={"": 5}, progress=False)
    K = lin.weight.detach()
    Kt = kernel_of(new).detach()
    want = sd.relative_sigma_error(K, Kt, stats[""].sigma)  # the library's own measure
    got = rep.layers[0]["sigma_error"]
    assert want > 0 and got > 0
    assert close(got, want, 1e-6)
    # and an eigen-decomposition agrees within the statistic's float32 rounding
    sig, _ = recompute(lin, new, stats[""])
    assert abs(sig - got) <= 1e-3


def test_a_float32_layer_reports_the_error_of_its_own_factors():
    # full ranks: the float64 result is exact, the float32 layer is not
    torch.manual_seed(0)
    model = net(torch.float32)
    stats = collect_covariances(model, batches(torch.float32), progress=False)
    small, rep = compress(model, "tucker2", covariances=stats,
                          ranks={"4": (8, 12), "9": 16}, progress=False)
    for r in rep.layers:
        sig, fro = recompute(model.get_submodule(r["name"]), small.get_submodule(r["name"]),
                             stats[r["name"]])
        assert fro > 1e-9 and sig > 1e-9  # float32 rounding of the factors
        assert close(fro, r["frobenius_error"], 1e-6, 0)
        assert close(sig, r["sigma_error"], 1e-6, 0)


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt"])
def test_statistics_in_float32_and_singular_sigma(method):
    model = net()
    data = [torch.randn(1, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(2))]
    stats = collect_covariances(model, data, progress=False, dtype=torch.float32)
    assert stats["4"].count < stats["4"].n  # singular
    for centered in (False, True):
        small, rep = compress(model, method, covariances=stats, ratio=2, layers=CHOSEN,
                              centered=centered, progress=False,
                              options=None if method == "svd" else FAST)
        # float32 storage: the recomputation drops its rounding-sized negative
        # eigenvalues, the report takes the matrix as it is
        check_rows(model, small, rep, stats, centered, float32_stats=True)


@pytest.mark.parametrize("ridge", [None, 0.0])
def test_an_ill_conditioned_sigma_with_and_without_ridge(ridge):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    base = torch.randn(16, 2, 8, 8, dtype=F64)
    x = torch.cat([base, base + 1e-5 * torch.randn_like(base)], 1)
    stats = collect_covariances(conv, [x], progress=False)
    lam = torch.linalg.eigvalsh(stats[""].sigma)
    assert lam[-1] / lam[0] > 1e9
    for method in ("svd", "tucker2", "cp", "tt"):
        opts = {} if ridge is None else {"ridge": ridge}
        if method != "svd":
            opts.update(FAST)
        for centered in (False, True):
            new, rep = compress(conv, method, covariances=stats, ratio=2, centered=centered,
                                options=opts, progress=False)
            sig, fro = recompute(conv, new, stats[""], centered)
            row = rep.layers[0]
            assert close(sig, row["sigma_error"]) and close(fro, row["frobenius_error"])


def test_the_sigma_error_is_the_measured_change_of_the_layers_output():
    """Proposition 1 on the calibration data, with and without the bias correction."""
    model = net()
    data = batches()
    stats = collect_covariances(model, data, progress=False)
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].detach())) for n in CHOSEN]
    with torch.no_grad():
        for b in data:
            model(b)
    for h in hooks:
        h.remove()
    for centered in (False, True):
        small, rep = compress(model, "cp", covariances=stats, ratio=2, layers=CHOSEN,
                              centered=centered, progress=False, options=FAST)
        for r in rep.layers:
            o, f = model.get_submodule(r["name"]), small.get_submodule(r["name"])
            num = den = 0.0
            with torch.no_grad():
                for x in inputs[r["name"]]:
                    y = o(x)
                    b = o.bias.reshape(-1, *([1] * (y.dim() - 2)))
                    num += float(((y - f(x)) ** 2).sum())
                    den += float(((y - b) ** 2).sum())
            assert close(math.sqrt(num / den), r["sigma_error"], 1e-8), r["name"]


def test_converged_and_iterations_are_those_of_the_core_run():
    model = net()
    stats = collect_covariances(model, batches(), progress=False)
    for opts in ({"n_iter_max": 2}, {"n_iter_max": 50, "tol": 1e-2}):
        small, rep = compress(model, "tucker2", covariances=stats, ratio=2, layers=["2"],
                              options=opts, progress=False)
        row = rep.layers[0]
        W = model[2].weight.detach().double()
        res = sd.tucker2(W, row["ranks"], stats["2"].sigma, **opts)
        assert row["n_iter"] == res.n_iter and row["converged"] == res.converged
        assert close(row["sigma_error"], float(res.sigma_error), 1e-6)  # (not ridged)
        if opts["n_iter_max"] == 2:  # stopped by the cap, still improving
            assert row["n_iter"] == 2 and row["converged"] is False
        else:
            assert row["n_iter"] < 50 and row["converged"] is True


# --------------------------------------------------- ratio, budget, ranks, totals


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt"])
def test_each_layer_meets_the_asked_ratio_in_weights(method):
    model = net()
    stats = collect_covariances(model, batches(), progress=False)
    small, rep = compress(model, method, covariances=stats, ratio=3, layers=CHOSEN,
                          progress=False, options=None if method == "svd" else FAST)
    for r in rep.layers:
        before = count(model.get_submodule(r["name"]), biases=False)
        after = count(small.get_submodule(r["name"]), biases=False)
        assert before / after >= 3
    check_rows(model, small, rep, stats)


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
@pytest.mark.parametrize("budget", [0.4, 500])
def test_a_budget_bounds_the_weights_of_the_chosen_layers(method, budget):
    model = net()
    stats = collect_covariances(model, batches(), progress=False)
    small, rep = compress(model, method, covariances=stats, budget=budget, layers=CHOSEN,
                          progress=False, options=None if method == "svd" else FAST)
    total = sum(count(model.get_submodule(n), biases=False) for n in CHOSEN)
    limit = budget if isinstance(budget, int) else budget * total
    after = sum(count(small.get_submodule(n), biases=False) for n in CHOSEN)
    assert after <= limit
    assert {r["name"] for r in rep.layers} | {s["name"] for s in rep.skipped} >= set(CHOSEN)
    check_rows(model, small, rep, stats)


def test_explicit_ranks_are_the_ranks_of_the_returned_layers():
    model = net()
    stats = collect_covariances(model, batches(), progress=False)
    ranks = {"2": (5, 3), "4": (2, 7), "6": 3, "9": 4}
    small, rep = compress(model, "tucker2", covariances=stats, ranks=ranks, progress=False,
                          options=FAST)
    assert {r["name"]: r["ranks"] for r in rep.layers} == ranks
    check_rows(model, small, rep, stats)


def test_layers_kept_dense_by_min_speedup_are_reported_and_counted_dense(monkeypatch):
    import sys

    compress_module = sys.modules["sigmadecomp_torch.compress"]  # (the name is the function)
    slow = {"4", "9"}  # (the timing itself is covered elsewhere; here its bookkeeping)

    def verdict(dense, factorized, shape, min_speedup):
        name = next(n for n, m in model.named_modules() if m is dense)
        return (name not in slow, 1.0, 2.0 if name in slow else 0.5)

    model = net()
    stats = collect_covariances(model, batches(), progress=False)
    monkeypatch.setattr(compress_module._latency, "speedup_verdict", verdict)
    for slow in ({"4", "9"}, set(CHOSEN)):
        small, rep = compress(model, "tucker2", covariances=stats, ratio=2, layers=CHOSEN,
                              progress=False, options=FAST, min_speedup=1.0,
                              example_input=batches(n=1)[0])
        assert {r["name"] for r in rep.layers} == set(CHOSEN) - slow
        kept = {s["name"]: s for s in rep.skipped}
        for n in slow:
            assert "kept dense" in kept[n]["reason"]
            assert (kept[n]["latency_dense_ms"], kept[n]["latency_factorized_ms"]) == (1.0, 2.0)
        check_rows(model, small, rep, stats)
    # no layer compressed: nothing changed, rX over the compressed layers is not 0
    assert rep.layers == [] and rep.params_after == rep.params_before
    assert rep.layer_ratio == 1.0 and rep.to_dict()["totals"]["layer_ratio"] == 1.0
    total = next(line for line in rep.table().splitlines() if line.startswith("total"))
    assert "0.00" not in total


@pytest.mark.parametrize("inplace", [False, True])
def test_compressed_layers_are_in_place_and_run_in_the_forward(inplace):
    model = net()
    reference = copy.deepcopy(model)
    stats = collect_covariances(model, batches(), progress=False)
    small, rep = compress(model, "cp", covariances=stats, ratio=2, progress=False,
                          inplace=inplace, options=FAST)
    assert (small is model) == inplace
    if not inplace:
        for (k, v), (k2, v2) in zip(model.state_dict().items(), reference.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    called = []
    hooks = [small.get_submodule(r["name"]).register_forward_hook(
        lambda m, a, o, n=r["name"]: called.append(n)) for r in rep.layers]
    with torch.no_grad():
        small(batches(n=1)[0])
    for h in hooks:
        h.remove()
    assert sorted(called) == sorted(r["name"] for r in rep.layers)
    check_rows(reference, small, rep, stats)


# ----------------------------------------------------------------- sequential


def test_a_sequential_report_says_what_its_errors_measure():
    model = net()
    data = batches(n=2)
    small, rep = compress(model, "svd", data=data, sequential=True, ratio=2,
                          layers=["4", "9"], progress=False, refit="all")

    def outputs(m, name):
        got = []
        h = m.get_submodule(name).register_forward_hook(lambda _m, a, o: got.append(o))
        with torch.no_grad():
            for b in data:
                m(b)
        h.remove()
        return got

    for r in rep.layers + rep.refitted:
        yo, yc = outputs(model, r["name"]), outputs(small, r["name"])
        bias = model.get_submodule(r["name"]).bias
        num = sum(float(((a - c) ** 2).sum()) for a, c in zip(yo, yc))
        den = sum(float(((a - bias.reshape(-1, *([1] * (a.dim() - 2)))) ** 2).sum())
                  for a in yo)
        assert close(math.sqrt(num / den), r["output_error"], 1e-8), r["name"]
    for r in rep.refitted:
        K = model.get_submodule(r["name"]).weight
        assert close(float((small.get_submodule(r["name"]).weight - K).norm() / K.norm()),
                     r["target_change"], 1e-10)
    # (the rows' errors measure the fit to the corrected target, not to K: checked above
    # through the output errors)
    check_rows(model, small, rep, errors=False)
    text = rep.table()
    head = text.splitlines()[1].split()
    assert "out_err" in head
    for r in rep.layers:
        line = next(x for x in text.splitlines() if x.split()[0] == r["name"])
        cells = line.split()  # (the errors are the last columns but iters, conv, sec)
        assert cells[-4] == f"{r['output_error']:.4f}"
        assert cells[-5] == f"{r['frobenius_error']:.4f}"
    assert "corrected target" in text
    again = CompressionReport.from_dict(json.loads(rep.to_json()))
    assert again.table() == text


# --------------------------------------------------------------- the exports


def test_every_export_carries_the_same_numbers():
    model = net()
    stats = collect_covariances(model, batches(), progress=False)
    small, rep = compress(model, "tucker2", covariances=stats, ratio=2, progress=False,
                          options=FAST)
    d = json.loads(rep.to_json())
    t = d["totals"]
    assert (t["params_before"], t["params_after"]) == (count(model), count(small))
    assert t["ratio"] == pytest.approx(count(model) / count(small))
    lb = sum(count(model.get_submodule(r["name"])) for r in rep.layers)
    la = sum(count(small.get_submodule(r["name"])) for r in rep.layers)
    assert (t["layer_params_before"], t["layer_params_after"]) == (lb, la)
    assert t["layer_ratio"] == pytest.approx(lb / la)
    text = str(rep)
    assert f"rX = {count(model) / count(small):.2f}" in text
    for r, e in zip(rep.layers, d["layers"]):
        assert e["sigma_error"] == r["sigma_error"] and e["frobenius_error"] == r["frobenius_error"]
        line = next(x for x in text.splitlines() if x.split()[0] == r["name"])
        assert f"{r['sigma_error']:.4f}" in line and f"{r['frobenius_error']:.4f}" in line
        assert f"{r['params_before'] / r['params_after']:.2f}" in line
    assert CompressionReport.from_dict(d).table() == text


# ------------------------------------------- the factorized layer is its kernel


GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False),
    dict(kernel_size=(2, 3), padding="same", padding_mode="reflect"),
    dict(kernel_size=3, stride=2, padding=2, padding_mode="circular", dilation=2),
    dict(kernel_size=(1, 3), padding=(0, 1), padding_mode="replicate"),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=(2, 2), padding="valid", stride=(1, 2), dilation=(2, 1)),
]


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_returned_layers_compute_their_equivalent_kernel(method, dtype):
    for geom in GEOMETRIES:
        torch.manual_seed(0)
        conv = nn.Conv2d(6, 8, dtype=dtype, **geom)
        new, _ = compress(conv, method, ratio=2, progress=False,
                          options=None if method == "svd" else FAST)
        K = equivalent_weight(new)
        assert K.dtype == F64
        assert torch.allclose(K, kernel_of(new).detach(), rtol=0, atol=1e-12)
        x = torch.randn(2, 6, 9, 8, dtype=dtype)
        padding = conv.padding
        xin = x
        if conv.padding_mode != "zeros":
            xin = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        want = F.conv2d(xin.double(), K, None if conv.bias is None else conv.bias.double(),
                        conv.stride, padding, conv.dilation)
        got = new(x)
        assert got.dtype == dtype and got.shape == want.shape
        tol = 1e-12 if dtype == F64 else 1e-5
        assert (got.double() - want).abs().max() <= tol * max(want.abs().max(), 1), geom
    lin = nn.Linear(12, 10, dtype=dtype)
    new, _ = compress(lin, method, ratio=2, progress=False,
                      options=None if method == "svd" else FAST)
    x = torch.randn(3, 12, dtype=dtype)
    want = F.linear(x.double(), equivalent_weight(new), lin.bias.double())
    tol = 1e-12 if dtype == F64 else 1e-5
    assert (new(x).double() - want).abs().max() <= tol * want.abs().max()


def test_equivalent_weight_of_an_unknown_module_is_none():
    assert equivalent_weight(nn.ReLU()) is None
    conv = nn.Conv2d(2, 3, 3)
    assert torch.equal(equivalent_weight(conv), conv.weight.detach().double())


def test_a_layer_left_dense_and_then_refitted_says_so():
    model = net()
    data = batches(n=2)
    # under 'tt' the 1x1 conv '6' would not shrink at rX 3: left dense, then refitted
    small, rep = compress(model, "tt", data=data, ratio=3, layers=CHOSEN, progress=False,
                          options=FAST, refit="all")
    assert "6" in {s["name"] for s in rep.skipped} and "6" in {r["name"] for r in rep.refitted}
    assert not torch.equal(small[6].weight, model[6].weight)
    line = next(x for x in rep.table().splitlines() if x.startswith("skipped 6 "))
    assert "refitted" in line
    for s in rep.skipped:  # the others are as they were
        if s["name"] not in {r["name"] for r in rep.refitted}:
            assert torch.equal(small.get_submodule(s["name"]).weight,
                               model.get_submodule(s["name"]).weight)
    check_rows(model, small, CompressionReport(
        method=rep.method, weighted=True, centered=False, layers=rep.layers,
        params_before=rep.params_before, params_after=rep.params_after), errors=False)


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt"])
def test_two_runs_report_the_same_numbers_and_weights(method):
    model = net()
    stats = collect_covariances(model, batches(n=2), progress=False)
    runs = [compress(model, method, covariances=stats, ratio=2, layers=CHOSEN, progress=False,
                     options=None if method == "svd" else FAST) for _ in range(2)]
    (a, ra), (b, rb) = runs
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in ra.layers]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in rb.layers]
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
def test_evbmf_ranks_are_reported_as_built(method):
    model = net()
    stats = collect_covariances(model, batches(n=2), progress=False)
    small, rep = compress(model, method, covariances=stats, ranks="evbmf", layers=CHOSEN,
                          progress=False, options=None if method == "svd" else FAST)
    check_rows(model, small, rep, stats)


@pytest.mark.parametrize("centered", [False, True])
def test_a_sequential_rows_errors_are_the_fit_to_its_corrected_target(centered):
    """The first layer compressed sees the original inputs: its corrected target is
    ``K' = K M (M + ridge * tr(M)/n I)^{-1}`` in its statistic ``M``."""
    from sigmadecomp.sigma import DEFAULT_RIDGE

    model = net()
    data = batches(n=2)
    stats = collect_covariances(model, data, progress=False)
    small, rep = compress(model, "svd", data=data, sequential=True, ratio=2,
                          layers=["2", "4"], centered=centered, progress=False)
    row = rep.layers[0]
    assert row["name"] == "2"
    st = stats["2"]
    S = st.sigma.double()
    M = S - torch.outer(st.mean, st.mean) if centered else S
    n = M.shape[0]
    K = model[2].weight.detach().reshape(12, -1)
    ridged = M + DEFAULT_RIDGE * torch.trace(M) / n * torch.eye(n, dtype=F64)
    target = K @ M @ torch.linalg.inv(ridged)
    D = target - kernel_of(small[2]).detach().reshape(12, -1)
    sig = math.sqrt(sq_norm(D, M) / sq_norm(target, S))
    assert close(sig, row["sigma_error"], 1e-8)
    assert close(float(D.norm() / target.norm()), row["frobenius_error"], 1e-8)
    assert close(float((target - K).norm() / K.norm()), row["target_change"], 1e-6)


def test_the_reported_error_is_scale_free_at_extreme_statistic_magnitudes():
    # _relative_error uses an ordinary statistic as it is (no (n, n) copy) and rescales
    # only one of extreme magnitude; the ratio is the same either way
    from sigmadecomp_torch.compress import _relative_error

    g = torch.Generator().manual_seed(3)
    K = torch.randn(5, 12, generator=g, dtype=torch.float64)
    D = 0.1 * torch.randn(5, 12, generator=g, dtype=torch.float64)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64)
    S = X.T @ X / 40
    ref = math.sqrt(float(torch.sum((D @ S) * D) / torch.sum((K @ S) * K)))
    for c in (1.0, 1e-150, 1e150, 1e250):
        assert _relative_error(K, D, c * S, c * S) == pytest.approx(ref, rel=1e-12), c
