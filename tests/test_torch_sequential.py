"""Sequential (error-compensating) compression: cross statistics, identity, API, errors."""

import copy

import pytest

import sigmadecomp

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from sigmadecomp_torch import collect_covariances, compress  # noqa: E402
from sigmadecomp_torch.sequential import (  # noqa: E402
    CrossStats,
    collect_cross_covariances,
    corrected_target,
    sequential_compress,
)

F64 = torch.float64
FAST = {"n_iter_max": 3}

pytestmark = [pytest.mark.filterwarnings("ignore::sigmadecomp.ConvergenceWarning"),
              pytest.mark.filterwarnings("ignore::sigmadecomp.CompressionWarning")]


def _conv_pair(seed=0):
    """An original two-conv net and a copy whose first conv is perturbed."""
    torch.manual_seed(seed)
    orig = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(4, 5, 3, stride=2, padding=1, dilation=1,
                                   padding_mode="reflect"), nn.Tanh()).double()
    comp = copy.deepcopy(orig)
    with torch.no_grad():
        comp[0].weight.add_(0.3 * torch.randn_like(comp[0].weight))
    return orig, comp


def _inputs(model, name, x):
    """The input tensor of module ``name`` when ``model`` runs on ``x``."""
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen[0]


def _rows(conv, x):
    x = F.pad(x, list(conv._reversed_padding_repeated_twice), mode="reflect")
    U = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return U.transpose(1, 2).reshape(-1, U.shape[1])


def test_cross_moments_match_direct_computation():
    orig, comp = _conv_pair()
    x = torch.randn(6, 3, 9, 9, dtype=F64)
    s = collect_cross_covariances(orig, comp, [x[:4], x[4:]], layers="2")["2"]
    conv = orig[2]
    Xo, Xc = _rows(conv, _inputs(orig, "2", x)), _rows(conv, _inputs(comp, "2", x))
    N = Xo.shape[0]
    assert s.count == N
    torch.testing.assert_close(s.sigma_cc, Xc.T @ Xc / N)
    torch.testing.assert_close(s.sigma_oc, Xo.T @ Xc / N)
    torch.testing.assert_close(s.mean_o, Xo.mean(0))
    torch.testing.assert_close(s.mean_c, Xc.mean(0))
    K = conv.weight.reshape(5, -1)
    K = K.detach()
    assert s.output_energy == pytest.approx(float(((Xo @ K.T) ** 2).sum()) / N, rel=1e-10)


@pytest.mark.parametrize("centered,ridge", [(False, 0.0), (True, 0.0), (False, 0.05),
                                            (True, 0.05)])
def test_sequential_objective_identity(centered, ridge):
    """E||K x_o - K~ x_c||^2 = ||(K~ - K') Sigma_cc^{1/2}||^2 + const for any K~
    (centered: with the best bias, in the centered moments; with a ridge lam:
    the objective + lam ||K~||^2 in the metric + lam I)."""
    orig, comp = _conv_pair(1)
    x = torch.randn(16, 3, 9, 9, dtype=F64)
    s = collect_cross_covariances(orig, comp, x, layers=["2"])["2"]
    conv = orig[2]
    Xo, Xc = _rows(conv, _inputs(orig, "2", x)), _rows(conv, _inputs(comp, "2", x))
    K = conv.weight.reshape(5, -1).detach()
    target, shift = corrected_target(conv.weight, s, centered=centered, ridge=ridge)
    Kp = target.reshape(5, -1)
    M = s.sigma_cc
    if centered:
        M = M - torch.outer(s.mean_c, s.mean_c)
        Xo, Xc = Xo - s.mean_o, Xc - s.mean_c
        torch.testing.assert_close(shift, K @ s.mean_o - Kp @ s.mean_c)
    else:
        assert shift is None
    lam = ridge * float(torch.trace(M)) / M.shape[0]
    const = None
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        Kt = K + 0.5 * torch.randn(K.shape, generator=g, dtype=F64)
        direct = float(((Xo @ K.T - Xc @ Kt.T) ** 2).sum(1).mean()) + lam * float(
            (Kt ** 2).sum())
        D = Kt - Kp
        form = float(torch.sum((D @ M) * D)) + lam * float((D ** 2).sum())
        c = direct - form
        if const is None:
            const = c
            if not centered and not ridge:  # const = E||K x_o||^2 - tr(K' Scc K'^T)
                assert c == pytest.approx(s.output_energy - float(torch.sum((Kp @ M) * Kp)),
                                          rel=1e-8, abs=1e-10)
        assert c == pytest.approx(const, rel=1e-8, abs=1e-10)
    assert const >= -1e-10  # the projection residual


def test_corrected_target_is_identity_when_models_agree():
    orig, _ = _conv_pair()
    x = torch.randn(8, 3, 9, 9, dtype=F64)
    s = collect_cross_covariances(orig, copy.deepcopy(orig), x, layers="2")["2"]
    target, _ = corrected_target(orig[2].weight, s)
    # Sigma_oc = Sigma_cc, full rank: K' = K
    torch.testing.assert_close(target, orig[2].weight, rtol=1e-7, atol=1e-9)


