"""What ``reflowpairs validate`` reports: one ``CheckResult`` per check and the ``ValidationReport`` of a store.

Also the small text helpers every check shares (``Problems``, ``listed``, ``count``), so all checks word their
findings the same way."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PASS, WARN, FAIL, INCOMPLETE, SKIP = "pass", "warn", "fail", "incomplete", "skip"
SOUND, STATUS_INCOMPLETE, CORRUPT = "sound", "incomplete", "corrupt"
CHECKS = (
    "manifest",
    "shards",
    "leftovers",
    "checksums",
    "origin",
    "finite",
    "x0 noise",
    "frames",
    "obs_index",
    "dataset",
    "teacher",
    "spot check",
)
"""Every check, in the order they are reported (a ``features`` check follows them when the store has a feature
cache)."""

MAX_LISTED = 5  # problems listed per check before "and N more"


@dataclass
class CheckResult:
    """One check: ``result`` is pass, warn (reported, not an error), fail, incomplete or skip (not run)."""

    name: str
    result: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.result in (PASS, WARN, SKIP)


@dataclass
class ValidationReport:
    store: str
    status: str  # sound | incomplete | corrupt
    checks: list[CheckResult]
    frames_done: int | None = None
    frames_expected: int | None = None
    resume_command: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == SOUND

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for check, raw in zip(self.checks, out["checks"], strict=True):
            raw["ok"] = check.ok
        return out

    def summary(self) -> str:
        """One sentence: the status and why."""
        failed = [c.name for c in self.checks if c.result == FAIL]
        if self.status == CORRUPT:
            return (
                f"CORRUPT: {len(failed)} check(s) failed ({', '.join(failed)}); do not train on this store."
            )
        if self.status == STATUS_INCOMPLETE:
            done = (
                f"{self.frames_done} of {self.frames_expected} frames done"
                if self.frames_expected is not None
                else "generation did not finish"
            )
            how = (
                f" Finish it with: {self.resume_command}"
                if self.resume_command
                else " Finish it with `reflowpairs generate ... --resume`."
            )
            return f"INCOMPLETE: {done}; what is there is sound.{how}"
        return f"SOUND: all {sum(c.result == PASS for c in self.checks)} checks run passed."


def overall_status(checks: list[CheckResult]) -> str:
    """``corrupt`` when a check failed, else ``incomplete`` when one found generation unfinished, else ``sound``."""
    if any(c.result == FAIL for c in checks):
        return CORRUPT
    if any(c.result == INCOMPLETE for c in checks):
        return STATUS_INCOMPLETE
    return SOUND


@dataclass
class Problems:
    """Problems of one check, listed up to MAX_LISTED."""

    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.items.append(text)

    def __bool__(self) -> bool:
        return bool(self.items)

    def text(self) -> str:
        shown = "; ".join(self.items[:MAX_LISTED])
        more = len(self.items) - MAX_LISTED
        return shown + (f"; and {more} more" if more > 0 else "")


def result_of(name: str, problems: Problems, ok_detail: str) -> CheckResult:
    """``name`` fails with its ``problems`` listed, or passes with ``ok_detail``."""
    return CheckResult(name, FAIL, problems.text()) if problems else CheckResult(name, PASS, ok_detail)


def listed(values, limit: int = 8) -> str:
    """``"1, 2, 3"``, or the first ``limit`` values and ``", ... (N in all)"``."""
    values = list(values)
    text = ", ".join(map(str, values[:limit]))
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def count(n: int, noun: str) -> str:
    """``"1 shard"``, ``"3 shards"``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
