"""Layer-parallel decomposition over a torch.distributed process group.

:func:`sigmadecomp_torch.compress` decomposes the layers of a model one after
the other; the layers are independent, so under ``torchrun`` (or any
initialized process group of more than one process) each process can take a
share of them. This module decides the shares and exchanges the results:

* :func:`layer_cost` predicts the floating-point work of one layer's
  decomposition from its shape, format and ranks (a rough count: only the
  ratios between layers matter);
* :class:`LayerShard` hands the layers out, largest predicted cost first:
  each process takes the next layer of that list when it is free, by an
  atomic ``add`` on a counter in the process group's own key-value store
  (the store ``init_process_group`` set up for the rendezvous). A process
  stuck with a layer that takes longer than predicted then simply takes no
  more, so the shares follow the real times, not the prediction. When the
  group's store cannot be reached, :func:`assign` fixes the shares in
  advance instead (greedy longest-processing-time rule on the predicted
  costs); ``schedule="static"`` asks for that explicitly;
* once every process is done, :meth:`LayerShard.gather` exchanges every
  built module and report row with ``torch.distributed.all_gather_object``,
  so that every process returns the same model and report as one process
  would.

The built modules travel as pickled modules (their tensors moved to the CPU
for the exchange and back to the layer's device after it), so the weights are
bit-identical to the ones the owning process computed; the solvers are
deterministic, hence equal to the one-process result computed with the same
thread settings.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import secrets

import torch

__all__ = ["layer_cost", "assign", "resolve_group", "agree", "checking", "first_given",
           "LayerShard", "SCHEDULES"]

#: How :class:`LayerShard` shares the layers: ``"dynamic"`` (the next layer
#: to whichever process is free) or ``"static"`` (shares fixed in advance).
SCHEDULES = ("dynamic", "static")


def _dist():
    import torch.distributed as dist

    return dist


def resolve_group(distributed):
    """``(rank, world_size)`` of the process group to use, or None for one process.

    Parameters
    ----------
    distributed : None or bool
        ``None``: use the default process group when torch.distributed is
        available, initialized and has more than one process. ``True``: the
        same, but an uninitialized group is an error. ``False``: one process.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed={distributed!r} is not allowed; distributed must be "
                        "None (auto), True or False")
    if distributed is False:
        return None
    dist = _dist()
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed:
            raise ValueError("distributed=True is not allowed without an initialized "
                             "torch.distributed process group; call "
                             "torch.distributed.init_process_group (torchrun does the "
                             "rendezvous) or pass distributed=None/False")
        return None
    world = dist.get_world_size()
    if world < 2:
        return None
    return dist.get_rank(), world


def agree(group, what, signature, error=None):
    """Exchange each process's outcome before a collective reduction; raise on disagreement.

    Every process of ``group`` (from :func:`resolve_group`) calls it at the
    same point: with ``error`` the exception this process met (the caller
    re-raises it afterwards), else None. Every other process then raises a
    ``RuntimeError`` naming the failed process and its error, instead of
    waiting in a reduction that never comes; processes whose ``signature``
    (a picklable, comparable description of what they reduce, e.g. the layer
    names and weight shapes) differs from process 0's raise a ``ValueError``
    instead of summing unlike things.
    """
    if group is None:
        return
    got = _outcomes(group, what, signature, error)
    if got is None:
        return
    for r, sig in enumerate(got):
        if sig != got[0]:
            raise ValueError(f"the processes disagree while {what}: process 0 has {got[0]}, "
                             f"process {r} has {sig}; every process must make the same call "
                             "(same model, layers and options)")


@contextlib.contextmanager
def checking(group, signature=None, *, exchange=True):
    """The argument checks of an entry point, their outcome exchanged once over ``group``.

    Every process runs the ``with`` block (its own checks of its arguments, before any
    collective) and then takes part in one :func:`agree` ("checking the arguments"): a
    process whose checks raised passes its error there and re-raises it; every other
    process raises a ``RuntimeError`` naming it, instead of going on into a collective
    that the failed process never joins. ``signature`` (picklable, comparable) describes
    the choices that decide which exchanges follow (e.g. whether statistics are
    collected); processes that differ in it raise a ``ValueError``, so they never pair
    unlike exchanges.

    Without a group (``group`` None), or with ``exchange=False`` (a call nested in one
    whose own exchanged checks already covered these), the block just runs.

    Examples
    --------
    >>> from sigmadecomp_torch.parallel import checking
    >>> with checking(None):  # one process: the checks alone
    ...     pass
    """
    if group is None or not exchange:
        yield
        return
    try:
        yield
    except Exception as exc:
        agree(group, "checking the arguments", signature, error=exc)
        raise
    agree(group, "checking the arguments", signature)


