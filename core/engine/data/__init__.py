"""Data sets by name (registry.py): features10 (built in), cifar10, imagefolder:PATH; the batch
loader that augments on the device (loader.py); small samples for pictures (samples.py)."""

from .cache import cache_dir, default_data_dir
from .features10 import FEATURES10_CLASSES, features10_grid_png, generate_features10
from .imagefolder import IMG_EXTENSIONS, imagefolder_split, split_by_rule
from .loader import BatchLoader, crop_flip, normalize
from .registry import DATASET_NAMES_HELP, load_dataset
from .samples import sample_images
from .splits import DatasetError, DatasetSplits, fixed_subset

__all__ = [
    "DATASET_NAMES_HELP", "DatasetSplits", "DatasetError", "load_dataset", "normalize", "BatchLoader",
    "sample_images", "FEATURES10_CLASSES", "generate_features10", "features10_grid_png", "cache_dir",
    "default_data_dir", "imagefolder_split", "split_by_rule", "crop_flip", "IMG_EXTENSIONS", "fixed_subset",
]
