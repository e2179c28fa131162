"""Combining pair stores made over disjoint frames of the same job into one store.

Two uses share this module:

- ``merge_stores``: ``reflowpairs merge SLICE... --out DIR`` for slices made with ``--partition i/P`` (for
  example SLURM array tasks). Shards are copied; the slices are left as they were.
- ``absorb_parts``: a multi-process ``generate`` writes one sub-store per rank under ``OUT/parts/``; the main
  process moves their shards into ``OUT/shards`` and lists them in ``OUT/manifest.json`` (at the end of a run,
  and before a resumed run plans its work).

Either way, every shard is put in place atomically before the manifest that lists it is rewritten, and stores
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

from reflowpairs.atomic import fsync_tree
from reflowpairs.errors import ReflowPairsError
from reflowpairs.pairstore import (
    LOCK,
    MANIFEST,
    PARTS_DIR,
    SHARDS_DIR,
    TMP_PREFIX,
    PairStore,
    _remove,
    read_manifest,
    recorded_generation,
    write_manifest,
    x0_mode,
)
from reflowpairs.storelock import StoreLock, busy_error


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """How two manifests' jobs differ (backend, how X_0 is kept, shapes, teacher, dataset, generation settings); []
    if they match. A generation record without ``x0`` (written before that setting) counts as ``explicit``."""
    diffs = []
    mixed = x0_mode(a) != x0_mode(b)
    if mixed:
        diffs.append(
            f"X_0 storage: {x0_mode(a)} vs {x0_mode(b)} (generate --x0; a store keeps X_0 one way in every shard)"
        )
    for key in ("backend", "x0", "x1"):
        va, vb = a.get(key), b.get(key)
        if key == "x0" and mixed:  # storage named above: compare what X_0 is, not how it is kept
            va, vb = ({k: v.get(k) for k in ("shape", "dtype")} for v in (va, vb))
        if va != vb:
            diffs.append(f"{key}: {va!r} vs {vb!r}")
    for key in ("teacher", "dataset"):
        if a[key].get("fingerprint") != b[key].get("fingerprint"):
            diffs.append(
                f"{key} fingerprint: {a[key].get('fingerprint', '?')[:12]} vs {b[key].get('fingerprint', '?')[:12]}"
            )
    ga, gb = recorded_generation(a), recorded_generation(b)
    for key in sorted(set(ga) | set(gb)):
        if ga.get(key) != gb.get(key) and key != "x0":  # x0: named above
            diffs.append(f"generation.{key}: {ga.get(key)!r} vs {gb.get(key)!r}")
    return diffs


def mark_complete(manifest: dict[str, Any]) -> None:
    """``complete`` is true when listed frames plus skipped frames cover every frame the job selected."""
    covered = manifest["num_frames"] + len(manifest.get("skipped_frames", []))
    manifest["complete"] = covered >= manifest["generation"]["num_frames"]


def _place(src: Path, dst: Path, move: bool) -> None:
    if dst.exists():
        raise ReflowPairsError(f"Cannot place shard {src} at {dst}: a shard of that name is already there.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if move:
        os.replace(src, dst)
        return
    tmp = dst.with_name(TMP_PREFIX + dst.name)
    _remove(tmp)
    if src.is_dir():
        shutil.copytree(src, tmp)
    else:
        shutil.copy2(src, tmp)
    fsync_tree(tmp)
    os.replace(tmp, dst)


def _absorb(
    out: Path, manifest: dict[str, Any], part: Path, part_manifest: dict[str, Any], prefix: str, move: bool
) -> None:
    """List ``part``'s shards in ``manifest`` (copied or moved into ``out/shards``), rewriting it after each."""
    for entry in part_manifest["shards"]:
        src = part / entry["path"]
        if not src.exists():  # moved already by an interrupted earlier absorb; its frames are regenerated
            continue
        name = prefix + Path(entry["path"]).name
        _place(src, out / SHARDS_DIR / name, move)
        manifest["shards"].append(
            {
                **entry,
                "path": f"{SHARDS_DIR}/{name}",
                "store_id": entry.get("store_id", part_manifest["store_id"]),
                "written_as": entry.get("written_as", entry["path"]),
            }
        )
        manifest["num_pairs"] += entry["num_pairs"]
        manifest["num_frames"] += entry["num_frames"]
        write_manifest(out, manifest)
    manifest.setdefault("skipped_frames", []).extend(part_manifest.get("skipped_frames", []))


def absorb_parts(out: Path, manifest: dict[str, Any]) -> None:
    """Move every ``out/parts/*`` sub-store's shards into ``out`` and delete the parts (main process only)."""
    parts_dir = out / PARTS_DIR
    if not parts_dir.is_dir():
        return
    for part in sorted(p for p in parts_dir.iterdir() if (p / MANIFEST).is_file()):
        part_manifest = read_manifest(part)
        diffs = differences(manifest, part_manifest)
        if diffs:
            raise ReflowPairsError(
                f"{part} belongs to another job: " + "; ".join(diffs) + ".", "Remove it, or use --overwrite."
            )
        _absorb(out, manifest, part, part_manifest, "", move=True)
    mark_complete(manifest)
    write_manifest(out, manifest)
    shutil.rmtree(parts_dir)


def _require_empty(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ReflowPairsError(f"--out {out} exists and is not a directory.", "Merge into a new directory.")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        raise ReflowPairsError(f"--out {out} is not empty.", "Merge into a new directory.")


def merge_stores(slices: list[Path], out: Path) -> dict[str, Any]:
    """Copy the shards of partition slices into a new store at ``out`` and return its manifest.

    Refuses slices from different jobs (naming the difference), overlapping frames, slices that a ``generate`` is
    still writing, and an existing ``out``. Holds ``out``'s store lock while it writes."""
    if not slices:
        raise ReflowPairsError("reflowpairs merge needs at least one slice directory.")
    _require_empty(out)
    manifests = [read_manifest(s) for s in slices]
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


def _merge_into(out: Path, slices: list[Path], manifests: list[dict[str, Any]]) -> dict[str, Any]:
    first = manifests[0]
    manifest = {k: v for k, v in first.items() if k not in ("shards", "partition")}
    manifest.update(
        store_id=uuid.uuid4().hex,
        num_pairs=0,
        num_frames=0,
        shards=[],
        skipped_frames=[],
        merged_from=[str(s) for s in slices],
    )
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)
    for i, (path, part_manifest) in enumerate(zip(slices, manifests, strict=True)):
        _absorb(out, manifest, path, part_manifest, f"s{i:03d}-", move=False)
    mark_complete(manifest)
    write_manifest(out, manifest)
    return manifest
