"""Token batches (transformers) and sequential compression: behaviours that once went
wrong -- statistics of an input changed in place, masks in the side-by-side passes,
padded rows, keyword example inputs, budgets and refits of sequential compression."""

import collections
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sigmadecomp.ranks import layer_params
from sigmadecomp_torch import collect_covariances, compress
from sigmadecomp_torch.sequential import collect_cross_covariances, sequential_compress


class _InPlace(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.skip = nn.Linear(d, d)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        h = x * 1.0
        s = self.skip(h)  # reads h
        h = self.act(h)  # the same tensor object, changed in place
        return s + self.fc(h)  # reads it again


def test_an_input_changed_in_place_is_not_shared():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    stats = collect_covariances(_InPlace().eval(), [x], progress=False)
    assert stats["skip"] is not stats["fc"]
    r = torch.relu(x).double()
    torch.testing.assert_close(stats["fc"].sigma, r.T @ r / len(x), rtol=1e-12, atol=1e-12)


class _Tokens(nn.Module):
    def __init__(self, seq_first=False):
        super().__init__()
        self.seq_first = seq_first
        self.emb = nn.Embedding(20, 6)
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        if self.seq_first:
            h = h.transpose(0, 1)
        return self.head(self.b(torch.tanh(self.a(h))).mean(0 if self.seq_first else 1))


def _messages(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught]


def test_side_by_side_passes_warn_of_square_and_unused_masks():
    torch.manual_seed(0)
    am = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    data = [{"input_ids": torch.randint(1, 20, (4, 4)) * am, "attention_mask": am}]
    model = _Tokens(seq_first=True).eval()
    got = _messages(lambda: collect_cross_covariances(model, model, data, layers=["b"]))
    assert any("token mask of a batch is square (4, 4)" in m for m in got)
    unused = [{"input_ids": torch.randint(1, 20, (2, 5)),
               "attention_mask": torch.ones(2, 3, dtype=torch.long)}]  # no layer's shape
    got = _messages(lambda: collect_cross_covariances(model, model, unused, layers=["b"]))
    assert any("no chosen Linear layer had an input of the mask's shape" in m for m in got)
    one = [{"input_ids": torch.randint(1, 20, (1, 1)), "attention_mask": torch.ones(1, 1)}]
    assert not any("square" in m for m in _messages(
        lambda: collect_covariances(_Tokens().eval(), one, progress=False)))


def test_all_padding_is_named_in_every_pass():
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1, 20, (3, 4)),
             "attention_mask": torch.zeros(3, 4, dtype=torch.long)}
    model = _Tokens().eval()
    with pytest.raises(ValueError, match="ran, but none of its input rows entered"):
        compress(model, "svd", data=[batch], sequential=True, ratio=1.5, progress=False)
    with pytest.raises(ValueError, match="layer 'a' ran, but none of its input rows"):
        collect_cross_covariances(model, model, [batch], layers=["a"])


class _Attention(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.Embedding(20, d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.post = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids, attention_mask):
        pad = attention_mask == 0
        h = self.emb(input_ids)
        a, _ = self.mha(h, h, h, key_padding_mask=pad, need_weights=False)
        return self.head(torch.relu(self.post(h + a)).masked_fill(pad[..., None], 0.0).sum(1))


def test_non_finite_values_at_padded_positions_do_not_count():
    torch.manual_seed(0)
    am = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])  # all padding: NaN rows
    batch = {"input_ids": torch.randint(1, 20, (3, 4)), "attention_mask": am}
    stats = collect_covariances(_Attention().eval(), [batch], layers=["post"], progress=False)
    assert stats["post"].count == 6 and bool(torch.isfinite(stats["post"].sigma).all())


def test_keyword_example_inputs_and_one_mapping_batch():
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1, 20, (2, 5)),
             "attention_mask": torch.ones(2, 5, dtype=torch.long)}

    class Encoding(collections.UserDict):  # a BatchEncoding is a UserDict
        pass

    model = _Tokens().eval()
    from sigmadecomp_torch import default_layers
    assert default_layers(model, example_input=Encoding(batch)) == ["b"]
    stats = collect_covariances(model, batch, progress=False)  # one batch, not its keys
    assert stats["a"].count == 10
    meta = dict(batch, attention_mask=torch.ones(2, 5, device="meta"))
    with pytest.raises(ValueError, match=r"attention_mask'\] of batch 0 is on the meta device"):
        collect_covariances(model, [meta], progress=False)


