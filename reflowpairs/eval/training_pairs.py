"""``--pairs``: the student's error on frames it trained on, from the stored X_0 to the stored X_1 (fitting vs
generalising), after checking the store fits the student and the dataset. Shapes: F frames, K stored samples per
frame, T = chunk_size, D0 = max_action_dim, A = action dimension."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reflowpairs.dataset import frame_indices, open_dataset
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.config import EvalConfig
from reflowpairs.eval.metrics import ErrorSums, pick_positions
from reflowpairs.eval.sampling import ModelUnderEval, sample_every_step_count
from reflowpairs.policies import pair_shapes
from reflowpairs.progress import PhaseProgress


def store_frames(store, max_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(obs_index (F,), x0 (F, K, T, D0), x1 (F, K, T, A))`` for up to ``max_frames`` frames of the store,
    evenly spread, all their stored samples in sample order; only shards that can hold them are read."""
    obs, _ = store.index()
    frames = np.unique(obs)
    if len(frames) == 0:
        raise ReflowPairsError(
            f"`pairs` {store.path} holds no pairs.", "Give the store the student was trained on."
        )
    chosen = frames[pick_positions(len(frames), max_frames)]
    blocks = []
    for i, shard in enumerate(store.shards):
        lo, hi = shard.get("obs_index_min", -math.inf), shard.get("obs_index_max", math.inf)
        if np.any((chosen >= lo) & (chosen <= hi)):
            data = store.read(i)
            rows = np.isin(data["obs_index"], chosen)
            if rows.any():
                blocks.append({name: data[name][rows] for name in ("x0", "x1", "obs_index", "sample")})
    cat = {name: np.concatenate([b[name] for b in blocks]) for name in ("x0", "x1", "obs_index", "sample")}
    order = np.lexsort((cat["sample"], cat["obs_index"]))
    counts = np.unique(cat["obs_index"], return_counts=True)[1]
    k = int(counts.min())
    if counts.max() != k:
        raise ReflowPairsError(
            f"`pairs` {store.path}: frames hold different numbers of samples.",
            "Run `reflowpairs validate` on it.",
        )
    x0 = cat["x0"][order].reshape(len(chosen), k, *store.x0_shape)
    x1 = cat["x1"][order].reshape(len(chosen), k, *store.x1_shape)
    return chosen, x0, x1


def check_store_fits_student_and_dataset(store, student_config, dataset_fp: str, repo_id: str) -> None:
    """Refuse a ``--pairs`` store the student cannot be scored on: other noise/action shapes, or
    generated from another dataset (its obs_index would point at other frames)."""
    noise_shape, action_shape = pair_shapes(student_config)
    if tuple(store.x0_shape) != noise_shape or tuple(store.x1_shape) != action_shape:
        raise ReflowPairsError(
            f"`pairs` {store.path} holds X_0 {tuple(store.x0_shape)} and X_1 {tuple(store.x1_shape)}, but the student "
            f"samples noise {noise_shape} into actions {action_shape}.",
            "Give the pair store this student was trained on.",
        )
    recorded = store.manifest.get("dataset", {}).get("fingerprint")
    if recorded != dataset_fp:
        raise ReflowPairsError(
            f"`pairs` {store.path} was generated from another dataset than {repo_id} (the dataset fingerprint in its "
            "manifest differs), so its obs_index cannot be looked up there.",
            "Set `dataset` (and `dataset_root`) to the dataset the store was generated from.",
        )


def measure_training_pairs(
    student: ModelUnderEval,
    store,
    cfg: EvalConfig,
    steps: list[int],
    teacher_fp: str,
    progress: PhaseProgress | None,
) -> dict[str, Any]:
    """The student's error at each step count to stored X_1 from stored X_0, on frames it trained on."""
    obs_index, x0, x1 = store_frames(store, cfg.max_frames)
    dataset = open_dataset(cfg.dataset, cfg.dataset_root, None)
    position_of = {int(i): p for p, i in enumerate(frame_indices(dataset))}
    missing = [int(i) for i in obs_index if int(i) not in position_of]
    if missing:
        raise ReflowPairsError(
            f"`pairs` {store.path} refers to obs_index {missing[:5]} that dataset {cfg.dataset} does not have.",
            "Give the dataset the store was generated from.",
        )
    sums = {n: ErrorSums() for n in steps}
    k = x0.shape[1]
    done = 0
    for start in range(0, len(obs_index), cfg.batch_size):
        chunk = slice(start, start + cfg.batch_size)
        frames = len(obs_index[chunk])
        raw = torch.utils.data.default_collate([dataset[position_of[int(i)]] for i in obs_index[chunk]])
        noise = torch.from_numpy(x0[chunk]).reshape(frames * k, *x0.shape[2:]).to(student.engine.device)
        target = torch.from_numpy(x1[chunk]).reshape(frames * k, *x1.shape[2:])
        for n, (action, _) in sample_every_step_count(student, raw, noise, k, steps).items():
            sums[n].add(action.cpu(), target)
        done += frames
        if progress is not None:
            progress("training pairs", done, len(obs_index))
    manifest = store.manifest
    store_teacher = manifest.get("teacher", {}).get("fingerprint")
    return {
        "path": str(Path(store.path).resolve()),
        "store_id": manifest.get("store_id"),
        "teacher_fingerprint": store_teacher,
        "same_teacher": store_teacher == teacher_fp,
        "episodes": manifest.get("dataset", {}).get("episodes"),
        "num_frames": int(len(obs_index)),
        "num_pairs": int(len(obs_index) * k),
        "rows": [
            {"model": "student", "num_steps": n, "mse_norm": sums[n].mse, "l1_norm": sums[n].l1}
            for n in steps
        ],
    }
