"""Per-group B-bit quantisation with stochastic rounding, bit-packed (ActNN, GACT).

A tensor (N, C, H, W) is kept as B-bit codes, one group per (sample, channel): the group's
minimum `lo` and step `scale` (bfloat16) and, per value, q = floor((x - lo) / scale + u) with
a dither u uniform in (0, 1). The reconstruction lo + q * scale is then unbiased:
E[dequantize(quantize(x))] = x, so a weight gradient computed from it (linear in the input) is
an unbiased estimate of the exact one. Why per (sample, channel): activation ranges differ far
more between channels than within one (BatchNorm and ReLU act per channel), and the group is
the same whatever the memory layout (NCHW or channels_last).

`lo` is rounded down and `scale` up to bfloat16, so every value lies in
[lo, lo + (2^B - 1) * scale] and the rounding never clamps (clamping would bias it). The dither
has 15 bits, u = (h + 1/2) / 2^15, so the mean of a code is off by at most 2^-16 of a step: far
below the noise of one draw (up to half a step), invisible in any gradient.

The dither is not drawn into a tensor: h is 15 bits of a hash of (seed + index) computed inside
the encode pass, with one random 31-bit seed drawn per call. The hash (xor-shifts and odd
multipliers modulo 2^31) is a bijection of the 31-bit integers, so for a uniform seed every
value's h is exactly uniform, whatever the index: the rounding stays unbiased. Computed in
the pass it costs no memory (a drawn dither held 2 bytes per value, a quarter of a float32
input, at the forward's peak) and no extra pass over memory.

Codes are packed 8/B to a byte, *planar*: the tensor's values in memory order are cut into
8/B equal planes and byte j holds value j of every plane (plane i in bits B*i..B*i+B-1). 2-bit
codes are four to a byte as with consecutive packing, but every plane is a contiguous stream,
which a compiled loop reads and writes with vector instructions (consecutive packing gathers
with a stride and ran 5x slower). What autograd keeps, and the memory meter counts, is the
packed bytes plus 4 bytes of range per group.

Speed: the three passes below are plain PyTorch (the reference, any device), registered with
core.method.fastpath: compiled on the CPU they run as one fused loop each (about 4x faster),
bit-identical given the same seed (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fastpath import fused
from .layout import from_memory_order, is_channels_last, memory_order_flat

BITS = (1, 2, 4, 8)
DITHER_BITS = 15


@dataclass(frozen=True)
class PackedShape:
    """What unpacking needs besides the tensors: the shape coded (4-D), the layout, the bits,
    the dtype, and the caller's shape when it was not 4-D."""

    shape: tuple[int, ...]
    channels_last: bool
    bits: int
    dtype: torch.dtype
    orig_shape: tuple[int, ...] | None = None


