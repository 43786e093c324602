"""Which layers of a model :func:`sigmadecomp_torch.compress` may replace, and why not others.

The first step of the pipeline: the default choice of layers
(:func:`default_layers`), the modules listed as skipped with their reason
(first/last layer, kinds no factorized layer stands in for), and the
obstacles that keep a chosen layer dense (grouped convolution, overridden
``forward``, parametrization, forward or backward hooks, tied weights, a parent
that reads the layer's weight directly).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Mapping

import torch
from torch import nn

from ._batches import call_with, check_type, eval_modes

__all__ = ["default_layers", "dense_reasons", "module_kind", "module_names", "obstacle",
           "param_owners", "held_outside", "default_exclusions", "unsupported_modules",
           "n_params", "SUPPORTED"]


def module_kind(module):
    """A layer's kind as the report shows it: ``'Linear'``, ``'Conv2d 3x3'``, ``'Conv2d 3x3 g4'``."""
    if isinstance(module, nn.Linear):
        return "Linear"
    kh, kw = module.kernel_size
    g = f" g{module.groups}" if module.groups != 1 else ""
    return f"Conv2d {kh}x{kw}{g}"


def n_params(module):
    """Parameters of a module (bias included)."""
    return int(sum(p.numel() for p in module.parameters()))


#: The module types a factorized layer stands in for.
SUPPORTED = (nn.Conv2d, nn.Linear)


class CallOrder:
    """What one forward pass shows about the layers: ``layers=None`` in this form.

    :func:`sigmadecomp_torch.compress` passes the default choice on in this
    form when it has an input batch (``data=`` or ``example_input=``), so
    that the first and last layers left alone are found in the pass, not
    in the order of registration, in every step (statistics, selection,
    report).

    Attributes
    ----------
    order : tuple of str
        The Conv2d/Linear names in the order the pass first called them.
    readers : tuple of str
        Those whose input is one of the model's input tensors.
    producers : tuple of str
        Those whose output is one of the model's output tensors.
    siblings : tuple of str
        The first layer called and every layer reading the same input tensor
        (``q``/``k``/``v`` after an embedding): the first layers when none
        reads the model's input.
    """

    __slots__ = ("order", "readers", "producers", "siblings")

    def __init__(self, order, readers=(), producers=(), siblings=()):
        self.order, self.readers, self.producers = tuple(order), tuple(readers), tuple(producers)
        self.siblings = tuple(siblings)

    def __bool__(self):
        return bool(self.order)

    def __repr__(self):
        return (f"CallOrder({list(self.order)}, readers={list(self.readers)}, "
                f"producers={list(self.producers)})")


def _tensors(obj, out):
    """The tensors in ``obj`` (nested tuples, lists, dicts and dataclass instances, e.g. a
    model's output record) by id."""
    if isinstance(obj, torch.Tensor):
        out[id(obj)] = obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _tensors(v, out)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _tensors(v, out)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _tensors(getattr(obj, f.name, None), out)
    return out


def _call_order(model, example_input, run=None):
    """A :class:`CallOrder` of one forward pass (in eval mode, without gradients).

    ``run(model)`` performs the pass; by default ``model(example_input)``
    (``model(*x)`` for a tuple or list, ``model(**x)`` for a dict). The modes
    of all modules are restored afterwards.
    """
    order, readers, outputs, inputs, handles = [], [], [], {}, []
    first_input, siblings = [], []  # the first layer's input tensor; the layers reading it

    def on_model_input(mod, args, kwargs):
        _tensors((args, kwargs), inputs)

    def on_layer_input(name, args):
        x = args[0] if args else None
        if name not in order:
            order.append(name)
            if not first_input:
                first_input.append(x)
            if x is not None and x is first_input[0]:
                siblings.append(name)
        if name not in readers and args and id(args[0]) in inputs and inputs[id(args[0])] is args[0]:
            readers.append(name)

    def on_layer_output(name, out):
        outputs.append((name, out))

    handles.append(model.register_forward_pre_hook(on_model_input, with_kwargs=True))
    for name, m in model.named_modules():
        if isinstance(m, SUPPORTED):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, _n=name: on_layer_input(_n, args)))
            handles.append(m.register_forward_hook(
                lambda mod, args, out, _n=name: on_layer_output(_n, out)))
    try:
        with eval_modes(model), torch.no_grad():
            result = run(model) if run is not None else call_with(model, example_input)
    finally:
        for h in handles:
            h.remove()
    returned = _tensors(result, {})
    producers = []
    for name, out in outputs:
        if (isinstance(out, torch.Tensor) and returned.get(id(out)) is out
                and name not in producers):
            producers.append(name)
    return CallOrder(order, readers, producers, siblings)


