"""Ctrl-C during training: the step in flight finishes, then the loop saves and stops."""

from __future__ import annotations

import signal
import threading


class StopOnInterrupt:
    """Within the block, SIGINT (Ctrl-C) sets ``requested``, which the loop checks between steps (a step is never cut
    in half); a second one sets ``aborted`` and raises ``KeyboardInterrupt`` at once. The previous handler is restored
    on leaving. Outside the main thread (where no handler can be set) it does nothing."""

    def __init__(self):
        self.requested = False
        self.aborted = False  # a second Ctrl-C: stop at once, mid-step, without saving
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            self.aborted = True
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
