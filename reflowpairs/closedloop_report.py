# RENOVATION SHIM: removed at merge
"""Moved to ``reflowpairs.eval.closed_loop_report``."""

from reflowpairs.eval.closed_loop_report import (  # noqa: F401
    TABLE_HEADERS,
    table_rows,
    title_text,
    verdict_rows,
    verdict_text,
)
