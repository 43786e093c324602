"""Statistics at scale: float32 products, in-place results, the ResNet-18 benchmark."""

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp_torch import collect_covariances  # noqa: E402
from sigmadecomp_torch import covariance as cov  # noqa: E402

F64 = torch.float64


def test_float32_products_are_close_to_float64_and_sums_stay_float64():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    data = [torch.randn(4, 3, 6, 6, generator=g) for _ in range(3)]
    exact = collect_covariances(model, data, progress=False)
    fast = collect_covariances(model, data, progress=False, gram_dtype=torch.float32,
                               chunk_bytes=1 << 16)
    for k, s in exact.items():
        f = fast[k]
        assert f.sigma.dtype == F64 and f.count == s.count
        rel = float((f.sigma - s.sigma).abs().max() / s.sigma.abs().max())
        assert 0 < rel < 1e-5  # float32 rounding, not float64's
        torch.testing.assert_close(f.mean, s.mean, rtol=1e-6, atol=1e-6)
    sub = collect_covariances(model, data, progress=False, gram_dtype=torch.float32,
                              position_fraction=0.5, seed=1)
    ref = collect_covariances(model, data, progress=False, position_fraction=0.5, seed=1)
    for k in ref:
        assert sub[k].count == ref[k].count
        torch.testing.assert_close(sub[k].sigma, ref[k].sigma, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gram_dtype=torch.float16"):
        collect_covariances(model, data, gram_dtype=torch.float16, progress=False)


def test_result_reuses_the_sums_instead_of_copying_them():
    lin = nn.Linear(5, 3).double()
    acc = cov._Accumulator("fc", lin, 1 << 20, cov._Run())
    acc(lin, (torch.randn(7, 5, dtype=F64),))
    storage = acc.xx.untyped_storage().data_ptr()
    s = acc.result()
    assert acc.xx is None and acc.xs is None  # the sums are freed
    assert s.sigma.untyped_storage().data_ptr() == storage  # mirrored and scaled in place
    torch.testing.assert_close(s.sigma, s.sigma.T, rtol=0, atol=0)


def test_collect_cost_resnet18_quick(capsys):
    from benchmarks import collect_cost

    runs, rows = collect_cost.main(["--model", "resnet18", "--quick", "--configs",
                                    "exact@default,gram_dtype=float32@1"])
    out = capsys.readouterr().out
    assert "| exact | default |" in out and "| gram_dtype=float32 | 1 |" in out
    assert [c for c, _, _ in runs] == ["exact", "gram_dtype=float32"]
    for _, _, r in runs:
        assert r["collect"] > 0 and r["forward"] > 0 and r["stats_mib"] > 0
    names = [k for k, *_ in rows]
    assert names[0] == "conv1" and all(n == "conv1" or n.startswith("layer1.0.") for n in names)
    assert all(0 < err < 1e-5 and 0 < frac < 1 for _, _, _, err, _, _, frac in rows)
    with pytest.raises(SystemExit, match="--configs"):
        collect_cost.main(["--model", "resnet18", "--quick", "--configs", "exact@3"])


@pytest.mark.parametrize("n, block", [(1, 256), (7, 3), (40, 16), (300, 256)])
def test_in_place_mirror_and_permutation(n, block):
    """The result is built in place: mirror of the upper triangle, then S[p][:, p]."""
    # private helpers on purpose: collect_covariances' result goes through both, but a
    # blocked in-place mirror/permutation bug at a block boundary needs these sizes
    from sigmadecomp_torch.covariance import _mirror_upper_, _permute_sym_

    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    full = A + A.T
    S = full.triu().clone()
    S += torch.randn(n, n, generator=g, dtype=torch.float64).tril(-1)  # junk below
    assert _mirror_upper_(S, block=block) is S
    assert torch.equal(S, full)
    order = torch.randperm(n, generator=g)
    ptr = S.data_ptr()
    _permute_sym_(S, order, block=block)
    assert S.data_ptr() == ptr
    assert torch.equal(S, full[order][:, order])
    G = torch.stack([full.triu(), (2 * full).triu()])  # (groups, n, n)
    _mirror_upper_(G, block=block)
    assert torch.equal(G[0], full) and torch.equal(G[1], 2 * full)
