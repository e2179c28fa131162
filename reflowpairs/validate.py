"""Prove a pair store is sound before training on it: every check of ``reflowpairs validate``.

``validate(cfg)`` runs the checks below and returns a ``ValidationReport``: one ``CheckResult``
(name, result, detail) per check, and an overall status:

- ``sound``: every check passed (warnings allowed: leftovers of an interrupted run are reported
  but never counted);
- ``incomplete``: nothing is wrong with what is there, but generation has not finished (the
  manifest says ``complete: false`` or selected frames are missing); ``generate --resume`` finishes it;
- ``corrupt``: at least one check failed.

Every problem names the shard (its path in the store) and what is wrong with it. Each check catches
its own exceptions and reports them as failures, so a damaged store never produces a traceback.
Shards are read one at a time (memory: one shard, plus 16 bytes per pair for the frame checks).
A store that does not keep X_0 (``x0.stored: false``) is checked on the arrays it stores; its ``x0 noise``
check proves the recorded generator is known and regenerates X_0 of the manifest's shape and dtype.
``docs/validate.md`` describes each check.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reflowpairs.errors import ReflowPairsError
from reflowpairs.pairstore import (
    ARRAYS,
    DTYPES,
    LAYOUT,
    MANIFEST,
    SHARD_SUFFIX,
    SHARDS_DIR,
    TMP_PREFIX,
    PairStore,
    StoreManifest,
    unlisted_entries,
)

PASS, WARN, FAIL, INCOMPLETE, SKIP = "pass", "warn", "fail", "incomplete", "skip"
SOUND, STATUS_INCOMPLETE, CORRUPT = "sound", "incomplete", "corrupt"
CHECKS = (
    "manifest",
    "shards",
    "leftovers",
    "checksums",
    "origin",
    "finite",
    "x0 noise",
    "frames",
    "obs_index",
    "dataset",
    "teacher",
    "spot check",
)
"""Every check, in the order they are reported."""

MAX_LISTED = 5  # problems listed per check before "and N more"

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``; phases ``"shards"`` and ``"spot check"``."""


@dataclass
class CheckResult:
    """One check: ``result`` is pass, warn (reported, not an error), fail, incomplete or skip (not run)."""

    name: str
    result: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.result in (PASS, WARN, SKIP)


@dataclass
class ValidateConfig:
    """Settings of ``reflowpairs validate``.

    ``dataset``/``dataset_root``: check the store against this dataset (by default the spot check
    uses the manifest's recorded repo id and root). ``teacher``: check it is the recorded teacher
    (and use it for the spot check). ``spot_check``: re-sample this many random pairs (all of them
    when at least the store's size) and compare X_1 within ``atol`` (None: ``SPOT_CHECK_ATOL`` of the store's
    recorded compute dtype); ``seed`` picks the pairs."""

    store: Path
    dataset: str | None = None
    dataset_root: Path | None = None
    teacher: str | None = None
    spot_check: int = 0
    atol: float | None = None
    seed: int = 0
    device: str = "auto"
    batch_size: int = 16  # frames per teacher call in the spot check


SPOT_CHECK_ATOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 5e-2}
"""Default spot-check tolerance by the least precise dtype the teacher computes in (its parameters' dtypes and the
autocast dtype, as the manifest records them: ``teacher.compute_dtype``). Re-sampled on the machine and device that
made the store, X_1 comes back bit for bit (fixed call shapes); on another device or kernel library half-precision
X_1 moves by its rounding, ~1e-3-1e-2 in bfloat16 on SmolVLA's real shapes."""


