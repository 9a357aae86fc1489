"""What a network's filters look like: grids of first-layer (RGB) and deeper (grayscale)
filters, and their spatial spectra -- how much of each layer's filter energy sits at high
frequency (pooling the saved activations low-passes the weight gradient, so this is where a
compressed run could differ from the baseline)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .layers import _as_tensor, _module, layer_names

# ---------------------------------------------------------------------------------------
# Filter grids
# ---------------------------------------------------------------------------------------

def _norm01(t: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    """Min-max to [0, 1] over `dims` (None = whole tensor); a constant tile becomes 0.5."""
    if dims is None:
        lo, hi = t.min(), t.max()
    else:
        lo, hi = t.amin(dim=dims, keepdim=True), t.amax(dim=dims, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (t - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.full_like(t, 0.5))


def _tile(tiles: torch.Tensor, ncols: int, gap: int, fill: float) -> np.ndarray:
    """(N, h, w, c) tiles -> one (rows*(h+gap)-gap, cols*(w+gap)-gap, c) mosaic, row-major."""
    n, h, w, c = tiles.shape
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (h + gap) - gap, ncols * (w + gap) - gap, c), fill, dtype=np.float64)
    for i in range(n):
        r, col = divmod(i, ncols)
        out[r * (h + gap): r * (h + gap) + h, col * (w + gap): col * (w + gap) + w] = tiles[i].numpy()
    return out


def _upscale(img: np.ndarray, scale: int) -> np.ndarray:
    if scale <= 1:
        return img
    return img.repeat(scale, axis=0).repeat(scale, axis=1)


def filter_grid(weight, normalize: str = "per_filter", ncols: int | None = None, gap: int = 1,
                scale: int = 1) -> np.ndarray:
    """First-layer filters (O, 3, k, k) as an RGB mosaic: (H, W, 3) floats in [0, 1].

    normalize="per_filter": each filter stretched to [0, 1] on its own (shows every filter's
    pattern, hides which filters are strong); "global": one min-max over all filters (shows
    relative strength; weak filters look flat gray). Tiles are separated by `gap` white
    pixels; `scale` repeats pixels (nearest) for crisp display of 3x3 kernels.
    """
    w = _as_tensor(weight)  # (O, 3, k, k)
    if w.dim() != 4 or w.shape[1] != 3:
        raise ValueError(f"filter_grid needs (O, 3, k, k) weights, got {tuple(w.shape)}; use channel_grid")
    if normalize not in ("per_filter", "global"):
        raise ValueError("normalize must be 'per_filter' or 'global'")
    w = _norm01(w, (1, 2, 3) if normalize == "per_filter" else None)
    tiles = w.permute(0, 2, 3, 1)  # (O, k, k, 3)
    ncols = ncols or math.ceil(math.sqrt(tiles.shape[0]))
    return _upscale(_tile(tiles, ncols, gap, 1.0), scale)


def channel_grid(weight, n_filters: int = 8, n_channels: int | None = 16, normalize: str = "per_filter",
                 gap: int = 1, scale: int = 1) -> np.ndarray:
    """Deeper-layer filters as a grayscale mosaic (H, W) in [0, 1].

    Row i = output filter i (the first `n_filters`), column j = its kernel for input channel j
    (the first `n_channels`, None = all). normalize="per_filter" stretches each row (one
    output filter across its input channels) to [0, 1]; "global" uses one min-max.
    """
    w = _as_tensor(weight)  # (O, I, k, k)
    if w.dim() != 4:
        raise ValueError(f"channel_grid needs (O, I, k, k) weights, got {tuple(w.shape)}")
    w = w[:n_filters, :n_channels]
    if normalize not in ("per_filter", "global"):
        raise ValueError("normalize must be 'per_filter' or 'global'")
    w = _norm01(w, (1, 2, 3) if normalize == "per_filter" else None)
    o, i, k1, k2 = w.shape
    tiles = w.reshape(o * i, k1, k2, 1)
    return _upscale(_tile(tiles, i, gap, 1.0)[..., 0], scale)


# ---------------------------------------------------------------------------------------
# Filter spectra
# ---------------------------------------------------------------------------------------

def _default_pad(k: int) -> int:
    return max(16, 1 << math.ceil(math.log2(2 * k)))


def _power_2d(weight, pad_to: int | None):
    """Mean |FFT|^2 of every 2-D kernel slice, zero-padded to pad_to x pad_to.

    Returns (power (P, P), radius (P, P) in cycles/pixel, pad_to). Zero-padding samples the
    kernel's frequency response densely: it is what the filter passes, not a periodic tile.
    """
    w = _as_tensor(weight)
    if w.dim() < 2:
        raise ValueError("need at least a 2-D kernel")
    kh, kw = w.shape[-2:]
    w = w.reshape(-1, kh, kw)
    p = pad_to or _default_pad(max(kh, kw))
    if p < max(kh, kw):
        raise ValueError(f"pad_to={p} is smaller than the {kh}x{kw} kernel")
    spec = torch.fft.fft2(w, s=(p, p))
    power = (spec.real ** 2 + spec.imag ** 2).mean(0)  # (P, P)
    f = torch.fft.fftfreq(p, dtype=torch.float64)
    radius = torch.sqrt(f.view(-1, 1) ** 2 + f.view(1, -1) ** 2)
    return power, radius, p


def radial_power_spectrum(weight, n_bins: int | None = None, pad_to: int | None = None,
                          normalize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of the kernels in `weight` (any (..., k, k) shape).

    Every 2-D kernel is zero-padded to `pad_to` (default 16 for 3x3, at least 2k), its power
    |FFT|^2 averaged over all kernels, then over rings of equal radius. Frequencies are in
    cycles/pixel from 0 to 0.5*sqrt(2) (the corner of the 2-D spectrum: a checkerboard lives
    there). Default bins: one per FFT step 1/pad_to, by rounding the radius, so DC is its own
    bin and a grating of frequency m/pad_to lands exactly on freqs[m]. With `n_bins`, equal
    bins over [0, 0.5*sqrt(2)] and their centres are returned. Empty bins are dropped.

    `normalize` returns each ring's share of the kernels' energy instead of its mean power: the
    shares sum to 1 (runs whose weight norms differ compare), and those of the rings right of a
    cutoff add up to high_frequency_share's figure for it, to a ring's width. (The ring means,
    scaled to sum 1, put a quarter where the energy share was 60 %: an outer ring holds more
    frequencies than an inner one.)
    """
    power, radius, p = _power_2d(weight, pad_to)
    r_max = 0.5 * math.sqrt(2)
    if n_bins is None:
        idx = torch.round(radius * p).long()
        n = int(idx.max()) + 1
        centres = torch.arange(n, dtype=torch.float64) / p
    else:
        edges = torch.linspace(0, r_max, n_bins + 1, dtype=torch.float64)
        idx = torch.clamp(torch.bucketize(radius, edges, right=True) - 1, 0, n_bins - 1)
        n = n_bins
        centres = (edges[:-1] + edges[1:]) / 2
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, idx.flatten(), power.flatten())
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, idx.flatten(), torch.ones_like(power.flatten()))
    keep = counts > 0
    if normalize:
        total = sums.sum()
        return centres[keep].numpy(), (sums[keep] / total if total > 0 else sums[keep]).numpy()
    return centres[keep].numpy(), (sums[keep] / counts[keep]).numpy()


