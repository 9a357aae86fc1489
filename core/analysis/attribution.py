"""Which input pixels a model's decision rests on: Captum attributions, and how much two
models (say a baseline and a pooled-backprop run) agree about them.

Every method here is Captum's; this file only picks sensible defaults, reduces the
(B, 3, H, W) attributions to one (B, H, W) map per image, and compares models. Calls run
in eval mode (every module's train/eval flag is restored afterwards); Captum computes input
gradients with `torch.autograd.grad`, so parameter `.grad` fields are never written; the
only hooks (LayerGradCam's, on one layer) are removed by Captum before it returns, which
tests/test_attribution.py checks on every submodule.

Channel reduction (the default per method, `reduce=` overrides it):
    saliency              |d logit / d x| (Captum abs=True), summed over RGB       >= 0
    integrated_gradients  signed, summed over RGB: the map sums to F(x) - F(baseline) signed
    gradient_shap         signed, summed over RGB (expected-gradients estimate)    signed
    gradcam               one channel already (ReLU'd Grad-CAM of a block, upsampled) >= 0
    occlusion             drop in the target logit when a patch is zeroed; the same
                          for every channel, so the channel mean                   signed
Baselines are zeros in the model's *normalised* input space, i.e. the dataset-mean image.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np
import torch
from captum.attr import (
    GradientShap,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Occlusion,
    Saliency,
)
from torch import nn

from .layers import eval_mode, layer_names

METHODS = ("saliency", "integrated_gradients", "gradient_shap", "gradcam", "occlusion")
REDUCTIONS = ("sum", "abs_sum", "mean", "none")
_DEFAULT_REDUCE = {"saliency": "sum", "integrated_gradients": "sum", "gradient_shap": "sum",
                   "gradcam": "sum", "occlusion": "mean"}


def default_gradcam_layer(model: nn.Module) -> str:
    """The last residual block (its output is the last conv feature map before the head)."""
    blocks = layer_names(model, "block")
    if not blocks:
        convs = layer_names(model, "conv")
        if not convs:
            raise ValueError("model has no conv layer for Grad-CAM")
        return convs[-1]
    return blocks[-1]


def _reduce(attr: torch.Tensor, how: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W)."""
    if how == "sum":
        return attr.sum(1)
    if how == "abs_sum":
        return attr.abs().sum(1)
    if how == "mean":
        return attr.mean(1)
    if how == "none":
        if attr.shape[1] != 1:
            raise ValueError("reduce='none' needs a one-channel attribution")
        return attr[:, 0]
    raise ValueError(f"unknown reduce {how!r}; use one of {', '.join(REDUCTIONS)}")


