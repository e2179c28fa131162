"""A block of pairs in memory, and the checksums a shard records of it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from reflowpairs.store.layout import ARRAYS, DTYPES


@dataclass
class Pairs:
    """A block of pairs: ``x0`` (n, T, D0) f32, ``x1`` (n, T, D1) f32, ``obs_index`` (n,) i64, ``sample`` (n,) i32."""

    x0: np.ndarray
    x1: np.ndarray
    obs_index: np.ndarray
    sample: np.ndarray

    def __post_init__(self):
        for name in ARRAYS:
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=DTYPES[name]))
        n = len(self.obs_index)
        if not (len(self.x0) == len(self.x1) == len(self.sample) == n):
            raise ValueError("x0, x1, obs_index and sample must have the same length")

    def __len__(self) -> int:
        return len(self.obs_index)

    def take(self, rows: np.ndarray | slice) -> Pairs:
        return Pairs(self.x0[rows], self.x1[rows], self.obs_index[rows], self.sample[rows])

    @staticmethod
    def concat(blocks: list[Pairs]) -> Pairs:
        return Pairs(*(np.concatenate([getattr(b, name) for b in blocks]) for name in ARRAYS))


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's logical content: C order, little-endian bytes of its dtype."""
    return hashlib.sha256(
        np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    ).hexdigest()


def checksums(pairs: Pairs, arrays: tuple[str, ...] = ARRAYS) -> dict[str, str]:
    """sha256 of each of ``arrays`` of ``pairs`` (the arrays a shard stores)."""
    return {name: array_sha256(getattr(pairs, name)) for name in arrays}
