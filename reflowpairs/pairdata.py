"""Stored pairs joined with their observations, for training (stage 2).

A training item is one stored pair ``(X_0, X_1)`` plus the LeRobotDataset frame it was sampled
for (looked up by ``obs_index``, the dataset's global ``index``, through ``frame_indices`` on the
full dataset). Action keys are dropped from the observation: the student trains on the stored X_1,
already in the model's normalised action space, and the dataset's own action must never reach the
normaliser in its place.

Pairs are addressed by a *global pair id*: shards in manifest order, rows in shard order
(``StoreManifest.locate``). Reading is
shard-aware: ``PairDataset`` keeps the few shards it is working on in memory (per DataLoader worker),
and ``PairSampler`` visits the store so that only a few shards are live at a time: each epoch it
shuffles the shard order, cuts it into windows of ``window`` shards and shuffles the pairs within
each window. The order is a pure function of ``(seed, epoch)``, and the sampler can start at any
position of its endless stream, which is how a resumed run continues with the data an
uninterrupted run would have seen.

A store that does not keep X_0 (``x0.stored: false``, ``generate --x0 implicit``) is read the same way: the
shards' other columns are cached, and each item's X_0 is regenerated from ``(seed, obs_index, sample)`` when
the item is fetched (``reflowpairs.noise``, ~30 us a pair at SmolVLA's ``(50, 32)`` on one core, in the
DataLoader workers), bit for bit the X_0 an explicit store of the same run holds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from reflowpairs.errors import ReflowPairsError
from reflowpairs.pairstore import PairStore

PAIR_COLUMNS = ("x0", "x1", "obs_index", "sample")


def is_action_key(key: str) -> bool:
    """True for the dataset's action and anything derived from it (``action``, ``action.*``, ``action_is_pad``)."""
    from lerobot.utils.constants import ACTION

    return key == ACTION or key.startswith(f"{ACTION}.") or key.startswith(f"{ACTION}_")


def drop_action_keys(item: dict[str, Any]) -> dict[str, Any]:
    """A copy of a dataset item or batch without action keys (see ``is_action_key``)."""
    return {k: v for k, v in item.items() if not is_action_key(k)}


def position_lookup(frame_index: np.ndarray) -> np.ndarray:
    """``lookup[obs_index] -> dataset position`` (-1 where the dataset has no such frame).

    ``frame_index`` is ``reflowpairs.dataset.frame_indices(dataset)`` of the full dataset."""
    size = int(frame_index.max()) + 1 if len(frame_index) else 0
    lookup = np.full(size, -1, dtype=np.int64)
    lookup[frame_index] = np.arange(len(frame_index), dtype=np.int64)
    return lookup


def missing_frames(lookup: np.ndarray, obs_index: np.ndarray) -> np.ndarray:
    """The distinct ``obs_index`` values the dataset behind ``lookup`` does not hold (sorted)."""
    unique = np.unique(obs_index)
    inside = (unique >= 0) & (unique < len(lookup))
    known = np.zeros(len(unique), dtype=bool)
    known[inside] = lookup[unique[inside]] >= 0
    return unique[~known]


def epoch_order(counts: np.ndarray, seed: int, epoch: int, window: int) -> np.ndarray:
    """Global pair ids of one epoch, int64 ``(sum(counts),)``: shards shuffled, then pairs shuffled
    within consecutive windows of ``window`` shards. Pure function of its arguments."""
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    shards = rng.permutation(len(counts))
    blocks = []
    for start in range(0, len(shards), max(1, window)):
        group = shards[start : start + max(1, window)]
        ids = np.concatenate([offsets[s] + np.arange(counts[s], dtype=np.int64) for s in group])
        rng.shuffle(ids)
        blocks.append(ids)
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)


