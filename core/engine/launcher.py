"""Start training runs as separate processes, one at a time per device (docs/app.md).

The app never trains inside its own process. `Launcher.submit(config)` writes a job into a
per-device queue file under `runs/.launcher/` and, if nothing is training on that device,
starts it at once as

    python -m core.engine.jobs --state runs/.launcher/<device>.json --job <id>

in a new session (its own process group). That small runner (jobs.py) trains the job's
config (TrainConfig.to_dict() JSON, parsed once there) directly, records the exit code, and
then starts the next queued job for the device, so a queue drains even when no browser tab
is open. Anyone
reading the queue (every page's status indicator) also repairs it: a job whose process died
without saying so (kill -9, a crash) is marked done and the next one starts.

All state is on disk, guarded by an exclusive lock file per device, so a page reload, a
closed tab, a second viewer or a second Streamlit server see the same jobs, and many
viewers pressing Start cannot train twice on one device: the second start is queued.

Stop = SIGTERM to the job's process group: the trainer finishes its step, writes
summary.json with status "stopped" and keeps its weights (model.safetensors). A queued job
is simply cancelled. Nothing here imports streamlit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import atomic
from .config import TrainConfig
from .environment import training_subprocess_env
from .runs import LOCAL_DIR, ROOT, default_run_dir, pid_alive

STATE_DIRNAME = ".launcher"
KEEP_DONE = 50  # finished jobs kept per device file (newest)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: a best-effort lock by exclusive create
    fcntl = None


@dataclass
class Job:
    """One requested training run. `config` is its TrainConfig.to_dict()."""

    id: str
    device: str
    run_dir: str
    config: dict
    label: str = ""
    state: str = "queued"  # -> "running" -> "done"; or "cancelled" while queued
    created: float = 0.0
    pid: int | None = None
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    stop_requested: bool = False
    log: str | None = None
    error: str | None = None  # one line: why it failed (from the log) when it did
    position: int = field(default=0, compare=False)  # 1 = next in the queue; 0 when not queued

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("position")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and k != "position"})

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def run_status(self) -> str | None:
        """The trainer's own status from summary.json (finished, stopped, failed, running), if written."""
        try:
            return json.loads((Path(self.run_dir) / "summary.json").read_text()).get("status")
        except (OSError, ValueError):
            return None


def device_key(device: str = "auto") -> str:
    """A stable name for the device a config will train on: cpu, cuda:0, cuda:1, mps."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return "cuda:0"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device == "cuda":
        return "cuda:0"
    return device


def _safe(name: str) -> str:
    return name.replace(":", "-").replace("/", "-")


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------

def _reap(pid: int | None) -> int | None:
    """Collect our own finished child (no zombie left behind); its exit code when we can tell."""
    if not pid:
        return None
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        return None
    if done == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _log_error(path: str | None) -> str | None:
    """The last 'error: ...' line of a job's log, else its last non-empty line."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return None
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln[len("error:"):].strip()
    return lines[-1][:300] if lines else None


# ---------------------------------------------------------------------------------------
# The launcher
# ---------------------------------------------------------------------------------------

