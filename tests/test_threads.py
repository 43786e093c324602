"""Thread policy of the solvers (sigmadecomp._threads) and sigmadecomp.threads."""

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import sigmadecomp
from sigmadecomp import _backend, _threads
from sigmadecomp import cp, sigma_svd, tt_conv, tt_linear, tt_svd, tucker2
from tests._helpers import random_psd


@pytest.fixture(autouse=True)
def short_last_window(monkeypatch):
    """Each test starts with a short last idle-cores window, whatever an earlier real
    reading left behind: a long one makes free_cores trust the sample alone and ignore
    the (often monkeypatched) load average. Restored after each test."""
    monkeypatch.setattr(_threads, "_LAST_WINDOW", 0.0)

torch = pytest.importorskip("torch")


def _blas_counts():
    return sorted(d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas")


def _state():
    return threadpool_info(), torch.get_num_threads()


def _problem(rng, lib, T=6, S=4):
    K = rng.standard_normal((T, S, 3, 3))
    sig = random_psd(rng, S * 9)
    if lib == "torch":
        return torch.from_numpy(K), torch.from_numpy(sig)
    return K, sig


def _set_unit(monkeypatch, work):
    """Every thread unit (BLAS, torch, tucker2's) at ``work`` multiply-adds per thread."""
    monkeypatch.setattr(_threads, "WORK_PER_THREAD", work)
    monkeypatch.setattr(_threads, "TORCH_WORK_PER_THREAD", work)
    monkeypatch.setattr(_threads, "TUCKER2_WORK_PER_THREAD", work)


_CALLS = {
    "sigma_svd": lambda K, s: sigma_svd(K.reshape(K.shape[0], -1), 3, s),
    "tucker2": lambda K, s: tucker2(K, (3, 2), s, n_iter_max=2),
    "cp": lambda K, s: cp(K, 3, s, n_iter_max=2),
    "tt_conv": lambda K, s: tt_conv(K, 2, s, in_modes=(2, 2), out_modes=(2, 3), n_iter_max=2),
    "tt_linear": lambda K, s: tt_linear(K.reshape(K.shape[0], -1), 2, s, in_modes=(4, 9),
                                        out_modes=(2, 3), n_iter_max=2),
    "tt_svd": lambda K, s: tt_svd(K, 2),
}


@pytest.fixture
def spy(monkeypatch):
    """Records (BLAS thread counts, torch threads) at every eigh/svd the solvers call."""
    seen = []
    for name in ("svd", "eigh"):
        orig = getattr(_backend, name)

        def wrapped(*a, _orig=orig, **k):
            seen.append((_blas_counts(), torch.get_num_threads()))
            return _orig(*a, **k)

        monkeypatch.setattr(_backend, name, wrapped)
    return seen


@pytest.fixture
def two_threads():
    """BLAS pools and torch at 2 threads (the setting a 2-core machine starts with)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(limits=2, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("name", sorted(_CALLS))
def test_small_problem_runs_on_one_thread_and_restores(name, lib, rng, spy, two_threads):
    K, sig = _problem(rng, lib)
    with_sigma = name != "tt_svd"
    before = _state()
    _CALLS[name](K, sig if with_sigma else None)
    assert _state() == before
    assert spy, "the solver called no eigh/svd"
    for blas, n_torch in spy:
        assert blas and max(blas) == 1
        if lib == "torch":
            assert n_torch == 1
        else:  # torch is left alone for NumPy inputs
            assert n_torch == 2


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_large_work_uses_the_cores_allowed(lib, rng, spy, two_threads, monkeypatch):
    _set_unit(monkeypatch, 1)  # every problem counts as large
    monkeypatch.setattr(_threads, "idle_cores", lambda seconds=None: 8.0)  # an idle machine
    monkeypatch.setattr(_threads, "_load_average", lambda: None)
    K, sig = _problem(rng, lib)
    sigma_svd(K.reshape(6, -1), 3, sig)
    assert spy and all(max(b) == 2 for b, _ in spy)
    if lib == "torch":
        assert all(t == 2 for _, t in spy)
    # never more than the user's limit
    spy.clear()
    with threadpool_limits(limits=1, user_api="blas"):
        sigma_svd(K.reshape(6, -1), 3, sig)
    assert spy and all(max(b) == 1 for b, _ in spy)


@pytest.mark.parametrize("idle, expected", [(0.0, 1), (0.4, 1), (1.6, 2), (None, 2)])
def test_busy_machine_caps_the_threads(idle, expected, rng, spy, two_threads, monkeypatch):
    _set_unit(monkeypatch, 1)
    monkeypatch.setattr(_threads, "idle_cores", lambda seconds=None: idle)
    monkeypatch.setattr(_threads, "_load_average", lambda: None)
    K, sig = _problem(rng, "numpy")
    sigma_svd(K.reshape(6, -1), 3, sig)
    assert spy and all(max(b) == expected for b, _ in spy)
    assert _threads.last_choice == (expected, None)


@pytest.mark.parametrize("idle, load, expected", [
    (2.0, 0.5, 2.0),   # idle machine: this process not yet counted in the load
    (2.0, 1.3, 1.7),   # this process alone on the machine
    (1.0, 2.4, 0.6),   # the sample caught an idle core, the load says none is free
    (0.2, 0.0, 0.2),   # the sample sees a burst the load average has not yet
    (None, 2.4, 0.6),
    (1.5, None, 1.5),
    (None, None, None),
])
def test_free_cores_takes_the_smaller_estimate(idle, load, expected, monkeypatch):
    monkeypatch.setattr(_threads, "_LAST_WINDOW", 0.03)  # a short sample
    monkeypatch.setattr(_threads, "idle_cores", lambda seconds=None: idle)
    monkeypatch.setattr(_threads, "_load_average", lambda: load)
    monkeypatch.setattr(_threads.os, "cpu_count", lambda: 2)
    got = _threads.free_cores()
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize("load, expected", [(0.5, 2), (3.0, 1)])
def test_busy_machine_threads_caps_torch_and_blas(load, expected, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(_threads, "idle_cores", lambda seconds=None: 2.0)
    monkeypatch.setattr(_threads, "_load_average", lambda: load)
    monkeypatch.setattr(_threads.os, "cpu_count", lambda: 2)
    old = torch.get_num_threads()
    with threadpool_limits(limits=2, user_api="blas"):
        torch.set_num_threads(2)
        try:
            with _threads.busy_machine_threads():
                assert torch.get_num_threads() == expected
                assert max(_threads._blas_counts()) == expected
            assert torch.get_num_threads() == 2 and min(_threads._blas_counts()) == 2
            with sigmadecomp.threads(2), _threads.busy_machine_threads():  # the user's count
                assert torch.get_num_threads() == 2
        finally:
            torch.set_num_threads(old)


def test_idle_cores_reads_proc_stat(monkeypatch):
    monkeypatch.setattr(_threads, "_LAST_READING", None)
    monkeypatch.setattr(_threads, "_LAST_WINDOW", 0.0)
    monkeypatch.setattr(_threads, "_CLK_TCK", 100)
    # 50 of 200 jiffies idle on 4 CPUs, this process used none of the busy ones
    samples = iter([(100, 400, 4), (150, 600, 4)])
    monkeypatch.setattr(_threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(_threads, "_own_cpu_seconds", lambda: 7.0)
    assert _threads.idle_cores(0.0) == pytest.approx(1.0)
    monkeypatch.setattr(_threads, "_LAST_READING", None)
    monkeypatch.setattr(_threads, "_cpu_times", lambda: (_ for _ in ()).throw(OSError()))
    assert _threads.idle_cores(0.0) is None


def test_free_cores_trusts_a_long_window_over_the_load_average(monkeypatch):
    # after seconds of this process's own two-thread work the load average is ~2
    # (its own threads); the window of the CPU counters shows no other process
    monkeypatch.setattr(_threads, "_load_average", lambda: 2.0)
    monkeypatch.setattr(_threads.os, "cpu_count", lambda: 2)

    def idle(seconds=None, window=5.0):
        monkeypatch.setattr(_threads, "_LAST_WINDOW", window)
        return 2.0

    monkeypatch.setattr(_threads, "idle_cores", idle)
    assert _threads.free_cores() == pytest.approx(2.0)
    monkeypatch.setattr(_threads, "idle_cores", lambda seconds=None: idle(seconds, 0.03))
    assert _threads.free_cores() == pytest.approx(1.0)  # a 30 ms sample: the load counts


def test_idle_cores_does_not_count_this_process_and_reuses_a_recent_reading(monkeypatch):
    monkeypatch.setattr(_threads, "_CLK_TCK", 100)
    monkeypatch.setattr(_threads, "_LAST_WINDOW", 0.0)  # restored after the test
    clock = {"t": 1000.0}
    monkeypatch.setattr(_threads.time, "monotonic", lambda: clock["t"])
    slept = []
    monkeypatch.setattr(_threads.time, "sleep", lambda s: (slept.append(s),
                                                            clock.update(t=clock["t"] + s)))
    # 2 CPUs, 200 jiffies (1 s): 20 idle, 180 busy, of which this process used 1.5 s
    # (its solver threads, or OpenBLAS workers busy-waiting): others used 0.3 of a core
    readings = iter([(0, 0, 2), (20, 200, 2)])
    own = iter([10.0, 11.5])
    monkeypatch.setattr(_threads, "_cpu_times", lambda: next(readings))
    monkeypatch.setattr(_threads, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(_threads, "_LAST_READING", None)
    assert _threads.idle_cores(1.0) == pytest.approx(1.7)
    assert slept == [1.0]  # no earlier reading: one sample
    assert _threads._LAST_WINDOW == pytest.approx(1.0)
    # 2 s later the last reading starts the window: no sleep. Of its 400 jiffies 160
    # are idle and 240 busy, 40 of them this process's (0.4 s): others used 1 core
    clock["t"] += 2.0
    readings = iter([(180, 600, 2)])
    own = iter([11.9])
    assert _threads.idle_cores(0.03) == pytest.approx(1.0)
    assert slept == [1.0]
    assert _threads._LAST_WINDOW == pytest.approx(2.0)
    # a reading older than REUSE_SECONDS is not reused: a new sample (10 of 20 idle)
    clock["t"] += _threads.REUSE_SECONDS + 1
    readings = iter([(200, 700, 2), (210, 720, 2)])
    own = iter([11.9, 11.9])
    assert _threads.idle_cores(0.03) == pytest.approx(1.0)
    assert slept == [1.0, 0.03]


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("name", sorted(_CALLS))
def test_settings_restored_when_the_solver_raises(name, lib, rng, two_threads, monkeypatch):
    K, sig = _problem(rng, lib)

    def boom(*a, **k):
        # inside the policy: the settings differ from the caller's here
        assert max(_blas_counts()) == 1
        raise RuntimeError("boom")

    monkeypatch.setattr(_backend, "svd", boom)
    monkeypatch.setattr(_backend, "eigh", boom)
    before = _state()
    with pytest.raises(RuntimeError, match="boom"):
        _CALLS[name](K, sig if name != "tt_svd" else None)
    assert _state() == before


def test_bad_input_error_is_the_solvers_and_settings_stay(rng, two_threads):
    before = _state()
    with pytest.raises(ValueError, match="sigma"):
        tucker2(rng.standard_normal((6, 4, 3, 3)), (3, 2), np.eye(5))
    with pytest.raises((TypeError, ValueError)):
        tucker2([[1.0]], (1, 1))  # no shape: the solver's own validation answers
    assert _state() == before


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_threads_override_and_nesting(lib, rng, spy, two_threads):
    K, sig = _problem(rng, lib)
    before = _state()
    with sigmadecomp.threads(2):
        assert max(_blas_counts()) == 2 and torch.get_num_threads() == 2
        sigma_svd(K.reshape(6, -1), 3, sig)  # small, but the user asked for 2
        assert spy and all(max(b) == 2 for b, _ in spy)
        with sigmadecomp.threads(1):
            assert _blas_counts() == [1] * len(_blas_counts())
            assert torch.get_num_threads() == 1
            with sigmadecomp.threads("auto"):
                spy.clear()
                sigma_svd(K.reshape(6, -1), 3, sig)
                assert spy and all(max(b) == 1 for b, _ in spy)
        assert max(_blas_counts()) == 2 and torch.get_num_threads() == 2
    assert _state() == before


def test_threads_restores_on_exception(two_threads):
    before = _state()
    with pytest.raises(KeyError):
        with sigmadecomp.threads(1):
            assert torch.get_num_threads() == 1
            raise KeyError("x")
    assert _state() == before


def test_threads_as_decorator(two_threads):
    @sigmadecomp.threads(1)
    def inner():
        return _blas_counts(), torch.get_num_threads()

    blas, t = inner()
    assert max(blas) == 1 and t == 1
    assert max(_blas_counts()) == 2 and torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "all", None])
def test_threads_rejects_bad_n(bad):
    with pytest.raises(ValueError, match=r"threads\(n=.*n must be 'auto' or an int >= 1"):
        with sigmadecomp.threads(bad):
            pass


def test_auto_thread_count_rule(monkeypatch):
    _set_unit(monkeypatch, 1000)
    # Sigma: T * n * n; Frobenius: T * n * min(T, n)
    assert _threads.auto_thread_count((10, 10), True, cap=100) == 1
    assert _threads.auto_thread_count((10, 20), True, cap=100) == 4
    assert _threads.auto_thread_count((10, 20), False, cap=100) == 2
    assert _threads.auto_thread_count((10, 20), True, cap=3) == 3
    assert _threads.auto_thread_count((10, 2, 3), True, cap=100) == 1  # 360 multiply-adds
    assert _threads.auto_thread_count((10, 20), True, cap=100, work_per_thread=100) == 40


def test_torch_pool_takes_threads_at_smaller_work_than_blas(spy, two_threads, monkeypatch):
    # default units: a 64-channel 3x3 layer with Sigma is 64 * 576 * 576 = 2.1e7
    # multiply-adds, under the BLAS unit (1e8) and over torch's (1e7)
    assert _threads.WORK_PER_THREAD > 64 * 576 * 576 >= _threads.TORCH_WORK_PER_THREAD
    monkeypatch.setattr(_threads, "idle_cores", lambda seconds=None: 2.0)  # an idle machine
    monkeypatch.setattr(_threads, "_load_average", lambda: None)
    g = torch.Generator().manual_seed(0)
    K = torch.randn(64, 576, dtype=torch.float64, generator=g)
    X = torch.randn(600, 576, dtype=torch.float64, generator=g)
    before = _state()
    sigma_svd(K, 8, X.T @ X / 600)
    assert _threads.last_choice == (1, 2)
    assert spy and all(max(b) == 1 and t == 2 for b, t in spy)
    assert _state() == before
    # NumPy input of the same size: the BLAS rule alone, torch left alone
    spy.clear()
    sigma_svd(K.numpy(), 8, (X.T @ X / 600).numpy())
    assert _threads.last_choice == (1, None)
    assert spy and all(max(b) == 1 for b, _ in spy)


def test_tucker2_has_its_own_blas_unit_with_sigma(two_threads, monkeypatch):
    # measured: two OpenBLAS threads lose on a whole tucker2 call at 256
    # channels (T n n = 1.4e9) and gain at 512 (1.1e10); the generic unit
    # would give 256 channels two threads
    big = 256 * 2304 * 2304
    assert big // _threads.WORK_PER_THREAD >= 2
    assert big // _threads.TUCKER2_WORK_PER_THREAD < 2 <= \
        512 * 4608 * 4608 // _threads.TUCKER2_WORK_PER_THREAD
    monkeypatch.setattr(_threads, "idle_cores", lambda seconds=None: 2.0)
    monkeypatch.setattr(_threads, "_load_average", lambda: None)
    rng = np.random.default_rng(0)
    K = rng.standard_normal((6, 4, 3, 3))
    sig = random_psd(rng, 36)
    work = 6 * 36 * 36
    # tucker2 with Sigma follows its unit; without Sigma, and other solvers, the generic one
    monkeypatch.setattr(_threads, "WORK_PER_THREAD", work // 2)
    monkeypatch.setattr(_threads, "TUCKER2_WORK_PER_THREAD", work * 10)
    tucker2(K, (3, 2), sig, n_iter_max=1)
    assert _threads.last_choice == (1, None)
    sigma_svd(K.reshape(6, -1), 3, sig)
    assert _threads.last_choice == (2, None)
    monkeypatch.setattr(_threads, "TUCKER2_WORK_PER_THREAD", work // 2)
    tucker2(K, (3, 2), sig, n_iter_max=1)
    assert _threads.last_choice == (2, None)
    monkeypatch.setattr(_threads, "TUCKER2_WORK_PER_THREAD", 1)
    monkeypatch.setattr(_threads, "WORK_PER_THREAD", 10**30)
    tucker2(K, (3, 2), None, n_iter_max=1)  # Frobenius: the generic unit
    assert _threads.last_choice == (1, None)


def test_results_do_not_depend_on_the_setting(rng):
    K, sig = _problem(rng, "numpy", T=8, S=6)
    auto = tucker2(K, (4, 3), sig, n_iter_max=3)
    with sigmadecomp.threads(2):
        two = tucker2(K, (4, 3), sig, n_iter_max=3)
    np.testing.assert_allclose(auto.to_tensor(), two.to_tensor(), rtol=1e-10, atol=1e-12)


def test_benchmark_quick_runs(tmp_path):
    from benchmarks import threads as bench

    out = tmp_path / "t.csv"
    rows = bench.main(["--quick", "--reps", "1", "--solvers", "sigma_svd", "--out", str(out)])
    assert {(r["solver"], r["lib"]) for r in rows} == {("sigma_svd", "numpy"), ("sigma_svd", "torch")}
    for r in rows:
        assert r["default_s"] > 0 and r["one_s"] > 0 and r["all_s"] > 0
        assert r["ratio"] == pytest.approx(r["default_s"] / min(r["one_s"], r["all_s"]))
        assert r["policy_threads"] == "1"  # a tiny layer runs on one thread
    assert out.read_text().count("\n") == len(rows) + 1


def test_auto_never_raises_any_blas_pool(rng, spy, two_threads, monkeypatch):
    """With the BLAS pools at different counts the choice is capped by the smallest."""
    from threadpoolctl import ThreadpoolController

    pools = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    if len(pools) < 2:
        pytest.skip("one BLAS pool loaded")
    _set_unit(monkeypatch, 1)
    monkeypatch.setattr(_threads, "idle_cores", lambda seconds=None: 8.0)
    monkeypatch.setattr(_threads, "_load_average", lambda: None)
    with threadpool_limits(limits={pools[0].prefix: 1}):
        before = _state()
        K, sig = _problem(rng, "numpy")
        sigma_svd(K.reshape(6, -1), 3, sig)
        assert _state() == before
    assert spy and all(b == [1] * len(b) for b, _ in spy)


# ------------------------------------------------ retune: long calls follow the free cores


@_threads.solver_threads
def _fake_solver(kernel, sigma=None, *, idle=(), seen=None):
    """A 'solver' that records the counts in force after each forced retune."""
    seen.append((max(_blas_counts()), torch.get_num_threads()))
    for value in idle:
        _fake_solver.idle = value
        _threads.retune(force=True)
        seen.append((max(_blas_counts()), torch.get_num_threads()))
    # not forced: too soon after the last check, nothing happens
    seen.append(_threads.retune())
    return kernel


def test_retune_follows_the_idle_cores_and_restores(two_threads, monkeypatch):
    _set_unit(monkeypatch, 1)
    monkeypatch.setattr(_threads, "_load_average", lambda: None)
    # at the start one core is free (the other busy), then two, then none
    monkeypatch.setattr(_threads, "idle_cores",
                        lambda seconds=None: getattr(_fake_solver, "idle", 1.0))
    _fake_solver.idle = 1.0
    K = torch.zeros(64, 8, 3, 3)
    seen = []
    before = _state()
    _fake_solver(K, sigma=torch.eye(72), idle=(1.7, 0.2, 2.6), seen=seen)
    assert seen == [(1, 1), (2, 2), (1, 1), (2, 2), None]
    assert _state() == before  # the counts in force before the call are back
    # no tuning for a one-thread choice, under threads(n), or outside a solver
    _set_unit(monkeypatch, 10**30)
    seen = []
    _fake_solver(K, sigma=torch.eye(72), idle=(2.0,), seen=seen)
    assert seen == [(1, 1), (1, 1), None]
    _set_unit(monkeypatch, 1)
    seen = []
    with sigmadecomp.threads(2):
        _fake_solver(K, sigma=torch.eye(72), idle=(0.1,), seen=seen)
    assert seen == [(2, 2), (2, 2), None]
    assert _threads.retune(force=True) is None
    assert _state() == before


def test_retune_never_exceeds_the_size_based_choice(two_threads, monkeypatch):
    # one thread of work per 'unit': a (2, 1) kernel with a 1x1 sigma is 2 units -> 2 threads
    # at most, however many cores are idle
    monkeypatch.setattr(_threads, "_load_average", lambda: None)
    monkeypatch.setattr(_threads, "idle_cores", lambda seconds=None: 16.0)
    _set_unit(monkeypatch, 1)
    with threadpool_limits(limits=4, user_api="blas"):
        old = torch.get_num_threads()
        torch.set_num_threads(4)
        try:
            seen = []
            _fake_solver(torch.zeros(2, 1), sigma=torch.eye(1), idle=(16.0,), seen=seen)
        finally:
            torch.set_num_threads(old)
    assert seen == [(2, 2), (2, 2), None]
