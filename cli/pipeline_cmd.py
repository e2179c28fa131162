"""``reflowpairs pipeline``: R rounds of generate -> validate -> train -> eval (and a distillation), resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from reflowpairs.cli.eval_cmd import (
    ENV_OPTION,
    EnvCommand,
    StageBar,
    closed_loop_tables,
    comparison_tables,
    parse_env_options,
)
from reflowpairs.cli.options import config_defaults
from reflowpairs.cli.ui import (
    INPUTS,
    OUTPUT,
    PERFORMANCE,
    console,
    out_console,
    parse_episodes,
    progress,
    user_errors,
)
from reflowpairs.pipeline import PIPELINE_STATE, PipelineConfig

_DEFAULTS = config_defaults(PipelineConfig)  # the options' defaults are the library config's
RECIPE = "Recipe"
EVAL = "Evaluation"
CLOSED_LOOP = "Closed loop (--env.type)"


class PipelineCommand(EnvCommand):
    """``pipeline`` takes lerobot-eval's ``--env.FIELD VALUE`` and ``--eval.*`` names for its closed-loop options."""

    EVAL_ALIASES = {
        "--eval.n_episodes": "--env-episodes",
        "--eval.batch_size": "--env-batch-size",
        "--eval.use_async_envs": "--env-use-async-envs",
    }


def pipeline(
    *,
    teacher: Annotated[
        str, typer.Option(metavar="CKPT", rich_help_panel=INPUTS, help="The round-1 teacher checkpoint.")
    ],
    dataset: Annotated[
        str, typer.Option(metavar="REPO_ID", rich_help_panel=INPUTS, help="LeRobotDataset repo id.")
    ],
    dataset_root: Annotated[
        Path | None, typer.Option(metavar="DIR", rich_help_panel=INPUTS, help="Local root of the dataset.")
    ] = _DEFAULTS.dataset_root,
    episodes: Annotated[
        str | None,
        typer.Option(
            metavar="LIST", rich_help_panel=INPUTS, help="Episodes the pairs are made on (default: all)."
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            metavar="DIR", rich_help_panel=OUTPUT, help=f"Folder of every artefact and {PIPELINE_STATE}."
        ),
    ],
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
        int, typer.Option(metavar="K", rich_help_panel=RECIPE, help="Noises per frame in each round's store.")
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
        int | None, typer.Option(metavar="N", rich_help_panel=RECIPE, help="Training batch size.")
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
    seed: Annotated[int, typer.Option(metavar="N", rich_help_panel=RECIPE, help="Seed of every stage.")] = (
        _DEFAULTS.seed
    ),
    spot_check: Annotated[
        int, typer.Option(metavar="N", rich_help_panel=EVAL, help="Pairs re-sampled by each validate.")
    ] = _DEFAULTS.spot_check,
    eval_num_steps: Annotated[
        str, typer.Option(metavar="LIST", rich_help_panel=EVAL, help="Step counts compared, e.g. 1,2,4,10.")
    ] = ",".join(map(str, _DEFAULTS.eval_num_steps)),
    eval_episodes: Annotated[
        str | None,
        typer.Option(
            metavar="LIST",
            rich_help_panel=EVAL,
            help="Episodes scored (default: those the pairs do not cover).",
        ),
    ] = None,
    eval_max_frames: Annotated[
        int, typer.Option(metavar="N", rich_help_panel=EVAL, help="Frames scored per model.")
    ] = _DEFAULTS.eval_max_frames,
    device: Annotated[
        str, typer.Option(metavar="DEVICE", rich_help_panel=PERFORMANCE, help="auto, cpu, cuda[:N] or mps.")
    ] = _DEFAULTS.device,
    num_workers: Annotated[
        int, typer.Option(metavar="N", rich_help_panel=PERFORMANCE, help="Training data loader workers.")
    ] = _DEFAULTS.num_workers,
    env_option: Annotated[
        list[str] | None,
        typer.Option(
            ENV_OPTION,
            metavar="FIELD=VALUE",
            rich_help_panel=CLOSED_LOOP,
            help="lerobot's --env.FIELD VALUE, e.g. --env.type pusht: also evaluate every student (at the eval step "
            "counts) and the teacher (at 1 step and its full count) in closed loop in that env, into OUT/closed_loop.",
        ),
    ] = None,
    env_episodes: Annotated[
        int, typer.Option(metavar="N", rich_help_panel=CLOSED_LOOP, help="Episodes per model and step count.")
    ] = _DEFAULTS.env_episodes,
    env_batch_size: Annotated[
        int,
        typer.Option(
            metavar="N", rich_help_panel=CLOSED_LOOP, help="Envs run in parallel (--eval.batch_size)."
        ),
    ] = _DEFAULTS.env_batch_size,
    env_use_async_envs: Annotated[
        bool,
        typer.Option(
            "--env-use-async-envs/--no-env-use-async-envs",
            rich_help_panel=CLOSED_LOOP,
            help="Run the envs in subprocesses (--eval.use_async_envs).",
        ),
    ] = _DEFAULTS.env_use_async_envs,
) -> None:
    """Run rectified flow's recipe in one command: R reflow rounds (+ distillation), resumable, one summary."""
    from reflowpairs.evaluate import parse_num_steps
    from reflowpairs.pipeline import run_pipeline

    env_type, env_options = parse_env_options(env_option)
    with user_errors():
        cfg = PipelineConfig(
            teacher=teacher,
            dataset=dataset,
            out=out,
            dataset_root=dataset_root,
            episodes=parse_episodes(episodes),
            rounds=rounds,
            distill=distill,
            samples_per_frame=samples_per_frame,
            num_steps=num_steps,
            train_steps=train_steps,
            distill_steps=distill_steps,
            batch_size=batch_size,
            lr=lr,
            loss=loss,
            spot_check=spot_check,
            eval_num_steps=parse_num_steps(eval_num_steps, "eval_num_steps"),
            eval_episodes=parse_episodes(eval_episodes),
            eval_max_frames=eval_max_frames,
            seed=seed,
            device=device,
            num_workers=num_workers,
            env_type=env_type,
            env_options=env_options,
            env_episodes=env_episodes,
            env_batch_size=env_batch_size,
            env_use_async_envs=env_use_async_envs,
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
