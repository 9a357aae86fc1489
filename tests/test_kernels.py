"""The fast path against the reference: compiled CPU passes and Triton kernels (run under
Triton's interpreter on the CPU, so CI checks them without a GPU) give the same bits."""

import json
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
        slope = a if kind == "leaky" else 0.0
        over = masks._mask_apply_(x * 2, p, tuple(x.shape), cl, kind, slope)  # written over its g
        out += [p, masks._mask_apply(x * 2, p, tuple(x.shape), cl, kind, slope), over]
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
            *norms._bn_backward_from_codes(g, packed, lo, scale, info.shape, cl, 2, weight, mean, invstd),
            *norms._bn_backward_from_hat_(g.clone(), x_hat, weight, invstd),  # written over a copy of g
            *norms._bn_backward_from_codes_(g.clone(), packed, lo, scale, info.shape, cl, 2, weight, mean, invstd)]


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
            over = g.clone(memory_format=torch.preserve_format)
            assert kernels.mask_apply_(over, p_k, shape, cl, kind, slope) is over and torch.equal(over, r_ref)
            other = g.contiguous(memory_format=torch.contiguous_format if cl else torch.channels_last)
            assert kernels.mask_apply_(other, p_k, shape, cl, kind, slope) is NotImplemented
            checked += 3
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
    assert p.stdout.split() == ["equal", str(2 * 3 * (3 * 3 + 4 * 2))]


@pytest.mark.skipif(not fastpath.triton_available(), reason="Triton is not installed")
def test_triton_batchnorm_backward_under_the_interpreter_matches_the_reference_to_float32_rounding():
    """BatchNorm's backward kernels read the kept x_hat (float8, bf16) or the codes directly;
    their per-channel sums run in another order than the reference's, so equal to rounding
    (1e-5 of the largest value; seen: 4e-7), with the reference's dtype and layout (g's)."""
    code = r"""
import torch
from core.method import kernels, norms, quantize as Q
torch.manual_seed(0)
checked = checked_over = 0
# 70 channels: two channel blocks in NHWC; 4 x 3 x 40 x 40: several programs, row loops and partial
# sums (19 output programs, 2 loop turns per NCHW row, 7 NHWC parts), with a bf16 gradient (autocast)
shapes = ((2, 3, 5, 7, torch.float32), (1, 70, 3, 3, torch.float32), (4, 3, 40, 40, torch.bfloat16))
for x_cl, g_cl in ((False, False), (True, True), (True, False), (False, True)):
    for *shape, g_dtype in shapes:
        x = torch.randn(shape) * 2 + 1
        g = torch.randn(shape).to(g_dtype)
        x = x.contiguous(memory_format=torch.channels_last) if x_cl else x
        g = g.contiguous(memory_format=torch.channels_last) if g_cl else g
        w = torch.rand(shape[1]) + 0.5
        mean, invstd = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt()
        cases = [(norms._bn_backward_from_hat, (g, norms._bn_keep(x, mean, invstd, store), weight, invstd))
                 for store in (torch.bfloat16, torch.float8_e4m3fn) for weight in (w, None)]
        for bits in Q.BITS:
            packed, lo, scale, info = Q.quantize(x, bits)
            cases.append((norms._bn_backward_from_codes,
                          (g, packed, lo, scale, info.shape, info.channels_last, bits, w, mean, invstd)))
        if g_dtype != torch.float32:
            cases = cases[1:2] + cases[-1:]  # float8 x_hat, 1-bit codes: the interpreter is slow
        for fn, args in cases:
            kernel = kernels.KERNELS[fn.pass_name]
            for r, k in zip(fn.reference(*args), kernel(*args)):
                torch.testing.assert_close(k, r, rtol=0, atol=1e-5 * r.abs().max().item())
                assert k.stride() == r.stride() and k.dtype == r.dtype
            checked += 1
            # written over g: where g is float32 in the kept input's layout, else the other version runs
            over, gg = kernels.KERNELS[fn.pass_name + "_"], g.clone(memory_format=torch.preserve_format)
            got = over(gg, *args[1:])
            if g_dtype != torch.float32 or x_cl != g_cl:
                assert got is NotImplemented
                continue
            assert got[0] is gg
            for r, k in zip(fn.reference(*args), got):
                torch.testing.assert_close(k, r, rtol=0, atol=1e-5 * r.abs().max().item())
            checked_over += 1
print("close", checked, checked_over)
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["close", str(4 * (2 * (4 + len(Q.BITS)) + 2)), str(2 * 2 * (4 + len(Q.BITS)))]


@pytest.mark.skipif(not fastpath.triton_available(), reason="Triton is not installed")
def test_triton_batchnorm_keep_under_the_interpreter_gives_the_references_bits():
    """BatchNorm's kept x_hat in one kernel: the same bits as the reference's casts, for every
    float8 value, every tie between two (to even), one ulp either side of each tie, values past
    448 (clamped), infinities, signed zeros and bfloat16's subnormals (NaN stays NaN); from a
    float32 or a bfloat16 x (whose two ops PyTorch rounds to bfloat16 each), both layouts,
    per-channel mean and invstd."""
    code = r"""
