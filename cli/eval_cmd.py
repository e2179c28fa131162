"""``reflowpairs eval``: teacher vs student at each step count, as a rich table and report files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from reflowpairs.cli.eval_tables import (
    StageBar,
    closed_loop_tables,
    comparison_tables,
    pairs_table,
    report_table,
)
from reflowpairs.cli.lerobot_names import lerobot_names_text
from reflowpairs.cli.options import (
    INPUTS,
    MEASURE,
    PERFORMANCE,
    RUN,
    allow_mismatch_option,
    async_envs_option,
    batch_size_option,
    config_defaults,
    config_from_params,
    config_option,
    dataset_option,
    dataset_root_option,
    device_option,
    env_batch_size_option,
    env_episodes_option,
    env_fields_option,
    episodes_option,
    out_option,
    parse_env_options,
    resolved_options,
    samples_per_frame_option,
    seed_option,
    teacher_option,
    tokenizer_option,
)
from reflowpairs.cli.ui import (
    console,
    out_console,
    parse_episodes,
    progress,
    save_options,
    user_errors,
)
from reflowpairs.dataset import episodes_text
from reflowpairs.eval.closed_loop_report import write_closed_loop_report
from reflowpairs.eval.config import ClosedLoopConfig, EvalConfig
from reflowpairs.eval.report import frames_text, headline_text, next_text, report_notes, write_report
from reflowpairs.options_file import EVAL_OPTIONS

_DEFAULTS = config_defaults(EvalConfig)  # the options' defaults are the library config's
_CLOSED = config_defaults(ClosedLoopConfig)
EVAL_EPILOG = (
    lerobot_names_text("eval")
    + " Closed loop: --env.type NAME (any env lerobot knows, plugins included) and lerobot's --env.FIELD VALUE, "
    "--eval.n_episodes, --eval.batch_size and --eval.use_async_envs."
    + f" Each run writes its options to OUT/{EVAL_OPTIONS}."
)


def parse_students(given: list[str]) -> dict[str, str]:
    """``--student`` values -> label: checkpoint. ``LABEL=CKPT`` names a student; unnamed ones are ``student`` (one)
    or ``student1``, ``student2``... Labels become folder names: letters, digits, ``-``, ``_`` and ``.`` only."""
    students: dict[str, str] = {}
    for i, text in enumerate(given, start=1):
        label, sep, source = text.partition("=")
        if not sep:
            label, source = ("student" if len(given) == 1 else f"student{i}"), text
        if (
            not label
            or label == "teacher"
            or not all(c.isalnum() or c in "-_." for c in label)
            or label[0] == "."
        ):
            raise typer.BadParameter(
                f"{label!r} cannot label a student (letters, digits, - _ . only; not 'teacher')",
                param_hint="--student",
            )
        if label in students:
            raise typer.BadParameter(f"the label {label!r} is given twice", param_hint="--student")
        students[label] = source
    return students


def _local(source: str) -> str:
    """``source`` made absolute when it is a local path (a hub repo id stays as it is)."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _compare_students(cfg, students: dict[str, str], options: dict[str, Any]) -> None:
    """``eval`` with several students: each evaluated into OUT/LABEL/, then one comparison in OUT."""
    from reflowpairs.eval.compare import evaluate_students  # imports torch and lerobot: not for --help

    with progress(prefix="eval") as bar:
        bar.live.transient = True
        stage_bar = StageBar(bar)
        comparison, files = evaluate_students(
            cfg, students, progress=stage_bar, on_student=lambda label, _: console.print(f"[bold]{label}[/]")
        )
    save_options(Path(cfg.out) / EVAL_OPTIONS, "eval", options)
    for table in comparison_tables(comparison):
        out_console.print(table)
    out_console.print(
        f"comparison: {files['json']}\ntable:      {files['markdown']}\nplot:       {files['plot']}",
        markup=False,
        soft_wrap=True,
    )


