"""The progress callback of the phased library runs (validate, open- and closed-loop eval, pipeline): the CLI draws
it, ``pipeline`` prefixes each stage's phases with the stage's name."""

from __future__ import annotations

from collections.abc import Callable

PhaseProgress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: ``done`` of ``total`` units of work in the named phase. validate: ``"shards"``,
``"frames"``, ``"spot check"``...; open loop (``eval.open_loop.evaluate``): ``"held-out frames"`` and ``"training
pairs"`` count frames, ``"latency"`` timed calls; closed loop (``eval.closed_loop.evaluate_closed_loop``):
``"rollouts"`` counts episodes over every cell still to run; pipeline: its stages' phases, prefixed."""
