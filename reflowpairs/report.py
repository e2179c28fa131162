# RENOVATION SHIM: removed at merge
"""Moved to ``reflowpairs.eval.report``."""

from reflowpairs.eval.report import (  # noqa: F401
    COLUMNS,
    CONSOLE_HEADERS,
    PAIRS_CONSOLE_HEADERS,
    format_value,
    frames_text,
    headline_text,
    next_text,
    pairs_rows,
    report_notes,
    table_rows,
    write_report,
)
