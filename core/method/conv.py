"""The compressed convolution: exact forward, a backward that sees only what it kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .policy import CompressionPolicy, PolicyError
from .pooling import blockwise_applies, blockwise_weight_grad, lowres_weight_grad, pooled_copy, upsample
from .quantize import dequantize, dequantize_by_plane, quantize
from .weight_grad import tapwise_pays, tapwise_weight_grad


@dataclass(frozen=True)
class ConvInputForm:
    """What a compressed conv keeps of its input x (B, C, H, W) and how backward rebuilds it.

    pooled   P_k(x); rebuilt by nearest upsampling (or used as is at low resolution);
    qB       x as B-bit codes per (sample, channel), stochastic rounding: unbiased;
    avgK+resB  P_k(x) and the residual x - up(P_k(x)) as B-bit codes: the low frequencies
             exactly, the high ones coarsely (DIVISION); unbiased as well.
    """

    pool: str | None = None
    k: int = 1
    mode: str = "upsample"
    bits: int | None = None
    residual_bits: int | None = None

    @classmethod
    def of(cls, policy: CompressionPolicy) -> ConvInputForm:
        return cls(pool=policy.pool, k=policy.k, mode=policy.mode, bits=policy.bits,
                   residual_bits=policy.residual_bits)

    @property
    def pools(self) -> bool:
        return self.pool is not None and self.k > 1

    @property
    def keeps_input(self) -> bool:
        """x itself is kept (K=1, no codes): backward rebuilds nothing."""
        return self.bits is None and not self.pools

    @property
    def rebuilds_by_upsampling(self) -> bool:
        """The input rebuilt is the pooled copy upsampled, nothing added."""
        return self.pools and self.mode == "upsample" and self.residual_bits is None

    def keep(self, x: torch.Tensor) -> tuple[list[torch.Tensor], object]:
        """-> (tensors to save for backward, what else rebuilding needs)."""
        if self.bits is not None:
            packed, lo, scale, info = quantize(x, self.bits)
            return [packed, lo, scale], info
        if not self.pools:
            return [x], None
        xp = pooled_copy(x, self.pool, self.k)  # (B, C, ceil(H/k), ceil(W/k))
        if self.residual_bits is None:
            return [xp], None
        residual = upsample(xp, self.k, x.shape[2:])
        if residual.stride() == x.stride():  # our own copy, laid out as x: the residual goes over
            torch.sub(x, residual, out=residual)  # it (one full-size temporary in the forward, not two)
        else:
            residual = x - residual  # cropped edge blocks: a view of a larger copy
        packed, lo, scale, info = quantize(residual, self.residual_bits)
        return [xp, packed, lo, scale], info

    def rebuild(self, kept: list[torch.Tensor], info, shape: tuple[int, ...]) -> torch.Tensor:
        """The full-size input the weight gradient is computed from (B, C, H, W)."""
        if self.bits is not None:
            return dequantize(*kept, info)
        if not self.pools:
            return kept[0]
        x = upsample(kept[0], self.k, shape[2:])
        if self.residual_bits is not None:
            # in place (the upsampled copy is ours), a plane of the residual's codes at a time: one
            # full-size tensor less, and only a batch chunk of the decoded residual at a time
            for samples, residual in dequantize_by_plane(*kept[1:], info):
                x[samples].add_(residual)
        return x


def _input_grad(g, weight, x_shape, stride, padding, dilation, groups):
    """conv2d's input gradient, from the weight and the input's shape only: the transposed
    convolution (the kernel convolution_backward runs: equal to the bit, but for grouped convs
    in channels_last, equal to float32 rounding; tested)."""
    out_pad = [x_shape[2 + a] - ((g.shape[2 + a] - 1) * stride[a] - 2 * padding[a]
                                 + dilation[a] * (weight.shape[2 + a] - 1) + 1) for a in range(2)]
    return F.conv_transpose2d(g, weight, None, stride, padding, out_pad, groups, dilation)


class CompressedConvFunction(torch.autograd.Function):
    """conv2d whose backward sees only what `form` keeps of its input."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, form: ConvInputForm):
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # cast like autocast would, then run plainly
            dt = torch.get_autocast_dtype(dev)
            ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
            x, weight = x.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        else:
            ctx.dtypes = None
        # kept before the output exists: what keeping holds for a moment (the residual forms' full-
        # size residual) and the output never coexist
        kept, info = form.keep(x)
        with torch.autocast(dev, enabled=False):
            y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(*kept, weight)
        ctx.conf = (tuple(x.shape), stride, padding, dilation, groups, form, info, bias is not None)
        return y

    @staticmethod
    def backward(ctx, g):
        # Autocast must not re-type our ops (it runs interpolate in fp32): dtypes are set here.
        with torch.autocast(g.device.type, enabled=False):
            return CompressedConvFunction._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        *kept, weight = ctx.saved_tensors
        x_shape, stride, padding, dilation, groups, form, info, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = g.to(weight.dtype)
        blockwise = form.rebuilds_by_upsampling and blockwise_applies(x_shape[2:], stride, form.k)
        dense = weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last)
        w_strides = weight.stride() if dense else None  # the weight's own layout for its gradient
        # The weight gradient first, then the input gradient from the weight alone: a full-size
        # rebuilt input is freed before the full-size input gradient is allocated, so the two
        # never coexist (at ResNet-18's first stage that is 32 MiB off the step peak). An input
        # kept as is frees nothing that way: one call gives PyTorch's own three gradients.
        gx = gw = gb = None
        if blockwise or (form.mode == "lowres" and form.pools):
            # No full-size input: the pooled copy gives the weight gradient (blockwise: exactly
            # as its upsampling would).
            weight_grad = blockwise_weight_grad if blockwise else lowres_weight_grad
            gw = (weight_grad(kept[0], g, weight.shape, stride, padding, dilation, groups, form.k, w_strides)
                  if need_w else None)
            gb = g.sum((0, 2, 3)) if need_b and has_bias else None
        elif need_w and not form.keeps_input and tapwise_pays(weight.shape, weight.device, x_shape, stride, groups):
            x_rec = form.rebuild(kept, info, x_shape).to(weight.dtype)
            gw = tapwise_weight_grad(g, x_rec, weight.shape, stride, padding, dilation, w_strides)
            del x_rec
            gb = g.sum((0, 2, 3)) if need_b and has_bias else None
        elif form.keeps_input or need_w or (need_b and has_bias):
            x_rec = form.rebuild(kept, info, x_shape).to(weight.dtype)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g, x_rec, weight, [weight.shape[0]] if has_bias else None, list(stride), list(padding),
                list(dilation), False, [0, 0], groups, [need_x and form.keeps_input, need_w, need_b and has_bias])
            del x_rec
        if need_x and gx is None:
            gx = _input_grad(g, weight, x_shape, stride, padding, dilation, groups)
        if ctx.dtypes is not None:
            dx, dw, db = ctx.dtypes
            gx = None if gx is None else gx.to(dx)
            gw = None if gw is None else gw.to(dw)
            gb = None if gb is None else gb.to(db)
        return gx, gw, gb, None, None, None, None, None


class CompressedConv2d(nn.Conv2d):
    """A Conv2d (same parameters and state_dict) that keeps only `pp_form` of its input."""

    pp_form: ConvInputForm = ConvInputForm()

    def forward(self, x):
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        h, w = x.shape[-2:]
        if self.pp_form.pools and self.pp_form.k > min(h, w):
            raise PolicyError(
                f"K={self.pp_form.k} is larger than the {h}x{w} feature map entering "
                f"{getattr(self, 'pp_name', 'a conv')}; use a smaller K or restrict the policy to earlier stages "
                "(stages=1,2)")
        return CompressedConvFunction.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                            self.groups, self.pp_form)

