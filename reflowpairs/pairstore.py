"""The sharded pair store: ``OUT/manifest.json`` plus ``OUT/shards/<group>/<name>.zarr|.parquet``.

The format is a contract other tools can read without this package; ``docs/pair-store.md``
states it and this module keeps to it. In short:

- a shard holds n pairs: ``x0`` (n, T, D0) float32, ``x1`` (n, T, D1) float32, ``obs_index`` (n,)
  int64, ``sample`` (n,) int32 (zarr v3 arrays, one data file each through zarr's sharding codec, or
  Parquet columns with x0/x1 as fixed-size lists of float32, each tensor flattened row-major);
- shards sit in group folders of at most ``SHARDS_PER_FOLDER`` shards (``shard_rel_path``);
- a shard is written under ``.tmp-<name>`` beside its final path, flushed, and renamed into place only
  when complete; one fsynced line recording it is then appended to the store's journal
  (``journal/<token>.jsonl``, named by the manifest while the store is incomplete), and the journal is
  folded into ``manifest.json`` (atomically: temp file + rename) when the run ends. Writing a shard
  therefore costs the same whatever the store's size, the manifest plus its journal only ever list
  complete shards, and anything else under ``shards/`` is a leftover from an interrupted run;
- each shard entry records sha256 checksums of its arrays' logical content (C order,
  little-endian bytes), so a reader can prove a shard is the one that was written;
- X_0 is a pure function of ``(generation.seed, obs_index, sample)`` (``reflowpairs/noise.py``), so a
  store may leave it out: with manifest ``x0.stored: false`` (``generate --x0 implicit``) shards hold
  only ``x1``, ``obs_index`` and ``sample``, and ``PairStore.read`` regenerates ``x0`` with the
  generator the manifest names (``x0.generator``). A store without ``x0.stored`` stores X_0;
- a shard holds whole frames only (all K samples of a frame land in the same shard), so a
  resumed run can tell done frames from shard contents alone.

One writer per process (``PairStoreWriter``): shard names carry the writer's id, so writers on
several processes never collide, and a single manifest lists them all.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from reflowpairs.atomic import NotAJSONObjectError, fsync_dir, fsync_tree, load_json_object
from reflowpairs.errors import ReflowPairsError
from reflowpairs.noise import GENERATOR, check_generator, pair_noise

FORMAT = "reflowpairs.pairs"
VERSION = 2
"""The format version this build writes. Version 2 adds the shard journal of an incomplete store, group folders under
``shards/`` and single-file zarr arrays; a complete store's ``manifest.json`` still lists every shard."""
READ_VERSIONS = (1, 2)
"""The format versions this build reads (version 1: every shard listed in ``manifest.json`` at all times)."""
BACKENDS = ("zarr", "parquet")
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
PARTS_DIR = "parts"  # per-rank sub-stores of a multi-process generate (reflowpairs/merge.py)
TMP_PREFIX = ".tmp-"
LOCK = ".lock"  # the writer lock (reflowpairs/storelock.py)
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


@dataclass
class Pairs:
    """A block of pairs: ``x0`` (n, T, D0) f32, ``x1`` (n, T, D1) f32, ``obs_index`` (n,) i64, ``sample`` (n,) i32."""

    x0: np.ndarray
    x1: np.ndarray
    obs_index: np.ndarray
    sample: np.ndarray

    def __post_init__(self):
        for name in ARRAYS:
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=DTYPES[name]))
        n = len(self.obs_index)
        if not (len(self.x0) == len(self.x1) == len(self.sample) == n):
            raise ValueError("x0, x1, obs_index and sample must have the same length")

    def __len__(self) -> int:
        return len(self.obs_index)

    def take(self, rows: np.ndarray | slice) -> Pairs:
        return Pairs(self.x0[rows], self.x1[rows], self.obs_index[rows], self.sample[rows])

    @staticmethod
    def concat(blocks: list[Pairs]) -> Pairs:
        return Pairs(*(np.concatenate([getattr(b, name) for b in blocks]) for name in ARRAYS))


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's logical content: C order, little-endian bytes of its dtype."""
    return hashlib.sha256(
        np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    ).hexdigest()


def checksums(pairs: Pairs, arrays: tuple[str, ...] = ARRAYS) -> dict[str, str]:
    """sha256 of each of ``arrays`` of ``pairs`` (the arrays a shard stores)."""
    return {name: array_sha256(getattr(pairs, name)) for name in arrays}


# --- how X_0 is kept -------------------------------------------------------------------------------


def x0_probe(seed: int, shape, generator: str = GENERATOR) -> dict[str, Any]:
    """``{"obs_index": 0, "sample": 0, "sha256": ...}``: the checksum of X_0 of pair (0, 0) as ``generator`` draws it
    here. Recorded in an implicit store's manifest, it lets any reader prove its regeneration reproduces the writer's
    (torch does not promise the same ``randn`` numbers across releases) at the cost of one draw."""
    x0 = pair_noise(int(seed), np.zeros(1, np.int64), np.zeros(1, np.int64), shape, generator)
    return {"obs_index": 0, "sample": 0, "sha256": array_sha256(x0[0])}


