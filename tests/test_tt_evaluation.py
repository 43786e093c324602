"""The evaluation paths of the TT layers: the chain, the dense kernel, and the automatic choice."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sigmadecomp import tt_conv, tt_linear
from sigmadecomp.tt import tt_mac_count
from sigmadecomp_torch.tt_layers import TTConv2d, TTLinear, tt_compress_module

torch.set_num_threads(1)

PATHS = ("chain", "kernel", "auto")


@pytest.fixture(autouse=True)
def build_in_every_call(monkeypatch, request):
    """These tests check each call's own path and cost: no kernel kept between calls (the
    tests of the kept kernel switch it back on)."""
    from sigmadecomp_torch.tt_layers import _TTChain

    if "kept_kernel" not in request.node.name:
        monkeypatch.setattr(_TTChain, "keep_kernel", False)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}

# (kernel_size, stride, padding, dilation, padding_mode)
GEOMETRIES = [
    (3, 1, 1, 1, "zeros"),
    ((3, 2), (2, 1), (2, 0), (1, 2), "zeros"),
    (3, 1, "same", 2, "zeros"),
    ((2, 3), 1, "same", 1, "reflect"),
    (3, 2, "valid", 1, "zeros"),
    (3, 1, 1, 1, "replicate"),
    ((1, 3), (1, 2), (1, 1), 1, "circular"),
    (1, 1, 4, 1, "zeros"),  # padding larger than the kernel
]


def _conv_layer(geometry, bias, dtype, evaluation="auto"):
    ks, stride, padding, dilation, mode = geometry
    torch.manual_seed(0)
    return TTConv2d(6, 8, ks, (2, 3), (4, 2), (3, 2), stride=stride, padding=padding,
                    dilation=dilation, bias=bias, padding_mode=mode, dtype=dtype,
                    evaluation=evaluation)


def _dense_conv(layer):
    """nn.Conv2d with the layer's geometry and the kernel of the cores (an independent path)."""
    ks, stride, padding, dilation = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, ks, stride=stride, padding=padding,
                     dilation=dilation, bias=layer.bias is not None,
                     padding_mode=layer.padding_mode).to(layer.spatial.dtype)
    with torch.no_grad():
        conv.weight.copy_(layer.kernel())
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
    return conv


def _count_chain(layer):
    """Record the calls of the layer's chain (its ``_apply_cores``) in the returned list."""
    calls = []
    inner = layer._apply_cores
    layer._apply_cores = lambda z: calls.append(z.shape[0]) or inner(z)
    return calls


def _macs(fn, *args):
    with FlopCounterMode(display=False) as fc:
        fn(*args)
    return fc.get_total_flops() // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv_paths_equal_the_dense_conv(geometry, dtype):
    for bias in (True, False):
        layer = _conv_layer(geometry, bias, dtype)
        ref = _dense_conv(layer)
        calls = _count_chain(layer)
        g = torch.Generator().manual_seed(1)
        for shape in ((1, 6, 7, 9), (3, 6, 7, 9), (6, 7, 9)):
            x = torch.randn(shape, generator=g, dtype=dtype)
            with torch.no_grad():
                want = ref(x)
                for path in PATHS:
                    layer.evaluation = path
                    calls.clear()
                    got = layer(x)
                    assert got.shape == want.shape
                    torch.testing.assert_close(got, want, **TOL[dtype])
                    positions = want[..., 0, 0].numel() * want.shape[-2] * want.shape[-1] \
                        // layer.out_channels
                    chain = path == "chain" or (path == "auto"
                                                and not layer._use_kernel(positions))
                    assert bool(calls) == chain, (path, calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_paths_equal_the_dense_linear(dtype):
    for bias in (True, False):
        torch.manual_seed(0)
        layer = TTLinear(24, 10, (4, 6), (5, 2), (3,), bias=bias, dtype=dtype)
        w = layer.weight().detach()
        calls = _count_chain(layer)
        g = torch.Generator().manual_seed(1)
        for shape in ((24,), (1, 24), (5, 24), (2, 3, 24), (0, 24)):
            x = torch.randn(shape, generator=g, dtype=dtype)
            want = F.linear(x, w, layer.bias)
            for path in PATHS:
                layer.evaluation = path
                calls.clear()
                with torch.no_grad():
                    got = layer(x)
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, **TOL[dtype])
                rows = x[..., 0].numel()
                chain = path == "chain" or (path == "auto" and not layer._use_kernel(rows))
                assert bool(calls) == chain, (path, calls)


