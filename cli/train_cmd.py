"""``reflowpairs train``: stage 2, a student trained on stored pairs into an ordinary lerobot checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from reflowpairs.cli.lerobot_names import lerobot_names_text
from reflowpairs.cli.options import (
    INPUTS,
    OUTPUT,
    PERFORMANCE,
    RUN,
    TRAINING,
    allow_mismatch_option,
    batch_size_option,
    config_defaults,
    config_from_params,
    config_option,
    dataset_root_option,
    device_option,
    num_workers_option,
    out_option,
    resolved_options,
    resume_option,
    seed_option,
    tokenizer_option,
)
from reflowpairs.cli.ui import (
    check_at_least_one,
    console,
    out_console,
    plural,
    progress,
    save_options,
    user_errors,
)
from reflowpairs.errors import ReflowPairsError
from reflowpairs.launcher import is_main_process
from reflowpairs.options_file import TRAIN_OPTIONS
from reflowpairs.train.config import TrainConfig
from reflowpairs.wandb_log import wandb_settings

if TYPE_CHECKING:
    from reflowpairs.train.planning import TrainPlan

_DEFAULTS = config_defaults(TrainConfig)  # the options' defaults are the library config's
TRAIN_EPILOG = lerobot_names_text("train") + f" Each run writes its options to OUT/{TRAIN_OPTIONS}."
PROGRESS_EVERY = (
    100  # steps between progress lines by default (--log-every's own default, 1, would flood a log)
)


SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def trainable_text(plan: TrainPlan) -> str:
    """``"1,200 of 5,000 parameters (24.0%): 1,000 bf16 (fp32 master copies), 200 fp32"``."""
    share = plan.trainable_params / max(plan.total_params, 1)
    parts = []
    for dtype, count in sorted(plan.trainable_dtypes.items(), key=lambda item: -item[1]):
        low = dtype in ("bfloat16", "float16")
        parts.append(f"{count:,} {SHORT_DTYPES.get(dtype, dtype)}" + (" (fp32 master copies)" if low else ""))
    return f"{plan.trainable_params:,} of {plan.total_params:,} parameters ({share:.1%}): " + ", ".join(parts)


def num_steps_text(saved: int | None, teacher: int | None) -> str:
    """The student's saved num_steps next to the teacher's."""
    if saved == teacher:
        return f"{saved} (the teacher's)"
    return f"{saved} (teacher: {teacher})"


def _plan_table(plan: TrainPlan) -> Table:
    table = Table(title="reflowpairs train", show_header=False)
    start = f"resuming {plan.resumed_from} at step {plan.start_step}" if plan.resumed_from else "new run"
    table.add_row("student init", escape(str(plan.init)))
    processes = plan.processes
    batch = (
        f"batch {plan.batch_size}"
        if processes == 1
        else f"batch {plan.batch_size} x {processes} processes = {plan.batch_size * processes}"
    )
    table.add_row("run", f"{start}; {plural(plan.steps, 'step')}, {batch}, seed {plan.seed}")
    table.add_row("pairs", f"{plan.num_pairs:,} (window of {plural(plan.shuffle_window, 'shard')})")
    table.add_row("device", f"{plan.device} ({plan.precision})")
    table.add_row("threads", escape(str(plan.threads)))
    table.add_row("trainable", trainable_text(plan))
    table.add_row(
        "optimizer",
        f"{plan.optimizer} lr {plan.lr:g}, weight decay {plan.weight_decay:g}, grad clip {plan.grad_clip:g}",
    )
    if plan.scheduler is not None:
        preset = ""
        if plan.preset_decay_steps is not None and (plan.warmup_steps, plan.decay_steps) != (
            plan.preset_warmup_steps,
            plan.preset_decay_steps,
        ):
            preset = f" (preset: warmup {plan.preset_warmup_steps:,}, decay {plan.preset_decay_steps:,})"
        decay = (
            f", decay over {plural(plan.decay_steps, 'step')} to {plan.decay_lr:g}"
            if plan.decay_steps is not None and plan.decay_lr is not None
            else ""  # a scheduler without a decay length (multi_task_dit's diffusers cosine: the run's steps)
        )
        table.add_row(
            "schedule", f"{plan.scheduler}: warmup {plural(plan.warmup_steps or 0, 'step')}{decay}{preset}"
        )
    if plan.schedule_change is not None:
        table.add_row(
            "[yellow]schedule change[/]",
            escape(plan.schedule_change["text"]) + " (--allow-schedule-change)",
        )
    table.add_row("time sampling", str(plan.time_sampling))
    table.add_row("loss", str(plan.loss))
    table.add_row("saved num_steps", num_steps_text(plan.saved_num_steps, plan.teacher_num_steps))
    if (
        plan.feature_cache
    ):  # the store's feature cache (docs/feature-cache.md); --no-feature-cache turns it off
        cache = plan.feature_cache
        table.add_row(
            "feature cache", f"{cache['frames']:,} frames x {cache['bytes_per_frame']:,} B ({cache['dtype']})"
        )
    for warning in plan.warnings:
        table.add_row("[yellow]warning[/]", escape(warning))
    return table


def _resolved_settings(plan: TrainPlan) -> dict[str, Any]:
    """The data/optimiser settings the run uses (``reflowpairs.train.INHERITED``), for its options file: on resume
    the checkpoint's, else the plan's (defaults filled in; lr, warmup and grad clip stay None for the preset's)."""
    if plan.resumed_from:
        from reflowpairs.checkpoint import read_state  # imports torch and lerobot: not for --help

        return dict(read_state(Path(plan.resumed_from))["settings"])
    return {
        name: getattr(plan, name)
        for name in ("batch_size", "seed", "time_sampling", "shuffle_window", "student_num_steps", "loss")
    }


def train(
    ctx: typer.Context,
    *,
    pairs: Annotated[
        Path,
        typer.Option(
            metavar="DIR", rich_help_panel=INPUTS, help="Pair store written by `reflowpairs generate`."
        ),
    ],
    init: Annotated[
        str | None,
        typer.Option(
            metavar="CKPT",
            rich_help_panel=INPUTS,
            help="Student init checkpoint (default: the teacher the store's manifest names).",
        ),
    ] = _DEFAULTS.init,
    dataset_root: Annotated[
        Path | None, dataset_root_option("Where the dataset is (default: the root the manifest records).")
    ] = _DEFAULTS.dataset_root,
    allow_mismatch: Annotated[
        bool,
        allow_mismatch_option(
            "Train even if the init checkpoint or dataset differ from the store's fingerprints."
        ),
    ] = _DEFAULTS.allow_mismatch,
    no_feature_cache: Annotated[
        bool,
        typer.Option(
            "--no-feature-cache",
            rich_help_panel=INPUTS,
            help="Decode images and run the vision encoder even when the store has a feature cache (docs/feature-cache.md).",
        ),
    ] = _DEFAULTS.no_feature_cache,
    steps: Annotated[
        int,
        typer.Option(
            metavar="N",
            rich_help_panel=TRAINING,
            help="Optimiser steps in all (a resumed run continues up to this).",
        ),
    ] = _DEFAULTS.steps,
    batch_size: Annotated[
        int | None, batch_size_option("Pairs per step (default: 32; on --resume: the run's).", TRAINING)
    ] = _DEFAULTS.batch_size,
    lr: Annotated[
        float | None,
        typer.Option(
            metavar="X",
            rich_help_panel=TRAINING,
            help="Peak learning rate (default: the policy preset's optimizer_lr).",
        ),
    ] = _DEFAULTS.lr,
    warmup_steps: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            rich_help_panel=TRAINING,
            help="Warmup steps, taken as is (default: the preset's, rescaled as lerobot does for short runs).",
        ),
    ] = _DEFAULTS.warmup_steps,
    grad_clip: Annotated[
        float | None,
        typer.Option(
            metavar="X",
            rich_help_panel=TRAINING,
            help="Gradient clipping norm (default: the preset's grad_clip_norm).",
        ),
    ] = _DEFAULTS.grad_clip,
    seed: Annotated[
        int | None, seed_option("Seed of data order, times and init RNG (default: 0).", TRAINING)
    ] = _DEFAULTS.seed,
    time_sampling: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            rich_help_panel=TRAINING,
            help="beta (lerobot's), uniform, u-shaped, logit-normal, or noise-end (t = 1 only: one-step "
            "distillation of the pairs) (default: beta).",
        ),
    ] = _DEFAULTS.time_sampling,
    loss: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            rich_help_panel=TRAINING,
            help="mse (lerobot's) or pseudo-huber (rectified flow++) (default: mse).",
        ),
    ] = _DEFAULTS.loss,
    shuffle_window: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            rich_help_panel=TRAINING,
            help="Shards shuffled together (and cached per worker) (default: 4).",
        ),
    ] = _DEFAULTS.shuffle_window,
    out: Annotated[
        Path,
        out_option(
            f"Run directory: checkpoints/<step>/pretrained_model, checkpoints/last, train_log.jsonl, {TRAIN_OPTIONS}."
        ),
    ],
    save_every: Annotated[
        int,
        typer.Option(
            metavar="N",
            rich_help_panel=OUTPUT,
            help="Save a checkpoint every N steps (and always at the end).",
        ),
    ] = _DEFAULTS.save_every,
    student_num_steps: Annotated[
        str | None,
        typer.Option(
            metavar="K",
            rich_help_panel=OUTPUT,
            help="The saved student's num_steps (its default step count in lerobot-eval): K, or 'teacher' to keep the teacher's (default: 1; on --resume: the run's).",
        ),
    ] = _DEFAULTS.student_num_steps,
    resume: Annotated[
        bool, resume_option("Continue the run in --out from checkpoints/last.")
    ] = _DEFAULTS.resume,
    allow_schedule_change: Annotated[
        bool,
        typer.Option(
            "--allow-schedule-change/--no-allow-schedule-change",
            rich_help_panel=OUTPUT,
            help="On --resume, accept a --steps that changes the lr schedule mid-run.",
        ),
    ] = _DEFAULTS.allow_schedule_change,
    tokenizer: Annotated[str | None, tokenizer_option(PERFORMANCE)] = None,
    device: Annotated[str, device_option()] = _DEFAULTS.device,
    precision: Annotated[
        str,
        typer.Option(
            metavar="NAME",
            rich_help_panel=PERFORMANCE,
            help="auto (bfloat16 autocast on CUDA, float32 elsewhere), float32 or bfloat16.",
        ),
    ] = _DEFAULTS.precision,
    num_workers: Annotated[
        int, num_workers_option("DataLoader workers loading pairs and observations.")
    ] = _DEFAULTS.num_workers,
    log_every: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            rich_help_panel=RUN,
            help=f"A train_log.jsonl line (and W&B point) every N steps, and a progress line every N steps when the output is not a terminal (default: log every step, a progress line every {PROGRESS_EVERY} steps or every tenth of the run if that is fewer).",
        ),
    ] = None,
    wandb: Annotated[
        bool,
        typer.Option(
            "--wandb/--no-wandb",
            rich_help_panel=RUN,
            help="Log loss, lr and grad_norm to Weights & Biases (needs pip install 'reflowpairs\\[wandb]').",
        ),
    ] = False,
    wandb_project: Annotated[
        str | None,
        typer.Option(metavar="NAME", rich_help_panel=RUN, help="W&B project (default: reflowpairs)."),
    ] = None,
    wandb_entity: Annotated[
        str | None,
        typer.Option(metavar="NAME", rich_help_panel=RUN, help="W&B entity (user or team; default: yours)."),
    ] = None,
    wandb_mode: Annotated[
        str | None,
        typer.Option(
            metavar="MODE",
            rich_help_panel=RUN,
            help="online, offline or disabled (default: WANDB_MODE, else online).",
        ),
    ] = None,
    wandb_notes: Annotated[
        str | None, typer.Option(metavar="TEXT", rich_help_panel=RUN, help="Notes for the W&B run.")
    ] = None,
    config: Annotated[Path | None, config_option(RUN)] = None,
) -> None:
    """Train a 1-2 step student on stored pairs (no teacher in memory); saves ordinary lerobot checkpoints."""
    from reflowpairs.train.config import (
        parse_student_num_steps,
    )  # reflowpairs.train imports torch: not for --help

    main_process = is_main_process()  # under torchrun/accelerate only rank 0 reports
    check_at_least_one(log_every, "--log-every")
    options = resolved_options(ctx, skip=("resume",), local_paths=("init",))
    wandb_cfg = (
        _wandb_config(ctx, wandb, wandb_project, wandb_entity, wandb_mode, wandb_notes)
        if main_process
        else None
    )
    with user_errors(), progress(main=main_process, prefix="train", cap=PROGRESS_EVERY) as bar:
        cfg = config_from_params(
            TrainConfig,
            ctx,
            log_every=log_every or 1,
            student_num_steps=parse_student_num_steps(student_num_steps),
            threads="auto",  # the command line plans CPU threads around the workers (reflowpairs.threads)
            wandb_config=wandb_cfg,
        )
        result = _TrainDisplay(bar, main_process, options, log_every, cfg).train(cfg)
    if main_process:
        _print_result(result)


