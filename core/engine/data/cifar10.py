"""cifar10: torchvision's on-disk format, read without running arbitrary pickle code."""

from __future__ import annotations

import codecs
import hashlib
import importlib
import pickle
from pathlib import Path

import numpy as np
import torch

from .cache import CACHE_FORMAT, cache_dir, cache_key, default_data_dir, finish, read_cache, write_cache
from .splits import DatasetError, DatasetSplits

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


def load_cifar10(name: str, data_dir: str | None, download: bool) -> DatasetSplits:
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
    key = cache_key("cifar10", CACHE_FORMAT, str(folder.resolve()), stat)
    stem = f"cifar10-{cache_key(str(folder.resolve()))[:8]}"  # one cache per folder; older versions are removed
    cpath = cache_dir() / f"{stem}-{key[:16]}.safetensors"
    cached = read_cache(cpath)
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
    d = finish(name, classes, tx, ty, vx, vy,
                "CIFAR-10 (torchvision files): train = the 50,000 training images, val = the 10,000 test images",
                {"source": "cifar10", "root": str(folder), "cache": str(cpath)})
    write_cache(cpath, d, stale_glob=f"{stem}-*.safetensors")
    return d
