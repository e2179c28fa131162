"""The feature cache's storage: per-frame features kept beside a pair store (docs/feature-cache.md), its index, shards,
reader, writer, merge and the check of what is stored. What the features are and which policy may use them (capture,
the student's check, the recompute spot check) is ``reflowpairs.cached_features``.

Layout (its own index, beside the pair store's manifest, which it does not touch)::

    OUT/features/index.json            what was cached, from which weights, dtype, shape, bytes/frame, shards
    OUT/features/<name>.zarr           obs_index (n,) int64, features (n, S, N, D)

Shards are written as pair shards are (``store.shards.write_shard``: temp name, fsync, rename) and listed in the index
(rewritten atomically, ``atomic.write_json_atomically``) only once complete, each with sha256 checksums of its arrays
(``store.pairs.array_sha256``). ``bfloat16`` features are stored as their raw 16-bit patterns (numpy has no bfloat16).
Features are ``(S, N, D)`` per frame: S camera slots of N tokens of width D.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from reflowpairs.atomic import TMP_PREFIX, load_json_object, write_json_atomically
from reflowpairs.errors import ReflowPairsError
from reflowpairs.store.layout import remove_path
from reflowpairs.store.manifest import StoreManifest
from reflowpairs.store.pairs import array_sha256
from reflowpairs.store.shards import read_shard, write_shard

if TYPE_CHECKING:
    from torch import Tensor

# torch is heavy; `reflowpairs inspect` reads the feature index (read_index, describe) and needs none of it: each
# function below that computes on tensors imports it.

FEATURES_DIR = "features"
INDEX = "index.json"
FORMAT = "reflowpairs.features"
VERSION = 1
FEATURE_DTYPES = ("float32", "float16", "bfloat16")
"""The storage dtypes of features, by torch's name (``getattr(torch, name)``)."""
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
FRAMES_PER_SHARD = 256


# --- stored values ---------------------------------------------------------------------------------------------


def to_storage(features: Tensor, dtype: str) -> np.ndarray:
    """``features`` in storage ``dtype`` as a numpy array (bfloat16: its raw uint16 bit patterns)."""
    import torch  # lazy: torch is heavy, and this module also serves work that does not need it

    cast = features.detach().to("cpu", getattr(torch, dtype)).contiguous()
    return (cast.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else cast.numpy()).copy()


def from_storage(array: np.ndarray, dtype: str) -> Tensor:
    """The tensor a stored array holds (bfloat16 from its bit patterns), float32."""
    import torch  # lazy: torch is heavy, and this module also serves work that does not need it

    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


# --- the index ---------------------------------------------------------------------------------------------------


def features_dir(store: str | Path) -> Path:
    return Path(store) / FEATURES_DIR


def read_index(store: str | Path) -> dict[str, Any] | None:
    """The store's feature index, or None when it has no feature cache."""
    path = features_dir(store) / INDEX
    if not path.exists():
        return None
    try:
        index = load_json_object(path)
    except (OSError, ValueError) as err:
        raise ReflowPairsError(
            f"The feature cache index {path} cannot be read ({err}).",
            f"Delete {features_dir(store)} and add the features again (`reflowpairs generate` with `cache_features` "
            "and `resume` on the complete store).",
        ) from err
    if index.get("format") != FORMAT:
        raise ReflowPairsError(f"{path} is not a feature cache index (format {index.get('format')!r}).")
    return index


def cached_frames(index: dict[str, Any]) -> int:
    return sum(int(s["num_frames"]) for s in index["shards"])


def describe(index: dict[str, Any]) -> dict[str, Any]:
    """A summary of a feature index for ``inspect``."""
    frames = cached_frames(index)
    return {
        "kind": index["kind"],
        "what": index.get("what"),
        "fingerprint": index["fingerprint"],
        "dtype": index["dtype"],
        "slots": index["slots"],
        "shape": index["shape"],
        "bytes_per_frame": index["bytes_per_frame"],
        "frames": frames,
        "complete": bool(index.get("complete")),
        "shards": len(index["shards"]),
        "bytes": frames * int(index["bytes_per_frame"]),
    }


