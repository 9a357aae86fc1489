"""Triton kernels for the fast path on CUDA: the mask and coding passes, one kernel each.

`KERNELS` maps each fused pass of core.method.fastpath (by name) to its kernel. Each replaces
several PyTorch passes by one, reading and writing exactly the bytes the
reference does (core.method.masks, core.method.quantize) and giving bit-identical results:
tests run them under Triton's interpreter (TRITON_INTERPRET=1) on the CPU against the
reference on small shapes, so CI checks them without a GPU. Loaded by core.method.fastpath
on the first CUDA call; never imported on a machine without Triton.

Layout: every tensor is handed over as its memory-order vector (NCHW, or NHWC for
channels_last), so a kernel walks contiguous memory. Masks and codes are packed planar: byte j
holds element j of each of the 8/B planes (core.method.quantize explains why).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import from_memory_order, memory_order_flat

BLOCK = 1024


@triton.jit
def _mask_pack_kernel(x_ptr, out_ptr, n, m, a, b, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """out[j] = sum_i region(x[i*m + j]) << i over the 8 planes (KIND 0: x > 0; 1: a < x < b)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = j < m
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(8):
        idx = i * m + j
        inside = keep & (idx < n)
        x = tl.load(x_ptr + idx, mask=inside, other=0.0)
        if KIND == 0:
            bit = x > 0
        else:
            bit = (x > a) & (x < b)
        acc += (bit & inside).to(tl.int32) << i  # the padding past n stays 0, as in the reference
    tl.store(out_ptr + j, acc.to(tl.uint8), mask=keep)


