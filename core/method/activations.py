"""Smooth activations (SiLU, GELU, Hardswish, Sigmoid, Tanh, ...): no exact mask exists, so the
input is kept as B-bit codes (core.method.quantize) and the derivative is taken at the decoded
input. The input gradient is then approximate; at 8 bits (the default) its error is a fraction
of a percent, and the ladder names these bytes "activation state".
"""

from __future__ import annotations

import torch
from torch import nn

from .layout import is_dense, may_overwrite_grad
from .quantize import dequantize, dequantize_by_chunk, quantize

# Hardsigmoid has a mask (slope 1/6 inside (-3, 3)), but not one of masks.py's kinds: it gates
# MobileNetV3's squeeze-excitation, a (N, C, 1, 1) vector, where codes cost next to nothing
SMOOTH = (nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Softplus, nn.ELU)


def _aten_backward(m: nn.Module):
    """g * f'(x) for the activation `m` by ATen's own backward kernel (the one autograd calls: one
    pass, one output), or None where there is none to call."""
    aten = torch.ops.aten
    if isinstance(m, nn.GELU):
        return lambda g, x: aten.gelu_backward(g, x, approximate=m.approximate)
    if isinstance(m, nn.Softplus):
        return lambda g, x: aten.softplus_backward(g, x, m.beta, m.threshold)
    if isinstance(m, nn.ELU):
        return lambda g, x: aten.elu_backward(g, m.alpha, 1, 1, False, x)
    if isinstance(m, nn.Sigmoid):
        return lambda g, x: aten.sigmoid_backward(g, torch.sigmoid(x))
    if isinstance(m, nn.Tanh):
        return lambda g, x: aten.tanh_backward(g, torch.tanh(x))
    for cls, op in ((nn.SiLU, aten.silu_backward), (nn.Hardswish, aten.hardswish_backward),
                    (nn.Hardsigmoid, aten.hardsigmoid_backward), (nn.Mish, aten.mish_backward)):
        if isinstance(m, cls):
            return op
    return None


class CodedActivationFunction(torch.autograd.Function):
    """y = module's forward(x); backward: f'(x~) * g, x~ decoded from B-bit codes of x.

    Where ATen has f's backward kernel, the input is decoded a batch chunk at a time and each
    chunk's gradient written into the result: beside the incoming gradient and the result, a
    chunk (at ConvNeXt's MLP, 224 px, batch 8: 37 MiB a tensor), where recomputing f under
    autograd held the decoded input, a copy of it, f's output and the result at once. Where the
    conv after it grants its gradient (layout.grant_gradient: an EfficientNet block's expanding
    SiLU, read by the depthwise conv alone), the result is written over the incoming gradient."""

    @staticmethod
    def forward(ctx, x, module, fn, bits: int, inplace: bool):
        packed, lo, scale, info = quantize(x, bits)  # before fn: an in-place fn overwrites x
        y = fn(x)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(packed, lo, scale)
        ctx.conf = (module, fn, info)
        ctx.grad_granted = False  # layout.grant_gradient: y's gradient may be written over
        return y

    @staticmethod
    def backward(ctx, g):
        module, fn, info = ctx.conf
        derivative = _aten_backward(module)
        if derivative is None:  # autograd on f recomputed at the decoded input
            x = dequantize(*ctx.saved_tensors, info).detach().requires_grad_(True)
            with torch.enable_grad():
                (gx,) = torch.autograd.grad(fn(x + 0), x, g)  # x + 0: an in-place fn may not touch a leaf
            return gx, None, None, None, None
        gx = None
        for samples, x in dequantize_by_chunk(*ctx.saved_tensors, info):
            part = derivative(g[samples], x)
            del x  # before the next chunk is decoded
            if samples == slice(None):  # decoded whole (dequantize_by_chunk): the result as it is
                return part, None, None, None, None
            if gx is None:
                gx = g if may_overwrite_grad(ctx, g) and is_dense(g) else torch.empty_like(g)
            gx[samples] = part
            del part
        return gx, None, None, None, None


class _Coded:
    """Mixin: the module's own forward, its input kept as `pp_bits`-bit codes for backward."""

    pp_bits: int = 8

    @torch.compiler.disable  # torch.compile(model): see convert.py
    def forward(self, x):
        base = super().forward
        if torch.is_grad_enabled() and x.requires_grad and x.dim() in (2, 3, 4):
            return CodedActivationFunction.apply(x, self, base, self.pp_bits, bool(getattr(self, "inplace", False)))
        return base(x)
