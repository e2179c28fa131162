"""The feature cache: per-frame features that no trainable weight changes, computed once and stored beside the pairs,
so stage 2 skips decoding video and running the frozen vision encoder (docs/feature-cache.md).

What is cached is the family's choice (``feature_kind``); for SmolVLA it is each camera's
image embedding after the connector, ``SmolVLMWithExpertModel.embed_image``'s output, *before* ``embed_prefix`` scales
it by ``sqrt(hidden)``: ``(S, N, D)`` per frame for S camera slots of N tokens of width D. It depends only on the
frame's images, on how ``prepare_images`` resizes them and on the vision model + connector weights; the cache applies
to a student whose vision model and connector are frozen (lerobot's ``train_expert_only``) and whose weights there
have the cache's sha256 ``fingerprint``. Stage 2 then reads the observation's other columns (state, task) straight
from the dataset's parquet and runs lerobot's own training forward with ``embed_image`` substituted by the cached
tensor (``substituted_features``): the language model still runs over the whole prefix. For pi0/pi05 it is
``PaliGemmaWithExpertModel.embed_image`` (SigLIP vision tower + multi-modal projector) of each camera slot, on the image
``_preprocess_images`` prepares, under the same contract (``policies._pi_common``).

Layout (its own index, beside the pair store's manifest, which it does not touch)::

    OUT/features/index.json            what was cached, from which weights, dtype, shape, bytes/frame, shards
    OUT/features/<name>.zarr           obs_index (n,) int64, features (n, S, N, D)

Shards are written as pair shards are (``pairstore.write_shard``: temp name, fsync, rename) and listed in the index
(rewritten atomically, ``atomic.write_json_atomically``) only once complete, each with sha256 checksums of its arrays
(``pairstore.array_sha256``). ``bfloat16`` features are stored as their raw 16-bit patterns (numpy has no bfloat16).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from reflowpairs.atomic import load_json_object, write_json_atomically
from reflowpairs.errors import ReflowPairsError
from reflowpairs.pairstore import (
    TMP_PREFIX,
    StoreManifest,
    array_sha256,
    read_shard,
    remove_path,
    write_shard,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# torch is heavy; `reflowpairs inspect` reads the feature index (read_index, describe) and needs none of it: each
# function below that computes on tensors imports it.

FEATURES_DIR = "features"
INDEX = "index.json"
FORMAT = "reflowpairs.features"
VERSION = 1
FEATURE_KEY = "reflowpairs.features"
"""The key under which a cached observation carries its features ``(S, N, D)`` (removed before the preprocessor)."""
FEATURE_DTYPES = ("float32", "float16", "bfloat16")
"""The storage dtypes of features, by torch's name (``getattr(torch, name)``)."""
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
FRAMES_PER_SHARD = 256


# --- what the cache holds --------------------------------------------------------------------------------------


def cache_family(policy):
    """The policy's family if it has a feature cache (``compute_features``: SmolVLA, pi0, pi05), else None."""
    from reflowpairs.policies import family

    fam = family(getattr(policy, "module", policy).config.type)
    return fam if hasattr(fam, "compute_features") else None


