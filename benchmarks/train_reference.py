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

import torch

from benchmarks.common import check_output_file, positive_float, positive_int
from benchmarks.training import AUGMENTATION, LABEL_SMOOTHING, environment, fit, save_weights
from sigmadecomp_torch.data import fashion_mnist
from sigmadecomp_torch.demo.reference import (  # noqa: F401 (re-exported for older imports)
    INFO_FILE,
    WEIGHTS_FILE,
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
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * (len(x_train) // batch_size), pct_start=0.25
    )
    history, seconds = fit(model, opt, sched, (x_train, y_train), (x_test, y_test), epochs=epochs,
                           batch_size=batch_size, gen=gen, progress=progress, log=log)
    info = {
        "model": "ResNetSmall(width=32)",
        "parameters": count_parameters(model),
        "test_accuracy": evaluate(model, x_test, y_test),
        "dataset": "Fashion-MNIST (Debian package dataset-fashion-mnist), 60000 train / 10000 test",
        "settings": {
            "epochs": epochs, "batch_size": batch_size, "optimizer": "SGD nesterov momentum 0.9",
            "max_lr": lr, "schedule": "OneCycleLR pct_start=0.25", "weight_decay": weight_decay,
            "label_smoothing": LABEL_SMOOTHING, "augmentation": AUGMENTATION,
            "seed": seed, "threads": torch.get_num_threads(),
        },
        "history": history,
        "train_seconds": round(seconds, 1),
        **environment(),
        "command": "python -m benchmarks.train_reference",
    }
    return model, info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=positive_int, default=8, help="training epochs (default 8)")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="mini-batch size (default 128)")
    p.add_argument("--lr", type=positive_float, default=0.1,
                   help="peak learning rate of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", default=WEIGHTS_FILE,
                   help="where to write the state_dict (.pt); the JSON goes next to it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    check_output_file(p, "--out", args.out, make_folder=True)
    torch.set_num_threads(args.threads)
    model, info = train(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, progress=not args.no_progress)
    if args.epochs != 8 or args.batch_size != 128 or args.lr != 0.1 or args.seed != 0:
        info["command"] += (f" --epochs {args.epochs} --batch-size {args.batch_size}"
                            f" --lr {args.lr} --seed {args.seed}")
    save_weights(model, info, args.out)


if __name__ == "__main__":
    main()
