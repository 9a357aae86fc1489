"""kill -9 at pseudo-random moments: the run directory always parses, and `--resume` finishes it.

One tiny training subprocess (`python -m core train ... --train-subset 256 --epochs 3`) is
killed with SIGKILL at a moment drawn from a seeded RNG, resumed, killed again, ... (KILLS
times), then resumed to the end. After every kill: config.json, summary.json and resume.json
are valid JSON, model.safetensors and resume.safetensors load with safetensors, every line
of metrics.jsonl parses except possibly a last one without its newline, nothing but the
hidden temp files of atomic writes (`.<name>.<random>.tmp`, which no reader opens) is extra,
and `list_runs` shows the run as `interrupted`. A resume removes those temp files.

Out of memory is covered in tests/test_train.py (test_simulated_cuda_oom_fails_cleanly) and
SIGTERM there too; this file is only about kill -9.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from core.cli import main
from core.engine.environment import training_subprocess_env
from core.engine.runs.listing import list_runs
from core.engine.runs.reader import read_metrics

ROOT = Path(__file__).resolve().parents[1]
KILLS = 4
SEED = 20261128
RUN_FILES = {"config.json", "metrics.jsonl", "model.safetensors", "resume.safetensors", "resume.json",
             "summary.json"}
TEMP = re.compile(r"^\.(config\.json|summary\.json|model\.safetensors|resume\.safetensors|resume\.json|"
                  r"metrics\.jsonl)\..+\.tmp$")
ARGS = ["--model", "resnet20", "--dataset", "features10:train=256,val=64", "--train-subset", "256",
        "--epochs", "3", "--batch-size", "32", "--eval-batch-size", "64", "--policy", "avg2+mask",
        "--log-every", "1", "--fidelity-every", "5", "--num-threads", "1", "--no-progress"]


def _env() -> dict:
    env = training_subprocess_env()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _summary(out: Path) -> dict:
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def check_parses(out: Path) -> None:
    """Every file a reader opens parses; anything else is a hidden temp file of an atomic write."""
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "summary.json"} <= names, names
    extra = names - RUN_FILES
    assert all(TEMP.match(n) for n in extra), extra
    for name in ("config.json", "summary.json", "resume.json"):
        if name in names:
            assert isinstance(json.loads((out / name).read_text()), dict), name
    for name in ("model.safetensors", "resume.safetensors"):
        if name in names:
            assert load_file(str(out / name)), name
    if "metrics.jsonl" in names:
        text = (out / "metrics.jsonl").read_text()
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]  # tail: "" when the file ends with a newline
        for ln in complete:
            if ln.strip():
                assert isinstance(json.loads(ln), dict), ln
        if tail:  # cut mid-write: the one line allowed not to parse; readers skip it
            log = read_metrics(out)
            assert log.skipped == [(len(lines), "last line cut mid-write")] or not log.skipped


def _last_step(out: Path) -> int:
    return max((r.get("step", 0) for r in read_metrics(out).steps), default=0)


def test_repeated_kill_9_then_resume_finishes(tmp_path):
    """The moments: after a step drawn at random (1..23 of 24, sorted) is logged, plus a random
    0-0.5 s (mid-step, mid-eval, mid-checkpoint); a target already passed kills right at start."""
    rng = random.Random(SEED)
    targets = sorted(rng.sample(range(1, 24), KILLS))
    out = tmp_path / "runs" / "crashy"
    kills = []
    for i, target in enumerate(targets):
        cmd = [sys.executable, "-m", "core", "train", *ARGS, "--out", str(out)] if i == 0 or not out.exists() \
            else [sys.executable, "-m", "core", "train", "--resume", str(out), "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            t0 = time.time()
            while _summary(out).get("pid") != proc.pid and proc.poll() is None and time.time() - t0 < 300:
                time.sleep(0.01)  # training (not start-up) has begun: summary says running with our pid
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            while _last_step(out) < target and proc.poll() is None and time.time() - t0 < 300:
                time.sleep(0.01)
            delay = rng.uniform(0.0, 0.5)
            time.sleep(delay)
            if proc.poll() is not None:  # finished before the kill: nothing left to crash
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        s = _summary(out)
        if s.get("status") == "finished":  # done between the last look and the kill (the process was
            break                           # exiting): nothing left to crash, as above
        kills.append((target, _last_step(out), s.get("epochs_done")))
        assert s["status"] == "running"
        check_parses(out)
        (run,) = list_runs([out.parent], include_default=False)
        assert run.status == "interrupted", (run.status, run.reason)
    assert len(kills) >= 2, kills  # the run was really killed mid-way, more than once

    if _summary(out).get("status") != "finished":  # the last start may have run to the end
        assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    s = _summary(out)
    assert s["status"] == "finished" and s["epochs_done"] == 3, s
    check_parses(out)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    log = read_metrics(out)
    assert not log.skipped
    assert [r["epoch"] for r in log.evals] == [1, 2, 3]
    steps = [r["step"] for r in log.steps]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # curves never double back
    (run,) = list_runs([out.parent], include_default=False)
    assert run.status == "finished" and not run.notes
    print("kills (target step, last logged step, epochs checkpointed):", kills)
