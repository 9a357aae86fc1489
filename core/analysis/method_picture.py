"""The method in one picture: what one conv keeps for backward, for one image."""

from __future__ import annotations

import torch
from torch import nn

from ..method import pooling
from ..method.masks import pack_mask
from .layers import eval_mode


def method_picture(model, conv_name: str, x: torch.Tensor, k: int, pool: str = "avg", channel: int = 0) -> dict:
    """For one image, the input of conv `conv_name` as the forward pass uses it, the K-pooled
    copy a compressed conv keeps for backward, and what backward rebuilds from it (nearest
    upsampling), with the bytes each takes per image (fp32; the mask is the 1-bit ReLU mask).

    Pooling and upsampling are core.method's own functions, the ones training uses.
    Raises ValueError when K does not fit the layer's feature map.
    """
    module = dict(model.named_modules()).get(conv_name)
    if not isinstance(module, nn.Conv2d):
        raise ValueError(f"{conv_name!r} is not a conv layer of this model")
    seen: dict[str, torch.Tensor] = {}
    handle = module.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach()))
    try:
        with eval_mode(model), torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    a = seen["x"][0].float()  # (C, H, W)
    c, h, w = a.shape
    if k > min(h, w):
        raise ValueError(f"K={k} is larger than the {h}x{w} feature map entering {conv_name}; pick a smaller K")
    channel = int(min(max(channel, 0), c - 1))
    pooled = pooling.pool(a[None], pool, k)[0]  # (C, ceil(H/k), ceil(W/k))
    restored = pooling.upsample(pooled[None], k, (h, w))[0]  # (C, H, W)
    after_relu = bool((a >= 0).all())
    rel = float((restored - a).norm() / a.norm().clamp_min(1e-12))
    return {"layer": conv_name, "shape": (c, h, w), "k": k, "pool": pool, "channel": channel,
            "activation": a[channel].numpy(), "pooled": pooled[channel].numpy(),
            "restored": restored[channel].numpy(), "rel_error": rel,
            "bytes": {"full": a.numel() * 4, "pooled": pooled.numel() * 4,
                      "mask": pack_mask(a[None] > 0).numel() if after_relu else None}}
