"""A small Vision Transformer: the second reference model (Fashion-MNIST).

Two classes with the same function and the same parameters:

* :class:`ViT` builds every projection from plain ``nn.Linear`` layers (patch
  embedding, per block ``q``/``k``/``v``/``out`` and a two-layer MLP
  ``fc1``/``fc2``, pre-norm ``LayerNorm``, mean pooling over the tokens, a
  classifier ``head``), so :func:`sigmadecomp_torch.compress` can replace
  every one of them;
* :class:`TorchViT` uses ``nn.TransformerEncoderLayer`` blocks. Its attention
  projections live in ``nn.MultiheadAttention`` (``in_proj_weight`` is a bare
  parameter, ``out_proj`` and ``linear1``/``linear2`` are read directly by the
  parent's fast path), so ``compress`` can only reach the patch embedding and
  the classifier there.

:meth:`TorchViT.from_vit` copies the weights of a :class:`ViT` (``q``, ``k``,
``v`` stacked into ``in_proj_weight``), so the committed weights
(``demo/weights/vit_fmnist.pt``, trained by ``python -m benchmarks.train_vit``)
serve both.

Examples
--------
>>> import torch
>>> from sigmadecomp_torch.vit import ViT, TorchViT
>>> _ = torch.manual_seed(0)
>>> vit = ViT().eval()
>>> x = torch.rand(2, 1, 28, 28)
>>> vit(x).shape
torch.Size([2, 10])
>>> twin = TorchViT.from_vit(vit).eval()
>>> bool(torch.allclose(vit(x), twin(x), atol=1e-5))
True
"""

from __future__ import annotations

import json
import math
import numbers
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ViT", "TorchViT", "VIT_WEIGHTS_FILE", "VIT_INFO_FILE", "load_vit", "vit_info",
           "patchify"]

VIT_WEIGHTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "weights",
                                "vit_fmnist.pt")
VIT_INFO_FILE = os.path.splitext(VIT_WEIGHTS_FILE)[0] + ".json"


def _check_positive_int(value, name):
    """``value`` as a Python int (NumPy integers too), or a clear error naming it."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
            or value < 1):
        raise ValueError(f"{name}={value!r} is not allowed; {name} must be a positive integer")
    return int(value)


def patchify(images, patch):
    """Split ``(N, C, H, W)`` images into ``(N, (H/p)(W/p), C p p)`` patch rows.

    Examples
    --------
    >>> import torch
    >>> patchify(torch.zeros(2, 1, 28, 28), 4).shape
    torch.Size([2, 49, 16])
    """
    if isinstance(patch, bool) or not isinstance(patch, numbers.Integral) or patch < 1:
        raise ValueError(f"patch={patch!r} is not allowed; patch must be a positive integer")
    patch = int(patch)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        what = (f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                else f"type {type(images).__name__}")
        raise ValueError(f"images of {what} is not allowed; images must be a tensor of "
                         "shape (N, C, H, W)")
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"images of size {h}x{w} is not allowed; height and width must be "
                         f"multiples of patch={patch}")
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


class _Embedding(nn.Module):
    """Patch rows -> Linear -> + learned position embedding."""

    def __init__(self, image_size, patch, channels, dim):
        super().__init__()
        self.patch, self.image_size, self.channels = patch, image_size, channels
        n_tokens = (image_size // patch) ** 2
        self.proj = nn.Linear(channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)

    def forward(self, images):
        size, channels = getattr(self, "image_size", None), getattr(self, "channels", None)
        if isinstance(images, torch.Tensor) and images.ndim == 4 and size is not None:
            want = (channels, size, size)
            if tuple(images.shape[1:]) != want:
                raise ValueError(
                    f"images of shape {tuple(images.shape)} is not allowed; this model takes "
                    f"images of shape (N, {want[0]}, {want[1]}, {want[2]}) (channels="
                    f"{want[0]}, image_size={want[1]})")
        return self.proj(patchify(images, self.patch)) + self.pos


class Block(nn.Module):
    """Pre-norm transformer block from plain Linear layers."""

    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not allowed with heads={heads}; dim must be a "
                             "multiple of heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def _split(self, t):
        n, s, d = t.shape
        return t.reshape(n, s, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x):
        h = self.norm1(x)
        q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
        x = x + self.out(a.transpose(1, 2).reshape(x.shape))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def _checked_config(**config):
    """The network's configuration, each value a positive int, the patch dividing the image."""
    config = {name: _check_positive_int(value, name) for name, value in config.items()}
    image_size, patch, dim, heads = (config[k] for k in ("image_size", "patch", "dim", "heads"))
    if image_size % patch:
        raise ValueError(f"patch={patch} is not allowed with image_size={image_size}; "
                         "image_size must be a multiple of patch")
    if dim % heads:
        raise ValueError(f"dim={dim} is not allowed with heads={heads}; dim must be a "
                         "multiple of heads")
    return dict(config)


