"""Typer app: parse options, call the library, render with rich. No logic of its own."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from reflowpairs.cli.options import (
    Command,
    Group,
    config_option,
    lerobot_names_text,
    resolved_options,
    write_options,
)
from reflowpairs.cli.progress import PROGRESS_ENV, make_progress
from reflowpairs.dataset import episodes_text  # noqa: F401 - re-exported for the command modules
from reflowpairs.errors import ReflowPairsError

ROOT_EPILOG = (
    "Workflow: tiny-world (a toy world to try it on) -> generate -> validate / inspect -> train -> eval; merge combines "
    "--partition slices. Progress: a bar on a terminal; with output to a file (a SLURM log) plain lines with done/total, "
    f"rate and ETA. {PROGRESS_ENV}=bar|lines|off overrides that choice."
)

app = typer.Typer(
    name="reflowpairs",
    cls=Group,
    help="Offline reflow for LeRobot flow-matching policies: generate teacher pairs once, train a 1-2 step student.",
    epilog=ROOT_EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out_console = Console()
_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug
    logging.getLogger("lerobot.utils.import_utils").setLevel(logging.CRITICAL)


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 shard``, ``2 shards``, ``1,024 frames``."""
    return f"{count:,} {word if count == 1 else (many or word + 's')}"


def parse_episodes(text: str | None) -> list[int] | None:
    """``"0,2,5"``, ``"0-3,7"`` or lerobot's ``"[0,1]"`` -> sorted episode list; None/empty -> None (all episodes)."""
    if not text:
        return None
    body = text.strip()
    bracketed = body.startswith("[") and body.endswith("]")
    if bracketed:
        body = body[1:-1]
    problem = f"{text!r} is not a list of episode numbers like 0,2,5, 0-3,7 or [0,1]"
    episodes: set[int] = set()
    try:
        for part in body.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise typer.BadParameter(f"{problem}: the range {part} is empty", param_hint="--episodes")
                episodes.update(range(lo, hi + 1))
            elif part:
                episodes.add(int(part))
    except ValueError:
        raise typer.BadParameter(problem, param_hint="--episodes") from None
    if not episodes:
        if bracketed:
            raise typer.BadParameter(
                f"{text!r} names no episodes; leave --episodes out to use all of them",
                param_hint="--episodes",
            )
        return None
    return sorted(episodes)


def check_at_least_one(value: int | None, name: str) -> None:
    """A usage error unless ``value`` is None or at least 1."""
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be at least 1, got {value}", param_hint=name)


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
        console.print(
            "[yellow]Interrupted.[/] Completed shards are saved; rerun the same command with --resume to finish."
        )
        raise typer.Exit(130) from None


def _progress(
    main: bool = True, prefix: str = "reflowpairs", every: int | None = None, cap: int | None = None
) -> Progress:
    """A rich bar on a terminal, plain progress lines (every ``every`` units; default: a tenth of the total, at most
    ``cap``) when stderr is a file; ``REFLOWPAIRS_PROGRESS`` overrides the choice (``reflowpairs.cli.progress``)."""
    return make_progress(console, prefix, main=main, every=every, cap=cap)


def print_next(*commands: list[str] | str, why: str | None = None) -> None:
    """``next: COMMAND`` (and ``then: COMMAND`` for more), each on one line so that it copies and pastes whole."""
    for i, command in enumerate(commands):
        text = command if isinstance(command, str) else shlex.join(command)
        out_console.print(
            f"{'next' if i == 0 else 'then'}: {text}",
            style="bold green" if i == 0 else None,
            markup=False,
            soft_wrap=True,
            highlight=False,
        )
    if why:
        out_console.print(f"      ({why})", markup=False, soft_wrap=True, highlight=False)


def train_command(store: Path, dataset_root: Path | None = None) -> list[str]:
    """``reflowpairs train --pairs STORE --out outputs/reflow/<store name>`` (a run directory to change at will)."""
    command = [
        "reflowpairs",
        "train",
        "--pairs",
        str(store),
        "--out",
        f"outputs/reflow/{Path(store).resolve().name}",
    ]
    if dataset_root is not None:
        command += ["--dataset-root", str(dataset_root)]
    return command


