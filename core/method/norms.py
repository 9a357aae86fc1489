"""BatchNorm keeping its input in a cheaper form for backward (bn16, bn8, bn4, bn2)."""

from __future__ import annotations

import torch
from torch import nn

from .fastpath import fused
from .layout import (
    called_plainly,
    grant_gradient,
    in_memory_order,
    is_channels_last,
    is_dense,
    may_overwrite,
    may_overwrite_grad,
    reads_vouched,
)
from .policy import BN_STORAGE
from .quantize import _decode_pass, dequantize, quantize


@fused
def _bn_keep(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, store: torch.dtype) -> torch.Tensor:
    """x_hat = (x - mean) * invstd in `store` (float8 kept in its range: its casts do not
    saturate): one pass."""
    shape = (1, -1, 1, 1)
    x_hat = (x - mean.view(shape).to(x.dtype)) * invstd.view(shape).to(x.dtype)
    if store == torch.float8_e4m3fn:
        x_hat = x_hat.clamp(-448, 448)
    return x_hat.to(store)


def _bn_sums(g: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_gamma, g_beta) of a training-mode BatchNorm, float32 (x_hat float32)."""
    g = g.float()
    # per sample first, then over the batch: two short sums (compiled, one long running sum in
    # float32 was 5x less accurate than PyTorch's own summation at ResNet-18's first stage)
    return (g * x_hat).sum((2, 3)).sum(0), g.sum((2, 3)).sum(0)


def _bn_input_grad(g, x_hat, weight, invstd, gw, gb) -> torch.Tensor:
    """Its input gradient from those sums, float32."""
    shape = (1, -1, 1, 1)
    n = g.numel() // g.shape[1]
    scale = invstd if weight is None else weight.float() * invstd
    return scale.view(shape) * (g.float() - (gb / n).view(shape) - x_hat * (gw / n).view(shape))


def _bn_grads(g: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor | None, invstd: torch.Tensor):
    """Training-mode BatchNorm backward from x_hat (float32): (gx, g_gamma, g_beta), float32."""
    gw, gb = _bn_sums(g, x_hat)
    return _bn_input_grad(g, x_hat, weight, invstd, gw, gb), gw, gb


@fused
def _bn_backward_from_hat(g: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor | None,
                          invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm's backward reading x_hat as kept (bf16, float8): compiled (and in its Triton
    kernel on CUDA), it is widened in registers, one reduction pass and one output pass, no
    full-size float32 copy."""
    return _bn_grads(g, x_hat.to(torch.float32), weight, invstd)


