"""Memory layout of activations: the memory order of a (N, C, H, W) tensor, what packed storage
(masks, codes) follows so that packing never transposes (NCHW, or NHWC for channels_last); and
whether a layer may write over its input (autograd allows it, and no hook on the module that
made it could have kept it) or a backward over its incoming gradient (the gradient is its alone)."""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn
from torch.nn.modules import module as torch_module


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def is_dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill its storage densely in NCHW or channels_last order (no element
    shared or skipped: it may be written chunk by chunk, or taken as its own memory order)."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def in_memory_order(t: torch.Tensor, channels_last: bool) -> bool:
    """Whether t's elements lie densely in that memory order (its memory-order view is t's own
    storage, so writing the view writes t)."""
    return t.is_contiguous(memory_format=torch.channels_last if channels_last and t.dim() == 4
                           else torch.contiguous_format)


def memory_order_flat(t: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
    """The elements in memory order, as a 1-D tensor (a view when `t` has that layout;
    `channels_last` defaults to t's own)."""
    cl = is_channels_last(t) if channels_last is None else channels_last
    return t.permute(0, 2, 3, 1).reshape(-1) if cl else t.reshape(-1)


def from_memory_order(flat: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    """Inverse of memory_order_flat: a (N, C, H, W) view of `flat` in the given layout."""
    if channels_last:
        b, c, h, w = shape
        return flat.view(b, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


def may_overwrite(x: torch.Tensor) -> bool:
    """Whether autograd lets x be changed in place: not a view that a custom Function or a
    multi-output op made. A full backward hook on the module before
    (register_full_backward_hook) hands its output on as such a view; a mask ReLU or BatchNorm then
    runs out of place (the same mask and gradients; the forward holds one more tensor), where a plain
    nn.ReLU(inplace=True) raises. Ordinary views (slices) are overwritten as PyTorch would."""
    if x._base is None:
        return True
    try:
        return torch._C._autograd._get_creation_meta(x) == torch._C._autograd.CreationMeta.DEFAULT
    except AttributeError:  # a torch without the (private) query: views stay intact
        return False


def called_plainly(module: nn.Module) -> bool:
    """Whether calling `module` runs just its forward: no hooks on it and none global (the test
    nn.Module.__call__ makes before its own fast path), and not compiled (`module.compile()`)."""
    m = torch_module
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks
                or getattr(module, "_compiled_call_impl", None) is not None)


_vouching = threading.local()


@contextlib.contextmanager
def vouched_forward():
    """A model's own forward runs in here where it declares what its layers read
    (`pp_*_read_temporaries`): only inside it may a layer write over its input or grant its
    gradient. A layer called on its own, by a caller who may still hold its input, does neither."""
    depth = getattr(_vouching, "depth", 0)
    _vouching.depth = depth + 1
    try:
        yield
    finally:
        _vouching.depth = depth


def in_vouched_forward() -> bool:
    return getattr(_vouching, "depth", 0) > 0


@contextlib.contextmanager
def handing_over(sequential: nn.Module, x: torch.Tensor):
    """A plain Sequential's forward hands x, the output of one element, to the next and keeps
    nothing (method/sequential.py): inside, the layer that element begins with reads x alone."""
    handed = _vouching.__dict__.setdefault("handed", [])
    handed.append((id(sequential), id(x)))  # x is alive throughout: its id names it
    try:
        yield
    finally:
        handed.pop()


def reads_vouched(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether this call of `layer` is one its declaration covers: where a plain Sequential
    declared it (`pp_handed_by`), x must be what that Sequential's forward is handing over (a
    caller looping over the Sequential's elements, who may keep each output, is not it);
    elsewhere, inside the forward of the model that declared it (vouched_forward)."""
    by = getattr(layer, "pp_handed_by", ())
    if by:
        return (id(by[0]), id(x)) in getattr(_vouching, "handed", ())
    return in_vouched_forward()


def grant_gradient(x: torch.Tensor) -> None:
    """Called for x's only reader (the model vouches for it, and the reader may write over x),
    whose backward hands x's maker a fresh gradient that nothing else holds: where the maker is a
    Function of ours (`ctx.grad_granted`), its backward may write over that gradient, and the
    backward holds one full-size tensor fewer at a time. The caller checks that no hook on the
    reader, or on the module that made x, could have kept x (and so hooked its gradient)."""
    node = x.grad_fn
    if node is not None and getattr(node, "grad_granted", None) is False:
        node.grad_granted = True


def may_overwrite_grad(ctx, g: torch.Tensor) -> bool:
    """Whether a backward may write over its incoming gradient g: granted (grant_gradient), and
    not building a graph of the backward (create_graph). The caller checks that g is dense in
    the layout it writes (nothing of it shared between elements)."""
    return getattr(ctx, "grad_granted", False) and not torch.is_grad_enabled()