def save_options(path: Path, command: str, options: dict) -> None:
    """Write a run's options file (``--config`` repeats the run); a warning when a file of the user's is in the way."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        written = write_options(path, command, options)
    except OSError as err:
        console.print(
            f"[yellow]warning:[/] could not write {escape(str(path))} ({escape(err.strerror or str(err))}).",
            soft_wrap=True,
        )
        return
    if written is None:
        console.print(
            f"[yellow]warning:[/] {escape(str(path))} exists and was not written by reflowpairs: the run's "
            "options were not saved there.",
            soft_wrap=True,
        )


INPUTS, SAMPLING, OUTPUT, PERFORMANCE, MULTI, RUN = (
    "Inputs",
    "Sampling",
    "Output",
    "Performance",
    "Multi-process",
    "Options file and logs",
)
from reflowpairs.pairstore import GENERATE_OPTIONS  # noqa: E402


@app.command(
    cls=Command,
    epilog=lerobot_names_text("generate") + f" Each run writes its options to OUT/{GENERATE_OPTIONS}.",
)
def generate(
    ctx: typer.Context,
    *,
    teacher: Annotated[
        str,
        typer.Option(
            metavar="CKPT",
            rich_help_panel=INPUTS,
            help="Teacher checkpoint: a pretrained_model/ directory or a hub repo id.",
        ),
    ],
    dataset: Annotated[
        str, typer.Option(metavar="REPO_ID", rich_help_panel=INPUTS, help="LeRobotDataset repo id.")
    ],
    dataset_root: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR", rich_help_panel=INPUTS, help="Local root of the dataset (lerobot's root=)."
        ),
    ] = None,
    episodes: Annotated[
        str | None,
        typer.Option(
            metavar="LIST",
            rich_help_panel=INPUTS,
            help="Episodes to use, e.g. 0,2,5, 0-9 or [0,1] (default: all).",
        ),
    ] = None,
    samples_per_frame: Annotated[
        int, typer.Option(metavar="K", rich_help_panel=SAMPLING, help="K: noise samples (pairs) per frame.")
    ] = 4,
    num_steps: Annotated[
        int | None,
        typer.Option(
            metavar="N", rich_help_panel=SAMPLING, help="ODE steps (default: the teacher config's num_steps)."
        ),
    ] = None,
    solver: Annotated[
        str,
        typer.Option(
            metavar="NAME",
            rich_help_panel=SAMPLING,
            help="euler (the teacher's own), midpoint, rk4 or dopri5.",
        ),
    ] = "euler",
    rtol: Annotated[
        float, typer.Option(metavar="X", rich_help_panel=SAMPLING, help="dopri5 relative tolerance.")
    ] = 1e-5,
    atol: Annotated[
        float, typer.Option(metavar="X", rich_help_panel=SAMPLING, help="dopri5 absolute tolerance.")
    ] = 1e-5,
    seed: Annotated[
        int,
        typer.Option(metavar="N", rich_help_panel=SAMPLING, help="Seed of X_0 = f(seed, obs_index, sample)."),
    ] = 0,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact/--no-exact",
            rich_help_panel=SAMPLING,
            help="X_1 from lerobot's own predict_action_chunk per frame, bit for bit (no prefix sharing: slower).",
        ),
    ] = False,
    x0: Annotated[
        str,
        typer.Option(
            "--x0",
            metavar="explicit|implicit",
            rich_help_panel=OUTPUT,
            help="How the store keeps X_0: explicit (default) stores it in every shard; implicit leaves it out (~84% of a pair's bytes at SmolVLA's shapes), records its generator, and every reader regenerates it bit for bit from (seed, obs_index, sample). A resumed store keeps its own mode.",
        ),
    ] = "explicit",
    on_nonfinite: Annotated[
        str,
        typer.Option(
            metavar="WHAT", rich_help_panel=SAMPLING, help="error (stop) or skip (record and skip the frame)."
        ),
    ] = "error",
    out: Annotated[
        Path,
        typer.Option(metavar="DIR", rich_help_panel=OUTPUT, help="Directory of the pair store to write."),
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format", metavar="NAME", rich_help_panel=OUTPUT, help="Shard backend: zarr or parquet."
        ),
    ] = "zarr",
    shard_size: Annotated[
        int,
        typer.Option(metavar="N", rich_help_panel=OUTPUT, help="Pairs per shard (rounded to whole frames)."),
    ] = 4096,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume", rich_help_panel=OUTPUT, help="Finish an interrupted store in --out."
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite/--no-overwrite",
            rich_help_panel=OUTPUT,
            help="Replace the pair store in --out (only its manifest.json, shards/ and parts/), or write a new store into a non-empty folder that is not a store (its files are left alone).",
        ),
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            metavar="N", rich_help_panel=PERFORMANCE, help="Frames loaded per batch (each samples K pairs)."
        ),
    ] = 16,
    tokens_per_call: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            rich_help_panel=PERFORMANCE,
            help="Most suffix tokens (frames x K x chunk_size) per teacher call; 0: the whole batch (default: 1024 on CPU, no limit on GPU).",
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(metavar="DEVICE", rich_help_panel=PERFORMANCE, help="auto, cpu, cuda[:N] or mps.")
    ] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            metavar="DTYPE",
            rich_help_panel=PERFORMANCE,
            help="Teacher compute dtype: float32, bfloat16 or float16 (autocast; for CUDA).",
        ),
    ] = "float32",
    num_workers: Annotated[
        int, typer.Option(metavar="N", rich_help_panel=PERFORMANCE, help="DataLoader workers loading frames.")
    ] = 0,
    partition: Annotated[
        str | None,
        typer.Option(
            metavar="I/P",
            rich_help_panel=MULTI,
            help="Run one slice i/P of the frames (obs_index % P == i); combine slices with `reflowpairs merge`.",
        ),
    ] = None,
    log_every: Annotated[
        int | None,
        typer.Option(
            metavar="FRAMES",
            rich_help_panel=RUN,
            help="When the output is not a terminal (a SLURM log), a progress line every N frames (default: every 1,000 frames, or every tenth of the run if that is fewer).",
        ),
    ] = None,
    config: Annotated[Path | None, config_option(RUN)] = None,
) -> None:
    """Run the teacher's sampler over every frame and store (X_0, X_1, obs_index) pairs."""
    from reflowpairs.generate import GenerateConfig
    from reflowpairs.generate import generate as run_generate

    main = os.environ.get("RANK", "0") == "0"
    check_at_least_one(log_every, "--log-every")
    episode_list = parse_episodes(episodes)
    cfg = GenerateConfig(
        teacher=teacher,
        dataset=dataset,
        out=out,
        dataset_root=dataset_root,
        episodes=episode_list,
        samples_per_frame=samples_per_frame,
        num_steps=num_steps,
        solver=solver,
        rtol=rtol,
        atol=atol,
        batch_size=batch_size,
        tokens_per_call=tokens_per_call,
        shard_size=shard_size,
        seed=seed,
        device=device,
        backend=format,
        num_workers=num_workers,
        resume=resume,
        overwrite=overwrite,
        on_nonfinite=on_nonfinite,
        dtype=dtype,
        partition=parse_partition(partition),
        exact=exact,
        x0=x0,
    )
    options = resolved_options(
        ctx,
        skip=("resume", "overwrite"),
        values={"episodes": episodes_text(episode_list)},
        local_paths=("teacher",),
    )
    with user_errors(), _progress(main=main, prefix="generate", cap=1000) as bar:
        task = bar.add_task("frames", total=None, rate="", unit="frame", every=log_every)

        def on_plan(plan) -> None:
            if plan.frames_done:
                console.print(
                    f"Resuming: {plural(plan.frames_done, 'frame')} already in the store, {plan.frames_to_do:,} to go."
                )
            console.print(
                f"{plural(plan.frames_to_do, 'frame')} x K={plan.samples_per_frame} on {plan.device} ({plan.solver}; "
                + (
                    f"{plan.sampler} sampler, {plural(plan.frames_per_call, 'frame')} per call"
                    if plan.sampler != "exact"
                    else "exact sampler: lerobot's own, per frame"
                )
                + f"; the teacher computes in {plan.compute_dtype}); threads: {plan.threads}",
                soft_wrap=True,
            )
            if (
                main
            ):  # the store exists now (and this run holds its lock): its options go beside manifest.json
                save_options(out / GENERATE_OPTIONS, "generate", options)
            bar.reset(task, total=plan.frames_to_do)  # the rate counts sampling time, as the summary does

        def on_batch(frames: int, pairs: int, seconds: float) -> None:
            rate = pairs / max(seconds, 1e-9)  # the library's clock, as the summary's speed row
            bar.update(
                task,
                completed=frames,
                rate=f"{rate:,.1f} pairs/s",
                info=f"{plural(pairs, 'pair')}, {rate:,.1f} pairs/s",
            )

        result = run_generate(cfg, progress=on_batch, on_plan=on_plan)
    if not main:
        return
    table = Table(title=f"pair store {result.out}", show_header=False)
    table.add_row("pairs", f"{result.num_pairs:,} ({result.new_pairs:,} new)")
    table.add_row("frames", f"{result.num_frames:,}")
    table.add_row("speed", _speed(result.new_pairs, result.seconds))
    if result.skipped:
        table.add_row("skipped (non-finite)", ", ".join(map(str, result.skipped)))
    table.add_row("options", str(out / GENERATE_OPTIONS))
    out_console.print(table)
    if cfg.partition is not None:
        index, count = cfg.partition
        others = " ..." if count > 1 else ""
        print_next(
            f"reflowpairs merge {shlex.quote(str(out))}{others} --out MERGED_DIR",
            why=f"this is slice {index}/{count}: once all {plural(count, 'slice')} are done, merge their --out "
            "directories, then validate and train on the merged store",
        )
        return
    print_next(["reflowpairs", "validate", str(out), "--spot-check", "64"], train_command(out))


