"""Residual blocks run the way that holds least (shared by PoolProp's ResNets and the torchvision
ResNets compress_model adopts, method/torchvision_resnet.py).

- A downsampling block's input fans out to both branches once (method/shortcut.py: a strided
  shortcut hands back a compact input gradient), and the block lets its input go once both
  branches have read it: the caller hands it over in a one-element list (`run_stages`,
  a block's `forward_from`), so that nothing else holds it. Such a conv shortcut at a batch too
  small for its compact gradient runs after the main branch instead (its backward then runs first).
- The residual sum is written over the last norm's output where nothing else can read it.
- One call per line: each temporary is freed as soon as the next op has read it.
The arithmetic is the blocks' own (He et al.'s BasicBlock; the Bottleneck with its stride on
the 3x3 conv, torchvision's "v1.5"); blocks name their activations act1..act3.
"""

from __future__ import annotations

import torch
from torch import nn

from .layout import called_plainly, may_overwrite
from .shortcut import shortcut_and_main_input


def residual_sum(out: torch.Tensor, identity: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """out + identity, written over `out` (the norm's output) where nothing else can read it: no
    hook on the norm could have kept it (autograd's own checks cover the rest). The forward then
    holds one full-size tensor fewer; the sum and its gradients are the same bits."""
    if (called_plainly(norm) and may_overwrite(out) and identity.shape == out.shape
            and torch.result_type(out, identity) == out.dtype):  # add_ would neither broadcast nor demote
        return out.add_(identity)
    return out + identity


def basic_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv1-bn1-act1-conv2-bn2, plus the shortcut, then act2. Called with the only reference to x."""
    identity, x = shortcut_and_main_input(x, block.downsample, block.conv1)
    out = block.act1(block.bn1(block.conv1(x)))
    if identity is not None:
        del x  # read by both branches: freed here where nothing else holds it
    out = block.conv2(out)
    out = block.bn2(out)
    if identity is None:  # the shortcut after the main branch (shortcut.py)
        identity = block.downsample(x)
        del x
    return block.act2(residual_sum(out, identity, block.bn2))


def bottleneck_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv1-bn1-act1-conv2-bn2-act2-conv3-bn3, plus the shortcut, then act3."""
    identity, x = shortcut_and_main_input(x, block.downsample, block.conv1)
    out = block.act1(block.bn1(block.conv1(x)))
    if identity is not None:
        del x
    out = block.conv2(out)
    out = block.act2(block.bn2(out))
    out = block.conv3(out)
    out = block.bn3(out)
    if identity is None:
        identity = block.downsample(x)
        del x
    return block.act3(residual_sum(out, identity, block.bn3))


def run_stages(held: list, stages) -> torch.Tensor:
    """Each stage's blocks in turn on held.pop(), without the Sequentials' calls: a Sequential's
    call holds the stage's input until the stage returns, a full-size tensor alive through every
    later block (under compression 8 MiB of ResNet-20's 61 MiB step peak at batch 128). A block
    with `forward_from` called plainly is handed its input to hold alone; a stage with hooks is
    called as one module (Captum's hooks, the app's layer views, see one call)."""
    x = held.pop()
    for stage in stages:
        if not (called_plainly(stage) and type(stage).forward is nn.Sequential.forward):
            x = stage(x)  # hooked, or a forward of its own
            continue
        for block in stage:
            if not (hasattr(block, "forward_from") and called_plainly(block)):
                x = block(x)
                continue
            held = [x]
            del x  # the block alone holds its input
            x = block.forward_from(held)
    return x
