"""Small atomic-write helpers: a reader never sees half a file.

Every writer goes through a temporary file in the same folder, fsyncs it, then
`os.replace`s it over the target (atomic on POSIX and Windows) and fsyncs the folder,
so that a crash or a `kill -9` leaves either the old file or the new one, never a torn one.
`JsonlAppender` is the one exception by design: metrics are appended line by line, flushed
(not fsynced: too slow per step), and readers skip a last line cut mid-write.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

__all__ = ["write_bytes", "write_text", "write_json", "write_safetensors", "JsonlAppender", "json_default"]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; os.replace is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode() -> int:
    """0o666 minus the umask: what a plain open() would give (mkstemp makes 0o600 files)."""
    try:
        text = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in text.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o666 & ~umask


_MODE = _file_mode()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file + fsync + os.replace + fsync of the folder)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, _MODE)
        except (OSError, AttributeError):  # pragma: no cover - Windows
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def json_default(obj):
    """JSON fallback for numpy/torch scalars, tuples in sets, paths."""
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _clean(obj):
    """NaN/inf are not JSON: write them as null so every reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def dumps(obj, indent: int | None = None) -> str:
    return json.dumps(_clean(obj), indent=indent, default=json_default, allow_nan=False)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return write_text(path, dumps(obj, indent=indent) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Save a dict of tensors as safetensors, atomically. Tensors are made contiguous and
    moved to the CPU first (safetensors refuses strided views such as channels_last)."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return write_bytes(path, save(flat, metadata=metadata))


class JsonlAppender:
    """Append one JSON object per line, flushed after each line.

    Opened lazily in append mode; `close()` is idempotent. Safe against a crash in the
    sense that at most the last line is incomplete; `core.engine.runs.read_metrics` skips it.
    If the file does not end with a newline (a previous writer was killed mid-line), a
    newline is written first so the next record starts on a line of its own.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = None

    def _open(self):
        if self._f is None:
            needs_newline = False
            if self.path.exists() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            self._f = open(self.path, "a", encoding="utf-8")
            if needs_newline:
                self._f.write("\n")
        return self._f

    def append(self, record: dict) -> None:
        f = self._open()
        f.write(dumps(record) + "\n")
        f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
