"""features10: a built-in, procedurally generated set of 10 classes (offline, no files)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from .cache import finish, seed_int
from .splits import DatasetError, DatasetSplits

FEATURES10_SIZE = 32
FEATURES10_TRAIN, FEATURES10_VAL = 10_000, 2_000

#: One dict per class, in label order. `frequency`: dominant spatial frequency in cycles/pixel
#: (Nyquist = 0.5): for gratings across the stripes, for checkers along x and along y (its 2-D
#: spectrum peaks at (±f, ±f)); None for classes without one (colour blobs, the cross).
#: `orientation`: direction of the stripes in degrees (0 = horizontal, 90 = vertical, 45 = diagonal,
#: either diagonal); None when not oriented. `band`: "low" / "high" frequency, "colour" or "shape".
#: Pairs that differ only in frequency: 0/2, 1/3 (gratings) and 6/5 (checkers); 7/8 only in colour.
FEATURES10_CLASSES: list[dict] = [
    {"name": "low_horizontal", "description": "horizontal stripes, 2 cycles per 32 px",
     "frequency": 0.0625, "orientation": 0.0, "band": "low"},
    {"name": "low_vertical", "description": "vertical stripes, 2 cycles per 32 px",
     "frequency": 0.0625, "orientation": 90.0, "band": "low"},
    {"name": "high_horizontal", "description": "horizontal stripes, period 2.7 px (as class 0, 6x the frequency)",
     "frequency": 0.375, "orientation": 0.0, "band": "high"},
    {"name": "high_vertical", "description": "vertical stripes, period 2.7 px (as class 1, 6x the frequency)",
     "frequency": 0.375, "orientation": 90.0, "band": "high"},
    {"name": "high_diagonal", "description": "diagonal stripes (either diagonal), period 2.7 px",
     "frequency": 0.375, "orientation": 45.0, "band": "high"},
    {"name": "fine_checker", "description": "soft checkerboard, squares of 2.7 px (as class 6, 3x the frequency)",
     "frequency": 0.1875, "orientation": None, "band": "high"},
    {"name": "coarse_checker", "description": "soft checkerboard, squares of 8 px",
     "frequency": 0.0625, "orientation": None, "band": "low"},
    {"name": "red_blob", "description": "a red Gaussian blob (as class 8 but red)",
     "frequency": None, "orientation": None, "band": "colour"},
    {"name": "blue_blob", "description": "a blue-cyan Gaussian blob (as class 7 but blue)",
     "frequency": None, "orientation": None, "band": "colour"},
    {"name": "cross", "description": "a plus-shaped cross, lighter or darker than the background, bars 2-3.5 px wide",
     "frequency": None, "orientation": None, "band": "shape"},
]

_CHUNK = 2048


def generate_features10(n: int | None = None, seed: int = 0, *, labels: torch.Tensor | None = None,
                        clean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate features10 images: (x uint8 (n, 3, 32, 32), y int64 (n,)), deterministic in `seed`.

    `labels` fixes the classes (default: balanced, shuffled). `clean=True` gives the textbook
    version of each class (exact frequency and orientation, zero phase, full frame, grey
    background, no noise): what FEATURES10_CLASSES describes, used to check it.

    Variation (clean=False): random phase, frequency x U(0.92, 1.08), orientation ±5°, contrast,
    position and size (patterns fill a soft disk of random centre and radius), background grey
    level, tint and a gentle illumination gradient, pattern tint, additive uniform noise.
    Pattern contrast (half the peak-to-peak amplitude, times the tint) is U(0.08, 0.25) and the
    noise standard deviation U(0.06, 0.16) per image (_DIFFICULTY): a ResNet-20 reaches 80-99%
    in about 300 steps of 128 and ~100% later. Colour is uninformative except for the blob pair.
    """
    g = torch.Generator().manual_seed(seed_int("features10", seed))
    if labels is None:
        if n is None:
            raise ValueError("give n or labels")
        labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    n = len(labels)
    if n and (labels.min() < 0 or labels.max() > 9):
        raise ValueError("features10 labels are 0..9")
    # Every parameter is drawn for every image, in a fixed order: the images depend only on
    # (seed, labels) (and on n through the labels), never on how they are chunked.
    P = _features10_params(n, g, clean)
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    x = torch.empty(n, 3, FEATURES10_SIZE, FEATURES10_SIZE, dtype=torch.uint8)
    for i in range(0, n, _CHUNK):  # chunks keep the float intermediates small
        sl = slice(i, min(n, i + _CHUNK))
        noise = None
        if not clean:  # each chunk's noise from its own stream (fixed chunk size: deterministic)
            noise = _uniform_noise((sl.stop - i, 3, FEATURES10_SIZE, FEATURES10_SIZE), P["noise"][sl],
                                   seed_int("noise", noise_seed, i))
        x[sl] = _features10_render(labels[sl], {k: v[sl] for k, v in P.items()}, noise)
    return x, labels


