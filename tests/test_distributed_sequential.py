"""Sequential compression and refit with a process that has no batches.

Data split [all batches, none] over 2 gloo processes: the process without
batches adds zero sums and counts to every pass (budget statistics, side-by-side
passes, refits, output errors), so both return the one-process model on all
batches.
"""

import os
import warnings

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from sigmadecomp_torch import compress  # noqa: E402
from _helpers import free_port, gloo_group, spawn_workers  # noqa: E402

WORLD = 2
TIMEOUT = 120.0


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        x = torch.relu(self.a(torch.relu(self.stem(x))))
        return self.fc(torch.relu(self.c(x)).flatten(1))


def _batches():
    g = torch.Generator().manual_seed(4)
    return [torch.randn(6, 2, 6, 6, generator=g, dtype=torch.float64) for _ in range(3)]


OPTIONS = {"n_iter_max": 4, "tol": 0.0, "rng": 0}


def _runs(data):
    """The model and report of each call on ``data``."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["sequential"] = compress(_Net().double().eval(), "tucker2", data=data,
                                     sequential=True, budget=0.6, layers=["a", "c"],
                                     refit="all", centered=True, options=OPTIONS,
                                     progress=False)
        out["one_shot"] = compress(_Net().double().eval(), "tucker2", data=data, ratio=2,
                                   layers=["a", "c"], refit="all", options=OPTIONS,
                                   progress=False)
        # min_speedup times at the first batch of data: on the empty process, another's
        out["timed"] = compress(_Net().double().eval(), "tucker2", data=data, ratio=2,
                                layers=["a", "c"], min_speedup=0, options=OPTIONS,
                                progress=False)
    return {k: (m.state_dict(), rep.to_dict()) for k, (m, rep) in out.items()}


def _worker(rank, port, out_dir):
    with gloo_group(rank, port, WORLD, timeout=20):
        got = _runs(_batches() if rank == 0 else [])
        torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()


def _rows(report, key):
    return {r["name"]: r for r in report[key]}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_a_process_without_batches_gets_the_one_process_model(tmp_path):
    spawn_workers(_worker, (free_port(), str(tmp_path)), WORLD, TIMEOUT,
                  "sequential compression with an empty process")
    ref = _runs(_batches())
    assert [r["name"] for r in ref["sequential"][1]["refitted"]] == ["fc"]
    for rank in range(WORLD):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"), weights_only=False)
        for key in ("sequential", "one_shot", "timed"):
            state, report = got[key]
            ref_state, ref_report = ref[key]
            assert state.keys() == ref_state.keys()
            for k, v in ref_state.items():
                torch.testing.assert_close(state[k], v, rtol=1e-10, atol=1e-12)
            for what in ("layers", "refitted"):
                rows, ref_rows = _rows(report, what), _rows(ref_report, what)
                assert rows.keys() == ref_rows.keys()
                if key == "timed":
                    assert all(r["latency_dense_ms"] > 0 for r in rows.values())
                for name, r in ref_rows.items():
                    if "output_error" in r:  # measured on the other process's batches
                        assert rows[name]["output_error"] is not None
                    for field in ("ranks", "output_error", "target_change", "sigma_error"):
                        if r.get(field) is None:
                            assert rows[name].get(field) is None
                        elif isinstance(r[field], float):
                            assert rows[name][field] == pytest.approx(r[field], rel=1e-10)
                        else:
                            assert rows[name][field] == r[field]
