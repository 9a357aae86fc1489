"""The trainer and its run directory: files and keys, resume (bitwise), kill -9, OOM, SIGTERM, bad input.

Tiny on purpose: ResNet-20 on a few hundred features10 images, batch 32, a handful of steps.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.cli import main
from core.engine.config import TrainConfig
from core.engine.environment import training_subprocess_env
from core.engine.runs.listing import list_runs
from core.engine.runs.reader import load_config, load_model, read_metrics
from core.engine.runs.writer import dataset_short
from core.engine.schedule import LRSchedule
from core.engine.trainer import Trainer, resume, train
from core.method.convert import compress_model, decompress_model
from core.method.gradients import layer_fidelity as layer_gradient_fidelity
from core.method.meter import saved_activation_bytes
from core.models.resnet import build_model

ROOT = Path(__file__).resolve().parents[1]
DS = "features10:train=96,val=32"  # 6 steps of 16 per epoch
TINY = ["--model", "resnet20", "--dataset", DS, "--batch-size", "16", "--eval-batch-size", "32",
        "--num-threads", "1", "--no-progress"]


def tiny_config(out, **kw) -> TrainConfig:
    base = dict(model="resnet20", dataset=DS, policy="avg2+mask", epochs=1, batch_size=16, eval_batch_size=32,
                log_every=2, fidelity_every=3, out=str(out), progress=False, num_threads=1)
    base.update(kw)
    return TrainConfig(**base)


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def summary(run_dir) -> dict:
    return json.loads(Path(run_dir, "summary.json").read_text())


BLOCK_OPTIONAL = (
    "import sys\n"
    "for name in ('tqdm', 'streamlit', 'captum', 'plotly'):\n"
    "    sys.modules[name] = None  # import raises ModuleNotFoundError, find_spec gives None\n"
)


def _env():
    env = training_subprocess_env()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for(pred, timeout=120.0, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(0.02)
    return False


def _resume_epoch(run_dir) -> int:
    try:
        return json.loads(Path(run_dir, "resume.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


# ---------------------------------------------------------------------------------------

def test_smoke_run_writes_every_file_with_documented_keys(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *TINY, "--policy", "avg2+mask", "--epochs", "1", "--steps", "6", "--log-every", "2",
                 "--fidelity-every", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for f in ("config.json", "metrics.jsonl", "model.safetensors", "resume.safetensors", "resume.json",
              "summary.json"):
        assert (out / f).is_file(), f
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*tmp"))

    cfg = json.loads((out / "config.json").read_text())
    tc = TrainConfig.from_dict(cfg)
    assert tc.to_dict() == {k: cfg[k] for k in tc.to_dict()}  # round trip
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    assert cfg["policy"] == "avg2+mask" and cfg["policy_dict"]["name"] == "avg2+mask"
    assert cfg["lr"] == pytest.approx(0.1 * 16 / 128) and cfg["weight_decay"] == 5e-4
    assert len(cfg["classes"]) == 10 and cfg["num_params"] > 0 and cfg["num_classes"] == 10
    assert {"torch", "python", "poolprop"} <= set(cfg["versions"])
    assert cfg["memory"]["saved_activation_bytes"] > 0 and "status" not in cfg
    assert "hostname" not in json.dumps(cfg).lower()

    recs = records(out)
    steps = [r for r in recs if r["type"] == "step"]
    evals = [r for r in recs if r["type"] == "eval"]
    fid = [r for r in recs if r["type"] == "fidelity"]
    assert [r["step"] for r in steps] == [1, 2, 4, 6]
    assert {"step", "epoch", "loss", "acc", "lr", "step_time", "samples_per_s", "wall"} <= set(steps[0])
    assert steps[0]["saved_bytes"] == cfg["memory"]["saved_activation_bytes"]
    assert "saved_bytes" not in steps[1]
    assert len(evals) == 1
    assert {"epoch", "step", "val_loss", "val_acc", "train_loss", "train_acc", "wall", "per_class_acc"} <= set(evals[0])
    assert len(evals[0]["per_class_acc"]) == 10
    assert [r["step"] for r in fid] == [3, 6]
    layer = fid[0]["layers"][0]
    assert set(layer) == {"name", "cosine", "rel_error"} and layer["name"] == "conv1"
    assert len(fid[0]["layers"]) == 19  # every conv of ResNet-20 (option-A shortcuts: no 1x1 convs)
    assert all(-1 <= d["cosine"] <= 1 and d["rel_error"] >= 0 for d in fid[0]["layers"])

    s = summary(out)
    assert s["status"] == "finished" and "pid" not in s
    assert s["epochs_done"] == 1 and s["steps"] == 6
    assert s["last_val_acc"] == evals[0]["val_acc"] == s["best_val_acc"]
    assert s["saved_activation_bytes"] == cfg["memory"]["saved_activation_bytes"]
    assert s["model_state_bytes"] > 0 and s["wall_s"] > 0 and s["mean_step_s"] > 0
    assert len(s["per_class_val_acc"]) == 10

    # the weights load into the plain model and into the compressed one (keys unchanged)
    state = load_file(str(out / "model.safetensors"))
    plain = build_model("resnet20")
    plain.load_state_dict(state)
    comp = compress_model(build_model("resnet20"), "avg2+mask")
    comp.load_state_dict(state)
    assert torch.equal(load_model(out).conv1.weight, state["conv1.weight"])


def test_saved_bytes_are_float32_so_runs_compare_and_the_autocast_figure_is_kept_beside(tmp_path, capsys):
    """A bf16 run (CPU autocast here, CUDA's on a GPU) reports the same comparable figure as a
    float32 run, measured directly, and what it really kept under autocast separately."""
    figures = {}
    for amp in ("--no-amp", "--amp"):
        out = tmp_path / amp
        code = main(["train", *TINY, "--policy", "avg2+mask", "--epochs", "1", "--steps", "1", amp,
                     "--amp-dtype", "bf16", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        figures[amp] = (json.loads((out / "config.json").read_text())["memory"], summary(out))
    cfg = json.loads((tmp_path / "--amp" / "config.json").read_text())
    batch = cfg["memory"]["measured_batch"]
    torch.manual_seed(0)
    direct = saved_activation_bytes(compress_model(build_model("resnet20"), "avg2+mask"),
                                    torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))).total_bytes
    (mem32, s32), (mem16, s16) = figures["--no-amp"], figures["--amp"]
    assert mem32["saved_activation_bytes"] == mem16["saved_activation_bytes"] == direct
    assert s32["saved_activation_bytes"] == s16["saved_activation_bytes"] == direct
    assert mem32["saved_activation_bytes_amp"] is None and s32["saved_activation_bytes_amp"] is None
    assert 0 < mem16["saved_activation_bytes_amp"] == s16["saved_activation_bytes_amp"] < direct


def test_resume_after_stop_is_bitwise_equal_to_a_straight_run(tmp_path):
    kw = dict(epochs=2, deterministic=True, fidelity_every=4, policy="avg2+mask")
    straight = train(tiny_config(tmp_path / "a", **kw))
    assert straight.status == "finished"

    def stop_after_first_epoch(trainer, rec):
        if rec["epoch"] == 1:
            trainer.request_stop("test")

    first = train(tiny_config(tmp_path / "b", **kw), callbacks={"on_epoch": [stop_after_first_epoch]})
    assert first.status == "stopped" and first.summary["epochs_done"] == 1
    assert json.loads((tmp_path / "b" / "resume.json").read_text())["epoch"] == 1
    second = resume(tmp_path / "b")
    assert second.status == "finished" and second.summary["epochs_done"] == 2

    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    ea = [r for r in records(tmp_path / "a") if r["type"] == "eval"]
    eb = [r for r in records(tmp_path / "b") if r["type"] == "eval"]
    assert [r["val_loss"] for r in ea] == [r["val_loss"] for r in eb]
    assert [r["type"] for r in records(tmp_path / "b")].count("resume") == 1
    # step records are not duplicated by the resume
    steps_b = [r["step"] for r in records(tmp_path / "b") if r["type"] == "step"]
    assert steps_b == sorted(set(steps_b))


def test_a_run_resumed_for_more_epochs_says_so_in_its_config(tmp_path):
    """config.json is what the app and the reproduction table group runs by: a run trained on to
    2 epochs must not still read as a 1-epoch run."""
    run = tmp_path / "run"
    assert train(tiny_config(run, fidelity_every=0)).status == "finished"
    before = json.loads((run / "config.json").read_text())
    assert resume(run, overrides={"epochs": 2}).summary["epochs_done"] == 2
    after = json.loads((run / "config.json").read_text())
    assert (before["epochs"], after["epochs"]) == (1, 2)
    assert after["total_steps"] == 2 * before["total_steps"] == 2 * before["steps_per_epoch"]
    assert after["resumes"][0]["was"] == {"epochs": 1, "total_steps": before["total_steps"]}
    assert after["created"] == before["created"] and after["policy"] == before["policy"]
    assert TrainConfig.from_dict(load_config(run)).epochs == 2  # read back as any run's


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """Two real training processes, started together so that their (slow) start-ups overlap:
    'kill' (policy none, to be killed with SIGKILL) and 'term' (policy mask, to get SIGTERM, run
    with the optional packages unimportable, as on the GPU machine)."""
    base = tmp_path_factory.mktemp("bg")
    kill_out, term_out = base / "kill" / "run", base / "term" / "run"
    kill_cmd = [sys.executable, "-m", "core", "train", *TINY, "--policy", "none", "--epochs", "5",
                "--fidelity-every", "1", "--log-every", "3", "--out", str(kill_out)]
    argv = ["train", *[a for a in TINY if a != "--no-progress"], "--policy", "mask", "--epochs", "30",
            "--log-every", "1", "--out", str(term_out)]
    term_cmd = [sys.executable, "-c", BLOCK_OPTIONAL + f"from core.__main__ import main\nsys.exit(main({argv!r}))\n"]
    procs = {
        "kill": (subprocess.Popen(kill_cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True), kill_out),
        "term": (subprocess.Popen(term_cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True), term_out),
    }
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_kill_9_mid_run_then_resume_finishes(background):
    proc, out = background["kill"]
    assert _wait_for(lambda: _resume_epoch(out) >= 1, proc=proc), proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    s = summary(out)
    assert s["status"] == "running" and s["epochs_done"] < 5, "process ended before it could be killed"
    (run,) = list_runs([out.parent], include_default=False)
    assert run.status == "interrupted"

    assert main(["train", "--resume", str(out), "--no-progress"]) == 0  # the CLI, in this process
    s = summary(out)
    assert s["status"] == "finished" and s["epochs_done"] == 5
    log = read_metrics(out)
    assert not log.fidelity  # exact policy: no fidelity records
    assert [r["epoch"] for r in log.evals] == list(range(1, 6))


def test_sigterm_stops_cleanly_and_keeps_the_checkpoint(background):
    proc, out = background["term"]
    try:
        assert _wait_for(lambda: _resume_epoch(out) >= 1, proc=proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    s = summary(out)
    assert s["status"] == "stopped" and s["stop_reason"] == "SIGTERM" and s["epochs_done"] < 30
    assert "Traceback" not in stderr and "train step" in stderr  # the plain-text progress lines
    model = load_model(out)  # the latest weights, loadable
    assert model.fc.weight.shape == (10, 64)
    assert _resume_epoch(out) >= 1 and (out / "resume.safetensors").is_file()
    (run,) = list_runs([out.parent], include_default=False)
    assert run.status == "stopped"


def test_simulated_cuda_oom_fails_cleanly(tmp_path, monkeypatch, capsys):
    def boom(self, x, y):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 8 GiB total)")

    monkeypatch.setattr(Trainer, "train_step", boom)
    out = tmp_path / "run"
    code = main(["train", *TINY, "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not any("Traceback" in line for line in err)
    s = summary(out)
    assert s["status"] == "failed" and "out of memory" in s["error"] and s["error_type"] == "OutOfMemoryError"
    assert (out / "config.json").is_file() and not (out / "model.safetensors").exists()

    def boom2(self, x, y):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes. out of memory")

    monkeypatch.setattr(Trainer, "train_step", boom2)
    out2 = tmp_path / "run2"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out2)]) == 1
    assert summary(out2)["status"] == "failed"
    capsys.readouterr()

    # out of memory in the dry run of the first batch, before anything is written
    def dry_boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 128.00 MiB.")

    monkeypatch.setattr("core.engine.trainer.saved_activation_bytes", dry_boom)
    out3 = tmp_path / "run3"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out3)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: CUDA out of memory") and "\n" not in err
    assert not out3.exists()


# ---------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written

@pytest.mark.parametrize("args, message", [
    (["--dataset", "nosuchset"], "unknown dataset"),
    (["--model", "resnet7"], "unknown model"),
    (["--policy", "avg3+mask"], "K=3"),
    (["--policy", "avg2+wobble"], "unknown policy part"),
    (["--dataset", "imagefolder:/nonexistent/folder"], "does not exist"),
    (["--dataset", "EMPTY"], "no class folders"),
    (["--model", "resnet18", "--stem", "imagenet", "--policy", "avg8"], "larger than"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [f"imagefolder:{empty}" if a == "EMPTY" else a for a in args]
    out = tmp_path / "run"
    base = ["train", "--dataset", DS, "--epochs", "1", "--steps", "1", "--batch-size", "8", "--no-progress",
            "--out", str(out)]
    code = main(base + args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "\n" not in err and message in err, err
    assert not out.exists()


def test_cli_refuses_to_overwrite_a_run_and_checks_resume_config(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"model": "resnet20"}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["train", *TINY, "--epochs", "1", "--steps", "1", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # a finished tiny run: resuming it with another policy is refused; with no more epochs too
    run = tmp_path / "done"
    assert main(["train", *TINY, "--epochs", "1", "--steps", "2", "--out", str(run)]) == 0
    snapshot = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--policy", "avg4"]) == 2
    assert "--policy avg4" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "already completed" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert {p.name: p.read_bytes() for p in run.iterdir()} == snapshot


# ---------------------------------------------------------------------------------------
# Pieces

def test_layer_gradient_fidelity_is_side_effect_free_and_exact_for_k1():
    torch.manual_seed(0)
    model = compress_model(build_model("resnet20"), "avg2+mask")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = layer_gradient_fidelity(model, "avg2+mask", x, y)
    assert len(layers) == 19 and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert type(model.conv1).__name__ == "CompressedConv2d"  # compression restored
    # the same figures as the analysis library's own comparison (core.analysis.fidelity, another code path)
    from core.analysis.fidelity import compare_gradients

    ref = compare_gradients(decompress_model(copy.deepcopy(model)), x, y, ["avg2+mask"])
    by_name = dict(zip(ref.layers, ref.metrics["avg2+mask"]["cosine"]))
    for d in layers:
        assert d["cosine"] == pytest.approx(by_name[d["name"]], abs=1e-5), d["name"]
    # K=1 pools nothing: the weight gradients are the exact ones, bit for bit
    exact = layer_gradient_fidelity(model, "avg1+mask", x, y)
    assert all(d["cosine"] == 1.0 and d["rel_error"] == 0.0 for d in exact)


def test_schedules_and_names():
    s = LRSchedule("onecycle", 0.1, 100, 0.25)
    assert s.lr_at(0) == pytest.approx(0.004) and s.lr_at(0.25) == pytest.approx(0.1)
    assert s.lr_at(1.0) == pytest.approx(1e-5)
    c = LRSchedule("cosine", 0.1, 100, 0.05)
    assert c.lr_at(0) == 0 and c.lr_at(0.05) == pytest.approx(0.1) and c.lr_at(1) == pytest.approx(0)
    assert dataset_short("imagefolder:/work/main/.data/cifar10-jpeg/train") == "cifar10-jpeg-train"
    cfg = TrainConfig(policy="avg2+mask+stages=1,2", optimizer="adamw", batch_size=256).resolved()
    assert cfg.lr == pytest.approx(4e-3) and cfg.weight_decay == 0.05
    from core.engine.runs.writer import default_run_dir

    name = default_run_dir(cfg).name
    assert name.startswith("resnet20-features10-avg2_mask_stages-1-2-s0-")
    assert TrainConfig.from_dict(cfg.to_dict()).resolved() == cfg
    env = training_subprocess_env({})
    assert env["MALLOC_MMAP_THRESHOLD_"] and env["MALLOC_TRIM_THRESHOLD_"]


def test_trainer_speed_script_times_real_training_runs_against_the_baseline(tmp_path):
    """scripts/trainer_speed.py (the README's "in a training run" table): each policy really trains
    in its own process, and the table gives each a median step time and its ratio to none's."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "scripts/trainer_speed.py", "--policies", "avg2+mask", "--batch", "8",
                          "--steps", "16", "--rounds", "1"], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout.split("\n\n")[-1]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert set(rows) == {"none", "avg2+mask"}
    assert rows["none"][3] == "1.00x" and float(rows["avg2+mask"][1]) > 0  # ms/step measured, ratio to itself 1
    bad = subprocess.run([sys.executable, "scripts/trainer_speed.py", "--steps", "5"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--steps must exceed" in bad.stderr
