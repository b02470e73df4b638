"""Registries: reducer name -> class, and model class name -> adapter class."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from .errors import PlanError, UnsupportedModelError

if TYPE_CHECKING:
    from .plan import Reducer

_REDUCERS: dict[str, type[Reducer]] = {}
_ADAPTERS: dict[str, type] = {}

R = TypeVar("R", bound=type)


def register_reducer(cls: R) -> R:
    """Class decorator: make a reducer available by its `name` in plans and the CLI."""
    name = cls.name  # type: ignore[attr-defined]
    if not name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if name in _REDUCERS and _REDUCERS[name] is not cls:
        raise ValueError(f"reducer name {name!r} is already taken by {_REDUCERS[name].__name__}")
    _REDUCERS[name] = cls
    return cls


def reducers() -> dict[str, type[Reducer]]:
    """All registered reducers, name -> class, sorted by stage then name."""
    _load_builtin()
    return dict(sorted(_REDUCERS.items(), key=lambda kv: (int(kv[1].stage), kv[0])))


def get_reducer(name: str) -> type[Reducer]:
    _load_builtin()
    try:
        return _REDUCERS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_REDUCERS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise PlanError(f"unknown reducer {name!r}{hint} (known: {', '.join(sorted(_REDUCERS))})") from None


def register_adapter(*model_class_names: str):
    """Class decorator: the adapter serves models whose class (or a base class) has one of these names."""

    def deco(cls: R) -> R:
        for n in model_class_names:
            _ADAPTERS[n] = cls
        return cls

    return deco


def adapter_for(model) -> type:
    """The adapter class for `model`, looked up along its class hierarchy."""
    _load_builtin()
    for klass in type(model).__mro__:
        if klass.__name__ in _ADAPTERS:
            return _ADAPTERS[klass.__name__]
    raise UnsupportedModelError(
        f"no tokenreduce adapter for {type(model).__name__}; supported model classes: "
        f"{', '.join(sorted(_ADAPTERS))}"
    )


def _load_builtin() -> None:
    from . import merge, prune, stream  # noqa: F401  (registers the built-in reducers)

    try:
        import tokenreduce.adapters  # noqa: F401  (registers the built-in adapters)
    except ImportError:  # pragma: no cover - only when the package is used from a bare source tree
        pass
