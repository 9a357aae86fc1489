"""`python -m core reproduction`: the README's reproduction table, computed from finished runs.

One row per (data, model, policy, epochs), seeds pooled: final validation accuracy (mean, and ± half
the range when there are several seeds), saved-activation memory and its cut at batch 128 for
ResNet-20 and ResNet-18, the training-step time ratio vs `none` (process CPU time on this
machine, so the figure does not depend on where a run was trained), and the share of
first-layer filter energy above half Nyquist. Only the standard library, torch and numpy:
it runs on the GPU machine too.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..engine.runs import inspect_run, list_runs, load_model
from ..method import CompressionPolicy
from ..method.meter import format_bytes

MEMORY_MODELS = ("resnet20", "resnet18")


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def data_family(dataset: str, classes=None) -> str:
    """The table's data column: features10 variants pool; CIFAR-10 pools with any image folder
    of its ten classes (the shipped runs train on a JPEG copy, wherever it was unpacked); any
    other image folder is named by its path."""
    if dataset.startswith("features10"):
        return "features10"
    if dataset.startswith("cifar10") or list(classes or []) == CIFAR10_CLASSES:
        return "CIFAR-10"
    if dataset.startswith("imagefolder:"):
        return dataset.split(":", 1)[1]
    return dataset


def _first_layer_hf_share(run) -> float:
    from .filters import high_frequency_share
    from .layers import first_conv

    model = load_model(run)
    return high_frequency_share(model.get_submodule(first_conv(model)).weight)


def trained_on(cfg: dict) -> str:
    """'NVIDIA H200, bfloat16' or 'CPU, float32' (autocast changes the numbers a little)."""
    used = str(cfg.get("device_used") or cfg.get("device") or "?")
    where = (cfg.get("device_name") or used) if used.startswith("cuda") else used.split(":")[0].upper()
    return f"{where}, {cfg.get('amp_dtype_used') or 'float32'}"


def group_runs(run_dirs) -> list[dict]:
    """Finished runs grouped by (data, model, policy, epochs), in first-seen order.

    A run counts only when finished: a stopped run's accuracy is not that of its schedule. Nor
    does a run a resume trained on for more epochs: its schedule was stretched (the learning
    rate rose again), so it is not a run of either length.
    """
    groups: dict[tuple, dict] = {}
    for run in run_dirs:
        run = run if hasattr(run, "status") else inspect_run(run)
        if run.status != "finished" or not run.summary:
            continue
        cfg, s = run.config, run.summary
        if any("epochs" in r.get("was", {}) for r in cfg.get("resumes", [])):
            continue
        policy = str(CompressionPolicy.parse(cfg.get("policy") or "none"))
        key = (data_family(cfg.get("dataset", ""), cfg.get("classes")), cfg["model"], policy, int(cfg["epochs"]))
        g = groups.setdefault(key, {"data": key[0], "model": key[1], "policy": policy, "epochs": key[3],
                                    "runs": [], "seeds": [], "accs": [], "hf": [], "devices": []})
        g["runs"].append(run.name)
        g["seeds"].append(cfg.get("seed"))
        g["accs"].append(s.get("last_val_acc"))
        g["hf"].append(_first_layer_hf_share(run))
        g["devices"].append(trained_on(cfg))
    rows = []
    order = sorted(groups, key=lambda k: (k[0] != "CIFAR-10", k[1], k[2] != "none", k[2], k[3]))
    for g in (groups[k] for k in order):
        accs = [a for a in g["accs"] if a is not None]
        g["acc_mean"] = statistics.fmean(accs) if accs else None
        g["acc_spread"] = (max(accs) - min(accs)) / 2 if len(accs) > 1 else None
        g["hf_share"] = statistics.fmean(g["hf"])
        rows.append(g)
    return rows


def add_memory(rows: list[dict], batch: int = 128, models=MEMORY_MODELS) -> None:
    """Saved-activation bytes and cut vs `none` at `batch`, 32x32, for each memory model.

    A policy that does not fit a model (K=8 on ResNet-18's 4x4 last stage) gets None.
    """
    from ..method import PolicyError
    from .bench import bench_memory

    for model in models:
        base = bench_memory(model, batch, 32, ["none"], "cpu", step_peak=False)[0]["saved_bytes"]
        for r in rows:
            try:
                saved = bench_memory(model, batch, 32, [r["policy"]], "cpu", step_peak=False)[0]["saved_bytes"]
            except PolicyError:
                saved = None
            r[f"{model}_saved_bytes"] = saved
            r[f"{model}_cut"] = None if saved is None else 1 - saved / base


def add_speed(rows: list[dict], batch: int = 128, repeats: int = 7) -> None:
    """ResNet-20 training-step CPU-time ratio vs `none` (interleaved repeats, one process)."""
    from .bench import bench_speed

    policies = ["none", *dict.fromkeys(r["policy"] for r in rows if r["policy"] != "none")]
    by_policy = {s["policy"]: s for s in bench_speed("resnet20", batch, 32, policies, "cpu", repeats=repeats)}
    for r in rows:
        r["step_time_ratio"] = by_policy[r["policy"]].get("cpu_ratio")


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _mem(r: dict, model: str) -> str:
    b, cut = r.get(f"{model}_saved_bytes"), r.get(f"{model}_cut")
    if b is None:
        return "—"
    if r["policy"] == "none" or cut is None:
        return format_bytes(b)
    return format_bytes(b) + f" ({-100 * cut:+.1f} %)".replace("-", "−")


def format_markdown(rows: list[dict]) -> str:
    head = ("| data | model | policy | epochs | seeds | val accuracy % | ResNet-20 saved (batch 128) | "
            "ResNet-18 saved (batch 128) | step-time ratio | first-layer HF share | trained on |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acc = _pct(r["acc_mean"])
        if r["acc_spread"] is not None:
            acc += f" ± {100 * r['acc_spread']:.1f}"
        ratio = r.get("step_time_ratio")
        lines.append(f"| {r['data']} | {r['model']} | `{r['policy']}` | {r['epochs']} | {len(r['accs'])} | {acc} | "
                     f"{_mem(r, 'resnet20')} | {_mem(r, 'resnet18')} | "
                     f"{'—' if ratio is None else f'{ratio:.2f}'} | {r['hf_share']:.2f} | "
                     f"{'; '.join(sorted(set(r['devices'])))} |")  # sorted: the same table whatever the run order
    return "\n".join(lines)


def runs_in(refs) -> list:
    """Runs and folders of runs, listed together so that a copy of a run found in two of them
    (runs/shipped/ and checkpoints/ after a collect) counts once, not as a second seed."""
    for ref in refs:
        if not Path(ref).exists():
            raise FileNotFoundError(f"no such run or folder: {ref}")
    return list_runs([Path(ref) for ref in refs], include_default=False)