def test_dense_kernel_and_weight_equal_the_reference_contraction():
    layer = _conv_layer(GEOMETRIES[1], True, torch.float64)
    torch.testing.assert_close(layer._dense_kernel(), layer.kernel(), rtol=0, atol=1e-13)
    torch.manual_seed(0)
    lin = TTLinear(60, 24, (3, 4, 5), (2, 3, 4), (2, 3), dtype=torch.float64)
    torch.testing.assert_close(lin._dense_weight(), lin.weight(), rtol=0, atol=1e-13)


def test_kernel_path_gradcheck_and_gradients_equal_the_chain():
    torch.manual_seed(0)
    conv = TTConv2d(4, 4, (2, 3), (2, 2), (2, 2), (2, 2), padding=1, stride=(1, 2),
                    padding_mode="reflect", dtype=torch.float64, evaluation="kernel")
    x = torch.randn(2, 4, 4, 5, dtype=torch.float64)
    # gradcheck through functional_call: the parameters are the inputs
    names = [n for n, _ in conv.named_parameters()]

    def f(*ps):
        return torch.func.functional_call(conv, dict(zip(names, ps)), (x,))

    inputs = tuple(p.detach().clone().requires_grad_(True) for _, p in conv.named_parameters())
    assert torch.autograd.gradcheck(f, inputs)
    _same_gradients_on_both_paths(conv, x)

    lin = TTLinear(12, 6, (3, 4), (2, 3), (2,), dtype=torch.float64, evaluation="kernel")
    z = torch.randn(3, 12, dtype=torch.float64)
    names = [n for n, _ in lin.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_(True) for _, p in lin.named_parameters())
    assert torch.autograd.gradcheck(
        lambda *ps: torch.func.functional_call(lin, dict(zip(names, ps)), (z,)), inputs)
    _same_gradients_on_both_paths(lin, z)


def _same_gradients_on_both_paths(layer, x):
    grads = {}
    for path in ("chain", "kernel"):
        layer.evaluation = path
        layer.zero_grad()
        (layer(x) ** 2).sum().backward()
        grads[path] = [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(grads["chain"], grads["kernel"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", ["dense", "AUTO", None, 1, ("auto",)])
def test_evaluation_is_validated_everywhere(bad):
    msg = r"evaluation=.* is not allowed; evaluation must be one of 'auto', 'chain', 'kernel'"
    with pytest.raises(ValueError, match=msg):
        TTConv2d(4, 4, 3, (2, 2), (2, 2), (2, 2), evaluation=bad)
    with pytest.raises(ValueError, match=msg):
        TTLinear(4, 4, (2, 2), (2, 2), (2,), evaluation=bad)
    layer = TTLinear(4, 4, (2, 2), (2, 2), (2,), evaluation="chain")
    with pytest.raises(ValueError, match=msg):
        layer.evaluation = bad
    assert layer.evaluation == "chain"  # the refused value is not kept
    conv = nn.Conv2d(4, 4, 3)
    res = tt_conv(conv.weight.detach().double(), (2, 2), in_modes=(2, 2), out_modes=(2, 2))
    with pytest.raises(ValueError, match=msg):
        TTConv2d.from_result(conv.double(), res, evaluation=bad)
    with pytest.raises(ValueError, match=msg):
        tt_compress_module(nn.Linear(8, 8), ranks=2, evaluation=bad)


def test_evaluation_in_repr_from_result_and_state_dict_unchanged():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1).double()
    res = tt_conv(conv.weight.detach(), (3, 4), in_modes=(2, 4), out_modes=(2, 2))
    a = TTConv2d.from_result(conv, res, evaluation="chain")
    b = TTConv2d.from_result(conv, res, evaluation="kernel")
    assert (a.evaluation, b.evaluation) == ("chain", "kernel")
    assert TTConv2d.from_result(conv, res).evaluation == "auto"
    assert "evaluation='chain'" in repr(a) and "evaluation='kernel'" in repr(b)
    keys = ["spatial", "bias", "cores.0", "cores.1"]  # as before the setting existed
    assert list(a.state_dict()) == list(b.state_dict()) == keys
    lin = nn.Linear(12, 6).double()
    lres = tt_linear(lin.weight.detach(), 2, in_modes=(3, 4), out_modes=(2, 3))
    tl = TTLinear.from_result(lin, lres, evaluation="kernel")
    assert tl.evaluation == "kernel" and "evaluation='kernel'" in repr(tl)
    assert list(tl.state_dict()) == ["bias", "cores.0", "cores.1"]
    # a state dict saved from one path loads into a layer of the other, same outputs
    fresh = TTConv2d(8, 4, 3, (2, 4), (2, 2), (3, 4), padding=1, dtype=torch.float64,
                     evaluation="kernel")
    fresh.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), a(x), rtol=1e-10, atol=1e-12)


