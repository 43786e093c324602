"""Processes of a gloo group that disagree, fail or opt out never hang and never mix.

One spawned group of 2 runs every scenario in turn; each rank records what it
got (a result or an exception) and the test compares.
"""

import json
import os

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from sigmadecomp_torch import collect_covariances, compress  # noqa: E402
from _helpers import free_port, gloo_group, outcome, spawn_workers  # noqa: E402
from _torch_models import small_conv_net  # noqa: E402

WORLD = 2
TIMEOUT = 180.0


def _model():
    return small_conv_net(8, 5)


class _HeadFirst(nn.Module):
    """Its classifier is registered first and called last."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8, 5)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.head(x.mean((2, 3)))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64) for _ in range(4)]


def _worker(rank, port, out_dir):
    got = {}
    mine = _batches()[rank::WORLD]
    with gloo_group(rank, port, WORLD):
        # a call only rank 0 makes, with distributed=False: its own data, no collective
        if rank == 0:
            local = collect_covariances(_model(), mine, progress=False, distributed=False)
            got["local_count"] = local["2"].count
            got["compress_alone"] = outcome(lambda: compress(
                _model(), "svd", data=mine, ratio=2, distributed=False, progress=False))
        # different layers on the two ranks
        got["layers"] = outcome(lambda: collect_covariances(
            _model(), mine, layers=["2"] if rank == 0 else ["2", "4"], progress=False))
        # a non-finite input on rank 1 only
        bad = [b.clone() for b in mine]
        if rank == 1:
            bad[0][0, 0, 0, 0] = float("inf")
        got["inf"] = outcome(lambda: collect_covariances(_model(), bad, progress=False))
        stats = collect_covariances(_model(), mine, progress=False)
        # an argument error on rank 1 only (caught by the argument checks) ...
        got["args"] = outcome(lambda: compress(_model(), "svd", covariances=stats,
                                                ratio=2 if rank == 0 else 1, progress=False))
        # ... and a planning error on rank 1 only (ranks beyond the layer's size)
        got["plan"] = outcome(lambda: compress(_model(), "svd", covariances=stats,
                                                ranks={"2": 2 if rank == 0 else 10000},
                                                progress=False))
        # different weights on the two ranks
        other = _model()
        if rank == 1:
            with torch.no_grad():
                other[2].weight.mul_(-3)
        got["weights"] = outcome(lambda: compress(other, "svd", covariances=stats, ratio=2,
                                                   progress=False))
        # sequential compression with no batch on rank 1: it adds zero sums; none anywhere
        got["empty"] = outcome(lambda: compress(_model(), "svd", data=mine if rank == 0 else [],
                                                 ratio=2, sequential=True, progress=False))
        got["all_empty"] = outcome(lambda: compress(_model(), "svd", data=[], ratio=2,
                                                     sequential=True, progress=False))
        # default layers when one process has no batch: chosen as the others choose them
        _, rep = compress(_HeadFirst().double().eval(), "svd", data=mine if rank == 0 else [],
                          ratio=2, progress=False)
        got["default_layers"] = [r["name"] for r in rep.layers]
        # the model fails on rank 1's first batch, in the pass that finds the default layers
        odd = [b[:, :2] if rank == 1 else b for b in mine]  # 2 channels: c1 fails
        got["first_pass"] = outcome(lambda: compress(_HeadFirst().double().eval(), "svd",
                                                      data=odd, ratio=2, progress=False))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(got, f)
        dist.barrier()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_disagreeing_failing_and_opting_out_processes(tmp_path):
    spawn_workers(_worker, (free_port(), str(tmp_path)), WORLD, TIMEOUT, "agreement scenarios")
    r0, r1 = (json.load(open(os.path.join(tmp_path, f"rank{r}.json"))) for r in range(WORLD))
    one = collect_covariances(_model(), _batches()[0::WORLD], progress=False)
    assert r0["local_count"] == one["2"].count  # rank 0's data alone
    assert r0["compress_alone"] == "ok"  # rank 1 never called it: no hang
    for got in (r0, r1):
        assert got["layers"].startswith("ValueError: the processes disagree while collecting")
        assert got["weights"].startswith("ValueError: process ")
        assert "weights or statistics counts differ" in got["weights"]
    assert r1["inf"].startswith("ValueError: layer '0': its input contains NaN or inf")
    assert r0["inf"].startswith("RuntimeError: process 1 failed while collecting statistics: "
                                "ValueError: layer '0'")
    assert r1["args"].startswith("ValueError: ratio=1 is not allowed")
    assert r0["args"].startswith("RuntimeError: process 1 failed while checking the "
                                 "arguments: ValueError: ratio=1")
    assert r1["plan"].startswith("ValueError: ranks for layer '2'")
    assert r0["plan"].startswith("RuntimeError: process 1 failed while planning the "
                                 "compression: ValueError: ranks for layer '2'")
    assert r0["empty"] == r1["empty"] == "ok"
    for got in (r0, r1):
        assert got["all_empty"].startswith("ValueError: data yielded no batches on any process")
    assert r0["default_layers"] == r1["default_layers"] == ["c2", "c3"]
    assert r0["first_pass"].startswith("RuntimeError: process 1 failed while finding the "
                                       "default layers")
    assert not r1["first_pass"].startswith("RuntimeError: process")
