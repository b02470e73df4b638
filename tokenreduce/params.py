"""Type checks every reducer's fields get from their annotations, before the reducer's own `validate`.

A reducer declares its hyperparameters as annotated dataclass fields (``window: int = 3``,
``keep: float | None = None``, ``layers: list[int] = ...``). `check_fields` holds every field to its
annotation, so no reducer has to repeat the type half of its validation and none can be fooled by a
value of the wrong kind (a string ``'no'`` for a bool that would count as true, ``True`` for an integer):

- ``bool`` takes only True/False;
- ``int`` takes integers (numpy ones too, stored as int), never bools or integral floats;
- ``float`` takes integers and floats (stored as float), never bools or NaN (inf is a float: ranges are
  each reducer's business);
- ``str`` takes strings; ``list[X]`` takes a list or tuple of X (stored as a list);
- ``X | None`` also takes None; ``Any`` and annotations it does not know are left to the reducer.

Errors are `PlanError` and name the reducer, the field and the value (shortened): one line.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any

from .errors import PlanError

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def clip(text: str, limit: int = 60) -> str:
    """`text` cut to at most `limit` characters (marked with "...."), for one readable line."""
    return text if len(text) <= limit else text[: limit - 5] + "...." + text[-1]


def short(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters so an error message stays one readable line."""
    try:
        text = repr(value)
    except Exception:  # a repr that raises must not hide the real error
        text = f"<{type(value).__name__}>"
    return clip(text, limit)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve (a test-local name): no checks for this class
        return {}


def _arms(hint: Any) -> tuple[list[Any], bool] | None:
    """The non-None members of a union annotation and whether None is allowed; None for unchecked hints."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        arms = [a for a in args if a is not type(None)]
        return arms, len(arms) < len(args)
    return [hint], False


def _describe(arm: Any) -> str:
    if typing.get_origin(arm) is list:
        (inner,) = typing.get_args(arm) or (Any,)
        return "a list of " + {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}.get(
            inner, "values")
    return _NAMES.get(arm, getattr(arm, "__name__", str(arm)))


_NO = object()  # "this arm does not take the value"


def _convert(arm: Any, value: Any) -> Any:
    """`value` as `arm` holds it, or `_NO`; raises `OverflowError` for an integer too large for a float."""
    if arm is bool:
        return value if isinstance(value, bool) else _NO
    if arm is int:
        return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else _NO
    if arm is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return _NO
        out = float(value)
        return _NO if math.isnan(out) else out
    if arm is str:
        return value if isinstance(value, str) else _NO
    if typing.get_origin(arm) is list:
        (inner,) = typing.get_args(arm) or (Any,)
        if not isinstance(value, (list, tuple)):
            return _NO
        if inner is Any:
            return list(value)
        out = [_convert(inner, x) for x in value]
        return _NO if any(x is _NO for x in out) else out
    raise TypeError(arm)  # unknown arm: the caller skips the field


def _known(arm: Any) -> bool:
    if arm in _NAMES:
        return True
    if typing.get_origin(arm) is list:
        args = typing.get_args(arm)
        return not args or args[0] is Any or args[0] in _NAMES
    return False


def check_value(owner: str, field: str, hint: Any, value: Any) -> Any:
    """`value` checked against the annotation `hint` and normalised (see the module docstring).

    Raises `PlanError` naming ``owner: field=`` when the value does not fit; returns it unchanged when the
    annotation is one this module does not check.
    """
    arms, optional = _arms(hint)
    if not arms or not all(_known(a) for a in arms):
        return value
    if value is None and optional:
        return None
    for arm in arms:
        try:
            out = _convert(arm, value)
        except OverflowError:
            raise PlanError(f"{owner}: {field}= is too large for a number, got {short(value)}") from None
        if out is not _NO:
            return out
    expected = " or ".join(dict.fromkeys(_describe(a) for a in arms))
    raise PlanError(f"{owner}: {field}= must be {expected}, got {short(value)}")


def check_fields(obj: Any) -> None:
    """Check (and normalise in place) every annotated field of the dataclass `obj` against its annotation."""
    hints = _hints(type(obj))
    owner = getattr(obj, "name", "") or type(obj).__name__
    for f in dataclasses.fields(obj):
        if f.name in hints:
            value = getattr(obj, f.name)
            new = check_value(owner, f.name, hints[f.name], value)
            if new is not value:
                object.__setattr__(obj, f.name, new)
