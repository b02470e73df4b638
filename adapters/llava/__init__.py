"""LLaVA-family adapters: LLaVA-1.5 and LLaVA-NeXT (anyres)."""

from .llava15 import LlavaAdapter
from .llava_next import LlavaNextAdapter

__all__ = ["LlavaAdapter", "LlavaNextAdapter"]
