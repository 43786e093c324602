"""The reference network of the end-to-end experiment.

:class:`ResNetSmall` is a small ResNet-style CNN for 28x28 grey-scale images
(Fashion-MNIST): a 3x3 stem and three residual stages of one basic block each
(two 3x3 convolutions, BatchNorm, ReLU, 1x1 projection shortcut), global
average pooling and a linear classifier. About 0.3 M parameters and 10 M
multiply-adds per image; the shipped weights took 8 epochs, about 41 minutes
on two CPU cores (``train_seconds`` in the demo's ``resnet_small_fmnist.json``).

Inputs are raw images in ``[0, 1]``; the input normalisation is part of the
model (fixed buffers), so a saved model needs no separate preprocessing.

Examples
--------
>>> import torch
>>> from sigmadecomp_torch.models import ResNetSmall, conv3x3_names
>>> model = ResNetSmall().eval()
>>> model(torch.rand(2, 1, 28, 28)).shape
torch.Size([2, 10])
>>> conv3x3_names(model, skip_first=True)[:2]
['layer1.conv1', 'layer1.conv2']
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "ResNetSmall",
    "conv3x3_names",
    "count_parameters",
    "init_resnet_weights",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
]

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


class BasicBlock(nn.Module):
    """Residual block: conv3x3-BN-ReLU-conv3x3-BN plus (projection) shortcut, ReLU.

    Parameters
    ----------
    in_channels, out_channels : int
    stride : int, optional
        Stride of the first convolution (and of the 1x1 projection).
    """

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """Small ResNet for ``(N, in_channels, 28, 28)`` images in ``[0, 1]``.

    Layout (spatial size for 28x28 inputs): stem 3x3 conv ``in -> w`` (28x28);
    ``layer1`` block ``w -> w`` stride 2 (14x14); ``layer2`` ``w -> 2w`` stride 2
    (7x7); ``layer3`` ``2w -> 4w`` stride 2 (4x4); average pool; linear.

    Parameters
    ----------
    num_classes : int, optional
    width : int, optional
        Channels of the stem and the first stage (default 32: 0.31 M parameters).
    in_channels : int, optional
    mean, std : float, optional
        Input normalisation applied inside :meth:`forward` (stored as buffers).
    """

    def __init__(self, num_classes=10, *, width=32, in_channels=1,
                 mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD):
        super().__init__()
        w = int(width)
        self.register_buffer("input_mean", torch.tensor(float(mean)))
        self.register_buffer("input_std", torch.tensor(float(std)))
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=False),
        )
        self.layer1 = BasicBlock(w, w, stride=2)
        self.layer2 = BasicBlock(w, 2 * w, stride=2)
        self.layer3 = BasicBlock(2 * w, 4 * w, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        init_resnet_weights(self)

    def forward(self, x):
        x = (x - self.input_mean) / self.input_std
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def init_resnet_weights(model):
    """He initialisation of every conv (fan-out, ReLU), BatchNorm at identity (in place)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv3x3_names(model, *, skip_first=True):
    """Dotted names of the ``nn.Conv2d`` modules with a 3x3 kernel, in model order.

    Parameters
    ----------
    model : torch.nn.Module
    skip_first : bool, optional
        Leave out the first 3x3 conv (the stem, which sees the raw image and
        has too few input channels to be worth factorizing).

    Returns
    -------
    names : list of str
    """
    names = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3)
    ]
    return names[1:] if skip_first else names


def count_parameters(model):
    """Number of parameters (trainable or not; buffers excluded)."""
    return int(sum(p.numel() for p in model.parameters()))
