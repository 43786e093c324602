"""compress on the models users bring: bare layers, attention, shared and tied
modules, frozen parameters, odd layer kinds, the default layer choice, warnings
and errors that say which layer."""

import math
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp import CompressionWarning, ConvergenceWarning  # noqa: E402
from sigmadecomp_torch import (  # noqa: E402
    LAYER_METHODS,
    SIGMA_ERROR_WARN,
    CPConv2d,
    LayerStats,
    LowRankConv2d,
    LowRankLinear,
    Tucker2Conv2d,
    collect_covariances,
    compress,
    default_layers,
)
from sigmadecomp_torch.compress import LayerMethod  # noqa: E402

F64 = torch.float64
QUIET = [pytest.mark.filterwarnings("ignore::sigmadecomp.ConvergenceWarning"),
         pytest.mark.filterwarnings("ignore::sigmadecomp.CompressionWarning")]


def _count(m):
    return sum(p.numel() for p in m.parameters())


def _seq_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(12, 12, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 5)).to(F64).eval()


def _images(n=3, shape=(16, 3, 8, 8)):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g, dtype=F64) for _ in range(n)]


# ---------------------------------------------------------------- 11.7 bare layers


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_bare_conv_or_linear_comes_back_compressed(weighted, inplace):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1).to(F64)
    lin = nn.Linear(12, 10).to(F64)
    cases = [(conv, "tucker2", (8, 6), torch.randn(20, 6, 5, 5, dtype=F64), Tucker2Conv2d),
             (lin, "svd", 10, torch.randn(40, 12, dtype=F64), LowRankLinear)]
    for layer, method, full, x, kind in cases:
        stats = collect_covariances(layer, [x], progress=False) if weighted else None
        if weighted:
            assert list(stats) == [""]
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        # full ranks: the returned module computes what the layer computed
        out, rep = compress(layer, method, ranks={"": full}, covariances=stats,
                            inplace=inplace, progress=False, options={"n_iter_max": 3})
        assert isinstance(out, kind) and out is not layer
        assert [r["name"] for r in rep.layers] == [""]
        assert rep.params_after == _count(out) == rep.layers[0]["params_after"]
        with torch.no_grad():
            torch.testing.assert_close(out(x), layer(x), rtol=1e-9, atol=1e-9)
        # a compressing ratio with the default layer choice: the layer itself
        small, rep = compress(layer, method, ratio=2, covariances=stats, inplace=inplace,
                              progress=False, options={"n_iter_max": 3})
        assert isinstance(small, kind) and _count(small) < _count(layer)
        assert rep.params_after == _count(small) and rep.ratio > 1.5
        assert "(model)" in rep.table()
        # the layer given is never modified (it cannot turn into another class)
        assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
        assert default_layers(layer) == [""]


# ------------------------------------------------------ 11.8 attention, transformers


class AttnNet(nn.Module):
    """Tokens -> Linear -> MHA -> TransformerEncoderLayer -> Linear -> head."""

    def __init__(self, d=16):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.block = nn.TransformerEncoderLayer(d, 2, dim_feedforward=24, dropout=0.0,
                                                batch_first=True)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.block(h + a)
        return self.head(torch.relu(self.mix(h)))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_attention_and_transformer_layers_run_after_compress(weighted, train):
    torch.manual_seed(0)
    model = AttnNet().train(train)
    data = [torch.randn(4, 7, 6) for _ in range(3)]
    stats = collect_covariances(model, data, progress=False) if weighted else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        small, rep = compress(model, "svd", ratio=2, covariances=stats, progress=False)
    x = torch.randn(2, 7, 6)
    for grad in (False, True):  # inference also takes the fused fast path of the encoder layer
        with torch.set_grad_enabled(grad):
            small.eval()
            assert small(x).shape == (2, 7, 3)
            small.train()
            assert small(x).shape == (2, 7, 3)
    assert isinstance(small.mix, LowRankLinear)
    skipped = {s["name"]: s["reason"] for s in rep.skipped}
    for name in ("attn.out_proj", "block.self_attn.out_proj", "block.linear1", "block.linear2"):
        assert type(small.get_submodule(name)) is type(model.get_submodule(name))
        if weighted and name.endswith("out_proj"):
            # the attention never calls out_proj, so no statistics reach it
            assert name in skipped
        else:
            assert "reads its weight/bias directly" in skipped[name], skipped
    # naming such a layer is an error that says why
    with pytest.raises(ValueError, match="block.linear1.*MultiheadAttention|linear1.*reads"):
        compress(model, "svd", ratio=2, layers=["block.linear1"], progress=False)


