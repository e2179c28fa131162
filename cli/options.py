"""Every option two or more commands share, declared once (name, metavar, help panel and help text), and the
``--config FILE`` options files.

A command declares an option as ``device: Annotated[str, device_option()] = _DEFAULTS.device``: the declaration
(``device_option``) is here, its default in the library config the command fills (``config_defaults``). Where one
command words an option's help its own way, it passes ``help=`` (``--out`` says what each command writes there).

**Options files.** ``--config FILE`` (YAML or JSON; one mapping) holds any of the command's options by their long
names, with dashes or underscores (``samples-per-frame: 4`` or ``samples_per_frame: 4``) or by lerobot's names
(``output_dir``); flags on the command line override the file; an unknown key is refused naming it and the valid
ones. Relative paths in the file are relative to the working directory, as on the command line. ``resolved_options``
gives a run's options as it used them, and ``reflowpairs.options_file.write_options`` writes them (absolute paths),
so that ``--config`` that file repeats the run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import typer
from typer.core import TyperOption

from reflowpairs.cli.lerobot_names import ENV_OPTION, command_options, lerobot_aliases
from reflowpairs.errors import ReflowPairsError
from reflowpairs.options_file import flatten_options, plain_value, read_options_file

# Help panels of the commands' options.
INPUTS, SAMPLING, OUTPUT, PERFORMANCE, MULTI, RUN = (
    "Inputs",
    "Sampling",
    "Output",
    "Performance",
    "Multi-process",
    "Options file and logs",
)
TRAINING, MEASURE, RECIPE, EVALUATION = "Training", "Measurement", "Recipe", "Evaluation"
CLOSED_LOOP = "Closed loop (--env.type)"

DEVICE_HELP = "auto, cpu, cuda[:N] or mps."
DATASET_ROOT_HELP = "Local root of the dataset (lerobot's root=)."
ASYNC_ENVS_HELP = "Run the envs in subprocesses (--eval.use_async_envs)."
ENV_BATCH_HELP = "Envs run in parallel (--eval.batch_size)."


def config_defaults(config_class: type) -> SimpleNamespace:
    """The defaults of a library config dataclass (``GenerateConfig`` ...) by field name: the options of a command
    take their defaults from here, so that the library's config is the one place a default is written."""
    defaults = {}
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return SimpleNamespace(**defaults)


def config_from_params(config_class: type, ctx: typer.Context, **values: Any) -> Any:
    """``config_class`` (a library config dataclass) filled from the command's parameters of the same names
    (``ctx.params``), ``values`` replacing or adding some (the parsed ones: ``episodes``, ``partition`` ...)."""
    names = {field.name for field in dataclasses.fields(config_class)}
    given = {name: value for name, value in ctx.params.items() if name in names}
    return config_class(**(given | values))


# --- the shared options ----------------------------------------------------------------------------------------


def out_option(help: str, panel: str | None = OUTPUT) -> Any:
    """``--out DIR``: where the command writes (each command says what, in ``help``)."""
    return typer.Option("--out", metavar="DIR", rich_help_panel=panel, help=help)


def dataset_root_option(help: str = DATASET_ROOT_HELP, panel: str | None = INPUTS) -> Any:
    """``--dataset-root DIR``: where the LeRobotDataset is on disk."""
    return typer.Option("--dataset-root", metavar="DIR", rich_help_panel=panel, help=help)


def device_option(help: str = DEVICE_HELP, panel: str | None = PERFORMANCE) -> Any:
    """``--device DEVICE``."""
    return typer.Option("--device", metavar="DEVICE", rich_help_panel=panel, help=help)


def seed_option(help: str, panel: str | None) -> Any:
    """``--seed N`` (each command says what it seeds)."""
    return typer.Option("--seed", metavar="N", rich_help_panel=panel, help=help)


def batch_size_option(help: str, panel: str | None = PERFORMANCE) -> Any:
    """``--batch-size N`` (each command says what it batches)."""
    return typer.Option("--batch-size", metavar="N", rich_help_panel=panel, help=help)


