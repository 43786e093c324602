"""collect_covariances: batch kinds, token masks, shared inputs, meta tensors."""

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from _helpers import assert_row_stats  # noqa: E402
from sigmadecomp_torch import collect_covariances  # noqa: E402

F64 = torch.float64


class TinyLM(nn.Module):
    """Embedding -> attention-like q/k/v on one tensor -> a feed-forward Linear."""

    def __init__(self, vocab=20, d=6):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)
        self.ff = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids).double()
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax(q @ k.transpose(1, 2), dim=-1)
        if attention_mask is not None:
            att = att * attention_mask[:, None, :]
        y = self.ff(h + (att @ v).sum(-1, keepdim=True))
        return self.head(y.mean(dim=1))


def _token_batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for lengths in ([7, 4, 2], [5, 7, 1]):
        ids = torch.randint(1, 20, (3, 7), generator=g)
        mask = torch.zeros(3, 7, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        ids = ids * mask  # pad id 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_mapping_batches_run_as_keywords_and_mask_padding():
    model = TinyLM().double()
    batches = _token_batches()
    stats = collect_covariances(model, batches, progress=False)
    h = torch.cat([model.emb(b["input_ids"]).detach()[b["attention_mask"].bool()]
                   for b in batches]).double()
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert stats["q"].count == real == 26  # not the 42 padded positions
    assert_row_stats(stats["q"], h)
    # the head reads pooled (batch, d) inputs: not a token layout, every row counts
    assert stats["head"].count == 6
    # mask=None: every position, padded ones included
    unmasked = collect_covariances(model, batches, progress=False, mask=None)
    assert unmasked["q"].count == 42


def test_q_k_v_on_one_input_share_one_statistic():
    model = TinyLM().double()
    stats = collect_covariances(model, _token_batches(), progress=False)
    assert stats["q"] is stats["k"] is stats["v"]  # one object, factorized once downstream
    assert stats["ff"] is not stats["q"] and stats["head"] is not stats["q"]
    # the shared statistic is exactly the one each layer would get alone
    for name in ("k", "v"):
        alone = collect_covariances(model, _token_batches(), layers=[name], progress=False)
        torch.testing.assert_close(alone[name].sigma, stats["q"].sigma, rtol=0, atol=0)
        assert alone[name].count == stats["q"].count


class Switchy(nn.Module):
    """b reads a's input in the first batch only; c runs in the first batch only."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        first = self.calls == 0
        self.calls += 1
        y = self.a(x)
        y = y.sum() + self.b(x if first else x * 2).sum()
        if first:
            y = y + self.c(x).sum()
        else:
            y = y + self.b(x).sum()  # b runs twice, once on a's input
        return y


def test_sharing_ends_exactly_when_inputs_differ():
    model = Switchy().double()
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(5, 4, generator=g, dtype=F64) for _ in range(2))
    stats = collect_covariances(model, [x1, x2], progress=False)
    assert stats["b"] is not stats["a"] and stats["c"] is not stats["a"]
    assert_row_stats(stats["a"], torch.cat([x1, x2]))
    assert_row_stats(stats["b"], torch.cat([x1, 2 * x2, x2]))
    assert_row_stats(stats["c"], x1)


def test_transformer_encoder_layer_with_padding_mask():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    for batch_first in (True, False):
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        layer = layer.double()
        src = torch.randn(3, 5, 8, generator=g, dtype=F64)
        pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
        if not batch_first:
            src = src.transpose(0, 1)
        batch = {"src": src, "src_key_padding_mask": pad}
        seen = {}
        hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
                 for n, m in layer.named_modules() if n in ("linear1", "linear2")]
        with torch.no_grad():
            layer.eval()(**batch)
        for h in hooks:
            h.remove()
        stats = collect_covariances(layer, [batch], progress=False,
                                    mask=lambda b: ~b["src_key_padding_mask"],
                                    layers=["linear1", "linear2"])
        for name in ("linear1", "linear2"):
            x = seen[name] if batch_first else seen[name].transpose(0, 1)
            assert_row_stats(stats[name], x[~pad])
            assert stats[name].count == 9


def test_tuples_that_would_lose_inputs_are_refused():
    model = TinyLM().double()
    b = _token_batches()[0]
    pair = (b["input_ids"], b["attention_mask"])
    with pytest.raises(TypeError, match=r"batch 0 is a tuple of 2 items.*forward="):
        collect_covariances(model, [pair], progress=False)
    x = torch.randn(4, 4, dtype=F64)
    lin = nn.Linear(4, 2).double()
    with pytest.raises(TypeError, match="3 items"):
        collect_covariances(lin, [(x, torch.zeros(4), torch.arange(4))], progress=False)
    # forward= runs anything; a mask callable masks it
    via = collect_covariances(model, [pair], progress=False, forward=lambda m, t: m(*t),
                              mask=lambda t: t[1])
    ref = collect_covariances(model, [b], progress=False)
    torch.testing.assert_close(via["q"].sigma, ref["q"].sigma, rtol=0, atol=0)
    assert via["q"].count == ref["q"].count == 13
    # (x,) and (x, y) with floating-point x
    one = collect_covariances(lin, [[x]], progress=False)[""]
    two = collect_covariances(lin, [(x, torch.zeros(4))], progress=False)[""]
    assert_row_stats(one, x)
    assert_row_stats(two, x)
    with pytest.raises(ValueError, match="mask='yes'"):
        collect_covariances(lin, [x], mask="yes", progress=False)
    with pytest.raises(TypeError, match="forward=3"):
        collect_covariances(lin, [x], forward=3, progress=False)
    with pytest.raises(TypeError, match=r"mask\(batch\) of batch 0"):
        collect_covariances(lin, [x], mask=lambda b: [1, 0], progress=False)


def test_a_mask_no_layer_can_use_warns():
    lin = nn.Linear(4, 2).double()
    x = torch.randn(3, 4, dtype=F64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = collect_covariances(lin, [x], mask=lambda b: torch.ones(5, dtype=torch.bool),
                                progress=False)[""]
    assert s.count == 3 and any("mask" in str(m.message) for m in w)


def test_meta_model_and_data_are_refused():
    with torch.device("meta"):
        meta_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0.weight' on the meta device"):
        collect_covariances(meta_model, [torch.randn(1, 3, 3, 3)], progress=False)
    lin = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="meta device"):
        collect_covariances(lin, [torch.empty(2, 4, device="meta")], progress=False)
    with pytest.raises(ValueError, match="meta device"):
        collect_covariances(lin, [{"input": torch.empty(2, 4, device="meta")}], progress=False)
    with pytest.raises(ValueError, match="device='meta'"):
        collect_covariances(lin, [torch.randn(2, 4)], device="meta", progress=False)
    with pytest.raises(ValueError, match="layer '': its input is on the meta device"):
        collect_covariances(lin, [0], progress=False,
                            forward=lambda m, b: m(torch.empty(2, 4, device="meta")))
    assert not lin._forward_pre_hooks
