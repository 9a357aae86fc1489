"""A model's layers for the pages: names by kind, what they output, predictions.

Anything that installs hooks does so inside a context manager that removes them; models are
put in eval mode for the call and their train/eval flags restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..models.resnet import ResidualBlock

LAYER_KINDS = ("conv", "block", "relu", "stage")


# ---------------------------------------------------------------------------------------
# Small helpers shared with attribution.py
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside, every module's own train/eval flag restored afterwards.

    Gradient checkpointing (the `ckpt` policy) is switched off inside as well: the forward
    pass is the same, and a checkpointed block would re-run its forward during backward,
    firing our hooks a second time.
    """
    flags = [(m, m.training) for m in model.modules()]
    ckpt = [(m, m.__dict__["checkpointed"]) for m in model.modules() if "checkpointed" in m.__dict__]
    model.eval()
    for m, _ in ckpt:
        m.checkpointed = False
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
        for m, value in ckpt:
            m.checkpointed = value


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str], fn=None, stop_after: str | None = None):
    """Record the outputs of named submodules during forward passes; hooks removed on exit.

    Yields a dict name -> output (or `fn(output)` when given, e.g. to reduce it on the fly).
    With `stop_after`, the forward pass is cut short once that module has run (its hook
    raises `_StopForward`, which the `run_until` helper swallows): later layers are skipped.
    """
    store: dict = {}
    handles = []

    def make_hook(name):
        def hook(_module, _inputs, output):
            store[name] = fn(output) if fn is not None else output
            if stop_after is not None and name == stop_after:
                raise _StopForward

        return hook

    try:
        for name in names:
            handles.append(_module(model, name).register_forward_hook(make_hook(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    """Raised from a hook to skip the rest of a forward pass."""


def run_until(model: nn.Module, x: torch.Tensor) -> None:
    """Forward `x`, treating an early stop from `capture(..., stop_after=...)` as success."""
    try:
        model(x)
    except _StopForward:
        pass


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"model has no layer {name!r}; see layer_names(model)") from e


def _as_tensor(w) -> torch.Tensor:
    if isinstance(w, nn.Module):
        w = w.weight
    if isinstance(w, np.ndarray):
        w = torch.from_numpy(w)
    return w.detach().to("cpu", torch.float64)


def layer_names(model: nn.Module, kind: str = "conv") -> list[str]:
    """Module names for a selector, in forward order.

    conv:  every Conv2d (also shortcut convs; compressed CompressedConv2d count too);
    block: the stem's output ReLU(s) (direct ReLU children of the model, e.g. "act1") and
           every residual block -- the representation after each step of depth;
    relu:  every ReLU module (each is its own module in our models);
    stage: layer1 .. layerN.
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(LAYER_KINDS)}")
    if kind == "stage":
        return list(getattr(model, "stage_names", [n for n, _ in model.named_children() if n.startswith("layer")]))
    if kind == "block":
        top_relus = {id(m) for m in model.children() if isinstance(m, nn.ReLU)}
        return [n for n, m in model.named_modules()
                if isinstance(m, ResidualBlock) or id(m) in top_relus]
    cls = nn.Conv2d if kind == "conv" else nn.ReLU
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def first_conv(model: nn.Module) -> str:
    return layer_names(model, "conv")[0]


def denormalize(x: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """Normalised (B, 3, H, W) batch -> (B, H, W, 3) float images in [0, 1] for display."""
    x = x.detach().to("cpu", torch.float32)
    if std is not None:
        x = x * torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    if mean is not None:
        x = x + torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def prediction(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities (B, classes), eval mode, no gradients."""
    with eval_mode(model):
        return torch.softmax(model(x).float(), dim=1)


@torch.no_grad()
def feature_maps(model: nn.Module, layer_name: str, x: torch.Tensor) -> torch.Tensor:
    """The output (B, C, h, w) of `layer_name` for input `x` (eval mode, hook removed afterwards).

    The forward pass stops right after the layer, so early layers are cheap.
    """
    with eval_mode(model), capture(model, [layer_name], stop_after=layer_name) as out:
        run_until(model, x)
    return out[layer_name].detach()