@fused
def _bn_backward_from_codes(g: torch.Tensor, packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor,
                            shape: tuple[int, ...], channels_last: bool, bits: int, weight: torch.Tensor | None,
                            mean: torch.Tensor, invstd: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same from x's B-bit codes: compiled (and in its Triton kernel on CUDA), decoding is
    fused into the reduction and output passes (x_hat = (lo + code * scale - mean) * invstd in
    registers), so no full-size float32 x is built (at ResNet-18's first stage that was 32 MiB at
    the step peak)."""
    return _bn_grads(g, _hat_of_codes(packed, lo, scale, shape, channels_last, bits, mean, invstd), weight, invstd)


def _hat_of_codes(packed, lo, scale, shape, channels_last, bits, mean, invstd) -> torch.Tensor:
    x = _decode_pass.reference(packed, lo, scale, shape, channels_last, bits, torch.float32)
    view = (1, -1, 1, 1)
    return (x - mean.view(view)) * invstd.view(view)


@fused
def _bn_backward_from_hat_(g: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor | None,
                           invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_bn_backward_from_hat with the input gradient written over g (g in x_hat's layout): its
    reductions read g before anything is written, compiled (or in its Triton kernel) the output
    pass then stores into g. -> (g, g_gamma, g_beta)."""
    gx, gw, gb = _bn_grads(g, x_hat.to(torch.float32), weight, invstd)
    g.copy_(gx)
    return g, gw, gb


@fused
def _bn_backward_from_codes_(g: torch.Tensor, packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor,
                             shape: tuple[int, ...], channels_last: bool, bits: int, weight: torch.Tensor | None,
                             mean: torch.Tensor, invstd: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_bn_backward_from_codes with the input gradient written over g (as above). Compiled as
    two graphs, the sums and then the output, each decoding the codes in registers: in one graph
    inductor keeps the decoded x for both passes, a full-size buffer."""
    x_hat = _hat_of_codes(packed, lo, scale, shape, channels_last, bits, mean, invstd)
    gw, gb = _bn_sums(g, x_hat)
    if torch.compiler.is_compiling():  # decoded again in the second graph (the reference decodes once)
        del x_hat
        torch._dynamo.graph_break()
        x_hat = _hat_of_codes(packed, lo, scale, shape, channels_last, bits, mean, invstd)
    g.copy_(_bn_input_grad(g, x_hat, weight, invstd, gw, gb))
    return g, gw, gb


def _stats_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    """The dtype native_batch_norm gives its saved mean and invstd: on the CPU x's own unless a
    reduced-precision x meets float32 parameters; on CUDA float32 at least."""
    if x.device.type == "cpu" and (weight is None or weight.dtype == x.dtype):
        return x.dtype
    return torch.promote_types(x.dtype, torch.float32)


class LowPrecisionBNFunction(torch.autograd.Function):
    """Training-mode BN that keeps its input in `store` form for backward: x_hat =
    (x - mean) * invstd as a dtype (bfloat16, float8), or x itself as B-bit codes (an int).

    x_hat has unit variance per channel, which suits bf16/float8 far better than raw x. The
    codes need no such care: their range is per (sample, channel) already, and x_hat is affine
    in x per channel, so coding x itself stores the same information with two passes fewer.
    Exact: beta's gradient. Approximate (rounding): gamma's and the input gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, store, in_place=False):
        info = None
        if isinstance(store, int):
            packed, lo, scale, info = quantize(x, store)
            kept = [packed, lo, scale]
        elif in_place:  # x is overwritten below: x_hat from statistics of its own (float32 stats)
            acc = torch.promote_types(x.dtype, torch.float32)
            mean, var = torch.ops.aten.batch_norm_update_stats(
                x, x.new_zeros(x.shape[1], dtype=acc), x.new_ones(x.shape[1], dtype=acc), momentum)
            kept = [_bn_keep(x, mean, torch.rsqrt(var + eps), store)]
        if in_place:
            # The output overwrites x (the model vouched nothing else reads it): native_batch_norm
            # has all its statistics before it writes, then writes element by element, so the
            # output is the same bits as out of place, and the forward holds one tensor fewer.
            stats = _stats_dtype(x, weight)
            mean, invstd = x.new_empty(0, dtype=stats), x.new_empty(0, dtype=stats)
            torch.ops.aten.native_batch_norm.out(x, weight, bias, running_mean, running_var, True, momentum, eps,
                                                 out=x, save_mean=mean, save_invstd=invstd)
            ctx.mark_dirty(x)
            out = x
        else:
            out, mean, invstd = torch.ops.aten.native_batch_norm(
                x, weight, bias, running_mean, running_var, True, momentum, eps)
            if info is None:
                kept = [_bn_keep(x, mean, invstd, store)]
        ctx.save_for_backward(*kept, weight, mean, invstd)
        ctx.conf = (x.dtype, info)
        ctx.grad_granted = False  # layout.grant_gradient: the output's gradient may be written over
        return out

    @staticmethod
    def backward(ctx, g):
        *kept, weight, mean, invstd = ctx.saved_tensors
        dtype, info = ctx.conf
        # over g where granted and g has the kept input's layout and x's dtype (else the same out of place)
        cl = info.channels_last if info is not None else is_channels_last(kept[0])
        over = may_overwrite_grad(ctx, g) and g.dtype == dtype and g.dim() == 4 and in_memory_order(g, cl)
        if info is not None:
            backward = _bn_backward_from_codes_ if over else _bn_backward_from_codes
            gx, gw, gb = backward(g, *kept, info.shape, info.channels_last, info.bits, weight, mean, invstd)
        else:
            gx, gw, gb = (_bn_backward_from_hat_ if over else _bn_backward_from_hat)(g, kept[0], weight, invstd)
        if weight is None:
            gw = gb = None
        else:
            gw, gb = gw.to(weight.dtype), gb.to(weight.dtype)
        return gx.to(dtype), gw, gb, None, None, None, None, None, None


class LowPrecisionBatchNorm2d(nn.BatchNorm2d):
    """In place where the model vouches that its input is a temporary nothing else reads
    (`pp_inplace`, set by compress_model): keeping only its own form of x, it may then write its
    output over x, and the forward holds one full-size tensor fewer at a time."""

    pp_store: str = "bn16"
    pp_inplace: bool = False
    pp_input_from: tuple[nn.Module, ...] = ()  # the conv that made x, and modules whose hooks could keep x

    @torch.compiler.disable  # torch.compile(model): see convert.py
    def forward(self, x):
        if not (self.training and torch.is_grad_enabled() and x.requires_grad and self.track_running_stats):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        in_place = (self.pp_inplace and reads_vouched(self, x) and all(called_plainly(m) for m in self.pp_input_from)
                    and not self._forward_pre_hooks and not x.is_leaf and may_overwrite(x)
                    and is_dense(x))
        if in_place and called_plainly(self):  # x is overwritten and no hook here kept a gradient:
            grant_gradient(x)  # what this norm's backward hands the conv is the conv's alone
        return LowPrecisionBNFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                            momentum, self.eps, BN_STORAGE[self.pp_store], in_place)



