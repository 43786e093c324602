"""load_compressed: a compressed model's state dict loads into a fresh original model."""

import copy
import io
import re

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp_torch import collect_covariances, compress, load_compressed  # noqa: E402
from sigmadecomp_torch.quantize import quantize_weights, quantized_state_dict  # noqa: E402
from sigmadecomp_torch.restore import factorized_formats  # noqa: E402

F64 = torch.float64
FAST = {"n_iter_max": 3}


class _Net(nn.Module):
    """Convs with and without bias, a frozen one, a linear hidden layer and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.b = nn.Conv2d(12, 12, 3, stride=2, padding=1)
        self.hidden = nn.Linear(12, 16)
        self.head = nn.Linear(16, 4)
        self.b.weight.requires_grad_(False)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(torch.relu(self.stem(x))))))
        return self.head(torch.relu(self.hidden(x.mean((2, 3)))))


def _build():
    torch.manual_seed(0)
    return _Net().double()


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 3, 8, 8, generator=g, dtype=F64) for _ in range(2)]


@pytest.mark.parametrize("method, centered", [("tucker2", False), ("tucker2", True),
                                              ("cp", False), ("svd", True), ("tt", False)])
def test_every_format_loads_into_a_fresh_model_and_computes_the_same(method, centered):
    data = _batches()
    stats = collect_covariances(_build(), data, progress=False)
    small, report = compress(_build(), method, covariances=stats, ratio=1.5, options=FAST,
                             centered=centered, progress=False)
    assert [r["name"] for r in report.layers] == ["a", "b", "hidden"]
    fresh = _build()
    with torch.no_grad():  # other values than the compressed model's
        for p in fresh.parameters():
            p.add_(1.0)
    snapshot = {k: v.clone() for k, v in fresh.state_dict().items()}
    restored = load_compressed(fresh, _roundtrip(small.state_dict()))
    for name in ("a", "b", "hidden"):
        assert type(restored.get_submodule(name)) is type(small.get_submodule(name))
    assert type(restored.stem) is nn.Conv2d
    for x in data:
        assert torch.equal(restored(x), small(x))
    assert [p.requires_grad for p in restored.parameters()] == \
        [p.requires_grad for p in small.parameters()]
    # the model given is untouched (inplace=False)
    assert all(torch.equal(v, snapshot[k]) for k, v in fresh.state_dict().items())
    assert type(fresh.a) is nn.Conv2d


def test_the_bias_correction_creates_a_bias_the_original_layer_lacks():
    data = _batches()
    stats = collect_covariances(_build(), data, progress=False)
    small, _ = compress(_build(), "tucker2", covariances=stats, ratio=1.5, options=FAST,
                        centered=True, layers=["a"], progress=False)
    assert small.a.last.bias is not None  # 'a' has none in the original
    restored = load_compressed(_build(), small.state_dict())
    assert torch.equal(restored.a.last.bias, small.a.last.bias)
    plain, _ = compress(_build(), "tucker2", ratio=1.5, options=FAST, layers=["a"],
                        progress=False)
    assert load_compressed(_build(), plain.state_dict()).a.last.bias is None


def test_formats_are_read_from_the_keys():
    small, _ = compress(_build(), "cp", ratio=1.5, options=FAST, layers=["a", "b"],
                        progress=False)
    assert factorized_formats(small.state_dict()) == {"a": "cp", "b": "cp"}
    small, _ = compress(_build(), "tt", ratio=1.5, options=FAST, layers=["b", "hidden"],
                        progress=False)
    assert factorized_formats(small.state_dict()) == {"b": "tt", "hidden": "tt"}
    assert factorized_formats(_build().state_dict()) == {}


def test_a_module_registered_under_two_names_stays_shared():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), conv, nn.ReLU(), conv,
                          nn.Conv2d(6, 2, 3)).double()
    small, _ = compress(model, "tucker2", ratio=1.5, options=FAST, progress=False)
    assert small[1] is small[3]
    torch.manual_seed(0)
    conv2 = nn.Conv2d(6, 6, 3, padding=1)
    fresh = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), conv2, nn.ReLU(), conv2,
                          nn.Conv2d(6, 2, 3)).double()
    restored = load_compressed(fresh, small.state_dict())
    assert restored[1] is restored[3] and type(restored[1]).__name__ == "Tucker2Conv2d"
    x = torch.randn(2, 3, 7, 7, dtype=F64)
    assert torch.equal(restored(x), small(x))


def test_a_bare_layer_comes_back_as_its_factorized_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3).double()
    small, _ = compress(conv, "tucker2", ranks={"": (2, 2)}, options=FAST, progress=False)
    restored = load_compressed(nn.Conv2d(4, 6, 3).double(), small.state_dict())
    assert type(restored).__name__ == "Tucker2Conv2d"
    x = torch.randn(1, 4, 5, 5, dtype=F64)
    assert torch.equal(restored(x), small(x))


def test_a_quantized_state_dict_loads_dequantized():
    small, _ = compress(_build(), "tucker2", ratio=1.5, options=FAST, progress=False)
    q, info = quantize_weights(small)
    state = _roundtrip(quantized_state_dict(q, info))
    assert any(v.dtype == torch.int8 for v in state.values())
    restored = load_compressed(_build(), state)
    x = _batches()[0]
    torch.testing.assert_close(restored(x), q(x), rtol=1e-6, atol=1e-6)


def test_state_dicts_that_do_not_fit_the_model_are_clear_errors():
    small, _ = compress(_build(), "tucker2", ratio=1.5, options=FAST, progress=False)
    state = small.state_dict()
    other = nn.Sequential(nn.Conv2d(3, 8, 3)).double()
    with pytest.raises(ValueError, match="does not have"):
        load_compressed(other, state)
    renamed = {k.replace("hidden.", "stem."): v for k, v in state.items()
               if not k.startswith("stem.")}
    with pytest.raises(ValueError, match="layer 'stem'"):  # a conv given linear factors
        load_compressed(_build(), renamed)
    moved = {k.replace("a.", "head.", 1) if k.startswith("a.") else k: v
             for k, v in state.items() if not k.startswith("head.")}
    with pytest.raises(ValueError, match="'head'.*Tucker-2"):  # conv factors on a Linear
        load_compressed(_build(), moved)
    with pytest.raises(TypeError, match="state_dict"):
        load_compressed(_build(), [1, 2])
    with pytest.raises(TypeError, match="model"):
        load_compressed(state, state)
    with pytest.raises(TypeError, match="inplace"):
        load_compressed(_build(), state, inplace="yes")
    missing = {k: v for k, v in state.items() if not k.startswith("head.")}
    with pytest.raises(RuntimeError, match="head"):
        load_compressed(_build(), missing)
    with pytest.warns(UserWarning, match=r"2 key\(s\) of the model not in the state dict "
                      r"\(head.weight, head.bias\) keep their values; 0 key"):
        loose = load_compressed(_build(), missing, strict=False)
    assert type(loose.hidden).__name__ == "LowRankLinear"


def test_factorized_layers_take_the_training_mode_of_the_model():
    """compress gives a factorized layer its original's mode; so does load_compressed."""
    small, _ = compress(_build().eval(), "tt", ratio=1.5, options=FAST, progress=False)
    small2, _ = compress(_build().eval(), "tucker2", ratio=1.5, options=FAST, progress=False)
    for s in (small, small2):
        assert not any(m.training for m in s.modules())
        restored = load_compressed(_build().eval(), s.state_dict())
        assert [m.training for m in restored.modules()] == [m.training for m in s.modules()]


