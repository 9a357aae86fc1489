"""The job runner: one process trains one config. The app's launcher, `python -m core train`
and scripts/train_shipped.py all end in `run_training`.

    python -m core.engine.jobs --state runs/.launcher/cpu.json --job ID    a queued job of the app
    python -m core.engine.jobs --config '{"epochs": 20, ...}' [--resume RUN]
                                                                           settings as JSON (train_shipped.py)
    python -m core.engine.jobs --list [--root runs]                        the app's queues

A config travels as JSON (TrainConfig.to_dict(), or only the settings given) and is parsed
once, here: no argv round trip.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .config import TrainConfig
from .environment import is_oom, tune_malloc
from .launcher import Launcher


def run_training(settings: dict, resume_dir: str | None = None) -> int:
    """Train a new run from `settings` (TrainConfig fields), or resume `resume_dir` with
    `settings` as overrides (only --epochs may grow). Prints the closing line; returns the exit
    code (0 finished, 130 stopped, 1 failed; a bad setting raises ValueError: exit 2)."""
    import dataclasses

    from .distributed import dist_env
    from .trainer import resume, train

    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown setting{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    tune_malloc()
    try:
        result = resume(resume_dir, overrides=settings) if resume_dir else train(TrainConfig(**settings))
    except Exception as e:  # noqa: BLE001 - out of memory before training started (the dry run)
        if not is_oom(e):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg} (while checking the first batch; nothing was written)", file=sys.stderr)
        return 1
    s = result.summary
    if result.status == "failed" or dist_env()[1] != 0:
        return result.exit_code  # the one-line error is printed already; rank 0 speaks for all
    from ..method.meter import format_bytes

    acc = s.get("last_val_acc")
    print(f"{result.status}: {result.run_dir}  epochs {s['epochs_done']}/{s['epochs']}  steps {s['steps']}"
          + (f"  val_acc {acc:.4f}" if isinstance(acc, float) else "")
          + f"  saved activations {format_bytes(s['saved_activation_bytes'])}  wall {s['wall_s']:.1f}s")
    return result.exit_code


def run_job(state_file: Path, job_id: str) -> int:
    """Train one queued job of the app's launcher, then let the queue start the next one."""
    device = state_file.stem.replace("-", ":", 1) if state_file.stem.startswith("cuda-") else state_file.stem
    launcher = Launcher(runs_root=state_file.parent.parent)
    job = next((j for j in launcher._load(device) if j.id == job_id), None)
    if job is None:
        print(f"error: job {job_id} not found in {state_file}", file=sys.stderr)
        return 2

    def interrupt(signum, frame):  # a stop before the trainer installs its own handler
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    code = 1
    try:
        print(f"job {job.id}: {json.dumps(job.config, sort_keys=True)}", flush=True)
        code = run_training(job.config)
    except KeyboardInterrupt:
        code = 130
    except ValueError as e:  # a setting that cannot train: one line, as the command line says it
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except BaseException as e:  # noqa: BLE001 - record it, then let the queue go on
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # bookkeeping must not be cut short
        launcher._finish(device, job_id, code)
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.engine.jobs", description="PoolProp's job runner")
    p.add_argument("--state", help="a launcher queue file (with --job)")
    p.add_argument("--job", help="the id of a queued job")
    p.add_argument("--config", help="settings as a JSON object of TrainConfig fields")
    p.add_argument("--resume", help="continue this run (--config then holds the overrides)")
    p.add_argument("--list", action="store_true", help="list the queued and past jobs")
    p.add_argument("--root", default=None, help="runs root of the queues to list (default runs/)")
    args = p.parse_args(argv)
    if args.list:
        for j in Launcher(args.root).jobs():
            print(f"{j.id}  {j.device:7s} {j.state:9s} {j.label}" + (f"  error: {j.error}" if j.error else ""))
        return 0
    if args.state and args.job:
        return run_job(Path(args.state), args.job)
    if args.config is None and not args.resume:
        p.error("give --state and --job, or --config (and/or --resume), or --list")
    try:
        settings = json.loads(args.config or "{}")
        if not isinstance(settings, dict):
            raise ValueError("--config must be a JSON object")
        return run_training(settings, args.resume)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