def test_token_mask_keeps_padded_rows_out():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.proj = nn.Embedding(10, 4), nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask):
            return self.proj(self.emb(input_ids))

    model = Tiny()
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    s = collect_cross_covariances(model, copy.deepcopy(model), [batch], layers="proj")["proj"]
    assert s.count == 5


def _chain(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                         nn.Linear(24, 10))


def test_sequential_beats_one_shot_on_the_final_output():
    net = _chain()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(128, 12, generator=g) @ torch.randn(12, 12, generator=g)
            for _ in range(2)]
    layers, ranks = ["2", "4"], {"2": 4, "4": 3}
    stats = collect_covariances(net, data, layers=layers, progress=False)
    one, _ = compress(net, "svd", covariances=stats, ranks=ranks, layers=layers,
                      progress=False)
    seq, rep = compress(net, "svd", data=data, sequential=True, ranks=ranks, layers=layers,
                        progress=False)
    x = torch.cat(data)
    with torch.no_grad():
        y, y1, ys = net(x), one(x), seq(x)
    err_one = float(((y - y1) ** 2).sum())
    err_seq = float(((y - ys) ** 2).sum())
    # '4' is the output layer: the sequential fit is the exact optimum of this error
    assert err_seq < 0.9 * err_one
    # the report's output error is the measured relative change of that output
    row = [r for r in rep.layers if r["name"] == "4"][0]
    b = net[4].bias.detach()
    expect = (err_seq / float(((y - b) ** 2).sum())) ** 0.5
    assert row["output_error"] == pytest.approx(expect, rel=1e-6)
    assert [r["group"] for r in rep.layers] == [0, 1]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1, bias=False)
        self.a = nn.Conv2d(6, 8, 3, padding=1)
        self.b = nn.Conv2d(6, 8, 1, bias=False)  # reads the same input as a
        self.c = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a(x) + self.b(x))
        x = torch.relu(self.c(x))
        return self.fc(x.flatten(1))


def _conv_data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 2, 6, 6, generator=g) for _ in range(2)]


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt"])
def test_every_method_runs(method):
    torch.manual_seed(0)
    net, data = ConvNet(), _conv_data()
    layers = ["a", "b", "c"] + (["fc"] if method == "tt" else [])
    small, rep = compress(net, method, data=data, sequential=True, ratio=2, layers=layers,
                          options=FAST, progress=False)
    assert small(data[0]).shape == (8, 4)
    done = {r["name"] for r in rep.layers}
    left = {s["name"]: s["reason"] for s in rep.skipped}
    assert done | set(left) == set(layers) and {"a", "c"} <= done
    assert all("would not reduce" in left[n] for n in left)  # TT of the 1x1 'b' at rX 2
    assert all(r["output_error"] is not None and r["output_error"] >= 0 for r in rep.layers)
    assert rep.params_after < rep.params_before
    # a and b read the same input: one group; c depends on both
    groups = {r["name"]: r["group"] for r in rep.layers}
    assert groups["a"] == groups.get("b", groups["a"]) != groups["c"]
    if "b" in left:  # a layer left dense keeps its own weight
        torch.testing.assert_close(small.b.weight, net.b.weight)


@pytest.mark.parametrize("how", ["ranks", "evbmf", "budget", "centered", "one-per-group",
                                 "plain"])
def test_rank_options_and_variants(how):
    torch.manual_seed(0)
    net, data = ConvNet(), _conv_data()
    kw = dict(layers=["a", "c"], options=FAST, progress=False)
    if how == "ranks":
        kw["ranks"] = {"a": (4, 3), "c": (3, 3)}
    elif how == "evbmf":
        kw["ranks"] = "evbmf"
    elif how == "budget":
        kw["budget"] = 0.5
    else:
        kw["ratio"] = 2
    extra = {"centered": True} if how == "centered" else {}
    if how in ("one-per-group", "plain"):
        small, rep = sequential_compress(net, "tucker2", data, independent=False,
                                         cross=how != "plain", **kw)
    else:
        small, rep = compress(net, "tucker2", data=data, sequential=True, **kw, **extra)
    assert [r["name"] for r in rep.layers] == ["a", "c"]
    if how == "ranks":
        assert [r["ranks"] for r in rep.layers] == [(4, 3), (3, 3)]
    if how == "budget":
        assert rep.layer_params_after <= 0.5 * rep.layer_params_before
    if how == "centered":
        assert rep.centered and small.c[-1].bias is not None  # bias added by the correction
    if how == "plain":
        assert all(r["target_change"] == 0 for r in rep.layers)
    assert small(data[0]).shape == (8, 4)


def test_default_layers_and_skipped_grouped_conv():
    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(2, 4, 3, padding=1)
            self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
            self.mid = nn.Conv2d(4, 6, 3, padding=1)
            self.fc = nn.Linear(6 * 36, 3)

        def forward(self, x):
            return self.fc(self.mid(self.grouped(self.stem(x))).flatten(1))

    torch.manual_seed(0)
    net = G()
    small, rep = compress(net, "tucker2", data=_conv_data(), sequential=True, ratio=2,
                          options=FAST, progress=False)
    assert [r["name"] for r in rep.layers] == ["mid"]
    reasons = {s["name"]: s["reason"] for s in rep.skipped}
    assert "grouped" in reasons["grouped"] and {"stem", "fc"} <= set(reasons)
    assert small.grouped is not net.grouped and isinstance(small.grouped, nn.Conv2d)
    torch.testing.assert_close(small.grouped.weight, net.grouped.weight)


