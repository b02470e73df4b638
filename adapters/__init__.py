"""Model adapters (installed as `tokenreduce.adapters`). Importing this package registers them."""

from .llava import LlavaAdapter

__all__ = ["LlavaAdapter"]
