"""Writing an evaluation report (``reflowpairs.eval.open_loop.evaluate``'s dict) to disk.

``OUT/report.json`` holds every number, the settings and the provenance; ``OUT/report.md`` the table
(the same cells the CLI prints, from ``table_rows``) and the headline ratio; ``OUT/steps_vs_error.png``
the error against the number of ODE steps for teacher and student, log-scale y. Each file is written
to a temporary name beside it and renamed into place, so a crash never leaves half a report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflowpairs.atomic import replace_atomically, write_json_atomically
from reflowpairs.dataset import episodes_text
from reflowpairs.next_steps import next_lines

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

CONSOLE_HEADERS: dict[str, str] = {
    "model": "model",
    "num_steps": "steps",
    "mse_ref_norm": "MSE ref\n(norm)",
    "l1_ref_norm": "L1 ref\n(norm)",
    "mse_ref_units": "MSE ref\n(units)",
    "mse_data_norm": "MSE data\n(norm)",
    "straightness": "straight-\nness",
    "latency_ms": "latency\n(ms)",
}
"""Two-line headers of ``COLUMNS`` for the console table, so that it fits in 80 columns."""


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
    if isinstance(value, (bool, int | str)):
        return str(value)
    if value == 0:
        return "0"
    return f"{value:.3g}"


def episode_span(episodes) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"`` (``"none"`` when empty)."""
    return episodes_text(sorted({int(e) for e in episodes})).replace(",", ", ") or "none"


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


def frames_text(report: dict[str, Any]) -> str:
    """Which frames were evaluated and whether the student trained on them, in one sentence."""
    frames = report["frames"]
    training = frames.get("training") or {}
    status = training.get("status")
    given = " (--episodes)" if frames.get("selection") == "given" else ""
    what = f"{frames['count']} x {frames['samples_per_frame']} noises from episodes {episode_span(frames['episodes'])}{given}"
    if status == "known" and training.get("included"):
        why = (
            f"INCLUDES training episodes {episode_span(training['included'])} (--include-training-frames; "
            f"store {training['store']})"
        )
    elif status == "known":
        why = f"held out (the student trained on episodes {episode_span(training['episodes'])}, store {training['store']})"
    elif status == "other_dataset":
        why = "held out (the student trained on another dataset)"
    else:
        why = f"not checked ({training.get('reason') or 'the student records no training frames'})"
    return f"frames: {what}: {why}"


def report_notes(report: dict[str, Any]) -> list[str]:
    """Caveats, most serious first: another teacher than the student's (``--allow-mismatch``), training
    frames among the evaluated ones, a student whose training is not recorded or whose store is gone,
    and about the training-pairs comparison (``--pairs``)."""
    notes = []
    check = (report.get("checks") or {}).get("teacher") or {}
    training = report["frames"].get("training") or {}
    if check.get("matches") is False:
        notes.append(
            f"TEACHER MISMATCH (--allow-mismatch): the student was trained from teacher {check['recorded'][:12]}, "
            f"not from this teacher ({check['given'][:12]}), so the ratio is not its gain over its own teacher."
        )
    if training.get("included"):
        notes.append(
            f"TRAINING FRAMES INCLUDED (--include-training-frames): of the evaluated episodes, the student "
            f"trained on {episode_span(training['included'])}, so these rows are not held-out errors."
        )
    status = training.get("status")
    if status == "unrecorded":
        notes.append(
            f"{training['reason']}: its teacher and training frames are not checked; evaluate it on episodes "
            "you know it did not train on."
        )
    elif status == "store_gone":
        notes.append(
            f"{training['reason']}: episodes {episode_span(report['frames']['episodes'])} were not checked "
            "against its training frames."
        )
    elif status == "other_dataset":
        notes.append(f"{training['reason']}: every episode of this one is held out.")
    pairs = report.get("pairs")
    if pairs:
        if not pairs["same_teacher"]:
            notes.append(
                "the store was generated by another teacher than the one above; its X_1 are that teacher's samples."
            )
        if report["frames"].get("episodes_in_store") and not training.get("included"):
            notes.append(
                f"evaluated episodes {report['frames']['episodes_in_store']} are also in the store, "
                "so the held-out rows are not fully held out."
            )
    return notes


