"""Runs as settings (core.analysis.run_groups): names, seeds grouped, families, filters, bands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.analysis import curves, run_groups
from core.engine.runs.reader import Run

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path, name, policy="none", epochs=20, seed=0, dataset="imagefolder:.data/cifar10-jpeg/train",
        device="cpu", created="2026-11-28T10:00:00", classes=None, acc=None, per_class=None) -> Run:
    cfg = {"model": "resnet20", "dataset": dataset, "policy": policy, "epochs": epochs, "seed": seed,
           "batch_size": 256, "lr": 0.2, "device_used": device, "created": created,
           "classes": classes or (["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                   "truck"] if "cifar" in dataset else ["a", "b"])}
    summary = {"last_val_acc": acc, "per_class_val_acc": per_class}
    return Run(path=tmp_path / name, name=name, status="finished", config=cfg, summary=summary)


def test_names_say_setting_epochs_seed_and_the_data_only_when_it_is_not_the_usual(tmp_path):
    runs = [run(tmp_path, "a", "avg2+mask", 20, 1), run(tmp_path, "b", "none", 100, 0),
            run(tmp_path, "c", "none", 4, 0, dataset="features10"), run(tmp_path, "d", "avg2+mask", 20, 0)]
    assert list(run_groups.run_names(runs).values()) == [
        "avg2+mask · 20 ep · s1", "none · 100 ep · s0", "none · features10 · 4 ep · s0", "avg2+mask · 20 ep · s0"]
    # one data set: never named
    assert run_groups.run_names(runs[:2])[str(tmp_path / "a")] == "avg2+mask · 20 ep · s1"
    # alike in everything: the start time tells them apart
    twins = [run(tmp_path, "x", created="2026-11-28T10:00:00"), run(tmp_path, "y", created="2026-11-28T11:30:00")]
    assert list(run_groups.run_names(twins).values()) == ["none · 20 ep · s0 · 10:00:00",
                                                          "none · 20 ep · s0 · 11:30:00"]


def test_the_shipped_runs_have_short_unique_names():
    from core.engine.runs import list_runs

    runs = list_runs([ROOT / "checkpoints"], include_default=False)
    names = run_groups.run_names(runs)
    assert len(set(names.values())) == len(runs)
    assert names[str(ROOT / "checkpoints" / "r20-cifar-none-e20-s1")] == "none · 20 ep · s1"
    assert all(len(n) <= 40 for n in names.values())


def test_seeds_of_one_setting_are_grouped_and_apart_on_request(tmp_path):
    runs = [run(tmp_path, "n0", "none", seed=0, device="cuda"), run(tmp_path, "n1", "none", seed=1),
            run(tmp_path, "a0", "avg2+mask"), run(tmp_path, "n30", "none", epochs=30)]
    names = run_groups.run_names(runs)
    settings = run_groups.group_settings(runs, names)
    assert [s.label for s in settings] == ["none · 20 ep (2 seeds)", "avg2+mask · 20 ep · s0", "none · 30 ep · s0"]
    assert settings[0].members == ["none · 20 ep · s0", "none · 20 ep · s1"]
    assert len(settings[0].devices) == 2  # a setting whose seeds trained on two devices says so
    apart = run_groups.group_settings(runs, names, apart=True)
    assert [s.label for s in apart] == list(names.values())


def test_families_and_filters(tmp_path):
    runs = [run(tmp_path, "n", "none"), run(tmp_path, "p", "avg2+mask"), run(tmp_path, "c", "ckpt", epochs=30),
            run(tmp_path, "q", "q4+mask+bn4"), run(tmp_path, "f", "none", 4, dataset="features10")]
    assert [run_groups.family(r.config["policy"]) for r in runs] == [
        "baseline", "pooling", "checkpointing", "quantisation", "baseline"]
    opts = run_groups.filter_options(runs)
    assert opts == {"data": ["CIFAR-10", "features10"], "epochs": [4, 20, 30],
                    "family": ["baseline", "pooling", "quantisation", "checkpointing"]}
    assert [r.name for r in run_groups.filter_runs(runs, data="CIFAR-10", epochs=20)] == ["n", "p", "q"]
    assert [r.name for r in run_groups.filter_runs(runs, families=["baseline"])] == ["n", "f"]


def _recs(accs, walls):
    return [{"type": "eval", "epoch": e + 1, "step": 10 * (e + 1), "val_acc": a, "wall": w}
            for e, (a, w) in enumerate(zip(accs, walls))]


def test_band_is_the_mean_and_range_of_the_seeds_at_common_steps():
    a, b = _recs([0.5, 0.6, 0.7], [10, 20, 30]), _recs([0.4, 0.8], [12, 26])
    x, mean, lo, hi = run_groups.band([a, b], "val_acc", "epoch")
    assert list(x) == [1, 2] and list(mean) == pytest.approx([0.45, 0.7])
    assert list(lo) == [0.4, 0.6] and list(hi) == [0.5, 0.8]
    x, *_ = run_groups.band([a, b], "val_acc", "wall")  # the mean time at which the seeds got there
    assert list(x) == [11, 23]
    assert all(len(v) == 0 for v in run_groups.band([[]], "val_acc"))


def test_settings_tables_take_the_mean_and_range_of_their_seeds(tmp_path):
    runs = [run(tmp_path, "n0", seed=0, per_class=[0.9, 0.5]), run(tmp_path, "n1", seed=1, per_class=[0.7, 0.6])]
    runs = [run(tmp_path, r.name, seed=r.config["seed"], per_class=r.summary["per_class_val_acc"],
                classes=["x", "y"]) for r in runs]
    (setting,) = run_groups.group_settings(runs, run_groups.run_names(runs))
    classes, mean, lo, hi = run_groups.per_class_of(setting)
    assert classes == ["x", "y"] and mean == pytest.approx([0.8, 0.55]) and lo == [0.7, 0.5] and hi == [0.9, 0.6]
    metrics = {"none · 20 ep · s0": _recs([0.5, 0.85], [10, 20]), "none · 20 ep · s1": _recs([0.82, 0.9], [9, 18])}
    (row,) = run_groups.epochs_to_accuracy_rows([setting], metrics, 0.8)
    assert row["epochs_to_0.8"] == 1.5 and row["epochs_to_0.8_min"] == 1 and row["epochs_to_0.8_max"] == 2
    (never,) = run_groups.epochs_to_accuracy_rows([setting], metrics, 0.88)
    assert never["epochs_to_0.88"] is None and never["reached"] == 1  # one seed of two got there
    assert row["wall_to_0.8"] == 14.5 and not row["wall_mixed"]  # one device: seconds averaged


def test_seconds_of_seeds_on_different_devices_are_not_averaged(tmp_path):
    """A setting whose seeds trained on an H200 and on a CPU has no mean time to an accuracy (the
    app showed 1690 s, the mean of 23 and 3358); its epochs still average."""
    runs = [run(tmp_path, "n0", seed=0, device="cuda"), run(tmp_path, "n1", seed=1)]
    (setting,) = run_groups.group_settings(runs, run_groups.run_names(runs))
    assert len(setting.devices) == 2, setting.devices
    metrics = {m: recs for m, recs in zip(setting.members, (_recs([0.5, 0.85], [10, 23]),
                                                            _recs([0.82, 0.9], [1700, 3358])))}
    (row,) = run_groups.epochs_to_accuracy_rows([setting], metrics, 0.8)
    assert row["wall_mixed"] and row["wall_to_0.8"] is None and row["wall_to_0.8_min"] is None
    assert row["epochs_to_0.8"] == 1.5
    assert np.isclose(curves.epochs_to_accuracy(metrics["none · 20 ep · s1"], 0.88)["epoch"], 2)
