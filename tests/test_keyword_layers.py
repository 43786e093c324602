"""Layers called with their input as a keyword (``layer(input=x)``) in every pass over data."""

import pytest
import torch
from torch import nn

from sigmadecomp_torch import compress


class TwoLinear(nn.Module):
    def __init__(self, keyword):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 4)
        self.keyword = keyword

    def forward(self, x):
        if self.keyword:
            return self.fc2(input=torch.relu(self.fc1(input=x)))
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("refit", [None, "all"])
def test_sequential_compression_of_keyword_called_layers(refit):
    torch.manual_seed(0)
    positional = TwoLinear(False).double()
    keyword = TwoLinear(True).double()
    keyword.load_state_dict(positional.state_dict())
    data = [torch.randn(32, 6, dtype=torch.float64) for _ in range(3)]
    kw = dict(ranks={"fc1": 3, "fc2": 2}, data=data, sequential=True, refit=refit,
              progress=False)
    got, report = compress(keyword, "svd", **kw)
    want, _ = compress(positional, "svd", **kw)
    assert sorted(row["name"] for row in report.layers) == ["fc1", "fc2"]
    x = data[0]
    torch.testing.assert_close(got(x), want(x), rtol=0, atol=0)
    assert not torch.equal(got(x), keyword(x))  # the layers were replaced


@pytest.mark.parametrize("predicate", [lambda n: True, lambda n, m, extra: True])
def test_a_layers_predicate_of_the_wrong_arity_is_named(predicate):
    from sigmadecomp_torch import collect_covariances

    model = TwoLinear(False)
    with pytest.raises(TypeError, match=r"layers=.*f\(name, module\)"):
        collect_covariances(model, [torch.randn(4, 6)], layers=predicate, progress=False)
    with pytest.raises(TypeError, match=r"layers=.*f\(name, module\)"):
        compress(model, "svd", ratio=2, layers=predicate, progress=False)
    # a predicate with a default third argument, or *args, is fine
    got = collect_covariances(model, [torch.randn(4, 6)], layers=lambda n, m, k=0: n == "fc1",
                              progress=False)
    assert list(got) == ["fc1"]
