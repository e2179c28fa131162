"""``validate``: the table of checks, each a function of one ``ValidationContext``, run in order over a store.

The context holds the settings, the opened store, what the one read of its shards found (``ShardPass``) and what a
check learns for later ones (the dataset the ``dataset`` check opened, the frame counts of the ``frames`` check).
Each check catches its own exceptions and reports them as failures (``run_check``), so a damaged store never
produces a traceback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reflowpairs.cached_features import validate_features
from reflowpairs.dataset import frame_indices
from reflowpairs.errors import ReflowPairsError
from reflowpairs.progress import PhaseProgress
from reflowpairs.store.layout import MANIFEST
from reflowpairs.store.reader import PairStore
from reflowpairs.validate.config import ValidateConfig, check_settings
from reflowpairs.validate.frames import check_frames
from reflowpairs.validate.manifest import check_leftovers, manifest_problems, resume_command
from reflowpairs.validate.report import (
    CHECKS,
    CORRUPT,
    FAIL,
    PASS,
    SKIP,
    STATUS_INCOMPLETE,
    CheckResult,
    ValidationReport,
    count,
    listed,
    overall_status,
    result_of,
)
from reflowpairs.validate.shards import ShardPass, check_implicit_x0, read_shards, spot_pairs
from reflowpairs.validate.sources import check_dataset, check_teacher, open_checked_dataset
from reflowpairs.validate.spot import spot_check

NO_FEATURE_CACHE = "no feature cache"  # cached_features.validate_features' detail for a store without one


@dataclass
class ValidationContext:
    """What every check reads (settings, store, the shard pass) and what earlier checks leave for later ones."""

    cfg: ValidateConfig
    path: Path
    store: PairStore
    progress: PhaseProgress | None
    resume: str  # the `generate --resume` command that finishes the store
    found: ShardPass = field(default_factory=ShardPass)
    dataset: Any = None  # the --dataset/--dataset-root LeRobotDataset, once the dataset check opened it
    frames_done: int | None = None  # set by the frames check
    frames_expected: int | None = None  # set by the frames check

    @property
    def generation(self) -> dict[str, Any]:
        generation = self.store.manifest.get("generation")
        return generation if isinstance(generation, dict) else {}

    @property
    def seed(self) -> int | None:
        """The recorded X_0 seed, None when missing or not an integer."""
        return self.generation.get("seed") if isinstance(self.generation.get("seed"), int) else None

    @property
    def total_frames(self) -> Any:
        """The recorded dataset's frame count as the manifest has it (None when there is no dataset record)."""
        dataset = self.store.manifest.get("dataset")
        return dataset.get("total_frames") if isinstance(dataset, dict) else None

    def teacher_dataset(self):
        """The dataset a teacher re-run reads: the given one, else the recorded one (opened anew)."""
        return self.dataset if self.dataset is not None else open_checked_dataset(self.store, self.cfg, True)


CheckFunction = Callable[[ValidationContext], CheckResult | None]
"""A check: its result, or None when it does not apply and is not reported (``features`` without a cache)."""


def check_manifest(ctx: ValidationContext) -> CheckResult:
    problems = manifest_problems(ctx.store.meta)
    if problems:
        return CheckResult("manifest", FAIL, "; ".join(problems))
    store = ctx.store
    detail = f"format {store.manifest['format']} v{store.manifest['version']}, {store.backend}"
    return CheckResult("manifest", PASS, f"{detail}, {count(len(store.shards), 'shard')}")


def check_store_leftovers(ctx: ValidationContext) -> CheckResult:
    listed_paths = {e["path"] for e in ctx.store.shards if isinstance(e, dict) and "path" in e}
    return check_leftovers(ctx.path, listed_paths)


def check_shards(ctx: ValidationContext) -> CheckResult:
    found = ctx.found
    detail = f"{count(len(ctx.store.shards), 'listed shard')} open with the manifest's row counts, shapes and dtypes"
    return result_of("shards", found.shards, f"{detail} ({found.pairs} pairs)")


