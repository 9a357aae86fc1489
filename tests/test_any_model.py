"""compress_model on models PoolProp did not build: torchvision's CNNs and the layers they use.

Exactness where the policy is exact (bit for bit), the forward unchanged under every policy,
state_dicts that load both ways, refusals that name the module and leave the model alone, and
the four torchvision models the README measures: converted, trained a step, cut by half."""

import collections
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from core import PolicyError, build_model, compress_model, decompress_model
from core.method.meter import saved_activation_bytes
from core.method.quantize import packed_bytes

FAMILIES = ["avg2+mask+bn8", "q4+mask+bn4", "q2+mask+bn2", "avg2+res2+mask+bn4", "ckpt"]


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _layer_zoo(smooth: bool = True):
    """One of each layer the converter handles, in a small CNN (N, C, H, W) -> logits; without
    the smooth activations (which keep codes, never exact) when smooth=False."""

    class Zoo(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.relu = nn.ReLU(inplace=True)  # used twice below, in place: one module, two masks
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
            self.gn = nn.GroupNorm(2, 8)
            self.relu6 = nn.ReLU6()
            self.leaky = nn.LeakyReLU(0.1)
            self.hardtanh = nn.Hardtanh(-0.5, 0.5)
            self.silu = nn.SiLU()
            self.gelu = nn.GELU()
            self.hswish = nn.Hardswish()
            self.sigmoid = nn.Sigmoid()
            self.ln = nn.LayerNorm(8)
            self.maxpool = nn.MaxPool2d(3, 1, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn(self.conv(x))))
            x = self.relu(self.gn(self.dw(x)))
            x = self.leaky(self.relu6(x)) + self.hardtanh(x)
            if smooth:
                x = self.silu(x) + self.gelu(x) * self.sigmoid(x) + self.hswish(x)
            x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.fc(self.pool(x).flatten(1))

    return Zoo()


def test_exact_parts_give_bit_identical_gradients_on_every_layer():
    """K = 1 and the 1-bit masks are exact: the same gradients as the plain model, bit for bit,
    on ReLU (shared, in place), ReLU6, Hardtanh, LeakyReLU, depthwise convs, GroupNorm,
    LayerNorm, Linear, max pooling (which keeps only its indices) and global pooling."""
    torch.manual_seed(0)
    plain = _layer_zoo(smooth=False)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    exact = _grads(plain, x, y)
    model = copy.deepcopy(plain)
    compress_model(model, "avg1+mask")
    assert type(model.relu).__name__ == "MaskReLU" and type(model.relu6).__name__ == "MaskedReLU6"
    assert type(model.pool).__name__ == "ShapeOnlyGlobalPool" and type(model.maxpool).__name__ == "IndicesMaxPool2d"
    got = _grads(model, x, y)
    assert got.keys() == exact.keys()
    for k in exact:
        assert torch.equal(got[k], exact[k]), k


@pytest.mark.parametrize("policy", ["avg2+mask+bn8", "q2+mask+bn2", "avg2+res2+mask+bn4", "q4+mask+bn16"])
def test_the_forward_is_unchanged_and_gradients_finite_under_every_policy(policy):
    torch.manual_seed(1)
    plain = _layer_zoo()
    model = copy.deepcopy(plain)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    compress_model(model, policy)
    assert torch.equal(model(x), plain(x))  # train mode: batch statistics, the same arithmetic
    grads = _grads(model, x, y)
    assert all(torch.isfinite(g).all() for g in grads.values())
    # the smooth activations keep codes now: 8 bits under pooling, the policy's bits under qB
    bits = 8 if policy.startswith("avg") else int(policy[1])
    assert model.silu.pp_bits == bits and model.gelu.pp_bits == bits


def test_in_place_smooth_activations_as_torchvision_uses_them():
    torch.manual_seed(2)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(inplace=True), nn.Conv2d(4, 2, 3))
    model = copy.deepcopy(plain)
    x = torch.randn(2, 3, 9, 9)
    compress_model(model, "q8+mask")
    assert torch.equal(model(x), plain(x))
    got = _grads(nn.Sequential(model, nn.Flatten()), x, torch.zeros(2, dtype=torch.long))
    assert all(torch.isfinite(g).all() for g in got.values())


