import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Deterministic, database-free Hypothesis profile for CI; a slightly larger
# randomised one for local exploration.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", database=None, max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


_LIBS = [("numpy", "float64"), ("numpy", "float32"), ("torch", "float64"), ("torch", "float32")]


class Lib:
    """One array library x dtype combination, with helpers to move data in and out."""

    def __init__(self, name, dtype):
        self.name, self.dtype_name = name, dtype
        if name == "torch":
            self.torch = pytest.importorskip("torch")
            self.dtype = getattr(self.torch, dtype)
        else:
            self.dtype = np.dtype(dtype)

    def asarray(self, x):
        x = np.asarray(x, dtype=np.float64)
        if self.name == "torch":
            return self.torch.as_tensor(x).to(self.dtype)
        return x.astype(self.dtype)

    def to_numpy(self, x):
        if self.name == "torch":
            return x.detach().cpu().double().numpy()
        return np.asarray(x, dtype=np.float64)

    def is_same_kind(self, x):
        if self.name == "torch":
            return isinstance(x, self.torch.Tensor) and x.dtype == self.dtype
        return isinstance(x, np.ndarray) and x.dtype == self.dtype

    @property
    def rtol(self):
        """Tolerance for results computed from inputs rounded to this dtype."""
        return 1e-4 if self.dtype_name == "float32" else 1e-9

    def __repr__(self):
        return f"{self.name}-{self.dtype_name}"


@pytest.fixture(params=_LIBS, ids=[f"{a}-{b}" for a, b in _LIBS])
def lib(request):
    return Lib(*request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)



@pytest.fixture(scope="session", autouse=True)
def _torch_single_thread():
    """torch's own ops (forward passes, training steps) on one intra-op thread.

    The BLAS pools are left at their defaults, so every solver call runs under
    the solvers' own thread policy (sigmadecomp._threads), which is what users
    get. torch is pinned only because the model code of the end-to-end tests
    is not under that policy and runs markedly slower on a busy machine at
    more threads; tests/test_threads.py sets torch back to 2 threads to check
    the policy's torch side.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is an extra
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def small_model_file(tmp_path):
    """A pickled ``ResNetSmall(width=8)`` (seed 0) on disk: ``(path, model)``."""
    torch = pytest.importorskip("torch")
    from sigmadecomp_torch.models import ResNetSmall

    torch.manual_seed(0)
    model = ResNetSmall(width=8).eval()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return path, model
