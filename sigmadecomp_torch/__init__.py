"""sigmadecomp_torch: the PyTorch adapter of :mod:`sigmadecomp`.

Three steps: gather each layer's input statistics on calibration data,
compress the model with the Sigma-aware decompositions, read the report.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from sigmadecomp_torch import collect_covariances, compress, default_layers
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
...                       nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
...                       nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
>>> data = [torch.randn(16, 3, 8, 8) for _ in range(4)]   # or a DataLoader
>>> stats = collect_covariances(model, data)
>>> default_layers(model)  # the default: all Conv2d/Linear but the first and the last
['2']
>>> small, report = compress(model, 'tucker2', covariances=stats, ratio=3,
...                          options={'n_iter_max': 10})
>>> print(report)  # doctest: +ELLIPSIS
compress(method='tucker2', Sigma)
layer ...
model: 6378 -> 3212 parameters, rX = 1.99
skipped 0 (Conv2d 3x3): first layer (reads the model's input): left alone by default; ...
skipped 6 (Linear): last layer (the model's output, e.g. the classifier): left alone ...
>>> small(data[0]).shape
torch.Size([16, 10])

The statistics can be saved and reused (``save_covariances`` /
``load_covariances``), merged layer by layer (``sa[name] + sb[name]``, or
``{k: sa[k] + sb[k] for k in sa}`` for two collections), and are all-reduced over
``torch.distributed`` workers when a process group is initialised.
"""

import sys
import types

# The names below load their module (and torch) on first use, so that the
# ``sigmadecomp`` command can parse its arguments and print help without torch.
_EXPORTS = {
    "compress": ("LAYER_METHODS", "CompressionReport", "LayerMethod", "SIGMA_ERROR_WARN",
                 "compress", "default_layers", "layer_method_for", "register_layer_method"),
    "covariance": ("LayerStats", "collect_covariances", "load_covariances", "save_covariances",
                   "select_layers"),
    "layers": ("CPConv2d", "LowRankConv2d", "LowRankLinear", "Tucker2Conv2d"),
    "latency": ("measure_latency",),
    "sequential": ("CrossStats", "collect_cross_covariances", "corrected_target",
                   "sequential_compress"),
    "transfer": ("shrink_covariances", "ShrunkCovariances"),
    "batchnorm": ("BatchNormReport", "covariances_from_batchnorm"),
    "restore": ("load_compressed",),
    "tt_layers": ("TTConv2d", "TTLinear"),
    "quantize": ("QuantizedWeights", "quantize_weights", "quantized_state_dict",
                 "load_quantized_state_dict"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "collect_covariances",
    "LayerStats",
    "save_covariances",
    "load_covariances",
    "select_layers",
    "compress",
    "default_layers",
    "SIGMA_ERROR_WARN",
    "CompressionReport",
    "LayerMethod",
    "LAYER_METHODS",
    "register_layer_method",
    "layer_method_for",
    "Tucker2Conv2d",
    "CPConv2d",
    "LowRankConv2d",
    "LowRankLinear",
    "measure_latency",
    "sequential_compress",
    "collect_cross_covariances",
    "corrected_target",
    "CrossStats",
    "shrink_covariances",
    "ShrunkCovariances",
    "covariances_from_batchnorm",
    "BatchNormReport",
    "load_compressed",
    "TTConv2d",
    "TTLinear",
    "QuantizedWeights",
    "quantize_weights",
    "quantized_state_dict",
    "load_quantized_state_dict",
]


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'sigmadecomp_torch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps the function ``compress`` where importing the submodule of that name would put the module."""

    def __setattr__(self, name, value):
        if (isinstance(value, types.ModuleType) and name in _MODULE_OF
                and value.__name__ == f"{__name__}.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
