"""Pooled conv, mask ReLU, low-precision BN and compress_model against independent references."""

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.method import conv, fastpath, masks, norms, shortcut
from core.method.conv import CompressedConvFunction, ConvInputForm, _input_grad
from core.method.convert import compress_model, compressed, decompress_model
from core.method.layout import vouched_forward
from core.method.masks import pack_mask, unpack_mask
from core.method.policy import CompressionPolicy, PolicyError
from core.method.pooling import blockwise_applies, blockwise_weight_grad, lowres_weight_grad, upsample
from core.method.weight_grad import tap_factors, tapwise_weight_grad
from core.models.resnet import BasicBlock, Bottleneck, ResNet, build_model

from helpers import block_constant

# (kernel, stride, padding, dilation, groups) -- sizes divisible by k at the output
CONV_CASES = [(3, 1, 1, 1, 1), (3, 2, 1, 1, 1), (1, 2, 0, 1, 1), (3, 1, 2, 2, 1), (5, 1, 2, 1, 2), (7, 2, 3, 1, 1)]


def _pooled(x, w, b, case, pool, k, mode):
    ks, s, p, d, gr = case
    return CompressedConvFunction.apply(x, w, b, (s, s), (p, p), (d, d), gr, ConvInputForm(pool, k, mode))


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("k", [2, 4])
def test_upsample_exact_for_block_constant_input(case, k):
    ks, s, p, d, gr = case
    x = block_constant((2, 4, 16, 16), k).requires_grad_()
    w = torch.randn(6, 4 // gr, ks, ks, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, b, s, p, d, gr)
    g = torch.randn_like(y)  # any output gradient
    ref = torch.autograd.grad((y * g).sum(), [x, w, b])
    got = torch.autograd.grad((_pooled(x, w, b, case, "avg", k, "upsample") * g).sum(), [x, w, b])
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("k", [2, 4])
def test_lowres_exact_for_block_constant_input_and_gradient(case, k):
    ks, s, p, d, gr = case
    x = block_constant((2, 4, 16, 16), k).requires_grad_()
    w = torch.randn(6, 4 // gr, ks, ks, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, None, s, p, d, gr)
    g = block_constant(y.shape, k, seed=1)
    ref = torch.autograd.grad((y * g).sum(), [x, w])
    got = torch.autograd.grad((_pooled(x, w, None, case, "avg", k, "lowres") * g).sum(), [x, w])
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[1] > 1] + [(3, 4, 1, 1, 1), (3, 2, 2, 2, 2)])
@pytest.mark.parametrize("k", [2, 4])
def test_blockwise_weight_grad_equals_the_upsampled_copys(case, k):
    """Any pooled copy (not block-constant inputs): the weight gradient read off the blocks
    equals the one from the upsampled copy, to float64 rounding."""
    ks, s, p, d, gr = case
    if s % k:
        assert not blockwise_applies((16, 16), (s, s), k)
        return
    assert blockwise_applies((16, 16), (s, s), k) and not blockwise_applies((18, 16), (s, s), 4)
    xp = torch.randn(2, 4, 16 // k, 16 // k, dtype=torch.float64)
    x_rec = upsample(xp, k, (16, 16))
    w_shape = (6, 4 // gr, ks, ks)
    g = torch.randn_like(F.conv2d(x_rec, torch.zeros(w_shape, dtype=torch.float64), None, s, p, d, gr))
    ref = torch.nn.grad.conv2d_weight(x_rec, w_shape, g, s, p, d, gr)
    got = blockwise_weight_grad(xp, g, w_shape, (s, s), (p, p), (d, d), gr, k)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


WIDE_CASES = [  # (mode, kernel, stride, padding, k, groups): per-axis settings differ in some
    ("upsample", (3, 3), (2, 2), (1, 1), 2, 1), ("upsample", (3, 1), (2, 4), (1, 0), 2, 1),
    ("lowres", (3, 3), (1, 1), (1, 1), 2, 1), ("lowres", (3, 3), (2, 2), (1, 1), 2, 1),
    ("lowres", (3, 3), (1, 1), (1, 1), 4, 1), ("lowres", (3, 1), (1, 2), (1, 0), 2, 1),
    ("lowres", (1, 1), (4, 4), (0, 0), 2, 1),  # block offsets with gaps between them
    ("upsample", (3, 3), (2, 2), (1, 1), 2, 2), ("lowres", (3, 3), (1, 1), (1, 1), 2, 2),  # grouped: no taps
]


@pytest.mark.parametrize("mode, kernel, stride, padding, k, groups", WIDE_CASES)
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_a_wide_convs_weight_gradient_from_blocks_is_the_same_tap_by_tap(mode, kernel, stride, padding, k, groups,
                                                                        fmt, monkeypatch):
    """A weight larger than its pooled input (a ResNet's last stage) takes its block
    correlations one offset at a time (grouped convs: convolution_backward): the same gradient
    as the reference (from the upsampled copy; lowres: for block-constant inputs and
    gradients, where it is exact), to float64 rounding, in the weight's strides."""
    from core.method import pooling
    calls = []
    monkeypatch.setattr(pooling, "tap_factors", lambda *a: calls.append(1) or tap_factors(*a))
    x = block_constant((2, 16, 8, 8), k)
    w = torch.randn(64, 16 // groups, *kernel, dtype=torch.float64).contiguous(memory_format=fmt)
    y = F.conv2d(x, w, None, stride, padding, 1, groups)
    g = block_constant(y.shape, k, seed=1) if mode == "lowres" else torch.randn_like(y)
    ref = torch.nn.grad.conv2d_weight(x, w.shape, g, stride, padding, 1, groups)
    grad = blockwise_weight_grad if mode == "upsample" else lowres_weight_grad
    got = grad(F.avg_pool2d(x, k), g, w.shape, stride, padding, (1, 1), groups, k, w.stride())
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert got.stride() == w.stride()
    assert bool(calls) == (groups == 1)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[4] == 1] + [(3, 3, 0, 1, 1), (2, 2, 0, 1, 1)])
@pytest.mark.parametrize("size", [(15, 16), (4, 4), (1, 1)])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_the_tap_by_tap_weight_gradient_is_conv2d_weight(case, size, fmt):
    """Every tap's rows, strides, dilations and paddings (taps that read only padding included),
    against PyTorch's weight gradient, to float64 rounding; the result in the weight's layout."""
    ks, s, p, d, _ = case
    if min(size) + 2 * p < d * (ks - 1) + 1:
        return  # no output
    x = torch.randn(2, 4, *size, dtype=torch.float64).contiguous(memory_format=fmt)
    w = torch.randn(6, 4, ks, ks, dtype=torch.float64).contiguous(memory_format=fmt)
    g = torch.randn_like(F.conv2d(x, w, None, s, p, d)).contiguous(memory_format=fmt)
    ref = torch.nn.grad.conv2d_weight(x, w.shape, g, s, p, d)
    got = tapwise_weight_grad(g, x, w.shape, (s, s), (p, p), (d, d), w.stride())
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert got.stride() == w.stride()


def test_the_tap_by_tap_weight_gradient_reads_each_axis_on_its_own():
    """A 3x2 kernel, stride (1, 2), padding (1, 0), dilation (2, 1): the rows and columns each
    tap reads come from the two axes' own settings."""
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 2, dtype=torch.float64)
    s, p, d = (1, 2), (1, 0), (2, 1)
    g = torch.randn_like(F.conv2d(x, w, None, s, p, d))
    ref = torch.nn.grad.conv2d_weight(x, w.shape, g, s, p, d)
    torch.testing.assert_close(tapwise_weight_grad(g, x, w.shape, s, p, d), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_input_gradient_without_the_input_is_convolution_backwards(case, channels_last):
    """To the bit, but for grouped convs in channels_last: oneDNN runs another kernel for
    those, equal to float32 rounding (1e-6 of the largest value; 3e-7 seen)."""
    ks, s, p, d, gr = case
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, 15, 16).contiguous(memory_format=fmt)
    w = torch.randn(6, 4 // gr, ks, ks).contiguous(memory_format=fmt)
    g = torch.randn_like(F.conv2d(x, w, None, s, p, d, gr)).contiguous(memory_format=fmt)
    ref = torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [p, p], [d, d], False, [0, 0], gr,
                                              [True, False, False])[0]
    got = _input_grad(g, w, tuple(x.shape), (s, s), (p, p), (d, d), gr)
    assert got.stride() == ref.stride()
    if gr > 1 and channels_last:
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    else:
        assert torch.equal(got, ref)


