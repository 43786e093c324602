"""Data-parallel collection over 2 gloo processes equals single-process collection."""

import os

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from sigmadecomp_torch import collect_covariances, load_covariances, save_covariances  # noqa: E402
from _helpers import free_port, gloo_group, spawn_workers  # noqa: E402

WORLD = 2
TIMEOUT = 120.0  # seconds for the whole spawned run (start-up included)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 3)).double().eval()


class _QKV(nn.Module):
    """q/k/v on one input (a shared statistic); on rank 1 k also reads another tensor."""

    def __init__(self, rank=0):
        super().__init__()
        torch.manual_seed(1)
        self.q, self.k, self.v = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)
        self.rank = rank

    def forward(self, x):
        y = self.q(x) + self.k(x) + self.v(x)
        return y if self.rank == 0 else y + self.k(2 * x)


def _batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(4 + i, 2, 8, 8, generator=g, dtype=torch.float64) for i in range(5)]


def _worker(rank, port, out_dir):
    with gloo_group(rank, port, WORLD):
        shard = _batches()[rank::WORLD]  # uneven shards: 3 and 2 batches
        stats = collect_covariances(_model(), shard, progress=False)
        save_covariances(stats, os.path.join(out_dir, f"rank{rank}.pt"))
        qkv = collect_covariances(_QKV(rank).double(), [b[:, 0, 0, :3] for b in shard],
                                  progress=False)
        assert qkv["q"] is qkv["v"] and qkv["k"] is not qkv["q"]  # k's link differs by rank
        save_covariances(qkv, os.path.join(out_dir, f"qkv{rank}.pt"))
        dist.barrier()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_workers_equal_one_process(tmp_path):
    spawn_workers(_worker, (free_port(), str(tmp_path)), WORLD, TIMEOUT, "distributed collection")
    single = collect_covariances(_model(), _batches(), progress=False)
    for rank in range(WORLD):
        got = load_covariances(os.path.join(tmp_path, f"rank{rank}.pt"))
        assert list(got) == list(single)
        for name, s in single.items():
            assert got[name].count == s.count
            assert got[name].groups == s.groups
            torch.testing.assert_close(got[name].sigma, s.sigma, rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(got[name].mean, s.mean, rtol=1e-13, atol=1e-13)
    rows = [b[:, 0, 0, :3] for b in _batches()]
    both = rows + [2 * r for r in rows[1::WORLD]]  # rank 1's k also read 2x
    for rank in range(WORLD):
        got = load_covariances(os.path.join(tmp_path, f"qkv{rank}.pt"))
        qv = torch.cat(rows)
        k = torch.cat(both)
        for name, X in (("q", qv), ("v", qv), ("k", k)):
            assert got[name].count == X.shape[0]
            torch.testing.assert_close(got[name].sigma, X.T @ X / X.shape[0],
                                       rtol=1e-13, atol=1e-13)
    # each worker alone saw only part of the data: the all-reduce did the merge
    part = collect_covariances(_model(), _batches()[0::WORLD], progress=False)
    assert part["0"].count < single["0"].count


# ------------------------------------------------ position draws (position_fraction < 1)

FRACTION, SEED = 0.5, 7


def _record_draws(drawn):
    """Make every accumulator of this process record its position masks in ``drawn[-1]``
    (a dict of layer name -> masks)."""
    from sigmadecomp_torch import covariance

    keep = covariance._Accumulator._keep

    def spy(self, shape):
        mask = keep(self, shape)
        if mask is not None:
            drawn[-1].setdefault(self.name, []).append(mask.clone())
        return mask

    covariance._Accumulator._keep = spy


def _draw_worker(rank, port, out_dir):
    drawn = []
    _record_draws(drawn)
    with gloo_group(rank, port, WORLD):
        same = _batches()[:1]  # the same batch on both processes
        for _ in range(2):  # twice: the draws repeat
            drawn.append({})
            stats = collect_covariances(_model(), same, layers=["0"], progress=False,
                                        position_fraction=FRACTION, seed=SEED)
            drawn[-1]["sigma"] = stats["0"].sigma
        torch.save(drawn, os.path.join(out_dir, f"draws{rank}.pt"))
        dist.barrier()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_position_draws_differ_between_processes_and_repeat(tmp_path, monkeypatch):
    from sigmadecomp_torch import covariance

    spawn_workers(_draw_worker, (free_port(), str(tmp_path)), WORLD, TIMEOUT, "position draws")
    got = [torch.load(os.path.join(tmp_path, f"draws{r}.pt")) for r in range(WORLD)]
    for rank in range(WORLD):
        first, again = got[rank]
        # reproducible for a given seed, world size and rank ...
        assert len(first["0"]) == len(again["0"]) > 0
        for a, b in zip(first["0"], again["0"]):
            assert torch.equal(a, b)
        assert torch.equal(first["sigma"], again["sigma"])
    # ... and the two processes draw different positions of the same batch
    assert not torch.equal(got[0][0]["0"][0], got[1][0]["0"][0])
    from sigmadecomp_torch.covariance import position_seed  # (the documented seeds)

    for rank in range(WORLD):
        mask = got[rank][0]["0"][0]
        gen = torch.Generator().manual_seed(position_seed(SEED, 0, (rank, WORLD)))
        assert torch.equal(mask, torch.rand(mask.shape, generator=gen) < FRACTION)
    # one process draws as it always did: layer i from seed + i
    drawn = [{}]
    monkeypatch.setattr(covariance._Accumulator, "_keep", covariance._Accumulator._keep)
    _record_draws(drawn)
    collect_covariances(_model(), _batches()[:1], layers=["0", "2"], progress=False,
                        position_fraction=FRACTION, seed=SEED)
    for i, name in enumerate(["0", "2"]):
        mask = drawn[0][name][0]
        gen = torch.Generator().manual_seed(SEED + i)
        assert torch.equal(mask, torch.rand(mask.shape, generator=gen) < FRACTION)


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _DEVICES)
def test_every_reduced_tensor_is_on_the_statistics_device(device, monkeypatch):
    """Under a group, every tensor collect_covariances reduces lives where the statistics
    do (NCCL reduces device tensors only), and a second process that adds nothing leaves
    the one-process statistics. A fake group of two: process 1's part is zero."""
    model = _QKV().double().to(device)
    batches = [b[:, 0, 0, :3].to(device) for b in _batches()]
    alone = collect_covariances(model, batches, progress=False)
    seen = []

    def all_reduce(t, op=None, group=None):
        seen.append(t.device)  # (the other process adds zeros: sum and min/max unchanged)

    def all_gather_object(out, obj, group=None):
        out[:] = [obj] * len(out)  # (the other process agrees)

    for name, value in (("is_initialized", lambda: True), ("get_world_size", lambda: 2),
                        ("get_rank", lambda: 0), ("all_reduce", all_reduce),
                        ("all_gather_object", all_gather_object)):
        monkeypatch.setattr(dist, name, value)
    stats = collect_covariances(model, batches, progress=False)
    assert seen and all(d == torch.device(device) or d.type == device for d in seen)
    assert stats["q"] is stats["v"] and stats.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(stats[name].sigma, alone[name].sigma, rtol=0, atol=0)
