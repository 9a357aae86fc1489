"""Models PoolProp builds by name: its own ResNets (resnet.py) and torchvision's classification
models as `torchvision:<builder>` (zoo.py; random init, or local safetensors weights).

Imports: core.method (a checkpointed block tells the meter what it keeps); nothing above.
"""

from __future__ import annotations

from torch import nn

from .resnet import CIFAR_RESNETS, IMAGENET_RESNETS, MODEL_NAMES, STEMS, BasicBlock, Bottleneck, ResNet
from .resnet import build_model as build_resnet
from .zoo import EXAMPLES, PREFIX, load_weights, torchvision_names

# what the app's model pickers offer: PoolProp's ResNets, then torchvision's usual suspects
# (any other builder can be named where a text is taken: torchvision:NAME)
MODEL_MENU = (*MODEL_NAMES, *(PREFIX + n for n in EXAMPLES))

__all__ = ["CIFAR_RESNETS", "IMAGENET_RESNETS", "MODEL_MENU", "MODEL_NAMES", "PREFIX", "STEMS", "BasicBlock",
           "Bottleneck", "ResNet", "build_model", "is_model_name", "load_weights", "model_names_help",
           "torchvision_names"]


def is_model_name(name: str) -> bool:
    """A PoolProp ResNet, or `torchvision:<builder>` (checked when built: listing torchvision's
    builders imports torchvision, which the caller may not need yet)."""
    return isinstance(name, str) and (name in MODEL_NAMES or (name.startswith(PREFIX) and len(name) > len(PREFIX)))


def model_names_help() -> str:
    return f"{', '.join(MODEL_NAMES)}, or torchvision:NAME (e.g. torchvision:resnet50)"


def build_model(name: str, num_classes: int = 10, stem: str = "cifar", weights: str | None = None) -> nn.Module:
    """A model by name (see `is_model_name`); `weights`: a local safetensors state_dict to load."""
    if isinstance(name, str) and name.startswith(PREFIX):
        from .zoo import build_torchvision

        model = build_torchvision(name[len(PREFIX):], num_classes)
    elif name in MODEL_NAMES:
        model = build_resnet(name, num_classes=num_classes, stem=stem)
    else:
        raise ValueError(f"unknown model {name!r}; choose {model_names_help()}")
    return load_weights(model, weights) if weights else model