class _FirstLast(nn.Module):
    """Submodules named like the factors of a factorized layer: first, core, last, cores."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.core = nn.Conv2d(8, 8, 3, padding=1)
        self.last = nn.Conv2d(8, 8, 3, padding=1)
        self.cores = nn.ParameterList([nn.Parameter(torch.ones(1))])

    def forward(self, x):
        return self.last(torch.relu(self.core(torch.relu(self.first(x))))) * self.cores[0]


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _FirstLast()
        self.pair = nn.Module()  # only 'first' and 'last', no biases: a low-rank layer's keys
        self.pair.first = nn.Linear(8, 6, bias=False)
        self.pair.last = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        return self.pair.last(self.pair.first(self.block(x).mean((2, 3))))


def test_submodules_named_like_factors_are_not_taken_for_factorized_layers():
    def build(cls):
        torch.manual_seed(0)
        return cls().double()

    x = torch.randn(2, 3, 6, 6, dtype=F64)
    for cls, layer in ((_FirstLast, "core"), (_Outer, "block.core")):
        small, _ = compress(build(cls), "tucker2", ranks={layer: (3, 3)}, options=FAST,
                            progress=False)
        # (from the keys alone, 'pair' reads as a low-rank layer; the model tells)
        assert factorized_formats(small.state_dict()) == \
            {layer: "tucker2", **({"pair": "svd"} if cls is _Outer else {})}
        restored = load_compressed(build(cls), small.state_dict())
        assert type(restored.get_submodule(layer)).__name__ == "Tucker2Conv2d"
        assert torch.equal(restored(x), small(x))
        # an uncompressed state dict of such a model loads as it is
        plain = build(cls).state_dict()
        assert torch.equal(load_compressed(build(cls), plain)(x), build(cls)(x))


def test_tensor_train_factors_of_another_kind_of_layer_are_clear_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Flatten(), nn.Linear(8 * 16, 12), nn.Linear(12, 4)).double()
    small, _ = compress(model, "tt", ranks={"1": 2, "3": 2}, options=FAST,
                        progress=False)
    state = small.state_dict()
    as_conv = copy.deepcopy(model)
    as_conv[3] = nn.Conv2d(8 * 16, 12, 1).double()  # a TT Linear's cores at a 1x1 conv
    grouped = copy.deepcopy(model)
    grouped[1] = nn.Conv2d(8, 8, 3, padding=1, groups=2).double()
    for other, name in ((as_conv, "3"), (grouped, "1")):
        for strict in (True, False):
            with pytest.raises(ValueError, match=f"layer '{name}'.*Tensor-Train"):
                load_compressed(other, state, strict=strict)


def test_a_state_dict_with_one_name_per_shared_tensor_loads(tmp_path):
    """safetensors' save_model keeps one name per shared tensor (a module under two names,
    tied weights); load_file gives that state dict back."""
    st = pytest.importorskip("safetensors.torch")

    def shared():
        torch.manual_seed(0)
        conv = nn.Conv2d(6, 6, 3, padding=1)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), conv, nn.ReLU(), conv,
                             nn.Conv2d(6, 2, 3)).double()

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.mid, self.b = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
            self.b.weight = self.a.weight
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.mid(torch.relu(self.a(x))))))

    def tied():
        torch.manual_seed(0)
        return Tied().double()

    for build, x, kw in ((shared, torch.randn(2, 3, 7, 7, dtype=F64), {"method": "tucker2"}),
                         (tied, torch.randn(3, 6, dtype=F64), {"method": "svd",
                                                                "layers": ["mid"]})):
        small, _ = compress(build(), ratio=1.5, progress=False, **kw)
        st.save_model(small, tmp_path / "small.safetensors")
        state = st.load_file(tmp_path / "small.safetensors")
        assert len(state) < len(small.state_dict())  # the aliases were left out
        for strict in (True, False):
            restored = load_compressed(build(), state, strict=strict)
            assert torch.equal(restored(x), small(x))
            if build is shared:
                assert restored[1] is restored[3]
            else:
                assert restored.a.weight is restored.b.weight


@pytest.mark.parametrize("sequential", [False, True])
def test_a_bias_the_centered_refit_gave_a_dense_layer_is_created(sequential):
    """refit with centered=True adds a bias to a refitted layer that had none."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
                             nn.Conv2d(8, 4, 3, padding=1, bias=False)).double()

    data = [x + 0.5 for x in _batches()]
    small, report = compress(build(), "tucker2", ratio=1.5, data=data, refit="all",
                             centered=True, sequential=sequential, options=FAST,
                             progress=False)
    assert [r["name"] for r in report.refitted] == ["4"] and small[4].bias is not None
    for strict in (True, False):
        restored = load_compressed(build(), small.state_dict(), strict=strict)
        assert torch.equal(restored(data[0]), small(data[0]))
        assert restored[4].bias.requires_grad


