"""torchvision's ResNets, run under compression the way PoolProp's own run (method/residual.py).

torchvision's BasicBlock and Bottleneck compute the same function as ours, but in an order that
holds more: the shortcut after the main branch (the block's input alive throughout, and the
strided shortcut's input gradient full-size), every stage called as a Sequential (its input alive
through the stage), and no declaration that a layer's input is a temporary, so no BatchNorm
writes over its conv's output and no backward over its own gradient. compress_model swaps those
exact classes (a subclass may have a forward of its own: left as it is) for variants whose forward
is residual.py's and which declare what torchvision's own forwards make true: each BatchNorm reads
its conv's output only, the shared in-place ReLU a BatchNorm's output or the residual sum, each
conv after the first that ReLU's output, the stem's max pool the stem ReLU's. Parameters, buffers,
state_dict keys and outputs are unchanged; decompress_model gives the classes back. With
stochastic rounding (`qB`) the random draws come in another order (the shortcut's conv first).
No torchvision import: the classes are known by module and name.
"""

from __future__ import annotations

import torch
from torch import nn

from .layout import vouched_forward
from .residual import basic_block, bottleneck_block, run_stages

_MODULE = "torchvision.models.resnet"


class _AdoptedBlock:
    """A torchvision block whose forward is residual.py's, in layout.vouched_forward. `pp_reads`:
    for a child, the siblings whose outputs it reads (the one ReLU is called after each norm)."""

    pp_activations_read_temporaries = True
    pp_norms_read_temporaries = True
    pp_convs_read_temporaries = True
    act1 = act2 = act3 = property(lambda self: self.relu)  # one in-place ReLU, called per activation

    def forward(self, x):
        with vouched_forward():
            return self._forward(x)

    def forward_from(self, held: list):
        """forward(held.pop()): the block holds its input alone (residual.run_stages)."""
        with vouched_forward():
            return self._forward(held.pop())


class BasicBlockForward(_AdoptedBlock):
    pp_reads = {"relu": ("bn1", "bn2")}
    _forward = basic_block


class BottleneckForward(_AdoptedBlock):
    pp_reads = {"relu": ("bn1", "bn2", "bn3"), "conv2": ("relu",), "conv3": ("relu",)}
    _forward = bottleneck_block


class ResNetForward:
    """torchvision's ResNet: the stem vouched for (conv1-bn1-relu-maxpool, each reading the one
    before), the stages' blocks handed their inputs (residual.run_stages), then avgpool and fc."""

    pp_activations_read_temporaries = True
    pp_norms_read_temporaries = True
    pp_pools_read_temporaries = True

    def forward(self, x):
        with vouched_forward():
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        held = [x]
        del x
        x = run_stages(held, (self.layer1, self.layer2, self.layer3, self.layer4))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_BLOCKS = {"BasicBlock": BasicBlockForward, "Bottleneck": BottleneckForward}


def _is_torchvision(m: nn.Module, name: str) -> bool:
    cls = type(m)
    return cls.__module__ == _MODULE and cls.__qualname__ == name


def adoption(m: nn.Module) -> type | None:
    """The mixin that runs `m` the residual.py way, for an exact torchvision ResNet class (a
    ResNet only when every stage holds exact torchvision blocks alone: its declarations reach
    them), else None."""
    for name, mixin in _BLOCKS.items():
        if _is_torchvision(m, name):
            return mixin
    if _is_torchvision(m, "ResNet"):
        stages = [getattr(m, f"layer{i}", None) for i in range(1, 5)]
        if all(type(s) is nn.Sequential and all(any(_is_torchvision(b, n) for n in _BLOCKS) for b in s)
               for s in stages):
            return ResNetForward
    return None
