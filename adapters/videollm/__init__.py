"""Video LLM adapters: Video-LLaVA, LLaVA-OneVision / LLaVA-Video, LLaVA-NeXT-Video."""

from .common import VideoSpec, video_inputs, video_pixel_values
from .next_video import LlavaNextVideoAdapter
from .onevision import LlavaOnevisionAdapter
from .video_llava import VideoLlavaAdapter

__all__ = ["LlavaNextVideoAdapter", "LlavaOnevisionAdapter", "VideoLlavaAdapter", "VideoSpec", "video_inputs",
           "video_pixel_values"]
