"""The memory ladder: what each step of each policy keeps for backward, per layer and per kind,
and what the steps cost in time (docs/fidelity_and_memory.md)."""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..method import CompressionPolicy, PolicyError, compress_model, model_policy, set_policy
from ..method.meter import KINDS, saved_activation_bytes
from ..method.snapshot import preserved
from .synthetic import model_label, placed, random_batch, training_step

# The policy the app calls "best". avg4+mask+bn8 cuts the most by the meter (-82% of saved
# activations on resnet18 at 32x32) but pools by 4 (cosine ~0.6-0.8 at init); avg2+mask+bn8
# still cuts ~71% with the gentler K=2 (cosine ~0.85 on features10 at init, ~0.74 projection).
# The gentler one is the default until training results say K=4 trains as well.
BEST_POLICY = "avg2+mask+bn8"
STRONGEST_POLICY = "avg4+mask+bn8"
LADDER_POLICIES = ("none", "avg2", "mask", "avg2+mask", BEST_POLICY, "ckpt")
# The families side by side, each as the steps that build it up (README, "Compression families").
FAMILIES = {
    "pooling": ("avg2+mask", "avg2+mask+bn8", "avg4+mask+bn8"),
    "quantisation": ("q8+mask", "q4+mask", "q4+mask+bn4", "q2+mask+bn2"),
    "pooled + residual": ("avg2+res4+mask", "avg2+res2+mask", "avg2+res2+mask+bn4"),
    "checkpointing": ("ckpt",),
}
FAMILY_POLICIES = ("none", *(p for steps in FAMILIES.values() for p in steps))
OUTSIDE = "(outside modules)"  # meter's name for tensors saved outside any leaf module (the loss)


def _leaf_order(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if len(list(m.children())) == 0]


@dataclass
class LadderStep:
    """One policy of the ladder: saved-activation bytes, in total, per kind and per layer."""

    policy: str
    total_bytes: int
    by_kind: dict[str, int]
    by_layer: dict[str, int]
    by_layer_kind: dict[str, dict[str, int]]
    cut: float | None = None  # 1 - total / total(none): 0.3 = 30% less, negative = costs more
    step_seconds: float | None = None  # median training-step time (when timed)
    time_ratio: float | None = None  # step time / step time of "none"

    @property
    def family(self) -> str:
        return CompressionPolicy.parse(self.policy).family

    def to_dict(self) -> dict:
        return {**self.__dict__, "family": self.family}


@dataclass
class MemoryLadder:
    """Saved activations of one model and batch under a list of policies (the memory ladder)."""

    model: str
    batch: int
    size: int
    steps: list[LadderStep]
    layers: list[str]  # leaf modules in model order (+ OUTSIDE when the loss saved something)
    skipped: dict[str, str] = field(default_factory=dict)
    timing: dict = field(default_factory=dict)  # repeats, device, how the ratio was taken
    measure: str = "saved activations (bytes kept for backward by one training-mode forward)"

    @property
    def policies(self) -> list[str]:
        return [s.policy for s in self.steps]

    def step(self, policy: str) -> LadderStep:
        for s in self.steps:
            if s.policy == policy:
                return s
        raise KeyError(f"{policy!r} is not in this ladder ({', '.join(self.policies)})")

    def kinds(self) -> list[str]:
        """The kinds that occur, in KINDS order."""
        return [k for k in KINDS if any(s.by_kind.get(k) for s in self.steps)]

    def to_rows(self) -> list[dict]:
        """One row per (policy, layer, kind) with bytes: ready for CSV."""
        rows = []
        for s in self.steps:
            for layer in self.layers:
                for kind, n in s.by_layer_kind.get(layer, {}).items():
                    rows.append({"model": self.model, "batch": self.batch, "policy": s.policy, "layer": layer,
                                 "kind": kind, "bytes": n})
        return rows

    def summary_rows(self) -> list[dict]:
        """One row per policy: total, cut, time ratio and bytes per kind."""
        return [{"policy": s.policy, "total_bytes": s.total_bytes, "cut": s.cut, "time_ratio": s.time_ratio,
                 **{k: s.by_kind.get(k, 0) for k in self.kinds()}} for s in self.steps]

    def to_dict(self) -> dict:
        return {"model": self.model, "batch": self.batch, "size": self.size, "measure": self.measure,
                "steps": [s.to_dict() for s in self.steps], "layers": self.layers, "skipped": self.skipped,
                "timing": self.timing}