def test_state_dict_keys_and_values_survive_both_ways():
    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compress_model(model, "q4+mask+bn4")
    assert model.state_dict().keys() == before.keys()
    model.load_state_dict(before)  # saved before compressing, loads after
    decompress_model(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(type(m).__name__.startswith(("Masked", "Coded", "Compressed", "LowPrecision"))
                   for m in model.modules())


def test_a_compressed_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    """torch.save(model) names each class; the converted classes are made at run time, so they
    are named by what they are made from (made again on load). A fresh interpreter loads the model
    with weights_only=True, allowlisting only what the file names, all of it torch's, torchvision's
    or PoolProp's, and its gradients are the original's, bit for bit; it decompresses to
    torchvision's classes. As nn.Module's own pickling does, a module.compile()d call is left
    behind: a copy runs its own weights."""
    torch.manual_seed(3)
    model = nn.Sequential(torchvision.models.resnet18(num_classes=5), nn.SiLU())  # adopted + coded
    compress_model(model, "avg2+mask+bn8")
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2,))
    torch.manual_seed(4)  # the coded SiLU rounds stochastically
    torch.save((x, y, _grads(model, x, y)), tmp_path / "expected.pt")
    model[0].compile()  # compiled on its first call, which never comes here
    path = tmp_path / "model.pt"
    torch.save(model, path)
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.detach().zero_()
    assert not clone[0](x).any()  # its own zero weights, not model[0]'s compiled call
    script = f"""
import importlib, torch, torch.nn as nn, torch.nn.functional as F, torchvision
from core import compress_model, decompress_model
torch.set_num_threads({torch.get_num_threads()})  # the same reductions, in the same order
named = torch.serialization.get_unsafe_globals_in_checkpoint({str(path)!r})
assert all(n.split(".")[0] in ("torch", "torchvision", "core") for n in named), named
allowed = [getattr(importlib.import_module(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in named]
# weights_only builds only classes it is given, and the variants are made on load (by a function the
# file names): the same architecture converted here makes them, and the load finds them made
variants = compress_model(nn.Sequential(torchvision.models.resnet18(num_classes=5), nn.SiLU()), "avg2+mask+bn8")
with torch.serialization.safe_globals(allowed + list({{type(m) for m in variants.modules()}})):
    model = torch.load({str(path)!r}, weights_only=True)
assert model is not variants and model[0].fc.weight.shape == (5, 512)
x, y, expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
torch.manual_seed(4)
model.zero_grad(set_to_none=True)
F.cross_entropy(model(x), y).backward()
got = {{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
assert type(model[0]).__name__ == "AdoptedResNet" and type(model[1]).__name__ == "CodedSiLU"
decompress_model(model)
assert sorted({{type(m).__module__.split(".")[0] for m in model.modules()}}) == ["torch", "torchvision"]
print("loaded")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "loaded", out.stderr[-2000:]


@pytest.mark.parametrize("make, policy", [
    (lambda: build_model("resnet20"), "avg2+mask+bn8"),
    (lambda: torchvision.models.resnet18(num_classes=5), "q4+mask+bn4"),  # one ReLU after two norms: a loop
    (lambda: torchvision.models.mobilenet_v2(num_classes=5), "avg2+mask+bn8"),  # Sequentials handing over
])
def test_a_dropped_converted_model_is_freed_at_once_and_a_copy_names_its_own_modules(make, policy):
    """The converter's references between modules (the maker of a layer's input, the Sequential
    handing it over) close loops; held as tuples they kept a dropped model's parameters until
    Python's cycle collector ran. Held weakly, the last reference frees the model; a deep copy's
    references name the copy's own modules."""
    import gc
    import weakref

    model = compress_model(make(), policy)
    refs = {n: tuple(getattr(m, a)) for n, m in model.named_modules()
            for a in ("pp_input_from", "pp_handed_by", "pp_elements") if getattr(m, a, ())}
    assert refs  # the converter did declare who reads what
    clone = copy.deepcopy(model)
    mine, theirs = {id(m) for m in clone.modules()}, {id(m) for m in model.modules()}
    for n, m in clone.named_modules():
        for a in ("pp_input_from", "pp_handed_by", "pp_elements"):
            named = tuple(getattr(m, a, ()))
            assert all(id(x) in mine and id(x) not in theirs for x in named), (n, a)
            assert len(named) == len(tuple(getattr(model.get_submodule(n), a, ()))), (n, a)
    gc.collect()
    gc.disable()
    try:
        params = [weakref.ref(p) for p in model.parameters()]
        del model, refs
        assert not any(p() is not None for p in params)  # freed by reference counting alone
    finally:
        gc.enable()


