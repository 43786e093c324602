"""Small torch models shared by tests (module level, so that they can be pickled)."""

import torch
from torch import nn


class WithUnusedConv(nn.Module):
    """Its conv ``unused``, registered between the others, is never called by forward:
    stem, body, (unused), tail convs, then a linear ``head`` on the spatial mean."""

    def __init__(self, in_channels, width, classes):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.body = nn.Conv2d(width, width, 3, padding=1)
        self.unused = nn.Conv2d(width, width, 3, padding=1)
        self.tail = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.body(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.tail(x)).mean((2, 3)))


def small_conv_net(width, classes):
    """Three 3x3 convs of ``width`` channels on 3-channel images, pooled, then a linear
    classifier; float64, eval mode, seeded (the same weights on every process)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, classes)).double().eval()
