"""Backpropagation with compressed activations (README.md, Compression policies).

The forward pass is always exact. What changes is what each layer *keeps* for backward:
  conv   -> its input pooled by K (avg or max); the weight gradient is estimated from it,
            the input gradient stays exact (it needs the weight only);
  ReLU   -> a bit-packed sign mask (exact, 1/32 of fp32) instead of its output;
  BN     -> its normalised input in bfloat16 (`bn16`) or float8 (`bn8`) instead of fp32;
  ckpt   -> whole residual blocks recomputed in backward (exact; the reference to beat).

`compress_model` swaps module classes in place (weights and state_dict keys untouched), so
one checkpoint loads into both forms and `decompress_model` gives the plain model back.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .quantization import BITS, dequantize, quantize

POOLS = ("avg", "max")
KS = (1, 2, 4, 8)
MODES = ("upsample", "lowres")
# BatchNorm keeps its normalised input: full, as bfloat16 or float8 (deterministic casts), or as
# 4/2-bit per-group codes with stochastic rounding (unbiased; core.quantization).
BN_STORAGE = {"full": None, "bn16": torch.bfloat16, "bn8": torch.float8_e4m3fn, "bn4": 4, "bn2": 2}

_CONV_RE = re.compile(r"^(avg|max)(\d+)(-lowres)?$")
_QUANT_RE = re.compile(r"^(q|res)(\d+)$")
_STAGES_RE = re.compile(r"^stages=(\d+(?:,\d+)*)$")
POLICY_GRAMMAR = (
    "parts joined by '+': none | avgK | maxK (K in 1,2,4,8) with optional -lowres | qB (the conv input in B bits, "
    "B in 1,2,4,8) | resB (with avgK: the pooled copy plus the residual in B bits) | mask | bn16 | bn8 | bn4 | bn2 | "
    "ckpt | nostem | stages=1,2 ; e.g. 'avg2+mask', 'q4+mask+bn8', 'avg2+res2+mask+bn8'"
)


class PolicyError(ValueError):
    """A policy string or setting that cannot be used."""


@dataclass(frozen=True)
class CompressionPolicy:
    """What each layer keeps for backward. `str(policy)` is the canonical short form."""

    pool: str | None = None  # None (conv keeps its full input), "avg" or "max"
    k: int = 1
    mode: str = "upsample"  # weight gradient from the upsampled copy, or at low resolution
    relu_mask: bool = False
    bn: str = "full"  # "full", "bn16", "bn8", "bn4" or "bn2"
    checkpoint: bool = False
    scope: str = "all"  # "all", "nostem", or "stages=1,2"
    bits: int | None = None  # qB: the conv keeps its input as B-bit codes
    residual_bits: int | None = None  # resB (with avgK): pooled copy + residual x - up(pool(x)) in B bits

    def __post_init__(self):
        if self.pool is not None and self.pool not in POOLS:
            raise PolicyError(f"unknown pooling {self.pool!r}; use avg or max")
        if self.k not in KS:
            raise PolicyError(f"K={self.k} is not supported; use one of {KS}")
        if self.mode not in MODES:
            raise PolicyError(f"unknown weight-gradient mode {self.mode!r}; use {' or '.join(MODES)}")
        if self.bn not in BN_STORAGE:
            raise PolicyError(f"unknown BatchNorm storage {self.bn!r}; use {', '.join(BN_STORAGE)}")
        if self.scope not in ("all", "nostem") and not _STAGES_RE.match(self.scope):
            raise PolicyError(f"unknown scope {self.scope!r}; use all, nostem or stages=1,2")
        for name, b in (("q", self.bits), ("res", self.residual_bits)):
            if b is not None and b not in BITS:
                raise PolicyError(f"{name}{b}: {b} bits are not supported; use one of {', '.join(map(str, BITS))}")
        if self.bits is not None and self.pool is not None:
            raise PolicyError(f"q{self.bits} and {self.pool}{self.k} are two forms of the conv input; choose one "
                              f"(or keep the pooled copy plus a low-bit residual: avgK+resB)")
        if self.residual_bits is not None:
            if self.pool != "avg" or self.k == 1:
                raise PolicyError(f"res{self.residual_bits} is the residual of an average-pooled copy; it needs "
                                  "avgK with K >= 2 (e.g. avg2+res2)")
            if self.mode == "lowres":
                raise PolicyError(f"res{self.residual_bits} rebuilds the full-size input; it does not combine "
                                  "with -lowres")

    # -- string form -------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> CompressionPolicy:
        if isinstance(text, CompressionPolicy):
            return text
        parts = [p.strip() for p in str(text).strip().lower().split("+")]
        if parts == ["none"]:
            return cls()
        kw: dict = {}
        for part in parts:
            m = _CONV_RE.match(part)
            q = _QUANT_RE.match(part)
            key = None
            if m:
                key, val = "pool", dict(pool=m[1], k=int(m[2]), mode="lowres" if m[3] else "upsample")
            elif q:
                key, val = ("bits", dict(bits=int(q[2]))) if q[1] == "q" else (
                    "residual", dict(residual_bits=int(q[2])))
            elif part == "mask":
                key, val = "relu_mask", dict(relu_mask=True)
            elif part in BN_STORAGE and part != "full":
                key, val = "bn", dict(bn=part)
            elif part == "ckpt":
                key, val = "checkpoint", dict(checkpoint=True)
            elif part == "nostem" or _STAGES_RE.match(part):
                key, val = "scope", dict(scope=part)
            if key is None:
                raise PolicyError(f"unknown policy part {part!r} in {text!r}; {POLICY_GRAMMAR}")
            if key in kw:
                raise PolicyError(f"policy {text!r} sets {key} twice")
            kw[key] = val
        merged = {k: v for val in kw.values() for k, v in val.items()}
        try:
            policy = cls(**merged)
        except PolicyError as e:
            raise PolicyError(f"policy {text!r}: {e}") from None
        if policy.checkpoint and (policy.pool or policy.bits or policy.relu_mask or policy.bn != "full"):
            raise PolicyError("ckpt recomputes whole blocks; it does not combine with pooling, quantisation, "
                              "mask or bn parts")
        return policy

    def __str__(self) -> str:
        parts = []
        if self.pool:
            parts.append(f"{self.pool}{self.k}" + ("-lowres" if self.mode == "lowres" else ""))
        if self.residual_bits is not None:
            parts.append(f"res{self.residual_bits}")
        if self.bits is not None:
            parts.append(f"q{self.bits}")
        if self.relu_mask:
            parts.append("mask")
        if self.bn != "full":
            parts.append(self.bn)
        if self.checkpoint:
            parts.append("ckpt")
        if not parts:
            return "none"
        if self.scope != "all":
            parts.append(self.scope)
        return "+".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "name": str(self)}

    @classmethod
    def from_dict(cls, d: dict) -> CompressionPolicy:
        return cls(**{k: v for k, v in d.items() if k != "name"})

    @property
    def is_exact(self) -> bool:
        """True when every gradient equals plain autograd (up to summation order)."""
        return (self.pool is None or self.k == 1) and self.bn == "full" and self.bits is None

    @property
    def quantises(self) -> bool:
        """Whether any part keeps B-bit codes (qB, resB, bn4, bn2)."""
        return self.bits is not None or self.residual_bits is not None or isinstance(BN_STORAGE[self.bn], int)

    @property
    def compresses_conv_input(self) -> bool:
        """Whether convs keep something other than their full input."""
        return self.pool is not None or self.bits is not None

    def conv_form(self) -> ConvInputForm:
        return ConvInputForm(pool=self.pool, k=self.k, mode=self.mode, bits=self.bits,
                             residual_bits=self.residual_bits)

    def stages(self) -> set[int] | None:
        m = _STAGES_RE.match(self.scope)
        return {int(s) for s in m[1].split(",")} if m else None


# ---------------------------------------------------------------------------------------
# Pooled convolution
# ---------------------------------------------------------------------------------------

def _pool(x: torch.Tensor, pool: str, k: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, ceil(H/k), ceil(W/k)); partial edge blocks pool what they hold."""
    if pool == "avg":
        return F.avg_pool2d(x, k, k, ceil_mode=True, count_include_pad=False)
    return F.max_pool2d(x, k, k, ceil_mode=True)


