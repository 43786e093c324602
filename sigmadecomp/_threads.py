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
* threads = ``work // WORK_PER_THREAD`` for the BLAS pools (``tucker2`` with
  a Sigma: ``work // TUCKER2_WORK_PER_THREAD``, measured) and
  ``work // TORCH_WORK_PER_THREAD`` for torch's intra-op pool (torch inputs
  only), clipped to ``[1, cap]``, where ``cap`` is the current setting (the
  BLAS pools' thread count, ``torch.get_num_threads()``). Measured on an idle
  machine, torch's pool pays off at ten times smaller products than
  OpenBLAS's (``notes/threads.md``). The automatic choice never
  raises a count: limits set by the user (environment variables,
  ``threadpoolctl``, ``torch.set_num_threads``) are respected;
* when that asks for more than one thread, it is further capped by the cores
  free right now (:func:`free_cores`: the cores other processes left unused
  over a recent window of ``/proc/stat`` readings, for a window shorter than
  ``LONG_WINDOW_SECONDS`` also capped by the cores left by the 1-minute load
  average of the other tasks; rounded, at least 1). The window starts at the
  previous reading when that is at most ``REUSE_SECONDS`` old, so repeated
  calls do not wait for a sample; on
  a machine busy with other jobs extra threads would only wait for cores and
  spin.

A long call re-checks the free cores while it runs: the ALS loops call
:func:`retune` after every sweep, which, at most every
:data:`RETUNE_SECONDS`, measures the cores other processes left unused
since the last check and moves the thread count toward them (never above the size-based choice nor the setting the
call started under). So a solver that started on a busy machine takes the
cores that free up (for instance when the other process of a layer-parallel
run is done), and one that started on an idle machine yields cores that
another job takes.

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
import numbers
import os
import sys
import time
from contextlib import ExitStack, contextmanager

from ._backend import no_autograd

__all__ = ["threads", "solver_threads", "auto_thread_count", "idle_cores", "free_cores",
           "busy_machine_threads", "retune", "WORK_PER_THREAD", "TORCH_WORK_PER_THREAD",
           "TUCKER2_WORK_PER_THREAD", "RETUNE_SECONDS"]

#: Multiply-adds of the dominant product that justify one more thread (about
#: 5-10 ms of one core: far above a thread wake-up). Below it the solvers run
#: on one thread.
WORK_PER_THREAD = 10**8

#: The same for torch's intra-op pool on torch inputs. Measured on an idle
#: 2-core machine (``notes/threads.md``): at 2e7 multiply-adds (a 64-channel
#: 3x3 layer with Sigma) two torch threads were 1.4-1.7x faster than one for
#: ``sigma_svd``, ``cp`` and ``tt_conv`` and within 12% of it for ``tucker2``,
#: while two OpenBLAS threads were up to 2x slower than one on the same calls.
TORCH_WORK_PER_THREAD = 10**7

#: The BLAS unit of ``tucker2`` with a Sigma. Its sweeps interleave the few
#: large Sigma products with conjugate-gradient steps and many ``r x r``
#: products that do not gain from threads. Measured on an idle 2-core
#: machine on NumPy inputs (``notes/threads.md``): two OpenBLAS threads were
#: 1.4x slower than one for a whole call at 256 channels (``T n n`` = 1.4e9)
#: and 1.15x faster at 512 (1.1e10); this unit gives one thread at 256 and
#: two from about 360 channels on.
TUCKER2_WORK_PER_THREAD = 2 * 10**9

#: Length of the /proc/stat sample that counts idle cores (when no recent reading exists).
IDLE_SAMPLE_SECONDS = 0.03

#: A reading of the CPU counters at most this old starts the next window of
#: :func:`idle_cores` (which then does not sleep).
REUSE_SECONDS = 10.0

try:
    _CLK_TCK = os.sysconf("SC_CLK_TCK")  # jiffies per second of /proc/stat
except (AttributeError, ValueError, OSError):  # pragma: no cover - not on Linux
    _CLK_TCK = 100

#: Least seconds between two re-checks of the free cores inside one solver call
#: (:func:`retune`); a check reads the CPU counters since the previous one (no
#: sleep while that is at most :data:`REUSE_SECONDS` old).
RETUNE_SECONDS = 3.0

# "auto": solvers choose; an int: the user fixed the count with threads(n).
_OVERRIDE = contextvars.ContextVar("sigmadecomp_threads", default="auto")
# True while a solver's policy is in force (nested solver calls pass through).
_IN_SOLVER = contextvars.ContextVar("sigmadecomp_in_solver", default=False)

# the running solver call's thread state for retune() (None outside, or when
# there is nothing to tune: a one-thread choice, or a count fixed by the user)
_TUNING = contextvars.ContextVar("sigmadecomp_tuning", default=None)

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


def _own_cpu_seconds():
    """CPU seconds used so far by every thread of this process."""
    t = os.times()
    return t.user + t.system


def _reading():
    """``(idle, total, n_cpus, own, time)``: one ``/proc/stat`` reading and this process's CPU."""
    idle, total, n_cpus = _cpu_times()
    return idle, total, n_cpus, _own_cpu_seconds(), time.monotonic()


# The last reading of idle_cores, reused as the start of the next window when it is
# recent enough (no sleep needed then), and the length of its last window in seconds.
_LAST_READING = None
_LAST_WINDOW = 0.0

#: An :func:`idle_cores` window at least this long measures the other processes'
#: CPU use over seconds; :func:`free_cores` then does not consult the load
#: average, which counts this process's own threads too.
LONG_WINDOW_SECONDS = 1.0


def idle_cores(seconds=None):
    """Cores not used by other processes over a recent window (``None`` when unknown).

    The machine's busy CPU time (``/proc/stat``, Linux) less this process's
    own (all its threads, :func:`os.times`), subtracted from the number of
    CPUs. This process's threads never count as busy: their work, and the
    busy-waiting of idle OpenBLAS/OpenMP workers, is CPU this process can use.
    The window starts at the previous reading when that one is between
    ``seconds`` and :data:`REUSE_SECONDS` old (no waiting); otherwise this
    call sleeps ``seconds`` (default :data:`IDLE_SAMPLE_SECONDS`) between two
    readings. Elsewhere than on Linux it returns ``None``.

    Examples
    --------
    >>> from sigmadecomp._threads import idle_cores
    >>> n = idle_cores(0.01)
    >>> n is None or n >= 0.0
    True
    """
    global _LAST_READING, _LAST_WINDOW
    seconds = IDLE_SAMPLE_SECONDS if seconds is None else seconds
    try:
        start = _LAST_READING
        now = time.monotonic()
        if start is None or not seconds <= now - start[4] <= REUSE_SECONDS:
            start = _reading()
            time.sleep(seconds)
        end = _reading()
    except (OSError, ValueError, IndexError):
        return None
    _LAST_READING = end
    idle0, total0, n_cpus, own0, t0 = start
    idle1, total1, _, own1, t1 = end
    _LAST_WINDOW = t1 - t0
    span = total1 - total0
    if span <= 0:
        return None
    own = (own1 - own0) * _CLK_TCK  # in the jiffies of /proc/stat
    others = max(0.0, (span - (idle1 - idle0)) - own)
    return max(0.0, n_cpus * (1.0 - others / span))


def _load_average():
    """1-minute load average of the machine (``None`` when unknown)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover - not available
        return None


def free_cores(seconds=None):
    """Cores free for this process right now (``None`` when unknown).

    The cores other processes left unused (:func:`idle_cores`). When that
    window is a short sample (under :data:`LONG_WINDOW_SECONDS`; it misses
    jobs that happen to wait for a moment), the smaller of it and the
    available cores minus the 1-minute load average of the *other* runnable
    tasks (the load average less one for this process; it reacts slowly but
    does not miss bursty jobs); both count all cores of the machine. On a
    2-core machine at load 2.4 the second gives 0.6: no core is free, even
    when the sample caught one idle.

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
        if _LAST_WINDOW >= LONG_WINDOW_SECONDS:
            # seconds of the others' CPU use: the load average would add this
            # process's own threads (it ran several just before) to theirs
            return idle
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


def auto_thread_count(shape, with_sigma, cap, *, work_per_thread=None):
    """Thread count the policy picks for an input of ``shape``.

    Parameters
    ----------
    shape : tuple of int
        Shape of the decomposed array, ``(T, ...)``.
    with_sigma : bool
        Whether a Sigma of side ``n = prod(shape[1:])`` is given.
    cap : int
        Largest allowed count (the current setting).
    work_per_thread : int, optional
        Multiply-adds per thread; default :data:`WORK_PER_THREAD` (the BLAS
        pools; the policy passes :data:`TORCH_WORK_PER_THREAD` for torch's).

    Returns
    -------
    int
        ``work // work_per_thread`` clipped to ``[1, cap]``.

    Examples
    --------
    >>> from sigmadecomp._threads import TORCH_WORK_PER_THREAD, auto_thread_count
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
    >>> auto_thread_count((64, 64, 3, 3), True, cap=64)     # 64 x 576 x 576: BLAS
    1
    >>> auto_thread_count((64, 64, 3, 3), True, cap=64, work_per_thread=TORCH_WORK_PER_THREAD)
    2
    """
    unit = WORK_PER_THREAD if work_per_thread is None else int(work_per_thread)
    T = int(shape[0]) if len(shape) else 1
    n = math.prod(int(d) for d in shape[1:])
    work = T * n * (n if with_sigma else min(T, n))
    return max(1, min(int(cap), work // unit))


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
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(
            f"threads(n={n!r}) is not allowed; n must be 'auto' or an int >= 1"
        )
    return n if isinstance(n, str) else int(n)


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


def solver_threads(func=None, *, sigma_blas_unit=None):
    """Decorator: run a public solver under the automatic thread policy.

    The first parameter of ``func`` is the array to decompose (its shape sets
    the work); a parameter named ``sigma``, if given, marks the Sigma-solver.
    ``@solver_threads(sigma_blas_unit="NAME")`` gives the solver its own
    BLAS unit (multiply-adds per thread) for calls with a Sigma: the
    constant ``NAME`` of this module, read at every call (so it can be
    recalibrated at run time like :data:`WORK_PER_THREAD`, which it
    replaces for those calls).
    """
    if func is None:
        return functools.partial(solver_threads, sigma_blas_unit=sigma_blas_unit)
    signature = inspect.signature(func)
    first = next(iter(signature.parameters))

    @functools.wraps(func)
    @no_autograd  # inputs that require gradients give plain results, no autograd graph
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
        unit = globals()[sigma_blas_unit] if with_sigma and sigma_blas_unit else None
        n_blas = None if blas_cap is None else auto_thread_count(shape, with_sigma, blas_cap,
                                                                  work_per_thread=unit)
        n_torch = None
        if on_torch:
            n_torch = auto_thread_count(shape, with_sigma, torch.get_num_threads(),
                                        work_per_thread=TORCH_WORK_PER_THREAD)
        want = (n_blas, n_torch)  # the size-based choice, before the free-core cap
        tuning = None
        if max(n_blas or 1, n_torch or 1) > 1:
            free = _load_capped(max(n_blas or 1, n_torch or 1))
            n_blas = None if n_blas is None else min(n_blas, free)
            n_torch = None if n_torch is None else min(n_torch, free)
            tuning = _Tuning(want, (n_blas, n_torch))
        last_choice = (n_blas, n_torch)
        token = _IN_SOLVER.set(True)
        tuned = _TUNING.set(tuning)
        try:
            with _limited(n_blas, n_torch):
                try:
                    return func(*args, **kwargs)
                finally:
                    if tuning is not None:
                        tuning.restore()
        finally:
            _TUNING.reset(tuned)
            _IN_SOLVER.reset(token)

    return wrapper


class _Tuning:
    """Thread counts of one solver call that :func:`retune` may move."""

    def __init__(self, want, now):
        self.want = want  # (blas, torch) size-based counts: the ceiling
        self.now = now  # (blas, torch) counts in force
        self.checked = time.monotonic()
        self._changes = ExitStack()  # each change is a _limited block, undone in reverse

    def set(self, n_blas, n_torch):
        self._changes.enter_context(_limited(n_blas, n_torch))
        self.now = (n_blas if n_blas is not None else self.now[0],
                    n_torch if n_torch is not None else self.now[1])

    def restore(self):
        """Back to the counts the call started with (the outer policy restores the rest)."""
        self._changes.close()


def retune(force=False):
    """Move the running solver's thread count toward the cores free now.

    Called by the ALS loops after every sweep; does nothing outside a solver
    call under the automatic policy, when that call chose one thread from the
    problem's size, or when less than :data:`RETUNE_SECONDS` passed since
    the last check (unless ``force``). Otherwise measures the cores other
    processes left unused since the last reading (:func:`idle_cores`; this
    process's own threads, working or busy-waiting, do not count as busy)
    and sets the BLAS and torch counts to that number, rounded, between one
    and the call's size-based choice.

    Returns
    -------
    tuple or None
        The ``(blas, torch)`` counts in force after the call (``None`` where a
        pool is not managed), or ``None`` when nothing was checked.

    Examples
    --------
    >>> from sigmadecomp._threads import retune
    >>> retune() is None   # outside a solver call: nothing to do
    True
    """
    tuning = _TUNING.get()
    if tuning is None:
        return None
    now = time.monotonic()
    if not force and now - tuning.checked < RETUNE_SECONDS:
        return None
    idle = idle_cores()
    tuning.checked = time.monotonic()
    if idle is None:
        return tuning.now
    free = max(1, int(idle + 0.5))
    want_blas, want_torch = tuning.want
    tuning.set(None if want_blas is None else min(want_blas, free),
               None if want_torch is None else min(want_torch, free))
    return tuning.now


def available_cores():
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1