def test_a_shared_in_place_relu_keeps_a_mask_per_use():
    """torchvision's BasicBlock calls one in-place self.relu twice: two masks, one per call."""
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    compress_model(model, "mask")
    rep = saved_activation_bytes(model, x, torch.randint(0, 10, (2,)))
    block = model.layer1[0]
    n = 2 * 64 * 16 * 16  # layer1's activations: 64 channels at 16 x 16 for a 64 px input
    assert rep.by_layer_kind["layer1.0.relu"]["ReLU state"] == 2 * (n // 8)  # two uses, one bit each
    assert type(block.relu).__name__ == "MaskReLU"


def test_the_meter_counts_what_the_coded_layers_really_hold():
    """A SiLU keeps its input as 8-bit codes, a Linear under q4 its input as 4-bit codes: the
    meter's bytes equal the packed sizes computed by hand."""
    model = nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 3))
    x = torch.randn(5, 6, requires_grad=True)
    compress_model(model, "q4+mask")
    rep = saved_activation_bytes(model, x)
    assert rep.by_layer_kind["1"]["activation state"] == packed_bytes((5, 16), 4)  # q4: the family's bits
    assert rep.by_layer_kind["2"]["linear input"] == packed_bytes((5, 16), 4)
    assert sum(rep.by_layer.values()) == rep.total_bytes


def test_bad_input_is_one_line_and_changes_nothing():
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet5'") as e:
        build_model("torchvision:resnet5")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg")
    # an input too small for K: convnext at 32 px leaves 1 x 1 maps for avg2's last stage
    model = torchvision.models.convnext_tiny(num_classes=10)
    compress_model(model, "avg2+mask+bn8")
    with pytest.raises(PolicyError, match="K=2 is larger than the 1x1 feature map"):
        model(torch.randn(2, 3, 32, 32))
    # the refused conversion of a custom module leaves a compressed model exactly as it was
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU())
    compress_model(model, "avg2", unsupported="exact")
    types = [type(m) for m in model.modules()]
    with pytest.raises(PolicyError, match=r"1 \(PReLU\)"):
        compress_model(model, "q2+mask")
    assert [type(m) for m in model.modules()] == types and str(model.pp_policy) == "avg2"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny"])
def test_torchvision_models_convert_train_and_keep_half(name):
    """The README's four: converted as they come, one training step, saved bytes cut by at
    least half at 224 px (the meter's bytes are linear in the batch: batch 2 here, 8 in the
    README's table)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    x, y = torch.randn(2, 3, 224, 224), torch.randint(0, 10, (2,))
    none = saved_activation_bytes(model, x, y).total_bytes
    model.eval()
    out = model(x[:1])
    model.train()
    compress_model(model, "avg2+mask+bn8")
    assert torch.equal(model.eval()(x[:1]), out)
    model.train()
    rep = saved_activation_bytes(model, x, y)
    assert rep.total_bytes <= none / 2, (name, rep.total_bytes / none)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "shufflenet_v2_x0_5"])
def test_mobilenet_v3_and_shufflenet_convert_train_and_keep_a_third(name):
    """MobileNetV3 gates its squeeze-excitation with a Hardsigmoid (kept as codes), ShuffleNetV2's
    stride-1 blocks hold an empty Sequential (the identity): both convert as they come. At 64 px,
    batch 2: the eval forward unchanged, one training step with finite gradients, and at most a
    third of the saved bytes under avg2+mask+bn8."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    none = saved_activation_bytes(model, x, y).total_bytes
    expected = model.eval()(x[:1])
    compress_model(model.train(), "avg2+mask+bn8")
    assert torch.equal(model.eval()(x[:1]), expected)
    assert saved_activation_bytes(model.train(), x, y).total_bytes <= none / 3
    F.cross_entropy(model(x), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_every_model_in_the_apps_menus_converts():
    """The Train, Memory and Gradient fidelity pages offer MODEL_MENU: each entry builds and
    converts under the codes and under pooling, every layer compressed (none left exact)."""
    from core.models import MODEL_MENU

    for name in MODEL_MENU:
        for policy in ("q4+mask+bn4", "avg2+mask+bn8"):
            model = compress_model(build_model(name), policy)
            assert model.pp_uncompressed == [], (name, policy)


@pytest.mark.parametrize("policy", ["avg2+mask", "q4+mask+bn4"])
def test_swin_v2_relative_position_mlp_stays_exact(policy):
    """Swin V2's attention computes its bias with an MLP (`cpb_mlp`) over a constant (1, 7, 7, 2)
    coordinate table, not a feature map: its Linear layers keep their inputs exact (pooled or
    coded, their weight gradients were 0.3-0.6 off). Its q/k/v and output projections run as
    F.linear on the module's weights, so the attention alone backpropagates bit for bit."""
    from torchvision.models.swin_transformer import ShiftedWindowAttentionV2

    torch.manual_seed(0)
    plain = ShiftedWindowAttentionV2(16, [4, 4], [2, 2], num_heads=2)
    model = compress_model(copy.deepcopy(plain), policy)
    assert type(model.cpb_mlp[0]) is nn.Linear and type(model.cpb_mlp[2]) is nn.Linear
    x = torch.randn(2, 8, 8, 16)
    for m in (plain, model):
        m(x).square().sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), model.parameters()))