def _count(n: int, noun: str) -> str:
    """``"1 shard"``, ``"3 shards"``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def spot_check_atol(generation: dict[str, Any]) -> tuple[float, str]:
    """The default spot-check tolerance of a store and the compute dtype it follows."""
    from reflowpairs.teacher import compute_dtype

    dtype = compute_dtype(generation.get("parameter_dtypes") or {}, generation.get("dtype", "float32"))
    return SPOT_CHECK_ATOL.get(dtype, SPOT_CHECK_ATOL["float32"]), dtype


@dataclass
class ValidationReport:
    store: str
    status: str  # sound | incomplete | corrupt
    checks: list[CheckResult]
    frames_done: int | None = None
    frames_expected: int | None = None
    resume_command: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == SOUND

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for check, raw in zip(self.checks, out["checks"], strict=True):
            raw["ok"] = check.ok
        return out

    def summary(self) -> str:
        """One sentence: the status and why."""
        failed = [c.name for c in self.checks if c.result == FAIL]
        if self.status == CORRUPT:
            return (
                f"CORRUPT: {len(failed)} check(s) failed ({', '.join(failed)}); do not train on this store."
            )
        if self.status == STATUS_INCOMPLETE:
            done = (
                f"{self.frames_done} of {self.frames_expected} frames done"
                if self.frames_expected is not None
                else "generation did not finish"
            )
            how = (
                f" Finish it with: {self.resume_command}"
                if self.resume_command
                else " Finish it with `reflowpairs generate ... --resume`."
            )
            return f"INCOMPLETE: {done}; what is there is sound.{how}"
        return f"SOUND: all {sum(c.result == PASS for c in self.checks)} checks run passed."


@dataclass
class _Problems:
    """Problems of one check, listed up to MAX_LISTED."""

    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.items.append(text)

    def __bool__(self) -> bool:
        return bool(self.items)

    def text(self) -> str:
        shown = "; ".join(self.items[:MAX_LISTED])
        more = len(self.items) - MAX_LISTED
        return shown + (f"; and {more} more" if more > 0 else "")


def _listed(values, limit: int = 8) -> str:
    values = list(values)
    text = ", ".join(map(str, values[:limit]))
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


# --- manifest -------------------------------------------------------------------------------------


def manifest_problems(meta: StoreManifest) -> list[str]:
    """Contract problems of a manifest that ``StoreManifest.read`` accepted (types, sums, shard entries)."""
    manifest = meta.data
    problems: list[str] = []
    for key, kind in (
        ("store_id", str),
        ("complete", bool),
        ("teacher", dict),
        ("dataset", dict),
        ("generation", dict),
        ("shards", list),
    ):
        if not isinstance(manifest.get(key), kind):
            problems.append(f"{key} is missing or not a {kind.__name__}")
    for key in ("x0", "x1"):
        spec = manifest.get(key)
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not (
            isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)
        ):
            problems.append(f"{key}.shape is {shape!r}, not [T, D] with positive integers")
        elif spec.get("dtype") != "float32":
            problems.append(f"{key}.dtype is {spec.get('dtype')!r}, not 'float32'")
    generation = manifest.get("generation") if isinstance(manifest.get("generation"), dict) else {}
    for key in ("seed", "samples_per_frame", "num_frames", "num_steps"):
        if not isinstance(generation.get(key), int) or isinstance(generation.get(key), bool):
            problems.append(f"generation.{key} is {generation.get(key)!r}, not an integer")
    if not isinstance(generation.get("solver"), str):
        problems.append("generation.solver is missing")
    for key in ("teacher", "dataset"):
        if isinstance(manifest.get(key), dict) and not manifest[key].get("fingerprint"):
            problems.append(f"{key}.fingerprint is missing")
    shards = manifest.get("shards") if isinstance(manifest.get("shards"), list) else []
    paths: dict[str, int] = {}
    for j, entry in enumerate(shards):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            problems.append(f"shards[{j}] has no path")
            continue
        path = entry["path"]
        paths[path] = paths.get(path, 0) + 1
        parts = Path(path).parts
        if (
            len(parts) not in (2, 3)  # shards/<name> (format version 1) or shards/<group>/<name>
            or parts[0] != SHARDS_DIR
            or not path.endswith(SHARD_SUFFIX.get(manifest.get("backend"), "?"))
        ):
            problems.append(f"{path}: not a {manifest.get('backend')} shard path under {SHARDS_DIR}/")
        if not isinstance(entry.get("num_pairs"), int) or entry["num_pairs"] < 0:
            problems.append(f"{path}: num_pairs is {entry.get('num_pairs')!r}")
        sha = entry.get("sha256")
        arrays = meta.stored_arrays
        if not isinstance(sha, dict) or sorted(sha) != sorted(arrays):
            kept = "" if arrays == ARRAYS else " (X_0 is not stored)"
            problems.append(f"{path}: sha256 must hold checksums of {', '.join(arrays)}{kept}")
    problems += [f"{path} is listed {n} times" for path, n in paths.items() if n > 1]
    try:
        pairs = sum(int(e["num_pairs"]) for e in shards)
        if manifest.get("num_pairs") != pairs:
            problems.append(f"num_pairs is {manifest.get('num_pairs')!r} but its shards hold {pairs} pairs")
        frames = sum(int(e["num_frames"]) for e in shards)
        if manifest.get("num_frames") != frames:
            problems.append(
                f"num_frames is {manifest.get('num_frames')!r} but its shards hold {frames} frames"
            )
    except (KeyError, TypeError, ValueError):
        problems.append("shard entries lack num_pairs / num_frames")
    return problems


def resume_command(store: Path, meta: StoreManifest) -> str:
    """The ``reflowpairs generate ... --resume`` command that finishes ``store`` with its recorded settings (paths and
    ids shell-quoted, so a path with a space pastes as one argument)."""
    manifest = meta.data
    g, teacher, dataset = (
        manifest.get("generation", {}),
        manifest.get("teacher", {}),
        manifest.get("dataset", {}),
    )
    args = [
        "reflowpairs generate",
        f"--teacher {shlex.quote(str(teacher.get('source')))}",
        f"--dataset {shlex.quote(str(dataset.get('repo_id')))}",
    ]
    if dataset.get("root"):
        args.append(f"--dataset-root {shlex.quote(str(dataset['root']))}")
    args.append(f"--out {shlex.quote(str(store))}")
    if g.get("episodes"):
        args.append("--episodes " + ",".join(map(str, g["episodes"])))
    args += [
        f"--samples-per-frame {g.get('samples_per_frame')}",
        f"--num-steps {g.get('num_steps')}",
        f"--solver {g.get('solver')}",
    ]
    if g.get("solver") == "dopri5":
        args += [f"--rtol {g.get('rtol')}", f"--atol {g.get('atol')}"]
    args += [f"--seed {g.get('seed')}", f"--format {manifest.get('backend')}"]
    if not meta.x0_stored:
        args.append("--x0 implicit")
    if g.get("dtype", "float32") != "float32":
        args.append(f"--dtype {g['dtype']}")
    if g.get("sampler") == "exact":
        args.append("--exact")
    elif g.get(
        "frames_per_call"
    ):  # the call size X_1 was computed in: --batch-size G with no token limit gives G
        args += [f"--batch-size {g['frames_per_call']}", "--tokens-per-call 0"]
    if manifest.get("partition"):
        args.append(f"--partition {manifest['partition']['index']}/{manifest['partition']['count']}")
    return " ".join(args + ["--resume"])


# --- the shard pass -------------------------------------------------------------------------------


@dataclass
class _Pass:
    """What one read of every listed shard found, per check."""

    shards: _Problems = field(default_factory=_Problems)
    checksums: _Problems = field(default_factory=_Problems)
    origin: _Problems = field(default_factory=_Problems)
    finite: _Problems = field(default_factory=_Problems)
    x0: _Problems = field(default_factory=_Problems)
    obs_range: _Problems = field(default_factory=_Problems)
    obs_index: list[np.ndarray] = field(default_factory=list)
    sample: list[np.ndarray] = field(default_factory=list)
    shard_of: list[np.ndarray] = field(default_factory=list)
    readable: int = 0
    pairs: int = 0
    spot: dict[int, tuple[str, int, int, np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )  # global index -> (shard, obs, sample, x0, x1)


def _missing_chunks(path: Path, name: str) -> str:
    """For a zarr shard: ' (k of n chunk files are missing; zarr reads them as zeros)' or ''."""
    try:
        import zarr

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
    found: _Pass,
    x0_seed: int | None,
    total_frames: int | None,
    spot_rows: dict[int, int],
) -> None:
    """Read shard ``i`` once and record its problems for every per-shard check."""
    from reflowpairs.noise import initial_noise

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
        data = store.read_stored(
            i, store.stored_arrays
        )  # X_0 is not regenerated here: that is the x0 noise check's
    except ReflowPairsError as err:
        found.shards.add(err.what)
        return
    n = entry.get("num_pairs")
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
    obs, sample = data["obs_index"], data["sample"]
    if len(obs):
        lo, hi = int(obs.min()), int(obs.max())
        if (entry.get("obs_index_min"), entry.get("obs_index_max")) != (lo, hi) or entry.get(
            "num_frames"
        ) != len(np.unique(obs)):
            found.shards.add(
                f"{name}: holds {len(np.unique(obs))} frames, obs_index {lo}..{hi}; its manifest entry says "
                f"{entry.get('num_frames')} frames, {entry.get('obs_index_min')}..{entry.get('obs_index_max')}"
            )
        if lo < 0 or (total_frames is not None and hi >= total_frames):
            bad = obs[
                (obs < 0) | (obs >= (total_frames if total_frames is not None else np.iinfo(np.int64).max))
            ]
            found.obs_range.add(
                f"{name}: obs_index {_listed(np.unique(bad))} outside the recorded dataset's frames 0..{(total_frames or 0) - 1}"
            )
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


def _check_implicit_x0(store: PairStore, found: _Pass) -> CheckResult:
    """A store that does not keep X_0: its recorded generator is one this build knows, it reproduces the manifest's
    probe (the writer's X_0 of one pair), and regenerating X_0 of one stored pair gives finite float32 noise of the
    manifest's shape. (Checksums cannot cover X_0: it is not stored.)"""
    from reflowpairs.noise import GENERATORS

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


# --- frames ---------------------------------------------------------------------------------------


@dataclass
class _Frames:
    result: CheckResult
    done: int
    expected: int | None
    present: np.ndarray  # distinct obs_index values stored


def _check_frames(store: PairStore, found: _Pass, selected: np.ndarray | None, resume: str) -> _Frames:
    """Exactly K pairs per frame, no duplicate (obs_index, sample), and whether every frame is done.

    Frames of shards that could not be read count as not done; ``--resume`` does not replace a listed shard, so a
    store with such shards (or with checksum mismatches) fails here instead of being sent to ``--resume``."""
    manifest = store.manifest
    generation = manifest.get("generation", {})
    k = int(generation["samples_per_frame"])
    skipped = {int(v) for v in manifest.get("skipped_frames", []) or []}
    obs = np.concatenate(found.obs_index) if found.obs_index else np.zeros(0, np.int64)
    sample = np.concatenate(found.sample) if found.sample else np.zeros(0, np.int32)
    shard_of = np.concatenate(found.shard_of) if found.shard_of else np.zeros(0, np.int32)
    problems = _Problems()
    out_of_range = (sample < 0) | (sample >= k)
    for i in np.unique(shard_of[out_of_range]):
        bad = np.unique(sample[out_of_range & (shard_of == i)])
        problems.add(f"{store.shards[i]['path']}: sample values {_listed(bad)} outside 0..{k - 1} (K={k})")
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
        return _Frames(CheckResult("frames", FAIL, problems.text()), done, expected, present)
    skipped_note = f", {len(skipped)} skipped as non-finite" if skipped else ""
    if remaining or not manifest.get("complete"):
        which = f" (missing obs_index {_listed(missing)})" if missing is not None and len(missing) else ""
        flag = "; the manifest says complete: false" if not manifest.get("complete") else ""
        if found.shards or found.checksums:
            detail = (
                f"{done} of {expected} frames in readable shards{skipped_note}{which}{flag}; damaged shards (see shards "
                "and checksums) are not replaced by --resume: restore them, or regenerate the store with --overwrite"
            )
            return _Frames(CheckResult("frames", FAIL, detail), done, expected, present)
        detail = f"{done} of {expected} frames done, {remaining} remaining{skipped_note}{which}{flag}. Finish it with: {resume}"
        return _Frames(CheckResult("frames", INCOMPLETE, detail), done, expected, present)
    return _Frames(
        CheckResult("frames", PASS, f"{done} frames x K={k} pairs, no duplicates{skipped_note}"),
        done,
        expected,
        present,
    )


# --- dataset, teacher, spot check ------------------------------------------------------------------


def _open_dataset(store: PairStore, cfg: ValidateConfig, use_recorded: bool):
    """The dataset to check against: --dataset/--dataset-root, else (if ``use_recorded``) the recorded one."""
    from reflowpairs.dataset import open_dataset

    recorded = store.manifest.get("dataset", {})
    if cfg.dataset is None and cfg.dataset_root is None:
        if not use_recorded:
            return None
        repo_id, root = recorded.get("repo_id"), recorded.get("root")
    else:
        repo_id = cfg.dataset or recorded.get("repo_id")
        root = cfg.dataset_root
    return open_dataset(repo_id, root, store.manifest.get("generation", {}).get("episodes"))


def _check_dataset(store: PairStore, dataset) -> CheckResult:
    from reflowpairs.dataset import dataset_fingerprint

    recorded = store.manifest.get("dataset", {})
    fingerprint = dataset_fingerprint(dataset)
    if fingerprint != recorded.get("fingerprint"):
        return CheckResult(
            "dataset",
            FAIL,
            f"the dataset {dataset.repo_id} at {dataset.root} has fingerprint {fingerprint[:12]}..., the store was made from "
            f"{recorded.get('repo_id')} at {recorded.get('root')} with fingerprint {str(recorded.get('fingerprint'))[:12]}...: another dataset or another version of it",
        )
    return CheckResult(
        "dataset",
        PASS,
        f"{dataset.repo_id} at {dataset.root} is the recorded dataset (fingerprint {fingerprint[:12]}...)",
    )


def _check_teacher(store: PairStore, source: str) -> CheckResult:
    from reflowpairs.teacher import fingerprint_checkpoint

    recorded = store.manifest.get("teacher", {})
    fingerprint = fingerprint_checkpoint(source)["fingerprint"]
    if fingerprint != recorded.get("fingerprint"):
        return CheckResult(
            "teacher",
            FAIL,
            f"teacher {source} has fingerprint {fingerprint[:12]}..., the store was made by {recorded.get('source')} with "
            f"{str(recorded.get('fingerprint'))[:12]}...: another checkpoint (other weights or config)",
        )
    return CheckResult(
        "teacher", PASS, f"{source} is the recorded teacher (fingerprint {fingerprint[:12]}...)"
    )


def _spot_check(
    store: PairStore, cfg: ValidateConfig, found: _Pass, dataset, progress: Progress | None
) -> CheckResult:
    """Re-sample the chosen pairs' X_1 with the teacher from their stored X_0 and compare within ``atol``."""
    import torch
    from torch.utils.data import default_collate

    from reflowpairs.dataset import check_features, frame_indices
    from reflowpairs.engine import make_engine
    from reflowpairs.generate import COMPUTE_DTYPES
    from reflowpairs.noise import batch_noise
    from reflowpairs.solvers import SolverConfig
    from reflowpairs.teacher import load_policy, rename_map

    if not found.spot:
        return CheckResult("spot check", FAIL, "no readable pair to re-sample")
    generation = store.manifest["generation"]
    solver = SolverConfig(
        generation["solver"],
        int(generation["num_steps"]),
        generation.get("rtol") or SolverConfig.rtol,
        generation.get("atol") or SolverConfig.atol,
    )
    source = cfg.teacher or store.manifest.get("teacher", {}).get("source")
    teacher = load_policy(source, cfg.device)
    check_features(teacher.config, dataset.meta, rename_map(teacher.preprocessor))
    engine = make_engine(
        teacher.policy, generation.get("frames_per_call"), exact=generation.get("sampler") == "exact"
    )
    positions = {int(v): p for p, v in enumerate(frame_indices(dataset).tolist())}
    chosen = sorted(found.spot.items(), key=lambda item: (item[1][1], item[1][2]))
    problems = _Problems()
    unknown = sorted({obs for _, (_, obs, _, _, _) in chosen if obs not in positions})
    if unknown:
        problems.add(f"obs_index {_listed(unknown)} not in the dataset; those pairs were not re-sampled")
    by_frame: dict[int, list[tuple[str, int, int, np.ndarray, np.ndarray]]] = {}
    for _, item in chosen:
        if item[1] in positions:
            by_frame.setdefault(item[1], []).append(item)
    # Re-sample every one of a chosen frame's K samples from the regenerated X_0, in calls of the recorded size, as
    # generate computed them (an adaptive solve and the folding of samples into cache rows span all K), and compare
    # the chosen ones; a store without a recorded seed falls back to the chosen samples' stored X_0.
    whole_frames = generation.get("seed") is not None
    k_all = int(generation["samples_per_frame"])
    groups: dict[
        int, list[int]
    ] = {}  # samples per call and frame -> frames (a call needs the same K for every frame)
    for obs, items in by_frame.items():
        groups.setdefault(k_all if whole_frames else len(items), []).append(obs)
    compute = COMPUTE_DTYPES.get(generation.get("dtype", "float32"), torch.float32)
    default_atol, dtype = spot_check_atol(generation)
    atol = cfg.atol if cfg.atol is not None else default_atol
    diffs: list[tuple[float, str, int, int]] = []
    done, total = 0, sum(len(v) for v in by_frame.values())
    for _k, frames in groups.items():
        for start in range(0, len(frames), cfg.batch_size):
            batch_frames = frames[start : start + cfg.batch_size]
            batch = default_collate([dataset[positions[obs]] for obs in batch_frames])
            if whole_frames:
                noise = batch_noise(
                    int(generation["seed"]), batch_frames, k_all, engine.noise_shape
                )  # (B, K, T, D0)
            else:
                noise = torch.from_numpy(
                    np.stack([np.stack([it[3] for it in by_frame[obs]]) for obs in batch_frames])
                )
            with torch.autocast(engine.device.type, dtype=compute, enabled=compute is not torch.float32):
                x1 = (
                    engine.sample(teacher.preprocessor(batch), noise, solver).float().cpu().numpy()
                )  # (B, k, T, D1)
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
    worst = max(diffs, default=(0.0, "", -1, -1))
    bad = sorted((d for d in diffs if not d[0] <= atol), reverse=True)
    what = f"{solver.name}, {solver.num_steps} steps" + (
        f", computed in {dtype}" if dtype != "float32" else ""
    )
    if bad:
        d, shard, obs, sample = bad[0]
        problems.add(
            f"{len(bad)} of {len(diffs)} re-sampled pairs differ from the stored X_1 by more than --atol {atol:g} "
            f"(teacher {source}, {what}); worst {d:.3g} at {shard} obs_index {obs} sample {sample}: the store was made with "
            "other settings, another sampler or another teacher than its manifest says"
        )
    if problems:
        return CheckResult("spot check", FAIL, problems.text())
    return CheckResult(
        "spot check",
        PASS,
        f"{len(diffs)} pairs re-sampled ({what}): max |X_1 difference| {worst[0]:.3g} <= atol {atol:g}",
    )


# --- leftovers ------------------------------------------------------------------------------------


def _check_leftovers(store_path: Path, listed: set[str]) -> CheckResult:
    leftovers = []
    for path in unlisted_entries(store_path, listed):
        rel = path.relative_to(store_path).as_posix()
        leftovers.append(
            f"{rel} (half-written)" if path.name.startswith(TMP_PREFIX) else f"{rel} (not listed)"
        )
    if (store_path / (TMP_PREFIX + MANIFEST)).exists():
        leftovers.append(f"{TMP_PREFIX}{MANIFEST} (half-written manifest)")
    if leftovers:
        return CheckResult(
            "leftovers",
            WARN,
            f"not counted: {_listed(leftovers)}; leftovers of an interrupted run (`generate --resume` removes them) "
            "or files copied in: delete them",
        )
    return CheckResult("leftovers", PASS, "nothing under shards/ but the listed shards")


# --- driver ---------------------------------------------------------------------------------------


def _guard(name: str, fn: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; any exception becomes a failure of that check, never a traceback."""
    try:
        return fn()
    except ReflowPairsError as err:
        return CheckResult(name, FAIL, f"{err.what} {err.hint}".strip())
    except Exception as err:  # noqa: BLE001 - reported as this check's failure
        return CheckResult(name, FAIL, f"could not be checked ({type(err).__name__}: {err})")


def _result(name: str, problems: _Problems, ok_detail: str) -> CheckResult:
    return CheckResult(name, FAIL, problems.text()) if problems else CheckResult(name, PASS, ok_detail)


def _check_args(cfg: ValidateConfig) -> None:
    if cfg.spot_check < 0:
        raise ReflowPairsError(f"`spot_check` must be 0 or more pairs, got {cfg.spot_check}.")
    if cfg.atol is not None and not cfg.atol > 0:
        raise ReflowPairsError(f"`atol` must be positive, got {cfg.atol}.")
    if cfg.batch_size < 1:
        raise ReflowPairsError(f"`batch_size` must be at least 1, got {cfg.batch_size}.")


def validate(cfg: ValidateConfig, progress: Progress | None = None) -> ValidationReport:
    """Run every check on the store at ``cfg.store``; see the module docstring for the statuses.

    Raises ``ReflowPairsError`` only for bad settings (negative ``spot_check``, non-positive
    ``atol``); everything wrong with the store itself is reported in the returned report."""
    _check_args(cfg)
    path = Path(cfg.store)
    checks: dict[str, CheckResult] = {}
    try:
        store = PairStore(path)
    except ReflowPairsError as err:
        checks["manifest"] = CheckResult("manifest", FAIL, f"{err.what} {err.hint}".strip())
    except Exception as err:  # noqa: BLE001 - a manifest with fields of the wrong kind
        checks["manifest"] = CheckResult(
            "manifest", FAIL, f"{path / MANIFEST} does not follow the contract ({type(err).__name__}: {err})"
        )
    if "manifest" in checks:
        skipped = [CheckResult(name, SKIP, "not checked: the manifest is unusable") for name in CHECKS[1:]]
        return ValidationReport(str(path), CORRUPT, [checks["manifest"], *skipped])

    problems = manifest_problems(store.meta)
    checks["manifest"] = (
        CheckResult("manifest", FAIL, "; ".join(problems))
        if problems
        else CheckResult(
            "manifest",
            PASS,
            f"format {store.manifest['format']} v{store.manifest['version']}, {store.backend}, {_count(len(store.shards), 'shard')}",
        )
    )
    manifest = store.manifest
    generation = manifest.get("generation") if isinstance(manifest.get("generation"), dict) else {}
    seed = generation.get("seed") if isinstance(generation.get("seed"), int) else None
    total_frames = (
        manifest.get("dataset", {}).get("total_frames") if isinstance(manifest.get("dataset"), dict) else None
    )
    entries_ok = all(isinstance(e, dict) and isinstance(e.get("path"), str) for e in store.shards)
    checks["leftovers"] = _guard(
        "leftovers",
        lambda: _check_leftovers(
            path, {e["path"] for e in store.shards if isinstance(e, dict) and "path" in e}
        ),
    )

    # Which pairs the spot check re-samples, by global pair id over the listed shards.
    spot_rows: dict[int, dict[int, int]] = {}
    total = store.meta.listed_pairs()
    if cfg.spot_check and total:
        picks = (
            np.arange(total)
            if cfg.spot_check >= total
            else np.sort(np.random.default_rng(cfg.seed).choice(total, cfg.spot_check, replace=False))
        )
        shards, rows = store.meta.locate_many(picks)
        for g, i, row in zip(picks.tolist(), shards.tolist(), rows.tolist(), strict=True):
            spot_rows.setdefault(i, {})[g] = row

    found = _Pass()
    if entries_ok:
        for i in range(len(store.shards)):
            try:
                _check_shard(
                    store,
                    i,
                    found,
                    seed,
                    total_frames if isinstance(total_frames, int) else None,
                    spot_rows.get(i, {}),
                )
            except Exception as err:  # noqa: BLE001 - reported against the shard
                found.shards.add(
                    f"{store.shards[i]['path']} could not be checked ({type(err).__name__}: {err})"
                )
            if progress is not None:
                progress("shards", i + 1, len(store.shards))
    else:
        found.shards.add("the manifest's shard list is malformed; shards not read")
    listed = len(store.shards)
    checks["shards"] = _result(
        "shards",
        found.shards,
        f"{_count(listed, 'listed shard')} open with the manifest's row counts, shapes and dtypes ({found.pairs} pairs)",
    )
    kept = "" if store.x0_stored else f" of {', '.join(store.stored_arrays)} (X_0 is not stored)"
    checks["checksums"] = _result(
        "checksums",
        found.checksums,
        f"{_count(found.readable, 'shard')} match their recorded sha256 checksums{kept}",
    )
    checks["origin"] = _result(
        "origin", found.origin, f"every shard carries this store's id ({manifest.get('store_id')})"
    )
    checks["finite"] = _result(
        "finite",
        found.finite,
        "X_0 and X_1 are finite" if store.x0_stored else "X_1 is finite (X_0 is not stored)",
    )
    if seed is None:
        checks["x0 noise"] = CheckResult(
            "x0 noise", FAIL, "generation.seed is missing, so X_0 cannot be regenerated"
        )
    elif store.x0_stored:
        checks["x0 noise"] = _result(
            "x0 noise",
            found.x0,
            f"X_0 of all {found.pairs} readable pairs regenerates exactly from (seed {seed}, obs_index, sample)",
        )
    else:
        checks["x0 noise"] = _guard("x0 noise", lambda: _check_implicit_x0(store, found))

    dataset = None
    if cfg.dataset is not None or cfg.dataset_root is not None:

        def open_given():
            nonlocal dataset
            dataset = _open_dataset(store, cfg, use_recorded=False)
            return _check_dataset(store, dataset)

        checks["dataset"] = _guard("dataset", open_given)
    else:
        checks["dataset"] = CheckResult(
            "dataset", SKIP, "give --dataset/--dataset-root to check the store against a dataset"
        )

    def obs_index_check() -> CheckResult:
        if dataset is None:
            where = f"0..{total_frames - 1}" if isinstance(total_frames, int) else "(unknown)"
            return _result(
                "obs_index",
                found.obs_range,
                f"every obs_index is within the recorded dataset's frames {where}",
            )
        from reflowpairs.dataset import frame_indices

        selected = frame_indices(dataset)
        stored = np.unique(np.concatenate(found.obs_index)) if found.obs_index else np.zeros(0, np.int64)
        unknown = np.setdiff1d(stored, selected)
        if len(unknown):
            return CheckResult(
                "obs_index",
                FAIL,
                f"{len(unknown)} stored obs_index value(s) are not frames of {dataset.repo_id} (episodes {generation.get('episodes') or 'all'}): {_listed(unknown)}",
            )
        return CheckResult("obs_index", PASS, f"every obs_index is a selected frame of {dataset.repo_id}")

    checks["obs_index"] = _guard("obs_index", obs_index_check)

    resume = resume_command(path, store.meta)
    frames_done = frames_expected = None

    def frames_check() -> CheckResult:
        nonlocal frames_done, frames_expected
        from reflowpairs.dataset import frame_indices

        selected = frame_indices(dataset) if dataset is not None else None
        if selected is not None and manifest.get("partition"):
            part = manifest["partition"]
            selected = selected[selected % part["count"] == part["index"]]
        result = _check_frames(store, found, selected, resume)
        frames_done, frames_expected = result.done, result.expected
        return result.result

    checks["frames"] = _guard("frames", frames_check)
    checks["teacher"] = (
        _guard("teacher", lambda: _check_teacher(store, cfg.teacher))
        if cfg.teacher is not None
        else CheckResult("teacher", SKIP, "give --teacher to check the store was made by that checkpoint")
    )
    if cfg.spot_check:

        def spot() -> CheckResult:
            data = dataset if dataset is not None else _open_dataset(store, cfg, use_recorded=True)
            return _spot_check(store, cfg, found, data, progress)

        checks["spot check"] = _guard("spot check", spot)
    else:
        checks["spot check"] = CheckResult(
            "spot check", SKIP, "give --spot-check N to re-run the teacher on N random pairs"
        )

    ordered = [checks[name] for name in CHECKS]
    from reflowpairs.featurecache import validate_features  # the feature cache, when the store has one

    features = _guard(
        "features",
        lambda: CheckResult(
            "features",
            *validate_features(
                store,
                cfg.teacher,
                cfg.device,
                lambda: dataset if dataset is not None else _open_dataset(store, cfg, use_recorded=True),
                cfg.spot_check,
                cfg.seed,
            ),
        ),
    )
    ordered += [features] if features.detail != "no feature cache" else []
    if any(c.result == FAIL for c in ordered):
        status = CORRUPT
    elif any(c.result == INCOMPLETE for c in ordered):
        status = STATUS_INCOMPLETE
    else:
        status = SOUND
    return ValidationReport(
        str(path),
        status,
        ordered,
        frames_done,
        frames_expected,
        resume if status == STATUS_INCOMPLETE else None,
    )
