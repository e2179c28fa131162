"""The one read of every listed shard that the per-shard checks share (``read_shards``), and the ``x0 noise`` check
of a store that does not keep X_0.

Shards are read one at a time (memory: one shard, plus 16 bytes per pair for the frame checks). Every problem names
the shard (its path in the store) and what is wrong with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reflowpairs.errors import ReflowPairsError
from reflowpairs.noise import GENERATORS, initial_noise
from reflowpairs.progress import PhaseProgress
from reflowpairs.store.layout import DTYPES
from reflowpairs.store.reader import PairStore
from reflowpairs.store.soundness import LAYOUT
from reflowpairs.validate.report import FAIL, PASS, CheckResult, Problems, listed

SpotPair = tuple[str, int, int, np.ndarray, np.ndarray]
"""A pair chosen for the spot check: (shard path, obs_index, sample, X_0 (T, D0), stored X_1 (T, D1))."""


@dataclass
class ShardPass:
    """What one read of every listed shard found, per check."""

    shards: Problems = field(default_factory=Problems)
    checksums: Problems = field(default_factory=Problems)
    origin: Problems = field(default_factory=Problems)
    finite: Problems = field(default_factory=Problems)
    x0: Problems = field(default_factory=Problems)
    obs_range: Problems = field(default_factory=Problems)
    obs_index: list[np.ndarray] = field(default_factory=list)  # per readable shard, (n,) int64
    sample: list[np.ndarray] = field(default_factory=list)  # per readable shard, (n,) int32
    shard_of: list[np.ndarray] = field(default_factory=list)  # per readable shard, (n,) its shard number
    readable: int = 0
    pairs: int = 0
    spot: dict[int, SpotPair] = field(default_factory=dict)  # global pair index -> the pair


def spot_pairs(store: PairStore, spot_check: int, seed: int) -> dict[int, dict[int, int]]:
    """Which pairs the spot check re-samples: shard number -> {global pair index: row in the shard}; all pairs when
    ``spot_check`` is at least the store's size, else ``spot_check`` of them chosen with ``seed``."""
    spot_rows: dict[int, dict[int, int]] = {}
    total = store.meta.listed_pairs()
    if spot_check and total:
        picks = (
            np.arange(total)
            if spot_check >= total
            else np.sort(np.random.default_rng(seed).choice(total, spot_check, replace=False))
        )
        shards, rows = store.meta.locate_many(picks)
        for g, i, row in zip(picks.tolist(), shards.tolist(), rows.tolist(), strict=True):
            spot_rows.setdefault(i, {})[g] = row
    return spot_rows


def read_shards(
    store: PairStore,
    spot_rows: dict[int, dict[int, int]],
    x0_seed: int | None,
    total_frames: int | None,
    progress: PhaseProgress | None,
) -> ShardPass:
    """Read every listed shard once (progress phase ``"shards"``) and record what each per-shard check needs."""
    found = ShardPass()
    if not all(isinstance(e, dict) and isinstance(e.get("path"), str) for e in store.shards):
        found.shards.add("the manifest's shard list is malformed; shards not read")
        return found
    for i in range(len(store.shards)):
        try:
            _check_shard(store, i, found, x0_seed, total_frames, spot_rows.get(i, {}))
        except Exception as err:  # noqa: BLE001 - reported against the shard
            found.shards.add(f"{store.shards[i]['path']} could not be checked ({type(err).__name__}: {err})")
        if progress is not None:
            progress("shards", i + 1, len(store.shards))
    return found


def _missing_chunks(path: Path, name: str) -> str:
    """For a zarr shard: ' (k of n chunk files are missing; zarr reads them as zeros)' or ''."""
    try:
        import zarr  # heavy, and only for this explanation of a checksum failure

        array = zarr.open_group(str(path), mode="r")[name]
        missing = array.nchunks - array.nchunks_initialized
        return (
            f" ({missing} of its {array.nchunks} chunk file(s) missing; zarr reads those as zeros)"
            if missing
            else ""
        )
    except Exception:  # noqa: BLE001 - only an explanation; the checksum failure stands on its own
        return ""


def _check_shard(
    store: PairStore,
    i: int,
    found: ShardPass,
    x0_seed: int | None,
    total_frames: int | None,
    spot_rows: dict[int, int],
) -> None:
    """Read shard ``i`` once and record its problems for every per-shard check."""
    entry = store.shards[i]
    name = entry["path"]
    path = store.path / name
    if not path.exists():
        found.shards.add(f"{name} is missing")
        return
    try:
        origin = store.origin_problem(i)
        if origin is not None:
            found.origin.add(origin)
    except Exception as err:  # noqa: BLE001
        found.origin.add(f"{name}: its attributes cannot be read ({type(err).__name__}: {err})")
    try:
        # X_0 is not regenerated here: that is the x0 noise check's
        data = store.read_stored(i, store.stored_arrays)
    except ReflowPairsError as err:
        found.shards.add(err.what)
        return
    problems = store.meta.shard_problems(i, data)
    for problem in problems:
        if problem.kind == LAYOUT:
            found.shards.add(f"{name}: {problem.text}")
        else:
            extra = _missing_chunks(path, problem.array) if store.backend == "zarr" else ""
            found.checksums.add(f"{name}: {problem.text}{extra}")
    if any(problem.kind == LAYOUT for problem in problems):
        return
    found.readable += 1
    _record_obs_index(entry, data["obs_index"], found, total_frames)
    n = entry.get("num_pairs")
    _record_values(store, name, n, data, found, x0_seed)
    obs, sample = data["obs_index"], data["sample"]
    found.obs_index.append(obs)
    found.sample.append(sample)
    found.shard_of.append(np.full(n, i, np.int32))
    found.pairs += n
    for global_index, row in spot_rows.items():
        x0 = (
            data["x0"][row]
            if store.x0_stored
            else store.regenerate_x0(obs[row : row + 1], sample[row : row + 1])[0]
        )
        found.spot[global_index] = (name, int(obs[row]), int(sample[row]), x0, data["x1"][row])


