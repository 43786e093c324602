"""Regressions found auditing the transformer path (dict batches, attention, ViT)."""

import dataclasses

import pytest
import torch
from torch import nn

from sigmadecomp_torch import compress, default_layers
from sigmadecomp_torch.vit import ViT, patchify

torch.set_num_threads(1)


@dataclasses.dataclass
class _Output:  # a model output record that is neither a tuple nor a mapping
    logits: torch.Tensor
    aux: torch.Tensor


class _TwoHeads(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.head, self.aux = nn.Linear(d, 3), nn.Linear(d, 2)

    def forward(self, pixel_values):
        h = self.b(torch.relu(self.a(pixel_values)))
        return _Output(self.head(h), self.aux(h))


def test_heads_returned_in_a_dataclass_output_are_left_alone():
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    x = {"pixel_values": torch.randn(4, 8)}
    assert default_layers(model, example_input=x) == ["b"]
    _, report = compress(model, "svd", data=[x], ratio=2, progress=False)
    assert [r["name"] for r in report.layers] == ["b"]
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    assert reasons["head"].startswith("last layer") and reasons["aux"].startswith("last layer")


class _TinyLM(nn.Module):
    """Embedding -> q/k/v on one tensor -> MLP -> lm head (no Linear reads the input)."""

    def __init__(self, vocab=20, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 16), nn.Linear(16, d)
        self.lm = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        s = (self.q(h) @ self.k(h).transpose(1, 2)).masked_fill(attention_mask[:, None] == 0, -1e9)
        h = h + torch.softmax(s, -1) @ self.v(h)
        return {"logits": self.lm(h + self.fc2(torch.relu(self.fc1(h))))}


def test_q_k_v_reading_the_first_layers_input_are_all_first_layers():
    torch.manual_seed(0)
    am = torch.ones(3, 5, dtype=torch.long)
    am[0, 3:] = 0
    batch = {"input_ids": torch.randint(0, 20, (3, 5)), "attention_mask": am}
    model = _TinyLM().eval()
    assert default_layers(model, example_input=batch) == ["fc1", "fc2"]
    small, report = compress(model, "svd", data=[batch], ratio=2, progress=False)
    assert [r["name"] for r in report.layers] == ["fc1", "fc2"]
    reasons = {s["name"]: s["reason"] for s in report.skipped}
    for n in ("q", "k", "v"):  # one statistic, one decision; and the reason is true
        assert reasons[n].startswith("first layer")
        assert "(reads the model's input)" not in reasons[n]
    assert small(**batch)["logits"].shape == (3, 5, 20)


def test_vit_names_images_of_the_wrong_channels_or_size():
    model = ViT(depth=1, dim=16, heads=2, mlp_dim=16).eval()
    with pytest.raises(ValueError, match=r"images of shape \(2, 3, 28, 28\) is not allowed.*"
                                         r"\(N, 1, 28, 28\)"):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"images of shape \(2, 1, 14, 14\) is not allowed.*"
                                         r"image_size=28"):
        model(torch.rand(2, 1, 14, 14))


@pytest.mark.parametrize("patch", [0, -1, 2.0, True])
def test_patchify_names_a_bad_patch(patch):
    with pytest.raises(ValueError, match=rf"patch={patch!r} is not allowed; patch must be a "
                                         "positive integer"):
        patchify(torch.zeros(1, 1, 4, 4), patch)


def test_default_statistics_leave_out_layers_their_parent_never_calls():
    import warnings

    from sigmadecomp_torch import collect_covariances

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16),
                          nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                          nn.Linear(16, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = collect_covariances(model, [torch.randn(2, 5, 8)], progress=False)
    assert sorted(stats) == ["0", "2"]
    assert not [w for w in caught if "never ran" in str(w.message)]
    # named explicitly, such a layer is still collected when it runs (the slow path)
    model.train()
    named = collect_covariances(model, [torch.randn(2, 5, 8)], layers=["1.linear1"],
                                progress=False)
    assert named["1.linear1"].count == 10
