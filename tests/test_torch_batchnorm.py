"""Data-free statistics from BatchNorm: moment formulas, graph reading, report, errors."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp_torch import (  # noqa: E402
    BatchNormReport,
    LayerStats,
    collect_covariances,
    compress,
    covariances_from_batchnorm,
)
from sigmadecomp_torch.batchnorm import relu_moments  # noqa: E402


def _set_bn(bn, mean, var, gamma, beta):
    with torch.no_grad():
        bn.running_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        bn.running_var.copy_(torch.as_tensor(var, dtype=torch.float32))
        bn.weight.copy_(torch.as_tensor(gamma, dtype=torch.float32))
        bn.bias.copy_(torch.as_tensor(beta, dtype=torch.float32))


@pytest.mark.parametrize("m1,m2,s1,s2,r", [
    (0.3, -0.5, 1.2, 0.7, 0.6), (-1.0, 2.0, 0.5, 1.0, -0.8), (0.0, 0.0, 1.0, 1.0, 0.95),
    (0.0, 1.0, 1.0, 1.0, 0.0), (1.5, 0.2, 2.0, 0.3, -0.3)])
def test_relu_moments_match_monte_carlo(m1, m2, s1, s2, r):
    rng = np.random.default_rng(0)
    cov = [[s1 * s1, r * s1 * s2], [r * s1 * s2, s2 * s2]]
    z = rng.multivariate_normal([m1, m2], cov, size=200_000)
    prod = np.maximum(z[:, 0], 0) * np.maximum(z[:, 1], 0)
    se = prod.std() / np.sqrt(len(prod))
    assert abs(float(relu_moments(m1, m2, s1, s2, r)) - prod.mean()) < 5 * se + 1e-12


def test_relu_moments_limits():
    # independent: product of the means; identical: second moment of one
    m, s = 0.4, 1.3
    a = m / s
    cdf, pdf = 0.5 * (1 + math.erf(a / math.sqrt(2))), math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    first = s * (a * cdf + pdf)
    second = s * s * ((a * a + 1) * cdf + a * pdf)
    np.testing.assert_allclose(relu_moments(m, m, s, s, 0.0), first * first, rtol=1e-10)
    np.testing.assert_allclose(relu_moments(m, m, s, s, 1.0), second, rtol=1e-6)


def _mc_stats(model, x, layer):
    return collect_covariances(model, [x], layers=[layer], progress=False)[layer]


def _assert_close_stats(model_stats, mc, tol):
    scale = float(mc.sigma.diagonal().max())
    err = float((model_stats.sigma - mc.sigma).abs().max()) / scale
    merr = float((model_stats.mean - mc.mean).abs().max()) / scale ** 0.5
    assert err < tol and merr < tol, (err, merr)


def test_kernel_model_exact_for_white_input():
    """BN -> ReLU -> conv after a conv fed with white noise: the model is exact (Monte Carlo)."""
    torch.manual_seed(0)
    conv0 = nn.Conv2d(2, 3, 3, padding=0, bias=False)
    bn = nn.BatchNorm2d(3)
    conv1 = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    model = nn.Sequential(conv0, bn, nn.ReLU(), conv1).eval()
    K = conv0.weight.detach().double()
    var = (K * K).sum((1, 2, 3))  # exact variance of conv0's output for white unit input
    _set_bn(bn, [0.0, 0.0, 0.0], var, [1.0, -0.7, 1.3], [0.2, -0.4, 0.0])
    stats, report = covariances_from_batchnorm(model, input_shape=(2, 10, 10), spatial="kernel",
                                               shrinkage=0.0)
    assert set(stats) == {"3"} and report.skipped == {"0": report.skipped["0"]}
    x = torch.randn(6000, 2, 10, 10)
    mc = _mc_stats(model, x, "3")
    _assert_close_stats(stats["3"], mc, 0.02)
    # the border fraction matters: without input_shape the model is visibly off
    far, _ = covariances_from_batchnorm(model, spatial="kernel", shrinkage=0.0)
    assert float((far["3"].sigma - mc.sigma).abs().max()) > 0.05 * float(mc.sigma.max())


def test_independent_model_exact_for_iid_input():
    """BN on the model input (no producer) -> ReLU -> conv with iid Gaussian input."""
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(2)
    model = nn.Sequential(bn, nn.ReLU(), nn.Conv2d(2, 3, 3, padding=1)).eval()
    mu, sd = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.5])
    _set_bn(bn, mu, sd * sd, [0.8, 1.5], [0.1, 0.3])
    stats, report = covariances_from_batchnorm(model, input_shape=(2, 6, 6), spatial="kernel",
                                               shrinkage=0.0)
    assert report.modelled["2"]["spatial"] == ["independent"]  # no producing layer
    x = mu[None, :, None, None] + sd[None, :, None, None] * torch.randn(8000, 2, 6, 6)
    _assert_close_stats(stats["2"], _mc_stats(model, x, "2"), 0.02)


def test_linear_after_batchnorm1d_exact():
    torch.manual_seed(2)
    lin0, bn = nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6)
    model = nn.Sequential(lin0, bn, nn.ReLU(), nn.Linear(6, 3)).eval()
    W = lin0.weight.detach().double()
    _set_bn(bn, torch.zeros(6), (W * W).sum(1), torch.linspace(0.5, 1.5, 6),
            torch.linspace(-0.5, 0.5, 6))
    stats, _ = covariances_from_batchnorm(model, shrinkage=0.0)
    x = torch.randn(100_000, 5)
    _assert_close_stats(stats["3"], _mc_stats(model, x, "3"), 0.02)


def test_fixed_shrinkage_is_the_documented_blend():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding=1)).eval()
    s0, _ = covariances_from_batchnorm(model, spatial="kernel", shrinkage=0.0)
    s3, rep = covariances_from_batchnorm(model, spatial="kernel", shrinkage=0.3)
    S0 = s0["3"].sigma
    n = S0.shape[0]
    want = 0.7 * S0 + 0.3 * torch.trace(S0) / n * torch.eye(n, dtype=S0.dtype)
    torch.testing.assert_close(s3["3"].sigma, want)
    torch.testing.assert_close(s3["3"].mean, 0.7 ** 0.5 * s0["3"].mean)
    assert rep.modelled["3"]["shrinkage"] == 0.3 and rep.modelled["3"]["fitted"] is None
    # the covariance is shrunk the same way, so it stays PSD
    assert float(torch.linalg.eigvalsh(s3["3"].centered())[0]) > -1e-10


def _fit_model(var_rule):
    torch.manual_seed(4)
    conv1 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    out_bn = nn.BatchNorm2d(6)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), conv1, out_bn).eval()
    s0, _ = covariances_from_batchnorm(model, spatial="kernel", shrinkage=0.0, layers=["3"])
    K = conv1.weight.detach().double().reshape(6, -1)
    with torch.no_grad():
        out_bn.running_var.copy_(var_rule(K, s0["3"]).float())
    return model


def test_fitted_shrinkage_reads_the_output_batchnorm():
    # running variances exactly those of the model -> a = 0
    model = _fit_model(lambda K, s: torch.einsum("ti,ij,tj->t", K, s.centered(), K))
    _, rep = covariances_from_batchnorm(model, spatial="kernel", layers=["3"])
    info = rep.modelled["3"]
    assert info["fitted"] == "4" and info["shrinkage"] == 0.0
    assert info["fit_spread"][1] < 1e-5 < info["fit_spread"][2]
    # proportional to ||k_c||^2 (what the Frobenius metric predicts) -> a = 1
    model = _fit_model(lambda K, s: 3.0 * (K * K).sum(1))
    _, rep = covariances_from_batchnorm(model, spatial="kernel", layers=["3"])
    assert rep.modelled["3"]["shrinkage"] == 1.0


@pytest.mark.filterwarnings("ignore::sigmadecomp.exceptions.CompressionWarning")
@pytest.mark.filterwarnings("ignore::sigmadecomp.exceptions.ConvergenceWarning")
def test_compress_accepts_the_statistics():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    for spatial, centered in (("propagate", True), ("kernel", False)):
        stats, rep = covariances_from_batchnorm(model, input_shape=(1, 12, 12), spatial=spatial,
                                                samples=64)
        assert set(stats) == {"3", "6"}
        for name, st in stats.items():
            assert isinstance(st, LayerStats) and st.kind == "Conv2d"
            st.check_compatible(dict(model.named_modules())[name], name)
        small, report = compress(model, "tucker2", covariances=stats, ratio=2,
                                 layers=["3", "6"], centered=centered, progress=False,
                                 options={"n_iter_max": 3})
        assert report.weighted and {r["name"] for r in report.layers} == {"3", "6"}
        assert small(torch.rand(2, 1, 12, 12)).shape == (2, 10)


def test_unmodelled_layers_are_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0 = nn.Conv2d(1, 4, 3, padding=1)
            self.bn0 = nn.BatchNorm2d(4)
            self.pool = nn.MaxPool2d(2)
            self.c1 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4)
            self.g = nn.Conv2d(4, 4, 3, padding=1, groups=2)
            self.bn2 = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 3 * 3, 5)

        def forward(self, x):
            x = self.pool(torch.relu(self.bn0(self.c0(x))))
            x = self.bn1(self.c1(x)).relu()
            x = torch.relu(self.bn2(self.g(x)))
            return self.fc(torch.flatten(x, 1))

    model = Net().eval()
    stats, rep = covariances_from_batchnorm(model, input_shape=(1, 6, 6), spatial="kernel")
    assert isinstance(rep, BatchNormReport) and rep.graph == "fx"
    assert set(stats) == set()
    assert set(rep.skipped) == {"c0", "c1", "g", "fc"}
    assert "model input" in rep.skipped["c0"]
    assert "MaxPool2d 'pool'" in rep.skipped["c1"]
    assert "groups=2" in rep.skipped["g"]
    assert "flatten" in rep.skipped["fc"]
    assert "not modelled fc" in repr(rep)


def test_residual_branches_found_by_fx_and_sequential_fallback():
    from sigmadecomp_torch.models import ResNetSmall

    model = ResNetSmall(width=4).eval()
    _, rep = covariances_from_batchnorm(model, spatial="kernel", layers=["layer2.conv1"])
    assert rep.modelled["layer2.conv1"]["branches"] == [
        ("layer1.bn2", "layer1.conv2"), ("layer1.shortcut.1", "layer1.shortcut.0")]
    # without tracing a residual block cannot be read: its layers are reported, not guessed
    _, seq = covariances_from_batchnorm(model, spatial="kernel", graph="sequential",
                                        layers=["layer2.conv1", "layer1.conv2"])
    assert seq.graph == "sequential" and seq.modelled == {}
    assert "not inside an nn.Sequential" in seq.skipped["layer2.conv1"]


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                                  nn.Dropout(0.1), nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2))
        self.head = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 1.0
        return self.head(self.body(x))


def test_auto_graph_falls_back_to_registration_order():
    model = _Untraceable().eval()
    stats, rep = covariances_from_batchnorm(model, spatial="kernel")
    assert rep.graph.startswith("sequential (fx tracing failed") and set(stats) == {"body.4"}
    info = rep.modelled["body.4"]
    assert info["branches"] == [("body.1", "body.0")] and info["fitted"] == "body.5"
    assert "first module" in rep.skipped["body.0"] and "head" in rep.skipped
    # the same statistics as read by fx on the traceable body
    fx_stats, _ = covariances_from_batchnorm(model.body, spatial="kernel")
    torch.testing.assert_close(stats["body.4"].sigma, fx_stats["4"].sigma)
    with pytest.raises(ValueError, match="graph='fx'"):
        covariances_from_batchnorm(model, graph="fx")


def test_model_left_untouched():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(4, 4, 3, padding=1))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for spatial in ("propagate", "kernel"):
        covariances_from_batchnorm(model, input_shape=(1, 8, 8), spatial=spatial, samples=16)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())


def test_propagate_channel_means_match_batchnorm():
    """Noise through BN with batch statistics: each channel is N(beta, gamma^2) exactly per
    batch, so the mean of an interior patch entry is the rectified-Gaussian mean."""
    from scipy.special import ndtr

    torch.manual_seed(7)
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), bn, nn.ReLU(), nn.Conv2d(3, 2, 3)).eval()
    gamma, beta = np.array([1.0, 0.5, 2.0]), np.array([0.0, 0.4, -1.0])
    _set_bn(bn, torch.zeros(3), torch.ones(3), gamma, beta)
    stats, _ = covariances_from_batchnorm(model, input_shape=(1, 16, 16), samples=512,
                                          shrinkage=0.0)
    mean = stats["3"].mean.reshape(3, 9).mean(1).numpy()
    a = beta / gamma
    want = gamma * (a * ndtr(a) + np.exp(-a * a / 2) / np.sqrt(2 * np.pi))
    np.testing.assert_allclose(mean, want, rtol=0.05, atol=0.01)


@pytest.mark.parametrize("kwargs,match", [
    (dict(spatial="white"), "spatial='white'"),
    (dict(graph="dot"), "graph='dot'"),
    (dict(shrinkage=1.5), "shrinkage=1.5"),
    (dict(shrinkage="ledoit"), "shrinkage='ledoit'"),
    (dict(shrinkage=True), "shrinkage=True"),
    (dict(input_shape=(1, 0, 8)), r"input_shape=\(1, 0, 8\)"),
    (dict(input_shape="28x28"), "input_shape='28x28'"),
    (dict(spatial="propagate"), "needs input_shape"),
    (dict(spatial="propagate", input_shape=(1, 8, 8), samples=1), "samples=1"),
    (dict(spatial="kernel", samples=1), "samples=1"),  # checked whether used or not
    (dict(input_shape=(1, 1, 8, 8)), r"input_shape=\(1, 1, 8, 8\): the model failed on one "
                                     r"sample.*without the batch dimension"),
])
def test_bad_input(kwargs, match):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3)).eval()
    with pytest.raises(ValueError, match=match):
        covariances_from_batchnorm(model, **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model of type dict"):
        covariances_from_batchnorm({})


def test_layers_without_output_batchnorm_get_the_median_fitted_shrinkage():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 2, 3, padding=1)).eval()
    with torch.no_grad():
        model[4].running_var.uniform_(0.5, 2.0)
    _, rep = covariances_from_batchnorm(model, spatial="kernel")
    fitted, other = rep.modelled["3"], rep.modelled["6"]
    assert fitted["fitted"] == "4" and other["fitted"] is None
    assert other["shrinkage"] == fitted["shrinkage"]
    # an output BatchNorm without running statistics is not used for the fit
    model[4].running_var = None
    model[4].running_mean = None
    model[4].track_running_stats = False
    _, rep = covariances_from_batchnorm(model, spatial="kernel", layers=["3"])
    assert rep.modelled["3"]["fitted"] is None and rep.modelled["3"]["shrinkage"] == 0.5
