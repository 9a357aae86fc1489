"""The compressed Linear layer: exact forward, a weight gradient from what it kept.

Its input as B-bit codes (qB: per sample, or per token for (N, L, C) inputs); or, for the
(N, H, W, C) inputs of pointwise layers inside conv nets (ConvNeXt's MLP), pooled over H and
W exactly as a 1x1 conv's input would be (avgK, maxK, avgK+resB). A plain (N, F) input under
a pooling policy has nothing to pool: it stays exact (and the meter shows its bytes), as do
tokens (`pp_tokens`: MaxViT's attention sees (N, windows, tokens, C), not a feature map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import ConvInputForm
from .policy import PolicyError


def keeps_something_else(form: ConvInputForm, x: torch.Tensor, tokens: bool = False) -> bool:
    return form.bits is not None or (form.pools and x.dim() == 4 and not tokens)


class CompressedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, form: ConvInputForm):
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # cast like autocast would, then run plainly
            dt = torch.get_autocast_dtype(dev)
            x, weight, bias = x.to(dt), weight.to(dt), None if bias is None else bias.to(dt)
        with torch.autocast(dev, enabled=False):
            y = F.linear(x, weight, bias)
        spatial = x.dim() == 4 and form.bits is None  # (N, H, W, C): keep it as the (N, C, H, W) a conv would
        view = x.permute(0, 3, 1, 2) if spatial else x
        kept, info = form.keep(view)
        ctx.save_for_backward(*kept, weight)
        ctx.conf = (tuple(view.shape), spatial, form, info, bias is not None)
        return y

    @staticmethod
    def backward(ctx, g):
        *kept, weight = ctx.saved_tensors
        view_shape, spatial, form, info, has_bias = ctx.conf
        g = g.to(weight.dtype)
        x = form.rebuild(kept, info, view_shape)
        if spatial:
            x = x.permute(0, 2, 3, 1)
        g2 = g.reshape(-1, g.shape[-1])
        gx = g @ weight if ctx.needs_input_grad[0] else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class CompressedLinear(nn.Linear):
    """An nn.Linear (same parameters and state_dict) that keeps only `pp_form` of its input."""

    pp_form: ConvInputForm = ConvInputForm()
    pp_tokens: bool = False  # a 4-d input is (N, windows, tokens, C): nothing to pool

    @torch.compiler.disable  # torch.compile(model): see convert.py
    def forward(self, x):
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) or \
                not keeps_something_else(self.pp_form, x, self.pp_tokens):
            return super().forward(x)
        if self.pp_form.pools and x.dim() == 4 and self.pp_form.k > min(x.shape[1:3]):
            raise PolicyError(f"K={self.pp_form.k} is larger than the {x.shape[1]}x{x.shape[2]} feature map entering "
                              f"{getattr(self, 'pp_name', 'a linear layer')}; use a smaller K or restrict the policy")
        return CompressedLinearFunction.apply(x, self.weight, self.bias, self.pp_form)
