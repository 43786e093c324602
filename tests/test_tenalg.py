import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sigmadecomp import fold, khatri_rao, unfold


@st.composite
def shapes_and_mode(draw):
    nd = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=nd, max_size=nd)))
    mode = draw(st.integers(-nd, nd - 1))
    return shape, mode


@given(shapes_and_mode())
def test_fold_unfold_roundtrip(sm):
    shape, mode = sm
    x = np.random.default_rng(0).standard_normal(shape)
    m = unfold(x, mode)
    assert m.shape[0] == shape[mode]
    assert np.array_equal(fold(m, mode, shape), x)


def test_unfold_matches_reference_definition(lib):
    x = np.arange(2 * 3 * 4 * 5, dtype=float).reshape(2, 3, 4, 5)
    for mode in range(4):
        expected = np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)
        got = unfold(lib.asarray(x), mode)
        assert lib.is_same_kind(got)
        np.testing.assert_array_equal(lib.to_numpy(got), expected)


def test_unfold_mode0_is_torch_conv_weight_reshape():
    torch = pytest.importorskip("torch")
    conv = torch.nn.Conv2d(5, 7, (3, 2))
    w = conv.weight.detach()
    assert torch.equal(unfold(w, 0), w.reshape(7, -1))
    # column order (s, h, w) is the order of F.unfold's patch vector
    x = torch.randn(1, 5, 6, 6)
    cols = torch.nn.functional.unfold(x, (3, 2))  # (1, S*H*W, L)
    out = (unfold(w, 0) @ cols[0]).reshape(7, 4, 5)
    ref = torch.nn.functional.conv2d(x, w)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_khatri_rao_cp_identity(lib, rng):
    R = 3
    A, B, C, D = (rng.standard_normal((m, R)) for m in (4, 2, 3, 2))
    K = np.einsum("tr,sr,hr,wr->tshw", A, B, C, D)
    kr = khatri_rao([lib.asarray(B), lib.asarray(C), lib.asarray(D)])
    assert lib.is_same_kind(kr)
    np.testing.assert_allclose(
        lib.to_numpy(lib.asarray(A) @ kr.T), K.reshape(4, -1), rtol=lib.rtol, atol=lib.rtol
    )
    # matches TensorLy's convention
    tl = pytest.importorskip("tensorly")
    np.testing.assert_allclose(lib.to_numpy(kr), tl.tenalg.khatri_rao([B, C, D]), rtol=lib.rtol)


def test_tenalg_errors():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="mode=2 is not allowed"):
        unfold(x, 2)
    with pytest.raises(TypeError, match="mode"):
        unfold(x, 0.5)
    with pytest.raises(ValueError, match=r"matrix has shape \(2, 3\)"):
        fold(x, 0, (2, 2))
    with pytest.raises(ValueError, match="same number of columns"):
        khatri_rao([np.zeros((2, 3)), np.zeros((2, 2))])
    with pytest.raises(ValueError, match="at least one matrix"):
        khatri_rao([])
    with pytest.raises(TypeError, match="NumPy array or a torch tensor"):
        unfold([[1.0, 2.0]], 0)
