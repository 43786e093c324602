"""Layer-parallel compress over 2 gloo processes equals the one-process result."""

import os
import pickle
import time
import warnings
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from sigmadecomp_torch import collect_covariances, compress  # noqa: E402
from sigmadecomp_torch.compress import LAYER_METHODS, LayerMethod, LayerPlan  # noqa: E402
from sigmadecomp_torch.parallel import LayerShard, assign, layer_cost, resolve_group  # noqa: E402
from _helpers import free_port, spawn_workers  # noqa: E402

WORLD = 2
TIMEOUT = 180.0  # seconds for the whole spawned run (start-up included)
LAYERS = ["2", "4", "6", "8", "10"]  # "6" is a 1x1 conv (svd)
OPTIONS = {"n_iter_max": 4, "tol": 0.0}  # stops at n_iter_max: every layer warns


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(12, 10, 1), nn.ReLU(),
                         nn.Conv2d(10, 12, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(12, 8, 3), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 5)).double().eval()


def _batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(6, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(3)]


def _run(method, stats, distributed, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, report = compress(_model(), method, covariances=stats, ratio=2.5,
                                 layers=LAYERS, options=OPTIONS, progress=False,
                                 distributed=distributed, **kw)
    return model, report, sorted(str(w.message) for w in caught)


def _counting(fmt, calls, fail=None, store=None):
    """LAYER_METHODS[fmt] with its decompose counting calls (and failing on ``fail``).

    With ``store``: the first layer taken by any process waits until the other
    layers are all done (counted in the store).
    """
    spec = LAYER_METHODS[fmt]

    def decompose(weight, ranks, sigma, options):
        calls.append(tuple(weight.shape))
        if store is not None:
            if store.add("test/first", 1) == 1:
                deadline = time.monotonic() + 60
                while store.add("test/done", 0) < len(LAYERS) - 1:
                    assert time.monotonic() < deadline, "the other layers were not taken"
                    time.sleep(0.01)
            else:
                store.add("test/done", 1)
        if fail is not None and tuple(weight.shape) == fail:
            raise ValueError("injected failure")
        return spec.decompose(weight, ranks, sigma, options)

    return LayerMethod(spec.rank_method, decompose, spec.build)


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # statistics before the group exists: every process has the full (same) ones
    stats = collect_covariances(_model(), _batches(), progress=False)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    out = {}
    try:
        for method in ("tucker2", "cp"):
            ref = _run(method, stats, False)
            saved = dict(LAYER_METHODS)
            calls = []
            try:
                LAYER_METHODS[method] = _counting(method, calls)
                LAYER_METHODS["svd"] = _counting("svd", calls)
                got = _run(method, stats, None)
            finally:
                LAYER_METHODS.clear()
                LAYER_METHODS.update(saved)
            out[method] = {"ref": (ref[0].state_dict(), ref[1].to_dict(), ref[2], repr(ref[0])),
                           "got": (got[0].state_dict(), got[1].to_dict(), got[2], repr(got[0])),
                           "calls": calls}
        # dynamic schedule: while one process is held up by its first layer, the
        # other takes every remaining layer (it waits until they are all done)
        store = dist.distributed_c10d._get_default_store()
        saved = dict(LAYER_METHODS)
        calls = []
        try:
            LAYER_METHODS["tucker2"] = _counting("tucker2", calls, store=store)
            LAYER_METHODS["svd"] = _counting("svd", calls, store=store)
            got = _run("tucker2", stats, None)
        finally:
            LAYER_METHODS.clear()
            LAYER_METHODS.update(saved)
        out["held_up"] = {"calls": calls, "state": got[0].state_dict()}
        # static schedule: the shares fixed in advance by the predicted costs
        plan = [LayerPlan(n, m, "Conv2d", "tucker2", ranks=(2, 2), sigma=None)
                for n, m in _model().named_children() if n in LAYERS]
        shard = LayerShard(plan, OPTIONS, None, schedule="static")
        out["static"] = ([p.name for p in shard.layers(plan)], shard.schedule)
        # a failure on one process makes every process raise (nobody waits forever)
        saved = dict(LAYER_METHODS)
        try:
            LAYER_METHODS["tucker2"] = _counting("tucker2", [], fail=(12, 12, 3, 3))
            try:
                _run("tucker2", stats, True)
                out["failure"] = None
            except Exception as e:
                out["failure"] = (type(e).__name__, str(e))
        finally:
            LAYER_METHODS.clear()
            LAYER_METHODS.update(saved)
        # processes that planned differently are told so
        try:
            compress(_model(), "tucker2", covariances=stats, ratio=2.5 + rank,
                     layers=LAYERS, options=OPTIONS, progress=False)
            out["mismatch"] = None
        except ValueError as e:
            out["mismatch"] = str(e)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _strip_times(d):
    d = dict(d)
    d["layers"] = [{k: v for k, v in r.items() if k != "seconds"} for r in d["layers"]]
    d["totals"] = {k: v for k, v in d["totals"].items() if k != "seconds"}
    return d


def _assert_same_report(a, b):
    """Equal reports, floats to rounding (see the state comparison)."""
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-10, abs=1e-14)
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_report(a[k], b[k])
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_report(x, y)
    else:
        assert a == b


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_workers_return_the_one_process_model_and_report(tmp_path):
    spawn_workers(_worker, (free_port(), str(tmp_path)), WORLD, TIMEOUT, "distributed compress")
    outs = []
    for rank in range(WORLD):
        with open(os.path.join(tmp_path, f"rank{rank}.pkl"), "rb") as f:
            outs.append(pickle.load(f))
    for method in ("tucker2", "cp"):
        ref_state, ref_report, ref_warn, ref_repr = outs[0][method]["ref"]
        assert [r["name"] for r in ref_report["layers"]] == LAYERS
        stopped = [w for w in ref_warn if "stopped after 4 iterations" in w]
        assert len(stopped) == len(LAYERS) - 1  # every iterative layer stopped at n_iter_max
        for rank in range(WORLD):
            # the one-process result of each process is the same everywhere ...
            s1, rep1, w1, repr1 = outs[rank][method]["ref"]
            assert s1.keys() == ref_state.keys()
            for k in ref_state:
                # the same computation in two concurrently running processes has been
                # seen to differ in the last bits (8e-15 on an entry of 0.7): equal to
                # rounding, not always bit for bit
                torch.testing.assert_close(s1[k], ref_state[k], rtol=1e-12, atol=1e-13)
            # ... and the 2-process result equals it (to rounding), with the same report
            state, report, warned, text = outs[rank][method]["got"]
            assert text == ref_repr
            assert state.keys() == ref_state.keys()
            for k in ref_state:
                assert state[k].dtype == ref_state[k].dtype
                torch.testing.assert_close(state[k], ref_state[k], rtol=1e-12, atol=1e-13)
            _assert_same_report(_strip_times(report), _strip_times(ref_report))
            assert warned == ref_warn  # every process warns about every layer
        # the layers were shared: together the processes decomposed each layer once
        calls = sorted(c for r in range(WORLD) for c in outs[r][method]["calls"])
        assert len(calls) == len(LAYERS) and len(set(calls)) == len(LAYERS)
    # held up by its first layer, one process decomposed only that one; the other
    # took the other four; the model is still the one-process model
    counts = sorted(len(outs[r]["held_up"]["calls"]) for r in range(WORLD))
    assert counts == [1, len(LAYERS) - 1]
    ref_state = outs[0]["tucker2"]["ref"][0]
    for rank in range(WORLD):
        state = outs[rank]["held_up"]["state"]
        for k in ref_state:
            torch.testing.assert_close(state[k], ref_state[k], rtol=1e-12, atol=1e-13)
    # the static schedule splits by predicted cost, each layer to one process
    shares = [outs[r]["static"] for r in range(WORLD)]
    assert all(kind == "static" for _, kind in shares)
    taken = sorted(n for names, _ in shares for n in names)
    assert taken == sorted(LAYERS) and all(names for names, _ in shares)
    # the process whose layer failed raises the layer's error, the other one says who failed
    failures = sorted(outs[r]["failure"] for r in range(WORLD))
    assert all(f is not None for f in failures)
    kinds = {f[0] for f in failures}
    assert kinds == {"ValueError", "RuntimeError"}
    assert any("injected failure" in f[1] and "'4'" in f[1] for f in failures)
    assert any("process" in f[1] and "injected failure" in f[1] for f in failures
               if f[0] == "RuntimeError")
    for rank in range(WORLD):
        assert "planned other layers" in outs[rank]["mismatch"]


