"""Writing an evaluation report (``reflowpairs.evaluate.evaluate``'s dict) to disk.

``OUT/report.json`` holds every number, the settings and the provenance; ``OUT/report.md`` the table
(the same cells the CLI prints, from ``table_rows``) and the headline ratio; ``OUT/steps_vs_error.png``
the error against the number of ODE steps for teacher and student, log-scale y. Each file is written
to a temporary name beside it and renamed into place, so a crash never leaves half a report.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "steps_vs_error.png"

COLUMNS: tuple[tuple[str, str], ...] = (
    ("model", "model"),
    ("num_steps", "steps"),
    ("mse_ref_norm", "MSE to ref (norm)"),
    ("l1_ref_norm", "L1 to ref (norm)"),
    ("mse_ref_units", "MSE to ref (units)"),
    ("mse_data_norm", "MSE to data (norm)"),
    ("straightness", "straightness"),
    ("latency_ms", "latency (ms)"),
)
"""``(report row key, column header)`` of the table the CLI prints and report.md holds."""


@dataclass(frozen=True)
class ReportFiles:
    """Where a report was written."""

    json: Path
    markdown: Path
    plot: Path


def format_value(value: Any) -> str:
    """How a table cell shows a report value: 3 significant digits, ``0`` for exact zero, ``n/a`` for None
    (report.json keeps full precision)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, int | str):
        return str(value)
    if value == 0:
        return "0"
    return f"{value:.3g}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """The table's cells, one list per report row, in ``COLUMNS`` order."""
    return [[format_value(row[key]) for key, _ in COLUMNS] for row in report["rows"]]


def headline_text(report: dict[str, Any]) -> str:
    """One sentence: student n-step error / teacher n-step error at the fewest steps evaluated."""
    head = report["headline"]
    n, ref = head["num_steps"], report["settings"]["reference_num_steps"]
    what = f"MSE to the teacher's {ref}-step reference, normalised"
    if head["ratio"] is None:
        return f"student {n}-step error / teacher {n}-step error: n/a (the teacher's {n}-step error is 0; {what})"
    return (
        f"student {n}-step error / teacher {n}-step error = {format_value(head['ratio'])} "
        f"({format_value(head['student'])} / {format_value(head['teacher'])}, {what})"
    )


def pairs_rows(report: dict[str, Any]) -> list[list[str]]:
    """``[steps, MSE on training pairs, MSE on held-out frames, ratio held-out/training]`` for the student."""
    held_out = {r["num_steps"]: r["mse_ref_norm"] for r in report["rows"] if r["model"] == "student"}
    rows = []
    for row in report["pairs"]["rows"]:
        train = row["mse_norm"]
        test = held_out.get(row["num_steps"])
        gap = test / train if train and test is not None else None
        rows.append([format_value(row["num_steps"]), format_value(train), format_value(test), format_value(gap)])
    return rows


PAIRS_COLUMNS = ("steps", "MSE on training pairs (norm)", "MSE on held-out frames (norm)", "held-out / training")


