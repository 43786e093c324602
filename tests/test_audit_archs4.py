"""Compression of small versions of the architectures users bring."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sigmadecomp_torch import collect_covariances, compress, default_layers
from sigmadecomp_torch.resnet import Bottleneck

pytestmark = pytest.mark.filterwarnings("ignore::Warning")


# ------------------------------------------------------------------ models


class InvertedResidual(nn.Module):
    def __init__(self, c, expand=4):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h),
                                    nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False),
                                nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class MobileNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8), InvertedResidual(8))
        self.conv_last = nn.Conv2d(8, 16, 1)
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu6(self.conv_last(self.blocks(self.stem(x))))
        return self.classifier(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4, linear=False):
        super().__init__()
        self.linear = linear
        if linear:
            self.fc1, self.fc2 = nn.Linear(c, c // r), nn.Linear(c // r, c)
        else:
            self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=not self.linear)
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(s))))
        if self.linear:
            s = s[:, :, None, None]
        return x * s


class EfficientNetish(nn.Module):
    def __init__(self, linear=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.se = SqueezeExcite(16, linear=linear)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.silu(self.stem(x))
        x = self.se(F.silu(self.conv(x)))
        x = F.silu(self.conv2(x))
        return self.head(x.mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.pwconv2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.blocks = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class ResNet50Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        ds = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.layer1 = nn.Sequential(Bottleneck(16, 8, downsample=ds), Bottleneck(32, 8))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.layer1(self.conv1(x)).mean((2, 3)))


class UNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Conv2d(3, 8, 3, padding=1)
        self.enc2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Conv2d(16, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = F.relu(self.enc1(x))
        e2 = F.relu(self.enc2(e1))
        m = F.relu(self.mid(e2))
        u = self.up(m)
        d = F.relu(self.dec(torch.cat([u, e1], 1)))
        return self.out(d)


class Attention(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x, attention_mask=None):
        n, t, d = x.shape
        h = self.heads

        def split(z):
            return z.view(n, t, h, d // h).transpose(1, 2)

        a = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / (d // h) ** 0.5
        if attention_mask is not None:
            a = a.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
        y = (a.softmax(-1) @ split(self.v(x))).transpose(1, 2).reshape(n, t, d)
        return self.o(y)


class BertBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = Attention(d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, attention_mask=None):
        x = self.ln1(x + self.attn(x, attention_mask))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class Bertish(nn.Module):
    def __init__(self, vocab=30, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([BertBlock(d), BertBlock(d)])
        self.torch_layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.pooler = nn.Linear(d, d)
        self.cls = nn.Linear(d, 3)

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids)
        for b in self.blocks:
            x = b(x, attention_mask)
        pad = None if attention_mask is None else ~attention_mask.bool()
        x = self.torch_layer(x, src_key_padding_mask=pad)
        return self.cls(torch.tanh(self.pooler(x[:, 0])))


class FunctionalConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(16, 8, 3, 3) * 0.2)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(F.conv2d(x, self.weight, padding=1))
        x = F.relu(self.mid(x))
        return self.head(x.mean((2, 3)))


class WeightReader(nn.Module):
    """Reads its conv's weight directly (weight standardisation)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        w = self.conv.weight
        w = (w - w.mean((1, 2, 3), keepdim=True))
        return F.conv2d(x, w, self.conv.bias, padding=1)


class WSNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.ws = WeightReader()
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.mid(F.relu(self.ws(F.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def images(c=3, s=16, n=3, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, s, s, generator=g) for _ in range(n)]


def tokens(n=3, b=4, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 30, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, -2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def run(model, x):
    with torch.no_grad():
        return model(**x) if isinstance(x, dict) else model(x)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)


def reasons(report):
    return {s["name"]: s["reason"] for s in report.skipped}


ARCHS = {
    "mobilenet": (MobileNetish, lambda: images(s=16)),
    "efficientnet": (EfficientNetish, images),
    "efficientnet_linear_se": (lambda: EfficientNetish(linear=True), images),
    "convnext": (ConvNeXtish, lambda: images(s=16)),
    "resnet50_stage": (ResNet50Stage, images),
    "unet": (UNetish, images),
    "bert": (Bertish, tokens),
    "functional_conv": (FunctionalConvNet, images),
}

SWEEPS = {"svd": {}, "tucker2": {"n_iter_max": 3}, "cp": {"n_iter_max": 3}, "tt": {"n_iter_max": 3}}


def build(arch, seed=0):
    torch.manual_seed(seed)
    make, data = ARCHS[arch]
    return make().eval(), data()


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------- every architecture, every method


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_compress_runs_close_and_leaves_model_alone(arch, method):
    model, data = build(arch)
    before = state(model)
    y0 = run(model, data[0])
    stats = collect_covariances(model, data, progress=False)
    small, report = compress(model, method, covariances=stats, ratio=2,
                             options=SWEEPS[method], progress=False)
    assert report.layers, "nothing was compressed"
    assert report.params_after < report.params_before
    y = run(small, data[0])
    assert y.shape == y0.shape and torch.isfinite(y).all()
    assert rel(y, y0) < 0.6
    assert same_state(model, before)
    assert small is not model


@pytest.mark.parametrize("arch", ["mobilenet", "convnext", "unet", "bert", "efficientnet"])
def test_one_shot_from_data_sequential_and_budget(arch):
    model, data = build(arch)
    before = state(model)
    y0 = run(model, data[0])
    one, r1 = compress(model, "svd", data=data, ratio=2, progress=False)
    seq, r2 = compress(model, "svd", data=data, ratio=2, sequential=True, progress=False)
    stats = collect_covariances(model, data, progress=False)
    bud, r3 = compress(model, "tucker2", covariances=stats, budget=0.6,
                       options={"n_iter_max": 3}, progress=False)
    for small, rep in ((one, r1), (seq, r2), (bud, r3)):
        assert rep.layers
        assert rel(run(small, data[0]), y0) < 0.6
    # the budget is kept over the layers it allocates across
    assert r3.params_after < r3.params_before
    assert same_state(model, before)


# ------------------------------------------------------ reasons and default choice


def test_default_layers_keep_stem_and_classifier():
    for arch, stem, head in [("mobilenet", "stem.0", "classifier"),
                             ("convnext", "stem", "head"),
                             ("resnet50_stage", "conv1", "fc"),
                             ("unet", "enc1", "out"),
                             ("efficientnet", "stem", "head")]:
        model, data = build(arch)
        for names in (default_layers(model), default_layers(model, example_input=data[0])):
            assert stem not in names and head not in names, arch
            assert names, arch


def test_depthwise_convs_skipped_as_grouped():
    for arch, dws in [("mobilenet", ["blocks.0.dw.0", "blocks.1.dw.0"]),
                      ("convnext", ["blocks.0.dwconv", "blocks.1.dwconv"])]:
        model, data = build(arch)
        _, report = compress(model, "tucker2", data=data, ratio=2,
                             options={"n_iter_max": 2}, progress=False)
        why = reasons(report)
        done = {r["name"] for r in report.layers}
        for n in dws:
            assert "grouped convolution" in why[n] and "groups=" in why[n]
            assert n not in done
        with pytest.raises(ValueError, match=dws[0].replace(".", r"\.") + ".*grouped"):
            compress(model, "tucker2", data=data, ratio=2, layers=[dws[0]], progress=False)


def test_transposed_conv_listed_by_default_and_named_error():
    model, data = build("unet")
    _, report = compress(model, "svd", data=data, ratio=2, progress=False)
    assert "transposed" in reasons(report)["up"]
    with pytest.raises(ValueError, match="'up'.*ConvTranspose2d"):
        compress(model, "svd", data=data, ratio=2, layers=["up"], progress=False)


def test_transposed_conv_listed_with_layers_all_and_predicate():
    # a predicate or 'all' chooses among Conv2d/Linear: what no predicate can reach is listed
    model, data = build("unet")
    stats = collect_covariances(model, data, progress=False)
    for layers in ("all", lambda n, m: True):
        _, report = compress(model, "svd", covariances=stats, ratio=2, layers=layers,
                             progress=False)
        assert "transposed" in reasons(report).get("up", "")
    _, report = compress(model, "svd", data=data, ratio=2, layers="all", sequential=True,
                         progress=False)
    names = [r["name"] for r in report.skipped]
    assert "transposed" in reasons(report).get("up", "") and len(names) == len(set(names))


def test_functional_conv_weight_listed():
    model, data = build("functional_conv")
    stats = collect_covariances(model, data, progress=False)
    for layers in (None, "all"):
        _, report = compress(model, "svd", covariances=stats, ratio=2, layers=layers,
                             progress=False)
        why = reasons(report)
        assert "weight" in why, why
        assert "functional.conv2d" in why["weight"] and "Conv2d" in why["weight"]
        row = next(s for s in report.skipped if s["name"] == "weight")
        assert "16, 8, 3, 3" in row["kind"]
        # the report still serialises
        assert any(s["name"] == "weight" for s in report.to_dict()["skipped"])
    _, report = compress(model, "svd", covariances=stats, ratio=2, layers=["mid"],
                         progress=False)
    assert "weight" not in reasons(report)  # a named list lists nothing else


def test_no_functional_row_for_plain_convs_and_layer_scale():
    model, data = build("convnext")
    model.pos = nn.Parameter(torch.zeros(1, 16, 4, 4))  # a broadcast 4-D shape, not a kernel
    _, report = compress(model, "svd", data=data, ratio=2, progress=False)
    assert not any(s["kind"].startswith("Parameter") for s in report.skipped)


def test_parent_reading_weight_reason():
    torch.manual_seed(0)
    model, data = WSNet().eval(), images()
    _, report = compress(model, "svd", data=data, ratio=2, progress=False)
    why = reasons(report)["ws.conv"]
    assert "WeightReader" in why and "'ws'" in why and "reads its weight" in why
    with pytest.raises(ValueError, match=r"'ws\.conv'.*WeightReader"):
        compress(model, "svd", data=data, ratio=2, layers=["ws.conv"], progress=False)


def test_transformer_reasons_and_first_layers():
    model, data = build("bert")
    before = state(model)
    _, report = compress(model, "svd", data=data, ratio=2, progress=False)
    why = reasons(report)
    assert "MultiheadAttention" in why["torch_layer.self_attn.out_proj"]
    for n in ("torch_layer.linear1", "torch_layer.linear2"):
        assert "TransformerEncoderLayer" in why[n]
    for n in ("blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"):
        assert why[n].startswith("first layer") and "(reads the model's input)" not in why[n]
    assert why["cls"].startswith("last layer")
    assert "in_proj_weight" in why["torch_layer.self_attn.in_proj_weight"]
    assert "not factorized" in why["torch_layer.self_attn.in_proj_weight"]
    done = {r["name"] for r in report.layers}
    assert "blocks.1.attn.q" in done and "pooler" in done
    assert same_state(model, before)


def test_first_layer_behind_embedding_without_input_says_so():
    # no input to run: the first registered layer sits behind an embedding, so the
    # report must not claim that it reads the model's input
    model, data = build("bert")
    stats = collect_covariances(model, data, progress=False)
    _, report = compress(model, "svd", covariances=stats, ratio=2, progress=False)
    why = reasons(report)["blocks.0.attn.q"]
    assert "(reads the model's input)" not in why
    assert "'emb'" in why and "example_input=" in why


def test_first_layer_reading_input_without_input_unchanged():
    model, data = build("resnet50_stage")
    stats = collect_covariances(model, data, progress=False)
    _, report = compress(model, "svd", covariances=stats, ratio=2, progress=False)
    assert "(reads the model's input)" in reasons(report)["conv1"]


def test_rank_errors_name_the_layer():
    model, data = build("convnext")
    stats = collect_covariances(model, data, progress=False)
    with pytest.raises(ValueError, match=r"'blocks\.0\.pwconv1'"):
        compress(model, "svd", covariances=stats, ranks={"blocks.0.pwconv1": 0},
                 progress=False)
    with pytest.raises(ValueError, match=r"'blocks\.0\.nope'"):
        compress(model, "svd", covariances=stats, ranks={"blocks.0.nope": 2}, progress=False)


def test_deterministic():
    model, data = build("resnet50_stage")
    stats = collect_covariances(model, data, progress=False)
    a, _ = compress(model, "cp", covariances=stats, ratio=2, options={"n_iter_max": 2},
                    progress=False)
    b, _ = compress(model, "cp", covariances=stats, ratio=2, options={"n_iter_max": 2},
                    progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_parametrized_conv_not_listed_as_functional():
    torch.manual_seed(0)
    model, data = EfficientNetish().eval(), images()
    model.conv = torch.nn.utils.parametrizations.weight_norm(model.conv)
    _, report = compress(model, "svd", data=data, ratio=2, progress=False)
    why = reasons(report)
    assert "parametrized" in why["conv"]
    assert not any("parametrizations" in n for n in why), why


def test_old_style_weight_norm_reason():
    torch.manual_seed(0)
    model, data = EfficientNetish().eval(), images()
    model.conv2 = torch.nn.utils.weight_norm(model.conv2)
    _, report = compress(model, "svd", data=data, ratio=2, progress=False)
    why = reasons(report)["conv2"]
    assert "weight_norm" in why and "remove_weight_norm" in why


def test_tied_decoder_reason():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, 16)
            self.fc, self.mid = nn.Linear(16, 16), nn.Linear(16, 16)
            self.dec = nn.Linear(16, 30, bias=False)
            self.dec.weight = self.emb.weight

        def forward(self, input_ids, attention_mask=None):
            return self.dec(torch.relu(self.mid(torch.relu(self.fc(self.emb(input_ids))))))

    torch.manual_seed(0)
    model, data = LM().eval(), tokens()
    _, report = compress(model, "svd", data=data, ratio=2, layers="all", progress=False)
    assert "tied to 'emb'.weight" in reasons(report)["dec"]


def test_sigma_error_is_output_change_behind_reflect_padding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")).eval().double()
    data = [torch.randn(4, 3, 10, 10, dtype=torch.float64) for _ in range(2)]
    stats = collect_covariances(model, data, progress=False)
    small, report = compress(model, "tucker2", covariances=stats, ranks={"2": (4, 4)},
                             layers=["2"], progress=False)
    bias = model[2].bias.view(1, -1, 1, 1)
    with torch.no_grad():
        num = sum(float(((small(x) - model(x)) ** 2).sum()) for x in data)
        den = sum(float(((model(x) - bias) ** 2).sum()) for x in data)
    assert report.layers[0]["sigma_error"] == pytest.approx((num / den) ** 0.5, rel=1e-6)
