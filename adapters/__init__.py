"""Model adapters (installed as `tokenreduce.adapters`). Importing this package registers them."""

from .llava import LlavaAdapter, LlavaNextAdapter
from .qwen2vl import Qwen2VLAdapter, Qwen25VLAdapter
from .videollm import LlavaNextVideoAdapter, LlavaOnevisionAdapter, VideoLlavaAdapter

__all__ = ["LlavaAdapter", "LlavaNextAdapter", "LlavaNextVideoAdapter", "LlavaOnevisionAdapter", "Qwen25VLAdapter",
           "Qwen2VLAdapter", "VideoLlavaAdapter"]