def default_layers(model, *, include_first=False, include_last=False, example_input=None):
    """The layers :func:`compress` factorizes when ``layers=None``.

    Every ``nn.Conv2d`` and ``nn.Linear`` of the model except the first one
    in module order (the layer reading the model's input, e.g. the stem conv:
    few input channels, little to gain and the most sensitive) and the last
    one (the output layer, e.g. the classifier: cutting it to a low rank
    removes directions the decision needs). This is the choice of Kalle et al.
    (2025), who leave the first layer and the classifier alone. "First" and
    "last" follow the order in which the modules were registered
    (``model.named_modules()``), which is the order of execution in
    sequential models; give ``example_input`` (or name the layers in
    ``layers=``) where it is not. :func:`compress` runs that pass on the
    first batch of its ``data`` (or its ``example_input``) when it has one.

    A bare ``nn.Conv2d`` or ``nn.Linear`` given as the model is its own only
    layer: ``['']``.

    Parameters
    ----------
    model : torch.nn.Module
    include_first, include_last : bool, optional
        Keep the first (resp. last) layer in the list.
    example_input : tensor, tuple or dict, optional
        One input batch (``model(x)``, ``model(*x)`` or ``model(**x)``), run
        once in eval mode without gradients (every module's mode is
        restored). The first layers are then those that read one of the
        model's input tensors (several stems, say), or else the first one
        the pass calls; the last layers those whose output the model returns
        (several heads), or else the last one called. Layers the pass never
        calls stay in the list.

    Returns
    -------
    list of str
        Dotted names in model order. Layers that cannot be factorized
        (grouped convs, ...) are included; :func:`compress` skips them with
        a reason.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import default_layers
    >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3),
    ...                       nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(32, 10))
    >>> default_layers(model)
    ['2', '3']
    >>> default_layers(model, include_first=True)
    ['0', '2', '3']
    >>> default_layers(model, example_input=torch.randn(1, 3, 5, 5))
    ['2', '3']
    >>> class TwoHeads(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = nn.Linear(8, 8)
    ...         self.head_a, self.head_b = nn.Linear(8, 2), nn.Linear(8, 3)
    ...         self.stem = nn.Linear(4, 8)   # registered last, runs first
    ...     def forward(self, x):
    ...         h = torch.relu(self.body(torch.relu(self.stem(x))))
    ...         return self.head_a(h), self.head_b(h)
    >>> default_layers(TwoHeads())
    ['head_a', 'head_b']
    >>> default_layers(TwoHeads(), example_input=torch.randn(2, 4))
    ['body']
    """
    check_type(model, nn.Module, "model")
    if isinstance(model, SUPPORTED):
        return [""]
    order = _call_order(model, example_input) if example_input is not None else None
    return _default_names(model, order, include_first, include_last)


