"""Max pooling keeping only where each maximum came from (exact).

nn.MaxPool2d keeps its whole input for backward, beside the indices of the maxima; the
backward needs only the indices (and the input's shape). After a masked ReLU nobody else
keeps that input (torchvision's ResNet stem: 64 x 112 x 112 per image), so keeping the
indices alone, as int32, is most of the saving there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import is_channels_last


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
        gx = g.new_zeros(n, c, h * w)
        gx.scatter_add_(2, idx.reshape(n, c, -1).long(), g.reshape(n, c, -1))
        gx = gx.view(n, c, h, w)
        return (gx.contiguous(memory_format=torch.channels_last) if channels_last else gx), *([None] * 5)


class IndicesMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d keeping only the argmax indices for backward."""

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad and x.dim() == 4 and not self.return_indices:
            return IndicesMaxPoolFunction.apply(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                                self.ceil_mode)
        return super().forward(x)
