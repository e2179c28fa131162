"""The glue between sampling and the store writer: ``PairStoreWriter`` on a background thread, so the device never
waits on shard I/O, and the one error a failed write becomes."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from reflowpairs.errors import ReflowPairsError
from reflowpairs.store.pairs import Pairs
from reflowpairs.store.writer import PairStoreWriter


class BackgroundWriter:
    """Runs ``PairStoreWriter.add`` (and ``skip``) on a thread so the device never waits on shard I/O; the thread is
    the only one that touches the manifest while sampling runs."""

    def __init__(self, writer: PairStoreWriter, depth: int = 4):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="reflowpairs-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    if isinstance(item, Pairs):
                        self.writer.add(item)
                    else:  # obs_index of frames skipped for non-finite X_1
                        self.writer.skip(item)
                except BaseException as err:  # noqa: BLE001 - re-raised on the main thread
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            raise write_failed(self.writer.out, self._error) from self._error

    def put(self, pairs: Pairs) -> None:
        self._raise()
        self._queue.put(pairs)

    def skip(self, obs_index: list[int]) -> None:
        self._raise()
        self._queue.put(list(obs_index))

    def close(self, complete: bool) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()
        try:
            self.writer.close(complete)
        except OSError as err:
            raise write_failed(self.writer.out, err) from err


def write_failed(out: Path, err: BaseException) -> ReflowPairsError:
    """The error of a failed shard or manifest write: what failed, and that ``resume`` continues from what is kept."""
    return ReflowPairsError(
        f"Writing the pair store {out} failed ({type(err).__name__}: {err}). Every shard the manifest lists is complete.",
        "Free disk space or fix permissions, then rerun the same command with `resume`.",
    )
