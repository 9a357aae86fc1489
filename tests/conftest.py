import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("POOLPROP_CACHE", str(ROOT / ".pytest_cache" / "poolprop"))
torch.set_num_threads(min(2, os.cpu_count() or 1))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Two finished tiny runs (baseline and avg2+mask) on a 64-image features10, shared by tests."""
    from core.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_runs")
    for policy in ("none", "avg2+mask"):
        cfg = TrainConfig(model="resnet20", dataset="features10:train=64,val=32", policy=policy, epochs=2,
                          batch_size=32, eval_batch_size=32, log_every=1, fidelity_every=1, num_threads=1,
                          device="cpu", progress=False, out=str(root / f"tiny-{policy.replace('+', '_')}"))
        assert train(cfg).status == "finished"
    return root
