"""The ``spot check``: re-sample chosen pairs' X_1 with the teacher from their X_0 and compare within ``atol``.

Every one of a chosen frame's K samples is re-sampled from the regenerated X_0, in calls of the recorded size, as
generate computed them (an adaptive solve and the folding of samples into cache rows span all K), and the chosen
ones are compared; a store without a recorded seed falls back to the chosen samples' stored X_0."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from reflowpairs.dataset import check_features, frame_indices
from reflowpairs.generate.config import COMPUTE_DTYPES
from reflowpairs.noise import batch_noise
from reflowpairs.policies import make_engine
from reflowpairs.progress import PhaseProgress
from reflowpairs.solvers import SolverConfig
from reflowpairs.store.reader import PairStore
from reflowpairs.teacher import compute_dtype, load_policy, rename_map
from reflowpairs.validate.config import SPOT_CHECK_ATOL, ValidateConfig
from reflowpairs.validate.report import FAIL, PASS, CheckResult, Problems, listed
from reflowpairs.validate.shards import ShardPass, SpotPair

Difference = tuple[float, str, int, int]
"""max |X_1 re-sampled - X_1 stored| of one pair, its shard, obs_index and sample."""


@dataclass
class _Sampler:
    """The recorded teacher and sampler, loaded as generate ran them."""

    source: str
    teacher: Any  # reflowpairs.teacher.Teacher
    engine: Any  # reflowpairs.engine.Engine
    solver: Any  # reflowpairs.solvers.SolverConfig


def spot_check_atol(generation: dict[str, Any]) -> tuple[float, str]:
    """The default spot-check tolerance of a store and the compute dtype it follows."""

    dtype = compute_dtype(generation.get("parameter_dtypes") or {}, generation.get("dtype", "float32"))
    return SPOT_CHECK_ATOL.get(dtype, SPOT_CHECK_ATOL["float32"]), dtype


def _load_sampler(store: PairStore, cfg: ValidateConfig, dataset) -> _Sampler:
    """The teacher (``cfg.teacher``, else the recorded one) with the recorded solver and sampler."""

    generation = store.manifest["generation"]
    solver = SolverConfig(
        generation["solver"],
        int(generation["num_steps"]),
        generation.get("rtol") or SolverConfig.rtol,
        generation.get("atol") or SolverConfig.atol,
    )
    source = cfg.teacher or store.manifest.get("teacher", {}).get("source")
    teacher = load_policy(source, cfg.device, tokenizer=cfg.tokenizer)
    check_features(teacher.config, dataset.meta, rename_map(teacher.preprocessor))
    engine = make_engine(
        teacher.policy, generation.get("frames_per_call"), exact=generation.get("sampler") == "exact"
    )
    return _Sampler(source, teacher, engine, solver)


def spot_check(
    store: PairStore, cfg: ValidateConfig, found: ShardPass, dataset, progress: PhaseProgress | None
) -> CheckResult:
    """Re-sample the chosen pairs' X_1 with the teacher from their stored X_0 and compare within ``atol``."""
    if not found.spot:
        return CheckResult("spot check", FAIL, "no readable pair to re-sample")
    generation = store.manifest["generation"]
    sampler = _load_sampler(store, cfg, dataset)
    positions = {int(v): p for p, v in enumerate(frame_indices(dataset).tolist())}
    chosen = sorted(found.spot.items(), key=lambda item: (item[1][1], item[1][2]))
    problems = Problems()
    unknown = sorted({obs for _, (_, obs, _, _, _) in chosen if obs not in positions})
    if unknown:
        problems.add(f"obs_index {listed(unknown)} not in the dataset; those pairs were not re-sampled")
    by_frame: dict[int, list[SpotPair]] = {}
    for _, item in chosen:
        if item[1] in positions:
            by_frame.setdefault(item[1], []).append(item)
    default_atol, dtype = spot_check_atol(generation)
    atol = cfg.atol if cfg.atol is not None else default_atol
    diffs = _resample(sampler, generation, by_frame, positions, dataset, cfg.batch_size, progress)
    worst = max(diffs, default=(0.0, "", -1, -1))
    bad = sorted((d for d in diffs if not d[0] <= atol), reverse=True)
    solver = sampler.solver
    what = f"{solver.name}, {solver.num_steps} steps" + (
        f", computed in {dtype}" if dtype != "float32" else ""
    )
    if bad:
        d, shard, obs, sample = bad[0]
        problems.add(
            f"{len(bad)} of {len(diffs)} re-sampled pairs differ from the stored X_1 by more than --atol {atol:g} "
            f"(teacher {sampler.source}, {what}); worst {d:.3g} at {shard} obs_index {obs} sample {sample}: the store was made with "
            "other settings, another sampler or another teacher than its manifest says"
        )
    if problems:
        return CheckResult("spot check", FAIL, problems.text())
    return CheckResult(
        "spot check",
        PASS,
        f"{len(diffs)} pairs re-sampled ({what}): max |X_1 difference| {worst[0]:.3g} <= atol {atol:g}",
    )


def _resample(
    sampler: _Sampler,
    generation: dict[str, Any],
    by_frame: dict[int, list[SpotPair]],
    positions: dict[int, int],
    dataset,
    batch_size: int,
    progress: PhaseProgress | None,
) -> list[Difference]:
    """Re-sample the frames of ``by_frame`` (obs_index -> its chosen pairs) in batches of ``batch_size`` frames and
    return each chosen pair's difference to its stored X_1 (progress phase ``"spot check"``)."""

    whole_frames = generation.get("seed") is not None
    k_all = int(generation["samples_per_frame"])
    # samples per call and frame -> frames (a call needs the same K for every frame)
    groups: dict[int, list[int]] = {}
    for obs, items in by_frame.items():
        groups.setdefault(k_all if whole_frames else len(items), []).append(obs)
    compute = (
        getattr(torch, generation.get("dtype", "float32"))
        if generation.get("dtype", "float32") in COMPUTE_DTYPES
        else torch.float32
    )
    engine = sampler.engine
    diffs: list[Difference] = []
    done, total = 0, sum(len(v) for v in by_frame.values())
    for _k, frames in groups.items():
        for start in range(0, len(frames), batch_size):
            batch_frames = frames[start : start + batch_size]
            batch = default_collate([dataset[positions[obs]] for obs in batch_frames])
            if whole_frames:
                # (B, K, T, D0)
                noise = batch_noise(int(generation["seed"]), batch_frames, k_all, engine.noise_shape)
            else:
                noise = torch.from_numpy(
                    np.stack([np.stack([it[3] for it in by_frame[obs]]) for obs in batch_frames])
                )
            with torch.autocast(engine.device.type, dtype=compute, enabled=compute is not torch.float32):
                # (B, k, T, D1)
                x1 = (
                    engine.sample(sampler.teacher.preprocessor(batch), noise, sampler.solver)
                    .float()
                    .cpu()
                    .numpy()
                )
            for b, obs in enumerate(batch_frames):
                for j, (shard, _, sample, _, stored) in enumerate(by_frame[obs]):
                    column = sample if whole_frames else j
                    diff = (
                        float(np.max(np.abs(x1[b, column] - stored)))
                        if np.isfinite(stored).all()
                        else math.inf
                    )
                    diffs.append((diff, shard, obs, sample))
            done += sum(len(by_frame[obs]) for obs in batch_frames)
            if progress is not None:
                progress("spot check", done, total)
    return diffs
