"""Runs as a class reads them: names that say setting · epochs · seed, runs that differ only by
seed grouped into one *setting* (drawn as the mean of its seeds with a min-max band), policy
families, and the filters of the run picker.

A setting is everything that makes a run but its seed and the machine it ran on: data, model,
policy, schedule and recipe. (The shipped 20-epoch baselines are two seeds of one setting, one
trained on an H200 in bf16, one on the CPU; figures that compare wall time name the devices.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..engine.runs import Run
from ..method import CompressionPolicy
from . import curves
from .reproduction import data_family, trained_on

# config fields that make a setting (beside the data); seed, device, threads, paths do not
RECIPE_KEYS = ("model", "policy", "epochs", "steps", "batch_size", "optimizer", "lr", "schedule", "warmup",
               "weight_decay", "label_smoothing", "train_subset", "val_subset", "time_budget", "stem", "augment")
FAMILY_ORDER = ("baseline", "pooling", "quantisation", "pooled + residual", "mask / BatchNorm only",
                "checkpointing", "other")


def _cfg(run: Run) -> dict:
    return run.config or {}


def data_name(cfg: Mapping) -> str:
    """'CIFAR-10', 'features10' or an image folder's path: the data a run learned, by family."""
    return data_family(str(cfg.get("dataset") or "?"), cfg.get("classes"))


def family(policy: str) -> str:
    """The policy's family (core.method.policy): baseline, pooling, quantisation, ..."""
    try:
        return CompressionPolicy.parse(str(policy)).family
    except ValueError:
        return "other"


def setting_key(cfg: Mapping) -> tuple:
    return (data_name(cfg), str(cfg.get("dataset")), *(str(cfg.get(k)) for k in RECIPE_KEYS))


def _setting_text(cfg: Mapping, models: int, usual_data: str | None) -> str:
    text = (f"{cfg.get('model')} " if models > 1 else "") + str(cfg.get("policy", "none"))
    if usual_data is not None and data_name(cfg) != usual_data:
        text += f" · {data_name(cfg)}"
    return text + (f" · {cfg['epochs']} ep" if cfg.get("epochs") else "")


def run_names(runs: Sequence[Run]) -> dict[str, str]:
    """Run folder -> 'policy · epochs · seed' ('avg2+mask · 20 ep · s1'). Runs of another data set
    than most runs' say theirs ('none · features10 · 4 ep · s0'), and the model comes first when
    there are several; runs still alike get their start time, then their folder. Computed over
    every run on disk, a run's name does not change with what else is selected; short, so that
    the picker's chips and the legends read on a projector."""
    runs = list({str(r.path): r for r in runs}.values())
    models = len({_cfg(r).get("model") for r in runs if r.config})
    datas = [data_name(_cfg(r)) for r in runs if r.config]
    usual = max(sorted(set(datas)), key=datas.count) if len(set(datas)) > 1 else None
    names = {}
    for r in runs:
        cfg = _cfg(r)
        names[str(r.path)] = (f"{_setting_text(cfg, models, usual)} · s{cfg.get('seed', 0)}"
                              if cfg.get("model") else r.name)
    for extra in ("time", "folder"):  # still alike: the start time, then the folder
        count = Counter(names.values())
        for r in runs:
            key = str(r.path)
            if count[names[key]] < 2:
                continue
            when = str(_cfg(r).get("created", ""))[11:19]
            if extra == "time" and when:
                names[key] += f" · {when}"
            elif extra == "folder":
                names[key] += f" ({r.path.parent.name}/{r.name})"
    return names


@dataclass
class Setting:
    """Runs that differ only by seed: `name` without the seed, `members` the runs' display names."""

    name: str
    members: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The setting's name with its seed count: 'none · 20 ep (2 seeds)'."""
        return self.name if len(self.members) == 1 else f"{self.name} ({len(self.members)} seeds)"

    @property
    def devices(self) -> list[str]:
        return sorted({trained_on(_cfg(r)) for r in self.runs})


def group_settings(runs: Sequence[Run], names: Mapping[str, str], apart: bool = False) -> list[Setting]:
    """The runs as settings, in first-seen order, each named as its first run less the seed
    ('none · 20 ep'). apart=True: every run its own setting (named with its seed), for the
    "seeds one by one" view."""
    groups: dict[tuple, Setting] = {}
    for r in runs:
        name = names[str(r.path)]
        key = ("run", str(r.path)) if apart or not r.config else setting_key(_cfg(r))
        s = groups.setdefault(key, Setting(name.replace(f" · s{_cfg(r).get('seed', 0)}", "", 1)))
        s.members.append(name)
        s.runs.append(r)
    out = list(groups.values())
    for s in out:  # a setting of one seed is named as its run
        if len(s.members) == 1:
            s.name = s.members[0]
    return out


