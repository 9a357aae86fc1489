"""`python -m core bench {memory,speed}`: policies side by side, measured in one run.

memory: saved-activation bytes (the meter), model-state bytes, their sum and the cut
        against `none`; on CUDA also `max_memory_allocated` of a full training step,
        on the CPU the step's peak of live tensor bytes from the profiler.
speed:  training-step time as a ratio to `none`, from interleaved repeats (median), so
        that a noisy machine slows every policy alike.
Gradient checkpointing (`ckpt`) is the exact reference row a user would otherwise pick.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

from ..engine.environment import pick_device
from ..engine.step_in_backward import StepInBackward
from ..method import CompressionPolicy, compress_model, fastpath
from ..method.meter import (
    cpu_step_peak_bytes,
    cuda_step_peak_bytes,
    model_state_bytes,
    saved_activation_bytes,
)
from ..models import build_model
from .synthetic import training_step

DEFAULT_POLICIES = ("none", "avg2", "mask", "avg2+mask", "avg4+mask", "avg2-lowres+mask", "max2+mask",
                    "avg2+mask+bn16", "avg2+mask+bn8", "avg4+mask+bn8", "q8+mask", "q4+mask", "q4+mask+bn4",
                    "q2+mask+bn2", "avg2+res4+mask", "avg2+res2+mask", "avg2+res2+mask+bn4", "ckpt")


# A ResNet-20 training step's time against none's in a training run on the CPU (batch 128, one
# thread, fused passes): the README's "in a training run" table (scripts/trainer_speed.py), which
# tests/test_lesson.py holds these to. Quoted, not measured: the app times steps with the reference
# passes at a small batch, and the lesson and the Memory page tell a class what training costs.
TRAINING_STEP_TIME = {"avg2+mask": 1.10, "avg2+mask+bn8": 1.16, "ckpt": 1.30}


def _setup(model_name, policy, batch, size, device, stem, channels_last, seed=0):
    torch.manual_seed(seed)
    model = compress_model(build_model(model_name, 10, stem), policy).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    return model, x, y


def _fast_path(policies, device, reference: bool) -> None:
    if reference:
        fastpath.use_compiled(False)
        fastpath.use_triton(False)
    else:
        fastpath.use_triton(True)
        if any(CompressionPolicy.parse(p) != CompressionPolicy() for p in policies):
            fastpath.use_compiled_on(device)  # as the trainer does: the same bytes, fused passes


def _warm_step(model, x, y, step_in_backward: bool):
    """-> (one SGD training step to measure, its StepInBackward hooks or None), the step run once
    already: the optimiser's state exists, so what is measured is a steady-state step's."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    hooks = StepInBackward(model, opt) if step_in_backward else None
    step = functools.partial(training_step, model, x, y, opt, hooks)
    step()
    return step, hooks


def bench_memory(model_name="resnet18", batch=128, size=32, policies=DEFAULT_POLICIES, device="auto",
                 stem="cifar", optimizer="sgd", channels_last=True, step_peak=True, reference=False,
                 step_in_backward=False, where=False) -> list[dict]:
    """Per policy: saved bytes (the meter), model state, and (step_peak) the peak of one
    training step: CUDA max_memory_allocated or the CPU profiler's live bytes; `transient_bytes`
    is that peak minus the saved bytes, what the backward builds on the way. `reference`: the
    PyTorch reference passes only (no compiled or fused kernels). `step_in_backward`: the
    optimiser steps inside the backward (core/engine/step_in_backward.py). `where` (CPU): also
    "at_peak", the tensors alive at the step peak grouped by the op that made them."""
    device = pick_device(device)
    if where and device.type != "cpu":
        raise ValueError("where the step peak is (--where) is measured with the CPU profiler only; "
                         "use --device cpu")
    _fast_path(policies, device, reference)
    rows = []
    for text in policies:
        policy = CompressionPolicy.parse(text)
        model, x, y = _setup(model_name, policy, batch, size, device, stem, channels_last)
        report = saved_activation_bytes(model, x, y)
        state = model_state_bytes(model, optimizer, step_in_backward)
        row = {"policy": str(policy), "exact": policy.is_exact, "saved_bytes": report.total_bytes,
               "by_kind": report.by_kind, "state_bytes": state["total"],
               "total_bytes": report.total_bytes + state["total"]}
        if step_peak:
            step, _ = _warm_step(model, x, y, step_in_backward)
            if device.type == "cuda":
                peak = cuda_step_peak_bytes(step, device)
                row["cuda_peak_bytes"] = peak["peak_bytes"]
                row["transient_bytes"] = peak["step_extra_bytes"] - report.total_bytes
            elif device.type == "cpu":
                peak = cpu_step_peak_bytes(step, where)
                row["cpu_step_peak_bytes"] = peak["step_peak_bytes"]
                row["transient_bytes"] = row["cpu_step_peak_bytes"] - report.total_bytes
                if where:
                    row["at_peak"] = peak["at_peak"]
        rows.append(row)
        del model, x, y
    base = next((r for r in rows if r["policy"] == "none"), rows[0])
    for r in rows:
        for key in ("saved_bytes", "total_bytes", "cuda_peak_bytes", "cpu_step_peak_bytes"):
            if key in r and base.get(key):
                r[key.replace("_bytes", "_cut")] = 1 - r[key] / base[key]
    return rows


