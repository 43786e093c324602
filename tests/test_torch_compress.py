"""compress: model surgery, the report, bad inputs, export."""

import io
import json
import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp.ranks import layer_params, ratio_to_ranks  # noqa: E402
from sigmadecomp_torch import (  # noqa: E402
    CPConv2d,
    LowRankConv2d,
    LowRankLinear,
    Tucker2Conv2d,
    collect_covariances,
    compress,
)
from _torch_models import WithUnusedConv  # noqa: E402

F64 = torch.float64
FAST = {"n_iter_max": 4}

# these tests cut tiny layers hard and stop early on purpose; the warnings
# themselves are tested in test_torch_surgery.py
pytestmark = [pytest.mark.filterwarnings("ignore::sigmadecomp.ConvergenceWarning"),
              pytest.mark.filterwarnings("ignore::sigmadecomp.CompressionWarning")]



class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 10, (3, 2), stride=2, padding=(1, 0), padding_mode="reflect")
        self.proj = nn.Conv2d(10, 6, 1)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6 * 4 * 3, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.grouped(self.proj(x)))
        return self.fc(torch.flatten(x, 1))


def _net(dtype=F64):
    torch.manual_seed(0)
    return Net().to(dtype).eval()


def _data(n_batches=3, dtype=F64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 8, 6, generator=g, dtype=dtype) for _ in range(n_batches)]


@pytest.fixture(scope="module")
def stats():
    return collect_covariances(_net(), _data(), progress=False)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m) for m in model.modules()])


