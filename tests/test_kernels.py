"""The fast path against the reference: compiled CPU passes and Triton kernels (run under
Triton's interpreter on the CPU, so CI checks them without a GPU) give the same bits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.method import compress_model, fastpath, masks, norms, pooling
from core.method import quantize as Q
from core.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _cases():
    for channels_last in (False, True):
        for shape in ((2, 3, 5, 7), (3, 8, 4, 4)):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
            yield (x.contiguous(memory_format=torch.channels_last) if channels_last else x), channels_last


def _all_passes(x, cl):
    """Every element-wise fused pass on x: the masks of the three kinds, codes of every width,
    BN's x_hat, pooling (odd sizes: partial edge blocks) and upsampling back (cropped)."""
    out = []
    for kind, k in (("avg", 2), ("max", 2), ("avg", 3)):
        pooled = pooling.pool(x, kind, k)
        out += [pooled, pooling.upsample(pooled, k, tuple(x.shape[2:]))]
    for kind, a, b in (("relu", 0.0, 0.0), ("hardtanh", -0.3, 0.4), ("leaky", 0.1, 0.0)):
        p = masks._mask_pack(x, kind, a, b, cl)
        out += [p, masks._mask_apply(x * 2, p, tuple(x.shape), cl, kind, a if kind == "leaky" else 0.0)]
    for bits in Q.BITS:
        codes = Q.quantize(x, bits, generator=torch.Generator().manual_seed(bits))
        out += [codes[0], Q.dequantize(*codes)]
    mean, invstd = x.mean((0, 2, 3)), x.var((0, 2, 3)).add(1e-5).rsqrt()
    for store in (torch.bfloat16, torch.float8_e4m3fn):
        kept = norms._bn_keep(x, mean, invstd, store)
        out.append(kept.float())
    return out


def _bn_backward_passes(x, cl):
    """BatchNorm's two backward passes (from the kept x_hat, from the codes of x)."""
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format)
    weight = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(8)) + 0.5
    mean, invstd = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt()
    x_hat = norms._bn_keep(x, mean, invstd, torch.float8_e4m3fn)
    packed, lo, scale, info = Q.quantize(x, 2, generator=torch.Generator().manual_seed(9))
    return [*norms._bn_backward_from_hat(g, x_hat, weight, invstd),
            *norms._bn_backward_from_codes(g, packed, lo, scale, info.shape, cl, 2, weight, mean, invstd)]


def test_compiled_passes_are_bit_identical_to_the_reference():
    cases = list(_cases())
    reference = [_all_passes(x, cl) for x, cl in cases]
    try:
        if not fastpath.use_compiled(True):
            pytest.skip("torch.compile unavailable here (no C++ compiler)")
        assert fastpath.compiled_in_use()
        compiled = [_all_passes(x, cl) for x, cl in cases]
    finally:
        fastpath.use_compiled(False)
    for ref, got in zip(reference, compiled):
        for r, g in zip(ref, got):
            assert torch.equal(r, g) and r.stride() == g.stride()


def test_compiled_batchnorm_backward_matches_the_reference_to_float32_rounding():
    """Its sums run in another order when compiled, so equal to rounding (relative 1e-5 of the
    largest value), not to the bit; the layout is the gradient's."""
    cases = list(_cases())
    reference = [_bn_backward_passes(x, cl) for x, cl in cases]
    try:
        if not fastpath.use_compiled(True):
            pytest.skip("torch.compile unavailable here (no C++ compiler)")
        compiled = [_bn_backward_passes(x, cl) for x, cl in cases]
    finally:
        fastpath.use_compiled(False)
    for ref, got in zip(reference, compiled):
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-5 * r.abs().max().item())
            assert r.stride() == g.stride()


