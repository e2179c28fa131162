"""The shard journal of an incomplete store (format version 2): ``OUT/journal/<token>.jsonl``.

While a store is incomplete, ``manifest.json`` names one journal (its ``journal`` key); each shard put in place and
each batch of skipped frames is one fsynced JSON line appended to it (``append_record``), so recording a shard costs
the same whatever the store's size. Readers fold the journal into the manifest (``fold_journal``); the writer folds
it in whenever it rewrites ``manifest.json``. Bytes after the last newline are a line torn by a crash and ignored.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from reflowpairs.atomic import fsync_dir
from reflowpairs.store.contract import is_count, shard_entry_problem
from reflowpairs.store.layout import JOURNAL_DIR


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "is not a JSON object"
    if "shard" in record:
        return shard_entry_problem(record["shard"])
    skipped = record.get("skipped_frames")
    if isinstance(skipped, list) and all(is_count(i) for i in skipped):
        return None
    return "is neither a shard record nor a skipped-frames record"


def _add_record(data: dict[str, Any], record: dict[str, Any], listed: set[str]) -> None:
    """Add one journal record to the manifest dict ``data``: a shard not yet listed (with its pairs and frames), or
    skipped frames not yet recorded."""
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


def fold_journal(out: Path, data: dict[str, Any]) -> list[str]:
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
            problem = _record_problem(record)
        except (ValueError, RecursionError):
            problem = "is not valid JSON"
        if problem is not None:
            if j == len(lines) - 1:  # the last line, damaged by a crash while it was written
                break
            return [f"line {j + 1} of its journal {rel} {problem}"]
        _add_record(data, record, listed)
    return []


def append_record(out: Path, rel: str, record: dict[str, Any]) -> int:
    """Append ``record`` as one compact JSON line to the journal ``out/rel`` and fsync it (and, when this creates the
    journal, its folder and ``out``, so its entry survives a crash). Returns the bytes appended."""
    path = out / rel
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
        fsync_dir(out)
    return len(line)