@pytest.mark.parametrize("policy", ["q4+mask+bn4", "avg2+mask+bn8"])
def test_maxvit_converts_and_its_reshapes_keep_nothing(policy):
    """MaxViT's window partitions and axis swaps are reshapes: nothing for backward, passed
    through (the meter finds no bytes in them alone). MaxViT-T then converts, its eval forward
    unchanged and a training step finite (224 px: its windows need it); under pooling its
    attention's and MLP's Linear layers, which see (N, windows, tokens, C), stay exact (pooling
    there had refused the last stage's single 7x7 window: "K=2 is larger than 1x49")."""
    from torchvision.models.maxvit import SwapAxes, WindowDepartition, WindowPartition

    class Reshapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.part, self.depart, self.swap = WindowPartition(), WindowDepartition(), SwapAxes(-2, -1)

        def forward(self, x):
            return self.swap(self.depart(self.part(x, 4), 4, 2, 2))

    reshapes = compress_model(Reshapes(), policy)
    assert saved_activation_bytes(reshapes, torch.randn(2, 3, 8, 8, requires_grad=True)).total_bytes == 0
    torch.manual_seed(0)
    model = torchvision.models.get_model("maxvit_t", num_classes=10)
    x, y = torch.randn(1, 3, 224, 224), torch.randint(0, 10, (1,))
    expected = model.eval()(x)
    compress_model(model.train(), policy)
    assert torch.equal(model.eval()(x), expected)
    loss = F.cross_entropy(model.train()(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _tiny_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=10)


def _tiny_swin(v2: bool):
    from torchvision.models import swin_transformer as swin

    extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                window_size=[4, 4], num_classes=10, **extra)


@pytest.mark.parametrize("build, size", [
    (lambda: torchvision.models.regnet_x_400mf(num_classes=10), 32),
    (lambda: torchvision.models.mnasnet0_5(num_classes=10), 64),
    (lambda: torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10), 32),
    (lambda: torchvision.models.squeezenet1_1(num_classes=10), 64),
    (lambda: torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True), 64),
    (lambda: torchvision.models.inception_v3(num_classes=10, aux_logits=False, init_weights=True), 80),
    (_tiny_vit, 32), (lambda: _tiny_swin(False), 32), (lambda: _tiny_swin(True), 32),
    (lambda: torchvision.models.resnet18(num_classes=10), 32), (lambda: build_model("resnet20"), 32)])
def test_ckpt_recomputes_the_blocks_of_every_family_exactly(build, size):
    """`ckpt` recomputes each family's blocks (RegNet's, MNASNet's, DenseNet's dense blocks,
    SqueezeNet's Fire modules, the Inception blocks, ViT's and Swin's): the same gradients as
    the plain model, bit for bit (the recomputation replays the random draws of dropout and
    stochastic depth), and the same BatchNorm running statistics (the recomputation leaves
    them as the forward did), keeping fewer bytes."""
    torch.manual_seed(0)
    plain = build()
    model = compress_model(copy.deepcopy(plain), "ckpt")
    assert any(type(m).__name__.startswith("Checkpointed") or getattr(m, "checkpointed", False)
               for m in model.modules())
    x, y = torch.randn(2, 3, size, size), torch.randint(0, 10, (2,))
    results = []
    for m in (plain, model):
        torch.manual_seed(1)
        results.append((_grads(m, x, y), dict(m.named_buffers())))
    (expected, statistics), (got, kept) = results
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert kept.keys() == statistics.keys() and all(torch.equal(kept[k], statistics[k]) for k in kept)
    torch.manual_seed(1)
    none = saved_activation_bytes(plain, x, y).total_bytes
    torch.manual_seed(1)
    assert saved_activation_bytes(model, x, y).total_bytes < none