def test_model_not_mutated_unless_inplace():
    torch.manual_seed(0)
    net, data = ConvNet(), _conv_data()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opts = dict(FAST, rng=0)
    small, _ = compress(net, "cp", data=data, sequential=True, ratio=2, layers=["a", "c"],
                        options=opts, progress=False, centered=True)
    assert small is not net
    assert all(isinstance(getattr(net, n), nn.Conv2d) for n in ("a", "c"))
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())
    same, _ = compress(net, "cp", data=data, sequential=True, ratio=2, layers=["a", "c"],
                       options=opts, progress=False, inplace=True, centered=True)
    assert same is net and not isinstance(net.a, nn.Conv2d)
    with torch.no_grad():  # the same layers as the copy's
        torch.testing.assert_close(net(data[0]), small(data[0]))


def test_data_without_sequential_is_one_shot():
    torch.manual_seed(0)
    net, data = ConvNet(), _conv_data()
    stats = collect_covariances(net, data, progress=False)
    a, _ = compress(net, "svd", covariances=stats, ratio=2, layers=["a"], progress=False)
    b, _ = compress(net, "svd", data=data, ratio=2, layers=["a"], progress=False)
    torch.testing.assert_close(a(data[0]), b(data[0]))


def test_bad_inputs():
    net, data = ConvNet(), _conv_data()
    with pytest.raises(ValueError, match="data=None.*sequential=True"):
        compress(net, "tucker2", ratio=2, sequential=True)
    stats = collect_covariances(net, data, progress=False)
    with pytest.raises(ValueError, match="covariances= cannot be combined"):
        compress(net, "tucker2", ratio=2, sequential=True, data=data, covariances=stats)
    with pytest.raises(ValueError, match="covariances= cannot be combined"):
        compress(net, "tucker2", ratio=2, data=data, covariances=stats)
    with pytest.raises(TypeError, match="sequential='yes'"):
        compress(net, "tucker2", ratio=2, sequential="yes", data=data)
    with pytest.raises(TypeError, match="iterator"):
        compress(net, "tucker2", ratio=2, sequential=True, data=iter(data))
    with pytest.raises(ValueError, match="method='qr'"):
        compress(net, "qr", ratio=2, sequential=True, data=data)
    with pytest.raises(ValueError, match="no way to choose ranks"):
        compress(net, "tucker2", sequential=True, data=data)
    with pytest.raises(ValueError, match=r"\['c'\] have no ranks"):
        compress(net, "tucker2", sequential=True, data=data, layers=["a", "c"],
                 ranks={"a": (2, 2)})
    with pytest.raises(ValueError, match="no batches"):
        compress(net, "tucker2", ratio=2, sequential=True, data=[])
    with pytest.raises(TypeError, match="cross=1"):
        sequential_compress(net, "tucker2", data, ratio=2, cross=1)
    with pytest.raises(TypeError, match="CrossStats"):
        corrected_target(net.a.weight, stats["a"])
    e, z = torch.eye(3, dtype=F64), torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match="target_ridge=-1"):
        sequential_compress(net, "tucker2", data, ratio=2, target_ridge=-1)
    e, z = torch.eye(3, dtype=F64), torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match="ridge=nan"):
        corrected_target(torch.ones(2, 3), CrossStats(e, e, z, z, 1, 1.0), ridge=float("nan"))
    with pytest.raises(ValueError, match="n=3"):
        corrected_target(net.a.weight, CrossStats(e, e, z, z, 1, 1.0))
    with pytest.raises(ValueError, match="grouped"):
        g = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2))
        collect_cross_covariances(g, g, torch.randn(1, 2, 5, 5), layers="0")


@pytest.mark.slow
def test_quick_benchmark_runs(tmp_path):
    pytest.importorskip("sigmadecomp.datasets").load_fashion_mnist  # noqa: B018
    from benchmarks import sequential as bench

    out = tmp_path / "seq.json"
    res = bench.main(["--quick", "--methods", "tucker2", "--variants", "oneshot",
                      "sequential", "--calib", "256", "--test", "500", "--iters", "3",
                      "--out", str(out)])
    assert out.exists()
    assert {(r["variant"], r["rx"]) for r in res["rows"]} == {("oneshot", 4.0),
                                                            ("sequential", 4.0)}
    assert all(0 < r["accuracy"] <= 1 for r in res["rows"])


@pytest.mark.parametrize("method", ["tucker2", "cp"])
@pytest.mark.parametrize("centered", [False, True])
def test_budget_ranks_are_those_of_one_shot(method, centered):
    # sequential + budget: the ranks come from the one-shot allocation of the
    # original model (centered: of the centered covariances, as compress does)
    torch.manual_seed(0)
    net, data = ConvNet(), [x + 1.0 for x in _conv_data()]  # inputs with a mean
    kw = dict(layers=["a", "c"], budget=0.4, centered=centered, options=FAST, progress=False)
    small, rep = compress(net, method, data=data, sequential=True, **kw)
    stats = collect_covariances(net, data, layers=["a", "c"], progress=False)
    _, one = compress(net, method, covariances=stats, **kw)
    assert [r["ranks"] for r in rep.layers] == [r["ranks"] for r in one.layers]
    assert rep.layer_params_after - (8 if centered else 0) <= 0.4 * rep.layer_params_before
    assert rep.centered is centered
    assert all(r["output_error"] is not None for r in rep.layers)
    assert small(data[0]).shape == (8, 4)
    if centered:
        assert small.c[-1].bias is not None