def _time_policies(model, policies, x, y, repeats: int) -> dict[str, float]:
    """Median wall time of one training step (forward, loss, backward) per policy.

    Interleaved (none, p1, p2, ..., none, p1, ...) so that a machine getting busier or
    quieter shifts every policy alike; one untimed warm-up step each. `.grad` and BN buffers
    are restored afterwards.
    """
    cuda = x.device.type == "cuda"
    times: dict[str, list[float]] = {p: [] for p in policies}
    with preserved(model, mode=False, policy=False):
        for r in range(repeats + 1):
            for p in policies:
                compress_model(model, p)
                step = functools.partial(training_step, model, x, y, None)
                if cuda:
                    torch.cuda.synchronize(x.device)
                t = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize(x.device)
                if r > 0:
                    times[p].append(time.perf_counter() - t)
    return {p: statistics.median(v) for p, v in times.items()}


def memory_ladder(model_name, batch: int, size: int = 32, policies=LADDER_POLICIES, stem: str = "cifar",
                  num_classes: int = 10, time_steps: bool = True, time_repeats: int = 3, device="cpu",
                  time_batch: int | None = None) -> MemoryLadder:
    """Saved bytes per layer and per kind for each policy, the cut vs "none", and optionally the
    measured training-step time ratio vs "none" (median of `time_repeats` interleaved steps,
    at `time_batch` images, default `batch`).

    `model_name` is a name for `models.build_model` (or a module, used as is and left as it
    came). Policies that do not fit the model (K larger than a feature map) are skipped with
    the reason. "none" is always measured (first) since every cut is relative to it.
    """
    policies = [str(p) for p in policies]
    if "none" not in policies:
        policies = ["none", *policies]
    model, device = placed(model_name, num_classes, stem, device)
    before = model_policy(model)
    x, y = random_batch(batch, size, num_classes, device)
    order = _leaf_order(model)
    steps, skipped = [], {}
    try:
        for p in policies:
            try:
                compress_model(model, p)
                rep = saved_activation_bytes(model, x, y)
            except PolicyError as e:
                skipped[p] = str(e)
                continue
            steps.append(LadderStep(policy=str(model_policy(model)),
                                    total_bytes=rep.total_bytes, by_kind=rep.by_kind,
                                    by_layer=rep.by_layer, by_layer_kind=rep.by_layer_kind))
        base = next(s.total_bytes for s in steps if s.policy == "none")
        for s in steps:
            s.cut = 1.0 - s.total_bytes / base if base else None
        timing = {}
        if time_steps:
            tb = time_batch or batch
            xt, yt = (x, y) if tb == batch else random_batch(tb, size, num_classes, device)
            med = _time_policies(model, [s.policy for s in steps], xt, yt, max(1, time_repeats))
            for s in steps:
                s.step_seconds = med[s.policy]
                s.time_ratio = med[s.policy] / med["none"] if med["none"] > 0 else None
            timing = {"repeats": max(1, time_repeats), "batch": tb, "device": str(torch.device(device)),
                      "method": "median of interleaved training steps (forward+loss+backward), 1 warm-up each"}
    finally:
        set_policy(model, before)
    seen = {layer for s in steps for layer in s.by_layer}
    layers = [n for n in order if n in seen] + sorted(seen - set(order))
    return MemoryLadder(model=model_label(model_name), batch=batch, size=size, steps=steps, layers=layers,
                        skipped=skipped, timing=timing)
