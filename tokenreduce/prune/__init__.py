"""Reducers that drop tokens."""

from .aim_prune import AIMPrune
from .baselines import Pool, RandomDrop, pool_assignment
from .hired import HiRED
from .mustdrop import MustDrop, MustDropDecode, MustDropPrefill
from .quota import ClipScorer, QuoTA

__all__ = ["AIMPrune", "ClipScorer", "HiRED", "MustDrop", "MustDropDecode", "MustDropPrefill", "Pool", "QuoTA",
           "RandomDrop", "pool_assignment"]