# The ranges of the two parameters that set how hard features10 is (uniform draws per image).
# Changing them changes the data set: runs made before and after would not compare.
_DIFFICULTY = {"contrast": (0.08, 0.25), "noise": (0.06, 0.16)}


def _features10_params(n: int, g: torch.Generator, clean: bool) -> dict[str, torch.Tensor]:
    def U(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    P = {
        "freq_jitter": U(0.92, 1.08), "angle_jitter": U(-5.0, 5.0), "diag_sign": (torch.rand(n, generator=g) < 0.5),
        "phase1": U(0, 2 * math.pi), "phase2": U(0, 2 * math.pi),
        "cx": U(8.0, 23.0), "cy": U(8.0, 23.0), "radius": U(11.0, 18.0),
        "contrast": U(*_DIFFICULTY["contrast"]), "tint": U(0.35, 1.0, 3),
        "bg_level": U(0.3, 0.7), "bg_tint": U(-0.08, 0.08, 3), "bg_gx": U(-0.005, 0.005), "bg_gy": U(-0.005, 0.005),
        "blob_sigma": U(2.5, 5.0), "blob_alpha": U(0.75, 1.0),
        "red": torch.stack([U(0.75, 1.0), U(0.0, 0.3), U(0.0, 0.3)], 1),
        "blue": torch.stack([U(0.0, 0.2), U(0.35, 0.75), U(0.75, 1.0)], 1),
        "cross_width": U(2.0, 3.5), "cross_len": U(5.0, 10.0), "cross_sign": torch.rand(n, generator=g) < 0.5,
        "noise": U(*_DIFFICULTY["noise"]),
    }
    if clean:
        c = FEATURES10_SIZE / 2 - 0.5
        P.update(freq_jitter=torch.ones(n), angle_jitter=torch.zeros(n), diag_sign=torch.zeros(n, dtype=torch.bool),
                 phase1=torch.zeros(n), phase2=torch.zeros(n), cx=torch.full((n,), c), cy=torch.full((n,), c),
                 radius=torch.full((n,), 1e3), contrast=torch.full((n,), 0.4), tint=torch.ones(n, 3),
                 bg_level=torch.full((n,), 0.5), bg_tint=torch.zeros(n, 3), bg_gx=torch.zeros(n),
                 bg_gy=torch.zeros(n), blob_sigma=torch.full((n,), 4.0), blob_alpha=torch.ones(n),
                 red=torch.tensor([[0.9, 0.1, 0.1]]).expand(n, 3), blue=torch.tensor([[0.1, 0.5, 0.9]]).expand(n, 3),
                 cross_width=torch.full((n,), 3.0), cross_len=torch.full((n,), 8.0),
                 cross_sign=torch.ones(n, dtype=torch.bool), noise=torch.zeros(n))
    return P


def _features10_render(y: torch.Tensor, P: dict[str, torch.Tensor], noise: torch.Tensor | None) -> torch.Tensor:
    """Images for labels y (B,) from per-image parameters: uint8 (B, 3, S, S).

    Each class's pattern is computed only for its own images, and waves are built separably
    (cos(a + b) = cos a cos b - sin a sin b, with a along x and b along y): generation stays fast.
    """
    S, B = FEATURES10_SIZE, len(y)
    ar = torch.arange(S, dtype=torch.float32)
    DX = ar.view(1, 1, S) - P["cx"].view(B, 1, 1)  # (B, 1, S) offsets from the pattern centre
    DY = ar.view(1, S, 1) - P["cy"].view(B, 1, 1)  # (B, S, 1)
    pattern = torch.zeros(B, S, S)

    def wave(idx, kx, ky, phase):
        """cos(kx * dx + ky * dy + phase) for images idx: (b, S, S)."""
        ax = kx.view(-1, 1, 1) * DX[idx]
        by = ky.view(-1, 1, 1) * DY[idx] + phase.view(-1, 1, 1)
        return torch.cos(ax) * torch.cos(by) - torch.sin(ax) * torch.sin(by)

    def disk(idx):
        """Soft disk (1-pixel linear edge) where the pattern shows: (b, S, S)."""
        r = (DX[idx] ** 2 + DY[idx] ** 2).sqrt_()
        return (P["radius"][idx].view(-1, 1, 1) - r).add_(0.5).clamp_(0, 1)

    idx = torch.nonzero(y <= 6).squeeze(1)  # gratings and checkers
    if len(idx):
        cls = y[idx]
        orient = torch.tensor([c["orientation"] or 0.0 for c in FEATURES10_CLASSES])[cls]
        orient = torch.where((cls == 4) & P["diag_sign"][idx], -orient, orient)  # class 4: either diagonal
        theta = torch.deg2rad(orient + P["angle_jitter"][idx])
        k = 2 * math.pi * torch.tensor([c["frequency"] or 0.0 for c in FEATURES10_CLASSES])[cls] * P["freq_jitter"][idx]
        # stripes at angle theta vary along their normal (-sin, cos) (y points down): theta = 0
        # gives horizontal stripes, intensity varying along y
        pat = wave(idx, -k * torch.sin(theta), k * torch.cos(theta), P["phase1"][idx])
        chk = (cls >= 5).nonzero().squeeze(1)
        if len(chk):  # checkers: times a second wave along the stripes
            kc, tc = k[chk], theta[chk]
            along = wave(idx[chk], kc * torch.cos(tc), kc * torch.sin(tc), P["phase2"][idx[chk]])
            pat[chk] *= 1.3 * along
        pattern[idx] = pat * disk(idx)

    idx = torch.nonzero(y == 9).squeeze(1)  # the cross: two bars with 1-pixel linear edges
    if len(idx):
        hw = P["cross_width"][idx].view(-1, 1, 1) / 2 + 0.5
        L = P["cross_len"][idx].view(-1, 1, 1) + 0.5
        adx, ady = DX[idx].abs(), DY[idx].abs()
        bar_h = (hw - ady).clamp_(0, 1) * (L - adx).clamp_(0, 1)
        bar_v = (hw - adx).clamp_(0, 1) * (L - ady).clamp_(0, 1)
        sign = torch.where(P["cross_sign"][idx], 1.8, -1.8).view(-1, 1, 1)  # lighter or darker
        pattern[idx] = torch.maximum(bar_h, bar_v) * sign

    bg = (P["bg_level"].view(B, 1, 1, 1) + P["bg_gx"].view(B, 1, 1, 1) * (ar - S / 2).view(1, 1, 1, S)
          + P["bg_gy"].view(B, 1, 1, 1) * (ar - S / 2).view(1, 1, S, 1))  # (B, 1, S, S)
    img = (P["contrast"].view(B, 1, 1, 1) * P["tint"].view(B, 3, 1, 1)) * pattern.unsqueeze(1)  # (B, 3, S, S)
    img += bg
    img += P["bg_tint"].view(B, 3, 1, 1)

    idx = torch.nonzero((y == 7) | (y == 8)).squeeze(1)  # blobs: paint a colour over the background
    if len(idx):
        r2 = DX[idx] ** 2 + DY[idx] ** 2
        a = torch.exp(-r2 / (2 * P["blob_sigma"][idx].view(-1, 1, 1) ** 2)) * P["blob_alpha"][idx].view(-1, 1, 1)
        colour = torch.where((y[idx] == 7).view(-1, 1), P["red"][idx], P["blue"][idx]).view(-1, 3, 1, 1)
        a = a.unsqueeze(1)
        img[idx] = img[idx] * (1 - a) + colour * a
    if noise is not None:
        img += noise
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _uniform_noise(shape, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    """Zero-mean uniform noise with per-image standard deviation sigma (B,), from random bytes
    (several times cheaper than torch.randn for 30M values, which dominated generation)."""
    n = math.prod(shape)
    words = np.random.PCG64(seed).random_raw(-(-n // 8))  # uint64, all 64 bits random
    u8 = torch.from_numpy(words.view(np.uint8)[:n].reshape(shape))
    # uniform on 256 levels: mean 127.5, standard deviation sqrt((256**2 - 1) / 12) = 73.9
    return (u8.to(torch.float32) - 127.5).mul_((sigma / 73.9001).view(-1, *([1] * (len(shape) - 1))))


def _parse_options(text: str, allowed: dict[str, type], what: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in allowed:
            raise DatasetError(f"{what}: bad option {item!r}; allowed: {', '.join(f'{k}=N' for k in allowed)}")
        try:
            out[key] = allowed[key](val.strip())
        except ValueError:
            raise DatasetError(f"{what}: option {key} needs a whole number, got {val.strip()!r}") from None
    return out


def load_features10(name: str, options: str, split_seed: int) -> DatasetSplits:
    opts = _parse_options(options, {"train": int, "val": int, "seed": int}, "features10")
    n_train, n_val = opts.get("train", FEATURES10_TRAIN), opts.get("val", FEATURES10_VAL)
    seed = opts.get("seed", split_seed)
    if n_train < 1 or n_val < 0:
        raise DatasetError(f"features10: need train >= 1 and val >= 0 images (got train={n_train}, val={n_val})")
    # train and val come from separate random streams of the same seed: they never share an image
    tx, ty = generate_features10(n_train, seed=seed_int("train", seed))
    vx, vy = generate_features10(n_val, seed=seed_int("val", seed))
    return finish(name, [c["name"] for c in FEATURES10_CLASSES], tx, ty, vx, vy,
                   f"features10 (built-in, seed {seed}): {n_train} train / {n_val} val images, 32x32",
                   {"source": "features10", "seed": seed})


def features10_grid_png(path, per_class: int = 8, scale: int = 3, seed: int = 0) -> Path:
    """Write a PNG with one row per features10 class (`per_class` examples, upscaled `scale`x
    nearest) and the class names on the left: the picture in docs/datasets.md."""
    from PIL import Image, ImageDraw, ImageFont

    from ..atomic import write_bytes

    labels = torch.arange(10).repeat_interleave(per_class)
    x, _ = generate_features10(labels=labels, seed=seed)
    S, gap, label_w, pad = FEATURES10_SIZE * scale, 2, 150, 4
    W = label_w + per_class * (S + gap) + pad
    H = 10 * (S + gap) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: bitmap font only
        font = ImageFont.load_default()
    for k in range(10):
        top = pad + k * (S + gap)
        c = FEATURES10_CLASSES[k]
        draw.text((6, top + S // 2 - 16), f"{k} {c['name']}", fill=(0, 0, 0), font=font)
        sub = f"f={c['frequency']:g} c/px" if c["frequency"] else c["band"]
        draw.text((6, top + S // 2 + 2), sub, fill=(90, 90, 90), font=font)
        for j in range(per_class):
            arr = x[k * per_class + j].permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((S, S), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + j * (S + gap), top))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, buf.getvalue())
