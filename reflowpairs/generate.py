"""Stage 1: run the teacher's sampler over every frame of a dataset and store (X_0, X_1, obs_index) pairs.

The teacher is loaded once. Frames are loaded in DataLoader workers, the engine samples K pairs
per frame with one shared prefix per frame, and a background thread writes atomic shards while
the device works on the next batch. X_0 is a pure function of (seed, obs_index, sample), so runs
that batch differently, resume, or split the frames give the same pairs.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reflowpairs import __version__
from reflowpairs.atomic import check_writable
from reflowpairs.dataset import (
    check_episodes,
    check_features,
    dataset_provenance,
    frame_indices,
    open_dataset,
    open_metadata,
)
from reflowpairs.distributed import DistContext
from reflowpairs.engine import make_engine, resolve_frames_per_call
from reflowpairs.errors import ReflowPairsError
from reflowpairs.featurecache import (
    FEATURE_KEY,
    FEATURES_DIR,
    FeatureSink,
    assemble_captured,
    check_feature_dtype,
    missing_frames_error,
    refuse_uncacheable,
    source_cache,
)
from reflowpairs.merge import absorb_parts
from reflowpairs.noise import batch_noise
from reflowpairs.pairstore import (
    FORMAT,
    MANIFEST,
    PARTS_DIR,
    SHARDS_DIR,
    STORE_ENTRIES,
    TMP_PREFIX,
    X0_MODES,
    JobDifference,
    Pairs,
    PairStore,
    PairStoreWriter,
    StoreManifest,
    manifest_format,
    remove_path,
)
from reflowpairs.policies import config_num_steps
from reflowpairs.solvers import SolverConfig
from reflowpairs.storelock import StoreLock
from reflowpairs.teacher import compute_dtype, load_policy, parameter_dtypes, read_policy_config, rename_map
from reflowpairs.threads import ThreadPlan, apply_threads

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Progress = Callable[[int, int, float], None]
"""``progress(frames_done_this_run, pairs_done_this_run, seconds)``, called after each batch (the last one once the last
shard is written): ``seconds`` is on the clock of ``GenerateResult.seconds``, so the last call's rate is the summary's."""


@dataclass
class GenerateConfig:
    """Settings of ``reflowpairs generate`` (see ``docs/pair-store.md`` for what is stored)."""

    teacher: str
    dataset: str
    out: Path
    dataset_root: Path | None = None
    episodes: list[int] | None = None
    samples_per_frame: int = 4
    num_steps: int | None = None  # None: the teacher config's step count (num_steps / num_inference_steps)
    solver: str = "euler"
    rtol: float = 1e-5
    atol: float = 1e-5
    batch_size: int = 16  # frames per loaded batch (each samples batch_size * K pairs)
    tokens_per_call: int | None = (
        None  # suffix tokens per engine call; 0: whole batch; None: the device's default
    )
    shard_size: int = 4096  # pairs per shard (rounded to whole frames)
    seed: int = 0
    device: str = "auto"
    backend: str = "zarr"
    num_workers: int = 0
    resume: bool = False
    overwrite: bool = False
    on_nonfinite: str = "error"  # "error" | "skip"
    partition: tuple[int, int] | None = None  # (i, P): only frames with obs_index % P == i
    dtype: str = "float32"  # autocast dtype: float32 (none), or bfloat16/float16 through torch.autocast
    exact: bool = False  # lerobot's own sampler per frame (bit for bit), no prefix sharing
    x0: str = "explicit"  # "explicit": shards store X_0; "implicit": no X_0 array, readers regenerate it from the seed
    writer_id: str = "w0"
    cache_features: bool = False  # also store each frame's frozen features (reflowpairs.featurecache)
    feature_dtype: str = "float32"  # storage dtype of the cached features: float32, float16 or bfloat16
    # a store whose feature cache the teacher's prefix fills read instead of running its frozen vision encoder (a
    # later reflow round whose teacher shares those weights); the new store gets the same features (cache_features)
    features_from: str | None = None
    # cache_features when a student of the teacher's checkpoint could train with the cache (its vision encoder and
    # projector frozen by its config: featurecache.student_cache_problems), else not (reflowpairs pipeline's round 1)
    cache_features_if_allowed: bool = False
    # torch intra-op threads of this process: None keeps the caller's torch.set_num_threads, a number sets it,
    # "auto" plans them around the DataLoader workers (what the command line uses; reflowpairs.threads)
    threads: int | str | None = None


@dataclass
class GenerateResult:
    out: Path
    num_pairs: int  # in the whole store
    num_frames: int  # in the whole store
    new_pairs: int  # written by this run
    seconds: float
    skipped: list[int] = field(default_factory=list)  # obs_index of frames skipped for non-finite X_1

    @property
    def pairs_per_second(self) -> float:
        return self.new_pairs / self.seconds if self.seconds > 0 else 0.0


def software_versions() -> dict[str, str]:
    import lerobot
    import pyarrow
    import zarr

    return {
        "reflowpairs": __version__,
        "lerobot": getattr(lerobot, "__version__", "unknown"),
        "torch": torch.__version__,
        "zarr": zarr.__version__,
        "pyarrow": pyarrow.__version__,
    }


def _check_args(cfg: GenerateConfig) -> None:
    check_feature_dtype(cfg.feature_dtype)
    if cfg.features_from is not None and cfg.exact:
        raise ReflowPairsError(
            "`features_from` feeds the prefix-cached engine's prefix fills; `exact` runs lerobot's own sampler.",
            "Unset `exact` or `features_from`.",
        )
    if cfg.samples_per_frame < 1:
        raise ReflowPairsError(f"`samples_per_frame` must be at least 1, got {cfg.samples_per_frame}.")
    if cfg.batch_size < 1:
        raise ReflowPairsError(f"`batch_size` must be at least 1, got {cfg.batch_size}.")
    if cfg.num_steps is not None and cfg.num_steps < 1:
        raise ReflowPairsError(
            f"`num_steps` must be at least 1, got {cfg.num_steps}.",
            "Leave `num_steps` unset to use the teacher's num_steps.",
        )
    if cfg.num_workers < 0:
        raise ReflowPairsError(
            f"`num_workers` must be 0 (load in the main process) or more, got {cfg.num_workers}."
        )
    if cfg.shard_size < 1:
        raise ReflowPairsError(f"`shard_size` must be at least 1, got {cfg.shard_size}.")
    SolverConfig(
        cfg.solver, 1 if cfg.num_steps is None else cfg.num_steps, cfg.rtol, cfg.atol
    )  # solver, rtol, atol
    if cfg.tokens_per_call is not None and cfg.tokens_per_call < 0:
        raise ReflowPairsError(f"`tokens_per_call` must be 0 (no limit) or more, got {cfg.tokens_per_call}.")
    if cfg.exact and cfg.solver != "euler":
        raise ReflowPairsError(
            f"`exact` runs lerobot's own Euler sampler; it cannot run `solver` {cfg.solver}.",
            "Unset `exact`, or set `solver` to euler.",
        )
    if cfg.on_nonfinite not in ("error", "skip"):
        raise ReflowPairsError(f"`on_nonfinite` must be 'error' or 'skip', got {cfg.on_nonfinite!r}.")
    if cfg.x0 not in X0_MODES:
        raise ReflowPairsError(
            f"`x0` must be one of {', '.join(X0_MODES)}, got {cfg.x0!r}.",
            "explicit stores X_0 in every shard; implicit leaves it out (readers regenerate it from the seed).",
        )
    if cfg.dtype not in COMPUTE_DTYPES:
        raise ReflowPairsError(f"`dtype` must be one of {', '.join(COMPUTE_DTYPES)}, got {cfg.dtype!r}.")
    if cfg.resume and cfg.overwrite:
        raise ReflowPairsError("`resume` and `overwrite` contradict each other.", "Set one of them.")
    if cfg.partition is not None and not (cfg.partition[1] >= 1 and 0 <= cfg.partition[0] < cfg.partition[1]):
        raise ReflowPairsError(
            f"`partition` {cfg.partition[0]}/{cfg.partition[1]} is not a slice i/P with 0 <= i < P."
        )
    _check_out(cfg)


def _user_entries(out: Path) -> list[str]:
    """Names in ``out`` that a pair store does not put there (the user's own files), sorted."""
    if not out.is_dir():
        return []
    return sorted(
        p.name for p in out.iterdir() if p.name not in STORE_ENTRIES and not p.name.startswith(TMP_PREFIX)
    )


def _listed(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_out(cfg: GenerateConfig) -> None:
    """Refuse an --out this run must not write to; reads only. Called before anything is loaded, and again under the
    store lock (``_open_store``) in case another run changed --out in between.

    - ``--resume``: --out must hold a readable pair store (any damage to its manifest is named here);
    - a ``manifest.json`` that is not a pair store's (unreadable, or another ``format``) is never replaced;
    - a pair store is refused without ``--resume`` / ``--overwrite``;
    - a directory with ``shards/`` or ``parts/`` but no manifest is refused (they are not known to be ours);
    - any other non-empty directory is refused without ``--overwrite``, which writes the store beside its files.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ReflowPairsError(
            f"`out` {out} exists and is not a directory.", "Give a directory for the pair store."
        )
    has_manifest = (out / MANIFEST).exists()
    if cfg.resume:
        if not has_manifest:
            raise ReflowPairsError(
                f"`resume` is set but {out} holds no pair store ({MANIFEST} missing).",
                "Unset `resume` to start a new store there.",
            )
        StoreManifest.read(out)
        return
    if has_manifest:
        fmt, why = manifest_format(out)
        if fmt != FORMAT:
            reason = why or f"{out / MANIFEST} has format {fmt!r}, not {FORMAT!r}"
            raise ReflowPairsError(
                f"`out` {out} is not a pair store: {reason.rstrip('.')}.",
                f"generate never replaces a {MANIFEST} it did not write, not even with `overwrite`: choose another "
                "`out` (for example a new subdirectory).",
            )
        if not cfg.overwrite:
            raise ReflowPairsError(
                f"`out` {out} already holds a pair store.",
                "Set `resume` to finish it (same teacher, dataset and settings), `overwrite` to replace it, "
                "or choose another `out`.",
            )
        return
    ours = [name for name in (SHARDS_DIR, PARTS_DIR) if (out / name).exists()]
    if ours:
        raise ReflowPairsError(
            f"`out` {out} has a {ours[0]}/ directory but no {MANIFEST}, so it is not a pair store that generate can "
            "resume or replace.",
            "Choose an empty `out` (or delete that directory yourself if it is what is left of a store).",
        )
    others = _user_entries(out)
    if others and not cfg.overwrite:
        raise ReflowPairsError(
            f"`out` {out} is not empty and is not a pair store: it holds {_listed(others)}.",
            "Choose a new or empty `out` (for example a new subdirectory), or set `overwrite` to write the store "
            f"beside these files ({MANIFEST}, {SHARDS_DIR}/; your files are left alone).",
        )


def _resume_manifest(out: Path, fresh: StoreManifest) -> StoreManifest:
    """The existing manifest, after checking it is the same job as ``fresh`` (``StoreManifest.job_differences``)."""
    manifest = StoreManifest.read(out)
    differences = manifest.job_differences(fresh)
    storage = next((d for d in differences if d.field == "x0 storage"), None)
    if storage is not None:
        raise ReflowPairsError(
            f"Cannot resume {out}: its X_0 is {storage.ours} ({_X0_WORDS.get(storage.ours, '?')}), and this run asks "
            f"for `x0` {storage.theirs}; a store keeps X_0 one way in every shard.",
            f"Resume with `x0` {storage.ours}, or set `overwrite` to start over.",
        )
    if differences:
        raise ReflowPairsError(
            f"Cannot resume {out}: it was made with other inputs or settings: "
            + "; ".join(map(_store_vs_run, differences))
            + ".",
            "Resume with the original settings, or set `overwrite` to start over.",
        )
    return manifest


def _store_vs_run(diff: JobDifference) -> str:
    return f"{diff.field}: store has {diff.ours!r}, this run has {diff.theirs!r}"


_X0_WORDS = {"explicit": "stored in every shard", "implicit": "not stored, regenerated from the seed"}


def _clear_unlisted(manifest: StoreManifest) -> None:
    """Remove shards/ entries the manifest does not list (leftovers of an interrupted run)."""
    for path in manifest.leftovers():
        remove_path(path)


def _overwrite(manifest: StoreManifest) -> None:
    """Replace the store in ``manifest.out`` by the empty ``manifest``, then remove the old store's shards and parts.

    The new manifest goes in first (one atomic rename), so a crash part-way leaves a sound empty store whose
    leftovers ``--resume`` removes. Only the store's own entries go: files of the user's beside it stay."""
    manifest.write()
    for name in (PARTS_DIR, SHARDS_DIR, FEATURES_DIR):
        remove_path(manifest.out / name)


class _BackgroundWriter:
    """Runs ``PairStoreWriter.add`` (and ``skip``) on a thread so the device never waits on shard I/O; the thread is
    the only one that touches the manifest while sampling runs."""

    def __init__(self, writer: PairStoreWriter, depth: int = 4):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="reflowpairs-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    if isinstance(item, Pairs):
                        self.writer.add(item)
                    else:  # obs_index of frames skipped for non-finite X_1
                        self.writer.skip(item)
                except BaseException as err:  # noqa: BLE001 - re-raised on the main thread
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            raise _write_failed(self.writer.out, self._error) from self._error

    def put(self, pairs: Pairs) -> None:
        self._raise()
        self._queue.put(pairs)

    def skip(self, obs_index: list[int]) -> None:
        self._raise()
        self._queue.put(list(obs_index))

    def close(self, complete: bool) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()
        try:
            self.writer.close(complete)
        except OSError as err:
            raise _write_failed(self.writer.out, err) from err


def _write_failed(out: Path, err: BaseException) -> ReflowPairsError:
    return ReflowPairsError(
        f"Writing the pair store {out} failed ({type(err).__name__}: {err}). Every shard the manifest lists is complete.",
        "Free disk space or fix permissions, then rerun the same command with `resume`.",
    )


@dataclass
class _Job:
    """Everything loaded once per process: the teacher, the dataset and what the store will record."""

    teacher: Any
    dataset: Any
    engine: Any
    solver: SolverConfig
    frame_index: np.ndarray  # global obs_index of each dataset position (selected episodes)
    fresh: StoreManifest  # the manifest a new store at --out would start with (not written)
    features: Any = None  # featurecache.TrainingCache of `features_from`, read instead of the vision encoder


def _prepare(cfg: GenerateConfig, device: str, out: Path) -> _Job:
    # the cheap checks first: a wrong --teacher, --dataset-root or --episodes is reported before the teacher loads
    read_policy_config(cfg.teacher)
    check_episodes(cfg.episodes, open_metadata(cfg.dataset, cfg.dataset_root).total_episodes, cfg.dataset)
    teacher = load_policy(cfg.teacher, device)
    dataset = open_dataset(cfg.dataset, cfg.dataset_root, cfg.episodes)
    check_features(teacher.config, dataset.meta, rename_map(teacher.preprocessor))
    call_frames = resolve_frames_per_call(
        cfg.tokens_per_call,
        cfg.batch_size,
        cfg.samples_per_frame,
        teacher.config.chunk_size,
        next(teacher.policy.parameters()).device,
    )
    engine = make_engine(teacher.policy, call_frames, exact=cfg.exact)
    solver = SolverConfig(
        cfg.solver,
        config_num_steps(teacher.config) if cfg.num_steps is None else cfg.num_steps,
        cfg.rtol,
        cfg.atol,
    )
    frame_index = frame_indices(dataset)
    generation = {
        "num_steps": solver.num_steps,
        "solver": solver.name,
        "rtol": solver.rtol if solver.name == "dopri5" else None,
        "atol": solver.atol if solver.name == "dopri5" else None,
        "samples_per_frame": cfg.samples_per_frame,
        "seed": cfg.seed,
        "episodes": cfg.episodes,
        "num_frames": int(len(frame_index)),
        "dtype": cfg.dtype,
        "parameter_dtypes": parameter_dtypes(teacher.policy),
        "sampler": "exact" if cfg.exact else "prefix-cached",
        "frames_per_call": engine.frames_per_call,
        "x0": cfg.x0,
    }
    provenance = {
        "teacher": teacher.provenance(),
        "dataset": dataset_provenance(dataset, cfg.episodes),
        "generation": generation,
        "software": software_versions(),
    }
    if cfg.partition is not None:
        index, count = cfg.partition
        provenance["partition"] = {
            "index": index,
            "count": count,
            "num_frames": int((frame_index % count == index).sum()),
        }
    fresh = StoreManifest.new(
        out,
        cfg.backend,
        engine.noise_shape,
        (engine.noise_shape[0], engine.action_dim),
        provenance,
        x0=cfg.x0,
    )
    return _Job(teacher, dataset, engine, solver, frame_index, fresh)


def _open_store(out: Path, job: _Job, cfg: GenerateConfig) -> StoreManifest:
    """The store's manifest after the --out / --resume / --overwrite checks; only then is --out touched.

    Runs in the main process while it holds the store lock, so no other writer can change --out meanwhile."""
    _check_out(cfg)  # again, now under the lock: another run may have written --out since _check_args
    manifest = _resume_manifest(out, job.fresh) if cfg.resume else job.fresh
    partitions = manifest.data.get("partition"), job.fresh.data.get("partition")
    if cfg.resume and partitions[0] != partitions[1]:
        raise ReflowPairsError(
            f"Cannot resume {out}: it is partition {partitions[0]}, this run is {partitions[1]}.",
            "Resume with the `partition` it was made with.",
        )
    # Nothing in --out is touched before every check above has passed.
    check_writable(out)
    if cfg.resume:
        _clear_unlisted(manifest)
        absorb_parts(manifest)  # sub-stores of an interrupted multi-process run
    elif cfg.overwrite:
        _overwrite(manifest)
    manifest.set_complete(False)
    return manifest


def _todo(job: _Job, out: Path, partition: tuple[int, int] | None) -> tuple[np.ndarray, int]:
    """Dataset positions still to sample (in this partition) and how many frames are done: frames in listed shards and
    frames recorded as skipped for non-finite X_1 (which a resume must not sample again)."""
    store = PairStore(out)
    done = np.union1d(store.index()[0], np.asarray(store.meta.skipped_frames, dtype=np.int64))
    selected = np.ones(len(job.frame_index), dtype=bool)
    if partition is not None:
        selected = job.frame_index % partition[1] == partition[0]
    todo = np.flatnonzero(selected & ~np.isin(job.frame_index, done))
    return todo, int(selected.sum()) - len(todo)


@dataclass(frozen=True)
class GeneratePlan:
    """What a run will do, reported once before sampling (``generate``'s ``on_plan``)."""

    frames_to_do: int
    frames_done: int
    samples_per_frame: int
    solver: str  # e.g. "euler, 10 steps"
    sampler: str  # "prefix-cached" | "exact"
    frames_per_call: int
    compute_dtype: str  # the least precise dtype the teacher computes in
    device: str
    threads: str  # ThreadPlan.describe()


def generate(
    cfg: GenerateConfig,
    progress: Progress | None = None,
    on_plan: Callable[[GeneratePlan], None] | None = None,
) -> GenerateResult:
    """Run stage 1. ``on_plan(plan)`` is called once before sampling.

    Launched with torchrun / accelerate (WORLD_SIZE > 1), each process samples its own share of the remaining frames
    into ``OUT/parts/<rank>``, and the main process moves those shards into the store at the end."""
    _check_args(cfg)
    threads = apply_threads(cfg.threads, cfg.num_workers)
    dist = DistContext.from_env()
    if dist.world > 1 and cfg.partition is not None:
        raise ReflowPairsError(
            "`partition` is for single-process slices; do not combine it with a multi-process launch."
        )
    out = Path(cfg.out)
    with contextlib.ExitStack() as held:
        failure = None
        if (
            dist.is_main
        ):  # one writer per store: the main process holds OUT/.lock for the whole run, for every rank
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
    progress: Progress | None,
    on_plan: Callable[[GeneratePlan], None] | None,
) -> GenerateResult:
    """``generate`` once the main process holds the store lock."""
    job = _prepare(cfg, dist.device(cfg.device), out)
    if cfg.features_from is not None:  # read, and kept in the new store as they are (their dtype)
        job.features = source_cache(cfg.features_from, job.teacher.policy)
        job.engine.feature_slots = list(job.features.index["slots"])
        cfg = replace(cfg, cache_features=True, feature_dtype=job.features.index["dtype"])
    if cfg.cache_features_if_allowed and not cfg.cache_features:
        from reflowpairs.featurecache import student_cache_problems

        cfg = replace(cfg, cache_features=not student_cache_problems(job.teacher.policy))
    if cfg.cache_features:
        refuse_uncacheable(job.teacher.policy)
    failure = None
    if dist.is_main:
        try:
            manifest = _open_store(out, job, cfg)
        except ReflowPairsError as err:
            failure = (err.what, err.hint)
    failure = dist.broadcast(failure)
    if failure is not None:
        raise ReflowPairsError(*failure)
    todo, done = _todo(job, out, cfg.partition)
    if on_plan is not None:
        g = job.fresh.data["generation"]
        on_plan(
            GeneratePlan(
                len(todo),
                done,
                cfg.samples_per_frame,
                f"{job.solver.name}" + ("" if job.solver.adaptive else f", {job.solver.num_steps} steps"),
                g["sampler"],
                g["frames_per_call"],
                compute_dtype(g["parameter_dtypes"], g["dtype"]),
                str(job.engine.device),
                threads.describe(),
            )
        )
    if dist.world == 1:
        result = _sample_frames(job, manifest, todo, cfg.writer_id, cfg, progress, cfg.cache_features)
        _cache_features(cfg, job, out)
        final = StoreManifest.read(out).data
        return GenerateResult(out, final["num_pairs"], final["num_frames"], *result)
    token = dist.broadcast(uuid.uuid4().hex[:8])
    part = out / PARTS_DIR / f"rank{dist.rank:03d}-{token}"
    sub = StoreManifest.read(out).emptied(part)
    try:
        result, failure = (
            _sample_frames(
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
            _cache_features(cfg, job, out)
    dist.barrier()
    final = StoreManifest.read(out).data
    new_pairs = sum(r[0] for r in dist.all_gather(result))
    dist.close()
    if failures:
        raise ReflowPairsError(*failures[0])
    return GenerateResult(
        out, final["num_pairs"], final["num_frames"], new_pairs, result[1], final.get("skipped_frames", [])
    )


def _cache_features(cfg: GenerateConfig, job: _Job, out: Path) -> None:
    """With ``cache_features``: the frozen features of every frame of the store not cached yet
    (``featurecache.add_features``; on a complete store with ``resume``, this adds a cache without sampling)."""
    if cfg.cache_features:
        from reflowpairs.featurecache import add_features

        add_features(
            out,
            job.teacher.policy,
            job.teacher.preprocessor,
            job.dataset,
            cfg.feature_dtype,
            cfg.batch_size,
            cfg.num_workers,
        )


def _sample_frames(
    job: _Job,
    manifest: StoreManifest,
    positions: np.ndarray,
    writer_id: str,
    cfg: GenerateConfig,
    progress: Progress | None,
    features: bool = False,
) -> tuple[int, float, list[int]]:
    """Sample every frame at dataset ``positions`` into ``manifest``'s store; returns (pairs, seconds, skipped).
    ``features``: also keep each frame's frozen features, as the prefix fills compute them (``FeatureSink``)."""
    manifest.out.mkdir(parents=True, exist_ok=True)
    sink = FeatureSink(manifest.out, job.teacher.policy, cfg.feature_dtype) if features else None
    try:
        writer = _BackgroundWriter(
            PairStoreWriter(manifest, cfg.shard_size, cfg.samples_per_frame, writer_id)
        )
    except OSError as err:
        raise _write_failed(manifest.out, err) from err
    start, frames, pairs = time.perf_counter(), 0, 0
    items = job.dataset
    if job.features is not None:  # no image decoded, no vision encoder run: the cached features instead
        items = job.features.frames(job.dataset)
        lacking = job.frame_index[positions][~items.reader.has(job.frame_index[positions])]
        if len(lacking):
            err = missing_frames_error(job.features.store, lacking)
            raise ReflowPairsError(
                err.what, "Add them to that store's cache first, or unset `features_from`."
            )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(items, positions.tolist()),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=job.engine.device.type == "cuda",
    )
    complete = False
    try:
        for number, batch in enumerate(loader, start=1):
            block, bad = _sample_batch(batch, job.teacher.preprocessor, job.engine, job.solver, cfg, sink)
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
            if progress is not None and number < len(
                loader
            ):  # the last batch is reported once its shard is written
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


def _sample_batch(
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
    compute = COMPUTE_DTYPES[cfg.dtype]
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
