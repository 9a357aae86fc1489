"""B-bit codes: packing, range, unbiasedness, the compiled passes, and the policies that use them."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.method import fastpath
from core.method import quantize as Q
from core.method.conv import CompressedConvFunction, ConvInputForm
from core.method.convert import compress_model, decompress_model
from core.method.layout import memory_order_flat
from core.method.meter import saved_activation_bytes as forward_saved_bytes
from core.method.policy import CompressionPolicy, PolicyError
from core.models.resnet import build_model

SHAPES = [(3, 5, 7, 9), (2, 3, 1, 1), (4, 16, 8, 8), (1, 1, 3, 3)]


def _layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_codes_round_trip_and_are_really_packed(bits, shape, channels_last):
    x = _layout(torch.randn(shape), channels_last)
    p, lo, scale, info = Q.quantize(x, bits)
    assert p.dtype == torch.uint8 and p.numel() == math.ceil(x.numel() * bits / 8)  # 8/B values a byte
    assert lo.dtype == scale.dtype == torch.bfloat16 and lo.shape == scale.shape == shape[:2]
    r = Q.dequantize(p, lo, scale, info)
    assert r.shape == x.shape and r.dtype == x.dtype
    assert Q.is_channels_last(r) == Q.is_channels_last(x)
    # every value within one step of the truth, and on the grid lo + q * scale
    step = scale.float()[:, :, None, None]
    assert ((r - x).abs() <= step * (1 + 1e-6) + 1e-7).all()
    if shape[2] * shape[3] == 1:
        return  # one-value groups: a step of ~1e-7 of the value, below float32's resolution of the grid
    q = (r.float() - lo.float()[:, :, None, None]) / torch.where(step > 0, step, torch.ones_like(step))
    assert torch.allclose(q, q.round(), atol=1e-2) and q.min() >= 0 and q.max() <= (1 << bits) - 1 + 1e-2


@pytest.mark.parametrize("n", [8, 3])  # 8: the planes are batch chunks (the broadcast); 3: they are not
@pytest.mark.parametrize("channels_last", [False, True])
def test_decoding_reads_each_code_from_its_plane(n, channels_last):
    """Element i of the memory-order vector is bits [B*(i // m), B*(i // m + 1)) of byte i % m
    (planar packing), unpacked here one element at a time."""
    shape = (n, 3, 5, 7)
    x = _layout(torch.randn(shape), channels_last)
    for bits in Q.BITS:
        packed, lo, scale, info = Q.quantize(x, bits)
        m, total = packed.numel(), x.numel()
        codes = [(int(packed[i % m]) >> (bits * (i // m))) & ((1 << bits) - 1) for i in range(total)]
        groups = torch.arange(n * 3).view(n, 3, 1, 1).expand(shape)
        groups = (groups.permute(0, 2, 3, 1) if channels_last else groups).reshape(-1)
        want = torch.tensor(codes, dtype=torch.float32) * scale.float().view(-1)[groups] + lo.float().view(-1)[groups]
        got = Q._decode_pass(packed, lo, scale, shape, channels_last, bits, torch.float32)
        assert torch.equal(memory_order_flat(got, channels_last), want), bits


@pytest.mark.parametrize("n", [8, 12, 3])  # 8, 12: planes cut into batch chunks; 3: not, decoded whole
@pytest.mark.parametrize("channels_last", [False, True])
def test_decoding_chunk_by_chunk_gives_the_whole_reconstruction_in_batch_chunks(n, channels_last):
    """dequantize_by_chunk's chunks, in order, cover the batch and hold dequantize's values to the
    bit, in its layout and dtype: each at most 1/chunks of the batch where the batch divides into
    the 8/B planes (and at least one per plane)."""
    x = _layout(torch.randn(n, 3, 5, 7), channels_last)
    for bits in Q.BITS:
        packed, lo, scale, info = Q.quantize(x, bits)
        whole = Q.dequantize(packed, lo, scale, info)
        for parts in (1, 4):
            chunks = list(Q.dequantize_by_chunk(packed, lo, scale, info, parts))
            divides = n % (8 // bits) == 0
            assert len(chunks) >= 8 // bits if divides else len(chunks) == 1, (bits, parts)
            got = torch.full_like(whole, float("nan"))
            start = 0
            for samples, chunk in chunks:
                assert samples.start in (start, None)
                start = samples.stop
                assert chunk.dtype == whole.dtype and chunk.is_contiguous(
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                assert chunk.shape[0] <= (-(-n // parts) if divides else n)
                got[samples] = chunk
            assert torch.equal(got, whole) and sum(c.shape[0] for _, c in chunks) == n, bits


def test_range_is_rounded_outward_so_nothing_clamps():
    x = torch.tensor([0.1, 0.7, 1.3, 2.9]).view(1, 1, 2, 2) * 1.0001
    lo, scale = Q.group_range(x, 2)
    assert lo.float().item() <= x.min().item()
    assert lo.float().item() + 3 * scale.float().item() >= x.max().item()


def test_bfloat16_directed_rounding_equals_nextafter_of_the_nearest():
    """The range's rounding works on the float32 bits (a compiled pass computes bfloat16's
    nextafter in float32); it equals the definition: round to nearest, then one bfloat16 step
    toward the direction where that landed on the wrong side, for values across float32's
    whole range, zeros, subnormals and infinities included."""
    g = torch.Generator().manual_seed(0)
    t = torch.cat([torch.randn(20000, generator=g) * 10.0 ** torch.randint(-44, 38, (20000,), generator=g),
                   torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.0, -1.0, 3.3895e38, -3.3895e38,
                                 math.inf, -math.inf])])
    for direction in (-1.0, 1.0):
        nearest = t.to(torch.bfloat16)
        wrong = nearest.float() > t if direction < 0 else nearest.float() < t
        expected = torch.where(wrong, torch.nextafter(nearest, torch.full_like(nearest, direction * math.inf)), nearest)
        got = Q._bf16_toward(t, direction)
        assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_constant_group_is_exact():
    x = torch.full((2, 3, 4, 4), 0.25)
    r = Q.dequantize(*Q.quantize(x, 2))
    assert torch.equal(r, x)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_reconstruction_is_unbiased(bits):
    """Mean of many draws equals x within its standard error: a biased rounding (round to
    nearest, a dither off by half a step, a clamp) fails this. The standard error is the one
    stochastic rounding has by construction: a value a fraction p of a step above a grid point
    rounds up with probability p, so one draw has variance p (1 - p) step^2."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 5, generator=g)
    lo, scale = (t.float()[:, :, None, None] for t in Q.group_range(x, bits))
    p = torch.frac((x - lo) / scale)
    draws = 4000
    mean = sum(Q.dequantize(*Q.quantize(x, bits, generator=g)) for _ in range(draws)) / draws
    se = scale * (p * (1 - p) / draws).sqrt()
    z = ((mean - x) / se)[se > 0]
    assert z.abs().mean() < 1.0  # |N(0,1)| averages 0.80
    assert z.abs().max() < 5.0
    # the deterministic alternative is visibly biased on the same data
    nearest = lo + ((x - lo) / scale).round() * scale
    assert ((nearest - x) / se)[se > 0].abs().mean() > 10.0


def test_the_dither_hash_is_a_bijection_and_looks_random_within_a_draw():
    """Unbiasedness needs each value's dither uniform over the seeds: the hash is a bijection of
    the 31-bit integers (no two of 2^20 inputs collide, and none leaves the range). The noise of
    one draw needs the dithers of neighbouring values to look independent: 15-bit values
    uniform over 64 bins and no correlation between neighbours, with a seed of 0 or random."""
    k = torch.arange(1 << 20, dtype=torch.int64)
    h = Q._hash31(k * 2047 % (1 << 31))
    assert h.unique().numel() == k.numel() and h.min() >= 0 and h.max() < (1 << 31)
    for seed in (0, int(Q.dither_seed("cpu", torch.Generator().manual_seed(3)))):
        u = ((Q._hash31((k[: 1 << 16] + seed) & 0x7FFFFFFF) >> 8) & 0x7FFF).double()
        counts = torch.bincount((u // 512).long(), minlength=64).double()
        expected = u.numel() / 64
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 120  # 63 degrees of freedom: p ~ 1e-5 beyond
        a, b = u[:-1] - u.mean(), u[1:] - u.mean()
        assert abs((a * b).mean() / a.pow(2).mean()) < 0.02


def test_the_dither_is_the_same_drawn_in_chunks(monkeypatch):
    """Eagerly the dither is hashed a chunk at a time (bounded temporaries): the same bits as in
    one piece, so the codes do not depend on the chunk size."""
    x = torch.randn(3, 5, 7, 11)
    whole = Q.quantize(x, 2, generator=torch.Generator().manual_seed(9))[0]
    monkeypatch.setattr(Q, "_DITHER_CHUNK", 100)
    chunked = Q.quantize(x, 2, generator=torch.Generator().manual_seed(9))[0]
    assert torch.equal(whole, chunked)


def test_one_compiled_decode_serves_every_plane_of_a_shape():
    """Decoding 2-bit codes a plane at a time (four planes, the same chunk shape) compiles the
    plane decode once: the plane's shift is a tensor, not a constant dynamo would specialise on
    (it did: EfficientNet-B0 under two code widths then hit dynamo's limit of 256 compiled
    versions, past which passes run eagerly)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    try:
        if not fastpath.use_compiled(True):
            pytest.skip("torch.compile unavailable here (no C++ compiler)")
        kept = Q.quantize(_layout(torch.randn(16, 8, 6, 6), True), 2)
        before = counters["stats"]["unique_graphs"]
        chunks = list(Q.dequantize_by_chunk(*kept, 4))
        assert len(chunks) == 4 and counters["stats"]["unique_graphs"] - before == 1
        assert torch.equal(torch.cat([c for _, c in chunks]), Q.dequantize(*kept))
    finally:
        fastpath.use_compiled(False)


def test_compiled_passes_are_bit_identical():
    x = _layout(torch.randn(4, 8, 6, 6), True)
    try:
        compiled = fastpath.use_compiled(True)
        if not compiled:
            pytest.skip("torch.compile unavailable here (no C++ compiler)")
        a = Q.quantize(x, 2, generator=torch.Generator().manual_seed(5))
        ra = Q.dequantize(*a)
    finally:
        fastpath.use_compiled(False)
    b = Q.quantize(x, 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert torch.equal(ra, Q.dequantize(*b))


# ---------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["q2", "q4+mask+bn4", "q2+mask+bn2", "avg2+res2+mask+bn8", "avg4+res4",
                                  "q8+nostem", "q1+mask"])
def test_policy_round_trips(text):
    p = CompressionPolicy.parse(text)
    assert str(p) == text
    assert CompressionPolicy.from_dict(p.to_dict()) == p
    assert not p.is_exact


@pytest.mark.parametrize("text, words", [("q3", "3 bits"), ("res2", "needs avgK"), ("max2+res2", "needs avgK"),
                                         ("avg2+q2", "two forms"), ("avg2-lowres+res2", "lowres"),
                                         ("q2+ckpt", "ckpt"), ("bn3", "unknown policy part"),
                                         ("avg1+res2", "K >= 2")])
def test_bad_policies_say_what_conflicts(text, words):
    with pytest.raises(PolicyError, match=words) as e:
        CompressionPolicy.parse(text)
    assert "\n" not in str(e.value)


def test_q8_gradient_converges_to_exact():
    """At 8 bits the weight gradient is off by at most what a one-step error in each input
    value can change it: |dW| <= sum |g| * step, a bound derived from the code, not guessed."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 10, 10, dtype=torch.float64).requires_grad_()
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, 10, 10, dtype=torch.float64)
    F.conv2d(x, w, None, 1, 1).backward(g)
    exact_w, exact_x = w.grad.clone(), x.grad.clone()
    x.grad = w.grad = None
    CompressedConvFunction.apply(x, w, None, (1, 1), (1, 1), (1, 1), 1, ConvInputForm(bits=8)).backward(g)
    assert torch.equal(x.grad, exact_x)  # the input gradient needs the weight only: exact
    step = Q.group_range(x.detach(), 8)[1].double().max()
    bound = F.conv2d(torch.ones_like(x).transpose(0, 1), g.abs().transpose(0, 1), padding=1).transpose(0, 1) * step
    assert ((w.grad - exact_w).abs() <= bound + 1e-12).all()
    assert F.cosine_similarity(w.grad.flatten(), exact_w.flatten(), 0) > 0.9999


def test_meter_counts_the_packed_bytes():
    """One conv with q2: the meter's conv-input bytes equal packed codes + 4 bytes a group,
    computed by hand."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False))
    x = torch.randn(4, 3, 9, 9, requires_grad=True)
    compress_model(model, "q2")
    rep = forward_saved_bytes(model, x)
    by_hand = math.ceil(4 * 3 * 9 * 9 * 2 / 8) + 4 * 3 * (2 + 2)
    assert rep.by_kind["conv input"] == by_hand == Q.packed_bytes((4, 3, 9, 9), 2)


def test_families_cut_resnet_bytes_in_the_expected_order():
    model = build_model("resnet20")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    total = {}
    for p in ("none", "avg2+mask", "q4+mask", "q2+mask", "q4+mask+bn4", "q2+mask+bn2", "avg2+res2+mask"):
        compress_model(model, p)
        total[p] = forward_saved_bytes(model, x, y).total_bytes
        decompress_model(model)
    assert total["q2+mask+bn2"] < total["q4+mask+bn4"] < total["q2+mask"] < total["q4+mask"] < total["none"]
    assert total["none"] / total["q2+mask+bn2"] > 10
    assert total["avg2+mask"] < total["avg2+res2+mask"]  # the residual costs bytes on top of the pooled copy
