"""PoolProp core: everything that computes. Never imports streamlit.

The rooms, from the bottom up (each may use the ones below it, never those above;
docs/architecture.md, enforced by tests/test_architecture.py):

    method/     what compression is: policies, compressed layers, compress_model, the meter
    models/     the networks PoolProp builds by name
    engine/     data, the training loop, run directories, the job launcher, evaluation
    analysis/   fidelity, features, attributions, curves, memory ladder and planner, figures
    cli/        `python -m core ...`

The stable public API is what this file exports; internal modules may move.
"""

import os

# Idle OpenMP threads sleep instead of spinning: on a laptop or a shared machine, spinning
# threads of the app and of a training run beside it slowed both several-fold (measured).
# Must be set before torch starts its thread pool, i.e. before the first `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .engine.config import TrainConfig  # noqa: E402
from .engine.data import load_dataset  # noqa: E402
from .engine.evaluate import evaluate_run  # noqa: E402
from .engine.runs import list_runs, load_model  # noqa: E402
from .engine.trainer import TrainResult, resume, train  # noqa: E402
from .method import (  # noqa: E402
    CompressionPolicy,
    PolicyError,
    SavedActivationMeter,
    compress_model,
    compressed,
    decompress_model,
    saved_activation_bytes,
)
from .models import build_model  # noqa: E402

__all__ = ["CompressionPolicy", "PolicyError", "SavedActivationMeter", "TrainConfig", "TrainResult", "build_model",
           "compress_model", "compressed", "decompress_model", "evaluate_run", "list_runs", "load_dataset",
           "load_model", "resume", "saved_activation_bytes", "train"]
