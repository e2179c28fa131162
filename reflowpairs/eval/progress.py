"""The progress callback both evaluations report to (the CLI draws it; ``pipeline`` prefixes the stage)."""

from __future__ import annotations

from collections.abc import Callable

PhaseProgress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: ``done`` of ``total`` units of work in the named phase. Open loop
(``open_loop.evaluate``): ``"held-out frames"`` and ``"training pairs"`` count frames, ``"latency"`` timed calls.
Closed loop (``closed_loop.evaluate_closed_loop``): ``"rollouts"`` counts episodes over every cell still to run."""
