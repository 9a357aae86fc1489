"""Turning a model's layers into their compressed forms and back (`compress_model`).

`compress_model` swaps module classes in place (weights and state_dict keys untouched), so
one checkpoint loads into both forms and `decompress_model` gives the plain model back. It
works on PoolProp's ResNets and on torchvision's CNNs as they come: a ReLU module that one
block uses several times, or in place, becomes a masked ReLU whose every call keeps its own
mask; smooth activations, LayerNorm/GroupNorm, Linear layers, global pooling, squeeze-
excitation and ConvNeXt's layer scale each have a compressed form. The whole model is
planned first and changed only when every module is understood: a refused conversion leaves
the model as it was.

torch.compile(model) works on a converted model: each compressed layer's forward is left out of
the graph (`torch.compiler.disable`: dynamo cannot trace the layers' Functions, some of whose
shapes depend on the data) and runs as written, with the memory it saves; the rest is compiled,
and the fast path's passes inside the layers still run compiled.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .activations import SMOOTH, _Coded
from .checkpointing import Checkpointed
from .conv import CompressedConv2d, ConvInputForm
from .linear import CompressedLinear
from .masks import MaskReLU, _Masked
from .maxpool import IndicesMaxPool2d
from .norms import LowPrecisionBatchNorm2d, _LowPrecisionNorm
from .policy import CompressionPolicy, PolicyError, in_scope
from .refs import ModuleRefs
from .scale import (
    ShapeOnlyGlobalPool,
    _CodedLayerScale,
    _CodedSqueezeExcite,
    is_global_pool,
    is_layer_scale_block,
    is_squeeze_excitation,
)
from .sequential import VouchedSequential, is_plain_sequential, sequential_pairs
from .torchvision_resnet import adoption

# Leaf modules that keep nothing a policy could shrink (or nothing at all): no swap needed.
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.Softmax, nn.ZeroPad2d)
_PASS_THROUGH_NAMES = {"Permute", "StochasticDepth",  # torchvision.ops, by name: core.method imports no torchvision
                       "WindowPartition", "WindowDepartition", "SwapAxes"}  # MaxViT's reshapes
# Attention whose Linear layers see (N, windows, tokens, C): tokens, not a feature map to pool.
_TOKEN_ATTENTION_NAMES = {"PartitionAttentionLayer"}  # MaxViT's (its attention and its MLP)
# Attention whose `cpb_mlp` reads a constant coordinate table, (1, 2w-1, 2w-1, 2), not a feature
# map: pooled, its weight gradients were 0.3-0.6 off to save a few KiB, so it stays exact
_TABLE_MLP_NAMES = {"ShiftedWindowAttentionV2"}  # Swin V2's relative-position bias
# Blocks of torchvision's models that `ckpt` recomputes (PoolProp's own have `checkpointed`): each
# takes one tensor (DenseNet's layers take a list: their dense block is recomputed whole).
_BLOCK_NAMES = {"BasicBlock", "Bottleneck", "InvertedResidual", "MBConv", "FusedMBConv", "CNBlock",
                "ResBottleneckBlock", "_InvertedResidual", "_DenseBlock", "Fire", "Inception", "InceptionA",
                "InceptionB", "InceptionC", "InceptionD", "InceptionE", "EncoderBlock", "SwinTransformerBlock",
                "SwinTransformerBlockV2"}
_MASKABLE_TYPES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU)
_ORIGINAL = "_pp_original_class"
_ATTRS = ("pp_form", "pp_name", "pp_store", "pp_bits", "pp_channels_first", "pp_inplace", "pp_input_from",
          "pp_handed_by", "pp_elements", "pp_tokens", "checkpointed")
_MODULE_REFS = ("pp_input_from", "pp_handed_by", "pp_elements")  # other modules: held weakly (refs.py)
_variants: dict[tuple[type, type], type] = {}


def _variant(base: type, mixin: type, prefix: str) -> type:
    """`base` with `mixin`'s forward in front, made once per pair (so isinstance(base) holds)."""
    key = (base, mixin)
    if key not in _variants:
        _variants[key] = type(f"{prefix}{base.__name__}", (mixin, base),
                              {"__module__": __name__, "__reduce_ex__": _reduce_variant,
                               "_pp_made_from": (base, mixin, prefix)})
    return _variants[key]


def _reduce_variant(module: nn.Module, protocol: int):
    # A variant class lives in no module's namespace, so pickle (torch.save(model), a worker
    # process) cannot name it: it is named by what it is made from, and made again on load.
    made_from = type(module).__dict__.get("_pp_made_from")
    if made_from is None:  # a user's subclass of a variant: pickled as any class is
        return object.__reduce_ex__(module, protocol)
    return _new_variant, made_from, module.__getstate__()  # nn.Module's: without a module.compile()d call