def test_a_built_model_is_switched_by_its_attribute_and_old_pickles_evaluate_auto():
    torch.manual_seed(0)
    model = nn.Sequential(TTConv2d(4, 4, 3, (2, 2), (2, 2), (2, 2), padding=1),
                          nn.Flatten(), TTLinear(64, 6, (8, 8), (2, 3), (2,)))
    x = torch.randn(2, 4, 4, 4)
    outs, chains = {}, []
    for m in (model[0], model[2]):
        inner = m._apply_cores
        m._apply_cores = lambda z, inner=inner: chains.append(1) or inner(z)
    for path in ("chain", "kernel"):
        for m in model.modules():
            if isinstance(m, (TTConv2d, TTLinear)):
                m.evaluation = path
        chains.clear()
        outs[path] = model(x)
        assert len(chains) == (2 if path == "chain" else 0)
    torch.testing.assert_close(outs["chain"], outs["kernel"], rtol=1e-4, atol=1e-5)
    # a module pickled before the setting existed has no instance attribute: 'auto'
    for layer, inp in ((model[0], x), (model[2], x.flatten(1))):
        state = copy.deepcopy(layer).__dict__
        del state["evaluation"], state["_costs"]
        old = type(layer).__new__(type(layer))
        old.__setstate__(state)  # as unpickling does
        assert old.evaluation == "auto" and old._costs == layer._costs
        layer.evaluation = "auto"
        torch.testing.assert_close(old(inp), layer(inp), rtol=1e-4, atol=1e-5)


def test_empty_batches_on_every_path():
    torch.manual_seed(0)
    conv = TTConv2d(4, 6, 3, (2, 2), (3, 2), (2, 2), padding=1)
    calls = _count_chain(conv)
    for path in PATHS:
        conv.evaluation = path
        calls.clear()
        assert conv(torch.randn(0, 4, 5, 5)).shape == (0, 6, 5, 5)
        assert bool(calls) == (path != "kernel")  # no positions: nothing to gain from a kernel


def _conv_chain_macs(layer, n, ho, wo):
    """Chain multiply-adds per the core cost function."""
    ks = layer.kernel_size
    return n * tt_mac_count(layer.in_modes, layer.out_modes, layer.ranks, kernel_size=ks,
                            out_hw=(ho, wo))


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[1], GEOMETRIES[3]])
def test_measured_macs_of_each_path_equal_the_prediction_and_auto_takes_the_cheaper(geometry):
    layer = _conv_layer(geometry, True, torch.float64)
    for n in (1, 2, 16):
        x = torch.randn(n, 6, 9, 8, dtype=torch.float64)
        with torch.no_grad():
            measured = {}
            for path in PATHS:
                layer.evaluation = path
                measured[path] = _macs(layer, x)
        ho, wo = layer(x).shape[2:]
        chain = _conv_chain_macs(layer, n, ho, wo)
        kernel = _macs(layer._dense_kernel) + n * ho * wo * 6 * 8 * layer.kernel_size[0] * \
            layer.kernel_size[1]
        assert measured["chain"] == chain
        assert measured["kernel"] == kernel
        assert measured["auto"] == (kernel if kernel < chain else chain)
        layer.evaluation = "auto"
        assert layer._path_macs(n * ho * wo) == (("kernel", kernel) if kernel < chain
                                                 else ("chain", chain))


