"""Triton kernels for the fast path on CUDA: the mask and coding passes, BatchNorm's kept x_hat,
one kernel each, and BatchNorm's backward reading what it kept (float8/bf16 x_hat, or B-bit
codes) directly.

`KERNELS` maps each fused pass of core.method.fastpath (by name) to its kernel. Each replaces
several PyTorch passes by one, reading and writing exactly the bytes the reference does
(core.method.masks, core.method.quantize, core.method.norms): bit-identical results, except
BatchNorm's backward, whose sums run in another order (equal to float32 rounding). Tests run
them under Triton's interpreter (TRITON_INTERPRET=1) on the CPU against the reference on small
shapes, and compile each to a cubin for sm_80 and sm_90, so CI checks them without a GPU.
Loaded by core.method.fastpath on the first CUDA call; never imported on a machine without
Triton.

Layout: every tensor is handed over as its memory-order vector (NCHW, or NHWC for
channels_last), so a kernel walks contiguous memory. Masks and codes are packed planar: byte j
holds element j of each of the 8/B planes (core.method.quantize explains why).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import from_memory_order, in_memory_order, is_channels_last, memory_order_flat

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
def _channel_of(idx, C, HW, CHANNELS_LAST: tl.constexpr):
    """The channel of memory-order positions idx: NHWC for channels_last, else NCHW."""
    if CHANNELS_LAST:
        c = idx % C
    else:
        c = (idx // HW) % C
    return c


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
        grp = idx // (HW * C) * C + _channel_of(idx, C, HW, CHANNELS_LAST)  # (sample, channel)
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
        grp = idx // (HW * C) * C + _channel_of(idx, C, HW, CHANNELS_LAST)
        lo = tl.load(lo_ptr + grp, mask=inside, other=0.0)
        scale = tl.load(scale_ptr + grp, mask=inside, other=0.0)
        code = ((byte >> (BITS * i)) & top).to(tl.float32)
        tl.store(out_ptr + idx, code * scale + lo, mask=inside)


@triton.jit
def _round_bf16(v):
    """v (float32) rounded to the nearest bfloat16, ties to even, as float32: bit arithmetic,
    so the interpreter and a GPU round alike (a cast rounds differently under the interpreter)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # keep the top 16 bits
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest float8 e4m3 value, ties to even, as float32
    with v's sign (a value rounding to zero keeps it, as a cast does). Scaled by a power of two
    so that e4m3's spacing there is 1, rounded to an integer by adding and taking away 1.5 * 2^23,
    scaled back: every step exact."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # below 2^-6: the subnormals' spacing, 2^-9
    spacing = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
    r = ((v * inverse + 12582912.0) - 12582912.0) * spacing
    r_bits = (r.to(tl.int32, bitcast=True) & 0x7FFFFFFF) | (bits & -2147483648)
    return r_bits.to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_bits(r):
    """The float8 e4m3fn byte of r (float32 on the e4m3 grid, or NaN), built from r's bits (the
    interpreter's cast turns NaN into 384): NaN is 0x7F with r's sign, as PyTorch's cast gives."""
    bits = r.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    e = (magnitude >> 23) - 127
    normal = ((e + 7) << 3) | ((magnitude >> 20) & 7)  # 3 mantissa bits (r is on the grid)
    subnormal = (tl.abs(r) * 512.0).to(tl.int32)  # below 2^-6: a multiple of 2^-9
    byte = tl.where(magnitude > 0x7F800000, 0x7F, tl.where(e >= -6, normal, subnormal))
    return (byte | ((bits >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def _bn_keep_kernel(x_ptr, mean_ptr, invstd_ptr, out_ptr, n, C, HW, X_BF16: tl.constexpr, STORE_FP8: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """out = x_hat = (x - mean) * invstd in x's dtype (each op rounded to bfloat16 for a bf16 x, as
    PyTorch's element-wise ops do), clamped to +-448 and rounded for float8, in the store dtype."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    c = _channel_of(idx, C, HW, CHANNELS_LAST)
    if X_BF16:  # x's bits (int16) widened by hand, as the store below: exact for subnormals too
        x = (tl.load(x_ptr + idx, mask=inside, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(x_ptr + idx, mask=inside, other=0.0)
    v = x - tl.load(mean_ptr + c, mask=inside, other=0.0)
    if X_BF16:
        v = _round_bf16(v)
    v = v * tl.load(invstd_ptr + c, mask=inside, other=0.0)
    if X_BF16:
        v = _round_bf16(v)
    if STORE_FP8:
        # clamp as torch.clamp does, NaN kept (Triton's minimum/maximum drop it by default)
        v = _round_e4m3(tl.minimum(tl.maximum(v, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                                   propagate_nan=tl.PropagateNan.ALL))
        tl.store(out_ptr + idx, _e4m3_bits(v), mask=inside)  # out as bytes
    else:  # bfloat16 as its bits (int16): the top half of v's, once rounded
        if not X_BF16:
            v = _round_bf16(v)
        tl.store(out_ptr + idx, (v.to(tl.int32, bitcast=True) >> 16).to(tl.int16), mask=inside)


@triton.jit
def _load_hat(hat_ptr, packed_ptr, lo_ptr, scale_ptr, mean_ptr, invstd_ptr, idx, inside, c, s, m, C,
              CODES: tl.constexpr, BITS: tl.constexpr):
    """x_hat at memory-order positions idx, float32 in registers: the kept x_hat widened, or
    (CODES) x decoded from its planar codes as core.method.quantize._decode_pass does, then
    normalised as core.method.norms._bn_backward_from_codes does."""
    if CODES:
        plane = tl.where(inside, idx // m, 0)  # lanes past the end: no shift past the byte
        byte = tl.load(packed_ptr + (idx - plane * m), mask=inside, other=0).to(tl.int32)
        code = ((byte >> (BITS * plane)) & ((1 << BITS) - 1)).to(tl.float32)
        grp = s * C + c
        x = code * tl.load(scale_ptr + grp, mask=inside, other=0.0) + tl.load(lo_ptr + grp, mask=inside, other=0.0)
        xh = (x - tl.load(mean_ptr + c, mask=inside, other=0.0)) * tl.load(invstd_ptr + c, mask=inside, other=0.0)
    else:
        xh = tl.load(hat_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    return xh


@triton.jit
def _bn_sums_rows_kernel(g_ptr, hat_ptr, packed_ptr, lo_ptr, scale_ptr, mean_ptr, invstd_ptr, sb_ptr, sw_ptr,
                         m, C, HW, CODES: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """NCHW: program r sums row r = (sample s, channel c) of HW values: sum g, sum g * x_hat."""
    r = tl.program_id(0)
    c, s = r % C, r // C
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < HW
        idx = r * HW + offs
        g = tl.load(g_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        xh = _load_hat(hat_ptr, packed_ptr, lo_ptr, scale_ptr, mean_ptr, invstd_ptr, idx, inside, c + 0 * offs,
                       s + 0 * offs, m, C, CODES, BITS)
        acc_b += g
        acc_w += g * xh
    tl.store(sb_ptr + r, tl.sum(acc_b, axis=0))
    tl.store(sw_ptr + r, tl.sum(acc_w, axis=0))


@triton.jit
def _bn_sums_columns_kernel(g_ptr, hat_ptr, packed_ptr, lo_ptr, scale_ptr, mean_ptr, invstd_ptr, sb_ptr, sw_ptr,
                            m, C, HW, R, ROWS, CODES: tl.constexpr, BITS: tl.constexpr, RB: tl.constexpr,
                            CB: tl.constexpr):
    """NHWC: the (R = N*H*W, C) matrix; program (p, q) sums rows [p*ROWS, (p+1)*ROWS) of the
    channels [q*CB, (q+1)*CB) into partial row p."""
    p, q = tl.program_id(0), tl.program_id(1)
    cols = q * CB + tl.arange(0, CB)
    acc_b = tl.zeros([RB, CB], dtype=tl.float32)
    acc_w = tl.zeros([RB, CB], dtype=tl.float32)
    for start in range(0, ROWS, RB):  # ROWS is a multiple of RB
        rows = p * ROWS + start + tl.arange(0, RB)
        inside = (rows[:, None] < R) & (cols[None, :] < C)
        idx = rows[:, None] * C + cols[None, :]
        g = tl.load(g_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        xh = _load_hat(hat_ptr, packed_ptr, lo_ptr, scale_ptr, mean_ptr, invstd_ptr, idx, inside, cols[None, :],
                       rows[:, None] // HW, m, C, CODES, BITS)
        acc_b += g
        acc_w += g * xh
    keep = cols < C
    tl.store(sb_ptr + p * C + cols, tl.sum(acc_b, axis=0), mask=keep)
    tl.store(sw_ptr + p * C + cols, tl.sum(acc_w, axis=0), mask=keep)


@triton.jit
def _bn_grad_input_kernel(g_ptr, hat_ptr, packed_ptr, lo_ptr, scale_ptr, mean_ptr, invstd_ptr, k_ptr, mb_ptr,
                          mw_ptr, out_ptr, n, m, C, HW, CODES: tl.constexpr, BITS: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """gx = k * (g - mean(g) - x_hat * mean(g * x_hat)) per channel, k = weight * invstd."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    c = _channel_of(idx, C, HW, CHANNELS_LAST)
    s = idx // (HW * C)
    g = tl.load(g_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    xh = _load_hat(hat_ptr, packed_ptr, lo_ptr, scale_ptr, mean_ptr, invstd_ptr, idx, inside, c, s, m, C, CODES, BITS)
    k = tl.load(k_ptr + c, mask=inside, other=0.0)
    mb = tl.load(mb_ptr + c, mask=inside, other=0.0)
    mw = tl.load(mw_ptr + c, mask=inside, other=0.0)
    tl.store(out_ptr + idx, k * (g - mb - xh * mw), mask=inside)


# Triton compiles float8 e4m3 loads and stores from compute capability 8.9 (Ada, Hopper) on
_NEEDS = {torch.float8_e4m3fn: (8, 9)}


def can_use(dtype: torch.dtype, capability: tuple[int, int]) -> bool:
    """Whether a kernel can read or write `dtype` on a card of this compute capability."""
    return tuple(capability) >= _NEEDS.get(dtype, (0, 0))


def _bn_backward(g, shape, channels_last, weight, invstd, hat=None, codes=None, mean=None, bits=8, over=False):
    """BatchNorm's backward in two passes over g and the kept input (x_hat, or codes (packed, lo,
    scale)), in the kept input's memory order: per-channel partial sums (deterministic: a fixed
    split, summed by torch), then the input gradient; -> (gx in g's layout, g_gamma, g_beta).
    `over`: the input gradient written over g (float32, in that memory order; each element is
    read before it is written, by the same program)."""
    n_, C = shape[0], shape[1]
    HW = math.prod(shape[2:])
    n = n_ * C * HW
    assert n < 2 ** 31, "the kernels index with int32"
    g_flat = _flat(g, channels_last)  # a copy only where g's layout differs from the kept input's
    dev = g.device
    # the kernels take both sources' pointers; the one a variant does not read gets a placeholder
    if codes is None:
        hat_flat, m = _flat(hat, channels_last), n
        packed = lo = scale = mean = invstd
    else:
        packed, lo, scale = codes
        hat_flat, m = g_flat, packed.numel()
        lo, scale = lo.float().contiguous(), scale.float().contiguous()
    mean, invstd32 = mean.float().contiguous(), invstd.float().contiguous()
    common = dict(CODES=codes is not None, BITS=bits)
    args = (g_flat, hat_flat, packed, lo, scale, mean, invstd32)
    if channels_last:
        R, CB = n_ * HW, min(64, triton.next_power_of_2(C))
        rows = min(1024, max(16, triton.next_power_of_2(R)))  # a multiple of RB (16)
        parts = triton.cdiv(R, rows)
        sb = torch.empty(parts, C, dtype=torch.float32, device=dev)
        sw = torch.empty_like(sb)
        _bn_sums_columns_kernel[(parts, triton.cdiv(C, CB))](*args, sb, sw, m, C, HW, R, rows, RB=16, CB=CB, **common)
    else:
        sb = torch.empty(n_ * C, dtype=torch.float32, device=dev)
        sw = torch.empty_like(sb)
        block = min(BLOCK, triton.next_power_of_2(HW))
        _bn_sums_rows_kernel[(n_ * C,)](*args, sb, sw, m, C, HW, BLOCK=block, **common)
    gb, gw = sb.view(-1, C).sum(0), sw.view(-1, C).sum(0)
    count = n // C
    k = invstd32 if weight is None else weight.float() * invstd32
    out = g_flat if over else torch.empty(n, dtype=torch.float32, device=dev)
    _bn_grad_input_kernel[_grid(n)](*args, k.contiguous(), (gb / count).contiguous(), (gw / count).contiguous(), out,
                                    n, m, C, HW, CHANNELS_LAST=channels_last, BLOCK=BLOCK, **common)
    if over:
        return g, gw, gb
    gx = from_memory_order(out, shape, channels_last)
    if is_channels_last(g) != channels_last:  # the reference's output follows g's layout
        gx = gx.contiguous(memory_format=torch.channels_last if is_channels_last(g) else torch.contiguous_format)
    return gx, gw, gb


def bn_keep(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, store: torch.dtype) -> torch.Tensor:
    """BatchNorm's kept x_hat in one pass, the bits of core.method.norms._bn_keep (float32 or
    bf16 x, any card: it writes bytes; for a float16 x NotImplemented, and the dispatcher runs
    the pass's other version)."""
    if x.dtype not in (torch.float32, torch.bfloat16) or store not in (torch.bfloat16, torch.float8_e4m3fn) or (
            x.dim() != 4):
        return NotImplemented
    cl = is_channels_last(x)
    flat = _flat(x, cl)
    n, C = flat.numel(), x.shape[1]
    assert n < 2 ** 31, "the kernel indexes with int32"
    out = torch.empty(n, dtype=store, device=x.device)
    # mean and invstd as the reference uses them: in x's dtype (exact in float32)
    m, s = (t.to(x.dtype).float().contiguous() for t in (mean, invstd))
    as_bits = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}  # stored as bits (see the kernel)
    _bn_keep_kernel[_grid(n)](flat.view(as_bits.get(x.dtype, x.dtype)), m, s, out.view(as_bits.get(store, store)), n,
                              C, math.prod(x.shape[2:]), X_BF16=x.dtype == torch.bfloat16,
                              STORE_FP8=store == torch.float8_e4m3fn, CHANNELS_LAST=cl, BLOCK=BLOCK)
    return from_memory_order(out, tuple(x.shape), cl)


def bn_backward_from_hat(g: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor | None,
                         invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x_hat.is_cuda and not can_use(x_hat.dtype, torch.cuda.get_device_capability(x_hat.device)):
        return NotImplemented  # this card cannot load the dtype in a kernel
    return _bn_backward(g, tuple(x_hat.shape), is_channels_last(x_hat), weight, invstd, hat=x_hat)


def bn_backward_from_codes(g: torch.Tensor, packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor,
                           shape: tuple[int, ...], channels_last: bool, bits: int, weight: torch.Tensor | None,
                           mean: torch.Tensor, invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bn_backward(g, tuple(shape), channels_last, weight, invstd, codes=(packed, lo, scale), mean=mean,
                        bits=bits)


def bn_backward_from_hat_(g: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor | None,
                          invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cl = is_channels_last(x_hat)
    if g.dtype != torch.float32 or not in_memory_order(g, cl) or (
            x_hat.is_cuda and not can_use(x_hat.dtype, torch.cuda.get_device_capability(x_hat.device))):
        return NotImplemented
    return _bn_backward(g, tuple(x_hat.shape), cl, weight, invstd, hat=x_hat, over=True)


def bn_backward_from_codes_(g: torch.Tensor, packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor,
                            shape: tuple[int, ...], channels_last: bool, bits: int, weight: torch.Tensor | None,
                            mean: torch.Tensor, invstd: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if g.dtype != torch.float32 or not in_memory_order(g, channels_last):
        return NotImplemented
    return _bn_backward(g, tuple(shape), channels_last, weight, invstd, codes=(packed, lo, scale), mean=mean,
                        bits=bits, over=True)


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


def mask_apply_(g: torch.Tensor, packed: torch.Tensor, shape: tuple[int, ...], channels_last: bool, kind: str,
                slope: float) -> torch.Tensor:
    """mask_apply written over g (in the given layout): each element read, then written, by one
    program."""
    if not in_memory_order(g, channels_last):
        return NotImplemented
    flat = _flat(g, channels_last)  # a view: g is in this memory order
    _mask_apply_kernel[_grid(packed.numel())](flat, packed, flat, flat.numel(), packed.numel(), float(slope),
                                             LEAKY=kind == "leaky", BLOCK=BLOCK)
    return g


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
    "core.method.masks._mask_apply_": mask_apply_,
    "core.method.quantize._encode_pass": encode,
    "core.method.quantize._decode_pass": decode,
    "core.method.norms._bn_keep": bn_keep,
    "core.method.norms._bn_backward_from_hat": bn_backward_from_hat,
    "core.method.norms._bn_backward_from_codes": bn_backward_from_codes,
    "core.method.norms._bn_backward_from_hat_": bn_backward_from_hat_,
    "core.method.norms._bn_backward_from_codes_": bn_backward_from_codes_,
}
