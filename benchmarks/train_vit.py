"""Train the second reference model, a small Vision Transformer, on Fashion-MNIST.

    python -m benchmarks.train_vit [--epochs 3] [--seed 0] [--threads 1]

Trains :class:`sigmadecomp_torch.vit.ViT` (7 x 7 patches, 16 tokens, width 64,
4 blocks, 4 heads, MLP width 128, mean pooling; about 0.14 M parameters) with
AdamW, a one-cycle learning-rate schedule and light augmentation (random
horizontal flip, random 2-pixel shifts), then writes
``sigmadecomp_torch/demo/weights/vit_fmnist.pt`` (a ``state_dict``) and
``vit_fmnist.json`` next to it (test accuracy, architecture, settings, time).
Needs the Debian package ``dataset-fashion-mnist``. The default settings took
467 s (test accuracy 80.21%) on a two-core machine shared with other jobs; one
thread is used by default because two were slower there.
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
from sigmadecomp_torch.demo.reference import augment, evaluate
from sigmadecomp_torch.models import count_parameters
from sigmadecomp_torch.vit import VIT_WEIGHTS_FILE, ViT

DEFAULTS = dict(epochs=3, batch_size=128, lr=2e-3, weight_decay=0.05, seed=0)


def train(*, epochs=3, batch_size=128, lr=2e-3, weight_decay=0.05, seed=0, log=print):
    """Train a fresh :class:`ViT`; returns ``(model, info)``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    model = ViT()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = len(x_train) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.2)
    t0 = time.perf_counter()
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx],
                                   label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "train_loss": round(total / steps_per_epoch, 4),
                         "test_accuracy": acc,
                         "seconds": round(time.perf_counter() - t0, 1)})
        log(f"epoch {epoch + 1}: train loss {total / steps_per_epoch:.4f}, test accuracy {acc:.4f}"
            f" ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    model.eval()
    info = {
        "model": "ViT (sigmadecomp_torch.vit)",
        "config": model.config,
        "parameters": count_parameters(model),
        "test_accuracy": evaluate(model, x_test, y_test),
        "dataset": "Fashion-MNIST (Debian package dataset-fashion-mnist), 60000 train / 10000 test",
        "settings": {
            "epochs": epochs, "batch_size": batch_size, "optimizer": "AdamW",
            "max_lr": lr, "schedule": "OneCycleLR pct_start=0.2", "weight_decay": weight_decay,
            "label_smoothing": 0.05, "augmentation": "random horizontal flip, random shift <= 2 px",
            "seed": seed, "threads": torch.get_num_threads(),
        },
        "history": history,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "command": "python -m benchmarks.train_vit",
    }
    return model, info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: faster than 2 on a shared machine)")
    p.add_argument("--out", default=VIT_WEIGHTS_FILE,
                   help="where to write the state_dict (.pt); the JSON goes next to it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    weight_decay=args.weight_decay, seed=args.seed)
    model, info = train(**settings)
    changed = {k: v for k, v in settings.items() if v != DEFAULTS[k]}
    info["command"] += "".join(f" --{k.replace('_', '-')} {v}" for k, v in changed.items())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save(model.state_dict(), args.out)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(f"test accuracy {info['test_accuracy']:.4f}, {info['parameters']} parameters, "
          f"{info['train_seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
