"""Opening ``--out`` for writing, under the store lock: a new store, a resumed one (the same job, its leftovers
removed, its parts absorbed) or an overwritten one."""

from __future__ import annotations

from pathlib import Path

from reflowpairs.atomic import check_writable
from reflowpairs.errors import ReflowPairsError
from reflowpairs.generate.checks import check_out
from reflowpairs.generate.config import GenerateConfig
from reflowpairs.generate.job import Job
from reflowpairs.store.jobs import JobDifference
from reflowpairs.store.layout import PARTS_DIR, SHARDS_DIR, remove_path
from reflowpairs.store.manifest import StoreManifest
from reflowpairs.store.merge import absorb_parts
from reflowpairs.store_features import FEATURES_DIR

X0_WORDS = {"explicit": "stored in every shard", "implicit": "not stored, regenerated from the seed"}


def open_store(out: Path, job: Job, cfg: GenerateConfig) -> StoreManifest:
    """The store's manifest after the --out / --resume / --overwrite checks; only then is --out touched.

    Runs in the main process while it holds the store lock, so no other writer can change --out meanwhile."""
    check_out(cfg)  # again, now under the lock: another run may have written --out since check_settings
    manifest = resume_manifest(out, job.fresh) if cfg.resume else job.fresh
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


def resume_manifest(out: Path, fresh: StoreManifest) -> StoreManifest:
    """The existing manifest, after checking it is the same job as ``fresh`` (``StoreManifest.job_differences``)."""
    manifest = StoreManifest.read(out)
    differences = manifest.job_differences(fresh)
    storage = next((d for d in differences if d.field == "x0 storage"), None)
    if storage is not None:
        raise ReflowPairsError(
            f"Cannot resume {out}: its X_0 is {storage.ours} ({X0_WORDS.get(storage.ours, '?')}), and this run asks "
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