def test_naive_lowres_rescale_would_not_be_exact():
    """Guard the test above: a 'same stride, times k^2' estimate is wrong off the centre tap."""
    k = 2
    x = block_constant((1, 2, 8, 8), k)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, None, 1, 1)
    g = block_constant(y.shape, k, seed=2)
    (ref,) = torch.autograd.grad((y * g).sum(), [w])
    xp, gp = F.avg_pool2d(x, k), F.avg_pool2d(g, k)
    naive = torch.nn.grad.conv2d_weight(xp, w.shape, gp, 1, 1) * k * k
    torch.testing.assert_close(naive[:, :, 1, 1], ref[:, :, 1, 1])
    assert not torch.allclose(naive, ref)


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("mode", ["upsample", "lowres"])
def test_sizes_not_divisible_by_k_run_and_input_gradient_stays_exact(pool, mode):
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, None, 2, 1)
    g = torch.randn_like(y)
    (ref_x,) = torch.autograd.grad((y * g).sum(), [x])
    out = _pooled(x, w, None, (3, 2, 1, 1, 1), pool, 4, mode)
    torch.testing.assert_close(out, y)
    gx, gw = torch.autograd.grad((out * g).sum(), [x, w])
    torch.testing.assert_close(gx, ref_x)
    assert gw.shape == w.shape and torch.isfinite(gw).all()
    if mode == "upsample":  # the weight gradient of the copy rebuilt by hand: each 4x4 block (the
        # cut ones at the edges over the pixels they have) replaced by its mean or max
        xp = torch.full((2, 3, 16, 12), float("nan"), dtype=torch.float64)
        xp[..., :13, :11] = x.detach()
        blocks = xp.view(2, 3, 4, 4, 3, 4)
        red = blocks.nanmean((3, 5)) if pool == "avg" else blocks.nan_to_num(-torch.inf).amax((3, 5))
        x_rec = red.repeat_interleave(4, 2).repeat_interleave(4, 3)[..., :13, :11]
        torch.testing.assert_close(gw, torch.nn.grad.conv2d_weight(x_rec, w.shape, g, 2, 1))


POLICIES_K1 = ["avg1", "max1", "avg1-lowres", "avg1+mask", "max1-lowres+mask", "mask"]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("policy", POLICIES_K1)
def test_k1_equals_autograd_on_resnet(policy, channels_last):
    torch.manual_seed(0)
    plain = build_model("resnet20")
    x = torch.randn(4, 3, 32, 32)
    if channels_last:
        plain = plain.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    comp = compress_model(copy.deepcopy(plain), policy)
    y = torch.randint(0, 10, (4,))
    out_p, out_c = plain(x), comp(x)
    F.cross_entropy(out_p, y).backward()
    F.cross_entropy(out_c, y).backward()
    assert torch.equal(out_p, out_c)  # the forward is exact, always
    for (name, p), q in zip(plain.named_parameters(), comp.parameters()):
        if channels_last:  # different kernels may sum in a different order
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(q.grad, p.grad), name


