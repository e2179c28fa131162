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

Under data parallelism (``world`` processes) each process reads only its own shards: each epoch the seeded
shard permutation (the same on every process) is cut into ``world`` consecutive pieces of (nearly) equal pair
count, a piece may start or end inside a shard (``rank_pieces``), and process ``rank`` visits its piece in
windows as above. The pieces of one epoch together hold every pair exactly once; the order is a pure function
of ``(seed, epoch, world)``, so a run resumes exactly only with the process count it was started with.

Every shard is checked when a ``PairDataset`` first reads it (in the DataLoader worker, not before training):
row counts, shapes, dtypes and sha256 against the manifest, the store id and name it carries, and that each
``obs_index`` is a frame of the dataset. A shard that fails is never served: the item becomes a ``refused``
marker, and ``collate_pairs`` turns any batch holding one into ``{"refused": (what, hint)}``, which the training
loop raises as a ``ReflowPairsError`` before the batch reaches a step (no traceback crosses the process
boundary).

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
from torch.utils.data import Dataset, Sampler, default_collate

from reflowpairs.errors import ReflowPairsError
from reflowpairs.store.reader import PairStore


def is_action_key(key: str) -> bool:
    """True for the dataset's action and anything derived from it (``action``, ``action.*``, ``action_is_pad``)."""
    from lerobot.utils.constants import ACTION  # heavy: imported when used

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


def piece_size(total: int, rank: int, world: int) -> int:
    """Pairs in process ``rank``'s piece of every epoch: ``total`` cut into ``world`` near-equal parts (sizes differ
    by at most one): rank r holds ``[r*total//world, (r+1)*total//world)``)."""
    return (rank + 1) * total // world - rank * total // world


def rank_pieces(counts: np.ndarray, shards: np.ndarray, rank: int, world: int) -> list[tuple[int, int, int]]:
    """Process ``rank``'s piece of an epoch whose shard order is ``shards`` (a permutation of ``range(len(counts))``):
    ``[(shard, first_row, end_row), ...]`` in that order. The shards, laid end to end in that order, are cut at
    pair positions ``r * total // world``; a piece may take the end of one shard and the start of another."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    lo, hi = rank * total // world, (rank + 1) * total // world
    ends = np.cumsum(counts[shards])
    pieces = []
    for shard, end in zip(shards.tolist(), ends.tolist(), strict=True):
        start = end - int(counts[shard])
        first, last = max(start, lo), min(end, hi)
        if first < last:
            pieces.append((int(shard), first - start, last - start))
    return pieces


def epoch_order(
    counts: np.ndarray, seed: int, epoch: int, window: int, rank: int = 0, world: int = 1
) -> np.ndarray:
    """Process ``rank`` of ``world``'s global pair ids of one epoch, int64 ``(piece_size,)``: shards shuffled
    (the same permutation on every process), cut into ``world`` pieces (``rank_pieces``), then the pairs of this
    process's piece shuffled within consecutive windows of ``window`` (parts of) shards. Pure function of its
    arguments; ``world == 1`` is the whole store, every pair once. The ``world`` pieces of one epoch partition
    the store."""
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    shards = rng.permutation(len(counts))
    if world > 1:  # the permutation is shared; each process shuffles its own windows
        rng = np.random.default_rng([int(seed), int(epoch), 0x5EED, int(world), int(rank)])
    pieces = rank_pieces(counts, shards, rank, world)
    blocks = []
    for start in range(0, len(pieces), max(1, window)):
        group = pieces[start : start + max(1, window)]
        ids = np.concatenate([offsets[s] + np.arange(a, b, dtype=np.int64) for s, a, b in group])
        rng.shuffle(ids)
        blocks.append(ids)
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)


class PairSampler(Sampler[int]):
    """Endless stream of global pair ids of process ``rank`` of ``world``, epoch after epoch (``epoch_order``), from
    position ``start`` of that process's stream.

    Position ``p`` of the stream is the same for every ``start``: a run resumed with ``start = samples_seen // world``
    (every process takes the same number of pairs per step) continues exactly where the interrupted one stopped,
    with the same ``world``. Each epoch of the stream is ``piece_size`` pairs long."""

    def __init__(
        self, counts: np.ndarray, seed: int, window: int, start: int = 0, rank: int = 0, world: int = 1
    ):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        if self.total <= 0:
            raise ReflowPairsError(
                "The pair store holds no pairs.", "Generate pairs first with `reflowpairs generate`."
            )
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of {world} processes")
        self.rank, self.world = int(rank), int(world)
        self.per_epoch = piece_size(self.total, self.rank, self.world)
        if self.per_epoch <= 0:
            raise ReflowPairsError(
                f"The pair store holds {self.total} pairs, fewer than the {world} processes training on it.",
                "Train with fewer processes, or generate more pairs.",
            )
        self.seed, self.window, self.start = int(seed), int(window), int(start)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            order = epoch_order(self.counts, self.seed, epoch, self.window, self.rank, self.world)
            for pair_id in order[offset:]:
                yield int(pair_id)
            epoch, offset = epoch + 1, 0


REFUSED = "refused"  # the key of an item or batch that must not be trained on: (what, hint) of the error


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` of ``PairDataset`` items, or ``{"refused": (what, hint)}`` when any item was refused
    (a shard that failed its check): such a batch carries no pairs."""
    for item in items:
        if REFUSED in item:
            return {REFUSED: item[REFUSED]}
    return default_collate(items)