def next_text(report: dict[str, Any]) -> str:
    """The "next:" line: the command to run after this evaluation (``reflowpairs.eval.summary.next_step``);
    ``report["next"]["why"]`` says why."""
    nxt = report.get("next") or {}
    return next_lines(nxt["command"])[0] if nxt.get("command") else ""


def pairs_rows(report: dict[str, Any]) -> list[list[str]]:
    """``[steps, MSE on training pairs, MSE on held-out frames, ratio held-out/training]`` for the student."""
    held_out = {r["num_steps"]: r["mse_ref_norm"] for r in report["rows"] if r["model"] == "student"}
    rows = []
    for row in report["pairs"]["rows"]:
        train = row["mse_norm"]
        test = held_out.get(row["num_steps"])
        gap = test / train if train and test is not None else None
        rows.append(
            [format_value(row["num_steps"]), format_value(train), format_value(test), format_value(gap)]
        )
    return rows


PAIRS_COLUMNS = (
    "steps",
    "MSE on training pairs (norm)",
    "MSE on held-out frames (norm)",
    "held-out / training",
)
PAIRS_CONSOLE_HEADERS = (
    "steps",
    "MSE training\npairs (norm)",
    "MSE held-out\nframes (norm)",
    "held-out /\ntraining",
)
"""``PAIRS_COLUMNS`` in two lines each, for the console."""


