"""The compressed convolution: exact forward, a backward that sees only what it kept."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layout import (
    called_plainly,
    grant_gradient,
    is_channels_last,
    is_dense,
    may_overwrite,
    may_overwrite_grad,
    reads_vouched,
)
from .policy import CompressionPolicy, PolicyError
from .pooling import blockwise_applies, blockwise_weight_grad, lowres_weight_grad, pooled_copy, upsample
from .quantize import dequantize, dequantize_by_chunk, quantize
from .weight_grad import tapwise_pays, tapwise_weight_grad

# Over its input (or output gradient) a conv runs a batch chunk at a time, as does rebuilding a
# coded input: a quarter of the batch, at least _MIN_CHUNK samples when writing over (a single
# sample runs another oneDNN kernel, whose output differs in the last bits; chunks of 2 and more
# gave the whole batch's bits in every case tried). Smaller batches run out of place.
_CHUNKS, _MIN_CHUNK = 4, 8
# A rebuilt input's chunk holds at least this much: smaller chunks take nothing off a peak worth
# having and cost a call each (EfficientNet's late 2x2 maps at 64 px ran 1.5x slower chunked).
# Every input of the CIFAR ResNets at batch 128 (2 MiB and up) still comes in quarters.
_MIN_REBUILT_CHUNK_BYTES = 1 << 19


def _rebuild_chunks(shape: tuple[int, ...], element_size: int) -> int:
    """How many batch chunks a conv's input of `shape` is rebuilt in: up to _CHUNKS, each at
    least _MIN_REBUILT_CHUNK_BYTES (codes are decoded a plane at a time in any case)."""
    return max(1, min(_CHUNKS, math.prod(shape) * element_size // _MIN_REBUILT_CHUNK_BYTES))


def _batch_chunks(n: int) -> int:
    """How many chunks a batch of n samples runs in over its input (1: not over it)."""
    return max(1, min(_CHUNKS, n // _MIN_CHUNK))


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
        """The whole rebuilt input (B, C, H, W) at once (a linear layer's)."""
        if self.bits is not None:
            return dequantize(*kept, info)
        if not self.pools:
            return kept[0]
        x = upsample(kept[0], self.k, shape[2:])
        if self.residual_bits is not None:  # in place: the upsampled copy is ours
            for samples, residual in dequantize_by_chunk(*kept[1:], info):
                x[samples].add_(residual)
        return x

    def rebuild_by_chunk(self, kept: list[torch.Tensor], info, shape: tuple[int, ...], chunks: int = _CHUNKS):
        """The full-size input (B, C, H, W) the weight gradient is computed from, a batch chunk
        at a time where it is rebuilt: yields (samples, chunk), at most 1/`chunks` of the batch
        each where the codes allow (quantize.dequantize_by_chunk), so the whole rebuilt input is
        never held (at ResNet-18's first stage, batch 128: 8 MiB instead of 32)."""
        if self.bits is not None:
            yield from dequantize_by_chunk(*kept, info, chunks)
        elif self.residual_bits is None:  # pooled (an input kept as is is never rebuilt)
            step = -(-shape[0] // chunks)
            for a in range(0, shape[0], step):
                yield slice(a, a + step), upsample(kept[0][a: a + step], self.k, shape[2:])
        else:
            for samples, residual in dequantize_by_chunk(*kept[1:], info, chunks):
                yield samples, upsample(kept[0][samples], self.k, shape[2:]).add_(residual)


def _input_grad(g, weight, x_shape, stride, padding, dilation, groups):
    """conv2d's input gradient, from the weight and the input's shape only: the transposed
    convolution (the kernel convolution_backward runs: equal to the bit, but for grouped convs
    in channels_last, equal to float32 rounding; tested)."""
    out_pad = [x_shape[2 + a] - ((g.shape[2 + a] - 1) * stride[a] - 2 * padding[a]
                                 + dilation[a] * (weight.shape[2 + a] - 1) + 1) for a in range(2)]
    return F.conv_transpose2d(g, weight, None, stride, padding, out_pad, groups, dilation)


def sampled_grad_in_chunks(n: int) -> bool:
    """Whether a batch of n samples takes its compact input gradient (`_sampled_input_grad`) a
    chunk at a time: a single chunk computes the whole gradient first, and the compact one beside it."""
    return n >= 2 * _MIN_CHUNK


def _sampled_input_grad(g, weight, x_shape, stride, padding, dilation, groups, sampled_shape):
    """A 1x1 conv's input gradient at the pixels it reads (x[:, :, ::s, ::s], shortcut.py): the
    whole gradient's kernel (a compact one of stride 1 picks another oneDNN algorithm on some
    shapes, whose bits differ), run _MIN_CHUNK samples at a time (where the batch is at least
    twice that), each chunk's pixels kept: a small full-size chunk beside the compact result."""
    out = torch.empty(sampled_shape, dtype=g.dtype, device=g.device,
                      memory_format=torch.channels_last if is_channels_last(g) else torch.contiguous_format)
    step = _MIN_CHUNK if sampled_grad_in_chunks(g.shape[0]) else g.shape[0]
    for a in range(0, g.shape[0], step):
        part = g[a: a + step]
        whole = _input_grad(part, weight, (part.shape[0], *x_shape[1:]), stride, padding, dilation, groups)
        out[a: a + step] = whole[:, :, :: stride[0], :: stride[1]]
        del whole
    return out


def _weight_grad(g, x, weight, stride, padding, dilation, groups, tapwise: bool, strides, into=None):
    """conv2d's weight gradient from g and the input x, added into `into` if given: tap by tap
    (weight_grad.py: no weight-sized buffer beside the result) or PyTorch's."""
    if tapwise:
        return tapwise_weight_grad(g, x, weight.shape, stride, padding, dilation, strides, into)
    gw = torch.ops.aten.convolution_backward(g, x, weight, None, list(stride), list(padding), list(dilation), False,
                                             [0, 0], groups, [False, True, False])[1]
    return gw if into is None else into.add_(gw)


def _over_by_chunk(t: torch.Tensor, op) -> torch.Tensor:
    """op(t) written over t, for a per-sample op (a sample's result reads only that sample) giving
    t's shape: a batch chunk at a time, each overwritten once op has read it. The conv's output
    over its input (stride 1, as many channels out as in), its input gradient over its output
    gradient: a chunk beside t instead of a second full-size tensor, the same values."""
    step = -(-t.shape[0] // _batch_chunks(t.shape[0]))
    for a in range(0, t.shape[0], step):
        part = t[a: a + step]
        part.copy_(op(part))
    return t


class CompressedConvFunction(torch.autograd.Function):
    """conv2d whose backward sees only what `form` keeps of its input."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, form: ConvInputForm, in_place=False,
                sampled=None):
        # `sampled`: x's every stride-th pixel (a 1x1 conv without padding, shortcut.py), which
        # takes the input gradient, compact; x itself then gets none.
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
            if in_place:  # the output over x, whose form is kept (CompressedConv2d checks the rest)
                y = _over_by_chunk(x, lambda part: F.conv2d(part, weight, bias, 1, padding, dilation, groups))
                ctx.mark_dirty(x)
            else:
                y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(*kept, weight)
        ctx.conf = (tuple(x.shape), stride, padding, dilation, groups, form, info, bias is not None)
        ctx.sampled_shape = None if sampled is None else tuple(sampled.shape)
        ctx.grad_granted = False  # layout.grant_gradient: y's gradient may be written over
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
        need_w, need_b = ctx.needs_input_grad[1:3]
        sampled = ctx.sampled_shape
        need_x = ctx.needs_input_grad[0] if sampled is None else ctx.needs_input_grad[9]
        g = g.to(weight.dtype)
        blockwise = form.rebuilds_by_upsampling and blockwise_applies(x_shape[2:], stride, form.k)
        w_strides = weight.stride() if is_dense(weight) else None  # the weight's own layout for its gradient
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
        elif form.keeps_input:  # one call gives PyTorch's own three gradients
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g, kept[0].to(weight.dtype), weight, [weight.shape[0]] if has_bias else None, list(stride),
                list(padding), list(dilation), False, [0, 0], groups,
                [need_x and sampled is None, need_w, need_b and has_bias])
        else:
            if need_w:  # summed over batch chunks of the rebuilt input: never the whole of it at once
                tapwise = tapwise_pays(weight.shape, weight.device, x_shape, stride, groups)
                chunks = _rebuild_chunks(x_shape, weight.element_size())
                for samples, x_rec in form.rebuild_by_chunk(kept, info, x_shape, chunks):
                    gw = _weight_grad(g[samples], x_rec.to(weight.dtype), weight, stride, padding, dilation,
                                      groups, tapwise, w_strides, gw)
                    del x_rec
            gb = g.sum((0, 2, 3)) if need_b and has_bias else None
        if need_x and sampled is not None:
            gx = _sampled_input_grad(g, weight, x_shape, stride, padding, dilation, groups, sampled)
        elif need_x and gx is None:
            if (ctx.dtypes is None and tuple(g.shape) == x_shape and _batch_chunks(g.shape[0]) > 1
                    and may_overwrite_grad(ctx, g) and is_dense(g)):
                gx = _over_by_chunk(g, lambda part: _input_grad(part, weight, part.shape, stride, padding, dilation,
                                                                groups))
            else:
                gx = _input_grad(g, weight, x_shape, stride, padding, dilation, groups)
        if ctx.dtypes is not None:
            dx, dw, db = ctx.dtypes
            gx = None if gx is None else gx.to(dx)
            gw = None if gw is None else gw.to(dw)
            gb = None if gb is None else gb.to(db)
        if sampled is not None:
            return None, gw, gb, None, None, None, None, None, None, gx
        return gx, gw, gb, None, None, None, None, None, None, None


class CompressedConv2d(nn.Conv2d):
    """A Conv2d (same parameters and state_dict) that keeps only `pp_form` of its input."""

    pp_form: ConvInputForm = ConvInputForm()
    # the activation whose output only this conv reads, and modules whose hooks could keep that output
    pp_input_from: tuple[nn.Module, ...] = ()

    @torch.compiler.disable  # torch.compile(model): see convert.py
    def forward(self, x, sampled=None):
        """`sampled`: x's every stride-th pixel, to take the input gradient (shortcut.py)."""
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        h, w = x.shape[-2:]
        if self.pp_form.pools and self.pp_form.k > min(h, w):
            raise PolicyError(
                f"K={self.pp_form.k} is larger than the {h}x{w} feature map entering "
                f"{getattr(self, 'pp_name', 'a conv')}; use a smaller K or restrict the policy to earlier stages "
                "(stages=1,2)")
        vouched = (bool(self.pp_input_from) and reads_vouched(self, x)
                   and all(called_plainly(m) for m in (self, *self.pp_input_from)))
        if vouched:
            grant_gradient(x)  # no hook saw x: the gradient this conv hands back is the activation's alone
        return CompressedConvFunction.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                            self.groups, self.pp_form, vouched and self._may_write_over(x), sampled)

    def _may_write_over(self, x) -> bool:
        """Whether the output can take x's place: x a temporary of one of our layers (which keep
        nothing of their outputs; autograd's version check guards the rest), the output of x's
        shape, dtype and layout, and x itself not what the form keeps."""
        kh, kw = self.kernel_size  # padding is a pair of ints here: compress_model refuses "same"/"valid"
        same_shape = (self.in_channels == self.out_channels and tuple(self.stride) == (1, 1)
                      and self.dilation[0] * (kh - 1) == 2 * self.padding[0]
                      and self.dilation[1] * (kw - 1) == 2 * self.padding[1])
        return (same_shape and _batch_chunks(x.shape[0]) > 1 and not self.pp_form.keeps_input
                and hasattr(x.grad_fn, "grad_granted")
                and may_overwrite(x) and x.dtype == self.weight.dtype and not torch.is_autocast_enabled(x.device.type)
                and is_dense(x))