def _new_variant(base: type, mixin: type, prefix: str) -> nn.Module:
    cls = _variant(base, mixin, prefix)
    return cls.__new__(cls)


def _inherits_forward(m: nn.Module, base: type) -> bool:
    return type(m).forward is base.forward


@dataclass
class _Swap:
    name: str
    module: nn.Module
    cls: type
    attrs: dict


def _is_checkpoint_block(m: nn.Module) -> bool:
    """torchvision's own (a user's EncoderBlock may take two tensors), known by module and name."""
    cls = type(m)
    return cls.__name__ in _BLOCK_NAMES and cls.__module__.startswith("torchvision.") and not hasattr(m, "checkpointed")


def _inputs_made_by(model: nn.Module, layer: type, maker: type, declaration: str) -> dict[str, tuple[nn.Module]]:
    """Where a module declares (`declaration`, for its children and theirs, down to a module that
    declares otherwise) that each `layer` reads a temporary nothing else reads: name -> (the
    module that made that input: the nearest `maker` registered before it among its siblings).
    The layer writes over its input only inside the declaring forward (layout.vouched_forward) and
    while that module has no hook (one could have kept the output). A 1-tuple: nn.Module would
    register a module attribute as a child."""
    made_by = {}
    # a stack, not a recursive closure: a closure that calls itself is a reference cycle, which
    # kept the model's modules (and their parameters) alive after the model was dropped, until
    # Python's cycle collector ran
    stack = [(model, "", False)]
    while stack:
        parent, prefix, vouched = stack.pop()
        declarer = adoption(parent) or parent  # a torchvision ResNet declares what its adopted forward makes true
        vouched = bool(getattr(declarer, declaration, vouched))
        reads = getattr(declarer, "pp_reads", {})  # where registration order does not tell
        last = None
        for name, child in parent.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, maker):
                last = child
            elif isinstance(child, layer) and vouched and (name in reads or last is not None):
                made_by[full] = tuple(getattr(parent, n) for n in reads[name]) if name in reads else (last,)
            stack.append((child, full, vouched))
    return made_by


