"""collect_covariances: statistics equal a direct im2col computation."""

import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp_torch import (  # noqa: E402
    LayerStats,
    collect_covariances,
    load_covariances,
    save_covariances,
    select_layers,
)

F64 = torch.float64


_NP_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def reference_patches(x, conv):
    """Patches (N*Ho*Wo, C*kh*kw) of ``x`` as ``conv`` sees them, computed in NumPy."""
    x = np.asarray(x.detach().double().cpu())
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if conv.padding == "same":
        pads = []
        for d, k in ((dh, kh), (dw, kw)):
            tot = d * (k - 1)
            pads.append((tot // 2, tot - tot // 2))
    elif conv.padding == "valid":
        pads = [(0, 0), (0, 0)]
    else:
        pads = [(conv.padding[0],) * 2, (conv.padding[1],) * 2]
    xp = np.pad(x, [(0, 0), (0, 0), *pads], mode=_NP_MODE[conv.padding_mode])
    Hp, Wp = xp.shape[2:]
    Ho = (Hp - dh * (kh - 1) - 1) // sh + 1
    Wo = (Wp - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty(x.shape[:2] + (kh, kw, Ho, Wo))
    for a in range(kh):
        for b in range(kw):
            cols[:, :, a, b] = xp[:, :, a * dh:a * dh + sh * (Ho - 1) + 1:sh,
                                  b * dw:b * dw + sw * (Wo - 1) + 1:sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(-1, x.shape[1] * kh * kw)


def _close(a, b, tol=1e-12):
    a = np.asarray(a.detach().cpu()) if isinstance(a, torch.Tensor) else np.asarray(a)
    b = np.asarray(b)
    assert a.shape == b.shape
    scale = max(1.0, float(np.abs(b).max()))
    assert float(np.abs(a - b).max()) <= tol * scale


CONVS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(kernel_size=(2, 3), padding="same", padding_mode="reflect"),
    dict(kernel_size=3, stride=2, padding=2, padding_mode="circular"),
    dict(kernel_size=(3, 2), padding=(1, 0), padding_mode="replicate", dilation=(2, 1)),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=3, padding="valid"),
]


def _data(shape, n_batches=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) + 0.3 for _ in range(n_batches)]


@pytest.mark.parametrize("kw", CONVS)
def test_conv_statistics_equal_reference(kw):
    conv = nn.Conv2d(3, 4, dtype=F64, **kw)
    data = _data((2, 3, 9, 10))
    stats = collect_covariances(conv, data, progress=False)
    s = stats[""]
    U = reference_patches(torch.cat(data), conv)
    assert s.count == U.shape[0]
    assert s.sigma.dtype == F64 and s.groups == 1
    _close(s.sigma, U.T @ U / U.shape[0])
    _close(s.mean, U.mean(axis=0))
    _close(s.centered(), np.cov(U.T, bias=True))
    # tiny chunks (one output row at a time) give the same sums
    small = collect_covariances(conv, data, progress=False, chunk_bytes=1)[""]
    _close(small.sigma, s.sigma.numpy())


def test_grouped_conv_keeps_one_statistic_per_group():
    conv = nn.Conv2d(6, 4, 3, groups=2, padding=1, dtype=F64)
    data = _data((2, 6, 5, 5))
    s = collect_covariances(conv, data, progress=False)[""]
    U = reference_patches(torch.cat(data), conv)  # columns (c, h, w), c over all 6 channels
    assert s.groups == 2 and tuple(s.sigma.shape) == (2, 27, 27)
    for g in range(2):
        Ug = U[:, g * 27:(g + 1) * 27]
        _close(s.sigma[g], Ug.T @ Ug / U.shape[0])
        _close(s.mean[g], Ug.mean(axis=0))
    depthwise = nn.Conv2d(4, 4, 3, groups=4, dtype=F64)
    d = collect_covariances(depthwise, _data((1, 4, 6, 6)), progress=False)[""]
    assert tuple(d.sigma.shape) == (4, 9, 9)


def test_linear_statistics_over_the_last_dimension():
    lin = nn.Linear(5, 3, dtype=F64)
    data = _data((4, 2, 5))
    s = collect_covariances(lin, data, progress=False, chunk_bytes=64)[""]
    X = torch.cat(data).reshape(-1, 5).numpy()
    assert s.count == X.shape[0]
    _close(s.sigma, X.T @ X / X.shape[0])
    _close(s.mean, X.mean(axis=0))


def test_float32_model_statistics_are_float64_sums():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    data = _data((2, 3, 7, 7), dtype=torch.float32)
    s = collect_covariances(conv, data, progress=False)[""]
    U = reference_patches(torch.cat(data), conv)  # float32 values, float64 products
    assert s.sigma.dtype == F64
    _close(s.sigma, U.T @ U / U.shape[0], 1e-13)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.Dropout(0.5), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).double()


