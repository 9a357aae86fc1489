"""Finding, validating and loading runs; evaluating them; the atomic writers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from core.cli import main
from core.engine import atomic
from core.engine.config import TrainConfig
from core.engine.data.registry import load_dataset
from core.engine.evaluate import evaluate_run
from core.engine.runs.listing import inspect_run, list_runs, run_mtime_key
from core.engine.runs.reader import RunError, load_config, load_model, read_metrics, resolve_run
from core.engine.trainer import train
from core.models.resnet import build_model

DS = "features10:train=64,val=48"


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "good"
    cfg = TrainConfig(dataset=DS, policy="avg2+mask", epochs=1, steps=2, batch_size=16, eval_batch_size=32,
                      log_every=1, fidelity_every=0, out=str(out), progress=False, num_threads=1)
    assert train(cfg).status == "finished"
    return out


def clone(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_list_runs_keeps_the_good_and_explains_the_broken(good_run, tmp_path):
    base = tmp_path / "runs"
    base.mkdir()
    clone(good_run, base / "a_good")

    trunc = clone(good_run, base / "truncated")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])

    bad_json = clone(good_run, base / "badjson")
    (bad_json / "config.json").write_text('{"model": "resnet20", ')

    unknown = clone(good_run, base / "unknown_model")
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model": "resnet7"}))

    pickled = clone(good_run, base / "pickled")
    torch.save(build_model("resnet20").state_dict(), pickled / "model.safetensors")

    wrong = clone(good_run, base / "wrong_shapes")
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "model": "resnet32"}))

    cut = clone(good_run, base / "cut_metrics")
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"type": "step", "step": 3, "lo')
    (cut / "legacy.pt").write_bytes(b"\x80\x04 not loaded")

    dead = clone(good_run, base / "dead")
    s = json.loads((dead / "summary.json").read_text())
    (dead / "summary.json").write_text(json.dumps({**s, "status": "running", "pid": 2**22 + 12345}))

    (base / "not_a_run").mkdir()  # no run files: ignored

    runs = {r.name: r for r in list_runs([base], include_default=False)}
    assert set(runs) == {"a_good", "truncated", "badjson", "unknown_model", "pickled", "wrong_shapes",
                         "cut_metrics", "dead"}
    assert runs["a_good"].status == "finished" and runs["a_good"].reason is None and not runs["a_good"].notes
    for name, words in [("truncated", "corrupt or truncated"), ("badjson", "not valid JSON"),
                        ("unknown_model", "unknown model 'resnet7'"), ("pickled", "refused"),
                        ("wrong_shapes", "does not fit")]:
        r = runs[name]
        assert r.status == "broken", name
        assert words in r.reason and "\n" not in r.reason, (name, r.reason)
    assert "model.safetensors" in runs["truncated"].reason and "config.json" in runs["badjson"].reason
    # a cut last metrics line is tolerated (reported), a .pt file is refused (reported)
    assert runs["cut_metrics"].status == "finished"
    assert any("cut mid-write" in n for n in runs["cut_metrics"].notes)
    assert any("legacy.pt" in n and "refused" in n for n in runs["cut_metrics"].notes)
    assert runs["dead"].status == "interrupted"

    log = read_metrics(cut)
    assert log.skipped and log.skipped[-1][1] == "last line cut mid-write"
    assert len(log) == len(read_metrics(good_run)) and log.steps and log.evals

    # the same problems from load_model, as RunError naming the file
    for name, words in [("truncated", "model.safetensors"), ("badjson", "config.json"),
                        ("unknown_model", "config.json"), ("pickled", "never loads pickle"),
                        ("wrong_shapes", "model.safetensors")]:
        with pytest.raises(RunError, match=words):
            load_model(base / name)
    os.remove(base / "a_good" / "model.safetensors")
    with pytest.raises(RunError, match="model.safetensors not found"):
        load_model(base / "a_good")
    assert inspect_run(base / "a_good").status == "broken"  # finished but its weights are gone


def test_runs_in_a_group_folder_are_listed_one_level_deep(good_run, tmp_path):
    """runs/shipped/<run> (where scripts/train_shipped.py writes) shows beside runs/<run>; the
    launcher's hidden runs/.launcher and anything deeper than one group folder do not."""
    base = tmp_path / "runs"
    clone(good_run, base / "direct")
    clone(good_run, base / "shipped" / "retrained")
    clone(good_run, base / ".launcher" / "hidden")
    clone(good_run, base / "sweep" / "deeper" / "too_deep")
    (base / "shipped" / "notes").mkdir()  # neither a run nor a group of runs
    listed = sorted(str(r.path.relative_to(base)) for r in list_runs([base], include_default=False))
    assert listed == ["direct", "shipped/retrained"]
    # a run folder given directly is that run alone, not the group around it
    assert [r.path for r in list_runs([base / "shipped" / "retrained"], include_default=False)] == [
        base / "shipped" / "retrained"]


