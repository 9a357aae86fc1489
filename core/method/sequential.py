"""Plain nn.Sequentials, run under compression the way a ResNet's blocks are (method/residual.py).

nn.Sequential.forward hands each element the output of the element before and keeps nothing, so
where an element's first layer follows another element's last layer (through nested plain
Sequentials: torchvision's Conv2dNormActivation inside MobileNet's and EfficientNet's blocks),
the first reads a temporary that the second made and nothing else reads. compress_model declares
those pairs, as a ResNet's forward declares its blocks' (`pp_*_read_temporaries`): a BatchNorm
then writes over its conv's output, an activation over its BatchNorm's, and an activation's
backward over the gradient its conv hands back. The declaration covers only what the declaring
Sequential's own forward hands over (layout.handing_over): a caller looping over its elements,
who may keep each output (feature taps), gets none of it. Each layer still checks at every call
that no hook on it, on the layer that made its input, or on a Sequential between them could have
kept that tensor; a layer called in two places is never declared.
"""
from __future__ import annotations

import collections

from torch import nn

from .layout import handing_over


def is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


class VouchedSequential:
    """A plain Sequential's forward, handing each element's output to the next
    (layout.handing_over) where `sequential_inputs` found a pair it vouches for."""

    def forward(self, input):
        for i, module in enumerate(self):
            if i == 0:
                input = module(input)
                continue
            with handing_over(self, input):
                input = module(input)
        return input


def _end(m: nn.Module, first: bool) -> tuple[nn.Module, list[nn.Module]] | None:
    """The leaf that reads m's input (first) or makes m's output, and the plain Sequentials
    passed on the way down; None where a module with a forward of its own is in between."""
    path = []
    while is_plain_sequential(m):
        if len(m) == 0:
            return None
        path.append(m)
        m = m[0] if first else m[-1]
    if next(m.children(), None) is not None:
        return None
    return m, path


def sequential_inputs(model: nn.Module, layer, maker) -> dict[str, tuple[str, tuple[nn.Module, ...]]]:
    """Where a plain Sequential hands the output of a `maker` leaf to a `layer` leaf and nothing
    else: layer name -> (the name of the Sequential that vouches for it, (the maker, then the
    Sequentials between them: each a module whose hook could keep that tensor))."""
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    names = {id(m): n for n, m in model.named_modules()}
    found = {}
    for name, seq in model.named_modules():
        if not is_plain_sequential(seq):
            continue
        elements = list(seq._modules.values())  # in call order, a module repeated as often as it is called
        for before, after in zip(elements, elements[1:]):
            end, start = _end(before, first=False), _end(after, first=True)
            if end is None or start is None:
                continue
            (made_by, down), (reader, up) = end, start
            between = [*down, *up]
            if (isinstance(reader, layer) and isinstance(made_by, maker)
                    and all(uses[id(m)] == 1 for m in (reader, made_by, *between))):
                found[names[id(reader)]] = (name, (made_by, *between))
    return found
