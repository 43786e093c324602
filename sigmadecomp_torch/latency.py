"""CPU/GPU latency of layers and models, measured with :mod:`torch.utils.benchmark`.

A factorized layer has fewer multiply-adds than the dense one, but it runs
two or three kernels instead of one and the thin middle convolutions use the
hardware less well, so it is not always faster. :func:`layer_latency` times a
module on an input of a given shape, :func:`measure_latency` times a whole
model on an example input, and :func:`input_shapes` records the input shape
(and memory format) each layer sees in one forward pass.
:func:`sigmadecomp_torch.compress` uses them for ``min_speedup=``: a layer
whose factorized form is not faster than the dense layer by that factor is
kept dense.

Times are medians of :meth:`torch.utils.benchmark.Timer.blocked_autorange`
blocks, in milliseconds, measured under ``torch.no_grad()`` in eval mode at
torch's current number of threads (the model's mode is restored).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.utils import benchmark

from sigmadecomp._validation import is_positive_int_tuple

from ._batches import call_with, check_type, eval_modes

__all__ = ["layer_latency", "measure_latency", "input_shapes", "compare_latency"]


def _check_positive(name, value):
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not value > 0 or value != value or value == float("inf")):
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be a positive, finite "
                         "number of seconds")
    return float(value)


def _check_shape(input_shape):
    """``input_shape`` as a tuple of positive ints, or a clear error naming it."""
    if not is_positive_int_tuple(input_shape):
        raise ValueError(f"input_shape={input_shape!r} is not allowed; input_shape must be a "
                         "non-empty tuple of positive integers, batch first (e.g. "
                         "(1, C, H, W) or (1, n))")
    return tuple(int(s) for s in input_shape)


def _median_ms(fn, min_run_time):
    """Median time of ``fn()`` in ms over blocks of :meth:`Timer.blocked_autorange`."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3


def measure_latency(model, example_input, *, min_run_time=0.2, warmup=1):
    """Median latency of ``model(example_input)`` in milliseconds.

    Parameters
    ----------
    model : torch.nn.Module
        Run in eval mode under ``torch.no_grad()``; its mode is restored.
    example_input : tensor, tuple or dict
        The input batch (``model(x)``, ``model(*x)`` or ``model(**x)``); its
        batch size, size and memory format (e.g. ``channels_last``) are the
        ones timed. Give a ``channels_last`` model and input to time that
        layout.
    min_run_time : float, optional
        Seconds of timing (:meth:`torch.utils.benchmark.Timer.blocked_autorange`);
        at least one block is always run.
    warmup : int, optional
        Untimed calls before timing (allocator, one-time packing).

    Returns
    -------
    float
        Median milliseconds per call at torch's current number of threads.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch.latency import measure_latency
    >>> model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    >>> ms = measure_latency(model, torch.randn(1, 8, 16, 16), min_run_time=0.01)
    >>> 0 < ms < 1e4
    True
    """
    check_type(model, nn.Module, "model")
    min_run_time = _check_positive("min_run_time", min_run_time)
    if not isinstance(warmup, numbers.Integral) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} is not allowed; warmup must be an int >= 0")
    with eval_modes(model), torch.no_grad():
        for _ in range(int(warmup)):
            call_with(model, example_input)
        return _median_ms(lambda: call_with(model, example_input), min_run_time)


def layer_latency(module, input_shape, *, memory_format=torch.contiguous_format,
                  min_run_time=0.1, warmup=1, seed=0):
    """Median latency of ``module`` on a random input of ``input_shape``, in milliseconds.

    Parameters
    ----------
    module : torch.nn.Module
        A layer (dense or factorized); its dtype and device give the input's.
    input_shape : tuple of int
        E.g. ``(batch, C, H, W)`` for a convolution, ``(batch, n)`` for a
        Linear layer.
    memory_format : torch.memory_format, optional
        ``torch.channels_last`` times both the input and the module in that
        layout (on copies; ``module`` is not changed). 4-D inputs only.
    min_run_time, warmup
        As in :func:`measure_latency`.
    seed : int, optional
        Seed of the random input.

    Returns
    -------
    float

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch.latency import layer_latency
    >>> ms = layer_latency(nn.Conv2d(8, 8, 3, padding=1), (1, 8, 16, 16),
    ...                    memory_format=torch.channels_last, min_run_time=0.01)
    >>> 0 < ms < 1e4
    True
    """
    check_type(module, nn.Module, "module")
    shape = _check_shape(input_shape)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed; seed must be a non-negative integer")
    p = next(iter(module.parameters()), None)
    dtype = p.dtype if p is not None else torch.get_default_dtype()
    device = p.device if p is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(shape, generator=g, dtype=dtype, device="cpu").to(device)  # g is a CPU one
    if memory_format is torch.channels_last:
        if len(shape) != 4:
            raise ValueError(f"memory_format=torch.channels_last needs a 4-D input_shape, got "
                             f"{shape}")
        import copy

        module = copy.deepcopy(module).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    elif memory_format is not torch.contiguous_format:
        raise ValueError(f"memory_format={memory_format!r} is not allowed; memory_format must "
                         "be torch.contiguous_format or torch.channels_last")
    return measure_latency(module, x, min_run_time=min_run_time, warmup=warmup)


