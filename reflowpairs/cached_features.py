"""Using a store's feature cache with a policy (docs/feature-cache.md): what is cached (the family's choice), capture
while generating (``FeatureSink``, ``add_features``), which cache a student or a teacher may use in place of its own
frozen vision encoder (``cache_for_training``, ``source_cache``), the frames it stands in for (``CachedFrames``) and
the recompute spot check of ``validate``. The storage itself (index, shards, reader, writer, merge) is
``reflowpairs.store_features``; the training loss on cached features is ``reflowpairs.train.loss``.

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
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate

from reflowpairs.dataset import frame_indices
from reflowpairs.errors import ReflowPairsError
from reflowpairs.pairdata import missing_frames, position_lookup
from reflowpairs.policies import feature_cache_family
from reflowpairs.policies.interface import FEATURE_KEY
from reflowpairs.store.manifest import StoreManifest
from reflowpairs.store.reader import PairStore
from reflowpairs.store_features import (
    FEATURES_DIR,
    INDEX,
    FeatureReader,
    FeatureWriter,
    cached_frames,
    cached_obs_index,
    check,
    check_feature_dtype,
    clear_unlisted,
    coverage_problem,
    describe,
    features_dir,
    new_index,
    read_index,
)
from reflowpairs.teacher import load_policy

# --- what the cache holds --------------------------------------------------------------------------------------


def cache_family(policy):
    """The policy's family if it has a feature cache (``compute_features``: SmolVLA, pi0, pi05), else None."""
    return feature_cache_family(getattr(policy, "module", policy).config.type)


def weights_fingerprint(modules: dict[str, torch.nn.Module]) -> str:
    """sha256 over the named parameters and buffers of ``modules`` (name, dtype, shape, bytes), in name order."""
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
        clear_unlisted(self.store, index)
        self.writer = None if index is None else FeatureWriter(store, index)
        self.have = set(cached_obs_index(store, index).tolist()) if index is not None else set()

    def put(self, obs_index: np.ndarray, features: Tensor, slots: list[str]) -> None:
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
    index["store_pairs"] = int(
        manifest.data["num_pairs"]
    )  # cache_for_training: frames added since lack features
    sink.writer.write_index()
    return index


# --- using it in place of the vision encoder --------------------------------------------------------------------


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
class AppliedFeatureCache:
    """A store's feature cache, checked to stand in for a policy's own frozen features: a student's
    (``cache_for_training``) or a teacher's (``source_cache``)."""

    store: Path
    index: dict[str, Any]

    def frames(self, dataset, cache_shards: int = 8) -> CachedFrames:
        return CachedFrames(dataset, FeatureReader(self.store, self.index, cache_shards))

    def describe(self) -> dict[str, Any]:
        return {**describe(self.index), "path": str(self.store / FEATURES_DIR)}


def cache_for_training(store: str | Path, policy, manifest, disabled: bool) -> AppliedFeatureCache | None:
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
    return AppliedFeatureCache(Path(store), index)


def student_cache_problems(policy) -> list[str]:
    """Why a student built as ``policy`` (its family, and its config: which weights lerobot leaves trainable) could not
    train with a feature cache; [] when it could. The check ``cache_for_training`` applies, and the one by which
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


def source_cache(source: str | Path, policy) -> AppliedFeatureCache:
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
    return AppliedFeatureCache(Path(source), index)


# --- the recompute spot check (validate) ---------------------------------------------------------------------


def recompute_features(
    source: str, device: str, dataset, tokenizer: str | None = None
) -> Callable[[np.ndarray], Tensor]:
    """``recompute(obs_index) -> (n, S, N, D)``: the features of those frames of ``dataset`` computed afresh by the
    checkpoint ``source`` (for ``check``'s spot check; ``tokenizer``: ``load_policy``'s)."""
    loaded = load_policy(source, device, tokenizer=tokenizer)
    loaded.policy.eval()
    lookup = position_lookup(frame_indices(dataset))

    def recompute(obs_index: np.ndarray) -> Tensor:
        batch = default_collate([dataset[int(lookup[o])] for o in obs_index])
        return cache_family(loaded.policy).compute_features(loaded.policy, loaded.preprocessor(batch))[0]

    return recompute


def validate_features(
    store, teacher: str | None, device: str, open_dataset, spot: int, seed: int, tokenizer: str | None = None
):
    """``validate``'s ``features`` check: ``(result, detail)`` ("pass"/"fail"; "skip", "no feature cache" for a store
    without one). ``open_dataset()`` gives the store's dataset, only needed for a spot check (``spot`` > 0 frames);
    ``tokenizer``: ``load_policy``'s."""
    if read_index(store.path) is None:
        return "skip", "no feature cache"
    recompute = None
    if spot:
        source = teacher or store.manifest.get("teacher", {}).get("source")
        recompute = recompute_features(source, device, open_dataset(), tokenizer)
    problems, summary = check(store.path, store.index()[0], recompute, spot, seed)
    return ("fail", "; ".join(problems)) if problems else ("pass", summary)
