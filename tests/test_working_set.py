"""What is alive beside the saved activations (the step peak's transients), in bytes from the
CPU profiler: S is one full-size float32 activation of the layer under test."""

import functools
import weakref

import pytest
import torch
from torch import nn

from core.method import fastpath
from core.method.convert import compress_model
from core.method.meter import cpu_step_peak_bytes, saved_activation_bytes
from core.models.resnet import BasicBlock, build_model

SHAPE = (8, 16, 32, 32)
S = 8 * 16 * 32 * 32 * 4
CL = torch.channels_last  # the layout the trainer runs in (in NCHW oneDNN adds reordered copies)


@pytest.fixture
def compiled():
    """The fast path, as the trainer runs it (the reference passes build temporaries of their own).
    Dynamo's caches are cleared first: after the rest of the suite has compiled a pass for
    hundreds of shapes, dynamo stops compiling it and runs it eagerly (accumulated_recompile_limit)."""
    torch._dynamo.reset()
    if not fastpath.use_compiled(True):
        pytest.skip("torch.compile unavailable here (no C++ compiler)")
    yield
    fastpath.use_compiled(False)


def _input():
    return torch.randn(SHAPE).contiguous(memory_format=CL).requires_grad_()


def _backward_peak(module, x, inputs=True):
    """Peak live bytes allocated while autograd computes every gradient of `module(x)` (the
    parameters' alone when not `inputs`)."""
    y = module(x)
    g = torch.randn_like(y)
    out = []
    wrt = [x, *module.parameters()] if inputs else list(module.parameters())
    peak = cpu_step_peak_bytes(lambda: out.append(torch.autograd.grad(y, wrt, g)))
    return peak["step_peak_bytes"]


@pytest.mark.parametrize("policy, bound", [("q4", 1.5), ("avg2", 1.5), ("avg2+res2", 2.5)])
def test_a_conv_backward_never_holds_its_rebuilt_input_and_its_input_gradient_at_once(policy, bound, compiled):
    """A stride-1 conv rebuilds its full-size input for the weight gradient (S bytes); the input
    gradient (S) is computed after that input is freed: the peak is one S, not two. The residual
    form decodes its residual (S) into the upsampled copy in place: 2 S while rebuilding, not 3."""
    torch.manual_seed(0)
    conv = compress_model(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False)), policy).to(memory_format=CL)
    x = _input()
    assert S <= _backward_peak(conv, x) < bound * S


@pytest.mark.parametrize("channels, batch, chunks", [(8, 8, 1), (16, 8, 1), (32, 8, 2), (64, 8, 4), (64, 16, 4)])
def test_a_conv_rebuilds_its_input_in_chunks_of_at_least_half_a_mebibyte(channels, batch, chunks, monkeypatch):
    """The weight gradient's rebuilt input comes in up to four batch chunks of at least 512 KiB
    each (0.25, 0.5, 1, 2 and 4 MiB of float32 input here): smaller ones only cost calls. The
    weight gradient is the one the whole rebuilt input gives, to float32 rounding."""
    from core.method import conv as conv_module

    seen = []
    rebuild = conv_module.ConvInputForm.rebuild_by_chunk

    def spy(self, kept, info, shape, chunks=4):
        parts = list(rebuild(self, kept, info, shape, chunks))
        seen.append(len(parts))
        return iter(parts)

    monkeypatch.setattr(conv_module.ConvInputForm, "rebuild_by_chunk", spy)
    torch.manual_seed(0)
    layer = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    x = torch.randn(batch, channels, 32, 32).contiguous(memory_format=CL)
    g = torch.randn(batch, channels, 32, 32)
    form = conv_module.ConvInputForm(pool="avg", k=2, mode="upsample")
    w = layer.weight.detach().requires_grad_()
    conv_module.CompressedConvFunction.apply(x, w, None, (1, 1), (1, 1), (1, 1), 1, form).backward(g)
    assert seen == [chunks]
    rebuilt = form.rebuild(*form.keep(x), tuple(x.shape))
    expected = torch.ops.aten.convolution_backward(g, rebuilt, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                   [False, True, False])[1]
    torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("policy", ["avg2+res2", "avg2+res4"])
