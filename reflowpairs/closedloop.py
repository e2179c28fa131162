# RENOVATION SHIM: removed at merge
"""Moved to ``reflowpairs.eval`` (``config``, ``closed_loop``, ``closed_loop_report``)."""

from reflowpairs.eval.closed_loop import evaluate_closed_loop  # noqa: F401
from reflowpairs.eval.closed_loop_report import write_closed_loop_report  # noqa: F401
from reflowpairs.eval.config import ClosedLoopConfig  # noqa: F401
