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

import codecs
import hashlib
import importlib
import io
import json
import math
import multiprocessing
import os
import pickle
import re
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASET_NAMES_HELP", "DatasetSplits", "DatasetError", "load_dataset", "normalize", "BatchLoader",
    "sample_images", "FEATURES10_CLASSES", "generate_features10", "features10_grid_png", "cache_dir",
    "default_data_dir", "imagefolder_split", "split_by_rule", "crop_flip", "IMG_EXTENSIONS",
]

DATASET_NAMES_HELP = (
    "dataset names: 'features10' (built-in, offline; options as features10:train=N,val=M,seed=S), "
    "'cifar10' (torchvision: downloaded, or read from --data-dir), "
    "'imagefolder:PATH' (PATH/<class>/<image>, or PATH/train + PATH/val)"
)

CACHE_FORMAT = 1  # bump when the decoded contents of a cache file would change (rules, resizing)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FALLBACK_SIZE = 32  # side of the common size when a folder's images are not all one square size
CROP_PADDING = 4  # random-crop padding (zeros in pixel space, i.e. black, as torchvision RandomCrop)
VAL_EVERY = 10  # imagefolder single-folder rule: the last 1/10 of each class (by name) is validation
PARALLEL_MIN_FILES = 2000  # below this, decode in this process


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


# ---------------------------------------------------------------------------------------
# Names and paths
# ---------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """`$POOLPROP_CACHE`, or ~/.cache/poolprop."""
    return Path(os.environ.get("POOLPROP_CACHE") or "~/.cache/poolprop").expanduser()


def default_data_dir() -> Path:
    """Where cifar10 lives when no data_dir is given: `$POOLPROP_DATA`, or <cache dir>/data."""
    env = os.environ.get("POOLPROP_DATA")
    return Path(env).expanduser() if env else cache_dir() / "data"


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
        return _load_features10(name, arg if sep else "", split_seed)
    if kind in ("cifar10", "cifar-10"):
        if arg.strip():
            raise DatasetError(f"cifar10 takes no options (got {name!r}); use --data-dir to say where it is")
        return _load_cifar10(name, data_dir, download)
    if kind == "imagefolder":
        if not arg.strip():
            raise DatasetError(f"imagefolder needs a path, as imagefolder:PATH (got {name!r})")
        return _load_imagefolder(name, arg.strip(), data_dir)
    raise DatasetError(f"unknown dataset {name!r}; {DATASET_NAMES_HELP}")


# ---------------------------------------------------------------------------------------
# Shared helpers: statistics, cache files
# ---------------------------------------------------------------------------------------

def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std in [0, 1] units of uint8 images (N, C, H, W), from
    per-channel histograms (no float copy of the whole set)."""
    if x.numel() == 0:
        raise DatasetError("the training split is empty: no images to compute statistics from")
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        m = (counts * levels).sum() / n
        var = (counts * (levels - m) ** 2).sum() / n
        means.append(float(m))
        stds.append(max(float(var.sqrt()), 1.0 / 255.0))  # a constant channel must not divide by 0
    return tuple(means), tuple(stds)


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, separators=(",", ":"), default=str).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "data"


def _read_cache(path: Path) -> DatasetSplits | None:
    """A cached DatasetSplits, or None when the file is absent or unusable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        info = json.loads(meta["poolprop"])
        if info.get("format") != CACHE_FORMAT:
            return None
        tx, ty, vx, vy = t["train_x"], t["train_y"], t["val_x"], t["val_y"]
        ok = (tx.dtype == torch.uint8 and vx.dtype == torch.uint8 and ty.dtype == torch.int64
              and vy.dtype == torch.int64 and tx.ndim == 4 and vx.ndim == 4 and len(tx) == len(ty)
              and len(vx) == len(vy) and tx.shape[1:] == vx.shape[1:])
        if not ok:
            raise ValueError("unexpected tensor shapes or dtypes")
        return DatasetSplits(name=info["name"], classes=list(info["classes"]), train_x=tx, train_y=ty,
                             val_x=vx, val_y=vy, mean=tuple(info["mean"]), std=tuple(info["std"]),
                             description=info.get("description", ""), info=dict(info.get("info", {})))
    except Exception as e:  # noqa: BLE001 - a broken cache is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable dataset cache {path} ({type(e).__name__}: {e}); decoding again",
                      stacklevel=3)
        return None


def _write_cache(path: Path, d: DatasetSplits, stale_glob: str | None = None) -> bool:
    """Write `d` as safetensors, atomically; remove older caches of the same source. A cache that
    cannot be written (read-only home, full disk) is a warning, not an error."""
    from .atomic import write_safetensors

    meta = {"format": CACHE_FORMAT, "name": d.name, "classes": list(d.classes), "mean": list(d.mean),
            "std": list(d.std), "description": d.description, "info": d.info}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, {"train_x": d.train_x, "train_y": d.train_y, "val_x": d.val_x, "val_y": d.val_y},
                          metadata={"poolprop": json.dumps(meta)})
    except OSError as e:
        warnings.warn(f"could not write dataset cache {path} ({e}); it will be decoded again next time",
                      stacklevel=3)
        return False
    if stale_glob:
        for old in path.parent.glob(stale_glob):
            if old != path:
                try:
                    old.unlink()
                except OSError:
                    pass
    return True


