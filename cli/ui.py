"""What every command shares: the consoles, option parsing helpers, error wording, progress, ``next:`` lines."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from reflowpairs.cli.progress import make_progress
from reflowpairs.errors import ReflowPairsError
from reflowpairs.next_steps import next_lines
from reflowpairs.options_file import write_options

console = Console(stderr=True)
out_console = Console()
_state: dict = {"debug": False, "flags": {}}  # set by the root callback: --debug, the command's flags


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


# Settings whose option has another name than the config field it fills.
SETTING_FLAGS = {"backend": "--format"}
_SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")


def command_flags(command: Any) -> dict[str, str]:
    """A command's settings by config-field name -> the flag that sets it (``shard_size`` -> ``--shard-size``)."""
    flags = dict(SETTING_FLAGS)
    for param in getattr(command, "params", []):
        long_names = [o for o in param.opts if o.startswith("--")]
        if param.param_type_name == "option" and long_names and param.name:
            flags[param.name] = long_names[0]
    return flags


def as_flags(text: str, flags: dict[str, str]) -> str:
    """The library names settings as `field` (backticked config-field names); on the command line they are flags:
    ``"`shard_size` must be at least 1"`` -> ``"--shard-size must be at least 1"``. Other backticked text stays."""
    return _SETTING.sub(lambda m: flags.get(m.group(1), m.group(0)), text)


@contextlib.contextmanager
def user_errors():
    """Turn ``ReflowPairsError`` into one red paragraph (settings worded as this command's flags) and exit 1;
    Ctrl-C into a short note."""
    try:
        yield
    except ReflowPairsError as err:
        if _state["debug"]:
            console.print_exception()
        flags = _state["flags"]
        text = f"{as_flags(err.what, flags)} {as_flags(err.hint, flags)}".rstrip()
        console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print(
            "[yellow]Interrupted.[/] Completed shards are saved; rerun the same command with --resume to finish."
        )
        raise typer.Exit(130) from None


def progress(
    main: bool = True, prefix: str = "reflowpairs", every: int | None = None, cap: int | None = None
) -> Progress:
    """A rich bar on a terminal, plain progress lines (every ``every`` units; default: a tenth of the total, at most
    ``cap``) when stderr is a file; ``REFLOWPAIRS_PROGRESS`` overrides the choice (``reflowpairs.cli.progress``)."""
    return make_progress(console, prefix, main=main, every=every, cap=cap)


def print_next(*commands: list[str] | str, why: str | None = None) -> None:
    """``next: COMMAND`` (and ``then: COMMAND`` for more), each on one line so that it copies and pastes whole
    (``reflowpairs.next_steps.next_lines``), then ``why`` in brackets."""
    for i, line in enumerate(next_lines(*commands)):
        out_console.print(
            line,
            style="bold green" if i == 0 else None,
            markup=False,
            soft_wrap=True,
            highlight=False,
        )
    if why:
        out_console.print(f"      ({why})", markup=False, soft_wrap=True, highlight=False)


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