def test_nested_tensor_inputs_get_the_way_out():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True).eval()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = enc, nn.Linear(8, 3)

        def forward(self, x, attention_mask):
            return self.head(self.enc(x, src_key_padding_mask=attention_mask == 0).sum(1))

    am = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"x": torch.randn(2, 4, 8), "attention_mask": am}
    try:
        stats = collect_covariances(Model().eval(), [batch], progress=False)
    except ValueError as e:
        assert "received a nested tensor" in str(e) and "enable_nested_tensor=False" in str(e)
    else:  # this torch ran the encoder without packing: the statistics are plain
        assert all(bool(torch.isfinite(s.sigma).all()) for s in stats.values())


def test_transformer_without_replaceable_layers_says_why():
    from sigmadecomp_torch.vit import TorchViT

    model = TorchViT(depth=1, dim=16, heads=2).eval()
    x = torch.randn(2, 1, 28, 28)
    for kw in ({}, {"sequential": True}):
        with pytest.raises(ValueError, match="no layer can be compressed: .*reads its weight"):
            compress(model, "svd", data=[x], ratio=1.5, progress=False, **kw)


def test_sequential_svd_ridge_option_is_the_one_minimised():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 4)).double()
    data = [(torch.randn(200, 12) @ torch.diag(torch.logspace(0, -3, 12))).double()
            for _ in range(2)]
    opts = {"ridge": 0.0}
    seq, _ = compress(net, "svd", ranks={"0": 3}, data=data, sequential=True, options=opts,
                      progress=False)
    one, _ = compress(net, "svd", ranks={"0": 3}, data=data, options=opts, progress=False)
    w = [(m[0].last.weight @ m[0].first.weight).detach() for m in (seq, one)]
    # the first layer's inputs do not change: sequential equals one-shot
    assert float((w[0] - w[1]).norm() / w[1].norm()) < 1e-10


def test_sequential_budget_is_shared_only_by_replaceable_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    net[4].register_forward_hook(lambda m, a, o: None)  # compress leaves '4' alone
    data = [torch.randn(256, 8) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seq in (False, True):
            _, rep = compress(net, "svd", budget=0.5, data=data, sequential=seq, progress=False)
            used = sum(layer_params(tuple(net.get_submodule(r["name"]).weight.shape), "svd",
                                    r["ranks"]) for r in rep.layers)
            dense = sum(net.get_submodule(r["name"]).weight.numel() for r in rep.layers)
            assert used <= 0.5 * dense
            reason = next(s["reason"] for s in rep.skipped if s["name"] == "4")
            assert "forward hooks" in reason


def test_sequential_reasons_refits_and_messages():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in (dict(ratio=2), dict(budget=0.5)):
            _, rep = compress(net, "svd", data=data, sequential=True, progress=False, **kw)
            assert [s["reason"] for s in rep.skipped if s["name"] == "4"] == [
                "grouped convolution (groups=2) is not supported by the factorized layers"]
        with pytest.raises(ValueError, match=r"budget=0.01 \(a fraction: \d+ of \d+ params\)"):
            compress(net, "svd", data=data, budget=0.01, progress=False)
    lin = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 4))
    rows = [torch.randn(128, 8) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, rep = compress(lin, "svd", ratio=2, data=rows, sequential=True, refit="all",
                          progress=False)
    reason = next(s["reason"] for s in rep.skipped if s["name"] == "6")
    assert reason.startswith("ranks 1 would not reduce")  # chosen, left dense ...
    assert "6" in [r["name"] for r in rep.refitted]  # ... and refitted, as one-shot does


def test_refit_error_leaves_an_inplace_model_unchanged():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = [torch.randn(64, 8) for _ in range(2)]
    for seq in (False, True):
        with pytest.raises(ValueError, match="refit contains 'unused', which never ran"):
            compress(net, "svd", ratio=2, layers=["b"], data=data, refit=["unused"],
                     inplace=True, sequential=seq, progress=False)
        assert isinstance(net.b, nn.Linear)
        assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_sequential_direct_call_reaches_the_closed_form_with_target_ridge_zero():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    data = [torch.randn(200, 12, dtype=torch.float64) for _ in range(2)]
    fix, _ = sequential_compress(net, "svd", data, ranks={"0": 3}, options={"ridge": 0.0},
                                 target_ridge=0.0, layers=["0"], progress=False)
    X = torch.cat(data).numpy()
    K = net[0].weight.detach().numpy()
    S = X.T @ X / len(X)
    lam, V = np.linalg.eigh(S)
    Sh, Shi = (V * np.sqrt(lam)) @ V.T, (V / np.sqrt(lam)) @ V.T
    U, s, Vt = np.linalg.svd(K @ Sh)
    best = (U[:, :3] * s[:3]) @ Vt[:3] @ Shi
    got = (fix[0].last.weight @ fix[0].first.weight).detach().numpy()
    assert np.linalg.norm(got - best) / np.linalg.norm(best) < 1e-8