# ------------------------------------------------------------ refit of dense layers


def _chain_data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(128, 12, generator=g) @ torch.randn(12, 12, generator=g) + 0.5
            for _ in range(2)]


@pytest.mark.parametrize("centered", [False, True])
def test_refit_is_the_exact_least_squares_fit(centered):
    # layer '4' stays dense and is refitted to the original output on the
    # compressed model's inputs: recomputed here by an independent solve
    net, data = _chain().double(), [x.double() for x in _chain_data()]
    layers, ranks = ["2"], {"2": 3}
    kw = dict(ranks=ranks, layers=layers, centered=centered, progress=False, target_ridge=0.0)
    plain, _ = sequential_compress(net, "svd", data, **kw)
    small, rep = sequential_compress(net, "svd", data, refit=["4"], **kw)
    x = torch.cat(data)
    with torch.no_grad():
        y_o = net(x)                             # the original output
        x_c = plain[:4](x)                       # layer 4's input once '2' is compressed
        A = x_c if not centered else torch.cat([x_c, torch.ones(len(x), 1, dtype=F64)], 1)
        sol = torch.linalg.lstsq(A, y_o - (0 if centered else net[4].bias)).solution
    W = sol[:24].T
    torch.testing.assert_close(small[4].weight, W, rtol=1e-7, atol=1e-8)
    if centered:
        torch.testing.assert_close(small[4].bias, sol[24], rtol=1e-7, atol=1e-8)
    else:
        torch.testing.assert_close(small[4].bias, net[4].bias)
    # the final output error can only fall, and the report measures it
    with torch.no_grad():
        e_plain = float(((y_o - plain(x)) ** 2).sum())
        e_refit = float(((y_o - small(x)) ** 2).sum())
    assert e_refit < e_plain
    (row,) = rep.refitted
    assert row["name"] == "4" and row["kind"] == "Linear" and row["group"] == 1
    b = net[4].bias.detach()
    expect = (e_refit / float(((y_o - b) ** 2).sum())) ** 0.5
    assert row["output_error"] == pytest.approx(expect, rel=1e-8)
    K = net[4].weight.detach()
    expect_change = float(torch.linalg.norm(W - K) / torch.linalg.norm(K))
    assert row["target_change"] == pytest.approx(expect_change, rel=1e-7)
    assert rep.params_after == plain_params(plain)
    assert "refitted 4 (Linear, dense)" in rep.table()
    assert rep.to_dict()["refitted"][0]["name"] == "4"


def plain_params(model):
    return sum(p.numel() for p in model.parameters())


def test_refit_all_skips_layers_with_unchanged_inputs():
    torch.manual_seed(0)
    net, data = ConvNet(), _conv_data()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small, rep = compress(net, "tucker2", data=data, sequential=True, ratio=2,
                          layers=["a", "c"], options=FAST, progress=False, refit="all",
                          centered=True)
    assert [r["name"] for r in rep.refitted] == ["fc"]
    reasons = {s["name"]: s["reason"] for s in rep.skipped}
    # stem and b read the input / the stem's output, which compression does not change
    assert "did not change its inputs" in reasons["stem"]
    assert "did not change its inputs" in reasons["b"]
    torch.testing.assert_close(small.b.weight, net.b.weight)
    assert not torch.equal(small.fc.weight, net.fc.weight)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert small(data[0]).shape == (8, 4)
    # inplace: the user's own dense layer gets the refitted weight
    # a predicate picks among the dense layers (and never a compressed one)
    _, rep3 = compress(net, "tucker2", data=data, sequential=True, ratio=2,
                       layers=["a", "c"], options=FAST, progress=False, centered=True,
                       refit=lambda n, m: isinstance(m, nn.Linear) or n == "c")
    assert [r["name"] for r in rep3.refitted] == ["fc"]
    assert [r["name"] for r in rep3.layers] == ["a", "c"]
    same, rep2 = compress(net, "tucker2", data=data, sequential=True, ratio=2,
                          layers=["a", "c"], options=dict(FAST, rng=0), progress=False,
                          refit="all", centered=True, inplace=True)
    assert same is net and [r["name"] for r in rep2.refitted] == ["fc"]
    assert not torch.equal(net.fc.weight, before["fc.weight"])


