"""BatchNorm keeping its input in a cheaper form for backward (bn16, bn8, bn4, bn2)."""

from __future__ import annotations

import torch
from torch import nn

from .policy import BN_STORAGE
from .quantize import dequantize, quantize


class LowPrecisionBNFunction(torch.autograd.Function):
    """Training-mode BN that keeps its input in `store` form for backward: x_hat =
    (x - mean) * invstd as a dtype (bfloat16, float8), or x itself as B-bit codes (an int).

    x_hat has unit variance per channel, which suits bf16/float8 far better than raw x. The
    codes need no such care: their range is per (sample, channel) already, and x_hat is affine
    in x per channel, so coding x itself stores the same information with two passes fewer.
    Exact: beta's gradient. Approximate (rounding): gamma's and the input gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, store):
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps)
        shape = (1, -1, 1, 1)
        info = None
        if isinstance(store, int):
            packed, lo, scale, info = quantize(x, store)
            kept = [packed, lo, scale]
        else:
            x_hat = (x - mean.view(shape).to(x.dtype)) * invstd.view(shape).to(x.dtype)
            if store == torch.float8_e4m3fn:  # float8 casts are not saturating: keep in range
                x_hat = x_hat.clamp(-448, 448)
            kept = [x_hat.to(store)]
        ctx.save_for_backward(*kept, weight, mean, invstd)
        ctx.conf = (x.dtype, eps, info)
        return out

    @staticmethod
    def backward(ctx, g):
        *kept, weight, mean, invstd = ctx.saved_tensors
        dtype, eps, info = ctx.conf
        shape = (1, -1, 1, 1)
        if info is not None:
            x_rec = dequantize(*kept, info)
        else:
            x_rec = (kept[0].to(torch.float32) / invstd.view(shape) + mean.view(shape)).to(dtype)
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, x_rec, weight, None, None, mean, invstd, True, eps, [need[0], need[1], need[2]])
        return gx, gw, gb, None, None, None, None, None


class LowPrecisionBatchNorm2d(nn.BatchNorm2d):
    pp_store: str = "bn16"

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled() and x.requires_grad and self.track_running_stats):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        return LowPrecisionBNFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                            momentum, self.eps, BN_STORAGE[self.pp_store])

