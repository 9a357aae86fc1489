import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("POOLPROP_CACHE", str(ROOT / ".pytest_cache" / "poolprop"))
torch.set_num_threads(min(2, os.cpu_count() or 1))