def teacher_option(help: str, panel: str | None = INPUTS) -> Any:
    """``--teacher CKPT``: a pretrained_model/ directory or a hub repo id."""
    return typer.Option("--teacher", metavar="CKPT", rich_help_panel=panel, help=help)


def dataset_option(help: str = "LeRobotDataset repo id.", panel: str | None = INPUTS) -> Any:
    """``--dataset REPO_ID``."""
    return typer.Option("--dataset", metavar="REPO_ID", rich_help_panel=panel, help=help)


def episodes_option(help: str, panel: str | None = INPUTS) -> Any:
    """``--episodes LIST`` (``0,2,5``, ``0-9`` or ``[0,1]``; ``cli.ui.parse_episodes`` reads it)."""
    return typer.Option("--episodes", metavar="LIST", rich_help_panel=panel, help=help)


def samples_per_frame_option(help: str, panel: str | None) -> Any:
    """``--samples-per-frame K``: noises (pairs) per frame."""
    return typer.Option("--samples-per-frame", metavar="K", rich_help_panel=panel, help=help)


def num_workers_option(help: str, panel: str | None = PERFORMANCE) -> Any:
    """``--num-workers N``: DataLoader workers."""
    return typer.Option("--num-workers", metavar="N", rich_help_panel=panel, help=help)


def allow_mismatch_option(help: str, panel: str | None = INPUTS) -> Any:
    """``--allow-mismatch/--no-allow-mismatch``."""
    return typer.Option("--allow-mismatch/--no-allow-mismatch", rich_help_panel=panel, help=help)


def resume_option(help: str, panel: str | None = OUTPUT) -> Any:
    """``--resume/--no-resume``."""
    return typer.Option("--resume/--no-resume", rich_help_panel=panel, help=help)


def json_option(help: str) -> Any:
    """``--json``: one JSON object on stdout instead of tables."""
    return typer.Option("--json", help=help)


def store_argument() -> Any:
    """``STORE``: a pair store directory."""
    return typer.Argument(
        metavar="STORE", help="The pair store directory (the --out of `reflowpairs generate`)."
    )


# --- closed loop (lerobot-eval's --env.* and --eval.*, translated by cli.lerobot_names) --------------------------


def env_fields_option(help: str) -> Any:
    """``--env-option FIELD=VALUE``, given as lerobot's ``--env.FIELD VALUE`` (``parse_env_options`` reads it)."""
    return typer.Option(ENV_OPTION, metavar="FIELD=VALUE", rich_help_panel=CLOSED_LOOP, help=help)


def env_episodes_option(name: str, help: str) -> Any:
    """Episodes per model and step count (``--eval.n_episodes``): ``--n-episodes`` in eval, ``--env-episodes`` in
    pipeline."""
    return typer.Option(name, metavar="N", rich_help_panel=CLOSED_LOOP, help=help)


def env_batch_size_option(name: str) -> Any:
    """Envs run in parallel (``--eval.batch_size``): ``--eval-batch-size`` in eval, ``--env-batch-size`` in
    pipeline."""
    return typer.Option(name, metavar="N", rich_help_panel=CLOSED_LOOP, help=ENV_BATCH_HELP)


def async_envs_option(name: str) -> Any:
    """``--NAME/--no-NAME``: the envs in subprocesses (``--eval.use_async_envs``)."""
    return typer.Option(f"--{name}/--no-{name}", rich_help_panel=CLOSED_LOOP, help=ASYNC_ENVS_HELP)


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


# --- --tokenizer ----------------------------------------------------------------------------------------------