def _finish(name, classes, tx, ty, vx, vy, description, info) -> DatasetSplits:
    mean, std = _channel_stats(tx)
    return DatasetSplits(name=name, classes=list(classes), train_x=tx.contiguous(), train_y=ty.to(torch.int64),
                         val_x=vx.contiguous(), val_y=vy.to(torch.int64), mean=mean, std=std,
                         description=description, info=info)


# ---------------------------------------------------------------------------------------
# features10: a built-in, procedurally generated set
# ---------------------------------------------------------------------------------------

FEATURES10_SIZE = 32
FEATURES10_TRAIN, FEATURES10_VAL = 10_000, 2_000

#: One dict per class, in label order. `frequency`: dominant spatial frequency in cycles/pixel
#: (Nyquist = 0.5): for gratings across the stripes, for checkers along x and along y (its 2-D
#: spectrum peaks at (±f, ±f)); None for classes without one (colour blobs, the cross).
#: `orientation`: direction of the stripes in degrees (0 = horizontal, 90 = vertical, 45 = diagonal,
#: either diagonal); None when not oriented. `band`: "low" / "high" frequency, "colour" or "shape".
#: Pairs that differ only in frequency: 0/2, 1/3 (gratings) and 6/5 (checkers); 7/8 only in colour.
FEATURES10_CLASSES: list[dict] = [
    {"name": "low_horizontal", "description": "horizontal stripes, 2 cycles per 32 px",
     "frequency": 0.0625, "orientation": 0.0, "band": "low"},
    {"name": "low_vertical", "description": "vertical stripes, 2 cycles per 32 px",
     "frequency": 0.0625, "orientation": 90.0, "band": "low"},
    {"name": "high_horizontal", "description": "horizontal stripes, period 2.7 px (as class 0, 6x the frequency)",
     "frequency": 0.375, "orientation": 0.0, "band": "high"},
    {"name": "high_vertical", "description": "vertical stripes, period 2.7 px (as class 1, 6x the frequency)",
     "frequency": 0.375, "orientation": 90.0, "band": "high"},
    {"name": "high_diagonal", "description": "diagonal stripes (either diagonal), period 2.7 px",
     "frequency": 0.375, "orientation": 45.0, "band": "high"},
    {"name": "fine_checker", "description": "soft checkerboard, squares of 2.7 px (as class 6, 3x the frequency)",
     "frequency": 0.1875, "orientation": None, "band": "high"},
    {"name": "coarse_checker", "description": "soft checkerboard, squares of 8 px",
     "frequency": 0.0625, "orientation": None, "band": "low"},
    {"name": "red_blob", "description": "a red Gaussian blob (as class 8 but red)",
     "frequency": None, "orientation": None, "band": "colour"},
    {"name": "blue_blob", "description": "a blue-cyan Gaussian blob (as class 7 but blue)",
     "frequency": None, "orientation": None, "band": "colour"},
    {"name": "cross", "description": "a plus-shaped cross, lighter or darker than the background, bars 2-3.5 px wide",
     "frequency": None, "orientation": None, "band": "shape"},
]

_CHUNK = 2048


def _seed_int(*parts) -> int:
    """A 63-bit seed from any parts, stable across runs and platforms (not Python's hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def generate_features10(n: int | None = None, seed: int = 0, *, labels: torch.Tensor | None = None,
                        clean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate features10 images: (x uint8 (n, 3, 32, 32), y int64 (n,)), deterministic in `seed`.

    `labels` fixes the classes (default: balanced, shuffled). `clean=True` gives the textbook
    version of each class (exact frequency and orientation, zero phase, full frame, grey
    background, no noise): what FEATURES10_CLASSES describes, used to check it.

    Variation (clean=False): random phase, frequency x U(0.92, 1.08), orientation ±5°, contrast,
    position and size (patterns fill a soft disk of random centre and radius), background grey
    level, tint and a gentle illumination gradient, pattern tint, additive uniform noise.
    Pattern contrast (half the peak-to-peak amplitude, times the tint) is U(0.08, 0.25) and the
    noise standard deviation U(0.06, 0.16) per image (_DIFFICULTY): a ResNet-20 reaches 80-99%
    in about 300 steps of 128 and ~100% later. Colour is uninformative except for the blob pair.
    """
    g = torch.Generator().manual_seed(_seed_int("features10", seed))
    if labels is None:
        if n is None:
            raise ValueError("give n or labels")
        labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    n = len(labels)
    if n and (labels.min() < 0 or labels.max() > 9):
        raise ValueError("features10 labels are 0..9")
    # Every parameter is drawn for every image, in a fixed order: the images depend only on
    # (seed, labels) (and on n through the labels), never on how they are chunked.
    P = _features10_params(n, g, clean)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    x = torch.empty(n, 3, FEATURES10_SIZE, FEATURES10_SIZE, dtype=torch.uint8)
    for i in range(0, n, _CHUNK):  # chunks keep the float intermediates small
        sl = slice(i, min(n, i + _CHUNK))
        noise = None
        if not clean:  # each chunk's noise from its own stream (fixed chunk size: deterministic)
            noise = _uniform_noise((sl.stop - i, 3, FEATURES10_SIZE, FEATURES10_SIZE), P["noise"][sl],
                                   _seed_int("noise", noise_seed, i))
        x[sl] = _features10_render(labels[sl], {k: v[sl] for k, v in P.items()}, noise)
    return x, labels


