"""Exact vs compressed gradients of one batch, layer by layer.

For the same weights and batch, every conv's weight gradient is computed twice: exactly
(plain autograd) and as training under a policy sees it. The trainer records cosine and
relative error every few hundred steps (`layer_fidelity`); core.analysis.fidelity builds its
tables and sweeps from the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .convert import compressed, decompress_model
from .policy import CompressionPolicy
from .snapshot import preserved

METRICS = ("cosine", "rel_error", "sign_agreement", "projection", "norm_ratio")


def trainable_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    if not convs:
        raise ValueError("the model has no Conv2d with a trainable weight")
    return convs


def _random_layers_off(model: nn.Module) -> None:
    """Dropout and stochastic depth to eval mode (BatchNorm stays in train mode): the exact and
    the compressed pass must drop the same units, or the comparison measures dropout's noise."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "StochasticDepth":
            m.eval()


def gradients(model: nn.Module, convs, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable
              ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """Conv weight gradients and the input gradient of one forward+backward, in float32
    (autocast off: the comparison is of the method, not of mixed precision), with dropout off."""
    xi = x.detach().requires_grad_(True)
    _random_layers_off(model)
    with torch.autocast(x.device.type, enabled=False):
        out = model(xi)
        loss = loss_fn(out, y)
    grads = torch.autograd.grad(loss, [xi] + [m.weight for _, m in convs], allow_unused=True)
    return list(grads[1:]), grads[0]


def compare(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(5,) float64 tensor, in METRICS order: cosine, relative error ||a - e|| / ||e||, sign
    agreement, projection <a, e> / ||e||^2, norm ratio ||a|| / ||e||."""
    a, e = approx.detach().double().flatten(), exact.detach().double().flatten()
    ee, ae, aa = e.dot(e), a.dot(e), a.dot(a)
    cos = ae / (aa.sqrt() * ee.sqrt()).clamp_min(1e-300)
    rel = (a - e).norm() / ee.sqrt().clamp_min(1e-300)
    sign = (torch.sign(a) == torch.sign(e)).double().mean()
    proj = ae / ee.clamp_min(1e-300)
    norm = aa.sqrt() / ee.sqrt().clamp_min(1e-300)
    return torch.stack([cos, rel, sign, proj, norm])


def layer_fidelity(model: nn.Module, policy, x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> list[dict]:
    """Per conv layer: cosine and relative error of the compressed weight gradient vs the exact
    one, on this batch in train mode. The model is left as it came (statistics, `.grad`, mode,
    policy). Returns [{"name", "cosine", "rel_error"}] in module order."""
    policy = CompressionPolicy.parse(policy)
    loss_fn = loss_fn or F.cross_entropy
    convs = trainable_convs(model)
    with preserved(model):
        model.train()
        with compressed(model, policy):
            approx, _ = gradients(model, convs, x, y, loss_fn)
        decompress_model(model)
        exact, _ = gradients(model, convs, x, y, loss_fn)
    rows = [(name, compare(a, e)[:2]) for (name, _), a, e in zip(convs, approx, exact)
            if a is not None and e is not None]
    values = torch.stack([v for _, v in rows]).tolist() if rows else []  # one device sync
    return [{"name": n, "cosine": round(c, 6), "rel_error": round(r, 6)} for (n, _), (c, r) in zip(rows, values)]
