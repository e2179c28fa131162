"""``generate``: take the store lock, load the job, open the store, sample in one process or in one part per rank."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from reflowpairs.cached_features import refuse_uncacheable, source_cache, student_cache_problems
from reflowpairs.distributed import DistContext
from reflowpairs.errors import ReflowPairsError
from reflowpairs.generate.checks import check_settings
from reflowpairs.generate.config import GenerateConfig, GeneratePlan, GenerateResult, GenerationProgress
from reflowpairs.generate.job import Job, frames_to_do, plan_of, prepare_job
from reflowpairs.generate.out import open_store
from reflowpairs.generate.sampling import cache_features, sample_frames
from reflowpairs.store.layout import PARTS_DIR
from reflowpairs.store.lock import StoreLock
from reflowpairs.store.manifest import StoreManifest
from reflowpairs.store.merge import absorb_parts
from reflowpairs.threads import ThreadPlan, apply_threads


def generate(
    cfg: GenerateConfig,
    progress: GenerationProgress | None = None,
    on_plan: Callable[[GeneratePlan], None] | None = None,
) -> GenerateResult:
    """Run stage 1. ``on_plan(plan)`` is called once before sampling.

    Launched with torchrun / accelerate (WORLD_SIZE > 1), each process samples its own share of the remaining frames
    into ``OUT/parts/<rank>``, and the main process moves those shards into the store at the end."""
    check_settings(cfg)
    threads = apply_threads(cfg.threads, cfg.num_workers)
    dist = DistContext.from_env()
    if dist.world > 1 and cfg.partition is not None:
        raise ReflowPairsError(
            "`partition` is for single-process slices; do not combine it with a multi-process launch."
        )
    out = Path(cfg.out)
    with contextlib.ExitStack() as held:
        failure = None
        if dist.is_main:
            # one writer per store: the main process holds OUT/.lock for the whole run, for every rank
            try:
                held.enter_context(StoreLock.acquire(out, "generate --resume" if cfg.resume else "generate"))
            except ReflowPairsError as err:
                failure = (err.what, err.hint)
        failure = dist.broadcast(failure)
        if failure is not None:
            raise ReflowPairsError(*failure)
        return _generate(cfg, dist, out, threads, progress, on_plan)


def _generate(
    cfg: GenerateConfig,
    dist: DistContext,
    out: Path,
    threads: ThreadPlan,
    progress: GenerationProgress | None,
    on_plan: Callable[[GeneratePlan], None] | None,
) -> GenerateResult:
    """``generate`` once the main process holds the store lock."""
    job = prepare_job(cfg, dist.device(cfg.device), out)
    cfg = _with_feature_settings(cfg, job)
    failure = None
    if dist.is_main:
        try:
            manifest = open_store(out, job, cfg)
        except ReflowPairsError as err:
            failure = (err.what, err.hint)
    failure = dist.broadcast(failure)
    if failure is not None:
        raise ReflowPairsError(*failure)
    todo, done = frames_to_do(job, out, cfg.partition)
    if on_plan is not None:
        on_plan(plan_of(job, cfg, todo, done, threads))
    if dist.world == 1:
        result = sample_frames(job, manifest, todo, cfg.writer_id, cfg, progress, cfg.cache_features)
        cache_features(cfg, job, out)
        final = StoreManifest.read(out).data
        return GenerateResult(out, final["num_pairs"], final["num_frames"], *result)
    return _generate_in_parts(cfg, dist, out, job, todo, progress)


def _with_feature_settings(cfg: GenerateConfig, job: Job) -> GenerateConfig:
    """``cfg`` with the feature cache settled: ``features_from`` read (its features kept in the new store, in their
    dtype), ``cache_features_if_allowed`` decided, and a teacher that cannot be cached refused."""
    if cfg.features_from is not None:  # read, and kept in the new store as they are (their dtype)
        job.features = source_cache(cfg.features_from, job.teacher.policy)
        job.engine.feature_slots = list(job.features.index["slots"])
        cfg = replace(cfg, cache_features=True, feature_dtype=job.features.index["dtype"])
    if cfg.cache_features_if_allowed and not cfg.cache_features:
        cfg = replace(cfg, cache_features=not student_cache_problems(job.teacher.policy))
    if cfg.cache_features:
        refuse_uncacheable(job.teacher.policy)
    return cfg


def _generate_in_parts(
    cfg: GenerateConfig,
    dist: DistContext,
    out: Path,
    job: Job,
    todo,
    progress: GenerationProgress | None,
) -> GenerateResult:
    """Several processes: each rank samples every ``world``-th remaining frame into its own sub-store under
    ``OUT/parts/``, and the main process absorbs the parts (and adds the feature cache) once all are done."""
    token = dist.broadcast(uuid.uuid4().hex[:8])
    part = out / PARTS_DIR / f"rank{dist.rank:03d}-{token}"
    sub = StoreManifest.read(out).emptied(part)
    try:
        result, failure = (
            sample_frames(
                job, sub, todo[dist.rank :: dist.world], f"{token}-r{dist.rank:03d}", cfg, progress
            ),
            None,
        )
    except ReflowPairsError as err:
        result, failure = (0, 0.0, []), (f"[rank {dist.rank}] {err.what}", err.hint)
    failures = [f for f in dist.all_gather(failure) if f is not None]
    if dist.is_main:
        absorb_parts(StoreManifest.read(out))
        if not failures:
            cache_features(cfg, job, out)
    dist.barrier()
    final = StoreManifest.read(out).data
    new_pairs = sum(r[0] for r in dist.all_gather(result))
    dist.close()
    if failures:
        raise ReflowPairsError(*failures[0])
    return GenerateResult(
        out, final["num_pairs"], final["num_frames"], new_pairs, result[1], final.get("skipped_frames", [])
    )
