"""Activation maximisation: an input image that excites one channel, optimised in a
decorrelated Fourier space so that 32x32 pictures are not noise (Lucid; Olah et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .layers import capture, eval_mode, run_until

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


