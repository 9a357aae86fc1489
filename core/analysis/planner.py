"""The memory planner: how much memory a batch needs, and how large a batch a budget allows
(docs/fidelity_and_memory.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.step_in_backward import StepInBackward
from ..method import CompressionPolicy, compress_model, model_policy, set_policy
from ..method.meter import cpu_step_peak_bytes, cuda_step_peak_bytes, model_state_bytes, saved_activation_bytes
from .memory_ladder import LADDER_POLICIES
from .synthetic import model_label, optimizer_for, placed, random_batch, training_step


def _linear_fit(xs, ys) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(xs)
    if n < 2:
        raise ValueError("a linear fit needs at least two batch sizes")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a linear fit needs two different batch sizes")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


@dataclass
class MemoryPlan:
    """Predicted peak training memory as a function of the batch size, for one model and policy.

    Everywhere: model state (params + grads + optimiser state) + saved activations fitted as
    a + b*batch from the meter at `fit_batches`, + the backward's transients (the activation
    gradients, rebuilt inputs and workspaces alive beside the saved tensors), measured on the
    CPU as the profiler's step peak minus the saved bytes and the gradients, fitted the same
    way. On CUDA the fit is of `max_memory_allocated` over a real training step instead, so
    the prediction includes the CUDA library's own workspaces and the fixed overhead (the
    intercept minus the model state). Without transients (transients=False) the prediction is
    a lower bound of the peak.
    """

    model: str
    policy: str
    size: int
    optimizer: str
    stem: str
    device: str
    fit_batches: list[int]
    saved_bytes: list[int]  # meter, per fit batch
    saved_fit: tuple[float, float]  # (a, b): bytes = a + b * batch
    model_state: dict[str, int]
    peak_bytes: list[int] | None = None  # CUDA max_memory_allocated per batch of peak_fit_batches
    peak_fit_batches: list[int] | None = None
    peak_fit: tuple[float, float] | None = None
    overhead_bytes: float | None = None  # CUDA: intercept of peak_fit minus model state
    transient_bytes: list[int] | None = None  # CPU: step peak - saved - gradients, per fit batch (may be < 0)
    transient_fit: tuple[float, float] | None = None
    step_in_backward: bool = False  # the optimiser steps inside the backward (one gradient at a time)

    @property
    def measure(self) -> str:
        if self.peak_fit is not None:
            return "CUDA max_memory_allocated of a training step, fitted linearly in the batch"
        if self.transient_fit is not None:
            return ("model state + saved activations (meter) + the backward's transients (CPU step peak), "
                    "fitted linearly in the batch")
        return "model state + saved activations (meter), fitted linearly in the batch; a lower bound of the peak"

    @property
    def bytes_per_image(self) -> float:
        if self.peak_fit is not None:
            return self.peak_fit[1]
        return self.saved_fit[1] + (self.transient_fit[1] if self.transient_fit else 0.0)

    def predict_saved(self, batch: float) -> float:
        a, b = self.saved_fit
        return a + b * batch

    def predict(self, batch: float) -> float:
        """Predicted peak training memory at `batch` images (bytes)."""
        if self.peak_fit is not None:
            a, b = self.peak_fit
            return a + b * batch
        extra = self.transient_fit[0] + self.transient_fit[1] * batch if self.transient_fit else 0.0
        return self.model_state["total"] + self.predict_saved(batch) + extra

    def fits(self, batch: int, budget_bytes: float) -> bool:
        return self.predict(batch) <= budget_bytes

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["measure"] = self.measure
        return d


def plan_memory(model_name, policy: str, size: int = 32, optimizer: str = "sgd", stem: str = "cifar",
                fit_batches=(8, 16, 24, 32), device="cpu", num_classes: int = 10, amp: bool = False,
                cuda_fit_batches=(64, 96, 128), transients: bool = True,
                step_in_backward: bool = False) -> MemoryPlan:
    """Measure at a few small batches, fit bytes = a + b*batch, predict any batch (see MemoryPlan).

    The meter's saved bytes are exactly linear in the batch, so `fit_batches` can be small.
    The CUDA peak is not, at small batches: kernel workspaces and allocator rounding make a
    fixed-looking part that changes with the batch. On an H200 a fit at 8-32 under-predicted
    batch 128 by 7-20% (ResNet-18/20), while a fit at 64-128 predicted batch 512 within
    -7.5..+0.4%; hence the separate, larger `cuda_fit_batches` for the peak fit.
    `amp` (CUDA): bf16 autocast in the measured steps and the meter, as the trainer does on CUDA.
    `transients` (CPU): also measure a training step's peak at each fit batch (slower).
    `step_in_backward`: the optimiser steps inside the backward (`train --step-in-backward`),
    so the gradients never all coexist; the measured steps do the same.
    """
    fit_batches = sorted({int(b) for b in fit_batches})
    if len(fit_batches) < 2 or fit_batches[0] < 2:
        raise ValueError("fit_batches needs at least two different batch sizes >= 2")
    policy = str(CompressionPolicy.parse(policy))
    model, dev = placed(model_name, num_classes, stem, device)
    before = model_policy(model)
    try:
        compress_model(model, policy)
        saved = []
        for b in fit_batches:
            x, y = random_batch(b, size, num_classes, dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                saved.append(saved_activation_bytes(model, x, y).total_bytes)
            del x, y
        state = model_state_bytes(model, optimizer, step_in_backward)
        plan = MemoryPlan(model=model_label(model_name), policy=policy, size=size, optimizer=optimizer, stem=stem,
                          device=str(dev), fit_batches=fit_batches, saved_bytes=saved,
                          saved_fit=_linear_fit(fit_batches, saved), model_state=state,
                          step_in_backward=step_in_backward)
        if dev.type == "cuda":
            plan.peak_fit_batches = sorted({int(b) for b in cuda_fit_batches})
            plan.peak_bytes = [training_peak(model, b, size, num_classes, optimizer, dev, amp=amp,
                                             step_in_backward=step_in_backward)
                               for b in plan.peak_fit_batches]
            plan.peak_fit = _linear_fit(plan.peak_fit_batches, plan.peak_bytes)
            plan.overhead_bytes = plan.peak_fit[0] - state["total"]
        elif transients:
            peaks = [training_peak(model, b, size, num_classes, optimizer, dev, step_in_backward=step_in_backward)
                     for b in fit_batches]
            # Not clamped at 0: negative where a step peaks before all its gradients exist, or
            # (small batches) where the gradients outweigh the working set, and the fit must
            # still see how that working set grows with the batch: state + saved + this = peak.
            plan.transient_bytes = [p - s - state["grads"] for p, s in zip(peaks, saved)]
            plan.transient_fit = _linear_fit(fit_batches, plan.transient_bytes)
    finally:
        set_policy(model, before)
    return plan


def training_peak(model: nn.Module, batch: int, size: int, num_classes: int, optimizer: str = "sgd",
                  device=None, amp: bool = False, step_in_backward: bool = False) -> int:
    """The peak of one full training step (forward, loss, backward, optimiser step), with the
    optimiser state already allocated by an untimed warm-up step: on CUDA
    `max_memory_allocated` (process-wide: whatever else the process holds counts too), on the
    CPU the profiler's peak of live bytes above what existed before the step.

    Runs on `model` itself (no second copy) and puts its weights, buffers and `.grad` back
    afterwards. `amp`: bf16 autocast, as the trainer uses on CUDA. `step_in_backward`: the
    optimiser steps inside the backward (hooks removed afterwards).
    """
    dev = torch.device(device or "cuda")
    cuda = dev.type == "cuda"
    model.to(dev)
    was_training = model.training
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    grads = {p: p.grad for p in model.parameters()}
    for p in model.parameters():
        p.grad = None
    model.train()
    x, y = random_batch(batch, size, num_classes, dev)
    held = {"opt": optimizer_for(model, optimizer), "x": x, "y": y}  # cleared before empty_cache
    del x, y
    if step_in_backward and held["opt"] is not None:
        held["hooks"] = StepInBackward(model, held["opt"])

    def step():
        training_step(model, held["x"], held["y"], held["opt"], held.get("hooks"), amp)

    try:
        step()  # warm-up: optimiser state, allocator and library workspaces settle
        if cuda:
            return int(cuda_step_peak_bytes(step, dev)["peak_bytes"])
        return int(cpu_step_peak_bytes(step)["step_peak_bytes"])
    finally:
        if "hooks" in held:
            held["hooks"].remove()
        held.clear()
        model.load_state_dict(state)
        for p, g in grads.items():
            p.grad = g
        model.train(was_training)
        if cuda:
            torch.cuda.empty_cache()


def largest_batch(plan: MemoryPlan, budget_bytes: float, max_batch: int = 1 << 20) -> int:
    """The largest batch whose predicted peak fits `budget_bytes` (0 when none does)."""
    a = plan.predict(0)
    b = plan.bytes_per_image
    if b <= 0:
        return max_batch if a <= budget_bytes else 0
    n = math.floor((budget_bytes - a) / b)
    while n > 0 and plan.predict(n) > budget_bytes:  # float rounding at the edge
        n -= 1
    return int(max(0, min(n, max_batch)))


GIB = 1024 ** 3


GPU_SIZES_GB = (4, 6, 8, 12, 16, 24)  # consumer cards: the paper's "smaller GPUs"


def largest_batches(model_name, policies=LADDER_POLICIES, budgets_gb=(4, 8, 12, 16, 24, 80), size: int = 32,
                    optimizer: str = "sgd", stem: str = "cifar", device="cpu", fit_batches=(8, 16, 24, 32),
                    num_classes: int = 10, step_in_backward: bool = False) -> list[dict]:
    """A table: for each policy and budget (GiB), the largest batch the planner predicts fits.

    Rows: {"policy", "budget_gb", "largest_batch", "bytes_per_image", "fixed_bytes", "measure"}.
    """
    rows = []
    for p in policies:
        plan = plan_memory(model_name, p, size=size, optimizer=optimizer, stem=stem, fit_batches=fit_batches,
                           device=device, num_classes=num_classes, step_in_backward=step_in_backward)
        for gb in budgets_gb:
            rows.append({"model": plan.model, "policy": plan.policy, "budget_gb": gb,
                         "largest_batch": largest_batch(plan, gb * GIB), "bytes_per_image": plan.bytes_per_image,
                         "fixed_bytes": plan.predict(0), "measure": plan.measure})
    return rows
