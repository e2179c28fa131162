# RENOVATION SHIM: removed at merge
"""Moved to ``reflowpairs.eval`` (``config``, ``open_loop``, ``summary``)."""

from reflowpairs.eval.config import EvalConfig, parse_num_steps  # noqa: F401
from reflowpairs.eval.open_loop import evaluate  # noqa: F401
from reflowpairs.eval.summary import next_step  # noqa: F401
