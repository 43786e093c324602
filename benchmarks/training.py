"""The training loop and weight files shared by the reference-model scripts.

``train_reference`` (the CNN) and ``train_vit`` (the ViT) differ in model,
optimiser and schedule only; the epoch loop, the per-epoch test accuracy and
the ``.pt`` + ``.json`` files they write are the same and live here.
"""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from sigmadecomp_torch.demo.reference import augment, evaluate

LABEL_SMOOTHING = 0.05
AUGMENTATION = "random horizontal flip, random shift <= 2 px"


def fit(model, opt, sched, train, test, *, epochs, batch_size, gen, progress=False, log=print):
    """Train ``model`` in place for ``epochs`` epochs of shuffled, augmented mini-batches.

    ``train`` and ``test`` are ``(images, labels)`` pairs; ``sched`` steps once
    per mini-batch; ``gen`` (a ``torch.Generator``) drives shuffling and
    augmentation. Returns ``(history, seconds)``: one dict per epoch with the
    mean training loss, the test accuracy and the elapsed time.
    """
    (x_train, y_train), (x_test, y_test) = train, test
    steps_per_epoch = len(x_train) // batch_size
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            progress = False
    t0 = time.perf_counter()
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        steps = range(steps_per_epoch)
        if progress:
            steps = tqdm(steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        total = 0.0
        for step in steps:
            idx = perm[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx],
                                   label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = evaluate(model, x_test, y_test)
        elapsed = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "train_loss": round(total / steps_per_epoch, 4),
                        "test_accuracy": acc, "seconds": round(elapsed, 1)})
        log(f"epoch {epoch + 1}: train loss {total / steps_per_epoch:.4f}, "
            f"test accuracy {acc:.4f} ({elapsed:.0f} s)")
    model.eval()
    return history, time.perf_counter() - t0


def environment():
    """Library versions and machine, recorded next to the weights."""
    return {"torch": torch.__version__, "numpy": np.__version__, "machine": platform.machine()}


def save_weights(model, info, out):
    """Write ``model``'s ``state_dict`` to ``out`` (.pt) and ``info`` to the ``.json`` beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(model.state_dict(), out)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(f"test accuracy {info['test_accuracy']:.4f}, {info['parameters']} parameters, "
          f"{info['train_seconds']:.0f} s; wrote {out}")


if __name__ == "__main__":
    raise SystemExit("benchmarks.training is the training loop the two training scripts share; "
                     "run python -m benchmarks.train_reference or python -m benchmarks.train_vit")