def step_peak_makers(model_name: str, policy: str, batch: int, size: int = 32, stem: str = "cifar",
                     step_in_backward: bool = False) -> dict:
    """Where one CPU training step of `model_name` under `policy` peaks: {"policy", "peak_bytes"
    (live bytes above the step's start), "saved_bytes" (the meter's), "at_peak" (what was alive
    then, by the op that made it: meter.cpu_step_peak_bytes)}. With the passes active in this
    process, switching nothing (the app measures with the PyTorch reference passes; `bench memory
    --where` with the fast path, as the trainer runs)."""
    pol = CompressionPolicy.parse(policy)
    model, x, y = _setup(model_name, pol, batch, size, torch.device("cpu"), stem, True)
    saved = saved_activation_bytes(model, x, y).total_bytes
    step, hooks = _warm_step(model, x, y, step_in_backward)
    peak = cpu_step_peak_bytes(step, where=True)
    if hooks is not None:
        hooks.remove()
    return {"policy": str(pol), "model": model_name, "batch": batch, "peak_bytes": peak["step_peak_bytes"],
            "saved_bytes": saved, "at_peak": peak["at_peak"]}


def bench_speed(model_name="resnet20", batch=128, size=32, policies=DEFAULT_POLICIES, device="auto",
                stem="cifar", repeats=7, warmup=2, channels_last=True, amp=None, reference=False,
                peak=True, step_in_backward=False) -> list[dict]:
    """Median step time per policy; repeats interleave the policies (A B C A B C ...). On CUDA
    the time is CUDA events' (the kernels' wall time, launches included). With `peak`, after
    the timing one more step per policy gives the step peak (CUDA max_memory_allocated or the
    CPU profiler's) and its transients (peak - saved activations). With `step_in_backward`
    every policy also runs a plain step, interleaved with it: `vs_plain` (and on the CPU
    `cpu_vs_plain`) is what stepping inside the backward costs, as a ratio."""
    device = pick_device(device)
    _fast_path(policies, device, reference)
    amp = (device.type == "cuda") if amp is None else amp
    setups = {}  # (policy, steps in the backward) -> (model, x, y, opt, hooks)
    for text in policies:
        for in_backward in ((False, True) if step_in_backward else (False,)):
            model, x, y = _setup(model_name, CompressionPolicy.parse(text), batch, size, device, stem, channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            hooks = StepInBackward(model, opt) if in_backward else None
            setups[(str(CompressionPolicy.parse(text)), in_backward)] = (model, x, y, opt, hooks)

    step = functools.partial(training_step, amp=amp)  # step(model, x, y, opt, hooks)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Wall time, and on the CPU also this process's CPU time: on a shared machine the latter
    # is far less disturbed by other processes (it does not count time spent waiting for a core).
    times: dict[tuple, list[float]] = {k: [] for k in setups}
    cpu_times: dict[tuple, list[float]] = {k: [] for k in setups}
    cuda = device.type == "cuda"
    for r in range(warmup + repeats):
        for key, s in setups.items():
            sync()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0, c0 = time.perf_counter(), time.process_time()
            step(*s)
            if cuda:
                end.record()
            sync()
            if r >= warmup:
                times[key].append(start.elapsed_time(end) / 1000 if cuda else time.perf_counter() - t0)
                cpu_times[key].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    shown = [k for k in setups if k[1] == step_in_backward]
    base_key = next((k for k in shown if k[0] == "none"), shown[0])
    rows = []
    for key in shown:
        name, ts = key[0], times[key]
        row = {"policy": name, "step_s": med[key], "ratio": med[key] / med[base_key],
               "images_per_s": batch / med[key], "spread": (max(ts) - min(ts)) / med[key]}
        if device.type == "cpu":
            row.update(cpu_step_s=cpu_med[key], cpu_ratio=cpu_med[key] / cpu_med[base_key])
        if step_in_backward:
            row["vs_plain"] = med[key] / med[(name, False)]
            if device.type == "cpu":
                row["cpu_vs_plain"] = cpu_med[key] / cpu_med[(name, False)]
        if peak:
            model, x, y, *_ = setups[key]
            saved = saved_activation_bytes(model, x, y).total_bytes
            one = (lambda s=setups[key]: step(*s))
            row["peak_bytes"] = (cuda_step_peak_bytes(one, device)["step_extra_bytes"] if cuda
                                 else cpu_step_peak_bytes(one)["step_peak_bytes"])
            row["saved_bytes"], row["transient_bytes"] = saved, row["peak_bytes"] - saved
        rows.append(row)
    return rows
