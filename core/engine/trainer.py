"""The training loop: `Trainer(config).setup()` then `.run()`, or `train(config)`.

minGPT-style callbacks: `add_callback("on_step", fn)` where fn(trainer) is called after every
step; "on_log" and "on_epoch" get (trainer, record) for each step and eval record. A callback
may call `trainer.request_stop()`. Everything around the loop has its own file: the config
(config.py), the schedule, resume state, several processes, the run-directory writer
(runs/writer.py) and what the run directory says (records.py). Nothing here imports the UI:
this runs on a machine with only torch, torchvision, numpy and safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..method import CompressionPolicy, PolicyError, compress_model, fastpath, model_state_bytes, saved_activation_bytes
from ..method.gradients import layer_fidelity
from ..models import build_model
from . import data as data_mod
from . import distributed, records, step_in_backward
from .config import RESUME_MAY_CHANGE, TrainConfig
from .environment import configure_process, is_oom, pick_device, seed_everything
from .evaluate import evaluate_model
from .loop import train_epochs
from .progress import progress_bar
from .resume import load_resume, restore_optimizer
from .runs import RunWriter, default_run_dir, load_config, resolve_run
from .runs.writer import NullWriter, check_out_free, now_iso, refuse_live_run
from .schedule import LRSchedule


class StopTraining(Exception):
    """Raised inside the loop when a stop was requested (SIGTERM, Ctrl-C, a callback)."""


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
    config: TrainConfig
    resume_dir: Path | None = None
    callbacks: dict = field(default_factory=lambda: {"on_step": [], "on_log": [], "on_epoch": []})

    def add_callback(self, event: str, fn) -> None:
        self.callbacks[event].append(fn)

    def trigger_callbacks(self, event: str, *args) -> None:
        for fn in self.callbacks.get(event, []):
            fn(self, *args)

    def request_stop(self, reason: str = "requested") -> None:
        self.stop_reason = self.stop_reason or reason

    # -- setup: everything that can fail on bad input, before anything is written ----------
    def setup(self) -> None:
        self.stop_reason = None
        self.resume_tensors = self.resume_meta = None
        if self.resume_dir is not None and (Path(self.resume_dir) / "resume.safetensors").exists():
            self.resume_tensors, self.resume_meta = load_resume(self.resume_dir)
        # else: killed before its first epoch ended: start again from step 0 in the same folder
        cfg = self.config = self.config.resolved()
        self.policy = cfg.policy
        self.world, self.rank, self.local_rank = distributed.dist_env()
        self.is_main = self.rank == 0
        self._owns_pg = False
        if self.resume_dir is None and cfg.out and self.is_main:
            check_out_free(Path(cfg.out))  # fail before the (possibly slow) dataset load
        if self.world > 1:
            self.device, self._owns_pg = distributed.init_distributed(cfg.device, cfg.batch_size, self.world,
                                                                      self.local_rank)
        else:
            self.device = pick_device(cfg.device)
        self._threads_before = configure_process(cfg.deterministic, cfg.num_threads, self.device)
        seed_everything(cfg.seed)
        self._build_data(cfg)
        self._build_model(cfg)
        self.epoch, self.step = 0, 0
        self.best_val_acc, self.best_epoch, self.last_eval = None, None, None
        self.wall_before, self.train_before = 0.0, 0.0
        if self.resume_meta is not None:
            self._restore()
        self._measure(cfg)

    def _build_data(self, cfg: TrainConfig) -> None:
        """The data set (DatasetError is a ValueError: one line, exit 2, nothing written yet)."""
        d = self.data = data_mod.load_dataset(cfg.dataset, data_dir=cfg.data_dir, split_seed=cfg.split_seed)
        tx, ty = data_mod.fixed_subset(d.train_x, d.train_y, cfg.train_subset, cfg.split_seed)
        vx, vy = data_mod.fixed_subset(d.val_x, d.val_y, cfg.val_subset, cfg.split_seed + 1)
        self.train_size, self.val_size, self.num_classes = len(ty), len(vy), d.num_classes
        if len(ty) == 0:
            raise ValueError(f"dataset {cfg.dataset!r} has no training images")
        dev = self.device
        self.train_loader = data_mod.BatchLoader(
            tx.to(dev), ty.to(dev), d.mean, d.std, cfg.batch_size, train=True, device=dev, seed=cfg.seed,
            augment=cfg.augment, channels_last=cfg.channels_last)
        if self.world > 1:
            self.train_loader = distributed.ShardLoader(self.train_loader, self.rank, self.world)
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

    def _build_model(self, cfg: TrainConfig) -> None:
        """Model, policy, optimiser, mixed precision."""
        dev = self.device
        self.model = build_model(cfg.model, num_classes=self.num_classes, stem=cfg.stem, weights=cfg.weights)
        compress_model(self.model, self.policy)
        if self.policy != CompressionPolicy():
            fastpath.use_compiled_on(dev)  # the same bytes and results, fused passes
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
        if cfg.amp if cfg.amp is not None else dev.type == "cuda":
            bf16 = cfg.amp_dtype == "bf16" or (cfg.amp_dtype == "auto" and (
                dev.type != "cuda" or torch.cuda.is_bf16_supported()))
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 and dev.type == "cuda" else None
        self.in_backward = None
        if cfg.step_in_backward:
            if why := step_in_backward.refusal(self.scaler is not None, self.world):
                raise ValueError(why)
            self.in_backward = step_in_backward.StepInBackward(self.model, self.opt)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def _restore(self) -> None:
        t, meta = self.resume_tensors, self.resume_meta
        state = {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}
        expected = self.model.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise ValueError(f"{self.resume_dir / 'resume.safetensors'} does not fit {self.config.model}")
        self.model.load_state_dict(state)
        restore_optimizer(self.opt, t, meta["optimizer"])
        records.restore_rng(t, meta, self.device)
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.epoch, self.step = int(meta["epoch"]), int(meta["step"])
        self.best_val_acc, self.best_epoch = meta.get("best_val_acc"), meta.get("best_epoch")
        self.last_eval = meta.get("last_eval")
        self.wall_before, self.train_before = float(meta.get("wall_s", 0.0)), float(meta.get("train_s", 0.0))

    def _measure(self, cfg: TrainConfig) -> None:
        """A dry run on one real batch: a policy that does not fit (K larger than a feature map)
        fails here, and the saved-activation bytes are measured once (exact, any device). Runs
        are compared by the float32 figure; under autocast what training really keeps is
        measured too (and the autocast forward is checked)."""
        self.train_loader.set_epoch(self.epoch)
        xb, yb = next(iter(self.train_loader))
        try:
            self.saved_report = saved_activation_bytes(self.model, xb, yb)
            self.saved_report_amp = (None if self.amp_dtype is None else
                                     saved_activation_bytes(_Autocast(self.model, self._autocast), xb, yb))
        except PolicyError as e:
            raise PolicyError(f"policy {cfg.policy} does not fit {cfg.model} on {cfg.dataset}: {e}") from None
        self.measured_batch = int(yb.shape[0])
        self.state_bytes = model_state_bytes(self.model, cfg.optimizer, cfg.step_in_backward)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.net = self.model  # what the training step runs: the model, or its DDP wrapper
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # per-rank BatchNorm (docs/reliability.md); buffers broadcast from rank 0 each step
            dev = self.device
            self.net = DDP(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- the run directory -------------------------------------------------------------
    def _open_writer(self) -> None:
        cfg = self.config
        if not self.is_main:  # only rank 0 writes; the others learn the folder's name
            self.run_dir = Path(distributed.broadcast_text(None, self.device))
            cfg.out = str(self.run_dir)
            self.writer = NullWriter(self.run_dir)
            return
        if self.resume_dir is not None:
            self.run_dir = Path(self.resume_dir)
            self.writer = RunWriter(self.run_dir)
            self.writer.reopen(self.step, self.epoch, self.wall_before)
            self.writer.rewrite_config(records.resumed_config_record(self, load_config(self.run_dir)))
        else:
            self.run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
            cfg.out = str(self.run_dir)
            self.writer = RunWriter(self.run_dir)
            self.writer.create(records.config_record(self))
        if self.world > 1:
            distributed.broadcast_text(str(self.run_dir), self.device)

    def write_summary(self, status: str, **extra) -> dict:
        s = records.summary_record(self, status, **extra)
        self.writer.summary(s)
        return s

    def _weights_metadata(self) -> dict[str, str]:
        return {"model": self.config.model, "policy": str(self.policy), "step": str(self.step),
                "epoch": str(self.epoch)}

    # -- one step ----------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        """Forward, backward, update. Returns (loss, correct) as device tensors (no sync)."""
        with self._autocast():
            out = self.net(x)
            loss = self.criterion(out, y)
        self.opt.zero_grad(set_to_none=True)
        if self.in_backward is not None:
            with self.in_backward.armed():  # the update happens inside
                loss.backward()
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        return loss.detach(), (out.argmax(1) == y).sum()

    def wall(self) -> float:
        """Seconds this run has trained, evaluations included, over all its sessions."""
        return self.wall_before + (time.perf_counter() - self.session_start)

    def progress_at(self, step: int) -> float:
        p = step / self.total_steps
        if self.config.time_budget:
            wall = self._synced_wall if self.world > 1 else self.wall()
            p = max(p, wall / self.config.time_budget)
        return p

    def sync_stop(self) -> None:
        if self.world > 1:
            self.stop_reason, self._synced_wall = distributed.agree_on_stop(self.stop_reason, self.wall(),
                                                                             self.device)

    def all_sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        return distributed.all_sum(values, self.device) if self.world > 1 else list(values)

    def evaluate(self) -> dict:
        if self.val_loader is None:
            return {"loss": None, "acc": None, "per_class_acc": None, "n": 0}
        return evaluate_model(self.model, self.val_loader, self.num_classes, amp_dtype=self.amp_dtype)

    # -- the run -----------------------------------------------------------------------
    def run(self) -> TrainResult:
        """setup() must have run. Trains, writes the run directory, returns the result."""
        cfg = self.config
        self.session_start = time.perf_counter()
        self.session_first_step = self.step
        self.train_time = 0.0
        self._synced_wall = self.wall_before
        self._open_writer()
        self.write_summary("running")
        old_handlers = self._install_signal_handlers()
        bar = progress_bar(self.total_steps, self.step, cfg.progress and self.is_main)
        status, extra, code = "finished", {}, 0
        try:
            train_epochs(self, bar)
            done = self.epoch >= cfg.epochs or self.step >= self.total_steps
            if self.stop_reason and self.stop_reason not in ("time budget", "step cap") and not done:
                raise StopTraining(self.stop_reason)
            if self.stop_reason:
                extra["stop_reason"] = self.stop_reason
        except (StopTraining, KeyboardInterrupt) as e:
            status, code = "stopped", 130
            extra["stop_reason"] = str(e) or "interrupted"
            self.writer.weights(self.model.state_dict(), self._weights_metadata())  # resume.* stays at the epoch end
        except Exception as e:  # noqa: BLE001
            status, code = "failed", 1
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            extra["error"] = f"out of memory: {msg}" if is_oom(e) and "out of memory" not in msg.lower() else msg
            extra["error_type"] = type(e).__name__
            if not is_oom(e):
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
        if self.in_backward is not None:
            self.in_backward.remove()
        self.summary = self.write_summary(status, finished=now_iso(), **extra)
        self.writer.close()
        if self._owns_pg:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self._owns_pg = False
        torch.set_num_threads(self._threads_before)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def record_fidelity(self, x, y, epoch: int) -> None:
        layers = layer_fidelity(self.model, self.policy, x, y, self.criterion)
        self.writer.append({"type": "fidelity", "step": self.step, "epoch": epoch, "layers": layers})

    def checkpoint(self) -> None:
        """The end of an epoch: resume state and weights."""
        self.writer.checkpoint(self.model, self.opt, records.resume_meta(self), self.scaler, self._weights_metadata())

    # -- signals -------------------------------------------------------------------------
    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        old = {}

        def handler(signum, frame):
            if self.stop_reason and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self.request_stop(signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, OSError):
                old[sig] = signal.signal(sig, handler)
        return old

    def _restore_signal_handlers(self, old) -> None:
        for sig, h in (old or {}).items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, h)


def _with_callbacks(t: Trainer, callbacks: dict | None) -> Trainer:
    for event, fns in (callbacks or {}).items():
        for fn in fns:
            t.add_callback(event, fn)
    return t


def train(config: TrainConfig, callbacks: dict | None = None) -> TrainResult:
    """Train a new run from `config` (see `Trainer`)."""
    t = _with_callbacks(Trainer(config), callbacks)
    t.setup()
    return t.run()


def resume(run_dir, overrides: dict | None = None, callbacks: dict | None = None) -> TrainResult:
    """Continue a run from its last completed epoch. `overrides` may only extend `epochs`
    (and change settings in RESUME_MAY_CHANGE that do not alter what is trained); config.json
    then says what the run goes on with, and what it had before."""
    run_dir = resolve_run(run_dir)
    refuse_live_run(run_dir)
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
    t = _with_callbacks(Trainer(cfg, resume_dir=run_dir), callbacks)
    t.setup()
    if t.epoch >= cfg.epochs or t.step >= t.total_steps:
        raise ValueError(f"run {run_dir.name} already completed {t.epoch} of {cfg.epochs} epochs "
                         f"({t.step} steps); pass --epochs N to train further")
    return t.run()