def high_frequency_share(weight, cutoff: float = 0.25, pad_to: int | None = None) -> float:
    """Share of the kernels' spectral energy at radius > `cutoff` cycles/pixel.

    Default cutoff 0.25 = half the Nyquist frequency. Computed on the full 2-D spectrum (not
    the ring averages), so it is an energy share: 0 for a kernel with energy only at DC,
    1 for one with energy only at (0.5, 0.5). A 3x3 kernel padded to 16 leaks a little
    (its response is a Dirichlet kernel): a constant 3x3 box scores about 0.19, a 3x3
    checkerboard about 0.99.
    """
    power, radius, _ = _power_2d(weight, pad_to)
    total = float(power.sum())
    return float(power[radius > cutoff].sum()) / total if total > 0 else 0.0


def layer_spectra(model: nn.Module, layers: Iterable[str] | None = None, pad_to: int | None = None,
                  normalize: bool = True, skip_1x1: bool = True) -> list[dict]:
    """[{name, freqs, power, hf_share, kernel}] for every conv (or `layers`), forward order.

    1x1 kernels have a flat spectrum (nothing to see): skipped when listing every conv, unless
    skip_1x1=False; layers named in `layers` are always kept.
    `power` is each ring's share of the energy by default (normalize), so runs with different
    weight norms compare and the shares right of half Nyquist add up to `hf_share`.
    """
    out = []
    for name in layers if layers is not None else layer_names(model, "conv"):
        w = _module(model, name).weight
        if skip_1x1 and layers is None and tuple(w.shape[-2:]) == (1, 1):
            continue
        freqs, power = radial_power_spectrum(w, pad_to=pad_to, normalize=normalize)
        out.append({"name": name, "freqs": freqs, "power": power,
                    "hf_share": high_frequency_share(w, pad_to=pad_to), "kernel": tuple(w.shape[-2:])})
    return out