def _upsample(xp: torch.Tensor, k: int, size: tuple[int, int]) -> torch.Tensor:
    """Piecewise-constant reconstruction of the pooled copy, cropped to the original size."""
    x = F.interpolate(xp, scale_factor=k, mode="nearest")  # one kernel, keeps channels_last
    return x[:, :, : size[0], : size[1]]


def _lowres_taps(k: int, stride: int, offsets: list[int]):
    """For each tap offset t, how the k output positions of a block split over input blocks.

    Output p = kP + r (r < k) reads input u = stride*p + t, whose block is
    stride*P + floor((stride*r + t) / k). A[t, d] counts the r landing on block offset d,
    so for block-constant input and output gradient: dW[t] = sum_d A[t, d] * C[d] with
    C[d] = sum_P G[P] X[stride*P + d] -- exact, for every tap, not just the centre one.
    """
    deltas = sorted({(stride * r + t) // k for t in offsets for r in range(k)})
    a = torch.zeros(len(offsets), len(deltas))
    for i, t in enumerate(offsets):
        for r in range(k):
            a[i, deltas.index((stride * r + t) // k)] += 1
    return a, deltas[0], deltas[-1]


def _lowres_weight_grad(xp, g, weight_shape, stride, padding, dilation, groups, k):
    gp = F.avg_pool2d(g, k, k, ceil_mode=True, count_include_pad=False)  # (B, O, Hg, Wg)
    dims = []
    for axis in range(2):
        offsets = [i * dilation[axis] - padding[axis] for i in range(weight_shape[2 + axis])]
        dims.append(_lowres_taps(k, stride[axis], offsets))
    (ay, lo_y, hi_y), (ax, lo_x, hi_x) = dims
    # Pad (or crop) X so that a dense correlation over [lo, hi] at `stride` has Gp's size.
    hg, wg = gp.shape[2:]
    need_h = stride[0] * (hg - 1) + (hi_y - lo_y) + 1
    need_w = stride[1] * (wg - 1) + (hi_x - lo_x) + 1
    xpad = F.pad(xp, (-lo_x, need_w - xp.shape[3] + lo_x, -lo_y, need_h - xp.shape[2] + lo_y))
    kernel = (weight_shape[0], weight_shape[1], hi_y - lo_y + 1, hi_x - lo_x + 1)
    c = torch.ops.aten.convolution_backward(
        gp, xpad, gp.new_empty(kernel), None, list(stride), [0, 0], [1, 1], False, [0, 0], groups,
        [False, True, False])[1]  # (O, C/g, dy, dx)
    ay, ax = ay.to(c), ax.to(c)
    return torch.einsum("iy,jx,ocyx->ocij", ay, ax, c)


@dataclass(frozen=True)
class ConvInputForm:
    """What a compressed conv keeps of its input x (B, C, H, W) and how backward rebuilds it.

    pooled   P_k(x); rebuilt by nearest upsampling (or used as is at low resolution);
    qB       x as B-bit codes per (sample, channel), stochastic rounding: unbiased;
    avgK+resB  P_k(x) and the residual x - up(P_k(x)) as B-bit codes: the low frequencies
             exactly, the high ones coarsely (DIVISION); unbiased as well.
    """

    pool: str | None = None
    k: int = 1
    mode: str = "upsample"
    bits: int | None = None
    residual_bits: int | None = None

    @property
    def pools(self) -> bool:
        return self.pool is not None and self.k > 1

    def keep(self, x: torch.Tensor) -> tuple[list[torch.Tensor], object]:
        """-> (tensors to save for backward, what else rebuilding needs)."""
        if self.bits is not None:
            packed, lo, scale, info = quantize(x, self.bits)
            return [packed, lo, scale], info
        if not self.pools:
            return [x], None
        xp = _pool(x, self.pool, self.k)  # (B, C, ceil(H/k), ceil(W/k))
        if self.residual_bits is None:
            return [xp], None
        packed, lo, scale, info = quantize(x - _upsample(xp, self.k, x.shape[2:]), self.residual_bits)
        return [xp, packed, lo, scale], info

    def rebuild(self, kept: list[torch.Tensor], info, shape: tuple[int, ...]) -> torch.Tensor:
        """The full-size input the weight gradient is computed from (B, C, H, W)."""
        if self.bits is not None:
            return dequantize(*kept, info)
        if not self.pools:
            return kept[0]
        x = _upsample(kept[0], self.k, shape[2:])
        if self.residual_bits is not None:
            x = x + dequantize(*kept[1:], info)
        return x


class CompressedConvFunction(torch.autograd.Function):
    """conv2d whose backward sees only what `form` keeps of its input."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, form: ConvInputForm):
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # cast like autocast would, then run plainly
            dt = torch.get_autocast_dtype(dev)
            ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
            x, weight = x.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        else:
            ctx.dtypes = None
        with torch.autocast(dev, enabled=False):
            y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        kept, info = form.keep(x)
        ctx.save_for_backward(*kept, weight)
        ctx.conf = (tuple(x.shape), stride, padding, dilation, groups, form, info, bias is not None)
        return y

    @staticmethod
    def backward(ctx, g):
        # Autocast must not re-type our ops (it runs interpolate in fp32): dtypes are set here.
        with torch.autocast(g.device.type, enabled=False):
            return CompressedConvFunction._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        *kept, weight = ctx.saved_tensors
        x_shape, stride, padding, dilation, groups, form, info, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = g.to(weight.dtype)
        if form.mode == "lowres" and form.pools:
            xp = kept[0]
            gx = None
            if need_x:  # exact: needs the weight and the input's shape only
                gx = torch.ops.aten.convolution_backward(
                    g, xp.new_empty(x_shape), weight, None, list(stride), list(padding), list(dilation),
                    False, [0, 0], groups, [True, False, False])[0]
            gw = _lowres_weight_grad(xp, g, weight.shape, stride, padding, dilation, groups, form.k) if need_w else None
            gb = g.sum((0, 2, 3)) if need_b and has_bias else None
        else:
            x_rec = form.rebuild(kept, info, x_shape).to(weight.dtype)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g, x_rec, weight, [weight.shape[0]] if has_bias else None, list(stride), list(padding),
                list(dilation), False, [0, 0], groups, [need_x, need_w, need_b and has_bias])
        if ctx.dtypes is not None:
            dx, dw, db = ctx.dtypes
            gx = None if gx is None else gx.to(dx)
            gw = None if gw is None else gw.to(dw)
            gb = None if gb is None else gb.to(db)
        return gx, gw, gb, None, None, None, None, None


class CompressedConv2d(nn.Conv2d):
    """A Conv2d (same parameters and state_dict) that keeps only `pp_form` of its input."""

    pp_form: ConvInputForm = ConvInputForm()

    def forward(self, x):
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        h, w = x.shape[-2:]
        if self.pp_form.pools and self.pp_form.k > min(h, w):
            raise PolicyError(
                f"K={self.pp_form.k} is larger than the {h}x{w} feature map entering "
                f"{getattr(self, 'pp_name', 'a conv')}; use a smaller K or restrict the policy to earlier stages "
                "(stages=1,2)")
        return CompressedConvFunction.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                            self.groups, self.pp_form)


# ---------------------------------------------------------------------------------------
# ReLU with a 1-bit mask
# ---------------------------------------------------------------------------------------

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _memory_order_flat(mask: torch.Tensor) -> torch.Tensor:
    """The elements in memory order (NCHW or NHWC for channels_last), as a 1-D view."""
    return mask.reshape(-1) if mask.is_contiguous() else mask.permute(0, 2, 3, 1).reshape(-1)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8, 8 elements a byte, little bit order (in the tensor's memory order)."""
    flat = _memory_order_flat(mask)
    if flat.device.type == "cpu":  # numpy's packbits is ~30x faster than the tensor ops below
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    return _pack_bits_torch(flat)


def _pack_bits_torch(flat: torch.Tensor) -> torch.Tensor:  # any device
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    return (flat.view(-1, 8).to(torch.uint8) * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def _unpack_bits_torch(packed: torch.Tensor, n: int) -> torch.Tensor:  # any device
    return (packed.unsqueeze(1) & _BITS.to(packed.device)).ne(0).view(-1)[:n]


def unpack_mask(packed: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    n = math.prod(shape)
    if packed.device.type == "cpu":
        bits = torch.from_numpy(np.unpackbits(packed.numpy(), count=n, bitorder="little").view(np.bool_))
    else:
        bits = _unpack_bits_torch(packed, n)
    if channels_last:
        b, c, h, w = shape
        return bits.view(b, h, w, c).permute(0, 3, 1, 2)
    return bits.view(shape)


class MaskReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        positive = y > 0
        cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.conf = (tuple(x.shape), cl)
        ctx.save_for_backward(pack_mask(positive))
        return y

    @staticmethod
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        shape, cl = ctx.conf
        mask = unpack_mask(packed, shape, cl)
        # The gradient in the input's layout: g may come in without one (the head's mean gives a
        # stride-0 gradient), and BatchNorm's backward below runs twice as long on NCHW (measured).
        return torch.mul(g, mask, out=torch.empty_like(mask, dtype=g.dtype))


class MaskReLU(nn.ReLU):
    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return MaskReLUFunction.apply(x)
        return torch.relu(x)


# ---------------------------------------------------------------------------------------
# BatchNorm keeping a low-precision normalised input
# ---------------------------------------------------------------------------------------

class LowPrecisionBNFunction(torch.autograd.Function):
    """Training-mode BN that keeps its input in `store` form for backward: x_hat =
    (x - mean) * invstd as a dtype (bfloat16, float8), or x itself as B-bit codes (an int).

    x_hat has unit variance per channel, which suits bf16/float8 far better than raw x. The
    codes need no such care: their range is per (sample, channel) already, and x_hat is affine
    in x per channel, so coding x itself stores the same information with two passes fewer.
    Exact: beta's gradient. Approximate (rounding): gamma's and the input gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, store):
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps)
        shape = (1, -1, 1, 1)
        info = None
        if isinstance(store, int):
            packed, lo, scale, info = quantize(x, store)
            kept = [packed, lo, scale]
        else:
            x_hat = (x - mean.view(shape).to(x.dtype)) * invstd.view(shape).to(x.dtype)
            if store == torch.float8_e4m3fn:  # float8 casts are not saturating: keep in range
                x_hat = x_hat.clamp(-448, 448)
            kept = [x_hat.to(store)]
        ctx.save_for_backward(*kept, weight, mean, invstd)
        ctx.conf = (x.dtype, eps, info)
        return out

    @staticmethod
    def backward(ctx, g):
        *kept, weight, mean, invstd = ctx.saved_tensors
        dtype, eps, info = ctx.conf
        shape = (1, -1, 1, 1)
        if info is not None:
            x_rec = dequantize(*kept, info)
        else:
            x_rec = (kept[0].to(torch.float32) / invstd.view(shape) + mean.view(shape)).to(dtype)
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, x_rec, weight, None, None, mean, invstd, True, eps, [need[0], need[1], need[2]])
        return gx, gw, gb, None, None, None, None, None


class LowPrecisionBatchNorm2d(nn.BatchNorm2d):
    pp_store: str = "bn16"

    def forward(self, x):
        if not (self.training and torch.is_grad_enabled() and x.requires_grad and self.track_running_stats):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        return LowPrecisionBNFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                            momentum, self.eps, BN_STORAGE[self.pp_store])


# ---------------------------------------------------------------------------------------
# Swapping layers
# ---------------------------------------------------------------------------------------

# Leaf modules that need no swap and keep nothing worth compressing.
_PASS_THROUGH = (nn.Linear, nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.Softmax)
_ORIGINAL = "_pp_original_class"


def in_scope(name: str, policy: CompressionPolicy, stem_conv: str | None) -> bool:
    """Whether `policy` compresses the module called `name` (the model's first conv is `stem_conv`)."""
    stages = policy.stages()
    if stages is not None:
        return any(name.startswith(f"layer{s}.") for s in stages)
    if policy.scope == "nostem":
        return name != stem_conv
    return True


def _swap(module: nn.Module, cls: type, **attrs) -> None:
    if not hasattr(module, _ORIGINAL):
        setattr(module, _ORIGINAL, type(module))
    module.__class__ = cls
    for k, v in attrs.items():
        setattr(module, k, v)


def compress_model(model: nn.Module, policy: CompressionPolicy | str) -> nn.Module:
    """Swap layers in place to keep what `policy` says for backward; returns `model`.

    Parameters, buffers and state_dict keys are untouched. Raises PolicyError naming every
    module it cannot handle rather than skipping it.
    """
    policy = CompressionPolicy.parse(policy)
    decompress_model(model)
    unsupported = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                unsupported.append(f"{name} (Conv2d with padding={m.padding!r}, mode {m.padding_mode})")
        elif isinstance(m, nn.ReLU):
            if m.inplace:
                unsupported.append(f"{name} (in-place ReLU)")
        elif isinstance(m, nn.BatchNorm2d) or isinstance(m, _PASS_THROUGH):
            pass
        elif len(list(m.children())) == 0 and type(m).__module__.startswith("torch.nn"):
            unsupported.append(f"{name} ({type(m).__name__})")
    if unsupported:
        raise PolicyError("compress_model cannot handle: " + "; ".join(unsupported))

    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    stem_conv = convs[0] if convs else None
    missing = sorted(s for s in policy.stages() or () if not any(n.startswith(f"layer{s}.") for n in convs))
    if missing:
        have = sorted({int(n[5:].split(".")[0]) for n in convs if n.startswith("layer") and n[5:6].isdigit()})
        raise PolicyError(f"{policy} names stage {', '.join(map(str, missing))}, but this model's stages are "
                          f"{', '.join(map(str, have)) or 'none'}")
    for name, m in model.named_modules():
        if not in_scope(name, policy, stem_conv):
            continue
        if isinstance(m, nn.Conv2d) and policy.compresses_conv_input and type(m) is nn.Conv2d:
            _swap(m, CompressedConv2d, pp_form=policy.conv_form(), pp_name=name)
        elif isinstance(m, nn.ReLU) and policy.relu_mask and type(m) is nn.ReLU:
            _swap(m, MaskReLU)
        elif isinstance(m, nn.BatchNorm2d) and policy.bn != "full" and type(m) is nn.BatchNorm2d:
            _swap(m, LowPrecisionBatchNorm2d, pp_store=policy.bn)
        elif policy.checkpoint and hasattr(m, "checkpointed"):
            m.checkpointed = True
    model.pp_policy = policy
    return model


def decompress_model(model: nn.Module) -> nn.Module:
    """Undo `compress_model`: every swapped module gets its original class back."""
    for m in model.modules():
        original = m.__dict__.pop(_ORIGINAL, None)
        if original is not None:
            m.__class__ = original
            for attr in ("pp_form", "pp_name", "pp_store"):
                m.__dict__.pop(attr, None)
        if "checkpointed" in m.__dict__:
            del m.checkpointed
    model.__dict__.pop("pp_policy", None)
    return model


def model_policy(model: nn.Module) -> CompressionPolicy:
    return getattr(model, "pp_policy", CompressionPolicy())


class compressed:
    """`with compressed(model, policy): ...` -- compressed inside, plain model afterwards."""

    def __init__(self, model: nn.Module, policy):
        self.model, self.policy = model, CompressionPolicy.parse(policy)

    def __enter__(self):
        self._before = model_policy(self.model)
        return compress_model(self.model, self.policy)

    def __exit__(self, *exc):
        if self._before == CompressionPolicy():
            decompress_model(self.model)
        else:
            compress_model(self.model, self._before)
        return False
