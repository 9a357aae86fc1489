"""What a compression policy is: its parts, its string form, and which modules it covers.

The forward pass is always exact. A policy says what each layer *keeps* for backward:
  conv   -> its input pooled by K (avgK, maxK; the paper's method), as B-bit codes (qB), or
            pooled plus a B-bit residual (avgK+resB); the input gradient stays exact;
  ReLU   -> a bit-packed sign mask (exact, 1/32 of fp32) instead of its output (mask);
  BN     -> its input in bfloat16 / float8 (bn16, bn8) or as 4/2-bit codes (bn4, bn2);
  ckpt   -> whole residual blocks recomputed in backward (exact; the reference to beat).
`str(policy)` is the canonical short form and parses back to the same policy.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from .quantize import BITS

POOLS = ("avg", "max")
KS = (1, 2, 4, 8)
MODES = ("upsample", "lowres")
# BatchNorm keeps its normalised input: full, as bfloat16 or float8 (deterministic casts), or as
# 4/2-bit per-group codes with stochastic rounding (unbiased; method/quantize.py).
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
    def parse(cls, text: str | CompressionPolicy) -> CompressionPolicy:
        """The policy a string names (a policy is returned as it is: parsing happens once, at
        the edge where text comes in)."""
        if isinstance(text, CompressionPolicy):
            return text
        return cls._from_text(text)

    @classmethod
    def _from_text(cls, text: str) -> CompressionPolicy:
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
    def family(self) -> str:
        """Which way of saving it belongs to, for grouping: the baseline, pooling (the paper),
        quantisation (ActNN), pooled + residual (DIVISION), checkpointing, or mask/BatchNorm
        savers alone."""
        if self.checkpoint:
            return "checkpointing"
        if self.residual_bits is not None:
            return "pooled + residual"
        if self.bits is not None:
            return "quantisation"
        if self.pool is not None:
            return "pooling"
        return "baseline" if self == CompressionPolicy() else "mask / BatchNorm only"

    @property
    def quantises(self) -> bool:
        """Whether any part keeps B-bit codes (qB, resB, bn4, bn2)."""
        return self.bits is not None or self.residual_bits is not None or isinstance(BN_STORAGE[self.bn], int)

    @property
    def compresses_conv_input(self) -> bool:
        """Whether convs keep something other than their full input."""
        return self.pool is not None or self.bits is not None

    def stages(self) -> set[int] | None:
        m = _STAGES_RE.match(self.scope)
        return {int(s) for s in m[1].split(",")} if m else None

def in_scope(name: str, policy: CompressionPolicy, stem_conv: str | None) -> bool:
    """Whether `policy` compresses the module called `name` (the model's first conv is `stem_conv`)."""
    stages = policy.stages()
    if stages is not None:
        return any(name.startswith(f"layer{s}.") for s in stages)
    if policy.scope == "nostem":
        return name != stem_conv
    return True

