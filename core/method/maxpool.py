"""Max pooling keeping only where each maximum came from (exact).

nn.MaxPool2d keeps its whole input for backward, beside the indices of the maxima; the
backward needs only the indices (and the input's shape). After a masked ReLU nobody else
keeps that input (torchvision's ResNet stem: 64 x 112 x 112 per image), so keeping the
indices alone, as int32, is most of the saving there.

The backward scatters the gradient into a zero tensor of the input's layout (NCHW, or NHWC for
channels_last: no full-size copy to change it afterwards) a few samples at a time, so that the
int64 indices scatter_add_ wants exist for a chunk only. On the CPU each input element receives
its gradients in the order of the output positions, as in PyTorch's own backward: the same bits
(on CUDA scatter_add_ adds with atomics, in no fixed order: float32 rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import called_plainly, grant_gradient, is_channels_last, reads_vouched

_CHUNK_ELEMENTS = 2 ** 18  # int64 indices alive at a time in the backward (2 MiB)


def _planes(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H*W), or (N, H*W, C) for channels_last: a view where t has that layout."""
    n, c = t.shape[:2]
    return t.permute(0, 2, 3, 1).reshape(n, -1, c) if channels_last else t.reshape(n, c, -1)


class IndicesMaxPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        y, idx = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        ctx.conf = (tuple(x.shape), is_channels_last(x))
        ctx.save_for_backward(idx.to(torch.int32) if x[0, 0].numel() < 2 ** 31 else idx)
        return y

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        (n, c, h, w), channels_last = ctx.conf
        spatial = 1 if channels_last else 2  # the dimension the flat h*w indices point along
        gx = g.new_zeros((n, h * w, c) if channels_last else (n, c, h * w))
        idx, g = _planes(idx, channels_last), _planes(g, channels_last)
        step = max(1, _CHUNK_ELEMENTS // max(1, idx[0].numel()))
        for i in range(0, n, step):
            gx[i:i + step].scatter_add_(spatial, idx[i:i + step].long(), g[i:i + step])
        gx = gx.view(n, h, w, c).permute(0, 3, 1, 2) if channels_last else gx.view(n, c, h, w)
        return gx, *([None] * 5)


class IndicesMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d keeping only the argmax indices for backward. Where the model vouches that it
    alone reads the activation before it (`pp_input_from`, set by compress_model), its backward's
    fresh gradient is the activation's alone, whose backward may then write over it
    (layout.grant_gradient): a full-size tensor fewer at the ImageNet stem."""

    pp_input_from: tuple[nn.Module, ...] = ()

    @torch.compiler.disable  # torch.compile(model): see convert.py
    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad and x.dim() == 4 and not self.return_indices:
            if (self.pp_input_from and reads_vouched(self, x)
                    and all(called_plainly(m) for m in (self, *self.pp_input_from))):
                grant_gradient(x)
            return IndicesMaxPoolFunction.apply(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                                self.ceil_mode)
        return super().forward(x)
