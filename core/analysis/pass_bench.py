"""`bench passes`: each fast-path pass against its PyTorch reference on one activation — time,
peak memory, and whether they agree (to the bit, or how far apart).

The fast version is what a training step runs: on CUDA the pass's Triton kernel (the reference
where it has none), on the CPU its compiled version (core.method.fastpath). This is the check to
run first on a GPU: it shows, per kernel, that it gives the reference's bits there too and what
it saves, before any whole-step figure."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

from ..engine.environment import pick_device
from ..method import fastpath, masks, norms, pooling
from ..method import quantize as Q
from ..method.layout import is_channels_last
from ..method.meter import cpu_step_peak_bytes


def pass_cases(x: torch.Tensor, seed: int = 0) -> list[tuple[str, Callable, tuple]]:
    """(label, pass, its arguments) for the fast-path passes a compressed step runs, built from
    one activation x (N, C, H, W) as a step would hand them over. A pass whose name ends in "_"
    writes over its first argument, as PyTorch's in-place ops: each call gets a copy (counted in
    its time and peak)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    cl, shape = is_channels_last(x), tuple(x.shape)
    g = torch.randn(shape, generator=gen, device=x.device).contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format)
    weight = torch.rand(shape[1], generator=gen, device=x.device) + 0.5
    mean, invstd = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt()
    mask = masks._mask_pack.reference(x, "relu", 0.0, 0.0, cl)
    x_hat = norms._bn_keep.reference(x, mean, invstd, torch.float8_e4m3fn)
    lo, scale, inv = Q._range_pass.reference(x, 4)
    seed_t = Q.dither_seed(x.device, gen)
    codes = Q._encode_pass.reference(x, lo.float(), inv, seed_t, 4, cl)
    pooled = pooling.pool.reference(x, "avg", 2)
    # a conv's kept input is decoded a batch chunk at a time, each chunk one plane of the bytes:
    # here the second plane of 4-bit codes (an even batch: each plane is half of it)
    xe = x if shape[0] % 2 == 0 else torch.cat([x, x[:1]])
    m, (lo_e, scale_e, inv_e) = xe.shape[0] // 2, Q._range_pass.reference(xe, 4)
    codes_e = Q._encode_pass.reference(xe, lo_e.float(), inv_e, seed_t, 4, cl)
    return [
        ("ReLU mask: pack", masks._mask_pack, (x, "relu", 0.0, 0.0, cl)),
        ("ReLU mask: apply", masks._mask_apply, (g, mask, shape, cl, "relu", 0.0)),
        ("ReLU mask: apply over g", masks._mask_apply_, (g, mask, shape, cl, "relu", 0.0)),
        ("codes: range", Q._range_pass, (x, 4)),
        ("codes: encode 4-bit", Q._encode_pass, (x, lo.float(), inv, seed_t, 4, cl)),
        ("codes: decode 4-bit", Q._decode_pass, (codes, lo, scale, shape, cl, 4, torch.float32)),
        ("codes: decode a plane of 4-bit", Q._decode_plane,
         (codes_e, torch.full((), 4, dtype=torch.uint8, device=x.device), lo_e[m:], scale_e[m:], (m, *shape[1:]),
          cl, 4, torch.float32)),
        ("BN: keep x_hat float8", norms._bn_keep, (x, mean, invstd, torch.float8_e4m3fn)),
        ("BN: keep x_hat bf16", norms._bn_keep, (x, mean, invstd, torch.bfloat16)),
        ("BN: backward from float8 x_hat", norms._bn_backward_from_hat, (g, x_hat, weight, invstd)),
        ("BN: backward from 4-bit codes", norms._bn_backward_from_codes,
         (g, codes, lo, scale, shape, cl, 4, weight, mean, invstd)),
        ("BN: backward from float8 x_hat over g", norms._bn_backward_from_hat_, (g, x_hat, weight, invstd)),
        ("BN: backward from 4-bit codes over g", norms._bn_backward_from_codes_,
         (g, codes, lo, scale, shape, cl, 4, weight, mean, invstd)),
        ("pool: avg 2", pooling.pool, (x, "avg", 2)),
        ("pool: upsample 2", pooling.upsample, (pooled, 2, shape[2:])),
    ]


