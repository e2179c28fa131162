"""How the commands read their options: lerobot's option names, ``--config FILE``, and help without type placeholders.

- **lerobot's names.** Where a lerobot-train / lerobot-eval option means the same as ours, its name works too
  (``LEROBOT_NAMES``: ``--output_dir`` for ``--out``, ``--save_freq`` for ``--save-every``, ``--dataset.root`` for
  ``--dataset-root``, ...), and so does any of our options spelled with underscores (``--batch_size``) and a flag
  given as ``--flag=true|false`` (draccus style). A lerobot name whose meaning differs here (``--policy.path``) gets a
  hint naming the option to use instead of click's bare "No such option" (``LEROBOT_HINTS``).
- **Options files.** ``--config FILE`` (YAML or JSON; one mapping) holds any of the command's options by their long
  names, with dashes or underscores (``samples-per-frame: 4`` or ``samples_per_frame: 4``); flags on the command line
  override the file; an unknown key is refused naming it and the valid ones. Relative paths in the file are relative to
  the working directory, as on the command line. ``write_options`` writes a run's resolved options back (absolute
  paths), so that ``--config`` that file repeats the run.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import typer
import typer.main
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

try:  # Typer 0.2x+ carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - Typer built on click itself
    from click import UsageError

# Commands in the order of the workflow (``reflowpairs --help`` lists them so).
COMMAND_ORDER = ("tiny-world", "generate", "validate", "inspect", "train", "eval", "merge", "pipeline")

# lerobot's option name -> ours, per command, where the meaning is the same.
LEROBOT_NAMES: dict[str, dict[str, str]] = {
    "generate": {
        "--output_dir": "--out",
        "--dataset.repo_id": "--dataset",
        "--dataset.root": "--dataset-root",
        "--dataset.episodes": "--episodes",
        "--policy.device": "--device",
        "--policy.num_steps": "--num-steps",
        "--policy.num_inference_steps": "--num-steps",
        "--log_freq": "--log-every",
    },
    "train": {
        "--output_dir": "--out",
        "--dataset.root": "--dataset-root",
        "--save_freq": "--save-every",
        "--log_freq": "--log-every",
        "--policy.device": "--device",
        "--policy.optimizer_lr": "--lr",
        "--policy.optimizer_grad_clip_norm": "--grad-clip",
        "--wandb.enable": "--wandb",
        "--wandb.project": "--wandb-project",
        "--wandb.entity": "--wandb-entity",
        "--wandb.mode": "--wandb-mode",
        "--wandb.notes": "--wandb-notes",
    },
    "eval": {
        "--output_dir": "--out",
        "--dataset.repo_id": "--dataset",
        "--dataset.root": "--dataset-root",
        "--dataset.episodes": "--episodes",
        "--policy.device": "--device",
    },
    "validate": {
        "--dataset.repo_id": "--dataset",
        "--dataset.root": "--dataset-root",
        "--policy.device": "--device",
    },
    "merge": {"--output_dir": "--out"},
}

_CHECKPOINT_HINT = (
    "lerobot's --policy.path has two meanings here: use --teacher in `reflowpairs generate` (the checkpoint that "
    "makes the pairs) or --init in `reflowpairs train` (the student's start; default: the teacher the "
    "store's manifest names)."
)
_CONFIG_PATH_HINT = (
    "--config_path is lerobot's train_config.json; reflowpairs reads its own options file: --config FILE "
    "(YAML or JSON holding this command's options, e.g. the generate_config.yaml or train_options.yaml "
    "a run wrote)."
)

# lerobot's option name -> what to use instead, where the meaning differs.
LEROBOT_HINTS: dict[str, dict[str, str]] = {
    "generate": {"--policy.path": _CHECKPOINT_HINT + " Here: --teacher.", "--config_path": _CONFIG_PATH_HINT},
    "train": {
        "--policy.path": _CHECKPOINT_HINT + " Here: --init.",
        "--config_path": _CONFIG_PATH_HINT,
        "--dataset.repo_id": "train reads the dataset the pair store was generated from (its manifest names it); "
        "--dataset-root says where it is now.",
    },
    "eval": {
        "--policy.path": "eval takes the checkpoint to evaluate as --student and its teacher as --teacher.",
        "--config_path": _CONFIG_PATH_HINT,
    },
    "validate": {"--policy.path": "validate takes the checkpoint that made the store as --teacher."},
}
_POLICY_PREFIX_HINT = (
    "the policy's settings come from its checkpoint's config.json; see --help for the lerobot names "
    "this command takes."
)

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
CONFIG_HEADER = "# reflowpairs"  # first line of every options file reflowpairs writes


def _long_name(param: Any) -> str | None:
    """``--samples-per-frame`` for an option, None for an argument."""
    if not isinstance(param, TyperOption):
        return None
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0] if longs else None


def _options(command: Any) -> dict[str, TyperOption]:
    """Every spelling on the command line (``--resume``, ``--no-resume``) -> its option."""
    found: dict[str, TyperOption] = {}
    for param in command.params:
        if isinstance(param, TyperOption):
            for opt in (*param.opts, *param.secondary_opts):
                found[opt] = param
    return found


def _bool_word(text: str) -> bool | None:
    low = text.strip().lower()
    return True if low in _TRUE else False if low in _FALSE else None


def translate_args(command: Any, ctx: Any, args: list[str]) -> list[str]:
    """``args`` with lerobot's names (and underscore spellings, and ``--flag=true|false``) turned into ours; a lerobot
    name whose meaning differs raises a ``UsageError`` saying what to use."""
    aliases = LEROBOT_NAMES.get(command.name or "", {})
    hints = LEROBOT_HINTS.get(command.name or "", {})
    options = _options(command)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            out += args[i - 1 :]
            break
        if not arg.startswith("--"):
            out.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name in options:
            target = name
        elif name in aliases:
            target = aliases[name]
        elif name in hints:
            raise UsageError(f"No such option {name}: {hints[name]}", ctx)
        elif name.startswith("--policy."):
            raise UsageError(f"No such option {name}: {_POLICY_PREFIX_HINT}", ctx)
        elif name.replace("_", "-") in options:
            target = name.replace("_", "-")
        else:
            out.append(arg)  # click reports it (with its "Did you mean" suggestions)
            continue
        param = options[target]
        if not (param.is_flag and param.is_bool_flag):
            out.append(target + eq + value)
            continue
        on = True
        if eq:
            on = _bool_word(value)
            if on is None:
                raise UsageError(f"{name} takes true or false, got {value!r}.", ctx)
        elif (
            name != target and i < len(args) and _bool_word(args[i]) is not None
        ):  # lerobot's `--wandb.enable true`
            on = bool(_bool_word(args[i]))
            i += 1
        if target in param.secondary_opts:
            on = not on
        if on:
            out.append(param.opts[0])
        elif param.secondary_opts:
            out.append(param.secondary_opts[0])
    return out


def lerobot_names_text(command: str) -> str:
    """The epilog line naming the lerobot options a command accepts."""
    names = sorted(LEROBOT_NAMES.get(command, {}))
    shown = ", ".join(names) + ", " if names else ""
    return (
        f"lerobot's names work too: {shown}any option with underscores (--batch_size) and --flag=true|false."
    )


# --- help without type placeholders -----------------------------------------------------------------------


class _Argument(TyperArgument):
    """An argument shown by its metavar alone (``SLICE...``, ``[STORE]``): no ``<path>`` type column, no braces."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        return self.display_name_raw if self.required else f"[{self.display_name_raw}]"


