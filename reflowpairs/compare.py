# RENOVATION SHIM: removed at merge
"""Moved to ``reflowpairs.eval.compare``."""

from reflowpairs.eval.compare import (  # noqa: F401
    add_closed_loop,
    closed_loop_note,
    compare_reports,
    evaluate_students,
    read_report,
    success_cell,
    write_comparison,
)