def x0_spec(shape, mode: str = "explicit", seed: int | None = None) -> dict[str, Any]:
    """The manifest's ``x0`` entry. ``explicit``: ``{"shape", "dtype"}``, exactly as format version 1 always wrote it;
    ``implicit``: also ``"stored": false``, ``"generator"`` (the versioned name of the recipe that regenerates it) and
    ``"probe"`` (``x0_probe`` of ``seed``, the store's ``generation.seed``)."""
    if mode not in X0_MODES:
        raise ReflowPairsError(f"`x0` must be one of {', '.join(X0_MODES)}, got {mode!r}.")
    spec: dict[str, Any] = {"shape": list(shape), "dtype": "float32"}
    if mode == "implicit":
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ReflowPairsError(
                f"`seed` must be a non-negative integer to regenerate X_0 from, got {seed!r}."
            )
        spec.update(stored=False, generator=GENERATOR, probe=x0_probe(seed, shape))
    return spec


# --- files -----------------------------------------------------------------------------------------


def write_shard(
    path: Path, pairs: Pairs, backend: str, attrs: dict[str, Any], arrays: tuple[str, ...] = ARRAYS
) -> None:
    """Write ``arrays`` of ``pairs`` to ``path`` atomically: into ``.tmp-<name>`` beside it, fsync, rename."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    if not path.parent.is_dir():  # a new group folder: its entry in shards/ must survive a crash too
        path.parent.mkdir(parents=True)
        fsync_dir(path.parent.parent)
    remove_path(tmp)
    if backend == "zarr":
        _write_zarr(tmp, pairs, attrs, arrays)
    else:
        _write_parquet(tmp, pairs, attrs, arrays)
    fsync_tree(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _write_zarr(path: Path, pairs: Pairs, attrs: dict[str, Any], arrays: tuple[str, ...]) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update(attrs)
    for name in arrays:
        data = getattr(pairs, name)
        rows = min(ZARR_CHUNK, max(len(data), 1))
        chunks = (rows, *data.shape[1:])
        # one zarr shard (one file, ``c.0[.0.0]``) holds the whole array, its chunks inside it
        whole = (-(-max(len(data), 1) // rows) * rows, *data.shape[1:])
        array = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            shards=whole,
            chunk_key_encoding={"name": "default", "separator": "."},
        )
        array[...] = data


def _write_parquet(path: Path, pairs: Pairs, attrs: dict[str, Any], arrays: tuple[str, ...]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def fixed(x: np.ndarray) -> pa.FixedSizeListArray:
        width = int(np.prod(x.shape[1:]))
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), width)

    columns = {
        "obs_index": pa.array(pairs.obs_index),
        "sample": pa.array(pairs.sample),
        "x0": fixed(pairs.x0) if "x0" in arrays else None,
        "x1": fixed(pairs.x1),
    }
    table = pa.table(
        {name: column for name, column in columns.items() if name in arrays}
    ).replace_schema_metadata({b"reflowpairs": json.dumps(attrs).encode()})
    pq.write_table(table, path, row_group_size=1024)


def read_shard(
    path: Path, backend: str, x0_shape: tuple[int, ...], x1_shape: tuple[int, ...], columns=ARRAYS
) -> dict[str, np.ndarray]:
    """Read ``columns`` of a shard as numpy arrays (x0/x1 reshaped to ``(n, *shape)``)."""
    if backend == "zarr":
        import zarr

        group = zarr.open_group(str(path), mode="r")
        return {name: np.asarray(group[name][...]) for name in columns}
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=list(columns))
    out = {}
    for name in columns:
        column = table.column(name).combine_chunks()
        if name in ("x0", "x1"):
            shape = x0_shape if name == "x0" else x1_shape
            out[name] = column.values.to_numpy(zero_copy_only=False).reshape(len(column), *shape)
        else:
            out[name] = column.to_numpy()
    return out


def shard_attrs(path: Path, backend: str) -> dict[str, Any]:
    """The metadata a shard carries about itself (store id, name)."""
    if backend == "zarr":
        import zarr

        return dict(zarr.open_group(str(path), mode="r").attrs)
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"reflowpairs", b"{}"))


def remove_path(path: Path) -> None:
    """Remove a shard, a leftover or a store entry: a directory with everything under it, or a file; nothing if absent."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --- manifest --------------------------------------------------------------------------------------


def _damaged(path: Path, what: str) -> ReflowPairsError:
    return ReflowPairsError(
        f"{path} {what}, so it is not a readable pair-store manifest.",
        "If this directory is a pair store, its manifest is damaged: restore manifest.json from a copy, or delete the "
        "directory and run `reflowpairs generate` again.",
    )


