# RENOVATION SHIM: removed at merge
"""Moved to ``reflowpairs.eval`` (``config``, ``open_loop``, ``summary``)."""

from reflowpairs.eval.open_loop import EvalConfig, evaluate, next_step, parse_num_steps  # noqa: F401