@pytest.mark.parametrize("method, key", [("tucker2", "b.last.bias"), ("svd", "hidden.last.bias"),
                                         ("tt", "b.bias")])
def test_a_missing_bias_of_a_factorized_layer_is_a_missing_key(method, key):
    """The original layer has a bias, so the compressed one has: a state dict without it
    is incomplete, not a layer without bias."""
    small, _ = compress(_build(), method, ratio=1.5, options=FAST, progress=False)
    state = small.state_dict()
    del state[key]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*" + re.escape(key)):
        load_compressed(_build(), state)
    with pytest.warns(UserWarning, match=r"1 key\(s\) of the model not in the state dict \("
                      + re.escape(key) + r"\) keep their values"):
        loose = load_compressed(_build(), state, strict=False)
    # (the placeholder's bias: the one of the model's layer, as for a dense layer)
    assert torch.equal(loose.get_parameter(key), _build().get_submodule(key.split(".")[0]).bias)


class _WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 16, 10)

    def forward(self, x):
        x = self.b(torch.relu(self.norm(self.a(torch.relu(self.stem(x))))))
        return self.head(x.flatten(1))


def test_a_failed_in_place_load_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    small, _ = compress(_WithNorm().double(), "svd", ranks={"a": 4, "b": 4, "head": 4},
                        options=FAST, progress=False)
    assert factorized_formats(small.state_dict()) == {"a": "svd", "b": "svd", "head": "svd"}
    bad_shape = small.state_dict()  # the last factorized layer does not fit
    bad_shape["head.first.weight"] = torch.zeros(6, 70, dtype=F64)
    no_buffer = small.state_dict()  # fails in load_state_dict, after a bias was created
    del no_buffer["norm.running_mean"]
    no_buffer["stem.bias"] = torch.ones(8, dtype=F64)
    for state, error in ((bad_shape, ValueError), (no_buffer, RuntimeError)):
        torch.manual_seed(1)
        model = _WithNorm().double()
        kinds = [type(m) for m in model.modules()]
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(error, match="head.first.weight" if error is ValueError
                           else "norm.running_mean"):
            load_compressed(model, state, inplace=True)
        assert [type(m) for m in model.modules()] == kinds and model.stem.bias is None
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert type(load_compressed(model, small.state_dict(), inplace=True).head).__name__ \
            == "LowRankLinear"


