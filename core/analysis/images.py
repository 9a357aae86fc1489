"""Images between people and models: uint8 pictures to the inputs a run's model takes, models
that take pixels, and uploads turned into images (or a clear error)."""

from __future__ import annotations

import io

import numpy as np
import torch

from ..engine.data import normalize


def run_stats(config: dict | None) -> tuple:
    """(mean, std) a run normalised its images with (its config.json), or neutral values."""
    cfg = config or {}
    return cfg.get("mean") or (0.5, 0.5, 0.5), cfg.get("std") or (0.25, 0.25, 0.25)


def to_input(x_uint8, config: dict | None) -> torch.Tensor:
    """uint8 images (n, 3, H, W) -> the normalised float batch a run's model was trained on."""
    return normalize(torch.as_tensor(np.asarray(x_uint8)), *run_stats(config))


class PixelInput(torch.nn.Module):
    """A run's model taking images in [0, 1]: it applies the run's own normalisation first.

    Lets models trained with different normalisations (say features10 generated with other
    settings) see one shared batch of pixels, e.g. for attributions and CKA. The wrapped model
    is the shared cached one (read-only); its layers are named "net.<name>"."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.net = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):  # (B, 3, H, W) in [0, 1]
        return self.net((x - self.mean) / self.std)


def to_pixels(x_uint8) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> float (n, 3, H, W) in [0, 1] (the input of `pixel_model`)."""
    return torch.as_tensor(np.asarray(x_uint8)).float() / 255.0


def mean_image(config: dict | None, like: torch.Tensor) -> torch.Tensor:
    """A run's mean colour as a (1, 3, H, W) image in [0, 1]: a neutral attribution baseline."""
    mean, _ = run_stats(config)
    return torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).expand(1, -1, *like.shape[-2:]).clone()


def to_display(x_uint8) -> np.ndarray:
    """uint8 (n, 3, H, W) -> (n, H, W, 3) floats in [0, 1] for figures."""
    return np.asarray(x_uint8).transpose(0, 2, 3, 1).astype(np.float64) / 255.0


class UploadError(ValueError):
    """An uploaded file that cannot be used as an image; the message says why, in one line."""


MAX_SIDE = 8000
MAX_PIXELS = 40_000_000


def image_from_upload(data: bytes, size: int = 32) -> tuple[np.ndarray, list[str]]:
    """Bytes of an uploaded file -> (uint8 (size, size, 3) RGB image, notes on what was done).

    Grayscale, palette, CMYK, 16-bit and transparent images are converted (with a note);
    anything that is not a readable image, or is huge, raises UploadError.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise UploadError("the file is empty")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise UploadError("this file is not an image PoolProp can read (use PNG, JPEG, BMP, GIF or WebP)") from None
    if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
        raise UploadError(f"the image is too large ({w}×{h} pixels); use one at most {MAX_SIDE} pixels a side "
                          f"and {MAX_PIXELS // 1_000_000} million pixels in all")
    if w < 1 or h < 1:
        raise UploadError("the image has no pixels")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise UploadError("the image file is damaged or cut short") from None
    notes = []
    if getattr(img, "n_frames", 1) > 1:
        notes.append("an animation: its first frame is used")
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), "L")
        notes.append(f"{mode} ({'16-bit' if mode.startswith('I;16') else 'high-bit-depth'}) image scaled to 8 bits")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        notes.append("palette image converted to RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
        notes.append("transparent parts shown on white")
    elif mode in ("L", "1"):
        notes.append("grayscale: the same values in all three colour channels")
    elif mode != "RGB":
        notes.append(f"{mode} colours converted to RGB")
    img = img.convert("RGB")
    if w != h:
        img = ImageOps.fit(img, (min(w, h), min(w, h)))
        notes.append("cropped to the centre square")
    if img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
        notes.append(f"resized from {w}×{h} to {size}×{size} pixels (the size the models take)")
    return np.asarray(img, dtype=np.uint8).copy(), notes