class _TrainDisplay:
    """What ``train`` shows while the library trains: the plan table and options file once the plan is known (and
    the W&B run, with --wandb), a bar (or progress lines) over the steps, and a short note on Ctrl-C."""

    def __init__(self, bar, main_process: bool, options: dict[str, Any], log_every, cfg: TrainConfig):
        self.bar, self.main_process, self.options, self.log_every = bar, main_process, options, log_every
        self.out, self.steps = Path(cfg.out), cfg.steps
        self.task = bar.add_task("loading", total=None, rate="", unit=None, every=None)
        self.first_step = 0
        self.wandb_options: dict[
            str, Any
        ] = {}  # the W&B run's recorded options: filled in on_plan, read after it

    def train(self, cfg: TrainConfig):
        """``reflowpairs.train.train(cfg)`` with this display; exit 130 on Ctrl-C (the last checkpoint named)."""
        from reflowpairs.train.config import TrainingInterrupted  # imports torch: not for --help
        from reflowpairs.train.loop import train as run_train

        try:
            return run_train(
                cfg,
                progress=self.on_step,
                on_plan=self.on_plan,
                wandb_options=self.wandb_options,
                on_wandb_run=self.on_wandb_run,
            )
        except TrainingInterrupted as stop:
            self.bar.stop()
            if stop.checkpoint is None:
                where = "; no checkpoint had been written yet"
            else:
                where = f"; the last checkpoint is {stop.checkpoint} (step {stop.saved_step})"
            console.print(
                f"[yellow]Interrupted[/] at step {stop.step}{escape(where)}. "
                "Rerun the same command with --resume to continue.",
                soft_wrap=True,
            )
            raise typer.Exit(130) from None

    def on_plan(self, plan: TrainPlan) -> None:
        self.first_step = plan.start_step
        if self.main_process:
            self.bar.console.print(_plan_table(plan))
            run_options = dict(self.options)
            for name, value in _resolved_settings(plan).items():
                key = name.replace("_", "-")
                if key in run_options and run_options[key] is None:
                    run_options[key] = str(value) if name == "student_num_steps" else value
            out = self.out
            save_options(out / TRAIN_OPTIONS, "train", run_options)
            self.wandb_options.update(run_options)
        self.bar.reset(
            self.task,
            total=self.steps,
            completed=plan.start_step,
            rate="",
            description="steps",
            unit="step",
            every=self.log_every,
        )

    def on_step(self, step: int, total: int, loss: float) -> None:
        elapsed = self.bar.tasks[self.task].elapsed or 1e-9
        rate = (step - self.first_step) / elapsed
        self.bar.update(
            self.task, completed=step, rate=f"loss {loss:.4f}  {rate:.2f} steps/s", info=f"loss {loss:.4f}"
        )

    def on_wandb_run(self, where: str) -> None:
        self.bar.console.print(f"W&B run: {escape(where)}", soft_wrap=True)


