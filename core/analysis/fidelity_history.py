"""The fidelity records a run wrote while training, as step x layer tables."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class FidelityHistory:
    """Fidelity records of a run as step x layer tables (None where a record lacks a layer)."""

    steps: list[int]
    epochs: list[int | None]
    layers: list[str]
    cosine: dict[str, list[float | None]]  # layer -> per step
    rel_error: dict[str, list[float | None]]

    def mean(self, metric: str = "cosine") -> list[float | None]:
        table = getattr(self, metric)
        out = []
        for i in range(len(self.steps)):
            vals = [table[n][i] for n in self.layers if table[n][i] is not None]
            out.append(sum(vals) / len(vals) if vals else None)
        return out

    def to_rows(self) -> list[dict]:
        return [{"step": s, "epoch": e, "layer": n, "cosine": self.cosine[n][i], "rel_error": self.rel_error[n][i]}
                for i, (s, e) in enumerate(zip(self.steps, self.epochs)) for n in self.layers]

    def to_dict(self) -> dict:
        return {"steps": self.steps, "epochs": self.epochs, "layers": self.layers,
                "cosine": self.cosine, "rel_error": self.rel_error}

    def __len__(self) -> int:
        return len(self.steps)


def fidelity_over_training(metrics_records: Iterable[dict]) -> FidelityHistory:
    """Read the `{"type": "fidelity", "step", "epoch", "layers": [{"name", "cosine", "rel_error"}]}`
    records of a metrics.jsonl (other record types and malformed entries are ignored), in step order."""
    records = []
    for r in metrics_records:
        if not isinstance(r, dict) or r.get("type") != "fidelity" or not isinstance(r.get("layers"), list):
            continue
        try:
            step = int(r["step"])
        except (KeyError, TypeError, ValueError):
            continue
        records.append((step, r))
    records.sort(key=lambda t: t[0])
    layers: list[str] = []
    for _, r in records:
        for d in r["layers"]:
            if isinstance(d, dict) and "name" in d and d["name"] not in layers:
                layers.append(d["name"])
    cosine = {n: [] for n in layers}
    rel = {n: [] for n in layers}
    steps, epochs = [], []
    for step, r in records:
        steps.append(step)
        epochs.append(r.get("epoch"))
        by_name = {d["name"]: d for d in r["layers"] if isinstance(d, dict) and "name" in d}
        for n in layers:
            d = by_name.get(n, {})
            cosine[n].append(_num(d.get("cosine")))
            rel[n].append(_num(d.get("rel_error")))
    return FidelityHistory(steps=steps, epochs=epochs, layers=layers, cosine=cosine, rel_error=rel)


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
