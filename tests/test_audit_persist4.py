"""Saving, loading and quantizing compressed models: bad files get errors naming the key,
int8 codes of float64 weights are the nearest ones and dequantize exactly."""

import io
import warnings

import pytest
import torch
from torch import nn

from sigmadecomp_torch import (
    TTConv2d,
    compress,
    load_compressed,
    load_quantized_state_dict,
    quantize_weights,
    quantized_state_dict,
)


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 2 * 2, 5)).to(dtype)


def _quantized(dtype=torch.float32):
    small, _ = compress(_net(dtype), "tucker2", ratio=2, progress=False)
    q_model, q = quantize_weights(small)
    return q_model, quantized_state_dict(q_model, q)


# ------------------------------------------------------------ damaged quantized state dicts


@pytest.mark.parametrize("loader", ["load_quantized_state_dict", "load_compressed"])
def test_scales_without_their_weight_are_refused_by_key(loader):
    q_model, state = _quantized()
    state["1.weight_scale"] = torch.ones(3)  # (module 1 is a ReLU)
    with pytest.raises(ValueError, match=r"'1\.weight_scale'.*no weight '1\.weight'"):
        if loader == "load_compressed":
            load_compressed(_net(), state)
        else:
            load_quantized_state_dict(q_model, state)


@pytest.mark.parametrize("damage", ["shape", "int", "negative", "nan", "list"])
def test_scales_that_do_not_fit_their_codes_are_refused_by_key(damage):
    q_model, state = _quantized()
    key = "0.weight_scale"
    good = state[key]
    state[key] = {"shape": torch.ones(len(good) + 1), "int": good.to(torch.int32),
                  "negative": -good, "nan": good.clone().fill_(float("nan")),
                  "list": good.tolist()}[damage]
    err = TypeError if damage == "list" else ValueError
    with pytest.raises(err, match=r"state\['0\.weight_scale'\]"):
        load_quantized_state_dict(q_model, state)
    with pytest.raises(err, match=r"'0\.weight_scale'"):
        load_compressed(_net(), state)


@pytest.mark.parametrize("strict", [True, False])
def test_int8_codes_without_any_scales_are_not_loaded_as_floats(strict):
    _, state = _quantized()
    stripped = {k: v for k, v in state.items() if not k.endswith("weight_scale")}
    with pytest.raises(ValueError, match=r"'0\.weight'.*int8 codes"):
        load_compressed(_net(), stripped, strict=strict)


def test_int8_values_for_a_float_tensor_other_than_a_weight_are_refused():
    layer = TTConv2d(4, 4, 3, (2, 2), (2, 2), (2, 2))
    state = {"0." + k: v for k, v in layer.state_dict().items()}
    state["0.cores.0"] = torch.ones(state["0.cores.0"].shape, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"'0\.cores\.0'.*int8"):
        load_compressed(nn.Sequential(nn.Conv2d(4, 4, 3)), state)


def test_an_int8_buffer_of_the_model_still_loads():
    model = nn.Sequential(nn.Linear(4, 3))
    model.register_buffer("mask", torch.ones(3, dtype=torch.int8))
    state = model.state_dict()
    state["mask"] = torch.tensor([1, 0, 1], dtype=torch.int8)
    out = load_compressed(model, state)
    assert torch.equal(out.mask, state["mask"])


def test_a_checkpoint_holding_the_state_dict_is_named():
    small, _ = compress(_net(), "svd", ratio=2, progress=False)
    with pytest.raises(TypeError, match=r"state_dict\['model'\] is a dict.*checkpoint\['model'\]"):
        load_compressed(_net(), {"model": small.state_dict(), "epoch": torch.tensor(3)})


# ------------------------------------------------------------ float64 codes and values


def test_float64_weights_get_the_nearest_codes_and_exact_values():
    # scale 2**-7 exactly (max |w| = 127.5 * 2**-7); 2.5 steps plus a little rounds to 3,
    # but its float32 rounding is the tie 2.5 steps, which rounds (half to even) to 2
    step = 2.0 ** -7
    lin = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[127.5 * step, 2.5 * step + 1e-12]], dtype=torch.float64))
    q_lin, q = quantize_weights(lin)
    assert float(q.scales[""][0]) == step
    assert q.int8[""].tolist() == [[127, 3]]
    err = (q_lin.weight.detach() - lin.weight.detach()).abs()
    assert float(err[0, 1]) <= 0.5 * step
    # the stored weight is code * scale exactly, and the compact state dict reloads it
    assert torch.equal(q_lin.weight.detach(), q.int8[""].double() * q.scales[""].double())
    fresh = load_quantized_state_dict(nn.Linear(2, 1, bias=False).double(),
                                      quantized_state_dict(q_lin, q))
    assert torch.equal(fresh.weight, q_lin.weight)