def _absolute_tokenizer(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    """``--tokenizer DIR`` as an absolute path (text): the commands pass it to their library config's ``tokenizer``
    (``config_from_params``), which hands it to ``teacher.load_policy``; the environment is left alone."""
    return None if value is None else str(Path(value).expanduser().resolve())


def tokenizer_option(help_panel: str | None = None) -> Any:
    """The ``--tokenizer DIR`` option of generate, validate, train and eval."""
    return typer.Option(
        "--tokenizer",
        metavar="DIR",
        callback=_absolute_tokenizer,
        rich_help_panel=help_panel,
        help="A local tokenizer directory the checkpoints' preprocessors use instead of the one they name (pi0/pi05 "
        "name the gated hub google/paligemma-3b-pt-224; point this at a downloaded copy to run offline). Same as "
        "the REFLOWPAIRS_TOKENIZER environment variable.",
    )


# --- --config FILE ----------------------------------------------------------------------------------------------


def _long_name(param: Any) -> str | None:
    """``--samples-per-frame`` for an option, None for an argument."""
    if not isinstance(param, TyperOption):
        return None
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0] if longs else None


def config_keys(command: Any) -> list[str]:
    """The keys an options file of ``command`` may hold (our long names, without dashes in front)."""
    return [
        _long_name(p).removeprefix("--")
        for p in command.params
        if _long_name(p) and p.name not in ("config", "help")
    ]


def option_for_key(command: Any, key: str) -> TyperOption | None:
    """The option an options-file key names: ``samples-per-frame``, ``samples_per_frame``, ``--samples-per-frame``, a
    lerobot name (``output_dir``, ``wandb.project``), or the parameter's name (``format``)."""
    options = command_options(command)
    name = "--" + str(key).lstrip("-")
    aliases = lerobot_aliases(command.name or "")
    for candidate in (name, aliases.get(name), name.replace("_", "-")):
        option = options.get(candidate) if candidate else None
        if (
            option is not None
            and candidate not in option.secondary_opts
            and option.name not in ("config", "help")
        ):
            return option
    return None


def _value_for(option: TyperOption, value: Any) -> Any:
    """A file's value as the option takes it: a list for a text option (``episodes: [0, 1]``) becomes ``0,1``."""
    multiple = getattr(option, "multiple", False)
    if isinstance(value, list) and not multiple:
        return ",".join(map(str, value))
    if multiple and not isinstance(value, list):  # a repeatable option given once (eval's `student: DIR`)
        return [value]
    return value


def load_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """``--config`` (eager): the file's options become the command's defaults (``ctx.default_map``), so that flags on
    the command line override them."""
    if value is None or ctx.resilient_parsing:
        return value
    command = ctx.command
    try:
        data = read_options_file(value)
    except ReflowPairsError as err:
        raise typer.BadParameter(err.what) from None
    defaults: dict[str, Any] = {}
    for key, item in flatten_options(data):
        option = option_for_key(command, key)
        if option is None:
            raise typer.BadParameter(
                f"{value}: {key!r} is not an option of `reflowpairs {command.name}`. "
                f"Valid keys: {', '.join(config_keys(command))}.",
                ctx=ctx,
                param=param,
            )
        defaults[option.name] = _value_for(option, item)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_option(help_panel: str | None = None) -> Any:
    """The ``--config FILE`` option of generate, train and eval."""
    return typer.Option(
        "--config",
        metavar="FILE",
        callback=load_config,
        is_eager=True,
        rich_help_panel=help_panel,
        help="Read options from a YAML or JSON file (long option names as keys, dashes or underscores; flags on the "
        "command line override it). Each run writes its own such file, so --config repeats a run.",
    )


def resolved_options(
    ctx: Any,
    skip: tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
    local_paths: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The command's options as this run used them, by long name (``samples-per-frame``): ``ctx.params`` with
    ``values`` (parameter name -> value) replacing some, paths made absolute (also the text options in ``local_paths``
    that name an existing local path, such as a checkpoint directory), without ``skip`` and ``--config``."""
    values = values or {}
    skipped = {"config", "help", *skip}
    resolved: dict[str, Any] = {}
    for param in ctx.command.params:
        name = _long_name(param)
        if name is None or param.name in skipped:
            continue
        value = values.get(param.name, ctx.params.get(param.name))
        if param.name in local_paths and isinstance(value, str) and Path(value).expanduser().exists():
            value = Path(value)
        resolved[name.removeprefix("--")] = plain_value(value)
    return resolved