def _markdown_table(headers: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """report.md: what was compared, the headline ratio, the table, and fitting vs generalising."""
    s, frames = report["settings"], report["frames"]
    episodes = ", ".join(map(str, s["episodes"])) if s["episodes"] is not None else "all"
    parts = [
        "# reflowpairs eval",
        "",
        f"- teacher: `{report['teacher']['source']}` (fingerprint `{report['teacher']['fingerprint'][:12]}`), "
        f"reference = teacher, Euler, {s['reference_num_steps']} steps",
        f"- student: `{report['student']['source']}` (fingerprint `{report['student']['fingerprint'][:12]}`)",
        f"- dataset: `{report['dataset']['repo_id']}` episodes {episodes}: {frames['count']} frames x "
        f"{frames['samples_per_frame']} noises (seed {s['seed']}), device {s['device']}, latency median of "
        f"{s['latency_repeats']} after a warm-up",
        "",
        f"**Headline:** {headline_text(report)}.",
        "",
        _markdown_table([h for _, h in COLUMNS], table_rows(report)),
        "",
        "Columns are explained in the reflowpairs docs (`docs/eval.md`): *ref* = the teacher's full-step sample "
        "from the same noise; *data* = the dataset's recorded action chunk (padding past the episode end masked); "
        "*norm* = the teacher's normalised action space; *units* = dataset units.",
    ]
    if report.get("pairs"):
        pairs = report["pairs"]
        parts += [
            "",
            "## Fitting vs generalising",
            "",
            f"Student error to the stored X_1 from the stored X_0 on {pairs['num_frames']} training frames "
            f"({pairs['num_pairs']} pairs) of `{pairs['path']}`, next to its error on the held-out frames above.",
            "",
            _markdown_table(PAIRS_COLUMNS, pairs_rows(report)),
        ]
        if not pairs["same_teacher"]:
            parts += ["", "Note: the store was generated by another teacher than the one above; its X_1 are that "
                      "teacher's samples."]
        if report["frames"].get("episodes_in_store"):
            parts += ["", f"Note: evaluated episodes {report['frames']['episodes_in_store']} are also in the store, "
                      "so the held-out rows are not fully held out."]
    parts += ["", f"![error against ODE steps]({PLOT_PNG})", ""]
    return "\n".join(parts)


def _series(report: dict[str, Any], model: str, key: str) -> tuple[list[int], list[float]]:
    """Step counts and positive, finite values of ``key`` for ``model`` (a log axis cannot show 0)."""
    points = [(r["num_steps"], r[key]) for r in report["rows"] if r["model"] == model]
    kept = [(n, v) for n, v in points if v is not None and math.isfinite(v) and v > 0]
    return [n for n, _ in kept], [v for _, v in kept]


def plot_steps_vs_error(report: dict[str, Any], path: Path) -> None:
    """Error against ODE steps, teacher and student on one plot, log-log axes, with matplotlib's Agg
    backend (no display needed, global matplotlib state untouched).

    Solid: MSE to the reference; dashed: MSE to the dataset's actions; dotted: the student on its
    training pairs (with ``--pairs``). The teacher at the reference step count has error 0 by
    definition and is left off the log axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {"teacher": ("tab:blue", "o"), "student": ("tab:orange", "s")}
    for model, (color, marker) in styles.items():
        x, y = _series(report, model, "mse_ref_norm")
        ax.plot(x, y, color=color, marker=marker, linestyle="-", label=f"{model}: MSE to reference")
        x, y = _series(report, model, "mse_data_norm")
        ax.plot(x, y, color=color, marker=marker, linestyle="--", alpha=0.6, label=f"{model}: MSE to dataset actions")
    if report.get("pairs"):
        points = [(r["num_steps"], r["mse_norm"]) for r in report["pairs"]["rows"]]
        points = [(n, v) for n, v in points if v is not None and math.isfinite(v) and v > 0]
        ax.plot([n for n, _ in points], [v for _, v in points], color="tab:orange", marker="^", linestyle=":",
                label="student: MSE to stored X_1 (training pairs)")
    steps = report["settings"]["num_steps"]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(steps)
    ax.set_xticklabels([str(n) for n in steps])
    ax.minorticks_off()
    ax.set_xlabel("ODE steps (Euler)")
    ax.set_ylabel("MSE (normalised action space)")
    ax.set_title(f"Error vs steps (reference: teacher at {report['settings']['reference_num_steps']} steps)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")


def _replace(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def write_report(report: dict[str, Any], out: str | Path) -> ReportFiles:
    """Write report.json, report.md and steps_vs_error.png into ``out`` (created if needed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out / REPORT_JSON, out / REPORT_MD, out / PLOT_PNG)
    _replace(files.json, lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    _replace(files.markdown, lambda p: p.write_text(markdown(report)))
    _replace(files.plot, lambda p: plot_steps_vs_error(report, p))
    return files