def markdown_table(headers: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _teacher_check_text(report: dict[str, Any]) -> str:
    check = (report.get("checks") or {}).get("teacher") or {}
    if check.get("matches") is None:
        return "no recorded teacher"
    if check["matches"]:
        return "trained from this teacher"
    return f"trained from another teacher, `{check['recorded'][:12]}` (--allow-mismatch)"


def markdown(report: dict[str, Any]) -> str:
    """report.md: what was compared, caveats, the headline ratio, the table, fitting vs generalising, and
    what to run next."""
    s = report["settings"]
    parts = ["# reflowpairs eval", ""]
    if report.get("labels"):
        parts += [f"**{' / '.join(report['labels'])}**", ""]
    parts += [
        f"- teacher: `{report['teacher']['source']}` (fingerprint `{report['teacher']['fingerprint'][:12]}`), "
        f"reference = teacher, Euler, {s['reference_num_steps']} steps",
        f"- student: `{report['student']['source']}` (fingerprint `{report['student']['fingerprint'][:12]}`; "
        f"{_teacher_check_text(report)})",
        f"- dataset: `{report['dataset']['repo_id']}`; {frames_text(report)}; noise seed {s['seed']}",
        f"- device {s['device']}; latency = median of {s['latency_repeats']} timed calls per row after a warm-up",
        "",
        f"**Headline:** {headline_text(report)}.",
    ]
    parts += [line for note in report_notes(report) for line in ("", f"Note: {note}")]
    parts += [
        "",
        markdown_table([h for _, h in COLUMNS], table_rows(report)),
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
            markdown_table(PAIRS_COLUMNS, pairs_rows(report)),
        ]
    nxt = report.get("next") or {}
    if nxt.get("command"):
        parts += ["", "## Next", "", f"{nxt['why']}:", "", "```", nxt["command"], "```"]
    parts += ["", f"![error against ODE steps]({PLOT_PNG})", ""]
    return "\n".join(parts)


def _series(report: dict[str, Any], model: str, key: str) -> tuple[list[int], list[float]]:
    """Step counts and positive, finite values of ``key`` for ``model`` (a log axis cannot show 0)."""
    points = [(r["num_steps"], r[key]) for r in report["rows"] if r["model"] == model]
    kept = [(n, v) for n, v in points if v is not None and math.isfinite(v) and v > 0]
    return [n for n, _ in kept], [v for _, v in kept]


def log_ticks(lo: float, hi: float, max_ticks: int = 8) -> list[float]:
    """Tick values for a log axis showing ``lo .. hi`` (both > 0): the 1-2-5 values inside, a finer
    1-1.5-2-3-5-7 series when that gives fewer than 3, padded with the nearest value either side when
    still fewer than 3 (the axis then widens to show them); only powers of ten, thinned, when 1-2-5 gives
    more than ``max_ticks``. Several labelled ticks, where matplotlib's default labels only powers of ten
    and a range of about one decade shows one or none."""
    if not (0 < lo <= hi and math.isfinite(hi)):
        return []
    first, last = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1

    def series(subs: tuple[float, ...]) -> list[float]:
        return [float(f"{m * 10.0**d:.12g}") for d in range(first, last + 1) for m in subs]

    coarse = series((1, 2, 5))
    inside = [v for v in coarse if lo <= v <= hi]
    if len(inside) > max_ticks:
        powers = [v for v in series((1,)) if lo <= v <= hi]
        stride = math.ceil(len(powers) / max_ticks)
        return powers[::stride]
    if len(inside) >= 3:
        return inside
    fine = series((1, 1.5, 2, 3, 5, 7))
    inside = [v for v in fine if lo <= v <= hi]
    if len(inside) < 3:
        inside = [max(v for v in fine if v < lo)] + inside + [min(v for v in fine if v > hi)]
    return inside


def steps_vs_error_axes(ax, steps: list[int], values: list[float], ylabel: str) -> None:
    """Log-log axes of error against ODE steps: the evaluated step counts as x ticks, several labelled y ticks
    over ``values`` (``log_ticks``), no minor ticks."""
    from matplotlib.ticker import NullLocator  # matplotlib lazily: only the report files need it

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(steps)
    ax.set_xticklabels([str(n) for n in steps])
    ticks = log_ticks(min(values), max(values)) if values else []
    if ticks:
        ax.set_yticks(ticks)
        ax.set_yticklabels([format_value(v) for v in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("ODE steps (Euler)")
    ax.set_ylabel(ylabel)


def steps_vs_error_figure(report: dict[str, Any]):
    """The figure of ``plot_steps_vs_error`` (a matplotlib ``Figure`` on the Agg canvas, global state untouched)."""
    # matplotlib lazily: only the report files need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {"teacher": ("tab:blue", "o"), "student": ("tab:orange", "s")}
    values: list[float] = []
    for model, (color, marker) in styles.items():
        x, y = _series(report, model, "mse_ref_norm")
        ax.plot(x, y, color=color, marker=marker, linestyle="-", label=f"{model}: MSE to reference")
        values += y
        x, y = _series(report, model, "mse_data_norm")
        ax.plot(
            x,
            y,
            color=color,
            marker=marker,
            linestyle="--",
            alpha=0.6,
            label=f"{model}: MSE to dataset actions",
        )
        values += y
    if report.get("pairs"):
        points = [(r["num_steps"], r["mse_norm"]) for r in report["pairs"]["rows"]]
        points = [(n, v) for n, v in points if v is not None and math.isfinite(v) and v > 0]
        ax.plot(
            [n for n, _ in points],
            [v for _, v in points],
            color="tab:orange",
            marker="^",
            linestyle=":",
            label="student: MSE to stored X_1 (training pairs)",
        )
        values += [v for _, v in points]
    steps_vs_error_axes(ax, report["settings"]["num_steps"], values, "MSE (normalised action space)")
    title = f"Error vs steps (reference: teacher at {report['settings']['reference_num_steps']} steps)"
    ax.set_title(title + "".join(f"\n{label}" for label in report.get("labels") or []), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def plot_steps_vs_error(report: dict[str, Any], path: Path) -> None:
    """Error against ODE steps, teacher and student on one plot, log-log axes with several labelled ticks,
    the legend below the axes (never over the points), with matplotlib's Agg backend (no display needed).

    Solid: MSE to the reference; dashed: MSE to the dataset's actions; dotted: the student on its
    training pairs (with ``--pairs``). The teacher at the reference step count has error 0 by
    definition and is left off the log axis."""
    steps_vs_error_figure(report).savefig(path, dpi=120, format="png")


def write_report(report: dict[str, Any], out: str | Path) -> ReportFiles:
    """Write report.json, report.md and steps_vs_error.png into ``out`` (created if needed), each atomically
    (``reflowpairs.atomic.replace_atomically``: written beside it, fsynced, renamed into place)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out / REPORT_JSON, out / REPORT_MD, out / PLOT_PNG)
    write_json_atomically(files.json, report)
    replace_atomically(files.markdown, lambda p: Path(p).write_text(markdown(report)))
    replace_atomically(files.plot, lambda p: plot_steps_vs_error(report, p))
    return files
