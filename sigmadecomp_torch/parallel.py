"""Layer-parallel decomposition over a torch.distributed process group.

:func:`sigmadecomp_torch.compress` decomposes the layers of a model one after
the other; the layers are independent, so under ``torchrun`` (or any
initialized process group of more than one process) each process can take a
share of them. This module decides the shares and exchanges the results:

* :func:`layer_cost` predicts the floating-point work of one layer's
  decomposition from its shape, format and ranks (a rough count: only the
  ratios between layers matter);
* :func:`assign` balances the layers over the processes by the greedy
  longest-processing-time rule (largest predicted cost first, each to the
  least loaded process);
* :class:`LayerShard` tells the decomposition loop which layers are this
  process's and, once every process is done, gathers every built module and
  report row with ``torch.distributed.all_gather_object``, so that every
  process returns the same model and report as one process would.

The built modules travel as pickled modules (their tensors moved to the CPU
for the exchange and back to the layer's device after it), so the weights are
bit-identical to the ones the owning process computed; the solvers are
deterministic, hence equal to the one-process result computed with the same
thread settings.
"""

from __future__ import annotations

import math
import pickle

import torch

__all__ = ["layer_cost", "assign", "resolve_group", "LayerShard"]


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


def layer_cost(shape, fmt, ranks, options, weighted):
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

        return base + cp_flop(shape, ranks, options, weighted)
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

    With one process every layer is this process's and :meth:`gather`
    returns its arguments unchanged.
    """

    def __init__(self, plan, options, distributed):
        group = resolve_group(distributed)
        self.rank, self.world_size = group if group is not None else (0, 1)
        self.names = [p.name for p in plan]
        self.devices = {p.name: p.module.weight.device for p in plan}
        # what every process must agree on: same layers, formats and ranks
        self.signature = [(p.name, p.method, p.ranks, tuple(p.module.weight.shape))
                          for p in plan]
        if self.world_size > 1:
            costs = [layer_cost(tuple(p.module.weight.shape), p.method, p.ranks, options,
                                p.sigma is not None) for p in plan]
            owner = assign(costs, self.world_size)
        else:
            owner = [0] * len(plan)
        self.owner = dict(zip(self.names, owner))

    @property
    def active(self):
        """True when the layers are spread over several processes."""
        return self.world_size > 1

    def owns(self, name):
        """Whether this process decomposes layer ``name``."""
        return self.owner[name] == self.rank

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
        try:
            pickle.dumps(exc)
            sent = exc
        except Exception:
            sent = RuntimeError(f"{type(exc).__name__}: {exc}")
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
                    "(names, formats, ranks or shapes differ); every process must call "
                    "compress with the same model, statistics and arguments")
        for r, (_, (status, value)) in enumerate(got):
            if status == "error":
                if r == self.rank:
                    continue
                raise RuntimeError(f"process {r} failed while compressing: "
                                   f"{type(value).__name__}: {value}") from value
        merged = {}
        for r, (_, (_, value)) in enumerate(got):
            for name, entry in value.items():
                if self.owner.get(name) != r:
                    raise RuntimeError(f"process {r} sent layer {name!r}, which is not its "
                                       "share")
                merged[name] = entry
        missing = [n for n in self.names if n not in merged]
        if missing:
            raise RuntimeError(f"no process returned layers {missing}")
        out_rows, out_modules = [], {}
        for name in self.names:
            row, mod, names = merged[name]
            if self.owner[name] == self.rank:
                mod = new_modules[name][0]  # the local object, untouched
            else:
                mod = mod.to(self.devices[name])
            out_rows.append(row)
            out_modules[name] = (mod, names)
        return out_rows, out_modules


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