def test_ckpt_knows_torchvisions_blocks_only_and_restores_statistics_a_norm_outside_reads():
    """A user's block named like one of torchvision's (a U-Net's EncoderBlock(x, t)) is not
    recomputed: `ckpt` refuses, naming what it knows, and the model is unchanged. And a
    checkpointed block's BatchNorm that also runs outside the block (its buffers saved by an
    op there) still backpropagates: the statistics are restored without a version bump."""
    from torchvision.models.resnet import BasicBlock

    class EncoderBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x, t):
            return self.conv(x) + t

    class UNetish(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = EncoderBlock()

        def forward(self, x):
            return self.down(x, x)

    unet = UNetish()
    with pytest.raises(PolicyError, match="ckpt recomputes"):
        compress_model(unet, "ckpt")
    assert type(unet.down) is EncoderBlock

    class NormAlsoOutside(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block = nn.Conv2d(3, 4, 1), BasicBlock(4, 4)

        def forward(self, x):
            return self.block(self.block.bn1(self.stem(x)))

    torch.manual_seed(0)
    plain = NormAlsoOutside()
    model = compress_model(copy.deepcopy(plain), "ckpt")
    assert type(model.block).__name__ == "CheckpointedBasicBlock"
    for _ in range(3):
        x = torch.randn(2, 3, 6, 6)
        for m in (plain, model):
            m.zero_grad()
            m(x).square().sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(plain.buffers(), model.buffers()))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), model.parameters()))


def _tiny_torchvision_resnet(block: str):
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    return ResNet(BasicBlock if block == "basic" else Bottleneck, [1, 1, 1, 1], num_classes=10)


@pytest.mark.parametrize("block, policy, channels_last", [
    ("basic", "avg2+mask", True), ("basic", "avg2+mask", False), ("bottleneck", "avg2+mask", True),
    ("basic", "avg2+mask+bn16", True)])
def test_torchvision_resnets_run_as_ours_with_the_same_outputs_and_gradients(block, policy, channels_last,
                                                                              monkeypatch):
    """compress_model adopts torchvision's ResNet, BasicBlock and Bottleneck (method/
    torchvision_resnet.py): their forwards become PoolProp's, which write over what is theirs
    alone and hand a strided shortcut's gradient back compact. The same outputs and gradients,
    bit for bit, as the converted model run by torchvision's own forwards; the in-place paths
    and the compact shortcut really ran (batch 16: two chunks of 8), and only when adopted; and
    decompress_model gives torchvision's classes back. (Deterministic policies: `qB` rounds with
    draws the shortcut's conv now takes first; bn16's BatchNorm, written over its input, keeps
    x_hat's rounding of its own, as in our ResNets: equal to float32 rounding there.)"""
    from core.method import conv as conv_module
    from core.method import convert, masks, shortcut

    ran = collections.Counter()
    for module, name in ((masks, "_mask_apply_"), (conv_module, "_over_by_chunk")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _name=name, **k: (ran.update([_name]), _fn(*a, **k))[1])
    fan = shortcut._FanOut.backward
    monkeypatch.setattr(shortcut._FanOut, "backward",
                        staticmethod(lambda ctx, g, gs: (ran.update(["compact shortcut"]), fan(ctx, g, gs))[1]))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, y = torch.randn(16, 3, 64, 64).contiguous(memory_format=layout), torch.randint(0, 10, (16,))
    torch.manual_seed(0)
    plain = _tiny_torchvision_resnet(block).to(memory_format=layout)
    adoption = convert.adoption
    results, counts = [], []
    for adopted in (True, False):
        monkeypatch.setattr(convert, "adoption", adoption if adopted else (lambda m: None))
        model = compress_model(copy.deepcopy(plain), policy)
        names = {type(model).__name__, type(model.layer2[0]).__name__}
        assert names == ({"AdoptedResNet", f"Adopted{type(plain.layer2[0]).__name__}"} if adopted
                         else {"ResNet", type(plain.layer2[0]).__name__})
        ran.clear()
        out = model(x)
        results.append([out, *_grads(model, x, y).values()])
        counts.append(dict(ran))
        decompress_model(model)
        assert type(model) is type(plain) and type(model.layer2[0]) is type(plain.layer2[0])
    assert counts[1] == {}, counts
    assert counts[0]["compact shortcut"] == 3 and counts[0]["_mask_apply_"] > 0, counts
    for a, b in zip(*results):
        if "bn16" in policy:
            torch.testing.assert_close(a, b)
        else:
            assert torch.equal(a, b)