def test_auto_switches_path_with_the_batch():
    # a Linear whose chain wins for one row and whose kernel wins for many
    torch.manual_seed(0)
    lin = TTLinear(64, 64, (4, 4, 4), (4, 4, 4), (4, 4), dtype=torch.float64)
    chain_row = tt_mac_count(lin.in_modes, lin.out_modes, lin.ranks)
    build = _macs(lin._dense_weight)
    taken = {}
    for rows in (1, 64):
        z = torch.randn(rows, 64, dtype=torch.float64)
        with torch.no_grad():
            got = _macs(lin, z)
        want_kernel = build + rows * 64 * 64 < rows * chain_row
        taken[rows] = "kernel" if want_kernel else "chain"
        assert got == (build + rows * 64 * 64 if want_kernel else rows * chain_row)
    assert taken == {1: "chain", 64: "kernel"}


def test_compress_module_macs_describe_the_path_the_layer_takes():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    for evaluation in PATHS:
        new, info = tt_compress_module(conv, ratio=3, out_hw=(8, 8), evaluation=evaluation)
        assert new.evaluation == evaluation
        x = torch.randn(1, 16, 8, 8)
        with torch.no_grad():
            measured = _macs(new, x)
        assert info["macs_after"] == measured
        new.evaluation = "chain"
        with torch.no_grad():
            chain = _macs(new, x)
        assert info["evaluation"] == ("chain" if info["macs_after"] == chain else "kernel")
        if evaluation != "auto":
            assert info["evaluation"] == evaluation
    _, info = tt_compress_module(conv, ratio=3)
    assert info["macs_after"] is None and info["evaluation"] is None
    lin = nn.Linear(64, 64)
    for evaluation in PATHS:
        new, info = tt_compress_module(lin, ratio=3, evaluation=evaluation)
        with torch.no_grad():
            assert info["macs_after"] == _macs(new, torch.randn(1, 64))
        assert info["evaluation"] in ("chain", "kernel")
    assert info["evaluation"] == "chain"  # one row: the chain is cheaper here


def test_chunking_applies_to_the_chain_only():
    torch.manual_seed(0)
    x = torch.randn(20, 4, 4, 4)
    for path in ("chain", "kernel"):
        layer = TTConv2d(4, 4, 1, (2, 2), (2, 2), (2, 2), padding=8, evaluation=path)
        full = layer(x)
        layer.max_chunk_elements = 4000
        calls = []
        inner = layer._forward

        def record(part, inner=inner):
            calls.append(part.shape[0])
            return inner(part)

        layer._forward = record
        torch.testing.assert_close(layer(x), full)
        if path == "chain":
            assert len(calls) > 1 and max(calls) * 4 * 2 * 20 * 20 <= 4000
        else:
            assert calls == []  # one dense conv, never the chunked chain


@pytest.mark.parametrize("path", PATHS)
def test_script_trace_and_compile_on_each_path(path):
    torch.manual_seed(0)
    conv = TTConv2d(8, 8, 3, (2, 4), (4, 2), (2, 2), padding="same", padding_mode="reflect",
                    evaluation=path)
    lin = TTLinear(24, 10, (4, 6), (5, 2), (3,), evaluation=path)
    for mod, x in ((conv, torch.randn(2, 8, 6, 6)), (lin, torch.randn(3, 5, 24))):
        with torch.no_grad():
            ref = mod(x)
            torch.testing.assert_close(torch.jit.script(mod)(x), ref)
            torch.testing.assert_close(torch.jit.trace(mod, (x,))(x), ref)
    scripted = torch.jit.script(conv)
    assert scripted.evaluation == path


def test_compile_smoke():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is unavailable")
    torch.manual_seed(0)
    lin = TTLinear(12, 6, (3, 4), (2, 3), (2,), evaluation="kernel")
    z = torch.randn(4, 12)
    try:
        out = torch.compile(lin, backend="eager")(z)
    except RuntimeError as e:  # pragma: no cover - a platform without a compiler
        pytest.skip(f"torch.compile failed here: {e}")
    torch.testing.assert_close(out, lin(z))