# ------------------------------------------------ scheduling (one process)


def test_assign_is_longest_processing_time_first():
    assert assign([5.0, 4.0, 3.0, 3.0, 3.0], 2) == [0, 1, 1, 0, 1]
    assert assign([1.0, 1.0, 10.0], 3) == [1, 2, 0]
    assert assign([2.0, 2.0], 1) == [0, 0]
    assert assign([], 4) == []
    with pytest.raises(ValueError, match="world_size=0"):
        assign([1.0], 0)


def test_layer_cost_grows_with_the_layer():
    for fmt, small, large in (("tucker2", (8, 8), (60, 60)), ("cp", 8, 60), ("svd", 8, 60)):
        a = layer_cost((32, 32, 3, 3), fmt, small, {}, True)
        b = layer_cost((128, 128, 3, 3), fmt, large, {}, True)
        assert 0 < a < b, fmt
    # Sigma costs more than Frobenius
    assert (layer_cost((64, 64, 3, 3), "tucker2", (20, 20), {}, True)
            > layer_cost((64, 64, 3, 3), "tucker2", (20, 20), {}, False))


def test_cp_cost_counts_a_singular_statistic():
    shape, rank = (64, 64, 3, 3), 100  # n = 576 inputs
    full = layer_cost(shape, "cp", rank, {}, True, samples=10_000)
    singular = layer_cost(shape, "cp", rank, {}, True, samples=300)
    assert layer_cost(shape, "cp", rank, {}, True) == full  # unknown count: not singular
    assert singular > 3 * full  # the exact B-update's CG runs about 5x longer
    # a CG cap bounds it; the adaptive cap and Frobenius do not depend on it
    capped = {"inner": {"maxiter": 10}}
    assert (layer_cost(shape, "cp", rank, capped, True, samples=300)
            == layer_cost(shape, "cp", rank, capped, True, samples=10_000))
    adaptive = {"inner": {"maxiter": "adaptive"}}
    assert (layer_cost(shape, "cp", rank, adaptive, True, samples=300)
            == layer_cost(shape, "cp", rank, adaptive, True))
    assert (layer_cost(shape, "cp", rank, {}, False, samples=300)
            == layer_cost(shape, "cp", rank, {}, False))


