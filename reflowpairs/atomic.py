"""Crash-safe file helpers shared by the pair store, the checkpoints and the output checks.

Everything reflowpairs writes for keeps goes in under a temporary name, is fsynced, and is renamed into place;
these are the pieces that does it. ``load_json_object`` is the one reader of the JSON files it wrote back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from reflowpairs.errors import ReflowPairsError


def fsync_dir(path: Path) -> None:
    """fsync a directory, so renames and new entries in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync ``path`` (a file, or a directory with everything under it, deepest first)."""
    if path.is_file():
        fsync_dir(path)  # os.open + fsync works the same on a file
        return
    for entry in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [path]:
        fsync_dir(entry)


def check_writable(out: Path) -> None:
    """Fail early, before any work, when ``out`` cannot be created or written (read-only, no space)."""
    probe = out / ".tmp-write-probe"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"reflowpairs")
        probe.unlink()
    except OSError as err:
        raise cannot_write(out, err) from err


def cannot_write(out: Path, err: OSError) -> ReflowPairsError:
    """The error for an ``out`` that cannot be created or written (the ``out`` setting, by its name)."""
    return ReflowPairsError(
        f"Cannot write to `out` {out} ({err.strerror or err}).",
        "Choose a writable directory with free space; nothing was written.",
    )


class NotAJSONObjectError(ValueError):
    """A file whose bytes are not a JSON object; ``problem`` says why, worded to follow the path
    (``"is not UTF-8 text (byte 0 is 0xff)"``, ``"is not valid JSON (...)"``, ``"holds a JSON list, not an object"``)."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def load_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``. Read errors stay ``OSError``; bytes that are not UTF-8, not JSON (nesting too deep
    and integers too long included) or not an object raise ``NotAJSONObjectError``: callers word both for their file."""
    raw = Path(path).read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise NotAJSONObjectError(f"is not UTF-8 text (byte {err.start} is 0x{raw[err.start]:02x})") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError, an integer too long, nesting too deep
        raise NotAJSONObjectError(f"is not valid JSON ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise NotAJSONObjectError(f"holds a JSON {type(data).__name__}, not an object")
    return data


def replace_atomically(path: Path, write: Any) -> None:
    """Call ``write(tmp)`` for a temporary path beside ``path``, fsync it, and rename it onto ``path``: a crash
    leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    fsync_tree(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """``data`` as indented JSON at ``path``, crash-safely (``replace_atomically``)."""
    replace_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
