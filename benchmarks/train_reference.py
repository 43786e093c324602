"""Train the reference network of the end-to-end experiment on Fashion-MNIST.

    python -m benchmarks.train_reference [--epochs 8] [--seed 0] [--threads 2]

Trains :class:`sigmadecomp_torch.models.ResNetSmall` (about 0.31 M parameters)
with SGD + Nesterov momentum, a one-cycle learning-rate schedule, weight decay,
and light augmentation (random horizontal flip, random 2-pixel shifts), then
writes ``sigmadecomp_torch/demo/weights/resnet_small_fmnist.pt`` (a
``state_dict``, shipped with the package for ``sigmadecomp demo``) and
``resnet_small_fmnist.json`` next to it (test accuracy, training settings,
time). Needs the Debian package ``dataset-fashion-mnist``.
The default settings take a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from sigmadecomp_torch.data import fashion_mnist
from sigmadecomp_torch.demo.reference import (  # noqa: F401 (re-exported for the benchmarks)
    INFO_FILE,
    WEIGHTS_FILE,
    augment,
    evaluate,
    load_reference,
)
from sigmadecomp_torch.models import ResNetSmall, count_parameters

def train(*, epochs=8, batch_size=128, lr=0.1, weight_decay=5e-4, seed=0, progress=True, log=print):
    """Train a fresh :class:`ResNetSmall`; returns ``(model, info)``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    model = ResNetSmall()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, momentum=0.9, nesterov=True,
    )
    steps_per_epoch = len(x_train) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.25
    )
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        progress = False
    t0 = time.perf_counter()
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        it = range(steps_per_epoch)
        if progress:
            it = tqdm(it, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        total = 0.0
        for step in it:
            idx = perm[step * batch_size:(step + 1) * batch_size]
            xb = augment(x_train[idx], gen)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "train_loss": total / steps_per_epoch, "test_accuracy": acc})
        log(f"epoch {epoch + 1}: train loss {total / steps_per_epoch:.4f}, test accuracy {acc:.4f}")
    seconds = time.perf_counter() - t0
    model.eval()
    info = {
        "model": "ResNetSmall(width=32)",
        "parameters": count_parameters(model),
        "test_accuracy": evaluate(model, x_test, y_test),
        "dataset": "Fashion-MNIST (Debian package dataset-fashion-mnist), 60000 train / 10000 test",
        "settings": {
            "epochs": epochs, "batch_size": batch_size, "optimizer": "SGD nesterov momentum 0.9",
            "max_lr": lr, "schedule": "OneCycleLR pct_start=0.25", "weight_decay": weight_decay,
            "label_smoothing": 0.05, "augmentation": "random horizontal flip, random shift <= 2 px",
            "seed": seed, "threads": torch.get_num_threads(),
        },
        "history": history,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "command": "python -m benchmarks.train_reference",
    }
    return model, info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    p.add_argument("--batch-size", type=int, default=128, help="mini-batch size (default 128)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", default=WEIGHTS_FILE,
                   help="where to write the state_dict (.pt); the JSON goes next to it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = train(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, progress=not args.no_progress)
    if args.epochs != 8 or args.batch_size != 128 or args.lr != 0.1 or args.seed != 0:
        info["command"] += (f" --epochs {args.epochs} --batch-size {args.batch_size}"
                            f" --lr {args.lr} --seed {args.seed}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(model.state_dict(), args.out)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(f"test accuracy {info['test_accuracy']:.4f}, {info['parameters']} parameters, "
          f"{info['train_seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
