"""What the run directory says about a trainer: config.json's record, summary.json, and the
JSON part of the resume state (with the RNG states it restores)."""

from __future__ import annotations

import os
import platform
import random
import time

import torch

from .config import RESUME_MAY_CHANGE
from .environment import versions
from .runs.writer import now_iso


def config_record(t) -> dict:
    """config.json: the resolved config and what the trainer found out at setup."""
    cfg, d, rep = t.config, t.data, t.saved_report
    amp_bytes = None if t.saved_report_amp is None else t.saved_report_amp.total_bytes
    return {
        **cfg.to_dict(),
        "policy_dict": t.policy.to_dict(),
        "classes": list(d.classes),
        "num_classes": t.num_classes,
        "image_size": d.image_size,
        "mean": [float(v) for v in torch.as_tensor(d.mean).flatten()],
        "std": [float(v) for v in torch.as_tensor(d.std).flatten()],
        "train_size": t.train_size,
        "val_size": t.val_size,
        "steps_per_epoch": t.steps_per_epoch,
        "total_steps": t.total_steps,
        "num_params": t.num_params,
        "device_used": str(t.device),
        "device_name": torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else platform.machine(),
        "amp_dtype_used": None if t.amp_dtype is None else str(t.amp_dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "memory": {"saved_activation_bytes": rep.total_bytes, "saved_activation_by_kind": rep.by_kind,
                   "saved_activation_bytes_amp": amp_bytes,
                   "measured_batch": t.measured_batch, "model_state_bytes": t.state_bytes},
        "world_size": t.world,
        "versions": versions(),
        "created": now_iso(),
    }


# what a resume may change in config.json: the settings it may change, and what follows from them
_RESUME_REFRESHES = (*sorted(RESUME_MAY_CHANGE), "total_steps", "device_used", "device_name", "amp_dtype_used",
                     "threads", "world_size", "versions")


def resumed_config_record(t, stored: dict) -> dict:
    """config.json after a resume: the stored record with the settings the run goes on with
    (RESUME_MAY_CHANGE: a longer schedule, another device, the switch; and what follows from
    them) and, under "resumes", where each resume started and what it changed from."""
    fresh = config_record(t)
    now = {k: fresh[k] for k in _RESUME_REFRESHES}
    # of the memory figures, the switch changes the model state, the device (autocast) the amp bytes
    now["memory"] = {**stored.get("memory", {}), **{k: fresh["memory"][k] for k in (
        "model_state_bytes", "saved_activation_bytes_amp")}}
    was = {k: stored.get(k) for k, v in now.items() if stored.get(k) != v}
    resumes = [*stored.get("resumes", []), {"at": now_iso(), "step": t.step, "epoch": t.epoch, "was": was}]
    return {**stored, **now, "resumes": resumes}


def summary_record(t, status: str, **extra) -> dict:
    """summary.json: where the run stands ("running" with the pid, then how it ended)."""
    cfg = t.config
    wall = t.wall_before + (time.perf_counter() - t.session_start)
    train_s = t.train_before + t.train_time
    steps_now = t.step - t.session_first_step
    last = t.last_eval or {}
    s = {
        "status": status,
        "epochs_done": t.epoch, "epochs": cfg.epochs, "steps": t.step, "total_steps": t.total_steps,
        "best_val_acc": t.best_val_acc, "best_epoch": t.best_epoch,
        "last_val_acc": last.get("val_acc"), "last_val_loss": last.get("val_loss"),
        "per_class_val_acc": last.get("per_class_acc"),
        "last_train_loss": last.get("train_loss"), "last_train_acc": last.get("train_acc"),
        "saved_activation_bytes": t.saved_report.total_bytes,
        "saved_activation_by_kind": t.saved_report.by_kind,
        "saved_activation_bytes_amp": None if t.saved_report_amp is None else t.saved_report_amp.total_bytes,
        "model_state_bytes": t.state_bytes["total"],
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(t.device) if t.device.type == "cuda" else None,
        "wall_s": round(wall, 3), "train_s": round(train_s, 3),
        "mean_step_s": round(t.train_time / steps_now, 6) if steps_now else None,
        "samples_per_s": round(steps_now * cfg.batch_size / t.train_time, 1) if t.train_time else None,
        "device": str(t.device), "policy": str(cfg.policy), "model": cfg.model, "dataset": cfg.dataset,
        "updated": now_iso(),
    }
    s.update(extra)
    if status == "running":
        s["pid"] = os.getpid()
    if t.world > 1:
        s["world_size"] = t.world
    return s


def resume_meta(t) -> dict:
    """The JSON part of the resume state at the end of an epoch."""
    return {"epoch": t.epoch, "step": t.step, "schedule": t.schedule.state_dict(),
            "best_val_acc": t.best_val_acc, "best_epoch": t.best_epoch, "last_eval": t.last_eval,
            "wall_s": t.wall_before + (time.perf_counter() - t.session_start),
            "train_s": t.train_before + t.train_time}


def restore_rng(tensors: dict, meta: dict, device: torch.device) -> None:
    """Put back the RNG states a resume file saved (torch CPU, CUDA when the devices match, Python)."""
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda s: int(s.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and device.type == "cuda" and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    if meta.get("python_random"):
        v, internal, gauss = meta["python_random"]
        random.setstate((v, tuple(internal), gauss))
