"""Activations whose backward needs only a 1-bit mask: exact, 1/32 of fp32.

ReLU (where x > 0), ReLU6 and Hardtanh (where min < x < max: the gradient passes inside the
range only), LeakyReLU (where x > 0; elsewhere the gradient is scaled by the slope). The mask
is bit-packed in the tensor's memory order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .fastpath import fused
from .layout import (
    called_plainly,
    from_memory_order,
    grant_gradient,
    in_memory_order,
    is_channels_last,
    may_overwrite,
    may_overwrite_grad,
    memory_order_flat,
    reads_vouched,
)

_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def _flat(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return memory_order_flat(t, channels_last) if t.dim() == 4 else t.reshape(-1)


def _planes(flat: torch.Tensor) -> torch.Tensor:
    """(8, ceil(n/8)) view of a memory-order vector padded to a multiple of 8: byte j of the mask
    holds element j of every plane (planar packing: every plane is a contiguous stream, which a
    compiled loop reads with vector instructions; bit i is plane i)."""
    pad = (-flat.numel()) % 8
    return (F.pad(flat, (0, pad)) if pad else flat).view(8, -1)


def _region(x: torch.Tensor, kind: str, a: float, b: float) -> torch.Tensor:
    """Where the gradient passes with slope 1."""
    return (x > a) & (x < b) if kind == "hardtanh" else x > 0


@fused
def _mask_pack(x: torch.Tensor, kind: str, a: float, b: float, channels_last: bool) -> torch.Tensor:
    """The region of x as bits, planar, in x's memory order: one pass over x."""
    planes = _planes(_region(_flat(x, channels_last), kind, a, b).to(torch.int32))
    packed = planes[0]
    for i in range(1, 8):  # element-wise over the planes (a sum over them kept an 8 MiB buffer, compiled)
        packed = packed | (planes[i] << i)
    return packed.to(torch.uint8)


def _mask_factor(packed: torch.Tensor, dtype: torch.dtype, kind: str, slope: float) -> torch.Tensor:
    """(8, m) per element: 1 where the mask is set, `slope` elsewhere (plane-major, as packed)."""
    w = torch.tensor(_WEIGHTS, dtype=torch.int32, device=packed.device).view(8, 1)
    on = (packed.to(torch.int32).view(1, -1) & w) != 0
    return on.to(dtype) if kind != "leaky" else torch.where(on, 1.0, slope).to(dtype)


@fused
def _mask_apply(g: torch.Tensor, packed: torch.Tensor, shape: tuple[int, ...], channels_last: bool, kind: str,
                slope: float) -> torch.Tensor:
    """g where the mask is set, g * slope elsewhere (0 for ReLU/Hardtanh), in `shape` and the
    given layout: one pass over g."""
    n = math.prod(shape)
    factor = _mask_factor(packed, g.dtype, kind, slope)
    if n % 8 == 0:  # the planes tile g exactly: multiply plane by plane, a 2-D loop without divisions
        out = (_flat(g, channels_last).view(8, -1) * factor).view(-1)
    else:
        out = _flat(g, channels_last) * factor.reshape(-1)[:n]
    return from_memory_order(out, shape, channels_last) if len(shape) == 4 else out.view(shape)


@fused
def _mask_apply_(g: torch.Tensor, packed: torch.Tensor, shape: tuple[int, ...], channels_last: bool, kind: str,
                 slope: float) -> torch.Tensor:
    """_mask_apply written over g, which has the given layout: the same bits, no new tensor."""
    n = math.prod(shape)
    factor = _mask_factor(packed, g.dtype, kind, slope)
    flat = _flat(g, channels_last)  # a view: g has this layout
    if n % 8 == 0:
        flat.view(8, -1).mul_(factor)
    else:
        flat.mul_(factor.reshape(-1)[:n])
    return g


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8, 8 elements a byte (planar, in the tensor's memory order)."""
    return _mask_pack.reference(mask.to(torch.float32), "relu", 0.0, 0.0, is_channels_last(mask))


def unpack_mask(packed: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    ones = torch.ones(shape, device=packed.device)
    if channels_last:
        ones = ones.contiguous(memory_format=torch.channels_last)
    return _mask_apply.reference(ones, packed, tuple(shape), channels_last, "relu", 0.0).bool()


class MaskedActivationFunction(torch.autograd.Function):
    """y = f(x) for a piecewise-linear f whose slope is 1 on a region and `slope` elsewhere:
    backward keeps the region as bits. kind: "relu" (x > 0, slope 0), "hardtanh" (lo < x < hi,
    slope 0), "leaky" (x > 0, slope negative_slope)."""

    @staticmethod
    def forward(ctx, x, kind: str, a: float, b: float, inplace: bool = False):
        cl = is_channels_last(x)
        ctx.conf = (tuple(x.shape), cl, kind, a)
        ctx.save_for_backward(_mask_pack(x, kind, a, b, cl))  # before an in-place f overwrites x
        ctx.grad_granted = False  # layout.grant_gradient: y's gradient may be written over
        if kind == "relu":
            y = torch.relu_(x) if inplace else torch.relu(x)
        elif kind == "hardtanh":
            y = F.hardtanh(x, a, b, inplace=inplace)
        else:
            y = F.leaky_relu(x, a, inplace=inplace)
        if inplace:
            ctx.mark_dirty(x)
        return y

    @staticmethod
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        shape, cl, kind, a = ctx.conf
        # The gradient in the input's layout: g may come in without one (the head's mean gives a
        # stride-0 gradient), and BatchNorm's backward below runs twice as long on NCHW (measured).
        slope = a if kind == "leaky" else 0.0
        over = may_overwrite_grad(ctx, g) and tuple(g.shape) == shape and in_memory_order(g, cl)
        return (_mask_apply_ if over else _mask_apply)(g, packed, shape, cl, kind, slope), None, None, None, None


class _Masked:
    """Mixin for nn.ReLU / ReLU6 / Hardtanh / LeakyReLU: the same forward, a 1-bit backward.
    In place where the module is (`inplace`), or where the model vouches that every activation
    reads a temporary nothing else reads (`pp_inplace`, set by compress_model) and no hook on the
    module that made it could have kept it: the forward then holds one full-size tensor fewer."""

    pp_inplace: bool = False
    pp_input_from: tuple[nn.Module, ...] = ()  # the BatchNorm before, and modules whose hooks could keep x

    def _mask_args(self) -> tuple[str, float, float]:
        if isinstance(self, nn.Hardtanh):
            return "hardtanh", float(self.min_val), float(self.max_val)
        if isinstance(self, nn.LeakyReLU):
            return "leaky", float(self.negative_slope), 0.0
        return "relu", 0.0, 0.0

    @torch.compiler.disable  # torch.compile(model): see convert.py
    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            vouched = self.pp_inplace and reads_vouched(self, x) and all(called_plainly(m) for m in self.pp_input_from)
            inplace = bool(self.inplace or vouched) and may_overwrite(x)
            if vouched and inplace and called_plainly(self):
                grant_gradient(x)  # x is overwritten: the gradient this backward hands the BatchNorm is its alone
            return MaskedActivationFunction.apply(x, *self._mask_args(), inplace)
        return super().forward(x)


class MaskReLU(_Masked, nn.ReLU):
    pass


MASKABLE = (nn.ReLU, nn.Hardtanh, nn.LeakyReLU)  # nn.ReLU6 is a Hardtanh