class Launcher:
    """Per-device job queues on disk. Cheap to create: make one per page run if you like.

    runs_root: where run folders and the `.launcher/` state go (default runs/).
    python: the interpreter for the job processes (default this one).
    env: extra environment variables for the job processes.
    """

    def __init__(self, runs_root: str | os.PathLike | None = None, python: str | None = None,
                 env: dict | None = None, cwd: str | os.PathLike | None = None):
        self.root = Path(runs_root) if runs_root is not None else LOCAL_DIR
        self.state_dir = self.root / STATE_DIRNAME
        self.python = python or sys.executable
        self.extra_env = dict(env or {})
        self.cwd = Path(cwd) if cwd is not None else ROOT

    # -- files -----------------------------------------------------------------------
    def _state_path(self, device: str) -> Path:
        return self.state_dir / f"{_safe(device)}.json"

    @contextlib.contextmanager
    def _locked(self, device: str):
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = self.state_dir / f"{_safe(device)}.lock"
        if fcntl is not None:
            with open(lock, "a+") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        else:  # pragma: no cover
            deadline = time.time() + 10
            while True:
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    break
                except FileExistsError:
                    if time.time() > deadline:
                        os.unlink(lock)
                    time.sleep(0.05)
            try:
                yield
            finally:
                os.close(fd)
                os.unlink(lock)

    def _load(self, device: str) -> list[Job]:
        path = self._state_path(device)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return [Job.from_dict(d) for d in data.get("jobs", [])]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError, AttributeError):  # a damaged file: start afresh, keep a copy
            with contextlib.suppress(OSError):
                path.replace(path.with_suffix(".damaged"))
            return []

    def _save(self, device: str, jobs: list[Job]) -> None:
        done = [j for j in jobs if not j.active]
        keep = {id(j) for j in done[-KEEP_DONE:]} | {id(j) for j in jobs if j.active}
        atomic.write_json(self._state_path(device),
                          {"device": device, "jobs": [j.to_dict() for j in jobs if id(j) in keep]})

    def devices(self) -> list[str]:
        if not self.state_dir.is_dir():
            return []
        return sorted(p.stem.replace("-", ":", 1) if p.stem.startswith("cuda-") else p.stem
                      for p in self.state_dir.glob("*.json"))

    # -- queue logic (call with the lock held) ---------------------------------------
    def _repair(self, jobs: list[Job]) -> bool:
        """Mark running jobs whose process is gone as done. True when something changed."""
        changed = False
        for j in jobs:
            if j.state != "running":
                continue
            code = _reap(j.pid)
            if code is None and pid_alive(j.pid, (j.id.encode(),) if j.id else ()):
                continue
            j.state, j.ended = "done", j.ended or time.time()
            if j.returncode is None:
                j.returncode = code
            status = j.run_status()
            if status not in ("finished", "stopped") and j.error is None:
                j.error = _log_error(j.log) or ("stopped before training began" if j.stop_requested
                                                 else "the training process ended without a summary")
            changed = True
        return changed

    def _spawn(self, job: Job, device: str) -> None:
        env = training_subprocess_env()
        env.update(self.extra_env)
        env["PYTHONPATH"] = str(self.cwd) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log_path = self.state_dir / f"{job.id}.log"
        cmd = [self.python, "-m", "core.engine.jobs", "--state", str(self._state_path(device)), "--job", job.id]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        job.pid, job.state, job.started, job.log = proc.pid, "running", time.time(), str(log_path)

    def _advance(self, device: str, jobs: list[Job]) -> bool:
        """Start the first queued job when nothing runs on the device. True when one started."""
        if any(j.state == "running" for j in jobs):
            return False
        for j in jobs:
            if j.state == "queued":
                try:
                    self._spawn(j, device)
                except OSError as e:
                    j.state, j.ended, j.error = "done", time.time(), f"could not start: {e}"
                    continue
                return True
        return False

    def _refreshed(self, device: str) -> list[Job]:
        with self._locked(device):
            jobs = self._load(device)
            if self._repair(jobs) | self._advance(device, jobs):
                self._save(device, jobs)
        pos = 0
        for j in jobs:
            if j.state == "queued":
                pos += 1
                j.position = pos
        return jobs

    # -- public API --------------------------------------------------------------------
    def submit(self, config: TrainConfig, label: str | None = None) -> Job:
        """Queue a training run; it starts now if the device is free.

        The run folder is fixed here (config.out, or a fresh name under runs_root), so the
        app knows where the run will appear. Raises ValueError for a config that cannot train.
        """
        import dataclasses

        config.validate()
        device = device_key(config.device)
        if not config.out:
            default = default_run_dir(config)
            config = dataclasses.replace(config, out=str(self.root / default.name))
        run_dir = Path(config.out)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(f"{run_dir} already exists and is not empty")
        job = Job(id=uuid.uuid4().hex[:12], device=device, run_dir=str(run_dir), config=config.to_dict(),
                  label=label or run_dir.name, created=time.time())
        with self._locked(device):
            jobs = self._load(device)
            self._repair(jobs)
            if any(j.active and Path(j.run_dir) == run_dir for j in jobs):
                raise ValueError(f"a job for {run_dir} is already queued or running")
            jobs.append(job)
            self._advance(device, jobs)
            self._save(device, jobs)
        if job.state == "queued":
            job.position = sum(1 for j in jobs if j.state == "queued" and j.created <= job.created)
        return job

    def jobs(self, device: str | None = None) -> list[Job]:
        """All known jobs (of one device, or of every device), oldest first, after repairing
        the queue (dead processes marked done, the next queued job started)."""
        devices = [device] if device else self.devices()
        out = []
        for d in devices:
            out += self._refreshed(d)
        return out

    def active(self, device: str | None = None) -> Job | None:
        """The job training now on `device` (default: this machine's default device)."""
        device = device or device_key("auto")
        return next((j for j in self.jobs(device) if j.state == "running"), None)

    def queued(self, device: str | None = None) -> list[Job]:
        device = device or device_key("auto")
        return [j for j in self.jobs(device) if j.state == "queued"]

    def stop(self, job_id: str) -> str:
        """Stop a running job (SIGTERM to its process group) or cancel a queued one.

        Returns "stopping", "cancelled" or "not active". The trainer then writes status
        "stopped" and keeps its weights; the next queued job starts when it has exited.
        """
        for device in self.devices():
            with self._locked(device):
                jobs = self._load(device)
                job = next((j for j in jobs if j.id == job_id), None)
                if job is None:
                    continue
                self._repair(jobs)
                result = "not active"
                if job.state == "queued":
                    job.state, job.ended = "cancelled", time.time()
                    result = "cancelled"
                elif job.state == "running":
                    job.stop_requested = True
                    try:
                        os.killpg(job.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                    except PermissionError:
                        os.kill(job.pid, signal.SIGTERM)
                    result = "stopping"
                self._save(device, jobs)
                return result
        return "not active"

    def _finish(self, device: str, job_id: str, code: int) -> None:
        """Called by the job process itself when training has returned."""
        with self._locked(device):
            jobs = self._load(device)
            job = next((j for j in jobs if j.id == job_id), None)
            if job is not None:
                job.state, job.ended, job.returncode = "done", time.time(), code
                if code != 0 and job.run_status() not in ("finished", "stopped"):
                    job.error = _log_error(job.log) or f"exit code {code}"
            self._repair(jobs)
            self._advance(device, jobs)
            self._save(device, jobs)
