"""The CIFAR-10 images shipped with PoolProp: 50 per class from the project's fixed validation
split (images 4500-4549 of each class of the JPEG copy; the shipped runs never trained on them),
so that a fresh clone shows CIFAR models real CIFAR images.

Stored as one lossless WebP sheet per class (10 x 5 tiles of 32x32, row by row, image 4500 at
the top left) in cifar10_val_sample/, beside a README that says where they come from. The pixels
are the ones the trainer evaluated on (the JPEGs decoded as core.engine.data.imagefolder does).

Rebuild from an unpacked copy of the CIFAR-10 JPEG training split:

    python -m core.engine.data.cifar10_sample .data/cifar10-jpeg/train
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np

from .splits import DatasetError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SAMPLE_DIR = Path(__file__).resolve().parent / "cifar10_val_sample"
PER_CLASS = 50
FIRST = 4500  # the validation split is images 4500-4999 of each class
COLS = 10
SIDE = 32


def sheet_path(cls: str, folder: Path = SAMPLE_DIR) -> Path:
    return folder / f"{cls}.webp"


@functools.lru_cache(maxsize=2)
def load_sample(folder: str = str(SAMPLE_DIR)) -> tuple[np.ndarray, np.ndarray]:
    """All shipped images: uint8 (500, 3, 32, 32), class by class, and their labels (0-9)."""
    from PIL import Image

    xs = []
    for cls in CIFAR10_CLASSES:
        path = sheet_path(cls, Path(folder))
        try:
            with Image.open(path) as im:
                sheet = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise DatasetError(f"the shipped CIFAR-10 sample is incomplete ({path.name}: {e})") from None
        rows = sheet.shape[0] // SIDE
        tiles = sheet.reshape(rows, SIDE, COLS, SIDE, 3).transpose(0, 2, 4, 1, 3).reshape(rows * COLS, 3, SIDE, SIDE)
        xs.append(tiles[:PER_CLASS])
    x = np.ascontiguousarray(np.concatenate(xs))
    y = np.repeat(np.arange(len(CIFAR10_CLASSES)), PER_CLASS)
    x.setflags(write=False)
    return x, y


def write_sample(train_dir: str | Path, folder: Path = SAMPLE_DIR) -> list[Path]:
    """Decode images FIRST..FIRST+PER_CLASS-1 of each class from a CIFAR-10 JPEG ImageFolder
    (train/<class>/NNNN.jpg) and write the sheets; returns their paths."""
    from PIL import Image

    from .imagefolder import _decode_one

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for cls in CIFAR10_CLASSES:
        tiles = []
        for i in range(FIRST, FIRST + PER_CLASS):
            path = Path(train_dir) / cls / f"{i:04d}.jpg"
            data, note = _decode_one((str(path), SIDE))  # (bytes, resized?) or (None, error text)
            if data is None or note is True:
                raise DatasetError(f"cannot use {path}: {note if data is None else 'not a 32x32 image'}")
            tiles.append(np.frombuffer(data, np.uint8).reshape(3, SIDE, SIDE))
        grid = np.stack(tiles).reshape(-1, COLS, 3, SIDE, SIDE).transpose(0, 3, 1, 4, 2)
        grid = grid.reshape(grid.shape[0] * SIDE, COLS * SIDE, 3)
        Image.fromarray(np.ascontiguousarray(grid)).save(sheet_path(cls, folder), "WEBP", lossless=True,
                                                         quality=100, method=6)
        written.append(sheet_path(cls, folder))
    load_sample.cache_clear()
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Rebuild PoolProp's shipped CIFAR-10 validation sample.")
    ap.add_argument("train_dir", help="the unpacked CIFAR-10 JPEG training split (train/<class>/NNNN.jpg)")
    for p in write_sample(ap.parse_args().train_dir):
        print(p, p.stat().st_size, "bytes")