def _record_obs_index(
    entry: dict[str, Any], obs: np.ndarray, found: ShardPass, total_frames: int | None
) -> None:
    """A shard's obs_index (n,) against its manifest entry (frames, min, max) and the recorded dataset's frames."""
    name = entry["path"]
    if not len(obs):
        return
    lo, hi = int(obs.min()), int(obs.max())
    if (entry.get("obs_index_min"), entry.get("obs_index_max")) != (lo, hi) or entry.get("num_frames") != len(
        np.unique(obs)
    ):
        found.shards.add(
            f"{name}: holds {len(np.unique(obs))} frames, obs_index {lo}..{hi}; its manifest entry says "
            f"{entry.get('num_frames')} frames, {entry.get('obs_index_min')}..{entry.get('obs_index_max')}"
        )
    if lo < 0 or (total_frames is not None and hi >= total_frames):
        bad = obs[(obs < 0) | (obs >= (total_frames if total_frames is not None else np.iinfo(np.int64).max))]
        found.obs_range.add(
            f"{name}: obs_index {listed(np.unique(bad))} outside the recorded dataset's frames 0..{(total_frames or 0) - 1}"
        )


def _record_values(
    store: PairStore, name: str, n: int, data: dict[str, np.ndarray], found: ShardPass, x0_seed: int | None
) -> None:
    """A shard's ``n`` stored X_0 (n, T, D0) and X_1 (n, T, D1): finite, and X_0 the noise of (seed, obs_index,
    sample)."""
    obs, sample = data["obs_index"], data["sample"]
    for array_name in ("x0", "x1") if store.x0_stored else ("x1",):
        bad = ~np.isfinite(data[array_name]).reshape(n, -1).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            count = int((~np.isfinite(data[array_name])).sum())
            found.finite.add(
                f"{name}: {array_name} has {count} non-finite value(s) (NaN/inf) in {len(rows)} pair(s), "
                f"e.g. obs_index {int(obs[rows[0]])} sample {int(sample[rows[0]])}"
            )
    if x0_seed is not None and store.x0_stored:
        wrong = [
            r
            for r in range(n)
            if not np.array_equal(
                initial_noise(x0_seed, int(obs[r]), int(sample[r]), store.x0_shape).numpy(), data["x0"][r]
            )
        ]
        if wrong:
            found.x0.add(
                f"{name}: x0 of {len(wrong)} of {n} pairs does not regenerate from (seed {x0_seed}, obs_index, sample), "
                f"e.g. obs_index {int(obs[wrong[0]])} sample {int(sample[wrong[0]])}"
            )


def check_implicit_x0(store: PairStore, found: ShardPass) -> CheckResult:
    """A store that does not keep X_0: its recorded generator is one this build knows, it reproduces the manifest's
    probe (the writer's X_0 of one pair), and regenerating X_0 of one stored pair gives finite float32 noise of the
    manifest's shape. (Checksums cannot cover X_0: it is not stored.)"""
    generator, seed = store.x0_generator, store.seed
    if generator not in GENERATORS:
        return CheckResult(
            "x0 noise",
            FAIL,
            f"X_0 is not stored and its recorded generator {generator!r} is unknown to this build (it knows "
            f"{', '.join(GENERATORS)}), so X_0 cannot be regenerated: read the store with the reflowpairs version that "
            f"wrote it ({store.manifest.get('software', {}).get('reflowpairs', '?')})",
        )
    try:
        checked = store.check_x0_generator()
    except ReflowPairsError as err:
        return CheckResult("x0 noise", FAIL, err.what)
    obs = int(found.obs_index[0][0]) if found.obs_index and len(found.obs_index[0]) else 0
    sample = int(found.sample[0][0]) if found.sample and len(found.sample[0]) else 0
    x0 = store.regenerate_x0(np.array([obs]), np.array([sample]))
    if x0.shape != (1, *store.x0_shape) or x0.dtype != DTYPES["x0"] or not np.isfinite(x0).all():
        return CheckResult(
            "x0 noise",
            FAIL,
            f"generator {generator} regenerates X_0 as {x0.dtype}{list(x0.shape[1:])}"
            f"{'' if np.isfinite(x0).all() else ' with non-finite values'}, the manifest says float32{list(store.x0_shape)}",
        )
    return CheckResult(
        "x0 noise",
        PASS,
        f"X_0 is not stored: {checked}; it regenerates from (seed {seed}, obs_index, sample) as "
        f"float32{list(store.x0_shape)} (checked on obs_index {obs} sample {sample})",
    )
