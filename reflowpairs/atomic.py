"""Crash-safe file helpers: the one place reflowpairs writes a file for keeps.

Everything reflowpairs writes for keeps goes in under a temporary name (``TMP_PREFIX`` + its name, beside it), is
fsynced, and is renamed into place, and then the directory holding it is fsynced so the rename survives a crash too.
A crash at any moment therefore leaves the old file or the new one, never half of one, plus at worst a ``.tmp-``
leftover that its owner recognises by ``TMP_PREFIX`` and removes.

Public names (other modules call them; keep them stable):

- ``TMP_PREFIX``: the name prefix of every half-written file or directory (``.tmp-``);
- ``replace_atomically(path, write)``: ``write(tmp)`` then fsync the file (or tree), rename, fsync its directory;
- ``write_json_atomically(path, data)``: ``data`` as indented JSON with a final newline, through the above;
- ``fsync_dir(path)`` / ``fsync_tree(path)``: fsync one directory (or file) / a file or a whole tree, deepest first;
- ``check_writable(out)`` / ``cannot_write(out, err)``: fail early on an unwritable ``out`` / the error for one;
- ``load_json_object(path)``: the one reader of the JSON objects written back (``NotAJSONObjectError`` when the
  bytes are not one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reflowpairs.errors import ReflowPairsError

TMP_PREFIX = ".tmp-"
"""The name prefix of a file or directory being written (``TMP_PREFIX + final name``, beside its final path)."""


def fsync_dir(path: Path) -> None:
    """fsync a directory (or a file: ``os.open`` + ``fsync`` works the same), so renames and new entries in it
    survive a crash. The descriptor is closed even when fsync fails."""
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
    probe = out / f"{TMP_PREFIX}write-probe"
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


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` for ``tmp = TMP_PREFIX + path.name`` beside ``path`` (a file, or a directory ``write``
    fills), fsync ``tmp`` (everything under it), rename it onto ``path``, and fsync ``path``'s directory: a crash
    leaves either the old ``path`` or the new one, never half of one. ``write`` must create ``tmp`` itself (remove
    a leftover first when that matters); a ``write`` that raises leaves ``tmp`` where it is."""
    path = Path(path)
    tmp = path.with_name(TMP_PREFIX + path.name)
    write(tmp)
    fsync_tree(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """``data`` as JSON indented by 2 with a final newline at ``path``, crash-safely (``replace_atomically``)."""
    replace_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
