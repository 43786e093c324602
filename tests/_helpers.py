"""Small builders shared by the test modules."""

import contextlib
import os
import socket
import struct
import time

import numpy as np


def random_psd(rng, n, rank=None):
    """A random ``(n, n)`` PSD matrix of the given rank (full by default; 0 gives zeros)."""
    rank = n if rank is None else rank
    X = rng.standard_normal((max(rank, 1), n)) * rng.uniform(0.1, 3.0, n)
    if rank == 0:
        X = 0 * X
    return X.T @ X / max(rank, 1)


def patches(x, k=3):
    """Zero-padded k x k patches of ``x`` (N, C, H, W) as rows, columns ``(c, i, j)``."""
    N, C, H, W = x.shape
    p = k // 2
    xp_ = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    cols = np.stack([xp_[:, :, i:i + H, j:j + W] for i in range(k) for j in range(k)], axis=2)
    return cols.reshape(N, C * k * k, H * W).transpose(0, 2, 1).reshape(-1, C * k * k)


def write_idx(path, array):
    """Write ``array`` as an IDX file of unsigned bytes (the MNIST format) at ``path``."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(header + array.tobytes())


def free_port():
    """A free TCP port on 127.0.0.1 for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank, port, world, timeout=60):
    """Inside a spawned worker: a gloo process group of ``world`` processes met at
    127.0.0.1:``port`` (one torch thread each, a ``timeout`` of 60 s for every collective
    by default), destroyed on exit."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    try:
        yield
    finally:
        dist.destroy_process_group()


def outcome(call):
    """``"ok"``, or ``"<ExceptionType>: <message>"`` of what ``call()`` raised (warnings
    silenced): what a spawned worker reports for the test to check."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
        return "ok"
    except Exception as exc:  # recorded for the test to check
        return f"{type(exc).__name__}: {exc}"


def spawn_workers(worker, args, nprocs, timeout, what):
    """Run ``worker(rank, *args)`` in ``nprocs`` processes; fail the test after ``timeout`` s."""
    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{what} did not finish within {timeout:.0f} s")


def tt_identity_case(rng, kind):
    """A small TT problem for ``kind`` 'conv' or 'linear'.

    Returns ``(weight, ranks, mode keywords, solver, n)`` with ``n`` the side
    of the layer's Sigma.
    """
    from sigmadecomp import tt_conv, tt_linear

    if kind == "conv":
        return (rng.standard_normal((6, 4, 3, 3)), (3, 4),
                dict(in_modes=(2, 2), out_modes=(2, 3)), tt_conv, 36)
    return rng.standard_normal((6, 12)), 2, dict(in_modes=(3, 4), out_modes=(2, 3)), tt_linear, 12


def write_png_folder(folder, n, shape, seed=0):
    """``n`` random RGB PNG images of ``shape`` (H, W, 3) in a new ``folder``; skips the
    test without Pillow."""
    import numpy as np
    import pytest

    Image = pytest.importorskip("PIL.Image")
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder



def assert_row_stats(stats, rows):
    """``stats`` (a LayerStats) holds the float64 second moment, mean and count of ``rows``
    (a torch tensor whose last dimension is the layer's input size), to 1e-12."""
    import torch

    X = rows.reshape(-1, rows.shape[-1]).to(torch.float64)
    assert stats.count == X.shape[0]
    torch.testing.assert_close(stats.sigma, X.T @ X / X.shape[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.mean, X.mean(dim=0), rtol=1e-12, atol=1e-12)