def test_refit_keeps_tied_and_frozen_parameters_right():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.head = nn.Linear(6, 6, bias=False)
            self.other = nn.Linear(6, 6, bias=False)
            self.other.weight = self.head.weight  # tied

        def forward(self, x):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x))))) + 0 * self.other(x)

    torch.manual_seed(0)
    net = Tied()
    data = [torch.randn(64, 6)]
    small, rep = compress(net, "svd", data=data, sequential=True, ranks={"a": 2},
                          layers=["a"], refit="all", progress=False)
    assert [r["name"] for r in rep.refitted] == ["b"]
    reasons = {s["name"]: s["reason"] for s in rep.skipped}
    assert "tied" in reasons["head"]
    with pytest.raises(ValueError, match="refit contains 'head'.*tied"):
        compress(net, "svd", data=data, sequential=True, ranks={"a": 2}, layers=["a"],
                 refit=["head"], progress=False)
    net.b.weight.requires_grad_(False)
    small, rep = compress(net, "svd", data=data, sequential=True, ranks={"a": 2},
                          layers=["a"], refit=["b"], centered=True, progress=False)
    assert small.b.weight.requires_grad is False


def test_refit_warns_with_fewer_rows_than_inputs():
    import warnings

    net = _chain()
    few = [torch.randn(10, 12)]  # 10 rows for the 24 inputs of layer '4'
    with pytest.warns(sigmadecomp.CompressionWarning, match="refitted from 10 input rows for 24"):
        compress(net, "svd", data=few, sequential=True, ranks={"2": 3}, layers=["2"],
                 refit=["4"], progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compress(net, "svd", data=_chain_data(), sequential=True, ranks={"2": 3},
                 layers=["2"], refit=["4"], progress=False)  # 256 rows
    assert not [w for w in seen if "refitted from" in str(w.message)]


def test_refit_bad_inputs():
    net, data = ConvNet(), _conv_data()
    with pytest.raises(ValueError, match="refit='all' needs data="):
        compress(net, "tucker2", ratio=2, covariances=collect_covariances(net, data,
                                                                          progress=False),
                 refit="all")
    with pytest.raises(ValueError, match="refit contains 'c', which is also a layer to compress"):
        compress(net, "tucker2", ratio=2, data=data, sequential=True, layers=["a", "c"],
                 refit=["c"])
    for seq in (False, True):  # refused before any work, one-shot or sequential
        with pytest.raises(ValueError, match="refit contains 'c', which is also a layer"):
            compress(net, "tucker2", ratio=2, data=data, sequential=seq, layers=["a", "c"],
                     refit=["c"])
        with pytest.raises(TypeError, match="refit=5 is not allowed"):
            compress(net, "tucker2", ratio=2, data=data, sequential=seq, layers=["a", "c"],
                     refit=5)
    with pytest.raises(TypeError, match="refit=5 is not allowed"):
        compress(net, "tucker2", ratio=2, data=data, sequential=True, layers=["a", "c"],
                 refit=5)
    with pytest.raises(ValueError, match="refit contains 'nope'"):
        compress(net, "tucker2", ratio=2, data=data, sequential=True, layers=["a", "c"],
                 refit=["nope"])
    with pytest.raises(ValueError, match="refit=\\['x'\\] is not allowed for a single layer"):
        compress(nn.Linear(4, 4), "svd", ratio=2, data=torch.randn(8, 4), sequential=True,
                 refit=["x"])


def test_sequential_refit_all_refits_chosen_layers_left_dense():
    # layer '4' (2 -> 2) is chosen but stays dense at ratio 2 (rank 1 would not shrink
    # it); its input changes once '2' is compressed, so refit='all' refits it, in
    # sequential compression as in one-shot compression + refit
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2), nn.Tanh(),
                        nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 4)).double()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(64, 8, generator=g, dtype=F64) for _ in range(2)]
    kw = dict(ratio=2, layers=["2", "4"], progress=False, target_ridge=0.0)
    plain, rep0 = sequential_compress(net, "svd", data, **kw)
    small, rep = sequential_compress(net, "svd", data, refit="all", **kw)
    assert [r["name"] for r in rep0.layers] == [r["name"] for r in rep.layers] == ["2"]
    reasons = {s["name"]: s["reason"] for s in rep.skipped}
    assert reasons["4"].startswith("ranks 1 would not reduce")
    assert "keeps its own weights" not in reasons["4"]
    assert [r["name"] for r in rep.refitted] == ["4", "6"]
    _, one_shot = compress(net, "svd", data=data, ratio=2, layers=["2", "4"], refit="all",
                           progress=False)
    assert [r["name"] for r in one_shot.refitted] == ["4", "6"]
    assert not torch.equal(small[4].weight, net[4].weight)
    torch.testing.assert_close(plain[4].weight, net[4].weight)
    x = torch.cat(data)
    with torch.no_grad():
        def error(model, upto=None):
            return float(((model[:upto](x) - net[:upto](x)) ** 2).sum())

        # the refitted layer's output (its least-squares fit) and the model's output
        assert error(small, 5) < error(plain, 5)
        assert error(small) <= error(plain)
    row = rep.refitted[0]
    assert row["group"] == 2 and row["output_error"] is not None  # passes: 0, 2, 4, 6
    # a predicate picks among those layers too
    _, rep2 = sequential_compress(net, "svd", data, refit=lambda n, m: n == "4", **kw)
    assert [r["name"] for r in rep2.refitted] == ["4"]


