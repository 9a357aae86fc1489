"""The fast path: the element-wise passes of the compressed layers (coding, masks, low-precision
BatchNorm), each written once in PyTorch and run as one fused loop where possible.

Every pass registered here with `@fused` is the reference: plain PyTorch, any device, what the
tests check the method against. `use_compiled(True)` swaps in torch.compile'd versions (static
shapes: inductor writes one vectorised C++ loop per pass and shape, compiled once per process
and cached on disk). On CUDA, passes with a Triton kernel (core.method.kernels) run that
kernel instead; a kernel returns NotImplemented for what it cannot do (a dtype, an older
card), and the pass's other version runs. Compiled and Triton element-wise passes are
bit-identical to the reference (tested; Triton under TRITON_INTERPRET=1 on the CPU); compiled
and Triton reductions (BatchNorm's backward) sum in another order and match it to float32
rounding. The trainer and the benchmarks switch the fast path on; POOLPROP_COMPILE=0 keeps the
reference everywhere. A pass is compiled once per shape, for up to 256 shapes in a process
(dynamo's recompile limit, raised here); past that it runs eagerly, with the same bits but the
reference's time and memory (a training run uses a handful; the whole test suite, more).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

_reference: dict[str, Callable] = {}
_active: dict[str, Callable] = {}
_triton: dict[str, Callable] = {}
_triton_on = {"on": True}


def _on_triton_device(t) -> bool:
    """Whether a call with this first argument goes to a Triton kernel's device (CUDA)."""
    return isinstance(t, torch.Tensor) and t.is_cuda


def fused(fn: Callable) -> Callable:
    """Register `fn` as a pass; calls go to its active version (reference, compiled or Triton)."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    _reference[name] = _active[name] = fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _triton_on["on"] and _on_triton_device(args[0]) and _load_kernels() and name in _triton:
            out = _triton[name](*args, **kwargs)
            if out is not NotImplemented:  # a kernel declines what it cannot do (a dtype, an older card)
                return out
        return _active[name](*args, **kwargs)

    call.reference = fn
    call.pass_name = name
    return call


def use_compiled(on: bool = True) -> bool:
    """Compile every pass (True) or go back to the reference (False). Returns whether compiled
    passes run now; False with a warning where compiling is impossible (no C++ compiler): the
    reference then runs, which keeps exactly the same bytes, only slower."""
    if not on:
        _active.update(_reference)
        return False
    try:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        compiled = {k: torch.compile(f, dynamic=False) for k, f in _reference.items()}
        probe = torch.compile(lambda t: t * 2 + 1, dynamic=False)
        probe(torch.ones(4))  # a missing compiler fails here, not mid-step
    except Exception as e:  # noqa: BLE001 - any compiler problem: keep the reference passes
        warnings.warn(f"compiled passes unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                      "using the PyTorch reference (same bytes, slower)", stacklevel=2)
        _active.update(_reference)
        return False
    _active.update(compiled)
    return True


def use_compiled_on(device) -> bool:
    """The fast path where it is wanted: compiled passes on the CPU unless POOLPROP_COMPILE=0
    (CUDA runs Triton kernels where they exist, the reference elsewhere). Returns whether
    compiled passes run now."""
    if torch.device(device).type != "cpu" or os.environ.get("POOLPROP_COMPILE", "1") == "0":
        return compiled_in_use()
    return use_compiled(True)


def compiled_in_use() -> bool:
    return any(_active[k] is not _reference[k] for k in _reference)


@functools.cache
def _load_kernels() -> bool:
    """Import the Triton kernels on the first CUDA call."""
    if not triton_available():
        return False
    from .kernels import KERNELS

    _triton.update(KERNELS)
    return True


def use_triton(on: bool = True) -> None:
    """Triton kernels on CUDA (default) or the PyTorch reference there too (to compare)."""
    _triton_on["on"] = bool(on)


def triton_on() -> bool:
    """Whether CUDA calls go to the Triton kernels (use_triton)."""
    return _triton_on["on"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
