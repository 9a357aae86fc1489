"""ResNets for CIFAR-sized and ImageNet-sized inputs.

Every ReLU is its own non-in-place module (Captum's DeepLift/GuidedBackprop need that,
and the mask ReLU swapped in by `compress_model` replaces modules one by one). Each reads a
temporary nothing else reads (a BatchNorm output or the residual sum), each BatchNorm a conv
output nothing else reads, and each conv after a ReLU in a block that ReLU's output only, which
the models declare (`pp_activations_read_temporaries`, `pp_norms_read_temporaries`,
`pp_convs_read_temporaries`, and the ImageNet stem's max pool act1's output only,
`pp_pools_read_temporaries`; for the forwards written here only, and inside them only:
layout.vouched_forward): compressed, the mask ReLUs, the low-precision BatchNorms and the second
convs then write over their inputs, and their backwards over gradients that are theirs alone.
A downsampling block's input fans out to both branches once (method/shortcut.py: a strided 1x1
shortcut conv hands back a compact input gradient), and the model hands each block its input to
hold alone (`ResidualBlock.forward_from`), so that it is freed once both branches have read it.
The head averages with a plain mean rather than `AdaptiveAvgPool2d`: the latter keeps
the last ReLU output alive for its backward, which would hide the savings we measure.

Layout (shared by every model here, relied upon by `compression` and the app):
    stem:    conv1, bn1, act1 (+ maxpool for the ImageNet stem)
    stages:  layer1 .. layerN, each a Sequential of residual blocks
    head:    fc
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..method.checkpointing import checkpointed_call
from ..method.layout import vouched_forward
from ..method.residual import basic_block, bottleneck_block, run_stages

CIFAR_RESNETS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}  # blocks per stage (6n+2 layers)
IMAGENET_RESNETS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
                    "resnet50": ("bottleneck", [3, 4, 6, 3])}
MODEL_NAMES = tuple(CIFAR_RESNETS) + tuple(IMAGENET_RESNETS)
STEMS = ("cifar", "imagenet")


class _Vouch:
    """A declaration (`pp_*_read_temporaries`, see the module docstring) that holds for the
    forward written here only: a subclass that overrides it (and may read an activation again)
    vouches for nothing."""

    def __get__(self, obj, owner=None) -> bool:
        cls = type(obj) if obj is not None else owner
        own = next((c for c in cls.__mro__ if c in _OWN_FORWARDS), None)
        return own is not None and all(getattr(cls, m) is getattr(own, m) for m in _OWN_FORWARDS[own])


class ResidualBlock(nn.Module):
    """Base for blocks: optional gradient checkpointing of the whole block (the exact reference).
    The block's own forward runs in layout.vouched_forward (its declarations hold there only)."""

    checkpointed: bool = False
    pp_activations_read_temporaries = _Vouch()  # a block compressed alone too
    pp_norms_read_temporaries = _Vouch()
    pp_convs_read_temporaries = _Vouch()

    def forward(self, x):
        if self.checkpointed and torch.is_grad_enabled() and x.requires_grad:
            return checkpointed_call(self, self._vouched_forward, x)  # recomputed alike
        return self._vouched_forward(x)

    def _vouched_forward(self, x):
        with vouched_forward():
            return self._forward(x)

    def forward_from(self, held: list):
        """forward(held.pop()), the input taken out of `held` (a one-element list) so that the
        block holds it alone, and lets it go once both branches have read it: under compression
        nothing keeps a downsampling block's input (its convs keep their own forms), so it is
        freed before the rest of the block runs (at ResNet-18's second stage, batch 128, a 32 MiB
        tensor fewer through the block's forward). A caller's argument would stay alive to the end."""
        if self.checkpointed or type(self).forward is not ResidualBlock.forward:
            return self(held.pop())
        with vouched_forward():
            return self._forward(held.pop())  # passed on, not kept: _forward's is the only reference

    def _forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError


class PadShortcut(nn.Module):
    """He et al. (2016) option A: subsample and zero-pad channels; no parameters, and nothing kept
    for backward (compress_model needs no form of it)."""

    pp_keeps_nothing = True

    def __init__(self, out_channels: int, stride: int):
        super().__init__()
        self.out_channels, self.stride = out_channels, stride

    def forward(self, x):
        return self.forward_sampled(x[:, :, :: self.stride, :: self.stride])

    def forward_sampled(self, sampled):
        """The shortcut of x from x[:, :, ::stride, ::stride] (method/shortcut.py hands it that)."""
        extra = self.out_channels - sampled.shape[1]
        return F.pad(sampled, (0, 0, 0, 0, extra // 2, extra - extra // 2))


class BasicBlock(ResidualBlock):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1, shortcut: str = "conv"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.act2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_ch != ch:
            if shortcut == "pad":
                self.downsample = PadShortcut(ch, stride)
            else:
                self.downsample = nn.Sequential(nn.Conv2d(in_ch, ch, 1, stride, bias=False), nn.BatchNorm2d(ch))

    _forward = basic_block  # method/residual.py: the order of calls that holds least


class Bottleneck(ResidualBlock):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1, shortcut: str = "conv"):
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.act3 = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    _forward = bottleneck_block


class ResNet(nn.Module):
    pp_activations_read_temporaries = _Vouch()  # see the module docstring
    pp_norms_read_temporaries = _Vouch()
    pp_convs_read_temporaries = _Vouch()
    pp_pools_read_temporaries = _Vouch()  # the ImageNet stem's max pool reads act1's output only

    def __init__(self, block, layers, widths, num_classes=10, stem="cifar", shortcut="conv"):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
        self.stem_kind = stem
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU()
        # registered after act1, whose output it alone reads (pp_pools_read_temporaries)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else None
        in_ch = widths[0]
        self.stage_names = []
        for i, (n_blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(n_blocks):
                blocks.append(block(in_ch, width, stride if b == 0 else 1, shortcut))
                in_ch = width * block.expansion
            name = f"layer{i + 1}"
            setattr(self, name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.num_features = in_ch
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):  # (B, 3, H, W) -> (B, C, h, w)
        with vouched_forward():  # the stem's declarations hold here (each block vouches for its own)
            x = self.act1(self.bn1(self.conv1(x)))
            if self.maxpool is not None:
                x = self.maxpool(x)
        held = [x]
        del x  # each block holds its input alone (method/residual.py)
        return run_stages(held, [getattr(self, name) for name in self.stage_names])

    def forward_head(self, x):  # (B, C, h, w) -> (B, classes)
        return self.fc(x.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# the forwards the declarations vouch for, per class of ours
_OWN_FORWARDS = {ResNet: ("forward", "forward_features"), BasicBlock: ("forward", "_forward"),
                 Bottleneck: ("forward", "_forward")}


def build_model(name: str, num_classes: int = 10, stem: str = "cifar") -> ResNet:
    """`resnet20/32/56` (CIFAR, 3 stages of 16/32/64, option-A shortcuts; `stem` must be
    "cifar") or `resnet18/34/50` with the CIFAR stem (3x3 conv, no max-pool) or ImageNet stem."""
    if name in CIFAR_RESNETS:
        if stem != "cifar":
            raise ValueError(f"{name} is a CIFAR ResNet and only has the 'cifar' stem")
        n = CIFAR_RESNETS[name]
        return ResNet(BasicBlock, [n, n, n], [16, 32, 64], num_classes, "cifar", shortcut="pad")
    if name in IMAGENET_RESNETS:
        kind, layers = IMAGENET_RESNETS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        return ResNet(block, layers, [64, 128, 256, 512], num_classes, stem)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
