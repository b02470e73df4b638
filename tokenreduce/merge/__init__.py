"""Reducers that merge tokens."""

from .aim import AIMMerge, bipartite_merge

__all__ = ["AIMMerge", "bipartite_merge"]