def _refit_worker(rank, port, out_dir):
    import os

    import torch.distributed as dist

    from _helpers import gloo_group

    with gloo_group(rank, port, 2):
        shard = _refit_batches()[rank::2]  # uneven shards: 3 and 2 batches
        small, rep = sequential_compress(_chain().double(), "svd", shard, ranks={"2": 3},
                                         layers=["2"], refit="all", centered=True,
                                         progress=False)
        one_shot, rep1 = compress(_chain().double(), "svd", data=shard, ranks={"2": 3},
                                  layers=["2"], refit="all", centered=True, progress=False)
        torch.save({"state": small.state_dict(), "refitted": rep.refitted,
                    "skipped": rep.skipped, "one_shot": one_shot.state_dict(),
                    "one_shot_refitted": rep1.refitted},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()


def _refit_batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(20 + 3 * i, 12, generator=g, dtype=F64) for i in range(5)]


def test_refit_over_two_gloo_processes_equals_one_process(tmp_path):
    import os

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    from _helpers import free_port, spawn_workers

    spawn_workers(_refit_worker, (free_port(), str(tmp_path)), 2, 120.0,
                  "sequential refit over gloo")
    one, rep = sequential_compress(_chain().double(), "svd", _refit_batches(), ranks={"2": 3},
                                   layers=["2"], refit="all", centered=True, progress=False)
    one1, rep1 = compress(_chain().double(), "svd", data=_refit_batches(), ranks={"2": 3},
                          layers=["2"], refit="all", centered=True, progress=False)
    for rank in range(2):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"), weights_only=False)
        assert got["state"].keys() == one.state_dict().keys()
        for k, v in one.state_dict().items():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-10, atol=1e-12)
        assert [r["name"] for r in got["refitted"]] == ["4"] == [r["name"] for r in rep.refitted]
        assert got["refitted"][0]["output_error"] == pytest.approx(
            rep.refitted[0]["output_error"], rel=1e-10)
        assert {s["name"] for s in got["skipped"]} == {s["name"] for s in rep.skipped}
        # one-shot compression + refit: statistics and cross statistics all-reduced too
        for k, v in one1.state_dict().items():
            torch.testing.assert_close(got["one_shot"][k], v, rtol=1e-10, atol=1e-12)
        assert got["one_shot_refitted"][0]["output_error"] == pytest.approx(
            rep1.refitted[0]["output_error"], rel=1e-10)


@pytest.mark.parametrize("centered", [False, True])
def test_one_shot_refit_is_the_exact_least_squares_fit(centered):
    # compress(data=..., refit=...) without sequential: one-shot compression,
    # then layer '4' refitted to the original output on the compressed inputs
    net, data = _chain().double(), [x.double() for x in _chain_data()]
    kw = dict(ranks={"2": 3}, layers=["2"], centered=centered, progress=False)
    plain, _ = compress(net, "svd", data=data, **kw)
    small, rep = compress(net, "svd", data=data, refit="all", **kw)
    x = torch.cat(data)
    with torch.no_grad():
        y_o, x_c = net(x), plain[:4](x)
        A = x_c if not centered else torch.cat([x_c, torch.ones(len(x), 1, dtype=F64)], 1)
        sol = torch.linalg.lstsq(A, y_o - (0 if centered else net[4].bias)).solution
        # the ridge of the fit is DEFAULT_RIDGE times the mean eigenvalue: solve with it too
        from sigmadecomp.sigma import DEFAULT_RIDGE

        M = A.T @ A / len(x)
        C = M[:24, :24] - (M[:24, 24:] @ M[24:, :24] if centered else 0)
        lam = DEFAULT_RIDGE * float(torch.trace(C)) / 24
        P = torch.zeros_like(M)
        P[:24, :24] = lam * torch.eye(24, dtype=F64)
        ridged = torch.linalg.solve(M + P, A.T @ (y_o - (0 if centered else net[4].bias))
                                    / len(x))
    torch.testing.assert_close(small[4].weight, ridged[:24].T, rtol=1e-7, atol=1e-9)
    assert not torch.allclose(small[4].weight, sol[:24].T, rtol=1e-7, atol=1e-9) or lam == 0
    if centered:
        torch.testing.assert_close(small[4].bias, ridged[24], rtol=1e-7, atol=1e-9)
    assert [r["name"] for r in rep.refitted] == ["4"]
    assert {s["name"]: s["reason"] for s in rep.skipped}["0"].startswith("not refitted")
    with torch.no_grad():
        assert float(((y_o - small(x)) ** 2).sum()) < float(((y_o - plain(x)) ** 2).sum())
    with torch.no_grad():
        expect = (float(((y_o - small(x)) ** 2).sum())
                  / float(((y_o - net[4].bias) ** 2).sum())) ** 0.5
    assert rep.refitted[0]["output_error"] == pytest.approx(expect, rel=1e-8)


def test_one_shot_refit_inplace_and_not_mutating():
    torch.manual_seed(0)
    net, data = ConvNet(), _conv_data()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small, rep = compress(net, "tucker2", data=data, ratio=2, layers=["a", "c"],
                          options=dict(FAST, rng=0), progress=False, refit="all")
    assert small is not net and [r["name"] for r in rep.refitted] == ["fc"]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())
    same, rep2 = compress(net, "tucker2", data=data, ratio=2, layers=["a", "c"],
                          options=dict(FAST, rng=0), progress=False, refit="all",
                          inplace=True)
    assert same is net and not isinstance(net.a, nn.Conv2d)
    with torch.no_grad():
        torch.testing.assert_close(net(data[0]), small(data[0]))
    assert rep2.params_after == sum(p.numel() for p in net.parameters())


