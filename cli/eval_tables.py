"""The tables eval and pipeline print (teacher vs student, several students side by side, closed loop), and the one
progress bar their stages share."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from reflowpairs.cli.ui import plural
from reflowpairs.eval.closed_loop_report import (
    TABLE_HEADERS,
    closed_loop_note,
    success_cell,
    title_text,
    verdict_rows,
    verdict_text,
)
from reflowpairs.eval.closed_loop_report import table_rows as closed_loop_rows
from reflowpairs.eval.report import (
    COLUMNS,
    CONSOLE_HEADERS,
    PAIRS_CONSOLE_HEADERS,
    format_value,
    pairs_rows,
    table_rows,
)


def report_table(report: dict[str, Any]) -> Table:
    """The report's rows as a rich table (the same cells as report.md, from ``eval.report.table_rows``), with
    two-line headers and no vertical rules, so that it fits in 80 columns."""
    settings = report["settings"]
    table = Table(
        title=f"teacher vs student: {plural(report['frames']['count'], 'frame')} x "
        f"{plural(report['frames']['samples_per_frame'], 'noise')}; reference = teacher, "
        f"{plural(settings['reference_num_steps'], 'step')}",
        caption=f"latency: median of {settings['latency_repeats']} calls; norm: teacher's normalised actions",
        box=box.HORIZONTALS,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        padding=(0, 1),
    )
    rows = table_rows(report)
    for i, (key, _) in enumerate(COLUMNS):
        table.add_column(CONSOLE_HEADERS[key], justify="left" if i == 0 else "right", no_wrap=True)
    for i, cells in enumerate(rows):
        table.add_row(
            *cells,
            end_section=i + 1 < len(rows) and report["rows"][i + 1]["model"] != report["rows"][i]["model"],
        )
    return table


def pairs_table(report: dict[str, Any]) -> Table:
    """The student's error on its training pairs next to its held-out error (``--pairs``)."""
    table = Table(
        title=f"student: training pairs ({plural(report['pairs']['num_frames'], 'frame')}) vs held-out frames",
        box=box.HORIZONTALS,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
    )
    for header in PAIRS_CONSOLE_HEADERS:
        table.add_column(header, justify="right")
    for cells in pairs_rows(report):
        table.add_row(*cells)
    return table


def comparison_tables(comparison: dict[str, Any]) -> list[Table]:
    """Several students side by side (``reflowpairs.eval.compare``): every model's rows (with closed-loop success where
    the pipeline ran it), then the verdict."""
    ref = comparison["settings"]["reference_num_steps"]
    frames = comparison["frames"]
    table = Table(
        title=f"students compared: {plural(frames['count'], 'frame')} x "
        f"{plural(frames['samples_per_frame'], 'noise')}; reference = teacher, {plural(ref, 'step')}",
        box=box.HORIZONTALS,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        padding=(0, 1),
    )
    for i, (key, _) in enumerate(COLUMNS):
        table.add_column(CONSOLE_HEADERS[key], justify="left" if i == 0 else "right", no_wrap=True)
    closed = bool(comparison.get("closed_loop"))  # pipeline --env.type: success beside the error
    if closed:
        table.add_column("success\n[95% CI]", justify="right", no_wrap=True)
        table.caption = closed_loop_note(comparison)
    rows = comparison["rows"]
    for i, row in enumerate(rows):
        last = i + 1 == len(rows) or rows[i + 1]["model"] != row["model"]
        values = [format_value(row.get(key)) for key, _ in COLUMNS] + ([success_cell(row)] if closed else [])
        table.add_row(*values, end_section=last)
    verdict = Table(title="fewest steps to match the teacher", box=box.HORIZONTALS, show_edge=False)
    verdict.add_column("model", no_wrap=True)
    verdict.add_column(f"as accurate on data\nas the teacher at {ref}", justify="right")
    verdict.add_column("as close to the reference\nas the teacher at 4", justify="right")
    for model, goals in comparison["verdict"].items():
        verdict.add_row(model, format_value(goals["vs_teacher_best"]), format_value(goals["vs_teacher_4"]))
    return [table, verdict]


class StageBar:
    """One progress bar for all of eval's stages: each new stage renames it and restarts its count, so one
    bar is on screen at a time (and, the bar being transient, none once the table is printed)."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task: int | None = None
        self.phase: str | None = None
        self.stage = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.stage += 1
            self.phase = phase
            description = f"{self.stage}. {phase}"
            if self.task is None:
                self.task = self.bar.add_task(description, total=total, rate="")
            else:
                self.bar.reset(self.task, total=total, completed=0, description=description)
        self.bar.update(self.task, completed=done)


def closed_loop_tables(report: dict[str, Any]) -> list[Table | Text]:
    """The closed-loop report as rich tables: every (model, steps) cell, then the verdict and what it means."""
    table = Table(
        title=title_text(report),
        caption="success: 95% Wilson interval; chunk ms: median per action-chunk call; "
        "vs teacher: episodes only this cell / only the full-step teacher succeeds in",
        box=box.HORIZONTALS,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        padding=(0, 1),
    )
    for i, header in enumerate(TABLE_HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=True)
    rows = closed_loop_rows(report)
    for i, cells in enumerate(rows):
        last = i + 1 == len(rows) or report["cells"][i + 1]["model"] != report["cells"][i]["model"]
        table.add_row(*cells, end_section=last)
    verdict = Table(title="fewest steps to match the teacher", box=box.HORIZONTALS, show_edge=False)
    verdict.add_column("model", no_wrap=True)
    verdict.add_column("fewest steps", justify="right")
    for cells in verdict_rows(report):
        verdict.add_row(*cells)
    return [table, verdict, Text(verdict_text(report))]
