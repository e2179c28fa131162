"""``reflowpairs eval``: teacher vs student at each step count, as a rich table and report files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from reflowpairs.cli.app import _progress, app, out_console, parse_episodes, user_errors


def report_table(report: dict[str, Any]) -> Table:
    """The report's rows as a rich table (the same cells as report.md, from ``report.table_rows``)."""
    from reflowpairs.report import COLUMNS, table_rows

    settings = report["settings"]
    table = Table(
        title=f"teacher vs student (reference: teacher, {settings['reference_num_steps']} Euler steps; "
        f"{report['frames']['count']} frames x {report['frames']['samples_per_frame']} noises)",
        padding=(0, 1),
    )
    rows = table_rows(report)
    for i, (_, header) in enumerate(COLUMNS):
        table.add_column(header, justify="left" if i == 0 else "right", overflow="fold")
    for i, cells in enumerate(rows):
        table.add_row(*cells, end_section=i + 1 < len(rows) and report["rows"][i + 1]["model"] != report["rows"][i]["model"])
    return table


def pairs_table(report: dict[str, Any]) -> Table:
    """The student's error on its training pairs next to its held-out error (``--pairs``)."""
    from reflowpairs.report import PAIRS_COLUMNS, pairs_rows

    table = Table(title=f"student: training pairs ({report['pairs']['num_frames']} frames) vs held-out frames")
    for header in PAIRS_COLUMNS:
        table.add_column(header, justify="right")
    for cells in pairs_rows(report):
        table.add_row(*cells)
    return table


@app.command("eval")
def eval_command(
    student: Annotated[str, typer.Option(help="Student checkpoint: a pretrained_model/ directory or a hub repo id.")],
    teacher: Annotated[str, typer.Option(help="Teacher checkpoint; its full-step sample is the reference.")],
    dataset: Annotated[str, typer.Option(help="LeRobotDataset repo id.")],
    out: Annotated[Path, typer.Option(help="Directory for report.json, report.md and steps_vs_error.png.")],
    dataset_root: Annotated[Path | None, typer.Option(help="Local root of the dataset (lerobot's root=).")] = None,
    episodes: Annotated[str | None, typer.Option(help="Episodes to evaluate on, ideally held out, e.g. 8,9 (default: all).")] = None,
    num_steps: Annotated[str, typer.Option(help="Step counts to compare, e.g. 1,2,4,10.")] = "1,2,4,10",
    pairs: Annotated[Path | None, typer.Option(help="Pair store the student trained on: also report its error there.")] = None,
    max_frames: Annotated[int, typer.Option(help="Frames to evaluate (evenly spread); also the store frames with --pairs.")] = 64,
    samples_per_frame: Annotated[int, typer.Option(help="K: noises per frame.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the noises X_0 = f(seed, obs_index, sample).")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda[:N] or mps.")] = "auto",
    latency_repeats: Annotated[int, typer.Option(help="Timed calls per latency figure (median, after one warm-up).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Frames per sampling call.")] = 8,
) -> None:
    """Compare a student with its teacher at each step count: error, straightness, latency; write a report."""
    from reflowpairs.evaluate import EvalConfig, evaluate, parse_num_steps
    from reflowpairs.report import headline_text, report_notes, write_report

    with user_errors():
        cfg = EvalConfig(
            student=student, teacher=teacher, dataset=dataset, out=out, num_steps=parse_num_steps(num_steps),
            dataset_root=dataset_root, episodes=parse_episodes(episodes), pairs=pairs, max_frames=max_frames,
            samples_per_frame=samples_per_frame, seed=seed, device=device, latency_repeats=latency_repeats,
            batch_size=batch_size,
        )
        with _progress() as bar:
            tasks: dict[str, int] = {}

            def on_progress(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total, rate="")
                bar.update(tasks[phase], completed=done)

            report = evaluate(cfg, progress=on_progress)
        files = write_report(report, out)
    out_console.print(report_table(report))
    if report.get("pairs"):
        out_console.print(pairs_table(report))
    for note in report_notes(report):
        out_console.print(f"Note: {note}", style="yellow", markup=False)
    out_console.print(headline_text(report), style="bold", markup=False)
    out_console.print(f"report: {files.json}\ntable:  {files.markdown}\nplot:   {files.plot}", markup=False)
