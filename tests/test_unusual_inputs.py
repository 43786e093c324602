"""Unusual but legitimate inputs: a clear error, a warning that says what happened, or the
right result (regressions of an audit of the public entry points)."""

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp_torch import collect_covariances, compress  # noqa: E402


class _Tokens(nn.Module):
    """Embedding -> Linear a -> Linear b -> mean over the sequence -> head."""

    def __init__(self, sequence_first=False):
        super().__init__()
        self.sequence_first = sequence_first
        self.emb = nn.Embedding(20, 8)
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, input_ids, attention_mask=None):
        ids = input_ids.T if self.sequence_first else input_ids
        h = self.b(torch.relu(self.a(self.emb(ids))))
        return self.head(h.mean(0 if self.sequence_first else 1))


def _batch(batch, seq):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 20, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, 1:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_square_token_mask_warns_that_the_layout_is_ambiguous():
    torch.manual_seed(0)
    for first in (False, True):
        model = _Tokens(sequence_first=first).eval()
        with pytest.warns(RuntimeWarning, match=r"square \(5, 5\).*mask=lambda b"):
            collect_covariances(model, [_batch(5, 5)], progress=False)
    # batch size != sequence length: the layout is known, no warning, the right statistic
    model = _Tokens(sequence_first=True).eval()
    batch = _batch(4, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        stats = collect_covariances(model, [batch], progress=False)
    with torch.no_grad():
        x = torch.relu(model.a(model.emb(batch["input_ids"].T)))
    rows = x[batch["attention_mask"].T.bool()].double()
    torch.testing.assert_close(stats["b"].sigma, rows.T @ rows / len(rows))


def test_rows_all_left_out_are_not_called_a_layer_that_never_ran():
    torch.manual_seed(0)
    model = _Tokens().eval()
    batch = _batch(4, 7)
    batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    with pytest.warns(RuntimeWarning, match="'a' ran, but none of its input rows") as rec:
        stats = collect_covariances(model, [batch], progress=False)
    assert not any("never ran" in str(w.message) for w in rec)
    assert set(stats) == {"head"}  # after pooling: not masked
    with pytest.raises(ValueError, match="layers ran, but none of their input rows"):
        collect_covariances(model, [batch], layers=["a"], progress=False)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"position_fraction=1e-09 too small"):
        collect_covariances(conv, [torch.randn(1, 3, 5, 5)], position_fraction=1e-9,
                            progress=False)


@pytest.mark.parametrize("data", [None, 5, "images"])
def test_data_that_is_not_batches_is_refused(data):
    with pytest.raises(TypeError, match=f"data of type {type(data).__name__} is not allowed"):
        collect_covariances(nn.Sequential(nn.Linear(3, 2)), data, progress=False)


def test_lazy_modules_are_refused_before_any_pass():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5), nn.Linear(5, 2))
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match="uninitialized parameter '2.weight'.*model\\(x\\)"):
        collect_covariances(model, [x], progress=False)
    for kw in (dict(data=[x]), dict()):
        with pytest.raises(ValueError, match="compress needs its shape"):
            compress(model, "svd", ratio=2, progress=False, **kw)
    assert isinstance(model[2], nn.LazyLinear)  # not materialized by a forward pass


def test_flags_and_options_of_the_wrong_type_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    for flag in ("inplace", "centered"):
        with pytest.raises(TypeError, match=f"{flag}='yes' is not allowed"):
            compress(model, "svd", ratio=2, progress=False, **{flag: "yes"})
    with pytest.raises(TypeError, match="options of type list is not allowed"):
        compress(model, "svd", ratio=2, progress=False, options=[1])


def test_svd_options_reach_the_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2))
    x = torch.randn(5, 6)  # 5 rows for 6 inputs: a singular Sigma, where the ridge matters
    stats = collect_covariances(model, [x], progress=False)
    kw = dict(covariances=stats, ranks={"1": 2}, progress=False)
    # refused before any layer is decomposed, with the options the solver takes
    with pytest.raises(TypeError, match="options contains 'bogus', which method='svd' does "
                                        "not take; the options of sigmadecomp.sigma_svd are"):
        compress(model, "svd", options={"bogus": 1}, **kw)
    plain, _ = compress(model, "svd", **kw)
    ridged, _ = compress(model, "svd", options={"ridge": 0.5}, **kw)
    def weight(m):
        return m[1].last.weight @ m[1].first.weight

    assert not torch.allclose(weight(plain), weight(ridged))