def test_mask_relu_gradient_identical_and_bit_packed():
    x = torch.randn(3, 5, 7, 9, requires_grad=True)  # 945 elements: not a multiple of 8
    g = torch.randn_like(x)
    (ref,) = torch.autograd.grad((torch.relu(x) * g).sum(), [x])
    relu = compress_model(nn.Sequential(nn.ReLU()), "mask")
    (got,) = torch.autograd.grad((relu(x) * g).sum(), [x])
    assert torch.equal(got, ref)
    packed = pack_mask(x > 0)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-x.numel() // 8)
    assert torch.equal(unpack_mask(packed, x.shape, False), x > 0)
    xc = x.detach().to(memory_format=torch.channels_last)
    assert torch.equal(unpack_mask(pack_mask(xc > 0), xc.shape, True), xc > 0)


def test_mask_relus_run_in_place_where_the_model_vouches_and_only_there():
    """Our ResNets declare that each activation reads a temporary: the mask ReLUs overwrite it
    (one full-size tensor fewer in the forward) with the same gradients, bit for bit. A model
    that reads an activation's input again declares nothing and keeps it intact."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    grads = []
    for inplace in (True, False):
        torch.manual_seed(1)
        model = compress_model(build_model("resnet20"), "avg2+mask")
        relus = [m for m in model.modules() if type(m).__name__ == "MaskReLU"]
        assert relus and all(m.pp_inplace for m in relus)
        for m in relus:
            m.pp_inplace = inplace
        same = []
        relus[3].register_forward_hook(lambda m, i, o, same=same: same.append(o.data_ptr() == i[0].data_ptr()))
        F.cross_entropy(model(x), y).backward()
        assert same == [inplace]
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))

    # A full backward hook on each module hands every BatchNorm output on as a view, which may
    # not be overwritten: the ReLUs then run out of place, same gradients, and the hooks fire.
    torch.manual_seed(1)
    model = compress_model(build_model("resnet20"), "avg2+mask")
    fired = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_full_backward_hook(lambda m, gi, go: fired.append(go[0].shape))
    same = []  # the ReLU after the residual sum checks the hooked BatchNorm before it: out of place too
    model.layer1[0].act2.register_forward_hook(lambda m, i, o: same.append(o.data_ptr() == i[0].data_ptr()))
    F.cross_entropy(model(x), y).backward()
    assert len(fired) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and same == [False]
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads[0]))

    class Reread(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            h = self.bn(self.conv(x))
            return self.act(h) + h

    plain = Reread()
    model = compress_model(copy.deepcopy(plain), "mask")
    assert not model.act.pp_inplace
    xr = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert torch.equal(model(xr), plain(xr))


def _unvouched(model: nn.Module) -> nn.Module:
    """The same model with nothing vouched: every layer out of place, every gradient fresh."""
    for m in model.modules():
        if hasattr(m, "pp_input_from"):
            m.pp_input_from, m.pp_inplace = (), False
    return model


@pytest.fixture
def reference_passes():
    """The PyTorch reference passes, whatever an earlier test switched on: compiled, BatchNorm's
    backward written over g runs as two graphs, summing in another order than the one graph out
    of place (equal to float32 rounding, tests/test_kernels.py), so bit-equality is the reference's."""
    was = fastpath.compiled_in_use()
    fastpath.use_compiled(False)
    yield
    if was:
        fastpath.use_compiled(True)


_OVER = ((conv, "_over_by_chunk"), (masks, "_mask_apply_"),
         (norms, "_bn_backward_from_codes_"), (norms, "_bn_backward_from_hat_"))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("policy", ["q4+mask+bn4", "avg4+mask+bn8", "avg2+res2+mask+bn4"])
def test_layers_write_over_what_is_theirs_alone_with_the_same_gradients(policy, channels_last, monkeypatch,
                                                                        reference_passes):
    """Where our ResNets vouch that a conv reads a ReLU's output only, the conv writes its output
    over it (the forward, in batch chunks), and each backward handed a gradient nothing else holds
    (layout.grant_gradient) writes over it: the conv's input gradient, the mask's, BatchNorm's.
    The same outputs and gradients, bit for bit, as with nothing vouched (bn8: to its rounding);
    and each of those paths really ran (batch 16: two chunks of 8)."""
    ran, phase = collections.Counter(), ["forward"]  # a conv writes over its input in the forward,
    for module, name in _OVER:                      # over its output gradient in the backward
        fn = getattr(module, name)
        key = (lambda name=name: f"{name} ({phase[0]})") if name == "_over_by_chunk" else (lambda name=name: name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _key=key, **k: (ran.update([_key()]), _fn(*a, **k))[1])
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    results = []
    for vouched in (True, False):
        torch.manual_seed(0)
        model = compress_model(build_model("resnet20"), policy).to(memory_format=layout)
        if not vouched:
            _unvouched(model)
        ran.clear()
        torch.manual_seed(1)
        phase[0] = "forward"
        out = model(x.contiguous(memory_format=layout))
        phase[0] = "backward"
        F.cross_entropy(out, y).backward()
        results.append([out, *(p.grad for p in model.parameters())])
        if vouched:
            bn = "_bn_backward_from_codes_" if "bn4" in policy else "_bn_backward_from_hat_"
            # ResNet-20: the 16 same-shape convs write their input gradient over their own (3
            # stride-2 convs do not), the 9 second convs write over their input; the mask ReLUs
            # and BatchNorms inside a block (and the stem's) have theirs alone
            assert ran == {"_over_by_chunk (forward)": 9, "_over_by_chunk (backward)": 16, "_mask_apply_": 9,
                           bn: 10}, ran
        else:
            assert not ran
    if "bn8" in policy:  # written over, bn8 keeps x_hat from statistics of its own (see below): 1 ulp
        for a, b in zip(*results):  # of them can move a value across a float8 rounding boundary
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * b.abs().max().item())
    else:
        assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("policy", ["mask", "q4+mask+bn4"])
