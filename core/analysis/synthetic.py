"""Models and batches made up for measuring: a model by name (or a given module) placed on a
device, a batch of random images, an optimiser, a training step. Used by the memory ladder, the
planner and the benchmarks, which measure bytes and time, not accuracy."""

from __future__ import annotations

import torch
from torch import nn

from ..engine.step_in_backward import StepInBackward
from ..models import build_model


def built(model_name, num_classes: int, stem: str) -> nn.Module:
    if isinstance(model_name, nn.Module):
        return model_name
    return build_model(model_name, num_classes=num_classes, stem=stem)


def model_label(model_name) -> str:
    return model_name if isinstance(model_name, str) else type(model_name).__name__


def random_batch(batch: int, size: int, num_classes: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return x, y


def placed(model_name, num_classes: int, stem: str, device) -> tuple[nn.Module, torch.device]:
    """A fresh model on `device`, or a given module where it already is."""
    if isinstance(model_name, nn.Module):
        p = next(model_name.parameters(), None)
        return model_name, (p.device if p is not None else torch.device("cpu"))
    dev = torch.device(device)
    return built(model_name, num_classes, stem).to(dev), dev


def optimizer_for(model: nn.Module, optimizer: str):
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer in ("sgd", "sgd-nesterov"):
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=optimizer == "sgd-nesterov")
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if optimizer == "none":
        return None
    raise ValueError(f"unknown optimizer {optimizer!r}; use sgd, sgd-nesterov, adamw or none")


def training_step(model: nn.Module, x, y, opt, in_backward: StepInBackward | None = None, amp: bool = False) -> None:
    """Forward, loss, backward, update: the optimiser steps after the backward, or inside it
    (`in_backward`, hooks of `opt`); with no optimiser the gradients are dropped."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = nn.functional.cross_entropy(model(x), y)
    if in_backward is not None:
        with in_backward.armed():
            loss.backward()
        return
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    else:
        for p in model.parameters():
            p.grad = None
