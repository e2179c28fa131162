"""Crash-safe file helpers shared by the pair store, the checkpoints and the output checks.

Everything reflowpairs writes for keeps goes in under a temporary name, is fsynced, and is renamed into place;
these are the pieces that does it.
"""

from __future__ import annotations

import os
from pathlib import Path

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
        raise ReflowPairsError(
            f"Cannot write to --out {out} ({err.strerror or err}).",
            "Choose a writable directory with free space; nothing was written.",
        ) from err