def _speed(pairs: int, seconds: float) -> str:
    """``12.3 pairs/s over 4.0 s``, or seconds per pair when that reads better (under one pair a second)."""
    if pairs and seconds > pairs:
        return f"{seconds / pairs:,.1f} s/pair over {seconds:,.1f} s"
    rate = pairs / seconds if seconds > 0 else 0.0
    return f"{rate:,.1f} pairs/s over {seconds:,.1f} s"


@app.command(cls=Command, epilog=lerobot_names_text("merge"))
def merge(
    slices: Annotated[
        list[Path],
        typer.Argument(
            metavar="SLICE", help="Stores made with --partition i/P (same teacher, dataset and settings)."
        ),
    ],
    out: Annotated[Path, typer.Option(metavar="DIR", help="New directory for the combined store.")],
) -> None:
    """Combine partition slices into one pair store (shards are copied; slices are left as they are)."""
    from reflowpairs.merge import merge_stores

    with user_errors():
        manifest = merge_stores(slices, out)
    state = (
        "complete"
        if manifest["complete"]
        else f"INCOMPLETE ({manifest['num_frames']:,} of {plural(manifest['generation']['num_frames'], 'frame')})"
    )
    out_console.print(
        f"merged {plural(len(slices), 'slice')} into {out}: {plural(manifest['num_pairs'], 'pair')}, "
        f"{plural(manifest['num_frames'], 'frame')}, {state}",
        markup=False,
        soft_wrap=True,
        highlight=False,
    )
    print_next(["reflowpairs", "validate", str(out)])


