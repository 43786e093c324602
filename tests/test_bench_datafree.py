"""The data-free benchmark's statistics variants (benchmarks/datafree.py)."""

import pytest

torch = pytest.importorskip("torch")


def test_synthetic_mix_variant_mixes_synthetic_and_batchnorm_statistics():
    from benchmarks import datafree
    from sigmadecomp_torch import collect_covariances, covariances_from_batchnorm
    from sigmadecomp_torch.data import make_loader, synthetic_images
    from sigmadecomp_torch.demo.reference import load_reference
    from sigmadecomp_torch.models import conv3x3_names

    torch.manual_seed(0)
    model = load_reference()
    names = conv3x3_names(model, skip_first=True)[:2]
    out, seconds, _ = datafree.statistics(model, names, ("synthetic-mix",), 16, 0)
    mix = out["synthetic-mix"]
    assert set(mix) == set(names) and seconds["synthetic-mix"] >= 0
    assert mix.rule == "moments" and set(mix.weights) == set(names)
    syn = collect_covariances(model, make_loader(synthetic_images(16, seed=0), batch_size=256),
                              layers=names, progress=False)
    prior, _ = covariances_from_batchnorm(model, layers=names, input_shape=(1, 28, 28),
                                          shrinkage=0.0)
    for n in names:
        a, w = mix.alphas[n], mix.weights[n]
        S, P = syn[n].sigma, prior[n].sigma
        d = S.shape[0]
        shrunk = (1 - a) * S + a * torch.trace(S) / d * torch.eye(d, dtype=S.dtype)
        want = (1 - w) * shrunk + w * (torch.trace(S) / torch.trace(P)) * P
        # the mixture the rule chose, rebuilt from its (a, w) and the two statistics
        torch.testing.assert_close(mix[n].sigma, want, rtol=1e-6, atol=1e-8)