def test_data_collects_only_the_statistics_compress_uses(monkeypatch):
    # compress(data=...) used to collect every Conv2d/Linear (on ResNet-18 with two
    # layers chosen: 1.1 GB peak and 1.7 s against 0.4 GB and 0.4 s)
    from sigmadecomp_torch import covariance, default_layers

    seen = []
    real = covariance.collect_covariances

    def spy(model, data, **kw):
        seen.append(kw.get("layers"))
        return real(model, data, **kw)

    monkeypatch.setattr(covariance, "collect_covariances", spy)
    torch.manual_seed(0)
    net, data = ConvNet(), _conv_data()
    _, rep = compress(net, "svd", data=data, ratio=2, layers=["a"], progress=False)
    _, rep2 = compress(net, "svd", data=data, ratio=2, layers=["a"], refit="all",
                       progress=False)
    _, rep3 = compress(net, "svd", data=data, ratio=2, progress=False)
    assert seen[:2] == [["a"], ["a"]]
    # the default layers, as a predicate (one the data never reach is skipped, not an error)
    assert [n for n, m in net.named_modules() if seen[2](n, m)] == default_layers(net)
    assert [r["name"] for r in rep.layers] == ["a"] == [r["name"] for r in rep2.layers]
    assert [r["name"] for r in rep2.refitted] == ["c", "fc"]
    assert [r["name"] for r in rep3.layers] == default_layers(net)


class _CallsChangeWithCompression(nn.Module):
    """Calls ``b`` twice while it is a dense conv, once when it is factorized."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        y = self.b(h)
        if isinstance(self.b, nn.Conv2d):
            y = y + self.b(h)
        return self.head(torch.relu(self.c(torch.relu(y))).mean((2, 3)))


def test_an_output_error_whose_calls_do_not_pair_up_is_not_reported():
    """The final pass pairs the original's and the compressed model's calls of a layer; when
    the compression changes how often the model calls it, the layer gets no output error
    (None, with a warning) instead of one computed from mismatched calls."""
    model = _CallsChangeWithCompression().double()
    data = [torch.randn(4, 3, 6, 6, dtype=F64) for _ in range(2)]
    with pytest.warns(sigmadecomp.CompressionWarning, match="'b': its output error is not "
                      "measured: it ran more often in the original"):
        _, report = compress(model, "tucker2", data=data, sequential=True, ratio=1.5,
                             layers=["b", "c"], options=FAST, progress=False)
    errors = {r["name"]: r["output_error"] for r in report.layers}
    assert errors["b"] is None and errors["c"] is not None and errors["c"] > 0


@pytest.mark.parametrize("kw", [{"sequential": True}, {"refit": "all"}])
def test_a_generator_given_to_sequential_or_refit_is_named_in_the_error(kw):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))

    def batches():
        for _ in range(2):
            yield torch.randn(2, 3, 9, 9)

    with pytest.raises(TypeError, match="data of type generator is an iterator"):
        compress(model, "tucker2", data=batches(), ratio=1.5, progress=False, **kw)


# ------------------------------------------------------------------ audit regressions


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_failed_in_place_refit_leaves_the_model_unchanged():
    batches = [torch.randn(16, 6) for _ in range(2)]

    class FailsLate:  # re-iterable; a later pass fails (a data source gone, a Ctrl-C ...)
        reads = 0

        def __iter__(self):
            self.reads += 1
            if self.reads >= 6:  # (a refit pass: after the layers were compressed)
                raise OSError("data source unavailable")
            return iter(batches)

    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(OSError, match="unavailable"):
        compress(model, "svd", ratio=1.5, layers=["2", "4"], data=FailsLate(), refit="all",
                 inplace=True, progress=False)
    assert [type(m) for m in model] == [type(m) for m in _mlp()]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # and when every pass succeeds, the model itself is the compressed and refitted one
    out, report = compress(model, "svd", ratio=1.5, layers=["2", "4"], data=batches,
                           refit="all", inplace=True, progress=False)
    ref, _ = compress(_mlp(), "svd", ratio=1.5, layers=["2", "4"], data=batches, refit="all",
                      progress=False)
    assert out is model and [r["name"] for r in report.refitted] == ["6"]
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_batches_without_samples_add_nothing_to_cross_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    x = torch.randn(4, 3, 6, 6)
    empty = torch.empty(0, 3, 6, 6)
    with_empty = collect_cross_covariances(net, net, [x, empty], progress=False)
    plain = collect_cross_covariances(net, net, [x], progress=False)
    for k in plain:
        torch.testing.assert_close(with_empty[k].sigma_cc, plain[k].sigma_cc)
    small, _ = compress(net, "svd", ratio=2, data=[x, empty], sequential=True, progress=False)
    assert small(x).shape == (4, 2)


def test_cross_statistics_read_a_generator_once_and_name_themselves():
    net = _mlp()
    batches = [torch.randn(8, 6) for _ in range(2)]
    from_list = collect_cross_covariances(net, net, batches, progress=False)
    from_gen = collect_cross_covariances(net, net, (b for b in batches), progress=False)
    for k in from_list:
        torch.testing.assert_close(from_gen[k].sigma_oc, from_list[k].sigma_oc)
    with pytest.raises(ValueError, match=r"no batches; running the original and the "
                                         r"compressed model \(cross statistics\) needs"):
        collect_cross_covariances(net, net, [], progress=False)


def test_refit_with_no_compressible_layer_gives_the_planning_reasons():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.t = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.t.weight = self.a.weight
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.t(torch.relu(self.a(torch.relu(self.stem(x)))))))

    for kw in (dict(refit="all"), dict(sequential=True), dict(sequential=True, refit="all")):
        with pytest.raises(ValueError, match=r"no layer can be compressed: .*'a': its weight "
                                             r"is tied"):
            compress(Tied(), "svd", ratio=1.5, data=[torch.randn(8, 6)], progress=False, **kw)


class _TokenEncoder(nn.Module):
    """Dict batches (input_ids, attention_mask); the head reads the pooled tokens."""

    def __init__(self, masked_pooling=True):
        super().__init__()
        self.masked_pooling = masked_pooling
        self.emb, self.a = nn.Embedding(20, 8), nn.Linear(8, 16)
        self.b, self.head = nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.b(torch.relu(self.a(self.emb(input_ids))))
        if not self.masked_pooling:
            return self.head(h.mean(1))
        m = attention_mask[..., None].float()
        return self.head((h * m).sum(1) / m.sum(1))


def test_refit_of_a_pooled_head_does_not_claim_the_mask_went_unused():
    import warnings

    Enc = _TokenEncoder
    torch.manual_seed(0)
    am = torch.ones(4, 6, dtype=torch.long)
    am[0, 3:] = 0
    data = [{"input_ids": torch.randint(0, 20, (4, 6)), "attention_mask": am}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = compress(Enc(), "svd", ratio=1.5, layers=["b"], data=data, refit="all",
                             progress=False)
    assert "head" in [r["name"] for r in report.refitted]
    assert not [w for w in caught if "token mask was given" in str(w.message)]


class _ThreeInputs(nn.Module):
    """Takes (x, scale, shift): batches of three tensors, which compress cannot take apart."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, scale, shift):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)) * scale + shift)))


