"""The reference network of the demo: committed weights, evaluation, augmentation.

The weights (``weights/resnet_small_fmnist.pt``, a ``state_dict`` of
:class:`sigmadecomp_torch.models.ResNetSmall`) ship with the package, next to
``weights/resnet_small_fmnist.json`` (test accuracy, training settings). They
were trained by ``python -m benchmarks.train_reference`` of the source tree.

Examples
--------
>>> import torch
>>> from sigmadecomp_torch.demo.reference import load_reference, evaluate
>>> model = load_reference()
>>> x = torch.zeros(4, 1, 28, 28); y = model(x).argmax(1)
>>> evaluate(model, x, y)
1.0
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from sigmadecomp_torch._batches import eval_modes
from sigmadecomp_torch.models import ResNetSmall

__all__ = ["WEIGHTS_DIR", "WEIGHTS_FILE", "INFO_FILE", "load_reference", "reference_info",
           "evaluate", "augment"]

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
WEIGHTS_FILE = os.path.join(WEIGHTS_DIR, "resnet_small_fmnist.pt")
INFO_FILE = os.path.join(WEIGHTS_DIR, "resnet_small_fmnist.json")


def load_reference(path=WEIGHTS_FILE):
    """The trained reference model (eval mode) from its ``state_dict`` file."""
    model = ResNetSmall()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def reference_info(path=INFO_FILE):
    """The JSON record written next to the weights (accuracy, settings)."""
    with open(path) as f:
        return json.load(f)


@torch.no_grad()
def evaluate(model, images, labels, *, batch_size=1000):
    """Top-1 accuracy (a float in [0, 1]) of ``model`` in eval mode."""
    correct = 0
    with eval_modes(model):
        for i in range(0, len(images), batch_size):
            out = model(images[i:i + batch_size])
            correct += int((out.argmax(1) == labels[i:i + batch_size]).sum())
    return correct / len(images)


def augment(x, gen):
    """Random horizontal flip and random shift by up to 2 pixels (zero fill)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
