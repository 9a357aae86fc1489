"""Which feature-map sizes a model's convs see, and where a pooling K does not fit.

Pooling by K needs feature maps of at least K x K. A policy is checked against a model before
anything trains (the Train page, `core train`'s dry run, the fidelity sweep) with one no-grad
forward of a single image, instead of failing mid-epoch.
"""

from __future__ import annotations

import torch
from torch import nn

from .policy import CompressionPolicy, in_scope
from .snapshot import preserved


def conv_input_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) entering each Conv2d, from one eval-mode, no-grad forward of x[:1]."""
    shapes: dict[str, tuple[int, int, int]] = {}
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: shapes.__setitem__(n, tuple(args[0].shape[1:])))
               for n, m in convs]
    try:
        with preserved(model, grads=False, policy=False), torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in handles:
            h.remove()
    return shapes


def pooled_convs(model: nn.Module, policy: CompressionPolicy) -> set[str]:
    """The convs `policy` would pool in `model` (a squeeze-excitation's are never pooled)."""
    from .conv import ConvInputForm
    from .convert import compressed

    if policy.pool is None or policy.k == 1:
        return set()
    with compressed(model, policy):
        return {n for n, m in model.named_modules() if isinstance(getattr(m, "pp_form", None), ConvInputForm)
                and m.pp_form.pools and isinstance(m, nn.Conv2d)}


def too_small_for_k(policy: CompressionPolicy, shapes: dict[str, tuple[int, int, int]],
                    pooled: set[str] | None = None) -> list[str]:
    """The convs `policy` pools (in its scope, or those in `pooled`) whose feature map is
    smaller than K, in order."""
    if policy.pool is None or policy.k == 1:
        return []
    stem = next(iter(shapes), None)
    return [n for n, (_c, h, w) in shapes.items() if (in_scope(n, policy, stem) if pooled is None else n in pooled)
            and min(h, w) < policy.k]
