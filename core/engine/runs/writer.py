"""Writing a run directory, the contract between the trainer and the app (docs/training.md):

    config.json        at the start (RUN_FORMAT); rewritten at each resume (settings now, `resumes`)
    metrics.jsonl      appended line by line (step, eval, fidelity and resume records)
    model.safetensors  + resume.* atomically at each epoch end (temp file + rename)
    summary.json       "running" with the pid while training; then finished / failed / stopped

The reader is beside it (reader.py). Nothing here is pickled. Only rank 0 of several
processes writes; the others get a writer that does nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from .. import atomic
from ..resume import save_resume
from .paths import LOCAL_DIR
from .reader import load_summary, pid_alive, read_metrics

RUN_FORMAT = "poolprop-run/1"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def dataset_short(name: str) -> str:
    """A dataset name fit for a folder name: 'imagefolder:data/cifar/train' -> 'cifar-train'."""
    if name.startswith("imagefolder:"):
        p = Path(name.split(":", 1)[1].rstrip("/\\"))
        parts = [p.name]
        if p.name.lower() in ("train", "val", "test", "images", "data") and p.parent.name:
            parts.insert(0, p.parent.name)
        name = "-".join(parts) or "imagefolder"
    return path_safe(name)


def path_safe(text: str) -> str:
    text = text.replace("+", "_").replace(",", "-").replace("=", "-")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def default_run_dir(cfg, now: datetime | None = None) -> Path:
    """runs/<model>-<data>-<policy>-s<seed>-<time>, with -2, -3, ... when taken."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    name = f"{cfg.model}-{dataset_short(cfg.dataset)}-{path_safe(str(cfg.policy))}-s{cfg.seed}-{stamp}"
    path, i = LOCAL_DIR / name, 2
    while path.exists():
        path, i = LOCAL_DIR / f"{name}-{i}", i + 1
    return path


def check_out_free(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} already exists and is not empty; choose another --out or continue it with --resume")


def refuse_live_run(run_dir: Path) -> None:
    """Two trainers in one folder would interleave their files: refuse while its process lives."""
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun rank 0 decides (and its own pid is the one recorded)
    try:
        s = load_summary(run_dir) or {}
    except ValueError:
        return
    pid = s.get("pid")
    if s.get("status") == "running" and pid and int(pid) != os.getpid() and pid_alive(pid):
        raise ValueError(f"run {Path(run_dir).name} is still training (pid {pid}); stop it before resuming")


class RunWriter:
    """The files of one run directory, written as the trainer goes."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._metrics = None

    def create(self, config_record: dict) -> None:
        """A new run: the folder (empty or new) and its config.json."""
        check_out_free(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.run_dir / "config.json", {**config_record, "format": RUN_FORMAT})
        self._metrics = atomic.JsonlAppender(self.run_dir / "metrics.jsonl")

    def reopen(self, step: int, epoch: int, wall: float) -> None:
        """A resumed run: drop temp files a kill left and the records past the checkpoint (they
        will be recomputed), then say in the metrics where training resumed."""
        for p in self.run_dir.glob(".*.tmp"):  # `.<name>.<random>.tmp` of a cut atomic write
            with contextlib.suppress(OSError):
                p.unlink()
        log = read_metrics(self.run_dir)
        keep = [r for r in log if int(r.get("step", 0) or 0) <= step
                and (r.get("type") != "eval" or int(r.get("epoch", 0)) <= epoch)]
        if len(keep) != len(log) or log.skipped:
            atomic.write_text(self.run_dir / "metrics.jsonl", "".join(atomic.dumps(r) + "\n" for r in keep))
        self._metrics = atomic.JsonlAppender(self.run_dir / "metrics.jsonl")
        self.append({"type": "resume", "step": step, "epoch": epoch, "wall": round(wall, 3)})

    def rewrite_config(self, record: dict) -> None:
        """config.json replaced (at a resume: the settings it goes on with)."""
        atomic.write_json(self.run_dir / "config.json", record)

    def append(self, record: dict) -> None:
        self._metrics.append(record)

    def summary(self, summary: dict) -> None:
        atomic.write_json(self.run_dir / "summary.json", summary)

    def weights(self, state_dict: dict, metadata: dict[str, str]) -> None:
        atomic.write_safetensors(self.run_dir / "model.safetensors", state_dict, metadata={"format": "pt", **metadata})

    def checkpoint(self, model, opt, meta: dict, scaler, weights_metadata: dict[str, str]) -> None:
        """The end of an epoch: the resume state, then the weights."""
        save_resume(self.run_dir, model, opt, meta, scaler)
        self.weights(model.state_dict(), weights_metadata)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()


class NullWriter(RunWriter):
    """Ranks other than 0 of several processes: they write nothing."""

    def create(self, config_record: dict) -> None:
        pass

    def reopen(self, step: int, epoch: int, wall: float) -> None:
        pass

    def rewrite_config(self, record: dict) -> None:
        pass

    def append(self, record: dict) -> None:
        pass

    def summary(self, summary: dict) -> None:
        pass

    def weights(self, state_dict: dict, metadata: dict[str, str]) -> None:
        pass

    def checkpoint(self, model, opt, meta: dict, scaler, weights_metadata: dict[str, str]) -> None:
        pass
