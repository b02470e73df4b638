"""Backend choice for the kernels: one rule for every operation.

``backend="torch"`` runs the pure-torch reference, ``"triton"`` the Triton kernel (CUDA tensors, or any tensor
under ``TRITON_INTERPRET=1``, Triton's CPU interpreter), and ``"auto"`` Triton when it is installed and every
tensor is on a CUDA device, torch otherwise. `use_backend` changes what ``"auto"`` means inside a ``with``
block (the reducers call the kernels with ``"auto"``; a test or benchmark forces a backend this way).

Triton kernels are compiled (``triton.jit``) on their first use, not at import, and once per value of
``TRITON_INTERPRET``: the variable only has to be set before the first Triton call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..errors import TokenReduceError

BACKENDS = ("auto", "torch", "triton")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("tokenreduce_kernel_backend", default=None)


class KernelError(TokenReduceError):
    """A kernel asked for with a backend this machine cannot run, or inputs of the wrong shape or type."""


@functools.cache
def triton_available() -> bool:
    """Whether the `triton` package is importable (installed with ``pip install 'tokenreduce[triton]'``)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Inside the block, ``backend="auto"`` means `backend` ("torch" or "triton") for every kernel call."""
    if backend not in BACKENDS:
        raise KernelError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    token = _override.set(None if backend == "auto" else backend)
    try:
        yield
    finally:
        _override.reset(token)


def resolve(backend: str, op: str, *tensors: Tensor | None) -> str:
    """The backend ("torch" or "triton") that runs `op` on `tensors` (None entries are ignored)."""
    if backend not in BACKENDS:
        raise KernelError(f"{op}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = _override.get() or "auto"
    ts = [t for t in tensors if t is not None]
    on_cuda = bool(ts) and all(t.is_cuda for t in ts)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "torch":
        return "torch"
    if not triton_available():
        raise KernelError(f"{op}: backend='triton' needs the triton package: pip install 'tokenreduce[triton]'")
    if not on_cuda and not interpreting():
        raise KernelError(
            f"{op}: backend='triton' runs on CUDA tensors; on CPU set TRITON_INTERPRET=1 (Triton's interpreter, "
            "for tests) or use backend='torch'"
        )
    return "triton"


def jit(fn: Callable[..., Any]) -> Any:
    """`triton.jit(fn)`, built on first use and once per TRITON_INTERPRET value."""
    return _jit(fn, interpreting())


@functools.cache
def _jit(fn: Callable[..., Any], interpret: bool) -> Any:
    import triton

    return triton.jit(fn)


def check_tensor(op: str, name: str, t: Any, ndim: int | tuple[int, ...], floating: bool = True) -> Tensor:
    """`t` as a tensor with `ndim` dimensions (and a floating dtype), or a `KernelError` naming it."""
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if not isinstance(t, Tensor):
        raise KernelError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        raise KernelError(f"{op}: {name} must have {' or '.join(map(str, dims))} dimensions, got shape "
                          f"{tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise KernelError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    return t


def check_mask(op: str, name: str, mask: Any, shape: tuple[int, ...], device: torch.device) -> Tensor | None:
    """A boolean mask of `shape` on `device`, or None."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise KernelError(f"{op}: {name} must be a bool tensor, got "
                          f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise KernelError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.to(device)


def next_pow2(n: int, floor: int = 16) -> int:
    """The smallest power of two >= max(n, floor)."""
    p = floor
    while p < n:
        p *= 2
    return p
