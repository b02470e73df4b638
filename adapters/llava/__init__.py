"""LLaVA-family adapters."""

from .llava15 import LlavaAdapter

__all__ = ["LlavaAdapter"]
