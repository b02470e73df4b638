"""Reducers that merge tokens."""

from .aim import AIMMerge, BipartiteMerge, bipartite_merge
from .window import MustDropVision, window_similarity

__all__ = ["AIMMerge", "BipartiteMerge", "MustDropVision", "bipartite_merge", "window_similarity"]
