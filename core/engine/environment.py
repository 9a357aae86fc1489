"""The process a run trains in: memory allocator and OpenMP settings, the device, seeds, versions.

Nothing here knows about runs; the trainer, the job runner and the benchmarks use it.
"""

from __future__ import annotations

import os
import platform
import random
import re
import sys
from pathlib import Path

import torch

# glibc malloc: keep big activation buffers in the heap instead of mmap/munmap per step (each
# fresh mmap page-faults in again), and do not hand memory back to the OS between steps.
# Read by glibc at process start only, so they must be in the environment of a new process.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024 * 1024),
    "MALLOC_TOP_PAD_": str(256 * 1024 * 1024),
}


_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2, "MALLOC_MMAP_THRESHOLD_": -3}  # M_* constants


def tune_malloc() -> bool:
    """Apply MALLOC_ENV in this process through glibc's mallopt() (what the variables would do
    at start-up; allocations made afterwards follow it). Settings already in the environment
    are left alone. Returns True when applied (Linux with glibc), False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to do
        return False
    ok = True
    for name, value in MALLOC_ENV.items():
        if name not in os.environ:
            ok &= mallopt(_MALLOPT[name], int(value)) == 1
    return bool(ok)


# OpenMP threads that wait passively (sleep) instead of spinning: on a machine that is busy
# with other work (the app, a browser, a projector driver) spinning threads fight each other
# and a 2-thread step can take 3x as long; on an idle machine the cost is within noise.
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def training_subprocess_env(base: dict | None = None) -> dict:
    """os.environ plus the malloc and OpenMP settings (read at process start only), for
    launching `python -m core train` as a separate process (see docs/training.md)."""
    env = dict(os.environ if base is None else base)
    for k, v in {**MALLOC_ENV, **OMP_ENV}.items():
        env.setdefault(k, v)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device mps requested but MPS is not available")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import importlib.metadata as md

        v["poolprop"] = md.version("poolprop")
    except Exception:  # noqa: BLE001 - not installed as a package: read pyproject
        try:
            text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
            m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
            v["poolprop"] = m[1] if m else "unknown"
        except OSError:
            v["poolprop"] = "unknown"
    for mod in ("torchvision", "numpy", "safetensors"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    if torch.version.cuda:
        v["cuda"] = torch.version.cuda
    return v


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error of any device (CUDA's own type, or a RuntimeError saying so)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def configure_process(deterministic: bool, num_threads: int | None, device: torch.device) -> int:
    """Process-wide switches for a run, set both ways so that runs in one process do not leak
    into each other. Returns the thread count before, to put back afterwards."""
    before = torch.get_num_threads()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    if num_threads or deterministic:
        torch.set_num_threads(num_threads or 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
    return before