def _targets(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    if target is None:
        with torch.no_grad():
            return model(x.detach()).argmax(1)
    if isinstance(target, int):
        return torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    return torch.as_tensor(target, dtype=torch.long, device=x.device).reshape(-1)


def attribute(model: nn.Module, x: torch.Tensor, target=None, method: str = "integrated_gradients", *,
              reduce: str | None = None, baseline: torch.Tensor | None = None, n_steps: int = 32,
              internal_batch_size: int | None = 256, n_samples: int = 16, stdevs: float = 0.1, seed: int = 0,
              layer: str | None = None, relu_attributions: bool = True, interpolate_mode: str = "bilinear",
              window: int = 8, stride: int = 4, perturbations_per_eval: int = 64, return_delta: bool = False):
    """Attribution maps (B, H, W) of `target` (class per image; None = the model's own
    prediction) for a normalised batch x (B, 3, H, W), on x's device, detached.

    method: saliency | integrated_gradients (n_steps, baseline, internal_batch_size) |
    gradient_shap (n_samples, stdevs, baseline distribution: zeros + seeded noise, seed) |
    gradcam (layer name, default the last block; relu_attributions; upsampled to H x W by
    LayerAttribution.interpolate with interpolate_mode) | occlusion (window x window
    patches over all channels at `stride`, replaced by the baseline 0; 8 and 4 by default:
    49 patches for 32x32, about as fast as integrated gradients; 4 and 2 is finer, 4.5x slower).
    return_delta=True (integrated_gradients, gradient_shap) also returns Captum's
    convergence delta per image: sum of attributions - (F(x) - F(baseline)).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if return_delta and method not in ("integrated_gradients", "gradient_shap"):
        raise ValueError("return_delta is only defined for integrated_gradients and gradient_shap")
    reduce = reduce or _DEFAULT_REDUCE[method]
    # Captum needs requires_grad on its inputs: set it on a copy, never on the caller's tensor.
    x = x.detach().clone().requires_grad_(method != "occlusion")
    delta = None
    with eval_mode(model):
        tgt = _targets(model, x, target)
        if method == "saliency":
            attr = Saliency(model).attribute(x, target=tgt, abs=True)
        elif method == "integrated_gradients":
            base = torch.zeros_like(x) if baseline is None else baseline.to(x)
            out = IntegratedGradients(model).attribute(
                x, baselines=base, target=tgt, n_steps=n_steps, internal_batch_size=internal_batch_size,
                return_convergence_delta=return_delta)
            attr, delta = out if return_delta else (out, None)
        elif method == "gradient_shap":
            if baseline is None:
                gen = torch.Generator().manual_seed(seed)
                noise = torch.randn((3, *x.shape[1:]), generator=gen).to(x) * 0.5
                baseline = torch.cat([torch.zeros_like(x[:1]), noise])
            # Captum draws from torch's and numpy's global RNGs: seed both, restore both.
            np_state = np.random.get_state()
            try:
                with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                    torch.manual_seed(seed)
                    np.random.seed(seed)
                    out = GradientShap(model).attribute(
                        x, baselines=baseline.to(x), target=tgt, n_samples=n_samples, stdevs=stdevs,
                        return_convergence_delta=return_delta)
            finally:
                np.random.set_state(np_state)
            attr, delta = out if return_delta else (out, None)
        elif method == "gradcam":
            name = layer or default_gradcam_layer(model)
            cam = LayerGradCam(model, model.get_submodule(name)).attribute(
                x, target=tgt, relu_attributions=relu_attributions)  # (B, 1, h, w)
            attr = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode=interpolate_mode)
        else:  # occlusion
            c = x.shape[1]
            attr = Occlusion(model).attribute(
                x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride), target=tgt,
                baselines=0.0, perturbations_per_eval=perturbations_per_eval)
    maps = _reduce(attr.detach(), reduce)
    if return_delta:
        return maps, delta.detach()
    return maps


# ---------------------------------------------------------------------------------------
# Agreement between maps
# ---------------------------------------------------------------------------------------

def _rankdata(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their ranks), 1-based, like scipy.stats.rankdata."""
    sorter = np.argsort(a, kind="mergesort")
    inv = np.empty_like(sorter)
    inv[sorter] = np.arange(a.size)
    s = a[sorter]
    first = np.r_[True, s[1:] != s[:-1]]
    dense = np.cumsum(first)[inv]
    bounds = np.r_[np.nonzero(first)[0], a.size]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(a, b) -> float:
    """Spearman rank correlation of two maps (flattened); NaN when either is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    ra, rb = _rankdata(a), _rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def topk_iou(a, b, k: float = 10.0) -> float:
    """Intersection over union of the top k% pixels of two maps (ties broken by position)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    n = max(1, int(round(k / 100.0 * a.size)))
    ta = set(np.argsort(-a, kind="stable")[:n].tolist())
    tb = set(np.argsort(-b, kind="stable")[:n].tolist())
    return len(ta & tb) / len(ta | tb)


def compare_models(models: Mapping[str, nn.Module], x: torch.Tensor, method: str = "integrated_gradients",
                   targets=None, k: float = 10.0, use_abs: bool = True, **kw) -> dict:
    """Attribute the same images with several models and measure how much they agree.

    targets: class per image (ideally the true labels); None = the *first* model's
    predictions, so every model's map explains the same class. Agreement is computed per
    image for every pair of models on |map| (use_abs=True: "which pixels matter", whatever
    the sign): Spearman rank correlation and IoU of the top k% pixels.

    Returns {"method", "names", "targets" (B,), "attributions" {name: (B, H, W) tensor},
    "predictions" {name: {"class": (B,) long, "confidence": (B,) float, "probs": (B, K)}},
    "agreement" {(a, b): {"spearman": (B,) array, "topk_iou": (B,) array}}, "k",
    "seconds" {name: wall seconds of the attribution}}.
    """
    names = list(models)
    if not names:
        raise ValueError("compare_models needs at least one model")
    predictions = {}
    for name, model in models.items():
        with eval_mode(model), torch.no_grad():
            probs = torch.softmax(model(x).float(), 1)
        conf, cls = probs.max(1)
        predictions[name] = {"class": cls, "confidence": conf, "probs": probs}
    tgt = predictions[names[0]]["class"] if targets is None else _targets(models[names[0]], x, targets)
    attributions, seconds = {}, {}
    for name, model in models.items():
        t0 = time.perf_counter()
        attributions[name] = attribute(model, x, tgt, method, **kw)
        seconds[name] = time.perf_counter() - t0
    agreement = {}
    for a, b in combinations(names, 2):
        ma = attributions[a].float().cpu().numpy()
        mb = attributions[b].float().cpu().numpy()
        if use_abs:
            ma, mb = np.abs(ma), np.abs(mb)
        agreement[(a, b)] = {
            "spearman": np.array([spearman(ma[i], mb[i]) for i in range(len(ma))]),
            "topk_iou": np.array([topk_iou(ma[i], mb[i], k) for i in range(len(ma))]),
        }
    return {"method": method, "names": names, "targets": tgt, "attributions": attributions,
            "predictions": predictions, "agreement": agreement, "k": k, "seconds": seconds}


def agreement_matrix(result: dict, metric: str = "spearman") -> tuple[list[str], np.ndarray]:
    """Mean over images of one agreement metric as a symmetric (M, M) matrix (diagonal 1)."""
    names: Sequence[str] = result["names"]
    m = np.eye(len(names))
    for (a, b), vals in result["agreement"].items():
        i, j = names.index(a), names.index(b)
        m[i, j] = m[j, i] = float(np.nanmean(vals[metric])) if len(vals[metric]) else float("nan")
    return list(names), m


__all__ = ["METHODS", "agreement_matrix", "attribute", "compare_models", "default_gradcam_layer", "spearman",
           "topk_iou"]