def test_the_imagenet_stems_relu_writes_over_the_max_pools_gradient(policy, channels_last, monkeypatch,
                                                                   reference_passes):
    """The ImageNet stem's max pool reads act1's output only (the model vouches), so its backward's
    fresh gradient is act1's alone, and the mask ReLU's backward writes over it: one more
    in-place mask backward than with a hook on the max pool (which could keep what it sees).
    The same gradients, bit for bit; and under `mask` (exact), PyTorch's own (the max pool's
    scatter adds in PyTorch's order; channels_last: the plain convs' kernels may sum otherwise)."""
    ran = collections.Counter()
    fn = masks._mask_apply_
    monkeypatch.setattr(masks, "_mask_apply_", lambda *a, **k: (ran.update(["over"]), fn(*a, **k))[1])
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, y = torch.randn(4, 3, 64, 64).contiguous(memory_format=layout), torch.randint(0, 10, (4,))
    torch.manual_seed(0)
    plain = ResNet(BasicBlock, [1, 1], [8, 16], stem="imagenet").to(memory_format=layout)
    results, counts = [], []
    for hooked in (False, True):
        model = compress_model(copy.deepcopy(plain), policy)
        if hooked:
            model.maxpool.register_forward_pre_hook(lambda m, args: None)
        ran.clear()
        torch.manual_seed(1)  # q4 rounds stochastically
        out = model(x)
        F.cross_entropy(out, y).backward()
        results.append([out, *(p.grad for p in model.parameters())])
        counts.append(ran["over"])
    assert counts[0] == counts[1] + 1, counts
    assert all(torch.equal(a, b) for a, b in zip(*results))
    if policy == "mask":
        out = plain(x)
        F.cross_entropy(out, y).backward()
        for (name, p), q in zip(plain.named_parameters(), results[0][1:]):
            if channels_last:
                torch.testing.assert_close(q, p.grad, rtol=1e-5, atol=1e-6, msg=name)
            else:
                assert torch.equal(q, p.grad), name


def test_a_gradient_a_hook_has_seen_is_never_written_over(reference_passes):
    """A hook can keep what it sees: a ReLU's output (a forward hook on it), a conv's input (a
    pre-hook on the conv), a conv's output (a forward hook on the conv), a BatchNorm's input
    gradient (a backward hook on it). What they kept stays as it was when they saw it. Layers
    called outside the model's forward, or by a subclass's forward, write over nothing. And a
    backward that builds a graph of itself (create_graph) writes over nothing: the same gradients."""
    torch.manual_seed(0)
    model = compress_model(build_model("resnet20"), "q4+mask+bn4")
    seen = []

    def keep(t):
        t.register_hook(lambda g: seen.append((g, g.clone())))

    model.layer1[0].act1.register_forward_hook(lambda m, i, o: keep(o))
    model.layer1[1].conv2.register_forward_pre_hook(lambda m, i: keep(i[0]))
    model.layer2[1].conv1.register_forward_hook(lambda m, i, o: keep(o))
    # a (legacy) backward hook on a BatchNorm sees the gradient it hands the conv before it
    model.layer1[2].bn1.register_backward_hook(lambda m, gi, go: seen.append((gi[0], gi[0].clone())))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    torch.manual_seed(1)
    F.cross_entropy(model(x), y).backward()
    assert len(seen) == 4 and all(torch.equal(g, copy) for g, copy in seen)

    # The declarations hold inside the model's own forward only: layers called one by one by a
    # caller who keeps what they return (and takes gradients of it) write over nothing
    h, results = torch.randn(16, 16, 8, 8), []
    for vouched in (True, False):
        torch.manual_seed(0)
        block = compress_model(build_model("resnet20"), "q4+mask+bn4").layer1[0]
        if not vouched:
            _unvouched(block)
        torch.manual_seed(1)
        a = block.act1(block.bn1(block.conv1(h)))
        o = block.conv2(a)
        assert o is not a
        results.append([a, *torch.autograd.grad((o * o).sum(), [a, block.conv1.weight])])
    assert all(torch.equal(p, q) for p, q in zip(*results))

    # and for the forward written here only: a subclass that reads an activation again vouches for nothing
    class Reread(BasicBlock):
        def _forward(self, x):
            a = self.act1(self.bn1(self.conv1(x)))
            return self.act2(self.bn2(self.conv2(a)) + x) + a

    block = compress_model(Reread(16, 16), "q4+mask+bn4")
    assert not block.conv2.pp_input_from and not block.bn1.pp_inplace and not block.act1.pp_inplace
    assert compress_model(BasicBlock(16, 16), "q4+mask+bn4").conv2.pp_input_from

    seen.clear()
    model = compress_model(build_model("resnet20"), "q4+mask+bn4")
    params = list(model.parameters())
    grads = []
    for create_graph in (False, True):
        torch.manual_seed(1)
        loss = F.cross_entropy(model(x), y)
        grads.append(torch.autograd.grad(loss, params, create_graph=create_graph))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


