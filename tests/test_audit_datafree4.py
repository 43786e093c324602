"""Audit of the data-free and transferred statistics: shrinkage rules, moment matching,
rectified-Gaussian moments."""

import time
import warnings

import numpy as np
import pytest
import torch

from sigmadecomp.shrinkage import check_alpha, match_moments, mix_sigma, shrink_sigma
from sigmadecomp_torch import LayerStats
from sigmadecomp_torch.batchnorm import relu_moments
from sigmadecomp_torch.transfer import shrink_covariances


def _problem(T, n, spread, seed=0):
    """A kernel, a second moment and targets whose ratios to the current mean squares
    span ``spread`` decades (in a random order over the channels)."""
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((T, n))
    X = rng.standard_normal((400, n)) * np.logspace(0, -1, n)
    S = X.T @ X / 400
    q = np.einsum("tn,nm,tm->t", K, S, K)
    target = q * np.logspace(-spread / 2, spread / 2, T)[rng.permutation(T)]
    return K, S, target


@pytest.mark.parametrize("T, n, spread", [(8, 8, 4), (8, 8, 6), (16, 48, 6), (32, 72, 6)])
def test_match_moments_converges_on_targets_spanning_many_decades(T, n, spread):
    # these targets used to end with a warning and a deviation of order 1 or more
    K, S, target = _problem(T, n, spread)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = match_moments(K, S, target)
    energies = np.einsum("tn,nm,tm->t", K, out.sigma, K)
    np.testing.assert_allclose(energies / out.scale, target, rtol=1e-7)
    # the KKT form of the answer: S'^-1 = S^-1 + K^T diag(lam) K
    np.testing.assert_allclose(
        np.linalg.inv(out.sigma),
        np.linalg.inv(S) + K.T @ (out.multipliers[:, None] * K), rtol=1e-5,
        atol=1e-6 * np.abs(np.linalg.inv(out.sigma)).max())
    assert np.linalg.eigvalsh(out.sigma)[0] > 0
    # the common factor: the geometric mean of the ratios under sigma
    q = np.einsum("tn,nm,tm->t", K, S, K)
    assert out.scale == pytest.approx(float(np.exp(np.mean(np.log(q / target)))), rel=1e-12)


def test_match_moments_is_quick_when_nothing_is_to_move():
    # targets already proportional to the current mean squares: sigma back, no search
    K, S, _ = _problem(32, 72, 0)
    q = np.einsum("tn,nm,tm->t", K, S, K)
    calls = []
    real = np.linalg.cholesky

    def counting(a, *args, **kw):
        calls.append(1)
        return real(a, *args, **kw)

    np.linalg.cholesky = counting
    try:
        out = match_moments(K, S, 3.0 * q)
    finally:
        np.linalg.cholesky = real
    assert len(calls) <= 2
    np.testing.assert_allclose(out.sigma, S, rtol=1e-12, atol=1e-14)
    assert not np.any(out.multipliers)


def test_match_moments_time_stays_small_with_the_spread():
    K, S, target = _problem(32, 72, 6)
    start = time.perf_counter()
    match_moments(K, S, target)
    assert time.perf_counter() - start < 1.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_alpha_is_a_value_error_everywhere(bad):
    S = np.diag([2.0, 1.0])
    st = LayerStats(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)),
                    torch.zeros(2, dtype=torch.float64), 10)
    for call in (lambda: check_alpha(bad), lambda: shrink_sigma(S, bad),
                 lambda: mix_sigma(S, S, bad, 0.5), lambda: shrink_covariances({"a": st}, bad),
                 lambda: shrink_covariances({"a": st}, {"a": bad})):
        with pytest.raises(ValueError, match="alpha"):
            call()
    with pytest.raises(ValueError, match="weight"):
        mix_sigma(S, S, 0.5, bad)
    # the type of a value that is not a number at all is still a TypeError
    with pytest.raises(TypeError, match="alpha"):
        check_alpha("half")


def test_relu_moments_never_negative():
    # E[max(X, 0) max(Y, 0)] >= 0; deep in the negative tail the formula rounded below 0
    got = relu_moments(np.array([-5.0, -8.0, -5.0]), np.array([-5.0, -8.0, -6.0]), 1.0, 1.0,
                       np.array([-0.999, -0.5, 0.3]))
    assert np.all(got >= 0.0)


