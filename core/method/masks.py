"""Activations whose backward needs only a 1-bit mask: exact, 1/32 of fp32.

ReLU (where x > 0), ReLU6 and Hardtanh (where min < x < max: the gradient passes inside the
range only), LeakyReLU (where x > 0; elsewhere the gradient is scaled by the slope). The mask
is bit-packed in the tensor's memory order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layout import from_memory_order, is_channels_last, memory_order_flat

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8, 8 elements a byte, little bit order (in the tensor's memory order)."""
    flat = memory_order_flat(mask) if mask.dim() == 4 else mask.reshape(-1)
    if flat.device.type == "cpu":  # numpy's packbits is ~30x faster than the tensor ops below
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return _pack_bits_torch(flat)


def _pack_bits_torch(flat: torch.Tensor) -> torch.Tensor:  # any device
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    return (flat.view(-1, 8).to(torch.uint8) * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def _unpack_bits_torch(packed: torch.Tensor, n: int) -> torch.Tensor:  # any device
    return (packed.unsqueeze(1) & _BITS.to(packed.device)).ne(0).view(-1)[:n]


def unpack_mask(packed: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    n = math.prod(shape)
    if packed.device.type == "cpu":
        bits = torch.from_numpy(np.unpackbits(packed.numpy(), count=n, bitorder="little").view(np.bool_))
    else:
        bits = _unpack_bits_torch(packed, n)
    return from_memory_order(bits, shape, channels_last) if len(shape) == 4 else bits.view(shape)


class MaskedActivationFunction(torch.autograd.Function):
    """y = f(x) for a piecewise-linear f whose slope is 1 on a region and `slope` elsewhere:
    backward keeps the region as bits. kind: "relu" (x > 0, slope 0), "hardtanh" (lo < x < hi,
    slope 0), "leaky" (x > 0, slope negative_slope)."""

    @staticmethod
    def forward(ctx, x, kind: str, a: float, b: float):
        if kind == "relu":
            y, region = torch.relu(x), None
        elif kind == "hardtanh":
            y, region = F.hardtanh(x, a, b), (x > a) & (x < b)
        else:
            y, region = F.leaky_relu(x, a), x > 0
        region = y > 0 if region is None else region
        ctx.conf = (tuple(x.shape), is_channels_last(x), kind, a)
        ctx.save_for_backward(pack_mask(region))
        return y

    @staticmethod
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        shape, cl, kind, a = ctx.conf
        mask = unpack_mask(packed, shape, cl)
        # The gradient in the input's layout: g may come in without one (the head's mean gives a
        # stride-0 gradient), and BatchNorm's backward below runs twice as long on NCHW (measured).
        out = torch.empty_like(mask, dtype=g.dtype)
        if kind == "leaky":
            return torch.mul(g, torch.where(mask, 1.0, a).to(g.dtype), out=out), None, None, None
        return torch.mul(g, mask, out=out), None, None, None


class _Masked:
    """Mixin for nn.ReLU / ReLU6 / Hardtanh / LeakyReLU: the same forward, a 1-bit backward.
    In-place modules compute out of place here (the mask replaces what in-place saved)."""

    def _mask_args(self) -> tuple[str, float, float]:
        if isinstance(self, nn.Hardtanh):
            return "hardtanh", float(self.min_val), float(self.max_val)
        if isinstance(self, nn.LeakyReLU):
            return "leaky", float(self.negative_slope), 0.0
        return "relu", 0.0, 0.0

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return MaskedActivationFunction.apply(x, *self._mask_args())
        return super().forward(x)


class MaskReLU(_Masked, nn.ReLU):
    pass


MASKABLE = (nn.ReLU, nn.Hardtanh, nn.LeakyReLU)  # nn.ReLU6 is a Hardtanh
