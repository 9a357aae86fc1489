"""What a network has learned, seen from its weights and its activations.

- filter grids: first-layer filters as RGB tiles, deeper filters as grayscale tiles;
- filter spectra: how much of each layer's filter energy sits at high spatial frequency
  (pooling the saved activations low-passes the weight gradient, so this is where a
  compressed run could differ from the baseline);
- activation maximisation: an input image that excites one channel, optimised in a
  decorrelated Fourier space so that 32x32 pictures are not noise;
- feature maps, layer names for the pages' selectors, predictions;
- linear CKA between the layers of two models on the same batch.

Pure torch + numpy: no plotly, captum or streamlit here. Anything that installs hooks does
so inside a context manager that removes them; models are put in eval mode for the call and
their train/eval flags restored afterwards. No parameter `.grad` is touched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .models import ResidualBlock

LAYER_KINDS = ("conv", "block", "relu", "stage")


# ---------------------------------------------------------------------------------------
# Small helpers shared with attribution.py
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside, every module's own train/eval flag restored afterwards.

    Gradient checkpointing (the `ckpt` policy) is switched off inside as well: the forward
    pass is the same, and a checkpointed block would re-run its forward during backward,
    firing our hooks a second time.
    """
    flags = [(m, m.training) for m in model.modules()]
    ckpt = [(m, m.__dict__["checkpointed"]) for m in model.modules() if "checkpointed" in m.__dict__]
    model.eval()
    for m, _ in ckpt:
        m.checkpointed = False
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
        for m, value in ckpt:
            m.checkpointed = value


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str], fn=None, stop_after: str | None = None):
    """Record the outputs of named submodules during forward passes; hooks removed on exit.

    Yields a dict name -> output (or `fn(output)` when given, e.g. to reduce it on the fly).
    With `stop_after`, the forward pass is cut short once that module has run (its hook
    raises `_StopForward`, which the `run_until` helper swallows): later layers are skipped.
    """
    store: dict = {}
    handles = []

    def make_hook(name):
        def hook(_module, _inputs, output):
            store[name] = fn(output) if fn is not None else output
            if stop_after is not None and name == stop_after:
                raise _StopForward

        return hook

    try:
        for name in names:
            handles.append(_module(model, name).register_forward_hook(make_hook(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    """Raised from a hook to skip the rest of a forward pass."""


def run_until(model: nn.Module, x: torch.Tensor) -> None:
    """Forward `x`, treating an early stop from `capture(..., stop_after=...)` as success."""
    try:
        model(x)
    except _StopForward:
        pass


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"model has no layer {name!r}; see layer_names(model)") from e


def _as_tensor(w) -> torch.Tensor:
    if isinstance(w, nn.Module):
        w = w.weight
    if isinstance(w, np.ndarray):
        w = torch.from_numpy(w)
    return w.detach().to("cpu", torch.float64)


def layer_names(model: nn.Module, kind: str = "conv") -> list[str]:
    """Module names for a selector, in forward order.

    conv:  every Conv2d (also shortcut convs; compressed CompressedConv2d count too);
    block: the stem's output ReLU(s) (direct ReLU children of the model, e.g. "act1") and
           every residual block -- the representation after each step of depth;
    relu:  every ReLU module (each is its own module in our models);
    stage: layer1 .. layerN.
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(LAYER_KINDS)}")
    if kind == "stage":
        return list(getattr(model, "stage_names", [n for n, _ in model.named_children() if n.startswith("layer")]))
    if kind == "block":
        top_relus = {id(m) for m in model.children() if isinstance(m, nn.ReLU)}
        return [n for n, m in model.named_modules()
                if isinstance(m, ResidualBlock) or id(m) in top_relus]
    cls = nn.Conv2d if kind == "conv" else nn.ReLU
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def first_conv(model: nn.Module) -> str:
    return layer_names(model, "conv")[0]


def denormalize(x: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """Normalised (B, 3, H, W) batch -> (B, H, W, 3) float images in [0, 1] for display."""
    x = x.detach().to("cpu", torch.float32)
    if std is not None:
        x = x * torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    if mean is not None:
        x = x + torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def prediction(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities (B, classes), eval mode, no gradients."""
    with eval_mode(model):
        return torch.softmax(model(x).float(), dim=1)


@torch.no_grad()
def feature_maps(model: nn.Module, layer_name: str, x: torch.Tensor) -> torch.Tensor:
    """The output (B, C, h, w) of `layer_name` for input `x` (eval mode, hook removed afterwards).

    The forward pass stops right after the layer, so early layers are cheap.
    """
    with eval_mode(model), capture(model, [layer_name], stop_after=layer_name) as out:
        run_until(model, x)
    return out[layer_name].detach()


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
    bins over [0, 0.5*sqrt(2)] and their centres are returned. `normalize` divides power by
    its sum (compare shapes across runs whose weight norms differ). Empty bins are dropped.
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
    mean_power = sums[keep] / counts[keep]
    if normalize and mean_power.sum() > 0:
        mean_power = mean_power / mean_power.sum()
    return centres[keep].numpy(), mean_power.numpy()


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
    `power` is normalised to sum 1 by default so runs with different weight norms compare.
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


# ---------------------------------------------------------------------------------------
# Activation maximisation
# ---------------------------------------------------------------------------------------

# Square root of the colour correlation of natural images (Lucid / Olah et al. 2017):
# optimising in this decorrelated colour space avoids the high-saturation noise of raw RGB.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                            [0.27, 0.00, -0.05],
                            [0.27, -0.09, 0.03]], dtype=torch.float32)