def test_a_residual_forms_forward_writes_the_residual_over_its_upsampled_copy(policy, compiled):
    """Keeping x as P(x) and codes of x - up(P(x)): one full-size temporary for the residual (S),
    not the upsampled copy and the difference beside each other, and kept before the conv's
    output (S) exists, so the two never coexist: the peak is S and the pooled copy (S/4) at most
    (were 2 S with the output first, 3.3 S with the difference apart)."""
    torch.manual_seed(0)
    conv = compress_model(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False)), policy).to(memory_format=CL)
    x = _input()
    conv(x)  # compiled outside the measurement
    out = []
    peak = cpu_step_peak_bytes(lambda: out.append(conv(x)))["step_peak_bytes"]
    assert S <= peak < 1.3 * S


@pytest.mark.parametrize("policy", ["avg2", "q4", "avg2-lowres"])
def test_a_wide_convs_weight_gradient_holds_one_weight_sized_buffer_not_three(policy, compiled):
    """Where the weight outweighs the input (a ResNet's last stage: 256 channels at 4x4 here,
    W = 2.25 MiB of weight against 0.5 MiB of input), convolution_backward would hold its
    gradient in its own layout and the reorder back beside the result (3 W); the tap-by-tap
    weight gradient holds the result and one tap's slices (lowres: one block offset's)."""
    torch.manual_seed(0)
    w_bytes = 256 * 256 * 9 * 4
    conv = compress_model(nn.Sequential(nn.Conv2d(256, 256, 3, padding=1, bias=False)), policy).to(memory_format=CL)
    x = torch.randn(8, 256, 4, 4).contiguous(memory_format=CL)  # no input gradient: the weight's alone
    assert w_bytes <= _backward_peak(conv, x, inputs=False) < 1.5 * w_bytes
    plain = nn.Conv2d(256, 256, 3, padding=1, bias=False).to(memory_format=CL)
    assert _backward_peak(plain, x, inputs=False) >= 2.5 * w_bytes  # PyTorch's own


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_a_max_pools_backward_holds_its_input_gradient_and_a_chunk(layout, monkeypatch):
    """Keeping only the indices, the max pool's backward scatters its gradient into a zero tensor
    of the input's layout (S), a sample at a time here: no full-size copy to change the layout
    (2 S, were it built in NCHW for a channels_last input) and no full-size int64 indices (S/2)."""
    from core.method import maxpool

    monkeypatch.setattr(maxpool, "_CHUNK_ELEMENTS", 16 * 16 * 16)  # one sample's indices
    pool = compress_model(nn.Sequential(nn.MaxPool2d(3, 2, 1)), "mask")
    x = torch.randn(SHAPE).contiguous(memory_format=layout).requires_grad_()
    assert S <= _backward_peak(pool, x) < 1.1 * S


def test_a_coded_activations_backward_holds_its_result_and_a_chunk(monkeypatch, compiled):
    """GELU keeping its input as 8-bit codes: the backward decodes a quarter of the batch at a
    time (compiled: one pass) and writes g * GELU'(x~) for it into the result (S), by ATen's own
    kernel: S and two quarter-size chunks, where recomputing GELU under autograd held the
    decoded input, its copy, GELU's output and the result (4 S)."""
    from core.method import activations

    gelu = compress_model(nn.Sequential(nn.GELU()), "q8+mask")
    x = _input()
    assert S <= _backward_peak(gelu, x) < 1.6 * S
    monkeypatch.setattr(activations, "_aten_backward", lambda module: None)
    assert _backward_peak(gelu, x) >= 3.5 * S


def test_batchnorm_backward_decodes_its_codes_inside_its_passes(compiled):
    """Compiled, the 4-bit BatchNorm's backward forms x_hat from the codes in registers: the only
    full-size tensor it allocates is the input gradient. The reference decodes x first (2 S)."""
    torch.manual_seed(0)
    bn = compress_model(nn.Sequential(nn.BatchNorm2d(16)), "bn4")
    x = _input()
    assert S <= _backward_peak(bn, x) < 1.5 * S
    fastpath.use_compiled(False)
    assert _backward_peak(bn, x) >= 2 * S


