"""Plain nn.Sequentials, run under compression the way a ResNet's blocks are (method/residual.py).

nn.Sequential.forward hands each element the output of the element before and keeps nothing, so
where an element's first layer follows another element's last layer (through nested plain
Sequentials: torchvision's Conv2dNormActivation inside MobileNet's and EfficientNet's blocks),
the first reads a temporary that the second made and nothing else reads. compress_model declares
those pairs, as a ResNet's forward declares its blocks' (`pp_*_read_temporaries`): a BatchNorm
then writes over its conv's output, an activation over its BatchNorm's, and an activation's
backward over the gradient its conv hands back. The declaration covers only what the declaring
Sequential's own forward hands over (layout.handing_over): a caller looping over its elements,
who may keep each output (feature taps), gets none of it, nor does a Sequential edited after
converting. Each layer still checks at every call that no hook on it, on the layer that made its
input, or on a module between them could have kept that tensor. Never declared: a layer
registered in two places, one whose forward is not PyTorch's own (a subclass may keep its
output), and an in-place activation that does not follow a fresh conv or norm output in its own
Sequential (it returns its input, which may be the caller's: pix2pix's `LeakyReLU(0.2, True)`
first in a block called as `cat([x, block(x)])`).
"""
from __future__ import annotations

import collections

from torch import nn

from .layout import handing_over


def is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


class VouchedSequential:
    """A plain Sequential's forward, handing each element's output to the next
    (layout.handing_over), while its elements are the ones compress_model planned with
    (`pp_elements`): a Sequential edited after converting runs as nn.Sequential does."""

    pp_elements: tuple[nn.Module, ...] = ()

    def forward(self, input):
        elements = tuple(self._modules.values())
        if len(elements) != len(self.pp_elements) or any(a is not b for a, b in zip(elements, self.pp_elements)):
            return nn.Sequential.forward(self, input)
        for i, module in enumerate(elements):
            if i == 0:
                input = module(input)
                continue
            with handing_over(self, input):
                input = module(input)
        return input


def _torch_forward(m: nn.Module) -> bool:
    """A leaf running PyTorch's own forward (a subclass may keep or return what it likes)."""
    return next(m.children(), None) is None and type(m).forward.__module__.startswith("torch.nn.modules.")


def _fresh(m: nn.Module) -> bool:
    """A leaf whose output is a new tensor, never its input or a view of it."""
    return isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) and _torch_forward(m)


def _end(elements: list[nn.Module], i: int, first: bool) -> tuple[nn.Module, list[nn.Module]] | None:
    """For elements[i] of a plain Sequential: the leaf that reads its input (first) or that makes
    its output, with the modules whose hooks could keep that tensor on the way (the plain
    Sequentials passed, and for an in-place activation the fresh layer whose output it
    overwrites and returns: the one before it in its Sequential); None where a module with a
    forward of its own is in between, or an in-place activation may return someone else's tensor."""
    path, m = [], elements[i]
    while is_plain_sequential(m):
        if len(m) == 0:
            return None
        path.append(m)
        elements, i = list(m._modules.values()), 0 if first else len(m) - 1
        m = elements[i]
    if not _torch_forward(m):
        return None
    if not first and getattr(m, "inplace", False):
        if i == 0 or not _fresh(elements[i - 1]):
            return None
        path.append(elements[i - 1])
    return m, path


def sequential_pairs(model: nn.Module) -> dict[str, tuple[str, nn.Module, tuple[nn.Module, ...]]]:
    """Where a plain Sequential hands one leaf's output to another leaf and nothing else: the
    reader's name -> (the name of the Sequential that vouches for it, the reader, (the maker,
    then the modules between them whose hooks could keep that tensor)). Both leaves run
    PyTorch's own forwards, and each is registered in one place only (one module called in two
    places reads two tensors). compress_model keeps the pairs whose kinds it declares."""
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    names = {id(m): n for n, m in model.named_modules()}
    found = {}
    for name, seq in model.named_modules():
        if not is_plain_sequential(seq):
            continue
        elements = list(seq._modules.values())  # in call order, a module repeated as often as it is called
        for i in range(1, len(elements)):
            end, start = _end(elements, i - 1, first=False), _end(elements, i, first=True)
            if end is None or start is None:
                continue
            (made_by, down), (reader, up) = end, start
            watched = (made_by, *down, *up)  # a hook on any of these could keep the tensor
            if all(uses[id(m)] == 1 for m in (reader, *watched)):
                found[names[id(reader)]] = (name, reader, watched)
    return found