def test_relu_moments_against_monte_carlo():
    # fixed seed, 400k pairs: the standard error of the mean is below 4e-3 here
    rng = np.random.default_rng(123)
    z = rng.standard_normal((2, 400_000))
    for m1, m2, s1, s2, r in [(0.3, -0.5, 1.2, 0.7, 0.6), (-1.0, 0.5, 0.5, 2.0, -0.4),
                              (0.0, 0.0, 1.0, 1.0, 0.95)]:
        x = m1 + s1 * z[0]
        y = m2 + s2 * (r * z[0] + np.sqrt(1 - r * r) * z[1])
        mc = np.mean(np.maximum(x, 0) * np.maximum(y, 0))
        assert float(relu_moments(m1, m2, s1, s2, r)) == pytest.approx(mc, abs=4e-3)


def _bn_model():
    import torch.nn as nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 5, 3, padding=1, stride=2), nn.BatchNorm2d(5))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.7]))
        m[1].bias.copy_(torch.tensor([0.2, -0.3, 0.5, -1.0]))
        m[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 0.1]))
        m[1].running_mean.copy_(torch.tensor([0.1, 0.0, -0.2, 0.3]))
        m[4].running_var.copy_(torch.linspace(0.5, 2.0, 5))
        m[4].running_mean.copy_(torch.linspace(-0.3, 0.3, 5))
    m[1].num_batches_tracked.fill_(10)
    m[4].num_batches_tracked.fill_(10)
    return m.eval()


@pytest.mark.parametrize("spatial", ["independent", "kernel"])
def test_batchnorm_patch_moments_against_monte_carlo(spatial):
    # the rectified-Gaussian field sampled directly (fixed seed), zero padding and stride 2
    # included; 16k images x 16 positions: entries of size ~3 agree to 0.04
    import torch.nn.functional as F

    from sigmadecomp_torch import covariances_from_batchnorm

    m = _bn_model()
    stats, _ = covariances_from_batchnorm(m, spatial=spatial, input_shape=(3, 7, 7),
                                          shrinkage=0.0)
    bn = m[1]
    with torch.no_grad():
        std = (bn.weight.abs() * torch.sqrt(bn.running_var / (bn.running_var + bn.eps))).double()
        beta = bn.bias.double()[:, None, None]
        g = torch.Generator().manual_seed(1)
        if spatial == "independent":
            z = torch.randn(16000, 4, 7, 7, generator=g, dtype=torch.float64) * std[:, None, None]
        else:  # white noise through the producing conv, standardised per channel
            y = F.conv2d(torch.randn(16000, 3, 9, 9, generator=g, dtype=torch.float64),
                         m[0].weight.double())
            z = y / y.std(dim=(0, 2, 3), keepdim=True) * (std * torch.sign(
                bn.weight.double()))[:, None, None]
        u = torch.relu(z + beta)
        P = F.unfold(u, 3, padding=1, stride=2).permute(0, 2, 1).reshape(-1, 36)
    S_mc, mean_mc = P.T @ P / P.shape[0], P.mean(0)
    assert float((stats["3"].sigma - S_mc).abs().max()) < 0.04
    assert float((stats["3"].mean - mean_mc).abs().max()) < 0.01


def test_moments_rule_scores_recomputed():
    from sigmadecomp_torch import collect_covariances

    m = _bn_model()
    stats = collect_covariances(m, [torch.rand(6, 3, 7, 7)], progress=False)
    alphas = (0.0, 0.3, 1.0)
    out = shrink_covariances(stats, "moments", model=m, alphas=alphas)
    assert not out.skipped and "3" in out.scores
    K = m[3].weight.detach().double().reshape(5, -1)
    S = stats["3"].sigma.double()
    bn = m[4]
    target = (bn.running_var.double()
              + (bn.running_mean.double() - m[3].bias.detach().double()) ** 2)
    n = S.shape[0]
    mine = {}
    for a in alphas:
        Sa = (1 - a) * S + a * torch.trace(S) / n * torch.eye(n, dtype=torch.float64)
        q = torch.einsum("tn,nm,tm->t", K, Sa, K)
        mine[a] = float(torch.log(q / target).std(unbiased=False))
    assert out.scores["3"] == pytest.approx(mine, rel=1e-9)
    assert out.alphas["3"] == min(alphas, key=lambda a: (mine[a], a))
    expect = (1 - out.alphas["3"]) * S + out.alphas["3"] * torch.trace(S) / n * torch.eye(n)
    torch.testing.assert_close(out["3"].sigma, expect.to(out["3"].sigma.dtype))
