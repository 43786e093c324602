"""Bring your own model: compress a torchvision ResNet-18 with ImageNet-style folders.

    python examples/resnet18_imagenet.py --train-dir /data/imagenet/train \\
        --val-dir /data/imagenet/val --method tucker2 --ratio 3 --out resnet18_tucker2.pt

Both directories are in the torchvision ``ImageFolder`` layout (one sub-folder
per class, sorted class names giving the label indices, as the pretrained
weights expect). Needs ``torchvision`` (``pip install torchvision`` matching
your torch) and the pretrained weights (downloaded by torchvision on first
use). Not run in CI.

The four steps:

1. **collect** the second moment of every layer's input patches on a few
   hundred calibration images (no labels needed);
2. **compress** the 3x3 convolutions (all but the stem) with Sigma-aware
   Tucker-2 (or CP / SVD) at a per-layer compression ratio;
3. **evaluate** top-1 accuracy of the original and the compressed model, with
   no fine-tuning;
4. **save** the compressed model (a plain ``nn.Module`` built from ``nn.Conv2d``
   layers) and its state dict (``load_compressed`` puts it into a fresh
   ``torchvision.models.resnet18()``), the statistics (reusable, e.g. for
   another ratio) and the report.

A command-line near-equivalent of steps 1, 2 and 4 is::

    python -c "import torch, torchvision; torch.save(torchvision.models.resnet18(weights='DEFAULT'), 'resnet18.pt')"
    sigmadecomp compress resnet18.pt --data /data/imagenet/train --image-size 224 \\
        --normalize 0.485,0.456,0.406,0.229,0.224,0.225 --method tucker2 --ratio 3 \\
        --centered --save-stats resnet18.stats.pt --out resnet18_tucker2.pt

It differs in two ways: ``--layers auto`` also compresses the three 1x1
``downsample.0`` convs (by SVD), which this script leaves dense (name the 3x3
convs in ``--layers`` to match it), and ``--image-size`` resizes each image to
224 x 224 where this script resizes to 256 and crops the centre 224 x 224.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from sigmadecomp_torch import collect_covariances, compress, save_covariances


def imagenet_loader(root, *, limit, batch_size, seed=0):
    """A DataLoader of ``(image, label)`` with the standard ImageNet evaluation transform."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    ds = datasets.ImageFolder(root, transform=tf)
    if limit is not None and limit < len(ds):
        idx = np.random.default_rng(seed).choice(len(ds), size=limit, replace=False)
        ds = Subset(ds, sorted(idx.tolist()))
    return DataLoader(ds, batch_size=batch_size, shuffle=False,
                      num_workers=min(4, os.cpu_count() or 1))


@torch.inference_mode()
def top1(model, loader, device):
    model.eval().to(device)
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-dir", required=True, help="ImageFolder with calibration images")
    p.add_argument("--val-dir", required=True, help="ImageFolder with validation images")
    p.add_argument("--method", default="tucker2", choices=["tucker2", "cp", "svd"])
    p.add_argument("--ratio", type=float, default=3.0, help="per-layer compression ratio rX")
    p.add_argument("--calib-images", type=int, default=512)
    p.add_argument("--val-images", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="resnet18_compressed.pt")
    args = p.parse_args(argv)
    stem = os.path.splitext(args.out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)  # before the work

    import torchvision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torchvision.models.resnet18(weights="DEFAULT").eval().to(device)

    # layers: every 3x3 conv except the 7x7 stem (conv1); 1x1 downsample convs stay dense
    layers = [n for n, m in model.named_modules()
              if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]

    # 1. collect: statistics of the inputs of the chosen layers (labels unused)
    calib = imagenet_loader(args.train_dir, limit=args.calib_images, batch_size=args.batch_size)
    # (stored in float32: half the memory and file size of float64, ~370 MB for these layers)
    stats = collect_covariances(model, calib, layers=layers, dtype=torch.float32)
    save_covariances(stats, stem + ".stats.pt")

    # 2. compress (Sigma-aware, centered covariance with bias correction)
    small, report = compress(model, args.method, covariances=stats, ratio=args.ratio,
                             layers=layers, centered=True)
    print(report)

    # 3. evaluate without fine-tuning
    val = imagenet_loader(args.val_dir, limit=args.val_images, batch_size=args.batch_size)
    acc0, acc1 = top1(model, val, device), top1(small, val, device)
    print(f"top-1: original {100 * acc0:.2f}%, compressed (rX={report.ratio:.2f} overall) "
          f"{100 * acc1:.2f}%")

    # 4. save the compressed module, its state dict and the report; the state dict
    #    loads into a fresh torchvision ResNet-18 with
    #    sigmadecomp_torch.load_compressed(torchvision.models.resnet18(), state_dict)
    torch.save(small.cpu(), args.out)
    torch.save(small.state_dict(), stem + ".state.pt")
    report.to_json(stem + ".report.json")
    print(f"wrote {args.out}, {stem}.state.pt, {stem}.report.json and the statistics "
          f"{stem}.stats.pt (reusable with compress(covariances=load_covariances(...)))")


if __name__ == "__main__":
    main()
