"""``reflowpairs inspect`` and ``reflowpairs validate``: see what a pair store holds, and prove it is sound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from reflowpairs.cli.app import _progress, app, out_console, print_next, train_command, user_errors
from reflowpairs.cli.options import Command, lerobot_names_text

_STYLE = {"pass": "green", "warn": "yellow", "incomplete": "yellow", "fail": "bold red", "skip": "dim"}
_STATUS_STYLE = {"sound": "bold green", "incomplete": "bold yellow", "corrupt": "bold red"}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def _kv_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows.items():
        table.add_row(escape(key), escape(_fmt(value)))
    return table


def summary_tables(summary: dict[str, Any]) -> list[Table]:
    """The rich tables of ``inspect``: store, provenance, and statistics (when computed)."""
    spf = summary["samples_per_frame"]
    observed = f"{spf['min']}" if spf["min"] == spf["max"] else f"{spf['min']}..{spf['max']}"
    tables = [
        _kv_table(
            f"pair store {summary['path']}",
            {
                "backend": summary["backend"],
                "store id": summary["store_id"],
                "complete": summary["complete"],
                "shards": summary["shards"],
                "pairs": f"{summary['pairs']:,}",
                "frames covered": f"{summary['frames']:,}",
                "samples per frame": f"{observed} (recorded K={spf['recorded']})",
                "X_0": f"{summary['x0']['dtype']} {tuple(summary['x0']['shape'])}",
                "X_1": f"{summary['x1']['dtype']} {tuple(summary['x1']['shape'])}",
                "bytes on disk": _human_bytes(summary["bytes_on_disk"]),
                "bytes per pair": _fmt(summary["bytes_per_pair"]),
                "skipped frames": len(summary["skipped_frames"]),
            },
        )
    ]
    provenance = Table(title="provenance", title_justify="left")
    for column in ("", "key", "value"):
        provenance.add_column(column, overflow="fold")
    for section in ("teacher", "dataset", "generation", "software"):
        for i, (key, value) in enumerate(summary[section].items()):
            provenance.add_row(section if i == 0 else "", escape(key), escape(_fmt(value)), end_section=i == len(summary[section]) - 1)
    tables.append(provenance)
    stats = summary.get("statistics")
    if stats:
        x0 = stats["x0"]
        tables.append(
            _kv_table(
                "X_0 (noise; expect mean ~0, std ~1)",
                {"mean": x0["mean"], "std": x0["std"], "non-finite values": x0["nonfinite"]},
            )
        )
        x1 = stats["x1"]
        table = Table(title=f"X_1 per action dimension (normalised; {x1['nonfinite']} non-finite values)", title_justify="left")
        for column in ("dim", "min", "max", "mean", "std"):
            table.add_column(column, justify="right")
        for d in range(len(x1["mean"])):
            table.add_row(str(d), *(_fmt(x1[k][d]) for k in ("min", "max", "mean", "std")))
        tables.append(table)
    return tables


def pair_table(pair: dict[str, Any]) -> Table:
    """One pair: where it is, its obs_index and sample, and the first rows of X_0 and X_1."""
    table = Table(
        title=f"pair {pair['index']}: obs_index {pair['obs_index']}, sample {pair['sample']} ({pair['shard']} row {pair['row']})",
        title_justify="left",
    )
    table.add_column("t", justify="right")
    table.add_column("X_0 (noise)")
    table.add_column("X_1 (teacher action, normalised)")
    for t, (a, b) in enumerate(zip(pair["x0"], pair["x1"], strict=True)):
        table.add_row(str(t), " ".join(f"{v:+.3f}" for v in a), " ".join(f"{v:+.3f}" for v in b))
    return table


@app.command(cls=Command)
def inspect(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="The pair store directory (the --out of `reflowpairs generate`).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    pair: Annotated[int | None, typer.Option("--pair", metavar="I", help="Show pair number I (in shard order) instead of the summary.")] = None,
    rows: Annotated[int, typer.Option(metavar="N", help="Rows (chunk steps) of X_0 and X_1 shown with --pair.")] = 3,
    stats: Annotated[bool, typer.Option("--stats/--no-stats", help="Compute X_0/X_1 statistics (reads every shard once).")] = True,
) -> None:
    """Show what a pair store holds: layout, sizes, provenance and X_0/X_1 statistics (streamed shard by shard)."""
    from reflowpairs.inspect_store import pair as read_pair
    from reflowpairs.inspect_store import summarize

    with user_errors():
        if pair is not None:
            result = read_pair(store, pair, rows)
            if json_out:
                typer.echo(json.dumps(result))
            else:
                out_console.print(pair_table(result))
            return
        with _progress(prefix="inspect") as bar:
            task = bar.add_task("shards", total=None, rate="")
            summary = summarize(store, statistics=stats, progress=lambda done, total: bar.update(task, completed=done, total=total))
    if json_out:
        typer.echo(json.dumps(summary))
        return
    for table in summary_tables(summary):
        out_console.print(table)
    print_next(["reflowpairs", "validate", str(store)])


def report_table(report) -> Table:
    """check / result / detail, one row per check of a ``ValidationReport``."""
    table = Table(title=f"validate {report.store}", title_justify="left")
    table.add_column("check", style="bold", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for check in report.checks:
        style = _STYLE.get(check.result, "")
        table.add_row(check.name, f"[{style}]{check.result.upper()}[/]", escape(check.detail))
    return table


@app.command(cls=Command, epilog=lerobot_names_text("validate"))
def validate(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="The pair store directory (the --out of `reflowpairs generate`).")],
    dataset: Annotated[str | None, typer.Option(metavar="REPO_ID", help="Check against this LeRobotDataset repo id (default: the recorded one).")] = None,
    dataset_root: Annotated[Path | None, typer.Option(metavar="DIR", help="Local root of the dataset to check against.")] = None,
    teacher: Annotated[str | None, typer.Option(metavar="CKPT", help="Check the store was made by this checkpoint (and use it for --spot-check).")] = None,
    spot_check: Annotated[int, typer.Option(metavar="N", help="Re-run the teacher on N random pairs (all if N >= pairs) and compare X_1.")] = 0,
    atol: Annotated[float | None, typer.Option(metavar="X", help="Largest |X_1 difference| the spot check accepts (default: 1e-4 for float32 stores, 5e-3 float16, 5e-2 bfloat16).")] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed choosing the spot-checked pairs.")] = 0,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="Device for the spot check: auto, cpu, cuda[:N] or mps.")] = "auto",
    batch_size: Annotated[int, typer.Option(metavar="N", help="Frames per teacher call in the spot check.")] = 16,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
) -> None:
    """Run every check on a pair store; exit 0 only if it is sound (1 if it is corrupt or incomplete)."""
    from reflowpairs.validate import ValidateConfig
    from reflowpairs.validate import validate as run_validate

    cfg = ValidateConfig(
        store=store, dataset=dataset, dataset_root=dataset_root, teacher=teacher, spot_check=spot_check,
        atol=atol, seed=seed, device=device, batch_size=batch_size,
    )
    with user_errors(), _progress(prefix="validate") as bar:
        tasks: dict[str, int] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, rate="")
            bar.update(tasks[phase], completed=done)

        report = run_validate(cfg, progress=on_progress)
    if json_out:
        typer.echo(json.dumps(report.to_dict() | {"summary": report.summary()}))
    else:
        out_console.print(report_table(report))
        out_console.print(f"[{_STATUS_STYLE[report.status]}]{escape(report.summary())}[/]", soft_wrap=True)
        if report.status == "sound":
            print_next(train_command(store, dataset_root))
        elif report.status == "incomplete" and report.resume_command:
            print_next(report.resume_command)
    if not report.ok:
        raise typer.Exit(1)