def filter_options(runs: Sequence[Run]) -> dict[str, list]:
    """What the picker's filters offer: data sets, schedule lengths (epochs) and families present."""
    cfgs = [_cfg(r) for r in runs if r.config]
    fams = {family(c.get("policy", "none")) for c in cfgs}
    return {"data": sorted({data_name(c) for c in cfgs}),
            "epochs": sorted({int(c["epochs"]) for c in cfgs if isinstance(c.get("epochs"), int)}),
            "family": [f for f in FAMILY_ORDER if f in fams]}


def filter_runs(runs: Sequence[Run], data: str | None = None, epochs: int | None = None,
                families: Sequence[str] = ()) -> list[Run]:
    """The runs of one data set, one schedule length and any of `families` (None / empty: all)."""
    out = []
    for r in runs:
        cfg = _cfg(r)
        if data and data_name(cfg) != data:
            continue
        if epochs and cfg.get("epochs") != epochs:
            continue
        if families and family(cfg.get("policy", "none")) not in families:
            continue
        out.append(r)
    return out


def band(records_by_seed: Sequence[Sequence[Mapping]], y: str, x: str = "step"
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A setting's curve from its seeds' records: (x, mean, min, max) of `y` at the steps every
    seed logged. The x of a point is the seeds' mean there (the same for step and epoch; for
    wall time, the mean time at which the seeds reached that step)."""
    per_seed = []
    for records in records_by_seed:
        steps, ys = curves.series(records, y, "step")
        xs, _ = curves.series(records, y, x) if x != "step" else (steps, ys)
        if len(xs) == len(steps):
            per_seed.append({s: (xv, yv) for s, xv, yv in zip(steps, xs, ys)})
    if not per_seed:
        return (np.array([]),) * 4
    common = sorted(set.intersection(*(set(d) for d in per_seed)))
    xs = np.array([[d[s][0] for s in common] for d in per_seed], dtype=np.float64)
    ys = np.array([[d[s][1] for s in common] for d in per_seed], dtype=np.float64)
    return xs.mean(0), ys.mean(0), ys.min(0), ys.max(0)


def mean_range(values: Sequence[float | None]) -> tuple[float | None, float | None, float | None]:
    """(mean, min, max) of the values given (None skipped); (None, None, None) when there are none."""
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    if not vals:
        return None, None, None
    return sum(vals) / len(vals), min(vals), max(vals)


def epochs_to_accuracy_rows(settings: Sequence[Setting], metrics: Mapping[str, Sequence[Mapping]],
                            target: float) -> list[dict]:
    """curves.epochs_to_accuracy_table per setting: each figure the mean of its seeds, with their
    min and max ("<key>_min", "<key>_max"); epochs and seconds are None ("never") unless every
    seed got there ("reached" counts those that did). "run" is the setting's label. Seconds of
    seeds trained on different devices are not averaged (a mean of an H200's 23 s and a CPU's
    3358 s describes neither): they are None there, with "wall_mixed" True."""
    keys = (f"epochs_to_{target:g}", f"wall_to_{target:g}", "best_val_acc", "best_epoch")
    rows = []
    for s in settings:
        per = curves.epochs_to_accuracy_table({m: metrics.get(m, []) for m in s.members}, [target])
        row = {"run": s.label, "seeds": len(per), "devices": s.devices,
               "reached": sum(r[keys[0]] is not None for r in per), "wall_mixed": len(s.devices) > 1}
        for key in keys:
            vals = [r[key] for r in per]
            mean, lo, hi = mean_range(vals)
            if (key in keys[:2] and None in vals) or (key == keys[1] and row["wall_mixed"]):
                mean = lo = hi = None
            row.update({key: mean, f"{key}_min": lo, f"{key}_max": hi})
        rows.append(row)
    return rows


def per_class_of(setting: Setting) -> tuple[list[str] | None, list, list, list]:
    """(classes, mean, min, max) of a setting's per-class validation accuracy over its seeds (a
    class a seed did not record is None); classes None when its runs did not record them."""
    classes = (setting.runs[0].config or {}).get("classes")
    accs = [(r.summary or {}).get("per_class_val_acc") for r in setting.runs]
    accs = [a for a in accs if a and classes and len(a) == len(classes)]
    if not classes or not accs:
        return None, [], [], []
    stats = [mean_range([a[i] for a in accs]) for i in range(len(classes))]
    return list(classes), [m for m, _, _ in stats], [lo for _, lo, _ in stats], [hi for _, _, hi in stats]
