"""Modules a layer names without owning them (compress_model's `pp_input_from`, `pp_handed_by`,
`pp_elements`): the module that made its input, the Sequential that hands it over.

Such references run across the module tree, and where a module is used twice (torchvision's
BasicBlock calls one ReLU after both of its BatchNorms) or names an ancestor (a Sequential that
hands an element its input) they close loops. Held as plain tuples, those loops kept a dropped
model's modules, and their parameters, alive until Python's cycle collector happened to run:
the app converts many models and drops them. Held weakly, a model goes when its last reference
does. Copies keep the references' meaning: a deep copy names the copied modules, a pickle the
unpickled ones.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable, Iterator

from torch import nn


class ModuleRefs:
    """A tuple of modules, held weakly: iterates over those still alive; compares equal to a
    tuple of the same modules."""

    __slots__ = ("_refs", "__weakref__")

    def __init__(self, modules: Iterable[nn.Module] = ()):
        self._refs = tuple(weakref.ref(m) for m in modules)

    def __iter__(self) -> Iterator[nn.Module]:
        for r in self._refs:
            m = r()
            if m is not None:  # dropped with whatever held it: it cannot see a call any more
                yield m

    def __len__(self) -> int:
        return len(self._refs)

    def __getitem__(self, i: int) -> nn.Module | None:
        return self._refs[i]()

    def __contains__(self, m) -> bool:
        return any(x is m for x in self)

    def __eq__(self, other) -> bool:
        if isinstance(other, (ModuleRefs, tuple)):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"ModuleRefs({', '.join(type(m).__name__ for m in self)})"

    def __reduce__(self):  # pickled as the modules themselves (pickle's memo keeps them shared)
        return ModuleRefs, (tuple(self),)

    def __deepcopy__(self, memo) -> ModuleRefs:  # the copies of the modules, made once (memo)
        return ModuleRefs(copy.deepcopy(tuple(self), memo))
