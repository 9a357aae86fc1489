"""Smooth activations (SiLU, GELU, Hardswish, Sigmoid, Tanh, ...): no exact mask exists, so the
input is kept as B-bit codes (core.method.quantize) and the derivative is taken at the decoded
input. The input gradient is then approximate; at 8 bits (the default) its error is a fraction
of a percent, and the ladder names these bytes "activation state".
"""

from __future__ import annotations

import torch
from torch import nn

from .quantize import dequantize, quantize

SMOOTH = (nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Softplus, nn.ELU)


class CodedActivationFunction(torch.autograd.Function):
    """y = module's forward(x); backward: f'(x~) * g, x~ decoded from B-bit codes of x."""

    @staticmethod
    def forward(ctx, x, fn, bits: int, inplace: bool):
        packed, lo, scale, info = quantize(x, bits)  # before fn: an in-place fn overwrites x
        y = fn(x)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(packed, lo, scale)
        ctx.conf = (fn, info)
        return y

    @staticmethod
    def backward(ctx, g):
        fn, info = ctx.conf
        x = dequantize(*ctx.saved_tensors, info).detach().requires_grad_(True)
        with torch.enable_grad():
            (gx,) = torch.autograd.grad(fn(x + 0), x, g)  # x + 0: an in-place fn may not touch a leaf
        return gx, None, None, None


class _Coded:
    """Mixin: the module's own forward, its input kept as `pp_bits`-bit codes for backward."""

    pp_bits: int = 8

    @torch.compiler.disable  # torch.compile(model): see convert.py
    def forward(self, x):
        base = super().forward
        if torch.is_grad_enabled() and x.requires_grad and x.dim() in (2, 3, 4):
            return CodedActivationFunction.apply(x, base, self.pp_bits, bool(getattr(self, "inplace", False)))
        return base(x)
