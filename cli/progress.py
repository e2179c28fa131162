"""Progress for long commands: a rich bar on a terminal, plain-text lines in a log file (a SLURM job's output).

``REFLOWPAIRS_PROGRESS`` chooses: ``auto`` (the default: a bar when stderr is a terminal, lines otherwise), ``bar``
(also ``1``: the bar even when stderr is not a terminal), ``lines`` (lines even on a terminal) or ``off`` (also
``0``: neither). A line names the command, the units done out of the total, the rate and the time left::

    train: step 200/10,000 (2%) loss 0.0123, 3.1 steps/s, ETA 0:52:40
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PROGRESS_ENV = "REFLOWPAIRS_PROGRESS"
MODES = ("auto", "bar", "lines", "off")
_ALIASES = {"1": "bar", "0": "off", "": "auto"}


def progress_mode(console: Console, environ: dict[str, str] | None = None) -> str:
    """``"bar"``, ``"lines"`` or ``"off"``: what ``REFLOWPAIRS_PROGRESS`` asks for, ``auto`` resolved against
    whether ``console`` (stderr) is a terminal. An unknown value counts as ``auto``."""
    environ = os.environ if environ is None else environ
    value = environ.get(PROGRESS_ENV, "auto").strip().lower()
    mode = _ALIASES.get(value, value)
    if mode not in MODES or mode == "auto":
        return "bar" if console.is_terminal else "lines"
    return mode


def line_interval(total: int | None, every: int | None, cap: int | None) -> int:
    """Units between two progress lines: ``every`` when given, else a tenth of ``total`` (at most ``cap``)."""
    if every is not None:
        return max(1, int(every))
    tenth = max(1, math.ceil((total or 0) / 10))
    return tenth if cap is None else min(cap, tenth)


def duration(seconds: float) -> str:
    """``3160.2`` -> ``"0:52:40"``."""
    return str(timedelta(seconds=int(round(seconds))))


def rate_text(rate: float, unit: str | None) -> str:
    """``3.1 steps/s``, or ``4.2 s/step`` below one unit a second; ``12.0/s`` without a unit."""
    if unit is None:
        return f"{rate:,.1f}/s"
    if 0 < rate < 1:
        return f"{1 / rate:,.1f} s/{unit}"
    return f"{rate:,.1f} {unit}s/s"


class LineProgress(Progress):
    """A rich ``Progress`` that draws no bar and instead prints a plain line to its console every ``every`` units of a
    task (and when the task completes). Tasks may carry the fields ``unit`` (singular, e.g. ``"step"``: the line reads
    ``step 200/10,000`` and ``3.1 steps/s``) and ``info`` (e.g. ``"loss 0.0123"``, printed after the percentage).
    ``every=None`` prints a line per tenth of a task's total (at most every ``cap`` units); a task's own ``every`` field
    overrides ``every``."""

    def __init__(
        self, *columns: Any, prefix: str, every: int | None = None, cap: int | None = None, **kwargs: Any
    ):
        kwargs["disable"] = True  # no live display: the lines are printed by ``_log``
        super().__init__(*columns, **kwargs)
        self.prefix = prefix
        self.every = every
        self.cap = cap
        self._logged: dict[TaskID, int] = {}  # the interval number last printed
        self._base: dict[TaskID, float] = {}  # units done when the task's clock started
        self._finished: set[TaskID] = set()  # tasks whose last line is printed

    def add_task(
        self,
        description: str,
        start: bool = True,
        total: float | None = 100.0,
        completed: int = 0,
        visible: bool = True,
        **fields: Any,
    ) -> TaskID:
        task = super().add_task(
            description, start=start, total=total, completed=completed, visible=visible, **fields
        )
        self._restart(task)
        return task

    def reset(self, task_id: TaskID, **kwargs: Any) -> None:
        super().reset(task_id, **kwargs)
        self._restart(task_id)

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _interval(self, task_id: TaskID) -> int:
        task = self._tasks[task_id]
        every = task.fields.get("every", self.every)
        return line_interval(task.total, every, self.cap)

    def _restart(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        self._base[task_id] = task.completed
        self._logged[task_id] = int(task.completed // self._interval(task_id))
        self._finished.discard(task_id)

    def _log(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if task.total is None:
            return
        slot = int(task.completed // self._interval(task_id))
        if task.completed >= task.total:  # the last line, once
            if task_id in self._finished:
                return
            self._finished.add(task_id)
        elif slot <= self._logged[task_id]:
            return
        self._logged[task_id] = slot
        self.console.print(self.line(task_id), markup=False, highlight=False, soft_wrap=True)

    def line(self, task_id: TaskID) -> str:
        """``train: step 200/10,000 (2%) loss 0.0123, 3.1 steps/s, ETA 0:52:40``."""
        task = self._tasks[task_id]
        unit = task.fields.get("unit")
        total = task.total or 0
        done = task.completed
        share = f" ({100 * done / total:.0f}%)" if total else ""
        info = f" {task.fields['info']}" if task.fields.get("info") else ""
        elapsed = task.elapsed or 0.0
        rate = (done - self._base.get(task_id, 0)) / elapsed if elapsed > 0 else 0.0
        eta = duration((total - done) / rate) if rate > 0 else "?"
        what = unit if unit is not None else task.description
        tail = (
            f", {rate_text(rate, unit)}, ETA {eta}"
            if done < total
            else f", {rate_text(rate, unit)}, done in {duration(elapsed)}"
        )
        return f"{self.prefix}: {what} {int(done):,}/{int(total):,}{share}{info}{tail}"


def make_progress(
    console: Console, prefix: str, main: bool = True, every: int | None = None, cap: int | None = None
) -> Progress:
    """The progress display of a command: a rich bar, a ``LineProgress`` or nothing (see ``progress_mode``); a process
    other than the main one of a multi-process launch (``main=False``) shows nothing."""
    mode = progress_mode(console) if main else "off"
    if mode == "lines":
        return LineProgress(
            TextColumn("{task.description}"), console=console, prefix=prefix, every=every, cap=cap
        )
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=mode == "off",
    )