class PairSampler(Sampler[int]):
    """Endless stream of global pair ids, epoch after epoch (``epoch_order``), from position ``start``.

    Position ``p`` of the stream is the same for every ``start``: a run resumed with
    ``start = samples_seen`` continues exactly where the interrupted one stopped."""

    def __init__(self, counts: np.ndarray, seed: int, window: int, start: int = 0):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        if self.total <= 0:
            raise ReflowPairsError(
                "The pair store holds no pairs.", "Generate pairs first with `reflowpairs generate`."
            )
        self.seed, self.window, self.start = int(seed), int(window), int(start)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.total)
        while True:
            order = epoch_order(self.counts, self.seed, epoch, self.window)
            for pair_id in order[offset:]:
                yield int(pair_id)
            epoch, offset = epoch + 1, 0


class RankSlice(Sampler[int]):
    """Process ``rank`` of ``world``'s share of an endless sampler: items ``rank, rank + world, ...``.

    With a per-process batch B, global batch ``s`` is items ``[s*B*world, (s+1)*B*world)`` of the underlying
    stream, and every process takes a disjoint B of them. ``world == 1`` passes the stream through."""

    def __init__(self, sampler: Sampler[int], rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world

    def __iter__(self) -> Iterator[int]:
        for position, item in enumerate(self.sampler):
            if position % self.world == self.rank:
                yield item


class PairDataset(Dataset):
    """Item ``i`` (a global pair id) -> ``{"x0": (T, D0) f32, "x1": (T, D1) f32, "obs_index": i64,
    "sample": i32, "observation": dataset item without action keys}``.

    ``dataset`` is the full LeRobotDataset (all episodes) and ``lookup`` its ``position_lookup``.
    Shards are read whole on first use and kept in an LRU cache of ``cache_shards`` (per process, so
    per DataLoader worker); with ``PairSampler``'s windows, each shard is read about once per epoch. When the store
    does not keep X_0, the cache holds the other columns and ``x0`` is regenerated per item (``PairStore.regenerate_x0``)."""

    def __init__(self, store: PairStore, dataset, lookup: np.ndarray, cache_shards: int = 4):
        self.store = store
        self.dataset = dataset
        self.lookup = lookup
        self.counts = np.diff(store.meta.pair_ends(), prepend=0)  # pairs per shard, for PairSampler
        self.cache_shards = max(1, int(cache_shards))
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.columns = tuple(c for c in PAIR_COLUMNS if store.x0_stored or c != "x0")
        if (
            not store.x0_stored
        ):  # an unknown or irreproducible generator is refused before training, not in a worker
            store.check_x0_generator()

    def __len__(self) -> int:
        return self.store.meta.listed_pairs()

    def locate(self, pair_id: int) -> tuple[int, int]:
        """``(shard, row)`` of a global pair id (``StoreManifest.locate``; ``IndexError`` out of range)."""
        return self.store.meta.locate(pair_id)

    def shard(self, i: int) -> dict[str, np.ndarray]:
        """The stored columns of shard ``i`` (``self.columns``: no ``x0`` when the store does not keep it), from the
        cache or read once."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        data = self.store.read_stored(i, self.columns)
        self._cache[i] = data
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return data

    def __getitem__(self, pair_id: int) -> dict[str, Any]:
        shard, row = self.locate(int(pair_id))
        data = self.shard(shard)
        obs_index = int(data["obs_index"][row])
        position = int(self.lookup[obs_index]) if 0 <= obs_index < len(self.lookup) else -1
        if position < 0:
            raise ReflowPairsError(
                f"obs_index {obs_index} of shard {self.store.shards[shard]['path']} is not a frame of the dataset.",
                "Train with the dataset the store was generated from.",
            )
        sample = int(data["sample"][row])
        if "x0" in data:
            x0 = np.array(data["x0"][row], dtype=np.float32)
        else:
            x0 = self.store.regenerate_x0(np.array([obs_index]), np.array([sample]))[0]
        return {
            "x0": torch.from_numpy(x0),
            "x1": torch.from_numpy(np.array(data["x1"][row], dtype=np.float32)),
            "obs_index": obs_index,
            "sample": sample,
            "observation": drop_action_keys(self.dataset[position]),
        }
