"""Reducers that drop tokens."""

from .baselines import Pool, RandomDrop, pool_assignment

__all__ = ["Pool", "RandomDrop", "pool_assignment"]
