"""Options files: a run's options as YAML, so that ``reflowpairs COMMAND --config FILE`` repeats the run.

A file holds one mapping of a command's options by their long names without the dashes (``samples-per-frame: 4``;
null: the option's default). Every such file starts with ``CONFIG_HEADER`` and the command that repeats the run;
``write_options`` overwrites only a file that starts so (never a file of the user's). Paths are written absolute.

The command line writes one per run (``generate``: ``STORE/generate_config.yaml``, named by
``reflowpairs.store.layout.GENERATE_OPTIONS`` as part of a store's layout; ``train``:
``OUT/train_options.yaml``, ``eval``: ``OUT/eval_options.yaml``); ``reflowpairs.pipeline`` writes the same file for
each of its generate, train and eval stages (``config_options``), so that any stage can be rerun on its own.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reflowpairs.atomic import replace_atomically
from reflowpairs.errors import ReflowPairsError
from reflowpairs.next_steps import rerun_with_options_file

CONFIG_HEADER = "# reflowpairs"  # first line of every options file reflowpairs writes
TRAIN_OPTIONS = "train_options.yaml"  # in a train run's OUT
EVAL_OPTIONS = "eval_options.yaml"  # in an eval's OUT

# A library config's fields that are not options of its command (the run's own mechanics), and the fields whose
# option has another name; ``config_options`` leaves out the former and renames the latter.
NOT_OPTIONS = {
    "generate": ("resume", "overwrite", "threads", "cache_features_if_allowed", "writer_id"),
    "train": (
        "resume",
        "threads",
        "wandb_config",
    ),  # wandb_config: lerobot's WandBConfig, from the --wandb* options
    "eval": (),
}
OPTION_NAMES = {"generate": {"backend": "format"}, "train": {}, "eval": {}}


def read_options_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON options file (JSON is YAML; ``{}`` for an empty file). A file that cannot be
    read, is not UTF-8, YAML or JSON, or holds no mapping raises ``ReflowPairsError`` naming it."""
    import yaml  # PyYAML: only where a file is read or written (the command line starts without it)

    path = Path(path)
    json_file = path.suffix.lower() == ".json"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ReflowPairsError(f"cannot read {path} ({err.strerror or err}).") from None
    except UnicodeDecodeError as err:
        raise ReflowPairsError(f"{path} is not UTF-8 text (byte {err.start}).") from None
    try:
        data = json.loads(text) if json_file else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        kind = "JSON" if json_file else "YAML"
        raise ReflowPairsError(f"{path} is not valid {kind} ({' '.join(str(err).split())}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ReflowPairsError(
            f"{path} holds a {type(data).__name__}, not a mapping of option names to values."
        )
    return data


def flatten_options(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"wandb": {"project": "p"}}`` -> ``("wandb.project", "p")`` (lerobot's nesting); other values as they are."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten_options(value, name + ".")
        else:
            yield name, value


def plain_value(value: Any) -> Any:
    """A value as an options file holds it: a path absolute, as text; a tuple as a list; the rest as it is."""
    if isinstance(value, Path):
        return str(value.expanduser().resolve())
    if isinstance(value, tuple):
        return [plain_value(v) for v in value]
    return value


def _ours(path: Path) -> bool:
    """Whether ``path`` is an options file reflowpairs wrote (one it may overwrite)."""
    try:
        return path.is_file() and path.read_bytes().startswith(CONFIG_HEADER.encode())
    except OSError:
        return False


def write_options(path: str | Path, command: str, options: dict[str, Any]) -> Path | None:
    """Write ``options`` (long name without dashes -> value) as YAML to ``path``, crash-safely, headed by the command
    that repeats the run; returns None, writing nothing, when ``path`` exists and is not such a file (a file of the
    user's). ``OSError`` (a read-only or full disk) is the caller's to report."""
    import yaml  # PyYAML: only where a file is read or written (the command line starts without it)

    path = Path(path)
    if path.exists() and not _ours(path):
        return None
    header = (
        f"{CONFIG_HEADER} {command} options of this run (null: the default). Repeat the run with:\n"
        f"#   {rerun_with_options_file(command, path)}\n"
        "# Flags on the command line override this file (e.g. another --out).\n"
    )
    text = header + yaml.safe_dump(options, sort_keys=False, default_flow_style=False)
    replace_atomically(path, lambda tmp: Path(tmp).write_text(text))
    return path


def config_options(command: str, config: Any, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """A library config (``GenerateConfig``, ``TrainConfig``, ``EvalConfig``) as the options of ``command`` that
    repeat it: every field that is an option (``NOT_OPTIONS`` left out, ``OPTION_NAMES`` renamed), by long name,
    ``values`` (field -> value) replacing some, paths absolute (``plain_value``)."""
    values = values or {}
    skipped = set(NOT_OPTIONS.get(command, ()))
    names = OPTION_NAMES.get(command, {})
    options: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        if field.name in skipped:
            continue
        value = values.get(field.name, getattr(config, field.name))
        if field.name == "partition" and value is not None:  # (i, P) -> "i/P", as --partition takes it
            value = f"{value[0]}/{value[1]}"
        options[names.get(field.name, field.name).replace("_", "-")] = plain_value(value)
    return options