def _call(fn: Callable, args: tuple, over: bool) -> Callable:
    """fn(*args) as a call to time; on a copy of the first argument where the pass writes over it."""
    if not over:
        return functools.partial(fn, *args)
    return lambda: fn(args[0].clone(memory_format=torch.preserve_format), *args[1:])


def _tensors(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def agreement(ref, fast) -> tuple[bool, float]:
    """(whether every output has the reference's bits, dtype, shape and strides; the largest
    difference relative to the largest reference value, inf for another dtype, shape or layout)."""
    same, worst = True, 0.0
    for r, f in zip(_tensors(ref), _tensors(fast), strict=True):
        if (r.dtype, r.shape, r.stride()) != (f.dtype, f.shape, f.stride()):
            return False, float("inf")
        if torch.equal(r.contiguous().view(torch.uint8), f.contiguous().view(torch.uint8)):
            continue
        same = False
        r64, f64 = r.double(), f.double()
        worst = max(worst, ((r64 - f64).abs().max() / r64.abs().max().clamp_min(1e-30)).item())
    return same, worst


def bench_passes(batch=128, channels=64, size=32, device="auto", repeats=20, channels_last=True,
                 reference=False) -> list[dict]:
    """Per pass: median time of the reference and of the fast version (interleaved repeats; CUDA
    events on a GPU), each call's peak memory above what existed before (outputs included; CUDA
    max_memory_allocated, the CPU allocator's events), and how they agree (`same_bits`,
    `max_rel_diff`)."""
    device = pick_device(device)
    was_compiled, was_triton = fastpath.compiled_in_use(), fastpath.triton_on()
    if device.type == "cuda":  # a CUDA step runs the Triton kernels, else the reference
        fastpath.use_triton(not reference)
        fastpath.use_compiled(False)
        fast_kind = "triton" if not reference and fastpath.triton_available() else "reference"
    else:
        fast_kind = "compiled" if fastpath.use_compiled(not reference) else "reference"
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen, device=device) * 1.5 + 0.2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cuda = device.type == "cuda"

    def timed(call) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0

    def peak(call) -> int:
        if not cuda:
            return cpu_step_peak_bytes(call)["step_peak_bytes"]
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before

    rows = []
    try:
        for label, fn, args in pass_cases(x):
            over = fn.pass_name.endswith("_")
            ref_call, fast_call = _call(fn.reference, args, over), _call(fn, args, over)
            kind = fast_kind
            if kind == "triton":  # no kernel for this pass, or one that declines these inputs: the reference runs
                kernel = fastpath._triton.get(fn.pass_name) if fastpath._load_kernels() else None
                if kernel is None or _call(kernel, args, over)() is NotImplemented:
                    kind = "reference"
            same, diff = agreement(ref_call(), fast_call())  # also the warm-up (compiles)
            times = {"ref": [], "fast": []}
            for _ in range(repeats):
                times["ref"].append(timed(ref_call))
                times["fast"].append(timed(fast_call))
            ref_s, fast_s = statistics.median(times["ref"]), statistics.median(times["fast"])
            rows.append({"pass": label, "name": fn.pass_name, "fast": kind, "ref_ms": ref_s * 1000,
                         "fast_ms": fast_s * 1000, "speedup": ref_s / fast_s, "ref_peak_bytes": peak(ref_call),
                         "fast_peak_bytes": peak(fast_call), "same_bits": same, "max_rel_diff": diff})
    finally:  # as it was before
        fastpath.use_triton(was_triton)
        if fastpath.compiled_in_use() != was_compiled:
            fastpath.use_compiled(was_compiled)
    return rows
