"""Gradient checkpointing (`ckpt`): whole blocks recomputed in backward, exact. The reference
every compression policy is held against.

Non-reentrant checkpointing keeps each block's input by reference, outside
saved_tensors_hooks; a checkpointed block calls `note_checkpoint_input` so that the meters
listening here (core.method.meter) still count it. Listeners are per thread, like autograd's
saved-tensor hooks: two pages of the app measuring at once must not count each other's blocks.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn
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


@contextlib.contextmanager
def _statistics_kept(block: nn.Module):
    """The block's norms' running statistics as they were, after whatever runs inside."""
    kept = [(b, b.clone()) for m in block.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    try:
        yield
    finally:
        for buffer, value in kept:  # .data: the buffer's version stays (a norm's own update keeps it too)
            buffer.data.copy_(value)


def checkpointed_call(block: nn.Module, forward, x: torch.Tensor) -> torch.Tensor:
    """forward(x), recomputed in backward (non-reentrant checkpointing). The recomputation would
    update the block's BatchNorm running statistics a second time each step (an effective
    momentum of 0.19 for 0.1, and num_batches_tracked counting double): it runs with them kept
    as the forward left them, so a `ckpt` model's statistics are the plain model's."""
    note_checkpoint_input(x)  # the meters count what checkpointing keeps by reference
    calls = []

    def run(x):
        if not calls:
            calls.append(True)
            return forward(x)
        with _statistics_kept(block):
            return forward(x)

    return checkpoint(run, x, use_reentrant=False)


class Checkpointed:
    """Mixin for a block with one input: its forward recomputed in backward."""

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return checkpointed_call(self, super().forward, x)
        return super().forward(x)
