"""``reflowpairs eval``: teacher vs student at each step count, as a rich table and report files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from reflowpairs.cli.options import (
    Command,
    config_defaults,
    config_option,
    lerobot_names_text,
    resolved_options,
    tokenizer_option,
)
from reflowpairs.cli.ui import (
    INPUTS,
    OUTPUT,
    PERFORMANCE,
    RUN,
    console,
    out_console,
    parse_episodes,
    plural,
    progress,
    save_options,
    user_errors,
)
from reflowpairs.closedloop import ClosedLoopConfig
from reflowpairs.dataset import episodes_text
from reflowpairs.evaluate import EvalConfig

_DEFAULTS = config_defaults(EvalConfig)  # the options' defaults are the library config's
_CLOSED = config_defaults(ClosedLoopConfig)
EVAL_OPTIONS = "eval_options.yaml"
EVAL_EPILOG = (
    lerobot_names_text("eval")
    + " Closed loop: --env.type NAME (any env lerobot knows, plugins included) and lerobot's --env.FIELD VALUE, "
    "--eval.n_episodes, --eval.batch_size and --eval.use_async_envs."
    + f" Each run writes its options to OUT/{EVAL_OPTIONS}."
)
MEASURE = "Measurement"
CLOSED_LOOP = "Closed loop (--env.type)"
ENV_OPTION = "--env-option"


class EnvCommand(Command):
    """A command that also takes lerobot-eval's env and eval options: ``--env.FIELD VALUE`` / ``--env.FIELD=VALUE``
    (``--env.type NAME`` included) become ``--env-option FIELD=VALUE``, and ``--eval.NAME`` the command's own option
    (``EVAL_ALIASES``), before the usual lerobot-name translation (``options.translate_args``)."""

    EVAL_ALIASES = {
        "--eval.n_episodes": "--n-episodes",
        "--eval.batch_size": "--eval-batch-size",
        "--eval.use_async_envs": "--eval-use-async-envs",
    }

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, env_args(list(args), self.EVAL_ALIASES))


def env_args(args: list[str], aliases: dict[str, str]) -> list[str]:
    """``args`` with ``--env.FIELD[=]VALUE`` as ``--env-option FIELD=VALUE`` and ``aliases`` applied (a bool alias
    followed by a separate true/false word takes it as ``=word``)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            out += args[i - 1 :]
            break
        name, eq, value = arg.partition("=")
        if name.startswith("--env.") and len(name) > len("--env."):
            if not eq and i < len(args):
                value, i = args[i], i + 1
            out += [ENV_OPTION, f"{name.removeprefix('--env.')}={value}"]
        elif name in aliases:
            target = aliases[name]
            if not eq and target.endswith("async-envs") and i < len(args) and args[i].lower() in _BOOL_WORDS:
                value, eq, i = args[i], "=", i + 1
            out.append(target + eq + value)
        else:
            out.append(arg)
    return out


_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}


def parse_env_options(given: list[str] | None) -> tuple[str | None, dict[str, str]]:
    """``--env-option`` values (``FIELD=VALUE``) -> ``(env type, {field: value})``."""
    env_type, options = None, {}
    for text in given or []:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{text!r} is not FIELD=VALUE", param_hint="--env.FIELD")
        if key == "type":
            env_type = value
        else:
            options[key] = value
    if options and env_type is None:
        raise typer.BadParameter(
            f"--env.{next(iter(options))} needs --env.type NAME (the env it configures)",
            param_hint="--env.type",
        )
    return env_type, options


def report_table(report: dict[str, Any]) -> Table:
    """The report's rows as a rich table (the same cells as report.md, from ``report.table_rows``), with
    two-line headers and no vertical rules, so that it fits in 80 columns."""
    from reflowpairs.report import COLUMNS, CONSOLE_HEADERS, table_rows

    settings = report["settings"]
    table = Table(
        title=f"teacher vs student: {plural(report['frames']['count'], 'frame')} x "
        f"{plural(report['frames']['samples_per_frame'], 'noise')}; reference = teacher, "
        f"{plural(settings['reference_num_steps'], 'step')}",
        caption=f"latency: median of {settings['latency_repeats']} calls; norm: teacher's normalised actions",
        box=box.HORIZONTALS,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        padding=(0, 1),
    )
    rows = table_rows(report)
    for i, (key, _) in enumerate(COLUMNS):
        table.add_column(CONSOLE_HEADERS[key], justify="left" if i == 0 else "right", no_wrap=True)
    for i, cells in enumerate(rows):
        table.add_row(
            *cells,
            end_section=i + 1 < len(rows) and report["rows"][i + 1]["model"] != report["rows"][i]["model"],
        )
    return table


