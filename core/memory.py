"""What training memory is, measured three ways (docs/fidelity_and_memory.md).

- saved activations: distinct bytes of the tensors autograd keeps for backward during one
  forward pass, via `saved_tensors_hooks`, deduplicated by storage, parameters excluded.
  Exact and device-independent: it works on a laptop CPU.
- model state: parameters + gradients + optimiser state.
- peak: on CUDA `torch.cuda.max_memory_allocated` over a training step; on the CPU the peak
  of live tensor bytes during a step from torch.profiler's memory timeline.
Process RSS is deliberately not used: the allocator keeps freed blocks.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from . import models

KINDS = ("conv input", "BN input", "ReLU state", "linear input", "checkpoint input", "other")


def _kind_of(module: nn.Module | None) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv input"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "BN input"
    if isinstance(module, nn.ReLU):
        return "ReLU state"
    if isinstance(module, nn.Linear):
        return "linear input"
    return "other"


@dataclass
class SavedActivationReport:
    """Bytes kept for backward by one forward pass."""

    total_bytes: int
    by_kind: dict[str, int]
    by_layer: dict[str, int]  # leaf module name -> bytes first saved while it ran
    by_layer_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    tensors: int = 0

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "by_kind": self.by_kind, "by_layer": self.by_layer,
                "by_layer_kind": self.by_layer_kind, "tensors": self.tensors}


class SavedActivationMeter:
    """Context manager recording what autograd saves; removes every hook on exit."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._stack: list[tuple[str, nn.Module]] = []
        self._seen: set[int] = set()
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._param_ptrs |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.by_layer: dict[str, int] = defaultdict(int)
        self.by_layer_kind: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.by_kind: dict[str, int] = defaultdict(int)
        self.tensors = 0
        self._handles = []

    def _record(self, t: torch.Tensor, kind: str | None = None) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._param_ptrs or ptr in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(ptr)
        name, module = self._stack[-1] if self._stack else ("(outside modules)", None)
        kind = kind or _kind_of(module)
        n = storage.nbytes()
        self.by_layer[name] += n
        self.by_layer_kind[name][kind] += n
        self.by_kind[kind] += n
        self.tensors += 1

    def _pack(self, t):
        self._record(t)
        return t

    def _enter_hook(self, name):
        def hook(module, args):
            self._stack.append((name, module))
        return hook

    def _exit_hook(self, module, args, output):
        self._stack.pop()

    def __enter__(self):
        for name, m in self.model.named_modules():
            if len(list(m.children())) == 0:
                self._handles.append(m.register_forward_pre_hook(self._enter_hook(name)))
                self._handles.append(m.register_forward_hook(self._exit_hook))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        self._listener = lambda t: self._record(t, "checkpoint input")
        models._checkpoint_listeners.append(self._listener)
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        models._checkpoint_listeners.remove(self._listener)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def report(self) -> SavedActivationReport:
        return SavedActivationReport(
            total_bytes=sum(self.by_kind.values()),
            by_kind={k: self.by_kind.get(k, 0) for k in KINDS if self.by_kind.get(k, 0)},
            by_layer=dict(self.by_layer),
            by_layer_kind={k: dict(v) for k, v in self.by_layer_kind.items()},
            tensors=self.tensors,
        )


def saved_activation_bytes(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None
                           ) -> SavedActivationReport:
    """Run one training-mode forward (and the loss) and report what is kept for backward.

    Runs backward afterwards with gradients discarded, so nothing leaks into `.grad`.
    BatchNorm running statistics are restored, so the model is left as it was.
    """
    was_training = model.training
    model.train()
    bn_state = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    grads = {p: p.grad for p in model.parameters()}
    try:
        with SavedActivationMeter(model) as meter:
            out = model(inputs)
            if targets is not None:
                loss = nn.functional.cross_entropy(out, targets)
            else:
                loss = out.float().sum()
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(loss, params, allow_unused=True)  # frees the graph
    finally:
        for p, g in grads.items():
            p.grad = g
        model.load_state_dict({**model.state_dict(), **bn_state})
        model.train(was_training)
    return meter.report()


def optimizer_state_bytes_per_param(optimizer: str) -> int:
    """fp32 buffers an optimiser keeps per parameter element (SGD momentum 1, AdamW 2)."""
    return {"sgd": 1, "sgd-nesterov": 1, "adamw": 2, "none": 0}[optimizer]


