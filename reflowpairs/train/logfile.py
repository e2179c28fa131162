"""``train_log.jsonl``: one record per ``log_every`` steps (``step``, ``loss``, ``lr``, ``grad_norm``, ``seconds``),
trimmed on resume to the resumed step, and the refusal of a failed write to ``out``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from reflowpairs.atomic import replace_atomically
from reflowpairs.errors import ReflowPairsError

LOG_FILE = "train_log.jsonl"


def trim_log(path: Path, last_step: int) -> None:
    """Keep only log lines up to ``last_step`` (lines after the resumed checkpoint are redone); atomic. A last line
    that is not a record is a torn write of a killed run and is dropped; such a line before it is refused."""
    if not path.exists():
        return
    try:
        lines = path.read_bytes().splitlines()
    except OSError as err:
        raise ReflowPairsError(
            f"Cannot read {path} ({err.strerror or err}).", "Check its permissions."
        ) from err
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            step = record["step"] if isinstance(record, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError("no integer step")
        except (
            ValueError,
            KeyError,
            RecursionError,
        ) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if number == len(lines):
                break  # a torn last line of a killed run
            raise ReflowPairsError(
                f"{path} line {number} is not a train_log record ({type(err).__name__}: {err}).",
                f"Move {path.name} aside (or delete that line); the checkpoints are not affected.",
            ) from err
        if step <= last_step:
            kept.append(line.decode("utf-8"))
    replace_atomically(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))


def write_failed(out: Path, what: str, err: OSError, last: Path | None) -> ReflowPairsError:
    """The refusal of a failed write of ``what`` to ``out``, naming ``last`` (the last complete checkpoint, if any)
    and how to go on."""
    kept = (
        f"checkpoints/last still points at the last complete checkpoint ({last.name})"
        if last is not None
        else "no checkpoint was complete yet"
    )
    return ReflowPairsError(
        f"Writing {what} to `out` {out} failed ({err.strerror or err}); {kept}.",
        "Free disk space or fix permissions, then rerun the same command with `resume` set"
        + (" (or without it, into an empty `out`)." if last is None else "."),
    )


def write_log_record(log: IO[str], record: dict[str, Any], out: Path, last: Path | None) -> None:
    """One ``train_log.jsonl`` record, flushed; a failed write is refused (``write_failed``) naming ``last``, the last
    complete checkpoint."""
    try:
        log.write(json.dumps(record) + "\n")
        log.flush()
    except OSError as err:
        raise write_failed(out, LOG_FILE, err, last) from err