def _torch_layer(dim, heads, mlp_dim):
    return nn.TransformerEncoderLayer(dim, heads, dim_feedforward=mlp_dim, dropout=0.0,
                                      activation="gelu", batch_first=True, norm_first=True)


class _Backbone(nn.Module):
    """Patch embedding, blocks, final norm, mean over tokens, classifier."""

    def __init__(self, block, image_size, patch, channels, dim, depth, heads, mlp_dim,
                 n_classes):
        super().__init__()
        self.config = _checked_config(image_size=image_size, patch=patch, channels=channels,
                                      dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim,
                                      n_classes=n_classes)
        (image_size, patch, channels, dim, depth, heads, mlp_dim, n_classes) = (
            self.config[k] for k in ("image_size", "patch", "channels", "dim", "depth", "heads",
                                     "mlp_dim", "n_classes"))
        self.embed = _Embedding(image_size, patch, channels, dim)
        self.blocks = nn.ModuleList(block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, images):
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


class ViT(_Backbone):
    """Vision Transformer built from plain ``nn.Linear`` layers.

    Parameters
    ----------
    image_size : int, optional
        Side of the square input images (default 28).
    patch : int, optional
        Side of the square patches (default 7: 4 x 4 = 16 tokens of 49
        pixels, which keeps training within minutes on two CPU cores).
    channels : int, optional
    dim : int, optional
        Token width (default 64).
    depth : int, optional
        Number of blocks (default 4).
    heads : int, optional
        Attention heads (default 4); ``dim`` must be a multiple.
    mlp_dim : int, optional
        Hidden width of the MLP (default 128).
    n_classes : int, optional

    Notes
    -----
    Module names: ``embed.proj`` (patch embedding), ``blocks.{i}.q``/``k``/
    ``v``/``out``/``fc1``/``fc2``, ``head``. The class output is the
    classifier applied to the mean of the final-normed tokens.
    """

    def __init__(self, image_size=28, patch=7, channels=1, dim=64, depth=4, heads=4,
                 mlp_dim=128, n_classes=10):
        super().__init__(Block, image_size, patch, channels, dim, depth, heads, mlp_dim,
                         n_classes)


class TorchViT(_Backbone):
    """The same network as :class:`ViT` with ``nn.TransformerEncoderLayer`` blocks.

    Pre-norm (``norm_first=True``), GELU, ``batch_first=True``, no dropout.
    Parameters as for :class:`ViT`.
    """

    def __init__(self, image_size=28, patch=7, channels=1, dim=64, depth=4, heads=4,
                 mlp_dim=128, n_classes=10):
        super().__init__(_torch_layer, image_size, patch, channels, dim, depth, heads,
                         mlp_dim, n_classes)

    @classmethod
    def from_vit(cls, vit):
        """A :class:`TorchViT` computing the same function as ``vit`` (weights copied)."""
        if not isinstance(vit, ViT):
            raise TypeError(f"vit of type {type(vit).__name__} is not allowed; vit must be a ViT")
        for name, module in vit.named_modules():
            if name and type(module) not in (nn.Linear, nn.LayerNorm, nn.ModuleList, Block,
                                              _Embedding):
                raise ValueError(f"vit has a replaced module {name!r} "
                                 f"({type(module).__name__}); from_vit needs an uncompressed ViT")
        p0 = next(vit.parameters())
        new = cls(**vit.config).to(device=p0.device, dtype=p0.dtype)  # as vit's weights
        state = {}
        for key, value in vit.state_dict().items():
            parts = key.split(".")
            if parts[0] != "blocks":
                state[key] = value
        for i, b in enumerate(vit.blocks):
            p = f"blocks.{i}."
            state[p + "self_attn.in_proj_weight"] = torch.cat([b.q.weight, b.k.weight, b.v.weight])
            state[p + "self_attn.in_proj_bias"] = torch.cat([b.q.bias, b.k.bias, b.v.bias])
            state[p + "self_attn.out_proj.weight"] = b.out.weight
            state[p + "self_attn.out_proj.bias"] = b.out.bias
            for src, dst in [("fc1", "linear1"), ("fc2", "linear2"), ("norm1", "norm1"),
                             ("norm2", "norm2")]:
                mod = getattr(b, src)
                state[p + dst + ".weight"] = mod.weight
                state[p + dst + ".bias"] = mod.bias
        new.load_state_dict({k: v.detach().clone() for k, v in state.items()})
        return new.train(vit.training)


def load_vit(path=VIT_WEIGHTS_FILE, *, info_path=None):
    """The trained reference ViT (eval mode) from its ``state_dict`` file.

    The architecture is read from the JSON record next to the weights
    (``info_path``, default the ``.json`` of the same name) when it exists.
    """
    info_path = info_path or os.path.splitext(path)[0] + ".json"
    config = {}
    if os.path.exists(info_path):
        with open(info_path) as f:
            config = json.load(f).get("config", {})
    model = ViT(**config)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def vit_info(path=VIT_INFO_FILE):
    """The JSON record written next to the ViT weights (accuracy, settings)."""
    with open(path) as f:
        return json.load(f)