def test_a_compressed_residual_block_forward_holds_two_full_size_tensors_beside_what_it_keeps(compiled):
    """In a block whose activations and BatchNorm inputs are kept compressed, the forward's
    working set beyond the block's input is an op's input and output: 2 S. The first ReLU's
    output must not outlive the conv that reads it (3 S when `out = bn2(conv2(out))` kept it)."""
    torch.manual_seed(0)
    block = compress_model(BasicBlock(16, 16), "avg2+mask+bn8").to(memory_format=CL)
    x = _input()
    saved = saved_activation_bytes(block, x).total_bytes
    out = []
    peak = cpu_step_peak_bytes(lambda: out.append(block(x)))["step_peak_bytes"]
    assert peak - saved < 2.5 * S


def test_a_resnet_stage_frees_its_input_once_its_first_block_has_read_it(compiled):
    """ResNet-20's first stage at batch 8 works on S-sized tensors. The stage's input must not
    stay alive through its later blocks once the first has read it. Measured as the forward's
    peak minus everything it keeps (not all kept yet at the peak, so this is below what is in
    flight): 0.9 S, and 1.6 S when the Sequential's call held the stage's input."""
    torch.manual_seed(0)
    model = compress_model(build_model("resnet20"), "avg2+mask+bn8").to(memory_format=CL)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=CL)
    saved = saved_activation_bytes(model, x).total_bytes
    out = []
    peak = cpu_step_peak_bytes(lambda: out.append(model(x)))["step_peak_bytes"]
    assert peak - saved < 1.25 * S


def test_hooks_on_a_resnet_stage_still_see_one_call():
    """With a hook on a stage the stage is called as a module; without, its blocks one by one:
    the same result either way."""
    model = build_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    handle = model.layer2.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        logits = model(x)
        stem = model.act1(model.bn1(model.conv1(x)))
        stage_in = model.layer1(stem)
    handle.remove()
    assert len(seen) == 1
    assert torch.equal(seen[0][0], stage_in) and torch.equal(seen[0][1], model.layer2(stage_in))
    with torch.no_grad():
        assert torch.equal(model(x), logits)  # no hooks: the blocks run one by one, the same result


def _block_peaks(block, x) -> tuple[int, int]:
    """(the forward's peak beyond what it keeps, the backward's peak) of block(x), in bytes."""
    x.requires_grad_()
    saved = saved_activation_bytes(block, x).total_bytes
    out, grads = [], []
    forward = cpu_step_peak_bytes(lambda: out.append(block(x)))["step_peak_bytes"] - saved
    g = torch.randn_like(out[0])
    backward = cpu_step_peak_bytes(lambda: grads.append(torch.autograd.grad(out[0], [x, *block.parameters()], g)))
    return forward, backward["step_peak_bytes"]


@pytest.mark.parametrize("policy", ["q4+mask+bn4", "avg4+mask+bn8"])
def test_a_compressed_block_writes_over_what_is_its_own_in_both_passes(policy, compiled, monkeypatch):
    """At batch 16 (two chunks of 8, S16 = 2 S a tensor): where the block vouches for its
    temporaries, its second conv writes its output over its input, so the forward holds the
    block's input, that input and a chunk beyond what it keeps (1.5 S16; 2 S16 with nothing
    vouched); and the backward writes over each gradient that is its own (the convs' input
    gradients, the mask's, BatchNorm's), so beside the output gradient it was handed and the
    input gradient it returns it holds a chunk (2.5 S16 in all; 3 with nothing vouched). The
    convs rebuild their inputs in quarters, as a large layer's are (a 1 MiB one is rebuilt whole)."""
    from core.method import conv as conv_module

    monkeypatch.setattr(conv_module, "_MIN_REBUILT_CHUNK_BYTES", 1)
    s16 = 2 * S
    peaks = []
    for vouched in (True, False):
        torch.manual_seed(0)
        block = compress_model(BasicBlock(16, 16), policy).to(memory_format=CL)
        if not vouched:
            for m in block.modules():
                if hasattr(m, "pp_input_from"):
                    m.pp_input_from, m.pp_inplace = (), False
        peaks.append(_block_peaks(block, torch.randn(16, 16, 32, 32).contiguous(memory_format=CL)))
    (fwd, bwd), (fwd_plain, bwd_plain) = ((f / s16, b / s16) for f, b in peaks)
    assert fwd < 1.5 and fwd_plain > 1.75, peaks
    assert bwd < 2.6 and bwd_plain > 2.7, peaks


