"""Small deterministic samples of a data set, for the app's pictures."""

from __future__ import annotations

import numpy as np
import torch

from .cache import seed_int
from .registry import load_dataset
from .splits import DatasetError


def sample_images(name, n, split="val", data_dir=None, seed=0, *, split_seed: int = 0):
    """A small deterministic sample: (x uint8 (n, 3, H, W), labels int64 (n,), classes).

    Classes take turns (n = 10 gives one image per class on a 10-class set); which images
    depends only on `seed`. Never downloads: cifar10 must be on disk already.
    """
    if split not in ("val", "train"):
        raise DatasetError(f"split must be 'val' or 'train', got {split!r}")
    d = load_dataset(name, data_dir=data_dir, split_seed=split_seed, download=False)
    x, y = (d.val_x, d.val_y) if split == "val" else (d.train_x, d.train_y)
    g = torch.Generator().manual_seed(seed_int("sample", seed))
    perm = torch.randperm(len(y), generator=g)
    # rank of each image within its class in the permuted order, then interleave the classes
    ys = y[perm]
    rank = torch.zeros_like(ys)
    for k in range(d.num_classes):
        m = ys == k
        rank[m] = torch.arange(int(m.sum()))
    order = perm[torch.argsort(rank * d.num_classes + ys, stable=True)]
    pick = order[: max(0, int(n))]
    return x[pick].clone(), y[pick].clone(), list(d.classes)


FEATURES10 = "features10"


def builtin_images(n: int, seed: int = 0):
    """n fresh images of the built-in features10 set (offline, fast): uint8 (n, 3, 32, 32), labels, classes."""
    from .features10 import FEATURES10_CLASSES, generate_features10

    x, y = generate_features10(n, seed=10_000 + seed)
    return x.numpy(), y.numpy(), [c["name"] for c in FEATURES10_CLASSES]


def features10_heldout_name(dataset: str, n: int) -> str:
    """features10[:opts] -> the same set asking for 1 training and n validation images.

    Validation images come from their own random stream, so these are held-out images of the
    run's own distribution without generating the whole training set (12,000 images, ~10 s)."""
    _, _, opts = dataset.partition(":")
    keep = [o for o in opts.split(",") if o.strip() and not o.strip().startswith(("train=", "val="))]
    return "features10:" + ",".join(["train=1", f"val={n}", *keep])


def heldout_images(dataset: str, n: int, split_seed: int = 0, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n validation images of a dataset: uint8 (n, 3, H, W), labels, classes; another
    `seed`, other images. Never downloads; raises core.engine.data.DatasetError when the data is not on
    this machine."""
    if dataset.split(":", 1)[0].strip().lower() == FEATURES10:
        # image set `seed` is the seed-th run of n images further along the validation stream
        d = load_dataset(features10_heldout_name(dataset, n * (seed + 1)), split_seed=split_seed, download=False)
        return d.val_x[n * seed:].numpy(), d.val_y[n * seed:].numpy(), list(d.classes)
    x, y, classes = sample_images(dataset, n, split="val", seed=seed, split_seed=split_seed)
    return x.numpy(), y.numpy(), classes
