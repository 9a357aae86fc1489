"""Datasets, named by one string that the CLI, run configs and the app share.

    features10              built-in: 10 procedurally generated 32x32 RGB classes that differ
                            in spatial frequency, orientation, colour and shape (offline, no files)
    cifar10                 CIFAR-10 via torchvision (downloaded, or read from --data-dir);
                            train = the 50,000 training images, val = the 10,000 test images
    imagefolder:PATH        any ImageFolder tree: PATH/train + PATH/val (or PATH/test), or one
                            folder of class subfolders split by a fixed rule (last 10% by name)

Every loader returns a `DatasetSplits` of uint8 tensors. Images are decoded once and kept as
bytes (4x smaller than float32, and cheap to put on a GPU once); `BatchLoader` then normalises
and augments whole batches of tensors on the device, as KellerJordan/cifar10-airbench does, so
that no per-image Python runs while training. Decoded folders (imagefolder, cifar10) are cached
as safetensors under `$POOLPROP_CACHE` (default ~/.cache/poolprop), keyed by a hash of the file
list (paths, sizes, mtimes): a changed folder is decoded again. PoolProp never writes pickle;
CIFAR-10's own files are pickles, which are read with an unpickler that only admits numpy arrays.
"""

from __future__ import annotations

from .cifar10 import load_cifar10
from .features10 import load_features10
from .imagefolder import load_imagefolder
from .splits import DatasetError, DatasetSplits

DATASET_NAMES_HELP = (
    "dataset names: 'features10' (built-in, offline; options as features10:train=N,val=M,seed=S), "
    "'cifar10' (torchvision: downloaded, or read from --data-dir), "
    "'imagefolder:PATH' (PATH/<class>/<image>, or PATH/train + PATH/val)"
)


def load_dataset(name: str, data_dir: str | None = None, split_seed: int = 0, download: bool = True) -> DatasetSplits:
    """Load a dataset by name (see DATASET_NAMES_HELP).

    `data_dir`: where cifar10 is (or is downloaded to); for imagefolder a relative PATH that
    does not exist from the working directory is also looked up under it.
    `split_seed`: features10 is generated from it (unless the name says seed=S); the splits of
    cifar10 and imagefolder are fixed by rule and ignore it, so that runs compare.
    `download`: cifar10 only; when False a missing dataset is an error instead of a download.
    """
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"no dataset name given; {DATASET_NAMES_HELP}")
    name = name.strip()
    kind, sep, arg = name.partition(":")
    kind = kind.strip().lower()
    if kind == "features10":
        return load_features10(name, arg if sep else "", split_seed)
    if kind in ("cifar10", "cifar-10"):
        if arg.strip():
            raise DatasetError(f"cifar10 takes no options (got {name!r}); use --data-dir to say where it is")
        return load_cifar10(name, data_dir, download)
    if kind == "imagefolder":
        if not arg.strip():
            raise DatasetError(f"imagefolder needs a path, as imagefolder:PATH (got {name!r})")
        return load_imagefolder(name, arg.strip(), data_dir)
    raise DatasetError(f"unknown dataset {name!r}; {DATASET_NAMES_HELP}")
