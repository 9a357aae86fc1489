"""Leave a model as it came: one context manager for every measurement that runs it.

Measurements (the meter, gradient fidelity, timings, the planner) run training-mode forwards
and backwards on a model someone else owns: the app's cached model, a trainer's live one.
They must not move its BatchNorm statistics, leave gradients in `.grad`, change train/eval
mode or its compression policy.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def preserved(model: nn.Module, *, buffers: bool = True, grads: bool = True, mode: bool = True,
              policy: bool = True):
    """Restore on exit (even on error) what is asked: buffers (BN running statistics and
    counters, copied), each parameter's `.grad` (the same tensor object), train/eval mode, and
    the compression policy (layers swapped back)."""
    from .convert import model_policy, set_policy

    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()] if buffers else []
    saved_grads = [(p, p.grad) for p in model.parameters()] if grads else []
    was_training = model.training
    before = model_policy(model) if policy else None
    try:
        yield model
    finally:
        if policy:
            set_policy(model, before)
        with torch.no_grad():
            for b, v in saved_buffers:
                b.copy_(v)
        for p, g in saved_grads:
            p.grad = g
        if mode:
            model.train(was_training)
