"""Typer app: parse options, call the library, render with rich. No logic of its own."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from reflowpairs.errors import ReflowPairsError

app = typer.Typer(
    name="reflowpairs",
    help="Offline reflow for LeRobot flow-matching policies: generate teacher pairs once, train a 1-2 step student.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out_console = Console()
_state = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug
    logging.getLogger("lerobot.utils.import_utils").setLevel(logging.CRITICAL)


def parse_episodes(text: str | None) -> list[int] | None:
    """``"0,2,5"`` or ``"0-3,7"`` -> sorted episode list; None/empty -> None (all episodes)."""
    if not text:
        return None
    episodes: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                episodes.update(range(int(lo), int(hi) + 1))
            elif part:
                episodes.add(int(part))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a list of episode numbers like 0,2,5 or 0-3,7", param_hint="--episodes") from None
    return sorted(episodes)


def parse_partition(text: str | None) -> tuple[int, int] | None:
    """``"i/P"`` -> ``(i, P)``."""
    if not text:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a slice like 0/4", param_hint="--partition") from None
    return index, count


@contextlib.contextmanager
def user_errors():
    """Turn ``ReflowPairsError`` into one red paragraph and exit 1; Ctrl-C into a short note."""
    try:
        yield
    except ReflowPairsError as err:
        if _state["debug"]:
            console.print_exception()
        console.print(f"[bold red]error:[/] {escape(err.what)} {escape(err.hint)}".rstrip(), soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/] Completed shards are saved; rerun the same command with --resume to finish.")
        raise typer.Exit(130) from None


def _progress(main: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not main or (not console.is_terminal and os.environ.get("REFLOWPAIRS_PROGRESS") != "1"),
    )


@app.command()
def generate(
    teacher: Annotated[str, typer.Option(help="Teacher checkpoint: a pretrained_model/ directory or a hub repo id.")],
    dataset: Annotated[str, typer.Option(help="LeRobotDataset repo id.")],
    out: Annotated[Path, typer.Option(help="Directory of the pair store to write.")],
    dataset_root: Annotated[Path | None, typer.Option(help="Local root of the dataset (lerobot's root=).")] = None,
    episodes: Annotated[str | None, typer.Option(help="Episodes to use, e.g. 0,2,5 or 0-9 (default: all).")] = None,
    samples_per_frame: Annotated[int, typer.Option(help="K: noise samples (pairs) per frame.")] = 4,
    num_steps: Annotated[int | None, typer.Option(help="ODE steps (default: the teacher config's num_steps).")] = None,
    solver: Annotated[str, typer.Option(help="euler (the teacher's own), midpoint, rk4 or dopri5.")] = "euler",
    rtol: Annotated[float, typer.Option(help="dopri5 relative tolerance.")] = 1e-5,
    atol: Annotated[float, typer.Option(help="dopri5 absolute tolerance.")] = 1e-5,
    batch_size: Annotated[int, typer.Option(help="Frames loaded per batch (each samples K pairs).")] = 16,
    tokens_per_call: Annotated[int | None, typer.Option(help="Most suffix tokens (frames x K x chunk_size) per teacher call; 0: the whole batch (default: 1024 on CPU, no limit on GPU).")] = None,
    shard_size: Annotated[int, typer.Option(help="Pairs per shard (rounded to whole frames).")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed of X_0 = f(seed, obs_index, sample).")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda[:N] or mps.")] = "auto",
    format: Annotated[str, typer.Option("--format", help="Shard backend: zarr or parquet.")] = "zarr",
    num_workers: Annotated[int, typer.Option(help="DataLoader workers loading frames.")] = 0,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted store in --out.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a store already in --out.")] = False,
    on_nonfinite: Annotated[str, typer.Option(help="error (stop) or skip (record and skip the frame).")] = "error",
    dtype: Annotated[str, typer.Option(help="Teacher compute dtype: float32, bfloat16 or float16 (autocast; for CUDA).")] = "float32",
    partition: Annotated[str | None, typer.Option(help="Run one slice i/P of the frames (obs_index % P == i); combine slices with `reflowpairs merge`.")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="X_1 from lerobot's own predict_action_chunk per frame, bit for bit (no prefix sharing: slower).")] = False,
) -> None:
    """Run the teacher's sampler over every frame and store (X_0, X_1, obs_index) pairs."""
    from reflowpairs.generate import GenerateConfig
    from reflowpairs.generate import generate as run_generate

    cfg = GenerateConfig(
        teacher=teacher, dataset=dataset, out=out, dataset_root=dataset_root, episodes=parse_episodes(episodes),
        samples_per_frame=samples_per_frame, num_steps=num_steps, solver=solver, rtol=rtol, atol=atol,
        batch_size=batch_size, tokens_per_call=tokens_per_call, shard_size=shard_size, seed=seed, device=device, backend=format,
        num_workers=num_workers, resume=resume, overwrite=overwrite, on_nonfinite=on_nonfinite, dtype=dtype,
        partition=parse_partition(partition), exact=exact,
    )
    with user_errors(), _progress(main=os.environ.get("RANK", "0") == "0") as bar:
        task = bar.add_task("frames", total=None, rate="")

        def on_plan(plan) -> None:
            if plan.frames_done:
                console.print(f"Resuming: {plan.frames_done} frames already in the store, {plan.frames_to_do} to go.")
            console.print(
                f"{plan.frames_to_do:,} frames x K={plan.samples_per_frame} on {plan.device} ({plan.solver}; "
                + (f"{plan.sampler} sampler, {plan.frames_per_call} frames per call" if plan.sampler != "exact" else "exact sampler: lerobot's own, per frame")
                + f"; the teacher computes in {plan.compute_dtype}); threads: {plan.threads}"
            )
            bar.reset(task, total=plan.frames_to_do)  # the rate counts sampling time, as the summary does

        def on_batch(frames: int, pairs: int) -> None:
            elapsed = bar.tasks[task].elapsed or 1e-9
            bar.update(task, completed=frames, rate=f"{pairs / elapsed:,.1f} pairs/s")

        result = run_generate(cfg, progress=on_batch, on_plan=on_plan)
    if os.environ.get("RANK", "0") != "0":
        return
    table = Table(title=f"pair store {result.out}", show_header=False)
    table.add_row("pairs", f"{result.num_pairs:,} ({result.new_pairs:,} new)")
    table.add_row("frames", f"{result.num_frames:,}")
    table.add_row("speed", _speed(result.new_pairs, result.seconds))
    if result.skipped:
        table.add_row("skipped (non-finite)", ", ".join(map(str, result.skipped)))
    out_console.print(table)


