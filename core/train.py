"""Training: `TrainConfig`, the loop (`Trainer`), and the run-directory writer.

`python -m core train --model resnet20 --dataset features10 --policy avg2+mask --epochs 10`

The run directory (docs/training.md) is the contract with the app:
config.json at start, metrics.jsonl appended line by line, model.safetensors + resume.*
atomically at each epoch end, summary.json ("running" with the pid while training; then
finished / failed / stopped). Nothing here is pickled. This module must run on a machine
with only torch, torchvision, numpy and safetensors: tqdm is optional, nothing from the UI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import atomic
from .compression import CompressionPolicy, PolicyError, compress_model, decompress_model, model_policy
from .memory import format_bytes, model_state_bytes, saved_activation_bytes
from .models import MODEL_NAMES, STEMS, build_model

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine")
AMP_DTYPES = ("auto", "bf16", "fp16")
BASE_LR = {"sgd": 0.1, "adamw": 2e-3}  # at batch 128; scaled linearly with the batch size
BASE_WD = {"sgd": 5e-4, "adamw": 0.05}
BASE_WARMUP = {"onecycle": 0.25, "cosine": 0.05}  # fraction of all steps
RESUME_FORMAT = "poolprop-resume/1"
RUN_FORMAT = "poolprop-run/1"
# Settings that may differ on `--resume` without changing what is trained.
RESUME_MAY_CHANGE = {"epochs", "device", "num_threads", "log_every", "progress", "data_dir", "eval_every",
                     "fidelity_every"}


class StopTraining(Exception):
    """Raised inside the loop when a stop was requested (SIGTERM, Ctrl-C, a callback)."""


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything that defines a run. `None` means "the sensible default" (see `resolved`)."""

    model: str = "resnet20"
    dataset: str = "features10"
    policy: str = "none"
    epochs: int = 10
    steps: int | None = None  # cap on total optimiser steps (smoke runs); None = no cap
    batch_size: int = 128
    optimizer: str = "sgd"  # SGD with Nesterov momentum 0.9, or AdamW
    lr: float | None = None  # peak LR; default BASE_LR[optimizer] * batch_size / 128
    schedule: str = "onecycle"  # per-step: one-cycle, or linear warmup + cosine
    warmup: float | None = None  # fraction of steps spent warming up; default BASE_WARMUP
    weight_decay: float | None = None  # on conv/linear weights only; default BASE_WD
    label_smoothing: float = 0.1
    seed: int = 0
    device: str = "auto"  # auto = cuda > mps > cpu
    amp: bool | None = None  # None = on for CUDA only
    amp_dtype: str = "auto"  # bf16 where supported, else fp16 (+ GradScaler)
    channels_last: bool = True
    out: str | None = None  # run directory; default runs/<model>-<data>-<policy>-s<seed>-<time>
    data_dir: str | None = None
    log_every: int = 20  # steps between step records
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    fidelity_every: int = 100  # steps between gradient-fidelity records; 0 = never
    deterministic: bool = False
    num_threads: int | None = None
    train_subset: int | None = None  # use a fixed subset of N training images (smoke runs, demos)
    val_subset: int | None = None
    time_budget: float | None = None  # seconds; the schedule then follows max(step, time) progress
    stem: str = "cifar"
    augment: bool = True
    split_seed: int = 0
    eval_batch_size: int = 512
    progress: bool = True  # progress bar / lines on stderr

    # -- defaults ----------------------------------------------------------------------
    def resolved(self) -> TrainConfig:
        """A copy with every `None` default filled in and the choices validated."""
        self.validate()
        c = dataclasses.replace(self)
        if c.lr is None:
            c.lr = round(BASE_LR[c.optimizer] * c.batch_size / 128, 8)
        if c.weight_decay is None:
            c.weight_decay = BASE_WD[c.optimizer]
        if c.warmup is None:
            c.warmup = BASE_WARMUP[c.schedule]
        c.policy = str(CompressionPolicy.parse(c.policy))
        return c

    def validate(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        CompressionPolicy.parse(self.policy)  # PolicyError is a ValueError
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose {' or '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose {' or '.join(SCHEDULES)}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"unknown amp dtype {self.amp_dtype!r}; choose {', '.join(AMP_DTYPES)}")
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; choose {' or '.join(STEMS)}")
        for name in ("epochs", "batch_size", "log_every", "eval_every", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("steps", "train_subset", "val_subset"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.fidelity_every < 0:
            raise ValueError("fidelity_every must be 0 (off) or positive")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError("time_budget must be positive (seconds)")
        if self.warmup is not None and not 0 <= self.warmup < 1:
            raise ValueError("warmup is a fraction of the steps, in [0, 1)")
        if self.device.split(":")[0] not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"unknown device {self.device!r}; use auto, cpu, cuda[:N] or mps")

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["policy"] = str(CompressionPolicy.parse(self.policy))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict (e.g. config.json); unknown keys are ignored, the policy may be a dict."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if isinstance(kw.get("policy"), dict):
            kw["policy"] = str(CompressionPolicy.from_dict(kw["policy"]))
        return cls(**kw)

    def to_argv(self) -> list[str]:
        """CLI flags reproducing this config (for the app to launch `python -m core train`)."""
        argv = []
        defaults = TrainConfig()
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v == getattr(defaults, f.name) or v is None:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(v, bool):
                argv.append(flag if v else "--no-" + f.name.replace("_", "-"))
            else:
                argv += [flag, str(v)]
        return argv


def explicit_args(args: argparse.Namespace) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


# ---------------------------------------------------------------------------------------
# Learning-rate schedule (per step; its whole state is JSON scalars)
# ---------------------------------------------------------------------------------------

@dataclass
class LRSchedule:
    """LR as a function of training progress p in [0, 1].

    onecycle: cosine up from lr/25 to lr over the warmup, cosine down to lr/1e4 (as OneCycleLR).
    cosine:   linear warmup from 0 to lr, then cosine down to 0.
    Progress is step / total_steps, or with a time budget max(that, elapsed / budget): the
    schedule then completes on time on a slower machine too.
    """

    kind: str
    base_lr: float
    total_steps: int
    warmup: float

    def lr_at(self, progress: float) -> float:
        p = min(max(progress, 0.0), 1.0)
        w = self.warmup
        if self.kind == "onecycle":
            lo, hi, end = self.base_lr / 25, self.base_lr, self.base_lr / 1e4
            if w > 0 and p < w:
                return hi + (lo - hi) * (1 + math.cos(math.pi * p / w)) / 2
            q = (p - w) / (1 - w) if w < 1 else 1.0
            return end + (hi - end) * (1 + math.cos(math.pi * q)) / 2
        if w > 0 and p < w:
            return self.base_lr * p / w
        q = (p - w) / (1 - w) if w < 1 else 1.0
        return self.base_lr * (1 + math.cos(math.pi * q)) / 2

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Gradient fidelity (small; core/fidelity.py has the full analysis)
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _frozen_buffers(model: nn.Module):
    """Restore every buffer (BN running stats, counters) on exit."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _conv_weight_grads(model, params, x, y, loss_fn):
    out = model(x)
    loss = loss_fn(out, y)
    return torch.autograd.grad(loss, params, allow_unused=True)


def layer_gradient_fidelity(model: nn.Module, policy, x: torch.Tensor, y: torch.Tensor,
                            loss_fn=None) -> list[dict]:
    """Per conv layer: cosine and relative error of the compressed weight gradient vs the exact one.

    Same batch, same weights, train mode; BN running statistics are restored and `.grad` is
    not touched (gradients come from `torch.autograd.grad`). The model keeps the compression
    it had on entry. Returns [{"name", "cosine", "rel_error"}] in module order.
    """
    policy = CompressionPolicy.parse(policy)
    loss_fn = loss_fn or F.cross_entropy
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    params = [m.weight for _, m in convs]
    before = model_policy(model)
    was_training = model.training
    model.train()
    try:
        with _frozen_buffers(model), torch.autocast(x.device.type, enabled=False):
            compress_model(model, policy)
            approx = _conv_weight_grads(model, params, x, y, loss_fn)
            decompress_model(model)
            exact = _conv_weight_grads(model, params, x, y, loss_fn)
    finally:
        if before == CompressionPolicy():
            decompress_model(model)
        else:
            compress_model(model, before)
        model.train(was_training)
    layers = []
    for (name, _), ga, ge in zip(convs, approx, exact):
        if ga is None or ge is None:
            continue
        a, e = ga.float().flatten(), ge.float().flatten()
        ne = e.norm()
        cos = F.cosine_similarity(a, e, dim=0, eps=1e-30)
        rel = (a - e).norm() / ne.clamp_min(1e-30)
        layers.append({"name": name, "cosine": cos, "rel_error": rel})
    # one sync for all layers
    vals = torch.stack([torch.stack([d["cosine"], d["rel_error"]]) for d in layers]).tolist() if layers else []
    return [{"name": d["name"], "cosine": round(c, 6), "rel_error": round(r, 6)} for d, (c, r) in zip(layers, vals)]


# ---------------------------------------------------------------------------------------
# Environment helpers
# ---------------------------------------------------------------------------------------

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


def dataset_short(name: str) -> str:
    if name.startswith("imagefolder:"):
        p = Path(name.split(":", 1)[1].rstrip("/\\"))
        parts = [p.name]
        if p.name.lower() in ("train", "val", "test", "images", "data") and p.parent.name:
            parts.insert(0, p.parent.name)
        name = "-".join(parts) or "imagefolder"
    return _path_safe(name)


def _path_safe(text: str) -> str:
    text = text.replace("+", "_").replace(",", "-").replace("=", "-")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def default_run_dir(cfg: TrainConfig, now: datetime | None = None) -> Path:
    from .runs import LOCAL_DIR

    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    name = f"{cfg.model}-{dataset_short(cfg.dataset)}-{_path_safe(str(cfg.policy))}-s{cfg.seed}-{stamp}"
    path, i = LOCAL_DIR / name, 2
    while path.exists():
        path, i = LOCAL_DIR / f"{name}-{i}", i + 1
    return path


def _check_out_free(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} already exists and is not empty; choose another --out or continue it with --resume")


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int):
    """A fixed, seed-determined subset of n items (in their original order)."""
    if n is None or n >= len(y):
        return x, y
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n].sort().values
    return x[idx], y[idx]


# ---------------------------------------------------------------------------------------
# Progress display (tqdm when present and on a terminal; plain lines otherwise)
# ---------------------------------------------------------------------------------------

class _LinePrinter:
    """Minimal stand-in for tqdm: one line per logged step on stderr."""

    def __init__(self, total, initial=0, desc=""):
        self.total, self.n, self.desc = total, initial, desc

    def update(self, n=1):
        self.n += n

    def set_postfix(self, d: dict):
        items = " ".join(f"{k}={v}" for k, v in d.items())
        print(f"{self.desc} step {self.n}/{self.total} {items}", file=sys.stderr, flush=True)

    def write(self, s):
        print(s, file=sys.stderr, flush=True)

    def close(self):
        pass


def _progress(total, initial, enabled: bool):
    if not enabled:
        return None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, leave=True)
        except ImportError:
            pass
    return _LinePrinter(total, initial, desc="train")


# ---------------------------------------------------------------------------------------
# Resume state: safetensors + JSON, never pickle
# ---------------------------------------------------------------------------------------

def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """-> (tensors named `opt.state.<param index>.<name>`, JSON part: param_groups and scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.state.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("opt.state."):
            idx, key = name[len("opt.state."):].split(".", 1)
            state.setdefault(int(idx), {})[key] = t
    for idx, kv in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    # give buffers their parameter's memory layout (channels_last) as in an uninterrupted run
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        st = opt.state.get(p, {})
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() == 4:
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def save_resume(run_dir: Path, model: nn.Module, opt, meta: dict, scaler=None) -> None:
    """resume.safetensors (weights, optimiser tensors, RNG states; the JSON part embedded in
    its metadata, so the one file is self-consistent) + resume.json (a readable mirror)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    tensors.update(opt_tensors)
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {**meta, "format": RESUME_FORMAT, "optimizer": opt_meta,
            "python_random": _py_random_state(), "scaler": scaler.state_dict() if scaler is not None else None}
    text = atomic.dumps(meta)
    atomic.write_safetensors(run_dir / "resume.safetensors", tensors,
                             metadata={"format": RESUME_FORMAT, "resume_json": text, "step": str(meta["step"])})
    atomic.write_text(run_dir / "resume.json", atomic.dumps(meta, indent=2) + "\n")


def _py_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def load_resume(run_dir: Path) -> tuple[dict, dict]:
    """-> (tensors, meta). Raises ValueError with a clear message when the files are unusable."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = run_dir / "resume.safetensors"
    if not path.is_file():
        raise ValueError(f"{path} not found: this run has no completed epoch to resume from")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    if md.get("format") != RESUME_FORMAT or "resume_json" not in md:
        raise ValueError(f"{path} is not a PoolProp resume file (format {md.get('format')!r})")
    return tensors, json.loads(md["resume_json"])


# ---------------------------------------------------------------------------------------
# Several processes (torchrun): DistributedDataParallel
# ---------------------------------------------------------------------------------------

def dist_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's WORLD_SIZE / RANK / LOCAL_RANK; (1, 0, 0) alone."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    return max(world, 1), rank, local


class _ShardLoader:
    """Rank r's share of every global batch of a BatchLoader: rows [r*b, (r+1)*b) with
    b = batch_size / world. The global loader draws order and augmentation from (seed, epoch)
    on every rank alike, so the union of the shards is exactly the single-process batch."""

    def __init__(self, loader, rank: int, world: int):
        self.loader, self.rank, self.world = loader, rank, world
        self.local_batch = loader.batch_size // world

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        for x, y in self.loader:
            yield x[lo:hi], y[lo:hi]


class _NullAppender:
    """metrics.jsonl stand-in on ranks other than 0 (only rank 0 writes the run directory)."""

    def append(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _broadcast_text(text: str | None, device: torch.device) -> str:
    """Rank 0's string on every rank (a tensor of bytes: no pickle)."""
    import torch.distributed as dist

    data = (text or "").encode("utf-8")
    n = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(n, 0)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buf.copy_(torch.tensor(list(data), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).decode("utf-8")


_STOP_CODES = {None: 0, "time budget": 1}  # anything else: 2 (a signal, a callback, another rank)


# ---------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------

class _Autocast(nn.Module):
    """Runs the wrapped model's forward under autocast and leaves backward outside it, as the
    training step does (ops such as upsampling are autocast to fp32 inside an autocast region)."""

    def __init__(self, model: nn.Module, autocast):
        super().__init__()
        self.model, self._autocast = model, autocast

    def forward(self, x):
        with self._autocast():
            return self.model(x)


@dataclass
class TrainResult:
    run_dir: Path
    status: str
    summary: dict
    exit_code: int


@dataclass
class Trainer:
    """One training run. minGPT-style callbacks: `add_callback("on_step", fn)` where fn(trainer)
    is called after every step; "on_log" and "on_epoch" get (trainer, record) for each step
    record and eval record. A callback may call `trainer.request_stop()`.
    """

    config: TrainConfig
    resume_dir: Path | None = None
    callbacks: dict = field(default_factory=lambda: {"on_step": [], "on_log": [], "on_epoch": []})

    def add_callback(self, event: str, fn) -> None:
        self.callbacks[event].append(fn)

    def trigger_callbacks(self, event: str, *args) -> None:
        for fn in self.callbacks.get(event, []):
            fn(self, *args)

    def request_stop(self, reason: str = "requested") -> None:
        self._stop_reason = self._stop_reason or reason

    # -- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything that can fail on bad input, before anything is written to disk."""
        from . import data as data_mod

        self._stop_reason = None
        self.resume_tensors = self.resume_meta = None
        if self.resume_dir is not None and (Path(self.resume_dir) / "resume.safetensors").exists():
            self.resume_tensors, self.resume_meta = load_resume(self.resume_dir)
        # else: killed before its first epoch ended: start again from step 0 in the same folder
        cfg = self.config = self.config.resolved()
        self.world, self.rank, self.local_rank = dist_env()
        self.is_main = self.rank == 0
        self._owns_pg = False
        if self.resume_dir is None and cfg.out and self.is_main:
            _check_out_free(Path(cfg.out))  # fail before the (possibly slow) dataset load
        self.policy = CompressionPolicy.parse(cfg.policy)
        if self.world > 1:
            self._init_distributed(cfg)
        else:
            self.device = pick_device(cfg.device)
        # process-wide switches, set both ways so that runs in one process do not leak into each other
        self._threads_before = torch.get_num_threads()
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.backends.cudnn.benchmark = self.device.type == "cuda" and not cfg.deterministic
        if cfg.num_threads or cfg.deterministic:
            torch.set_num_threads(cfg.num_threads or 1)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = not cfg.deterministic
            torch.backends.cudnn.allow_tf32 = not cfg.deterministic
        seed_everything(cfg.seed)

        # data (DatasetError is a ValueError: one line, exit 2, nothing written yet)
        self.data = data_mod.load_dataset(cfg.dataset, data_dir=cfg.data_dir, split_seed=cfg.split_seed)
        d = self.data
        tx, ty = _subset(d.train_x, d.train_y, cfg.train_subset, cfg.split_seed)
        vx, vy = _subset(d.val_x, d.val_y, cfg.val_subset, cfg.split_seed + 1)
        self.train_size, self.val_size = len(ty), len(vy)
        if len(ty) == 0:
            raise ValueError(f"dataset {cfg.dataset!r} has no training images")
        self.num_classes = d.num_classes
        dev = self.device
        self.train_loader = data_mod.BatchLoader(
            tx.to(dev), ty.to(dev), d.mean, d.std, cfg.batch_size, train=True, device=dev, seed=cfg.seed,
            augment=cfg.augment, channels_last=cfg.channels_last)
        if self.world > 1:
            self.train_loader = _ShardLoader(self.train_loader, self.rank, self.world)
        self.val_loader = data_mod.BatchLoader(
            vx.to(dev), vy.to(dev), d.mean, d.std, cfg.eval_batch_size, train=False, device=dev, seed=cfg.seed,
            augment=False, channels_last=cfg.channels_last) if len(vy) else None
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"training set of {len(ty)} images gives no batch of {cfg.batch_size}")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.steps is not None:
            self.total_steps = min(self.total_steps, cfg.steps)
        self.schedule = LRSchedule(cfg.schedule, cfg.lr, self.total_steps, cfg.warmup)

        # model, policy, optimiser
        self.model = build_model(cfg.model, num_classes=self.num_classes, stem=cfg.stem)
        compress_model(self.model, self.policy)
        if self.policy.quantises and dev.type == "cpu" and os.environ.get("POOLPROP_COMPILE", "1") != "0":
            from . import quantization

            quantization.use_compiled(True)  # same bytes and results, ~4x faster coding passes
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = self.model.to(device=dev, memory_format=memory_format)
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
        else:
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
        self.amp_dtype = None
        use_amp = cfg.amp if cfg.amp is not None else dev.type == "cuda"
        if use_amp:
            if cfg.amp_dtype == "bf16" or (cfg.amp_dtype == "auto" and (
                    dev.type != "cuda" or torch.cuda.is_bf16_supported())):
                self.amp_dtype = torch.bfloat16
            else:
                self.amp_dtype = torch.float16
        self.scaler = None
        if self.amp_dtype == torch.float16 and dev.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

        # resume
        self.epoch, self.step = 0, 0
        self.best_val_acc, self.best_epoch, self.last_eval = None, None, None
        self.wall_before, self.train_before = 0.0, 0.0
        if self.resume_meta is not None:
            self._restore()

        # dry run on one real batch: a policy that does not fit (K larger than a feature map)
        # fails here, and the saved-activation bytes are measured once (exact, any device). The
        # figure runs are compared by is in float32, whatever the device; under autocast what
        # training really keeps is measured too (and the autocast forward is checked).
        self.train_loader.set_epoch(self.epoch)
        xb, yb = next(iter(self.train_loader))
        try:
            self.saved_report = saved_activation_bytes(self.model, xb, yb)
            self.saved_report_amp = (None if self.amp_dtype is None else
                                     saved_activation_bytes(_Autocast(self.model, self._autocast), xb, yb))
        except PolicyError as e:
            raise PolicyError(f"policy {cfg.policy!r} does not fit {cfg.model} on {cfg.dataset}: {e}") from None
        self.measured_batch = int(yb.shape[0])
        self.state_bytes = model_state_bytes(self.model, cfg.optimizer)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.net = self.model  # what the training step runs: the model, or its DDP wrapper
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # per-rank BatchNorm (docs/reliability.md); buffers broadcast from rank 0 each step
            self.net = DDP(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def _init_distributed(self, cfg: TrainConfig) -> None:
        """torchrun: one process per device; NCCL on CUDA, gloo on the CPU."""
        import torch.distributed as dist

        if cfg.batch_size % self.world:
            raise ValueError(f"--batch-size {cfg.batch_size} is the global batch: it must be a multiple "
                              f"of the {self.world} processes")
        name = cfg.device
        if name in ("auto", "cuda") and torch.cuda.is_available():
            name = f"cuda:{self.local_rank}"
        elif name == "auto":
            name = "cpu"
        self.device = pick_device(name)
        if self.device.type == "mps":
            raise ValueError("several processes on MPS are not supported; use --device cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self._owns_pg = True
        if dist.get_world_size() != self.world:  # pragma: no cover
            raise ValueError(f"WORLD_SIZE {self.world} but the process group has {dist.get_world_size()}")

    def _sync_stop(self) -> None:
        """All ranks agree on stopping (and why, as far as the loop cares) and on the wall clock
        the schedule follows (rank 0's may differ): one tiny all-reduce, only with several processes."""
        if self.world == 1:
            return
        import torch.distributed as dist

        code = _STOP_CODES.get(self._stop_reason, 2)
        t = torch.tensor([float(code), self._wall()], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        agreed, self._synced_wall = int(t[0].item()), float(t[1].item())
        if agreed != code:
            self._stop_reason = "time budget" if agreed == 1 else "stopped on another rank"

    def _all_sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Sums over the ranks (the values unchanged with one process)."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.stack([v.to(self.device, torch.float64) for v in values])
        dist.all_reduce(t)
        return list(t.unbind())

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _restore(self) -> None:
        t, meta = self.resume_tensors, self.resume_meta
        state = {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}
        expected = self.model.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise ValueError(f"{self.resume_dir / 'resume.safetensors'} does not fit {self.config.model}")
        self.model.load_state_dict(state)
        _unflatten_optimizer(self.opt, t, meta["optimizer"])
        torch.set_rng_state(t["rng.torch_cpu"])
        cuda_keys = sorted((k for k in t if k.startswith("rng.cuda.")), key=lambda s: int(s.rsplit(".", 1)[1]))
        cuda_states = [t[k] for k in cuda_keys]
        if cuda_states and self.device.type == "cuda" and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        if meta.get("python_random"):
            v, internal, gauss = meta["python_random"]
            random.setstate((v, tuple(internal), gauss))
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.epoch, self.step = int(meta["epoch"]), int(meta["step"])
        self.best_val_acc, self.best_epoch = meta.get("best_val_acc"), meta.get("best_epoch")
        self.last_eval = meta.get("last_eval")
        self.wall_before, self.train_before = float(meta.get("wall_s", 0.0)), float(meta.get("train_s", 0.0))

    # -- run directory -----------------------------------------------------------------
    def _config_record(self) -> dict:
        cfg, d = self.config, self.data
        rep = self.saved_report
        amp_bytes = None if self.saved_report_amp is None else self.saved_report_amp.total_bytes
        return {
            **cfg.to_dict(),
            "format": RUN_FORMAT,
            "policy_dict": self.policy.to_dict(),
            "classes": list(d.classes),
            "num_classes": self.num_classes,
            "image_size": d.image_size,
            "mean": [float(v) for v in torch.as_tensor(d.mean).flatten()],
            "std": [float(v) for v in torch.as_tensor(d.std).flatten()],
            "train_size": self.train_size,
            "val_size": self.val_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "num_params": self.num_params,
            "device_used": str(self.device),
            "device_name": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else platform.machine()),
            "amp_dtype_used": None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "memory": {"saved_activation_bytes": rep.total_bytes, "saved_activation_by_kind": rep.by_kind,
                       "saved_activation_bytes_amp": amp_bytes,
                       "measured_batch": self.measured_batch, "model_state_bytes": self.state_bytes},
            "world_size": self.world,
            "versions": versions(),
            "created": _now_iso(),
        }

    def _prepare_dir(self) -> None:
        cfg = self.config
        if not self.is_main:  # only rank 0 writes; the others learn the folder's name
            self.run_dir = Path(_broadcast_text(None, self.device))
            cfg.out = str(self.run_dir)
            self.metrics = _NullAppender()
            return
        if self.resume_dir is not None:
            self.run_dir = Path(self.resume_dir)
            _remove_stale_temp_files(self.run_dir)
            self._trim_metrics()
        else:
            self.run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
            _check_out_free(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.out = str(self.run_dir)
            atomic.write_json(self.run_dir / "config.json", self._config_record())
        if self.world > 1:
            _broadcast_text(str(self.run_dir), self.device)
        self.metrics = atomic.JsonlAppender(self.run_dir / "metrics.jsonl")
        if self.resume_dir is not None:
            self.metrics.append({"type": "resume", "step": self.step, "epoch": self.epoch,
                                 "wall": round(self.wall_before, 3)})

    def _trim_metrics(self) -> None:
        """On resume drop records past the checkpoint (they will be recomputed), and cut lines."""
        from .runs import read_metrics

        log = read_metrics(self.run_dir)
        keep = [r for r in log if int(r.get("step", 0) or 0) <= self.step
                and (r.get("type") != "eval" or int(r.get("epoch", 0)) <= self.epoch)]
        if len(keep) != len(log) or log.skipped:
            atomic.write_text(self.run_dir / "metrics.jsonl", "".join(atomic.dumps(r) + "\n" for r in keep))

    def _summary(self, status: str, **extra) -> dict:
        cfg = self.config
        wall = self.wall_before + (time.perf_counter() - self.session_start)
        train_s = self.train_before + self.train_time
        steps_now = self.step - self.session_first_step
        s = {
            "status": status,
            "epochs_done": self.epoch, "epochs": cfg.epochs, "steps": self.step, "total_steps": self.total_steps,
            "best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch,
            "last_val_acc": (self.last_eval or {}).get("val_acc"),
            "last_val_loss": (self.last_eval or {}).get("val_loss"),
            "per_class_val_acc": (self.last_eval or {}).get("per_class_acc"),
            "last_train_loss": (self.last_eval or {}).get("train_loss"),
            "last_train_acc": (self.last_eval or {}).get("train_acc"),
            "saved_activation_bytes": self.saved_report.total_bytes,
            "saved_activation_by_kind": self.saved_report.by_kind,
            "saved_activation_bytes_amp": None if self.saved_report_amp is None else self.saved_report_amp.total_bytes,
            "model_state_bytes": self.state_bytes["total"],
            "cuda_peak_bytes": torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
            "wall_s": round(wall, 3), "train_s": round(train_s, 3),
            "mean_step_s": round(self.train_time / steps_now, 6) if steps_now else None,
            "samples_per_s": round(steps_now * cfg.batch_size / self.train_time, 1) if self.train_time else None,
            "device": str(self.device), "policy": cfg.policy, "model": cfg.model, "dataset": cfg.dataset,
            "updated": _now_iso(),
        }
        s.update(extra)
        return s

    def _write_summary(self, status: str, **extra) -> dict:
        s = self._summary(status, **extra)
        if status == "running":
            s["pid"] = os.getpid()
        if self.world > 1:
            s["world_size"] = self.world
        if self.is_main:
            atomic.write_json(self.run_dir / "summary.json", s)
        return s

    def _save_weights(self) -> None:
        if not self.is_main:
            return
        atomic.write_safetensors(self.run_dir / "model.safetensors", self.model.state_dict(),
                                 metadata={"format": "pt", "model": self.config.model, "policy": self.config.policy,
                                           "step": str(self.step), "epoch": str(self.epoch)})

    def _checkpoint(self) -> None:
        if not self.is_main:
            return
        save_resume(self.run_dir, self.model, self.opt, {
            "epoch": self.epoch, "step": self.step, "schedule": self.schedule.state_dict(),
            "best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch, "last_eval": self.last_eval,
            "wall_s": self.wall_before + (time.perf_counter() - self.session_start),
            "train_s": self.train_before + self.train_time,
        }, self.scaler)
        self._save_weights()

    # -- one step, evaluation ------------------------------------------------------------
    def _train_step(self, x: torch.Tensor, y: torch.Tensor):
        """Forward, backward, update. Returns (loss, correct) as device tensors (no sync)."""
        with self._autocast():
            out = self.net(x)
            loss = self.criterion(out, y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        return loss.detach(), (out.argmax(1) == y).sum()

    def _wall(self) -> float:
        """Seconds this run has trained, evaluations included, over all its sessions."""
        return self.wall_before + (time.perf_counter() - self.session_start)

    def _progress_at(self, step: int) -> float:
        p = step / self.total_steps
        if self.config.time_budget:
            wall = self._synced_wall if self.world > 1 else self._wall()
            p = max(p, wall / self.config.time_budget)
        return p

    def evaluate(self) -> dict:
        from .evaluate import evaluate_model

        if self.val_loader is None:
            return {"loss": None, "acc": None, "per_class_acc": None, "n": 0}
        return evaluate_model(self.model, self.val_loader, self.num_classes, amp_dtype=self.amp_dtype)

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """setup() must have run. Trains, writes the run directory, returns the result."""
        cfg = self.config
        self.session_start = time.perf_counter()
        self.session_first_step = self.step
        self.train_time = 0.0
        self._synced_wall = self.wall_before
        self._prepare_dir()
        self._write_summary("running")
        old_handlers = self._install_signal_handlers()
        bar = _progress(self.total_steps, self.step, cfg.progress and self.is_main)
        status, extra, code = "finished", {}, 0
        try:
            self._loop(bar)
            done = self.epoch >= cfg.epochs or self.step >= self.total_steps
            if self._stop_reason and self._stop_reason not in ("time budget", "step cap") and not done:
                raise StopTraining(self._stop_reason)
            if self._stop_reason:
                extra["stop_reason"] = self._stop_reason
        except (StopTraining, KeyboardInterrupt) as e:
            status, code = "stopped", 130
            extra["stop_reason"] = str(e) or "interrupted"
            self._save_weights()  # keep the latest weights; resume.* stays at the last epoch end
        except Exception as e:  # noqa: BLE001
            status, code = "failed", 1
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            extra["error"] = (f"out of memory: {msg}" if _is_oom(e) and "out of memory" not in msg.lower()
                              else msg)
            extra["error_type"] = type(e).__name__
            if not _is_oom(e):
                self._finish(bar, old_handlers, status, extra)
                raise
        self._finish(bar, old_handlers, status, extra)
        if status == "failed" and self.is_main:
            print(f"error: {extra['error']}", file=sys.stderr)
        return TrainResult(self.run_dir, status, self.summary, code)

    def _finish(self, bar, old_handlers, status, extra):
        if bar is not None:
            bar.close()
        self._restore_signal_handlers(old_handlers)
        self.summary = self._write_summary(status, finished=_now_iso(), **extra)
        self.metrics.close()
        if self._owns_pg:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self._owns_pg = False
        torch.set_num_threads(self._threads_before)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _loop(self, bar) -> None:
        cfg = self.config
        dev = self.device
        is_cuda = dev.type == "cuda"
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        first_record = self.step == 0
        while self.epoch < cfg.epochs and self.step < self.total_steps and not self._stop_reason:
            epoch = self.epoch
            self.train_loader.set_epoch(epoch)
            self.model.train()
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev, dtype=torch.long)
            seen = epoch_steps = 0
            win_loss = torch.zeros((), device=dev)
            win_correct = torch.zeros((), device=dev, dtype=torch.long)
            win_seen, win_steps = 0, 0
            t_win = time.perf_counter()
            for x, y in self.train_loader:
                self._sync_stop()
                if self.step >= self.total_steps or self._stop_reason:
                    break
                t0 = time.perf_counter()
                lr = self.schedule.lr_at(self._progress_at(self.step))
                for g in self.opt.param_groups:
                    g["lr"] = lr
                loss, n_right = self._train_step(x, y)
                self.step += 1
                epoch_steps += 1
                b = y.shape[0]
                loss_sum += loss.float() * b
                correct += n_right
                win_loss += loss.float() * b
                win_correct += n_right
                seen += b
                win_seen += b
                win_steps += 1
                if (cfg.fidelity_every and self.step % cfg.fidelity_every == 0 and not self.policy.is_exact
                        and self.is_main):
                    layers = layer_gradient_fidelity(self.model, self.policy, x, y, self.criterion)
                    self.metrics.append({"type": "fidelity", "step": self.step, "epoch": epoch, "layers": layers})
                if self.step % cfg.log_every == 0 or self.step == 1 or self.step == self.total_steps:
                    if is_cuda:
                        torch.cuda.synchronize(dev)
                    now = time.perf_counter()
                    self.train_time += now - t0
                    dt = now - t_win
                    w_loss, w_correct, w_seen = self._all_sum(win_loss, win_correct, torch.tensor(float(win_seen)))
                    w_seen = int(w_seen.item())
                    rec = {"type": "step", "step": self.step, "epoch": epoch,
                           "loss": round((w_loss / w_seen).item(), 6),
                           "acc": round(w_correct.item() / w_seen, 6), "lr": lr,
                           "step_time": round(dt / win_steps, 6),
                           "samples_per_s": round(w_seen / dt, 1) if dt > 0 else None}
                    if first_record:
                        rec["saved_bytes"] = self.saved_report.total_bytes
                        first_record = False
                    if is_cuda:
                        rec["cuda_allocated"] = torch.cuda.memory_allocated(dev)
                        rec["cuda_peak"] = torch.cuda.max_memory_allocated(dev)
                    rec["wall"] = round(self.wall_before + now - self.session_start, 3)
                    self.metrics.append(rec)
                    if bar is not None:
                        bar.update(self.step - bar.n)
                        bar.set_postfix({"loss": f"{rec['loss']:.3f}", "acc": f"{rec['acc']:.3f}", "lr": f"{lr:.4f}"})
                    self.trigger_callbacks("on_log", rec)
                    win_loss.zero_()
                    win_correct.zero_()
                    win_seen, win_steps = 0, 0
                    t_win = time.perf_counter()
                else:
                    self.train_time += time.perf_counter() - t0
                self.trigger_callbacks("on_step")
                if cfg.time_budget and self._wall() >= cfg.time_budget:
                    self.request_stop("time budget")
            self._sync_stop()
            if self.world > 1:
                loss_sum, correct, g_seen = self._all_sum(loss_sum, correct, torch.tensor(float(seen)))
                seen = int(g_seen.item())
            if seen == 0:
                break
            interrupted = self._stop_reason not in (None, "time budget")
            if interrupted and epoch_steps < self.steps_per_epoch:
                return  # a mid-epoch stop: no eval, no epoch checkpoint (resume restarts this epoch)
            self.epoch += 1
            last = self.epoch >= cfg.epochs or self.step >= self.total_steps or self._stop_reason is not None
            if self.step >= self.total_steps and self.epoch < cfg.epochs:
                self.request_stop("step cap")
            if (last or self.epoch % cfg.eval_every == 0) and not interrupted and self.is_main:
                ev = self.evaluate()
                train_loss, train_acc = (loss_sum / seen).item(), correct.item() / seen
                rec = {"type": "eval", "epoch": self.epoch, "step": self.step,
                       "val_loss": ev["loss"], "val_acc": ev["acc"],
                       "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
                       "per_class_acc": ev["per_class_acc"],
                       "wall": round(self.wall_before + time.perf_counter() - self.session_start, 3)}
                self.last_eval = {"val_loss": ev["loss"], "val_acc": ev["acc"], "per_class_acc": ev["per_class_acc"],
                                  "train_loss": rec["train_loss"], "train_acc": rec["train_acc"]}
                if ev["acc"] is not None and (self.best_val_acc is None or ev["acc"] > self.best_val_acc):
                    self.best_val_acc, self.best_epoch = ev["acc"], self.epoch
                self.metrics.append(rec)
                if bar is not None:
                    bar.write(f"epoch {self.epoch}/{cfg.epochs}  val_acc {ev['acc']}  val_loss {ev['loss']}"
                              f"  train_loss {rec['train_loss']:.4f}")
                self.trigger_callbacks("on_epoch", rec)
            self._checkpoint()
            self._write_summary("running")
            if interrupted:
                return

    # -- signals -------------------------------------------------------------------------
    def _install_signal_handlers(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None
        old = {}

        def handler(signum, frame):
            if self._stop_reason and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self.request_stop(signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):  # pragma: no cover
                pass
        return old

    def _restore_signal_handlers(self, old) -> None:
        for sig, h in (old or {}).items():
            try:
                signal.signal(sig, h)
            except (ValueError, OSError):  # pragma: no cover
                pass


def train(config: TrainConfig, callbacks: dict | None = None) -> TrainResult:
    """Train a new run from `config` (see `Trainer`)."""
    t = Trainer(config)
    for event, fns in (callbacks or {}).items():
        for fn in fns:
            t.add_callback(event, fn)
    t.setup()
    return t.run()


def _refuse_live_run(run_dir: Path) -> None:
    """Two trainers in one folder would interleave their files: refuse while its process lives."""
    from .runs import load_summary, pid_alive

    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun rank 0 decides (and its own pid is the one recorded)
    try:
        s = load_summary(run_dir) or {}
    except ValueError:
        return
    pid = s.get("pid")
    if s.get("status") == "running" and pid and int(pid) != os.getpid() and pid_alive(pid):
        raise ValueError(f"run {Path(run_dir).name} is still training (pid {pid}); stop it before resuming")


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Temp files of atomic writes cut by a kill -9 (`.<name>.<random>.tmp`): never read, removed on resume."""
    for p in run_dir.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()


def resume(run_dir, overrides: dict | None = None, callbacks: dict | None = None) -> TrainResult:
    """Continue a run from its last completed epoch. `overrides` may only extend `epochs`
    (and change settings in RESUME_MAY_CHANGE that do not alter what is trained)."""
    from .runs import load_config, resolve_run

    run_dir = resolve_run(run_dir)
    _refuse_live_run(run_dir)
    stored = TrainConfig.from_dict(load_config(run_dir))
    stored_d = stored.to_dict()
    overrides = dict(overrides or {})
    overrides.pop("out", None)
    bad = []
    for k, v in overrides.items():
        if k == "policy":
            v = str(CompressionPolicy.parse(v))
        if stored_d.get(k) == v:
            continue
        if k not in RESUME_MAY_CHANGE:
            bad.append(f"--{k.replace('_', '-')} {v} (run has {stored_d.get(k)})")
        elif k == "epochs" and v < stored.epochs:
            bad.append(f"--epochs {v} is fewer than the run's {stored.epochs}")
    if bad:
        raise ValueError("--resume takes the run's own config; only --epochs may grow. Conflicting: " + "; ".join(bad))
    cfg = dataclasses.replace(stored, **{k: v for k, v in overrides.items() if k in RESUME_MAY_CHANGE})
    t = Trainer(cfg, resume_dir=run_dir)
    for event, fns in (callbacks or {}).items():
        for fn in fns:
            t.add_callback(event, fn)
    t.setup()
    if t.epoch >= cfg.epochs or t.step >= t.total_steps:
        raise ValueError(f"run {run_dir.name} already completed {t.epoch} of {cfg.epochs} epochs "
                          f"({t.step} steps); pass --epochs N to train further")
    return t.run()


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def _bool_flag(p, name: str, help: str) -> None:
    dest = name.replace("-", "_")
    p.add_argument(f"--{name}", dest=dest, action="store_true", default=argparse.SUPPRESS, help=help)
    p.add_argument(f"--no-{name}", dest=dest, action="store_false", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)


def register(subparsers) -> None:
    S = argparse.SUPPRESS
    p = subparsers.add_parser(
        "train", help="train a ResNet, plain or with compressed activations",
        description="Train a ResNet with a compression policy and write a run directory "
                    "(config.json, metrics.jsonl, model.safetensors, resume.*, summary.json). See docs/training.md.")
    d = TrainConfig()
    p.add_argument("--model", default=S, help=f"one of {', '.join(MODEL_NAMES)} (default {d.model})")
    p.add_argument("--dataset", default=S, help="features10 | cifar10 | imagefolder:PATH (default features10)")
    p.add_argument("--policy", default=S, help="compression policy, e.g. none, avg2+mask, avg4-lowres+mask+bn8")
    p.add_argument("--epochs", type=int, default=S, help=f"default {d.epochs}")
    p.add_argument("--steps", type=int, default=S, help="cap on total optimiser steps (smoke runs)")
    p.add_argument("--batch-size", type=int, default=S, help=f"default {d.batch_size}")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=S, help="sgd (Nesterov, momentum 0.9) or adamw")
    p.add_argument("--lr", type=float, default=S, help="peak LR (default 0.1 SGD / 2e-3 AdamW, x batch/128)")
    p.add_argument("--schedule", choices=SCHEDULES, default=S, help="per-step LR schedule (default onecycle)")
    p.add_argument("--warmup", type=float, default=S, help="warmup fraction of all steps (0.25 onecycle, 0.05 cosine)")
    p.add_argument("--weight-decay", type=float, default=S, help="on conv/linear weights (5e-4 SGD, 0.05 AdamW)")
    p.add_argument("--label-smoothing", type=float, default=S, help=f"default {d.label_smoothing}")
    p.add_argument("--seed", type=int, default=S, help="default 0")
    p.add_argument("--device", default=S, help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    _bool_flag(p, "amp", "mixed precision (default: on for CUDA only; --no-amp to disable)")
    p.add_argument("--amp-dtype", choices=AMP_DTYPES, default=S, help="bf16 where supported, else fp16")
    _bool_flag(p, "channels-last", "channels_last memory format (default on; --no-channels-last)")
    p.add_argument("--out", default=S, help="run directory (default runs/<model>-<data>-<policy>-s<seed>-<time>)")
    p.add_argument("--data-dir", default=S, help="where datasets are cached/downloaded")
    p.add_argument("--log-every", type=int, default=S, help=f"steps between step records (default {d.log_every})")
    p.add_argument("--eval-every", type=int, default=S, help="epochs between evaluations (default 1)")
    p.add_argument("--fidelity-every", type=int, default=S,
                   help=f"steps between gradient-fidelity records, 0 = off (default {d.fidelity_every})")
    _bool_flag(p, "deterministic", "deterministic algorithms, one thread: bitwise reproducible on the CPU")
    p.add_argument("--num-threads", type=int, default=S, help="CPU threads (default: torch's)")
    p.add_argument("--train-subset", type=int, default=S, help="train on a fixed subset of N images")
    p.add_argument("--val-subset", type=int, default=S, help="evaluate on a fixed subset of N images")
    p.add_argument("--time-budget", type=float, default=S,
                   help="seconds of training; the LR schedule completes within it")
    p.add_argument("--stem", choices=STEMS, default=S, help="ResNet-18/34/50 stem (default cifar)")
    _bool_flag(p, "augment", "random crop + flip (default on; --no-augment)")
    p.add_argument("--split-seed", type=int, default=S, help="seed of the train/val split and subsets")
    p.add_argument("--eval-batch-size", type=int, default=S, help=f"default {d.eval_batch_size}")
    _bool_flag(p, "progress", "progress bar / lines on stderr (default on; --no-progress)")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="continue RUN (a folder or a name in runs/) from its last completed epoch")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    tune_malloc()
    given = explicit_args(args)
    try:
        if args.resume:
            result = resume(args.resume, overrides=given)
        else:
            result = train(TrainConfig(**given))
    except Exception as e:  # noqa: BLE001 - out of memory before training started (the dry run)
        if not _is_oom(e):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg} (while checking the first batch; nothing was written)", file=sys.stderr)
        return 1
    s = result.summary
    if result.status == "failed" or dist_env()[1] != 0:
        return result.exit_code  # the one-line error is printed already; rank 0 speaks for all
    acc = s.get("last_val_acc")
    print(f"{result.status}: {result.run_dir}  epochs {s['epochs_done']}/{s['epochs']}  steps {s['steps']}"
          + (f"  val_acc {acc:.4f}" if isinstance(acc, float) else "")
          + f"  saved activations {format_bytes(s['saved_activation_bytes'])}  wall {s['wall_s']:.1f}s")
    return result.exit_code


if __name__ == "__main__":  # pragma: no cover
    from .__main__ import main

    sys.exit(main(["train", *sys.argv[1:]]))