def test_a_torchvision_block_with_a_forward_of_its_own_is_not_adopted_nor_the_resnet_holding_it():
    """Adoption vouches for torchvision's own forwards only: a subclass that overrides one (and
    may read a tensor twice) keeps its forward, and the ResNet around it keeps torchvision's
    (its declarations would reach that block); the other blocks are still adopted."""
    from torchvision.models.resnet import BasicBlock

    class Logged(BasicBlock):
        def forward(self, x):
            return super().forward(x)

    model = _tiny_torchvision_resnet("basic")
    own = Logged(64, 64)
    own.load_state_dict(model.layer1[0].state_dict())
    model.layer1[0] = own
    compress_model(model, "q4+mask+bn4")
    assert type(model).__name__ == "ResNet" and type(model.layer1[0]) is Logged
    assert type(model.layer2[0]).__name__ == "AdoptedBasicBlock"
    assert not any(getattr(m, "pp_input_from", ()) for m in model.layer1[0].modules())
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # runs


def _small_mobilenet():
    return torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10)


def _small_efficientnet():
    """EfficientNet-B0's blocks (expanding SiLU, depthwise conv, squeeze-excitation), two stages."""
    model = torchvision.models.efficientnet_b0(num_classes=10)
    model.features = model.features[:3]
    model.classifier[1] = nn.Linear(24, 10)
    return model


@pytest.mark.parametrize("build, policy, channels_last", [
    (_small_mobilenet, "avg2+mask", True), (_small_mobilenet, "q4+mask+bn4", False),
    (_small_mobilenet, "avg2+mask+bn8", True), (_small_mobilenet, "avg2+mask+bn16", True),
    (_small_efficientnet, "q4+mask+bn4", True)])
def test_plain_sequentials_vouch_for_their_layers_with_the_same_outputs_and_gradients(build, policy,
                                                                                      channels_last, monkeypatch):
    """A plain nn.Sequential hands each element the one before's output and keeps nothing
    (method/sequential.py): inside MobileNet's and EfficientNet's blocks the BatchNorms then write
    over their convs' outputs, the ReLU6 masks over their norms', and an activation's backward
    over the gradient the conv after it hands back. The same outputs and gradients as without
    those declarations, bit for bit (bn8, bn16: x_hat rounds its own way in place, and a float8 or
    bf16 rounding flips here and there: a twentieth at most of what keeping x_hat in those bits
    changes, measured 1e-2 of it at most); the in-place paths really ran, and only with them."""
    from core.method import activations, convert, masks, norms

    ran = collections.Counter()
    apply_ = masks._mask_apply_
    monkeypatch.setattr(masks, "_mask_apply_", lambda *a, **k: (ran.update(["mask over g"]), apply_(*a, **k))[1])
    granted = activations.may_overwrite_grad
    monkeypatch.setattr(activations, "may_overwrite_grad",
                        lambda *a: (ok := granted(*a), ran.update(["coded over g"] if ok else []))[0])
    bn = norms.LowPrecisionBNFunction.forward
    monkeypatch.setattr(norms.LowPrecisionBNFunction, "forward", staticmethod(
        lambda ctx, x, *a: (ran.update(["norm in place"] if a[-1] else []), bn(ctx, x, *a))[1]))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    plain = build().to(memory_format=layout)
    x, y = torch.randn(4, 3, 64, 64).contiguous(memory_format=layout), torch.randint(0, 10, (4,))
    declared = convert.sequential_pairs
    results, counts = [], []
    for vouched in (True, False):
        monkeypatch.setattr(convert, "sequential_pairs", declared if vouched else (lambda *a: {}))
        model = compress_model(copy.deepcopy(plain), policy)
        assert any(type(m).__name__.startswith("Vouched") for m in model.modules()) == vouched
        ran.clear()
        torch.manual_seed(1)  # q4 rounds stochastically: the same draws both times
        out = model(x)
        results.append([out, *_grads(model, x, y).values()])
        counts.append(dict(ran))
        decompress_model(model)
        assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    assert counts[1].get("norm in place", 0) == counts[1].get("coded over g", 0) == 0, counts
    if build is _small_mobilenet:
        assert counts[0]["mask over g"] > counts[1].get("mask over g", 0), counts
    else:
        assert counts[0]["coded over g"] > 0, counts
    if "bn" in policy and "bn16" not in policy:
        assert counts[0]["norm in place"] > 0, counts
    if not policy.endswith(("bn8", "bn16")):
        assert all(torch.equal(a, b) for a, b in zip(*results))
        return
    # the policy without its low-precision norms: what x_hat's own rounding changes, 100x more
    model = compress_model(copy.deepcopy(plain), policy.rsplit("+bn", 1)[0])
    torch.manual_seed(1)
    results.append([model(x), *_grads(model, x, y).values()])
    vouched, plain_run, full_norms = (torch.cat([t.detach().flatten() for t in r]) for r in results)
    assert (vouched - plain_run).norm() <= 0.05 * (plain_run - full_norms).norm()


