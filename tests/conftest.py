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
    from helpers import make_tiny_runs

    return make_tiny_runs(tmp_path_factory.mktemp("tiny_runs"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny convs (batches of 1-8 small images): on a busy
    2-core machine two OpenMP threads spin-wait and run them 4-10x slower. Results do not depend
    on it; the count is restored afterwards. Use: pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
