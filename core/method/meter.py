"""What training memory is, measured (docs/fidelity_and_memory.md).

- saved activations: distinct bytes of the tensors autograd keeps for backward during one
  forward pass, via `saved_tensors_hooks`, deduplicated by storage, parameters excluded.
  Exact and device-independent: it works on a laptop CPU. Packed storage (masks, codes) is
  counted at the bytes it really holds.
- model state: parameters + gradients + optimiser state.
- peak: on CUDA `torch.cuda.max_memory_allocated` over a training step; on the CPU the peak
  of live tensor bytes during a step from torch.profiler's memory timeline.
Process RSS is deliberately not used: the allocator keeps freed blocks.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .activations import SMOOTH
from .checkpointing import checkpoint_listeners
from .snapshot import preserved

KINDS = ("conv input", "BN input", "norm input", "ReLU state", "activation state", "linear input", "scale input",
         "checkpoint input", "left exact", "other")


def _kind_of(module: nn.Module | None, left_exact: bool = False) -> str:
    """What a tensor saved while `module` ran is, for the ladder: by the module's type."""
    if left_exact:
        return "left exact"  # compress_model(..., unsupported="exact") did not compress it
    if isinstance(module, nn.Conv2d):
        return "conv input"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "BN input"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return "norm input"
    if isinstance(module, nn.ReLU):
        return "ReLU state"
    if isinstance(module, (nn.Hardtanh, nn.LeakyReLU, *SMOOTH)):
        return "activation state"
    if isinstance(module, nn.Linear):
        return "linear input"
    if getattr(module, "pp_bits", None) is not None and len(list(module.children())):
        return "scale input"  # squeeze-excitation or layer scale, compressed
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
        self._left_exact: set[str] = set()
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
        kind = kind or _kind_of(module, name in self._left_exact)
        n = storage.nbytes()
        self.by_layer[name] += n
        self.by_layer_kind[name][kind] += n
        self.by_kind[kind] += n
        self.tensors += 1

    def _pack(self, t):
        # A detached view (same storage, same version counter, no grad_fn): handing autograd the
        # tensor itself makes a cycle for a saved *output* (ReLU keeps its result: tensor ->
        # grad_fn -> saved tensor) through C++ objects Python's collector cannot see, so a graph
        # dropped without backward was never freed (seen on CUDA). The bytes are the same.
        self._record(t)
        return t.detach() if isinstance(t, torch.Tensor) else t

    def _enter_hook(self, name):
        def hook(module, args):
            if threading.get_ident() == self._thread:  # a shared model run elsewhere meanwhile is not ours
                self._stack.append((name, module))
        return hook

    def _exit_hook(self, module, args, output):
        if threading.get_ident() == self._thread:
            self._stack.pop()

    def __enter__(self):
        # every module but the model itself: a tensor saved by a block's own forward (a
        # squeeze-excitation's product, a checkpointed block's input) is the block's
        self._thread = threading.get_ident()  # saved-tensor hooks and checkpoint listeners are per thread too
        self._left_exact = set(getattr(self.model, "pp_uncompressed", []) or [])
        for name, m in self.model.named_modules():
            if name:
                self._handles.append(m.register_forward_pre_hook(self._enter_hook(name)))
                self._handles.append(m.register_forward_hook(self._exit_hook))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        self._listener = lambda t: self._record(t, "checkpoint input")
        checkpoint_listeners().append(self._listener)
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        checkpoint_listeners().remove(self._listener)
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
    """Run one training-mode forward (and the loss) and report what it keeps for backward.

    The graph is dropped without running backward (the meter only needs the forward), which
    frees what it saved; `.grad` is never touched, and buffers (BatchNorm statistics) and the
    train/eval mode are restored, so the model is left as it was.
    """
    with preserved(model, grads=False, policy=False):
        model.train()
        with SavedActivationMeter(model) as meter:
            out = model(inputs)
            loss = nn.functional.cross_entropy(out, targets) if targets is not None else out.float().sum()
        del out, loss  # frees the graph and what it saved
    return meter.report()


