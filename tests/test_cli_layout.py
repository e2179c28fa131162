"""The product card's layout: the Typer app is the top-level cli/ folder installed as reflowpairs.cli, the library
under reflowpairs/ holds no Typer or rich code, every command's defaults are its library config's, and library errors
that name a setting reach the user as that command's flag."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import reflowpairs
import reflowpairs.cli
from reflowpairs.cli import eval_cmd, generate_cmd, store_cmds, train_cmd
from reflowpairs.cli.app import app
from reflowpairs.cli.ui import as_flags, command_flags
from reflowpairs.eval.config import EvalConfig
from reflowpairs.generate.config import GenerateConfig
from reflowpairs.train.config import TrainConfig
from reflowpairs.validate.config import ValidateConfig

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_cli_is_the_top_level_folder_installed_as_reflowpairs_cli():
    assert Path(reflowpairs.cli.__file__).resolve() == ROOT / "cli" / "__init__.py"
    assert Path(reflowpairs.__file__).resolve() == ROOT / "reflowpairs" / "__init__.py"
    assert not (ROOT / "reflowpairs" / "cli").exists()


def test_the_library_imports_neither_typer_nor_rich():
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_modules(path) & {"typer", "rich", "click"})
        for path in (ROOT / "reflowpairs").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


# Imports of other packages the command line still makes, each until the library offers it (the W&B settings move
# into the library's train() in the #25 renovation).
_CLI_EXCEPTIONS: set[tuple[str, str]] = set()  # none: W&B settings are built by the library (wandb_log)


def test_the_cli_imports_only_the_library_typer_rich_and_the_standard_library():
    import sys

    allowed = {"reflowpairs", "typer", "rich", "click", *sys.stdlib_module_names}
    offenders = {
        (path.name, name)
        for path in (ROOT / "cli").glob("*.py")
        for name in _imported_modules(path) - allowed
    }
    assert offenders <= _CLI_EXCEPTIONS


def test_the_cli_uses_no_private_api_of_typer():
    for path in (ROOT / "cli").glob("*.py"):
        assert "_click" not in path.read_text(), path.name


def test_command_modules_do_not_import_the_app():
    """No circle: commands and the shared UI never import cli/app.py, which registers them."""
    for path in (ROOT / "cli").glob("*.py"):
        if path.name in ("app.py", "__init__.py"):
            continue
        tree = ast.parse(path.read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "reflowpairs.cli.app" not in modules and "reflowpairs.cli" not in modules, path.name


def _defaults(config_class: type) -> dict:
    out = {}
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            out[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            out[field.name] = field.default_factory()
    return out


@pytest.mark.parametrize(
    ("command", "config_class"),
    [
        (generate_cmd.generate, GenerateConfig),
        (train_cmd.train, TrainConfig),
        (eval_cmd.eval_command, EvalConfig),
        (store_cmds.validate, ValidateConfig),
    ],
)
def test_option_defaults_are_the_library_configs(command, config_class):
    config = _defaults(config_class)
    checked = 0
    for name, param in inspect.signature(command).parameters.items():
        field = {"format": "backend"}.get(name, name)  # generate's --format fills GenerateConfig.backend
        if param.default is inspect.Parameter.empty or field not in config:
            continue
        if name == "log_every" and config_class is TrainConfig:
            assert param.default is None  # None: log every step, a progress line every 100 (the CLI's choice)
            continue
        expected = config[field]
        if isinstance(expected, list):  # eval's step counts are typed as text on the command line
            expected = ",".join(map(str, expected))
        assert param.default == expected, (name, param.default, expected)
        checked += 1
    assert checked >= 8


def test_settings_are_worded_as_flags():
    flags = {"shard_size": "--shard-size", "backend": "--format"}
    text = "`shard_size` must be at least 1; `backend` is zarr or parquet; `not_an_option` and `x` stay."
    assert as_flags(text, flags) == (
        "--shard-size must be at least 1; --format is zarr or parquet; `not_an_option` and `x` stay."
    )


def test_command_flags_name_every_long_option():
    import typer.main

    click_command = typer.main.get_command(app).commands["generate"]
    flags = command_flags(click_command)
    assert flags["samples_per_frame"] == "--samples-per-frame"
    assert flags["backend"] == "--format"
    assert flags["resume"] == "--resume"
