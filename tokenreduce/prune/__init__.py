"""Reducers that drop tokens."""

from .baselines import Pool, RandomDrop, pool_assignment
from .hired import HiRED

__all__ = ["HiRED", "Pool", "RandomDrop", "pool_assignment"]
