"""Combining pair stores made over disjoint frames of the same job into one store.

Two uses share this module:

- ``merge_stores``: ``reflowpairs merge SLICE... --out DIR`` for slices made with ``--partition i/P`` (for
  example SLURM array tasks). Shards are copied; the slices are left as they were.
- ``absorb_parts``: a multi-process ``generate`` writes one sub-store per rank under ``OUT/parts/``; the main
  process moves their shards into ``OUT/shards`` and lists them in ``OUT/manifest.json`` (at the end of a run,
  and before a resumed run plans its work).

Either way, every shard is put in place atomically before the manifest's journal lists it (one line per shard; the
journal is folded into ``manifest.json`` at the end), and stores
made by other teachers, datasets or settings are refused with the difference named. That includes how X_0 is kept
(``generate --x0``): a store keeps it one way in every shard, so an implicit slice (no X_0 array) and an explicit
one are refused together rather than mixed; shards are copied as they are, X_0 is never regenerated or dropped.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from reflowpairs.atomic import fsync_dir, replace_atomically
from reflowpairs.errors import ReflowPairsError
from reflowpairs.store.jobs import JobDifference
from reflowpairs.store.layout import LOCK, MANIFEST, PARTS_DIR, remove_path, shard_rel_path
from reflowpairs.store.lock import StoreLock, busy_error
from reflowpairs.store.manifest import StoreManifest
from reflowpairs.store.reader import PairStore
from reflowpairs.store_features import merge_caches


def _short(fingerprint: Any) -> str:
    return str(fingerprint if fingerprint is not None else "?")[:12]


def differences(a: StoreManifest, b: StoreManifest) -> list[str]:
    """How two stores' jobs differ (``StoreManifest.job_differences``), each in words; [] if they are the same job."""

    def words(diff: JobDifference) -> str:
        if diff.field == "x0 storage":
            return f"X_0 storage: {diff.ours} vs {diff.theirs} (generate's `x0`; a store keeps X_0 one way in every shard)"
        if diff.field.endswith(".fingerprint"):
            return f"{diff.field.replace('.', ' ')}: {_short(diff.ours)} vs {_short(diff.theirs)}"
        return f"{diff.field}: {diff.ours!r} vs {diff.theirs!r}"

    return [words(diff) for diff in a.job_differences(b)]


def _place(src: Path, dst: Path, move: bool) -> None:
    if dst.exists():
        raise ReflowPairsError(f"Cannot place shard {src} at {dst}: a shard of that name is already there.")
    if not dst.parent.is_dir():  # a new group folder: its entry must survive a crash too
        dst.parent.mkdir(parents=True)
        fsync_dir(dst.parent.parent)
    if move:  # a rename of a whole shard (same filesystem): nothing half-written to see
        os.replace(src, dst)
        return

    def copy(tmp: Path) -> None:
        remove_path(tmp)  # a leftover of an interrupted merge
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copy2(src, tmp)

    replace_atomically(dst, copy)


def _absorb(manifest: StoreManifest, part: StoreManifest, prefix: str, move: bool) -> None:
    """List ``part``'s shards in ``manifest`` (copied or moved into its ``shards/``), journaling each."""
    for entry in part.shards:
        src = part.out / entry["path"]
        if not src.exists():  # moved already by an interrupted earlier absorb; its frames are regenerated
            continue
        rel = shard_rel_path(prefix + Path(entry["path"]).name)
        _place(src, manifest.out / rel, move)
        manifest.append_shard(
            {
                **entry,
                "path": rel,
                "store_id": entry.get("store_id", part.store_id),
                "written_as": entry.get("written_as", entry["path"]),
            }
        )
    manifest.add_skipped(part.skipped_frames)


def absorb_parts(manifest: StoreManifest) -> None:
    """Move every ``parts/*`` sub-store's shards into ``manifest``'s store and delete the parts (main process only)."""
    parts_dir = manifest.out / PARTS_DIR
    if not parts_dir.is_dir():
        return
    for path in sorted(p for p in parts_dir.iterdir() if (p / MANIFEST).is_file()):
        part = StoreManifest.read(path)
        diffs = differences(manifest, part)
        if diffs:
            raise ReflowPairsError(
                f"{path} belongs to another job: " + "; ".join(diffs) + ".",
                "Remove it, or set `overwrite` to start the store over.",
            )
        _absorb(manifest, part, "", move=True)
    manifest.set_complete()
    shutil.rmtree(parts_dir)


def _require_empty(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ReflowPairsError(f"`out` {out} exists and is not a directory.", "Merge into a new directory.")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        raise ReflowPairsError(f"`out` {out} is not empty.", "Merge into a new directory.")


def merge_stores(slices: list[Path], out: Path) -> dict[str, Any]:
    """Copy the shards of partition slices into a new store at ``out`` and return its manifest.

    Refuses slices from different jobs (naming the difference), overlapping frames, slices that a ``generate`` is
    still writing, and an existing ``out``. Holds ``out``'s store lock while it writes."""
    if not slices:
        raise ReflowPairsError("reflowpairs merge needs at least one slice directory.")
    _require_empty(out)
    manifests = [StoreManifest.read(s) for s in slices]
    for path in slices:
        holder = StoreLock.holder(path)
        if holder is not None:
            raise busy_error(path, holder)
    for path, other in zip(slices[1:], manifests[1:], strict=True):
        diffs = differences(manifests[0], other)
        if diffs:
            raise ReflowPairsError(
                f"Cannot merge {path} with {slices[0]}: they come from different jobs: "
                + "; ".join(diffs)
                + "."
            )
    seen: dict[int, Path] = {}
    for path in slices:
        frames = np.unique(PairStore(path).index()[0])
        for index in frames[np.isin(frames, np.fromiter(seen, np.int64, len(seen)))][:1]:
            raise ReflowPairsError(
                f"Slices {seen[int(index)]} and {path} both hold frame obs_index {int(index)}.",
                "Merge disjoint slices only.",
            )
        seen.update(dict.fromkeys(frames.tolist(), path))
    with StoreLock.acquire(out, "merge"):
        _require_empty(out)  # again under the lock: another writer may have started on it meanwhile
        return _merge_into(out, slices, manifests)


def _merge_into(out: Path, slices: list[Path], manifests: list[StoreManifest]) -> dict[str, Any]:
    manifest = manifests[0].emptied(
        out, drop=("shards", "partition"), store_id=uuid.uuid4().hex, merged_from=[str(s) for s in slices]
    )
    manifest.write()
    for i, part in enumerate(manifests):
        _absorb(manifest, part, f"s{i:03d}-", move=False)
    manifest.set_complete()
    note = merge_caches(out, slices, manifest, lambda src, dst: _place(src, dst, move=False))
    return {**manifest.data, "feature_cache_note": note}
