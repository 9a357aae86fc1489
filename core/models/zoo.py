"""torchvision's classification models by name: `torchvision:resnet50`, `torchvision:efficientnet_b0`...

Weights are never downloaded: a model starts from torchvision's random initialisation, or
from a local safetensors file of its state_dict (checked against the model before loading).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

PREFIX = "torchvision:"
EXAMPLES = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny")


def torchvision_names() -> list[str]:
    """The classification builders torchvision lists (resnet50, mobilenet_v2, ...)."""
    from torchvision import models

    return sorted(models.list_models(module=models))


def build_torchvision(name: str, num_classes: int = 10) -> nn.Module:
    """`name` without the prefix; random init (weights=None: nothing is downloaded)."""
    from torchvision import models

    if name not in torchvision_names():
        close = [n for n in torchvision_names() if n.startswith(name[:4])][:4] or list(EXAMPLES)
        raise ValueError(f"unknown torchvision model {name!r}; e.g. {', '.join(close)} "
                         "(any builder torchvision.models.list_models() names)")
    return models.get_model(name, weights=None, num_classes=num_classes)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local safetensors state_dict into `model`, after checking every key and shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {path} not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                         "PoolProp never loads pickle (.pt/.pth)") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [k for k in expected if k in got and got[k] != expected[k]]
    if missing or extra or wrong:
        raise ValueError(f"{path} does not fit the model: {len(missing)} keys missing, {len(extra)} unexpected, "
                         f"{len(wrong)} of another shape (e.g. {(missing + extra + wrong)[0]})")
    model.load_state_dict(state)
    return model
