# RENOVATION SHIM: removed at merge
"""Moved to ``reflowpairs.eval.closed_loop``."""

from reflowpairs.eval.closed_loop import (  # noqa: F401
    ClosedLoopConfig,
    evaluate_closed_loop,
    write_closed_loop_report,
)