import torch
from core.method import kernels, norms
e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
e4m3 = e4m3[torch.isfinite(e4m3)].unique()
ties = (e4m3[1:] + e4m3[:-1]) / 2
bf = torch.arange(-32768, 32767, 13, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
bf = bf[torch.isfinite(bf)]
near = lambda t: torch.cat([t, *(torch.nextafter(t, torch.full_like(t, v)) for v in (1e9, -1e9))])
values = torch.cat([e4m3, near(ties), near(bf), (bf[1:] + bf[:-1]) / 2,
                    torch.tensor([0.0, -0.0, 448.5, 479.0, 500.0, -1e4, 1e-30, -1e-30, float("nan"), float("inf"),
                                  -float("inf")])])
values = torch.cat([values, torch.zeros((-values.numel()) % 24)])
checked = 0
for cl in (False, True):
    x = values.view(2, 3, 4, -1)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    stats = ((torch.zeros(3), torch.ones(3)), (torch.tensor([0.1, -2.0, 0.0]), torch.tensor([3.0, 0.7, 1.0])))
    for mean, invstd in stats:
        for dtype in (torch.float32, torch.bfloat16):
            for store, bits in ((torch.bfloat16, torch.int16), (torch.float8_e4m3fn, torch.uint8)):
                xx = x.to(dtype)
                r, k = norms._bn_keep.reference(xx, mean, invstd, store), kernels.bn_keep(xx, mean, invstd, store)
                nan = r.float().isnan()  # NaN stays NaN; its bits differ between PyTorch's own casts
                assert torch.equal(nan, k.float().isnan()) and nan.any()
                same = torch.equal(r.view(bits)[~nan], k.view(bits)[~nan])
                assert same and r.stride() == k.stride(), (cl, dtype, store)
                checked += 1
assert kernels.bn_keep(x.half(), mean, invstd, torch.float8_e4m3fn) is NotImplemented  # the reference runs
print("equal", checked, values.numel())
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout.split()
    assert out[:2] == ["equal", "16"] and int(out[2]) > 15000


def _kernel_variants():
    """(kernel name, argument types as a training step hands them, constexprs, whether it reads
    or writes float8) for every variant a step uses."""
    bn = {"g_ptr": "*fp32", "hat_ptr": "*fp32", "packed_ptr": "*u8", "lo_ptr": "*fp32", "scale_ptr": "*fp32",
          "mean_ptr": "*fp32", "invstd_ptr": "*fp32"}
    # x_hat kept as float8 or bf16, or codes of each width (the unread source's pointers get
    # placeholders: invstd's, or g's for x_hat)
    kept = [({"hat_ptr": "*fp8e4nv", "packed_ptr": "*fp32"}, {"CODES": False, "BITS": 8}, True),
            ({"hat_ptr": "*bf16", "packed_ptr": "*fp32"}, {"CODES": False, "BITS": 8}, False),
            *(({}, {"CODES": True, "BITS": b}, False) for b in (8, 4, 2, 1))]
    rows = [("_mask_pack_kernel", {"x_ptr": x, "out_ptr": "*u8", "n": "i32", "m": "i32", "a": "fp32", "b": "fp32"},
             {"KIND": k, "BLOCK": 1024}, False) for x in ("*fp32", "*bf16") for k in (0, 1)]
    rows += [("_mask_apply_kernel", {"g_ptr": g, "packed_ptr": "*u8", "out_ptr": g, "n": "i32", "m": "i32",
                                     "slope": "fp32"}, {"LEAKY": k, "BLOCK": 1024}, False)
             for g in ("*fp32", "*bf16") for k in (False, True)]
    rows += [("_encode_kernel", {"x_ptr": "*fp32", "lo_ptr": "*fp32", "inv_ptr": "*fp32", "seed_ptr": "*i64",
                                 "out_ptr": "*u8", "n": "i32", "m": "i32", "C": "i32", "HW": "i32"},
              {"BITS": b, "PER": 8 // b, "CHANNELS_LAST": cl, "BLOCK": 1024}, False) for b in (8, 2) for cl in (0, 1)]
    rows += [("_decode_kernel", {"packed_ptr": "*u8", "lo_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32",
                                 "n": "i32", "m": "i32", "C": "i32", "HW": "i32"},
              {"BITS": b, "PER": 8 // b, "CHANNELS_LAST": cl, "BLOCK": 1024}, False) for b in (4, 1) for cl in (0, 1)]
    rows += [("_bn_keep_kernel", {"x_ptr": "*i16" if xb else "*fp32", "mean_ptr": "*fp32", "invstd_ptr": "*fp32",
                                  "out_ptr": "*u8" if fp8 else "*i16", "n": "i32", "C": "i32", "HW": "i32"},
              {"X_BF16": xb, "STORE_FP8": fp8, "CHANNELS_LAST": cl, "BLOCK": 1024}, False)  # bytes: any card
             for xb in (False, True) for fp8 in (False, True) for cl in (False, True)]
    sums = {"sb_ptr": "*fp32", "sw_ptr": "*fp32", "m": "i32", "C": "i32", "HW": "i32"}
    kept.append(({"g_ptr": "*bf16", "hat_ptr": "*fp8e4nv", "packed_ptr": "*fp32"}, {"CODES": False, "BITS": 8}, True))
    for types, consts, fp8 in kept:
        rows.append(("_bn_sums_rows_kernel", {**bn, **types, **sums}, {**consts, "BLOCK": 256}, fp8))
        rows.append(("_bn_sums_columns_kernel", {**bn, **types, **sums, "R": "i32", "ROWS": "i32"},
                     {**consts, "RB": 16, "CB": 64}, fp8))
        rows += [("_bn_grad_input_kernel", {**bn, **types, "k_ptr": "*fp32", "mb_ptr": "*fp32", "mw_ptr": "*fp32",
                                            "out_ptr": "*fp32", "n": "i32", "m": "i32", "C": "i32", "HW": "i32"},
                  {**consts, "CHANNELS_LAST": cl, "BLOCK": 1024}, fp8) for cl in (False, True)]
    return rows


@pytest.mark.skipif(not fastpath.triton_available(), reason="Triton is not installed")
def test_every_triton_kernel_compiles_for_real_gpus_without_one():
    """The interpreter runs a kernel as Python; this compiles each one as a GPU would, down to a
    cubin for an A100 (sm_80) and an H100 (sm_90), so what the interpreter tolerates and the
    compiler rejects fails here, not on a user's card. Float8 compiles only from sm_89 on, as
    kernels.can_use says (older cards run the PyTorch reference for those passes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from core.method import kernels

    variants = _kernel_variants()
    kernel_names = {n for n, f in vars(kernels).items() if n.endswith("_kernel") and hasattr(f, "run")}
    assert {v[0] for v in variants} == kernel_names

    def compiles(name, signature, constexprs, capability):
        fn = getattr(kernels, name)
        sig = {a: signature.get(a, "constexpr") for a in fn.arg_names}
        try:
            out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                 target=GPUTarget("cuda", capability, 32))
        except Exception as e:  # noqa: BLE001 - the compiler's own errors are many types
            if "fp8e4nv" in repr(e):
                return False
            raise
        return bool(out.asm["cubin"])

    for name, signature, constexprs, fp8 in variants:
        for capability in (80, 90):
            expected = not fp8 or kernels.can_use(torch.float8_e4m3fn, divmod(capability, 10))
            assert compiles(name, signature, constexprs, capability) == expected, (name, constexprs, capability)
    assert len(variants) >= 40


def test_the_dispatcher_runs_a_kernel_and_falls_back_when_it_declines(monkeypatch):
    """On a Triton device a pass goes to its kernel; a kernel returning NotImplemented (an input
    it cannot take) hands the call to the pass's active version. Here the CPU poses as that
    device, with a stand-in kernel."""
    x = torch.randn(2, 3, 4, 4)
    calls = []

    def kernel(t, *args):
        calls.append(t.dtype)
        return NotImplemented if t.dtype == torch.float64 else "from the kernel"

    monkeypatch.setattr(fastpath, "_on_triton_device", lambda t: True)
    monkeypatch.setattr(fastpath, "_load_kernels", lambda: True)
    monkeypatch.setitem(fastpath._triton, pooling.pool.pass_name, kernel)
    assert pooling.pool(x, "avg", 2) == "from the kernel"
    declined = pooling.pool(x.double(), "avg", 2)  # the kernel declines: the reference runs
    assert torch.equal(declined, pooling.pool.reference(x.double(), "avg", 2))
    fastpath.use_triton(False)
    try:
        assert torch.equal(pooling.pool(x, "avg", 2), pooling.pool.reference(x, "avg", 2))  # switched off
    finally:
        fastpath.use_triton(True)
    assert calls == [torch.float32, torch.float64]


def test_agreement_tells_bits_from_rounding_from_a_layout_change():
    from core.analysis.pass_bench import agreement

    a = torch.randn(2, 3, 4, 4)
    assert agreement(a, a.clone()) == (True, 0.0)
    b = a.clone()
    b.view(-1).view(torch.int32)[5] ^= 1  # one bit of one value
    same, diff = agreement((a, a), (a.clone(), b))
    assert not same and 0 < diff < 1e-6
    assert agreement(a, a.contiguous(memory_format=torch.channels_last)) == (False, float("inf"))
    assert agreement(a, a.double()) == (False, float("inf"))


def test_bench_passes_compares_every_fast_pass_with_its_reference(capsys):
    """On the CPU the fast versions are the compiled passes: the same bits as the reference for
    the element-wise ones, BatchNorm's backward to float32 rounding; and no call holds more
    memory than the reference's (the fused ones hold only their outputs)."""
    import torch._dynamo

    from core.cli import main

    torch._dynamo.reset()  # earlier tests' shapes count against dynamo's limit (past it, passes run eagerly)
    args = ["bench", "passes", "--batch", "2", "--channels", "5", "--size", "9", "--repeats", "1", "--threads", "1"]
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    if rows[0]["fast"] == "reference":
        pytest.skip("torch.compile unavailable here (no C++ compiler)")
    assert {r["name"] for r in rows} == set(fastpath._reference)  # every registered pass, measured
    for r in rows:
        assert r["fast"] == "compiled" and r["ref_ms"] > 0 and r["fast_ms"] > 0
        if "_bn_backward" in r["name"]:  # sums in another order: to rounding
            assert r["max_rel_diff"] < 1e-5
        else:
            assert r["same_bits"], r["pass"]
        assert 0 < r["fast_peak_bytes"] <= r["ref_peak_bytes"], r["pass"]
    fused = {r["pass"]: r for r in rows}
    for label in ("ReLU mask: pack", "codes: encode 4-bit", "BN: backward from 4-bit codes"):
        assert fused[label]["fast_peak_bytes"] < fused[label]["ref_peak_bytes"] / 2, label
    assert main([*args, "--reference"]) == 0
    lines = capsys.readouterr().out.splitlines()[3:3 + len(rows)]  # header, column names, rule
    assert [line.split("  ")[0] for line in lines] == [r["pass"] for r in rows]
    assert all(" reference " in line and line.rstrip().endswith("same bits") for line in lines)