def load_manifest_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``; a file that cannot be read, is not UTF-8, not JSON or not an object raises
    ``ReflowPairsError`` naming it (never a raw ``OSError``/``UnicodeDecodeError``/``RecursionError``)."""
    path = Path(path)
    try:
        return load_json_object(path)
    except OSError as err:
        raise ReflowPairsError(
            f"Cannot read {path} ({err.strerror or err}).", "Check that it is a readable file."
        ) from err
    except NotAJSONObjectError as err:
        raise _damaged(path, err.problem) from err.__cause__


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shape_problem(spec: Any) -> str | None:
    shape = spec.get("shape") if isinstance(spec, dict) else None
    if isinstance(shape, list) and shape and all(_is_count(v) and v > 0 for v in shape):
        return None
    return f"its shape is {shape!r}, not a list of positive integers"


def _shard_entry_problem(entry: Any) -> str | None:
    """What makes a ``shards`` entry unusable by a reader, or None; ``reflowpairs validate`` checks the rest."""
    if not isinstance(entry, dict):
        return f"is a JSON {type(entry).__name__}, not an object"
    path = entry.get("path")
    if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in Path(path).parts:
        return f"has path {path!r}, not a relative path inside the store"
    if not _is_count(entry.get("num_pairs")):
        return f"({path}) has num_pairs {entry.get('num_pairs')!r}, not a count"
    if "num_frames" in entry and not _is_count(entry["num_frames"]):
        return f"({path}) has num_frames {entry['num_frames']!r}, not a count"
    if "sha256" in entry and not isinstance(entry["sha256"], dict):
        return f"({path}) has sha256 {entry['sha256']!r}, not an object of checksums"
    return None


def structure_problems(manifest: dict[str, Any]) -> list[str]:
    """Fields a reader relies on that are missing or of the wrong kind (each named); [] when it can be read."""
    missing = [k for k in ("backend", "num_pairs", "x0", "x1", "shards") if k not in manifest]
    if missing:
        return [f"it has no {', '.join(missing)}"]
    problems = []
    if manifest["backend"] not in BACKENDS:
        problems.append(f"its backend is {manifest['backend']!r}, not one of {', '.join(BACKENDS)}")
    if not _is_count(manifest["num_pairs"]):
        problems.append(f"num_pairs is {manifest['num_pairs']!r}, not a count")
    if "num_frames" in manifest and not _is_count(manifest["num_frames"]):
        problems.append(f"num_frames is {manifest['num_frames']!r}, not a count")
    for key in ("x0", "x1"):
        if (problem := _shape_problem(manifest[key])) is not None:
            problems.append(f"{key}: {problem}")
    problems += _x0_storage_problems(manifest)
    for key in ("teacher", "dataset", "generation", "software", "partition"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            problems.append(f"{key} is a JSON {type(manifest[key]).__name__}, not an object")
    if "skipped_frames" in manifest and not isinstance(manifest["skipped_frames"], list):
        problems.append(f"skipped_frames is {manifest['skipped_frames']!r}, not a list")
    if not isinstance(manifest["shards"], list):
        problems.append(f"shards is a JSON {type(manifest['shards']).__name__}, not a list")
    else:
        for j, entry in enumerate(manifest["shards"]):
            if (problem := _shard_entry_problem(entry)) is not None:
                problems.append(f"shards[{j}] {problem}")
                break
    return problems


def _x0_storage_problems(manifest: dict[str, Any]) -> list[str]:
    """What stops a reader from getting X_0: a ``stored`` that is not a boolean, or, when X_0 is not stored, no
    generator name or no integer ``generation.seed`` to regenerate it from. Whether this build knows the
    generator is checked when X_0 is regenerated (``reflowpairs validate``: its ``x0 noise`` check)."""
    spec = manifest["x0"]
    if not isinstance(spec, dict) or "stored" not in spec:
        return []
    if not isinstance(spec["stored"], bool):
        return [f"x0.stored is {spec['stored']!r}, not true or false"]
    if spec["stored"]:
        return []
    problems = []
    if not isinstance(spec.get("generator"), str) or not spec["generator"]:
        problems.append(
            f"x0 is not stored but x0.generator is {spec.get('generator')!r}, not the name of the generator that regenerates it"
        )
    generation = manifest.get("generation")
    seed = generation.get("seed") if isinstance(generation, dict) else None
    if not _is_count(seed):
        problems.append(
            f"x0 is not stored but generation.seed is {seed!r}, not the non-negative integer it is regenerated from"
        )
    return problems


def manifest_format(out: str | Path) -> tuple[str | None, str]:
    """``(format, why_not)`` of ``out/manifest.json``: its ``format`` field when it is a JSON object that has one,
    else ``(None, what is wrong with it)``. Recognises a store without requiring it to be sound."""
    try:
        fmt = load_manifest_json(Path(out) / MANIFEST).get("format")
    except ReflowPairsError as err:
        return None, err.what
    return (fmt, "") if isinstance(fmt, str) else (None, f'{Path(out) / MANIFEST} has no "format" field')


def _journal_record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "is not a JSON object"
    if "shard" in record:
        return _shard_entry_problem(record["shard"])
    skipped = record.get("skipped_frames")
    if isinstance(skipped, list) and all(_is_count(i) for i in skipped):
        return None
    return "is neither a shard record nor a skipped-frames record"


def _fold_journal(out: Path, data: dict[str, Any]) -> list[str]:
    """Add the records of the journal ``data`` names (format version 2, an incomplete store) to ``data``: shards not
    yet listed (with their pairs and frames) and skipped frames. The bytes after the last newline are a line torn by a
    crash and are ignored, as is a last line that does not parse (its shard, unlisted, is a leftover). Returns the
    problems found ([] when it folded), like ``structure_problems``."""
    rel = data.get("journal")
    if rel is None:
        return []
    parts = Path(rel).parts if isinstance(rel, str) else ()
    if len(parts) != 2 or parts[0] != JOURNAL_DIR or not parts[1].endswith(".jsonl"):
        return [f"journal is {rel!r}, not a file under {JOURNAL_DIR}/"]
    path = out / rel
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []  # nothing journaled since the manifest was written
    except OSError as err:
        return [f"its journal {rel} cannot be read ({err.strerror or err})"]
    lines = raw.split(b"\n")[:-1]  # the last piece is empty or a torn line
    listed = {entry["path"] for entry in data["shards"]}
    for j, line in enumerate(lines):
        try:
            record = json.loads(line.decode("utf-8"))
            problem = _journal_record_problem(record)
        except (ValueError, RecursionError):
            problem = "is not valid JSON"
        if problem is not None:
            if j == len(lines) - 1:  # the last line, damaged by a crash while it was written
                break
            return [f"line {j + 1} of its journal {rel} {problem}"]
        if "shard" in record:
            entry = record["shard"]
            if entry["path"] not in listed:
                listed.add(entry["path"])
                data["shards"].append(entry)
                data["num_pairs"] += entry["num_pairs"]
                data["num_frames"] += entry.get("num_frames", 0)
        else:
            skipped = data.setdefault("skipped_frames", [])
            known = set(skipped)
            skipped.extend(i for i in dict.fromkeys(record["skipped_frames"]) if i not in known)
    return []


class JobDifference(NamedTuple):
    """One way two stores' jobs differ (``StoreManifest.job_differences``): ``field`` is ``"x0 storage"`` (how X_0 is
    kept, ``X0_MODES``), ``"backend"``, ``"x0"``, ``"x1"`` (the manifest entries), ``"teacher.fingerprint"``,
    ``"dataset.fingerprint"`` or ``"generation.<key>"``; ``ours`` and ``theirs`` are its two values."""

    field: str
    ours: Any
    theirs: Any


class ShardProblem(NamedTuple):
    """What is wrong with one array of a shard (``StoreManifest.shard_problems``): ``kind`` is ``"layout"`` (row
    count, shape or dtype other than the manifest says) or ``"checksum"`` (content other than what was written);
    ``text`` says it in words, starting with the array's name."""

    array: str
    kind: str
    text: str