_COLOR_SQRT = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


class _FourierImage(nn.Module):
    """(n, 3, size, size) images in [0, 1] from a 1/f-scaled Fourier parameterisation.

    Gradient steps on the spectrum coefficients, each scaled by 1/frequency, move low
    frequencies as easily as high ones, so the image does not turn into pixel noise.
    """

    def __init__(self, n: int, size: int, generator: torch.Generator, decay: float = 1.0, sd: float = 0.01):
        super().__init__()
        fy = torch.fft.fftfreq(size).view(-1, 1)
        fx = torch.fft.rfftfreq(size).view(1, -1)
        freq = torch.sqrt(fx ** 2 + fy ** 2)
        self.register_buffer("scale", 1.0 / torch.clamp(freq, min=1.0 / size) ** decay)
        shape = (n, 3, size, size // 2 + 1, 2)
        self.spectrum = nn.Parameter(torch.randn(shape, generator=generator) * sd)
        self.size = size

    def forward(self) -> torch.Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale
        img = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho") / 4.0  # (n, 3, H, W)
        img = torch.einsum("nchw,dc->ndhw", img, _COLOR_SQRT.to(img))  # decorrelated -> RGB
        return torch.sigmoid(img)


def maximize_activations(model: nn.Module, layer_name: str, channels: Sequence[int], steps: int = 128,
                         seed: int = 0, lr: float = 0.05, jitter: int = 2, mean=None, std=None,
                         size: int = 32) -> np.ndarray:
    """Images (n, size, size, 3) in [0, 1], one per channel, each maximising that channel's
    mean activation at `layer_name` (a conv/block/ReLU output (B, C, h, w), or `fc` logits).

    All channels are optimised together as one batch (eval mode: images are independent),
    about 2.5x cheaper per channel than one call each. Each step shifts the images by a random
    offset of up to `jitter` pixels (robustness to translation) before the model sees them;
    `mean`/`std` normalise the [0, 1] image as the run's data were (None: fed as they are).
    Deterministic for a seed. Only the image parameters get gradients (torch.autograd.grad),
    so the model's parameter `.grad` fields are left alone; the forward stops at the layer.
    """
    channels = list(channels)
    gen = torch.Generator().manual_seed(seed)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    image = _FourierImage(len(channels), size, gen).to(device)
    opt = torch.optim.Adam(image.parameters(), lr=lr)
    m = torch.tensor(mean if mean is not None else [0.0] * 3, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std if std is not None else [1.0] * 3, device=device).view(1, 3, 1, 1)
    idx = torch.arange(len(channels), device=device)
    ch = torch.tensor(channels, device=device)
    with eval_mode(model), torch.enable_grad(), capture(model, [layer_name], stop_after=layer_name) as out:
        for _ in range(steps):
            img = image()
            if jitter:
                dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
                img = torch.roll(img, shifts=(dy, dx), dims=(2, 3))
            run_until(model, (img - m) / s)
            act = out[layer_name]  # (n, C, h, w) or (n, C)
            act = act[idx, ch]
            objective = act.reshape(len(channels), -1).mean(1).sum()
            (grad,) = torch.autograd.grad(-objective, [image.spectrum])
            opt.zero_grad(set_to_none=True)
            image.spectrum.grad = grad
            opt.step()
        with torch.no_grad():
            final = image()
    return final.permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)


