"""imagefolder:PATH: any folder of class subfolders of images, decoded once and cached."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .cache import CACHE_FORMAT, cache_dir, cache_key, finish, read_cache, slug, write_cache
from .splits import DatasetError, DatasetSplits

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FALLBACK_SIZE = 32  # side of the common size when a folder's images are not all one square size
VAL_EVERY = 10  # single-folder rule: the last 1/10 of each class (by name) is validation
PARALLEL_MIN_FILES = 2000  # below this, decode in this process


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


def load_imagefolder(name: str, path: str, data_dir: str | None) -> DatasetSplits:
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
    key = cache_key("imagefolder", CACHE_FORMAT, FALLBACK_SIZE, str(root), scan["layout"], scan["classes"],
               files, len(scan["train"]))
    label = root.name if root.name not in ("train", "val", "test") else f"{root.parent.name}-{root.name}"
    stem = f"{slug(label)}-{cache_key(str(root))[:8]}"  # one cache per folder; older versions are removed
    cpath = cache_dir() / "imagefolder" / f"{stem}-{key[:16]}.safetensors"
    cached = read_cache(cpath)
    if cached is not None:
        cached.name = name
        return cached
    paths = [e[0] for e in scan["train"]] + [e[0] for e in scan["val"]]
    x = _decode_images(root, paths)
    n_tr = len(scan["train"])
    ty = torch.tensor([e[3] for e in scan["train"]], dtype=torch.int64)
    vy = torch.tensor([e[3] for e in scan["val"]], dtype=torch.int64)
    d = finish(name, scan["classes"], x[:n_tr], ty, x[n_tr:], vy,
                f"imagefolder {root} ({scan['layout']}): {n_tr} train / {len(vy)} val images, "
                f"{x.shape[-1]}x{x.shape[-1]}",
                {"source": "imagefolder", "root": str(root), "layout": scan["layout"], "cache": str(cpath)})
    write_cache(cpath, d, stale_glob=f"{stem}-*.safetensors")
    return d
