"""Decoded data sets cached as safetensors, keyed by what they were decoded from, and what every
loader finishes with (per-channel statistics)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from .splits import DatasetError, DatasetSplits

CACHE_FORMAT = 1  # bump when the decoded contents of a cache file would change (rules, resizing)


def cache_dir() -> Path:
    """`$POOLPROP_CACHE`, or ~/.cache/poolprop."""
    return Path(os.environ.get("POOLPROP_CACHE") or "~/.cache/poolprop").expanduser()


def default_data_dir() -> Path:
    """Where cifar10 lives when no data_dir is given: `$POOLPROP_DATA`, or <cache dir>/data."""
    env = os.environ.get("POOLPROP_DATA")
    return Path(env).expanduser() if env else cache_dir() / "data"


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def cache_key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, separators=(",", ":"), default=str).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "data"


def read_cache(path: Path) -> DatasetSplits | None:
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


def write_cache(path: Path, d: DatasetSplits, stale_glob: str | None = None) -> bool:
    """Write `d` as safetensors, atomically; remove older caches of the same source. A cache that
    cannot be written (read-only home, full disk) is a warning, not an error."""
    from ..atomic import write_safetensors

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


def finish(name, classes, tx, ty, vx, vy, description, info) -> DatasetSplits:
    mean, std = channel_stats(tx)
    return DatasetSplits(name=name, classes=list(classes), train_x=tx.contiguous(), train_y=ty.to(torch.int64),
                         val_x=vx.contiguous(), val_y=vy.to(torch.int64), mean=mean, std=std,
                         description=description, info=info)


def seed_int(*parts) -> int:
    """A 63-bit seed from any parts, stable across runs and platforms (not Python's hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1
