"""Thread policy of the solvers: how many BLAS/OpenMP and torch threads they use.

The ALS solvers run many small products (Gram matrices, small solves,
eigen-decompositions) between a few large ones. Multithreaded BLAS and torch
pay a thread wake-up on every call, and OpenBLAS and OpenMP worker threads
busy-wait between calls; on small products that costs far more than the
parallel speed-up gains, and on a machine busy with other jobs the spinning
threads take the cores the work needs. So each public solver chooses its own
thread count from the size of its dominant product, for the duration of the
call only:

* ``work`` = multiply-adds of one dominant product: ``T * n * n`` with a
  ``sigma`` of side ``n`` (the ``r x n`` by ``n x n`` products of the
  Sigma-ALS, bounded by ``T`` rows), ``T * n * min(T, n)`` without one
  (Frobenius: products of the ``T x n`` unfolding), for an input of shape
  ``(T, ...)`` with ``n`` the product of the trailing dimensions;
* threads = ``work // WORK_PER_THREAD`` clipped to ``[1, cap]``, where ``cap``
  is the current setting (the BLAS pools' thread count for NumPy/SciPy, also
  ``torch.get_num_threads()`` for torch inputs). The automatic choice never
  raises a count: limits set by the user (environment variables,
  ``threadpoolctl``, ``torch.set_num_threads``) are respected;
* when that asks for more than one thread, it is further capped by the cores
  free right now (:func:`free_cores`: the smaller of the idle cores in a
  ``/proc/stat`` sample over ``IDLE_SAMPLE_SECONDS`` and the cores left by
  the 1-minute load average of the other tasks; rounded, at least 1). A
  solver that wants several threads runs for seconds to minutes, so the
  sample costs little; on a machine busy with other jobs extra threads would
  only wait for cores and spin.

The settings in force before the call are restored when it returns or raises.
Calls nested inside a solver (for instance the Frobenius start of a
Sigma-solver) run under the outer choice. :func:`threads` overrides the
automatic choice.

The thread counts are process-wide settings of the BLAS library and of torch;
running solvers from several Python threads at once under different policies
is not supported.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import os
import sys
import time
from contextlib import contextmanager

__all__ = ["threads", "solver_threads", "auto_thread_count", "idle_cores", "free_cores",
           "busy_machine_threads", "WORK_PER_THREAD"]

#: Multiply-adds of the dominant product that justify one more thread (about
#: 5-10 ms of one core: far above a thread wake-up). Below it the solvers run
#: on one thread.
WORK_PER_THREAD = 10**8

#: Length of the /proc/stat sample that counts idle cores.
IDLE_SAMPLE_SECONDS = 0.03

# "auto": solvers choose; an int: the user fixed the count with threads(n).
_OVERRIDE = contextvars.ContextVar("sigmadecomp_threads", default="auto")
# True while a solver's policy is in force (nested solver calls pass through).
_IN_SOLVER = contextvars.ContextVar("sigmadecomp_in_solver", default=False)

_controller_cache = [None, None]  # (key, ThreadpoolController)

#: ``(blas, torch)`` thread counts of the last automatic choice (diagnostics;
#: ``None`` where a pool was left alone).
last_choice = (None, None)


def _controller():
    """A cached ``threadpoolctl.ThreadpoolController``, rebuilt when modules were imported."""
    from threadpoolctl import ThreadpoolController

    key = len(sys.modules)
    if _controller_cache[0] != key:
        _controller_cache[1] = ThreadpoolController()
        _controller_cache[0] = key
    return _controller_cache[1]


def _blas_counts():
    """Thread counts of the loaded BLAS pools (NumPy's and SciPy's may differ)."""
    return [lib.num_threads for lib in _controller().lib_controllers if lib.user_api == "blas"]


def _blas_threads():
    """Smallest thread count of the loaded BLAS pools (``None`` when none is loaded).

    The smallest, so that the automatic choice never raises any pool's count.
    """
    counts = _blas_counts()
    return min(counts) if counts else None


def _torch():
    return sys.modules.get("torch")


def _cpu_times():
    """``(idle, total, n_cpus)`` jiffies of all CPUs from ``/proc/stat``."""
    with open("/proc/stat") as fh:
        lines = fh.read().splitlines()
    fields = [int(v) for v in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    n_cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return fields[3] + fields[4], sum(fields), n_cpus


def idle_cores(seconds=None):
    """Number of idle cores, measured over ``seconds`` (``None`` when unknown).

    Reads ``/proc/stat`` (Linux) twice; elsewhere returns ``None``.

    Examples
    --------
    >>> from sigmadecomp._threads import idle_cores
    >>> n = idle_cores(0.01)
    >>> n is None or n >= 0.0
    True
    """
    seconds = IDLE_SAMPLE_SECONDS if seconds is None else seconds
    try:
        idle0, total0, n_cpus = _cpu_times()
        time.sleep(seconds)
        idle1, total1, _ = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return n_cpus * (idle1 - idle0) / (total1 - total0)


def _load_average():
    """1-minute load average of the machine (``None`` when unknown)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover - not available
        return None


