"""Resume state: weights, optimiser, RNG and schedule as safetensors + JSON, never pickle."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch import nn

from . import atomic

RESUME_FORMAT = "poolprop-resume/1"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """-> (tensors named `opt.state.<param index>.<name>`, JSON part: param_groups and scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.state.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("opt.state."):
            idx, key = name[len("opt.state."):].split(".", 1)
            state.setdefault(int(idx), {})[key] = t
    for idx, kv in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    # give buffers their parameter's memory layout (channels_last) as in an uninterrupted run
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        st = opt.state.get(p, {})
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() == 4:
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def save_resume(run_dir: Path, model: nn.Module, opt, meta: dict, scaler=None) -> None:
    """resume.safetensors (weights, optimiser tensors, RNG states; the JSON part embedded in
    its metadata, so the one file is self-consistent) + resume.json (a readable mirror)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    tensors.update(opt_tensors)
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {**meta, "format": RESUME_FORMAT, "optimizer": opt_meta,
            "python_random": _py_random_state(), "scaler": scaler.state_dict() if scaler is not None else None}
    text = atomic.dumps(meta)
    atomic.write_safetensors(run_dir / "resume.safetensors", tensors,
                             metadata={"format": RESUME_FORMAT, "resume_json": text, "step": str(meta["step"])})
    atomic.write_text(run_dir / "resume.json", atomic.dumps(meta, indent=2) + "\n")


def _py_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def load_resume(run_dir: Path) -> tuple[dict, dict]:
    """-> (tensors, meta). Raises ValueError with a clear message when the files are unusable."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = run_dir / "resume.safetensors"
    if not path.is_file():
        raise ValueError(f"{path} not found: this run has no completed epoch to resume from")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    if md.get("format") != RESUME_FORMAT or "resume_json" not in md:
        raise ValueError(f"{path} is not a PoolProp resume file (format {md.get('format')!r})")
    return tensors, json.loads(md["resume_json"])
