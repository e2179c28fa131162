"""``reflowpairs pipeline``: R rounds of generate -> validate -> train -> eval (and a distillation), resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from reflowpairs.cli.eval_tables import StageBar, closed_loop_tables, comparison_tables
from reflowpairs.cli.options import (
    EVALUATION,
    RECIPE,
    async_envs_option,
    batch_size_option,
    config_defaults,
    config_from_params,
    dataset_option,
    dataset_root_option,
    device_option,
    env_batch_size_option,
    env_episodes_option,
    env_fields_option,
    episodes_option,
    num_workers_option,
    out_option,
    parse_env_options,
    samples_per_frame_option,
    seed_option,
    teacher_option,
)
from reflowpairs.cli.ui import console, out_console, parse_episodes, print_next, progress, user_errors
from reflowpairs.pipeline_config import PIPELINE_STATE, PipelineConfig

_DEFAULTS = config_defaults(PipelineConfig)  # the options' defaults are the library config's


def pipeline(
    ctx: typer.Context,
    *,
    teacher: Annotated[str, teacher_option("The round-1 teacher checkpoint.")],
    dataset: Annotated[str, dataset_option()],
    dataset_root: Annotated[
        Path | None, dataset_root_option("Local root of the dataset.")
    ] = _DEFAULTS.dataset_root,
    episodes: Annotated[str | None, episodes_option("Episodes the pairs are made on (default: all).")] = None,
    out: Annotated[Path, out_option(f"Folder of every artefact and {PIPELINE_STATE}.")],
    rounds: Annotated[
        int,
        typer.Option(
            metavar="R", rich_help_panel=RECIPE, help="Reflow rounds (each student teaches the next)."
        ),
    ] = _DEFAULTS.rounds,
    distill: Annotated[
        bool,
        typer.Option(
            "--distill/--no-distill",
            rich_help_panel=RECIPE,
            help="Finish with a distillation: the 1-step map fitted on the last round's pairs.",
        ),
    ] = _DEFAULTS.distill,
    samples_per_frame: Annotated[
        int, samples_per_frame_option("Noises per frame in each round's store.", RECIPE)
    ] = _DEFAULTS.samples_per_frame,
    num_steps: Annotated[
        int | None,
        typer.Option(metavar="N", rich_help_panel=RECIPE, help="Teacher ODE steps (default: its config's)."),
    ] = _DEFAULTS.num_steps,
    train_steps: Annotated[
        int, typer.Option(metavar="N", rich_help_panel=RECIPE, help="Training steps per round.")
    ] = _DEFAULTS.train_steps,
    distill_steps: Annotated[
        int | None,
        typer.Option(
            metavar="N", rich_help_panel=RECIPE, help="Distillation steps (default: --train-steps)."
        ),
    ] = _DEFAULTS.distill_steps,
    batch_size: Annotated[
        int | None, batch_size_option("Training batch size.", RECIPE)
    ] = _DEFAULTS.batch_size,
    lr: Annotated[
        float | None,
        typer.Option(
            metavar="X", rich_help_panel=RECIPE, help="Learning rate (default: the policy preset's)."
        ),
    ] = _DEFAULTS.lr,
    loss: Annotated[
        str, typer.Option(metavar="NAME", rich_help_panel=RECIPE, help="Training loss: mse or pseudo-huber.")
    ] = _DEFAULTS.loss,
    seed: Annotated[int, seed_option("Seed of every stage.", RECIPE)] = _DEFAULTS.seed,
    spot_check: Annotated[
        int, typer.Option(metavar="N", rich_help_panel=EVALUATION, help="Pairs re-sampled by each validate.")
    ] = _DEFAULTS.spot_check,
    eval_num_steps: Annotated[
        str,
        typer.Option(metavar="LIST", rich_help_panel=EVALUATION, help="Step counts compared, e.g. 1,2,4,10."),
    ] = ",".join(map(str, _DEFAULTS.eval_num_steps)),
    eval_episodes: Annotated[
        str | None,
        typer.Option(
            metavar="LIST",
            rich_help_panel=EVALUATION,
            help="Episodes scored (default: those the pairs do not cover).",
        ),
    ] = None,
    eval_max_frames: Annotated[
        int, typer.Option(metavar="N", rich_help_panel=EVALUATION, help="Frames scored per model.")
    ] = _DEFAULTS.eval_max_frames,
    device: Annotated[str, device_option()] = _DEFAULTS.device,
    num_workers: Annotated[int, num_workers_option("Training data loader workers.")] = _DEFAULTS.num_workers,
    env_option: Annotated[
        list[str] | None,
        env_fields_option(
            "lerobot's --env.FIELD VALUE, e.g. --env.type pusht: also evaluate every student (at the eval step "
            "counts) and the teacher (at 1 step and its full count) in closed loop in that env, into OUT/closed_loop."
        ),
    ] = None,
    env_episodes: Annotated[
        int, env_episodes_option("--env-episodes", "Episodes per model and step count.")
    ] = _DEFAULTS.env_episodes,
    env_batch_size: Annotated[int, env_batch_size_option("--env-batch-size")] = _DEFAULTS.env_batch_size,
    env_use_async_envs: Annotated[
        bool, async_envs_option("env-use-async-envs")
    ] = _DEFAULTS.env_use_async_envs,
) -> None:
    """Run rectified flow's recipe in one command: R reflow rounds (+ distillation), resumable, one summary."""
    from reflowpairs.eval.config import parse_num_steps  # reflowpairs.evaluate imports torch: not for --help
    from reflowpairs.pipeline import run_pipeline  # the stages import torch and lerobot: not for --help

    env_type, env_options = parse_env_options(env_option)
    with user_errors():
        cfg = config_from_params(
            PipelineConfig,
            ctx,
            episodes=parse_episodes(episodes),
            eval_num_steps=parse_num_steps(eval_num_steps, "eval_num_steps"),
            eval_episodes=parse_episodes(eval_episodes),
            env_type=env_type,
            env_options=env_options,
            threads="auto",  # as `generate` and `train` on the command line
        )

        def on_stage(name: str, skipped: bool) -> None:
            console.print(f"[dim]{name}: finished before, skipped[/]" if skipped else f"[bold]{name}[/]")

        with progress(prefix="pipeline") as bar:
            result = run_pipeline(cfg, progress=StageBar(bar), on_stage=on_stage)
    for table in comparison_tables(result.comparison):
        out_console.print(table)
    if result.feature_cache:  # what each generate/train stage did with the feature cache
        cache = Table(title="feature cache", title_justify="left")
        cache.add_column("stage")
        cache.add_column("feature cache")
        for stage, how in result.feature_cache.items():
            cache.add_row(stage, how)
        out_console.print(cache)
    out_console.print(
        f"comparison: {result.out / 'comparison' / 'comparison.md'}", markup=False, soft_wrap=True
    )
    if result.closed_loop is not None:
        for table in closed_loop_tables(result.closed_loop):
            out_console.print(table)
        out_console.print(
            f"closed loop: {result.out / 'closed_loop' / 'closed_loop.md'}", markup=False, soft_wrap=True
        )
    out_console.print(f"state: {result.out / PIPELINE_STATE}", markup=False, soft_wrap=True)
    print_next(result.next_command)