def test_float64_random_weights_within_the_documented_bound():
    torch.manual_seed(3)
    for _ in range(20):
        lin = nn.Linear(9, 6).double()
        with torch.no_grad():
            lin.weight.mul_(10.0 ** float(torch.empty(1).uniform_(-3, 3)))
        q_lin, q = quantize_weights(lin)
        w = lin.weight.detach()
        s = q.scales[""].double()[:, None]
        assert torch.equal(q.int8[""].double(),
                           torch.clamp(torch.round(w / s), -128, 127))  # nearest codes
        err = (q_lin.weight.detach() - w).abs()
        assert bool((err <= 0.5 * s + 2.0 ** -23 * w.abs()).all())
        assert q.max_abs_error[""] == float(err.max())


# ------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["svd", "tucker2", "cp", "tt"])
def test_quantized_state_dict_round_trip_is_bit_exact(method, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, _ = compress(_net(dtype), method, ratio=2, progress=False,
                            options={"n_iter_max": 3} if method == "cp" else None)
        q_model, q = quantize_weights(small)
    buffer = io.BytesIO()
    torch.save(quantized_state_dict(q_model, q), buffer)
    buffer.seek(0)
    restored = load_compressed(_net(dtype), torch.load(buffer)).eval()
    x = torch.randn(3, 3, 6, 6, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(restored(x), q_model.eval()(x))
    assert list(restored.state_dict()) == list(q_model.state_dict())


def test_loading_into_a_tt_model_that_kept_its_kernel_uses_the_new_cores():
    layer = TTConv2d(4, 4, 3, (2, 2), (2, 2), (2, 2), evaluation="kernel")
    other = TTConv2d(4, 4, 3, (2, 2), (2, 2), (2, 2), evaluation="kernel")
    model = nn.Sequential(layer)
    x = torch.randn(2, 4, 5, 5)
    with torch.inference_mode():
        model(x)  # the kernel is kept
    load_compressed(model, {"0." + k: v for k, v in other.state_dict().items()}, inplace=True)
    with torch.inference_mode():
        assert torch.equal(model(x), other(x))


def test_a_model_quantized_in_float32_then_made_float64_still_saves():
    torch.manual_seed(0)
    q_lin, q = quantize_weights(nn.Linear(12, 7))
    state = quantized_state_dict(q_lin.double(), q)
    assert torch.equal(state["weight"], q.int8[""])
    with torch.no_grad():
        q_lin.weight[0, 0] += 1e-3  # a changed weight is still refused
    with pytest.raises(ValueError, match="no longer its int8 value"):
        quantized_state_dict(q_lin, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scales_and_codes_recomputed_independently(dtype):
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3).to(dtype)
    with torch.no_grad():
        conv.weight[1].zero_()
    q_conv, q = quantize_weights(conv)
    w = conv.weight.detach()
    amax = w.abs().flatten(1).amax(1).float()
    want = torch.clamp(amax / 127.5, min=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(q.scales[""], want, rtol=2e-7, atol=0)
    s = q.scales[""].double().view(-1, 1, 1, 1)
    near = torch.clamp(torch.round(w.double() / s), -128, 127)
    # the nearest codes, but for float32 ties the fake-quantizer may break either way
    assert bool(((q.int8[""].double() - near).abs() <= (1 if dtype == torch.float32 else 0)).all())
    assert bool(((q_conv.weight.detach().double() - w.double()).abs()
                 <= 0.5 * s + 2.0 ** -23 * w.double().abs()).all())
    assert bool((q_conv.weight[1] == 0).all()) and bool((q.int8[""][1] == 0).all())


def test_a_refused_quantized_state_dict_leaves_an_inplace_model_as_it_was():
    _, state = _quantized()
    state["0.weight_scale"] = -state["0.weight_scale"]
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'0\.weight_scale'"):
        load_compressed(model, state, inplace=True)
    assert [type(m) for m in model] == [type(m) for m in _net()]
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
