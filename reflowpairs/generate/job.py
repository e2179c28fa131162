"""What a generate run loads once per process (``Job``: teacher, dataset, engine, solver, the manifest a new store
would start with), which frames it still has to sample, and the plan it reports before sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reflowpairs import __version__
from reflowpairs.dataset import (
    check_episodes,
    check_features,
    dataset_provenance,
    frame_indices,
    open_dataset,
    open_metadata,
)
from reflowpairs.engine import resolve_frames_per_call
from reflowpairs.generate.config import GenerateConfig, GeneratePlan
from reflowpairs.policies import config_num_steps, family, make_engine, pair_shapes
from reflowpairs.solvers import SolverConfig
from reflowpairs.store.manifest import StoreManifest
from reflowpairs.store.reader import PairStore
from reflowpairs.teacher import compute_dtype, load_policy, parameter_dtypes, read_policy_config, rename_map
from reflowpairs.threads import ThreadPlan


@dataclass
class Job:
    """Everything loaded once per process: the teacher, the dataset and what the store will record."""

    teacher: Any
    dataset: Any
    engine: Any
    solver: SolverConfig
    frame_index: np.ndarray  # global obs_index of each dataset position (selected episodes)
    fresh: StoreManifest  # the manifest a new store at --out would start with (not written)
    features: Any = (
        None  # cached_features.AppliedFeatureCache of `features_from`, read instead of the vision encoder
    )


def software_versions() -> dict[str, str]:
    """The versions of reflowpairs and of the libraries that compute and store the pairs (recorded in the manifest)."""
    # heavy, and only to read their versions: lerobot, pyarrow and zarr
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


def prepare_job(cfg: GenerateConfig, device: str, out: Path) -> Job:
    """Load the teacher and the dataset, build the engine and solver, and the manifest a new store would record."""
    # the cheap checks first: a wrong --teacher, --dataset-root or --episodes is reported before the teacher loads
    read_policy_config(cfg.teacher)
    check_episodes(cfg.episodes, open_metadata(cfg.dataset, cfg.dataset_root).total_episodes, cfg.dataset)
    teacher = load_policy(cfg.teacher, device, tokenizer=cfg.tokenizer)
    dataset = open_dataset(cfg.dataset, cfg.dataset_root, cfg.episodes)
    check_features(teacher.config, dataset.meta, rename_map(teacher.preprocessor))
    call_frames = resolve_frames_per_call(
        cfg.tokens_per_call,
        cfg.batch_size,
        cfg.samples_per_frame,
        pair_shapes(teacher.config)[0][0],
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
    provenance = {
        "teacher": teacher.provenance(),
        "dataset": dataset_provenance(dataset, cfg.episodes),
        "generation": _generation_record(cfg, teacher, engine, solver, len(frame_index)),
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
        time_direction=family(teacher.policy_type).time_direction,
    )
    return Job(teacher, dataset, engine, solver, frame_index, fresh)


def _generation_record(cfg: GenerateConfig, teacher, engine, solver: SolverConfig, num_frames: int) -> dict:
    """The manifest's ``generation`` section: how X_1 was computed and X_0 drawn (what a resume must repeat)."""
    return {
        "num_steps": solver.num_steps,
        "solver": solver.name,
        "rtol": solver.rtol if solver.name == "dopri5" else None,
        "atol": solver.atol if solver.name == "dopri5" else None,
        "samples_per_frame": cfg.samples_per_frame,
        "seed": cfg.seed,
        "episodes": cfg.episodes,
        "num_frames": int(num_frames),
        "dtype": cfg.dtype,
        "parameter_dtypes": parameter_dtypes(teacher.policy),
        "sampler": "exact" if cfg.exact else "prefix-cached",
        "frames_per_call": engine.frames_per_call,
        "x0": cfg.x0,
    }


def frames_to_do(job: Job, out: Path, partition: tuple[int, int] | None) -> tuple[np.ndarray, int]:
    """Dataset positions still to sample (in this partition) and how many frames are done: frames in listed shards and
    frames recorded as skipped for non-finite X_1 (which a resume must not sample again)."""
    store = PairStore(out)
    done = np.union1d(store.index()[0], np.asarray(store.meta.skipped_frames, dtype=np.int64))
    selected = np.ones(len(job.frame_index), dtype=bool)
    if partition is not None:
        selected = job.frame_index % partition[1] == partition[0]
    todo = np.flatnonzero(selected & ~np.isin(job.frame_index, done))
    return todo, int(selected.sum()) - len(todo)


def plan_of(job: Job, cfg: GenerateConfig, todo: np.ndarray, done: int, threads: ThreadPlan) -> GeneratePlan:
    """The plan reported before sampling: ``todo`` dataset positions left, ``done`` frames already done."""
    g = job.fresh.data["generation"]
    return GeneratePlan(
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
