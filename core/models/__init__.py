"""Models PoolProp builds by name: its own ResNets (resnet.py); torchvision's come next.

May import core.method (a checkpointed block tells the meter what it keeps); nothing above.
"""

from .resnet import CIFAR_RESNETS, IMAGENET_RESNETS, MODEL_NAMES, STEMS, BasicBlock, Bottleneck, ResNet, build_model

__all__ = ["CIFAR_RESNETS", "IMAGENET_RESNETS", "MODEL_NAMES", "STEMS", "BasicBlock", "Bottleneck", "ResNet",
           "build_model"]