@app.command("tiny-world", cls=Command)
def tiny_world(
    out: Annotated[
        Path, typer.Argument(metavar="DIR", help="Directory to build the tiny VLM, dataset and teacher in.")
    ],
    train_steps: Annotated[int, typer.Option(metavar="N", help="Teacher training steps.")] = 200,
) -> None:
    """Build the bundled tiny world offline: a SmolVLM dir, a LeRobotDataset and a trained SmolVLA teacher."""
    from reflowpairs.tinyworld import TinyTeacherSpec, build_tiny_world

    with user_errors():
        if (out / "teacher" / "config.json").exists():
            raise ReflowPairsError(
                f"{out} already holds a tiny world.", "Remove it or choose another directory."
            )
        with console.status("building the tiny world (VLM dir, dataset, teacher training)..."):
            world = build_tiny_world(out, teacher_spec=TinyTeacherSpec(train_steps=train_steps))
    table = Table(title="tiny world", show_header=False)
    table.add_row("VLM dir", str(world.vlm_dir))
    table.add_row("dataset", f"{world.repo_id} at {world.dataset_root}")
    table.add_row("teacher", str(world.teacher_dir))
    out_console.print(table)
    print_next(
        [
            "reflowpairs",
            "generate",
            "--teacher",
            str(world.teacher_dir),
            "--dataset",
            world.repo_id,
            "--dataset-root",
            str(world.dataset_root),
            "--out",
            str(out / "pairs"),
        ]
    )


# Commands that live in their own modules register themselves on `app` when imported.
from reflowpairs.cli import eval_cmd, store_cmds, train_cmd  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
