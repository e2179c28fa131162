"""The commands a run tells its user to run next, as text to copy and paste (one place for their wording).

Every command is built as an argument list and shell-quoted with ``shlex`` (``command_text``), so a path with a space
or a quote pastes as one argument. ``reflowpairs_command`` spells our own options (``dataset_root`` ->
``--dataset-root VALUE``), ``lerobot_command`` lerobot's draccus options (``policy.path`` -> ``--policy.path=VALUE``).
An upper-case word such as ``MERGED_DIR`` or ``...`` is a placeholder for the user to fill in; it needs no quoting.

The command line prints these as ``next: COMMAND`` (and ``then: COMMAND`` for the ones after it, ``next_lines``);
Python callers and ``reflowpairs.pipeline`` get the same text.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path

OptionValue = str | Path | int | float | bool | Sequence[int] | None
"""A value ``reflowpairs_command`` writes: None or False leaves the option out, True writes the bare flag, a
sequence of episode numbers is written ``0,1,2``, anything else as ``str(value)``."""

TRAIN_RUNS = Path("outputs") / "reflow"  # where a suggested train run goes: outputs/reflow/<store name>


def command_text(args: Iterable[str | Path]) -> str:
    """``["reflowpairs", "validate", "/a b"]`` -> ``"reflowpairs validate '/a b'"``: one line for a shell."""
    return shlex.join(str(arg) for arg in args)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def reflowpairs_args(command: str, *arguments: str | Path, **options: OptionValue) -> list[str]:
    """``reflowpairs COMMAND ARGUMENTS... --option VALUE...`` as an argument list, options in the order given
    (``dataset_root=...`` is ``--dataset-root``; see ``OptionValue`` for how a value is written)."""
    args = ["reflowpairs", command, *map(str, arguments)]
    for name, value in options.items():
        if value is None or value is False:
            continue
        if value is True:
            args.append(_flag(name))
        elif isinstance(value, list | tuple):
            args += [_flag(name), ",".join(map(str, value))]
        else:
            args += [_flag(name), str(value)]
    return args


def reflowpairs_command(command: str, *arguments: str | Path, **options: OptionValue) -> str:
    """``reflowpairs_args`` as one shell-quoted line."""
    return command_text(reflowpairs_args(command, *arguments, **options))


def lerobot_command(program: str, **options: OptionValue) -> str:
    """``lerobot-eval --policy.path=DIR --env.type=pusht``: a lerobot tool with draccus' ``--name=value`` options
    (keys given as ``**{"policy.path": ...}``; None leaves one out), shell-quoted."""
    args = [program] + [f"--{name}={value}" for name, value in options.items() if value is not None]
    return command_text(args)


def train_args(store: str | Path, dataset_root: str | Path | None = None) -> list[str]:
    """``reflowpairs train --pairs STORE --out outputs/reflow/<store name>`` (a run directory to change at will)."""
    run = TRAIN_RUNS / Path(store).resolve().name
    return reflowpairs_args("train", pairs=store, out=str(run), dataset_root=dataset_root)


def validate_args(store: str | Path, spot_check: int | None = None) -> list[str]:
    """``reflowpairs validate STORE [--spot-check N]``."""
    return reflowpairs_args("validate", store, spot_check=spot_check)


def merge_args(first_slice: str | Path, more_slices: bool) -> list[str]:
    """``reflowpairs merge SLICE [...] --out MERGED_DIR``: the merge of a ``--partition`` run's slices, the others
    and the destination left for the user to fill in."""
    return [
        "reflowpairs",
        "merge",
        str(first_slice),
        *(["..."] if more_slices else []),
        "--out",
        "MERGED_DIR",
    ]


def rerun_with_options_file(command: str, path: str | Path) -> str:
    """``reflowpairs COMMAND --config PATH``: the command that repeats a run from the options file it wrote."""
    return reflowpairs_command(command, config=Path(path).resolve())


def next_lines(*commands: Sequence[str | Path] | str) -> list[str]:
    """``["next: COMMAND", "then: COMMAND", ...]``: each command (an argument list, or a line already quoted) on one
    line of its own, so that it copies and pastes whole."""
    return [
        f"{'next' if i == 0 else 'then'}: {command if isinstance(command, str) else command_text(command)}"
        for i, command in enumerate(commands)
    ]