def _keep(x: torch.Tensor, x_hat, store):
    """What a norm keeps: x as B-bit codes (store an int), or its normalised x_hat (a callable
    giving it) cast to the dtype `store`. -> (tensors to save, info for dequantize or None)."""
    if isinstance(store, int):
        packed, lo, scale, info = quantize(x, store)
        return [packed, lo, scale], info
    xh = x_hat()
    if store == torch.float8_e4m3fn:  # float8 casts are not saturating: keep in range
        xh = xh.clamp(-448, 448)
    return [xh.to(store)], None


def _rebuild(kept, info, from_hat) -> torch.Tensor:
    if info is not None:
        return dequantize(*kept, info)
    return from_hat(kept[0].to(torch.float32))


class LowPrecisionLayerNormFunction(torch.autograd.Function):
    """LayerNorm over the last dims keeping its input in `store` form (as BatchNorm above)."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, store):
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
        kept, info = _keep(x, lambda: (x - mean) * rstd, store)
        ctx.save_for_backward(*kept, weight, bias, mean, rstd)
        ctx.conf = (x.dtype, tuple(normalized_shape), info)
        return out

    @staticmethod
    def backward(ctx, g):
        *kept, weight, bias, mean, rstd = ctx.saved_tensors
        dtype, normalized_shape, info = ctx.conf
        x = _rebuild(kept, info, lambda xh: xh / rstd + mean).to(dtype)
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            g.contiguous(), x.contiguous(), list(normalized_shape), mean, rstd, weight, bias,
            [need[0], need[2] and weight is not None, need[3] and bias is not None])
        return gx, None, gw, gb, None, None


class LowPrecisionGroupNormFunction(torch.autograd.Function):
    """GroupNorm keeping its input in `store` form (as BatchNorm above)."""

    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps, store):
        n, c = x.shape[:2]
        hw = x[0, 0].numel()
        out, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, hw, groups, eps)

        def x_hat():
            return ((x.reshape(n, groups, -1) - mean[..., None]) * rstd[..., None]).reshape(x.shape)

        kept, info = _keep(x, x_hat, store)
        ctx.save_for_backward(*kept, weight, mean, rstd)
        ctx.conf = (x.dtype, tuple(x.shape), groups, info)
        return out

    @staticmethod
    def backward(ctx, g):
        *kept, weight, mean, rstd = ctx.saved_tensors
        dtype, shape, groups, info = ctx.conf
        n, c = shape[:2]

        def from_hat(xh):
            return (xh.reshape(n, groups, -1) / rstd[..., None] + mean[..., None]).reshape(shape)

        x = _rebuild(kept, info, from_hat).to(dtype)
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            g.contiguous(), x.contiguous(), mean, rstd, weight, n, c, x[0, 0].numel(), groups,
            [need[0], need[2] and weight is not None, need[3] and weight is not None])
        return gx, None, gw, gb, None, None


class _LowPrecisionNorm:
    """Mixin for nn.LayerNorm (and torchvision's LayerNorm2d, which normalises NCHW over C) and
    nn.GroupNorm: the same forward, the input kept in `pp_store` form."""

    pp_store: str = "bn16"

    @torch.compiler.disable  # torch.compile(model): see convert.py
    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        store = BN_STORAGE[self.pp_store]
        if isinstance(self, nn.GroupNorm):
            return LowPrecisionGroupNormFunction.apply(x, self.num_groups, self.weight, self.bias, self.eps, store)
        if getattr(self, "pp_channels_first", False):  # LayerNorm2d: (N, C, H, W) normalised over C
            y = LowPrecisionLayerNormFunction.apply(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight,
                                                    self.bias, self.eps, store)
            return y.permute(0, 3, 1, 2)
        return LowPrecisionLayerNormFunction.apply(x, self.normalized_shape, self.weight, self.bias, self.eps, store)