def test_model_statistics_merge_and_batches():
    model = _model().eval()
    data = _data((4, 3, 8, 8), n_batches=4)
    whole = collect_covariances(model, data, progress=False)
    assert list(whole) == ["0", "3", "6"]
    a = collect_covariances(model, data[:1], progress=False)
    b = collect_covariances(model, [(x, torch.zeros(4)) for x in data[1:]], progress=False)
    merged = {k: a[k] + b[k] for k in a}
    for k in whole:
        assert merged[k].count == whole[k].count
        _close(merged[k].sigma, whole[k].sigma.numpy())
        _close(merged[k].mean, whole[k].mean.numpy())
    first = collect_covariances(model, iter(data), max_batches=1, progress=False)
    for k in first:
        _close(first[k].sigma, a[k].sigma.numpy(), 0)
    # a DataLoader yields (input, label) tuples
    ds = torch.utils.data.TensorDataset(torch.cat(data), torch.zeros(16))
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    via_loader = collect_covariances(model, loader, progress=True)
    for k in whole:
        _close(via_loader[k].sigma, whole[k].sigma.numpy())
    # a single tensor is one batch; layers by name or predicate
    one = collect_covariances(model, data[0], layers=["6"], progress=False)
    assert list(one) == ["6"]
    pred = collect_covariances(model, data[0], progress=False,
                               layers=lambda n, m: isinstance(m, nn.Conv2d))
    assert list(pred) == ["0", "3"]


