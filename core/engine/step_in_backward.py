"""The optimiser step taken inside the backward pass: each parameter is updated as soon as its
gradient is complete, and that gradient freed at once.

A plain step holds every parameter gradient until `optimizer.step()`; at the end of the
backward they all coexist with the first stage's activation gradients, which is where a
compressed ResNet-18's step peaks (43 MiB of gradients at batch 128 on the CPU). Here at most
one parameter's gradient is alive at a time. The update is the same, parameter by parameter
(torch.optim updates each parameter on its own; equal to the bit on the CPU, tested), and the
optimiser, its state and its checkpoints are the usual ones. PyTorch's tutorial
"How to save memory by fusing the optimizer step into the backward pass" does the same with
one optimiser per parameter; here those single-parameter optimisers step with the run
optimiser's state and options, so its state_dict stays that of a plain run, and a run may
switch this on or off when it is resumed (tested).

What cannot work this way, and is refused: fp16 loss scaling (the scaler must see every
gradient before any step), and DDP (its all-reduce comes after a gradient is accumulated).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def refusal(fp16_scaling: bool, world: int) -> str | None:
    """Why a run cannot take its step in the backward, or None."""
    if fp16_scaling:
        return ("step_in_backward cannot be used with fp16 loss scaling (the scaler must see every gradient "
                "before any step); use --amp-dtype bf16 or --no-amp")
    if world > 1:
        return ("step_in_backward cannot be used on several GPUs (DDP averages a gradient only after it is "
                "complete on every rank); train without it")
    return None


class StepInBackward:
    """Hooks that step `optimizer` for each parameter of `model` as its gradient completes,
    while `armed()`; outside it (fidelity probes, attributions) a backward leaves `.grad` as
    usual and updates nothing."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._armed = False
        # One single-parameter optimiser of the same class per parameter: stepping the run's
        # optimiser itself would walk every parameter for each one. At each step it takes the
        # run's state (momentum, Adam's moments and step counts) and its parameter group's
        # options (the LR the schedule sets) from the run's optimiser, looked up then:
        # load_state_dict (a resume) replaces both.
        self._single = {}
        for i, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                self._single[p] = (type(optimizer)([p]), i)
        self._handles = [p.register_post_accumulate_grad_hook(self._step)
                         for p in model.parameters() if p.requires_grad and p in self._single]

    def _step(self, p: torch.Tensor) -> None:
        if self._armed:
            one, i = self._single[p]
            one.state = self.optimizer.state
            one.param_groups[0].update((k, v) for k, v in self.optimizer.param_groups[i].items() if k != "params")
            one.step()
            p.grad = None

    @contextlib.contextmanager
    def armed(self):
        """A backward inside this block updates the parameters; stray gradients are cleared first."""
        self.optimizer.zero_grad(set_to_none=True)
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
