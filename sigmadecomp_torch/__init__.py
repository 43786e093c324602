"""sigmadecomp_torch: the PyTorch adapter of :mod:`sigmadecomp`.

Three steps: gather each layer's input statistics on calibration data,
compress the model with the Sigma-aware decompositions, read the report.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from sigmadecomp_torch import collect_covariances, compress
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
...                       nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
...                       nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
>>> data = [torch.randn(16, 3, 8, 8) for _ in range(4)]   # or a DataLoader
>>> stats = collect_covariances(model, data)
>>> small, report = compress(model, 'tucker2', covariances=stats, ratio=3,
...                          options={'n_iter_max': 10})
>>> print(report)  # doctest: +ELLIPSIS
compress(method='tucker2', Sigma)
layer ...
model: 6378 -> 2042 parameters, rX = 3.12
>>> small(data[0]).shape
torch.Size([16, 10])

The statistics can be saved and reused (``save_covariances`` /
``load_covariances``), merged (``a + b``), and are all-reduced over
``torch.distributed`` workers when a process group is initialised.
"""

from .compress import (
    LAYER_METHODS,
    CompressionReport,
    LayerMethod,
    compress,
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
