"""`python -m core report`: standalone offline HTML figures and CSV tables."""

import csv
import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from core.analysis.filters import high_frequency_share
from core.cli import main


def test_report_writes_offline_html_and_csv(tiny_runs, tmp_path, capsys):
    runs = sorted(str(p) for p in tiny_runs.iterdir() if p.is_dir())
    out = tmp_path / "report"
    assert main(["report", "--runs", *runs, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    html_files = sorted(p.name for p in out.glob("*.html"))
    assert {"index.html", "train_loss.html", "val_accuracy.html", "filters.html"} <= set(html_files)
    for name in html_files:
        text = (out / name).read_text()
        # offline: no script or stylesheet is fetched from anywhere
        assert not re.search(r"<(script|link)[^>]+(src|href)=[\"']https?://", text), name
    assert "Plotly.newPlot" in (out / "train_loss.html").read_text()
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert {r["policy"] for r in rows} == {"none", "avg2+mask"}
    for r in rows:  # each row is its own run's summary
        summary = json.loads((Path(r["path"]) / "summary.json").read_text())
        assert float(r["best_val_acc"]) == pytest.approx(summary["best_val_acc"])
        assert float(r["last_val_acc"]) == pytest.approx(summary["last_val_acc"])
    # the filter table: first-layer share recomputed from each run's saved weights
    hf = {(h["run"], h["layer"]): float(h["hf_share"]) for h in csv.DictReader(open(out / "high_frequency_share.csv"))}
    for r in rows:
        conv1 = load_file(str(Path(r["path"]) / "model.safetensors"))["conv1.weight"]
        assert hf[(r["run"], "conv1")] == pytest.approx(high_frequency_share(conv1))


def test_report_on_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", "--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_report_keeps_runs_whose_labels_would_coincide(tiny_runs, tmp_path):
    """Two runs alike in model, policy, data and seed (a 20- and a 30-epoch run, say) both appear."""
    import shutil

    first = sorted(p for p in tiny_runs.iterdir() if p.is_dir())[0]
    twin = shutil.copytree(first, tmp_path / "runs" / (first.name + "-again"))
    out = tmp_path / "report"
    assert main(["report", "--runs", str(first), str(twin), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert sorted(r["path"] for r in rows) == sorted([str(first), str(twin)])
    # told apart as the app's legends tell them apart: by the folder, once all else is alike
    assert len({r["run"] for r in rows}) == 2 and all(Path(r["path"]).name in r["run"] for r in rows)


def test_report_names_each_run_by_its_own_folder_when_one_is_given_twice(tiny_runs, tmp_path):
    import shutil

    first = sorted(p for p in tiny_runs.iterdir() if p.is_dir())[0]
    twin = shutil.copytree(first, tmp_path / "runs" / (first.name + "-again"))
    out = tmp_path / "report"
    assert main(["report", "--runs", str(first), str(first), str(twin), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert sorted(r["path"] for r in rows) == sorted([str(first), str(twin)])
    assert all(r["run"].endswith(f"({Path(r['path']).name})") for r in rows)