class _ConvNormAct(nn.Sequential):
    """A conv, BatchNorm and ReLU that declares what our ResNets declare: the BatchNorm reads the
    conv's output, which nothing else reads (inside its own forward, as a declaring model runs)."""

    pp_norms_read_temporaries = True

    def forward(self, x):
        with vouched_forward():
            return super().forward(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("store", ["bn16", "bn8", "bn4", "bn2"])
def test_low_precision_bn_writes_over_a_conv_output_with_pytorchs_forward(store, channels_last, dtype):
    """Where the model vouches that a BatchNorm reads a conv output nothing else reads, the
    compressed BatchNorm writes its output over it: the same output and running statistics as
    PyTorch's BatchNorm, bit for bit (a whole-bf16 model too); for codes the same gradients as
    out of place, bit for bit; for x_hat (kept from float32 statistics of its own) the same up
    to a 1-ulp change of those statistics moving a value across an 8- or 16-bit rounding
    boundary, and in a whole-bf16 model (where out of place keeps x_hat from bf16 statistics)
    no further from the exact float32 gradients than out of place."""
    torch.manual_seed(0)
    plain = _ConvNormAct(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
    with torch.no_grad():
        plain[1].weight.uniform_(0.5, 1.5), plain[1].bias.uniform_(-1, 1)
    x = torch.randn(8, 3, 10, 10) * 3 + 2
    if channels_last:
        plain, x = plain.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    exact = copy.deepcopy(plain)
    exact(x).square().sum().backward()
    plain, x = plain.to(dtype), x.to(dtype)
    runs = {}
    for inplace in (True, False):
        model = compress_model(copy.deepcopy(plain), store)
        assert model[1].pp_inplace and model[1].pp_input_from == (model[0],)
        model[1].pp_inplace = inplace
        same = []
        model[0].register_forward_hook(lambda m, i, o, same=same: same.append(o.data_ptr()))
        model[1].pp_input_from = ()  # that hook only reads a pointer: the BatchNorm may still write over
        model[1].register_forward_hook(lambda m, i, o, same=same: same.append(o.data_ptr() == same[0]))
        torch.manual_seed(1)  # the codes' dither: the same draw both times
        out = model(x)
        out.float().square().sum().backward()
        assert same[1:] == [inplace]
        runs[inplace] = (out, model)
    out_ref = plain(x)
    for out, model in runs.values():
        assert torch.equal(out, out_ref)
        assert torch.equal(model[1].running_mean, plain[1].running_mean)
        assert torch.equal(model[1].running_var, plain[1].running_var)
    (_, a), (_, b) = runs[True], runs[False]
    for p, q, e in zip(a.parameters(), b.parameters(), exact.parameters()):
        if store in ("bn4", "bn2"):
            assert torch.equal(p.grad, q.grad)
        elif dtype == torch.float32:
            torch.testing.assert_close(p.grad, q.grad, rtol=0.02, atol=0.02 * q.grad.abs().max().item())
        else:
            def error(t, e=e):
                return ((t.grad.float() - e.grad).norm() / e.grad.norm()).item()

            assert error(p) <= error(q) * 1.01


def test_only_declared_models_write_over_a_norms_or_activations_input_and_not_past_a_hook():
    """compress_model lets a BatchNorm (or mask ReLU) write over its input only where the model
    declares that nothing else reads it, and each checks that no hook on the module that made
    the input could have kept it: what a forward hook kept stays as it was."""
    resnet = compress_model(build_model("resnet20"), "avg2+mask+bn8")
    for block in (resnet, resnet.layer1[0]):
        assert block.bn1.pp_inplace and block.bn1.pp_input_from == (block.conv1,)
        assert block.act1.pp_inplace and block.act1.pp_input_from == (block.bn1,)
    seq = compress_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), "avg2+mask+bn8")
    assert seq[1].pp_inplace and seq[2].pp_inplace  # a plain Sequential hands each output on alone,
    taps, h = [], torch.randn(2, 3, 8, 8)  # but a caller looping over its elements may keep each (feature taps)
    for layer in seq:
        h = layer(h)
        taps.append((h, h.clone()))
    assert all(torch.equal(*tap) for tap in taps)

    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for store, hooked in (("bn8", "conv2"), ("q4+mask+bn4", "conv1"), ("avg2+mask", "bn1")):
        model = compress_model(build_model("resnet20"), store)
        kept = []
        getattr(model.layer1[0], hooked).register_forward_hook(lambda m, i, o, kept=kept: kept.append((o, o.clone())))
        F.cross_entropy(model(x), y).backward()
        assert len(kept) == 1 and torch.equal(*kept[0]), (store, hooked)

    class Reread(nn.Module):
        pp_norms_read_temporaries = False

        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.conv(x)
            return self.bn(h) + h

    torch.manual_seed(0)
    plain = Reread()
    model = compress_model(copy.deepcopy(plain), "bn4")
    assert not model.bn.pp_inplace
    xr = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert torch.equal(model(xr), plain(xr))


