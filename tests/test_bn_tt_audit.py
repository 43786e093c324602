"""Regression tests from the audit of covariances_from_batchnorm and the TT layers."""

import numpy as np
import pytest
import torch
from torch import nn

from sigmadecomp_torch import covariances_from_batchnorm
from sigmadecomp_torch.tt_layers import TTConv2d

torch.set_num_threads(1)


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 5, 3, padding=1)).eval()


def test_ttconv_unbatched_wrong_channels_named_error():
    layer = TTConv2d(12, 8, 3, (2, 3, 2), (2, 2, 2), (2, 2, 2), padding=1)
    with pytest.raises(ValueError, match="expected input with 12 channels"):
        layer(torch.randn(5, 9, 10))


def test_ttconv_chunks_respect_max_chunk_elements_with_large_padding():
    torch.manual_seed(0)
    layer = TTConv2d(4, 4, 1, (2, 2), (2, 2), (2, 2), padding=8, evaluation="chain")
    x = torch.randn(20, 4, 4, 4)
    full = layer(x)
    layer.max_chunk_elements = 4000
    sizes, inner = [], layer._forward

    def record(part):
        y = inner(part)
        # the spatial core's output: (n * c, r_0, ho, wo)
        sizes.append(part.shape[0] * 4 * 2 * y.shape[2] * y.shape[3])
        return y

    layer._forward = record
    out = layer(x)
    assert max(sizes) <= layer.max_chunk_elements, sizes
    torch.testing.assert_close(out, full)


def test_bn_input_shape_non_integer_rejected():
    with pytest.raises(ValueError, match=r"input_shape=\(3, 6.5, 6\)"):
        covariances_from_batchnorm(_bn_model(), input_shape=(3, 6.5, 6), samples=8)


def test_bn_meta_model_without_input_shape_named_error():
    model = _bn_model().to("meta")
    with pytest.raises(ValueError, match="meta device"):
        covariances_from_batchnorm(model)


def test_bn_bad_seed_named_error():
    with pytest.raises(ValueError, match="seed='a'"):
        covariances_from_batchnorm(_bn_model(), input_shape=(3, 6, 6), samples=8, seed="a")


def test_bn_numpy_float32_shrinkage_accepted():
    stats, report = covariances_from_batchnorm(_bn_model(), shrinkage=np.float32(0.25))
    assert report.modelled["3"]["shrinkage"] == pytest.approx(0.25)


def test_bn_propagate_non_affine_batchnorm_has_documented_std():
    # BN(affine=False) with running_var 1: its output std is sqrt(1 / (1 + eps)) ~ 1 on the
    # training data, whatever the scale of the noise reaching it in the propagated copy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, affine=False),
                          nn.Conv2d(3, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
        model[0].bias.zero_()
        model[1].running_var.fill_(1.0)
    stats, _ = covariances_from_batchnorm(model, input_shape=(2, 6, 6), samples=64,
                                          shrinkage=0.0)
    diag = stats["2"].sigma.diagonal()
    torch.testing.assert_close(diag, torch.ones_like(diag), atol=1e-3, rtol=0)
    # the user's BatchNorm is left as it was
    assert model[1].weight is None and not model[1].affine