def test_a_training_step_is_the_same_on_the_fast_path():
    """Same weights, same batch, same RNG: the fast path's gradients equal the reference's, bit
    for bit where only element-wise passes are fused (the same operations in the same order);
    where BatchNorm's backward reductions are compiled (bn8, bn2: their sums run in another
    order), to float32 rounding: within 1e-5 of each gradient's largest value (seen: 2e-6)."""
    x, y = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (4,))
    for policy in ("avg2+mask+bn8", "max4+mask", "q2+mask+bn2"):
        grads = []
        for compiled in (False, True):
            torch.manual_seed(0)
            model = compress_model(build_model("resnet20"), policy).to(memory_format=torch.channels_last)
            fastpath.use_compiled(compiled)
            try:
                torch.manual_seed(1)
                torch.nn.functional.cross_entropy(model(x), y).backward()
            finally:
                fastpath.use_compiled(False)
            grads.append([p.grad for p in model.parameters()])
        if "bn" in policy:
            for a, b in zip(*grads):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * a.abs().max().item())
        else:
            assert all(torch.equal(a, b) for a, b in zip(*grads)), policy


def test_batchnorm_from_codes_run_eagerly_decodes_through_the_dispatching_pass(monkeypatch):
    """Eagerly (the reference mode, and CUDA, where no pass is compiled) BatchNorm's backward
    from codes decodes through the registered pass, so CUDA runs its Triton decode kernel; only
    a compiled trace inlines the reference decode."""
    name = Q._decode_pass.pass_name
    calls = []

    def spy(*args):
        calls.append(args[3])
        return Q._decode_pass.reference(*args)

    monkeypatch.setitem(fastpath._active, name, spy)
    x = torch.randn(2, 3, 4, 4)
    packed, lo, scale, info = Q.quantize(x, 4)
    g, mean, invstd = torch.randn_like(x), x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt()
    norms._bn_backward_from_codes(g, packed, lo, scale, info.shape, info.channels_last, 4, None, mean, invstd)
    assert calls == [info.shape]


@pytest.mark.skipif(not fastpath.triton_available(), reason="Triton is not installed")
def test_every_kernel_replaces_a_registered_pass():
    from core.method.kernels import KERNELS

    assert KERNELS and set(KERNELS) <= set(fastpath._reference)


@pytest.mark.skipif(not fastpath.triton_available(), reason="Triton is not installed")
def test_triton_kernels_under_the_interpreter_equal_the_reference():
    code = r'''
import torch
from core.method import kernels, masks, quantize as Q
torch.manual_seed(0)
checked = 0
for cl in (False, True):
    for shape in ((2, 3, 5, 7), (3, 8, 4, 4), (1, 16, 3, 3)):
        x = torch.randn(shape)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn(shape).contiguous(memory_format=torch.channels_last) if cl else torch.randn(shape)
        for kind, a, b in (("relu", 0.0, 0.0), ("hardtanh", -0.3, 0.4), ("leaky", 0.1, 0.0)):
            p_ref, p_k = masks._mask_pack.reference(x, kind, a, b, cl), kernels.mask_pack(x, kind, a, b, cl)
            slope = a if kind == "leaky" else 0.0
            r_ref = masks._mask_apply.reference(g, p_ref, shape, cl, kind, slope)
            r_k = kernels.mask_apply(g, p_k, shape, cl, kind, slope)
            assert torch.equal(p_ref, p_k) and torch.equal(r_ref, r_k) and r_k.stride() == r_ref.stride(), kind
            checked += 2
        for bits in Q.BITS:
            lo, sc = Q.group_range(x, bits)
            s = sc.float()
            inv = torch.where(s > 0, 1 / s.clamp_min(1e-30), torch.zeros_like(s))
            d = Q.dither_seed("cpu")
            e_ref = Q._encode_pass.reference(x, lo.float(), inv, d, bits, cl)
            e_k = kernels.encode(x, lo, inv, d, bits, cl)
            o_ref = Q._decode_pass.reference(e_ref, lo, sc, shape, cl, bits, torch.float32)
            o_k = kernels.decode(e_k, lo, sc, shape, cl, bits, torch.float32)
            assert torch.equal(e_ref, e_k) and torch.equal(o_ref, o_k) and o_k.stride() == o_ref.stride(), bits
            checked += 2
print("equal", checked)
'''
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["equal", str(2 * 3 * (3 * 2 + 4 * 2))]