# The ranges of the two parameters that set how hard features10 is (uniform draws per image).
# Changing them changes the data set: runs made before and after would not compare.
_DIFFICULTY = {"contrast": (0.08, 0.25), "noise": (0.06, 0.16)}


def _features10_params(n: int, g: torch.Generator, clean: bool) -> dict[str, torch.Tensor]:
    def U(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    P = {
        "freq_jitter": U(0.92, 1.08), "angle_jitter": U(-5.0, 5.0), "diag_sign": (torch.rand(n, generator=g) < 0.5),
        "phase1": U(0, 2 * math.pi), "phase2": U(0, 2 * math.pi),
        "cx": U(8.0, 23.0), "cy": U(8.0, 23.0), "radius": U(11.0, 18.0),
        "contrast": U(*_DIFFICULTY["contrast"]), "tint": U(0.35, 1.0, 3),
        "bg_level": U(0.3, 0.7), "bg_tint": U(-0.08, 0.08, 3), "bg_gx": U(-0.005, 0.005), "bg_gy": U(-0.005, 0.005),
        "blob_sigma": U(2.5, 5.0), "blob_alpha": U(0.75, 1.0),
        "red": torch.stack([U(0.75, 1.0), U(0.0, 0.3), U(0.0, 0.3)], 1),
        "blue": torch.stack([U(0.0, 0.2), U(0.35, 0.75), U(0.75, 1.0)], 1),
        "cross_width": U(2.0, 3.5), "cross_len": U(5.0, 10.0), "cross_sign": torch.rand(n, generator=g) < 0.5,
        "noise": U(*_DIFFICULTY["noise"]),
    }
    if clean:
        c = FEATURES10_SIZE / 2 - 0.5
        P.update(freq_jitter=torch.ones(n), angle_jitter=torch.zeros(n), diag_sign=torch.zeros(n, dtype=torch.bool),
                 phase1=torch.zeros(n), phase2=torch.zeros(n), cx=torch.full((n,), c), cy=torch.full((n,), c),
                 radius=torch.full((n,), 1e3), contrast=torch.full((n,), 0.4), tint=torch.ones(n, 3),
                 bg_level=torch.full((n,), 0.5), bg_tint=torch.zeros(n, 3), bg_gx=torch.zeros(n),
                 bg_gy=torch.zeros(n), blob_sigma=torch.full((n,), 4.0), blob_alpha=torch.ones(n),
                 red=torch.tensor([[0.9, 0.1, 0.1]]).expand(n, 3), blue=torch.tensor([[0.1, 0.5, 0.9]]).expand(n, 3),
                 cross_width=torch.full((n,), 3.0), cross_len=torch.full((n,), 8.0),
                 cross_sign=torch.ones(n, dtype=torch.bool), noise=torch.zeros(n))
    return P


def _features10_render(y: torch.Tensor, P: dict[str, torch.Tensor], noise: torch.Tensor | None) -> torch.Tensor:
    """Images for labels y (B,) from per-image parameters: uint8 (B, 3, S, S).

    Each class's pattern is computed only for its own images, and waves are built separably
    (cos(a + b) = cos a cos b - sin a sin b, with a along x and b along y): generation stays fast.
    """
    S, B = FEATURES10_SIZE, len(y)
    ar = torch.arange(S, dtype=torch.float32)
    DX = ar.view(1, 1, S) - P["cx"].view(B, 1, 1)  # (B, 1, S) offsets from the pattern centre
    DY = ar.view(1, S, 1) - P["cy"].view(B, 1, 1)  # (B, S, 1)
    pattern = torch.zeros(B, S, S)

    def wave(idx, kx, ky, phase):
        """cos(kx * dx + ky * dy + phase) for images idx: (b, S, S)."""
        ax = kx.view(-1, 1, 1) * DX[idx]
        by = ky.view(-1, 1, 1) * DY[idx] + phase.view(-1, 1, 1)
        return torch.cos(ax) * torch.cos(by) - torch.sin(ax) * torch.sin(by)

    def disk(idx):
        """Soft disk (1-pixel linear edge) where the pattern shows: (b, S, S)."""
        r = (DX[idx] ** 2 + DY[idx] ** 2).sqrt_()
        return (P["radius"][idx].view(-1, 1, 1) - r).add_(0.5).clamp_(0, 1)

    idx = torch.nonzero(y <= 6).squeeze(1)  # gratings and checkers
    if len(idx):
        cls = y[idx]
        orient = torch.tensor([c["orientation"] or 0.0 for c in FEATURES10_CLASSES])[cls]
        orient = torch.where((cls == 4) & P["diag_sign"][idx], -orient, orient)  # class 4: either diagonal
        theta = torch.deg2rad(orient + P["angle_jitter"][idx])
        k = 2 * math.pi * torch.tensor([c["frequency"] or 0.0 for c in FEATURES10_CLASSES])[cls] * P["freq_jitter"][idx]
        # stripes at angle theta vary along their normal (-sin, cos) (y points down): theta = 0
        # gives horizontal stripes, intensity varying along y
        pat = wave(idx, -k * torch.sin(theta), k * torch.cos(theta), P["phase1"][idx])
        chk = (cls >= 5).nonzero().squeeze(1)
        if len(chk):  # checkers: times a second wave along the stripes
            kc, tc = k[chk], theta[chk]
            along = wave(idx[chk], kc * torch.cos(tc), kc * torch.sin(tc), P["phase2"][idx[chk]])
            pat[chk] *= 1.3 * along
        pattern[idx] = pat * disk(idx)

    idx = torch.nonzero(y == 9).squeeze(1)  # the cross: two bars with 1-pixel linear edges
    if len(idx):
        hw = P["cross_width"][idx].view(-1, 1, 1) / 2 + 0.5
        L = P["cross_len"][idx].view(-1, 1, 1) + 0.5
        adx, ady = DX[idx].abs(), DY[idx].abs()
        bar_h = (hw - ady).clamp_(0, 1) * (L - adx).clamp_(0, 1)
        bar_v = (hw - adx).clamp_(0, 1) * (L - ady).clamp_(0, 1)
        sign = torch.where(P["cross_sign"][idx], 1.8, -1.8).view(-1, 1, 1)  # lighter or darker
        pattern[idx] = torch.maximum(bar_h, bar_v) * sign

    bg = (P["bg_level"].view(B, 1, 1, 1) + P["bg_gx"].view(B, 1, 1, 1) * (ar - S / 2).view(1, 1, 1, S)
          + P["bg_gy"].view(B, 1, 1, 1) * (ar - S / 2).view(1, 1, S, 1))  # (B, 1, S, S)
    img = (P["contrast"].view(B, 1, 1, 1) * P["tint"].view(B, 3, 1, 1)) * pattern.unsqueeze(1)  # (B, 3, S, S)
    img += bg
    img += P["bg_tint"].view(B, 3, 1, 1)

    idx = torch.nonzero((y == 7) | (y == 8)).squeeze(1)  # blobs: paint a colour over the background
    if len(idx):
        r2 = DX[idx] ** 2 + DY[idx] ** 2
        a = torch.exp(-r2 / (2 * P["blob_sigma"][idx].view(-1, 1, 1) ** 2)) * P["blob_alpha"][idx].view(-1, 1, 1)
        colour = torch.where((y[idx] == 7).view(-1, 1), P["red"][idx], P["blue"][idx]).view(-1, 3, 1, 1)
        a = a.unsqueeze(1)
        img[idx] = img[idx] * (1 - a) + colour * a
    if noise is not None:
        img += noise
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _uniform_noise(shape, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    """Zero-mean uniform noise with per-image standard deviation sigma (B,), from random bytes
    (several times cheaper than torch.randn for 30M values, which dominated generation)."""
    n = math.prod(shape)
    words = np.random.PCG64(seed).random_raw(-(-n // 8))  # uint64, all 64 bits random
    u8 = torch.from_numpy(words.view(np.uint8)[:n].reshape(shape))
    # uniform on 256 levels: mean 127.5, standard deviation sqrt((256**2 - 1) / 12) = 73.9
    return (u8.to(torch.float32) - 127.5).mul_((sigma / 73.9001).view(-1, *([1] * (len(shape) - 1))))


def _parse_options(text: str, allowed: dict[str, type], what: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in allowed:
            raise DatasetError(f"{what}: bad option {item!r}; allowed: {', '.join(f'{k}=N' for k in allowed)}")
        try:
            out[key] = allowed[key](val.strip())
        except ValueError:
            raise DatasetError(f"{what}: option {key} needs a whole number, got {val.strip()!r}") from None
    return out


def _load_features10(name: str, options: str, split_seed: int) -> DatasetSplits:
    opts = _parse_options(options, {"train": int, "val": int, "seed": int}, "features10")
    n_train, n_val = opts.get("train", FEATURES10_TRAIN), opts.get("val", FEATURES10_VAL)
    seed = opts.get("seed", split_seed)
    if n_train < 1 or n_val < 0:
        raise DatasetError(f"features10: need train >= 1 and val >= 0 images (got train={n_train}, val={n_val})")
    # train and val come from separate random streams of the same seed: they never share an image
    tx, ty = generate_features10(n_train, seed=_seed_int("train", seed))
    vx, vy = generate_features10(n_val, seed=_seed_int("val", seed))
    return _finish(name, [c["name"] for c in FEATURES10_CLASSES], tx, ty, vx, vy,
                   f"features10 (built-in, seed {seed}): {n_train} train / {n_val} val images, 32x32",
                   {"source": "features10", "seed": seed})


def features10_grid_png(path, per_class: int = 8, scale: int = 3, seed: int = 0) -> Path:
    """Write a PNG with one row per features10 class (`per_class` examples, upscaled `scale`x
    nearest) and the class names on the left: the picture in docs/datasets.md."""
    from PIL import Image, ImageDraw, ImageFont

    from .atomic import write_bytes

    labels = torch.arange(10).repeat_interleave(per_class)
    x, _ = generate_features10(labels=labels, seed=seed)
    S, gap, label_w, pad = FEATURES10_SIZE * scale, 2, 150, 4
    W = label_w + per_class * (S + gap) + pad
    H = 10 * (S + gap) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: bitmap font only
        font = ImageFont.load_default()
    for k in range(10):
        top = pad + k * (S + gap)
        c = FEATURES10_CLASSES[k]
        draw.text((6, top + S // 2 - 16), f"{k} {c['name']}", fill=(0, 0, 0), font=font)
        sub = f"f={c['frequency']:g} c/px" if c["frequency"] else c["band"]
        draw.text((6, top + S // 2 + 2), sub, fill=(90, 90, 90), font=font)
        for j in range(per_class):
            arr = x[k * per_class + j].permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((S, S), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + j * (S + gap), top))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------
# cifar10 (torchvision's on-disk format, read without running arbitrary pickle code)
# ---------------------------------------------------------------------------------------

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"


def _np_core(sub: str):
    try:
        return importlib.import_module(f"numpy._core.{sub}")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module(f"numpy.core.{sub}")


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR-10 batch holds (dicts, lists, strings and numpy arrays): a
    tampered file cannot run code."""

    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return getattr(_np_core("multiarray"), name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return getattr(_np_core("numeric"), name)  # numpy's pickle protocol 5
        if module == "_codecs" and name == "encode":  # how protocol 2 pickles bytes
            return codecs.encode
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 file")


def _read_cifar_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        obj = _CifarUnpickler(f, encoding="latin1").load()
    if not isinstance(obj, dict):
        raise DatasetError(f"cifar10: {path} is not a CIFAR-10 batch (no dict inside)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The published files and md5 checksums (the same table as torchvision.datasets.CIFAR10's; kept
# here so that a cached load does not import torchvision, which takes seconds)
CIFAR10_TRAIN_FILES = [("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                       ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                       ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                       ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                       ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")]
CIFAR10_TEST_FILES = [("test_batch", "40351d587109b95175f43aff81a1287e")]
CIFAR10_META_FILE = ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"


def _cifar10_where(root: Path) -> str:
    return (f"put the extracted folder '{CIFAR10_FOLDER}' (or '{CIFAR10_ARCHIVE}') in {root} "
            f"(or pass --data-dir DIR), or use imagefolder:PATH with a folder of images")


def _cifar10_fetch(root: Path, download: bool) -> None:
    """Make root/cifar-10-batches-py exist: extract a tar.gz that is there, or download."""
    from torchvision.datasets.utils import download_and_extract_archive, extract_archive

    archive = root / CIFAR10_ARCHIVE
    if archive.is_file():
        if _md5(archive) != CIFAR10_ARCHIVE_MD5:
            raise DatasetError(f"cifar10: {archive} is corrupt or incomplete (md5 mismatch); delete it and "
                               f"download again, or {_cifar10_where(root)}")
        extract_archive(str(archive), str(root))
        return
    if not download:
        raise DatasetError(f"cifar10: {root / CIFAR10_FOLDER} not found and download is off; {_cifar10_where(root)}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(CIFAR10_URL, str(root), filename=CIFAR10_ARCHIVE, md5=CIFAR10_ARCHIVE_MD5)
    except Exception as e:  # noqa: BLE001 - offline, proxy, disk: all mean "could not download"
        if archive.exists():  # a partial download would fail the md5 check next time
            try:
                archive.unlink()
            except OSError:
                pass
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise DatasetError(f"cifar10: could not download CIFAR-10 ({reason}); {_cifar10_where(root)}") from None


def _load_cifar10(name: str, data_dir: str | None, download: bool) -> DatasetSplits:
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    folder = root / CIFAR10_FOLDER
    train_files, test_files, meta_file = CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILES, CIFAR10_META_FILE
    names = [n for n, _ in train_files] + [n for n, _ in test_files] + [meta_file[0]]
    if not all((folder / n).is_file() for n in names):
        missing_all = not folder.exists()
        if not missing_all:
            missing = [n for n in names if not (folder / n).is_file()]
            raise DatasetError(f"cifar10: {folder} is incomplete (missing {', '.join(missing)}); "
                               f"delete it and download again, or {_cifar10_where(root)}")
        _cifar10_fetch(root, download)
    stat = [(n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in names]
    key = _key("cifar10", CACHE_FORMAT, str(folder.resolve()), stat)
    stem = f"cifar10-{_key(str(folder.resolve()))[:8]}"  # one cache per folder; older versions are removed
    cpath = cache_dir() / f"{stem}-{key[:16]}.safetensors"
    cached = _read_cache(cpath)
    if cached is not None:
        cached.name = name
        return cached

    for n, md5 in train_files + test_files + [meta_file]:
        if _md5(folder / n) != md5:
            raise DatasetError(f"cifar10: {folder / n} is corrupt (md5 mismatch with torchvision's checksum); "
                               f"delete {folder} and download again, or {_cifar10_where(root)}")

    def batches(files):
        xs, ys = [], []
        for n, _ in files:
            try:
                b = _read_cifar_pickle(folder / n)
                data = np.asarray(b["data"], dtype=np.uint8)
                labels = np.asarray(b["labels"] if "labels" in b else b["fine_labels"], dtype=np.int64)
                if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                    raise ValueError(f"data {data.shape} and {len(labels)} labels do not fit")
            except (KeyError, TypeError, pickle.UnpicklingError, EOFError, ValueError) as e:
                raise DatasetError(f"cifar10: cannot read {folder / n} ({type(e).__name__}: {e})") from None
            # each row is 3072 bytes: the 1024 red values (32 rows of 32), then green, then blue
            xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
            ys.append(torch.from_numpy(labels))
        return torch.cat(xs), torch.cat(ys)

    tx, ty = batches(train_files)
    vx, vy = batches(test_files)
    try:
        meta = _read_cifar_pickle(folder / meta_file[0])
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f"cifar10: cannot read {folder / meta_file[0]} ({type(e).__name__}: {e})") from None
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get("label_names", [])]
    if len(classes) != 10:
        raise DatasetError(f"cifar10: {folder / meta_file[0]} does not list 10 class names")
    d = _finish(name, classes, tx, ty, vx, vy,
                "CIFAR-10 (torchvision files): train = the 50,000 training images, val = the 10,000 test images",
                {"source": "cifar10", "root": str(folder), "cache": str(cpath)})
    _write_cache(cpath, d, stale_glob=f"{stem}-*.safetensors")
    return d


# ---------------------------------------------------------------------------------------
# imagefolder:PATH
# ---------------------------------------------------------------------------------------

def imagefolder_split(n: int) -> int:
    """How many of a class's n files (sorted by name) are validation, taken from the end:
    n // 10, at least 1 when the class has 2 or more files. 5,000 -> the last 500."""
    return 0 if n < 2 else max(1, n // VAL_EVERY)


def _list_images(class_dir: Path) -> list[tuple[str, int, int]]:
    """(path relative to class_dir with '/', size, mtime_ns) of every image below class_dir,
    sorted by that relative path (plain string order)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, class_dir)
        for fn in filenames:
            if fn.startswith(".") or not fn.lower().endswith(IMG_EXTENSIONS):
                continue
            st = os.stat(os.path.join(dirpath, fn))
            rel = fn if rel_dir == "." else f"{rel_dir}/{fn}".replace(os.sep, "/")
            out.append((rel, st.st_size, st.st_mtime_ns))
    out.sort(key=lambda e: e[0])
    return out


def _class_dirs(folder: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"imagefolder: no class folders in {folder} (expected {folder}/<class>/<image>)")
    return classes


def _scan_imagefolder(root: Path) -> dict:
    """The layout and file lists of an ImageFolder tree (no image is opened)."""
    val_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    train_dir = root / "train"
    if train_dir.is_dir() and val_dir is not None:
        classes = _class_dirs(train_dir)
        extra = sorted(set(_class_dirs(val_dir)) - set(classes))
        if extra:
            raise DatasetError(f"imagefolder: {val_dir} has classes that {train_dir} lacks: {', '.join(extra[:5])}")
        train, val = [], []
        for k, c in enumerate(classes):
            files = _list_images(train_dir / c)
            if not files:
                raise DatasetError(f"imagefolder: class folder {train_dir / c} has no images")
            train += [(f"train/{c}/{r}", s, m, k) for r, s, m in files]
            if (val_dir / c).is_dir():
                val += [(f"{val_dir.name}/{c}/{r}", s, m, k) for r, s, m in _list_images(val_dir / c)]
        return {"layout": f"train/{val_dir.name}", "classes": classes, "train": train, "val": val}
    base = train_dir if train_dir.is_dir() else root
    prefix = "train/" if base is train_dir else ""
    classes = _class_dirs(base)
    listing = {}
    for c in classes:
        listing[c] = _list_images(base / c)
        if not listing[c]:
            raise DatasetError(f"imagefolder: class folder {base / c} has no images")
    train, val = split_by_rule(listing)
    return {"layout": "split: last 10% of each class by file name is val", "classes": classes,
            "train": [(f"{prefix}{c}/{r}", s, m, k) for c, r, s, m, k in train],
            "val": [(f"{prefix}{c}/{r}", s, m, k) for c, r, s, m, k in val]}


def split_by_rule(listing: dict[str, list]) -> tuple[list, list]:
    """The single-folder rule. listing: class -> entries whose first item is the file name
    (path within the class folder). Classes are labelled in sorted order; within a class the
    entries are sorted by name and the last imagefolder_split(n) are validation.
    Returns (train, val) lists of (class, *entry, label)."""
    train, val = [], []
    for k, c in enumerate(sorted(listing)):
        entries = sorted((tuple(e) if isinstance(e, (tuple, list)) else (e,) for e in listing[c]), key=lambda e: e[0])
        cut = len(entries) - imagefolder_split(len(entries))
        train += [(c, *e, k) for e in entries[:cut]]
        val += [(c, *e, k) for e in entries[cut:]]
    return train, val


_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


def _decode_jpeg_fast(path: str, side: int) -> bytes | None:
    """CHW bytes of a JPEG of exactly side x side through torchvision's libjpeg-turbo decoder
    (pixel-identical to Pillow's here, about 3x faster for small files), or None to let
    Pillow handle it (other sizes, CMYK, broken files: Pillow then reports the error)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        with open(path, "rb") as f:
            raw = f.read()
        t = decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception:  # noqa: BLE001
        return None
    return t.numpy().tobytes() if tuple(t.shape) == (3, side, side) else None


def _decode_one(job):
    """Worker: (path, side or None) -> (CHW bytes, resized?) or (None, error text).
    side = the first image's (square) side: images of exactly that size are kept as they are;
    any other image is brought to FALLBACK_SIZE (shorter side scaled, centre crop)."""
    path, side = job
    if side is not None and path.lower().endswith((".jpg", ".jpeg")):
        fast = _decode_jpeg_fast(path, side)
        if fast is not None:
            return fast, False
    try:
        from PIL import Image, ImageOps

        with Image.open(path) as im:
            if side is not None and im.size == (side, side):
                arr = np.asarray(im.convert("RGB"))
                resized = False
            else:
                t = FALLBACK_SIZE
                if im.format == "JPEG":
                    im.draft("RGB", (t, t))  # DCT-domain downscale: much faster for big JPEGs
                arr = np.asarray(ImageOps.fit(im.convert("RGB"), (t, t), Image.Resampling.BILINEAR))
                resized = True
        return np.ascontiguousarray(arr.transpose(2, 0, 1)).tobytes(), resized
    except Exception as e:  # noqa: BLE001 - reported with the file's name by the parent
        return None, f"{type(e).__name__}: {e}"


def _worker_init():
    torch.set_num_threads(1)  # a forked worker must not use the parent's thread pool


class _NoBar:
    """Stands in for tqdm where it is not installed."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


def _pool_map(fn, jobs, desc: str):
    """Map fn over jobs in order, in parallel when it pays, with a tqdm progress bar.
    Processes (fork) when this process is single-threaded on Linux; threads otherwise (Pillow
    releases the GIL while decoding), since forking a multi-threaded process (Streamlit) is unsafe."""
    try:
        from tqdm import tqdm
    except ImportError:  # the GPU machine's Python may lack it: no bar then
        tqdm = _NoBar

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(8, cores)
    bar = tqdm(total=len(jobs), desc=desc, unit="img", mininterval=0.5, leave=False)
    try:
        if len(jobs) < PARALLEL_MIN_FILES or workers < 2:
            for job in jobs:
                yield fn(job)
                bar.update()
            return
        if sys.platform.startswith("linux") and threading.active_count() == 1:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                for res in pool.imap(fn, jobs, chunksize=256):
                    yield res
                    bar.update()
        else:
            ex = ThreadPoolExecutor(workers)
            try:
                for res in ex.map(fn, jobs):
                    yield res
                    bar.update()
            finally:  # on an error (a bad file), do not decode the rest first
                ex.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


def _decode_images(root: Path, rel_paths: list[str]) -> torch.Tensor:
    """Decode images to uint8 (N, 3, S, S); see _decode_one for the size rule."""
    from PIL import Image

    try:  # imported here, once, so that forked workers inherit it
        import torchvision.io  # noqa: F401

        # torchvision 0.29 deprecates its image decoders (for TorchCodec, not a PoolProp
        # dependency) and warns on every call; once they are gone, Pillow decodes everything
        warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
    except ImportError:  # pragma: no cover - Pillow alone still works
        pass
    if not rel_paths:
        return torch.empty(0, 3, FALLBACK_SIZE, FALLBACK_SIZE, dtype=torch.uint8)
    first = root / rel_paths[0]
    try:
        with Image.open(first) as im:
            w, h = im.size
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"imagefolder: cannot read image {first} ({type(e).__name__}: {e})") from None
    side = w if w == h else None
    blobs, any_resized = [], False
    for i, (data, extra) in enumerate(_pool_map(_decode_one, [(str(root / p), side) for p in rel_paths],
                                                 f"decoding {root.name}")):
        if data is None:
            raise DatasetError(f"imagefolder: cannot read image {root / rel_paths[i]} ({extra})")
        blobs.append((data, extra))
        any_resized |= extra
    S = FALLBACK_SIZE if any_resized else side
    out = np.empty((len(blobs), 3, S, S), dtype=np.uint8)
    for i, (data, resized) in enumerate(blobs):
        a = np.frombuffer(data, dtype=np.uint8).reshape(3, S if resized else side, -1)
        if not resized and side != S:  # mixed sizes: bring the first-size images to the common size too
            small = Image.fromarray(a.transpose(1, 2, 0)).resize((S, S), Image.Resampling.BILINEAR)
            a = np.asarray(small).transpose(2, 0, 1)
        out[i] = a
    return torch.from_numpy(out)


def _load_imagefolder(name: str, path: str, data_dir: str | None) -> DatasetSplits:
    root = Path(path).expanduser()
    if not root.exists() and data_dir and not root.is_absolute() and (Path(data_dir).expanduser() / root).exists():
        root = Path(data_dir).expanduser() / root
    if not root.exists():
        raise DatasetError(f"imagefolder: path {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"imagefolder: {root} is not a folder")
    root = root.resolve()
    scan = _scan_imagefolder(root)
    if not scan["train"]:
        raise DatasetError(f"imagefolder: no images found in {root} ({', '.join(IMG_EXTENSIONS)})")
    files = [e[:3] for e in scan["train"]] + [e[:3] for e in scan["val"]]
    key = _key("imagefolder", CACHE_FORMAT, FALLBACK_SIZE, str(root), scan["layout"], scan["classes"],
               files, len(scan["train"]))
    label = root.name if root.name not in ("train", "val", "test") else f"{root.parent.name}-{root.name}"
    stem = f"{_slug(label)}-{_key(str(root))[:8]}"  # one cache per folder; older versions are removed
    cpath = cache_dir() / "imagefolder" / f"{stem}-{key[:16]}.safetensors"
    cached = _read_cache(cpath)
    if cached is not None:
        cached.name = name
        return cached
    paths = [e[0] for e in scan["train"]] + [e[0] for e in scan["val"]]
    x = _decode_images(root, paths)
    n_tr = len(scan["train"])
    ty = torch.tensor([e[3] for e in scan["train"]], dtype=torch.int64)
    vy = torch.tensor([e[3] for e in scan["val"]], dtype=torch.int64)
    d = _finish(name, scan["classes"], x[:n_tr], ty, x[n_tr:], vy,
                f"imagefolder {root} ({scan['layout']}): {n_tr} train / {len(vy)} val images, "
                f"{x.shape[-1]}x{x.shape[-1]}",
                {"source": "imagefolder", "root": str(root), "layout": scan["layout"], "cache": str(cpath)})
    _write_cache(cpath, d, stale_glob=f"{stem}-*.safetensors")
    return d


# ---------------------------------------------------------------------------------------
# Batches on the device
# ---------------------------------------------------------------------------------------

def normalize(x_uint8_batch: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images (B, C, H, W) (or (C, H, W)) -> float32 (x/255 - mean) / std, on x's device."""
    x = x_uint8_batch
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x.to(torch.float32) / 255.0 - m) / s


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              padding: int = CROP_PADDING) -> torch.Tensor:
    """Random-crop-with-padding and horizontal flip of a whole batch in one gather.

    x (B, C, H, W) is padded with zeros by `padding` on every side; image b is the H x W window
    whose top-left corner is (dy[b], dx[b]) in the padded image (0..2*padding; padding, padding
    = no shift), mirrored left-right where flip[b]. The flip is of the cropped window.
    """
    B, C, H, W = x.shape
    p = padding
    xp = x.new_zeros(B, C, H + 2 * p, W + 2 * p)  # (B, C, H+2p, W+2p)
    xp[:, :, p:p + H, p:p + W] = x
    ar_h = torch.arange(H, device=x.device)
    ar_w = torch.arange(W, device=x.device)
    rows = (dy.view(B, 1) + ar_h).view(B, 1, H, 1).expand(B, C, H, W + 2 * p)
    cols = dx.view(B, 1) + torch.where(flip.view(B, 1), W - 1 - ar_w, ar_w)  # (B, W)
    # two gathers with broadcast (stride-0) indices: rows, then columns (flip folded into them)
    return torch.gather(torch.gather(xp, 2, rows), 3, cols.view(B, 1, 1, W).expand(B, C, H, W))


class BatchLoader:
    """Batches from uint8 tensors already on `device`; augmentation on whole batches of tensors.

    train=True: shuffled, and (if `augment`) random crop with 4-pixel zero padding (black in
    pixel space, as torchvision's RandomCrop(32, padding=4)) and horizontal flip. eval: in
    order, no augmentation. All randomness of an epoch comes from a CPU torch.Generator seeded
    from (seed, epoch): an epoch is the same on any device and after a resume. `__iter__` uses
    the epoch given by `set_epoch` (or the one after the previous iteration's, starting at 0).
    drop_last defaults to True for train, False for eval. Yields (x float32 (B, 3, H, W)
    normalised, y int64 (B,)) on `device` (x in channels_last memory format if asked).
    """

    def __init__(self, images_u8, labels, mean, std, batch_size, *, train: bool, device="cpu", seed=0,
                 augment=True, drop_last=None, channels_last=False):
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images_u8.dtype} {tuple(images_u8.shape)}")
        if len(labels) != len(images_u8):
            raise ValueError(f"{len(images_u8)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = torch.device(device)
        self.images = images_u8.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        std_t = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std_t), -mean_t / std_t
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.augment = bool(augment) and self.train
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.channels_last = bool(channels_last)
        self.seed = int(seed)
        self.epoch = 0
        self.padding = CROP_PADDING

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_plan(self, epoch: int) -> dict[str, torch.Tensor]:
        """The epoch's random choices (CPU): order (N,), crop offsets dy, dx (N,) in 0..8, flip (N,)."""
        n = len(self.labels)
        g = torch.Generator().manual_seed(_seed_int("batches", self.seed, int(epoch)))
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        span = 2 * self.padding + 1
        dy = torch.randint(0, span, (n,), generator=g)
        dx = torch.randint(0, span, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        return {"order": order, "dy": dy, "dx": dx, "flip": flip}

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1  # the next iteration, unless set_epoch says otherwise, is a new epoch
        return self._batches(epoch)

    def _batches(self, epoch: int):
        n, bs = len(self.labels), self.batch_size
        plan = None
        if self.train:
            plan = {k: v.to(self.device) for k, v in self.epoch_plan(epoch).items()}
        for b in range(len(self)):
            lo, hi = b * bs, min(n, (b + 1) * bs)
            if plan is None:
                xb, yb = self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = plan["order"][lo:hi]
                xb, yb = self.images[idx], self.labels[idx]
                if self.augment:
                    xb = crop_flip(xb, plan["dy"][lo:hi], plan["dx"][lo:hi], plan["flip"][lo:hi], self.padding)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb.to(torch.float32).mul_(self._scale).add_(self._shift), yb


# ---------------------------------------------------------------------------------------
# Pictures for the app
# ---------------------------------------------------------------------------------------

def sample_images(name, n, split="val", data_dir=None, seed=0, *, split_seed: int = 0):
    """A small deterministic sample: (x uint8 (n, 3, H, W), labels int64 (n,), classes).

    Classes take turns (n = 10 gives one image per class on a 10-class set); which images
    depends only on `seed`. Never downloads: cifar10 must be on disk already.
    """
    if split not in ("val", "train"):
        raise DatasetError(f"split must be 'val' or 'train', got {split!r}")
    d = load_dataset(name, data_dir=data_dir, split_seed=split_seed, download=False)
    x, y = (d.val_x, d.val_y) if split == "val" else (d.train_x, d.train_y)
    g = torch.Generator().manual_seed(_seed_int("sample", seed))
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
