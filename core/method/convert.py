"""Turning a model's layers into their compressed forms and back (`compress_model`).

`compress_model` swaps module classes in place (weights and state_dict keys untouched), so
one checkpoint loads into both forms and `decompress_model` gives the plain model back.
"""

from __future__ import annotations

from torch import nn

from .conv import CompressedConv2d, ConvInputForm
from .masks import MaskReLU
from .norms import LowPrecisionBatchNorm2d
from .policy import CompressionPolicy, PolicyError, in_scope

# Leaf modules that need no swap and keep nothing worth compressing.
_PASS_THROUGH = (nn.Linear, nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.Softmax)
_ORIGINAL = "_pp_original_class"


def _swap(module: nn.Module, cls: type, **attrs) -> None:
    if not hasattr(module, _ORIGINAL):
        setattr(module, _ORIGINAL, type(module))
    module.__class__ = cls
    for k, v in attrs.items():
        setattr(module, k, v)


def compress_model(model: nn.Module, policy: CompressionPolicy | str) -> nn.Module:
    """Swap layers in place to keep what `policy` says for backward; returns `model`.

    Parameters, buffers and state_dict keys are untouched. Raises PolicyError naming every
    module it cannot handle rather than skipping it.
    """
    policy = CompressionPolicy.parse(policy)
    decompress_model(model)
    unsupported = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                unsupported.append(f"{name} (Conv2d with padding={m.padding!r}, mode {m.padding_mode})")
        elif isinstance(m, nn.ReLU):
            if m.inplace:
                unsupported.append(f"{name} (in-place ReLU)")
        elif isinstance(m, nn.BatchNorm2d) or isinstance(m, _PASS_THROUGH):
            pass
        elif len(list(m.children())) == 0 and type(m).__module__.startswith("torch.nn"):
            unsupported.append(f"{name} ({type(m).__name__})")
    if unsupported:
        raise PolicyError("compress_model cannot handle: " + "; ".join(unsupported))

    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    stem_conv = convs[0] if convs else None
    missing = sorted(s for s in policy.stages() or () if not any(n.startswith(f"layer{s}.") for n in convs))
    if missing:
        have = sorted({int(n[5:].split(".")[0]) for n in convs if n.startswith("layer") and n[5:6].isdigit()})
        raise PolicyError(f"{policy} names stage {', '.join(map(str, missing))}, but this model's stages are "
                          f"{', '.join(map(str, have)) or 'none'}")
    for name, m in model.named_modules():
        if not in_scope(name, policy, stem_conv):
            continue
        if isinstance(m, nn.Conv2d) and policy.compresses_conv_input and type(m) is nn.Conv2d:
            _swap(m, CompressedConv2d, pp_form=ConvInputForm.of(policy), pp_name=name)
        elif isinstance(m, nn.ReLU) and policy.relu_mask and type(m) is nn.ReLU:
            _swap(m, MaskReLU)
        elif isinstance(m, nn.BatchNorm2d) and policy.bn != "full" and type(m) is nn.BatchNorm2d:
            _swap(m, LowPrecisionBatchNorm2d, pp_store=policy.bn)
        elif policy.checkpoint and hasattr(m, "checkpointed"):
            m.checkpointed = True
    model.pp_policy = policy
    return model


def decompress_model(model: nn.Module) -> nn.Module:
    """Undo `compress_model`: every swapped module gets its original class back."""
    for m in model.modules():
        original = m.__dict__.pop(_ORIGINAL, None)
        if original is not None:
            m.__class__ = original
            for attr in ("pp_form", "pp_name", "pp_store"):
                m.__dict__.pop(attr, None)
        if "checkpointed" in m.__dict__:
            del m.checkpointed
    model.__dict__.pop("pp_policy", None)
    return model


def model_policy(model: nn.Module) -> CompressionPolicy:
    return getattr(model, "pp_policy", CompressionPolicy())


def set_policy(model: nn.Module, policy: CompressionPolicy | str) -> nn.Module:
    """Give `model` exactly `policy`: compressed as it says, or plain for "none"."""
    policy = CompressionPolicy.parse(policy)
    return decompress_model(model) if policy == CompressionPolicy() else compress_model(model, policy)


class compressed:
    """`with compressed(model, policy): ...` -- compressed as `policy` says inside, and back to
    whatever it was (plain or another policy) afterwards."""

    def __init__(self, model: nn.Module, policy):
        self.model, self.policy = model, CompressionPolicy.parse(policy)

    def __enter__(self):
        self._before = model_policy(self.model)
        return compress_model(self.model, self.policy)

    def __exit__(self, *exc):
        set_policy(self.model, self._before)
        return False
