"""A process refused in its own argument checks tells the others (no one waits for it).

One spawned gloo group of 2: in each scenario only process 1 gets an argument its
checks refuse (or the two take different paths); process 1 must raise its own
error and process 0 a RuntimeError naming process 1, at once, and both must stay
in step for the next scenario (a last collection checks that). A short gloo
timeout makes a process left waiting fail the test instead of hanging it.
"""

import json
import os

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from sigmadecomp_torch import collect_covariances, compress  # noqa: E402
from sigmadecomp_torch.compress import LayerPlan  # noqa: E402
from sigmadecomp_torch.parallel import LayerShard  # noqa: E402
from sigmadecomp_torch.sequential import (  # noqa: E402
    collect_cross_covariances,
    refit_after,
    sequential_compress,
)
from _helpers import free_port, gloo_group, outcome, spawn_workers  # noqa: E402
from _torch_models import small_conv_net  # noqa: E402

WORLD = 2
GLOO_TIMEOUT = 15  # s: a process left waiting in a collective fails after this
TIMEOUT = 120.0


def _model():
    return small_conv_net(6, 4)


def _batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(3, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(4)]


def _scenarios(rank, mine, stats):
    """name -> call; process 1's arguments are refused (or lead elsewhere)."""
    bad = rank == 1
    one_shot = lambda m, s: compress(m, "svd", covariances=s, ratio=2, layers=["2"],  # noqa: E731
                                     progress=False)
    return {
        # compress with statistics given: a flag
        "compress_flag": lambda: compress(_model(), "svd", covariances=stats, ratio=2,
                                          layers=["2", "4"], inplace="yes" if bad else False,
                                          progress=False),
        # compress with data= and the default layers: the options
        "compress_options": lambda: compress(_model(), "svd", data=mine, ratio=2,
                                             options=5 if bad else None, progress=False),
        # compress with data=: a layer name the statistics pass would refuse
        "compress_layers": lambda: compress(_model(), "svd", data=mine, ratio=2,
                                            layers=["2", "nope" if bad else "4"],
                                            progress=False),
        "collect": lambda: collect_covariances(_model(), mine, max_batches=0 if bad else None,
                                               progress=False),
        "cross": lambda: collect_cross_covariances(_model(), _model(), mine, layers=["2"],
                                                   chunk_bytes=0 if bad else 1 << 20),
        "sequential": lambda: sequential_compress(_model(), "svd", mine, ratio=2,
                                                  layers=["2", "4"],
                                                  target_ridge=-1.0 if bad else None,
                                                  progress=False),
        # through compress: sequential compression's own checks (a layer name)
        "compress_sequential": lambda: compress(_model(), "svd", data=mine, ratio=2,
                                                sequential=True,
                                                layers=["2", "nope" if bad else "4"],
                                                progress=False),
        "refit_after": lambda: refit_after(_model(), mine, 5 if bad else "all", one_shot,
                                           progress=False),
        # through compress: the refit's own checks (a layer that is also compressed)
        "compress_refit": lambda: compress(_model(), "svd", data=mine, ratio=2, layers=["2"],
                                           refit=["2"] if bad else ["4"], progress=False),
        # the layer-parallel schedule
        "shard": lambda: LayerShard([LayerPlan("2", _model()[2], "Conv2d 3x3", "svd", ranks=2)],
                                    {}, None, schedule="nope" if bad else "dynamic"),
        # different paths (sequential on one process only): refused on both
        "paths": lambda: compress(_model(), "svd", data=mine, ratio=2, layers=["2"],
                                  sequential=bad, progress=False),
    }


def _worker(rank, port, out_dir):
    got = {}
    mine = _batches()[rank::WORLD]
    with gloo_group(rank, port, WORLD, timeout=GLOO_TIMEOUT):
        stats = collect_covariances(_model(), mine, progress=False)
        for name, call in _scenarios(rank, mine, stats).items():
            got[name] = outcome(call)
        # still in step: the next collection sums both processes' batches
        got["count"] = collect_covariances(_model(), mine, layers=["2"],
                                           progress=False)["2"].count
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(got, f)
        dist.barrier()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_a_process_refused_in_its_argument_checks_stops_the_others(tmp_path):
    spawn_workers(_worker, (free_port(), str(tmp_path)), WORLD, TIMEOUT,
                  "argument-check scenarios")
    r0, r1 = (json.load(open(os.path.join(tmp_path, f"rank{r}.json"))) for r in range(WORLD))
    own = {"compress_flag": "TypeError: inplace='yes' is not allowed",
           "compress_options": "TypeError: options of type int is not allowed",
           "compress_layers": "ValueError: layers contains 'nope'",
           "collect": "ValueError: max_batches=0 is not allowed",
           "cross": "ValueError: chunk_bytes=0 is not allowed",
           "sequential": "ValueError: target_ridge=-1.0 is not allowed",
           "compress_sequential": "ValueError: layers contains 'nope'",
           "refit_after": "TypeError: refit=5 is not allowed",
           "compress_refit": "ValueError: refit contains '2', which is also a layer",
           "shard": "ValueError: schedule='nope' is not allowed"}
    for name, error in own.items():
        assert r1[name].startswith(error), (name, r1[name])
        assert r0[name].startswith("RuntimeError: process 1 failed while checking the "
                                   "arguments: " + error), (name, r0[name])
    for got in (r0, r1):
        assert got["paths"].startswith("ValueError: the processes disagree while checking "
                                       "the arguments"), got["paths"]
    # every process made the same exchanges: the last collection summed both
    total = 3 * 5 * 5 * 4  # 4 batches of 3 images, 5 x 5 positions
    assert r0["count"] == r1["count"] == total