def test_model_mode_and_buffers_are_restored():
    model = _model()
    model.train()
    model[4].eval()  # a mixed state must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    running = model[1].running_mean.clone()
    collect_covariances(model, _data((4, 3, 8, 8)), progress=False)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(model[1].running_mean, running)  # ran in eval mode
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_errors_leave_no_hooks_and_name_the_problem():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    good = _data((2, 3, 8, 8), n_batches=1)[0]
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        collect_covariances(model, [good, bad], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        collect_covariances(model, [], progress=False)
    with pytest.raises(ValueError, match=r"layer '0'.*\(N, 3, H, W\)"):
        collect_covariances(model, [torch.randn(2, 4, 8, 8, dtype=F64)], progress=False)
    with pytest.raises(ValueError, match="layer ''.*in_features=96"):
        collect_covariances(model[6], [torch.randn(2, 7, dtype=F64)], layers="", progress=False)
    with pytest.raises(ValueError, match="'nope', which is not a module"):
        collect_covariances(model, [good], layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="BatchNorm2d"):
        collect_covariances(model, [good], layers=["1"], progress=False)
    with pytest.raises(TypeError, match="batch 0 of type int"):
        collect_covariances(model, [3], progress=False)
    with pytest.raises(ValueError, match="max_batches=0"):
        collect_covariances(model, [good], max_batches=0, progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_layers_that_never_run():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    m = Branchy()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        stats = collect_covariances(m, [torch.randn(4, 3)], progress=False)
    assert list(stats) == ["used"] and any("unused" in str(x.message) for x in w)
    with pytest.raises(ValueError, match="'unused' .*never ran"):
        collect_covariances(m, [torch.randn(4, 3)], layers=["used", "unused"], progress=False)


def test_no_rows_message_names_only_the_possible_causes():
    from sigmadecomp_torch import compress

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                        nn.Flatten(), nn.Linear(64, 2))
    empty = torch.empty(0, 3, 6, 6)  # e.g. a filtered batch with no samples left
    no_mask = r"entered the statistics \(only batches with zero samples\)$"
    with pytest.raises(ValueError, match="their input rows " + no_mask):
        collect_covariances(net, [empty, empty], progress=False)
    with pytest.raises(ValueError, match="their input rows " + no_mask):
        compress(net, "svd", ratio=2, data=empty, progress=False)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(5, 3), nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x, attention_mask=None):
            # b reads no tokens; c reads pooled inputs (a mask does not apply to them)
            return self.a(x).sum() + self.b(x[:, :0]).sum() + self.c(x.mean(1)).sum()

    x = torch.randn(2, 4, 5)
    zeros = torch.zeros(2, 4, dtype=torch.long)
    for batch, a_rows in ((x, True), ({"x": x, "attention_mask": zeros}, False)):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            stats = collect_covariances(Tokens(), [batch], progress=False)
        assert sorted(stats) == (["a", "c"] if a_rows else ["c"])
        no_rows = {m.split("'")[1]: m.split("statistics ")[1] for m in map(str, (
            w.message for w in rec)) if "ran, but none of its input rows" in m}
        # a token mask is a cause only when one was applied to the layer's inputs
        expected = {"b": "(only batches with zero samples); it has no statistics"}
        if not a_rows:
            expected["a"] = ("(only batches with zero samples, or a token mask that is zero "
                             "everywhere); it has no statistics")
        assert no_rows == expected
    with pytest.raises(ValueError, match=r"their input rows entered the statistics \(only "
                                         r"batches with zero samples, or a token mask that "
                                         r"is zero everywhere\)$"):
        collect_covariances(Tokens(), [{"x": x, "attention_mask": zeros}], layers=["a"],
                            progress=False)
    with pytest.raises(ValueError, match=r"\(only batches with zero samples, or "
                                         r"position_fraction=1e-09 too small"):
        collect_covariances(net, [torch.randn(1, 3, 6, 6)], layers=["0"],
                            position_fraction=1e-9, progress=False)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_and_load_round_trip(tmp_path, suffix):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)).double()
    stats = collect_covariances(model, _data((3, 4, 3, 3)), progress=False)
    path = os.path.join(tmp_path, "stats" + suffix)
    save_covariances(stats, path)
    back = load_covariances(path)
    assert list(back) == list(stats)
    for k in stats:
        assert torch.equal(back[k].sigma, stats[k].sigma)
        assert torch.equal(back[k].mean, stats[k].mean)
        assert (back[k].count, back[k].layer, back[k].groups) == (
            stats[k].count, stats[k].layer, stats[k].groups)
    with pytest.raises(TypeError, match="LayerStats"):
        save_covariances({"a": torch.eye(2)}, path)


def test_layer_stats_validation_and_merge_errors():
    e = torch.eye(2, dtype=F64)
    with pytest.raises(ValueError, match="mean has shape"):
        LayerStats(e, torch.zeros(3, dtype=F64), 1)
    with pytest.raises(ValueError, match="count=0"):
        LayerStats(e, torch.zeros(2, dtype=F64), 0)
    a = LayerStats(e, torch.zeros(2, dtype=F64), 1)
    b = LayerStats(torch.eye(3, dtype=F64), torch.zeros(3, dtype=F64), 1)
    with pytest.raises(ValueError, match="different layers"):
        a + b