def eval_command(
    ctx: typer.Context,
    *,
    student: Annotated[
        list[str] | None,
        typer.Option(
            metavar="[LABEL=]CKPT",
            rich_help_panel=INPUTS,
            help="Student checkpoint: a pretrained_model/ directory or a hub repo id. Repeat it to compare several "
            "students (LABEL=CKPT names one): each gets its report in OUT/LABEL/, and OUT/comparison.json, .md and "
            ".png put them side by side.",
        ),
    ] = None,
    teacher: Annotated[str, teacher_option("Teacher checkpoint; its full-step sample is the reference.")],
    dataset: Annotated[
        str | None, dataset_option("LeRobotDataset repo id (open loop; not with --env.type).")
    ] = None,
    dataset_root: Annotated[Path | None, dataset_root_option()] = _DEFAULTS.dataset_root,
    episodes: Annotated[
        str | None,
        episodes_option(
            "Episodes to evaluate on, e.g. 8,9, 8-9 or [8,9] (default: every episode the student did not train on)."
        ),
    ] = _DEFAULTS.episodes,
    pairs: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            rich_help_panel=INPUTS,
            help="Pair store the student trained on: also report its error there.",
        ),
    ] = _DEFAULTS.pairs,
    allow_mismatch: Annotated[
        bool,
        allow_mismatch_option("Compare with a teacher the student was not trained from (report labelled)."),
    ] = _DEFAULTS.allow_mismatch,
    include_training_frames: Annotated[
        bool,
        typer.Option(
            "--include-training-frames/--no-include-training-frames",
            rich_help_panel=INPUTS,
            help="Allow episodes the student trained on (report labelled).",
        ),
    ] = _DEFAULTS.include_training_frames,
    num_steps: Annotated[
        str,
        typer.Option(metavar="LIST", rich_help_panel=MEASURE, help="Step counts to compare, e.g. 1,2,4,10."),
    ] = ",".join(map(str, _DEFAULTS.num_steps)),
    max_frames: Annotated[
        int,
        typer.Option(
            metavar="N",
            rich_help_panel=MEASURE,
            help="Frames to evaluate (evenly spread); also the store frames with --pairs.",
        ),
    ] = _DEFAULTS.max_frames,
    samples_per_frame: Annotated[
        int, samples_per_frame_option("K: noises per frame.", MEASURE)
    ] = _DEFAULTS.samples_per_frame,
    seed: Annotated[
        int, seed_option("Seed of the noises X_0 = f(seed, obs_index, sample).", MEASURE)
    ] = _DEFAULTS.seed,
    latency_repeats: Annotated[
        int,
        typer.Option(
            metavar="N",
            rich_help_panel=MEASURE,
            help="Timed calls per latency figure (median, after one warm-up).",
        ),
    ] = _DEFAULTS.latency_repeats,
    out: Annotated[
        Path, out_option(f"Directory for report.json, report.md, steps_vs_error.png and {EVAL_OPTIONS}.")
    ],
    tokenizer: Annotated[str | None, tokenizer_option(PERFORMANCE)] = None,
    device: Annotated[str, device_option()] = _DEFAULTS.device,
    batch_size: Annotated[int, batch_size_option("Frames per sampling call.")] = _DEFAULTS.batch_size,
    env_option: Annotated[
        list[str] | None,
        env_fields_option(
            "lerobot's --env.FIELD VALUE, e.g. --env.type pusht --env.episode_length 100: evaluate in closed "
            "loop, in that env (lerobot's rollout), instead of on dataset frames."
        ),
    ] = None,
    n_episodes: Annotated[
        int, env_episodes_option("--n-episodes", "Episodes per model and step count (same seeds in all).")
    ] = _CLOSED.n_episodes,
    eval_batch_size: Annotated[int, env_batch_size_option("--eval-batch-size")] = _CLOSED.batch_size,
    eval_use_async_envs: Annotated[bool, async_envs_option("eval-use-async-envs")] = _CLOSED.use_async_envs,
    config: Annotated[Path | None, config_option(RUN)] = None,
) -> None:
    """Compare a student with its teacher at each step count: error, straightness, latency; write a report.
    With --env.type: success in closed loop, in that env, through lerobot's own rollout."""
    from reflowpairs.eval.config import parse_num_steps  # imports torch: not for --help
    from reflowpairs.eval.open_loop import evaluate

    env_type, env_settings = parse_env_options(env_option)
    if env_type is not None:
        _refuse_open_loop_options(ctx, pairs)
        with user_errors():
            cfg = ClosedLoopConfig(
                env_type=env_type,
                env_options=env_settings,
                teacher=teacher,
                students=parse_students(student or []),
                out=out,
                num_steps=tuple(_steps(num_steps)),
                n_episodes=n_episodes,
                seed=seed if _given(ctx, "seed") else _CLOSED.seed,  # default: lerobot-eval's
                batch_size=eval_batch_size,
                use_async_envs=eval_use_async_envs,
                device=device,
                tokenizer=tokenizer,
            )
        _closed_loop(ctx, cfg)
        return
    if not student:
        raise typer.BadParameter(
            "is required (a student to compare with its teacher)", param_hint="--student"
        )
    if dataset is None:
        raise typer.BadParameter(
            "is required (or --env.type NAME to evaluate in closed loop)", param_hint="--dataset"
        )
    episode_list = parse_episodes(episodes)
    students = parse_students(student)
    given = {"episodes": episodes_text(episode_list)}
    if len(student) == 1:  # one student: written as one path, made absolute like --teacher
        given["student"] = student[0]
    else:
        given["student"] = [f"{label}={_local(source)}" for label, source in students.items()]
    options = resolved_options(ctx, values=given, local_paths=("student", "teacher"))
    if len(students) > 1 and pairs is not None:
        raise typer.BadParameter("is for one student (the store it trained on)", param_hint="--pairs")
    with user_errors():
        cfg = config_from_params(
            EvalConfig,
            ctx,
            student=next(iter(students.values())),
            num_steps=parse_num_steps(num_steps),
            episodes=episode_list,
        )
        if len(students) > 1:
            _compare_students(cfg, students, options)
            return
        with progress(prefix="eval") as bar:
            bar.live.transient = True  # the table replaces the bar
            report = evaluate(cfg, progress=StageBar(bar))
        files = write_report(report, out)
    save_options(out / EVAL_OPTIONS, "eval", options)
    for label in report["labels"]:
        out_console.print(label, style="bold red", markup=False)
    out_console.print(frames_text(report), markup=False)
    out_console.print(report_table(report))
    if report.get("pairs"):
        out_console.print(pairs_table(report))
    for note in report_notes(report):
        out_console.print(f"Note: {note}", style="yellow", markup=False)
    out_console.print(headline_text(report), style="bold", markup=False)
    out_console.print(
        f"report: {files.json}\ntable:  {files.markdown}\nplot:   {files.plot}\noptions: {out / EVAL_OPTIONS}",
        markup=False,
        soft_wrap=True,
    )
    if next_text(report):  # the command on one line (soft-wrapped by the terminal: copy-pasteable), then why
        out_console.print(next_text(report), style="bold green", markup=False, soft_wrap=True)
        out_console.print(f"      ({report['next']['why']})", markup=False)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was set (on the command line or by --config), not left at its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def _steps(text: str) -> list[int]:
    from reflowpairs.eval.config import parse_num_steps  # imports torch: not for --help

    with user_errors():
        return parse_num_steps(text)


