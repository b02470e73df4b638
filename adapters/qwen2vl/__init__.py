"""Qwen2-VL and Qwen2.5-VL adapters (3-D M-RoPE positions selected at the kept tokens)."""

from .qwen2vl import Qwen2VLAdapter, Qwen25VLAdapter

__all__ = ["Qwen25VLAdapter", "Qwen2VLAdapter"]
