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

import torch

from benchmarks.common import check_output_file, positive_float, positive_int
from benchmarks.training import AUGMENTATION, LABEL_SMOOTHING, environment, fit, save_weights
from sigmadecomp_torch.data import fashion_mnist
from sigmadecomp_torch.demo.reference import evaluate
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
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * (len(x_train) // batch_size), pct_start=0.2)
    history, seconds = fit(model, opt, sched, (x_train, y_train), (x_test, y_test), epochs=epochs,
                           batch_size=batch_size, gen=gen, log=log)
    info = {
        "model": "ViT (sigmadecomp_torch.vit)",
        "config": model.config,
        "parameters": count_parameters(model),
        "test_accuracy": evaluate(model, x_test, y_test),
        "dataset": "Fashion-MNIST (Debian package dataset-fashion-mnist), 60000 train / 10000 test",
        "settings": {
            "epochs": epochs, "batch_size": batch_size, "optimizer": "AdamW",
            "max_lr": lr, "schedule": "OneCycleLR pct_start=0.2", "weight_decay": weight_decay,
            "label_smoothing": LABEL_SMOOTHING, "augmentation": AUGMENTATION,
            "seed": seed, "threads": torch.get_num_threads(),
        },
        "history": history,
        "train_seconds": round(seconds, 1),
        **environment(),
        "command": "python -m benchmarks.train_vit",
    }
    return model, info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=positive_int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"], help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: faster than 2 on a shared machine)")
    p.add_argument("--out", default=VIT_WEIGHTS_FILE,
                   help="where to write the state_dict (.pt); the JSON goes next to it")
    args = p.parse_args(argv)
    check_output_file(p, "--out", args.out, make_folder=True)
    torch.set_num_threads(args.threads)
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    weight_decay=args.weight_decay, seed=args.seed)
    model, info = train(**settings)
    changed = {k: v for k, v in settings.items() if v != DEFAULTS[k]}
    info["command"] += "".join(f" --{k.replace('_', '-')} {v}" for k, v in changed.items())
    save_weights(model, info, args.out)


if __name__ == "__main__":
    main()