class FeatureWriter:
    """Appends frames of features to a store's cache: a shard every ``frames_per_shard`` frames (``write_shard``),
    then the index rewritten atomically to list it. Frames put and not yet flushed are lost on a crash (a resume
    computes them again)."""

    def __init__(self, store: Path, index: dict[str, Any], frames_per_shard: int = FRAMES_PER_SHARD):
        self.store, self.index, self.frames_per_shard = Path(store), index, max(1, int(frames_per_shard))
        self._obs: list[np.ndarray] = []
        self._feats: list[np.ndarray] = []
        features_dir(store).mkdir(parents=True, exist_ok=True)

    def put(self, obs_index: np.ndarray, features: Tensor) -> None:
        self._obs.append(np.asarray(obs_index, dtype=np.int64))
        self._feats.append(to_storage(features, self.index["dtype"]))
        if sum(len(o) for o in self._obs) >= self.frames_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._obs:
            return
        block = SimpleNamespace(obs_index=np.concatenate(self._obs), features=np.concatenate(self._feats))
        self._obs, self._feats = [], []
        name = f"f-{len(self.index['shards']):05d}-{time.time_ns() % 10**9:09d}.zarr"
        attrs = {"format": FORMAT, "store_id": self.index["store_id"], "shard": f"{FEATURES_DIR}/{name}"}
        write_shard(features_dir(self.store) / name, block, "zarr", attrs, arrays=("obs_index", "features"))
        self.index["shards"].append(
            {
                "path": f"{FEATURES_DIR}/{name}",
                "num_frames": len(block.obs_index),
                "checksums": {a: array_sha256(getattr(block, a)) for a in ("obs_index", "features")},
            }
        )
        self.write_index()

    def write_index(self) -> None:
        write_json_atomically(features_dir(self.store) / INDEX, self.index)


def bytes_per_frame(shape, dtype: str) -> int:
    """Bytes one frame's cached features take: ``shape`` = (camera slots, tokens per camera, text width) values of
    the storage ``dtype`` (float32, float16 or bfloat16)."""
    return int(np.prod(shape)) * np.dtype(_NUMPY[dtype]).itemsize