def raise_if_refused(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch``, unless ``collate_pairs`` refused it: then the ``ReflowPairsError`` it carries."""
    if REFUSED in batch:
        raise ReflowPairsError(*batch[REFUSED])
    return batch


def shard_refusal(
    store: PairStore, i: int, data: dict[str, np.ndarray], lookup: np.ndarray | None = None
) -> ReflowPairsError | None:
    """The error that keeps shard ``i`` out of training, or None when it is sound. ``data``: its stored arrays
    (``PairStore.read_stored(i, store.stored_arrays)``). Sound
    means: each array has the manifest's row count, shape, dtype and sha256 (``StoreManifest.shard_problems``),
    the shard carries the store id and name it was written with (``PairStore.origin_problem``), and, given
    ``lookup`` (``position_lookup``), every ``obs_index`` is a frame of the dataset."""
    name = store.shards[i]["path"]
    problems = [p.text for p in store.meta.shard_problems(i, data)]
    if not problems:
        try:
            origin = store.origin_problem(i)
        except Exception as err:  # noqa: BLE001 - zarr/pyarrow raise many kinds
            origin = f"its attributes cannot be read ({type(err).__name__}: {err})"
        problems = [origin] if origin is not None else []
    if problems:
        return corrupt_shard(store, i, problems)
    if lookup is not None:
        missing = missing_frames(lookup, data["obs_index"])
        if len(missing):
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            return ReflowPairsError(
                f"{len(missing)} obs_index values of shard {name} of store {store.path} are not frames of the "
                f"dataset: {shown}.",
                "Train with the dataset the store was generated from (`dataset_root`).",
            )
    return None


def corrupt_shard(store: PairStore, i: int, problems: list[str]) -> ReflowPairsError:
    """The refusal of damaged shard ``i``, naming it, what is wrong and the fix."""
    return ReflowPairsError(
        f"Pair store {store.path} is corrupt: shard {store.shards[i]['path']}: "
        + "; ".join(p.rstrip(".") for p in problems)
        + ".",
        "Do not train on it: regenerate the store (or restore that shard from a good copy). "
        "`reflowpairs validate` checks a whole store.",
    )


def read_checked(store: PairStore, i: int, lookup: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The stored arrays of shard ``i``, read once and checked (``shard_refusal``); a missing, unreadable or unsound
    shard raises the ``ReflowPairsError`` that names it."""
    try:
        data = store.read_stored(i, store.stored_arrays)
    except ReflowPairsError as err:
        raise corrupt_shard(store, i, [err.what]) from None
    refusal = shard_refusal(store, i, data, lookup)
    if refusal is not None:
        raise refusal
    return data


class PairDataset(Dataset):
    """Item ``i`` (a global pair id) -> ``{"x0": (T, D0) f32, "x1": (T, D1) f32, "obs_index": i64,
    "sample": i32, "observation": dataset item without action keys}``, or ``{"refused": (what, hint)}`` when its
    shard fails the check of its first read (``read_checked``; see ``collate_pairs``).

    ``dataset`` is the full LeRobotDataset (all episodes) and ``lookup`` its ``position_lookup``.
    Shards are read whole on first use, checked, and kept in an LRU cache of ``cache_shards`` (per process, so
    per DataLoader worker); with ``PairSampler``'s windows, each shard is read (and checked) about once per epoch
    per process that serves it. When the store does not keep X_0, the cache holds the other columns and ``x0`` is
    regenerated per item (``PairStore.regenerate_x0``)."""

    def __init__(self, store: PairStore, dataset, lookup: np.ndarray, cache_shards: int = 4):
        self.store = store
        self.dataset = dataset
        self.lookup = lookup
        self.counts = np.diff(store.meta.pair_ends(), prepend=0)  # pairs per shard, for PairSampler
        self.cache_shards = max(1, int(cache_shards))
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.columns = store.stored_arrays  # what each shard holds: no ``x0`` when the store does not keep it
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
        """The stored columns of shard ``i`` (``self.columns``), from the cache or read once and checked
        (``read_checked``: a damaged shard raises ``ReflowPairsError`` naming it and is not cached)."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        data = read_checked(self.store, i, self.lookup)
        self._cache[i] = data
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return data

    def __getitem__(self, pair_id: int) -> dict[str, Any]:
        shard, row = self.locate(int(pair_id))
        try:
            data = self.shard(shard)
        except (
            ReflowPairsError
        ) as err:  # crosses the worker boundary as data, raised by the loop (collate_pairs)
            return {REFUSED: (err.what, err.hint)}
        obs_index = int(data["obs_index"][row])
        position = int(self.lookup[obs_index])  # read_checked: every obs_index of the shard is a frame
        sample = int(data["sample"][row])
        if "x0" in data:
            x0 = np.array(data["x0"][row], dtype=np.float32)
        else:
            x0 = self.store.regenerate_x0(np.array([obs_index]), np.array([sample]))[0]
        try:
            observation = drop_action_keys(self.dataset[position])
        except ReflowPairsError as err:  # e.g. a frame the feature cache lacks (store_features.FeatureReader)
            return {REFUSED: (err.what, err.hint)}
        return {
            "x0": torch.from_numpy(x0),
            "x1": torch.from_numpy(np.array(data["x1"][row], dtype=np.float32)),
            "obs_index": obs_index,
            "sample": sample,
            "observation": observation,
        }
