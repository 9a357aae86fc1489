"""Accuracy and loss of a run's weights (`python -m core evaluate` is core/cli/evaluate.py).

The compression policy does not matter here: the forward pass is exact, so a run is
evaluated as the plain model its config names. Inputs are normalised with the mean/std the
run was trained with (recorded in its config.json), whatever dataset it is evaluated on.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

SPLITS = ("val", "train")  # the fixed split a run was trained with
TTA = ("none", "flip")


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, num_classes: int, amp_dtype: torch.dtype | None = None,
                   flip_tta: bool = False) -> dict:
    """Mean cross-entropy (no label smoothing), accuracy and per-class accuracy over `loader`.

    flip_tta: test-time augmentation, each image's class probabilities averaged with those of its
    mirror image (left-right); the loss is that of the averaged probabilities.

    -> {"loss", "acc", "per_class_acc" (list, None for a class with no images), "n", "correct"}.
    One host sync at the end; the model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    hits = torch.zeros(num_classes, dtype=torch.long, device=dev)
    counts = torch.zeros(num_classes, dtype=torch.long, device=dev)
    cast = (torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
    try:
        for x, y in loader:
            with cast:
                out = model(x)
                if flip_tta:  # log of the mean of the two softmaxes: cross_entropy on it is -log p[y]
                    both = torch.stack([F.log_softmax(out.float(), 1), F.log_softmax(model(x.flip(3)).float(), 1)])
                    out = torch.logsumexp(both, 0) - math.log(2)
            loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
            right = out.argmax(1) == y
            counts += torch.bincount(y, minlength=num_classes)[:num_classes]
            hits += torch.bincount(y[right], minlength=num_classes)[:num_classes]
    finally:
        model.train(was_training)
    n = int(counts.sum())
    correct = int(hits.sum())
    per_class = [None if c == 0 else h / c for h, c in zip(hits.tolist(), counts.tolist())]
    return {"loss": float(loss_sum) / n if n else None, "acc": correct / n if n else None,
            "per_class_acc": per_class, "n": n, "correct": correct}


def _split_arrays(data, split: str):
    if split == "val":
        return data.val_x, data.val_y
    if split == "train":
        return data.train_x, data.train_y
    raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def evaluate_run(run_dir, dataset: str | None = None, split: str = "val", data_dir: str | None = None,
                 device: str = "cpu", batch_size: int = 512, subset: int | None = None, tta: str = "none") -> dict:
    """Evaluate a run's model.safetensors on `dataset` (default: the run's own, same split seed);
    tta="flip" averages each image's prediction with its mirror image's.

    Raises RunError (a ValueError) for an unusable run, DatasetError for bad data, ValueError
    when the dataset's classes differ from the run's.
    """
    from . import data as data_mod
    from .environment import pick_device
    from .runs import RunError, load_config, load_model, resolve_run

    if tta not in TTA:
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA)}")
    path = resolve_run(run_dir)
    cfg = load_config(path)
    dev = pick_device(device)
    name = dataset or cfg.get("dataset")
    if not name:
        raise RunError(f"{path / 'config.json'} names no dataset; pass --dataset")
    data = data_mod.load_dataset(name, data_dir=data_dir or (cfg.get("data_dir") if not dataset else None),
                                 split_seed=int(cfg.get("split_seed", 0)))
    run_classes = cfg.get("classes")
    n_classes = int(cfg.get("num_classes", len(run_classes) if run_classes else 10))
    if data.num_classes != n_classes:
        raise ValueError(f"{name} has {data.num_classes} classes but the run's model has {n_classes}")
    if run_classes and list(run_classes) != list(data.classes):
        raise ValueError(f"{name} has classes {list(data.classes)[:4]}... but the run was trained on "
                         f"{list(run_classes)[:4]}...; accuracy would be meaningless")
    model = load_model(path, device=dev)
    x, y = _split_arrays(data, split)
    if subset is not None:
        x, y = data_mod.fixed_subset(x, y, subset, int(cfg.get("split_seed", 0)) + (1 if split == "val" else 0))
    if len(y) == 0:
        raise ValueError(f"{name} {split} split is empty")
    mean = cfg.get("mean") or data.mean
    std = cfg.get("std") or data.std
    loader = data_mod.BatchLoader(x.to(dev), y.to(dev), mean, std, batch_size, train=False, device=dev,
                                  seed=0, augment=False)
    res = evaluate_model(model, loader, n_classes, flip_tta=(tta == "flip"))
    return {"run": str(path), "model": cfg["model"], "policy": cfg.get("policy"), "dataset": name, "split": split,
            "tta": tta, "classes": list(data.classes), **res}