def maximize_activation(model: nn.Module, layer_name: str, channel: int, steps: int = 128, seed: int = 0,
                        lr: float = 0.05, jitter: int = 2, mean=None, std=None, size: int = 32) -> np.ndarray:
    """One channel's image (size, size, 3) in [0, 1]; see `maximize_activations`."""
    return maximize_activations(model, layer_name, [channel], steps=steps, seed=seed, lr=lr, jitter=jitter,
                                mean=mean, std=std, size=size)[0]


# ---------------------------------------------------------------------------------------
# Linear CKA (Kornblith et al. 2019)
# ---------------------------------------------------------------------------------------

def _gram(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, ...) activations -> centred linear Gram matrix (n, n), returned in float64.

    Columns are centred before the product (no large-mean cancellation), so a float32
    product (`dtype`) is accurate to ~1e-6 and twice as fast for wide layers."""
    x = x.reshape(x.shape[0], -1).to(dtype)
    x = x - x.mean(0, keepdim=True)
    return (x @ x.T).to(torch.float64)


def linear_cka(X, Y) -> float:
    """Linear CKA of two (n, features) matrices over the same n examples.

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = Xc Xc^T, L = Yc Yc^T (columns
    centred), computed from n x n Gram matrices so wide layers cost nothing extra. 1 for
    identical representations; invariant to orthogonal transforms and isotropic scaling,
    not to anisotropic scaling. Symmetric.
    """
    X = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X)
    Y = torch.as_tensor(np.asarray(Y) if not isinstance(Y, torch.Tensor) else Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y need the same number of examples, got {X.shape[0]} and {Y.shape[0]}")
    return _cka_from_grams(_gram(X), _gram(Y))


def _cka_from_grams(K: torch.Tensor, L: torch.Tensor) -> float:
    denom = torch.linalg.norm(K) * torch.linalg.norm(L)
    return float((K * L).sum() / denom) if denom > 0 else float("nan")


@torch.no_grad()
def _layer_grams(model: nn.Module, names: Sequence[str], x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Centred, unit-Frobenius-norm Gram matrices of each layer's flattened output on x."""
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with eval_mode(model), capture(model, names, fn=lambda o: o.detach()) as out:
        for start in range(0, x.shape[0], batch_size):
            model(x[start: start + batch_size])
            for n in names:  # keep flattened features; Gram needs all examples together
                feats[n].append(out[n].reshape(out[n].shape[0], -1).float())
            out.clear()
    grams = []
    for n in names:
        K = _gram(torch.cat(feats.pop(n)), torch.float32).cpu()
        norm = torch.linalg.norm(K)
        grams.append(K / norm if norm > 0 else K)
    return grams


def cka_matrix(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, layers_a: Sequence[str] | None = None,
               layers_b: Sequence[str] | None = None, batch_size: int = 256):
    """Linear CKA between every layer of model A and every layer of model B on batch x.

    Default layers: `layer_names(model, "block")` (stem output + every residual block output).
    Activations are flattened per example; eval mode. Returns (names_a, names_b, matrix)
    with matrix[i, j] = CKA(A's layer i, B's layer j) as a float64 array.
    """
    names_a = list(layers_a) if layers_a is not None else layer_names(model_a, "block")
    names_b = list(layers_b) if layers_b is not None else layer_names(model_b, "block")
    ga = _layer_grams(model_a, names_a, x, batch_size)
    gb = _layer_grams(model_b, names_b, x, batch_size)
    A = torch.stack([g.flatten() for g in ga])  # (La, n*n)
    B = torch.stack([g.flatten() for g in gb])  # (Lb, n*n)
    return names_a, names_b, (A @ B.T).numpy()


__all__ = [
    "LAYER_KINDS", "capture", "channel_grid", "cka_matrix", "denormalize", "eval_mode", "feature_maps",
    "filter_grid", "first_conv", "high_frequency_share", "layer_names", "layer_spectra", "linear_cka",
    "maximize_activation", "maximize_activations", "prediction", "radial_power_spectrum", "run_until",
]