def test_compress_cost_warning_uses_the_statistics_sample_count(monkeypatch):
    import importlib
    import re

    import numpy as np

    from sigmadecomp_torch import LayerStats

    # the module, not the function of the same name that the package exports
    monkeypatch.setattr(importlib.import_module("sigmadecomp_torch.compress"),
                        "CP_COST_WARN_FLOP", 0.0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, bias=False))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 36))
    sigma = torch.from_numpy(X.T @ X / 400)
    flops = []
    for count in (400, 20):  # the same matrix, said to average 400 or 20 patches
        stats = {"0": LayerStats(sigma, torch.zeros(36, dtype=torch.float64), count)}
        with pytest.warns(UserWarning, match="needs about") as rec:
            compress(conv, "cp", covariances=stats, ranks={"0": 4},
                     options={"n_iter_max": 1})
        msg = next(str(w.message) for w in rec if "needs about" in str(w.message))
        flops.append(float(re.search(r"needs about (\S+) floating", msg).group(1)))
        assert "options={'inner': {'maxiter': 'adaptive'}" in msg  # the way out, measured
    assert flops[1] > 3 * flops[0]
    with pytest.warns(UserWarning, match="needs about") as rec:  # already capped: not offered
        compress(conv, "cp", covariances=stats, ranks={"0": 4},
                 options={"n_iter_max": 1, "inner": {"maxiter": "adaptive"}})
    assert not any("cap the inner" in str(w.message) for w in rec)


def test_distributed_option_is_checked_and_one_process_is_the_default():
    assert not dist.is_initialized()
    assert resolve_group(None) is None and resolve_group(False) is None
    with pytest.raises(ValueError, match="distributed=True"):
        resolve_group(True)
    with pytest.raises(TypeError, match="distributed='yes'"):
        resolve_group("yes")
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError, match="distributed=True"):
        compress(model, "tucker2", ratio=2, distributed=True, progress=False)
    plan = [LayerPlan("1", model[1], "Conv2d 3x3", "tucker2", ranks=(4, 4))]
    shard = LayerShard(plan, {}, None)
    assert not shard.active and shard.owns("1")
    rows, mods = [{"name": "1"}], {"1": (model[1], ["1"])}
    assert shard.gather(rows, mods) == (rows, mods)
