"""The manifest of one pair store, ``OUT/manifest.json``: ``StoreManifest``, the one owner of the format.

The manifest lists complete shards only, with their pairs, frames and checksums, and records the job that made them
(backend, the X_0/X_1 entries, the teacher family's ``time_direction`` when given, teacher, dataset, generation,
software). Its pieces live beside it: the names in ``layout``, the reader's checks in ``contract``, the journal of
an incomplete store in ``journal``, how X_0 is kept in ``x0``, shard soundness in ``soundness`` and the same-job
comparison in ``jobs``.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from reflowpairs.atomic import replace_atomically
from reflowpairs.errors import ReflowPairsError
from reflowpairs.noise import GENERATOR
from reflowpairs.store.contract import load_manifest_json, structure_problems
from reflowpairs.store.jobs import JobDifference, job_differences, time_direction
from reflowpairs.store.journal import append_record, fold_journal
from reflowpairs.store.layout import (
    BACKENDS,
    FORMAT,
    JOURNAL_DIR,
    MANIFEST,
    READ_VERSIONS,
    TIME_DIRECTIONS,
    VERSION,
    remove_path,
    unlisted_entries,
)
from reflowpairs.store.soundness import ShardProblem, origin_problem, shard_problems
from reflowpairs.store.x0 import generation_record, stored_arrays, x0_mode, x0_spec, x0_stored


def _check_time_direction(value: str | None) -> None:
    if value is not None and value not in TIME_DIRECTIONS:
        raise ReflowPairsError(
            f"Unknown `time_direction` {value!r}.", f"Give one of: {', '.join(TIME_DIRECTIONS)} (or none)."
        )


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
      keeping X_0, same X_0/X_1 entries, time direction, teacher and dataset fingerprints and generation settings.
      ``generate --resume`` extends only such a store, and ``merge`` and the multi-process absorb combine only such
      stores.
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
            problems = fold_journal(Path(out), data)
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
        time_direction: str | None = None,
    ) -> StoreManifest:
        """A manifest with no shards yet, for a store at ``out`` (nothing is written): ``provenance`` holds
        teacher/dataset/generation/software (and partition); ``x0`` is how the store keeps X_0 (``X0_MODES``:
        ``explicit`` stores it, ``implicit`` records its generator instead). ``time_direction`` (``TIME_DIRECTIONS``),
        the teacher family's time convention, is recorded as the key ``time_direction`` right after ``x1`` when given;
        ``None`` writes no key, exactly the manifest of a store made before the key (read back as ``noise_at_1``)."""
        if backend not in BACKENDS:
            raise ReflowPairsError(
                f"Unknown `backend` {backend!r}.", f"Set `backend` to one of: {', '.join(BACKENDS)}."
            )
        _check_time_direction(time_direction)
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
            **({} if time_direction is None else {"time_direction": time_direction}),
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
        """Rewrite ``out/manifest.json`` atomically (``replace_atomically``: temp file, fsync, rename, fsync of
        ``out``) with everything recorded so far, in the format version this build writes: the journal's records
        are folded in. An incomplete store's manifest names a new, empty journal for the records to come; journals
        it does not name are then removed. The bytes: ``json.dump(data, indent=2)``, no final newline."""
        with self._lock:
            self.data["version"] = VERSION
            if self.data.get("complete"):
                self.data.pop("journal", None)
            else:
                self.data["journal"] = f"{JOURNAL_DIR}/{uuid.uuid4().hex[:16]}.jsonl"
            replace_atomically(self.out / MANIFEST, self._dump)
            self.rewrites += 1
            self._remove_old_journals()

    def _dump(self, path: Path) -> None:
        with open(path, "w") as handle:
            json.dump(self.data, handle, indent=2)

    def _remove_old_journals(self) -> None:
        """Remove the journal folder of a complete store (it is ``manifest.json`` and ``shards/``), else every journal
        but the one ``manifest.json`` names (folded into the manifest just written, or never named by it)."""
        journals = self.out / JOURNAL_DIR
        if not journals.is_dir():
            return
        if self.data.get("complete"):
            remove_path(journals)
            return
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
        self.journal_bytes += append_record(self.out, rel, record)

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
        return x0_stored(self.data)

    @property
    def x0_mode(self) -> str:
        """``"explicit"`` or ``"implicit"``: how the store keeps X_0 (``X0_MODES``)."""
        return x0_mode(self.data)

    @property
    def x0_generator(self) -> str:
        """The versioned name of the recipe X_0 is (re)generated with."""
        return self.data["x0"].get("generator", GENERATOR)

    @property
    def stored_arrays(self) -> tuple[str, ...]:
        """The arrays each shard holds (and has checksums for)."""
        return stored_arrays(self.data)

    @property
    def time_direction(self) -> str:
        """The teacher family's time direction (``TIME_DIRECTIONS``): the manifest's ``time_direction``, or
        ``"noise_at_1"`` for a store written without it."""
        return time_direction(self.data)

    @property
    def seed(self) -> int | None:
        """``generation.seed``, the seed X_0 is a function of."""
        return (self.data.get("generation") or {}).get("seed")

    @property
    def generation(self) -> dict[str, Any]:
        """A copy of the generation record with ``x0`` (``X0_MODES``) filled in from the manifest's ``x0`` entry when
        the record predates that setting (such a store keeps X_0: ``explicit``)."""
        return generation_record(self.data)

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

    # --- soundness and sameness (``soundness``, ``jobs``)

    def shard_problems(self, i: int, data: dict[str, np.ndarray]) -> list[ShardProblem]:
        """What is wrong with the stored arrays ``data`` of shard ``i`` (as ``read_shard`` returns them): each of
        ``stored_arrays`` must have its entry's row count, the manifest's shape and dtype, and the checksum recorded
        when it was written; [] when the shard is sound."""
        return shard_problems(self.shards[i], self.x0_shape, self.x1_shape, self.stored_arrays, data)

    def origin_problem(self, i: int, attrs: dict[str, Any]) -> str | None:
        """What is wrong with where shard ``i`` comes from, given the attributes it carries (``shard_attrs``), or None:
        it must carry the store id and name it was written with (its entry's ``store_id`` and ``written_as``, which a
        merged store keeps for each shard, else this store's id and the entry's path)."""
        return origin_problem(self.shards[i], self.data.get("store_id"), attrs)

    def job_differences(self, other: StoreManifest) -> list[JobDifference]:
        """How ``other``'s generation job differs from this one's; [] when they are the same job
        (``jobs.job_differences``)."""
        return job_differences(self.data, other.data)


def read_manifest(out: str | Path) -> dict[str, Any]:
    """The checked manifest of the store at ``out`` as a dict (``StoreManifest.read(out).data``)."""
    return StoreManifest.read(out).data
