"""Guards the shipped runs in checkpoints/: each loads, matches its config, and its summary
agrees with its own metrics; the folder stays small and holds nothing that needs pickle."""

from pathlib import Path

import pytest
import torch

from core.compression import CompressionPolicy
from core.runs import inspect_run, load_model, read_metrics

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
RUNS = sorted(p for p in CHECKPOINTS.iterdir() if p.is_dir()) if CHECKPOINTS.is_dir() else []


def test_there_are_shipped_runs_and_the_folder_is_small():
    assert RUNS, "checkpoints/ must ship at least one run"
    size = sum(f.stat().st_size for f in CHECKPOINTS.rglob("*") if f.is_file())
    assert size < 30e6


@pytest.mark.parametrize("path", RUNS, ids=[p.name for p in RUNS])
def test_shipped_run_loads_and_agrees_with_itself(path):
    run = inspect_run(path, is_shipped=True)
    assert run.ok and run.status == "finished", run.reason
    assert {f.name for f in path.iterdir()} == {"config.json", "metrics.jsonl", "model.safetensors", "summary.json"}
    cfg, summary = run.config, run.summary
    policy = CompressionPolicy.parse(cfg["policy"])
    assert str(policy) == cfg["policy"] == summary["policy"]
    model = load_model(path)
    assert sum(p.numel() for p in model.parameters()) == cfg["num_params"]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, cfg["image_size"], cfg["image_size"])).shape == (2, cfg["num_classes"])

    metrics = read_metrics(path)
    assert not metrics.skipped
    evals = metrics.evals
    assert [e["epoch"] for e in evals] == list(range(1, summary["epochs_done"] + 1))
    assert summary["epochs_done"] == cfg["epochs"] == summary["epochs"]
    assert summary["best_val_acc"] == max(e["val_acc"] for e in evals)
    assert summary["last_val_acc"] == evals[-1]["val_acc"]
    assert summary["steps"] == max(r["step"] for r in metrics.steps)
    if not policy.is_exact:  # compressed runs carry their gradient-fidelity records
        assert metrics.fidelity and all(0 < layer["cosine"] <= 1 + 1e-6 for layer in metrics.fidelity[-1]["layers"])