def check_checksums(ctx: ValidationContext) -> CheckResult:
    store = ctx.store
    kept = "" if store.x0_stored else f" of {', '.join(store.stored_arrays)} (X_0 is not stored)"
    detail = f"{count(ctx.found.readable, 'shard')} match their recorded sha256 checksums{kept}"
    return result_of("checksums", ctx.found.checksums, detail)


def check_origin(ctx: ValidationContext) -> CheckResult:
    detail = f"every shard carries this store's id ({ctx.store.manifest.get('store_id')})"
    return result_of("origin", ctx.found.origin, detail)


def check_finite(ctx: ValidationContext) -> CheckResult:
    detail = "X_0 and X_1 are finite" if ctx.store.x0_stored else "X_1 is finite (X_0 is not stored)"
    return result_of("finite", ctx.found.finite, detail)


def check_x0_noise(ctx: ValidationContext) -> CheckResult:
    if ctx.seed is None:
        return CheckResult("x0 noise", FAIL, "generation.seed is missing, so X_0 cannot be regenerated")
    if not ctx.store.x0_stored:
        return check_implicit_x0(ctx.store, ctx.found)
    detail = f"X_0 of all {ctx.found.pairs} readable pairs regenerates exactly from (seed {ctx.seed}, obs_index, sample)"
    return result_of("x0 noise", ctx.found.x0, detail)


def check_given_dataset(ctx: ValidationContext) -> CheckResult:
    """With --dataset/--dataset-root: open it (for the obs_index and frames checks too) and compare fingerprints."""
    if ctx.cfg.dataset is None and ctx.cfg.dataset_root is None:
        return CheckResult(
            "dataset", SKIP, "give --dataset/--dataset-root to check the store against a dataset"
        )
    ctx.dataset = open_checked_dataset(ctx.store, ctx.cfg, use_recorded=False)
    return check_dataset(ctx.store, ctx.dataset)


def check_obs_index(ctx: ValidationContext) -> CheckResult:
    """Every stored obs_index is a selected frame of the given dataset, else within the recorded frame count."""
    if ctx.dataset is None:
        total_frames = ctx.total_frames
        where = f"0..{total_frames - 1}" if isinstance(total_frames, int) else "(unknown)"
        detail = f"every obs_index is within the recorded dataset's frames {where}"
        return result_of("obs_index", ctx.found.obs_range, detail)
    dataset = ctx.dataset
    selected = frame_indices(dataset)
    found = ctx.found
    stored = np.unique(np.concatenate(found.obs_index)) if found.obs_index else np.zeros(0, np.int64)
    unknown = np.setdiff1d(stored, selected)
    if len(unknown):
        episodes = ctx.generation.get("episodes") or "all"
        return CheckResult(
            "obs_index",
            FAIL,
            f"{len(unknown)} stored obs_index value(s) are not frames of {dataset.repo_id} (episodes {episodes}): {listed(unknown)}",
        )
    return CheckResult("obs_index", PASS, f"every obs_index is a selected frame of {dataset.repo_id}")


def check_store_frames(ctx: ValidationContext) -> CheckResult:
    """The frames check against the given dataset's selected frames (in the store's partition), if any."""
    selected = frame_indices(ctx.dataset) if ctx.dataset is not None else None
    partition = ctx.store.manifest.get("partition")
    if selected is not None and partition:
        selected = selected[selected % partition["count"] == partition["index"]]
    frames = check_frames(ctx.store, ctx.found, selected, ctx.resume)
    ctx.frames_done, ctx.frames_expected = frames.done, frames.expected
    return frames.result


def check_given_teacher(ctx: ValidationContext) -> CheckResult:
    if ctx.cfg.teacher is None:
        return CheckResult("teacher", SKIP, "give --teacher to check the store was made by that checkpoint")
    return check_teacher(ctx.store, ctx.cfg.teacher)