def _outcomes(group, what, value, error):
    """Every process's ``value`` (one ``all_gather_object``), after the failures: None on a
    process that passes its ``error``; on the others a ``RuntimeError`` naming the first
    process that failed."""
    sent = None if error is None else f"{type(error).__name__}: {error}"
    got = [None] * group[1]
    _dist().all_gather_object(got, (sent, value))
    if error is not None:
        return None
    for r, (err, _) in enumerate(got):
        if err is not None:
            raise RuntimeError(f"process {r} failed while {what}: {err}")
    return [v for _, v in got]


def first_given(group, value, error=None, what="finding the default layers"):
    """The ``value`` of the lowest-ranked process of ``group`` that has one (not None), on
    every process (one ``all_gather_object``); None if no process has one.

    A process that failed passes its ``error`` instead (and re-raises it afterwards); the
    others then raise a ``RuntimeError`` naming it and ``what`` it was doing, as in
    :func:`agree`.
    """
    got = _outcomes(group, what, value, error)
    return None if got is None else next((v for v in got if v is not None), None)


def _digest(t):
    """A hash of a tensor's bytes: equal weights on every process, or a clear error."""
    import hashlib

    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).hexdigest()


def layer_cost(shape, fmt, ranks, options, weighted, samples=None):
    """Predicted floating-point operations of decomposing one layer.

    A rough count from the shapes (``T`` outputs, ``n`` = inputs x kernel
    positions), the ranks and ``options['n_iter_max']``; used only to balance
    layers over processes, so what matters is how layers compare.

    Parameters
    ----------
    shape : tuple of int
        The weight's shape (torch layout).
    fmt : str
        ``'svd'``, ``'tucker2'``, ``'cp'``, ``'tt'`` or a registered format.
    ranks : int or tuple of int
    options : dict
        The core options (``n_iter_max``, ``init``).
    weighted : bool
        Whether a Sigma is used.
    samples : int, optional
        The patch vectors the statistic averaged; fewer than the layer's
        inputs make Sigma singular, which slows CP's exact B-update.

    Returns
    -------
    float

    Examples
    --------
    >>> from sigmadecomp_torch.parallel import layer_cost
    >>> small = layer_cost((64, 64, 3, 3), 'tucker2', (30, 30), {}, True)
    >>> large = layer_cost((256, 256, 3, 3), 'tucker2', (120, 120), {}, True)
    >>> large > 50 * small
    True
    """
    T = int(shape[0])
    n = int(math.prod(shape[1:]))
    P = int(math.prod(shape[2:])) if len(shape) > 2 else 1
    # the Sigma square root / factorization every weighted format starts with
    base = float(n) ** 3 if weighted else 0.0
    if fmt == "cp":
        from .compress import cp_flop

        return base + cp_flop(shape, ranks, options, weighted, samples)
    if fmt == "tucker2":
        r_T, r_S = (int(v) for v in ranks)
        sweeps = int(options.get("n_iter_max", 100))
        m = r_S * P  # unknowns of the input-side block
        per_frob = 4 * T * n * (r_T + r_S)
        if not weighted:
            return sweeps * per_frob
        per_sigma = 4 * n * n * m + m ** 3 + 4 * T * n * (r_T + m)
        return base + sweeps * per_sigma + 25 * per_frob
    r = max(int(v) for v in ranks) if isinstance(ranks, (tuple, list)) else int(ranks)
    # closed-form (svd) and the rest: an SVD of the (T, n) unfolding plus products
    return base + 4.0 * T * n * min(T, n) + 2.0 * T * n * r


