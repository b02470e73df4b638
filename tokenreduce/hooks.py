"""Hooks that a `copy.deepcopy` of the model leaves behind: an attached plan belongs to one model instance.

`torch` keeps forward hooks in plain dicts on each module, so a deep copy of a hooked model carries the hooks
along. A hook that is a bound method would drag a copy of its owner (the whole pipeline) into the copy; a
plain function would keep calling the original's state. Every hook tokenreduce registers is therefore a
`Hook`, which a deep copy turns into a no-op, and `strip_copies` removes those no-ops from the copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.hooks import RemovableHandle


class Hook:
    """A hook function that becomes `inert` in a deep copy (see the module docstring)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Hook:
        return INERT


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


INERT = Hook(_nothing)


def strip_copies(handles: list[RemovableHandle], memo: dict) -> None:
    """Remove, from a finished deep copy, the entries that `handles` registered on the original modules.

    `memo` is the deep copy's memo: it maps every copied hook dict of the original to its copy.
    """
    for h in handles:
        refs = [h.hooks_dict_ref, *getattr(h, "extra_dict_ref", ())]
        for ref in refs:
            original = ref()
            if original is None:
                continue
            copied = memo.get(id(original))
            if copied is not None and copied is not original:
                copied.pop(h.id, None)
