"""Streaming video: STC's cacher (`stc-cache`) and pruner (`stc-prune`), and `StreamingSession`."""

from .cacher import CacherState, STCCache
from .pruner import PrunerMemory, STCPrune
from .session import StreamingSession

__all__ = ["CacherState", "PrunerMemory", "STCCache", "STCPrune", "StreamingSession"]
