"""The reproduction table (core/reproduction.py) and the script that trains the shipped set."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.analysis import reproduction
from core.method.convert import compress_model
from core.method.meter import saved_activation_bytes
from core.models.resnet import build_model

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_shipped", ROOT / "scripts" / "train_shipped.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _second_seed(src: Path, dest: Path, acc: float) -> None:
    """A copy of a run posing as seed 1 with another final accuracy."""
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["seed"] = 1
    (dest / "config.json").write_text(json.dumps(cfg))
    summary = json.loads((dest / "summary.json").read_text())
    summary["last_val_acc"] = acc
    (dest / "summary.json").write_text(json.dumps(summary))


def test_groups_pool_seeds_and_skip_unfinished(tiny_runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(tiny_runs, root)
    base = json.loads((root / "tiny-none" / "summary.json").read_text())["last_val_acc"]
    _second_seed(root / "tiny-none", root / "tiny-none-s1", base + 0.1)
    stopped = root / "tiny-stopped"
    shutil.copytree(root / "tiny-avg2_mask", stopped)
    s = json.loads((stopped / "summary.json").read_text())
    s["status"] = "stopped"
    (stopped / "summary.json").write_text(json.dumps(s))

    rows = reproduction.group_runs(reproduction.runs_in([root]))
    assert [r["policy"] for r in rows] == ["none", "avg2+mask"]  # baseline first; the stopped run ignored
    none, pooled = rows
    assert sorted(none["seeds"]) == [0, 1] and len(pooled["accs"]) == 1
    assert none["acc_mean"] == pytest.approx(base + 0.05)
    assert none["acc_spread"] == pytest.approx(0.05)  # half the range
    assert pooled["acc_spread"] is None
    assert none["data"] == "features10" and none["epochs"] == 2
    assert none["devices"] == ["CPU, float32"] * 2
    # the filter statistic is the first conv's, read from the saved weights
    from safetensors.torch import load_file

    from core.analysis.filters import high_frequency_share

    conv1 = load_file(str(root / "tiny-avg2_mask" / "model.safetensors"))["conv1.weight"]
    assert pooled["hf_share"] == pytest.approx(high_frequency_share(conv1))


def test_a_run_trained_on_for_more_epochs_is_left_out(tiny_runs, tmp_path):
    """Its schedule was stretched by the resume (the learning rate rose again): it is a run of
    neither length, so it joins no group; one resumed with the same schedule still counts."""
    root = tmp_path / "runs"
    shutil.copytree(tiny_runs / "tiny-none", root / "straight")
    for name, was in (("stretched", {"epochs": 1, "total_steps": 4}), ("resumed", {"threads": 2})):
        shutil.copytree(tiny_runs / "tiny-none", root / name)
        cfg = json.loads((root / name / "config.json").read_text())
        cfg["resumes"] = [{"at": "2026-12-07T00:00:00", "step": 4, "epoch": 1, "was": was}]
        cfg["seed"] = 7 if name == "stretched" else 8
        (root / name / "config.json").write_text(json.dumps(cfg))
    [row] = reproduction.group_runs(reproduction.runs_in([root]))
    assert sorted(row["seeds"]) == [0, 8]


def test_a_run_found_in_two_folders_counts_once(tiny_runs, tmp_path):
    """checkpoints/ and runs/shipped/ both hold a collected run: one seed, not two."""
    shutil.copytree(tiny_runs, tmp_path / "shipped")
    shutil.copytree(tiny_runs / "tiny-none", tmp_path / "collected" / "tiny-none")
    rows = reproduction.group_runs(reproduction.runs_in([tmp_path / "shipped", tmp_path / "collected"]))
    assert [(r["policy"], r["seeds"]) for r in rows] == [("none", [0]), ("avg2+mask", [0])]


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("dataset, classes, family", [
    ("features10", None, "features10"), ("features10:n=200", None, "features10"), ("cifar10", None, "CIFAR-10"),
    ("imagefolder:.data/cifar10-jpeg/train", CIFAR_CLASSES, "CIFAR-10"),
    ("imagefolder:/tmp/cifar/train", CIFAR_CLASSES, "CIFAR-10"),  # unpacked elsewhere: same data
    ("imagefolder:/data/flowers/train", ["daisy", "rose"], "/data/flowers/train"),
    ("imagefolder:/data/cifar10-subset", CIFAR_CLASSES[:5], "/data/cifar10-subset"),  # not the ten classes
])
def test_data_column_pools_cifar_copies_and_names_other_folders_by_path(dataset, classes, family):
    assert reproduction.data_family(dataset, classes) == family


def test_memory_columns_match_a_direct_measurement_and_skip_what_does_not_fit():
    rows = [{"policy": p} for p in ("none", "avg2+mask", "avg8+mask")]
    reproduction.add_memory(rows, batch=4, models=("resnet20", "resnet18"))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    direct = {}
    for p in ("none", "avg2+mask"):
        torch.manual_seed(0)
        direct[p] = saved_activation_bytes(compress_model(build_model("resnet20"), p), x, y).total_bytes
    none, avg2, avg8 = rows
    assert none["resnet20_saved_bytes"] == direct["none"] and none["resnet20_cut"] == 0
    assert avg2["resnet20_saved_bytes"] == direct["avg2+mask"]
    assert avg2["resnet20_cut"] == pytest.approx(1 - direct["avg2+mask"] / direct["none"])
    assert avg8["resnet20_saved_bytes"] is not None  # ResNet-20's last stage is 8x8: fits
    assert avg8["resnet18_saved_bytes"] is None and avg8["resnet18_cut"] is None  # 4x4: does not
    table = reproduction.format_markdown([dict(r, data="d", model="m", epochs=1, accs=[0.5], acc_mean=0.5,
                                               acc_spread=None, hf_share=0.5, devices=["CPU, float32"])
                                          for r in rows])
    assert len(table.splitlines()) == 2 + 3 and "—" in table.splitlines()[-1]


def test_markdown_row_names_devices_alike_in_any_run_order():
    """Seeds trained on different devices: the row must not depend on which run was listed first."""
    row = dict(data="d", model="m", policy="none", epochs=1, accs=[0.5, 0.5], acc_mean=0.5, acc_spread=0.0,
               hf_share=0.5)
    one = reproduction.format_markdown([dict(row, devices=["NVIDIA H200, bfloat16", "CPU, float32"])])
    other = reproduction.format_markdown([dict(row, devices=["CPU, float32", "NVIDIA H200, bfloat16"])])
    assert one == other
    assert one.splitlines()[-1].endswith("| CPU, float32; NVIDIA H200, bfloat16 |")


def test_cli_refuses_an_empty_folder(tmp_path):
    out = subprocess.run([sys.executable, "-m", "core", "reproduction", "--runs", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "no finished runs" in out.stderr
    out = subprocess.run([sys.executable, "-m", "core", "reproduction", "--runs", str(tmp_path / "nope")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "no such run" in out.stderr


def test_shipped_plan_follows_the_issue_order():
    names = [name for name, _, _ in _load_script().plan(20, 30, 4)]
    assert names[:3] == ["r20-cifar-none-e20-s0", "r20-cifar-avg2+mask-e20-s0", "r20-cifar-avg4+mask-e20-s0"]
    assert "r20-cifar-avg2+mask-e30-s0" in names and "r20-cifar-none-e20-s1" in names
    assert len(names) == len(set(names))


def _dry_run(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "scripts/train_shipped.py", "--dry-run", *args],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines()]


def test_shipped_script_dry_run_lists_what_it_would_train():
    # the longer recipe of scripts/gpu_session.sh: its six runs and nothing else (no features10, no seeds)
    only = ["cifar-none-e60-s0", "cifar-avg2+mask-e60-s0", "cifar-avg4+mask-e60-s0",
            "cifar-none-e90-s0", "cifar-avg2+mask-e90-s0", "cifar-avg4+mask-e90-s0"]
    assert _dry_run("--cifar", "X", "--epochs", "60", "--long-epochs", "90", "--only", *only) == [
        "r20-cifar-none-e60-s0", "r20-cifar-avg2+mask-e60-s0", "r20-cifar-avg4+mask-e60-s0",
        "r20-cifar-avg2+mask-e90-s0", "r20-cifar-avg4+mask-e90-s0", "r20-cifar-none-e90-s0"]
    # --missing-only leaves out exactly the runs checkpoints/ holds finished; without --cifar, features10 only
    everything = _dry_run("--cifar", "X")
    shipped = {p.parent.name for p in (ROOT / "checkpoints").glob("*/summary.json")
               if json.loads(p.read_text()).get("status") == "finished"}
    assert _dry_run("--cifar", "X", "--missing-only") == [n for n in everything if n not in shipped]
    assert _dry_run() == [n for n in everything if "features10" in n]


def test_shipped_script_carries_on_after_an_interruption(tmp_path, tiny_runs):
    script = _load_script()
    where = script.where_to_write
    finished = tmp_path / "done"
    shutil.copytree(tiny_runs / "tiny-none", finished)
    assert where(finished) == "finished"
    resumable = tmp_path / "cut"
    shutil.copytree(tiny_runs / "tiny-none", resumable)
    s = json.loads((resumable / "summary.json").read_text())
    s["status"] = "stopped"
    (resumable / "summary.json").write_text(json.dumps(s))
    assert where(resumable) == ("resume", str(resumable))
    epochs_done = json.loads((resumable / "resume.json").read_text())["epoch"]
    epochs = json.loads((resumable / "config.json").read_text())["epochs"]
    assert script.progress(resumable) == f"resumes after epoch {epochs_done} of {epochs}"
    assert script.progress(finished) == "finished there: skipped"
    (resumable / "resume.json").write_text("{not json")
    assert script.progress(resumable).startswith("resumes (its epoch count is unreadable")
    assert script.is_finished(finished) and not script.is_finished(resumable)  # what --missing-only skips
    early = tmp_path / "early"  # killed before its first epoch ended: nothing to resume from
    early.mkdir()
    (early / "config.json").write_text("{}")
    assert script.progress(early) == "starts afresh" and early.exists()  # --dry-run deletes nothing
    assert where(early) == ("out", str(early)) and not early.exists()


def test_collect_ships_finished_runs_without_resume_state_and_keeps_shipped_ones(tmp_path, tiny_runs):
    src, dest = tmp_path / "runs", tmp_path / "checkpoints"
    shutil.copytree(tiny_runs / "tiny-none", src / "new")
    shutil.copytree(tiny_runs / "tiny-avg2_mask", src / "cut")
    s = json.loads((src / "cut" / "summary.json").read_text())
    s["status"] = "stopped"
    (src / "cut" / "summary.json").write_text(json.dumps(s))
    shutil.copytree(tiny_runs / "tiny-none", src / "old")
    (dest / "old").mkdir(parents=True)
    (dest / "old" / "summary.json").write_text('{"amended": true}')
    (src / "new" / "resume.json").write_text("{}")

    assert _load_script().collect(src, dest) == 0
    assert sorted(f.name for f in (dest / "new").iterdir()) == [
        "config.json", "metrics.jsonl", "model.safetensors", "summary.json"]
    assert (dest / "new" / "model.safetensors").read_bytes() == (src / "new" / "model.safetensors").read_bytes()
    assert not (dest / "cut").exists()
    assert json.loads((dest / "old" / "summary.json").read_text()) == {"amended": True}


def test_collect_stores_paths_inside_the_repository_relative_to_it(tmp_path, tiny_runs):
    """A run trained with absolute paths (data and run folder inside the repository) ships with
    them relative, as the other shipped runs of its recipe have them; paths outside stay."""
    root = tmp_path / "repo"
    src, dest = root / "runs" / "shipped", root / "checkpoints"
    shutil.copytree(tiny_runs / "tiny-none", src / "abs")
    for f in ("config.json", "summary.json"):
        d = json.loads((src / "abs" / f).read_text())
        d.update(dataset=f"imagefolder:{root}/.data/cifar10-jpeg/train", out=str(src / "abs"),
                 data_dir="/elsewhere/data")
        (src / "abs" / f).write_text(json.dumps(d))
    assert _load_script().collect(src, dest, root=root) == 0
    for f in ("config.json", "summary.json"):
        d = json.loads((dest / "abs" / f).read_text())
        assert d["dataset"] == "imagefolder:.data/cifar10-jpeg/train"
        assert d["out"] == "runs/shipped/abs" and d["data_dir"] == "/elsewhere/data"
    assert not list(dest.glob(".*"))  # no partial folder left behind