def _ends(model, order):
    """``(names, firsts, lasts)``: the Conv2d/Linear names in module order, the first
    layers and the last ones. With a :class:`CallOrder`: the layers reading one of the
    model's input tensors (else the first called) and those whose output the model
    returns (else the last called); without, the first and last registered."""
    names = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED)]
    if order is None:
        return names, names[:1], names[-1:]
    called = [n for n in order.order if n in names]
    if not called:
        return names, [], []
    firsts = ([n for n in order.readers if n in names]
              or [n for n in getattr(order, "siblings", ()) if n in names] or called[:1])
    lasts = [n for n in order.producers if n in names] or called[-1:]
    return names, firsts, lasts


def _default_names(model, order=None, include_first=False, include_last=False):
    if isinstance(model, SUPPORTED):  # a bare layer is its own only candidate
        return [""]
    names, firsts, lasts = _ends(model, order)
    return [n for n in names if (include_first or n not in firsts)
            and (include_last or n not in lasts)]


def default_exclusions(model, order=None):
    """Skipped rows for the layers :func:`default_layers` leaves out (found in one forward
    pass when ``order``, a :class:`CallOrder`, is given)."""
    if isinstance(model, SUPPORTED):
        return []
    names, firsts, lasts = _ends(model, order)
    kinds = {n: module_kind(m) for n, m in model.named_modules() if isinstance(m, SUPPORTED)}
    reads = order is None or any(n in order.readers for n in firsts)
    what = ("reads the model's input" if reads else
            "the first the forward pass calls, or one reading the same input; no Conv2d/Linear "
            "reads the model's input")
    if order is None and firsts:
        before = _embedding_before(model, firsts[0])
        if before is not None:
            what = (f"the first Conv2d/Linear registered; it may not read the model's input, "
                    f"since the embedding {before!r} is registered before it: give data= or "
                    "example_input= to find the first layers in a forward pass")
    out = [{"name": n, "kind": kinds[n],
            "reason": f"first layer ({what}): left alone by default; "
                      "name it in layers= to compress it"} for n in firsts]
    out += [{"name": n, "kind": kinds[n],
             "reason": "last layer (the model's output, e.g. the classifier): left "
                       "alone by default; name it in layers= to compress it"}
            for n in lasts if n not in firsts]
    return out


def _embedding_before(model, name):
    """The name of an ``nn.Embedding``/``nn.EmbeddingBag`` registered before the layer
    ``name`` (a model that starts from token ids), or None."""
    for path, mod in model.named_modules():
        if path == name:
            return None
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            return path
    return None