def test_evbmf_ranks_for_tt_are_refused_before_any_work():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))

    def boom():
        raise AssertionError("the data was read")
        yield

    for kw in (dict(), dict(data=boom()), dict(data=[torch.randn(1, 3, 9, 9)], sequential=True)):
        with pytest.raises(ValueError, match="ranks='evbmf' is not available for method='tt'"):
            compress(model, "tt", ranks="evbmf", progress=False, **kw)


def test_core_functions_on_parameters_give_plain_results_without_warnings():
    import sigmadecomp as sd

    gen = torch.Generator().manual_seed(0)
    K = nn.Parameter(torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=gen))
    X = torch.randn(100, 36, dtype=torch.float64, generator=gen)
    S = X.T @ X / 100
    runs = {
        "tucker2": lambda: sd.tucker2(K, (3, 3), S, n_iter_max=2),
        "cp": lambda: sd.cp(K, 4, S, n_iter_max=2),
        "tt_conv": lambda: sd.tt_conv(K, 3, S, n_iter_max=2),
        "tt_linear": lambda: sd.tt_linear(K.reshape(6, 36), 3, S, n_iter_max=2),
        "sigma_svd": lambda: sd.sigma_svd(K.reshape(6, 36), 3, S),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "requires_grad=True to a scalar"
        for name, run in runs.items():
            res = run()
            approx = res.to_tensor()
            assert not approx.requires_grad and approx.grad_fn is None, name
            err = sd.relative_sigma_error(K.reshape(6, 36), approx.reshape(6, 36), S)
            assert isinstance(err, float) and err == pytest.approx(res.sigma_error, rel=1e-9)
    assert torch.is_grad_enabled()  # the caller's autograd state is untouched


def test_layer_stats_count_merge_dtype_and_sum():
    from sigmadecomp_torch import LayerStats

    e, z = torch.eye(2), torch.zeros(2)  # float32 storage
    with pytest.raises(TypeError, match="count=2.5"):
        LayerStats(e.double(), z.double(), 2.5)
    assert LayerStats(e.double(), z.double(), 3.0).count == 3
    a, b, c = LayerStats(e, z, 10), LayerStats(3 * e, z + 1, 30), LayerStats(e, z, 40)
    merged = a + b
    assert merged.sigma.dtype == torch.float32 and merged.count == 40
    torch.testing.assert_close(merged.sigma, 2.5 * e)
    assert (a + LayerStats(e.double(), z.double(), 1)).sigma.dtype == torch.float64
    total = sum([a, b, c])
    assert total.count == 80
    torch.testing.assert_close(total.sigma, (a + b + c).sigma)


def test_threads_takes_numpy_integers():
    import numpy as np

    import sigmadecomp as sd

    with sd.threads(np.int64(1)):
        pass
    with pytest.raises(ValueError, match="n must be 'auto' or an int >= 1"):
        sd.threads(np.int64(0)).__enter__()


def test_torch_vit_from_a_float64_vit_runs_in_float64():
    from sigmadecomp_torch.vit import ViT, TorchViT

    torch.manual_seed(0)
    vit = ViT(depth=1).double().eval()
    twin = TorchViT.from_vit(vit).eval()
    assert next(twin.parameters()).dtype == torch.float64
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), vit(x))


@pytest.mark.parametrize("kw", [{"method": "tucker2"}, {"method": "tt"},
                                {"method": "cp", "inplace": True},
                                {"method": "tucker2", "sequential": True},
                                {"method": "svd", "refit": "all"}])
def test_a_model_compressed_under_inference_mode_still_trains(kw):
    """Tensors made under torch.inference_mode cannot enter autograd later; the returned
    model (its copy and its factors) is made outside it, so it can be fine-tuned."""
    from sigmadecomp_torch import load_compressed
    from sigmadecomp_torch.quantize import quantize_weights

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    model = build()
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.inference_mode():
            small, _ = compress(model, ratio=2, data=data, progress=False,
                                options=None if kw["method"] == "svd" else {"n_iter_max": 2},
                                **kw)
            quantized, _ = quantize_weights(small)
            restored = load_compressed(build(), small.state_dict())
    for m in (small, quantized, restored):
        assert not any(p.is_inference() for p in m.parameters())
        m.train()
        m(data[0]).sum().backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