def test_a_copy_of_a_run_is_listed_once_unless_it_trained_further(good_run, tmp_path):
    """`train_shipped.py --collect` copies runs/shipped/X to checkpoints/X: one run, listed once.
    A copy resumed for more epochs is a run of its own."""
    clone(good_run, tmp_path / "shipped" / "x")
    clone(good_run, tmp_path / "local" / "x")
    assert len(list_runs([tmp_path / "shipped", tmp_path / "local"], include_default=False)) == 1
    further = tmp_path / "local" / "x" / "summary.json"
    further.write_text(json.dumps({**json.loads(further.read_text()), "epochs_done": 2}))
    assert len(list_runs([tmp_path / "shipped", tmp_path / "local"], include_default=False)) == 2


def test_cli_runs_lists_with_status(good_run, tmp_path, capsys):
    base = tmp_path / "runs"
    clone(good_run, base / "one")
    clone(good_run, base / "two")
    (base / "two" / "config.json").write_text("nope")
    assert main(["runs", "--dir", str(base)]) == 0
    out = capsys.readouterr().out
    assert "one" in out and "finished" in out and "broken" in out and "not valid JSON" in out
    cfg = json.loads((base / "one" / "config.json").read_text())
    cfg["dataset"] = "imagefolder:/home/me/very/long/cifar10-jpeg/train"
    (base / "one" / "config.json").write_text(json.dumps(cfg))
    assert main(["runs", "--dir", str(base)]) == 0
    out = capsys.readouterr().out
    assert "cifar10-jpeg/train" in out and "/home/me" not in out  # a folder by its short name
    assert main(["runs", "--dir", str(base), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["status"] for r in listed} == {"one": "finished", "two": "broken"}


def test_cli_piped_into_a_reader_that_stops_ends_without_a_traceback(good_run):
    """`python -m core runs | head -1`: the reader is gone before the table is written."""
    proc = subprocess.Popen([sys.executable, "-m", "core", "runs", "--dir", str(good_run.parent)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_load_model_and_cache_key(good_run):
    run = inspect_run(good_run)
    model = load_model(run)
    state = load_file(str(good_run / "model.safetensors"))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.training
    comp = load_model(good_run, compressed=True)
    assert type(comp.conv1).__name__ == "CompressedConv2d"
    assert run_mtime_key(run) == (good_run / "model.safetensors").stat().st_mtime
    assert run_mtime_key(good_run / "nowhere") == 0.0
    assert load_config(good_run)["model"] == "resnet20"
    assert resolve_run(good_run) == good_run
    with pytest.raises(FileNotFoundError):
        resolve_run("no-such-run-anywhere")


def test_evaluate_matches_an_independent_computation(good_run, capsys):
    res = evaluate_run(good_run)
    # independently: the plain model, the weights, the val images normalised by hand
    cfg = json.loads((good_run / "config.json").read_text())
    data = load_dataset(DS)
    model = build_model("resnet20")
    model.load_state_dict(load_file(str(good_run / "model.safetensors")))
    model.eval()
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = (data.val_x.float() / 255 - mean) / std
    with torch.no_grad():
        out = model(x)
    pred = out.argmax(1)
    assert res["n"] == len(data.val_y) == 48
    assert res["correct"] == int((pred == data.val_y).sum())
    assert res["acc"] == res["correct"] / 48
    assert res["loss"] == pytest.approx(float(F.cross_entropy(out, data.val_y)), rel=1e-4)
    for k in range(10):
        m = data.val_y == k
        if m.any():
            assert res["per_class_acc"][k] == pytest.approx(float((pred[m] == k).float().mean()))
    # the run's own eval record saw the same weights and images
    last_eval = read_metrics(good_run).evals[-1]
    assert last_eval["val_acc"] == pytest.approx(res["acc"])

    assert main(["evaluate", "--run", str(good_run), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["correct"] == res["correct"]
    assert main(["evaluate", "--run", str(good_run), "--dataset", "nosuchset"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    with pytest.raises(ValueError, match="unknown split 'test'; choose one of val, train"):
        evaluate_run(good_run, split="test")


def test_evaluate_with_flip_tta_averages_the_mirror_images_probabilities(good_run, capsys):
    res = evaluate_run(good_run, tta="flip")
    cfg = json.loads((good_run / "config.json").read_text())
    data = load_dataset(DS)
    model = build_model("resnet20")
    model.load_state_dict(load_file(str(good_run / "model.safetensors")))
    model.eval()
    mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = (data.val_x.float() / 255 - mean) / std
    with torch.no_grad():  # independently: mirror the images in numpy, average plain probabilities
        p = (model(x).softmax(1) + model(torch.from_numpy(x.numpy()[..., ::-1].copy())).softmax(1)) / 2
    assert res["tta"] == "flip" and res["correct"] == int((p.argmax(1) == data.val_y).sum())
    assert res["loss"] == pytest.approx(float(-p[torch.arange(48), data.val_y].log().mean()), rel=1e-4)
    plain = evaluate_run(good_run)
    assert plain["tta"] == "none" and plain["loss"] != pytest.approx(res["loss"])
    assert main(["evaluate", "--run", str(good_run), "--tta", "flip", "--device", "cpu"]) == 0
    assert "with flip test-time augmentation" in capsys.readouterr().out
    with pytest.raises(ValueError, match="test-time augmentation"):
        evaluate_run(good_run, tta="rotate")


def test_atomic_writers(tmp_path):
    p = atomic.write_json(tmp_path / "a.json", {"x": float("nan"), "y": torch.tensor(2.5), "z": (1, 2)})
    assert json.loads(p.read_text()) == {"x": None, "y": 2.5, "z": [1, 2]}
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() gives, not mkstemp's private 0o600
    atomic.write_safetensors(tmp_path / "w.safetensors",
                             {"a": torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)},
                             metadata={"k": "v"})
    assert load_file(str(tmp_path / "w.safetensors"))["a"].shape == (2, 3, 4, 4)
    assert sorted(os.listdir(tmp_path)) == ["a.json", "w.safetensors"]  # no temp files left

    log = tmp_path / "m.jsonl"
    log.write_text('{"a": 1}\n{"b": ')  # a writer killed mid-line
    with atomic.JsonlAppender(log) as app:
        app.append({"c": 3})
    lines = log.read_text().splitlines()
    assert lines[-1] == '{"c": 3}' and lines[1] == '{"b": '
    # a crash in the middle of a write leaves the old file whole
    code = ("import os, sys\n"
            "from core.engine import atomic\n"
            "os.replace = lambda *a: os._exit(9)\n"
            f"atomic.write_json({str(tmp_path / 'a.json')!r}, {{'new': 1}})\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 9
    assert json.loads((tmp_path / "a.json").read_text())["x"] is None
