"""Regression tests of the audit of rank selection (EVBMF, ratio/budget arguments) and int8
quantization (compact state dicts of shared modules and tied weights, bad inputs)."""

import math
import warnings

import numpy as np
import pytest

from sigmadecomp.ranks import LayerSpec, allocate, error_curve, evbmf, evbmf_ranks, ratio_to_ranks

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp_torch.quantize import (  # noqa: E402
    load_quantized_state_dict,
    model_size_bytes,
    quantize_weights,
    quantized_state_dict,
)


def _noisy_low_rank(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 60))
    return X + 0.1 * rng.standard_normal((40, 60))


# ------------------------------------------------------------------ EVBMF


def test_evbmf_refuses_an_infinite_noise_variance():
    with pytest.raises(ValueError, match=r"sigma2=inf is not allowed; sigma2 must be a finite"):
        evbmf(_noisy_low_rank(), sigma2=math.inf)


def test_evbmf_non_number_noise_variance_is_a_type_error():
    with pytest.raises(TypeError, match=r"sigma2='0.1' is not allowed"):
        evbmf(_noisy_low_rank(), sigma2="0.1")


def test_evbmf_rank_does_not_depend_on_a_tiny_scale():
    X = _noisy_low_rank()
    assert evbmf(X).rank == 3
    # squares of 1e-300-sized singular values underflow to 0: was read as noise-free, rank 40
    assert evbmf(X * 1e-300).rank == 3
    assert evbmf(X * 1e-300).evb_rank == 3


def test_evbmf_huge_scale_has_finite_shrunk_values_and_no_overflow():
    X = _noisy_low_rank()
    ref = evbmf(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: RuntimeWarning overflow / invalid value
        res = evbmf(X * 1e150)
    assert res.rank == 3 and np.all(np.isfinite(res.singular_values))
    np.testing.assert_allclose(res.singular_values / 1e150, ref.singular_values, rtol=1e-6)


def test_evbmf_ranks_of_a_parameter_warns_nothing():
    torch.manual_seed(0)
    weight = nn.Linear(6, 5).weight  # requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evbmf_ranks(weight, "svd") >= 1


# ------------------------------------------------------------------ flags


def test_ratio_to_ranks_refuses_a_non_bool_keep_proportion():
    with pytest.raises(TypeError, match=r"keep_proportion='no' is not allowed; keep_proportion "
                                        r"must be True or False"):
        ratio_to_ranks((8, 8, 3, 3), "tucker2", 2, keep_proportion="no")
    assert ratio_to_ranks((8, 8, 3, 3), "tucker2", 2, keep_proportion=np.bool_(False)) == \
        ratio_to_ranks((8, 8, 3, 3), "tucker2", 2, keep_proportion=False)


def test_allocation_refuses_non_bool_flags():
    W = np.random.default_rng(0).standard_normal((6, 4, 3, 3))
    with pytest.raises(TypeError, match=r"exact='yes' is not allowed"):
        allocate({"a": LayerSpec(W)}, 0.5, method="tucker2", exact="yes")
    with pytest.raises(TypeError, match=r"keep_proportion=None is not allowed"):
        error_curve(W, "tucker2", keep_proportion=None)


# ------------------------------------------------------------------ quantization


def test_shared_module_is_int8_under_every_name():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    q, qw = quantize_weights(model)
    state = quantized_state_dict(q, qw)
    assert state["0.weight"].dtype == torch.int8 and state["2.weight"].dtype == torch.int8
    assert state["0.weight"] is state["2.weight"]
    # no float copy of the weight is saved
    assert model_size_bytes(state) < model_size_bytes(q) - 16 * 16 * 2
    fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    load_quantized_state_dict(fresh, state)
    assert torch.equal(fresh[0].weight, q[0].weight) and torch.equal(fresh[2].weight, q[0].weight)


def test_tied_weight_quantized_under_one_name_is_int8_under_both():
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    q, qw = quantize_weights(nn.Sequential(a, b), layers="0")
    state = quantized_state_dict(q, qw)
    assert state["1.weight"].dtype == torch.int8 and state["1.weight"] is state["0.weight"]
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    load_quantized_state_dict(fresh, state)
    assert torch.equal(fresh[1].weight, q[1].weight)


def test_quantize_refuses_nan_weights_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"layer '1' has NaN or inf weights"):
        quantize_weights(model, inplace=True)
    assert torch.equal(model[0].weight, before)


def test_quantize_refuses_an_empty_layer_list():
    with pytest.raises(ValueError, match=r"layers=\[\] is not allowed"):
        quantize_weights(nn.Sequential(nn.Linear(2, 2)), layers=[])


def test_quantized_state_dict_refuses_weights_changed_after_quantization():
    torch.manual_seed(0)
    q, qw = quantize_weights(nn.Sequential(nn.Linear(4, 3)))
    with torch.no_grad():
        q[0].weight.add_(1.0)  # e.g. fine-tuned: the codes would silently drop it
    with pytest.raises(ValueError, match=r"weight of layer '0' is no longer its int8 value"):
        quantized_state_dict(q, qw)


def test_load_refuses_int8_codes_without_scales():
    torch.manual_seed(0)
    q, qw = quantize_weights(nn.Sequential(nn.Linear(4, 3)))
    state = quantized_state_dict(q, qw)
    del state["0.weight_scale"]
    with pytest.raises(ValueError, match=r"state\['0.weight'\] holds int8 codes but state has "
                                         r"no '0.weight_scale'"):
        load_quantized_state_dict(nn.Sequential(nn.Linear(4, 3)), state)


def test_budget_keeps_dense_the_layers_its_ranks_would_not_shrink():
    import warnings

    import torch
    from torch import nn

    from sigmadecomp_torch import compress

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 1), nn.Linear(1, 16), nn.Linear(16, 16),
                      nn.Linear(16, 4))
    layers = ["0", "1", "2", "3"]
    before = sum(m.get_submodule(n).weight.numel() for n in layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = compress(m, "svd", budget=0.99, layers=layers, progress=False)
    for r in report.layers:  # every replaced layer is smaller than the original
        assert r["params_after"] < r["params_before"]
    kept = {s["name"] for s in report.skipped}
    assert {"1", "2"} <= kept  # Linear(16, 1) and Linear(1, 16): rank 1 costs more
    after = sum(p.numel() for n in layers for k, p in small.get_submodule(n).named_parameters()
                if k.endswith("weight"))
    assert after <= 0.99 * before
