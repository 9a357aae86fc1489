"""Small deterministic samples of a data set, for the app's pictures: a run's validation
images, from its full data when it is on this machine, else (CIFAR-10) from the shipped sample."""

from __future__ import annotations

import numpy as np
import torch

from .cache import seed_int
from .cifar10_sample import CIFAR10_CLASSES, load_sample
from .registry import load_dataset
from .splits import DatasetError

SHIPPED_NOTE = ("the shipped sample of the CIFAR-10 validation split (50 images a class; "
                "the full data is not on this machine)")


def _interleaved(y: torch.Tensor, num_classes: int, n: int, seed: int) -> torch.Tensor:
    """Indices of n items of y in a seed-determined order in which the classes take turns."""
    g = torch.Generator().manual_seed(seed_int("sample", seed))
    perm = torch.randperm(len(y), generator=g)
    # rank of each image within its class in the permuted order, then interleave the classes
    ys = y[perm]
    rank = torch.zeros_like(ys)
    for k in range(num_classes):
        m = ys == k
        rank[m] = torch.arange(int(m.sum()))
    order = perm[torch.argsort(rank * num_classes + ys, stable=True)]
    return order[: max(0, int(n))]


def sample_images(name, n, split="val", data_dir=None, seed=0, *, split_seed: int = 0):
    """A small deterministic sample: (x uint8 (n, 3, H, W), labels int64 (n,), classes).

    Classes take turns (n = 10 gives one image per class on a 10-class set); which images
    depends only on `seed`. Never downloads: cifar10 must be on disk already.
    """
    if split not in ("val", "train"):
        raise DatasetError(f"split must be 'val' or 'train', got {split!r}")
    d = load_dataset(name, data_dir=data_dir, split_seed=split_seed, download=False)
    x, y = (d.val_x, d.val_y) if split == "val" else (d.train_x, d.train_y)
    pick = _interleaved(y, d.num_classes, n, seed)
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


def is_cifar10(dataset: str, classes=None) -> bool:
    """A CIFAR-10 run: torchvision's cifar10, or any data set of its ten classes (the shipped runs
    train on an image folder of the JPEG copy, wherever it was unpacked)."""
    kind = str(dataset).split(":", 1)[0].strip().lower()
    return kind in ("cifar10", "cifar-10") or list(classes or []) == list(CIFAR10_CLASSES)


def shipped_cifar10(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n images of the shipped CIFAR-10 sample (core.engine.data.cifar10_sample), classes taking
    turns; another `seed`, other images (at most the 500 shipped)."""
    x, y = load_sample()
    pick = _interleaved(torch.as_tensor(y), len(CIFAR10_CLASSES), n, seed).numpy()
    return x[pick], y[pick], list(CIFAR10_CLASSES)


def run_images(config: dict | None, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str], str | None]:
    """n validation images of the data a run trained on: (uint8 (n, 3, H, W), labels, classes,
    source). source is None for the run's own validation split, else where the images came from
    (the shipped CIFAR-10 sample when a CIFAR-10 run's data is not here). Raises DatasetError
    when a run of another data set has no data here."""
    cfg = config or {}
    dataset = str(cfg.get("dataset", FEATURES10))
    try:
        return (*heldout_images(dataset, n, int(cfg.get("split_seed", 0) or 0), seed), None)
    except (DatasetError, OSError):
        if not is_cifar10(dataset, cfg.get("classes")):
            raise
    return (*shipped_cifar10(n, seed), SHIPPED_NOTE)