def weights_fingerprint(modules: dict[str, torch.nn.Module]) -> str:
    """sha256 over the named parameters and buffers of ``modules`` (name, dtype, shape, bytes), in name order."""
    import torch

    digest = hashlib.sha256()
    for prefix, module in sorted(modules.items()):
        tensors = dict(module.named_parameters())
        tensors.update(dict(module.named_buffers()))
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            digest.update(f"{prefix}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cache_identity(policy) -> dict[str, Any]:
    """What decides a policy's cached features: ``kind``, ``policy_type``, the frozen modules' ``fingerprint`` and the
    ``inputs`` (image keys and resizing); a cache is valid for a policy whose identity is the cache's."""
    fam = cache_family(policy)
    config = getattr(policy, "module", policy).config
    modules = fam.frozen_feature_modules(policy)
    return {
        "kind": fam.feature_kind,
        "policy_type": config.type,
        "fingerprint": weights_fingerprint(modules),
        "fingerprint_of": sorted(modules),
        "inputs": fam.feature_inputs(config),
        "what": fam.feature_what,
    }


def to_storage(features: Tensor, dtype: str) -> np.ndarray:
    """``features`` in storage ``dtype`` as a numpy array (bfloat16: its raw uint16 bit patterns)."""
    import torch

    cast = features.detach().to("cpu", getattr(torch, dtype)).contiguous()
    return (cast.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else cast.numpy()).copy()


def from_storage(array: np.ndarray, dtype: str) -> Tensor:
    """The tensor a stored array holds (bfloat16 from its bit patterns), float32."""
    import torch

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


def refuse_uncacheable(policy) -> None:
    """``ReflowPairsError`` unless the policy's family has a feature cache."""
    if cache_family(policy) is None:
        raise ReflowPairsError(
            f"The feature cache is not wired for {policy.config.type} policies (SmolVLA, pi0 and pi05 only).",
            "Unset `cache_features`.",
        )


def assemble_captured(outputs: list[Tensor], slots: int, frames: int) -> Tensor | None:
    """``(frames, S, N, D)`` from ``embed_image`` outputs captured over an engine's calls (``slots`` per call, each
    ``(rows, N, D)``; a call's rows past the frames left are padding copies), or None when they do not add up."""
    import torch

    if not outputs or len(outputs) % slots:
        return None
    parts, left = [], frames
    for call in range(len(outputs) // slots):
        group = outputs[call * slots : (call + 1) * slots]
        take = min(left, group[0].shape[0])
        parts.append(torch.stack([g[:take] for g in group], dim=1))
        left -= take
    return torch.cat(parts) if left == 0 else None


class FeatureSink:
    """Writes features of a store's frames into its cache (``features/``), skipping frames it holds already;
    refuses a cache made with other weights, image settings or ``dtype``; removes unlisted leftovers."""

    def __init__(self, store: str | Path, policy, dtype: str = "float32"):
        from reflowpairs.pairstore import StoreManifest

        refuse_uncacheable(policy)
        check_feature_dtype(dtype)
        self.store, self.policy, self.dtype = Path(store), policy, dtype
        self.family = cache_family(policy)
        self.identity = cache_identity(policy)
        self.store_id = StoreManifest.read(store).store_id
        index = read_index(store)
        if index is not None:
            expected = {**self.identity, "dtype": dtype}
            differs = [k for k in ("kind", "fingerprint", "inputs", "dtype") if index.get(k) != expected[k]]
            if differs or index.get("store_id") != self.store_id:
                raise ReflowPairsError(
                    f"Store {store} already has a feature cache made differently "
                    f"({', '.join(differs) if differs else 'store id'}).",
                    f"Delete {features_dir(store)} to cache the features again.",
                )
        _clear_unlisted(self.store, index)
        self.writer = None if index is None else FeatureWriter(store, index)
        self.have = set(cached_obs_index(store, index).tolist()) if index is not None else set()

    def put(self, obs_index: np.ndarray, features: Tensor, slots: list[str]) -> None:
        import torch

        new = np.array([o not in self.have for o in obs_index.tolist()], dtype=bool)
        if not new.any():
            return
        if self.writer is None:
            index = new_index(self.store_id, self.identity, slots, features.shape[1:], self.dtype)
            self.writer = FeatureWriter(self.store, index)
        self.writer.put(obs_index[new], features[torch.from_numpy(new)])
        self.have.update(obs_index[new].tolist())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()


def add_features(
    store: str | Path,
    policy,
    preprocessor,
    dataset,
    dtype: str = "float32",
    batch_size: int = 16,
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Compute and store the features of every frame of ``store`` that its cache does not hold yet (all of them for
    a store without one), with the policy that generated it (``policy`` + ``preprocessor``) over ``dataset`` (the
    LeRobotDataset the store's obs_index refer to). An existing cache made with other weights, inputs or ``dtype`` is
    refused. Resumable: shards already listed are kept. Returns the index (``complete`` once every frame is in)."""
    import torch

    from reflowpairs.dataset import frame_indices
    from reflowpairs.pairdata import missing_frames, position_lookup
    from reflowpairs.pairstore import PairStore

    sink = FeatureSink(store, policy, dtype)
    pairs = PairStore(store)
    manifest = pairs.meta
    wanted = np.unique(pairs.index()[0])
    todo = np.setdiff1d(wanted, np.fromiter(sink.have, dtype=np.int64, count=len(sink.have)))
    lookup = position_lookup(frame_indices(dataset))
    unknown = missing_frames(lookup, todo)
    if len(unknown):
        raise ReflowPairsError(
            f"{len(unknown)} frames of store {store} are not frames of the dataset at {dataset.root} "
            f"(obs_index {unknown[:8].tolist()}).",
            "Give the dataset the store was generated from.",
        )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, lookup[todo].tolist()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    policy.eval()
    done = 0
    for batch in loader:
        obs_index = batch["index"].to(torch.int64).numpy()
        features, slots = sink.family.compute_features(policy, preprocessor(batch))
        sink.put(obs_index, features, slots)
        done += len(obs_index)
        if progress is not None:
            progress(done, len(todo))
    sink.close()
    if sink.writer is None:  # an empty store: nothing to cache
        return {}
    index = sink.writer.index
    index["complete"] = not len(np.setdiff1d(wanted, cached_obs_index(store, index)))
    index["num_frames"] = cached_frames(index)
    index["store_pairs"] = int(manifest.data["num_pairs"])  # plan_training: frames added since lack features
    sink.writer.write_index()
    return index


def _clear_unlisted(store: Path, index: dict[str, Any] | None) -> None:
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


# --- merging partition slices' caches (reflowpairs.merge) --------------------------------------------------------

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
    import zarr

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


class CachedFrames:
    """Stands in for the LeRobotDataset in ``PairDataset``: ``frames[position]`` is the dataset item without its
    camera columns (no image or video decoded: the non-camera columns straight from the parquet, plus ``task``), with
    the frame's cached features under ``FEATURE_KEY``."""

    def __init__(self, dataset, reader: FeatureReader):
        cameras = set(dataset.meta.camera_keys)
        self.columns = dataset.hf_dataset.select_columns(
            [c for c in dataset.hf_dataset.column_names if c not in cameras]
        )
        self.tasks = dataset.meta.tasks
        self.reader = reader
        self.root = dataset.root

    def __len__(self) -> int:
        return len(self.columns)

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = dict(self.columns[int(position)])
        item["task"] = self.tasks.iloc[int(item["task_index"])].name
        item[FEATURE_KEY] = self.reader[int(item["index"])]
        return item


@dataclass
class TrainingCache:
    """A feature cache that applies to a training run (``plan_training``)."""

    store: Path
    index: dict[str, Any]

    def frames(self, dataset, cache_shards: int = 8) -> CachedFrames:
        return CachedFrames(dataset, FeatureReader(self.store, self.index, cache_shards))

    def loss_fn(self, preprocessor, loss: str = "mse"):
        """Stage 2's loss on a batch whose observation carries cached features (``reflow_batch_loss``'s contract)."""
        from reflowpairs.train import reflow_loss

        slots = list(self.index["slots"])

        def loss_fn(model, batch: dict[str, Any]) -> Tensor:
            observation = dict(batch["observation"])
            features = observation.pop(FEATURE_KEY)
            with cache_family(model).substituted_features(model, features, slots):
                value, _ = reflow_loss(
                    model, preprocessor, observation, batch["x0"], batch["x1"], batch["t"], loss
                )
            return value

        return loss_fn

    def describe(self) -> dict[str, Any]:
        return {**describe(self.index), "path": str(self.store / FEATURES_DIR)}


def plan_training(store: str | Path, policy, manifest, disabled: bool) -> TrainingCache | None:
    """The store's feature cache if training ``policy`` should use it: None when the store has none or ``disabled``
    (``no_feature_cache``); ``ReflowPairsError`` when it has one that cannot stand in for the policy's own features
    (trainable vision model or connector, other frozen weights or image settings, frames missing). ``manifest``: the
    store's ``StoreManifest``. Reads no pair shard: the frames are checked against what the manifest records
    (``coverage_problem``); a frame still missing is refused where its features are looked up (``FeatureReader``),
    before a step uses it."""
    if disabled:
        return None
    index = read_index(store)
    if index is None:
        return None
    off = "Set `no_feature_cache` to train the ordinary way (decoding the images)."
    if cache_family(policy) is None:
        raise ReflowPairsError(
            f"Store {store} has a feature cache, but the feature cache is not wired for "
            f"{getattr(policy, 'module', policy).config.type} policies.",
            off,
        )
    problems = student_cache_problems(policy)
    if problems:
        raise ReflowPairsError(
            f"Store {store} has a feature cache, but the student trains what it was computed with: "
            + "; ".join(problems)
            + f" ({cache_family(policy).feature_cache_how}).",
            off,
        )
    refuse_other_identity(store, index, policy, "student", off)
    if index.get("store_id") is not None and index["store_id"] != manifest.store_id:
        raise ReflowPairsError(
            f"Store {store}'s feature cache belongs to another store ({index['store_id']}).", off
        )
    problem = coverage_problem(index, manifest)
    if problem is not None:
        raise ReflowPairsError(
            f"Store {store}'s feature cache does not cover the store: {problem}.",
            f"Add the missing features with `reflowpairs generate --resume --cache-features` on {store} (the teacher "
            "and dataset it was generated with), or set `no_feature_cache`.",
        )
    return TrainingCache(Path(store), index)


def student_cache_problems(policy) -> list[str]:
    """Why a student built as ``policy`` (its family, and its config: which weights lerobot leaves trainable) could not
    train with a feature cache; [] when it could. The check ``plan_training`` applies, and the one by which
    ``generate``'s ``cache_features_if_allowed`` (the pipeline's first round) decides to cache."""
    fam = cache_family(policy)
    if fam is None:
        return [
            f"the feature cache is not wired for {getattr(policy, 'module', policy).config.type} policies"
        ]
    return fam.feature_cache_problems(policy)


def refuse_other_identity(store: str | Path, index: dict[str, Any], policy, whose: str, hint: str) -> None:
    """``ReflowPairsError`` unless the cache's kind, frozen-weights fingerprint and image settings are ``policy``'s."""
    identity = cache_identity(policy)
    for key, words in (("kind", "kind"), ("fingerprint", "frozen weights"), ("inputs", "image settings")):
        if index.get(key) != identity[key]:
            shown = (
                (str(index.get(key))[:12], str(identity[key])[:12])
                if key == "fingerprint"
                else (index.get(key), identity[key])
            )
            raise ReflowPairsError(
                f"Store {store}'s feature cache was computed with other {words} than the {whose}'s "
                f"(cache: {shown[0]}, {whose}: {shown[1]}).",
                hint,
            )


def source_cache(source: str | Path, policy) -> TrainingCache:
    """Another store's feature cache that stage 1 reads instead of running ``policy``'s frozen vision encoder
    (``features_from``: a later reflow round whose teacher shares the frozen weights): refused when ``source`` has
    none, or one made with other frozen weights, kind or image settings."""
    hint = "Unset `features_from` (the teacher then computes the features itself)."
    refuse_uncacheable(policy)
    index = read_index(source)
    if index is None:
        raise ReflowPairsError(
            f"Store {source} has no feature cache (no {features_dir(source) / INDEX}).", hint
        )
    refuse_other_identity(source, index, policy, "teacher", hint)
    return TrainingCache(Path(source), index)


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
    import torch

    index = read_index(store)
    if index is None:
        return [], "no feature cache"
    import zarr

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


def recompute_features(source: str, device: str, dataset) -> Callable[[np.ndarray], Tensor]:
    """``recompute(obs_index) -> (n, S, N, D)``: the features of those frames of ``dataset`` computed afresh by the
    checkpoint ``source`` (for ``check``'s spot check)."""
    from torch.utils.data import default_collate

    from reflowpairs.dataset import frame_indices
    from reflowpairs.pairdata import position_lookup
    from reflowpairs.teacher import load_policy

    loaded = load_policy(source, device)
    loaded.policy.eval()
    lookup = position_lookup(frame_indices(dataset))

    def recompute(obs_index: np.ndarray) -> Tensor:
        batch = default_collate([dataset[int(lookup[o])] for o in obs_index])
        return cache_family(loaded.policy).compute_features(loaded.policy, loaded.preprocessor(batch))[0]

    return recompute


def validate_features(store, teacher: str | None, device: str, open_dataset, spot: int, seed: int):
    """``validate``'s ``features`` check: ``(result, detail)`` ("pass"/"fail"; "skip", "no feature cache" for a store
    without one). ``open_dataset()`` gives the store's dataset, only needed for a spot check (``spot`` > 0 frames)."""
    if read_index(store.path) is None:
        return "skip", "no feature cache"
    recompute = None
    if spot:
        source = teacher or store.manifest.get("teacher", {}).get("source")
        recompute = recompute_features(source, device, open_dataset())
    problems, summary = check(store.path, store.index()[0], recompute, spot, seed)
    return ("fail", "; ".join(problems)) if problems else ("pass", summary)
