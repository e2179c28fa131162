"""The ``frames`` check: exactly K pairs per frame, no duplicate (obs_index, sample), and whether every frame of the
generation is done (``incomplete`` when not, with the command that finishes it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reflowpairs.store.reader import PairStore
from reflowpairs.validate.report import FAIL, INCOMPLETE, PASS, CheckResult, Problems, listed
from reflowpairs.validate.shards import ShardPass


@dataclass
class FramesResult:
    result: CheckResult
    done: int
    expected: int | None
    present: np.ndarray  # distinct obs_index values stored


def check_frames(
    store: PairStore, found: ShardPass, selected: np.ndarray | None, resume: str
) -> FramesResult:
    """Exactly K pairs per frame, no duplicate (obs_index, sample), and whether every frame is done.

    ``selected``: the obs_index of every frame generation selects (in the store's partition), when the dataset is
    known; else the manifest's frame count is expected. Frames of shards that could not be read count as not done;
    ``--resume`` does not replace a listed shard, so a store with such shards (or with checksum mismatches) fails here
    instead of being sent to ``--resume``."""
    manifest = store.manifest
    generation = manifest.get("generation", {})
    k = int(generation["samples_per_frame"])
    skipped = {int(v) for v in manifest.get("skipped_frames", []) or []}
    obs = np.concatenate(found.obs_index) if found.obs_index else np.zeros(0, np.int64)
    problems = _pair_problems(store, found, obs, k)
    present = np.unique(obs)
    partition = manifest.get("partition") or {}
    expected = (
        int(partition.get("num_frames", generation["num_frames"])) if selected is None else len(selected)
    )
    done = len(present)
    if selected is not None:
        missing = np.setdiff1d(selected, present)
        missing = missing[~np.isin(missing, np.fromiter(skipped, np.int64, len(skipped)))]
        remaining = len(missing)
    else:
        remaining = max(expected - done - len(skipped), 0)
        missing = None
    if done + len(skipped) > expected:
        problems.add(
            f"{done} frames stored (+{len(skipped)} skipped), more than the {expected} frames generation selected"
        )
    if problems:
        return FramesResult(CheckResult("frames", FAIL, problems.text()), done, expected, present)
    skipped_note = f", {len(skipped)} skipped as non-finite" if skipped else ""
    if remaining or not manifest.get("complete"):
        which = f" (missing obs_index {listed(missing)})" if missing is not None and len(missing) else ""
        flag = "; the manifest says complete: false" if not manifest.get("complete") else ""
        if found.shards or found.checksums:
            detail = (
                f"{done} of {expected} frames in readable shards{skipped_note}{which}{flag}; damaged shards (see shards "
                "and checksums) are not replaced by --resume: restore them, or regenerate the store with --overwrite"
            )
            return FramesResult(CheckResult("frames", FAIL, detail), done, expected, present)
        detail = f"{done} of {expected} frames done, {remaining} remaining{skipped_note}{which}{flag}. Finish it with: {resume}"
        return FramesResult(CheckResult("frames", INCOMPLETE, detail), done, expected, present)
    return FramesResult(
        CheckResult("frames", PASS, f"{done} frames x K={k} pairs, no duplicates{skipped_note}"),
        done,
        expected,
        present,
    )


def _pair_problems(store: PairStore, found: ShardPass, obs: np.ndarray, k: int) -> Problems:
    """Samples outside 0..K-1, duplicate (obs_index, sample) pairs, and frames without exactly K pairs; ``obs`` (N,)
    is every readable pair's obs_index, in shard order."""
    sample = np.concatenate(found.sample) if found.sample else np.zeros(0, np.int32)
    shard_of = np.concatenate(found.shard_of) if found.shard_of else np.zeros(0, np.int32)
    problems = Problems()
    out_of_range = (sample < 0) | (sample >= k)
    for i in np.unique(shard_of[out_of_range]):
        bad = np.unique(sample[out_of_range & (shard_of == i)])
        problems.add(f"{store.shards[i]['path']}: sample values {listed(bad)} outside 0..{k - 1} (K={k})")
    order = np.lexsort((sample, obs))
    obs_sorted, sample_sorted, shard_sorted = obs[order], sample[order], shard_of[order]
    same = (obs_sorted[1:] == obs_sorted[:-1]) & (sample_sorted[1:] == sample_sorted[:-1])
    duplicates = np.flatnonzero(same)
    if len(duplicates):
        first = duplicates[0]
        where = sorted(
            {
                store.shards[int(shard_sorted[j])]["path"]
                for j in np.flatnonzero(
                    (obs_sorted == obs_sorted[first]) & (sample_sorted == sample_sorted[first])
                )
            }
        )
        frames_dup = np.unique(obs_sorted[duplicates])
        problems.add(
            f"{len(duplicates)} duplicate pair(s) over {len(frames_dup)} frame(s): e.g. obs_index {int(obs_sorted[first])} "
            f"sample {int(sample_sorted[first])} is stored in {', '.join(where)}"
            + (" (listed twice)" if len(where) == 1 else "")
        )
    present, counts = np.unique(obs, return_counts=True)
    uneven = present[counts != k]
    if len(uneven) and not len(duplicates):
        i = int(shard_of[np.flatnonzero(obs == uneven[0])[0]])
        problems.add(
            f"{len(uneven)} frame(s) do not have exactly K={k} pairs, e.g. obs_index {int(uneven[0])} has "
            f"{int(counts[present == uneven[0]][0])} (in {store.shards[i]['path']})"
        )
    return problems