def test_a_hook_a_shared_layer_or_a_forward_of_its_own_stops_what_a_sequential_vouches():
    """Declared pairs hold only while nn.Sequential.forward alone passes the tensor on: a hook on a
    Sequential between the two layers may keep it (the depthwise conv then must not write over
    its input), a module called twice reads its input in two places, and a Sequential subclass
    with a forward of its own may read a tensor twice."""
    torch.manual_seed(0)
    model = compress_model(_small_mobilenet(), "avg2+mask+bn8")
    dw = model.features[3].conv[1][0]
    assert model.features[3].conv[0] in dw.pp_input_from  # the expanding block, whose output dw reads
    kept = []
    model.features[3].conv[0].register_forward_hook(lambda mod, i, o: kept.append((o, o.clone())))
    x = torch.randn(16, 3, 64, 64)  # two batch chunks: the conv could write its output over its input
    model(x).sum().backward()
    held, copied = kept[0]
    assert torch.equal(held, copied)  # not written over by the depthwise conv

    relu = nn.ReLU()
    shared = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), relu, nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), relu)
    compress_model(shared, "avg2+mask+bn8")
    assert shared[1].pp_input_from and not shared[2].pp_input_from and not shared[3].pp_input_from

    class Twice(nn.Sequential):
        def forward(self, x):
            y = self[0](x)
            return self[2](self[1](y)) + y

    own = Twice(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    compress_model(own, "avg2+mask+bn8")
    assert not any(getattr(m, "pp_input_from", ()) or getattr(m, "pp_inplace", False) for m in own)
    assert type(own) is Twice


@pytest.mark.parametrize("body", [
    lambda: nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1)),  # pix2pix's blocks begin so
    lambda: nn.Sequential(nn.Identity(), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(8, 8, 3, padding=1))])
def test_an_in_place_activation_that_may_return_the_callers_tensor_vouches_for_nothing(body, monkeypatch):
    """An in-place activation returns its input: first in a Sequential (or after a layer that
    passes its input on) that is the caller's tensor, which the caller may still read. The conv
    after it must not write over it (the forward is the plain model's, bit for bit), and nothing
    is declared (the gradients are those of the model converted without declarations)."""
    from core.method import convert

    class PreActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.body = nn.Conv2d(3, 8, 3, padding=1), body()

        def forward(self, x):
            h = self.stem(x)
            return self.body(h) + h  # h is relu(h) by now, in plain PyTorch too

    torch.manual_seed(0)
    plain = PreActivation()
    x = torch.randn(16, 3, 8, 8)  # two batch chunks: the conv could write its output over its input
    expected = plain(x)
    declared = convert.sequential_pairs
    grads = []
    for vouching in (declared, lambda *a: {}):
        monkeypatch.setattr(convert, "sequential_pairs", vouching)
        model = compress_model(copy.deepcopy(plain), "q4+mask")
        torch.manual_seed(1)  # q4 rounds stochastically
        out = model(x)
        assert torch.equal(out, expected)
        out.square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_a_maker_with_a_forward_of_its_own_or_a_sequential_edited_after_converting_vouches_for_nothing():
    """Declarations rest on PyTorch's own forwards and on the elements compress_model saw: a conv
    subclass that keeps its output (left exact) is not a maker whose output a BatchNorm may write
    over, and a module inserted into a converted Sequential (which keeps its input) sees its
    input intact; a slice of a converted Sequential decompresses to nn.Sequential."""

    class TapConv(nn.Conv2d):
        def forward(self, x):
            self.out = super().forward(x)
            return self.out

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), TapConv(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    compress_model(model, "avg2+mask+bn8", unsupported="exact")
    x = torch.randn(4, 3, 8, 8)
    model(x).sum().backward()
    assert torch.equal(model[2].out, nn.Conv2d.forward(model[2], model[1](model[0](x))))

    class Keep(nn.Module):
        def forward(self, x):
            self.kept = (x, x.clone())
            return x

    seq = compress_model(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), "avg2+mask+bn8")
    assert type(seq).__name__ == "VouchedSequential" and seq[1].pp_inplace
    seq.insert(1, Keep())
    seq(x).sum().backward()
    assert torch.equal(*seq[1].kept)
    part = seq[:2]
    assert type(part).__name__ == "VouchedSequential"
    decompress_model(part)
    assert type(part) is nn.Sequential


