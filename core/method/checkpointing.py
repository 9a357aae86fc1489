"""Gradient checkpointing (`ckpt`): whole blocks recomputed in backward, exact. The reference
every compression policy is held against.

Non-reentrant checkpointing keeps each block's input by reference, outside
saved_tensors_hooks; a checkpointed block calls `note_checkpoint_input` so that the meters
listening here (core.method.meter) still count it. Listeners are per thread, like autograd's
saved-tensor hooks: two pages of the app measuring at once must not count each other's blocks.
"""

from __future__ import annotations

import threading

import torch
from torch.utils.checkpoint import checkpoint

_local = threading.local()


def checkpoint_listeners() -> list:
    """This thread's listeners (callables taking a checkpointed block's input)."""
    if not hasattr(_local, "listeners"):
        _local.listeners = []
    return _local.listeners


def note_checkpoint_input(x: torch.Tensor) -> None:
    for listener in checkpoint_listeners():
        listener(x)


class Checkpointed:
    """Mixin for a block with one input: its forward recomputed in backward."""

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            note_checkpoint_input(x)
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)