def _tidy(param: Any) -> None:
    """No ``<bool>``/``<int>``/``{store}`` placeholders: flags show no metavar, other options their own (``VALUE`` if
    they were given none), arguments their upper-case name."""
    if isinstance(param, TyperArgument):
        param.__class__ = _Argument
        if param.metavar is None:
            param.metavar = (param.name or "").upper()
        if param.nargs != 1 and not param.metavar.endswith("..."):
            param.metavar += "..."
    elif isinstance(param, TyperOption) and param.metavar is None:
        if param.is_flag:
            param.metavar = ""
        else:
            param.metavar = "VALUE"


class _TidyHelp:
    """Mixin for a Typer command or group: no type placeholders in its help (``_tidy`` on every option)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for param in self.params:
            _tidy(param)

    def get_help_option(self, ctx: Any) -> TyperOption | None:
        option = super().get_help_option(ctx)
        if option is not None:
            _tidy(option)
        return option


class Command(_TidyHelp, TyperCommand):
    """A command that takes lerobot's option names (``translate_args``) and shows no type placeholders in its help."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, translate_args(self, ctx, list(args)))


@dataclasses.dataclass(frozen=True)
class LazyCommand:
    """A command the root group imports only when it is run or its own help is asked for: ``function`` of
    ``module`` (``reflowpairs.cli.store_cmds``), registered with ``settings(module)`` (``cls``, ``epilog``, ...: the
    keywords of ``typer.Typer.command``; default ``cls=Command``). ``help`` is what ``reflowpairs --help`` lists for it
    without importing the module: the first paragraph of the function's docstring (a test holds them equal)."""

    module: str
    function: str
    help: str
    settings: Callable[[ModuleType], dict[str, Any]] | None = None

    def load(self, name: str) -> Any:
        """The click command, built by Typer from the function as ``app.command(name, ...)`` would."""
        module = importlib.import_module(self.module)
        settings = {"cls": Command} | (self.settings(module) if self.settings else {})
        one = typer.Typer(add_completion=False)
        one.command(name, **settings)(getattr(module, self.function))
        return typer.main.get_command(one)