def pairs_table(report: dict[str, Any]) -> Table:
    """The student's error on its training pairs next to its held-out error (``--pairs``)."""
    from reflowpairs.report import PAIRS_CONSOLE_HEADERS, pairs_rows

    table = Table(
        title=f"student: training pairs ({plural(report['pairs']['num_frames'], 'frame')}) vs held-out frames",
        box=box.HORIZONTALS,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
    )
    for header in PAIRS_CONSOLE_HEADERS:
        table.add_column(header, justify="right")
    for cells in pairs_rows(report):
        table.add_row(*cells)
    return table


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
    from reflowpairs.compare import evaluate_students

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


def comparison_tables(comparison: dict[str, Any]) -> list[Table]:
    """Several students side by side (``reflowpairs.compare``): every model's rows (with closed-loop success where
    the pipeline ran it), then the verdict."""
    from reflowpairs.compare import closed_loop_note, success_cell
    from reflowpairs.report import COLUMNS, CONSOLE_HEADERS, format_value

    ref = comparison["settings"]["reference_num_steps"]
    frames = comparison["frames"]
    table = Table(
        title=f"students compared: {plural(frames['count'], 'frame')} x "
        f"{plural(frames['samples_per_frame'], 'noise')}; reference = teacher, {plural(ref, 'step')}",
        box=box.HORIZONTALS,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        padding=(0, 1),
    )
    for i, (key, _) in enumerate(COLUMNS):
        table.add_column(CONSOLE_HEADERS[key], justify="left" if i == 0 else "right", no_wrap=True)
    closed = bool(comparison.get("closed_loop"))  # pipeline --env.type: success beside the error
    if closed:
        table.add_column("success\n[95% CI]", justify="right", no_wrap=True)
        table.caption = closed_loop_note(comparison)
    rows = comparison["rows"]
    for i, row in enumerate(rows):
        last = i + 1 == len(rows) or rows[i + 1]["model"] != row["model"]
        values = [format_value(row.get(key)) for key, _ in COLUMNS] + ([success_cell(row)] if closed else [])
        table.add_row(*values, end_section=last)
    verdict = Table(title="fewest steps to match the teacher", box=box.HORIZONTALS, show_edge=False)
    verdict.add_column("model", no_wrap=True)
    verdict.add_column(f"as accurate on data\nas the teacher at {ref}", justify="right")
    verdict.add_column("as close to the reference\nas the teacher at 4", justify="right")
    for model, goals in comparison["verdict"].items():
        verdict.add_row(model, format_value(goals["vs_teacher_best"]), format_value(goals["vs_teacher_4"]))
    return [table, verdict]


