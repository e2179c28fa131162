"""The sampling loop: frames from a DataLoader, K pairs per frame from the engine, shards through the background
writer (and, with a feature cache, each kept frame's frozen features to a ``FeatureSink``)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import torch

from reflowpairs.cached_features import FeatureSink, add_features, assemble_captured
from reflowpairs.errors import ReflowPairsError
from reflowpairs.generate.config import GenerateConfig, GenerationProgress
from reflowpairs.generate.job import Job
from reflowpairs.generate.writer import BackgroundWriter, write_failed
from reflowpairs.noise import batch_noise
from reflowpairs.policies.interface import FEATURE_KEY
from reflowpairs.solvers import SolverConfig
from reflowpairs.store.manifest import StoreManifest
from reflowpairs.store.pairs import Pairs
from reflowpairs.store.writer import PairStoreWriter
from reflowpairs.store_features import missing_frames_error


def sample_frames(
    job: Job,
    manifest: StoreManifest,
    positions: np.ndarray,
    writer_id: str,
    cfg: GenerateConfig,
    progress: GenerationProgress | None,
    features: bool = False,
) -> tuple[int, float, list[int]]:
    """Sample every frame at dataset ``positions`` into ``manifest``'s store; returns (pairs, seconds, skipped).
    ``features``: also keep each frame's frozen features, as the prefix fills compute them (``FeatureSink``)."""
    manifest.out.mkdir(parents=True, exist_ok=True)
    sink = FeatureSink(manifest.out, job.teacher.policy, cfg.feature_dtype) if features else None
    try:
        writer = BackgroundWriter(PairStoreWriter(manifest, cfg.shard_size, cfg.samples_per_frame, writer_id))
    except OSError as err:
        raise write_failed(manifest.out, err) from err
    start, frames, pairs = time.perf_counter(), 0, 0
    loader = _frame_loader(job, positions, cfg)
    complete = False
    try:
        for number, batch in enumerate(loader, start=1):
            block, bad = sample_batch(batch, job.teacher.preprocessor, job.engine, job.solver, cfg, sink)
            if bad and cfg.on_nonfinite == "error":
                raise ReflowPairsError(
                    f"The teacher produced non-finite X_1 (NaN or inf) for obs_index {bad}.",
                    "Check the teacher checkpoint and that frame's observation; set `on_nonfinite` to skip "
                    "to record and skip such frames. Shards written so far are kept; rerun with `resume`.",
                )
            if bad:
                writer.skip(bad)
            if len(block):
                writer.put(block)
            frames += len(batch["index"])
            pairs += len(block)
            if progress is not None and number < len(loader):
                # the last batch is reported once its shard is written
                progress(frames, pairs, time.perf_counter() - start)
        complete = True
    finally:
        writer.close(complete)
        if sink is not None:
            sink.close()
    seconds = time.perf_counter() - start
    if progress is not None:
        progress(frames, pairs, seconds)
    return pairs, seconds, manifest.skipped_frames


def _frame_loader(job: Job, positions: np.ndarray, cfg: GenerateConfig) -> torch.utils.data.DataLoader:
    """Batches of ``cfg.batch_size`` raw frames at dataset ``positions``, in order; with ``features_from``, frames
    that carry the cached features instead of images (every one of them must be cached)."""
    items = job.dataset
    if job.features is not None:  # no image decoded, no vision encoder run: the cached features instead
        items = job.features.frames(job.dataset)
        lacking = job.frame_index[positions][~items.reader.has(job.frame_index[positions])]
        if len(lacking):
            err = missing_frames_error(job.features.store, lacking)
            raise ReflowPairsError(
                err.what, "Add them to that store's cache first, or unset `features_from`."
            )
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(items, positions.tolist()),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=job.engine.device.type == "cuda",
    )


def sample_batch(
    batch: dict[str, Any],
    preprocessor,
    engine,
    solver: SolverConfig,
    cfg: GenerateConfig,
    sink: FeatureSink | None = None,
) -> tuple[Pairs, list[int]]:
    """Sample K pairs for each frame of a raw dataset batch; frames with non-finite X_1 are dropped. With a ``sink``,
    the kept frames' features go to the feature cache: captured from the engine's prefix fills when it computes them
    in float32 (prefix-cached engine, no autocast), else computed for the batch."""
    obs_index = batch["index"].to(torch.int64).numpy()
    batch = dict(batch)
    cached = batch.pop(FEATURE_KEY, None)  # (B, S, N, D) read from `features_from`'s cache
    k = cfg.samples_per_frame
    noise = batch_noise(cfg.seed, obs_index.tolist(), k, engine.noise_shape)  # (B, K, T, D0)
    compute = getattr(torch, cfg.dtype)
    capture = sink is not None and not engine.exact and compute is torch.float32 and cached is None
    captured = sink.family.captured_features(sink.policy) if capture else contextlib.nullcontext([])
    with (
        torch.autocast(engine.device.type, dtype=compute, enabled=compute is not torch.float32),
        captured as outputs,
    ):
        processed = preprocessor(batch)
        if cached is not None:
            processed[FEATURE_KEY] = cached  # the engine's prefix fills use it (sliced and padded per call)
        x1 = engine.sample(processed, noise, solver).float().cpu()  # (B, K, T, D1)
    finite = torch.isfinite(x1).flatten(1).all(dim=1).numpy()
    keep = np.flatnonzero(finite)
    if sink is not None and len(keep):
        slots = sink.family.feature_slots(sink.policy.config, processed.keys())
        features = assemble_captured(outputs, len(slots), len(obs_index)) if capture else cached
        if cached is not None:
            slots = list(engine.feature_slots)
        elif features is None:
            features, slots = sink.family.compute_features(sink.policy, processed)
        sink.put(obs_index[keep], features[torch.from_numpy(keep)], slots)
    block = Pairs(
        x0=noise[keep].reshape(-1, *noise.shape[2:]).numpy(),
        x1=x1[keep].reshape(-1, *x1.shape[2:]).numpy(),
        obs_index=np.repeat(obs_index[keep], k),
        sample=np.tile(np.arange(k, dtype=np.int32), len(keep)),
    )
    return block, obs_index[~finite].tolist()


def cache_features(cfg: GenerateConfig, job: Job, out) -> None:
    """With ``cache_features``: the frozen features of every frame of the store not cached yet
    (``cached_features.add_features``; on a complete store with ``resume``, this adds a cache without sampling)."""
    if cfg.cache_features:
        add_features(
            out,
            job.teacher.policy,
            job.teacher.preprocessor,
            job.dataset,
            cfg.feature_dtype,
            cfg.batch_size,
            cfg.num_workers,
        )