@pytest.mark.parametrize("build, policy", [(lambda: build_model("resnet20"), "avg2+mask"),
                                           (lambda: _layer_zoo(), "avg2+mask+bn8")])
def test_torch_compile_of_a_compressed_model_gives_the_eager_gradients(build, policy):
    """torch.compile(model) traces around the compressed layers, which run as written (dynamo
    could not trace the pooled conv's Function: an internal error). The compiled model's outputs
    and gradients equal the eager model's, to float32 rounding (aot_eager: dynamo and AOT
    autograd without code generation, as fast here as it gets)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = compress_model(build(), policy)
    graph = copy.deepcopy(eager)
    size = 32 if isinstance(eager, type(build_model("resnet20"))) else 8
    x, y = torch.randn(16, 3, size, size), torch.randint(0, 5, (16,))
    results = []
    for model in (eager, torch.compile(graph, backend="aot_eager")):
        torch.manual_seed(1)  # the smooth activations' codes round stochastically
        out = model(x)
        F.cross_entropy(out, y).backward()
        results.append([out, *(p.grad for p in (eager if model is eager else graph).parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("activation", [nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Hardswish(),
                                        nn.Hardsigmoid(), nn.Sigmoid(), nn.Tanh(), nn.Mish(), nn.Softplus(2.0, 5.0),
                                        nn.ELU(0.7)])
def test_a_coded_activations_gradient_is_autograds_at_the_decoded_input(activation, monkeypatch):
    """The backward of an activation kept as codes calls ATen's own backward kernel on the decoded
    input a batch chunk at a time: the same gradient as autograd differentiating the activation
    recomputed at that input (the path kept for activations without a kernel), in every layout
    the converter meets; equal to float32 rounding (a chunk's tail may take a scalar loop)."""
    from core.method import activations

    for shape, channels_last in (((16, 8, 6, 6), False), ((16, 8, 6, 6), True), ((5, 7, 9), False),
                                 ((6, 10), False), ((12, 3, 5, 5), False)):
        x = 3 * torch.randn(shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(x)
        grads = []
        for kernel in (activations._aten_backward, lambda module: None):
            monkeypatch.setattr(activations, "_aten_backward", kernel)
            coded = compress_model(nn.Sequential(copy.deepcopy(activation)), "q8+mask")
            xi = x.clone().requires_grad_()
            torch.manual_seed(1)  # the same codes
            grads.append(torch.autograd.grad(coded(xi), xi, g)[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)
        assert grads[0].stride() == grads[1].stride()


def test_a_stage_with_a_forward_of_its_own_is_called_through_it():
    """The stages' blocks are called one by one only where a stage is a plain Sequential: a
    subclass with its own forward (here it halves the stage's output) is called as itself, in
    PoolProp's ResNets and in torchvision's (which is then not adopted); the outputs stay the
    plain model's."""

    class Halved(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 0.5

    torch.manual_seed(0)
    x = torch.randn(16, 3, 64, 64)
    for plain in (build_model("resnet20"), _tiny_torchvision_resnet("basic")):
        plain.layer2 = Halved(*plain.layer2)
        model = compress_model(copy.deepcopy(plain), "avg2+mask")
        assert torch.equal(model(x), plain(x))
    assert type(model).__name__ == "ResNet"


def test_a_block_compiled_on_its_own_is_called_compiled():
    """module.compile() makes a block's call run compiled; the stage loop, which hands a plain
    block its input to hold alone, calls such a block through its call (layout.called_plainly)."""
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = compress_model(build_model("resnet20"), "avg2+mask")
    model.layer1[0].compile(backend=backend)
    model(torch.randn(16, 3, 32, 32)).sum().backward()
    assert graphs