def test_centered_float32_statistics_lose_only_their_rounding():
    from sigmadecomp_torch import compress

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))
    data = [torch.randn(2, 3, 4, 4)]
    s64 = collect_covariances(model, data, progress=False)["2"]
    s32 = collect_covariances(model, data, progress=False, dtype=torch.float32)["2"]
    assert s32.count < s32.n  # 32 patches of size 72: a rank-deficient Sigma
    m = s64.mean
    assert torch.equal(s64.centered(), s64.sigma - m[:, None] * m[None, :])  # float64: as is
    c = s32.centered()
    lam = torch.linalg.eigvalsh(c)
    assert c.dtype == F64 and lam[0] >= -1e-8 * lam[-1]  # passes the float64 PSD test
    _close(c, s64.centered(), tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the warning on the error at this ratio)
        compress(model, "svd", covariances={"2": s32}, layers=["2"], ratio=2, centered=True,
                 progress=False)
    # a pair that rounding cannot explain is still refused: only eigenvalues down to
    # -1e-4 * lambda_max(sigma) (the float32 tolerance) are clipped
    linear = nn.Sequential(nn.Linear(2, 4))
    for excess, clipped in ((1e-6, True), (1e-3, False), (8.0, False)):
        mean = torch.tensor([0.0, (1.0 + excess) ** 0.5])  # var = 1 - mean^2 = -excess
        s = LayerStats(torch.eye(2), mean, 5, kind="Linear", weight_shape=(4, 2))
        low = float(torch.linalg.eigvalsh(s.centered())[0])
        if clipped:
            assert abs(low) < 1e-15
            compress(linear, "svd", covariances={"0": s}, layers=["0"], ratio=2,
                     centered=True, progress=False)
        else:
            assert low < -0.9 * excess
            with pytest.raises(ValueError, match="layer '0': sigma is not positive "
                                                 "semi-definite: smallest eigenvalue -"):
                compress(linear, "svd", covariances={"0": s}, layers=["0"], ratio=2,
                         centered=True, progress=False)
    # grouped statistics: each group on its own
    two = LayerStats(torch.stack([s32.sigma, torch.eye(72)]),
                     torch.stack([s32.mean, torch.full((72,), 2.0)]), s32.count, groups=2)
    both = two.centered()
    assert torch.equal(both[0], c)
    assert float(torch.linalg.eigvalsh(both[1])[0]) < -100  # refused by its user


def test_select_layers_orders_and_checks():
    model = _model()
    assert [n for n, _ in select_layers(model, ["6", "0"])] == ["0", "6"]
    with pytest.raises(TypeError, match="predicate"):
        select_layers(model, 3)


def test_position_subsampling():
    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=F64)
    grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2, dtype=F64)
    model = nn.Sequential(conv, grouped)
    data = _data((8, 3, 12, 12), n_batches=2)
    exact = collect_covariances(model, data, progress=False)
    same = collect_covariances(model, data, progress=False, position_fraction=1.0)
    for k in exact:
        assert torch.equal(same[k].sigma, exact[k].sigma)
    a = collect_covariances(model, data, progress=False, position_fraction=0.5, seed=3)
    b = collect_covariances(model, data, progress=False, position_fraction=0.5, seed=3)
    c = collect_covariances(model, data, progress=False, position_fraction=0.5, seed=4)
    for k in exact:
        assert torch.equal(a[k].sigma, b[k].sigma)  # reproducible
        assert not torch.equal(a[k].sigma, c[k].sigma)
        assert 0.4 * exact[k].count < a[k].count < 0.6 * exact[k].count
        rel = float((a[k].sigma - exact[k].sigma).norm() / exact[k].sigma.norm())
        assert 1e-6 < rel < 0.3  # an estimate, close but not equal
    with pytest.raises(ValueError, match="position_fraction=0"):
        collect_covariances(model, data, position_fraction=0, progress=False)
    with pytest.raises(ValueError, match="position_fraction=1.5"):
        collect_covariances(model, data, position_fraction=1.5, progress=False)