def compare_latency(dense, factorized, input_shape, *, memory_format=torch.contiguous_format,
                    min_run_time=0.1, rounds=3):
    """``(dense_ms, factorized_ms)``: medians over ``rounds`` interleaved measurements.

    Interleaving the two modules makes a change of the machine's load hit
    both alike.

    Parameters
    ----------
    dense, factorized : torch.nn.Module
        The two modules to time on the same random input.
    input_shape : tuple of int
        Shape of that input, batch first (e.g. ``(1, C, H, W)``).
    memory_format : torch.memory_format, optional
        Layout of the input and the modules' weights, e.g.
        ``torch.channels_last`` (as :func:`layer_latency`).
    min_run_time : float, optional
        Seconds of timing per module and round (``torch.utils.benchmark``).
    rounds : int, optional
        Interleaved rounds; the medians are returned.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch.latency import compare_latency
    >>> conv = nn.Conv2d(16, 16, 3, padding=1)
    >>> thin = nn.Sequential(nn.Conv2d(16, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 16, 1))
    >>> d, f = compare_latency(conv, thin, (1, 16, 8, 8), min_run_time=0.01, rounds=1)
    >>> d > 0 and f > 0
    True
    """
    if not isinstance(rounds, numbers.Integral) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} is not allowed; rounds must be an int >= 1")
    ds, fs = [], []
    for _ in range(int(rounds)):
        ds.append(layer_latency(dense, input_shape, memory_format=memory_format,
                                min_run_time=min_run_time))
        fs.append(layer_latency(factorized, input_shape, memory_format=memory_format,
                                min_run_time=min_run_time))
    ds.sort()
    fs.sort()
    return ds[len(ds) // 2], fs[len(fs) // 2]


def input_shapes(model, example_input, names=None):
    """Input shape and memory format of each ``Conv2d``/``Linear`` in one forward pass.

    Parameters
    ----------
    model : torch.nn.Module
    example_input : tensor, tuple or dict
        One input batch; the pass runs in eval mode without gradients (the
        model's mode is restored).
    names : str or iterable of str, optional
        Only these module names (default: every ``Conv2d`` and ``Linear``);
        each must name a ``Conv2d`` or ``Linear`` of ``model``.

    Returns
    -------
    dict of str to (tuple, torch.memory_format)
        The shape of the first positional input at the module's first call,
        and ``torch.channels_last`` when that input is channels-last
        contiguous (and not plain contiguous), else
        ``torch.contiguous_format``. Modules the pass never calls are absent.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch.latency import input_shapes
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Flatten(), nn.LazyLinear(4))
    >>> shapes = input_shapes(model, torch.randn(2, 3, 9, 9))
    >>> shapes['0'][0], shapes['2'][0]
    ((2, 3, 9, 9), (2, 128))
    """
    check_type(model, nn.Module, "model")
    layers = [n for n, m in model.named_modules(remove_duplicate=False)  # (every name)
              if isinstance(m, (nn.Conv2d, nn.Linear))]
    wanted = None
    if names is not None:
        wanted = {names} if isinstance(names, str) else set(names)
        unknown = sorted((n for n in wanted if n not in layers), key=str)
        if unknown:
            shown = ", ".join(map(repr, layers[:8])) + (", ..." if len(layers) > 8 else "")
            raise ValueError(f"names={names!r} has {unknown}, not a Conv2d or Linear of the "
                             f"model; allowed: {shown or 'none (the model has no such layer)'}")
    seen, handles = {}, []

    def hook(mod, args, _n):
        if _n in seen or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        fmt = torch.contiguous_format
        if (x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            fmt = torch.channels_last
        seen[_n] = (tuple(x.shape), fmt)

    for name, m in model.named_modules(remove_duplicate=False):  # a shared module: each name
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (wanted is None or name in wanted):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, _n=name: hook(mod, args, _n)))
    try:
        with eval_modes(model), torch.no_grad():
            call_with(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return seen


# ------------------------------------------------------ used by compress()


def check_min_speedup(min_speedup, example_input):
    """Validate ``compress``'s ``min_speedup=`` / ``example_input=`` pair; the float or None."""
    if min_speedup is None:
        return None
    if not isinstance(min_speedup, numbers.Real) or isinstance(min_speedup, bool):
        raise TypeError(f"min_speedup={min_speedup!r} is not allowed; min_speedup must be "
                        "None or a number (e.g. 1.0: keep a layer dense unless its "
                        "factorized form is faster)")
    if not min_speedup >= 0 or min_speedup == float("inf"):
        raise ValueError(f"min_speedup={min_speedup!r} is not allowed; min_speedup must be "
                         "None or a finite number >= 0 (e.g. 1.0: keep a layer dense unless "
                         "its factorized form is faster)")
    if example_input is None:
        raise ValueError("min_speedup needs example_input= (one input batch of the model), "
                         "or data= whose first batch gives it, to know the input shape of "
                         "each layer it times")
    return float(min_speedup)


def speedup_verdict(dense, factorized, shape_fmt, min_speedup, *, min_run_time=0.05, rounds=3):
    """``(keep_factorized, dense_ms, factorized_ms)`` for one layer at its input shape."""
    shape, fmt = shape_fmt
    d, f = compare_latency(dense, factorized, shape, memory_format=fmt,
                           min_run_time=min_run_time, rounds=rounds)
    return d >= min_speedup * f, d, f
