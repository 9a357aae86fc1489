"""The method: what compression is, with nothing about runs, data or the app.

Policies (policy.py) and the layers that keep less for backward: pooled, quantised or
residual conv inputs (conv.py with pooling.py, quantize.py; a wide conv's weight gradient
tap by tap, weight_grad.py), 1-bit ReLU masks (masks.py),
BatchNorm in fewer bits (norms.py); `compress_model` to swap them into any model
(convert.py); the saved-activation meter (meter.py); the per-layer gradient comparison
(gradients.py); the feature-map probe (probe.py); `preserved` (snapshot.py).

Imports: torch and numpy only, and nothing else from core. Everything above uses this.
"""

from .convert import compress_model, compressed, decompress_model, model_policy, set_policy
from .meter import SavedActivationMeter, SavedActivationReport, model_state_bytes, saved_activation_bytes
from .policy import CompressionPolicy, PolicyError

__all__ = ["CompressionPolicy", "PolicyError", "SavedActivationMeter", "SavedActivationReport", "compress_model",
           "compressed", "decompress_model", "model_policy", "model_state_bytes", "saved_activation_bytes",
           "set_policy"]