@pytest.mark.parametrize("kind", ["conv", "pad"])
def test_a_downsampling_blocks_shortcut_hands_back_its_input_gradient_compact(kind, compiled):
    """A stride-2 block's shortcut reads a quarter of the input's pixels (a 1x1 conv, or option A's
    subsampling). At batch 32 (S32 = 4 S, the block's input) its input gradient comes back
    compact and is added into the main branch's, which autograd already holds (S32; autograd runs
    the shortcut's backward after the main branch's). The conv's (S32/4, computed 8 samples at a
    time: S32/4 more) sits beside its incoming gradient (S32/2): 2 S32 where a full-size one made
    2.5. Option A's is a slice of the block output's gradient, nothing new: the peak is then the
    main branch's own (2 S32: that gradient, held for the shortcut, the first conv's incoming one
    and its input gradient), where undoing the two slices made a full-size gradient and a
    half-size one beside the main branch's (2.5)."""
    s32 = 4 * S
    peaks = []
    for fanned in (True, False):
        torch.manual_seed(0)
        block = compress_model(BasicBlock(16, 32, stride=2, shortcut=kind), "q4+mask+bn4").to(memory_format=CL)
        if not fanned:
            shortcut = block.downsample[0] if kind == "conv" else block.downsample
            shortcut.register_forward_pre_hook(lambda m, args: None)  # the block then calls it plainly
        x = torch.randn(32, 16, 32, 32).contiguous(memory_format=CL).requires_grad_()
        y = block(x)  # the forward outside the profiler, as the trainer runs it, and a step
        g = torch.randn_like(y)  # before the one measured: the first compiles the passes
        wrt = [x, *block.parameters()]
        torch.autograd.grad(y, wrt, g)
        y = block(x)
        peak = cpu_step_peak_bytes(functools.partial(torch.autograd.grad, y, wrt, g))
        peaks.append(peak["step_peak_bytes"] / s32)
    assert peaks[0] < 2.15 and peaks[1] > 2.4, peaks


@pytest.mark.parametrize("policy, freed", [("q4+mask+bn4", True), ("avg2+mask", True), ("none", False)])
def test_a_downsampling_blocks_input_is_freed_once_both_branches_have_read_it(policy, freed):
    """The model hands each block its input to hold alone (ResidualBlock.forward_from): where
    nothing keeps it (compressed convs keep forms of their own), the input of a block with a
    shortcut of its own is gone before the block's second conv runs. Uncompressed, conv1 keeps it."""
    torch.manual_seed(0)
    model = compress_model(build_model("resnet18"), policy)
    ref, alive = [], []  # a weak reference to layer2[0]'s input, taken where layer1 makes it
    model.layer1[-1].act2.register_forward_hook(lambda m, args, out: ref.append(weakref.ref(out)))
    model.layer2[0].conv2.register_forward_pre_hook(lambda m, args: alive.append(ref[0]() is not None))
    model(torch.randn(16, 3, 32, 32))  # two chunks of 8: the shortcut conv's compact gradient (shortcut.py)
    assert alive == [not freed]


def test_a_block_subclass_with_a_forward_of_its_own_is_called_through_it():
    """The model hands a block its input through forward_from, which runs a subclass's own
    forward where it has one (and the block's declarations then vouch for nothing)."""
    calls = []

    class Traced(BasicBlock):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    model = build_model("resnet20")
    model.layer2[0].__class__ = Traced
    model(torch.randn(2, 3, 32, 32))
    assert calls == [(2, 16, 32, 32)]
