"""The click classes behind the commands: the root group that imports each command only when it is run or its help is
asked for (``LazyCommand``), commands that take lerobot's option names (``cli.lerobot_names``), and help without
type placeholders (``<bool>``, ``<int>``)."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import typer
import typer.main
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from reflowpairs.cli.lerobot_names import translate_args

# Commands in the order of the workflow (``reflowpairs --help`` lists them so).
COMMAND_ORDER = ("tiny-world", "generate", "validate", "inspect", "train", "eval", "merge", "pipeline")


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
    """A command that takes lerobot's option names (``translate_args``: also ``--env.FIELD VALUE`` where it has
    ``--env-option``) and shows no type placeholders in its help."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, translate_args(self, ctx, list(args)))


@dataclasses.dataclass(frozen=True)
class LazyCommand:
    """A command the root group imports only when it is run or its own help is asked for: ``function`` of
    ``module`` (``reflowpairs.cli.store_cmds``), registered with ``settings(module)`` (``epilog``, ...: the
    keywords of ``typer.Typer.command``; ``cls`` is always ``Command``). ``help`` is what ``reflowpairs --help`` lists
    for it without importing the module: the first paragraph of the function's docstring (a test holds them equal)."""

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