def test_the_residual_sum_writes_over_the_norms_output_unless_a_hook_may_hold_it():
    """Our blocks add the shortcut into the last BatchNorm's output in place: the same forward
    and gradients as out of place, bit for bit. A forward hook on that BatchNorm may have kept
    its output, so there the sum is a new tensor and what the hook kept stays as it was."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    results = []
    for hooked in (False, True):
        torch.manual_seed(1)
        model = build_model("resnet20")
        kept = []
        if hooked:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.register_forward_hook(lambda m, i, o, kept=kept: kept.append((o, o.clone())))
        out = model(x)
        F.cross_entropy(out, y).backward()
        assert all(torch.equal(o, copy_) for o, copy_ in kept)
        results.append((out, [p.grad for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))

    model = compress_model(build_model("resnet20"), "avg2+mask+bn8")
    block = model.layer1[0]
    ptrs = []  # conv output, BatchNorm output and the sum are one tensor
    block.conv2.register_forward_hook(lambda m, i, o: ptrs.append(o.data_ptr()))
    block.bn2.pp_input_from = ()  # that hook only reads a pointer: the BatchNorm may still write over
    block.act2.register_forward_hook(lambda m, i, o: ptrs.append(i[0].data_ptr()))
    F.cross_entropy(model(x), y).backward()
    assert len(ptrs) == 2 and ptrs[0] == ptrs[1]

    block = build_model("resnet20").layer1[0]  # bf16 BatchNorm output + float32 shortcut: promoted
    with torch.autocast("cpu", dtype=torch.bfloat16):  # to float32, as out of place
        assert block(torch.randn(2, 16, 8, 8)).dtype == torch.float32


def test_an_in_place_mask_relu_over_a_slice_changes_it_as_pytorch_does():
    """nn.ReLU(inplace=True) on a slice writes through to the tensor sliced; its mask form too,
    with the same gradients."""

    class Slice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.conv(x)
            self.act(h[:, :2])
            return h

    torch.manual_seed(0)
    plain = Slice()
    model = compress_model(copy.deepcopy(plain), "mask")
    assert type(model.act).__name__ == "MaskReLU"
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    ref, got = plain(x), model(x)
    assert torch.equal(got, ref) and bool((got[:, :2] >= 0).all()) and bool((got[:, 2:] < 0).any())
    assert torch.equal(torch.autograd.grad(got.square().sum(), x)[0], torch.autograd.grad(ref.square().sum(), x)[0])


class _Fork(nn.Module):
    """A ReLU read by two convs (a block's conv1 and its downsample)."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1, stride=2)

    def forward(self, x, separate=False, bump=False):
        y = self.act(x)
        out = self.a(y).sum()
        if bump:
            y.mul_(2.0)  # changed in place after conv a pooled it: that copy is stale for conv b
        return out + self.b(y.clone() if separate else y).sum()  # a clone is a tensor of its own


@pytest.mark.parametrize("policy", ["avg2+mask", "max4+mask", "avg2+res2+mask"])
def test_two_convs_reading_one_tensor_keep_one_pooled_copy(policy):
    """The pooled copy is made once per tensor: the gradients are those of each conv pooling its
    own copy, bit for bit, and the meter sees one copy fewer."""
    from core.method.meter import SavedActivationMeter

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)  # the masked ReLU acts where a gradient flows
    k = CompressionPolicy.parse(policy).k
    pooled_bytes = x.numel() * 4 // (k * k)
    net = compress_model(_Fork(), policy)

    def conv_input_bytes(**kw):
        with SavedActivationMeter(net) as meter:
            net(x, **kw)
        return meter.report().by_kind["conv input"]

    shared = conv_input_bytes()
    assert shared == conv_input_bytes(separate=True) - pooled_bytes
    assert conv_input_bytes(bump=True) == shared + pooled_bytes  # stale: conv b pools the changed tensor
    for bump in (False, True):
        grads = []
        for separate in (False, True):
            torch.manual_seed(1)  # the residual's stochastic rounding
            out = net(x, separate=separate, bump=bump)
            grads.append(torch.autograd.grad(out, [x, *net.a.parameters(), *net.b.parameters()]))
        assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_batchnorm_backward_from_its_kept_form_is_pytorchs_backward():
    """The backward the low-precision BatchNorm runs (from x_hat, or from x's codes) is
    PyTorch's own BatchNorm backward given the same input (for codes: the decoded input), to
    float32 rounding."""
    from core.method import norms
    from core.method.quantize import dequantize, quantize

    torch.manual_seed(0)
    x = (torch.randn(6, 5, 7, 9) * 3 + 2).contiguous(memory_format=torch.channels_last)
    g, weight = torch.randn_like(x), torch.rand(5) + 0.5
    mean, invstd = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt()

    def pytorchs(x_in):
        return torch.ops.aten.native_batch_norm_backward(g, x_in, weight, None, None, mean, invstd, True, 1e-5,
                                                         [True, True, True])

    x_hat = (x - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    packed, lo, scale, info = quantize(x, 4)
    from_codes = norms._bn_backward_from_codes(g, packed, lo, scale, info.shape, info.channels_last, info.bits,
                                               weight, mean, invstd)
    for expected, got in ((pytorchs(x), norms._bn_backward_from_hat(g, x_hat, weight, invstd)),
                          (pytorchs(dequantize(packed, lo, scale, info)), from_codes)):
        for e, o in zip(expected, got):
            torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
        assert got[0].is_contiguous(memory_format=torch.channels_last)  # the gradient's layout


@pytest.mark.parametrize("store", ["bn16", "bn8"])
def test_low_precision_bn_close_and_beta_exact(store):
    torch.manual_seed(0)
    bn_ref = nn.BatchNorm2d(6)
    bn = compress_model(nn.Sequential(copy.deepcopy(bn_ref)), store)[0]
    x = (torch.randn(8, 6, 10, 10) * 3 + 5).requires_grad_()
    g = torch.randn(8, 6, 10, 10)
    out_ref, out = bn_ref(x), bn(x)
    assert torch.equal(out, out_ref)  # forward exact
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    ref = torch.autograd.grad((out_ref * g).sum(), [x, bn_ref.weight, bn_ref.bias])
    got = torch.autograd.grad((out * g).sum(), [x, bn.weight, bn.bias])
    torch.testing.assert_close(got[2], ref[2])  # beta: exact
    tol = 0.01 if store == "bn16" else 0.08
    for r, o in zip(ref[:2], got[:2]):
        assert (o - r).norm() / r.norm() < tol


def _grad_cosines(a: nn.Module, b: nn.Module) -> list[float]:
    return [F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0).item()
            for p, q in zip(a.parameters(), b.parameters())]


def test_autocast_bf16_and_channels_last_train_step():
    torch.manual_seed(0)
    base = build_model("resnet20").to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,))

    def trained(policy, amp: bool) -> nn.Module:
        model = copy.deepcopy(base)
        if policy:
            compress_model(model, policy)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        return model

    model = trained("avg2+mask+bn16", True)
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    plain_bf16 = trained(None, True)
    # K=1 under autocast: the plain model's bf16 gradients (up to where the casts fall)
    assert min(_grad_cosines(trained("avg1+mask", True), plain_bf16)) > 0.999
    # bf16 moves the compressed model's gradients no further from its float32 ones than it moves
    # the plain model's (a random net at batch 4: both about 0.9 in the worst layer)
    plain_drift = min(_grad_cosines(plain_bf16, trained(None, False)))
    assert min(_grad_cosines(model, trained("avg2+mask+bn16", False))) > plain_drift - 0.02


