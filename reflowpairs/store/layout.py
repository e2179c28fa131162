"""Where everything of a pair store lives, and the format's names and constants.

A store is ``OUT/manifest.json`` plus ``OUT/shards/<group>/<name>.zarr|.parquet`` (``shard_rel_path``); an incomplete
store also has ``OUT/journal/<token>.jsonl``, a multi-process ``generate`` its ranks' sub-stores under ``OUT/parts/``.
``docs/pair-store.md`` states the format; the modules of ``reflowpairs.store`` keep to it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from reflowpairs.atomic import TMP_PREFIX

FORMAT = "reflowpairs.pairs"
VERSION = 2
"""The format version this build writes. Version 2 adds the shard journal of an incomplete store, group folders under
``shards/`` and single-file zarr arrays; a complete store's ``manifest.json`` still lists every shard."""
READ_VERSIONS = (1, 2)
"""The format versions this build reads (version 1: every shard listed in ``manifest.json`` at all times)."""
BACKENDS = ("zarr", "parquet")
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
PARTS_DIR = "parts"  # per-rank sub-stores of a multi-process generate (reflowpairs/store/merge.py)
LOCK = ".lock"  # the writer lock (reflowpairs/store/lock.py)
JOURNAL_DIR = "journal"  # the shard journal of an incomplete store (format version 2)
GENERATE_OPTIONS = (
    "generate_config.yaml"  # the options generate ran with (written by the CLI beside the manifest)
)
STORE_ENTRIES = (MANIFEST, SHARDS_DIR, PARTS_DIR, JOURNAL_DIR, TMP_PREFIX + MANIFEST, LOCK, GENERATE_OPTIONS)
"""Everything a store puts at its top level; ``generate --overwrite`` removes these and nothing else."""
ARRAYS = ("x0", "x1", "obs_index", "sample")
IMPLICIT_ARRAYS = ("x1", "obs_index", "sample")  # what a shard of a store with x0.stored false holds
X0_MODES = ("explicit", "implicit")
"""How a store keeps X_0: ``explicit`` (an ``x0`` array in every shard, format version 1 as it always was) or
``implicit`` (no ``x0`` array; readers regenerate it from ``(seed, obs_index, sample)``)."""
TIME_DIRECTIONS = ("noise_at_1", "noise_at_0")
"""The teacher family's time convention, recorded in the manifest's optional ``time_direction``: ``noise_at_1``
(lerobot's VLA convention: t=1 noise -> t=0 action) or ``noise_at_0`` (t=0 noise -> t=1 action)."""
DEFAULT_TIME_DIRECTION = "noise_at_1"
"""The time direction of a store whose manifest has no ``time_direction`` (every store written before the key)."""
DTYPES = {
    "x0": np.dtype(np.float32),
    "x1": np.dtype(np.float32),
    "obs_index": np.dtype(np.int64),
    "sample": np.dtype(np.int32),
}
"""The dtype of each array a shard holds."""
SHARD_SUFFIX = {"zarr": ".zarr", "parquet": ".parquet"}
"""The file name ending of a shard of each backend."""
ZARR_CHUNK = 256  # pairs per zarr chunk along the first axis (inner chunks of the array's one shard file)
SHARDS_PER_FOLDER = 1000
"""At most this many shards share a folder: a shard's group folder is its name less the last 3 digits of its
sequence number (``shard_rel_path``)."""


def shard_rel_path(name: str) -> str:
    """The path in a store of the shard called ``name`` (``<writer id>-<sequence><suffix>``, sequence >= 6 digits):
    ``shards/<name less its suffix and last 3 digits>/<name>``, e.g. ``shards/w0-000/w0-000123.zarr``. Sequences
    ``k*1000 .. k*1000+999`` of one writer share a folder, so no folder holds more than ``SHARDS_PER_FOLDER``
    shards (plus their half-written ``.tmp-`` copies)."""
    stem = name.split(".", 1)[0]
    return f"{SHARDS_DIR}/{stem[:-3]}/{name}"


def unlisted_entries(out: Path, listed: set[str]) -> list[Path]:
    """Entries under ``out/shards/`` that are not the listed shard paths ``listed`` (relative to ``out``) nor a
    folder holding one: leftovers of an interrupted run (``.tmp-`` shards, shards never listed, group folders of
    those only) or files copied in. Works for version 1 (shards directly under ``shards/``) and 2 (group folders)."""
    listed_paths = {Path(p) for p in listed}
    keep = {parent for p in listed_paths for parent in p.parents}
    found: list[Path] = []

    def walk(rel: Path) -> None:
        for child in sorted((out / rel).iterdir()):
            child_rel = rel / child.name
            if child_rel in listed_paths:
                continue
            if child_rel in keep and child.is_dir():
                walk(child_rel)
            else:
                found.append(child)

    if (out / SHARDS_DIR).is_dir():
        walk(Path(SHARDS_DIR))
    return found


def remove_path(path: Path) -> None:
    """Remove a shard, a leftover or a store entry: a directory with everything under it, or a file; nothing if absent."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