# ------------------------------------------- 11.9 shared, tied and frozen parameters


class SharedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        lin = nn.Linear(16, 16)
        self.a = lin
        self.b = lin  # the same module under two names, applied twice
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.b(torch.relu(self.a(h)))))


@pytest.mark.parametrize("layers", [None, ["a"], ["b"]])
def test_a_module_under_two_names_stays_one_module(layers):
    torch.manual_seed(0)
    model = SharedNet().to(F64)
    data = [torch.randn(32, 8, dtype=F64) for _ in range(2)]
    stats = collect_covariances(model, data, progress=False)
    small, rep = compress(model, "svd", ranks={"a": 16} if layers is None else None,
                          ratio=None if layers is None else 2, layers=layers,
                          covariances=stats, progress=False)
    assert isinstance(small.a, LowRankLinear) and small.a is small.b
    assert [r["name"] for r in rep.layers] == ["a"]
    assert rep.layers[0]["aliases"] == ["b"]
    assert "a = b" in rep.table()
    assert rep.params_after == _count(small)
    if layers is None:  # full rank: the model computes what it computed
        with torch.no_grad():
            torch.testing.assert_close(small(data[0]), model(data[0]), rtol=1e-9, atol=1e-9)
    else:
        assert rep.params_after < rep.params_before


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(10, 10)
        self.emb = nn.Embedding(20, 12)
        self.mid = nn.Linear(12, 12)
        self.twin = nn.Linear(12, 12)
        self.twin.weight = self.mid.weight  # two layers sharing one weight
        self.other = nn.Linear(12, 12)
        self.dec = nn.Linear(12, 20, bias=False)
        self.dec.weight = self.emb.weight  # output projection tied to the embedding
        self.last = nn.Linear(20, 2)

    def forward(self, tokens):
        h = self.emb(tokens)
        h = torch.relu(self.twin(torch.relu(self.mid(h))))
        return self.last(self.dec(self.other(h)))


@pytest.mark.filterwarnings("ignore::sigmadecomp.CompressionWarning")
def test_tied_weights_are_left_tied_with_a_reason():
    torch.manual_seed(0)
    model = TiedNet()
    small, rep = compress(model, "svd", ranks={"other": 12}, ratio=2, progress=False)
    assert [r["name"] for r in rep.layers] == ["other"]
    skipped = {s["name"]: s["reason"] for s in rep.skipped}
    assert "tied to 'emb'.weight" in skipped["dec"]
    assert "tied to 'twin'.weight" in skipped["mid"] and "tied to 'mid'.weight" in skipped["twin"]
    assert small.dec.weight is small.emb.weight and small.mid.weight is small.twin.weight
    tokens = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(small(tokens), model(tokens))
    with pytest.raises(ValueError, match="'mid' cannot be compressed.*tied"):
        compress(model, "svd", ratio=2, layers=["mid"], progress=False)


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
def test_requires_grad_carries_over_to_the_factors(method):
    model = _seq_cnn()
    model[2].weight.requires_grad_(False)        # frozen kernel, trainable bias
    model[4].requires_grad_(False)               # frozen layer
    small, rep = compress(model, method, ranks={"2": 4 if method != "tucker2" else (6, 4),
                                                "4": 6},
                          progress=False, options={"n_iter_max": 2})
    assert {r["name"] for r in rep.layers} == {"2", "4"}
    flags = {n: p.requires_grad for n, p in small[2].named_parameters()}
    assert flags and all(not f for n, f in flags.items() if not n.endswith("bias"))
    assert flags[[n for n in flags if n.endswith("bias")][0]] is True
    assert all(not p.requires_grad for p in small[4].parameters())
    assert all(p.requires_grad for p in small[0].parameters())  # untouched layers as they were


# --------------------------------------------- 11.10 what is skipped, and warnings


class OddNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.c1 = nn.Conv1d(4, 4, 3, padding=1)
        self.c3 = nn.Conv3d(1, 1, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.body = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        n, c, hh, ww = h.shape
        h = self.c1(h.reshape(n, c, hh * ww)).reshape(n, c, hh, ww)
        h = self.c3(h[:, None]).squeeze(1)
        h = torch.relu(self.body(self.up(h)))
        return self.head(h.mean((2, 3)))


def test_every_skipped_module_kind_is_reported_with_its_reason():
    torch.manual_seed(0)
    model = OddNet()
    small, rep = compress(model, "tucker2", ratio=2, progress=False, options={"n_iter_max": 2})
    skipped = {s["name"]: (s["kind"], s["reason"]) for s in rep.skipped}
    assert skipped["c1"][0] == "Conv1d" and "not factorized" in skipped["c1"][1]
    assert skipped["c3"][0] == "Conv3d" and "not factorized" in skipped["c3"][1]
    assert skipped["up"][0] == "ConvTranspose2d" and "transposed" in skipped["up"][1]
    assert "first layer" in skipped["stem"][1] and "last layer" in skipped["head"][1]
    assert [r["name"] for r in rep.layers] == ["body"]
    text = rep.table()
    assert all(f"skipped {n} " in text for n in ("c1", "c3", "up", "stem", "head"))
    assert small(torch.randn(1, 2, 4, 4)).shape == (1, 3)


def test_subclass_overriding_forward_is_skipped():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledConv(4, 6, 3), nn.Conv2d(6, 6, 3),
                          nn.Conv2d(6, 2, 1))
    small, rep = compress(model, "tucker2", ratio=2, progress=False, options={"n_iter_max": 2})
    reasons = {s["name"]: s["reason"] for s in rep.skipped}
    assert "overrides forward()" in reasons["1"] and type(small[1]) is ScaledConv
    assert isinstance(small[2], Tucker2Conv2d)


def test_explicit_ranks_that_grow_a_layer_warn():
    model = _seq_cnn()
    with pytest.warns(CompressionWarning, match=r"layer '4'.*more than the 144"):
        small, _ = compress(model, "svd", ranks={"4": 12}, progress=False)
    assert isinstance(small[4], LowRankConv2d)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)
        compress(model, "svd", ranks={"4": 5}, progress=False)  # 120 < 144: no warning


def test_huge_cp_rank_warns_before_any_work(monkeypatch):
    calls = []

    def spy(weight, ranks, sigma, options):
        calls.append(ranks)
        raise AssertionError("decomposition started")

    monkeypatch.setitem(LAYER_METHODS, "cp",
                        LayerMethod("cp", spy, LAYER_METHODS["cp"].build))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3), nn.Conv2d(64, 2, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message="CP rank", category=CompressionWarning)
        with pytest.raises(CompressionWarning, match=r"CP rank 20000 for layer '1'.*min"):
            compress(model, "cp", ranks={"1": 20000}, progress=False)
    assert calls == []
    # ranks from a ratio on a large layer do not warn about the cost
    big = nn.Sequential(nn.Conv2d(3, 512, 1), nn.Conv2d(512, 512, 3), nn.Conv2d(512, 2, 1))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(AssertionError, match="decomposition started"):
            compress(big, "cp", ratio=3, layers=["1"], progress=False)
    assert not [w for w in seen if issubclass(w.category, CompressionWarning)]
    assert len(calls) == 1


def test_converged_in_the_report_and_a_warning_when_not():
    model = _seq_cnn()
    with pytest.warns(ConvergenceWarning, match=r"layer '2'.*1 iterations"):
        _, rep = compress(model, "cp", ratio=2, layers=["2", "4"], progress=False,
                          options={"n_iter_max": 1, "tol": 1e-12})
    rows = {r["name"]: r for r in rep.to_dict()["layers"]}
    assert rows["2"]["converged"] is False and rows["4"]["converged"] is None  # 1x1: closed form
    assert "conv" in rep.table().splitlines()[1] and " NO " in rep.table()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        _, rep = compress(model, "tucker2", ratio=2, layers=["2"], progress=False,
                          options={"n_iter_max": 200, "tol": 1e-3})
    assert rep.layers[0]["converged"] is True


