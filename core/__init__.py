"""PoolProp core: everything that computes. Never imports streamlit."""

import os

# Idle OpenMP threads sleep instead of spinning: on a laptop or a shared machine, spinning
# threads of the app and of a training run beside it slowed both several-fold (measured).
# Must be set before torch starts its thread pool, i.e. before the first `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