def _unchanged(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


FULL = {"conv1": (8, 3), "conv2": (10, 8), "proj": 6, "fc": 5}


@pytest.mark.parametrize("weighted", [False, True])
def test_full_ranks_keep_the_outputs(weighted, stats):
    model = _net()
    snap = _snapshot(model)
    small, report = compress(model, "tucker2", ranks=FULL, covariances=stats if weighted else None,
                             options=FAST, progress=False)
    _unchanged(model, snap)  # the original is untouched
    assert isinstance(small.conv1, Tucker2Conv2d) and isinstance(small.conv2, Tucker2Conv2d)
    assert isinstance(small.proj, LowRankConv2d) and isinstance(small.fc, LowRankLinear)
    assert type(small.grouped) is nn.Conv2d
    x = torch.cat(_data())
    with torch.no_grad():
        y, z = model(x), small(x)
    assert float((y - z).abs().max()) <= 1e-9 * float(y.abs().max())
    assert [r["name"] for r in report.layers] == ["conv1", "conv2", "proj", "fc"]
    for r in report.layers:
        assert (r["sigma_error"] is None) != weighted
        if weighted:  # exact on the data; free where sigma is singular (fc: 48 samples, n=72)
            assert r["sigma_error"] < 1e-7
        else:
            assert r["frobenius_error"] < 1e-9


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
def test_sigma_beats_frobenius_on_the_data_and_report_is_true(method, stats):
    model = _net()
    frob, rep_f = compress(model, method, ratio=2.5, layers=["conv2"], options=FAST,
                           progress=False)
    sig, rep_s = compress(model, method, ratio=2.5, layers=["conv2"], covariances=stats,
                          options=FAST, progress=False)
    kind = {"svd": LowRankConv2d, "tucker2": Tucker2Conv2d, "cp": CPConv2d}[method]
    assert isinstance(sig.conv2, kind) and isinstance(frob.conv2, kind)
    x = torch.cat(_data())
    with torch.no_grad():
        h = torch.relu(model.conv1(x))
        y = model.conv2(h)
        e_f = float(((frob.conv2(h) - y) ** 2).sum())
        e_s = float(((sig.conv2(h) - y) ** 2).sum())
        energy = float(((y - model.conv2.bias[:, None, None]) ** 2).sum())
    assert e_s <= e_f * (1 + 1e-9)
    # the reported relative Sigma-error is the measured relative output error
    assert rep_s.layers[0]["sigma_error"] == pytest.approx(math.sqrt(e_s / energy), rel=1e-7)
    r = rep_s.layers[0]
    expect = ratio_to_ranks((10, 8, 3, 2), method, 2.5)
    assert r["ranks"] == expect
    assert r["params_after"] == layer_params((10, 8, 3, 2), method, expect) + 10
    assert r["params_before"] == 10 * 8 * 6 + 10


def _dense_kernel(module, c_in, k):
    """The kernel of a stride-1 ``k x k`` conv module with zero padding ``k // 2``, read off
    its outputs: the centre output for a one-hot ``k x k`` input, minus the bias."""
    n = c_in * k * k
    with torch.no_grad():
        y = module(torch.eye(n, dtype=F64).reshape(n, c_in, k, k))[:, :, k // 2, k // 2]
        y0 = module(torch.zeros(1, c_in, k, k, dtype=F64))[:, :, k // 2, k // 2]
    return (y - y0).T.reshape(-1, c_in, k, k)


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt"])
def test_report_shows_both_errors_equal_to_recomputation(method, stats):
    # both columns of the report, per layer, recomputed from the factorized module itself
    model = _net()
    small, rep = compress(model, method, ratio=2.0, layers=["conv1"], covariances=stats,
                          options=FAST, progress=False)
    row = rep.layers[0]
    K = model.conv1.weight.detach()
    A = _dense_kernel(small.conv1, 3, 3)
    assert float((A - K).abs().max()) > 1e-6  # a real approximation, not the original
    D, K1 = (K - A).reshape(8, -1), K.reshape(8, -1)
    S = stats["conv1"].sigma.to(F64)
    frob = math.sqrt(float((D * D).sum()) / float((K1 * K1).sum()))
    sig = math.sqrt(float(((D @ S) * D).sum()) / float(((K1 @ S) * K1).sum()))
    assert row["frobenius_error"] == pytest.approx(frob, rel=1e-9)
    assert row["sigma_error"] == pytest.approx(sig, rel=1e-9)
    head = str(rep).splitlines()[1].split()
    assert "sigma_err" in head and "frob_err" in head
    cells = str(rep).splitlines()[3].split()  # the layer's row, read from the right
    assert f"{frob:.4f}" == cells[head.index("frob_err") - len(head)]
    assert f"{sig:.4f}" == cells[head.index("sigma_err") - len(head)]


def test_centered_bias_correction_lowers_the_output_error(stats):
    model = _net()
    plain, rp = compress(model, "svd", ratio=3, layers=["conv2", "fc"], covariances=stats,
                         progress=False)
    cent, rc = compress(model, "svd", ratio=3, layers=["conv2", "fc"], covariances=stats,
                        centered=True, progress=False)
    assert rc.centered and "centered" in str(rc)
    x = torch.cat(_data())
    with torch.no_grad():
        h = torch.relu(model.conv1(x))
        y = model.conv2(h)
        e_p = float(((plain.conv2(h) - y) ** 2).sum())
        e_c = float(((cent.conv2(h) - y) ** 2).sum())
        energy = float(((y - model.conv2.bias[:, None, None]) ** 2).sum())
    assert e_c < e_p
    assert rc.layers[0]["sigma_error"] == pytest.approx(math.sqrt(e_c / energy), rel=1e-7)
    assert rp.layers[0]["sigma_error"] == pytest.approx(math.sqrt(e_p / energy), rel=1e-7)


def test_report_totals_table_and_json(stats):
    model = _net()
    small, rep = compress(model, "tucker2", ratio=2, covariances=stats, options=FAST,
                          progress=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert rep.params_before == count(model) and rep.params_after == count(small)
    assert rep.ratio == pytest.approx(count(model) / count(small))
    assert rep.layer_params_before == sum(r["params_before"] for r in rep.layers)
    for r in rep.layers:
        mod = small.get_submodule(r["name"])
        assert r["params_after"] == count(mod)
    skipped = {s["name"]: s["reason"] for s in rep.skipped}
    assert "groups=2" in skipped["grouped"]
    text = str(rep)
    assert "conv2" in text and "skipped grouped" in text and f"{rep.ratio:.2f}" in text
    d = json.loads(rep.to_json())
    assert d["totals"]["params_after"] == rep.params_after
    assert [r["name"] for r in d["layers"]] == [r["name"] for r in rep.layers]
    assert "rX=" in repr(rep)
    # a layer that no rank can shrink is skipped with its reason
    tiny = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 9))
    _, rep = compress(tiny, "svd", ratio=2, layers=["0", "1"], progress=False)
    assert [r["name"] for r in rep.layers] == ["1"]
    assert "would not reduce" in rep.skipped[0]["reason"]


def test_inplace_and_layer_selection(stats):
    model = _net()
    same, rep = compress(model, "tucker2", ratio=2, layers=lambda n, m: n == "conv2",
                         inplace=True, options=FAST, progress=False)
    assert same is model and isinstance(model.conv2, Tucker2Conv2d)
    assert [r["name"] for r in rep.layers] == ["conv2"] and not rep.skipped
    # layers without statistics are skipped when not named, an error when named
    partial = {k: v for k, v in stats.items() if k != "proj"}
    _, rep = compress(_net(), "svd", ratio=2, covariances=partial, progress=False)
    assert any(s["name"] == "proj" and "no statistics" in s["reason"] for s in rep.skipped)


def test_ranks_from_evbmf_and_budget(stats):
    model = _net()
    _, rep = compress(model, "tucker2", ranks="evbmf", covariances=stats, options=FAST,
                      progress=False)
    for r in rep.layers:
        ranks = r["ranks"] if isinstance(r["ranks"], tuple) else (r["ranks"],)
        assert all(v >= 1 for v in ranks)
    names = ["conv2", "proj", "fc"]
    _, rep = compress(model, "tucker2", budget=0.5, layers=names, covariances=stats,
                      options=FAST, progress=False)
    assert [r["name"] for r in rep.layers] == names
    dense = sum(model.get_submodule(n).weight.numel() for n in names)
    biases = sum(model.get_submodule(n).bias.numel() for n in names)
    assert rep.layer_params_after - biases <= 0.5 * dense


def test_bad_inputs_raise_and_leave_the_model_unchanged(stats):
    model = _net()
    snap = _snapshot(model)
    cases = [
        (dict(method="tucker2", ratio=1.0), ValueError, "ratio=1.0"),
        (dict(method="tucker2", ratio=0.5), ValueError, "must be > 1"),
        (dict(method="tucker3", ratio=2), ValueError, "method='tucker3'"),
        (dict(method="tucker2", ranks={"conv2": (11, 2)}), ValueError, "conv2.*r_T"),
        (dict(method="svd", ranks={"fc": 6}), ValueError, "'fc'.*at most 5"),
        (dict(method="tucker2", ranks={"nope": 3}), ValueError, "'nope'"),
        (dict(method="tucker2", ratio=2, layers=["conv9"]), ValueError, "'conv9'"),
        (dict(method="tucker2", ratio=2, layers=["grouped"]), ValueError, "groups=2"),
        (dict(method="tucker2", ratio=2, layers=["fc"], covariances={}), ValueError,
         "no statistics"),
        (dict(method="tucker2", ratio=2, centered=True), ValueError, "needs covariances"),
        (dict(method="tucker2"), ValueError, "no way to choose ranks"),
        (dict(method="tucker2", ranks="auto"), ValueError, "'evbmf'"),
        (dict(method="tucker2", ratio=2, budget=0.5), ValueError, "budget"),
        (dict(method="tucker2", ratio=2, layers=["proj"], covariances={"proj": stats["fc"]}),
         ValueError, "were collected on a Linear with weight 5x72; the layer is a Conv2d"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            compress(model, inplace=True, progress=False, **kw)
        _unchanged(model, snap)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_float32_model_and_export(stats):
    model = _net(torch.float32)
    stats32 = collect_covariances(model, _data(1, torch.float32), progress=False)
    small, _ = compress(model, "cp", ratio=2, layers=["conv2", "proj", "fc"],
                        covariances=stats32, options=FAST, progress=False)
    assert all(p.dtype == torch.float32 for p in small.parameters())
    x = _data(1, torch.float32)[0]
    with torch.no_grad():
        y = small(x)
        scripted = torch.jit.script(small)
        assert torch.allclose(scripted(x), y, atol=1e-6)
        exported = torch.export.export(small, (x,))
        assert torch.allclose(exported.module()(x), y, atol=1e-6)
    # state_dict round trip into a second compression of the same architecture
    other, _ = compress(model, "cp", ratio=2, layers=["conv2", "proj", "fc"], progress=False,
                        options={"n_iter_max": 1})
    buf = io.BytesIO()
    torch.save(small.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(other(x), y)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_onnx_export_of_a_compressed_model():
    onnx = pytest.importorskip("onnx")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
    small, _ = compress(model, "cp", ratio=2, layers=["0", "2"], progress=False,
                        options={"n_iter_max": 2})
    buf = io.BytesIO()
    torch.onnx.export(small, (torch.randn(2, 3, 6, 6),), buf, dynamo=False)
    graph = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(graph)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("Conv") == 8  # two CP layers of four plain convolutions each


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_model_is_collected_and_compressed_on_the_gpu():
    model = _net().cuda()
    data = [x.cuda() for x in _data(1)]
    stats = collect_covariances(model, data, progress=False)
    assert all(s.sigma.is_cuda for s in stats.values())
    small, _ = compress(model, "tucker2", ratio=2, layers=["conv2", "fc"], covariances=stats,
                        options=FAST, progress=False)
    assert all(p.is_cuda for p in small.parameters())
    with torch.no_grad():
        assert small(data[0]).is_cuda


def test_compress_tt_method_convs_and_linear():
    import torch
    from torch import nn

    from sigmadecomp_torch import collect_covariances, compress
    from sigmadecomp_torch.tt_layers import TTConv2d, TTLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 36, 12)).double()
    data = [torch.randn(8, 4, 6, 6, dtype=torch.float64) for _ in range(3)]
    before = [p.detach().clone() for p in model.parameters()]
    stats = collect_covariances(model, data, progress=False)
    small, report = compress(model, "tt", covariances=stats, ratio=2, layers=["2", "5"],
                             options={"n_iter_max": 10}, progress=False)  # fast; not convergence
    assert isinstance(small[2], TTConv2d) and isinstance(small[5], TTLinear)
    rows = {r["name"]: r for r in report.to_dict()["layers"]}
    assert set(rows) == {"2", "5"}
    for row in rows.values():
        assert row["params_after"] < row["params_before"]
        assert 0.0 <= row["sigma_error"] < 1.0
    # the original is untouched, and the Sigma error reported is the output error measured
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    x = data[0]
    assert small(x).shape == model(x).shape
    # full TT ranks reproduce the model
    full, _ = compress(model, "tt", ranks={"2": 10**6}, layers=["2"], progress=False)
    torch.testing.assert_close(full(x), model(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("stats_dtype", [F64, torch.float32])
def test_compress_holds_the_float64_statistics_of_one_layer_at_a_time(centered, stats_dtype,
                                                                      monkeypatch):
    # a network's statistics are large (ResNet-50: 951 MiB in float64); compress used
    # to hold a float64 copy of every layer's for the whole call, two with centered=True
    C = _compress_module()
    made = _track_prepared(monkeypatch)
    seen = []
    real = C.decompose_layer

    def decompose(plan):
        seen.append((plan.name, [p for p in made if p.held]))
        return real(plan)

    monkeypatch.setattr(C, "decompose_layer", decompose)
    model = _net()
    st = collect_covariances(model, _data(), progress=False, dtype=stats_dtype)
    small, report = compress(model, "tucker2", covariances=st, ratio=2, centered=centered,
                             layers=["conv1", "conv2", "proj", "fc"], options=FAST,
                             progress=False)
    assert len(seen) == len(report.layers) == 4
    assert len(made) == len(report.layers)  # one per statistic, centered or not
    for name, held in seen:  # nothing held when a layer starts: built on its first use
        assert held == [], (name, len(held))
    assert not any(p.held for p in made)  # all released at the end
    # the reported errors are those of the statistics as given, recomputed independently
    for row in report.layers:
        s = st[row["name"]]
        W = model.get_submodule(row["name"]).weight.detach().to(F64)
        W = W.reshape(W.shape[0], -1)
        D = W - _dense_weight(small.get_submodule(row["name"])).reshape(W.shape[0], -1)
        M = (s.centered() if centered else s.sigma).to(F64)
        err = math.sqrt(float(torch.sum((D @ M) * D))
                        / float(torch.sum((W @ s.sigma.to(F64)) * W)))
        assert math.isclose(err, row["sigma_error"], rel_tol=1e-6, abs_tol=1e-9)


def _compress_module():
    import importlib

    return importlib.import_module("sigmadecomp_torch.compress")  # not the function


def _track_prepared(monkeypatch):
    """A list that receives every PreparedSigma that compress makes from now on."""
    made = []
    cls = _compress_module().PreparedSigma
    init = cls.__init__

    def tracked_init(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(cls, "__init__", tracked_init)
    return made


def _dense_weight(new):
    """The kernel a factorized layer computes, from its own sub-layers' weights."""
    with torch.no_grad():
        if isinstance(new, Tucker2Conv2d):
            return torch.einsum("ta,abhw,bs->tshw", new.last.weight[:, :, 0, 0].to(F64),
                                new.core.weight.to(F64), new.first.weight[:, :, 0, 0].to(F64))
        first = new.first.weight.to(F64)
        last = new.last.weight.to(F64)
        return last.reshape(last.shape[0], -1) @ first.reshape(first.shape[0], -1)


def test_budget_allocation_holds_one_conv_statistic_at_a_time_and_gets_the_same_ranks(
        stats, monkeypatch):
    import importlib

    from sigmadecomp.ranks import LayerSpec, allocate_ranks

    A = importlib.import_module("sigmadecomp.allocation")
    made = _track_prepared(monkeypatch)
    held_at_curve = []
    curve = A.error_curve

    def tracked_curve(weight, method, sigma=None, **kw):
        held_at_curve.append((method, [p for p in made if p.held and p is not sigma]))
        return curve(weight, method, sigma, **kw)

    monkeypatch.setattr(A, "error_curve", tracked_curve)
    model = _net()
    layers = ["conv1", "conv2", "proj", "fc"]
    methods = {"conv1": "tucker2", "conv2": "tucker2", "proj": "svd", "fc": "svd"}
    budget = sum(model.get_submodule(n).weight.numel() for n in layers) // 2
    small, report = compress(model, "tucker2", covariances=stats, budget=budget,
                             layers=layers, options=FAST, progress=False)
    assert [m for m, _ in held_at_curve] == [methods[n] for n in layers]
    svd_sigmas = {id(made[i]) for i, n in enumerate(layers) if methods[n] == "svd"}
    for _, others in held_at_curve:  # besides the layer's own: only Sigma-SVD statistics
        assert all(id(p) in svd_sigmas for p in others)
    assert not any(p.held for p in made)
    # the same ranks as an allocation over plain float64 matrices
    monkeypatch.setattr(A, "error_curve", curve)
    specs = {n: LayerSpec(model.get_submodule(n).weight.detach().to(F64),
                          stats[n].sigma.to(F64)) for n in layers}
    want = allocate_ranks(specs, budget, method=methods)
    got = {r["name"]: r["ranks"] for r in report.layers}
    assert got == {n: tuple(v) if isinstance(v, (tuple, list)) else v for n, v in want.items()}


class _ClassifierRegisteredEarly(nn.Module):
    """Registered stem, classifier, body1, body2; called stem, body1, body2, classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = nn.Linear(8, 4)
        self.body1 = nn.Conv2d(8, 8, 3, padding=1)
        self.body2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.body1(torch.relu(self.stem(x))))
        return self.classifier(torch.relu(self.body2(x)).mean((2, 3)))


def test_default_layers_follow_the_call_order_when_compress_has_an_input():
    torch.manual_seed(0)
    model = _ClassifierRegisteredEarly().double().train()
    batches = [torch.randn(4, 3, 6, 6, dtype=F64) for _ in range(3)]
    snap = _snapshot(model)

    def check(report):
        assert [r["name"] for r in report.layers] == ["body1", "body2"]
        reasons = {(s["name"], s["reason"].split(" (")[0]) for s in report.skipped}
        assert {("stem", "first layer"), ("classifier", "last layer")} <= reasons

    kw = dict(ratio=2, options=FAST, progress=False)
    small, report = compress(model, "tucker2", data=batches, **kw)
    check(report)
    # a one-shot iterator: the batch read for the order still enters the statistics
    from_gen, _ = compress(model, "tucker2", data=(b for b in batches), **kw)
    stats = collect_covariances(model, batches, progress=False)
    ref, _ = compress(model, "tucker2", covariances=stats, layers=["body1", "body2"], **kw)
    for a, b in zip(from_gen.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(small.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    check(compress(model, "tucker2", data=batches, sequential=True, **kw)[1])
    check(compress(model, "tucker2", data=batches, refit="all", **kw)[1])
    check(compress(model, "tucker2", covariances=stats, example_input=batches[0], **kw)[1])
    # without an input the registration order decides, as default_layers documents
    _, report = compress(model, "tucker2", covariances=stats, **kw)
    assert [r["name"] for r in report.layers] == ["classifier", "body1"]
    _unchanged(model, snap)
    assert model.training


@pytest.mark.parametrize("extra", [{}, {"budget": 0.6, "ratio": None}, {"refit": "all"},
                                   {"sequential": True}, {"centered": True}])
def test_a_default_layer_that_never_runs_on_data_is_skipped_with_the_reason(extra):
    torch.manual_seed(0)
    model = WithUnusedConv(3, 8, 4).double()
    batches = [torch.randn(4, 3, 6, 6, dtype=F64) for _ in range(2)]
    kw = {"ratio": 2, "options": FAST, "progress": False, **extra}
    small, report = compress(model, "tucker2", data=batches, **kw)
    assert [r["name"] for r in report.layers] == ["body", "tail"]
    reason = {s["name"]: s["reason"] for s in report.skipped}["unused"]
    assert "never ran in the forward pass" in reason
    assert type(small.unused) is nn.Conv2d and small(batches[0]).shape == (4, 4)
    # a layer the user names still has to run
    with pytest.raises(ValueError, match="'unused' never ran"):
        compress(model, "tucker2", data=batches, ratio=2, layers=["body", "unused"],
                 options=FAST, progress=False)


class _RecordingBar(list):
    """What compress uses of a tqdm bar, recording the texts it is given."""

    def __init__(self, items):
        super().__init__(items)
        self.shown = []

    def set_postfix_str(self, text, refresh=True):
        self.shown.append(text)


def test_the_progress_bar_shows_each_layers_sweeps_without_changing_the_result(monkeypatch):
    import importlib

    C = importlib.import_module("sigmadecomp_torch.compress")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3),
                          nn.Conv2d(8, 4, 3)).double()
    stats = collect_covariances(model, [torch.randn(8, 4, 12, 12, dtype=F64)], progress=False)
    kw = dict(ratio=2, covariances=stats, options={"n_iter_max": 3})
    for method in ("cp", "tucker2", "tt"):
        plain, _ = compress(model, method, progress=False, **kw)
        bars = []
        monkeypatch.setattr(C, "_progress", lambda it, **_: bars.append(_RecordingBar(it)) or bars[-1])
        shown, report = compress(model, method, progress=True, **kw)
        monkeypatch.undo()
        for a, b in zip(plain.state_dict().values(), shown.state_dict().values()):
            assert torch.equal(a, b), method
        texts = bars[0].shown
        assert len(texts) == 8  # two layers, the start and three sweeps each
        assert texts[0].startswith("1: sweep 0/3, error ") and texts[-1].startswith("2: sweep 3/3")
        assert float(texts[3].rsplit(" ", 1)[1]) == pytest.approx(
            report.layers[0]["sigma_error"], rel=1e-3)


class _TwoStemsTwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem_a, self.stem_b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head_a, self.head_b = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.body(torch.relu(self.stem_a(x) + self.stem_b(x)))).mean((2, 3))
        return {"a": self.head_a(h), "b": self.head_b(h)}


def test_every_stem_and_every_head_is_left_alone_when_compress_has_an_input():
    torch.manual_seed(0)
    model = _TwoStemsTwoHeads().double()
    for m in (model.stem_b, model.head_a):
        m.train(False)  # a mixed-mode model: every module's mode comes back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    _, report = compress(model, "tucker2", data=[x], ratio=2, options=FAST, progress=False)
    assert [r["name"] for r in report.layers] == ["body"]
    firsts = {s["name"] for s in report.skipped if s["reason"].startswith("first layer")}
    lasts = {s["name"] for s in report.skipped if s["reason"].startswith("last layer")}
    assert firsts == {"stem_a", "stem_b"} and lasts == {"head_a", "head_b"}
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_default_layers_chosen_on_example_input_that_never_run_on_data_are_skipped():
    """With example_input the default layers come from its pass; a layer it calls that the
    data never reach (and the reverse) is skipped with the reason, not an error about a
    layer the user never chose."""
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1)
            self.small = nn.Conv2d(6, 6, 3, padding=1)  # inputs of side < 8
            self.large = nn.Conv2d(6, 6, 3, padding=1)  # inputs of side >= 8
            self.tail = nn.Conv2d(6, 6, 3, padding=1)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = torch.relu((self.small if x.shape[-1] < 8 else self.large)(h))
            return self.head(torch.relu(self.tail(h)).mean((2, 3)))

    torch.manual_seed(0)
    model = Gate().double()
    data = [torch.randn(4, 3, 6, 6, dtype=F64) for _ in range(2)]  # runs `small`
    example = torch.randn(1, 3, 9, 9, dtype=F64)  # runs `large`
    _, report = compress(model, "tucker2", data=data, example_input=example, ratio=1.5,
                         options=FAST, progress=False)
    assert [r["name"] for r in report.layers] == ["tail"]
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["large"].startswith("never ran in the forward pass on data")
    assert reasons["small"].startswith("never ran in the forward pass on data")


def test_progress_of_a_closed_form_tt_shows_no_sweep_number(monkeypatch):
    import importlib

    # TT without statistics is the TT-SVD, a closed form (n_iter None): the bar shows the
    # layer and its error, never "sweep None"
    C = importlib.import_module("sigmadecomp_torch.compress")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3)).double()
    bars = []
    monkeypatch.setattr(C, "_progress", lambda it, **_: bars.append(_RecordingBar(it)) or bars[-1])
    compress(model, "tt", ratio=2, progress=True)
    texts = bars[0].shown
    assert texts and all("None" not in t and "sweep" not in t for t in texts), texts
    assert all(t.split(": ")[0] in {"0", "1", "2"} and ": error " in t for t in texts), texts


def test_layers_all_compresses_every_conv_and_linear_unless_a_module_is_named_all():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3))
    _, report = compress(model, "tucker2", ratio=2, layers="all", progress=False)
    assert [r["name"] for r in report.layers] == ["0", "1", "2"] and report.skipped == []
    _, default = compress(model, "tucker2", ratio=2, progress=False)
    assert [r["name"] for r in default.layers] == ["1"]  # the default keeps first and last
    # the same word in select_layers / collect_covariances
    from sigmadecomp_torch import select_layers

    assert [n for n, _ in select_layers(model, "all")] == ["0", "1", "2"]
    # a module really named 'all' is that module
    named = nn.Sequential()
    named.add_module("first", nn.Conv2d(3, 8, 3))
    named.add_module("all", nn.Conv2d(8, 8, 3))
    named.add_module("last", nn.Conv2d(8, 4, 3))
    _, report = compress(named, "tucker2", ratio=2, layers="all", progress=False)
    assert [r["name"] for r in report.layers] == ["all"]


def test_an_option_the_solver_does_not_take_is_refused_before_any_work():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3))
    for method, solver in (("tucker2", "tucker2"), ("cp", "cp"), ("svd", "sigma_svd")):
        with pytest.raises(TypeError, match=rf"options contains 'n_iter', which "
                                            rf"method='{method}' does not take; the options "
                                            rf"of sigmadecomp.{solver} are: init, n_iter_max"):
            compress(model, method, ratio=2, options={"n_iter": 5}, progress=False)
    # the solvers' deprecated spellings still pass (with their warning)
    with pytest.warns(DeprecationWarning, match="inner_rtol"):
        compress(model, "cp", ratio=2, options={"inner_rtol": 1e-6, "n_iter_max": 2,
                                                "tol": 0.5}, progress=False)


def test_statistics_under_names_no_module_has_are_named_in_a_warning():
    import warnings

    from sigmadecomp import CompressionWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3)).double()
    stats = collect_covariances(model, [torch.randn(4, 3, 10, 10, dtype=F64)], progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compress(model, "tucker2", covariances=stats, ratio=2, progress=False)
    assert not [w for w in seen if "no module of the model" in str(w.message)]
    wrapped = nn.Sequential(model)  # names '0.0', '0.1', ...: the statistics' are '0', ...
    with pytest.warns(CompressionWarning, match=r"covariances has statistics for 2 name\(s\) "
                                                r"that are no module of the model: '1', '2'"):
        with pytest.raises(ValueError, match="'0.1' cannot be compressed: no statistics"):
            compress(wrapped, "tucker2", covariances={k: stats[k] for k in ("1", "2")},
                     ratio=2, layers=["0.1"], progress=False)


def test_a_layer_given_its_own_ranks_is_named_and_raises_when_it_cannot_be_compressed():
    # ranks={'1': 4} names the grouped conv '1': with ratio= for the others too, one-shot and
    # sequential, it raises as ranks= alone does, instead of being skipped without a word
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3),
                          nn.Conv2d(8, 4, 3))
    data = [torch.randn(2, 3, 12, 12)]
    msg = r"layer '1' cannot be compressed: grouped convolution \(groups=8\)"
    for kw in (dict(), dict(ratio=2), dict(ratio=2, data=data, sequential=True)):
        with pytest.raises(ValueError, match=msg):
            compress(model, "svd", ranks={"1": 4}, progress=False, **kw)
    # not named: skipped with its reason, the others compressed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in (dict(), dict(data=data, sequential=True)):
            _, report = compress(model, "svd", ratio=2, progress=False, **kw)
            assert [r["name"] for r in report.layers] == ["2"]
            assert any(s["name"] == "1" and "grouped" in s["reason"] for s in report.skipped)
