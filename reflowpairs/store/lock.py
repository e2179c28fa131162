"""One writer per pair store: an exclusive ``flock`` on ``OUT/.lock``, held for a whole ``generate`` or ``merge``.

The kernel releases an ``flock`` when the process holding it exits, however it exits (crash, ``kill -9``, power
loss of a remote client aside), so a lock can never be left held by a dead process: a ``.lock`` file whose
``flock`` can be taken is stale, and is simply taken over. While held, the file records who holds it (pid, host,
what it is doing, since when) so a refused writer can name it.

The holder removes the file when it is done. A waiting process may have opened the old file just before that;
after taking the ``flock`` it therefore checks that the file it locked is still the one at ``OUT/.lock`` and
starts over when it is not, so two processes never both believe they hold the lock.

Only the main process of a multi-process ``generate`` takes the lock; the other ranks write under ``OUT/parts/``
for it. DataLoader workers forked while it is held share the lock (an ``flock`` belongs to the open file, not the
process): ``release`` drops it for all of them, and after a crash it is free once the last of them has exited.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflowpairs.atomic import cannot_write
from reflowpairs.errors import ReflowPairsError
from reflowpairs.store.layout import LOCK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a store's lock, as recorded in ``OUT/.lock``."""

    pid: int | None = None
    host: str | None = None
    since: str | None = None  # ISO 8601 local time with offset
    command: str | None = None

    @staticmethod
    def parse(text: str) -> LockHolder:
        """The record in a lock file; fields that are missing or unreadable are None (a holder may be mid-write)."""
        try:
            data = json.loads(text)
        except ValueError:
            return LockHolder()
        if not isinstance(data, dict):
            return LockHolder()
        pid = data.get("pid")
        return LockHolder(
            pid if isinstance(pid, int) else None,
            *(data.get(k) if isinstance(data.get(k), str) else None for k in ("host", "since", "command")),
        )

    def describe(self) -> str:
        """``"`reflowpairs generate` (pid 123 on host a, since 2024-...)"``, with what is known."""
        who = f"`reflowpairs {self.command}`" if self.command else "another process"
        details = [f"pid {self.pid}" if self.pid is not None else "pid unknown"]
        if self.host:
            details[0] += f" on host {self.host}"
        if self.since:
            details.append(f"since {self.since}")
        return f"{who} ({', '.join(details)})"


def _record(command: str) -> dict[str, Any]:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": now, "command": command}


def _read_fd(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", errors="replace")


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


def busy_error(out: Path, holder: LockHolder) -> ReflowPairsError:
    """The refusal a second writer gets: who is writing ``out``, and what to do."""
    stop = f"stop it (kill {holder.pid})" if holder.pid is not None else "stop it"
    return ReflowPairsError(
        f"{out} is being written by {holder.describe()}. A pair store takes one writer at a time, so this command "
        "stopped before changing anything.",
        f"Wait for that run to finish, or {stop} and rerun it with `resume` to finish the store; or choose another "
        "`out`. (A lock whose process has exited is taken over automatically: there is nothing to delete.)",
    )


@dataclass
class StoreLock:
    """An exclusive lock on the store directory ``out``; use as a context manager, or call ``release``.

    ``created`` lists the directories ``acquire`` had to create (deepest first): ``release`` removes those that are
    still empty, so a run refused or failing before it writes anything leaves no trace."""

    out: Path
    fd: int | None
    created: list[Path] = field(default_factory=list)
    previous: LockHolder | None = None  # the holder of a stale lock that was taken over

    @classmethod
    def acquire(cls, out: str | Path, command: str) -> StoreLock:
        """Take the lock on ``out`` (creating ``out`` if needed) for ``command`` (e.g. ``"generate"``).

        Raises ``ReflowPairsError`` naming the holder when another process holds it, having changed nothing."""
        out = Path(out)
        created: list[Path] = []
        path = out / LOCK
        while True:
            try:
                missing = _missing_dirs(out)
                out.mkdir(parents=True, exist_ok=True)
                created += [d for d in missing if d not in created]
                existed = path.exists()
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                _remove_empty(created)
                raise cannot_write(out, err) from err
            try:
                _flock_or_holder(fd)
            except BlockingIOError:
                holder = LockHolder.parse(_read_fd(fd))
                os.close(fd)
                raise busy_error(out, holder) from None
            except OSError as err:  # a filesystem without flock
                os.close(fd)
                if not existed:
                    path.unlink(missing_ok=True)
                _remove_empty(created)
                raise ReflowPairsError(
                    f"Cannot lock {path} ({err.strerror or err}): the filesystem of `out` does not support flock.",
                    "Write the store to a local disk or a filesystem with locking, and move it afterwards.",
                ) from err
            if _same_file(fd, path):
                break
            os.close(fd)  # the previous holder removed the file between our open and our flock: start over
        lock = cls(out, fd, created)
        text = _read_fd(fd)
        if text.strip():
            lock.previous = LockHolder.parse(text)
            log.warning(
                "Took over the lock of %s left by %s, which has exited.", out, lock.previous.describe()
            )
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_record(command)).encode(), 0)
        except OSError as err:
            lock.release()
            raise cannot_write(out, err) from err
        return lock

    @staticmethod
    def holder(out: str | Path) -> LockHolder | None:
        """Who is writing ``out`` now, or None when nobody is; creates and changes nothing."""
        try:
            fd = os.open(Path(out) / LOCK, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return LockHolder.parse(_read_fd(fd))
        except OSError:
            return None
        finally:
            os.close(fd)  # closing drops a shared lock we took
        return None

    def release(self) -> None:
        """Remove the lock file, then drop the lock; remove the directories ``acquire`` created if still empty."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.out / LOCK):
                (self.out / LOCK).unlink()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        _remove_empty(self.created)

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flock_or_holder(fd: int, tries: int = 5, wait_s: float = 0.05) -> None:
    """Take an exclusive flock on ``fd`` or raise ``BlockingIOError``. A few tries, so that a ``StoreLock.holder``
    probe (a shared lock held for microseconds) is never mistaken for a writer."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            time.sleep(wait_s)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _remove_empty(dirs: list[Path]) -> None:
    """rmdir each of ``dirs`` (deepest first) that is empty; stop at the first that is not."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return
