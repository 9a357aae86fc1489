"""What global pooling and channel scaling keep.

Global average pooling (the head of torchvision's CNNs, squeeze-excitation's squeeze): its
backward spreads g / (H W) over the input and needs nothing but the input's shape, yet
nn.AdaptiveAvgPool2d keeps the whole input; `ShapeOnlyGlobalPool` keeps none of it (exact).

Channel scaling y = x * s with s per channel (squeeze-excitation's excite, ConvNeXt's layer
scale): the input gradient g * s needs only the small s (kept exactly); s's gradient, a sum of
g * x over the pixels, is computed from x as B-bit codes (unbiased under stochastic rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantize import dequantize, quantize


class ShapeOnlyGlobalPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return F.adaptive_avg_pool2d(x, 1)

    @staticmethod
    def backward(ctx, g):  # what adaptive_avg_pool2d's backward computes, from the shape alone
        n, c, h, w = ctx.shape
        return (g / (h * w)).expand(n, c, h, w)


class ShapeOnlyGlobalPool(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d(1) that keeps only its input's shape for backward."""

    @torch.compiler.disable  # torch.compile(model): see convert.py
    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad and x.dim() == 4:
            return ShapeOnlyGlobalPoolFunction.apply(x)
        return super().forward(x)


def is_global_pool(m: nn.Module) -> bool:
    size = m.output_size if isinstance(m, nn.AdaptiveAvgPool2d) else None
    return size in (1, (1, 1)) and type(m).forward is nn.AdaptiveAvgPool2d.forward


class CodedScaleFunction(torch.autograd.Function):
    """y = x * s, s broadcast over x's pixels; x kept as `bits`-bit codes for s's gradient."""

    @staticmethod
    def forward(ctx, x, s, bits: int):
        y = x * s
        needs_x = ctx.needs_input_grad[1]
        packed, lo, scale, info = quantize(x, bits) if needs_x else (None, None, None, None)
        ctx.save_for_backward(s, *([packed, lo, scale] if needs_x else []))
        ctx.conf = (info, s.shape)
        return y

    @staticmethod
    def backward(ctx, g):
        s, *codes = ctx.saved_tensors
        info, s_shape = ctx.conf
        gx = g * s if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = _sum_to(g * dequantize(*codes, info), s_shape)
        return gx, gs, None


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum `t` down to `shape` (broadcasting's inverse)."""
    lead = t.dim() - len(shape)
    t = t.sum(list(range(lead))) if lead else t
    dims = [i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


class _CodedSqueezeExcite:
    """Mixin for torchvision's SqueezeExcitation: scale = self._scale(x), then x * scale with x
    kept as `pp_bits`-bit codes (the squeeze's pooling is swapped separately)."""

    pp_bits: int = 8

    @torch.compiler.disable  # torch.compile(model): see convert.py
    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return CodedScaleFunction.apply(x, self._scale(x), self.pp_bits)


class _CodedLayerScale:
    """Mixin for torchvision's ConvNeXt block (CNBlock): layer_scale * block(x) with the block's
    output kept as `pp_bits`-bit codes for layer_scale's gradient; the rest as torchvision has it."""

    pp_bits: int = 8

    @torch.compiler.disable  # torch.compile(model): see convert.py
    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        result = CodedScaleFunction.apply(self.block(x), self.layer_scale, self.pp_bits)
        result = self.stochastic_depth(result)
        result += x
        return result


def is_squeeze_excitation(m: nn.Module) -> bool:
    """torchvision.ops.SqueezeExcitation, recognised by its parts (core.method imports no torchvision)."""
    return callable(getattr(m, "_scale", None)) and all(hasattr(m, a) for a in ("avgpool", "fc1", "fc2",
                                                                                "scale_activation"))


def is_layer_scale_block(m: nn.Module) -> bool:
    """torchvision's CNBlock: a `block`, a `layer_scale` parameter and `stochastic_depth`."""
    return isinstance(getattr(m, "layer_scale", None), nn.Parameter) and hasattr(m, "block") and \
        hasattr(m, "stochastic_depth")
