"""ReLU keeping a 1-bit mask of where its input was positive: exact, 1/32 of fp32."""

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
    flat = memory_order_flat(mask)
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
    return from_memory_order(bits, shape, channels_last)


class MaskReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        positive = y > 0
        cl = is_channels_last(x)
        ctx.conf = (tuple(x.shape), cl)
        ctx.save_for_backward(pack_mask(positive))
        return y

    @staticmethod
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        shape, cl = ctx.conf
        mask = unpack_mask(packed, shape, cl)
        # The gradient in the input's layout: g may come in without one (the head's mean gives a
        # stride-0 gradient), and BatchNorm's backward below runs twice as long on NCHW (measured).
        return torch.mul(g, mask, out=torch.empty_like(mask, dtype=g.dtype))


class MaskReLU(nn.ReLU):
    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return MaskReLUFunction.apply(x)
        return torch.relu(x)

