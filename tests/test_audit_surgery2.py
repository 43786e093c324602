"""compress on module graphs that used to slip through: hooks a replacement drops,
parents that read a child's weight in ways the source scan missed, layers also kept
in plain containers, code reading a replaced layer's sizes; ``ranks=`` keys that
name no layer, option checks; and each factorized conv against the dense conv with
its reconstructed kernel."""

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from sigmadecomp_torch import compress  # noqa: E402
from sigmadecomp_torch.compress import LayerPlan, decompose_layer  # noqa: E402

F64 = torch.float64
pytestmark = [pytest.mark.filterwarnings("ignore::sigmadecomp.ConvergenceWarning"),
              pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")]
FAST = {"n_iter_max": 2}


def _three_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 6, 1), nn.Conv2d(6, 6, 3, padding=1),
                         nn.Conv2d(6, 4, 1)).to(F64)


def _x(channels=6):
    return torch.randn(2, channels, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------ backward hooks


@pytest.mark.parametrize("register", ["register_full_backward_hook",
                                      "register_full_backward_pre_hook",
                                      "register_backward_hook"])
def test_a_layer_with_backward_hooks_stays_dense_with_a_reason(register):
    model = _three_convs()
    calls = []
    getattr(model[1], register)(lambda *a: calls.append(1))
    small, report = compress(model, "svd", ratio=2, layers=lambda n, m: n in ("1", "2"),
                             progress=False)
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert "backward hooks" in reasons.get("1", ""), report.skipped
    assert isinstance(small[1], nn.Conv2d)
    assert small[1]._backward_hooks or small[1]._backward_pre_hooks
    x = torch.randn(2, 4, 5, 5, dtype=F64, requires_grad=True)
    small(x).sum().backward()
    assert calls, "the hook of the layer left dense must still run"
    with pytest.raises(ValueError, match="'1' cannot be compressed: it has backward hooks"):
        compress(model, "svd", ratio=2, layers=["1"], progress=False)


# ------------------------------------------------- parents reading a child's weight


class _Loop(nn.Module):
    def __init__(self):
        super().__init__()
        self.other = nn.Conv2d(6, 6, 3, padding=1)
        self.layers = nn.ModuleList([nn.Conv2d(6, 6, 3, padding=1) for _ in range(2)])

    def forward(self, x):
        x = self.other(x)
        for layer in self.layers:
            x = F.conv2d(x, layer.weight, layer.bias, padding=1)
        return x


class _Getattr(nn.Module):
    def __init__(self):
        super().__init__()
        self.other = nn.Conv2d(6, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        return F.conv2d(self.other(x), getattr(self.conv, "weight"), padding=1)


class _Alias(nn.Module):
    def __init__(self):
        super().__init__()
        self.other = nn.Conv2d(6, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        c = self.conv
        return F.conv2d(self.other(x), c.weight, c.bias, padding=1)


class _Property(nn.Module):
    def __init__(self):
        super().__init__()
        self.other = nn.Conv2d(6, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    @property
    def kernel(self):
        return self.conv.weight

    def forward(self, x):
        return F.conv2d(self.other(x), self.kernel, padding=1)


class _DictKey(nn.Module):
    def __init__(self):
        super().__init__()
        self.other = nn.Conv2d(6, 6, 3, padding=1)
        self.convs = nn.ModuleDict({"a": nn.Conv2d(6, 6, 3, padding=1)})

    def forward(self, x):
        return F.conv2d(self.other(x), self.convs["a"].weight, padding=1)


def _standardized(x, conv):
    w = conv.weight
    return F.conv2d(x, (w - w.mean()) / w.std(), conv.bias, padding=1)


class _Helper(nn.Module):
    def __init__(self):
        super().__init__()
        self.other = nn.Conv2d(6, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        return _standardized(self.other(x), self.conv)


@pytest.mark.parametrize("cls, read", [(_Loop, ["layers.0", "layers.1"]), (_Getattr, ["conv"]),
                                       (_Alias, ["conv"]), (_Property, ["conv"]),
                                       (_DictKey, ["convs.a"]), (_Helper, ["conv"])])
@pytest.mark.parametrize("method", ["svd", "tucker2"])
def test_a_parent_reading_the_weight_keeps_the_layer_dense_and_the_model_runs(cls, read,
                                                                              method):
    torch.manual_seed(0)
    model = cls().to(F64)
    x = _x()
    small, report = compress(model, method, ratio=2, options=FAST if method != "svd" else None,
                             layers=lambda n, m: isinstance(m, nn.Conv2d), progress=False)
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    for name in read:
        assert "reads its weight/bias directly" in reasons.get(name, ""), report.skipped
        assert isinstance(small.get_submodule(name), nn.Conv2d)
    assert [r["name"] for r in report.layers] == ["other"]
    assert small(x).shape == model(x).shape  # runs
    with pytest.raises(ValueError, match="reads its weight/bias directly"):
        compress(model, method, ratio=2, layers=[read[0]], progress=False)


def test_a_read_through_a_name_of_unknown_origin_keeps_every_layer_below_dense():
    class Any(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(6, 6, 3, padding=1)
            self.b = nn.Conv2d(6, 6, 3, padding=1)

        def forward(self, x):
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    x = F.conv2d(x, m.weight, m.bias, padding=1)
            return x

    with pytest.raises(ValueError, match="no layer can be compressed: 'a': .*local name 'm'"):
        compress(Any().to(F64), "svd", ratio=2, layers=lambda n, m: True, progress=False)


def test_a_read_through_a_local_name_outside_forward_does_not_count():
    class Init(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 3, padding=1)
            self.head = nn.Conv2d(6, 6, 1)

        def rescale(self):  # a helper, not where the output is computed
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.data.mul_(1.0)

        def forward(self, x):
            return self.head(self.conv(x))

    small, report = compress(Init().to(F64), "svd", ratio=2, layers=["conv"], progress=False)
    assert [r["name"] for r in report.layers] == ["conv"]


# ------------------------------------------------ size attributes of the new layers


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
@pytest.mark.parametrize("geom", [dict(stride=2, padding=1, dilation=1),
                                  dict(padding="same", dilation=(1, 2),
                                       padding_mode="reflect"),
                                  dict(stride=(1, 2), padding=(2, 0), padding_mode="circular")])
def test_a_factorized_conv_keeps_the_size_and_geometry_attributes(method, geom):
    conv = nn.Conv2d(6, 5, (3, 2), **geom).to(F64)
    ranks = {"svd": 2, "tucker2": (2, 3), "cp": 3}[method]
    new, _, _ = decompose_layer(LayerPlan("c", conv, "k", method, ranks=ranks,
                                          options=FAST if method != "svd" else {}))
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                 "dilation", "groups", "padding_mode"):
        assert getattr(new, attr) == getattr(conv, attr), attr
    scripted = torch.jit.script(new)
    x = torch.randn(1, 6, 7, 8, dtype=F64)
    torch.testing.assert_close(scripted(x), new(x))


def test_a_model_reading_a_replaced_layers_sizes_still_runs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 1)
            self.conv = nn.Conv2d(6, 6, 3, padding=1)
            self.fc = nn.Linear(6 * 4 * 4, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.conv(self.stem(x))
            h = h.reshape(-1, self.conv.out_channels * 16)
            assert h.shape[1] == self.fc.in_features
            return self.out(self.fc(h)[:, : self.fc.out_features])

    torch.manual_seed(0)
    model = Net().to(F64)
    small, report = compress(model, "tucker2", ratio=2, options=FAST, progress=False)
    assert {r["name"] for r in report.layers} == {"conv", "fc"}
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    assert small(x).shape == (2, 2)
    assert (small.fc.in_features, small.fc.out_features) == (96, 8)


# ----------------------------------------------------------------- ranks= keys


def test_a_ranks_key_that_names_no_layer_is_refused_naming_ranks():
    for extra in ({}, {"ratio": 2}):
        with pytest.raises(ValueError, match=r"ranks has the key '7', which is not a "
                                             r"Conv2d/Linear module.*'0', '1', '2'"):
            compress(_three_convs(), "svd", ranks={"7": 2}, progress=False, **extra)
    with pytest.raises(TypeError, match="ranks has the key 1 of type int"):
        compress(_three_convs(), "svd", ranks={1: 2}, progress=False)
    with pytest.raises(ValueError, match="ranks has the key 'x'.*are: ''"):
        compress(nn.Conv2d(3, 3, 3), "svd", ranks={"x": 2}, progress=False)


def test_two_ranks_for_two_names_of_one_shared_module_are_refused():
    shared = nn.Conv2d(6, 6, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(4, 6, 1), shared, nn.ReLU(), shared,
                          nn.Conv2d(6, 4, 1)).to(F64)
    with pytest.raises(ValueError, match="ranks gives '1': 2 and '3': 3, two names of one "
                                         "shared module"):
        compress(model, "svd", ranks={"1": 2, "3": 3}, progress=False)
    small, report = compress(model, "svd", ranks={"1": 2, "3": 2}, progress=False)
    assert small[1] is small[3] and report.layers[0]["ranks"] == 2


# ------------------------------------- the factorized layer equals its dense rebuild


@pytest.mark.parametrize("method, ranks", [("tucker2", (3, 2)), ("cp", 4), ("svd", 3),
                                           ("tt", 2)])
@pytest.mark.parametrize("geom", [
    dict(kernel_size=(2, 4), padding="same", padding_mode="circular"),
    dict(kernel_size=(5, 2), stride=(3, 2), padding=(2, 1), dilation=(1, 2),
         padding_mode="reflect", bias=False),
    dict(kernel_size=(1, 3), stride=2, padding=(0, 1), padding_mode="replicate"),
])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_the_factorized_layer_is_the_conv_with_the_reconstructed_kernel(method, ranks, geom,
                                                                        dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, dtype=dtype, **geom)
    new, _, result = decompose_layer(LayerPlan("c", conv, "k", method, ranks=ranks,
                                               options=FAST if method != "svd" else {}))
    dense = nn.Conv2d(4, 6, dtype=dtype, **geom)
    with torch.no_grad():
        dense.weight.copy_(torch.as_tensor(result.to_tensor()).reshape(conv.weight.shape))
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
    x = torch.randn(2, 4, 9, 10, dtype=dtype)
    want = dense(x)
    got = new(x)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-12 if dtype == F64 else 2e-5
    assert (got - want).abs().max() <= tol * want.abs().max()


# --------------------------------------------------------------- other options


def test_register_layer_method_refuses_an_unknown_rank_method_or_uncallables():
    from sigmadecomp_torch.compress import LAYER_METHODS, LayerMethod, register_layer_method

    svd = LAYER_METHODS["svd"]
    with pytest.raises(ValueError, match=r"spec.rank_method='nonexistent' is not allowed"):
        register_layer_method("mine", LayerMethod("nonexistent", svd.decompose, svd.build))
    with pytest.raises(TypeError, match=r"spec.build of type int is not allowed"):
        register_layer_method("mine", LayerMethod("svd", svd.decompose, 3))
    assert "mine" not in LAYER_METHODS


@pytest.mark.parametrize("progress", ["yes", None, 1])
def test_progress_must_be_a_bool(progress):
    with pytest.raises(TypeError, match=rf"progress={progress!r} is not allowed"):
        compress(_three_convs(), "svd", ratio=2, progress=progress)


def test_a_read_through_a_local_name_in_a_method_forward_calls_counts():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.other = nn.Conv2d(6, 6, 3, padding=1)
            self.blocks = nn.ModuleList([nn.Conv2d(6, 6, 3, padding=1)])

        def _run_blocks(self, x):
            for block in self.blocks:
                x = F.conv2d(x, block.weight, block.bias, padding=1)
            return x

        def forward(self, x):
            return self._run_blocks(self.other(x))

    model = Blocks().to(F64)
    small, report = compress(model, "svd", ratio=2, layers=lambda n, m: True, progress=False)
    assert [r["name"] for r in report.layers] == ["other"]
    assert "Blocks._run_blocks, through the local name 'block'" in report.skipped[0]["reason"]
    small(_x())


def test_a_layer_also_kept_in_a_plain_list_stays_dense_with_a_reason():
    class Listed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(6, 6, 3, padding=1)
            self.b = nn.Conv2d(6, 6, 3, padding=1)
            self.order = [self.a, self.b]  # a plain list: not registered again

        def forward(self, x):
            for layer in self.order:
                x = layer(x)
            return x

    torch.manual_seed(0)
    model = Listed().to(F64)
    with pytest.raises(ValueError, match=r"'a': it is also held in Listed.order, a plain "
                                         "container"):
        compress(model, "svd", ratio=2, layers=lambda n, m: True, progress=False)

    class Keyed(Listed):
        def __init__(self):
            super().__init__()
            self.order = {"first": self.a}  # a dict too; b is free to go

        def forward(self, x):
            return self.b(self.order["first"](x))

    model = Keyed().to(F64)
    small, report = compress(model, "svd", ratio=2, layers=lambda n, m: True, progress=False)
    assert [r["name"] for r in report.layers] == ["b"]
    assert small.order["first"] is small.a and isinstance(small.a, nn.Conv2d)
    x = _x()
    torch.testing.assert_close(small(x), small.b(model.a(x)))
