"""The learning rate as a function of training progress (per step; its state is JSON scalars)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class LRSchedule:
    """LR as a function of training progress p in [0, 1].

    onecycle: cosine up from lr/25 to lr over the warmup, cosine down to lr/1e4 (as OneCycleLR).
    cosine:   linear warmup from 0 to lr, then cosine down to 0.
    Progress is step / total_steps, or with a time budget max(that, elapsed / budget): the
    schedule then completes on time on a slower machine too.
    """

    kind: str
    base_lr: float
    total_steps: int
    warmup: float

    def lr_at(self, progress: float) -> float:
        p = min(max(progress, 0.0), 1.0)
        w = self.warmup
        if self.kind == "onecycle":
            lo, hi, end = self.base_lr / 25, self.base_lr, self.base_lr / 1e4
            if w > 0 and p < w:
                return hi + (lo - hi) * (1 + math.cos(math.pi * p / w)) / 2
            q = (p - w) / (1 - w) if w < 1 else 1.0
            return end + (hi - end) * (1 + math.cos(math.pi * q)) / 2
        if w > 0 and p < w:
            return self.base_lr * p / w
        q = (p - w) / (1 - w) if w < 1 else 1.0
        return self.base_lr * (1 + math.cos(math.pi * q)) / 2

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)