def assign(costs, world_size):
    """Share of each process: greedy longest-processing-time balancing.

    Layers are taken from the most to the least costly (ties by position) and
    each goes to the process with the smallest total so far (ties to the
    lowest rank). Deterministic, so every process computes the same shares.

    Parameters
    ----------
    costs : sequence of float
    world_size : int

    Returns
    -------
    list of int
        The rank of each layer, in the order of ``costs``.

    Examples
    --------
    >>> from sigmadecomp_torch.parallel import assign
    >>> assign([5.0, 4.0, 3.0, 3.0, 3.0], 2)
    [0, 1, 1, 0, 1]
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} is not allowed; world_size must be an "
                         "int >= 1")
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += float(costs[i])
    return owner


class LayerShard:
    """Which planned layers this process decomposes, and the exchange after.

    Parameters
    ----------
    plan : list of LayerPlan
        :func:`compress`'s plan (``name``, ``module``, ``method``, ``ranks``,
        ``sigma`` per layer), in model order.
    options : dict
    distributed : None or bool
        See :func:`resolve_group`.
    schedule : {"dynamic", "static"}, optional
        ``"dynamic"`` (default): the layers, largest predicted cost first, go
        one at a time to whichever process is free (a counter in the process
        group's store); falls back to ``"static"`` when the store cannot be
        reached. ``"static"``: :func:`assign` fixes the shares in advance.

    Under a process group the construction takes part in one exchange, whatever the
    schedule: a ``schedule`` refused on one process makes the others raise a
    ``RuntimeError`` naming it, and unlike schedules are a ``ValueError`` on every
    process. With one process every layer is this process's, in plan order, and
    :meth:`gather` returns its arguments unchanged. Iterate over
    :meth:`layers` to get this process's share.
    """

    def __init__(self, plan, options, distributed, *, schedule="dynamic"):
        group = resolve_group(distributed)
        bad = None if schedule in SCHEDULES else ValueError(
            f"schedule={schedule!r} is not allowed; schedule must be one of "
            f"{', '.join(map(repr, SCHEDULES))}")
        claim = (None, None)
        if group is not None:  # one exchange in either schedule: the others learn of `bad`
            claim = _claim_counter(group, schedule, bad)
        if bad is not None:
            raise bad
        self.rank, self.world_size = group if group is not None else (0, 1)
        self.names = [p.name for p in plan]
        self.devices = {p.name: p.module.weight.device for p in plan}
        # what every process must agree on: same layers, formats, ranks, weights and counts
        self.signature = [(p.name, p.method, p.ranks, tuple(p.module.weight.shape),
                           _digest(p.module.weight), p.samples) for p in plan]
        self.schedule = "static"
        self._store = self._key = None
        self._mine = set()  # names of the layers this process took
        if self.world_size > 1:
            costs = [layer_cost(tuple(p.module.weight.shape), p.method, p.ranks, options,
                                p.sigma is not None, p.samples) for p in plan]
            #: plan indices in the order the layers are handed out
            self.order = sorted(range(len(plan)), key=lambda i: (-float(costs[i]), i))
            self._store, self._key = claim
            if self._store is not None:
                self.schedule = "dynamic"
                owner = [None] * len(plan)  # decided by the claims, known after gather
            else:
                owner = assign(costs, self.world_size)
        else:
            self.order = list(range(len(plan)))
            owner = [0] * len(plan)
        self.owner = dict(zip(self.names, owner))

    def layers(self, plan):
        """This process's layers of ``plan``, in the order it decomposes them.

        One process: every layer in plan order. Static: this process's share
        in plan order. Dynamic: one layer per step, each claimed when the
        previous one is done, largest predicted cost first.
        """
        if self.schedule == "static":
            for p in plan:
                if self.owner[p.name] == self.rank:
                    self._mine.add(p.name)
                    yield p
            return
        n = len(self.order)
        while True:
            k = int(self._store.add(self._key, 1)) - 1
            if k >= n:
                return
            p = plan[self.order[k]]
            self._mine.add(p.name)
            yield p

    @property
    def active(self):
        """True when the layers are spread over several processes."""
        return self.world_size > 1

    def owns(self, name):
        """Whether this process took layer ``name`` (so far, for the dynamic schedule)."""
        if self.schedule == "static":
            return self.owner[name] == self.rank
        return name in self._mine

    def _exchange(self, payload):
        dist = _dist()
        out = [None] * self.world_size
        dist.all_gather_object(out, (self.signature, payload))
        return out

    def abort(self, exc):
        """Tell the other processes that this one failed (they raise too).

        Call it before re-raising ``exc``; it takes part in the same exchange
        as :meth:`gather`, so no process waits for a result that never comes.
        """
        if not self.active:
            return
        try:  # the other processes must be able to rebuild it, or they get a plain copy
            pickle.loads(pickle.dumps(exc))
            sent = exc
        except Exception:
            sent = RuntimeError(f"{type(exc).__name__}: {exc}"
                                + "".join(f" ({note})" for note in getattr(exc, "__notes__", [])))
        self._exchange(("error", sent))

    def gather(self, rows, new_modules):
        """Every process's rows and modules, in plan order, on every process.

        Parameters
        ----------
        rows : list of dict
            Report rows of this process's layers.
        new_modules : dict
            ``name -> (module, names)`` of this process's layers.

        Returns
        -------
        rows, new_modules
            Over all layers, in the order of the plan; modules on the
            device of the layer they replace.
        """
        if not self.active:
            return rows, new_modules
        sent = {}
        for row in rows:
            mod, names = new_modules[row["name"]]
            if _module_device(mod) != torch.device("cpu"):
                mod = _cpu_copy(mod)
            sent[row["name"]] = (row, mod, names)
        got = self._exchange(("ok", sent))
        for r, (sig, _) in enumerate(got):
            if sig != self.signature:
                raise ValueError(
                    f"process {r} planned other layers than process {self.rank} "
                    "(names, formats, ranks, weights or statistics counts differ); every "
                    "process must call compress with the same model, statistics and "
                    "arguments")
        for r, (_, (status, value)) in enumerate(got):
            if status == "error":
                if r == self.rank:
                    continue
                raise RuntimeError(f"process {r} failed while compressing: "
                                   f"{type(value).__name__}: {value}") from value
        merged, sender = {}, {}
        for r, (_, (_, value)) in enumerate(got):
            for name, entry in value.items():
                if self.schedule == "static" and self.owner.get(name) != r:
                    raise RuntimeError(f"process {r} sent layer {name!r}, which is not its "
                                       "share")
                if name in sender:
                    raise RuntimeError(f"processes {sender[name]} and {r} both sent layer "
                                       f"{name!r}")
                merged[name], sender[name] = entry, r
        if self.schedule == "dynamic":
            self.owner = {name: sender.get(name) for name in self.names}
            self._release()
        missing = [n for n in self.names if n not in merged]
        if missing:
            raise RuntimeError(f"no process returned layers {missing}")
        out_rows, out_modules = [], {}
        for name in self.names:
            row, mod, names = merged[name]
            if name in self._mine:
                mod = new_modules[name][0]  # the local object, untouched
            else:
                mod = mod.to(self.devices[name])
            out_rows.append(row)
            out_modules[name] = (mod, names)
        return out_rows, out_modules


    def _release(self):
        """Drop the claim counter (every process is past its last claim once gathered)."""
        if self.rank == 0:
            try:
                self._store.delete_key(self._key)
            except Exception:  # not every store deletes keys; the key is unique anyway
                pass


def _claim_counter(group, schedule, error=None):
    """``(store, key)`` of a fresh counter in the default group's store, or ``(None, None)``
    (``schedule`` not ``"dynamic"``, or a store some process cannot reach).

    Every process of ``group`` calls it, whatever its ``schedule``: a process whose
    ``schedule`` was refused passes its ``error`` (and raises it afterwards), the others
    then raise a ``RuntimeError`` naming it; processes with different schedules raise a
    ``ValueError``. The key carries a random token drawn by process 0 and broadcast to all,
    so no two calls (nor a restarted job on the same store) share a counter.
    """
    dist = _dist()
    from torch.distributed import distributed_c10d

    store = None
    if error is None and schedule == "dynamic":
        try:
            store = distributed_c10d._get_default_store()
        except Exception:  # no store reachable (an unusual backend or torch version)
            store = None
    token = [secrets.token_hex(8) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)  # every process learns process 0's token
    got = _outcomes(group, "checking the arguments", (schedule, store is not None), error)
    if got is None:  # this process failed: the caller raises its error
        return None, None
    if any(s != got[0][0] for s, _ in got):
        raise ValueError("the processes disagree on the schedule: "
                         + ", ".join(f"process {r} has {s!r}" for r, (s, _) in enumerate(got))
                         + "; every process must make the same call")
    if schedule != "dynamic" or not all(ok for _, ok in got):
        return None, None
    return store, f"sigmadecomp/compress/claims/{token[0]}"


def _module_device(module):
    """Device of a module's first parameter or buffer (CPU when it has none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _cpu_copy(module):
    import copy

    return copy.deepcopy(module).to("cpu")
