"""Writing a closed-loop report (``reflowpairs.eval.closed_loop.evaluate_closed_loop``'s dict) to disk, and its table.

``OUT/closed_loop.json`` holds every number (per-episode results included), ``OUT/closed_loop.md`` the table and the
verdict, ``OUT/success_vs_steps.png`` success against steps, a line per model with 95% Wilson intervals as error bars
and the teacher's full-step interval as a band. Each file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reflowpairs.atomic import replace_atomically, write_json_atomically
from reflowpairs.eval.report import ReportFiles, format_value, markdown_table

REPORT_JSON = "closed_loop.json"
REPORT_MD = "closed_loop.md"
PLOT_PNG = "success_vs_steps.png"


# --- report files ----------------------------------------------------------------------------------------------


def percent(rate: float) -> str:
    return f"{100 * rate:.0f}%"


def success_text(cell: dict[str, Any]) -> str:
    """``"80% [49-94%]"``: the success rate and its 95% Wilson interval."""
    return (
        f"{percent(cell['success_rate'])} [{100 * cell['success_low']:.0f}-{100 * cell['success_high']:.0f}%]"
    )


TABLE_HEADERS = ("model", "steps", "success [95% CI]", "return", "length", "chunk ms", "vs teacher")
"""Columns of the closed-loop table (CLI and Markdown); ``vs teacher``: episodes only this cell succeeds in /
only the teacher at its full step count does (paired, on the shared seeds)."""


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """The table's cells, one list per report cell, in ``TABLE_HEADERS`` order."""
    paired = {(p["model"], p["num_steps"]): p for p in report["paired"]}
    rows = []
    for cell in report["cells"]:
        p = paired.get((cell["model"], cell["num_steps"]))
        rows.append(
            [
                cell["model"],
                str(cell["num_steps"]),
                success_text(cell),
                format_value(cell["mean_return"]),
                format_value(cell["mean_length"]),
                format_value(cell["latency_ms"]),
                "reference" if p is None else f"+{p['only_model']} / -{p['only_teacher']}",
            ]
        )
    return rows


def verdict_rows(report: dict[str, Any]) -> list[list[str]]:
    """``[model, fewest steps]`` per model (``none`` where no step count matches)."""
    return [[label, "none" if steps is None else str(steps)] for label, steps in report["verdict"].items()]


def title_text(report: dict[str, Any]) -> str:
    s = report["settings"]
    opts = " ".join(f"--env.{k}={v}" for k, v in report["env"]["options"].items())
    return (
        f"closed loop on {report['env']['type']}{' ' + opts if opts else ''}: {s['n_episodes']} episodes per cell "
        f"(seeds from {s['seed']}); reference = teacher at {s['reference_num_steps']} steps"
    )


def verdict_text(report: dict[str, Any]) -> str:
    ref = report["reference"]
    return (
        f"fewest steps with success within the teacher's {ref['num_steps']}-step interval "
        f"[{100 * ref['success_low']:.0f}-{100 * ref['success_high']:.0f}%] or above"
    )


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the settings line, the table, the verdict, and what the columns mean."""
    lines = [
        "# Closed-loop evaluation",
        "",
        title_text(report) + ".",
        "",
        markdown_table(TABLE_HEADERS, table_rows(report)),
        "",
        f"## Verdict: {verdict_text(report)}",
        "",
        markdown_table(("model", "fewest steps"), verdict_rows(report)),
        "",
        "success: episodes with `info['is_success']` (95% Wilson interval); return: mean sum of rewards; length: "
        "mean steps per episode; chunk ms: median time of one action-chunk call for "
        f"{report['settings']['batch_size']} env(s); vs teacher: episodes only this cell succeeds in / only the "
        "teacher at its full step count does, on the same seeds.",
        "",
    ]
    return "\n".join(lines)


def success_figure(report: dict[str, Any]):
    """Success rate against steps, a line per model with its 95% intervals as error bars, the teacher's full-step
    interval as a band (a matplotlib ``Figure`` on the Agg canvas, global state untouched)."""
    # matplotlib lazily: only the report files need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ref = report["reference"]
    ax.axhspan(
        100 * ref["success_low"],
        100 * ref["success_high"],
        color="tab:blue",
        alpha=0.12,
        label=f"teacher at {ref['num_steps']} steps (95% CI)",
    )
    steps_seen: set[int] = set()
    labels = list(report["models"])
    for i, label in enumerate(labels):
        cells = [c for c in report["cells"] if c["model"] == label]
        shift = 1 + 0.03 * (i - (len(labels) - 1) / 2)  # side by side, so equal points stay visible
        x = [c["num_steps"] * shift for c in cells]
        y = [100 * c["success_rate"] for c in cells]
        err = [
            [max(0.0, 100 * (c["success_rate"] - c["success_low"])) for c in cells],
            [max(0.0, 100 * (c["success_high"] - c["success_rate"])) for c in cells],
        ]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        steps_seen.update(c["num_steps"] for c in cells)
    ax.set_xscale("log")
    ticks = sorted(steps_seen)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(-2, 102)
    ax.set_xlabel("ODE steps (Euler)")
    ax.set_ylabel("success rate (%)")
    ax.set_title(f"Closed-loop success on {report['env']['type']}", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def write_closed_loop_report(report: dict[str, Any], out: str | Path) -> ReportFiles:
    """Write ``closed_loop.json``, ``closed_loop.md`` and ``success_vs_steps.png`` into ``out`` (created if needed),
    each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out / REPORT_JSON, out / REPORT_MD, out / PLOT_PNG)
    write_json_atomically(files.json, report)
    replace_atomically(files.markdown, lambda p: Path(p).write_text(markdown(report)))
    replace_atomically(files.plot, lambda p: success_figure(report).savefig(p, dpi=120, format="png"))
    return files


def success_cell(row: dict[str, Any]) -> str:
    """A row's closed-loop success as ``"80% [49-94%]"``, ``n/a`` when it has none."""
    return success_text(row) if "success_rate" in row else "n/a"


def closed_loop_note(comparison: dict[str, Any]) -> str:
    """One line on the closed-loop column: the env and episodes, and the cells with no open-loop row (the
    teacher at its full step count, typically); empty without closed loop."""
    closed = comparison.get("closed_loop")
    if not closed:
        return ""
    shown = {(r["model"], r["num_steps"]) for r in comparison["rows"] if "success_rate" in r}
    others = [
        f"{c['model']} at {c['num_steps']} steps {success_cell(c)}"
        for c in closed["cells"]
        if (c["model"], c["num_steps"]) not in shown
    ]
    text = f"success: closed loop in {closed['env']['type']}, {closed['n_episodes']} episodes per cell"
    return text + (f"; also {', '.join(others)}" if others else "") + "."
