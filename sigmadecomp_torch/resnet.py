"""ImageNet-class ResNets with torchvision's exact layout and layer names.

:func:`resnet18` and :func:`resnet50` build the networks of He et al. (2016)
module for module as ``torchvision.models.resnet18/50`` do -- same module
names (``conv1``, ``layer1.0.conv2``, ``layer4.0.downsample.0``, ``fc``),
same shapes, same parameter counts (11,689,512 and 25,557,032) -- so a
torchvision ``state_dict`` loads into them unchanged. They exist so that
scale benchmarks and examples run where torchvision itself cannot be
installed; the weights are random (Kaiming-normal convs, BatchNorm at
identity) unless loaded.

Examples
--------
>>> import torch
>>> from sigmadecomp_torch.resnet import resnet18
>>> model = resnet18().eval()
>>> sum(p.numel() for p in model.parameters())
11689512
>>> model(torch.rand(1, 3, 64, 64)).shape
torch.Size([1, 1000])
>>> [n for n, m in model.named_modules() if n.startswith("layer2.0.")][:3]
['layer2.0.conv1', 'layer2.0.bn1', 'layer2.0.relu']
"""

from __future__ import annotations

from torch import nn

from .models import init_resnet_weights

__all__ = ["ResNet", "ImageNetBasicBlock", "Bottleneck", "resnet18", "resnet50"]


def _conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class ImageNetBasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity or 1x1 ``downsample`` shortcut."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's v1.5), 1x1 expand (x4)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet for ``(N, 3, H, W)`` images: 7x7 stem, max pool, four stages, linear.

    Parameters
    ----------
    block : ImageNetBasicBlock or Bottleneck
    layers : sequence of 4 ints
        Blocks per stage.
    num_classes : int, optional
    """

    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_resnet_weights(self)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes=1000):
    """ResNet-18 in torchvision's layout (random weights)."""
    return ResNet(ImageNetBasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes=1000):
    """ResNet-50 (v1.5, stride in the 3x3 conv) in torchvision's layout (random weights).

    Examples
    --------
    >>> sum(p.numel() for p in resnet50().parameters())
    25557032
    """
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)
