"""A class at once: 20 sessions of the home page and of Loss curves, and 20 "Start" presses.

AppTest sessions run in this one process, as Streamlit's sessions do in one server: the model
loader is st.cache_resource, so every session must get the identical model object (not a
copy each), and the process must not grow by anything like 20 models. Twenty concurrent
submissions to the launcher (the Train page's Start goes through Launcher.submit) must give
exactly one running training on the device and 19 queued. Time per page and RSS growth are
printed (run with -s) and reported in docs/reliability.md.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.engine.config import TrainConfig
from core.engine.launcher import Launcher
from core.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = 20


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crowd")
    for policy in ("none", "avg2+mask"):
        cfg = TrainConfig(model="resnet20", dataset="features10:train=32,val=16", policy=policy, epochs=1, steps=2,
                          batch_size=16, eval_batch_size=16, log_every=1, fidelity_every=1, num_threads=1,
                          device="cpu", progress=False, out=str(root / f"tiny-{policy.replace('+', '_')}"))
        assert train(cfg).status == "finished"
    return root


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


@pytest.mark.parametrize("page", ["app.py", "pages/2_Loss_curves.py"])
def test_twenty_sessions_share_one_model(runs_dir, monkeypatch, page):
    from core.engine.runs.listing import run_mtime_key
    from ui import common as ui

    monkeypatch.setenv("POOLPROP_RUN_DIRS", str(runs_dir))
    monkeypatch.setenv("POOLPROP_RUNS_ROOT", str(runs_dir))
    times, rss = [], []
    for _ in range(SESSIONS):
        at = AppTest.from_file(str(ROOT / page), default_timeout=300)
        t0 = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t0)
        assert not at.exception, [e.message for e in at.exception]
        rss.append(_rss_mib())
    path = runs_dir / "tiny-none"
    m1 = ui._model_cached(str(path), run_mtime_key(path))
    m2 = ui._model_cached(str(path), run_mtime_key(path))
    assert m1 is m2  # one shared object, whichever session asks
    model_mib = sum(t.numel() * t.element_size() for t in m1.state_dict().values()) / 2**20
    growth = rss[-1] - rss[0]  # sessions 2..20, after the first loaded everything
    print(f"\n{page}: first {times[0]:.2f}s, then mean {sum(times[1:]) / (SESSIONS - 1):.2f}s "
          f"max {max(times[1:]):.2f}s per session; RSS {rss[0]:.0f} -> {rss[-1]:.0f} MiB "
          f"(+{growth:.1f}); one model {model_mib:.2f} MiB")
    assert growth < 0.5 * SESSIONS * model_mib + 64, (growth, model_mib)


def test_twenty_starts_give_one_running_and_the_rest_queued(tmp_path, monkeypatch):
    procs = []

    def spawn(self, job, device):  # a stand-in for the training process: sleeps, trains nothing
        p = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(60)  # {job.id}"], start_new_session=True)
        procs.append(p)
        job.pid, job.state, job.started = p.pid, "running", time.time()

    monkeypatch.setattr(Launcher, "_spawn", spawn)
    root = tmp_path / "runs"
    root.mkdir()
    errors = []

    def press(i):
        try:
            Launcher(root).submit(TrainConfig(model="resnet20", dataset="features10", epochs=1, device="cpu",
                                              out=str(root / f"run-{i}")))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    try:
        threads = [threading.Thread(target=press, args=(i,)) for i in range(SESSIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        jobs = Launcher(root).jobs()
        assert len(jobs) == SESSIONS
        assert sum(j.state == "running" for j in jobs) == 1 and len(procs) == 1
        assert sum(j.state == "queued" for j in jobs) == SESSIONS - 1
    finally:
        for p in procs:
            p.kill()
            p.wait()