def _plan(model: nn.Module, policy: CompressionPolicy) -> tuple[list[_Swap], list[str], list[str]]:
    """(the swaps `policy` asks for, modules it cannot handle, modules it leaves exact)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    stem = convs[0] if convs else None
    form = ConvInputForm.of(policy)
    code_bits = policy.bits or 8  # what smooth activations and channel scales keep, in bits
    shrinks = policy != CompressionPolicy()
    swaps, problems, exact = [], [], []
    # a squeeze-excitation's 1x1 convs see the squeezed (N, C, 1, 1) vector: nothing to pool
    excites = [n + "." for n, m in model.named_modules() if n and is_squeeze_excitation(m)]
    attentions = [n + "." for n, m in model.named_modules() if n and type(m).__name__ in _TOKEN_ATTENTION_NAMES]
    tables = [f"{n}.cpb_mlp." if n else "cpb_mlp." for n, m in model.named_modules()
              if type(m).__name__ in _TABLE_MLP_NAMES]
    # our ResNets vouch that every BatchNorm reads a conv's output and every activation a
    # BatchNorm's output or the residual sum, which nothing else reads
    norm_inputs = _inputs_made_by(model, nn.BatchNorm2d, nn.Conv2d, "pp_norms_read_temporaries")
    act_inputs = _inputs_made_by(model, _MASKABLE_TYPES, nn.BatchNorm2d, "pp_activations_read_temporaries")
    # and that a conv after an activation is all that reads it: the conv's input gradient is then
    # the activation's alone, which its backward may write over (layout.grant_gradient)
    conv_inputs = _inputs_made_by(model, nn.Conv2d, _MASKABLE_TYPES, "pp_convs_read_temporaries")
    # and a max pool after an activation (the ImageNet stem's): its fresh input gradient is the activation's alone
    pool_inputs = _inputs_made_by(model, nn.MaxPool2d, _MASKABLE_TYPES, "pp_pools_read_temporaries")
    # plain Sequentials vouch for the same pairs where one element's last layer feeds the next's first
    handed_by: dict[str, tuple[nn.Module]] = {}  # reader -> (the Sequential that hands it its input,)
    pairs = sequential_pairs(model)
    for found, layer, maker in ((norm_inputs, nn.BatchNorm2d, nn.Conv2d), (act_inputs, _MASKABLE_TYPES, nn.BatchNorm2d),
                                (conv_inputs, nn.Conv2d, _MASKABLE_TYPES + SMOOTH),
                                (pool_inputs, nn.MaxPool2d, _MASKABLE_TYPES)):
        for name, (declarer, reader, watched) in pairs.items():
            if name not in found and isinstance(reader, layer) and isinstance(watched[0], maker):
                found[name] = watched  # the maker, and the modules between whose hooks could keep its output
                handed_by[name] = (model.get_submodule(declarer),)
    vouching = {id(s[0]) for s in handed_by.values()}
    for name, m in model.named_modules():
        if shrinks and not policy.checkpoint and (forward := adoption(m)):  # torchvision's ResNets, run as ours
            swaps.append(_Swap(name, m, _variant(type(m), forward, "Adopted"), {}))
        if shrinks and not policy.checkpoint and id(m) in vouching:
            swaps.append(_Swap(name, m, _variant(type(m), VouchedSequential, "Vouched"),
                               {"pp_elements": tuple(m._modules.values())}))
        if name and not in_scope(name, policy, stem):
            continue
        leaf = len(list(m.children())) == 0

        def swap(cls, name=name, m=m, **attrs):
            if name in handed_by:
                attrs["pp_handed_by"] = handed_by[name]
            swaps.append(_Swap(name, m, cls, attrs))

        if policy.checkpoint:
            if hasattr(m, "checkpointed"):
                swap(type(m), checkpointed=True)
            elif _is_checkpoint_block(m):
                swap(_variant(type(m), Checkpointed, "Checkpointed"))
            continue
        if is_squeeze_excitation(m) and policy.compresses_conv_input:
            swap(_variant(type(m), _CodedSqueezeExcite, "Coded"), pp_bits=code_bits)
        elif is_layer_scale_block(m) and policy.compresses_conv_input:
            swap(_variant(type(m), _CodedLayerScale, "Coded"), pp_bits=code_bits)
        if not leaf:
            continue
        if isinstance(m, nn.Conv2d) and _inherits_forward(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                problems.append(f"{name} (Conv2d with padding={m.padding!r}, mode {m.padding_mode})")
            elif any(name.startswith(e) for e in excites):
                if policy.bits is not None:
                    swap(CompressedConv2d, pp_form=ConvInputForm(bits=policy.bits), pp_name=name)
            elif policy.compresses_conv_input:
                swap(CompressedConv2d, pp_form=form, pp_name=name, pp_input_from=conv_inputs.get(name, ()))
        elif isinstance(m, nn.Linear) and _inherits_forward(m, nn.Linear):
            if policy.compresses_conv_input and not any(name.startswith(t) for t in tables):
                swap(CompressedLinear, pp_form=form, pp_name=name,
                     pp_tokens=any(name.startswith(a) for a in attentions))
        elif isinstance(m, nn.BatchNorm2d) and _inherits_forward(m, nn.modules.batchnorm._BatchNorm):
            if policy.bn != "full":
                swap(LowPrecisionBatchNorm2d, pp_store=policy.bn, pp_inplace=name in norm_inputs,
                     pp_input_from=norm_inputs.get(name, ()))
        elif (isinstance(m, nn.GroupNorm) and _inherits_forward(m, nn.GroupNorm)) or (isinstance(m, nn.LayerNorm) and (
                _inherits_forward(m, nn.LayerNorm) or type(m).__name__ == "LayerNorm2d")):
            if policy.bn != "full":  # torchvision's LayerNorm2d normalises (N, C, H, W) over C
                swap(_variant(type(m), _LowPrecisionNorm, "LowPrecision"), pp_store=policy.bn,
                     pp_channels_first=type(m).__name__ == "LayerNorm2d")
        elif type(m) in _MASKABLE_TYPES:
            if policy.relu_mask:
                swap(MaskReLU if type(m) is nn.ReLU else _variant(type(m), _Masked, "Masked"),
                     pp_inplace=name in act_inputs, pp_input_from=act_inputs.get(name, ()))
        elif isinstance(m, SMOOTH) and type(m) in SMOOTH:
            if policy.relu_mask:
                swap(_variant(type(m), _Coded, "Coded"), pp_bits=code_bits)
        elif is_global_pool(m):
            if shrinks:
                swap(ShapeOnlyGlobalPool)
        elif type(m) is nn.MaxPool2d:
            if policy.relu_mask:  # the ReLU before it no longer keeps the input the pool would
                swap(IndicesMaxPool2d, pp_input_from=pool_inputs.get(name, ()))
        elif (isinstance(m, _PASS_THROUGH) or type(m).__name__ in _PASS_THROUGH_NAMES
              or is_plain_sequential(m) or getattr(m, "pp_keeps_nothing", False)):
            pass  # (a plain Sequential here is empty: the identity, ShuffleNet's stride-1 branch1)
        else:
            problems.append(f"{name} ({type(m).__name__})")
            exact.append(name)
    return swaps, problems, exact


def compress_model(model: nn.Module, policy: CompressionPolicy | str, unsupported: str = "error") -> nn.Module:
    """Swap layers in place to keep what `policy` says for backward; returns `model`.

    Parameters, buffers and state_dict keys are untouched. A module the converter does not
    know raises one PolicyError naming every such module by name and type, and the model is
    left as it was; with unsupported="exact" those modules are left exact instead, named in
    `model.pp_uncompressed`, and the meter reports their bytes as "left exact".
    """
    if unsupported not in ("error", "exact"):
        raise ValueError(f"unsupported={unsupported!r}: use 'error' or 'exact'")
    policy = CompressionPolicy.parse(policy)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    missing = sorted(s for s in policy.stages() or () if not any(n.startswith(f"layer{s}.") for n in convs))
    if missing:
        have = sorted({int(n[5:].split(".")[0]) for n in convs if n.startswith("layer") and n[5:6].isdigit()})
        raise PolicyError(f"{policy} names stage {', '.join(map(str, missing))}, but this model's stages are "
                          f"{', '.join(map(str, have)) or 'none'}")
    before = model_policy(model)
    decompress_model(model)
    swaps, problems, exact = _plan(model, policy)
    if policy == CompressionPolicy():
        problems, exact = [], []  # nothing to compress: nothing to refuse
    if problems and unsupported == "error":
        if before != CompressionPolicy():
            compress_model(model, before, unsupported="exact")  # as it came
        raise PolicyError(f"compress_model cannot handle {len(problems)} module{'s' if len(problems) > 1 else ''}: "
                          + "; ".join(problems) + " (compress_model(..., unsupported='exact') leaves them exact)")
    if policy.checkpoint and not any(s.attrs.get("checkpointed") or s.cls.__name__.startswith("Checkpointed")
                                     for s in swaps):
        if before != CompressionPolicy():
            compress_model(model, before, unsupported="exact")
        raise PolicyError("ckpt recomputes a model's blocks, and this model has none PoolProp knows "
                          f"({', '.join(sorted(_BLOCK_NAMES))})")
    try:
        for s in swaps:
            if s.cls is not type(s.module):
                _swap(s.module, s.cls)
            for k, v in s.attrs.items():
                setattr(s.module, k, ModuleRefs(v) if k in _MODULE_REFS else v)
    except Exception:
        decompress_model(model)
        raise
    model.pp_policy = policy
    model.pp_uncompressed = exact if problems else []
    return model


def _swap(module: nn.Module, cls: type) -> None:
    if not hasattr(module, _ORIGINAL):
        setattr(module, _ORIGINAL, type(module))
    module.__class__ = cls


def decompress_model(model: nn.Module) -> nn.Module:
    """Undo `compress_model`: every swapped module gets its original class back."""
    for m in model.modules():
        original = m.__dict__.pop(_ORIGINAL, None)
        if original is None and "_pp_made_from" in type(m).__dict__:  # made from a variant (a slice of a Sequential)
            original = type(m)._pp_made_from[0]
        if original is not None:
            m.__class__ = original
        for attr in _ATTRS:
            m.__dict__.pop(attr, None)
    model.__dict__.pop("pp_policy", None)
    model.__dict__.pop("pp_uncompressed", None)
    return model


def model_policy(model: nn.Module) -> CompressionPolicy:
    return getattr(model, "pp_policy", CompressionPolicy())


def set_policy(model: nn.Module, policy: CompressionPolicy | str) -> nn.Module:
    """Give `model` exactly `policy`: compressed as it says, or plain for "none"."""
    policy = CompressionPolicy.parse(policy)
    return decompress_model(model) if policy == CompressionPolicy() else compress_model(model, policy)


class compressed:
    """`with compressed(model, policy): ...` -- compressed as `policy` says inside, and back to
    whatever it was (plain or another policy) afterwards."""

    def __init__(self, model: nn.Module, policy):
        self.model, self.policy = model, CompressionPolicy.parse(policy)

    def __enter__(self):
        self._before = model_policy(self.model)
        return compress_model(self.model, self.policy)

    def __exit__(self, *exc):
        set_policy(self.model, self._before)
        return False