class StageBar:
    """One progress bar for all of eval's stages: each new stage renames it and restarts its count, so one
    bar is on screen at a time (and, the bar being transient, none once the table is printed)."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task: int | None = None
        self.phase: str | None = None
        self.stage = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.stage += 1
            self.phase = phase
            description = f"{self.stage}. {phase}"
            if self.task is None:
                self.task = self.bar.add_task(description, total=total, rate="")
            else:
                self.bar.reset(self.task, total=total, completed=0, description=description)
        self.bar.update(self.task, completed=done)


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
    teacher: Annotated[
        str,
        typer.Option(
            metavar="CKPT",
            rich_help_panel=INPUTS,
            help="Teacher checkpoint; its full-step sample is the reference.",
        ),
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            metavar="REPO_ID",
            rich_help_panel=INPUTS,
            help="LeRobotDataset repo id (open loop; not with --env.type).",
        ),
    ] = None,
    dataset_root: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR", rich_help_panel=INPUTS, help="Local root of the dataset (lerobot's root=)."
        ),
    ] = _DEFAULTS.dataset_root,
    episodes: Annotated[
        str | None,
        typer.Option(
            metavar="LIST",
            rich_help_panel=INPUTS,
            help="Episodes to evaluate on, e.g. 8,9, 8-9 or [8,9] (default: every episode the student did not train on).",
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
        typer.Option(
            "--allow-mismatch/--no-allow-mismatch",
            rich_help_panel=INPUTS,
            help="Compare with a teacher the student was not trained from (report labelled).",
        ),
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
        int, typer.Option(metavar="K", rich_help_panel=MEASURE, help="K: noises per frame.")
    ] = _DEFAULTS.samples_per_frame,
    seed: Annotated[
        int,
        typer.Option(
            metavar="N", rich_help_panel=MEASURE, help="Seed of the noises X_0 = f(seed, obs_index, sample)."
        ),
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
        Path,
        typer.Option(
            metavar="DIR",
            rich_help_panel=OUTPUT,
            help=f"Directory for report.json, report.md, steps_vs_error.png and {EVAL_OPTIONS}.",
        ),
    ],
    tokenizer: Annotated[Path | None, tokenizer_option(PERFORMANCE)] = None,
    device: Annotated[
        str, typer.Option(metavar="DEVICE", rich_help_panel=PERFORMANCE, help="auto, cpu, cuda[:N] or mps.")
    ] = _DEFAULTS.device,
    batch_size: Annotated[
        int, typer.Option(metavar="N", rich_help_panel=PERFORMANCE, help="Frames per sampling call.")
    ] = _DEFAULTS.batch_size,
    env_option: Annotated[
        list[str] | None,
        typer.Option(
            ENV_OPTION,
            metavar="FIELD=VALUE",
            rich_help_panel=CLOSED_LOOP,
            help="lerobot's --env.FIELD VALUE, e.g. --env.type pusht --env.episode_length 100: evaluate in closed "
            "loop, in that env (lerobot's rollout), instead of on dataset frames.",
        ),
    ] = None,
    n_episodes: Annotated[
        int,
        typer.Option(
            metavar="N",
            rich_help_panel=CLOSED_LOOP,
            help="Episodes per model and step count (same seeds in all).",
        ),
    ] = _CLOSED.n_episodes,
    eval_batch_size: Annotated[
        int,
        typer.Option(
            metavar="N", rich_help_panel=CLOSED_LOOP, help="Envs run in parallel (--eval.batch_size)."
        ),
    ] = _CLOSED.batch_size,
    eval_use_async_envs: Annotated[
        bool,
        typer.Option(
            "--eval-use-async-envs/--no-eval-use-async-envs",
            rich_help_panel=CLOSED_LOOP,
            help="Run the envs in subprocesses (--eval.use_async_envs).",
        ),
    ] = _CLOSED.use_async_envs,
    config: Annotated[Path | None, config_option(RUN)] = None,
) -> None:
    """Compare a student with its teacher at each step count: error, straightness, latency; write a report.
    With --env.type: success in closed loop, in that env, through lerobot's own rollout."""
    from reflowpairs.evaluate import EvalConfig, evaluate, parse_num_steps
    from reflowpairs.report import frames_text, headline_text, next_text, report_notes, write_report

    env_type, env_options = parse_env_options(env_option)
    if env_type is not None:
        _refuse_open_loop_options(ctx, pairs)
        with user_errors():
            cfg = ClosedLoopConfig(
                env_type=env_type,
                env_options=env_options,
                teacher=teacher,
                students=parse_students(student or []),
                out=out,
                num_steps=tuple(_steps(num_steps)),
                n_episodes=n_episodes,
                seed=seed if _given(ctx, "seed") else _CLOSED.seed,  # default: lerobot-eval's
                batch_size=eval_batch_size,
                use_async_envs=eval_use_async_envs,
                device=device,
                tokenizer=None if tokenizer is None else str(tokenizer),
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
        cfg = EvalConfig(
            student=next(iter(students.values())),
            teacher=teacher,
            dataset=dataset,
            out=out,
            num_steps=parse_num_steps(num_steps),
            dataset_root=dataset_root,
            episodes=episode_list,
            pairs=pairs,
            max_frames=max_frames,
            samples_per_frame=samples_per_frame,
            seed=seed,
            device=device,
            latency_repeats=latency_repeats,
            batch_size=batch_size,
            allow_mismatch=allow_mismatch,
            include_training_frames=include_training_frames,
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
    from reflowpairs.evaluate import parse_num_steps

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
    """``eval --env.type NAME``: every (model, steps) cell in closed loop (``reflowpairs.closedloop``), one progress
    bar for all rollouts, then the table and the report files."""
    from reflowpairs.closedloop import evaluate_closed_loop, write_closed_loop_report

    given = {
        "student": [f"{label}={_local(source)}" for label, source in cfg.students.items()],
        "seed": cfg.seed,
    }
    options = resolved_options(ctx, values=given, local_paths=("student", "teacher"))
    with user_errors():
        with progress(prefix="eval") as bar:
            bar.live.transient = True  # the table replaces the bar
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


def closed_loop_tables(report: dict[str, Any]) -> list[Table | Text]:
    """The closed-loop report as rich tables: every (model, steps) cell, then the verdict and what it means."""
    from reflowpairs.closedloop_report import (
        TABLE_HEADERS,
        table_rows,
        title_text,
        verdict_rows,
        verdict_text,
    )

    table = Table(
        title=title_text(report),
        caption="success: 95% Wilson interval; chunk ms: median per action-chunk call; "
        "vs teacher: episodes only this cell / only the full-step teacher succeeds in",
        box=box.HORIZONTALS,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        padding=(0, 1),
    )
    for i, header in enumerate(TABLE_HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=True)
    rows = table_rows(report)
    for i, cells in enumerate(rows):
        last = i + 1 == len(rows) or report["cells"][i + 1]["model"] != report["cells"][i]["model"]
        table.add_row(*cells, end_section=last)
    verdict = Table(title="fewest steps to match the teacher", box=box.HORIZONTALS, show_edge=False)
    verdict.add_column("model", no_wrap=True)
    verdict.add_column("fewest steps", justify="right")
    for cells in verdict_rows(report):
        verdict.add_row(*cells)
    return [table, verdict, Text(verdict_text(report))]