LAYOUT, CHECKSUM = "layout", "checksum"


class StoreManifest:
    """The manifest of one pair store, ``<out>/manifest.json``: the one owner of the pair-store format.

    ``data`` is the manifest exactly as ``docs/pair-store.md`` defines it (the JSON object on disk, key for key, with
    the records of its journal folded in). Only this class edits it, and every edit is on disk when it returns: a
    shard or a skipped frame as one fsynced line appended to the journal (cost independent of the store's size),
    anything else by rewriting ``manifest.json`` atomically (temp file, fsync, rename; ``write``), which also folds
    the journal in. Thread-safe: the writer thread edits it while the main thread may read ``skipped_frames``.
    Conventions:

    - the manifest lists complete shards only: ``append_shard`` is called once a shard file is in place under its
      final name, so a crash at any moment leaves a manifest (plus journal) whose every shard is whole; a journal
      line torn by the crash is ignored, and its shard, unlisted, is a leftover that ``generate --resume`` redoes;
    - the journal is named by ``manifest.json``'s ``journal`` key, present only while the store is incomplete; every
      ``write`` starts a new one (and removes older ones), so a journal that ``manifest.json`` does not name is never
      read;
    - ``num_pairs`` and ``num_frames`` are the sums of the listed shards' entries (``append_shard`` keeps them so);
    - pairs are numbered globally: shards in manifest order, rows in shard order (``locate``);
    - a shard is sound when each array it stores has the row count, shape and dtype the manifest says and the
      checksum its entry recorded (``shard_problems``);
    - two stores come from the same generation job when ``job_differences`` is empty: same backend, same way of
      keeping X_0, same X_0/X_1 entries, teacher and dataset fingerprints and generation settings. ``generate
      --resume`` extends only such a store, and ``merge`` and the multi-process absorb combine only such stores.
    """

    def __init__(self, out: str | Path, data: dict[str, Any]):
        self.out = Path(out)
        self.data = data
        self._lock = threading.RLock()  # edits come from the writer thread
        self.rewrites = 0  # how many times this object rewrote manifest.json (``write``)
        self.journal_bytes = 0  # bytes it appended to the journal
        self._ends: np.ndarray | None = None  # pair_ends, cached while the shard list is unchanged
        self._starts = np.zeros(0, np.int64)  # the global id of each shard's first pair

    # --- reading, creating, writing

    @classmethod
    def read(cls, out: str | Path) -> StoreManifest:
        """Parse and sanity-check ``out/manifest.json``; errors name the store and what is wrong.

        Any damage (unreadable, not UTF-8, not JSON, not an object, another format or version, fields a reader needs
        missing or of the wrong kind) raises ``ReflowPairsError``; the manifest returned is safe to index as
        ``PairStore`` does. ``reflowpairs validate`` checks the rest of the contract."""
        path = Path(out) / MANIFEST
        if not path.is_file():
            raise ReflowPairsError(
                f"{out} is not a pair store: it has no {MANIFEST}.",
                "Give a directory that `reflowpairs generate` wrote.",
            )
        data = load_manifest_json(path)
        if data.get("format") != FORMAT:
            raise ReflowPairsError(
                f"{path} is not a reflowpairs manifest (its format is {data.get('format')!r}, not {FORMAT!r}).",
                "Give a directory that `reflowpairs generate` wrote.",
            )
        if data.get("version") not in READ_VERSIONS:
            raise ReflowPairsError(
                f"{path} has format version {data.get('version')!r}; this build reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}.",
                "Use the reflowpairs version that wrote it, or regenerate the store.",
            )
        problems = structure_problems(data)
        if not problems:
            problems = _fold_journal(Path(out), data)
        if problems:
            raise ReflowPairsError(
                f"{path} does not follow the pair-store contract: " + "; ".join(problems) + ".",
                "The manifest is damaged or was edited by hand; restore it from a copy or regenerate the store "
                "(`reflowpairs validate` lists every problem).",
            )
        return cls(out, data)

    @classmethod
    def new(
        cls,
        out: str | Path,
        backend: str,
        x0_shape,
        x1_shape,
        provenance: dict[str, Any],
        x0: str = "explicit",
    ) -> StoreManifest:
        """A manifest with no shards yet, for a store at ``out`` (nothing is written): ``provenance`` holds
        teacher/dataset/generation/software (and partition); ``x0`` is how the store keeps X_0 (``X0_MODES``:
        ``explicit`` stores it, ``implicit`` records its generator instead)."""
        if backend not in BACKENDS:
            raise ReflowPairsError(
                f"Unknown `backend` {backend!r}.", f"Set `backend` to one of: {', '.join(BACKENDS)}."
            )
        data = {
            "format": FORMAT,
            "version": VERSION,
            "backend": backend,
            "store_id": uuid.uuid4().hex,
            "complete": False,
            "num_pairs": 0,
            "num_frames": 0,
            "x0": x0_spec(x0_shape, x0, (provenance.get("generation") or {}).get("seed")),
            "x1": {"shape": list(x1_shape), "dtype": "float32"},
            **provenance,
            "shards": [],
        }
        return cls(out, data)

    def emptied(self, out: str | Path, drop: tuple[str, ...] = (), **fields: Any) -> StoreManifest:
        """A manifest of the same job for a store at ``out`` that lists no shards and no skipped frames yet (a rank's
        sub-store, a merged store): this one without the keys in ``drop``, with ``fields`` set (nothing is
        written)."""
        data = {k: v for k, v in self.data.items() if k not in drop and k != "journal"}
        data.update(complete=False, num_pairs=0, num_frames=0, shards=[], skipped_frames=[])
        data.update(fields)
        return StoreManifest(out, data)

    def write(self) -> None:
        """Rewrite ``out/manifest.json`` atomically (temp file, fsync, rename) with everything recorded so far, in the
        format version this build writes: the journal's records are folded in. An incomplete store's manifest names a
        new, empty journal for the records to come; journals it does not name are then removed."""
        with self._lock:
            self.data["version"] = VERSION
            if self.data.get("complete"):
                self.data.pop("journal", None)
            else:
                self.data["journal"] = f"{JOURNAL_DIR}/{uuid.uuid4().hex[:16]}.jsonl"
            tmp = self.out / (TMP_PREFIX + MANIFEST)
            with open(tmp, "w") as handle:
                json.dump(self.data, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.out / MANIFEST)
            fsync_dir(self.out)
            self.rewrites += 1
            journals = self.out / JOURNAL_DIR
            if journals.is_dir() and self.data.get(
                "complete"
            ):  # a complete store is manifest.json and shards/
                remove_path(journals)
            elif journals.is_dir():  # folded into the manifest just written, or never named by it
                for old in journals.iterdir():
                    if f"{JOURNAL_DIR}/{old.name}" != self.data.get("journal"):
                        remove_path(old)

    def _journal(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one fsynced JSON line to the journal ``manifest.json`` names; a store without one
        (complete) is rewritten instead (``write``)."""
        rel = self.data.get("journal")
        if rel is None:
            self.write()
            return
        path = self.out / rel
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        new = not path.exists()
        if new:
            path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            done = 0
            while done < len(line):  # a short write (a file-size limit, a full disk) raises on the next try
                written = os.write(fd, line[done:])
                if written <= 0:
                    raise OSError(errno.EIO, f"cannot append to {path}")
                done += written
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:  # the journal's entry (and its folder's) must survive a crash
            fsync_dir(path.parent)
            fsync_dir(self.out)
        self.journal_bytes += len(line)

    # --- what it records

    @property
    def backend(self) -> str:
        return self.data["backend"]

    @property
    def store_id(self) -> str:
        return self.data["store_id"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        """The shard entries, in manifest order (read them; ``append_shard`` adds one)."""
        return self.data["shards"]

    @property
    def x0_shape(self) -> tuple[int, ...]:
        return tuple(self.data["x0"]["shape"])

    @property
    def x1_shape(self) -> tuple[int, ...]:
        return tuple(self.data["x1"]["shape"])

    @property
    def x0_stored(self) -> bool:
        """Whether the shards hold an ``x0`` array (true unless the manifest says ``x0.stored: false``)."""
        spec = self.data.get("x0")
        return not (isinstance(spec, dict) and spec.get("stored") is False)

    @property
    def x0_mode(self) -> str:
        """``"explicit"`` or ``"implicit"``: how the store keeps X_0 (``X0_MODES``)."""
        return "explicit" if self.x0_stored else "implicit"

    @property
    def x0_generator(self) -> str:
        """The versioned name of the recipe X_0 is (re)generated with."""
        return self.data["x0"].get("generator", GENERATOR)

    @property
    def stored_arrays(self) -> tuple[str, ...]:
        """The arrays each shard holds (and has checksums for)."""
        return ARRAYS if self.x0_stored else IMPLICIT_ARRAYS

    @property
    def seed(self) -> int | None:
        """``generation.seed``, the seed X_0 is a function of."""
        return (self.data.get("generation") or {}).get("seed")

    @property
    def generation(self) -> dict[str, Any]:
        """A copy of the generation record with ``x0`` (``X0_MODES``) filled in from the manifest's ``x0`` entry when
        the record predates that setting (such a store keeps X_0: ``explicit``)."""
        generation = dict(self.data.get("generation") or {})
        generation.setdefault("x0", self.x0_mode)
        return generation

    @property
    def skipped_frames(self) -> list[int]:
        """obs_index of the frames skipped for non-finite X_1 (a copy, taken under the lock the writer thread holds
        while it adds to them)."""
        with self._lock:
            return list(self.data.get("skipped_frames", []))

    def shard_names(self) -> set[str]:
        """File names (under ``shards/`` or its group folders) of the listed shards."""
        return {Path(entry["path"]).name for entry in self.shards}

    def leftovers(self) -> list[Path]:
        """Entries under ``shards/`` that no listed shard is or holds (``unlisted_entries``)."""
        return unlisted_entries(self.out, {entry["path"] for entry in self.shards})

    # --- edits (each written at once)

    def append_shard(self, entry: dict[str, Any]) -> None:
        """List a shard that is in place under ``entry["path"]`` and add its pairs and frames to the totals: one line
        appended to the journal (``manifest.json`` is not rewritten), so the cost does not grow with the store."""
        with self._lock:
            self.shards.append(entry)
            self.data["num_pairs"] += entry["num_pairs"]
            self.data["num_frames"] += entry["num_frames"]
            self._ends = None
            self._journal({"shard": entry})

    def add_skipped(self, obs_index: list[int]) -> None:
        """Record frames skipped for non-finite X_1 (each frame once; journaled when any is new), so a resumed run
        counts them as done and never samples them again."""
        with self._lock:
            listed = self.data.setdefault("skipped_frames", [])
            known = set(listed)
            new = [i for i in dict.fromkeys(int(i) for i in obs_index) if i not in known]
            if new:
                listed.extend(new)
                self._journal({"skipped_frames": new})

    def set_complete(self, complete: bool | None = None) -> None:
        """Set ``complete`` and write (folding the journal in). ``None``: complete when the listed frames plus the
        skipped frames cover every frame the job selected (``generation.num_frames``)."""
        with self._lock:
            if complete is None:
                covered = self.data["num_frames"] + len(self.data.get("skipped_frames", []))
                complete = covered >= self.data["generation"]["num_frames"]
            self.data["complete"] = complete
            self.write()

    # --- pair lookup

    def pair_ends(self) -> np.ndarray:
        """int64 ``(shards,)``: one past the global id of each shard's last pair (the running sum of ``num_pairs``)."""
        if self._ends is None or len(self._ends) != len(self.shards):
            self._ends = np.cumsum([int(entry["num_pairs"]) for entry in self.shards], dtype=np.int64)
            self._starts = np.concatenate([np.zeros(1, np.int64), self._ends[:-1]])
        return self._ends

    def listed_pairs(self) -> int:
        """How many pairs the listed shards hold (the sum of their entries' ``num_pairs``)."""
        ends = self.pair_ends()
        return int(ends[-1]) if len(ends) else 0

    def locate_many(self, pair_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, row)`` int64 arrays of global pair ids; ``IndexError`` names the first id outside
        ``[0, listed_pairs())``."""
        ids = np.asarray(pair_ids, dtype=np.int64)
        ends = self.pair_ends()
        total = int(ends[-1]) if len(ends) else 0
        outside = (ids < 0) | (ids >= total)
        if outside.any():
            raise IndexError(f"pair id {int(ids[outside][0])} out of range [0, {total})")
        shards = np.searchsorted(ends, ids, side="right").astype(np.int64)
        return shards, ids - self._starts[shards]

    def locate(self, pair_id: int) -> tuple[int, int]:
        """``(shard, row)`` of global pair ``pair_id``; ``IndexError`` outside ``[0, listed_pairs())``."""
        shards, rows = self.locate_many(np.array([pair_id]))
        return int(shards[0]), int(rows[0])

    # --- soundness

    def shard_problems(self, i: int, data: dict[str, np.ndarray]) -> list[ShardProblem]:
        """What is wrong with the stored arrays ``data`` of shard ``i`` (as ``read_shard`` returns them): each of
        ``stored_arrays`` must have its entry's row count, the manifest's shape and dtype, and the checksum recorded
        when it was written; [] when the shard is sound."""
        entry = self.shards[i]
        n = entry.get("num_pairs")
        expected = {"x0": (n, *self.x0_shape), "x1": (n, *self.x1_shape), "obs_index": (n,), "sample": (n,)}
        recorded = entry.get("sha256") or {}
        problems = []
        for name in self.stored_arrays:
            array = data[name]
            if array.shape != expected[name] or array.dtype != DTYPES[name]:
                problems.append(
                    ShardProblem(
                        name,
                        LAYOUT,
                        f"{name} is {array.dtype}{list(array.shape)}, the manifest says {DTYPES[name]}{list(expected[name])}",
                    )
                )
            elif array_sha256(array) != recorded.get(name):
                problems.append(
                    ShardProblem(
                        name, CHECKSUM, f"{name} does not match the checksum recorded when it was written"
                    )
                )
        return problems

    def origin_problem(self, i: int, attrs: dict[str, Any]) -> str | None:
        """What is wrong with where shard ``i`` comes from, given the attributes it carries (``shard_attrs``), or None:
        it must carry the store id and name it was written with (its entry's ``store_id`` and ``written_as``, which a
        merged store keeps for each shard, else this store's id and the entry's path)."""
        entry = self.shards[i]
        name = entry["path"]
        origin_id = entry.get("store_id", self.data.get("store_id"))
        if attrs.get("store_id") != origin_id:
            return (
                f"{name} belongs to store {attrs.get('store_id')!r}, not this store ({origin_id}): copied in from "
                "another store"
            )
        if attrs.get("shard") != entry.get("written_as", name):
            return f"{name} was written as {attrs.get('shard')} (a copy or a renamed shard)"
        return None

    # --- same job

    def job_differences(self, other: StoreManifest) -> list[JobDifference]:
        """How ``other``'s generation job differs from this one's; [] when they are the same job. A generation record
        without ``x0`` (written before that setting) counts as ``explicit``; when the two keep X_0 differently, that
        is one difference (``"x0 storage"``) and their ``x0`` entries are compared on shape and dtype only. An implicit
        store's ``x0.probe`` follows from ``generation.seed``: with different seeds (a difference of their own) the
        probes are not compared."""
        a, b = self.data, other.data
        diffs = []
        mixed = self.x0_mode != other.x0_mode
        if mixed:
            diffs.append(JobDifference("x0 storage", self.x0_mode, other.x0_mode))
        for key in ("backend", "x0", "x1"):
            va, vb = a.get(key), b.get(key)
            if key == "x0" and mixed:  # storage named above: compare what X_0 is, not how it is kept
                va, vb = ({k: v.get(k) for k in ("shape", "dtype")} for v in (va, vb))
            elif key == "x0" and self.seed != other.seed:
                va, vb = ({k: v for k, v in spec.items() if k != "probe"} for spec in (va, vb))
            if va != vb:
                diffs.append(JobDifference(key, va, vb))
        for key in ("teacher", "dataset"):
            fa, fb = ((m.get(key) or {}).get("fingerprint") for m in (a, b))
            if fa != fb:
                diffs.append(JobDifference(f"{key}.fingerprint", fa, fb))
        ga, gb = self.generation, other.generation
        for key in sorted(set(ga) | set(gb)):
            if key != "x0" and ga.get(key) != gb.get(key):  # x0: "x0 storage" above
                diffs.append(JobDifference(f"generation.{key}", ga.get(key), gb.get(key)))
        return diffs


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The checked manifest of the store at ``out`` as a dict (``StoreManifest.read(out).data``)."""
    return StoreManifest.read(out).data


# --- writer ----------------------------------------------------------------------------------------


class PairStoreWriter:
    """Appends whole frames of pairs to a store and cuts them into atomic shards.

    ``add`` takes pairs frame by frame (all K samples of a frame together); once ``shard_size``
    pairs are buffered, a shard of ``max(K, shard_size // K * K)`` pairs is written and journaled
    (``StoreManifest.append_shard``). ``close`` writes what is left and folds the journal into the manifest. Not thread-safe: one writer per process. ``add`` always takes X_0;
    a store whose manifest says ``x0.stored: false`` drops it (``StoreManifest.stored_arrays``).
    """

    def __init__(
        self,
        manifest: StoreManifest,
        shard_size: int,
        samples_per_frame: int,
        writer_id: str = "w0",
    ):
        if shard_size < 1:
            raise ReflowPairsError(f"`shard_size` must be at least 1, got {shard_size}.")
        self.out = manifest.out
        self.manifest = manifest
        self.samples_per_frame = samples_per_frame
        self.pairs_per_shard = max(samples_per_frame, shard_size // samples_per_frame * samples_per_frame)
        self.writer_id = writer_id
        self._buffer: list[Pairs] = []
        self._buffered = 0
        (self.out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        self._seq = sum(1 for name in manifest.shard_names() if name.startswith(f"{writer_id}-"))
        manifest.write()

    def add(self, pairs: Pairs) -> None:
        self._buffer.append(pairs)
        self._buffered += len(pairs)
        while self._buffered >= self.pairs_per_shard:
            block = Pairs.concat(self._buffer)
            self._write(block.take(slice(0, self.pairs_per_shard)))
            rest = block.take(slice(self.pairs_per_shard, None))
            self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)

    def skip(self, obs_index: list[int]) -> None:
        """Record frames skipped for non-finite X_1 in the manifest at once (``StoreManifest.add_skipped``), even if
        this run dies before its next shard."""
        self.manifest.add_skipped(obs_index)

    def close(self, complete: bool) -> None:
        """Write buffered pairs as a last shard and mark the manifest complete (or not)."""
        if self._buffered:
            self._write(Pairs.concat(self._buffer))
            self._buffer, self._buffered = [], 0
        self.manifest.set_complete(complete)

    def _write(self, pairs: Pairs) -> None:
        manifest = self.manifest
        rel = shard_rel_path(f"{self.writer_id}-{self._seq:06d}{SHARD_SUFFIX[manifest.backend]}")
        attrs = {"format": FORMAT, "store_id": manifest.store_id, "shard": rel}
        arrays = manifest.stored_arrays
        write_shard(self.out / rel, pairs, manifest.backend, attrs, arrays)
        self._seq += 1
        frames = len(np.unique(pairs.obs_index))
        manifest.append_shard(
            {
                "path": rel,
                "num_pairs": len(pairs),
                "num_frames": frames,
                "obs_index_min": int(pairs.obs_index.min()),
                "obs_index_max": int(pairs.obs_index.max()),
                "store_id": manifest.store_id,
                "sha256": checksums(pairs, arrays),
            }
        )


# --- reader ----------------------------------------------------------------------------------------


class PairStore:
    """Read access to a pair store: its manifest (``meta``, a ``StoreManifest``; ``manifest`` is its dict), and shards
    on demand (nothing loaded up front).

    ``read`` returns ``x0`` whether or not the shards store it: a store with ``x0.stored: false`` has it regenerated
    from ``(generation.seed, obs_index, sample)`` by its recorded generator (``regenerate_x0``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = StoreManifest.read(self.path)
        self.manifest: dict[str, Any] = self.meta.data
        self.backend: str = self.meta.backend
        self.x0_shape = self.meta.x0_shape
        self.x1_shape = self.meta.x1_shape
        self.shards: list[dict[str, Any]] = self.meta.shards
        self.x0_stored: bool = self.meta.x0_stored
        self.stored_arrays: tuple[str, ...] = self.meta.stored_arrays
        self.x0_generator: str = self.meta.x0_generator
        self.seed: int | None = self.meta.seed
        self._x0_checked = False

    def check_x0_generator(self) -> str:
        """For a store that does not keep X_0: raise ``ReflowPairsError`` unless this build knows its generator and,
        when the manifest records a ``probe``, regenerating that pair here gives the writer's X_0 (same checksum).
        Returns what was checked, in words. One draw; ``regenerate_x0`` calls it once per ``PairStore``."""
        check_generator(self.x0_generator, f"store {self.path}")
        probe = self.manifest["x0"].get("probe")
        if probe is None:
            self._x0_checked = True
            return f"generator {self.x0_generator} is known (the manifest records no probe to compare with)"
        try:
            obs, sample, recorded = int(probe["obs_index"]), int(probe["sample"]), str(probe["sha256"])
        except (TypeError, KeyError, ValueError) as err:
            raise ReflowPairsError(
                f"Store {self.path}: its manifest's x0.probe {probe!r} is not {{obs_index, sample, sha256}}.",
                "The manifest is damaged or was edited by hand; restore it from a copy or regenerate the store.",
            ) from err
        got = array_sha256(
            pair_noise(int(self.seed), np.array([obs]), np.array([sample]), self.x0_shape, self.x0_generator)[
                0
            ]
        )
        if got != recorded:
            written = (self.manifest.get("software") or {}).get("torch", "?")
            import torch

            raise ReflowPairsError(
                f"Store {self.path} does not keep X_0, and X_0 regenerated here differs from the writer's: pair "
                f"(obs_index {obs}, sample {sample}) has sha256 {got[:12]}..., the manifest records {recorded[:12]}... "
                f"(generator {self.x0_generator}; torch {torch.__version__} here, {written} when it was written).",
                f"Read it with torch {written}, or regenerate the store (with `x0` explicit to keep X_0 in it).",
            )
        self._x0_checked = True
        return f"generator {self.x0_generator} is known and reproduces the writer's X_0 of pair ({obs}, {sample})"

    def regenerate_x0(self, obs_index: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """X_0 ``(n, T, D0)`` float32 of pairs ``(obs_index[r], sample[r])`` from the store's seed and generator;
        a generator this build does not know, or one that does not reproduce the recorded probe, raises
        ``ReflowPairsError`` (``check_x0_generator``)."""
        if not self._x0_checked:
            self.check_x0_generator()
        return pair_noise(int(self.seed), obs_index, sample, self.x0_shape, self.x0_generator)

    def __len__(self) -> int:
        return int(self.manifest["num_pairs"])

    def shard_path(self, i: int) -> Path:
        return self.path / self.shards[i]["path"]

    def read(self, i: int, columns=ARRAYS) -> dict[str, np.ndarray]:
        """Columns of shard ``i``, ``x0`` regenerated when the store does not keep it; a missing or unreadable shard
        raises an error naming it."""
        columns = tuple(columns)
        if "x0" in columns and not self.x0_stored:
            stored = tuple(dict.fromkeys(c for c in (*columns, "obs_index", "sample") if c != "x0"))
            data = self.read_stored(i, stored)
            x0 = self.regenerate_x0(data["obs_index"], data["sample"])
            return {name: x0 if name == "x0" else data[name] for name in columns}
        return self.read_stored(i, columns)

    def read_stored(self, i: int, columns=ARRAYS) -> dict[str, np.ndarray]:
        """Columns of shard ``i`` as its files hold them (no regeneration); errors name the shard."""
        path = self.shard_path(i)
        if not path.exists():
            raise ReflowPairsError(
                f"Shard {self.shards[i]['path']} of store {self.path} is missing.",
                "The store is damaged; regenerate it or restore the file.",
            )
        try:
            return read_shard(path, self.backend, self.x0_shape, self.x1_shape, columns)
        except Exception as err:  # noqa: BLE001 - zarr/pyarrow/numcodecs raise many kinds
            raise ReflowPairsError(
                f"Shard {self.shards[i]['path']} of store {self.path} cannot be read ({type(err).__name__}: {err}).",
                "The store is damaged; regenerate it or restore the file.",
            ) from err

    def read_pairs(self, i: int) -> Pairs:
        return Pairs(**self.read(i))

    def iter_shards(self) -> Iterator[Pairs]:
        for i in range(len(self.shards)):
            yield self.read_pairs(i)

    def index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(obs_index, sample)`` of every pair, in shard order (reads only those two columns)."""
        cols = [self.read(i, ("obs_index", "sample")) for i in range(len(self.shards))]
        if not cols:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        return np.concatenate([c["obs_index"] for c in cols]), np.concatenate([c["sample"] for c in cols])

    def verify_shard(self, i: int) -> list[str]:
        """Problems with shard ``i``: unreadable, or ``StoreManifest.shard_problems`` (row count, shape, dtype, checksum
        of the arrays it stores; X_0 is not read, nor regenerated, when the store does not keep it)."""
        try:
            data = self.read_stored(i, self.stored_arrays)
        except ReflowPairsError as err:
            return [err.what]
        return [problem.text for problem in self.meta.shard_problems(i, data)]

    def origin_problem(self, i: int) -> str | None:
        """``StoreManifest.origin_problem`` of shard ``i``, from the attributes its file carries."""
        return self.meta.origin_problem(i, shard_attrs(self.shard_path(i), self.backend))