# -------------------------------------------------- 11.11 errors name the layer


def test_an_error_inside_a_layer_names_it_and_keeps_type_and_cause():
    model = _seq_cnn()
    data = _images()
    stats = dict(collect_covariances(model, data, progress=False))
    bad = stats["4"].sigma.clone()
    bad[0, 0] = -10 * bad.abs().max()  # indefinite: the Sigma-SVD refuses it
    stats["4"] = LayerStats(bad, stats["4"].mean, stats["4"].count)
    with pytest.raises(ValueError, match=r"^layer '4': .*positive semi-definite") as info:
        compress(model, "svd", ratio=2, layers=["2", "4"], covariances=stats, progress=False)
    assert isinstance(info.value.__cause__, ValueError)
    assert "layer '4'" not in str(info.value.__cause__)

    def broken(weight, ranks, sigma, options):
        raise RuntimeError("solver exploded")

    LAYER_METHODS["broken"] = LayerMethod("tucker2", broken, LAYER_METHODS["tucker2"].build)
    try:
        with pytest.raises(RuntimeError, match=r"^layer '2': solver exploded$") as info:
            compress(model, "broken", ratio=2, layers=["2"], progress=False)
        assert str(info.value.__cause__) == "solver exploded"

        def odd(weight, ranks, sigma, options):  # a type that cannot take a plain message
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

        LAYER_METHODS["broken"] = LayerMethod("tucker2", odd, LAYER_METHODS["tucker2"].build)
        with pytest.raises(UnicodeDecodeError) as info:
            compress(model, "broken", ratio=2, layers=["2"], progress=False)
        assert "layer '2'" in "".join(info.value.__notes__)
    finally:
        del LAYER_METHODS["broken"]


# ------------------------------------------------------------- 11.14 meta device


def test_meta_model_or_statistics_are_refused():
    with torch.device("meta"):
        meta = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 2, 1))
    with pytest.raises(ValueError, match=r"parameter '0.weight' on the meta device"):
        compress(meta, "tucker2", ratio=2, progress=False)
    model = _seq_cnn()
    stats = dict(collect_covariances(model, _images(1), progress=False))
    stats["2"] = stats["2"].to("meta")
    with pytest.raises(ValueError, match=r"covariances\['2'\] is on the meta device"):
        compress(model, "tucker2", ratio=2, covariances=stats, progress=False)


# ------------------------------------------------ 15.1 the default layer choice


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt"])
def test_default_leaves_the_first_conv_and_the_classifier_alone(method):
    model = _seq_cnn()
    stats = collect_covariances(model, _images(), progress=False)
    assert default_layers(model) == ["2", "4"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, rep = compress(model, method, covariances=stats, ratio=3, progress=False,
                              options={"n_iter_max": 2} if method in ("tucker2", "cp") else None)
    assert type(small[0]) is nn.Conv2d and type(small[8]) is nn.Linear
    assert torch.equal(small[0].weight, model[0].weight)
    assert torch.equal(small[8].weight, model[8].weight)
    assert {r["name"] for r in rep.layers} == {"2", "4"}
    reasons = {s["name"]: s["reason"] for s in rep.skipped}
    assert "first layer" in reasons["0"] and "last layer" in reasons["8"]
    # named or in ranks=, the first and the last layer are compressed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = compress(model, "svd", covariances=stats, ratio=3,
                          ranks={"8": 2}, progress=False)
    assert {r["name"] for r in rep.layers} == {"2", "4", "8"}
    assert default_layers(model, include_first=True, include_last=True) == ["0", "2", "4", "8"]


def test_high_sigma_error_warns_and_a_faithful_layer_does_not():
    model = _seq_cnn()
    stats = collect_covariances(model, _images(), progress=False)
    with pytest.warns(CompressionWarning, match=rf"layer '2': relative Sigma-error .* > "
                                                rf"{SIGMA_ERROR_WARN}"):
        _, rep = compress(model, "svd", covariances=stats, ranks={"2": 1}, progress=False)
    assert rep.layers[0]["sigma_error"] > SIGMA_ERROR_WARN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", message=".*Sigma-error", category=CompressionWarning)
        _, rep = compress(model, "svd", covariances=stats, ranks={"2": 12}, progress=False)
    assert rep.layers[0]["sigma_error"] < 1e-6