def test_convert_back_is_bit_identical():
    torch.manual_seed(0)
    model = build_model("resnet20")
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    compress_model(model, "avg4-lowres+mask+bn8")
    assert list(model.state_dict()) == keys
    assert type(model.conv1) is not nn.Conv2d
    decompress_model(model)
    assert all(type(m) is type(r) for m, r in zip(model.modules(), reference.modules()))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for m in (model, reference):
        F.cross_entropy(m(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)


def test_context_manager_restores_plain_model():
    model = build_model("resnet20")
    with compressed(model, "avg2+mask") as m:
        assert type(m.layer1[0].conv1).__name__ == "CompressedConv2d"
    assert type(model.layer1[0].conv1) is nn.Conv2d


def test_scope_nostem_and_stages():
    model = compress_model(build_model("resnet18"), "avg2+mask+nostem")
    assert type(model.conv1) is nn.Conv2d and type(model.layer1[0].conv1) is not nn.Conv2d
    model = compress_model(build_model("resnet18"), "avg2+stages=1,2")
    assert type(model.layer2[1].conv2).__name__ == "CompressedConv2d"
    assert type(model.layer3[0].conv1) is nn.Conv2d and type(model.conv1) is nn.Conv2d


@pytest.mark.parametrize("text", ["none", "avg2", "max4-lowres", "avg2+mask", "avg4+mask+bn8", "avg2+mask+bn16+nostem",
                                  "max8+mask+stages=1,2", "mask", "bn16", "ckpt"])
def test_policy_round_trip(text):
    p = CompressionPolicy.parse(text)
    assert str(p) == text
    assert CompressionPolicy.parse(str(p)) == p
    assert CompressionPolicy.from_dict(p.to_dict()) == p


def test_policy_parse_is_order_insensitive():
    assert str(CompressionPolicy.parse("mask+avg2")) == "avg2+mask"


@pytest.mark.parametrize("bad", ["avg3", "foo", "avg2+avg4", "mask+mask", "avg2+ckpt", "stages=x", ""])
def test_bad_policy_strings_are_clear_errors(bad):
    with pytest.raises(PolicyError) as e:
        CompressionPolicy.parse(bad)
    assert bad.split("+")[0] in str(e.value) or "twice" in str(e.value) or "ckpt" in str(e.value)


def test_k_larger_than_feature_map_is_a_clear_error():
    model = compress_model(build_model("resnet18"), "avg8+mask")  # layer4 is 4x4 at 32x32 input
    with pytest.raises(PolicyError, match="larger than the 4x4 feature map entering layer4"):
        model(torch.randn(2, 3, 32, 32))


def test_stages_the_model_does_not_have_are_a_clear_error():
    # resnet20 has three stages: a policy for stage 4 would otherwise compress nothing, silently
    with pytest.raises(PolicyError, match="names stage 4, but this model's stages are 1, 2, 3"):
        compress_model(build_model("resnet20"), "avg2+mask+stages=2,4")
    model = compress_model(build_model("resnet18"), "avg2+mask+stages=4")  # resnet18 has it
    assert type(model.layer4[0].conv1).__name__ == "CompressedConv2d"
    assert type(model.layer3[0].conv1).__name__ == "Conv2d"


class _Custom(nn.Module):
    def forward(self, x):
        return x * x.sigmoid()


def test_unsupported_modules_are_named_and_the_model_is_left_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(), nn.Sequential(nn.Upsample(scale_factor=2)), _Custom(),
                          nn.ReLU(inplace=True))
    types = [type(m) for m in model.modules()]
    with pytest.raises(PolicyError) as e:
        compress_model(model, "avg2+mask")
    msg = str(e.value)
    assert "3 modules" in msg and "1 (PReLU)" in msg and "2.0 (Upsample)" in msg and "3 (_Custom)" in msg
    assert "\n" not in msg
    assert [type(m) for m in model.modules()] == types and not hasattr(model, "pp_policy")
    # on request they stay exact, and the model says which (the meter reports their bytes as such)
    compress_model(model, "avg2+mask", unsupported="exact")
    assert model.pp_uncompressed == ["1", "2.0", "3"]
    assert type(model[0]).__name__ == "CompressedConv2d" and type(model[4]).__name__ == "MaskReLU"


