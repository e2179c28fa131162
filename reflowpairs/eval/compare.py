"""Several students side by side: one comparison of ``eval`` reports made against the same teacher.

``evaluate`` scores one student against its teacher. To compare students (reflow rounds, a distilled one, other
recipes) each is evaluated on the same frames, with the same noises and the same teacher reference, and their rows
are put in one table (``compare_reports``): the teacher once, then each student under its label. Reports that
differ in any of those (``COMPARABLE``) are refused, since their errors would not measure the same thing.

The verdict per model answers "which student ships": the fewest steps at which it is

- ``vs_teacher_best``: as accurate on the recorded actions (MSE to data) as the teacher at its reference step
  count (its error to its own reference is 0 by definition, so accuracy is judged on the data there), and
- ``vs_teacher_4``: as close to the teacher's reference (MSE to reference) as the teacher at 4 steps;

None where no evaluated step count gets there.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reflowpairs.atomic import replace_atomically, write_json_atomically
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.closed_loop_report import closed_loop_note, success_cell
from reflowpairs.eval.config import EvalConfig
from reflowpairs.eval.open_loop import evaluate
from reflowpairs.eval.report import COLUMNS, format_value, markdown_table, steps_vs_error_axes, write_report
from reflowpairs.progress import PhaseProgress

COMPARISON_FORMAT = "reflowpairs.compare"
COMPARISON_VERSION = 1
COMPARABLE = {  # what must be equal for two reports' errors to be comparable, and where the report keeps it
    "teacher fingerprint": ("teacher", "fingerprint"),
    "dataset": ("dataset", "repo_id"),
    "frames (obs_index)": ("frames", "obs_index"),
    "noise seed": ("settings", "seed"),
    "noises per frame": ("settings", "samples_per_frame"),
    "reference step count": ("settings", "reference_num_steps"),
    "step counts": ("settings", "num_steps"),
}


def _get(report: dict[str, Any], path: tuple[str, str]) -> Any:
    return report.get(path[0], {}).get(path[1])


def check_comparable(reports: dict[str, dict[str, Any]]) -> None:
    """Refuse reports whose errors do not measure the same thing (``COMPARABLE``), naming the first difference."""
    labels = list(reports)
    first = reports[labels[0]]
    for label in labels[1:]:
        for what, path in COMPARABLE.items():
            if _get(reports[label], path) != _get(first, path):
                raise ReflowPairsError(
                    f"The reports of {labels[0]} and {label} differ in {what} "
                    f"({_get(first, path)!r} vs {_get(reports[label], path)!r}): their errors are not comparable.",
                    "Evaluate every student with the same teacher, dataset, episodes, seed and step counts.",
                )


def _fewest_steps(errors: dict[int, float | None], bar: float | None) -> int | None:
    if bar is None:
        return None
    return min((n for n, e in errors.items() if e is not None and e <= bar), default=None)


def verdict(rows: list[dict[str, Any]], reference_steps: int) -> dict[str, dict[str, int | None]]:
    """Per model, the fewest steps matching the teacher (module docstring), from comparison ``rows``."""
    by_model: dict[str, dict[str, dict[int, float | None]]] = {}
    for row in rows:
        errors = by_model.setdefault(row["model"], {"ref": {}, "data": {}})
        errors["ref"][row["num_steps"]] = row["mse_ref_norm"]
        errors["data"][row["num_steps"]] = row["mse_data_norm"]
    teacher = by_model.get("teacher", {"ref": {}, "data": {}})
    best = reference_steps if reference_steps in teacher["data"] else max(teacher["data"], default=None)
    bar_best = teacher["data"].get(best) if best is not None else None
    return {
        model: {
            "vs_teacher_best": _fewest_steps(errors["data"], bar_best),
            "vs_teacher_4": _fewest_steps(errors["ref"], teacher["ref"].get(4)),
        }
        for model, errors in by_model.items()
    }


def compare_reports(
    reports: dict[str, dict[str, Any]], sources: dict[str, str] | None = None
) -> dict[str, Any]:
    """One comparison of ``reports`` (label -> an ``open_loop.evaluate`` report): the teacher's rows once, each student's rows
    labelled, and the verdict. ``sources``: label -> where each report lies (recorded)."""
    if not reports:
        raise ReflowPairsError("Nothing to compare: no reports were given.")
    check_comparable(reports)
    first = next(iter(reports.values()))
    rows = [dict(r) for r in first["rows"] if r["model"] == "teacher"]
    for label, report in reports.items():
        rows += [dict(r, model=label) for r in report["rows"] if r["model"] == "student"]
    reference_steps = first["settings"]["reference_num_steps"]
    return {
        "format": COMPARISON_FORMAT,
        "version": COMPARISON_VERSION,
        "models": ["teacher", *reports],
        "students": {label: report["student"]["source"] for label, report in reports.items()},
        "reports": dict(sources or {}),
        "teacher": first["teacher"],
        "frames": {k: first["frames"][k] for k in ("count", "samples_per_frame", "episodes")},
        "settings": {k: first["settings"][k] for k in ("num_steps", "reference_num_steps", "seed")},
        "rows": rows,
        "verdict": verdict(rows, reference_steps),
    }


SUCCESS_COLUMN = ("success", "success [95% CI], closed loop")
"""The column ``add_closed_loop`` puts beside the open-loop error (``success_text`` of the row's closed-loop cell)."""


def add_closed_loop(
    comparison: dict[str, Any], report: dict[str, Any], source: str | None = None
) -> dict[str, Any]:
    """``comparison`` with closed-loop success beside the open-loop error: each row whose (model, steps) has a cell
    in the closed-loop ``report`` (``reflowpairs.eval.closed_loop``) gets its ``success_rate``, ``success_low`` and
    ``success_high`` (95% Wilson); ``closed_loop`` records the env, the episodes per cell, every cell's success (the
    cells with no open-loop row too, such as the teacher at its full step count), the verdict and ``source``."""
    cells = {(c["model"], c["num_steps"]): c for c in report["cells"]}
    keys = ("success_rate", "success_low", "success_high")
    rows = []
    for row in comparison["rows"]:
        cell = cells.get((row["model"], row["num_steps"]))
        rows.append({**row, **({k: cell[k] for k in keys} if cell is not None else {})})
    return {
        **comparison,
        "rows": rows,
        "closed_loop": {
            "env": report["env"],
            "n_episodes": report["settings"]["n_episodes"],
            "report": source,
            "reference": report["reference"],
            "cells": [
                {"model": c["model"], "num_steps": c["num_steps"], **{k: c[k] for k in keys}}
                for c in cells.values()
            ],
            "verdict": report["verdict"],
        },
    }


def markdown(comparison: dict[str, Any]) -> str:
    """The comparison as Markdown: every model's rows (``eval.report.COLUMNS``) and the verdict table."""
    ref = comparison["settings"]["reference_num_steps"]
    closed = bool(comparison.get("closed_loop"))
    table = markdown_table(
        [title for _, title in COLUMNS] + ([SUCCESS_COLUMN[1]] if closed else []),
        [
            [format_value(row.get(key)) for key, _ in COLUMNS] + ([success_cell(row)] if closed else [])
            for row in comparison["rows"]
        ],
    )
    if closed:
        table += f"\n\n{closed_loop_note(comparison)}"
    verdict_rows = [
        [model, format_value(goals["vs_teacher_best"]), format_value(goals["vs_teacher_4"])]
        for model, goals in comparison["verdict"].items()
    ]
    verdict_table = markdown_table(
        [
            "model",
            f"fewest steps as accurate on data as the teacher at {ref}",
            "fewest steps as close to the reference as the teacher at 4",
        ],
        verdict_rows,
    )
    frames = comparison["frames"]
    return (
        f"# Students compared\n\n{frames['count']} frames x {frames['samples_per_frame']} noises, episodes "
        f"{frames['episodes']}; reference: the teacher at {ref} steps; errors in the teacher's normalised action "
        f"space.\n\n{table}\n\n## Verdict\n\n{verdict_table}\n"
    )


def figure(comparison: dict[str, Any]):
    """Error to the teacher's reference against steps, a line per model, log-log (matplotlib Agg figure)."""
    # matplotlib lazily: only the report files need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    values: list[float] = []
    for i, model in enumerate(comparison["models"]):
        points = [(r["num_steps"], r["mse_ref_norm"]) for r in comparison["rows"] if r["model"] == model]
        points = [(n, v) for n, v in points if v is not None and math.isfinite(v) and v > 0]
        ax.plot([n for n, _ in points], [v for _, v in points], marker="os^vD<>p"[i % 8], label=model)
        values += [v for _, v in points]
    steps_vs_error_axes(
        ax, comparison["settings"]["num_steps"], values, "MSE to the teacher's reference (normalised)"
    )
    ax.set_title(
        f"Students compared (reference: teacher at {comparison['settings']['reference_num_steps']} steps)"
    )
    ax.grid(True, which="major", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(4, len(comparison["models"])), fontsize=8, frameon=False)
    return fig


def write_comparison(comparison: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write comparison.json, comparison.md and comparison.png into ``out``, each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "comparison.json",
        "markdown": out / "comparison.md",
        "plot": out / "comparison.png",
    }
    write_json_atomically(files["json"], comparison)
    replace_atomically(files["markdown"], lambda tmp: Path(tmp).write_text(markdown(comparison)))
    replace_atomically(files["plot"], lambda tmp: figure(comparison).savefig(tmp, dpi=120, format="png"))
    return files


def read_report(path: str | Path) -> dict[str, Any]:
    """An ``eval`` report.json."""
    return json.loads(Path(path).read_text())


def evaluate_students(
    cfg: EvalConfig,
    students: dict[str, str],
    progress: PhaseProgress | None = None,
    on_student: Callable[[str, str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """``evaluate`` each student (label -> checkpoint) with ``cfg``'s other settings into ``cfg.out/<label>/``, then
    compare them: returns the comparison and its files (``cfg.out/comparison.*``). ``cfg.episodes`` must be given
    (or ``include_training_frames``) when the students trained on different stores, so that every student is
    scored on the same frames; ``check_comparable`` refuses otherwise."""
    reports, sources = {}, {}
    for label, student in students.items():
        if on_student is not None:
            on_student(label, student)
        one = dataclasses.replace(cfg, student=student, out=Path(cfg.out) / label)
        reports[label] = evaluate(one, progress=progress)
        sources[label] = str(write_report(reports[label], one.out).json)
    comparison = compare_reports(reports, sources)
    return comparison, write_comparison(comparison, cfg.out)