@triton.jit
def _mask_apply_kernel(g_ptr, packed_ptr, out_ptr, n, m, slope, LEAKY: tl.constexpr, BLOCK: tl.constexpr):
    """out[i*m + j] = g * (1 where bit i of packed[j], else slope)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = j < m
    byte = tl.load(packed_ptr + j, mask=keep, other=0).to(tl.int32)
    for i in tl.static_range(8):
        idx = i * m + j
        inside = keep & (idx < n)
        g = tl.load(g_ptr + idx, mask=inside, other=0.0)
        on = ((byte >> i) & 1) != 0
        if LEAKY:
            factor = tl.where(on, 1.0, slope)
        else:
            factor = tl.where(on, 1.0, 0.0)
        tl.store(out_ptr + idx, g * factor.to(g.dtype), mask=inside)


@triton.jit
def _encode_kernel(x_ptr, lo_ptr, inv_ptr, seed_ptr, out_ptr, n, m, C, HW,
                   BITS: tl.constexpr, PER: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """out[j] = sum_i q(i*m + j) << (BITS*i), q = floor((x - lo) * inv + u), u from the hash of
    (seed + index) as in core.method.quantize._encode_pass."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = j < m
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    top = (1 << BITS) - 1
    seed = tl.load(seed_ptr)
    for i in tl.static_range(PER):
        idx = i * m + j
        inside = keep & (idx < n)
        if CHANNELS_LAST:  # memory order n, h, w, c
            c = idx % C
            s = idx // (HW * C)
        else:  # n, c, h, w
            c = (idx // HW) % C
            s = idx // (HW * C)
        grp = s * C + c
        x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        lo = tl.load(lo_ptr + grp, mask=inside, other=0.0)
        inv = tl.load(inv_ptr + grp, mask=inside, other=0.0)
        h = (idx.to(tl.int64) + seed) & 0x7FFFFFFF
        h = h ^ (h >> 16)
        h = (h * 0x7FEB352D) & 0x7FFFFFFF
        h = h ^ (h >> 15)
        h = (h * 0x846CA68B) & 0x7FFFFFFF
        h = h ^ (h >> 16)
        u = (((h >> 8) & 0x7FFF).to(tl.float32) + 0.5) * (1.0 / 32768.0)
        q = ((x - lo) * inv + u).to(tl.int32)
        q = tl.minimum(q, top)
        q = tl.where(inside, q, 0)
        acc += q << (BITS * i)
    tl.store(out_ptr + j, acc.to(tl.uint8), mask=keep)


@triton.jit
def _decode_kernel(packed_ptr, lo_ptr, scale_ptr, out_ptr, n, m, C, HW,
                   BITS: tl.constexpr, PER: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """out[i*m + j] = lo + code * scale, code = the BITS bits of packed[j] at BITS*i."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = j < m
    byte = tl.load(packed_ptr + j, mask=keep, other=0).to(tl.int32)
    top = (1 << BITS) - 1
    for i in tl.static_range(PER):
        idx = i * m + j
        inside = keep & (idx < n)
        if CHANNELS_LAST:
            c = idx % C
            s = idx // (HW * C)
        else:
            c = (idx // HW) % C
            s = idx // (HW * C)
        grp = s * C + c
        lo = tl.load(lo_ptr + grp, mask=inside, other=0.0)
        scale = tl.load(scale_ptr + grp, mask=inside, other=0.0)
        code = ((byte >> (BITS * i)) & top).to(tl.float32)
        tl.store(out_ptr + idx, code * scale + lo, mask=inside)


def _grid(m: int):
    return (triton.cdiv(m, BLOCK),)


def _flat(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return (memory_order_flat(t, channels_last) if t.dim() == 4 else t.reshape(-1)).contiguous()


def mask_pack(x: torch.Tensor, kind: str, a: float, b: float, channels_last: bool) -> torch.Tensor:
    flat = _flat(x, channels_last)
    n = flat.numel()
    m = -(-n // 8)
    out = torch.empty(m, dtype=torch.uint8, device=x.device)
    lo, hi = (a, b) if kind == "hardtanh" else (0.0, 0.0)
    _mask_pack_kernel[_grid(m)](flat, out, n, m, lo, hi, KIND=1 if kind == "hardtanh" else 0, BLOCK=BLOCK)
    return out


def mask_apply(g: torch.Tensor, packed: torch.Tensor, shape: tuple[int, ...], channels_last: bool, kind: str,
               slope: float) -> torch.Tensor:
    flat = _flat(g, channels_last)
    n = flat.numel()
    out = torch.empty_like(flat)
    _mask_apply_kernel[_grid(packed.numel())](flat, packed, out, n, packed.numel(), float(slope),
                                             LEAKY=kind == "leaky", BLOCK=BLOCK)
    return from_memory_order(out, shape, channels_last) if len(shape) == 4 else out.view(shape)


def encode(x: torch.Tensor, lo: torch.Tensor, inv: torch.Tensor, seed: torch.Tensor, bits: int,
           channels_last: bool) -> torch.Tensor:
    flat = _flat(x, channels_last)
    n, per = flat.numel(), 8 // bits
    m = -(-n // per)
    out = torch.empty(m, dtype=torch.uint8, device=x.device)
    _encode_kernel[_grid(m)](flat, lo.float().contiguous(), inv.float().contiguous(), seed.contiguous(), out, n, m,
                             x.shape[1], math.prod(x.shape[2:]), BITS=bits, PER=per,
                             CHANNELS_LAST=channels_last, BLOCK=BLOCK)
    return out


def decode(packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...],
           channels_last: bool, bits: int, dtype: torch.dtype) -> torch.Tensor:
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    _decode_kernel[_grid(packed.numel())](packed, lo.float().contiguous(), scale.float().contiguous(), out, n,
                                          packed.numel(), shape[1], math.prod(shape[2:]), BITS=bits,
                                          PER=8 // bits, CHANNELS_LAST=channels_last, BLOCK=BLOCK)
    return from_memory_order(out, shape, channels_last).to(dtype)


# the fused passes (core.method.fastpath names) these kernels replace on CUDA
KERNELS = {
    "core.method.masks._mask_pack": mask_pack,
    "core.method.masks._mask_apply": mask_apply,
    "core.method.quantize._encode_pass": encode,
    "core.method.quantize._decode_pass": decode,
}
