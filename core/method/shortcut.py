"""A downsampling block's shortcut, whose input gradient is kept compact.

A 1x1 conv of stride s reads every s-th pixel of its input only, as does option A's subsampling
(ResNet-20's shortcut), so its input gradient is zero elsewhere; autograd would still hand it back
full-size, to be added to the main branch's. At ResNet-18's second stage (batch 128) that is a
32 MiB tensor, three quarters zeros, beside the main branch's input gradient until autograd sums
the two: the compressed policies' step peak (at ResNet-20's, 8 MiB and its 4 MiB half-way copy).

Here the block's input fans out once (`_FanOut`): the main branch reads it as is, the shortcut
its every s-th pixel, to which its backward hands the compact gradient (1/s² of the size);
the fan-out's backward adds that into the main branch's gradient at those pixels, in place where
the gradient is its alone. The same sums as autograd's (each element one addition): the same bits.
"""

from __future__ import annotations

import torch
from torch import nn

from .conv import CompressedConv2d, sampled_grad_in_chunks
from .layout import called_plainly, in_vouched_forward, is_dense, may_overwrite_grad


class _FanOut(torch.autograd.Function):
    """x -> (x, x[:, :, ::s, ::s]); backward: the first gradient with the second added at those pixels."""

    @staticmethod
    def forward(ctx, x, s: int, granted: bool):
        ctx.s, ctx.grad_granted = s, granted
        return x.view_as(x), x[:, :, ::s, ::s]

    @staticmethod
    def backward(ctx, g_main, g_sampled):
        if not (may_overwrite_grad(ctx, g_main) and is_dense(g_main)):
            g_main = g_main.clone()  # kept by someone (or a graph of the backward is built)
        g_main[:, :, :: ctx.s, :: ctx.s] += g_sampled
        return g_main, None, None


def _strided_shortcut_conv(downsample: nn.Module | None) -> CompressedConv2d | None:
    """The compressed conv of a (1x1 conv of stride > 1, norm) shortcut, or None."""
    if not (isinstance(downsample, nn.Sequential) and len(downsample) == 2):
        return None
    conv = downsample[0]
    if (isinstance(conv, CompressedConv2d) and conv.kernel_size == (1, 1)
            and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1)
            and conv.stride[0] == conv.stride[1] > 1):
        return conv
    return None


def _subsampling_shortcut(downsample: nn.Module) -> bool:
    """A parameter-free shortcut that reads x[:, :, ::s, ::s] only and says so
    (`forward_sampled(sampled)` and `stride`: He et al.'s option A)."""
    return hasattr(downsample, "forward_sampled") and getattr(downsample, "stride", 1) > 1


def shortcut_and_main_input(x: torch.Tensor, downsample: nn.Module | None, main_conv: nn.Module):
    """-> (the shortcut's output, the tensor the main branch reads), for a residual block whose
    main branch begins with `main_conv`. Inside a model's own forward (layout.vouched_forward),
    with a shortcut that reads every s-th pixel only (a compressed strided 1x1 conv, or option A's
    subsampling) and nothing hooked on it or the main conv, the shortcut's input gradient stays
    compact (see the module docstring), and the block may let its input go at once; otherwise
    the plain calls, the shortcut first. Except (None, x) for such a conv and a batch of one chunk
    (`sampled_grad_in_chunks`: its compact gradient would be built beside the whole one): the
    block then calls the shortcut after its main branch, as torchvision orders it, so that
    autograd runs the shortcut's backward first and lets the block output's gradient go sooner
    (torchvision's ResNet-50 at batch 8, 224 px: 3-10 MiB lower than with the shortcut first)."""
    if downsample is None:
        return x, x
    conv = _strided_shortcut_conv(downsample)
    subsamples = conv is None and _subsampling_shortcut(downsample)
    grad = torch.is_grad_enabled() and x.requires_grad
    if conv is not None and grad and not sampled_grad_in_chunks(x.shape[0]):
        return None, x
    if (not (conv is not None or subsamples) or not grad or x.dim() != 4 or not in_vouched_forward()
            or not all(called_plainly(m) for m in (downsample, main_conv, *([conv] if conv is not None else [])))):
        return downsample(x), x
    # main_conv, called plainly, hands back a gradient nothing else holds: granted
    main, sampled = _FanOut.apply(x, downsample.stride if subsamples else conv.stride[0], True)
    if subsamples:
        return downsample.forward_sampled(sampled), main
    return downsample[1](conv(main, sampled=sampled)), main