def test_strict_false_skips_factorized_layers_the_model_lacks():
    small, _ = compress(_build(), "tucker2", ratio=1.5, options=FAST, progress=False)
    state = small.state_dict()
    extra = dict(state, **{"zz.first.weight": torch.zeros(2, 3, 1, 1, dtype=F64),
                           "zz.core.weight": torch.zeros(2, 2, 3, 3, dtype=F64),
                           "zz.last.weight": torch.zeros(3, 2, 1, 1, dtype=F64)})
    with pytest.raises(ValueError, match=r"\['zz'\] that the model does not have"):
        load_compressed(_build(), extra)
    with pytest.warns(UserWarning, match=r"\['zz'\] that the model does not have") as caught:
        loose = load_compressed(_build(), extra, strict=False)
    assert len(caught) == 1  # (not named again as unexpected keys)
    x = _batches()[0]
    assert torch.equal(loose(x), small(x))
    for strict in ("no", None, 0):
        with pytest.raises(TypeError, match=f"strict={strict!r} is not allowed"):
            load_compressed(_build(), state, strict=strict)
    q, info = quantize_weights(small)
    model = _build()
    with pytest.raises(ValueError, match="strict=False is not allowed"):
        load_compressed(model, quantized_state_dict(q, info), strict=False, inplace=True)
    assert type(model.a) is nn.Conv2d


def test_corrupt_factor_values_are_clear_errors():
    small, _ = compress(_build(), "tucker2", ratio=1.5, options=FAST, progress=False)
    lowrank, _ = compress(_build(), "svd", ratio=1.5, options=FAST, progress=False)
    cp, _ = compress(_build(), "cp", ratio=1.5, options=FAST, progress=False)
    cases = [(small, "b.core.weight", torch.zeros(3, 2, 3, 3, dtype=F64),
              r"'b.core.weight' has shape \(3, 2, 3, 3\).*needs \(\d+, \d+, 3, 3\)"),
             (small, "b.first.weight", torch.tensor(1.0, dtype=F64),
              r"'b.first.weight' has shape \(\).*needs \(r_S, 12, 1, 1\)"),
             (lowrank, "hidden.first.weight", torch.tensor(1.0, dtype=F64),
              r"'hidden.first.weight' has shape \(\).*needs \(r, 12\)"),
             (cp, "a.first.weight", torch.zeros(4, dtype=F64),
              r"'a.first.weight' has shape \(4,\).*needs \(R, 8, 1, 1\)")]
    for model, key, value, match in cases:
        state = model.state_dict()
        state[key] = value
        with pytest.raises(ValueError, match=match):
            load_compressed(_build(), state)
    state = small.state_dict()
    state["b.first.weight"] = [1.0, 2.0]
    with pytest.raises(TypeError, match=r"'b.first.weight' is a list.*tensor"):
        load_compressed(_build(), state)