def plane_size(numel: int, bits: int) -> int:
    return -(-numel // (8 // bits))


def packed_bytes(shape: tuple[int, ...], bits: int) -> int:
    """Bytes `quantize` keeps for a tensor of `shape`: the codes plus two bf16 per group."""
    groups = shape[0] * (1 if len(shape) == 2 else shape[1])
    return plane_size(math.prod(shape), bits) + 2 * 2 * groups


# ---------------------------------------------------------------------------------------
# The passes (reference PyTorch; torch.compile'd on request)
# ---------------------------------------------------------------------------------------

def _bf16_toward(t: torch.Tensor, direction: float) -> torch.Tensor:
    """t (float32) rounded to bfloat16 toward -inf (direction < 0) or +inf (direction > 0). A
    bfloat16 is a float32's upper 16 bits: dropping the lower ones rounds toward zero, and adding
    one to the upper ones where something was dropped rounds away from it (integer ops on the
    bits, which a compiled pass keeps exact; it computes bfloat16's nextafter in float32)."""
    bits = t.view(torch.int32)
    toward_zero = bits & -65536
    away = (bits & 65535 != 0) & ((t < 0) if direction < 0 else (t > 0))
    return torch.where(away, toward_zero + 65536, toward_zero).view(torch.float32).to(torch.bfloat16)


@fused
def _range_pass(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (sample, channel) of x (N, C, H, W): the minimum rounded down and the step rounded up
    to bfloat16, (N, C), and the step's inverse, float32 (0 for a constant group). One pass:
    compiled, the rounding and the inverse run in the reduction's loop, not as a dozen small ops."""
    n, c = x.shape[:2]
    if is_channels_last(x):  # reduce over the pixels of an (N, HW, C) view: no copy
        lo32, hi = torch.aminmax(x.permute(0, 2, 3, 1).reshape(n, -1, c), dim=1)
    else:
        lo32, hi = torch.aminmax(x.reshape(n, c, -1), dim=2)
    lo = _bf16_toward(lo32.float(), -1.0)
    scale = _bf16_toward((hi.float() - lo.float()) / ((1 << bits) - 1), 1.0)
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    return lo, scale, inv


def _hash31(k: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2^31) (int64 in, int64 out): xor-shifts and odd multipliers modulo
    2^31 (the 'lowbias32' mixer on 31 bits). Products stay below 2^63: no overflow anywhere."""
    m = 0x7FFFFFFF
    k = k ^ (k >> 16)
    k = (k * 0x7FEB352D) & m
    k = k ^ (k >> 15)
    k = (k * 0x846CA68B) & m
    return k ^ (k >> 16)


_DITHER_CHUNK = 1 << 16


def _dither(n: int, seed: torch.Tensor, device) -> torch.Tensor:
    """u (n,) float32 for padded indices 0..n-1. Compiled, the hash is fused into the encode
    loop; run eagerly, it goes a chunk at a time, so its int64 temporaries stay a few MiB
    however large the tensor (the same bits either way: integer arithmetic)."""
    def u_of(k):
        h = (_hash31((k + seed) & 0x7FFFFFFF) >> 8) & 0x7FFF
        return (h.float() + 0.5) * (1.0 / 2 ** DITHER_BITS)

    if torch.compiler.is_compiling() or n <= _DITHER_CHUNK:
        return u_of(torch.arange(n, dtype=torch.int64, device=device))
    u = torch.empty(n, dtype=torch.float32, device=device)
    for start in range(0, n, _DITHER_CHUNK):
        stop = min(n, start + _DITHER_CHUNK)
        u[start:stop] = u_of(torch.arange(start, stop, dtype=torch.int64, device=device))
    return u


@fused
def _encode_pass(x: torch.Tensor, lo: torch.Tensor, inv: torch.Tensor, seed: torch.Tensor,
                 bits: int, channels_last: bool) -> torch.Tensor:
    """Codes floor((x - lo) * inv + u), planar-packed. lo, inv float32 (N, C); seed int64 (1,);
    u = (h + 1/2) / 2^15, h = 15 bits of _hash31((seed + k) mod 2^31) for the value's padded
    memory-order index k."""
    per = 8 // bits
    v = (x.float() - lo[:, :, None, None]) * inv[:, :, None, None]  # (N, C, H, W), in [0, 2^B - 1]
    flat = memory_order_flat(v, channels_last)
    pad = plane_size(flat.numel(), bits) * per - flat.numel()
    if pad:
        flat = F.pad(flat, (0, pad))
    u = _dither(flat.numel(), seed, x.device)
    q = (flat + u).to(torch.int32).clamp_max((1 << bits) - 1).view(per, -1)  # v + u >= 0: truncation = floor
    packed = q[0]
    for i in range(1, per):
        packed = packed | (q[i] << (bits * i))
    return packed.to(torch.uint8)


@fused
def _decode_pass(packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...],
                 channels_last: bool, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """lo + code * scale, (N, C, H, W) in the given layout and dtype."""
    per, mask = 8 // bits, (1 << bits) - 1
    if per > 1 and shape[0] % per == 0:
        # plane i is then the i-th chunk of the batch: the codes are one broadcast of the bytes
        # against the shifts, in memory order, which a compiled pass reads inside its loop (no
        # buffer of all codes: 8 MiB at ResNet-18's first stage, batch 128, 4 bits)
        rest = (shape[2], shape[3], shape[1]) if channels_last else tuple(shape[1:])
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device).view(per, 1, 1, 1, 1)
        codes = ((packed.view(1, shape[0] // per, *rest) >> shifts) & mask).reshape(-1)
    else:
        planes = [(packed >> (bits * i)) & mask for i in range(per)] if per > 1 else [packed]
        codes = torch.cat(planes)[: math.prod(shape)]
    q = from_memory_order(codes, shape, channels_last)
    out = q.float() * scale.float()[:, :, None, None] + lo.float()[:, :, None, None]
    return out.to(dtype)


@fused
def _decode_plane(packed: torch.Tensor, shift: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor,
                  shape: tuple[int, ...], channels_last: bool, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The samples whose codes sit `shift` bits up in these bytes (a plane: dequantize_by_chunk),
    decoded: the plane's bits taken out, one code a byte, then `_decode_pass` as 8-bit codes.
    Compiled, taking the bits out runs inside the decoding loop (no byte buffer, no two small ops
    a chunk). `shift` is a 0-d uint8 tensor, so one compiled loop serves every plane of a shape."""
    if bits < 8:
        packed = (packed >> shift) & ((1 << bits) - 1)
    return _decode_pass(packed, lo, scale, shape, channels_last, 8, dtype)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def group_range(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel) minimum (rounded down) and step (rounded up), bfloat16 (N, C)."""
    lo, scale, _ = _range_pass(x, bits)
    return lo, scale


def dither_seed(device, generator: torch.Generator | None = None) -> torch.Tensor:
    """The per-call random seed of the dither: int64 (1,) uniform in [0, 2^31), on `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, 1 << 31, (1,), generator=generator, device=gen_device).to(device)


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """The (N, C, H, W) whose (n, c) groups code `x`: itself when 4-D; (N, F) -> one group per
    sample (N, 1, F, 1); (N, L, C) -> one per token (N, L, C, 1)."""
    if x.dim() == 4:
        return x
    if x.dim() == 2:
        return x.reshape(x.shape[0], 1, x.shape[1], 1)
    if x.dim() == 3:
        return x.unsqueeze(-1)
    raise ValueError(f"quantize takes 2-, 3- or 4-D tensors, got shape {tuple(x.shape)}")


def quantize(x: torch.Tensor, bits: int, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PackedShape]:
    """x (N, C, H, W) -> (packed codes uint8, lo bf16 (N, C), scale bf16 (N, C), shape info).
    2- and 3-D tensors are coded per sample / per token (`_as_4d`)."""
    if bits not in BITS:
        raise ValueError(f"{bits} bits are not supported; use one of {BITS}")
    orig = tuple(x.shape) if x.dim() != 4 else None
    x = _as_4d(x)
    lo, scale, inv = _range_pass(x, bits)
    cl = is_channels_last(x)
    packed = _encode_pass(x, lo.float(), inv, dither_seed(x.device, generator), bits, cl)
    return packed, lo, scale, PackedShape(tuple(x.shape), cl, bits, x.dtype, orig)


def dequantize(packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, info: PackedShape) -> torch.Tensor:
    """The reconstruction lo + code * scale, in the original shape, layout and dtype."""
    out = _decode_pass(packed, lo, scale, info.shape, info.channels_last, info.bits, info.dtype)
    return out if info.orig_shape is None else out.reshape(info.orig_shape)


def dequantize_by_chunk(packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, info: PackedShape,
                        chunks: int = 4):
    """The same reconstruction a batch chunk at a time: yields (samples, chunk), `samples` the
    slice of the batch `chunk` holds, in order. Where the batch divides into the 8/B planes,
    plane i holds the i-th 1/(8/B) of the batch (a sample's codes are consecutive bytes of it),
    and each chunk, at most 1/`chunks` of the batch, is decoded on its own: a caller using the
    chunks one by one never holds the whole reconstruction (at ResNet-18's first stage, batch
    128: 8 MiB at a time instead of 32). Otherwise the whole tensor at once."""
    per, n = 8 // info.bits, info.shape[0]
    if info.orig_shape is not None or n % per:
        yield slice(None), dequantize(packed, lo, scale, info)
        return
    m = n // per
    step = -(-m // max(1, -(-chunks // per)))  # samples a chunk holds, within one plane
    per_sample = packed.numel() // m
    for i in range(per):
        shift = torch.full((), info.bits * i, dtype=torch.uint8, device=packed.device)
        for a in range(0, m, step):
            b = min(m, a + step)
            samples = slice(i * m + a, i * m + b)
            yield samples, _decode_plane(packed[a * per_sample: b * per_sample], shift, lo[samples], scale[samples],
                                         (b - a, *info.shape[1:]), info.channels_last, info.bits, info.dtype)