class _LoadedCommands(dict):
    """The group's ``commands``: a lazy command is loaded on first ``commands[name]`` / ``commands.get(name)``."""

    def __init__(self, group: Group, loaded: dict[str, Any]):
        super().__init__(loaded)
        self._group = group

    def __missing__(self, name: str) -> Any:
        command = self._group.load(name)
        if command is None:
            raise KeyError(name)
        return command

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def keys(self) -> list[str]:  # type: ignore[override]
        """Every command's name, loaded or not (Typer's "Did you mean ...?" for a mistyped command reads these)."""
        return list(dict.fromkeys([*self._group.LAZY, *super().keys()]))


class Group(_TidyHelp, TyperGroup):
    """The root group: commands listed in workflow order (``COMMAND_ORDER``), no type placeholders in its help, and
    the ``LAZY`` commands imported only when one is run or asked for: ``reflowpairs --help`` lists them from their
    static help, so neither it nor a command that needs no torch (``inspect``) pays for importing torch."""

    LAZY: dict[str, LazyCommand] = {}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.commands = _LoadedCommands(self, self.commands)
        self._listing = False

    def load(self, name: str) -> Any:
        """The command ``name`` (imported and built on first use), or None if there is none."""
        if dict.__contains__(self.commands, name):
            return dict.__getitem__(self.commands, name)
        lazy = self.LAZY.get(name)
        if lazy is None:
            return None
        command = lazy.load(name)
        self.commands[name] = command
        return command

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        lazy = self.LAZY.get(cmd_name)
        if self._listing and lazy is not None and not dict.__contains__(self.commands, cmd_name):
            return TyperCommand(cmd_name, help=lazy.help)  # the root help's listing: name and help only
        return self.load(cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        names = list(dict.fromkeys([*self.LAZY, *super().list_commands(ctx)]))
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda name: (rank.get(name, len(rank)), names.index(name)))


# --- options files -------------------------------------------------------------------------------------------


def read_options_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON options file (JSON is YAML); refusals are ``typer.BadParameter`` naming the file."""
    import yaml

    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as err:
        raise typer.BadParameter(f"cannot read {path} ({err.strerror or err}).") from None
    except UnicodeDecodeError as err:
        raise typer.BadParameter(f"{path} is not UTF-8 text (byte {err.start}).") from None
    try:
        data = json.loads(text) if Path(path).suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        kind = "JSON" if Path(path).suffix.lower() == ".json" else "YAML"
        raise typer.BadParameter(f"{path} is not valid {kind} ({' '.join(str(err).split())}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise typer.BadParameter(
            f"{path} holds a {type(data).__name__}, not a mapping of option names to values."
        )
    return data


def _flatten(data: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``{"wandb": {"project": "p"}}`` -> ``("wandb.project", "p")`` (lerobot's nesting); other values as they are."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


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
    options = _options(command)
    name = "--" + str(key).lstrip("-")
    aliases = LEROBOT_NAMES.get(command.name or "", {})
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
    defaults: dict[str, Any] = {}
    for key, item in _flatten(read_options_file(value)):
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


def _use_tokenizer(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """``--tokenizer DIR``: every checkpoint this command (and any worker process it starts) loads tokenizes with
    DIR, through ``reflowpairs.teacher.TOKENIZER_ENV``."""
    if value is not None:
        from reflowpairs.teacher import TOKENIZER_ENV

        os.environ[TOKENIZER_ENV] = str(Path(value).expanduser().resolve())
    return value


def tokenizer_option(help_panel: str | None = None) -> Any:
    """The ``--tokenizer DIR`` option of generate, validate, train and eval."""
    return typer.Option(
        "--tokenizer",
        metavar="DIR",
        callback=_use_tokenizer,
        rich_help_panel=help_panel,
        help="A local tokenizer directory the checkpoints' preprocessors use instead of the one they name (pi0/pi05 "
        "name the gated hub google/paligemma-3b-pt-224; point this at a downloaded copy to run offline). Same as "
        "the REFLOWPAIRS_TOKENIZER environment variable.",
    )


# --- writing a run's options back --------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.expanduser().resolve())
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def resolved_options(
    ctx: Any, skip: Iterable[str] = (), values: dict[str, Any] | None = None, local_paths: Iterable[str] = ()
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
        resolved[name.removeprefix("--")] = _plain(value)
    return resolved


def write_options(path: Path, command: str, options: dict[str, Any]) -> Path | None:
    """Write ``options`` as YAML to ``path`` (a file ``reflowpairs <command> --config path`` repeats the run with);
    returns None, writing nothing, when ``path`` exists and is not such a file (a file of the user's)."""
    import yaml

    path = Path(path)
    if path.exists():
        try:
            ours = path.is_file() and path.read_bytes().startswith(CONFIG_HEADER.encode())
        except OSError:
            ours = False
        if not ours:
            return None
    header = (
        f"{CONFIG_HEADER} {command} options of this run (null: the default). Repeat the run with:\n"
        f"#   reflowpairs {command} --config {path.resolve()}\n"
        "# Flags on the command line override this file (e.g. another --out).\n"
    )
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(header + yaml.safe_dump(options, sort_keys=False, default_flow_style=False))
    tmp.replace(path)
    return path


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