OPEN_LOOP_ONLY = (
    "dataset",
    "dataset_root",
    "episodes",
    "max_frames",
    "samples_per_frame",
    "include_training_frames",
    "allow_mismatch",
    "latency_repeats",
    "batch_size",
)
"""Options of open-loop eval (dataset frames) that closed-loop eval has no use for: refused with --env.type rather
than silently ignored (``--eval.batch_size`` is the closed loop's batch)."""


def _refuse_open_loop_options(ctx: typer.Context, pairs: Path | None) -> None:
    """``typer.BadParameter`` naming the first open-loop-only option given together with --env.type."""
    if pairs is not None:
        raise typer.BadParameter("is for open-loop eval (not with --env.type)", param_hint="--pairs")
    defaults = {param.name: param.default for param in ctx.command.params}
    for name in OPEN_LOOP_ONLY:
        source = ctx.get_parameter_source(name)
        # an options file (--config) lists every option, at its default where unused: only a value set counts
        from_file = source is not None and source.name == "DEFAULT_MAP"
        if _given(ctx, name) and not (from_file and ctx.params.get(name) == defaults.get(name)):
            flag = "--" + name.replace("_", "-")
            raise typer.BadParameter(
                "is for open-loop eval on dataset frames, not with --env.type (closed loop runs episodes in the "
                "env: --n-episodes, --eval.batch_size)",
                param_hint=flag,
            )


def _closed_loop(ctx: typer.Context, cfg: ClosedLoopConfig) -> None:
    """``eval --env.type NAME``: every (model, steps) cell in closed loop (``reflowpairs.eval.closed_loop``), one progress
    bar for all rollouts, then the table and the report files."""
    given = {
        "student": [f"{label}={_local(source)}" for label, source in cfg.students.items()],
        "seed": cfg.seed,
    }
    options = resolved_options(ctx, values=given, local_paths=("student", "teacher"))
    with user_errors():
        with progress(prefix="eval") as bar:
            bar.live.transient = True  # the table replaces the bar
            from reflowpairs.eval.closed_loop import evaluate_closed_loop  # torch and lerobot: not for --help

            report = evaluate_closed_loop(cfg, progress=StageBar(bar))
        files = write_closed_loop_report(report, cfg.out)
    save_options(Path(cfg.out) / EVAL_OPTIONS, "eval", options)
    for table in closed_loop_tables(report):
        out_console.print(table)
    out_console.print(
        f"report: {files.json}\ntable:  {files.markdown}\nplot:   {files.plot}\ncells:  {Path(cfg.out) / 'cells'}",
        markup=False,
        soft_wrap=True,
    )