def free_cores(seconds=None):
    """Cores free for this process right now (``None`` when unknown).

    The smaller of two estimates: the idle cores over a short sample
    (:func:`idle_cores`; it misses jobs that happen to wait for a moment) and
    the available cores minus the 1-minute load average of the *other*
    runnable tasks (the load average less one for this process; it reacts
    slowly but does not miss bursty jobs); both count all cores of the
    machine. On a 2-core machine at load 2.4 the second gives 0.6: no core is
    free, even when the sample caught one idle.

    Examples
    --------
    >>> from sigmadecomp._threads import free_cores
    >>> n = free_cores(0.01)
    >>> n is None or n >= 0.0
    True
    """
    estimates = []
    idle = idle_cores(seconds)
    if idle is not None:
        estimates.append(idle)
    load1 = _load_average()
    if load1 is not None:
        # the load average counts the runnable tasks of the whole machine
        estimates.append(max(0.0, (os.cpu_count() or 1) - max(0.0, load1 - 1.0)))
    return min(estimates) if estimates else None


def _load_capped(n):
    """``n`` capped by the free cores (rounded, at least 1) when ``n > 1``."""
    if n <= 1:
        return n
    free = free_cores()
    if free is None:
        return n
    return max(1, min(n, int(free + 0.5)))