def check_spot(ctx: ValidationContext) -> CheckResult:
    if not ctx.cfg.spot_check:
        return CheckResult("spot check", SKIP, "give --spot-check N to re-run the teacher on N random pairs")
    return spot_check(ctx.store, ctx.cfg, ctx.found, ctx.teacher_dataset(), ctx.progress)


def check_features(ctx: ValidationContext) -> CheckResult | None:
    """The store's feature cache (``cached_features.validate_features``); not reported when it has none."""
    cfg = ctx.cfg
    result, detail = validate_features(
        ctx.store, cfg.teacher, cfg.device, ctx.teacher_dataset, cfg.spot_check, cfg.seed, cfg.tokenizer
    )
    return None if detail == NO_FEATURE_CACHE else CheckResult("features", result, detail)


CHECK_TABLE: tuple[tuple[str, CheckFunction], ...] = (
    ("manifest", check_manifest),
    ("leftovers", check_store_leftovers),
    ("shards", check_shards),
    ("checksums", check_checksums),
    ("origin", check_origin),
    ("finite", check_finite),
    ("x0 noise", check_x0_noise),
    ("dataset", check_given_dataset),  # before obs_index and frames, which use the dataset it opens
    ("obs_index", check_obs_index),
    ("frames", check_store_frames),
    ("teacher", check_given_teacher),
    ("spot check", check_spot),
    ("features", check_features),
)
"""Every check in the order it runs; the report lists them in ``CHECKS`` order, then ``features``."""


def run_check(name: str, check: CheckFunction, ctx: ValidationContext) -> CheckResult | None:
    """Run one check; any exception becomes a failure of that check, never a traceback."""
    try:
        return check(ctx)
    except ReflowPairsError as err:
        return CheckResult(name, FAIL, f"{err.what} {err.hint}".strip())
    except Exception as err:  # noqa: BLE001 - reported as this check's failure
        return CheckResult(name, FAIL, f"could not be checked ({type(err).__name__}: {err})")


def _open_store(path: Path) -> PairStore | CheckResult:
    """The store at ``path``, or the failed ``manifest`` check when its manifest is unusable."""
    try:
        return PairStore(path)
    except ReflowPairsError as err:
        return CheckResult("manifest", FAIL, f"{err.what} {err.hint}".strip())
    except Exception as err:  # noqa: BLE001 - a manifest with fields of the wrong kind
        detail = f"{path / MANIFEST} does not follow the contract ({type(err).__name__}: {err})"
        return CheckResult("manifest", FAIL, detail)


def validate(cfg: ValidateConfig, progress: PhaseProgress | None = None) -> ValidationReport:
    """Run every check on the store at ``cfg.store``; see the package docstring for the statuses.

    Raises ``ReflowPairsError`` only for bad settings (negative ``spot_check``, non-positive
    ``atol``); everything wrong with the store itself is reported in the returned report."""
    check_settings(cfg)
    path = Path(cfg.store)
    store = _open_store(path)
    if isinstance(store, CheckResult):
        skipped = [CheckResult(name, SKIP, "not checked: the manifest is unusable") for name in CHECKS[1:]]
        return ValidationReport(str(path), CORRUPT, [store, *skipped])
    ctx = ValidationContext(cfg, path, store, progress, resume_command(path, store.meta))
    total_frames = ctx.total_frames if isinstance(ctx.total_frames, int) else None
    spot_rows = spot_pairs(store, cfg.spot_check, cfg.seed)
    ctx.found = read_shards(store, spot_rows, ctx.seed, total_frames, progress)
    results = {name: run_check(name, check, ctx) for name, check in CHECK_TABLE}
    ordered = [results[name] for name in (*CHECKS, "features") if results[name] is not None]
    status = overall_status(ordered)
    resume = ctx.resume if status == STATUS_INCOMPLETE else None
    return ValidationReport(str(path), status, ordered, ctx.frames_done, ctx.frames_expected, resume)