def test_kernel_contraction_takes_the_cheapest_split_and_every_split_agrees():
    torch.manual_seed(0)
    layers = [TTLinear(60, 24, (3, 4, 5), (2, 3, 4), (5, 2), dtype=torch.float64),
              TTLinear(64, 100, (2, 2, 2, 8), (5, 5, 2, 2), (2, 9, 3), dtype=torch.float64),
              TTConv2d(12, 8, 3, (2, 3, 2), (2, 2, 2), (4, 6, 2), dtype=torch.float64)]
    for layer in layers:
        ref = layer.kernel() if isinstance(layer, TTConv2d) else layer.weight()
        build = layer._dense_kernel if isinstance(layer, TTConv2d) else layer._dense_weight
        chosen = layer._costs[3]
        measured = {}
        for split in range(len(layer.cores) + 1):
            layer._costs[3] = split
            with FlopCounterMode(display=False) as fc:
                w = build()
            measured[split] = fc.get_total_flops() // 2
            torch.testing.assert_close(w, ref, rtol=1e-12, atol=1e-12)
        layer._costs[3] = chosen
        assert measured[chosen] == min(measured.values()) == layer._costs[1]
    # the left-to-right order is not always the cheapest
    assert any(m._costs[3] not in (0, len(m.cores)) for m in layers)


def _count_builds(layer, monkeypatch):
    calls = []
    build = type(layer)._build

    def counted(self):
        calls.append(1)
        return build(self)

    monkeypatch.setattr(type(layer), "_build", counted)
    return calls


def test_kept_kernel_is_reused_in_inference_until_a_core_changes(monkeypatch):
    torch.manual_seed(0)
    layer = TTConv2d(8, 6, 3, (2, 4), (2, 3), (4, 3), padding=1, dtype=torch.float64,
                     evaluation="kernel")
    builds = _count_builds(layer, monkeypatch)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    ref = F.conv2d(x, layer.kernel(), layer.bias, padding=1)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(layer(x), ref, **TOL[torch.float64])
    assert len(builds) == 1  # built once, reused twice
    with torch.inference_mode():
        layer(x)
        layer(x)
    assert len(builds) == 2  # inference mode keeps its own
    with torch.no_grad():
        layer.cores[0].mul_(2.0)  # an in-place change of a core (as an optimizer step)
        ref2 = F.conv2d(x, layer.kernel(), layer.bias, padding=1)
        torch.testing.assert_close(layer(x), ref2, **TOL[torch.float64])
    assert len(builds) == 3
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref2, **TOL[torch.float64])
    assert len(builds) == 4  # load_state_dict copies in place: a new version, a new build
    # with gradients through the cores: built in every call, never kept
    y = layer(x)
    y.sum().backward()
    layer(x)
    assert len(builds) == 6 and layer.cores[0].grad is not None
    with torch.no_grad():
        layer(x)
        layer(x)
    assert len(builds) == 7
    # a copy or a pickled layer does not carry the kept kernel; keep_kernel=False builds always
    assert "_kernel_reuse" not in copy.deepcopy(layer).__dict__
    layer.keep_kernel = False
    with torch.no_grad():
        layer(x)
        layer(x)
    assert len(builds) == 9 and layer.__dict__.get("_kernel_reuse") is None
    # frozen cores keep it even with autograd on (the input may want gradients)
    layer.keep_kernel = True
    for p in layer.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    layer(xg)
    assert len(builds) == 10 and xg.grad is not None


def test_kept_kernel_makes_auto_take_the_dense_layer_in_inference(monkeypatch):
    # TT-FC at batch 1: with gradients the chain is cheaper than building the weight every
    # call; in inference the weight is built once and kept, so auto takes it after that
    torch.manual_seed(0)
    fc = nn.Linear(64, 60).double()
    new, info = tt_compress_module(fc, ranks=(6,), in_modes=(8, 8), out_modes=(6, 10))
    assert info["evaluation"] == "chain" and info["evaluation_inference"] == "kernel"
    assert info["macs_inference"] == 64 * 60 < info["macs_after"]
    builds = _count_builds(new, monkeypatch)
    x = torch.randn(1, 64, dtype=torch.float64)
    with torch.no_grad():
        first = new(x)
        for _ in range(3):
            torch.testing.assert_close(new(x), first, **TOL[torch.float64])
        torch.testing.assert_close(first, F.linear(x, new.weight(), new.bias),
                                   **TOL[torch.float64])
        assert _macs(new, x) == info["macs_inference"]  # a later call: the dense layer
    assert len(builds) == 1
    _macs(new, x)  # with gradients: the chain (the prediction with builds)
    assert len(builds) == 1