@pytest.mark.parametrize("mode", ["one-shot", "sequential", "refit"])
def test_compress_takes_forward_and_max_batches_for_its_passes(mode):
    torch.manual_seed(0)
    model = _ThreeInputs()
    batches = [(torch.randn(8, 6), torch.rand(8, 1) + 0.5, torch.randn(8, 1)) for _ in range(3)]
    fwd = lambda m, b: m(*b)  # noqa: E731
    kw = dict(layers=["b"], ratio=2, progress=False)
    extra = {"sequential": dict(sequential=True), "refit": dict(refit="all")}.get(mode, {})
    with pytest.raises(TypeError, match="forward=lambda model, batch"):
        compress(model, "svd", data=batches, **kw, **extra)
    small, report = compress(model, "svd", data=batches, forward=fwd, max_batches=2, **kw,
                             **extra)
    # the statistics of the first two batches only, run through forward
    stats = collect_covariances(model, batches[:2], layers=["b"], forward=fwd, progress=False)
    ref, _ = compress(model, "svd", covariances=stats, **kw)
    if mode == "one-shot":
        x = batches[2]
        torch.testing.assert_close(small(*x), ref(*x))
    assert [r["name"] for r in report.layers] == ["b"]


def test_pass_options_of_compress_are_checked_up_front():
    model = _ThreeInputs()
    with pytest.raises(ValueError, match="forward= needs data="):
        compress(model, "svd", ratio=2, forward=lambda m, b: m(*b), progress=False)
    with pytest.raises(ValueError, match="max_batches=0 is not allowed"):
        compress(model, "svd", ratio=2, data=[torch.randn(2, 6)], max_batches=0,
                 progress=False)
    with pytest.raises(TypeError, match="forward=3 is not allowed"):
        compress(model, "svd", ratio=2, data=[torch.randn(2, 6)], forward=3, progress=False)
    with pytest.raises(ValueError, match="min_speedup with forward= needs example_input="):
        compress(model, "svd", ratio=2, data=[torch.randn(2, 6)], forward=lambda m, b: m(*b),
                 min_speedup=1.0, progress=False)


def test_compress_passes_its_mask_option_to_the_statistics():
    torch.manual_seed(0)
    model = _TokenEncoder(masked_pooling=False)
    am = torch.ones(4, 6, dtype=torch.long)
    am[:2, 3:] = 0
    data = [{"input_ids": torch.randint(0, 20, (4, 6)), "attention_mask": am}]
    for mask in ("auto", None):
        small, _ = compress(model, "svd", ratio=2, layers=["b"], data=data, mask=mask,
                            progress=False)
        stats = collect_covariances(model, data, layers=["b"], mask=mask, progress=False)
        ref, _ = compress(model, "svd", ratio=2, layers=["b"], covariances=stats,
                          progress=False)
        torch.testing.assert_close(small.b.first.weight, ref.b.first.weight)
    assert collect_covariances(model, data, layers=["b"], mask=None,
                               progress=False)["b"].count == 24