def new_index(store_id: str, identity: dict[str, Any], slots: list[str], shape, dtype: str) -> dict[str, Any]:
    """A feature index with no shards yet."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "store_id": store_id,
        **identity,
        "slots": list(slots),
        "shape": [int(s) for s in shape],
        "dtype": dtype,
        "bytes_per_frame": bytes_per_frame(shape, dtype),
        "complete": False,
        "shards": [],
    }


def check_feature_dtype(dtype: str) -> None:
    if dtype not in FEATURE_DTYPES:
        raise ReflowPairsError(
            f"`feature_dtype` must be one of {', '.join(FEATURE_DTYPES)}, got {dtype!r}.",
            "Set `feature_dtype` to float32 (exact), float16 or bfloat16.",
        )


# --- computing the cache for a store -------------------------------------------------------------------------------


def clear_unlisted(store: Path, index: dict[str, Any] | None) -> None:
    """Remove files under features/ the index does not list (leftovers of an interrupted run)."""
    folder = features_dir(store)
    if not folder.is_dir():
        return
    listed = {Path(s["path"]).name for s in (index or {}).get("shards", [])}
    for path in folder.iterdir():
        if path.name != INDEX and (path.name not in listed or path.name.startswith(TMP_PREFIX)):
            remove_path(path)


def cached_obs_index(store: str | Path, index: dict[str, Any]) -> np.ndarray:
    """Every obs_index the cache holds (reads only that column of each shard)."""
    cols = [
        read_shard(Path(store) / s["path"], "zarr", (), (), ("obs_index",))["obs_index"]
        for s in index["shards"]
    ]
    return np.concatenate(cols) if cols else np.zeros(0, np.int64)


# --- merging partition slices' caches (reflowpairs.store.merge) --------------------------------------------------------

_SAME_ACROSS_SLICES = ("kind", "policy_type", "fingerprint", "inputs", "slots", "shape", "dtype")


def merge_caches(out: Path, slices: list[Path], manifest, place: Callable[[Path, Path], None]) -> str | None:
    """Carry the slices' feature caches into the merged store ``out`` (``manifest``: its ``StoreManifest``, shards
    already listed): each slice's feature shards copied with ``place(src, dst)`` under ``features/s<i>-<name>`` and
    listed in one index with ``out``'s store id. Returns None when no slice has a cache or they were merged, else why
    they were not (some slices without one, or caches made differently): the merged store then has none."""
    indexes = [read_index(s) for s in slices]
    if all(i is None for i in indexes):
        return None
    how = "add one with `reflowpairs generate --resume --cache-features` on the merged store"
    lacking = [str(s) for s, i in zip(slices, indexes, strict=True) if i is None]
    if lacking:
        return f"feature cache not merged: {', '.join(lacking)} has none; {how}"
    differ = [k for k in _SAME_ACROSS_SLICES if any(i.get(k) != indexes[0].get(k) for i in indexes)]
    if differ:
        return f"feature cache not merged: the slices' caches differ in {', '.join(differ)}; {how}"
    merged = {k: v for k, v in indexes[0].items() if k not in ("shards", "store_pairs")}
    merged.update(store_id=manifest.store_id, shards=[])
    for n, (store, index) in enumerate(zip(slices, indexes, strict=True)):
        for entry in index["shards"]:
            rel = f"{FEATURES_DIR}/s{n:03d}-{Path(entry['path']).name}"
            place(Path(store) / entry["path"], Path(out) / rel)
            origin = {"store_id": entry.get("store_id", index.get("store_id"))}
            origin["written_as"] = entry.get("written_as", entry["path"])  # what its attributes say
            merged["shards"].append({**entry, **origin, "path": rel})
    merged["num_frames"] = cached_frames(merged)
    # complete when every slice's cache covered its slice (checked from the manifests, as train does)
    covered = all(
        coverage_problem(i, StoreManifest.read(s)) is None for s, i in zip(slices, indexes, strict=True)
    )
    merged["complete"] = covered
    if covered:
        merged["store_pairs"] = int(manifest.data["num_pairs"])
    write_json_atomically(features_dir(out) / INDEX, merged)
    return None


# --- reading it in training ------------------------------------------------------------------------------------


# --- reading it in training ------------------------------------------------------------------------------------


def shard_problems(
    store: str | Path,
    index: dict[str, Any],
    i: int,
    data: dict[str, np.ndarray],
    attrs: dict[str, Any] | None,
) -> list[str]:
    """What is wrong with feature shard ``i`` of the index, given its arrays ``data`` (``obs_index`` and, when read,
    ``features``) and the attributes it carries (``attrs``; None: not checked); [] when it is sound. Sound means, as
    for a pair shard (``pairdata.shard_refusal``): each array has the entry's frame count, the index's shape and
    dtype, and the sha256 recorded when it was written; and the shard carries the store id and name it was written
    with (the entry's ``store_id`` and ``written_as``, which a merged cache keeps for each shard, else the index's
    store id and the entry's path)."""
    entry = index["shards"][i]
    n = int(entry["num_frames"])
    expected = {
        "obs_index": ((n,), np.dtype(np.int64)),
        "features": ((n, *index["shape"]), np.dtype(_NUMPY[index["dtype"]])),
    }
    problems = []
    for name, array in data.items():
        shape, dtype = expected[name]
        if array.shape != shape or array.dtype != dtype:
            problems.append(
                f"{name} is {array.dtype}{list(array.shape)}, the index says {dtype}{list(shape)}"
            )
        elif array_sha256(array) != entry["checksums"].get(name):
            problems.append(f"{name} does not match its checksum")
    if attrs is not None and not problems and not _merged_before_origins(entry):
        origin = entry.get("store_id", index.get("store_id"))
        if attrs.get("store_id") != origin:
            problems.append(f"it belongs to store {attrs.get('store_id')!r}, not this cache's ({origin})")
        elif attrs.get("shard") != entry.get("written_as", entry["path"]):
            problems.append(f"it was written as {attrs.get('shard')} (a copy or a renamed shard)")
    return problems


def _merged_before_origins(entry: dict[str, Any]) -> bool:
    """True for a shard entry of a cache merged before entries kept their origin (``store_id``/``written_as``):
    its shard carries its slice's store id and name, which that index does not record, so only its counts, shapes,
    dtypes and checksums can be checked."""
    return "store_id" not in entry and re.fullmatch(rf"{FEATURES_DIR}/s\d{{3}}-.+", entry["path"]) is not None


def corrupt_feature_shard(store: str | Path, entry: dict[str, Any], problems: list[str]) -> ReflowPairsError:
    """The refusal of a damaged feature shard, naming it, what is wrong and the fix (as ``pairdata.corrupt_shard``)."""
    return ReflowPairsError(
        f"The feature cache of store {store} is corrupt: feature shard {entry['path']}: "
        + "; ".join(p.rstrip(".") for p in problems)
        + ".",
        f"Do not train on it: delete {features_dir(store)} and add the features again (`reflowpairs generate "
        "--resume --cache-features` with the teacher and dataset of the store), or set `no_feature_cache`. "
        "`reflowpairs validate` checks the whole cache.",
    )


def read_checked_shard(store: str | Path, index: dict[str, Any], i: int, columns=("obs_index", "features")):
    """``columns`` of feature shard ``i``, read once and checked (``shard_problems``; the attributes too when
    ``features`` is read); a missing, unreadable or unsound shard raises the ``ReflowPairsError`` naming it."""
    import zarr  # lazy: only the storage backend in use is imported

    entry = index["shards"][i]
    path = Path(store) / entry["path"]
    try:
        data = read_shard(path, "zarr", (), (), tuple(columns))
        attrs = dict(zarr.open_group(str(path), mode="r").attrs) if "features" in columns else None
    except Exception as err:  # noqa: BLE001 - zarr raises many kinds
        raise corrupt_feature_shard(
            store, entry, [f"it cannot be read ({type(err).__name__}: {err})"]
        ) from None
    problems = shard_problems(store, index, i, data, attrs)
    if problems:
        raise corrupt_feature_shard(store, entry, problems)
    return data


class FeatureReader:
    """``reader[obs_index] -> (S, N, D) float32``: whole shards read on first use, the last ``cache_shards`` kept
    (per process, so per DataLoader worker). Where each frame is (``where``) is read on first use too (each shard's
    obs_index column), so building a reader reads nothing.

    Every shard is checked when it is first read (``read_checked_shard``: frame count, shape, dtype, sha256, store
    id and name; each shard's ``obs_index`` column when ``where`` is built), as pair shards are: a damaged one raises
    the ``ReflowPairsError`` naming it, which ``PairDataset`` turns into a refused batch (``pairdata.collate_pairs``)
    that the training loop raises before a step uses it."""

    def __init__(self, store: str | Path, index: dict[str, Any], cache_shards: int = 8):
        self.store, self.index, self.cache_shards = Path(store), index, max(1, int(cache_shards))
        self._where: np.ndarray | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def where(self) -> np.ndarray:
        """``(max obs_index + 1, 2)`` int64: (shard, row) of each cached frame, -1 where not cached."""
        if self._where is None:
            obs = [
                read_checked_shard(self.store, self.index, i, ("obs_index",))["obs_index"]
                for i in range(len(self.index["shards"]))
            ]
            size = int(max((o.max(initial=-1) for o in obs), default=-1)) + 1
            where = np.full((size, 2), -1, dtype=np.int64)
            for i, o in enumerate(obs):
                where[o, 0], where[o, 1] = i, np.arange(len(o))
            self._where = where
        return self._where

    def has(self, obs_index: np.ndarray) -> np.ndarray:
        obs_index = np.asarray(obs_index)
        inside = (obs_index >= 0) & (obs_index < len(self.where))
        out = np.zeros(len(obs_index), dtype=bool)
        out[inside] = self.where[obs_index[inside], 0] >= 0
        return out

    def shard(self, i: int) -> np.ndarray:
        """The features of shard ``i``, from the cache or read once and checked (a damaged shard raises the
        ``ReflowPairsError`` naming it and is not cached)."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        data = read_checked_shard(self.store, self.index, i)["features"]
        self._cache[i] = data
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return data

    def __getitem__(self, obs_index: int) -> Tensor:
        """The frame's features; ``ReflowPairsError`` naming the frame and the fix when the cache lacks it, or
        naming the shard when it is damaged."""
        if not self.has(np.array([int(obs_index)]))[0]:
            raise missing_frames_error(self.store, np.array([int(obs_index)]))
        shard, row = self.where[int(obs_index)]
        return from_storage(self.shard(int(shard))[int(row)], self.index["dtype"])


def missing_frames_error(store: str | Path, missing: np.ndarray, of: int | None = None) -> ReflowPairsError:
    """The refusal of a feature cache that lacks frames ``missing`` (obs_index) of its store."""
    shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
    count = f"{len(missing)} of its frames" if of is None else f"{len(missing)} of its {of} frames"
    return ReflowPairsError(
        f"Store {store}'s feature cache lacks {count} (obs_index {shown}).",
        f"Add them with `reflowpairs generate --resume --cache-features` on {store} (the teacher and dataset it was "
        "generated with), or set `no_feature_cache`.",
    )


def coverage_problem(index: dict[str, Any], manifest) -> str | None:
    """Why the cache cannot cover every frame of the store, from the index and the manifest alone (no shard read),
    or None: the cache must be ``complete``; a cache that recorded the store's pair count (``store_pairs``) must
    match the manifest's (else pairs were added since, without features); and a complete store's frames (the job's
    ``num_frames``, of its partition if any, less the skipped ones) cannot outnumber the cached frames."""
    if not index.get("complete"):
        return "the cache is incomplete (an interrupted run)"
    pairs = int(manifest.data.get("num_pairs", 0))
    if index.get("store_pairs") is not None and int(index["store_pairs"]) != pairs:
        return f"it was made when the store had {index['store_pairs']} pairs, the store has {pairs} now"
    if manifest.data.get("complete"):
        frames = (manifest.data.get("partition") or manifest.data.get("generation") or {}).get("num_frames")
        if frames is not None:
            expected = int(frames) - len(manifest.skipped_frames)
            if cached_frames(index) < expected:
                return f"it holds {cached_frames(index)} frames, the store has {expected}"
    return None


# --- checking it (validate) ----------------------------------------------------------------------------------------


# --- checking it (validate) ----------------------------------------------------------------------------------------


def check(
    store: str | Path,
    obs_index: np.ndarray,
    recompute: Callable[[np.ndarray], Tensor] | None = None,
    spot: int = 0,
    seed: int = 0,
) -> tuple[list[str], str]:
    """Problems with the store's feature cache (empty: sound) and a one-line summary: every shard readable with the
    index's shape, dtype, frame count and checksums; every frame of the store covered (``obs_index``: the store's);
    and, given ``recompute(obs_index) -> (n, S, N, D)``, ``spot`` random frames recomputed and compared (exact in
    float32 up to batch rounding; within the storage dtype's rounding otherwise)."""
    import torch  # lazy: torch is heavy, and this module also serves work that does not need it

    index = read_index(store)
    if index is None:
        return [], "no feature cache"
    import zarr  # lazy: only the storage backend in use is imported

    problems: list[str] = []
    seen = []
    for i, entry in enumerate(index["shards"]):
        path = Path(store) / entry["path"]
        try:
            data = read_shard(path, "zarr", (), (), ("obs_index", "features"))
            attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{entry['path']} cannot be read ({type(err).__name__})")
            continue
        problems += [f"{entry['path']}: {p}" for p in shard_problems(store, index, i, data, attrs)]
        seen.append(data["obs_index"])
    have = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    missing = np.setdiff1d(np.unique(obs_index), have)
    if len(missing):
        problems.append(
            f"{len(missing)} frames of the store have no cached features (obs_index {missing[:8].tolist()})"
        )
    summary = (
        f"{len(index['shards'])} feature shards, {len(have)} frames x {index['bytes_per_frame']} bytes "
        f"({index['dtype']}), checksums match, every frame covered"
    )
    if recompute is not None and spot and len(have) and not problems:
        picks = np.random.default_rng(seed).choice(have, min(spot, len(have)), replace=False)
        reader = FeatureReader(store, index)
        stored = torch.stack([reader[int(o)] for o in picks])
        fresh = recompute(picks).float().cpu()
        tol = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}[index["dtype"]]
        err = ((stored - fresh).abs().max() / fresh.abs().max().clamp_min(1e-12)).item()
        if err > tol:
            problems.append(
                f"recomputed features of {len(picks)} frames differ from the cache by {err:.2e} (max relative; tolerance {tol:g})"
            )
        summary += f"; {len(picks)} frames recomputed match (max relative error {err:.1e})"
    return problems, summary
