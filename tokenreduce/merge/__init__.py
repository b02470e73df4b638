"""Reducers that merge tokens."""

from .aim import AIMMerge, bipartite_merge
from .window import MustDropVision, window_similarity

__all__ = ["AIMMerge", "MustDropVision", "bipartite_merge", "window_similarity"]