# ------------------------------------ shared statistics are prepared once (issue 11.12)


def test_layers_sharing_one_statistic_share_its_prepared_sigma(monkeypatch):
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 8)
            self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.q(h) * self.k(h) + self.v(h))

    torch.manual_seed(0)
    model = QKV().to(F64)
    stats = dict(collect_covariances(model, [torch.randn(50, 5, dtype=F64)], progress=False))
    shared = stats["q"]
    stats["k"] = stats["v"] = shared  # one statistic for the three readers of h
    seen = []
    svd = LAYER_METHODS["svd"]

    def spy(weight, ranks, sigma, options):
        seen.append(sigma)
        return svd.decompose(weight, ranks, sigma, options)

    monkeypatch.setitem(LAYER_METHODS, "svd", LayerMethod("svd", spy, svd.build))
    small, rep = compress(model, "svd", ratio=2, covariances=stats, centered=True,
                          layers=["q", "k", "v"], progress=False)
    assert [r["name"] for r in rep.layers] == ["q", "k", "v"]
    assert seen[0] is seen[1] is seen[2]
    # the prepared statistic (one object, so one factorization for the three layers)
    torch.testing.assert_close(seen[0].matrix, shared.centered())
    # the same answer as with three separate copies of the statistic
    copies = {k: LayerStats(s.sigma.clone(), s.mean.clone(), s.count) for k, s in stats.items()}
    seen.clear()
    other, rep2 = compress(model, "svd", ratio=2, covariances=copies, centered=True,
                           layers=["q", "k", "v"], progress=False)
    assert seen[0] is not seen[1]
    for a, b in zip(rep.layers, rep2.layers):
        assert a["sigma_error"] == pytest.approx(b["sigma_error"], rel=1e-12)
    x = torch.randn(4, 5, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(small(x), other(x))


@pytest.mark.parametrize("kind", [CPConv2d, Tucker2Conv2d])
def test_compressed_models_of_every_default_stay_runnable(kind):
    # a ResNet-like model with a shared block, a frozen layer and a grouped conv
    torch.manual_seed(0)
    block = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), block, nn.ReLU(), block,
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Flatten(),
                          nn.Linear(8 * 16, 4))
    model[4].requires_grad_(False)
    method = "cp" if kind is CPConv2d else "tucker2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, rep = compress(model, method, ratio=2, progress=False,
                              options={"n_iter_max": 2})
    assert isinstance(small[1], kind) and small[1] is small[3]
    assert rep.params_after == _count(small) < rep.params_before
    assert small(torch.randn(2, 3, 4, 4)).shape == (2, 4)
    assert math.isfinite(rep.ratio)


def test_default_layers_follow_the_forward_pass_when_given_an_input():
    class Backwards(nn.Module):  # classifier registered before the convs
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 2)
            self.conv1 = nn.Conv2d(1, 4, 3)
            self.conv2 = nn.Conv2d(4, 6, 3)
            self.conv3 = nn.Conv2d(6, 6, 1)

        def forward(self, x):
            h = self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
            return self.fc(h.mean((2, 3)))

    model = Backwards().train()
    assert default_layers(model) == ["conv1", "conv2"]  # registration order
    x = torch.randn(2, 1, 7, 7)
    assert default_layers(model, example_input=x) == ["conv2", "conv3"]
    assert default_layers(model, example_input=(x,)) == ["conv2", "conv3"]
    assert default_layers(model, example_input={"x": x}) == ["conv2", "conv3"]
    assert model.training
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_statistics_of_another_layer_with_the_same_size_are_refused():
    # same n = 16*3*3 but another stride: the patches differ, so must the statistics
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.Flatten())
    stats = collect_covariances(model, [torch.randn(2, 3, 8, 8)], progress=False)
    swapped = dict(stats)
    swapped["4"] = stats["2"]
    with pytest.raises(ValueError, match=r"covariances\['4'\] were collected on a Conv2d"):
        compress(model, "svd", covariances=swapped, ratio=2, layers=["4"], progress=False)