def _speed(pairs: int, seconds: float) -> str:
    """``12.3 pairs/s over 4.0 s``, or seconds per pair when that reads better (under one pair a second)."""
    if pairs and seconds > pairs:
        return f"{seconds / pairs:,.1f} s/pair over {seconds:,.1f} s"
    rate = pairs / seconds if seconds > 0 else 0.0
    return f"{rate:,.1f} pairs/s over {seconds:,.1f} s"


@app.command()
def merge(
    slices: Annotated[list[Path], typer.Argument(help="Stores made with --partition i/P (same teacher, dataset and settings).")],
    out: Annotated[Path, typer.Option(help="New directory for the combined store.")],
) -> None:
    """Combine partition slices into one pair store (shards are copied; slices are left as they are)."""
    from reflowpairs.merge import merge_stores

    with user_errors():
        manifest = merge_stores(slices, out)
    state = "complete" if manifest["complete"] else f"INCOMPLETE ({manifest['num_frames']} of {manifest['generation']['num_frames']} frames)"
    out_console.print(f"merged {len(slices)} slices into {out}: {manifest['num_pairs']:,} pairs, {manifest['num_frames']:,} frames, {state}")


@app.command("tiny-world")
def tiny_world(
    out: Annotated[Path, typer.Argument(help="Directory to build the tiny VLM, dataset and teacher in.")],
    train_steps: Annotated[int, typer.Option(help="Teacher training steps.")] = 200,
) -> None:
    """Build the bundled tiny world offline: a SmolVLM dir, a LeRobotDataset and a trained SmolVLA teacher."""
    from reflowpairs.tinyworld import TinyTeacherSpec, build_tiny_world

    with user_errors():
        if (out / "teacher" / "config.json").exists():
            raise ReflowPairsError(f"{out} already holds a tiny world.", "Remove it or choose another directory.")
        with console.status("building the tiny world (VLM dir, dataset, teacher training)..."):
            world = build_tiny_world(out, teacher_spec=TinyTeacherSpec(train_steps=train_steps))
    table = Table(title="tiny world", show_header=False)
    table.add_row("VLM dir", str(world.vlm_dir))
    table.add_row("dataset", f"{world.repo_id} at {world.dataset_root}")
    table.add_row("teacher", str(world.teacher_dir))
    out_console.print(table)



# Commands that live in their own modules register themselves on `app` when imported.
from reflowpairs.cli import eval_cmd, store_cmds, train_cmd  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
