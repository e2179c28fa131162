# RENOVATION SHIM: removed at merge
"""Moved to ``reflowpairs.eval.closed_loop_metrics`` (the names docs/eval.md cites)."""

from reflowpairs.eval.closed_loop_metrics import (  # noqa: F401
    episode_successes,
    fewest_matching_steps,
    mcnemar_p,
    paired_counts,
    wilson_interval,
)
