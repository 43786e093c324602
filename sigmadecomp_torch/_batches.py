"""Running a model on the batches of a calibration set (shared by the statistics collectors).

The rules of :func:`sigmadecomp_torch.collect_covariances` for what a batch
is -- a tensor, ``(inputs,)`` / ``(inputs, targets)``, a mapping of keyword
arguments, or anything with a user ``forward`` -- and for token masks live
here, so that every pass over calibration data (one-shot and sequential
statistics) reads batches the same way. Private module; the names are public
within the package.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Iterable, Mapping

import torch

from sigmadecomp.contract import user_stacklevel  # (one rule for the core and the adapter)

__all__ = ["batch_mask", "check_materialized", "check_not_meta", "check_pass_options",
           "describe_item", "eval_modes", "model_device", "progress_bar", "run_batch", "to_device",
           "user_stacklevel"]


def outside_inference_mode(fn):
    """``fn`` run outside ``torch.inference_mode`` (under ``torch.no_grad``) when called in it.

    The models a function of the package returns must train: tensors created under
    inference mode (a deep copy, the factors of a new layer) cannot take part in
    autograd afterwards. The passes inside set their own grad mode as before.
    A call with ``inplace=True`` on a model that holds inference tensors stays in
    inference mode: only there can they be written, and such a model cannot train
    whatever is done. (Warnings raised inside name the caller's line with
    :func:`user_stacklevel`, not this wrapper's.)
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_inference_mode_enabled() or (
                kwargs.get("inplace") is True
                and _holds_inference_tensors(args[0] if args else kwargs.get("model"))):
            return fn(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def _holds_inference_tensors(model):
    return isinstance(model, torch.nn.Module) and any(
        t.is_inference() for t in (*model.parameters(), *model.buffers()))




@contextlib.contextmanager
def eval_modes(*models):
    """Every module of ``models`` in eval mode inside the block; afterwards each module
    gets its own mode back (a model may mix training and eval submodules)."""
    modes = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def check_not_nested(x, name):
    """Refuse a nested (packed, ragged) tensor input of layer ``name`` with the way out."""
    if getattr(x, "is_nested", False):
        raise ValueError(
            f"layer {name!r} received a nested tensor (nn.TransformerEncoder packs padded "
            "sequences into one when enable_nested_tensor=True and a src_key_padding_mask "
            "is given); statistics need plain tensors: build the encoder with "
            "enable_nested_tensor=False (the same outputs), the token mask then keeps "
            "padded positions out of the statistics")


def match_token_rows(x, mask):
    """``(rows, how)``: the rows of a Linear input ``x`` (..., features) kept by a token
    ``mask`` of shape (batch, seq), and how the mask was matched to ``x``.

    ``how`` is None when the mask does not apply (``x`` returned unchanged), else:

    * ``"batch_first"``: the leading dimensions of ``x`` start with the mask's shape,
      ``(batch, seq, ..., features)`` (e.g. ``(batch, seq, heads, features)``);
    * ``"square"``: the same, with a square mask of more than one token (batch size =
      sequence length), so ``x`` could as well be sequence-first; applied as
      (batch, seq);
    * ``"seq_first"``: ``x`` is ``(seq, batch, ..., features)`` (non-square mask);
    * ``"flattened"``: ``x`` is 2-D with ``mask.numel()`` rows, the tokens flattened
      before the layer (``h.reshape(-1, d)``); row ``i`` is taken as the ``i``-th entry
      of the mask in its row-major order, i.e. ``(batch, seq)`` rows as a batch-first
      model flattens them (a sequence-first model flattens ``(seq, batch)``: give it a
      mask of that shape).

    Examples
    --------
    >>> import torch
    >>> from sigmadecomp_torch._batches import match_token_rows
    >>> mask = torch.tensor([[True, True, False], [True, False, False]])
    >>> [(tuple(r.shape), how) for r, how in (
    ...     match_token_rows(torch.ones(2, 3, 4), mask),
    ...     match_token_rows(torch.ones(3, 2, 4), mask),
    ...     match_token_rows(torch.ones(2, 3, 5, 4), mask),
    ...     match_token_rows(torch.ones(6, 4), mask),
    ...     match_token_rows(torch.ones(2, 4), mask))]
    [((3, 4), 'batch_first'), ((3, 4), 'seq_first'), ((3, 5, 4), 'batch_first'), \
((3, 4), 'flattened'), ((2, 4), None)]
    """
    if mask is None or mask.ndim == 0 or x.ndim < 2:
        return x, None
    lead = tuple(x.shape[:-1])
    if lead == tuple(mask.shape) or (mask.ndim == 2 and lead[:2] == tuple(mask.shape)):
        square = x.ndim >= 3 and mask.ndim == 2 and mask.shape[0] == mask.shape[1] > 1
        return x[mask.to(x.device)], "square" if square else "batch_first"
    if mask.ndim != 2:  # (only a (batch, seq) mask is matched further)
        return x, None
    if x.ndim >= 3 and mask.shape[0] != mask.shape[1] and lead[:2] == tuple(mask.shape[::-1]):
        return x.transpose(0, 1)[mask.to(x.device)], "seq_first"  # sequence first
    if x.ndim == 2 and x.shape[0] == mask.numel():  # tokens flattened
        return x[mask.reshape(-1).to(x.device)], "flattened"
    return x, None


def token_rows(x, mask):
    """``(rows, used, square)``: the rows of a Linear input ``x`` kept by a token ``mask``
    (matched as :func:`match_token_rows` says), whether the mask applied, and whether it
    was ambiguous (square, more than one token: applied as (batch, seq)). Without a
    matching mask ``x`` is returned unchanged."""
    rows, how = match_token_rows(x, mask)
    return rows, how is not None, how == "square"


def warn_flattened_order(seq_first, flattened):
    """Warn when one pass matched a token mask both sequence-first (layer ``seq_first``)
    and to flattened tokens (layer ``flattened``): the flattened rows were read in the
    mask's (batch, seq) order, which a sequence-first model does not use. Either name None:
    no warning."""
    if seq_first is None or flattened is None:
        return
    warnings.warn(f"layer {seq_first!r} reads its tokens sequence-first (seq, batch, "
                  f"features), but layer {flattened!r} reads them flattened to 2-D rows, "
                  "to which the token mask was applied in its (batch, seq) order; if the "
                  "model flattens (seq, batch) tokens, pass mask=lambda b: <mask>.T so "
                  "that the mask has the model's token layout", RuntimeWarning,
                  stacklevel=user_stacklevel())


def warn_mask_use(square, given, used):
    """The warnings of a pass with token masks: ``square`` is ``(layer, shape)`` of the first
    ambiguous square mask or None; ``given``/``used``: whether a mask was given / applied."""
    if square is not None:
        name, shape = square
        warnings.warn(f"the token mask of a batch is square {shape} (batch size = sequence "
                      f"length), so it cannot tell whether layer {name!r} reads (batch, seq, "
                      "features) or (seq, batch, features); it was applied as (batch, seq). "
                      "For a sequence-first model pass mask=lambda b: <mask>.T, or use a "
                      "batch size other than the sequence length", RuntimeWarning,
                      stacklevel=user_stacklevel())
    if given and not used:
        warnings.warn("a token mask was given but no chosen Linear layer had an input of "
                      "the mask's shape; the statistics use every row", RuntimeWarning,
                      stacklevel=user_stacklevel())


def describe_item(v):
    import numpy as np

    if isinstance(v, np.ndarray):
        return f"{v.dtype} NumPy array {tuple(v.shape)}"
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')} tensor {tuple(v.shape)}"
    return type(v).__name__


def _from_numpy(v):
    """A NumPy array as a tensor (its memory shared when possible); anything else as it is."""
    import numpy as np

    return torch.as_tensor(v) if isinstance(v, np.ndarray) else v


def to_device(v, device):
    v = _from_numpy(v)
    if isinstance(v, torch.Tensor):
        if v.is_meta:
            raise ValueError("the batch holds a tensor on the meta device (no data); "
                             "statistics need real inputs")
        return v.to(device)
    return v


def call_with(model, example_input):
    """``model`` called on an example input: a tuple/list as positional arguments, a
    mapping (a dict, a Hugging Face ``BatchEncoding``) as keyword arguments, else as the
    one argument."""
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, Mapping):
        return model(**example_input)
    return model(example_input)


def batch_inputs(batch, device):
    """The model's input in ``batch`` by the documented batch rules, on ``device``: the
    tensor itself, the mapping of keyword arguments (as a dict), or the inputs of an
    ``(inputs,)`` / ``(inputs, targets)`` tuple; None for any other batch. NumPy arrays
    count as tensors."""
    batch = _from_numpy(batch)
    if isinstance(batch, torch.Tensor):
        return to_device(batch, device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and batch:
        first = _from_numpy(batch[0])
        if isinstance(first, torch.Tensor) and (
                len(batch) == 1 or (len(batch) == 2 and first.is_floating_point())):
            return to_device(first, device)
    return None


def run_batch(model, batch, index, device, forward):
    """Run ``model`` on one batch by the documented rules (see collect_covariances)."""
    if forward is not None:
        return forward(model, batch)
    inputs = batch_inputs(batch, device)
    if inputs is not None:
        if isinstance(inputs, dict):
            _check_keywords(model, inputs, index)
            return model(**inputs)
        return model(inputs)
    if (isinstance(batch, (tuple, list)) and batch
            and isinstance(_from_numpy(batch[0]), torch.Tensor)):
        items = ", ".join(describe_item(v) for v in batch)
        raise TypeError(
            f"batch {index} is a {type(batch).__name__} of {len(batch)} items ({items}); "
            "only (inputs,) and (inputs, targets) with floating-point inputs are taken "
            "apart automatically (the model gets the inputs, the targets are not used). "
            "Running the model on the first item alone would drop the others: pass "
            "forward=lambda model, batch: model(*batch) (or whatever call the model "
            "needs), or use dict batches, which run as model(**batch)"
        )
    raise TypeError(
        f"batch {index} of type {type(batch).__name__} is not allowed; each batch must "
        "be a tensor, a tuple/list (inputs,) or (inputs, targets), or a mapping of "
        "keyword arguments; for anything else pass forward=f(model, batch)"
    )


def _check_keywords(model, inputs, index):
    """Refuse a mapping batch whose keys ``model.forward`` does not take, before running it:
    the model's own TypeError would not say that the batch ran as ``model(**batch)``."""
    import inspect

    if getattr(model, "_forward_pre_hooks", None):  # hooks may rewrite the keywords first
        return
    try:
        inspect.signature(model.forward).bind(**inputs)
    except TypeError as e:  # the keys do not fit the signature
        raise TypeError(
            f"batch {index} is a mapping with keys {sorted(inputs)}, which runs as "
            f"model(**batch), but {type(model).__name__}.forward() does not take it: {e}; "
            "pass forward= to say how to call the model, e.g. forward=lambda model, batch: "
            "model(batch['<input key>'])") from None
    except ValueError:  # no signature to read (a builtin): let the call decide
        pass


def batch_mask(mask, batch, index, device):
    """The token mask of one batch (bool tensor) or None."""
    if mask is None:
        return None
    if mask == "auto":
        if not isinstance(batch, Mapping) or "attention_mask" not in batch:
            return None
        m, what = batch["attention_mask"], "batch['attention_mask']"
    else:
        m, what = mask(batch), "mask(batch)"
    m = _from_numpy(m)
    if m is None:
        return None
    if isinstance(m, torch.Tensor) and m.is_meta:
        raise ValueError(f"{what} of batch {index} is on the meta device (shapes only, no "
                         "values); the token mask needs real values (True/nonzero = a real "
                         "token)")
    if not isinstance(m, torch.Tensor) or m.is_complex():
        raise TypeError(f"{what} of batch {index} is a {describe_item(m)}; the token mask "
                        "must be a real-valued tensor (True/nonzero = a real token)")
    if m.dtype != torch.bool and m.numel() and not bool(((m == 0) | (m == 1)).all()):
        bad = m[(m != 0) & (m != 1)].reshape(-1)[0].item()
        raise ValueError(
            f"{what} of batch {index} holds the value {bad!r}; a token mask holds 0/1 or "
            "True/False (1 = a real token). An additive attention mask (0 for a real "
            "token, a large negative number for padding) is not one: pass "
            "mask=lambda b: b['attention_mask'] == 0 (or mask=None for no mask)")
    return m.to(device) != 0


def check_type(value, kind, name, what="a torch.nn.Module"):
    """Refuse ``value`` unless it is an instance of ``kind``, naming the argument ``name``
    and what it must be (by default a module: the first check of most entry points)."""
    if not isinstance(value, kind):
        raise TypeError(f"{name} of type {type(value).__name__} is not allowed; {name} must "
                        f"be {what}")


def check_device(device, name):
    """``device`` (a ``torch.device``, a string such as ``'cpu'`` or an index) as a
    ``torch.device`` that exists and is available here, or an error naming the
    argument ``name``; checked before any data or file is read. ``'meta'`` passes (the
    passes over data refuse it with their own message)."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{name}={device!r} is not allowed; {name} must be a torch.device, "
                        "a string such as 'cpu' or a device index")
    try:
        out = torch.device(device)
        if out.type != "meta":
            torch.empty(0, device=out)  # it exists and is available here
    except Exception as e:  # noqa: BLE001 - any failure means an unusable device
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{name}={device!r} is not allowed: that device is not available "
                         f"({type(e).__name__}: {detail})") from None
    return out


def model_device(model):
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _visible():
    """Whether a progress bar can be seen: stderr is a terminal, or the code runs in a
    Jupyter kernel (whose stderr is no terminal; ``tqdm.auto`` draws a widget there). A log
    file or a pipe gets no bar."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        if isatty is not None and isatty():
            return True
    except ValueError:  # (a closed stream)
        return False
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # anything else that calls itself IPython: no bar
        return False


def progress_bar(iterable, *, total, enabled, desc):
    if not enabled or not _visible():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the extra
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def as_batches(data):
    """``data`` as an iterable of batches: a tensor, a NumPy array or a mapping is one batch
    (not its rows or keys); a string or anything not iterable is refused (named error)."""
    import numpy as np

    if isinstance(data, (torch.Tensor, Mapping, np.ndarray)):
        return [data]
    # (without calling iter: that would start a DataLoader's worker processes)
    iterable = isinstance(data, Iterable) or hasattr(type(data), "__getitem__")
    if isinstance(data, (str, bytes)) or not iterable:
        raise TypeError(f"data of type {type(data).__name__} is not allowed; data must be a "
                        "tensor or an iterable of batches (a list, a DataLoader, a generator)")
    return data


def check_materialized(model, who="statistics need"):
    """Refuse lazy modules whose parameters have no shape yet (``nn.LazyLinear`` before its
    first call)."""
    from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

    for what, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for n, t in items:
            if isinstance(t, (UninitializedParameter, UninitializedBuffer)):
                raise ValueError(
                    f"model has the uninitialized {what} {n!r} of a lazy module (e.g. "
                    f"nn.LazyLinear): {who} its shape; run the model once on an example "
                    "input (model(x)) so that lazy modules create their weights")


def check_not_meta(model, who="statistics need"):
    """Refuse a model with any parameter or buffer on the meta device (``who``: what needs
    real weights, as in :func:`check_materialized`)."""
    check_materialized(model, who)
    for what, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for n, t in items:
            if t.is_meta:
                raise ValueError(
                    f"model has its {what} {n!r} on the meta device (shapes only, no "
                    f"values); {who} a model with real weights: materialise it "
                    "first, e.g. model.to_empty(device='cpu') then "
                    "model.load_state_dict(...)"
                )


def check_pass_options(*, forward, mask, max_batches=None, chunk_bytes=None):
    """Validate the options every pass over calibration data shares (named errors);
    ``chunk_bytes`` None: not an option of the caller."""
    if max_batches is not None and (isinstance(max_batches, bool)
                                    or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r} is not allowed; max_batches must be "
                         "None or a positive integer")
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool)
                                    or not isinstance(chunk_bytes, int) or chunk_bytes < 1):
        raise ValueError(f"chunk_bytes={chunk_bytes!r} is not allowed; chunk_bytes must be "
                         "a positive integer")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward={forward!r} is not allowed; forward must be None or a "
                        "callable forward(model, batch)")
    if not (mask is None or callable(mask) or (isinstance(mask, str) and mask == "auto")):
        raise ValueError(f"mask={mask!r} is not allowed; mask must be 'auto', None or a "
                         "callable mask(batch) -> bool tensor")
