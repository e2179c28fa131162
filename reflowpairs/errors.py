"""The one exception type users see: a bad input, named, with what to do about it."""

from __future__ import annotations


class ReflowPairsError(Exception):
    """A user-facing error: ``what`` went wrong with which input, and ``hint`` on what to do.

    The CLI prints it as one paragraph with no traceback and exits with status 1.
    """

    def __init__(self, what: str, hint: str = ""):
        self.what = what
        self.hint = hint
        super().__init__(f"{what} {hint}".strip())
