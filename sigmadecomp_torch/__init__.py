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
``load_covariances``), merged (``a + b``), and are all-reduced over
``torch.distributed`` workers when a process group is initialised.
"""

from .compress import (
    LAYER_METHODS,
    CompressionReport,
    SIGMA_ERROR_WARN,
    LayerMethod,
    compress,
    default_layers,
    layer_method_for,
    register_layer_method,
)
from .covariance import (
    LayerStats,
    collect_covariances,
    load_covariances,
    save_covariances,
    select_layers,
)
from .layers import CPConv2d, LowRankConv2d, LowRankLinear, Tucker2Conv2d

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
]