def auto_thread_count(shape, with_sigma, cap):
    """Thread count the policy picks for an input of ``shape``.

    Parameters
    ----------
    shape : tuple of int
        Shape of the decomposed array, ``(T, ...)``.
    with_sigma : bool
        Whether a Sigma of side ``n = prod(shape[1:])`` is given.
    cap : int
        Largest allowed count (the current setting).

    Returns
    -------
    int
        ``work // WORK_PER_THREAD`` clipped to ``[1, cap]``.

    Examples
    --------
    >>> from sigmadecomp._threads import auto_thread_count
    >>> auto_thread_count((128, 128, 3, 3), True, cap=64)   # 128 x 1152 x 1152
    1
    >>> auto_thread_count((256, 256, 3, 3), True, cap=64)   # 256 x 2304 x 2304
    13
    >>> auto_thread_count((512, 512, 3, 3), True, cap=64)   # 512 x 4608 x 4608
    64
    >>> auto_thread_count((512, 512, 3, 3), False, cap=64)  # Frobenius: 512 x 4608 x 512
    12
    >>> auto_thread_count((512, 512, 3, 3), True, cap=2)
    2
    """
    T = int(shape[0]) if len(shape) else 1
    n = math.prod(int(d) for d in shape[1:])
    work = T * n * (n if with_sigma else min(T, n))
    return max(1, min(int(cap), work // WORK_PER_THREAD))


@contextmanager
def _limited(n_blas, n_torch):
    """BLAS pools at ``n_blas`` and torch at ``n_torch`` threads (``None``: untouched)."""
    limiter = None
    torch, torch_old = _torch(), None
    try:
        if n_blas is not None and any(c != n_blas for c in _blas_counts()):
            limiter = _controller().limit(limits=n_blas, user_api="blas")
        if n_torch is not None and torch is not None:
            old = torch.get_num_threads()
            if old != n_torch:
                torch.set_num_threads(n_torch)
                torch_old = old
        yield
    finally:
        try:
            if torch_old is not None:
                torch.set_num_threads(torch_old)
        finally:
            if limiter is not None:
                limiter.restore_original_limits()


def _check_n(n):
    if isinstance(n, str) and n == "auto":
        return n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(
            f"threads(n={n!r}) is not allowed; n must be 'auto' or an int >= 1"
        )
    return n


@contextmanager
def threads(n="auto"):
    """Fix the number of threads the solvers use, or restore the automatic choice.

    By default every solver (:func:`sigma_svd`, :func:`tucker2`, :func:`cp`,
    :func:`tt_svd`, :func:`tt_conv`, :func:`tt_linear`) chooses its thread
    count from the size of its dominant product (one thread for the small
    products of ``(64..256)``-channel layers, more for larger ones, never more
    than the current setting) and restores the previous settings afterwards.
    Inside ``with threads(n)``, the BLAS pools (through ``threadpoolctl``) and
    torch's intra-op pool (when torch is imported) run exactly ``n`` threads
    and the solvers keep that count.

    Parameters
    ----------
    n : int or 'auto', optional
        Thread count (``>= 1``), or ``'auto'`` for the solvers' own choice
        (the default; useful to undo an outer ``threads(n)``, under which it
        still never exceeds ``n``).

    Notes
    -----
    The previous settings are restored on exit, also when the block raises;
    ``threads`` blocks nest. The counts are process-wide settings of the BLAS
    library and of torch.

    Examples
    --------
    >>> import numpy as np
    >>> import sigmadecomp
    >>> K = np.random.default_rng(0).standard_normal((8, 6, 3, 3))
    >>> with sigmadecomp.threads(1):
    ...     res = sigmadecomp.tucker2(K, (4, 3))
    >>> res.core.shape
    (4, 3, 3, 3)
    """
    n = _check_n(n)
    token = _OVERRIDE.set(n)
    try:
        if n == "auto":
            yield
        else:
            with _limited(n, n):
                yield
    finally:
        _OVERRIDE.reset(token)


@contextmanager
def busy_machine_threads():
    """Cap the BLAS pools and torch's intra-op pool at the free cores for a block.

    For the torch code outside the solvers (forward passes, the statistics'
    Gram products), whose many calls each pay a wake-up of every worker
    thread: on a machine whose cores are taken by other jobs, threads beyond
    the free cores only wait and spin. Inside, both pools run at most
    ``max(1, round(free_cores()))`` threads, never more than before; nothing
    changes on an idle machine, inside ``threads(n)`` (the user's count is
    kept) or when the free cores are unknown. The previous settings are
    restored on exit.

    Examples
    --------
    >>> import torch
    >>> from sigmadecomp._threads import busy_machine_threads
    >>> before = torch.get_num_threads()
    >>> with busy_machine_threads():
    ...     1 <= torch.get_num_threads() <= before
    True
    >>> torch.get_num_threads() == before
    True
    """
    if _OVERRIDE.get() != "auto" or _IN_SOLVER.get():
        yield
        return
    torch = _torch()
    blas = _blas_threads()
    current = max(blas or 1, torch.get_num_threads() if torch is not None else 1)
    if current <= 1:
        yield
        return
    n = _load_capped(current)
    n_blas = None if blas is None or blas <= n else n
    n_torch = None if torch is None or torch.get_num_threads() <= n else n
    with _limited(n_blas, n_torch):
        yield


def solver_threads(func):
    """Decorator: run a public solver under the automatic thread policy.

    The first parameter of ``func`` is the array to decompose (its shape sets
    the work); a parameter named ``sigma``, if given, marks the Sigma-solver.
    """
    signature = inspect.signature(func)
    first = next(iter(signature.parameters))

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        global last_choice
        if _IN_SOLVER.get() or _OVERRIDE.get() != "auto":
            return func(*args, **kwargs)
        try:
            bound = signature.bind(*args, **kwargs).arguments
            shape = tuple(bound[first].shape)
        except (TypeError, AttributeError, KeyError):
            return func(*args, **kwargs)  # let the solver report its bad input
        with_sigma = bound.get("sigma") is not None
        torch = _torch()
        on_torch = torch is not None and isinstance(bound[first], torch.Tensor)
        blas_cap = _blas_threads()
        n_blas = None if blas_cap is None else auto_thread_count(shape, with_sigma, blas_cap)
        n_torch = None
        if on_torch:
            n_torch = auto_thread_count(shape, with_sigma, torch.get_num_threads())
        if max(n_blas or 1, n_torch or 1) > 1:
            free = _load_capped(max(n_blas or 1, n_torch or 1))
            n_blas = None if n_blas is None else min(n_blas, free)
            n_torch = None if n_torch is None else min(n_torch, free)
        last_choice = (n_blas, n_torch)
        token = _IN_SOLVER.set(True)
        try:
            with _limited(n_blas, n_torch):
                return func(*args, **kwargs)
        finally:
            _IN_SOLVER.reset(token)

    return wrapper


def available_cores():
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1