def _print_result(result) -> None:
    """The finished run's table, then the commands that use its student."""
    table = Table(title=f"student {result.out}", show_header=False)
    table.add_row(
        "steps", f"{result.start_step:,} -> {result.step:,} ({result.steps_per_second:.2f} steps/s)"
    )
    table.add_row("final loss", f"{result.final_loss:.5f}")
    table.add_row("checkpoint", str(result.checkpoint / "pretrained_model"))
    table.add_row(
        "saved num_steps",
        num_steps_text(result.saved_num_steps, result.teacher_num_steps)
        + ": lerobot-eval and predict_action_chunk sample with this many steps",
    )
    table.add_row("log", str(result.out / "train_log.jsonl"))
    table.add_row("options", str(result.out / TRAIN_OPTIONS))
    if result.wandb_run is not None:
        table.add_row("W&B run", escape(result.wandb_run))
    out_console.print(table)
    from reflowpairs.train.next_commands import next_commands  # imports torch: not for --help

    commands = next_commands(result)
    out_console.print(f"use it: {escape(commands['lerobot_eval'])}", soft_wrap=True)
    out_console.print(f"next: {escape(commands['reflowpairs_eval'])}", soft_wrap=True)


def _from_command_line(ctx: typer.Context, option: str) -> bool:
    source = ctx.get_parameter_source(option.removeprefix("--").replace("-", "_"))
    return source is not None and source.name == "COMMANDLINE"


def _wandb_config(
    ctx: typer.Context,
    enable: bool,
    project: str | None,
    entity: str | None,
    mode: str | None,
    notes: str | None,
):
    """lerobot's ``WandBConfig`` for ``--wandb ...`` (None without --wandb); refuses a missing wandb package or a bad
    mode before any work, and --wandb-* options on the command line without --wandb (an options file may hold them
    with ``wandb: false``)."""
    given = [
        name
        for name, value in (
            ("--wandb-project", project),
            ("--wandb-entity", entity),
            ("--wandb-mode", mode),
            ("--wandb-notes", notes),
        )
        if value is not None and _from_command_line(ctx, name)
    ]
    with user_errors():
        if not enable:
            if given:
                raise ReflowPairsError(
                    f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for W&B logging, which is off.",
                    "Add --wandb (lerobot: --wandb.enable=true), or drop them.",
                )
            return None
        return wandb_settings(project, entity, mode, notes)