def unsupported_modules(model):
    """Skipped rows for what no factorized layer stands in for: conv-like modules other than
    Conv2d, ``nn.MultiheadAttention``'s bare q/k/v projection parameters, and 4-D parameters
    (of a leading size above 1) held outside a convolution module, e.g. a kernel applied with
    ``torch.nn.functional.conv2d``."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            reason = "transposed convolutions are not factorized (only Conv2d and Linear)"
        elif isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.Conv2d):
            reason = (f"{type(m).__name__} layers are not factorized (only Conv2d and Linear); "
                      "a Conv1d/Conv3d can be rewritten as a Conv2d/Linear by the user")
        elif isinstance(m, nn.Bilinear):
            reason = "Bilinear layers are not factorized (only Conv2d and Linear)"
        else:
            continue
        out.append({"name": name, "kind": type(m).__name__, "reason": reason})
    # attention's q/k/v projection held as a bare parameter, not as Linear modules
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.MultiheadAttention):
            continue
        for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            p = getattr(mod, attr, None)
            if not isinstance(p, nn.Parameter):
                continue
            out.append({"name": f"{path}.{attr}" if path else attr,
                        "kind": f"Parameter {tuple(p.shape)}",
                        "reason": (f"the q/k/v projection of MultiheadAttention is the bare "
                                   f"parameter {attr}, not an nn.Linear: it is not factorized "
                                   "(an attention with q/k/v nn.Linear layers can be)")})
    # a convolution weight kept as a parameter of another module and applied with
    # torch.nn.functional.conv2d: there is no module a factorized layer could replace
    seen = {id(p) for mod in model.modules() if isinstance(mod, nn.modules.conv._ConvNd)
            for p in mod.parameters()}  # a conv's own, parametrizations' originals included
    for path, mod in model.named_modules():
        for attr, p in mod._parameters.items():
            # (a leading 1 is a broadcast shape: a positional embedding or a scale)
            if p is None or p.dim() != 4 or p.shape[0] == 1 or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{path}.{attr}" if path else attr
            out.append({"name": name, "kind": f"Parameter {tuple(p.shape)}",
                        "reason": (f"a 4-D parameter of {type(mod).__name__}, not of an nn.Conv2d "
                                   "(a convolution weight applied with "
                                   "torch.nn.functional.conv2d?): only Conv2d and Linear modules "
                                   "are factorized; hold it in an nn.Conv2d to compress it")})
    return out


# -------------------------------------------------------- surgery obstacles


_READ = re.compile(
    r"(?:\.\s*([A-Za-z_]\w*)|\[\s*(-?\d+)\s*\]|\[\s*['\"](\w+)['\"]\s*\])"
    r"\s*\.\s*(?:weight|bias)\b"
    # getattr(self.conv, 'weight'), getattr(self.convs[0], "bias")
    r"|getattr\(\s*[\w.]*?(?:\.\s*([A-Za-z_]\w*)|\[\s*(-?\d+)\s*\]"
    r"|\[\s*['\"](\w+)['\"]\s*\])\s*,\s*['\"](?:weight|bias)['\"]")
#: A weight/bias read through a local name (``for layer in self.layers: layer.weight``,
#: ``conv = self.conv; conv.weight``, ``getattr(layer, 'weight')``): which child it is
#: cannot be told from the source.
_READ_LOCAL = re.compile(r"(?<![\w.\])])\b(?!self\b)([A-Za-z_]\w*)\s*\.\s*(?:weight|bias)\b"
                         r"|getattr\(\s*(?!self\s*,)([A-Za-z_]\w*)\s*,\s*['\"](?:weight|bias)['\"]")
#: Methods whose reads through a local name count (where a module computes its output).
_FORWARD_METHODS = frozenset({"forward", "_forward", "__call__"})
_SETUP_METHODS = frozenset({"__init__", "reset_parameters", "_reset_parameters",
                            "init_weights", "_init_weights", "extra_repr", "__repr__",
                            "__setstate__"})


@functools.lru_cache(maxsize=None)
def _children_read_by(cls):
    """``{child name: 'Class.method'}`` of children whose weight/bias ``cls`` reads.

    Found in the source of the class's methods and properties
    (``self.out_proj.weight``, ``layer.linear1.bias``, ``self.head[0].weight``,
    ``self.convs['a'].weight``, ``getattr(self.conv, 'weight')``), set-up
    methods excluded. Reads in ``forward`` (and the methods of the class it calls)
    through a local name (``layer.weight`` in ``for layer in self.layers``) or by
    a plain function it calls are keyed
    ``'*child'`` (every layer below that child) or ``'*'`` (every layer below
    the module) when the source does not say which child.
    """
    sources = []  # (class, attribute, function, source)
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object or not issubclass(klass, nn.Module):
            continue
        for attr, value in vars(klass).items():
            if attr in _SETUP_METHODS:
                continue
            # methods, static/class methods and the accessors of properties
            fns = ([value.fget, value.fset, value.fdel] if isinstance(value, property)
                   else [getattr(value, "__func__", value)])
            for fn in fns:
                if not inspect.isfunction(fn):
                    continue
                try:
                    sources.append((klass, attr, fn, inspect.getsource(fn)))
                except (OSError, TypeError):
                    continue
    # where the output is computed: forward and the methods of its own it calls
    computing = set(_FORWARD_METHODS)
    for _, attr, _, src in sources:
        if attr in _FORWARD_METHODS:
            computing.update(re.findall(r"\bself\s*\.\s*(\w+)\s*\(", src))
    computing -= _SETUP_METHODS
    found = {}
    for klass, attr, fn, src in sources:
        where = f"{klass.__name__}.{attr}"
        for m in _READ.finditer(src):
            found.setdefault(next(g for g in m.groups() if g is not None), where)
        if attr in computing:
            for m in _READ_LOCAL.finditer(src):
                local = m.group(1) or m.group(2)
                found.setdefault(_ANY_CHILD + _bound_to(src, local),
                                 f"{where}, through the local name {local!r}")
            for key, helper in _read_by_helpers(fn, src):
                found.setdefault(key, f"{where}, through {helper}()")
    return found


_CALL = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)")


def _read_by_helpers(fn, src):
    """``[(key, helper name)]``: plain functions of the user's code that ``src`` (the source
    of ``fn``) calls and that read a ``weight``/``bias`` of an argument; the key is
    ``'*child'`` for each ``self.child`` passed to it, else ``'*'``."""
    out = []
    for m in _CALL.finditer(src):
        helper = fn.__globals__.get(m.group(1))
        if (not inspect.isfunction(helper) or helper is fn
                or (helper.__module__ or "").split(".")[0] == "torch"):
            continue
        try:
            body = inspect.getsource(helper)
        except (OSError, TypeError):
            continue
        if not _READ_LOCAL.search(body) and not _READ.search(body):
            continue
        children = re.findall(r"\bself\s*\.\s*(\w+)(?!\w|\s*\()", m.group(2))  # (not calls)
        out += [(_ANY_CHILD + c, m.group(1)) for c in children] or [(_ANY_CHILD, m.group(1))]
    return out


#: The key of :func:`_children_read_by` for reads that may concern any descendant
#: (``'*'``), or any descendant of one child (``'*layers'``).
_ANY_CHILD = "*"


def _bound_to(src, local):
    """The child ``local`` is taken from in ``src`` (``for local in self.layers``,
    ``local = self.conv``), when every binding of it names the same one; else ``''``."""
    name = re.escape(local)
    bindings = re.findall(
        rf"\bfor\s+(?:\w+\s*,\s*)?{name}\s+in\s+(?:enumerate\(\s*)?self\.(\w+)\s*\)?\s*:"
        rf"|\b{name}\s*=\s*self\.(\w+)\s*(?:\[[^\]]*\])?\s*$", src, flags=re.M)
    children = {a or b for a, b in bindings}
    others = len(re.findall(rf"\bfor\s+[\w\s,]*\b{name}\b[\w\s,]*\bin\b"
                            rf"|\b{name}\s*(?:,[\w\s,]*)?=(?!=)", src))
    return children.pop() if len(children) == 1 and others == len(bindings) else ""


def _read_by_ancestor(model, path):
    """``(ancestor path, where)`` of a module that reads the parameters at ``path``."""
    if not path:
        return None
    parts = path.split(".")
    leaf = parts[-1]
    for k in range(len(parts) - 1, -1, -1):
        anc_path = ".".join(parts[:k])
        anc = model.get_submodule(anc_path)
        reads = _children_read_by(type(anc))
        keys = [leaf, _ANY_CHILD, _ANY_CHILD + parts[k]]
        if leaf.lstrip("-").isdigit() and k == len(parts) - 1 and hasattr(anc, "__len__"):
            keys.append(str(int(leaf) - len(anc)))
        for key in keys:
            if key in reads:
                return anc_path, reads[key]
    return None


def _forward_overridden(module):
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    cls = type(module)
    if cls.forward is not base.forward:
        return True
    return base is nn.Conv2d and cls._conv_forward is not nn.Conv2d._conv_forward


def dense_reasons(model, names):
    """``{name: reason}`` for the named Conv2d/Linear modules of ``model`` that a factorized
    module cannot replace (:func:`obstacle`); other names are not in it.

    The one filter of every step that needs only the replaceable layers (statistics,
    budgets, the CLI's choice): e.g. attention's ``out_proj``, which its parent reads as a
    parameter and never calls, needs no statistics.
    """
    modules = dict(model.named_modules())
    paths, owners, held = module_names(model), param_owners(model), held_outside(model)
    out = {}
    for n in names:
        m = modules.get(n)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            why = obstacle(model, m, paths.get(id(m), [n]), owners, held)
            if why is not None:
                out[n] = why
    return out


def obstacle(model, module, paths, owners, held=None):
    """Why ``module`` cannot be replaced by a factorized one (or None).

    ``owners`` is :func:`param_owners` of ``model``, ``held`` its
    :func:`held_outside` (computed here when None).
    """
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "uninitialized lazy module: run one batch through the model first"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return (f"grouped convolution (groups={module.groups}) is not supported by "
                "the factorized layers")
    if type(module) not in SUPPORTED and _forward_overridden(module):
        return (f"{type(module).__name__} overrides forward(); a factorized layer would not "
                "reproduce what it computes")
    if torch.nn.utils.parametrize.is_parametrized(module):
        return ("its weight is parametrized (torch.nn.utils.parametrize); remove the "
                "parametrization first")
    if any(type(h).__name__ == "WeightNorm" for h in module._forward_pre_hooks.values()):
        return ("its weight is weight-normalized (torch.nn.utils.weight_norm), which a "
                "replacement would silently drop; call torch.nn.utils.remove_weight_norm first")
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks, which a replacement would silently drop"
    if module._backward_hooks or getattr(module, "_backward_pre_hooks", None):
        return "it has backward hooks, which a replacement would silently drop"
    for pname in ("weight", "bias"):
        p = getattr(module, pname, None)
        if p is None:
            continue
        others = [o for o in owners.get(id(p), []) if o[1] is not module]
        if others:
            where = ", ".join(f"{o[0]!r}.{o[2]}" if o[0] else o[2] for o in others[:3])
            return (f"its {pname} is tied to {where}; compressing it would untie the "
                    "shared parameter")
    held = held_outside(model) if held is None else held
    if id(module) in held:
        return (f"it is also held in {held[id(module)]}, a plain container that is not a "
                "registered submodule; a replacement would not reach it there (use "
                "nn.ModuleList/nn.ModuleDict)")
    for path in paths:
        found = _read_by_ancestor(model, path)
        if found is not None:
            anc_path, where = found
            anc = model.get_submodule(anc_path)
            at = f" ({anc_path!r})" if anc_path else ""
            return (f"its parent {type(anc).__name__}{at} reads its weight/bias directly "
                    f"(in {where}), which a factorized module does not have")
    return None


def held_outside(model):
    """``{id(module): 'Class.attribute'}``: modules of ``model`` that a module of it also keeps
    in a plain list, tuple, set or dict attribute (not ``nn.ModuleList``/``ModuleDict``),
    where surgery, which replaces registered submodules, would leave the original."""
    out = {}
    for _, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if attr in ("_modules", "_parameters", "_buffers"):
                continue
            if isinstance(value, Mapping):
                items = value.values()
            elif isinstance(value, (list, tuple, set, frozenset)):
                items = value
            else:
                continue
            for item in items:
                if isinstance(item, nn.Module):
                    out.setdefault(id(item), f"{type(mod).__name__}.{attr}")
    return out


def param_owners(model):
    """``{id(parameter): [(module path, module, attribute), ...]}`` over all registrations."""
    owners = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                lst = owners.setdefault(id(p), [])
                if not any(o[1] is mod and o[2] == attr for o in lst):
                    lst.append((path, mod, attr))
    return owners



def module_names(model):
    """``{id(module): [name, ...]}``: every name of every module, in registration order.

    A module registered under several names (shared) has several; the first
    is its canonical name.
    """
    paths = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        lst = paths.setdefault(id(mod), [])
        if path not in lst:
            lst.append(path)
    return paths
