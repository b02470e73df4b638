"""Model adapters (installed as `tokenreduce.adapters`). Importing this package registers them."""

from .llava import LlavaAdapter, LlavaNextAdapter
from .videollm import LlavaNextVideoAdapter, LlavaOnevisionAdapter, VideoLlavaAdapter

__all__ = ["LlavaAdapter", "LlavaNextAdapter", "LlavaNextVideoAdapter", "LlavaOnevisionAdapter", "VideoLlavaAdapter"]
