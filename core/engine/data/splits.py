"""A data set as PoolProp keeps it (uint8 tensors on the CPU), and the one error its loaders raise."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class DatasetError(ValueError):
    """A user-facing problem with a dataset: the message is one line that says what to do."""


@dataclass
class DatasetSplits:
    """A dataset as uint8 tensors on the CPU. `mean`/`std` are per channel, in [0, 1] units,
    of the training images (what `normalize` and `BatchLoader` expect)."""

    name: str
    classes: list[str]
    train_x: torch.Tensor  # (N, 3, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor  # (M, 3, H, W) uint8
    val_y: torch.Tensor  # (M,) int64
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str = ""  # one line: where the data came from and what "val" is
    info: dict = field(default_factory=dict)  # loader details (cache file, root, split rule, ...)

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def fixed_subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int):
    """A fixed, seed-determined subset of n items (in their original order); all when n is None."""
    if n is None or n >= len(y):
        return x, y
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n].sort().values
    return x[idx], y[idx]