def optimizer_state_bytes_per_param(optimizer: str) -> int:
    """fp32 buffers an optimiser keeps per parameter element (SGD momentum 1, AdamW 2)."""
    return {"sgd": 1, "sgd-nesterov": 1, "adamw": 2, "none": 0}[optimizer]


def model_state_bytes(model: nn.Module, optimizer: str = "sgd", step_in_backward: bool = False) -> dict[str, int]:
    """Parameters + gradients + optimiser state, in bytes. With the optimiser step in the
    backward (core/engine/step_in_backward.py) one gradient at a time: the largest."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes = [p.numel() * p.element_size() for p in model.parameters() if p.requires_grad]
    grads = max(sizes, default=0) if step_in_backward else sum(sizes)
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


def cpu_step_peak_bytes(step_fn, where: bool = False) -> dict:
    """Peak of live tensor bytes allocated during `step_fn` on the CPU (transients included).

    From the CPU allocator's events that torch.profiler records with `profile_memory=True`:
    each `[memory]` event is one allocation (+bytes) or free (-bytes); their running sum in
    time order is the live total above what existed before the step. (The events must be
    sorted: forward and backward run on different threads.) Checked against the meter in
    tests: the peak is never below the saved-activation bytes of the same step.

    `where`: also "at_peak", what was alive at that instant among the step's own allocations,
    grouped by the op that made it (`peak_makers`).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    if where:
        return _peak_makers(prof)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _t, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return {"step_peak_bytes": peak, "net_bytes": live}


_WRAPPERS = ("## Call CompiledFxGraph", "Torch-Compiled Region", "CompiledFunction")  # torch.compile's frames


def _maker(event) -> str:
    """Who made an allocation: the outermost ATen op around it ("compiled" inside a compiled
    region), and the first named frame outside that (an autograd node in the backward, a
    Function or a module's forward), e.g. "aten::conv_transpose2d in CompressedConvFunctionBackward"."""
    op, node = None, event.parent
    while node is not None:
        name = node.name
        if name.startswith("aten::"):
            op = name
        elif name.startswith(_WRAPPERS):
            op = "compiled"
        else:
            context = name.removeprefix("autograd::engine::evaluate_function: ")
            return f"{op} in {context}" if op else context
        node = node.parent
    return op or "?"


def _peak_makers(prof) -> dict:
    """The step peak from the profiler's event tree, with the allocations alive at it by maker."""
    try:  # the tree carries each allocation's address; a private API of the pinned torch
        from torch._C._profiler import _EventType
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except (ImportError, AttributeError) as e:
        raise ValueError(f"where the step peak is needs the profiler's event tree, which torch "
                         f"{torch.__version__} lacks ({e})") from e
    allocations = []
    stack = list(tree)
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size, event))
    allocations.sort(key=lambda a: a[:3])
    live_now, live, peak, at_peak = {}, 0, 0, {}
    for _t, ptr, size, event in allocations:
        if size > 0:
            live_now[ptr] = (size, event)
        else:
            live_now.pop(ptr, None)  # a free of what existed before the step is in `live` only
        live += size
        if live > peak:
            peak, at_peak = live, dict(live_now)
    groups: dict[str, list[int]] = {}
    for size, event in at_peak.values():
        groups.setdefault(_maker(event), []).append(size)
    makers = sorted(({"made_by": m, "tensors": len(v), "bytes": sum(v)} for m, v in groups.items()),
                    key=lambda g: -g["bytes"])
    return {"step_peak_bytes": peak, "net_bytes": live, "at_peak": makers}


def largest_makers(at_peak: list[dict], most: int = 8, share: float = 0.0, peak: int = 0) -> list[dict]:
    """The `most` largest groups of `at_peak` (cpu_step_peak_bytes(where=True)) holding at least
    `share` of `peak` each, then one group "other (N ops)" (with "other": True) summing the rest."""
    shown = [g for g in at_peak if g["bytes"] >= share * peak][:most]
    rest = at_peak[len(shown):]
    if rest:
        shown.append({"made_by": f"other ({len(rest)} ops)", "tensors": sum(g["tensors"] for g in rest),
                      "bytes": sum(g["bytes"] for g in rest), "other": True})
    return shown


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