@pytest.mark.parametrize("case", [(3, 1, 1, 1, 2), (3, 1, 2, 2, 2), (3, 2, 1, 1, 2)])
def test_k1_grouped_channels_last_convs_keep_pytorchs_gradients_bit_for_bit(case):
    """A conv that keeps its input as it is (K=1) takes PyTorch's own backward, input gradient
    included: the transposed conv that rebuilding convs use differs from it in float32 rounding
    for grouped convs in channels_last."""
    ks, s, p, d, gr = case
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, ks, s, p, d, groups=gr)).to(memory_format=torch.channels_last)
    plain = copy.deepcopy(net)
    compress_model(net, "avg1")
    x = torch.randn(2, 4, 15, 16).contiguous(memory_format=torch.channels_last).requires_grad_()
    got = torch.autograd.grad(net(x).square().sum(), [x, *net.parameters()])
    ref = torch.autograd.grad(plain(x).square().sum(), [x, *plain.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_generic_module_of_conv_bn_relu():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    plain = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    compress_model(model, "avg1+mask")  # K=1: the same gradients as the plain module, bit for bit
    model(x).sum().backward()
    plain(x).sum().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), plain.parameters()))
    model.zero_grad()
    compress_model(model, "avg2+mask")  # K=2: the input gradient exact, the last conv's weight gradient
    x.requires_grad_(True)              # estimated from the 2x2-averaged copy of its input
    model(x).sum().backward()
    assert type(model[3]).__name__ == "CompressedConv2d" and type(model[2]).__name__ == "MaskReLU"
    h = plain[2](plain[1](plain[0](x))).detach()
    h_rec = F.avg_pool2d(h, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    ones = torch.ones(2, 4, 8, 8)
    torch.testing.assert_close(model[3].weight.grad, torch.nn.grad.conv2d_weight(h_rec, (4, 8, 3, 3), ones, 1, 1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA autocast re-types interpolate to fp32; needs a GPU"))])
@pytest.mark.parametrize("policy", ["avg2+mask", "avg2-lowres+mask+bn16"])
def test_backward_inside_an_autocast_region(policy, device):
    """Callers may run backward under autocast too (found on an H200: CUDA autocast runs the
    upsampling in fp32, which broke the weight-gradient convolution); our backward sets dtypes."""
    model = compress_model(build_model("resnet20"), policy).to(device)
    outside = copy.deepcopy(model)
    x, y = torch.randn(2, 3, 32, 32, device=device), torch.randint(0, 10, (2,), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        F.cross_entropy(model(x).float(), y).backward()  # backward inside the region
        out = outside(x)
    F.cross_entropy(out.float(), y).backward()  # the usual way: backward after it
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert min(_grad_cosines(model, outside)) > 0.999


def test_masks_are_packed_eight_a_byte_in_planes():
    """1003 elements (not a multiple of 8): 126 bytes; element j of plane i is bit i of byte j,
    where planes are the 8 consecutive runs of 126 elements in memory order."""
    flat = torch.rand(1003, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(flat.view(1, 1, 17, 59))
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    padded = torch.cat([flat, torch.zeros(5, dtype=torch.bool)]).view(8, 126)
    expect = sum(padded[i].to(torch.int32) << i for i in range(8)).to(torch.uint8)
    assert torch.equal(packed, expect)
    assert torch.equal(unpack_mask(packed, (1, 1, 17, 59), False).reshape(-1), flat)


def _tiny_resnet18_like(block=BasicBlock):
    """Our ResNet with one block per stage: three downsampling blocks with 1x1 conv shortcuts."""
    return ResNet(block, [1, 1, 1, 1], [8, 16, 32, 64])


@pytest.mark.parametrize("model, policy, channels_last", [
    ("basic", "q4+mask+bn4", False), ("basic", "q4+mask+bn4", True), ("basic", "avg2+mask", False),
    ("basic", "avg2+mask", True), ("basic", "avg2+res2+mask+bn4", True), ("bottleneck", "q4+mask+bn4", True),
    ("resnet20", "none", False), ("resnet20", "avg2+mask+bn8", True)])
def test_a_subsampling_shortcut_with_a_compact_input_gradient_gives_the_same_gradients(model, policy, channels_last,
                                                                                       monkeypatch, reference_passes):
    """A downsampling block's shortcut reads every second pixel of its input only (a compressed
    1x1 conv of stride 2, or ResNet-20's option-A subsampling) and hands back its input gradient
    at those pixels only (core/method/shortcut.py), added into the main branch's: the same outputs
    and gradients, bit for bit, as the plain calls (a hook on each shortcut, doing nothing, makes
    the blocks call them so, in the same place: `qB`'s draws come in the same order); and the
    compact path really ran, once per such block, with a quarter of the input's pixels (batch 24:
    the conv's in three chunks of 8)."""
    shapes = []
    backward = shortcut._FanOut.backward
    monkeypatch.setattr(shortcut._FanOut, "backward",
                        staticmethod(lambda ctx, g, gs: (shapes.append(tuple(gs.shape)), backward(ctx, g, gs))[1]))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, y = torch.randn(24, 3, 32, 32).contiguous(memory_format=layout), torch.randint(0, 10, (24,))
    build = {"basic": lambda: _tiny_resnet18_like(BasicBlock), "bottleneck": lambda: _tiny_resnet18_like(Bottleneck),
             "resnet20": lambda: build_model("resnet20")}[model]
    results = []
    for fanned in (True, False):
        torch.manual_seed(0)
        net = compress_model(build(), policy).to(memory_format=layout)
        downsampling = [getattr(net, name)[0] for name in net.stage_names[1:]]
        if not fanned:
            for block in downsampling:
                sc = block.downsample[0] if isinstance(block.downsample, nn.Sequential) else block.downsample
                sc.register_forward_pre_hook(lambda m, args: None)
        shapes.clear()
        torch.manual_seed(1)
        out = net(x)
        F.cross_entropy(out, y).backward()
        results.append([out, *(p.grad for p in net.parameters())])
        # the blocks' inputs at their every second pixel, in backward order
        expected = [(24, b.conv1.in_channels, 32 >> (i + 1), 32 >> (i + 1)) for i, b in enumerate(downsampling)][::-1]
        assert shapes == (expected if fanned else [])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_strided_shortcut_under_create_graph_and_hooks_gives_the_same_gradients(reference_passes):
    """Building a graph of the backward (create_graph), or with a hook on a block's first conv
    (which may keep what it sees), the main branch's gradient is not written over: the same
    gradients as the plain calls, and what the hook saw unchanged."""
    torch.manual_seed(0)
    model = compress_model(_tiny_resnet18_like(), "avg2+mask")
    x = torch.randn(16, 3, 32, 32, requires_grad=True)
    seen = []

    def keep_gradient(module, args):
        args[0].register_hook(lambda g: seen.append((g, g.clone())))

    model.layer3[0].conv1.register_forward_pre_hook(keep_gradient)
    plain = copy.deepcopy(model)
    for name in ("layer2", "layer3", "layer4"):
        getattr(plain, name)[0].downsample[0].register_forward_pre_hook(lambda m, args: None)
    grads = []
    for m in (model, plain):
        loss = m(x).square().sum()
        grads.append(torch.autograd.grad(loss, [x, *m.parameters()], create_graph=True))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert len(seen) == 2 and all(torch.equal(g, kept) for g, kept in seen)
    grads[0][0].sum().backward()  # the graph of the backward is there to differentiate
