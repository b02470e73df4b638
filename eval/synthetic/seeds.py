"""Seeds, splits and answer-letter balance.

- Every item is generated from its own random stream `item_rng(seed, split, kind, index)`, so item `i` is the
  same whether 10 or 10,000 items are made, a restarted run can skip finished items, and shards can run apart.
- `split_seed` derives a different seed per split from the base seed and the split's name.
- Splits are also disjoint by construction: a scene's canonical description hashes (seed-independently) to a
  bucket, 10% of buckets belong to `test`, 10% to `validation` and 80% to `train`, and a generator draws scenes
  until one falls in its split's buckets. So no test scene can appear in training, whatever seeds are used.
- Answer letters are exactly balanced in every block of four consecutive items (a random permutation of
  A-D per block).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

SPLITS: tuple[str, ...] = ("train", "validation", "test")
LETTERS = "ABCD"
#: item kinds with their own random streams
KINDS = {"image": 1, "video": 2}
_LETTER_STREAM = 7


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@lru_cache(maxsize=64)
def split_seed(seed: int, split: str) -> int:
    """A 63-bit seed for `split`, derived deterministically from the base `seed` and the split's name."""
    check_split(split)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    digest = hashlib.sha256(f"tokenreduce.eval.synthetic/{int(seed)}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def item_rng(seed: int, split: str, kind: str, index: int) -> np.random.Generator:
    """The random stream of item `index` of `kind` ("image" or "video") in `split`."""
    return np.random.default_rng([split_seed(seed, split), KINDS[kind], index])


def balanced_letter(seed: int, split: str, kind: str, index: int) -> int:
    """Index (0-3) of the correct option of item `index`: each block of four items uses each letter once."""
    block, pos = divmod(index, 4)
    perm = np.random.default_rng([split_seed(seed, split), KINDS[kind], _LETTER_STREAM, block]).permutation(4)
    return int(perm[pos])


def scene_split(key: str) -> str:
    """The split that owns a scene, from its canonical description `key` (independent of any seed)."""
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"
