"""core.engine.launcher: jobs as separate processes, one per device, queued on disk, stopped by SIGTERM.

The queue logic is tested with a stand-in process (`sleep`); one test trains for real: a
tiny run started, a second one queued behind it, the first stopped (status "stopped",
weights kept), the second started by the first one's process when it ended.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.engine.checks import check_config
from core.engine.config import TrainConfig
from core.engine.launcher import Job, Launcher, device_key
from core.engine.runs.reader import load_model

DS = "features10:train=64,val=32"


def _cfg(out, **kw) -> TrainConfig:
    base = dict(model="resnet20", dataset=DS, policy="avg2+mask", epochs=1, batch_size=32, eval_batch_size=64,
                log_every=1, fidelity_every=0, num_threads=1, device="cpu", out=str(out), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _wait(predicate, timeout: float, what: str, step: float = 0.25):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def fake_spawn(monkeypatch):
    """Jobs become `sleep 60` processes in their own session (no training)."""
    procs = []

    def spawn(self, job, device):
        p = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(60)  # {job.id}"],
                             start_new_session=True)
        procs.append(p)
        job.pid, job.state, job.started = p.pid, "running", time.time()

    monkeypatch.setattr(Launcher, "_spawn", spawn)
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_device_key():
    assert device_key("cpu") == "cpu"
    assert device_key("cuda") == "cuda:0"
    assert device_key("auto") == ("cuda:0" if torch.cuda.is_available() else
                                  "mps" if torch.backends.mps.is_available() else "cpu")


def test_check_config_reports_problems():
    assert check_config(_cfg("x")) == []
    problems = check_config(TrainConfig(model="resnet18", policy="avg8+mask"))
    assert problems and "K=8 is larger than the feature map" in problems[0]
    assert check_config(TrainConfig(model="resnet18", policy="avg8+mask+stages=1,2")) == []
    assert "batch_size" in check_config(TrainConfig(batch_size=0))[0]
    assert "stages are 1, 2, 3" in check_config(TrainConfig(model="resnet20", policy="avg2+mask+stages=4"))[0]
    assert "stages are 1, 2, 3" in check_config(TrainConfig(model="resnet20", dataset="imagefolder:/some/where",
                                                            policy="avg2+mask+stages=4"))[0]


def test_one_at_a_time_then_queue(tmp_path, fake_spawn):
    launcher = Launcher(tmp_path)
    a = launcher.submit(_cfg(tmp_path / "a"))
    b = launcher.submit(_cfg(tmp_path / "b"))
    c = launcher.submit(_cfg(tmp_path / "c"))
    assert a.state == "running" and b.state == "queued" and c.state == "queued"
    assert (b.position, c.position) == (1, 2)
    with pytest.raises(ValueError, match="already queued or running"):
        launcher.submit(_cfg(tmp_path / "a"))

    fresh = Launcher(tmp_path)  # state lives on disk
    jobs = {j.id: j for j in fresh.jobs("cpu")}
    assert jobs[a.id].state == "running" and jobs[b.id].position == 1
    assert fresh.active("cpu").id == a.id

    assert fresh.stop(c.id) == "cancelled"
    assert fresh.stop(a.id) == "stopping"
    # the stand-in dies of SIGTERM; the next reader marks it done and starts the next job
    _wait(lambda: Launcher(tmp_path).active("cpu") is not None and Launcher(tmp_path).active("cpu").id == b.id,
          20, "the queued job to start")
    jobs = {j.id: j for j in Launcher(tmp_path).jobs("cpu")}
    assert jobs[a.id].state == "done" and jobs[a.id].stop_requested
    assert jobs[c.id].state == "cancelled"
    assert Launcher(tmp_path).queued("cpu") == []


def test_dead_process_is_noticed(tmp_path, fake_spawn):
    launcher = Launcher(tmp_path)
    a = launcher.submit(_cfg(tmp_path / "a"))
    fake_spawn[0].kill()
    fake_spawn[0].wait()
    job = next(j for j in launcher.jobs("cpu") if j.id == a.id)
    assert job.state == "done" and job.error  # no summary.json: says it ended without one


def test_damaged_state_file(tmp_path):
    launcher = Launcher(tmp_path)
    launcher.state_dir.mkdir(parents=True)
    (launcher.state_dir / "cpu.json").write_text("{not json")
    assert launcher.jobs("cpu") == []
    # a job written by a later version (a field this one does not know) still reads
    job = Job.from_dict({"id": "x", "device": "cpu", "run_dir": "r", "config": {"epochs": 2}, "extra": 1})
    assert (job.id, job.device, job.run_dir, job.config, job.state) == ("x", "cpu", "r", {"epochs": 2}, "queued")
    assert not hasattr(job, "extra")


@pytest.mark.slow
def test_real_run_queue_and_stop(tmp_path):
    launcher = Launcher(tmp_path)
    long_run = launcher.submit(_cfg(tmp_path / "long", epochs=500, train_subset=None))
    short_run = launcher.submit(_cfg(tmp_path / "short", epochs=1, steps=2, policy="none"))
    assert long_run.state == "running"
    assert short_run.state == "queued" and short_run.position == 1

    def training():
        log = tmp_path / "long" / "metrics.jsonl"
        return log.exists() and '"type": "step"' in log.read_text()

    _wait(training, 180, "the first run to train a step")
    fresh = Launcher(tmp_path)
    assert fresh.active("cpu").id == long_run.id and [j.id for j in fresh.queued("cpu")] == [short_run.id]
    assert fresh.stop(long_run.id) == "stopping"
    _wait(lambda: long_run.run_status() == "stopped", 60, "status stopped")
    summary = json.loads((tmp_path / "long" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] >= 1
    model = load_model(tmp_path / "long")  # the checkpoint is kept and loads: its weights are the saved ones
    saved = load_file(str(tmp_path / "long" / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items() if k in saved)

    # the stopped run's own process started the queued one; it finishes by itself
    _wait(lambda: short_run.run_status() == "finished", 180, "the queued run to finish")
    _wait(lambda: all(not j.active for j in Launcher(tmp_path).jobs("cpu")), 30, "the queue to drain")
    jobs = {j.id: j for j in Launcher(tmp_path).jobs("cpu")}
    assert jobs[long_run.id].returncode == 130 and jobs[short_run.id].returncode == 0
    assert Path(jobs[short_run.id].log).exists()