def model_state_bytes(model: nn.Module, optimizer: str = "sgd") -> dict[str, int]:
    """Parameters + gradients + optimiser state, in bytes."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad) * optimizer_state_bytes_per_param(
        optimizer)
    return {"params": params, "grads": grads, "optimizer": opt, "total": params + grads + opt}


def cuda_step_peak_bytes(step_fn, device=None) -> dict[str, int]:
    """`max_memory_allocated` over one call of `step_fn` (a full training step), CUDA only."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step_fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "baseline_bytes": base, "step_extra_bytes": peak - base}


def cpu_step_peak_bytes(step_fn) -> dict[str, int]:
    """Peak of live tensor bytes allocated during `step_fn` on the CPU (transients included).

    From the CPU allocator's events that torch.profiler records with `profile_memory=True`:
    each `[memory]` event is one allocation (+bytes) or free (-bytes); their running sum in
    time order is the live total above what existed before the step. (The events must be
    sorted: forward and backward run on different threads.) Checked against the meter in
    tests: the peak is never below the saved-activation bytes of the same step.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _t, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return {"step_peak_bytes": peak, "net_bytes": live}


def training_step_fn(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, optimizer=None):
    """A closure doing forward, loss, backward (and optimiser step when given)."""

    def step():
        out = model(inputs)
        loss = nn.functional.cross_entropy(out, targets)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            for p in model.parameters():
                p.grad = None

    return step


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@contextlib.contextmanager
def no_grad_side_effects(model: nn.Module):
    """Keep `.grad` fields as they were across the block."""
    grads = {p: p.grad for p in model.parameters()}
    try:
        yield
    finally:
        for p, g in grads.items():
            p.grad = g


# =======================================================================================
# The ladder and the planner (docs/fidelity_and_memory.md)
# =======================================================================================
# For the Memory page: what each step of a policy saves, per layer and per kind, and how large
# a batch fits a given memory budget.

import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from .compression import (  # noqa: E402
    CompressionPolicy,
    PolicyError,
    compress_model,
    decompress_model,
    model_policy,
)

# The policy the app calls "best". avg4+mask+bn8 cuts the most by the meter (-82% of saved
# activations on resnet18 at 32x32) but pools by 4 (cosine ~0.6-0.8 at init); avg2+mask+bn8
# still cuts ~71% with the gentler K=2 (cosine ~0.85 on features10 at init, ~0.74 projection).
# The gentler one is the default until training results say K=4 trains as well.
BEST_POLICY = "avg2+mask+bn8"
STRONGEST_POLICY = "avg4+mask+bn8"
LADDER_POLICIES = ("none", "avg2", "mask", "avg2+mask", BEST_POLICY, "ckpt")
OUTSIDE = "(outside modules)"  # meter's name for tensors saved outside any leaf module (the loss)


def _build(model_name, num_classes: int, stem: str) -> nn.Module:
    if isinstance(model_name, nn.Module):
        return model_name
    return models.build_model(model_name, num_classes=num_classes, stem=stem)


def _model_label(model_name) -> str:
    return model_name if isinstance(model_name, str) else type(model_name).__name__


def _random_batch(batch: int, size: int, num_classes: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return x, y


class _DroppableGraphMeter(SavedActivationMeter):
    """The meter, with saved tensors stored detached.

    The base meter's pack hook hands autograd back the tensor itself. For a saved *output*
    (ReLU keeps its result) that is a cycle: tensor -> grad_fn -> saved tensor, through C++
    objects that Python's garbage collector cannot see, so a graph dropped without running
    backward is never freed (seen on CUDA: every forward-only measurement stayed allocated).
    A detached view (same storage, same version counter, no grad_fn) breaks the cycle; the
    bytes recorded are the same.
    """

    def _pack(self, t):
        self._record(t)
        return t.detach() if isinstance(t, torch.Tensor) else t


def forward_saved_bytes(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None
                        ) -> SavedActivationReport:
    """`saved_activation_bytes` without the backward: the meter only needs the forward.

    Same report (the graph is dropped instead of run backward, and freed: see
    `_DroppableGraphMeter`), about half the cost; `.grad` is never touched and BatchNorm
    buffers are restored.
    """
    was_training = model.training
    model.train()
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with _DroppableGraphMeter(model) as meter:
            out = model(inputs)
            loss = nn.functional.cross_entropy(out, targets) if targets is not None else out.float().sum()
        del out, loss  # frees the graph and what it saved
    finally:
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
        model.train(was_training)
    return meter.report()


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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    with no_grad_side_effects(model):
        try:
            for r in range(repeats + 1):
                for p in policies:
                    compress_model(model, p)
                    step = training_step_fn(model, x, y)
                    if cuda:
                        torch.cuda.synchronize(x.device)
                    t = time.perf_counter()
                    step()
                    if cuda:
                        torch.cuda.synchronize(x.device)
                    if r > 0:
                        times[p].append(time.perf_counter() - t)
        finally:
            with torch.no_grad():
                for b, v in buffers:
                    b.copy_(v)
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
    model, device = _placed(model_name, num_classes, stem, device)
    before = model_policy(model)
    x, y = _random_batch(batch, size, num_classes, device)
    order = _leaf_order(model)
    steps, skipped = [], {}
    try:
        for p in policies:
            try:
                compress_model(model, p)
                rep = forward_saved_bytes(model, x, y)
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
            xt, yt = (x, y) if tb == batch else _random_batch(tb, size, num_classes, device)
            med = _time_policies(model, [s.policy for s in steps], xt, yt, max(1, time_repeats))
            for s in steps:
                s.step_seconds = med[s.policy]
                s.time_ratio = med[s.policy] / med["none"] if med["none"] > 0 else None
            timing = {"repeats": max(1, time_repeats), "batch": tb, "device": str(torch.device(device)),
                      "method": "median of interleaved training steps (forward+loss+backward), 1 warm-up each"}
    finally:
        _restore_policy(model, before)
    seen = {layer for s in steps for layer in s.by_layer}
    layers = [n for n in order if n in seen] + sorted(seen - set(order))
    return MemoryLadder(model=_model_label(model_name), batch=batch, size=size, steps=steps, layers=layers,
                        skipped=skipped, timing=timing)


# ---------------------------------------------------------------------------------------
# Planner: how much memory a batch needs, how large a batch a budget allows
# ---------------------------------------------------------------------------------------

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
    a + b*batch from the meter at `fit_batches` -- a lower bound of the true peak (it leaves out
    transients such as the gradient buffers alive during backward and kernel workspaces).
    On CUDA the fit is of `max_memory_allocated` over a real training step instead, so the
    prediction includes those transients and the fixed overhead (the intercept minus the
    model state).
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

    @property
    def measure(self) -> str:
        if self.peak_fit is not None:
            return "CUDA max_memory_allocated of a training step, fitted linearly in the batch"
        return "model state + saved activations (meter), fitted linearly in the batch; a lower bound of the peak"

    @property
    def bytes_per_image(self) -> float:
        return (self.peak_fit or self.saved_fit)[1]

    def predict_saved(self, batch: float) -> float:
        a, b = self.saved_fit
        return a + b * batch

    def predict(self, batch: float) -> float:
        """Predicted peak training memory at `batch` images (bytes)."""
        if self.peak_fit is not None:
            a, b = self.peak_fit
            return a + b * batch
        return self.model_state["total"] + self.predict_saved(batch)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["measure"] = self.measure
        return d


def plan_memory(model_name, policy: str, size: int = 32, optimizer: str = "sgd", stem: str = "cifar",
                fit_batches=(8, 16, 24, 32), device="cpu", num_classes: int = 10, amp: bool = False,
                cuda_fit_batches=(64, 96, 128)) -> MemoryPlan:
    """Measure at a few small batches, fit bytes = a + b*batch, predict any batch (see MemoryPlan).

    The meter's saved bytes are exactly linear in the batch, so `fit_batches` can be small.
    The CUDA peak is not, at small batches: kernel workspaces and allocator rounding make a
    fixed-looking part that changes with the batch. On an H200 a fit at 8-32 under-predicted
    batch 128 by 7-20% (ResNet-18/20), while a fit at 64-128 predicted batch 512 within
    -7.5..+0.4%; hence the separate, larger `cuda_fit_batches` for the peak fit.
    `amp` (CUDA): bf16 autocast in the measured steps and the meter, as the trainer does on CUDA.
    """
    fit_batches = sorted({int(b) for b in fit_batches})
    if len(fit_batches) < 2 or fit_batches[0] < 2:
        raise ValueError("fit_batches needs at least two different batch sizes >= 2")
    policy = str(CompressionPolicy.parse(policy))
    model, dev = _placed(model_name, num_classes, stem, device)
    before = model_policy(model)
    try:
        compress_model(model, policy)
        saved = []
        for b in fit_batches:
            x, y = _random_batch(b, size, num_classes, dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                saved.append(forward_saved_bytes(model, x, y).total_bytes)
            del x, y
        state = model_state_bytes(model, optimizer)
        plan = MemoryPlan(model=_model_label(model_name), policy=policy, size=size, optimizer=optimizer, stem=stem,
                          device=str(dev), fit_batches=fit_batches, saved_bytes=saved,
                          saved_fit=_linear_fit(fit_batches, saved), model_state=state)
        if dev.type == "cuda":
            plan.peak_fit_batches = sorted({int(b) for b in cuda_fit_batches})
            plan.peak_bytes = [cuda_training_peak(model, b, size, num_classes, optimizer, dev, amp=amp)
                               for b in plan.peak_fit_batches]
            plan.peak_fit = _linear_fit(plan.peak_fit_batches, plan.peak_bytes)
            plan.overhead_bytes = plan.peak_fit[0] - state["total"]
    finally:
        _restore_policy(model, before)
    return plan


def _placed(model_name, num_classes: int, stem: str, device) -> tuple[nn.Module, torch.device]:
    """A fresh model on `device`, or a given module where it already is."""
    if isinstance(model_name, nn.Module):
        p = next(model_name.parameters(), None)
        return model_name, (p.device if p is not None else torch.device("cpu"))
    dev = torch.device(device)
    return _build(model_name, num_classes, stem).to(dev), dev


def _restore_policy(model: nn.Module, before: CompressionPolicy) -> None:
    if before == CompressionPolicy():
        decompress_model(model)
    else:
        compress_model(model, before)


def _optimizer(model: nn.Module, optimizer: str):
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer in ("sgd", "sgd-nesterov"):
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=optimizer == "sgd-nesterov")
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if optimizer == "none":
        return None
    raise ValueError(f"unknown optimizer {optimizer!r}; use sgd, sgd-nesterov, adamw or none")


def cuda_training_peak(model: nn.Module, batch: int, size: int, num_classes: int, optimizer: str = "sgd",
                       device=None, amp: bool = False) -> int:
    """`max_memory_allocated` over one full training step (forward, loss, backward, optimiser
    step), with the optimiser state already allocated by an untimed warm-up step.

    Runs on `model` itself (no second copy on the GPU) and puts its weights, buffers and
    `.grad` back afterwards. The figure is process-wide: whatever else the process holds on the
    device counts too. `amp`: bf16 autocast, as the trainer uses on CUDA.
    """
    dev = torch.device(device or "cuda")
    model.to(dev)
    was_training = model.training
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    grads = {p: p.grad for p in model.parameters()}
    for p in model.parameters():
        p.grad = None
    model.train()
    x, y = _random_batch(batch, size, num_classes, dev)
    held = {"opt": _optimizer(model, optimizer), "x": x, "y": y}  # cleared before empty_cache
    del x, y

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(held["x"]), held["y"])
        loss.backward()
        if held["opt"] is not None:
            held["opt"].step()
            held["opt"].zero_grad(set_to_none=True)
        else:
            for p in model.parameters():
                p.grad = None

    try:
        step()  # warm-up: optimiser state, allocator and library workspaces settle
        return int(cuda_step_peak_bytes(step, dev)["peak_bytes"])
    finally:
        held.clear()
        model.load_state_dict(state)
        for p, g in grads.items():
            p.grad = g
        model.train(was_training)
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


def largest_batches(model_name, policies=LADDER_POLICIES, budgets_gb=(4, 8, 12, 16, 24, 80), size: int = 32,
                    optimizer: str = "sgd", stem: str = "cifar", device="cpu", fit_batches=(8, 16, 24, 32),
                    num_classes: int = 10) -> list[dict]:
    """A table: for each policy and budget (GiB), the largest batch the planner predicts fits.

    Rows: {"policy", "budget_gb", "largest_batch", "bytes_per_image", "fixed_bytes", "measure"}.
    """
    rows = []
    for p in policies:
        plan = plan_memory(model_name, p, size=size, optimizer=optimizer, stem=stem, fit_batches=fit_batches,
                           device=device, num_classes=num_classes)
        for gb in budgets_gb:
            rows.append({"model": plan.model, "policy": plan.policy, "budget_gb": gb,
                         "largest_batch": largest_batch(plan, gb * GIB), "bytes_per_image": plan.bytes_per_image,
                         "fixed_bytes": plan.predict(0), "measure": plan.measure})
    return rows
